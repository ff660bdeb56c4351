"""Pure helpers of the Upgrade Manager's adapter: topics, table keys, tick records, records.

Kept free of Kafka and faust so that they are unit-tested
(tests/unit/test_upgrade_manager_routing.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime

from schemas import topics
from schemas.envelope import Event
from schemas.topics import Service, TopicSpec
from services.upgrade_manager.domain import (
    CampaignPlan,
    CampaignRecord,
    CampaignState,
    NodeRecord,
    rebuild,
)

# The campaign-keyed, co-partitioned topics the Upgrade Manager consumes.
INPUT_TOPICS: tuple[TopicSpec, ...] = (
    topics.CAMPAIGNS,
    topics.CLOUD_EVENTS,
    topics.VNFM_EVENTS,
    topics.NODE_EVENTS,
)

# Internal: one record per owned running campaign every tick interval, keyed by campaign id and
# written to the campaign's partition, so that time passes through the same agent as events.
TICKS_TOPIC = "escalator.upgrade-manager.ticks.v1"
TICKS_RETENTION_MS = 3_600_000

# The faust tables: campaign id -> CampaignPlan, campaign id -> CampaignRecord,
# "{campaign id}/{node id}" -> NodeRecord.
PLANS, STATUS, NODES = "plans", "status", "nodes"
TABLES = (PLANS, STATUS, NODES)

# What the Upgrade Manager itself writes on CAMPAIGNS: read back as input, and skipped unread.
OWN_OUTPUTS = frozenset(
    cls.model_fields["event_type"].default
    for cls in topics.CAMPAIGNS.events
    if cls.model_fields["event_type"].default != "UpgradeRequested"
)

_OUTPUT_TOPICS = tuple(t for t in topics.ALL_TOPICS if Service.UPGRADE_MANAGER in t.producers)


def topic_for_command(event: Event) -> TopicSpec:
    """The one catalogue topic the Upgrade Manager writes `event` to."""
    found = [t for t in _OUTPUT_TOPICS if t.carries(event.event_type)]
    if len(found) != 1:
        raise LookupError(
            f"the Upgrade Manager writes {event.event_type} to {[t.name for t in found]}"
        )
    return found[0]


def routed(commands: Iterable[Event]) -> list[tuple[Event, TopicSpec]]:
    return [(command, topic_for_command(command)) for command in commands]


def node_key(campaign_id: str, node_id: str) -> str:
    return f"{campaign_id}/{node_id}"


def encode_tick(campaign_id: str, at: datetime) -> bytes:
    return json.dumps({"campaign_id": campaign_id, "at": at.isoformat()}).encode()


def decode_tick(value: bytes | None) -> str | None:
    """The campaign id of a tick record, or None if the record is not one."""
    try:
        data = json.loads(value or b"")
    except ValueError:
        return None
    campaign_id = data.get("campaign_id") if isinstance(data, dict) else None
    return campaign_id if isinstance(campaign_id, str) and campaign_id else None


def load_state(
    plan_raw: bytes | None,
    status_raw: bytes | None,
    node_raw: Mapping[str, bytes | None],
) -> CampaignState | None:
    """A campaign from its table values (JSON bytes); None while its plan or status is missing.

    `node_raw` maps node ids of the plan to their stored record (None where none is stored).
    """
    if plan_raw is None or status_raw is None:
        return None
    plan = CampaignPlan.model_validate_json(plan_raw)
    status = CampaignRecord.model_validate_json(status_raw)
    nodes = {
        node_id: NodeRecord.model_validate_json(raw)
        for node_id, raw in node_raw.items()
        if raw is not None
    }
    return rebuild(plan, status, nodes)


def dump(record: CampaignPlan | CampaignRecord | NodeRecord) -> bytes:
    return record.model_dump_json().encode()
