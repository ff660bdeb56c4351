"""The reference VNFM: a simulated, vendor-like VNFM that moves business in the world.

Not part of the VIM. It reads only what a vendor reads (`VnfMaintenanceNotified`, `NodeAvailable`
on `vnfm.notices`, keyed by its VNFM id), acts on the simulated cloud through `WorldClient`, and
writes only `VnfBusinessMoved` to `vnfm.replies`.

`plan_notice` and `plan_restore` are pure (world views in, plans out); `ReferenceVnfm` executes a
plan against the world and builds the reply. Per VM of a notice:

* active-standby, the VM is the active member: switch over to a standby that is up, in sync and
  on another node -> `switched_over`;
* active-standby, the VM is a standby while an active member serves from another node: the
  standby carries no business, so there is nothing to move. Reported `switched_over`: the VNF is
  already in exactly the state a switch-over away from this VM produces (business on another
  member), which is what the VIM needs to know; `own_action` would claim a vendor-specific action
  that never happened;
* load-balanced: drain the member (its share goes to the others) -> `drained`;
* anything else (the action is not allowed, no standby can take over, a drain would leave fewer
  than `min_in_service` members serving, the world refuses) -> `left_for_vim`, and the VIM
  migrates the VM.

A notice addressed to another VNFM is never answered, and a VNF the world says belongs to another
VNFM is never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from escalator.world.client import WorldClient, WorldError
from escalator.world.model import VnfView
from schemas.envelope import command_id, utcnow
from schemas.events import NodeAvailable, VnfBusinessMoved, VnfMaintenanceNotified
from schemas.types import BusinessOutcome, MaintenanceAction, VmBusinessOutcome
from services.vnfm_adapter.settings import ReferenceVnfmSettings

log = logging.getLogger(__name__)


class WorldAction(StrEnum):
    SWITCH_OVER = "switch_over"
    DRAIN = "drain"
    NONE = "none"


@dataclass(frozen=True)
class VmPlan:
    """What to do for one VM of a notice, and the outcome if the world accepts it."""

    vm_id: str
    vnf_id: str
    action: WorldAction
    outcome: BusinessOutcome
    reason: str
    to_member: str | None = None  # the standby taking over, for a switch-over

    def with_refusal(self, why: str) -> VmPlan:
        return VmPlan(self.vm_id, self.vnf_id, WorldAction.NONE, BusinessOutcome.LEFT_FOR_VIM, why)


def addressed_to(notice: VnfMaintenanceNotified | NodeAvailable, vnfm_id: str) -> bool:
    return notice.vnfm_id == vnfm_id


def _left(vm_id: str, vnf_id: str, reason: str) -> VmPlan:
    return VmPlan(vm_id, vnf_id, WorldAction.NONE, BusinessOutcome.LEFT_FOR_VIM, reason)


def _plan_active_standby(
    vm_id: str, vnf: VnfView, node_id: str, allowed: tuple[MaintenanceAction, ...]
) -> VmPlan:
    def up_elsewhere(member: str) -> bool:
        return member in vnf.members_up and vnf.member_nodes.get(member) != node_id

    if vnf.active_member != vm_id:
        active = vnf.active_member
        if active is not None and up_elsewhere(active):
            return VmPlan(
                vm_id,
                vnf.id,
                WorldAction.NONE,
                BusinessOutcome.SWITCHED_OVER,
                f"standby: the business is on {active}",
            )
        return _left(vm_id, vnf.id, "standby, and no active member serves from another node")
    if MaintenanceAction.SWITCH_OVER not in allowed:
        return _left(vm_id, vnf.id, "switch_over is not allowed")

    def in_sync(member: str) -> bool:
        sync = vnf.sync.get(member)
        return sync is None or sync.state == "in_sync"

    standbys = [m for m in vnf.members if m != vm_id and up_elsewhere(m) and in_sync(m)]
    if not standbys:
        return _left(vm_id, vnf.id, "no standby in sync on another node can take over")
    return VmPlan(
        vm_id,
        vnf.id,
        WorldAction.SWITCH_OVER,
        BusinessOutcome.SWITCHED_OVER,
        f"switch over to {standbys[0]}",
        to_member=standbys[0],
    )


def _plan_load_balanced(vm_id: str, vnf: VnfView, allowed: tuple[MaintenanceAction, ...]) -> VmPlan:
    if vnf.load_share.get(vm_id, 0.0) <= 0:
        return VmPlan(vm_id, vnf.id, WorldAction.NONE, BusinessOutcome.DRAINED, "carries no load")
    if MaintenanceAction.DRAIN not in allowed:
        return _left(vm_id, vnf.id, "drain is not allowed")
    receivers = [m for m in vnf.members_in_service if m != vm_id]
    if not receivers or len(receivers) < vnf.min_in_service:
        return _left(
            vm_id,
            vnf.id,
            f"draining would leave {len(receivers)} members in service "
            f"(min_in_service {vnf.min_in_service})",
        )
    return VmPlan(vm_id, vnf.id, WorldAction.DRAIN, BusinessOutcome.DRAINED, "drain")


def plan_notice(
    notice: VnfMaintenanceNotified, vnfm_id: str, vnfs: Mapping[str, VnfView | None]
) -> tuple[VmPlan, ...]:
    """One plan per VM of the notice (empty if the notice is for another VNFM).

    `vnfs` holds the world's view of each VNF of the notice (None: the world does not know it).
    """
    if not addressed_to(notice, vnfm_id):
        return ()
    plans: list[VmPlan] = []
    for affected in notice.vnfs:
        vnf = vnfs.get(affected.vnf_id)
        for vm_id in affected.vm_ids:
            if vnf is None:
                plans.append(_left(vm_id, affected.vnf_id, "unknown VNF"))
            elif vnf.vnfm_id != vnfm_id:
                plans.append(_left(vm_id, vnf.id, f"VNF managed by {vnf.vnfm_id}, not by us"))
            elif vm_id not in vnf.members:
                plans.append(_left(vm_id, vnf.id, "not a member of the VNF"))
            elif vnf.redundancy == "active_standby":
                plans.append(
                    _plan_active_standby(vm_id, vnf, notice.node_id, notice.allowed_actions)
                )
            else:
                plans.append(_plan_load_balanced(vm_id, vnf, notice.allowed_actions))
    return tuple(plans)


def reply_id(notice: VnfMaintenanceNotified) -> uuid.UUID:
    """Deterministic: answering a redelivered notice again yields a recognisable duplicate."""
    return command_id("reference-vnfm", notice.vnfm_id, notice.notice_id, "reply")


def build_reply(
    notice: VnfMaintenanceNotified, plans: Iterable[VmPlan], *, now: datetime, producer: str
) -> VnfBusinessMoved:
    return VnfBusinessMoved(
        **notice.caused(event_id=reply_id(notice), occurred_at=now, producer=producer),
        notice_id=notice.notice_id,
        vnfm_id=notice.vnfm_id,
        outcomes=tuple(
            VmBusinessOutcome(vm_id=p.vm_id, vnf_id=p.vnf_id, outcome=p.outcome) for p in plans
        ),
    )


def plan_restore(
    event: NodeAvailable,
    vnfm_id: str,
    vnfs: Mapping[str, VnfView | None],
    drained_here: Iterable[tuple[str, str]] = (),
) -> tuple[tuple[str, str], ...]:
    """(vnf, member) pairs to give load back once the node is available again: members we
    drained for this node (remembered) plus our load-balanced members on the node that carry no
    load, provided the member's VM is up."""
    if not addressed_to(event, vnfm_id):
        return ()
    candidates: dict[tuple[str, str], None] = dict.fromkeys(drained_here)
    for vnf_id in event.vnf_ids:
        vnf = vnfs.get(vnf_id)
        if vnf is None or vnf.vnfm_id != vnfm_id or vnf.redundancy != "load_balanced":
            continue
        for member in vnf.members:
            if vnf.member_nodes.get(member) == event.node_id:
                candidates[(vnf_id, member)] = None
    restore: list[tuple[str, str]] = []
    for vnf_id, member in candidates:
        vnf = vnfs.get(vnf_id)
        if vnf is None or vnf.vnfm_id != vnfm_id or vnf.redundancy != "load_balanced":
            continue
        if member in vnf.members_up and vnf.load_share.get(member, 0.0) <= 0:
            restore.append((vnf_id, member))
    return tuple(restore)


# --- the driver ------------------------------------------------------------------------------

Send = Callable[[VnfBusinessMoved], Awaitable[None]]


@dataclass
class ReferenceVnfm:
    """Executes plans against the world. `send` publishes a reply; `silent` never replies (to
    exercise the adapter's deadline); `reply_delay_s` waits before replying. `ack_without_acting`
    is a deliberately broken VNFM for negative-control tests: it claims every planned move was
    made without doing it, so the world's monitor must see the business interrupted."""

    world: WorldClient
    vnfm_id: str
    send: Send
    reply_delay_s: float = 0.0
    silent: bool = False
    ack_without_acting: bool = False
    clock: Callable[[], datetime] = utcnow
    # node -> (vnf, member) drained for that node's notices, restored on its NodeAvailable
    drained: dict[str, set[tuple[str, str]]] = field(default_factory=dict)

    @property
    def producer(self) -> str:
        return f"reference-vnfm/{self.vnfm_id}"

    async def _views(self, vnf_ids: Iterable[str]) -> dict[str, VnfView | None]:
        views: dict[str, VnfView | None] = {}
        for vnf_id in dict.fromkeys(vnf_ids):
            try:
                views[vnf_id] = await self.world.vnf(vnf_id)
            except WorldError as exc:
                if exc.status == 0:
                    raise  # the world is unreachable: let the caller retry the notice
                views[vnf_id] = None
        return views

    async def _execute(self, plan: VmPlan) -> VmPlan:
        try:
            if plan.action is WorldAction.SWITCH_OVER:
                assert plan.to_member is not None
                await self.world.switch_over(plan.vnf_id, plan.to_member)
            elif plan.action is WorldAction.DRAIN:
                await self.world.drain_member(plan.vnf_id, plan.vm_id)
        except WorldError as exc:
            if exc.status == 0:
                raise
            return plan.with_refusal(f"the world refused {plan.action}: {exc.message}")
        return plan

    async def handle_notice(self, notice: VnfMaintenanceNotified) -> VnfBusinessMoved | None:
        """Move what can be moved and reply; None when the notice is not ours (or silent)."""
        if not addressed_to(notice, self.vnfm_id):
            log.debug("%s: notice %s is for %s", self.producer, notice.notice_id, notice.vnfm_id)
            return None
        views = await self._views(a.vnf_id for a in notice.vnfs)
        done: list[VmPlan] = []
        for plan in plan_notice(notice, self.vnfm_id, views):
            result = plan if self.ack_without_acting else await self._execute(plan)
            if result.action is WorldAction.DRAIN and not self.ack_without_acting:
                self.drained.setdefault(notice.node_id, set()).add((result.vnf_id, result.vm_id))
            log.info("%s: %s/%s -> %s (%s)", self.producer, *_vm(result), result.reason)
            done.append(result)
        if self.silent:
            return None
        if self.reply_delay_s > 0:
            await asyncio.sleep(self.reply_delay_s)
        reply = build_reply(notice, done, now=self.clock(), producer=self.producer)
        await self.send(reply)
        return reply

    async def handle_node_available(self, event: NodeAvailable) -> tuple[tuple[str, str], ...]:
        """Give drained members on the node their load back; returns what was restored."""
        if not addressed_to(event, self.vnfm_id):
            return ()
        remembered = self.drained.get(event.node_id, set())
        views = await self._views([*event.vnf_ids, *(vnf for vnf, _ in remembered)])
        restored: list[tuple[str, str]] = []
        for vnf_id, member in plan_restore(event, self.vnfm_id, views, sorted(remembered)):
            try:
                await self.world.restore_member(vnf_id, member)
            except WorldError as exc:
                if exc.status == 0:
                    raise
                log.warning("%s: restoring %s/%s refused: %s", self.producer, vnf_id, member, exc)
                continue
            restored.append((vnf_id, member))
        self.drained.pop(event.node_id, None)
        return tuple(restored)


def _vm(plan: VmPlan) -> tuple[str, str, str]:
    return plan.vnf_id, plan.vm_id, plan.outcome.value


# --- the process -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.vnfm_adapter.reference_vnfm",
        description="Reference (simulated) VNFM: answers the notices of one VNFM id.",
    )
    parser.add_argument("--world", help="simulated cloud URL (ESCALATOR_REFERENCE_VNFM_WORLD_URL)")
    parser.add_argument("--vnfm-id", help="VNFM to play (ESCALATOR_REFERENCE_VNFM_VNFM_ID)")
    parser.add_argument("--group-id", help="consumer group (default per VNFM id)")
    parser.add_argument("--reply-delay-s", type=float, help="wait before each reply")
    parser.add_argument("--silent", action="store_true", default=None, help="act, but never reply")
    parser.add_argument(
        "--ack-without-acting",
        action="store_true",
        default=None,
        help="negative control: claim every move was made without making it",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pydantic import ValidationError

    overrides: dict[str, Any] = {
        name: value
        for name, value in (
            ("world_url", args.world),
            ("vnfm_id", args.vnfm_id),
            ("group_id", args.group_id),
            ("reply_delay_s", args.reply_delay_s),
            ("silent", args.silent),
            ("ack_without_acting", args.ack_without_acting),
        )
        if value is not None
    }
    try:
        settings = ReferenceVnfmSettings(**overrides)
    except ValidationError as err:
        print(f"reference vnfm: bad settings:\n{err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(settings))
    except KeyboardInterrupt:
        pass
    return 0


def _world_down(exc: BaseException) -> bool:
    return isinstance(exc, WorldError) and exc.status == 0


async def _serve(settings: ReferenceVnfmSettings) -> None:
    from escalator.bus import (
        EventConsumer,
        EventPublisher,
        ensure_topics,
        make_consumer,
        make_producer,
    )
    from escalator.bus.consumer import is_transient_error
    from escalator.settings import KafkaSettings
    from schemas.events import NoticeCancelled, NoticeExpired
    from schemas.topics import VNFM_NOTICES, VNFM_REPLIES

    kafka = KafkaSettings()
    await ensure_topics(kafka, (VNFM_NOTICES, VNFM_REPLIES))
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, settings.group, kafka.topic(VNFM_NOTICES.name))
    world = WorldClient(settings.world_url)
    publisher = EventPublisher(producer, kafka)

    async def send(reply: VnfBusinessMoved) -> None:
        await publisher.publish(reply, VNFM_REPLIES)

    vnfm = ReferenceVnfm(
        world,
        settings.vnfm_id,
        send,
        reply_delay_s=settings.reply_delay_s,
        silent=settings.silent,
        ack_without_acting=settings.ack_without_acting,
    )

    async def on_notice(event: VnfMaintenanceNotified, info: object) -> None:
        await vnfm.handle_notice(event)

    async def on_available(event: NodeAvailable, info: object) -> None:
        restored = await vnfm.handle_node_available(event)
        if restored:
            log.info("%s: restored %s", vnfm.producer, restored)

    async def on_closed(event: NoticeExpired | NoticeCancelled, info: object) -> None:
        if event.vnfm_id == settings.vnfm_id:
            log.info("%s: %s %s", vnfm.producer, event.event_type, event.notice_id)

    await producer.start()
    try:
        await consumer.start()
        try:
            loop = EventConsumer(
                consumer,
                publisher,
                group=settings.group,
                instance=vnfm.producer,
                handlers={
                    VnfMaintenanceNotified: on_notice,
                    NodeAvailable: on_available,
                    NoticeExpired: on_closed,
                    NoticeCancelled: on_closed,
                },
                # an unreachable world is retried until it answers, like an unreachable Kafka
                transient=lambda exc: is_transient_error(exc) or _world_down(exc),
            )
            running = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                running.add_signal_handler(sig, loop.request_stop)
            log.info("%s starting (world %s)", vnfm.producer, settings.world_url)
            await loop.run()
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        await world.close()


if __name__ == "__main__":
    sys.exit(main())
