"""A short sample of the chaos suite, in `make test`: five seeded runs on small worlds.

Seeds 0-4 kill, in turn, the Upgrade Manager, the Cloud Manager, the VNFM adapter, a node
agent, and two services at once, each first aimed at another step of a node's cycle (claiming,
notifying, migrating, upgrading, releasing), some with a second kill; three of the five run
with max_parallel >= 2. Each run must keep every invariant (see `chaos_lib`). The pass table is
printed at the end of the session. `make chaos N=20` runs the full suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos_lib import SAMPLE_SEEDS, SERVICES, RunResult, make_scenario, run_scenario

from escalator.broker import BrokerHandle

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

GROUP = "sample"


@pytest.mark.parametrize("seed", SAMPLE_SEEDS)
async def test_chaos_sample_run(
    broker: BrokerHandle,
    tmp_path: Path,
    chaos_results: dict[str, list[RunResult]],
    seed: int,
) -> None:
    scenario = make_scenario(seed, "sample")
    result = await run_scenario(broker, scenario, tmp_path / f"seed-{seed}")
    chaos_results.setdefault(GROUP, []).append(result)
    broken = {n: c.detail for n, c in result.checks.items() if not c.ok}
    assert result.ok, (
        f"seed {seed} ({scenario}): {result.error or ''} broken {broken}; "
        f"kills {[k.label() for k in result.kills]}; logs {result.logs}"
    )
    assert not result.kills_missed, f"kills not done: {result.kills_missed} of {scenario.kills}"


def test_chaos_sample_killed_every_service(chaos_results: dict[str, list[RunResult]]) -> None:
    results = chaos_results.get(GROUP, [])
    if len(results) < len(SAMPLE_SEEDS):
        pytest.skip("the sample's runs did not all run in this session")
    killed = {s for r in results for k in r.kills for s in k.services}
    assert killed >= set(SERVICES), f"never killed {set(SERVICES) - killed}"
    assert any(len(k.killed) > 1 for r in results for k in r.kills), "no kill of several at once"
