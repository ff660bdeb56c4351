"""The simulated executor's world calls: what it reads, and when it reuses the inspection."""

from __future__ import annotations

from typing import Any

import pytest

from escalator.world.model import NodeView, RebootRecord
from schemas.types import VersionManifest
from services.node_agent import executors
from services.node_agent.executors import SimulatedExecutor
from services.node_agent.ports import ApplyFailed, ApplySucceeded, RollbackSucceeded

pytestmark = pytest.mark.unit

NODE = "node-7"


class CountingWorld:
    """One node whose reboots finish at once (or, `instant=False`, by the next read, as a
    reboot that takes time); `fail` makes them fail. Counts every call."""

    def __init__(self, *, instant: bool = True, fail: bool = False) -> None:
        self.version = "1.0.0"
        self.reboot: RebootRecord | None = None
        self.reads = 0
        self.calls: list[str] = []
        self.instant = instant
        self.fail = fail

    def _view(self) -> NodeView:
        return NodeView(
            id=NODE,
            vcpus=32,
            ram_mb=65536,
            failure_domain="fd-0",
            installed_version=self.version,
            reboot=self.reboot,
            used_vcpus=0,
            used_ram_mb=0,
            free_vcpus=32,
            free_ram_mb=65536,
            vm_ids=[],
            incoming_vm_ids=[],
        )

    async def node(self, node_id: str) -> NodeView:
        self.reads += 1
        self.calls.append("node")
        if self.reboot is not None and self.reboot.state == "in_progress":
            self._finish()
        return self._view()

    def _finish(self) -> None:
        assert self.reboot is not None
        self.reboot.state = "failed" if self.fail else "succeeded"
        self.reboot.finished_at = 0.0
        if not self.fail:
            assert self.reboot.target_version is not None
            self.version = self.reboot.target_version

    async def reboot_node(self, node_id: str, **kwargs: Any) -> RebootRecord:
        self.calls.append("reboot")
        self.reboot = RebootRecord(
            sequence=1,
            state="in_progress",
            started_at=0.0,
            finishes_at=0.0,
            previous_version=self.version,
            target_version=kwargs["version"],
        )
        if self.instant:
            self._finish()
        return self.reboot.model_copy()

    async def wait_reboot_over(self, node_id: str, **kwargs: Any) -> NodeView:
        return await self.node(node_id)


MANIFEST = VersionManifest(
    version="2.0.0",
    files=[{"name": "nova-2.0.0.rpm", "sha256": "a" * 64, "uri": "https://r/x.rpm"}],
)


async def _progress(phase: str, percent: float) -> None:
    return None


async def test_apply_right_after_the_inspection_reuses_its_read() -> None:
    world = CountingWorld()
    executor = SimulatedExecutor(world, NODE)  # type: ignore[arg-type]
    record = await executor.record()
    assert record.installed_version == "1.0.0"
    outcome = await executor.apply(MANIFEST, _progress)
    assert isinstance(outcome, ApplySucceeded) and outcome.started_here
    # The inspection serves as the apply's first read, and the reboot's answer shows it over
    # (zero-length): no read before it, no poll after it.
    assert world.calls == ["node", "reboot"]
    assert outcome.version == "2.0.0" == world.version


async def test_a_reboot_that_takes_time_is_polled_until_over() -> None:
    world = CountingWorld(instant=False)
    executor = SimulatedExecutor(world, NODE, poll_s=0)  # type: ignore[arg-type]
    await executor.record()
    outcome = await executor.apply(MANIFEST, _progress)
    assert isinstance(outcome, ApplySucceeded) and outcome.version == "2.0.0"
    assert world.calls == ["node", "reboot", "node"]


@pytest.mark.parametrize("instant", [True, False])
async def test_a_failed_reboot_is_reported_with_the_version_kept(instant: bool) -> None:
    world = CountingWorld(instant=instant, fail=True)
    executor = SimulatedExecutor(world, NODE, poll_s=0)  # type: ignore[arg-type]
    outcome = await executor.apply(MANIFEST, _progress)
    assert isinstance(outcome, ApplyFailed)
    assert outcome.phase == "reboot" and outcome.installed_version == "1.0.0"
    assert outcome.reason == "reboot #1 to 2.0.0 failed"


@pytest.mark.parametrize(("instant", "calls"), [(True, 2), (False, 3)])
async def test_a_rollback_reads_the_reboot_as_the_apply_does(instant: bool, calls: int) -> None:
    world = CountingWorld(instant=instant)
    world.version = "2.0.0"
    executor = SimulatedExecutor(world, NODE, poll_s=0)  # type: ignore[arg-type]
    outcome = await executor.rollback("1.0.0", _progress)
    assert isinstance(outcome, RollbackSucceeded) and outcome.version == "1.0.0"
    assert world.version == "1.0.0" and len(world.calls) == calls


async def test_a_stale_or_used_inspection_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    world = CountingWorld()
    executor = SimulatedExecutor(world, NODE)  # type: ignore[arg-type]
    monkeypatch.setattr(executors, "INSPECTION_REUSE_S", -1.0)  # every inspection is stale
    await executor.record()
    await executor.apply(MANIFEST, _progress)
    assert world.calls == ["node", "node", "reboot"]
    # Used once only: a second apply (now a no-op: the node runs the target) reads afresh.
    monkeypatch.setattr(executors, "INSPECTION_REUSE_S", 60.0)
    world.calls.clear()
    await executor.apply(MANIFEST, _progress)
    assert world.calls == ["node"]
