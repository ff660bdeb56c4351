"""Every service entry point rejects bad settings with one readable line per setting, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

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
