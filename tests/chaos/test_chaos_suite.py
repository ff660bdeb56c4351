"""The chaos suite of `make chaos N=20`: N seeded runs, services SIGKILLed and restarted.

Collected only when $ESCALATOR_CHAOS_RUNS is set (see conftest.py): `make chaos N=20` runs seeds
1..20 (from $ESCALATOR_CHAOS_FIRST_SEED if set) with the `full` profile of `chaos_lib`: worlds
of four to six nodes, two or three kills each, of every service in turn and of two or three at
once, aimed at every step of a node's cycle or at random moments. Every run must keep every
invariant; the pass table (runs; kills by service; kills by step in progress; each invariant
per run) is printed at the end and written as JSON under .cache/chaos/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from chaos_lib import (
    RESULTS_DIR,
    RunResult,
    chaos_seeds,
    make_scenario,
    run_scenario,
    summary,
)

from escalator.broker import BrokerHandle

pytestmark = [
    pytest.mark.integration,
    pytest.mark.real_kafka,
    pytest.mark.slow,
    pytest.mark.timeout(300),
]

SEEDS = chaos_seeds()
GROUP = "chaos"
# Every run's logs and chaos-run.json are kept here (pytest's own temporary directories are
# rotated away by later sessions).
RUNS_DIR = RESULTS_DIR / "runs" / time.strftime("%Y%m%d-%H%M%S")
# Below this many runs the suite cannot be asked to have hit every step of the cycle.
COVERAGE_FROM_RUNS = 10


@pytest.mark.parametrize("seed", SEEDS or [1])
async def test_chaos_run(
    broker: BrokerHandle,
    chaos_results: dict[str, list[RunResult]],
    seed: int,
) -> None:
    scenario = make_scenario(seed, "full")
    run_dir: Path = RUNS_DIR / f"seed-{seed}"
    result = await run_scenario(broker, scenario, run_dir)
    chaos_results.setdefault(GROUP, []).append(result)
    broken = {n: c.detail for n, c in result.checks.items() if not c.ok}
    assert result.ok, (
        f"seed {seed} ({scenario}): {result.error or ''} broken {broken}; "
        f"kills {[k.label() for k in result.kills]}; logs {result.logs}"
    )


def test_chaos_coverage(chaos_results: dict[str, list[RunResult]]) -> None:
    """Across the runs: every service killed, several at once too, and every step of the node
    cycle hit by some kill (with enough runs for that to be asked)."""
    results = chaos_results.get(GROUP, [])
    # `make chaos` must not pass by skipping: on a broker without Kafka semantics (Tansu) the
    # runs are skipped, and that fails here.
    assert len(results) == len(SEEDS), (
        f"{len(results)} of {len(SEEDS)} runs done (skipped or deselected ones do not count)"
    )
    s = summary(results)
    assert not s["uncovered_services"], f"services never killed: {s['uncovered_services']}"
    assert s["kills_of_several_at_once"] > 0, "no kill of several services at once"
    if len(results) >= COVERAGE_FROM_RUNS:
        assert not s["uncovered_states"], f"steps no kill landed in: {s['uncovered_states']}"
    assert s["max_parallel_2_or_more"] > 0, "no run with max_parallel >= 2"
