"""The VNFM handshake end to end: refusal, heartbeats, recovery, timeout policies, rejections.

Every service runs as its own process (`escalator.demo.Deployment` on a `ProcessGroup`) on the
session's real Kafka broker, against a small simulated world; the reference VNFMs get the options
that make them refuse, heartbeat, signal recovery, stay silent or reply late. Campaigns are
started with the operator's CLI (`python -m escalator upgrade start ...`); the policy knobs the
CLI does not offer yet (`max_deferrals`, `deferral_s`, `vnfm_hard_timeout_s`, ...) are set by
publishing the same `UpgradeRequested` the CLI builds (`build_upgrade_request`, then the policy
fields), until the CLI has flags for them (`CLI_POLICY_FLAGS`; used as soon as `--help` lists
them). Assertions read the topics (event times, causation) and the world, never a service's
memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from escalator.broker import BrokerHandle
from escalator.demo import DemoOptions, Deployment, wait_for_heartbeats, write_demo_manifest
from escalator.processes import ProcessGroup, python_module
from escalator.settings import KafkaSettings
from escalator.status import CampaignBoard, CampaignView
from escalator.world.client import WorldClient
from escalator.world.model import WorldSnapshot
from schemas.codec import decode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    BusinessMoveRequested,
    CampaignCompleted,
    CampaignFailed,
    NodeAvailable,
    NodeCycleAdvanced,
    NodeMaintenanceRequested,
    NodeStep,
    NodeUpgradeRequested,
    NoticeExpired,
    VmMigrationRequested,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfmReplyRejected,
    VnfProfile,
    VnfRecovered,
)
from schemas.topics import ALL_TOPICS, CAMPAIGNS, DEAD_LETTERS_TOPIC, VNFM_NOTICES, VNFM_REPLIES
from schemas.types import BusinessOutcome, RedundancyModel, VmBusinessOutcome

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

E = TypeVar("E", bound=Event)
BASE = "1.0.0"
# Policy fields -> the `upgrade start` flags that would set them.
CLI_POLICY_FLAGS = {
    "max_deferrals": "--max-deferrals",
    "deferral_s": "--deferral-s",
    "vnfm_extension_max_s": "--vnfm-extension-max-s",
    "vnfm_hard_timeout_s": "--vnfm-hard-timeout",
}


# --- the deployment --------------------------------------------------------------------------


@dataclass
class Handshake(Deployment):
    """`Deployment` with extra flags for the world and per reference VNFM, and test helpers."""

    world_args: list[str] = field(default_factory=list)
    vnfm_args: dict[str, list[str]] = field(default_factory=dict)
    manager_env: dict[str, str] = field(default_factory=dict)
    before: WorldSnapshot | None = None

    def start_world(self) -> str:
        o = self.options
        match = self.group.spawn(
            "world",
            python_module(
                "escalator.world",
                *("--port", "0", "--nodes", str(o.nodes), "--domains", str(o.domains)),
                *("--seed", str(o.seed), "--speed", str(o.speed)),
                *self.world_args,
            ),
            wait_for=r"world listening on (http://\S+)",
        )
        self.world_url = match.group(1)  # type: ignore[union-attr]
        return self.world_url

    def start_services(self) -> None:
        w = self.world_url
        spawn = self.group.spawn
        fast = {"ESCALATOR_VNFM_ADAPTER_TICK_S": "0.05"}
        spawn("upgrade-manager", python_module("services.upgrade_manager"), env=self.manager_env)
        spawn("cloud-manager", python_module("services.cloud_manager", "--world", w))
        spawn("vnfm-adapter", python_module("services.vnfm_adapter"), env=fast)
        for vnfm_id in self.vnfm_ids:
            args = ["--world", w, "--vnfm-id", vnfm_id, *self.vnfm_args.get(vnfm_id, [])]
            spawn(
                f"reference-vnfm-{vnfm_id}",
                python_module("services.vnfm_adapter.reference_vnfm", *args),
            )
        for node_id in self.node_ids:
            spawn(
                f"node-agent-{node_id}",
                python_module("services.node_agent", "--node-id", node_id, "--world", w),
            )

    def logs(self, lines: int = 25) -> str:
        parts = [f"logs in {self.group.log_dir}"]
        for child in self.group.children.values():
            state = "alive" if child.alive else f"exit {child.process.returncode}"
            parts.append(f"--- {child.name} ({state}) ---\n{child.log_tail(lines)}")
        return "\n".join(parts)

    async def prepare(self, profile: Callable[[VnfProfile], VnfProfile]) -> WorldSnapshot:
        from escalator.bus.connection import ensure_topics

        self.start_world()
        await ensure_topics(self.settings)
        async with WorldClient(self.world_url) as world:
            self.before = await world.snapshot()
        self.node_ids = sorted(n.id for n in self.before.nodes)
        self.vnfm_ids = await publish_registry(self.settings, self.before, profile)
        self.start_services()
        await wait_for_heartbeats(self.settings, self.node_ids, self, timeout_s=60)
        return self.before

    # --- campaigns ---------------------------------------------------------------------------

    async def cli(self, *args: str) -> tuple[int, str, str]:
        env = {**os.environ, **self.settings.to_env(), "COLUMNS": "250"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "escalator",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def start_campaign(
        self,
        campaign_id: str,
        *,
        version: str,
        nodes: Iterable[str],
        vnfm_timeout_s: float,
        on_vnfm_timeout: str = "migrate",
        max_parallel: int = 1,
        **policy: float,
    ) -> None:
        manifest = write_demo_manifest(self.options.run_dir / campaign_id, version)
        args = [
            *("upgrade", "start", "--version", version, "--manifest", str(manifest)),
            *("--max-parallel", str(max_parallel), "--vnfm-timeout", str(vnfm_timeout_s)),
            *("--on-vnfm-timeout", on_vnfm_timeout, "--campaign-id", campaign_id),
            *("--requested-by", "vnfm-handshake-test"),
            # These tests script which node meets which VNFM answer: the nodes go in the order
            # listed, not in the planner's most-constrained-first order.
            "--keep-order",
        ]
        for node in nodes:
            args += ["--nodes", node]
        for name, value in policy.items():
            args += [CLI_POLICY_FLAGS[name], str(value)]
        code, out, err = await self.cli(*args)
        assert code == 0, f"upgrade start exited {code}: {err}"
        assert out.strip().splitlines()[-1] == campaign_id, out

    async def follow(
        self,
        campaign_id: str,
        *,
        timeout_s: float = 120.0,
        on_event: Callable[[Event, CampaignView], Awaitable[None]] | None = None,
    ) -> CampaignView:
        """Follow the campaigns topic until the campaign ends; fail early if a process died."""
        from escalator.bus.readback import scan

        board = CampaignBoard()
        key = campaign_id.encode()

        async def run() -> CampaignView:
            async for record in scan(self.settings, CAMPAIGNS, follow=True):
                event = decode(record.value) if record.key == key else None
                if not isinstance(event, Event):
                    continue
                board.apply(event)
                view = board.view(campaign_id)
                if on_event is not None:
                    await on_event(event, view)
                if view.finished:
                    return view
            raise AssertionError("the campaigns topic ended")

        task = asyncio.create_task(run())
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        try:
            while not task.done():
                dead = self.group.dead()
                assert not dead, f"{dead[0].name} died\n{self.logs()}"
                if loop.time() > give_up:
                    view = board.view(campaign_id)
                    steps = {n.node_id: (n.step.value, n.detail) for n in view.nodes.values()}
                    raise AssertionError(f"{campaign_id} {view.state} {steps}\n{self.logs()}")
                await asyncio.wait({task}, timeout=0.25)
            return task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def events(self) -> list[Event]:
        """Every event on every catalogue topic, without duplicates, in `occurred_at` order."""
        from escalator.bus.readback import scan

        seen: dict[uuid.UUID, Event] = {}
        for spec in ALL_TOPICS:
            async for record in scan(self.settings, spec):
                event = decode(record.value) if record.value is not None else None
                if isinstance(event, Event):
                    seen.setdefault(event.event_id, event)
        return sorted(seen.values(), key=lambda e: e.occurred_at)

    async def dead_letters(self) -> list[DeadLetter]:
        from escalator.bus.readback import scan

        letters: list[DeadLetter] = []
        async for record in scan(self.settings, self.settings.topic(DEAD_LETTERS_TOPIC)):
            if record.value is not None:
                letters.append(DeadLetter.model_validate_json(record.value))
        return letters

    async def snapshot(self) -> WorldSnapshot:
        async with WorldClient(self.world_url) as world:
            return await world.snapshot()


async def publish_registry(
    settings: KafkaSettings, world: WorldSnapshot, profile: Callable[[VnfProfile], VnfProfile]
) -> list[str]:
    from escalator.bus.connection import make_producer
    from escalator.bus.publisher import EventPublisher
    from escalator.registry import publish_profiles

    profiles = [
        profile(
            VnfProfile(
                vnf_id=v.id,
                vnfm_id=v.vnfm_id,
                redundancy=RedundancyModel(v.redundancy),
                members=tuple(v.members),
                min_in_service=v.min_in_service,
                max_unavailable=v.max_unavailable,
                min_recovery_s=v.min_recovery_s,
                # The world puts every VNF's members in one anti-affinity server group; a
                # registry that hides it makes the planner pack members together, which the
                # cloud then refuses.
                anti_affinity=True,
            )
        )
        for v in world.vnfs
    ]
    producer = make_producer(settings)
    await producer.start()
    try:
        await publish_profiles(EventPublisher(producer, settings), profiles, producer="test")
    finally:
        await producer.stop()
    return sorted({p.vnfm_id for p in profiles})


def no_recovery_time(profile: VnfProfile) -> VnfProfile:
    """Tests about something else: VNFs need no time between impacts."""
    return profile.model_copy(update={"min_recovery_s": 0.0})


@pytest.fixture
async def deploy(
    broker: BrokerHandle, tmp_path: Path, unique_name: Callable[..., str]
) -> AsyncIterator[Callable[..., Awaitable[Handshake]]]:
    made: list[Handshake] = []

    async def make(
        *,
        nodes: int = 4,
        speed: float = 20.0,
        world_args: list[str] | None = None,
        vnfm_args: dict[str, list[str]] | None = None,
        profile: Callable[[VnfProfile], VnfProfile] = no_recovery_time,
        planner: bool = True,
    ) -> Handshake:
        settings = broker.settings.model_copy(update={"topic_prefix": unique_name("hs") + "."})
        options = DemoOptions(nodes=nodes, domains=2, seed=0, speed=speed, run_dir=tmp_path)
        deployment = Handshake(
            settings,
            options,
            ProcessGroup(tmp_path / "logs", base_env=settings.to_env()),
            world_args=world_args or [],
            vnfm_args=vnfm_args or {},
            manager_env={"ESCALATOR_UPGRADE_MANAGER_PLANNER": str(planner).lower()},
        )
        made.append(deployment)
        await deployment.prepare(profile)
        return deployment

    yield make
    for deployment in made:
        deployment.stop()


# --- reading events --------------------------------------------------------------------------


def of(events: Iterable[Event], cls: type[E], **match: Any) -> list[E]:
    return [
        e
        for e in events
        if isinstance(e, cls) and all(getattr(e, k, None) == v for k, v in match.items())
    ]


def in_campaign(events: Iterable[Event], campaign_id: str) -> list[Event]:
    return [e for e in events if e.campaign_id == campaign_id]


def steps(events: Iterable[Event], node_id: str) -> list[NodeCycleAdvanced]:
    return of(events, NodeCycleAdvanced, node_id=node_id)


def assert_clean(before: WorldSnapshot, after: WorldSnapshot, context: str) -> None:
    left = sorted(n.id for n in after.nodes if n.maintenance_holder)
    assert not left, f"left in maintenance: {left}\n{context}"
    assert sorted(vm.id for vm in after.vms) == sorted(vm.id for vm in before.vms), context
    assert not after.interruptions, [i.model_dump(mode="json") for i in after.interruptions]


# --- refusal ---------------------------------------------------------------------------------


async def test_refused_node_is_deferred_retried_later_and_the_campaign_completes(
    deploy: Callable[..., Awaitable[Handshake]],
) -> None:
    d = await deploy(vnfm_args={"vnfm-1": ["--refuse-first", "1", "--refuse-reason", "peak hour"]})
    assert d.before is not None
    status_seen: list[dict[str, Any]] = []

    async def on_event(event: Event, view: CampaignView) -> None:
        # While node-1 waits for its retry, the operator's status says why.
        deferred = isinstance(event, NodeCycleAdvanced) and event.step is NodeStep.PENDING
        if deferred and "deferred" in getattr(event, "detail", "") and not status_seen:
            code, out, err = await d.cli("status", "cmp-refusal", "--json")
            assert code == 0, err
            status_seen.append(json.loads(out))

    await d.start_campaign(
        "cmp-refusal",
        version="2.0.0",
        nodes=["node-1", "node-2"],
        vnfm_timeout_s=10,
        max_deferrals=3,
        deferral_s=8,
    )
    view = await d.follow("cmp-refusal", on_event=on_event)
    after = await d.snapshot()
    assert view.state == "completed", view.reason
    assert {n.node_id: n.step for n in view.nodes.values()} == {
        "node-1": NodeStep.DONE,
        "node-2": NodeStep.DONE,
    }
    assert {n.id: n.installed_version for n in after.nodes if n.id in ("node-1", "node-2")} == {
        "node-1": "2.0.0",
        "node-2": "2.0.0",
    }
    assert_clean(d.before, after, d.logs())

    events = in_campaign(await d.events(), "cmp-refusal")
    # the status showed the VNFM's reason while the node was deferred
    [status] = status_seen
    node1 = next(n for n in status["node_states"] if n["node_id"] == "node-1")
    assert node1["step"] == "pending"
    assert node1["detail"].startswith(
        "deferred by vnfm-1: peak hour (refusal 1/1) (1/3), retry after"
    )
    # one refusal, reported once, for node-1's first round; the second round was answered
    refused = [m for m in of(events, BusinessMoved, node_id="node-1") if m.refusals]
    [first] = refused
    assert [(r.vnfm_id, r.reason) for r in first.refusals] == [
        ("vnfm-1", "peak hour (refusal 1/1)")
    ]
    requests = of(events, BusinessMoveRequested, node_id="node-1")
    assert [r.attempt for r in requests] == [1, 2]
    notices = of(events, VnfMaintenanceNotified, node_id="node-1")
    assert len({n.notice_id for n in notices}) == 4  # 2 VNFMs x 2 rounds, all distinct
    # node-1 released untouched in its refused round, and it did not block node-2
    n1 = steps(events, "node-1")
    assert [s.step for s in n1] == [
        NodeStep.CLAIMING,
        NodeStep.NOTIFYING,
        NodeStep.RELEASING,
        NodeStep.PENDING,
        NodeStep.CLAIMING,
        NodeStep.NOTIFYING,
        NodeStep.MIGRATING,
        NodeStep.UPGRADING,
        NodeStep.RELEASING,
        NodeStep.DONE,
    ]
    deferred_at = n1[3].occurred_at
    retried_at = n1[4].occurred_at
    assert retried_at - first.occurred_at >= timedelta(seconds=8)
    n2_done = steps(events, "node-2")[-1]
    assert n2_done.step is NodeStep.DONE and deferred_at < n2_done.occurred_at < retried_at
    first_round_end = n1[3].occurred_at
    touched = [
        e
        for e in of(events, VmMigrationRequested, node_id="node-1")
        + of(events, NodeUpgradeRequested, node_id="node-1")
        if e.occurred_at <= first_round_end
    ]
    assert touched == []


async def test_refusals_beyond_max_deferrals_follow_the_skip_node_policy(
    deploy: Callable[..., Awaitable[Handshake]],
) -> None:
    d = await deploy(vnfm_args={"vnfm-1": ["--refuse-first", "10", "--refuse-reason", "busy"]})
    assert d.before is not None
    await d.start_campaign(
        "cmp-refuse-skip",
        version="2.0.0",
        nodes=["node-3"],
        vnfm_timeout_s=10,
        on_vnfm_timeout="skip-node",
        max_deferrals=1,
        deferral_s=1,
    )
    view = await d.follow("cmp-refuse-skip")
    after = await d.snapshot()
    assert view.state == "completed"
    node = view.nodes["node-3"]
    assert node.step is NodeStep.SKIPPED
    assert "vnfm-1: busy (refusal 2/10), still refused after 1 deferral(s)" in node.detail
    assert "policy skip-node" in node.detail
    events = in_campaign(await d.events(), "cmp-refuse-skip")
    assert len([m for m in of(events, BusinessMoved) if m.refusals]) == 2
    assert of(events, NodeUpgradeRequested) == [] and of(events, VmMigrationRequested) == []
    assert next(n for n in after.nodes if n.id == "node-3").installed_version == BASE
    assert_clean(d.before, after, d.logs())


# --- heartbeats ------------------------------------------------------------------------------


async def test_heartbeats_extend_the_deadline_up_to_the_hard_cap(
    deploy: Callable[..., Awaitable[Handshake]],
) -> None:
    d = await deploy(
        vnfm_args={"vnfm-1": ["--heartbeat-every", "1", "--work-s", "6", "--extend-by-s", "3"]}
    )
    assert d.before is not None
    # 1) a hard cap far away: the VNFM works 6 s on a 3 s timeout, keeps extending, and its
    #    reply counts
    await d.start_campaign(
        "cmp-heartbeat",
        version="2.0.0",
        nodes=["node-1"],
        vnfm_timeout_s=3,
        vnfm_hard_timeout_s=30,
    )
    view = await d.follow("cmp-heartbeat")
    assert view.state == "completed" and view.nodes["node-1"].step is NodeStep.DONE
    events = in_campaign(await d.events(), "cmp-heartbeat")
    [request] = of(events, BusinessMoveRequested)
    assert request.hard_deadline == request.occurred_at + timedelta(seconds=30)
    [moved] = of(events, BusinessMoved)
    extended = of(events, BusinessMoveDeadlineExtended)
    assert extended and all(e.causation_id == request.event_id for e in extended)
    assert max(e.deadline for e in extended) > request.deadline + timedelta(seconds=2)
    assert of(events, NoticeExpired) == []
    assert not moved.timed_out and moved.occurred_at > request.deadline  # beyond the timeout
    vnfm1 = [o for o in moved.outcomes if o.outcome is not BusinessOutcome.LEFT_FOR_VIM]
    assert vnfm1, "the VNFMs' answers counted"

    # 2) a hard cap at 5 s: the extensions stop there and the notice expires at the cap
    await d.start_campaign(
        "cmp-heartbeat-capped",
        version="3.0.0",
        nodes=["node-2"],
        vnfm_timeout_s=3,
        vnfm_hard_timeout_s=5,
    )
    view = await d.follow("cmp-heartbeat-capped")
    assert view.state == "completed" and view.nodes["node-2"].step is NodeStep.DONE
    events = in_campaign(await d.events(), "cmp-heartbeat-capped")
    [request] = of(events, BusinessMoveRequested)
    assert request.hard_deadline is not None
    extended = of(events, BusinessMoveDeadlineExtended)
    assert extended and max(e.deadline for e in extended) == request.hard_deadline
    [expired] = of(events, NoticeExpired)
    assert expired.vnfm_id == "vnfm-1" and expired.occurred_at >= request.hard_deadline
    [moved] = of(events, BusinessMoved)
    assert moved.timed_out and moved.occurred_at >= request.hard_deadline
    notices = of(await d.events(), VnfmReplyRejected, vnfm_id="vnfm-1")
    assert any(r.reason == "hard_deadline_reached" for r in notices), notices
    assert_clean(d.before, await d.snapshot(), d.logs())


# --- recovery --------------------------------------------------------------------------------

MIN_RECOVERY_S = 5.0  # longer than the 4 s resync: the standby is in sync by then


def recovery_profiles(profile: VnfProfile) -> VnfProfile:
    """vnfm-1's VNFs signal their recovery; vnfm-2's need MIN_RECOVERY_S between impacts."""
    if profile.vnfm_id == "vnfm-1":
        return profile.model_copy(update={"recovery_signal": True, "min_recovery_s": 0.0})
    return profile.model_copy(update={"recovery_signal": False, "min_recovery_s": MIN_RECOVERY_S})


async def test_next_impact_waits_for_the_recovery_signal_or_the_min_recovery_time(
    deploy: Callable[..., Awaitable[Handshake]],
) -> None:
    # Active-standby members resync for 4 s after their node's reboot (40 s / speed 10).
    # The planner would space the impacts itself (by min_recovery_s, which also covers the
    # signalled VNFs' resync here), so no notice would ever reach the adapter early: with the
    # planner off, the adapter's hold is the only guard, and this test is about that hold.
    d = await deploy(
        speed=10,
        world_args=["--resync-s", "40"],
        vnfm_args={"vnfm-1": ["--recovery-signal"]},
        profile=recovery_profiles,
        planner=False,
    )
    assert d.before is not None
    await d.start_campaign(
        "cmp-recovery",
        version="2.0.0",
        nodes=d.node_ids,
        vnfm_timeout_s=15,
    )
    view = await d.follow("cmp-recovery", timeout_s=150)
    after = await d.snapshot()
    assert view.state == "completed", view.reason
    assert all(n.step is NodeStep.DONE for n in view.nodes.values())
    assert_clean(d.before, after, d.logs())

    everything = await d.events()
    events = in_campaign(everything, "cmp-recovery")
    recovered = of(everything, VnfRecovered)
    available = [n for n in of(events, NodeAvailable) if n.vnfm_id is not None]
    signalled = {v.id for v in d.before.vnfs if v.vnfm_id == "vnfm-1"}
    held = 0
    for notice in of(events, VnfMaintenanceNotified):
        for affected in notice.vnfs:
            vnf = affected.vnf_id
            earlier = [
                n for n in available if vnf in n.vnf_ids and n.occurred_at < notice.occurred_at
            ]
            if not earlier:
                continue  # the VNF's first impact in the campaign
            impact_end = earlier[-1].occurred_at
            if vnf in signalled:
                ok = [
                    r
                    for r in recovered
                    if r.vnf_id == vnf and impact_end <= r.occurred_at <= notice.occurred_at
                ]
                assert ok, f"notice for {vnf} at {notice.occurred_at} before its VnfRecovered"
            else:
                waited = notice.occurred_at - impact_end
                assert waited >= timedelta(seconds=MIN_RECOVERY_S), (vnf, waited)
            held += 1
    assert held >= 2, "the campaign never impacted a VNF twice: nothing was tested"
    holds = [e for e in of(events, BusinessMoveDeadlineExtended) if " held: " in e.reason]
    assert holds, "no notice was ever held"
    # the standby had resynced by the next impact: every VNFM-handled VM was switched over or
    # drained, none left to the VIM because no standby was in sync
    for moved in of(events, BusinessMoved):
        assert not moved.timed_out
        left = [
            o.vm_id
            for o in moved.outcomes
            if o.vnf_id is not None and o.outcome is BusinessOutcome.LEFT_FOR_VIM
        ]
        assert left == [], left


# --- timeout policies with a silent VNFM -----------------------------------------------------


async def test_silent_vnfms_meet_each_timeout_policy(
    deploy: Callable[..., Awaitable[Handshake]],
) -> None:
    d = await deploy(vnfm_args={"vnfm-1": ["--silent"], "vnfm-2": ["--silent"]})
    assert d.before is not None

    # migrate: after the deadline the VIM migrates every VM, then the node is upgraded
    await d.start_campaign(
        "cmp-silent-migrate", version="2.0.0", nodes=["node-1"], vnfm_timeout_s=2
    )
    view = await d.follow("cmp-silent-migrate")
    assert view.state == "completed" and view.nodes["node-1"].step is NodeStep.DONE
    events = in_campaign(await d.events(), "cmp-silent-migrate")
    [moved] = of(events, BusinessMoved)
    assert moved.timed_out and {e.vnfm_id for e in of(events, NoticeExpired)} == {
        "vnfm-1",
        "vnfm-2",
    }
    migrations = of(events, VmMigrationRequested)
    on_node = {vm.id for vm in d.before.vms if vm.node_id == "node-1"}
    assert {m.vm_id for m in migrations} == on_node
    assert all(m.occurred_at >= moved.occurred_at for m in migrations)
    [request] = of(events, BusinessMoveRequested)
    assert moved.occurred_at >= request.deadline

    # skip-node: the node is released untouched and skipped
    before_skip = await d.snapshot()
    await d.start_campaign(
        "cmp-silent-skip",
        version="3.0.0",
        nodes=["node-2"],
        vnfm_timeout_s=2,
        on_vnfm_timeout="skip-node",
    )
    view = await d.follow("cmp-silent-skip")
    assert view.state == "completed" and view.nodes["node-2"].step is NodeStep.SKIPPED
    assert "policy skip-node" in view.nodes["node-2"].detail
    events = in_campaign(await d.events(), "cmp-silent-skip")
    assert of(events, VmMigrationRequested) == [] and of(events, NodeUpgradeRequested) == []
    snapshot = await d.snapshot()
    node2 = next(n for n in snapshot.nodes if n.id == "node-2")
    assert node2.installed_version == BASE and node2.maintenance_holder is None
    assert sorted(vm.id for vm in snapshot.vms if vm.node_id == "node-2") == sorted(
        vm.id for vm in before_skip.vms if vm.node_id == "node-2"
    )

    # abort: the campaign fails, the nodes not yet upgrading are released, none stays held
    await d.start_campaign(
        "cmp-silent-abort",
        version="4.0.0",
        nodes=["node-3", "node-4"],
        vnfm_timeout_s=2,
        on_vnfm_timeout="abort",
        max_parallel=2,
    )
    view = await d.follow("cmp-silent-abort")
    assert view.state == "failed" and "policy abort" in view.reason
    events = in_campaign(await d.events(), "cmp-silent-abort")
    [failed] = of(events, CampaignFailed)
    assert failed.upgraded == 0
    assert of(events, CampaignCompleted) == [] and of(events, NodeUpgradeRequested) == []
    # A node the planner had not started yet (node-3 and node-4 may share a VNF whose budget
    # allows one impact at a time) is never claimed and stays pending; one that was claimed is
    # released and skipped.
    claimed = {e.node_id for e in of(events, NodeMaintenanceRequested)}
    assert "node-3" in claimed or "node-4" in claimed
    assert {n.node_id: n.step for n in view.nodes.values()} == {
        node: NodeStep.SKIPPED if node in claimed else NodeStep.PENDING
        for node in ("node-3", "node-4")
    }
    after = await d.snapshot()
    assert {n.id: n.installed_version for n in after.nodes} == {
        "node-1": "2.0.0",
        "node-2": BASE,
        "node-3": BASE,
        "node-4": BASE,
    }
    assert_clean(d.before, after, d.logs())


# --- wrong replies ---------------------------------------------------------------------------


async def test_wrong_replies_get_a_rejection_and_the_campaign_completes(
    deploy: Callable[..., Awaitable[Handshake]],
) -> None:
    # vnfm-2 answers 4.5 s after a 3 s deadline: late (the 3 s reboot keeps the node's
    # collection around); the test forges a reply naming a VM that is not in vnfm-1's notice.
    d = await deploy(
        speed=10,
        world_args=["--reboot-s", "30"],
        vnfm_args={"vnfm-1": ["--reply-delay-s", "1.5"], "vnfm-2": ["--reply-delay-s", "4.5"]},
    )
    assert d.before is not None
    forged: list[VnfBusinessMoved] = []

    async def forge() -> None:
        from escalator.bus.connection import make_producer
        from escalator.bus.publisher import EventPublisher
        from escalator.bus.readback import scan

        producer = make_producer(d.settings)
        await producer.start()
        try:
            async for record in scan(d.settings, VNFM_NOTICES, follow=True):
                notice = decode(record.value)
                if isinstance(notice, VnfMaintenanceNotified) and notice.vnfm_id == "vnfm-1":
                    mine = notice.vnfs[0]
                    bad = VnfBusinessMoved(
                        **notice.caused(producer="forger"),
                        notice_id=notice.notice_id,
                        vnfm_id="vnfm-1",
                        outcomes=(
                            VmBusinessOutcome(
                                vm_id=mine.vm_ids[0],
                                vnf_id=mine.vnf_id,
                                outcome=BusinessOutcome.SWITCHED_OVER,
                            ),
                            VmBusinessOutcome(
                                vm_id="vm-999", outcome=BusinessOutcome.SWITCHED_OVER
                            ),
                        ),
                    )
                    await EventPublisher(producer, d.settings).publish(bad, VNFM_REPLIES)
                    forged.append(bad)
                    return
        finally:
            await producer.stop()

    forger = asyncio.create_task(forge())
    await d.start_campaign("cmp-wrong", version="2.0.0", nodes=["node-2"], vnfm_timeout_s=3)
    view = await d.follow("cmp-wrong")
    await asyncio.wait_for(forger, 10)
    assert view.state == "completed" and view.nodes["node-2"].step is NodeStep.DONE

    # the rejections reach the VNFMs on the notices topic, and arrive after vnfm-2's late reply
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        everything = await d.events()
        rejected = of(everything, VnfmReplyRejected)
        if {r.reason for r in rejected} >= {"foreign_vm", "late"}:
            break
        assert asyncio.get_running_loop().time() < deadline, rejected
        await asyncio.sleep(0.5)
    [foreign] = [r for r in rejected if r.reason == "foreign_vm"]
    [bad] = forged
    assert foreign.vnfm_id == "vnfm-1" and foreign.rejected_event_id == bad.event_id
    assert foreign.notice_id == bad.notice_id and "vm-999" in foreign.detail
    [late] = [r for r in rejected if r.reason == "late"]
    assert late.vnfm_id == "vnfm-2" and "expired at" in late.detail
    late_reply = next(e for e in everything if e.event_id == late.rejected_event_id)
    assert isinstance(late_reply, VnfBusinessMoved) and late_reply.vnfm_id == "vnfm-2"
    # the campaign took vnfm-1's real answer, and vnfm-2's VMs were left to the VIM
    events = in_campaign(everything, "cmp-wrong")
    [moved] = of(events, BusinessMoved)
    assert moved.timed_out
    real = next(
        e
        for e in of(everything, VnfBusinessMoved)
        if e.vnfm_id == "vnfm-1" and e.producer != "forger"
    )
    assert {o.vm_id: o.outcome for o in real.outcomes}.items() <= {
        o.vm_id: o.outcome for o in moved.outcomes
    }.items()
    assert "vm-999" not in {o.vm_id for o in moved.outcomes}
    # wrong vendor replies are answered, not dead-lettered
    letters = await d.dead_letters()
    assert [x for x in letters if x.source_topic == d.settings.topic(VNFM_REPLIES.name)] == []
    assert_clean(d.before, await d.snapshot(), d.logs())
