"""The VNFM adapter and the reference VNFM as real processes over the session broker.

Each test has its own topic prefix and consumer groups. The adapter runs as
`python -m services.vnfm_adapter`, each reference VNFM as
`python -m services.vnfm_adapter.reference_vnfm --world URL --vnfm-id ID`.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from escalator.broker import BrokerHandle
from escalator.bus import (
    EventPublisher,
    ensure_topics,
    make_consumer,
    make_producer,
    read_to_high_watermark,
    topic_partitions,
)
from escalator.settings import KafkaSettings
from escalator.world.client import WorldClient
from schemas.codec import decode
from schemas.deadletter import DeadLetter
from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    NodeAvailable,
    NoticeExpired,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfmReplyRejected,
    VnfProfile,
    VnfRegistered,
)
from schemas.topics import (
    ALL_TOPICS,
    DEAD_LETTERS_TOPIC,
    VNF_REGISTRY,
    VNFM_EVENTS,
    VNFM_NOTICES,
    VNFM_REPLIES,
    VNFM_REQUESTS,
)
from schemas.types import BusinessOutcome, RedundancyModel, VmRef
from services.vnfm_adapter.domain import NodeCollection
from services.vnfm_adapter.settings import STATE_TOPIC

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CAMPAIGN = "cmp-vnfm-adapter"


# --- processes -------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.stderr: IO[str] = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            text=True,
        )

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log()


@pytest.fixture
def procs() -> Iterator[Callable[[str, list[str], dict[str, str]], Proc]]:
    started: list[Proc] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> Proc:
        started.append(Proc(name, args, env))
        return started[-1]

    yield start
    logs = {p.name: p.stop() for p in started}
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text}"


@pytest.fixture
def settings(broker: BrokerHandle, unique_name: Callable[..., str]) -> KafkaSettings:
    return broker.settings.model_copy(
        update={"topic_prefix": unique_name("vnfm") + ".", "partitions": 2}
    )


@pytest.fixture
def env(settings: KafkaSettings, unique_name: Callable[..., str]) -> dict[str, str]:
    return {
        **settings.to_env(),
        "ESCALATOR_VNFM_ADAPTER_GROUP_ID": unique_name("adapter"),
        "ESCALATOR_VNFM_ADAPTER_TICK_S": "0.05",
    }


@pytest.fixture
async def publisher(settings: KafkaSettings) -> AsyncIterator[EventPublisher]:
    await ensure_topics(settings, ALL_TOPICS)
    producer = make_producer(settings)
    await producer.start()
    try:
        yield EventPublisher(producer, settings)
    finally:
        await producer.stop()


def _wait_for_ready_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if selector.select(timeout=0.1):
            line = process.stdout.readline()
            if line.startswith("world listening on "):
                return line.removeprefix("world listening on ").strip()
            if not line and process.poll() is not None:
                break
    raise RuntimeError(f"world did not announce itself (exit code {process.poll()})")


@pytest.fixture
def world_url() -> Iterator[str]:
    command = [sys.executable, "-m", "escalator.world", "--port", "0", "--nodes", "6"]
    command += ["--seed", "1", "--speed", "10"]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        yield _wait_for_ready_line(process, 30)
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- reading topics --------------------------------------------------------------------------


async def read_until(
    settings: KafkaSettings,
    topic: str,
    done: Callable[[list[Any]], bool],
    *,
    parse: Callable[[bytes | None], Any] = decode,
    timeout_s: float = 60.0,
) -> list[Any]:
    """Everything on `topic` (prefixed name) from the beginning until `done(items)` holds."""
    consumer = make_consumer(settings, None)
    await consumer.start()
    items: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while not done(items):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met; got {items!r}")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                items.extend(parse(r.value) for r in records)
        return items
    finally:
        await consumer.stop()


async def read_all(settings: KafkaSettings, topic: str) -> list[Any]:
    """Every event on `topic` up to its high watermark, duplicates included."""
    consumer = make_consumer(settings, None)
    await consumer.start()
    items: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        pending = set(tps)
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=200)).values():
                items.extend(decode(r.value) for r in records)
            for tp in list(pending):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    pending.discard(tp)
        return items
    finally:
        await consumer.stop()


def of_type(items: list[Any], cls: type[Any]) -> list[Any]:
    return [i for i in items if isinstance(i, cls)]


def profile_of(view: Any) -> VnfProfile:
    return VnfProfile(
        vnf_id=view.id,
        vnfm_id=view.vnfm_id,
        redundancy=RedundancyModel(view.redundancy),
        members=tuple(view.members),
        min_in_service=view.min_in_service,
        max_unavailable=view.max_unavailable,
    )


def request(node_id: str, vms: tuple[VmRef, ...], seconds: float) -> BusinessMoveRequested:
    return BusinessMoveRequested(
        campaign_id=CAMPAIGN,
        node_id=node_id,
        vms=vms,
        deadline=datetime.now(UTC) + timedelta(seconds=seconds),
        producer="test",
    )


def adapter_args() -> list[str]:
    return ["-m", "services.vnfm_adapter"]


# --- tests -----------------------------------------------------------------------------------


async def test_request_to_business_moved_through_the_reference_vnfms(
    settings: KafkaSettings,
    env: dict[str, str],
    publisher: EventPublisher,
    procs: Callable[[str, list[str], dict[str, str]], Proc],
    world_url: str,
) -> None:
    async with WorldClient(world_url) as world:
        vnfs = await world.vnfs()
        for view in vnfs:
            await publisher.publish(VnfRegistered(vnf=profile_of(view)), VNF_REGISTRY)
        # node-3 of this world holds an active, standbys and load-balanced members
        node_id = "node-3"
        vms = await world.node_vms(node_id)
        kinds = {v.id: v for v in vnfs}
        procs("adapter", adapter_args(), env)
        for vnfm_id in sorted({v.vnfm_id for v in vnfs}):
            args = ["-m", "services.vnfm_adapter.reference_vnfm", "--world", world_url]
            procs(vnfm_id, [*args, "--vnfm-id", vnfm_id], env)
        req = request(node_id, tuple(VmRef(vm_id=vm.id, vnf_id=vm.vnf_id) for vm in vms), 60)
        await publisher.publish(req, VNFM_REQUESTS)

        events = await read_until(settings, settings.topic(VNFM_EVENTS.name), lambda got: bool(got))
        [moved] = events
        assert isinstance(moved, BusinessMoved)
        assert moved.request_id == req.event_id and not moved.timed_out
        assert moved.causation_id != req.event_id  # the last VNFM reply completed it
        outcome = {o.vm_id: o.outcome for o in moved.outcomes}
        assert set(outcome) == {vm.id for vm in vms}
        for vm in vms:
            vnf = kinds.get(vm.vnf_id or "")
            if vnf is None:
                assert outcome[vm.id] is BusinessOutcome.LEFT_FOR_VIM
            elif vnf.redundancy == "load_balanced":
                assert outcome[vm.id] is BusinessOutcome.DRAINED
            else:
                assert outcome[vm.id] is BusinessOutcome.SWITCHED_OVER
        drained = [
            (o.vnf_id, o.vm_id) for o in moved.outcomes if o.outcome is BusinessOutcome.DRAINED
        ]
        assert drained

        # garbage on the vendor topic: a dead letter; a reply to no notice: the VNFM is told
        # (VnfmReplyRejected on the notices topic), and it is not dead-lettered
        replies_topic = settings.topic(VNFM_REPLIES.name)
        producer: AIOKafkaProducer = publisher._producer  # type: ignore[assignment]
        await producer.send_and_wait(replies_topic, b"garbage", key=b"vnfm-1")
        bogus = VnfBusinessMoved(notice_id="n-nope", vnfm_id="vnfm-1", outcomes=(), producer="x")
        await publisher.publish(bogus, VNFM_REPLIES)
        told = await read_until(
            settings,
            settings.topic(VNFM_NOTICES.name),
            lambda got: bool(of_type(got, VnfmReplyRejected)),
        )
        [rejected] = of_type(told, VnfmReplyRejected)
        assert rejected.vnfm_id == "vnfm-1" and rejected.rejected_event_id == bogus.event_id
        assert rejected.reason == "unknown_notice" and "n-nope" in rejected.detail
        letters = await read_until(
            settings,
            settings.topic(DEAD_LETTERS_TOPIC),
            lambda got: len(got) >= 1,
            parse=lambda raw: DeadLetter.model_validate_json(raw or b""),
        )
        assert {(d.source_topic, d.reason) for d in letters} == {(replies_topic, "not_json")}

        # the node is back: each VNFM hears it and gives its drained members their load back
        available = NodeAvailable(
            campaign_id=CAMPAIGN,
            node_id=node_id,
            vnf_ids=tuple(sorted({vm.vnf_id for vm in vms if vm.vnf_id})),
            producer="test",
        )
        await publisher.publish(available, VNFM_REQUESTS)
        deadline = time.monotonic() + 30
        while True:
            shares = [(await world.vnf(vnf)).load_share[member] for vnf, member in drained]
            if all(share > 0 for share in shares):
                break
            assert time.monotonic() < deadline, f"drained members not restored: {shares}"
            await asyncio.sleep(0.1)
        notices = await read_until(
            settings,
            settings.topic(VNFM_NOTICES.name),
            lambda got: len(of_type(got, NodeAvailable)) >= 2,
        )
        assert of_type(notices, NoticeExpired) == []
        assert {n.vnfm_id for n in of_type(notices, NodeAvailable)} == {"vnfm-1", "vnfm-2"}


async def test_deadline_survives_a_kill_9_of_the_adapter(
    settings: KafkaSettings,
    env: dict[str, str],
    publisher: EventPublisher,
    procs: Callable[[str, list[str], dict[str, str]], Proc],
) -> None:
    profile = VnfProfile(
        vnf_id="vnf-as-1",
        vnfm_id="vnfm-silent",
        redundancy=RedundancyModel.ACTIVE_STANDBY,
        members=("vm-1", "vm-2"),
        min_in_service=1,
        max_unavailable=1,
    )
    await publisher.publish(VnfRegistered(vnf=profile), VNF_REGISTRY)
    adapter = procs("adapter", adapter_args(), env)
    # no VNFM answers: only the deadline can close the collection
    req = request("node-9", (VmRef(vm_id="vm-1", vnf_id="vnf-as-1"), VmRef(vm_id="vm-x")), 20)
    await publisher.publish(req, VNFM_REQUESTS)
    notices_topic = settings.topic(VNFM_NOTICES.name)
    [notice] = await read_until(settings, notices_topic, lambda got: bool(got))
    assert isinstance(notice, VnfMaintenanceNotified) and notice.vnfm_id == "vnfm-silent"

    # the request is committed and the open collection persisted: a restart cannot replay it
    group = env["ESCALATOR_VNFM_ADAPTER_GROUP_ID"]
    requests_topic = settings.topic(VNFM_REQUESTS.name)
    deadline = time.monotonic() + 30
    while True:
        offsets = await committed(settings, group, requests_topic)
        if sum(offsets) >= 1:
            break
        assert time.monotonic() < deadline, "the request was never committed"
        await asyncio.sleep(0.2)
    state_topic = settings.topic(STATE_TOPIC)
    stored = await read_to_high_watermark(
        settings, state_topic, decoder=lambda raw: NodeCollection.model_validate_json(raw or b"")
    )
    record = stored[b"node-9"]
    assert isinstance(record, NodeCollection) and not record.closed
    assert datetime.now(UTC) < req.deadline, "too slow: the deadline passed before the kill"

    adapter.kill()
    assert await read_all(settings, settings.topic(VNFM_EVENTS.name)) == []
    procs("adapter-restarted", adapter_args(), env)

    [moved] = await read_until(settings, settings.topic(VNFM_EVENTS.name), lambda got: bool(got))
    assert isinstance(moved, BusinessMoved) and moved.timed_out
    assert moved.occurred_at >= req.deadline
    assert {o.vm_id: o.outcome for o in moved.outcomes} == {
        "vm-1": BusinessOutcome.LEFT_FOR_VIM,
        "vm-x": BusinessOutcome.LEFT_FOR_VIM,
    }
    notices = await read_until(
        settings, notices_topic, lambda got: bool(of_type(got, NoticeExpired))
    )
    [expired] = of_type(notices, NoticeExpired)
    assert expired.notice_id == notice.notice_id
    # exactly once, even with the restarted adapter ticking on
    await asyncio.sleep(1.0)
    events = await read_all(settings, settings.topic(VNFM_EVENTS.name))
    assert [e.event_id for e in events] == [moved.event_id]


async def committed(settings: KafkaSettings, group: str, topic: str) -> list[int]:
    consumer = make_consumer(settings, group)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, topic)
        return [(await consumer.committed(TopicPartition(topic, p))) or 0 for p in sorted(parts)]
    finally:
        await consumer.stop()
