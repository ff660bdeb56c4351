"""The planner's backtracking placement (`_Capacity._search`) against brute force, and its cost.

The search prunes branches whose VMs need more than the hosts have free together, and tries only
one of several hosts that are alike for the VMs left. Both prunings must keep it exact: on small
clouds it finds a placement exactly when one exists (checked by enumerating every assignment),
and what it finds keeps room and anti-affinity. Its cost is bounded per search and counted, and
the campaign order's work budget counts it: a tight 12-node cloud once took minutes to order.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services.upgrade_manager.domain.forecast as forecast_module
from services.upgrade_manager.domain.forecast import SEARCH_WORK_PER_UNIT, campaign_order
from services.upgrade_manager.domain.planner import (
    SEARCH_CUT_NOTE,
    SEARCH_MAX_WORK,
    Blocker,
    Cloud,
    Host,
    Limits,
    Progress,
    VmLoad,
    VnfRule,
    _Capacity,
    never_upgradable,
    plan_step,
)

pytestmark = pytest.mark.unit

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def brute_force_fits(
    cloud: Cloud, rules: Mapping[str, VnfRule], hosts: Sequence[str], vms: Sequence[VmLoad]
) -> bool:
    """Whether some assignment of `vms` to `hosts` keeps room and anti-affinity."""
    for assignment in itertools.product(hosts, repeat=len(vms)):
        free = {h: (cloud.hosts[h].free_vcpus, cloud.hosts[h].free_ram_mb) for h in hosts}
        members: dict[tuple[str, str], int] = {}
        ok = True
        for vm, h in zip(vms, assignment, strict=True):
            cpu, ram = free[h]
            if cpu < vm.vcpus or ram < vm.ram_mb:
                ok = False
                break
            free[h] = (cpu - vm.vcpus, ram - vm.ram_mb)
            rule = rules.get(vm.vnf_id) if vm.vnf_id else None
            if rule is not None and rule.anti_affinity and vm.vnf_id is not None:
                if h in cloud.vnf_hosts.get(vm.vnf_id, {}) or members.get((h, vm.vnf_id)):
                    ok = False
                    break
                members[(h, vm.vnf_id)] = 1
        if ok:
            return True
    return False


@st.composite
def placements(draw: st.DrawFn) -> tuple[Cloud, dict[str, VnfRule], Host]:
    """A few hosts with little, uneven room, VNFs with members on them, and a node to empty."""
    names = [f"h{i}" for i in range(draw(st.integers(1, 5)))]
    vnfs = [f"v{i}" for i in range(draw(st.integers(0, 3)))]
    rules = {v: VnfRule(v, 4, 1, 0, 0.0, draw(st.booleans())) for v in vnfs}
    serial = itertools.count()
    hosts = []
    for name in names:
        on_it = [
            VmLoad(f"m{next(serial)}", draw(st.sampled_from([None, *vnfs])), 1, 512)
            for _ in range(draw(st.integers(0, 2)))
        ]
        hosts.append(
            Host.of(
                name,
                "fd",
                # Rooms from a few sizes, so that hosts are often alike but for their VNFs.
                len(on_it) + draw(st.integers(0, 3)),
                512 * len(on_it) + 1024 * draw(st.sampled_from([0, 2, 2, 4])),
                on_it,
            )
        )
    leaving = [
        VmLoad(
            f"m{next(serial)}",
            draw(st.sampled_from([None, *vnfs])),
            draw(st.integers(1, 2)),
            1024 * draw(st.integers(0, 1)),
        )
        for _ in range(draw(st.integers(1, 5)))
    ]
    victim = Host.of("victim", "fd", 64, 1 << 20, leaving)
    return Cloud([*hosts, victim]), rules, victim


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(placements())
def test_the_search_finds_a_placement_exactly_when_one_exists(
    case: tuple[Cloud, dict[str, VnfRule], Host],
) -> None:
    cloud, rules, victim = case
    others = sorted(h for h in cloud.hosts if h != victim.node_id)
    ordered = sorted(victim.vms, key=lambda v: (-v.vcpus, -v.ram_mb, v.vm_id))
    capacity = _Capacity(cloud, {victim.node_id})
    found = capacity._search(ordered, rules)
    assert not capacity.search_cut, "a search this small never reaches its bound"
    assert (found is not None) == brute_force_fits(cloud, rules, others, ordered)
    if found is None:
        assert not any(capacity.added.values()), "a failed search reserves nothing"
        assert capacity.free == {
            h: (cloud.hosts[h].free_vcpus, cloud.hosts[h].free_ram_mb) for h in others
        }
        return
    assert sorted(vm.vm_id for vm, _ in found) == sorted(vm.vm_id for vm in ordered)
    for h in others:
        landed = [vm for vm, where in found if where == h]
        assert sum(vm.vcpus for vm in landed) <= cloud.hosts[h].free_vcpus
        assert sum(vm.ram_mb for vm in landed) <= cloud.hosts[h].free_ram_mb
        for vnf_id in {vm.vnf_id for vm in landed if vm.vnf_id is not None}:
            if rules[vnf_id].anti_affinity:
                assert h not in cloud.vnf_hosts.get(vnf_id, {})
                assert sum(vm.vnf_id == vnf_id for vm in landed) == 1


def test_a_search_that_cannot_be_pruned_stops_at_its_bound_and_says_so() -> None:
    # Every host has 3 vCPUs free (and a RAM room of its own, so no two are alike); the VMs need
    # 2 each and their total fits the free vCPUs, but no host takes two: only search shows it.
    hosts = [
        Host.of(f"h{i:02d}", "fd", 8, 100_000, [VmLoad(f"x{i}", None, 5, 90_000 - 10 * i)])
        for i in range(40)
    ]
    victim = Host.of("victim", "fd", 64, 1 << 20, [VmLoad(f"v{j}", None, 2, 10) for j in range(60)])
    capacity = _Capacity(Cloud([*hosts, victim]), set())
    assert not capacity.take(victim, {})
    assert capacity.search_cut
    assert SEARCH_MAX_WORK <= capacity.search_work <= SEARCH_MAX_WORK + len(hosts)
    assert not any(capacity.added.values()) and not capacity.placed


def fragmented_cloud(victims: int) -> Cloud:
    """Nodes of 20 small VMs each, and 30 hosts with room for one of those VMs each (and a RAM
    room of their own, so no two are alike): any one node fits, no two at once, and the total
    free vCPUs cannot show it. Every decision with a node in its cycle searches to the bound."""
    fillers = [
        Host.of(f"f{i:02d}", "fd", 8, 100_000, [VmLoad(f"x{i}", None, 5, 90_000 - 10 * i)])
        for i in range(30)
    ]
    nodes = [
        Host.of(f"n{k}", "fd", 40, 1 << 20, [VmLoad(f"n{k}-{j}", None, 2, 10) for j in range(20)])
        for k in range(victims)
    ]
    return Cloud([*fillers, *nodes])


def test_a_node_blocked_by_a_search_cut_short_says_so() -> None:
    cloud = fragmented_cloud(2)
    step = plan_step(
        cloud,
        {},
        Limits(max_parallel=2),
        Progress(frozenset({"n0"}), 1, 0, None, {}),
        ["n1"],
        NOW,
    )
    assert step.start == ()
    blocked = step.blocked["n1"]
    assert blocked.reason is Blocker.CAPACITY and blocked.detail.endswith(SEARCH_CUT_NOTE)
    assert step.search_work >= SEARCH_MAX_WORK


def test_never_upgradable_tells_a_search_cut_short_from_a_cloud_too_small() -> None:
    # "big" has 40 VMs of 2 vCPUs: 80 of the 90 vCPUs free, but each host takes one VM, so only
    # a search shows it cannot fit; "huge" needs more vCPUs than the whole cloud has free.
    fillers = list(fragmented_cloud(0).hosts.values())
    big = Host.of("big", "fd", 80, 1 << 20, [VmLoad(f"b{j}", None, 2, 10) for j in range(40)])
    huge = Host.of("huge", "fd", 100, 1 << 20, [VmLoad("h0", None, 100, 10)])
    found = never_upgradable(Cloud([*fillers, big, huge]), {}, ["big", "huge"])
    assert sorted(found) == ["big", "huge"]
    assert found["big"].detail.endswith(SEARCH_CUT_NOTE)
    assert not found["huge"].detail.endswith(SEARCH_CUT_NOTE)


def test_the_order_search_counts_placement_searches_in_its_work_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cloud = fragmented_cloud(4)
    nodes = [h for h in cloud.hosts if h.startswith("n")]
    scored: list[tuple[int, int]] = []  # (decision units, search work) of each forecast
    real = forecast_module.forecast

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        scored.append((max(1, result.decisions) * len(args[3]), result.search_work))
        return result

    monkeypatch.setattr(forecast_module, "forecast", counting)
    work = 2_000
    order = campaign_order(cloud, {}, Limits(max_parallel=4), nodes, work=work)
    assert sorted(order) == sorted(nodes)
    units = [d + s // SEARCH_WORK_PER_UNIT for d, s in scored]
    assert all(s >= SEARCH_MAX_WORK for _, s in scored), "every forecast searched to the bound"
    # The search stops once its budget is spent, searches included: at most one forecast over.
    assert sum(units[:-1]) < work, (units, work)
    assert sum(d for d, _ in scored) < work / 10, "decisions alone would not have stopped it"


def test_hosts_alike_in_room_but_not_in_members_are_both_tried() -> None:
    # a and b have the same room, but b has a member of the anti-affinity VNF x. The first VM
    # (of y) fits either; only on b does it leave a's room for the member of x.
    rules = {"x": VnfRule("x", 2, 1, 0, 0.0, True), "y": VnfRule("y", 1, 1, 0, 0.0, False)}
    a = Host.of("a", "fd", 2, 2048, [VmLoad("other", None, 1, 1024)])
    b = Host.of("b", "fd", 2, 2048, [VmLoad("x-1", "x", 1, 1024)])
    victim = Host.of(
        "victim", "fd", 8, 8192, [VmLoad("p1", "y", 1, 1024), VmLoad("p2", "x", 1, 1024)]
    )
    capacity = _Capacity(Cloud([a, b, victim]), {"victim"})
    found = capacity._search(list(victim.vms), rules)
    assert found is not None
    assert dict((vm.vm_id, h) for vm, h in found) == {"p1": "b", "p2": "a"}
