"""Operator controls in the campaign core: pause, resume, abort (finish or rollback), retry."""

from __future__ import annotations

import pytest
from core_harness import CAMPAIGN, OLD, TARGET, Driver, of_type, reply, vm

from schemas.events import (
    CampaignAbortRequested,
    CampaignCompleted,
    CampaignFailed,
    CampaignPaused,
    CampaignPauseRequested,
    CampaignResumed,
    CampaignResumeRequested,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    NodeRetryRequested,
    NodeRollbackCompleted,
    NodeRollbackRequested,
    NodeStep,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeRequested,
    OnAbortUpgrading,
    OperatorRequestRejected,
    VmMigrated,
    VmMigrationRequested,
)
from services.upgrade_manager.domain import CampaignStatus

pytestmark = pytest.mark.unit


def pause(**kw: object) -> CampaignPauseRequested:
    return CampaignPauseRequested(campaign_id=CAMPAIGN, producer="operator-cli", **kw)  # type: ignore[arg-type]


def resume() -> CampaignResumeRequested:
    return CampaignResumeRequested(campaign_id=CAMPAIGN, producer="operator-cli")


def abort(upgrading: OnAbortUpgrading = OnAbortUpgrading.FINISH) -> CampaignAbortRequested:
    return CampaignAbortRequested(
        campaign_id=CAMPAIGN, producer="operator-cli", upgrading=upgrading, reason="bad build"
    )


def retry(node_id: str) -> NodeRetryRequested:
    return NodeRetryRequested(campaign_id=CAMPAIGN, producer="operator-cli", node_id=node_id)


def claims(d: Driver, node_id: str | None = None) -> int:
    return len(of_type(d.emitted, NodeMaintenanceRequested, node_id))


def to_upgrading(d: Driver, node_id: str) -> NodeUpgradeRequested:
    d.enter(node_id, [vm(f"vm-{node_id}")])
    d.feed(
        reply(
            d.latest(VmMigrationRequested, node_id),
            VmMigrated,
            vm_id=f"vm-{node_id}",
            node_id=node_id,
            destination_node_id="elsewhere",
        )
    )
    return d.latest(NodeUpgradeRequested, node_id)


def exit_maintenance(d: Driver, node_id: str) -> None:
    release = d.latest(NodeMaintenanceExitRequested, node_id)
    d.feed(reply(release, NodeMaintenanceExited, node_id=node_id, restored_status="enabled"))


def finish_node(d: Driver, node_id: str) -> None:
    upgrade = to_upgrading(d, node_id)
    d.feed(reply(upgrade, NodeUpgraded, node_id=node_id, version=TARGET))
    exit_maintenance(d, node_id)


def test_pause_lets_the_running_node_finish_and_starts_nothing_until_resumed() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    request = pause(reason="peak hour")
    assert d.one(CampaignPaused, events=d.feed(request)).reason == "peak hour"
    assert d.status is CampaignStatus.PAUSED
    assert d.feed(request) == []  # a redelivery changes nothing
    assert d.feed(pause()) == []  # pausing a paused campaign neither
    finish_node(d, "n1")
    assert d.step("n1") is NodeStep.DONE
    d.tick(60)
    assert claims(d, "n2") == 0
    d.one(CampaignResumed, events=d.feed(resume()))
    assert claims(d, "n2") == 1
    finish_node(d, "n2")
    d.one(CampaignCompleted)


def test_resuming_a_running_campaign_is_a_no_op_and_pausing_an_ended_one_is_rejected() -> None:
    d = Driver(["n1"])
    d.start()
    assert d.feed(resume()) == []
    finish_node(d, "n1")
    assert d.status is CampaignStatus.COMPLETED
    rejected = d.one(OperatorRequestRejected, events=d.feed(pause()))
    assert rejected.request_type == "CampaignPauseRequested"
    assert "ended (completed)" in rejected.reason


def test_abort_returns_unstarted_nodes_and_lets_upgrading_ones_finish() -> None:
    d = Driver(["n1", "n2", "n3"])
    d.start(max_parallel=2)
    upgrade = to_upgrading(d, "n1")
    d.enter("n2", [vm("vm-n2")])  # n2 is migrating: in maintenance, not upgrading
    d.feed(abort())
    assert d.status is CampaignStatus.ABORTING
    assert d.step("n2") is NodeStep.RELEASING
    assert d.step("n1") is NodeStep.UPGRADING
    assert not of_type(d.emitted, NodeRollbackRequested)
    exit_maintenance(d, "n2")
    assert d.step("n2") is NodeStep.SKIPPED
    d.feed(reply(upgrade, NodeUpgraded, node_id="n1", version=TARGET))
    exit_maintenance(d, "n1")
    assert d.step("n1") is NodeStep.DONE
    failed = d.one(CampaignFailed)
    assert "aborted by the operator" in failed.reason and "bad build" in failed.reason
    assert claims(d, "n3") == 0


def test_abort_with_rollback_rolls_upgrading_nodes_back_before_release() -> None:
    d = Driver(["n1"])
    d.start()
    upgrade = to_upgrading(d, "n1")
    d.feed(abort(OnAbortUpgrading.ROLLBACK))
    rollback = d.one(NodeRollbackRequested, "n1")
    assert rollback.target_version == TARGET
    # The upgrade's own success arriving now changes nothing: the rollback undoes it.
    assert d.feed(reply(upgrade, NodeUpgraded, node_id="n1", version=TARGET)) == []
    assert d.node("n1").rolling_back
    d.feed(
        reply(rollback, NodeRollbackCompleted, node_id="n1", installed_version=OLD, healthy=True)
    )
    assert d.step("n1") is NodeStep.RELEASING
    exit_maintenance(d, "n1")
    assert d.step("n1") is NodeStep.SKIPPED
    assert f"rolled back to {OLD}, healthy" in d.node("n1").detail
    d.one(CampaignFailed)


def test_an_unhealthy_rollback_quarantines_the_node() -> None:
    d = Driver(["n1"])
    d.start()
    to_upgrading(d, "n1")
    d.feed(abort(OnAbortUpgrading.ROLLBACK))
    rollback = d.one(NodeRollbackRequested, "n1")
    d.feed(
        reply(
            rollback,
            NodeRollbackCompleted,
            node_id="n1",
            installed_version=OLD,
            healthy=False,
            reason="nova-compute down",
        )
    )
    assert d.step("n1") is NodeStep.FAILED
    assert "quarantined" in d.node("n1").detail
    assert not of_type(d.emitted, NodeMaintenanceExitRequested, "n1")


def test_retry_re_admits_a_quarantined_node_in_a_new_round_and_reopens_the_campaign() -> None:
    d = Driver(["n1"])
    d.start()
    upgrade = to_upgrading(d, "n1")
    d.feed(reply(upgrade, NodeUpgradeFailed, node_id="n1", reason="disk"))
    assert d.step("n1") is NodeStep.FAILED
    first_end = d.one(CampaignCompleted)
    assert first_end.failed == 1
    d.feed(retry("n1"))
    assert d.status is CampaignStatus.RUNNING
    assert claims(d, "n1") == 2
    second_claim = of_type(d.emitted, NodeMaintenanceRequested, "n1")[-1]
    assert second_claim.event_id != of_type(d.emitted, NodeMaintenanceRequested, "n1")[0].event_id
    finish_node(d, "n1")
    second_end = d.one(CampaignCompleted)
    assert second_end.event_id != first_end.event_id
    assert (second_end.upgraded, second_end.failed) == (1, 0)


def test_retry_of_a_deferred_node_drops_its_wait_and_of_a_done_node_is_rejected() -> None:
    d = Driver(["n1", "n2"])
    d.start(max_step_attempts=1, deferral_s=3600)
    d.enter("n1", [vm("vm-1")])
    from schemas.events import VmMigrationFailed

    request = d.latest(VmMigrationRequested, "n1")
    d.feed(reply(request, VmMigrationFailed, vm_id="vm-1", node_id="n1", reason="no room"))
    exit_maintenance(d, "n1")
    assert d.step("n1") is NodeStep.PENDING and d.node("n1").retry_at is not None
    finish_node(d, "n2")
    assert claims(d, "n1") == 1  # deferred for an hour
    d.feed(retry("n1"))
    assert claims(d, "n1") == 2
    finish_node(d, "n1")
    rejected = d.one(OperatorRequestRejected, events=d.feed(retry("n2")))
    assert "ended" in rejected.reason or "only a failed" in rejected.reason


def test_retry_after_an_operator_abort_is_rejected() -> None:
    d = Driver(["n1", "n2"])
    d.start()
    d.feed(abort())
    rejected = d.one(OperatorRequestRejected, events=d.feed(retry("n2")))
    assert "aborted" in rejected.reason


def test_a_second_campaign_on_a_claimed_node_is_rejected_with_the_holder() -> None:
    from schemas.events import CampaignRejected, CampaignStarted

    d = Driver(["n1", "n2", "n3"])
    d.claims = {"n2": "cmp-other", "n3": "cmp-other"}
    rejected = d.one(CampaignRejected, events=d.start(["n1", "n2", "n3"]))
    assert "n2, n3 by running campaign cmp-other" in rejected.reason
    assert not of_type(d.emitted, NodeMaintenanceRequested)
    fresh = Driver(["n1"])
    fresh.claims = {"n1": CAMPAIGN}  # its own claim, e.g. re-read after a restart
    fresh.one(CampaignStarted, events=fresh.start(["n1"]))
