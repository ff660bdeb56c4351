"""The VNFM adapter's state writes: handed over without waiting, settled before a commit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from escalator.settings import KafkaSettings
from services.vnfm_adapter.domain import NodeCollection
from services.vnfm_adapter.service import KafkaStateStore, StateWriteLost

pytestmark = pytest.mark.unit


class HeldProducer:
    """Queues every send; the test decides when (and how) each one is acknowledged."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, asyncio.Future[Any]]] = []

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, **_: Any
    ) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key, value, ack))
        return ack


def _record(node: str) -> NodeCollection:
    return NodeCollection(
        node_id=node,
        campaign_id="cmp-1",
        attempt=1,
        request_id="6f1c2a4e-9b0d-4c1e-8a57-3d2f1e0b9c48",
        correlation_id=None,
        deadline="2026-11-26T12:00:00Z",
        vms=(),
    )


async def test_save_returns_before_the_ack_and_settle_waits_for_it() -> None:
    producer = HeldProducer()
    store = KafkaStateStore(KafkaSettings(), producer, "vnfm-adapter-state")  # type: ignore[arg-type]
    await asyncio.wait_for(store.save({"node-1": _record("node-1"), "node-2": None}), 1)
    assert [(key, value is None) for _, key, value, _ in producer.sent] == [
        (b"node-1", False),
        (b"node-2", True),  # a tombstone
    ]
    settling = asyncio.create_task(store.settle())
    await asyncio.sleep(0.01)
    assert not settling.done()  # the commit must wait for these acks
    for *_, ack in producer.sent:
        ack.set_result(None)
    await asyncio.wait_for(settling, 1)
    await asyncio.wait_for(store.settle(), 1)  # nothing left to wait for


async def test_a_lost_write_fails_the_settle() -> None:
    producer = HeldProducer()
    store = KafkaStateStore(KafkaSettings(), producer, "vnfm-adapter-state")  # type: ignore[arg-type]
    await store.save({"node-1": _record("node-1")})
    producer.sent[0][3].set_exception(TimeoutError("delivery timed out"))
    with pytest.raises(StateWriteLost, match="not written"):
        await store.settle()
