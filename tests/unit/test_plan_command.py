"""`escalator plan`: the plan's JSON and rendering from a small cloud, world scenarios as input,
and bad options rejected with one line and exit code 2 (also `upgrade start`'s new options)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from escalator.cli import build_upgrade_request
from escalator.plan import (
    EXIT_NOT_ALL_NODES,
    EXIT_PLANNED,
    PlanError,
    PlanInputs,
    build_durations,
    build_policy,
    cloud_from_world,
    inputs_from_scenario,
    make_plan,
    parse_start,
    plan_json,
    render,
    split_nodes,
)
from escalator.world.scenario import generate
from schemas.types import VnfmTimeoutPolicy
from services.upgrade_manager.domain.planner import Cloud, Host, Limits, VmLoad, VnfRule

pytestmark = pytest.mark.unit

START = datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "escalator", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def host(node_id: str, domain: str, *vms: tuple[str, str | None], vcpus: int = 32) -> Host:
    return Host.of(node_id, domain, vcpus, vcpus * 2048, (VmLoad(v, f, 2, 4096) for v, f in vms))


def small_cloud() -> PlanInputs:
    """Six roomy nodes in two domains: an active-standby pair on n1/n2, a load-balanced VNF on
    n3/n4/n5 (one down at a time), a loose VM on n6, and a VNF on n6 that tolerates nothing."""
    cloud = Cloud(
        [
            host("n1", "fd-1", ("as-a", "as")),
            host("n2", "fd-2", ("as-b", "as")),
            host("n3", "fd-1", ("lb-a", "lb")),
            host("n4", "fd-2", ("lb-b", "lb")),
            host("n5", "fd-1", ("lb-c", "lb")),
            host("n6", "fd-2", ("app", None), ("rigid-a", "rigid")),
            host("n7", "fd-1", ("rigid-b", "rigid")),
        ]
    )
    rules = {
        "as": VnfRule("as", 2, 1, 1),
        "lb": VnfRule("lb", 3, 1, 2),
        "rigid": VnfRule("rigid", 2, 1, 2),  # both members must always serve
    }
    return PlanInputs(cloud, rules, {"kind": "test"})


def tight_cloud() -> PlanInputs:
    """Three 8-vCPU nodes, each half full of loose VMs: only one node's VMs fit elsewhere."""
    cloud = Cloud(
        [
            host("t1", "fd-1", ("t1-a", None), ("t1-b", None), vcpus=8),
            host("t2", "fd-2", ("t2-a", None), ("t2-b", None), vcpus=8),
            host("t3", "fd-3", ("t3-a", None), ("t3-b", None), vcpus=8),
        ]
    )
    return PlanInputs(cloud, {}, {"kind": "test"})


def plan_of(inputs: PlanInputs, nodes: list[str] | None = None, **limits: object):  # type: ignore[no-untyped-def]
    return make_plan(
        inputs,
        nodes or [],
        Limits(**limits),  # type: ignore[arg-type]
        build_durations(),
        start=START,
    )


def test_json_batches_blockers_and_never_upgradable() -> None:
    plan = plan_of(small_cloud(), max_parallel=7)
    data = plan_json(plan)
    assert json.loads(json.dumps(data)) == data, "plain JSON"
    for name in (
        "nodes",
        "batches",
        "predicted_makespan_s",
        "lower_bound_s",
        "blocked",
        "never_upgradable",
        "max_in_maintenance",
        "constraints",
        "durations",
    ):
        assert name in data, name
    assert data["nodes"] == 7
    assert data["vnfs"] == 3 and data["vms"] == 8 and data["failure_domains"] == 2
    assert data["constraints"]["max_parallel"] == 7
    assert data["durations"] == {
        "claim_s": 0.2,
        "notify_s": 1.0,
        "migrate_s": 0.5,
        "upgrade_s": 3.0,
        "release_s": 0.2,
    }

    # n6 and n7 hold members of a VNF that tolerates no impact: never, with the reason.
    never = {item["node_id"]: item["reason"] for item in data["never_upgradable"]}
    assert set(never) == {"n6", "n7"}
    assert "rigid" in never["n6"]
    assert plan.exit_code == EXIT_NOT_ALL_NODES

    batches = [set(b["nodes"]) for b in data["batches"]]
    planned = set().union(*batches)
    assert planned == {"n1", "n2", "n3", "n4", "n5"}
    assert all(len(b & {"n1", "n2"}) <= 1 for b in batches), "the pair never goes down together"
    assert all(len(b & {"n3", "n4", "n5"}) <= 1 for b in batches), "one lb member at a time"
    starts = [b["start_s"] for b in data["batches"]]
    assert starts == sorted(starts) and starts[0] == 0
    assert data["predicted_makespan_s"] >= data["lower_bound_s"] > 0
    assert 0 < data["efficiency"] <= 1
    assert data["max_in_maintenance"] >= len(batches[0])

    # At the first decision, one of the pair and two of the lb members wait for their VNF.
    blocked = {item["node_id"]: item for item in data["blocked"]}
    assert {b["reason"] for b in blocked.values()} == {"vnf_budget"}
    assert len(blocked.keys() & {"n1", "n2"}) == 1
    assert len(blocked.keys() & {"n3", "n4", "n5"}) == 2
    assert not blocked.keys() & {"n6", "n7"}, "never-upgradable nodes are listed apart"
    assert all(set(item) == {"node_id", "reason", "detail", "until"} for item in blocked.values())


def test_complete_plan_exits_0_and_respects_max_parallel() -> None:
    inputs = small_cloud()
    plan = plan_of(inputs, ["n1", "n2", "n3", "n4", "n5"], max_parallel=1)
    data = plan_json(plan)
    assert plan.exit_code == EXIT_PLANNED and data["complete"]
    assert [len(b["nodes"]) for b in data["batches"]] == [1] * 5
    assert data["max_in_maintenance"] == 1
    assert {b["reason"] for b in data["blocked"]} == {"max_parallel"}
    assert data["never_upgradable"] == []


def test_tight_capacity_serialises_and_says_why() -> None:
    plan = plan_of(tight_cloud(), max_parallel=3)
    data = plan_json(plan)
    assert plan.exit_code == EXIT_PLANNED
    assert [len(b["nodes"]) for b in data["batches"]] == [1, 1, 1]
    assert data["max_in_maintenance"] == 1
    blocked = data["blocked"]
    assert len(blocked) == 2 and {b["reason"] for b in blocked} == {"capacity"}
    assert "do not all fit" in blocked[0]["detail"]


def test_rendering_shows_every_part() -> None:
    console = Console(record=True, width=200)
    render(plan_of(small_cloud(), max_parallel=7, max_per_failure_domain=2), console)
    text = console.export_text()
    for expected in (
        "nodes: 7 to upgrade",
        "3 VNFs",
        "spare capacity:",
        "max parallel 7, max 2 per failure domain",
        "batches",
        "predicted makespan:",
        "lower bound:",
        "efficiency",
        "cannot go yet",
        "vnf_budget",
        "never upgradable",
        "rigid",
        "cannot be upgraded (exit code 3)",
    ):
        assert expected in text, expected


def test_rendering_of_a_capacity_bound_plan() -> None:
    console = Console(record=True, width=200)
    render(plan_of(tight_cloud(), max_parallel=3), console)
    text = console.export_text()
    assert "capacity" in text and "never upgradable" not in text
    assert "plan: all 3 node(s) in" in text


def test_durations_change_the_prediction() -> None:
    inputs, nodes = small_cloud(), ["n1", "n2", "n3", "n4", "n5"]
    quick = plan_json(plan_of(inputs, nodes, max_parallel=1))
    slow = make_plan(
        inputs, nodes, Limits(max_parallel=1), build_durations(upgrade_s=30.0), start=START
    )
    assert plan_json(slow)["durations"]["upgrade_s"] == 30.0
    # Five nodes one after the other, each 27 s longer.
    assert plan_json(slow)["predicted_makespan_s"] == pytest.approx(
        quick["predicted_makespan_s"] + 5 * 27.0
    )


def test_window_start_blocks_with_until() -> None:
    opens = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
    policy = build_policy(max_parallel=2, window_start=opens.isoformat())
    plan = make_plan(tight_cloud(), [], Limits.from_policy(policy), build_durations(), start=START)
    data = plan_json(plan)
    assert {b["reason"] for b in data["blocked"]} == {"window"}
    assert {b["until"] for b in data["blocked"]} == {"2026-11-27T02:00:00Z"}
    assert data["constraints"]["window_start"] == "2026-11-27T02:00:00Z"
    assert data["batches"][0]["start_s"] >= 3600


def test_world_state_becomes_cloud_and_rules() -> None:
    state = generate(nodes=6, failure_domains=3, seed=3)
    cloud, rules = cloud_from_world(state)
    assert sorted(cloud.hosts) == sorted(state.nodes)
    assert sum(len(h.vms) for h in cloud.hosts.values()) == len(state.vms)
    assert set(rules) == set(state.vnfs)
    for vnf in state.vnfs.values():
        rule = rules[vnf.id]
        assert rule.members == len(vnf.members)
        assert rule.anti_affinity, "the generator puts each VNF in one server group"
        assert rule.min_recovery_s == vnf.min_recovery_s
        if vnf.redundancy == "active_standby":
            assert rule.max_unavailable == 1
    node = next(iter(state.nodes.values()))
    assert cloud.hosts[node.id].failure_domain == node.failure_domain
    assert cloud.hosts[node.id].vcpus == node.vcpus


def test_scenario_files_state_or_parameters(tmp_path: Path) -> None:
    state = generate(nodes=4, failure_domains=2, seed=5)
    dumped = tmp_path / "state.json"
    dumped.write_text(state.model_dump_json())
    inputs = inputs_from_scenario(dumped)
    assert sorted(inputs.cloud.hosts) == sorted(state.nodes)
    assert inputs.source["kind"] == "scenario" and len(inputs.source["sha256"]) == 64
    assert inputs.source["timings"] == state.timings.model_dump(mode="json")

    params = tmp_path / "params.json"
    params.write_text(json.dumps({"nodes": 4, "domains": 2, "seed": 5}))
    again = inputs_from_scenario(params)
    assert sorted(again.cloud.hosts) == sorted(state.nodes)
    assert sum(len(h.vms) for h in again.cloud.hosts.values()) == len(state.vms)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{nope", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"nodes": {"n1": {"id": "n1"}}}', "scenario"),
        ('{"nodes": 4, "colour": "red"}', "unknown field(s) colour"),
    ],
)
def test_bad_scenarios(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inputs_from_scenario(path)
    with pytest.raises(PlanError, match="cannot read scenario"):
        inputs_from_scenario(tmp_path / "missing.json")


def test_option_validation() -> None:
    with pytest.raises(PlanError, match="max_parallel"):
        build_policy(max_parallel=0)
    with pytest.raises(PlanError, match="max_per_failure_domain"):
        build_policy(max_per_failure_domain=0)
    with pytest.raises(PlanError, match="canary_bake_s"):
        build_policy(canary_bake_s=-1)
    with pytest.raises(PlanError, match="window_end must be later"):
        build_policy(window_start="2026-11-27T05:00:00Z", window_end="2026-11-27T01:00:00Z")
    with pytest.raises(PlanError, match="window_start"):
        build_policy(window_start="2026-11-27T05:00:00")  # no timezone
    with pytest.raises(PlanError, match="--upgrade-s must be"):
        build_durations(upgrade_s=-1.0)
    with pytest.raises(PlanError, match="--notify-s must be"):
        build_durations(notify_s=float("nan"))
    with pytest.raises(PlanError, match="needs a timezone"):
        parse_start("2026-11-27T01:00:00")
    with pytest.raises(PlanError, match="not an ISO 8601"):
        parse_start("tomorrow")
    assert parse_start("2026-11-27T01:00:00Z") == START
    assert split_nodes(["a,b", " c ", "a", ","]) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-parallel", "0"], "max_parallel"),
        (["--failure-budget", "0"], "failure_budget"),
        (["--window-start", "soon"], "window_start"),
        (["--release-s", "-2"], "--release-s must be"),
        (["--start-at", "2026-11-27T01:00:00"], "needs a timezone"),
        (["--max-parallel", "many"], "--max-parallel"),
    ],
)
def test_cli_bad_options_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"nodes": 3, "domains": 1, "seed": 0}))
    result = run_cli("plan", "--scenario", str(scenario), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("escalator: error:"), result.stderr
    assert message in lines[0]
    assert result.stdout == ""


def test_cli_missing_scenario_exit_2(tmp_path: Path) -> None:
    result = run_cli("plan", "--scenario", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot read scenario" in result.stderr


def test_cli_json_offline_and_exit_3_for_unknown_nodes(tmp_path: Path) -> None:
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"nodes": 4, "domains": 2, "seed": 1}))
    ok = run_cli("plan", "--scenario", str(scenario), "--json", "--max-parallel", "4")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["nodes"] == 4 and data["complete"]
    assert sorted(n for b in data["batches"] for n in b["nodes"]) == [
        "node-1",
        "node-2",
        "node-3",
        "node-4",
    ]
    unknown = run_cli("plan", "--scenario", str(scenario), "--json", "--nodes", "node-1,node-9")
    assert unknown.returncode == 3, unknown.stderr
    data = json.loads(unknown.stdout)
    assert data["never_upgradable"] == [
        {"node_id": "node-9", "reason": "not in the Cloud Manager's inventory"}
    ]
    assert [b["nodes"] for b in data["batches"]] == [["node-1"]]
    assert "exit code 0" in " ".join(run_cli("plan", "--help").stdout.lower().split())


def test_upgrade_start_builds_the_new_policy_fields(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps({"files": [{"name": "a.rpm", "sha256": SHA, "uri": "https://r/a.rpm"}]})
    )
    built = build_upgrade_request(
        version="2.0",
        manifest=manifest,
        artifacts=[],
        repo_url=None,
        nodes=[],
        max_parallel=4,
        vnfm_timeout=40.0,
        on_vnfm_timeout=VnfmTimeoutPolicy.MIGRATE,
        campaign_id=None,
        requested_by="test",
        policy_extra={
            "max_per_failure_domain": 2,
            "canary_nodes": 1,
            "canary_bake_s": 30.0,
            "window_start": "2026-11-27T01:00:00Z",
            "window_end": "2026-11-27T05:00:00Z",
            "failure_budget": 2,
        },
    )
    policy = built.policy
    assert (policy.max_per_failure_domain, policy.canary_nodes, policy.canary_bake_s) == (
        2,
        1,
        30.0,
    )
    assert policy.window_start == START and policy.failure_budget == 2

    result = run_cli(
        "upgrade",
        "start",
        "--version",
        "2.0",
        "--manifest",
        str(manifest),
        "--window-start",
        "2026-11-27T05:00:00Z",
        "--window-end",
        "2026-11-27T01:00:00Z",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "window_end must be later" in lines[0]
    bad_canary = run_cli(
        "upgrade", "start", "--version", "2.0", "--manifest", str(manifest), "--canary-nodes", "-1"
    )
    assert bad_canary.returncode == 2 and "canary_nodes" in bad_canary.stderr
