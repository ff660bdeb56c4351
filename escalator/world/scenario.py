"""Seeded generator of a plausible cloud: nodes over failure domains, VNFs and loose VMs.

The cloud is filled until adding more would break one of two properties, so that a rolling
upgrade is possible but not trivially roomy:
- the free capacity across the cloud covers the most loaded node's VMs;
- for every node, all its VMs can be live-migrated elsewhere under the placement rules
  (capacity and anti-affinity), checked with a greedy plan.
Generation is deterministic for a given seed.
"""

from __future__ import annotations

import random
from typing import Any

from escalator.world.engine import PlacementIndex, plan_evacuation
from escalator.world.model import MemberSync, Node, Timings, Vm, Vnf, WorldState

# (vcpus, ram_mb). Small flavors keep fragmentation low, so the cloud can be filled until the
# spare capacity is about one node's worth; larger ones leave about twice that stranded.
FLAVORS: tuple[tuple[int, int], ...] = ((2, 4096), (4, 8192))
# Consecutive failed attempts to add a workload before the cloud counts as full.
MAX_CONSECUTIVE_MISSES = 30


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
) -> WorldState:
    if nodes < 2:
        raise ValueError("need at least 2 nodes")
    if not 1 <= failure_domains <= nodes:
        raise ValueError("failure_domains must be between 1 and the number of nodes")
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
    builder = _Builder(state, rng, vnfms)
    misses = 0
    while misses < MAX_CONSECUTIVE_MISSES:
        candidate = builder.try_add_workload()
        if candidate is not None and satisfies_spare_capacity(candidate):
            builder.state = candidate
            misses = 0
        else:
            misses += 1
    return builder.state


def satisfies_spare_capacity(state: WorldState) -> bool:
    """Free capacity covers the most loaded node, and every node can be evacuated."""
    index = PlacementIndex.of(state)
    usages = [index.usage[n] for n in state.nodes]
    frees = [index.free(n) for n in state.nodes.values()]
    if sum(f[0] for f in frees) < max(u[0] for u in usages):
        return False
    if sum(f[1] for f in frees) < max(u[1] for u in usages):
        return False
    return all(plan_evacuation(state, n) is not None for n in state.nodes)


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


class _Builder:
    def __init__(self, state: WorldState, rng: random.Random, vnfms: int) -> None:
        self.state = state
        self.rng = rng
        self.vnfms = max(1, vnfms)
        self.counters = {"as": 0, "lb": 0, "app": 0}

    def try_add_workload(self) -> WorldState | None:
        """A copy of the state with one more workload, or None if it does not fit at all."""
        kind = self.rng.choices(["as", "lb", "app"], weights=[50, 42, 8])[0]
        flavor = self.rng.choice(FLAVORS)
        # Adding a workload only inserts VMs and VNFs: copying the two dicts isolates it.
        scratch = self.state.model_copy(
            update={"vms": dict(self.state.vms), "vnfs": dict(self.state.vnfs)}
        )
        counters = dict(self.counters)
        added = {
            "as": self._add_active_standby,
            "lb": self._add_load_balanced,
            "app": self._add_loose_vm,
        }[kind](scratch, flavor, counters)
        if not added:
            return None
        self.counters = counters
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

    def _place_vm(
        self,
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

    def _vnfm_for(self, index: int) -> str:
        return f"vnfm-{(index - 1) % self.vnfms + 1}"

    def _add_members(
        self,
        state: WorldState,
        flavor: tuple[int, int],
        vnf_id: str,
        nodes: list[str],
    ) -> list[str]:
        return [
            self._place_vm(
                state, node_id, flavor, name=f"{vnf_id}-m{k}", vnf_id=vnf_id, group=f"sg-{vnf_id}"
            )
            for k, node_id in enumerate(nodes)
        ]

    def _add_active_standby(
        self, state: WorldState, flavor: tuple[int, int], counters: dict[str, int]
    ) -> bool:
        nodes = self._pick_nodes(state, flavor, 2)
        if nodes is None:
            return False
        counters["as"] += 1
        vnf_id = f"vnf-as-{counters['as']:02d}"
        members = self._add_members(state, flavor, vnf_id, nodes)
        state.vnfs[vnf_id] = Vnf(
            id=vnf_id,
            vnfm_id=self._vnfm_for(counters["as"]),
            redundancy="active_standby",
            members=members,
            active_member=members[0],
            min_in_service=1,
            max_unavailable=1,
            min_recovery_s=state.timings.resync_s,
            sync={m: MemberSync() for m in members},
        )
        return True

    def _add_load_balanced(
        self, state: WorldState, flavor: tuple[int, int], counters: dict[str, int]
    ) -> bool:
        size = self.rng.choice([3, 4])
        nodes = self._pick_nodes(state, flavor, size)
        if nodes is None:
            return False
        counters["lb"] += 1
        vnf_id = f"vnf-lb-{counters['lb']:02d}"
        members = self._add_members(state, flavor, vnf_id, nodes)
        state.vnfs[vnf_id] = Vnf(
            id=vnf_id,
            vnfm_id=self._vnfm_for(counters["lb"] + 1),
            redundancy="load_balanced",
            members=members,
            load_share={m: 1.0 / size for m in members},
            min_in_service=size - 1,
            max_unavailable=1,
            min_recovery_s=0.0,
        )
        return True

    def _add_loose_vm(
        self, state: WorldState, flavor: tuple[int, int], counters: dict[str, int]
    ) -> bool:
        nodes = self._pick_nodes(state, flavor, 1)
        if nodes is None:
            return False
        counters["app"] += 1
        self._place_vm(
            state, nodes[0], flavor, name=f"app-{counters['app']:02d}", vnf_id=None, group=None
        )
        return True
