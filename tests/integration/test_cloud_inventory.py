"""The Cloud Manager publishes the inventory on the compacted CLOUD_INVENTORY topic, as a separate
process against the session broker and a real world process: every node on start, the nodes a
claim or a migration changed right after, changes made behind its back by the periodic refresh
(and nothing else), and through the world going away and coming back."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition

from escalator.broker import BrokerHandle
from escalator.bus import EventPublisher, ensure_topics, make_admin, make_consumer, make_producer
from escalator.processes import Child, ProcessGroup, python_module
from escalator.settings import KafkaSettings
from escalator.world.client import WorldClient, WorldError
from schemas.codec import InvalidEvent, decode
from schemas.envelope import Event
from schemas.events import (
    NodeInventoryReported,
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    VmMigrated,
    VmMigrationRequested,
)
from schemas.topics import CLOUD_COMMANDS, CLOUD_EVENTS, CLOUD_INVENTORY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PARTITIONS = 3
CAMPAIGN = "cmp-inv"
NODES = [f"node-{i}" for i in range(1, 7)]
REFRESH_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tap:
    """Every record of some topics from their beginning, collected in the background."""

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
                            assert not isinstance(event, InvalidEvent), event
                            if isinstance(event, NodeInventoryReported):
                                assert record.key == event.node_id.encode()
                            self.events.append(event)
            finally:
                await consumer.stop()

        self._task = asyncio.create_task(pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def inventory(self, node: str | None = None) -> list[NodeInventoryReported]:
        return [
            e
            for e in self.events
            if isinstance(e, NodeInventoryReported) and (node is None or e.node_id == node)
        ]

    def latest(self, node: str) -> NodeInventoryReported | None:
        records = self.inventory(node)
        return records[-1] if records else None

    async def wait_for(self, check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                got = [type(e).__name__ for e in self.events][-20:]
                raise AssertionError(f"timed out waiting for {what}; last events: {got}")
            await asyncio.sleep(0.05)

    async def reply(self, cmd: Event) -> Event:
        replies: list[Event] = await self.wait_for(
            lambda: [e for e in self.events if e.causation_id == cmd.event_id], cmd.event_type
        )
        return replies[0]


class Rig:
    def __init__(self, settings: KafkaSettings, group: ProcessGroup, port: int) -> None:
        self.settings = settings
        self.group = group
        self.world_url = f"http://127.0.0.1:{port}"
        self.world = WorldClient(self.world_url)
        self.tap = Tap(
            settings, settings.topic(CLOUD_EVENTS.name), settings.topic(CLOUD_INVENTORY.name)
        )
        self.publisher: EventPublisher | None = None

    def start_cloud_manager(self) -> Child:
        child = self.group.spawn(
            "cloud-manager",
            python_module("services.cloud_manager", "--world", self.world_url),
            env={
                "ESCALATOR_CLOUD_MANAGER_INVENTORY_INTERVAL_S": str(REFRESH_S),
                "ESCALATOR_CLOUD_MANAGER_INVENTORY_FULL_EVERY": "1000",
            },
        )
        assert isinstance(child, Child)
        return child

    async def ask(self, cmd: Event) -> Event:
        assert self.publisher is not None
        await self.publisher.publish(cmd, CLOUD_COMMANDS)
        return await self.tap.reply(cmd)

    async def world_answers(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.world.healthz()
                return
            except WorldError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


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
    # Not the inventory topic: the Cloud Manager must create it (compacted) itself.
    await ensure_topics(settings, (CLOUD_COMMANDS, CLOUD_EVENTS))
    port = free_port()
    group.spawn(
        "world",
        python_module("escalator.world", "--port", str(port), "--nodes", "6", "--seed", "1"),
        wait_for=r"world listening on (http://127\.0\.0\.1:\d+)",
    )
    r = Rig(settings, group, port)
    producer = make_producer(settings)
    await producer.start()
    r.publisher = EventPublisher(producer, settings)
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


async def start(rig: Rig) -> Child:
    """The Cloud Manager, and the tap once the Cloud Manager created the inventory topic."""
    cm = rig.start_cloud_manager()
    topic = rig.settings.topic(CLOUD_INVENTORY.name)
    admin = make_admin(rig.settings)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while topic not in await admin.list_topics():
            assert cm.alive, cm.log_tail()
            assert time.monotonic() < deadline, "the inventory topic was not created"
            await asyncio.sleep(0.1)
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})]
        )
    finally:
        await admin.close()
    policy = {
        entry[0]: entry[1]
        for _code, _msg, _type, _name, entries in response.resources
        for entry in entries
    }
    assert policy["cleanup.policy"] == "compact"
    await rig.tap.start()
    return cm


def claim(node: str) -> NodeMaintenanceRequested:
    return NodeMaintenanceRequested(campaign_id=CAMPAIGN, node_id=node, holder=CAMPAIGN)


async def test_every_node_on_start_then_the_nodes_a_claim_and_a_migration_changed(
    rig: Rig,
) -> None:
    await start(rig)
    await rig.tap.wait_for(
        lambda: {e.node_id for e in rig.tap.inventory()} == set(NODES), "a record per node"
    )
    for node in await rig.world.inventory():
        record = rig.tap.latest(node.id)
        assert record is not None and record.campaign_id is None
        assert record.producer.startswith("cloud-manager")
        assert (record.failure_domain, record.vcpus, record.ram_mb) == (
            node.failure_domain,
            node.vcpus,
            node.ram_mb,
        )
        assert not record.in_maintenance and record.maintenance_holder is None
        assert [vm.vm_id for vm in record.vms] == [vm.id for vm in node.vms]
        assert sum(vm.vcpus for vm in record.vms) == (await rig.world.node(node.id)).used_vcpus

    entered = await rig.ask(claim("node-1"))
    assert isinstance(entered, NodeMaintenanceEntered)
    seen = len(rig.tap.events)
    held = await rig.tap.wait_for(
        lambda: [r for r in rig.tap.inventory("node-1") if r.in_maintenance],
        "node-1 in maintenance",
    )
    assert held[-1].maintenance_holder == CAMPAIGN
    assert [vm.vm_id for vm in held[-1].vms] == [vm.vm_id for vm in entered.vms]

    vm = entered.vms[0].vm_id
    moved = await rig.ask(VmMigrationRequested(campaign_id=CAMPAIGN, vm_id=vm, node_id="node-1"))
    assert isinstance(moved, VmMigrated)
    destination = moved.destination_node_id

    def vm_moved() -> bool:
        source, target = rig.tap.latest("node-1"), rig.tap.latest(destination)
        return (
            source is not None
            and target is not None
            and vm not in [v.vm_id for v in source.vms]
            and [(v.vm_id, v.incoming) for v in target.vms if v.vm_id == vm] == [(vm, False)]
        )

    await rig.tap.wait_for(vm_moved, f"{vm} moving from node-1 to {destination}")
    source = rig.tap.latest("node-1")
    assert source is not None and source.in_maintenance

    exited = await rig.ask(
        NodeMaintenanceExitRequested(campaign_id=CAMPAIGN, node_id="node-1", holder=CAMPAIGN)
    )
    assert isinstance(exited, NodeMaintenanceExited)
    await rig.tap.wait_for(
        lambda: (r := rig.tap.latest("node-1")) is not None and not r.in_maintenance,
        "node-1 out of maintenance",
    )
    # the nodes nobody touched were published once (nothing changed on them)
    untouched = set(NODES) - {"node-1", destination}
    assert all(len(rig.tap.inventory(n)) == 1 for n in untouched), [
        (n, len(rig.tap.inventory(n))) for n in sorted(untouched)
    ]
    assert len(rig.tap.events) > seen


async def test_the_refresh_finds_changes_made_behind_its_back_and_only_those(rig: Rig) -> None:
    await start(rig)
    await rig.tap.wait_for(lambda: len(rig.tap.inventory()) >= len(NODES), "every node")
    await asyncio.sleep(3 * REFRESH_S)
    assert len(rig.tap.inventory()) == len(NODES)  # refreshes found nothing new to say

    await rig.world.admin_disable("node-3", "broken fan")
    vm = (await rig.world.node_vms("node-5"))[0].id
    await rig.world.migrate_vm(vm)
    disabled = await rig.tap.wait_for(
        lambda: [r for r in rig.tap.inventory("node-3") if r.in_maintenance],
        "node-3 disabled",
        timeout_s=10,
    )
    assert disabled[-1].maintenance_holder is None
    await rig.tap.wait_for(
        lambda: (r := rig.tap.latest("node-5")) is not None and vm not in [v.vm_id for v in r.vms],
        f"{vm} gone from node-5",
        timeout_s=10,
    )
    await asyncio.sleep(3 * REFRESH_S)
    target = (await rig.world.vm(vm)).node_id
    changed = {"node-3", "node-5", target}
    for node in NODES:
        count = len(rig.tap.inventory(node))
        assert count > 1 if node in changed else count == 1, (node, count)


async def test_the_world_going_away_neither_stops_the_service_nor_the_inventory(
    rig: Rig,
) -> None:
    cm = await start(rig)
    await rig.tap.wait_for(lambda: len(rig.tap.inventory()) >= len(NODES), "every node")
    rig.group.kill("world")
    await asyncio.sleep(4 * REFRESH_S)  # several refreshes fail meanwhile
    assert cm.alive, cm.log_tail()
    assert "inventory not published" in cm.log_tail(200)
    # a claim sent while the world is away is answered once it is back; the fresh world (same
    # seed) has every node out of maintenance, which the refresh and the claim publish
    assert rig.publisher is not None
    cmd = claim("node-2")
    await rig.publisher.publish(cmd, CLOUD_COMMANDS)
    rig.group.restart("world")
    await rig.world_answers()
    entered = await rig.tap.reply(cmd)
    assert isinstance(entered, NodeMaintenanceEntered)
    await rig.tap.wait_for(
        lambda: (r := rig.tap.latest("node-2")) is not None and r.in_maintenance,
        "node-2 in maintenance after the world came back",
    )
    assert cm.alive
