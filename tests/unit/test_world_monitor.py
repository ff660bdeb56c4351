"""Unit tests of the service monitor: it must see business interruptions, and only those."""

from __future__ import annotations

import pytest

from escalator.world.engine import WorldEngine
from escalator.world.model import Interruption, MemberSync, Node, Vm, Vnf, WorldState
from escalator.world.monitor import Impairment, detect_impairments, reconcile

pytestmark = pytest.mark.unit

T0 = 500.0
REBOOT_S = 3.0


class ManualClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def world() -> WorldState:
    """Three nodes; an active-standby pair (a on n1, b on n2), a load-balanced VNF with one
    member per node (min_in_service 2) and a VM of no VNF on n3."""
    nodes = {
        n: Node(id=n, vcpus=16, ram_mb=32768, failure_domain=f"fd-{n}", installed_version="1")
        for n in ("n1", "n2", "n3")
    }
    placement = {
        "as-a": ("n1", "vnf-as"),
        "as-b": ("n2", "vnf-as"),
        "lb-1": ("n1", "vnf-lb"),
        "lb-2": ("n2", "vnf-lb"),
        "lb-3": ("n3", "vnf-lb"),
        "loose": ("n3", None),
    }
    vms = {
        vm_id: Vm(
            id=vm_id,
            name=vm_id,
            vnf_id=vnf,
            vcpus=2,
            ram_mb=2048,
            node_id=node,
            server_group=f"sg-{vnf}" if vnf else None,
        )
        for vm_id, (node, vnf) in placement.items()
    }
    vnfs = {
        "vnf-as": Vnf(
            id="vnf-as",
            vnfm_id="vnfm-1",
            redundancy="active_standby",
            members=["as-a", "as-b"],
            active_member="as-a",
            sync={"as-a": MemberSync(), "as-b": MemberSync()},
        ),
        "vnf-lb": Vnf(
            id="vnf-lb",
            vnfm_id="vnfm-1",
            redundancy="load_balanced",
            members=["lb-1", "lb-2", "lb-3"],
            load_share={"lb-1": 1 / 3, "lb-2": 1 / 3, "lb-3": 1 / 3},
            min_in_service=2,
        ),
    }
    return WorldState(nodes=nodes, vms=vms, vnfs=vnfs)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(clock: ManualClock) -> WorldEngine:
    return WorldEngine(world(), clock=clock)


def reboot_and_wait(engine: WorldEngine, clock: ManualClock, node: str) -> None:
    engine.reboot_node(node, duration_s=REBOOT_S)
    clock.advance(REBOOT_S + 0.1)
    engine.tick()


def of_vnf(engine: WorldEngine, vnf_id: str) -> list[Interruption]:
    return [i for i in engine.interruptions() if i.vnf_id == vnf_id]


def test_healthy_world_has_no_interruptions(engine: WorldEngine) -> None:
    assert engine.interruptions() == []


# --- REQUIRED: the monitor sees an interruption iff business was not moved first ----------------


def test_rebooting_the_active_without_switch_over_is_an_interruption(
    engine: WorldEngine, clock: ManualClock
) -> None:
    reboot_and_wait(engine, clock, "n1")
    [record] = of_vnf(engine, "vnf-as")
    assert record.kind == "active_member_down"
    assert record.members == ["as-a"]
    assert record.started_at == pytest.approx(T0)
    assert record.ended_at == pytest.approx(T0 + REBOOT_S)
    assert "n1" in record.reason


def test_switching_over_before_the_reboot_avoids_the_interruption(
    engine: WorldEngine, clock: ManualClock
) -> None:
    engine.switch_over("vnf-as", "as-b")
    reboot_and_wait(engine, clock, "n1")
    assert of_vnf(engine, "vnf-as") == []


def test_rebooting_a_loaded_member_without_drain_is_an_interruption(
    engine: WorldEngine, clock: ManualClock
) -> None:
    reboot_and_wait(engine, clock, "n3")
    [record] = of_vnf(engine, "vnf-lb")
    assert record.kind == "loaded_member_down"
    assert record.members == ["lb-3"]
    assert record.ended_at == pytest.approx(T0 + REBOOT_S)


def test_draining_before_the_reboot_avoids_the_interruption(
    engine: WorldEngine, clock: ManualClock
) -> None:
    engine.drain_member("vnf-lb", "lb-3")
    reboot_and_wait(engine, clock, "n3")
    assert of_vnf(engine, "vnf-lb") == []
    # and restoring afterwards keeps it clean
    engine.restore_member("vnf-lb", "lb-3")
    assert of_vnf(engine, "vnf-lb") == []


# --- other findings -----------------------------------------------------------------------------


def test_live_migration_of_the_active_keeps_serving(
    engine: WorldEngine, clock: ManualClock
) -> None:
    engine.migrate_vm("as-a", "n3")
    clock.advance(1.0)
    engine.tick()
    assert engine.vm("as-a").node_id == "n3"
    reboot_and_wait(engine, clock, "n1")
    assert of_vnf(engine, "vnf-as") == []


def test_rebooting_a_standby_is_not_an_interruption(
    engine: WorldEngine, clock: ManualClock
) -> None:
    reboot_and_wait(engine, clock, "n2")
    assert of_vnf(engine, "vnf-as") == []


def test_too_few_members_in_service(engine: WorldEngine, clock: ManualClock) -> None:
    engine.reboot_node("n2", duration_s=REBOOT_S)
    engine.reboot_node("n3", duration_s=REBOOT_S)
    kinds = {i.kind for i in of_vnf(engine, "vnf-lb") if i.ended_at is None}
    assert kinds == {"loaded_member_down", "below_min_in_service"}
    [loaded] = [i for i in of_vnf(engine, "vnf-lb") if i.kind == "loaded_member_down"]
    assert sorted(loaded.members) == ["lb-2", "lb-3"]  # one interval; members accumulate
    clock.advance(REBOOT_S)
    engine.tick()
    assert all(i.ended_at is not None for i in engine.interruptions())


def test_a_vm_of_no_vnf_going_down_is_recorded(engine: WorldEngine, clock: ManualClock) -> None:
    engine.drain_member("vnf-lb", "lb-3")
    reboot_and_wait(engine, clock, "n3")
    [record] = engine.interruptions()
    assert (record.vnf_id, record.kind, record.members) == (None, "unmanaged_vm_down", ["loose"])


def test_no_active_member_is_detected() -> None:
    state = world()
    state.vnfs["vnf-as"].active_member = None
    assert [i.kind for i in detect_impairments(state)] == ["no_active_member"]


def test_reconcile_opens_extends_and_closes_intervals() -> None:
    log: list[Interruption] = []
    down_a = Impairment("v", "loaded_member_down", "a down", ("a",))
    down_b = Impairment("v", "loaded_member_down", "b down", ("b",))
    reconcile(log, [down_a], now=1.0)
    reconcile(log, [down_b], now=2.0)
    assert len(log) == 1 and log[0].members == ["a", "b"] and log[0].ended_at is None
    reconcile(log, [], now=3.0)
    closed = log[0]
    assert (closed.started_at, closed.ended_at) == (1.0, 3.0)
    reconcile(log, [down_a], now=4.0)
    assert [r.id for r in log] == [1, 2] and log[1].started_at == 4.0
