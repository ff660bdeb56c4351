"""The VNFM adapter process: the decision core wired to Kafka.

Inputs, all handled one at a time under one lock (the core's state is a single value):
* `VNFM_REQUESTS` (`BusinessMoveRequested`, internal `NodeAvailable`) and `VNFM_REPLIES`
  (vendor-written `VnfBusinessMoved`, `BusinessMoveRefused`, `MaintenanceDeadlineExtended`,
  `VnfRecovered`), read by one group consumer through `EventConsumer`, which dead-letters
  undecodable records by itself;
* a ticker every `tick_s`, which fires deadlines;
* the VNF registry topic, read to its high watermark before anything is handled, then followed.

Outputs: `BusinessMoved` and `BusinessMoveDeadlineExtended` on `VNFM_EVENTS` (keyed by
campaign), everything vendor-facing on `VNFM_NOTICES` (keyed by VNFM), `VnfmReplyRejected`
included.

Rejections. A vendor input the core refuses (unknown notice, wrong VNFM, foreign VM or VNF, late,
an extension that is not allowed, ...) is answered by the core itself with `VnfmReplyRejected` to
that VNFM, and only logged here: it is *not* dead-lettered. The sender is told why, in the topic
it reads; the dead-letter topic stays for records nobody could process (garbage, unknown types,
too-new versions: `EventConsumer` puts those there) and for wrong *internal* inputs (a request
without campaign, a stale attempt: a bug of ours), which are dead-lettered with reason
`vnfm_adapter_rejected`. A vendor stuck in a loop of wrong replies thus cannot flood the topic
operators alert on. Redelivered duplicates are only logged.

Durability, per input: publish the decision's events and wait for their ack, then hand the
changed node records to the producer for the compacted state topic *without* waiting, then (the
consume loop, at most every `LAZY_COMMIT_INTERVAL_S`) wait for every state write handed over so
far and commit the offsets. So the next input (the second VNFM's reply, typically) is not held up
by the first one's state write, and a committed offset still means durable events and state. A
crash anywhere in between replays the uncommitted inputs against the state the topic holds,
which re-emits identical events (the core's ids are deterministic) that receivers drop as
duplicates; events always reach the broker before the state that records them. A state write
that fails for good (the producer gave up after its delivery timeout) stops the adapter: its
memory is then ahead of the topic, and only a restart from the last commit mends that. At start
the state is rebuilt by reading the state topic to its high watermark, so a deadline survives a
crash of the adapter.

One adapter instance at a time: replies arrive on any partition, so a collection's replies cannot
be routed to the instance that owns its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Protocol

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from escalator.bus import (
    ConsumerPort,
    DeadLetterSink,
    EventConsumer,
    EventPublisher,
    ProducerPort,
    RecordInfo,
    RecordPort,
    dead_letter_for,
    deliver_dead_letter,
    make_consumer,
    read_to_high_watermark,
    topic_partitions,
)
from escalator.bus.consumer import LAZY_COMMIT_INTERVAL_S, is_transient_error
from escalator.registry import VnfRegistry
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, InvalidReason, decode, encode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event, utcnow
from schemas.events import (
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    BusinessMoveRefused,
    BusinessMoveRequested,
    MaintenanceDeadlineExtended,
    NodeAvailable,
    VnfBusinessMoved,
    VnfRecovered,
    VnfRegistered,
)
from schemas.topics import VNF_REGISTRY, VNFM_EVENTS, VNFM_NOTICES, Service, TopicSpec
from services.vnfm_adapter.domain import (
    VNF_KEY_PREFIX,
    AdapterState,
    Context,
    Decision,
    Input,
    NodeCollection,
    Rejection,
    StateRecord,
    Tick,
    VnfRecovery,
    changed_records,
    decide,
    state_from_records,
)
from services.vnfm_adapter.settings import VnfmAdapterSettings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
REJECTED = "vnfm_adapter_rejected"
Inbound = (
    BusinessMoveRequested
    | NodeAvailable
    | VnfBusinessMoved
    | BusinessMoveRefused
    | MaintenanceDeadlineExtended
    | VnfRecovered
)
RETRY_BACKOFF_S = 0.2
RETRY_BACKOFF_MAX_S = 5.0


def state_topic_spec(settings: VnfmAdapterSettings) -> TopicSpec:
    """The adapter's own compacted state topic (not in the catalogue: nobody else reads it)."""
    return TopicSpec(
        name=settings.state_topic,
        key_field="node_id",
        events=(),
        producers=(Service.VNFM_ADAPTER,),
        consumers=(Service.VNFM_ADAPTER,),
        description="The VNFM adapter's collections (key: node id) and recovering VNFs "
        "(key: vnf/<vnf id>).",
        compacted=True,
    )


def topic_for(event: Event) -> TopicSpec:
    internal = isinstance(event, BusinessMoved | BusinessMoveDeadlineExtended)
    return VNFM_EVENTS if internal else VNFM_NOTICES


# --- ports -----------------------------------------------------------------------------------


MAX_UNSETTLED_WRITES = 1000


class StateWriteLost(RuntimeError):
    """A state record handed to the producer was not written: the adapter must restart."""


class StateStore(Protocol):
    async def load(self) -> AdapterState: ...

    async def save(self, changes: Mapping[str, StateRecord | None]) -> None:
        """Hand changed records (None: delete) to be written, in order; `settle` waits for
        them to be durable."""
        ...

    async def settle(self) -> None:
        """Return once every record handed to `save` is durable; raise if one was lost."""
        ...


class RegistrySource(Protocol):
    async def run(self, registry: VnfRegistry, loaded: asyncio.Event) -> None:
        """Fill `registry` with the current profiles, set `loaded`, then keep it up to date
        until cancelled."""
        ...


# --- Kafka implementations -------------------------------------------------------------------


def decode_state_record(key: str, raw: bytes | None) -> StateRecord | InvalidEvent:
    """A state-topic record: `vnf/<id>` keys hold a VnfRecovery, node-id keys a NodeCollection."""
    model: type[StateRecord] = VnfRecovery if key.startswith(VNF_KEY_PREFIX) else NodeCollection
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        return InvalidEvent(InvalidReason.INVALID_FIELDS, str(exc), raw)


class KafkaStateStore:
    """Records on a compacted topic keyed by node id (collections) or `vnf/<id>` (recoveries);
    JSON values, tombstones delete."""

    def __init__(self, kafka: KafkaSettings, producer: ProducerPort, topic: str) -> None:
        self._kafka = kafka
        self._producer = producer
        self.topic = kafka.topic(topic)
        self._unsettled: list[asyncio.Future[object]] = []

    async def load(self) -> AdapterState:
        records = await read_to_high_watermark(self._kafka, self.topic, decoder=lambda raw: raw)
        decoded: list[StateRecord] = []
        for key, raw in records.items():
            record = decode_state_record(key.decode(), raw)  # type: ignore[arg-type]
            if isinstance(record, InvalidEvent):
                log.error("state record %r skipped: %s", key, record)
            else:
                decoded.append(record)
        return state_from_records(decoded)

    async def save(self, changes: Mapping[str, StateRecord | None]) -> None:
        if len(self._unsettled) >= MAX_UNSETTLED_WRITES:
            await self.settle()  # bounded memory while inputs that commit are rare (ticks)
        for key, record in changes.items():
            self._unsettled.append(
                await self._producer.send(
                    self.topic,
                    value=None if record is None else record.model_dump_json().encode(),
                    key=key.encode(),
                )
            )

    async def settle(self) -> None:
        futures, self._unsettled = self._unsettled, []
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException):
                raise StateWriteLost(f"a state record was not written: {result!r}") from result


class KafkaRegistrySource:
    """Reads the compacted registry topic from the beginning with one group-less consumer: to
    the high watermark first (then `loaded` is set), then follows it. One consumer for both
    phases, so no record falls between the initial read and the following."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        poll_ms: int = 500,
        dead_letters: DeadLetterSink | None = None,
        instance: str = "vnfm-adapter",
    ) -> None:
        self._kafka = kafka
        self._poll_ms = poll_ms
        self._dead_letters = dead_letters
        self._instance = instance

    async def _reject(self, record: RecordPort, invalid: InvalidEvent) -> None:
        """Dead-letter an undecodable registry record (retried until it is published)."""
        if self._dead_letters is None:
            return
        dead = dead_letter_for(
            record,
            consumer_group=f"{self._instance} (registry reader)",
            consumer=self._instance,
            reason=invalid.reason.value,
            detail=invalid.detail,
            event_type=invalid.event_type,
        )
        await deliver_dead_letter(
            self._dead_letters, dead, backoff_s=RETRY_BACKOFF_S, backoff_max_s=RETRY_BACKOFF_MAX_S
        )

    async def run(self, registry: VnfRegistry, loaded: asyncio.Event) -> None:
        name = self._kafka.topic(VNF_REGISTRY.name)
        consumer = make_consumer(self._kafka, None)
        await consumer.start()
        try:
            tps = [TopicPartition(name, p) for p in sorted(await topic_partitions(consumer, name))]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            behind = set(tps)
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=self._poll_ms, max_records=10_000)
                except KafkaError as err:
                    log.warning("registry: fetch failed: %r; retrying", err)
                    await asyncio.sleep(RETRY_BACKOFF_S)
                    continue
                for records in batches.values():
                    for record in records:
                        try:
                            invalid = _apply_registry_record(registry, record.key, record.value)
                        except Exception as err:  # one record never stops the registry view
                            log.exception("registry: record @%d skipped", record.offset)
                            invalid = InvalidEvent(
                                InvalidReason.INVALID_FIELDS, f"not applicable: {err!r}"[:300], None
                            )
                        if invalid is not None:
                            await self._reject(record, invalid)
                for tp in list(behind):
                    high = consumer.highwater(tp)
                    if high is not None and await consumer.position(tp) >= high:
                        behind.discard(tp)
                if not behind and not loaded.is_set():
                    log.info("registry loaded: %d VNF(s)", len(registry))
                    loaded.set()
        finally:
            await consumer.stop()


def _apply_registry_record(
    registry: VnfRegistry, key: bytes | None, value: bytes | None
) -> InvalidEvent | None:
    """Apply one registry record; an undecodable one is returned for the dead-letter topic."""
    if key is None:
        return None
    if value is None:
        registry.apply(key, None)
        return None
    event = decode(value)
    if isinstance(event, VnfRegistered):
        registry.apply(key, event)
        return None
    log.warning("registry: record for %r skipped: %s", key, event)
    return event if isinstance(event, InvalidEvent) else None


# --- the service -----------------------------------------------------------------------------


class VnfmAdapterService:
    def __init__(
        self,
        settings: VnfmAdapterSettings,
        *,
        registry_source: RegistrySource,
        consumer: ConsumerPort,
        publisher: EventPublisher,
        state_store: StateStore,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self._registry_source = registry_source
        self._consumer = consumer
        self._publisher = publisher
        self._store = state_store
        self._clock = clock
        self.registry = VnfRegistry()
        self.state = AdapterState()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._loop: EventConsumer | None = None

    def _ctx(self) -> Context:
        return Context(
            now=self._clock(),
            registry=self.registry,
            producer=self.settings.instance_id,
            closed_retention=timedelta(seconds=self.settings.closed_retention_s),
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Rebuild the state, load the registry, then handle inputs until `request_stop()`."""
        self.state = await self._store.load()
        loaded = asyncio.Event()
        follower = asyncio.create_task(self._registry_source.run(self.registry, loaded))
        ticker: asyncio.Task[None] | None = None
        try:
            waiters = {
                asyncio.ensure_future(loaded.wait()),
                asyncio.ensure_future(self._stop.wait()),
            }
            await asyncio.wait({*waiters, follower}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if follower.done():
                follower.result()  # re-raises why the registry could not be read
                raise RuntimeError("the registry follower ended before loading the registry")
            if self._stop.is_set():
                return
            log.info(
                "vnfm adapter ready: %d node record(s), %d recovering VNF(s), %d VNF(s)",
                len(self.state.nodes),
                len(self.state.recovering),
                len(self.registry),
            )
            ticker = asyncio.create_task(self._tick_forever())
            self._loop = EventConsumer(
                self._consumer,
                self._publisher,
                group=self.settings.group_id,
                instance=self.settings.instance_id,
                handlers={
                    BusinessMoveRequested: self._on_input,
                    NodeAvailable: self._on_input,
                    VnfBusinessMoved: self._on_input,
                    BusinessMoveRefused: self._on_input,
                    MaintenanceDeadlineExtended: self._on_input,
                    VnfRecovered: self._on_input,
                },
                # A re-sent request means the manager may have lost our answer: the core is
                # idempotent by state and repeats it (same id), so nothing is skipped here.
                dedupe_capacity=0,
                commit_interval_s=LAZY_COMMIT_INTERVAL_S,
                before_commit=self._store.settle,
            )
            if self._stop.is_set():
                self._loop.request_stop()
            await self._loop.run()
        finally:
            for task in (follower, ticker):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    def request_stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.request_stop()

    # --- inputs --------------------------------------------------------------------------------

    async def apply(self, event: Input) -> Decision:
        """Decide, publish (acknowledged), hand the state changes to the store; the new state
        is kept only once all of that succeeded, so a failure leaves the input to be retried
        against the same state. The consume loop settles the store before it commits."""
        async with self._lock:
            before = self.state
            decision = decide(before, event, self._ctx())
            if decision.commands:
                await self._publisher.publish_many((e, topic_for(e)) for e in decision.commands)
            changes = changed_records(before, decision.state)
            if changes:
                await self._store.save(changes)
            self.state = decision.state
        for command in decision.commands:
            log.info("%s %s for %s", command.event_type, command.event_id, _about(command))
        return decision

    async def _on_input(self, event: Inbound, info: RecordInfo) -> None:
        decision = await self.apply(event)
        for rejection in decision.rejections:
            if rejection.reason.harmless:
                log.info("%s %s ignored: %s", event.event_type, event.event_id, rejection.detail)
            elif rejection.reason.vendor:
                # already answered with VnfmReplyRejected (published with the decision)
                log.warning(
                    "%s %s from %s rejected (%s): %s",
                    event.event_type,
                    event.event_id,
                    getattr(event, "vnfm_id", "?"),
                    rejection.reason.value,
                    rejection.detail,
                )
            else:
                await self._dead_letter(event, info, rejection)

    async def _tick_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await self.apply(Tick())
            except Exception as exc:  # retried at the next tick, against the same state
                level = logging.WARNING if is_transient_error(exc) else logging.ERROR
                log.log(level, "tick failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.tick_s)

    async def _dead_letter(self, event: Event, info: RecordInfo, rejection: Rejection) -> None:
        log.warning("%s %s rejected: %s", event.event_type, event.event_id, rejection.detail)
        dead = DeadLetter(
            source_topic=info.topic,
            partition=info.partition,
            offset=info.offset,
            consumer_group=info.consumer_group,
            consumer=info.consumer,
            reason=REJECTED,
            detail=f"{rejection.reason.value}: {rejection.detail}",
            event_type=event.event_type,
            key_b64=DeadLetter.b64(info.key),
            value_b64=DeadLetter.b64(encode(event)),
            headers=tuple((k, DeadLetter.b64(v) or "") for k, v in info.headers),
        )
        await deliver_dead_letter(
            self._publisher, dead, backoff_s=RETRY_BACKOFF_S, backoff_max_s=RETRY_BACKOFF_MAX_S
        )


def _about(event: Event) -> str:
    return f"{getattr(event, 'node_id', '?')} ({getattr(event, 'vnfm_id', None) or 'internal'})"


def bootstrap(
    settings: VnfmAdapterSettings,
    *,
    registry_source: RegistrySource,
    consumer: ConsumerPort,
    publisher: EventPublisher,
    state_store: StateStore,
    clock: Clock = utcnow,
) -> VnfmAdapterService:
    """Wire the adapter. The consumer (started, subscribed to VNFM_REQUESTS and VNFM_REPLIES in
    `settings.group_id`) and the publisher's producer are started and stopped by the caller."""
    return VnfmAdapterService(
        settings,
        registry_source=registry_source,
        consumer=consumer,
        publisher=publisher,
        state_store=state_store,
        clock=clock,
    )


__all__ = [
    "KafkaRegistrySource",
    "KafkaStateStore",
    "RegistrySource",
    "StateStore",
    "VnfmAdapterService",
    "bootstrap",
    "decode_state_record",
    "state_topic_spec",
    "topic_for",
]
