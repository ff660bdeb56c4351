"""Unit tests of the world engine: maintenance CAS, placement, reservations, time, VNFM rules."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escalator.world.engine import (
    PlacementIndex,
    WorldEngine,
    best_destination,
    plan_evacuation,
    valid_destinations,
)
from escalator.world.errors import Conflict, EngineError, InvalidRequest, NotFound
from escalator.world.model import MemberSync, Node, Timings, Vm, Vnf, WorldState
from escalator.world.monitor import detect_impairments, observe
from escalator.world.scenario import generate, satisfies_spare_capacity, vnf_registry_records

pytestmark = pytest.mark.unit

T0 = 1_000.0


class ManualClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def small_world() -> WorldState:
    """Four 8-vcpu nodes over two failure domains:
    n1: as-a (4), lb-a (2)   n2: as-b (4), lb-b (2)   n3: lb-c (2), loose (2)   n4: big (4)
    """
    nodes = {
        f"n{i}": Node(
            id=f"n{i}", vcpus=8, ram_mb=16384, failure_domain=f"fd-{i % 2}", installed_version="1"
        )
        for i in range(1, 5)
    }

    def vm(vm_id: str, node: str, vcpus: int, vnf: str | None, group: str | None) -> Vm:
        return Vm(
            id=vm_id,
            name=vm_id,
            vnf_id=vnf,
            vcpus=vcpus,
            ram_mb=vcpus * 1024,
            node_id=node,
            server_group=group,
        )

    vms = [
        vm("as-a", "n1", 4, "vnf-as", "sg-as"),
        vm("as-b", "n2", 4, "vnf-as", "sg-as"),
        vm("lb-a", "n1", 2, "vnf-lb", "sg-lb"),
        vm("lb-b", "n2", 2, "vnf-lb", "sg-lb"),
        vm("lb-c", "n3", 2, "vnf-lb", "sg-lb"),
        vm("loose", "n3", 2, None, None),
        vm("big", "n4", 4, None, None),
    ]
    vnfs = [
        Vnf(
            id="vnf-as",
            vnfm_id="vnfm-1",
            redundancy="active_standby",
            members=["as-a", "as-b"],
            active_member="as-a",
            sync={"as-a": MemberSync(), "as-b": MemberSync()},
        ),
        Vnf(
            id="vnf-lb",
            vnfm_id="vnfm-1",
            redundancy="load_balanced",
            members=["lb-a", "lb-b", "lb-c"],
            load_share={"lb-a": 1 / 3, "lb-b": 1 / 3, "lb-c": 1 / 3},
            min_in_service=2,
        ),
    ]
    return WorldState(
        nodes=nodes,
        vms={v.id: v for v in vms},
        vnfs={v.id: v for v in vnfs},
        timings=Timings(migration_s=0.5, reboot_s=3.0, resync_s=2.0),
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(clock: ManualClock) -> WorldEngine:
    return WorldEngine(small_world(), clock=clock)


# --- maintenance compare-and-set ----------------------------------------------------------------


def test_claim_disables_and_records_holder(engine: WorldEngine) -> None:
    node = engine.claim_maintenance("n1", "um-1")
    assert node.maintenance_holder == "um-1"
    assert node.service_status == "disabled"
    assert node.saved_status is not None and node.saved_status.service_status == "enabled"


def test_claim_is_idempotent_for_the_same_holder(engine: WorldEngine) -> None:
    engine.claim_maintenance("n1", "um-1")
    assert engine.claim_maintenance("n1", "um-1").maintenance_holder == "um-1"


def test_claim_refused_when_held_by_another_holder(engine: WorldEngine) -> None:
    engine.claim_maintenance("n1", "um-1")
    with pytest.raises(Conflict, match="um-1"):
        engine.claim_maintenance("n1", "um-2")
    assert engine.node("n1").maintenance_holder == "um-1"


def test_claim_refused_when_admin_disabled(engine: WorldEngine) -> None:
    engine.admin_disable("n1", "bad DIMM")
    with pytest.raises(Conflict, match=r"administrator.*bad DIMM"):
        engine.claim_maintenance("n1", "um-1")
    node = engine.node("n1")
    assert node.maintenance_holder is None
    assert node.admin_note == "bad DIMM"
    engine.admin_enable("n1")
    assert engine.claim_maintenance("n1", "um-1").maintenance_holder == "um-1"


def test_release_restores_prior_status_and_is_idempotent(engine: WorldEngine) -> None:
    engine.claim_maintenance("n1", "um-1")
    released = engine.release_maintenance("n1", "um-1")
    assert released.maintenance_holder is None
    assert released.service_status == "enabled"
    assert released.saved_status is None
    again = engine.release_maintenance("n1", "um-1")
    assert again.service_status == "enabled"


def test_only_the_holder_may_release(engine: WorldEngine) -> None:
    engine.claim_maintenance("n1", "um-1")
    with pytest.raises(Conflict, match="held by um-1"):
        engine.release_maintenance("n1", "um-2")
    assert engine.node("n1").maintenance_holder == "um-1"


def test_admin_disable_during_maintenance_survives_release(engine: WorldEngine) -> None:
    engine.claim_maintenance("n1", "um-1")
    engine.admin_disable("n1", "keep it off")
    node = engine.release_maintenance("n1", "um-1")
    assert node.service_status == "disabled"
    assert node.admin_note == "keep it off"


def test_unknown_node_is_not_found(engine: WorldEngine) -> None:
    with pytest.raises(NotFound):
        engine.claim_maintenance("nope", "um-1")
    with pytest.raises(NotFound):
        engine.list_vms("nope")


def test_empty_holder_is_invalid(engine: WorldEngine) -> None:
    with pytest.raises(InvalidRequest):
        engine.claim_maintenance("n1", "")


# --- placement --------------------------------------------------------------------------------


def test_auto_destination_picks_most_free_then_lowest_id(engine: WorldEngine) -> None:
    # free: n1 2, n2 2, n4 4 (n3 is the source)
    assert engine.migrate_vm("loose").migration_target == "n4"


def test_anti_affinity_excludes_nodes_holding_the_same_group(engine: WorldEngine) -> None:
    with pytest.raises(Conflict, match="anti-affinity"):
        engine.migrate_vm("as-a", "n2")
    # Only n3 and n4 can take as-a; both have 4 free, so the lower id wins.
    assert engine.migrate_vm("as-a").migration_target == "n3"


def test_never_onto_a_node_in_maintenance(engine: WorldEngine) -> None:
    engine.claim_maintenance("n4", "um-1")
    with pytest.raises(Conflict, match="maintenance"):
        engine.migrate_vm("loose", "n4")
    assert engine.migrate_vm("loose").migration_target == "n1"  # n1 and n2 tie at 2 free


def test_never_onto_disabled_or_rebooting_nodes(engine: WorldEngine) -> None:
    engine.admin_disable("n4", None)
    with pytest.raises(Conflict, match="disabled"):
        engine.migrate_vm("loose", "n4")
    engine.admin_enable("n4")
    engine.reboot_node("n4")
    with pytest.raises(Conflict, match="rebooting"):
        engine.migrate_vm("loose", "n4")


def test_capacity_is_enforced(engine: WorldEngine) -> None:
    # n1 has 2 vcpus free; big needs 4
    with pytest.raises(Conflict, match="capacity"):
        engine.migrate_vm("big", "n1")


def test_no_valid_destination(engine: WorldEngine) -> None:
    for node in ("n3", "n4"):
        engine.claim_maintenance(node, "um-1")
    with pytest.raises(Conflict, match="no valid destination"):
        engine.migrate_vm("as-a")


def test_avoided_nodes_are_never_picked(engine: WorldEngine) -> None:
    # loose (on n3): free n4 4, n1 2, n2 2
    state, vm = engine.state, engine.state.vms["loose"]
    index = PlacementIndex.of(state)
    assert valid_destinations(state, vm, index) == ["n4", "n1", "n2"]
    assert valid_destinations(state, vm, index, avoid={"n4"}) == ["n1", "n2"]
    assert best_destination(state, vm, index, avoid={"n4", "n1"}) == "n2"
    assert best_destination(state, vm, index, avoid={"n4", "n1", "n2"}) is None
    assert engine.migrate_vm("loose", avoid=["n4", "ghost"]).migration_target == "n1"
    engine.check_indexes()


def test_only_avoided_valid_destinations_make_a_refusal_that_says_so(
    engine: WorldEngine,
) -> None:
    with pytest.raises(Conflict) as refused:
        engine.migrate_vm("loose", avoid=["n4", "n1", "n2", "n4"])
    assert refused.value.message == (
        "no valid destination for VM loose outside its avoided nodes n4, n1, n2"
    )
    assert engine.vm("loose").status == "active"
    # nothing valid even without avoiding: the plain refusal
    for node in ("n3", "n4"):
        engine.claim_maintenance(node, "um-1")
    with pytest.raises(Conflict) as nowhere:
        engine.migrate_vm("as-a", avoid=["n1"])
    assert nowhere.value.message == "no valid destination for VM as-a"
    engine.check_indexes()


def test_a_named_destination_is_taken_as_named_even_if_avoided(engine: WorldEngine) -> None:
    assert engine.migrate_vm("loose", "n4", avoid=["n4"]).migration_target == "n4"


def test_an_injected_migration_fault_fails_on_landing_and_leaves_the_vm_on_its_source(
    engine: WorldEngine, clock: ManualClock
) -> None:
    assert engine.inject_migration_faults("n4", 1).fail_next_migrations_to == 1
    before = {n: engine.node(n).used_vcpus for n in ("n3", "n4")}
    started = engine.migrate_vm("loose")  # placed on n4, the roomiest
    assert (started.status, started.migration_target) == ("migrating", "n4")
    assert started.migration_will_fail
    # it starts like any other: room reserved, incoming on n4, the fault used up
    assert engine.node("n4").used_vcpus == before["n4"] + 2
    assert engine.node("n4").incoming_vm_ids == ["loose"]
    assert engine.node("n4").fail_next_migrations_to == 0
    engine.inventory_json()  # cache every node's inventory: the failure must invalidate it
    engine.check_indexes()

    clock.advance(0.51)
    failed = engine.vm("loose")
    assert (failed.status, failed.node_id, failed.migration_target, failed.up) == (
        "active",
        "n3",
        None,
        True,
    )
    assert not failed.migration_will_fail and failed.migration_finishes_at is None
    assert {n: engine.node(n).used_vcpus for n in ("n3", "n4")} == before
    assert engine.node("n4").incoming_vm_ids == [] and "loose" in engine.node("n3").vm_ids
    assert [v.id for v in engine.list_vms("n4")] == ["big"]
    assert engine.interruptions() == []
    engine.check_indexes()

    # only the next N: the one after lands
    engine.migrate_vm("loose", "n4")
    clock.advance(0.51)
    assert engine.vm("loose").node_id == "n4"
    engine.check_indexes()


def test_migration_faults_count_named_destinations_and_can_be_cleared(
    engine: WorldEngine, clock: ManualClock
) -> None:
    engine.inject_migration_faults("n4", 2)
    assert engine.migrate_vm("lb-c", "n4").migration_will_fail
    engine.inject_migration_faults("n4", 0)
    assert not engine.migrate_vm("loose", "n4").migration_will_fail
    clock.advance(0.51)
    assert (engine.vm("lb-c").node_id, engine.vm("loose").node_id) == ("n3", "n4")
    engine.check_indexes()
    with pytest.raises(InvalidRequest):
        engine.inject_migration_faults("n1", -1)
    with pytest.raises(NotFound):
        engine.inject_migration_faults("ghost", 1)


def test_reservations_are_atomic_two_migrations_cannot_take_the_last_slot(
    engine: WorldEngine,
) -> None:
    # n3 has 4 free: as-a (4) reserves it at once; big (4) then finds no room there, although
    # as-a has not landed yet.
    engine.migrate_vm("as-a", "n3")
    assert engine.node("n3").free_vcpus == 0
    with pytest.raises(Conflict, match="capacity"):
        engine.migrate_vm("big", "n3")
    assert engine.vm("big").status == "active"


def test_migration_reserves_at_start_and_lands_on_tick(
    engine: WorldEngine, clock: ManualClock
) -> None:
    vm = engine.migrate_vm("loose", "n4")
    assert vm.status == "migrating" and vm.node_id == "n3" and vm.up
    incoming = engine.list_vms("n4")
    assert [(v.id, v.incoming) for v in incoming] == [("big", False), ("loose", True)]
    assert engine.node("n4").used_vcpus == 6
    assert engine.node("n3").used_vcpus == 4  # still counted on the source until it lands

    clock.advance(0.49)
    engine.tick()
    assert engine.vm("loose").status == "migrating"

    clock.advance(0.02)
    engine.tick()
    landed = engine.vm("loose")
    assert (landed.status, landed.node_id, landed.migration_target) == ("active", "n4", None)
    assert engine.node("n3").used_vcpus == 2
    assert sorted((v.id, v.incoming) for v in engine.list_vms("n4")) == [
        ("big", False),
        ("loose", False),
    ]


def test_migration_refusals(engine: WorldEngine) -> None:
    engine.migrate_vm("loose", "n4")
    with pytest.raises(Conflict, match="already migrating"):
        engine.migrate_vm("loose", "n1")
    with pytest.raises(NotFound):
        engine.migrate_vm("ghost")
    with pytest.raises(NotFound):
        engine.migrate_vm("lb-a", "ghost")
    engine.reboot_node("n2")
    with pytest.raises(Conflict, match="down"):
        engine.migrate_vm("as-b", "n4")


def test_speed_divides_durations(clock: ManualClock) -> None:
    engine = WorldEngine(small_world(), clock=clock, speed=10.0)
    assert engine.migrate_vm("loose", "n4").migration_finishes_at == pytest.approx(T0 + 0.05)
    assert engine.reboot_node("n1").finishes_at == pytest.approx(T0 + 0.3)


# --- reboot ---------------------------------------------------------------------------------


def test_reboot_takes_vms_down_then_upgrades(engine: WorldEngine, clock: ManualClock) -> None:
    record = engine.reboot_node("n3", duration_s=2.0, new_version="2")
    assert record.state == "in_progress" and record.previous_version == "1"
    assert engine.node("n3").power == "rebooting"
    assert not any(v.up for v in engine.list_vms("n3"))

    clock.advance(2.0)
    node = engine.node("n3")
    assert node.power == "up" and node.installed_version == "2"
    assert node.reboot is not None and node.reboot.state == "succeeded"
    assert node.reboot.finished_at == pytest.approx(T0 + 2.0)
    assert all(v.up for v in engine.list_vms("n3"))


def test_failed_reboot_keeps_the_version(engine: WorldEngine, clock: ManualClock) -> None:
    engine.reboot_node("n3", new_version="2", fail=True)
    clock.advance(3.0)
    node = engine.node("n3")
    assert node.power == "up" and node.installed_version == "1"
    assert node.reboot is not None and node.reboot.state == "failed"


def test_injected_faults_fail_the_next_upgrades_only(
    engine: WorldEngine, clock: ManualClock
) -> None:
    engine.inject_faults("n3", fail_next_upgrades=1)
    engine.reboot_node("n3", new_version="2")
    clock.advance(3.0)
    assert engine.node("n3").installed_version == "1"
    engine.reboot_node("n3", new_version="2")
    clock.advance(3.0)
    assert engine.node("n3").installed_version == "2"


def test_reboot_refusals(engine: WorldEngine) -> None:
    with pytest.raises(InvalidRequest):
        engine.reboot_node("n3", duration_s=-1)
    engine.migrate_vm("loose", "n4")
    with pytest.raises(Conflict, match="migrations in flight"):
        engine.reboot_node("n3")
    with pytest.raises(Conflict, match="migrations in flight"):
        engine.reboot_node("n4")
    engine.reboot_node("n1")
    with pytest.raises(Conflict, match="already rebooting"):
        engine.reboot_node("n1")


def test_events_complete_in_time_order_within_one_tick(
    engine: WorldEngine, clock: ManualClock
) -> None:
    engine.reboot_node("n1", duration_s=1.0)
    clock.advance(10.0)
    engine.tick()
    # the member came back at T0+1 and finished resyncing at T0+3, long before "now"
    assert engine.node("n1").reboot.finished_at == pytest.approx(T0 + 1.0)  # type: ignore[union-attr]
    assert engine.vnf("vnf-as").sync["as-a"].state == "in_sync"


def test_tick_never_goes_back_in_time(engine: WorldEngine) -> None:
    engine.tick(T0 + 5)
    engine.tick(T0 + 1)
    assert engine.now == T0 + 5


# --- VNFM actions -----------------------------------------------------------------------------


def test_switch_over_to_a_healthy_standby(engine: WorldEngine) -> None:
    assert engine.switch_over("vnf-as", "as-b").active_member == "as-b"
    assert engine.switch_over("vnf-as", "as-b").active_member == "as-b"  # idempotent


def test_switch_over_refused_to_a_down_member(engine: WorldEngine) -> None:
    engine.reboot_node("n2")
    with pytest.raises(Conflict, match="down"):
        engine.switch_over("vnf-as", "as-b")


def test_switch_over_refused_while_resyncing(engine: WorldEngine, clock: ManualClock) -> None:
    engine.reboot_node("n2", duration_s=1.0)
    clock.advance(1.0)
    assert engine.vnf("vnf-as").sync["as-b"].state == "resyncing"
    with pytest.raises(Conflict, match="resyncing"):
        engine.switch_over("vnf-as", "as-b")
    clock.advance(2.0)
    assert engine.switch_over("vnf-as", "as-b").active_member == "as-b"


def test_switch_over_bad_requests(engine: WorldEngine) -> None:
    with pytest.raises(InvalidRequest):
        engine.switch_over("vnf-lb", "lb-a")
    with pytest.raises(InvalidRequest, match="not a member"):
        engine.switch_over("vnf-as", "lb-a")
    with pytest.raises(NotFound):
        engine.switch_over("ghost", "as-a")


def test_drain_moves_load_to_members_in_service(engine: WorldEngine) -> None:
    vnf = engine.drain_member("vnf-lb", "lb-a")
    assert vnf.load_share["lb-a"] == 0
    assert vnf.load_share["lb-b"] == pytest.approx(0.5)
    assert vnf.load_share["lb-c"] == pytest.approx(0.5)
    assert vnf.members_in_service == ["lb-b", "lb-c"]
    assert engine.drain_member("vnf-lb", "lb-a").load_share["lb-a"] == 0  # idempotent


def test_drain_refused_below_min_in_service(engine: WorldEngine) -> None:
    engine.drain_member("vnf-lb", "lb-a")
    with pytest.raises(Conflict, match="min_in_service"):
        engine.drain_member("vnf-lb", "lb-b")
    assert engine.vnf("vnf-lb").load_share["lb-b"] == pytest.approx(0.5)


def test_drain_does_not_count_down_members_as_receivers(engine: WorldEngine) -> None:
    engine.reboot_node("n3")  # lb-c is down while still loaded
    with pytest.raises(Conflict, match="min_in_service"):
        engine.drain_member("vnf-lb", "lb-a")


def test_restore_gives_a_fair_share_back(engine: WorldEngine) -> None:
    engine.drain_member("vnf-lb", "lb-a")
    vnf = engine.restore_member("vnf-lb", "lb-a")
    for member in ("lb-a", "lb-b", "lb-c"):
        assert vnf.load_share[member] == pytest.approx(1 / 3)
    assert sum(vnf.load_share.values()) == pytest.approx(1.0)


def test_restore_refused_while_member_down(engine: WorldEngine) -> None:
    engine.drain_member("vnf-lb", "lb-c")
    engine.reboot_node("n3")
    with pytest.raises(Conflict, match="down"):
        engine.restore_member("vnf-lb", "lb-c")


def test_drain_on_active_standby_is_invalid(engine: WorldEngine) -> None:
    with pytest.raises(InvalidRequest):
        engine.drain_member("vnf-as", "as-a")


# --- scenario generator -----------------------------------------------------------------------


def test_generate_is_deterministic() -> None:
    assert generate(nodes=8, failure_domains=2, seed=3) == generate(
        nodes=8, failure_domains=2, seed=3
    )
    assert generate(nodes=8, failure_domains=2, seed=3) != generate(
        nodes=8, failure_domains=2, seed=4
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_generated_cloud_has_about_one_node_of_spare_capacity(seed: int) -> None:
    state = generate(nodes=12, failure_domains=3, seed=seed)
    index = PlacementIndex.of(state)
    max_load = max(index.usage[n][0] for n in state.nodes)
    free = sum(index.free(n)[0] for n in state.nodes.values())
    assert max_load <= free <= 1.5 * max_load
    assert satisfies_spare_capacity(state)
    for node_id in state.nodes:
        assert plan_evacuation(state, node_id) is not None


def test_generated_vnfs_follow_the_layout_rules() -> None:
    state = generate(nodes=12, failure_domains=3, seed=0)
    kinds = {v.redundancy for v in state.vnfs.values()}
    assert kinds == {"active_standby", "load_balanced"}
    assert any(vm.vnf_id is None for vm in state.vms.values())
    for vnf in state.vnfs.values():
        nodes = [state.vms[m].node_id for m in vnf.members]
        assert len(set(nodes)) == len(nodes), "members share a node"
        assert len({state.vms[m].server_group for m in vnf.members}) == 1
        if vnf.redundancy == "active_standby":
            assert len(vnf.members) == 2 and vnf.active_member == vnf.members[0]
            domains = {state.nodes[n].failure_domain for n in nodes}
            assert len(domains) == 2
        else:
            assert 3 <= len(vnf.members) <= 4
            assert vnf.min_in_service == len(vnf.members) - 1
            assert sum(vnf.load_share.values()) == pytest.approx(1.0)


def test_registry_records_describe_every_vnf() -> None:
    state = generate(nodes=6, failure_domains=2, seed=0)
    records = vnf_registry_records(state)
    assert {r["vnf_id"] for r in records} == set(state.vnfs)
    for record in records:
        assert set(record) == {
            "vnf_id",
            "vnfm_id",
            "redundancy",
            "members",
            "min_in_service",
            "max_unavailable",
            "min_recovery_s",
        }


def test_generate_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError):
        generate(nodes=1)
    with pytest.raises(ValueError):
        generate(nodes=3, failure_domains=4)


# --- property: random operations never overcommit and never place into maintenance -------------

NODE_IDS = ["n1", "n2", "n3", "n4"]
VM_IDS = ["as-a", "as-b", "lb-a", "lb-b", "lb-c", "loose", "big"]

operations = st.one_of(
    st.tuples(st.just("claim"), st.sampled_from(NODE_IDS), st.sampled_from(["um-1", "um-2"])),
    st.tuples(st.just("release"), st.sampled_from(NODE_IDS), st.sampled_from(["um-1", "um-2"])),
    st.tuples(st.just("migrate"), st.sampled_from(VM_IDS), st.sampled_from([None, *NODE_IDS])),
    st.tuples(st.just("reboot"), st.sampled_from(NODE_IDS), st.booleans()),
    st.tuples(st.just("admin_disable"), st.sampled_from(NODE_IDS), st.none()),
    st.tuples(st.just("admin_enable"), st.sampled_from(NODE_IDS), st.none()),
    st.tuples(st.just("advance"), st.floats(min_value=0, max_value=2), st.none()),
    st.tuples(st.just("switch_over"), st.sampled_from(["as-a", "as-b"]), st.none()),
    st.tuples(st.just("drain"), st.sampled_from(["lb-a", "lb-b", "lb-c"]), st.none()),
    st.tuples(st.just("restore"), st.sampled_from(["lb-a", "lb-b", "lb-c"]), st.none()),
    st.tuples(st.just("inventory"), st.sampled_from([None, *NODE_IDS]), st.none()),
    st.tuples(st.just("fail_migrations_to"), st.sampled_from(NODE_IDS), st.integers(0, 2)),
    st.tuples(
        st.just("migrate_avoiding"),
        st.sampled_from(VM_IDS),
        st.lists(st.sampled_from(NODE_IDS), max_size=3),
    ),
)


def check_invariants(engine: WorldEngine) -> None:
    state = engine.state
    index = PlacementIndex.of(state)
    for node in state.nodes.values():
        free_vcpus, free_ram = index.free(node)
        assert free_vcpus >= 0 and free_ram >= 0, f"{node.id} overcommitted"
    for group, locations in index.group_locations.items():
        nodes = [node for _, node in locations]
        assert len(nodes) == len(set(nodes)), f"anti-affinity broken for {group}"
    # the indexes (VMs by node, usage, work in flight, cached inventory) match the state
    engine.check_indexes()
    # the monitor, asked only about what can be impaired, has open what a full look finds
    open_keys = {
        (i.vnf_id, i.kind, tuple(i.members) if i.vnf_id is None else ())
        for i in state.interruptions
        if i.ended_at is None
    }
    assert open_keys == {imp.key for imp in detect_impairments(state)}


class FullyObservingEngine(WorldEngine):
    """The engine as it was: the monitor looks at everything after every change."""

    def _observe(self) -> None:
        observe(self.state, self.now)


def apply(engine: WorldEngine, clock: ManualClock, op: str, subject: object, arg: object) -> None:
    if op == "claim":
        engine.claim_maintenance(str(subject), str(arg))
    elif op == "release":
        engine.release_maintenance(str(subject), str(arg))
    elif op == "migrate":
        destination = arg if isinstance(arg, str) else None
        target_before = engine.state.nodes[destination].model_copy() if destination else None
        vm = engine.migrate_vm(str(subject), destination)
        chosen_before = target_before or engine.state.nodes[vm.migration_target or ""]
        # Migrations completing in the same call cannot happen (duration > 0), so the
        # destination's state is the one the decision saw.
        assert chosen_before.maintenance_holder is None
        assert chosen_before.service_status == "enabled"
    elif op == "reboot":
        engine.reboot_node(str(subject), duration_s=1.0, fail=bool(arg))
    elif op == "admin_disable":
        engine.admin_disable(str(subject), "test")
    elif op == "admin_enable":
        engine.admin_enable(str(subject))
    elif op == "advance":
        assert isinstance(subject, float)
        clock.advance(subject)
        engine.tick()
    elif op == "switch_over":
        engine.switch_over("vnf-as", str(subject))
    elif op == "drain":
        engine.drain_member("vnf-lb", str(subject))
    elif op == "restore":
        engine.restore_member("vnf-lb", str(subject))
    elif op == "inventory":
        engine.inventory_json(None if subject is None else [str(subject)])
    elif op == "fail_migrations_to":
        assert isinstance(arg, int)
        engine.inject_migration_faults(str(subject), arg)
    elif op == "migrate_avoiding":
        assert isinstance(arg, list)
        vm = engine.migrate_vm(str(subject), avoid=arg)
        assert vm.migration_target not in arg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=40))
def test_random_operations_keep_placement_invariants(
    ops: list[tuple[str, object, object]],
) -> None:
    clock = ManualClock()
    engine = WorldEngine(small_world(), clock=clock)
    for op, subject, arg in ops:
        try:
            apply(engine, clock, op, subject, arg)
        except EngineError:
            pass
        check_invariants(engine)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=40))
def test_observing_what_can_be_impaired_logs_what_observing_everything_logs(
    ops: list[tuple[str, object, object]],
) -> None:
    clocks = ManualClock(), ManualClock()
    engines = (
        WorldEngine(small_world(), clock=clocks[0]),
        FullyObservingEngine(small_world(), clock=clocks[1]),
    )
    for op, subject, arg in ops:
        outcomes = []
        for engine, clock in zip(engines, clocks, strict=True):
            try:
                apply(engine, clock, op, subject, arg)
                outcomes.append("ok")
            except EngineError as err:
                outcomes.append(type(err).__name__)
        assert outcomes[0] == outcomes[1]
        assert engines[0].state == engines[1].state


# --- indexes and inventory ------------------------------------------------------------------------


def test_lists_keep_state_order_with_incoming_last(engine: WorldEngine, clock: ManualClock) -> None:
    engine.migrate_vm("lb-c", "n4")
    assert [(v.id, v.incoming) for v in engine.list_vms("n4")] == [
        ("big", False),
        ("lb-c", True),
    ]
    assert engine.node("n4").incoming_vm_ids == ["lb-c"]
    clock.advance(1.0)
    engine.tick()
    # landed: listed where it stands in the state (before "big"), not where it arrived
    assert [v.id for v in engine.list_vms("n4")] == ["lb-c", "big"]
    assert engine.node("n4").vm_ids == ["lb-c", "big"]
    assert engine.node("n3").vm_ids == ["loose"]
    engine.check_indexes()


def test_inventory_lists_every_node_or_some_with_their_vms(
    engine: WorldEngine, clock: ManualClock
) -> None:
    everything = engine.inventory()
    assert [n["id"] for n in everything] == NODE_IDS
    n1 = everything[0]
    assert {k: v for k, v in n1.items() if k != "vms"} == {
        "id": "n1",
        "failure_domain": "fd-1",
        "vcpus": 8,
        "ram_mb": 16384,
        "power": "up",
        "service_status": "enabled",
        "maintenance_holder": None,
    }
    assert n1["vms"] == [
        {"id": "as-a", "vnf_id": "vnf-as", "vcpus": 4, "ram_mb": 4096, "incoming": False},
        {"id": "lb-a", "vnf_id": "vnf-lb", "vcpus": 2, "ram_mb": 2048, "incoming": False},
    ]
    assert [n["id"] for n in engine.inventory(["n4", "n2"])] == ["n4", "n2"]
    with pytest.raises(NotFound):
        engine.inventory(["n9"])
    assert json.loads(engine.inventory_json()) == {"nodes": everything}
    assert engine.inventory_json([]) == '{"nodes":[]}'
    lines = engine.inventory_ndjson().splitlines()
    assert [json.loads(line) for line in lines] == everything
    assert engine.inventory_ndjson(["n3"]) == engine.inventory_json(["n3"])[10:-2] + "\n"
    # every change shows in the next answer (the per-node cache is dropped when it changes)
    engine.claim_maintenance("n1", "um-1")
    engine.migrate_vm("loose", "n4")
    engine.reboot_node("n2", duration_s=1.0)
    after = {n["id"]: n for n in engine.inventory()}
    assert after["n1"]["maintenance_holder"] == "um-1"
    assert after["n1"]["service_status"] == "disabled"
    assert after["n2"]["power"] == "rebooting"
    assert [(v["id"], v["incoming"]) for v in after["n4"]["vms"]] == [
        ("big", False),
        ("loose", True),
    ]
    clock.advance(1.0)  # the migration lands and the reboot ends, inside the next call
    landed = {n["id"]: n for n in engine.inventory()}
    assert [v["id"] for v in landed["n3"]["vms"]] == ["lb-c"]
    assert [(v["id"], v["incoming"]) for v in landed["n4"]["vms"]] == [
        ("loose", False),
        ("big", False),
    ]
    assert landed["n2"]["power"] == "up"
    engine.release_maintenance("n1", "um-1")
    engine.admin_disable("n3", "fan")
    again = {n["id"]: n for n in engine.inventory()}
    assert again["n1"]["maintenance_holder"] is None
    assert again["n3"]["service_status"] == "disabled"
    engine.check_indexes()


def reference_plan_evacuation(state: WorldState, node_id: str) -> dict[str, str] | None:
    """`plan_evacuation` as first written (a full rebuild per VM), to compare with."""
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_evacuation_plans_as_the_first_version_did(seed: int) -> None:
    state = generate(nodes=8, failure_domains=2, seed=seed, spare_fraction=0.3)
    for node_id in state.nodes:
        expected = reference_plan_evacuation(state, node_id)
        assert expected is not None
        assert plan_evacuation(state, node_id) == expected
    # some nodes unavailable, some migrations in flight: reservations and groups count
    engine = WorldEngine(state, clock=lambda: T0)
    engine.claim_maintenance("node-2", "um")
    engine.admin_disable("node-5", None)
    for vm_id in engine.node("node-2").vm_ids[:3]:
        engine.migrate_vm(vm_id)
    for node_id in state.nodes:
        assert plan_evacuation(state, node_id) == reference_plan_evacuation(state, node_id)
