"""The Upgrade Manager as a separate process over the real broker; the test plays the others.

The test publishes heartbeats and answers every command the manager sends the way the Cloud
Manager, the VNFM adapter and the node agents would (causation_id = the command's id, keyed as
the catalogue says), answering each command id once (receivers dedupe on event ids).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
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
    topic_partitions,
)
from escalator.settings import KafkaSettings
from schemas import topics
from schemas.codec import InvalidEvent, decode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    CampaignCompleted,
    CampaignPolicy,
    NodeAgentHeartbeat,
    NodeAvailable,
    NodeCycleAdvanced,
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    NodeStep,
    NodeUpgraded,
    NodeUpgradeRequested,
    UpgradeRequested,
    VmMigrated,
    VmMigrationRequested,
)
from schemas.topics import DEAD_LETTERS_TOPIC
from schemas.types import (
    ArtifactFile,
    BusinessOutcome,
    VersionManifest,
    VmBusinessOutcome,
    VmOnNode,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
OLD, TARGET = "29.0.3", "29.1.0"
MANIFEST = VersionManifest(
    version=TARGET,
    files=(
        ArtifactFile(
            name="nova-compute-29.1.0.rpm",
            sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            uri="https://repo.example.net/29.1.0/nova-compute-29.1.0.rpm",
        ),
    ),
)
FULL_CYCLE = [
    NodeStep.CLAIMING,
    NodeStep.NOTIFYING,
    NodeStep.MIGRATING,
    NodeStep.UPGRADING,
    NodeStep.RELEASING,
    NodeStep.DONE,
]
WATCHED = (
    topics.CAMPAIGNS,
    topics.CLOUD_COMMANDS,
    topics.VNFM_REQUESTS,
    topics.NODE_COMMANDS,
)


@pytest.fixture
def kafka(broker: BrokerHandle) -> KafkaSettings:
    return broker.settings.model_copy(
        update={
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
            # A killed manager's partitions move after its session expires.
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
        }
    )


# --- the manager process ---------------------------------------------------------------------


class Manager:
    def __init__(self, kafka: KafkaSettings, log_dir: Path, name: str = "um-0") -> None:
        self.kafka = kafka
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        env = {**os.environ, **self.kafka.to_env()}
        env.update(
            ESCALATOR_UPGRADE_MANAGER_INSTANCE_ID=self.name,
            ESCALATOR_UPGRADE_MANAGER_TICK_INTERVAL_S="0.2",
            # The scripted cloud here publishes no inventory, and the planner rightly starts no
            # node it cannot see; these tests are about the manager's delivery and recovery,
            # the planner's service path is covered end to end (tests/integration/e2e).
            ESCALATOR_UPGRADE_MANAGER_PLANNER="false",
            ESCALATOR_UPGRADE_MANAGER_LOG_LEVEL=os.environ.get("UM_LOG_LEVEL", "INFO"),
            PYTHONPATH=str(ROOT),
        )
        self.runs += 1
        log = self.log_path.open("ab")
        log.write(f"=== run {self.runs}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.upgrade_manager"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def current_run(self) -> str:
        return self.log().rsplit(f"=== run {self.runs}\n", 1)[-1]

    def ready_partitions(self) -> list[int] | None:
        lines = [line for line in self.current_run().splitlines() if " ready (rebalance" in line]
        if not lines:
            return None
        listed = lines[-1].split("partitions [", 1)[1].split("]", 1)[0]
        return [int(p) for p in listed.split(",") if p.strip()]

    async def wait_ready(self, timeout_s: float = 30.0) -> float:
        started = time.monotonic()
        while self.ready_partitions() is None:
            self.check_alive()
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{self.name} not ready:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}"
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"{self.name} did not stop on SIGTERM") from None


# --- the other services ----------------------------------------------------------------------


@dataclass
class Seen:
    event: Event
    topic: str
    at: float


@dataclass
class World:
    """Heartbeating node agents, a cloud, a VNFM adapter; answers each command id once."""

    kafka: KafkaSettings
    nodes: list[str]
    hold: Callable[[Event], bool] = lambda _: False
    seen: list[Seen] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    answered: set[uuid.UUID] = field(default_factory=set)
    held: dict[uuid.UUID, Event] = field(default_factory=dict)
    # Our answer's event id -> when it was published (for latency).
    answer_sent: dict[uuid.UUID, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    async def __aenter__(self) -> World:
        await ensure_topics(self.kafka)
        self.producer = make_producer(self.kafka, linger_ms=0)
        await self.producer.start()
        self.publisher = EventPublisher(self.producer, self.kafka)
        self.consumer = make_consumer(self.kafka, None, fetch_max_wait_ms=20)
        await self.consumer.start()
        tps = []
        for name in [self.kafka.topic(t.name) for t in WATCHED] + [
            self.kafka.topic(DEAD_LETTERS_TOPIC)
        ]:
            parts = await topic_partitions(self.consumer, name)
            tps += [TopicPartition(name, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        await self.heartbeat()
        self.tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._beat())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def heartbeat(self) -> None:
        beats = [
            NodeAgentHeartbeat(
                node_id=node,
                agent_id=f"agent-{node}",
                installed_version=OLD,
                interval_s=2.0,
                producer=f"node-agent/{node}",
            )
            for node in self.nodes
        ]
        await self.publisher.publish_all(beats, topics.NODE_HEARTBEATS)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            await self.heartbeat()

    async def _consume(self) -> None:
        dlq = self.kafka.topic(DEAD_LETTERS_TOPIC)
        while True:
            batches = await self.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    now = time.monotonic()
                    if record.topic == dlq:
                        self.dead_letters.append(DeadLetter.model_validate_json(record.value))
                        continue
                    event = decode(record.value)
                    if isinstance(event, InvalidEvent):
                        continue
                    self.seen.append(Seen(event, record.topic, now))
                    sent = self.answer_sent.get(event.causation_id) if event.causation_id else None
                    if sent is not None and not isinstance(event, NodeCycleAdvanced):
                        self.latencies.append(now - sent)
                        self.answer_sent.pop(event.causation_id, None)  # type: ignore[arg-type]
                    await self.maybe_answer(event)

    async def maybe_answer(self, command: Event) -> None:
        if command.event_id in self.answered:
            return
        reply = self.reply_to(command)
        if reply is None:
            return
        if self.hold(command):
            self.held[command.event_id] = command
            return
        await self.send_reply(command, reply)

    async def release_held(self) -> None:
        self.hold = lambda _: False
        for command in list(self.held.values()):
            reply = self.reply_to(command)
            assert reply is not None
            await self.send_reply(command, reply)
        self.held.clear()

    async def send_reply(self, command: Event, reply: Event) -> None:
        self.answered.add(command.event_id)
        spec = topics.topic_of(reply.event_type, consumer=topics.Service.UPGRADE_MANAGER)
        self.answer_sent[reply.event_id] = time.monotonic()
        await self.publisher.publish(reply, spec)

    def reply_to(self, command: Event) -> Event | None:
        env = command.caused(producer="test")
        match command:
            case NodeMaintenanceRequested():
                vm = VmOnNode(vm_id=f"vm-{command.node_id}", vnf_id="vnf-a", vcpus=2, ram_mb=2048)
                return NodeMaintenanceEntered(
                    **env, node_id=command.node_id, vms=(vm,), prior_status="enabled"
                )
            case BusinessMoveRequested():
                outcomes = tuple(
                    VmBusinessOutcome(
                        vm_id=ref.vm_id, vnf_id=ref.vnf_id, outcome=BusinessOutcome.LEFT_FOR_VIM
                    )
                    for ref in command.vms
                )
                return BusinessMoved(**env, node_id=command.node_id, outcomes=outcomes)
            case VmMigrationRequested():
                return VmMigrated(
                    **env,
                    vm_id=command.vm_id,
                    node_id=command.node_id,
                    destination_node_id="spare-0",
                )
            case NodeUpgradeRequested():
                return NodeUpgraded(**env, node_id=command.node_id, version=TARGET)
            case NodeMaintenanceExitRequested():
                return NodeMaintenanceExited(
                    **env, node_id=command.node_id, restored_status="enabled"
                )
            case _:
                return None

    # --- driving and reading ---------------------------------------------------------------

    async def request(self, campaign_id: str, nodes: list[str], **policy: Any) -> None:
        request = UpgradeRequested(
            campaign_id=campaign_id,
            manifest=MANIFEST,
            nodes=tuple(nodes),
            policy=CampaignPolicy(**policy),
            producer="operator-cli",
        )
        self.answer_sent[request.event_id] = time.monotonic()
        await self.publisher.publish(request, topics.CAMPAIGNS)

    def of(self, cls: type[Any], campaign_id: str | None = None) -> list[Any]:
        return [
            s.event
            for s in self.seen
            if isinstance(s.event, cls)
            and (campaign_id is None or s.event.campaign_id == campaign_id)
        ]

    def steps(self, campaign_id: str, node: str) -> list[NodeStep]:
        """Steps entered by a node, each progress event id counted once, in topic order."""
        ids: set[uuid.UUID] = set()
        steps: list[NodeStep] = []
        for event in self.of(NodeCycleAdvanced, campaign_id):
            if event.node_id == node and event.event_id not in ids:
                ids.add(event.event_id)
                if not steps or steps[-1] is not event.step:
                    steps.append(event.step)
        return steps

    async def wait(self, what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def completed(
        self, campaign_id: str, managers: list[Manager], timeout_s: float = 30.0
    ) -> CampaignCompleted:
        started = time.monotonic()
        while not self.of(CampaignCompleted, campaign_id):
            for manager in managers:
                manager.check_alive()
            if time.monotonic() - started > timeout_s:
                logs = "\n".join(m.log()[-2500:] for m in managers)
                commands = "\n".join(
                    f"{s.event.event_type} {getattr(s.event, 'node_id', '')} {s.event.event_id}"
                    f" answered={s.event.event_id in self.answered}"
                    for s in self.seen
                    if s.event.campaign_id == campaign_id
                    and not isinstance(s.event, NodeCycleAdvanced)
                )
                raise AssertionError(f"{campaign_id} did not complete:\n{logs}\n{commands}")
            await asyncio.sleep(0.05)
        completed: CampaignCompleted = self.of(CampaignCompleted, campaign_id)[0]
        return completed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, latencies: list[float]) -> str:
    ms = [v * 1000 for v in latencies]
    return (
        f"{name}: {len(ms)} hops, reply -> next command p50 {statistics.median(ms):.1f} ms, "
        f"p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
    )


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.real_kafka
async def test_three_nodes_one_at_a_time_complete_in_order_with_every_step(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    nodes = ["compute-0", "compute-1", "compute-2"]
    manager = Manager(kafka, tmp_path)
    async with World(kafka, nodes) as world:
        manager.start()
        try:
            startup = await manager.wait_ready()
            await world.request("cmp-a", nodes, max_parallel=1)
            done = await world.completed("cmp-a", [manager])
            assert (done.upgraded, done.skipped, done.failed) == (3, 0, 0)
            for node in nodes:
                assert world.steps("cmp-a", node) == FULL_CYCLE, node
            # One at a time, in the requested order: a node is claimed only after the previous
            # one is done.
            order = [
                (e.node_id, e.step)
                for e in world.of(NodeCycleAdvanced, "cmp-a")
                if e.step in (NodeStep.CLAIMING, NodeStep.DONE)
            ]
            assert order == [(n, s) for n in nodes for s in (NodeStep.CLAIMING, NodeStep.DONE)]
            assert {e.node_id for e in world.of(NodeAvailable, "cmp-a")} == set(nodes)
            print(f"\nmanager ready after {startup:.2f} s")
            print(report("3-node campaign", world.latencies))
        finally:
            assert manager.stop() == 0
    run = manager.current_run()
    assert "stopped" in run
    print(next(line for line in run.splitlines() if "latency:" in line))


@pytest.mark.real_kafka
async def test_garbage_is_dead_lettered_and_the_campaign_still_completes(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    nodes = ["compute-0", "compute-1"]
    manager = Manager(kafka, tmp_path)
    async with World(kafka, nodes) as world:
        manager.start()
        try:
            await manager.wait_ready()
            await world.request("cmp-g", nodes, max_parallel=1)
            await world.wait("a claim", lambda: bool(world.of(NodeMaintenanceRequested, "cmp-g")))
            cloud_events = kafka.topic(topics.CLOUD_EVENTS.name)
            meta = await world.producer.send_and_wait(
                cloud_events, value=b"\x00 not json {", key=b"cmp-g"
            )
            done = await world.completed("cmp-g", [manager])
            assert done.upgraded == 2
            await world.wait("the dead letter", lambda: bool(world.dead_letters))
            dead = world.dead_letters[0]
            assert (dead.source_topic, dead.partition, dead.offset) == (
                cloud_events,
                meta.partition,
                meta.offset,
            )
            assert dead.reason in ("not_utf8", "not_json")
            assert dead.consumer_group == kafka.topic("escalator-upgrade-manager")
            assert dead.value() == b"\x00 not json {"
        finally:
            assert manager.stop() == 0


@pytest.mark.real_kafka
async def test_kill_9_mid_cycle_then_restart_re_emits_the_same_commands_and_completes(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    nodes = ["compute-0", "compute-1", "compute-2"]
    manager = Manager(kafka, tmp_path)
    holding = True

    def hold(command: Event) -> bool:
        return holding and isinstance(command, NodeUpgradeRequested)

    async with World(kafka, nodes, hold=hold) as world:
        manager.start()
        try:
            await manager.wait_ready()
            await world.request("cmp-k", nodes, max_parallel=2)
            await world.wait("two upgrades in flight", lambda: len(world.held) == 2)
            in_flight = {e.event_id: e for e in world.held.values()}
            await asyncio.sleep(1.0)  # let the manager commit what it did
            manager.kill()
            copies_before = len(world.seen)

            restarted = time.monotonic()
            manager.start()
            await manager.wait_ready()
            ready_s = time.monotonic() - restarted

            def re_emitted() -> bool:
                again = [s.event for s in world.seen[copies_before:]]
                return all(any(e.event_id == cid for e in again) for cid in in_flight)

            await world.wait("the in-flight commands again", re_emitted, timeout_s=15)
            resumed_s = time.monotonic() - restarted
            for s in world.seen[copies_before:]:
                if s.event.event_id in in_flight:
                    # The very same command: same id, same content.
                    assert s.event == in_flight[s.event.event_id]
            holding = False
            await world.release_held()
            done = await world.completed("cmp-k", [manager])
            assert (done.upgraded, done.skipped, done.failed) == (3, 0, 0)
            for node in nodes:
                assert world.steps("cmp-k", node) == FULL_CYCLE, node
            print(
                f"\nrestart: ready after {ready_s:.2f} s, "
                f"commands re-emitted after {resumed_s:.2f} s"
            )
        finally:
            assert manager.stop() == 0


@pytest.mark.real_kafka
async def test_two_managers_in_one_group_split_the_campaigns_and_each_completes(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    first, second = Manager(kafka, tmp_path, "um-a"), Manager(kafka, tmp_path, "um-b")
    # One campaign per partition, so that each instance owns some.
    campaigns: dict[int, str] = {}
    i = 0
    while len(campaigns) < kafka.partitions:
        campaign_id = f"cmp-{i}"
        campaigns.setdefault(partition_for_key(campaign_id.encode(), kafka.partitions), campaign_id)
        i += 1
    # Each campaign its own nodes: a node held by one running campaign is refused to another.
    nodes_of = {c: [f"{c}-compute-{n}" for n in range(4)] for c in campaigns.values()}
    async with World(kafka, [n for nodes in nodes_of.values() for n in nodes]) as world:
        first.start()
        try:
            await first.wait_ready()  # all partitions; the second's join then rebalances them
            second.start()
            await second.wait_ready()

            def split() -> bool:
                a, b = first.ready_partitions() or [], second.ready_partitions() or []
                return bool(a) and bool(b) and sorted(a + b) == list(range(kafka.partitions))

            await world.wait("the partitions split between both", split)
            # The instance that had every partition kept its share in memory across the
            # rebalance (the eager protocol revoked them all): nothing of it was read again.
            kept = [
                line
                for m in (first, second)
                for line in m.current_run().splitlines()
                if "ready (rebalance 2" in line
            ]
            assert kept, "the first instance never went through the rebalance"
            assert all(" kept in memory)" in line for line in kept), kept
            assert any(" (0 kept in memory)" not in line for line in kept), kept
            for campaign_id in campaigns.values():
                await world.request(campaign_id, nodes_of[campaign_id], max_parallel=2)
            for campaign_id in campaigns.values():
                done = await world.completed(campaign_id, [first, second])
                assert done.upgraded == len(nodes_of[campaign_id])
                for node in nodes_of[campaign_id]:
                    assert world.steps(campaign_id, node) == FULL_CYCLE
            owners = {
                campaign_id: [
                    m.name for m in (first, second) if f"campaign {campaign_id} running" in m.log()
                ]
                for campaign_id in campaigns.values()
            }
            assert all(len(names) == 1 for names in owners.values()), owners
            assert {names[0] for names in owners.values()} == {"um-a", "um-b"}
        finally:
            assert first.stop() == 0
            assert second.stop() == 0


@pytest.mark.real_kafka
@pytest.mark.slow
async def test_restart_with_many_campaigns_in_the_changelog(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """Start-up and recovery time with N campaigns' state in the changelog (printed)."""
    count = int(os.environ.get("UM_BENCH_CAMPAIGNS", "100"))
    per_campaign = 3
    # Each campaign its own nodes: a node held by one running campaign is refused to another.
    nodes_of = {
        f"cmp-{i:04d}": [f"compute-{i:04d}-{n}" for n in range(per_campaign)] for i in range(count)
    }
    manager = Manager(kafka, tmp_path)

    def hold(command: Event) -> bool:
        return isinstance(command, NodeUpgradeRequested)

    async with World(kafka, [n for nodes in nodes_of.values() for n in nodes], hold=hold) as world:
        manager.start()
        try:
            await manager.wait_ready()
            filled = time.monotonic()
            for campaign_id, nodes in nodes_of.items():
                await world.request(campaign_id, nodes, max_parallel=per_campaign)
            await world.wait(
                "every upgrade in flight",
                lambda: len(world.held) == per_campaign * count,
                timeout_s=90,
            )
            fill_s = time.monotonic() - filled
            in_flight = set(world.held)
            await asyncio.sleep(1.0)
            manager.kill()
            before = len(world.seen)
            restarted = time.monotonic()
            manager.start()
            ready_s = await manager.wait_ready()

            def all_again() -> bool:
                again = {s.event.event_id for s in world.seen[before:]}
                return in_flight <= again

            await world.wait("every in-flight command again", all_again, timeout_s=60)
            resumed_s = time.monotonic() - restarted
            print(
                f"\n{count} campaigns x {per_campaign} nodes mid-upgrade: filled in {fill_s:.1f} s;"
                f" restart: ready after {ready_s:.2f} s, all {len(in_flight)} in-flight commands "
                f"re-emitted after {resumed_s:.2f} s"
            )
            print(report("fill", world.latencies))
        finally:
            assert manager.stop() == 0
        summary = [line for line in manager.current_run().splitlines() if "latency:" in line]
        print(summary[-1] if summary else "no latency summary")
