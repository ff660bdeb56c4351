"""Following a compacted topic whole: every partition, from the beginning, without a group.

Views that every instance of a service needs in full (node agents' heartbeats, the cloud's
inventory, the VNF registry) read the topic to its high watermark before the first decision,
then keep following it. A rebalance of the service's own inputs never pauses them.

Start-up is gap-free: the follower is assigned every partition and positioned at the end first,
then `read_to_high_watermark` fills the view from the beginning, then the follower reads on from
its recorded positions. A record seen twice is applied twice, so `apply` must be idempotent
(the latest value per key wins, which is what a compacted topic means anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.structs import TopicPartition

from escalator.bus.connection import make_consumer
from escalator.bus.partitioning import topic_partitions
from escalator.bus.readback import read_to_high_watermark
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, decode
from schemas.topics import TopicSpec

log = logging.getLogger(__name__)

# key, then the decoded value (an event, unless a decoder says otherwise) or None for a tombstone
ApplyRecord = Callable[[bytes, Any], None]
Decoder = Callable[[bytes], Any]
DeadLetterHook = Callable[[Any, InvalidEvent], Awaitable[None]]


class CompactedFollower:
    def __init__(
        self,
        settings: KafkaSettings,
        topic: TopicSpec,
        apply: ApplyRecord,
        *,
        on_invalid: DeadLetterHook | None = None,
        decoder: Decoder = decode,
        start_timeout_s: float = 600.0,
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._apply = apply
        self._on_invalid = on_invalid
        self._decode = decoder
        # Reading a large view to its end (a 10,000-node inventory, a registry of 70,000 VNFs)
        # takes long on a busy broker; the limit only catches an end that never comes.
        self._start_timeout_s = start_timeout_s
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Fill the view to the high watermark and start following; returns the keys read."""
        name = self._settings.topic(self._topic.name)
        consumer = make_consumer(self._settings, None)
        await consumer.start()
        self._consumer = consumer
        parts = await topic_partitions(consumer, name, timeout_s=10.0)
        tps = [TopicPartition(name, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolve the end now, before the read-back
        records = await read_to_high_watermark(
            self._settings, name, decoder=self._decode, timeout_s=self._start_timeout_s
        )
        for key, event in records.items():
            try:
                self._apply(key, event)
            except Exception:
                log.exception("following %s: record for key %r skipped", self._topic.name, key)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name=f"follow {name}")
        return len(records)

    async def _follow(self) -> None:
        consumer = self._consumer
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following %s: fetch failed; retrying", self._topic.name)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    try:
                        await self._on_record(record)
                    except Exception:
                        # One record must never stop the view: it is skipped, the view goes on.
                        log.exception(
                            "following %s: record %s[%d]@%d skipped",
                            self._topic.name,
                            record.topic,
                            record.partition,
                            record.offset,
                        )

    async def _on_record(self, record: Any) -> None:
        if record.key is None:
            log.warning("following %s: skipped a record without a key", self._topic.name)
            return
        if record.value is None:
            self._apply(record.key, None)
            return
        event = self._decode(record.value)
        if isinstance(event, InvalidEvent):
            log.warning("following %s: skipped %s", self._topic.name, event)
            if self._on_invalid is not None:
                await self._on_invalid(record, event)
            return
        self._apply(record.key, event)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
