"""The pure decision core of one node's agent.

`decide(state, input, ctx) -> (state, commands)` reads no clock and does no I/O: the adapter
(`service.py`) feeds it `NodeUpgradeRequested` and `NodeRollbackRequested` events and the
results of the job steps it runs, and carries out the commands it returns (publish an event,
run a job step: inspect the executor's record, apply, wait before a retry, roll back, check
health).

Requests, for the agent of node `ctx.node_id`:

* a request for another node is ignored with a reason (`Ignore`, logged by the adapter; it
  shares this node's partition, nothing more);
* an upgrade whose manifest is unfit (`manifest_problems`: files that repeat, names that are
  paths, URIs with credentials or `..`, files that do not belong to the manifest's version) is
  refused with `NodeUpgradeFailed(phase="validate")`; nothing is applied;
* the node already runs the target version -> `NodeUpgraded(applied=False)`, never a second
  apply; after a restart this is how an upgrade finished by the previous incarnation is answered;
* a job of the same kind toward the same target is running -> the request is a duplicate
  (re-sent attempt or redelivery) and the running job answers it: its final answer goes to the
  newest attempt of the same campaign (the one the requester waits on);
* a job toward another target (or a rollback) is running -> `NodeUpgradeFailed(phase="accept")`
  (busy); a rollback request then gets `NodeRollbackCompleted(healthy=False)`, refused;
* a request the last finished job answered comes again (redelivery) -> the same answer again;
* otherwise -> `NodeUpgradeAccepted` and a new job, whose first step is `Inspect`.

An upgrade job:

1. `Inspect`: the executor's record (`ExecutorRecord`) says whether this request's work is
   already under way. A reboot toward the target started after the request and failed is a
   failed first attempt (the agent restarted during the backoff); a reboot into another version
   started after the request is this upgrade's rollback (the agent restarted mid-rollback): it
   is resumed, not the upgrade. Otherwise the apply starts (the executor itself resumes a reboot
   toward the target under way).
2. Apply, up to `ctx.policy.max_apply_attempts` times, with `ScheduleRetry` between attempts:
   `backoff_s`, doubling, capped at `backoff_max_s`. Success -> `NodeUpgraded(applied=True)`.
3. After the last failure: `StartRollback(previous_version)` (the version the node ran when the
   job started; never a version from a payload), then `CheckHealth`, then ONE
   `NodeUpgradeFailed` with `attempts`, `rolled_back`, `healthy` (rolled back and healthy: the
   node may return to service) and the last apply failure's reason and phase.

A rollback request (`NodeRollbackRequested(target_version)`, an operator's abort): the agent
rolls the node back to the version it ran before the campaign's upgrade to `target_version` and
answers `NodeRollbackCompleted(installed_version, healthy, reason)`. The version comes from the
agent's memory of that campaign's upgrade, or (after a restart) from the executor's record; a
target the agent did not apply in that campaign is refused. If the node already runs the
previous version, its health is checked and reported (no reboot). A rollback request arriving
while the campaign's upgrade job runs joins it: no further retries, the node is rolled back once
the step under way ends, and the job answers both requests.

Every reply is keyed by the request's campaign (NODE_EVENTS) and carries the request's id as
causation. Reply ids are uuid5 of the request id and the reply, so that the same reply rebuilt
after a redelivery is recognisably the same event.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from schemas.envelope import Event, command_id
from schemas.events import (
    NodeRollbackCompleted,
    NodeRollbackRequested,
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
)
from schemas.types import VersionManifest
from services.node_agent.ports import ExecutorRecord, LastChange

ACCEPTED_PHASE = "accepted"
ACCEPT_FAILURE_PHASE = "accept"
VALIDATE_PHASE = "validate"
ROLLBACK_PHASE = "rollback"
PHASE_MAX = 100
ROLLBACK_REASON_MAX = 2000

JobKind = Literal["upgrade", "rollback"]


# --- manifest validation -------------------------------------------------------------------

# A file name is installed as-is: a plain name, no path, no leading dot or dash.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
# A version-like token: dotted numbers standing on their own ("2.0.0" in "nova-2.0.0.rpm", not
# "3.11" in "python3.11").
_VERSION_TOKEN = re.compile(r"(?<![A-Za-z0-9.])\d+(?:\.\d+)+(?![A-Za-z0-9]|\.\d)")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def _mentions(text: str, version: str) -> bool:
    """`version` appears in `text` on its own (not as part of a longer version)."""
    pattern = r"(?<![A-Za-z0-9.])" + re.escape(version) + r"(?![A-Za-z0-9]|\.\d)"
    return re.search(pattern, text) is not None


def _other_versions_only(text: str, version: str) -> list[str]:
    """The version-like tokens of `text` if it has some and none is `version`."""
    tokens = _VERSION_TOKEN.findall(text)
    if not tokens or _mentions(text, version):
        return []
    return sorted(set(tokens))


def manifest_problems(manifest: VersionManifest) -> list[str]:
    """What makes a manifest unfit to install, beyond what its schema already checks.

    Every file must belong to the manifest's version: its name or its URI's path names the
    version, and neither names only other versions (a `nova-28.0.3.rpm` in a 29.1.0 manifest).
    Names are plain file names; URIs carry no credentials, no `..` and no control characters.
    """
    problems: list[str] = []
    version = manifest.version
    names = [f.name for f in manifest.files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"files repeat: {', '.join(duplicates)}")
    for file in manifest.files:
        name = file.name
        if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
            problems.append(f"file name {name!r} is a path, not a name")
            continue
        if _FILE_NAME.fullmatch(name) is None:
            problems.append(f"file name {name!r} is not a plain file name")
            continue
        uri = file.uri
        if _CONTROL.search(uri) or "\\" in uri:
            problems.append(f"URI of {name} has spaces, control characters or backslashes")
            continue
        parts = urlsplit(uri)
        if "@" in parts.netloc:
            problems.append(f"URI of {name} carries credentials")
        path = unquote(parts.path)
        if ".." in path.split("/"):
            problems.append(f"URI of {name} climbs out of its directory ('..')")
        if not (_mentions(name, version) or _mentions(path, version)):
            problems.append(
                f"{name} does not belong to version {version}: neither its name "
                "nor its URI names it"
            )
            continue
        for what, text in (("name", name), ("URI", path)):
            others = _other_versions_only(text, version)
            if others:
                problems.append(
                    f"{name} does not belong to version {version}: its {what} names "
                    f"{', '.join(others)}"
                )
    return problems


# --- context, state ------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed apply is retried before the node is rolled back."""

    max_apply_attempts: int = 3
    backoff_s: float = 5.0
    backoff_max_s: float = 120.0

    def backoff_after(self, attempt: int) -> float:
        """The pause after the `attempt`-th failed apply: base, 2x, 4x ... capped."""
        return float(min(self.backoff_s * 2.0 ** min(attempt - 1, 60), self.backoff_max_s))


@dataclass(frozen=True)
class AgentContext:
    """What a decision may read besides the state: who we are, what time it is, the policy."""

    node_id: str
    producer: str
    now: datetime
    policy: RetryPolicy = RetryPolicy()


class Stage(StrEnum):
    INSPECTING = "inspecting"
    APPLYING = "applying"
    BACKING_OFF = "backing-off"
    ROLLING_BACK = "rolling-back"
    CHECKING = "checking-health"


@dataclass(frozen=True)
class Reply:
    """A request a job answers: the envelope its replies need."""

    request_id: uuid.UUID
    campaign_id: str | None
    correlation_id: uuid.UUID | None
    attempt: int

    @classmethod
    def to(cls, request: NodeUpgradeRequested | NodeRollbackRequested) -> Reply:
        return cls(request.event_id, request.campaign_id, request.correlation_id, request.attempt)


@dataclass(frozen=True)
class Job:
    """The work under way (one at a time), with what its replies need."""

    command_id: uuid.UUID  # the request that started it; job results are routed by it
    campaign_id: str | None
    correlation_id: uuid.UUID | None
    target_version: str  # upgrade: the version installed; rollback: the one rolled back from
    kind: JobKind = "upgrade"
    stage: Stage = Stage.INSPECTING
    previous_version: str = ""  # what the node ran before: where a rollback goes
    manifest: VersionManifest | None = None
    requested_at: datetime | None = None
    attempt: int = 1
    phase: str = ACCEPTED_PHASE
    percent: float = 0.0
    reply: Reply | None = None  # where the final answer goes (the newest attempt)
    rollback_reply: Reply | None = None  # an abort's rollback request joined to an upgrade
    upgraded: bool = False  # the apply succeeded (then rolled back for an abort)
    rolled_back: bool = False
    last_reason: str = ""
    last_phase: str = ""
    rollback_reason: str = ""
    published: tuple[Event, ...] = ()  # final answers already published (an aborted success)


@dataclass(frozen=True)
class FinishedJob:
    """The last job that ended, and its final answers (repeated to a redelivered request)."""

    command_id: uuid.UUID
    target_version: str
    succeeded: bool
    reason: str = ""
    phase: str = ""
    covered: frozenset[uuid.UUID] = frozenset()  # every request the job answered
    answers: tuple[Event, ...] = ()


@dataclass(frozen=True)
class UpgradeMemory:
    """What the agent last upgraded, for which campaign: a rollback request is checked
    against it and goes back to `from_version`."""

    campaign_id: str | None
    from_version: str
    to_version: str


@dataclass(frozen=True)
class AgentState:
    installed_version: str
    job: Job | None = None
    last_finished: FinishedJob | None = None
    last_upgrade: UpgradeMemory | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None


# --- inputs from the job runner ------------------------------------------------------------


@dataclass(frozen=True)
class Inspected:
    command_id: uuid.UUID
    record: ExecutorRecord | None  # None: the record could not be read


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
    retryable: bool = True


@dataclass(frozen=True)
class RetryDue:
    command_id: uuid.UUID
    attempt: int


@dataclass(frozen=True)
class RollbackFinished:
    command_id: uuid.UUID
    rolled_back: bool
    installed_version: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class HealthChecked:
    command_id: uuid.UUID
    healthy: bool
    installed_version: str
    reason: str = ""


JobResult = (
    Inspected
    | JobProgressed
    | JobSucceeded
    | JobFailed
    | RetryDue
    | RollbackFinished
    | HealthChecked
)
Request = NodeUpgradeRequested | NodeRollbackRequested
Input = Request | JobResult


# --- commands for the adapter --------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish `event` on NODE_EVENTS (keyed by its campaign)."""

    event: Event


@dataclass(frozen=True)
class Ignore:
    """Nothing to do with the input; the adapter logs `reason`."""

    reason: str


@dataclass(frozen=True)
class Inspect:
    """Read the executor's record; feed back `Inspected`."""

    command_id: uuid.UUID


@dataclass(frozen=True)
class StartJob:
    """Apply `manifest` (attempt `attempt`); feed back progress, then success or failure."""

    command_id: uuid.UUID
    manifest: VersionManifest
    attempt: int = 1


@dataclass(frozen=True)
class ScheduleRetry:
    """Wait `delay_s`, then feed back `RetryDue(attempt)` (unless the job moved on)."""

    command_id: uuid.UUID
    attempt: int
    delay_s: float


@dataclass(frozen=True)
class StartRollback:
    """Roll the node back to `to_version`; feed back `RollbackFinished`."""

    command_id: uuid.UUID
    to_version: str


@dataclass(frozen=True)
class CheckHealth:
    """Check the node's health against `expected_version`; feed back `HealthChecked`."""

    command_id: uuid.UUID
    expected_version: str


JobCommand = Inspect | StartJob | ScheduleRetry | StartRollback | CheckHealth
Command = Publish | Ignore | JobCommand


def initial_state(installed_version: str) -> AgentState:
    return AgentState(installed_version=installed_version)


def decide(state: AgentState, event: Input, ctx: AgentContext) -> tuple[AgentState, list[Command]]:
    match event:
        case NodeUpgradeRequested():
            return _on_upgrade_request(state, event, ctx)
        case NodeRollbackRequested():
            return _on_rollback_request(state, event, ctx)
        case (
            Inspected()
            | JobProgressed()
            | JobSucceeded()
            | JobFailed()
            | RetryDue()
            | RollbackFinished()
            | HealthChecked()
        ):
            return _on_job_result(state, event, ctx)
    raise TypeError(f"unexpected input {type(event).__name__}")  # pragma: no cover


# --- requests ------------------------------------------------------------------------------


def _not_ours(request: Request, ctx: AgentContext) -> Ignore | None:
    if request.node_id == ctx.node_id:
        return None
    return Ignore(
        f"{request.event_type} {request.event_id} is for node {request.node_id}, "
        f"not {ctx.node_id}: ignored"
    )


def _on_upgrade_request(
    state: AgentState, request: NodeUpgradeRequested, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    foreign = _not_ours(request, ctx)
    if foreign is not None:
        return state, [foreign]
    problems = manifest_problems(request.manifest)
    if problems:
        reason = "manifest refused: " + "; ".join(problems)
        return state, [_refuse_upgrade(state, request, ctx, reason, VALIDATE_PHASE)]
    target = request.manifest.version
    job = state.job
    if job is not None:
        if job.kind == "upgrade" and (
            job.command_id == request.event_id or job.target_version == target
        ):
            return replace(state, job=_follow(job, request)), []
        doing = "upgrading to" if job.kind == "upgrade" else "rolling back from"
        reason = f"busy {doing} {job.target_version} (campaign {job.campaign_id})"
        return state, [_refuse_upgrade(state, request, ctx, reason, ACCEPT_FAILURE_PHASE)]
    if state.installed_version == target:
        already = NodeUpgraded(
            **_envelope_of_request(request, ctx, "already-at-target"),
            node_id=ctx.node_id,
            version=target,
            applied=False,
        )
        return state, [Publish(already)]
    again = _answer_again(state.last_finished, request, ctx)
    if again:
        return state, [Publish(e) for e in again]
    new_job = Job(
        command_id=request.event_id,
        campaign_id=request.campaign_id,
        correlation_id=request.correlation_id,
        target_version=target,
        kind="upgrade",
        previous_version=state.installed_version,
        manifest=request.manifest,
        requested_at=request.occurred_at,
        reply=Reply.to(request),
    )
    accepted = NodeUpgradeAccepted(
        **_envelope_of_request(request, ctx, "accepted"),
        node_id=ctx.node_id,
        target_version=target,
    )
    memory = UpgradeMemory(request.campaign_id, state.installed_version, target)
    return (
        replace(state, job=new_job, last_upgrade=memory),
        [Publish(accepted), Inspect(request.event_id)],
    )


def _follow(job: Job, request: Request) -> Job:
    """A newer attempt of the job's own request (same campaign): the final answer goes to it,
    since the requester ignores answers to attempts it has re-sent."""
    reply = Reply.to(request)
    if job.kind == "upgrade" and isinstance(request, NodeRollbackRequested):
        current = job.rollback_reply
        if current is None or reply.attempt > current.attempt:
            return replace(job, rollback_reply=reply)
        return job
    current = job.reply
    if (
        current is not None
        and request.campaign_id == current.campaign_id
        and reply.attempt > current.attempt
    ):
        return replace(job, reply=reply)
    return job


def _on_rollback_request(
    state: AgentState, request: NodeRollbackRequested, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    foreign = _not_ours(request, ctx)
    if foreign is not None:
        return state, [foreign]
    target = request.target_version
    job = state.job
    if job is not None:
        if job.campaign_id == request.campaign_id and job.target_version == target:
            return _join_rollback(state, job, request, ctx)
        doing = "upgrading to" if job.kind == "upgrade" else "rolling back from"
        reason = f"refused: busy {doing} {job.target_version} (campaign {job.campaign_id})"
        return state, [_refuse_rollback(state, request, ctx, reason)]
    again = _answer_again(state.last_finished, request, ctx)
    if again:
        return state, [Publish(e) for e in again]
    memory = state.last_upgrade
    if (
        memory is not None
        and memory.campaign_id == request.campaign_id
        and memory.to_version != target
    ):
        reason = (
            f"refused: campaign {request.campaign_id} upgraded this node to "
            f"{memory.to_version}, not {target}"
        )
        return state, [_refuse_rollback(state, request, ctx, reason)]
    new_job = Job(
        command_id=request.event_id,
        campaign_id=request.campaign_id,
        correlation_id=request.correlation_id,
        target_version=target,
        kind="rollback",
        requested_at=request.occurred_at,
        reply=Reply.to(request),
    )
    return replace(state, job=new_job), [Inspect(request.event_id)]


def _join_rollback(
    state: AgentState, job: Job, request: NodeRollbackRequested, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    """A rollback request for the campaign's job under way (an abort during the upgrade, or a
    re-sent rollback request): the job answers it."""
    joined = _follow(job, request)
    if job.kind == "rollback" or job.rollback_reply is not None:
        return replace(state, job=joined), []
    if joined.stage is Stage.BACKING_OFF:
        # Aborted between two attempts: no more attempts, back to the previous version now.
        return _begin_rollback(state, joined, ctx)
    # Inspecting or applying: decided when that step's result comes; rolling back or checking
    # health: answered at the end.
    return replace(state, job=joined), []


# --- job results ---------------------------------------------------------------------------


def _on_job_result(
    state: AgentState, result: JobResult, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    job = state.job
    if job is None or job.command_id != result.command_id:
        return state, []  # a result of a job that is no longer ours to report
    match result:
        case Inspected() if job.stage is Stage.INSPECTING:
            if result.record is not None:
                state = replace(state, installed_version=result.record.installed_version)
            if job.kind == "upgrade":
                return _inspected_upgrade(state, job, result.record, ctx)
            return _inspected_rollback(state, job, result.record, ctx)
        case JobProgressed() if job.stage in (Stage.APPLYING, Stage.ROLLING_BACK):
            return _progressed(state, job, result, ctx)
        case JobSucceeded() if job.stage is Stage.APPLYING:
            return _apply_succeeded(state, job, result, ctx)
        case JobFailed() if job.stage is Stage.APPLYING:
            installed = result.installed_version or state.installed_version
            job = replace(job, last_reason=result.reason, last_phase=result.phase)
            state = replace(state, installed_version=installed, job=job)
            return _after_failed_attempt(state, job, ctx, retryable=result.retryable)
        case RetryDue() if job.stage is Stage.BACKING_OFF and result.attempt == job.attempt + 1:
            manifest = job.manifest
            assert manifest is not None, "an upgrade job keeps its manifest"
            job = replace(job, stage=Stage.APPLYING, attempt=result.attempt)
            return replace(state, job=job), [
                StartJob(job.command_id, manifest, attempt=result.attempt)
            ]
        case RollbackFinished() if job.stage is Stage.ROLLING_BACK:
            installed = result.installed_version or state.installed_version
            job = replace(
                job,
                stage=Stage.CHECKING,
                rolled_back=result.rolled_back,
                rollback_reason=result.reason,
            )
            return replace(state, installed_version=installed, job=job), [
                CheckHealth(job.command_id, job.previous_version)
            ]
        case HealthChecked() if job.stage is Stage.CHECKING:
            return _finish(state, job, result, ctx)
    return state, []  # a result the job's stage does not wait for (stale)


def _inspected_upgrade(
    state: AgentState, job: Job, record: ExecutorRecord | None, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    last = record.last if record is not None else None
    target = job.target_version
    previous = state.installed_version
    if last is not None and last.state == "in_progress":
        previous = last.from_version  # what the node runs until that reboot ends
    ours = last is not None and job.requested_at is not None and last.started_at >= job.requested_at
    if ours and last is not None and last.to_version not in (None, target):
        # A reboot into another version after this request: this upgrade's own rollback, by
        # the agent before it restarted. Resume it; the upgrade is not tried again.
        return _resume_rollback(state, job, last, ctx)
    job = replace(job, previous_version=previous)
    state = replace(state, job=job, last_upgrade=UpgradeMemory(job.campaign_id, previous, target))
    toward_target = last is not None and last.to_version == target
    if job.rollback_reply is not None and not (
        toward_target and last is not None and last.state == "in_progress"
    ):
        # Aborted before anything was applied: nothing to undo, only the node's health to tell.
        job = replace(
            job,
            stage=Stage.CHECKING,
            last_reason="aborted (rollback requested) before the upgrade was applied",
            last_phase="aborted",
        )
        return replace(state, job=job), [CheckHealth(job.command_id, previous)]
    if ours and toward_target and last is not None and last.state == "failed":
        # The first attempt failed before the agent restarted: go on with the next one.
        job = replace(
            job,
            last_reason=f"reboot #{last.sequence} into {target} failed (before a restart)",
            last_phase="reboot",
        )
        state = replace(state, job=job)
        return _after_failed_attempt(state, job, ctx, retryable=True)
    manifest = job.manifest
    assert manifest is not None, "an upgrade job keeps its manifest"
    job = replace(job, stage=Stage.APPLYING)
    return replace(state, job=job), [StartJob(job.command_id, manifest, attempt=job.attempt)]


def _resume_rollback(
    state: AgentState, job: Job, last: LastChange, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    assert last.to_version is not None
    previous = last.to_version
    job = replace(
        job,
        previous_version=previous,
        # The attempts before the restart are not in the record; a rollback follows the last.
        attempt=ctx.policy.max_apply_attempts,
        last_reason=f"the upgrade to {job.target_version} failed before the agent restarted "
        f"(its rollback to {previous} was found, reboot #{last.sequence})",
        last_phase=ROLLBACK_PHASE,
    )
    state = replace(
        state, last_upgrade=UpgradeMemory(job.campaign_id, previous, job.target_version)
    )
    if last.state == "in_progress":
        job = replace(job, stage=Stage.ROLLING_BACK)
        return replace(state, job=job), [StartRollback(job.command_id, previous)]
    failed = last.state == "failed"
    job = replace(
        job,
        stage=Stage.CHECKING,
        rolled_back=not failed,
        rollback_reason=f"reboot #{last.sequence} into {previous} failed" if failed else "",
    )
    return replace(state, job=job), [CheckHealth(job.command_id, previous)]


def _inspected_rollback(
    state: AgentState, job: Job, record: ExecutorRecord | None, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    """Where to roll back to: a rollback away from the target already under way or done (the
    record), else the version this campaign's upgrade started from (memory, or the record of
    the upgrade into the target after a restart); a node that does not run the target is
    reported as it is; anything else is refused."""
    target = job.target_version
    installed = state.installed_version
    last = record.last if record is not None else None
    rebooting = record.rebooting if record is not None else False
    memory = state.last_upgrade
    if memory is not None and (
        memory.campaign_id != job.campaign_id or memory.to_version != target
    ):
        memory = None
    previous: str | None
    if last is not None and last.from_version == target and last.to_version not in (None, target):
        previous = last.to_version
        if last.state == "failed":
            rebooting = True  # the earlier rollback failed: reboot into it again
    elif memory is not None:
        previous = memory.from_version
    elif (
        last is not None
        and last.to_version == target
        and last.from_version != target
        and last.state == "succeeded"
        and installed == target
    ):
        previous = last.from_version
    elif installed != target:
        previous = installed  # the campaign's version is not on the node: nothing to undo
    else:
        previous = None
    if previous is None:
        reason = f"refused: no record of an upgrade of this node to {target} to roll back"
        refusal = _rollback_answer(job, ctx, installed, healthy=False, reason=reason)
        return _end(state, job, installed, [refusal], succeeded=False, reason=reason)
    job = replace(job, previous_version=previous)
    if installed == previous and not rebooting:
        job = replace(job, stage=Stage.CHECKING, rolled_back=True)
        return replace(state, job=job), [CheckHealth(job.command_id, previous)]
    job = replace(job, stage=Stage.ROLLING_BACK)
    return replace(state, job=job), [StartRollback(job.command_id, previous)]


def _progressed(
    state: AgentState, job: Job, result: JobProgressed, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    phase = result.phase if job.stage is Stage.APPLYING else f"rollback: {result.phase}"
    event = _progress(job, ctx, phase, result.percent)
    job = replace(job, phase=result.phase, percent=result.percent)
    return replace(state, job=job), [Publish(event)]


def _apply_succeeded(
    state: AgentState, job: Job, result: JobSucceeded, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    if result.version != job.target_version:
        failed = JobFailed(
            command_id=job.command_id,
            reason=f"node runs {result.version} after the upgrade, not {job.target_version}",
            phase="verify-version",
            installed_version=result.version,
        )
        job = replace(job, last_reason=failed.reason, last_phase=failed.phase)
        state = replace(state, installed_version=result.version, job=job)
        return _after_failed_attempt(state, job, ctx, retryable=True)
    upgraded = NodeUpgraded(
        **_envelope_of_reply(_reply_of(job), ctx, "upgraded"),
        node_id=ctx.node_id,
        version=result.version,
        applied=True,
    )
    if job.rollback_reply is None:
        return _end(state, job, result.version, [upgraded], succeeded=True)
    # Aborted during the apply: the upgrade is a fact (reported), and is undone now.
    job = replace(job, upgraded=True, published=(upgraded,))
    state = replace(state, installed_version=result.version, job=job)
    new_state, commands = _begin_rollback(state, job, ctx)
    return new_state, [Publish(upgraded), *commands]


def _after_failed_attempt(
    state: AgentState, job: Job, ctx: AgentContext, *, retryable: bool
) -> tuple[AgentState, list[Command]]:
    policy = ctx.policy
    if job.rollback_reply is not None or not retryable or job.attempt >= policy.max_apply_attempts:
        return _begin_rollback(state, job, ctx)
    delay = policy.backoff_after(job.attempt)
    job = replace(job, stage=Stage.BACKING_OFF)
    phase = f"attempt {job.attempt}/{policy.max_apply_attempts} failed; retry in {delay:g}s"
    return replace(state, job=job), [
        Publish(_progress(job, ctx, phase, job.percent)),
        ScheduleRetry(job.command_id, job.attempt + 1, delay),
    ]


def _begin_rollback(
    state: AgentState, job: Job, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    job = replace(job, stage=Stage.ROLLING_BACK)
    progress = _progress(job, ctx, f"rolling back to {job.previous_version}", job.percent)
    return replace(state, job=job), [
        Publish(progress),
        StartRollback(job.command_id, job.previous_version),
    ]


def _finish(
    state: AgentState, job: Job, health: HealthChecked, ctx: AgentContext
) -> tuple[AgentState, list[Command]]:
    installed = health.installed_version
    on_previous = installed == job.previous_version
    healthy = health.healthy and on_previous
    if health.healthy and not on_previous:
        why_not = f"runs {installed}, not {job.previous_version}"
    else:
        why_not = health.reason
    # A rollback was tried and failed (a tried rollback always reports why it failed).
    rollback_failed = not job.rolled_back and bool(job.rollback_reason)
    answers: list[Event] = []
    reason = ""
    if job.kind == "upgrade" and not job.upgraded:
        reason = job.last_reason or "not applied"
        if rollback_failed:
            reason += f"; rollback to {job.previous_version} failed: {job.rollback_reason}"
        elif job.rolled_back and not healthy:
            reason += f"; rolled back to {job.previous_version} but not healthy: {why_not}"
        answers.append(
            NodeUpgradeFailed(
                **_envelope_of_reply(_reply_of(job), ctx, "failed"),
                node_id=ctx.node_id,
                reason=reason,
                phase=_clip(job.last_phase or "apply", PHASE_MAX),
                installed_version=installed,
                attempts=max(1, min(job.attempt, 100)),
                rolled_back=job.rolled_back,
                healthy=job.rolled_back and healthy,
            )
        )
    rollback_reply = job.reply if job.kind == "rollback" else job.rollback_reply
    if rollback_reply is not None:
        if healthy:
            note = ""
        elif rollback_failed:
            note = f"rollback to {job.previous_version} failed: {job.rollback_reason}"
        else:
            note = f"not healthy: {why_not}"
        reason = reason or note
        answers.append(
            _rollback_answer(
                replace(job, reply=rollback_reply), ctx, installed, healthy=healthy, reason=note
            )
        )
    succeeded = job.kind == "rollback" and healthy
    return _end(state, job, installed, answers, succeeded=succeeded, reason=reason)


def _end(
    state: AgentState,
    job: Job,
    installed: str,
    answers: list[Event],
    *,
    succeeded: bool,
    reason: str = "",
) -> tuple[AgentState, list[Command]]:
    """The job is over: publish its final `answers`, remember them (with any final answer
    published before, e.g. an aborted upgrade's `NodeUpgraded`) for redeliveries."""
    covered = {job.command_id}
    for reply in (job.reply, job.rollback_reply):
        if reply is not None:
            covered.add(reply.request_id)
    finished = FinishedJob(
        command_id=job.command_id,
        target_version=job.target_version,
        succeeded=succeeded,
        reason=reason,
        phase=job.last_phase,
        covered=frozenset(covered),
        answers=(*job.published, *answers),
    )
    new_state = AgentState(
        installed_version=installed, last_finished=finished, last_upgrade=state.last_upgrade
    )
    return new_state, [Publish(e) for e in answers]


# --- replies -------------------------------------------------------------------------------


def _refuse_upgrade(
    state: AgentState, request: NodeUpgradeRequested, ctx: AgentContext, reason: str, phase: str
) -> Publish:
    return Publish(
        NodeUpgradeFailed(
            **_envelope_of_request(request, ctx, "failed", phase),
            node_id=ctx.node_id,
            reason=reason,
            phase=phase,
            installed_version=state.installed_version,
            # A manifest refused at validation changed nothing; a busy node is mid-job.
            untouched=phase == VALIDATE_PHASE,
        )
    )


def _refuse_rollback(
    state: AgentState, request: NodeRollbackRequested, ctx: AgentContext, reason: str
) -> Publish:
    return Publish(
        NodeRollbackCompleted(
            **_envelope_of_request(request, ctx, "rolled-back", "refused"),
            node_id=ctx.node_id,
            installed_version=state.installed_version,
            healthy=False,
            reason=_clip(reason, ROLLBACK_REASON_MAX),
        )
    )


def _rollback_answer(
    job: Job, ctx: AgentContext, installed: str, *, healthy: bool, reason: str
) -> NodeRollbackCompleted:
    return NodeRollbackCompleted(
        **_envelope_of_reply(_reply_of(job), ctx, "rolled-back"),
        node_id=ctx.node_id,
        installed_version=installed,
        healthy=healthy,
        reason=_clip(reason, ROLLBACK_REASON_MAX),
    )


def _progress(job: Job, ctx: AgentContext, phase: str, percent: float) -> NodeUpgradeProgressed:
    reply = job.rollback_reply if job.kind == "upgrade" and job.upgraded else _reply_of(job)
    assert reply is not None
    return NodeUpgradeProgressed(
        **_envelope_of_reply(reply, ctx, "progress", job.stage.value, job.attempt, phase, percent),
        node_id=ctx.node_id,
        phase=_clip(phase, PHASE_MAX),
        percent=percent,
    )


def _answer_again(finished: FinishedJob | None, request: Request, ctx: AgentContext) -> list[Event]:
    """The last job's final answers for a request it answered, rebuilt for this request (the
    very same events if it is the request they answered)."""
    if finished is None or request.event_id not in finished.covered:
        return []
    wants_rollback_answer = isinstance(request, NodeRollbackRequested)
    again: list[Event] = []
    for answer in finished.answers:
        if isinstance(answer, NodeRollbackCompleted) != wants_rollback_answer:
            continue
        if answer.causation_id == request.event_id:
            again.append(answer)
            continue
        part = _FINAL_PARTS.get(answer.event_type, answer.event_type)
        again.append(answer.model_copy(update=_envelope_of_request(request, ctx, part)))
    return again


_FINAL_PARTS = {
    "NodeUpgraded": "upgraded",
    "NodeUpgradeFailed": "failed",
    "NodeRollbackCompleted": "rolled-back",
}


def _reply_of(job: Job) -> Reply:
    if job.reply is not None:
        return job.reply
    return Reply(job.command_id, job.campaign_id, job.correlation_id, 1)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reply_id(cause: uuid.UUID, *parts: object) -> uuid.UUID:
    return command_id("node-agent", cause, *parts)


def _envelope_of_request(request: Request, ctx: AgentContext, *id_parts: object) -> dict[str, Any]:
    return request.caused(
        event_id=_reply_id(request.event_id, *id_parts),
        producer=ctx.producer,
        occurred_at=ctx.now,
    )


def _envelope_of_reply(reply: Reply, ctx: AgentContext, *id_parts: object) -> dict[str, Any]:
    return {
        "event_id": _reply_id(reply.request_id, *id_parts),
        "campaign_id": reply.campaign_id,
        "correlation_id": reply.correlation_id,
        "causation_id": reply.request_id,
        "producer": ctx.producer,
        "occurred_at": ctx.now,
    }
