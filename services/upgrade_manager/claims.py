"""Which running campaign holds which node, shared by every Upgrade Manager instance.

Campaigns are spread over instances by partition, so no instance sees every campaign's state.
Each accepted campaign records its claim on each of its nodes in a compacted topic keyed by node
(`escalator.upgrade-manager.claims.v1`), and every instance follows that topic whole: a request
naming a node that another running campaign holds is rejected before anything is touched.
An ended campaign releases its claims with tombstones.

Two requests accepted at the same instant by two instances could both pass this check; the
Cloud Manager's maintenance claim, a compare-and-set on the node's holder, then refuses the
second campaign's nodes one by one (NodeMaintenanceRefused naming the holder), so the two never
drain the same node.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from escalator.bus.follower import CompactedFollower, DeadLetterHook
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, InvalidReason
from schemas.topics import TopicSpec

log = logging.getLogger(__name__)

CLAIMS_TOPIC = "escalator.upgrade-manager.claims.v1"
CLAIMS_SPEC = TopicSpec(
    name=CLAIMS_TOPIC,
    key_field="node_id",
    events=(),
    producers=(),
    consumers=(),
    description="Upgrade Manager node claims (internal)",
    compacted=True,
)


class NodeClaim(BaseModel):
    """The value of a claims record; the key is the node id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    campaign_id: str = Field(min_length=1, max_length=200)


def decode_claim(raw: bytes) -> NodeClaim | InvalidEvent:
    try:
        return NodeClaim.model_validate_json(raw)
    except ValidationError as err:
        return InvalidEvent(InvalidReason.INVALID_FIELDS, str(err)[:500], raw)


class ClaimsView:
    def __init__(self, settings: KafkaSettings, on_invalid: DeadLetterHook | None = None) -> None:
        self.claims: dict[str, str] = {}
        self._follower = CompactedFollower(
            settings, CLAIMS_SPEC, self.apply, on_invalid=on_invalid, decoder=decode_claim
        )

    def apply(self, key: bytes, value: Any) -> None:
        node_id = key.decode(errors="replace")
        if value is None:
            self.claims.pop(node_id, None)
        elif isinstance(value, NodeClaim):
            self.claims[node_id] = value.campaign_id

    def held_by(self, campaign_id: str, node_ids: list[str] | tuple[str, ...]) -> list[str]:
        return [n for n in node_ids if self.claims.get(n) == campaign_id]

    async def start(self) -> None:
        await self._follower.start()
        log.info("claims view: %d node(s) held by running campaigns", len(self.claims))

    async def stop(self) -> None:
        await self._follower.stop()
