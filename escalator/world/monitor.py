"""Service monitor: the world's own, independent record of business interruptions.

The engine calls `observe` after every state change. Detection (`detect_impairments`) is a pure
function of the state; `reconcile` turns the stream of detections into intervals: an
interruption opens the first time an impairment (vnf, kind) is seen and closes at the first
observation where it is gone. Members involved accumulate while the interval stays open.

New kinds of findings (e.g. unavailability-budget violations, "more members of a VNF impacted
at once than max_unavailable") slot in as another detector in `_DETECTORS`.

At scale (200,000 VMs) the engine does not re-detect everything after every change: it calls
`observe_some` with the VNFs and unmanaged VMs that can be impaired (members on nodes that are
down, VNFs touched since the last observation, anything with an interval still open) and the
open intervals, which gives the same log as `observe` (see `WorldEngine._observe`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from escalator.world.model import Interruption, InterruptionKind, Vm, Vnf, WorldState

# Identifies one interval across observations.
IntervalKey = tuple[str | None, InterruptionKind, tuple[str, ...]]


@dataclass(frozen=True)
class Impairment:
    """One thing wrong right now; `key` identifies it across observations."""

    vnf_id: str | None
    kind: InterruptionKind
    reason: str
    members: tuple[str, ...]

    @property
    def key(self) -> IntervalKey:
        return _interval_key(self.vnf_id, self.kind, self.members)


def _interval_key(
    vnf_id: str | None, kind: InterruptionKind, members: Iterable[str]
) -> IntervalKey:
    # VNF-level impairments are one interval per (vnf, kind) whatever members come and go;
    # an unmanaged VM has no VNF, so its own id tells intervals apart.
    return (vnf_id, kind, tuple(members) if vnf_id is None else ())


def vm_is_up(state: WorldState, vm_id: str) -> bool:
    vm = state.vms.get(vm_id)
    if vm is None:
        return False
    node = state.nodes.get(vm.node_id)
    return node is not None and node.power == "up"


def members_in_service(state: WorldState, vnf: Vnf) -> list[str]:
    """Load-balanced members that are up and carry a positive share of load."""
    return [m for m in vnf.members if vm_is_up(state, m) and vnf.load_share.get(m, 0.0) > 0]


def _host(state: WorldState, vm_id: str) -> str:
    vm = state.vms.get(vm_id)
    return vm.node_id if vm is not None else "?"


def _active_standby(state: WorldState, vnf: Vnf) -> Iterable[Impairment]:
    if vnf.redundancy != "active_standby":
        return
    if vnf.active_member is None:
        yield Impairment(vnf.id, "no_active_member", "no active member designated", ())
    elif not vm_is_up(state, vnf.active_member):
        host = _host(state, vnf.active_member)
        yield Impairment(
            vnf.id,
            "active_member_down",
            f"active member {vnf.active_member} is on rebooting node {host}",
            (vnf.active_member,),
        )


def _load_balanced(state: WorldState, vnf: Vnf) -> Iterable[Impairment]:
    if vnf.redundancy != "load_balanced":
        return
    loaded_down = [
        m for m in vnf.members if vnf.load_share.get(m, 0.0) > 0 and not vm_is_up(state, m)
    ]
    if loaded_down:
        hosts = ", ".join(f"{m}@{_host(state, m)}" for m in loaded_down)
        yield Impairment(
            vnf.id,
            "loaded_member_down",
            f"members carrying load are on rebooting nodes: {hosts}",
            tuple(loaded_down),
        )
    serving = members_in_service(state, vnf)
    if len(serving) < vnf.min_in_service:
        yield Impairment(
            vnf.id,
            "below_min_in_service",
            f"{len(serving)} members in service, min_in_service is {vnf.min_in_service}",
            tuple(m for m in vnf.members if m not in serving),
        )


def _vnf_detectors(state: WorldState) -> Iterable[Impairment]:
    for vnf in state.vnfs.values():
        yield from _active_standby(state, vnf)
        yield from _load_balanced(state, vnf)


def _unmanaged_vm(state: WorldState, vm: Vm) -> Iterable[Impairment]:
    if vm.vnf_id is None and not vm_is_up(state, vm.id):
        yield Impairment(
            None,
            "unmanaged_vm_down",
            f"VM {vm.id} (no VNF) is on rebooting node {vm.node_id}",
            (vm.id,),
        )


def _unmanaged_vms(state: WorldState) -> Iterable[Impairment]:
    for vm in state.vms.values():
        yield from _unmanaged_vm(state, vm)


_DETECTORS: tuple[Callable[[WorldState], Iterable[Impairment]], ...] = (
    _vnf_detectors,
    _unmanaged_vms,
)


def detect_impairments(state: WorldState) -> list[Impairment]:
    """Everything currently wrong with the business, in a deterministic order."""
    return [imp for detector in _DETECTORS for imp in detector(state)]


def detect_impairments_of(
    state: WorldState, vnf_ids: Iterable[str], vm_ids: Iterable[str]
) -> list[Impairment]:
    """What `detect_impairments` finds about these VNFs and these VMs of no VNF only (in the
    order given: pass them in state order to get the same order as the full detection)."""
    found: list[Impairment] = []
    for vnf_id in vnf_ids:
        vnf = state.vnfs.get(vnf_id)
        if vnf is not None:
            found.extend(_active_standby(state, vnf))
            found.extend(_load_balanced(state, vnf))
    for vm_id in vm_ids:
        vm = state.vms.get(vm_id)
        if vm is not None:
            found.extend(_unmanaged_vm(state, vm))
    return found


def reconcile(
    log: list[Interruption],
    impairments: list[Impairment],
    now: float,
    open_records: Sequence[Interruption] | None = None,
) -> None:
    """Open, extend or close intervals in `log` so that it reflects `impairments` at `now`.

    `open_records`, when given, are the records of `log` still open (so that a long log is not
    walked); every open record not matched by an impairment is closed."""
    current = {imp.key: imp for imp in impairments}
    still_open: dict[IntervalKey, Interruption] = {}
    for record in log if open_records is None else open_records:
        if record.ended_at is not None:
            continue
        key = _interval_key(record.vnf_id, record.kind, record.members)
        if key in current:
            still_open[key] = record
        else:
            record.ended_at = now
    for key, imp in current.items():
        open_record = still_open.get(key)
        if open_record is None:
            log.append(
                Interruption(
                    id=len(log) + 1,
                    vnf_id=imp.vnf_id,
                    kind=imp.kind,
                    reason=imp.reason,
                    started_at=now,
                    members=list(imp.members),
                )
            )
        else:
            open_record.members.extend(m for m in imp.members if m not in open_record.members)


def observe(state: WorldState, now: float) -> None:
    """Evaluate the state and update its interruption log."""
    reconcile(state.interruptions, detect_impairments(state), now)


def observe_some(
    state: WorldState,
    now: float,
    vnf_ids: Iterable[str],
    vm_ids: Iterable[str],
    open_records: Sequence[Interruption],
) -> None:
    """`observe` for a state where only these VNFs and VMs of no VNF can be impaired, and
    `open_records` are the open intervals of its log (each must be about one of them)."""
    reconcile(state.interruptions, detect_impairments_of(state, vnf_ids, vm_ids), now, open_records)
