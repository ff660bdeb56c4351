"""`status`/`watch` projection of the campaigns topic."""

from __future__ import annotations

import pytest

from escalator.status import CampaignBoard
from schemas.events import (
    CampaignCompleted,
    CampaignRejected,
    CampaignStarted,
    NodeCycleAdvanced,
    NodeStep,
    UpgradeRequested,
)

pytestmark = pytest.mark.unit

MANIFEST = {"version": "2.0", "files": [{"name": "a", "sha256": "0" * 64, "uri": "https://r/a"}]}


def test_board_follows_a_campaign_node_by_node() -> None:
    board = CampaignBoard()
    board.apply(UpgradeRequested(campaign_id="cmp-1", manifest=MANIFEST, nodes=("n1", "n2")))
    assert board.view("cmp-1").state == "requested"
    board.apply(CampaignStarted(campaign_id="cmp-1", target_version="2.0", nodes=("n1", "n2")))
    board.apply(
        NodeCycleAdvanced(
            campaign_id="cmp-1",
            node_id="n1",
            step=NodeStep.NOTIFYING,
            detail="waiting for VNFM vnfm-a",
        )
    )
    view = board.view("cmp-1")
    assert view.state == "running" and view.nodes["n1"].detail == "waiting for VNFM vnfm-a"
    assert [n.node_id for n in view.in_cycle] == ["n1"]
    for node in ("n1", "n2"):
        board.apply(NodeCycleAdvanced(campaign_id="cmp-1", node_id=node, step=NodeStep.DONE))
    board.apply(CampaignCompleted(campaign_id="cmp-1", upgraded=2, skipped=0, failed=0))
    summary = board.view("cmp-1").to_json()
    assert summary["state"] == "completed"
    assert summary["nodes"] == {
        "total": 2,
        "upgraded": 2,
        "skipped": 0,
        "failed": 0,
        "pending": 0,
        "in_cycle": 0,
    }


def test_a_refused_reuse_of_a_running_campaign_id_does_not_mark_it_rejected() -> None:
    board = CampaignBoard()
    board.apply(CampaignStarted(campaign_id="cmp-1", target_version="2.0", nodes=("n1",)))
    board.apply(CampaignRejected(campaign_id="cmp-1", reason="campaign id already used"))
    assert board.view("cmp-1").state == "running"
    assert board.view("cmp-1").rejected_requests == ["campaign id already used"]
    board.apply(CampaignRejected(campaign_id="cmp-2", reason="unknown nodes: x"))
    assert board.view("cmp-2").state == "rejected"


def test_board_shows_pause_resume_rejected_controls_and_a_reopened_campaign() -> None:
    from schemas.events import CampaignPaused, CampaignResumed, OperatorRequestRejected

    board = CampaignBoard()
    board.apply(CampaignStarted(campaign_id="cmp-2", target_version="2.0", nodes=("n1",)))
    board.apply(CampaignPaused(campaign_id="cmp-2", reason="peak hour"))
    view = board.view("cmp-2")
    assert (view.state, view.reason) == ("paused", "peak hour")
    board.apply(CampaignResumed(campaign_id="cmp-2"))
    assert (view.state, view.reason) == ("running", "")
    board.apply(
        OperatorRequestRejected(
            campaign_id="cmp-2", request_type="NodeRetryRequested", reason="n1 is done"
        )
    )
    assert view.to_json()["rejected_controls"] == ["NodeRetryRequested: n1 is done"]
    board.apply(CampaignCompleted(campaign_id="cmp-2", upgraded=0, skipped=0, failed=1))
    assert view.finished
    board.apply(
        NodeCycleAdvanced(
            campaign_id="cmp-2", node_id="n1", step=NodeStep.PENDING, detail="re-admitted"
        )
    )
    assert view.state == "running" and view.ended_at is None
