"""`await_while_alive`: the one wait the demo and the benchmarks use on a running deployment."""

from __future__ import annotations

import asyncio

import pytest

from escalator.processes import await_while_alive

pytestmark = pytest.mark.unit


def _alive() -> None:
    return None


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_returns_the_tasks_result() -> None:
    async def answer() -> int:
        await asyncio.sleep(0.02)
        return 42

    task = asyncio.create_task(answer())
    assert await await_while_alive(task, _alive, timeout_s=5, poll_s=0.005) == 42


async def test_a_dead_child_ends_the_wait_and_cancels_the_task() -> None:
    task = asyncio.create_task(_forever())
    polls = 0

    def check_alive() -> None:
        nonlocal polls
        polls += 1
        if polls == 3:
            raise RuntimeError("world exited with 1")

    with pytest.raises(RuntimeError, match="world exited"):
        await await_while_alive(task, check_alive, timeout_s=5, poll_s=0.005)
    assert task.cancelled()


async def test_the_deadline_raises_with_the_callers_message() -> None:
    task = asyncio.create_task(_forever())
    with pytest.raises(TimeoutError, match="3 node"):
        await await_while_alive(
            task, _alive, timeout_s=0.02, timed_out=lambda: "3 node(s) missing", poll_s=0.005
        )
    assert task.cancelled()


async def test_on_poll_can_stop_the_wait_early() -> None:
    task = asyncio.create_task(_forever())
    rounds: list[int] = []

    def enough() -> bool:
        rounds.append(1)
        return len(rounds) >= 2

    assert (
        await await_while_alive(task, _alive, timeout_s=None, poll_s=0.005, on_poll=enough) is None
    )
    assert task.cancelled() and len(rounds) == 2


async def test_the_tasks_own_failure_is_raised() -> None:
    async def broken() -> None:
        raise ValueError("bad record")

    task = asyncio.create_task(broken())
    with pytest.raises(ValueError, match="bad record"):
        await await_while_alive(task, _alive, timeout_s=5, poll_s=0.005)
