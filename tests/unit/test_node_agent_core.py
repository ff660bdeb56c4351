"""The node agent's decision core: requests, duplicates, retries with backoff, rollback and health
check, rollback requests, re-derivation after a restart, other nodes, manifest validation; and
the check that nothing in the agent's package uses a shell."""

from __future__ import annotations

import ast
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import (
    NodeRollbackCompleted,
    NodeRollbackRequested,
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
)
from schemas.topics import NODE_EVENTS
from schemas.types import VersionManifest
from services.node_agent.domain import (
    AgentContext,
    AgentState,
    CheckHealth,
    Command,
    HealthChecked,
    Ignore,
    Input,
    Inspect,
    Inspected,
    JobFailed,
    JobProgressed,
    JobSucceeded,
    Publish,
    RetryDue,
    RetryPolicy,
    RollbackFinished,
    ScheduleRetry,
    Stage,
    StartJob,
    StartRollback,
    decide,
    initial_state,
    manifest_problems,
)
from services.node_agent.ports import ExecutorRecord, LastChange

pytestmark = pytest.mark.unit

NODE = "compute-0-03"
NOW = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_apply_attempts=3, backoff_s=1.0, backoff_max_s=4.0)
CTX = AgentContext(node_id=NODE, producer=f"node-agent/{NODE}", now=NOW, policy=POLICY)
REQUESTED_AT = NOW - timedelta(minutes=5)
PACKAGE = Path(__file__).resolve().parents[2] / "services" / "node_agent"


def manifest(version: str = "2.0.0") -> VersionManifest:
    return VersionManifest(
        version=version,
        files=[{"name": f"nova-{version}.rpm", "sha256": "a" * 64, "uri": "https://r/x.rpm"}],
    )


def request(
    version: str = "2.0.0", node: str = NODE, campaign: str = "cmp-1", attempt: int = 1
) -> NodeUpgradeRequested:
    return NodeUpgradeRequested(
        campaign_id=campaign,
        node_id=node,
        manifest=manifest(version),
        attempt=attempt,
        occurred_at=REQUESTED_AT,
    )


def rollback_request(
    target: str = "2.0.0", node: str = NODE, campaign: str = "cmp-1", attempt: int = 1
) -> NodeRollbackRequested:
    return NodeRollbackRequested(
        campaign_id=campaign,
        node_id=node,
        target_version=target,
        attempt=attempt,
        occurred_at=NOW - timedelta(minutes=1),
    )


def record(
    installed: str = "1.0.0",
    *,
    to: str | None = None,
    frm: str = "1.0.0",
    state: str = "succeeded",
    after_request: bool = True,
    sequence: int = 1,
) -> ExecutorRecord:
    """The executor's record: `to=None` for a node never rebooted."""
    if to is None:
        return ExecutorRecord(installed_version=installed)
    started = REQUESTED_AT + timedelta(seconds=30 if after_request else -3600)
    last = LastChange(sequence, frm, to, state, started)  # type: ignore[arg-type]
    return ExecutorRecord(installed, rebooting=state == "in_progress", last=last)


def published(commands: list[Command]) -> list[object]:
    return [c.event for c in commands if isinstance(c, Publish)]


def steps(commands: list[Command]) -> list[Command]:
    return [c for c in commands if not isinstance(c, Publish)]


def run(state: AgentState, *inputs: Input) -> tuple[AgentState, list[Command]]:
    """Feed inputs in order; all the commands they produced."""
    out: list[Command] = []
    for item in inputs:
        state, commands = decide(state, item, CTX)
        out.extend(commands)
    return state, out


def assert_reply_to(event: object, req: NodeUpgradeRequested | NodeRollbackRequested) -> None:
    assert isinstance(
        event,
        NodeUpgraded
        | NodeUpgradeAccepted
        | NodeUpgradeFailed
        | NodeUpgradeProgressed
        | NodeRollbackCompleted,
    )
    assert event.causation_id == req.event_id
    assert event.campaign_id == req.campaign_id
    assert event.correlation_id == req.correlation_id
    assert event.node_id == NODE
    assert event.producer == CTX.producer
    assert event.occurred_at == NOW
    assert NODE_EVENTS.carries(event.event_type)
    assert NODE_EVENTS.key_for(event) == req.campaign_id.encode()  # type: ignore[union-attr]


def applying(state: AgentState, req: NodeUpgradeRequested) -> AgentState:
    """Accepted, inspected (nothing under way), first apply started."""
    state, commands = run(state, req, Inspected(req.event_id, record()))
    assert StartJob(req.event_id, req.manifest, attempt=1) in commands
    assert state.job is not None and state.job.stage is Stage.APPLYING
    return state


def failed_attempt(req: NodeUpgradeRequested, reason: str = "reboot #1 failed") -> JobFailed:
    return JobFailed(req.event_id, reason, "reboot", "1.0.0")


def exhausted(state: AgentState, req: NodeUpgradeRequested) -> AgentState:
    """Every attempt failed: the core asks for the rollback."""
    state = applying(state, req)
    for attempt in (2, 3):
        state, _ = run(state, failed_attempt(req), RetryDue(req.event_id, attempt))
    state, commands = decide(state, failed_attempt(req, "reboot #3 failed"), CTX)
    assert steps(commands) == [StartRollback(req.event_id, "1.0.0")]
    return state


# --- requests ------------------------------------------------------------------------------


def test_idle_agent_accepts_inspects_then_starts_the_first_attempt() -> None:
    req = request()
    state, commands = decide(initial_state("1.0.0"), req, CTX)
    reply, inspect = commands
    assert isinstance(reply, Publish) and isinstance(reply.event, NodeUpgradeAccepted)
    assert reply.event.target_version == "2.0.0"
    assert_reply_to(reply.event, req)
    assert inspect == Inspect(req.event_id)
    assert state.busy and state.job is not None
    assert state.job.target_version == "2.0.0" and state.job.command_id == req.event_id
    state, commands = decide(state, Inspected(req.event_id, record()), CTX)
    assert commands == [StartJob(command_id=req.event_id, manifest=req.manifest, attempt=1)]
    assert state.installed_version == "1.0.0"
    assert state.last_upgrade is not None
    assert (state.last_upgrade.from_version, state.last_upgrade.to_version) == ("1.0.0", "2.0.0")


def test_request_for_the_installed_version_is_answered_without_applying() -> None:
    req = request("1.0.0")
    state, commands = decide(initial_state("1.0.0"), req, CTX)
    assert steps(commands) == []
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgraded)
    assert reply.applied is False and reply.version == "1.0.0"
    assert_reply_to(reply, req)
    assert state == initial_state("1.0.0")


@pytest.mark.parametrize("make", [request, rollback_request])
def test_request_for_another_node_is_ignored_with_a_reason(make: object) -> None:
    state = initial_state("1.0.0")
    req = make(node="compute-0-04")  # type: ignore[operator]
    new_state, [ignore] = decide(state, req, CTX)
    assert new_state == state
    assert isinstance(ignore, Ignore)
    assert "compute-0-04" in ignore.reason and NODE in ignore.reason


def test_duplicate_of_the_running_request_does_nothing() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    assert decide(state, req, CTX) == (state, [])


def test_a_newer_attempt_while_running_gets_the_final_answer() -> None:
    first = request(attempt=1)
    state = applying(initial_state("1.0.0"), first)
    retry = request(attempt=2)
    state, commands = decide(state, retry, CTX)
    assert commands == []
    assert state.job is not None and state.job.reply is not None
    assert state.job.reply.request_id == retry.event_id
    # even from another campaign nothing is started: the node is on its way to that version
    other_campaign = request(campaign="cmp-2")
    assert decide(state, other_campaign, CTX) == (state, [])
    _, commands = decide(state, JobSucceeded(first.event_id, "2.0.0"), CTX)
    [done] = published(commands)
    assert isinstance(done, NodeUpgraded)
    assert_reply_to(done, retry)


def test_request_for_another_target_while_running_is_refused_as_busy() -> None:
    state = applying(initial_state("1.0.0"), request("2.0.0"))
    other = request("3.0.0", campaign="cmp-2")
    new_state, commands = decide(state, other, CTX)
    assert new_state == state
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgradeFailed)
    assert reply.phase == "accept" and "busy upgrading to 2.0.0" in reply.reason
    assert reply.installed_version == "1.0.0"
    assert_reply_to(reply, other)


def test_request_after_success_is_answered_applied_false_never_applied_twice() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    state, _ = decide(state, JobSucceeded(req.event_id, "2.0.0"), CTX)
    for again in (req, request(attempt=2), request(campaign="cmp-9")):
        new_state, commands = decide(state, again, CTX)
        assert new_state == state
        assert steps(commands) == []
        [reply] = published(commands)
        assert isinstance(reply, NodeUpgraded) and reply.applied is False
        assert_reply_to(reply, again)


def test_redelivery_of_a_failed_request_repeats_the_failure_a_new_attempt_is_a_new_job() -> None:
    req = request()
    state = exhausted(initial_state("1.0.0"), req)
    state, commands = run(
        state,
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
    )
    [final] = published(commands)
    again_state, commands = decide(state, req, CTX)
    assert again_state == state
    assert published(commands) == [final]  # the very same event, id and all
    retry = request(attempt=2)
    retry_state, commands = decide(state, retry, CTX)
    assert retry_state.busy
    assert Inspect(retry.event_id) in commands


def test_reply_ids_are_stable_for_the_same_request() -> None:
    req = request("1.0.0")
    _, first = decide(initial_state("1.0.0"), req, CTX)
    _, second = decide(initial_state("1.0.0"), req, CTX)
    assert [e.event_id for e in published(first)] == [e.event_id for e in published(second)]  # type: ignore[attr-defined]
    _, other = decide(initial_state("1.0.0"), request("1.0.0"), CTX)
    assert published(first)[0].event_id != published(other)[0].event_id  # type: ignore[attr-defined]


# --- one attempt ---------------------------------------------------------------------------


def test_progress_is_reported_and_remembered() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    state, commands = decide(state, JobProgressed(req.event_id, "rebooting", 30.0), CTX)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgradeProgressed)
    assert (reply.phase, reply.percent) == ("rebooting", 30.0)
    assert_reply_to(reply, req)
    assert state.job is not None and (state.job.phase, state.job.percent) == ("rebooting", 30.0)


def test_success_installs_the_version_and_frees_the_agent() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    state, commands = decide(state, JobSucceeded(req.event_id, "2.0.0"), CTX)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgraded) and reply.applied is True
    assert reply.version == "2.0.0"
    assert_reply_to(reply, req)
    assert state.installed_version == "2.0.0" and not state.busy
    assert state.last_finished is not None and state.last_finished.succeeded


def test_success_with_an_unexpected_version_is_a_failed_attempt() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    state, commands = decide(state, JobSucceeded(req.event_id, "1.5.0"), CTX)
    assert ScheduleRetry(req.event_id, 2, 1.0) in commands
    assert state.installed_version == "1.5.0"
    assert state.job is not None and state.job.last_phase == "verify-version"


@pytest.mark.parametrize(
    "result",
    [
        Inspected(uuid.uuid4(), None),
        JobProgressed(uuid.uuid4(), "rebooting", 50.0),
        JobSucceeded(uuid.uuid4(), "2.0.0"),
        JobFailed(uuid.uuid4(), "x", "reboot"),
        RetryDue(uuid.uuid4(), 2),
        RollbackFinished(uuid.uuid4(), True, "1.0.0"),
        HealthChecked(uuid.uuid4(), True, "1.0.0"),
    ],
)
def test_results_of_a_job_that_is_not_running_are_ignored(result: Input) -> None:
    idle = initial_state("1.0.0")
    assert decide(idle, result, CTX) == (idle, [])
    busy = applying(idle, request())
    assert decide(busy, result, CTX) == (busy, [])


def test_results_the_stage_does_not_wait_for_are_ignored() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    for stale in (
        RetryDue(req.event_id, 2),
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
        Inspected(req.event_id, record()),
    ):
        assert decide(state, stale, CTX) == (state, [])
    state, _ = decide(state, failed_attempt(req), CTX)
    for late in (RetryDue(req.event_id, 3), JobSucceeded(req.event_id, "2.0.0")):
        assert decide(state, late, CTX) == (state, [])


# --- retries with backoff ------------------------------------------------------------------


def test_backoff_doubles_and_is_capped() -> None:
    assert [POLICY.backoff_after(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert RetryPolicy(backoff_s=0.0).backoff_after(5) == 0.0
    assert RetryPolicy().backoff_after(1000) == RetryPolicy().backoff_max_s


def test_failed_attempts_are_retried_with_backoff_then_succeed_once() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    state, commands = decide(state, failed_attempt(req, "reboot #1 failed"), CTX)
    assert steps(commands) == [ScheduleRetry(req.event_id, 2, 1.0)]
    [note] = published(commands)
    assert isinstance(note, NodeUpgradeProgressed) and "attempt 1/3 failed" in note.phase
    assert state.job is not None and state.job.stage is Stage.BACKING_OFF and state.busy
    state, commands = decide(state, RetryDue(req.event_id, 2), CTX)
    assert commands == [StartJob(req.event_id, req.manifest, attempt=2)]
    state, commands = decide(state, failed_attempt(req, "reboot #2 failed"), CTX)
    assert steps(commands) == [ScheduleRetry(req.event_id, 3, 2.0)]
    state, commands = run(
        state, RetryDue(req.event_id, 3), JobSucceeded(req.event_id, "2.0.0"), req
    )
    finals = [e for e in published(commands) if not isinstance(e, NodeUpgradeProgressed)]
    assert [(type(e).__name__, getattr(e, "applied", None)) for e in finals] == [
        ("NodeUpgraded", True),
        ("NodeUpgraded", False),  # the redelivered request: never a second apply
    ]
    assert state.installed_version == "2.0.0" and not state.busy


def test_retries_exhausted_roll_back_and_a_healthy_node_is_reported_once() -> None:
    req = request()
    state = exhausted(initial_state("1.0.0"), req)
    assert state.job is not None and state.job.stage is Stage.ROLLING_BACK
    state, commands = decide(state, RollbackFinished(req.event_id, True, "1.0.0"), CTX)
    assert commands == [CheckHealth(req.event_id, "1.0.0")]
    state, commands = decide(state, HealthChecked(req.event_id, True, "1.0.0"), CTX)
    [failed] = published(commands)
    assert steps(commands) == []
    assert isinstance(failed, NodeUpgradeFailed)
    assert_reply_to(failed, req)
    assert (failed.attempts, failed.rolled_back, failed.healthy) == (3, True, True)
    assert failed.installed_version == "1.0.0"
    assert failed.reason == "reboot #3 failed" and failed.phase == "reboot"
    assert not state.busy and state.installed_version == "1.0.0"


def test_retries_exhausted_rolled_back_but_unhealthy_is_not_released() -> None:
    req = request()
    state = exhausted(initial_state("1.0.0"), req)
    _, commands = run(
        state,
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, False, "1.0.0", "its last reboot (#5) failed"),
    )
    [failed] = published(commands)
    assert isinstance(failed, NodeUpgradeFailed)
    assert (failed.rolled_back, failed.healthy) == (True, False)
    assert "not healthy: its last reboot (#5) failed" in failed.reason


def test_retries_exhausted_and_the_rollback_failing_is_not_rolled_back() -> None:
    req = request()
    state = exhausted(initial_state("1.0.0"), req)
    state, commands = run(
        state,
        RollbackFinished(req.event_id, False, "1.0.0", "reboot #4 into 1.0.0 failed"),
        HealthChecked(req.event_id, False, "1.0.0", "its last reboot (#4) failed"),
    )
    [failed] = published(commands)
    assert isinstance(failed, NodeUpgradeFailed)
    assert (failed.attempts, failed.rolled_back, failed.healthy) == (3, False, False)
    assert "rollback to 1.0.0 failed: reboot #4 into 1.0.0 failed" in failed.reason
    assert not state.busy


def test_a_failure_another_attempt_cannot_cure_is_rolled_back_at_once() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    bad = JobFailed(req.event_id, "files repeat", "verify", retryable=False)
    _, commands = decide(state, bad, CTX)
    assert steps(commands) == [StartRollback(req.event_id, "1.0.0")]


def test_one_attempt_policy_never_retries() -> None:
    ctx = AgentContext(NODE, CTX.producer, NOW, RetryPolicy(max_apply_attempts=1))
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, ctx)
    state, _ = decide(state, Inspected(req.event_id, record()), ctx)
    _, commands = decide(state, failed_attempt(req), ctx)
    assert steps(commands) == [StartRollback(req.event_id, "1.0.0")]


def test_a_whole_failing_job_has_distinct_reply_ids_and_one_final_answer() -> None:
    req = request()
    state = initial_state("1.0.0")
    events: list[object] = []
    for item in (
        req,
        Inspected(req.event_id, record()),
        JobProgressed(req.event_id, "verified", 10.0),
        failed_attempt(req),
        RetryDue(req.event_id, 2),
        JobProgressed(req.event_id, "verified", 10.0),
        failed_attempt(req),
        RetryDue(req.event_id, 3),
        JobProgressed(req.event_id, "verified", 10.0),
        failed_attempt(req),
        JobProgressed(req.event_id, "rebooting", 50.0),
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
    ):
        state, commands = decide(state, item, CTX)
        events.extend(published(commands))
    assert len({e.event_id for e in events}) == len(events)  # type: ignore[attr-defined]
    finals = [e for e in events if isinstance(e, NodeUpgraded | NodeUpgradeFailed)]
    assert len(finals) == 1 and isinstance(finals[0], NodeUpgradeFailed)
    assert all(e.causation_id == req.event_id for e in events)  # type: ignore[attr-defined]


# --- a restart re-derives the job from the executor's record -------------------------------


def test_restart_mid_retry_goes_on_with_the_next_attempt_not_the_first() -> None:
    # The previous incarnation's first attempt failed; it died during the backoff. The request
    # is redelivered to a fresh agent, whose inspection finds that failed reboot toward 2.0.0.
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, CTX)
    found = record("1.0.0", to="2.0.0", state="failed", sequence=1)
    state, commands = decide(state, Inspected(req.event_id, found), CTX)
    assert steps(commands) == [ScheduleRetry(req.event_id, 2, 1.0)]
    assert not any(isinstance(c, StartJob) for c in commands)
    state, commands = run(state, RetryDue(req.event_id, 2), JobSucceeded(req.event_id, "2.0.0"))
    assert StartJob(req.event_id, req.manifest, attempt=2) in commands
    assert [type(e).__name__ for e in published(commands)] == ["NodeUpgraded"]


def test_restart_mid_attempt_resumes_the_reboot_under_way() -> None:
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, CTX)
    found = record("1.0.0", to="2.0.0", state="in_progress")
    _, commands = decide(state, Inspected(req.event_id, found), CTX)
    # the executor's apply waits for the reboot under way; it never starts a second one
    assert commands == [StartJob(req.event_id, req.manifest, attempt=1)]


def test_restart_mid_rollback_resumes_the_rollback_not_the_upgrade() -> None:
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, CTX)
    found = record("1.0.0", to="1.0.0", frm="1.0.0", state="in_progress", sequence=4)
    state, commands = decide(state, Inspected(req.event_id, found), CTX)
    assert commands == [StartRollback(req.event_id, "1.0.0")]
    _, commands = run(
        state,
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
    )
    [failed] = published(commands)
    assert isinstance(failed, NodeUpgradeFailed)
    assert (failed.rolled_back, failed.healthy, failed.attempts) == (True, True, 3)
    assert "before the agent restarted" in failed.reason


def test_restart_after_the_rollback_only_checks_health_and_answers() -> None:
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, CTX)
    found = record("1.0.0", to="1.0.0", frm="1.0.0", state="succeeded", sequence=4)
    state, commands = decide(state, Inspected(req.event_id, found), CTX)
    assert commands == [CheckHealth(req.event_id, "1.0.0")]
    _, commands = decide(state, HealthChecked(req.event_id, True, "1.0.0"), CTX)
    [failed] = published(commands)
    assert isinstance(failed, NodeUpgradeFailed) and failed.rolled_back and failed.healthy


def test_a_record_older_than_the_request_is_not_this_requests_work() -> None:
    # An earlier campaign's failed rollback, or an operator's retry of a quarantined node: the
    # new request starts from its first attempt.
    req = request(attempt=1, campaign="cmp-2")
    for old in (
        record("1.0.0", to="1.0.0", state="failed", after_request=False),
        record("1.0.0", to="2.0.0", state="failed", after_request=False),
    ):
        state, _ = decide(initial_state("1.0.0"), req, CTX)
        _, commands = decide(state, Inspected(req.event_id, old), CTX)
        assert commands == [StartJob(req.event_id, req.manifest, attempt=1)]


def test_an_unreadable_record_starts_the_apply_which_resumes_by_itself() -> None:
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, CTX)
    _, commands = decide(state, Inspected(req.event_id, None), CTX)
    assert commands == [StartJob(req.event_id, req.manifest, attempt=1)]


# --- rollback requests (an operator's abort) -----------------------------------------------


def upgraded(req: NodeUpgradeRequested) -> AgentState:
    state = applying(initial_state("1.0.0"), req)
    state, _ = decide(state, JobSucceeded(req.event_id, "2.0.0"), CTX)
    return state


def test_rollback_after_the_campaigns_upgrade_goes_back_and_answers_the_request() -> None:
    state = upgraded(request())
    rb = rollback_request("2.0.0")
    state, commands = decide(state, rb, CTX)
    assert commands == [Inspect(rb.event_id)]
    found = record("2.0.0", to="2.0.0", frm="1.0.0")
    state, commands = decide(state, Inspected(rb.event_id, found), CTX)
    assert commands == [StartRollback(rb.event_id, "1.0.0")]
    state, commands = run(
        state,
        JobProgressed(rb.event_id, "rebooting", 50.0),
        RollbackFinished(rb.event_id, True, "1.0.0"),
        HealthChecked(rb.event_id, True, "1.0.0"),
    )
    progress, done = published(commands)
    assert isinstance(progress, NodeUpgradeProgressed) and "rollback" in progress.phase
    assert isinstance(done, NodeRollbackCompleted)
    assert_reply_to(done, rb)
    assert (done.installed_version, done.healthy, done.reason) == ("1.0.0", True, "")
    assert state.installed_version == "1.0.0" and not state.busy
    # redelivered: answered again with the very same event, nothing rolled back twice
    again_state, commands = decide(state, rb, CTX)
    assert again_state == state and commands == [Publish(done)]


def test_rollback_of_a_node_already_on_its_previous_version_only_reports() -> None:
    req = request()
    state = exhausted(initial_state("1.0.0"), req)
    state, _ = run(
        state,
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
    )
    rb = rollback_request("2.0.0")
    state, _ = decide(state, rb, CTX)
    found = record("1.0.0", to="1.0.0", frm="1.0.0", sequence=4)
    state, commands = decide(state, Inspected(rb.event_id, found), CTX)
    assert commands == [CheckHealth(rb.event_id, "1.0.0")]  # no reboot
    _, commands = decide(state, HealthChecked(rb.event_id, True, "1.0.0"), CTX)
    [done] = published(commands)
    assert isinstance(done, NodeRollbackCompleted) and done.healthy
    assert done.installed_version == "1.0.0"


def test_rollback_to_a_version_the_campaign_did_not_apply_is_refused() -> None:
    state = upgraded(request("2.0.0"))
    rb = rollback_request("3.0.0")
    new_state, commands = decide(state, rb, CTX)
    assert new_state == state
    [refused] = published(commands)
    assert isinstance(refused, NodeRollbackCompleted)
    assert_reply_to(refused, rb)
    assert refused.healthy is False and refused.reason.startswith("refused:")
    assert refused.installed_version == "2.0.0"


def test_rollback_without_any_record_of_the_upgrade_is_refused() -> None:
    # A fresh agent on a node that runs the target, with no reboot in the executor's record.
    rb = rollback_request("2.0.0")
    state, commands = decide(initial_state("2.0.0"), rb, CTX)
    assert commands == [Inspect(rb.event_id)]
    state, commands = decide(state, Inspected(rb.event_id, record("2.0.0")), CTX)
    [refused] = published(commands)
    assert isinstance(refused, NodeRollbackCompleted) and not refused.healthy
    assert "no record of an upgrade" in refused.reason
    assert steps(commands) == [] and not state.busy


def test_rollback_after_a_restart_takes_the_previous_version_from_the_record() -> None:
    rb = rollback_request("2.0.0")
    state, _ = decide(initial_state("2.0.0"), rb, CTX)
    found = record("2.0.0", to="2.0.0", frm="1.0.0", state="succeeded")
    _, commands = decide(state, Inspected(rb.event_id, found), CTX)
    assert commands == [StartRollback(rb.event_id, "1.0.0")]


def test_rollback_after_a_restart_mid_rollback_resumes_it() -> None:
    rb = rollback_request("2.0.0")
    state, _ = decide(initial_state("2.0.0"), rb, CTX)
    found = record("2.0.0", to="1.0.0", frm="2.0.0", state="in_progress", sequence=2)
    _, commands = decide(state, Inspected(rb.event_id, found), CTX)
    assert commands == [StartRollback(rb.event_id, "1.0.0")]
    done = ExecutorRecord("1.0.0", last=LastChange(2, "2.0.0", "1.0.0", "succeeded", NOW))
    _, commands = decide(state, Inspected(rb.event_id, done), CTX)
    assert commands == [CheckHealth(rb.event_id, "1.0.0")]


def test_rollback_requested_during_the_apply_undoes_it_once_it_ends() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    rb = rollback_request("2.0.0")
    state, commands = decide(state, rb, CTX)
    assert commands == []
    state, commands = decide(state, JobSucceeded(req.event_id, "2.0.0"), CTX)
    assert steps(commands) == [StartRollback(req.event_id, "1.0.0")]
    [upgraded_event] = [e for e in published(commands) if isinstance(e, NodeUpgraded)]
    assert_reply_to(upgraded_event, req)
    state, commands = run(
        state,
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
    )
    [done] = published(commands)
    assert isinstance(done, NodeRollbackCompleted)
    assert_reply_to(done, rb)
    assert done.healthy and done.installed_version == "1.0.0"
    assert not state.busy
    # both requests redelivered: each gets its answer again, the upgrade is not re-applied
    for again, expected in ((req, upgraded_event), (rb, done)):
        _, commands = decide(state, again, CTX)
        assert commands == [Publish(expected)]


def test_rollback_requested_between_attempts_stops_the_retries() -> None:
    req = request()
    state = applying(initial_state("1.0.0"), req)
    state, commands = decide(state, failed_attempt(req), CTX)
    assert ScheduleRetry(req.event_id, 2, 1.0) in commands
    rb = rollback_request("2.0.0")
    state, commands = decide(state, rb, CTX)
    assert steps(commands) == [StartRollback(req.event_id, "1.0.0")]
    assert decide(state, RetryDue(req.event_id, 2), CTX) == (state, [])  # superseded
    _, commands = run(
        state,
        RollbackFinished(req.event_id, True, "1.0.0"),
        HealthChecked(req.event_id, True, "1.0.0"),
    )
    failed, done = published(commands)
    assert isinstance(failed, NodeUpgradeFailed) and failed.attempts == 1 and failed.rolled_back
    assert_reply_to(failed, req)
    assert isinstance(done, NodeRollbackCompleted) and done.healthy
    assert_reply_to(done, rb)


def test_rollback_requested_before_the_apply_started_applies_nothing() -> None:
    req = request()
    state, _ = decide(initial_state("1.0.0"), req, CTX)
    rb = rollback_request("2.0.0")
    state, _ = decide(state, rb, CTX)
    state, commands = decide(state, Inspected(req.event_id, record()), CTX)
    assert commands == [CheckHealth(req.event_id, "1.0.0")]
    _, commands = decide(state, HealthChecked(req.event_id, True, "1.0.0"), CTX)
    failed, done = published(commands)
    assert isinstance(failed, NodeUpgradeFailed) and not failed.rolled_back
    assert isinstance(done, NodeRollbackCompleted) and done.healthy


def test_rollback_request_while_busy_elsewhere_is_refused() -> None:
    state = applying(initial_state("1.0.0"), request("2.0.0", campaign="cmp-1"))
    rb = rollback_request("2.0.0", campaign="cmp-2")
    new_state, commands = decide(state, rb, CTX)
    assert new_state == state
    [refused] = published(commands)
    assert isinstance(refused, NodeRollbackCompleted) and "busy" in refused.reason


def test_an_unhealthy_rollback_is_reported_unhealthy_with_why() -> None:
    state = upgraded(request())
    rb = rollback_request("2.0.0")
    _, commands = run(
        state,
        rb,
        Inspected(rb.event_id, record("2.0.0", to="2.0.0", frm="1.0.0")),
        RollbackFinished(rb.event_id, False, "2.0.0", "reboot #2 into 1.0.0 failed"),
        HealthChecked(rb.event_id, False, "2.0.0", "node runs 2.0.0, not 1.0.0"),
    )
    [done] = published(commands)
    assert isinstance(done, NodeRollbackCompleted) and not done.healthy
    assert done.installed_version == "2.0.0"
    assert "reboot #2 into 1.0.0 failed" in done.reason


# --- manifest validation (security) --------------------------------------------------------


def files(*specs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": n, "sha256": "a" * 64, "uri": u} for n, u in specs]


@pytest.mark.parametrize(
    ("version", "specs"),
    [
        ("2.0.0", [("nova-2.0.0.rpm", "https://r/n.rpm")]),
        (
            "2.0.0",
            [
                (
                    "compute-node-2.0.0.tar.zst",
                    "https://repo.example.net/escalator/2.0.0/compute-node-2.0.0.tar.zst",
                )
            ],
        ),
        ("29.1.0", [("kernel.img", "https://10.0.0.5/releases/29.1.0/kernel.img")]),
        ("29.1.0", [("nova-compute-29.1.0-1.el9.x86_64.rpm", "s3://b/python3.11/n.rpm")]),
        ("29.1.0-rc1", [("nova-29.1.0-rc1.rpm", "oci://registry/nova:29.1.0-rc1")]),
    ],
)
def test_manifest_checks_accept_files_of_the_version(
    version: str, specs: list[tuple[str, str]]
) -> None:
    ok = VersionManifest(version=version, files=files(*specs))
    assert manifest_problems(ok) == []


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([("nova-1.9.0.rpm", "https://r/2.0.0/nova-1.9.0.rpm")], "its name names 1.9.0"),
        ([("nova-2.0.0.rpm", "https://r/1.9.0/nova.rpm")], "its URI names 1.9.0"),
        ([("nova.rpm", "https://r/nova.rpm")], "neither its name nor its URI names it"),
        ([("nova-2.0.0.1.rpm", "https://r/n.rpm")], "does not belong to version 2.0.0"),
        ([("nova-2.0.0.rpm", "https://u:p@r/n.rpm")], "carries credentials"),
        ([("nova-2.0.0.rpm", "https://r/2.0.0/../../etc/n.rpm")], "'..'"),
        ([("nova-2.0.0.rpm", "https://r/%2e%2e/2.0.0/n.rpm")], "'..'"),
        ([("-rf-2.0.0.rpm", "https://r/n.rpm")], "not a plain file name"),
        ([("x-2.0.0;reboot", "https://r/n.rpm")], "not a plain file name"),
        ([("$(id)-2.0.0.rpm", "https://r/n.rpm")], "not a plain file name"),
        ([("../etc/passwd", "https://r/2.0.0/a")], "is a path, not a name"),
        ([("nova-2.0.0.rpm", "https://r/a b/2.0.0.rpm")], "spaces, control characters"),
        (
            [("x-2.0.0.rpm", "https://r/b"), ("x-2.0.0.rpm", "https://r/c")],
            "files repeat: x-2.0.0.rpm",
        ),
    ],
)
def test_manifest_checks_refuse_files_that_do_not_belong_or_are_unsafe(
    specs: list[tuple[str, str]], expected: str
) -> None:
    bad = VersionManifest(version="2.0.0", files=files(*specs))
    problems = manifest_problems(bad)
    assert any(expected in p for p in problems), problems


def test_an_unfit_manifest_is_refused_in_validate_and_nothing_is_applied() -> None:
    bad = NodeUpgradeRequested(
        campaign_id="cmp-1",
        node_id=NODE,
        manifest=VersionManifest(
            version="2.0.0", files=files(("nova-1.9.0.rpm", "https://r/nova-1.9.0.rpm"))
        ),
    )
    state = initial_state("1.0.0")
    new_state, commands = decide(state, bad, CTX)
    assert new_state == state and steps(commands) == []
    [refused] = published(commands)
    assert isinstance(refused, NodeUpgradeFailed)
    assert_reply_to(refused, bad)
    assert refused.phase == "validate" and "1.9.0" in refused.reason
    assert (refused.rolled_back, refused.installed_version) == (False, "1.0.0")
    assert refused.untouched  # the manager may return the node to service
    # the same answer (same id) for a redelivery
    assert decide(state, bad, CTX) == (state, commands)


def test_the_executors_reexport_the_checks() -> None:
    from services.node_agent import executors

    assert executors.manifest_problems is manifest_problems


# --- nothing from a payload reaches a shell ------------------------------------------------

SHELL_CALLS = {"system", "popen", "create_subprocess_shell", "getoutput", "getstatusoutput"}
SHELL_MODULES = {"pty", "commands"}


def test_no_module_of_the_agent_uses_a_shell() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in sources} >= {"executors.py", "service.py", "domain.py", "ports.py"}
    found: list[str] = []
    for path in sources:
        text = path.read_text()
        for needle in ("shell=True", "os.system", "create_subprocess_shell", "os.popen"):
            if needle in text:
                found.append(f"{path.name}: text {needle!r}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in SHELL_CALLS:
                    found.append(f"{path.name}:{node.lineno}: call {name}()")
                for kw in node.keywords:
                    literal_false = isinstance(kw.value, ast.Constant) and kw.value.value is False
                    if kw.arg == "shell" and not literal_false:
                        found.append(f"{path.name}:{node.lineno}: shell= keyword")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                if {module, *names} & SHELL_MODULES:
                    found.append(f"{path.name}:{node.lineno}: imports {module or names}")
    assert found == [], found


def test_the_shell_scan_would_see_a_shell_call() -> None:
    # The scan above is only as good as its patterns: check they catch the usual forms.
    sample = "import subprocess, os\nsubprocess.run(cmd, shell=True)\nos.system(cmd)\n"
    tree = ast.parse(sample)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    names = {c.func.attr for c in calls if isinstance(c.func, ast.Attribute)}
    assert "system" in names & SHELL_CALLS
    assert any(kw.arg == "shell" for c in calls for kw in c.keywords)


# --- settings and entry point ----------------------------------------------------------------


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node_agent.settings import NodeAgentSettings

    monkeypatch.setenv("ESCALATOR_NODE_AGENT_NODE_ID", NODE)
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_WORLD_URL", "http://w:1")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_HEARTBEAT_INTERVAL_S", "2.5")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_REBOOT_S", "30")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_MAX_APPLY_ATTEMPTS", "5")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_APPLY_BACKOFF_S", "0.5")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_APPLY_BACKOFF_MAX_S", "8")
    settings = NodeAgentSettings()
    assert (settings.node_id, settings.world_url) == (NODE, "http://w:1")
    assert (settings.heartbeat_interval_s, settings.reboot_s) == (2.5, 30.0)
    assert settings.group_id == f"escalator-node-agent.{NODE}"
    assert (settings.max_apply_attempts, settings.apply_backoff_s) == (5, 0.5)
    assert settings.apply_backoff_max_s == 8.0


def test_default_retry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node_agent.settings import NodeAgentSettings

    for name in ("MAX_APPLY_ATTEMPTS", "APPLY_BACKOFF_S", "APPLY_BACKOFF_MAX_S"):
        monkeypatch.delenv(f"ESCALATOR_NODE_AGENT_{name}", raising=False)
    settings = NodeAgentSettings(node_id=NODE)
    assert settings.max_apply_attempts == 3
    assert 0 < settings.apply_backoff_s <= settings.apply_backoff_max_s


def test_main_without_a_node_id_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node_agent.__main__ import main

    monkeypatch.delenv("ESCALATOR_NODE_AGENT_NODE_ID", raising=False)
    assert main(["--world", "http://w:1"]) == 2
