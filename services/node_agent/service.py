"""The node agent process: heartbeats, its own partition of NODE_COMMANDS, the upgrade job.

Delivery: the agent reads only the partition its node's key is produced to (manual assignment,
so there is no group membership to lose while an upgrade runs) and commits through its own
consumer group. A request's offset is committed only after the job's final result is
published: the job runs as a background task, and `CommitGate` holds the commit below it. An
agent killed mid-upgrade therefore re-reads the request on restart, and the core answers it by
the same rules: the executor waits for the reboot still under way, or the node already runs
the target and the answer is `NodeUpgraded(applied=False)`.

A job (an upgrade with its retries, backoff, rollback and health check, or a rollback asked for
by `NodeRollbackRequested`) is a sequence of steps the core asks for (`domain.JobCommand`); one
background task per job runs them in order and feeds each result back to the core. A request
that joins the running job (an abort's rollback request, a re-sent attempt) is held with it, and
every held offset is released when the job's final answers are published. After a restart the
first step (`Inspect`, the executor's record) lets the core resume a retry or a rollback under
way instead of starting over.

Progress (`NodeUpgradeProgressed`) is best effort and must not hold the upgrade up: with a
`NodePublisher` it is handed to the producer without waiting for the broker's ack (a failed send
is logged), and so is the acceptance (`NodeUpgradeAccepted`), which records nothing: the request
itself stays uncommitted until the final result is acknowledged. Records of one producer to one
partition keep their order, so the final result, which is published durably (waiting for its
ack), still comes after the acceptance and progress before it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
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
from schemas.events import (
    NodeAgentHeartbeat,
    NodeRollbackRequested,
    NodeUpgradeAccepted,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
)
from schemas.topics import NODE_COMMANDS, NODE_EVENTS, NODE_HEARTBEATS, TopicSpec
from services.node_agent.domain import (
    AgentContext,
    AgentState,
    CheckHealth,
    HealthChecked,
    Ignore,
    Input,
    Inspect,
    Inspected,
    Job,
    JobCommand,
    JobFailed,
    JobProgressed,
    JobResult,
    JobSucceeded,
    Publish,
    RetryDue,
    RetryPolicy,
    RollbackFinished,
    ScheduleRetry,
    StartJob,
    StartRollback,
    decide,
    initial_state,
)
from services.node_agent.ports import ApplySucceeded, Executor, RollbackSucceeded
from services.node_agent.settings import NodeAgentSettings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Backoff of the agent's own plumbing (reading the installed version, publishing a result). An
# apply that fails or raises is retried by the core (`RetryPolicy`, from the settings).
RETRY_BACKOFF_S = 0.2
RETRY_BACKOFF_MAX_S = 5.0


_JOB_STEPS = (Inspect, StartJob, ScheduleRetry, StartRollback, CheckHealth)


@dataclass
class _JobRunner:
    """The task that runs one job's steps in order, and the requests whose offsets it holds
    (the request that started the job and any that joined it): all are released, so that their
    offsets can be committed, only once the job's final answers are published."""

    command_id: uuid.UUID
    holds: list[tuple[TopicPartition, int]] = field(default_factory=list)
    _steps: collections.deque[JobCommand] = field(default_factory=collections.deque)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, step: JobCommand) -> None:
        self._steps.append(step)
        self._arrived.set()

    async def next_step(self) -> JobCommand:
        while not self._steps:
            self._arrived.clear()
            await self._arrived.wait()
        return self._steps.popleft()

    async def step_arrives_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as a step is pushed (the core moved on)."""
        if self._steps:
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), seconds)
        except TimeoutError:
            return bool(self._steps)
        return True


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
        self._runner: _JobRunner | None = None
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
            handlers={
                NodeUpgradeRequested: self._on_request,
                NodeRollbackRequested: self._on_request,
            },
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
        settings = self.settings
        return AgentContext(
            node_id=settings.node_id,
            producer=settings.producer,
            now=self._clock(),
            policy=RetryPolicy(
                max_apply_attempts=settings.max_apply_attempts,
                backoff_s=settings.apply_backoff_s,
                backoff_max_s=settings.apply_backoff_max_s,
            ),
        )

    async def _on_request(
        self, event: NodeUpgradeRequested | NodeRollbackRequested, info: RecordInfo
    ) -> None:
        async with self._lock:
            assert self._state is not None
            state, commands = decide(self._state, event, self._ctx())
            # Publish before adopting the new state: if publishing raises, the consume loop
            # retries the record and the core decides it afresh (reply ids are stable).
            for command in commands:
                if isinstance(command, Publish):
                    await self._publish_reply(command.event)
                elif isinstance(command, Ignore):
                    self._log_ignored(command, info)
            self._adopt(state)
            job = state.job
            if job is None or event.event_id not in _requests_of(job):
                return
            # The request started the job or joined it: its offset is held until the job ends.
            runner = self._runner
            if runner is None or runner.command_id != job.command_id:
                runner = self._runner = _JobRunner(job.command_id)
                self._jobs.spawn(self._run_job(runner), name=f"job {job.command_id}")
            tp = TopicPartition(info.topic, info.partition)
            self._gate.hold(tp, info.offset)
            runner.holds.append((tp, info.offset))
            for command in commands:
                if isinstance(command, _JOB_STEPS):
                    runner.push(command)

    def _log_ignored(self, ignore: Ignore, info: RecordInfo) -> None:
        if info.key == self.settings.node_id.encode():
            # Keyed to this node yet naming another: misrouted or forged; never acted on.
            log.warning("%s", ignore.reason)
        else:
            log.debug("%s", ignore.reason)

    async def _publish_reply(self, event: Event) -> None:
        """A reply to a request. The acceptance of a job is not waited for: the request stays
        uncommitted until the job's final result is acknowledged (`CommitGate`), so the
        acceptance records nothing a crash could lose, and it goes out before the job's
        progress and result (one producer, one partition). Final answers wait for their ack."""
        if isinstance(event, NodeUpgradeAccepted) and isinstance(self._publisher, NodePublisher):
            ack = await self._publisher.publish_nowait(event, NODE_EVENTS)
            ack.add_done_callback(lambda done: _log_lost(event, done))
            return
        await self._publisher.publish(event, NODE_EVENTS)

    def _adopt(self, state: AgentState) -> None:
        previous = self._state
        self._state = state
        if previous is None or (previous.installed_version, previous.busy) != (
            state.installed_version,
            state.busy,
        ):
            self._state_changed.set()

    async def _run_job(self, runner: _JobRunner) -> None:
        """Run the job's steps as the core asks for them, until the job is over; then let the
        offsets of its requests be committed. Cancelled (a stop), it leaves them uncommitted:
        the next start re-reads them and re-derives the job from the executor's record."""
        while True:
            step = await runner.next_step()
            result = await self._execute(step, runner)
            if result is not None and await self._feed(result, runner):
                break
        for tp, offset in runner.holds:
            await self._gate.release(tp, offset)

    async def _execute(self, step: JobCommand, runner: _JobRunner) -> JobResult | None:
        """One step, as a result for the core (None: the step was superseded)."""
        executor = self._executor
        match step:
            case Inspect():
                try:
                    record = await executor.record()
                except Exception as exc:
                    log.warning("cannot read the executor's record: %r", exc)
                    return Inspected(step.command_id, None)
                return Inspected(step.command_id, record)
            case StartJob():
                return await self._apply(step, runner)
            case ScheduleRetry():
                log.info("apply attempt %d in %.1fs", step.attempt, step.delay_s)
                if await runner.step_arrives_within(step.delay_s):
                    return None  # the core moved on (a rollback request ended the retries)
                return RetryDue(step.command_id, step.attempt)
            case StartRollback():
                return await self._rollback(step, runner)
            case CheckHealth():
                try:
                    report = await executor.health(step.expected_version)
                except Exception as exc:
                    assert self._state is not None
                    reason = f"health unknown: {type(exc).__name__}: {exc}"
                    return HealthChecked(
                        step.command_id, False, self._state.installed_version, reason
                    )
                return HealthChecked(
                    step.command_id, report.healthy, report.installed_version, report.reason
                )
        raise AssertionError(f"unexpected step {step!r}")  # pragma: no cover

    async def _apply(self, start: StartJob, runner: _JobRunner) -> JobResult:
        async def on_progress(phase: str, percent: float) -> None:
            await self._feed(JobProgressed(start.command_id, phase, percent), runner)

        try:
            outcome = await self._executor.apply(start.manifest, on_progress)
        except Exception as exc:
            # Outcome unknown: the core counts it as a failed attempt; the next attempt's
            # `apply` resumes a reboot under way, so it never applies twice.
            log.warning("apply attempt %d raised: %r", start.attempt, exc)
            return JobFailed(
                start.command_id, f"outcome unknown: {type(exc).__name__}: {exc}", "apply"
            )
        if isinstance(outcome, ApplySucceeded):
            if not outcome.started_here:
                log.info("the upgrade to %s was already under way; waited for it", outcome.version)
            return JobSucceeded(start.command_id, outcome.version)
        log.warning(
            "apply attempt %d failed (%s): %s", start.attempt, outcome.phase, outcome.reason
        )
        return JobFailed(
            start.command_id,
            outcome.reason,
            outcome.phase,
            outcome.installed_version,
            retryable=outcome.retryable,
        )

    async def _rollback(self, step: StartRollback, runner: _JobRunner) -> JobResult:
        async def on_progress(phase: str, percent: float) -> None:
            await self._feed(JobProgressed(step.command_id, phase, percent), runner)

        try:
            outcome = await self._executor.rollback(step.to_version, on_progress)
        except Exception as exc:
            log.warning("rollback to %s raised: %r", step.to_version, exc)
            reason = f"outcome unknown: {type(exc).__name__}: {exc}"
            return RollbackFinished(step.command_id, False, None, reason)
        if isinstance(outcome, RollbackSucceeded):
            log.info("rolled back to %s", outcome.version)
            return RollbackFinished(step.command_id, True, outcome.version)
        log.warning("rollback to %s failed: %s", step.to_version, outcome.reason)
        return RollbackFinished(step.command_id, False, outcome.installed_version, outcome.reason)

    async def _feed(self, result: Input, runner: _JobRunner) -> bool:
        """Run a job result through the core, publish its replies (progress best effort, the
        rest durably: a final result must not be lost) and queue the steps it asks for.
        True once the runner's job is over."""
        async with self._lock:
            assert self._state is not None
            state, commands = decide(self._state, result, self._ctx())
            for command in commands:
                if isinstance(command, Publish):
                    best_effort = isinstance(command.event, NodeUpgradeProgressed)
                    await self._publish(command.event, durable=not best_effort)
            self._adopt(state)
            for command in commands:
                if isinstance(command, _JOB_STEPS):
                    runner.push(command)
            over = state.job is None or state.job.command_id != runner.command_id
            if over and self._runner is runner:
                self._runner = None
            return over

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


def _requests_of(job: Job) -> set[uuid.UUID]:
    """The requests a job answers: the one that started it and those that joined it."""
    ids = {job.command_id}
    for reply in (job.reply, job.rollback_reply):
        if reply is not None:
            ids.add(reply.request_id)
    return ids


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
