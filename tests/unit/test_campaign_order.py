"""`campaign_order`: the order the Upgrade Manager gives a campaign and the forecast predicts with.

A bounded, deterministic local search over `priority_order`, scored by the forecast under
ORDER_MODEL: a permutation of the nodes, the same for the same inputs, within its work budget,
never worse than `priority_order` under the model, and the order both the manager and
`forecast` use.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from core_harness import Driver

import services.upgrade_manager.domain.forecast as forecast_module
from escalator.plan import cloud_from_world, inputs_from_scenario
from escalator.world.model import Timings
from escalator.world.scenario import generate
from services.upgrade_manager.domain.forecast import (
    ORDER_MODEL,
    ORDER_SEARCH_MAX_NODES,
    StepDurations,
    campaign_order,
    forecast,
    lower_bound,
)
from services.upgrade_manager.domain.planner import (
    Cloud,
    Host,
    Limits,
    VmLoad,
    VnfRule,
    priority_order,
)

pytestmark = pytest.mark.unit

T0 = datetime(2030, 5, 1, tzinfo=UTC)
STANDARD = Path(__file__).resolve().parents[2] / "bench" / "scenarios" / "standard.json"
REAL = Timings(migration_s=20.0, reboot_s=240.0, resync_s=30.0)


def world_cloud(nodes: int, seed: int, spare: float = 0.15) -> tuple[Cloud, dict[str, VnfRule]]:
    state = generate(nodes=nodes, failure_domains=3, seed=seed, spare_fraction=spare, timings=REAL)
    return cloud_from_world(state)


def random_cloud(seed: int) -> tuple[Cloud, dict[str, VnfRule]]:
    """Hosts of random sizes and fill, VNFs of 2-4 members with random tolerances and
    recoveries, some VMs of no VNF (migrated), some nodes held in maintenance outside."""
    rnd = random.Random(seed)
    count = rnd.randint(6, 24)
    rules: dict[str, VnfRule] = {}
    vms: dict[str, list[VmLoad]] = {f"h{i:02d}": [] for i in range(count)}
    ids = list(vms)
    for v in range(rnd.randint(2, count)):
        members = rnd.randint(2, min(4, count))
        vnf_id = f"vnf{v}"
        max_unavailable = rnd.choice((1, 1, 2))
        rules[vnf_id] = VnfRule(
            vnf_id,
            members,
            max_unavailable,
            rnd.randint(0, members - 1),
            rnd.choice((0.0, 0.0, 30.0)),
            anti_affinity=rnd.random() < 0.7,
        )
        for m, node_id in enumerate(rnd.sample(ids, members)):
            size = rnd.choice((1, 2, 4))
            vms[node_id].append(VmLoad(f"{vnf_id}-{m}", vnf_id, size, size * 1024))
    for node_id in ids:
        for u in range(rnd.randint(0, 2)):
            vms[node_id].append(VmLoad(f"{node_id}-u{u}", None, 1, 1024))
    hosts = []
    for i, node_id in enumerate(ids):
        vcpus = rnd.choice((8, 12, 16))
        held = rnd.random() < 0.05
        hosts.append(
            Host.of(
                node_id,
                f"fd{i % 3}",
                vcpus,
                vcpus * 1024,
                vms[node_id],
                held,
                "admin" if held else None,
            )
        )
    return Cloud(hosts), rules


def model_score(
    cloud: Cloud, rules: dict[str, VnfRule], limits: Limits, order: Sequence[str]
) -> tuple[int, float]:
    result = forecast(cloud, rules, limits, order, ORDER_MODEL, start=T0, order=order)
    return len(result.stalled), result.makespan_s


@pytest.mark.parametrize("seed", range(12))
def test_a_permutation_deterministic_and_never_worse_than_priority_order(seed: int) -> None:
    cloud, rules = random_cloud(seed)
    nodes = [*sorted(cloud.hosts), "ghost"]  # an unknown node stays in the order
    rnd = random.Random(seed)
    limits = Limits(
        max_parallel=rnd.randint(1, len(nodes)),
        max_per_failure_domain=rnd.choice((None, 1, 2)),
        canary_nodes=rnd.choice((0, 0, 1)),
        canary_bake_s=60.0,
    )
    order = campaign_order(cloud, rules, limits, nodes, work=20_000)
    assert sorted(order) == sorted(nodes)
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert campaign_order(cloud, rules, limits, shuffled, work=20_000) == order
    plain = priority_order(cloud, rules, nodes)
    assert model_score(cloud, rules, limits, order) <= model_score(cloud, rules, limits, plain)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_never_worse_on_generated_worlds(seed: int) -> None:
    cloud, rules = world_cloud(40, seed)
    nodes = sorted(cloud.hosts)
    limits = Limits(max_parallel=len(nodes))
    order = campaign_order(cloud, rules, limits, nodes)
    plain = priority_order(cloud, rules, nodes)
    assert model_score(cloud, rules, limits, order) <= model_score(cloud, rules, limits, plain)


def test_the_work_budget_bounds_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    cloud, rules = world_cloud(40, 4)
    nodes = sorted(cloud.hosts)
    limits = Limits(max_parallel=len(nodes))
    costs: list[int] = []
    original = forecast_module.forecast

    def counting(*args: Any, **kwargs: Any) -> forecast_module.Forecast:
        result = original(*args, **kwargs)
        costs.append(max(1, result.decisions) * len(args[3]))
        return result

    monkeypatch.setattr(forecast_module, "forecast", counting)
    for work in (1, 5_000, 15_000):
        costs.clear()
        campaign_order(cloud, rules, limits, nodes, work=work)
        # The search stops once the budget is spent: at most one forecast past it.
        assert sum(costs[:-1]) < work
        assert sum(costs) < work + max(costs)
    costs.clear()
    assert campaign_order(cloud, rules, limits, nodes, work=0) == priority_order(
        cloud, rules, nodes
    )
    assert not costs


def test_big_campaigns_keep_the_priority_order(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = [Host.of(f"n{i:04d}", "fd", 16, 16384, ()) for i in range(ORDER_SEARCH_MAX_NODES + 1)]
    cloud = Cloud(hosts)
    called: list[object] = []
    monkeypatch.setattr(forecast_module, "forecast", lambda *a, **k: called.append(a))
    nodes = sorted(cloud.hosts)
    order = campaign_order(cloud, {}, Limits(max_parallel=10), nodes)
    assert order == priority_order(cloud, {}, nodes)
    assert not called


def test_the_order_ignores_the_window_and_the_failure_budget() -> None:
    cloud, rules = random_cloud(3)
    nodes = sorted(cloud.hosts)
    plain = Limits(max_parallel=3)
    windowed = Limits(
        max_parallel=3,
        window_start=datetime(2031, 1, 1, tzinfo=UTC),
        window_end=datetime(2031, 1, 2, tzinfo=UTC),
        failure_budget=0,
    )
    assert campaign_order(cloud, rules, windowed, nodes) == campaign_order(
        cloud, rules, plain, nodes
    )


def test_the_forecast_predicts_with_the_campaign_order() -> None:
    cloud, rules = world_cloud(30, 5)
    nodes = sorted(cloud.hosts)
    limits = Limits(max_parallel=len(nodes))
    durations = StepDurations(claim_s=0.0, notify_s=0.0, migrate_s=20.0, upgrade_s=240.0)
    default = forecast(cloud, rules, limits, nodes, durations, start=T0)
    ordered = campaign_order(cloud, rules, limits, nodes)
    explicit = forecast(cloud, rules, limits, nodes, durations, start=T0, order=ordered)
    assert default.batches == explicit.batches
    assert default.makespan_s == explicit.makespan_s


def test_the_manager_starts_a_campaign_in_the_campaign_order() -> None:
    cloud, rules = world_cloud(16, 6)
    nodes = tuple(sorted(cloud.hosts))
    d = Driver(nodes, cloud=cloud, rules=rules)
    d.start(max_parallel=4)
    assert d.state is not None
    assert d.state.plan.node_order == tuple(
        campaign_order(cloud, rules, Limits(max_parallel=4), nodes)
    )
    kept = Driver(nodes, cloud=cloud, rules=rules)
    kept.start(max_parallel=4, keep_order=True)
    assert kept.state is not None
    assert kept.state.plan.node_order == nodes


def test_standard_scenario_reaches_the_efficiency_target() -> None:
    """Issue 5: lower bound / forecast >= 0.9 on the bench's standard scenario, with the
    order the manager would use (the forecast's default)."""
    inputs = inputs_from_scenario(STANDARD)
    cloud, rules = inputs.cloud, inputs.rules
    timings = inputs.source["timings"]
    durations = StepDurations(
        claim_s=0.0,
        notify_s=0.0,
        migrate_s=timings["migration_s"],
        upgrade_s=timings["reboot_s"],
        release_s=0.0,
    )
    nodes = sorted(cloud.hosts)
    limits = Limits(max_parallel=len(nodes))
    predicted = forecast(cloud, rules, limits, nodes, durations, start=T0)
    plain = forecast(
        cloud, rules, limits, nodes, durations, start=T0, order=priority_order(cloud, rules, nodes)
    )
    bound = lower_bound(cloud, rules, limits, nodes, durations)
    assert not predicted.stalled
    assert predicted.makespan_s <= plain.makespan_s
    assert bound / predicted.makespan_s >= 0.9
