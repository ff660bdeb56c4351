"""Process entry points of the world: `run_world` for the main CLI, `main` for `python -m`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from escalator.world.engine import WorldEngine
from escalator.world.model import Timings, WorldState
from escalator.world.scenario import generate, load_state, save_state, with_timings
from escalator.world.server import serve


def _announce(line: str) -> None:
    # Flushed at once: tests and the demo wait for this line on a pipe.
    print(line, flush=True)


async def run_world(
    port: int,
    state: WorldState,
    speed: float,
    *,
    host: str = "127.0.0.1",
    stop: asyncio.Event | None = None,
) -> None:
    """Serve `state` on host:port (0 picks a free port) until `stop` is set or cancelled.
    Prints "world listening on http://HOST:PORT" once ready."""
    await serve(WorldEngine(state, speed=speed), port, host=host, stop=stop, announce=_announce)


# Flags that shape a generated cloud, with their defaults; none of them goes with --scenario.
GENERATION_DEFAULTS: dict[str, Any] = {
    "nodes": 12,
    "domains": 3,
    "seed": 0,
    "base_version": "1.0.0",
    "spare_fraction": None,
    "vms_per_node": None,
    "node_vcpus": 32,
    "node_ram_mb": 65536,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m escalator.world",
        description="Simulated NFV cloud (nodes, VMs, VNFs) for end-to-end tests of Escalator. "
        "Generates a cloud from the flags, or serves one saved in a JSON file (--scenario).",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--scenario", metavar="PATH", help="serve this saved world (e.g. bench/scenarios/*.json)"
    )
    parser.add_argument(
        "--save", metavar="PATH", help="write the world (with overrides) to PATH and exit"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="all durations are divided by it")
    timings = parser.add_argument_group("timings (nominal seconds; override a scenario's too)")
    timings.add_argument("--migration-s", type=float, help=f"default {Timings().migration_s}")
    timings.add_argument("--reboot-s", type=float, help=f"default {Timings().reboot_s}")
    timings.add_argument("--resync-s", type=float, help=f"default {Timings().resync_s}")
    gen = parser.add_argument_group("generation (not with --scenario)")
    gen.add_argument("--nodes", type=int, help="default 12")
    gen.add_argument("--domains", type=int, help="failure domains, default 3")
    gen.add_argument("--seed", type=int, help="default 0")
    gen.add_argument("--base-version", help="installed version, default 1.0.0")
    gen.add_argument(
        "--spare-fraction",
        type=float,
        help="fill until free vcpus/RAM would drop below this fraction (default: about one "
        "node's worth)",
    )
    gen.add_argument("--vms-per-node", type=int, help="size nodes to hold about this many VMs each")
    gen.add_argument("--node-vcpus", type=int, help="default 32")
    gen.add_argument("--node-ram-mb", type=int, help="default 65536")
    return parser


def world_from_args(args: argparse.Namespace) -> WorldState:
    """The world the flags describe (raises ValueError with a readable message)."""
    timings = {
        "migration_s": args.migration_s,
        "reboot_s": args.reboot_s,
        "resync_s": args.resync_s,
    }
    for name, value in timings.items():
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.scenario is not None:
        clashing = [
            "--" + name.replace("_", "-")
            for name in GENERATION_DEFAULTS
            if getattr(args, name) is not None
        ]
        if clashing:
            raise ValueError(f"{', '.join(clashing)} cannot be combined with --scenario")
        return with_timings(load_state(args.scenario), **timings)
    given = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in GENERATION_DEFAULTS.items()
    }
    return generate(
        nodes=given["nodes"],
        failure_domains=given["domains"],
        seed=given["seed"],
        base_version=given["base_version"],
        spare_fraction=given["spare_fraction"],
        vms_per_node=given["vms_per_node"],
        node_vcpus=given["node_vcpus"],
        node_ram_mb=given["node_ram_mb"],
        timings=Timings.model_validate({k: v for k, v in timings.items() if v is not None}),
    )


async def _serve_until_signalled(port: int, host: str, state: WorldState, speed: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await run_world(port, state, speed, host=host, stop=stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.speed <= 0:
        print("error: --speed must be positive", file=sys.stderr)
        return 2
    try:
        state = world_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.save is not None:
        try:
            save_state(state, args.save)
        except OSError as exc:
            print(f"error: cannot write {args.save}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"world saved to {args.save}: {len(state.nodes)} nodes, {len(state.vms)} VMs")
        return 0
    asyncio.run(_serve_until_signalled(args.port, args.host, state, args.speed))
    return 0
