"""The operator's CLI against a running deployment: `upgrade start`, `status --json`, `watch`.

`status ID --json` taken while the first node waits for its VNFMs (reference VNFMs that take
3 s to reply) shows the campaign running with per-node steps and what the node waits for; taken
after the end it shows the final state. `watch ID --timeout 60`, started right after the
campaign, exits 0 when the campaign completes.
"""

from __future__ import annotations

import asyncio

import pytest
from e2e_harness import REFERENCE_VNFM, TARGET, E2EDeployment

from escalator.status import CampaignView
from schemas.envelope import Event
from schemas.events import NodeCycleAdvanced, NodeStep

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

REPLY_DELAY_S = 3.0


async def test_status_and_watch_follow_a_campaign(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(
        nodes=4, seed=0, extra_args={REFERENCE_VNFM: ["--reply-delay-s", str(REPLY_DELAY_S)]}
    )
    await d.prepare()
    campaign_nodes = d.node_ids[:2]  # the other two stay out of this campaign
    # --keep-order: the status read below expects the first listed node to go first.
    await d.start_campaign(
        campaign_id, nodes=campaign_nodes, vnfm_timeout_s=30, extra=["--keep-order"]
    )
    watch = asyncio.create_task(d.cli("watch", campaign_id, "--timeout", "60", timeout_s=90))

    during: list[dict] = []

    async def on_event(event: Event, view: CampaignView) -> None:
        if (
            not during
            and isinstance(event, NodeCycleAdvanced)
            and event.node_id == campaign_nodes[0]
            and event.step is NodeStep.NOTIFYING
        ):
            # The VNFMs answer REPLY_DELAY_S later: the campaign is still running meanwhile.
            during.append(await d.status_json(campaign_id))

    view = await d.follow_campaign(campaign_id, on_event=on_event)
    assert view.state == "completed", f"{view.state}: {view.reason}\n{d.logs()}"

    [status] = during
    assert status["campaign_id"] == campaign_id
    assert status["state"] == "running"
    assert status["target_version"] == TARGET
    assert status["requested_by"] == "e2e-test"
    steps = {n["node_id"]: n for n in status["node_states"]}
    assert set(steps) == set(campaign_nodes)
    first, second = (steps[n] for n in campaign_nodes)
    assert first["step"] == "notifying", first
    assert "VNFM" in first["detail"] and first["since"], first
    assert second["step"] == "pending", second
    assert status["nodes"] == {
        "total": 2,
        "upgraded": 0,
        "skipped": 0,
        "failed": 0,
        "pending": 1,
        "in_cycle": 1,
    }

    code, out, err = await watch
    assert code == 0, f"watch exited {code}\n{out}\n{err}"
    assert campaign_id in out and "completed" in out, out

    final = await d.status_json(campaign_id)
    assert final["state"] == "completed"
    assert final["ended_at"] and final["started_at"] and final["requested_at"]
    assert final["nodes"]["upgraded"] == final["nodes"]["total"] == 2
    assert {n["node_id"]: n["step"] for n in final["node_states"]} == dict.fromkeys(
        campaign_nodes, "done"
    )
    after = await d.snapshot()
    versions = {n.id: n.installed_version for n in after.nodes}
    assert {n: versions[n] for n in campaign_nodes} == dict.fromkeys(campaign_nodes, TARGET)
    assert {v for n, v in versions.items() if n not in campaign_nodes} == {"1.0.0"}

    # All campaigns, as a list, and a campaign that does not exist (exit 2, one line).
    code, out, _ = await d.cli("status", "--json")
    assert code == 0 and campaign_id in out
    code, _, err = await d.cli("status", "cmp-does-not-exist", "--json")
    assert code == 2 and err.strip().startswith("escalator: error:"), err
