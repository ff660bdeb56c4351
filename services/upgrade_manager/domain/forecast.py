"""The campaign before it runs: a forecast of the planner's batches, and a lower bound.

`forecast` replays the campaign as a discrete-event simulation over the per-step durations: the
planner (`plan_step`) decides at time 0, then again whenever something it reads changes (a node
leaves its cycle, a recovery wait or the canary bake ends, the window opens), exactly as the
Upgrade Manager calls it, with no node ever failing. `lower_bound` is what no schedule that keeps
the same constraints can beat, so that `lower_bound / forecast.makespan_s` measures the planner.

Both are pure: no I/O, no wall clock; the caller's `Cloud` is never modified.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from .planner import (
    Blocked,
    Cloud,
    Host,
    Impossible,
    Limits,
    Progress,
    VmLoad,
    VnfRule,
    never_upgradable,
    plan_step,
    priority_order,
)

_US = 1_000_000  # the simulation counts whole microseconds, as datetimes do: no float drift


@dataclass(frozen=True, slots=True)
class StepDurations:
    """How long each step of a node's cycle takes, in seconds."""

    claim_s: float = 0.2  # maintenance on
    notify_s: float = 1.0  # VNFM moves business (switch-over / drain)
    migrate_s: float = 0.5  # one VM migration; a node's migrations run concurrently
    upgrade_s: float = 3.0  # node agent applies + reboots
    release_s: float = 0.2  # maintenance off

    def node_cycle_s(
        self, host: Host, rules: Mapping[str, VnfRule], migrate_moved_vms: bool = False
    ) -> float:
        """One node's whole cycle: claim, notify (if a VM of the node belongs to a registered
        VNF), migrate (if any VM is migrated: VMs of no registered VNF always, every VM with
        `migrate_moved_vms`), upgrade, release."""
        return self._cycle_us(host, rules, migrate_moved_vms) / _US

    def _cycle_us(self, host: Host, rules: Mapping[str, VnfRule], migrate_moved_vms: bool) -> int:
        total = _us(self.claim_s) + _us(self.upgrade_s) + _us(self.release_s)
        if _notified(host, rules):
            total += _us(self.notify_s)
        if any(_migrates(vm, rules, migrate_moved_vms) for vm in host.vms):
            total += _us(self.migrate_s)
        return total

    def _migrations_done_us(
        self, host: Host, rules: Mapping[str, VnfRule], migrate_moved_vms: bool
    ) -> int:
        """When the node's migrations have all landed, from the start of its cycle."""
        notify = _us(self.notify_s) if _notified(host, rules) else 0
        migrate = (
            _us(self.migrate_s)
            if any(_migrates(vm, rules, migrate_moved_vms) for vm in host.vms)
            else 0
        )
        return _us(self.claim_s) + notify + migrate


def _us(seconds: float) -> int:
    return round(seconds * _US)


def _notified(host: Host, rules: Mapping[str, VnfRule]) -> bool:
    return any(vm.vnf_id is not None and vm.vnf_id in rules for vm in host.vms)


def _migrates(vm: VmLoad, rules: Mapping[str, VnfRule], migrate_moved_vms: bool) -> bool:
    """Whether the cycle migrates this VM: its business cannot be moved by a VNFM (no VNF in the
    registry), or the policy migrates moved VMs too. Moved VMs otherwise reboot with the node."""
    return migrate_moved_vms or vm.vnf_id is None or vm.vnf_id not in rules


@dataclass(frozen=True, slots=True)
class Batch:
    start_s: float  # seconds after the campaign start
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Forecast:
    # Each planner decision that started at least one node, in time order.
    batches: tuple[Batch, ...]
    makespan_s: float
    # node -> when it left maintenance, in seconds after the start.
    finish_s: Mapping[str, float]
    # At time 0: for each node that cannot start in the first decision, what blocks it.
    blocked_now: Mapping[str, Blocked]
    # Nodes no plan can ever start (`never_upgradable`), left out of the simulation.
    never: Mapping[str, Impossible]
    # The most nodes of the campaign in their cycle at once.
    max_in_maintenance: int
    # Nodes never started although not impossible at first: nothing was running, nothing could
    # start and no wait was to end. Causes: a node (or other members of one of its VNFs) held in
    # maintenance outside the campaign, the window closed, or migrated VMs, which land for good,
    # took the room the node needed (the greedy order cannot undo that); else a planner bug.
    stalled: tuple[str, ...]
    # Planner decisions (`plan_step` calls) the simulation made: its cost, for work budgets.
    decisions: int = 0
    # Hosts examined by those decisions' placement searches (`PlanStep.search_work`).
    search_work: int = 0


def forecast(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    nodes: Sequence[str],
    durations: StepDurations,
    *,
    start: datetime,
    migrate_moved_vms: bool = False,
    order: Sequence[str] | None = None,
) -> Forecast:
    """The campaign over `nodes` as the planner would run it, if every node succeeded.

    A discrete-event simulation on a copy of `cloud`. At each decision the planner gets the
    nodes still pending (in `order`, by default `campaign_order`, the order the Upgrade Manager
    gives a campaign) and the campaign's progress
    (nodes in their cycle, nodes started, when the canary finished, recent releases); each node
    started is in its cycle for `durations.node_cycle_s` of its VMs at that moment. Its VMs that
    get migrated (those of no registered VNF; every VM with `migrate_moved_vms`) land, once the
    claim, the notice and the migration are over, on the destinations of the latest placement
    the planner made (which covers every VM of every node in its cycle, so they all fit at
    once); the other VMs stay on the node and reboot with it.

    The planner decides again, as the Upgrade Manager makes it, when a node leaves its cycle
    and when a wait it reported ends (a recovery, the canary bake, the window's opening); with
    `migrate_moved_vms` also when migrations land (a VNF member that left a node no longer
    counts against its VNF). Nodes in `order` that are not in `nodes` are ignored; nodes of
    `nodes` missing from `order` come after, in the order given.
    """
    wanted = list(dict.fromkeys(nodes))
    never = never_upgradable(cloud, rules, wanted)
    runnable = [n for n in wanted if n not in never]
    if order is None:
        allowed = set(runnable)
        chosen = campaign_order(cloud, rules, limits, wanted, migrate_moved_vms=migrate_moved_vms)
        pending = [n for n in chosen if n in allowed]
    else:
        allowed = set(runnable)
        pending = [n for n in dict.fromkeys(order) if n in allowed]
        listed = set(pending)
        pending += [n for n in runnable if n not in listed]
    sim = _copy(cloud)
    recovery_horizon = timedelta(
        seconds=max((rule.min_recovery_s for rule in rules.values()), default=0.0)
    )
    bake = timedelta(seconds=limits.canary_bake_s)

    t = 0  # microseconds since `start`
    finishing: list[tuple[int, str]] = []  # (when, node)
    landing: list[tuple[int, str]] = []  # (when the node's migrations are over, node)
    moving: dict[str, tuple[VmLoad, ...]] = {}
    placement: dict[str, str] = {}  # the latest planner placement: VM -> destination
    in_cycle: set[str] = set()
    released: dict[str, datetime] = {}
    finish_s: dict[str, float] = {}
    batches: list[Batch] = []
    blocked_now: dict[str, Blocked] = {}
    started = 0
    canary_finished_at: datetime | None = None
    max_in_maintenance = 0
    first = True
    decisions = 0
    search_work = 0

    while True:
        now = start + timedelta(microseconds=t)
        released = {n: at for n, at in released.items() if now < at + recovery_horizon}
        progress = Progress(frozenset(in_cycle), started, 0, canary_finished_at, released)
        step = plan_step(sim, rules, limits, progress, pending, now, explain=first)
        decisions += 1
        search_work += step.search_work
        if first:
            blocked_now = dict(step.blocked)
            first = False
        if step.start:
            placement = dict(step.placements)
            for node_id in step.start:
                host = sim.hosts[node_id]
                heapq.heappush(
                    finishing, (t + durations._cycle_us(host, rules, migrate_moved_vms), node_id)
                )
                leaving = tuple(vm for vm in host.vms if _migrates(vm, rules, migrate_moved_vms))
                if leaving:
                    moving[node_id] = leaving
                    done = durations._migrations_done_us(host, rules, migrate_moved_vms)
                    heapq.heappush(landing, (t + done, node_id))
            in_cycle.update(step.start)
            started += len(step.start)
            gone = set(step.start)
            pending = [n for n in pending if n not in gone]
            batches.append(Batch(t / _US, step.start))
            max_in_maintenance = max(max_in_maintenance, len(in_cycle))
        wake = _wake_up(step.blocked.values(), limits, canary_finished_at, bake, now, start)
        if not pending:
            wake = None  # nothing left to decide: only let the cycles run out

        # Advance to the next event that may change the planner's answer.
        decide = False
        while not decide:
            upcoming = [e for e in (_top(finishing), _top(landing), wake) if e is not None]
            if not upcoming:
                break
            t = min(upcoming)
            while landing and landing[0][0] <= t:
                _, node_id = heapq.heappop(landing)
                _land(sim, node_id, moving.pop(node_id), placement, in_cycle)
                decide = decide or migrate_moved_vms
            while finishing and finishing[0][0] <= t:
                _, node_id = heapq.heappop(finishing)
                in_cycle.discard(node_id)
                finish_s[node_id] = t / _US
                released[node_id] = start + timedelta(microseconds=t)
                decide = True
            if wake is not None and wake <= t:
                decide = True
            if (
                limits.canary_nodes > 0
                and canary_finished_at is None
                and started >= limits.canary_nodes
                and not in_cycle
            ):
                canary_finished_at = start + timedelta(microseconds=t)
            decide = decide and bool(pending)
        if not decide:
            break

    return Forecast(
        batches=tuple(batches),
        makespan_s=max(finish_s.values(), default=0.0),
        finish_s=finish_s,
        blocked_now=blocked_now,
        never=never,
        max_in_maintenance=max_in_maintenance,
        stalled=tuple(pending),
        decisions=decisions,
        search_work=search_work,
    )


def _top(events: list[tuple[int, str]]) -> int | None:
    return events[0][0] if events else None


def _wake_up(
    blocked: Iterable[Blocked],
    limits: Limits,
    canary_finished_at: datetime | None,
    bake: timedelta,
    now: datetime,
    start: datetime,
) -> int | None:
    """The next time a wait the planner reported ends by itself, in microseconds after start."""
    times = [b.until for b in blocked if b.until is not None and b.until > now]
    if limits.window_start is not None and now < limits.window_start:
        times.append(limits.window_start)
    if canary_finished_at is not None and now < canary_finished_at + bake:
        times.append(canary_finished_at + bake)
    if not times:
        return None
    return (min(times) - start) // timedelta(microseconds=1)


def _copy(cloud: Cloud) -> Cloud:
    """A Cloud to simulate on: hosts are immutable, so copying the indexes is enough."""
    copy = Cloud()
    copy.hosts = dict(cloud.hosts)
    copy.vnf_hosts = defaultdict(dict, {v: dict(h) for v, h in cloud.vnf_hosts.items()})
    return copy


def _with_vms(host: Host, vms: Iterable[VmLoad]) -> Host:
    return Host.of(
        host.node_id, host.failure_domain, host.vcpus, host.ram_mb, vms, host.in_maintenance
    )


def _land(
    sim: Cloud,
    node_id: str,
    vms: tuple[VmLoad, ...],
    placement: Mapping[str, str],
    in_cycle: set[str],
) -> None:
    """The node's migrated VMs leave it for their destinations in the latest placement."""
    arriving: dict[str, list[VmLoad]] = defaultdict(list)
    room: dict[str, tuple[int, int]] = {}
    for vm in vms:
        destination = placement.get(vm.vm_id)
        target = sim.hosts.get(destination) if destination is not None else None
        if target is None or target.node_id in in_cycle or target.in_maintenance:
            free = (-1, -1)
        else:
            free = room.get(target.node_id, (target.free_vcpus, target.free_ram_mb))
        if target is None or free[0] < vm.vcpus or free[1] < vm.ram_mb:
            # The planner's placement covers every VM of every node in its cycle, on hosts in
            # service with room for all of them at once: this is a planner bug.
            raise AssertionError(f"no valid destination for VM {vm.vm_id} of {node_id}")
        room[target.node_id] = (free[0] - vm.vcpus, free[1] - vm.ram_mb)
        arriving[target.node_id].append(vm)
    leaving = {vm.vm_id for vm in vms}
    source = sim.hosts[node_id]
    sim.put(_with_vms(source, (vm for vm in source.vms if vm.vm_id not in leaving)))
    for destination, landed in arriving.items():
        target = sim.hosts[destination]
        sim.put(_with_vms(target, (*target.vms, *landed)))


# --- the campaign's order ---------------------------------------------------------------------

# The durations the order search scores with. The Upgrade Manager knows no step durations when a
# campaign starts, so it uses this fixed model, and so does `forecast` (hence `escalator plan`
# and the bench) whatever durations it simulates with: the forecast shows the order the manager
# would use. Orders of magnitude of a compute node upgrade: a reboot of minutes, migrations of
# tens of seconds, the control plane's own steps negligible next to them.
ORDER_MODEL = StepDurations(
    claim_s=0.0, notify_s=0.0, migrate_s=20.0, upgrade_s=240.0, release_s=0.0
)
# Campaigns of more nodes keep `priority_order` (no search): a forecast of a big campaign costs
# seconds, and the longest-chain-first order is nearer optimal when there are many nodes per slot.
ORDER_SEARCH_MAX_NODES = 200
# Work budget of the search: planner decisions x campaign nodes, summed over the forecasts it
# scores (a forecast of 100 nodes on the standard scenario makes ~40 decisions, 4,000 units).
ORDER_SEARCH_WORK = 60_000
# Hosts examined by placement searches, per unit of that budget. A unit (a decision, per
# campaign node) costs 10-30 us, a host examined 0.3-4 us; 50 lets the standard scenario's
# search reach the order it reached before searches counted (at 10 it stops early, 1,990 s
# instead of 1,800 s). Uncounted, a small tight cloud, where decisions search, could spend
# minutes ordering one campaign.
SEARCH_WORK_PER_UNIT = 50
# Late nodes tried per pass, and where each is tried (fractions of its current position).
_ORDER_LATE_NODES = 8
_ORDER_TARGETS = (0, 1, 2, 3)  # quarters: position 0, 1/4, 1/2 and 3/4 of the way
_ORDER_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def campaign_order(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    nodes: Sequence[str],
    *,
    migrate_moved_vms: bool = False,
    work: int = ORDER_SEARCH_WORK,
) -> list[str]:
    """The order in which the Upgrade Manager considers a campaign's nodes (unless the request
    keeps its own): `priority_order`, improved by a bounded local search scored by `forecast`
    under ORDER_MODEL.

    The planner is greedy, and which nodes the greedy picks early decides which conflicting
    nodes are left for the end, where they run one after another: the makespan of an order is
    not smooth, and a heuristic key cannot see it. The search moves a node that finishes last
    (or never starts) earlier in the order (to the front, a quarter, half or three quarters of
    the way to its place) and keeps the first move that lowers the forecast's score (nodes
    stalled, then makespan, then the sum of the finish times), until no such move of the
    _ORDER_LATE_NODES latest nodes helps or the work budget (`work`, in planner decisions x
    nodes) is spent. It is deterministic (no clock, no randomness) and never returns an order
    that scores worse than `priority_order` under ORDER_MODEL. The maintenance window and
    the failure budget are left out of the score: the order does not depend on when the
    campaign starts. Campaigns of more than ORDER_SEARCH_MAX_NODES nodes get `priority_order`.
    """
    order = priority_order(cloud, rules, list(dict.fromkeys(nodes)))
    if len(order) < 3 or len(order) > ORDER_SEARCH_MAX_NODES or work <= 0:
        return order
    scoring = replace(limits, window_start=None, window_end=None, failure_budget=None)
    spent = 0

    def score(candidate: list[str]) -> tuple[tuple[int, float, float], Forecast]:
        nonlocal spent
        result = forecast(
            cloud,
            rules,
            scoring,
            candidate,
            ORDER_MODEL,
            start=_ORDER_EPOCH,
            migrate_moved_vms=migrate_moved_vms,
            order=candidate,
        )
        spent += (
            max(1, result.decisions) * len(candidate) + result.search_work // SEARCH_WORK_PER_UNIT
        )
        key = (len(result.stalled), result.makespan_s, sum(result.finish_s.values()))
        return key, result

    best_key, best = score(order)
    if not best.finish_s:
        return order
    improved = True
    while improved and spent < work:
        improved = False
        stalled = list(best.stalled)
        finishing = sorted(best.finish_s, key=lambda n: (-best.finish_s[n], n))
        position = {n: i for i, n in enumerate(order)}
        for node_id in (stalled + finishing)[:_ORDER_LATE_NODES]:
            at = position[node_id]
            targets = sorted({at * q // 4 for q in _ORDER_TARGETS if at * q // 4 < at})
            for target in targets:
                if spent >= work:
                    return order
                candidate = order[:at] + order[at + 1 :]
                candidate.insert(target, node_id)
                key, result = score(candidate)
                if key < best_key:
                    order, best_key, best = candidate, key, result
                    improved = True
                    break
            if improved:
                break
    return order


# --- the lower bound --------------------------------------------------------------------------


def lower_bound(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    nodes: Sequence[str],
    durations: StepDurations,
    *,
    migrate_moved_vms: bool = False,
) -> float:
    """Seconds that no schedule of `nodes` keeping the constraints can beat: the largest of the
    terms below, each a valid lower bound on its own.

    What "a schedule keeping the constraints" means (the planner's own rules): every node of the
    campaign that can ever start (not `never_upgradable`, not in maintenance outside the
    campaign) goes through one cycle without a break; while it is in its cycle it is not in
    service; at every moment the VMs on the nodes in their cycle fit on the nodes in service
    (nodes in maintenance outside the campaign take none), no VNF has more members on nodes
    that are out of service than it tolerates, and no more than `max_parallel` nodes (and
    `max_per_failure_domain` per failure domain) are in their cycle; a node with a member of a
    VNF starts no earlier than `min_recovery_s` after a node that carried a member of that VNF
    at its release left its cycle; the first `canary_nodes` nodes finish, then `canary_bake_s`
    passes, before any other starts. VMs move only during the cycle of the node they are on,
    to nodes in service. Nothing fails. The maintenance window is not used (the bound has no
    start time), which only makes it lower.

    Durations. Node i's cycle lasts at least d_i = `durations.node_cycle_s` of its VMs now: a
    node only ever gains VMs before its own cycle (VMs leave a node only during its cycle), and
    more VMs never make a cycle shorter (the notice and the migration step are either there or
    not). Every term below holds with any durations >= d_i, so it holds for the real ones.

    1. The longest cycle: max d_i.
    2. Parallelism. At most k nodes are in their cycle at once, k = the least of max_parallel,
       the sum over failure domains of min(max_per_failure_domain, its nodes), and the capacity
       limit: let F be the free room (vCPUs, and RAM, alike) of the nodes not held in
       maintenance outside the campaign, an overcommitted node counting 0. The VMs of the nodes
       C in their cycle fit in the free room of the others, so load(C) + free(C) <= F, hence
       sum(capacity(C)) <= F (capacity <= load + free, with free counted as above). F never
       grows: VMs move only between those nodes, to nodes with room, so their total free room
       is constant and only the overcommitted part can shrink. |C| is then at most the largest
       number of the smallest capacities that sum to <= F. Intervals that overlap at most k at
       a time can be given k "machines" (interval graphs are perfect), so the bounds of k
       identical machines hold: sum(d) / k, and for every m the ceil(m / k) shortest among the
       m longest cycles, which some machine runs one after the other. The same per failure
       domain with min(max_per_failure_domain, k) machines.
    3. Room over time: integrating sum(capacity(C(t))) <= F over the makespan T gives
       sum(capacity_i * d_i) <= F * T, for vCPUs and for RAM.
    4. Per VNF, with t its tolerated impacts less its members on nodes held in maintenance
       outside the campaign, and c the most of its campaign nodes that fit in t at once (by
       members): the nodes carrying its members are impacted at most c at a time; when c = 1,
       one after the other with min_recovery_s between one's release and the next start (sum
       of their impacts + gaps); otherwise the (j*c+1)-th start follows the end of an impact
       that began no earlier than the ((j-1)*c+1)-th start, plus the recovery, so the last
       start is at >= (ceil(n/c) - 1) * (shortest impact + recovery), plus the shortest cycle;
       and the k-machine bounds of 2 with c machines.
    5. Conflict cliques: nodes i and j conflict if some VNF cannot have both impacted at once.
       Pairwise-conflicting nodes are impacted one after the other, and between two of them
       that share a VNF with min_recovery_s, at least that long passes between the first's
       release and the second's start: the sum of their cycles plus a minimum spanning tree of
       those gaps (any order of the clique is a path through all of them, which is a spanning
       tree). The cliques are found by a bounded search; any clique gives a valid bound.
    6. Canary: the canary nodes take at least the k-machine bound of the canary_nodes shortest
       cycles, then the bake, then the others at least the k-machine bound of the rest of the
       shortest cycles (taking the shortest ones for each part only lowers the bound).

    With `migrate_moved_vms`, a VNF member leaves its node once the claim, the notice and the
    migration are over, and the node carries no member at its release: terms 4 and 5 then use
    that impact (claim + notice + migration) instead of the whole cycle, with no recovery, plus
    the shortest rest of a cycle after the last impact.
    """
    wanted = list(dict.fromkeys(nodes))
    never = never_upgradable(cloud, rules, wanted)
    hosts = [cloud.hosts[n] for n in wanted if n not in never and not cloud.hosts[n].in_maintenance]
    if not hosts:
        return 0.0
    mm = migrate_moved_vms
    cycle = {h.node_id: float(durations._cycle_us(h, rules, mm)) for h in hosts}
    # How long a node's VNF members stay impacted by its cycle.
    impact = {
        h.node_id: float(durations._migrations_done_us(h, rules, mm)) if mm else cycle[h.node_id]
        for h in hosts
    }
    by_length = sorted(cycle.values(), reverse=True)
    bound = by_length[0]  # 1

    # 2. parallelism
    k_capacity, spare = _capacity_limit(cloud, hosts)
    k = min(limits.max_parallel, len(hosts), k_capacity)
    domains: dict[str, list[float]] = defaultdict(list)
    for h in hosts:
        domains[h.failure_domain].append(cycle[h.node_id])
    per_domain = limits.max_per_failure_domain
    if per_domain is not None:
        k = min(k, sum(min(per_domain, len(d)) for d in domains.values()))
        for lengths in domains.values():
            bound = max(bound, _machines_bound(lengths, min(per_domain, k)))
    k = max(k, 1)
    bound = max(bound, _machines_bound(by_length, k))

    # 3. room over time
    for resource, free in enumerate(spare):
        if free > 0:
            used = sum((h.vcpus, h.ram_mb)[resource] * cycle[h.node_id] for h in hosts)
            bound = max(bound, used / free)

    # 4. and 5. VNFs
    bound = max(bound, _vnf_bound(cloud, rules, hosts, cycle, impact, durations, mm))

    # 6. canary
    canary = limits.canary_nodes
    if 0 < canary < len(hosts):
        shortest = by_length[::-1]
        bound = max(
            bound,
            _machines_bound(shortest[:canary], min(k, canary))
            + _us(limits.canary_bake_s)
            + _machines_bound(shortest[: len(hosts) - canary], k),
        )
    return bound / _US


def _machines_bound(lengths: Iterable[float], machines: int) -> float:
    """A lower bound on the makespan of jobs of these lengths on `machines` identical machines:
    the average load, and for every m, the ceil(m / machines) shortest of the m longest jobs
    (some machine runs at least that many of them)."""
    ordered = sorted(lengths, reverse=True)
    if not ordered or machines <= 0:
        return 0.0
    prefix = [0.0]
    for length in ordered:
        prefix.append(prefix[-1] + length)
    best = prefix[-1] / machines
    for m in range(1, len(ordered) + 1):
        q = -(-m // machines)
        best = max(best, prefix[m] - prefix[m - q])
    return best


def _capacity_limit(cloud: Cloud, hosts: Sequence[Host]) -> tuple[int, tuple[int, int]]:
    """The most campaign nodes that can be out of service at once for capacity, and the free
    room (vCPUs, RAM) of every node not held in maintenance outside the campaign."""
    in_service = [h for h in cloud.hosts.values() if not h.in_maintenance]
    spare = (
        sum(max(0, h.free_vcpus) for h in in_service),
        sum(max(0, h.free_ram_mb) for h in in_service),
    )
    limit = len(hosts)
    for resource, free in enumerate(spare):
        count, total = 0, 0
        for size in sorted((h.vcpus, h.ram_mb)[resource] for h in hosts):
            total += size
            if total > free:
                break
            count += 1
        limit = min(limit, count)
    return limit, spare


# Clique search effort: expansions in all (keeps lower_bound fast at 10,000 nodes).
_CLIQUE_BUDGET = 200_000
# VNFs with more campaign nodes than this get only their own chain bound, not clique edges.
_VNF_EDGES_MAX_NODES = 64


def _vnf_bound(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    hosts: Sequence[Host],
    cycle: Mapping[str, float],
    impact: Mapping[str, float],
    durations: StepDurations,
    mm: bool,
) -> float:
    campaign = {h.node_id for h in hosts}
    held = {n for n, h in cloud.hosts.items() if h.in_maintenance}
    tail = min(cycle[n] - impact[n] for n in campaign)  # the least of a cycle after its impact
    conflicts: dict[str, set[str]] = defaultdict(set)
    gaps: dict[tuple[str, str], float] = {}
    bound = 0.0
    for vnf_id, placed in cloud.vnf_hosts.items():
        rule = rules.get(vnf_id)
        if rule is None:
            continue
        members = {n: c for n, c in placed.items() if n in campaign}
        if not members:
            continue
        tolerated = rule.tolerated - sum(c for n, c in placed.items() if n in held)
        if tolerated <= 0:
            continue  # no schedule finishes: any bound holds; leave it to the others
        recovery = 0.0 if mm else float(_us(rule.min_recovery_s))
        at_once, room = 0, tolerated
        for count in sorted(members.values()):
            if count > room:
                break
            room -= count
            at_once += 1
        at_once = max(at_once, 1)
        impacts = [impact[n] for n in members]
        if at_once == 1:
            chain = sum(impacts) + (len(members) - 1) * recovery + tail
        else:
            waves = -(-len(members) // at_once)
            chain = (waves - 1) * (min(impacts) + recovery) + min(cycle[n] for n in members)
            chain = max(chain, _machines_bound(impacts, at_once) + tail)
        bound = max(bound, chain)
        if len(members) > _VNF_EDGES_MAX_NODES:
            continue
        ids = sorted(members)
        for a, i in enumerate(ids):
            for j in ids[a + 1 :]:
                if members[i] + members[j] > tolerated:
                    conflicts[i].add(j)
                    conflicts[j].add(i)
                if recovery > 0:
                    gaps[(i, j)] = max(gaps.get((i, j), 0.0), recovery)
    if conflicts:
        bound = max(bound, _clique_bound(conflicts, impact, gaps, tail))
    return bound


def _clique_bound(
    conflicts: Mapping[str, set[str]],
    weight: Mapping[str, float],
    gaps: Mapping[tuple[str, str], float],
    tail: float,
) -> float:
    """The heaviest conflict clique found: the sum of its impacts plus a minimum spanning tree
    of the recovery gaps between its nodes, plus the least tail of a cycle."""
    largest_gap = max(gaps.values(), default=0.0)
    best = 0.0
    budget = _CLIQUE_BUDGET

    def score(clique: list[str]) -> float:
        return sum(weight[n] for n in clique) + _spanning_tree(clique, gaps) + tail

    def grow(clique: list[str], total: float, candidates: list[str]) -> None:
        nonlocal best, budget
        if not candidates:
            best = max(best, score(clique))
            return
        for index, node_id in enumerate(candidates):
            if budget <= 0:
                best = max(best, score(clique))
                return
            rest = candidates[index:]
            optimistic = total + sum(weight[n] for n in rest)
            optimistic += (len(clique) + len(rest) - 1) * largest_gap + tail
            if optimistic <= best:
                return
            budget -= 1
            neighbours = conflicts[node_id]
            grow(
                [*clique, node_id],
                total + weight[node_id],
                [n for n in candidates[index + 1 :] if n in neighbours],
            )

    roots = sorted(conflicts, key=lambda n: (-weight[n], n))
    rank = {n: r for r, n in enumerate(roots)}
    for root in roots:
        if budget <= 0:
            break
        later = sorted((n for n in conflicts[root] if rank[n] > rank[root]), key=rank.__getitem__)
        grow([root], weight[root], later)
    return best


def _spanning_tree(nodes: Sequence[str], gaps: Mapping[tuple[str, str], float]) -> float:
    """The weight of a minimum spanning tree of `nodes` under the recovery gaps (Prim)."""
    if len(nodes) < 2 or not gaps:
        return 0.0

    def gap(a: str, b: str) -> float:
        return gaps.get((a, b) if a < b else (b, a), 0.0)

    outside = list(nodes[1:])
    cost = {n: gap(nodes[0], n) for n in outside}
    total = 0.0
    while outside:
        nearest = min(outside, key=cost.__getitem__)
        total += cost[nearest]
        outside.remove(nearest)
        for n in outside:
            cost[n] = min(cost[n], gap(nearest, n))
    return total
