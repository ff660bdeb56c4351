"""The VNFM adapter's decision core: notices, replies, deadlines, duplicates, superseding."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escalator.registry import VnfRegistry
from schemas.envelope import Event
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
    VnfProfile,
    VnfRecovered,
)
from schemas.types import (
    BusinessOutcome,
    MaintenanceAction,
    RedundancyModel,
    VmBusinessOutcome,
    VmRef,
)
from services.vnfm_adapter.domain import (
    AdapterState,
    Context,
    Decision,
    Input,
    NodeCollection,
    RejectionReason,
    Tick,
    VnfRecovery,
    business_moved_id,
    changed_nodes,
    changed_records,
    decide,
    next_deadline,
    notice_event_id,
    state_from_records,
)

pytestmark = pytest.mark.unit

E = TypeVar("E", bound=Event)

T0 = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
DEADLINE = T0 + timedelta(seconds=40)
CAMPAIGN = "cmp-29-1-0-abc"
SO, DR, OWN, MIG = (
    MaintenanceAction.SWITCH_OVER,
    MaintenanceAction.DRAIN,
    MaintenanceAction.OWN_ACTION,
    MaintenanceAction.MIGRATE,
)
SWITCHED, DRAINED, LEFT = (
    BusinessOutcome.SWITCHED_OVER,
    BusinessOutcome.DRAINED,
    BusinessOutcome.LEFT_FOR_VIM,
)


def registry() -> VnfRegistry:
    return VnfRegistry.of(
        [
            VnfProfile(
                vnf_id="vnf-as-1",
                vnfm_id="vnfm-a",
                redundancy=RedundancyModel.ACTIVE_STANDBY,
                members=("vm-1", "vm-2"),
                min_in_service=1,
                max_unavailable=1,
                allowed_actions=(SO, MIG),
            ),
            VnfProfile(
                vnf_id="vnf-lb-1",
                vnfm_id="vnfm-b",
                redundancy=RedundancyModel.LOAD_BALANCED,
                members=("vm-3", "vm-4", "vm-5"),
                min_in_service=2,
                max_unavailable=1,
                allowed_actions=(DR, MIG),
            ),
            VnfProfile(
                vnf_id="vnf-as-2",
                vnfm_id="vnfm-a",
                redundancy=RedundancyModel.ACTIVE_STANDBY,
                members=("vm-6", "vm-7"),
                min_in_service=1,
                max_unavailable=1,
            ),
        ]
    )


REQUEST_VMS = (
    VmRef(vm_id="vm-1", vnf_id="vnf-as-1"),
    VmRef(vm_id="vm-3", vnf_id="vnf-lb-1"),
    VmRef(vm_id="vm-6", vnf_id="vnf-as-2"),
    VmRef(vm_id="vm-9", vnf_id=None),  # no VNF
    VmRef(vm_id="vm-10", vnf_id="vnf-ghost"),  # a VNF nobody registered
)


def request(
    node: str = "node-1",
    attempt: int = 1,
    vms: tuple[VmRef, ...] = REQUEST_VMS,
    deadline: datetime = DEADLINE,
    campaign: str | None = CAMPAIGN,
) -> BusinessMoveRequested:
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{campaign}/{node}/{attempt}")
    return BusinessMoveRequested(
        event_id=event_id,
        campaign_id=campaign,
        node_id=node,
        vms=vms,
        deadline=deadline,
        attempt=attempt,
        occurred_at=T0,
        producer="upgrade-manager",
    )


def ctx(at: datetime = T0, reg: VnfRegistry | None = None) -> Context:
    return Context(now=at, registry=reg if reg is not None else registry())


def of_type(commands: tuple[Event, ...], cls: type[E]) -> list[E]:
    return [c for c in commands if isinstance(c, cls)]


def notices(d: Decision) -> dict[str, VnfMaintenanceNotified]:
    return {n.vnfm_id: n for n in of_type(d.commands, VnfMaintenanceNotified)}


def reply(
    notice: VnfMaintenanceNotified,
    outcomes: dict[str, BusinessOutcome],
    *,
    vnfm_id: str | None = None,
    vnf_ids: dict[str, str | None] | None = None,
) -> VnfBusinessMoved:
    vnf_of = {vm: a.vnf_id for a in notice.vnfs for vm in a.vm_ids}
    vnf_of.update(vnf_ids or {})
    return VnfBusinessMoved(
        **notice.caused(producer="vnfm"),
        notice_id=notice.notice_id,
        vnfm_id=vnfm_id or notice.vnfm_id,
        outcomes=tuple(
            VmBusinessOutcome(vm_id=vm, vnf_id=vnf_of.get(vm), outcome=o)
            for vm, o in outcomes.items()
        ),
    )


def opened() -> Decision:
    return decide(AdapterState(), request(), ctx())


def outcome_map(moved: BusinessMoved) -> dict[str, BusinessOutcome]:
    return {o.vm_id: o.outcome for o in moved.outcomes}


# --- notices ---------------------------------------------------------------------------------


def test_request_notifies_one_vnfm_each_with_its_vnfs_and_vms() -> None:
    d = opened()
    sent = notices(d)
    assert list(sent) == ["vnfm-a", "vnfm-b"]
    a, b = sent["vnfm-a"], sent["vnfm-b"]
    assert [(v.vnf_id, v.vm_ids) for v in a.vnfs] == [
        ("vnf-as-1", ("vm-1",)),
        ("vnf-as-2", ("vm-6",)),
    ]
    assert [(v.vnf_id, v.vm_ids) for v in b.vnfs] == [("vnf-lb-1", ("vm-3",))]
    assert a.node_id == b.node_id == "node-1"
    assert a.reply_deadline == DEADLINE
    # union of the profiles, in order of first preference
    assert a.allowed_actions == (SO, MIG, DR, OWN)
    assert b.allowed_actions == (DR, MIG)
    req = request()
    for n in (a, b):
        assert n.causation_id == req.event_id
        assert n.correlation_id == req.correlation_id
        assert n.campaign_id == CAMPAIGN
        assert n.occurred_at == T0
        assert n.producer == "vnfm-adapter"
    assert of_type(d.commands, BusinessMoved) == []
    record = d.state.nodes["node-1"]
    assert not record.closed and len(record.notices) == 2
    assert next_deadline(d.state) == DEADLINE


def test_notice_ids_are_deterministic_per_campaign_node_attempt_and_vnfm() -> None:
    first, second = opened(), opened()
    assert [c.event_id for c in first.commands] == [c.event_id for c in second.commands]
    a = notices(first)["vnfm-a"]
    assert a.event_id == notice_event_id(CAMPAIGN, "node-1", 1, "vnfm-a")
    assert a.notice_id == str(a.event_id)
    again = decide(AdapterState(), request(attempt=2), ctx())
    assert notices(again)["vnfm-a"].notice_id != a.notice_id


def test_no_vnfm_involved_reports_at_once() -> None:
    vms = (VmRef(vm_id="vm-9"), VmRef(vm_id="vm-10", vnf_id="vnf-ghost"))
    d = decide(AdapterState(), request(vms=vms), ctx())
    [moved] = d.commands
    assert isinstance(moved, BusinessMoved)
    assert outcome_map(moved) == {"vm-9": LEFT, "vm-10": LEFT}
    assert not moved.timed_out
    assert moved.event_id == business_moved_id(CAMPAIGN, "node-1", 1)
    # Nobody was asked: the request itself caused the answer.
    assert moved.causation_id == moved.request_id == request(vms=vms).event_id
    assert d.state.nodes["node-1"].closed


def test_empty_request_reports_empty_outcomes() -> None:
    d = decide(AdapterState(), request(vms=()), ctx())
    [moved] = d.commands
    assert isinstance(moved, BusinessMoved) and moved.outcomes == ()


def test_request_already_past_its_deadline_notifies_nobody() -> None:
    d = decide(AdapterState(), request(), ctx(DEADLINE))
    [moved] = d.commands
    assert isinstance(moved, BusinessMoved) and moved.timed_out
    assert set(outcome_map(moved).values()) == {LEFT}


def test_request_without_campaign_is_rejected() -> None:
    d = decide(AdapterState(), request(campaign=None), ctx())
    assert d.commands == () and d.state == AdapterState()
    assert [r.reason for r in d.rejections] == [RejectionReason.MISSING_CAMPAIGN]


def test_repeated_vms_in_a_request_get_one_outcome() -> None:
    vms = (*REQUEST_VMS, REQUEST_VMS[0], REQUEST_VMS[3])
    d = decide(AdapterState(), request(vms=vms), ctx())
    assert notices(d)["vnfm-a"].vnfs[0].vm_ids == ("vm-1",)
    d = decide(d.state, Tick(), ctx(DEADLINE))
    [moved] = of_type(d.commands, BusinessMoved)
    assert [o.vm_id for o in moved.outcomes] == ["vm-1", "vm-3", "vm-6", "vm-9", "vm-10"]


# --- replies ---------------------------------------------------------------------------------


def test_complete_collection_reports_once_every_vnfm_answered() -> None:
    d = opened()
    sent = notices(d)
    t1 = T0 + timedelta(seconds=5)
    # vm-6 is missing from vnfm-a's reply: it counts as left_for_vim
    d = decide(d.state, reply(sent["vnfm-a"], {"vm-1": SWITCHED}), ctx(t1))
    assert d.commands == () and d.rejections == ()
    assert not d.state.nodes["node-1"].closed
    last = reply(sent["vnfm-b"], {"vm-3": DRAINED})
    d = decide(d.state, last, ctx(t1))
    [moved] = d.commands
    assert isinstance(moved, BusinessMoved)
    assert not moved.timed_out
    assert [(o.vm_id, o.vnf_id, o.outcome) for o in moved.outcomes] == [
        ("vm-1", "vnf-as-1", SWITCHED),
        ("vm-3", "vnf-lb-1", DRAINED),
        ("vm-6", "vnf-as-2", LEFT),
        ("vm-9", None, LEFT),
        ("vm-10", "vnf-ghost", LEFT),
    ]
    req = request()
    assert moved.campaign_id == CAMPAIGN
    # It answers the request, and was caused by the reply that completed it: causation chains
    # show the VNFM round trip it waited for.
    assert moved.request_id == req.event_id
    assert moved.causation_id == last.event_id
    assert moved.correlation_id == req.correlation_id
    assert moved.occurred_at == t1
    assert d.state.nodes["node-1"].closed
    # Answered again for a re-sent request: the very same event, causation included.
    [again] = decide(d.state, req, ctx(t1 + timedelta(seconds=1))).commands
    assert isinstance(again, BusinessMoved)
    assert (again.event_id, again.causation_id, again.request_id) == (
        moved.event_id,
        last.event_id,
        req.event_id,
    )
    # nothing more at the deadline
    assert decide(d.state, Tick(), ctx(DEADLINE)).commands == ()
    assert next_deadline(d.state) is None


def test_reply_without_vnf_ids_is_filled_from_the_notice() -> None:
    d = opened()
    a = notices(d)["vnfm-a"]
    d = decide(d.state, reply(a, {"vm-1": SWITCHED}, vnf_ids={"vm-1": None}), ctx())
    assert d.rejections == ()
    answered = d.state.nodes["node-1"].notices[0].outcomes
    assert answered is not None and answered[0].vnf_id == "vnf-as-1"


def test_deadline_expires_unanswered_notices_and_reports_what_arrived() -> None:
    d = opened()
    sent = notices(d)
    d = decide(d.state, reply(sent["vnfm-b"], {"vm-3": DRAINED}), ctx())
    assert decide(d.state, Tick(), ctx(DEADLINE - timedelta(milliseconds=1))).commands == ()
    d = decide(d.state, Tick(), ctx(DEADLINE))
    [expired] = of_type(d.commands, NoticeExpired)
    assert expired.vnfm_id == "vnfm-a"
    assert expired.notice_id == sent["vnfm-a"].notice_id
    assert expired.causation_id == sent["vnfm-a"].event_id
    assert expired.node_id == "node-1"
    [moved] = of_type(d.commands, BusinessMoved)
    assert moved.timed_out
    # The deadline, not a reply, closed it: the request is its cause.
    assert moved.causation_id == moved.request_id == request().event_id
    assert outcome_map(moved) == {
        "vm-1": LEFT,
        "vm-3": DRAINED,
        "vm-6": LEFT,
        "vm-9": LEFT,
        "vm-10": LEFT,
    }
    # once only
    assert decide(d.state, Tick(), ctx(DEADLINE + timedelta(seconds=1))).commands == ()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda n: VnfBusinessMoved(
                notice_id="n-unknown", vnfm_id=n.vnfm_id, outcomes=(), producer="x"
            ),
            RejectionReason.UNKNOWN_NOTICE,
        ),
        (lambda n: reply(n, {"vm-1": SWITCHED}, vnfm_id="vnfm-b"), RejectionReason.WRONG_VNFM),
        (lambda n: reply(n, {"vm-1": SWITCHED, "vm-2": SWITCHED}), RejectionReason.FOREIGN_VM),
        (
            lambda n: reply(n, {"vm-1": SWITCHED}, vnf_ids={"vm-1": "vnf-lb-1"}),
            RejectionReason.FOREIGN_VNF,
        ),
        (
            lambda n: reply(n, {"vm-1": SWITCHED}, vnf_ids={"vm-1": "vnf-as-2"}),
            RejectionReason.FOREIGN_VNF,
        ),
        (
            lambda n: VnfBusinessMoved(
                **n.caused(),
                notice_id=n.notice_id,
                vnfm_id=n.vnfm_id,
                outcomes=(
                    VmBusinessOutcome(vm_id="vm-1", outcome=SWITCHED),
                    VmBusinessOutcome(vm_id="vm-1", outcome=LEFT),
                ),
            ),
            RejectionReason.CONFLICTING_OUTCOMES,
        ),
    ],
    ids=[
        "unknown-notice",
        "wrong-vnfm",
        "foreign-vm",
        "foreign-vnf",
        "vnf-vm-mismatch",
        "conflict",
    ],
)
def test_invalid_replies_are_rejected_and_change_nothing(make, reason) -> None:  # type: ignore[no-untyped-def]
    d = opened()
    bad = make(notices(d)["vnfm-a"])
    after = decide(d.state, bad, ctx())
    assert after.state == d.state
    [rejection] = after.rejections
    assert rejection.reason is reason
    assert rejection.event_id == bad.event_id
    assert rejection.event_type == "VnfBusinessMoved"
    assert not rejection.reason.harmless and rejection.reason.vendor
    assert rejection.detail
    # the sending VNFM is told, on the notices topic, and nothing else happens
    [told] = after.commands
    assert isinstance(told, VnfmReplyRejected)
    assert told.vnfm_id == bad.vnfm_id and told.notice_id == bad.notice_id
    assert told.rejected_event_id == bad.event_id and told.causation_id == bad.event_id
    assert told.reason == reason.value and told.detail == rejection.detail
    assert told.event_id == decide(d.state, bad, ctx()).commands[0].event_id  # deterministic


def test_late_reply_is_rejected_and_the_deadline_fires_anyway() -> None:
    d = opened()
    a = notices(d)["vnfm-a"]
    # no tick ran between the deadline and the reply: time passes first
    late = decide(d.state, reply(a, {"vm-1": SWITCHED}), ctx(DEADLINE + timedelta(seconds=1)))
    assert [r.reason for r in late.rejections] == [RejectionReason.LATE]
    [moved] = of_type(late.commands, BusinessMoved)
    assert moved.timed_out and outcome_map(moved)["vm-1"] is LEFT
    assert len(of_type(late.commands, NoticeExpired)) == 2
    [told] = of_type(late.commands, VnfmReplyRejected)
    assert told.reason == "late" and told.vnfm_id == "vnfm-a" and "expired at" in told.detail
    # and after the tick closed the collection
    closed = decide(d.state, Tick(), ctx(DEADLINE)).state
    again = decide(closed, reply(a, {"vm-1": SWITCHED}), ctx(DEADLINE))
    assert [c.event_type for c in again.commands] == ["VnfmReplyRejected"]
    assert [r.reason for r in again.rejections] == [RejectionReason.LATE]
    assert again.state == closed


def test_duplicate_reply_is_harmless_and_a_different_second_answer_is_refused() -> None:
    d = opened()
    a = notices(d)["vnfm-a"]
    first = reply(a, {"vm-1": SWITCHED})
    d = decide(d.state, first, ctx())
    dup = decide(d.state, first, ctx())
    assert dup.commands == () and dup.state == d.state
    assert [r.reason for r in dup.rejections] == [RejectionReason.DUPLICATE]
    assert dup.rejections[0].reason.harmless
    other = decide(d.state, reply(a, {"vm-1": LEFT}), ctx())
    assert other.state == d.state
    assert [r.reason for r in other.rejections] == [RejectionReason.ALREADY_ANSWERED]


def test_duplicate_reply_after_the_collection_closed_is_harmless() -> None:
    d = opened()
    sent = notices(d)
    d = decide(d.state, reply(sent["vnfm-a"], {"vm-1": SWITCHED}), ctx())
    last = reply(sent["vnfm-b"], {"vm-3": DRAINED})
    d = decide(d.state, last, ctx())
    dup = decide(d.state, last, ctx())
    assert dup.commands == () and [r.reason for r in dup.rejections] == [RejectionReason.DUPLICATE]


# --- duplicates and attempts -----------------------------------------------------------------


def test_duplicate_request_while_open_emits_nothing_and_once_answered_repeats_the_answer() -> None:
    d = opened()
    for dup in (request(), request().model_copy(update={"event_id": uuid.uuid4()})):
        again = decide(d.state, dup, ctx())
        assert again.commands == () and again.state == d.state
        assert [r.reason for r in again.rejections] == [RejectionReason.DUPLICATE]
    closing = decide(d.state, Tick(), ctx(DEADLINE))
    [answer] = of_type(closing.commands, BusinessMoved)
    # A manager that restarted before recording the answer re-sends its request: it must get
    # the same answer again (same id), or its node would wait for the backstop.
    repeat = decide(closing.state, request(), ctx(DEADLINE + timedelta(seconds=5)))
    [again] = repeat.commands
    assert isinstance(again, BusinessMoved) and again.event_id == answer.event_id
    assert (again.outcomes, again.timed_out) == (answer.outcomes, answer.timed_out)
    assert repeat.state == closing.state


def test_newer_attempt_cancels_the_open_notices_and_notifies_again() -> None:
    d = opened()
    old = notices(d)
    d = decide(d.state, reply(old["vnfm-b"], {"vm-3": DRAINED}), ctx())
    new_deadline = DEADLINE + timedelta(seconds=60)
    second = request(attempt=2, deadline=new_deadline)
    d = decide(d.state, second, ctx(T0 + timedelta(seconds=1)))
    [cancelled] = of_type(d.commands, NoticeCancelled)  # vnfm-b had answered already
    assert cancelled.notice_id == old["vnfm-a"].notice_id
    assert cancelled.vnfm_id == "vnfm-a"
    assert cancelled.causation_id == second.event_id
    assert "attempt 2" in cancelled.reason
    fresh = notices(d)
    assert set(fresh) == {"vnfm-a", "vnfm-b"}
    assert {n.notice_id for n in fresh.values()}.isdisjoint(n.notice_id for n in old.values())
    assert all(n.reply_deadline == new_deadline for n in fresh.values())
    assert of_type(d.commands, BusinessMoved) == []
    record = d.state.nodes["node-1"]
    assert record.attempt == 2 and record.deadline == new_deadline
    # replies to the superseded notices are unknown now
    stale = decide(d.state, reply(old["vnfm-a"], {"vm-1": SWITCHED}), ctx())
    assert [r.reason for r in stale.rejections] == [RejectionReason.UNKNOWN_NOTICE]
    # the older attempt cannot come back
    back = decide(d.state, request(attempt=1), ctx())
    assert back.commands == () and [r.reason for r in back.rejections] == [
        RejectionReason.STALE_REQUEST
    ]


def test_another_campaign_supersedes_a_closed_collection_without_cancelling() -> None:
    closed = decide(opened().state, Tick(), ctx(DEADLINE)).state
    later = DEADLINE + timedelta(seconds=100)
    d = decide(
        closed,
        request(campaign="cmp-next", deadline=later),
        ctx(DEADLINE + timedelta(seconds=1)),
    )
    assert of_type(d.commands, NoticeCancelled) == []
    assert len(notices(d)) == 2
    assert d.state.nodes["node-1"].campaign_id == "cmp-next"


# --- node available --------------------------------------------------------------------------


def node_available(vnf_ids: tuple[str, ...], vnfm_id: str | None = None) -> NodeAvailable:
    return NodeAvailable(
        campaign_id=CAMPAIGN,
        node_id="node-1",
        vnfm_id=vnfm_id,
        vnf_ids=vnf_ids,
        producer="upgrade-manager",
    )


def test_node_available_fans_out_per_vnfm_and_forgets_the_node() -> None:
    closed = decide(opened().state, Tick(), ctx(DEADLINE)).state
    internal = node_available(("vnf-as-1", "vnf-lb-1", "vnf-as-2", "vnf-ghost"))
    d = decide(closed, internal, ctx(DEADLINE))
    out = of_type(d.commands, NodeAvailable)
    assert len(out) == len(d.commands) == 2
    assert [(n.vnfm_id, n.vnf_ids) for n in out] == [
        ("vnfm-a", ("vnf-as-1", "vnf-as-2")),
        ("vnfm-b", ("vnf-lb-1",)),
    ]
    assert all(n.node_id == "node-1" and n.causation_id == internal.event_id for n in out)
    assert "node-1" not in d.state.nodes
    # deterministic, so a redelivery is a recognisable duplicate downstream
    again = decide(closed, internal, ctx(DEADLINE))
    assert [c.event_id for c in again.commands] == [c.event_id for c in d.commands]


def test_node_available_without_a_record_uses_the_registry() -> None:
    d = decide(AdapterState(), node_available(("vnf-lb-1",)), ctx())
    [only] = d.commands
    assert isinstance(only, NodeAvailable) and only.vnfm_id == "vnfm-b"


def test_node_available_while_collecting_cancels_the_open_notices() -> None:
    d = opened()
    d = decide(d.state, node_available(()), ctx())
    assert {c.vnfm_id for c in of_type(d.commands, NoticeCancelled)} == {"vnfm-a", "vnfm-b"}
    assert {c.vnfm_id for c in of_type(d.commands, NodeAvailable)} == {"vnfm-a", "vnfm-b"}
    assert of_type(d.commands, BusinessMoved) == []
    assert d.state == AdapterState()


def test_node_available_addressed_to_a_vnfm_is_not_ours() -> None:
    d = decide(AdapterState(), node_available(("vnf-as-1",), vnfm_id="vnfm-a"), ctx())
    assert d.commands == () and [r.reason for r in d.rejections] == [RejectionReason.NOT_INTERNAL]


# --- state -----------------------------------------------------------------------------------


def test_records_round_trip_through_json_and_only_changes_are_written() -> None:
    d = opened()
    record = d.state.nodes["node-1"]
    assert NodeCollection.model_validate_json(record.model_dump_json()) == record
    assert changed_nodes(AdapterState(), d.state) == {"node-1": record}
    answered = decide(d.state, reply(notices(d)["vnfm-a"], {"vm-1": SWITCHED}), ctx())
    assert changed_nodes(d.state, answered.state).keys() == {"node-1"}
    assert changed_nodes(d.state, decide(d.state, Tick(), ctx()).state) == {}
    forgotten = decide(answered.state, node_available(()), ctx())
    assert changed_nodes(answered.state, forgotten.state) == {"node-1": None}


def test_closed_records_are_forgotten_after_the_retention() -> None:
    closed = decide(opened().state, Tick(), ctx(DEADLINE)).state
    c = ctx(DEADLINE)
    assert decide(closed, Tick(), ctx(DEADLINE + c.closed_retention - timedelta(seconds=1))).state
    assert decide(closed, Tick(), ctx(DEADLINE + c.closed_retention)).state == AdapterState()


# --- property --------------------------------------------------------------------------------

VNFMS = ("vnfm-a", "vnfm-b", "vnfm-c")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[VnfRegistry, dict[str, tuple[VmRef, ...]], list[tuple]]:  # type: ignore[type-arg]
    vm_count = draw(st.integers(min_value=1, max_value=12))
    vms = [f"vm-{i}" for i in range(vm_count)]
    # each VM: no VNF, an unregistered VNF, or one of up to 4 registered VNFs
    owner = [draw(st.sampled_from(["none", "ghost", "v0", "v1", "v2", "v3"])) for _ in vms]
    profiles = []
    for vnf in ("v0", "v1", "v2", "v3"):
        members = tuple(vm for vm, o in zip(vms, owner, strict=True) if o == vnf)
        if members:
            profiles.append(
                VnfProfile(
                    vnf_id=vnf,
                    vnfm_id=draw(st.sampled_from(VNFMS)),
                    redundancy=RedundancyModel.LOAD_BALANCED,
                    members=members,
                    min_in_service=0,
                    max_unavailable=1,
                    min_recovery_s=draw(st.sampled_from([0.0, 0.0, 5.0, 20.0])),
                    recovery_signal=draw(st.booleans()),
                )
            )
    refs = [
        VmRef(vm_id=vm, vnf_id=None if o == "none" else ("vnf-ghost" if o == "ghost" else o))
        for vm, o in zip(vms, owner, strict=True)
    ]
    nodes: dict[str, tuple[VmRef, ...]] = {}
    for node in ("node-1", "node-2", "node-3"):
        taken = draw(st.lists(st.sampled_from(refs), max_size=6)) if refs else []
        nodes[node] = tuple(taken)  # repeats on purpose: the adapter dedupes
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(
                    st.just("request"),
                    st.sampled_from(sorted(nodes)),
                    st.integers(min_value=1, max_value=3),
                    st.integers(min_value=0, max_value=30),
                    st.sampled_from([None, 0, 20, 60]),
                ),
                st.tuples(
                    st.just("reply"),
                    st.integers(min_value=0, max_value=50),
                    st.lists(st.sampled_from(list(BusinessOutcome)), max_size=8),
                    st.integers(min_value=0, max_value=9).map(lambda n: n == 0),
                ),
                st.tuples(st.just("refuse"), st.integers(min_value=0, max_value=50)),
                st.tuples(
                    st.just("heartbeat"),
                    st.integers(min_value=0, max_value=50),
                    st.sampled_from([1.0, 10.0, 100.0]),
                ),
                st.tuples(st.just("available"), st.sampled_from(sorted(nodes))),
                st.tuples(st.just("recovered"), st.sampled_from(["v0", "v1", "v2", "v3"])),
                st.tuples(st.just("tick"), st.integers(min_value=0, max_value=20)),
                st.tuples(st.just("again"), st.integers(min_value=0, max_value=50)),
            ),
            max_size=40,
        )
    )
    return VnfRegistry.of(profiles), nodes, steps


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_one_business_moved_per_node_attempt_with_one_outcome_per_vm(
    scenario: tuple[VnfRegistry, dict[str, tuple[VmRef, ...]], list[tuple]],  # type: ignore[type-arg]
) -> None:
    reg, nodes, steps = scenario
    state = AdapterState()
    now = T0
    fed: list[Input] = []
    sent_notices: list[VnfMaintenanceNotified] = []
    emitted: list[Event] = []
    requested: dict[tuple[str, int], set[str]] = {}
    latest_request: dict[str, tuple[int, int]] = {}  # node -> (attempt, index in fed)
    available_at: dict[str, int] = {}
    told: dict[uuid.UUID, datetime] = {}

    def feed(event: Input) -> None:
        nonlocal state
        d = decide(state, event, Context(now=now, registry=reg))
        state = d.state
        fed.append(event)
        emitted.extend(d.commands)
        sent_notices.extend(of_type(d.commands, VnfMaintenanceNotified))
        # the state always survives a JSON round trip (it is what gets persisted)
        for record in state.nodes.values():
            assert NodeCollection.model_validate_json(record.model_dump_json()) == record
        for recovery in state.recovering.values():
            assert VnfRecovery.model_validate_json(recovery.model_dump_json()) == recovery
        # no notice reaches a VNF that is still recovering from a previous impact
        for notice in of_type(d.commands, VnfMaintenanceNotified):
            for affected in notice.vnfs:
                assert not state.is_recovering(affected.vnf_id, now), affected.vnf_id
        # the manager's deadline only ever moves later
        for ext in of_type(d.commands, BusinessMoveDeadlineExtended):
            assert ext.causation_id is not None
            previous = told.get(ext.causation_id)
            assert previous is None or ext.deadline > previous or ext.event_id in seen_ids
            told[ext.causation_id] = max(ext.deadline, previous or ext.deadline)
        # a vendor is told about every wrong input, and only about vendor inputs
        rejected = {c.rejected_event_id for c in of_type(d.commands, VnfmReplyRejected)}
        assert rejected == {r.event_id for r in d.rejections if r.reason.vendor}
        seen_ids.update(c.event_id for c in d.commands)

    seen_ids: set[uuid.UUID] = set()
    for step in steps:
        match step:
            case ("request", node, attempt, lead, hard) if not (
                attempt <= latest_request.get(node, (0, 0))[0]
                and available_at.get(node, -1) > latest_request[node][1]
            ):
                # (after a node's NodeAvailable, the manager's next request for it always has
                # a higher attempt: the same attempt again would be a stale redelivery)
                req = request(
                    node=node,
                    attempt=attempt,
                    vms=nodes[node],
                    deadline=now + timedelta(seconds=lead),
                ).model_copy(
                    update={
                        "occurred_at": now,
                        "hard_deadline": None
                        if hard is None
                        else now + timedelta(seconds=lead + hard),
                    }
                )
                requested[(node, attempt)] = {ref.vm_id for ref in nodes[node]}
                if attempt > latest_request.get(node, (0, 0))[0]:
                    latest_request[node] = (attempt, len(fed))
                feed(req)
            case ("reply", index, outcomes, wrong_vnfm) if sent_notices:
                # mostly the latest notices: older ones are often superseded or closed
                notice = sent_notices[-1 - index % len(sent_notices)]
                vms = [vm for a in notice.vnfs for vm in a.vm_ids]
                given_outcomes = dict(zip(vms, outcomes, strict=False))
                feed(
                    reply(
                        notice,
                        given_outcomes,
                        vnfm_id="vnfm-z" if wrong_vnfm else None,
                    )
                )
            case ("refuse", index) if sent_notices:
                feed(refused(sent_notices[-1 - index % len(sent_notices)]))
            case ("heartbeat", index, extend_by) if sent_notices:
                notice = sent_notices[-1 - index % len(sent_notices)]
                feed(heartbeat(notice, extend_by, len(fed)))
            case ("available", node):
                available_at[node] = len(fed)
                vnf_ids = tuple(r.vnf_id for r in nodes[node] if r.vnf_id is not None)
                feed(
                    NodeAvailable(
                        campaign_id=CAMPAIGN,
                        node_id=node,
                        vnf_ids=tuple(dict.fromkeys(vnf_ids)),
                        producer="upgrade-manager",
                    )
                )
            case ("recovered", vnf_id) if reg.get(vnf_id) is not None:
                profile = reg.get(vnf_id)
                assert profile is not None
                feed(recovered(vnf_id, profile.vnfm_id))
            case ("tick", seconds):
                now += timedelta(seconds=seconds)
                feed(Tick())
            case ("again", index) if fed:
                position = index % len(fed)
                again = fed[position]
                if isinstance(again, NodeAvailable):
                    available_at[again.node_id] = len(fed)
                if (
                    isinstance(again, BusinessMoveRequested)
                    and available_at.get(again.node_id, -1) > position
                ):
                    continue  # requests and NodeAvailable share a node-keyed topic: never reordered
                feed(again)
            case _:
                pass
    # every hold ends at its cap at the latest (here: at most 90 s after its request)
    now += timedelta(seconds=120)
    feed(Tick())

    moved = of_type(tuple(emitted), BusinessMoved)
    key_of = {
        business_moved_id(CAMPAIGN, node, attempt): (node, attempt) for node, attempt in requested
    }
    # one answer per (node, attempt): repeats (to re-sent requests) carry the same id and content
    per_attempt = Counter(key_of[m.event_id] for m in {m.event_id: m for m in moved}.values())
    assert all(count == 1 for count in per_attempt.values()), per_attempt
    first: dict[uuid.UUID, BusinessMoved] = {}
    for m in moved:
        seen = first.setdefault(m.event_id, m)
        assert (m.outcomes, m.timed_out, m.refusals) == (
            seen.outcomes,
            seen.timed_out,
            seen.refusals,
        )
    # the latest attempt of every requested node is reported, unless the node was made
    # available again before its collection ended (the manager gave up on it)
    for node, (latest, index) in latest_request.items():
        if (node, latest) not in per_attempt:
            assert available_at.get(node, -1) > index, (node, latest)
    for m in moved:
        vm_ids = [o.vm_id for o in m.outcomes]
        assert len(vm_ids) == len(set(vm_ids))
        assert set(vm_ids) == requested[key_of[m.event_id]]


# --- refusal ---------------------------------------------------------------------------------


def refused(notice: VnfMaintenanceNotified, why: str = "surge on vnf-as-1") -> BusinessMoveRefused:
    return BusinessMoveRefused(
        **notice.caused(producer="vnfm"),
        notice_id=notice.notice_id,
        vnfm_id=notice.vnfm_id,
        reason=why,
    )


def test_refusal_ends_the_collection_cancels_the_others_and_reports_once() -> None:
    d = opened()
    sent = notices(d)
    no = refused(sent["vnfm-a"])
    d = decide(d.state, no, ctx(T0 + timedelta(seconds=3)))
    [cancelled] = of_type(d.commands, NoticeCancelled)
    assert cancelled.vnfm_id == "vnfm-b" and cancelled.causation_id == no.event_id
    assert "vnfm-a refused (surge on vnf-as-1)" in cancelled.reason
    [moved] = of_type(d.commands, BusinessMoved)
    assert [(r.vnfm_id, r.vnf_ids, r.reason) for r in moved.refusals] == [
        ("vnfm-a", ("vnf-as-1", "vnf-as-2"), "surge on vnf-as-1")
    ]
    assert not moved.timed_out and set(outcome_map(moved).values()) == {LEFT}
    assert moved.event_id == business_moved_id(CAMPAIGN, "node-1", 1)
    assert moved.causation_id == no.event_id and moved.request_id == request().event_id
    record = d.state.nodes["node-1"]
    assert record.closed and record.refused
    # the same refusal again: harmless; the other VNFM's answer now: late, and it is told so
    again = decide(d.state, no, ctx())
    assert again.commands == () and [r.reason for r in again.rejections] == [
        RejectionReason.DUPLICATE
    ]
    late = decide(d.state, reply(sent["vnfm-b"], {"vm-3": DRAINED}), ctx())
    [told] = late.commands
    assert isinstance(told, VnfmReplyRejected) and told.reason == "late"
    assert "another VNFM refused" in told.detail
    assert decide(d.state, Tick(), ctx(DEADLINE)).commands == ()


def test_refusal_keeps_what_other_vnfms_already_answered() -> None:
    d = opened()
    sent = notices(d)
    d = decide(d.state, reply(sent["vnfm-b"], {"vm-3": DRAINED}), ctx())
    d = decide(d.state, refused(sent["vnfm-a"]), ctx())
    assert of_type(d.commands, NoticeCancelled) == []  # vnfm-b had answered
    [moved] = of_type(d.commands, BusinessMoved)
    assert outcome_map(moved)["vm-3"] is DRAINED and moved.refusals


def test_refusal_of_an_answered_expired_or_unknown_notice_is_rejected() -> None:
    d = opened()
    a = notices(d)["vnfm-a"]
    answered = decide(d.state, reply(a, {"vm-1": SWITCHED}), ctx()).state
    r = decide(answered, refused(a), ctx())
    assert [x.reason for x in r.rejections] == [RejectionReason.ALREADY_ANSWERED]
    assert r.state == answered and [c.event_type for c in r.commands] == ["VnfmReplyRejected"]
    expired = decide(d.state, Tick(), ctx(DEADLINE)).state
    r = decide(expired, refused(a), ctx(DEADLINE))
    assert [x.reason for x in r.rejections] == [RejectionReason.LATE]
    wrong = refused(a).model_copy(update={"vnfm_id": "vnfm-b"})
    r = decide(d.state, wrong, ctx())
    assert [x.reason for x in r.rejections] == [RejectionReason.WRONG_VNFM]
    [told] = r.commands
    assert isinstance(told, VnfmReplyRejected) and told.vnfm_id == "vnfm-b"


# --- heartbeats ------------------------------------------------------------------------------

HARD = T0 + timedelta(seconds=100)


def hb_request(
    hard: datetime | None = HARD, extension_max_s: float = 30.0
) -> BusinessMoveRequested:
    return request().model_copy(update={"hard_deadline": hard, "extension_max_s": extension_max_s})


def heartbeat(
    notice: VnfMaintenanceNotified, extend_by_s: float, n: int = 0
) -> MaintenanceDeadlineExtended:
    return MaintenanceDeadlineExtended(
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"hb/{notice.notice_id}/{n}"),
        notice_id=notice.notice_id,
        vnfm_id=notice.vnfm_id,
        extend_by_s=extend_by_s,
        reason="standby resync",
        producer="vnfm",
    )


def test_heartbeat_extends_only_its_notice_capped_per_beat_and_tells_the_manager() -> None:
    d = decide(AdapterState(), hb_request(), ctx())
    sent = notices(d)
    beat = heartbeat(sent["vnfm-a"], 60)
    d = decide(d.state, beat, ctx(T0 + timedelta(seconds=35)))
    [ext] = d.commands
    assert isinstance(ext, BusinessMoveDeadlineExtended)
    assert ext.deadline == T0 + timedelta(seconds=65)  # 35 + min(60, 30)
    assert ext.node_id == "node-1" and ext.campaign_id == CAMPAIGN
    assert ext.causation_id == hb_request().event_id
    assert "vnfm-a: standby resync" in ext.reason
    assert next_deadline(d.state) == DEADLINE  # vnfm-b's notice still ends at 40
    # the same heartbeat redelivered: nothing more
    assert decide(d.state, beat, ctx(T0 + timedelta(seconds=36))).commands == ()
    # at 40 vnfm-b's notice expires, but the node waits for vnfm-a
    d = decide(d.state, Tick(), ctx(DEADLINE))
    assert [(c.event_type, getattr(c, "vnfm_id", None)) for c in d.commands] == [
        ("NoticeExpired", "vnfm-b")
    ]
    late_b = decide(d.state, reply(sent["vnfm-b"], {"vm-3": DRAINED}), ctx(DEADLINE))
    assert [r.reason for r in late_b.rejections] == [RejectionReason.LATE]
    d = decide(d.state, reply(sent["vnfm-a"], {"vm-1": SWITCHED}), ctx(T0 + timedelta(seconds=60)))
    [moved] = d.commands
    assert isinstance(moved, BusinessMoved) and moved.timed_out  # vnfm-b never answered
    assert outcome_map(moved)["vm-1"] is SWITCHED and outcome_map(moved)["vm-3"] is LEFT


def test_heartbeats_stop_at_the_hard_deadline_then_the_notice_expires() -> None:
    d = decide(AdapterState(), hb_request(), ctx())
    sent = notices(d)
    d = decide(d.state, reply(sent["vnfm-b"], {"vm-3": DRAINED}), ctx())
    deadlines = []
    for i, at in enumerate((30, 55, 80, 95)):
        d = decide(d.state, heartbeat(sent["vnfm-a"], 30, i), ctx(T0 + timedelta(seconds=at)))
        deadlines += [c.deadline for c in of_type(d.commands, BusinessMoveDeadlineExtended)]
    assert deadlines == [T0 + timedelta(seconds=s) for s in (60, 85, 100)]  # 95+30 capped
    d = decide(d.state, heartbeat(sent["vnfm-a"], 30, 9), ctx(T0 + timedelta(seconds=96)))
    [told] = d.commands
    assert isinstance(told, VnfmReplyRejected) and told.reason == "hard_deadline_reached"
    d = decide(d.state, Tick(), ctx(HARD))
    assert [c.event_type for c in d.commands] == ["NoticeExpired", "BusinessMoved"]
    assert of_type(d.commands, BusinessMoved)[0].timed_out


def test_heartbeat_without_a_hard_deadline_or_asking_less_changes_nothing() -> None:
    d = decide(AdapterState(), hb_request(hard=None), ctx())
    a = notices(d)["vnfm-a"]
    r = decide(d.state, heartbeat(a, 30), ctx())
    assert [x.reason for x in r.rejections] == [RejectionReason.NO_EXTENSION]
    assert r.state == d.state and [c.event_type for c in r.commands] == ["VnfmReplyRejected"]
    d = decide(AdapterState(), hb_request(), ctx())
    a = notices(d)["vnfm-a"]
    r = decide(d.state, heartbeat(a, 5), ctx(T0 + timedelta(seconds=1)))  # 6 s < 40 s
    assert r.commands == () and r.rejections == () and r.state == d.state
    answered = decide(d.state, reply(a, {"vm-1": SWITCHED}), ctx()).state
    r = decide(answered, heartbeat(a, 30), ctx())
    assert [x.reason for x in r.rejections] == [RejectionReason.ALREADY_ANSWERED]


# --- recovery --------------------------------------------------------------------------------

AS1 = ("vnf-as-1",)


def recovery_registry(*, signal: bool = False, min_recovery_s: float = 0.0) -> VnfRegistry:
    reg = registry()
    profile = reg.get("vnf-as-1")
    assert profile is not None
    reg.put(
        profile.model_copy(update={"recovery_signal": signal, "min_recovery_s": min_recovery_s})
    )
    return reg


def later_request(at: datetime, lead_s: float = 40.0) -> BusinessMoveRequested:
    """node-2 carries vm-2 (vnf-as-1's other member) and vm-4 (vnf-lb-1)."""
    return BusinessMoveRequested(
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"node-2/{at.isoformat()}"),
        campaign_id=CAMPAIGN,
        node_id="node-2",
        vms=(VmRef(vm_id="vm-2", vnf_id="vnf-as-1"), VmRef(vm_id="vm-4", vnf_id="vnf-lb-1")),
        deadline=at + timedelta(seconds=lead_s),
        hard_deadline=at + timedelta(seconds=300),
        occurred_at=at,
        producer="upgrade-manager",
    )


def recovered(vnf_id: str = "vnf-as-1", vnfm_id: str = "vnfm-a") -> VnfRecovered:
    return VnfRecovered(vnfm_id=vnfm_id, vnf_id=vnf_id, producer="vnfm")


def test_timed_recovery_holds_the_next_notice_and_counts_its_deadline_from_the_send() -> None:
    reg = recovery_registry(min_recovery_s=10)
    d = decide(AdapterState(), node_available(AS1), ctx(T0, reg))
    assert d.state.recovering["vnf-as-1"].until == T0 + timedelta(seconds=10)
    t2 = T0 + timedelta(seconds=2)
    req = later_request(t2)
    d = decide(d.state, req, ctx(t2, reg))
    # vnfm-b's notice goes out; vnfm-a's waits; the manager learns the expected deadline
    assert list(notices(d)) == ["vnfm-b"]
    [ext] = of_type(d.commands, BusinessMoveDeadlineExtended)
    assert ext.deadline == T0 + timedelta(seconds=10 + 40) and ext.causation_id == req.event_id
    assert "vnf-as-1 recovering from a previous impact" in ext.reason
    assert next_deadline(d.state) == T0 + timedelta(seconds=10)
    assert decide(d.state, Tick(), ctx(T0 + timedelta(seconds=9.9), reg)).commands == ()
    d = decide(d.state, Tick(), ctx(T0 + timedelta(seconds=10), reg))
    [sent_a] = d.commands  # nothing new to tell the manager: it was told 50 already
    assert isinstance(sent_a, VnfMaintenanceNotified) and sent_a.vnfm_id == "vnfm-a"
    assert sent_a.reply_deadline == T0 + timedelta(seconds=50)
    assert sent_a.occurred_at == T0 + timedelta(seconds=10)
    assert "vnf-as-1" not in d.state.recovering
    d = decide(d.state, reply(sent_a, {"vm-2": SWITCHED}), ctx(T0 + timedelta(seconds=45), reg))
    assert [c.event_type for c in d.commands] == ["NoticeExpired", "BusinessMoved"]  # b at 42


def test_signal_recovery_waits_for_vnf_recovered_from_the_right_vnfm() -> None:
    reg = recovery_registry(signal=True, min_recovery_s=1)
    d = decide(AdapterState(), node_available(AS1), ctx(T0, reg))
    t2 = T0 + timedelta(seconds=2)
    d = decide(d.state, later_request(t2), ctx(t2, reg))
    [ext] = of_type(d.commands, BusinessMoveDeadlineExtended)
    assert ext.deadline == t2 + timedelta(seconds=300)  # the hold's cap: its hard deadline
    # min_recovery_s does not apply to a VNF that signals
    assert list(notices(decide(d.state, Tick(), ctx(T0 + timedelta(seconds=30), reg)))) == []
    for bad, reason in (
        (recovered(vnfm_id="vnfm-b"), "wrong_vnfm"),
        (recovered("vnf-nope"), "unknown_vnf"),
    ):
        r = decide(d.state, bad, ctx(t2, reg))
        [told] = r.commands
        assert isinstance(told, VnfmReplyRejected) and told.reason == reason
        assert told.notice_id is None and r.state == d.state
    t5 = T0 + timedelta(seconds=5)
    d = decide(d.state, recovered(), ctx(t5, reg))
    [sent_a] = d.commands
    assert isinstance(sent_a, VnfMaintenanceNotified) and sent_a.vnfm_id == "vnfm-a"
    assert sent_a.reply_deadline == t5 + timedelta(seconds=40)
    # the hard deadline moved by as much as the notice waited
    notice = d.state.nodes["node-2"].notice(sent_a.notice_id)
    assert notice is not None and notice.hard_deadline == t5 + timedelta(seconds=300)
    again = decide(d.state, recovered(), ctx(t5, reg))
    assert again.commands == () and [r.reason for r in again.rejections] == [
        RejectionReason.NOT_RECOVERING
    ]


def test_a_vnf_that_never_recovers_is_given_up_at_the_hard_deadline() -> None:
    reg = recovery_registry(signal=True)
    d = decide(AdapterState(), node_available(AS1), ctx(T0, reg))
    req = later_request(T0)
    d = decide(d.state, req, ctx(T0, reg))
    b = notices(d)["vnfm-b"]
    d = decide(d.state, reply(b, {"vm-4": DRAINED}), ctx(T0, reg))
    assert of_type(d.commands, BusinessMoved) == []
    assert req.hard_deadline is not None
    assert (
        decide(d.state, Tick(), ctx(req.hard_deadline - timedelta(seconds=1), reg)).commands == ()
    )
    d = decide(d.state, Tick(), ctx(req.hard_deadline, reg))
    [moved] = d.commands  # the notice was never sent: nothing to expire at vnfm-a
    assert isinstance(moved, BusinessMoved) and moved.timed_out
    assert outcome_map(moved) == {"vm-2": LEFT, "vm-4": DRAINED}


def test_recovery_records_are_persisted_restarted_once_and_forgotten() -> None:
    reg = recovery_registry(min_recovery_s=10)
    available = node_available(AS1)
    d = decide(AdapterState(), available, ctx(T0, reg))
    changes = changed_records(AdapterState(), d.state)
    record = d.state.recovering["vnf-as-1"]
    assert changes == {"vnf/vnf-as-1": record}
    assert VnfRecovery.model_validate_json(record.model_dump_json()) == record
    assert state_from_records([record]) == d.state
    # a redelivered NodeAvailable does not restart the clock
    again = decide(d.state, available, ctx(T0 + timedelta(seconds=5), reg))
    assert again.state.recovering["vnf-as-1"] is record
    ended = decide(d.state, Tick(), ctx(T0 + timedelta(seconds=10), reg))
    assert changed_records(d.state, ended.state) == {"vnf/vnf-as-1": None}
    # a VNF without recovery time or signal never waits
    plain = decide(AdapterState(), node_available(AS1), ctx(T0))
    assert plain.state.recovering == {}


def test_version_1_records_still_load() -> None:
    v1 = {
        "record_version": 1,
        "node_id": "node-1",
        "campaign_id": CAMPAIGN,
        "attempt": 1,
        "request_id": str(uuid.uuid4()),
        "correlation_id": None,
        "deadline": DEADLINE.isoformat(),
        "vms": [{"vm_id": "vm-1", "vnf_id": "vnf-as-1"}],
        "notices": [
            {
                "notice_id": "n-1",
                "vnfm_id": "vnfm-a",
                "vms": [{"vm_id": "vm-1", "vnf_id": "vnf-as-1"}],
                "outcomes": None,
            }
        ],
        "closed": False,
        "timed_out": False,
    }
    record = NodeCollection.model_validate(v1)
    state = state_from_records([record])
    assert next_deadline(state) == DEADLINE
    d = decide(state, Tick(), ctx(DEADLINE))
    assert [c.event_type for c in d.commands] == ["NoticeExpired", "BusinessMoved"]


def test_a_vnf_is_never_notified_on_more_nodes_at_once_than_its_budget() -> None:
    # node-1 and node-2 each carry a member of vnf-as-1 (max_unavailable 1): with nodes in
    # maintenance in parallel, the second notice waits until the first node is back.
    first = request(node="node-1", vms=(VmRef(vm_id="vm-1", vnf_id="vnf-as-1"),))
    second = request(node="node-2", vms=(VmRef(vm_id="vm-2", vnf_id="vnf-as-1"),)).model_copy(
        update={
            "occurred_at": T0 + timedelta(seconds=1),
            "hard_deadline": T0 + timedelta(seconds=300),
        }
    )
    d = decide(AdapterState(), first, ctx())
    [to_first] = notices(d).values()
    d = decide(d.state, second, ctx(T0 + timedelta(seconds=1)))
    assert notices(d) == {}
    [ext] = of_type(d.commands, BusinessMoveDeadlineExtended)
    assert "vnf-as-1 already impacted on node-1 (at most 1 at once)" in ext.reason
    # answering node-1's notice does not release node-2: node-1 is still in maintenance
    d = decide(d.state, reply(to_first, {"vm-1": SWITCHED}), ctx(T0 + timedelta(seconds=2)))
    assert notices(d) == {}
    d = decide(d.state, Tick(), ctx(T0 + timedelta(seconds=2)))
    assert notices(d) == {}
    # node-1 is back: vnf-as-1 may be impacted again (min_recovery_s is 0 here)
    d = decide(d.state, node_available(("vnf-as-1",)), ctx(T0 + timedelta(seconds=3)))
    d = decide(d.state, Tick(), ctx(T0 + timedelta(seconds=3)))
    [sent] = notices(d).values()
    assert sent.node_id == "node-2" and sent.vnfs[0].vm_ids == ("vm-2",)


def test_a_vnf_with_a_larger_budget_is_notified_on_several_nodes_at_once() -> None:
    wide = VnfRegistry.of(
        [
            VnfProfile(
                vnf_id="vnf-lb-1",
                vnfm_id="vnfm-b",
                redundancy=RedundancyModel.LOAD_BALANCED,
                members=("vm-3", "vm-4", "vm-5"),
                min_in_service=1,
                max_unavailable=2,
            )
        ]
    )
    d = AdapterState()
    for i, (node, vm) in enumerate([("node-1", "vm-3"), ("node-2", "vm-4"), ("node-3", "vm-5")]):
        req = request(node=node, vms=(VmRef(vm_id=vm, vnf_id="vnf-lb-1"),)).model_copy(
            update={"occurred_at": T0 + timedelta(seconds=i)}
        )
        step = decide(d, req, ctx(T0 + timedelta(seconds=i), wide))
        d = step.state
        assert bool(notices(step)) == (i < 2), node
