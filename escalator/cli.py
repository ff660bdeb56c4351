"""`escalator`: the operator's command line.

Every verb fails on bad input with one line on stderr and exit code 2, so scripts can tell a
usage error from a failed run.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import re
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from escalator.settings import KafkaSettings
from escalator.status import STEP_ORDER, CampaignBoard, CampaignView
from schemas.events import (
    CampaignPolicy,
    NodeStep,
    OnAbortUpgrading,
    UpgradeRequested,
    VnfProfile,
)
from schemas.types import ArtifactFile, VersionManifest, VnfmTimeoutPolicy

app = typer.Typer(
    name="escalator",
    help="Rolling upgrades of NFV compute nodes that keep VNFs serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
upgrade_app = typer.Typer(help="Start upgrade campaigns.", no_args_is_help=True)
registry_app = typer.Typer(help="The VNF registry (compacted topic).", no_args_is_help=True)
app.add_typer(upgrade_app, name="upgrade")
app.add_typer(registry_app, name="registry")

err = Console(stderr=True)
out = Console()

SERVICES = {
    "upgrade-manager": "services.upgrade_manager",
    "cloud-manager": "services.cloud_manager",
    "vnfm-adapter": "services.vnfm_adapter",
    "node-agent": "services.node_agent",
    "reference-vnfm": "services.vnfm_adapter.reference_vnfm",
}


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"escalator: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def kafka_settings() -> KafkaSettings:
    try:
        return KafkaSettings()
    except ValidationError as exc:
        fail(f"bad Kafka settings in the environment: {_first_error(exc)}")


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"{where}: {first['msg']}"


# --- upgrade start ----------------------------------------------------------------------------


def _read_manifest(path: Path, version: str) -> VersionManifest:
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read manifest {path}: {exc.strerror}")
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        fail(f"manifest {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}")
    if not isinstance(data, dict):
        fail(f"manifest {path} must be an object with 'files'")
    data.setdefault("version", version)
    if data["version"] != version:
        fail(f"manifest {path} is for version {data['version']!r}, not --version {version!r}")
    try:
        return VersionManifest.model_validate(data)
    except ValidationError as exc:
        fail(f"manifest {path}: {_first_error(exc)}")


def _manifest_from_artifacts(
    paths: list[Path], repo_url: str | None, version: str
) -> VersionManifest:
    if not repo_url:
        fail("--artifact needs --repo-url: node agents fetch files by URI, never a local path")
    files = []
    for path in paths:
        if not path.is_file():
            fail(f"artifact {path} is not a readable file")
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        uri = f"{repo_url.rstrip('/')}/{path.name}"
        try:
            files.append(
                ArtifactFile(
                    name=path.name,
                    sha256=digest.hexdigest(),
                    uri=uri,
                    size_bytes=path.stat().st_size,
                )
            )
        except ValidationError as exc:
            fail(f"artifact {path}: {_first_error(exc)}")
    try:
        return VersionManifest(version=version, files=tuple(files))
    except ValidationError as exc:
        fail(_first_error(exc))


def new_campaign_id(version: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")[:40] or "v"
    return f"cmp-{slug}-{uuid.uuid4().hex[:8]}"


def build_upgrade_request(
    *,
    version: str,
    manifest: Path | None,
    artifacts: list[Path],
    repo_url: str | None,
    nodes: list[str],
    max_parallel: int,
    vnfm_timeout: float,
    on_vnfm_timeout: VnfmTimeoutPolicy,
    campaign_id: str | None,
    requested_by: str,
    policy_extra: dict[str, Any] | None = None,
) -> UpgradeRequested:
    if (manifest is None) == (not artifacts):
        fail("give exactly one of --manifest FILE or --artifact FILE...")
    built = (
        _read_manifest(manifest, version)
        if manifest is not None
        else _manifest_from_artifacts(artifacts, repo_url, version)
    )
    node_list = [n for item in nodes for n in item.split(",") if n.strip()]
    try:
        policy = CampaignPolicy(
            max_parallel=max_parallel,
            vnfm_timeout_s=vnfm_timeout,
            on_vnfm_timeout=on_vnfm_timeout,
            **(policy_extra or {}),
        )
        return UpgradeRequested(
            campaign_id=campaign_id or new_campaign_id(version),
            manifest=built,
            nodes=tuple(n.strip() for n in node_list) or None,
            policy=policy,
            requested_by=requested_by,
            producer="operator-cli",
        )
    except ValidationError as exc:
        fail(_first_error(exc))


async def publish_upgrade_request(settings: KafkaSettings, request: UpgradeRequested) -> None:
    from escalator.bus.connection import ensure_topics, make_producer
    from escalator.bus.publisher import EventPublisher
    from schemas.topics import CAMPAIGNS

    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        await EventPublisher(producer, settings).publish(request, CAMPAIGNS)
    finally:
        await producer.stop()


@upgrade_app.command("start")
def upgrade_start(
    version: Annotated[str, typer.Option("--version", help="Version to roll out.")],
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="JSON or TOML manifest: files with name, sha256, uri."),
    ] = None,
    artifact: Annotated[
        list[Path] | None, typer.Option("--artifact", help="A file of the version (repeatable).")
    ] = None,
    repo_url: Annotated[
        str | None, typer.Option("--repo-url", help="Where node agents fetch --artifact files.")
    ] = None,
    nodes: Annotated[
        list[str] | None, typer.Option("--nodes", help="Nodes to upgrade (repeat or comma list).")
    ] = None,
    max_parallel: Annotated[int, typer.Option("--max-parallel", min=1, max=10_000)] = 1,
    vnfm_timeout: Annotated[
        float,
        typer.Option("--vnfm-timeout", min=0.001, help="Seconds the VNFM has to move business."),
    ] = 40.0,
    on_vnfm_timeout: Annotated[
        VnfmTimeoutPolicy, typer.Option("--on-vnfm-timeout", help="Policy when the VNFM is late.")
    ] = VnfmTimeoutPolicy.MIGRATE,
    max_deferrals: Annotated[
        int, typer.Option("--max-deferrals", min=0, max=100, help="Refusals before the policy.")
    ] = 3,
    deferral_s: Annotated[
        float, typer.Option("--deferral-s", min=0, help="Wait before retrying a refused node.")
    ] = 60.0,
    vnfm_extension_max_s: Annotated[
        float,
        typer.Option("--vnfm-extension-max-s", min=0.001, help="Most one VNFM heartbeat adds."),
    ] = 60.0,
    vnfm_hard_timeout: Annotated[
        float,
        typer.Option("--vnfm-hard-timeout", min=0.001, help="No heartbeat extends beyond this."),
    ] = 3600.0,
    max_per_failure_domain: Annotated[
        int | None,
        typer.Option("--max-per-failure-domain", help="Nodes of one failure domain at once."),
    ] = None,
    canary_nodes: Annotated[
        int, typer.Option("--canary-nodes", help="First batch, alone; 0: no canary.")
    ] = 0,
    canary_bake_s: Annotated[
        float, typer.Option("--canary-bake-s", help="Wait after the canary batch.")
    ] = 0.0,
    window_start: Annotated[
        str | None, typer.Option("--window-start", help="No node starts before (ISO 8601).")
    ] = None,
    window_end: Annotated[
        str | None, typer.Option("--window-end", help="No node starts at or after (ISO 8601).")
    ] = None,
    failure_budget: Annotated[
        int | None, typer.Option("--failure-budget", help="Failed nodes that halt the campaign.")
    ] = None,
    stall_timeout_s: Annotated[
        float,
        typer.Option(
            "--stall-timeout-s",
            min=0.001,
            help="Fail after this long with nothing in its cycle and nothing able to start.",
        ),
    ] = 1800.0,
    keep_order: Annotated[
        bool,
        typer.Option(
            "--keep-order", help="Consider nodes in the --nodes order, not most-constrained first."
        ),
    ] = False,
    campaign_id: Annotated[str | None, typer.Option("--campaign-id")] = None,
    requested_by: Annotated[str, typer.Option("--requested-by")] = "operator",
) -> None:
    """Publish `UpgradeRequested` and print the campaign id."""
    request = build_upgrade_request(
        version=version,
        manifest=manifest,
        artifacts=artifact or [],
        repo_url=repo_url,
        nodes=nodes or [],
        max_parallel=max_parallel,
        vnfm_timeout=vnfm_timeout,
        on_vnfm_timeout=on_vnfm_timeout,
        campaign_id=campaign_id,
        requested_by=requested_by,
        policy_extra={
            "max_deferrals": max_deferrals,
            "deferral_s": deferral_s,
            "vnfm_extension_max_s": vnfm_extension_max_s,
            "vnfm_hard_timeout_s": vnfm_hard_timeout,
            "max_per_failure_domain": max_per_failure_domain,
            "canary_nodes": canary_nodes,
            "canary_bake_s": canary_bake_s,
            "window_start": window_start,
            "window_end": window_end,
            "failure_budget": failure_budget,
            "stall_timeout_s": stall_timeout_s,
            "keep_order": keep_order,
        },
    )
    settings = kafka_settings()
    try:
        asyncio.run(publish_upgrade_request(settings, request))
    except Exception as exc:  # any broker failure is one readable line, not a traceback
        fail(f"could not publish to Kafka: {exc}", code=1)
    out.print(request.campaign_id, markup=False, highlight=False)


# --- plan -------------------------------------------------------------------------------------


@app.command("plan")
def plan_command(
    scenario: Annotated[
        Path | None,
        typer.Option("--scenario", help="World scenario JSON: plan offline, no broker."),
    ] = None,
    nodes: Annotated[
        list[str] | None, typer.Option("--nodes", help="Nodes to upgrade (default: all).")
    ] = None,
    max_parallel: Annotated[int, typer.Option("--max-parallel", help="Nodes at once.")] = 1,
    max_per_failure_domain: Annotated[
        int | None, typer.Option("--max-per-failure-domain", help="Per failure domain.")
    ] = None,
    canary_nodes: Annotated[int, typer.Option("--canary-nodes", help="First batch.")] = 0,
    canary_bake_s: Annotated[float, typer.Option("--canary-bake-s")] = 0.0,
    window_start: Annotated[str | None, typer.Option("--window-start", help="ISO 8601.")] = None,
    window_end: Annotated[str | None, typer.Option("--window-end", help="ISO 8601.")] = None,
    failure_budget: Annotated[int | None, typer.Option("--failure-budget")] = None,
    claim_s: Annotated[float | None, typer.Option("--claim-s", help="Default 0.2.")] = None,
    notify_s: Annotated[float | None, typer.Option("--notify-s", help="Default 1.0.")] = None,
    migrate_s: Annotated[float | None, typer.Option("--migrate-s", help="Default 0.5.")] = None,
    upgrade_s: Annotated[float | None, typer.Option("--upgrade-s", help="Default 3.0.")] = None,
    release_s: Annotated[float | None, typer.Option("--release-s", help="Default 0.2.")] = None,
    migrate_moved_vms: Annotated[bool, typer.Option("--migrate-moved-vms")] = False,
    keep_order: Annotated[
        bool, typer.Option("--keep-order", help="Nodes in the --nodes order, as upgrade start.")
    ] = False,
    start_at: Annotated[
        str | None, typer.Option("--start-at", help="When it would start (ISO 8601; now).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Broker read limit.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Dry run: the batches, predicted duration and what blocks each node; nothing starts.

    Reads the inventory and VNF registry from the bus (or --scenario). Exit code 0: every node
    gets a batch; 3: some nodes can never be upgraded or get no batch under these constraints
    (all is still printed); 2: bad input; 1: the bus could not be read.
    """
    from escalator import plan as planning

    try:
        plan = planning.plan_from_options(
            scenario=scenario,
            settings=kafka_settings if scenario is None else None,
            timeout_s=timeout,
            nodes=nodes or [],
            start_at=start_at,
            policy={
                "max_parallel": max_parallel,
                "max_per_failure_domain": max_per_failure_domain,
                "canary_nodes": canary_nodes,
                "canary_bake_s": canary_bake_s,
                "window_start": window_start,
                "window_end": window_end,
                "failure_budget": failure_budget,
                "migrate_moved_vms": migrate_moved_vms,
                "keep_order": keep_order,
            },
            durations={
                "claim_s": claim_s,
                "notify_s": notify_s,
                "migrate_s": migrate_s,
                "upgrade_s": upgrade_s,
                "release_s": release_s,
            },
        )
    except planning.PlanError as exc:
        fail(exc.message, code=exc.code)
    planning.output(plan, out, as_json=as_json)
    raise typer.Exit(plan.exit_code)


# --- status and watch -------------------------------------------------------------------------


async def read_board(settings: KafkaSettings) -> CampaignBoard:
    from escalator.bus.readback import scan
    from schemas.codec import decode
    from schemas.envelope import Event
    from schemas.topics import CAMPAIGNS

    board = CampaignBoard()
    async for record in scan(settings, CAMPAIGNS):
        event = decode(record.value)
        if isinstance(event, Event):
            board.apply(event)
    return board


def campaign_table(view: CampaignView) -> Any:
    from rich.table import Table

    table = Table(
        title=f"{view.campaign_id}: {view.state} (target {view.target_version or '?'})",
        title_justify="left",
    )
    for column in ("node", "step", "since", "detail"):
        table.add_column(column)
    for node in view.nodes.values():
        since = node.since.strftime("%H:%M:%S") if node.since else ""
        table.add_row(node.node_id, node.step.value, since, node.detail)
    return table


def campaigns_table(board: CampaignBoard) -> Any:
    from rich.table import Table

    table = Table(
        "campaign", "state", "version", "upgraded", "skipped", "failed", "total", "started"
    )
    for view in board.campaigns.values():
        counts = view.to_json()["nodes"]
        started = view.started_at.strftime("%Y-%m-%d %H:%M:%S") if view.started_at else ""
        table.add_row(
            view.campaign_id,
            view.state,
            view.target_version,
            str(counts["upgraded"]),
            str(counts["skipped"]),
            str(counts["failed"]),
            str(counts["total"]),
            started,
        )
    return table


@app.command()
def status(
    campaign_id: Annotated[
        str | None, typer.Argument(help="Campaign id; all when omitted.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show campaigns, or one campaign node by node with what each node waits for."""
    settings = kafka_settings()
    try:
        board = asyncio.run(read_board(settings))
    except Exception as exc:
        fail(f"could not read the campaigns topic: {exc}", code=1)
    if campaign_id is not None and campaign_id not in board.campaigns:
        fail(f"no campaign {campaign_id!r} on the bus")
    if as_json:
        views = [board.campaigns[campaign_id]] if campaign_id else list(board.campaigns.values())
        payload: Any = views[0].to_json() if campaign_id else [v.to_json() for v in views]
        out.print_json(json.dumps(payload))
    elif campaign_id:
        view = board.campaigns[campaign_id]
        out.print(campaign_table(view))
        if view.reason:
            out.print(f"reason: {view.reason}", markup=False)
    else:
        out.print(campaigns_table(board))


# --- operator controls ------------------------------------------------------------------------

WaitOption = Annotated[
    float, typer.Option("--wait", min=0, help="Seconds to wait for the manager's answer; 0: none.")
]
ByOption = Annotated[str, typer.Option("--requested-by", help="Who asks, for the record.")]


def _control(campaign_id: str, build: Any, wait_s: float, *, idempotent_state: str = "") -> None:
    """Check the campaign exists, send the request, report the manager's answer."""
    from escalator.controls import send_and_wait

    settings = kafka_settings()
    try:
        board = asyncio.run(read_board(settings))
    except Exception as exc:
        fail(f"could not read the campaigns topic: {exc}", code=1)
    view = board.campaigns.get(campaign_id)
    if view is None or (view.started_at is None and view.state != "rejected"):
        fail(f"no campaign {campaign_id!r} has started on the bus")
    if idempotent_state and view.state == idempotent_state:
        out.print(f"{campaign_id} is already {view.state}", markup=False, highlight=False)
        return
    try:
        request = build()
    except ValidationError as exc:
        fail(_first_error(exc))
    try:
        outcome = asyncio.run(send_and_wait(settings, request, wait_s=wait_s))
    except Exception as exc:
        fail(f"could not publish to Kafka: {exc}", code=1)
    out.print(f"{campaign_id}: {outcome.message}", markup=False, highlight=False)
    if not outcome.applied and wait_s > 0:
        raise typer.Exit(1)


@app.command()
def pause(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the record.")] = "",
    requested_by: ByOption = "operator",
    wait: WaitOption = 30.0,
) -> None:
    """Start no new node; nodes in their cycle finish. Exit 1 if the manager rejects it."""
    from schemas.events import CampaignPauseRequested

    _control(
        campaign_id,
        lambda: CampaignPauseRequested(
            campaign_id=campaign_id,
            producer="operator-cli",
            reason=reason,
            requested_by=requested_by,
        ),
        wait,
        idempotent_state="paused",
    )


@app.command()
def resume(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    requested_by: ByOption = "operator",
    wait: WaitOption = 30.0,
) -> None:
    """Let a paused campaign start nodes again."""
    from schemas.events import CampaignResumeRequested

    _control(
        campaign_id,
        lambda: CampaignResumeRequested(
            campaign_id=campaign_id, producer="operator-cli", requested_by=requested_by
        ),
        wait,
        idempotent_state="running",
    )


@app.command()
def abort(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    upgrading: Annotated[
        OnAbortUpgrading,
        typer.Option("--upgrading", help="Nodes upgrading now: finish, or roll back."),
    ] = OnAbortUpgrading.FINISH,
    reason: Annotated[str, typer.Option("--reason", help="Why, for the record.")] = "",
    requested_by: ByOption = "operator",
    wait: WaitOption = 30.0,
) -> None:
    """Stop for good: nodes in maintenance not yet upgrading return to service untouched."""
    from schemas.events import CampaignAbortRequested

    _control(
        campaign_id,
        lambda: CampaignAbortRequested(
            campaign_id=campaign_id,
            producer="operator-cli",
            upgrading=upgrading,
            reason=reason,
            requested_by=requested_by,
        ),
        wait,
    )


@app.command()
def retry(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    node: Annotated[str, typer.Option("--node", help="The quarantined or deferred node.")],
    requested_by: ByOption = "operator",
    wait: WaitOption = 30.0,
) -> None:
    """Re-admit a quarantined (failed) or deferred node into its campaign."""
    from schemas.events import NodeRetryRequested

    _control(
        campaign_id,
        lambda: NodeRetryRequested(
            campaign_id=campaign_id,
            producer="operator-cli",
            node_id=node,
            requested_by=requested_by,
        ),
        wait,
    )


# --- dead letters -----------------------------------------------------------------------------

dlq_app = typer.Typer(help="Dead letters: inspect and re-drive.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def _dlq_filter(
    topic: str | None, reason: str | None, event_type: str | None, since: str | None
) -> Any:
    from datetime import datetime

    from escalator.dlq import Filter

    moment = None
    if since is not None:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            fail(f"--since {since!r} is not an ISO 8601 time, e.g. 2026-11-26T04:00:00+00:00")
        if moment.tzinfo is None:
            fail(f"--since {since!r} needs a timezone, e.g. 2026-11-26T04:00:00Z")
    return Filter(source_topic=topic, reason=reason, event_type=event_type, since=moment)


TopicFilter = Annotated[
    str | None, typer.Option("--topic", help="Source topic (or part of its name).")
]
ReasonFilter = Annotated[str | None, typer.Option("--reason", help="e.g. invalid_fields.")]
TypeFilter = Annotated[str | None, typer.Option("--event-type", help="e.g. VnfBusinessMoved.")]
SinceFilter = Annotated[str | None, typer.Option("--since", help="ISO 8601 time.")]


@dlq_app.command("list")
def dlq_list(
    topic: TopicFilter = None,
    reason: ReasonFilter = None,
    event_type: TypeFilter = None,
    since: SinceFilter = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Dead letters with their reason; ids are <partition>:<offset> on the dead-letter topic."""
    from escalator.dlq import entries_table, read_entries

    keep = _dlq_filter(topic, reason, event_type, since)
    settings = kafka_settings()
    try:
        entries = asyncio.run(read_entries(settings, keep))
    except Exception as exc:
        fail(f"could not read the dead-letter topic: {exc}", code=1)
    if as_json:
        out.print_json(json.dumps([e.to_json() for e in entries]))
    else:
        out.print(entries_table(entries))


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter ids to replay.")] = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Every dead letter the filters keep.")
    ] = False,
    topic: TopicFilter = None,
    reason: ReasonFilter = None,
    event_type: TypeFilter = None,
    since: SinceFilter = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also records that would be rejected again.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show, send nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Send dead letters back to their source topic. Exit 1 if any was skipped."""
    from escalator.dlq import read_entries, replay, replay_table, select

    if not ids and not replay_all:
        fail("name dead-letter ids (see `escalator dlq list`), or pass --all with filters")
    if ids and replay_all:
        fail("pass either ids or --all, not both")
    keep = _dlq_filter(topic, reason, event_type, since)
    settings = kafka_settings()
    try:
        entries = asyncio.run(read_entries(settings, keep))
    except Exception as exc:
        fail(f"could not read the dead-letter topic: {exc}", code=1)
    try:
        chosen = select(entries, ids) if ids else entries
    except ValueError as exc:
        fail(str(exc))
    try:
        results = asyncio.run(replay(settings, chosen, force=force, dry_run=dry_run))
    except Exception as exc:
        fail(f"could not replay: {exc}", code=1)
    if as_json:
        out.print_json(json.dumps([r.to_json() for r in results]))
    else:
        out.print(replay_table(results))
    if not dry_run and any(not r.sent for r in results):
        raise typer.Exit(1)


async def watch_campaign(
    settings: KafkaSettings, campaign_id: str, console: Console, *, timeout_s: float | None = None
) -> CampaignView:
    """Follow the campaigns topic with live progress bars until the campaign ends."""
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from escalator.bus.readback import scan
    from schemas.codec import decode
    from schemas.envelope import Event
    from schemas.topics import CAMPAIGNS

    board = CampaignBoard()
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}", markup=False),
        TimeElapsedColumn(),
        console=console,
    )
    overall = progress.add_task(campaign_id, total=None, detail="waiting for the Upgrade Manager")
    node_tasks: dict[str, Any] = {}

    def render(view: CampaignView) -> None:
        counts = view.to_json()["nodes"]
        done = counts["upgraded"] + counts["skipped"] + counts["failed"]
        progress.update(
            overall,
            total=counts["total"] or None,
            completed=done,
            detail=f"{view.state}: {counts['upgraded']} upgraded, {counts['skipped']} skipped, "
            f"{counts['failed']} failed",
        )
        for node in view.nodes.values():
            task = node_tasks.get(node.node_id)
            active = not node.step.finished and node.step is not NodeStep.PENDING
            if task is None and active:
                task = node_tasks[node.node_id] = progress.add_task(
                    f"  {node.node_id}", total=len(STEP_ORDER) - 1, detail=""
                )
            if task is not None:
                steps_done = (
                    len(STEP_ORDER) - 1 if node.step.finished else STEP_ORDER.index(node.step)
                )
                progress.update(
                    task,
                    completed=steps_done,
                    detail=f"{node.step.value}: {node.detail}"[:70],
                    visible=not node.step.finished,
                )

    try:
        async with asyncio.timeout(timeout_s):
            with Live(progress, console=console, refresh_per_second=8, transient=False):
                async for record in scan(settings, CAMPAIGNS, follow=True):
                    if record.key != campaign_id.encode():
                        continue
                    event = decode(record.value)
                    if not isinstance(event, Event):
                        continue
                    board.apply(event)
                    render(board.view(campaign_id))
                    if board.view(campaign_id).finished:
                        break
    except TimeoutError:
        state = board.view(campaign_id).state
        raise TimeoutError(f"campaign {campaign_id} still {state} after {timeout_s}s") from None
    console.print()
    return board.view(campaign_id)


@app.command()
def watch(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0.1, help="Give up after S seconds.")
    ] = None,
) -> None:
    """Live progress of one campaign, read from the bus, until it ends (exit 1 unless completed)."""
    settings = kafka_settings()
    try:
        view = asyncio.run(watch_campaign(settings, campaign_id, out, timeout_s=timeout))
    except TimeoutError as exc:
        fail(str(exc), code=1)
    except Exception as exc:
        fail(f"could not follow the campaigns topic: {exc}", code=1)
    out.print(campaign_table(view))
    raise typer.Exit(0 if view.state == "completed" else 1)


# --- registry ---------------------------------------------------------------------------------


@registry_app.command("load")
def registry_load(
    file: Annotated[Path, typer.Argument(help="JSON list of VNF profiles.")],
) -> None:
    """Publish VNF profiles to the registry topic (replacing profiles with the same id)."""
    try:
        data = json.loads(file.read_text())
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        fail(f"{file} is not valid JSON: {exc}")
    if not isinstance(data, list):
        fail(f"{file} must hold a JSON list of VNF profiles")
    try:
        profiles = [VnfProfile.model_validate(item) for item in data]
    except ValidationError as exc:
        fail(f"{file}: {_first_error(exc)}")

    async def publish() -> int:
        from escalator.bus.connection import ensure_topics, make_producer
        from escalator.bus.publisher import EventPublisher
        from escalator.registry import publish_profiles

        settings = kafka_settings()
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()
        try:
            return await publish_profiles(
                EventPublisher(producer, settings), profiles, producer="operator-cli"
            )
        finally:
            await producer.stop()

    try:
        count = asyncio.run(publish())
    except Exception as exc:
        fail(f"could not publish to Kafka: {exc}", code=1)
    out.print(f"published {count} VNF profiles")


@registry_app.command("list")
def registry_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the VNF registry as it stands."""
    from rich.table import Table

    from escalator.registry import load_registry

    settings = kafka_settings()
    try:
        registry = asyncio.run(load_registry(settings))
    except Exception as exc:
        fail(f"could not read the registry: {exc}", code=1)
    profiles = sorted(registry.profiles.values(), key=lambda p: p.vnf_id)
    if as_json:
        out.print_json(json.dumps([p.model_dump(mode="json") for p in profiles]))
        return
    table = Table("VNF", "VNFM", "redundancy", "members", "min in service", "max unavailable")
    for p in profiles:
        table.add_row(
            p.vnf_id,
            p.vnfm_id,
            p.redundancy.value,
            str(len(p.members)),
            str(p.min_in_service),
            str(p.max_unavailable),
        )
    out.print(table)


# --- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    nodes: Annotated[int, typer.Option("--nodes", min=2, max=500, help="Compute nodes.")] = 12,
    domains: Annotated[int, typer.Option("--domains", min=1, max=50, help="Failure domains.")] = 3,
    speed: Annotated[
        float,
        typer.Option("--speed", min=0.1, max=1000, help="Simulated time runs this much faster."),
    ] = 4.0,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the simulated cloud.")] = 0,
    max_parallel: Annotated[int, typer.Option("--max-parallel", min=1, max=500)] = 1,
    vnfm_timeout: Annotated[float, typer.Option("--vnfm-timeout", min=0.1)] = 20.0,
    report: Annotated[
        Path | None, typer.Option("--report", help="Where to write the JSON report.")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Give up after S seconds.")
    ] = 900,
) -> None:
    """Upgrade a simulated cloud end to end: broker, world and every service as processes."""
    from escalator.demo import DemoOptions, demo_succeeded, run, summary_table

    options = DemoOptions(
        nodes=nodes,
        domains=domains,
        seed=seed,
        speed=speed,
        max_parallel=max_parallel,
        vnfm_timeout_s=vnfm_timeout,
        timeout_s=timeout,
    )
    options.report = report or options.run_dir / "report.json"
    try:
        result = run(options, out)
    except Exception as exc:
        fail(f"demo failed: {exc}", code=1)
    out.print(summary_table(result))
    out.print(f"report: {options.report}", markup=False)
    raise typer.Exit(0 if demo_succeeded(result) else 1)


# --- processes --------------------------------------------------------------------------------


@app.command()
def broker(
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode", help="auto|external|testcontainers|kafka|tansu (or ESCALATOR_BROKER)."
        ),
    ] = None,
) -> None:
    """Start a Kafka broker through the launcher and keep it running until Ctrl-C."""
    from escalator.broker import BrokerModeError, serve_forever

    try:
        code = serve_forever(mode)
    except BrokerModeError as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def world(ctx: typer.Context) -> None:
    """Run the simulated cloud (options: --port --nodes --domains --seed --speed ...)."""
    from escalator.world import main as world_main

    raise typer.Exit(world_main(list(ctx.args)))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
) -> None:
    """Run one Escalator service process (extra options go to the service)."""
    module_name = SERVICES.get(service)
    if module_name is None:
        fail(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    module = importlib.import_module(
        module_name if module_name.count(".") > 1 else f"{module_name}.__main__"
    )
    raise typer.Exit(module.main(list(ctx.args)))


@app.command("vnfm-check")
def vnfm_check(
    fixture: Annotated[
        Path, typer.Argument(help="TOML or JSON: the VNFM id and, per scenario, the VNF and VM.")
    ],
    scenario: Annotated[
        list[str] | None,
        typer.Option("--scenario", help="Run only these (repeatable); default: all."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a VNFM against the contract: it plays the VIM and judges the VNFM's replies."""
    from escalator.vnfm_check import SCENARIOS, FixtureError, load_fixture, run_check

    try:
        loaded = load_fixture(fixture)
    except FixtureError as exc:
        fail(str(exc))
    chosen = [s for item in scenario or [] for s in item.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        fail(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    report = asyncio.run(run_check(kafka_settings(), loaded, chosen))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        out.print(report.table())
        out.print("PASSED" if report.passed else "[bold red]FAILED[/]")
    raise typer.Exit(0 if report.passed else 1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # aiokafka warns on every retried send (e.g. a topic's leader not elected yet); the retry
    # is the fix, so operators see only its errors.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # standalone_mode=False lets us print usage errors as one line instead of a boxed panel.
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: bad option, missing argument, ...
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"escalator: error: {message}{hint}", soft_wrap=True, markup=False)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
