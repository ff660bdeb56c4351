"""Delivery faults and a mid-campaign rebalance must not change a campaign's outcome (issue 6).

Every service's main consumer is wrapped by `escalator.bus.faults` (set through
`ESCALATOR_TEST_DELIVERY_FAULTS` in each service process): suffixes of batches redelivered,
fetches delayed, one partition's batch held back now and then, all within Kafka's per-partition
order. The outcome is judged from the world's own records with the chaos suite's checks
(`tests/chaos/chaos_lib.check_invariants`): campaign completed, every node upgraded exactly once,
VMs intact, no node left in maintenance, zero monitor interruptions. The services' own one-line
fault summaries (logged at stop) show that faults were really injected.

The second test runs two Upgrade Managers and two Cloud Managers in their consumer groups: the
second of each starts while nodes are in their cycle (a rebalance), then the Upgrade Manager
owning the campaign's partition is SIGKILLed and the first Cloud Manager SIGTERMed.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from e2e_harness import (
    CLOUD_MANAGER,
    NODE_AGENT,
    UM_READY,
    UPGRADE_MANAGER,
    VNFM_ADAPTER,
    E2EDeployment,
    assert_clean_finish,
)

from escalator.bus import partition_for_key
from escalator.bus.faults import ENV_VAR, latest_summaries
from escalator.processes import python_module
from escalator.status import CampaignView
from schemas.envelope import Event
from schemas.events import NodeCycleAdvanced, NodeStep

_CHAOS = Path(__file__).resolve().parents[2] / "chaos"
if str(_CHAOS) not in sys.path:
    sys.path.insert(0, str(_CHAOS))

from chaos_lib import _RebootSampler, check_invariants, start_campaign  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

FAULTS = "seed=7,redeliver=0.25,delay_ms=40,hold=0.15"
FAULTY_ROLES = (UPGRADE_MANAGER, CLOUD_MANAGER, VNFM_ADAPTER, NODE_AGENT)
READY_LINE = re.compile(r"(\S+) ready \(rebalance (\d+).*partitions \[([\d, ]*)\]")


def faulty_env() -> dict[str, dict[str, str]]:
    return {role: {ENV_VAR: FAULTS} for role in FAULTY_ROLES}


def terminate_services(d: E2EDeployment, timeout_s: float = 20.0) -> None:
    """SIGTERM every live service at once (not the world), so each logs its fault summary."""
    live = [c for name, c in d.group.children.items() if name != "world" and c.alive]
    for child in live:
        child.process.send_signal(signal.SIGTERM)
    give_up = time.monotonic() + timeout_s
    for child in live:
        try:
            child.process.wait(timeout=max(0.1, give_up - time.monotonic()))
        except Exception:
            child.process.kill()
            child.process.wait()


def fault_summaries(d: E2EDeployment) -> dict[str, dict[str, int]]:
    return latest_summaries(d.grep_logs(r"delivery faults \["))


async def check_outcome(
    d: E2EDeployment, campaign_id: str, view: CampaignView, sampler: _RebootSampler
) -> None:
    assert d.before is not None
    after = await d.snapshot()
    await sampler.stop()
    sampler.note(after.nodes)
    events = await d.campaign_events(campaign_id)
    checks = check_invariants(view, d.before, after, sampler.records, events)
    broken = {name: c.detail for name, c in checks.items() if not c.ok}
    assert not broken, f"invariants broken: {broken}\n{d.logs()}"
    assert_clean_finish(view, d.before, after, context=d.logs())


async def test_campaign_outcome_unchanged_under_delivery_faults(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(
        nodes=6, domains=3, seed=4, speed=20, spare_fraction=0.35, extra_env=faulty_env()
    )
    await d.prepare()
    sampler = _RebootSampler(d.world_url)
    sampler.start()
    try:
        view = await d.run_campaign(campaign_id, max_parallel=2)
        await check_outcome(d, campaign_id, view, sampler)
    finally:
        await sampler.stop()
    in_parallel = any(
        len(v) >= 2 for v in _cycles_in_parallel(await d.campaign_events(campaign_id))
    )
    assert in_parallel, "the campaign never had two nodes in their cycle at once"

    terminate_services(d)
    summaries = fault_summaries(d)
    agents = [n for n in summaries if n.startswith("node-agent")]
    assert {"upgrade-manager/0", "cloud-manager/0"} <= set(summaries), summaries
    assert len(agents) == len(d.node_ids), f"node agents without a summary: {summaries}"
    assert any(n.startswith("vnfm-adapter") for n in summaries), summaries
    um = summaries["upgrade-manager/0"]
    assert um["redeliveries"] > 0 and um["delays"] > 0, um
    totals = {k: sum(s.get(k, 0) for s in summaries.values()) for k in ("holds", "redeliveries")}
    assert totals["holds"] > 0 and totals["redeliveries"] >= 3, (totals, summaries)


def _cycles_in_parallel(events: list[Event]) -> list[set[str]]:
    """The sets of nodes in their cycle after each NodeCycleAdvanced."""
    active: set[str] = set()
    seen = []
    for e in events:
        if not isinstance(e, NodeCycleAdvanced):
            continue
        if e.step in (NodeStep.PENDING,) or e.step.finished:
            active.discard(e.node_id)
        else:
            active.add(e.node_id)
        seen.append(set(active))
    return seen


def _owners(d: E2EDeployment, names: list[str]) -> dict[str, set[int]]:
    """Each Upgrade Manager's partitions, from its latest "ready" line."""
    owned: dict[str, set[int]] = {}
    for name in names:
        for line in d.grep_logs(UM_READY):
            if not line.startswith(f"{name}: "):
                continue
            m = READY_LINE.search(line)
            if m:
                owned[name] = {int(p) for p in m.group(3).split(",") if p.strip()}
    return owned


async def test_rebalance_mid_campaign_with_two_instances(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(
        nodes=6, domains=3, seed=4, speed=6, spare_fraction=0.35, extra_env=faulty_env()
    )
    await d.prepare()
    sampler = _RebootSampler(d.world_url)
    sampler.start()
    in_cycle = asyncio.Event()  # a node entered its cycle
    busy = asyncio.Event()  # a node entered MIGRATING or UPGRADING (armed: cleared before use)
    latest: dict[str, CampaignView] = {}

    def track(event: Event, view: CampaignView) -> None:
        latest["view"] = view
        if isinstance(event, NodeCycleAdvanced):
            if event.step is NodeStep.NOTIFYING:
                in_cycle.set()
            if event.step in (NodeStep.MIGRATING, NodeStep.UPGRADING):
                busy.set()

    following = asyncio.create_task(
        d.follow_campaign(campaign_id, on_event=track, check_alive=False, timeout_s=150)
    )
    try:
        await asyncio.sleep(0.3)
        await start_campaign(d, campaign_id, 2)
        await asyncio.wait_for(in_cycle.wait(), 60)

        # Second instances join the groups while a node is in its cycle.
        w = d.world_url
        um_env = d.opts.extra_env.get(UPGRADE_MANAGER)
        cm_env = d.opts.extra_env.get(CLOUD_MANAGER)
        d.group.spawn(
            "upgrade-manager-2",
            python_module("services.upgrade_manager", "--instance-id", "upgrade-manager/1"),
            env=um_env,
        )
        d.group.spawn(
            "cloud-manager-2",
            python_module(
                "services.cloud_manager", "--world", w, "--instance-id", "cloud-manager/1"
            ),
            env=cm_env,
        )
        await d.wait_log("upgrade-manager-2", UM_READY, timeout_s=45)
        at_join = latest["view"]
        assert not at_join.finished, "the campaign ended before the second manager joined"
        # The first manager went through the rebalance too (its second "ready").
        await d.wait_log("upgrade-manager", r"ready \(rebalance [2-9]", timeout_s=30)

        # Then, as soon as a node is next migrating or upgrading, the manager owning the
        # campaign's partition dies without a goodbye, and the first Cloud Manager leaves
        # gracefully.
        partition = partition_for_key(campaign_id.encode(), d.settings.partitions)
        owners = _owners(d, ["upgrade-manager", "upgrade-manager-2"])
        owner = next((n for n, ps in owners.items() if partition in ps), None)
        assert owner is not None, f"no manager owns partition {partition}: {owners}"
        assert owners["upgrade-manager"] and owners["upgrade-manager-2"], owners
        busy.clear()
        await asyncio.wait_for(busy.wait(), 60)
        at_kill = latest["view"]
        d.group.kill(owner)  # SIGKILL
        d.group.kill("cloud-manager", signal.SIGTERM)
        assert not at_kill.finished and at_kill.in_cycle, "no node in its cycle at the kill"

        view = await following
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    await check_outcome(d, campaign_id, view, sampler)
    survivor = "upgrade-manager-2" if owner == "upgrade-manager" else "upgrade-manager"
    took_over = _owners(d, [survivor]).get(survivor, set())
    assert partition in took_over, f"{survivor} never took partition {partition}: {took_over}"

    terminate_services(d)
    summaries = fault_summaries(d)
    assert "cloud-manager/0" in summaries, summaries  # SIGTERMed: its summary at stop
    survivor_id = "upgrade-manager/1" if survivor == "upgrade-manager-2" else "upgrade-manager/0"
    assert summaries.get(survivor_id, {}).get("batches", 0) > 0, summaries
