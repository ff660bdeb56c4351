"""Properties of the batch planner over random clouds and constraint sets (hypothesis).

Every `plan_step` is checked by an independent checker (`violations`), on its own and at every
decision of a whole `forecast` run:

- no VNF over its budget: its members on unavailable hosts (in maintenance, in their cycle, or
  started now) stay within what it tolerates;
- no failure domain over max_per_failure_domain, no more than max_parallel in the cycle;
- the placement covers every VM of every node started and of every node already in its cycle,
  on hosts that are known, in service (not in maintenance, not in their cycle, not started now),
  with room for all of them at once (vCPUs and RAM, counting the VMs already there), and with
  anti-affinity kept (no member placed on a host that has a member of its VNF, no two members
  placed on one host);
- min_recovery_s, the window, the canary and its bake, the failure budget are respected;
- every node passed over while slots remained names a blocker that holds, checked against the
  nodes in their cycle plus the nodes started before it in the same step.

"A blocked node never prevents a later candidate from starting", precisely: the nodes the planner
starts and their placement are the same whether or not the candidates it did not start are in
the list. Passing over a node leaves the step exactly as it was (no slot, no budget, no room
taken), so whatever follows is decided as if the node had not been there. And while slots
remain, every candidate not started has a blocker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import services.upgrade_manager.domain.forecast as forecast_module
from services.upgrade_manager.domain.forecast import StepDurations, forecast
from services.upgrade_manager.domain.planner import (
    Blocker,
    Cloud,
    Host,
    Limits,
    PlanStep,
    Progress,
    VmLoad,
    VnfRule,
    plan_step,
)

pytestmark = pytest.mark.unit

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class World:
    cloud: Cloud
    rules: dict[str, VnfRule]
    limits: Limits
    progress: Progress
    candidates: list[str]


def tolerated(rule: VnfRule) -> int:
    return max(0, min(rule.max_unavailable, rule.members - rule.min_in_service))


@st.composite
def worlds(draw: st.DrawFn, *, fresh: bool = False) -> World:
    """A cloud, VNF rules, campaign limits and progress. `fresh`: nothing started yet."""
    count = draw(st.integers(2, 9))
    names = [f"h{i}" for i in range(count)]
    domains = draw(st.integers(1, 3))
    vms: dict[str, list[VmLoad]] = {n: [] for n in names}
    rules: dict[str, VnfRule] = {}
    serial = 0
    for v in range(draw(st.integers(0, 4))):
        size = draw(st.integers(2, min(4, count)))
        hosts = draw(st.permutations(names))[:size]
        if draw(st.integers(0, 9)) == 0:
            hosts = [hosts[0], *hosts[:-1]]  # two members on one host, now and then
        vnf_id = f"v{v}"
        for n in hosts:
            vms[n].append(VmLoad(f"m{serial}", vnf_id, draw(st.integers(1, 3)), 1024))
            serial += 1
        active_standby = draw(st.booleans())
        rules[vnf_id] = VnfRule(
            vnf_id,
            size,
            1 if active_standby else draw(st.integers(1, size)),
            1 if active_standby else draw(st.integers(0, size - 1)),
            draw(st.sampled_from([0.0, 0.0, 5.0, 60.0])),
            draw(st.booleans()),
        )
    for _ in range(draw(st.integers(0, 5))):
        n = draw(st.sampled_from(names))
        loose = draw(st.sampled_from([None, None, "unregistered"]))
        vms[n].append(VmLoad(f"m{serial}", loose, draw(st.integers(1, 4)), 2048))
        serial += 1
    inventory: list[Host] = []
    for i, n in enumerate(names):
        used = sum(vm.vcpus for vm in vms[n])
        ram = sum(vm.ram_mb for vm in vms[n])
        inventory.append(
            Host.of(
                n,
                f"fd{i % domains}",
                used + draw(st.integers(0, 8)),
                ram + 1024 * draw(st.integers(0, 6)),
                vms[n],
                in_maintenance=draw(st.integers(0, 14)) == 0,
            )
        )
    cloud = Cloud(inventory)
    serviceable = [n for n in names if not cloud.hosts[n].in_maintenance]
    in_cycle: frozenset[str] = frozenset()
    started = failed = 0
    canary_finished_at = None
    released: dict[str, datetime] = {}
    canary = draw(st.sampled_from([0, 0, 0, 1, 2]))
    if not fresh:
        if serviceable:
            in_cycle = frozenset(draw(st.lists(st.sampled_from(serviceable), max_size=3)))
        started = len(in_cycle) + draw(st.integers(0, 3))
        failed = draw(st.sampled_from([0, 0, 0, 1, 2]))
        if canary and started >= canary and draw(st.integers(0, 3)):
            canary_finished_at = NOW - timedelta(seconds=draw(st.integers(0, 900)))
        for n in draw(st.lists(st.sampled_from(names), max_size=3)):
            if n not in in_cycle:
                released[n] = NOW - timedelta(seconds=draw(st.integers(0, 90)))
    window = draw(st.sampled_from(["none"] * 8 + ["open", "not yet", "closed"]))
    window_start = window_end = None
    if window == "open":
        window_start, window_end = NOW - timedelta(hours=1), NOW + timedelta(hours=1)
    elif window == "not yet":
        window_start, window_end = NOW + timedelta(minutes=5), NOW + timedelta(hours=1)
    elif window == "closed":
        window_start, window_end = NOW - timedelta(hours=2), NOW - timedelta(hours=1)
    limits = Limits(
        max_parallel=max(1, len(in_cycle) + draw(st.integers(-1, 4))),
        max_per_failure_domain=draw(st.sampled_from([None, None, 1, 2])),
        canary_nodes=canary,
        canary_bake_s=float(draw(st.sampled_from([0, 30, 600]))) if canary else 0.0,
        window_start=window_start,
        window_end=window_end,
        failure_budget=draw(st.sampled_from([None, None, None, 2, 3])),
    )
    pending = [n for n in names if n not in in_cycle]
    candidates = draw(st.permutations(pending))
    if draw(st.integers(0, 9)) == 0:
        candidates = [*candidates, "ghost"]  # a node the inventory does not know
    progress = Progress(in_cycle, started, failed, canary_finished_at, released)
    return World(cloud, rules, limits, progress, list(candidates))


# --- the independent checker -------------------------------------------------------------------


def violations(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    progress: Progress,
    candidates: Sequence[str],
    now: datetime,
    step: PlanStep,
) -> list[str]:
    """Every constraint `step` breaks, as readable lines (empty: none)."""
    bad: list[str] = []
    start = list(step.start)
    if len(set(start)) != len(start):
        bad.append(f"a node started twice: {start}")
    positions = {n: i for i, n in reversed(list(enumerate(candidates)))}
    if any(n not in positions for n in start):
        bad.append(f"started a non-candidate: {start}")
        return bad
    if [positions[n] for n in start] != sorted(positions[n] for n in start):
        bad.append(f"started out of order: {start}")
    held = {n for n, h in cloud.hosts.items() if h.in_maintenance}
    in_cycle = set(progress.in_cycle)
    down = held | in_cycle | set(start)
    if not start:
        return bad

    # campaign limits
    if len(in_cycle) + len(start) > limits.max_parallel:
        bad.append(f"max_parallel {limits.max_parallel}: {len(in_cycle)} + {len(start)}")
    if limits.failure_budget is not None and progress.failed >= limits.failure_budget:
        bad.append("started with the failure budget spent")
    if limits.window_start is not None and now < limits.window_start:
        bad.append("started before the window")
    if limits.window_end is not None and now >= limits.window_end:
        bad.append("started after the window")
    if limits.canary_nodes:
        if progress.started < limits.canary_nodes:
            if progress.started + len(start) > limits.canary_nodes:
                bad.append("more than the canary batch")
        else:
            finished = progress.canary_finished_at
            if finished is None:
                bad.append("started while the canary runs")
            elif now < finished + timedelta(seconds=limits.canary_bake_s):
                bad.append("started while the canary bakes")
    for n in start:
        host = cloud.hosts.get(n)
        if host is None or host.in_maintenance or n in in_cycle:
            bad.append(f"started {n}: unknown, in maintenance or already in its cycle")
    if bad:
        return bad
    if limits.max_per_failure_domain is not None:
        per_domain = Counter(cloud.hosts[n].failure_domain for n in in_cycle | set(start))
        for n in start:
            domain = cloud.hosts[n].failure_domain
            if per_domain[domain] > limits.max_per_failure_domain:
                bad.append(f"failure domain {domain}: {per_domain[domain]} in the cycle")

    # VNF budgets and recovery
    impacted: Counter[str] = Counter()
    for n in down:
        impacted.update(vm.vnf_id for vm in cloud.hosts[n].vms if vm.vnf_id is not None)
    for n in start:
        for vm in cloud.hosts[n].vms:
            rule = rules.get(vm.vnf_id) if vm.vnf_id is not None else None
            if rule is not None and impacted[rule.vnf_id] > tolerated(rule):
                bad.append(f"{rule.vnf_id}: {impacted[rule.vnf_id]} impacted > {tolerated(rule)}")
            if rule is not None and rule.min_recovery_s > 0:
                for other, at in progress.released_at.items():
                    carries = other in cloud.hosts and any(
                        o.vnf_id == rule.vnf_id for o in cloud.hosts[other].vms
                    )
                    if carries and now < at + timedelta(seconds=rule.min_recovery_s):
                        bad.append(f"{n} starts while {rule.vnf_id} recovers from {other}")

    # capacity, exactly, and anti-affinity
    placements = step.placements
    arriving: dict[str, list[VmLoad]] = {}
    for n in sorted(in_cycle | set(start)):
        for vm in cloud.hosts[n].vms:
            destination = placements.get(vm.vm_id)
            if destination is None:
                bad.append(f"VM {vm.vm_id} of {n} has no destination")
                continue
            target = cloud.hosts.get(destination)
            if target is None or destination in down:
                bad.append(f"VM {vm.vm_id} placed on {destination}, which is not in service")
                continue
            arriving.setdefault(destination, []).append(vm)
    for destination, landed in arriving.items():
        target = cloud.hosts[destination]
        vcpus = target.used_vcpus + sum(vm.vcpus for vm in landed)
        ram = target.used_ram_mb + sum(vm.ram_mb for vm in landed)
        if vcpus > target.vcpus or ram > target.ram_mb:
            bad.append(
                f"{destination} overcommitted: {vcpus}/{target.vcpus}, {ram}/{target.ram_mb}"
            )
        there = Counter(vm.vnf_id for vm in target.vms)
        placed = Counter(vm.vnf_id for vm in landed)
        for vnf_id, count in placed.items():
            rule = rules.get(vnf_id) if vnf_id is not None else None
            if rule is not None and rule.anti_affinity and (there[vnf_id] or count > 1):
                bad.append(f"anti-affinity of {vnf_id} broken on {destination}")
    return bad


def blocker_holds(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    progress: Progress,
    before: Sequence[str],
    node_id: str,
    now: datetime,
    reason: Blocker,
) -> bool:
    """Whether `reason` really holds for `node_id`, with the nodes in `before` started first.
    Capacity is taken on trust here (placement is a heuristic): see the differential test."""
    host = cloud.hosts.get(node_id)
    in_cycle = set(progress.in_cycle) | set(before)
    held = {n for n, h in cloud.hosts.items() if h.in_maintenance}
    if reason is Blocker.NO_INVENTORY:
        return host is None
    if reason is Blocker.IN_MAINTENANCE:
        return host is not None and (host.in_maintenance or node_id in in_cycle)
    if reason is Blocker.MAX_PARALLEL:
        slots = limits.max_parallel - len(in_cycle)
        if limits.canary_nodes and progress.started < limits.canary_nodes:
            slots = min(slots, limits.canary_nodes - progress.started - len(before))
        return slots <= 0
    if reason is Blocker.FAILURE_BUDGET:
        return limits.failure_budget is not None and progress.failed >= limits.failure_budget
    if reason is Blocker.WINDOW:
        return (limits.window_start is not None and now < limits.window_start) or (
            limits.window_end is not None and now >= limits.window_end
        )
    if reason is Blocker.CANARY:
        return bool(limits.canary_nodes) and progress.started >= limits.canary_nodes
    assert host is not None
    if reason is Blocker.FAILURE_DOMAIN:
        per_domain = Counter(cloud.hosts[n].failure_domain for n in in_cycle if n in cloud.hosts)
        cap = limits.max_per_failure_domain
        return cap is not None and per_domain[host.failure_domain] >= cap
    if reason is Blocker.VNF_BUDGET:
        impacted: Counter[str] = Counter()
        for n in (in_cycle | held) & set(cloud.hosts):
            impacted.update(vm.vnf_id for vm in cloud.hosts[n].vms if vm.vnf_id)
        here = Counter(vm.vnf_id for vm in host.vms if vm.vnf_id in rules)
        return any(impacted[v] + c > tolerated(rules[v]) for v, c in here.items() if v)
    if reason is Blocker.RECOVERY:
        mine = {vm.vnf_id for vm in host.vms if vm.vnf_id in rules}
        for other, at in progress.released_at.items():
            theirs = {vm.vnf_id for vm in cloud.hosts[other].vms} if other in cloud.hosts else set()
            for v in mine & theirs:
                assert v is not None
                if now < at + timedelta(seconds=rules[v].min_recovery_s):
                    return True
        return False
    return reason is Blocker.CAPACITY


def check_step(world: World, step: PlanStep, now: datetime = NOW) -> None:
    cloud, rules, limits, progress = world.cloud, world.rules, world.limits, world.progress
    problems = violations(cloud, rules, limits, progress, world.candidates, now, step)
    assert not problems, problems
    started = set(step.start)
    slots_left = limits.max_parallel - len(progress.in_cycle) - len(step.start)
    for index, node_id in enumerate(world.candidates):
        if node_id in started:
            continue
        blocked = step.blocked.get(node_id)
        if blocked is None:
            # Not examined: only once the step was full (or the scan stopped).
            assert slots_left <= 0 or step.unexamined or (step.start == () and not step.blocked)
            continue
        before = [n for n in world.candidates[:index] if n in started]
        assert blocker_holds(
            cloud, rules, limits, progress, before, node_id, now, blocked.reason
        ), (node_id, blocked, step)
        if blocked.until is not None:
            assert blocked.until > now


# --- the properties ----------------------------------------------------------------------------


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_no_plan_step_breaks_a_constraint(world: World) -> None:
    for explain in (False, True):
        step = plan_step(
            world.cloud,
            world.rules,
            world.limits,
            world.progress,
            world.candidates,
            NOW,
            explain=explain,
        )
        check_step(world, step)
        event(f"started {min(len(step.start), 2)}+")
        for blocked in step.blocked.values():
            event(f"blocked: {blocked.reason.value}")
        if step.start and world.progress.in_cycle:
            event("started beside nodes in their cycle")
        if explain:
            # With explain, every candidate not started says why.
            assert set(step.blocked) | set(step.start) == set(world.candidates)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_a_blocked_node_never_holds_back_the_others(world: World) -> None:
    """The same start and placement without the candidates that were not started; and while
    slots remain, every candidate not started has a blocker."""
    args = (world.cloud, world.rules, world.limits, world.progress)
    step = plan_step(*args, world.candidates, NOW)
    alone = plan_step(*args, list(step.start), NOW)
    assert alone.start == step.start
    if step.start:  # (with nothing started, the placement proves nothing)
        assert dict(alone.placements) == dict(step.placements)
    slots = world.limits.max_parallel - len(world.progress.in_cycle) - len(step.start)
    if slots > 0 and not step.unexamined:
        assert set(step.blocked) == set(world.candidates) - set(step.start)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(fresh=True), st.booleans())
def test_no_decision_of_a_forecast_breaks_a_constraint(world: World, migrate_moved: bool) -> None:
    """A whole campaign simulated: every decision checked on the cloud as it then is."""
    decisions = 0
    limits = replace(world.limits, failure_budget=None)
    real_plan_step = plan_step

    def checked(
        cloud: Cloud,
        rules: Mapping[str, VnfRule],
        limits: Limits,
        progress: Progress,
        candidates: Sequence[str],
        now: datetime,
        **kwargs: bool,
    ) -> PlanStep:
        nonlocal decisions
        decisions += 1
        step = real_plan_step(cloud, rules, limits, progress, candidates, now, **kwargs)
        check_step(World(cloud, dict(rules), limits, progress, list(candidates)), step, now)
        return step

    nodes = [n for n in world.candidates if n != "ghost"]
    before = {n: h for n, h in world.cloud.hosts.items()}
    durations = StepDurations()
    with mock.patch.object(forecast_module, "plan_step", checked):
        result = forecast(
            world.cloud,
            world.rules,
            limits,
            nodes,
            durations,
            start=NOW,
            migrate_moved_vms=migrate_moved,
        )
    assert world.cloud.hosts == before  # the caller's cloud is not touched
    assert decisions >= 1
    assert result.max_in_maintenance <= limits.max_parallel
    finished = set(result.finish_s)
    assert finished | set(result.stalled) | set(result.never) == set(nodes)
    assert not finished & set(result.stalled)
    started = [n for batch in result.batches for n in batch.nodes]
    assert sorted(started) == sorted(finished)
    moves = migrate_moved or any(
        vm.vnf_id not in world.rules for h in world.cloud.hosts.values() for vm in h.vms
    )
    if result.stalled and moves:
        # Migrated VMs land for good: they may fill the room a later node needed.
        event("stalled after migrations filled the room")
    elif limits.window_end is None or limits.window_end > NOW + timedelta(hours=1):
        # With VMs that stay put and no window closing, only nodes held in maintenance, or
        # whose VNF is held down by them, can be left over.
        held = {n for n in nodes if world.cloud.hosts[n].in_maintenance}
        stuck = held | stuck_behind_held(world, nodes)
        assert set(result.stalled) <= stuck, (result, describe(world.cloud))
    for batch in result.batches:
        for n in batch.nodes:
            assert result.finish_s[n] >= batch.start_s
    assert result.makespan_s == max(result.finish_s.values(), default=0.0)


def stuck_behind_held(world: World, nodes: Sequence[str]) -> set[str]:
    """Nodes whose VNF's budget is already spent by hosts in maintenance outside the campaign."""
    cloud, rules = world.cloud, world.rules
    impacted: Counter[str] = Counter()
    for host in cloud.hosts.values():
        if host.in_maintenance:
            impacted.update(vm.vnf_id for vm in host.vms if vm.vnf_id)
    stuck = set()
    for n in nodes:
        here = Counter(vm.vnf_id for vm in cloud.hosts[n].vms if vm.vnf_id in rules)
        if any(impacted[v] + c > rules[v].tolerated for v, c in here.items() if v):
            stuck.add(n)
    return stuck


def describe(cloud: Cloud) -> list[str]:
    return [
        f"{h.node_id} {h.failure_domain} {h.vcpus}/{h.ram_mb}{' held' if h.in_maintenance else ''}"
        f" {[(vm.vm_id, vm.vnf_id, vm.vcpus, vm.ram_mb) for vm in h.vms]}"
        for h in cloud.hosts.values()
    ]
