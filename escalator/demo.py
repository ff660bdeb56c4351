"""`escalator demo`: a whole upgrade campaign on a simulated cloud, every service its own process.

It gets a broker from the launcher (so `KAFKA_BOOTSTRAP_SERVERS` points it at an existing one),
starts the world and the four services, publishes the world's VNFs to the registry, waits for
every node agent's heartbeat, starts a campaign through the same code path as `upgrade start`,
follows it with live progress, and writes a JSON report whose `business_interruptions` comes
from the world's service monitor, never from an Escalator service.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from escalator.processes import ProcessGroup, await_while_alive, python_module
from escalator.settings import KafkaSettings

DEMO_SHA = "5f2b1c7d9e0a4b3c8d6e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e"


@dataclass
class DemoOptions:
    nodes: int = 12
    domains: int = 3
    seed: int = 0
    speed: float = 4.0
    max_parallel: int = 1
    # Fill the generated cloud only down to this fraction of free capacity (None: about one
    # node's worth of room, which lets one node at a time evacuate).
    spare_fraction: float | None = None
    # A saved world (e.g. bench/scenarios/standard.json) instead of a generated one.
    scenario: Path | None = None
    vnfm_timeout_s: float = 20.0
    version: str = "2.0.0"
    timeout_s: float = 900.0
    report: Path | None = None
    run_dir: Path = field(
        default_factory=lambda: Path(".cache") / "demo" / time.strftime("%Y%m%d-%H%M%S")
    )


@dataclass
class Deployment:
    """The world and Escalator's services, as processes, on one set of topics."""

    settings: KafkaSettings
    options: DemoOptions
    group: ProcessGroup
    world_url: str = ""
    node_ids: list[str] = field(default_factory=list)
    vnfm_ids: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, settings: KafkaSettings, options: DemoOptions) -> Deployment:
        group = ProcessGroup(options.run_dir / "logs", base_env=settings.to_env())
        return cls(settings, options, group)

    def start_world(self) -> str:
        o = self.options
        if o.scenario is not None:
            shape = ["--scenario", str(o.scenario)]
        else:
            shape = ["--nodes", str(o.nodes), "--domains", str(o.domains), "--seed", str(o.seed)]
            if o.spare_fraction is not None:
                shape += ["--spare-fraction", str(o.spare_fraction)]
        match = self.group.spawn(
            "world",
            python_module("escalator.world", "--port", "0", "--speed", str(o.speed), *shape),
            wait_for=r"world listening on (http://\S+)",
        )
        assert not isinstance(match, type(None))
        self.world_url = match.group(1)  # type: ignore[union-attr]
        return self.world_url

    def start_services(self) -> None:
        w = self.world_url
        spawn = self.group.spawn
        spawn("upgrade-manager", python_module("services.upgrade_manager"))
        spawn("cloud-manager", python_module("services.cloud_manager", "--world", w))
        spawn("vnfm-adapter", python_module("services.vnfm_adapter"))
        for vnfm_id in self.vnfm_ids:
            spawn(
                f"reference-vnfm-{vnfm_id}",
                python_module(
                    "services.vnfm_adapter.reference_vnfm", "--world", w, "--vnfm-id", vnfm_id
                ),
            )
        for node_id in self.node_ids:
            spawn(
                f"node-agent-{node_id}",
                python_module("services.node_agent", "--node-id", node_id, "--world", w),
            )

    def check_alive(self) -> None:
        dead = self.group.dead()
        if dead:
            child = dead[0]
            raise RuntimeError(
                f"{child.name} exited with {child.process.returncode}; log {child.log_path}:\n"
                f"{child.log_tail()}"
            )

    def stop(self) -> None:
        # Services first: they may still be talking to the world while they shut down.
        world = self.group.children.pop("world", None)
        self.group.stop_all()
        if world is not None:
            self.group.children["world"] = world
            self.group.stop_all()


async def publish_registry_from_world(
    settings: KafkaSettings, world_url: str
) -> tuple[int, list[str]]:
    from escalator.bus.connection import make_producer
    from escalator.bus.publisher import EventPublisher
    from escalator.registry import publish_profiles
    from escalator.world.client import WorldClient
    from schemas.events import VnfProfile

    async with WorldClient(world_url) as world:
        vnfs = await world.vnfs()
        # The world's durations are nominal and divided by its speed; the registry speaks in
        # the real seconds the services wait.
        speed = float((await world.healthz()).get("speed", 1.0)) or 1.0
    profiles = [
        VnfProfile(
            vnf_id=v.id,
            vnfm_id=v.vnfm_id,
            redundancy=v.redundancy,
            members=tuple(v.members),
            min_in_service=v.min_in_service,
            max_unavailable=v.max_unavailable,
            min_recovery_s=v.min_recovery_s / speed,
            # The world puts every VNF's members in one anti-affinity server group.
            anti_affinity=True,
        )
        for v in vnfs
    ]
    producer = make_producer(settings)
    await producer.start()
    try:
        count = await publish_profiles(
            EventPublisher(producer, settings), profiles, producer="demo"
        )
    finally:
        await producer.stop()
    return count, sorted({p.vnfm_id for p in profiles})


async def wait_for_heartbeats(
    settings: KafkaSettings, node_ids: list[str], deployment: Deployment, timeout_s: float
) -> None:
    from escalator.bus.readback import scan
    from schemas.topics import NODE_HEARTBEATS

    missing = set(node_ids)

    async def follow() -> None:
        async for record in scan(settings, NODE_HEARTBEATS, follow=True):
            if record.key is not None:
                missing.discard(record.key.decode())
            if not missing:
                return

    await await_while_alive(
        asyncio.create_task(follow()),
        deployment.check_alive,
        timeout_s=timeout_s,
        timed_out=lambda: f"no heartbeat from {sorted(missing)} within {timeout_s}s",
        poll_s=0.5,
    )


def write_demo_manifest(run_dir: Path, version: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "manifest.json"
    manifest = {
        "version": version,
        "files": [
            {
                "name": f"compute-node-{version}.tar.zst",
                "sha256": DEMO_SHA,
                "uri": f"https://repo.example.net/escalator/{version}/compute-node-{version}.tar.zst",
            }
        ],
    }
    path.write_text(json.dumps(manifest, indent=2))
    return path


async def run_campaign(
    deployment: Deployment, options: DemoOptions, broker_description: str, console: Console
) -> dict[str, Any]:
    from escalator.bus.connection import ensure_topics
    from escalator.cli import build_upgrade_request, publish_upgrade_request, watch_campaign
    from escalator.world.client import WorldClient
    from schemas.types import VnfmTimeoutPolicy

    settings = deployment.settings
    await ensure_topics(settings)
    console.print(f"world: {options.nodes} nodes, {options.domains} failure domains")
    async with WorldClient(deployment.world_url) as world:
        before = await world.snapshot()
    deployment.node_ids = sorted(n.id for n in before.nodes)
    count, deployment.vnfm_ids = await publish_registry_from_world(settings, deployment.world_url)
    pairs = sum(1 for v in before.vnfs if v.redundancy == "active_standby")
    console.print(
        f"registry: {count} VNFs ({pairs} active-standby), {len(before.vms)} VMs, "
        f"VNFMs {', '.join(deployment.vnfm_ids)}"
    )
    deployment.start_services()
    console.print(
        f"services: upgrade-manager, cloud-manager, vnfm-adapter, "
        f"{len(deployment.vnfm_ids)} reference VNFM(s), {len(deployment.node_ids)} node agents"
    )
    await wait_for_heartbeats(settings, deployment.node_ids, deployment, timeout_s=120)

    request = build_upgrade_request(
        version=options.version,
        manifest=write_demo_manifest(options.run_dir, options.version),
        artifacts=[],
        repo_url=None,
        nodes=deployment.node_ids,
        max_parallel=options.max_parallel,
        vnfm_timeout=options.vnfm_timeout_s,
        on_vnfm_timeout=VnfmTimeoutPolicy.MIGRATE,
        campaign_id=None,
        requested_by="escalator demo",
    )
    started = time.time()
    await publish_upgrade_request(settings, request)
    console.print(f"campaign {request.campaign_id}: upgrade to {options.version} requested")

    watcher = asyncio.create_task(
        watch_campaign(settings, request.campaign_id or "", console, timeout_s=options.timeout_s)
    )
    while not watcher.done():
        if deployment.group.dead():
            watcher.cancel()
            deployment.check_alive()
        await asyncio.wait({watcher}, timeout=1.0)
    view = watcher.result()
    elapsed = time.time() - started

    async with WorldClient(deployment.world_url) as world:
        after = await world.snapshot()
    interruptions = [i for i in after.interruptions if i.started_at >= started]
    counts = view.to_json()["nodes"]
    vm_ids_before = {vm.id for vm in before.vms}
    vm_ids_after = {vm.id for vm in after.vms}
    return {
        "campaign_id": request.campaign_id,
        "state": view.state,
        "reason": view.reason,
        "target_version": options.version,
        "duration_s": round(elapsed, 2),
        "nodes": {
            "total": counts["total"],
            "upgraded": counts["upgraded"],
            "skipped": counts["skipped"],
            "failed": counts["failed"],
            "at_target_version": sum(
                1 for n in after.nodes if n.installed_version == options.version
            ),
            "left_in_maintenance": sorted(n.id for n in after.nodes if n.maintenance_holder),
        },
        "vms": {
            "before": len(vm_ids_before),
            "after": len(vm_ids_after),
            "lost": sorted(vm_ids_before - vm_ids_after),
        },
        "business_interruptions": len(interruptions),
        "interruptions": [i.model_dump(mode="json") for i in interruptions],
        "broker": broker_description,
        "world": {
            "nodes": options.nodes,
            "domains": options.domains,
            "seed": options.seed,
            "speed": options.speed,
        },
        "policy": {"max_parallel": options.max_parallel, "vnfm_timeout_s": options.vnfm_timeout_s},
        "logs": str(deployment.group.log_dir),
    }


def demo_succeeded(report: dict[str, Any]) -> bool:
    """Every node at the target version, zero interruptions, no VM lost."""
    nodes = report["nodes"]
    return (
        report["state"] == "completed"
        and nodes["at_target_version"] == nodes["total"] == nodes["upgraded"]
        and report["business_interruptions"] == 0
        and not report["vms"]["lost"]
        and report["vms"]["before"] == report["vms"]["after"]
        and not nodes["left_in_maintenance"]
    )


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title="escalator demo", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = [
        ("campaign", report["campaign_id"]),
        ("state", report["state"]),
        ("duration", f"{report['duration_s']} s"),
        ("nodes upgraded", f"{report['nodes']['upgraded']} / {report['nodes']['total']}"),
        ("nodes skipped / failed", f"{report['nodes']['skipped']} / {report['nodes']['failed']}"),
        ("VMs before / after", f"{report['vms']['before']} / {report['vms']['after']}"),
        ("business interruptions", str(report["business_interruptions"])),
        ("broker", report["broker"]),
        ("logs", report["logs"]),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def run(options: DemoOptions, console: Console) -> dict[str, Any]:
    """Start a broker (or use the configured one), run the demo, stop everything."""
    from escalator.broker import start_broker

    handle = start_broker(log=lambda line: console.print(line, markup=False, highlight=False))
    settings = handle.settings.model_copy(update={"topic_prefix": f"demo-{uuid.uuid4().hex[:8]}."})
    deployment = Deployment.create(settings, options)
    try:
        deployment.start_world()
        report = asyncio.run(run_campaign(deployment, options, handle.description, console))
    finally:
        deployment.stop()
        handle.stop()
    if options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(report, indent=2) + "\n")
    return report
