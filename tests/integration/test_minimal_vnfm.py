"""The vendor guide's minimal VNFM (`docs/examples/minimal_vnfm.py`) really drives a campaign.

The file the guide includes is run as-is, as its own process, one per VNFM id of the simulated
cloud, in place of the reference VNFMs of the demo Deployment. The campaign must complete exactly
as the demo requires (every node upgraded, no VM lost, zero business interruptions seen by the
world's own monitor), and it must be the minimal VNFM's replies that carried it: every node's
`BusinessMoved` is not timed out, every outcome is the `left_for_vim` it answers, and the VNFM
adapter rejected none of its replies.
"""

from __future__ import annotations

import asyncio
import io
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from escalator.broker import BrokerHandle
from escalator.bus.readback import scan
from escalator.demo import DemoOptions, Deployment, demo_succeeded, run_campaign
from schemas.codec import decode
from schemas.envelope import Event
from schemas.events import BusinessMoved, VnfMaintenanceNotified, VnfmReplyRejected
from schemas.topics import VNFM_EVENTS, VNFM_NOTICES, TopicSpec

ROOT = Path(__file__).resolve().parents[2]
MINIMAL_VNFM = ROOT / "docs" / "examples" / "minimal_vnfm.py"
GUIDE = ROOT / "docs" / "vnfm-integration.md"


@pytest.mark.unit
def test_the_guide_shows_the_tested_file_verbatim() -> None:
    guide = GUIDE.read_text()
    assert f"```python\n{MINIMAL_VNFM.read_text()}```" in guide, (
        "docs/vnfm-integration.md must include docs/examples/minimal_vnfm.py verbatim"
    )


@dataclass
class MinimalVnfmDeployment(Deployment):
    """The demo Deployment, with the guide's minimal VNFM for every VNFM id."""

    def start_services(self) -> None:
        vnfm_ids, self.vnfm_ids = self.vnfm_ids, []
        try:
            super().start_services()  # everything but the reference VNFMs
        finally:
            self.vnfm_ids = vnfm_ids
        for vnfm_id in vnfm_ids:
            self.group.spawn(
                f"minimal-vnfm-{vnfm_id}", [sys.executable, str(MINIMAL_VNFM), vnfm_id]
            )


async def _events(deployment: Deployment, topic: TopicSpec, campaign_id: str) -> list[Event]:
    found: list[Event] = []
    async for record in scan(deployment.settings, topic):
        event = decode(record.value)
        if isinstance(event, Event) and event.campaign_id == campaign_id:
            found.append(event)
    return found


@pytest.mark.integration
@pytest.mark.real_kafka
def test_minimal_vnfm_from_the_guide_completes_a_campaign(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    settings = broker.settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
    options = DemoOptions(
        nodes=4, domains=2, speed=20.0, vnfm_timeout_s=30.0, timeout_s=240.0, run_dir=tmp_path
    )
    deployment = MinimalVnfmDeployment.create(settings, options)
    output = io.StringIO()
    console = Console(file=output, width=120)
    try:
        deployment.start_world()
        report = asyncio.run(run_campaign(deployment, options, "test broker", console))
        assert deployment.vnfm_ids, "the world has no VNFM ids"
        assert demo_succeeded(report), f"{report}\n{output.getvalue()}"
        campaign_id = report["campaign_id"]
        moved = asyncio.run(_events(deployment, VNFM_EVENTS, campaign_id))
        notices = asyncio.run(_events(deployment, VNFM_NOTICES, campaign_id))
    finally:
        deployment.stop()

    per_node = [e for e in moved if isinstance(e, BusinessMoved)]
    assert {e.node_id for e in per_node} == set(deployment.node_ids)
    assert not [e for e in per_node if e.timed_out], "a VNFM deadline passed: it did not reply"
    outcomes = {o.outcome.value for e in per_node for o in e.outcomes}
    assert outcomes <= {"left_for_vim"}, outcomes
    assert not [e for e in notices if isinstance(e, VnfmReplyRejected)]
    sent = [e for e in notices if isinstance(e, VnfMaintenanceNotified)]
    assert sent, "no notice was sent to any VNFM"
    for notice in sent:
        log = deployment.group.children[f"minimal-vnfm-{notice.vnfm_id}"].log_path.read_text()
        assert f"replied to {notice.notice_id}" in log, log
