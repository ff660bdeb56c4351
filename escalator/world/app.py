"""Process entry points of the world: `run_world` for the main CLI, `main` for `python -m`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from escalator.world.engine import WorldEngine
from escalator.world.model import Timings, WorldState
from escalator.world.scenario import generate
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m escalator.world",
        description="Simulated NFV cloud (nodes, VMs, VNFs) for end-to-end tests of Escalator.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--domains", type=int, default=3, help="failure domains")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, default=1.0, help="all durations are divided by it")
    parser.add_argument("--migration-s", type=float, default=Timings().migration_s)
    parser.add_argument("--reboot-s", type=float, default=Timings().reboot_s)
    parser.add_argument("--resync-s", type=float, default=Timings().resync_s)
    parser.add_argument("--base-version", default="1.0.0")
    return parser


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
        state = generate(
            nodes=args.nodes,
            failure_domains=args.domains,
            seed=args.seed,
            base_version=args.base_version,
            timings=Timings(
                migration_s=args.migration_s, reboot_s=args.reboot_s, resync_s=args.resync_s
            ),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve_until_signalled(args.port, args.host, state, args.speed))
    return 0
