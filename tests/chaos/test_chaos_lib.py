"""Unit tests of the chaos machinery: scenarios, kill attribution, and that every check bites.

The checks are shown to fail on doctored world snapshots (a node rebooted into the target twice,
a VM lost or on two nodes, a node left in maintenance, an interruption, a campaign not
completed) and to pass on a clean one, and a retry after a failed reboot is not a double apply.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from chaos_lib import (
    INVARIANTS,
    PENDING,
    SAMPLE_SEEDS,
    SERVICES,
    SEVERAL,
    STATES,
    TURNS,
    Check,
    Killer,
    KillPlan,
    KillRecord,
    RunResult,
    Scenario,
    attribute_kills,
    check_invariants,
    make_scenario,
    render_table,
    summary,
)
from e2e_harness import TARGET

from escalator.status import CampaignBoard, CampaignView, NodeView
from escalator.world.engine import WorldEngine
from escalator.world.model import Interruption, RebootRecord, WorldSnapshot
from escalator.world.scenario import generate
from schemas.events import CampaignStarted, NodeCycleAdvanced, NodeStep

pytestmark = pytest.mark.unit


# --- scenarios --------------------------------------------------------------------------------


def test_scenarios_are_a_function_of_the_seed() -> None:
    assert make_scenario(7) == make_scenario(7)
    assert make_scenario(7, "sample") == make_scenario(7, "sample")
    assert make_scenario(7) != make_scenario(8)
    with pytest.raises(ValueError):
        make_scenario(1, "huge")


def test_consecutive_seeds_kill_every_service_in_turn_at_every_step() -> None:
    aimed = Counter()
    for seed in range(25):
        first = make_scenario(seed).kills[0]
        turn = TURNS[seed % len(TURNS)]
        assert (first.services == (turn,)) if turn != SEVERAL else len(first.services) in (2, 3)
        assert first.trigger == "step"
        aimed[(turn, first.state)] += 1
    assert aimed == Counter({(t, s.value): 1 for t in TURNS for s in STATES})


def test_the_sample_aims_at_every_service_and_step() -> None:
    firsts = [make_scenario(seed, "sample").kills[0] for seed in SAMPLE_SEEDS]
    assert {s for k in firsts for s in k.services} == set(SERVICES)
    assert any(len(k.services) > 1 for k in firsts)
    assert {k.state for k in firsts} == {s.value for s in STATES}
    assert sum(1 for seed in SAMPLE_SEEDS if make_scenario(seed, "sample").max_parallel >= 2) >= 2


def test_full_scenarios_have_roomy_worlds_and_parallel_runs() -> None:
    scenarios = [make_scenario(seed) for seed in range(1, 21)]
    assert all(2 <= len(s.kills) <= 3 for s in scenarios)
    assert all(s.spare_fraction >= 0.35 for s in scenarios)
    assert sum(1 for s in scenarios if s.max_parallel >= 2) >= 10
    assert any(k.trigger == "timed" for s in scenarios for k in s.kills)
    assert sum(1 for s in scenarios for k in s.kills if len(k.services) > 1) >= 4


# --- attribution of kills ---------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def advanced(node_id: str, step: NodeStep, at_ms: int) -> NodeCycleAdvanced:
    return NodeCycleAdvanced(
        campaign_id="cmp-x",
        node_id=node_id,
        step=step,
        producer="upgrade-manager",
        occurred_at=T0 + timedelta(milliseconds=at_ms),
    )


def kill_at(at_ms: int, *killed: str) -> KillRecord:
    plan = KillPlan(tuple(killed), "timed", None, 0, 0.0)
    return KillRecord(plan, list(killed), (T0 + timedelta(milliseconds=at_ms)).isoformat(), 0, None)


def test_kills_are_attributed_to_the_steps_in_progress() -> None:
    events = [
        advanced("n1", NodeStep.PENDING, 0),
        advanced("n2", NodeStep.PENDING, 0),
        advanced("n1", NodeStep.CLAIMING, 10),
        advanced("n1", NodeStep.NOTIFYING, 50),
        advanced("n2", NodeStep.CLAIMING, 60),
        advanced("n1", NodeStep.MIGRATING, 100),
        advanced("n1", NodeStep.DONE, 300),
        advanced("n2", NodeStep.DONE, 250),
    ]
    kills = [
        kill_at(5, "upgrade-manager"),
        kill_at(55, "cloud-manager", "node-agent-n1"),
        kill_at(70, "vnfm-adapter"),
        kill_at(350, "upgrade-manager"),
    ]
    attribute_kills(kills, events)
    assert [k.states for k in kills] == [
        [PENDING],
        ["notifying"],
        ["claiming", "notifying"],
        [PENDING],
    ]
    assert kills[1].services == ["cloud-manager", "node-agent"]
    assert kills[1].label() == "CM+node-agent@notifying"


# --- the checks bite --------------------------------------------------------------------------


def clean_world() -> tuple[WorldSnapshot, WorldSnapshot, dict, CampaignView]:
    """A world before, and after a perfect campaign: every node rebooted once into the target."""
    now = [time.time()]
    engine = WorldEngine(generate(nodes=4, failure_domains=2, seed=3), clock=lambda: now[0])
    before = engine.snapshot()
    after = before.model_copy(deep=True)
    records = {}
    for seq, node in enumerate(after.nodes, start=1):
        node.installed_version = TARGET
        node.reboot_count = 1
        node.reboot = RebootRecord(
            sequence=1,
            state="succeeded",
            started_at=seq,
            finishes_at=seq + 1,
            finished_at=seq + 1,
            previous_version="1.0.0",
            target_version=TARGET,
        )
        records[(node.id, 1)] = (False, TARGET, "1.0.0")
    view = CampaignView(
        "cmp-x",
        state="completed",
        nodes={n.id: NodeView(n.id, NodeStep.DONE) for n in before.nodes},
    )
    return before, after, records, view


def broken(checks: dict[str, Check]) -> set[str]:
    return {name for name, check in checks.items() if not check.ok}


def test_a_clean_campaign_keeps_every_invariant() -> None:
    before, after, records, view = clean_world()
    checks = check_invariants(view, before, after, records, [])
    assert set(checks) == set(INVARIANTS)
    assert not broken(checks), checks


def test_a_node_rebooted_into_the_target_twice_is_a_double_apply() -> None:
    before, after, records, view = clean_world()
    node = after.nodes[0]
    node.reboot_count = 2
    records[(node.id, 2)] = (False, TARGET, TARGET)
    assert broken(check_invariants(view, before, after, records, [])) == {"single_apply"}
    # A second reboot never sampled counts as a success too (no fault was injected).
    del records[(node.id, 2)]
    assert broken(check_invariants(view, before, after, records, [])) == {"single_apply"}


def test_a_retry_after_a_failed_reboot_is_allowed() -> None:
    before, after, records, view = clean_world()
    node = after.nodes[0]
    node.reboot_count = 2
    records[(node.id, 1)] = (True, TARGET, "1.0.0")
    records[(node.id, 2)] = (False, TARGET, "1.0.0")
    assert not broken(check_invariants(view, before, after, records, []))


def test_lost_or_duplicated_vms_are_caught() -> None:
    before, after, records, view = clean_world()
    gone = after.vms.pop()
    for node in after.nodes:
        if gone.id in node.vm_ids:
            node.vm_ids.remove(gone.id)
    assert broken(check_invariants(view, before, after, records, [])) == {"vms_intact"}

    before, after, records, view = clean_world()
    vm = after.vms[0]
    other = next(n for n in after.nodes if n.id != vm.node_id)
    other.vm_ids.append(vm.id)  # listed on two nodes
    assert broken(check_invariants(view, before, after, records, [])) == {"vms_intact"}

    before, after, records, view = clean_world()
    after.vms.append(after.vms[0].model_copy())  # the same VM twice
    assert broken(check_invariants(view, before, after, records, [])) == {"vms_intact"}


def test_a_node_left_in_maintenance_is_caught() -> None:
    before, after, records, view = clean_world()
    after.nodes[1].maintenance_holder = "cmp-x"
    after.nodes[1].service_status = "disabled"
    assert broken(check_invariants(view, before, after, records, [])) == {"maintenance_clear"}


def test_an_interruption_is_caught() -> None:
    before, after, records, view = clean_world()
    after.interruptions.append(
        Interruption(
            id=1,
            vnf_id="vnf-as-01",
            kind="active_member_down",
            reason="active member on a rebooting node",
            started_at=1.0,
            ended_at=2.0,
        )
    )
    assert broken(check_invariants(view, before, after, records, [])) == {"no_interruption"}


def test_a_campaign_not_completed_is_caught() -> None:
    before, after, records, view = clean_world()
    view.state = "running"
    assert broken(check_invariants(view, before, after, records, [])) == {"completed"}
    before, after, records, view = clean_world()
    after.nodes[2].installed_version = "1.0.0"
    after.nodes[2].reboot_count = 0
    assert broken(check_invariants(view, before, after, records, [])) == {"completed"}


def test_the_table_counts_kills_by_service_and_step() -> None:
    before, after, records, view = clean_world()
    ok = RunResult(make_scenario(1), campaign_id=f"cmp-{uuid.uuid4().hex[:6]}")
    ok.checks = check_invariants(view, before, after, records, [])
    k1 = kill_at(0, "upgrade-manager", "node-agent-n1")
    k1.steps = {"n1": "upgrading", "n2": "claiming"}
    k2 = kill_at(0, "cloud-manager")
    ok.kills = [k1, k2]
    bad = RunResult(make_scenario(2), error="campaign still running")
    s = summary([ok, bad])
    assert s["runs"] == 2 and s["passed"] == 1 and s["failed"] == [2]
    assert s["kills_by_service"] == {
        "upgrade-manager": 1,
        "cloud-manager": 1,
        "vnfm-adapter": 0,
        "node-agent": 1,
    }
    assert s["kills_of_several_at_once"] == 1
    assert s["kills_by_state"]["upgrading"] == 1 and s["kills_by_state"][PENDING] == 1
    assert s["kills_by_state"]["claiming"] == 1
    table = render_table([ok, bad])
    assert "BROKEN in seeds [2]" in table and "campaign still running" in table


# --- when kills fire --------------------------------------------------------------------------


class FakeGroup:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def kill(self, name: str) -> None:
        self.calls.append(("kill", name))

    def restart(self, name: str) -> None:
        self.calls.append(("restart", name))


class FakeDeployment:
    def __init__(self, node_ids: list[str]) -> None:
        self.group = FakeGroup()
        self.node_ids = node_ids


async def feed(
    plans: tuple[KillPlan, ...],
    steps: list[tuple[str, NodeStep, str]],
    *,
    bake_kill: KillPlan | None = None,
    nodes: tuple[str, ...] = (),
) -> Killer:
    """Run the campaign events `steps` (node, step, detail) through a killer of `plans`; the
    campaign's nodes are `nodes`, or those the steps name."""
    nodes = tuple(sorted(nodes or {node for node, _, _ in steps}))
    scenario = Scenario(
        1, "full", len(nodes), 2, 0.4, 2, 20.0, plans, canary_bake_s=1.0, bake_kill=bake_kill
    )
    fake = FakeDeployment(list(nodes))
    killer = Killer(fake, scenario)  # type: ignore[arg-type]
    board = CampaignBoard()
    started = CampaignStarted(
        campaign_id="cmp-x", producer="upgrade-manager", target_version=TARGET, nodes=nodes
    )
    for event in [started] + [
        NodeCycleAdvanced(
            campaign_id="cmp-x", node_id=node, step=step, detail=detail, producer="upgrade-manager"
        )
        for node, step, detail in steps
    ]:
        board.apply(event)
        killer.on_event(event, board.view("cmp-x"))
        await asyncio.sleep(0.005)  # delays of 0: the scheduled kill runs here
    return killer


C, N, M, U, R, D = (
    NodeStep.CLAIMING,
    NodeStep.NOTIFYING,
    NodeStep.MIGRATING,
    NodeStep.UPGRADING,
    NodeStep.RELEASING,
    NodeStep.DONE,
)


def cycle(node: str, migrate: str = "waiting for 1 VM migration(s)") -> list:
    return [
        (node, C, ""),
        (node, N, ""),
        (node, M, migrate),
        (node, U, ""),
        (node, R, ""),
        (node, D, ""),
    ]


async def test_a_step_kill_fires_at_the_nth_node_entering_the_step() -> None:
    plans = (
        KillPlan(("node-agent",), "step", "upgrading", 1, 0.0),
        KillPlan(("upgrade-manager", "cloud-manager"), "step", "claiming", 0, 0.0),
    )
    killer = await feed(plans, [*cycle("n1"), *cycle("n2"), *cycle("n3")])
    assert [(k.killed, k.trigger_node) for k in killer.done] == [
        (["node-agent-n2"], "n2"),
        (["upgrade-manager", "cloud-manager"], "n3"),
    ]
    # Several at once: every one is killed before any is started again.
    assert killer.d.group.calls[2:] == [
        ("kill", "upgrade-manager"),
        ("kill", "cloud-manager"),
        ("restart", "upgrade-manager"),
        ("restart", "cloud-manager"),
    ]


async def test_a_step_passed_through_is_skipped_until_the_last_chance() -> None:
    plan = (KillPlan(("vnfm-adapter",), "step", "migrating", 0, 0.0),)
    # n1 has nothing to migrate; n2 has: the kill waits for n2's migrating step.
    killer = await feed(plan, [*cycle("n1", "nothing to migrate"), *cycle("n2")])
    assert [(k.trigger_node, k.seen["n2"]) for k in killer.done] == [("n2", "migrating")]
    # Nobody left to migrate: the kill lands on the next step there is.
    killer = await feed(plan, [*cycle("n1", "nothing to migrate"), *cycle("n2", "nothing to")])
    assert [(k.trigger_node, k.seen["n2"]) for k in killer.done] == [("n2", "upgrading")]


async def test_an_overlap_kill_waits_for_two_nodes_in_their_cycle() -> None:
    plan = (KillPlan(("upgrade-manager",), "overlap", None, 0, 0.0),)
    steps = [("n1", C, ""), ("n1", N, ""), ("n2", C, ""), ("n2", N, "")]
    killer = await feed(plan, steps)
    assert [k.trigger_node for k in killer.done] == ["n2"]
    assert sorted(s for s in killer.done[0].seen.values() if s != "pending") == [
        "claiming",
        "notifying",
    ]


def test_some_full_scenarios_aim_a_kill_at_the_canary_bake() -> None:
    scenarios = [make_scenario(seed) for seed in range(1, 21)]
    baking = [s for s in scenarios if s.bake_kill is not None]
    assert len(baking) >= 5
    assert all(
        s.canary_bake_s > 0 and s.bake_kill is not None and s.bake_kill.trigger == "pending"
        for s in baking
    )
    assert all(make_scenario(seed, "sample").bake_kill is None for seed in SAMPLE_SEEDS)


async def test_the_bake_kill_fires_when_no_node_is_in_its_cycle() -> None:
    bake = KillPlan(("cloud-manager",), "pending", "pending", 0, 0.0)
    step = KillPlan(("upgrade-manager",), "step", "claiming", 0, 0.0)
    killer = await feed(
        (step,), [*cycle("n1"), ("n2", C, ""), ("n2", N, "")], bake_kill=bake, nodes=("n1", "n2")
    )
    kills = {tuple(k.killed): k for k in killer.done}
    assert set(kills) == {("upgrade-manager",), ("cloud-manager",)}
    # at the bake kill, n1 was done and n2 not started
    assert kills[("cloud-manager",)].seen == {"n1": "done", "n2": "pending"}
