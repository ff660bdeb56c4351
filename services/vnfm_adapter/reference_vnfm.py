"""The reference VNFM: a simulated, vendor-like VNFM that moves business in the world.

Not part of the VIM. It reads only what a vendor reads (`VnfMaintenanceNotified`, `NodeAvailable`,
`NoticeExpired`, `NoticeCancelled`, `VnfmReplyRejected` on `vnfm.notices`, keyed by its VNFM id),
acts on the simulated cloud through `WorldClient`, and writes only to `vnfm.replies`:
`VnfBusinessMoved`, and with its options `BusinessMoveRefused`, `MaintenanceDeadlineExtended`
heartbeats and `VnfRecovered`.

Options that exercise the rest of the handshake:

* `--refuse-first N --refuse-reason TEXT`: the first N notices (distinct notice ids, counted per
  process) are answered `BusinessMoveRefused` without acting; a redelivered refused notice gets
  the same refusal again (same event id).
* `--heartbeat-every S --work-s W [--extend-by-s E]`: after acting, keep "working" for W seconds,
  sending a `MaintenanceDeadlineExtended` (extend by E, default 2*S) at once and then every S
  seconds, then reply. `--work-s` without heartbeats only delays the reply, like
  `--reply-delay-s` (which is still applied after the work).
* `--recovery-signal`: after a `NodeAvailable`, for each of its VNFs on the node, poll the world's
  view of the VNF until every member is up and in sync (the standby has resynced), then send
  `VnfRecovered`. The polling runs in the background (the consume loop goes on); a crash loses
  it, and the adapter then holds the next notice for that VNF until its cap.

`plan_notice` and `plan_restore` are pure (world views in, plans out); `ReferenceVnfm` executes a
plan against the world and builds the reply. A notice costs two requests to the world, whatever
its size: one read of its VNFs (`GET /v1/vnfs?id=`), one batch of its actions (`POST
/v1/vnfs/actions`, applied in order, each refused or done on its own). Per VM of a notice:

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
import functools
import logging
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from escalator.entrypoint import settings_error, setup_logging
from escalator.world.client import WorldClient, WorldError
from escalator.world.model import VnfAction, VnfView
from schemas.envelope import Event, command_id, utcnow
from schemas.events import (
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    NodeAvailable,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfRecovered,
)
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


def vnf_recovered(vnf: VnfView) -> bool:
    """Every member of the VNF is up and in sync: redundancy is restored."""
    if any(member not in vnf.members_up for member in vnf.members):
        return False
    return all(sync.state == "in_sync" for sync in vnf.sync.values())


def refusal_id(notice: VnfMaintenanceNotified) -> uuid.UUID:
    return command_id("reference-vnfm", notice.vnfm_id, notice.notice_id, "refuse")


def heartbeat_id(notice: VnfMaintenanceNotified, n: int) -> uuid.UUID:
    return command_id("reference-vnfm", notice.vnfm_id, notice.notice_id, "heartbeat", n)


def recovered_id(vnfm_id: str, vnf_id: str, cause: uuid.UUID) -> uuid.UUID:
    return command_id("reference-vnfm", vnfm_id, vnf_id, "recovered", cause)


# --- the driver ------------------------------------------------------------------------------

Send = Callable[[Event], Awaitable[None]]
Reply = VnfBusinessMoved | BusinessMoveRefused


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
    refuse_first: int = 0
    refuse_reason: str = "not now"
    heartbeat_every_s: float = 0.0
    work_s: float = 0.0
    extend_by_s: float | None = None
    recovery_signal: bool = False
    recovery_poll_s: float = 0.1
    recovery_timeout_s: float = 600.0
    # node -> (vnf, member) drained for that node's notices, restored on its NodeAvailable
    drained: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    # notices refused so far (at most refuse_first)
    refused: list[str] = field(default_factory=list)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def producer(self) -> str:
        return f"reference-vnfm/{self.vnfm_id}"

    async def _views(self, vnf_ids: Iterable[str]) -> dict[str, VnfView | None]:
        """The VNFs as the cloud shows them (None: unknown to it), in one request: a notice
        names several, and every request to the cloud's API is a wait on the cycle's path."""
        wanted = list(dict.fromkeys(vnf_ids))
        if not wanted:
            return {}
        try:
            found = {view.id: view for view in await self.world.vnfs(wanted)}
        except WorldError as exc:
            if exc.status == 0:
                raise  # the world is unreachable: let the caller retry the notice
            log.warning("%s: reading VNFs %s failed: %s", self.producer, wanted, exc)
            found = {}
        return {vnf_id: found.get(vnf_id) for vnf_id in wanted}

    async def _execute(self, plans: Sequence[VmPlan]) -> list[VmPlan]:
        """Ask the world for the plans' actions in one request (in order, each on its own, as a
        VNFM acting on several VNFs at once); a refused action leaves its VM to the VIM."""
        acting = [p for p in plans if p.action is not WorldAction.NONE]
        if not acting:
            return list(plans)
        try:
            results = await self.world.vnf_actions([_world_action(p) for p in acting])
        except WorldError as exc:
            if exc.status == 0:
                raise
            refused = {
                id(p): p.with_refusal(f"the world refused {p.action}: {exc.message}")
                for p in acting
            }
            return [refused.get(id(p), p) for p in plans]
        outcome = {
            id(p): p
            if result.error is None
            else p.with_refusal(f"the world refused {p.action}: {result.error}")
            for p, result in zip(acting, results, strict=True)
        }
        return [outcome.get(id(p), p) for p in plans]

    async def _refuse(self, notice: VnfMaintenanceNotified) -> BusinessMoveRefused:
        if notice.notice_id not in self.refused:
            self.refused.append(notice.notice_id)
        n = self.refused.index(notice.notice_id) + 1
        refusal = BusinessMoveRefused(
            **notice.caused(
                event_id=refusal_id(notice), occurred_at=self.clock(), producer=self.producer
            ),
            notice_id=notice.notice_id,
            vnfm_id=self.vnfm_id,
            reason=f"{self.refuse_reason} (refusal {n}/{self.refuse_first})",
        )
        log.info("%s: refusing notice %s for %s", self.producer, notice.notice_id, notice.node_id)
        await self.send(refusal)
        return refusal

    async def _work(self, notice: VnfMaintenanceNotified) -> None:
        """Stay busy `work_s` seconds, asking for more time every `heartbeat_every_s`."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.work_s
        beat = 0
        while (remaining := until - loop.time()) > 0:
            if self.heartbeat_every_s > 0:
                extend_by = self.extend_by_s or 2 * self.heartbeat_every_s
                await self.send(
                    MaintenanceDeadlineExtended(
                        **notice.caused(
                            event_id=heartbeat_id(notice, beat),
                            occurred_at=self.clock(),
                            producer=self.producer,
                        ),
                        notice_id=notice.notice_id,
                        vnfm_id=self.vnfm_id,
                        extend_by_s=extend_by,
                        reason=f"still working ({remaining:.1f} s to go)",
                    )
                )
                beat += 1
                await asyncio.sleep(min(remaining, self.heartbeat_every_s))
            else:
                await asyncio.sleep(remaining)

    async def handle_notice(self, notice: VnfMaintenanceNotified) -> Reply | None:
        """Move what can be moved and reply; None when the notice is not ours (or silent)."""
        if not addressed_to(notice, self.vnfm_id):
            log.debug("%s: notice %s is for %s", self.producer, notice.notice_id, notice.vnfm_id)
            return None
        if notice.notice_id in self.refused or len(self.refused) < self.refuse_first:
            return await self._refuse(notice)
        views = await self._views(a.vnf_id for a in notice.vnfs)
        plans = plan_notice(notice, self.vnfm_id, views)
        acted = plans if self.ack_without_acting else await self._execute(plans)
        done: list[VmPlan] = []
        for result in acted:
            if result.action is WorldAction.DRAIN and not self.ack_without_acting:
                self.drained.setdefault(notice.node_id, set()).add((result.vnf_id, result.vm_id))
            log.info("%s: %s/%s -> %s (%s)", self.producer, *_vm(result), result.reason)
            done.append(result)
        if self.silent:
            return None
        if self.work_s > 0:
            await self._work(notice)
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
        restoring = list(plan_restore(event, self.vnfm_id, views, sorted(remembered)))
        restored: list[tuple[str, str]] = []
        try:
            results = await self.world.vnf_actions(
                [VnfAction(vnf_id=v, action="restore", member=m) for v, m in restoring]
            )
        except WorldError as exc:
            if exc.status == 0:
                raise
            log.warning("%s: restoring %s refused: %s", self.producer, restoring, exc)
        else:
            for (vnf_id, member), result in zip(restoring, results, strict=True):
                if result.error is None:
                    restored.append((vnf_id, member))
                else:
                    log.warning(
                        "%s: restoring %s/%s refused: %s",
                        self.producer,
                        vnf_id,
                        member,
                        result.error,
                    )
        self.drained.pop(event.node_id, None)
        if self.recovery_signal:
            for vnf_id in event.vnf_ids:
                view = views.get(vnf_id)
                if view is not None and view.vnfm_id == self.vnfm_id:
                    task = asyncio.create_task(self._signal_recovery(vnf_id, event.event_id))
                    self.background.add(task)
                    task.add_done_callback(self.background.discard)
        return tuple(restored)

    async def _signal_recovery(self, vnf_id: str, cause: uuid.UUID) -> None:
        """Send VnfRecovered once the world shows the VNF's redundancy restored."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.recovery_timeout_s
        while loop.time() < give_up:
            try:
                if vnf_recovered(await self.world.vnf(vnf_id)):
                    await self.send(
                        VnfRecovered(
                            event_id=recovered_id(self.vnfm_id, vnf_id, cause),
                            causation_id=cause,
                            occurred_at=self.clock(),
                            producer=self.producer,
                            vnfm_id=self.vnfm_id,
                            vnf_id=vnf_id,
                        )
                    )
                    log.info("%s: %s recovered", self.producer, vnf_id)
                    return
            except WorldError as exc:
                log.warning("%s: polling %s: %s", self.producer, vnf_id, exc)
            except Exception:
                log.exception("%s: VnfRecovered for %s not sent", self.producer, vnf_id)
                return
            await asyncio.sleep(self.recovery_poll_s)
        log.warning(
            "%s: %s did not recover in %.0f s", self.producer, vnf_id, self.recovery_timeout_s
        )

    async def wait_background(self) -> None:
        """Wait for the recovery pollers (tests)."""
        while self.background:
            await asyncio.gather(*self.background, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)


def _world_action(plan: VmPlan) -> VnfAction:
    if plan.action is WorldAction.SWITCH_OVER:
        assert plan.to_member is not None, "a switch-over plan names the member taking over"
        return VnfAction(vnf_id=plan.vnf_id, action="switchover", member=plan.to_member)
    return VnfAction(vnf_id=plan.vnf_id, action="drain", member=plan.vm_id)


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
    parser.add_argument(
        "--reply-delay-s", type=float, help="wait before each reply, even past the deadline"
    )
    parser.add_argument("--silent", action="store_true", default=None, help="act, but never reply")
    parser.add_argument("--refuse-first", type=int, help="refuse the first N notices")
    parser.add_argument("--refuse-reason", help="the reason given when refusing")
    parser.add_argument(
        "--heartbeat-every", type=float, help="seconds between deadline-extension heartbeats"
    )
    parser.add_argument("--work-s", type=float, help="seconds of work before replying")
    parser.add_argument("--extend-by-s", type=float, help="extension asked per heartbeat")
    parser.add_argument(
        "--recovery-signal",
        action="store_true",
        default=None,
        help="send VnfRecovered once a VNF's members are up and in sync after NodeAvailable",
    )
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
    setup_logging(args.log_level)
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
            ("refuse_first", args.refuse_first),
            ("refuse_reason", args.refuse_reason),
            ("heartbeat_every_s", args.heartbeat_every),
            ("work_s", args.work_s),
            ("extend_by_s", args.extend_by_s),
            ("recovery_signal", args.recovery_signal),
        )
        if value is not None
    }
    try:
        settings = ReferenceVnfmSettings(**overrides)
    except ValidationError as err:
        print(settings_error("reference vnfm", err), file=sys.stderr)
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
    from schemas.events import NoticeCancelled, NoticeExpired, VnfmReplyRejected
    from schemas.topics import VNFM_NOTICES, VNFM_REPLIES

    kafka = KafkaSettings()
    await ensure_topics(kafka, (VNFM_NOTICES, VNFM_REPLIES))
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, settings.group, kafka.topic(VNFM_NOTICES.name))
    world = WorldClient(settings.world_url)
    publisher = EventPublisher(producer, kafka)

    async def send(reply: Event) -> None:
        await publisher.publish(reply, VNFM_REPLIES)

    vnfm = ReferenceVnfm(
        world,
        settings.vnfm_id,
        send,
        reply_delay_s=settings.reply_delay_s,
        silent=settings.silent,
        ack_without_acting=settings.ack_without_acting,
        refuse_first=settings.refuse_first,
        refuse_reason=settings.refuse_reason,
        heartbeat_every_s=settings.heartbeat_every_s,
        work_s=settings.work_s,
        extend_by_s=settings.extend_by_s,
        recovery_signal=settings.recovery_signal,
    )

    working: dict[str, asyncio.Task[Reply | None]] = {}

    def finished(notice_id: str, task: asyncio.Task[Reply | None]) -> None:
        working.pop(notice_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: notice %s failed", vnfm.producer, notice_id, exc_info=task.exception())

    async def on_notice(event: VnfMaintenanceNotified, info: object) -> None:
        if vnfm.work_s <= 0:
            # (`--reply-delay-s` stays inline on purpose: it is the deliberately late VNFM.)
            await vnfm.handle_notice(event)
            return
        # Slow work runs beside the consume loop, so that a NoticeExpired or NoticeCancelled is
        # read while it works and the work is abandoned instead of answered late. (Its offset is
        # committed before it finishes: after a crash the adapter's deadline takes over.)
        task = asyncio.create_task(vnfm.handle_notice(event), name=f"notice-{event.notice_id}")
        working[event.notice_id] = task
        task.add_done_callback(functools.partial(finished, event.notice_id))

    async def on_available(event: NodeAvailable, info: object) -> None:
        restored = await vnfm.handle_node_available(event)
        if restored:
            log.info("%s: restored %s", vnfm.producer, restored)

    async def on_closed(event: NoticeExpired | NoticeCancelled, info: object) -> None:
        if event.vnfm_id == settings.vnfm_id:
            log.info("%s: %s %s", vnfm.producer, event.event_type, event.notice_id)
            task = working.pop(event.notice_id, None)
            if task is not None and not task.done():
                task.cancel()
                log.info("%s: abandoned the work on %s", vnfm.producer, event.notice_id)

    async def on_rejected(event: VnfmReplyRejected, info: object) -> None:
        if event.vnfm_id == settings.vnfm_id:
            log.warning(
                "%s: reply %s rejected (%s): %s",
                vnfm.producer,
                event.rejected_event_id,
                event.reason,
                event.detail,
            )

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
                    VnfmReplyRejected: on_rejected,
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
            await vnfm.close()
            await consumer.stop()
    finally:
        await producer.stop()
        await world.close()


if __name__ == "__main__":
    sys.exit(main())
