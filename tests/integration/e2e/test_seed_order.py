"""The seed's order of a node's cycle, node by node, on a real broker, every service a process.

After a campaign started through the CLI, every event of the campaign is read back from every
catalogue topic (vendor notices and replies are keyed by VNFM, so they are picked by campaign id).
For each node the test checks both clocks it has: event times (`occurred_at`, one host, one
clock) and causation chains (each reply carries the id of what caused it), for

    NodeMaintenanceEntered < VnfMaintenanceNotified < BusinessMoved (or NoticeExpired)
      < every VmMigrationRequested of the node; every VmMigrated < NodeUpgradeRequested;
    NodeUpgraded < NodeMaintenanceExited < NodeAvailable,

and that no VM landed on a node inside its own maintenance interval. Two nodes are in their
cycle at once (`--max-parallel 2`) so that the last check has teeth, on a world (seed 105, half
its capacity free so that two nodes' VMs fit on the other two, and no two nodes sharing a VNF
that tolerates one impact at a time within a pair the planner picks) whose every node carries
VMs without a VNF, which only the VIM can move.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from itertools import pairwise

import pytest
from e2e_harness import CYCLE, E2EDeployment, for_node, of_type, steps_of

from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    NodeAvailable,
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    NodeUpgraded,
    NodeUpgradeRequested,
    NoticeExpired,
    VmMigrated,
    VmMigrationRequested,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
)
from schemas.types import BusinessOutcome

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

# 4 nodes, 50 % spare: loose VMs (no VNF) on every node, so every node has migrations, and the
# planner finds two pairs of nodes that may go at once (`escalator plan` shows batches [2, 2]).
SEED = 105
SPARE = 0.5


def one(events: list[Event], cls: type[Event], node_id: str) -> Event:
    found = [e for e in for_node(events, node_id) if isinstance(e, cls)]
    assert len(found) == 1, f"{node_id}: {len(found)} {cls.__name__} events: {found}"
    return found[0]


def chain_back(by_id: dict[str, Event], start: Event) -> list[str]:
    """Event types from `start` back to the root of its causation chain."""
    types = [start.event_type]
    current = start
    while current.causation_id is not None and str(current.causation_id) in by_id:
        current = by_id[str(current.causation_id)]
        types.append(current.event_type)
    return types


async def test_each_node_follows_the_seed_order(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(nodes=4, seed=SEED, spare_fraction=SPARE, max_parallel=2)
    before = await d.prepare()
    view = await d.run_campaign(campaign_id)
    assert view.state == "completed", f"{view.state}: {view.reason}\n{d.logs()}"
    # The campaign completes when the last node left maintenance; the adapter's fan-out of
    # NodeAvailable to the VNFMs follows it, so wait (bounded) until every notified VNFM has it.
    events = await d.campaign_events(campaign_id)
    for _ in range(50):
        notified = {(e.node_id, e.vnfm_id) for e in events if isinstance(e, VnfMaintenanceNotified)}
        told = {
            (e.node_id, e.vnfm_id)
            for e in events
            if isinstance(e, NodeAvailable) and e.vnfm_id is not None
        }
        if notified <= told:
            break
        await asyncio.sleep(0.2)
        events = await d.campaign_events(campaign_id)
    after = await d.snapshot()
    by_id = {str(e.event_id): e for e in events}
    vms_before = {vm.id: vm for vm in before.vms}
    maintenance: dict[str, tuple[datetime, datetime]] = {}
    migrations_seen = 0

    for node_id in d.node_ids:
        ctx = f"node {node_id}; logs {d.group.log_dir}"
        assert steps_of(events, node_id) == list(CYCLE), ctx

        claim = one(events, NodeMaintenanceRequested, node_id)
        entered = one(events, NodeMaintenanceEntered, node_id)
        assert isinstance(entered, NodeMaintenanceEntered)
        assert entered.causation_id == claim.event_id, ctx
        request = one(events, BusinessMoveRequested, node_id)
        assert request.causation_id == entered.event_id, ctx
        assert entered.occurred_at <= request.occurred_at, ctx

        # The VNFMs are told after maintenance began, and only for nodes with VNF VMs.
        notices = [e for e in for_node(events, node_id) if isinstance(e, VnfMaintenanceNotified)]
        vnf_vms = {vm.vm_id for vm in entered.vms if vm.vnf_id is not None and not vm.incoming}
        assert vnf_vms, f"{ctx}: seed {SEED} puts VNF members on every node"
        assert notices, ctx
        for notice in notices:
            assert notice.causation_id == request.event_id, ctx
            assert notice.occurred_at >= entered.occurred_at, ctx
        notified = {vm for n in notices for v in n.vnfs for vm in v.vm_ids}
        assert notified == vnf_vms, ctx

        # Business moved (each notice answered or expired), then the VIM migrates what is left.
        moved = one(events, BusinessMoved, node_id)
        assert isinstance(moved, BusinessMoved)
        assert moved.request_id == request.event_id, ctx
        # Caused by what completed it: the last VNFM reply (or the request, at a deadline).
        completing = {
            e.event_id
            for e in events
            if isinstance(e, VnfBusinessMoved) and e.causation_id in {n.event_id for n in notices}
        }
        assert moved.causation_id in completing | {request.event_id}, ctx
        for notice in notices:
            answers = [
                e
                for e in events
                if isinstance(e, VnfBusinessMoved | NoticeExpired)
                and e.causation_id == notice.event_id
            ]
            assert answers, f"{ctx}: notice {notice.event_id} neither answered nor expired"
            assert all(notice.occurred_at <= a.occurred_at <= moved.occurred_at for a in answers)
        assert moved.occurred_at >= max(n.occurred_at for n in notices), ctx

        requested = [e for e in for_node(events, node_id) if isinstance(e, VmMigrationRequested)]
        for req in requested:
            assert req.causation_id == moved.event_id, ctx
            assert req.occurred_at >= moved.occurred_at, ctx
        outcome = {o.vm_id: o.outcome for o in moved.outcomes}
        must_move = {
            vm.vm_id
            for vm in entered.vms
            if not vm.incoming
            and outcome.get(vm.vm_id, BusinessOutcome.LEFT_FOR_VIM) is BusinessOutcome.LEFT_FOR_VIM
        }
        assert must_move, f"{ctx}: seed {SEED} has VMs only the VIM can move on every node"
        assert {r.vm_id for r in requested} == must_move, ctx

        migrated = [e for e in for_node(events, node_id) if isinstance(e, VmMigrated)]
        assert {m.vm_id for m in migrated} == must_move, ctx
        upgrade = one(events, NodeUpgradeRequested, node_id)
        for m in migrated:
            assert by_id[str(m.causation_id)].event_type == "VmMigrationRequested", ctx
            assert m.occurred_at <= upgrade.occurred_at, ctx
        assert upgrade.causation_id in {m.event_id for m in migrated}, ctx
        migrations_seen += len(migrated)

        # Upgrade, leave maintenance, tell the VNFMs the node is back.
        upgraded = one(events, NodeUpgraded, node_id)
        assert isinstance(upgraded, NodeUpgraded) and upgraded.applied, ctx
        assert upgraded.causation_id == upgrade.event_id, ctx
        exit_request = one(events, NodeMaintenanceExitRequested, node_id)
        assert exit_request.causation_id == upgraded.event_id, ctx
        exited = one(events, NodeMaintenanceExited, node_id)
        assert exited.causation_id == exit_request.event_id, ctx
        assert upgrade.occurred_at <= upgraded.occurred_at <= exited.occurred_at, ctx
        available = [e for e in for_node(events, node_id) if isinstance(e, NodeAvailable)]
        from_manager = [a for a in available if a.vnfm_id is None]
        to_vnfms = [a for a in available if a.vnfm_id is not None]
        assert len(from_manager) == 1 and from_manager[0].causation_id == exited.event_id, ctx
        assert {a.vnfm_id for a in to_vnfms} == {n.vnfm_id for n in notices}, ctx
        assert all(a.occurred_at >= exited.occurred_at for a in available), ctx

        # The whole cycle is one causation chain, read backwards from NodeAvailable.
        chain = chain_back(by_id, from_manager[0])
        assert chain[:6] == [
            "NodeAvailable",
            "NodeMaintenanceExited",
            "NodeMaintenanceExitRequested",
            "NodeUpgraded",
            "NodeUpgradeRequested",
            "VmMigrated",
        ], chain
        # The adapter's answer was caused by the VNFM reply that completed it.
        assert chain[6:12] == [
            "VmMigrationRequested",
            "BusinessMoved",
            "VnfBusinessMoved",
            "VnfMaintenanceNotified",
            "BusinessMoveRequested",
            "NodeMaintenanceEntered",
        ], chain
        assert chain[12] == "NodeMaintenanceRequested", chain

        maintenance[node_id] = (entered.occurred_at, exited.occurred_at)

    # max_parallel 2 really overlapped two maintenance intervals (else the next check is moot).
    intervals = sorted(maintenance.values())
    assert any(b[0] < a[1] for a, b in pairwise(intervals)), intervals

    # No VM landed on a node that was inside its own maintenance interval at that time.
    placement = {vm_id: vm.node_id for vm_id, vm in vms_before.items()}
    for m in of_type(events, "VmMigrated"):
        assert isinstance(m, VmMigrated)
        start, end = maintenance[m.destination_node_id]
        assert not start <= m.occurred_at <= end, (
            f"{m.vm_id} landed on {m.destination_node_id} at {m.occurred_at}, "
            f"inside its maintenance [{start}, {end}]"
        )
        assert m.destination_node_id != m.node_id
        assert placement[m.vm_id] == m.node_id, f"{m.vm_id} left a node it was not on"
        placement[m.vm_id] = m.destination_node_id
    assert migrations_seen == len(of_type(events, "VmMigrated"))

    # The world's final placement is the initial one moved by exactly these migrations.
    assert {vm.id: vm.node_id for vm in after.vms} == placement
    assert all(not n.maintenance_holder for n in after.nodes)
