"""The topic catalogue: which events travel where, keyed by what, written and read by whom.

Everything the Upgrade Manager consumes as campaign input is keyed by campaign id, so that all of
a campaign's events land in the same partition number of co-partitioned topics (same partition
count, default murmur2 partitioner). Commands are keyed by their recipient. Topics that VNFM
vendors write to are separate from internal ones; the adapter validates and re-keys them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas import events as ev
from schemas.envelope import Event


class Service(StrEnum):
    OPERATOR_CLI = "operator-cli"
    UPGRADE_MANAGER = "upgrade-manager"
    CLOUD_MANAGER = "cloud-manager"
    VNFM_ADAPTER = "vnfm-adapter"
    NODE_AGENT = "node-agent"
    VNFM = "vnfm (vendor)"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key_field: str
    events: tuple[type[Event], ...]
    producers: tuple[Service, ...]
    consumers: tuple[Service, ...]
    description: str
    compacted: bool = False
    vendor_writable: bool = False
    co_partitioned: bool = False

    def key_for(self, event: Event) -> bytes:
        value: object = event
        for part in self.key_field.split("."):
            value = getattr(value, part)
        if value is None:
            raise ValueError(f"{event.event_type} has no {self.key_field} to key {self.name}")
        return str(value).encode()

    def carries(self, event_type: str) -> bool:
        return any(cls.model_fields["event_type"].default == event_type for cls in self.events)


CAMPAIGNS = TopicSpec(
    name="escalator.campaigns.v1",
    key_field="campaign_id",
    events=(
        ev.UpgradeRequested,
        ev.CampaignStarted,
        ev.CampaignRejected,
        ev.CampaignCompleted,
        ev.CampaignFailed,
        ev.NodeCycleAdvanced,
        ev.CampaignPauseRequested,
        ev.CampaignResumeRequested,
        ev.CampaignAbortRequested,
        ev.NodeRetryRequested,
        ev.CampaignPaused,
        ev.CampaignResumed,
        ev.CampaignAbortStarted,
        ev.OperatorRequestRejected,
    ),
    producers=(Service.OPERATOR_CLI, Service.UPGRADE_MANAGER),
    consumers=(Service.UPGRADE_MANAGER, Service.OPERATOR_CLI),
    description="Operator requests and the campaign's progress, in campaign order.",
    co_partitioned=True,
)
CLOUD_COMMANDS = TopicSpec(
    name="escalator.cloud.commands.v1",
    key_field="node_id",
    events=(
        ev.NodeMaintenanceRequested,
        ev.VmMigrationRequested,
        ev.NodeMaintenanceExitRequested,
        ev.VmListRequested,
    ),
    producers=(Service.UPGRADE_MANAGER,),
    consumers=(Service.CLOUD_MANAGER,),
    description="Requests to the Cloud Manager, keyed by the node they touch.",
)
CLOUD_EVENTS = TopicSpec(
    name="escalator.cloud.events.v1",
    key_field="campaign_id",
    events=(
        ev.NodeMaintenanceEntered,
        ev.NodeMaintenanceRefused,
        ev.VmMigrated,
        ev.VmMigrationFailed,
        ev.NodeMaintenanceExited,
        ev.VmListReported,
    ),
    producers=(Service.CLOUD_MANAGER,),
    consumers=(Service.UPGRADE_MANAGER,),
    description="What the Cloud Manager did, keyed by campaign.",
    co_partitioned=True,
)
VNFM_REQUESTS = TopicSpec(
    name="escalator.vnfm.requests.v1",
    key_field="node_id",
    events=(ev.BusinessMoveRequested, ev.NodeAvailable),
    producers=(Service.UPGRADE_MANAGER,),
    consumers=(Service.VNFM_ADAPTER,),
    description="Upgrade Manager to VNFM adapter, keyed by node.",
)
VNFM_EVENTS = TopicSpec(
    name="escalator.vnfm.events.v1",
    key_field="campaign_id",
    events=(ev.BusinessMoved, ev.BusinessMoveDeadlineExtended),
    producers=(Service.VNFM_ADAPTER,),
    consumers=(Service.UPGRADE_MANAGER,),
    description="The collected business outcome per node, keyed by campaign.",
    co_partitioned=True,
)
VNFM_NOTICES = TopicSpec(
    name="escalator.vnfm.notices.v1",
    key_field="vnfm_id",
    events=(
        ev.VnfMaintenanceNotified,
        ev.NoticeExpired,
        ev.NoticeCancelled,
        ev.NodeAvailable,
        ev.VnfmReplyRejected,
    ),
    producers=(Service.VNFM_ADAPTER,),
    consumers=(Service.VNFM,),
    description="Vendor-facing: notices to each VNFM, keyed by VNFM id.",
)
VNFM_REPLIES = TopicSpec(
    name="escalator.vnfm.replies.v1",
    key_field="vnfm_id",
    events=(
        ev.VnfBusinessMoved,
        ev.BusinessMoveRefused,
        ev.MaintenanceDeadlineExtended,
        ev.VnfRecovered,
    ),
    producers=(Service.VNFM,),
    consumers=(Service.VNFM_ADAPTER,),
    description="Vendor-written replies; any key or partitioner, validated by the adapter.",
    vendor_writable=True,
)
NODE_COMMANDS = TopicSpec(
    name="escalator.node.commands.v1",
    key_field="node_id",
    events=(ev.NodeUpgradeRequested, ev.NodeRollbackRequested),
    producers=(Service.UPGRADE_MANAGER,),
    consumers=(Service.NODE_AGENT,),
    description="Upgrade and rollback requests, keyed by node; each agent reads only its key's "
    "partition.",
)
NODE_EVENTS = TopicSpec(
    name="escalator.node.events.v1",
    key_field="campaign_id",
    events=(
        ev.NodeUpgradeAccepted,
        ev.NodeUpgradeProgressed,
        ev.NodeUpgraded,
        ev.NodeUpgradeFailed,
        ev.NodeRollbackCompleted,
    ),
    producers=(Service.NODE_AGENT,),
    consumers=(Service.UPGRADE_MANAGER,),
    description="Node agents' reports, keyed by campaign.",
    co_partitioned=True,
)
NODE_HEARTBEATS = TopicSpec(
    name="escalator.node.heartbeats.v1",
    key_field="node_id",
    events=(ev.NodeAgentHeartbeat,),
    producers=(Service.NODE_AGENT,),
    consumers=(Service.UPGRADE_MANAGER,),
    description="Latest heartbeat and installed version per node (compacted).",
    compacted=True,
)
VNF_REGISTRY = TopicSpec(
    name="escalator.vnf.registry.v1",
    key_field="vnf.vnf_id",
    events=(ev.VnfRegistered,),
    producers=(Service.OPERATOR_CLI,),
    consumers=(Service.UPGRADE_MANAGER, Service.VNFM_ADAPTER),
    description="VNF constraints, one record per VNF (compacted; a tombstone deletes).",
    compacted=True,
)
CLOUD_INVENTORY = TopicSpec(
    name="escalator.cloud.inventory.v1",
    key_field="node_id",
    events=(ev.NodeInventoryReported,),
    producers=(Service.CLOUD_MANAGER,),
    consumers=(Service.UPGRADE_MANAGER, Service.OPERATOR_CLI),
    description="Latest capacity, failure domain and VMs per compute node (compacted).",
    compacted=True,
)
DEAD_LETTERS_TOPIC = "escalator.deadletter.v1"

ALL_TOPICS: tuple[TopicSpec, ...] = (
    CAMPAIGNS,
    CLOUD_COMMANDS,
    CLOUD_EVENTS,
    VNFM_REQUESTS,
    VNFM_EVENTS,
    VNFM_NOTICES,
    VNFM_REPLIES,
    NODE_COMMANDS,
    NODE_EVENTS,
    NODE_HEARTBEATS,
    VNF_REGISTRY,
    CLOUD_INVENTORY,
)


def topic_of(event_type: str, *, consumer: Service | None = None) -> TopicSpec:
    """The one topic that carries an event type (to a given consumer, when several do)."""
    found = [
        t
        for t in ALL_TOPICS
        if t.carries(event_type) and (consumer is None or consumer in t.consumers)
    ]
    if len(found) != 1:
        raise LookupError(f"{event_type!r} travels on {[t.name for t in found]}, not one topic")
    return found[0]
