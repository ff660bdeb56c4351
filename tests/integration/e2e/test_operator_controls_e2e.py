"""Operator controls end to end, through the CLI, over a real broker and every service process.

- pause lets the node in its cycle finish and starts nothing more; resume completes the campaign;
- abort returns nodes that are in maintenance but not upgrading to service untouched, and leaves
  no node in maintenance (the system-upgrade-controller complaint);
- a second campaign naming a node of a running one is rejected, naming the holder;
- retry re-admits a node quarantined after a failed upgrade, and the campaign completes.
"""

from __future__ import annotations

import asyncio

import pytest
from e2e_harness import NODE_AGENT, TARGET, E2EDeployment, for_node, of_type

from escalator.world.client import WorldClient

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(300)]


async def wait_until(predicate, timeout_s: float = 60.0, every_s: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not await predicate():
        assert loop.time() < give_up, "condition not met in time"
        await asyncio.sleep(every_s)


async def test_pause_holds_new_nodes_and_resume_completes(deploy, campaign_id: str) -> None:
    # Slow enough (3 s reboots at speed 1) that the CLI's pause lands while the campaign runs.
    d: E2EDeployment = deploy(nodes=3, domains=3, seed=0, speed=1)
    before = await d.prepare()
    await d.start_campaign(campaign_id, max_parallel=1)

    async def started() -> bool:
        return bool(of_type(await d.campaign_events(campaign_id), "NodeMaintenanceRequested"))

    await wait_until(started)
    code, out, err = await d.cli("pause", campaign_id, "--reason", "peak hour")
    assert code == 0, err
    assert "applied (CampaignPaused)" in out

    async def cycle_drained() -> bool:
        events = await d.campaign_events(campaign_id)
        return len(of_type(events, "NodeMaintenanceRequested")) == len(
            of_type(events, "NodeMaintenanceExited")
        )

    await wait_until(cycle_drained)
    await asyncio.sleep(2.0)  # several ticks of the manager: still nothing new may start
    events = await d.campaign_events(campaign_id)
    claimed = {e.node_id for e in of_type(events, "NodeMaintenanceRequested")}  # type: ignore[attr-defined]
    assert len(claimed) == 1, f"nodes started while paused: {sorted(claimed)}"
    status = await d.status_json(campaign_id)
    assert status["state"] == "paused" and status["reason"] == "peak hour"

    code, out, _ = await d.cli("pause", campaign_id)
    assert code == 0 and "already paused" in out
    code, out, err = await d.cli("resume", campaign_id)
    assert code == 0 and "applied" in out, err
    view = await d.follow_campaign(campaign_id)
    assert view.state == "completed", view.reason
    after = await d.snapshot()
    assert {n.installed_version for n in after.nodes} == {TARGET}
    assert not after.interruptions
    assert len(before.nodes) == 3


async def test_abort_leaves_no_node_in_maintenance(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(nodes=4, domains=2, seed=1, speed=0.5, timeout_s=240)
    before = await d.prepare()
    await d.start_campaign(campaign_id, max_parallel=1)

    async def one_done() -> bool:
        return bool(of_type(await d.campaign_events(campaign_id), "NodeMaintenanceExited"))

    await wait_until(one_done)
    code, out, err = await d.cli("abort", campaign_id, "--reason", "bad build")
    assert code == 0, f"{out}\n{err}"
    view = await d.follow_campaign(campaign_id)
    assert view.state == "failed"
    assert "aborted by the operator" in view.reason and "bad build" in view.reason
    after = await d.snapshot()
    held = [n.id for n in after.nodes if n.maintenance_holder]
    assert not held, f"left in maintenance after abort: {held}"
    upgraded = {n.id for n in after.nodes if n.installed_version == TARGET}
    assert 1 <= len(upgraded) < len(before.nodes)
    assert not after.interruptions
    code, out, _ = await d.cli("resume", campaign_id)
    assert code == 1 and "rejected" in out


async def test_second_campaign_on_a_held_node_is_rejected(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(nodes=3, domains=3, seed=2, speed=1)
    await d.prepare()
    await d.start_campaign(campaign_id, max_parallel=1)
    other = f"{campaign_id}-second"
    await d.start_campaign(other, nodes=[d.node_ids[1]])
    second = await d.follow_campaign(other)
    assert second.state == "rejected"
    assert f"by running campaign {campaign_id}" in second.reason
    first = await d.follow_campaign(campaign_id)
    assert first.state == "completed", first.reason


async def test_retry_re_admits_a_quarantined_node(deploy, campaign_id: str) -> None:
    # Short back-offs between the agent's attempts: the test is about the quarantine, not them.
    d: E2EDeployment = deploy(
        nodes=3,
        domains=3,
        seed=0,
        speed=20,
        extra_env={
            NODE_AGENT: {
                "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_S": "0.2",
                "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_MAX_S": "1",
            }
        },
    )
    before = await d.prepare()
    victim = before.nodes[0].id
    partners = {
        vm.node_id
        for vm in before.vms
        if vm.vnf_id in {v.vnf_id for v in before.vms if v.node_id == victim}
    } - {victim}
    assert partners, "the victim shares no VNF with another node"
    async with WorldClient(d.world_url) as world:
        # More failures than the agent retries: the node ends up failed and quarantined.
        await world.inject_faults(victim, fail_next_upgrades=10)
    await d.start_campaign(campaign_id, max_parallel=1)

    async def quarantined() -> bool:
        status = await d.status_json(campaign_id)
        steps = {n["node_id"]: n for n in status["node_states"]}
        return victim in steps and steps[victim]["step"] == "failed"

    await wait_until(quarantined, timeout_s=90)
    async with WorldClient(d.world_url) as world:
        node = await world.node(victim)
        assert node.maintenance_holder == campaign_id, "a failed node stays quarantined"
        await world.inject_faults(victim, fail_next_upgrades=0)

    # While the victim is down, the nodes sharing a VNF with it must wait (a member of each of
    # those VNFs is down already), and say so.
    async def partners_held() -> bool:
        status = await d.status_json(campaign_id)
        steps = {n["node_id"]: n for n in status["node_states"]}
        return all(steps[p]["detail"].startswith("waiting (vnf_budget)") for p in partners)

    await wait_until(partners_held, timeout_s=30)
    events = await d.campaign_events(campaign_id)
    claimed = {e.node_id for e in of_type(events, "NodeMaintenanceRequested")}  # type: ignore[attr-defined]
    assert not claimed & partners, f"a partner of the quarantined node started: {claimed}"

    code, out, err = await d.cli("retry", campaign_id, "--node", victim)
    assert code == 0, f"{out}\n{err}"
    view = await d.follow_campaign(campaign_id)
    after = await d.snapshot()
    assert view.state == "completed", view.reason
    assert {n.installed_version for n in after.nodes} == {TARGET}
    assert not [n.id for n in after.nodes if n.maintenance_holder]
    assert not after.interruptions
    events = for_node(await d.campaign_events(campaign_id), victim)
    assert len(of_type(events, "NodeUpgradeRequested")) >= 2
    code, out, _ = await d.cli("retry", campaign_id, "--node", victim)
    assert code == 1 and "rejected" in out
