"""`python -m services.node_agent --node-id N --world URL`: one agent process per node.

`--node-ids a,b,c` or `--node-ids-file FILE` (ids separated by commas or newlines) instead runs
one process hosting an agent per node, each with the semantics of a process of its own (see
`services/node_agent/pool.py`); the other flags apply to every hosted agent.

Kafka settings come from the environment (`KAFKA_BOOTSTRAP_SERVERS`, `ESCALATOR_KAFKA_*`); the
agent's own from `ESCALATOR_NODE_AGENT_*`, overridden by the flags. Heavy imports (aiokafka,
aiohttp) happen only once the arguments are parsed, so `--help` and bad flags stay instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from escalator.entrypoint import (
    add_config_argument,
    load_settings,
    run_until_interrupted,
    setup_logging,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.node_agent", description="Escalator node agent (one per node)."
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--node-id", help="node to serve (ESCALATOR_NODE_AGENT_NODE_ID)")
    which.add_argument(
        "--node-ids", help="host one agent per node of this comma-separated list (a pool)"
    )
    which.add_argument(
        "--node-ids-file", help="host one agent per node listed in this file (a pool)"
    )
    parser.add_argument("--world", help="simulated cloud URL (ESCALATOR_NODE_AGENT_WORLD_URL)")
    parser.add_argument("--heartbeat-interval-s", type=float, help="seconds between heartbeats")
    parser.add_argument("--reboot-s", type=float, help="nominal reboot duration of an upgrade")
    parser.add_argument("--log-level", default="INFO")
    add_config_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from services.node_agent.settings import NodeAgentSettings

    if args.node_ids is not None or args.node_ids_file is not None:
        return _main_pool(args)
    settings = load_settings(
        NodeAgentSettings,
        "node agent",
        config_file=args.config,
        node_id=args.node_id,
        world_url=args.world,
        heartbeat_interval_s=args.heartbeat_interval_s,
        reboot_s=args.reboot_s,
    )
    if settings is None:
        return 2
    from escalator.bus.faults import from_env_or_exit

    faults = from_env_or_exit("node agent")  # tests only; None when unset
    return run_until_interrupted(_serve(settings, faults))


def _main_pool(args: argparse.Namespace) -> int:
    from services.node_agent.pool import parse_node_ids, serve_pool
    from services.node_agent.settings import NodeAgentSettings

    try:
        if args.node_ids_file is not None:
            with open(args.node_ids_file, encoding="utf-8") as f:
                node_ids = parse_node_ids(f.read())
        else:
            node_ids = parse_node_ids(args.node_ids)
    except (OSError, ValueError) as exc:
        print(f"node agent: bad node list: {exc}", file=sys.stderr)
        return 2
    if not node_ids:
        print("node agent: bad node list: no node id given", file=sys.stderr)
        return 2
    members = []
    for node_id in node_ids:
        settings = load_settings(
            NodeAgentSettings,
            "node agent",
            config_file=args.config,
            node_id=node_id,
            world_url=args.world,
            heartbeat_interval_s=args.heartbeat_interval_s,
            reboot_s=args.reboot_s,
        )
        if settings is None:
            return 2
        members.append(settings)
    from escalator.bus.faults import from_env_or_exit

    faults = from_env_or_exit("node agent")  # tests only; None when unset
    wrapper = faults.wrapper(f"node-agent-pool/{node_ids[0]}") if faults is not None else None
    return run_until_interrupted(serve_pool(members, build_executor, consumer_wrapper=wrapper))


def build_executor(world: Any, settings: Any) -> Any:
    """The executor of one node, for a process of its own and for every agent of a pool."""
    from services.node_agent.executors import SimulatedExecutor

    return SimulatedExecutor(
        world, settings.node_id, reboot_s=settings.reboot_s, timeout_s=settings.apply_timeout_s
    )


async def _serve(settings: Any, faults: Any = None) -> None:
    from escalator.bus import make_consumer, make_producer
    from escalator.settings import KafkaSettings
    from escalator.world.client import WorldClient
    from schemas.envelope import utcnow
    from services.node_agent.service import NodePublisher, bootstrap

    kafka = KafkaSettings()
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, settings.group_id)
    if faults is not None:
        consumer = faults.wrap(consumer, name=settings.producer)
    world = WorldClient(settings.world_url)
    await producer.start()
    try:
        await consumer.start()
        try:
            service = bootstrap(
                settings,
                executor=build_executor(world, settings),
                consumer=consumer,
                publisher=NodePublisher(producer, kafka),
                clock=utcnow,
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, service.request_stop)
            logging.getLogger(__name__).info("node agent for %s starting", settings.node_id)
            await service.run()
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        await world.close()


if __name__ == "__main__":
    sys.exit(main())
