"""The node cycle of the Upgrade Manager's decision core, transition by transition."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from core_harness import (
    CAMPAIGN,
    MANIFEST,
    OLD,
    T0,
    TARGET,
    Driver,
    of_type,
    outcome,
    reply,
    vm,
)

from schemas.envelope import Event, command_id
from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    CampaignCompleted,
    CampaignFailed,
    CampaignRejected,
    CampaignStarted,
    NodeAvailable,
    NodeCycleAdvanced,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRefused,
    NodeMaintenanceRequested,
    NodeStep,
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
    VmMigrated,
    VmMigrationFailed,
    VmMigrationRequested,
)
from schemas.types import BusinessOutcome, VnfmTimeoutPolicy
from services.upgrade_manager.domain import (
    BACKSTOP_GRACE,
    CampaignStatus,
    Tick,
    decide,
    recover,
)

pytestmark = pytest.mark.unit

MOVED = BusinessOutcome.SWITCHED_OVER
LEFT = BusinessOutcome.LEFT_FOR_VIM


def cid(node: str, step: NodeStep | str, attempt: int, *vm_id: str) -> uuid.UUID:
    value = step.value if isinstance(step, NodeStep) else step
    return command_id(CAMPAIGN, node, value, attempt, *vm_id)


def drive_to_upgrading(d: Driver, node: str = "n1") -> NodeUpgradeRequested:
    d.enter(node, [vm("vm-1")])
    d.feed(
        reply(
            d.latest(VmMigrationRequested, node),
            VmMigrated,
            vm_id="vm-1",
            node_id=node,
            destination_node_id="other",
        )
    )
    return d.one(NodeUpgradeRequested, node)


def drive_to_releasing(d: Driver, node: str = "n1") -> NodeMaintenanceExitRequested:
    upgrade = drive_to_upgrading(d, node)
    d.feed(reply(upgrade, NodeUpgraded, node_id=node, version=TARGET))
    return d.one(NodeMaintenanceExitRequested, node)


def exited(d: Driver, node: str) -> list[Event]:
    release = d.latest(NodeMaintenanceExitRequested, node)
    return list(
        d.feed(reply(release, NodeMaintenanceExited, node_id=node, restored_status="enabled"))
    )


# --- campaign start --------------------------------------------------------------------


def test_start_claims_up_to_max_parallel_in_node_order_with_full_envelopes() -> None:
    d = Driver(["n1", "n2", "n3"])
    request = d.request(["n1", "n2", "n3"], max_parallel=2)
    commands = d.feed(request)
    started = d.one(CampaignStarted)
    assert started.nodes == ("n1", "n2", "n3") and started.target_version == TARGET
    claims = of_type(commands, NodeMaintenanceRequested)
    assert [c.node_id for c in claims] == ["n1", "n2"]
    for claim in claims:
        assert claim.event_id == cid(claim.node_id, NodeStep.CLAIMING, 1)
        assert claim.holder == CAMPAIGN and claim.attempt == 1
        assert claim.campaign_id == CAMPAIGN
        assert claim.causation_id == request.event_id
        assert claim.correlation_id == request.correlation_id
        assert claim.producer == "upgrade-manager" and claim.occurred_at == T0
    assert d.step("n3") is NodeStep.PENDING
    assert d.last.changed_nodes == {"n1", "n2", "n3"} and d.last.campaign_changed
    assert d.last.plan_changed


def test_null_node_list_means_every_known_node_sorted() -> None:
    d = Driver(["b", "c", "a"])
    d.feed(d.request(None))
    assert d.one(CampaignStarted).nodes == ("a", "b", "c")


@pytest.mark.parametrize(
    ("nodes", "known", "reason"),
    [
        (("n1", "ghost"), ("n1",), "unknown nodes"),
        ((), ("n1",), "node list is empty"),
        (None, (), "no node agent has reported"),
    ],
)
def test_bad_requests_are_rejected_and_remembered(
    nodes: tuple[str, ...] | None, known: tuple[str, ...], reason: str
) -> None:
    d = Driver(known)
    request = d.request(nodes)
    d.feed(request)
    rejected = d.one(CampaignRejected)
    assert reason in rejected.reason and rejected.causation_id == request.event_id
    assert d.status is CampaignStatus.REJECTED
    assert d.feed(request) == []  # a redelivery is ignored


def test_reusing_a_campaign_id_for_another_request_is_rejected_once() -> None:
    d = Driver(["n1", "n2"])
    first = d.request(["n1"])
    d.feed(first)
    state = d.state
    assert d.feed(first) == [] and d.state is state  # redelivered: ignored
    same_again = d.request(["n1"])  # same content, new event id (a CLI retry)
    assert d.feed(same_again) == []
    other = d.request(["n1", "n2"])
    assert "already used" in d.one(CampaignRejected, events=d.feed(other)).reason
    assert d.status is CampaignStatus.RUNNING
    assert d.feed(other) == []


# --- the full cycle --------------------------------------------------------------------


def test_full_cycle_of_one_node_and_campaign_completion() -> None:
    d = Driver(["n1", "n2"])
    d.start(max_parallel=1, vnfm_timeout_s=40)
    vms = [vm("vm-a", "vnf-1"), vm("vm-b", "vnf-2"), vm("vm-c")]
    d.enter("n1", vms)
    assert d.step("n1") is NodeStep.NOTIFYING
    ask = d.one(BusinessMoveRequested, "n1")
    assert [(r.vm_id, r.vnf_id) for r in ask.vms] == [("vm-a", "vnf-1"), ("vm-b", "vnf-2")]
    assert ask.deadline == T0 + timedelta(seconds=40)
    assert ask.event_id == cid("n1", NodeStep.NOTIFYING, 1)

    d.feed(
        reply(
            ask,
            BusinessMoved,
            node_id="n1",
            outcomes=(outcome("vm-a", "vnf-1", MOVED), outcome("vm-b", "vnf-2", LEFT)),
        )
    )
    # vm-a's business moved: it stays; vm-b left for the VIM, vm-c has no VNF to ask.
    migrations = of_type(d.last.commands, VmMigrationRequested)
    assert [m.vm_id for m in migrations] == ["vm-b", "vm-c"]
    assert all(m.destination_node_id is None and m.node_id == "n1" for m in migrations)
    assert migrations[0].event_id == cid("n1", NodeStep.MIGRATING, 1, "vm-b")

    for m in migrations:
        assert not of_type(d.last.commands, NodeUpgradeRequested)
        d.feed(reply(m, VmMigrated, vm_id=m.vm_id, node_id="n1", destination_node_id="n2"))
    upgrade = d.one(NodeUpgradeRequested, "n1")
    assert upgrade.manifest == MANIFEST and upgrade.attempt == 1

    d.feed(reply(upgrade, NodeUpgradeAccepted, node_id="n1", target_version=TARGET))
    d.feed(reply(upgrade, NodeUpgradeProgressed, node_id="n1", phase="rebooting", percent=60))
    assert "rebooting (60%)" in d.node("n1").detail
    d.feed(reply(upgrade, NodeUpgraded, node_id="n1", version=TARGET))
    release = d.one(NodeMaintenanceExitRequested, "n1")
    assert release.holder == CAMPAIGN

    commands = exited(d, "n1")
    available = d.one(NodeAvailable, "n1", events=commands)
    assert available.vnf_ids == ("vnf-1", "vnf-2")
    assert d.step("n1") is NodeStep.DONE
    assert d.one(NodeMaintenanceRequested, "n2")  # the next node starts
    assert d.steps_of("n1") == [
        NodeStep.CLAIMING,
        NodeStep.NOTIFYING,
        NodeStep.MIGRATING,
        NodeStep.UPGRADING,
        NodeStep.RELEASING,
        NodeStep.DONE,
    ]
    drive_to_releasing(d, "n2")
    exited(d, "n2")
    completed = d.one(CampaignCompleted)
    assert (completed.upgraded, completed.skipped, completed.failed) == (2, 0, 0)
    assert d.status is CampaignStatus.COMPLETED


def test_no_vm_with_a_vnf_skips_the_request_and_no_vm_at_all_goes_to_upgrade() -> None:
    d = Driver(["n1", "n2"])
    d.start(max_parallel=2)
    d.enter("n1", [vm("vm-x")])
    assert not of_type(d.last.commands, BusinessMoveRequested)
    assert [m.vm_id for m in of_type(d.last.commands, VmMigrationRequested)] == ["vm-x"]
    d.enter("n2", [])
    assert d.one(NodeUpgradeRequested, "n2")
    assert d.steps_of("n2")[-3:] == [NodeStep.NOTIFYING, NodeStep.MIGRATING, NodeStep.UPGRADING]
    assert (
        "no VM on the node belongs to a VNF"
        in of_type(d.emitted, NodeCycleAdvanced, "n2")[1].detail
    )


def test_incoming_vms_count_as_vms_on_the_node() -> None:
    d = Driver(["n1"])
    d.start()
    d.enter("n1", [vm("vm-a", "vnf-1"), vm("vm-in", "vnf-2", incoming=True)])
    ask = d.one(BusinessMoveRequested, "n1")
    assert {r.vm_id for r in ask.vms} == {"vm-a", "vm-in"}
    d.feed(reply(ask, BusinessMoved, node_id="n1", outcomes=(outcome("vm-a", "vnf-1", MOVED),)))
    # No answer for the incoming VM: it is migrated off once it lands.
    assert [m.vm_id for m in of_type(d.last.commands, VmMigrationRequested)] == ["vm-in"]


def test_migrate_moved_vms_migrates_every_vm() -> None:
    d = Driver(["n1"])
    d.start(migrate_moved_vms=True)
    d.enter("n1", [vm("vm-a", "vnf-1"), vm("vm-b", "vnf-1")])
    ask = d.one(BusinessMoveRequested, "n1")
    outcomes = (outcome("vm-a", "vnf-1", MOVED), outcome("vm-b", "vnf-1", BusinessOutcome.DRAINED))
    d.feed(reply(ask, BusinessMoved, node_id="n1", outcomes=outcomes))
    assert {m.vm_id for m in of_type(d.last.commands, VmMigrationRequested)} == {"vm-a", "vm-b"}


def test_all_business_moved_goes_straight_to_upgrade() -> None:
    d = Driver(["n1"])
    d.start()
    d.enter("n1", [vm("vm-a", "vnf-1")])
    ask = d.one(BusinessMoveRequested, "n1")
    d.feed(reply(ask, BusinessMoved, node_id="n1", outcomes=(outcome("vm-a", "vnf-1", MOVED),)))
    assert d.one(NodeUpgradeRequested, "n1")
    assert not of_type(d.emitted, VmMigrationRequested)


# --- claims --------------------------------------------------------------------------------


def test_refused_claim_skips_the_node_without_release_and_starts_the_next() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    claim = d.latest(NodeMaintenanceRequested, "n1")
    d.feed(
        reply(
            claim,
            NodeMaintenanceRefused,
            node_id="n1",
            reason="in maintenance",
            current_holder="admin",
        )
    )
    assert d.step("n1") is NodeStep.SKIPPED
    assert "held by admin" in d.node("n1").detail
    assert not of_type(d.emitted, NodeMaintenanceExitRequested)
    assert d.one(NodeMaintenanceRequested, "n2")


def test_refusal_naming_ourselves_is_not_a_refusal() -> None:
    d = Driver(["n1"])
    d.start()
    claim = d.latest(NodeMaintenanceRequested, "n1")
    d.feed(
        reply(claim, NodeMaintenanceRefused, node_id="n1", reason="held", current_holder=CAMPAIGN)
    )
    assert d.step("n1") is NodeStep.CLAIMING


def test_claim_deadline_resends_with_new_ids_then_releases_and_fails() -> None:
    d = Driver(["n1"])
    d.start(step_timeout_s=60, max_step_attempts=3)
    assert d.tick(59) == []
    resent = d.one(NodeMaintenanceRequested, "n1", events=d.tick(1))
    assert resent.attempt == 2 and resent.event_id == cid("n1", NodeStep.CLAIMING, 2)
    assert resent.causation_id is None  # caused by a Tick
    assert d.one(NodeMaintenanceRequested, "n1", events=d.tick(60)).attempt == 3
    release = d.one(NodeMaintenanceExitRequested, "n1", events=d.tick(60))
    assert release.holder == CAMPAIGN  # harmless if the claim never took effect
    assert d.step("n1") is NodeStep.RELEASING
    commands = exited(d, "n1")
    assert d.step("n1") is NodeStep.FAILED
    assert not of_type(commands, NodeAvailable)  # it never was seen in maintenance
    assert "maintenance not confirmed after 3 attempt(s)" in d.node("n1").detail


# --- VNFM timeouts -------------------------------------------------------------------------


def notifying(policy: VnfmTimeoutPolicy, nodes: tuple[str, ...] = ("n1",), **kw: Any) -> Driver:
    d = Driver(nodes)
    d.start(on_vnfm_timeout=policy, vnfm_timeout_s=40, **kw)
    d.enter("n1", [vm("vm-a", "vnf-1"), vm("vm-b", "vnf-2")])
    return d


def test_backstop_acts_as_if_every_vm_were_left_for_the_vim() -> None:
    d = notifying(VnfmTimeoutPolicy.MIGRATE)
    grace = BACKSTOP_GRACE.total_seconds()
    assert d.tick(40) == [] and d.tick(grace - 1) == []
    commands = d.tick(1)
    assert {m.vm_id for m in of_type(commands, VmMigrationRequested)} == {"vm-a", "vm-b"}
    assert "VNFM timed out" in d.node("n1").detail
    late = reply(d.latest(BusinessMoveRequested, "n1"), BusinessMoved, node_id="n1", outcomes=())
    assert d.feed(late) == []  # too late: ignored


def test_timeout_with_policy_migrate_migrates_the_unanswered_vms() -> None:
    d = notifying(VnfmTimeoutPolicy.MIGRATE)
    ask = d.latest(BusinessMoveRequested, "n1")
    d.feed(
        reply(
            ask,
            BusinessMoved,
            node_id="n1",
            timed_out=True,
            outcomes=(outcome("vm-a", "vnf-1", MOVED),),
        )
    )
    assert [m.vm_id for m in of_type(d.last.commands, VmMigrationRequested)] == ["vm-b"]


def test_timeout_with_policy_skip_node_releases_and_skips_without_upgrade() -> None:
    d = notifying(VnfmTimeoutPolicy.SKIP_NODE)
    ask = d.latest(BusinessMoveRequested, "n1")
    d.feed(reply(ask, BusinessMoved, node_id="n1", timed_out=True, outcomes=()))
    assert d.one(NodeMaintenanceExitRequested, "n1")
    commands = exited(d, "n1")
    assert d.step("n1") is NodeStep.SKIPPED and "skip-node" in d.node("n1").detail
    # The VNFMs were told about the maintenance: they are told the node is back.
    assert of_type(commands, NodeAvailable)
    assert not of_type(d.emitted, NodeUpgradeRequested)
    assert d.one(CampaignCompleted, events=commands).skipped == 1


def test_timeout_with_policy_abort_releases_unstarted_nodes_and_fails_after_the_rest() -> None:
    d = Driver(["n1", "n2", "n3", "n4", "n5"])
    d.start(on_vnfm_timeout=VnfmTimeoutPolicy.ABORT, max_parallel=3)
    drive_to_upgrading(d, "n2")  # n2 is upgrading: it finishes normally
    d.enter("n3", [vm("vm-3", "vnf-3")])  # n3 is notifying: released
    d.enter("n1", [vm("vm-1", "vnf-1")])
    ask = d.latest(BusinessMoveRequested, "n1")
    d.feed(reply(ask, BusinessMoved, node_id="n1", timed_out=True, outcomes=()))
    assert d.status is CampaignStatus.ABORTING
    assert {c.node_id for c in of_type(d.last.commands, NodeMaintenanceExitRequested)} == {
        "n1",
        "n3",
    }
    assert not of_type(d.last.commands, NodeMaintenanceRequested)
    exited(d, "n1")
    exited(d, "n3")
    assert not of_type(d.last.commands, NodeMaintenanceRequested)  # nothing new starts
    assert not of_type(d.emitted, CampaignFailed)  # n2 is still upgrading
    upgrade = d.latest(NodeUpgradeRequested, "n2")
    d.feed(reply(upgrade, NodeUpgraded, node_id="n2", version=TARGET))
    commands = exited(d, "n2")
    failed = d.one(CampaignFailed, events=commands)
    assert "policy abort" in failed.reason and failed.upgraded == 1
    assert d.state is not None and d.state.campaign.status is CampaignStatus.FAILED
    assert d.step("n4") is NodeStep.PENDING and d.step("n5") is NodeStep.PENDING
    assert d.tick(3600) == []


# --- migrations ----------------------------------------------------------------------------


def migrating(d: Driver, *vm_ids: str, **policy: Any) -> None:
    d.start(**policy)
    d.enter("n1", [vm(v) for v in vm_ids])


def test_migration_failure_retries_with_a_new_id_and_ignores_stale_failures() -> None:
    d = Driver(["n1"])
    migrating(d, "vm-1", "vm-2", max_step_attempts=3)
    first = d.latest(VmMigrationRequested, "n1")
    assert first.vm_id == "vm-2"
    failure = reply(first, VmMigrationFailed, vm_id="vm-2", node_id="n1", reason="no capacity")
    retry = d.one(VmMigrationRequested, "n1", events=d.feed(failure))
    assert retry.attempt == 2 and retry.event_id == cid("n1", NodeStep.MIGRATING, 2, "vm-2")
    assert d.feed(failure) == []  # the same (now stale) failure again: ignored
    assert "retrying vm-2 (attempt 2)" in d.node("n1").detail


def test_migration_failures_exhausted_release_the_node_untouched() -> None:
    d = Driver(["n1"])
    migrating(d, "vm-1", max_step_attempts=2, max_deferrals=0)
    for _ in range(2):
        request = d.latest(VmMigrationRequested, "n1")
        d.feed(reply(request, VmMigrationFailed, vm_id="vm-1", node_id="n1", reason="no capacity"))
    assert d.one(NodeMaintenanceExitRequested, "n1")
    commands = exited(d, "n1")
    assert d.step("n1") is NodeStep.FAILED
    assert "vm-1 could not be migrated: no capacity (after 2 attempt(s))" in d.node("n1").detail
    assert not of_type(d.emitted, NodeUpgradeRequested)
    assert of_type(commands, NodeAvailable)


def test_a_node_that_cannot_be_emptied_returns_to_service_and_is_deferred() -> None:
    d = Driver(["n1"])
    migrating(d, "vm-1", max_step_attempts=2, max_deferrals=1, deferral_s=30)
    for _ in range(2):
        request = d.latest(VmMigrationRequested, "n1")
        d.feed(reply(request, VmMigrationFailed, vm_id="vm-1", node_id="n1", reason="no capacity"))
    exited(d, "n1")
    record = d.node("n1")
    assert record.step is NodeStep.PENDING and record.deferrals == 1
    assert record.detail.startswith("deferred as the node could not be emptied: VM vm-1")
    assert not of_type(d.emitted, NodeUpgradeRequested)
    assert len(of_type(d.emitted, NodeMaintenanceRequested, "n1")) == 1
    d.tick(31)
    assert len(of_type(d.emitted, NodeMaintenanceRequested, "n1")) == 2  # a new round
    d.enter("n1", [vm("vm-1")])
    for _ in range(2):
        request = d.latest(VmMigrationRequested, "n1")
        d.feed(reply(request, VmMigrationFailed, vm_id="vm-1", node_id="n1", reason="no capacity"))
    exited(d, "n1")
    assert d.step("n1") is NodeStep.FAILED, "deferrals used up: it fails, untouched"
    assert "still not emptied after 1 deferral(s)" in d.node("n1").detail


def test_a_failed_migration_is_retried_away_from_the_destination_that_failed() -> None:
    d = Driver(["n1"])
    migrating(d, "vm-1", max_step_attempts=3)
    first = d.latest(VmMigrationRequested, "n1")
    assert first.avoid_destinations == ()
    d.feed(
        reply(
            first,
            VmMigrationFailed,
            vm_id="vm-1",
            node_id="n1",
            reason="pre-copy did not converge",
            destination_node_id="n7",
        )
    )
    second = d.one(VmMigrationRequested, "n1")
    assert second.attempt == 2 and second.avoid_destinations == ("n7",)
    d.feed(
        reply(
            second,
            VmMigrationFailed,
            vm_id="vm-1",
            node_id="n1",
            reason="host error",
            destination_node_id="n8",
        )
    )
    assert d.one(VmMigrationRequested, "n1").avoid_destinations == ("n7", "n8")


def test_migration_deadline_resends_then_gives_the_node_up() -> None:
    d = Driver(["n1"])
    migrating(d, "vm-1", "vm-2", step_timeout_s=60, max_step_attempts=2)
    first = of_type(d.emitted, VmMigrationRequested)
    d.feed(reply(first[0], VmMigrated, vm_id="vm-1", node_id="n1", destination_node_id="x"))
    resent = of_type(d.tick(60), VmMigrationRequested)
    assert [(m.vm_id, m.attempt) for m in resent] == [("vm-2", 2)]
    assert d.one(NodeMaintenanceExitRequested, "n1", events=d.tick(60))
    assert "no answer to the migration of vm-2" in d.node("n1").detail


def test_unknown_and_duplicate_migrations_are_ignored() -> None:
    d = Driver(["n1"])
    migrating(d, "vm-1", "vm-2")
    request = d.latest(VmMigrationRequested, "n1")
    done = reply(request, VmMigrated, vm_id="vm-2", node_id="n1", destination_node_id="x")
    d.feed(done)
    state = d.state
    assert d.feed(done) == [] and d.state is state
    stranger = reply(request, VmMigrated, vm_id="vm-9", node_id="n1", destination_node_id="x")
    assert d.feed(stranger) == [] and d.state is state


# --- upgrade -------------------------------------------------------------------------------


def test_upgrade_failure_of_the_current_attempt_quarantines_the_node() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    upgrade = drive_to_upgrading(d)
    d.feed(reply(upgrade, NodeUpgradeFailed, node_id="n1", reason="sha256 mismatch", phase="fetch"))
    assert d.step("n1") is NodeStep.FAILED
    assert "quarantined" in d.node("n1").detail and "sha256 mismatch" in d.node("n1").detail
    assert not of_type(d.emitted, NodeMaintenanceExitRequested, "n1")  # stays in maintenance
    assert d.one(NodeMaintenanceRequested, "n2")


def test_upgrade_failure_rolled_back_and_healthy_returns_the_node_to_service() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    upgrade = drive_to_upgrading(d)
    d.feed(
        reply(
            upgrade,
            NodeUpgradeFailed,
            node_id="n1",
            reason="service did not start",
            phase="verify",
            installed_version=OLD,
            attempts=3,
            rolled_back=True,
            healthy=True,
        )
    )
    assert d.step("n1") is NodeStep.RELEASING
    commands = exited(d, "n1")
    record = d.node("n1")
    assert record.step is NodeStep.FAILED
    assert "after 3 attempt(s): service did not start" in record.detail
    assert f"rolled back to {OLD}, healthy" in record.detail
    assert of_type(commands, NodeAvailable)
    assert d.state is not None and d.state.campaign.failed == 1


def test_an_upgrade_refused_before_any_change_returns_the_node_to_service() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    upgrade = drive_to_upgrading(d)
    d.feed(
        reply(
            upgrade,
            NodeUpgradeFailed,
            node_id="n1",
            reason="manifest refused: nova-1.9.0.rpm is not of version 29.1.0",
            phase="validate",
            installed_version=OLD,
            untouched=True,
        )
    )
    assert d.step("n1") is NodeStep.RELEASING
    exited(d, "n1")
    record = d.node("n1")
    assert record.step is NodeStep.FAILED
    assert "manifest refused" in record.detail and "nothing was changed" in record.detail
    assert "quarantined" not in record.detail
    assert d.state is not None and d.state.campaign.failed == 1


def test_upgrade_failure_rolled_back_but_unhealthy_stays_quarantined() -> None:
    d = Driver(["n1"])
    d.start()
    upgrade = drive_to_upgrading(d)
    d.feed(
        reply(
            upgrade,
            NodeUpgradeFailed,
            node_id="n1",
            reason="kernel panic",
            attempts=2,
            rolled_back=True,
            healthy=False,
        )
    )
    assert d.step("n1") is NodeStep.FAILED
    assert "rolled back but not healthy" in d.node("n1").detail
    assert "quarantined" in d.node("n1").detail
    assert not of_type(d.emitted, NodeMaintenanceExitRequested, "n1")


def test_stale_upgrade_failure_is_ignored_and_any_attempt_success_counts() -> None:
    d = Driver(["n1"])
    d.start(upgrade_timeout_s=300, max_step_attempts=3)
    first = drive_to_upgrading(d)
    second = d.one(NodeUpgradeRequested, "n1", events=d.tick(300))
    assert second.attempt == 2 and second.event_id == cid("n1", NodeStep.UPGRADING, 2)
    assert d.feed(reply(first, NodeUpgradeFailed, node_id="n1", reason="old")) == []
    assert d.step("n1") is NodeStep.UPGRADING
    d.feed(reply(first, NodeUpgraded, node_id="n1", version=TARGET))
    assert d.step("n1") is NodeStep.RELEASING


def test_progress_never_goes_backwards_and_other_versions_are_not_success() -> None:
    d = Driver(["n1"])
    d.start()
    upgrade = drive_to_upgrading(d)
    d.feed(reply(upgrade, NodeUpgradeProgressed, node_id="n1", phase="rebooting", percent=80))
    state = d.state
    d.feed(reply(upgrade, NodeUpgradeAccepted, node_id="n1", target_version=TARGET))
    d.feed(reply(upgrade, NodeUpgradeProgressed, node_id="n1", phase="fetching", percent=10))
    assert d.state is state
    d.feed(reply(upgrade, NodeUpgraded, node_id="n1", version="28.0.0"))
    assert d.step("n1") is NodeStep.UPGRADING


def test_upgrade_deadline_exhausted_fails_the_node_in_maintenance() -> None:
    d = Driver(["n1"])
    d.start(upgrade_timeout_s=300, max_step_attempts=1)
    drive_to_upgrading(d)
    d.tick(300)
    assert d.step("n1") is NodeStep.FAILED
    assert "no upgrade result after 1 attempt(s)" in d.node("n1").detail
    assert not of_type(d.emitted, NodeMaintenanceExitRequested)
    assert d.status is CampaignStatus.COMPLETED


# --- release -------------------------------------------------------------------------------


def test_release_deadline_resends_then_fails_visibly() -> None:
    d = Driver(["n1"])
    d.start(step_timeout_s=60, max_step_attempts=2)
    drive_to_releasing(d)
    resent = d.one(NodeMaintenanceExitRequested, "n1", events=d.tick(60))
    assert resent.attempt == 2 and resent.event_id == cid("n1", NodeStep.RELEASING, 2)
    d.tick(60)
    assert d.step("n1") is NodeStep.FAILED
    assert "may still be in maintenance" in d.node("n1").detail


# --- selection -----------------------------------------------------------------------------


def test_a_node_without_live_heartbeat_is_never_claimed_and_a_later_node_goes_first() -> None:
    d = Driver(["n1", "n2"], dead=["n1"])
    d.start(max_parallel=1)
    assert d.step("n1") is NodeStep.PENDING
    assert d.node("n1").detail == "no live heartbeat from node agent"
    assert [e.step for e in of_type(d.emitted, NodeCycleAdvanced, "n1")] == [NodeStep.PENDING]
    assert d.one(NodeMaintenanceRequested, "n2")
    drive_to_releasing(d, "n2")
    exited(d, "n2")
    assert not of_type(d.last.commands, NodeMaintenanceRequested)
    assert not of_type(d.tick(5), NodeCycleAdvanced)  # reported once, not on every Tick
    d.dead.clear()
    assert d.one(NodeMaintenanceRequested, "n1", events=d.tick(5))


def test_a_node_already_at_the_target_is_done_without_maintenance() -> None:
    d = Driver(["n1", "n2"], versions={"n1": TARGET})
    d.start(max_parallel=1)
    assert d.step("n1") is NodeStep.DONE and d.node("n1").detail == f"already at {TARGET}"
    assert not of_type(d.emitted, NodeMaintenanceRequested, "n1")
    assert d.one(NodeMaintenanceRequested, "n2")  # it took no slot


# --- idempotence, identity, restart, size -------------------------------------------------


def test_recover_reemits_every_in_flight_command_identically() -> None:
    d = Driver(["n1", "n2", "n3", "n4"])
    d.start(max_parallel=4, step_timeout_s=600)
    d.tick(600)  # every claim re-sent: attempt 2
    d.enter("n1", [vm("vm-a", "vnf-1")])  # notifying
    d.enter("n2", [vm("vm-b"), vm("vm-c")])  # migrating
    drive_to_upgrading(d, "n3")
    assert d.state is not None
    recovered = recover(d.state, d.ctx())
    expected = [
        d.latest(BusinessMoveRequested, "n1"),
        *of_type(d.emitted, VmMigrationRequested, "n2"),
        d.latest(NodeUpgradeRequested, "n3"),
        d.latest(NodeMaintenanceRequested, "n4"),
    ]
    assert sorted(recovered, key=lambda e: str(e.event_id)) == sorted(
        expected, key=lambda e: str(e.event_id)
    )
    assert d.latest(NodeMaintenanceRequested, "n4").attempt == 2


def test_replaying_inputs_yields_the_same_commands_and_ids() -> None:
    one, two = Driver(["n1"]), Driver(["n1"])
    request = one.request(["n1"])
    assert one.feed(request) == two.feed(request)
    entered = reply(
        one.latest(NodeMaintenanceRequested, "n1"),
        NodeCycleAdvanced,
        node_id="n1",
        step=NodeStep.CLAIMING,
    )
    assert one.feed(entered) == [] == two.feed(entered)  # our own progress events: ignored


def test_records_not_changed_keep_their_identity() -> None:
    d = Driver(["n1", "n2", "n3"])
    d.start(max_parallel=2)
    before = d.state
    assert before is not None
    d.enter("n1", [vm("vm-1")])
    after = d.state
    assert after is not None
    assert d.last.changed_nodes == {"n1"} and not d.last.campaign_changed
    assert after.nodes["n2"] is before.nodes["n2"] and after.nodes["n3"] is before.nodes["n3"]
    assert after.campaign is before.campaign and after.plan is before.plan
    assert not d.last.plan_changed
    assert d.tick(1) == [] and d.state is after


def test_events_that_do_not_fit_are_ignored() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    state = d.state
    claim = d.latest(NodeMaintenanceRequested, "n1")
    ignored = [
        reply(claim, NodeUpgraded, node_id="n1", version=TARGET),  # not upgrading
        reply(claim, NodeMaintenanceExited, node_id="n1", restored_status="enabled"),
        reply(claim, BusinessMoved, node_id="n1", outcomes=()),
        reply(claim, VmMigrated, vm_id="vm-1", node_id="n1", destination_node_id="x"),
        reply(claim, NodeMaintenanceRefused, node_id="n2", reason="x"),  # n2 is pending
        reply(claim, NodeUpgraded, node_id="ghost", version=TARGET),  # unknown node
        reply(claim, NodeUpgraded, node_id="n1", version=TARGET).model_copy(
            update={"campaign_id": "cmp-other"}
        ),
    ]
    for event in ignored:
        assert d.feed(event) == [] and d.state is state
    assert decide(None, Tick(), d.ctx()).state is None
    assert decide(None, ignored[0], d.ctx()).commands == ()


def test_a_10000_node_campaign_keeps_every_record_far_under_1_mb() -> None:
    nodes = [f"compute-r{i // 100:03d}-n{i % 100:03d}" for i in range(10_000)]
    d = Driver(nodes)
    d.start(max_parallel=50)
    assert d.state is not None
    plan = d.state.plan
    d.enter(nodes[0], [vm(f"vm-{j:04d}", f"vnf-{j % 20}") for j in range(200)])
    plan_size = len(d.state.plan.model_dump_json())
    status_size = len(d.state.campaign.model_dump_json())
    largest_node = max(len(r.model_dump_json()) for r in d.state.nodes.values())
    assert plan_size < 300_000, plan_size  # node order: ~25 bytes a node, written once
    assert status_size < 2_000, status_size  # 50 active node ids and counters
    assert largest_node < 50_000, largest_node  # a node with 200 VMs
    assert d.last.changed_nodes == {nodes[0]} and not d.last.plan_changed
    assert d.state.plan is plan
    # Finishing a node rewrites the small status record, never the plan.
    d.tick(10_000)
    assert d.state.plan is plan


# --- VNFM refusals: deferral ---------------------------------------------------------------


def refusal(vnfm: str = "vnfm-a", why: str = "surge", vnfs: tuple[str, ...] = ("vnf-1",)) -> Any:
    from schemas.types import VnfmRefusal

    return VnfmRefusal(vnfm_id=vnfm, vnf_ids=vnfs, reason=why)


def refuse(d: Driver, node: str = "n1", why: str = "surge") -> list[Event]:
    ask = d.latest(BusinessMoveRequested, node)
    return d.feed(
        reply(
            ask,
            BusinessMoved,
            node_id=node,
            outcomes=(outcome("vm-a", "vnf-1", LEFT), outcome("vm-b", "vnf-2", MOVED)),
            refusals=(refusal(why=why),),
        )
    )


def test_refusal_releases_the_node_untouched_and_defers_it_without_blocking_others() -> None:
    d = notifying(
        VnfmTimeoutPolicy.MIGRATE, ("n1", "n2"), max_deferrals=3, deferral_s=252, max_parallel=1
    )
    commands = refuse(d)
    assert d.one(NodeMaintenanceExitRequested, "n1", events=commands).holder == CAMPAIGN
    assert not of_type(commands, VmMigrationRequested)
    assert d.step("n1") is NodeStep.RELEASING
    assert d.node("n1").detail == (
        "leaving maintenance: deferred by vnfm-a: surge (1/3), retry after 04:04:12Z"
    )
    commands = exited(d, "n1")
    available = d.one(NodeAvailable, "n1", events=commands)
    assert available.vnf_ids == ("vnf-1", "vnf-2")
    record = d.node("n1")
    assert record.step is NodeStep.PENDING and record.deferrals == 1
    assert record.detail == "deferred by vnfm-a: surge (1/3), retry after 04:04:12Z"
    assert record.vms is None and record.sent is None and record.outcome is None
    progress = of_type(commands, NodeCycleAdvanced, "n1")[-1]
    assert progress.step is NodeStep.PENDING and progress.detail == record.detail
    # the slot went to n2 at once; n1 waits for its time
    assert d.one(NodeMaintenanceRequested, "n2", events=commands)
    assert not of_type(d.emitted, NodeUpgradeRequested)


def test_a_deferred_node_is_retried_after_deferral_s_with_new_command_ids() -> None:
    d = notifying(VnfmTimeoutPolicy.MIGRATE, max_deferrals=3, deferral_s=60)
    first_ask = d.latest(BusinessMoveRequested, "n1")
    refuse(d)
    exited(d, "n1")
    assert d.tick(59) == []
    claim = d.one(NodeMaintenanceRequested, "n1", events=d.tick(1))
    assert claim.event_id == cid("n1", NodeStep.CLAIMING, 1, "round-1")
    assert claim.event_id != cid("n1", NodeStep.CLAIMING, 1)
    d.enter("n1", [vm("vm-a", "vnf-1"), vm("vm-b", "vnf-2")])
    ask = d.latest(BusinessMoveRequested, "n1")
    assert ask.event_id == cid("n1", NodeStep.NOTIFYING, 1, "round-1")
    assert ask.attempt == 2 > first_ask.attempt  # the adapter sees a newer attempt
    # a redelivered answer of the deferred round decides nothing
    stale = reply(first_ask, BusinessMoved, node_id="n1", outcomes=(), refusals=(refusal(),))
    assert d.feed(stale) == [] and d.step("n1") is NodeStep.NOTIFYING
    # The adapter's answers name the request they answer in `request_id`, their causation
    # being the VNFM reply that completed them: a stale round's is still recognised...
    stale_reply_caused = BusinessMoved(
        **{**first_ask.caused(producer="test"), "causation_id": uuid.uuid4()},
        request_id=first_ask.event_id,
        node_id="n1",
        outcomes=(),
        refusals=(refusal(),),
    )
    assert d.feed(stale_reply_caused) == [] and d.step("n1") is NodeStep.NOTIFYING
    # ... and the current round's decides, whatever its causation.
    d.feed(
        BusinessMoved(
            **{**ask.caused(producer="test"), "causation_id": uuid.uuid4()},
            request_id=ask.event_id,
            node_id="n1",
            outcomes=(outcome("vm-a", "vnf-1", MOVED),),
        )
    )
    [migrate] = of_type(d.last.commands, VmMigrationRequested)
    assert migrate.vm_id == "vm-b"
    assert migrate.event_id == cid("n1", NodeStep.MIGRATING, 1, "vm-b", "round-1")
    d.feed(reply(migrate, VmMigrated, vm_id="vm-b", node_id="n1", destination_node_id="n9"))
    upgrade = d.one(NodeUpgradeRequested, "n1")
    assert upgrade.event_id == cid("n1", NodeStep.UPGRADING, 1, "round-1")
    d.feed(reply(upgrade, NodeUpgraded, node_id="n1", version=TARGET))
    commands = exited(d, "n1")
    assert d.step("n1") is NodeStep.DONE
    assert d.one(CampaignCompleted, events=commands).upgraded == 1
    available = of_type(d.emitted, NodeAvailable, "n1")
    assert len({a.event_id for a in available}) == 2  # one per round


@pytest.mark.parametrize(
    ("policy", "step"),
    [
        (VnfmTimeoutPolicy.SKIP_NODE, NodeStep.SKIPPED),
        (VnfmTimeoutPolicy.MIGRATE, NodeStep.MIGRATING),
        (VnfmTimeoutPolicy.ABORT, NodeStep.RELEASING),
    ],
)
def test_after_max_deferrals_a_refusal_follows_the_timeout_policy(
    policy: VnfmTimeoutPolicy, step: NodeStep
) -> None:
    d = notifying(policy, max_deferrals=2, deferral_s=10)
    for n in (1, 2):
        refuse(d, why=f"busy {n}")
        assert f"({n}/2)" in d.node("n1").detail
        exited(d, "n1")
        d.tick(10)
        d.enter("n1", [vm("vm-a", "vnf-1"), vm("vm-b", "vnf-2")])
    refuse(d, why="still busy")
    detail = d.node("n1").detail
    assert "vnfm-a: still busy, still refused after 2 deferral(s) (max_deferrals 2)" in detail
    if policy is VnfmTimeoutPolicy.MIGRATE:
        assert d.step("n1") is NodeStep.MIGRATING and "policy migrate" in detail
        assert [m.vm_id for m in of_type(d.last.commands, VmMigrationRequested)] == ["vm-a"]
        return
    exited(d, "n1")
    if policy is VnfmTimeoutPolicy.SKIP_NODE:
        assert d.step("n1") is NodeStep.SKIPPED and "policy skip-node" in d.node("n1").detail
        assert d.one(CampaignCompleted).skipped == 1
    else:
        assert d.step("n1") is NodeStep.SKIPPED and d.status is CampaignStatus.FAILED
        assert "policy abort" in d.one(CampaignFailed).reason
    assert not of_type(d.emitted, NodeUpgradeRequested)


def test_max_deferrals_zero_applies_the_policy_at_the_first_refusal() -> None:
    d = notifying(VnfmTimeoutPolicy.SKIP_NODE, max_deferrals=0)
    refuse(d)
    exited(d, "n1")
    assert d.step("n1") is NodeStep.SKIPPED and d.node("n1").deferrals == 0


def test_abort_while_a_deferred_node_leaves_maintenance_fails_the_campaign() -> None:
    d = Driver(["n1", "n2", "n3"])
    d.start(on_vnfm_timeout=VnfmTimeoutPolicy.ABORT, max_parallel=2, max_deferrals=3)
    d.enter("n1", [vm("vm-a", "vnf-1")])
    d.enter("n2", [vm("vm-2", "vnf-2")])
    refuse(d, "n1")  # n1 is RELEASING, deferred
    ask2 = d.latest(BusinessMoveRequested, "n2")
    d.feed(reply(ask2, BusinessMoved, node_id="n2", timed_out=True, outcomes=()))
    assert d.status is CampaignStatus.ABORTING
    exited(d, "n2")
    commands = exited(d, "n1")
    assert d.step("n1") is NodeStep.PENDING
    assert d.one(CampaignFailed, events=commands)
    assert d.tick(3600) == []


# --- VNFM deadline extensions ---------------------------------------------------------------


def extended(d: Driver, node: str, seconds: float, why: str = "vnfm-a: resync") -> list[Event]:
    from schemas.events import BusinessMoveDeadlineExtended

    ask = d.latest(BusinessMoveRequested, node)
    return d.feed(
        reply(
            ask,
            BusinessMoveDeadlineExtended,
            node_id=node,
            deadline=T0 + timedelta(seconds=seconds),
            reason=why,
        )
    )


def test_request_carries_the_extension_caps_of_the_policy() -> None:
    d = notifying(VnfmTimeoutPolicy.MIGRATE, vnfm_extension_max_s=25, vnfm_hard_timeout_s=600)
    ask = d.latest(BusinessMoveRequested, "n1")
    assert ask.extension_max_s == 25
    assert ask.hard_deadline == T0 + timedelta(seconds=600)
    assert ask.deadline == T0 + timedelta(seconds=40)


def test_deadline_extension_moves_the_backstop_later_never_earlier() -> None:
    d = notifying(VnfmTimeoutPolicy.MIGRATE)
    grace = BACKSTOP_GRACE.total_seconds()
    commands = extended(d, "n1", 100)
    [progress] = of_type(commands, NodeCycleAdvanced, "n1")
    assert progress.step is NodeStep.NOTIFYING and "(extended: vnfm-a: resync)" in progress.detail
    assert "until 04:01:40Z" in progress.detail
    assert d.node("n1").sent is not None
    assert d.node("n1").sent.deadline == T0 + timedelta(seconds=100 + grace)  # type: ignore[union-attr]
    assert extended(d, "n1", 50) == []  # earlier: ignored
    assert d.tick(100 + grace - 1) == []  # the original backstop (40 + grace) passed quietly
    assert of_type(d.tick(1), VmMigrationRequested)
    # re-publishing the request after a restart gives the very same command
    assert d.latest(BusinessMoveRequested, "n1").deadline == T0 + timedelta(seconds=40)


def test_deadline_extension_of_another_round_or_step_is_ignored() -> None:
    d = notifying(VnfmTimeoutPolicy.MIGRATE)
    from schemas.events import BusinessMoveDeadlineExtended

    foreign = BusinessMoveDeadlineExtended(
        campaign_id=CAMPAIGN,
        causation_id=uuid.uuid4(),
        node_id="n1",
        deadline=T0 + timedelta(seconds=500),
        reason="x",
        producer="vnfm-adapter",
    )
    assert d.feed(foreign) == []
    ask = d.latest(BusinessMoveRequested, "n1")
    d.feed(reply(ask, BusinessMoved, node_id="n1", outcomes=()))
    assert d.step("n1") is NodeStep.MIGRATING
    assert extended(d, "n1", 500) == []  # too late to matter
