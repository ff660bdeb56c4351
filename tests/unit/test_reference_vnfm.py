"""The reference VNFM's pure decisions, and its driver against an in-memory fake world."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from escalator.world.client import WorldError
from escalator.world.model import MemberSync, VnfAction, VnfActionResult, VnfView
from schemas.events import (
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    NodeAvailable,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfRecovered,
)
from schemas.types import AffectedVnf, BusinessOutcome, MaintenanceAction
from services.vnfm_adapter.reference_vnfm import (
    ReferenceVnfm,
    WorldAction,
    build_reply,
    plan_notice,
    plan_restore,
    reply_id,
    vnf_recovered,
)

pytestmark = pytest.mark.unit

NODE = "node-1"
NOW = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
ALL_ACTIONS = tuple(MaintenanceAction)
SWITCHED, DRAINED, LEFT = (
    BusinessOutcome.SWITCHED_OVER,
    BusinessOutcome.DRAINED,
    BusinessOutcome.LEFT_FOR_VIM,
)


def active_standby(
    *,
    active: str | None = "vm-a1",
    nodes: dict[str, str] | None = None,
    up: tuple[str, ...] = ("vm-a1", "vm-a2"),
    resyncing: tuple[str, ...] = (),
    vnfm_id: str = "vnfm-1",
) -> VnfView:
    members = ["vm-a1", "vm-a2"]
    return VnfView(
        id="vnf-as",
        vnfm_id=vnfm_id,
        redundancy="active_standby",
        members=members,
        active_member=active,
        sync={m: MemberSync(state="resyncing" if m in resyncing else "in_sync") for m in members},
        member_nodes=nodes or {"vm-a1": NODE, "vm-a2": "node-2"},
        members_up=list(up),
        members_in_service=[active] if active in up else [],
    )


def load_balanced(
    *, shares: dict[str, float] | None = None, min_in_service: int = 2, vnfm_id: str = "vnfm-1"
) -> VnfView:
    members = ["vm-l1", "vm-l2", "vm-l3"]
    shares = shares if shares is not None else dict.fromkeys(members, 1 / 3)
    return VnfView(
        id="vnf-lb",
        vnfm_id=vnfm_id,
        redundancy="load_balanced",
        members=members,
        load_share=shares,
        min_in_service=min_in_service,
        member_nodes={"vm-l1": NODE, "vm-l2": "node-2", "vm-l3": "node-3"},
        members_up=members,
        members_in_service=[m for m in members if shares.get(m, 0) > 0],
    )


def notice(
    vnfs: dict[str, tuple[str, ...]],
    *,
    vnfm_id: str = "vnfm-1",
    allowed: tuple[MaintenanceAction, ...] = ALL_ACTIONS,
) -> VnfMaintenanceNotified:
    return VnfMaintenanceNotified(
        campaign_id="cmp-1",
        notice_id=f"n-{uuid.uuid4()}",
        vnfm_id=vnfm_id,
        node_id=NODE,
        vnfs=tuple(AffectedVnf(vnf_id=v, vm_ids=vms) for v, vms in vnfs.items()),
        allowed_actions=allowed,
        reply_deadline=NOW,
        producer="vnfm-adapter",
    )


def one_plan(n: VnfMaintenanceNotified, *views: VnfView) -> tuple[WorldAction, BusinessOutcome]:
    [plan] = plan_notice(n, "vnfm-1", {v.id: v for v in views})
    return plan.action, plan.outcome


# --- active-standby --------------------------------------------------------------------------


def test_active_member_on_the_node_switches_over_to_the_standby() -> None:
    [plan] = plan_notice(notice({"vnf-as": ("vm-a1",)}), "vnfm-1", {"vnf-as": active_standby()})
    assert (plan.action, plan.to_member, plan.outcome) == (
        WorldAction.SWITCH_OVER,
        "vm-a2",
        SWITCHED,
    )


def test_standby_on_the_node_carries_no_business_and_counts_as_switched_over() -> None:
    n = notice({"vnf-as": ("vm-a2",)})
    view = active_standby(nodes={"vm-a1": "node-2", "vm-a2": NODE})
    assert one_plan(n, view) == (WorldAction.NONE, SWITCHED)


def test_standby_whose_active_is_down_is_left_for_the_vim() -> None:
    n = notice({"vnf-as": ("vm-a2",)})
    view = active_standby(nodes={"vm-a1": "node-2", "vm-a2": NODE}, up=("vm-a2",))
    assert one_plan(n, view) == (WorldAction.NONE, LEFT)


@pytest.mark.parametrize(
    "view",
    [
        active_standby(resyncing=("vm-a2",)),
        active_standby(up=("vm-a1",)),
        active_standby(nodes={"vm-a1": NODE, "vm-a2": NODE}),
    ],
    ids=["standby-resyncing", "standby-down", "standby-on-same-node"],
)
def test_active_without_a_usable_standby_is_left_for_the_vim(view: VnfView) -> None:
    assert one_plan(notice({"vnf-as": ("vm-a1",)}), view) == (WorldAction.NONE, LEFT)


def test_switch_over_not_allowed_is_left_for_the_vim() -> None:
    n = notice({"vnf-as": ("vm-a1",)}, allowed=(MaintenanceAction.MIGRATE,))
    assert one_plan(n, active_standby()) == (WorldAction.NONE, LEFT)


# --- load-balanced ---------------------------------------------------------------------------


def test_loaded_member_is_drained() -> None:
    assert one_plan(notice({"vnf-lb": ("vm-l1",)}), load_balanced()) == (
        WorldAction.DRAIN,
        DRAINED,
    )


def test_drain_that_would_break_min_in_service_is_left_for_the_vim() -> None:
    view = load_balanced(shares={"vm-l1": 0.5, "vm-l2": 0.5, "vm-l3": 0.0})
    assert one_plan(notice({"vnf-lb": ("vm-l1",)}), view) == (WorldAction.NONE, LEFT)


def test_member_without_load_is_already_drained() -> None:
    view = load_balanced(shares={"vm-l1": 0.0, "vm-l2": 0.5, "vm-l3": 0.5})
    assert one_plan(notice({"vnf-lb": ("vm-l1",)}), view) == (WorldAction.NONE, DRAINED)


def test_drain_not_allowed_is_left_for_the_vim() -> None:
    n = notice({"vnf-lb": ("vm-l1",)}, allowed=(MaintenanceAction.SWITCH_OVER,))
    assert one_plan(n, load_balanced()) == (WorldAction.NONE, LEFT)


# --- what is not ours ------------------------------------------------------------------------


def test_unknown_vnf_foreign_vnf_and_non_member_are_left_for_the_vim() -> None:
    n = notice({"vnf-x": ("vm-x",), "vnf-as": ("vm-zz",), "vnf-lb": ("vm-l1",)})
    plans = plan_notice(
        n,
        "vnfm-1",
        {"vnf-x": None, "vnf-as": active_standby(), "vnf-lb": load_balanced(vnfm_id="vnfm-2")},
    )
    assert [(p.vm_id, p.action, p.outcome) for p in plans] == [
        ("vm-x", WorldAction.NONE, LEFT),
        ("vm-zz", WorldAction.NONE, LEFT),
        ("vm-l1", WorldAction.NONE, LEFT),
    ]


def test_notice_for_another_vnfm_gets_no_plan() -> None:
    n = notice({"vnf-as": ("vm-a1",)}, vnfm_id="vnfm-2")
    assert plan_notice(n, "vnfm-1", {"vnf-as": active_standby()}) == ()


# --- reply -----------------------------------------------------------------------------------


def test_reply_answers_the_notice_with_one_outcome_per_vm() -> None:
    n = notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",)})
    plans = plan_notice(n, "vnfm-1", {"vnf-as": active_standby(), "vnf-lb": load_balanced()})
    reply = build_reply(n, plans, now=NOW, producer="reference-vnfm/vnfm-1")
    assert reply.notice_id == n.notice_id and reply.vnfm_id == "vnfm-1"
    assert reply.causation_id == n.event_id
    assert reply.correlation_id == n.correlation_id
    assert reply.campaign_id == "cmp-1"
    assert reply.event_id == reply_id(n)
    assert [(o.vm_id, o.vnf_id, o.outcome) for o in reply.outcomes] == [
        ("vm-a1", "vnf-as", SWITCHED),
        ("vm-l1", "vnf-lb", DRAINED),
    ]


# --- restore ---------------------------------------------------------------------------------


def available(vnf_ids: tuple[str, ...], vnfm_id: str = "vnfm-1") -> NodeAvailable:
    return NodeAvailable(node_id=NODE, vnfm_id=vnfm_id, vnf_ids=vnf_ids, producer="vnfm-adapter")


def test_restore_gives_load_back_to_drained_members_that_are_up() -> None:
    drained = load_balanced(shares={"vm-l1": 0.0, "vm-l2": 0.5, "vm-l3": 0.5})
    event = available(("vnf-lb", "vnf-as"))
    views = {"vnf-lb": drained, "vnf-as": active_standby()}
    assert plan_restore(event, "vnfm-1", views) == (("vnf-lb", "vm-l1"),)
    # a member drained for this node but since migrated elsewhere is remembered
    moved = drained.model_copy(update={"member_nodes": {**drained.member_nodes, "vm-l1": "node-4"}})
    assert plan_restore(event, "vnfm-1", {"vnf-lb": moved}) == ()
    assert plan_restore(event, "vnfm-1", {"vnf-lb": moved}, [("vnf-lb", "vm-l1")]) == (
        ("vnf-lb", "vm-l1"),
    )
    down = drained.model_copy(update={"members_up": ["vm-l2", "vm-l3"]})
    assert plan_restore(event, "vnfm-1", {"vnf-lb": down}) == ()
    assert plan_restore(available(("vnf-lb",), "vnfm-2"), "vnfm-1", views) == ()
    assert plan_restore(event, "vnfm-1", {"vnf-lb": load_balanced()}) == ()


# --- driver ----------------------------------------------------------------------------------


class FakeWorld:
    """Just the calls the reference VNFM makes; `refuse` maps a call name to a 409."""

    def __init__(self, *views: VnfView, refuse: tuple[str, ...] = ()) -> None:
        self.views = {v.id: v for v in views}
        self.refuse = refuse
        self.calls: list[tuple[str, ...]] = []
        self.batches = 0

    async def vnf(self, vnf_id: str) -> VnfView:
        self.calls.append(("vnf", vnf_id))
        if vnf_id not in self.views:
            raise WorldError(404, f"unknown VNF {vnf_id!r}")
        return self.views[vnf_id]

    async def vnfs(self, vnf_ids: Any = None) -> list[VnfView]:
        wanted = list(vnf_ids)
        self.calls.append(("vnfs", *wanted))
        return [self.views[v] for v in wanted if v in self.views]

    async def vnf_actions(self, actions: list[VnfAction]) -> list[VnfActionResult]:
        """One batch request; each action is recorded under the name of its own call."""
        self.batches += 1
        results = []
        for action in actions:
            name = ACTION_NAMES[action.action]
            self.calls.append((name, action.vnf_id, action.member))
            if name in self.refuse:
                results.append(VnfActionResult(status=409, error=f"{name} refused"))
            else:
                results.append(VnfActionResult(vnf=self.views[action.vnf_id]))
        return results


ACTION_NAMES = {"switchover": "switch_over", "drain": "drain_member", "restore": "restore_member"}


def driver(world: FakeWorld, **options: Any) -> tuple[ReferenceVnfm, list[VnfBusinessMoved]]:
    sent: list[VnfBusinessMoved] = []

    async def send(reply: VnfBusinessMoved) -> None:
        sent.append(reply)

    vnfm = ReferenceVnfm(world, "vnfm-1", send, clock=lambda: NOW, **options)  # type: ignore[arg-type]
    return vnfm, sent


async def test_driver_acts_on_the_world_and_replies() -> None:
    world = FakeWorld(active_standby(), load_balanced())
    vnfm, sent = driver(world)
    n = notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",), "vnf-gone": ("vm-g",)})
    reply = await vnfm.handle_notice(n)
    assert sent == [reply] and reply is not None
    assert ("switch_over", "vnf-as", "vm-a2") in world.calls
    assert ("drain_member", "vnf-lb", "vm-l1") in world.calls
    assert {o.vm_id: o.outcome for o in reply.outcomes} == {
        "vm-a1": SWITCHED,
        "vm-l1": DRAINED,
        "vm-g": LEFT,
    }
    assert vnfm.drained == {NODE: {("vnf-lb", "vm-l1")}}
    # one read of the notice's VNFs, then one request for all of its actions
    assert world.batches == 1
    assert [c[0] for c in world.calls] == ["vnfs", "switch_over", "drain_member"]


async def test_driver_reports_left_for_vim_when_the_world_refuses() -> None:
    world = FakeWorld(active_standby(), load_balanced(), refuse=("switch_over", "drain_member"))
    vnfm, _ = driver(world)
    reply = await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",)}))
    assert reply is not None and {o.outcome for o in reply.outcomes} == {LEFT}
    assert vnfm.drained == {}


async def test_a_refused_action_of_the_batch_leaves_only_its_vm_to_the_vim() -> None:
    world = FakeWorld(active_standby(), load_balanced(), refuse=("drain_member",))
    vnfm, _ = driver(world)
    reply = await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",)}))
    assert reply is not None
    outcomes = {o.vm_id: o for o in reply.outcomes}
    assert outcomes["vm-a1"].outcome == SWITCHED
    assert outcomes["vm-l1"].outcome == LEFT
    assert vnfm.drained == {}


async def test_a_batch_the_world_rejects_as_a_whole_leaves_every_vm_to_the_vim() -> None:
    world = FakeWorld(active_standby(), load_balanced())

    async def rejected(actions: list[VnfAction]) -> list[VnfActionResult]:
        raise WorldError(400, "invalid request body")

    world.vnf_actions = rejected  # type: ignore[method-assign]
    vnfm, _ = driver(world)
    reply = await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",)}))
    assert reply is not None
    assert {o.outcome for o in reply.outcomes} == {LEFT}


async def test_driver_never_answers_another_vnfms_notice() -> None:
    world = FakeWorld(active_standby())
    vnfm, sent = driver(world)
    assert await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",)}, vnfm_id="vnfm-2")) is None
    assert sent == [] and world.calls == []


async def test_silent_driver_acts_but_never_replies() -> None:
    world = FakeWorld(active_standby())
    vnfm, sent = driver(world, silent=True)
    assert await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",)})) is None
    assert sent == [] and ("switch_over", "vnf-as", "vm-a2") in world.calls


async def test_broken_driver_claims_moves_it_never_made() -> None:
    # The negative control for the end-to-end tests: replies as if it acted, touches nothing.
    world = FakeWorld(active_standby(), load_balanced())
    vnfm, sent = driver(world, ack_without_acting=True)
    reply = await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",)}))
    assert reply is not None and sent == [reply]
    assert {o.vm_id: o.outcome for o in reply.outcomes} == {"vm-a1": SWITCHED, "vm-l1": DRAINED}
    assert [c for c in world.calls if c[0] != "vnfs"] == [] and vnfm.drained == {}


async def test_driver_reads_every_vnf_of_a_notice_in_one_request() -> None:
    world = FakeWorld(active_standby(), load_balanced())
    vnfm, _ = driver(world)
    await vnfm.handle_notice(
        notice({"vnf-as": ("vm-a1",), "vnf-lb": ("vm-l1",), "vnf-x": ("vm-x",)})
    )
    reads = [c for c in world.calls if c[0] in ("vnf", "vnfs")]
    assert reads == [("vnfs", "vnf-as", "vnf-lb", "vnf-x")]


async def test_driver_does_not_swallow_an_unreachable_world() -> None:
    class Down(FakeWorld):
        async def vnfs(self, vnf_ids: Any = None) -> list[VnfView]:
            raise WorldError(0, "unreachable")

    vnfm, sent = driver(Down())
    with pytest.raises(WorldError):
        await vnfm.handle_notice(notice({"vnf-as": ("vm-a1",)}))
    assert sent == []


async def test_driver_restores_what_it_drained_on_node_available() -> None:
    world = FakeWorld(load_balanced())
    vnfm, _ = driver(world)
    await vnfm.handle_notice(notice({"vnf-lb": ("vm-l1",)}))
    world.views["vnf-lb"] = load_balanced(shares={"vm-l1": 0.0, "vm-l2": 0.5, "vm-l3": 0.5})
    assert await vnfm.handle_node_available(available(("vnf-lb",))) == (("vnf-lb", "vm-l1"),)
    assert ("restore_member", "vnf-lb", "vm-l1") in world.calls
    assert vnfm.drained == {}
    assert await vnfm.handle_node_available(available(("vnf-lb",), "vnfm-2")) == ()


# --- refusals, heartbeats, recovery ----------------------------------------------------------


def test_vnf_recovered_needs_every_member_up_and_in_sync() -> None:
    assert vnf_recovered(active_standby())
    assert not vnf_recovered(active_standby(resyncing=("vm-a1",)))
    assert not vnf_recovered(active_standby(up=("vm-a2",)))
    assert vnf_recovered(load_balanced())


async def test_driver_refuses_the_first_notices_without_acting_then_answers() -> None:
    world = FakeWorld(active_standby())
    vnfm, sent = driver(world, refuse_first=2, refuse_reason="peak hour")
    first, second, third = (notice({"vnf-as": ("vm-a1",)}) for _ in range(3))
    r1 = await vnfm.handle_notice(first)
    assert isinstance(r1, BusinessMoveRefused) and r1.reason == "peak hour (refusal 1/2)"
    assert r1.notice_id == first.notice_id and r1.causation_id == first.event_id
    again = await vnfm.handle_notice(first)  # a redelivery: the same refusal
    assert isinstance(again, BusinessMoveRefused) and again.event_id == r1.event_id
    assert isinstance(await vnfm.handle_notice(second), BusinessMoveRefused)
    assert world.calls == []
    assert isinstance(await vnfm.handle_notice(third), VnfBusinessMoved)
    assert [type(e).__name__ for e in sent] == [
        "BusinessMoveRefused",
        "BusinessMoveRefused",
        "BusinessMoveRefused",
        "VnfBusinessMoved",
    ]


async def test_driver_sends_heartbeats_while_working_then_replies() -> None:
    world = FakeWorld(active_standby())
    vnfm, sent = driver(world, heartbeat_every_s=0.05, work_s=0.18, extend_by_s=7)
    n = notice({"vnf-as": ("vm-a1",)})
    reply = await vnfm.handle_notice(n)
    beats = [e for e in sent if isinstance(e, MaintenanceDeadlineExtended)]
    assert 3 <= len(beats) <= 5
    assert all(b.notice_id == n.notice_id and b.extend_by_s == 7 for b in beats)
    assert len({b.event_id for b in beats}) == len(beats)
    assert sent[-1] is reply and isinstance(reply, VnfBusinessMoved)
    # the world was acted on before the work, as a real VNFM switching over then resyncing
    assert ("switch_over", "vnf-as", "vm-a2") in world.calls


async def test_driver_signals_recovery_once_the_standby_has_resynced() -> None:
    world = FakeWorld(active_standby(resyncing=("vm-a1",)))
    vnfm, sent = driver(world, recovery_signal=True, recovery_poll_s=0.01)
    event = available(("vnf-as",))
    await vnfm.handle_node_available(event)
    await asyncio.sleep(0.05)
    assert sent == []  # still resyncing
    world.views["vnf-as"] = active_standby()
    await vnfm.wait_background()
    [signal] = sent
    assert isinstance(signal, VnfRecovered)
    assert (signal.vnfm_id, signal.vnf_id, signal.causation_id) == (
        "vnfm-1",
        "vnf-as",
        event.event_id,
    )
    # another VNFM's VNF, or without the option: no signal
    other, sent2 = driver(FakeWorld(active_standby(vnfm_id="vnfm-2")), recovery_signal=True)
    await other.handle_node_available(available(("vnf-as",)))
    await other.wait_background()
    plain, sent3 = driver(FakeWorld(active_standby()))
    await plain.handle_node_available(available(("vnf-as",)))
    assert sent2 == [] and sent3 == [] and not plain.background
