"""What the decision core reads and returns: the persisted records, the context, the decision.

The adapter persists, per campaign, one `CampaignPlan` (the request as accepted: manifest, policy,
node order; written once, when the request is decided), one small `CampaignRecord` (status, slots,
counters; rewritten as the campaign moves) and one `NodeRecord` per node, so that no record grows
with the campaign's VMs (Kafka refuses messages above 1 MB) and a decision writes only small
records: the plan of a 10,000-node campaign is about 250 KB, its status record a few hundred bytes.
Records are frozen pydantic models; a record a decision did not change is returned as the very
same object, and the `Decision` names what changed so that only that is written back.

`rebuild()` puts a campaign back together from whatever records were persisted. The adapter writes
a decision's records to separate places without a transaction, so a crash may keep some of them
and lose others; `rebuild` re-derives everything the status record repeats about the nodes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import AwareDatetime, Field

from schemas.envelope import Event
from schemas.events import CampaignPolicy, NodeAgentHeartbeat, NodeStep
from schemas.types import CampaignId, NodeId, ValueModel, VersionManifest, VmId, VmOnNode

from .planner import Cloud, VnfRule

# Steps in which a node holds one of the campaign's `max_parallel` slots.
IN_CYCLE_STEPS = frozenset(
    {
        NodeStep.CLAIMING,
        NodeStep.NOTIFYING,
        NodeStep.MIGRATING,
        NodeStep.UPGRADING,
        NodeStep.RELEASING,
    }
)


class CampaignStatus(StrEnum):
    RUNNING = "running"
    # The operator paused it: no node starts; nodes in their cycle go on.
    PAUSED = "paused"
    # A node's VNFM timed out under policy `abort`: no node starts any more, unstarted nodes are
    # released, and the campaign fails once no node is left in its cycle.
    ABORTING = "aborting"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def ended(self) -> bool:
        return self in (CampaignStatus.COMPLETED, CampaignStatus.FAILED, CampaignStatus.REJECTED)


class Sent(ValueModel):
    """The command a waiting step has in flight: enough to rebuild it identically."""

    attempt: int = Field(default=1, ge=1)
    at: AwareDatetime = Field(description="occurred_at of the command.")
    cause: uuid.UUID | None = Field(default=None, description="causation_id of the command.")
    deadline: AwareDatetime = Field(description="When the step is re-sent or given up.")


class PendingMigration(ValueModel):
    """A VM of the node whose migration is requested and not yet confirmed."""

    vm_id: VmId
    sent: Sent
    # Destinations that failed for this VM in this cycle: a retry asks the Cloud Manager to
    # place it elsewhere.
    avoid: tuple[NodeId, ...] = ()
    # The planner's destination for the first attempt (None: the Cloud Manager places it).
    destination: NodeId | None = None


class NodeRecord(ValueModel):
    """One node's place in its upgrade cycle."""

    node_id: NodeId
    step: NodeStep = NodeStep.PENDING
    detail: str = ""
    # The in-flight command of CLAIMING, NOTIFYING, UPGRADING or RELEASING (MIGRATING keeps one
    # per VM in `migrations`). For NOTIFYING its deadline is the backstop, not the VNFM deadline.
    sent: Sent | None = None
    # The VMs reported when maintenance took effect (None until then), incoming ones included.
    vms: tuple[VmOnNode, ...] | None = None
    # The deadline given to the VNFM adapter, kept to rebuild the request identically.
    vnfm_deadline: AwareDatetime | None = None
    migrations: tuple[PendingMigration, ...] = ()
    upgrade_percent: float | None = None
    # What the node becomes once maintenance is released: DONE, SKIPPED or FAILED, or PENDING
    # again when a VNFM refused and the node is deferred.
    outcome: NodeStep | None = None
    outcome_detail: str = ""
    # Times a VNFM refusal sent the node back to PENDING; also the cycle's round, which every
    # command id of the node carries (0: ids as before deferrals existed).
    deferrals: int = Field(default=0, ge=0)
    # A deferred node is not started again before this.
    retry_at: AwareDatetime | None = None
    # When the node last left maintenance: its VNFs wait min_recovery_s from then.
    released_at: AwareDatetime | None = None
    # UPGRADING, but the campaign was aborted with rollback: `sent` is the rollback request.
    rolling_back: bool = False

    @property
    def in_cycle(self) -> bool:
        return self.step in IN_CYCLE_STEPS

    def waiting_to_retry(self, now: datetime) -> bool:
        """A deferred PENDING node whose retry time has not come yet."""
        return self.step is NodeStep.PENDING and self.retry_at is not None and now < self.retry_at

    @property
    def deadline(self) -> datetime | None:
        """The earliest moment a Tick has something to do for this node."""
        deadlines = [m.sent.deadline for m in self.migrations]
        if self.sent is not None:
            deadlines.append(self.sent.deadline)
        return min(deadlines, default=None)

    @property
    def vnf_ids(self) -> tuple[str, ...]:
        """VNFs with a VM on the node, in first-seen order."""
        return tuple(dict.fromkeys(vm.vnf_id for vm in self.vms or () if vm.vnf_id is not None))


class CampaignPlan(ValueModel):
    """A campaign's request as decided: written once, never changed afterwards."""

    campaign_id: CampaignId
    request_id: uuid.UUID = Field(description="event_id of the accepted (or rejected) request.")
    request_fingerprint: str = Field(description="Digest of manifest, nodes and policy.")
    correlation_id: uuid.UUID
    manifest: VersionManifest | None = None
    policy: CampaignPolicy = Field(default_factory=CampaignPolicy)
    node_order: tuple[NodeId, ...] = ()

    @property
    def target_version(self) -> str:
        return self.manifest.version if self.manifest is not None else ""


class Release(ValueModel):
    """A node of the campaign that left maintenance, and when."""

    node_id: NodeId
    at: AwareDatetime


class CampaignRecord(ValueModel):
    """A campaign's status and counters: small, rewritten as nodes start and finish."""

    campaign_id: CampaignId
    status: CampaignStatus
    # Nodes holding a slot, in the order they were selected; Ticks only look at these.
    active: tuple[NodeId, ...] = ()
    # Index in the plan's node_order before which no node is PENDING any more (selection
    # starts there).
    scan_from: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    reason: str = ""
    # Later requests refused for reusing this campaign id (bounded), so redeliveries are ignored.
    refused_requests: tuple[uuid.UUID, ...] = ()
    # Nodes that ever started a cycle (the first `canary_nodes` of them are the canary).
    started: int = Field(default=0, ge=0)
    # When the canary batch had wholly finished.
    canary_finished_at: AwareDatetime | None = None
    # Releases recent enough that their VNFs may still be recovering (pruned as time passes).
    recent_releases: tuple[Release, ...] = ()
    # Why the PENDING nodes wait, as the planner last found (a summary for `escalator status`).
    waiting: str = ""
    # Since when no node has been in its cycle while no pending node could start, with no timed
    # wait to end (None: not stalled). The campaign fails after policy.stall_timeout_s of it.
    stalled_since: AwareDatetime | None = None
    # Set by an operator's abort: what happens to nodes upgrading ("finish" or "rollback").
    abort_upgrading: str | None = None
    # Operator control requests already applied (bounded), so that redeliveries change nothing.
    controls_seen: tuple[uuid.UUID, ...] = ()
    # Times a retried node re-opened the campaign after it ended; part of the end events' ids.
    reopened: int = Field(default=0, ge=0)

    @property
    def finished(self) -> int:
        return self.done + self.skipped + self.failed


@dataclass(frozen=True)
class CampaignState:
    """A campaign as the core sees it: its plan, its status record and one record per node."""

    plan: CampaignPlan
    campaign: CampaignRecord
    nodes: Mapping[str, NodeRecord] = field(default_factory=dict)


def rebuild(
    plan: CampaignPlan, campaign: CampaignRecord, nodes: Mapping[str, NodeRecord]
) -> CampaignState:
    """A campaign from persisted records that may not all come from the same decision.

    A node of the plan without a record is PENDING. What the status record repeats about the
    nodes (the nodes holding a slot, the counters, where selection starts) is derived again from
    the node records, which are the truth for each node; status, reason and refused requests are
    kept as persisted. Returns the records as given when they already agree.
    """
    if campaign.status.ended or not plan.node_order:
        return CampaignState(plan, campaign, dict(nodes))
    full = {n: nodes.get(n) or NodeRecord(node_id=n) for n in plan.node_order}
    in_cycle = {node_id for node_id, record in full.items() if record.in_cycle}
    active = tuple(n for n in campaign.active if n in in_cycle)
    active += tuple(n for n in plan.node_order if n in in_cycle and n not in active)
    steps = [record.step for record in full.values()]
    scan_from = next(
        (i for i, node_id in enumerate(plan.node_order) if full[node_id].step is NodeStep.PENDING),
        len(plan.node_order),
    )
    derived = campaign.model_copy(
        update={
            "active": active,
            "done": steps.count(NodeStep.DONE),
            "skipped": steps.count(NodeStep.SKIPPED),
            "failed": steps.count(NodeStep.FAILED),
            "scan_from": min(campaign.scan_from, scan_from),
            "started": max(campaign.started, len(active)),
        }
    )
    return CampaignState(plan, campaign if derived == campaign else derived, full)


@dataclass(frozen=True)
class AgentStatus:
    """What the latest heartbeat of a node agent says."""

    last_seen: datetime
    installed_version: str
    interval_s: float

    @classmethod
    def from_heartbeat(cls, heartbeat: NodeAgentHeartbeat) -> AgentStatus:
        return cls(heartbeat.occurred_at, heartbeat.installed_version, heartbeat.interval_s)

    def is_live(self, now: datetime, liveness_s: float) -> bool:
        return now - self.last_seen <= timedelta(seconds=liveness_s)


@dataclass(frozen=True)
class Context:
    """Everything outside the campaign that a decision may read; the core reads no clock."""

    now: datetime
    agents: Mapping[str, AgentStatus] = field(default_factory=dict)
    # The inventory and VNF rules for the batch planner. None turns the planner off: nodes then
    # start in the campaign's order, up to max_parallel, and only the VNFM adapter's budget hold
    # keeps VNFs safe (core unit tests use it; the service always passes a Cloud).
    cloud: Cloud | None = None
    rules: Mapping[str, VnfRule] = field(default_factory=dict)
    # The longest min_recovery_s of any VNF: how long a release is remembered.
    max_recovery_s: float = 0.0
    # Node -> the running campaign that holds it (every instance's campaigns).
    claims: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Tick:
    """Time passed: check deadlines and free slots (the time itself is `Context.now`)."""


Input = Event | Tick


@dataclass(frozen=True)
class Decision:
    """The next state, the commands to publish, and which records to persist."""

    state: CampaignState | None
    commands: tuple[Event, ...] = ()
    changed_nodes: frozenset[str] = frozenset()
    campaign_changed: bool = False
    # True only for the decision that created the campaign (the plan is never rewritten).
    plan_changed: bool = False
