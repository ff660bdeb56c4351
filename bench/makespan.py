"""Bench section `makespan`: how long a campaign takes with the batch planner, against going one
node at a time and against a lower bound, and whether going faster cost any VNF its budget.

Predicted, from the forecast (`services/upgrade_manager/domain/forecast.py`) over the scenario's
cloud (`bench/scenarios/standard.json` by default), in world seconds:

- `sequential_s`: the forecast with max_parallel = 1;
- `planner_s`: the forecast with max_parallel = the number of nodes, so that the VNFs' budgets,
  recovery times and spare capacity are the only limits;
- `lower_bound_s`: `lower_bound` under the planner's limits; `efficiency` = lower_bound_s /
  planner_s, `speedup` = sequential_s / planner_s.

Both forecasts use the order the Upgrade Manager would give the campaign (`campaign_order`: the
priority order improved by a bounded search scored under a fixed duration model);
`priority_order_planner_s` is the planner's forecast with the plain `priority_order`, and
`campaign_order_cpu_s` the CPU time of `campaign_order` (what a campaign start costs the manager).

The per-step durations model the world's simulated timings (the scenario's `timings`), see
`durations_for`; the mapping is recorded in the result.

Measured, from a LIVE run: the world serves the same scenario file
(`python -m escalator.world --scenario ... --speed LIVE_SPEED`), every service runs as its own
process with reference VNFMs, as in `escalator demo`, and a campaign over every node runs with
max_parallel = the number of nodes. `budget_violations` is the number of interruptions the
world's own service monitor recorded during the campaign (never a number from an Escalator
service); `live_planner_s` is the campaign's duration in world seconds (wall seconds x speed,
so it includes the control plane's latency, amplified by the speed factor);
`live_max_in_maintenance` is the most nodes held in maintenance by the campaign at once, sampled
from the world, and `live_max_in_cycle` the same from the campaign's NodeCycleAdvanced events.

`control_overhead_pct` (null unless the `overhead` section ran first: `ctx.results`):

    control_overhead_pct = 100 * overhead_per_cycle_s * batches / planner_s

where `overhead_per_cycle_s` is the control plane's time per node cycle measured by the
`overhead` section (what a cycle costs beyond its simulated steps), `batches` the number of
batches of the planner's forecast (each batch's cycles run in parallel, so the batches' overheads
add up along the campaign), and `planner_s` the planner's predicted makespan. The overhead is
measured in real seconds and the forecast uses the world's nominal timings (speed 1), so this is
the control plane's share of a campaign run at real speed.

With `--quick`, forecast and live run use `bench/scenarios/tight.json` (12 nodes that can only
go one at a time) at speed 20 instead. Run alone: `python -m bench --sections makespan`
(`control_overhead_pct` then stays null: run `overhead` first, as the default order does).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Row, wait_for_inventory
from escalator.processes import await_while_alive

if TYPE_CHECKING:
    from bench.common import BenchContext
    from escalator.world.model import VnfView

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "bench" / "scenarios" / "standard.json"
# --quick: 12 nodes that can only go one at a time, at twice the speed.
QUICK_SCENARIO = REPO / "bench" / "scenarios" / "tight.json"
QUICK_SPEED = 20.0
# World speed of the live run: the standard scenario's 240 s reboots take 2.4 s. Slower runs are
# closer to the model (the control plane's real latency is multiplied by the speed in world
# seconds); faster ones shorter. The registry's recovery times are divided by it too.
LIVE_SPEED = 100.0
# The Upgrade Manager's tick (re-plans after recovery waits), in real seconds: its default of
# 0.5 s would be 50 world seconds at speed 100, longer than the waits it ends.
LIVE_TICK_S = 0.1
# Node agents per pool process (services/node_agent/pool.py), when pools are available: 100
# agent processes on a small machine would measure CPU contention, not the planner.
AGENTS_PER_POOL = 25
LIVE_TIMEOUT_S = 900.0
# How often the world is sampled during the live run (real seconds).
SAMPLE_S = 0.1


# --- the model -------------------------------------------------------------------------------


def durations_for(timings: Mapping[str, float]) -> tuple[Any, dict[str, Any]]:
    """StepDurations that model the world's simulated timings, and the mapping, for the record.

    In the world only migrations, reboots and resyncs take time; claiming and releasing a node
    and the reference VNFM's switch-over or drain are single calls that take effect at once.
    """
    from services.upgrade_manager.domain.forecast import StepDurations

    durations = StepDurations(
        claim_s=0.0,
        notify_s=0.0,
        migrate_s=float(timings["migration_s"]),
        upgrade_s=float(timings["reboot_s"]),
        release_s=0.0,
    )
    mapping = {
        "claim_s": "0: maintenance on is one world call, instantaneous in world time",
        "notify_s": "0: the reference VNFM's switch-over / drain is instantaneous in the world "
        "and it replies at once (no --reply-delay-s)",
        "migrate_s": f"timings.migration_s = {timings['migration_s']}",
        "upgrade_s": f"timings.reboot_s = {timings['reboot_s']} (the node agent reboots with "
        "the world's default duration)",
        "release_s": "0: maintenance off is one world call",
        "resync_s": f"timings.resync_s = {timings['resync_s']} is every active-standby VNF's "
        "min_recovery_s in the scenario (the planner waits it out between impacts)",
    }
    return durations, mapping


def predict(scenario: Path) -> dict[str, Any]:
    """Sequential, planner and lower bound from the forecast, in world seconds."""
    from escalator.plan import inputs_from_scenario
    from services.upgrade_manager.domain.forecast import campaign_order, forecast, lower_bound
    from services.upgrade_manager.domain.planner import Limits, priority_order

    inputs = inputs_from_scenario(scenario)
    cloud, rules = inputs.cloud, inputs.rules
    durations, mapping = durations_for(inputs.source["timings"])
    nodes = sorted(cloud.hosts)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    sequential = forecast(cloud, rules, Limits(max_parallel=1), nodes, durations, start=start)
    limits = Limits(max_parallel=len(nodes))
    planned = forecast(cloud, rules, limits, nodes, durations, start=start)
    bound = lower_bound(cloud, rules, limits, nodes, durations)
    compute_s = time.perf_counter() - began
    planner_s = planned.makespan_s
    # What the order search buys, and what it costs the Upgrade Manager at campaign start.
    plain = forecast(
        cloud,
        rules,
        limits,
        nodes,
        durations,
        start=start,
        order=priority_order(cloud, rules, nodes),
    )
    cpu = time.process_time()
    campaign_order(cloud, rules, limits, nodes)
    order_cpu_s = time.process_time() - cpu
    return {
        "scenario": {"path": _relative(scenario), "sha256": inputs.source["sha256"]},
        "nodes": len(nodes),
        "vms": sum(len(h.vms) for h in cloud.hosts.values()),
        "vnfs": len(rules),
        "durations": {
            "claim_s": durations.claim_s,
            "notify_s": durations.notify_s,
            "migrate_s": durations.migrate_s,
            "upgrade_s": durations.upgrade_s,
            "release_s": durations.release_s,
        },
        "durations_mapping": mapping,
        "sequential_s": round(sequential.makespan_s, 3),
        "planner_s": round(planner_s, 3),
        "lower_bound_s": round(bound, 3),
        "efficiency": round(bound / planner_s, 4) if planner_s > 0 else None,
        "speedup": round(sequential.makespan_s / planner_s, 3) if planner_s > 0 else None,
        "planner_batches": len(planned.batches),
        "planner_max_in_maintenance": planned.max_in_maintenance,
        "sequential_batches": len(sequential.batches),
        "never_upgradable": sorted(planned.never),
        "stalled": list(planned.stalled),
        "forecast_compute_s": round(compute_s, 3),
        "priority_order_planner_s": round(plain.makespan_s, 3),
        "priority_order_efficiency": (
            round(bound / plain.makespan_s, 4) if plain.makespan_s > 0 else None
        ),
        "campaign_order_cpu_s": round(order_cpu_s, 3),
    }


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def overhead_per_cycle_s(results: Mapping[str, Any]) -> float | None:
    """The `overhead` section's control-plane seconds per node cycle, if it ran before (its
    campaign has zero-duration simulated steps, so a whole cycle is control plane)."""
    section = results.get("overhead")
    value = section.get("overhead_per_cycle_s") if isinstance(section, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def control_overhead_pct(per_cycle_s: float | None, batches: int, planner_s: float) -> float | None:
    """100 * overhead per cycle * batches / planner makespan (see the module docstring)."""
    if per_cycle_s is None or planner_s <= 0:
        return None
    return round(100.0 * per_cycle_s * batches / planner_s, 2)


# --- the live run ------------------------------------------------------------------------------


@dataclass
class Samples:
    """What the world looked like during the campaign, sampled."""

    count: int = 0
    max_in_maintenance: int = 0
    max_rebooting: int = 0
    # VNF -> the most members seen at once on nodes held in maintenance or rebooting.
    most_impacted: dict[str, int] = field(default_factory=dict)


def _tolerated(vnf: VnfView) -> int:
    """Members of a world VNF that may be impacted at once (as VnfRule.tolerated)."""
    limit = 1 if vnf.redundancy == "active_standby" else vnf.max_unavailable
    return max(0, min(limit, len(vnf.members) - vnf.min_in_service))


def max_concurrent_in_cycle(events: list[tuple[datetime, str, str]]) -> int:
    """The most nodes in their cycle at once, from (occurred_at, node, step) in any order."""
    from schemas.events import NodeStep

    inside: set[str] = set()
    most = 0
    for _, node_id, step in sorted(events):
        state = NodeStep(step)
        if state.finished or state is NodeStep.PENDING:
            inside.discard(node_id)
        else:
            inside.add(node_id)
        most = max(most, len(inside))
    return most


def time_in_steps(events: list[tuple[datetime, str, str]]) -> dict[str, Any]:
    """Wall seconds per node cycle (first non-pending step to done) and, per step, the median
    time a node spent in it: where the live run's time goes."""
    import statistics

    from schemas.events import NodeStep

    per_node: dict[str, list[tuple[datetime, str]]] = {}
    for at, node_id, step in sorted(events):
        per_node.setdefault(node_id, []).append((at, step))
    cycles: list[float] = []
    in_step: dict[str, list[float]] = {}
    for history in per_node.values():
        active = [(at, step) for at, step in history if step != NodeStep.PENDING.value]
        for (at, step), (next_at, _) in itertools.pairwise(active):
            in_step.setdefault(step, []).append((next_at - at).total_seconds())
        if active and active[-1][1] == NodeStep.DONE.value:
            cycles.append((active[-1][0] - active[0][0]).total_seconds())

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "median": round(statistics.median(ordered), 3),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "max": round(ordered[-1], 3),
        }

    return {
        "cycle_wall_s": summary(cycles) if cycles else None,
        "median_wall_s_in_step": {
            step.value: round(statistics.median(in_step[step.value]), 3)
            for step in NodeStep
            if step.value in in_step
        },
    }


def _node_agent_argvs(node_ids: list[str], world_url: str) -> list[tuple[str, list[str]]]:
    """Node agents: pools of AGENTS_PER_POOL when the node agent can host many, else one each."""
    import importlib.util

    from escalator.processes import python_module

    if importlib.util.find_spec("services.node_agent.pool") is None:
        return [
            (
                f"node-agent-{n}",
                python_module("services.node_agent", "--node-id", n, "--world", world_url),
            )
            for n in node_ids
        ]
    chunks = [node_ids[i : i + AGENTS_PER_POOL] for i in range(0, len(node_ids), AGENTS_PER_POOL)]
    return [
        (
            f"node-agents-{k + 1}",
            python_module(
                "services.node_agent", "--node-ids", ",".join(chunk), "--world", world_url
            ),
        )
        for k, chunk in enumerate(chunks)
    ]


async def _live_campaign(
    deployment: Any, speed: float, log: Callable[[str], None], timeout_s: float
) -> dict[str, Any]:
    from escalator.bus.connection import ensure_topics
    from escalator.bus.readback import scan
    from escalator.cli import build_upgrade_request, publish_upgrade_request
    from escalator.demo import publish_registry_from_world, wait_for_heartbeats, write_demo_manifest
    from escalator.status import CampaignBoard
    from escalator.world.client import WorldClient
    from schemas.codec import decode
    from schemas.envelope import Event
    from schemas.events import NodeCycleAdvanced
    from schemas.topics import CAMPAIGNS
    from schemas.types import VnfmTimeoutPolicy

    settings = deployment.settings
    await ensure_topics(settings)
    async with WorldClient(deployment.world_url) as world:
        before = await world.snapshot()
    deployment.node_ids = sorted(n.id for n in before.nodes)
    _, deployment.vnfm_ids = await publish_registry_from_world(settings, deployment.world_url)
    _start_services(deployment)
    log(f"makespan: live run, {len(deployment.node_ids)} nodes, services starting")
    await wait_for_heartbeats(settings, deployment.node_ids, deployment, timeout_s=180)
    await wait_for_inventory(settings, deployment.node_ids, deployment, 60)

    version = "2.0.0"
    nodes = len(deployment.node_ids)
    request = build_upgrade_request(
        version=version,
        manifest=write_demo_manifest(deployment.options.run_dir, version),
        artifacts=[],
        repo_url=None,
        nodes=deployment.node_ids,
        max_parallel=nodes,
        vnfm_timeout=deployment.options.vnfm_timeout_s,
        on_vnfm_timeout=VnfmTimeoutPolicy.MIGRATE,
        campaign_id=f"bench-makespan-{uuid.uuid4().hex[:8]}",
        requested_by="bench makespan",
    )
    campaign_id = request.campaign_id or ""
    vnfs = {v.id: v for v in before.vnfs}
    vnf_of_vm = {m: v.id for v in before.vnfs for m in v.members}
    samples = Samples()
    steps: list[tuple[datetime, str, str]] = []
    board = CampaignBoard()
    done = asyncio.Event()

    async def follow() -> None:
        async for record in scan(settings, CAMPAIGNS, follow=True):
            if record.key != campaign_id.encode():
                continue
            event = decode(record.value)
            if not isinstance(event, Event):
                continue
            board.apply(event)
            if isinstance(event, NodeCycleAdvanced):
                steps.append((event.occurred_at, event.node_id, event.step.value))
            if board.view(campaign_id).finished:
                done.set()
                return

    async def sample(world: WorldClient) -> None:
        while not done.is_set():
            views = await world.nodes()
            down = {n.id for n in views if n.maintenance_holder is not None or n.power != "up"}
            samples.count += 1
            samples.max_in_maintenance = max(
                samples.max_in_maintenance,
                sum(1 for n in views if n.maintenance_holder == campaign_id),
            )
            samples.max_rebooting = max(
                samples.max_rebooting, sum(1 for n in views if n.power != "up")
            )
            impacted: dict[str, int] = {}
            for n in views:
                if n.id in down:
                    for vm_id in n.vm_ids:
                        vnf_id = vnf_of_vm.get(vm_id)
                        if vnf_id is not None:
                            impacted[vnf_id] = impacted.get(vnf_id, 0) + 1
            for vnf_id, count in impacted.items():
                samples.most_impacted[vnf_id] = max(samples.most_impacted.get(vnf_id, 0), count)
            await asyncio.sleep(SAMPLE_S)

    wall_start = time.time()
    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.5)  # the follower is reading the topic before the request lands
    await publish_upgrade_request(settings, request)
    log(f"makespan: campaign {campaign_id} started, max_parallel {nodes}, speed {speed}")
    async with WorldClient(deployment.world_url) as world:
        sampler = asyncio.create_task(sample(world))
        try:
            await await_while_alive(
                follower,
                deployment.check_alive,
                timeout_s=timeout_s,
                timed_out=lambda: (
                    f"campaign {campaign_id} still "
                    f"{board.view(campaign_id).state} after {timeout_s:.0f} s"
                ),
            )
        finally:
            done.set()
            await asyncio.gather(sampler, return_exceptions=True)
        after = await world.snapshot()

    view = board.view(campaign_id)
    interruptions = [i for i in after.interruptions if i.started_at >= wall_start]
    by_kind: dict[str, int] = {}
    for item in interruptions:
        by_kind[item.kind] = by_kind.get(item.kind, 0) + 1
    over_budget = {
        vnf_id: count
        for vnf_id, count in samples.most_impacted.items()
        if vnf_id in vnfs and count > _tolerated(vnfs[vnf_id])
    }
    counts = view.to_json()["nodes"]
    first_claim = min((at for at, _, _ in steps), default=None)
    last_done = max((at for at, _, step in steps if step == "done"), default=None)
    makespan_wall = (last_done - first_claim).total_seconds() if first_claim and last_done else None
    campaign_wall = (
        (view.ended_at - view.started_at).total_seconds()
        if view.ended_at is not None and view.started_at is not None
        else None
    )
    return {
        "campaign_id": campaign_id,
        "state": view.state,
        "reason": view.reason,
        "speed": speed,
        "nodes": counts,
        "at_target_version": sum(1 for n in after.nodes if n.installed_version == version),
        "vms_before": len(before.vms),
        "vms_after": len(after.vms),
        "budget_violations": len(interruptions),
        "interruptions_by_kind": by_kind,
        "interruptions": [i.model_dump(mode="json") for i in interruptions[:20]],
        "live_planner_s": round(makespan_wall * speed, 2) if makespan_wall is not None else None,
        "live_wall_s": round(makespan_wall, 3) if makespan_wall is not None else None,
        "campaign_wall_s": round(campaign_wall, 3) if campaign_wall is not None else None,
        "live_max_in_maintenance": samples.max_in_maintenance,
        "live_max_in_cycle": max_concurrent_in_cycle(steps),
        "live_time_in_steps": time_in_steps(steps),
        "live_max_rebooting": samples.max_rebooting,
        "world_samples": samples.count,
        "sampled_budget_overlaps": over_budget,
    }


def _start_services(deployment: Any) -> None:
    from escalator.processes import python_module

    w = deployment.world_url
    spawn = deployment.group.spawn
    spawn(
        "upgrade-manager",
        python_module("services.upgrade_manager"),
        env={"ESCALATOR_UPGRADE_MANAGER_TICK_INTERVAL_S": str(LIVE_TICK_S)},
    )
    spawn("cloud-manager", python_module("services.cloud_manager", "--world", w))
    spawn("vnfm-adapter", python_module("services.vnfm_adapter"))
    for vnfm_id in deployment.vnfm_ids:
        spawn(
            f"reference-vnfm-{vnfm_id}",
            python_module(
                "services.vnfm_adapter.reference_vnfm", "--world", w, "--vnfm-id", vnfm_id
            ),
        )
    for name, argv in _node_agent_argvs(deployment.node_ids, w):
        spawn(name, argv)


def live_run(
    settings: Any,
    scenario: Path,
    run_dir: Path,
    *,
    speed: float = LIVE_SPEED,
    timeout_s: float = LIVE_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """World, services and reference VNFMs as processes, one campaign over every node, on the
    topics of `settings` (give them a prefix of their own)."""
    from escalator.demo import DemoOptions, Deployment
    from escalator.processes import python_module

    options = DemoOptions(speed=speed, timeout_s=timeout_s, run_dir=run_dir)
    deployment = Deployment.create(settings, options)
    try:
        match = deployment.group.spawn(
            "world",
            python_module(
                "escalator.world", "--port", "0", "--scenario", str(scenario), "--speed", str(speed)
            ),
            wait_for=r"world listening on (http://\S+)",
            timeout_s=120,
        )
        deployment.world_url = match.group(1)  # type: ignore[union-attr]
        result = asyncio.run(_live_campaign(deployment, speed, log, timeout_s))
    finally:
        deployment.stop()
    result["topic_prefix"] = settings.topic_prefix
    result["logs"] = str(deployment.group.log_dir)
    result["tick_interval_s"] = LIVE_TICK_S
    result["node_agent_processes"] = sum(
        1 for name in deployment.group.children if name.startswith("node-agent")
    )
    return result


# --- the section -------------------------------------------------------------------------------


def run(ctx: BenchContext) -> dict[str, Any]:
    """The `makespan` section: the forecast's numbers, then the live run's.

    With `ctx.quick` both run on the small tight scenario (12 nodes, one at a time) at a higher
    speed instead of the standard one, to exercise the code paths in well under a minute."""
    scenario, speed = (QUICK_SCENARIO, QUICK_SPEED) if ctx.quick else (SCENARIO, LIVE_SPEED)
    result = predict(scenario)
    per_cycle = overhead_per_cycle_s(ctx.results)
    result["overhead_per_cycle_s"] = per_cycle
    result["control_overhead_pct"] = control_overhead_pct(
        per_cycle, result["planner_batches"], result["planner_s"]
    )
    result["control_overhead_formula"] = "100 * overhead_per_cycle_s * planner_batches / planner_s"
    ctx.log(
        f"makespan: {result['scenario']['path']}: sequential {result['sequential_s']} s, planner "
        f"{result['planner_s']} s, lower bound {result['lower_bound_s']} s (forecast, world s)"
    )
    live = live_run(ctx.kafka_settings("makespan"), scenario, ctx.run_dir, speed=speed, log=ctx.log)
    result["live"] = live
    result["budget_violations"] = live["budget_violations"]
    result["live_planner_s"] = live["live_planner_s"]
    result["live_max_in_maintenance"] = live["live_max_in_maintenance"]
    return {"makespan": result}


def rows(result: dict[str, Any]) -> list[Row]:
    """The section's lines of the bench table."""

    def num(key: str, unit: str = "") -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:g}{unit}"

    live = result.get("live") or {}
    violations = result.get("budget_violations")
    overhead = result.get("control_overhead_pct")
    return [
        Row("makespan.scenario", f"{result['scenario']['path']} ({result['nodes']} nodes)"),
        Row("makespan.sequential_s (forecast)", num("sequential_s", " s")),
        Row("makespan.planner_s (forecast)", num("planner_s", " s")),
        Row("makespan.lower_bound_s", num("lower_bound_s", " s")),
        Row(
            "makespan.efficiency (lower bound / planner)",
            num("efficiency"),
            ">= 0.9",
            at_least(result.get("efficiency"), 0.9),
        ),
        Row(
            "makespan.speedup (sequential / planner)",
            num("speedup", "x"),
            ">= 8x",
            at_least(result.get("speedup"), 8.0),
        ),
        Row(
            "makespan.priority_order_planner_s (forecast, without the order search)",
            num("priority_order_planner_s", " s"),
        ),
        Row(
            "makespan.campaign_order_cpu_s (order search at campaign start)",
            num("campaign_order_cpu_s", " s"),
        ),
        Row(
            "makespan.budget_violations (world monitor, live)",
            "n/a" if violations is None else str(violations),
            "0",
            None if violations is None else violations == 0,
        ),
        Row(
            f"makespan.live_planner_s (world s, speed {live.get('speed', '?')})",
            num("live_planner_s", " s"),
        ),
        Row("makespan.live_max_in_maintenance", num("live_max_in_maintenance")),
        Row(
            "makespan.control_overhead_pct",
            num("control_overhead_pct", " %"),
            "< 1 %",
            None if overhead is None else overhead < 1.0,
        ),
    ]


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target
