"""The Cloud Manager as a separate process against the session broker and a real world process:
claim, refusal, migrations, exit, duplicates, and garbage on its commands topic."""

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
from escalator.bus import EventPublisher, ensure_topics, make_consumer, make_producer
from escalator.processes import Child, ProcessGroup, python_module
from escalator.settings import KafkaSettings
from escalator.world.client import WorldClient
from schemas.codec import InvalidEvent, decode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import (
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRefused,
    NodeMaintenanceRequested,
    VmListReported,
    VmListRequested,
    VmMigrated,
    VmMigrationFailed,
    VmMigrationRequested,
)
from schemas.topics import CLOUD_COMMANDS, CLOUD_EVENTS, DEAD_LETTERS_TOPIC

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PARTITIONS = 3
CAMPAIGN = "cmp-it"
WORLD_ARGS = ("--port", "0", "--nodes", "6", "--seed", "1", "--speed", "10")


class Tap:
    """Every record of some topics from their beginning, collected in the background."""

    def __init__(self, settings: KafkaSettings, *topics: str) -> None:
        self.settings = settings
        self.topics = topics
        self.events: list[Event] = []
        self.dead: list[DeadLetter] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = make_consumer(self.settings, None)
        await consumer.start()
        tps = [TopicPartition(t, p) for t in self.topics for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        dead_topic = self.settings.topic(DEAD_LETTERS_TOPIC)

        async def pump() -> None:
            try:
                while True:
                    for records in (await consumer.getmany(timeout_ms=100)).values():
                        for record in records:
                            if record.topic == dead_topic:
                                self.dead.append(DeadLetter.model_validate_json(record.value))
                                continue
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

    def replies_to(self, cmd: Event) -> list[Event]:
        return [e for e in self.events if e.causation_id == cmd.event_id]

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

    async def reply(self, cmd: Event, timeout_s: float = 30.0) -> Event:
        replies: list[Event] = await self.wait_for(
            lambda: self.replies_to(cmd), f"the reply to {cmd.event_type}", timeout_s
        )
        assert len(replies) == 1, replies
        reply = replies[0]
        assert reply.campaign_id == cmd.campaign_id
        assert reply.correlation_id == cmd.correlation_id
        return reply


class Rig:
    def __init__(self, settings: KafkaSettings, group: ProcessGroup, world_url: str) -> None:
        self.settings = settings
        self.group = group
        self.world_url = world_url
        self.world = WorldClient(world_url)
        self.tap = Tap(
            settings, settings.topic(CLOUD_EVENTS.name), settings.topic(DEAD_LETTERS_TOPIC)
        )
        self.publisher: EventPublisher | None = None

    def start_cloud_manager(self) -> Child:
        child = self.group.spawn(
            "cloud-manager", python_module("services.cloud_manager", "--world", self.world_url)
        )
        assert isinstance(child, Child)
        return child

    async def send(self, cmd: Event) -> Event:
        assert self.publisher is not None
        await self.publisher.publish(cmd, CLOUD_COMMANDS)
        return cmd

    async def ask(self, cmd: Event, timeout_s: float = 30.0) -> Event:
        await self.send(cmd)
        return await self.tap.reply(cmd, timeout_s)


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
            print(f"--- {child.name}\n{child.log_tail(60)}")
        raise
    finally:
        await r.tap.stop()
        await producer.stop()
        await r.world.close()


def claim(node: str, holder: str = CAMPAIGN, attempt: int = 1) -> NodeMaintenanceRequested:
    return NodeMaintenanceRequested(
        campaign_id=CAMPAIGN, node_id=node, holder=holder, attempt=attempt
    )


def exit_(node: str, holder: str = CAMPAIGN, attempt: int = 1) -> NodeMaintenanceExitRequested:
    return NodeMaintenanceExitRequested(
        campaign_id=CAMPAIGN, node_id=node, holder=holder, attempt=attempt
    )


def migrate(
    vm: str, node: str, attempt: int = 1, avoid: tuple[str, ...] = ()
) -> VmMigrationRequested:
    return VmMigrationRequested(
        campaign_id=CAMPAIGN, vm_id=vm, node_id=node, attempt=attempt, avoid_destinations=avoid
    )


# --- tests ---------------------------------------------------------------------------------


async def test_claim_migrate_exit_and_their_duplicates(rig: Rig) -> None:
    rig.start_cloud_manager()
    node = "node-1"
    on_node = sorted(vm.id for vm in await rig.world.node_vms(node))

    entered = await rig.ask(claim(node))
    assert isinstance(entered, NodeMaintenanceEntered)
    assert entered.prior_status == "enabled"
    assert sorted(vm.vm_id for vm in entered.vms) == on_node
    world_node = await rig.world.node(node)
    assert world_node.maintenance_holder == CAMPAIGN and world_node.service_status == "disabled"

    again = await rig.ask(claim(node, attempt=2))  # a re-sent claim: same outcome
    assert isinstance(again, NodeMaintenanceEntered)
    assert (again.prior_status, again.vms) == (entered.prior_status, entered.vms)

    # two migrations at once, each sent twice (the duplicate arrives while the first runs)
    vms = on_node[:2]
    firsts = [await rig.send(migrate(vm, node)) for vm in vms]
    seconds = [await rig.send(migrate(vm, node, attempt=2)) for vm in vms]
    destinations: dict[str, str] = {}
    for first, second in zip(firsts, seconds, strict=True):
        a = await rig.tap.reply(first)
        b = await rig.tap.reply(second)
        assert isinstance(a, VmMigrated), a
        assert isinstance(b, VmMigrated), b
        assert a.destination_node_id == b.destination_node_id != node
        destinations[a.vm_id] = a.destination_node_id
    for vm_id, destination in destinations.items():
        vm = await rig.world.vm(vm_id)
        assert vm.node_id == destination and vm.status == "active"

    exited = await rig.ask(exit_(node))
    assert isinstance(exited, NodeMaintenanceExited) and exited.restored_status == "enabled"
    world_node = await rig.world.node(node)
    assert world_node.maintenance_holder is None and world_node.service_status == "enabled"
    exited_again = await rig.ask(exit_(node, attempt=2))
    assert isinstance(exited_again, NodeMaintenanceExited)
    assert exited_again.restored_status == "enabled"

    listed = await rig.ask(VmListRequested(campaign_id=CAMPAIGN, node_id=node))
    assert isinstance(listed, VmListReported)
    assert sorted(vm.vm_id for vm in listed.vms) == sorted(set(on_node) - set(vms))


async def test_claims_of_an_admin_disabled_or_held_node_are_refused(rig: Rig) -> None:
    rig.start_cloud_manager()
    await rig.world.admin_disable("node-2", "broken fan")
    refused = await rig.ask(claim("node-2"))
    assert isinstance(refused, NodeMaintenanceRefused)
    assert "administrator" in refused.reason
    assert (await rig.world.node("node-2")).maintenance_holder is None

    await rig.world.claim_maintenance("node-3", "someone-else")
    held = await rig.ask(claim("node-3"))
    assert isinstance(held, NodeMaintenanceRefused) and held.current_holder == "someone-else"
    not_ours = await rig.ask(exit_("node-3"))
    assert isinstance(not_ours, NodeMaintenanceRefused)
    assert (await rig.world.node("node-3")).maintenance_holder == "someone-else"


async def test_a_migration_without_room_fails_with_a_reason(rig: Rig) -> None:
    rig.start_cloud_manager()
    # every other node in maintenance: nowhere to go
    for other in ("node-2", "node-3", "node-4", "node-5", "node-6"):
        await rig.world.claim_maintenance(other, "blocker")
    vm = (await rig.world.node_vms("node-1"))[0].id
    failed = await rig.ask(migrate(vm, "node-1"))
    assert isinstance(failed, VmMigrationFailed) and failed.reason
    assert (await rig.world.vm(vm)).node_id == "node-1"


async def test_a_failed_migration_names_its_destination_and_the_retry_goes_elsewhere(
    rig: Rig,
) -> None:
    rig.start_cloud_manager()
    node = "node-1"
    entered = await rig.ask(claim(node))
    assert isinstance(entered, NodeMaintenanceEntered)
    vm, other_vm = (v.vm_id for v in entered.vms[:2])
    others = [n.id for n in await rig.world.nodes() if n.id != node]
    # wherever the world places the VM, the migration starts there, then fails
    for other in others:
        await rig.world.inject_migration_faults(other, 1)

    failed = await rig.ask(migrate(vm, node))
    assert isinstance(failed, VmMigrationFailed), failed
    tried = failed.destination_node_id
    assert tried in others
    assert failed.reason == f"migration of VM {vm} to {tried} failed; it is still on {node}"
    stayed = await rig.world.vm(vm)
    assert (stayed.node_id, stayed.status) == (node, "active")
    assert (await rig.world.node(tried)).fail_next_migrations_to == 0  # it was tried there

    # the retry avoids it; were the tried node picked again, it would fail again
    for other in others:
        await rig.world.inject_migration_faults(other, 1 if other == tried else 0)
    moved = await rig.ask(migrate(vm, node, attempt=2, avoid=(tried,)))
    assert isinstance(moved, VmMigrated), moved
    assert moved.destination_node_id in others and moved.destination_node_id != tried
    landed = await rig.world.vm(vm)
    assert (landed.node_id, landed.status) == (moved.destination_node_id, "active")
    assert (await rig.world.node(tried)).fail_next_migrations_to == 1  # never tried again

    # every possible destination avoided: a failure that names none
    nowhere = await rig.ask(migrate(other_vm, node, avoid=tuple(others)))
    assert isinstance(nowhere, VmMigrationFailed), nowhere
    assert nowhere.destination_node_id is None
    assert "outside its avoided nodes" in nowhere.reason
    assert (await rig.world.vm(other_vm)).node_id == node


async def test_garbage_is_dead_lettered_and_the_service_keeps_working(rig: Rig) -> None:
    rig.start_cloud_manager()
    producer = make_producer(rig.settings)
    await producer.start()
    try:
        topic = rig.settings.topic(CLOUD_COMMANDS.name)
        await producer.send_and_wait(topic, b"\x00\xffgarbage", key=b"node-1")
        await producer.send_and_wait(topic, b'{"event_type": "VmListRequested"}', key=b"node-1")
    finally:
        await producer.stop()
    listed = await rig.ask(VmListRequested(campaign_id=CAMPAIGN, node_id="node-1"))
    assert isinstance(listed, VmListReported) and listed.vms
    letters = await rig.tap.wait_for(lambda: len(rig.tap.dead) >= 2, "two dead letters")
    assert letters
    assert sorted(d.reason for d in rig.tap.dead) == ["invalid_fields", "not_utf8"]
    assert all(d.consumer_group == "escalator-cloud-manager" for d in rig.tap.dead)
    # a command no reply can answer (an unknown node's VM list) is dead-lettered too
    unknown = await rig.send(VmListRequested(campaign_id=CAMPAIGN, node_id="no-such-node"))
    await rig.tap.wait_for(lambda: len(rig.tap.dead) >= 3, "the unanswerable command")
    assert rig.tap.dead[-1].reason == "handler_error"
    assert rig.tap.dead[-1].event_type == "VmListRequested"
    assert rig.tap.replies_to(unknown) == []
    still = await rig.ask(VmListRequested(campaign_id=CAMPAIGN, node_id="node-2"))
    assert isinstance(still, VmListReported)


async def test_restart_redoes_an_unanswered_command_with_the_same_outcome(rig: Rig) -> None:
    cm = rig.start_cloud_manager()
    entered = await rig.ask(claim("node-4"))
    assert isinstance(entered, NodeMaintenanceEntered)
    cm.process.kill()
    cm.process.wait(10)
    # sent while nobody listens, then a fresh process picks them up (and redoes nothing harmful)
    vm = entered.vms[0].vm_id
    mig = await rig.send(migrate(vm, "node-4"))
    rig.group.restart("cloud-manager")
    moved = await rig.tap.reply(mig)
    assert isinstance(moved, VmMigrated)
    assert (await rig.world.vm(vm)).node_id == moved.destination_node_id
