"""Bench section `scale`: Escalator on a 10,000-node, ~200,000-VM cloud.

Two measurements on the same generated cloud (`escalator.world.scenario.generate(nodes=10_000,
failure_domains=3, vms_per_node=20, spare_fraction=0.15, seed=0)`):

1. **Planner time per decision** (in this process, no broker). The world is converted to the
   planner's view (`escalator.plan.cloud_from_world`: the same `Cloud` / `VnfRule` the Upgrade
   Manager builds from the inventory and the registry), and the campaign over every node is
   replayed by the forecast (`services.upgrade_manager.domain.forecast.forecast`) with
   `max_parallel` = PLANNER_MAX_PARALLEL and the world's nominal step durations
   (`bench.makespan.durations_for`). Every `plan_step` call the forecast makes is timed, with
   the Upgrade Manager's own `scan_budget` (`PLANNER_SCAN_BUDGET`), i.e. as `select_next` calls
   it: steady-state decisions with up to max_parallel nodes in their cycle. The forecast's first
   call (explain=True, every candidate examined: what `escalator plan` does, not the manager) is
   reported apart. Timed twice: with Python's GC as it is (`planner_decision_ms_*`, the headline)
   and after `gc.freeze()` of the loaded cloud (`planner_gc_frozen.*`), to show what the
   collector's full passes over ~1M long-lived objects cost the tail.

2. **The whole campaign, live**, over the bench's broker: the same cloud saved as a scenario with
   zero-duration steps (migration, reboot and resync 0 s) and served by the world process; the
   Cloud Manager, the Upgrade Manager, the VNFM adapter, one reference VNFM per VNFM id
   (`--work-s 0`) and the node agents in POOLS pool processes (`--node-ids-file`). The registry
   is published from the world; then, one after the other so that their start-ups do not compete
   for the CPU, the agent pools start (every heartbeat awaited), the Cloud Manager (its inventory
   of every node awaited), the VNFM side and the Upgrade Manager (its readiness awaited; if it
   exits while starting, the reason is recorded in `upgrade_manager_startup_failures` and it is
   started once more, as a supervisor would). Then one campaign over every node with
   `max_parallel` = LIVE_MAX_PARALLEL is requested (the code path of `escalator upgrade start`).
   `campaign_wall_s` runs from the request's publication to the `CampaignCompleted` seen on the
   campaigns topic. The resident memory of every process is sampled from /proc every 0.5 s from
   the world's start to the end, and the kernel's own high-water mark (VmHWM) is read before
   the processes stop; `rss_mb` gives, per service, the larger of the two (for the reference
   VNFMs and the agent pools: the largest process and the peak of their simultaneous sum).

   If the campaign has not ended within the budget (CAMPAIGN_BUDGET_S, default 30 min;
   `BENCH_SCALE_BUDGET_S`), the run stops there and reports what it measured: nodes done, the
   rate (overall and over the last RATE_WINDOW_S), and `campaign_wall_s_projected` =
   elapsed + nodes left / recent rate, labelled as projected; `campaign_wall_s` is then null.

   Where the time goes, during the campaign: CPU seconds per service (`cpu_s_during_campaign`,
   from /proc/<pid>/stat) and seconds each spent runnable but waiting for a CPU
   (`runqueue_wait_s_during_campaign`, /proc/<pid>/schedstat), the machine's busy share (other
   work on the machine included), the Upgrade Manager's group rebalances and state re-reads
   (`upgrade_manager_log`, from its log), records written per topic, and
   `campaign_wall_s_floor_um_one_core`: the Upgrade Manager's CPU seconds per node finished x
   every node, the wall time a single-threaded manager with a core of its own cannot beat.

`--quick`: QUICK_NODES nodes, 2 agent pools, max_parallel 50, to exercise the code paths.
`BENCH_SCALE_NODES`, `BENCH_SCALE_MAX_PARALLEL`, `BENCH_SCALE_POOLS`, `BENCH_SCALE_BUDGET_S`
override the sizes; `BENCH_SCALE_UM_SESSION_TIMEOUT_MS` gives the Upgrade Manager alone another
group session timeout (a diagnostic: the default is the launcher's, recorded in the result).
Targets (shown, never asserted): at 10,000 nodes <= 50 ms per planner decision (p50) and an
Upgrade Manager RSS <= 500 MB.

The pure parts (summaries, /proc parsing, RSS aggregation, the projection) are unit-tested in
tests/unit/test_bench_scale.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Row, percentile, rounded, wait_for_inventory, wait_log
from escalator.processes import await_while_alive

if TYPE_CHECKING:
    from bench.common import BenchContext

# --- sizes -------------------------------------------------------------------------------------

FULL_NODES = 10_000
QUICK_NODES = 500
DOMAINS = 3
VMS_PER_NODE = 20
SPARE_FRACTION = 0.15
SEED = 0
PLANNER_MAX_PARALLEL = 100
LIVE_MAX_PARALLEL = 200
QUICK_MAX_PARALLEL = 50
POOLS = 8
QUICK_POOLS = 2
SAMPLE_S = 0.5
CAMPAIGN_BUDGET_S = 1800.0
QUICK_BUDGET_S = 600.0
RATE_WINDOW_S = 300.0
PROGRESS_LOG_S = 30.0
VNFM_TIMEOUT_S = 120.0
VERSION = "2.0.0"
UM_READY = r"ready \(rebalance \d+"
TARGET_DECISION_MS = 50.0
TARGET_UM_RSS_MB = 500.0

MACHINE_BUSY = "machine-busy"
# Children of the deployment by name -> the service they run.
MULTI_PROCESS = {"reference-vnfm": "reference-vnfm-", "node-agent-pools": "node-agents-"}


# --- pure helpers ------------------------------------------------------------------------------


def summary(values: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """count, p50, p90, p99, max and mean of `values` (None for each when there are none)."""
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "count": len(values),
        "p50": rounded(percentile(values, 50), digits),
        "p90": rounded(percentile(values, 90), digits),
        "p99": rounded(percentile(values, 99), digits),
        "max": rounded(max(values), digits),
        "mean": rounded(sum(values) / len(values), digits),
    }


_STATUS_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+)\s+kB", re.MULTILINE)


def parse_proc_status(text: str) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) in MiB from the text of /proc/<pid>/status (None where absent, e.g. a
    zombie)."""
    found = {name: int(kb) / 1024 for name, kb in _STATUS_FIELD.findall(text)}
    return found.get("VmRSS"), found.get("VmHWM")


def parse_proc_stat_cpu(text: str, ticks_per_s: float) -> float:
    """User + system CPU seconds from the text of /proc/<pid>/stat."""
    fields = text.rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def parse_schedstat(text: str) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) from /proc/<pid>/schedstat."""
    run_ns, wait_ns = text.split()[:2]
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def parse_system_cpu(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the text of /proc/stat."""
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_used(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two snapshots (processes in both)."""
    return {
        name: rounded(after[name] - before[name], 1)
        for name in sorted(after)
        if name in before and after[name] >= before[name]
    }


def cpu_by_service(used: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds per service (processes of one service added up), largest first."""
    totals: dict[str, float] = {}
    for name, seconds in used.items():
        if name == MACHINE_BUSY:
            continue
        service = service_of_child(name)
        totals[service] = totals.get(service, 0.0) + seconds
    return {k: rounded(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def um_cpu_floor(um_cpu_s: float | None, nodes_done: int, total: int) -> dict[str, Any]:
    """The Upgrade Manager's CPU seconds per node finished and, scaled to every node, the wall
    time the campaign cannot beat while one single-threaded Upgrade Manager does that work (had
    it a whole core to itself). Nodes still in their cycle when measured make it a slight
    overestimate."""
    if not um_cpu_s or nodes_done <= 0:
        return {}
    per_node = um_cpu_s / nodes_done
    return {
        "upgrade_manager_cpu_s_per_node": rounded(per_node, 3),
        "campaign_wall_s_floor_um_one_core": rounded(per_node * total, 0),
    }


def service_of_child(name: str) -> str:
    """The service a child of the deployment runs: "reference-vnfm-vnfm-1" -> "reference-vnfm",
    "node-agents-3" -> "node-agent-pools", others by their own name."""
    for service, prefix in MULTI_PROCESS.items():
        if name.startswith(prefix):
            return service
    return name


@dataclass
class RssPeaks:
    """Peak resident memory per process and, per service, of the simultaneous sum of its
    processes, from samples (name -> MiB, taken at the same moment)."""

    per_process: dict[str, float] = field(default_factory=dict)
    per_service_sum: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def observe(self, sample: Mapping[str, float]) -> None:
        self.samples += 1
        sums: dict[str, float] = {}
        for name, mb in sample.items():
            self.per_process[name] = max(self.per_process.get(name, 0.0), mb)
            service = service_of_child(name)
            sums[service] = sums.get(service, 0.0) + mb
        for service, total in sums.items():
            self.per_service_sum[service] = max(self.per_service_sum.get(service, 0.0), total)

    def to_json(self, high_water: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Per service: its peak MiB (the larger of the samples and the kernel's high-water
        mark); for services of many processes, {max, sum, sum_of_peaks, processes, each}.
        `sum` is the peak of the sampled simultaneous sum, `sum_of_peaks` its upper bound."""
        peaks = dict(self.per_process)
        for name, mb in (high_water or {}).items():
            peaks[name] = max(peaks.get(name, 0.0), mb)
        by_service: dict[str, dict[str, float]] = {}
        for name, mb in peaks.items():
            by_service.setdefault(service_of_child(name), {})[name] = mb
        out: dict[str, Any] = {}
        for service in sorted(by_service):
            each = by_service[service]
            if service in MULTI_PROCESS:
                out[service] = {
                    "max": rounded(max(each.values()), 1),
                    "sum": rounded(self.per_service_sum.get(service, 0.0), 1),
                    "sum_of_peaks": rounded(sum(each.values()), 1),
                    "processes": len(each),
                    "each": {n: rounded(v, 1) for n, v in sorted(each.items())},
                }
            else:
                out[service] = rounded(max(each.values()), 1)
        return out


def rate_and_projection(
    finish_times: Sequence[float],
    total: int,
    elapsed_s: float,
    window_s: float = RATE_WINDOW_S,
) -> dict[str, Any]:
    """Nodes done per minute (overall and over the last `window_s`) and, if nodes are left, the
    projected wall time at the recent rate. `finish_times`: seconds since the request at which
    each node finished."""
    done = len(finish_times)
    out: dict[str, Any] = {
        "nodes_done": done,
        "nodes_total": total,
        "elapsed_s": rounded(elapsed_s, 1),
        "nodes_per_min": rounded(60.0 * done / elapsed_s, 1) if elapsed_s > 0 else None,
    }
    since = max(0.0, elapsed_s - window_s)
    recent = sum(1 for t in finish_times if t > since)
    span = elapsed_s - since
    recent_rate = recent / span if span > 0 else 0.0
    out["nodes_per_min_recent"] = rounded(60.0 * recent_rate, 1)
    out["recent_window_s"] = rounded(span, 1)
    left = total - done
    if left <= 0:
        out["campaign_wall_s_projected"] = None
    elif recent_rate > 0:
        out["campaign_wall_s_projected"] = rounded(elapsed_s + left / recent_rate, 0)
    else:
        out["campaign_wall_s_projected"] = None  # nothing finished lately: no basis to project
    return out


# --- 1. planner time per decision --------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    ms: float  # wall time
    started: int
    in_cycle: int
    candidates: int
    cpu_ms: float = 0.0  # this process's CPU time: the cost without the machine's contention


@contextlib.contextmanager
def timed_plan_step(records: list[Decision], explained: list[Decision]) -> Iterator[None]:
    """Time every `plan_step` the forecast makes, with the Upgrade Manager's scan budget."""
    import services.upgrade_manager.domain.forecast as forecast_module
    from services.upgrade_manager.domain.campaign import PLANNER_SCAN_BUDGET

    original = forecast_module.plan_step

    def timed(*args: Any, **kwargs: Any) -> Any:
        explain = bool(kwargs.get("explain"))
        if not explain:
            kwargs["scan_budget"] = PLANNER_SCAN_BUDGET
        began, cpu = time.perf_counter(), time.process_time()
        step = original(*args, **kwargs)
        ms = (time.perf_counter() - began) * 1000
        cpu_ms = (time.process_time() - cpu) * 1000
        progress, candidates = args[3], args[4]
        (explained if explain else records).append(
            Decision(ms, len(step.start), len(progress.in_cycle), len(candidates), cpu_ms)
        )
        return step

    forecast_module.plan_step = timed
    try:
        yield
    finally:
        forecast_module.plan_step = original


def time_decisions(
    cloud: Any, rules: Mapping[str, Any], max_parallel: int, durations: Any
) -> dict[str, Any]:
    """Replay the campaign over every node with the forecast and time each planner decision."""
    from services.upgrade_manager.domain.forecast import forecast
    from services.upgrade_manager.domain.planner import Limits

    records: list[Decision] = []
    explained: list[Decision] = []
    collections_before = sum(s["collections"] for s in gc.get_stats())
    began = time.perf_counter()
    with timed_plan_step(records, explained):
        result = forecast(
            cloud,
            rules,
            Limits(max_parallel=max_parallel),
            sorted(cloud.hosts),
            durations,
            start=datetime(2026, 1, 1, tzinfo=UTC),
        )
    wall = time.perf_counter() - began
    ms = [d.ms for d in records]
    starting = [d.ms for d in records if d.started]
    out: dict[str, Any] = {
        "decision_ms": summary(ms),
        "decision_cpu_ms": summary([d.cpu_ms for d in records]),
        "decision_ms_starting_nodes": summary(starting),
        "decisions": len(records),
        "decisions_starting_nodes": len(starting),
        "in_cycle_p50": percentile([d.in_cycle for d in records], 50) if records else None,
        "first_decision_explain_ms": rounded(explained[0].ms) if explained else None,
        "decisions_total_s": rounded(sum(ms) / 1000, 2),
        "forecast_wall_s": rounded(wall, 1),
        "gc_collections": sum(s["collections"] for s in gc.get_stats()) - collections_before,
        "forecast_makespan_s": rounded(result.makespan_s, 1),
        "forecast_batches": len(result.batches),
        "forecast_max_in_maintenance": result.max_in_maintenance,
        "never_upgradable": len(result.never),
        "stalled": len(result.stalled),
    }
    return out


def measure_planner(
    cloud: Any, rules: Mapping[str, Any], timings: Mapping[str, float], max_parallel: int, log: Any
) -> dict[str, Any]:
    """Planner decisions with the GC as it is, then with the loaded cloud frozen."""
    from bench.makespan import durations_for

    durations, mapping = durations_for(timings)
    gc.collect()
    tracked = len(gc.get_objects())
    log(f"scale: planner, {len(cloud.hosts)} nodes, max_parallel {max_parallel}, GC as is")
    as_is = time_decisions(cloud, rules, max_parallel, durations)
    log(
        f"scale: planner p50 {as_is['decision_ms']['p50']} ms, p99 {as_is['decision_ms']['p99']} "
        f"ms, max {as_is['decision_ms']['max']} ms over {as_is['decisions']} decisions"
    )
    gc.collect()
    gc.freeze()
    try:
        log("scale: planner again after gc.freeze()")
        frozen = time_decisions(cloud, rules, max_parallel, durations)
    finally:
        gc.unfreeze()
    log(
        f"scale: planner (frozen) p50 {frozen['decision_ms']['p50']} ms, p99 "
        f"{frozen['decision_ms']['p99']} ms, max {frozen['decision_ms']['max']} ms"
    )
    return {
        "max_parallel": max_parallel,
        "scan_budget": "services.upgrade_manager.domain.campaign.PLANNER_SCAN_BUDGET",
        "durations": {k: getattr(durations, k) for k in mapping if hasattr(durations, k)},
        "gc_tracked_objects": tracked,
        "gc_as_is": as_is,
        "gc_frozen": frozen,
    }


# --- 2. the live campaign ------------------------------------------------------------------------


class ProcessSampler:
    """Samples VmRSS (and keeps the latest CPU time) of every child of a ProcessGroup, plus
    `extra` processes (name -> pid), every `interval_s`, in a thread."""

    def __init__(
        self, group: Any, extra: Mapping[str, int] | None = None, interval_s: float = SAMPLE_S
    ) -> None:
        self.group = group
        self.extra = dict(extra or {})
        self.interval_s = interval_s
        self.peaks = RssPeaks()
        self.high_water: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}
        self.wait_s: dict[str, float] = {}
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-sampler", daemon=True)

    def _pids(self) -> dict[str, int]:
        pids = {
            name: child.process.pid
            for name, child in list(self.group.children.items())
            if child.process.poll() is None
        }
        pids.update(self.extra)
        return pids

    def sample(self) -> None:
        rss: dict[str, float] = {}
        for name, pid in self._pids().items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            now, hwm = parse_proc_status(status)
            with self._lock:
                if now is not None:
                    rss[name] = now
                if hwm is not None:
                    self.high_water[name] = max(self.high_water.get(name, 0.0), hwm)
                with contextlib.suppress(IndexError, ValueError):
                    self.cpu_s[name] = parse_proc_stat_cpu(stat, self._ticks)
                # /proc/<pid>/schedstat is the main thread's: meaningless for the JVM broker.
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if name in self.extra:
                        continue
                    sched = Path(f"/proc/{pid}/schedstat").read_text()
                    self.wait_s[name] = parse_schedstat(sched)[1]
        with self._lock:
            self.peaks.observe(rss)

    def cpu_snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per process, now: CPU seconds (the machine's busy seconds too, as MACHINE_BUSY) and
        seconds spent runnable but waiting for a CPU (the scheduler's run-queue delay)."""
        self.sample()
        with self._lock:
            cpu, wait = dict(self.cpu_s), dict(self.wait_s)
        with contextlib.suppress(OSError, IndexError, ValueError):
            busy, _ = parse_system_cpu(Path("/proc/stat").read_text())
            cpu[MACHINE_BUSY] = busy / self._ticks
        return cpu, wait

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a child vanishing mid-read
                self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, after a last sample (with the high-water marks)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.sample()

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return self.peaks.to_json(self.high_water)


def node_pools(node_ids: Sequence[str], pools: int) -> list[list[str]]:
    """`node_ids` dealt round-robin into `pools` non-empty lists."""
    count = max(1, min(pools, len(node_ids)))
    return [list(node_ids[i::count]) for i in range(count)]


def _start_pools(deployment: Any, pools: int) -> list[int]:
    """The node agents, in `pools` pool processes; the size of each pool."""
    from escalator.processes import python_module

    sizes = []
    for i, members in enumerate(node_pools(deployment.node_ids, pools)):
        listing = deployment.options.run_dir / f"pool-{i}.nodes"
        listing.write_text("\n".join(members) + "\n")
        deployment.group.spawn(
            f"node-agents-{i}",
            python_module(
                "services.node_agent",
                "--node-ids-file",
                str(listing),
                "--world",
                deployment.world_url,
            ),
        )
        sizes.append(len(members))
    return sizes


def _start_manager(deployment: Any) -> None:
    from escalator.processes import python_module

    session = os.environ.get("BENCH_SCALE_UM_SESSION_TIMEOUT_MS")
    um_env = {"ESCALATOR_KAFKA_SESSION_TIMEOUT_MS": session} if session else None
    deployment.group.spawn("upgrade-manager", python_module("services.upgrade_manager"), env=um_env)


def _start_vnfm_side(deployment: Any) -> None:
    from escalator.processes import python_module

    w = deployment.world_url
    deployment.group.spawn("vnfm-adapter", python_module("services.vnfm_adapter"))
    for vnfm_id in deployment.vnfm_ids:
        deployment.group.spawn(
            f"reference-vnfm-{vnfm_id}",
            python_module(
                "services.vnfm_adapter.reference_vnfm",
                *("--world", w, "--vnfm-id", vnfm_id, "--work-s", "0"),
            ),
        )


async def _manager_ready(
    deployment: Any, result: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Wait for the Upgrade Manager's readiness; if it exits while starting, record why and
    start it once more (what a supervisor would do), then wait again."""
    for attempt in range(2):
        try:
            await wait_log(deployment, "upgrade-manager", UM_READY, 900)
            return
        except RuntimeError:
            child = deployment.group.children["upgrade-manager"]
            if child.alive or attempt:
                raise
            tail = [line for line in child.log_tail(40).splitlines() if line.strip()]
            why = tail[-1] if tail else f"exit code {child.process.returncode}"
            result.setdefault("upgrade_manager_startup_failures", []).append(why)
            log(f"scale: the Upgrade Manager exited while starting ({why}); starting it again")
            deployment.group.restart("upgrade-manager")


async def topic_end_offsets(settings: Any, names: Sequence[str]) -> dict[str, int]:
    """Sum over partitions of each topic's end offset (records ever written)."""
    from aiokafka.structs import TopicPartition

    from escalator.bus.connection import make_consumer
    from escalator.bus.partitioning import topic_partitions

    consumer = make_consumer(settings, None)
    await consumer.start()
    try:
        out: dict[str, int] = {}
        for name in names:
            try:
                parts = await topic_partitions(consumer, name, timeout_s=5)
            except LookupError:
                continue
            ends = await consumer.end_offsets([TopicPartition(name, p) for p in sorted(parts)])
            out[name] = sum(ends.values())
        return out
    finally:
        await consumer.stop()


@dataclass
class CampaignFollow:
    """What the campaigns topic said about one campaign, as it went."""

    campaign_id: str
    total: int
    requested_at: float = 0.0  # monotonic, when the request was published
    finished: dict[str, str] = field(default_factory=dict)  # node -> done/skipped/failed
    finish_times: list[float] = field(default_factory=list)  # s since the request
    steps: list[tuple[datetime, str, str]] = field(default_factory=list)
    outcome: str | None = None
    ended_after_s: float | None = None  # monotonic, request -> end seen
    started_at: datetime | None = None  # CampaignStarted.occurred_at
    ended_at: datetime | None = None  # CampaignCompleted/Failed.occurred_at
    request_occurred_at: datetime | None = None
    reason: str = ""

    def apply(self, event: Any, now: float) -> None:
        kind = event.event_type
        if kind == "NodeCycleAdvanced":
            step = str(getattr(event.step, "value", event.step))
            self.steps.append((event.occurred_at, event.node_id, step))
            if step in ("done", "skipped", "failed") and event.node_id not in self.finished:
                self.finished[event.node_id] = step
                self.finish_times.append(now - self.requested_at)
        elif kind == "CampaignStarted":
            self.started_at = event.occurred_at
        elif kind in ("CampaignCompleted", "CampaignFailed", "CampaignRejected"):
            self.outcome = kind
            self.ended_at = event.occurred_at
            self.ended_after_s = now - self.requested_at
            self.reason = str(getattr(event, "reason", "") or "")


async def follow_campaign(
    settings: Any,
    follow: CampaignFollow,
    deployment: Any,
    budget_s: float,
    log: Callable[[str], None],
    started: asyncio.Event,
) -> None:
    """Read the campaigns topic until the campaign ends or `budget_s` passes after the request."""
    from escalator.bus.readback import scan
    from schemas.codec import decode
    from schemas.envelope import Event
    from schemas.topics import CAMPAIGNS

    key = follow.campaign_id.encode()

    async def read() -> None:
        stream = scan(settings, CAMPAIGNS, follow=True)
        started.set()
        async for record in stream:
            if record.key != key:
                continue
            event = decode(record.value)
            if isinstance(event, Event):
                follow.apply(event, time.monotonic())
                if follow.outcome is not None:
                    return

    last_log = time.monotonic()

    def budget_spent_or_report() -> bool:
        nonlocal last_log
        now = time.monotonic()
        if follow.requested_at and now - follow.requested_at > budget_s:
            log(f"scale: campaign budget of {budget_s:.0f} s spent; stopping the run")
            return True
        if follow.requested_at and now - last_log >= PROGRESS_LOG_S:
            last_log = now
            elapsed = now - follow.requested_at
            stats = rate_and_projection(follow.finish_times, follow.total, elapsed)
            log(
                f"scale: {len(follow.finished)}/{follow.total} nodes done after "
                f"{elapsed:.0f} s ({stats['nodes_per_min_recent']} nodes/min lately)"
            )
        return False

    await await_while_alive(
        asyncio.create_task(read()),
        deployment.check_alive,
        timeout_s=None,
        on_poll=budget_spent_or_report,
    )


_READY = re.compile(r"ready \(rebalance (\d+),.*state of \d+ campaign\(s\) read in ([\d.]+) s")


def um_log_facts(text: str) -> dict[str, Any]:
    """From the Upgrade Manager's log: its group rebalances (each re-reads and rebuilds the
    state of its campaigns), how long the state reads took, how often its group session expired
    or its member id was forgotten, and its own latency summary (logged when it stops)."""
    ready = [(int(n), float(s)) for n, s in _READY.findall(text)]
    reads = [s for _, s in ready]
    latency = [line.split("latency: ", 1)[1] for line in text.splitlines() if "latency: " in line]
    return {
        "rebalances": max((n for n, _ in ready), default=0),
        "state_read_s": summary(reads) if reads else None,
        "session_expired": text.count("Heartbeat session expired"),
        "member_id_forgotten": text.count("local member_id was not recognized"),
        "latency": latency[-1] if latency else None,
    }


async def _live(
    ctx: BenchContext,
    deployment: Any,
    scenario: Path,
    *,
    pools: int,
    max_parallel: int,
    budget_s: float,
    result: dict[str, Any],
    sampler: ProcessSampler,
) -> None:
    from escalator.bus.connection import ensure_topics
    from escalator.cli import build_upgrade_request, publish_upgrade_request
    from escalator.demo import publish_registry_from_world, wait_for_heartbeats, write_demo_manifest
    from escalator.processes import python_module
    from escalator.world.client import WorldClient
    from schemas.topics import ALL_TOPICS
    from schemas.types import VnfmTimeoutPolicy
    from services.upgrade_manager.routing import STATE_TOPIC

    settings = deployment.settings
    phases: dict[str, float] = {}
    result["startup_s"] = phases

    def phase(name: str, since: float) -> float:
        phases[name] = rounded(time.monotonic() - since, 1)
        return time.monotonic()

    t = time.monotonic()
    match = deployment.group.spawn(
        "world",
        python_module(
            "escalator.world",
            *("--port", "0", "--scenario", str(scenario)),
            *("--migration-s", "0", "--reboot-s", "0", "--resync-s", "0"),
        ),
        wait_for=r"world listening on (http://\S+)",
        timeout_s=900,
    )
    deployment.world_url = match.group(1)
    t = phase("world", t)
    await ensure_topics(settings)
    async with WorldClient(deployment.world_url) as world:
        nodes = await world.nodes()
    deployment.node_ids = sorted(n.id for n in nodes)
    vnfs, deployment.vnfm_ids = await publish_registry_from_world(settings, deployment.world_url)
    result["vnfs_registered"] = vnfs
    result["vnfms"] = len(deployment.vnfm_ids)
    t = phase("registry", t)
    # One service at a time, each once the one before is up: the start-ups that read or
    # publish the whole inventory do not compete with each other for the CPU.
    result["agent_pools"] = _start_pools(deployment, pools)
    ctx.log(f"scale: {len(result['agent_pools'])} agent pools started; waiting for heartbeats")
    total = len(deployment.node_ids)
    await wait_for_heartbeats(settings, deployment.node_ids, deployment, 300 + total * 0.1)
    t = phase("agents_heartbeats", t)
    deployment.group.spawn(
        "cloud-manager", python_module("services.cloud_manager", "--world", deployment.world_url)
    )
    await wait_for_inventory(settings, deployment.node_ids, deployment, 300 + total * 0.1)
    t = phase("cloud_manager_inventory", t)
    _start_vnfm_side(deployment)
    _start_manager(deployment)
    await _manager_ready(deployment, result, ctx.log)
    phase("upgrade_manager_ready", t)
    ctx.log(f"scale: ready after {sum(phases.values()):.0f} s ({phases})")

    topics = [settings.topic(s.name) for s in ALL_TOPICS] + [settings.topic(STATE_TOPIC)]
    offsets_before = await topic_end_offsets(settings, topics)
    request = build_upgrade_request(
        version=VERSION,
        manifest=write_demo_manifest(ctx.run_dir, VERSION),
        artifacts=[],
        repo_url=None,
        nodes=deployment.node_ids,
        max_parallel=max_parallel,
        vnfm_timeout=VNFM_TIMEOUT_S,
        on_vnfm_timeout=VnfmTimeoutPolicy.MIGRATE,
        campaign_id=f"bench-scale-{uuid.uuid4().hex[:8]}",
        requested_by="bench scale",
    )
    follow = CampaignFollow(request.campaign_id or "", total)
    result["campaign_id"] = follow.campaign_id
    reading = asyncio.Event()
    follower = asyncio.create_task(
        follow_campaign(settings, follow, deployment, budget_s, ctx.log, reading)
    )
    await reading.wait()
    await asyncio.sleep(1.0)  # the follower's consumer is positioned before the request lands
    follow.request_occurred_at = request.occurred_at
    cpu_before = sampler.cpu_snapshot()
    follow.requested_at = time.monotonic()
    await publish_upgrade_request(settings, request)
    ctx.log(f"scale: campaign {follow.campaign_id}: {total} nodes, max_parallel {max_parallel}")
    try:
        await follower
    finally:
        elapsed = time.monotonic() - follow.requested_at
        cpu_after = sampler.cpu_snapshot()
        used = cpu_used(cpu_before[0], cpu_after[0])
        result["cpu_s_during_campaign"] = cpu_by_service(used)
        result["runqueue_wait_s_during_campaign"] = cpu_by_service(
            cpu_used(cpu_before[1], cpu_after[1])
        )
        um_cpu = result["cpu_s_during_campaign"].get("upgrade-manager")
        if um_cpu is not None and elapsed > 0:
            result["upgrade_manager_on_cpu_pct"] = rounded(100 * um_cpu / elapsed, 1)
        if MACHINE_BUSY in used and elapsed > 0:
            cores = os.cpu_count() or 1
            result["machine_cpu_busy_pct"] = rounded(100 * used[MACHINE_BUSY] / elapsed / cores, 1)
        try:
            offsets_after = await topic_end_offsets(settings, topics)
        except Exception as exc:  # the counts are extras: never lose the campaign's numbers
            result["records_error"] = f"{type(exc).__name__}: {exc}"
            offsets_after = {}
        _campaign_result(result, follow, elapsed, offsets_before, offsets_after, settings)
        result.update(
            um_cpu_floor(
                result["cpu_s_during_campaign"].get("upgrade-manager"),
                len(follow.finished),
                total,
            )
        )
    try:  # best effort: a world busy serving 200,000 VMs may not answer in time
        async with WorldClient(deployment.world_url, timeout_s=120) as world:
            after = await world.nodes()
    except Exception as exc:
        result["world_check_error"] = f"{type(exc).__name__}: {exc}"
    else:
        result["at_target_version"] = sum(1 for n in after if n.installed_version == VERSION)
        result["left_in_maintenance"] = sum(1 for n in after if n.maintenance_holder is not None)


def _campaign_result(
    result: dict[str, Any],
    follow: CampaignFollow,
    elapsed: float,
    before: Mapping[str, int],
    after: Mapping[str, int],
    settings: Any,
) -> None:
    from bench.makespan import max_concurrent_in_cycle, time_in_steps

    finished = list(follow.finished.values())
    completed = follow.outcome == "CampaignCompleted"
    result["state"] = follow.outcome or "unfinished (budget spent)"
    if follow.reason:
        result["reason"] = follow.reason
    result["campaign_wall_s"] = (
        rounded(follow.ended_after_s, 1) if completed and follow.ended_after_s else None
    )
    if follow.ended_at is not None and follow.request_occurred_at is not None:
        result["campaign_wall_s_by_events"] = rounded(
            (follow.ended_at - follow.request_occurred_at).total_seconds(), 1
        )
    result["nodes_upgraded"] = finished.count("done")
    result["nodes_skipped"] = finished.count("skipped")
    result["nodes_failed"] = finished.count("failed")
    result["progress"] = rate_and_projection(
        follow.finish_times, follow.total, follow.ended_after_s or elapsed
    )
    if not completed:
        result["campaign_wall_s_projected"] = result["progress"]["campaign_wall_s_projected"]
    result["first_node_done_s"] = (
        rounded(min(follow.finish_times), 1) if follow.finish_times else None
    )
    result["max_in_cycle"] = max_concurrent_in_cycle(follow.steps) if follow.steps else 0
    if follow.steps:
        result["time_in_steps"] = time_in_steps(follow.steps)
    prefix = settings.topic_prefix or ""
    during = {
        name.removeprefix(prefix): after[name] - before.get(name, 0)
        for name in sorted(after)
        if after[name] - before.get(name, 0) > 0
    }
    result["records_during_campaign"] = during
    campaign_records = sum(
        n for name, n in during.items() if "heartbeats" not in name and "inventory" not in name
    )
    span = follow.ended_after_s or elapsed
    result["records_per_s"] = rounded(campaign_records / span, 1) if span > 0 else None
    result["records_per_s_means"] = (
        "records written during the campaign to every catalogue topic and the Upgrade "
        "Manager's state topic, heartbeats and inventory left out, per wall second"
    )


def live_run(
    ctx: BenchContext,
    scenario: Path,
    *,
    pools: int,
    max_parallel: int,
    budget_s: float,
) -> dict[str, Any]:
    from escalator.demo import DemoOptions, Deployment

    settings = ctx.kafka_settings("scale")
    options = DemoOptions(run_dir=ctx.run_dir, vnfm_timeout_s=VNFM_TIMEOUT_S)
    deployment = Deployment.create(settings, options)
    extra = {"bench-runner": os.getpid()}
    if ctx.broker.pid is not None:
        extra["kafka-broker"] = ctx.broker.pid
    sampler = ProcessSampler(deployment.group, extra)
    sampler.start()
    result: dict[str, Any] = {
        "max_parallel": max_parallel,
        "budget_s": budget_s,
        "topic_prefix": settings.topic_prefix,
        "logs": str(deployment.group.log_dir),
        "upgrade_manager_session_timeout_ms": int(
            os.environ.get("BENCH_SCALE_UM_SESSION_TIMEOUT_MS") or settings.session_timeout_ms
        ),
    }
    try:
        asyncio.run(
            _live(
                ctx,
                deployment,
                scenario,
                pools=pools,
                max_parallel=max_parallel,
                budget_s=budget_s,
                result=result,
                sampler=sampler,
            )
        )
    except Exception as exc:
        if "state" not in result:
            raise  # nothing measured yet: the section crashed
        # The campaign was measured; what failed after it is recorded, not fatal.
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        sampler.stop()
        deployment.stop()
        result["rss_mb"] = sampler.to_json()
        result["rss_samples"] = sampler.peaks.samples
        um = deployment.group.children.get("upgrade-manager")
        if um is not None:
            with contextlib.suppress(OSError):
                result["upgrade_manager_log"] = um_log_facts(
                    um.log_path.read_text(errors="replace")
                )
    return result


# --- the section ---------------------------------------------------------------------------------


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def run(ctx: BenchContext) -> dict[str, Any]:
    from escalator.plan import cloud_from_world
    from escalator.world.scenario import generate, save_state, with_timings

    nodes = int(_env_number("BENCH_SCALE_NODES", QUICK_NODES if ctx.quick else FULL_NODES))
    max_parallel = int(
        _env_number(
            "BENCH_SCALE_MAX_PARALLEL", QUICK_MAX_PARALLEL if ctx.quick else LIVE_MAX_PARALLEL
        )
    )
    pools = int(_env_number("BENCH_SCALE_POOLS", QUICK_POOLS if ctx.quick else POOLS))
    budget_s = _env_number(
        "BENCH_SCALE_BUDGET_S", QUICK_BUDGET_S if ctx.quick else CAMPAIGN_BUDGET_S
    )
    planner_parallel = (
        min(PLANNER_MAX_PARALLEL, max_parallel) if ctx.quick else PLANNER_MAX_PARALLEL
    )

    result: dict[str, Any] = {
        "world": f"generate(nodes={nodes}, failure_domains={DOMAINS}, "
        f"vms_per_node={VMS_PER_NODE}, spare_fraction={SPARE_FRACTION}, seed={SEED})",
    }
    ctx.log(f"scale: generating a world of {nodes} nodes")
    began = time.perf_counter()
    state = generate(
        nodes=nodes,
        failure_domains=DOMAINS,
        seed=SEED,
        vms_per_node=VMS_PER_NODE,
        spare_fraction=SPARE_FRACTION,
    )
    result["generate_s"] = rounded(time.perf_counter() - began, 1)
    result["nodes"] = len(state.nodes)
    result["vms"] = len(state.vms)
    result["vnfs"] = len(state.vnfs)
    first = next(iter(state.nodes.values()))
    result["node_size"] = {"vcpus": first.vcpus, "ram_mb": first.ram_mb}
    ctx.log(f"scale: {result['nodes']} nodes, {result['vms']} VMs, {result['vnfs']} VNFs")

    scenario = ctx.run_dir / f"world-{nodes}.json"
    began = time.perf_counter()
    save_state(with_timings(state, migration_s=0.0, reboot_s=0.0, resync_s=0.0), scenario)
    result["scenario"] = {
        "path": str(scenario),
        "mb": rounded(scenario.stat().st_size / 2**20, 1),
        "save_s": rounded(time.perf_counter() - began, 1),
        "timings": "migration_s 0, reboot_s 0, resync_s 0 (active-standby min_recovery_s 0)",
    }

    began = time.perf_counter()
    cloud, rules = cloud_from_world(state)
    result["cloud_from_world_s"] = rounded(time.perf_counter() - began, 1)
    timings = state.timings.model_dump()
    del state
    gc.collect()
    planner = measure_planner(cloud, rules, timings, planner_parallel, ctx.log)
    planner["timings"] = timings
    del cloud, rules
    gc.collect()
    result["planner"] = planner
    as_is = planner["gc_as_is"]["decision_ms"]
    frozen = planner["gc_frozen"]["decision_ms"]
    result["planner_decision_ms_p50"] = as_is["p50"]
    result["planner_decision_ms_p90"] = as_is["p90"]
    result["planner_decision_ms_p99"] = as_is["p99"]
    result["planner_decision_ms_max"] = as_is["max"]
    result["planner_decisions"] = as_is["count"]
    result["planner_decision_cpu_ms_p50"] = planner["gc_as_is"]["decision_cpu_ms"]["p50"]
    result["planner_decision_ms_p50_gc_frozen"] = frozen["p50"]
    result["planner_decision_ms_p99_gc_frozen"] = frozen["p99"]
    result["planner_decision_ms_max_gc_frozen"] = frozen["max"]

    ctx.log(f"scale: live campaign, {nodes} nodes, max_parallel {max_parallel}, {pools} pools")
    live = live_run(ctx, scenario, pools=pools, max_parallel=max_parallel, budget_s=budget_s)
    result["live"] = live
    result["max_parallel"] = max_parallel
    result["campaign_wall_s"] = live.get("campaign_wall_s")
    result["campaign_wall_s_projected"] = live.get("campaign_wall_s_projected")
    result["nodes_upgraded"] = live.get("nodes_upgraded")
    result["campaign_state"] = live.get("state")
    result["records_per_s"] = live.get("records_per_s")
    result["rss_mb"] = live.get("rss_mb", {})
    for key in (
        "upgrade_manager_cpu_s_per_node",
        "campaign_wall_s_floor_um_one_core",
        "upgrade_manager_on_cpu_pct",
        "machine_cpu_busy_pct",
    ):
        result[key] = live.get(key)
    result["upgrade_manager_rebalances"] = (live.get("upgrade_manager_log") or {}).get("rebalances")
    with contextlib.suppress(OSError):
        scenario.unlink()  # tens of MB; regenerated identically from the parameters above
    return {"scale": result}


# --- the table -----------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:g}{unit}" if isinstance(value, int | float) else str(value)


def rows(result: dict[str, Any]) -> list[Row]:
    p50 = result.get("planner_decision_ms_p50")
    rss = result.get("rss_mb") or {}
    um = rss.get("upgrade-manager")
    at_10k = (result.get("nodes") or 0) >= FULL_NODES
    note = "" if at_10k else f" (at {result.get('nodes')} nodes; target is for 10,000)"
    out = [
        Row("scale.nodes / vms", f"{result.get('nodes')} / {result.get('vms')}"),
        Row(
            "scale.planner_decision_ms_p50" + note,
            _fmt(p50, " ms"),
            f"<= {TARGET_DECISION_MS:g} ms",
            None if p50 is None or not at_10k else p50 <= TARGET_DECISION_MS,
        ),
        Row(
            "scale.planner_decision_ms p90 / p99 / max",
            " / ".join(_fmt(result.get(f"planner_decision_ms_{k}")) for k in ("p90", "p99", "max"))
            + " ms",
        ),
        Row(
            "scale.planner_decision CPU ms p50 (the cost without the machine's contention)",
            _fmt(result.get("planner_decision_cpu_ms_p50"), " ms"),
        ),
        Row(
            "scale.planner_decision_ms p50 / p99 / max after gc.freeze()",
            " / ".join(
                _fmt(result.get(f"planner_decision_ms_{k}_gc_frozen"))
                for k in ("p50", "p99", "max")
            )
            + " ms",
        ),
        Row(
            f"scale.campaign_wall_s (max_parallel {result.get('max_parallel')})",
            _fmt(result.get("campaign_wall_s"), " s")
            if result.get("campaign_wall_s") is not None
            else f"not finished; projected {_fmt(result.get('campaign_wall_s_projected'), ' s')}",
        ),
        Row(
            "scale.campaign_wall_s floor: Upgrade Manager CPU per node x nodes (one core)",
            _fmt(result.get("campaign_wall_s_floor_um_one_core"), " s"),
        ),
        Row(
            "scale.Upgrade Manager on CPU during the campaign / machine busy",
            f"{_fmt(result.get('upgrade_manager_on_cpu_pct'), ' %')} / "
            f"{_fmt(result.get('machine_cpu_busy_pct'), ' %')}",
        ),
        Row(
            "scale.Upgrade Manager group rebalances during the run",
            _fmt(result.get("upgrade_manager_rebalances")),
        ),
        Row(
            "scale.nodes_upgraded",
            f"{_fmt(result.get('nodes_upgraded'))} ({result.get('campaign_state')})",
        ),
        Row(
            "scale.rss_mb upgrade-manager" + note,
            _fmt(um, " MB"),
            f"<= {TARGET_UM_RSS_MB:g} MB",
            None if not isinstance(um, int | float) or not at_10k else um <= TARGET_UM_RSS_MB,
        ),
    ]
    for service, value in rss.items():
        if service == "upgrade-manager":
            continue
        if isinstance(value, dict):
            text = (
                f"max {_fmt(value.get('max'))} MB, sum {_fmt(value.get('sum'))} MB "
                f"({value.get('processes')} processes)"
            )
        else:
            text = _fmt(value, " MB")
        out.append(Row(f"scale.rss_mb {service}", text))
    return out
