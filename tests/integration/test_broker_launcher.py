"""The broker launcher against real processes: JVM Apache Kafka, Tansu, and an external broker."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from escalator import broker as launcher
from escalator.broker import BrokerHandle, BrokerUnavailable, start_broker
from escalator.settings import KafkaSettings

pytestmark = pytest.mark.integration

real_kafka = pytest.mark.real_kafka


def _skip_unless(kind: str) -> None:
    probe = launcher.default_probes()[kind]()
    if not probe.ok:
        pytest.skip(f"{kind} broker not available here: {probe.reason}")


@pytest.fixture(scope="module")
def jvm_kafka() -> Iterator[BrokerHandle]:
    _skip_unless("kafka")
    handle = start_broker("kafka", log=None)
    yield handle
    handle.stop()


@pytest.fixture
def tansu() -> Iterator[BrokerHandle]:
    _skip_unless("tansu")
    handle = start_broker("tansu", log=None)
    yield handle
    handle.stop()


def producer(s: KafkaSettings, **extra: object) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=s.bootstrap_servers,
        enable_idempotence=s.enable_idempotence,
        **extra,
    )


def consumer(s: KafkaSettings, *topics: str, **extra: object) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=s.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=s.fetch_max_wait_ms,
        session_timeout_ms=s.session_timeout_ms,
        heartbeat_interval_ms=s.heartbeat_interval_ms,
        **extra,
    )


async def _consume(c: AIOKafkaConsumer, n: int, within: float = 20.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + within
    while len(got) < n and time.monotonic() < deadline:
        batches = await c.getmany(timeout_ms=500)
        for records in batches.values():
            got.extend(r.value for r in records if r.value is not None)
    return got


async def _roundtrip(s: KafkaSettings, topic: str, group: str | None = None) -> None:
    p = producer(s)
    await p.start()
    try:
        await p.send_and_wait(topic, b"hello", key=b"k1", headers=[("h", b"v")])
    finally:
        await p.stop()
    c = consumer(s, topic, group_id=group)
    await c.start()
    try:
        got = await _consume(c, 1)
    finally:
        await c.stop()
    assert got == [b"hello"]


# ---- JVM Apache Kafka -----------------------------------------------------------------------


@real_kafka
def test_jvm_kafka_handle(jvm_kafka: BrokerHandle) -> None:
    assert jvm_kafka.kind == "kafka"
    assert jvm_kafka.description.startswith("Apache Kafka 4.")
    assert "(JVM, KRaft)" in jvm_kafka.description
    assert jvm_kafka.bootstrap_servers.startswith("127.0.0.1:")
    assert jvm_kafka.settings.bootstrap_servers == jvm_kafka.bootstrap_servers
    assert jvm_kafka.settings.broker_kind == "kafka"
    assert jvm_kafka.settings.enable_idempotence
    assert jvm_kafka.alive()
    env = jvm_kafka.settings.to_env()
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == jvm_kafka.bootstrap_servers
    assert env["ESCALATOR_KAFKA_ENABLE_IDEMPOTENCE"] == "true"


@real_kafka
async def test_jvm_kafka_produce_consume_with_group(
    jvm_kafka: BrokerHandle, unique_name: Callable[..., str]
) -> None:
    await _roundtrip(jvm_kafka.settings, unique_name("rt"), group=unique_name("g"))


@real_kafka
async def test_jvm_kafka_end_offsets_after_multi_record_batch(
    jvm_kafka: BrokerHandle, unique_name: Callable[..., str]
) -> None:
    """Tansu reports a too-low end offset after a multi-record batch; real Kafka must not."""
    topic = unique_name("eo")
    s = jvm_kafka.settings
    p = producer(s)
    await p.start()
    try:
        batch = p.create_batch()
        for i in range(7):
            assert batch.append(key=None, value=b"r%d" % i, timestamp=None) is not None
        await (await p.send_batch(batch, topic, partition=0))
        await p.send_and_wait(topic, b"single", partition=0)
    finally:
        await p.stop()
    c = consumer(s)
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        assert (await c.end_offsets([tp]))[tp] == 8
        c.assign([tp])
        await c.seek_to_beginning(tp)
        assert len(await _consume(c, 8)) == 8
    finally:
        await c.stop()


@real_kafka
async def test_jvm_kafka_idempotent_producer(
    jvm_kafka: BrokerHandle, unique_name: Callable[..., str]
) -> None:
    topic = unique_name("idem")
    s = jvm_kafka.settings
    assert s.enable_idempotence
    p = producer(s, acks="all")
    await p.start()
    try:
        results = await asyncio.gather(
            *[await p.send(topic, b"m%d" % i, partition=0) for i in range(20)]
        )
        offsets = [r.offset for r in results]
    finally:
        await p.stop()
    assert offsets == list(range(20))


@real_kafka
async def test_jvm_kafka_transactions_are_isolated(
    jvm_kafka: BrokerHandle, unique_name: Callable[..., str]
) -> None:
    topic = unique_name("tx")
    s = jvm_kafka.settings
    assert s.enable_transactions
    p = producer(s, transactional_id=unique_name("txid"))
    await p.start()
    try:
        async with p.transaction():
            await p.send(topic, b"committed-1", partition=0)
        await p.begin_transaction()
        await p.send(topic, b"aborted", partition=0)
        await p.abort_transaction()
        async with p.transaction():
            await p.send(topic, b"committed-2", partition=0)
    finally:
        await p.stop()
    c = consumer(s, topic, isolation_level="read_committed")
    await c.start()
    try:
        got = await _consume(c, 2, within=10)
        got += await _consume(c, 1, within=1)  # nothing more may show up
    finally:
        await c.stop()
    assert got == [b"committed-1", b"committed-2"]


@real_kafka
def test_jvm_kafka_stop_kills_process_and_removes_workdir() -> None:
    _skip_unless("kafka")
    handle = start_broker("kafka", log=None)
    assert handle.pid is not None and handle.workdir is not None
    pid, workdir = handle.pid, Path(handle.workdir)
    assert workdir.is_dir()
    assert _process_running(pid)
    started = time.monotonic()
    handle.stop()
    assert time.monotonic() - started < 15
    assert not _process_running(pid)
    assert not workdir.exists()
    assert not handle.alive()
    handle.stop()  # idempotent


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---- Tansu ----------------------------------------------------------------------------------


async def test_tansu_produce_consume_with_launcher_settings(
    tansu: BrokerHandle, unique_name: Callable[..., str]
) -> None:
    assert tansu.kind == "tansu"
    assert tansu.description.startswith("Tansu")
    s = tansu.settings
    assert s.broker_kind == "tansu"
    assert not s.enable_idempotence
    assert s.fetch_max_wait_ms > 0
    await _roundtrip(s, unique_name("rt"), group=unique_name("g"))


def test_tansu_stop_kills_process(tansu: BrokerHandle) -> None:
    assert tansu.pid is not None
    pid = tansu.pid
    assert _process_running(pid)
    tansu.stop()
    assert not _process_running(pid)
    assert tansu.workdir is not None and not Path(tansu.workdir).exists()


# ---- external -------------------------------------------------------------------------------


@real_kafka
def test_external_broker_is_used_without_starting_anything(
    jvm_kafka: BrokerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", jvm_kafka.bootstrap_servers)
    monkeypatch.delenv("ESCALATOR_BROKER", raising=False)

    def must_not_start(_say: object, _timeout: float) -> BrokerHandle:
        raise AssertionError("auto mode started a broker although KAFKA_BOOTSTRAP_SERVERS is set")

    for kind in ("testcontainers", "kafka", "tansu"):
        monkeypatch.setitem(launcher._STARTERS, kind, must_not_start)
    lines: list[str] = []
    handle = start_broker(log=lines.append)
    assert handle.kind == "external"
    assert handle.bootstrap_servers == jvm_kafka.bootstrap_servers
    assert handle.pid is None
    assert handle.settings.broker_kind == "external"
    assert lines == [
        f"escalator: broker = external Kafka ({jvm_kafka.bootstrap_servers}) "
        f"at {jvm_kafka.bootstrap_servers}"
    ]
    handle.stop()  # does nothing to the broker it did not start
    assert jvm_kafka.alive()


@real_kafka
async def test_external_broker_works_from_inside_an_event_loop(
    jvm_kafka: BrokerHandle, monkeypatch: pytest.MonkeyPatch, unique_name: Callable[..., str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", jvm_kafka.bootstrap_servers)
    handle = start_broker("external", log=None)
    await _roundtrip(handle.settings, unique_name("ext"))


def test_external_broker_on_dead_port_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    monkeypatch.delenv("ESCALATOR_BROKER", raising=False)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=rf"KAFKA_BOOTSTRAP_SERVERS=127\.0\.0\.1:{port}"):
        start_broker(log=None)
    assert time.monotonic() - started < 15
