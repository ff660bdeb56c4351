"""Which partition a key lands in, and reading only one key's partition.

`partition_for_key` is the Java client's default partitioner for keyed records
(``Utils.toPositive(Utils.murmur2(key)) % numPartitions``), which aiokafka's default partitioner
also uses; the unit tests pin it to vectors computed with kafka-clients 4.1.1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Any, Protocol

from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

__all__ = ["PartitionConsumer", "assign_own_partition", "partition_for_key", "topic_partitions"]

log = logging.getLogger(__name__)


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner picks for a non-null `key`."""
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


class PartitionConsumer(Protocol):
    """What `assign_own_partition` calls on an `AIOKafkaConsumer` (started, with a group)."""

    def partitions_for_topic(self, topic: str) -> Collection[int] | None: ...

    def assign(self, partitions: list[TopicPartition]) -> None: ...


async def topic_partitions(
    consumer: PartitionConsumer, topic: str, *, timeout_s: float = 10.0
) -> set[int]:
    """The partition ids of `topic`, refreshing the consumer's metadata if it lacks the topic."""
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        # aiokafka only tracks metadata of topics it was told about; ask for this one.
        client: Any = getattr(consumer, "_client", None)
        if client is not None and hasattr(client, "add_topic"):
            await client.add_topic(topic)
            if hasattr(client, "force_metadata_update"):
                await client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
        if time.monotonic() >= deadline:
            raise LookupError(f"no partition metadata for topic {topic!r}")
        await asyncio.sleep(0.1)


async def assign_own_partition(
    consumer: PartitionConsumer,
    topic: str,
    key: bytes | str,
    *,
    partitions: int | None = None,
    timeout_s: float = 10.0,
) -> TopicPartition:
    """Assign `consumer` to the one partition of `topic` that `key` is produced to.

    Manual assignment: no group membership and no rebalance, so a node agent reads only the
    commands for its own node's partition (and skips other keys sharing it). The consumer must
    be started; created with a `group_id`, it resumes from and commits to that group's offsets
    (give each node agent its own group). `partitions` skips the metadata lookup.
    """
    raw = key.encode() if isinstance(key, str) else key
    count = (
        partitions
        if partitions is not None
        else len(await topic_partitions(consumer, topic, timeout_s=timeout_s))
    )
    tp = TopicPartition(topic, partition_for_key(raw, count))
    consumer.assign([tp])
    log.info("assigned %s[%d] for key %r", tp.topic, tp.partition, raw)
    return tp
