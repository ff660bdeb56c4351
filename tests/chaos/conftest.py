"""Fixtures and reporting of the chaos suite (issue 6).

The chaos machinery reuses the end-to-end harness (`tests/integration/e2e/e2e_harness.py`),
imported as a plain module like the e2e tests do. Runs done in a session are collected here; at
the end the pass table of each group (`sample` in `make test`, `chaos` under `make chaos`) is
printed, and the `make chaos` one is written as JSON under `.cache/chaos/`.

`test_chaos_suite.py` holds `make chaos`'s runs: they are collected only when
$ESCALATOR_CHAOS_RUNS is set (`make chaos N=20` sets it), so `make test` never runs them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_E2E = Path(__file__).resolve().parents[1] / "integration" / "e2e"
if str(_E2E) not in sys.path:
    sys.path.insert(0, str(_E2E))

from chaos_lib import RUNS_ENV, RunResult, render_table, write_report  # noqa: E402

SUITE_FILE = "test_chaos_suite.py"

# group name -> the runs done in this session, in order.
RESULTS: dict[str, list[RunResult]] = {}


@pytest.fixture
def chaos_results() -> dict[str, list[RunResult]]:
    return RESULTS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(RUNS_ENV):
        return
    suite = [i for i in items if i.path.name == SUITE_FILE]
    if suite:
        config.hook.pytest_deselected(items=suite)
        items[:] = [i for i in items if i.path.name != SUITE_FILE]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, results in RESULTS.items():
        if not results:
            continue
        terminalreporter.write_line("")
        for line in render_table(results, name).splitlines():
            terminalreporter.write_line(line)
        if name == "chaos":
            path = write_report(results, name)
            terminalreporter.write_line(f"chaos report: {path}")
