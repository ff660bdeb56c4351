"""The bus runtime against the session broker: dead letters, dedupe, commit-after-effects,
at-least-once redelivery, topic creation, read-back and own-partition assignment.

Every test uses its own topic prefix, so topics and groups never collide.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from escalator.broker import BrokerHandle
from escalator.bus import (
    EventConsumer,
    EventPublisher,
    RecordInfo,
    assign_own_partition,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    partition_for_key,
    read_to_high_watermark,
)
from escalator.bus.consumer import Handler
from escalator.settings import KafkaSettings
from schemas.codec import encode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import NodeAgentHeartbeat, NodeMaintenanceRequested, VmListRequested
from schemas.topics import (
    ALL_TOPICS,
    CLOUD_COMMANDS,
    DEAD_LETTERS_TOPIC,
    NODE_HEARTBEATS,
    VNF_REGISTRY,
    TopicSpec,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

real_kafka = pytest.mark.real_kafka


@pytest.fixture
def settings(broker: BrokerHandle, unique_name: Callable[..., str]) -> KafkaSettings:
    return broker.settings.model_copy(
        update={"topic_prefix": unique_name("bus") + ".", "partitions": 2}
    )


@pytest.fixture
def kafka_only(broker: BrokerHandle) -> None:
    if broker.kind == "tansu":
        pytest.skip("needs Apache Kafka semantics")


@pytest.fixture
async def producer(settings: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    await ensure_topics(settings, (CLOUD_COMMANDS, NODE_HEARTBEATS))
    p = make_producer(settings)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
def publisher(producer: AIOKafkaProducer, settings: KafkaSettings) -> EventPublisher:
    return EventPublisher(producer, settings)


async def eventually(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


async def read_all(settings: KafkaSettings, topic: str) -> list[Any]:
    """Every record of `topic` up to its high watermark (no group, nothing committed)."""
    consumer = make_consumer(settings, None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        pending = set(tps)
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
            for tp in list(pending):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    pending.discard(tp)
        assert not pending, f"could not read {topic} to its end"
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


async def dead_letters(settings: KafkaSettings) -> list[DeadLetter]:
    records = await read_all(settings, settings.topic(DEAD_LETTERS_TOPIC))
    return [DeadLetter.model_validate_json(r.value) for r in records]


async def committed(
    settings: KafkaSettings, group: str, spec: TopicSpec = CLOUD_COMMANDS
) -> dict[TopicPartition, int]:
    """The group's committed offsets on `spec`'s topic (asked through a non-member consumer)."""
    consumer = make_consumer(settings, group)
    await consumer.start()
    try:
        out: dict[TopicPartition, int] = {}
        for p in range(settings.partitions):
            tp = TopicPartition(settings.topic(spec.name), p)
            offset = await consumer.committed(tp)
            if offset is not None:
                out[tp] = offset
        return out
    finally:
        await consumer.stop()


@dataclass
class Running:
    loop: EventConsumer
    consumer: AIOKafkaConsumer
    task: asyncio.Task[None]
    registry: CollectorRegistry
    handled: list[Event] = field(default_factory=list)

    def count(self, name: str, **labels: str) -> float:
        labels = {"group": self.loop.group, **labels}
        return self.registry.get_sample_value(f"escalator_bus_{name}_total", labels) or 0.0

    async def stop(self) -> None:
        await self.loop.stop()
        await self.task
        await self.consumer.stop()

    async def kill(self) -> None:
        """Cancel the loop (as a crash or a cancelled service would) and drop the consumer."""
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.consumer.stop()


async def start_loop(
    settings: KafkaSettings,
    group: str,
    handlers: Mapping[type[Event], Handler],
    publisher: EventPublisher,
    spec: TopicSpec = CLOUD_COMMANDS,
    **options: Any,
) -> Running:
    consumer = make_consumer(settings, group, settings.topic(spec.name))
    await consumer.start()
    registry = CollectorRegistry()
    loop = EventConsumer(
        consumer,
        publisher,
        group=group,
        instance=f"{group}/0",
        handlers=handlers,
        registry=registry,
        **{"poll_timeout_ms": 100, "retry_backoff_s": 0.05, **options},
    )
    task = asyncio.create_task(loop.run())
    return Running(loop, consumer, task, registry)


def recorder(running: list[Running]) -> Handler:
    async def handle(event: Event, info: RecordInfo) -> None:
        running[0].handled.append(event)

    return handle


# --- poison records and unhandled types -------------------------------------------------------


async def test_poison_records_are_dead_lettered_and_the_partition_moves_on(
    settings: KafkaSettings,
    producer: AIOKafkaProducer,
    publisher: EventPublisher,
    unique_name: Callable[..., str],
) -> None:
    topic = settings.topic(CLOUD_COMMANDS.name)
    key = b"compute-0-01"  # one key: everything lands in one partition, in this order
    first = VmListRequested(node_id="compute-0-01")
    too_new = json.loads(encode(VmListRequested(node_id="compute-0-01")))
    too_new["schema_version"] = 99
    poison = [
        (b"\x00\xffnot json at all", "not_utf8"),
        (b'{"hello": "world"}', "missing_type"),
        (b'{"event_type": "VmListRequested", "node_id": 42}', "invalid_fields"),
        (b'{"event_type": "NoSuchEvent", "x": 1}', "unknown_type"),
        (json.dumps(too_new).encode(), "unsupported_version"),
    ]
    await publisher.publish(first, CLOUD_COMMANDS)
    offsets = []
    for raw, _ in poison:
        meta = await producer.send_and_wait(topic, raw, key=key, headers=[("h", b"v")])
        offsets.append(meta.offset)
    last = VmListRequested(node_id="compute-0-01")
    meta = await publisher.publish(last, CLOUD_COMMANDS)

    group = unique_name("g")
    running: list[Running] = []
    running.append(
        await start_loop(settings, group, {VmListRequested: recorder(running)}, publisher)
    )
    r = running[0]
    try:
        await eventually(lambda: len(r.handled) == 2, what="both valid events handled")
        assert [e.event_id for e in r.handled] == [first.event_id, last.event_id]
        await eventually(lambda: r.count("records_consumed") == 7)
    finally:
        await r.stop()

    letters = await dead_letters(settings)
    assert [(d.reason, d.offset) for d in letters] == [
        (reason, off) for (_, reason), off in zip(poison, offsets, strict=True)
    ]
    for letter, (raw, _) in zip(letters, poison, strict=True):
        assert letter.source_topic == topic
        assert letter.partition == meta.partition
        assert letter.consumer_group == group
        assert letter.consumer == f"{group}/0"
        assert letter.value() == raw
        assert letter.key() == key
        assert dict(letter.headers)["h"] == "dg=="  # base64 of b"v"
        assert letter.detail
    assert letters[2].event_type == "VmListRequested"
    assert letters[4].event_type == "VmListRequested"
    assert r.count("records_dead_lettered", reason="unknown_type") == 1
    # nothing is stuck: the partition is committed past the last record
    assert (await committed(settings, group))[TopicPartition(topic, meta.partition)] == (
        meta.offset + 1
    )


async def test_valid_but_unhandled_event_is_ignored_not_dead_lettered(
    settings: KafkaSettings, publisher: EventPublisher, unique_name: Callable[..., str]
) -> None:
    other = NodeMaintenanceRequested(node_id="compute-0-02", holder="cmp-1")
    wanted = VmListRequested(node_id="compute-0-02")
    await publisher.publish(other, CLOUD_COMMANDS)
    meta = await publisher.publish(wanted, CLOUD_COMMANDS)
    running: list[Running] = []
    group = unique_name("g")
    running.append(
        await start_loop(settings, group, {VmListRequested: recorder(running)}, publisher)
    )
    r = running[0]
    try:
        await eventually(lambda: len(r.handled) == 1)
        await eventually(lambda: r.count("records_ignored") == 1)
    finally:
        await r.stop()
    assert await dead_letters(settings) == []
    topic = settings.topic(CLOUD_COMMANDS.name)
    assert (await committed(settings, group))[TopicPartition(topic, meta.partition)] == (
        meta.offset + 1
    )


# --- dedupe and commit-after-effects ------------------------------------------------------------


async def test_duplicated_event_id_is_handled_once(
    settings: KafkaSettings, publisher: EventPublisher, unique_name: Callable[..., str]
) -> None:
    event = VmListRequested(node_id="compute-0-03")
    await publisher.publish(event, CLOUD_COMMANDS)
    await publisher.publish(event, CLOUD_COMMANDS)  # e.g. a producer retry or a re-send
    after = VmListRequested(node_id="compute-0-03")
    await publisher.publish(after, CLOUD_COMMANDS)
    running: list[Running] = []
    running.append(
        await start_loop(
            settings, unique_name("g"), {VmListRequested: recorder(running)}, publisher
        )
    )
    r = running[0]
    try:
        await eventually(lambda: r.count("records_consumed") == 3)
        await eventually(lambda: len(r.handled) == 2)
    finally:
        await r.stop()
    assert [e.event_id for e in r.handled] == [event.event_id, after.event_id]
    assert r.count("records_duplicate") == 1


@real_kafka
async def test_offset_is_committed_only_after_the_handler_succeeded(
    kafka_only: None,
    settings: KafkaSettings,
    publisher: EventPublisher,
    unique_name: Callable[..., str],
) -> None:
    topic = settings.topic(CLOUD_COMMANDS.name)
    event = VmListRequested(node_id="compute-0-04")
    meta = await publisher.publish(event, CLOUD_COMMANDS)
    tp = TopicPartition(topic, meta.partition)
    group = unique_name("g")
    attempts: list[int] = []
    seen_committed: list[int | None] = []

    async def flaky(ev: VmListRequested, info: RecordInfo) -> None:
        attempts.append(info.attempt)
        seen_committed.append((await committed(settings, group)).get(tp))
        if info.attempt == 1:
            raise ConnectionError("cloud API unreachable")
        # the effect, published durably before returning
        hb = NodeAgentHeartbeat(
            node_id=ev.node_id, agent_id="a", installed_version="1.0", interval_s=5
        )
        await publisher.publish(hb, NODE_HEARTBEATS)

    r = await start_loop(settings, group, {VmListRequested: flaky}, publisher)
    try:
        await eventually(lambda: r.count("records_handled") == 1)
        await eventually(lambda: r.count("records_consumed") == 1)
    finally:
        await r.stop()
    assert attempts == [1, 2]
    assert seen_committed == [None, None]  # not committed while failing or in flight
    assert (await committed(settings, group))[tp] == meta.offset + 1
    assert r.count("handler_errors") == 1
    assert await dead_letters(settings) == []
    effects = await read_to_high_watermark(settings, NODE_HEARTBEATS)
    assert b"compute-0-04" in effects


@real_kafka
@pytest.mark.parametrize("how", ["cancelled", "stopped_during_retry"])
async def test_record_not_committed_before_a_crash_is_redelivered(
    how: str,
    kafka_only: None,
    settings: KafkaSettings,
    publisher: EventPublisher,
    unique_name: Callable[..., str],
) -> None:
    event = VmListRequested(node_id="compute-0-05")
    meta = await publisher.publish(event, CLOUD_COMMANDS)
    group = unique_name("g")
    entered = asyncio.Event()

    async def stuck(ev: VmListRequested, info: RecordInfo) -> None:
        entered.set()
        if how == "cancelled":
            await asyncio.sleep(3600)  # a long handler, killed mid-way
        raise ConnectionError("cloud API unreachable")

    first = await start_loop(
        settings, group, {VmListRequested: stuck}, publisher, retry_backoff_s=30
    )
    await asyncio.wait_for(entered.wait(), 20)
    if how == "cancelled":
        await first.kill()
    else:
        await first.stop()  # stop() interrupts the retry backoff; the record stays uncommitted
    assert await committed(settings, group) == {}

    running: list[Running] = []
    running.append(
        await start_loop(settings, group, {VmListRequested: recorder(running)}, publisher)
    )
    second = running[0]
    try:
        await eventually(lambda: len(second.handled) == 1, what="redelivery")
    finally:
        await second.stop()
    assert second.handled[0].event_id == event.event_id
    topic = settings.topic(CLOUD_COMMANDS.name)
    assert (await committed(settings, group))[TopicPartition(topic, meta.partition)] == (
        meta.offset + 1
    )


# --- topics, read-back, own partition ------------------------------------------------------------


@real_kafka
async def test_ensure_topics_creates_the_catalogue_with_compaction(
    kafka_only: None, settings: KafkaSettings
) -> None:
    settings = settings.model_copy(update={"partitions": 3})
    created = await ensure_topics(settings)
    expected = {settings.topic(s.name) for s in ALL_TOPICS} | {settings.topic(DEAD_LETTERS_TOPIC)}
    assert set(created) == expected
    assert await ensure_topics(settings) == []  # already there: tolerated, nothing created

    admin = make_admin(settings)
    await admin.start()
    try:
        described = await admin.describe_topics(sorted(expected))
        assert {t["topic"]: len(t["partitions"]) for t in described} == dict.fromkeys(expected, 3)
        names = [settings.topic(s.name) for s in (NODE_HEARTBEATS, VNF_REGISTRY, CLOUD_COMMANDS)]
        names.append(settings.topic(DEAD_LETTERS_TOPIC))
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n, {"cleanup.policy": None}) for n in names]
        )
    finally:
        await admin.close()
    policies: dict[str, str] = {}
    for response in responses:
        for _code, _msg, _type, name, entries in response.resources:
            for entry in entries:
                if entry[0] == "cleanup.policy":
                    policies[name] = entry[1]
    assert policies == {
        names[0]: "compact",
        names[1]: "compact",
        names[2]: "delete",
        names[3]: "delete",
    }


def _heartbeat(node: str, version: str) -> NodeAgentHeartbeat:
    return NodeAgentHeartbeat(
        node_id=node, agent_id=f"agent@{node}", installed_version=version, interval_s=5
    )


async def test_read_to_high_watermark_returns_the_latest_value_per_key(
    settings: KafkaSettings, producer: AIOKafkaProducer, publisher: EventPublisher
) -> None:
    topic = settings.topic(NODE_HEARTBEATS.name)
    assert await read_to_high_watermark(settings, NODE_HEARTBEATS) == {}  # empty topic
    latest = {}
    for version in ("1.0", "1.1", "1.2"):
        for node in ("n1", "n2", "n3", "n4"):
            if node == "n2" and version == "1.2":
                continue
            latest[node] = _heartbeat(node, version)
            await publisher.publish(latest[node], NODE_HEARTBEATS)
    await producer.send_and_wait(topic, None, key=b"n3")  # tombstone: n3 is gone
    await producer.send_and_wait(topic, b"garbage", key=b"n4")  # skipped, n4 keeps 1.2
    del latest["n3"]
    # a burst in one batch, as the faust tables / Tansu caveat describes
    futures = [
        await producer.send(topic, encode(_heartbeat("n5", f"2.{i}")), key=b"n5") for i in range(20)
    ]
    await asyncio.gather(*futures)
    state = await read_to_high_watermark(settings, NODE_HEARTBEATS)
    assert set(state) == {b"n1", b"n2", b"n4", b"n5"}
    for node, event in latest.items():
        assert state[node.encode()] == event
    assert isinstance(state[b"n5"], NodeAgentHeartbeat)
    assert state[b"n5"].installed_version == "2.19"
    # a full name works too
    assert set(await read_to_high_watermark(settings, topic)) == set(state)


async def test_assign_own_partition_reads_only_its_keys_partition(
    settings: KafkaSettings, producer: AIOKafkaProducer, unique_name: Callable[..., str]
) -> None:
    settings = settings.model_copy(
        update={"partitions": 6, "topic_prefix": settings.topic_prefix + "six."}
    )
    await ensure_topics(settings, (CLOUD_COMMANDS,))
    publisher = EventPublisher(producer, settings)
    topic = settings.topic(CLOUD_COMMANDS.name)
    nodes = [f"compute-0-{i:02d}" for i in range(12)]
    placed: dict[str, int] = {}
    for node in nodes:
        meta = await publisher.publish(VmListRequested(node_id=node), CLOUD_COMMANDS)
        placed[node] = meta.partition
        # the producer's partitioner and ours agree with the Java client's
        assert meta.partition == partition_for_key(node.encode(), 6)
    me = "compute-0-07"
    sharing = {n for n, p in placed.items() if p == placed[me]}

    group = unique_name("agent")
    consumer = make_consumer(settings, group)
    await consumer.start()
    seen: list[tuple[str, int]] = []

    async def mine(event: VmListRequested, info: RecordInfo) -> None:
        seen.append((event.node_id, info.partition))

    loop = EventConsumer(
        consumer,
        publisher,
        group=group,
        instance="node-agent/compute-0-07",
        handlers={VmListRequested: mine},
        poll_timeout_ms=100,
        registry=CollectorRegistry(),
    )
    try:
        tp = await assign_own_partition(consumer, topic, me)
        assert tp == TopicPartition(topic, placed[me])
        task = asyncio.create_task(loop.run())
        await eventually(lambda: len(seen) == len(sharing))
        await asyncio.sleep(0.3)  # nothing else arrives
        await loop.stop()
        await task
    finally:
        await consumer.stop()
    assert {n for n, _ in seen} == sharing
    assert {p for _, p in seen} == {placed[me]}
    assert (await committed(settings, group)) == {tp: len(sharing)}
