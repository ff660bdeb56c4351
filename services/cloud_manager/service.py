"""The Cloud Manager process: CLOUD_COMMANDS in, CLOUD_EVENTS out, the cloud in between.

Each command's work (a claim, a migration of half a second or more, a release) runs as a
background task so that one node's many migrations proceed side by side, ordered only by
`NodeLanes`. The offset of a command is committed only once its reply is published:
`CommitGate` caps the consume loop's commits at the oldest unfinished command of each partition
(at least once; the core makes a redone command produce the same reply).

A cloud that cannot be reached is retried until it answers (or the service stops): answering
"failed" because the API blinked would make the Upgrade Manager give up on a healthy node. A
command the core cannot answer at all (listing an unknown node) is dead-lettered.

Beside the commands, `InventoryReporter` publishes the inventory on CLOUD_INVENTORY (every node
on start, the nodes a command changed right after its reply, changes found by a periodic
refresh); see `inventory.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from escalator.bus import (
    BackgroundWork,
    EventConsumer,
    EventPublisher,
    RecordInfo,
    deliver_dead_letter,
)
from escalator.bus.consumer import HANDLER_ERROR, is_transient_error
from escalator.bus.offsets import CommitGate, PollingConsumer
from schemas.codec import encode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event, utcnow
from schemas.events import (
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    VmListRequested,
    VmMigrationRequested,
)
from schemas.topics import CLOUD_COMMANDS, CLOUD_EVENTS
from schemas.types import VmOnNode
from services.cloud_manager import domain
from services.cloud_manager.domain import ReplyContext, VmLocation
from services.cloud_manager.inventory import InventoryReporter
from services.cloud_manager.lanes import NodeLanes, wait_quietly
from services.cloud_manager.ports import (
    ClaimRefused,
    CloudBackend,
    CloudRefusal,
    CloudUnavailable,
    MigrationRefused,
    ReleaseRefused,
    UnknownNode,
)
from services.cloud_manager.settings import CloudManagerSettings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
RETRY_BACKOFF_S = 0.2
RETRY_BACKOFF_MAX_S = 5.0
Command = NodeMaintenanceRequested | VmMigrationRequested | NodeMaintenanceExitRequested
AnyCommand = Command | VmListRequested


class GroupConsumer(PollingConsumer, Protocol):
    """An `AIOKafkaConsumer` created with the group id and no topics, started."""

    def subscribe(
        self, topics: list[str], *, listener: ConsumerRebalanceListener | None = None
    ) -> None: ...


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: CloudManagerService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._service._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class CommandFailed(Exception):
    """The command can be answered by no reply event: it goes to the dead-letter topic."""


class CloudManagerService:
    def __init__(
        self,
        settings: CloudManagerSettings,
        *,
        backend: CloudBackend,
        consumer: GroupConsumer,
        publisher: EventPublisher,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self._backend = backend
        self._consumer = consumer
        self._publisher = publisher
        self._clock = clock
        self.gate = CommitGate(consumer)
        self._work = BackgroundWork(f"{settings.instance_id} commands")
        self._lanes = NodeLanes()
        self._stop = asyncio.Event()
        self._loop: EventConsumer | None = None
        self.inventory = InventoryReporter(
            backend,
            publisher,
            producer=settings.instance_id,
            interval_s=settings.inventory_interval_s,
            full_every=settings.inventory_full_every,
            clock=clock,
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        topic = self._publisher.settings.topic(CLOUD_COMMANDS.name)
        self._consumer.subscribe([topic], listener=_Rebalance(self))
        handlers: dict[type[Event], Any] = {
            NodeMaintenanceRequested: self._on_command,
            VmMigrationRequested: self._on_command,
            NodeMaintenanceExitRequested: self._on_command,
            VmListRequested: self._on_command,
        }
        self._loop = EventConsumer(
            self.gate,
            self._publisher,
            group=self.settings.group_id,
            instance=self.settings.instance_id,
            handlers=handlers,
            # A re-sent command means its sender may have lost our answer (it restarted before
            # recording it): the handlers are idempotent by state and answer it again.
            dedupe_capacity=0,
            background=self._work,
            shutdown_timeout_s=self.settings.shutdown_timeout_s,
        )
        if self._stop.is_set():
            self._loop.request_stop()
        reporter = asyncio.create_task(self.inventory.run(), name="inventory")
        try:
            await self._loop.run()
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)

    def request_stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.request_stop()

    async def _on_revoked(self, revoked: Collection[TopicPartition]) -> None:
        # Give running commands a moment to publish and commit, so that the next owner redoes
        # as little as possible; whatever is left is redone by it (idempotently).
        if not await self.gate.settle(
            revoked, timeout_s=min(10.0, self.settings.shutdown_timeout_s)
        ):
            log.warning("partitions revoked with commands still running; they will be redone")
        self.gate.forget(revoked)

    # --- dispatch ------------------------------------------------------------------------------

    async def _on_command(self, cmd: AnyCommand, info: RecordInfo) -> None:
        """Start the command's work in the background; its offset stays held until replied."""
        if cmd.campaign_id is None:
            # Its reply could not be keyed on the campaign-keyed events topic: refuse it before
            # touching the cloud, so it can never hold the partition.
            await self._dead_letter(cmd, info, "a cloud command needs a campaign_id to be answered")
            return
        tp = TopicPartition(info.topic, info.partition)
        exclusive = isinstance(cmd, NodeMaintenanceRequested | NodeMaintenanceExitRequested)
        before = self._lanes.prerequisites(cmd.node_id, exclusive=exclusive)
        self.gate.hold(tp, info.offset)
        task = self._work.spawn(
            self._answer(cmd, info, tp, before), name=f"{cmd.event_type} {cmd.event_id}"
        )
        self._lanes.admitted(cmd.node_id, task, exclusive=exclusive)

    async def _answer(
        self, cmd: AnyCommand, info: RecordInfo, tp: TopicPartition, before: set[Any]
    ) -> None:
        await wait_quietly(before)
        try:
            reply = await self._until_answered(cmd)
        except CommandFailed as err:
            await self._dead_letter(cmd, info, str(err))
        except Exception as exc:
            log.exception("%s %s: unexpected failure", cmd.event_type, cmd.event_id)
            await self._dead_letter(cmd, info, f"{type(exc).__name__}: {exc}")
        else:
            await self._publish(reply)
            self.inventory.touched(domain.nodes_changed_by(reply))
        await self.gate.release(tp, info.offset)

    async def _until_answered(self, cmd: AnyCommand) -> Event:
        delay = RETRY_BACKOFF_S
        while True:
            try:
                return await self.reply_to(cmd)
            except CloudUnavailable as err:
                log.warning(
                    "%s %s: cloud unavailable (%s); retrying in %.1fs",
                    cmd.event_type,
                    cmd.event_id,
                    err.reason,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_BACKOFF_MAX_S)

    # --- one command: backend calls as the core directs ----------------------------------------

    def _ctx(self) -> ReplyContext:
        return ReplyContext(producer=self.settings.instance_id, now=self._clock())

    async def reply_to(self, cmd: AnyCommand) -> Event:
        """The reply to one command, after doing what it asks. Raises `CloudUnavailable`
        (retry later) or `CommandFailed` (no reply is possible)."""
        match cmd:
            case NodeMaintenanceRequested():
                return await self._enter_maintenance(cmd)
            case VmMigrationRequested():
                return await self._migrate(cmd)
            case NodeMaintenanceExitRequested():
                return await self._exit_maintenance(cmd)
            case VmListRequested():
                try:
                    vms = await self._backend.list_vms(cmd.node_id)
                except UnknownNode as err:
                    raise CommandFailed(err.reason) from err
                return domain.vm_list_reported(cmd, vms, self._ctx()).event
        raise TypeError(f"unexpected command {cmd!r}")  # pragma: no cover

    async def _enter_maintenance(self, cmd: NodeMaintenanceRequested) -> Event:
        answer: domain.Claimed | domain.ClaimRefused
        vms: list[VmOnNode] = []
        try:
            status, vms = await self._backend.claim_and_list_vms(cmd.node_id, cmd.holder)
            answer = domain.Claimed(status)
        except (ClaimRefused, UnknownNode) as err:
            answer = domain.ClaimRefused(err.reason, err.current_holder)
        step = domain.after_claim(cmd, answer, self._ctx())
        if isinstance(step, domain.Reply):
            return step.event
        # Listed only once the claim held (the port's contract): nothing can land after it.
        return domain.maintenance_entered(cmd, step, vms, self._ctx()).event

    async def _exit_maintenance(self, cmd: NodeMaintenanceExitRequested) -> Event:
        answer: domain.Released | domain.ReleaseRefused
        try:
            answer = domain.Released(
                await self._backend.release_maintenance(cmd.node_id, cmd.holder)
            )
        except (ReleaseRefused, UnknownNode) as err:
            answer = domain.ReleaseRefused(err.reason, err.current_holder)
        return domain.after_release(cmd, answer, self._ctx()).event

    async def _migrate(self, cmd: VmMigrationRequested) -> Event:
        refused: str | None = None
        tried: str | None = None  # the destination our last migration was refused or failed on
        rounds = 0
        # Where our last migration left the VM, as the backend read it when the migration
        # ended: the next step is decided on that read rather than on another one.
        landed: VmLocation | None = None
        while True:
            if landed is None:
                location = await self._backend.vm_location(cmd.vm_id)
            else:
                location, landed = landed, None
            step = domain.next_migration_step(
                cmd,
                location,
                self._ctx(),
                refused=refused,
                refused_destination=tried,
                rounds=rounds,
            )
            rounds += 1
            refused = tried = None
            match step:
                case domain.Reply():
                    return step.event
                case domain.WaitForMigration():
                    await self._backend.wait_vm_settled(step.vm_id)
                case domain.StartMigration():
                    try:
                        node_id = await self._backend.migrate_vm(
                            step.vm_id, step.source, step.destination, step.avoid
                        )
                        landed = VmLocation(vm_id=step.vm_id, node_id=node_id, migrating_to=None)
                    except MigrationRefused as err:
                        refused, tried = err.reason, err.destination
                    except CloudRefusal as err:  # pragma: no cover - backends raise the above
                        refused = err.reason

    # --- publishing ----------------------------------------------------------------------------

    async def _publish(self, reply: Event) -> None:
        delay = RETRY_BACKOFF_S
        while True:
            try:
                await self._publisher.publish(reply, CLOUD_EVENTS)
                return
            except Exception as exc:
                if not is_transient_error(exc):
                    raise
                log.warning("%s not published yet: %r; retrying", reply.event_type, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_BACKOFF_MAX_S)

    async def _dead_letter(self, cmd: AnyCommand, info: RecordInfo, detail: str) -> None:
        log.error("%s %s dead-lettered: %s", cmd.event_type, cmd.event_id, detail)
        dead = DeadLetter(
            source_topic=info.topic,
            partition=info.partition,
            offset=info.offset,
            consumer_group=info.consumer_group,
            consumer=info.consumer,
            reason=HANDLER_ERROR,
            detail=detail,
            event_type=cmd.event_type,
            key_b64=DeadLetter.b64(info.key),
            value_b64=DeadLetter.b64(encode(cmd)),
            headers=tuple((k, DeadLetter.b64(v) or "") for k, v in info.headers),
        )
        await deliver_dead_letter(
            self._publisher, dead, backoff_s=RETRY_BACKOFF_S, backoff_max_s=RETRY_BACKOFF_MAX_S
        )


def bootstrap(
    settings: CloudManagerSettings,
    *,
    backend: CloudBackend,
    consumer: GroupConsumer,
    publisher: EventPublisher,
    clock: Clock = utcnow,
) -> CloudManagerService:
    """Wire the Cloud Manager. The consumer (group id, no topics) and the publisher's producer
    are started and stopped by the caller; `run()` subscribes to CLOUD_COMMANDS."""
    return CloudManagerService(
        settings, backend=backend, consumer=consumer, publisher=publisher, clock=clock
    )


__all__ = ["CloudManagerService", "CommandFailed", "GroupConsumer", "bootstrap"]
