"""Every service entry point rejects bad settings with one readable line per setting, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("module", "args", "env", "expected"),
    [
        (
            "services.node_agent",
            ["--world", "http://w", "--heartbeat-interval-s", "-1"],
            {},
            [
                "node agent: bad setting node_id: Field required",
                "node agent: bad setting heartbeat_interval_s: Input should be greater than 0",
            ],
        ),
        (
            "services.upgrade_manager",
            ["--tick-interval", "0"],
            {},
            ["upgrade manager: bad setting tick_interval_s"],
        ),
        (
            "services.upgrade_manager",
            [],
            {"ESCALATOR_KAFKA_FETCH_MAX_WAIT_MS": "abc"},
            ["upgrade manager: bad setting fetch_max_wait_ms", "(got 'abc')"],
        ),
        (
            "services.cloud_manager",
            ["--world", "http://w", "--instance-id", ""],
            {},
            ["cloud manager: bad setting instance_id"],
        ),
        (
            "services.vnfm_adapter",
            [],
            {"ESCALATOR_VNFM_ADAPTER_INSTANCE_ID": ""},
            ["vnfm adapter: bad setting instance_id"],
        ),
        (
            "services.vnfm_adapter.reference_vnfm",
            ["--world", "http://w"],
            {},
            ["reference vnfm: bad setting vnfm_id: Field required"],
        ),
    ],
)
def test_bad_settings_exit_2_with_one_line_each(
    module: str, args: list[str], env: dict[str, str], expected: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(lines[0].split(":")[0] + ":") for line in lines), lines
    for fragment in expected:
        assert any(fragment in line for line in lines), (fragment, lines)


SERVICES = [
    ("services.upgrade_manager", [], "upgrade manager"),
    ("services.cloud_manager", ["--world", "http://w"], "cloud manager"),
    ("services.vnfm_adapter", [], "vnfm adapter"),
    ("services.node_agent", ["--node-id", "n1", "--world", "http://w"], "node agent"),
]


@pytest.mark.parametrize(("module", "args", "service"), SERVICES)
def test_config_flag_reads_the_toml_file_and_reports_its_bad_settings(
    module: str, args: list[str], service: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCALATOR_")}
    missing = subprocess.run(
        [sys.executable, "-m", module, *args, "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert missing.returncode == 2, missing.stderr
    assert f"{service}: bad setting --config: no such file" in missing.stderr
    config = tmp_path / "escalator.toml"
    config.write_text('[kafka]\nfetch_max_wait_ms = "abc"\n')
    bad = subprocess.run(
        [sys.executable, "-m", module, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2, bad.stderr
    assert f"{service}: bad setting fetch_max_wait_ms" in bad.stderr, bad.stderr
