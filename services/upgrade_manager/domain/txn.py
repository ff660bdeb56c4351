"""One decision in the making: reads the original state, collects changed records and commands."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta

from schemas.envelope import Event, command_id
from schemas.events import CampaignPolicy, NodeCycleAdvanced, NodeStep

from .commands import clip, envelope, round_part
from .state import (
    CampaignPlan,
    CampaignRecord,
    CampaignState,
    Context,
    Decision,
    NodeRecord,
    Sent,
)


class Txn:
    """Working copy of a campaign for one `decide()` call.

    Records are only replaced when their value changes, so an untouched record keeps its identity
    and the adapter writes back exactly `Decision.changed_nodes` (and the campaign record if
    `Decision.campaign_changed`).
    """

    def __init__(self, state: CampaignState, ctx: Context, cause: Event | None) -> None:
        self._original = state
        self.plan: CampaignPlan = state.plan
        self.campaign: CampaignRecord = state.campaign
        self._changed: dict[str, NodeRecord] = {}
        self.commands: list[Event] = []
        self.ctx = ctx
        self.cause_id: uuid.UUID | None = cause.event_id if cause is not None else None
        # Set by a node whose VNFM timed out under policy `abort`; the campaign acts on it.
        self.abort_reason: str | None = None
        # Whether the batch planner runs in this decision: on Ticks, and when a node left its
        # cycle or maintenance. Other inputs change nothing the planner reads but the clock.
        self.replan: bool = cause is None

    # --- reading ---------------------------------------------------------------------------

    @property
    def policy(self) -> CampaignPolicy:
        return self.plan.policy

    @property
    def nodes(self) -> Mapping[str, NodeRecord]:
        """Current node records (changed ones included); a read-only view, built lazily."""
        if not self._changed:
            return self._original.nodes
        return _Overlay(self._original.nodes, self._changed)

    def node(self, node_id: str) -> NodeRecord | None:
        changed = self._changed.get(node_id)
        return changed if changed is not None else self._original.nodes.get(node_id)

    def sent(self, seconds: float, attempt: int = 1) -> Sent:
        """A command sent now, caused by the current input, due in `seconds`."""
        now = self.ctx.now
        return Sent(
            attempt=attempt, at=now, cause=self.cause_id, deadline=now + timedelta(seconds=seconds)
        )

    # --- writing ---------------------------------------------------------------------------

    def save(self, record: NodeRecord) -> NodeRecord:
        if record != self.node(record.node_id):
            self._changed[record.node_id] = record
        return record

    def update_campaign(self, **changes: object) -> None:
        updated = self.campaign.model_copy(update=changes)
        if updated != self.campaign:
            self.campaign = updated

    def emit(self, *events: Event) -> None:
        self.commands.extend(events)

    def progress(self, node: NodeRecord) -> None:
        """Tell watchers where the node is now (one event per step entered, or per blocker)."""
        detail = clip(node.detail)
        event_id = command_id(
            self.campaign.campaign_id,
            node.node_id,
            "progress",
            node.step,
            detail,
            *round_part(node.deferrals),
        )
        self.emit(
            NodeCycleAdvanced(
                **envelope(self.plan, event_id, self.ctx.now, self.cause_id),
                node_id=node.node_id,
                step=node.step,
                detail=detail,
            )
        )

    def enter(self, node: NodeRecord, step: NodeStep, detail: str, **changes: object) -> NodeRecord:
        """Move a node to `step` and report it."""
        updated = self.save(node.model_copy(update={"step": step, "detail": detail, **changes}))
        self.progress(updated)
        return updated

    def decision(self) -> Decision:
        original = self._original
        changed_campaign = self.campaign is not original.campaign
        if not self._changed and not changed_campaign:
            return Decision(original, tuple(self.commands))
        nodes = original.nodes
        if self._changed:
            nodes = {**original.nodes, **self._changed}
        return Decision(
            CampaignState(self.plan, self.campaign, nodes),
            tuple(self.commands),
            frozenset(self._changed),
            changed_campaign,
        )


class _Overlay(Mapping[str, NodeRecord]):
    """The original node records with this decision's changes on top, without copying."""

    def __init__(self, base: Mapping[str, NodeRecord], top: Mapping[str, NodeRecord]) -> None:
        self._base = base
        self._top = top

    def __getitem__(self, key: str) -> NodeRecord:
        found = self._top.get(key)
        return found if found is not None else self._base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)
