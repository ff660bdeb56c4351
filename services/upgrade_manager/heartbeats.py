"""The view of node agents' heartbeats every Upgrade Manager instance keeps (all nodes).

A group-less aiokafka consumer assigned every partition: every instance needs the whole view
(a request naming nodes is validated against it), before its first decision, and a rebalance of
the campaign inputs must not pause it. Undecodable records are dead-lettered by the instance
whose campaign partitions include the record's partition number, so one copy lands there.

Start-up is gap-free: the follower is assigned every partition and positioned at the end first,
then `read_to_high_watermark` fills the view from the beginning, then the follower reads from
its recorded positions. Records seen twice are harmless: a heartbeat older than the one kept
for its node is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka.structs import TopicPartition

from escalator.bus import make_consumer, read_to_high_watermark, topic_partitions
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, decode
from schemas.events import NodeAgentHeartbeat
from schemas.topics import NODE_HEARTBEATS
from services.upgrade_manager.domain import AgentStatus

log = logging.getLogger(__name__)


DeadLetterHook = Callable[[Any, InvalidEvent], Awaitable[None]]


class HeartbeatView:
    def __init__(self, settings: KafkaSettings, on_invalid: DeadLetterHook | None = None) -> None:
        self._settings = settings
        self._on_invalid = on_invalid
        self.agents: dict[str, AgentStatus] = {}
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def apply(self, heartbeat: NodeAgentHeartbeat) -> None:
        known = self.agents.get(heartbeat.node_id)
        if known is None or heartbeat.occurred_at >= known.last_seen:
            self.agents[heartbeat.node_id] = AgentStatus.from_heartbeat(heartbeat)
            if known is None:
                self._changed.set()

    async def wait_for(self, node_ids: Iterable[str], timeout_s: float) -> bool:
        """Wait until every node has been heard of (True), or the timeout passed (False)."""
        wanted = set(node_ids)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while not wanted <= self.agents.keys():
            remaining = give_up - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
        return True

    async def start(self) -> None:
        name = self._settings.topic(NODE_HEARTBEATS.name)
        consumer = make_consumer(self._settings, None)
        await consumer.start()
        self._consumer = consumer
        parts = await topic_partitions(consumer, name, timeout_s=10.0)
        tps = [TopicPartition(name, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolve the end now, before the read-back
        for event in (await read_to_high_watermark(self._settings, name)).values():
            if isinstance(event, NodeAgentHeartbeat):
                self.apply(event)
        log.info("heartbeat view: %d node agent(s) known", len(self.agents))
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="heartbeats")

    async def _follow(self) -> None:
        consumer = self._consumer
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat view: fetch failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    event = decode(record.value) if record.value is not None else None
                    if isinstance(event, NodeAgentHeartbeat):
                        self.apply(event)
                    elif isinstance(event, InvalidEvent):
                        log.warning("heartbeat view: skipped %s", event)
                        if self._on_invalid is not None:
                            await self._on_invalid(record, event)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
