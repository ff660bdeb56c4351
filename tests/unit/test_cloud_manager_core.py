"""The Cloud Manager's core rules, the command flows over an in-memory cloud, the commit gate
and the per-node ordering of background work (no broker, no processes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from escalator.bus import EventPublisher
from escalator.bus.offsets import CommitGate
from escalator.settings import KafkaSettings
from escalator.world.client import WorldError
from escalator.world.engine import WorldEngine
from escalator.world.errors import EngineError
from escalator.world.model import NodeView, Timings, VmView
from escalator.world.scenario import generate
from schemas.envelope import Event
from schemas.events import (
    NodeInventoryReported,
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
from schemas.topics import CLOUD_EVENTS, CLOUD_INVENTORY
from schemas.types import VmOnNode
from services.cloud_manager import domain
from services.cloud_manager import inventory as inventory_module
from services.cloud_manager.backends import WorldCloudBackend
from services.cloud_manager.domain import (
    MAX_MIGRATION_ROUNDS,
    Claimed,
    ClaimRefused,
    ListVms,
    NodeInventory,
    Released,
    ReleaseRefused,
    Reply,
    ReplyContext,
    StartMigration,
    VmLocation,
    WaitForMigration,
)
from services.cloud_manager.inventory import InventoryReporter
from services.cloud_manager.lanes import NodeLanes
from services.cloud_manager.ports import (
    ClaimRefused as ClaimRefusedError,
)
from services.cloud_manager.ports import (
    CloudUnavailable,
    MigrationRefused,
    UnknownNode,
)
from services.cloud_manager.ports import (
    ReleaseRefused as ReleaseRefusedError,
)
from services.cloud_manager.service import CloudManagerService, CommandFailed, GroupConsumer
from services.cloud_manager.settings import CloudManagerSettings

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
CTX = ReplyContext(producer="cloud-manager/0", now=NOW)
NODE = "compute-0-01"
CAMPAIGN = "cmp-1"
VM_A = VmOnNode(vm_id="vm-a", vnf_id="vnf-1", vcpus=2, ram_mb=2048)


def claim(holder: str = CAMPAIGN, attempt: int = 1) -> NodeMaintenanceRequested:
    return NodeMaintenanceRequested(
        campaign_id=CAMPAIGN, node_id=NODE, holder=holder, attempt=attempt
    )


def exit_(holder: str = CAMPAIGN, attempt: int = 1) -> NodeMaintenanceExitRequested:
    return NodeMaintenanceExitRequested(
        campaign_id=CAMPAIGN, node_id=NODE, holder=holder, attempt=attempt
    )


def migration(
    vm: str = "vm-a",
    destination: str | None = None,
    attempt: int = 1,
    avoid: tuple[str, ...] = (),
) -> VmMigrationRequested:
    return VmMigrationRequested(
        campaign_id=CAMPAIGN,
        vm_id=vm,
        node_id=NODE,
        destination_node_id=destination,
        avoid_destinations=avoid,
        attempt=attempt,
    )


def assert_reply_to(event: Event, cmd: Event) -> None:
    assert event.causation_id == cmd.event_id
    assert event.campaign_id == cmd.campaign_id
    assert event.correlation_id == cmd.correlation_id
    assert event.producer == CTX.producer and event.occurred_at == NOW
    assert CLOUD_EVENTS.carries(event.event_type)
    assert CLOUD_EVENTS.key_for(event) == CAMPAIGN.encode()


def reply_of(step: object) -> Event:
    assert isinstance(step, Reply), step
    return step.event


# --- maintenance rules ---------------------------------------------------------------------


def test_claimed_node_is_listed_after_the_claim_then_entered() -> None:
    cmd = claim()
    step = domain.after_claim(cmd, Claimed("enabled"), CTX)
    assert step == ListVms(node_id=NODE, prior_status="enabled")
    assert isinstance(step, ListVms)
    event = reply_of(domain.maintenance_entered(cmd, step, [VM_A], CTX))
    assert isinstance(event, NodeMaintenanceEntered)
    assert event.vms == (VM_A,) and event.prior_status == "enabled"
    assert_reply_to(event, cmd)


def test_refused_claim_names_the_holder() -> None:
    cmd = claim()
    event = reply_of(domain.after_claim(cmd, ClaimRefused("held by cmp-0", "cmp-0"), CTX))
    assert isinstance(event, NodeMaintenanceRefused)
    assert (event.reason, event.current_holder) == ("held by cmp-0", "cmp-0")
    assert_reply_to(event, cmd)


def test_release_gives_exited_with_the_restored_status() -> None:
    cmd = exit_()
    event = reply_of(domain.after_release(cmd, Released("disabled"), CTX))
    assert isinstance(event, NodeMaintenanceExited) and event.restored_status == "disabled"
    assert_reply_to(event, cmd)


def test_release_refused_answers_the_exit_with_a_refusal() -> None:
    cmd = exit_(holder="cmp-9")
    event = reply_of(domain.after_release(cmd, ReleaseRefused("held by cmp-1", CAMPAIGN), CTX))
    assert isinstance(event, NodeMaintenanceRefused)
    assert event.reason.startswith("release refused") and event.current_holder == CAMPAIGN
    assert_reply_to(event, cmd)


def test_vm_list_is_reported() -> None:
    cmd = VmListRequested(campaign_id=CAMPAIGN, node_id=NODE)
    incoming = VM_A.model_copy(update={"vm_id": "vm-b", "incoming": True})
    event = reply_of(domain.vm_list_reported(cmd, [VM_A, incoming], CTX))
    assert isinstance(event, VmListReported) and event.vms == (VM_A, incoming)
    assert_reply_to(event, cmd)


def test_reply_ids_are_stable_per_command_and_differ_by_kind() -> None:
    cmd = claim()
    listed = ListVms(NODE, "enabled")
    a = reply_of(domain.maintenance_entered(cmd, listed, [], CTX))
    b = reply_of(domain.maintenance_entered(cmd, listed, [], CTX))
    refused = reply_of(domain.after_claim(cmd, ClaimRefused("x"), CTX))
    other = reply_of(domain.maintenance_entered(claim(attempt=2), listed, [], CTX))
    assert a.event_id == b.event_id
    assert len({a.event_id, refused.event_id, other.event_id}) == 3


# --- migration rules -----------------------------------------------------------------------


def test_vm_idle_on_the_source_is_migrated() -> None:
    cmd = migration(destination="compute-0-02")
    step = domain.next_migration_step(cmd, VmLocation("vm-a", NODE), CTX)
    assert step == StartMigration("vm-a", NODE, "compute-0-02")


def test_vm_no_longer_on_the_source_is_reported_migrated_again() -> None:
    cmd = migration()
    event = reply_of(domain.next_migration_step(cmd, VmLocation("vm-a", "compute-0-05"), CTX))
    assert isinstance(event, VmMigrated)
    assert (event.vm_id, event.node_id, event.destination_node_id) == (
        "vm-a",
        NODE,
        "compute-0-05",
    )
    assert_reply_to(event, cmd)


@pytest.mark.parametrize(
    "location",
    [VmLocation("vm-a", NODE, "compute-0-05"), VmLocation("vm-a", "compute-0-05", NODE)],
    ids=["leaving the source", "coming toward the source"],
)
def test_a_migration_under_way_is_waited_for(location: VmLocation) -> None:
    step = domain.next_migration_step(migration(), location, CTX)
    assert step == WaitForMigration("vm-a")


def test_a_migration_between_two_other_nodes_means_it_left_the_source() -> None:
    location = VmLocation("vm-a", "compute-0-04", "compute-0-05")
    event = reply_of(domain.next_migration_step(migration(), location, CTX))
    assert isinstance(event, VmMigrated) and event.destination_node_id == "compute-0-04"


def test_refused_migration_of_an_idle_vm_on_the_source_fails() -> None:
    cmd = migration()
    step = domain.next_migration_step(
        cmd, VmLocation("vm-a", NODE), CTX, refused="no valid destination", rounds=1
    )
    event = reply_of(step)
    assert isinstance(event, VmMigrationFailed) and event.reason == "no valid destination"
    assert_reply_to(event, cmd)


def test_a_failure_names_the_destination_tried_or_none_when_none_was_chosen() -> None:
    cmd = migration()
    idle = VmLocation("vm-a", NODE)
    failed = reply_of(
        domain.next_migration_step(
            cmd,
            idle,
            CTX,
            refused="migration of VM vm-a to compute-0-02 failed",
            refused_destination="compute-0-02",
            rounds=1,
        )
    )
    assert isinstance(failed, VmMigrationFailed)
    assert failed.destination_node_id == "compute-0-02"
    assert failed.reason == "migration of VM vm-a to compute-0-02 failed"
    assert_reply_to(failed, cmd)
    nowhere = reply_of(
        domain.next_migration_step(cmd, idle, CTX, refused="no valid destination", rounds=1)
    )
    assert isinstance(nowhere, VmMigrationFailed) and nowhere.destination_node_id is None
    # failures that are about no destination at all never name one
    unknown = reply_of(domain.next_migration_step(cmd, None, CTX, refused_destination="x"))
    assert isinstance(unknown, VmMigrationFailed) and unknown.destination_node_id is None
    stuck = reply_of(domain.next_migration_step(cmd, idle, CTX, rounds=MAX_MIGRATION_ROUNDS))
    assert isinstance(stuck, VmMigrationFailed) and stuck.destination_node_id is None


def test_a_retry_passes_its_avoided_destinations_to_the_cloud() -> None:
    cmd = migration(attempt=2, avoid=("compute-0-02", "compute-0-04"))
    step = domain.next_migration_step(cmd, VmLocation("vm-a", NODE), CTX)
    assert step == StartMigration("vm-a", NODE, None, ("compute-0-02", "compute-0-04"))
    # a VM that left the source meanwhile is reported where it is, avoided or not
    gone = reply_of(domain.next_migration_step(cmd, VmLocation("vm-a", "compute-0-02"), CTX))
    assert isinstance(gone, VmMigrated) and gone.destination_node_id == "compute-0-02"


def test_refused_but_meanwhile_migrating_is_waited_for_not_failed() -> None:
    location = VmLocation("vm-a", NODE, "compute-0-05")
    step = domain.next_migration_step(migration(), location, CTX, refused="already migrating")
    assert step == WaitForMigration("vm-a")


def test_unknown_vm_fails() -> None:
    event = reply_of(domain.next_migration_step(migration(), None, CTX))
    assert isinstance(event, VmMigrationFailed) and "does not exist" in event.reason


def test_a_vm_that_keeps_moving_gives_up_after_the_round_limit() -> None:
    moving = VmLocation("vm-a", NODE, "compute-0-05")
    event = reply_of(
        domain.next_migration_step(migration(), moving, CTX, rounds=MAX_MIGRATION_ROUNDS)
    )
    assert isinstance(event, VmMigrationFailed)
    idle = VmLocation("vm-a", NODE)
    event = reply_of(
        domain.next_migration_step(migration(), idle, CTX, rounds=MAX_MIGRATION_ROUNDS)
    )
    assert isinstance(event, VmMigrationFailed)


# --- the command flows over an in-memory cloud --------------------------------------------


class FakeCloud:
    """The world's semantics in a few lines: CAS claims, saved status, instant migrations."""

    def __init__(self) -> None:
        self.status = {NODE: "enabled", "compute-0-02": "enabled", "compute-0-03": "disabled"}
        self.holder: dict[str, str | None] = dict.fromkeys(self.status)
        self.saved: dict[str, str] = {}
        self.vms: dict[str, VmLocation] = {"vm-a": VmLocation("vm-a", NODE)}
        self.calls: list[str] = []
        self.unavailable = 0
        self.refuse_migration: str | None = None
        # where migrations without a destination go, best first; those to `failing` start,
        # then fail (the VM stays on its source)
        self.placement = ["compute-0-02", "compute-0-04", "compute-0-05"]
        self.failing: set[str] = set()
        self.avoided: list[tuple[str, ...]] = []
        self.inventory_unavailable = 0
        self.inventory_calls: list[tuple[str, ...] | None] = []

    def _maybe_down(self) -> None:
        if self.unavailable > 0:
            self.unavailable -= 1
            raise CloudUnavailable("world unreachable")

    def _node(self, node_id: str) -> None:
        if node_id not in self.status:
            raise UnknownNode(f"unknown node {node_id}")

    async def claim_and_list_vms(self, node_id: str, holder: str) -> tuple[str, list[VmOnNode]]:
        status = await self.claim_maintenance(node_id, holder)
        return status, await self.list_vms(node_id)

    async def claim_maintenance(self, node_id: str, holder: str) -> str:
        self._maybe_down()
        self._node(node_id)
        self.calls.append(f"claim {node_id}")
        current = self.holder[node_id]
        if current == holder:
            return self.saved[node_id]
        if current is not None:
            raise ClaimRefusedError(f"held by {current}", current)
        if self.status[node_id] == "disabled":
            raise ClaimRefusedError("disabled by an administrator")
        self.saved[node_id], self.status[node_id] = self.status[node_id], "disabled"
        self.holder[node_id] = holder
        return self.saved[node_id]

    async def release_maintenance(self, node_id: str, holder: str) -> str:
        self._node(node_id)
        self.calls.append(f"release {node_id}")
        current = self.holder[node_id]
        if current is None:
            return self.status[node_id]
        if current != holder:
            raise ReleaseRefusedError(f"held by {current}", current)
        self.status[node_id] = self.saved.pop(node_id)
        self.holder[node_id] = None
        return self.status[node_id]

    async def list_vms(self, node_id: str) -> list[VmOnNode]:
        self._node(node_id)
        self.calls.append(f"list {node_id}")
        return [
            VmOnNode(vm_id=vm.vm_id, vcpus=1, ram_mb=512)
            for vm in self.vms.values()
            if vm.node_id == node_id
        ]

    async def migrate_vm(
        self,
        vm_id: str,
        source: str,
        destination: str | None,
        avoid: Collection[str] = (),
    ) -> str:
        self.calls.append(f"migrate {vm_id}")
        self.avoided.append(tuple(avoid))
        if self.refuse_migration:
            raise MigrationRefused(self.refuse_migration, destination=destination)
        target = destination or next((n for n in self.placement if n not in avoid), None)
        if target is None:
            raise MigrationRefused(
                f"no valid destination for VM {vm_id} outside its avoided nodes {', '.join(avoid)}"
            )
        if target in self.failing:
            raise MigrationRefused(
                f"migration of VM {vm_id} to {target} failed; it is still on {source}",
                destination=target,
            )
        self.vms[vm_id] = VmLocation(vm_id, target)
        return target

    async def vm_location(self, vm_id: str) -> VmLocation | None:
        self.calls.append(f"locate {vm_id}")
        return self.vms.get(vm_id)

    async def wait_vm_settled(self, vm_id: str) -> VmLocation | None:
        self.calls.append(f"wait {vm_id}")
        vm = self.vms.get(vm_id)
        if vm is not None and vm.migrating_to is not None:
            vm = self.vms[vm_id] = VmLocation(vm_id, vm.migrating_to)
        return vm

    async def inventory(self, node_ids: Collection[str] | None = None) -> list[NodeInventory]:
        self.inventory_calls.append(None if node_ids is None else tuple(node_ids))
        if self.inventory_unavailable > 0:
            self.inventory_unavailable -= 1
            raise CloudUnavailable("world unreachable")
        for node_id in node_ids or ():
            self._node(node_id)
        return [
            NodeInventory(
                node_id=node_id,
                failure_domain=f"fd-{i % 2}",
                vcpus=8,
                ram_mb=16384,
                in_maintenance=self.holder[node_id] is not None or status == "disabled",
                maintenance_holder=self.holder[node_id],
                vms=tuple(
                    VmOnNode(vm_id=vm.vm_id, vcpus=1, ram_mb=512)
                    for vm in self.vms.values()
                    if vm.node_id == node_id
                ),
            )
            for i, (node_id, status) in enumerate(self.status.items())
            if node_ids is None or node_id in node_ids
        ]


def service_over(cloud: FakeCloud) -> CloudManagerService:
    return CloudManagerService(
        CloudManagerSettings(),
        backend=cloud,
        consumer=cast(GroupConsumer, None),
        publisher=cast(EventPublisher, None),
        clock=lambda: NOW,
    )


async def test_claim_then_reclaim_by_the_same_holder_enters_twice_with_the_prior_status() -> None:
    cloud = FakeCloud()
    service = service_over(cloud)
    first = await service.reply_to(claim())
    again = await service.reply_to(claim(attempt=2))
    for event in (first, again):
        assert isinstance(event, NodeMaintenanceEntered)
        assert event.prior_status == "enabled"
        assert [vm.vm_id for vm in event.vms] == ["vm-a"]
    assert cloud.calls == [f"claim {NODE}", f"list {NODE}"] * 2


async def test_claim_held_by_another_or_admin_disabled_or_unknown_is_refused() -> None:
    cloud = FakeCloud()
    service = service_over(cloud)
    await service.reply_to(claim(holder="cmp-0"))
    held = await service.reply_to(claim())
    assert isinstance(held, NodeMaintenanceRefused) and held.current_holder == "cmp-0"
    disabled = await service.reply_to(
        NodeMaintenanceRequested(campaign_id=CAMPAIGN, node_id="compute-0-03", holder=CAMPAIGN)
    )
    assert isinstance(disabled, NodeMaintenanceRefused) and "administrator" in disabled.reason
    unknown = await service.reply_to(
        NodeMaintenanceRequested(campaign_id=CAMPAIGN, node_id="nope", holder=CAMPAIGN)
    )
    assert isinstance(unknown, NodeMaintenanceRefused) and "unknown node" in unknown.reason
    # listed once, for cmp-0's claim: a refused claim never lists
    assert cloud.calls.count(f"list {NODE}") == 1


async def test_exit_restores_and_a_repeated_exit_is_exited_again() -> None:
    cloud = FakeCloud()
    service = service_over(cloud)
    await service.reply_to(claim())
    first = await service.reply_to(exit_())
    again = await service.reply_to(exit_(attempt=2))
    for event in (first, again):
        assert isinstance(event, NodeMaintenanceExited) and event.restored_status == "enabled"
    assert cloud.status[NODE] == "enabled" and cloud.holder[NODE] is None


async def test_exit_by_someone_else_is_refused_and_keeps_the_claim() -> None:
    cloud = FakeCloud()
    service = service_over(cloud)
    await service.reply_to(claim())
    event = await service.reply_to(exit_(holder="cmp-9"))
    assert isinstance(event, NodeMaintenanceRefused) and event.current_holder == CAMPAIGN
    assert cloud.holder[NODE] == CAMPAIGN


async def test_migration_then_its_duplicate_gives_the_same_destination_once() -> None:
    cloud = FakeCloud()
    service = service_over(cloud)
    first = await service.reply_to(migration())
    again = await service.reply_to(migration(attempt=2))
    for event in (first, again):
        assert isinstance(event, VmMigrated) and event.destination_node_id == "compute-0-02"
    assert cloud.calls.count("migrate vm-a") == 1


async def test_a_migration_that_ended_is_answered_from_where_it_landed() -> None:
    cloud = FakeCloud()
    event = await service_over(cloud).reply_to(migration())
    assert isinstance(event, VmMigrated) and event.destination_node_id == "compute-0-02"
    # The migration's own end read is the last look: no second read before the reply.
    assert cloud.calls == ["locate vm-a", "migrate vm-a"]


async def test_migration_under_way_is_waited_for_instead_of_started_again() -> None:
    cloud = FakeCloud()
    cloud.vms["vm-a"] = VmLocation("vm-a", NODE, "compute-0-07")
    event = await service_over(cloud).reply_to(migration())
    assert isinstance(event, VmMigrated) and event.destination_node_id == "compute-0-07"
    assert cloud.calls == ["locate vm-a", "wait vm-a", "locate vm-a"]


async def test_incoming_migration_lands_then_leaves() -> None:
    cloud = FakeCloud()
    cloud.vms["vm-a"] = VmLocation("vm-a", "compute-0-07", NODE)
    event = await service_over(cloud).reply_to(migration())
    assert isinstance(event, VmMigrated) and event.destination_node_id == "compute-0-02"
    assert cloud.calls == ["locate vm-a", "wait vm-a", "locate vm-a", "migrate vm-a"]


async def test_refused_migration_fails_with_the_clouds_reason() -> None:
    cloud = FakeCloud()
    cloud.refuse_migration = "no valid destination for VM vm-a"
    event = await service_over(cloud).reply_to(migration())
    assert isinstance(event, VmMigrationFailed)
    assert event.reason == "no valid destination for VM vm-a"


async def test_a_refused_named_destination_is_named_in_the_failure() -> None:
    cloud = FakeCloud()
    cloud.refuse_migration = "node compute-0-03 is in maintenance"
    event = await service_over(cloud).reply_to(migration(destination="compute-0-03"))
    assert isinstance(event, VmMigrationFailed)
    assert event.destination_node_id == "compute-0-03"


async def test_a_failed_destination_is_named_and_the_retry_avoiding_it_goes_elsewhere() -> None:
    cloud = FakeCloud()
    cloud.failing = {"compute-0-02"}
    service = service_over(cloud)
    failed = await service.reply_to(migration())
    assert isinstance(failed, VmMigrationFailed)
    assert failed.destination_node_id == "compute-0-02" and "failed" in failed.reason
    assert cloud.vms["vm-a"] == VmLocation("vm-a", NODE)
    assert cloud.calls.count("migrate vm-a") == 1  # one command, one try: the sender retries
    retry = await service.reply_to(migration(attempt=2, avoid=(failed.destination_node_id,)))
    assert isinstance(retry, VmMigrated) and retry.destination_node_id == "compute-0-04"
    assert cloud.avoided == [(), ("compute-0-02",)]
    # every destination avoided: the failure names none
    cloud.vms["vm-b"] = VmLocation("vm-b", NODE)
    avoid_all = tuple(cloud.placement)
    nowhere = await service.reply_to(migration("vm-b", avoid=avoid_all))
    assert isinstance(nowhere, VmMigrationFailed) and nowhere.destination_node_id is None
    assert "outside its avoided nodes" in nowhere.reason


async def test_listing_an_unknown_node_cannot_be_answered() -> None:
    service = service_over(FakeCloud())
    with pytest.raises(CommandFailed):
        await service.reply_to(VmListRequested(campaign_id=CAMPAIGN, node_id="nope"))


async def test_an_unreachable_cloud_is_retried_until_it_answers() -> None:
    cloud = FakeCloud()
    cloud.unavailable = 2
    service = service_over(cloud)
    event = await asyncio.wait_for(service._until_answered(claim()), 5)
    assert isinstance(event, NodeMaintenanceEntered)


# --- the commit gate -----------------------------------------------------------------------


class RecordingConsumer:
    def __init__(self, fail: int = 0) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail = fail

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        return {}

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self.fail:
            self.fail -= 1
            raise KafkaConnectionError("broker away")
        self.commits.append(dict(offsets or {}))


TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


async def test_gate_commits_only_below_held_work_and_catches_up_on_release() -> None:
    consumer = RecordingConsumer()
    gate = CommitGate(consumer)
    gate.hold(TP, 3)
    gate.hold(TP, 5)
    await gate.commit({TP: 7})  # the loop handled 0..6
    assert consumer.commits == [{TP: 3}]
    await gate.release(TP, 5)  # a later command finished first: still capped by 3
    assert consumer.commits == [{TP: 3}]
    await gate.release(TP, 3)
    assert consumer.commits == [{TP: 3}, {TP: 7}]
    assert gate.committed(TP) == 7 and gate.held() == 0


async def test_gate_never_commits_backwards_or_twice() -> None:
    consumer = RecordingConsumer()
    gate = CommitGate(consumer)
    await gate.commit({TP: 4})
    await gate.commit({TP: 4})
    await gate.commit({TP: 2})
    assert consumer.commits == [{TP: 4}]


async def test_gate_release_before_the_loop_commit_waits_for_it() -> None:
    consumer = RecordingConsumer()
    gate = CommitGate(consumer)
    await gate.commit({TP: 3})
    gate.hold(TP, 3)
    await gate.release(TP, 3)  # finished before the loop committed its batch
    assert consumer.commits == [{TP: 3}]
    await gate.commit({TP: 4})
    assert consumer.commits[-1] == {TP: 4}


async def test_gate_keeps_partitions_apart_and_survives_a_failed_commit() -> None:
    consumer = RecordingConsumer(fail=1)
    gate = CommitGate(consumer)
    gate.hold(TP, 0)
    await gate.commit({TP: 1, TP1: 9})  # fails: nothing recorded as committed
    assert gate.committed(TP1) is None
    await gate.commit({TP1: 9})
    assert consumer.commits == [{TP1: 9}]
    await gate.release(TP, 0)
    assert consumer.commits[-1] == {TP: 1}


async def test_gate_forgets_revoked_partitions_and_settles() -> None:
    gate = CommitGate(RecordingConsumer())
    gate.hold(TP, 1)
    assert not await gate.settle([TP], timeout_s=0.05)
    releasing = asyncio.create_task(gate.release(TP, 1))
    assert await gate.settle([TP], timeout_s=1)
    await releasing
    gate.hold(TP, 2)
    gate.forget([TP])
    await gate.release(TP, 2)  # a late release for a revoked partition is a no-op
    assert gate.held() == 0 and gate.safe_offset(TP) is None


# --- per-node ordering ---------------------------------------------------------------------


async def test_lanes_run_migrations_side_by_side_between_exclusive_commands() -> None:
    lanes = NodeLanes()
    log: list[str] = []
    gates = {name: asyncio.Event() for name in ("claim", "m1", "m2", "exit")}

    async def work(name: str, before: set[asyncio.Task[Any]]) -> None:
        if before:
            await asyncio.wait(before)
        log.append(f"start {name}")
        await gates[name].wait()
        log.append(f"end {name}")

    def admit(name: str, exclusive: bool, node: str = NODE) -> asyncio.Task[Any]:
        before = lanes.prerequisites(node, exclusive=exclusive)
        task = asyncio.create_task(work(name, before))
        lanes.admitted(node, task, exclusive=exclusive)
        return task

    tasks = [admit("claim", True), admit("m1", False), admit("m2", False), admit("exit", True)]
    await asyncio.sleep(0.01)
    assert log == ["start claim"]
    gates["claim"].set()
    await asyncio.sleep(0.01)
    assert log == ["start claim", "end claim", "start m1", "start m2"]  # side by side
    gates["m2"].set()
    await asyncio.sleep(0.01)
    assert "start exit" not in log  # waits for m1 too
    gates["m1"].set()
    gates["exit"].set()
    await asyncio.gather(*tasks)
    assert log[-2:] == ["start exit", "end exit"]
    assert len(lanes) == 0  # idle lanes are dropped


async def test_lanes_of_different_nodes_do_not_wait_for_each_other() -> None:
    lanes = NodeLanes()
    blocker = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(blocker)
    lanes.admitted(NODE, cast(asyncio.Task[Any], task), exclusive=True)
    assert lanes.prerequisites("compute-0-02", exclusive=True) == set()
    assert lanes.prerequisites(NODE, exclusive=False) == {task}
    blocker.set_result(None)
    await task


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALATOR_CLOUD_MANAGER_WORLD_URL", "http://w:1")
    monkeypatch.setenv("ESCALATOR_CLOUD_MANAGER_INSTANCE_ID", "cloud-manager/7")
    settings = CloudManagerSettings()
    assert (settings.world_url, settings.instance_id) == ("http://w:1", "cloud-manager/7")


def test_unknown_ids_are_uuids() -> None:
    assert isinstance(domain.reply_id(claim(), "entered"), uuid.UUID)


# --- the inventory -------------------------------------------------------------------------


class WorldOverEngine:
    """The part of `WorldClient` the backend uses (inventory, migrations), answered by an
    in-process world engine. Each look at a VM lets `step_s` of world time pass (when the
    engine's clock is a `StepClock`), so that migrations end while the backend polls."""

    def __init__(self, engine: WorldEngine, clock: StepClock | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.calls = 0
        self.vm_reads = 0

    async def inventory_ndjson(self, node_ids: Collection[str] | None = None) -> bytes:
        self.calls += 1
        try:
            wanted = None if node_ids is None else list(node_ids)
            return self.engine.inventory_ndjson(wanted).encode()
        except EngineError as err:  # as the HTTP API answers it
            raise WorldError(err.status, err.message) from err

    async def claim_maintenance_listing_vms(
        self, node_id: str, holder: str
    ) -> tuple[NodeView, list[VmView]]:
        self.calls += 1
        try:
            return self.engine.claim_maintenance(node_id, holder), self.engine.list_vms(node_id)
        except EngineError as err:
            raise WorldError(err.status, err.message) from err

    async def node(self, node_id: str) -> NodeView:
        self.calls += 1
        try:
            return self.engine.node(node_id)
        except EngineError as err:
            raise WorldError(err.status, err.message) from err

    async def migrate_vm(
        self, vm_id: str, destination: str | None = None, *, avoid: Collection[str] = ()
    ) -> VmView:
        try:
            return self.engine.migrate_vm(vm_id, destination, list(avoid))
        except EngineError as err:
            raise WorldError(err.status, err.message) from err

    async def vm(self, vm_id: str) -> VmView:
        self.vm_reads += 1
        if self.clock is not None:
            self.clock.now += self.clock.step_s
        try:
            return self.engine.vm(vm_id)
        except EngineError as err:
            raise WorldError(err.status, err.message) from err


class StepClock:
    def __init__(self, now: float = 1000.0, step_s: float = 1.0) -> None:
        self.now = now
        self.step_s = step_s

    def __call__(self) -> float:
        return self.now


def world_backend(
    engine: WorldEngine, clock: StepClock | None = None
) -> tuple[WorldCloudBackend, WorldOverEngine]:
    world = WorldOverEngine(engine, clock)
    return WorldCloudBackend(cast(Any, world), poll_s=0), world


def world_rig(
    seed: int = 1, timings: Timings | None = None
) -> tuple[CloudManagerService, WorldEngine, WorldOverEngine]:
    """The Cloud Manager's command flows over the world backend over an in-process engine, and
    the world client it calls (which counts the calls)."""
    clock = StepClock()
    state = generate(nodes=6, failure_domains=2, seed=seed, timings=timings)
    engine = WorldEngine(state, clock=clock)
    backend, world = world_backend(engine, clock)
    service = CloudManagerService(
        CloudManagerSettings(),
        backend=backend,
        consumer=cast(GroupConsumer, None),
        publisher=cast(EventPublisher, None),
        clock=lambda: NOW,
    )
    return service, engine, world


def world_service(seed: int = 1) -> tuple[CloudManagerService, WorldEngine]:
    service, engine, _ = world_rig(seed)
    return service, engine


def world_migration(
    vm: str, source: str, attempt: int = 1, avoid: tuple[str, ...] = ()
) -> VmMigrationRequested:
    return VmMigrationRequested(
        campaign_id=CAMPAIGN,
        vm_id=vm,
        node_id=source,
        avoid_destinations=avoid,
        attempt=attempt,
    )


async def test_over_the_world_a_failed_destination_is_named_then_avoided() -> None:
    service, engine = world_service()
    engine.claim_maintenance("node-1", CAMPAIGN)
    vm_id = engine.list_vms("node-1")[0].id
    # whichever node the world picks fails the migration
    for node_id in engine.state.nodes:
        if node_id != "node-1":
            engine.inject_migration_faults(node_id, 1)
    failed = await service.reply_to(world_migration(vm_id, "node-1"))
    assert isinstance(failed, VmMigrationFailed), failed
    tried = failed.destination_node_id
    assert tried is not None and tried != "node-1"
    assert failed.reason == f"migration of VM {vm_id} to {tried} failed; it is still on node-1"
    assert (engine.vm(vm_id).node_id, engine.vm(vm_id).status) == ("node-1", "active")
    assert (
        engine.node(tried).incoming_vm_ids == [] and engine.node(tried).fail_next_migrations_to == 0
    )
    engine.check_indexes()
    # the retry avoids it; the tried node would fail again if it were picked
    for node_id in engine.state.nodes:
        engine.inject_migration_faults(node_id, 1 if node_id == tried else 0)
    moved = await service.reply_to(world_migration(vm_id, "node-1", attempt=2, avoid=(tried,)))
    assert isinstance(moved, VmMigrated), moved
    assert moved.destination_node_id not in (tried, "node-1")
    assert engine.vm(vm_id).node_id == moved.destination_node_id
    assert engine.node(tried).fail_next_migrations_to == 1  # nothing was sent toward it
    engine.check_indexes()


@pytest.mark.parametrize(("migration_s", "reads"), [(0.0, 1), (5.0, 6)])
async def test_over_the_world_a_migration_is_polled_only_while_it_runs(
    migration_s: float, reads: int
) -> None:
    service, engine, world = world_rig(timings=Timings(migration_s=migration_s))
    engine.claim_maintenance("node-1", CAMPAIGN)
    vm_id = engine.list_vms("node-1")[0].id
    event = await service.reply_to(world_migration(vm_id, "node-1"))
    assert isinstance(event, VmMigrated), event
    assert engine.vm(vm_id).node_id == event.destination_node_id != "node-1"
    # One look before starting; a migration that ended inside the request needs no poll, a
    # running one is polled until it lands (each read here advances the clock by one second:
    # five polls for five seconds).
    assert world.vm_reads == reads


async def test_over_the_world_a_claim_and_its_vm_list_are_one_request() -> None:
    service, engine, world = world_rig()
    entered = await service.reply_to(
        NodeMaintenanceRequested(campaign_id=CAMPAIGN, node_id="node-1", holder=CAMPAIGN)
    )
    assert isinstance(entered, NodeMaintenanceEntered), entered
    assert world.calls == 1
    assert [vm.vm_id for vm in entered.vms] == [vm.id for vm in engine.list_vms("node-1")]
    assert entered.prior_status == "enabled"
    assert engine.node("node-1").maintenance_holder == CAMPAIGN
    # held by someone else: refused, naming the holder (read once more), nothing listed
    refused = await service.reply_to(
        NodeMaintenanceRequested(campaign_id=CAMPAIGN, node_id="node-1", holder="cmp-other")
    )
    assert isinstance(refused, NodeMaintenanceRefused) and refused.current_holder == CAMPAIGN
    assert world.calls == 3


async def test_over_the_world_a_retry_never_lands_on_an_avoided_node() -> None:
    service, engine = world_service(seed=3)
    engine.claim_maintenance("node-2", CAMPAIGN)
    others = [n for n in engine.state.nodes if n != "node-2"]
    outcomes = []
    for i, vm in enumerate(engine.list_vms("node-2")):
        avoid = tuple(others[: i % len(others) + 1])
        event = await service.reply_to(world_migration(vm.id, "node-2", avoid=avoid))
        if isinstance(event, VmMigrated):
            assert event.destination_node_id not in avoid
        else:
            assert isinstance(event, VmMigrationFailed), event
            assert event.destination_node_id is None
            assert "outside its avoided nodes" in event.reason
            assert engine.vm(vm.id).node_id == "node-2"
        outcomes.append(type(event))
        engine.check_indexes()
    assert set(outcomes) == {VmMigrated, VmMigrationFailed}  # both cases were seen


async def test_inventory_records_are_built_from_the_world_listing_in_one_call() -> None:
    state = generate(nodes=6, failure_domains=2, seed=1)
    engine = WorldEngine(state, clock=lambda: 1000.0)
    backend, world = world_backend(engine)
    engine.claim_maintenance("node-1", CAMPAIGN)
    engine.admin_disable("node-2", "fan")
    leaving = engine.list_vms("node-3")[0].id
    toward = engine.migrate_vm(leaving, "node-4").migration_target
    assert toward == "node-4"

    listing = await backend.inventory()
    assert world.calls == 1
    assert [n.node_id for n in listing] == list(state.nodes)
    by_id = {n.node_id: n for n in listing}
    for node in state.nodes.values():
        item = by_id[node.id]
        assert (item.failure_domain, item.vcpus, item.ram_mb) == (
            node.failure_domain,
            node.vcpus,
            node.ram_mb,
        )
        placed = [vm.vm_id for vm in item.vms if not vm.incoming]
        assert placed == [vm.id for vm in state.vms.values() if vm.node_id == node.id]
        assert sum(vm.vcpus for vm in item.vms) == engine.node(node.id).used_vcpus
    assert by_id["node-1"].in_maintenance and by_id["node-1"].maintenance_holder == CAMPAIGN
    # disabled by an administrator: takes no new VM, nobody holds it
    assert by_id["node-2"].in_maintenance and by_id["node-2"].maintenance_holder is None
    assert not by_id["node-5"].in_maintenance
    # a migration under way: still on its source, incoming (listed last) on its destination
    assert leaving in [vm.vm_id for vm in by_id["node-3"].vms if not vm.incoming]
    assert by_id["node-4"].vms[-1].vm_id == leaving and by_id["node-4"].vms[-1].incoming
    vm = state.vms[leaving]
    assert by_id["node-4"].vms[-1] == VmOnNode(
        vm_id=leaving, vnf_id=vm.vnf_id, vcpus=vm.vcpus, ram_mb=vm.ram_mb, incoming=True
    )

    record = domain.inventory_record(by_id["node-1"], CTX)
    assert isinstance(record, NodeInventoryReported)
    assert record.campaign_id is None and record.producer == CTX.producer
    assert record.occurred_at == NOW
    assert (record.node_id, record.failure_domain, record.vcpus, record.ram_mb) == (
        "node-1",
        state.nodes["node-1"].failure_domain,
        state.nodes["node-1"].vcpus,
        state.nodes["node-1"].ram_mb,
    )
    assert record.in_maintenance and record.maintenance_holder == CAMPAIGN
    assert record.vms == by_id["node-1"].vms
    assert CLOUD_INVENTORY.carries(record.event_type)
    assert CLOUD_INVENTORY.key_for(record) == b"node-1"

    # some nodes only, in the order asked; an unknown one is refused
    some = await backend.inventory(["node-4", "node-2"])
    assert [n.node_id for n in some] == ["node-4", "node-2"]
    with pytest.raises(UnknownNode):
        await backend.inventory(["node-404"])


async def test_unchanged_nodes_compare_equal_and_changed_ones_do_not() -> None:
    engine = WorldEngine(generate(nodes=6, failure_domains=2, seed=1), clock=lambda: 1000.0)
    backend, _ = world_backend(engine)
    first = await backend.inventory()
    published = {n.node_id: n for n in first}
    assert domain.inventory_to_publish(await backend.inventory(), published) == []
    engine.claim_maintenance("node-2", CAMPAIGN)
    changed = domain.inventory_to_publish(await backend.inventory(), published)
    assert [n.node_id for n in changed] == ["node-2"]
    full = domain.inventory_to_publish(await backend.inventory(), published, full=True)
    assert [n.node_id for n in full] == list(published)
    # a node never published is new
    assert [n.node_id for n in domain.inventory_to_publish(first, {})] == list(published)


def test_the_nodes_a_reply_changed() -> None:
    entered = reply_of(domain.maintenance_entered(claim(), ListVms(NODE, "enabled"), [], CTX))
    assert domain.nodes_changed_by(entered) == (NODE,)
    exited = reply_of(domain.after_release(exit_(), Released("enabled"), CTX))
    assert domain.nodes_changed_by(exited) == (NODE,)
    moved = domain.migration_done(migration(), "compute-0-02", CTX).event
    assert domain.nodes_changed_by(moved) == (NODE, "compute-0-02")
    refused = reply_of(domain.after_claim(claim(), ClaimRefused("held", "x"), CTX))
    assert domain.nodes_changed_by(refused) == ()
    failed = reply_of(domain.next_migration_step(migration(), None, CTX))
    assert domain.nodes_changed_by(failed) == ()


class RecordingPublisher:
    """`EventPublisher.publish_all` into a list; `fail` calls raise first."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []
        self.fail = 0
        self.settings = KafkaSettings()

    async def publish_all(self, events: Sequence[Event], spec: Any) -> list[Any]:
        assert spec is CLOUD_INVENTORY
        if self.fail:
            self.fail -= 1
            raise KafkaConnectionError("broker away")
        self.batches.append(list(events))
        return []

    @property
    def records(self) -> list[NodeInventoryReported]:
        return [cast(NodeInventoryReported, e) for batch in self.batches for e in batch]

    def nodes(self) -> list[str]:
        return [r.node_id for r in self.records]


def reporter_over(cloud: FakeCloud, publisher: RecordingPublisher, **kw: Any) -> InventoryReporter:
    return InventoryReporter(
        cloud,
        cast(EventPublisher, publisher),
        producer="cloud-manager/0",
        clock=lambda: NOW,
        **kw,
    )


async def wait_until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_reporter_publishes_all_then_touched_then_only_changes_then_all_again() -> None:
    cloud, publisher = FakeCloud(), RecordingPublisher()
    reporter = reporter_over(cloud, publisher, interval_s=0.05, full_every=4, batch=2)
    task = asyncio.create_task(reporter.run())
    try:
        everyone = list(cloud.status)
        await wait_until(lambda: len(publisher.records) >= 3)
        assert publisher.nodes() == everyone  # on start: every node, in batches of 2
        assert [len(b) for b in publisher.batches] == [2, 1]
        assert all(
            r.campaign_id is None and r.producer == "cloud-manager/0" for r in publisher.records
        )

        # a claim by the Cloud Manager: the node is published at once, alone
        await cloud.claim_maintenance(NODE, CAMPAIGN)
        reporter.touched([NODE])
        await wait_until(lambda: len(publisher.records) >= 4)
        assert publisher.records[3].node_id == NODE and publisher.records[3].in_maintenance
        assert cloud.inventory_calls[1] == (NODE,)

        # a change nobody told us about is found by a refresh; unchanged nodes are not sent
        cloud.vms["vm-b"] = VmLocation("vm-b", "compute-0-02")
        await wait_until(lambda: "compute-0-02" in publisher.nodes()[4:])
        later = publisher.records[4:]
        assert [r.node_id for r in later][:1] == ["compute-0-02"]
        assert [vm.vm_id for vm in later[0].vms] == ["vm-b"]
        # every 4th refresh publishes every node again
        await wait_until(lambda: publisher.nodes()[5:].count("compute-0-03") >= 1)
        assert set(publisher.nodes()[5:]) == set(everyone)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_reporter_survives_an_unreachable_cloud_and_a_refusing_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inventory_module, "RETRY_BACKOFF_S", 0.01)
    cloud, publisher = FakeCloud(), RecordingPublisher()
    cloud.inventory_unavailable = 2
    publisher.fail = 1
    reporter = reporter_over(cloud, publisher, interval_s=0)  # no periodic refresh
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(lambda: len(publisher.records) == 3)
        assert reporter.failures == 3 and not task.done()
        assert publisher.nodes() == list(cloud.status)
        # touched nodes while the cloud is away are published once it is back
        cloud.inventory_unavailable = 1
        reporter.touched([NODE, "compute-0-02"])
        await wait_until(lambda: len(publisher.records) == 5)
        assert sorted(publisher.nodes()[3:]) == [NODE, "compute-0-02"]
        await asyncio.sleep(0.1)
        assert len(publisher.records) == 5  # and nothing periodic with interval 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_commands_are_answered_while_the_inventory_cannot_be_listed() -> None:
    cloud = FakeCloud()
    cloud.inventory_unavailable = 10**6
    publisher = RecordingPublisher()
    service = CloudManagerService(
        CloudManagerSettings(inventory_interval_s=0.01),
        backend=cloud,
        consumer=cast(GroupConsumer, None),
        publisher=cast(EventPublisher, publisher),
        clock=lambda: NOW,
    )
    task = asyncio.create_task(service.inventory.run())
    try:
        await wait_until(lambda: service.inventory.failures >= 2)
        entered = await asyncio.wait_for(service.reply_to(claim()), 1.0)
        assert isinstance(entered, NodeMaintenanceEntered)
        assert not task.done() and publisher.records == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_inventory_settings_default_and_read_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = CloudManagerSettings()
    assert (defaults.inventory_interval_s, defaults.inventory_full_every) == (10.0, 30)
    monkeypatch.setenv("ESCALATOR_CLOUD_MANAGER_INVENTORY_INTERVAL_S", "0")
    assert CloudManagerSettings().inventory_interval_s == 0
    monkeypatch.setenv("ESCALATOR_CLOUD_MANAGER_INVENTORY_INTERVAL_S", "-1")
    with pytest.raises(ValueError):
        CloudManagerSettings()
