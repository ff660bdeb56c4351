"""An external VNFM, written from the published JSON contract only, carries a whole campaign.

`tests/external_vnfm/vnfm.py` is what a vendor would write without our code: it runs in its own
virtualenv (`.cache/external-vnfm-venv`, created once from `tests/external_vnfm/requirements.txt`:
confluent-kafka pinned from PyPI, nothing else), started with `python -I` so neither PYTHONPATH
nor the work tree can leak Escalator in. It talks Kafka through librdkafka with its DEFAULT
partitioner (CRC32-based, not Java's murmur2), builds its replies as plain dicts, and acts on the
simulated cloud through its HTTP API (switch-over, drain, restore).

The test runs the demo Deployment with that VNFM in place of the reference VNFMs, for every
VNFM id, starts the campaign with the operator CLI (`escalator upgrade start`, a child process),
and requires: the campaign completes, every node reaches the target version, no VM is lost, the
world's own monitor saw zero business interruptions, every node's `BusinessMoved` came from
replies (none timed out), the replies really moved business (switch-overs and drains happened),
and the VNFM adapter rejected none of them.

The venv is made once (about 15 s with PyPI reachable); afterwards the campaign takes ~15 s.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from escalator.broker import BrokerHandle
from escalator.bus.connection import ensure_topics
from escalator.bus.readback import scan
from escalator.cli import watch_campaign
from escalator.demo import (
    DemoOptions,
    Deployment,
    publish_registry_from_world,
    wait_for_heartbeats,
    write_demo_manifest,
)
from escalator.settings import KafkaSettings
from escalator.status import CampaignView
from escalator.world.client import WorldClient
from escalator.world.model import Interruption, WorldSnapshot
from schemas.codec import decode
from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfmReplyRejected,
)
from schemas.topics import VNFM_EVENTS, VNFM_NOTICES, VNFM_REPLIES, TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka]

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "tests" / "external_vnfm"
VNFM = KIT / "vnfm.py"
VENV = ROOT / ".cache" / "external-vnfm-venv"
TARGET = "2.0.0"


def _venv_python() -> Path:
    """The external VNFM's own virtualenv, made once per content of requirements.txt."""
    requirements = KIT / "requirements.txt"
    stamp = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    python = VENV / "bin" / "python"
    marker = VENV / f".installed-{stamp}"
    if marker.exists() and python.exists():
        return python
    if VENV.exists():
        shutil.rmtree(VENV)
    for argv in (
        [sys.executable, "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    marker.touch()
    return python


@pytest.fixture(scope="module")
def external_python() -> Path:
    python = _venv_python()
    probe = (
        "import importlib.util as u, confluent_kafka as c; "
        "print([m for m in ('escalator', 'schemas', 'services', 'pydantic', 'aiokafka') "
        "if u.find_spec(m)], c.version()[0], c.libversion()[0])"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, timeout=60, cwd=KIT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[] "), f"the external venv can import our code: {out.stdout}"
    return python


def test_external_vnfm_imports_only_the_standard_library_and_confluent_kafka() -> None:
    tree = ast.parse(VNFM.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add((node.module or "").split(".")[0])
    foreign = imported - set(sys.stdlib_module_names) - {"confluent_kafka"}
    assert not foreign, f"the external VNFM imports {foreign}"
    config_keys = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    assert "partitioner" not in config_keys, "it must keep librdkafka's default partitioner"


@dataclass
class ExternalVnfmDeployment(Deployment):
    """The demo Deployment, with the external VNFM (its own venv) for every VNFM id."""

    python: Path = VENV / "bin" / "python"

    def start_services(self) -> None:
        vnfm_ids, self.vnfm_ids = self.vnfm_ids, []
        try:
            super().start_services()  # everything but the reference VNFMs
        finally:
            self.vnfm_ids = vnfm_ids
        for vnfm_id in vnfm_ids:
            argv = [str(self.python), "-I", str(VNFM), "--vnfm-id", vnfm_id]
            self.group.spawn(f"external-vnfm-{vnfm_id}", [*argv, "--world", self.world_url])


async def _events(settings: KafkaSettings, topic: TopicSpec, campaign_id: str) -> list[Event]:
    found: list[Event] = []
    async for record in scan(settings, topic):
        event = decode(record.value)
        if isinstance(event, Event) and event.campaign_id == campaign_id:
            found.append(event)
    return found


@dataclass
class Run:
    campaign_id: str
    view: CampaignView
    before: WorldSnapshot
    after: WorldSnapshot
    interruptions: list[Interruption]
    watch: str
    moved: list[Event]
    notices: list[Event]
    replies: list[Event]


async def _run(deployment: ExternalVnfmDeployment, tmp_path: Path) -> Run:
    settings = deployment.settings
    await ensure_topics(settings)
    async with WorldClient(deployment.world_url) as world:
        before = await world.snapshot()
    deployment.node_ids = sorted(n.id for n in before.nodes)
    _, deployment.vnfm_ids = await publish_registry_from_world(settings, deployment.world_url)
    deployment.start_services()
    await wait_for_heartbeats(settings, deployment.node_ids, deployment, timeout_s=120)

    started = time.time()
    cli = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "escalator", "upgrade", "start", "--version", TARGET),
        *("--manifest", str(write_demo_manifest(tmp_path, TARGET))),
        *("--nodes", ",".join(deployment.node_ids), "--max-parallel", "1"),
        *("--vnfm-timeout", "30", "--on-vnfm-timeout", "migrate"),
        *("--requested-by", "test_external_vnfm"),
        env={**os.environ, **settings.to_env()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(cli.communicate(), timeout=120)
    assert cli.returncode == 0, f"upgrade start failed: {err.decode()}"
    campaign_id = out.decode().strip().splitlines()[-1]

    output = io.StringIO()
    watcher = asyncio.create_task(
        watch_campaign(settings, campaign_id, Console(file=output, width=120), timeout_s=240)
    )
    while not watcher.done():
        if deployment.group.dead():
            watcher.cancel()
            deployment.check_alive()
        await asyncio.wait({watcher}, timeout=1.0)
    view = watcher.result()
    async with WorldClient(deployment.world_url) as world:
        after = await world.snapshot()
    return Run(
        campaign_id=campaign_id,
        view=view,
        before=before,
        after=after,
        interruptions=[i for i in after.interruptions if i.started_at >= started],
        watch=output.getvalue(),
        moved=await _events(settings, VNFM_EVENTS, campaign_id),
        notices=await _events(settings, VNFM_NOTICES, campaign_id),
        replies=await _events(settings, VNFM_REPLIES, campaign_id),
    )


def test_campaign_completes_with_the_external_vnfm(
    broker: BrokerHandle, external_python: Path, tmp_path: Path
) -> None:
    settings = broker.settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
    options = DemoOptions(nodes=4, domains=2, speed=20.0, version=TARGET, run_dir=tmp_path)
    deployment = ExternalVnfmDeployment.create(settings, options)
    deployment.python = external_python
    try:
        deployment.start_world()
        run = asyncio.run(_run(deployment, tmp_path))
    finally:
        deployment.stop()
    logs = "\n".join(
        f"--- {c.name}\n{c.log_tail(20)}"
        for c in deployment.group.children.values()
        if c.name.startswith("external-vnfm")
    )
    view, after, before = run.view, run.after, run.before
    counts = view.to_json()["nodes"]
    assert view.state == "completed", f"{view.state} {view.reason}\n{run.watch}\n{logs}"
    assert counts["upgraded"] == counts["total"] == len(deployment.node_ids), f"{counts}\n{logs}"
    assert all(n.installed_version == TARGET for n in after.nodes)
    assert not [n.id for n in after.nodes if n.maintenance_holder]
    assert {vm.id for vm in after.vms} == {vm.id for vm in before.vms}, "a VM was lost"
    assert run.interruptions == [], f"business interrupted: {run.interruptions}\n{logs}"

    moved = [e for e in run.moved if isinstance(e, BusinessMoved)]
    assert {e.node_id for e in moved} == set(deployment.node_ids)
    assert not [e.node_id for e in moved if e.timed_out], f"no reply in time:\n{logs}"
    outcomes = [o.outcome.value for e in moved for o in e.outcomes]
    assert "switched_over" in outcomes and "drained" in outcomes, outcomes

    notices = [e for e in run.notices if isinstance(e, VnfMaintenanceNotified)]
    rejected = [e for e in run.notices if isinstance(e, VnfmReplyRejected)]
    assert notices and not rejected, rejected
    replies = [e for e in run.replies if isinstance(e, VnfBusinessMoved)]
    assert {r.notice_id for r in replies} == {n.notice_id for n in notices}
    assert all(r.producer.startswith("external-vnfm/") for r in replies)
    print(json.dumps({"nodes": len(moved), "notices": len(notices), "outcomes": outcomes}))
