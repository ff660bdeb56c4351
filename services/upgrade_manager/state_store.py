"""The Upgrade Manager's durable state: one compacted topic, records written per campaign.

Keys are `plan/<campaign>`, `status/<campaign>` and `node/<campaign>/<node>` (ids contain no
slash); values are the records' JSON. Every record of a campaign goes to the campaign's
partition (murmur2 of its id, the partition of all its inputs), so the instance that owns a
campaign's inputs reads exactly the state partitions it needs. The in-memory copy is updated
only once the broker acknowledged a write, so rebuilding from it equals rebuilding from Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from escalator.bus import ProducerPort, partition_for_key
from escalator.bus.readback import scan
from escalator.settings import KafkaSettings
from services.upgrade_manager.domain import CampaignPlan, CampaignRecord, CampaignState, NodeRecord
from services.upgrade_manager.routing import load_state

Record = CampaignPlan | CampaignRecord | NodeRecord

log = logging.getLogger(__name__)


@dataclass
class CampaignRecords:
    plan: bytes | None = None
    status: bytes | None = None
    nodes: dict[str, bytes] = field(default_factory=dict)

    def put(self, key: str, value: bytes | None) -> None:
        kind, _, rest = key.partition("/")
        if kind == "plan":
            self.plan = value
        elif kind == "status":
            self.status = value
        elif kind == "node":
            node_id = rest.partition("/")[2]
            if value is None:
                self.nodes.pop(node_id, None)
            else:
                self.nodes[node_id] = value

    def state(self) -> CampaignState | None:
        """The campaign rebuilt from its records; None while its plan or status is missing."""
        if self.plan is None or self.status is None:
            return None
        order = CampaignPlan.model_validate_json(self.plan).node_order
        return load_state(self.plan, self.status, {n: self.nodes.get(n) for n in order})


def campaign_of(key: str) -> str | None:
    kind, _, rest = key.partition("/")
    if kind not in ("plan", "status", "node") or not rest:
        return None
    return rest.partition("/")[0] or None


class StoredState:
    def __init__(self, producer: ProducerPort, topic: str, partitions: int) -> None:
        self._producer = producer
        self.topic = topic
        self._partitions = partitions
        self._campaigns: dict[str, CampaignRecords] = {}
        self._unsettled: deque[tuple[str, list[tuple[str, bytes]], list[asyncio.Future[Any]]]] = (
            deque()
        )

    def partition_of(self, campaign_id: str) -> int:
        return partition_for_key(campaign_id.encode(), self._partitions)

    async def load(
        self, kafka: KafkaSettings, partitions: Collection[int]
    ) -> dict[str, CampaignRecords]:
        """Read the given partitions to their high watermark; the campaigns found there."""
        if not partitions:
            return {}
        found: dict[str, CampaignRecords] = {}
        async for record in scan(kafka, self.topic, partitions=partitions):
            if record.key is None:
                continue
            key = record.key.decode(errors="replace")
            campaign_id = campaign_of(key)
            if campaign_id is None:
                continue
            found.setdefault(campaign_id, CampaignRecords()).put(key, record.value)
        self._campaigns.update(found)
        return found

    def forget(self, partitions: Collection[int]) -> None:
        for campaign_id in [c for c in self._campaigns if self.partition_of(c) in partitions]:
            del self._campaigns[campaign_id]

    def campaign_ids(self) -> list[str]:
        """Campaigns with records in the partitions loaded (the owned ones)."""
        return list(self._campaigns)

    def records_of(self, campaign_id: str) -> CampaignRecords | None:
        return self._campaigns.get(campaign_id)

    async def write(
        self, campaign_id: str, records: Sequence[tuple[str, Record]], *, wait: bool = True
    ) -> None:
        """Send every record to the campaign's partition and wait for all acks.

        `wait=False` is for records that only inform (an agent's progress percent): they are
        sent, and their acks collected by the next waiting write or `settle()`. Losing one in a
        crash loses nothing a later record does not rewrite; the producer keeps the order of
        the records of one partition, so a later write of the same key still wins."""
        if not records:
            return
        partition = self.partition_of(campaign_id)
        encoded = [(key, record.model_dump_json().encode()) for key, record in records]
        futures = [
            await self._producer.send(
                self.topic, key=key.encode(), value=value, partition=partition
            )
            for key, value in encoded
        ]
        if not wait:
            self._unsettled.append((campaign_id, encoded, futures))
            return
        await self.settle()  # earlier writes first, so memory keeps Kafka's order
        results = await asyncio.gather(*futures, return_exceptions=True)
        self._remember(campaign_id, encoded, results)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def settle(self) -> None:
        """Collect the acks of the writes sent without waiting; a failed one is only logged."""
        while self._unsettled:
            campaign_id, encoded, futures = self._unsettled.popleft()
            results = await asyncio.gather(*futures, return_exceptions=True)
            if campaign_id in self._campaigns:  # not forgotten meanwhile (a rebalance)
                self._remember(campaign_id, encoded, results)
            for result in results:
                if isinstance(result, BaseException):
                    log.warning(
                        "informational state record of %s not written: %r", campaign_id, result
                    )

    def _remember(
        self,
        campaign_id: str,
        encoded: Sequence[tuple[str, bytes]],
        results: Sequence[object],
    ) -> None:
        stored = self._campaigns.setdefault(campaign_id, CampaignRecords())
        # Keep in memory exactly what the broker acknowledged, so a rebuild matches Kafka.
        for (key, value), result in zip(encoded, results, strict=True):
            if not isinstance(result, BaseException):
                stored.put(key, value)
