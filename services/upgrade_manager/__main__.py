"""`python -m services.upgrade_manager`: the Upgrade Manager.

Kafka settings come from the environment (`KAFKA_BOOTSTRAP_SERVERS`, `ESCALATOR_KAFKA_*`); the
Upgrade Manager's own from `ESCALATOR_UPGRADE_MANAGER_*`, overridden by the flags. SIGTERM or
SIGINT stops it cleanly (it commits what it processed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from escalator.entrypoint import add_config_argument, settings_error, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.upgrade_manager", description="Escalator Upgrade Manager."
    )
    parser.add_argument("--instance-id", help="this instance (ESCALATOR_UPGRADE_MANAGER_*)")
    parser.add_argument("--tick-interval", type=float, help="seconds between campaign ticks")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
    parser.add_argument(
        "--log-level", default=os.environ.get("ESCALATOR_UPGRADE_MANAGER_LOG_LEVEL", "INFO")
    )
    add_config_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    # aiokafka logs every group join at INFO; keep its warnings only.
    for noisy in ("aiokafka",):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    from pydantic import ValidationError

    from escalator.bus.faults import from_env_or_exit
    from escalator.settings import KafkaSettings
    from services.upgrade_manager.settings import UpgradeManagerSettings

    overrides: dict[str, Any] = {
        name: value
        for name, value in (
            ("instance_id", args.instance_id),
            ("tick_interval_s", args.tick_interval),
            ("metrics_port", args.metrics_port),
        )
        if value is not None
    }
    if args.config is not None:
        from pathlib import Path

        from escalator.settings import CONFIG_ENV

        config = Path(args.config).expanduser()
        if not config.is_file():
            print(f"upgrade manager: bad setting --config: no such file: {config}", file=sys.stderr)
            return 2
        os.environ[CONFIG_ENV] = str(config.resolve())
    try:
        settings = UpgradeManagerSettings(**overrides)
        kafka = KafkaSettings()
    except ValidationError as err:
        print(settings_error("upgrade manager", err), file=sys.stderr)
        return 2
    faults = from_env_or_exit("upgrade manager")  # tests only; None when unset
    try:
        asyncio.run(_serve(settings, kafka, faults))
    except KeyboardInterrupt:
        pass
    except Exception:
        logging.getLogger("services.upgrade_manager").exception("upgrade manager failed")
        return 1
    return 0


async def _serve(settings: Any, kafka: Any, faults: Any = None) -> None:
    from services.upgrade_manager.service import bootstrap

    wrapper = faults.wrapper(settings.instance_id) if faults is not None else None
    service = bootstrap(settings, kafka, serve_metrics=True, consumer_wrapper=wrapper)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    logging.getLogger("services.upgrade_manager").info(
        "upgrade manager %s starting (brokers %s, topic prefix %r)",
        settings.instance_id,
        kafka.bootstrap_servers,
        kafka.topic_prefix,
    )
    await service.run()


if __name__ == "__main__":
    sys.exit(main())
