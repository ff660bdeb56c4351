"""The VNFM adapter's pure decision core: `decide(state, input, ctx) -> Decision`.

The adapter is the VIM side of the VNFM contract. For a `BusinessMoveRequested` it sends one
`VnfMaintenanceNotified` per VNFM owning VMs on the node, collects the vendors' answers
(validating each against its notice), and reports one `BusinessMoved` per node and attempt: when
every notice was answered, at the first refusal, or once every notice has expired or been answered.

No I/O, no clock reads: `ctx.now` is the only time, `ctx.registry` the only VNF knowledge. Time
passes before the input applies: every call first releases notices whose VNFs have recovered and
expires what is due, so a reply processed after its deadline is late even if no tick ran between.

The handshake (anchors: Fenix ACK/NACK, AWS lifecycle-hook heartbeats, ETSI recovery time):

* **Replies** (`VnfBusinessMoved`): per VM, what the VNFM did.
* **Refusal** (`BusinessMoveRefused`): the node's collection ends at once. The other VNFMs' open
  notices are withdrawn (`NoticeCancelled`), and ONE `BusinessMoved` goes to the manager with
  `refusals` set; its outcomes are what arrived so far, every other VM `left_for_vim` (one per VM,
  as always, so a manager whose deferrals are exhausted can apply its timeout policy on it).
* **Heartbeat** (`MaintenanceDeadlineExtended`): that notice's deadline becomes
  `max(current, now + min(extend_by_s, request.extension_max_s))`, never beyond the request's
  `hard_deadline`; a request without one allows no extension. Each notice has its own deadline:
  one VNFM's heartbeat does not keep another VNFM's notice open. When the node's latest deadline
  moves, `BusinessMoveDeadlineExtended` tells the manager, whose backstop follows it.
* **Recovery** (ETSI `minRecoveryTimeBetweenImpacts`): a `NodeAvailable` starts the recovery of
  every VNF that had VMs on the node: until its VNFM's `VnfRecovered` if its profile has
  `recovery_signal`, else for `min_recovery_s`. A later request touching a recovering VNF *holds*
  the notice of that VNF's VNFM (notices are per VNFM, so the VNFM's other VNFs on that node wait
  with it) until every VNF of the notice has recovered; it is then sent with its reply deadline
  counted from then (the request's window `deadline - occurred_at`, and the hard deadline shifted
  by as much). A hold lasts at most until the request's `hard_deadline` (its `deadline` without
  one); a VNF that has not recovered by then counts as a VNFM that did not answer (its VMs
  `left_for_vim`, `timed_out`), so the campaign's timeout policy applies. Meanwhile the node is in
  maintenance, which is safe. The manager is told the expected deadline at once.
* **Rejections**: a vendor input that is wrong (unknown or unsent notice, wrong VNFM, a VM or VNF
  not in the notice, conflicting outcomes, an answer to an answered notice, late, an extension that
  is not allowed or already at its cap, a `VnfRecovered` for an unknown VNF or from another VNFM)
  changes nothing and is answered with `VnfmReplyRejected` to the sending VNFM on the notices
  topic, reason and readable detail. A `Rejection` is also returned, for logging; the service
  does not dead-letter vendor rejections (the sender is told, and a looping vendor must not flood
  the operators' dead-letter topic). Redelivered duplicates are harmless and answered with
  nothing. Internal inputs that are wrong (a request without campaign, a stale attempt) are only
  `Rejection`s: the service dead-letters those, as before.

State is one small frozen record per node (`NodeCollection`) and one per recovering VNF
(`VnfRecovery`), JSON-serialisable, so the service persists each changed record to a compacted
topic (keys: the node id, and `vnf/<vnf id>`) and rebuilds after a crash. A closed collection is
kept until the node's `NodeAvailable` (or a newer request for the node, or `CLOSED_RETENTION`
after its deadline): it absorbs duplicate requests and turns late replies into a precise
rejection instead of "unknown notice". At most one record per node ever exists.

Ids are deterministic (`command_id` of campaign, node, attempt, VNFM, ...), so re-processing an
input after a crash (the service publishes, then persists, then commits) re-emits identical events
that receivers recognise as duplicates.

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
* The manager's deadline only ever moves later (`BusinessMoveDeadlineExtended` carries the node's
  latest possible decision time), so its backstop never fires while the adapter still waits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import AwareDatetime, Field

from escalator.registry import VnfRegistry
from schemas.envelope import Event, command_id
from schemas.events import (
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    BusinessMoveRefused,
    BusinessMoveRequested,
    MaintenanceDeadlineExtended,
    NodeAvailable,
    NoticeCancelled,
    NoticeExpired,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfmReplyRejected,
    VnfRecovered,
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
    VnfmRefusal,
)

PRODUCER = "vnfm-adapter"
# A closed collection no NodeAvailable ever came for (campaign aborted, node skipped) is forgotten
# this long after its deadline; long enough that no redelivery of its request can still arrive.
# A VNF waiting for a VnfRecovered that never comes is forgotten as long after its NodeAvailable.
CLOSED_RETENTION = timedelta(days=1)
# Version of the persisted record shape; bump with a migration when it changes incompatibly.
# Version 2 only added fields with defaults: version 1 records read as they are.
RECORD_VERSION = 2
# Key prefix of the recovery records in the state topic (node ids cannot contain "/").
VNF_KEY_PREFIX = "vnf/"


def _clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S.%fZ")[:-4] + "Z"


# --- state -----------------------------------------------------------------------------------


class Notice(ValueModel):
    """One `VnfMaintenanceNotified` to one VNFM (sent, or held for recovery), and its answer."""

    notice_id: str
    vnfm_id: VnfmId
    vms: tuple[VmRef, ...] = Field(description="VMs of the notice, each with its VNF.")
    outcomes: tuple[VmBusinessOutcome, ...] | None = Field(
        default=None, description="One per VM of the notice once answered; None while open."
    )
    held: bool = Field(default=False, description="Not sent yet: a VNF of it is recovering.")
    sent_at: AwareDatetime | None = None
    deadline: AwareDatetime | None = Field(
        default=None, description="Reply deadline once sent; None: the collection's (v1 records)."
    )
    hard_deadline: AwareDatetime | None = Field(
        default=None, description="No extension beyond this; None: no extensions."
    )
    refusal: str | None = Field(default=None, description="The VNFM's reason, if it refused.")
    expired: bool = Field(default=False, description="Its deadline (or its hold's cap) passed.")
    last_heartbeat: uuid.UUID | None = Field(
        default=None, description="event_id of the latest applied heartbeat (redeliveries)."
    )

    @property
    def answered(self) -> bool:
        return self.outcomes is not None

    @property
    def refused(self) -> bool:
        return self.refusal is not None

    @property
    def done(self) -> bool:
        return self.answered or self.refused or self.expired

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
    deadline: AwareDatetime = Field(description="The request's deadline.")
    vms: tuple[VmRef, ...] = Field(description="The requested VMs, without repeats, in order.")
    notices: tuple[Notice, ...] = ()
    closed: bool = Field(default=False, description="BusinessMoved was emitted.")
    timed_out: bool = False
    refused: bool = False
    completed_by: uuid.UUID | None = Field(
        default=None,
        description="The input that completed the collection (the BusinessMoved's causation); "
        "None: the request itself.",
    )
    requested_at: AwareDatetime | None = Field(
        default=None, description="occurred_at of the request: its reply window starts there."
    )
    extension_max_s: float = 60.0
    hard_deadline: AwareDatetime | None = None
    announced: AwareDatetime | None = Field(
        default=None,
        description="The latest deadline told to the manager (BusinessMoveDeadlineExtended).",
    )

    def notice(self, notice_id: str) -> Notice | None:
        return next((n for n in self.notices if n.notice_id == notice_id), None)

    def deadline_of(self, notice: Notice) -> datetime:
        return notice.deadline if notice.deadline is not None else self.deadline

    @property
    def open_notices(self) -> tuple[Notice, ...]:
        """Sent and still waiting for an answer."""
        if self.closed:
            return ()
        return tuple(n for n in self.notices if not n.held and not n.done)

    @property
    def held_notices(self) -> tuple[Notice, ...]:
        return () if self.closed else tuple(n for n in self.notices if n.held and not n.done)

    @property
    def window(self) -> timedelta:
        """How long the request gave the VNFMs; a held notice gets as long once it is sent."""
        if self.requested_at is None:
            return timedelta(0)
        return max(timedelta(0), self.deadline - self.requested_at)

    @property
    def hold_cap(self) -> datetime:
        """A held notice whose VNFs have not recovered by then is given up."""
        return self.hard_deadline or self.deadline


class VnfRecovery(ValueModel):
    """A VNF recovering from an impact: the next impact waits until it has recovered."""

    record_version: int = RECORD_VERSION
    vnf_id: VnfId
    vnfm_id: VnfmId
    node_id: NodeId = Field(description="The node whose NodeAvailable started the recovery.")
    campaign_id: CampaignId | None = None
    since: AwareDatetime
    signal: bool = Field(description="True: until VnfRecovered; False: until `until`.")
    until: AwareDatetime | None = Field(default=None, description="End of a timed recovery.")
    cause: uuid.UUID = Field(description="event_id of the NodeAvailable that started it.")

    def recovering(self, now: datetime) -> bool:
        return self.signal or (self.until is not None and now < self.until)


class AdapterState(ValueModel):
    """Every node's collection and every recovering VNF. Records a decision did not touch stay
    the same objects."""

    nodes: dict[NodeId, NodeCollection] = Field(default_factory=dict)
    recovering: dict[VnfId, VnfRecovery] = Field(default_factory=dict)

    def with_node(self, node_id: str, record: NodeCollection | None) -> AdapterState:
        nodes = dict(self.nodes)
        if record is None:
            nodes.pop(node_id, None)
        else:
            nodes[node_id] = record
        return AdapterState(nodes=nodes, recovering=self.recovering)

    def with_recovery(self, vnf_id: str, record: VnfRecovery | None) -> AdapterState:
        recovering = dict(self.recovering)
        if record is None:
            recovering.pop(vnf_id, None)
        else:
            recovering[vnf_id] = record
        return AdapterState(nodes=self.nodes, recovering=recovering)

    def find_notice(self, notice_id: str) -> tuple[NodeCollection, Notice] | None:
        # A linear scan: only nodes in their notification step or just after have records.
        for record in self.nodes.values():
            notice = record.notice(notice_id)
            if notice is not None:
                return record, notice
        return None

    def is_recovering(self, vnf_id: str, now: datetime) -> bool:
        record = self.recovering.get(vnf_id)
        return record is not None and record.recovering(now)

    def impacting(self, vnf_id: str, record: NodeCollection) -> list[str]:
        """Nodes requested before `record`'s node, still in maintenance, holding VMs of the VNF.

        Only earlier requests count, so holds follow request order and can never wait on each
        other in a cycle.
        """
        mine = _request_order(record)
        return [
            other.node_id
            for other in self.nodes.values()
            if other.node_id != record.node_id
            and _request_order(other) < mine
            and any(vm.vnf_id == vnf_id for vm in other.vms)
        ]

    def hold_reasons(
        self, vnf_ids: Iterable[str], record: NodeCollection, registry: VnfRegistry, now: datetime
    ) -> list[str]:
        """Why a notice about these VNFs may not be sent yet (empty: it may)."""
        reasons: list[str] = []
        for vnf_id in vnf_ids:
            if self.is_recovering(vnf_id, now):
                reasons.append(f"{vnf_id} recovering from a previous impact")
                continue
            profile = registry.get(vnf_id)
            budget = profile.max_unavailable if profile is not None else 1
            others = self.impacting(vnf_id, record)
            if len(others) >= budget:
                reasons.append(
                    f"{vnf_id} already impacted on {', '.join(sorted(others))} "
                    f"(at most {budget} at once)"
                )
        return reasons

    def release_at(self, notice: Notice, owner: NodeCollection, now: datetime) -> datetime | None:
        """When a held notice's VNFs will all have recovered: None if one waits for a signal
        (or for another node to leave maintenance)."""
        latest = now
        if any(self.impacting(v, owner) for v in notice.vnf_ids):
            return None
        for vnf_id in notice.vnf_ids:
            record = self.recovering.get(vnf_id)
            if record is None or not record.recovering(now):
                continue
            if record.signal or record.until is None:
                return None
            latest = max(latest, record.until)
        return latest


StateRecord = NodeCollection | VnfRecovery


def _request_order(record: NodeCollection) -> tuple[datetime, str]:
    return (record.requested_at or datetime.min.replace(tzinfo=UTC), record.node_id)


def record_key(record: StateRecord) -> str:
    """Key of a record in the state topic: the node id, or `vnf/<vnf id>`."""
    if isinstance(record, VnfRecovery):
        return VNF_KEY_PREFIX + record.vnf_id
    return record.node_id


def state_from_records(records: Iterable[StateRecord]) -> AdapterState:
    nodes: dict[str, NodeCollection] = {}
    recovering: dict[str, VnfRecovery] = {}
    for record in records:
        if isinstance(record, VnfRecovery):
            recovering[record.vnf_id] = record
        else:
            nodes[record.node_id] = record
    return AdapterState(nodes=nodes, recovering=recovering)


def changed_nodes(before: AdapterState, after: AdapterState) -> dict[NodeId, NodeCollection | None]:
    """The node records to write back (None: a tombstone), so that only changes are persisted."""
    changed: dict[NodeId, NodeCollection | None] = {}
    for node_id, record in after.nodes.items():
        if before.nodes.get(node_id) is not record and before.nodes.get(node_id) != record:
            changed[node_id] = record
    for node_id in before.nodes.keys() - after.nodes.keys():
        changed[node_id] = None
    return changed


def changed_records(before: AdapterState, after: AdapterState) -> dict[str, StateRecord | None]:
    """Every record to write back, by state-topic key (None: a tombstone)."""
    changed: dict[str, StateRecord | None] = dict(changed_nodes(before, after))
    for vnf_id, recovery in after.recovering.items():
        previous = before.recovering.get(vnf_id)
        if previous is not recovery and previous != recovery:
            changed[VNF_KEY_PREFIX + vnf_id] = recovery
    for vnf_id in before.recovering.keys() - after.recovering.keys():
        changed[VNF_KEY_PREFIX + vnf_id] = None
    return changed


# --- inputs, context, decision ---------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed (the service's ~100 ms ticker): expire what is due at `ctx.now`."""


VendorInput = VnfBusinessMoved | BusinessMoveRefused | MaintenanceDeadlineExtended | VnfRecovered
NoticeReply = VnfBusinessMoved | BusinessMoveRefused | MaintenanceDeadlineExtended
Input = BusinessMoveRequested | NodeAvailable | VendorInput | Tick


@dataclass(frozen=True)
class Context:
    now: datetime
    registry: VnfRegistry
    producer: str = PRODUCER
    closed_retention: timedelta = CLOSED_RETENTION


class RejectionReason(StrEnum):
    # request side (internal: dead-lettered by the service)
    MISSING_CAMPAIGN = "missing_campaign"
    STALE_REQUEST = "stale_request"
    NOT_INTERNAL = "not_internal"
    # vendor side (answered with VnfmReplyRejected)
    UNKNOWN_NOTICE = "unknown_notice"
    WRONG_VNFM = "wrong_vnfm"
    FOREIGN_VM = "foreign_vm"
    FOREIGN_VNF = "foreign_vnf"
    CONFLICTING_OUTCOMES = "conflicting_outcomes"
    LATE = "late"
    ALREADY_ANSWERED = "already_answered"
    NO_EXTENSION = "no_extension"
    HARD_DEADLINE = "hard_deadline_reached"
    UNKNOWN_VNF = "unknown_vnf"
    # nothing to do, nothing wrong: a redelivered input, or a VnfRecovered nobody waits for
    DUPLICATE = "duplicate"
    NOT_RECOVERING = "not_recovering"

    @property
    def harmless(self) -> bool:
        """True for inputs that are only logged: neither dead-lettered nor answered."""
        return self in (RejectionReason.DUPLICATE, RejectionReason.NOT_RECOVERING)

    @property
    def vendor(self) -> bool:
        """True for a wrong vendor input: the VNFM gets a VnfmReplyRejected."""
        return not self.harmless and self not in _INTERNAL_REASONS


_INTERNAL_REASONS = frozenset(
    {
        RejectionReason.MISSING_CAMPAIGN,
        RejectionReason.STALE_REQUEST,
        RejectionReason.NOT_INTERNAL,
    }
)


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
    ctx: Context
    commands: list[Event] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, event: Event, reason: RejectionReason, detail: str) -> None:
        self.rejections.append(Rejection(reason, detail, event.event_id, event.event_type))

    def reject_vendor(
        self,
        event: VendorInput,
        reason: RejectionReason,
        detail: str,
        campaign_id: str | None = None,
    ) -> None:
        """Refuse a vendor input and, unless harmless, tell its VNFM why."""
        self.reject(event, reason, detail)
        if not reason.vendor:
            return
        envelope = event.caused(
            event_id=rejection_event_id(event.event_id),
            occurred_at=self.ctx.now,
            producer=self.ctx.producer,
        )
        if campaign_id is not None:
            envelope["campaign_id"] = campaign_id
        self.commands.append(
            VnfmReplyRejected(
                **envelope,
                vnfm_id=event.vnfm_id,
                notice_id=getattr(event, "notice_id", None),
                rejected_event_id=event.event_id,
                reason=reason.value,
                detail=detail[:2000],
            )
        )

    def decision(self) -> Decision:
        return Decision(self.state, tuple(self.commands), tuple(self.rejections))


# --- ids -------------------------------------------------------------------------------------


def notice_event_id(campaign_id: str, node_id: str, attempt: int, vnfm_id: str) -> uuid.UUID:
    """Id of the notice event; its string is also the `notice_id` vendors quote."""
    return command_id(campaign_id, node_id, "vnfm-notice", attempt, vnfm_id)


def business_moved_id(campaign_id: str, node_id: str, attempt: int) -> uuid.UUID:
    return command_id(campaign_id, node_id, "business-moved", attempt)


def deadline_extended_id(
    campaign_id: str, node_id: str, attempt: int, deadline: datetime
) -> uuid.UUID:
    return command_id(campaign_id, node_id, "vnfm-deadline-extended", attempt, deadline.isoformat())


def rejection_event_id(rejected: uuid.UUID) -> uuid.UUID:
    return command_id("vnfm-reply-rejected", rejected)


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
    out = _Out(state, ctx)
    _advance(out, ctx)
    match event:
        case Tick():
            _forget_old(out, ctx)
        case BusinessMoveRequested():
            _on_request(out, event, ctx)
        case VnfBusinessMoved():
            _on_reply(out, event, ctx)
        case BusinessMoveRefused():
            _on_refusal(out, event, ctx)
        case MaintenanceDeadlineExtended():
            _on_heartbeat(out, event, ctx)
        case VnfRecovered():
            _on_recovered(out, event, ctx)
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
        if (current.request_id == request.event_id or same) and current.closed:
            # The manager re-sent a request we already answered: it may have lost the answer
            # (it restarted before recording it), so answer again, with the same id.
            cause = current.completed_by or current.request_id
            out.commands.append(_business_moved(current, ctx, current.timed_out, cause))
            return
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
    hard = request.hard_deadline
    record = NodeCollection(
        node_id=request.node_id,
        campaign_id=campaign_id,
        attempt=request.attempt,
        request_id=request.event_id,
        correlation_id=request.correlation_id,
        deadline=request.deadline,
        vms=vms,
        requested_at=request.occurred_at,
        extension_max_s=request.extension_max_s,
        hard_deadline=None if hard is None else max(hard, request.deadline),
    )
    if grouped and ctx.now >= request.deadline:
        _close(out, record, ctx, timed_out=True)
        return
    notices: list[Notice] = []
    held: list[Notice] = []
    for vnfm_id in sorted(grouped):
        by_vnf = grouped[vnfm_id]
        notice = Notice(
            notice_id=str(notice_event_id(campaign_id, request.node_id, request.attempt, vnfm_id)),
            vnfm_id=vnfm_id,
            vms=tuple(
                VmRef(vm_id=vm, vnf_id=vnf) for vnf, vm_ids in by_vnf.items() for vm in vm_ids
            ),
        )
        if out.state.hold_reasons(by_vnf, record, ctx.registry, ctx.now):
            notice = notice.model_copy(update={"held": True})
            held.append(notice)
        else:
            notice = _send(out, record, notice, request.deadline, record.hard_deadline, ctx)
        notices.append(notice)
    record = record.model_copy(update={"notices": tuple(notices)})
    if not notices:
        _close(out, record, ctx, timed_out=False)
        return
    if held:
        waits = "; ".join(
            f"notice to {n.vnfm_id} held: "
            f"{'; '.join(out.state.hold_reasons(n.vnf_ids, record, ctx.registry, ctx.now))}"
            for n in held
        )
        record = _announce(out, record, waits, ctx)
    out.state = out.state.with_node(record.node_id, record)


def _send(
    out: _Out,
    record: NodeCollection,
    notice: Notice,
    deadline: datetime,
    hard_deadline: datetime | None,
    ctx: Context,
) -> Notice:
    """Emit the notice now, with its reply deadline; returns it as sent."""
    by_vnf: dict[VnfId, list[VmId]] = {}
    for ref in notice.vms:
        if ref.vnf_id is not None:
            by_vnf.setdefault(ref.vnf_id, []).append(ref.vm_id)
    profiles = [ctx.registry.get(vnf_id) for vnf_id in by_vnf]
    out.commands.append(
        VnfMaintenanceNotified(
            **_envelope(record, _notice_uuid(record, notice), record.request_id, ctx),
            notice_id=notice.notice_id,
            vnfm_id=notice.vnfm_id,
            node_id=record.node_id,
            vnfs=tuple(
                AffectedVnf(vnf_id=vnf_id, vm_ids=tuple(vm_ids))
                for vnf_id, vm_ids in by_vnf.items()
            ),
            allowed_actions=_union_actions(p.allowed_actions for p in profiles if p),
            reply_deadline=deadline,
        )
    )
    return notice.model_copy(
        update={
            "held": False,
            "sent_at": ctx.now,
            "deadline": deadline,
            "hard_deadline": None if hard_deadline is None else max(hard_deadline, deadline),
        }
    )


def _close(
    out: _Out,
    record: NodeCollection,
    ctx: Context,
    *,
    timed_out: bool | None = None,
    completed_by: uuid.UUID | None = None,
) -> None:
    """Emit the node's one BusinessMoved and keep the record, closed. `completed_by` is the
    vendor input that completed the collection (its causation); without one (no VNFM to ask,
    a deadline) the request itself caused it."""
    if timed_out is None:
        timed_out = any(n.expired for n in record.notices)
    moved = _business_moved(record, ctx, timed_out, completed_by or record.request_id)
    out.commands.append(moved)
    closed = record.model_copy(
        update={
            "closed": True,
            "timed_out": timed_out,
            "refused": bool(moved.refusals),
            "completed_by": completed_by,
        }
    )
    out.state = out.state.with_node(record.node_id, closed)


def _business_moved(
    record: NodeCollection, ctx: Context, timed_out: bool, cause: uuid.UUID
) -> BusinessMoved:
    """The node's BusinessMoved, always with the same id, so that a repeat is a duplicate. It
    names the request it answers in `request_id`; its causation is what completed it (the last
    reply, so that causation chains show the VNFM round trip the answer waited for)."""
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
    refusals = tuple(
        VnfmRefusal(vnfm_id=n.vnfm_id, vnf_ids=n.vnf_ids, reason=n.refusal)
        for n in record.notices
        if n.refusal is not None
    )
    return BusinessMoved(
        **_envelope(
            record,
            business_moved_id(record.campaign_id, record.node_id, record.attempt),
            cause,
            ctx,
        ),
        node_id=record.node_id,
        request_id=record.request_id,
        outcomes=outcomes,
        timed_out=timed_out,
        refusals=refusals,
    )


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
                reason=reason[:2000],
            )
        )


# --- deadlines told to the manager -----------------------------------------------------------


def latest_deadline(state: AdapterState, record: NodeCollection, now: datetime) -> datetime:
    """The latest moment the adapter may still decide about the node, as far as it knows now:
    the deadlines of its open notices, and for a held notice the deadline it gets once sent (a
    notice waiting for a VnfRecovered: its hold's cap, when it is given up at the latest)."""
    latest = record.deadline
    for notice in record.notices:
        if notice.done or record.closed:
            continue
        if not notice.held:
            latest = max(latest, record.deadline_of(notice))
            continue
        release = state.release_at(notice, record, now)
        if release is None or release >= record.hold_cap:
            latest = max(latest, record.hold_cap)
        else:
            latest = max(latest, release + record.window)
    return latest


def _announce(out: _Out, record: NodeCollection, reason: str, ctx: Context) -> NodeCollection:
    """Tell the manager when the node's latest deadline moved later than it was last told."""
    latest = latest_deadline(out.state, record, ctx.now)
    told = record.announced if record.announced is not None else record.deadline
    if latest <= told:
        return record
    out.commands.append(
        BusinessMoveDeadlineExtended(
            **_envelope(
                record,
                deadline_extended_id(record.campaign_id, record.node_id, record.attempt, latest),
                record.request_id,
                ctx,
            ),
            node_id=record.node_id,
            deadline=latest,
            reason=reason[:2000],
        )
    )
    return record.model_copy(update={"announced": latest})


# --- time ------------------------------------------------------------------------------------


def _advance(out: _Out, ctx: Context) -> None:
    """Everything due at `ctx.now`: timed recoveries end, held notices whose VNFs recovered are
    sent (or given up at their cap), notices past their deadline expire, collections close."""
    now = ctx.now
    for vnf_id, recovery in list(out.state.recovering.items()):
        if not recovery.signal and (recovery.until is None or now >= recovery.until):
            out.state = out.state.with_recovery(vnf_id, None)
    for record in list(out.state.nodes.values()):
        if record.closed:
            continue
        notices: list[Notice] = []
        released: list[Notice] = []
        for notice in record.notices:
            if notice.done:
                pass
            elif notice.held and now >= record.hold_cap:
                notice = notice.model_copy(update={"expired": True})
            elif notice.held and not out.state.hold_reasons(
                notice.vnf_ids, record, ctx.registry, now
            ):
                deadline = max(record.deadline, now + record.window)
                hard = record.hard_deadline
                if hard is not None and record.requested_at is not None:
                    hard = max(hard, now + (hard - record.requested_at))
                notice = _send(out, record, notice, deadline, hard, ctx)
                released.append(notice)
            if not notice.done and not notice.held and now >= record.deadline_of(notice):
                out.commands.append(_expired(record, notice, ctx))
                notice = notice.model_copy(update={"expired": True})
            notices.append(notice)
        updated = record.model_copy(update={"notices": tuple(notices)})
        if updated == record:
            continue
        if all(n.done for n in updated.notices):
            _close(out, updated, ctx)
            continue
        if released:
            reason = "; ".join(
                f"{', '.join(n.vnf_ids)} recovered: notice to {n.vnfm_id} sent, reply by "
                f"{_clock(updated.deadline_of(n))}"
                for n in released
            )
            updated = _announce(out, updated, reason, ctx)
        out.state = out.state.with_node(record.node_id, updated)


def _expired(record: NodeCollection, notice: Notice, ctx: Context) -> NoticeExpired:
    return NoticeExpired(
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


def _forget_old(out: _Out, ctx: Context) -> None:
    for record in list(out.state.nodes.values()):
        last = max([record.deadline, *(n.deadline for n in record.notices if n.deadline)])
        if record.closed and ctx.now >= last + ctx.closed_retention:
            out.state = out.state.with_node(record.node_id, None)
    for vnf_id, recovery in list(out.state.recovering.items()):
        if ctx.now >= recovery.since + ctx.closed_retention:
            out.state = out.state.with_recovery(vnf_id, None)


def next_deadline(state: AdapterState) -> datetime | None:
    """The earliest moment a tick has something to do: a notice's deadline, a hold's cap, the
    end of a timed recovery."""
    moments: list[datetime] = []
    for record in state.nodes.values():
        for notice in record.open_notices:
            moments.append(record.deadline_of(notice))
        if record.held_notices:
            moments.append(record.hold_cap)
    moments.extend(
        r.until for r in state.recovering.values() if not r.signal and r.until is not None
    )
    return min(moments, default=None)


# --- vendor replies --------------------------------------------------------------------------


def _notice_for(out: _Out, reply: NoticeReply) -> tuple[NodeCollection, Notice] | None:
    """The notice a reply names, or None after rejecting it (unknown, unsent, wrong VNFM)."""
    found = out.state.find_notice(reply.notice_id)
    if found is None or found[1].held:
        out.reject_vendor(
            reply,
            RejectionReason.UNKNOWN_NOTICE,
            f"no notice {reply.notice_id!r} was sent (or it was superseded or withdrawn)",
        )
        return None
    record, notice = found
    if reply.vnfm_id != notice.vnfm_id:
        out.reject_vendor(
            reply,
            RejectionReason.WRONG_VNFM,
            f"notice {notice.notice_id} is for {notice.vnfm_id}, not {reply.vnfm_id}",
            record.campaign_id,
        )
        return None
    return record, notice


def _late_detail(record: NodeCollection, notice: Notice, ctx: Context) -> str:
    if notice.expired:
        return (
            f"notice {notice.notice_id} expired at {_clock(record.deadline_of(notice))}; "
            f"this arrived at {_clock(ctx.now)} and the VIM has taken over"
        )
    why = "another VNFM refused" if record.refused else "it was decided"
    return (
        f"the collection of {record.node_id} ended before this arrived ({why}); "
        f"notice {notice.notice_id} is closed"
    )


def _replace(record: NodeCollection, old: Notice, new: Notice) -> NodeCollection:
    return record.model_copy(
        update={"notices": tuple(new if n is old else n for n in record.notices)}
    )


def _on_reply(out: _Out, reply: VnfBusinessMoved, ctx: Context) -> None:
    found = _notice_for(out, reply)
    if found is None:
        return
    record, notice = found
    validated = _validated_outcomes(out, reply, notice, record.campaign_id)
    if validated is None:
        return
    if notice.outcomes is not None:
        same = notice.outcomes == validated
        out.reject_vendor(
            reply,
            RejectionReason.DUPLICATE if same else RejectionReason.ALREADY_ANSWERED,
            f"notice {notice.notice_id} was already answered",
            record.campaign_id,
        )
        return
    if notice.refused:
        out.reject_vendor(
            reply,
            RejectionReason.ALREADY_ANSWERED,
            f"notice {notice.notice_id} was refused ({notice.refusal})",
            record.campaign_id,
        )
        return
    if record.closed or notice.expired:
        out.reject_vendor(
            reply, RejectionReason.LATE, _late_detail(record, notice, ctx), record.campaign_id
        )
        return
    record = _replace(record, notice, notice.model_copy(update={"outcomes": validated}))
    if all(n.done for n in record.notices):
        _close(out, record, ctx, completed_by=reply.event_id)
    else:
        out.state = out.state.with_node(record.node_id, record)


def _validated_outcomes(
    out: _Out, reply: VnfBusinessMoved, notice: Notice, campaign_id: str
) -> tuple[VmBusinessOutcome, ...] | None:
    """The reply's outcomes, one per VM of the notice (missing ones `left_for_vim`), or None
    after recording why the reply is refused."""
    expected: Mapping[VmId, VnfId | None] = {ref.vm_id: ref.vnf_id for ref in notice.vms}
    vnfs = set(notice.vnf_ids)
    given: dict[VmId, BusinessOutcome] = {}
    for outcome in reply.outcomes:
        if outcome.vm_id not in expected:
            out.reject_vendor(
                reply,
                RejectionReason.FOREIGN_VM,
                f"VM {outcome.vm_id} is not in notice {notice.notice_id} "
                f"(its VMs: {', '.join(expected)})",
                campaign_id,
            )
            return None
        if outcome.vnf_id is not None and outcome.vnf_id != expected[outcome.vm_id]:
            where = "is not in the notice" if outcome.vnf_id not in vnfs else "does not own the VM"
            out.reject_vendor(
                reply,
                RejectionReason.FOREIGN_VNF,
                f"VNF {outcome.vnf_id} {where} (VM {outcome.vm_id}, notice {notice.notice_id})",
                campaign_id,
            )
            return None
        previous = given.setdefault(outcome.vm_id, outcome.outcome)
        if previous is not outcome.outcome:
            out.reject_vendor(
                reply,
                RejectionReason.CONFLICTING_OUTCOMES,
                f"VM {outcome.vm_id} is reported both {previous} and {outcome.outcome}",
                campaign_id,
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


def _on_refusal(out: _Out, refusal: BusinessMoveRefused, ctx: Context) -> None:
    found = _notice_for(out, refusal)
    if found is None:
        return
    record, notice = found
    if notice.refusal == refusal.reason:
        out.reject_vendor(
            refusal,
            RejectionReason.DUPLICATE,
            f"notice {notice.notice_id} was already refused",
            record.campaign_id,
        )
        return
    if notice.answered or notice.refused:
        out.reject_vendor(
            refusal,
            RejectionReason.ALREADY_ANSWERED,
            f"notice {notice.notice_id} was already "
            + ("answered" if notice.answered else f"refused ({notice.refusal})"),
            record.campaign_id,
        )
        return
    if record.closed or notice.expired:
        out.reject_vendor(
            refusal, RejectionReason.LATE, _late_detail(record, notice, ctx), record.campaign_id
        )
        return
    record = _replace(record, notice, notice.model_copy(update={"refusal": refusal.reason}))
    # The node is deferred: the other VNFMs need not move anything for it now.
    _cancel_open(
        out,
        record,
        refusal.event_id,
        f"{notice.vnfm_id} refused ({refusal.reason}); the node is deferred",
        ctx,
    )
    _close(out, record, ctx, completed_by=refusal.event_id)


def _on_heartbeat(out: _Out, beat: MaintenanceDeadlineExtended, ctx: Context) -> None:
    found = _notice_for(out, beat)
    if found is None:
        return
    record, notice = found
    campaign = record.campaign_id
    if notice.last_heartbeat == beat.event_id:
        out.reject_vendor(beat, RejectionReason.DUPLICATE, "heartbeat already applied", campaign)
        return
    if notice.answered or notice.refused:
        out.reject_vendor(
            beat,
            RejectionReason.ALREADY_ANSWERED,
            f"notice {notice.notice_id} was already answered; nothing to extend",
            campaign,
        )
        return
    if record.closed or notice.expired:
        out.reject_vendor(beat, RejectionReason.LATE, _late_detail(record, notice, ctx), campaign)
        return
    if notice.hard_deadline is None:
        out.reject_vendor(
            beat,
            RejectionReason.NO_EXTENSION,
            f"notice {notice.notice_id} allows no extension (its request has no hard deadline); "
            f"reply by {_clock(record.deadline_of(notice))}",
            campaign,
        )
        return
    current = record.deadline_of(notice)
    wanted = ctx.now + timedelta(seconds=min(beat.extend_by_s, record.extension_max_s))
    extended = min(max(current, wanted), notice.hard_deadline)
    if extended <= current:
        if current >= notice.hard_deadline:
            out.reject_vendor(
                beat,
                RejectionReason.HARD_DEADLINE,
                f"notice {notice.notice_id} is at its hard deadline "
                f"{_clock(notice.hard_deadline)}: no further extension",
                campaign,
            )
        return  # the deadline is already later than asked: nothing to do, nothing wrong
    updated = notice.model_copy(update={"deadline": extended, "last_heartbeat": beat.event_id})
    record = _replace(record, notice, updated)
    capped = " (capped by the hard deadline)" if extended == notice.hard_deadline else ""
    why = f"{notice.vnfm_id}: {beat.reason or 'heartbeat'}; reply by {_clock(extended)}{capped}"
    record = _announce(out, record, why, ctx)
    out.state = out.state.with_node(record.node_id, record)


# --- recovery --------------------------------------------------------------------------------


def _on_recovered(out: _Out, event: VnfRecovered, ctx: Context) -> None:
    profile = ctx.registry.get(event.vnf_id)
    if profile is None:
        out.reject_vendor(
            event, RejectionReason.UNKNOWN_VNF, f"VNF {event.vnf_id} is not in the VNF registry"
        )
        return
    if profile.vnfm_id != event.vnfm_id:
        out.reject_vendor(
            event,
            RejectionReason.WRONG_VNFM,
            f"VNF {event.vnf_id} is managed by {profile.vnfm_id}, not {event.vnfm_id}",
        )
        return
    recovery = out.state.recovering.get(event.vnf_id)
    if recovery is None or not recovery.signal:
        why = (
            "is not recovering"
            if recovery is None
            else "recovers by time (min_recovery_s): no VnfRecovered is awaited"
        )
        out.reject_vendor(event, RejectionReason.NOT_RECOVERING, f"VNF {event.vnf_id} {why}")
        return
    out.state = out.state.with_recovery(event.vnf_id, None)
    _advance(out, ctx)  # send what waited for it


def _start_recovery(out: _Out, event: NodeAvailable, vnf_ids: Iterable[str], ctx: Context) -> None:
    for vnf_id in vnf_ids:
        profile = ctx.registry.get(vnf_id)
        if profile is None or not (profile.recovery_signal or profile.min_recovery_s > 0):
            continue
        current = out.state.recovering.get(vnf_id)
        if current is not None and current.cause == event.event_id:
            continue  # a redelivered NodeAvailable does not restart the recovery
        signal = profile.recovery_signal
        out.state = out.state.with_recovery(
            vnf_id,
            VnfRecovery(
                vnf_id=vnf_id,
                vnfm_id=profile.vnfm_id,
                node_id=event.node_id,
                campaign_id=event.campaign_id,
                since=ctx.now,
                signal=signal,
                until=None if signal else _later(ctx.now, profile.min_recovery_s),
                cause=event.event_id,
            ),
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
    _start_recovery(out, event, (v for vnfs in by_vnfm.values() for v in vnfs), ctx)
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


def _later(now: datetime, seconds: float) -> datetime:
    """now + seconds, saturated: a registry value beyond what datetimes hold waits "for ever"
    rather than failing every NodeAvailable of its VNF (the schema bounds it; old records may
    not)."""
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=now.tzinfo)
