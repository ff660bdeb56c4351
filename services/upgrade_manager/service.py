"""The Upgrade Manager process: wiring of topics, heartbeat view, faust app, ticker and metrics.

`bootstrap()` is the one wiring function; `UpgradeManagerService.run()` runs until
`request_stop()` (SIGTERM/SIGINT in `__main__`), then stops faust gracefully (it commits what it
processed) and the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from escalator.bus import EventPublisher, ensure_topics, make_admin, make_producer
from escalator.settings import KafkaSettings
from schemas.envelope import utcnow
from services.upgrade_manager.app import CampaignProcessor, Clock, Metrics, changelog_topic
from services.upgrade_manager.heartbeats import HeartbeatView
from services.upgrade_manager.routing import TABLES, TICKS_RETENTION_MS, TICKS_TOPIC
from services.upgrade_manager.settings import UpgradeManagerSettings

log = logging.getLogger("services.upgrade_manager")

ProducerFactory = Callable[[KafkaSettings], Any]


async def ensure_internal_topics(kafka: KafkaSettings, settings: UpgradeManagerSettings) -> None:
    """The ticks topic (short retention) and the tables' changelogs (compacted), co-partitioned.

    Created before faust starts: faust checks a table's changelog partition count against the
    consumer's metadata snapshot, which holds 0 partitions for a topic created after the
    consumer subscribed (faust would create it itself, too late for that check).
    """
    wanted = {kafka.topic(TICKS_TOPIC): {"retention.ms": str(TICKS_RETENTION_MS)}}
    for table in TABLES:
        wanted[changelog_topic(kafka, settings, table)] = {"cleanup.policy": "compact"}
    admin = make_admin(kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return
        response = await admin.create_topics(
            [
                NewTopic(
                    name=name,
                    num_partitions=kafka.partitions,
                    replication_factor=kafka.replication_factor,
                    topic_configs=wanted[name],
                )
                for name in missing
            ]
        )
        for entry in response.topic_errors:
            if entry[1] not in (0, TopicAlreadyExistsError.errno):
                raise RuntimeError(f"could not create {entry[0]}: error {entry[1]} {entry[2:]}")
    finally:
        await admin.close()


class UpgradeManagerService:
    def __init__(
        self,
        settings: UpgradeManagerSettings,
        kafka: KafkaSettings,
        *,
        clock: Clock,
        producer_factory: ProducerFactory,
        registry: CollectorRegistry | None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self._clock = clock
        self._producer_factory = producer_factory
        self._registry = registry
        self._stop = asyncio.Event()
        self.processor: CampaignProcessor | None = None

    def request_stop(self) -> None:
        log.info("%s: stop requested", self.settings.instance_id)
        self._stop.set()
        if self.processor is not None:
            self.processor.stopping()

    async def run(self) -> None:
        started = time.monotonic()
        kafka = self.kafka
        await ensure_topics(kafka)
        await ensure_internal_topics(kafka, self.settings)
        producer = self._producer_factory(kafka)
        await producer.start()
        heartbeats = HeartbeatView(kafka)
        ticker: asyncio.Task[None] | None = None
        app_started = False
        try:
            await heartbeats.start()
            processor = CampaignProcessor(
                self.settings,
                kafka,
                producer=producer,
                publisher=EventPublisher(producer, kafka),
                heartbeats=heartbeats,
                clock=self._clock,
                metrics=Metrics(self._registry),
            )
            processor.started_at = started
            self.processor = processor
            if self._stop.is_set():
                return
            await processor.app.start()
            app_started = True
            log.info(
                "%s: faust app %s started in %.2f s; waiting for partitions",
                self.settings.instance_id,
                processor.group,
                time.monotonic() - started,
            )
            ticker = asyncio.get_running_loop().create_task(processor.ticker(), name="ticker")
            stop = asyncio.get_running_loop().create_task(self._stop.wait())
            crashed = asyncio.get_running_loop().create_task(_wait_crashed(processor.app))
            done, _ = await asyncio.wait({stop, crashed}, return_when=asyncio.FIRST_COMPLETED)
            for task in (stop, crashed):
                task.cancel()
            if crashed in done and not self._stop.is_set():
                raise RuntimeError("the faust app crashed") from processor.app._crash_reason
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            if self.processor is not None:
                log.info("latency: %s", self.processor.latency_summary())
            if app_started and self.processor is not None:
                await self.processor.app.stop()
            await heartbeats.stop()
            await producer.stop()
            log.info("%s: stopped", self.settings.instance_id)


async def _wait_crashed(app: Any) -> None:
    # mode sets a flag, not an awaitable, when a service crashes.
    while not app.crashed:  # noqa: ASYNC110
        await asyncio.sleep(0.5)


def bootstrap(
    settings: UpgradeManagerSettings,
    kafka: KafkaSettings | None = None,
    *,
    clock: Clock = utcnow,
    producer_factory: ProducerFactory = make_producer,
    registry: CollectorRegistry | None = None,
    serve_metrics: bool = False,
) -> UpgradeManagerService:
    """The Upgrade Manager, ready to `run()`: Kafka settings from the environment by default.

    `producer_factory` builds the aiokafka producer for commands, ticks and dead letters
    (acks=all, idempotent where enabled). `serve_metrics` starts the Prometheus endpoint on
    `settings.metrics_port` (the default registry when `registry` is None).
    """
    kafka = kafka if kafka is not None else KafkaSettings()
    if serve_metrics and settings.metrics_port is not None:
        start_http_server(settings.metrics_port, registry=registry or REGISTRY)
    return UpgradeManagerService(
        settings,
        kafka,
        clock=clock,
        producer_factory=producer_factory,
        registry=registry if registry is not None else REGISTRY,
    )
