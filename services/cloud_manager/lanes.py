"""Per-node ordering of the Cloud Manager's background work.

Commands of one node arrive in order (they share a key). Migrations of a node may run side by
side (each takes a while; serialising them would multiply a node's evacuation time), but they
must not overtake the claim that came before them, and an exit must not overtake them. So each
command is either *exclusive* (claim, exit: waits for everything before it on that node) or
*shared* (migration, list: waits only for the last exclusive command before it): a
readers-writer order in offset order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Lane:
    last_exclusive: asyncio.Task[Any] | None = None
    shared_since: set[asyncio.Task[Any]] = field(default_factory=set)

    def idle(self) -> bool:
        return (self.last_exclusive is None or self.last_exclusive.done()) and all(
            t.done() for t in self.shared_since
        )


class NodeLanes:
    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}

    def __len__(self) -> int:
        return len(self._lanes)

    def prerequisites(self, node_id: str, *, exclusive: bool) -> set[asyncio.Task[Any]]:
        """The tasks a new command on `node_id` must wait for (call `admitted` right after)."""
        lane = self._lanes.get(node_id)
        if lane is None:
            return set()
        before: set[asyncio.Task[Any]] = set()
        if lane.last_exclusive is not None and not lane.last_exclusive.done():
            before.add(lane.last_exclusive)
        if exclusive:
            before |= {t for t in lane.shared_since if not t.done()}
        return before

    def admitted(self, node_id: str, task: asyncio.Task[Any], *, exclusive: bool) -> None:
        lane = self._lanes.setdefault(node_id, _Lane())
        if exclusive:
            lane.last_exclusive = task
            lane.shared_since = set()
        else:
            lane.shared_since.add(task)
        task.add_done_callback(lambda _: self._tidy(node_id))

    def _tidy(self, node_id: str) -> None:
        lane = self._lanes.get(node_id)
        if lane is None:
            return
        lane.shared_since = {t for t in lane.shared_since if not t.done()}
        if lane.idle():
            del self._lanes[node_id]


async def wait_quietly(tasks: set[asyncio.Task[Any]]) -> None:
    """Wait for `tasks` to end, whatever their outcome (their own owner reports failures)."""
    if tasks:
        await asyncio.wait(tasks)
