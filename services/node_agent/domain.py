"""The pure decision core of one node's agent.

`decide(state, input, ctx) -> (state, commands)` reads no clock and does no I/O: the adapter
(`service.py`) feeds it `NodeUpgradeRequested` events and the results of the job it runs, and
carries out the commands it returns (publish an event, start the job).

Rules, for the agent of node `ctx.node_id`:

* a request for another node is ignored (it shares this node's partition, nothing more);
* the node already runs the target version -> `NodeUpgraded(applied=False)`, never a second
  apply; after a restart this is how an upgrade finished by the previous incarnation is answered;
* a job toward the same target is running -> nothing: the request is a duplicate (re-sent
  attempt or redelivery) and the running job's result answers it;
* a job toward another target is running -> `NodeUpgradeFailed(phase="accept")`, the node is busy;
* the very request whose job failed comes again (redelivery) -> the same failure again; a new
  attempt (another event id) is a fresh job;
* otherwise -> `NodeUpgradeAccepted` and `StartJob`.

Job results become `NodeUpgradeProgressed`, `NodeUpgraded(applied=True)` or
`NodeUpgradeFailed`. Every reply is keyed by the request's campaign (NODE_EVENTS) and carries the
request's id as causation. Reply ids are uuid5 of the request id and the reply, so that the same
reply rebuilt after a redelivery is recognisably the same event.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from schemas.envelope import Event, command_id
from schemas.events import (
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
)
from schemas.types import VersionManifest

ACCEPTED_PHASE = "accepted"
ACCEPT_FAILURE_PHASE = "accept"


@dataclass(frozen=True)
class AgentContext:
    """What a decision may read besides the state: who we are and what time it is."""

    node_id: str
    producer: str
    now: datetime


@dataclass(frozen=True)
class Job:
    """The upgrade being applied, with what its replies need (campaign, causation)."""

    command_id: uuid.UUID
    campaign_id: str | None
    correlation_id: uuid.UUID | None
    target_version: str
    phase: str = ACCEPTED_PHASE
    percent: float = 0.0


@dataclass(frozen=True)
class FinishedJob:
    command_id: uuid.UUID
    target_version: str
    succeeded: bool
    reason: str = ""
    phase: str = ""


@dataclass(frozen=True)
class AgentState:
    installed_version: str
    job: Job | None = None
    last_finished: FinishedJob | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None


# --- inputs from the job runner ------------------------------------------------------------


@dataclass(frozen=True)
class JobProgressed:
    command_id: uuid.UUID
    phase: str
    percent: float


@dataclass(frozen=True)
class JobSucceeded:
    command_id: uuid.UUID
    version: str


@dataclass(frozen=True)
class JobFailed:
    command_id: uuid.UUID
    reason: str
    phase: str
    installed_version: str | None = None


JobResult = JobProgressed | JobSucceeded | JobFailed
Input = NodeUpgradeRequested | JobResult


# --- commands for the adapter --------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish `event` on NODE_EVENTS (keyed by its campaign)."""

    event: Event


@dataclass(frozen=True)
class StartJob:
    """Apply `manifest` in the background and feed its results back as `JobResult`s."""

    command_id: uuid.UUID
    manifest: VersionManifest


Command = Publish | StartJob


def initial_state(installed_version: str) -> AgentState:
    return AgentState(installed_version=installed_version)


def decide(state: AgentState, event: Input, ctx: AgentContext) -> tuple[AgentState, list[Command]]:
    match event:
        case NodeUpgradeRequested():
            return _on_request(state, event, ctx)
        case JobProgressed() | JobSucceeded() | JobFailed():
            return _on_job_result(state, event, ctx)
    raise TypeError(f"unexpected input {type(event).__name__}")  # pragma: no cover


def _on_request(
    state: AgentState, request: NodeUpgradeRequested, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    if request.node_id != ctx.node_id:
        return state, []
    target = request.manifest.version
    job = state.job
    if job is not None:
        if job.command_id == request.event_id or job.target_version == target:
            return state, []
        reason = f"busy upgrading to {job.target_version} (campaign {job.campaign_id})"
        return state, [_failed_for_request(state, request, ctx, reason, ACCEPT_FAILURE_PHASE)]
    if state.installed_version == target:
        already = NodeUpgraded(
            **_envelope_of_request(request, ctx, "already-at-target"),
            node_id=ctx.node_id,
            version=target,
            applied=False,
        )
        return state, [Publish(already)]
    last = state.last_finished
    if last is not None and last.command_id == request.event_id and not last.succeeded:
        return state, [_failed_for_request(state, request, ctx, last.reason, last.phase)]
    new_job = Job(
        command_id=request.event_id,
        campaign_id=request.campaign_id,
        correlation_id=request.correlation_id,
        target_version=target,
    )
    accepted = NodeUpgradeAccepted(
        **_envelope_of_request(request, ctx, "accepted"),
        node_id=ctx.node_id,
        target_version=target,
    )
    return (
        replace(state, job=new_job),
        [Publish(accepted), StartJob(command_id=request.event_id, manifest=request.manifest)],
    )


def _on_job_result(
    state: AgentState, result: JobResult, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    job = state.job
    if job is None or job.command_id != result.command_id:
        return state, []  # a result of a job that is no longer ours to report
    match result:
        case JobProgressed():
            progressed = NodeUpgradeProgressed(
                **_envelope_of_job(job, ctx, "progress", result.phase, result.percent),
                node_id=ctx.node_id,
                phase=result.phase,
                percent=result.percent,
            )
            new_job = replace(job, phase=result.phase, percent=result.percent)
            return replace(state, job=new_job), [Publish(progressed)]
        case JobSucceeded() if result.version == job.target_version:
            upgraded = NodeUpgraded(
                **_envelope_of_job(job, ctx, "upgraded"),
                node_id=ctx.node_id,
                version=result.version,
                applied=True,
            )
            finished = FinishedJob(job.command_id, job.target_version, succeeded=True)
            new_state = AgentState(installed_version=result.version, last_finished=finished)
            return new_state, [Publish(upgraded)]
        case JobSucceeded():
            return _job_failed(
                state,
                job,
                ctx,
                JobFailed(
                    command_id=job.command_id,
                    reason=f"node runs {result.version} after the upgrade, not "
                    f"{job.target_version}",
                    phase="verify-version",
                    installed_version=result.version,
                ),
            )
        case JobFailed():
            return _job_failed(state, job, ctx, result)
    raise TypeError(f"unexpected job result {type(result).__name__}")  # pragma: no cover


def _job_failed(
    state: AgentState, job: Job, ctx: AgentContext, result: JobFailed
) -> tuple[AgentState, list[Command]]:
    installed = result.installed_version or state.installed_version
    failed = NodeUpgradeFailed(
        **_envelope_of_job(job, ctx, "failed"),
        node_id=ctx.node_id,
        reason=result.reason,
        phase=result.phase,
        installed_version=installed,
    )
    finished = FinishedJob(
        job.command_id,
        job.target_version,
        succeeded=False,
        reason=result.reason,
        phase=result.phase,
    )
    return AgentState(installed_version=installed, last_finished=finished), [Publish(failed)]


def _failed_for_request(
    state: AgentState, request: NodeUpgradeRequested, ctx: AgentContext, reason: str, phase: str
) -> Publish:
    return Publish(
        NodeUpgradeFailed(
            **_envelope_of_request(request, ctx, "failed"),
            node_id=ctx.node_id,
            reason=reason,
            phase=phase,
            installed_version=state.installed_version,
        )
    )


def _reply_id(cause: uuid.UUID, *parts: object) -> uuid.UUID:
    return command_id("node-agent", cause, *parts)


def _envelope_of_request(
    request: NodeUpgradeRequested, ctx: AgentContext, *id_parts: object
) -> dict[str, Any]:
    return request.caused(
        event_id=_reply_id(request.event_id, *id_parts),
        producer=ctx.producer,
        occurred_at=ctx.now,
    )


def _envelope_of_job(job: Job, ctx: AgentContext, *id_parts: object) -> dict[str, Any]:
    return {
        "event_id": _reply_id(job.command_id, *id_parts),
        "campaign_id": job.campaign_id,
        "correlation_id": job.correlation_id,
        "causation_id": job.command_id,
        "producer": ctx.producer,
        "occurred_at": ctx.now,
    }
