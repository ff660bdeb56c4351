"""The Upgrade Manager process: wiring of topics, heartbeat view, processor and metrics.

`bootstrap()` is the one wiring function; `UpgradeManagerService.run()` runs until
`request_stop()` (SIGTERM/SIGINT in `__main__`), then commits what it processed and stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from escalator.bus import EventPublisher, ensure_topics, make_producer
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent
from schemas.envelope import utcnow
from schemas.topics import TopicSpec
from services.upgrade_manager.claims import CLAIMS_SPEC, ClaimsView
from services.upgrade_manager.cloud_view import CloudView
from services.upgrade_manager.heartbeats import HeartbeatView
from services.upgrade_manager.processor import CampaignProcessor, Clock, ConsumerWrapper, Metrics
from services.upgrade_manager.routing import STATE_TOPIC
from services.upgrade_manager.settings import UpgradeManagerSettings

log = logging.getLogger("services.upgrade_manager")

ProducerFactory = Callable[[KafkaSettings], Any]

# The state topic as a catalogue-like spec, so that ensure_topics creates it compacted with the
# partition count of the (co-partitioned) inputs.
STATE_SPEC = TopicSpec(
    name=STATE_TOPIC,
    key_field="campaign_id",
    events=(),
    producers=(),
    consumers=(),
    description="Upgrade Manager state (internal)",
    compacted=True,
)


class UpgradeManagerService:
    def __init__(
        self,
        settings: UpgradeManagerSettings,
        kafka: KafkaSettings,
        *,
        clock: Clock,
        producer_factory: ProducerFactory,
        registry: CollectorRegistry | None,
        consumer_wrapper: ConsumerWrapper | None = None,
    ) -> None:
        self.settings = settings
        self._consumer_wrapper = consumer_wrapper
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
            self.processor.stop()

    async def run(self) -> None:
        started = time.monotonic()
        kafka = self.kafka
        await ensure_topics(kafka)
        await ensure_topics(kafka, (STATE_SPEC, CLAIMS_SPEC), dead_letters=False)
        producer = self._producer_factory(kafka)
        await producer.start()
        processor: CampaignProcessor | None = None

        async def dead_letter_view_record(record: Any, invalid: InvalidEvent) -> None:
            if processor is not None and processor.owns_partition(record.partition):
                await processor.dead_letter(
                    record, invalid.reason.value, invalid.detail, invalid.event_type
                )

        heartbeats = HeartbeatView(kafka, on_invalid=dead_letter_view_record)
        cloud = (
            CloudView(kafka, on_invalid=dead_letter_view_record) if self.settings.planner else None
        )
        claims = ClaimsView(kafka)
        try:
            await heartbeats.start()
            await claims.start()
            if cloud is not None:
                await cloud.start()
            processor = CampaignProcessor(
                self.settings,
                kafka,
                producer=producer,
                publisher=EventPublisher(producer, kafka),
                heartbeats=heartbeats,
                cloud=cloud,
                claims=claims,
                clock=self._clock,
                metrics=Metrics(self._registry),
                consumer_wrapper=self._consumer_wrapper,
            )
            processor.started_at = started
            self.processor = processor
            if self._stop.is_set():
                return
            log.info(
                "%s: joining group %s (%.2f s after start)",
                self.settings.instance_id,
                processor.group,
                time.monotonic() - started,
            )
            await processor.run()
        finally:
            if processor is not None:
                log.info("latency: %s", processor.latencies.summary())
            await heartbeats.stop()
            await claims.stop()
            if cloud is not None:
                await cloud.stop()
            await producer.stop()
            log.info("%s: stopped", self.settings.instance_id)


def bootstrap(
    settings: UpgradeManagerSettings,
    kafka: KafkaSettings | None = None,
    *,
    clock: Clock = utcnow,
    producer_factory: ProducerFactory = make_producer,
    registry: CollectorRegistry | None = None,
    serve_metrics: bool = False,
    consumer_wrapper: ConsumerWrapper | None = None,
) -> UpgradeManagerService:
    """The Upgrade Manager, ready to `run()`: Kafka settings from the environment by default.

    `producer_factory` builds the aiokafka producer for commands, state and dead letters
    (acks=all, idempotent where enabled). `serve_metrics` starts the Prometheus endpoint on
    `settings.metrics_port` (the default registry when `registry` is None).
    `consumer_wrapper` wraps the campaign-input consumer once built (tests: delivery faults).
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
        consumer_wrapper=consumer_wrapper,
    )
