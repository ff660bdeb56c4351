"""The node agent as a separate process against the session broker and a real world process:
heartbeats, an upgrade end to end, a repeated request, kill -9 mid-reboot, another node's
command, injected faults (retried until success; or rolled back, healthy or not), kill -9
mid-retry and mid-rollback, rollback requests (after the upgrade, during it, refused, repeated),
a manifest that does not belong to its version."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

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
from schemas.codec import InvalidEvent, decode, encode
from schemas.envelope import Event
from schemas.events import (
    NodeAgentHeartbeat,
    NodeRollbackCompleted,
    NodeRollbackRequested,
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
)
from schemas.topics import NODE_COMMANDS, NODE_EVENTS, NODE_HEARTBEATS
from schemas.types import VersionManifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 3
TARGET = "2.0.0"
CAMPAIGN = "cmp-it"
MANIFEST = VersionManifest(
    version=TARGET,
    files=[{"name": "nova-2.0.0.rpm", "sha256": "b" * 64, "uri": "https://r/2.0.0/n.rpm"}],
)
# Short backoffs so that retries do not slow the tests down (the defaults are seconds).
FAST_RETRIES = {
    "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_S": "0.2",
    "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_MAX_S": "1",
}
WORLD_ARGS = ("--port", "0", "--nodes", "6", "--seed", "1", "--speed", "10")


# --- reading topics ------------------------------------------------------------------------


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

    async def wait_for(self, check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                got = [f"{type(e).__name__}({e.causation_id})" for e in self.events][-20:]
                raise AssertionError(f"timed out waiting for {what}; last events: {got}")
            await asyncio.sleep(0.05)


# --- fixtures ------------------------------------------------------------------------------


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
        self.producer: Any = None

    def start_agent(self, node_id: str, **env: str) -> Child:
        child = self.group.spawn(
            f"agent-{node_id}",
            python_module("services.node_agent", "--node-id", node_id, "--world", self.world_url),
            env={"ESCALATOR_NODE_AGENT_HEARTBEAT_INTERVAL_S": "0.5", **FAST_RETRIES, **env},
        )
        assert isinstance(child, Child)
        return child

    async def request(
        self, node_id: str, attempt: int = 1, manifest: VersionManifest = MANIFEST
    ) -> NodeUpgradeRequested:
        assert self.publisher is not None
        cmd = NodeUpgradeRequested(
            campaign_id=CAMPAIGN, node_id=node_id, attempt=attempt, manifest=manifest
        )
        await self.publisher.publish(cmd, NODE_COMMANDS)
        return cmd

    async def rollback(
        self, node_id: str, target: str = TARGET, attempt: int = 1
    ) -> NodeRollbackRequested:
        assert self.publisher is not None
        cmd = NodeRollbackRequested(
            campaign_id=CAMPAIGN, node_id=node_id, target_version=target, attempt=attempt
        )
        await self.publisher.publish(cmd, NODE_COMMANDS)
        return cmd

    async def send_raw(self, event: Event, key: str) -> None:
        """Publish `event` on NODE_COMMANDS under any key (a misrouted or forged command)."""
        topic = self.settings.topic(NODE_COMMANDS.name)
        await self.producer.send_and_wait(topic, value=encode(event), key=key.encode())

    async def until_node(self, node_id: str, check: Callable[[Any], bool], what: str) -> Any:
        deadline = time.monotonic() + 30
        while True:
            node = await self.world.node(node_id)
            if check(node):
                return node
            assert time.monotonic() < deadline, f"{node_id}: never {what}"
            await asyncio.sleep(0.02)

    async def heartbeat_from(self, node_id: str, **match: Any) -> NodeAgentHeartbeat:
        beats: list[NodeAgentHeartbeat] = await self.tap.wait_for(
            lambda: self.tap.of(NodeAgentHeartbeat, node_id=node_id, **match),
            f"a heartbeat of {node_id} with {match}",
        )
        return beats[-1]


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
    r.producer = producer
    await r.tap.start()
    try:
        yield r
    except BaseException:
        for child in group.children.values():
            print(f"--- {child.name}\n{child.log_tail(60)}")
        raise
    finally:
        await r.tap.stop()
        await producer.stop()
        await r.world.close()


async def node_ids(r: Rig) -> list[str]:
    return sorted(n.id for n in await r.world.nodes())


async def committed(settings: KafkaSettings, group: str, partition: int) -> int | None:
    consumer = make_consumer(settings, group)
    await consumer.start()
    try:
        tp = TopicPartition(settings.topic(NODE_COMMANDS.name), partition)
        offset: int | None = await consumer.committed(tp)
        return offset
    finally:
        await consumer.stop()


# --- tests ---------------------------------------------------------------------------------


async def test_heartbeats_upgrade_and_a_repeated_request(rig: Rig) -> None:
    node = (await node_ids(rig))[0]
    agent = rig.start_agent(node)
    beat = await rig.heartbeat_from(node)
    assert beat.installed_version == "1.0.0" and not beat.busy
    assert beat.interval_s == 0.5 and beat.campaign_id is None

    cmd = await rig.request(node)
    await rig.tap.wait_for(lambda: rig.tap.of(NodeUpgraded, causation_id=cmd.event_id), "done")
    kinds = [type(e).__name__ for e in rig.tap.replies_to(cmd)]
    assert kinds[0] == "NodeUpgradeAccepted"
    assert "NodeUpgradeProgressed" in kinds and kinds[-1] == "NodeUpgraded"
    for reply in rig.tap.replies_to(cmd):
        assert reply.campaign_id == "cmp-it" and reply.correlation_id == cmd.correlation_id
    [done] = rig.tap.of(NodeUpgraded, causation_id=cmd.event_id)
    assert done.applied and done.version == TARGET
    world_node = await rig.world.node(node)
    assert world_node.installed_version == TARGET and world_node.reboot_count == 1
    await rig.heartbeat_from(node, installed_version=TARGET)

    again = await rig.request(node, attempt=2)
    [repeat] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgraded, causation_id=again.event_id), "the repeat's answer"
    )
    assert repeat.applied is False and repeat.version == TARGET
    assert (await rig.world.node(node)).reboot_count == 1

    # both requests were answered for good: their offsets are committed
    partition = partition_for_key(node.encode(), PARTITIONS)
    group = f"escalator-node-agent.{node}"
    deadline = time.monotonic() + 10
    while await committed(rig.settings, group, partition) != 2:
        assert time.monotonic() < deadline, "offsets of the answered requests not committed"
        await asyncio.sleep(0.2)
    rig.group.stop_all()
    assert agent.process.returncode == 0, "a graceful stop exits 0"


async def test_kill_mid_reboot_then_restart_applies_exactly_once(rig: Rig) -> None:
    node = (await node_ids(rig))[1]
    # 120 s nominal at speed 10: a 12 s reboot, so that even on a loaded machine the new agent
    # is up before the reboot ends and must wait for it (a 3 s reboot sometimes ended first).
    agent = rig.start_agent(node, ESCALATOR_NODE_AGENT_REBOOT_S="120")
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    deadline = time.monotonic() + 20
    while (await rig.world.node(node)).power != "rebooting":
        assert time.monotonic() < deadline, "the node never started rebooting"
        await asyncio.sleep(0.05)
    agent.process.kill()
    agent.process.wait(10)
    assert (await rig.world.node(node)).power == "rebooting"
    assert not rig.tap.of(NodeUpgraded, causation_id=cmd.event_id)

    rig.start_agent(node, ESCALATOR_NODE_AGENT_REBOOT_S="120")
    [done] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgraded, causation_id=cmd.event_id), "the resumed upgrade"
    )
    assert done.applied is True
    world_node = await rig.world.node(node)
    assert world_node.reboot_count == 1, "the restarted agent rebooted the node again"
    assert world_node.installed_version == TARGET
    assert len(rig.tap.of(NodeUpgraded, node_id=node, applied=True)) == 1
    assert not rig.tap.of(NodeUpgradeFailed, node_id=node)


async def test_kill_after_reboot_then_restart_answers_applied_false(rig: Rig) -> None:
    node = (await node_ids(rig))[2]
    agent = rig.start_agent(node, ESCALATOR_NODE_AGENT_REBOOT_S="30")
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    deadline = time.monotonic() + 20
    while (await rig.world.node(node)).power != "rebooting":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    agent.process.kill()
    agent.process.wait(10)
    # the reboot ends while no agent runs: the request stays uncommitted
    await rig.world.wait_reboot_finished(node, timeout_s=20)
    rig.start_agent(node)
    [done] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgraded, causation_id=cmd.event_id), "the re-read request"
    )
    assert done.applied is False and done.version == TARGET
    assert (await rig.world.node(node)).reboot_count == 1


async def test_a_command_for_another_node_is_not_read(rig: Rig) -> None:
    nodes = await node_ids(rig)
    mine = nodes[3]
    mine_partition = partition_for_key(mine.encode(), PARTITIONS)
    other = next(n for n in nodes if partition_for_key(n.encode(), PARTITIONS) != mine_partition)
    other_partition = partition_for_key(other.encode(), PARTITIONS)
    rig.start_agent(mine)
    await rig.heartbeat_from(mine)
    foreign = await rig.request(other)
    own = await rig.request(mine)  # published after the foreign one
    await rig.tap.wait_for(lambda: rig.tap.of(NodeUpgraded, causation_id=own.event_id), "own")
    assert rig.tap.replies_to(foreign) == []
    assert (await rig.world.node(other)).reboot_count == 0
    group = f"escalator-node-agent.{mine}"
    assert await committed(rig.settings, group, other_partition) is None


async def test_a_command_keyed_to_this_node_but_naming_another_is_ignored(rig: Rig) -> None:
    nodes = await node_ids(rig)
    mine, other = nodes[5], nodes[0]
    agent = rig.start_agent(mine)
    await rig.heartbeat_from(mine)
    forged = NodeUpgradeRequested(campaign_id=CAMPAIGN, node_id=other, manifest=MANIFEST)
    await rig.send_raw(forged, key=mine)
    own = await rig.request(mine)
    await rig.tap.wait_for(lambda: rig.tap.of(NodeUpgraded, causation_id=own.event_id), "own")
    assert rig.tap.replies_to(forged) == []
    assert (await rig.world.node(other)).reboot_count == 0
    assert f"is for node {other}, not {mine}: ignored" in agent.log_tail(400)


# --- failures: retries, rollback, health --------------------------------------------------------


def finals(rig: Rig, node_id: str) -> list[Any]:
    """The node's final answers (not acceptance or progress)."""
    return [
        e
        for e in rig.tap.events
        if getattr(e, "node_id", None) == node_id
        and isinstance(e, NodeUpgraded | NodeUpgradeFailed | NodeRollbackCompleted)
    ]


async def test_faults_below_the_attempts_are_retried_until_one_apply_succeeds(rig: Rig) -> None:
    node = (await node_ids(rig))[4]
    await rig.world.inject_faults(node, 2)
    rig.start_agent(node)  # max_apply_attempts defaults to 3
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    [done] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgraded, causation_id=cmd.event_id), "the upgrade"
    )
    assert done.applied is True and done.version == TARGET
    world_node = await rig.world.node(node)
    assert world_node.reboot_count == 3, "two failed attempts and one successful apply"
    assert world_node.installed_version == TARGET and world_node.reboot is not None
    assert world_node.reboot.state == "succeeded"
    assert finals(rig, node) == [done], "exactly one final answer, the success"
    phases = [e.phase for e in rig.tap.of(NodeUpgradeProgressed, causation_id=cmd.event_id)]
    assert any("attempt 1/3 failed" in p for p in phases), phases
    assert any("attempt 2/3 failed" in p for p in phases), phases
    await rig.heartbeat_from(node, busy=False, installed_version=TARGET)


async def test_faults_on_every_attempt_roll_back_to_a_healthy_node(rig: Rig) -> None:
    node = (await node_ids(rig))[4]
    await rig.world.inject_faults(node, 3)
    rig.start_agent(node)
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    [failed] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgradeFailed, causation_id=cmd.event_id), "the failure"
    )
    assert (failed.attempts, failed.rolled_back, failed.healthy) == (3, True, True)
    assert failed.installed_version == "1.0.0" and failed.phase == "reboot"
    assert "failed" in failed.reason
    world_node = await rig.world.node(node)
    assert world_node.reboot_count == 4, "three failed attempts and the rollback"
    assert world_node.reboot is not None and world_node.reboot.target_version == "1.0.0"
    assert world_node.reboot.state == "succeeded" and world_node.installed_version == "1.0.0"
    assert finals(rig, node) == [failed], "one NodeUpgradeFailed, nothing else"
    await rig.heartbeat_from(node, busy=False, installed_version="1.0.0")


async def test_a_rollback_that_fails_too_leaves_the_node_unhealthy(rig: Rig) -> None:
    node = (await node_ids(rig))[3]
    await rig.world.inject_faults(node, 5)  # the rollback's reboot fails as well
    rig.start_agent(node, ESCALATOR_NODE_AGENT_MAX_APPLY_ATTEMPTS="2")
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    [failed] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgradeFailed, causation_id=cmd.event_id), "the failure"
    )
    assert (failed.attempts, failed.rolled_back, failed.healthy) == (2, False, False)
    assert "rollback to 1.0.0 failed" in failed.reason
    assert (await rig.world.node(node)).reboot_count == 3


async def test_kill_during_the_backoff_then_restart_goes_on_with_the_next_attempt(
    rig: Rig,
) -> None:
    node = (await node_ids(rig))[2]
    # Two attempts at most, both fail. Had the restarted agent started over, it would try two
    # more times (the second succeeding, faults spent); it must try once more, then roll back.
    env = {
        "ESCALATOR_NODE_AGENT_MAX_APPLY_ATTEMPTS": "2",
        "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_S": "4",
    }
    await rig.world.inject_faults(node, 2)
    agent = rig.start_agent(node, **env)
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    await rig.until_node(
        node, lambda n: n.reboot is not None and n.reboot.state == "failed", "failed a reboot"
    )
    agent.process.kill()
    agent.process.wait(10)
    assert not finals(rig, node)
    rig.start_agent(node, **env)
    [failed] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgradeFailed, causation_id=cmd.event_id), "the failure"
    )
    assert (failed.attempts, failed.rolled_back, failed.healthy) == (2, True, True)
    world_node = await rig.world.node(node)
    assert world_node.reboot_count == 3, "attempt 1, attempt 2 after the restart, the rollback"
    assert world_node.installed_version == "1.0.0"
    assert not rig.tap.of(NodeUpgraded, node_id=node)
    assert len({e.event_id for e in finals(rig, node)}) == 1


async def test_kill_mid_rollback_then_restart_resumes_it_and_answers(rig: Rig) -> None:
    node = (await node_ids(rig))[1]
    # 60 s nominal at speed 10: 6 s reboots, long enough to be killed in.
    env = {"ESCALATOR_NODE_AGENT_MAX_APPLY_ATTEMPTS": "1", "ESCALATOR_NODE_AGENT_REBOOT_S": "60"}
    await rig.world.inject_faults(node, 1)
    agent = rig.start_agent(node, **env)
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    await rig.until_node(
        node,
        lambda n: n.power == "rebooting" and n.reboot.target_version == "1.0.0",
        "rebooting back into 1.0.0",
    )
    agent.process.kill()
    agent.process.wait(10)
    rig.start_agent(node, **env)
    [failed] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgradeFailed, causation_id=cmd.event_id), "the failure"
    )
    assert (failed.rolled_back, failed.healthy) == (True, True)
    world_node = await rig.world.node(node)
    assert world_node.reboot_count == 2, "the failed attempt and one rollback, nothing more"
    assert world_node.installed_version == "1.0.0"
    assert not rig.tap.of(NodeUpgraded, node_id=node)


# --- rollback requests -----------------------------------------------------------------------


async def test_rollback_request_after_the_upgrade_and_its_redelivery(rig: Rig) -> None:
    node = (await node_ids(rig))[0]
    rig.start_agent(node)
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    await rig.tap.wait_for(lambda: rig.tap.of(NodeUpgraded, causation_id=cmd.event_id), "up")

    wrong = await rig.rollback(node, target="3.0.0")
    [refused] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeRollbackCompleted, causation_id=wrong.event_id), "the refusal"
    )
    assert refused.healthy is False and refused.reason.startswith("refused:")
    assert refused.installed_version == TARGET

    rb = await rig.rollback(node)
    [done] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeRollbackCompleted, causation_id=rb.event_id), "the rollback"
    )
    assert (done.installed_version, done.healthy, done.reason) == ("1.0.0", True, "")
    assert done.campaign_id == CAMPAIGN and done.correlation_id == rb.correlation_id
    world_node = await rig.world.node(node)
    assert world_node.installed_version == "1.0.0" and world_node.reboot_count == 2
    await rig.heartbeat_from(node, busy=False, installed_version="1.0.0")

    assert rig.publisher is not None
    await rig.publisher.publish(rb, NODE_COMMANDS)  # the very same request again
    await rig.tap.wait_for(
        lambda: len(rig.tap.of(NodeRollbackCompleted, causation_id=rb.event_id)) == 2, "again"
    )
    first, second = rig.tap.of(NodeRollbackCompleted, causation_id=rb.event_id)
    assert first.event_id == second.event_id and second.installed_version == "1.0.0"
    assert (await rig.world.node(node)).reboot_count == 2, "not rolled back twice"


async def test_rollback_requested_during_the_upgrade_undoes_it(rig: Rig) -> None:
    node = (await node_ids(rig))[3]
    rig.start_agent(node, ESCALATOR_NODE_AGENT_REBOOT_S="40")
    await rig.heartbeat_from(node)
    cmd = await rig.request(node)
    await rig.until_node(node, lambda n: n.power == "rebooting", "rebooting")
    rb = await rig.rollback(node)
    [done] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeRollbackCompleted, causation_id=rb.event_id), "the rollback"
    )
    assert done.healthy and done.installed_version == "1.0.0"
    [upgraded] = rig.tap.of(NodeUpgraded, causation_id=cmd.event_id)
    assert upgraded.applied, "the upgrade under way ended, and was reported, before the rollback"
    world_node = await rig.world.node(node)
    assert world_node.installed_version == "1.0.0" and world_node.reboot_count == 2


async def test_a_manifest_not_of_its_version_is_refused_without_applying(rig: Rig) -> None:
    node = (await node_ids(rig))[5]
    rig.start_agent(node)
    await rig.heartbeat_from(node)
    stale = VersionManifest(
        version=TARGET,
        files=[{"name": "nova-1.9.0.rpm", "sha256": "b" * 64, "uri": "https://r/nova-1.9.0.rpm"}],
    )
    cmd = await rig.request(node, manifest=stale)
    [refused] = await rig.tap.wait_for(
        lambda: rig.tap.of(NodeUpgradeFailed, causation_id=cmd.event_id), "the refusal"
    )
    assert refused.phase == "validate" and "1.9.0" in refused.reason
    assert not rig.tap.of(NodeUpgradeAccepted, causation_id=cmd.event_id)
    world_node = await rig.world.node(node)
    assert world_node.reboot_count == 0 and world_node.installed_version == "1.0.0"
