"""One process hosting several node agents (`python -m services.node_agent --node-ids ...`)
against the session broker and a real world process: every hosted node upgraded, each agent's
offset committed in its own group, a kill -9 of the pool mid-way loses nothing and applies
nothing twice, and requests for nodes the pool does not host are left alone."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from escalator.broker import BrokerHandle
from escalator.bus import (
    EventPublisher,
    ensure_topics,
    make_consumer,
    make_producer,
    partition_for_key,
)
from escalator.processes import Child, ProcessGroup, python_module
from escalator.settings import KafkaSettings
from escalator.world.client import WorldClient
from schemas.codec import InvalidEvent, decode
from schemas.envelope import Event
from schemas.events import NodeAgentHeartbeat, NodeUpgraded, NodeUpgradeRequested
from schemas.topics import NODE_COMMANDS, NODE_EVENTS, NODE_HEARTBEATS
from schemas.types import VersionManifest
from services.node_agent.pool import AgentInbox, CommandDispatcher, parse_node_ids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PARTITIONS = 3
TARGET = "2.0.0"
WORLD_ARGS = ("--port", "0", "--nodes", "6", "--seed", "1", "--speed", "10")
POOL_READY = "node agent pool of"


class Tap:
    """Every event of some topics from their beginning, collected in the background."""

    def __init__(self, settings: KafkaSettings, *topics: str) -> None:
        self.settings = settings
        self.topics = topics
        self.events: list[Event] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = make_consumer(self.settings, None)
        await consumer.start()
        tps = [TopicPartition(t, p) for t in self.topics for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        async def pump() -> None:
            try:
                while True:
                    for records in (await consumer.getmany(timeout_ms=100)).values():
                        for record in records:
                            event = decode(record.value)
                            if not isinstance(event, InvalidEvent):
                                self.events.append(event)
            finally:
                await consumer.stop()

        self._task = asyncio.create_task(pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def of(self, cls: type[Any], **match: Any) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, cls) and all(getattr(e, k) == v for k, v in match.items())
        ]

    def replies_to(self, cmd: Event) -> list[Event]:
        return [e for e in self.events if e.causation_id == cmd.event_id]

    async def wait_for(self, check: Callable[[], Any], what: str, timeout_s: float = 40.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                got = [f"{type(e).__name__}({e.causation_id})" for e in self.events][-20:]
                raise AssertionError(f"timed out waiting for {what}; last events: {got}")
            await asyncio.sleep(0.05)


class Rig:
    def __init__(self, settings: KafkaSettings, group: ProcessGroup, world_url: str) -> None:
        self.settings = settings
        self.group = group
        self.world_url = world_url
        self.world = WorldClient(world_url)
        self.tap = Tap(
            settings, settings.topic(NODE_EVENTS.name), settings.topic(NODE_HEARTBEATS.name)
        )
        self.publisher: EventPublisher | None = None

    def start_pool(self, node_ids: list[str], **env: str) -> Child:
        child = self.group.spawn(
            "pool",
            python_module(
                "services.node_agent", "--node-ids", ",".join(node_ids), "--world", self.world_url
            ),
            env={"ESCALATOR_NODE_AGENT_HEARTBEAT_INTERVAL_S": "0.5", **env},
        )
        assert isinstance(child, Child)
        return child

    async def request(self, node_id: str, attempt: int = 1) -> tuple[NodeUpgradeRequested, int]:
        """Publish a request; returns it and its offset."""
        assert self.publisher is not None
        cmd = NodeUpgradeRequested(
            campaign_id="cmp-pool",
            node_id=node_id,
            attempt=attempt,
            manifest=VersionManifest(
                version=TARGET,
                files=[{"name": "nova-2.0.0.rpm", "sha256": "b" * 64, "uri": "https://r/n.rpm"}],
            ),
        )
        meta = await self.publisher.publish(cmd, NODE_COMMANDS)
        return cmd, meta.offset

    async def heartbeats_from(self, node_ids: list[str], **match: Any) -> None:
        await self.tap.wait_for(
            lambda: all(self.tap.of(NodeAgentHeartbeat, node_id=n, **match) for n in node_ids),
            f"heartbeats of {node_ids} with {match}",
        )

    async def upgraded(self, cmd: Event) -> NodeUpgraded:
        found: list[NodeUpgraded] = await self.tap.wait_for(
            lambda: self.tap.of(NodeUpgraded, causation_id=cmd.event_id),
            f"the answer to {cmd.event_id}",
        )
        return found[0]

    async def wait_rebooting(self, node_ids: list[str]) -> None:
        deadline = time.monotonic() + 30
        for node_id in node_ids:
            while (await self.world.node(node_id)).power != "rebooting":
                assert time.monotonic() < deadline, f"{node_id} never started rebooting"
                await asyncio.sleep(0.05)

    async def committed(self, node_id: str) -> int | None:
        consumer = make_consumer(self.settings, f"escalator-node-agent.{node_id}")
        await consumer.start()
        try:
            tp = TopicPartition(
                self.settings.topic(NODE_COMMANDS.name),
                partition_for_key(node_id.encode(), PARTITIONS),
            )
            offset: int | None = await consumer.committed(tp)
            return offset
        finally:
            await consumer.stop()

    async def wait_committed(self, node_id: str, offset: int, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (got := await self.committed(node_id)) != offset:
            assert time.monotonic() < deadline, f"{node_id}: committed {got}, expected {offset}"
            await asyncio.sleep(0.2)


@pytest.fixture
def processes(tmp_path: Path, broker: BrokerHandle) -> Iterator[tuple[ProcessGroup, KafkaSettings]]:
    settings = broker.settings.model_copy(
        update={"topic_prefix": f"t{uuid.uuid4().hex[:12]}.", "partitions": PARTITIONS}
    )
    with ProcessGroup(tmp_path / "logs", base_env=settings.to_env()) as group:
        yield group, settings


@pytest.fixture
async def rig(processes: tuple[ProcessGroup, KafkaSettings]) -> AsyncIterator[Rig]:
    group, settings = processes
    await ensure_topics(settings)
    match = group.spawn(
        "world",
        python_module("escalator.world", *WORLD_ARGS),
        wait_for=r"world listening on (http://127\.0\.0\.1:\d+)",
    )
    assert not isinstance(match, Child)
    r = Rig(settings, group, match.group(1))
    producer = make_producer(settings)
    await producer.start()
    r.publisher = EventPublisher(producer, settings)
    await r.tap.start()
    try:
        yield r
    except BaseException:
        for child in group.children.values():
            print(f"--- {child.name}\n{child.log_tail(80)}")
        raise
    finally:
        await r.tap.stop()
        await producer.stop()
        await r.world.close()


async def node_ids(r: Rig) -> list[str]:
    return sorted(n.id for n in await r.world.nodes())


def hosted_sharing_a_partition(nodes: list[str], count: int) -> list[str]:
    """`count` nodes, two of which share a partition (the dispatcher must split them)."""
    by_partition: dict[int, list[str]] = {}
    for n in nodes:
        by_partition.setdefault(partition_for_key(n.encode(), PARTITIONS), []).append(n)
    pair = next(group[:2] for group in by_partition.values() if len(group) >= 2)
    rest = [n for n in nodes if n not in pair]
    return sorted([*pair, *rest[: count - 2]])


# --- tests ---------------------------------------------------------------------------------


async def test_a_pool_upgrades_its_nodes_and_a_kill_9_mid_way_loses_nothing(rig: Rig) -> None:
    hosted = hosted_sharing_a_partition(await node_ids(rig), 4)
    first, rest = hosted[0], hosted[1:]
    # 60 s nominal at speed 10: 6 s reboots, so the pool is killed while three nodes reboot.
    env = {"ESCALATOR_NODE_AGENT_REBOOT_S": "60"}
    pool = rig.start_pool(hosted, **env)
    await rig.heartbeats_from(hosted, installed_version="1.0.0", busy=False)

    # One node upgraded to the end: answered, and its request committed in its own group.
    cmd, offset = await rig.request(first)
    done = await rig.upgraded(cmd)
    assert done.applied and done.node_id == first
    await rig.wait_committed(first, offset + 1)

    # Three more, the pool killed while they reboot.
    sent = {n: await rig.request(n) for n in rest}
    cmds = {n: c for n, (c, _) in sent.items()}
    await rig.wait_rebooting(rest)
    pool.process.kill()
    pool.process.wait(10)
    assert not [e for c in cmds.values() for e in rig.tap.of(NodeUpgraded, causation_id=c.event_id)]

    restarted = rig.start_pool(hosted, **env)
    for node_id, c in cmds.items():
        answer = await rig.upgraded(c)
        assert answer.applied is True, f"{node_id}: the resumed upgrade must report the apply"
        assert answer.node_id == node_id
    await rig.heartbeats_from(hosted, installed_version=TARGET, busy=False)

    for node_id in hosted:
        world_node = await rig.world.node(node_id)
        assert world_node.installed_version == TARGET
        assert world_node.reboot_count == 1, f"{node_id} rebooted {world_node.reboot_count}x"
        assert len(rig.tap.of(NodeUpgraded, node_id=node_id, applied=True)) == 1
    # The request answered before the kill was committed: the restarted pool did not re-read it.
    assert len(rig.tap.of(NodeUpgraded, causation_id=cmd.event_id)) == 1
    # Each agent committed its own request in its own group once the answer was out.
    for node_id, (_, at) in sent.items():
        await rig.wait_committed(node_id, at + 1)

    rig.group.stop_all()
    assert restarted.process.returncode == 0, "a graceful stop exits 0"
    assert "node agent pool of 4 node(s)" in restarted.log_tail(400)


async def test_a_pool_leaves_requests_for_nodes_it_does_not_host(rig: Rig) -> None:
    nodes = await node_ids(rig)
    hosted = nodes[:3]
    partitions = {partition_for_key(n.encode(), PARTITIONS) for n in hosted}
    foreign = next(
        (n for n in nodes[3:] if partition_for_key(n.encode(), PARTITIONS) in partitions), None
    )
    assert foreign is not None, "the world's node ids changed; pick another foreign node"
    rig.start_pool(hosted)
    await rig.heartbeats_from(hosted)
    other, _ = await rig.request(foreign)
    own = [(await rig.request(n))[0] for n in hosted]  # after the foreign one
    for c in own:
        await rig.upgraded(c)
    await asyncio.sleep(0.5)
    assert rig.tap.replies_to(other) == []
    assert (await rig.world.node(foreign)).reboot_count == 0
    assert await rig.committed(foreign) is None


# --- the dispatcher's routing, without a broker --------------------------------------------


def _record(topic: str, partition: int, offset: int, key: bytes | None) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(topic, partition, offset, 0, 0, key, b"{}", None, 0, 0, [])


def test_dispatcher_routes_by_key_from_each_agents_own_commit() -> None:
    tp0, tp1 = TopicPartition("c", 0), TopicPartition("c", 1)

    def inbox(node: str, tp: TopicPartition, start: int | None) -> AgentInbox:
        return AgentInbox(node, f"g.{node}", tp, None, frozenset({0, 1}), start)  # type: ignore[arg-type]

    a, b, c = inbox("a", tp0, 5), inbox("b", tp0, 2), inbox("c", tp1, None)
    dispatcher = CommandDispatcher(None, [a, b, c])
    assert dispatcher.start_offsets() == {tp0: 2, tp1: None}
    dispatcher.dispatch(
        {
            tp0: [
                _record("c", 0, 3, b"a"),  # below a's commit: a answered it already
                _record("c", 0, 4, b"b"),
                _record("c", 0, 5, b"a"),
                _record("c", 0, 6, b"zz"),  # a node hosted elsewhere
                _record("c", 0, 7, None),  # keyless: the first agent of the partition
            ],
            tp1: [_record("c", 1, 0, b"c")],
        }
    )
    assert [r.offset for r in a._records] == [5, 7]
    assert [r.offset for r in b._records] == [4]
    assert [r.offset for r in c._records] == [0]
    assert (dispatcher.dispatched, dispatcher.skipped) == (4, 2)


def test_node_id_lists() -> None:
    assert parse_node_ids("a, b\nc # comment\n\n# all comment\nd,") == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="repeat"):
        parse_node_ids("a,b,a")
