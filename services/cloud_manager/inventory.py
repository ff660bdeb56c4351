"""The Cloud Manager's inventory: one `NodeInventoryReported` per compute node on the compacted
CLOUD_INVENTORY topic, keyed by node, so that its latest record per node is the cloud as the
planner needs it (capacity, failure domains, where every VM is).

When it publishes:
- on start, every node (retried until the cloud and the broker answer);
- right after the Cloud Manager changed a node (a claim, a release, a migration: source and
  destination), the nodes touched, coalesced: many touches while a publication runs make one;
- every `interval_s`, the nodes whose content changed since they were last published (a change
  made by someone else: an administrator, a migration nobody asked us for), and every
  `full_every`-th time every node again, so that a topic that lost records (or a consumer that
  compacted badly) recovers whatever happened.

One loop does all of it, so the records of one node are published in the order their content
was read. Nothing here blocks command handling: the loop runs beside the command consumer, the
backend parses a big listing off the event loop, records go out in batches (one ack wait per
batch, not per record) with a pause between batches, and a failure (cloud unreachable, broker
refusing) is logged and retried with backoff, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import datetime

from escalator.bus import EventPublisher
from schemas.topics import CLOUD_INVENTORY
from services.cloud_manager import domain
from services.cloud_manager.domain import NodeInventory, ReplyContext
from services.cloud_manager.ports import CloudBackend, CloudError, UnknownNode

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.2
RETRY_BACKOFF_MAX_S = 10.0
# Records per batch: one wait for the broker's acks per batch, a pause between batches.
BATCH = 100
# Records built between two pauses (building one takes some 0.1 ms at 20 VMs a node).
BUILD_CHUNK = 50


class InventoryReporter:
    def __init__(
        self,
        backend: CloudBackend,
        publisher: EventPublisher,
        *,
        producer: str,
        interval_s: float = 10.0,
        full_every: int = 30,
        clock: Callable[[], datetime],
        batch: int = BATCH,
    ) -> None:
        self._backend = backend
        self._publisher = publisher
        self._producer = producer
        self._interval_s = interval_s
        self._full_every = max(1, full_every)
        self._clock = clock
        self._batch = max(1, batch)
        self._published: dict[str, NodeInventory] = {}
        self._touched: set[str] = set()
        self._wake = asyncio.Event()
        self._refreshes = 0  # refreshes done, the start counting as the first (full) one
        # what happened, for logs and tests
        self.records_published = 0
        self.failures = 0

    @property
    def published(self) -> dict[str, NodeInventory]:
        """The content last published per node."""
        return self._published

    def touched(self, node_ids: Iterable[str]) -> None:
        """These nodes changed: publish them soon (never blocks, never raises)."""
        before = len(self._touched)
        self._touched.update(node_ids)
        if len(self._touched) != before:
            self._wake.set()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Publish until cancelled: every node first, then touched nodes and refreshes."""
        delay = RETRY_BACKOFF_S
        next_refresh: float | None = time.monotonic()  # the start: a (full) refresh, due now
        while True:
            now = time.monotonic()
            if next_refresh is not None and now >= next_refresh:
                if await self._attempt(self.refresh()):
                    next_refresh = (
                        time.monotonic() + self._interval_s if self._interval_s > 0 else None
                    )
                    delay = RETRY_BACKOFF_S
                else:
                    next_refresh = time.monotonic() + delay
                    delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
                continue
            if self._touched and self._refreshes > 0:
                nodes, self._touched = self._touched, set()
                self._wake.clear()
                if not await self._attempt(self.publish_nodes(nodes)):
                    self._touched |= nodes  # again after a pause (below)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
                else:
                    delay = RETRY_BACKOFF_S
                continue
            timeout = None if next_refresh is None else max(0.0, next_refresh - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, work: Awaitable[None]) -> bool:
        try:
            await work
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            reason = exc.reason if isinstance(exc, CloudError) else repr(exc)
            log.warning("inventory not published: %s; retrying", reason)
            return False

    # --- one round ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """List every node; publish those that changed (all of them every `full_every`-th
        time, the first time included)."""
        full = self._refreshes % self._full_every == 0
        listing = await self._backend.inventory()
        present = {node.node_id for node in listing}
        for gone in set(self._published) - present:
            log.warning("node %s is no longer in the cloud's inventory", gone)
            del self._published[gone]
        changed = domain.inventory_to_publish(listing, self._published, full=full)
        await self._publish(changed)
        self._refreshes += 1
        log.log(
            logging.INFO if full else logging.DEBUG,
            "inventory %s: %d of %d nodes published",
            "published in full" if full else "refreshed",
            len(changed),
            len(listing),
        )

    async def publish_nodes(self, node_ids: Collection[str]) -> None:
        """List these nodes and publish them (whether or not they look changed: something was
        done to them). A node the cloud does not know is left to the next refresh."""
        try:
            listing = await self._backend.inventory(sorted(node_ids))
        except UnknownNode:
            log.warning("inventory of %s: some node is unknown; refreshing all", sorted(node_ids))
            await self.refresh()  # publishes those of them that changed
            return
        await self._publish(listing)

    async def _publish(self, nodes: list[NodeInventory]) -> None:
        """Publish in batches; each batch, once acknowledged, counts as published."""
        for start in range(0, len(nodes), self._batch):
            batch = nodes[start : start + self._batch]
            ctx = ReplyContext(producer=self._producer, now=self._clock())
            records = []
            for i, node in enumerate(batch, 1):
                try:
                    records.append(domain.inventory_record(node, ctx))
                except ValueError as exc:  # a listing the contract cannot carry: skip the node
                    log.error("inventory of node %s cannot be published: %s", node.node_id, exc)
                if i % BUILD_CHUNK == 0:
                    await asyncio.sleep(0)
            await self._publisher.publish_all(records, CLOUD_INVENTORY)
            for node in batch:
                self._published[node.node_id] = node
            self.records_published += len(records)
            await asyncio.sleep(0)  # let command handling run between batches


__all__ = ["InventoryReporter"]
