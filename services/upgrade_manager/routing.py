"""Pure helpers of the Upgrade Manager's adapter: topics, and stored records to state.

Kept free of Kafka and faust so that they are unit-tested
(tests/unit/test_upgrade_manager_routing.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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

# Internal, compacted: the campaigns' records, keyed `plan/<c>`, `status/<c>`, `node/<c>/<n>`,
# in the campaign's partition (see state_store.py).
STATE_TOPIC = "escalator.upgrade-manager.state.v1"

# What operators write on CAMPAIGNS: the Upgrade Manager's inputs there.
OPERATOR_REQUESTS = frozenset(
    {
        "UpgradeRequested",
        "CampaignPauseRequested",
        "CampaignResumeRequested",
        "CampaignAbortRequested",
        "NodeRetryRequested",
    }
)

# What the Upgrade Manager itself writes on CAMPAIGNS: read back as input, and skipped unread.
OWN_OUTPUTS = frozenset(
    cls.model_fields["event_type"].default
    for cls in topics.CAMPAIGNS.events
    if cls.model_fields["event_type"].default not in OPERATOR_REQUESTS
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
