"""The forecast on small clouds with known answers, and on the benchmark scenarios."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.upgrade_manager.domain.forecast import (
    Batch,
    StepDurations,
    forecast,
    lower_bound,
)
from services.upgrade_manager.domain.planner import (
    Blocker,
    Cloud,
    Host,
    Limits,
    VmLoad,
    VnfRule,
)

pytestmark = pytest.mark.unit

T0 = datetime(2030, 5, 1, tzinfo=UTC)
D = StepDurations()  # claim 0.2, notify 1.0, migrate 0.5, upgrade 3.0, release 0.2
EMPTY = 3.4  # claim + upgrade + release
NOTIFIED = 4.4  # + notify
MIGRATED = 3.9  # + migrate
BOTH = 4.9
SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "scenarios"


def vm(vm_id: str, vnf_id: str | None = None, vcpus: int = 2) -> VmLoad:
    return VmLoad(vm_id, vnf_id, vcpus, vcpus * 1024)


def host(node_id: str, *vms: VmLoad, vcpus: int = 16, domain: str = "fd1", **kw: bool) -> Host:
    return Host.of(node_id, domain, vcpus, vcpus * 1024, vms, **kw)


def pair(recovery_s: float = 2.0) -> dict[str, VnfRule]:
    return {"as": VnfRule("as", 2, 1, 1, min_recovery_s=recovery_s, anti_affinity=True)}


def test_node_cycle_s() -> None:
    rules = pair()
    assert D.node_cycle_s(host("a"), rules) == pytest.approx(EMPTY)
    assert D.node_cycle_s(host("a", vm("m", "as")), rules) == pytest.approx(NOTIFIED)
    assert D.node_cycle_s(host("a", vm("u")), rules) == pytest.approx(MIGRATED)
    assert D.node_cycle_s(host("a", vm("x", "unregistered")), rules) == pytest.approx(MIGRATED)
    assert D.node_cycle_s(host("a", vm("m", "as"), vm("u")), rules) == pytest.approx(BOTH)
    moved = D.node_cycle_s(host("a", vm("m", "as")), rules, migrate_moved_vms=True)
    assert moved == pytest.approx(BOTH)


def test_empty_nodes_two_at_a_time() -> None:
    cloud = Cloud([host(n) for n in ("n1", "n2", "n3")])
    result = forecast(cloud, {}, Limits(max_parallel=2), ["n1", "n2", "n3"], D, start=T0)
    assert result.batches == (Batch(0.0, ("n1", "n2")), Batch(EMPTY, ("n3",)))
    assert result.makespan_s == pytest.approx(2 * EMPTY)
    assert result.finish_s == {"n1": EMPTY, "n2": EMPTY, "n3": pytest.approx(2 * EMPTY)}
    assert result.max_in_maintenance == 2
    assert result.stalled == () and not result.never
    assert result.blocked_now["n3"].reason is Blocker.MAX_PARALLEL


def test_one_at_a_time_is_the_sum_of_the_cycles_and_the_unavoidable_recovery() -> None:
    rules = pair(recovery_s=2.0)
    cloud = Cloud([host("a", vm("m0", "as")), host("b", vm("m1", "as")), host("c")])
    sequential = Limits(max_parallel=1)
    alone = forecast(cloud, rules, sequential, ["a", "b"], D, start=T0)
    # b waits out a's recovery: 4.4 + 2 + 4.4.
    assert alone.makespan_s == pytest.approx(2 * NOTIFIED + 2.0)
    assert [b.start_s for b in alone.batches] == [0.0, pytest.approx(NOTIFIED + 2.0)]
    # With a third node, it fills the wait: no time lost at all.
    three = forecast(cloud, rules, sequential, ["a", "b", "c"], D, start=T0)
    cycles = sum(D.node_cycle_s(cloud.hosts[n], rules) for n in ("a", "b", "c"))
    assert three.makespan_s == pytest.approx(cycles)
    assert [b.nodes for b in three.batches] == [("a",), ("c",), ("b",)]


def test_one_at_a_time_without_recovery_is_exactly_the_sum_of_the_cycles() -> None:
    rules = {"lb": VnfRule("lb", 3, 1, 2)}
    cloud = Cloud(
        [
            host("a", vm("m0", "lb"), vm("u0")),
            host("b", vm("m1", "lb")),
            host("c", vm("m2", "lb")),
            host("d"),
            host("e", vm("u1")),
        ]
    )
    nodes = sorted(cloud.hosts)
    result = forecast(cloud, rules, Limits(max_parallel=1), nodes, D, start=T0)
    # (Migrated VMs land on nodes that come later, which then migrate them again.)
    assert result.makespan_s >= sum(D.node_cycle_s(cloud.hosts[n], rules) for n in nodes)
    starts = [b.start_s for b in result.batches]
    ends = sorted(result.finish_s.values())
    assert starts[1:] == pytest.approx(ends[:-1])  # back to back
    assert result.max_in_maintenance == 1


def test_a_migrated_vm_lands_and_lengthens_its_new_nodes_cycle() -> None:
    # x's loose VM can only go to y; y then has a VM to migrate (back to x) in its own cycle.
    cloud = Cloud([host("x", vm("u", vcpus=4), vcpus=4), host("y", vcpus=4)])
    result = forecast(cloud, {}, Limits(max_parallel=1), ["x", "y"], D, start=T0, order=["x", "y"])
    assert result.finish_s == {"x": MIGRATED, "y": pytest.approx(2 * MIGRATED)}
    # The caller's cloud is untouched: u is still on x.
    assert [v.vm_id for v in cloud.hosts["x"].vms] == ["u"] and not cloud.hosts["y"].vms


def test_forecast_never_mutates_the_cloud_and_is_deterministic() -> None:
    rules = {**pair(), "lb": VnfRule("lb", 3, 1, 2)}
    cloud = Cloud(
        [
            host("a", vm("m0", "as"), vm("l0", "lb"), vm("u0")),
            host("b", vm("m1", "as"), vm("l1", "lb"), vm("u1", vcpus=4)),
            host("c", vm("l2", "lb"), vm("u2")),
            host("d", vm("u3"), domain="fd2"),
            host("e", domain="fd2"),
        ]
    )
    hosts = dict(cloud.hosts)
    placed = copy.deepcopy(dict(cloud.vnf_hosts))
    runs = [
        forecast(
            cloud,
            rules,
            Limits(max_parallel=3),
            sorted(cloud.hosts),
            D,
            start=T0,
            migrate_moved_vms=moved,
        )
        for moved in (False, False, True, True)
    ]
    assert cloud.hosts == hosts and all(cloud.hosts[n] is hosts[n] for n in hosts)
    assert dict(cloud.vnf_hosts) == placed
    assert runs[0] == runs[1] and runs[2] == runs[3]
    assert runs[0].stalled == () and len(runs[0].finish_s) == 5


def test_window_canary_and_bake_in_time() -> None:
    cloud = Cloud([host(f"n{i}") for i in range(4)])
    nodes = sorted(cloud.hosts)
    opens = T0 + timedelta(seconds=100)
    windowed = forecast(cloud, {}, Limits(max_parallel=4, window_start=opens), nodes, D, start=T0)
    assert windowed.batches == (Batch(100.0, tuple(nodes)),)
    assert windowed.blocked_now["n0"].reason is Blocker.WINDOW
    canary = forecast(
        cloud, {}, Limits(max_parallel=4, canary_nodes=1, canary_bake_s=60), nodes, D, start=T0
    )
    assert canary.batches == (Batch(0.0, ("n0",)), Batch(EMPTY + 60, ("n1", "n2", "n3")))
    assert canary.makespan_s == pytest.approx(2 * EMPTY + 60)


def test_never_and_stalled_nodes_are_reported() -> None:
    rules = {"rigid": VnfRule("rigid", 2, 1, 2)}
    cloud = Cloud(
        [
            host("r", vm("r0", "rigid")),
            host("r1", vm("r1", "rigid")),
            host("held", in_maintenance=True),
            host("ok"),
        ]
    )
    result = forecast(cloud, rules, Limits(max_parallel=4), ["r", "held", "ok"], D, start=T0)
    assert set(result.never) == {"r"}
    assert result.stalled == ("held",)
    assert result.blocked_now["held"].reason is Blocker.IN_MAINTENANCE
    assert set(result.finish_s) == {"ok"}


def test_lower_bound_on_small_clouds() -> None:
    rules = pair(recovery_s=2.0)
    cloud = Cloud([host("a", vm("m0", "as")), host("b", vm("m1", "as")), host("c")])
    # The pair is a chain: 4.4 + 2 + 4.4, whatever the parallelism.
    assert lower_bound(cloud, rules, Limits(max_parallel=3), ["a", "b", "c"], D) == 10.8
    # One at a time: every cycle (the recovery can be filled).
    one = lower_bound(cloud, rules, Limits(max_parallel=1), ["a", "b", "c"], D)
    assert one == pytest.approx(2 * NOTIFIED + EMPTY)
    assert lower_bound(cloud, rules, Limits(), [], D) == 0.0


# --- the benchmark scenarios (if present) ------------------------------------------------------


def world_inputs(path: Path) -> tuple[Cloud, dict[str, VnfRule]]:
    """A world scenario file as the planner sees it (the shape `escalator plan` converts)."""
    data: dict[str, Any] = json.loads(path.read_text())
    loads: dict[str, list[VmLoad]] = defaultdict(list)
    for v in data["vms"].values():
        loads[v["node_id"]].append(VmLoad(v["id"], v.get("vnf_id"), v["vcpus"], v["ram_mb"]))
    cloud = Cloud(
        Host.of(n["id"], n["failure_domain"], n["vcpus"], n["ram_mb"], loads.get(n["id"], ()))
        for n in data["nodes"].values()
    )
    rules = {
        f["id"]: VnfRule(
            f["id"],
            len(f["members"]),
            1 if f["redundancy"] == "active_standby" else f.get("max_unavailable", 1),
            f.get("min_in_service", 1),
            f.get("min_recovery_s", 0.0),
            anti_affinity=True,
        )
        for f in data["vnfs"].values()
    }
    return cloud, rules


def scenario(name: str) -> tuple[Cloud, dict[str, VnfRule]]:
    path = SCENARIOS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return world_inputs(path)


def test_the_tight_scenario_serialises_and_says_why() -> None:
    cloud, rules = scenario("tight.json")
    nodes = sorted(cloud.hosts)
    result = forecast(cloud, rules, Limits(max_parallel=len(nodes)), nodes, D, start=T0)
    assert result.max_in_maintenance == 1
    assert result.stalled == () and not result.never
    assert {b.reason for b in result.blocked_now.values()} <= {
        Blocker.CAPACITY,
        Blocker.VNF_BUDGET,
    }
    assert any(b.reason is Blocker.CAPACITY for b in result.blocked_now.values())
    sequential = forecast(cloud, rules, Limits(max_parallel=1), nodes, D, start=T0)
    assert result.makespan_s == pytest.approx(sequential.makespan_s)
    bound = lower_bound(cloud, rules, Limits(max_parallel=len(nodes)), nodes, D)
    assert bound <= result.makespan_s
    assert bound >= 0.9 * result.makespan_s  # the bound sees that capacity allows one node


def test_the_standard_scenario_goes_many_times_faster_than_one_at_a_time() -> None:
    cloud, rules = scenario("standard.json")
    nodes = sorted(cloud.hosts)
    limits = Limits(max_parallel=len(nodes))
    # The scenario's own (real-world) timings: 20 s migrations, 240 s reboots.
    real = StepDurations(claim_s=1.0, notify_s=5.0, migrate_s=20.0, upgrade_s=240.0, release_s=1.0)
    planned = forecast(cloud, rules, limits, nodes, real, start=T0)
    sequential = forecast(cloud, rules, Limits(max_parallel=1), nodes, real, start=T0)
    bound = lower_bound(cloud, rules, limits, nodes, real)
    assert planned.stalled == () and not planned.never
    assert bound <= planned.makespan_s
    speedup = sequential.makespan_s / planned.makespan_s
    efficiency = bound / planned.makespan_s
    print(f"\nstandard: speedup {speedup:.2f}, efficiency {efficiency:.3f}")
    assert speedup >= 8
    assert efficiency >= 0.7
