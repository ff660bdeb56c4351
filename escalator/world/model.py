"""Data model of the simulated cloud: nodes, VMs, VNFs and the interruption log.

These are plain pydantic models holding the physical truth. All behaviour lives in
`engine.py` (state changes) and `monitor.py` (business-continuity observation); the models
only describe shapes, so they can be dumped as-is over the HTTP API and re-validated by the
client.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PowerState = Literal["up", "rebooting"]
ServiceStatus = Literal["enabled", "disabled"]
Redundancy = Literal["active_standby", "load_balanced"]
VmStatus = Literal["active", "migrating"]
SyncState = Literal["in_sync", "resyncing"]
RebootState = Literal["in_progress", "succeeded", "failed"]
InterruptionKind = Literal[
    # active-standby: nobody is designated active
    "no_active_member",
    # active-standby: the active member's VM is down (its node is rebooting)
    "active_member_down",
    # load-balanced: a member that still carries load is down (its share of traffic is lost)
    "loaded_member_down",
    # load-balanced: fewer members carrying load and up than min_in_service
    "below_min_in_service",
    # a VM that belongs to no VNF is down: nobody could have moved its business but the VIM
    "unmanaged_vm_down",
]


class WorldModel(BaseModel):
    # Unknown fields are bugs on the sender's side; fail loudly rather than drop them.
    model_config = ConfigDict(extra="forbid")


class Timings(WorldModel):
    """Nominal durations in seconds, before division by the speed factor."""

    migration_s: float = Field(default=0.5, ge=0)
    reboot_s: float = Field(default=3.0, ge=0)
    resync_s: float = Field(default=2.0, ge=0)


class SavedServiceStatus(WorldModel):
    """What the compute service looked like before a maintenance claim, restored on release."""

    service_status: ServiceStatus
    admin_note: str | None = None


class RebootRecord(WorldModel):
    """The latest reboot (upgrade) of a node; the node agent polls it to learn the outcome."""

    sequence: int
    state: RebootState
    started_at: float
    finishes_at: float
    finished_at: float | None = None
    previous_version: str
    target_version: str | None = None
    will_fail: bool = False


class Node(WorldModel):
    id: str
    vcpus: int = Field(gt=0)
    ram_mb: int = Field(gt=0)
    failure_domain: str
    installed_version: str
    power: PowerState = "up"
    service_status: ServiceStatus = "enabled"
    maintenance_holder: str | None = None
    admin_note: str | None = None
    saved_status: SavedServiceStatus | None = None
    reboot: RebootRecord | None = None
    reboot_count: int = 0
    fail_next_upgrades: int = Field(default=0, ge=0)


class NodeView(Node):
    """A node with its derived capacity figures (VMs placed plus incoming reservations)."""

    used_vcpus: int
    used_ram_mb: int
    free_vcpus: int
    free_ram_mb: int
    vm_ids: list[str]
    incoming_vm_ids: list[str]
    # the next N migrations toward this node fail when they would land (an injected fault,
    # kept by the engine beside the state)
    fail_next_migrations_to: int = 0


class Vm(WorldModel):
    id: str
    name: str
    vnf_id: str | None = None
    vcpus: int = Field(gt=0)
    ram_mb: int = Field(gt=0)
    node_id: str
    server_group: str | None = None
    status: VmStatus = "active"
    migration_target: str | None = None
    migration_started_at: float | None = None
    migration_finishes_at: float | None = None


class VmView(Vm):
    """A VM as seen from a node listing: `up` is False while its host reboots; `incoming` marks
    a migration under way toward the listed node (the VM still runs on its source)."""

    up: bool
    incoming: bool = False
    # the migration under way will fail (a fault injected on its destination): the VM stays
    # on its source and the room reserved on the destination is given back
    migration_will_fail: bool = False


class InventoryVm(WorldModel):
    """A VM in a node's inventory; `incoming` marks a migration under way toward the node."""

    id: str
    vnf_id: str | None = None
    vcpus: int
    ram_mb: int
    incoming: bool = False


class InventoryNode(WorldModel):
    """One node of `GET /v1/inventory`: what a scheduler needs, without the node's history."""

    id: str
    failure_domain: str
    vcpus: int
    ram_mb: int
    power: PowerState
    service_status: ServiceStatus
    maintenance_holder: str | None = None
    vms: list[InventoryVm]


class MemberSync(WorldModel):
    state: SyncState = "in_sync"
    until: float | None = None


class Vnf(WorldModel):
    id: str
    vnfm_id: str
    redundancy: Redundancy
    members: list[str]
    active_member: str | None = None
    load_share: dict[str, float] = Field(default_factory=dict)
    min_in_service: int = Field(default=1, ge=0)
    max_unavailable: int = Field(default=1, ge=0)
    min_recovery_s: float = Field(default=0.0, ge=0)
    sync: dict[str, MemberSync] = Field(default_factory=dict)


class VnfView(Vnf):
    member_nodes: dict[str, str]
    members_up: list[str]
    members_in_service: list[str]


VnfActionKind = Literal["switchover", "drain", "restore"]


class VnfAction(WorldModel):
    """One VNFM action of a batch (`POST /v1/vnfs/actions`): a switch-over to `member`, or
    a drain or restore of `member`."""

    vnf_id: str = Field(min_length=1)
    action: VnfActionKind
    member: str = Field(min_length=1)


class VnfActionResult(WorldModel):
    """The outcome of one action of a batch: the VNF after it, or the refusal (the status
    and error its own request would have answered)."""

    vnf: VnfView | None = None
    status: int = 200
    error: str | None = None


class Interruption(WorldModel):
    id: int
    vnf_id: str | None
    kind: InterruptionKind
    reason: str
    started_at: float
    ended_at: float | None = None
    members: list[str] = Field(default_factory=list)


class WorldState(WorldModel):
    nodes: dict[str, Node] = Field(default_factory=dict)
    vms: dict[str, Vm] = Field(default_factory=dict)
    vnfs: dict[str, Vnf] = Field(default_factory=dict)
    interruptions: list[Interruption] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    seed: int | None = None


class WorldSnapshot(WorldModel):
    now: float
    speed: float
    timings: Timings
    nodes: list[NodeView]
    vms: list[VmView]
    vnfs: list[VnfView]
    interruptions: list[Interruption]
