"""The Upgrade Manager's state writes: waited for, or sent and settled later (progress only)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.upgrade_manager.domain import NodeRecord
from services.upgrade_manager.state_store import StoredState

pytestmark = pytest.mark.unit


class FakeProducer:
    """Acks each record when told to (or fails it), in send order, like one partition."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, asyncio.Future[Any]]] = []

    async def send(self, topic: str, *, key: bytes, value: bytes, partition: int) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((key, future))
        return future

    def ack_all(self, fail: frozenset[int] = frozenset()) -> None:
        for index, (_, future) in enumerate(self.sent):
            if not future.done():
                if index in fail:
                    future.set_exception(RuntimeError("broker said no"))
                else:
                    future.set_result(None)


def node(percent: float) -> tuple[str, NodeRecord]:
    return ("node/cmp-1/n1", NodeRecord(node_id="n1", detail=f"{percent:.0f}%"))


async def _acking(producer: FakeProducer, stop: asyncio.Event) -> None:
    while not stop.is_set():
        producer.ack_all()
        await asyncio.sleep(0.001)


async def test_later_waited_writes_settle_earlier_unwaited_ones_first() -> None:
    producer = FakeProducer()
    store = StoredState(producer, "state", 6)  # type: ignore[arg-type]
    await store.write("cmp-1", [node(10)], wait=False)
    await store.write("cmp-1", [node(20)], wait=False)
    assert store.records_of("cmp-1") is None  # nothing acknowledged yet
    stop = asyncio.Event()
    acker = asyncio.create_task(_acking(producer, stop))
    await store.write("cmp-1", [node(30)])
    stop.set()
    await acker
    records = store.records_of("cmp-1")
    assert records is not None and b"30%" in records.nodes["n1"]
    assert [key for key, _ in producer.sent] == [b"node/cmp-1/n1"] * 3


async def test_a_failed_unwaited_write_is_only_logged_and_memory_keeps_the_acked_one() -> None:
    producer = FakeProducer()
    store = StoredState(producer, "state", 6)  # type: ignore[arg-type]
    stop = asyncio.Event()
    acker = asyncio.create_task(_acking(producer, stop))
    await store.write("cmp-1", [node(10)])
    stop.set()
    await acker
    await store.write("cmp-1", [node(20)], wait=False)
    producer.ack_all(fail=frozenset({1}))
    await store.settle()  # does not raise
    records = store.records_of("cmp-1")
    assert records is not None and b"10%" in records.nodes["n1"]


async def test_settle_skips_campaigns_forgotten_meanwhile() -> None:
    producer = FakeProducer()
    store = StoredState(producer, "state", 6)  # type: ignore[arg-type]
    stop = asyncio.Event()
    acker = asyncio.create_task(_acking(producer, stop))
    await store.write("cmp-1", [node(10)])
    await store.write("cmp-1", [node(20)], wait=False)
    store.forget({store.partition_of("cmp-1")})
    await store.settle()
    stop.set()
    await acker
    assert store.records_of("cmp-1") is None
