"""The world as a real process: `python -m escalator.world --port 0`, driven via WorldClient."""

from __future__ import annotations

import asyncio
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from escalator.world.client import WorldClient, WorldError
from escalator.world.model import VnfAction, VnfView

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEED = 10.0  # reboot 0.3 s, migration 0.05 s, resync 0.2 s
READY_TIMEOUT_S = 30.0


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


@pytest.fixture(scope="module")
def world_url() -> Iterator[str]:
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "escalator.world",
                "--port",
                "0",
                "--nodes",
                "6",
                "--domains",
                "2",
                "--seed",
                "1",
                "--speed",
                str(SPEED),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            url = _wait_for_ready_line(process, READY_TIMEOUT_S)
            assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
            yield url
            assert process.poll() is None, "the world died during the tests"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            stderr.seek(0)
            errors = stderr.read()
            assert "Traceback" not in errors, errors


@pytest.fixture
async def world(world_url: str) -> AsyncIterator[WorldClient]:
    async with WorldClient(world_url) as client:
        yield client


async def raw(world_url: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{world_url}{path}", **kw) as response:
            return response.status, await response.json(content_type=None)


async def wait_until_no_migrations(world: WorldClient, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(vm.status == "migrating" for vm in (await world.snapshot()).vms):
        assert time.monotonic() < deadline, "migrations did not finish"
        await asyncio.sleep(0.02)


async def test_health_and_snapshot(world: WorldClient) -> None:
    assert (await world.healthz())["status"] == "ok"
    snapshot = await world.snapshot()
    assert len(snapshot.nodes) == 6 and snapshot.speed == SPEED
    assert {n.failure_domain for n in snapshot.nodes} == {"fd-1", "fd-2"}
    assert snapshot.vms and snapshot.vnfs
    assert snapshot.interruptions == []


async def test_maintenance_compare_and_set(world: WorldClient) -> None:
    node = await world.claim_maintenance("node-1", "um-a")
    assert (node.maintenance_holder, node.service_status) == ("um-a", "disabled")
    assert (await world.claim_maintenance("node-1", "um-a")).maintenance_holder == "um-a"
    with pytest.raises(WorldError) as conflict:
        await world.claim_maintenance("node-1", "um-b")
    assert conflict.value.status == 409 and "um-a" in conflict.value.message
    with pytest.raises(WorldError) as wrong_holder:
        await world.release_maintenance("node-1", "um-b")
    assert wrong_holder.value.status == 409
    released = await world.release_maintenance("node-1", "um-a")
    assert (released.maintenance_holder, released.service_status) == (None, "enabled")
    assert (await world.release_maintenance("node-1", "um-a")).maintenance_holder is None


async def test_a_claim_can_answer_with_the_nodes_vms(world: WorldClient) -> None:
    node, vms = await world.claim_maintenance_listing_vms("node-4", "um-a")
    assert node.maintenance_holder == "um-a" and node.service_status == "disabled"
    assert vms == await world.node_vms("node-4") and vms
    # a re-claim by the same holder answers the same way
    again, listed = await world.claim_maintenance_listing_vms("node-4", "um-a")
    assert again.maintenance_holder == "um-a" and listed == vms
    with pytest.raises(WorldError) as held:
        await world.claim_maintenance_listing_vms("node-4", "um-b")
    assert held.value.status == 409
    await world.release_maintenance("node-4", "um-a")


async def test_admin_disabled_node_refuses_claims(world: WorldClient) -> None:
    await world.admin_disable("node-2", "firmware check")
    with pytest.raises(WorldError) as refused:
        await world.claim_maintenance("node-2", "um-a")
    assert refused.value.status == 409 and "firmware check" in refused.value.message
    await world.admin_enable("node-2")
    await world.claim_maintenance("node-2", "um-a")
    await world.release_maintenance("node-2", "um-a")


async def test_migration_reserves_then_lands(world: WorldClient) -> None:
    vm = next(v for v in await world.node_vms("node-3") if not v.incoming)
    started = await world.migrate_vm(vm.id)
    destination = started.migration_target
    assert started.status == "migrating" and destination is not None
    incoming = [v for v in await world.node_vms(destination) if v.incoming]
    assert [v.id for v in incoming] == [vm.id]
    with pytest.raises(WorldError) as busy:
        await world.migrate_vm(vm.id)
    assert busy.value.status == 409
    await wait_until_no_migrations(world)
    landed = await world.vm(vm.id)
    assert (landed.node_id, landed.status) == (destination, "active")


async def test_concurrent_migrations_never_overcommit(world: WorldClient) -> None:
    nodes = await world.nodes()
    target = max(nodes, key=lambda n: n.free_vcpus)
    candidates = [
        vm
        for node in nodes
        if node.id != target.id
        for vm in await world.node_vms(node.id)
        if not vm.incoming and vm.status == "active"
    ]
    results = await asyncio.gather(
        *(world.migrate_vm(vm.id, target.id) for vm in candidates), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, WorldError)]
    assert len(accepted) + len(refused) == len(results)
    assert all(r.status == 409 for r in refused) and refused
    after = await world.node(target.id)
    assert after.free_vcpus >= 0 and after.free_ram_mb >= 0
    assert sum(vm.vcpus for vm in candidates if vm.id in after.incoming_vm_ids) <= (
        target.free_vcpus
    )
    await wait_until_no_migrations(world)


async def test_reboot_upgrades_and_the_monitor_sees_the_interruption(
    world: WorldClient,
) -> None:
    before = await world.interruptions()
    record = await world.reboot_node("node-6", version="2.0.0")
    assert record.state == "in_progress" and record.target_version == "2.0.0"
    with pytest.raises(WorldError) as again:
        await world.reboot_node("node-6")
    assert again.value.status == 409
    finished = await world.wait_reboot_finished("node-6", timeout_s=10)
    assert finished.state == "succeeded"
    assert (await world.node("node-6")).installed_version == "2.0.0"
    # Nothing was moved off node-6, so its serving VMs were interrupted.
    new = [i for i in await world.interruptions() if i not in before]
    assert new and all(i.ended_at is not None for i in new)


async def test_injected_fault_fails_the_next_upgrade(world: WorldClient) -> None:
    await world.inject_faults("node-5", fail_next_upgrades=1)
    await world.reboot_node("node-5", version="2.0.0", duration_s=0.5)
    finished = await world.wait_reboot_finished("node-5", timeout_s=10)
    assert finished.state == "failed"
    assert (await world.node("node-5")).installed_version == "1.0.0"


async def test_migrations_avoid_nodes_and_an_injected_fault_fails_one(world: WorldClient) -> None:
    await wait_until_no_migrations(world)
    source = "node-4"
    vm = next(v for v in await world.node_vms(source) if not v.incoming and v.up)
    others = [n.id for n in await world.nodes() if n.id != source]
    # whichever node the world picks, the migration there starts, then fails
    for node_id in others:
        assert (await world.inject_migration_faults(node_id, 1)).fail_next_migrations_to == 1
    started = await world.migrate_vm(vm.id)
    tried = started.migration_target
    assert tried is not None and started.status == "migrating" and started.migration_will_fail
    assert (await world.node(tried)).fail_next_migrations_to == 0
    await wait_until_no_migrations(world)
    stayed = await world.vm(vm.id)
    assert (stayed.node_id, stayed.status, stayed.migration_target) == (source, "active", None)
    assert vm.id not in (await world.node(tried)).incoming_vm_ids
    # avoiding it: another node, where the migration lands (the tried one would fail again)
    for node_id in others:
        await world.inject_migration_faults(node_id, 1 if node_id == tried else 0)
    retry = await world.migrate_vm(vm.id, avoid=[tried])
    assert retry.migration_target not in (tried, None) and not retry.migration_will_fail
    await wait_until_no_migrations(world)
    assert (await world.vm(vm.id)).node_id == retry.migration_target
    assert (await world.node(tried)).fail_next_migrations_to == 1
    await world.inject_migration_faults(tried, 0)
    # every other node avoided: refused, and the refusal says why
    with pytest.raises(WorldError) as nowhere:
        await world.migrate_vm(
            vm.id, avoid=[n for n in [*others, source] if n != retry.migration_target]
        )
    assert nowhere.value.status == 409
    assert "outside its avoided nodes" in nowhere.value.message


async def test_vnfs_can_be_read_by_id_in_one_request(world: WorldClient) -> None:
    every = await world.vnfs()
    some = [every[3].id, "vnf-nobody-has", every[0].id, every[3].id]
    found = await world.vnfs(some)
    # those that exist, each once, in the order asked; an unknown id is left out
    assert [v.id for v in found] == [every[3].id, every[0].id]
    assert await world.vnfs([]) == []


def healthy_pair(vnfs: list[VnfView]) -> tuple[VnfView, str]:
    """An active-standby VNF whose members are all up and in sync (earlier tests rebooted
    nodes), and a standby of it."""
    pair = next(
        v
        for v in vnfs
        if v.redundancy == "active_standby"
        and set(v.members_up) == set(v.members)
        and all(s.state == "in_sync" for s in v.sync.values())
    )
    return pair, next(m for m in pair.members if m != pair.active_member)


def serving_pool(vnfs: list[VnfView]) -> VnfView:
    """A load-balanced VNF whose members are all in service and carry load."""
    return next(
        v
        for v in vnfs
        if v.redundancy == "load_balanced"
        and len(v.members) >= 2
        and set(v.members_in_service) == set(v.members)
        and all(v.load_share.get(m, 0) > 0 for m in v.members)
    )


async def test_vnfm_actions(world: WorldClient) -> None:
    vnfs = await world.vnfs()
    pair, standby = healthy_pair(vnfs)
    assert (await world.switch_over(pair.id, standby)).active_member == standby
    pool = serving_pool(vnfs)
    drained = await world.drain_member(pool.id, pool.members[0])
    assert drained.load_share[pool.members[0]] == 0
    with pytest.raises(WorldError) as too_few:
        for member in pool.members[1:]:
            await world.drain_member(pool.id, member)
    assert too_few.value.status == 409
    restored = await world.restore_member(pool.id, pool.members[0])
    assert restored.load_share[pool.members[0]] > 0
    with pytest.raises(WorldError) as wrong_kind:
        await world.drain_member(pair.id, standby)
    assert wrong_kind.value.status == 400


async def test_vnfm_actions_in_one_request_each_on_its_own(world: WorldClient) -> None:
    vnfs = await world.vnfs()
    pair, standby = healthy_pair(vnfs)
    pool = serving_pool(vnfs)
    results = await world.vnf_actions(
        [
            VnfAction(vnf_id=pair.id, action="switchover", member=standby),
            VnfAction(vnf_id="vnf-nobody-has", action="drain", member="vm-x"),
            VnfAction(vnf_id=pool.id, action="drain", member=pool.members[0]),
            # applied in order: it sees the drain just before it
            VnfAction(vnf_id=pool.id, action="restore", member=pool.members[0]),
            VnfAction(vnf_id=pair.id, action="drain", member=standby),
        ]
    )
    assert [r.status for r in results] == [200, 404, 200, 200, 400]
    assert results[0].vnf is not None and results[0].vnf.active_member == standby
    assert results[1].vnf is None and results[1].error and "vnf-nobody-has" in results[1].error
    assert results[2].vnf is not None and results[2].vnf.load_share[pool.members[0]] == 0
    assert results[3].vnf is not None and results[3].vnf.load_share[pool.members[0]] > 0
    assert results[4].error and "load_balanced" in results[4].error
    # the refusals undid nothing of the others
    assert (await world.vnf(pair.id)).active_member == standby
    assert await world.vnf_actions([]) == []


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/v1/nodes/nope", {}, 404),
        ("GET", "/v1/nodes/nope/vms", {}, 404),
        ("GET", "/v1/vms/nope", {}, 404),
        ("GET", "/v1/vnfs/nope", {}, 404),
        ("GET", "/v1/no-such-route", {}, 404),
        ("PUT", "/healthz", {}, 405),
        ("POST", "/v1/vms/nope/migrate", {"json": {}}, 404),
        ("POST", "/v1/vnfs/nope/switchover", {"json": {"to_member": "x"}}, 404),
        ("POST", "/v1/nodes/node-1/maintenance", {"data": "{not json"}, 400),
        ("POST", "/v1/nodes/node-1/maintenance", {"json": ["holder"]}, 400),
        ("POST", "/v1/nodes/node-1/maintenance", {"json": {"holder": 7}}, 400),
        ("POST", "/v1/nodes/node-1/maintenance", {"json": {}}, 400),
        ("POST", "/v1/nodes/node-1/maintenance", {"json": {"holder": "a", "x": 1}}, 400),
        ("DELETE", "/v1/nodes/node-1/maintenance", {}, 400),
        ("POST", "/v1/nodes/node-1/maintenance", {"json": {"holder": "a", "list_vms": 1}}, 400),
        ("POST", "/v1/nodes/node-1/reboot", {"json": {"fail": "yes"}}, 400),
        ("POST", "/v1/nodes/node-1/reboot", {"json": {"duration_s": -1.0}}, 400),
        ("POST", "/v1/vms/vm-001/migrate", {"json": {"destination": 3}}, 400),
        ("POST", "/v1/faults", {"json": {"node_id": "node-1", "fail_next_upgrades": -1}}, 400),
        ("POST", "/v1/faults", {"json": {"node_id": "nope", "fail_next_upgrades": 1}}, 404),
        ("POST", "/v1/vnfs/vnf-as-01/switchover", {"json": {"to_member": "nope"}}, 400),
        ("POST", "/v1/vms/vm-001/migrate", {"json": {"avoid": "node-1"}}, 400),
        ("POST", "/v1/vnfs/actions", {"json": {"actions": []}}, 400),
        ("POST", "/v1/vnfs/actions", {"json": {}}, 400),
        (
            "POST",
            "/v1/vnfs/actions",
            {"json": {"actions": [{"vnf_id": "v", "action": "reboot", "member": "m"}]}},
            400,
        ),
        (
            "POST",
            "/v1/vnfs/actions",
            {"json": {"actions": [{"vnf_id": "v", "action": "drain", "member": ""}]}},
            400,
        ),
        (
            "POST",
            "/v1/vnfs/actions",
            {"json": {"actions": [{"vnf_id": "v", "action": "drain", "member": "m"}] * 1001}},
            400,
        ),
        ("GET", "/v1/vnfs/actions", {}, 404),
        (
            "POST",
            "/v1/faults/migrations",
            {"json": {"node_id": "node-1", "fail_next_migrations_to": -1}},
            400,
        ),
        ("POST", "/v1/faults/migrations", {"json": {"node_id": "node-1"}}, 400),
        (
            "POST",
            "/v1/faults/migrations",
            {"json": {"node_id": "nope", "fail_next_migrations_to": 1}},
            404,
        ),
    ],
)
async def test_bad_input_is_mapped_to_4xx_with_a_message(
    world_url: str, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    got_status, body = await raw(world_url, method, path, **kwargs)
    assert got_status == status
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    health_status, _ = await raw(world_url, "GET", "/healthz")
    assert health_status == 200


async def test_client_reports_an_unreachable_world() -> None:
    async with WorldClient("http://127.0.0.1:9", timeout_s=2) as client:
        with pytest.raises(WorldError) as unreachable:
            await client.healthz()
    assert unreachable.value.status == 0
