"""Shared machinery of the end-to-end tests: a whole deployment as OS processes on the test broker.

`E2EDeployment` is `escalator.demo.Deployment` with per-service extra flags and environment (the
negative controls), plus what the tests need around it: starting campaigns through the CLI (a
child process, exactly as an operator would), following the campaigns topic, collecting every
event of a campaign from every catalogue topic, and reading the dead-letter topic and the world.

Imported by the tests of this directory as a plain module (pytest puts the directory on
`sys.path`), next to `conftest.py`, which builds and tears down deployments.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from escalator.broker import BrokerHandle
from escalator.demo import (
    DemoOptions,
    Deployment,
    publish_registry_from_world,
    wait_for_heartbeats,
    write_demo_manifest,
)
from escalator.processes import ProcessGroup, python_module
from escalator.settings import KafkaSettings
from escalator.status import CampaignBoard, CampaignView
from escalator.world.client import WorldClient
from escalator.world.model import WorldSnapshot
from schemas.codec import decode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import NodeCycleAdvanced, NodeStep
from schemas.topics import ALL_TOPICS, CAMPAIGNS, DEAD_LETTERS_TOPIC

TARGET = "2.0.0"

# Service roles, as the extra-args/env maps of `E2EOptions` name them.
UPGRADE_MANAGER = "upgrade-manager"
CLOUD_MANAGER = "cloud-manager"
VNFM_ADAPTER = "vnfm-adapter"
REFERENCE_VNFM = "reference-vnfm"
NODE_AGENT = "node-agent"
ROLES = (UPGRADE_MANAGER, CLOUD_MANAGER, VNFM_ADAPTER, REFERENCE_VNFM, NODE_AGENT)

# The Upgrade Manager logs this once it owns its partitions and has recovered its state.
UM_READY = r"ready \(rebalance \d+"

CYCLE = (
    NodeStep.CLAIMING,
    NodeStep.NOTIFYING,
    NodeStep.MIGRATING,
    NodeStep.UPGRADING,
    NodeStep.RELEASING,
    NodeStep.DONE,
)


class CampaignStalled(AssertionError):
    """The campaign did not finish in time (`follow_campaign`)."""

    def __init__(self, message: str, view: CampaignView) -> None:
        super().__init__(message)
        self.view = view


@dataclass
class E2EOptions(DemoOptions):
    """`DemoOptions` plus per-role extra command-line flags and environment variables."""

    nodes: int = 4
    domains: int = 2
    speed: float = 20.0
    vnfm_timeout_s: float = 3.0
    version: str = TARGET
    timeout_s: float = 90.0
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = (set(self.extra_args) | set(self.extra_env)) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown service roles {sorted(unknown)}; use {ROLES}")


@dataclass
class E2EDeployment(Deployment):
    """The demo's deployment with extra flags/env per service and test helpers."""

    before: WorldSnapshot | None = None

    @property
    def opts(self) -> E2EOptions:
        assert isinstance(self.options, E2EOptions)
        return self.options

    @classmethod
    def build(cls, settings: KafkaSettings, options: E2EOptions) -> E2EDeployment:
        group = ProcessGroup(options.run_dir / "logs", base_env=settings.to_env())
        return cls(settings=settings, options=options, group=group)

    # --- processes -----------------------------------------------------------------------------

    def _spawn(self, role: str, name: str, argv: list[str]) -> None:
        o = self.opts
        self.group.spawn(
            name, [*argv, *o.extra_args.get(role, [])], env=o.extra_env.get(role) or None
        )

    def start_services(self) -> None:
        # Same processes as Deployment.start_services, with the extra flags and environment.
        w = self.world_url
        self._spawn(UPGRADE_MANAGER, "upgrade-manager", python_module("services.upgrade_manager"))
        self._spawn(
            CLOUD_MANAGER,
            "cloud-manager",
            python_module("services.cloud_manager", "--world", w),
        )
        self._spawn(VNFM_ADAPTER, "vnfm-adapter", python_module("services.vnfm_adapter"))
        for vnfm_id in self.vnfm_ids:
            self._spawn(
                REFERENCE_VNFM,
                f"reference-vnfm-{vnfm_id}",
                python_module(
                    "services.vnfm_adapter.reference_vnfm", "--world", w, "--vnfm-id", vnfm_id
                ),
            )
        for node_id in self.node_ids:
            self._spawn(
                NODE_AGENT,
                f"node-agent-{node_id}",
                python_module("services.node_agent", "--node-id", node_id, "--world", w),
            )

    def kill_and_restart(self, name: str) -> None:
        """SIGKILL a service and start it again with the same argv and env (main thread only:
        children die with the thread that spawned them)."""
        self.group.kill(name)
        self.group.restart(name)

    def grep_logs(self, pattern: str) -> list[str]:
        """Lines of every child's log (all runs of it) matching `pattern`."""
        regex = re.compile(pattern)
        found = []
        for child in self.group.children.values():
            try:
                text = child.log_path.read_text(errors="replace")
            except OSError:
                continue
            found += [f"{child.name}: {line}" for line in text.splitlines() if regex.search(line)]
        return found

    def logs(self, lines: int = 15) -> str:
        """Tails of every child's log, for assertion messages."""
        parts = [f"logs in {self.group.log_dir}"]
        for child in self.group.children.values():
            state = "alive" if child.alive else f"exit {child.process.returncode}"
            parts.append(f"--- {child.name} ({state}) ---\n{child.log_tail(lines)}")
        return "\n".join(parts)

    # --- set-up --------------------------------------------------------------------------------

    async def prepare(self, *, registry: bool = True) -> WorldSnapshot:
        """Start every service, publish the registry (unless `registry=False`: then call
        `publish_registry()` yourself), wait for every agent's heartbeat and for the Upgrade
        Manager to own its partitions."""
        from escalator.bus.connection import ensure_topics

        if not self.world_url:
            self.start_world()
        await ensure_topics(self.settings)
        async with WorldClient(self.world_url) as world:
            self.before = await world.snapshot()
        self.node_ids = sorted(n.id for n in self.before.nodes)
        self.vnfm_ids = sorted({v.vnfm_id for v in self.before.vnfs})
        if registry:
            await self.publish_registry()
        self.start_services()
        await wait_for_heartbeats(self.settings, self.node_ids, self, timeout_s=60)
        await self.wait_log("upgrade-manager", UM_READY, timeout_s=60)
        return self.before

    async def publish_registry(self) -> None:
        _, vnfm_ids = await publish_registry_from_world(self.settings, self.world_url)
        assert vnfm_ids == self.vnfm_ids

    async def wait_log(self, name: str, pattern: str, *, timeout_s: float, after: int = 0) -> str:
        """Wait until the child's log has a line matching `pattern` beyond byte `after`."""
        regex = re.compile(pattern)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        path = self.group.children[name].log_path
        while True:
            try:
                text = path.read_bytes()[after:].decode(errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines():
                if regex.search(line):
                    return line
            if loop.time() > give_up:
                raise AssertionError(f"{name} never logged /{pattern}/\n{self.logs()}")
            await asyncio.sleep(0.1)

    def log_size(self, name: str) -> int:
        try:
            return self.group.children[name].log_path.stat().st_size
        except OSError:
            return 0

    # --- the operator's CLI --------------------------------------------------------------------

    async def cli(self, *args: str, timeout_s: float = 120.0) -> tuple[int, str, str]:
        """Run `python -m escalator ARGS` with the deployment's Kafka settings."""
        import os

        env = dict(os.environ)
        env.update(self.settings.to_env())
        env["COLUMNS"] = "200"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "escalator",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def start_campaign(
        self,
        campaign_id: str,
        *,
        vnfm_timeout_s: float | None = None,
        max_parallel: int | None = None,
        nodes: Sequence[str] | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        """`escalator upgrade start ...` as a child process; returns the id it printed."""
        o = self.options
        manifest = write_demo_manifest(o.run_dir, o.version)
        args = [
            "upgrade",
            "start",
            "--version",
            o.version,
            "--manifest",
            str(manifest),
            "--max-parallel",
            str(max_parallel or o.max_parallel),
            "--vnfm-timeout",
            str(vnfm_timeout_s if vnfm_timeout_s is not None else o.vnfm_timeout_s),
            "--on-vnfm-timeout",
            "migrate",
            "--campaign-id",
            campaign_id,
            "--requested-by",
            "e2e-test",
        ]
        for node in nodes or []:
            args += ["--nodes", node]
        args += list(extra)
        code, out, err = await self.cli(*args)
        assert code == 0, f"upgrade start exited {code}: {err}"
        printed = out.strip().splitlines()[-1].strip()
        assert printed == campaign_id, f"upgrade start printed {out!r}"
        return printed

    # --- reading the bus -----------------------------------------------------------------------

    async def follow_campaign(
        self,
        campaign_id: str,
        *,
        timeout_s: float | None = None,
        on_event: Callable[[Event, CampaignView], Awaitable[None] | None] | None = None,
        check_alive: bool = True,
    ) -> CampaignView:
        """Follow the campaigns topic until the campaign ends; `on_event` sees each of its
        events (after the board applied it). Fails early if a child process died."""
        from escalator.bus.readback import scan

        board = CampaignBoard()
        key = campaign_id.encode()

        async def follow() -> CampaignView:
            async for record in scan(self.settings, CAMPAIGNS, follow=True):
                if record.key != key:
                    continue
                event = decode(record.value)
                if not isinstance(event, Event):
                    continue
                board.apply(event)
                view = board.view(campaign_id)
                if on_event is not None:
                    result = on_event(event, view)
                    if result is not None:
                        await result
                if view.finished:
                    return view
            raise AssertionError("campaigns topic ended")  # pragma: no cover

        task = asyncio.create_task(follow())
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (timeout_s or self.options.timeout_s)
        try:
            while not task.done():
                if check_alive:
                    dead = self.group.dead()
                    if dead:
                        raise AssertionError(
                            f"{dead[0].name} died during the campaign\n{self.logs()}"
                        )
                if loop.time() > give_up:
                    state = board.view(campaign_id).state
                    steps = {
                        n.node_id: n.step.value for n in board.view(campaign_id).nodes.values()
                    }
                    raise CampaignStalled(
                        f"campaign {campaign_id} still {state} {steps} after "
                        f"{timeout_s or self.options.timeout_s}s\n{self.logs()}",
                        board.view(campaign_id),
                    )
                await asyncio.wait({task}, timeout=0.25)
            return task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run_campaign(self, campaign_id: str, **kw: Any) -> CampaignView:
        await self.start_campaign(campaign_id, **kw)
        return await self.follow_campaign(campaign_id)

    async def campaign_events(self, campaign_id: str) -> list[Event]:
        """Every event of the campaign on every catalogue topic (duplicates by event id removed),
        in `occurred_at` order."""
        from escalator.bus.readback import scan

        seen: dict[str, Event] = {}
        for spec in ALL_TOPICS:
            async for record in scan(self.settings, spec):
                event = decode(record.value) if record.value is not None else None
                if isinstance(event, Event) and event.campaign_id == campaign_id:
                    seen.setdefault(str(event.event_id), event)
        return sorted(seen.values(), key=lambda e: e.occurred_at)

    async def dead_letters(self) -> list[DeadLetter]:
        from escalator.bus.readback import scan

        found: list[DeadLetter] = []
        async for record in scan(self.settings, self.settings.topic(DEAD_LETTERS_TOPIC)):
            if record.value is not None:
                found.append(DeadLetter.model_validate_json(record.value))
        return found

    async def snapshot(self) -> WorldSnapshot:
        async with WorldClient(self.world_url) as world:
            return await world.snapshot()

    async def status_json(self, campaign_id: str) -> dict[str, Any]:
        code, out, err = await self.cli("status", campaign_id, "--json")
        assert code == 0, f"status exited {code}: {err}"
        result: dict[str, Any] = json.loads(out)
        return result


def e2e_settings(broker: BrokerHandle) -> KafkaSettings:
    """The session broker with topics of our own, and a short group session so that a
    SIGKILLed consumer's partitions move to its restarted successor within seconds."""
    return broker.settings.model_copy(
        update={
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
        }
    )


def fresh_deployment(broker: BrokerHandle, run_dir: Path, **options: Any) -> E2EDeployment:
    """A deployment with its world started (services not yet: `await d.prepare()`); the caller
    stops it (`d.stop()`)."""
    deployment = E2EDeployment.build(e2e_settings(broker), E2EOptions(run_dir=run_dir, **options))
    try:
        deployment.start_world()
    except BaseException:
        deployment.stop()
        raise
    return deployment


# --- checks shared by several tests ---------------------------------------------------------


def of_type(events: Iterable[Event], *names: str) -> list[Event]:
    return [e for e in events if e.event_type in names]


def for_node(events: Iterable[Event], node_id: str) -> list[Event]:
    return [e for e in events if getattr(e, "node_id", None) == node_id]


def first_time(events: Iterable[Event]) -> datetime:
    return min(e.occurred_at for e in events)


def last_time(events: Iterable[Event]) -> datetime:
    return max(e.occurred_at for e in events)


def steps_of(events: Iterable[Event], node_id: str) -> list[NodeStep]:
    """The node's steps in order; a step repeated with a new detail (say, a VNFM deadline
    extended) counts once. Before its first claim a node may be reported PENDING with what
    blocks it (the planner's "waiting (...)"): that is not a step of its cycle, so it is left
    out."""
    steps: list[NodeStep] = []
    for e in events:
        if isinstance(e, NodeCycleAdvanced) and e.node_id == node_id:
            if not steps and e.step is NodeStep.PENDING:
                continue
            if not steps or steps[-1] is not e.step:
                steps.append(e.step)
    return steps


def assert_clean_finish(
    view: CampaignView,
    before: WorldSnapshot,
    after: WorldSnapshot,
    *,
    context: str = "",
) -> None:
    """Completed, every node at the target, the same VMs, none in maintenance, zero
    interruptions in the world's monitor log, every node rebooted exactly once."""
    assert view.state == "completed", f"campaign {view.state}: {view.reason}\n{context}"
    assert {n.id: n.installed_version for n in after.nodes} == {
        n.id: TARGET for n in before.nodes
    }, context
    assert sorted(vm.id for vm in after.vms) == sorted(vm.id for vm in before.vms), context
    left = sorted(n.id for n in after.nodes if n.maintenance_holder)
    assert not left, f"left in maintenance: {left}\n{context}"
    interruptions = after.interruptions  # a fresh world per test: any one is a failure
    assert not interruptions, (
        f"{len(interruptions)} interruption(s): "
        f"{[i.model_dump(mode='json') for i in interruptions]}\n{context}"
    )
    reboots = {n.id: n.reboot_count for n in after.nodes}
    assert reboots == {n.id: 1 for n in before.nodes}, f"reboots per node {reboots}\n{context}"
