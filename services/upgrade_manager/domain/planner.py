"""The batch planner: which nodes may start their cycle now, and why the others may not.

`plan_step(cloud, rules, limits, progress, candidates, now)` is pure: it reads the inventory
(`Cloud`), the VNFs' constraints (`VnfRule`), the campaign's own limits and where the campaign
stands, and returns the nodes to start, in order, plus the first constraint that blocks each node
it looked at. It never breaks a constraint:

- `max_parallel` nodes of the campaign in their cycle, `max_per_failure_domain` per domain;
- per VNF: at most `max_unavailable` members impacted at once (one for active-standby), never
  fewer than `min_in_service` members on available nodes, and `min_recovery_s` after an impact
  ended before the next one starts;
- capacity, exactly: every VM of every node started must fit, in vCPUs and RAM, on nodes that are
  neither unavailable (in maintenance, in the cycle, or started in the same step) nor in the
  step, with anti-affinity kept; the placement found is returned so that it can be checked;
- the canary (the first `canary_nodes` start alone, then `canary_bake_s` pass before any other),
  the maintenance window, and the failure budget.

Nodes are examined in the order given (see `priority_order`), and a node that is blocked never
holds back the ones after it: a slow or failed node costs its own slot, nothing else.

`Cloud` is an index the adapter keeps up to date record by record, so that a decision over
10,000 nodes and 200,000 VMs does not re-read the inventory; the planner only reads it.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from schemas.events import CampaignPolicy, NodeInventoryReported, VnfProfile
from schemas.types import RedundancyModel


@dataclass(frozen=True, slots=True)
class VmLoad:
    vm_id: str
    vnf_id: str | None
    vcpus: int
    ram_mb: int


@dataclass(frozen=True, slots=True)
class Host:
    """One compute node as the inventory last reported it."""

    node_id: str
    failure_domain: str
    vcpus: int
    ram_mb: int
    vms: tuple[VmLoad, ...]
    in_maintenance: bool = False
    used_vcpus: int = 0
    used_ram_mb: int = 0
    # Who holds the node in maintenance (a campaign id, or an admin), if anyone.
    holder: str | None = None

    @classmethod
    def of(
        cls,
        node_id: str,
        failure_domain: str,
        vcpus: int,
        ram_mb: int,
        vms: Iterable[VmLoad],
        in_maintenance: bool = False,
        holder: str | None = None,
    ) -> Host:
        loads = tuple(vms)
        return cls(
            node_id,
            failure_domain,
            vcpus,
            ram_mb,
            loads,
            in_maintenance,
            sum(vm.vcpus for vm in loads),
            sum(vm.ram_mb for vm in loads),
            holder,
        )

    @classmethod
    def from_report(cls, report: NodeInventoryReported) -> Host:
        return cls.of(
            report.node_id,
            report.failure_domain,
            report.vcpus,
            report.ram_mb,
            (VmLoad(vm.vm_id, vm.vnf_id, vm.vcpus, vm.ram_mb) for vm in report.vms),
            report.in_maintenance,
            report.maintenance_holder,
        )

    @property
    def free_vcpus(self) -> int:
        return self.vcpus - self.used_vcpus

    @property
    def free_ram_mb(self) -> int:
        return self.ram_mb - self.used_ram_mb

    @property
    def vnf_ids(self) -> frozenset[str]:
        return frozenset(vm.vnf_id for vm in self.vms if vm.vnf_id is not None)


@dataclass(frozen=True, slots=True)
class VnfRule:
    """What a VNF tolerates, from its registry profile."""

    vnf_id: str
    members: int
    max_unavailable: int = 1
    min_in_service: int = 0
    min_recovery_s: float = 0.0
    anti_affinity: bool = False

    @classmethod
    def from_profile(cls, profile: VnfProfile) -> VnfRule:
        limit = profile.max_unavailable
        if profile.redundancy is RedundancyModel.ACTIVE_STANDBY:
            limit = 1  # the pair's two members are never impacted at once
        return cls(
            profile.vnf_id,
            len(profile.members),
            limit,
            profile.min_in_service,
            profile.min_recovery_s,
            profile.anti_affinity,
        )

    @property
    def tolerated(self) -> int:
        """Members that may be impacted at once under both of the VNF's limits."""
        return max(0, min(self.max_unavailable, self.members - self.min_in_service))


class Cloud:
    """The inventory, indexed: hosts by id, and where each VNF has members.

    Mutated only by `put` (the adapter, as records arrive); the planner only reads it.
    """

    def __init__(self, hosts: Iterable[Host] = ()) -> None:
        self.hosts: dict[str, Host] = {}
        # vnf id -> host id -> members of the VNF on that host
        self.vnf_hosts: dict[str, dict[str, int]] = defaultdict(dict)
        for host in hosts:
            self.put(host)

    def put(self, host: Host) -> None:
        old = self.hosts.get(host.node_id)
        if old is not None:
            for vnf_id in old.vnf_ids:
                placed = self.vnf_hosts.get(vnf_id)
                if placed is not None:
                    placed.pop(host.node_id, None)
                    if not placed:
                        del self.vnf_hosts[vnf_id]
        self.hosts[host.node_id] = host
        counts: dict[str, int] = defaultdict(int)
        for vm in host.vms:
            if vm.vnf_id is not None:
                counts[vm.vnf_id] += 1
        for vnf_id, count in counts.items():
            self.vnf_hosts[vnf_id][host.node_id] = count

    def remove(self, node_id: str) -> None:
        old = self.hosts.pop(node_id, None)
        if old is None:
            return
        for vnf_id in old.vnf_ids:
            placed = self.vnf_hosts.get(vnf_id)
            if placed is not None:
                placed.pop(node_id, None)
                if not placed:
                    del self.vnf_hosts[vnf_id]

    def vnf_members_on(self, host: Host) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for vm in host.vms:
            if vm.vnf_id is not None:
                counts[vm.vnf_id] += 1
        return counts


@dataclass(frozen=True, slots=True)
class Limits:
    """The campaign's own constraints."""

    max_parallel: int = 1
    max_per_failure_domain: int | None = None
    canary_nodes: int = 0
    canary_bake_s: float = 0.0
    window_start: datetime | None = None
    window_end: datetime | None = None
    failure_budget: int | None = None

    @classmethod
    def from_policy(cls, policy: CampaignPolicy) -> Limits:
        return cls(
            policy.max_parallel,
            policy.max_per_failure_domain,
            policy.canary_nodes,
            policy.canary_bake_s,
            policy.window_start,
            policy.window_end,
            policy.failure_budget,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """Where the campaign stands, as far as the planner cares."""

    # Nodes of the campaign holding a slot (claimed, in maintenance, upgrading, releasing).
    in_cycle: frozenset[str] = frozenset()
    # Nodes that ever started a cycle in this campaign (the canary is the first ones).
    started: int = 0
    failed: int = 0
    # When the canary batch had wholly finished (None while it runs or if there is none).
    canary_finished_at: datetime | None = None
    # Nodes that left maintenance recently, and when: their VNFs wait min_recovery_s.
    released_at: Mapping[str, datetime] = field(default_factory=dict)
    # The campaign planned for: a node it still holds in maintenance (quarantined, then
    # re-admitted by an operator) is a candidate, not a node "in maintenance outside".
    campaign_id: str | None = None


class Blocker(StrEnum):
    """Why a node may not start now; the first constraint found, in this order of checks."""

    FAILURE_BUDGET = "failure_budget"
    WINDOW = "window"
    CANARY = "canary"
    MAX_PARALLEL = "max_parallel"
    NO_INVENTORY = "no_inventory"
    IN_MAINTENANCE = "in_maintenance"
    FAILURE_DOMAIN = "failure_domain"
    VNF_BUDGET = "vnf_budget"
    RECOVERY = "recovery"
    CAPACITY = "capacity"


@dataclass(frozen=True, slots=True)
class Blocked:
    reason: Blocker
    detail: str
    # When the blocker lifts by itself, if it is a matter of time.
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class PlanStep:
    start: tuple[str, ...] = ()
    # vm id -> destination node, for every VM of the nodes started and of the nodes already in
    # their cycle: the proof that they all fit at once.
    placements: Mapping[str, str] = field(default_factory=dict)
    blocked: Mapping[str, Blocked] = field(default_factory=dict)
    # Candidates not looked at because the step was already full (or the scan budget was spent).
    unexamined: int = 0
    # Hosts examined by the step's backtracking placement searches (its cost beyond the scan).
    search_work: int = 0


# Bounds of the backtracking placement (see `_Capacity._search`): clouds of at most
# SEARCH_MAX_HOSTS hosts in service, and SEARCH_MAX_WORK hosts examined per search. A host
# examined costs 0.3-4 us, so one search stays under about 80 ms whatever the cloud: an
# infeasible placement that the pruning cannot prove infeasible would otherwise explore an
# exponential tree (a 12-node cloud with 15 % spare once took 80 ms a decision and 220 s to
# order a campaign). The bound is per search, not per step, so that a node passed over
# never takes search effort away from the candidates after it.
SEARCH_MAX_HOSTS = 200
SEARCH_MAX_WORK = 20_000
# Appended to a capacity reason when the search gave up rather than proved there is no room.
SEARCH_CUT_NOTE = "; no placement found before the search's work bound"


# What makes two hosts interchangeable in a search: free room, and the anti-affinity VNFs
# being placed that each has a member of (in the inventory, and placed in the step).
_Alike = tuple[tuple[int, int], frozenset[str], frozenset[str]]


class _Capacity:
    """Free room on the available hosts, for one planning step; mutated as nodes are added.

    Every VM placed in the step is remembered with its destination (`placed`, `on_host`): a host
    that received VMs and then joins the step itself hands them on to the hosts left in service,
    so no VM is ever placed on a node that is in the step, and no room is counted twice.
    """

    def __init__(self, cloud: Cloud, unavailable: set[str]) -> None:
        self.cloud = cloud
        self.free: dict[str, tuple[int, int]] = {}
        # Best fit: hosts by free vCPUs (`rooms`, ascending), each bucket a heap on free RAM.
        # Putting each VM in the tightest room that takes it keeps the large rooms whole for
        # the large VMs, which is what lets the most nodes out of service at once. Entries
        # whose host has changed since are stale and dropped when met.
        self.buckets: dict[int, list[tuple[int, str]]] = defaultdict(list)
        free = self.free
        buckets = self.buckets
        for node_id, host in cloud.hosts.items():
            if host.in_maintenance or node_id in unavailable:
                continue
            cpu = host.vcpus - host.used_vcpus
            ram = host.ram_mb - host.used_ram_mb
            free[node_id] = (cpu, ram)
            buckets[cpu].append((ram, node_id))
        for bucket in buckets.values():
            heapq.heapify(bucket)
        self.rooms: list[int] = sorted(self.buckets)
        # Per host, the VNF members placed on it during this step (for anti-affinity).
        self.added: dict[str, dict[str, int]] = {}
        # vm id -> destination, and destination -> the VMs placed there, in this step.
        self.placed: dict[str, str] = {}
        self.on_host: dict[str, list[VmLoad]] = {}
        # Hosts examined by the backtracking searches (their cost, for work budgets).
        self.search_work = 0
        # Whether the latest `reserve` gave up at a work bound rather than proving no room.
        self.search_cut = False

    def reserve_in_cycle(self, in_cycle: Iterable[str], rules: Mapping[str, VnfRule]) -> bool:
        """Room for the VMs still on the campaign's nodes in their cycle: any may be migrated.
        All of them at once, largest first (best fit decreasing packs tighter than node by
        node)."""
        vms = [
            vm
            for node_id in sorted(in_cycle)
            if (host := self.cloud.hosts.get(node_id)) is not None
            for vm in host.vms
        ]
        if self.place(vms, rules):
            return True
        # Node by node, so that what fits is reserved (the step will start nothing anyway).
        for node_id in sorted(in_cycle):
            host = self.cloud.hosts.get(node_id)
            if host is not None and host.vms:
                self.place(host.vms, rules)
        return False

    def take(self, host: Host, rules: Mapping[str, VnfRule]) -> bool:
        """The node leaves service for the step if its VMs, and the VMs placed on it earlier in
        the step, all fit on the hosts left; otherwise nothing changes and it stays a host."""
        node_id = host.node_id
        room = self.free.pop(node_id, None)  # its bucket entry goes stale
        handed_on = self.on_host.pop(node_id, [])
        members = self.added.pop(node_id, None)
        if self.place([*handed_on, *host.vms], rules):
            return True
        if room is not None:
            self._set(node_id, *room)
        if handed_on:
            self.on_host[node_id] = handed_on
        if members is not None:
            self.added[node_id] = members
        return False

    def place(self, vms: Iterable[VmLoad], rules: Mapping[str, VnfRule]) -> bool:
        """A destination for every VM, reserved; False (nothing reserved) if one fails."""
        chosen = self.reserve(vms, rules)
        if chosen is None:
            return False
        for vm, node_id in chosen:
            self.placed[vm.vm_id] = node_id
            self.on_host.setdefault(node_id, []).append(vm)
        return True

    def reserve(
        self, vms: Iterable[VmLoad], rules: Mapping[str, VnfRule]
    ) -> list[tuple[VmLoad, str]] | None:
        """Room for every VM, largest first, not recorded as placed (see `place`); None, with
        nothing reserved, if one does not fit."""
        self.search_cut = False
        chosen: list[tuple[VmLoad, str]] = []
        ordered = sorted(vms, key=lambda v: (-v.vcpus, -v.ram_mb, v.vm_id))
        for vm in ordered:
            destination = self._pick(vm, rules)
            if destination is None:
                self.unreserve(chosen)
                return self._search(ordered, rules)
            chosen.append((vm, destination))
        return chosen

    def _search(
        self, ordered: list[VmLoad], rules: Mapping[str, VnfRule]
    ) -> list[tuple[VmLoad, str]] | None:
        """Backtracking, when best fit found no room: anti-affinity makes greedy packing miss
        placements that exist (a small cloud with few free slots, VNFs on most of its nodes).

        Pruned: a branch ends when the VMs left need more vCPUs or RAM than all the hosts have
        free together, and of hosts that are alike for the VMs left (same free room, same
        members of the anti-affinity VNFs being placed) only the first is tried. Bounded, so a
        decision stays cheap: only on clouds of at most SEARCH_MAX_HOSTS hosts in service, and
        at most SEARCH_MAX_WORK hosts examined.
        None means no placement was found, nothing reserved."""
        hosts = list(self.free)
        if len(hosts) > SEARCH_MAX_HOSTS:
            return None
        count = len(ordered)
        need_cpu = [0] * (count + 1)
        need_ram = [0] * (count + 1)
        for index in range(count - 1, -1, -1):
            need_cpu[index] = need_cpu[index + 1] + ordered[index].vcpus
            need_ram[index] = need_ram[index + 1] + ordered[index].ram_mb
        free = self.free
        free_cpu = sum(free[h][0] for h in hosts)
        free_ram = sum(free[h][1] for h in hosts)
        separate = {
            vm.vnf_id
            for vm in ordered
            if vm.vnf_id is not None
            and (rule := rules.get(vm.vnf_id)) is not None
            and rule.anti_affinity
        }
        # Per host, the anti-affinity VNFs being placed that it already has a member of.
        present = {
            h: frozenset(v for v in separate if h in self.cloud.vnf_hosts.get(v, {})) for h in hosts
        }
        chosen: list[tuple[VmLoad, str]] = []
        work = 0
        out_of_budget = False

        def alike(node_id: str) -> _Alike:
            added = self.added.get(node_id, {})
            return (
                free[node_id],
                present[node_id],
                frozenset(v for v in added if v in separate),
            )

        def go(index: int) -> bool:
            nonlocal work, out_of_budget, free_cpu, free_ram
            if index == count:
                return True
            if need_cpu[index] > free_cpu or need_ram[index] > free_ram:
                return False
            work += len(hosts)
            if work > SEARCH_MAX_WORK:
                out_of_budget = True
                return False
            vm = ordered[index]
            tried: set[_Alike] = set()
            for node_id in sorted(hosts, key=lambda h: (free[h], h)):
                cpu, ram = free[node_id]
                if cpu < vm.vcpus or ram < vm.ram_mb:
                    continue
                if not self._separated(node_id, vm.vnf_id, rules):
                    continue
                kind = alike(node_id)
                if kind in tried:
                    continue
                tried.add(kind)
                self._take_room(node_id, vm)
                free_cpu -= vm.vcpus
                free_ram -= vm.ram_mb
                chosen.append((vm, node_id))
                if go(index + 1):
                    return True
                chosen.pop()
                self._give_back(node_id, vm)
                free_cpu += vm.vcpus
                free_ram += vm.ram_mb
                if out_of_budget:
                    return False
            return False

        found = go(0)
        self.search_work += work
        self.search_cut = out_of_budget
        if found:
            return chosen
        self.unreserve(chosen)
        return None

    def _take_room(self, node_id: str, vm: VmLoad) -> None:
        cpu, ram = self.free[node_id]
        self._set(node_id, cpu - vm.vcpus, ram - vm.ram_mb)
        if vm.vnf_id is not None:
            members = self.added.setdefault(node_id, {})
            members[vm.vnf_id] = members.get(vm.vnf_id, 0) + 1

    def unreserve(self, chosen: Iterable[tuple[VmLoad, str]]) -> None:
        for vm, node_id in chosen:
            self._give_back(node_id, vm)

    def _separated(self, node_id: str, vnf_id: str | None, rules: Mapping[str, VnfRule]) -> bool:
        if vnf_id is None:
            return True
        rule = rules.get(vnf_id)
        if rule is None or not rule.anti_affinity:
            return True
        if node_id in self.cloud.vnf_hosts.get(vnf_id, {}):
            return False
        return self.added.get(node_id, {}).get(vnf_id, 0) == 0

    def _pick(self, vm: VmLoad, rules: Mapping[str, VnfRule]) -> str | None:
        """The host with the least free vCPUs, then RAM, that takes the VM; reserved."""
        found: str | None = None
        rooms, buckets, free = self.rooms, self.buckets, self.free
        pop, push = heapq.heappop, heapq.heappush
        index = bisect.bisect_left(rooms, vm.vcpus)
        while index < len(rooms) and found is None:
            cpu = rooms[index]
            bucket = buckets[cpu]
            set_aside: list[tuple[int, str]] = []
            while bucket:
                entry = pop(bucket)
                ram, node_id = entry
                if free.get(node_id) != (cpu, ram):
                    continue  # stale: withdrawn, or moved to another bucket
                if ram >= vm.ram_mb and self._separated(node_id, vm.vnf_id, rules):
                    found = node_id  # its room changes: `_set` files it anew
                    break
                set_aside.append(entry)
            for entry in set_aside:
                push(bucket, entry)
            if bucket:
                index += 1
            else:
                del buckets[cpu]
                del rooms[index]
        if found is None:
            return None
        self._take_room(found, vm)
        return found

    def _give_back(self, node_id: str, vm: VmLoad) -> None:
        cpu, ram = self.free[node_id]
        self._set(node_id, cpu + vm.vcpus, ram + vm.ram_mb)
        if vm.vnf_id is not None:
            members = self.added[node_id]
            members[vm.vnf_id] -= 1
            if not members[vm.vnf_id]:
                del members[vm.vnf_id]

    def _set(self, node_id: str, cpu: int, ram: int) -> None:
        self.free[node_id] = (cpu, ram)
        if cpu not in self.buckets:
            bisect.insort(self.rooms, cpu)
        heapq.heappush(self.buckets[cpu], (ram, node_id))


def migration_destinations(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    node_id: str,
    vms: Sequence[VmLoad],
    others_in_cycle: Iterable[str],
) -> dict[str, str]:
    """Where to migrate `vms`, leaving `node_id`: one packing of them together with every VM of
    the campaign's other nodes in their cycle, as `plan_step` proved exists when it started
    them, on the hosts in service. Named to the Cloud Manager as preferred destinations, so
    that a VIM placing each VM on its own (most free room first, as Nova's default weighers
    do) does not spread this node's VMs over the room the others need. Empty when the
    inventory finds no packing: the Cloud Manager then places them."""
    others = sorted(set(others_in_cycle) - {node_id})
    capacity = _Capacity(cloud, {node_id, *others})
    pending = [vm for other in others if (h := cloud.hosts.get(other)) is not None for vm in h.vms]
    if not capacity.place([*pending, *vms], rules):
        return {}
    return {vm.vm_id: capacity.placed[vm.vm_id] for vm in vms}


def plan_step(
    cloud: Cloud,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    progress: Progress,
    candidates: Sequence[str],
    now: datetime,
    *,
    explain: bool = False,
    scan_budget: int | None = None,
) -> PlanStep:
    """The nodes to start now, in the order given, and the first blocker of each node passed over.

    Without `explain`, the scan stops as soon as no slot is left and looks at no more than
    `scan_budget` blocked candidates (None: all); with it, every candidate gets its blocker, which
    is what `escalator plan` shows.
    """
    blocked: dict[str, Blocked] = {}

    def block_all(blocker: Blocked) -> PlanStep:
        return PlanStep(blocked=dict.fromkeys(candidates, blocker))

    if limits.failure_budget is not None and progress.failed >= limits.failure_budget:
        return block_all(
            Blocked(
                Blocker.FAILURE_BUDGET,
                f"failure budget spent: {progress.failed} failed node(s), budget "
                f"{limits.failure_budget}",
            )
        )
    if limits.window_start is not None and now < limits.window_start:
        return block_all(
            Blocked(
                Blocker.WINDOW,
                f"maintenance window opens at {limits.window_start.isoformat()}",
                limits.window_start,
            )
        )
    if limits.window_end is not None and now >= limits.window_end:
        return block_all(
            Blocked(Blocker.WINDOW, f"maintenance window closed at {limits.window_end.isoformat()}")
        )
    slots = limits.max_parallel - len(progress.in_cycle)
    if limits.canary_nodes > 0 and progress.started >= limits.canary_nodes:
        if progress.canary_finished_at is None:
            return block_all(
                Blocked(Blocker.CANARY, f"the canary batch of {limits.canary_nodes} is running")
            )
        bake_until = progress.canary_finished_at + timedelta(seconds=limits.canary_bake_s)
        if now < bake_until:
            return block_all(
                Blocked(
                    Blocker.CANARY,
                    f"the canary bakes until {bake_until.isoformat()}",
                    bake_until,
                )
            )
    elif limits.canary_nodes > 0:
        slots = min(slots, limits.canary_nodes - progress.started)

    unavailable: set[str] = {n for n, h in cloud.hosts.items() if h.in_maintenance}
    # Held by this campaign but in no cycle: quarantined nodes. Their VNF members are down (so
    # counted as impacted below); re-admitted, they may start again without counting twice.
    held_here = {
        n
        for n in unavailable
        if progress.campaign_id is not None
        and cloud.hosts[n].holder == progress.campaign_id
        and n not in progress.in_cycle
    }
    unavailable |= progress.in_cycle
    impacted: dict[str, int] = defaultdict(int)  # VNF -> members on unavailable hosts
    for node_id in unavailable:
        host = cloud.hosts.get(node_id)
        if host is not None:
            for vm in host.vms:
                if vm.vnf_id is not None:
                    impacted[vm.vnf_id] += 1
    per_domain: dict[str, int] = defaultdict(int)
    for node_id in progress.in_cycle:
        host = cloud.hosts.get(node_id)
        if host is not None:
            per_domain[host.failure_domain] += 1
    recovering = _recovering_until(cloud, rules, progress.released_at)

    capacity: _Capacity | None = None  # built on first need: most decisions have no free slot
    in_cycle_fits = True
    start: list[str] = []
    passed_over = 0

    def placements() -> dict[str, str]:
        # No proof to give if the VMs of the nodes in their cycle do not all fit.
        return dict(capacity.placed) if capacity is not None and in_cycle_fits else {}

    def searched() -> int:
        return capacity.search_work if capacity is not None else 0

    for index, node_id in enumerate(candidates):
        if slots <= 0:
            if not explain:
                return PlanStep(
                    tuple(start), placements(), blocked, len(candidates) - index, searched()
                )
            blocked[node_id] = Blocked(
                Blocker.MAX_PARALLEL,
                f"all {limits.max_parallel} slot(s) taken",
            )
            continue
        if scan_budget is not None and passed_over >= scan_budget and not explain:
            return PlanStep(
                tuple(start), placements(), blocked, len(candidates) - index, searched()
            )
        host = cloud.hosts.get(node_id)
        held = node_id in held_here
        reason = _first_blocker(
            host, node_id, rules, limits, per_domain, impacted, recovering, now, held=held
        )
        if reason is None and node_id in unavailable and not held:
            # Already in its cycle, or named twice: it is not a candidate any more.
            reason = Blocked(Blocker.IN_MAINTENANCE, "already in its cycle in this campaign")
        if reason is None and host is not None:
            if capacity is None:
                capacity = _Capacity(cloud, unavailable)
                in_cycle_fits = capacity.reserve_in_cycle(progress.in_cycle, rules)
            if not in_cycle_fits:
                reason = Blocked(
                    Blocker.CAPACITY,
                    "the VMs of the nodes already in their cycle do not all fit elsewhere",
                )
            elif not capacity.take(host, rules):
                reason = Blocked(
                    Blocker.CAPACITY,
                    f"its {len(host.vms)} VM(s) do not all fit on the nodes left in service"
                    " (vCPUs, RAM, anti-affinity)"
                    + (SEARCH_CUT_NOTE if capacity.search_cut else ""),
                )
        if reason is not None:
            blocked[node_id] = reason
            passed_over += 1
            continue
        assert host is not None
        start.append(node_id)
        slots -= 1
        per_domain[host.failure_domain] += 1
        if held:
            held_here.discard(node_id)  # its members are counted as impacted already
            continue
        unavailable.add(node_id)
        for vnf_id, count in cloud.vnf_members_on(host).items():
            impacted[vnf_id] += count
    return PlanStep(tuple(start), placements(), blocked, 0, searched())


def _first_blocker(
    host: Host | None,
    node_id: str,
    rules: Mapping[str, VnfRule],
    limits: Limits,
    per_domain: Mapping[str, int],
    impacted: Mapping[str, int],
    recovering: Mapping[str, datetime],
    now: datetime,
    *,
    held: bool = False,
) -> Blocked | None:
    """The first constraint that keeps the node from starting; `held`: this campaign already
    holds it in maintenance, so its own members are among the impacted ones."""
    if host is None:
        return Blocked(Blocker.NO_INVENTORY, "the Cloud Manager has not reported this node yet")
    if host.in_maintenance and not held:
        who = f" (held by {host.holder})" if host.holder else ""
        return Blocked(Blocker.IN_MAINTENANCE, f"already in maintenance outside this campaign{who}")
    if (
        limits.max_per_failure_domain is not None
        and per_domain.get(host.failure_domain, 0) >= limits.max_per_failure_domain
    ):
        return Blocked(
            Blocker.FAILURE_DOMAIN,
            f"{limits.max_per_failure_domain} node(s) of {host.failure_domain} already in "
            "their cycle",
        )
    members: dict[str, int] = defaultdict(int)
    for vm in host.vms:
        if vm.vnf_id is not None:
            members[vm.vnf_id] += 1
    for vnf_id in sorted(members):
        rule = rules.get(vnf_id)
        if rule is None:
            continue  # not in the registry: the VIM migrates its VMs, no budget to keep
        down = impacted.get(vnf_id, 0) - (members[vnf_id] if held else 0)
        if down + members[vnf_id] > rule.tolerated:
            return Blocked(
                Blocker.VNF_BUDGET,
                f"{vnf_id}: {down} of {rule.members} member(s) already impacted, "
                f"{members[vnf_id]} here, {rule.tolerated} tolerated at once",
            )
    for vnf_id in sorted(members):
        until = recovering.get(vnf_id)
        if until is not None and now < until:
            return Blocked(
                Blocker.RECOVERY,
                f"{vnf_id} recovers from its last impact until {until.isoformat()}",
                until,
            )
    return None


def _recovering_until(
    cloud: Cloud, rules: Mapping[str, VnfRule], released_at: Mapping[str, datetime]
) -> dict[str, datetime]:
    """VNF -> the earliest time its next impact may start, after recent releases."""
    until: dict[str, datetime] = {}
    for node_id, at in released_at.items():
        host = cloud.hosts.get(node_id)
        if host is None:
            continue
        for vnf_id in host.vnf_ids:
            rule = rules.get(vnf_id)
            if rule is None or rule.min_recovery_s <= 0:
                continue
            ends = at + timedelta(seconds=rule.min_recovery_s)
            if vnf_id not in until or until[vnf_id] < ends:
                until[vnf_id] = ends
    return until


# --- order and feasibility -----------------------------------------------------------------


def priority_order(cloud: Cloud, rules: Mapping[str, VnfRule], nodes: Sequence[str]) -> list[str]:
    """The order in which to consider nodes: the most constrained first.

    A VNF whose members sit on k hosts and tolerates t impacts at once needs ceil(k / t) waves;
    the nodes of the VNFs with the most waves form the longest chains, and starting them first
    keeps those chains from setting the makespan (longest-chain-first list scheduling). Ties go
    to nodes that conflict with more others, then to the lightest node (quickest to empty, as
    Fenix does), then to the id, so the order is deterministic.
    """
    waves: dict[str, int] = {}
    for vnf_id, placed in cloud.vnf_hosts.items():
        rule = rules.get(vnf_id)
        if rule is None or rule.tolerated <= 0:
            continue
        waves[vnf_id] = -(-len(placed) // rule.tolerated)

    def key(node_id: str) -> tuple[int, int, int, str]:
        host = cloud.hosts.get(node_id)
        if host is None:
            return (1, 0, 0, node_id)
        vnfs = [v for v in host.vnf_ids if v in waves]
        chain = max((waves[v] for v in vnfs), default=0)
        degree = sum(len(cloud.vnf_hosts[v]) - 1 for v in vnfs if waves[v] > 1)
        return (-chain, -degree, host.used_vcpus, node_id)

    return sorted(nodes, key=key)


@dataclass(frozen=True, slots=True)
class Impossible:
    node_id: str
    detail: str


def never_upgradable(
    cloud: Cloud, rules: Mapping[str, VnfRule], nodes: Sequence[str]
) -> dict[str, Impossible]:
    """Nodes that no plan can ever start, each with the reason, before anything starts.

    A node is impossible when it is unknown to the inventory, when one of its VNFs tolerates no
    impact at all (or fewer than it has members on the node), or when its VMs do not fit on all
    the other nodes together (every other node back in service).
    """
    found: dict[str, Impossible] = {}
    capacity: _Capacity | None = None  # every node in service; each node is tried alone
    for node_id in nodes:
        host = cloud.hosts.get(node_id)
        if host is None:
            found[node_id] = Impossible(node_id, "not in the Cloud Manager's inventory")
            continue
        members = cloud.vnf_members_on(host)
        for vnf_id in sorted(members):
            rule = rules.get(vnf_id)
            if rule is not None and members[vnf_id] > rule.tolerated:
                found[node_id] = Impossible(
                    node_id,
                    f"{vnf_id} has {members[vnf_id]} member(s) here but tolerates "
                    f"{rule.tolerated} impacted at once (max_unavailable {rule.max_unavailable},"
                    f" min_in_service {rule.min_in_service} of {rule.members})",
                )
                break
        if node_id in found:
            continue
        if capacity is None:
            capacity = _Capacity(cloud, set())
        room = capacity.free.pop(node_id, None)
        chosen = capacity.reserve(host.vms, rules)
        cut = capacity.search_cut
        if chosen is not None:
            capacity.unreserve(chosen)
        if room is not None:
            capacity._set(node_id, *room)
        if chosen is None:
            found[node_id] = Impossible(
                node_id,
                f"its {len(host.vms)} VM(s) ({host.used_vcpus} vCPUs, {host.used_ram_mb} MiB) do "
                "not fit on the other nodes even with all of them in service"
                + (SEARCH_CUT_NOTE if cut else ""),
            )
    return found
