"""Commit offsets only below work that is still running in the background.

`EventConsumer` commits a record's offset as soon as its handler returns. A handler that hands
its work to a background task (a VM migration, a node upgrade) returns before the work's reply
is published, so that commit would be too early: a crash would lose the command. `CommitGate`
wraps the consumer that `EventConsumer` polls and caps every commit at the lowest offset whose
work is still held; releasing that work commits as far as is then safe.

Per partition, the committed offset is therefore `min(next offset the loop handled, lowest
held offset)`, and it never goes backwards. After a crash the partition resumes at the oldest
unfinished command; the commands after it that had finished are redelivered too, which the
services' idempotent handling turns into the same replies again (at least once).

Used by the Cloud Manager and by the node agents. It belongs in the bus runtime
(`escalator.bus`) and should move there; it lives here because the bus lacks it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)


class PollingConsumer(Protocol):
    """The two calls `EventConsumer` makes (an `AIOKafkaConsumer` has them)."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]: ...

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None: ...


class CommitGate:
    """A `ConsumerPort` for `EventConsumer` whose commits wait for held background work."""

    def __init__(self, consumer: PollingConsumer) -> None:
        self._consumer = consumer
        self._handled: dict[TopicPartition, int] = {}
        self._held: dict[TopicPartition, Counter[int]] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()

    # --- ConsumerPort --------------------------------------------------------------------------

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        return await self._consumer.getmany(
            *partitions, timeout_ms=timeout_ms, max_records=max_records
        )

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """The loop finished handling everything below `offsets`: commit what is safe."""
        if offsets is None:
            await self._flush(list(self._handled))
            return
        for tp, offset in offsets.items():
            self._handled[tp] = max(offset, self._handled.get(tp, offset))
        await self._flush(list(offsets))

    # --- background work ----------------------------------------------------------------------

    def hold(self, tp: TopicPartition, offset: int) -> None:
        """Work for the record at `offset` is running: do not commit past it yet."""
        self._held.setdefault(tp, Counter())[offset] += 1

    async def release(self, tp: TopicPartition, offset: int) -> None:
        """The work for `offset` finished and its effects are durable: commit what is safe."""
        held = self._held.get(tp)
        if held is None or held[offset] <= 0:
            return  # the partition was revoked (`forget`) meanwhile; its new owner redoes it
        held[offset] -= 1
        if held[offset] == 0:
            del held[offset]
        await self._flush([tp])
        async with self._changed:
            self._changed.notify_all()

    def held(self, tp: TopicPartition | None = None) -> int:
        """How many pieces of work are held (on one partition, or on all)."""
        if tp is not None:
            return sum(self._held.get(tp, Counter()).values())
        return sum(sum(c.values()) for c in self._held.values())

    def safe_offset(self, tp: TopicPartition) -> int | None:
        handled = self._handled.get(tp)
        if handled is None:
            return None
        held = self._held.get(tp)
        return min(handled, min(held)) if held else handled

    def committed(self, tp: TopicPartition) -> int | None:
        return self._committed.get(tp)

    async def settle(self, tps: Collection[TopicPartition], timeout_s: float) -> bool:
        """Wait (up to `timeout_s`) until no work is held on `tps`; True if none is left."""

        def idle() -> bool:
            return all(self.held(tp) == 0 for tp in tps)

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(idle), timeout_s)
        except TimeoutError:
            return False
        return True

    def forget(self, tps: Collection[TopicPartition]) -> None:
        """The partitions were revoked: their new owner resumes from the last commit."""
        for tp in tps:
            self._handled.pop(tp, None)
            self._held.pop(tp, None)
            self._committed.pop(tp, None)

    async def _flush(self, tps: Collection[TopicPartition]) -> None:
        async with self._lock:
            due: dict[TopicPartition, int] = {}
            for tp in tps:
                safe = self.safe_offset(tp)
                if safe is not None and safe > self._committed.get(tp, -1):
                    due[tp] = safe
            if not due:
                return
            try:
                await self._consumer.commit(due)
            except KafkaError as err:
                # A rebalance took the partition, or Kafka blinked: the next flush (or the new
                # owner, from the last commit) covers it; a redelivery is all this costs.
                log.warning("commit %s failed: %r", _describe(due), err)
                return
            self._committed.update(due)


def _describe(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in offsets.items())
