"""Failed upgrades end to end, over a real broker and every service as a process (issue 6).

- A node whose upgrade fails on every attempt is rolled back by its agent to a healthy node,
  returns to service (counted as failed), and the campaign completes with the other nodes
  upgraded.
- An operator's abort with `--upgrading rollback` while a node is upgrading puts that node
  back on its old version, out of maintenance.
"""

from __future__ import annotations

import asyncio

import pytest
from e2e_harness import NODE_AGENT, TARGET, E2EDeployment, for_node, of_type

from escalator.world.client import WorldClient
from schemas.events import NodeRollbackCompleted, NodeStep, NodeUpgradeFailed

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(300)]

OLD = "1.0.0"
# Short pauses between attempts: the agents' defaults are seconds.
FAST_RETRIES = {
    "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_S": "0.2",
    "ESCALATOR_NODE_AGENT_APPLY_BACKOFF_MAX_S": "1",
}


async def wait_until(predicate, timeout_s: float = 60.0, every_s: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not await predicate():
        assert loop.time() < give_up, "condition not met in time"
        await asyncio.sleep(every_s)


async def test_a_node_failing_every_attempt_returns_to_service_rolled_back(
    deploy, campaign_id: str
) -> None:
    d: E2EDeployment = deploy(
        nodes=3, domains=3, seed=0, speed=20, extra_env={NODE_AGENT: FAST_RETRIES}
    )
    before = await d.prepare()
    victim = before.nodes[0].id
    async with WorldClient(d.world_url) as world:
        # As many failures as the agent's attempts (3 by default): the rollback's reboot is the
        # first one to succeed.
        await world.inject_faults(victim, fail_next_upgrades=3)

    view = await d.run_campaign(campaign_id, max_parallel=1)

    assert view.state == "completed", f"{view.reason}\n{d.logs()}"
    assert view.nodes[victim].step is NodeStep.FAILED
    assert "rolled back to 1.0.0, healthy" in view.nodes[victim].detail
    others = [n.id for n in before.nodes if n.id != victim]
    assert all(view.nodes[n].step is NodeStep.DONE for n in others), view.nodes
    after = await d.snapshot()
    nodes = {n.id: n for n in after.nodes}
    assert nodes[victim].installed_version == OLD
    assert nodes[victim].maintenance_holder is None, "the rolled-back node is back in service"
    assert nodes[victim].service_status == "enabled"
    assert nodes[victim].reboot_count == 4, "three failed attempts and the rollback"
    assert {n: nodes[n].installed_version for n in others} == dict.fromkeys(others, TARGET)
    assert {n: nodes[n].reboot_count for n in others} == dict.fromkeys(others, 1)
    assert not [n.id for n in after.nodes if n.maintenance_holder]
    assert sorted(vm.id for vm in after.vms) == sorted(vm.id for vm in before.vms)

    events = for_node(await d.campaign_events(campaign_id), victim)
    [failed] = of_type(events, "NodeUpgradeFailed")
    assert isinstance(failed, NodeUpgradeFailed)
    assert (failed.attempts, failed.rolled_back, failed.healthy) == (3, True, True)
    assert failed.installed_version == OLD
    assert of_type(events, "NodeMaintenanceExited"), "the manager released the node"
    assert not of_type(events, "NodeUpgraded")


async def test_abort_with_rollback_during_an_upgrade_puts_the_node_back(
    deploy, campaign_id: str
) -> None:
    # 120 s nominal reboots at speed 20: 6 s, long enough to abort in the middle of one (the
    # abort is sent as soon as the reboot shows, and the CLI takes about a second).
    d: E2EDeployment = deploy(
        nodes=3,
        domains=3,
        seed=1,
        speed=20,
        extra_env={NODE_AGENT: {"ESCALATOR_NODE_AGENT_REBOOT_S": "120", **FAST_RETRIES}},
    )
    before = await d.prepare()
    await d.start_campaign(campaign_id, max_parallel=1)

    upgrading: list[str] = []

    async def a_node_reboots() -> bool:
        async with WorldClient(d.world_url) as world:
            upgrading[:] = [n.id for n in await world.nodes() if n.power == "rebooting"]
        return bool(upgrading)

    await wait_until(a_node_reboots, timeout_s=90, every_s=0.1)
    [node] = upgrading
    code, out, err = await d.cli(
        "abort", campaign_id, "--upgrading", "rollback", "--reason", "bad build"
    )
    assert code == 0, f"{out}\n{err}"

    view = await d.follow_campaign(campaign_id)
    assert view.state == "failed" and "aborted by the operator" in view.reason
    assert view.nodes[node].step is NodeStep.SKIPPED
    assert "rolled back to 1.0.0, healthy" in view.nodes[node].detail
    after = await d.snapshot()
    nodes = {n.id: n for n in after.nodes}
    assert nodes[node].installed_version == OLD, "the node ends on its old version"
    assert nodes[node].maintenance_holder is None, "out of maintenance"
    assert nodes[node].service_status == "enabled"
    assert nodes[node].reboot_count == 2, "the upgrade under way, then the rollback"
    assert not [n.id for n in after.nodes if n.maintenance_holder]
    assert {n.installed_version for n in after.nodes} == {OLD}
    assert sorted(vm.id for vm in after.vms) == sorted(vm.id for vm in before.vms)

    events = for_node(await d.campaign_events(campaign_id), node)
    [rolled_back] = of_type(events, "NodeRollbackCompleted")
    assert isinstance(rolled_back, NodeRollbackCompleted)
    assert rolled_back.healthy and rolled_back.installed_version == OLD
    [request] = of_type(events, "NodeRollbackRequested")
    assert rolled_back.causation_id == request.event_id
