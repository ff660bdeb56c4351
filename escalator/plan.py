"""`escalator plan`: a dry run of the batch planner, before anything starts.

It takes the inventory and the VNF registry as they stand (read from the broker's compacted
topics to their high watermark, or converted from a world scenario file for an offline plan),
the campaign's constraints and per-step durations, and prints what the Upgrade Manager would do:
the batches with their predicted start times, the predicted makespan against a lower bound, the
constraint that holds back each node that cannot go at the first decision, and the nodes that
can never be upgraded, with the reason.

Everything here is pure except the reading of inputs (`inputs_from_broker`, the scenario file);
the command in `escalator/cli.py` only declares the options and calls `plan_from_options` and
`output`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from services.upgrade_manager.domain.planner import (
    Cloud,
    Host,
    Limits,
    VmLoad,
    VnfRule,
)

if TYPE_CHECKING:
    from rich.console import Console

    from escalator.settings import KafkaSettings
    from escalator.world.model import WorldState
    from schemas.events import CampaignPolicy
    from services.upgrade_manager.domain.forecast import Forecast, StepDurations

# Exit codes of `escalator plan` (2, bad input, is the CLI's usual).
EXIT_PLANNED = 0
EXIT_NOT_ALL_NODES = 3

DURATION_FIELDS = ("claim_s", "notify_s", "migrate_s", "upgrade_s", "release_s")


class PlanError(Exception):
    """Bad input (code 2) or an input that could not be read (code 1): one line for the CLI."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"{where}: {first['msg']}"


# --- options ----------------------------------------------------------------------------------


def build_policy(
    *,
    max_parallel: int = 1,
    max_per_failure_domain: int | None = None,
    canary_nodes: int = 0,
    canary_bake_s: float = 0.0,
    window_start: str | datetime | None = None,
    window_end: str | datetime | None = None,
    failure_budget: int | None = None,
    migrate_moved_vms: bool = False,
    keep_order: bool = False,
) -> CampaignPolicy:
    """The campaign policy `upgrade start` would send, validated the same way (PlanError)."""
    from schemas.events import CampaignPolicy

    try:
        return CampaignPolicy.model_validate(
            {
                "max_parallel": max_parallel,
                "max_per_failure_domain": max_per_failure_domain,
                "canary_nodes": canary_nodes,
                "canary_bake_s": canary_bake_s,
                "window_start": window_start,
                "window_end": window_end,
                "failure_budget": failure_budget,
                "migrate_moved_vms": migrate_moved_vms,
                "keep_order": keep_order,
            }
        )
    except ValidationError as exc:
        raise PlanError(_first_error(exc)) from None


def build_durations(**given: float | None) -> StepDurations:
    """Per-step durations: the forecast's defaults, overridden by the options given (>= 0)."""
    from services.upgrade_manager.domain.forecast import StepDurations

    values: dict[str, float] = {}
    for name, value in given.items():
        if name not in DURATION_FIELDS:
            raise PlanError(f"unknown step duration {name!r}")
        if value is None:
            continue
        if not value >= 0 or value == float("inf"):
            option = "--" + name.replace("_", "-")
            raise PlanError(f"{option} must be a finite number of seconds >= 0, got {value}")
        values[name] = float(value)
    return StepDurations(**values)


def parse_start(value: str | None) -> datetime:
    """When the plan starts: an ISO 8601 time with a timezone, or now."""
    if value is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PlanError(f"--start-at {value!r} is not an ISO 8601 time") from None
    if at.tzinfo is None:
        raise PlanError(f"--start-at {value!r} needs a timezone (e.g. Z or +01:00)")
    return at


def split_nodes(items: Iterable[str]) -> list[str]:
    """`--nodes` values: repeated and/or comma-separated, blanks dropped, order kept."""
    seen: dict[str, None] = {}
    for item in items:
        for part in item.split(","):
            if part.strip():
                seen[part.strip()] = None
    return list(seen)


# --- inputs -----------------------------------------------------------------------------------


@dataclass
class PlanInputs:
    """The inventory and the VNF rules the plan is made from, and where they came from."""

    cloud: Cloud
    rules: dict[str, VnfRule]
    source: dict[str, Any] = field(default_factory=dict)


def cloud_from_world(state: WorldState) -> tuple[Cloud, dict[str, VnfRule]]:
    """The planner's view of a world state, as the Cloud Manager and the registry report it.

    Hosts carry their VMs plus migrations under way toward them (room already reserved), a node
    held for maintenance or with its compute service disabled is in maintenance, and a VNF whose
    members share one server group keeps anti-affinity (the world enforces it on migration).
    Active-standby VNFs tolerate one impacted member at once, as `VnfRule.from_profile` says.
    """
    loads: dict[str, list[VmLoad]] = defaultdict(list)
    groups: dict[str, set[str | None]] = defaultdict(set)
    for vm in state.vms.values():
        load = VmLoad(vm.id, vm.vnf_id, vm.vcpus, vm.ram_mb)
        loads[vm.node_id].append(load)
        if vm.migration_target is not None:
            loads[vm.migration_target].append(load)
        if vm.vnf_id is not None:
            groups[vm.vnf_id].add(vm.server_group)
    cloud = Cloud(
        Host.of(
            node.id,
            node.failure_domain,
            node.vcpus,
            node.ram_mb,
            loads.get(node.id, ()),
            node.maintenance_holder is not None or node.service_status != "enabled",
        )
        for node in state.nodes.values()
    )
    rules: dict[str, VnfRule] = {}
    for vnf in state.vnfs.values():
        limit = 1 if vnf.redundancy == "active_standby" else vnf.max_unavailable
        group = groups.get(vnf.id, set())
        rules[vnf.id] = VnfRule(
            vnf.id,
            len(vnf.members),
            limit,
            vnf.min_in_service,
            vnf.min_recovery_s,
            anti_affinity=len(group) == 1 and None not in group,
        )
    return cloud, rules


def load_world_scenario(path: Path) -> tuple[WorldState, bytes]:
    """A world scenario file: a whole `WorldState` (nodes, VMs, VNFs, timings; what
    `escalator.world.scenario.save_state` writes), or the generator's parameters (`nodes`,
    `domains`/`failure_domains`, `seed`, `spare_fraction`, ...) it is built from.
    Returns the state and the file's bytes (for its digest)."""
    from escalator.world.model import Timings, WorldState

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"cannot read scenario {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"scenario {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PlanError(f"scenario {path} must be a JSON object")
    if isinstance(data.get("nodes"), dict):
        try:
            return WorldState.model_validate(data), raw
        except ValidationError as exc:
            raise PlanError(f"scenario {path}: {_first_error(exc)}") from None
    return _generate_from_parameters(path, data, Timings), raw


def _generate_from_parameters(path: Path, data: dict[str, Any], timings_model: Any) -> WorldState:
    import inspect

    from escalator.world.scenario import generate

    params = dict(data)
    if "domains" in params and "failure_domains" not in params:
        params["failure_domains"] = params.pop("domains")
    if isinstance(params.get("timings"), dict):
        try:
            params["timings"] = timings_model.model_validate(params["timings"])
        except ValidationError as exc:
            raise PlanError(f"scenario {path}: timings.{_first_error(exc)}") from None
    accepted = set(inspect.signature(generate).parameters)
    unknown = sorted(set(params) - accepted - {"name", "description", "speed"})
    if unknown:
        raise PlanError(f"scenario {path}: unknown field(s) {', '.join(unknown)}")
    if not isinstance(params.get("nodes"), int):
        raise PlanError(f"scenario {path}: no nodes (a WorldState or generator parameters)")
    try:
        state: WorldState = generate(**{k: v for k, v in params.items() if k in accepted})
    except (ValueError, TypeError) as exc:
        raise PlanError(f"scenario {path}: {exc}") from None
    return state


def inputs_from_scenario(path: Path) -> PlanInputs:
    state, raw = load_world_scenario(path)
    cloud, rules = cloud_from_world(state)
    return PlanInputs(
        cloud,
        rules,
        {
            "kind": "scenario",
            "path": str(path),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "timings": state.timings.model_dump(mode="json"),
        },
    )


async def inputs_from_broker(settings: KafkaSettings, *, timeout_s: float = 30.0) -> PlanInputs:
    """The inventory and the registry topics, each read to its high watermark."""
    from escalator.bus.readback import read_to_high_watermark
    from schemas.events import NodeInventoryReported, VnfRegistered
    from schemas.topics import CLOUD_INVENTORY, VNF_REGISTRY

    inventory = await read_to_high_watermark(settings, CLOUD_INVENTORY, timeout_s=timeout_s)
    registry = await read_to_high_watermark(settings, VNF_REGISTRY, timeout_s=timeout_s)
    cloud = Cloud(
        Host.from_report(event)
        for event in inventory.values()
        if isinstance(event, NodeInventoryReported)
    )
    rules = {
        event.vnf.vnf_id: VnfRule.from_profile(event.vnf)
        for event in registry.values()
        if isinstance(event, VnfRegistered)
    }
    return PlanInputs(
        cloud,
        rules,
        {
            "kind": "broker",
            "bootstrap_servers": settings.bootstrap_servers,
            "topic_prefix": settings.topic_prefix,
        },
    )


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    nodes: tuple[str, ...]
    limits: Limits
    durations: StepDurations
    migrate_moved_vms: bool
    start: datetime
    forecast: Forecast
    lower_bound_s: float

    @property
    def complete(self) -> bool:
        """Every node of the plan gets a batch."""
        return not self.forecast.never and not self.forecast.stalled

    @property
    def exit_code(self) -> int:
        return EXIT_PLANNED if self.complete else EXIT_NOT_ALL_NODES


def make_plan(
    inputs: PlanInputs,
    nodes: Sequence[str],
    limits: Limits,
    durations: StepDurations,
    *,
    start: datetime,
    migrate_moved_vms: bool = False,
    keep_order: bool = False,
) -> Plan:
    """Forecast the campaign over `nodes` (all the inventory's nodes, sorted, when empty);
    with `keep_order` the nodes are considered in that order, as the manager would."""
    from services.upgrade_manager.domain.forecast import forecast, lower_bound

    chosen = tuple(nodes) if nodes else tuple(sorted(inputs.cloud.hosts))
    predicted = forecast(
        inputs.cloud,
        inputs.rules,
        limits,
        chosen,
        durations,
        start=start,
        migrate_moved_vms=migrate_moved_vms,
        order=chosen if keep_order else None,
    )
    bound = lower_bound(
        inputs.cloud, inputs.rules, limits, chosen, durations, migrate_moved_vms=migrate_moved_vms
    )
    return Plan(inputs, chosen, limits, durations, migrate_moved_vms, start, predicted, bound)


def plan_from_options(
    *,
    scenario: Path | None,
    settings: Callable[[], KafkaSettings] | None,
    timeout_s: float,
    nodes: Sequence[str],
    start_at: str | None,
    policy: Mapping[str, Any],
    durations: Mapping[str, float | None],
) -> Plan:
    """What `escalator plan` does with its options (PlanError: code 2 bad input, 1 unreadable).

    The inputs come from `scenario`, else from the bus with `settings()`."""
    built = build_policy(**policy)
    steps = build_durations(**durations)
    start = parse_start(start_at)
    chosen = split_nodes(nodes)
    if scenario is not None:
        inputs = inputs_from_scenario(scenario)
    elif settings is not None:
        kafka = settings()
        try:
            inputs = asyncio.run(inputs_from_broker(kafka, timeout_s=timeout_s))
        except Exception as exc:
            raise PlanError(
                f"could not read the inventory and registry topics: {exc}", code=1
            ) from None
        if not inputs.cloud.hosts and not chosen:
            raise PlanError("the inventory topic holds no node: is the Cloud Manager running?", 1)
    else:
        raise PlanError("no inputs: give --scenario or Kafka settings")
    return make_plan(
        inputs,
        chosen,
        Limits.from_policy(built),
        steps,
        start=start,
        migrate_moved_vms=built.migrate_moved_vms,
        keep_order=built.keep_order,
    )


def output(plan: Plan, console: Console, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        render(plan, console)


def spare_capacity_pct(cloud: Cloud) -> dict[str, float | None]:
    """Free room over capacity, in vCPUs and RAM, on the nodes that are in service."""
    hosts = [h for h in cloud.hosts.values() if not h.in_maintenance]
    vcpus = sum(h.vcpus for h in hosts)
    ram = sum(h.ram_mb for h in hosts)
    return {
        "vcpus": round(100 * sum(h.free_vcpus for h in hosts) / vcpus, 1) if vcpus else None,
        "ram": round(100 * sum(h.free_ram_mb for h in hosts) / ram, 1) if ram else None,
    }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def _seconds(value: float) -> float:
    return round(value, 3)


def constraints_json(limits: Limits, migrate_moved_vms: bool) -> dict[str, Any]:
    return {
        "max_parallel": limits.max_parallel,
        "max_per_failure_domain": limits.max_per_failure_domain,
        "canary_nodes": limits.canary_nodes,
        "canary_bake_s": limits.canary_bake_s,
        "window_start": _iso(limits.window_start),
        "window_end": _iso(limits.window_end),
        "failure_budget": limits.failure_budget,
        "migrate_moved_vms": migrate_moved_vms,
    }


def durations_json(durations: StepDurations) -> dict[str, float]:
    return {name: float(getattr(durations, name)) for name in DURATION_FIELDS}


def efficiency(plan: Plan) -> float | None:
    """Lower bound over predicted makespan: 1.0 means no plan can be shorter."""
    makespan = plan.forecast.makespan_s
    if makespan <= 0:
        return None if plan.lower_bound_s > 0 else 1.0
    return round(plan.lower_bound_s / makespan, 4)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as `--json` prints it; these field names are stable."""
    f = plan.forecast
    cloud = plan.inputs.cloud
    return {
        "source": plan.inputs.source,
        "nodes": len(plan.nodes),
        "inventory_nodes": len(cloud.hosts),
        "vms": sum(len(h.vms) for h in cloud.hosts.values()),
        "vnfs": len(plan.inputs.rules),
        "failure_domains": len({h.failure_domain for h in cloud.hosts.values()}),
        "spare_capacity_pct": spare_capacity_pct(cloud),
        "constraints": constraints_json(plan.limits, plan.migrate_moved_vms),
        "durations": durations_json(plan.durations),
        "start": _iso(plan.start),
        "batches": [
            {"start_s": _seconds(batch.start_s), "nodes": list(batch.nodes)} for batch in f.batches
        ],
        "predicted_makespan_s": _seconds(f.makespan_s),
        "predicted_end": _iso(plan.start + timedelta(seconds=f.makespan_s)),
        "lower_bound_s": _seconds(plan.lower_bound_s),
        "efficiency": efficiency(plan),
        "max_in_maintenance": f.max_in_maintenance,
        "blocked": [
            {
                "node_id": node_id,
                "reason": blocked.reason.value,
                "detail": blocked.detail,
                "until": _iso(blocked.until),
            }
            for node_id, blocked in f.blocked_now.items()
            if node_id not in f.never
        ],
        "never_upgradable": [
            {"node_id": node_id, "reason": impossible.detail}
            for node_id, impossible in f.never.items()
        ],
        "stalled": list(f.stalled),
        "finish_s": {node_id: _seconds(at) for node_id, at in f.finish_s.items()},
        "complete": plan.complete,
    }


# --- rendering --------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:04.1f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes):02d} min {rest:04.1f} s"


def _constraints_line(data: Mapping[str, Any]) -> str:
    parts = [f"max parallel {data['max_parallel']}"]
    if data["max_per_failure_domain"] is not None:
        parts.append(f"max {data['max_per_failure_domain']} per failure domain")
    if data["canary_nodes"]:
        parts.append(f"canary {data['canary_nodes']} node(s), bake {data['canary_bake_s']:g} s")
    if data["window_start"] or data["window_end"]:
        parts.append(f"window {data['window_start'] or '…'} to {data['window_end'] or '…'}")
    if data["failure_budget"] is not None:
        parts.append(f"failure budget {data['failure_budget']}")
    if data["migrate_moved_vms"]:
        parts.append("moved VMs are migrated too")
    return ", ".join(parts)


def render(plan: Plan, console: Console) -> None:
    """The plan for a person: header, batches, prediction, blockers, impossible nodes."""
    from rich.table import Table

    data = plan_json(plan)
    spare = data["spare_capacity_pct"]
    source = data["source"]
    where = (
        f"scenario {source['path']}"
        if source.get("kind") == "scenario"
        else f"broker {source.get('bootstrap_servers')} (prefix {source.get('topic_prefix')!r})"
    )

    def line(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    line(f"plan from {where}, starting {data['start']}")
    line(
        f"nodes: {data['nodes']} to upgrade of {data['inventory_nodes']} in the inventory "
        f"({data['failure_domains']} failure domain(s)), {data['vms']} VMs, {data['vnfs']} VNFs"
    )
    spare_text = " / ".join(
        f"{spare[k]}% {label}"
        for k, label in (("vcpus", "vCPUs"), ("ram", "RAM"))
        if spare[k] is not None
    )
    line(f"spare capacity: {spare_text or 'none (no node in service)'}")
    line(f"constraints: {_constraints_line(data['constraints'])}")
    durations = ", ".join(f"{k} {v:g}" for k, v in data["durations"].items())
    line(f"step durations (s): {durations}")

    batches = Table(title="batches", title_justify="left")
    batches.add_column("#", justify="right")
    batches.add_column("start", justify="right")
    batches.add_column("count", justify="right")
    batches.add_column("nodes")
    for index, batch in enumerate(data["batches"], 1):
        batches.add_row(
            str(index),
            f"+{_duration(batch['start_s'])}",
            str(len(batch["nodes"])),
            ", ".join(batch["nodes"]),
        )
    console.print(batches)

    makespan = data["predicted_makespan_s"]
    line(
        f"predicted makespan: {_duration(makespan)} ({len(data['batches'])} batch(es), at most "
        f"{data['max_in_maintenance']} node(s) in maintenance at once); "
        f"ends {data['predicted_end']}"
    )
    eff = data["efficiency"]
    line(
        f"lower bound: {_duration(data['lower_bound_s'])}; efficiency "
        f"{'n/a' if eff is None else f'{100 * eff:.0f}%'} (lower bound / predicted makespan)"
    )

    if data["blocked"]:
        blocked = Table(title="cannot go yet (at the first decision)", title_justify="left")
        for column in ("node", "blocker", "detail", "until"):
            blocked.add_column(column)
        for item in data["blocked"]:
            blocked.add_row(item["node_id"], item["reason"], item["detail"], item["until"] or "")
        console.print(blocked)
    if data["never_upgradable"]:
        never = Table(title="never upgradable", title_justify="left", style="red")
        never.add_column("node")
        never.add_column("reason")
        for item in data["never_upgradable"]:
            never.add_row(item["node_id"], item["reason"])
        console.print(never)
    if data["stalled"]:
        line(
            f"stalled: {len(data['stalled'])} node(s) get no batch under these constraints: "
            + ", ".join(data["stalled"])
        )
    if plan.complete:
        line(f"plan: all {data['nodes']} node(s) in {len(data['batches'])} batch(es)")
    else:
        left = len(data["never_upgradable"]) + len(data["stalled"])
        line(f"plan: {left} of {data['nodes']} node(s) cannot be upgraded (exit code 3)")
