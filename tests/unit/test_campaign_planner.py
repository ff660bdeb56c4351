"""The campaign core with the batch planner on: who starts, who waits and why, and halting."""

from __future__ import annotations

from datetime import timedelta

import pytest
from core_harness import T0, TARGET, Driver, of_type, reply, vm

from schemas.events import (
    CampaignFailed,
    NodeCycleAdvanced,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    NodeStep,
    NodeUpgradeFailed,
    NodeUpgradeRequested,
    VmMigrated,
    VmMigrationRequested,
)
from services.upgrade_manager.domain import CampaignStatus
from services.upgrade_manager.domain.planner import Cloud, Host, VmLoad, VnfRule

pytestmark = pytest.mark.unit

NODES = ("n1", "n2", "n3", "n4")


def cloud_of(extra_hosts: int = 2) -> tuple[Cloud, dict[str, VnfRule]]:
    """An active-standby pair on n1/n2 and a two-member load-balanced VNF on n3/n4, roomy."""

    def load(vm_id: str, vnf_id: str | None) -> VmLoad:
        return VmLoad(vm_id, vnf_id, 2, 2048)

    placed = {
        "n1": [load("as-a", "as1")],
        "n2": [load("as-b", "as1")],
        "n3": [load("lb-a", "lb1")],
        "n4": [load("lb-b", "lb1")],
    }
    hosts = [Host.of(n, f"fd{i % 2}", 16, 32768, placed[n]) for i, n in enumerate(NODES)]
    hosts += [Host.of(f"spare{i}", "fd0", 16, 32768, ()) for i in range(extra_hosts)]
    rules = {
        "as1": VnfRule("as1", 2, 1, 1, min_recovery_s=10.0, anti_affinity=True),
        "lb1": VnfRule("lb1", 2, 1, 1),
    }
    return Cloud(hosts), rules


def planned(**kw: object) -> Driver:
    cloud, rules = cloud_of()
    return Driver(NODES, cloud=cloud, rules=rules, **kw)  # type: ignore[arg-type]


def claimed(d: Driver) -> list[str]:
    return [e.node_id for e in of_type(d.emitted, NodeMaintenanceRequested)]


def waiting_detail(d: Driver, node_id: str) -> str:
    details = [e.detail for e in of_type(d.emitted, NodeCycleAdvanced, node_id)]
    assert details, f"nothing reported for {node_id}"
    return details[-1]


def run_to_exit(d: Driver, node_id: str) -> None:
    d.enter(node_id, [vm(f"vm-{node_id}")])
    d.feed(
        reply(
            d.latest(VmMigrationRequested, node_id),
            VmMigrated,
            vm_id=f"vm-{node_id}",
            node_id=node_id,
            destination_node_id="spare0",
        )
    )
    upgrade = d.latest(NodeUpgradeRequested, node_id)
    from schemas.events import NodeUpgraded

    d.feed(reply(upgrade, NodeUpgraded, node_id=node_id, version=TARGET))
    release = d.latest(NodeMaintenanceExitRequested, node_id)
    d.feed(reply(release, NodeMaintenanceExited, node_id=node_id, restored_status="enabled"))


def test_one_member_of_each_vnf_starts_and_the_others_say_why_they_wait() -> None:
    d = planned()
    d.start(max_parallel=4)
    started = claimed(d)
    assert len(started) == 2
    assert len({"n1", "n2"} & set(started)) == 1
    assert len({"n3", "n4"} & set(started)) == 1
    for node_id in set(NODES) - set(started):
        detail = waiting_detail(d, node_id)
        assert detail.startswith("waiting (vnf_budget)"), detail
        assert d.step(node_id) is NodeStep.PENDING
    assert d.state is not None
    assert "2 node(s) wait (vnf_budget 2)" in d.state.campaign.waiting


def test_the_pair_partner_waits_for_recovery_after_the_first_member_is_back() -> None:
    d = planned()
    d.start(max_parallel=4)
    first = next(n for n in claimed(d) if n in ("n1", "n2"))
    partner = "n2" if first == "n1" else "n1"
    run_to_exit(d, first)
    assert partner not in claimed(d)
    assert waiting_detail(d, partner).startswith("waiting (recovery): as1 recovers"), (
        waiting_detail(d, partner)
    )
    d.tick(5)
    assert partner not in claimed(d)
    d.tick(6)
    assert partner in claimed(d)


def test_events_that_change_nothing_the_planner_reads_do_not_replan() -> None:
    d = planned()
    d.start(max_parallel=4)
    node = claimed(d)[0]
    d.enter(node, [vm("vm-x")])
    assert not of_type(d.last.commands, NodeMaintenanceRequested)
    assert d.last.campaign_changed is False


def test_canary_runs_alone_then_bakes() -> None:
    d = planned()
    d.start(max_parallel=4, canary_nodes=1, canary_bake_s=30)
    assert len(claimed(d)) == 1
    canary = claimed(d)[0]
    run_to_exit(d, canary)
    assert claimed(d) == [canary]
    d.tick(20)
    assert claimed(d) == [canary]
    d.tick(11)
    assert len(claimed(d)) > 1


def test_spent_failure_budget_halts_and_the_campaign_fails_when_the_cycle_drains() -> None:
    d = planned()
    d.start(max_parallel=2, failure_budget=1)
    first, second = claimed(d)
    d.enter(first, [])
    upgrade = d.latest(NodeUpgradeRequested, first)
    d.feed(reply(upgrade, NodeUpgradeFailed, node_id=first, reason="disk full", attempt=1))
    assert d.step(first) is NodeStep.FAILED
    assert d.status is CampaignStatus.ABORTING
    assert d.state is not None
    assert "failure budget spent" in d.state.campaign.reason
    run_to_exit(d, second)
    assert len(claimed(d)) == 2, "a node started after the budget was spent"
    failed = d.one(CampaignFailed)
    assert "failure budget spent" in failed.reason


def test_nothing_starts_before_the_window_and_it_closes_with_a_reason() -> None:
    d = planned()
    d.start(
        max_parallel=1,
        window_start=T0 + timedelta(minutes=10),
        window_end=T0 + timedelta(minutes=10, seconds=2),
    )
    assert claimed(d) == []
    assert waiting_detail(d, "n1").startswith("waiting (window)")
    d.tick(600)
    assert len(claimed(d)) == 1
    d.tick(3)  # the window closed while the node was in its cycle: it finishes
    assert d.status is CampaignStatus.ABORTING
    run_to_exit(d, claimed(d)[0])
    assert "maintenance window closed" in d.one(CampaignFailed).reason
    assert len(claimed(d)) == 1


def test_a_node_missing_from_the_inventory_waits_for_it() -> None:
    cloud, rules = cloud_of()
    d = Driver((*NODES, "n9"), cloud=cloud, rules=rules)
    d.start(max_parallel=10)
    assert "n9" not in claimed(d)
    assert waiting_detail(d, "n9").startswith("waiting (no_inventory)")


def test_capacity_serialises_where_it_must() -> None:
    # Two unrelated nodes with 12 vCPUs of VMs each; only the empty third node can take them.
    heavy = [VmLoad(f"vm{i}", None, 6, 1024) for i in range(2)]
    hosts = [
        Host.of("a", "fd", 16, 65536, heavy),
        Host.of("b", "fd", 16, 65536, [VmLoad(f"w{i}", None, 6, 1024) for i in range(2)]),
        Host.of("c", "fd", 16, 65536, []),
    ]
    d = Driver(("a", "b"), cloud=Cloud(hosts), rules={})
    d.start(max_parallel=2)
    assert len(claimed(d)) == 1
    waiting = next(n for n in ("a", "b") if n not in claimed(d))
    assert waiting_detail(d, waiting).startswith("waiting (capacity)")


def test_a_re_admitted_quarantined_node_starts_and_its_partner_waits_for_it() -> None:
    from core_harness import CAMPAIGN

    from schemas.events import NodeRetryRequested

    d = planned()
    d.start(max_parallel=4)
    first = next(n for n in claimed(d) if n in ("n1", "n2"))
    partner = "n2" if first == "n1" else "n1"
    assert d.cloud is not None
    host = d.cloud.hosts[first]
    # What the Cloud Manager's inventory says from the claim on: held by this campaign.
    d.cloud.put(
        Host.of(first, host.failure_domain, host.vcpus, host.ram_mb, host.vms, True, CAMPAIGN)
    )
    d.enter(first, [])
    upgrade = d.latest(NodeUpgradeRequested, first)
    d.feed(reply(upgrade, NodeUpgradeFailed, node_id=first, reason="disk", attempt=1))
    assert d.step(first) is NodeStep.FAILED
    d.tick(30)
    assert partner not in claimed(d), "the pair's other member is down on the quarantined node"
    assert waiting_detail(d, partner).startswith("waiting (vnf_budget)")
    d.feed(NodeRetryRequested(campaign_id=CAMPAIGN, producer="operator-cli", node_id=first))
    assert claimed(d).count(first) == 2, "the re-admitted node is claimed again"
    assert partner not in claimed(d)


def cloud_with_a_hub() -> tuple[Cloud, dict[str, VnfRule]]:
    """n3 shares a one-at-a-time VNF with each of n1, n2 and n4: the most constrained node."""

    def load(vm_id: str, vnf_id: str) -> VmLoad:
        return VmLoad(vm_id, vnf_id, 2, 2048)

    placed = {
        "n1": [load("a1", "a")],
        "n2": [load("b1", "b")],
        "n3": [load("a2", "a"), load("b2", "b"), load("c1", "c")],
        "n4": [load("c2", "c")],
    }
    hosts = [Host.of(n, "fd0", 16, 32768, placed[n]) for n in NODES]
    hosts += [Host.of("spare0", "fd0", 16, 32768, ())]
    rules = {v: VnfRule(v, 2, 1, 1) for v in ("a", "b", "c")}
    return Cloud(hosts), rules


@pytest.mark.parametrize(
    ("keep_order", "first"),
    [(False, "n3"), (True, "n1")],
    ids=["planner-order", "keep-order"],
)
def test_the_planner_orders_the_nodes_unless_the_request_keeps_its_order(
    keep_order: bool, first: str
) -> None:
    cloud, rules = cloud_with_a_hub()
    d = Driver(NODES, cloud=cloud, rules=rules)
    d.start(max_parallel=1, keep_order=keep_order)
    assert claimed(d) == [first]
    assert d.state is not None
    order = d.state.plan.node_order
    assert (order == NODES) is keep_order
    assert order[0] == first


def crowded_cloud(room_on_c: int) -> Cloud:
    """Node a's two 6-vCPU VMs can go only to c, which has `room_on_c` vCPUs free."""
    return Cloud(
        [
            Host.of("a", "fd", 16, 65536, [VmLoad(f"vm{i}", None, 6, 1024) for i in range(2)]),
            Host.of("c", "fd", 16, 65536, [VmLoad("big", None, 16 - room_on_c, 1024)]),
        ]
    )


def test_a_campaign_that_can_start_nothing_and_runs_nothing_fails_after_the_stall_timeout() -> None:
    d = Driver(("a",), cloud=crowded_cloud(room_on_c=4), rules={})
    d.start(max_parallel=1, stall_timeout_s=600)
    assert claimed(d) == []
    assert d.state is not None
    assert d.state.campaign.stalled_since == T0
    assert d.state.campaign.waiting.startswith("stalled since 04:00:00Z, fails at 04:10:00Z: ")
    assert "capacity" in d.state.campaign.waiting
    d.tick(599)
    assert d.status is CampaignStatus.RUNNING
    d.tick(1)
    assert d.status is CampaignStatus.FAILED
    failed = d.one(CampaignFailed)
    assert failed.reason.startswith("stalled for 600 s: no node in its cycle")
    assert "capacity" in failed.reason
    assert d.step("a") is NodeStep.PENDING and claimed(d) == []


def test_a_stall_that_clears_starts_the_node_and_restarts_the_clock() -> None:
    d = Driver(("a",), cloud=crowded_cloud(room_on_c=4), rules={})
    d.start(max_parallel=1, stall_timeout_s=600)
    d.tick(500)
    assert d.status is CampaignStatus.RUNNING and claimed(d) == []
    d.cloud = crowded_cloud(room_on_c=12)  # say, a tenant deleted a VM on c
    d.tick(1)
    assert claimed(d) == ["a"]
    assert d.state is not None and d.state.campaign.stalled_since is None
    d.tick(600)
    assert d.status is CampaignStatus.RUNNING


def test_timed_waits_are_not_a_stall() -> None:
    # The partner waits 10 s for its VNF to recover, longer than the 5 s stall timeout.
    d = planned()
    d.start(max_parallel=4, stall_timeout_s=5)
    for node in claimed(d):
        run_to_exit(d, node)
    d.tick(6)
    assert d.status is CampaignStatus.RUNNING
    assert d.state is not None and d.state.campaign.stalled_since is None
    d.tick(5)
    assert len(claimed(d)) == 4


def test_migrations_name_the_planners_packing_and_a_retry_lets_the_cloud_manager_choose() -> None:
    from schemas.events import VmMigrationFailed

    # a's two VMs (2 vCPUs each) are packed one on c (2 vCPUs free), one on d (4 free), not
    # both on the host with the most room, which is what a VIM placing each VM alone does.
    hosts = [
        Host.of(
            "a", "fd", 16, 65536, [VmLoad("vm-1", None, 2, 2048), VmLoad("vm-2", None, 2, 2048)]
        ),
        Host.of("c", "fd", 16, 65536, [VmLoad("big-c", None, 14, 1024)]),
        Host.of("d", "fd", 16, 65536, [VmLoad("big-d", None, 12, 1024)]),
    ]
    d = Driver(("a",), cloud=Cloud(hosts), rules={})
    d.start(max_parallel=1)
    d.enter("a", [vm("vm-1"), vm("vm-2")])
    requests = of_type(d.emitted, VmMigrationRequested, "a")
    assert sorted((r.vm_id, r.destination_node_id) for r in requests) in (
        [("vm-1", "c"), ("vm-2", "d")],
        [("vm-1", "d"), ("vm-2", "c")],
    )
    first = next(r for r in requests if r.vm_id == "vm-1")
    d.feed(
        reply(
            first,
            VmMigrationFailed,
            vm_id="vm-1",
            node_id="a",
            reason="no room",
            destination_node_id=first.destination_node_id,
        )
    )
    retry = [r for r in of_type(d.emitted, VmMigrationRequested, "a") if r.attempt == 2]
    assert [(r.vm_id, r.destination_node_id) for r in retry] == [("vm-1", None)]
    assert retry[0].avoid_destinations == (first.destination_node_id,)


def test_without_a_packing_the_cloud_manager_places_the_vms() -> None:
    hosts = [
        Host.of("a", "fd", 16, 65536, [VmLoad("vm-1", None, 2, 2048)]),
        Host.of("c", "fd", 16, 65536, [VmLoad("big-c", None, 15, 1024)]),
    ]
    d = Driver(("a",), cloud=Cloud(hosts), rules={})
    d.start(max_parallel=1)
    assert claimed(d) == []  # the planner does not start it: no room
    # the node entered anyway (say, the inventory changed since): no destination is named
    cloud = Cloud([hosts[0], Host.of("c", "fd", 16, 65536, [])])
    d.cloud = cloud
    d.tick(1)
    assert claimed(d) == ["a"]
    d.cloud = Cloud(hosts)
    d.enter("a", [vm("vm-1")])
    [request] = of_type(d.emitted, VmMigrationRequested, "a")
    assert request.destination_node_id is None


def test_a_deferred_node_lets_the_cloud_manager_place_its_vms() -> None:
    from schemas.events import VmMigrationFailed

    hosts = [
        Host.of("a", "fd", 16, 65536, [VmLoad("vm-1", None, 2, 2048)]),
        Host.of("c", "fd", 16, 65536, []),
    ]
    d = Driver(("a",), cloud=Cloud(hosts), rules={})
    d.start(max_parallel=1, max_step_attempts=1, deferral_s=10)
    d.enter("a", [vm("vm-1")])
    [first] = of_type(d.emitted, VmMigrationRequested, "a")
    assert first.destination_node_id == "c"
    d.feed(
        reply(
            first,
            VmMigrationFailed,
            vm_id="vm-1",
            node_id="a",
            reason="anti-affinity",
            destination_node_id="c",
        )
    )
    release = d.latest(NodeMaintenanceExitRequested, "a")
    d.feed(reply(release, NodeMaintenanceExited, node_id="a", restored_status="enabled"))
    assert d.step("a") is NodeStep.PENDING
    d.tick(11)
    d.enter("a", [vm("vm-1")])
    second = of_type(d.emitted, VmMigrationRequested, "a")[-1]
    assert second.event_id != first.event_id
    assert second.destination_node_id is None
