"""The bench runner: section registry, context, machine description, statistics, the table.

A section is a module `bench.<name>` with

    def run(ctx: BenchContext) -> dict            # required: the section's results (JSON-able)
    def rows(result: dict) -> list[Row]           # optional: its lines of the summary table

`run` gets one broker for the whole bench run (`ctx.broker`, from `escalator.broker.start_broker`,
so `KAFKA_BOOTSTRAP_SERVERS` is respected, else the JVM Apache Kafka), a directory of its own
under `.cache/bench/<stamp>/` and the `--quick` flag. Its dict lands in the JSON under the
section's name (a dict whose only key is the section's name is unwrapped); `ctx.results` holds
the results of the sections that ran before it. Without `rows`, the table shows the dict's
top-level numbers without targets.
Targets are shown, never asserted: a missed target still exits 0. A section that raises is
reported as crashed and makes the exit code 1; a section whose module does not exist (yet) is
reported as "not built".
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import os
import platform
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from escalator.processes import await_while_alive

if TYPE_CHECKING:
    from escalator.broker import BrokerHandle
    from escalator.settings import KafkaSettings

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
CACHE_DIR = REPO / ".cache" / "bench"

# Every section the bench knows, in the order they run and appear in the table.
# `overhead` runs first: `makespan` uses its control-plane cost per node cycle (ctx.results).
SECTIONS: dict[str, str] = {
    "overhead": "bench.overhead",
    "makespan": "bench.makespan",
    "scale": "bench.scale",
}

NOT_BUILT = "not built"
CRASHED = "crashed"
OK = "ok"

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- what a section gets and gives -----------------------------------------------------------


@dataclass
class BenchContext:
    """What a section's `run(ctx)` gets."""

    broker: BrokerHandle
    run_dir: Path
    quick: bool = False
    log: Log = _stderr
    # Results of the sections that ran before this one in the same run, by section name.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def settings(self) -> KafkaSettings:
        """The broker's client settings (launcher-chosen knobs included)."""
        return self.broker.settings

    def kafka_settings(self, name: str, **update: Any) -> KafkaSettings:
        """The broker's settings with a topic prefix of their own (`bench-<name>-<random>.`)."""
        prefix = f"bench-{name}-{uuid.uuid4().hex[:8]}."
        return self.broker.settings.model_copy(update={"topic_prefix": prefix, **update})


@dataclass(frozen=True)
class Row:
    """One line of the summary table. `met` is None where there is no target."""

    metric: str
    value: str
    target: str = ""
    met: bool | None = None


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    position = (len(data) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def rounded(value: float, digits: int = 2) -> float:
    return float(round(value, digits))


# --- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        import psutil

        info["cores_physical"] = psutil.cpu_count(logical=False)
        info["ram_gb"] = rounded(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil missing or unsupported here: the rest still describes the machine
        pass
    try:
        info["load_avg_at_start"] = [rounded(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# --- the table -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Sequence[Row]) -> str:
    """A markdown table: metric | value | target | met?"""
    lines = ["| metric | value | target | met? |", "|---|---|---|---|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "no")
        lines.append(f"| {_cell(row.metric)} | {_cell(row.value)} | {_cell(row.target)} | {met} |")
    return "\n".join(lines)


def generic_rows(name: str, result: dict[str, Any]) -> list[Row]:
    """A section without `rows()`: its top-level numbers, no targets."""
    return [
        Row(f"{name}.{key}", f"{value:g}" if isinstance(value, float) else str(value))
        for key, value in result.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


# --- running ---------------------------------------------------------------------------------


@dataclass
class SectionOutcome:
    name: str
    status: str
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    trace: str = ""
    module: ModuleType | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.status != NOT_BUILT:
            out["seconds"] = rounded(self.seconds, 1)
        if self.error:
            out["error"] = self.error
        if self.trace:
            out["traceback"] = self.trace
        return out

    def rows(self) -> list[Row]:
        if self.status == NOT_BUILT:
            return [Row(self.name, NOT_BUILT)]
        if self.status == CRASHED:
            return [Row(self.name, f"{CRASHED}: {self.error[:160]}")]
        make_rows = getattr(self.module, "rows", None)
        if callable(make_rows):
            built: list[Row] = make_rows(self.result)
            return built
        return generic_rows(self.name, self.result)


def unwrap(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """`{"makespan": {...}}` from section makespan is its `{...}`."""
    if list(result) == [name] and isinstance(result[name], dict):
        inner: dict[str, Any] = result[name]
        return inner
    return result


def import_section(name: str) -> tuple[ModuleType | None, str]:
    """The section's module, or (None, why): "not built" when the module itself is missing,
    the import error when it exists but fails to import."""
    module_name = SECTIONS.get(name, f"bench.{name}")
    try:
        return importlib.import_module(module_name), ""
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, NOT_BUILT
        return None, traceback.format_exc()
    except Exception:
        return None, traceback.format_exc()


def parse_sections(text: str | None) -> list[str]:
    if not text:
        return list(SECTIONS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return names


def _launcher() -> Callable[..., BrokerHandle]:
    """The broker launcher of tests and the demo: KAFKA_BOOTSTRAP_SERVERS, else a local one."""
    from escalator.broker import start_broker

    return start_broker


def run_sections(
    names: Sequence[str],
    *,
    quick: bool,
    run_dir: Path,
    log: Log = _stderr,
    start_broker: Callable[..., BrokerHandle] | None = None,
) -> tuple[dict[str, Any], list[SectionOutcome]]:
    """Import and run the sections on one broker; the merged report and each outcome."""
    outcomes: list[SectionOutcome] = []
    runnable: list[tuple[SectionOutcome, Any]] = []
    for name in names:
        module, why = import_section(name)
        if module is None:
            status = NOT_BUILT if why == NOT_BUILT else CRASHED
            outcome = SectionOutcome(name, status)
            if status == CRASHED:
                outcome.error = "import failed: " + why.strip().splitlines()[-1]
                outcome.trace = why
            outcomes.append(outcome)
            log(f"bench: section {name}: {NOT_BUILT if status == NOT_BUILT else 'import failed'}")
            continue
        outcome = SectionOutcome(name, OK, module=module)
        outcomes.append(outcome)
        runnable.append((outcome, module))

    report: dict[str, Any] = {
        "broker": None,
        "machine": machine(),
        "quick": quick,
        "run_dir": _relative(run_dir),
    }
    if runnable:
        if start_broker is None:
            start_broker = _launcher()
        handle = start_broker(log=log)
        report["broker"] = handle.description
        report["broker_kind"] = handle.kind
        done: dict[str, dict[str, Any]] = {}
        try:
            for outcome, module in runnable:
                ctx = BenchContext(
                    handle, run_dir / outcome.name, quick=quick, log=log, results=dict(done)
                )
                ctx.run_dir.mkdir(parents=True, exist_ok=True)
                log(f"bench: section {outcome.name} starting")
                started = time.monotonic()
                try:
                    outcome.result = unwrap(outcome.name, dict(module.run(ctx)))
                    done[outcome.name] = outcome.result
                except Exception as exc:
                    outcome.status = CRASHED
                    outcome.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    outcome.trace = traceback.format_exc()
                    log(f"bench: section {outcome.name} crashed:\n{outcome.trace}")
                outcome.seconds = time.monotonic() - started
                log(f"bench: section {outcome.name} {outcome.status} in {outcome.seconds:.0f} s")
        finally:
            handle.stop()
    try:
        report["machine"]["load_avg_at_end"] = [rounded(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    report["sections"] = {o.name: o.summary() for o in outcomes}
    for outcome in outcomes:
        if outcome.status == OK:
            report[outcome.name] = outcome.result
    return report, outcomes


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_report(report: dict[str, Any], out: Path, copy_dir: Path) -> list[Path]:
    text = json.dumps(report, indent=2, default=str) + "\n"
    written = []
    for path in (out, copy_dir / "results.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Escalator benchmarks: prints a markdown table, writes JSON. Targets are "
        "shown, never asserted; the exit code is non-zero only if a section crashed.",
    )
    parser.add_argument(
        "--sections",
        help=f"comma-separated, default all: {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, to exercise the code paths quickly"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON report path (default bench/results/latest.json; "
        "bench/results/latest-quick.json with --quick)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A fresh topic's first sends are sometimes refused until its leader is known; aiokafka
    # retries them and warns each time. The services' logs keep every warning of theirs.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        names = parse_sections(args.sections)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = CACHE_DIR / stamp
    out = args.out or RESULTS_DIR / ("latest-quick.json" if args.quick else "latest.json")
    report, outcomes = run_sections(names, quick=args.quick, run_dir=run_dir)
    written = write_report(report, out, run_dir)
    rows = [row for outcome in outcomes for row in outcome.rows()]
    print(f"\nbroker: {report['broker'] or 'none started'}")
    m = report["machine"]
    print(
        f"machine: {m.get('cpu_model')}, {m.get('cores_logical')} cores, "
        f"{m.get('ram_gb', '?')} GB RAM, {m.get('python')}, {m.get('date')}"
        + (" (--quick)" if args.quick else "")
    )
    print()
    print(render_table(rows))
    print()
    print("written: " + ", ".join(_relative(p) for p in written))
    return 1 if any(o.status == CRASHED for o in outcomes) else 0


__all__ = [
    "SECTIONS",
    "BenchContext",
    "Row",
    "SectionOutcome",
    "generic_rows",
    "machine",
    "main",
    "parse_sections",
    "percentile",
    "render_table",
    "run_sections",
]

# --- waiting on a deployment (the live sections) ---------------------------------------------


async def wait_log(deployment: Any, name: str, pattern: str, timeout_s: float) -> None:
    """Until the child `name` logged a line matching `pattern`; fails if a child died."""
    regex = re.compile(pattern)
    path = deployment.group.children[name].log_path
    give_up = time.monotonic() + timeout_s
    while True:
        deployment.check_alive()
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if regex.search(text):
            return
        if time.monotonic() > give_up:
            raise TimeoutError(f"{name} never logged /{pattern}/ within {timeout_s}s")
        await asyncio.sleep(0.2)


async def wait_for_inventory(
    settings: Any, node_ids: Sequence[str], deployment: Any, timeout_s: float
) -> None:
    """Until the Cloud Manager's inventory topic has a record for every node (keys only)."""
    from escalator.bus.readback import scan
    from schemas.topics import CLOUD_INVENTORY

    missing = {n.encode() for n in node_ids}

    async def follow() -> None:
        async for record in scan(settings, CLOUD_INVENTORY, follow=True):
            missing.discard(record.key or b"")
            if not missing:
                return

    await await_while_alive(
        asyncio.create_task(follow()),
        deployment.check_alive,
        timeout_s=timeout_s,
        timed_out=lambda: (
            f"the inventory lacks {len(missing)} of {len(node_ids)} node(s) after {timeout_s:.0f} s"
        ),
        poll_s=0.5,
    )
