"""The VNFM adapter's pure decision core: `decide(state, input, ctx) -> Decision`.

The adapter is the VIM side of the VNFM contract. For a `BusinessMoveRequested` it sends one
`VnfMaintenanceNotified` per VNFM owning VMs on the node, collects the vendors' `VnfBusinessMoved`
replies (validating each against its notice), and reports one `BusinessMoved` per node and
attempt: when every notice was answered, or at the deadline with whatever arrived.

No I/O, no clock reads: `ctx.now` is the only time, `ctx.registry` the only VNF knowledge. Time
passes before the input applies: every call first expires the collections whose deadline is
reached, so a reply processed after the deadline is late even if no tick ran in between.

State is one small frozen record per node (`NodeCollection`), JSON-serialisable, so the service
can persist each changed record to a compacted topic keyed by node and rebuild after a crash.
A closed collection is kept until the node's `NodeAvailable` (or a newer request for the node, or
`CLOSED_RETENTION` after its deadline): it absorbs duplicate requests and turns late replies into
a precise rejection instead of "unknown notice". At most one record per node ever exists.

Ids are deterministic (`command_id` of campaign, node, attempt, VNFM), so re-processing an input
after a crash (the service publishes, then persists, then commits) re-emits identical events that
receivers recognise as duplicates.

Decisions worth knowing:
* A notice's `allowed_actions` is the **union** of its VNFs' profiles, in order of first
  preference. An intersection would often be empty (an active-standby VNF allowing
  `switch_over, migrate` and a load-balanced one allowing `drain, migrate` share only `migrate`)
  and would forbid each VNF the very action that fits it; every action only applies to the VNFs
  it suits, and the VNFM knows which of its VNFs is which.
* The deadline is the request's; the reply's own timestamps are the vendor's clock and are never
  trusted: a reply is late when `ctx.now >= deadline` at processing time.
* A request arriving already past its deadline notifies nobody and reports at once (VNF-owned VMs
  `left_for_vim`, `timed_out=True`): a notice nobody may answer would only confuse the VNFM.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import AwareDatetime, Field

from escalator.registry import VnfRegistry
from schemas.envelope import Event, command_id
from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    NodeAvailable,
    NoticeCancelled,
    NoticeExpired,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
)
from schemas.types import (
    AffectedVnf,
    BusinessOutcome,
    CampaignId,
    MaintenanceAction,
    NodeId,
    ValueModel,
    VmBusinessOutcome,
    VmId,
    VmRef,
    VnfId,
    VnfmId,
)

PRODUCER = "vnfm-adapter"
# A closed collection no NodeAvailable ever came for (campaign aborted, node skipped) is forgotten
# this long after its deadline; long enough that no redelivery of its request can still arrive.
CLOSED_RETENTION = timedelta(days=1)
# Version of the persisted record shape; bump with a migration when it changes incompatibly.
RECORD_VERSION = 1


# --- state -----------------------------------------------------------------------------------


class Notice(ValueModel):
    """One `VnfMaintenanceNotified` sent to one VNFM, and its answer once it came."""

    notice_id: str
    vnfm_id: VnfmId
    vms: tuple[VmRef, ...] = Field(description="VMs of the notice, each with its VNF.")
    outcomes: tuple[VmBusinessOutcome, ...] | None = Field(
        default=None, description="One per VM of the notice once answered; None while open."
    )

    @property
    def answered(self) -> bool:
        return self.outcomes is not None

    @property
    def vnf_ids(self) -> tuple[VnfId, ...]:
        return tuple(dict.fromkeys(ref.vnf_id for ref in self.vms if ref.vnf_id is not None))


class NodeCollection(ValueModel):
    """The adapter's whole memory of one node: the latest request and its notices."""

    record_version: int = RECORD_VERSION
    node_id: NodeId
    campaign_id: CampaignId
    attempt: int = Field(ge=1)
    request_id: uuid.UUID
    correlation_id: uuid.UUID | None
    deadline: AwareDatetime
    vms: tuple[VmRef, ...] = Field(description="The requested VMs, without repeats, in order.")
    notices: tuple[Notice, ...] = ()
    closed: bool = Field(default=False, description="BusinessMoved was emitted.")
    timed_out: bool = False

    def notice(self, notice_id: str) -> Notice | None:
        return next((n for n in self.notices if n.notice_id == notice_id), None)

    @property
    def open_notices(self) -> tuple[Notice, ...]:
        return () if self.closed else tuple(n for n in self.notices if not n.answered)


class AdapterState(ValueModel):
    """Every node's collection. Records the decision did not touch stay the same objects."""

    nodes: dict[NodeId, NodeCollection] = Field(default_factory=dict)

    def with_node(self, node_id: str, record: NodeCollection | None) -> AdapterState:
        nodes = dict(self.nodes)
        if record is None:
            nodes.pop(node_id, None)
        else:
            nodes[node_id] = record
        return AdapterState(nodes=nodes)

    def find_notice(self, notice_id: str) -> tuple[NodeCollection, Notice] | None:
        # A linear scan: only nodes in their notification step or just after have records.
        for record in self.nodes.values():
            notice = record.notice(notice_id)
            if notice is not None:
                return record, notice
        return None


def changed_nodes(before: AdapterState, after: AdapterState) -> dict[NodeId, NodeCollection | None]:
    """The records to write back (None: a tombstone), so that only changes are persisted."""
    changed: dict[NodeId, NodeCollection | None] = {}
    for node_id, record in after.nodes.items():
        if before.nodes.get(node_id) is not record and before.nodes.get(node_id) != record:
            changed[node_id] = record
    for node_id in before.nodes.keys() - after.nodes.keys():
        changed[node_id] = None
    return changed


# --- inputs, context, decision ---------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed (the service's ~100 ms ticker): expire what is due at `ctx.now`."""


Input = BusinessMoveRequested | VnfBusinessMoved | NodeAvailable | Tick


@dataclass(frozen=True)
class Context:
    now: datetime
    registry: VnfRegistry
    producer: str = PRODUCER
    closed_retention: timedelta = CLOSED_RETENTION


class RejectionReason(StrEnum):
    # request side
    MISSING_CAMPAIGN = "missing_campaign"
    STALE_REQUEST = "stale_request"
    NOT_INTERNAL = "not_internal"
    # reply side
    UNKNOWN_NOTICE = "unknown_notice"
    WRONG_VNFM = "wrong_vnfm"
    FOREIGN_VM = "foreign_vm"
    FOREIGN_VNF = "foreign_vnf"
    CONFLICTING_OUTCOMES = "conflicting_outcomes"
    LATE = "late"
    ALREADY_ANSWERED = "already_answered"
    # a redelivered input: nothing to do, nothing wrong
    DUPLICATE = "duplicate"

    @property
    def harmless(self) -> bool:
        """True for redeliveries, which are logged, not dead-lettered."""
        return self is RejectionReason.DUPLICATE


@dataclass(frozen=True)
class Rejection:
    """An input the core refused; the state was left as it was for that input."""

    reason: RejectionReason
    detail: str
    event_id: uuid.UUID
    event_type: str


class Decision(NamedTuple):
    state: AdapterState
    commands: tuple[Event, ...]
    rejections: tuple[Rejection, ...] = ()


@dataclass
class _Out:
    state: AdapterState
    commands: list[Event] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, event: Event, reason: RejectionReason, detail: str) -> None:
        self.rejections.append(Rejection(reason, detail, event.event_id, event.event_type))

    def decision(self) -> Decision:
        return Decision(self.state, tuple(self.commands), tuple(self.rejections))


# --- ids -------------------------------------------------------------------------------------


def notice_event_id(campaign_id: str, node_id: str, attempt: int, vnfm_id: str) -> uuid.UUID:
    """Id of the notice event; its string is also the `notice_id` vendors quote."""
    return command_id(campaign_id, node_id, "vnfm-notice", attempt, vnfm_id)


def business_moved_id(campaign_id: str, node_id: str, attempt: int) -> uuid.UUID:
    return command_id(campaign_id, node_id, "business-moved", attempt)


def _notice_uuid(record: NodeCollection, notice: Notice) -> uuid.UUID:
    return notice_event_id(record.campaign_id, record.node_id, record.attempt, notice.vnfm_id)


def _envelope(
    record: NodeCollection, event_id: uuid.UUID, cause: uuid.UUID, ctx: Context
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "campaign_id": record.campaign_id,
        "correlation_id": record.correlation_id,
        "causation_id": cause,
        "occurred_at": ctx.now,
        "producer": ctx.producer,
    }


# --- decide ----------------------------------------------------------------------------------


def decide(state: AdapterState, event: Input, ctx: Context) -> Decision:
    out = _Out(state)
    _expire_due(out, ctx)
    match event:
        case Tick():
            _forget_old(out, ctx)
        case BusinessMoveRequested():
            _on_request(out, event, ctx)
        case VnfBusinessMoved():
            _on_reply(out, event, ctx)
        case NodeAvailable():
            _on_node_available(out, event, ctx)
    return out.decision()


# --- requests --------------------------------------------------------------------------------


def _on_request(out: _Out, request: BusinessMoveRequested, ctx: Context) -> None:
    if request.campaign_id is None:
        out.reject(request, RejectionReason.MISSING_CAMPAIGN, "BusinessMoved is keyed by campaign")
        return
    current = out.state.nodes.get(request.node_id)
    if current is not None:
        same = (current.campaign_id, current.attempt) == (request.campaign_id, request.attempt)
        if current.request_id == request.event_id or same:
            out.reject(
                request,
                RejectionReason.DUPLICATE,
                f"{request.node_id} attempt {request.attempt} is already being handled",
            )
            return
        if current.campaign_id == request.campaign_id and current.attempt > request.attempt:
            out.reject(
                request,
                RejectionReason.STALE_REQUEST,
                f"attempt {request.attempt} for {request.node_id} is older than the current "
                f"attempt {current.attempt}",
            )
            return
        # A newer attempt (or another campaign's cycle of the node) supersedes the old notices.
        reason = (
            f"superseded by attempt {request.attempt}"
            if current.campaign_id == request.campaign_id
            else f"superseded by campaign {request.campaign_id}"
        )
        _cancel_open(out, current, request.event_id, reason, ctx)
    _open(out, request, request.campaign_id, ctx)


def _unique_vms(vms: Iterable[VmRef]) -> tuple[VmRef, ...]:
    seen: dict[VmId, VmRef] = {}
    for ref in vms:
        seen.setdefault(ref.vm_id, ref)
    return tuple(seen.values())


def _union_actions(
    profiles: Iterable[Sequence[MaintenanceAction]],
) -> tuple[MaintenanceAction, ...]:
    actions: dict[MaintenanceAction, None] = {}
    for allowed in profiles:
        for action in allowed:
            actions.setdefault(action, None)
    return tuple(actions)


def _open(out: _Out, request: BusinessMoveRequested, campaign_id: str, ctx: Context) -> None:
    vms = _unique_vms(request.vms)
    # vnfm -> vnf -> VM ids; dicts keep the request's order.
    grouped: dict[VnfmId, dict[VnfId, list[VmId]]] = {}
    for ref in vms:
        profile = ctx.registry.get(ref.vnf_id) if ref.vnf_id is not None else None
        if profile is None:
            continue  # no VNF, or a VNF nobody registered: only the VIM can handle the VM
        grouped.setdefault(profile.vnfm_id, {}).setdefault(profile.vnf_id, []).append(ref.vm_id)
    record = NodeCollection(
        node_id=request.node_id,
        campaign_id=campaign_id,
        attempt=request.attempt,
        request_id=request.event_id,
        correlation_id=request.correlation_id,
        deadline=request.deadline,
        vms=vms,
    )
    if grouped and ctx.now >= request.deadline:
        _close(out, record, timed_out=True, ctx=ctx)
        return
    notices: list[Notice] = []
    for vnfm_id in sorted(grouped):
        by_vnf = grouped[vnfm_id]
        event_id = notice_event_id(campaign_id, request.node_id, request.attempt, vnfm_id)
        notice = Notice(
            notice_id=str(event_id),
            vnfm_id=vnfm_id,
            vms=tuple(
                VmRef(vm_id=vm, vnf_id=vnf) for vnf, vm_ids in by_vnf.items() for vm in vm_ids
            ),
        )
        notices.append(notice)
        profiles = [ctx.registry.get(vnf_id) for vnf_id in by_vnf]
        out.commands.append(
            VnfMaintenanceNotified(
                **_envelope(record, event_id, request.event_id, ctx),
                notice_id=notice.notice_id,
                vnfm_id=vnfm_id,
                node_id=request.node_id,
                vnfs=tuple(
                    AffectedVnf(vnf_id=vnf_id, vm_ids=tuple(vm_ids))
                    for vnf_id, vm_ids in by_vnf.items()
                ),
                allowed_actions=_union_actions(p.allowed_actions for p in profiles if p),
                reply_deadline=request.deadline,
            )
        )
    record = record.model_copy(update={"notices": tuple(notices)})
    if not notices:
        _close(out, record, timed_out=False, ctx=ctx)
    else:
        out.state = out.state.with_node(record.node_id, record)


def _close(out: _Out, record: NodeCollection, *, timed_out: bool, ctx: Context) -> None:
    """Emit the node's one BusinessMoved and keep the record, closed."""
    answered: dict[VmId, VmBusinessOutcome] = {
        o.vm_id: o for n in record.notices if n.outcomes is not None for o in n.outcomes
    }
    outcomes = tuple(
        answered.get(ref.vm_id)
        or VmBusinessOutcome(
            vm_id=ref.vm_id, vnf_id=ref.vnf_id, outcome=BusinessOutcome.LEFT_FOR_VIM
        )
        for ref in record.vms
    )
    out.commands.append(
        BusinessMoved(
            **_envelope(
                record,
                business_moved_id(record.campaign_id, record.node_id, record.attempt),
                record.request_id,
                ctx,
            ),
            node_id=record.node_id,
            outcomes=outcomes,
            timed_out=timed_out,
        )
    )
    closed = record.model_copy(update={"closed": True, "timed_out": timed_out})
    out.state = out.state.with_node(record.node_id, closed)


def _cancel_open(
    out: _Out, record: NodeCollection, cause: uuid.UUID, reason: str, ctx: Context
) -> None:
    for notice in record.open_notices:
        out.commands.append(
            NoticeCancelled(
                **_envelope(
                    record,
                    command_id(
                        record.campaign_id,
                        record.node_id,
                        "vnfm-notice-cancelled",
                        record.attempt,
                        notice.vnfm_id,
                    ),
                    cause,
                    ctx,
                ),
                notice_id=notice.notice_id,
                vnfm_id=notice.vnfm_id,
                node_id=record.node_id,
                reason=reason,
            )
        )


# --- time ------------------------------------------------------------------------------------


def _expire_due(out: _Out, ctx: Context) -> None:
    for record in list(out.state.nodes.values()):
        if record.closed or ctx.now < record.deadline:
            continue
        for notice in record.open_notices:
            out.commands.append(
                NoticeExpired(
                    **_envelope(
                        record,
                        command_id(
                            record.campaign_id,
                            record.node_id,
                            "vnfm-notice-expired",
                            record.attempt,
                            notice.vnfm_id,
                        ),
                        _notice_uuid(record, notice),
                        ctx,
                    ),
                    notice_id=notice.notice_id,
                    vnfm_id=notice.vnfm_id,
                    node_id=record.node_id,
                )
            )
        _close(out, record, timed_out=True, ctx=ctx)


def _forget_old(out: _Out, ctx: Context) -> None:
    for record in list(out.state.nodes.values()):
        if record.closed and ctx.now >= record.deadline + ctx.closed_retention:
            out.state = out.state.with_node(record.node_id, None)


def next_deadline(state: AdapterState) -> datetime | None:
    """The earliest deadline of an open collection: when the next tick matters."""
    return min((r.deadline for r in state.nodes.values() if not r.closed), default=None)


# --- replies ---------------------------------------------------------------------------------


def _on_reply(out: _Out, reply: VnfBusinessMoved, ctx: Context) -> None:
    found = out.state.find_notice(reply.notice_id)
    if found is None:
        out.reject(reply, RejectionReason.UNKNOWN_NOTICE, f"no open notice {reply.notice_id!r}")
        return
    record, notice = found
    if reply.vnfm_id != notice.vnfm_id:
        out.reject(
            reply,
            RejectionReason.WRONG_VNFM,
            f"notice {notice.notice_id} is for {notice.vnfm_id}, not {reply.vnfm_id}",
        )
        return
    validated = _validated_outcomes(out, reply, notice)
    if validated is None:
        return
    if notice.outcomes is not None:
        same = notice.outcomes == validated
        out.reject(
            reply,
            RejectionReason.DUPLICATE if same else RejectionReason.ALREADY_ANSWERED,
            f"notice {notice.notice_id} was already answered",
        )
        return
    if record.closed:
        out.reject(
            reply,
            RejectionReason.LATE,
            f"notice {notice.notice_id} expired at {record.deadline.isoformat()}",
        )
        return
    answered = notice.model_copy(update={"outcomes": validated})
    record = record.model_copy(
        update={"notices": tuple(answered if n is notice else n for n in record.notices)}
    )
    if all(n.answered for n in record.notices):
        _close(out, record, timed_out=False, ctx=ctx)
    else:
        out.state = out.state.with_node(record.node_id, record)


def _validated_outcomes(
    out: _Out, reply: VnfBusinessMoved, notice: Notice
) -> tuple[VmBusinessOutcome, ...] | None:
    """The reply's outcomes, one per VM of the notice (missing ones `left_for_vim`), or None
    after recording why the reply is refused."""
    expected: Mapping[VmId, VnfId | None] = {ref.vm_id: ref.vnf_id for ref in notice.vms}
    vnfs = set(notice.vnf_ids)
    given: dict[VmId, BusinessOutcome] = {}
    for outcome in reply.outcomes:
        if outcome.vm_id not in expected:
            out.reject(
                reply,
                RejectionReason.FOREIGN_VM,
                f"VM {outcome.vm_id} is not in notice {notice.notice_id}",
            )
            return None
        if outcome.vnf_id is not None and outcome.vnf_id != expected[outcome.vm_id]:
            where = "is not in the notice" if outcome.vnf_id not in vnfs else "does not own the VM"
            out.reject(
                reply,
                RejectionReason.FOREIGN_VNF,
                f"VNF {outcome.vnf_id} {where} (VM {outcome.vm_id}, notice {notice.notice_id})",
            )
            return None
        previous = given.setdefault(outcome.vm_id, outcome.outcome)
        if previous is not outcome.outcome:
            out.reject(
                reply,
                RejectionReason.CONFLICTING_OUTCOMES,
                f"VM {outcome.vm_id} is reported both {previous} and {outcome.outcome}",
            )
            return None
    return tuple(
        VmBusinessOutcome(
            vm_id=ref.vm_id,
            vnf_id=ref.vnf_id,
            outcome=given.get(ref.vm_id, BusinessOutcome.LEFT_FOR_VIM),
        )
        for ref in notice.vms
    )


# --- node available --------------------------------------------------------------------------


def _on_node_available(out: _Out, event: NodeAvailable, ctx: Context) -> None:
    if event.vnfm_id is not None:
        out.reject(
            event, RejectionReason.NOT_INTERNAL, "a NodeAvailable addressed to a VNFM is ours"
        )
        return
    record = out.state.nodes.get(event.node_id)
    by_vnfm: dict[VnfmId, dict[VnfId, None]] = {}
    if record is not None:
        for notice in record.notices:
            for vnf_id in notice.vnf_ids:
                by_vnfm.setdefault(notice.vnfm_id, {})[vnf_id] = None
        # The manager gave up waiting (its backstop) and finished the node: withdraw the notices.
        _cancel_open(out, record, event.event_id, "node available again", ctx)
        out.state = out.state.with_node(event.node_id, None)
    for vnf_id in event.vnf_ids:
        profile = ctx.registry.get(vnf_id)
        if profile is not None:
            by_vnfm.setdefault(profile.vnfm_id, {})[vnf_id] = None
    for vnfm_id in sorted(by_vnfm):
        out.commands.append(
            NodeAvailable(
                **event.caused(
                    event_id=command_id(event.event_id, "vnfm-node-available", vnfm_id),
                    occurred_at=ctx.now,
                    producer=ctx.producer,
                ),
                node_id=event.node_id,
                vnfm_id=vnfm_id,
                vnf_ids=tuple(by_vnfm[vnfm_id]),
            )
        )
