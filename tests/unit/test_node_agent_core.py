"""The node agent's decision core: one request, its duplicates, job results, other nodes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from schemas.events import (
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
    Command,
    JobFailed,
    JobProgressed,
    JobSucceeded,
    Publish,
    StartJob,
    decide,
    initial_state,
)

pytestmark = pytest.mark.unit

NODE = "compute-0-03"
NOW = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
CTX = AgentContext(node_id=NODE, producer=f"node-agent/{NODE}", now=NOW)


def manifest(version: str = "2.0.0") -> VersionManifest:
    return VersionManifest(
        version=version,
        files=[{"name": f"nova-{version}.rpm", "sha256": "a" * 64, "uri": "https://r/x.rpm"}],
    )


def request(
    version: str = "2.0.0", node: str = NODE, campaign: str = "cmp-1", attempt: int = 1
) -> NodeUpgradeRequested:
    return NodeUpgradeRequested(
        campaign_id=campaign, node_id=node, manifest=manifest(version), attempt=attempt
    )


def published(commands: list[Command]) -> list[object]:
    return [c.event for c in commands if isinstance(c, Publish)]


def assert_reply_to(event: object, req: NodeUpgradeRequested) -> None:
    assert isinstance(
        event, NodeUpgraded | NodeUpgradeAccepted | NodeUpgradeFailed | NodeUpgradeProgressed
    )
    assert event.causation_id == req.event_id
    assert event.campaign_id == req.campaign_id
    assert event.correlation_id == req.correlation_id
    assert event.node_id == NODE
    assert event.producer == CTX.producer
    assert event.occurred_at == NOW
    assert NODE_EVENTS.carries(event.event_type)
    assert NODE_EVENTS.key_for(event) == req.campaign_id.encode()  # type: ignore[union-attr]


def accepted(state: AgentState, req: NodeUpgradeRequested) -> AgentState:
    state, _ = decide(state, req, CTX)
    assert state.busy
    return state


# --- requests ------------------------------------------------------------------------------


def test_idle_agent_accepts_and_starts_the_job() -> None:
    req = request()
    state, commands = decide(initial_state("1.0.0"), req, CTX)
    assert len(commands) == 2
    reply, start = commands
    assert isinstance(reply, Publish) and isinstance(reply.event, NodeUpgradeAccepted)
    assert reply.event.target_version == "2.0.0"
    assert_reply_to(reply.event, req)
    assert start == StartJob(command_id=req.event_id, manifest=req.manifest)
    assert state.busy and state.job is not None
    assert state.job.target_version == "2.0.0" and state.job.command_id == req.event_id
    assert state.installed_version == "1.0.0"


def test_request_for_the_installed_version_is_answered_without_applying() -> None:
    req = request("1.0.0")
    state, commands = decide(initial_state("1.0.0"), req, CTX)
    assert not any(isinstance(c, StartJob) for c in commands)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgraded)
    assert reply.applied is False and reply.version == "1.0.0"
    assert_reply_to(reply, req)
    assert state == initial_state("1.0.0")


def test_request_for_another_node_is_ignored() -> None:
    state = initial_state("1.0.0")
    assert decide(state, request(node="compute-0-04"), CTX) == (state, [])


def test_duplicate_of_the_running_request_does_nothing() -> None:
    req = request()
    state = accepted(initial_state("1.0.0"), req)
    assert decide(state, req, CTX) == (state, [])


def test_another_attempt_for_the_same_target_while_running_does_nothing() -> None:
    state = accepted(initial_state("1.0.0"), request(attempt=1))
    retry = request(attempt=2)
    assert decide(state, retry, CTX) == (state, [])
    # even from another campaign: the node is already on its way to that version
    assert decide(state, request(campaign="cmp-2"), CTX) == (state, [])


def test_request_for_another_target_while_running_is_refused_as_busy() -> None:
    state = accepted(initial_state("1.0.0"), request("2.0.0"))
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
    state = accepted(initial_state("1.0.0"), req)
    state, _ = decide(state, JobSucceeded(req.event_id, "2.0.0"), CTX)
    for again in (req, request(attempt=2), request(campaign="cmp-9")):
        new_state, commands = decide(state, again, CTX)
        assert new_state == state
        assert not any(isinstance(c, StartJob) for c in commands)
        [reply] = published(commands)
        assert isinstance(reply, NodeUpgraded) and reply.applied is False
        assert_reply_to(reply, again)


def test_redelivered_request_after_restart_mid_upgrade_is_accepted_again() -> None:
    # A fresh agent knows only the installed version; the executor resumes the reboot.
    req = request()
    _, commands = decide(initial_state("1.0.0"), req, CTX)
    assert StartJob(req.event_id, req.manifest) in commands


def test_redelivery_of_a_failed_request_repeats_the_failure_a_new_attempt_retries() -> None:
    req = request()
    state = accepted(initial_state("1.0.0"), req)
    state, _ = decide(state, JobFailed(req.event_id, "reboot failed", "reboot", "1.0.0"), CTX)
    again_state, commands = decide(state, req, CTX)
    assert again_state == state
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgradeFailed)
    assert (reply.reason, reply.phase) == ("reboot failed", "reboot")
    retry = request(attempt=2)
    retry_state, commands = decide(state, retry, CTX)
    assert retry_state.busy
    assert StartJob(retry.event_id, retry.manifest) in commands


def test_reply_ids_are_stable_for_the_same_request() -> None:
    req = request("1.0.0")
    _, first = decide(initial_state("1.0.0"), req, CTX)
    _, second = decide(initial_state("1.0.0"), req, CTX)
    assert [e.event_id for e in published(first)] == [e.event_id for e in published(second)]  # type: ignore[attr-defined]
    _, other = decide(initial_state("1.0.0"), request("1.0.0"), CTX)
    assert published(first)[0].event_id != published(other)[0].event_id  # type: ignore[attr-defined]


# --- job results ---------------------------------------------------------------------------


def test_progress_is_reported_and_remembered() -> None:
    req = request()
    state = accepted(initial_state("1.0.0"), req)
    state, commands = decide(state, JobProgressed(req.event_id, "rebooting", 30.0), CTX)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgradeProgressed)
    assert (reply.phase, reply.percent) == ("rebooting", 30.0)
    assert_reply_to(reply, req)
    assert state.job is not None and (state.job.phase, state.job.percent) == ("rebooting", 30.0)


def test_success_installs_the_version_and_frees_the_agent() -> None:
    req = request()
    state = accepted(initial_state("1.0.0"), req)
    state, commands = decide(state, JobSucceeded(req.event_id, "2.0.0"), CTX)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgraded) and reply.applied is True
    assert reply.version == "2.0.0"
    assert_reply_to(reply, req)
    assert state.installed_version == "2.0.0" and not state.busy
    assert state.last_finished is not None and state.last_finished.succeeded


def test_failure_is_reported_with_the_installed_version() -> None:
    req = request()
    state = accepted(initial_state("1.0.0"), req)
    state, commands = decide(state, JobFailed(req.event_id, "boom", "reboot"), CTX)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgradeFailed)
    assert (reply.reason, reply.phase, reply.installed_version) == ("boom", "reboot", "1.0.0")
    assert_reply_to(reply, req)
    assert not state.busy and state.installed_version == "1.0.0"


def test_success_with_an_unexpected_version_is_a_failure() -> None:
    req = request()
    state = accepted(initial_state("1.0.0"), req)
    state, commands = decide(state, JobSucceeded(req.event_id, "1.5.0"), CTX)
    [reply] = published(commands)
    assert isinstance(reply, NodeUpgradeFailed) and reply.phase == "verify-version"
    assert state.installed_version == "1.5.0" and not state.busy


@pytest.mark.parametrize(
    "result",
    [
        JobProgressed(uuid.uuid4(), "rebooting", 50.0),
        JobSucceeded(uuid.uuid4(), "2.0.0"),
        JobFailed(uuid.uuid4(), "x", "reboot"),
    ],
)
def test_results_of_a_job_that_is_not_running_are_ignored(
    result: JobProgressed | JobSucceeded | JobFailed,
) -> None:
    idle = initial_state("1.0.0")
    assert decide(idle, result, CTX) == (idle, [])
    busy = accepted(idle, request())
    assert decide(busy, result, CTX) == (busy, [])


def test_a_whole_upgrade_publishes_accepted_progress_upgraded_in_order() -> None:
    req = request()
    state = initial_state("1.0.0")
    events: list[object] = []
    for item in (
        req,
        JobProgressed(req.event_id, "verified", 10.0),
        JobProgressed(req.event_id, "rebooting", 30.0),
        JobSucceeded(req.event_id, "2.0.0"),
        req,  # redelivered after the answer
    ):
        state, commands = decide(state, item, CTX)
        events.extend(published(commands))
    assert [type(e).__name__ for e in events] == [
        "NodeUpgradeAccepted",
        "NodeUpgradeProgressed",
        "NodeUpgradeProgressed",
        "NodeUpgraded",
        "NodeUpgraded",
    ]
    assert [getattr(e, "applied", None) for e in events[-2:]] == [True, False]
    assert len({e.event_id for e in events}) == len(events)  # type: ignore[attr-defined]


# --- the adapter's pure bits ---------------------------------------------------------------


def test_manifest_checks_refuse_paths_and_repeated_files() -> None:
    from services.node_agent.executors import manifest_problems

    assert manifest_problems(manifest()) == []
    bad = VersionManifest(
        version="2.0.0",
        files=[
            {"name": "../etc/passwd", "sha256": "a" * 64, "uri": "https://r/a"},
            {"name": "x.rpm", "sha256": "a" * 64, "uri": "https://r/b"},
            {"name": "x.rpm", "sha256": "b" * 64, "uri": "https://r/c"},
        ],
    )
    problems = manifest_problems(bad)
    assert any("repeat" in p and "x.rpm" in p for p in problems)
    assert any("../etc/passwd" in p for p in problems)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node_agent.settings import NodeAgentSettings

    monkeypatch.setenv("ESCALATOR_NODE_AGENT_NODE_ID", NODE)
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_WORLD_URL", "http://w:1")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_HEARTBEAT_INTERVAL_S", "2.5")
    monkeypatch.setenv("ESCALATOR_NODE_AGENT_REBOOT_S", "30")
    settings = NodeAgentSettings()
    assert (settings.node_id, settings.world_url) == (NODE, "http://w:1")
    assert (settings.heartbeat_interval_s, settings.reboot_s) == (2.5, 30.0)
    assert settings.group_id == f"escalator-node-agent.{NODE}"


def test_main_without_a_node_id_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node_agent.__main__ import main

    monkeypatch.delenv("ESCALATOR_NODE_AGENT_NODE_ID", raising=False)
    assert main(["--world", "http://w:1"]) == 2
