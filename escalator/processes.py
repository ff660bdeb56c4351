"""Running Escalator's services as separate OS processes: for the demo and integration tests.

Each child writes its output to its own log file, dies with its parent (Linux
PR_SET_PDEATHSIG), and can be killed with SIGKILL and started again under the same name, which is
what the restart-safety and chaos tests need.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the group's stop_all() and atexit still stop the children


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Named child processes sharing a log directory and a base environment."""

    log_dir: Path
    base_env: Mapping[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.base_env)
        env.update(extra or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        wait_for: str | None = None,
        timeout_s: float = 30.0,
    ) -> Child | re.Match[str]:
        """Start `argv` as `name`. With `wait_for` (a regex), return its match on the child's
        output once it appears (RuntimeError if the child dies or times out first)."""
        if name in self.children and self.children[name].alive:
            raise RuntimeError(f"{name} is already running")
        log_path = self.log_dir / f"{name}.log"
        full_env = self._env(env)
        log = log_path.open("ab")
        process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if wait_for else log,
            stderr=log,
            env=full_env,
            preexec_fn=_die_with_parent,
        )
        previous = self.children.get(name)
        child = Child(
            name, list(argv), full_env, log_path, process, previous.restarts + 1 if previous else 0
        )
        self.children[name] = child
        if wait_for is None:
            log.close()
            return child
        return self._wait_for_line(child, log, re.compile(wait_for), timeout_s)

    def _wait_for_line(
        self, child: Child, log: object, pattern: re.Pattern[str], timeout_s: float
    ) -> re.Match[str]:
        assert child.process.stdout is not None
        found: list[re.Match[str]] = []
        ready = threading.Event()

        def pump() -> None:
            # Keep copying the child's stdout to its log after the line is found.
            assert child.process.stdout is not None
            with log:  # type: ignore[attr-defined]
                for raw in child.process.stdout:
                    log.write(raw)  # type: ignore[attr-defined]
                    log.flush()  # type: ignore[attr-defined]
                    if not found:
                        match = pattern.search(raw.decode(errors="replace"))
                        if match:
                            found.append(match)
                            ready.set()
            ready.set()

        threading.Thread(target=pump, name=f"pump-{child.name}", daemon=True).start()
        if not ready.wait(timeout_s) or not found:
            tail = child.log_tail()
            self.kill(child.name)
            raise RuntimeError(f"{child.name} did not print /{pattern.pattern}/:\n{tail}")
        return found[0]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        child = self.children[name]
        if child.alive:
            child.process.send_signal(sig)
            try:
                child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def restart(self, name: str) -> Child:
        old = self.children[name]
        self.kill(name)
        result = self.spawn(name, old.argv, env=old.env)
        assert isinstance(result, Child)
        return result

    def dead(self) -> list[Child]:
        return [c for c in self.children.values() if not c.alive]

    def stop_all(self, grace_s: float = 10.0) -> None:
        for child in self.children.values():
            if child.alive:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children.values():
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def wait_until(
    condition: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(interval_s)


T = TypeVar("T")


async def await_while_alive(
    task: asyncio.Task[T],
    check_alive: Callable[[], None],
    *,
    timeout_s: float | None,
    timed_out: Callable[[], str] = lambda: "timed out",
    poll_s: float = 1.0,
    on_poll: Callable[[], bool] | None = None,
) -> T | None:
    """The result of `task`, waited for while the processes it depends on live.

    Every `poll_s`: `check_alive()` (which raises when a child died: the task would never end),
    then the deadline (`TimeoutError(timed_out())` once `timeout_s` passed), then `on_poll()`,
    which may stop the wait early by returning True (the result is then None). However the wait
    ends, an unfinished task is cancelled and awaited.
    """
    give_up = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not task.done():
            check_alive()
            if give_up is not None and time.monotonic() > give_up:
                raise TimeoutError(timed_out())
            if on_poll is not None and on_poll():
                return None
            await asyncio.wait({task}, timeout=poll_s)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
