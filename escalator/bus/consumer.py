"""The consume loop every edge service runs: decode, dispatch, dead-letter, commit.

Delivery is **at least once**. An offset is committed only after the record's handler returned,
and handlers publish their effects with `EventPublisher.publish` (which waits for the broker's
ack), so a committed record's effects are durable. A crash, a rebalance or a cancellation
between a handler's return and the commit redelivers the record: **handlers must be
idempotent**. The consumer also drops events whose `event_id` it handled recently (a bounded
LRU per consumer), which removes most duplicates cheaply but is not a guarantee (it is lost on
restart, and another group member does not share it).

Per record:

* bytes that `schemas.codec.decode` rejects (garbage, wrong shape, unknown type, too-new
  `schema_version`) go to the dead-letter topic as a `DeadLetter` and are committed;
* a valid event of a type without a handler is ignored (counted, committed), not dead-lettered;
* a handler that raises is retried with capped exponential backoff, then the record is
  dead-lettered with reason ``handler_error``. One record never stops the loop. Only while Kafka
  itself is unreachable (a retriable Kafka error from the handler's own publishing) is the
  record retried without limit, since dead-lettering every good record during an outage would
  be worse than waiting.

Records of one partition are processed one after the other, in offset order; offsets are
committed per partition after each fetched batch (and on a graceful stop). With
`commit_interval_s` > 0 they are committed at most that often instead (and whenever a poll
comes back empty, and on a graceful stop): a request/reply service then does not pay a commit
round trip between two inputs. `before_commit` runs before every commit: a service whose
handlers hand writes to the producer without waiting for their ack waits for them there, so a
committed offset still means durable effects. Offsets not yet committed when a partition is
taken away or the process dies are redelivered, as at-least-once delivery allows.

Long work (an upgrade that takes minutes) must not run inside a handler: while a handler runs,
the loop does not poll, and a consumer that does not poll within ``max_poll_interval_ms`` is
evicted from its group. Record the command first (publish an "accepted" event), then hand the
long part to `BackgroundWork.spawn` and return; the loop commits and keeps polling. The long
part runs outside the at-least-once guarantee, so it must report its own outcome, and the
requester's deadline (re-sending a command with the same deterministic id) covers a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from aiokafka.errors import ConsumerStoppedError, KafkaError, KafkaTimeoutError
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from escalator.bus.publisher import DeadLetterSink
from schemas.codec import MAX_EVENT_BYTES, InvalidEvent, decode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event

__all__ = [
    "HANDLER_ERROR",
    "BackgroundWork",
    "BusMetrics",
    "ConsumerPort",
    "EventConsumer",
    "Handler",
    "RecordInfo",
    "RecordPort",
    "dead_letter_for",
    "is_transient_error",
]

log = logging.getLogger(__name__)

HANDLER_ERROR = "handler_error"
CONSUMER_ERROR = "consumer_error"

# What the request/reply services pass as `commit_interval_s`: the redelivery a crash can cause
# stays below half a second of inputs (the Upgrade Manager uses the same bound).
LAZY_COMMIT_INTERVAL_S = 0.5

# A dead letter carries the record base64-encoded; keep it well under the broker's max size.
MAX_DEAD_LETTER_VALUE_BYTES = MAX_EVENT_BYTES // 2
MAX_DETAIL_CHARS = 4000
# Keys and headers are kept too, but bounded: the whole dead letter (base64 adds a third) must
# stay under the broker's 1 MiB message limit, or it could never be written and the partition
# would be stuck behind it.
MAX_DEAD_LETTER_KEY_BYTES = 16 * 1024
MAX_DEAD_LETTER_HEADER_BYTES = 16 * 1024


class RecordPort(Protocol):
    """The fields of an `aiokafka.structs.ConsumerRecord` the consumer reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class ConsumerPort(Protocol):
    """What `EventConsumer` calls on an `AIOKafkaConsumer`.

    A test double (one that duplicates, delays or reorders records across partitions) may wrap
    a real consumer and be passed instead. Starting and stopping the consumer is its owner's job.
    """

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[RecordPort]]: ...

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None: ...


@dataclass(frozen=True)
class RecordInfo:
    """Where the event being handled came from, and which attempt this is (1 = first)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int
    consumer_group: str
    consumer: str
    attempt: int = 1


Handler = Callable[[Any, RecordInfo], Awaitable[None]]


class BusMetrics:
    """Prometheus counters of the consume loop, labelled by consumer group.

    Pass a private `CollectorRegistry` (tests) or use `BusMetrics.default()`, which registers
    once on the global registry so that several consumers in one process share the counters.
    """

    _default: BusMetrics | None = None

    def __init__(self, registry: CollectorRegistry | None) -> None:
        def counter(name: str, doc: str, labels: Sequence[str] = ("group",)) -> Counter:
            return Counter(f"escalator_bus_{name}", doc, list(labels), registry=registry)

        self.registry = registry
        self.consumed = counter("records_consumed", "Records fetched by the consume loop.")
        self.handled = counter("records_handled", "Records whose handler returned.")
        self.ignored = counter("records_ignored", "Valid events without a handler (skipped).")
        self.duplicates = counter("records_duplicate", "Events skipped as recent duplicates.")
        self.dead_lettered = counter(
            "records_dead_lettered", "Records sent to the dead-letter topic.", ("group", "reason")
        )
        self.handler_errors = counter("handler_errors", "Handler attempts that raised.")
        self.commit_failures = counter("commit_failures", "Offset commits that failed.")

    @classmethod
    def default(cls) -> BusMetrics:
        if cls._default is None:
            cls._default = cls(REGISTRY)
        return cls._default


class BackgroundWork:
    """Tracks tasks a handler starts to run outside the poll loop (e.g. a node upgrade).

    `spawn` returns at once; a task's exception is logged (never lost, never raised into the
    loop). `aclose` waits for running tasks up to a timeout and cancels the rest; the
    `EventConsumer` it is passed to calls it when its loop ends.
    """

    def __init__(self, name: str = "background") -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.failures = 0

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str | None = None
    ) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name}: closed, no new background work")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            log.info("%s: task %s cancelled", self.name, task.get_name())
            return
        exc = task.exception()
        if exc is not None:
            self.failures += 1
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=exc)

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the current tasks; True if none is left running."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not self._tasks

    async def cancel(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def aclose(self, timeout_s: float | None = 30.0) -> None:
        """Refuse new work, wait up to `timeout_s` for running tasks, cancel what is left."""
        self._closed = True
        if not await self.wait(timeout_s):
            log.warning("%s: cancelling %d unfinished task(s)", self.name, len(self._tasks))
            await self.cancel()


def dead_letter_for(
    record: RecordPort,
    *,
    consumer_group: str,
    consumer: str,
    reason: str,
    detail: str,
    event_type: str | None = None,
) -> DeadLetter:
    """The `DeadLetter` for a record: its raw key, value (base64) and headers, where it was."""
    value = record.value
    if value is not None and len(value) > MAX_DEAD_LETTER_VALUE_BYTES:
        detail = f"{detail} (value truncated: {MAX_DEAD_LETTER_VALUE_BYTES} of {len(value)} bytes)"
        value = value[:MAX_DEAD_LETTER_VALUE_BYTES]
    key = record.key
    if key is not None and len(key) > MAX_DEAD_LETTER_KEY_BYTES:
        detail = f"{detail} (key truncated: {MAX_DEAD_LETTER_KEY_BYTES} of {len(key)} bytes)"
        key = key[:MAX_DEAD_LETTER_KEY_BYTES]
    headers: list[tuple[str, str]] = []
    header_bytes = 0
    for name, raw_header in record.headers or ():
        size = len(name) + len(raw_header or b"")
        if header_bytes + size > MAX_DEAD_LETTER_HEADER_BYTES:
            detail = f"{detail} (headers truncated after {len(headers)})"
            break
        header_bytes += size
        headers.append((name, DeadLetter.b64(raw_header) or ""))
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    return DeadLetter(
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        consumer_group=consumer_group,
        consumer=consumer,
        reason=reason,
        detail=detail,
        event_type=event_type,
        key_b64=DeadLetter.b64(key),
        value_b64=DeadLetter.b64(value),
        headers=tuple(headers),
    )


def is_transient_error(exc: BaseException) -> bool:
    """Kafka being unreachable or busy (the record is fine; retrying later will work).

    A handler failing this way is retried without limit (capped backoff) instead of being
    dead-lettered: otherwise an outage would dead-letter every good record in flight.
    """
    return isinstance(exc, KafkaTimeoutError) or (
        isinstance(exc, KafkaError) and getattr(exc, "retriable", False) is True
    )


class _Lru:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[UUID, None] = OrderedDict()

    def __contains__(self, key: UUID) -> bool:
        if key in self._items:
            self._items.move_to_end(key)
            return True
        return False

    def add(self, key: UUID) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class EventConsumer:
    """Runs the consume loop over a started consumer (see the module doc for the semantics).

    ``handlers`` maps event classes to ``async def handler(event, info: RecordInfo)``. The
    consumer (subscribed or manually assigned) is started and stopped by its owner; `run`
    returns after `stop()` (or when the consumer is stopped), having committed what it handled.

    Usage::

        consumer = make_consumer(settings, "escalator-cloud-manager", settings.topic(T.name))
        await consumer.start()
        loop = EventConsumer(consumer, publisher, group="escalator-cloud-manager",
                             instance="cloud-manager/0", handlers={NodeMaintenanceRequested: on_x})
        try:
            await loop.run()
        finally:
            await consumer.stop()
    """

    def __init__(
        self,
        consumer: ConsumerPort,
        dead_letters: DeadLetterSink,
        *,
        group: str,
        instance: str,
        handlers: Mapping[type[Event], Handler],
        handler_attempts: int = 4,
        retry_backoff_s: float = 0.1,
        retry_backoff_max_s: float = 2.0,
        # 0 turns skipping off: command receivers must answer a re-sent command again.
        dedupe_capacity: int = 10_000,
        poll_timeout_ms: int = 200,
        max_records: int | None = 100,
        concurrent_partitions: bool = False,
        background: BackgroundWork | None = None,
        shutdown_timeout_s: float = 30.0,
        metrics: BusMetrics | None = None,
        registry: CollectorRegistry | None = None,
        transient: Callable[[BaseException], bool] = is_transient_error,
        commit_interval_s: float = 0.0,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`handler_attempts` counts the first call (4 = one call and up to three retries).
        Failures for which `transient(exc)` is true (Kafka unreachable, by default) do not
        count: they are retried until they stop or the consumer is stopped.

        `concurrent_partitions=True` runs the batches of different partitions concurrently
        (each partition still in order); by default one record is handled at a time.
        `registry` builds private metrics on it; otherwise `metrics` or the process default.
        `commit_interval_s` and `before_commit`: see the module doc (0 commits after every
        batch). An exception from `before_commit` ends `run` with it: effects the handlers
        reported done were lost, and only a restart from the last commit redoes them.
        """
        if handler_attempts < 1:
            raise ValueError("handler_attempts must be at least 1")
        if commit_interval_s < 0:
            raise ValueError("commit_interval_s must not be negative")
        for cls in handlers:
            if not (isinstance(cls, type) and issubclass(cls, Event)):
                raise TypeError(f"handler key {cls!r} is not an Event class")
        self._consumer = consumer
        self._dead_letters = dead_letters
        self.group = group
        self.instance = instance
        self._handlers: dict[type[Event], Handler] = dict(handlers)
        self._attempts = handler_attempts
        self._transient = transient
        self._backoff = retry_backoff_s
        self._backoff_max = retry_backoff_max_s
        self._seen = _Lru(dedupe_capacity)
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._concurrent = concurrent_partitions
        self.background = background
        self._shutdown_timeout_s = shutdown_timeout_s
        if registry is not None:
            metrics = BusMetrics(registry)
        self.metrics = metrics if metrics is not None else BusMetrics.default()
        self._commit_interval_s = commit_interval_s
        self._before_commit = before_commit
        self._uncommitted: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._done.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the loop to finish the record in hand, commit, and return (non-blocking)."""
        self._stop.set()

    async def stop(self) -> None:
        """Request a stop and wait until `run` returned.

        From inside a handler use `request_stop()` instead (with `concurrent_partitions` a
        handler runs in a child task, and waiting for the loop there would never end).
        """
        self._stop.set()
        if self._task is not None and self._task is not asyncio.current_task():
            await self._done.wait()

    async def run(self) -> None:
        if self._task is not None:
            raise RuntimeError("EventConsumer.run() can only be called once")
        self._task = asyncio.current_task()
        log.info("consumer %s (%s) running", self.instance, self.group)
        graceful = False
        try:
            await self._loop()
            await self.commit_pending()
            graceful = True
        finally:
            try:
                if self.background is not None:
                    if graceful:
                        await self.background.aclose(self._shutdown_timeout_s)
                    else:
                        await self.background.cancel()
            finally:
                self._done.set()
                log.info("consumer %s (%s) stopped", self.instance, self.group)

    async def _loop(self) -> None:
        error_backoff = self._backoff
        while not self._stop.is_set():
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=self._max_records
                )
            except ConsumerStoppedError:
                log.info("consumer %s: underlying consumer stopped", self.instance)
                return
            except KafkaError as err:
                log.warning("consumer %s: fetch failed: %r; retrying", self.instance, err)
                if not await self._pause(error_backoff):
                    return
                error_backoff = min(error_backoff * 2, self._backoff_max)
                continue
            error_backoff = self._backoff
            if not batches:
                await self.commit_pending()
                continue
            if self._concurrent and len(batches) > 1:
                await asyncio.gather(
                    *(self._process_partition(tp, list(recs)) for tp, recs in batches.items())
                )
            else:
                for tp, records in batches.items():
                    if self._stop.is_set():
                        break
                    await self._process_partition(tp, list(records))
            if time.monotonic() - self._last_commit >= self._commit_interval_s:
                await self.commit_pending()

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless a stop is requested; True if the loop should go on."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    # --- per partition / per record ----------------------------------------------------------

    async def _process_partition(self, tp: TopicPartition, records: list[RecordPort]) -> None:
        done: int | None = None
        for record in records:
            if self._stop.is_set():
                break
            if not await self._process_record(record):
                break  # only when stopping: this record stays uncommitted
            done = record.offset
        if done is not None:
            self._uncommitted[tp] = done + 1

    async def commit_pending(self) -> None:
        """Commit the offsets handled since the last commit (after `before_commit`)."""
        if not self._uncommitted:
            return
        if self._before_commit is not None:
            await self._before_commit()
        offsets, self._uncommitted = self._uncommitted, {}
        self._last_commit = time.monotonic()
        try:
            await self._consumer.commit(offsets)
        except KafkaError as err:
            if len(offsets) == 1:
                self._commit_failed(offsets, err)
                return
            # One partition taken away by a rebalance fails the whole call: commit the others.
            for tp, offset in offsets.items():
                try:
                    await self._consumer.commit({tp: offset})
                except KafkaError as one:
                    self._commit_failed({tp: offset}, one)

    def _commit_failed(self, offsets: Mapping[TopicPartition, int], err: KafkaError) -> None:
        # Typically a rebalance took the partition away; its new owner re-reads from the last
        # commit, so this only causes redeliveries (handlers are idempotent).
        self.metrics.commit_failures.labels(self.group).inc()
        log.warning(
            "consumer %s: commit of %s failed: %r",
            self.instance,
            ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in offsets.items()),
            err,
        )

    def _handler_for(self, cls: type[Event]) -> Handler | None:
        for klass in cls.__mro__:
            handler = self._handlers.get(klass)
            if handler is not None:
                return handler
        return None

    async def _process_record(self, record: RecordPort) -> bool:
        """Handle, ignore or dead-letter one record; False only if stopped before finishing."""
        self.metrics.consumed.labels(self.group).inc()
        try:
            decoded = decode(record.value)
            if isinstance(decoded, InvalidEvent):
                log.warning(
                    "consumer %s: invalid record %s[%d]@%d: %s",
                    self.instance,
                    record.topic,
                    record.partition,
                    record.offset,
                    decoded,
                )
                return await self._dead_letter(
                    record, decoded.reason.value, decoded.detail, decoded.event_type
                )
            event = decoded
            handler = self._handler_for(type(event))
            if handler is None:
                self.metrics.ignored.labels(self.group).inc()
                log.debug("consumer %s: no handler for %s", self.instance, event.event_type)
                return True
            if event.event_id in self._seen:
                self.metrics.duplicates.labels(self.group).inc()
                log.info(
                    "consumer %s: duplicate %s %s skipped",
                    self.instance,
                    event.event_type,
                    event.event_id,
                )
                return True
            return await self._call_handler(handler, event, record)
        except Exception as exc:  # a bug on our side must not stop the partition either
            log.exception("consumer %s: unexpected error on a record", self.instance)
            return await self._dead_letter(record, CONSUMER_ERROR, f"{type(exc).__name__}: {exc}")

    async def _call_handler(self, handler: Handler, event: Event, record: RecordPort) -> bool:
        delay = self._backoff
        attempt = 0
        failures = 0  # failures that count against handler_attempts (not transient ones)
        while True:
            attempt += 1
            info = RecordInfo(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key,
                headers=tuple(record.headers or ()),
                timestamp_ms=record.timestamp,
                consumer_group=self.group,
                consumer=self.instance,
                attempt=attempt,
            )
            try:
                await handler(event, info)
            except Exception as exc:
                self.metrics.handler_errors.labels(self.group).inc()
                if not self._transient(exc):
                    failures += 1
                if failures >= self._attempts:
                    log.error(
                        "consumer %s: handler for %s %s failed %d time(s); dead-lettering",
                        self.instance,
                        event.event_type,
                        event.event_id,
                        attempt,
                        exc_info=exc,
                    )
                    return await self._dead_letter(
                        record, HANDLER_ERROR, f"{type(exc).__name__}: {exc}", event.event_type
                    )
                log.warning(
                    "consumer %s: handler for %s %s failed (attempt %d, %d/%d counted): %r; "
                    "retrying",
                    self.instance,
                    event.event_type,
                    event.event_id,
                    attempt,
                    failures,
                    self._attempts,
                    exc,
                )
                if not await self._pause(delay):
                    return False
                delay = min(delay * 2, self._backoff_max)
                continue
            self._seen.add(event.event_id)
            self.metrics.handled.labels(self.group).inc()
            return True

    async def _dead_letter(
        self, record: RecordPort, reason: str, detail: str, event_type: str | None = None
    ) -> bool:
        dead = dead_letter_for(
            record,
            consumer_group=self.group,
            consumer=self.instance,
            reason=reason,
            detail=detail,
            event_type=event_type,
        )
        delay = self._backoff
        while True:
            try:
                await self._dead_letters.publish_dead_letter(dead)
                break
            except Exception as exc:
                # Not committing is the only safe choice: keep trying until it works or we stop.
                log.error(
                    "consumer %s: cannot dead-letter %s[%d]@%d: %r",
                    self.instance,
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                if not await self._pause(delay):
                    return False
                delay = min(delay * 2, self._backoff_max)
        self.metrics.dead_lettered.labels(self.group, reason).inc()
        log.warning(
            "consumer %s: dead-lettered %s[%d]@%d (%s)",
            self.instance,
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        return True
