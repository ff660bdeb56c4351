"""What the node agent needs from the node it upgrades."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from schemas.types import VersionManifest

# (phase, percent): called by the executor as it goes; the agent publishes each as progress.
ProgressCallback = Callable[[str, float], Awaitable[None]]


@dataclass(frozen=True)
class ApplySucceeded:
    version: str
    # False when the executor found the reboot to this version already under way (started by a
    # previous incarnation of the agent) and only waited for it.
    started_here: bool = True


@dataclass(frozen=True)
class ApplyFailed:
    reason: str
    phase: str
    installed_version: str | None = None


ApplyResult = ApplySucceeded | ApplyFailed


class Executor(Protocol):
    """Applies a version to the node. Rolling back a failed apply comes with the
    failure-handling work; until then a failed node stays as the failure left it (the Upgrade
    Manager keeps it quarantined in maintenance)."""

    async def installed_version(self) -> str:
        """The version the node runs now."""
        ...

    async def apply(self, manifest: VersionManifest, on_progress: ProgressCallback) -> ApplyResult:
        """Install `manifest` and return once the node runs it (or the attempt failed).

        Must be safe to call again after the agent crashed mid-apply: an apply toward the same
        version already under way is waited for, never started a second time. Expected failures
        are returned as `ApplyFailed`; an exception means the outcome is unknown.
        """
        ...
