"""The bus runtime's pure parts: partitioner, client settings, dead letters, publisher checks,
and the consume loop's decisions driven through fake ports (no broker)."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from escalator.bus import (
    BackgroundWork,
    EventConsumer,
    EventPublisher,
    RecordInfo,
    client_kwargs,
    dead_letter_for,
    make_admin,
    make_consumer,
    make_producer,
    partition_for_key,
    topic_configs,
)
from escalator.settings import KafkaSettings
from schemas.codec import encode
from schemas.deadletter import DeadLetter
from schemas.events import NodeAgentHeartbeat, NodeUpgradeAccepted, VmListRequested
from schemas.topics import CLOUD_COMMANDS, NODE_EVENTS, NODE_HEARTBEATS, VNF_REGISTRY

pytestmark = pytest.mark.unit

PASSWORD = "s3cr3t-Pa55w0rd-never-logged"

# Computed with org.apache.kafka.common.utils.Utils from kafka-clients 4.1.1:
# key -> (murmur2 as Java int, toPositive(h) % 6, toPositive(h) % 1000)
JAVA_VECTORS: list[tuple[bytes, int, int, int]] = [
    (b"", 275646681, 3, 681),
    (b"a", -1563381124, 4, 524),
    (b"ab", 316155434, 2, 434),
    (b"abc", 479470107, 3, 107),
    (b"123456789", -1822237082, 0, 566),
    (b"21", -973932308, 0, 340),
    (b"foobar", -790332482, 0, 166),
    (b"a-little-bit-long-string", -985981536, 2, 112),
    (b"a-little-bit-longer-string", -1486304829, 5, 819),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971, 5, 677),
    (b"compute-0-07", 1738972880, 2, 880),
    (b"node-1", -1972720102, 4, 546),
    (b"vnf-epc-1", 967503230, 2, 230),
    (b"cmp-29-1-0-a1b2c3", -2059575362, 0, 286),
    (bytes([0xFF, 0x00, 0x80, 0x7F, 0xC3]), 206070372, 0, 372),
]


# --- partitioner ---------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "java_hash", "p6", "p1000"), JAVA_VECTORS)
def test_partitioner_matches_java_client(key: bytes, java_hash: int, p6: int, p1000: int) -> None:
    assert partition_for_key(key, 6) == p6
    assert partition_for_key(key, 1000) == p1000
    assert partition_for_key(key, 1) == 0
    # Java's toPositive is `h & 0x7fffffff` on the signed int.
    assert partition_for_key(key, 2**31 - 1) == (java_hash & 0x7FFFFFFF) % (2**31 - 1)


def test_partitioner_matches_aiokafka_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(6))
    for key, *_ in JAVA_VECTORS:
        assert partition_for_key(key, 6) == DefaultPartitioner()(key, parts, parts)


def test_partitioner_rejects_zero_partitions() -> None:
    with pytest.raises(ValueError):
        partition_for_key(b"x", 0)


# --- client settings -------------------------------------------------------------------------


def test_client_kwargs_plaintext() -> None:
    kwargs = client_kwargs(KafkaSettings(KAFKA_BOOTSTRAP_SERVERS="h1:9092,h2:9092"))
    assert dict(kwargs) == {
        "bootstrap_servers": "h1:9092,h2:9092",
        "security_protocol": "PLAINTEXT",
    }


def _sasl_settings(mechanism: str, protocol: str) -> KafkaSettings:
    return KafkaSettings(
        KAFKA_BOOTSTRAP_SERVERS="kafka:9093",
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username="escalator",
        sasl_password=SecretStr(PASSWORD),
    )


@pytest.mark.parametrize(
    ("mechanism", "protocol"),
    [
        ("PLAIN", "SASL_SSL"),
        ("SCRAM-SHA-256", "SASL_SSL"),
        ("SCRAM-SHA-512", "SASL_PLAINTEXT"),
    ],
)
async def test_client_kwargs_sasl(
    mechanism: str, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _sasl_settings(mechanism, protocol)
    kwargs = client_kwargs(settings)
    assert kwargs["security_protocol"] == protocol
    assert kwargs["sasl_mechanism"] == mechanism
    assert kwargs["sasl_plain_username"] == "escalator"
    assert kwargs["sasl_plain_password"] == PASSWORD  # aiokafka needs the plain value
    if protocol == "SASL_SSL":
        assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    else:
        assert "ssl_context" not in kwargs
    # ... but no representation of it shows the password
    for text in (repr(kwargs), str(kwargs), f"{kwargs}", repr(settings), str(settings)):
        assert PASSWORD not in text
        assert "escalator" in text or "sasl_password" in text
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("escalator.test").info("kwargs %s / %r", kwargs, kwargs)
        producer = make_producer(settings)
        consumer = make_consumer(settings, "g", "t")
        admin = make_admin(settings)
        logging.getLogger("escalator.test").info("%r %r %r", producer, consumer, admin)
    assert PASSWORD not in caplog.text
    await producer.stop()
    await consumer.stop()
    await admin.close()


def test_client_kwargs_tls_files(tmp_path: Any) -> None:
    # A CA bundle that does not exist must fail loudly (when the settings are made) rather than
    # silently use no TLS.
    with pytest.raises(ValueError, match="ssl_cafile"):
        KafkaSettings(security_protocol="SSL", ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="ssl_keyfile"):
        KafkaSettings(security_protocol="SSL", ssl_keyfile="k.pem")
    kwargs = client_kwargs(KafkaSettings(security_protocol="SSL"))
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert "sasl_mechanism" not in kwargs


def test_client_kwargs_sasl_needs_credentials() -> None:
    with pytest.raises(ValueError, match="sasl_mechanism"):
        client_kwargs(KafkaSettings(security_protocol="SASL_PLAINTEXT"))
    with pytest.raises(ValueError, match="sasl_username") as info:
        client_kwargs(
            KafkaSettings(
                security_protocol="SASL_PLAINTEXT",
                sasl_mechanism="PLAIN",
                sasl_password=SecretStr(PASSWORD),
            )
        )
    assert PASSWORD not in str(info.value)


async def test_factories_apply_settings() -> None:
    settings = KafkaSettings(
        enable_idempotence=False, fetch_max_wait_ms=20, session_timeout_ms=3000
    )
    producer = make_producer(settings)
    consumer = make_consumer(settings, "group-a", "topic-a")
    try:
        assert consumer._enable_auto_commit is False
        assert consumer._session_timeout_ms == 3000
        assert consumer._group_id == "group-a"
    finally:
        await producer.stop()
        await consumer.stop()
    assert topic_configs(VNF_REGISTRY) == {"cleanup.policy": "compact"}
    assert topic_configs(NODE_HEARTBEATS) == {"cleanup.policy": "compact"}
    assert topic_configs(CLOUD_COMMANDS) == {}


# --- dead letters --------------------------------------------------------------------------


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = b"k"
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = 0


def test_dead_letter_from_bad_record() -> None:
    rec = Rec(
        "p.escalator.cloud.commands.v1",
        3,
        1207,
        b"\xff\xfegarbage",
        key=b"compute-0-07",
        headers=[("traceparent", b"00-abc"), ("empty", b"")],
    )
    dead = dead_letter_for(
        rec,
        consumer_group="escalator-cloud-manager",
        consumer="cloud-manager/0",
        reason="not_utf8",
        detail="bad bytes",
    )
    assert dead.source_topic == rec.topic
    assert (dead.partition, dead.offset) == (3, 1207)
    assert dead.consumer_group == "escalator-cloud-manager"
    assert dead.consumer == "cloud-manager/0"
    assert dead.reason == "not_utf8"
    assert dead.event_type is None
    assert dead.value() == b"\xff\xfegarbage"
    assert dead.key() == b"compute-0-07"
    assert dict(dead.headers)["traceparent"] == base64.b64encode(b"00-abc").decode()
    # it survives its own round trip as JSON (what goes on the dead-letter topic)
    again = DeadLetter.model_validate_json(dead.model_dump_json())
    assert again.value() == rec.value


def test_dead_letter_truncates_huge_values_and_details() -> None:
    rec = Rec("t", 0, 0, b"x" * 2_000_000, key=None)
    dead = dead_letter_for(
        rec, consumer_group="g", consumer="c", reason="too_large", detail="d" * 10_000
    )
    assert dead.key_b64 is None
    assert len(dead.model_dump_json()) < 1_000_000
    assert len(dead.detail) <= 4000


# --- publisher -----------------------------------------------------------------------------


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, topic: str, **kwargs: Any) -> asyncio.Future[Any]:
        self.sent.append({"topic": topic, **kwargs})
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(("meta", topic))
        return fut

    async def send_and_wait(self, topic: str, **kwargs: Any) -> Any:
        return await (await self.send(topic, **kwargs))


def _hb(node: str = "compute-0-07") -> NodeAgentHeartbeat:
    return NodeAgentHeartbeat(
        node_id=node, agent_id=f"agent@{node}", installed_version="29.0.3", interval_s=5.0
    )


async def test_publisher_refuses_event_type_the_topic_does_not_carry() -> None:
    producer = FakeProducer()
    publisher = EventPublisher(producer, KafkaSettings(topic_prefix="p."))
    with pytest.raises(ValueError, match="does not carry"):
        await publisher.publish(_hb(), CLOUD_COMMANDS)
    with pytest.raises(ValueError, match="does not carry"):
        await publisher.publish_many([(_hb(), NODE_HEARTBEATS), (_hb(), CLOUD_COMMANDS)])
    assert producer.sent == []  # nothing at all was sent


async def test_publisher_keys_prefixes_and_headers() -> None:
    producer = FakeProducer()
    publisher = EventPublisher(producer, KafkaSettings(topic_prefix="p."))
    event = _hb()
    await publisher.publish(event, NODE_HEARTBEATS)
    (sent,) = producer.sent
    assert sent["topic"] == "p.escalator.node.heartbeats.v1"
    assert sent["key"] == b"compute-0-07"
    assert sent["value"] == encode(event)
    assert dict(sent["headers"]) == {"event_type": b"NodeAgentHeartbeat", "schema_version": b"1"}
    # the key field must be present: NODE_EVENTS is keyed by campaign_id
    no_campaign = NodeUpgradeAccepted(node_id="n1", target_version="2")
    with pytest.raises(ValueError, match="campaign_id"):
        await publisher.publish(no_campaign, NODE_EVENTS)
    results = await publisher.publish_many(
        [(_hb("a"), NODE_HEARTBEATS), (_hb("b"), NODE_HEARTBEATS)]
    )
    assert len(results) == 2
    assert [s["key"] for s in producer.sent[1:]] == [b"a", b"b"]


# --- the consume loop through fake ports ------------------------------------------------------


@dataclass
class FakeConsumer:
    """Serves pre-made batches, records commits; stops the loop when it runs out."""

    batches: list[dict[TopicPartition, list[Rec]]]
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    on_empty: Any = None

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Rec]]:
        if self.batches:
            return self.batches.pop(0)
        if self.on_empty is not None:
            self.on_empty()
        await asyncio.sleep(0.001)
        return {}

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        assert offsets is not None
        self.commits.append(dict(offsets))


class FakeDeadLetters:
    def __init__(self) -> None:
        self.dead: list[DeadLetter] = []

    async def publish_dead_letter(self, dead: DeadLetter) -> None:
        self.dead.append(dead)


TP = TopicPartition("cmds", 0)


def _rec(offset: int, value: bytes | None) -> Rec:
    return Rec("cmds", 0, offset, value)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(f"escalator_bus_{name}_total", labels) or 0.0


async def test_loop_dead_letters_ignores_dedupes_and_retries() -> None:
    listed = VmListRequested(node_id="n1")
    flaky = VmListRequested(node_id="n2")
    unhandled = _hb()
    batch = [
        _rec(0, b"garbage"),
        _rec(1, encode(listed)),
        _rec(2, encode(listed)),  # duplicate event id
        _rec(3, encode(unhandled)),  # valid, no handler
        _rec(4, encode(flaky)),  # fails once, then works
    ]
    registry = CollectorRegistry()
    fake = FakeConsumer([{TP: batch}])
    dead = FakeDeadLetters()
    seen: list[tuple[str, int]] = []

    async def on_list(event: VmListRequested, info: RecordInfo) -> None:
        seen.append((event.node_id, info.attempt))
        if event.node_id == "n2" and info.attempt == 1:
            assert fake.commits == []  # nothing committed while a record is in flight
            raise RuntimeError("transient")

    loop = EventConsumer(
        fake,
        dead,
        group="g",
        instance="i/0",
        handlers={VmListRequested: on_list},
        retry_backoff_s=0.001,
        registry=registry,
    )
    fake.on_empty = loop.request_stop
    await asyncio.wait_for(loop.run(), 5)
    assert seen == [("n1", 1), ("n2", 1), ("n2", 2)]
    assert fake.commits == [{TP: 5}]
    assert [(d.offset, d.reason) for d in dead.dead] == [(0, "not_json")]
    assert _sample(registry, "records_consumed", group="g") == 5
    assert _sample(registry, "records_handled", group="g") == 2
    assert _sample(registry, "records_duplicate", group="g") == 1
    assert _sample(registry, "records_ignored", group="g") == 1
    assert _sample(registry, "handler_errors", group="g") == 1
    assert _sample(registry, "records_dead_lettered", group="g", reason="not_json") == 1


async def test_loop_dead_letters_a_handler_that_keeps_failing() -> None:
    fake = FakeConsumer([{TP: [_rec(7, encode(VmListRequested(node_id="n1")))]}])
    dead = FakeDeadLetters()
    calls = 0

    async def broken(event: VmListRequested, info: RecordInfo) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("boom")

    loop = EventConsumer(
        fake,
        dead,
        group="g",
        instance="i/0",
        handlers={VmListRequested: broken},
        handler_attempts=3,
        retry_backoff_s=0.001,
        registry=CollectorRegistry(),
    )
    fake.on_empty = loop.request_stop
    await asyncio.wait_for(loop.run(), 5)
    assert calls == 3
    (letter,) = dead.dead
    assert letter.reason == "handler_error"
    assert "KeyError" in letter.detail and "boom" in letter.detail
    assert letter.event_type == "VmListRequested"
    assert fake.commits == [{TP: 8}]


async def test_stop_during_retry_leaves_the_record_uncommitted() -> None:
    fake = FakeConsumer([{TP: [_rec(0, encode(VmListRequested(node_id="n1")))]}])

    async def broken(event: VmListRequested, info: RecordInfo) -> None:
        loop.request_stop()
        raise RuntimeError("down")

    loop = EventConsumer(
        fake,
        FakeDeadLetters(),
        group="g",
        instance="i/0",
        handlers={VmListRequested: broken},
        retry_backoff_s=10,
        registry=CollectorRegistry(),
    )
    await asyncio.wait_for(loop.run(), 5)
    assert fake.commits == []


TP1 = TopicPartition("cmds", 1)


async def test_lazy_commits_wait_for_the_interval_and_settle_first() -> None:
    """With `commit_interval_s`, batches are committed together once the interval passed (or
    the poll comes back empty), always after `before_commit`, never before their handlers."""
    events = [VmListRequested(node_id=f"n{i}") for i in range(5)]
    fake = FakeConsumer(
        [
            {TP: [_rec(0, encode(events[0]))]},
            {TP1: [Rec("cmds", 1, 0, encode(events[1]))]},
            {TP: [_rec(1, encode(events[2])), _rec(2, encode(events[3]))]},
        ]
    )
    order: list[str] = []
    settled_writes: list[int] = []

    async def on_list(event: VmListRequested, info: RecordInfo) -> None:
        order.append(f"handled {event.node_id}")

    async def settle() -> None:
        # The commit must come after this: a service waits here for its unacknowledged writes.
        settled_writes.append(len(order))
        order.append("settled")

    loop = EventConsumer(
        fake,
        FakeDeadLetters(),
        group="g",
        instance="i/0",
        handlers={VmListRequested: on_list},
        commit_interval_s=3600,
        before_commit=settle,
        registry=CollectorRegistry(),
    )
    committed_when: list[list[str]] = []
    real_commit = fake.commit

    async def commit(offsets: Mapping[TopicPartition, int] | None = None) -> None:
        committed_when.append(list(order))
        await real_commit(offsets)

    fake.commit = commit  # type: ignore[method-assign]
    fake.on_empty = lambda: None
    task = asyncio.create_task(loop.run())
    for _ in range(200):
        if fake.commits:
            break
        await asyncio.sleep(0.005)
    # An hour's interval: the three batches were only committed when the poll came back empty,
    # all at once, after the settle.
    assert fake.commits == [{TP: 3, TP1: 1}]
    assert committed_when[0] == [
        "handled n0",
        "handled n1",
        "handled n2",
        "handled n3",
        "settled",
    ]
    fake.batches.append({TP: [_rec(3, encode(events[4]))]})
    for _ in range(200):
        if "handled n4" in order:
            break
        await asyncio.sleep(0.005)
    await loop.stop()
    await task
    # The graceful stop committed the last record, settling again first.
    assert fake.commits[-1] == {TP: 4}
    assert committed_when[-1][-1] == "settled" and settled_writes == [4, 6]


async def test_a_failed_settle_ends_the_loop_without_committing() -> None:
    fake = FakeConsumer([{TP: [_rec(0, encode(VmListRequested(node_id="n1")))]}])

    async def on_list(event: VmListRequested, info: RecordInfo) -> None:
        pass

    async def settle() -> None:
        raise RuntimeError("state write lost")

    loop = EventConsumer(
        fake,
        FakeDeadLetters(),
        group="g",
        instance="i/0",
        handlers={VmListRequested: on_list},
        commit_interval_s=0.0,
        before_commit=settle,
        registry=CollectorRegistry(),
    )
    with pytest.raises(RuntimeError, match="state write lost"):
        await asyncio.wait_for(loop.run(), 5)
    assert fake.commits == []


def test_commit_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="commit_interval_s"):
        EventConsumer(
            FakeConsumer([]),
            FakeDeadLetters(),
            group="g",
            instance="i/0",
            handlers={},
            commit_interval_s=-1,
            registry=CollectorRegistry(),
        )


async def test_background_work_logs_failures_and_drains(caplog: pytest.LogCaptureFixture) -> None:
    work = BackgroundWork("upgrades")
    done = asyncio.Event()

    async def ok() -> None:
        await asyncio.sleep(0.01)
        done.set()

    async def bad() -> None:
        raise RuntimeError("disk full")

    async def forever() -> None:
        await asyncio.sleep(3600)

    with caplog.at_level(logging.ERROR):
        work.spawn(ok(), name="ok")
        work.spawn(bad(), name="bad")
        slow = work.spawn(forever(), name="forever")
        await work.aclose(timeout_s=0.2)
    assert done.is_set()
    assert slow.cancelled()
    assert work.failures == 1
    assert "disk full" in caplog.text
    assert len(work) == 0
    with pytest.raises(RuntimeError):
        work.spawn(ok())


async def test_transient_kafka_errors_are_retried_not_dead_lettered() -> None:
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    fake = FakeConsumer([{TP: [_rec(0, encode(VmListRequested(node_id="n1")))]}])
    dead = FakeDeadLetters()
    outage = [KafkaConnectionError(), KafkaTimeoutError(), KafkaConnectionError()] * 2

    async def publishes(event: VmListRequested, info: RecordInfo) -> None:
        if outage:
            raise outage.pop()

    loop = EventConsumer(
        fake,
        dead,
        group="g",
        instance="i/0",
        handlers={VmListRequested: publishes},
        handler_attempts=2,  # fewer than the outage's failures
        retry_backoff_s=0.001,
        retry_backoff_max_s=0.002,
        registry=CollectorRegistry(),
    )
    fake.on_empty = loop.request_stop
    await asyncio.wait_for(loop.run(), 5)
    assert dead.dead == []
    assert fake.commits == [{TP: 1}]


async def test_loop_waits_for_background_work_on_stop() -> None:
    work = BackgroundWork("upgrades")
    finished: list[str] = []

    async def upgrade(node: str) -> None:
        await asyncio.sleep(0.05)
        finished.append(node)

    async def accept(event: VmListRequested, info: RecordInfo) -> None:
        work.spawn(upgrade(event.node_id), name=f"upgrade-{event.node_id}")  # returns at once

    fake = FakeConsumer([{TP: [_rec(0, encode(VmListRequested(node_id="n1")))]}])
    loop = EventConsumer(
        fake,
        FakeDeadLetters(),
        group="g",
        instance="i/0",
        handlers={VmListRequested: accept},
        background=work,
        registry=CollectorRegistry(),
    )
    fake.on_empty = loop.request_stop
    await asyncio.wait_for(loop.run(), 5)
    assert fake.commits == [{TP: 1}]
    assert finished == ["n1"]
    assert work.closed


async def test_deliver_dead_letter_retries_until_published_and_stops_when_told() -> None:
    from escalator.bus.publisher import deliver_dead_letter
    from schemas.deadletter import DeadLetter

    dead = DeadLetter(
        source_topic="t",
        partition=0,
        offset=7,
        consumer_group="g",
        consumer="c",
        reason="not_json",
        detail="x",
    )

    class FlakySink:
        def __init__(self, failures: int) -> None:
            self.failures, self.sent = failures, []

        async def publish_dead_letter(self, d: DeadLetter) -> None:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("broker away")
            self.sent.append(d)

    sink = FlakySink(failures=2)
    assert await deliver_dead_letter(sink, dead, backoff_s=0.001) is True
    assert sink.sent == [dead]
    never = FlakySink(failures=10**6)
    assert (
        await deliver_dead_letter(never, dead, backoff_s=0.001, keep_trying=lambda: False) is False
    )
    assert never.sent == []
