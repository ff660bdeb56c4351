"""The reference VNFM against a real world process: what it reports as moved really is.

The adapter's core produces the notices for a node, one reference VNFM per VNFM id acts on the
world and replies, the core collects the replies. Then the test migrates what was left for the
VIM (as the Upgrade Manager would), reboots the node, and asks the world's own monitor whether
any VNF whose business was reported moved got interrupted.
"""

from __future__ import annotations

import asyncio
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from escalator.registry import VnfRegistry
from escalator.world.client import WorldClient
from escalator.world.model import VnfView
from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    NodeAvailable,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfProfile,
)
from schemas.types import BusinessOutcome, RedundancyModel, VmRef
from services.vnfm_adapter.domain import AdapterState, Context, decide
from services.vnfm_adapter.reference_vnfm import ReferenceVnfm

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEED = 10.0  # reboot 0.3 s, migration 0.05 s, resync 0.2 s
READY_TIMEOUT_S = 30.0
CAMPAIGN = "cmp-ref-vnfm"


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
    """A fresh world per test: the tests change it (switch-overs, drains, reboots)."""
    command = [sys.executable, "-m", "escalator.world", "--port", "0", "--nodes", "6"]
    command += ["--seed", "1", "--speed", str(SPEED)]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        try:
            yield _wait_for_ready_line(process, READY_TIMEOUT_S)
            assert process.poll() is None, "the world died during the test"
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


def profile_of(view: VnfView) -> VnfProfile:
    return VnfProfile(
        vnf_id=view.id,
        vnfm_id=view.vnfm_id,
        redundancy=RedundancyModel(view.redundancy),
        members=tuple(view.members),
        min_in_service=view.min_in_service,
        max_unavailable=view.max_unavailable,
        min_recovery_s=view.min_recovery_s,
    )


def richest_node(vnfs: list[VnfView]) -> str:
    """The node with the most kinds of member on it (active, standby, load-balanced), then the
    most members: the most interesting one to notify."""
    kinds: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for vnf in vnfs:
        for member, node in vnf.member_nodes.items():
            if vnf.redundancy == "load_balanced":
                kind = "lb"
            else:
                kind = "active" if member == vnf.active_member else "standby"
            kinds.setdefault(node, set()).add(kind)
            counts[node] = counts.get(node, 0) + 1
    return max(kinds, key=lambda n: (len(kinds[n]), counts[n], n))


async def wait_until_left(world: WorldClient, node_id: str, vm_ids: set[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        on_node = {vm.id for vm in await world.node_vms(node_id)}
        if not on_node & vm_ids:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"VMs {sorted(vm_ids)} still on or toward {node_id}")


async def test_business_reported_moved_is_not_interrupted_by_the_reboot(
    world: WorldClient,
) -> None:
    vnfs = await world.vnfs()
    registry = VnfRegistry.of(profile_of(v) for v in vnfs)
    node_id = richest_node(vnfs)
    await world.claim_maintenance(node_id, CAMPAIGN)
    vms = await world.node_vms(node_id)
    request = BusinessMoveRequested(
        campaign_id=CAMPAIGN,
        node_id=node_id,
        vms=tuple(VmRef(vm_id=vm.id, vnf_id=vm.vnf_id) for vm in vms),
        deadline=datetime.now(UTC) + timedelta(seconds=60),
        producer="test",
    )

    def ctx() -> Context:
        return Context(now=datetime.now(UTC), registry=registry)

    replies: list[VnfBusinessMoved] = []

    async def send(reply: VnfBusinessMoved) -> None:
        replies.append(reply)

    vnfm_ids = sorted({v.vnfm_id for v in vnfs})
    drivers = {vnfm_id: ReferenceVnfm(world, vnfm_id, send) for vnfm_id in vnfm_ids}
    decision = decide(AdapterState(), request, ctx())
    notices = [c for c in decision.commands if isinstance(c, VnfMaintenanceNotified)]
    assert notices, f"nothing on {node_id} belongs to a VNF"
    for notice in notices:
        # every VNFM sees every notice; only the addressee may act and answer
        for driver in drivers.values():
            await driver.handle_notice(notice)
    assert sorted((r.notice_id, r.vnfm_id) for r in replies) == sorted(
        (n.notice_id, n.vnfm_id) for n in notices
    )
    state = decision.state
    emitted: list[Event] = []
    for reply in replies:
        decision = decide(state, reply, ctx())
        assert decision.rejections == ()
        state = decision.state
        emitted.extend(decision.commands)
    [moved] = [c for c in emitted if isinstance(c, BusinessMoved)]
    assert not moved.timed_out
    outcome = {o.vm_id: o for o in moved.outcomes}
    assert set(outcome) == {vm.id for vm in vms}

    # every kind of member on the node got the expected treatment (the world had no other
    # activity, so every standby is in sync and every load-balanced VNF can spare a member)
    by_id = {v.id: v for v in vnfs}
    for vm in vms:
        got = outcome[vm.id].outcome
        vnf = by_id.get(vm.vnf_id or "")
        if vnf is None:
            assert got is BusinessOutcome.LEFT_FOR_VIM
        elif vnf.redundancy == "load_balanced":
            assert got is BusinessOutcome.DRAINED
        else:
            assert got is BusinessOutcome.SWITCHED_OVER
    moved_vnfs = {o.vnf_id for o in moved.outcomes if o.outcome.business_moved}
    assert moved_vnfs

    # the VIM's part: migrate what was left to it, then reboot the node
    left = {o.vm_id for o in moved.outcomes if not o.outcome.business_moved}
    for vm_id in sorted(left):
        await world.migrate_vm(vm_id)
    await wait_until_left(world, node_id, left)
    before = {i.id for i in await world.interruptions()}
    await world.reboot_node(node_id)
    record = await world.wait_reboot_finished(node_id, timeout_s=30)
    assert record.state == "succeeded"
    new = [i for i in await world.interruptions() if i.id not in before]
    assert [i for i in new if i.vnf_id in moved_vnfs] == []
    assert new == [], "even what was left for the VIM moved in time"

    # back in service: each VNFM gets its NodeAvailable and gives drained members load back
    await world.release_maintenance(node_id, CAMPAIGN)
    internal = NodeAvailable(
        campaign_id=CAMPAIGN,
        node_id=node_id,
        vnf_ids=tuple(sorted({vm.vnf_id for vm in vms if vm.vnf_id})),
        producer="test",
    )
    drained = {(o.vnf_id, o.vm_id) for o in moved.outcomes if o.outcome is BusinessOutcome.DRAINED}
    restored: set[tuple[str, str]] = set()
    for event in decide(state, internal, ctx()).commands:
        assert isinstance(event, NodeAvailable) and event.vnfm_id is not None
        for driver in drivers.values():
            restored.update(await driver.handle_node_available(event))
    assert restored == drained
    for vnf_id, member in drained:
        assert (await world.vnf(vnf_id)).load_share[member] > 0


async def test_the_monitor_does_see_an_unhandled_active_member_go_down(
    world: WorldClient,
) -> None:
    """The control experiment: without the VNFM, the same reboot does interrupt."""
    vnfs = await world.vnfs()
    node_id = richest_node(vnfs)
    actives = {
        v.id
        for v in vnfs
        if v.redundancy == "active_standby" and v.member_nodes.get(v.active_member or "") == node_id
    }
    assert actives
    await world.reboot_node(node_id)
    await world.wait_reboot_finished(node_id, timeout_s=30)
    interrupted = {i.vnf_id for i in await world.interruptions()}
    assert actives <= interrupted
