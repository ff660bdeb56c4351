"""The world engine: every state change of the simulated cloud, as synchronous calls.

No I/O and an injectable clock, so it is unit-testable with a manual clock. Each public
operation is one synchronous call that first catches up with time (`tick`), then validates and
applies the change, then lets the service monitor observe the result. Because the HTTP server is
single-threaded asyncio and never awaits inside an operation, every operation is atomic; in
particular a capacity check and the matching reservation can never be split by another request.

Durations are nominal seconds divided by `speed`.

Scale (10,000 nodes, 200,000 VMs): the engine keeps indexes beside the state (`_Indexes`: VMs
by node, incoming migrations by node, per-node usage and server-group locations, VMs migrating,
nodes down, members resyncing), updated by the few places that move a VM, reboot a node or
start a resync. So a per-node call (list, claim, migrate, reboot, inventory of some nodes) and a
tick cost what the node or the work in flight costs, not a walk over every VM; the service
monitor is asked only about what can be impaired (`_observe`). Only whole-cloud answers
(snapshot, inventory of every node, VNF list) are linear. The state must be changed through the
engine once it is handed over; `check_indexes` verifies the indexes against a full rebuild.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from escalator.world.errors import Conflict, InvalidRequest, NotFound
from escalator.world.model import (
    Interruption,
    MemberSync,
    Node,
    NodeView,
    RebootRecord,
    SavedServiceStatus,
    Vm,
    VmView,
    Vnf,
    VnfView,
    WorldSnapshot,
    WorldState,
)
from escalator.world.monitor import members_in_service, observe_some, vm_is_up

Clock = Callable[[], float]


# --- placement rules (pure functions of a state) ------------------------------------------------


@dataclass(frozen=True)
class PlacementIndex:
    """Per-node usage and server-group locations of one state, computed in one pass so that
    checking many candidate nodes costs O(nodes) instead of O(nodes x VMs). The engine keeps
    one up to date as VMs move (its dicts are mutated in place)."""

    usage: dict[str, tuple[int, int]]
    # server group -> [(vm id, node id)] for every node a member is on or migrating toward
    group_locations: dict[str, list[tuple[str, str]]]

    @classmethod
    def of(cls, state: WorldState) -> PlacementIndex:
        usage = {node_id: (0, 0) for node_id in state.nodes}
        groups: dict[str, list[tuple[str, str]]] = {}
        for vm in state.vms.values():
            for node_id in (vm.node_id, vm.migration_target):
                if node_id is None:
                    continue
                vcpus, ram = usage.get(node_id, (0, 0))
                usage[node_id] = (vcpus + vm.vcpus, ram + vm.ram_mb)
                if vm.server_group is not None:
                    groups.setdefault(vm.server_group, []).append((vm.id, node_id))
        return cls(usage, groups)

    def free(self, node: Node) -> tuple[int, int]:
        used_vcpus, used_ram = self.usage.get(node.id, (0, 0))
        return node.vcpus - used_vcpus, node.ram_mb - used_ram

    def add(self, vm: Vm, node_id: str) -> None:
        """`vm` now uses room on `node_id` (placed there or migrating toward it)."""
        vcpus, ram = self.usage.get(node_id, (0, 0))
        self.usage[node_id] = (vcpus + vm.vcpus, ram + vm.ram_mb)
        if vm.server_group is not None:
            self.group_locations.setdefault(vm.server_group, []).append((vm.id, node_id))

    def remove(self, vm: Vm, node_id: str) -> None:
        """`vm` no longer uses room on `node_id`."""
        vcpus, ram = self.usage.get(node_id, (0, 0))
        self.usage[node_id] = (vcpus - vm.vcpus, ram - vm.ram_mb)
        if vm.server_group is not None:
            locations = self.group_locations.get(vm.server_group, [])
            locations.remove((vm.id, node_id))
            if not locations:
                self.group_locations.pop(vm.server_group, None)


def node_usage(state: WorldState, node_id: str) -> tuple[int, int]:
    """(vcpus, ram_mb) used on a node: VMs placed there plus migrations reserved toward it."""
    return PlacementIndex.of(state).usage.get(node_id, (0, 0))


def node_free(state: WorldState, node_id: str) -> tuple[int, int]:
    return PlacementIndex.of(state).free(state.nodes[node_id])


def placement_refusal(
    state: WorldState, vm: Vm, node: Node, index: PlacementIndex | None = None
) -> str | None:
    """Why `vm` may not migrate to `node`, or None when it may. Pass `index` when checking
    many nodes against the same state."""
    if node.id == vm.node_id:
        return f"VM {vm.id} already runs on {node.id}"
    if node.power != "up":
        return f"node {node.id} is {node.power}"
    if node.maintenance_holder is not None:
        return f"node {node.id} is in maintenance (held by {node.maintenance_holder})"
    if node.service_status != "enabled":
        return f"compute service on {node.id} is disabled"
    index = index or PlacementIndex.of(state)
    if vm.server_group is not None:
        for other_id, other_node in index.group_locations.get(vm.server_group, []):
            if other_id != vm.id and other_node == node.id:
                return (
                    f"anti-affinity: {other_id} of server group {vm.server_group}"
                    f" is already on {node.id}"
                )
    free_vcpus, free_ram = index.free(node)
    if free_vcpus < vm.vcpus or free_ram < vm.ram_mb:
        return (
            f"node {node.id} lacks capacity for {vm.id}: needs {vm.vcpus} vcpus/{vm.ram_mb} MB,"
            f" free {free_vcpus} vcpus/{free_ram} MB"
        )
    return None


def valid_destinations(
    state: WorldState,
    vm: Vm,
    index: PlacementIndex | None = None,
    avoid: Collection[str] = (),
) -> list[str]:
    """Node ids `vm` may migrate to, best first: most free vcpus, then RAM, then by id. Nodes
    in `avoid` are left out."""
    index = index or PlacementIndex.of(state)
    candidates = [
        n
        for n in state.nodes.values()
        if n.id not in avoid and placement_refusal(state, vm, n, index) is None
    ]
    candidates.sort(key=lambda n: (*(-f for f in index.free(n)), n.id))
    return [n.id for n in candidates]


def best_destination(
    state: WorldState, vm: Vm, index: PlacementIndex, avoid: Collection[str] = ()
) -> str | None:
    """`valid_destinations(...)[0]` without sorting them all: one pass over the nodes. Nodes in
    `avoid` (destinations that failed for this VM before) are never picked."""
    best: tuple[int, int, str] | None = None
    for node in state.nodes.values():
        if node.power != "up" or node.maintenance_holder is not None or node.id == vm.node_id:
            continue
        if node.id in avoid:
            continue
        if node.service_status != "enabled":
            continue
        used_vcpus, used_ram = index.usage.get(node.id, (0, 0))
        key = (used_vcpus - node.vcpus, used_ram - node.ram_mb, node.id)
        if best is not None and key >= best:
            continue  # cheaper than the full check, and the order is all that is asked
        if placement_refusal(state, vm, node, index) is None:
            best = key
    return None if best is None else best[2]


def plan_evacuation(
    state: WorldState, node_id: str, index: PlacementIndex | None = None
) -> dict[str, str] | None:
    """A destination for every VM on `node_id` (largest first, greedily: each to the valid node
    with the most free vcpus, then RAM, then by id), or None if some VM would find no room.

    Works on scratch copies of the usage: the given state (and `index`, the placement index of
    that state if the caller has one) is not touched."""
    base = index or PlacementIndex.of(state)
    # Only VM placement and this node's maintenance flag change: shallow copies suffice.
    nodes = {
        **state.nodes,
        node_id: state.nodes[node_id].model_copy(update={"maintenance_holder": "evacuation-plan"}),
    }
    scratch_state = WorldState.model_construct(nodes=nodes, vms=state.vms)
    scratch = PlacementIndex(
        dict(base.usage), {g: list(locs) for g, locs in base.group_locations.items()}
    )
    plan: dict[str, str] = {}
    on_node = [vm for vm in state.vms.values() if vm.node_id == node_id]
    on_node.sort(key=lambda vm: (-vm.vcpus, -vm.ram_mb, vm.id))
    for vm in on_node:
        destination = best_destination(scratch_state, vm, scratch)
        if destination is None:
            return None
        plan[vm.id] = destination
        scratch.remove(vm, node_id)
        scratch.add(vm, destination)
    return plan


# --- the engine ---------------------------------------------------------------------------------


@dataclass
class _Indexes:
    """Everything the engine looks up by node or keeps "in flight", derived from the state.

    `build` derives it in one pass; the engine then updates it with every change it makes, and
    `check_indexes` compares it with a fresh `build` (tests call it after random operations)."""

    placement: PlacementIndex
    on_node: dict[str, set[str]]  # node -> VMs placed there (migrating away or not)
    incoming: dict[str, set[str]]  # node -> VMs migrating toward it
    migrating: set[str]
    down: set[str]  # node ids whose VMs are down: not "up", or unknown to the state
    resyncing: set[tuple[str, str]]  # (vnf, member)
    # static: VMs and VNFs are neither created nor deleted by the engine
    vm_position: dict[str, int] = field(default_factory=dict)
    vnf_position: dict[str, int] = field(default_factory=dict)
    member_of: dict[str, list[str]] = field(default_factory=dict)  # VM -> VNFs listing it

    @classmethod
    def build(cls, state: WorldState) -> _Indexes:
        on_node: dict[str, set[str]] = {}
        incoming: dict[str, set[str]] = {}
        migrating: set[str] = set()
        for vm in state.vms.values():
            on_node.setdefault(vm.node_id, set()).add(vm.id)
            if vm.migration_target is not None:
                incoming.setdefault(vm.migration_target, set()).add(vm.id)
            if vm.status == "migrating":
                migrating.add(vm.id)
        down = {n.id for n in state.nodes.values() if n.power != "up"}
        down |= {node_id for node_id in on_node if node_id not in state.nodes}
        member_of: dict[str, list[str]] = {}
        resyncing: set[tuple[str, str]] = set()
        for vnf in state.vnfs.values():
            for member in vnf.members:
                member_of.setdefault(member, []).append(vnf.id)
            for member, sync in vnf.sync.items():
                if sync.state == "resyncing":
                    resyncing.add((vnf.id, member))
        return cls(
            placement=PlacementIndex.of(state),
            on_node=on_node,
            incoming=incoming,
            migrating=migrating,
            down=down,
            resyncing=resyncing,
            vm_position={vm_id: i for i, vm_id in enumerate(state.vms)},
            vnf_position={vnf_id: i for i, vnf_id in enumerate(state.vnfs)},
            member_of=member_of,
        )

    def comparable(self) -> dict[str, Any]:
        """The dynamic parts in a form where equal means consistent (list orders aside)."""
        return {
            "usage": {n: u for n, u in self.placement.usage.items() if u != (0, 0)},
            "groups": {g: sorted(v) for g, v in self.placement.group_locations.items() if v},
            "on_node": {n: v for n, v in self.on_node.items() if v},
            "incoming": {n: v for n, v in self.incoming.items() if v},
            "migrating": self.migrating,
            "down": self.down,
            "resyncing": self.resyncing,
        }

    def in_state_order(self, vm_ids: Iterable[str]) -> list[str]:
        return sorted(vm_ids, key=self.vm_position.__getitem__)


class WorldEngine:
    def __init__(self, state: WorldState, clock: Clock = time.time, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.state = state
        self.speed = speed
        self._clock = clock
        self._now = clock()
        self._ix = _Indexes.build(state)
        # VNFs whose impairments may have changed for a reason other than a node being down
        self._touched_vnfs: set[str] = set()
        self._inventory_cache: dict[str, str] = {}  # node -> JSON of its inventory
        # injected migration faults: node -> how many of the next migrations toward it fail,
        # and the VMs whose migration under way will fail (`inject_migration_faults`)
        self._migration_faults: dict[str, int] = {}
        self._failing_migrations: set[str] = set()
        self._open: list[Interruption] = [i for i in state.interruptions if i.ended_at is None]
        logged = len(state.interruptions)
        # Everything, once (the same as `observe`).
        observe_some(self.state, self._now, list(state.vnfs), list(state.vms), self._open)
        self._refresh_open(logged)

    @property
    def now(self) -> float:
        return self._now

    def scaled(self, nominal_s: float) -> float:
        return nominal_s / self.speed

    def check_indexes(self) -> None:
        """Raise AssertionError if the engine's indexes (and cached inventory, and open
        intervals) disagree with its state."""
        fresh = _Indexes.build(self.state)
        assert self._ix.comparable() == fresh.comparable(), "engine indexes out of date"
        for node_id, fragment in self._inventory_cache.items():
            fresh_fragment = json.dumps(
                self._inventory_of(self.state.nodes[node_id]), separators=(",", ":")
            )
            assert fragment == fresh_fragment, f"inventory of {node_id} out of date"
        open_now = [i for i in self.state.interruptions if i.ended_at is None]
        assert [id(i) for i in self._open] == [id(i) for i in open_now], "open intervals"
        assert self._failing_migrations <= self._ix.migrating, "failing migrations not migrating"

    # monitoring -------------------------------------------------------------------------------

    def _observe(self) -> None:
        """Let the monitor see the state, asking only about what can be impaired: VNFs with a
        member on a down node, VNFs touched since the last observation and VMs of no VNF on a
        down node, plus whatever has an interval open. Anything else was not impaired at the
        last observation and nothing it depends on changed (its members' nodes are up, and
        active member and load shares only change by the VNFM actions that touch it), so it is
        not impaired now: this gives the same log as observing everything."""
        ix = self._ix
        vnf_ids = set(self._touched_vnfs)
        self._touched_vnfs.clear()
        loose: set[str] = set()
        for node_id in ix.down:
            for vm_id in ix.on_node.get(node_id, ()):
                vnfs = ix.member_of.get(vm_id)
                if vnfs:
                    vnf_ids.update(vnfs)
                if self.state.vms[vm_id].vnf_id is None:
                    loose.add(vm_id)
        for record in self._open:
            if record.vnf_id is None:
                loose.update(record.members)
            else:
                vnf_ids.add(record.vnf_id)
        logged = len(self.state.interruptions)
        observe_some(
            self.state,
            self._now,
            sorted(vnf_ids, key=lambda v: ix.vnf_position.get(v, -1)),
            sorted(loose, key=lambda v: ix.vm_position.get(v, -1)),
            self._open,
        )
        self._refresh_open(logged)

    def _refresh_open(self, logged: int) -> None:
        self._open = [i for i in self._open if i.ended_at is None] + [
            i for i in self.state.interruptions[logged:] if i.ended_at is None
        ]

    def _touch(self, vm_id: str) -> None:
        self._touched_vnfs.update(self._ix.member_of.get(vm_id, ()))

    # time -------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Advance to `now` (default: the clock), completing due migrations, reboots and resyncs
        in time order so that the monitor sees each at the moment it happened."""
        target = max(self._clock() if now is None else now, self._now)
        while (event := self._next_due_event(target)) is not None:
            at, apply = event
            self._now = max(self._now, at)
            apply()
            self._observe()
        self._now = target

    def _next_due_event(self, until: float) -> tuple[float, Callable[[], None]] | None:
        best: tuple[float, int, str] | None = None
        apply: Callable[[], None] | None = None
        ix = self._ix
        for node_id in ix.down:
            node = self.state.nodes.get(node_id)
            if node is not None and node.power == "rebooting" and node.reboot is not None:
                key = (node.reboot.finishes_at, 0, node.id)
                if key[0] <= until and (best is None or key < best):
                    best, apply = key, self._finisher_reboot(node)
        for vm_id in ix.migrating:
            vm = self.state.vms[vm_id]
            finishes_at = vm.migration_finishes_at
            if finishes_at is not None and finishes_at <= until:
                key = (finishes_at, 1, vm.id)
                if best is None or key < best:
                    best, apply = key, self._finisher_migration(vm)
        for vnf_id, member in ix.resyncing:
            vnf = self.state.vnfs[vnf_id]
            sync = vnf.sync[member]
            if sync.until is not None and sync.until <= until:
                key = (sync.until, 2, f"{vnf.id}/{member}")
                if best is None or key < best:
                    best, apply = key, self._finisher_resync(vnf, member)
        if best is None or apply is None:
            return None
        return best[0], apply

    def _finisher_reboot(self, node: Node) -> Callable[[], None]:
        def finish() -> None:
            record = node.reboot
            assert record is not None
            node.power = "up"
            self._ix.down.discard(node.id)
            self._changed(node.id)
            for vm_id in self._ix.on_node.get(node.id, ()):
                self._touch(vm_id)
            record.finished_at = record.finishes_at
            record.state = "failed" if record.will_fail else "succeeded"
            if not record.will_fail and record.target_version is not None:
                node.installed_version = record.target_version
            self._start_resync_of_members_on(node.id, record.finishes_at)

        return finish

    def _finisher_migration(self, vm: Vm) -> Callable[[], None]:
        def finish() -> None:
            assert vm.migration_target is not None
            ix = self._ix
            source, destination = vm.node_id, vm.migration_target
            if vm.id in self._failing_migrations:
                # It never lands: it stays where it runs, and the room reserved is given back.
                ix.placement.remove(vm, destination)
            else:
                ix.placement.remove(vm, source)  # its reservation on the destination: used
                ix.on_node[source].discard(vm.id)
                ix.on_node.setdefault(destination, set()).add(vm.id)
                vm.node_id = destination
            ix.incoming[destination].discard(vm.id)
            ix.migrating.discard(vm.id)
            self._failing_migrations.discard(vm.id)
            vm.status = "active"
            vm.migration_target = None
            vm.migration_started_at = None
            vm.migration_finishes_at = None
            self._touch(vm.id)
            self._changed(source, destination)

        return finish

    def _finisher_resync(self, vnf: Vnf, member: str) -> Callable[[], None]:
        def finish() -> None:
            sync = vnf.sync[member]
            sync.state = "in_sync"
            sync.until = None
            self._ix.resyncing.discard((vnf.id, member))

        return finish

    def _start_resync_of_members_on(self, node_id: str, at: float) -> None:
        # A rebooted active-standby member must re-replicate state before it can take over.
        resync = self.scaled(self.state.timings.resync_s)
        if resync <= 0:
            return
        ix = self._ix
        members = [
            (ix.vnf_position[vnf_id], self.state.vnfs[vnf_id].members.index(vm_id), vnf_id, vm_id)
            for vm_id in ix.on_node.get(node_id, ())
            for vnf_id in ix.member_of.get(vm_id, ())
            if self.state.vnfs[vnf_id].redundancy == "active_standby"
        ]
        for _, _, vnf_id, member in sorted(members):
            self.state.vnfs[vnf_id].sync[member] = MemberSync(state="resyncing", until=at + resync)
            ix.resyncing.add((vnf_id, member))

    def _begin(self) -> float:
        self.tick()
        return self._now

    def _commit(self) -> None:
        self._observe()
        # Zero-length durations are due immediately.
        self.tick(self._now)

    # lookups ----------------------------------------------------------------------------------

    def _node(self, node_id: str) -> Node:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise NotFound(f"unknown node {node_id!r}")
        return node

    def _vm(self, vm_id: str) -> Vm:
        vm = self.state.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"unknown VM {vm_id!r}")
        return vm

    def _vnf(self, vnf_id: str) -> Vnf:
        vnf = self.state.vnfs.get(vnf_id)
        if vnf is None:
            raise NotFound(f"unknown VNF {vnf_id!r}")
        return vnf

    @staticmethod
    def _member(vnf: Vnf, member: str) -> str:
        if member not in vnf.members:
            raise InvalidRequest(f"{member!r} is not a member of VNF {vnf.id}")
        return member

    def _placed_on(self, node_id: str) -> list[str]:
        """VMs placed on the node, in state order."""
        return self._ix.in_state_order(self._ix.on_node.get(node_id, ()))

    def _incoming_to(self, node_id: str) -> list[str]:
        """VMs migrating toward the node, in state order."""
        return self._ix.in_state_order(self._ix.incoming.get(node_id, ()))

    # views ------------------------------------------------------------------------------------

    def _node_view(self, node: Node) -> NodeView:
        used_vcpus, used_ram = self._ix.placement.usage.get(node.id, (0, 0))
        return NodeView(
            **node.model_dump(),
            used_vcpus=used_vcpus,
            used_ram_mb=used_ram,
            free_vcpus=node.vcpus - used_vcpus,
            free_ram_mb=node.ram_mb - used_ram,
            vm_ids=self._placed_on(node.id),
            incoming_vm_ids=self._incoming_to(node.id),
            fail_next_migrations_to=self._migration_faults.get(node.id, 0),
        )

    def _vm_view(self, vm: Vm, incoming: bool = False) -> VmView:
        return VmView(
            **vm.model_dump(),
            up=vm_is_up(self.state, vm.id),
            incoming=incoming,
            migration_will_fail=vm.id in self._failing_migrations,
        )

    def _vnf_view(self, vnf: Vnf) -> VnfView:
        return VnfView(
            **vnf.model_dump(),
            member_nodes={m: self.state.vms[m].node_id for m in vnf.members if m in self.state.vms},
            members_up=[m for m in vnf.members if vm_is_up(self.state, m)],
            members_in_service=(
                members_in_service(self.state, vnf)
                if vnf.redundancy == "load_balanced"
                else [m for m in [vnf.active_member] if m and vm_is_up(self.state, m)]
            ),
        )

    # queries ----------------------------------------------------------------------------------

    def snapshot(self) -> WorldSnapshot:
        self._begin()
        return WorldSnapshot(
            now=self._now,
            speed=self.speed,
            timings=self.state.timings.model_copy(),
            nodes=[self._node_view(n) for n in self.state.nodes.values()],
            vms=[self._vm_view(vm) for vm in self.state.vms.values()],
            vnfs=[self._vnf_view(v) for v in self.state.vnfs.values()],
            interruptions=[i.model_copy(deep=True) for i in self.state.interruptions],
        )

    def nodes(self) -> list[NodeView]:
        self._begin()
        return [self._node_view(n) for n in self.state.nodes.values()]

    def node(self, node_id: str) -> NodeView:
        self._begin()
        return self._node_view(self._node(node_id))

    def list_vms(self, node_id: str) -> list[VmView]:
        """VMs on the node, then migrations under way toward it (flagged `incoming`)."""
        self._begin()
        self._node(node_id)
        vms = self.state.vms
        return [self._vm_view(vms[v]) for v in self._placed_on(node_id)] + [
            self._vm_view(vms[v], incoming=True) for v in self._incoming_to(node_id)
        ]

    def inventory(self, node_ids: Collection[str] | None = None) -> list[dict[str, Any]]:
        """Every node (or the given ones, in that order) with its VMs, then the migrations under
        way toward it (`incoming`), as JSON-ready dicts in the shape of `InventoryNode`."""
        return [json.loads(fragment) for fragment in self._inventory_fragments(node_ids)]

    def inventory_json(self, node_ids: Collection[str] | None = None) -> str:
        """`{"nodes": inventory(node_ids)}` as JSON text, from per-node fragments cached until
        the node changes: at 10,000 nodes and 200,000 VMs, building the dicts and dumping them
        again on every call would cost most of a second."""
        return '{"nodes":[' + ",".join(self._inventory_fragments(node_ids)) + "]}"

    def inventory_ndjson(self, node_ids: Collection[str] | None = None) -> str:
        """The same nodes as newline-delimited JSON (one node per line), which a reader can
        parse node by node instead of in one long call."""
        return "".join(f + "\n" for f in self._inventory_fragments(node_ids))

    def _inventory_fragments(self, node_ids: Collection[str] | None) -> list[str]:
        self._begin()
        if node_ids is None:
            nodes: Iterable[Node] = self.state.nodes.values()
        else:
            nodes = [self._node(n) for n in node_ids]
        cache = self._inventory_cache
        out: list[str] = []
        for node in nodes:
            fragment = cache.get(node.id)
            if fragment is None:
                fragment = cache[node.id] = json.dumps(
                    self._inventory_of(node), separators=(",", ":")
                )
            out.append(fragment)
        return out

    def _inventory_of(self, node: Node) -> dict[str, Any]:
        vms = self.state.vms
        listed: list[dict[str, Any]] = []
        for ids, incoming in (
            (self._placed_on(node.id), False),
            (self._incoming_to(node.id), True),
        ):
            for vm_id in ids:
                vm = vms[vm_id]
                listed.append(
                    {
                        "id": vm.id,
                        "vnf_id": vm.vnf_id,
                        "vcpus": vm.vcpus,
                        "ram_mb": vm.ram_mb,
                        "incoming": incoming,
                    }
                )
        return {
            "id": node.id,
            "failure_domain": node.failure_domain,
            "vcpus": node.vcpus,
            "ram_mb": node.ram_mb,
            "power": node.power,
            "service_status": node.service_status,
            "maintenance_holder": node.maintenance_holder,
            "vms": listed,
        }

    def _changed(self, *node_ids: str | None) -> None:
        """These nodes' inventory changed (their fields, VMs or incoming migrations)."""
        for node_id in node_ids:
            if node_id is not None:
                self._inventory_cache.pop(node_id, None)

    def vm(self, vm_id: str) -> VmView:
        self._begin()
        return self._vm_view(self._vm(vm_id))

    def vnfs(self, vnf_ids: Iterable[str] | None = None) -> list[VnfView]:
        """Every VNF, or those of `vnf_ids` that exist (in that order, each once)."""
        self._begin()
        if vnf_ids is None:
            return [self._vnf_view(v) for v in self.state.vnfs.values()]
        wanted = (self.state.vnfs.get(v) for v in dict.fromkeys(vnf_ids))
        return [self._vnf_view(v) for v in wanted if v is not None]

    def vnf(self, vnf_id: str) -> VnfView:
        self._begin()
        return self._vnf_view(self._vnf(vnf_id))

    def interruptions(self) -> list[Interruption]:
        self._begin()
        return [i.model_copy(deep=True) for i in self.state.interruptions]

    # maintenance ------------------------------------------------------------------------------

    def claim_maintenance(self, node_id: str, holder: str) -> NodeView:
        """Compare-and-set: take maintenance of a free, enabled node. Idempotent per holder."""
        self._begin()
        if not holder:
            raise InvalidRequest("holder must be a non-empty string")
        node = self._node(node_id)
        if node.maintenance_holder == holder:
            return self._node_view(node)
        if node.maintenance_holder is not None:
            raise Conflict(
                f"node {node_id} is already in maintenance held by {node.maintenance_holder}"
            )
        if node.service_status == "disabled":
            raise Conflict(
                f"compute service on {node_id} was disabled by an administrator"
                f" ({node.admin_note or 'no note'})"
            )
        node.saved_status = SavedServiceStatus(
            service_status=node.service_status, admin_note=node.admin_note
        )
        node.service_status = "disabled"
        node.maintenance_holder = holder
        self._changed(node.id)
        self._commit()
        return self._node_view(node)

    def release_maintenance(self, node_id: str, holder: str) -> NodeView:
        """Only the holder may release; restores the status saved at claim. Releasing a node
        nobody holds is a no-op, so a holder retrying its release is fine."""
        self._begin()
        node = self._node(node_id)
        if node.maintenance_holder is None:
            return self._node_view(node)
        if node.maintenance_holder != holder:
            raise Conflict(
                f"node {node_id} maintenance is held by {node.maintenance_holder}, not {holder!r}"
            )
        saved = node.saved_status or SavedServiceStatus(service_status="enabled")
        node.service_status = saved.service_status
        node.admin_note = saved.admin_note
        node.saved_status = None
        node.maintenance_holder = None
        self._changed(node.id)
        self._commit()
        return self._node_view(node)

    def admin_disable(self, node_id: str, note: str | None = None) -> NodeView:
        """An operator disables the compute service by hand. During maintenance the change is
        recorded in the saved status, so it survives the release."""
        self._begin()
        node = self._node(node_id)
        if node.maintenance_holder is not None and node.saved_status is not None:
            node.saved_status = SavedServiceStatus(service_status="disabled", admin_note=note)
        else:
            node.service_status = "disabled"
            node.admin_note = note
        self._changed(node.id)
        self._commit()
        return self._node_view(node)

    def admin_enable(self, node_id: str) -> NodeView:
        self._begin()
        node = self._node(node_id)
        if node.maintenance_holder is not None and node.saved_status is not None:
            node.saved_status = SavedServiceStatus(service_status="enabled")
        else:
            node.service_status = "enabled"
            node.admin_note = None
        self._changed(node.id)
        self._commit()
        return self._node_view(node)

    # migration --------------------------------------------------------------------------------

    def migrate_vm(
        self, vm_id: str, destination: str | None = None, avoid: Collection[str] = ()
    ) -> VmView:
        """Start a live migration; capacity on the destination is reserved at once. Without a
        destination the node with the most free capacity among valid ones is chosen, never one
        of `avoid` (destinations that failed for this VM before; unknown ids are ignored). A
        named destination is taken as named: `avoid` only steers the placement.

        A migration toward a node with injected migration faults (`inject_migration_faults`)
        starts like any other and fails when it would land: see `_finisher_migration`."""
        now = self._begin()
        vm = self._vm(vm_id)
        if vm.status == "migrating":
            raise Conflict(f"VM {vm_id} is already migrating to {vm.migration_target}")
        if not vm_is_up(self.state, vm_id):
            raise Conflict(f"VM {vm_id} is down (node {vm.node_id} is rebooting)")
        if destination is not None:
            refusal = placement_refusal(self.state, vm, self._node(destination), self._ix.placement)
            if refusal is not None:
                raise Conflict(refusal)
        else:
            avoided = list(dict.fromkeys(avoid))
            destination = best_destination(self.state, vm, self._ix.placement, set(avoided))
            if destination is None:
                if avoided and best_destination(self.state, vm, self._ix.placement) is not None:
                    raise Conflict(
                        f"no valid destination for VM {vm_id} outside its avoided nodes"
                        f" {', '.join(avoided)}"
                    )
                raise Conflict(f"no valid destination for VM {vm_id}")
        faults = self._migration_faults.get(destination, 0)
        if faults > 0:
            self._migration_faults[destination] = faults - 1
            self._failing_migrations.add(vm.id)
        vm.status = "migrating"
        vm.migration_target = destination
        vm.migration_started_at = now
        vm.migration_finishes_at = now + self.scaled(self.state.timings.migration_s)
        self._ix.placement.add(vm, destination)
        self._ix.incoming.setdefault(destination, set()).add(vm.id)
        self._ix.migrating.add(vm.id)
        self._changed(destination)
        self._commit()
        return self._vm_view(vm)

    # reboot / upgrade -------------------------------------------------------------------------

    def reboot_node(
        self,
        node_id: str,
        duration_s: float | None = None,
        new_version: str | None = None,
        fail: bool = False,
    ) -> RebootRecord:
        """Reboot (and upgrade to `new_version`). Every VM on the node is down until it ends.
        A failing reboot leaves the version unchanged; faults injected with `inject_faults`
        make the next reboots fail too."""
        now = self._begin()
        node = self._node(node_id)
        if duration_s is not None and duration_s < 0:
            raise InvalidRequest("duration_s must be >= 0")
        if node.power == "rebooting":
            raise Conflict(f"node {node_id} is already rebooting")
        vms = self.state.vms
        in_flight = sorted(
            {v for v in self._ix.on_node.get(node_id, ()) if vms[v].status == "migrating"}
            | {v for v in self._ix.incoming.get(node_id, ()) if vms[v].status == "migrating"}
        )
        if in_flight:
            raise Conflict(f"migrations in flight from/to {node_id}: {', '.join(in_flight)}")
        will_fail = fail
        if not fail and node.fail_next_upgrades > 0:
            node.fail_next_upgrades -= 1
            will_fail = True
        nominal = self.state.timings.reboot_s if duration_s is None else duration_s
        node.reboot_count += 1
        node.power = "rebooting"
        self._ix.down.add(node.id)
        self._changed(node.id)
        node.reboot = RebootRecord(
            sequence=node.reboot_count,
            state="in_progress",
            started_at=now,
            finishes_at=now + self.scaled(nominal),
            previous_version=node.installed_version,
            target_version=new_version,
            will_fail=will_fail,
        )
        self._commit()
        assert node.reboot is not None
        return node.reboot.model_copy()

    def inject_faults(self, node_id: str, fail_next_upgrades: int) -> NodeView:
        self._begin()
        if fail_next_upgrades < 0:
            raise InvalidRequest("fail_next_upgrades must be >= 0")
        node = self._node(node_id)
        node.fail_next_upgrades = fail_next_upgrades
        self._commit()
        return self._node_view(node)

    def inject_migration_faults(self, node_id: str, fail_next_migrations_to: int) -> NodeView:
        """The next `fail_next_migrations_to` migrations toward the node (named or placed there)
        start, then fail when they would land: the VM stays on its source, up, and the
        reservation on the node is released. Replaces any count set before (0 clears it).

        Kept by the engine beside the state (a test instrument, not a fact of the cloud): a
        saved scenario does not carry it."""
        self._begin()
        if fail_next_migrations_to < 0:
            raise InvalidRequest("fail_next_migrations_to must be >= 0")
        node = self._node(node_id)
        if fail_next_migrations_to:
            self._migration_faults[node.id] = fail_next_migrations_to
        else:
            self._migration_faults.pop(node.id, None)
        self._commit()
        return self._node_view(node)

    # VNFM actions -----------------------------------------------------------------------------

    def switch_over(self, vnf_id: str, to_member: str) -> VnfView:
        """Make `to_member` the active member of an active-standby VNF."""
        now = self._begin()
        vnf = self._vnf(vnf_id)
        if vnf.redundancy != "active_standby":
            raise InvalidRequest(
                f"VNF {vnf_id} is {vnf.redundancy}; switch-over needs active_standby"
            )
        self._member(vnf, to_member)
        if vnf.active_member == to_member:
            return self._vnf_view(vnf)
        if not vm_is_up(self.state, to_member):
            raise Conflict(f"member {to_member} is down; it cannot take over")
        sync = vnf.sync.get(to_member)
        if sync is not None and sync.state == "resyncing" and (sync.until or 0) > now:
            remaining = (sync.until or now) - now
            raise Conflict(
                f"member {to_member} is resyncing for another {remaining:.2f}s; it cannot take over"
            )
        vnf.active_member = to_member
        self._touched_vnfs.add(vnf.id)
        self._commit()
        return self._vnf_view(vnf)

    def drain_member(self, vnf_id: str, member: str) -> VnfView:
        """Move a load-balanced member's share to the other members in service, in proportion
        to their shares. Refused if fewer than min_in_service would remain carrying load."""
        self._begin()
        vnf = self._load_balanced(vnf_id)
        self._member(vnf, member)
        drained = vnf.load_share.get(member, 0.0)
        if drained <= 0:
            return self._vnf_view(vnf)
        receivers = [m for m in members_in_service(self.state, vnf) if m != member]
        if not receivers or len(receivers) < vnf.min_in_service:
            raise Conflict(
                f"draining {member} would leave {len(receivers)} members in service of VNF"
                f" {vnf_id}; min_in_service is {vnf.min_in_service}"
            )
        receiving_total = sum(vnf.load_share[m] for m in receivers)
        for m in receivers:
            vnf.load_share[m] += drained * vnf.load_share[m] / receiving_total
        vnf.load_share[member] = 0.0
        self._touched_vnfs.add(vnf.id)
        self._commit()
        return self._vnf_view(vnf)

    def restore_member(self, vnf_id: str, member: str) -> VnfView:
        """Give a drained member a fair share (1/n of the loaded members) back."""
        self._begin()
        vnf = self._load_balanced(vnf_id)
        self._member(vnf, member)
        if vnf.load_share.get(member, 0.0) > 0:
            return self._vnf_view(vnf)
        if not vm_is_up(self.state, member):
            raise Conflict(f"member {member} is down; it cannot take load")
        others = [m for m in vnf.members if m != member and vnf.load_share.get(m, 0.0) > 0]
        fair = 1.0 / (len(others) + 1)
        others_total = sum(vnf.load_share[m] for m in others)
        for m in others:
            vnf.load_share[m] *= (1.0 - fair) / others_total
        vnf.load_share[member] = fair
        self._touched_vnfs.add(vnf.id)
        self._commit()
        return self._vnf_view(vnf)

    def _load_balanced(self, vnf_id: str) -> Vnf:
        vnf = self._vnf(vnf_id)
        if vnf.redundancy != "load_balanced":
            raise InvalidRequest(f"VNF {vnf_id} is {vnf.redundancy}; this needs load_balanced")
        return vnf
