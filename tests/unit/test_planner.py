"""The batch planner by example: each blocker and its wording, canary and bake, window, failure
budget, order, never-upgradable nodes, a cloud with room for one node at a time, scan budget."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.upgrade_manager.domain.planner import (
    Blocked,
    Blocker,
    Cloud,
    Host,
    Limits,
    PlanStep,
    Progress,
    VmLoad,
    VnfRule,
    never_upgradable,
    plan_step,
    priority_order,
)

pytestmark = pytest.mark.unit

NOW = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)


def vm(vm_id: str, vnf_id: str | None = None, vcpus: int = 2, ram_mb: int = 2048) -> VmLoad:
    return VmLoad(vm_id, vnf_id, vcpus, ram_mb)


def host(node_id: str, *vms: VmLoad, domain: str = "fd1", vcpus: int = 16, **kw: bool) -> Host:
    return Host.of(node_id, domain, vcpus, vcpus * 2048, vms, **kw)


def roomy() -> tuple[Cloud, dict[str, VnfRule]]:
    """An active-standby pair (a1/a2), a load-balanced VNF on three nodes (b1-b3), spare room."""
    cloud = Cloud(
        [
            host("a1", vm("as-0", "as"), domain="fd1"),
            host("a2", vm("as-1", "as"), domain="fd2"),
            host("b1", vm("lb-0", "lb"), domain="fd1"),
            host("b2", vm("lb-1", "lb"), domain="fd2"),
            host("b3", vm("lb-2", "lb"), domain="fd3"),
            host("s1", domain="fd3"),
            host("s2", domain="fd3"),
        ]
    )
    rules = {
        "as": VnfRule("as", 2, 1, 1, min_recovery_s=30.0, anti_affinity=True),
        "lb": VnfRule("lb", 3, 1, 2),
    }
    return cloud, rules


def step(
    cloud: Cloud,
    rules: dict[str, VnfRule],
    candidates: list[str],
    limits: Limits | None = None,
    progress: Progress | None = None,
    now: datetime = NOW,
    **kw: object,
) -> PlanStep:
    return plan_step(
        cloud,
        rules,
        limits or Limits(max_parallel=10),
        progress or Progress(),
        candidates,
        now,
        **kw,  # type: ignore[arg-type]
    )


# --- each blocker and what it says ---------------------------------------------------------


def test_vnf_budget_holds_the_second_member_of_a_pair() -> None:
    cloud, rules = roomy()
    result = step(cloud, rules, ["a1", "a2"])
    assert result.start == ("a1",)
    assert result.blocked["a2"] == Blocked(
        Blocker.VNF_BUDGET, "as: 1 of 2 member(s) already impacted, 1 here, 1 tolerated at once"
    )


def test_min_in_service_counts_like_max_unavailable() -> None:
    cloud, _ = roomy()
    rules = {"lb": VnfRule("lb", 3, max_unavailable=3, min_in_service=2)}  # tolerates one
    result = step(cloud, rules, ["b1", "b2", "b3"])
    assert result.start == ("b1",)
    assert {b.reason for b in result.blocked.values()} == {Blocker.VNF_BUDGET}


def test_recovery_waits_after_a_release_and_says_until_when() -> None:
    cloud, rules = roomy()
    released = NOW - timedelta(seconds=10)
    result = step(cloud, rules, ["a2"], progress=Progress(released_at={"a1": released}))
    until = released + timedelta(seconds=30)
    assert result.blocked["a2"] == Blocked(
        Blocker.RECOVERY, f"as recovers from its last impact until {until.isoformat()}", until
    )
    later = step(cloud, rules, ["a2"], progress=Progress(released_at={"a1": released}), now=until)
    assert later.start == ("a2",)


def test_failure_domain_limit() -> None:
    cloud, rules = roomy()
    result = step(cloud, rules, ["a1", "b1", "s1"], Limits(10, max_per_failure_domain=1))
    assert result.start == ("a1", "s1")
    assert result.blocked["b1"] == Blocked(
        Blocker.FAILURE_DOMAIN, "1 node(s) of fd1 already in their cycle"
    )


def test_max_parallel_counts_nodes_in_their_cycle_and_is_explained() -> None:
    cloud, rules = roomy()
    progress = Progress(in_cycle=frozenset({"b1"}), started=1)
    result = step(cloud, rules, ["a1", "s1", "s2"], Limits(2), progress, explain=True)
    assert result.start == ("a1",)
    assert result.blocked["s1"] == Blocked(Blocker.MAX_PARALLEL, "all 2 slot(s) taken")
    quiet = step(cloud, rules, ["a1", "s1", "s2"], Limits(2), progress)
    assert quiet.start == ("a1",) and quiet.unexamined == 2 and not quiet.blocked


def test_unknown_held_and_already_running_nodes() -> None:
    cloud, rules = roomy()
    cloud.put(host("h1", domain="fd1", in_maintenance=True))
    progress = Progress(in_cycle=frozenset({"s1"}), started=1)
    result = step(cloud, rules, ["ghost", "h1", "s1"], progress=progress)
    assert result.start == ()
    assert result.blocked == {
        "ghost": Blocked(Blocker.NO_INVENTORY, "the Cloud Manager has not reported this node yet"),
        "h1": Blocked(Blocker.IN_MAINTENANCE, "already in maintenance outside this campaign"),
        "s1": Blocked(Blocker.IN_MAINTENANCE, "already in its cycle in this campaign"),
    }


def test_a_node_held_in_maintenance_spends_its_vnfs_budget() -> None:
    cloud, rules = roomy()
    cloud.put(host("a1", vm("as-0", "as"), in_maintenance=True))
    result = step(cloud, rules, ["a2"])
    assert result.blocked["a2"].reason is Blocker.VNF_BUDGET


def test_capacity_blocks_a_node_whose_vms_do_not_fit() -> None:
    cloud = Cloud(
        [
            host("big", vm("x1", vcpus=6), vm("x2", vcpus=6), vcpus=12),
            host("small", vm("y1", vcpus=4), vcpus=8),
            host("other", vm("z1", vcpus=4), vcpus=8),
        ]
    )
    result = step(cloud, {}, ["big", "small"])
    assert result.blocked["big"] == Blocked(
        Blocker.CAPACITY,
        "its 2 VM(s) do not all fit on the nodes left in service (vCPUs, RAM, anti-affinity)",
    )
    # The node passed over takes nothing: the next one starts, its VM on `other`.
    assert result.start == ("small",)
    assert dict(result.placements) == {"y1": "other"}


def test_capacity_is_counted_with_the_vms_of_nodes_in_their_cycle() -> None:
    cloud = Cloud(
        [
            host("a", vm("a1", vcpus=4), vcpus=8),
            host("b", vm("b1", vcpus=4), vcpus=8),
            host("c", vm("c1", vcpus=4), vcpus=8),
        ]
    )
    # a is in its cycle: a1 takes c's room, so b's VM has nowhere to go.
    result = step(cloud, {}, ["b"], progress=Progress(in_cycle=frozenset({"a"}), started=1))
    assert result.start == ()
    assert result.blocked["b"].reason is Blocker.CAPACITY


def test_nodes_in_their_cycle_that_do_not_fit_stop_every_start() -> None:
    cloud = Cloud(
        [
            host("a", vm("a1", vcpus=8), vcpus=8),
            host("b", vm("b1", vcpus=8), vcpus=8),
            host("c", vcpus=4),
        ]
    )
    progress = Progress(in_cycle=frozenset({"a", "b"}), started=2)
    result = step(cloud, {}, ["c"], progress=progress)
    assert result.start == ()
    assert result.blocked["c"] == Blocked(
        Blocker.CAPACITY, "the VMs of the nodes already in their cycle do not all fit elsewhere"
    )


def test_a_destination_that_joins_the_step_hands_its_vms_on() -> None:
    """A node that received VMs in the step and then starts must pass them on (it is not a
    destination any more), and the room it had is not counted twice."""
    cloud = Cloud(
        [
            host("x", vm("vx", vcpus=4), vcpus=10),
            host("a", vm("va", vcpus=2), vcpus=10),
            host("b", vm("vb", vcpus=5), vcpus=10),
            host("c", vm("vc", vcpus=5), vcpus=10),
        ]
    )
    progress = Progress(in_cycle=frozenset({"x"}), started=1)
    result = step(cloud, {}, ["a", "b"], Limits(3), progress)
    assert result.start == ("a",)
    assert set(result.placements) == {"vx", "va"}
    assert "a" not in result.placements.values()
    assert result.blocked["b"].reason is Blocker.CAPACITY


def test_anti_affinity_keeps_members_apart() -> None:
    rules = {"as": VnfRule("as", 2, 1, 1, anti_affinity=True)}
    cloud = Cloud(
        [
            host("a", vm("m0", "as"), vcpus=4),
            host("b", vm("m1", "as"), vcpus=4),  # room, but it holds the other member
        ]
    )
    assert step(cloud, rules, ["a"]).blocked["a"].reason is Blocker.CAPACITY
    cloud.put(host("c", vcpus=4))
    assert dict(step(cloud, rules, ["a"]).placements) == {"m0": "c"}


def test_best_fit_keeps_large_rooms_for_large_vms() -> None:
    cloud = Cloud(
        [
            host("a", vm("small", vcpus=2), vm("large", vcpus=4), vcpus=6),
            host("tight", vm("t", vcpus=6), vcpus=8),  # room 2
            host("wide", vm("w", vcpus=4), vcpus=8),  # room 4
        ]
    )
    assert dict(step(cloud, {}, ["a"]).placements) == {"large": "wide", "small": "tight"}


# --- campaign-wide blockers ------------------------------------------------------------------


def test_canary_runs_alone_then_bakes_then_the_rest_go() -> None:
    cloud, rules = roomy()
    nodes = ["s1", "s2", "b1", "a1"]
    limits = Limits(max_parallel=4, canary_nodes=1, canary_bake_s=600)
    first = step(cloud, rules, nodes, limits, explain=True)
    assert first.start == ("s1",)
    assert first.blocked["s2"] == Blocked(Blocker.MAX_PARALLEL, "all 4 slot(s) taken")

    running = Progress(in_cycle=frozenset({"s1"}), started=1)
    during = step(cloud, rules, nodes[1:], limits, running, explain=True)
    assert during.start == ()
    assert during.blocked["s2"] == Blocked(Blocker.CANARY, "the canary batch of 1 is running")

    done_at = NOW
    baking = Progress(started=1, canary_finished_at=done_at)
    bake = step(cloud, rules, nodes[1:], limits, baking, now=NOW + timedelta(seconds=60))
    until = done_at + timedelta(seconds=600)
    assert bake.start == ()
    assert bake.blocked["s2"] == Blocked(
        Blocker.CANARY, f"the canary bakes until {until.isoformat()}", until
    )
    after = step(cloud, rules, nodes[1:], limits, baking, now=until)
    assert after.start == ("s2", "b1", "a1")


def test_window() -> None:
    cloud, rules = roomy()
    opens, closes = NOW + timedelta(minutes=10), NOW + timedelta(hours=2)
    limits = Limits(max_parallel=4, window_start=opens, window_end=closes)
    before = step(cloud, rules, ["s1"], limits)
    assert before.blocked["s1"] == Blocked(
        Blocker.WINDOW, f"maintenance window opens at {opens.isoformat()}", opens
    )
    assert step(cloud, rules, ["s1"], limits, now=opens).start == ("s1",)
    after = step(cloud, rules, ["s1"], limits, now=closes)
    assert after.blocked["s1"] == Blocked(
        Blocker.WINDOW, f"maintenance window closed at {closes.isoformat()}"
    )


def test_failure_budget() -> None:
    cloud, rules = roomy()
    limits = Limits(max_parallel=4, failure_budget=2)
    assert step(cloud, rules, ["s1"], limits, Progress(started=3, failed=1)).start == ("s1",)
    spent = step(cloud, rules, ["s1"], limits, Progress(started=3, failed=2))
    assert spent.blocked["s1"] == Blocked(
        Blocker.FAILURE_BUDGET, "failure budget spent: 2 failed node(s), budget 2"
    )


# --- order and feasibility -----------------------------------------------------------------


def test_priority_order_takes_the_longest_chains_first_and_is_deterministic() -> None:
    cloud, rules = roomy()
    nodes = sorted(cloud.hosts)
    order = priority_order(cloud, rules, nodes)
    # The load-balanced VNF needs three waves (one member at a time), the pair two; nodes of
    # no VNF come last, the lightest first, then by id.
    assert order == ["b1", "b2", "b3", "a1", "a2", "s1", "s2"]
    shuffled = nodes[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert priority_order(cloud, rules, shuffled) == order
    assert priority_order(cloud, rules, ["ghost", "s2", "a1"]) == ["a1", "s2", "ghost"]


def test_never_upgradable_says_why() -> None:
    rules = {
        "rigid": VnfRule("rigid", 2, max_unavailable=1, min_in_service=2),
        "pair": VnfRule("pair", 2, 1, 1),
    }
    cloud = Cloud(
        [
            host("r", vm("r0", "rigid"), vcpus=4),
            host("r2", vm("r1", "rigid"), vcpus=4),
            host("twice", vm("p0", "pair"), vm("p1", "pair"), vcpus=8),
            host("huge", vm("h0", vcpus=30), vcpus=32),
            host("spare", vcpus=8),
            host("fine", vm("f0", vcpus=2), vcpus=8),
        ]
    )
    found = never_upgradable(cloud, rules, ["r", "twice", "huge", "fine", "ghost"])
    assert set(found) == {"r", "twice", "huge", "ghost"}
    assert found["r"].detail == (
        "rigid has 1 member(s) here but tolerates 0 impacted at once (max_unavailable 1, "
        "min_in_service 2 of 2)"
    )
    assert found["twice"].detail.startswith("pair has 2 member(s) here but tolerates 1")
    assert found["huge"].detail == (
        "its 1 VM(s) (30 vCPUs, 2048 MiB) do not fit on the other nodes even with all of them "
        "in service"
    )
    assert found["ghost"].detail == "not in the Cloud Manager's inventory"


def test_a_tight_cloud_serialises_exactly_where_it_must() -> None:
    """Room for one loaded node out at a time: the loaded nodes go one by one, while the empty
    nodes (nothing to move) all go at once beside them."""
    # Each loaded node has a 6-vCPU VM and 2 vCPUs free; only `pool` has room for 6.
    loaded = [host(f"l{i}", vm(f"v{i}", vcpus=6), vcpus=8) for i in range(4)]
    empty = [host(f"e{i}", vcpus=2) for i in range(3)]
    cloud = Cloud([*loaded, *empty, host("pool", vcpus=6)])
    nodes = [h.node_id for h in loaded + empty]
    first = step(cloud, {}, nodes, Limits(max_parallel=10), explain=True)
    assert first.start == ("l0", "e0", "e1", "e2")
    assert dict(first.placements) == {"v0": "pool"}
    for i in (1, 2, 3):
        assert first.blocked[f"l{i}"].reason is Blocker.CAPACITY
    # l0 back in service with room for 6: the next loaded node goes, and only one.
    cloud.put(host("l0", vcpus=8))
    cloud.put(host("pool", vm("v0", vcpus=6), vcpus=6))
    second = step(cloud, {}, ["l1", "l2", "l3"], Limits(max_parallel=10))
    assert second.start == ("l1",)
    assert dict(second.placements) == {"v1": "l0"}


def test_scan_budget_stops_looking_after_so_many_blocked_nodes() -> None:
    rules = {"lb": VnfRule("lb", 6, 1, 5)}
    cloud = Cloud([host(f"n{i}", vm(f"m{i}", "lb")) for i in range(6)] + [host("free")])
    candidates = [*(f"n{i}" for i in range(6)), "free"]
    progress = Progress(in_cycle=frozenset({"n0"}), started=1)
    limited = step(cloud, rules, candidates[1:], Limits(5), progress, scan_budget=2)
    assert limited.start == ()
    assert list(limited.blocked) == ["n1", "n2"]
    assert limited.unexamined == 4
    # Without a budget, or when explaining, every candidate is looked at.
    full = step(cloud, rules, candidates[1:], Limits(5), progress)
    assert full.start == ("free",) and len(full.blocked) == 5
    explained = step(cloud, rules, candidates[1:], Limits(5), progress, explain=True, scan_budget=2)
    assert explained.start == ("free",)
