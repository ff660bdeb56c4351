"""The bench runner: percentiles, the table, the registry, sections that are missing or crash."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bench import common
from bench.common import (
    Row,
    generic_rows,
    machine,
    parse_sections,
    percentile,
    render_table,
    run_sections,
    unwrap,
)

pytestmark = pytest.mark.unit


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_the_table_is_markdown_with_met_as_yes_no_or_blank() -> None:
    table = render_table(
        [
            Row("cycle p50 / floor", "1.2", "<= 1.5x", True),
            Row("hops", "8"),
            Row("a | b", "x", "t", False),
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "| metric | value | target | met? |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| cycle p50 / floor | 1.2 | <= 1.5x | yes |"
    assert lines[3] == "| hops | 8 |  |  |"
    assert lines[4] == "| a \\| b | x | t | no |"


def test_generic_rows_show_top_level_numbers_only() -> None:
    got = generic_rows("scale", {"nodes": 10, "ratio": 0.5, "ok": True, "nested": {"x": 1}})
    assert [(r.metric, r.value) for r in got] == [("scale.nodes", "10"), ("scale.ratio", "0.5")]


def test_section_names() -> None:
    assert parse_sections(None) == list(common.SECTIONS)
    assert parse_sections("overhead, scale") == ["overhead", "scale"]
    with pytest.raises(ValueError, match="unknown section"):
        parse_sections("overhead,nope")


def test_a_result_wrapped_in_its_sections_name_is_unwrapped() -> None:
    assert unwrap("makespan", {"makespan": {"a": 1}}) == {"a": 1}
    assert unwrap("makespan", {"a": 1}) == {"a": 1}
    assert unwrap("makespan", {"makespan": 3}) == {"makespan": 3}


def test_the_machine_is_described() -> None:
    info = machine()
    for key in ("cpu_model", "cores_logical", "python", "date"):
        assert info[key], key
    assert "ram_gb" in info


class FakeBroker:
    description = "fake broker 1.0"
    kind = "fake"
    settings: Any = None
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_missing_sections_are_not_built_and_crashes_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    good = types.ModuleType("bench.t_good")
    seen: dict[str, Any] = {}

    def good_run(ctx: common.BenchContext) -> dict[str, Any]:
        seen["ctx"] = ctx
        return {"t_good": {"value_ms": 1.5}}

    good.run = good_run  # type: ignore[attr-defined]
    bad = types.ModuleType("bench.t_bad")

    def bad_run(ctx: common.BenchContext) -> dict[str, Any]:
        seen["before"] = dict(ctx.results)
        raise RuntimeError("boom")

    bad.run = bad_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.t_good", good)
    monkeypatch.setitem(sys.modules, "bench.t_bad", bad)
    monkeypatch.setattr(
        common,
        "SECTIONS",
        {"t_good": "bench.t_good", "t_missing": "bench.t_missing", "t_bad": "bench.t_bad"},
    )
    broker = FakeBroker()
    report, outcomes = run_sections(
        ["t_good", "t_missing", "t_bad"],
        quick=True,
        run_dir=tmp_path,
        log=lambda line: None,
        start_broker=lambda **kw: broker,
    )
    assert broker.stopped
    assert report["broker"] == "fake broker 1.0"
    assert report["t_good"] == {"value_ms": 1.5}
    assert report["sections"]["t_missing"] == {"status": "not built"}
    assert report["sections"]["t_bad"]["status"] == "crashed"
    assert report["sections"]["t_bad"]["error"] == "RuntimeError: boom"
    assert seen["before"] == {"t_good": {"value_ms": 1.5}}
    assert seen["ctx"].quick and seen["ctx"].run_dir == tmp_path / "t_good"
    table = render_table([row for o in outcomes for row in o.rows()])
    assert "| t_good.value_ms | 1.5 |  |  |" in table
    assert "| t_missing | not built |  |  |" in table
    assert "| t_bad | crashed: RuntimeError: boom |  |  |" in table
    json.dumps(report)  # JSON-able


def test_no_broker_is_started_when_no_section_is_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(common, "SECTIONS", {"t_missing": "bench.t_missing"})

    def no_broker(**kw: Any) -> Any:
        raise AssertionError("no broker needed")

    report, outcomes = run_sections(
        ["t_missing"], quick=False, run_dir=tmp_path, log=lambda line: None, start_broker=no_broker
    )
    assert report["broker"] is None and outcomes[0].status == "not built"


def test_main_exits_1_only_when_a_section_crashed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(common, "SECTIONS", {"t_missing": "bench.t_missing"})
    out = tmp_path / "latest.json"
    assert common.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["sections"] == {"t_missing": {"status": "not built"}}
    assert "| t_missing | not built |" in capsys.readouterr().out

    crashing = types.ModuleType("bench.t_bad")
    crashing.run = lambda ctx: 1 / 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.t_bad", crashing)
    monkeypatch.setattr(common, "SECTIONS", {"t_bad": "bench.t_bad"})
    monkeypatch.setattr(common, "_launcher", lambda: lambda **kw: FakeBroker())
    assert common.main(["--out", str(out)]) == 1
    assert common.main(["--sections", "nope"]) == 2
