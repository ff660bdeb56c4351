"""The node agent process: heartbeats, its own partition of NODE_COMMANDS, the upgrade job.

Delivery: the agent reads only the partition its node's key is produced to (manual assignment,
so there is no group membership to lose while an upgrade runs) and commits through its own
consumer group. A request's offset is committed only after the job's final result is
published: the job runs as a background task, and `CommitGate` holds the commit below it. An
agent killed mid-upgrade therefore re-reads the request on restart, and the core answers it by
the same rules: the executor waits for the reboot still under way, or the node already runs
the target and the answer is `NodeUpgraded(applied=False)`.

Progress (`NodeUpgradeProgressed`) is best effort and must not hold the upgrade up: with a
`NodePublisher` it is handed to the producer without waiting for the broker's ack (a failed send
is logged). Records of one producer to one partition keep their order, so the final result,
which is published durably (waiting for its ack), still comes after the progress before it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, Protocol

from aiokafka.structs import TopicPartition

from escalator.bus import (
    BackgroundWork,
    EventConsumer,
    EventPublisher,
    RecordInfo,
    assign_own_partition,
)
from escalator.bus.consumer import is_transient_error
from escalator.bus.offsets import CommitGate, PollingConsumer
from escalator.bus.publisher import ProducerPort, event_headers
from escalator.settings import KafkaSettings
from schemas.codec import encode
from schemas.envelope import Event
from schemas.events import NodeAgentHeartbeat, NodeUpgradeRequested
from schemas.topics import NODE_COMMANDS, NODE_EVENTS, NODE_HEARTBEATS, TopicSpec
from services.node_agent.domain import (
    AgentContext,
    AgentState,
    Input,
    JobFailed,
    JobProgressed,
    JobResult,
    JobSucceeded,
    Publish,
    StartJob,
    decide,
    initial_state,
)
from services.node_agent.ports import ApplySucceeded, Executor
from services.node_agent.settings import NodeAgentSettings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# An apply that raised (outcome unknown, e.g. the world unreachable for long) is tried again:
# `Executor.apply` resumes a reboot under way, so a retry never applies twice.
APPLY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.2
RETRY_BACKOFF_MAX_S = 5.0


class NodePublisher(EventPublisher):
    """An `EventPublisher` that can also hand an event to the producer without waiting for
    the broker's acknowledgement (for best-effort progress)."""

    def __init__(self, producer: ProducerPort, settings: KafkaSettings) -> None:
        super().__init__(producer, settings)
        self._sender = producer

    async def publish_nowait(self, event: Event, spec: TopicSpec) -> asyncio.Future[Any]:
        """Queue `event` on `spec`'s topic after everything queued before it; returns the
        future of its acknowledgement. Raises ValueError like `publish`."""
        if not spec.carries(event.event_type):
            raise ValueError(f"topic {spec.name} does not carry {event.event_type}")
        future: asyncio.Future[Any] = await self._sender.send(
            self.settings.topic(spec.name),
            value=encode(event),
            key=spec.key_for(event),
            headers=event_headers(event),
        )
        return future


class AgentConsumer(PollingConsumer, Protocol):
    """An `AIOKafkaConsumer` created with this node's group id and no topics, started."""

    def partitions_for_topic(self, topic: str) -> Collection[int] | None: ...

    def assign(self, partitions: list[TopicPartition]) -> None: ...


class NodeAgentService:
    def __init__(
        self,
        settings: NodeAgentSettings,
        *,
        executor: Executor,
        consumer: AgentConsumer,
        publisher: EventPublisher,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._executor = executor
        self._consumer = consumer
        self._publisher = publisher
        self._clock = clock
        self._gate = CommitGate(consumer)
        self._jobs = BackgroundWork(f"{settings.producer} jobs")
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._state: AgentState | None = None
        self._loop: EventConsumer | None = None
        self.agent_id = f"{settings.producer}@{os.uname().nodename}:{os.getpid()}"
        self.partition: TopicPartition | None = None

    @property
    def state(self) -> AgentState | None:
        return self._state

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_stop()`; a running upgrade gets `shutdown_timeout_s` to end."""
        installed = await self._first_installed_version()
        if installed is None:
            return
        self._state = initial_state(installed)
        log.info("%s: node runs %s", self.settings.producer, installed)
        topic = self._publisher.settings.topic(NODE_COMMANDS.name)
        self.partition = await assign_own_partition(self._consumer, topic, self.settings.node_id)
        self._loop = EventConsumer(
            self._gate,
            self._publisher,
            group=self.settings.group_id,
            instance=self.agent_id,
            handlers={NodeUpgradeRequested: self._on_request},
            # A re-sent command means its sender may have lost our answer (it restarted before
            # recording it): the handlers are idempotent by state and answer it again.
            dedupe_capacity=0,
            background=self._jobs,
            shutdown_timeout_s=self.settings.shutdown_timeout_s,
        )
        heartbeats = asyncio.create_task(self._heartbeats(), name="heartbeats")
        try:
            if self._stop.is_set():
                self._loop.request_stop()
            await self._loop.run()
        finally:
            heartbeats.cancel()
            await asyncio.gather(heartbeats, return_exceptions=True)

    def request_stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.request_stop()

    async def _first_installed_version(self) -> str | None:
        delay = RETRY_BACKOFF_S
        while not self._stop.is_set():
            try:
                return await self._executor.installed_version()
            except Exception as exc:
                log.warning("cannot read the installed version yet: %r", exc)
                await self._sleep_unless_stopped(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
        return None

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    # --- heartbeats ----------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            state = self._state
            if state is not None:
                beat = NodeAgentHeartbeat(
                    node_id=self.settings.node_id,
                    agent_id=self.agent_id,
                    installed_version=state.installed_version,
                    interval_s=interval,
                    busy=state.busy,
                    producer=self.settings.producer,
                    occurred_at=self._clock(),
                )
                try:
                    await self._publisher.publish(beat, NODE_HEARTBEATS)
                except Exception as exc:
                    log.warning("heartbeat not published: %r", exc)
            self._state_changed.clear()
            # A finished upgrade is announced at once rather than at the next tick.
            try:
                await asyncio.wait_for(self._state_changed.wait(), interval)
            except TimeoutError:
                pass

    # --- the core and its commands -------------------------------------------------------------

    def _ctx(self) -> AgentContext:
        return AgentContext(
            node_id=self.settings.node_id, producer=self.settings.producer, now=self._clock()
        )

    async def _on_request(self, event: NodeUpgradeRequested, info: RecordInfo) -> None:
        async with self._lock:
            assert self._state is not None
            state, commands = decide(self._state, event, self._ctx())
            # Publish before adopting the new state: if publishing raises, the consume loop
            # retries the record and the core decides it afresh (reply ids are stable).
            for command in commands:
                if isinstance(command, Publish):
                    await self._publisher.publish(command.event, NODE_EVENTS)
            self._adopt(state)
            for command in commands:
                if isinstance(command, StartJob):
                    tp = TopicPartition(info.topic, info.partition)
                    self._gate.hold(tp, info.offset)
                    self._jobs.spawn(
                        self._run_job(command, tp, info.offset), name=f"upgrade {event.event_id}"
                    )

    def _adopt(self, state: AgentState) -> None:
        previous = self._state
        self._state = state
        if previous is None or (previous.installed_version, previous.busy) != (
            state.installed_version,
            state.busy,
        ):
            self._state_changed.set()

    async def _run_job(self, start: StartJob, tp: TopicPartition, offset: int) -> None:
        result = await self._apply(start)
        await self._feed(result, durable=True)
        # Only now is the request answered for good: let its offset be committed.
        await self._gate.release(tp, offset)

    async def _apply(self, start: StartJob) -> JobResult:
        async def on_progress(phase: str, percent: float) -> None:
            await self._feed(JobProgressed(start.command_id, phase, percent), durable=False)

        delay = RETRY_BACKOFF_S
        for attempt in range(1, APPLY_ATTEMPTS + 1):
            try:
                outcome = await self._executor.apply(start.manifest, on_progress)
            except Exception as exc:
                log.warning("apply attempt %d raised: %r", attempt, exc)
                if attempt == APPLY_ATTEMPTS:
                    return JobFailed(
                        start.command_id, f"outcome unknown: {type(exc).__name__}: {exc}", "apply"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
                continue
            if isinstance(outcome, ApplySucceeded):
                if not outcome.started_here:
                    log.info(
                        "the upgrade to %s was already under way; waited for it", outcome.version
                    )
                return JobSucceeded(start.command_id, outcome.version)
            return JobFailed(
                start.command_id, outcome.reason, outcome.phase, outcome.installed_version
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _feed(self, result: Input, *, durable: bool) -> None:
        """Run a job result through the core and publish its replies.

        `durable`: retry publishing until it works (a final result must not be lost); progress
        is best effort and never holds the upgrade up.
        """
        async with self._lock:
            assert self._state is not None
            state, commands = decide(self._state, result, self._ctx())
            for command in commands:
                if isinstance(command, Publish):
                    await self._publish(command.event, durable=durable)
            self._adopt(state)

    async def _publish(self, event: Any, *, durable: bool) -> None:
        if not durable and isinstance(self._publisher, NodePublisher):
            try:
                ack = await self._publisher.publish_nowait(event, NODE_EVENTS)
            except Exception as exc:
                log.warning("%s not published: %r", event.event_type, exc)
                return
            ack.add_done_callback(lambda done: _log_lost(event, done))
            return
        delay = RETRY_BACKOFF_S
        while True:
            try:
                await self._publisher.publish(event, NODE_EVENTS)
                return
            except Exception as exc:
                if not durable:
                    log.warning("%s not published: %r", event.event_type, exc)
                    return
                if not is_transient_error(exc):
                    raise
                log.warning("%s not published yet: %r; retrying", event.event_type, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)


def _log_lost(event: Any, ack: asyncio.Future[Any]) -> None:
    if ack.cancelled():
        log.warning("%s not published: cancelled", event.event_type)
    elif ack.exception() is not None:
        log.warning("%s not published: %r", event.event_type, ack.exception())


def bootstrap(
    settings: NodeAgentSettings,
    *,
    executor: Executor,
    consumer: AgentConsumer,
    publisher: EventPublisher,
    clock: Clock,
) -> NodeAgentService:
    """Wire a node agent. The consumer (this node's group, no topics) and the publisher's
    producer are started and stopped by the caller; `run()` assigns the partition."""
    return NodeAgentService(
        settings, executor=executor, consumer=consumer, publisher=publisher, clock=clock
    )


__all__ = ["AgentConsumer", "NodeAgentService", "NodePublisher", "bootstrap"]
