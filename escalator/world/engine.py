"""The world engine: every state change of the simulated cloud, as synchronous calls.

No I/O and an injectable clock, so it is unit-testable with a manual clock. Each public
operation is one synchronous call that first catches up with time (`tick`), then validates and
applies the change, then lets the service monitor observe the result. Because the HTTP server is
single-threaded asyncio and never awaits inside an operation, every operation is atomic; in
particular a capacity check and the matching reservation can never be split by another request.

Durations are nominal seconds divided by `speed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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
from escalator.world.monitor import members_in_service, observe, vm_is_up

Clock = Callable[[], float]


# --- placement rules (pure functions of a state) ------------------------------------------------


@dataclass(frozen=True)
class PlacementIndex:
    """Per-node usage and server-group locations of one state, computed in one pass so that
    checking many candidate nodes costs O(nodes) instead of O(nodes x VMs)."""

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


def valid_destinations(state: WorldState, vm: Vm) -> list[str]:
    """Node ids `vm` may migrate to, best first: most free vcpus, then RAM, then by id."""
    index = PlacementIndex.of(state)
    candidates = [n for n in state.nodes.values() if placement_refusal(state, vm, n, index) is None]
    candidates.sort(key=lambda n: (*(-f for f in index.free(n)), n.id))
    return [n.id for n in candidates]


def plan_evacuation(state: WorldState, node_id: str) -> dict[str, str] | None:
    """A destination for every VM on `node_id` (largest first, greedily), or None if some VM
    would find no room. Works on a copy: the given state is not touched."""
    # Only VM placement and this node's maintenance flag change: shallow copies suffice.
    scratch = WorldState.model_construct(
        nodes={
            **state.nodes,
            node_id: state.nodes[node_id].model_copy(
                update={"maintenance_holder": "evacuation-plan"}
            ),
        },
        vms={vm_id: vm.model_copy() for vm_id, vm in state.vms.items()},
    )
    plan: dict[str, str] = {}
    on_node = [vm for vm in scratch.vms.values() if vm.node_id == node_id]
    on_node.sort(key=lambda vm: (-vm.vcpus, -vm.ram_mb, vm.id))
    for vm in on_node:
        destinations = valid_destinations(scratch, vm)
        if not destinations:
            return None
        plan[vm.id] = destinations[0]
        vm.node_id = destinations[0]
    return plan


# --- the engine ---------------------------------------------------------------------------------


class WorldEngine:
    def __init__(self, state: WorldState, clock: Clock = time.time, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.state = state
        self.speed = speed
        self._clock = clock
        self._now = clock()
        observe(self.state, self._now)

    @property
    def now(self) -> float:
        return self._now

    def scaled(self, nominal_s: float) -> float:
        return nominal_s / self.speed

    # time -------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Advance to `now` (default: the clock), completing due migrations, reboots and resyncs
        in time order so that the monitor sees each at the moment it happened."""
        target = max(self._clock() if now is None else now, self._now)
        while (event := self._next_due_event(target)) is not None:
            at, apply = event
            self._now = max(self._now, at)
            apply()
            observe(self.state, self._now)
        self._now = target

    def _next_due_event(self, until: float) -> tuple[float, Callable[[], None]] | None:
        due: list[tuple[float, int, str, Callable[[], None]]] = []
        for node in self.state.nodes.values():
            if node.power == "rebooting" and node.reboot is not None:
                if node.reboot.finishes_at <= until:
                    due.append((node.reboot.finishes_at, 0, node.id, self._finisher_reboot(node)))
        for vm in self.state.vms.values():
            finishes_at = vm.migration_finishes_at
            if vm.status == "migrating" and finishes_at is not None and finishes_at <= until:
                due.append((finishes_at, 1, vm.id, self._finisher_migration(vm)))
        for vnf in self.state.vnfs.values():
            for member, sync in vnf.sync.items():
                if sync.state == "resyncing" and sync.until is not None and sync.until <= until:
                    due.append((sync.until, 2, f"{vnf.id}/{member}", self._finisher_resync(sync)))
        if not due:
            return None
        at, _, _, apply = min(due, key=lambda d: d[:3])
        return at, apply

    def _finisher_reboot(self, node: Node) -> Callable[[], None]:
        def finish() -> None:
            record = node.reboot
            assert record is not None
            node.power = "up"
            record.finished_at = record.finishes_at
            record.state = "failed" if record.will_fail else "succeeded"
            if not record.will_fail and record.target_version is not None:
                node.installed_version = record.target_version
            self._start_resync_of_members_on(node.id, record.finishes_at)

        return finish

    def _finisher_migration(self, vm: Vm) -> Callable[[], None]:
        def finish() -> None:
            assert vm.migration_target is not None
            vm.node_id = vm.migration_target
            vm.status = "active"
            vm.migration_target = None
            vm.migration_started_at = None
            vm.migration_finishes_at = None

        return finish

    @staticmethod
    def _finisher_resync(sync: MemberSync) -> Callable[[], None]:
        def finish() -> None:
            sync.state = "in_sync"
            sync.until = None

        return finish

    def _start_resync_of_members_on(self, node_id: str, at: float) -> None:
        # A rebooted active-standby member must re-replicate state before it can take over.
        resync = self.scaled(self.state.timings.resync_s)
        for vnf in self.state.vnfs.values():
            if vnf.redundancy != "active_standby":
                continue
            for member in vnf.members:
                vm = self.state.vms.get(member)
                if vm is not None and vm.node_id == node_id and resync > 0:
                    vnf.sync[member] = MemberSync(state="resyncing", until=at + resync)

    def _begin(self) -> float:
        self.tick()
        return self._now

    def _commit(self) -> None:
        observe(self.state, self._now)
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

    # views ------------------------------------------------------------------------------------

    def _node_view(self, node: Node) -> NodeView:
        used_vcpus, used_ram = PlacementIndex.of(self.state).usage.get(node.id, (0, 0))
        vms = self.state.vms.values()
        return NodeView(
            **node.model_dump(),
            used_vcpus=used_vcpus,
            used_ram_mb=used_ram,
            free_vcpus=node.vcpus - used_vcpus,
            free_ram_mb=node.ram_mb - used_ram,
            vm_ids=[vm.id for vm in vms if vm.node_id == node.id],
            incoming_vm_ids=[vm.id for vm in vms if vm.migration_target == node.id],
        )

    def _vm_view(self, vm: Vm, incoming: bool = False) -> VmView:
        return VmView(**vm.model_dump(), up=vm_is_up(self.state, vm.id), incoming=incoming)

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
        vms = self.state.vms.values()
        return [self._vm_view(vm) for vm in vms if vm.node_id == node_id] + [
            self._vm_view(vm, incoming=True) for vm in vms if vm.migration_target == node_id
        ]

    def vm(self, vm_id: str) -> VmView:
        self._begin()
        return self._vm_view(self._vm(vm_id))

    def vnfs(self) -> list[VnfView]:
        self._begin()
        return [self._vnf_view(v) for v in self.state.vnfs.values()]

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
        self._commit()
        return self._node_view(node)

    # migration --------------------------------------------------------------------------------

    def migrate_vm(self, vm_id: str, destination: str | None = None) -> VmView:
        """Start a live migration; capacity on the destination is reserved at once. Without a
        destination the node with the most free capacity among valid ones is chosen."""
        now = self._begin()
        vm = self._vm(vm_id)
        if vm.status == "migrating":
            raise Conflict(f"VM {vm_id} is already migrating to {vm.migration_target}")
        if not vm_is_up(self.state, vm_id):
            raise Conflict(f"VM {vm_id} is down (node {vm.node_id} is rebooting)")
        if destination is not None:
            refusal = placement_refusal(self.state, vm, self._node(destination))
            if refusal is not None:
                raise Conflict(refusal)
        else:
            candidates = valid_destinations(self.state, vm)
            if not candidates:
                raise Conflict(f"no valid destination for VM {vm_id}")
            destination = candidates[0]
        vm.status = "migrating"
        vm.migration_target = destination
        vm.migration_started_at = now
        vm.migration_finishes_at = now + self.scaled(self.state.timings.migration_s)
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
        in_flight = sorted(
            vm.id
            for vm in self.state.vms.values()
            if vm.status == "migrating" and node_id in (vm.node_id, vm.migration_target)
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
        self._commit()
        return self._vnf_view(vnf)

    def _load_balanced(self, vnf_id: str) -> Vnf:
        vnf = self._vnf(vnf_id)
        if vnf.redundancy != "load_balanced":
            raise InvalidRequest(f"VNF {vnf_id} is {vnf.redundancy}; this needs load_balanced")
        return vnf
