"""The view of node agents' heartbeats every Upgrade Manager instance keeps (all nodes).

A group-less aiokafka consumer assigned every partition: every instance needs the whole view
(a request naming nodes is validated against it), before its first decision, and a rebalance of
the campaign inputs must not pause it. Undecodable records are dead-lettered by the instance
whose campaign partitions include the record's partition number, so one copy lands there.

Start-up is gap-free (see `CompactedFollower`). Records seen twice are harmless: a heartbeat
older than the one kept for its node is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from escalator.bus.follower import CompactedFollower, DeadLetterHook
from escalator.settings import KafkaSettings
from schemas.envelope import Event
from schemas.events import NodeAgentHeartbeat
from schemas.topics import NODE_HEARTBEATS
from services.upgrade_manager.domain import AgentStatus

log = logging.getLogger(__name__)


class HeartbeatView:
    def __init__(self, settings: KafkaSettings, on_invalid: DeadLetterHook | None = None) -> None:
        self.agents: dict[str, AgentStatus] = {}
        self._changed = asyncio.Event()
        self._follower = CompactedFollower(
            settings, NODE_HEARTBEATS, self._apply_record, on_invalid=on_invalid
        )

    def apply(self, heartbeat: NodeAgentHeartbeat) -> None:
        known = self.agents.get(heartbeat.node_id)
        if known is None or heartbeat.occurred_at >= known.last_seen:
            self.agents[heartbeat.node_id] = AgentStatus.from_heartbeat(heartbeat)
            if known is None:
                self._changed.set()

    def _apply_record(self, key: bytes, event: Event | None) -> None:
        if isinstance(event, NodeAgentHeartbeat):
            self.apply(event)

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
        await self._follower.start()
        log.info("heartbeat view: %d node agent(s) known", len(self.agents))

    async def stop(self) -> None:
        await self._follower.stop()
