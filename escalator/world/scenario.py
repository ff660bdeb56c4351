"""Seeded generator of a plausible cloud: nodes over failure domains, VNFs and loose VMs.

The cloud is filled with workloads (an active-standby pair, a load-balanced VNF of 3-4
members, or a VM of no VNF, on distinct nodes spread over failure domains first) until adding
more would break one of two properties, so that a rolling upgrade is possible but not trivially
roomy:
- spare capacity: by default the free capacity across the cloud covers the most loaded node's
  VMs (about one node's worth of spare); with `spare_fraction`, the free vcpus and RAM stay at
  least that fraction of the cloud's total;
- for every node, all its VMs can be live-migrated elsewhere under the placement rules
  (capacity and anti-affinity), checked with the engine's greedy plan (`plan_evacuation`).
Generation is deterministic for a given seed and parameters.

Two fillers do this. The default one (no `spare_fraction`, up to `LEGACY_MAX_NODES` nodes) is
the original algorithm and gives the very same clouds as before, only faster. The scalable one
(any `spare_fraction`, or more nodes) picks nodes from per-failure-domain heaps and checks
evacuability with a sufficient condition in O(1) per workload:

    every node can be evacuated by the greedy plan if at least `k + g` nodes have room for the
    largest flavor, where `k` is the most VMs on one node and `g` the largest server group.

(Each VM of the evacuated node then finds a node with room that the plan has not used yet,
that is not the evacuated node and hosts no other member of its group: `k + g` roomy nodes
minus the node itself, at most `g - 1` group members and fewer than `k` used nodes leave one.)
When the condition fails on a cloud of at most `EXACT_CHECK_MAX_NODES` nodes, the exact check
(the greedy plan for every node) decides; on larger clouds the condition alone does, so such
clouds stop filling a little earlier than an exact check would.

Sizes at scale: `vms_per_node` sizes the nodes so that a filled node holds about that many VMs
of the given flavors. `generate(nodes=10_000, failure_domains=3, vms_per_node=20,
spare_fraction=0.15)` gives nodes of 72 vcpus / 147,456 MB (2 GiB per vcpu, as the flavors
(2 vcpus, 4 GiB) and (4 vcpus, 8 GiB)) and about 200,000 VMs.

`save_state` / `load_state` write and read a world as JSON (`python -m escalator.world
--scenario FILE` serves one); the standard scenarios live in `bench/scenarios/`.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from escalator.world.engine import PlacementIndex, plan_evacuation
from escalator.world.model import MemberSync, Node, Timings, Vm, Vnf, WorldState

# (vcpus, ram_mb). Small flavors keep fragmentation low, so the cloud can be filled until the
# spare capacity is about one node's worth; larger ones leave about twice that stranded.
FLAVORS: tuple[tuple[int, int], ...] = ((2, 4096), (4, 8192))
# Consecutive failed attempts to add a workload before the cloud counts as full.
MAX_CONSECUTIVE_MISSES = 30
# Without `spare_fraction`, clouds up to this size are filled by the original algorithm
# (identical results to earlier versions); larger ones by the scalable filler.
LEGACY_MAX_NODES = 100
# The scalable filler falls back to the exact evacuation check up to this many nodes.
EXACT_CHECK_MAX_NODES = 200
# Largest server group the generator makes (load-balanced VNFs of 3 or 4 members).
LB_SIZES = (3, 4)


def node_size_for(
    vms_per_node: int,
    spare_fraction: float | None = None,
    flavors: Sequence[tuple[int, int]] = FLAVORS,
) -> tuple[int, int]:
    """(vcpus, ram_mb) of a node that holds about `vms_per_node` VMs of `flavors` (picked
    uniformly) once the cloud is filled to `spare_fraction` (default: nearly full). Vcpus are
    rounded up to a multiple of the largest flavor's; RAM follows the flavors' RAM per vcpu."""
    if vms_per_node < 1:
        raise ValueError("vms_per_node must be at least 1")
    mean_vcpus = sum(f[0] for f in flavors) / len(flavors)
    ram_per_vcpu = sum(f[1] for f in flavors) / sum(f[0] for f in flavors)
    step = max(f[0] for f in flavors)
    vcpus = vms_per_node * mean_vcpus / (1.0 - (spare_fraction or 0.0))
    vcpus_rounded = step * math.ceil(vcpus / step)
    return vcpus_rounded, int(vcpus_rounded * ram_per_vcpu)


def generate(
    nodes: int = 12,
    failure_domains: int = 3,
    seed: int = 0,
    *,
    node_vcpus: int = 32,
    node_ram_mb: int = 65536,
    vnfms: int = 2,
    base_version: str = "1.0.0",
    timings: Timings | None = None,
    spare_fraction: float | None = None,
    vms_per_node: int | None = None,
    flavors: Sequence[tuple[int, int]] = FLAVORS,
) -> WorldState:
    """A filled cloud (see the module's docstring). `vms_per_node`, when given, replaces
    `node_vcpus` and `node_ram_mb` by `node_size_for(vms_per_node, spare_fraction, flavors)`."""
    if nodes < 2:
        raise ValueError("need at least 2 nodes")
    if not 1 <= failure_domains <= nodes:
        raise ValueError("failure_domains must be between 1 and the number of nodes")
    if spare_fraction is not None and not 0.0 <= spare_fraction < 1.0:
        raise ValueError("spare_fraction must be at least 0 and below 1")
    flavors = tuple((int(v), int(r)) for v, r in flavors)
    if not flavors or any(v <= 0 or r <= 0 for v, r in flavors):
        raise ValueError("flavors must be a non-empty list of positive (vcpus, ram_mb)")
    if vms_per_node is not None:
        node_vcpus, node_ram_mb = node_size_for(vms_per_node, spare_fraction, flavors)
    if node_vcpus <= 0 or node_ram_mb <= 0:
        raise ValueError("node_vcpus and node_ram_mb must be positive")
    rng = random.Random(seed)
    width = len(str(nodes))
    state = WorldState(timings=timings or Timings(), seed=seed)
    for i in range(nodes):
        node_id = f"node-{i + 1:0{width}d}"
        state.nodes[node_id] = Node(
            id=node_id,
            vcpus=node_vcpus,
            ram_mb=node_ram_mb,
            failure_domain=f"fd-{i % failure_domains + 1}",
            installed_version=base_version,
        )
    if spare_fraction is None and nodes <= LEGACY_MAX_NODES:
        return _fill_legacy(state, rng, vnfms, flavors)
    filler = _ScalableFiller(
        state,
        rng,
        vnfms,
        flavors,
        spare_fraction=spare_fraction,
        exact_fallback=nodes <= EXACT_CHECK_MAX_NODES,
    )
    filler.fill()
    return state


def satisfies_spare_capacity(state: WorldState) -> bool:
    """Free capacity covers the most loaded node, and every node can be evacuated."""
    index = PlacementIndex.of(state)
    usages = [index.usage[n] for n in state.nodes]
    frees = [index.free(n) for n in state.nodes.values()]
    if sum(f[0] for f in frees) < max(u[0] for u in usages):
        return False
    if sum(f[1] for f in frees) < max(u[1] for u in usages):
        return False
    return every_node_evacuable(state, index)


def every_node_evacuable(state: WorldState, index: PlacementIndex | None = None) -> bool:
    """`plan_evacuation` finds a plan for every node (the exact check)."""
    index = index or PlacementIndex.of(state)
    return all(plan_evacuation(state, n, index) is not None for n in state.nodes)


def roomy_nodes_suffice(state: WorldState, index: PlacementIndex | None = None) -> bool:
    """The sufficient condition of the module's docstring: at least `k + g` nodes that take
    new VMs have room for the largest VM, where `k` is the most VMs placed on one node and `g`
    the most places a server group occupies. True implies `every_node_evacuable`."""
    index = index or PlacementIndex.of(state)
    need = (0, 0)
    per_node: dict[str, int] = {}
    for vm in state.vms.values():
        need = (max(need[0], vm.vcpus), max(need[1], vm.ram_mb))
        per_node[vm.node_id] = per_node.get(vm.node_id, 0) + 1
    roomy = 0
    for node in state.nodes.values():
        free = index.free(node)
        takes_vms = (
            node.power == "up"
            and node.maintenance_holder is None
            and node.service_status == "enabled"
        )
        if takes_vms and free[0] >= need[0] and free[1] >= need[1]:
            roomy += 1
    k = max(per_node.values(), default=0)
    g = max((len(places) for places in index.group_locations.values()), default=1)
    return roomy >= k + g


def save_state(state: WorldState, path: str | Path) -> None:
    """Write `state` as JSON (stable: the same state gives the same bytes). Fields at their
    default are left out (`load_state` restores them), except the timings, always written."""
    data = state.model_dump(mode="json", exclude_defaults=True)
    data["timings"] = state.timings.model_dump(mode="json")
    text = json.dumps(data, indent=1, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def load_state(path: str | Path) -> WorldState:
    """A state written by `save_state` (raises ValueError if the file is not one)."""
    try:
        return WorldState.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read scenario {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ValueError(f"{path} is not a world scenario: {exc}") from exc


def with_timings(state: WorldState, **overrides: float | None) -> WorldState:
    """`state` with some timings replaced (None leaves one as it is). A new `resync_s` also
    becomes the `min_recovery_s` of active-standby VNFs, as the generator makes them."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return state
    timings = Timings.model_validate({**state.timings.model_dump(), **given})
    vnfs = state.vnfs
    if "resync_s" in given:
        vnfs = {
            vnf_id: (
                vnf.model_copy(update={"min_recovery_s": timings.resync_s})
                if vnf.redundancy == "active_standby"
                else vnf
            )
            for vnf_id, vnf in vnfs.items()
        }
    return state.model_copy(update={"timings": timings, "vnfs": vnfs})


def vnf_registry_records(state: WorldState) -> list[dict[str, Any]]:
    """Per-VNF constraints, in the shape the lead publishes to the VNF registry."""
    return [
        {
            "vnf_id": vnf.id,
            "vnfm_id": vnf.vnfm_id,
            "redundancy": vnf.redundancy,
            "members": list(vnf.members),
            "min_in_service": vnf.min_in_service,
            "max_unavailable": vnf.max_unavailable,
            "min_recovery_s": vnf.min_recovery_s,
        }
        for vnf in state.vnfs.values()
    ]


# --- what both fillers make ----------------------------------------------------------------


class _Maker:
    """VMs and VNFs as the generator names and shapes them."""

    def __init__(self, vnfms: int) -> None:
        self.vnfms = max(1, vnfms)

    def vnfm_for(self, index: int) -> str:
        return f"vnfm-{(index - 1) % self.vnfms + 1}"

    @staticmethod
    def place_vm(
        state: WorldState,
        node_id: str,
        flavor: tuple[int, int],
        *,
        name: str,
        vnf_id: str | None,
        group: str | None,
    ) -> str:
        vm_id = f"vm-{len(state.vms) + 1:03d}"
        state.vms[vm_id] = Vm(
            id=vm_id,
            name=name,
            vnf_id=vnf_id,
            vcpus=flavor[0],
            ram_mb=flavor[1],
            node_id=node_id,
            server_group=group,
        )
        return vm_id

    def add_members(
        self, state: WorldState, flavor: tuple[int, int], vnf_id: str, nodes: list[str]
    ) -> list[str]:
        return [
            self.place_vm(
                state, node_id, flavor, name=f"{vnf_id}-m{k}", vnf_id=vnf_id, group=f"sg-{vnf_id}"
            )
            for k, node_id in enumerate(nodes)
        ]

    def add_active_standby(
        self, state: WorldState, flavor: tuple[int, int], number: int, nodes: list[str]
    ) -> None:
        vnf_id = f"vnf-as-{number:02d}"
        members = self.add_members(state, flavor, vnf_id, nodes)
        state.vnfs[vnf_id] = Vnf(
            id=vnf_id,
            vnfm_id=self.vnfm_for(number),
            redundancy="active_standby",
            members=members,
            active_member=members[0],
            min_in_service=1,
            max_unavailable=1,
            min_recovery_s=state.timings.resync_s,
            sync={m: MemberSync() for m in members},
        )

    def add_load_balanced(
        self, state: WorldState, flavor: tuple[int, int], number: int, nodes: list[str]
    ) -> None:
        size = len(nodes)
        vnf_id = f"vnf-lb-{number:02d}"
        members = self.add_members(state, flavor, vnf_id, nodes)
        state.vnfs[vnf_id] = Vnf(
            id=vnf_id,
            vnfm_id=self.vnfm_for(number + 1),
            redundancy="load_balanced",
            members=members,
            load_share={m: 1.0 / size for m in members},
            min_in_service=size - 1,
            max_unavailable=1,
            min_recovery_s=0.0,
        )

    def add_loose_vm(
        self, state: WorldState, flavor: tuple[int, int], number: int, nodes: list[str]
    ) -> None:
        self.place_vm(state, nodes[0], flavor, name=f"app-{number:02d}", vnf_id=None, group=None)


def _draw_workload(
    rng: random.Random, flavors: Sequence[tuple[int, int]]
) -> tuple[str, tuple[int, int], int]:
    """(kind, flavor, number of VMs); the random draws of the original algorithm, in order."""
    kind = rng.choices(["as", "lb", "app"], weights=[50, 42, 8])[0]
    flavor = rng.choice(flavors)
    size = {"as": 2, "app": 1}.get(kind) or rng.choice(LB_SIZES)
    return kind, flavor, size


# --- the original filler ---------------------------------------------------------------------


def _fill_legacy(
    state: WorldState, rng: random.Random, vnfms: int, flavors: Sequence[tuple[int, int]]
) -> WorldState:
    builder = _LegacyBuilder(state, rng, vnfms, flavors)
    misses = 0
    while misses < MAX_CONSECUTIVE_MISSES:
        candidate = builder.try_add_workload()
        if candidate is not None and _legacy_accepts(candidate):
            builder.state = candidate
            misses = 0
        else:
            misses += 1
    return builder.state


def _legacy_accepts(state: WorldState) -> bool:
    """`satisfies_spare_capacity`, trying the sufficient condition before the exact check."""
    index = PlacementIndex.of(state)
    usages = [index.usage[n] for n in state.nodes]
    frees = [index.free(n) for n in state.nodes.values()]
    if sum(f[0] for f in frees) < max(u[0] for u in usages):
        return False
    if sum(f[1] for f in frees) < max(u[1] for u in usages):
        return False
    return roomy_nodes_suffice(state, index) or every_node_evacuable(state, index)


class _LegacyBuilder:
    def __init__(
        self,
        state: WorldState,
        rng: random.Random,
        vnfms: int,
        flavors: Sequence[tuple[int, int]],
    ) -> None:
        self.state = state
        self.rng = rng
        self.flavors = flavors
        self.maker = _Maker(vnfms)
        self.counters = {"as": 0, "lb": 0, "app": 0}

    def try_add_workload(self) -> WorldState | None:
        """A copy of the state with one more workload, or None if it does not fit at all."""
        kind = self.rng.choices(["as", "lb", "app"], weights=[50, 42, 8])[0]
        flavor = self.rng.choice(self.flavors)
        size = {"as": 2, "app": 1}.get(kind) or self.rng.choice(LB_SIZES)
        # Adding a workload only inserts VMs and VNFs: copying the two dicts isolates it.
        scratch = self.state.model_copy(
            update={"vms": dict(self.state.vms), "vnfs": dict(self.state.vnfs)}
        )
        nodes = self._pick_nodes(scratch, flavor, size)
        if nodes is None:
            return None
        self.counters[kind] += 1
        add = {
            "as": self.maker.add_active_standby,
            "lb": self.maker.add_load_balanced,
            "app": self.maker.add_loose_vm,
        }[kind]
        add(scratch, flavor, self.counters[kind], nodes)
        return scratch

    def _pick_nodes(
        self, state: WorldState, flavor: tuple[int, int], count: int
    ) -> list[str] | None:
        """`count` distinct nodes that fit the flavor, spread over failure domains first,
        then by most free vcpus, with a seeded tie-break."""
        index = PlacementIndex.of(state)
        free = {n.id: index.free(n) for n in state.nodes.values()}
        chosen: list[str] = []
        domains_used: dict[str, int] = {}
        for _ in range(count):
            fitting = [
                n
                for n in state.nodes.values()
                if n.id not in chosen and free[n.id][0] >= flavor[0] and free[n.id][1] >= flavor[1]
            ]
            if not fitting:
                return None
            best = min(
                fitting,
                key=lambda n: (
                    domains_used.get(n.failure_domain, 0),
                    -free[n.id][0],
                    self.rng.random(),
                ),
            )
            chosen.append(best.id)
            domains_used[best.failure_domain] = domains_used.get(best.failure_domain, 0) + 1
        return chosen


# --- the scalable filler ---------------------------------------------------------------------

# A node in a failure domain's heap: most free vcpus, then RAM, then a seeded rank; the version
# tells a stale entry (the node's free capacity changed since) from the current one.
_Entry = tuple[int, int, int, str, int]


class _ScalableFiller:
    """Fills `state` in place: O(log nodes) per workload and O(1) checks (module docstring)."""

    def __init__(
        self,
        state: WorldState,
        rng: random.Random,
        vnfms: int,
        flavors: Sequence[tuple[int, int]],
        *,
        spare_fraction: float | None,
        exact_fallback: bool,
    ) -> None:
        self.state = state
        self.rng = rng
        self.flavors = flavors
        self.maker = _Maker(vnfms)
        self.spare_fraction = spare_fraction
        self.exact_fallback = exact_fallback
        self.counters = {"as": 0, "lb": 0, "app": 0}
        nodes = list(state.nodes.values())
        order = [n.id for n in nodes]
        rng.shuffle(order)
        self.rank = {node_id: i for i, node_id in enumerate(order)}
        self.domain = {n.id: n.failure_domain for n in nodes}
        self.free = {n.id: (n.vcpus, n.ram_mb) for n in nodes}
        self.used = {n.id: (0, 0) for n in nodes}
        self.count = {n.id: 0 for n in nodes}
        self.version = {n.id: 0 for n in nodes}
        self.heaps: dict[str, list[_Entry]] = {}
        for n in nodes:
            self.heaps.setdefault(n.failure_domain, []).append(self._entry(n.id))
        for heap in self.heaps.values():
            heapq.heapify(heap)
        self.total = (sum(n.vcpus for n in nodes), sum(n.ram_mb for n in nodes))
        self.free_total = self.total
        self.max_used = (0, 0)
        self.roomy_need = (max(f[0] for f in flavors), max(f[1] for f in flavors))
        self.roomy = sum(1 for n in nodes if self._is_roomy(self.free[n.id]))
        self.max_count = 0
        self.max_group = 1

    def _entry(self, node_id: str) -> _Entry:
        vcpus, ram = self.free[node_id]
        return (-vcpus, -ram, self.rank[node_id], node_id, self.version[node_id])

    def _is_roomy(self, free: tuple[int, int]) -> bool:
        return free[0] >= self.roomy_need[0] and free[1] >= self.roomy_need[1]

    def fill(self) -> None:
        misses = 0
        while misses < MAX_CONSECUTIVE_MISSES:
            misses = 0 if self.try_add_workload() else misses + 1

    def try_add_workload(self) -> bool:
        kind, flavor, size = _draw_workload(self.rng, self.flavors)
        nodes = self._pick_nodes(flavor, size)
        if nodes is None or not self._within_spare(flavor, nodes):
            return False
        grouped = kind != "app"
        if not self._roomy_enough(flavor, nodes, grouped):
            if not self.exact_fallback or not self._exactly_evacuable(kind, flavor, nodes):
                return False
        else:
            self._add(kind, flavor, nodes)
        for node_id in nodes:
            self._account(node_id, flavor)
        self.max_group = max(self.max_group, len(nodes) if grouped else 1)
        return True

    def _add(self, kind: str, flavor: tuple[int, int], nodes: list[str]) -> None:
        self.counters[kind] += 1
        add = {
            "as": self.maker.add_active_standby,
            "lb": self.maker.add_load_balanced,
            "app": self.maker.add_loose_vm,
        }[kind]
        add(self.state, flavor, self.counters[kind], nodes)

    def _pick_nodes(self, flavor: tuple[int, int], count: int) -> list[str] | None:
        """`count` distinct nodes that fit the flavor: each time the roomiest node (vcpus,
        then RAM, then seeded rank) of a failure domain used least by this workload so far.
        (A domain whose roomiest node lacks RAM for the flavor counts as full for it.)"""
        chosen: list[str] = []
        popped: list[_Entry] = []
        used: dict[str, int] = {}
        try:
            for _ in range(count):
                best: tuple[int, _Entry, str] | None = None
                for domain, heap in self.heaps.items():
                    top = self._top(heap)
                    if top is None or -top[0] < flavor[0] or -top[1] < flavor[1]:
                        continue
                    candidate = (used.get(domain, 0), top, domain)
                    if best is None or candidate[:2] < best[:2]:
                        best = candidate
                if best is None:
                    return None
                entry = heapq.heappop(self.heaps[best[2]])
                popped.append(entry)
                chosen.append(entry[3])
                used[best[2]] = used.get(best[2], 0) + 1
            return chosen
        finally:
            for entry in popped:
                heapq.heappush(self.heaps[self.domain[entry[3]]], entry)

    def _top(self, heap: list[_Entry]) -> _Entry | None:
        while heap and heap[0][4] != self.version[heap[0][3]]:
            heapq.heappop(heap)  # stale
        return heap[0] if heap else None

    def _within_spare(self, flavor: tuple[int, int], nodes: list[str]) -> bool:
        n = len(nodes)
        free_after = (self.free_total[0] - n * flavor[0], self.free_total[1] - n * flavor[1])
        if self.spare_fraction is not None:
            return (
                free_after[0] >= self.spare_fraction * self.total[0]
                and free_after[1] >= self.spare_fraction * self.total[1]
            )
        most_used = self.max_used
        for node_id in nodes:
            used = self.used[node_id]
            most_used = (
                max(most_used[0], used[0] + flavor[0]),
                max(most_used[1], used[1] + flavor[1]),
            )
        return free_after[0] >= most_used[0] and free_after[1] >= most_used[1]

    def _roomy_enough(self, flavor: tuple[int, int], nodes: list[str], grouped: bool) -> bool:
        roomy = self.roomy
        max_count = self.max_count
        for node_id in nodes:
            free = self.free[node_id]
            if self._is_roomy(free) and not self._is_roomy(
                (free[0] - flavor[0], free[1] - flavor[1])
            ):
                roomy -= 1
            max_count = max(max_count, self.count[node_id] + 1)
        max_group = max(self.max_group, len(nodes) if grouped else 1)
        return roomy >= max_count + max_group

    def _exactly_evacuable(self, kind: str, flavor: tuple[int, int], nodes: list[str]) -> bool:
        """Add the workload if every node stays evacuable (the exact check); else leave the
        state as it was."""
        vms_before, vnfs_before = len(self.state.vms), len(self.state.vnfs)
        counters = dict(self.counters)
        self._add(kind, flavor, nodes)
        if every_node_evacuable(self.state):
            return True
        for vm_id in list(self.state.vms)[vms_before:]:
            del self.state.vms[vm_id]
        for vnf_id in list(self.state.vnfs)[vnfs_before:]:
            del self.state.vnfs[vnf_id]
        self.counters = counters
        return False

    def _account(self, node_id: str, flavor: tuple[int, int]) -> None:
        """The filler's own books after a VM of `flavor` landed on `node_id`."""
        free = self.free[node_id]
        after = (free[0] - flavor[0], free[1] - flavor[1])
        if self._is_roomy(free) and not self._is_roomy(after):
            self.roomy -= 1
        self.free[node_id] = after
        used = self.used[node_id]
        self.used[node_id] = (used[0] + flavor[0], used[1] + flavor[1])
        self.max_used = (
            max(self.max_used[0], self.used[node_id][0]),
            max(self.max_used[1], self.used[node_id][1]),
        )
        self.free_total = (self.free_total[0] - flavor[0], self.free_total[1] - flavor[1])
        self.count[node_id] += 1
        self.max_count = max(self.max_count, self.count[node_id])
        self.version[node_id] += 1
        heapq.heappush(self.heaps[self.domain[node_id]], self._entry(node_id))
