"""The campaign: accepting a request, routing inputs to nodes, filling slots, ending.

`decide(state, input, ctx)` is the whole core: pure, no I/O, no clock, no randomness. The adapter
feeds it every input of one campaign (events of that campaign id, plus Ticks) with the state it
persisted, publishes `Decision.commands`, and persists the records the decision names as changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from schemas.envelope import Event, command_id
from schemas.events import (
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    CampaignAbortRequested,
    CampaignCompleted,
    CampaignFailed,
    CampaignPauseRequested,
    CampaignRejected,
    CampaignResumeRequested,
    CampaignStarted,
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceRefused,
    NodeRetryRequested,
    NodeRollbackCompleted,
    NodeStep,
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    UpgradeRequested,
    VmMigrated,
    VmMigrationFailed,
)

from . import controls
from . import node_cycle as cycle
from .commands import clip, clock, envelope, in_flight_commands, listing, round_part
from .controls import ControlRequest
from .forecast import campaign_order
from .planner import Limits, PlanStep, Progress, plan_step
from .state import (
    CampaignPlan,
    CampaignRecord,
    CampaignState,
    CampaignStatus,
    Context,
    Decision,
    Input,
    NodeRecord,
    Tick,
)
from .txn import Txn

# How many refused re-uses of a campaign id are remembered to ignore their redeliveries.
REFUSED_REQUESTS_KEPT = 16


def decide(state: CampaignState | None, event: Input, ctx: Context) -> Decision:
    """The next state of one campaign and the commands to publish, given one input."""
    if isinstance(event, UpgradeRequested):
        return on_upgrade_requested(state, event, ctx)
    if isinstance(event, CONTROL_REQUESTS):
        return on_control_request(state, event, ctx)
    if state is None or state.campaign.status.ended:
        return Decision(state)
    if isinstance(event, Event) and event.campaign_id != state.campaign.campaign_id:
        return Decision(state)
    txn = Txn(state, ctx, event if isinstance(event, Event) else None)
    if isinstance(event, Tick):
        on_tick(txn)
    else:
        route(txn, event)
    advance_campaign(txn)
    return txn.decision()


CONTROL_REQUESTS = (
    CampaignPauseRequested,
    CampaignResumeRequested,
    CampaignAbortRequested,
    NodeRetryRequested,
)


def on_control_request(
    state: CampaignState | None, request: ControlRequest, ctx: Context
) -> Decision:
    """An operator's pause, resume, abort or retry; ended campaigns accept only a retry."""
    if state is None or request.campaign_id != state.campaign.campaign_id:
        return Decision(state)  # the CLI checks that the campaign exists before it asks
    status = state.campaign.status
    if status is CampaignStatus.REJECTED:
        return Decision(state)
    txn = Txn(state, ctx, request)
    if status.ended and not isinstance(request, NodeRetryRequested):
        if request.event_id not in state.campaign.controls_seen:
            controls.reject(txn, request, f"campaign has ended ({status.value})")
    else:
        controls.on_control(txn, request)
    advance_campaign(txn)
    return txn.decision()


def recover(state: CampaignState | None, ctx: Context) -> list[Event]:
    """Every command a node is waiting on, with its original id, to re-publish after a restart."""
    if state is None:
        return []
    commands: list[Event] = []
    for node_id in state.campaign.active:
        node = state.nodes.get(node_id)
        if node is not None:
            commands.extend(in_flight_commands(state.plan, node))
    return commands


# --- campaign requests ---------------------------------------------------------------------


def on_upgrade_requested(
    state: CampaignState | None, request: UpgradeRequested, ctx: Context
) -> Decision:
    fingerprint = request_fingerprint(request)
    if state is None:
        return start_campaign(request, fingerprint, ctx)
    plan, campaign = state.plan, state.campaign
    if request.event_id == plan.request_id or request.event_id in campaign.refused_requests:
        return Decision(state)  # a redelivery
    if fingerprint == plan.request_fingerprint and campaign.status is not CampaignStatus.REJECTED:
        return Decision(state)  # the same request sent again (e.g. a CLI retry): already under way
    if fingerprint == plan.request_fingerprint:
        reason = (
            f"campaign id {campaign.campaign_id} was rejected before ({campaign.reason}); "
            "use a new campaign id"
        )
    else:
        reason = f"campaign id {campaign.campaign_id} is already used by a different request"
    refused = (*campaign.refused_requests, request.event_id)[-REFUSED_REQUESTS_KEPT:]
    updated = campaign.model_copy(update={"refused_requests": refused})
    return Decision(
        CampaignState(plan, updated, state.nodes),
        (rejection(request, reason, ctx),),
        frozenset(),
        True,
    )


def start_campaign(request: UpgradeRequested, fingerprint: str, ctx: Context) -> Decision:
    campaign_id = request.campaign_id
    if campaign_id is None:
        return Decision(None)  # the schema allows it, but there is no campaign to start
    nodes, problem = campaign_nodes(request, ctx)
    if not problem:
        problem = claimed_elsewhere(campaign_id, nodes, ctx)
    if not problem and ctx.cloud is not None and not request.policy.keep_order:
        # The same order as `forecast` (hence `escalator plan`) predicts with.
        nodes = tuple(
            campaign_order(
                ctx.cloud,
                ctx.rules,
                Limits.from_policy(request.policy),
                nodes,
                migrate_moved_vms=request.policy.migrate_moved_vms,
            )
        )
    plan = CampaignPlan(
        campaign_id=campaign_id,
        request_id=request.event_id,
        request_fingerprint=fingerprint,
        correlation_id=request.correlation_id or request.event_id,
        manifest=None if problem else request.manifest,
        policy=request.policy,
        node_order=nodes,
    )
    if problem:
        record = CampaignRecord(
            campaign_id=campaign_id, status=CampaignStatus.REJECTED, reason=problem
        )
        return Decision(
            CampaignState(plan, record),
            (rejection(request, problem, ctx),),
            frozenset(),
            True,
            True,
        )
    record = CampaignRecord(campaign_id=campaign_id, status=CampaignStatus.RUNNING)
    started = CampaignStarted(
        **envelope(plan, command_id(campaign_id, "started"), ctx.now, request.event_id),
        target_version=request.manifest.version,
        nodes=nodes,
    )
    fresh = CampaignState(plan, record, {node_id: NodeRecord(node_id=node_id) for node_id in nodes})
    txn = Txn(fresh, ctx, request)
    txn.replan = True
    advance_campaign(txn)
    first = txn.decision()
    return Decision(first.state, (started, *first.commands), frozenset(nodes), True, True)


def campaign_nodes(request: UpgradeRequested, ctx: Context) -> tuple[tuple[str, ...], str]:
    """The campaign's nodes in order, or a reason to reject the request."""
    if request.nodes is None:
        nodes = tuple(sorted(ctx.agents))
        if not nodes:
            return (), "no node to upgrade: the request names none and no node agent has reported"
        return nodes, ""
    if not request.nodes:
        return (), "the request's node list is empty"
    unknown = [node_id for node_id in request.nodes if node_id not in ctx.agents]
    if unknown:
        return (), f"unknown nodes (no node agent has ever reported): {listing(unknown)}"
    return request.nodes, ""


def claimed_elsewhere(campaign_id: str, nodes: tuple[str, ...], ctx: Context) -> str:
    """Why the nodes cannot be this campaign's: another running campaign holds some of them."""
    held: dict[str, list[str]] = {}
    for node_id in nodes:
        holder = ctx.claims.get(node_id)
        if holder is not None and holder != campaign_id:
            held.setdefault(holder, []).append(node_id)
    if not held:
        return ""
    parts = "; ".join(
        f"{listing(sorted(ids))} by running campaign {holder}"
        for holder, ids in sorted(held.items())
    )
    return f"nodes already claimed: {parts}; wait for it to end, or abort it"


def request_fingerprint(request: UpgradeRequested) -> str:
    """What makes two requests the same request, whatever their event ids."""
    content = {
        "manifest": request.manifest.model_dump(mode="json"),
        "nodes": request.nodes,
        "policy": request.policy.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def rejection(request: UpgradeRequested, reason: str, ctx: Context) -> CampaignRejected:
    return CampaignRejected(
        **request.caused(
            event_id=command_id(request.campaign_id, "rejected", request.event_id),
            producer="upgrade-manager",
            occurred_at=ctx.now,
        ),
        reason=reason,
    )


# --- routing -------------------------------------------------------------------------------


def route(txn: Txn, event: Event) -> None:
    """Hand an event to its node's cycle; events of no known node are ignored."""
    node_id = _node_of(event)
    node = txn.node(node_id) if node_id is not None else None
    if node is None:
        return
    match event:
        case NodeMaintenanceEntered():
            cycle.on_maintenance_entered(txn, node, event)
        case NodeMaintenanceRefused():
            cycle.on_maintenance_refused(txn, node, event)
        case BusinessMoved():
            cycle.on_business_moved(txn, node, event)
        case BusinessMoveDeadlineExtended():
            cycle.on_deadline_extended(txn, node, event)
        case VmMigrated():
            cycle.on_vm_migrated(txn, node, event.vm_id)
        case VmMigrationFailed():
            cycle.on_vm_migration_failed(txn, node, event)
        case NodeUpgradeAccepted():
            cycle.on_upgrade_accepted(txn, node)
        case NodeUpgradeProgressed():
            cycle.on_upgrade_progressed(txn, node, event)
        case NodeUpgraded():
            cycle.on_upgraded(txn, node, event)
        case NodeUpgradeFailed():
            cycle.on_upgrade_failed(txn, node, event)
        case NodeMaintenanceExited():
            cycle.on_maintenance_exited(txn, node)
        case NodeRollbackCompleted():
            cycle.on_rolled_back(txn, node, event)
        case _:
            pass  # our own progress events, or events of other services: nothing to do


def _node_of(event: Event) -> str | None:
    node_id = getattr(event, "node_id", None)
    return node_id if isinstance(node_id, str) else None


def on_tick(txn: Txn) -> None:
    now = txn.ctx.now
    for node_id in txn.campaign.active:  # a snapshot: finishing nodes leave `active`
        node = txn.node(node_id)
        if node is None or not node.in_cycle:
            continue
        deadline = node.deadline
        if deadline is not None and deadline <= now:
            cycle.on_deadline(txn, node)


# --- slots and the end ---------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What to do with the PENDING nodes looked at, in campaign order."""

    start: tuple[str, ...] = ()
    already_at_target: tuple[str, ...] = ()
    no_heartbeat: tuple[str, ...] = ()
    scan_from: int = 0
    waiting: str = ""
    # The first nodes in line that the planner passed over, with what blocks each.
    blocked: tuple[tuple[str, str], ...] = ()
    # Some pending node will become startable by the clock alone: a deferral's retry time, or a
    # blocker with an end (recovery, canary bake, the window's opening). Not a stall.
    timed_wait: bool = False


def select_next(
    plan: CampaignPlan, campaign: CampaignRecord, nodes: Mapping[str, NodeRecord], ctx: Context
) -> Selection:
    """Which nodes start now, among the PENDING ones whose agent is live, in campaign order.

    With an inventory (`ctx.cloud`), the batch planner decides under every constraint (see
    `planner.plan_step`); without one, the next nodes in order start up to max_parallel. A node
    whose agent is not live is passed over, never drained: it may hold VMs the VIM cannot upgrade
    under. A deferred node waiting for its retry time is passed over silently: it blocks nobody.
    """
    order = plan.node_order
    scan_from = campaign.scan_from
    while scan_from < len(order) and nodes[order[scan_from]].step is not NodeStep.PENDING:
        scan_from += 1
    planning = ctx.cloud is not None
    slots = plan.policy.max_parallel - len(campaign.active)
    candidates: list[str] = []
    at_target: list[str] = []
    no_heartbeat: list[str] = []
    retry_later = False
    for node_id in islice(order, scan_from, None):
        if slots <= 0 and not planning:
            break
        record = nodes[node_id]
        if record.step is not NodeStep.PENDING:
            continue
        if record.waiting_to_retry(ctx.now):
            retry_later = True
            continue
        agent = ctx.agents.get(node_id)
        if agent is None or not agent.is_live(ctx.now, plan.policy.agent_liveness_s):
            no_heartbeat.append(node_id)
        elif agent.installed_version == plan.target_version:
            at_target.append(node_id)
        else:
            candidates.append(node_id)
            slots -= 1
    if ctx.cloud is None:
        return Selection(
            tuple(candidates), tuple(at_target), tuple(no_heartbeat), scan_from, timed_wait=True
        )
    step = plan_step(
        ctx.cloud,
        ctx.rules,
        Limits.from_policy(plan.policy),
        planner_progress(campaign, ctx),
        candidates,
        ctx.now,
        scan_budget=PLANNER_SCAN_BUDGET,
    )
    return Selection(
        step.start,
        tuple(at_target),
        tuple(no_heartbeat),
        scan_from,
        waiting_summary(step, len(candidates) - len(step.start)),
        tuple(
            (node_id, f"waiting ({blocked.reason.value}): {blocked.detail}")
            for node_id, blocked in islice(step.blocked.items(), EXPLAINED_BLOCKERS)
        ),
        timed_wait=retry_later
        or step.unexamined > 0
        or any(b.until is not None for b in step.blocked.values()),
    )


# Passed-over nodes whose blocker is reported (NodeCycleAdvanced, so `escalator status` shows
# it): the next ones in line, which are what an operator asks about; reporting every blocked node
# of a 10,000-node campaign on every decision would flood the campaigns topic.
EXPLAINED_BLOCKERS = 20


# Blocked candidates the planner examines per decision before it stops looking: bounds a
# decision's cost on a large, tightly constrained cloud (the next Tick looks again).
PLANNER_SCAN_BUDGET = 2_000


def planner_progress(campaign: CampaignRecord, ctx: Context) -> Progress:
    horizon = ctx.max_recovery_s
    released = {
        r.node_id: r.at
        for r in campaign.recent_releases
        if (ctx.now - r.at).total_seconds() < horizon
    }
    return Progress(
        in_cycle=frozenset(campaign.active),
        started=campaign.started,
        failed=campaign.failed,
        canary_finished_at=campaign.canary_finished_at,
        released_at=released,
        campaign_id=campaign.campaign_id,
    )


def waiting_summary(step: PlanStep, waiting: int) -> str:
    """One line on why nodes wait: counts per blocker and the first node's reason."""
    if waiting <= 0:
        return ""
    counts: dict[str, int] = {}
    for blocked in step.blocked.values():
        counts[blocked.reason.value] = counts.get(blocked.reason.value, 0) + 1
    if step.unexamined:
        counts["not examined"] = step.unexamined
    parts = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
    first = next(iter(step.blocked.items()), None)
    example = f"; first: {first[0]}: {first[1].detail}" if first is not None else ""
    return clip(f"{waiting} node(s) wait ({parts}){example}")


def fill_slots(txn: Txn) -> None:
    campaign = txn.campaign
    if len(campaign.active) >= txn.policy.max_parallel:
        return
    if txn.ctx.cloud is not None and not txn.replan:
        return  # nothing the planner reads has changed since it last ran
    selection = select_next(txn.plan, campaign, txn.nodes, txn.ctx)
    since = stalled_since(txn, selection)
    waiting = selection.waiting
    if since is not None:
        fails_at = since + timedelta(seconds=txn.policy.stall_timeout_s)
        waiting = clip(f"stalled since {clock(since)}, fails at {clock(fails_at)}: {waiting}")
    txn.update_campaign(scan_from=selection.scan_from, waiting=waiting, stalled_since=since)
    for node_id in selection.no_heartbeat:
        cycle.mark_blocked(txn, _node(txn, node_id), cycle.NO_HEARTBEAT)
    for node_id, detail in selection.blocked:
        cycle.mark_blocked(txn, _node(txn, node_id), detail)
    for node_id in selection.already_at_target:
        cycle.mark_already_at_target(txn, _node(txn, node_id))
    for node_id in selection.start:
        cycle.start_claim(txn, _node(txn, node_id))


def stalled_since(txn: Txn, selection: Selection) -> datetime | None:
    """When the campaign's current stall began: nothing in its cycle, nothing starting or
    finishing at its target now, nothing the clock alone will unblock; None when not stalled."""
    stalled = (
        not txn.campaign.active
        and not selection.start
        and not selection.already_at_target
        and not selection.timed_wait
    )
    if not stalled:
        return None
    return txn.campaign.stalled_since or txn.ctx.now


def advance_campaign(txn: Txn) -> None:
    campaign = txn.campaign
    if campaign.status is CampaignStatus.RUNNING:
        note_canary(txn)
        halt = halt_reason(txn)
        if halt:
            # No node starts any more; nodes in their cycle finish (or roll back), then it fails.
            txn.update_campaign(status=CampaignStatus.ABORTING, reason=halt, waiting="")
            advance_campaign(txn)
            return
        fill_slots(txn)
        campaign = txn.campaign
        if campaign.finished == len(txn.plan.node_order):
            txn.update_campaign(status=CampaignStatus.COMPLETED, scan_from=campaign.finished)
            txn.emit(
                CampaignCompleted(
                    **_campaign_envelope(txn, "completed"),
                    upgraded=campaign.done,
                    skipped=campaign.skipped,
                    failed=campaign.failed,
                )
            )
    elif campaign.status is CampaignStatus.ABORTING and not campaign.active:
        # scan_from is a search hint whose value depends on restarts; an ended campaign's is
        # canonical, so that a replayed log ends in the same record.
        txn.update_campaign(status=CampaignStatus.FAILED, scan_from=len(txn.plan.node_order))
        txn.emit(
            CampaignFailed(
                **_campaign_envelope(txn, "failed"),
                reason=campaign.reason,
                upgraded=campaign.done,
                failed=campaign.failed,
            )
        )


def note_canary(txn: Txn) -> None:
    """Record when the canary batch has wholly finished: the bake starts then."""
    campaign = txn.campaign
    canary = txn.policy.canary_nodes
    if (
        canary > 0
        and campaign.canary_finished_at is None
        and campaign.started >= canary
        and not campaign.active
    ):
        txn.update_campaign(canary_finished_at=txn.ctx.now)
        txn.replan = True


def halt_reason(txn: Txn) -> str:
    """Why the campaign must stop starting nodes for good, or "" to go on."""
    campaign, policy = txn.campaign, txn.policy
    if policy.failure_budget is not None and campaign.failed >= policy.failure_budget:
        return (
            f"failure budget spent: {campaign.failed} node(s) failed, budget "
            f"{policy.failure_budget}"
        )
    since = campaign.stalled_since
    if since is not None and (txn.ctx.now - since).total_seconds() >= policy.stall_timeout_s:
        return (
            f"stalled for {policy.stall_timeout_s:g} s: no node in its cycle and no pending "
            f"node could start ({campaign.waiting or 'no node agent live'})"
        )
    end = policy.window_end
    if end is not None and txn.ctx.now >= end:
        left = len(txn.plan.node_order) - campaign.finished - len(campaign.active)
        if left > 0:
            return f"maintenance window closed at {end.isoformat()} with {left} node(s) not started"
    return ""


def _campaign_envelope(txn: Txn, what: str) -> dict[str, Any]:
    event_id = command_id(txn.campaign.campaign_id, what, *round_part(txn.campaign.reopened))
    return envelope(txn.plan, event_id, txn.ctx.now, txn.cause_id)


def _node(txn: Txn, node_id: str) -> NodeRecord:
    node = txn.node(node_id)
    assert node is not None, "selection only names nodes of the campaign"
    return node
