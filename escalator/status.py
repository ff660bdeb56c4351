"""What `escalator status` and `watch` show: a projection of the campaigns topic.

Pure: `CampaignBoard.apply(event)` folds the campaign and progress events into one view per
campaign. The Upgrade Manager publishes a `NodeCycleAdvanced` on every step change, with a
readable detail of what the node waits for or why it is blocked, so the operator sees the
blocking reason per node without asking the manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.envelope import Event
from schemas.events import (
    CampaignAbortStarted,
    CampaignCompleted,
    CampaignFailed,
    CampaignPaused,
    CampaignRejected,
    CampaignResumed,
    CampaignStarted,
    NodeCycleAdvanced,
    NodeStep,
    OperatorRequestRejected,
    UpgradeRequested,
)

STEP_ORDER = [
    NodeStep.PENDING,
    NodeStep.CLAIMING,
    NodeStep.NOTIFYING,
    NodeStep.MIGRATING,
    NodeStep.UPGRADING,
    NodeStep.RELEASING,
]


@dataclass
class NodeView:
    node_id: str
    step: NodeStep = NodeStep.PENDING
    detail: str = ""
    since: datetime | None = None

    @property
    def progress(self) -> float:
        """0..1 through the cycle; finished steps count as 1."""
        if self.step.finished:
            return 1.0
        return STEP_ORDER.index(self.step) / len(STEP_ORDER)


@dataclass
class CampaignView:
    campaign_id: str
    state: str = "requested"
    target_version: str = ""
    requested_by: str = ""
    requested_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    reason: str = ""
    nodes: dict[str, NodeView] = field(default_factory=dict)
    rejected_requests: list[str] = field(default_factory=list)
    # Operator controls (pause, resume, abort, retry) that could not apply, with the reason.
    rejected_controls: list[str] = field(default_factory=list)

    def count(self, step: NodeStep) -> int:
        return sum(1 for node in self.nodes.values() if node.step is step)

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "failed", "rejected")

    @property
    def in_cycle(self) -> list[NodeView]:
        return [
            n for n in self.nodes.values() if not n.step.finished and n.step is not NodeStep.PENDING
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "state": self.state,
            "target_version": self.target_version,
            "requested_by": self.requested_by,
            "requested_at": _iso(self.requested_at),
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "reason": self.reason,
            "rejected_controls": list(self.rejected_controls),
            "nodes": {
                "total": len(self.nodes),
                "upgraded": self.count(NodeStep.DONE),
                "skipped": self.count(NodeStep.SKIPPED),
                "failed": self.count(NodeStep.FAILED),
                "pending": self.count(NodeStep.PENDING),
                "in_cycle": len(self.in_cycle),
            },
            "node_states": [
                {
                    "node_id": n.node_id,
                    "step": n.step.value,
                    "detail": n.detail,
                    "since": _iso(n.since),
                }
                for n in self.nodes.values()
            ],
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass
class CampaignBoard:
    campaigns: dict[str, CampaignView] = field(default_factory=dict)

    def view(self, campaign_id: str) -> CampaignView:
        return self.campaigns.setdefault(campaign_id, CampaignView(campaign_id))

    def apply(self, event: Event) -> None:
        if event.campaign_id is None:
            return
        view = self.view(event.campaign_id)
        match event:
            case UpgradeRequested():
                view.target_version = view.target_version or event.manifest.version
                view.requested_by = event.requested_by
                view.requested_at = view.requested_at or event.occurred_at
                if event.nodes:
                    for node_id in event.nodes:
                        view.nodes.setdefault(node_id, NodeView(node_id))
            case CampaignStarted():
                view.state = "running" if not view.finished else view.state
                view.target_version = event.target_version
                view.started_at = view.started_at or event.occurred_at
                for node_id in event.nodes:
                    view.nodes.setdefault(node_id, NodeView(node_id))
            case NodeCycleAdvanced():
                node = view.nodes.setdefault(event.node_id, NodeView(event.node_id))
                node.step, node.detail, node.since = event.step, event.detail, event.occurred_at
                if not event.step.finished and view.state in ("completed", "failed"):
                    # An operator re-admitted a node: the campaign runs again.
                    view.state, view.ended_at, view.reason = "running", None, ""
            case CampaignPaused():
                view.state, view.reason = "paused", event.reason
            case CampaignAbortStarted():
                view.state, view.reason = "aborting", event.reason
            case CampaignResumed():
                view.state, view.reason = "running", ""
            case OperatorRequestRejected():
                view.rejected_controls.append(f"{event.request_type}: {event.reason}")
            case CampaignCompleted():
                view.state, view.ended_at = "completed", event.occurred_at
            case CampaignFailed():
                view.state, view.ended_at, view.reason = "failed", event.occurred_at, event.reason
            case CampaignRejected() if view.started_at is None:
                view.state, view.ended_at, view.reason = "rejected", event.occurred_at, event.reason
            case CampaignRejected():
                # A later request reusing a running campaign's id was refused; the campaign runs on.
                view.rejected_requests.append(event.reason)
            case _:
                pass
