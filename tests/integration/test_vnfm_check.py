"""`escalator vnfm-check` against real VNFMs on a real broker.

* A correct toy VNFM (tests/broken_vnfms/toy.py) passes every scenario, and each deliberately
  broken VNFM next to it (one rule broken each) fails exactly the matching scenario with a
  readable reason. They all run at once, each on its own topic prefix.
* The reference VNFM, on a simulated world, passes the scenarios it can exhibit (see
  `test_reference_vnfm_passes`).
* The CLI: exit codes, the table, `--json`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from escalator.broker import BrokerHandle
from escalator.processes import ProcessGroup, python_module
from escalator.settings import KafkaSettings
from escalator.vnfm_check import SCENARIOS, CheckFixture, CheckReport, run_check

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka]

REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "tests" / "broken_vnfms"

TOY_BEHAVIOURS = {
    "vnf-as": "switch_over",
    "vnf-lb": "drain",
    "vnf-busy": "refuse",
    "vnf-slow": "slow",
    "vnf-slow-2": "slow",
}
TOY_FIXTURE: dict[str, Any] = {
    "vnfm_id": "vnfm-toy",
    "node_id": "compute-0-01",
    "deadline_s": 15,
    "scenarios": {
        "switch_over": {"vnf_id": "vnf-as", "vm_id": "vm-as-0"},
        "drain": {"vnf_id": "vnf-lb", "vm_id": "vm-lb-2"},
        "refusal": {"vnf_id": "vnf-busy", "vm_id": "vm-busy-0"},
        "heartbeat": {
            "vnf_id": "vnf-slow",
            "vm_id": "vm-slow-0",
            "deadline_s": 2,
            "extension_max_s": 5,
            "hard_timeout_s": 30,
        },
        "late_reply": {
            "vnf_id": "vnf-slow-2",
            "vm_id": "vm-slow2-0",
            "expire_after_s": 1,
            "quiet_s": 5,
        },
    },
}

# broken VNFM script -> (the one scenario it must fail, words its reason must contain)
BROKEN_VNFMS: dict[str, tuple[str, str]] = {
    "never_switches_over.py": ("switch_over", "expected switched_over, got vm-as-0: left_for_vim"),
    "foreign_vms.py": ("drain", "outcomes for VMs not in the notice: vm-lb-2-peer"),
    "refuses_without_reason.py": ("refusal", "does not match the contract"),
    "never_refuses.py": ("refusal", "expected BusinessMoveRefused, got VnfBusinessMoved"),
    "never_heartbeats.py": ("heartbeat", "no MaintenanceDeadlineExtended within"),
    "replies_after_expiry.py": ("late_reply", "VnfBusinessMoved"),
}


def prefixed(broker: BrokerHandle, unique_name: Callable[..., str], tag: str) -> KafkaSettings:
    return broker.settings.model_copy(update={"topic_prefix": unique_name(tag) + "."})


def failing(report: CheckReport) -> dict[str, list[str]]:
    return {
        r.scenario: [f"{c.name}: {c.detail}" for c in r.failures]
        for r in report.results
        if not r.passed
    }


async def check_toy(
    script: str, kafka: KafkaSettings, logs: Path
) -> tuple[CheckReport, ProcessGroup]:
    group = ProcessGroup(logs, base_env=kafka.to_env())
    argv = [
        sys.executable,
        str(BROKEN / script),
        "--vnfm-id",
        "vnfm-toy",
        "--behaviours",
        json.dumps(TOY_BEHAVIOURS),
        "--work-s",
        "4",
    ]
    await asyncio.to_thread(group.spawn, "vnfm", argv, wait_for=r"^ready", timeout_s=60)
    try:
        report = await run_check(kafka, CheckFixture.model_validate(TOY_FIXTURE))
    finally:
        await asyncio.to_thread(group.stop_all)
    return report, group


async def test_correct_toy_passes_and_each_broken_vnfm_fails_exactly_its_scenario(
    broker: BrokerHandle, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    scripts = ["toy.py", *BROKEN_VNFMS]
    runs = await asyncio.gather(
        *(
            check_toy(script, prefixed(broker, unique_name, script[:10]), tmp_path / script)
            for script in scripts
        )
    )
    reports = dict(zip(scripts, (report for report, _ in runs), strict=True))
    problems: list[str] = []
    toy = reports.pop("toy.py")
    if not toy.passed:
        problems.append(f"the correct toy VNFM failed: {failing(toy)}")
    assert [r.scenario for r in toy.results] == list(SCENARIOS)
    for script, report in reports.items():
        scenario, words = BROKEN_VNFMS[script]
        failed = failing(report)
        if set(failed) != {scenario}:
            problems.append(f"{script}: expected only {scenario} to fail, failed: {failed}")
            continue
        reasons = " | ".join(failed[scenario])
        if words not in reasons:
            problems.append(f"{script}: reason {reasons!r} lacks {words!r}")
    assert not problems, "\n".join(problems)


def test_cli_exit_codes_table_and_json(
    broker: BrokerHandle, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    kafka = prefixed(broker, unique_name, "cli")
    fixture = tmp_path / "vnfm.json"
    fixture.write_text(
        json.dumps({**TOY_FIXTURE, "scenarios": {"drain": TOY_FIXTURE["scenarios"]["drain"]}})
    )
    env = {**kafka.to_env(), "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            python_module("escalator", "vnfm-check", *args),
            env={**__import__("os").environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )

    bad = tmp_path / "bad.toml"
    bad.write_text('vnfm_id = "v"\n[scenarios.teleport]\nvnf_id = "a"\nvm_id = "b"\n')
    usage = cli(str(bad))
    assert usage.returncode == 2 and "teleport" in usage.stderr, usage.stderr

    with ProcessGroup(tmp_path / "logs", base_env=kafka.to_env()) as group:
        # No VNFM yet: the drain scenario fails with "no reply", exit 1.
        fixture.write_text(
            json.dumps(
                {
                    **TOY_FIXTURE,
                    "deadline_s": 2,
                    "scenarios": {"drain": TOY_FIXTURE["scenarios"]["drain"]},
                }
            )
        )
        silent = cli(str(fixture), "--json")
        assert silent.returncode == 1, silent.stderr
        report = json.loads(silent.stdout)
        drain = next(s for s in report["scenarios"] if s["scenario"] == "drain")
        assert not drain["passed"]
        assert any("no reply for the notice" in c["detail"] for c in drain["checks"]), drain
        assert {s["scenario"]: s["skipped"] for s in report["scenarios"]}["refusal"]

        group.spawn(
            "vnfm",
            [
                sys.executable,
                str(BROKEN / "toy.py"),
                "--vnfm-id",
                "vnfm-toy",
                "--behaviours",
                json.dumps(TOY_BEHAVIOURS),
            ],
            wait_for=r"^ready",
            timeout_s=60,
        )
        fixture.write_text(
            json.dumps({**TOY_FIXTURE, "scenarios": {"drain": TOY_FIXTURE["scenarios"]["drain"]}})
        )
        ok = cli(str(fixture), "--scenario", "drain")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "PASS" in ok.stdout and "drained" in ok.stdout, ok.stdout


# --- the reference VNFM ------------------------------------------------------------------------


def _reference_flags() -> set[str]:
    from services.vnfm_adapter.reference_vnfm import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings}


@pytest.fixture
def world_url(tmp_path: Path) -> Any:
    with ProcessGroup(tmp_path / "world-logs") as group:
        match = group.spawn(
            "world",
            python_module(
                "escalator.world", "--port", "0", "--nodes", "6", "--seed", "1", "--speed", "10"
            ),
            wait_for=r"world listening on (http://\S+)",
            timeout_s=30,
        )
        yield match.group(1)  # type: ignore[union-attr]


async def _world_fixture(world_url: str) -> tuple[str, dict[str, Any]]:
    """Pick, in the world, an active member of an active-standby VNF and a loaded member of a
    load-balanced VNF, both of one VNFM."""
    from escalator.world.client import WorldClient

    async with WorldClient(world_url) as world:
        vnfs = await world.vnfs()
    by_vnfm: dict[str, dict[str, Any]] = {}
    for vnf in vnfs:
        found = by_vnfm.setdefault(vnf.vnfm_id, {})
        if vnf.redundancy == "active_standby" and vnf.active_member and "switch_over" not in found:
            vm = vnf.active_member
            found["switch_over"] = {
                "vnf_id": vnf.id,
                "vm_id": vm,
                "node_id": vnf.member_nodes[vm],
            }
        if vnf.redundancy == "load_balanced" and "drain" not in found:
            loaded = [m for m in vnf.members_in_service if vnf.load_share.get(m, 0) > 0]
            if loaded and len(vnf.members_in_service) - 1 >= max(vnf.min_in_service, 1):
                vm = loaded[0]
                found["drain"] = {"vnf_id": vnf.id, "vm_id": vm, "node_id": vnf.member_nodes[vm]}
    vnfm_id, scenarios = max(by_vnfm.items(), key=lambda kv: len(kv[1]))
    assert {"switch_over", "drain"} <= set(scenarios), by_vnfm
    return vnfm_id, scenarios


def _reference_vnfm(world_url: str, vnfm_id: str, *flags: str) -> list[str]:
    return python_module(
        "services.vnfm_adapter.reference_vnfm",
        "--world",
        world_url,
        "--vnfm-id",
        vnfm_id,
        "--group-id",
        f"ref-{uuid.uuid4().hex[:6]}",
        *flags,
    )


async def test_reference_vnfm_passes_switch_over_and_drain(
    broker: BrokerHandle, unique_name: Callable[..., str], tmp_path: Path, world_url: str
) -> None:
    vnfm_id, scenarios = await _world_fixture(world_url)
    kafka = prefixed(broker, unique_name, "ref")
    fixture = CheckFixture.model_validate(
        {"vnfm_id": vnfm_id, "deadline_s": 20, "scenarios": scenarios}
    )
    with ProcessGroup(tmp_path / "logs", base_env=kafka.to_env()) as group:
        group.spawn("reference-vnfm", _reference_vnfm(world_url, vnfm_id))
        report = await run_check(kafka, fixture, ["switch_over", "drain"])
        assert report.passed, (failing(report), group.children["reference-vnfm"].log_tail())


# The reference VNFM flags these scenarios need (being added to reference_vnfm.py).
REFERENCE_FLAGS = {
    "refusal": ["--refuse-first", "1"],
    "heartbeat": ["--work-s", "4", "--heartbeat-every", "1"],
    "late_reply": ["--work-s", "4", "--heartbeat-every", "1"],
}


@pytest.mark.parametrize("scenario", list(REFERENCE_FLAGS))
async def test_reference_vnfm_passes_with_its_behaviour_flags(
    broker: BrokerHandle,
    unique_name: Callable[..., str],
    tmp_path: Path,
    world_url: str,
    scenario: str,
) -> None:
    """One reference VNFM process per behaviour: refuse the first notice; take 4 s and heartbeat
    every second; and stop working on NoticeExpired."""
    flags = REFERENCE_FLAGS[scenario]
    missing = sorted({f for f in flags if f.startswith("--")} - _reference_flags())
    if missing:
        pytest.skip(f"the reference VNFM has no {missing} yet: {scenario} cannot be exhibited")
    vnfm_id, found = await _world_fixture(world_url)
    spec = dict(found["switch_over"])
    if scenario == "heartbeat":
        spec.update(deadline_s=2, extension_max_s=60, hard_timeout_s=60)
    if scenario == "late_reply":
        spec.update(expire_after_s=1, quiet_s=6)
    kafka = prefixed(broker, unique_name, scenario[:8])
    fixture = CheckFixture.model_validate(
        {"vnfm_id": vnfm_id, "deadline_s": 20, "scenarios": {scenario: spec}}
    )
    with ProcessGroup(tmp_path / "logs", base_env=kafka.to_env()) as group:
        group.spawn("reference-vnfm", _reference_vnfm(world_url, vnfm_id, *flags))
        await asyncio.sleep(3)  # joined its group before the short deadlines start
        report = await run_check(kafka, fixture, [scenario])
        assert report.passed, (failing(report), group.children["reference-vnfm"].log_tail())
