"""Properties of the decision core, run against a simulated cloud, VNFM adapter and node agents.

Replies arrive in any interleaving the topics allow (order kept per topic and key), with
duplicates, lost commands, manager restarts (recover) and Ticks; safety is checked after every
decision by the harness (see `Sim.check_invariants`), liveness and replay at the end.
"""

from __future__ import annotations

import random

import pytest
from core_harness import ALLOWED_STEPS, CAMPAIGN, TARGET, Sim, SimConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import CampaignCompleted, CampaignPolicy, NodeStep
from schemas.types import VnfmTimeoutPolicy
from services.upgrade_manager.domain import CampaignState, CampaignStatus, decide

pytestmark = pytest.mark.unit


@st.composite
def configs(draw: st.DrawFn) -> SimConfig:
    nodes = draw(st.integers(1, 5))
    vm_spec = st.tuples(st.sampled_from([None, "vnf-a", "vnf-b", "vnf-c"]), st.integers(1, 4))
    indexes = st.integers(0, nodes - 1)
    policy = CampaignPolicy(
        max_parallel=draw(st.integers(1, 4)),
        vnfm_timeout_s=30,
        on_vnfm_timeout=draw(st.sampled_from(list(VnfmTimeoutPolicy))),
        migrate_moved_vms=draw(st.booleans()),
        step_timeout_s=60,
        upgrade_timeout_s=300,
        agent_liveness_s=30,
        max_step_attempts=draw(st.integers(1, 3)),
        max_deferrals=draw(st.integers(0, 2)),
        deferral_s=draw(st.sampled_from([0.0, 30.0, 300.0])),
    )
    return SimConfig(
        nodes=nodes,
        spare_nodes=draw(st.integers(0, 2)),
        vms=[draw(st.lists(vm_spec, max_size=4)) for _ in range(nodes)],
        capacity=draw(st.integers(8, 20)),
        policy=policy,
        at_target=draw(st.sets(indexes, max_size=2)),
        admin_held=draw(st.sets(indexes, max_size=1)),
        dead_for_s=draw(st.dictionaries(indexes, st.floats(0, 900), max_size=2)),
        preexisting_flights=draw(st.integers(0, 2)),
        all_nodes=draw(st.booleans()),
        p_dup=draw(st.sampled_from([0.0, 0.1, 0.3])),
        p_drop=draw(st.sampled_from([0.0, 0.05, 0.2])),
        p_migration_fail=draw(st.sampled_from([0.0, 0.1, 0.4])),
        p_upgrade_fail=draw(st.sampled_from([0.0, 0.2])),
        p_silent=draw(st.sampled_from([0.0, 0.1, 0.3])),
        p_refuse=draw(st.sampled_from([0.0, 0.2, 0.5])),
        p_extend=draw(st.sampled_from([0.0, 0.2])),
    )


def run(cfg: SimConfig, seed: int, steps: int) -> Sim:
    sim = Sim(cfg, random.Random(seed))
    sim.run(steps)
    sim.finish()
    return sim


SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cfg=configs(), seed=st.integers(0, 2**32), steps=st.integers(0, 300))
def test_every_campaign_ends_safely_with_every_node_finished(
    cfg: SimConfig, seed: int, steps: int
) -> None:
    # Safety (max_parallel, no dead agent claimed, no VM with live business under an upgrade,
    # no upgrade before migrations are confirmed, no placement on a node in maintenance, records
    # untouched keep identity, one id means one command) is asserted after every decision.
    sim = run(cfg, seed, steps)
    state = sim.state
    assert state is not None
    campaign = state.campaign
    ending = sim.ending()
    if campaign.status is CampaignStatus.COMPLETED:
        assert isinstance(ending, CampaignCompleted)
        assert all(record.step.finished for record in state.nodes.values())
        assert (ending.upgraded, ending.skipped, ending.failed) == (
            campaign.done,
            campaign.skipped,
            campaign.failed,
        )
    else:
        # Only a VNFM timeout under policy abort stops a campaign; its unstarted nodes stay
        # PENDING, every node it started has finished.
        assert campaign.status is CampaignStatus.FAILED
        assert cfg.policy.on_vnfm_timeout is VnfmTimeoutPolicy.ABORT
        assert all(r.step.finished or r.step is NodeStep.PENDING for r in state.nodes.values())
    assert sum(r.step.finished for r in state.nodes.values()) == campaign.finished

    for node_id, record in state.nodes.items():
        held = sim.holder[node_id]
        if record.step is NodeStep.DONE:
            assert sim.version[node_id] == TARGET
            assert held != CAMPAIGN, f"{node_id} done but left in maintenance"
        elif record.step is NodeStep.SKIPPED:
            assert held != CAMPAIGN, f"{node_id} skipped but left in maintenance"


@SETTINGS
@given(cfg=configs(), seed=st.integers(0, 2**32), steps=st.integers(0, 300))
def test_every_node_follows_the_cycle_order(cfg: SimConfig, seed: int, steps: int) -> None:
    sim = run(cfg, seed, steps)
    for node_id, steps_seen in sim.steps_by_node().items():
        previous = NodeStep.PENDING
        for step in steps_seen:
            assert step in ALLOWED_STEPS.get(previous, frozenset()), (
                f"{node_id}: {previous} -> {step} in {steps_seen}"
            )
            previous = step
        # A node that upgraded went through every step of its last cycle, none skipped (a
        # deferred cycle ends RELEASING -> PENDING and starts again with CLAIMING).
        if NodeStep.UPGRADING in steps_seen:
            last_round = len(steps_seen) - steps_seen[::-1].index(NodeStep.CLAIMING) - 1
            # (repeated NOTIFYING: progress of an extended VNFM deadline)
            main = [
                s
                for i, s in enumerate(steps_seen[last_round:], last_round)
                if not (s is NodeStep.NOTIFYING and steps_seen[i - 1] is NodeStep.NOTIFYING)
            ]
            assert NodeStep.UPGRADING not in steps_seen[:last_round], steps_seen
            assert main[:4] == [
                NodeStep.CLAIMING,
                NodeStep.NOTIFYING,
                NodeStep.MIGRATING,
                NodeStep.UPGRADING,
            ]


@SETTINGS
@given(
    cfg=configs(),
    seed=st.integers(0, 2**32),
    steps=st.integers(0, 300),
    replay_seed=st.integers(0, 2**32),
)
def test_replaying_the_input_log_with_duplicates_gives_the_same_state(
    cfg: SimConfig, seed: int, steps: int, replay_seed: int
) -> None:
    sim = run(cfg, seed, steps)
    rnd = random.Random(replay_seed)
    state: CampaignState | None = None
    for event, ctx in sim.log:
        for _ in range(2 if rnd.random() < 0.3 else 1):
            state = decide(state, event, ctx).state
    assert state is not None and sim.state is not None
    assert state.campaign == sim.state.campaign
    assert dict(state.nodes) == dict(sim.state.nodes)
