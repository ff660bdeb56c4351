"""`schemas/` is installable on its own, as the `escalator-schemas` distribution.

A vendor's Python VNFM should import the models without the rest of Escalator. This test builds
and installs `schemas/` (from a copy, so the build leaves nothing in the work tree) into a fresh
virtualenv made with `python -m venv`, with `--no-deps`, plus pydantic alone (the same version as
ours, from the local wheel cache or PyPI). In that venv, run isolated (`python -I`, outside the
repository) it proves:

- the models import and a reply built from them round-trips through `schemas.codec`;
- `escalator`, `services` and the Kafka client are not importable there, so nothing was needed
  from them;
- the distribution declares pydantic as its only requirement and `pip check` is satisfied;
- its version is the contract version (`info.version` of the packaged `asyncapi.json`), and the
  generated JSON Schema files ship as package data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import importlib.metadata as md
    import importlib.resources as res
    import importlib.util
    import json
    import sys

    import schemas
    from schemas.codec import decode, encode
    from schemas.events import VnfBusinessMoved
    from schemas.types import BusinessOutcome, VmBusinessOutcome

    assert "site-packages" in schemas.__file__, schemas.__file__
    for name in ("escalator", "services", "aiokafka"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable"
    reply = VnfBusinessMoved(
        notice_id="n-1",
        vnfm_id="vnfm-a",
        outcomes=[VmBusinessOutcome(vm_id="vm-1", vnf_id="vnf-1", outcome=BusinessOutcome.DRAINED)],
    )
    assert decode(encode(reply)) == reply
    contract = json.loads((res.files("schemas") / "asyncapi.json").read_text())
    jsonschemas = sorted(p.name for p in (res.files("schemas") / "jsonschema").iterdir())
    print(json.dumps({
        "version": md.version("escalator-schemas"),
        "requires": md.requires("escalator-schemas"),
        "contract_version": contract["info"]["version"],
        "jsonschemas": jsonschemas,
        "schemas_file": schemas.__file__,
    }))
    """
)


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_schemas_install_and_import_alone_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    source = tmp_path / "escalator-schemas"
    shutil.copytree(
        ROOT / "schemas",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", str(source)], tmp_path)
    _run([*pip, f"pydantic=={version('pydantic')}"], tmp_path)
    _run([python, "-m", "pip", "check"], tmp_path)

    facts = json.loads(_run([python, "-I", "-c", PROBE], tmp_path).strip().splitlines()[-1])

    contract = json.loads((ROOT / "schemas" / "asyncapi.json").read_text())
    assert facts["version"] == contract["info"]["version"] == facts["contract_version"]
    assert [r.split(">")[0].split("<")[0].strip() for r in facts["requires"]] == ["pydantic"]
    assert facts["jsonschemas"] == sorted(p.name for p in (ROOT / "schemas/jsonschema").glob("*"))
    assert facts["schemas_file"].startswith(str(venv))
