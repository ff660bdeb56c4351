"""Every event of the Escalator contract.

Facts are named in the past tense; requests end in `Requested`. Which topic carries which event,
and with which key, is in `schemas.topics`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, Self

from pydantic import AwareDatetime, Field, model_validator

from schemas.envelope import Event, type_field
from schemas.types import (
    AffectedVnf,
    MaintenanceAction,
    NodeId,
    RedundancyModel,
    ValueModel,
    Version,
    VersionManifest,
    VmBusinessOutcome,
    VmId,
    VmOnNode,
    VmRef,
    VnfId,
    VnfmId,
    VnfmRefusal,
    VnfmTimeoutPolicy,
)

_NODE = Field(description="Compute node id.", examples=["compute-0-07"])
_ATTEMPT = Field(
    default=1, ge=1, le=1000, description="Attempt number of this step for the node.", examples=[1]
)
_DEADLINE_EXAMPLE = datetime(2026, 11, 26, 4, 1, tzinfo=UTC)


# --- operator and campaign lifecycle -------------------------------------------------------


class CampaignPolicy(ValueModel):
    """How the operator wants the campaign run."""

    max_parallel: int = Field(
        default=1, ge=1, le=10_000, description="Nodes in their cycle at once.", examples=[1]
    )
    vnfm_timeout_s: float = Field(
        default=40.0,
        gt=0,
        le=48 * 3600,
        description="How long the VNFM has to move business before the timeout policy applies.",
        examples=[40.0],
    )
    on_vnfm_timeout: VnfmTimeoutPolicy = Field(
        default=VnfmTimeoutPolicy.MIGRATE,
        description="What happens to a node whose VNFM did not answer in time.",
        examples=[VnfmTimeoutPolicy.MIGRATE],
    )
    migrate_moved_vms: bool = Field(
        default=False,
        description="Also migrate VMs whose business already moved (by default they stay put).",
        examples=[False],
    )
    step_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=48 * 3600,
        description="Deadline for each cloud step (maintenance on or off, one VM migration).",
        examples=[600.0],
    )
    upgrade_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        le=48 * 3600,
        description="Deadline for a node agent to report the upgrade's result.",
        examples=[3600.0],
    )
    agent_liveness_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A node agent is live if its last heartbeat is younger than this.",
        examples=[30.0],
    )
    max_step_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Times a step is re-sent after its deadline before the node fails.",
        examples=[3],
    )
    max_deferrals: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Times a VNFM-refused node is retried later; then on_vnfm_timeout applies.",
        examples=[3],
    )
    deferral_s: float = Field(
        default=60.0,
        ge=0,
        le=24 * 3600,
        description="Minimum wait before a deferred node is tried again.",
        examples=[60.0],
    )
    vnfm_extension_max_s: float = Field(
        default=60.0,
        gt=0,
        le=24 * 3600,
        description="Most one MaintenanceDeadlineExtended heartbeat may extend a notice by.",
        examples=[60.0],
    )
    vnfm_hard_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        le=48 * 3600,
        description="No heartbeat extends a notice beyond its send time plus this.",
        examples=[3600.0],
    )
    max_per_failure_domain: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Nodes of one failure domain in their cycle at once (null: no limit).",
        examples=[2],
    )
    canary_nodes: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Size of the first batch; no other node starts until it has finished and "
        "baked (0: no canary).",
        examples=[1],
    )
    canary_bake_s: float = Field(
        default=0.0,
        ge=0,
        le=7 * 24 * 3600,
        description="Seconds to wait after the canary batch before the next node starts.",
        examples=[300.0],
    )
    window_start: AwareDatetime | None = Field(
        default=None,
        description="No node starts before this time (null: no lower bound).",
        examples=["2026-11-27T01:00:00Z"],
    )
    window_end: AwareDatetime | None = Field(
        default=None,
        description="No node starts at or after this time; nodes under way finish "
        "(null: no upper bound).",
        examples=["2026-11-27T05:00:00Z"],
    )
    failure_budget: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Failed nodes that halt the campaign: no new node starts once this many "
        "have failed (null: never halt).",
        examples=[2],
    )
    stall_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Seconds the campaign may sit with no node in its cycle and no pending node "
        "able to start (no room for its VMs, a VNF impacted outside the campaign, agents "
        "silent) before it fails with what blocks the nodes. Timed waits (recovery, canary "
        "bake, the window's opening, a deferral) are not a stall.",
        examples=[1800.0],
    )
    keep_order: bool = Field(
        default=False,
        description="Consider nodes in the order the request lists them. False: the planner "
        "considers the most constrained nodes first, which shortens the campaign. Either way a "
        "blocked node never holds back the nodes behind it.",
        examples=[False],
    )

    @model_validator(mode="after")
    def _window_ordered(self) -> Self:
        if (
            self.window_start is not None
            and self.window_end is not None
            and self.window_end <= self.window_start
        ):
            raise ValueError("window_end must be later than window_start")
        return self


class UpgradeRequested(Event):
    """The operator added a new version and asks for compute nodes to be upgraded to it."""

    event_type: Literal["UpgradeRequested"] = type_field("UpgradeRequested")
    manifest: VersionManifest = Field(
        description="The new version's files, with digests and locations.",
        examples=[
            {
                "version": "29.1.0",
                "files": [
                    {
                        "name": "nova-compute-29.1.0.rpm",
                        "sha256": "9f86d081884c7d659a2feaa0c55ad015"
                        "a3bf4f1b2b0b822cd15d6c15b0f00a08",
                        "uri": "https://repo.example.net/29.1.0/nova-compute-29.1.0.rpm",
                    }
                ],
            }
        ],
    )
    nodes: tuple[NodeId, ...] | None = Field(
        default=None,
        max_length=100_000,
        description="Nodes to upgrade; null means every compute node. The planner orders "
        "them unless policy.keep_order is set.",
        examples=[["compute-0-01", "compute-0-02"]],
    )
    policy: CampaignPolicy = Field(
        default_factory=CampaignPolicy,
        description="How to run the campaign.",
        examples=[{"max_parallel": 1, "vnfm_timeout_s": 40.0}],
    )
    requested_by: str = Field(
        default="operator",
        max_length=200,
        description="Who asked (user name or automation).",
        examples=["alice@noc"],
    )

    @model_validator(mode="after")
    def _nodes_unique(self) -> Self:
        if self.nodes is not None and len(set(self.nodes)) != len(self.nodes):
            raise ValueError("nodes must not repeat")
        return self


class CampaignStarted(Event):
    """The Upgrade Manager accepted a campaign and fixed its node list."""

    event_type: Literal["CampaignStarted"] = type_field("CampaignStarted")
    target_version: Version = Field(description="Version being rolled out.", examples=["29.1.0"])
    nodes: tuple[NodeId, ...] = Field(
        description="Nodes in the campaign, in the order they will be considered.",
        examples=[["compute-0-01", "compute-0-02"]],
    )


class CampaignRejected(Event):
    """The Upgrade Manager refused an `UpgradeRequested`; nothing was touched."""

    event_type: Literal["CampaignRejected"] = type_field("CampaignRejected")
    reason: str = Field(description="Why it was refused.", examples=["campaign id already used"])


class CampaignCompleted(Event):
    """Every node of the campaign reached an end state."""

    event_type: Literal["CampaignCompleted"] = type_field("CampaignCompleted")
    upgraded: int = Field(ge=0, description="Nodes upgraded.", examples=[12])
    skipped: int = Field(ge=0, description="Nodes skipped (refused or by policy).", examples=[0])
    failed: int = Field(ge=0, description="Nodes whose cycle failed.", examples=[0])


class CampaignFailed(Event):
    """The campaign stopped before its end; no new node will start."""

    event_type: Literal["CampaignFailed"] = type_field("CampaignFailed")
    reason: str = Field(
        description="Why the campaign stopped.", examples=["VNFM timeout with policy abort"]
    )
    upgraded: int = Field(ge=0, description="Nodes upgraded before it stopped.", examples=[3])
    failed: int = Field(ge=0, description="Nodes whose cycle failed.", examples=[1])


class OnAbortUpgrading(StrEnum):
    """What an operator's abort does to nodes whose upgrade is under way."""

    FINISH = "finish"
    ROLLBACK = "rollback"


class CampaignPauseRequested(Event):
    """The operator asks that no new node start; nodes in their cycle finish."""

    event_type: Literal["CampaignPauseRequested"] = type_field("CampaignPauseRequested")
    requested_by: str = Field(
        default="", max_length=200, description="Who asked.", examples=["ops@example.net"]
    )
    reason: str = Field(
        default="", max_length=2000, description="Why, for the record.", examples=["peak hour"]
    )


class CampaignResumeRequested(Event):
    """The operator asks a paused campaign to start nodes again."""

    event_type: Literal["CampaignResumeRequested"] = type_field("CampaignResumeRequested")
    requested_by: str = Field(
        default="", max_length=200, description="Who asked.", examples=["ops@example.net"]
    )


class CampaignAbortRequested(Event):
    """The operator stops the campaign for good.

    Nodes in maintenance but not yet upgrading return to service untouched; nodes upgrading
    finish, or are rolled back, as `upgrading` says. No node starts any more.
    """

    event_type: Literal["CampaignAbortRequested"] = type_field("CampaignAbortRequested")
    upgrading: OnAbortUpgrading = Field(
        default=OnAbortUpgrading.FINISH,
        description="What happens to nodes whose upgrade is under way.",
        examples=[OnAbortUpgrading.ROLLBACK],
    )
    requested_by: str = Field(
        default="", max_length=200, description="Who asked.", examples=["ops@example.net"]
    )
    reason: str = Field(
        default="", max_length=2000, description="Why, for the record.", examples=["bad build"]
    )


class NodeRetryRequested(Event):
    """The operator re-admits a quarantined (failed) or deferred node into its campaign."""

    event_type: Literal["NodeRetryRequested"] = type_field("NodeRetryRequested")
    node_id: NodeId = Field(description="Node to re-admit.", examples=["compute-0-07"])
    requested_by: str = Field(
        default="", max_length=200, description="Who asked.", examples=["ops@example.net"]
    )


class CampaignPaused(Event):
    """The campaign starts no new node until resumed."""

    event_type: Literal["CampaignPaused"] = type_field("CampaignPaused")
    reason: str = Field(default="", description="The operator's reason.", examples=["peak hour"])


class CampaignAbortStarted(Event):
    """An operator's abort is under way: no node starts; the campaign fails once drained."""

    event_type: Literal["CampaignAbortStarted"] = type_field("CampaignAbortStarted")
    reason: str = Field(
        description="The abort's reason, as the campaign will end with.",
        examples=["aborted by the operator: bad build (upgrading nodes: finish)"],
    )
    upgrading: OnAbortUpgrading = Field(
        description="What happens to the nodes upgrading now.", examples=[OnAbortUpgrading.FINISH]
    )


class CampaignResumed(Event):
    """A paused campaign starts nodes again."""

    event_type: Literal["CampaignResumed"] = type_field("CampaignResumed")


class OperatorRequestRejected(Event):
    """An operator's control request could not be applied; nothing changed."""

    event_type: Literal["OperatorRequestRejected"] = type_field("OperatorRequestRejected")
    request_type: str = Field(
        description="event_type of the rejected request.", examples=["NodeRetryRequested"]
    )
    reason: str = Field(
        description="Why it was rejected.", examples=["compute-0-07 is done, not failed"]
    )


class NodeStep(StrEnum):
    """The steps of one node's upgrade cycle, in order."""

    PENDING = "pending"
    CLAIMING = "claiming"
    NOTIFYING = "notifying"
    MIGRATING = "migrating"
    UPGRADING = "upgrading"
    RELEASING = "releasing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (NodeStep.DONE, NodeStep.SKIPPED, NodeStep.FAILED)


class NodeCycleAdvanced(Event):
    """A node moved to another step of its cycle; what `status` and `watch` show."""

    event_type: Literal["NodeCycleAdvanced"] = type_field("NodeCycleAdvanced")
    node_id: NodeId = _NODE
    step: NodeStep = Field(
        description="The step the node is now in.", examples=[NodeStep.NOTIFYING]
    )
    detail: str = Field(
        default="",
        max_length=2000,
        description="Why, or what the node waits for.",
        examples=["waiting for VNFM vnfm-a until 04:01:40Z"],
    )


# --- Cloud Manager --------------------------------------------------------------------------


class NodeMaintenanceRequested(Event):
    """Put the node in maintenance: no VM may be created on or migrated to it any more."""

    event_type: Literal["NodeMaintenanceRequested"] = type_field("NodeMaintenanceRequested")
    node_id: NodeId = _NODE
    holder: str = Field(
        min_length=1,
        max_length=200,
        description="Who claims the node; a node held by someone else is refused.",
        examples=["cmp-29-1-0-a1b2c3"],
    )
    attempt: int = _ATTEMPT


class NodeMaintenanceEntered(Event):
    """The node is in maintenance; the VM list was taken after that took effect."""

    event_type: Literal["NodeMaintenanceEntered"] = type_field("NodeMaintenanceEntered")
    node_id: NodeId = _NODE
    vms: tuple[VmOnNode, ...] = Field(
        description="VMs on the node, plus migrations already under way toward it.",
        examples=[[{"vm_id": "vm-0007", "vnf_id": "vnf-epc-1", "vcpus": 4, "ram_mb": 8192}]],
    )
    prior_status: str = Field(
        description="Scheduling status before maintenance; restored on exit.",
        examples=["enabled"],
    )


class NodeMaintenanceRefused(Event):
    """The node could not be claimed, for example it is already in maintenance."""

    event_type: Literal["NodeMaintenanceRefused"] = type_field("NodeMaintenanceRefused")
    node_id: NodeId = _NODE
    reason: str = Field(
        description="Why the claim was refused.",
        examples=["node already in maintenance, held by admin"],
    )
    current_holder: str | None = Field(
        default=None, description="Who holds the node now, if known.", examples=["admin"]
    )


class VmMigrationRequested(Event):
    """Migrate a VM off a node in maintenance to a node with capacity."""

    event_type: Literal["VmMigrationRequested"] = type_field("VmMigrationRequested")
    vm_id: VmId = Field(description="VM to migrate.", examples=["vm-0007"])
    node_id: NodeId = Field(
        description="Node in maintenance that the VM leaves.", examples=["compute-0-07"]
    )
    destination_node_id: NodeId | None = Field(
        default=None,
        description="Preferred destination; null lets the Cloud Manager place it.",
        examples=[None],
    )
    avoid_destinations: tuple[NodeId, ...] = Field(
        default=(),
        description="Destinations that failed for this VM in earlier attempts; the Cloud "
        "Manager places it elsewhere.",
        examples=[["compute-1-02"]],
    )
    attempt: int = _ATTEMPT


class VmMigrated(Event):
    """A VM finished migrating."""

    event_type: Literal["VmMigrated"] = type_field("VmMigrated")
    vm_id: VmId = Field(description="VM that moved.", examples=["vm-0007"])
    node_id: NodeId = Field(description="Node in maintenance it left.", examples=["compute-0-07"])
    destination_node_id: NodeId = Field(description="Node it is on now.", examples=["compute-1-02"])


class VmMigrationFailed(Event):
    """A VM could not be migrated."""

    event_type: Literal["VmMigrationFailed"] = type_field("VmMigrationFailed")
    vm_id: VmId = Field(description="VM that did not move.", examples=["vm-0007"])
    node_id: NodeId = Field(description="Node it is still on.", examples=["compute-0-07"])
    reason: str = Field(
        description="Why.", examples=["no node with 4 vCPUs free outside server group sg-1"]
    )
    destination_node_id: NodeId | None = Field(
        default=None,
        description="The destination that was tried, if one was chosen; a retry avoids it.",
        examples=["compute-1-02"],
    )


class NodeMaintenanceExitRequested(Event):
    """Take the node out of maintenance, restoring its prior scheduling status."""

    event_type: Literal["NodeMaintenanceExitRequested"] = type_field("NodeMaintenanceExitRequested")
    node_id: NodeId = _NODE
    holder: str = Field(
        min_length=1,
        max_length=200,
        description="The claim being released; only its holder may release it.",
        examples=["cmp-29-1-0-a1b2c3"],
    )
    attempt: int = _ATTEMPT


class NodeMaintenanceExited(Event):
    """The node left maintenance."""

    event_type: Literal["NodeMaintenanceExited"] = type_field("NodeMaintenanceExited")
    node_id: NodeId = _NODE
    restored_status: str = Field(
        description="Scheduling status the node is back in.", examples=["enabled"]
    )


class VmListRequested(Event):
    """Ask the Cloud Manager which VMs run on a node (no maintenance implied)."""

    event_type: Literal["VmListRequested"] = type_field("VmListRequested")
    node_id: NodeId = _NODE


class VmListReported(Event):
    """The VMs on a node at the time of asking."""

    event_type: Literal["VmListReported"] = type_field("VmListReported")
    node_id: NodeId = _NODE
    vms: tuple[VmOnNode, ...] = Field(
        description="VMs on the node, plus migrations under way toward it.",
        examples=[[{"vm_id": "vm-0007", "vnf_id": "vnf-epc-1", "vcpus": 4, "ram_mb": 8192}]],
    )


# --- VNFM (internal side: Upgrade Manager <-> VNFM adapter) --------------------------------


class BusinessMoveRequested(Event):
    """Ask the VNFMs of the VMs on a node in maintenance to move their business off it."""

    event_type: Literal["BusinessMoveRequested"] = type_field("BusinessMoveRequested")
    node_id: NodeId = _NODE
    vms: tuple[VmRef, ...] = Field(
        description="VMs on the node, with their VNF.",
        examples=[[{"vm_id": "vm-0007", "vnf_id": "vnf-epc-1"}]],
    )
    deadline: AwareDatetime = Field(
        description="When the adapter stops waiting and reports what it has.",
        examples=[_DEADLINE_EXAMPLE],
    )
    attempt: int = _ATTEMPT
    extension_max_s: float = Field(
        default=60.0,
        gt=0,
        description="Most one VNFM heartbeat may extend the deadline by.",
        examples=[60.0],
    )
    hard_deadline: AwareDatetime | None = Field(
        default=None,
        description="No heartbeat extends the deadline beyond this; null: no extensions.",
        examples=[_DEADLINE_EXAMPLE],
    )


class BusinessMoved(Event):
    """The collected outcome for one node: per VM, whether and how its business moved."""

    event_type: Literal["BusinessMoved"] = type_field("BusinessMoved")
    node_id: NodeId = _NODE
    request_id: uuid.UUID | None = Field(
        default=None,
        description=(
            "event_id of the BusinessMoveRequested this answers. causation_id names what "
            "completed the answer: the last VNFM reply, or the request itself when no VNFM was "
            "asked or a deadline closed it. Absent from older producers, whose causation_id "
            "always named the request."
        ),
        examples=["6f1c2a4e-9b0d-4c1e-8a57-3d2f1e0b9c48"],
    )
    outcomes: tuple[VmBusinessOutcome, ...] = Field(
        description="One outcome per VM of the request.",
        examples=[[{"vm_id": "vm-0007", "vnf_id": "vnf-epc-1", "outcome": "switched_over"}]],
    )
    timed_out: bool = Field(
        default=False,
        description="True if at least one VNFM did not answer before the deadline.",
        examples=[False],
    )
    refusals: tuple[VnfmRefusal, ...] = Field(
        default=(),
        description="VNFMs that refused to move business now; the node is deferred.",
        examples=[[{"vnfm_id": "vnfm-a", "vnf_ids": ["vnf-epc-1"], "reason": "peak hour"}]],
    )


class BusinessMoveDeadlineExtended(Event):
    """The adapter moved a node's VNFM deadline (a VNFM heartbeat, or a wait for recovery)."""

    event_type: Literal["BusinessMoveDeadlineExtended"] = type_field("BusinessMoveDeadlineExtended")
    node_id: NodeId = _NODE
    deadline: AwareDatetime = Field(
        description="The node's new VNFM deadline.", examples=[_DEADLINE_EXAMPLE]
    )
    reason: str = Field(
        max_length=2000,
        description="Why it moved.",
        examples=["vnfm-a: standby resync in progress"],
    )


class NodeAvailable(Event):
    """The node is back in service after its upgrade; VNFMs may use it again."""

    event_type: Literal["NodeAvailable"] = type_field("NodeAvailable")
    node_id: NodeId = _NODE
    vnfm_id: VnfmId | None = Field(
        default=None,
        description="Recipient VNFM on the vendor topic; null on the internal topic.",
        examples=["vnfm-a"],
    )
    vnf_ids: tuple[VnfId, ...] = Field(
        default=(),
        description="VNFs that were on the node when it was notified.",
        examples=[["vnf-epc-1"]],
    )


# --- VNFM (vendor-facing side) -------------------------------------------------------------


class VnfMaintenanceNotified(Event):
    """Notice to one VNFM: these VNFs have VMs on a node going into maintenance."""

    event_type: Literal["VnfMaintenanceNotified"] = type_field("VnfMaintenanceNotified")
    notice_id: str = Field(
        min_length=1, max_length=200, description="Id to quote in the reply.", examples=["n-4f1c"]
    )
    vnfm_id: VnfmId = Field(description="The VNFM this notice is for.", examples=["vnfm-a"])
    node_id: NodeId = _NODE
    vnfs: tuple[AffectedVnf, ...] = Field(
        min_length=1,
        description="Affected VNFs and their VMs on the node.",
        examples=[[{"vnf_id": "vnf-epc-1", "vm_ids": ["vm-0007"]}]],
    )
    allowed_actions: tuple[MaintenanceAction, ...] = Field(
        min_length=1,
        description="What the VNFM may do with each VM's business.",
        examples=[["switch_over", "drain", "own_action", "migrate"]],
    )
    reply_deadline: AwareDatetime = Field(
        description="Reply before this time; later replies are rejected.",
        examples=[_DEADLINE_EXAMPLE],
    )


class VnfBusinessMoved(Event):
    """A VNFM's reply to a notice: what it did with each VM's business."""

    event_type: Literal["VnfBusinessMoved"] = type_field("VnfBusinessMoved")
    notice_id: str = Field(
        min_length=1, max_length=200, description="Notice being answered.", examples=["n-4f1c"]
    )
    vnfm_id: VnfmId = Field(description="The replying VNFM.", examples=["vnfm-a"])
    outcomes: tuple[VmBusinessOutcome, ...] = Field(
        description="Per VM of the notice, what was done.",
        examples=[[{"vm_id": "vm-0007", "vnf_id": "vnf-epc-1", "outcome": "switched_over"}]],
    )


class BusinessMoveRefused(Event):
    """A VNFM's reply to a notice: it cannot move the business now; the node is deferred."""

    event_type: Literal["BusinessMoveRefused"] = type_field("BusinessMoveRefused")
    notice_id: str = Field(
        min_length=1, max_length=200, description="Notice being answered.", examples=["n-4f1c"]
    )
    vnfm_id: VnfmId = Field(description="The refusing VNFM.", examples=["vnfm-a"])
    reason: str = Field(
        min_length=1,
        max_length=2000,
        description="Why, for the operator.",
        examples=["vnf-epc-1 is handling a surge; standby not ready"],
    )


class MaintenanceDeadlineExtended(Event):
    """A VNFM heartbeat: it is still moving the business and needs more time."""

    event_type: Literal["MaintenanceDeadlineExtended"] = type_field("MaintenanceDeadlineExtended")
    notice_id: str = Field(
        min_length=1, max_length=200, description="Notice being extended.", examples=["n-4f1c"]
    )
    vnfm_id: VnfmId = Field(description="The VNFM asking.", examples=["vnfm-a"])
    extend_by_s: float = Field(
        gt=0,
        le=24 * 3600,
        description="Seconds wanted from now; capped per heartbeat and overall by the VIM.",
        examples=[30.0],
    )
    reason: str = Field(
        default="", max_length=2000, description="What it is doing.", examples=["draining"]
    )


class VnfRecovered(Event):
    """A VNFM says its VNF has restored redundancy after an impact (e.g. standby resynced)."""

    event_type: Literal["VnfRecovered"] = type_field("VnfRecovered")
    vnfm_id: VnfmId = Field(description="The VNFM of the VNF.", examples=["vnfm-a"])
    vnf_id: VnfId = Field(description="The recovered VNF.", examples=["vnf-epc-1"])


class VnfmReplyRejected(Event):
    """Told to a VNFM: its reply was not accepted, and why; the campaign is unaffected."""

    event_type: Literal["VnfmReplyRejected"] = type_field("VnfmReplyRejected")
    vnfm_id: VnfmId = Field(description="The VNFM whose reply is rejected.", examples=["vnfm-a"])
    notice_id: str | None = Field(
        default=None, max_length=200, description="The notice it named.", examples=["n-4f1c"]
    )
    rejected_event_id: uuid.UUID = Field(
        description="event_id of the rejected reply.",
        examples=[uuid.UUID("0b7e5c3a-8f0e-4a53-9a65-0e3a4c1d2b11")],
    )
    reason: str = Field(
        description="Machine-readable reason.",
        examples=["late", "unknown_notice", "foreign_vm", "foreign_vnf", "wrong_vnfm"],
    )
    detail: str = Field(
        default="",
        max_length=2000,
        description="Human-readable explanation.",
        examples=["reply at 04:02:10Z after the deadline 04:02:00Z"],
    )


class NoticeExpired(Event):
    """Told to a VNFM: its notice passed its deadline without a reply; the VIM takes over."""

    event_type: Literal["NoticeExpired"] = type_field("NoticeExpired")
    notice_id: str = Field(
        min_length=1, max_length=200, description="The expired notice.", examples=["n-4f1c"]
    )
    vnfm_id: VnfmId = Field(description="Recipient VNFM.", examples=["vnfm-a"])
    node_id: NodeId = _NODE


class NoticeCancelled(Event):
    """Told to a VNFM: its notice no longer stands (for example, the campaign was aborted)."""

    event_type: Literal["NoticeCancelled"] = type_field("NoticeCancelled")
    notice_id: str = Field(
        min_length=1, max_length=200, description="The cancelled notice.", examples=["n-4f1c"]
    )
    vnfm_id: VnfmId = Field(description="Recipient VNFM.", examples=["vnfm-a"])
    node_id: NodeId = _NODE
    reason: str = Field(description="Why.", examples=["campaign aborted by operator"])


# --- node agents ----------------------------------------------------------------------------


class NodeUpgradeRequested(Event):
    """Upgrade this node to the target version."""

    event_type: Literal["NodeUpgradeRequested"] = type_field("NodeUpgradeRequested")
    node_id: NodeId = _NODE
    manifest: VersionManifest = Field(
        description="Version to install.",
        examples=[
            {
                "version": "29.1.0",
                "files": [
                    {
                        "name": "nova-compute-29.1.0.rpm",
                        "sha256": "9f86d081884c7d659a2feaa0c55ad015"
                        "a3bf4f1b2b0b822cd15d6c15b0f00a08",
                        "uri": "https://repo.example.net/29.1.0/nova-compute-29.1.0.rpm",
                    }
                ],
            }
        ],
    )
    attempt: int = _ATTEMPT


class NodeUpgradeAccepted(Event):
    """The node agent recorded the request and will apply it."""

    event_type: Literal["NodeUpgradeAccepted"] = type_field("NodeUpgradeAccepted")
    node_id: NodeId = _NODE
    target_version: Version = Field(description="Version it will install.", examples=["29.1.0"])


class NodeUpgradeProgressed(Event):
    """Progress of an upgrade on a node."""

    event_type: Literal["NodeUpgradeProgressed"] = type_field("NodeUpgradeProgressed")
    node_id: NodeId = _NODE
    phase: str = Field(
        max_length=100, description="What the agent is doing.", examples=["rebooting"]
    )
    percent: float = Field(ge=0, le=100, description="Rough completion.", examples=[60.0])


class NodeUpgraded(Event):
    """The node runs the target version."""

    event_type: Literal["NodeUpgraded"] = type_field("NodeUpgraded")
    node_id: NodeId = _NODE
    version: Version = Field(description="Version now installed.", examples=["29.1.0"])
    applied: bool = Field(
        default=True,
        description="False when the node already had the version and nothing was applied.",
        examples=[True],
    )


class NodeUpgradeFailed(Event):
    """The upgrade of a node failed."""

    event_type: Literal["NodeUpgradeFailed"] = type_field("NodeUpgradeFailed")
    node_id: NodeId = _NODE
    reason: str = Field(description="Why.", examples=["sha256 mismatch for nova-compute.rpm"])
    phase: str = Field(
        default="apply", max_length=100, description="Where it failed.", examples=["fetch"]
    )
    installed_version: Version | None = Field(
        default=None, description="Version the node runs now, if known.", examples=["29.0.3"]
    )
    attempts: int = Field(
        default=1, ge=1, le=100, description="Times the agent tried the upgrade.", examples=[3]
    )
    rolled_back: bool = Field(
        default=False,
        description="The agent rolled the node back to its previous version after the last "
        "failed attempt.",
        examples=[True],
    )
    healthy: bool = Field(
        default=False,
        description="The node passed its health check after the rollback, so it may return to "
        "service; false keeps it quarantined in maintenance.",
        examples=[True],
    )
    untouched: bool = Field(
        default=False,
        description="The agent refused the upgrade before changing anything (for example an "
        "unfit manifest): the node is as it was and may return to service.",
        examples=[False],
    )


class NodeRollbackRequested(Event):
    """Roll this node back to the version it ran before the campaign's upgrade."""

    event_type: Literal["NodeRollbackRequested"] = type_field("NodeRollbackRequested")
    node_id: NodeId = _NODE
    target_version: Version = Field(
        description="The campaign's version, the one to roll back from.", examples=["29.1.0"]
    )
    attempt: int = _ATTEMPT


class NodeRollbackCompleted(Event):
    """The node agent rolled the node back (or found it already on its previous version)."""

    event_type: Literal["NodeRollbackCompleted"] = type_field("NodeRollbackCompleted")
    node_id: NodeId = _NODE
    installed_version: Version = Field(
        description="Version the node runs now.", examples=["29.0.3"]
    )
    healthy: bool = Field(
        description="The node passed its health check and may return to service.",
        examples=[True],
    )
    reason: str = Field(
        default="", max_length=2000, description="Why it is not healthy, if not.", examples=[""]
    )


class NodeAgentHeartbeat(Event):
    """A node agent is alive; published periodically on a compacted topic keyed by node."""

    event_type: Literal["NodeAgentHeartbeat"] = type_field("NodeAgentHeartbeat")
    node_id: NodeId = _NODE
    agent_id: str = Field(
        min_length=1, max_length=200, description="Agent instance.", examples=["agent@compute-0-07"]
    )
    installed_version: Version = Field(
        description="Version the node runs now.", examples=["29.0.3"]
    )
    interval_s: float = Field(
        gt=0, le=3600, description="Seconds until the next heartbeat.", examples=[5.0]
    )
    busy: bool = Field(
        default=False, description="True while an upgrade is being applied.", examples=[False]
    )


class NodeInventoryReported(Event):
    """The Cloud Manager's view of one compute node: capacity, failure domain, VMs, maintenance.

    Published on a compacted topic keyed by node, whenever the node changes and periodically;
    the latest record per node is the inventory the planner works from.
    """

    event_type: Literal["NodeInventoryReported"] = type_field("NodeInventoryReported")
    node_id: NodeId = _NODE
    failure_domain: str = Field(
        min_length=1,
        max_length=200,
        description="Failure domain (availability zone, rack, power feed) of the node.",
        examples=["az-1"],
    )
    vcpus: int = Field(ge=1, description="Schedulable vCPUs of the node.", examples=[64])
    ram_mb: int = Field(ge=1, description="Schedulable RAM of the node, in MiB.", examples=[262144])
    in_maintenance: bool = Field(
        description="The node takes no new VM: held for maintenance or disabled.",
        examples=[False],
    )
    maintenance_holder: str | None = Field(
        default=None,
        max_length=200,
        description="Who holds the node in maintenance, if anyone.",
        examples=[None],
    )
    vms: tuple[VmOnNode, ...] = Field(
        description="VMs on the node, plus migrations under way toward it (incoming).",
        examples=[[{"vm_id": "vm-0007", "vnf_id": "vnf-epc-1", "vcpus": 4, "ram_mb": 8192}]],
    )


# --- VNF registry ---------------------------------------------------------------------------


class VnfProfile(ValueModel):
    """A VNF's maintenance constraints: the single source every service reads."""

    vnf_id: VnfId = Field(description="VNF id.", examples=["vnf-epc-1"])
    vnfm_id: VnfmId = Field(description="VNFM that manages it.", examples=["vnfm-a"])
    redundancy: RedundancyModel = Field(
        description="How the VNF survives losing a member.",
        examples=[RedundancyModel.ACTIVE_STANDBY],
    )
    members: tuple[VmId, ...] = Field(
        min_length=1, description="VMs of the VNF.", examples=[["vm-0007", "vm-0011"]]
    )
    min_in_service: int = Field(
        ge=0, description="Members that must serve at every moment.", examples=[1]
    )
    max_unavailable: int = Field(
        ge=1, description="Members that may be impacted at once.", examples=[1]
    )
    min_recovery_s: float = Field(
        default=0.0,
        ge=0,
        le=7 * 24 * 3600,
        description="Seconds to wait after an impact before the next impact on this VNF "
        "(at most a week).",
        examples=[30.0],
    )
    allowed_actions: tuple[MaintenanceAction, ...] = Field(
        default=(
            MaintenanceAction.SWITCH_OVER,
            MaintenanceAction.DRAIN,
            MaintenanceAction.OWN_ACTION,
            MaintenanceAction.MIGRATE,
        ),
        min_length=1,
        description="Actions the VNF supports, in order of preference.",
        examples=[["switch_over", "migrate"]],
    )
    notification_lead_time_s: float = Field(
        default=0.0,
        ge=0,
        description="Notice the VNFM needs before an impact (ETSI impact_notification_lead_time).",
        examples=[10.0],
    )
    recovery_signal: bool = Field(
        default=False,
        description="The VNFM sends VnfRecovered after an impact; the next impact waits for it "
        "(else for min_recovery_s).",
        examples=[False],
    )
    anti_affinity: bool = Field(
        default=False,
        description="Members must run on distinct nodes: an evacuated member never joins another.",
        examples=[True],
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must not repeat")
        if self.min_in_service > len(self.members):
            raise ValueError("min_in_service exceeds the number of members")
        if self.max_unavailable > len(self.members):
            raise ValueError("max_unavailable exceeds the number of members")
        if self.redundancy is RedundancyModel.ACTIVE_STANDBY and len(self.members) < 2:
            raise ValueError("an active-standby VNF needs at least two members")
        return self


class VnfRegistered(Event):
    """A VNF's profile, created or replaced; the registry topic is compacted by VNF id."""

    event_type: Literal["VnfRegistered"] = type_field("VnfRegistered")
    vnf: VnfProfile = Field(
        description="The VNF's constraints.",
        examples=[
            {
                "vnf_id": "vnf-epc-1",
                "vnfm_id": "vnfm-a",
                "redundancy": "active_standby",
                "members": ["vm-0007", "vm-0011"],
                "min_in_service": 1,
                "max_unavailable": 1,
            }
        ],
    )


ALL_EVENTS: tuple[type[Event], ...] = (
    UpgradeRequested,
    CampaignStarted,
    CampaignRejected,
    CampaignCompleted,
    CampaignFailed,
    CampaignPauseRequested,
    CampaignResumeRequested,
    CampaignAbortRequested,
    NodeRetryRequested,
    CampaignPaused,
    CampaignResumed,
    CampaignAbortStarted,
    OperatorRequestRejected,
    NodeCycleAdvanced,
    NodeMaintenanceRequested,
    NodeMaintenanceEntered,
    NodeMaintenanceRefused,
    VmMigrationRequested,
    VmMigrated,
    VmMigrationFailed,
    NodeMaintenanceExitRequested,
    NodeMaintenanceExited,
    VmListRequested,
    VmListReported,
    BusinessMoveRequested,
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    NodeAvailable,
    VnfMaintenanceNotified,
    VnfBusinessMoved,
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    VnfRecovered,
    VnfmReplyRejected,
    NoticeExpired,
    NoticeCancelled,
    NodeUpgradeRequested,
    NodeUpgradeAccepted,
    NodeUpgradeProgressed,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeRollbackRequested,
    NodeRollbackCompleted,
    NodeAgentHeartbeat,
    NodeInventoryReported,
    VnfRegistered,
)

EVENTS_BY_TYPE: dict[str, type[Event]] = {
    cls.model_fields["event_type"].default: cls for cls in ALL_EVENTS
}
