"""The AsyncAPI document is valid for an independent parser: `@asyncapi/parser` (npm), run by node.

Our generator could write a document that only we believe is AsyncAPI 3.0. This test hands the
checked-in `schemas/asyncapi.json` to the AsyncAPI initiative's own parser, which resolves the
`./jsonschema/*.json` payload $refs relative to the file, validates the document against the
AsyncAPI 3.0 schema and runs its ruleset (e.g. an operation's messages must belong to its
channel). Any error-severity diagnostic fails the test with the parser's own messages.

The parser is pinned in `tests/asyncapi/package.json` + `package-lock.json` and installed once by
`npm ci` into `.cache/npm-asyncapi` (re-installed when the lock changes). The test skips only
where `node` or `npm` is absent, and never when the `CI` environment variable is set: there it
fails instead, so a CI machine without node cannot pass silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "tests" / "asyncapi"
CACHE = ROOT / ".cache" / "npm-asyncapi"
Parse = Callable[[Path], subprocess.CompletedProcess[str]]
DOCUMENT = ROOT / "schemas" / "asyncapi.json"


def _require_node() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node, npm
    missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
    message = f"{missing} not found: cannot run the independent AsyncAPI parser"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI is set (this check must not be skipped in CI)")
    pytest.skip(message)


def _node_modules(npm: str) -> Path:
    """`npm ci` of the pinned kit into the cache, once per lock file content."""
    lock = (KIT / "package-lock.json").read_bytes()
    stamp = hashlib.sha256(lock + (KIT / "package.json").read_bytes()).hexdigest()[:16]
    marker = CACHE / f".installed-{stamp}"
    if marker.exists() and (CACHE / "node_modules" / "@asyncapi" / "parser").is_dir():
        return CACHE / "node_modules"
    if CACHE.exists():
        shutil.rmtree(CACHE)
    CACHE.mkdir(parents=True)
    shutil.copy(KIT / "package.json", CACHE / "package.json")
    shutil.copy(KIT / "package-lock.json", CACHE / "package-lock.json")
    result = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=CACHE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    marker.touch()
    return CACHE / "node_modules"


@pytest.fixture(scope="module")
def parse() -> Parse:
    node, npm = _require_node()
    modules = _node_modules(npm)

    def run(document: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [node, str(KIT / "validate.js"), str(modules), str(document)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def test_asyncapi_parser_accepts_the_checked_in_document(parse: Parse) -> None:
    result = parse(DOCUMENT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"@asyncapi/parser rejected {DOCUMENT}:\n{output}"
    assert "VALID AsyncAPI 3.0.0" in result.stdout, output
    document = json.loads(DOCUMENT.read_text())
    channels, operations = len(document["channels"]), len(document["operations"])
    assert f"{channels} channels, {operations} operations" in result.stdout, output


def test_asyncapi_parser_rejects_a_broken_document(parse: Parse, tmp_path: Path) -> None:
    """Negative control: the harness fails on real errors (an operation sending a message of
    another channel, and a payload $ref to a missing file), so the pass above means something."""
    shutil.copytree(ROOT / "schemas" / "jsonschema", tmp_path / "jsonschema")
    document = json.loads(DOCUMENT.read_text())
    operation = next(iter(document["operations"].values()))
    foreign = next(
        name
        for name, channel in document["channels"].items()
        if name != operation["channel"]["$ref"].rsplit("/", 1)[-1]
    )
    message = next(iter(document["channels"][foreign]["messages"]))
    operation["messages"] = [{"$ref": f"#/channels/{foreign}/messages/{message}"}]
    first = next(iter(document["components"]["messages"].values()))
    first["payload"] = {"$ref": "./jsonschema/DoesNotExist.json"}
    broken = tmp_path / "asyncapi.json"
    broken.write_text(json.dumps(document))
    result = parse(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "asyncapi3-operation-messages-from-referred-channel" in result.stdout
    assert "DoesNotExist.json" in result.stdout
