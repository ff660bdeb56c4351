"""The simulated executor's world calls: what it reads, and when it reuses the inspection."""

from __future__ import annotations

from typing import Any

import pytest

from escalator.world.model import NodeView, RebootRecord
from schemas.types import VersionManifest
from services.node_agent import executors
from services.node_agent.executors import SimulatedExecutor
from services.node_agent.ports import ApplySucceeded

pytestmark = pytest.mark.unit

NODE = "node-7"


class CountingWorld:
    """One node whose reboots finish at once; counts every read."""

    def __init__(self) -> None:
        self.version = "1.0.0"
        self.reboot: RebootRecord | None = None
        self.reads = 0
        self.calls: list[str] = []

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
        return self._view()

    async def reboot_node(self, node_id: str, **kwargs: Any) -> RebootRecord:
        self.calls.append("reboot")
        previous, self.version = self.version, kwargs["version"]
        self.reboot = RebootRecord(
            sequence=1,
            state="succeeded",
            started_at=0.0,
            finishes_at=0.0,
            finished_at=0.0,
            previous_version=previous,
            target_version=self.version,
        )
        return self.reboot

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
    # inspection, reboot, the wait's read (which also checks the version): no second read first
    assert world.calls == ["node", "reboot", "node"]


async def test_a_stale_or_used_inspection_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    world = CountingWorld()
    executor = SimulatedExecutor(world, NODE)  # type: ignore[arg-type]
    monkeypatch.setattr(executors, "INSPECTION_REUSE_S", -1.0)  # every inspection is stale
    await executor.record()
    await executor.apply(MANIFEST, _progress)
    assert world.calls == ["node", "node", "reboot", "node"]
    # Used once only: a second apply (now a no-op: the node runs the target) reads afresh.
    monkeypatch.setattr(executors, "INSPECTION_REUSE_S", 60.0)
    world.calls.clear()
    await executor.apply(MANIFEST, _progress)
    assert world.calls == ["node"]
