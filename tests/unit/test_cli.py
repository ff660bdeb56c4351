"""The operator CLI: requests built right, bad input rejected with one line and exit code 2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from escalator.cli import build_upgrade_request, new_campaign_id
from schemas.types import VnfmTimeoutPolicy

pytestmark = pytest.mark.unit

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "escalator", *args], capture_output=True, text=True, timeout=60
    )


def request(**overrides: object):  # type: ignore[no-untyped-def]
    kwargs: dict[str, object] = {
        "version": "2.0",
        "manifest": None,
        "artifacts": [],
        "repo_url": None,
        "nodes": [],
        "max_parallel": 1,
        "vnfm_timeout": 40.0,
        "on_vnfm_timeout": VnfmTimeoutPolicy.MIGRATE,
        "campaign_id": None,
        "requested_by": "test",
    }
    kwargs.update(overrides)
    return build_upgrade_request(**kwargs)  # type: ignore[arg-type]


def test_manifest_file_json_and_toml(tmp_path: Path) -> None:
    as_json = tmp_path / "m.json"
    as_json.write_text(
        json.dumps({"files": [{"name": "a.rpm", "sha256": SHA, "uri": "https://r/a.rpm"}]})
    )
    as_toml = tmp_path / "m.toml"
    as_toml.write_text(
        f'version = "2.0"\n[[files]]\nname = "a.rpm"\nsha256 = "{SHA}"\nuri = "https://r/a.rpm"\n'
    )
    for path in (as_json, as_toml):
        built = request(manifest=path, nodes=["n1,n2", "n3"], max_parallel=2)
        assert built.manifest.version == "2.0"
        assert built.manifest.files[0].sha256 == SHA
        assert built.nodes == ("n1", "n2", "n3")
        assert built.policy.max_parallel == 2
        assert built.campaign_id and built.campaign_id.startswith("cmp-2-0-")


def test_artifacts_are_hashed_and_published_by_uri_not_path(tmp_path: Path) -> None:
    artifact = tmp_path / "nova.rpm"
    artifact.write_bytes(b"payload")
    built = request(artifacts=[artifact], repo_url="https://repo.example/2.0/")
    (file,) = built.manifest.files
    assert file.sha256 == hashlib.sha256(b"payload").hexdigest()
    assert file.uri == "https://repo.example/2.0/nova.rpm" and str(tmp_path) not in file.uri
    assert file.size_bytes == 7


def test_campaign_ids_are_valid_and_unique() -> None:
    ids = {new_campaign_id("29.1.0 RC/1") for _ in range(50)}
    assert len(ids) == 50
    request(campaign_id=ids.pop(), manifest=None, artifacts=[Path(__file__)], repo_url="https://r")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["upgrade", "start"], "Missing option '--version'"),
        (["upgrade", "start", "--version", "2.0"], "exactly one of --manifest"),
        (["upgrade", "start", "--version", "2.0", "--artifact", "/etc/hostname"], "--repo-url"),
        (
            ["upgrade", "start", "--version", "2.0", "--manifest", "/nonexistent.json"],
            "cannot read",
        ),
        (
            ["upgrade", "start", "--version", "2.0", "--max-parallel", "0", "--manifest", "x"],
            "--max-parallel",
        ),
        (
            [
                "upgrade",
                "start",
                "--version",
                "2.0",
                "--on-vnfm-timeout",
                "never",
                "--manifest",
                "x",
            ],
            "--on-vnfm-timeout",
        ),
        (
            [
                "upgrade",
                "start",
                "--version",
                "bad version!",
                "--artifact",
                "/etc/hostname",
                "--repo-url",
                "https://r",
            ],
            "version",
        ),
        (["serve", "nonsense"], "unknown service"),
        (["no-such-verb"], "No such command"),
        (["registry", "load", "/nonexistent.json"], "cannot read"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("escalator: error:") and message in lines[0]


def test_bad_manifest_content_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"files": [{"name": "a", "sha256": "short", "uri": "https://r/a"}]}))
    result = run_cli("upgrade", "start", "--version", "2.0", "--manifest", str(bad))
    assert result.returncode == 2 and "sha256" in result.stderr
    wrong_version = tmp_path / "w.json"
    wrong_version.write_text(json.dumps({"version": "3.0", "files": []}))
    result = run_cli("upgrade", "start", "--version", "2.0", "--manifest", str(wrong_version))
    assert result.returncode == 2 and "3.0" in result.stderr
