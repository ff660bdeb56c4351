"""What the node agent needs from the node it upgrades.

Nothing from an event payload is ever passed to a shell: an executor gets a validated
`VersionManifest` (see `services.node_agent.domain.manifest_problems`) or a version string the
agent itself recorded, and acts through an API (the simulated world's, later a node's own),
never through a command line. `tests/unit/test_node_agent_core.py` checks the package for shell
use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from schemas.types import VersionManifest

# (phase, percent): called by the executor as it goes; the agent publishes each as progress.
ProgressCallback = Callable[[str, float], Awaitable[None]]

ChangeState = Literal["in_progress", "succeeded", "failed"]


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
    # False for a failure that another attempt cannot cure (the manifest itself is unfit).
    retryable: bool = True


ApplyResult = ApplySucceeded | ApplyFailed


@dataclass(frozen=True)
class RollbackSucceeded:
    """The node runs `version` again, after a reboot into it that succeeded."""

    version: str
    started_here: bool = True


@dataclass(frozen=True)
class RollbackFailed:
    reason: str
    installed_version: str | None = None


RollbackResult = RollbackSucceeded | RollbackFailed


@dataclass(frozen=True)
class HealthReport:
    """The node's health as the executor sees it: `healthy` only if it is up, runs the version
    it was expected to run, and its last boot succeeded; otherwise `reason` says why not."""

    healthy: bool
    installed_version: str
    reason: str = ""


@dataclass(frozen=True)
class LastChange:
    """The latest version change (reboot) the executor knows of on the node."""

    sequence: int
    from_version: str
    to_version: str | None  # None: a plain reboot, no version asked
    state: ChangeState
    started_at: datetime  # aware (UTC)


@dataclass(frozen=True)
class ExecutorRecord:
    """The executor's own record of the node: what a restarted agent re-derives its work from
    (an upgrade's failed attempt, a rollback under way) instead of starting it again."""

    installed_version: str
    rebooting: bool = False
    last: LastChange | None = None


class Executor(Protocol):
    """Applies a version to the node and puts the previous one back.

    Expected failures are returned (`ApplyFailed`, `RollbackFailed`); an exception means the
    outcome is unknown, and the agent's core treats it as a failed attempt.
    """

    async def installed_version(self) -> str:
        """The version the node runs now."""
        ...

    async def record(self) -> ExecutorRecord:
        """The node's installed version and its latest version change (see `ExecutorRecord`)."""
        ...

    async def apply(self, manifest: VersionManifest, on_progress: ProgressCallback) -> ApplyResult:
        """Install `manifest` and return once the node runs it (or the attempt failed).

        Must be safe to call again after the agent crashed mid-apply: an apply toward the same
        version already under way is waited for, never started a second time.
        """
        ...

    async def rollback(
        self, previous_version: str, on_progress: ProgressCallback
    ) -> RollbackResult:
        """Put `previous_version` back (a reboot into it) and return once it runs or failed.

        The version is one the agent recorded itself (what the node ran before the upgrade),
        never one read from a request. A rollback into `previous_version` already under way
        (after a restart of the agent) is waited for, never started a second time.
        """
        ...

    async def health(self, expected_version: str) -> HealthReport:
        """Check the node: up, running `expected_version`, its last boot good."""
        ...
