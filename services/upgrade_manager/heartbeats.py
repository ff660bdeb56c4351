"""The view of node agents' heartbeats every Upgrade Manager instance keeps (all nodes).

Why a group-less aiokafka consumer and not a faust GlobalTable: the view is a cache of a
compacted topic that other services write, needed whole by every instance before the first
decision (a request naming nodes is validated against it). A GlobalTable would add a second
changelog copy of the topic and ties its readiness to faust's rebalance/recovery cycle (a
rebalance would pause reading it); a plain consumer assigned every partition reads the topic
itself, is ready before faust starts, and is never paused by a rebalance.

Start-up is gap-free: the follower is assigned every partition and positioned at the end first,
then `read_to_high_watermark` fills the view from the beginning, then the follower reads from
its recorded positions. Records seen twice are harmless: a heartbeat older than the one kept
for its node is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka.structs import TopicPartition

from escalator.bus import make_consumer, read_to_high_watermark, topic_partitions
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, decode
from schemas.events import NodeAgentHeartbeat
from schemas.topics import NODE_HEARTBEATS
from services.upgrade_manager.domain import AgentStatus

log = logging.getLogger(__name__)


class HeartbeatView:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self.agents: dict[str, AgentStatus] = {}
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    def apply(self, heartbeat: NodeAgentHeartbeat) -> None:
        known = self.agents.get(heartbeat.node_id)
        if known is None or heartbeat.occurred_at >= known.last_seen:
            self.agents[heartbeat.node_id] = AgentStatus.from_heartbeat(heartbeat)

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
                        log.debug("heartbeat view: skipped %s", event)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
