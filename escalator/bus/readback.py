"""Rebuilding state from a (compacted) topic: the latest value per key, up to "now".

"Now" is each partition's high watermark as reported in fetch responses (`consumer.highwater`).
The ListOffsets end offset (`end_offsets`) is not used: a broker this project may run on
(Tansu) reports it too low after multi-record batches, which would stop the read early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from escalator.bus.connection import make_consumer
from escalator.bus.partitioning import topic_partitions
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, InvalidReason, decode
from schemas.envelope import Event
from schemas.topics import TopicSpec

__all__ = ["read_to_high_watermark", "scan"]

log = logging.getLogger(__name__)


async def scan(
    settings: KafkaSettings,
    topic: str | TopicSpec,
    *,
    follow: bool = False,
    partitions: Collection[int] | None = None,
    timeout_s: float = 30.0,
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` from the beginning, in per-partition order, without a group.

    With `follow=False` it stops at the high watermark each partition reported once the scan
    began its fetches (TimeoutError if not reached within `timeout_s`); with `follow=True` it
    goes on yielding new records until the caller stops iterating. `partitions` limits the scan
    to those partition numbers.
    """
    name = settings.topic(topic.name) if isinstance(topic, TopicSpec) else topic
    consumer = make_consumer(settings, None)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, name, timeout_s=min(timeout_s, 10.0))
        wanted = parts if partitions is None else set(parts) & set(partitions)
        tps = [TopicPartition(name, p) for p in sorted(wanted)]
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        pending = set(tps)
        deadline = time.monotonic() + timeout_s
        while follow or pending:
            if not follow and time.monotonic() > deadline:
                raise TimeoutError(
                    f"read-back of {name} did not reach the high watermark in {timeout_s}s "
                    f"({len(pending)} partition(s) behind)"
                )
            batches = await consumer.getmany(
                *(tps if follow else pending),
                timeout_ms=settings.fetch_max_wait_ms,
                max_records=10_000,
            )
            for records in batches.values():
                for record in records:
                    yield record
            for tp in list(pending):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    pending.discard(tp)
    finally:
        await consumer.stop()


async def read_to_high_watermark(
    settings: KafkaSettings,
    topic: str | TopicSpec,
    *,
    decoder: Callable[[bytes | None], Any] = decode,
    timeout_s: float = 30.0,
) -> dict[bytes, Event]:
    """Read `topic` from the beginning to its high watermark; the last valid value per key.

    `topic` is a `TopicSpec` (the settings' prefix is applied) or a full topic name. A
    tombstone (null value) removes its key; records without a key and records that do not decode
    (an `InvalidEvent`) are skipped with a warning. Records produced after a partition's high
    watermark was observed may or may not be included. Raises TimeoutError if the end is not
    reached within `timeout_s`.
    """
    state: dict[bytes, Event] = {}
    skipped = 0
    async for record in scan(settings, topic, timeout_s=timeout_s):
        if record.key is None:
            skipped += 1
            continue
        if record.value is None:
            state.pop(record.key, None)
            continue
        try:
            value = decoder(record.value)
        except Exception as err:  # a decoder that raises must not stop a service's start-up
            value = InvalidEvent(InvalidReason.NOT_JSON, f"decoder raised {err!r}"[:300], None)
        if isinstance(value, InvalidEvent):
            skipped += 1
            log.warning(
                "read-back %s[%d]@%d skipped: %s",
                record.topic,
                record.partition,
                record.offset,
                value,
            )
            continue
        state[record.key] = value
    if skipped:
        log.warning(
            "read-back %s: %d record(s) skipped", record_topic_name(settings, topic), skipped
        )
    return state


def record_topic_name(settings: KafkaSettings, topic: str | TopicSpec) -> str:
    return settings.topic(topic.name) if isinstance(topic, TopicSpec) else topic
