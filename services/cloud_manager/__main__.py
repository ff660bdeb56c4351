"""`python -m services.cloud_manager --world URL`: the Cloud Manager over the simulated cloud.

Kafka settings come from the environment (`KAFKA_BOOTSTRAP_SERVERS`, `ESCALATOR_KAFKA_*`); the
Cloud Manager's own from `ESCALATOR_CLOUD_MANAGER_*`, overridden by the flags.
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
        prog="python -m services.cloud_manager", description="Escalator Cloud Manager."
    )
    parser.add_argument("--world", help="simulated cloud URL (ESCALATOR_CLOUD_MANAGER_WORLD_URL)")
    parser.add_argument("--instance-id", help="this instance, as event producer")
    parser.add_argument(
        "--inventory-interval-s",
        type=float,
        help="inventory refresh period; 0 turns it off (ESCALATOR_CLOUD_MANAGER_INVENTORY_"
        "INTERVAL_S, default 10)",
    )
    parser.add_argument("--log-level", default="INFO")
    add_config_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from services.cloud_manager.settings import CloudManagerSettings

    settings = load_settings(
        CloudManagerSettings,
        "cloud manager",
        config_file=args.config,
        world_url=args.world,
        instance_id=args.instance_id,
        inventory_interval_s=args.inventory_interval_s,
    )
    if settings is None:
        return 2
    from escalator.bus.faults import from_env_or_exit

    faults = from_env_or_exit("cloud manager")  # tests only; None when unset
    return run_until_interrupted(_serve(settings, faults))


async def _serve(settings: Any, faults: Any = None) -> None:
    from escalator.bus import EventPublisher, ensure_topics, make_consumer, make_producer
    from escalator.settings import KafkaSettings
    from escalator.world.client import WorldClient
    from schemas.topics import CLOUD_COMMANDS, CLOUD_EVENTS, CLOUD_INVENTORY
    from services.cloud_manager.backends import WorldCloudBackend
    from services.cloud_manager.service import bootstrap

    kafka = KafkaSettings()
    # The inventory topic is compacted: it must exist (created so) before anything is sent.
    await ensure_topics(kafka, (CLOUD_COMMANDS, CLOUD_EVENTS, CLOUD_INVENTORY))
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, settings.group_id)
    if faults is not None:
        consumer = faults.wrap(consumer, name=settings.instance_id)
    world = WorldClient(settings.world_url)
    await producer.start()
    try:
        await consumer.start()
        try:
            service = bootstrap(
                settings,
                backend=WorldCloudBackend(
                    world, migration_timeout_s=settings.migration_timeout_s, poll_s=settings.poll_s
                ),
                consumer=consumer,
                publisher=EventPublisher(producer, kafka),
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, service.request_stop)
            logging.getLogger(__name__).info("cloud manager %s starting", settings.instance_id)
            await service.run()
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        await world.close()


if __name__ == "__main__":
    sys.exit(main())
