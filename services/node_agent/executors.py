"""`SimulatedExecutor`: applies a version to a node of the simulated cloud (the world), and
rolls it back.

Everything goes through the world's HTTP API (`WorldClient`); nothing is run in a shell. A
rollback is a reboot into the previous version (`reboot_node(version=previous)`, the world's
existing API), and the node's health is read from the world: up, on the expected version, its
last reboot succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from escalator.world.client import WorldClient, WorldError
from escalator.world.model import NodeView, RebootRecord
from schemas.types import VersionManifest
from services.node_agent.domain import manifest_problems
from services.node_agent.ports import (
    ApplyFailed,
    ApplyResult,
    ApplySucceeded,
    ExecutorRecord,
    HealthReport,
    LastChange,
    ProgressCallback,
    RollbackFailed,
    RollbackResult,
    RollbackSucceeded,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A world that cannot be reached is retried this long before the apply is reported failed.
UNREACHABLE_GRACE_S = 30.0
# The job's inspection read of the node, made just before its apply or rollback starts, serves
# as that step's first read when it is this fresh (one world call fewer per job); an older one
# is read again. Only this agent reboots its node, so nothing it decides on can change between.
INSPECTION_REUSE_S = 1.0


class SimulatedExecutor:
    """Upgrades one world node by rebooting it into the new version.

    The world keeps the latest reboot record of a node, so after a crash of the agent the
    record tells whether a reboot toward the target is under way: then it is waited for, not
    started again (one request never yields two successful applies).
    """

    def __init__(
        self,
        world: WorldClient,
        node_id: str,
        *,
        reboot_s: float | None = None,
        timeout_s: float = 600.0,
        poll_s: float = 0.05,
    ) -> None:
        self._world = world
        self._node_id = node_id
        self._reboot_s = reboot_s
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._inspected: tuple[float, NodeView] | None = None

    async def installed_version(self) -> str:
        return (await self._node()).installed_version

    async def record(self) -> ExecutorRecord:
        node = await self._node()
        self._inspected = (time.monotonic(), node)
        reboot = node.reboot
        last = None
        if reboot is not None:
            last = LastChange(
                sequence=reboot.sequence,
                from_version=reboot.previous_version,
                to_version=reboot.target_version,
                state=reboot.state,
                started_at=datetime.fromtimestamp(reboot.started_at, UTC),
            )
        return ExecutorRecord(
            installed_version=node.installed_version,
            rebooting=node.power == "rebooting",
            last=last,
        )

    async def health(self, expected_version: str) -> HealthReport:
        node = await self._node()
        problems = []
        if node.power != "up":
            problems.append(f"node is {node.power}")
        if node.installed_version != expected_version:
            problems.append(f"node runs {node.installed_version}, not {expected_version}")
        if node.reboot is not None and node.reboot.state == "failed":
            problems.append(f"its last reboot (#{node.reboot.sequence}) failed")
        return HealthReport(
            healthy=not problems,
            installed_version=node.installed_version,
            reason="; ".join(problems),
        )

    async def rollback(
        self, previous_version: str, on_progress: ProgressCallback
    ) -> RollbackResult:
        """Reboot the node into `previous_version`. A reboot into it already under way (this
        rollback, started before the agent restarted) is waited for, not started again; a
        reboot toward another version under way is let finish first."""
        node = await self._fresh_node()
        record = node.reboot
        resuming = (
            node.power == "rebooting"
            and record is not None
            and record.state == "in_progress"
            and record.target_version == previous_version
        )
        if resuming:
            log.info(
                "%s: a reboot into %s is already under way; waiting for it",
                node.id,
                previous_version,
            )
            await on_progress("rebooting (resumed)", 50.0)
        else:
            if node.power == "rebooting":
                await on_progress("waiting for an earlier reboot", 20.0)
                await self._wait_reboot()
            try:
                started = await self._world.reboot_node(
                    self._node_id, duration_s=self._reboot_s, version=previous_version
                )
            except WorldError as err:
                if err.status == 0 or err.status >= 500:
                    raise
                return RollbackFailed(
                    reason=f"reboot refused: {err.message}",
                    installed_version=(await self._node()).installed_version,
                )
            await on_progress("rebooting", 50.0)
        try:
            finished, installed = await self._reboot_over(None if resuming else started)
        except TimeoutError as err:
            return RollbackFailed(reason=str(err))
        if finished.state != "succeeded":
            return RollbackFailed(
                reason=f"reboot #{finished.sequence} into {previous_version} failed",
                installed_version=installed,
            )
        if installed != previous_version:
            return RollbackFailed(
                reason=f"node runs {installed} after rebooting into {previous_version}",
                installed_version=installed,
            )
        await on_progress("rebooted", 90.0)
        return RollbackSucceeded(version=previous_version, started_here=not resuming)

    async def apply(self, manifest: VersionManifest, on_progress: ProgressCallback) -> ApplyResult:
        target = manifest.version
        problems = manifest_problems(manifest)
        if problems:
            return ApplyFailed(reason="; ".join(problems), phase="verify", retryable=False)
        await on_progress("verified", 10.0)
        node = await self._fresh_node()
        record = node.reboot
        resuming = (
            node.power == "rebooting"
            and record is not None
            and record.state == "in_progress"
            and record.target_version == target
        )
        if resuming:
            log.info("%s: a reboot to %s is already under way; waiting for it", node.id, target)
            await on_progress("rebooting (resumed)", 30.0)
        else:
            if node.installed_version == target:
                return ApplySucceeded(version=target, started_here=False)
            if node.power == "rebooting":
                # Someone else's reboot (not toward our target): let it end, then start ours.
                await on_progress("waiting for an earlier reboot", 20.0)
                await self._wait_reboot()
            try:
                started = await self._world.reboot_node(
                    self._node_id, duration_s=self._reboot_s, version=target
                )
            except WorldError as err:
                if err.status == 0 or err.status >= 500:
                    raise
                return ApplyFailed(
                    reason=f"reboot refused: {err.message}",
                    phase="reboot",
                    installed_version=node.installed_version,
                )
            await on_progress("rebooting", 30.0)
        try:
            finished, installed = await self._reboot_over(None if resuming else started)
        except TimeoutError as err:
            return ApplyFailed(reason=str(err), phase="reboot")
        if finished.state != "succeeded":
            return ApplyFailed(
                reason=f"reboot #{finished.sequence} to {target} failed",
                phase="reboot",
                installed_version=finished.previous_version,
            )
        if installed != target:
            return ApplyFailed(
                reason=f"node runs {installed} after rebooting into {target}",
                phase="verify-version",
                installed_version=installed,
            )
        await on_progress("rebooted", 90.0)
        return ApplySucceeded(version=target, started_here=not resuming)

    async def _reboot_over(self, started: RebootRecord | None) -> tuple[RebootRecord, str]:
        """The node's latest reboot once it is over, and the version the node runs then.

        The world's answer to the reboot request (`started`) is itself a read of the reboot: one
        that already ended inside the request (a zero-length one) needs no poll. The world's
        record states the outcome: a succeeded reboot runs its target version, a failed one
        kept the previous one."""
        if started is not None and started.state != "in_progress":
            succeeded = started.state == "succeeded" and started.target_version is not None
            installed = started.target_version if succeeded else started.previous_version
            assert installed is not None
            return started, installed
        node = await self._wait_reboot()
        assert node.reboot is not None
        return node.reboot, node.installed_version

    async def _wait_reboot(self) -> NodeView:
        """The node once its latest reboot is over, as that last poll read it."""
        return await self._retrying(
            lambda: self._world.wait_reboot_over(
                self._node_id, timeout_s=self._timeout_s, poll_s=self._poll_s
            )
        )

    async def _fresh_node(self) -> NodeView:
        """The inspection's read if it is fresh enough (used once), else a new read."""
        inspected, self._inspected = self._inspected, None
        if inspected is not None and time.monotonic() - inspected[0] <= INSPECTION_REUSE_S:
            return inspected[1]
        return await self._node()

    async def _node(self) -> NodeView:
        return await self._retrying(lambda: self._world.node(self._node_id))

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Ride out a short unreachability of the world (status 0): a node agent must not
        report a failure just because its API blinked."""
        deadline = time.monotonic() + UNREACHABLE_GRACE_S
        delay = 0.1
        while True:
            try:
                return await call()
            except WorldError as err:
                if err.status != 0 or time.monotonic() > deadline:
                    raise
                log.warning("world unreachable (%s); retrying in %.1fs", err.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


__all__ = ["UNREACHABLE_GRACE_S", "SimulatedExecutor", "manifest_problems"]
