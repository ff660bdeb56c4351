"""The cycle of one node: claim, notify, migrate, upgrade, release.

Each handler acts only when the input fits the node's current step; anything else (a duplicate, a
late reply to an attempt that was already re-sent, an event for a finished node) is ignored, which
is what makes redelivery harmless.

A VNFM may refuse to move its business now (`BusinessMoved.refusals`): the node is released
untouched (nothing migrated, nothing upgraded) and *deferred*: back to PENDING, not started again
before `policy.deferral_s` has passed, while other nodes go on. Every retried cycle is a new
round (`NodeRecord.deferrals`) whose command ids differ from the deferred round's, so receivers
treat them as new commands. After `policy.max_deferrals` deferrals of a node, a further refusal
is handled like a VNFM timeout: `policy.on_vnfm_timeout` (migrate, skip-node, abort) applies.

The VNFM adapter may move the VNFM deadline later (`BusinessMoveDeadlineExtended`: a VNFM
heartbeat, or a notice held until its VNF recovered); the node's backstop follows it (the new
deadline plus `BACKSTOP_GRACE`) and never moves earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from schemas.envelope import command_id
from schemas.events import (
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    NodeAvailable,
    NodeMaintenanceEntered,
    NodeMaintenanceRefused,
    NodeRollbackCompleted,
    NodeStep,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    VmMigrationFailed,
)
from schemas.types import VmBusinessOutcome, VmOnNode, VnfmRefusal, VnfmTimeoutPolicy

from .commands import (
    AVAILABLE,
    ROLLBACK,
    clock,
    envelope,
    in_flight_commands,
    listing,
    migrate_command,
    migration_command_id,
    round_part,
    step_command_id,
    vms_to_notify,
)
from .planner import VmLoad, migration_destinations
from .state import CampaignStatus, NodeRecord, PendingMigration, Release, Sent
from .txn import Txn

# How long after the VNFM deadline the manager waits for the adapter's BusinessMoved before it
# acts as if every VNFM had timed out. The adapter owns the real deadline and answers at it; this
# backstop only covers an adapter that is down or lost the request. 30 s covers a consumer
# restart or a group rebalance; waiting longer only delays a node whose fallback (migrating every
# VM) is always safe.
BACKSTOP_GRACE = timedelta(seconds=30)

NO_HEARTBEAT = "no live heartbeat from node agent"

# The detail of a re-sent step, given the new attempt.
_Describe = Callable[[Sent], str]


# --- PENDING -------------------------------------------------------------------------------


def start_claim(txn: Txn, node: NodeRecord) -> None:
    sent = txn.sent(txn.policy.step_timeout_s)
    node = txn.enter(node, NodeStep.CLAIMING, _claim_detail(sent), sent=sent)
    txn.emit(*in_flight_commands(txn.plan, node))
    txn.update_campaign(
        active=(*txn.campaign.active, node.node_id), started=txn.campaign.started + 1
    )


def mark_blocked(txn: Txn, node: NodeRecord, detail: str) -> None:
    """A PENDING node that cannot start; reported once per reason, not on every Tick."""
    if node.detail != detail:
        txn.progress(txn.save(node.model_copy(update={"detail": detail})))


def mark_already_at_target(txn: Txn, node: NodeRecord) -> None:
    finish(txn, node, NodeStep.DONE, f"already at {txn.plan.target_version}")


# --- CLAIMING ------------------------------------------------------------------------------


def on_maintenance_entered(txn: Txn, node: NodeRecord, event: NodeMaintenanceEntered) -> None:
    if node.step is not NodeStep.CLAIMING:
        return
    # A migration that was under way toward the node lands on it: it is one of its VMs.
    vms = tuple({vm.vm_id: vm for vm in event.vms}.values())
    begin_notify(txn, node.model_copy(update={"vms": vms, "sent": None}))


def on_maintenance_refused(txn: Txn, node: NodeRecord, event: NodeMaintenanceRefused) -> None:
    if node.step is not NodeStep.CLAIMING:
        return
    if event.current_holder == txn.campaign.campaign_id:
        # Our own claim answered a re-sent one: the node is ours; its Entered is the answer.
        return
    held = f" (held by {event.current_holder})" if event.current_holder else ""
    finish(txn, node, NodeStep.SKIPPED, f"maintenance refused: {event.reason}{held}")


# --- NOTIFYING -----------------------------------------------------------------------------


def begin_notify(txn: Txn, node: NodeRecord) -> None:
    refs = vms_to_notify(node)
    if not refs:
        node = txn.enter(
            node, NodeStep.NOTIFYING, "nothing to notify: no VM on the node belongs to a VNF"
        )
        begin_migrations(txn, node, _vm_ids(node.vms or ()))
        return
    now = txn.ctx.now
    vnfm_deadline = now + timedelta(seconds=txn.policy.vnfm_timeout_s)
    sent = Sent(at=now, cause=txn.cause_id, deadline=vnfm_deadline + BACKSTOP_GRACE)
    detail = (
        f"waiting for the VNFMs of {listing(node.vnf_ids)} to move the business of "
        f"{len(refs)} VM(s) until {clock(vnfm_deadline)}"
    )
    node = txn.enter(node, NodeStep.NOTIFYING, detail, sent=sent, vnfm_deadline=vnfm_deadline)
    txn.emit(*in_flight_commands(txn.plan, node))


def _answers_current_request(txn: Txn, node: NodeRecord, event: BusinessMoved) -> bool:
    """An answer to this round's request (or one that names none): a redelivered answer of a
    deferred round must not decide the retried one. Producers older than `request_id` named
    the request in `causation_id`."""
    answered = event.request_id if event.request_id is not None else event.causation_id
    if answered is None or node.sent is None:
        return True
    current = step_command_id(
        txn.plan, node.node_id, NodeStep.NOTIFYING, node.sent.attempt, node.deferrals
    )
    return answered == current


def on_business_moved(txn: Txn, node: NodeRecord, event: BusinessMoved) -> None:
    if node.step is not NodeStep.NOTIFYING or not _answers_current_request(txn, node, event):
        return
    business_moved(txn, node, event.outcomes, timed_out=event.timed_out, refusals=event.refusals)


def on_deadline_extended(txn: Txn, node: NodeRecord, event: BusinessMoveDeadlineExtended) -> None:
    """The adapter waits longer (a VNFM heartbeat, or a notice held for recovery): so does the
    backstop. It never moves earlier: the adapter may still be waiting until the later one."""
    if node.step is not NodeStep.NOTIFYING or node.sent is None:
        return
    if event.causation_id is not None and event.causation_id != step_command_id(
        txn.plan, node.node_id, NodeStep.NOTIFYING, node.sent.attempt, node.deferrals
    ):
        return
    backstop = event.deadline + BACKSTOP_GRACE
    if backstop <= node.sent.deadline:
        return
    detail = (
        f"waiting for the VNFMs of {listing(node.vnf_ids)} until {clock(event.deadline)} "
        f"(extended: {event.reason})"
    )
    node = txn.save(
        node.model_copy(
            update={"sent": node.sent.model_copy(update={"deadline": backstop}), "detail": detail}
        )
    )
    txn.progress(node)


def on_backstop(txn: Txn, node: NodeRecord) -> None:
    # Acts as if every VM were left_for_vim: migrating them is always safe.
    business_moved(txn, node, (), timed_out=True)


def business_moved(
    txn: Txn,
    node: NodeRecord,
    outcomes: Iterable[VmBusinessOutcome],
    *,
    timed_out: bool,
    refusals: Iterable[VnfmRefusal] = (),
) -> None:
    if node.step is not NodeStep.NOTIFYING:
        return
    policy = txn.policy
    refused = tuple(refusals)
    if refused and node.deferrals < policy.max_deferrals:
        defer(txn, node, f"by {_refusal_text(refused)}")
        return
    if refused:
        why = (
            f"{_refusal_text(refused)}, still refused after {node.deferrals} deferral(s) "
            f"(max_deferrals {policy.max_deferrals})"
        )
        note = f" ({why}; policy migrate)"
    elif timed_out:
        why = "a VNFM did not answer before the deadline"
        note = " (VNFM timed out)"
    else:
        why = note = ""
    if why and policy.on_vnfm_timeout is VnfmTimeoutPolicy.SKIP_NODE:
        release(txn, node, NodeStep.SKIPPED, f"{why}; node skipped (policy skip-node)")
        return
    if why and policy.on_vnfm_timeout is VnfmTimeoutPolicy.ABORT:
        reason = f"{why} for {node.node_id} (policy abort)"
        release(txn, node, NodeStep.SKIPPED, f"campaign aborted: {reason}")
        abort_campaign(txn, reason)
        return
    asked = {ref.vm_id for ref in vms_to_notify(node)}
    moved = {o.vm_id for o in outcomes if o.vm_id in asked and o.outcome.business_moved}
    # Left for the VIM: outcome left_for_vim, no answer for the VM, or no VNF to ask at all.
    # VMs whose business moved stay on the node through its upgrade, unless policy says otherwise.
    to_migrate = [
        vm.vm_id for vm in node.vms or () if policy.migrate_moved_vms or vm.vm_id not in moved
    ]
    begin_migrations(txn, node, to_migrate, note)


# --- deferral ------------------------------------------------------------------------------


def _refusal_text(refusals: tuple[VnfmRefusal, ...]) -> str:
    return "; ".join(f"{r.vnfm_id}: {r.reason}" for r in refusals)


def defer(txn: Txn, node: NodeRecord, why: str) -> NodeRecord:
    """Release the node untouched; it goes back to PENDING once out of maintenance."""
    retry_at = txn.ctx.now + timedelta(seconds=txn.policy.deferral_s)
    detail = (
        f"deferred {why} ({node.deferrals + 1}/{txn.policy.max_deferrals})"
        f", retry after {clock(retry_at)}"
    )
    return release(txn, node.model_copy(update={"retry_at": retry_at}), NodeStep.PENDING, detail)


def _requeue(txn: Txn, node: NodeRecord) -> None:
    """A deferred node is out of maintenance: PENDING again, its slot free for other nodes."""
    txn.enter(
        node,
        NodeStep.PENDING,
        node.outcome_detail,
        sent=None,
        vms=None,
        vnfm_deadline=None,
        migrations=(),
        upgrade_percent=None,
        outcome=None,
        outcome_detail="",
        deferrals=node.deferrals + 1,
    )
    campaign = txn.campaign
    index = txn.plan.node_order.index(node.node_id)
    txn.update_campaign(
        active=tuple(n for n in campaign.active if n != node.node_id),
        scan_from=min(campaign.scan_from, index),
    )


# --- MIGRATING -----------------------------------------------------------------------------


def begin_migrations(txn: Txn, node: NodeRecord, vm_ids: list[str], note: str = "") -> None:
    if not vm_ids:
        node = txn.enter(node, NodeStep.MIGRATING, f"nothing to migrate{note}", sent=None)
        begin_upgrade(txn, node)
        return
    sent = txn.sent(txn.policy.step_timeout_s)
    destinations = _planned_destinations(txn, node, vm_ids)
    migrations = tuple(
        PendingMigration(vm_id=vm_id, sent=sent, destination=destinations.get(vm_id))
        for vm_id in vm_ids
    )
    detail = _migrating_detail(migrations) + note
    node = txn.enter(node, NodeStep.MIGRATING, detail, sent=None, migrations=migrations)
    txn.emit(*in_flight_commands(txn.plan, node))


def _planned_destinations(txn: Txn, node: NodeRecord, vm_ids: list[str]) -> dict[str, str]:
    cloud = txn.ctx.cloud
    if cloud is None or node.deferrals > 0:
        # A node deferred once may have failed to empty because the cloud refused the packing
        # (say, a server group the registry does not declare): the VIM places its VMs now.
        return {}
    wanted = set(vm_ids)
    loads = [
        VmLoad(vm.vm_id, vm.vnf_id, vm.vcpus, vm.ram_mb)
        for vm in node.vms or ()
        if vm.vm_id in wanted
    ]
    if len(loads) != len(wanted):
        return {}  # a VM the node's report did not size: let the Cloud Manager place them all
    return migration_destinations(cloud, txn.ctx.rules, node.node_id, loads, txn.campaign.active)


def on_vm_migrated(txn: Txn, node: NodeRecord, vm_id: str) -> None:
    if node.step is not NodeStep.MIGRATING:
        return
    remaining = tuple(m for m in node.migrations if m.vm_id != vm_id)
    if len(remaining) == len(node.migrations):
        return  # unknown VM, or a duplicate of a confirmation already counted
    node = node.model_copy(update={"migrations": remaining})
    if remaining:
        txn.save(node.model_copy(update={"detail": _migrating_detail(remaining)}))
    else:
        begin_upgrade(txn, node)


def on_vm_migration_failed(txn: Txn, node: NodeRecord, event: VmMigrationFailed) -> None:
    if node.step is not NodeStep.MIGRATING:
        return
    pending = _pending(node, event.vm_id)
    # Only the answer to the attempt in flight counts; an older attempt's failure is stale.
    if pending is None or event.causation_id != migration_command_id(
        txn.plan, node.node_id, pending, node.deferrals
    ):
        return
    tried = event.destination_node_id
    if tried is not None and tried not in pending.avoid:
        pending = pending.model_copy(update={"avoid": (*pending.avoid, tried)})
    retry_migration(txn, node, pending, f"VM {event.vm_id} could not be migrated: {event.reason}")


def retry_migration(txn: Txn, node: NodeRecord, pending: PendingMigration, why: str) -> NodeRecord:
    """Re-request one VM's migration elsewhere, or give the node up once attempts run out.

    A node that cannot be emptied goes back to service untouched (nothing was upgraded) and is
    deferred, like a node a VNFM refused; after `max_deferrals` deferrals it fails, untouched.
    """
    attempt = pending.sent.attempt
    if attempt >= txn.policy.max_step_attempts:
        why = f"{why} (after {attempt} attempt(s))"
        if node.deferrals < txn.policy.max_deferrals:
            return defer(txn, node, f"as the node could not be emptied: {why}")
        return release(
            txn,
            node,
            NodeStep.FAILED,
            f"{why}, still not emptied after {node.deferrals} deferral(s); node not upgraded",
        )
    retry = PendingMigration(
        vm_id=pending.vm_id,
        sent=txn.sent(txn.policy.step_timeout_s, attempt + 1),
        avoid=pending.avoid,
    )
    migrations = tuple(retry if m.vm_id == pending.vm_id else m for m in node.migrations)
    detail = f"{_migrating_detail(migrations)}; retrying {pending.vm_id} (attempt {attempt + 1})"
    node = txn.save(node.model_copy(update={"migrations": migrations, "detail": detail}))
    txn.emit(migrate_command(txn.plan, node.node_id, retry, node.deferrals))
    return node


# --- UPGRADING -----------------------------------------------------------------------------


def begin_upgrade(txn: Txn, node: NodeRecord) -> None:
    sent = txn.sent(txn.policy.upgrade_timeout_s)
    node = txn.enter(
        node, NodeStep.UPGRADING, _upgrade_detail(txn, sent), sent=sent, upgrade_percent=None
    )
    txn.emit(*in_flight_commands(txn.plan, node))


def on_upgrade_accepted(txn: Txn, node: NodeRecord) -> None:
    if node.step is not NodeStep.UPGRADING or node.upgrade_percent is not None or node.rolling_back:
        return  # a late or duplicate acceptance must not hide progress already reported
    detail = f"node agent accepted the upgrade to {txn.plan.target_version}"
    txn.save(node.model_copy(update={"detail": detail, "upgrade_percent": 0.0}))


def on_upgrade_progressed(txn: Txn, node: NodeRecord, event: NodeUpgradeProgressed) -> None:
    if node.step is not NodeStep.UPGRADING or node.rolling_back:
        return
    if node.upgrade_percent is not None and event.percent <= node.upgrade_percent:
        return  # progress shown never goes backwards, whatever the delivery order
    detail = f"upgrading to {txn.plan.target_version}: {event.phase} ({event.percent:.0f}%)"
    txn.save(node.model_copy(update={"detail": detail, "upgrade_percent": event.percent}))


def on_upgraded(txn: Txn, node: NodeRecord, event: NodeUpgraded) -> None:
    # A success from any attempt is a fact; a different version is not the success we wait for.
    if node.step is not NodeStep.UPGRADING or event.version != txn.plan.target_version:
        return
    if node.rolling_back:
        return  # the abort asked for a rollback, which undoes this upgrade
    release(txn, node, NodeStep.DONE, f"upgraded to {event.version}")


def on_upgrade_failed(txn: Txn, node: NodeRecord, event: NodeUpgradeFailed) -> None:
    if node.step is not NodeStep.UPGRADING or node.sent is None or node.rolling_back:
        return
    current = step_command_id(
        txn.plan, node.node_id, NodeStep.UPGRADING, node.sent.attempt, node.deferrals
    )
    if event.causation_id != current:
        return  # the failure of an attempt that was already re-sent
    failed = (
        f"upgrade to {txn.plan.target_version} failed in {event.phase} after "
        f"{event.attempts} attempt(s): {event.reason}"
    )
    if event.untouched:
        release(txn, node, NodeStep.FAILED, f"{failed}; nothing was changed")
        return
    if event.rolled_back and event.healthy:
        back = event.installed_version or "its previous version"
        release(txn, node, NodeStep.FAILED, f"{failed}; rolled back to {back}, healthy")
        return
    if event.rolled_back:
        failed += "; rolled back but not healthy"
    finish(txn, node, NodeStep.FAILED, f"{failed}; {QUARANTINED}")


QUARANTINED = "node kept in maintenance (quarantined) so that it takes no VMs"


def begin_rollback(txn: Txn, node: NodeRecord, reason: str) -> None:
    """Ask the agent to put the node back on its previous version (an abort with rollback)."""
    sent = txn.sent(txn.policy.upgrade_timeout_s)
    node = txn.enter(
        node,
        NodeStep.UPGRADING,
        f"rolling back from {txn.plan.target_version}: {reason}",
        sent=sent,
        rolling_back=True,
        upgrade_percent=None,
    )
    txn.emit(*in_flight_commands(txn.plan, node))


def on_rolled_back(txn: Txn, node: NodeRecord, event: NodeRollbackCompleted) -> None:
    if node.step is not NodeStep.UPGRADING or not node.rolling_back or node.sent is None:
        return
    current = command_id(
        txn.plan.campaign_id, node.node_id, ROLLBACK, node.sent.attempt, *round_part(node.deferrals)
    )
    if event.causation_id != current:
        return
    if event.healthy:
        release(
            txn,
            node,
            NodeStep.SKIPPED,
            f"campaign aborted; rolled back to {event.installed_version}, healthy",
        )
        return
    finish(
        txn,
        node,
        NodeStep.FAILED,
        f"campaign aborted; rollback left {event.installed_version} unhealthy: {event.reason}; "
        + QUARANTINED,
    )


# --- RELEASING -----------------------------------------------------------------------------


def release(txn: Txn, node: NodeRecord, outcome: NodeStep, reason: str) -> NodeRecord:
    """Take the node out of maintenance; it ends as `outcome` once the exit is confirmed
    (PENDING: deferred, it will be tried again)."""
    sent = txn.sent(txn.policy.step_timeout_s)
    node = txn.enter(
        node,
        NodeStep.RELEASING,
        f"leaving maintenance: {reason}",
        sent=sent,
        migrations=(),
        outcome=outcome,
        outcome_detail=reason,
    )
    txn.emit(*in_flight_commands(txn.plan, node))
    return node


def on_maintenance_exited(txn: Txn, node: NodeRecord) -> None:
    if node.step is not NodeStep.RELEASING:
        return
    if node.vms is not None:
        # The VNFMs saw the node go into maintenance (and were notified if they had VMs on it):
        # tell them it is back, whatever the outcome, so that they may use it again.
        event_id = command_id(
            txn.campaign.campaign_id, node.node_id, AVAILABLE, 1, *round_part(node.deferrals)
        )
        txn.emit(
            NodeAvailable(
                **envelope(txn.plan, event_id, txn.ctx.now, txn.cause_id),
                node_id=node.node_id,
                vnf_ids=node.vnf_ids,
            )
        )
    now = txn.ctx.now
    node = txn.save(node.model_copy(update={"released_at": now}))
    keep_s = txn.ctx.max_recovery_s
    recent = tuple(r for r in txn.campaign.recent_releases if (now - r.at).total_seconds() < keep_s)
    if keep_s > 0:
        recent += (Release(node_id=node.node_id, at=now),)
    txn.update_campaign(recent_releases=recent)
    txn.replan = True
    if node.outcome is NodeStep.PENDING:
        _requeue(txn, node)
        return
    outcome = node.outcome or NodeStep.DONE
    detail = node.outcome_detail
    if outcome is NodeStep.DONE:
        detail = f"{detail}; back in service"
    finish(txn, node, outcome, detail)


# --- deadlines -----------------------------------------------------------------------------


def on_deadline(txn: Txn, node: NodeRecord) -> None:
    """A Tick found the node's deadline passed: re-send with attempt+1, or fail safely."""
    now = txn.ctx.now
    policy = txn.policy
    match node.step:
        case NodeStep.MIGRATING:
            for pending in node.migrations:
                if pending.sent.deadline <= now:
                    why = f"no answer to the migration of {pending.vm_id}"
                    node = retry_migration(txn, node, pending, why)
                    if node.step is not NodeStep.MIGRATING:
                        return
        case NodeStep.NOTIFYING:
            on_backstop(txn, node)
        case NodeStep.CLAIMING if not _exhausted(txn, node):
            _resend(txn, node, policy.step_timeout_s, _claim_detail)
        case NodeStep.CLAIMING:
            # The claim may have taken effect unseen; the release is holder-checked, so harmless.
            release(txn, node, NodeStep.FAILED, f"maintenance not confirmed {_after(node)}")
        case NodeStep.UPGRADING if not _exhausted(txn, node):
            _resend(
                txn,
                node,
                policy.upgrade_timeout_s,
                lambda sent: _upgrade_detail(txn, sent, node.rolling_back),
            )
        case NodeStep.UPGRADING:
            what = "rollback" if node.rolling_back else "upgrade"
            finish(txn, node, NodeStep.FAILED, f"no {what} result {_after(node)}; {QUARANTINED}")
        case NodeStep.RELEASING if not _exhausted(txn, node):
            _resend(txn, node, policy.step_timeout_s, lambda sent: _release_detail(node, sent))
        case NodeStep.RELEASING:
            finish(
                txn,
                node,
                NodeStep.FAILED,
                f"maintenance exit not confirmed {_after(node)}; the node may still be in "
                f"maintenance ({node.outcome_detail})",
            )
        case _:
            pass


def _exhausted(txn: Txn, node: NodeRecord) -> bool:
    return node.sent is not None and node.sent.attempt >= txn.policy.max_step_attempts


def _after(node: NodeRecord) -> str:
    attempts = node.sent.attempt if node.sent is not None else 0
    return f"after {attempts} attempt(s)"


def _resend(txn: Txn, node: NodeRecord, timeout_s: float, describe: _Describe) -> None:
    attempt = node.sent.attempt + 1 if node.sent is not None else 1
    sent = txn.sent(timeout_s, attempt)
    update: dict[str, object] = {"sent": sent, "detail": describe(sent)}
    if node.step is NodeStep.UPGRADING:
        update["upgrade_percent"] = None  # a new attempt reports its progress from zero
    node = txn.save(node.model_copy(update=update))
    txn.emit(*in_flight_commands(txn.plan, node))


# --- the end of a cycle, and of the campaign's unstarted nodes -----------------------------


def finish(txn: Txn, node: NodeRecord, step: NodeStep, detail: str) -> None:
    txn.replan = True
    txn.enter(node, step, detail, sent=None, migrations=(), outcome=None, upgrade_percent=None)
    campaign = txn.campaign
    counter = {NodeStep.DONE: "done", NodeStep.SKIPPED: "skipped", NodeStep.FAILED: "failed"}[step]
    txn.update_campaign(
        active=tuple(n for n in campaign.active if n != node.node_id),
        **{counter: getattr(campaign, counter) + 1},
    )


def abort_campaign(txn: Txn, reason: str) -> None:
    """No node starts any more; nodes not yet upgrading are released untouched."""
    if txn.campaign.status is not CampaignStatus.RUNNING:
        return
    txn.update_campaign(status=CampaignStatus.ABORTING, reason=reason)
    for node_id in txn.campaign.active:
        node = txn.node(node_id)
        if node is not None and node.step in _RELEASED_ON_ABORT:
            release(txn, node, NodeStep.SKIPPED, f"campaign aborted before the upgrade: {reason}")


# Nodes past these steps are upgrading or leaving maintenance already: they finish normally.
_RELEASED_ON_ABORT = frozenset({NodeStep.CLAIMING, NodeStep.NOTIFYING, NodeStep.MIGRATING})


# --- details -------------------------------------------------------------------------------


def _claim_detail(sent: Sent) -> str:
    return f"waiting for maintenance mode (attempt {sent.attempt}) until {clock(sent.deadline)}"


def _upgrade_detail(txn: Txn, sent: Sent, rolling_back: bool = False) -> str:
    if rolling_back:
        return f"rolling back from {txn.plan.target_version} (attempt {sent.attempt})"
    return (
        f"waiting for the node agent to install {txn.plan.target_version} "
        f"(attempt {sent.attempt}) until {clock(sent.deadline)}"
    )


def _release_detail(node: NodeRecord, sent: Sent) -> str:
    return f"leaving maintenance (attempt {sent.attempt}): {node.outcome_detail}"


def _migrating_detail(migrations: tuple[PendingMigration, ...]) -> str:
    ids = [m.vm_id for m in migrations]
    return f"waiting for {len(ids)} VM migration(s): {listing(ids)}"


def _pending(node: NodeRecord, vm_id: str) -> PendingMigration | None:
    return next((m for m in node.migrations if m.vm_id == vm_id), None)


def _vm_ids(vms: Iterable[VmOnNode]) -> list[str]:
    return [vm.vm_id for vm in vms]
