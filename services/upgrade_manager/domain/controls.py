"""Operator controls: pause, resume, abort, and re-admitting a node.

Each request is an event on the campaigns topic, so it is ordered with everything else the
campaign receives and survives a restart of the manager. Every request is idempotent: a repeated
pause of a paused campaign, or a redelivery, changes nothing and emits nothing new (the facts'
event ids derive from the request's). A request that cannot apply gets an
`OperatorRequestRejected` with the reason, and changes nothing.
"""

from __future__ import annotations

from typing import Any

from schemas.envelope import Event, command_id
from schemas.events import (
    CampaignAbortRequested,
    CampaignAbortStarted,
    CampaignPaused,
    CampaignPauseRequested,
    CampaignResumed,
    CampaignResumeRequested,
    NodeRetryRequested,
    NodeStep,
    OnAbortUpgrading,
    OperatorRequestRejected,
)

from . import node_cycle as cycle
from .commands import envelope
from .state import CampaignStatus
from .txn import Txn

ControlRequest = (
    CampaignPauseRequested | CampaignResumeRequested | CampaignAbortRequested | NodeRetryRequested
)


# How many applied control requests are remembered to ignore their redeliveries.
CONTROLS_KEPT = 32


def on_control(txn: Txn, request: ControlRequest) -> None:
    seen = txn.campaign.controls_seen
    if request.event_id in seen:
        return
    txn.update_campaign(controls_seen=(*seen, request.event_id)[-CONTROLS_KEPT:])
    match request:
        case CampaignPauseRequested():
            pause(txn, request)
        case CampaignResumeRequested():
            resume(txn, request)
        case CampaignAbortRequested():
            abort(txn, request)
        case NodeRetryRequested():
            retry(txn, request)


def _fact_envelope(txn: Txn, request: Event, what: str) -> dict[str, Any]:
    event_id = command_id(txn.campaign.campaign_id, what, request.event_id)
    return envelope(txn.plan, event_id, txn.ctx.now, request.event_id)


def reject(txn: Txn, request: Event, reason: str) -> None:
    txn.emit(
        OperatorRequestRejected(
            **_fact_envelope(txn, request, "rejected"),
            request_type=request.event_type,
            reason=reason,
        )
    )


def pause(txn: Txn, request: CampaignPauseRequested) -> None:
    status = txn.campaign.status
    if status is CampaignStatus.PAUSED:
        return
    if status is not CampaignStatus.RUNNING:
        reject(txn, request, f"campaign is {status.value}, not running")
        return
    reason = request.reason or "paused by the operator"
    txn.update_campaign(status=CampaignStatus.PAUSED, reason=reason, waiting="")
    txn.emit(CampaignPaused(**_fact_envelope(txn, request, "paused"), reason=reason))


def resume(txn: Txn, request: CampaignResumeRequested) -> None:
    status = txn.campaign.status
    if status is CampaignStatus.RUNNING:
        return
    if status is not CampaignStatus.PAUSED:
        reject(txn, request, f"campaign is {status.value}, not paused")
        return
    txn.update_campaign(status=CampaignStatus.RUNNING, reason="")
    txn.replan = True
    txn.emit(CampaignResumed(**_fact_envelope(txn, request, "resumed")))


def abort(txn: Txn, request: CampaignAbortRequested) -> None:
    status = txn.campaign.status
    if status is CampaignStatus.ABORTING and txn.campaign.abort_upgrading is not None:
        return  # already aborted by an operator
    if status not in (CampaignStatus.RUNNING, CampaignStatus.PAUSED, CampaignStatus.ABORTING):
        reject(txn, request, f"campaign is {status.value}")
        return
    who = f" by {request.requested_by}" if request.requested_by else ""
    why = f": {request.reason}" if request.reason else ""
    reason = f"aborted by the operator{who}{why} (upgrading nodes: {request.upgrading.value})"
    # abort_campaign acts on RUNNING campaigns only; a halted (ABORTING) campaign is aborted too,
    # releasing the nodes the halt let finish their early steps.
    txn.update_campaign(status=CampaignStatus.RUNNING)
    cycle.abort_campaign(txn, reason)
    txn.update_campaign(
        status=CampaignStatus.ABORTING,
        reason=reason,
        abort_upgrading=request.upgrading.value,
        waiting="",
    )
    txn.emit(
        CampaignAbortStarted(
            **_fact_envelope(txn, request, "abort-started"),
            reason=reason,
            upgrading=request.upgrading,
        )
    )
    if request.upgrading is OnAbortUpgrading.ROLLBACK:
        for node_id in txn.campaign.active:
            node = txn.node(node_id)
            if node is not None and node.step is NodeStep.UPGRADING and not node.rolling_back:
                cycle.begin_rollback(txn, node, "campaign aborted by the operator")


def retry(txn: Txn, request: NodeRetryRequested) -> None:
    campaign = txn.campaign
    node = txn.node(request.node_id)
    if node is None:
        reject(txn, request, f"{request.node_id} is not a node of this campaign")
        return
    if campaign.abort_upgrading is not None:
        reject(txn, request, "the campaign was aborted by an operator; start a new campaign")
        return
    deferred = node.step is NodeStep.PENDING and node.retry_at is not None
    if node.step is not NodeStep.FAILED and not deferred:
        reject(
            txn,
            request,
            f"{request.node_id} is {node.step.value}: only a failed (quarantined) or deferred "
            "node can be re-admitted",
        )
        return
    if deferred:
        txn.progress(
            txn.save(
                node.model_copy(update={"retry_at": None, "detail": "re-admitted by operator"})
            )
        )
        txn.replan = True
        return
    # A failed node is PENDING again, in a new round (new command ids); the failure no longer
    # counts against the failure budget.
    txn.enter(
        node,
        NodeStep.PENDING,
        "re-admitted by operator after: " + node.detail,
        sent=None,
        vms=None,
        vnfm_deadline=None,
        migrations=(),
        upgrade_percent=None,
        outcome=None,
        outcome_detail="",
        rolling_back=False,
        retry_at=None,
        deferrals=node.deferrals + 1,
    )
    index = txn.plan.node_order.index(node.node_id)
    txn.update_campaign(
        failed=max(0, campaign.failed - 1), scan_from=min(campaign.scan_from, index)
    )
    if campaign.status.ended:
        txn.update_campaign(
            status=CampaignStatus.RUNNING, reason="", reopened=campaign.reopened + 1
        )
    elif campaign.status is CampaignStatus.ABORTING:
        # Halted by its failure budget (an operator abort was refused above): go on if the
        # budget allows it now; advance_campaign halts it again otherwise.
        txn.update_campaign(status=CampaignStatus.RUNNING, reason="")
    txn.replan = True
