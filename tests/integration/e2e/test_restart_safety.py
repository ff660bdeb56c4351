"""Restart safety: services killed with SIGKILL mid-campaign and started again.

For every step boundary of a node's cycle (claiming, notifying, migrating, upgrading, releasing,
done) one run follows the campaigns topic and, the moment the first node's `NodeCycleAdvanced`
reaches that step, kills the Upgrade Manager with SIGKILL and starts it again. Each run must
complete with: every node at the target version, each node rebooted exactly once by the world's
own count (no upgrade applied twice), no node left in maintenance, the same VMs, and zero
interruptions in the world's monitor log. A last run kills the Cloud Manager, the VNFM adapter
and one node agent at three points of the campaign and restarts each.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from e2e_harness import (
    CYCLE,
    E2EDeployment,
    assert_clean_finish,
    of_type,
    steps_of,
)

from escalator.bus import EventPublisher, make_producer
from escalator.bus.readback import scan
from escalator.status import CampaignView
from schemas.codec import decode
from schemas.envelope import Event
from schemas.events import NodeCycleAdvanced, NodeMaintenanceRequested, NodeStep, NodeUpgraded
from schemas.topics import CLOUD_COMMANDS, CLOUD_EVENTS

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(300)]

SEED = 17  # loose VMs on every node: the migrating step always has work in flight
# A campaign of these 4 nodes takes about 5 s at speed 20, a restart a few more: a campaign not
# over after this long is stuck (every step deadline of the policy is 600 s or more).
STALL_S = 45.0

BOUNDARIES = [
    pytest.param(NodeStep.CLAIMING, marks=pytest.mark.slow),
    pytest.param(NodeStep.NOTIFYING),
    pytest.param(NodeStep.MIGRATING, marks=pytest.mark.slow),
    pytest.param(NodeStep.UPGRADING),
    pytest.param(NodeStep.RELEASING, marks=pytest.mark.slow),
    pytest.param(NodeStep.DONE, marks=pytest.mark.slow),
]


async def follow(d: E2EDeployment, campaign_id: str, on_event: object) -> CampaignView:
    """Follow the campaign to its end; a stall (no progress for STALL_S) fails the test.

    (A restarted manager re-sends its in-flight commands with the same ids; receivers answer
    them again, so a reply the manager saw too early, before its state caught up, is repeated.)
    """
    return await d.follow_campaign(
        campaign_id,
        on_event=on_event,  # type: ignore[arg-type]
        timeout_s=STALL_S,
    )


def assert_applied_once(events: list[Event], node_ids: list[str], context: str) -> None:
    """At most one `NodeUpgraded(applied=true)` per node: a redone request is answered
    `applied=false` by the agent, never installed again."""
    applied = Counter(
        e.node_id
        for e in of_type(events, "NodeUpgraded")
        if isinstance(e, NodeUpgraded) and e.applied
    )
    assert applied == Counter(node_ids), f"NodeUpgraded(applied) per node: {applied}\n{context}"


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=lambda s: s.value)
async def test_upgrade_manager_killed_at_step_boundary(
    deploy, campaign_id: str, boundary: NodeStep
) -> None:
    d: E2EDeployment = deploy(nodes=4, seed=SEED)
    before = await d.prepare()
    first_node: list[str] = []
    killed_at: list[NodeStep] = []

    async def on_event(event: Event, view: CampaignView) -> None:
        if not isinstance(event, NodeCycleAdvanced) or killed_at:
            return
        if not first_node:
            first_node.append(event.node_id)
        if event.node_id == first_node[0] and event.step is boundary:
            d.kill_and_restart("upgrade-manager")
            killed_at.append(event.step)

    await d.start_campaign(campaign_id)
    view = await follow(d, campaign_id, on_event)
    assert killed_at == [boundary], f"never saw {first_node} reach {boundary}"
    assert d.group.children["upgrade-manager"].restarts == 1
    after = await d.snapshot()
    assert_clean_finish(view, before, after, context=d.logs())
    events = await d.campaign_events(campaign_id)
    assert_applied_once(events, d.node_ids, d.logs())
    # The first node's cycle went through every step, in order, whatever was redone.
    assert steps_of(events, first_node[0]) == list(CYCLE)


async def test_cloud_manager_adapter_and_agent_killed_mid_campaign(
    deploy, campaign_id: str
) -> None:
    d: E2EDeployment = deploy(nodes=4, seed=SEED)
    before = await d.prepare()
    order: list[str] = []
    # (n-th node in campaign order, step) -> service to kill there; the agent is the one of the
    # node being upgraded, killed while its reboot is under way.
    plan = {
        (1, NodeStep.NOTIFYING): "vnfm-adapter",
        (2, NodeStep.MIGRATING): "cloud-manager",
        (3, NodeStep.UPGRADING): "node-agent-{node}",
    }
    done: list[str] = []

    async def on_event(event: Event, view: CampaignView) -> None:
        if not isinstance(event, NodeCycleAdvanced):
            return
        if event.node_id not in order:
            order.append(event.node_id)
        target = plan.pop((order.index(event.node_id), event.step), None)
        if target is not None:
            name = target.format(node=event.node_id)
            d.kill_and_restart(name)
            done.append(name)

    await d.start_campaign(campaign_id)
    view = await follow(d, campaign_id, on_event)
    assert not plan, f"kills not done: {plan} (done {done})"
    assert len(done) == 3
    for name in done:
        assert d.group.children[name].restarts == 1, name
    after = await d.snapshot()
    assert_clean_finish(view, before, after, context=d.logs())
    events = await d.campaign_events(campaign_id)
    assert_applied_once(events, d.node_ids, d.logs())


class NotAnsweredAgain(AssertionError):
    pass


@pytest.mark.slow
async def test_resent_command_is_answered_again(deploy, campaign_id: str) -> None:
    """Deterministic: the same claim sent twice (as a restarted Upgrade Manager re-sends an
    in-flight command) must be answered twice, or a manager that lost the first answer stalls."""
    d: E2EDeployment = deploy(nodes=4, seed=SEED)
    await d.prepare()
    claim = NodeMaintenanceRequested(
        campaign_id=campaign_id,
        node_id=d.node_ids[0],
        holder=campaign_id,
        attempt=1,
        producer="upgrade-manager",
    )

    async def replies() -> int:
        count = 0
        async for record in scan(d.settings, CLOUD_EVENTS):
            event = decode(record.value)
            if getattr(event, "causation_id", None) == claim.event_id:
                count += 1
        return count

    producer = make_producer(d.settings)
    await producer.start()
    try:
        publisher = EventPublisher(producer, d.settings)
        for sent in (1, 2):
            await publisher.publish(claim, CLOUD_COMMANDS)
            loop = asyncio.get_running_loop()
            give_up = loop.time() + (15 if sent == 1 else 8)
            answered = await replies()
            while answered < sent and loop.time() < give_up:
                await asyncio.sleep(0.5)
                answered = await replies()
            if answered < sent:
                error = AssertionError if sent == 1 else NotAnsweredAgain
                raise error(
                    f"claim sent {sent} time(s), answered {answered} time(s)\n"
                    f"{d.grep_logs('duplicate NodeMaintenanceRequested')}"
                )
    finally:
        await producer.stop()
