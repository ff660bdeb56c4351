"""`python -m services.vnfm_adapter`: the VNFM adapter process.

Kafka settings come from the environment (`KAFKA_BOOTSTRAP_SERVERS`, `ESCALATOR_KAFKA_*`); the
adapter's own from `ESCALATOR_VNFM_ADAPTER_*`, overridden by the flags. Heavy imports happen only
once the arguments are parsed, so `--help` and bad flags stay instant.
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
        prog="python -m services.vnfm_adapter",
        description="Escalator VNFM adapter: notices to VNFMs, deadlines, replies.",
    )
    parser.add_argument("--instance-id", help="this instance (ESCALATOR_VNFM_ADAPTER_INSTANCE_ID)")
    parser.add_argument("--group-id", help="consumer group (ESCALATOR_VNFM_ADAPTER_GROUP_ID)")
    parser.add_argument("--tick-s", type=float, help="deadline check period in seconds")
    parser.add_argument("--log-level", default="INFO")
    add_config_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from services.vnfm_adapter.settings import VnfmAdapterSettings

    settings = load_settings(
        VnfmAdapterSettings,
        "vnfm adapter",
        config_file=args.config,
        instance_id=args.instance_id,
        group_id=args.group_id,
        tick_s=args.tick_s,
    )
    if settings is None:
        return 2
    from escalator.bus.faults import from_env_or_exit

    faults = from_env_or_exit("vnfm adapter")  # tests only; None when unset
    return run_until_interrupted(_serve(settings, faults))


async def _serve(settings: Any, faults: Any = None) -> None:
    from escalator.bus import EventPublisher, ensure_topics, make_consumer, make_producer
    from escalator.settings import KafkaSettings
    from schemas.envelope import utcnow
    from schemas.topics import VNF_REGISTRY, VNFM_EVENTS, VNFM_NOTICES, VNFM_REPLIES, VNFM_REQUESTS
    from services.vnfm_adapter.service import (
        KafkaRegistrySource,
        KafkaStateStore,
        bootstrap,
        state_topic_spec,
    )

    kafka = KafkaSettings()
    await ensure_topics(
        kafka,
        (
            VNFM_REQUESTS,
            VNFM_REPLIES,
            VNFM_EVENTS,
            VNFM_NOTICES,
            VNF_REGISTRY,
            state_topic_spec(settings),
        ),
    )
    producer = make_producer(kafka)
    publisher = EventPublisher(producer, kafka)
    consumer = make_consumer(
        kafka,
        settings.group_id,
        kafka.topic(VNFM_REQUESTS.name),
        kafka.topic(VNFM_REPLIES.name),
    )
    if faults is not None:
        consumer = faults.wrap(consumer, name=settings.instance_id)
    await producer.start()
    try:
        await consumer.start()
        try:
            service = bootstrap(
                settings,
                registry_source=KafkaRegistrySource(
                    kafka, dead_letters=publisher, instance=settings.instance_id
                ),
                consumer=consumer,
                publisher=publisher,
                state_store=KafkaStateStore(kafka, producer, settings.state_topic),
                clock=utcnow,
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, service.request_stop)
            logging.getLogger(__name__).info("vnfm adapter %s starting", settings.instance_id)
            await service.run()
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


if __name__ == "__main__":
    sys.exit(main())
