"""The chaos suite's machinery: seeded scenarios, SIGKILLs at random moments, invariants, table.

A scenario (`make_scenario(seed, profile)`) is a pure function of its seed: the world (nodes,
failure domains, spare room), the campaign's `max_parallel`, and the kills. Each kill names the
services to SIGKILL together (one, or two or three "at once") and when: on a `step` trigger, a
random delay after the n-th node (counted from when the kill is armed) enters a given step of its
cycle; on an `overlap` trigger, a random delay after two nodes or more are in their cycle at once;
on a `timed` trigger, a random delay after the kill is armed. Kills are armed one after the
other: the first when the campaign starts, each next one when the previous one has been done. A
kill whose moment can no longer come (every node has started, and none can still enter the
step) fires at the next step any node enters instead. Every killed service is started again at
once with the same argv and environment; a node agent kill takes the agent of the node whose
step triggered it.

What a kill hit is measured, not assumed: after the run, the step of every node at the moment of
the kill is read from the campaign's own `NodeCycleAdvanced` events (the last one of each node
that occurred before the kill). A kill is counted under every step some node was in (several
nodes may be in their cycle at once), or under `pending` when the campaign was between nodes.

After every run (`check_invariants`), from the world's own records, never from Escalator's:

- `completed`: the campaign completed and every node runs the target version;
- `single_apply`: no node was upgraded twice: the world's reboot count per node and the outcome
  of each of its reboot records (sampled during the run; a record announces its outcome with
  `will_fail`) give the successful reboots into the target, at most one per node (a retry after
  a failed reboot is allowed; these runs inject no faults, so none should fail);
- `vms_intact`: the same VM ids before and after, each VM on exactly one node, none migrating;
- `maintenance_clear`: no node left in maintenance, every node's compute service as before;
- `no_interruption`: the world's service monitor logged no interruption (budget violation).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from e2e_harness import TARGET, CampaignStalled, E2EDeployment, fresh_deployment

from escalator.broker import BrokerHandle
from escalator.cli import build_upgrade_request, publish_upgrade_request
from escalator.demo import write_demo_manifest
from escalator.status import CampaignView
from escalator.world.client import WorldClient
from escalator.world.engine import plan_evacuation
from escalator.world.model import Node, Vm, WorldSnapshot, WorldState
from schemas.envelope import Event
from schemas.events import CampaignStarted, NodeCycleAdvanced, NodeStep, NodeUpgraded
from schemas.types import VnfmTimeoutPolicy

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / ".cache" / "chaos"

# `make chaos N=...` sets these; without RUNS_ENV the suite is not collected (see conftest.py).
RUNS_ENV = "ESCALATOR_CHAOS_RUNS"
FIRST_SEED_ENV = "ESCALATOR_CHAOS_FIRST_SEED"

UPGRADE_MANAGER = "upgrade-manager"
CLOUD_MANAGER = "cloud-manager"
VNFM_ADAPTER = "vnfm-adapter"
NODE_AGENT = "node-agent"  # resolved, at the kill, to the agent of a node (see `_resolve`)
SERVICES = (UPGRADE_MANAGER, CLOUD_MANAGER, VNFM_ADAPTER, NODE_AGENT)
SEVERAL = "several at once"
# Seed s kills TURNS[s % 5] first: consecutive seeds kill each service in turn.
TURNS: tuple[str, ...] = (*SERVICES, SEVERAL)

# The steps of a node's cycle a kill can land in; `pending`: the campaign was between nodes.
STATES = (
    NodeStep.CLAIMING,
    NodeStep.NOTIFYING,
    NodeStep.MIGRATING,
    NodeStep.UPGRADING,
    NodeStep.RELEASING,
)
PENDING = "pending"
STATE_COLUMNS = (*(s.value for s in STATES), PENDING)

# Longest random delay after a step trigger, per step: a fraction of how long the step lasts at
# speed 20 on a loaded machine (claiming and releasing take one round trip, 30-100 ms; a reboot
# 150 ms of world time plus the agent's polling), so the kill still usually lands in that step.
MAX_DELAY_S = {
    NodeStep.CLAIMING: 0.010,
    NodeStep.NOTIFYING: 0.030,
    NodeStep.MIGRATING: 0.020,
    NodeStep.UPGRADING: 0.120,
    NodeStep.RELEASING: 0.004,
}

INVARIANTS = (
    "completed",
    "single_apply",
    "vms_intact",
    "maintenance_clear",
    "no_interruption",
)


# --- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPlan:
    services: tuple[str, ...]
    trigger: str  # "step" or "timed"
    state: str | None  # step triggers: the step a node enters
    occurrence: int  # step triggers: the n-th (from 0) node entering it after arming
    delay_s: float


@dataclass(frozen=True)
class Scenario:
    seed: int
    profile: str
    nodes: int
    domains: int
    spare_fraction: float
    max_parallel: int
    speed: float
    kills: tuple[KillPlan, ...]
    # A canary (the first node alone) baking this long (0: no canary), and a kill aimed at the
    # bake, when the campaign runs with no node in its cycle (armed beside the others).
    canary_bake_s: float = 0.0
    bake_kill: KillPlan | None = None

    @property
    def world(self) -> str:
        canary = " canary" if self.canary_bake_s else ""
        return f"{self.nodes}n/{self.domains}d/spare {self.spare_fraction}{canary}"


PROFILES = ("sample", "full")
# The seeds of the sample in `make test` (profile "sample"): the first kill of each aims at
# another service (UM, CM, VNFM adapter, a node agent, several at once) and another step.
SAMPLE_SEEDS = (0, 1, 2, 3, 4)


def make_scenario(seed: int, profile: str = "full") -> Scenario:
    """The scenario of `seed`. `sample` (in `make test`): small worlds, one or two kills;
    `full` (`make chaos`): up to six nodes, two or three kills."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: one of {PROFILES}")
    rng = random.Random(f"chaos-{seed}")
    max_parallel = rng.choice((1, 2, 2, 3))
    if profile == "sample":
        nodes = 4  # each node is an agent process to start: the sample is kept short
        kill_count = rng.choice((1, 2))
    else:
        # Parallel runs get the larger worlds: with few nodes nearly every pair of nodes shares
        # a VNF, and the planner runs them one at a time whatever max_parallel says.
        nodes = rng.choice((5, 6, 6)) if max_parallel >= 2 else rng.choice((4, 5))
        kill_count = rng.choice((2, 3))
    domains = 3 if nodes >= 6 else rng.choice((2, 3))
    # Room for several nodes' VMs at once: the planner starts only nodes whose VMs all fit
    # elsewhere.
    spare = rng.choice((0.35, 0.4, 0.5))
    kills = []
    for k in range(kill_count):
        turn = TURNS[seed % len(TURNS)] if k == 0 else rng.choice(TURNS)
        if turn == SEVERAL:
            services = tuple(sorted(rng.sample(SERVICES, rng.choice((2, 3)))))
        else:
            services = (turn,)
        # The first kill of seed s aims at step (s + s // 5) % 5: over 25 consecutive seeds every
        # service is aimed at every step once. In parallel runs the second one mostly aims at a
        # moment when several nodes are in their cycle; later kills aim at some step, or at a
        # random moment.
        if k == 1 and profile == "full" and max_parallel >= 2 and rng.random() < 0.7:
            kills.append(KillPlan(services, "overlap", None, 0, round(rng.uniform(0, 0.03), 4)))
        elif k == 0 or rng.random() < 0.7:
            state = STATES[(seed + seed // len(TURNS) + 2 * k) % len(STATES)]
            kills.append(
                KillPlan(
                    services,
                    "step",
                    state.value,
                    # Few nodes have VMs to migrate (most move with their VNFMs): the first.
                    rng.choice((0, 0, 1)) if k == 0 and state is not NodeStep.MIGRATING else 0,
                    round(rng.uniform(0.0, MAX_DELAY_S[state]), 4),
                )
            )
        else:
            kills.append(KillPlan(services, "timed", None, 0, round(rng.uniform(0.0, 1.0), 3)))
    bake, bake_kill = 0.0, None
    if profile == "full" and seed % 3 == 0:
        # Drawn after everything else, so that the other seeds' scenarios stay as they were.
        # The bake is the one moment a campaign runs with no node in its cycle.
        bake = CANARY_BAKE_S
        turn = rng.choice(TURNS)
        services = (
            tuple(sorted(rng.sample(SERVICES, rng.choice((2, 3))))) if turn == SEVERAL else (turn,)
        )
        delay = round(rng.uniform(0.1, 0.8 * CANARY_BAKE_S), 3)
        bake_kill = KillPlan(services, "pending", PENDING, 0, delay)
    return Scenario(
        seed=seed,
        profile=profile,
        nodes=nodes,
        domains=domains,
        spare_fraction=spare,
        max_parallel=max_parallel,
        speed=20.0,
        kills=tuple(kills),
        canary_bake_s=bake,
        bake_kill=bake_kill,
    )


CANARY_BAKE_S = 1.5


# --- results ----------------------------------------------------------------------------------


@dataclass
class KillRecord:
    plan: KillPlan
    killed: list[str]
    at: str  # ISO time of the first SIGKILL
    after_start_s: float
    trigger_node: str | None
    # Step triggers: the kill's time minus the trigger event's `occurred_at` minus the planned
    # delay (ms), i.e. how late the harness's follower saw the step begin.
    trigger_lag_ms: float | None = None
    # Measured afterwards from the campaign's events: node -> step at the moment of the kill.
    steps: dict[str, str] = field(default_factory=dict)
    # What the harness's own view of the campaigns topic showed when it killed.
    seen: dict[str, str] = field(default_factory=dict)

    @property
    def states(self) -> list[str]:
        """The cycle steps in progress at the kill, or ["pending"] between nodes."""
        in_cycle = sorted({s for s in self.steps.values() if s in _CYCLE_VALUES}, key=_order)
        return in_cycle or [PENDING]

    @property
    def services(self) -> list[str]:
        return sorted({NODE_AGENT if n.startswith(NODE_AGENT) else n for n in self.killed})

    def label(self) -> str:
        what = "+".join(
            NODE_AGENT if n.startswith(NODE_AGENT) else _short(n) for n in sorted(self.killed)
        )
        return f"{what}@{'/'.join(self.states)}"


_CYCLE_VALUES = {s.value for s in STATES}


def _order(state: str) -> int:
    return STATE_COLUMNS.index(state) if state in STATE_COLUMNS else len(STATE_COLUMNS)


def _short(name: str) -> str:
    return {UPGRADE_MANAGER: "UM", CLOUD_MANAGER: "CM", VNFM_ADAPTER: "VA"}.get(name, name)


@dataclass
class Check:
    ok: bool
    detail: str = ""


@dataclass
class RunResult:
    scenario: Scenario
    campaign_id: str = ""
    duration_s: float = 0.0
    kills: list[KillRecord] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)
    reboots: dict[str, int] = field(default_factory=dict)
    error: str = ""
    logs: str = ""
    # Seconds spent per phase: prepare (world, services, heartbeats), campaign, checks, stop.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error and all(self.checks.get(n, Check(False)).ok for n in INVARIANTS)

    @property
    def kills_missed(self) -> int:
        planned = len(self.scenario.kills) + (self.scenario.bake_kill is not None)
        return planned - len(self.kills)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.scenario.seed,
            "ok": self.ok,
            "scenario": asdict(self.scenario),
            "campaign_id": self.campaign_id,
            "duration_s": round(self.duration_s, 2),
            "kills": [
                {
                    **asdict(k),
                    "services": k.services,
                    "states": k.states,
                }
                for k in self.kills
            ],
            "kills_missed": self.kills_missed,
            "invariants": {n: asdict(c) for n, c in self.checks.items()},
            "reboots": self.reboots,
            "error": self.error,
            "phases_s": self.phases,
            "logs": self.logs,
        }


# --- one run ----------------------------------------------------------------------------------


class Killer:
    """Arms the scenario's kills one after the other and does them (on the event loop's thread,
    which spawned the children: they die with the thread that started them)."""

    def __init__(self, d: E2EDeployment, scenario: Scenario) -> None:
        self.d = d
        self.plans = list(scenario.kills)
        self.bake_plan = scenario.bake_kill
        self.bake_scheduled: asyncio.TimerHandle | None = None
        self.rng = random.Random(f"chaos-kill-{scenario.seed}")
        self.done: list[KillRecord] = []
        self.view: CampaignView | None = None
        self.started_at: float | None = None
        self.seen_pairs: set[tuple[str, str]] = set()
        self.count = 0  # occurrences of the armed step since it was armed
        self.scheduled: asyncio.TimerHandle | None = None
        self.trigger_occurred_at: datetime | None = None

    @property
    def armed(self) -> KillPlan | None:
        return self.plans[0] if self.plans and self.scheduled is None else None

    def on_event(self, event: Event, view: CampaignView) -> None:
        self.view = view
        if isinstance(event, CampaignStarted) and self.started_at is None:
            self.started_at = time.monotonic()
            self._arm()
            return
        if not isinstance(event, NodeCycleAdvanced):
            return
        pair = (event.node_id, event.step.value)
        if pair in self.seen_pairs:
            return  # a restarted manager repeats the step it was in
        self.seen_pairs.add(pair)
        self._maybe_bake_kill(event, view)
        plan = self.armed
        if plan is None or plan.trigger == "timed" or event.step.value not in _CYCLE_VALUES:
            return
        if self._last_chance(plan, view):
            pass  # the aimed moment cannot come any more: this step of this node it is
        elif plan.trigger == "overlap":
            if len(view.in_cycle) < 2:
                return
        elif event.step.value != plan.state:
            return
        elif event.detail.startswith("nothing to"):
            return  # a step passed through in the same decision: no moment to kill in
        elif self.count < plan.occurrence:
            self.count += 1
            return
        self.trigger_occurred_at = event.occurred_at
        self._schedule(plan, event.node_id)

    @staticmethod
    def _last_chance(plan: KillPlan, view: CampaignView) -> bool:
        """Whether no node can bring the kill's aimed moment any more: every node has started
        its cycle and, for a step kill, every node in its cycle is past that step."""
        nodes = list(view.nodes.values())
        if not nodes or any(n.step is NodeStep.PENDING for n in nodes):
            return False
        if plan.trigger != "step":
            return True
        aimed = STATE_COLUMNS.index(plan.state or "")
        return all(n.step.finished or _order(n.step.value) > aimed for n in nodes)

    def _arm(self) -> None:
        self.count = 0
        plan = self.armed
        if plan is not None and plan.trigger == "timed":
            self._schedule(plan, None)

    def _schedule(self, plan: KillPlan, node_id: str | None) -> None:
        loop = asyncio.get_running_loop()
        self.scheduled = loop.call_later(plan.delay_s, self._fire, plan, node_id)

    def _maybe_bake_kill(self, event: NodeCycleAdvanced, view: CampaignView) -> None:
        """The bake kill: once a node has finished, none is in its cycle and some wait."""
        plan = self.bake_plan
        if plan is None or self.bake_scheduled is not None or not event.step.finished:
            return
        nodes = list(view.nodes.values())
        if view.in_cycle or not any(n.step is NodeStep.PENDING for n in nodes):
            return
        loop = asyncio.get_running_loop()
        self.bake_scheduled = loop.call_later(plan.delay_s, self._kill, plan, None)

    def _fire(self, plan: KillPlan, node_id: str | None) -> None:
        self._kill(plan, node_id)
        self.plans.pop(0)
        self.scheduled = None
        self._arm()

    def _kill(self, plan: KillPlan, node_id: str | None) -> None:
        names = [self._resolve(s, node_id) for s in plan.services]
        view = self.view
        seen = {n.node_id: n.step.value for n in view.nodes.values()} if view else {}
        at = datetime.now(UTC)
        for name in names:
            self.d.group.kill(name)
        for name in names:
            self.d.group.restart(name)
        started = self.started_at or time.monotonic()
        self.done.append(
            KillRecord(
                plan=plan,
                killed=names,
                at=at.isoformat(),
                after_start_s=round(time.monotonic() - started, 3),
                trigger_node=node_id,
                trigger_lag_ms=(
                    round(
                        (at - self.trigger_occurred_at).total_seconds() * 1000 - plan.delay_s * 1000
                    )
                    if node_id is not None and self.trigger_occurred_at is not None
                    else None
                ),
                seen=seen,
            )
        )

    def _resolve(self, service: str, node_id: str | None) -> str:
        if service != NODE_AGENT:
            return service
        if node_id is None:
            # A timed kill: the agent of a node in its cycle if there is one.
            view = self.view
            in_cycle = sorted(n.node_id for n in view.in_cycle) if view else []
            node_id = self.rng.choice(in_cycle or self.d.node_ids)
        return f"{NODE_AGENT}-{node_id}"

    def cancel(self) -> None:
        for handle in (self.scheduled, self.bake_scheduled):
            if handle is not None:
                handle.cancel()


class _RebootSampler:
    """Every reboot record the world shows, sampled every `interval_s`: (node, sequence) ->
    (failed, target_version, previous_version). The world keeps only a node's latest record, but
    a record tells its outcome from the start (`will_fail`), so one sample of it is enough."""

    def __init__(self, world_url: str, interval_s: float = 0.1) -> None:
        self.world_url = world_url
        self.interval_s = interval_s
        self.records: dict[tuple[str, int], tuple[bool, str | None, str]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with WorldClient(self.world_url) as world:
            while True:
                try:
                    self.note(await world.nodes())
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass  # a sample lost under load; the next one comes
                await asyncio.sleep(self.interval_s)

    def note(self, nodes: Iterable[Any]) -> None:
        for node in nodes:
            r = node.reboot
            if r is not None:
                self.records[(node.id, r.sequence)] = (
                    r.will_fail or r.state == "failed",
                    r.target_version,
                    r.previous_version,
                )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def stall_timeout_s(scenario: Scenario) -> float:
    """A campaign of these small worlds takes 2-5 s at speed 20, a restarted consumer a few more
    (its group's session, 3 s, must expire): one not over after this long is stuck."""
    return 60.0 + 20.0 * (len(scenario.kills) + (scenario.bake_kill is not None))


async def run_scenario(
    broker: BrokerHandle,
    scenario: Scenario,
    run_dir: Path,
    *,
    extra_env: dict[str, dict[str, str]] | None = None,
) -> RunResult:
    """Deploy a fresh world and services, run one campaign under the scenario's kills, check.
    `extra_env` (role -> variables) is for negative controls: a broken service must fail."""
    result = RunResult(scenario)
    started = mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        result.phases[name] = round(now - mark, 2)
        mark = now

    d = fresh_deployment(
        broker,
        run_dir,
        nodes=scenario.nodes,
        domains=scenario.domains,
        seed=scenario.seed,
        speed=scenario.speed,
        spare_fraction=scenario.spare_fraction,
        max_parallel=scenario.max_parallel,
        extra_env=extra_env or {},
    )
    result.logs = str(d.group.log_dir)
    killer = Killer(d, scenario)
    sampler = _RebootSampler(d.world_url)
    try:
        before = await d.prepare()
        phase("prepare")
        sampler.start()
        campaign_id = f"cmp-chaos-{scenario.seed}-{uuid.uuid4().hex[:8]}"
        result.campaign_id = campaign_id
        view = await _campaign_under_kills(d, scenario, campaign_id, killer, result)
        phase("campaign")
        after = await d.snapshot()
        if result.error:
            result.error += diagnose_stall(view, after)
        await sampler.stop()
        sampler.note(after.nodes)
        events = await d.campaign_events(campaign_id)
        with (run_dir / "events.jsonl").open("w") as out:  # the evidence, for a failed run
            for event in events:
                out.write(event.model_dump_json() + "\n")
        result.kills = killer.done
        attribute_kills(result.kills, events)
        result.checks = check_invariants(view, before, after, sampler.records, events)
        result.reboots = {n.id: n.reboot_count for n in after.nodes}
        phase("checks")
    except Exception as exc:  # a run that could not be carried out is a failed run, reported
        result.error = result.error or f"{type(exc).__name__}: {str(exc)[:2000]}"
        result.kills = killer.done
    finally:
        await sampler.stop()
        teardown(d)
        phase("stop")
        result.duration_s = time.monotonic() - started
        (run_dir / "chaos-run.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


async def _campaign_under_kills(
    d: E2EDeployment, scenario: Scenario, campaign_id: str, killer: Killer, result: RunResult
) -> CampaignView:
    # Follow first: a follower that began after the campaign would see its first steps late,
    # in a burst, and aim its kills late.
    following = asyncio.create_task(
        d.follow_campaign(
            campaign_id, on_event=killer.on_event, timeout_s=stall_timeout_s(scenario)
        )
    )
    try:
        await asyncio.sleep(0.3)
        await start_campaign(d, campaign_id, scenario.max_parallel, scenario.canary_bake_s)
        return await following
    except CampaignStalled as stalled:
        steps = {n.node_id: n.step.value for n in stalled.view.nodes.values()}
        result.error = f"campaign still {stalled.view.state} {steps} after the stall timeout"
        return stalled.view
    finally:
        killer.cancel()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


async def start_campaign(
    d: E2EDeployment, campaign_id: str, max_parallel: int, canary_bake_s: float = 0.0
) -> None:
    """What `escalator upgrade start` does, in this process (the CLI's own functions): the
    e2e tests prove the CLI path; here it would only cost a Python start per run."""
    o = d.opts
    request = build_upgrade_request(
        version=o.version,
        manifest=write_demo_manifest(o.run_dir, o.version),
        artifacts=[],
        repo_url=None,
        nodes=[],
        max_parallel=max_parallel,
        vnfm_timeout=o.vnfm_timeout_s,
        on_vnfm_timeout=VnfmTimeoutPolicy.MIGRATE,
        campaign_id=campaign_id,
        requested_by="chaos",
        policy_extra=(
            {"canary_nodes": 1, "canary_bake_s": canary_bake_s} if canary_bake_s > 0 else None
        ),
    )
    await publish_upgrade_request(d.settings, request)


def diagnose_stall(view: CampaignView, after: WorldSnapshot) -> str:
    """What the nodes still pending wait for (the manager's own words), and whether the world,
    with its own greedy evacuation plan, has room for each: a capacity blocker on a node the
    world can evacuate is the planner's mistake, not the cloud's."""
    pending = [n for n in view.nodes.values() if n.step is NodeStep.PENDING]
    if not pending:
        return ""
    state = WorldState(
        nodes={
            n.id: Node.model_validate(n.model_dump(include=set(Node.model_fields)))
            for n in after.nodes
        },
        vms={
            v.id: Vm.model_validate(v.model_dump(include=set(Vm.model_fields))) for v in after.vms
        },
    )
    parts = []
    for node in pending:
        room = plan_evacuation(state, node.node_id) is not None
        parts.append(
            f"{node.node_id}: {node.detail or 'no reason given'} "
            f"[world: {'evacuable' if room else 'NOT evacuable'}]"
        )
    return "; pending: " + "; ".join(parts)


def teardown(d: E2EDeployment) -> None:
    """SIGKILL every process of the run: its topics and world are its own and thrown away, so
    there is nothing to shut down cleanly (2-3 s saved per run over `Deployment.stop`)."""
    for name in list(d.group.children):
        d.group.kill(name)


def attribute_kills(kills: Sequence[KillRecord], events: Sequence[Event]) -> None:
    """Each node's step at each kill: its last `NodeCycleAdvanced` that occurred before it."""
    advances = [e for e in events if isinstance(e, NodeCycleAdvanced)]
    for kill in kills:
        at = datetime.fromisoformat(kill.at)
        steps: dict[str, str] = {}
        for e in advances:
            if e.occurred_at <= at:
                steps[e.node_id] = e.step.value
        kill.steps = steps


# --- invariants -------------------------------------------------------------------------------


def check_invariants(
    view: CampaignView | None,
    before: WorldSnapshot,
    after: WorldSnapshot,
    reboot_records: dict[tuple[str, int], tuple[bool, str | None, str]],
    events: Sequence[Event],
) -> dict[str, Check]:
    checks: dict[str, Check] = {}

    # completed: the campaign's end, and the world's versions.
    state = view.state if view is not None else "unknown"
    not_done = sorted(
        f"{n.node_id}:{n.step.value}"
        for n in (view.nodes.values() if view else [])
        if n.step is not NodeStep.DONE
    )
    behind = sorted(n.id for n in after.nodes if n.installed_version != TARGET)
    checks["completed"] = Check(
        state == "completed" and not not_done and not behind,
        ""
        if state == "completed" and not not_done and not behind
        else f"campaign {state} ({view.reason if view else ''}); nodes not done {not_done}; "
        f"not at {TARGET}: {behind}",
    )

    # single_apply: successful reboots into the target per node, from the world's records.
    problems = []
    for node in after.nodes:
        failed = unknown = applied = 0
        for seq in range(1, node.reboot_count + 1):
            record = reboot_records.get((node.id, seq))
            if record is None:
                unknown += 1  # never sampled: with no fault injected, it succeeded
            elif record[0]:
                failed += 1
            elif record[1] == TARGET:
                applied += 1
        if before_faults(before, node.id) == 0:
            applied += unknown
        if applied > 1:
            problems.append(
                f"{node.id}: {applied} successful reboots into {TARGET} "
                f"(reboot_count {node.reboot_count}, {failed} failed)"
            )
    reported = Counter(e.node_id for e in events if isinstance(e, NodeUpgraded) and e.applied)
    twice = {n: c for n, c in reported.items() if c > 1}
    detail = "; ".join(problems)
    if twice:  # the agents' own reports, for the record: the world's count decides
        detail += f"{'; ' if detail else ''}NodeUpgraded(applied) reported {twice}"
    checks["single_apply"] = Check(not problems, detail)

    # vms_intact: same ids, each on exactly one node, none still migrating.
    ids_before = sorted(vm.id for vm in before.vms)
    ids_after = [vm.id for vm in after.vms]
    hosted = Counter(vm_id for n in after.nodes for vm_id in n.vm_ids)
    problems = []
    lost = sorted(set(ids_before) - set(ids_after))
    new = sorted(set(ids_after) - set(ids_before))
    if lost or new:
        problems.append(f"lost {lost}, new {new}")
    dup = sorted(v for v, c in Counter(ids_after).items() if c > 1)
    if dup:
        problems.append(f"listed twice {dup}")
    wrong = sorted(
        vm.id for vm in after.vms if hosted.get(vm.id) != 1 or vm.id not in _vm_ids_of(after, vm)
    )
    if wrong:
        problems.append(f"not on exactly one node {wrong}")
    moving = sorted(vm.id for vm in after.vms if vm.status != "active")
    if moving:
        problems.append(f"still migrating {moving}")
    checks["vms_intact"] = Check(not problems, "; ".join(problems))

    # maintenance_clear: no holder left, compute services as before.
    held = sorted(f"{n.id}({n.maintenance_holder})" for n in after.nodes if n.maintenance_holder)
    status_before = {n.id: n.service_status for n in before.nodes}
    changed = sorted(
        f"{n.id}:{n.service_status}"
        for n in after.nodes
        if n.service_status != status_before.get(n.id)
    )
    checks["maintenance_clear"] = Check(
        not held and not changed,
        "" if not held and not changed else f"in maintenance {held}; service status {changed}",
    )

    # no_interruption: the world's monitor; a fresh world per run, so any entry counts.
    checks["no_interruption"] = Check(
        not after.interruptions,
        "; ".join(f"{i.vnf_id} {i.kind}: {i.reason}" for i in after.interruptions[:5]),
    )
    return checks


def before_faults(before: WorldSnapshot, node_id: str) -> int:
    return next((n.fail_next_upgrades for n in before.nodes if n.id == node_id), 0)


def _vm_ids_of(snapshot: WorldSnapshot, vm: Any) -> list[str]:
    return next((n.vm_ids for n in snapshot.nodes if n.id == vm.node_id), [])


# --- the table --------------------------------------------------------------------------------


def summary(results: Sequence[RunResult]) -> dict[str, Any]:
    by_service: Counter[str] = Counter()
    by_state: Counter[str] = Counter()
    several = nodes_in_cycle = 0
    for r in results:
        for k in r.kills:
            for s in k.services:
                by_service[s] += 1
            if len(k.killed) > 1:
                several += 1
            if sum(1 for step in k.steps.values() if step in _CYCLE_VALUES) > 1:
                nodes_in_cycle += 1
            for s in k.states:
                by_state[s] += 1
    return {
        "runs": len(results),
        "passed": sum(1 for r in results if r.ok),
        "failed": [r.scenario.seed for r in results if not r.ok],
        "kills": sum(len(r.kills) for r in results),
        "kills_missed": sum(r.kills_missed for r in results),
        "kills_by_service": {s: by_service[s] for s in SERVICES},
        "kills_of_several_at_once": several,
        "kills_by_state": {s: by_state[s] for s in STATE_COLUMNS},
        "kills_with_several_nodes_in_cycle": nodes_in_cycle,
        "max_parallel_2_or_more": sum(1 for r in results if r.scenario.max_parallel >= 2),
        "uncovered_states": [s.value for s in STATES if by_state[s.value] == 0],
        "uncovered_services": [s for s in SERVICES if by_service[s] == 0],
    }


def render_table(results: Sequence[RunResult], title: str = "chaos") -> str:
    mark = {True: "ok", False: "BROKEN"}
    head = ["seed", "world", "par", "kills (service@steps in progress)", *INVARIANTS, "time"]
    rows = []
    for r in results:
        checks = [
            mark[r.checks[n].ok] if n in r.checks else ("-" if r.error else "?") for n in INVARIANTS
        ]
        kills = ", ".join(k.label() for k in r.kills) or "-"
        if r.kills_missed:
            kills += f" (+{r.kills_missed} not done: campaign over first)"
        rows.append(
            [
                str(r.scenario.seed),
                r.scenario.world,
                str(r.scenario.max_parallel),
                kills,
                *checks,
                f"{r.duration_s:.0f}s",
            ]
        )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    lines = [f"== {title}: {len(results)} run(s) =="]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    s = summary(results)
    lines.append("")
    lines.append(
        f"runs {s['runs']}, all invariants held in {s['passed']}"
        + (f", BROKEN in seeds {s['failed']}" if s["failed"] else "")
        + f"; runs with max_parallel >= 2: {s['max_parallel_2_or_more']}"
    )
    lines.append(
        "kills by service: "
        + ", ".join(f"{k} {v}" for k, v in s["kills_by_service"].items())
        + f"; kills of several at once: {s['kills_of_several_at_once']}"
        + f"; kills done {s['kills']}, not done {s['kills_missed']}"
    )
    lines.append(
        "kills by node-cycle step in progress: "
        + ", ".join(f"{k} {v}" for k, v in s["kills_by_state"].items())
        + f"; kills with several nodes in their cycle: {s['kills_with_several_nodes_in_cycle']}"
    )
    for r in results:
        if r.ok:
            continue
        lines.append(f"seed {r.scenario.seed} BROKEN (logs {r.logs}):")
        if r.error:
            lines.append(f"  error: {r.error.splitlines()[0][:900]}")
        for n in INVARIANTS:
            c = r.checks.get(n)
            if c is not None and not c.ok:
                lines.append(f"  {n}: {c.detail[:400]}")
    return "\n".join(lines)


def write_report(results: Sequence[RunResult], name: str) -> Path:
    """JSON under .cache/chaos/: `<name>-<time>.json`, and `<name>-latest.json` as a copy."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report = {
        "generated_at": datetime.now(UTC).isoformat(),
        "summary": summary(results),
        "runs": [r.to_json() for r in results],
        "table": render_table(results, name).splitlines(),
    }
    text = json.dumps(report, indent=2) + "\n"
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(text)
    (RESULTS_DIR / f"{name}-latest.json").write_text(text)
    return path


def chaos_seeds() -> list[int]:
    """The seeds of `make chaos`: $ESCALATOR_CHAOS_RUNS of them from $ESCALATOR_CHAOS_FIRST_SEED."""
    runs = int(os.environ.get(RUNS_ENV, "0") or 0)
    first = int(os.environ.get(FIRST_SEED_ENV, "1") or 1)
    return list(range(first, first + runs))
