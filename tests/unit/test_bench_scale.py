"""The scale section's pure parts: summaries, /proc parsing, RSS and CPU aggregation, the
projection, the campaign follower, planner timing on a small cloud, the result's shape."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import bench.scale as scale
from bench.common import BenchContext
from bench.scale import (
    MACHINE_BUSY,
    CampaignFollow,
    Decision,
    ProcessSampler,
    RssPeaks,
    cpu_by_service,
    cpu_used,
    node_pools,
    parse_proc_stat_cpu,
    parse_proc_status,
    parse_schedstat,
    parse_system_cpu,
    rate_and_projection,
    rows,
    service_of_child,
    summary,
    time_decisions,
    timed_plan_step,
    um_cpu_floor,
    um_log_facts,
)

pytestmark = pytest.mark.unit

STATUS = """Name:\tpython
State:\tS (sleeping)
VmPeak:\t  912340 kB
VmHWM:\t  409600 kB
VmRSS:\t  204800 kB
RssAnon:\t  190000 kB
"""


# --- summaries -------------------------------------------------------------------------------


def test_summary_of_values() -> None:
    out = summary([float(v) for v in range(1, 101)])
    assert out["count"] == 100
    assert out["p50"] == 50.5
    assert out["p90"] == 90.1
    assert out["p99"] == 99.01
    assert out["max"] == 100
    assert out["mean"] == 50.5


def test_summary_of_nothing_has_the_same_keys() -> None:
    assert summary([]) == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
        "mean": None,
    }


# --- /proc -----------------------------------------------------------------------------------


def test_proc_status_gives_rss_and_high_water_in_mib() -> None:
    assert parse_proc_status(STATUS) == (200.0, 400.0)


def test_proc_status_of_a_zombie_has_neither() -> None:
    assert parse_proc_status("Name:\tpython\nState:\tZ (zombie)\n") == (None, None)


def test_proc_stat_cpu_survives_a_command_name_with_spaces_and_parens() -> None:
    rest = " ".join(["S", *["0"] * 10, "250", "50", *["0"] * 30])
    text = f"4242 (python -m (x) y) {rest}\n"
    assert parse_proc_stat_cpu(text, 100.0) == 3.0


def test_system_cpu_counts_idle_and_iowait_as_not_busy() -> None:
    text = "cpu  100 5 45 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert parse_system_cpu(text) == (150, 1000)


def test_schedstat_gives_seconds_on_cpu_and_waiting() -> None:
    assert parse_schedstat("2500000000 500000000 1234\n") == (2.5, 0.5)


def test_the_real_proc_files_of_this_process_parse() -> None:
    rss, hwm = parse_proc_status(Path("/proc/self/status").read_text())
    assert rss is not None and hwm is not None and 0 < rss <= hwm
    ticks = float(os.sysconf("SC_CLK_TCK"))
    assert parse_proc_stat_cpu(Path("/proc/self/stat").read_text(), ticks) >= 0
    busy, total = parse_system_cpu(Path("/proc/stat").read_text())
    assert 0 <= busy <= total
    on_cpu, waiting = parse_schedstat(Path("/proc/self/schedstat").read_text())
    assert on_cpu > 0 and waiting >= 0


# --- services, RSS, CPU ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("child", "service"),
    [
        ("upgrade-manager", "upgrade-manager"),
        ("cloud-manager", "cloud-manager"),
        ("vnfm-adapter", "vnfm-adapter"),
        ("reference-vnfm-vnfm-1", "reference-vnfm"),
        ("node-agents-0", "node-agent-pools"),
        ("node-agents-7", "node-agent-pools"),
        ("world", "world"),
        ("kafka-broker", "kafka-broker"),
    ],
)
def test_service_of_child(child: str, service: str) -> None:
    assert service_of_child(child) == service


def test_rss_peaks_per_process_and_simultaneous_sums() -> None:
    peaks = RssPeaks()
    peaks.observe({"upgrade-manager": 100.0, "node-agents-0": 50.0, "node-agents-1": 10.0})
    peaks.observe({"upgrade-manager": 300.0, "node-agents-0": 20.0, "node-agents-1": 60.0})
    peaks.observe({"upgrade-manager": 200.0})
    out = peaks.to_json()
    assert peaks.samples == 3
    assert out["upgrade-manager"] == 300.0
    pools = out["node-agent-pools"]
    assert pools["max"] == 60.0
    assert pools["sum"] == 80.0  # 20 + 60 at the same moment; never 50 + 60
    assert pools["sum_of_peaks"] == 110.0
    assert pools["processes"] == 2
    assert pools["each"] == {"node-agents-0": 50.0, "node-agents-1": 60.0}


def test_rss_high_water_mark_raises_a_sampled_peak_it_missed() -> None:
    peaks = RssPeaks()
    peaks.observe({"upgrade-manager": 300.0, "world": 900.0})
    out = peaks.to_json({"upgrade-manager": 450.0, "world": 800.0})
    assert out["upgrade-manager"] == 450.0
    assert out["world"] == 900.0


def test_cpu_used_between_snapshots_by_service() -> None:
    before = {"upgrade-manager": 10.0, "node-agents-0": 1.0, "node-agents-1": 2.0, "gone": 5.0}
    after = {
        "upgrade-manager": 70.0,
        "node-agents-0": 11.0,
        "node-agents-1": 32.0,
        "world": 3.0,  # not in `before`: started later, left out
        MACHINE_BUSY: 500.0,
    }
    used = cpu_used(before, after)
    assert used == {"node-agents-0": 10.0, "node-agents-1": 30.0, "upgrade-manager": 60.0}
    assert list(cpu_by_service(used).items()) == [
        ("upgrade-manager", 60.0),
        ("node-agent-pools", 40.0),
    ]
    assert MACHINE_BUSY not in cpu_by_service({**used, MACHINE_BUSY: 9.0})


def test_process_sampler_reads_live_children_and_extra_pids() -> None:
    alive = SimpleNamespace(process=SimpleNamespace(pid=os.getpid(), poll=lambda: None))
    dead = SimpleNamespace(process=SimpleNamespace(pid=os.getpid(), poll=lambda: 1))
    group = SimpleNamespace(children={"upgrade-manager": alive, "node-agents-0": dead})
    sampler = ProcessSampler(group, {"bench-runner": os.getpid()}, interval_s=0.01)
    sampler.sample()
    cpu, wait = sampler.cpu_snapshot()
    out = sampler.to_json()
    assert set(out) == {"upgrade-manager", "bench-runner"}
    assert out["upgrade-manager"] > 0
    assert set(cpu) == {"upgrade-manager", "bench-runner", MACHINE_BUSY}
    assert set(wait) == {"upgrade-manager"}  # schedstat: not for extra (multi-threaded) pids
    sampler.start()
    sampler.stop()
    assert sampler.peaks.samples >= 3


def test_um_cpu_floor_scales_the_cpu_per_node_to_every_node() -> None:
    assert um_cpu_floor(120.0, 400, 10_000) == {
        "upgrade_manager_cpu_s_per_node": 0.3,
        "campaign_wall_s_floor_um_one_core": 3000.0,
    }
    assert um_cpu_floor(None, 400, 10_000) == {}
    assert um_cpu_floor(12.0, 0, 10_000) == {}


UM_LOG = """\
2026-11-26 08:22:51,949 INFO services.upgrade_manager: upgrade-manager/0 ready (rebalance 1, 36.37 s since start): partitions [0, 1], state of 0 campaign(s) read in 4.21 s, 0 in-flight command(s) re-published
2026-11-26 08:22:54,933 WARNING aiokafka.consumer.group_coordinator: Heartbeat failed: local member_id was not recognized; resetting and re-joining group
2026-11-26 08:24:57,632 ERROR aiokafka.consumer.group_coordinator: Heartbeat session expired - marking coordinator dead
2026-11-26 08:25:10,722 INFO services.upgrade_manager: upgrade-manager/0 ready (rebalance 2, 175.14 s since start): partitions [0, 1], state of 1 campaign(s) read in 10.49 s, 200 in-flight command(s) re-published
2026-11-26 08:40:00,000 INFO services.upgrade_manager: latency: 10 event(s) with commands: record -> effects acked p50 2177.4 ms
"""  # noqa: E501


def test_um_log_facts() -> None:
    facts = um_log_facts(UM_LOG)
    assert facts["rebalances"] == 2
    assert facts["state_read_s"]["max"] == 10.49
    assert facts["state_read_s"]["count"] == 2
    assert facts["session_expired"] == 1
    assert facts["member_id_forgotten"] == 1
    assert facts["latency"].startswith("10 event(s) with commands")
    assert um_log_facts("")["rebalances"] == 0


def test_node_pools_deal_every_node_once() -> None:
    nodes = [f"n{i}" for i in range(10)]
    pools = node_pools(nodes, 3)
    assert [len(p) for p in pools] == [4, 3, 3]
    assert sorted(n for p in pools for n in p) == sorted(nodes)
    assert node_pools(nodes[:2], 8) == [["n0"], ["n1"]]


# --- progress and projection -----------------------------------------------------------------


def test_rate_and_projection_of_a_finished_campaign_projects_nothing() -> None:
    out = rate_and_projection([1.0, 2.0, 3.0, 4.0], total=4, elapsed_s=4.0, window_s=300)
    assert out["nodes_done"] == 4
    assert out["nodes_per_min"] == 60.0
    assert out["campaign_wall_s_projected"] is None


def test_rate_and_projection_uses_the_recent_rate() -> None:
    # 100 nodes in the first 500 s, then 60 in the last 300 s: 0.2 nodes/s lately.
    times = [float(i * 5) for i in range(100)] + [601.0 + i * 5 for i in range(60)]
    out = rate_and_projection(times, total=1000, elapsed_s=900.0, window_s=300.0)
    assert out["nodes_done"] == 160
    assert out["nodes_per_min_recent"] == 12.0
    assert out["recent_window_s"] == 300.0
    assert out["campaign_wall_s_projected"] == 900.0 + 840 / 0.2


def test_rate_and_projection_without_recent_progress_does_not_project() -> None:
    out = rate_and_projection([1.0], total=10, elapsed_s=1000.0, window_s=300.0)
    assert out["nodes_per_min_recent"] == 0.0
    assert out["campaign_wall_s_projected"] is None


def _event(kind: str, at: datetime, **fields: Any) -> SimpleNamespace:
    return SimpleNamespace(event_type=kind, occurred_at=at, **fields)


def test_campaign_follow_counts_finished_nodes_once_and_the_end() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    follow = CampaignFollow("c1", total=2, requested_at=100.0)
    step = SimpleNamespace
    follow.apply(_event("CampaignStarted", t0), 100.5)
    follow.apply(_event("NodeCycleAdvanced", t0, node_id="a", step=step(value="claiming")), 101)
    follow.apply(_event("NodeCycleAdvanced", t0, node_id="a", step=step(value="done")), 102)
    follow.apply(_event("NodeCycleAdvanced", t0, node_id="a", step=step(value="done")), 103)
    follow.apply(_event("NodeCycleAdvanced", t0, node_id="b", step="skipped"), 104)
    assert follow.outcome is None
    end = t0 + timedelta(seconds=5)
    follow.apply(_event("CampaignCompleted", end), 105.0)
    assert follow.finished == {"a": "done", "b": "skipped"}
    assert follow.finish_times == [2.0, 4.0]
    assert follow.outcome == "CampaignCompleted"
    assert follow.ended_after_s == 5.0
    assert follow.started_at == t0 and follow.ended_at == end
    assert len(follow.steps) == 4


# --- the planner, timed ----------------------------------------------------------------------


def _small_cloud() -> tuple[Any, Any]:
    from escalator.plan import cloud_from_world
    from escalator.world.scenario import generate

    return cloud_from_world(generate(nodes=24, seed=1, vms_per_node=6, spare_fraction=0.3))


def test_time_decisions_times_every_plan_step_of_the_forecast() -> None:
    import services.upgrade_manager.domain.forecast as forecast_module
    from services.upgrade_manager.domain.forecast import StepDurations

    original = forecast_module.plan_step
    cloud, rules = _small_cloud()
    out = time_decisions(cloud, rules, 4, StepDurations())
    assert forecast_module.plan_step is original
    assert out["decisions"] >= out["forecast_batches"] - 1 > 0
    assert out["decision_ms"]["count"] == out["decisions"]
    assert out["decision_cpu_ms"]["count"] == out["decisions"]
    assert out["first_decision_explain_ms"] is not None
    assert out["forecast_max_in_maintenance"] <= 4
    assert out["never_upgradable"] == 0 and out["stalled"] == 0


def test_timed_plan_step_passes_the_managers_scan_budget_and_restores() -> None:
    import services.upgrade_manager.domain.forecast as forecast_module
    from services.upgrade_manager.domain.campaign import PLANNER_SCAN_BUDGET

    seen: list[Any] = []
    original = forecast_module.plan_step

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return SimpleNamespace(start=("n1",))

    forecast_module.plan_step = fake
    try:
        records: list[Decision] = []
        explained: list[Decision] = []
        progress = SimpleNamespace(in_cycle=frozenset({"n0"}))
        with pytest.raises(RuntimeError), timed_plan_step(records, explained):
            forecast_module.plan_step(None, None, None, progress, ["n1", "n2"], None, explain=True)
            forecast_module.plan_step(None, None, None, progress, ["n1", "n2"], None)
            raise RuntimeError("the forecast fails")
        assert forecast_module.plan_step is fake
    finally:
        forecast_module.plan_step = original
    assert seen == [{"explain": True}, {"scan_budget": PLANNER_SCAN_BUDGET}]
    assert [(d.started, d.in_cycle, d.candidates) for d in records] == [(1, 1, 2)]
    assert len(explained) == 1


# --- the result and the table ----------------------------------------------------------------

LIVE = {
    "campaign_wall_s": 1234.5,
    "campaign_wall_s_projected": None,
    "nodes_upgraded": 30,
    "state": "CampaignCompleted",
    "records_per_s": 321.0,
    "rss_mb": {
        "upgrade-manager": 420.0,
        "cloud-manager": 300.0,
        "vnfm-adapter": 80.0,
        "reference-vnfm": {"max": 90.0, "sum": 170.0, "processes": 2},
        "node-agent-pools": {"max": 200.0, "sum": 1500.0, "processes": 8},
        "world": 1200.0,
    },
}


def test_run_gives_the_required_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_SCALE_NODES", "30")
    calls: list[dict[str, Any]] = []

    def fake_live(ctx: Any, scenario: Path, **kwargs: Any) -> dict[str, Any]:
        assert scenario.exists()
        calls.append(kwargs)
        return dict(LIVE)

    monkeypatch.setattr(scale, "live_run", fake_live)
    ctx = BenchContext(broker=None, run_dir=tmp_path, quick=True, log=lambda _: None)  # type: ignore[arg-type]
    out = scale.run(ctx)
    assert list(out) == ["scale"]
    result = out["scale"]
    assert result["nodes"] == 30
    assert result["vms"] > 0
    assert isinstance(result["planner_decision_ms_p50"], float)
    assert isinstance(result["planner_decision_cpu_ms_p50"], float)
    assert result["campaign_wall_s"] == 1234.5
    assert result["rss_mb"]["upgrade-manager"] == 420.0
    assert result["planner"]["gc_frozen"]["decisions"] > 0
    assert calls == [{"pools": 2, "max_parallel": 50, "budget_s": 600.0}]
    assert not (tmp_path / "world-30.json").exists()  # removed once the live run is over


def _result(**changes: Any) -> dict[str, Any]:
    base = {
        "nodes": 10_000,
        "vms": 203_636,
        "max_parallel": 200,
        "planner_decision_ms_p50": 40.0,
        "planner_decision_ms_p90": 80.0,
        "planner_decision_ms_p99": 150.0,
        "planner_decision_ms_max": 900.0,
        "planner_decision_ms_p50_gc_frozen": 38.0,
        "planner_decision_ms_p99_gc_frozen": 120.0,
        "planner_decision_ms_max_gc_frozen": 250.0,
        "campaign_wall_s": 1234.5,
        "campaign_wall_s_projected": None,
        "nodes_upgraded": 10_000,
        "campaign_state": "CampaignCompleted",
        "rss_mb": LIVE["rss_mb"],
    }
    return {**base, **changes}


def test_rows_show_targets_at_ten_thousand_nodes() -> None:
    table = {row.metric: row for row in rows(_result())}
    decision = table["scale.planner_decision_ms_p50"]
    assert decision.value == "40 ms" and decision.met is True
    um = table["scale.rss_mb upgrade-manager"]
    assert um.value == "420 MB" and um.met is True
    assert "max 200 MB, sum 1500 MB (8 processes)" in table["scale.rss_mb node-agent-pools"].value
    missed = {row.metric: row for row in rows(_result(planner_decision_ms_p50=75.0))}
    assert missed["scale.planner_decision_ms_p50"].met is False


def test_rows_of_a_small_run_do_not_judge_and_show_a_projection() -> None:
    result = _result(nodes=500, campaign_wall_s=None, campaign_wall_s_projected=2400.0)
    table = rows(result)
    assert all(row.met is None for row in table)
    wall = next(row for row in table if row.metric.startswith("scale.campaign_wall_s"))
    assert wall.value == "not finished; projected 2400 s"
