"""The Upgrade Manager's faust app: the decision core over Kafka, its state in faust tables.

Wiring (see README.md for the why):

* **One agent** reads the four campaign-keyed, co-partitioned input topics (CAMPAIGNS,
  CLOUD_EVENTS, VNFM_EVENTS, NODE_EVENTS) and the internal TICKS topic, as raw bytes. Per record:
  `schemas.codec.decode` (an `InvalidEvent` goes to the dead-letter topic), `decide()`, publish
  the commands with `EventPublisher.publish_many` (acks=all, waits for every ack), THEN write the
  changed records to the tables. faust flushes its producer (the changelog records) before it
  commits offsets, so an offset is committed only after the record's effects are durable; a
  redelivered record is decided again and yields the same command ids (receivers dedupe).
* **Three tables** (memory store; the truth is in their compacted changelog topics, read back
  at every assignment): `plans` (campaign id -> `CampaignPlan`, written once), `status`
  (campaign id -> `CampaignRecord`, small) and `nodes` ("{campaign}/{node}" -> `NodeRecord`).
  A changelog record goes to the partition of the record being processed, which is the
  campaign's partition because every input (ticks included) is keyed and partitioned by
  campaign.
* **Ticks**: faust writes tables only from within an agent, so a ticker task publishes, every
  `tick_interval_s`, one tick record per owned running campaign to the ticks topic, in the
  campaign's partition (murmur2 of the campaign id, like every producer of the inputs); the
  agent handles it like an event (`decide(state, Tick(), ctx)`).
* **Cache and recovery**: a per-campaign `CampaignState` cache, rebuilt from the tables on first
  use (`domain.rebuild` re-derives what a partially persisted decision could leave
  inconsistent) and dropped whole when partitions are revoked. A cache miss of a running
  campaign first re-publishes `recover()`'s in-flight commands (same ids). Right after faust's
  table recovery (`on_rebalance_complete`) the ticker runs at once, so every owned running
  campaign is ticked, rebuilt and recovered within a few milliseconds of the assignment.
* **Ownership**: a campaign is owned by the instance that is assigned its partition of the input
  topics; faust's assignor gives the same partition number of every co-partitioned topic
  (inputs, ticks, changelogs) to one instance. The ticker ticks the running campaigns of the
  status table whose partition is among `app.assignor.assigned_actives()` for the ticks topic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import faust
from aiokafka.helpers import create_ssl_context
from prometheus_client import CollectorRegistry, Counter, Histogram

from escalator.bus import EventPublisher, ProducerPort, dead_letter_for, partition_for_key
from escalator.bus.consumer import HANDLER_ERROR, is_transient_error
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, decode
from schemas.events import NodeStep
from schemas.topics import DEAD_LETTERS_TOPIC
from services.upgrade_manager.domain import (
    CampaignPlan,
    CampaignRecord,
    CampaignState,
    CampaignStatus,
    Context,
    Decision,
    Input,
    Tick,
    decide,
    recover,
)
from services.upgrade_manager.heartbeats import HeartbeatView
from services.upgrade_manager.routing import (
    INPUT_TOPICS,
    NODES,
    OWN_OUTPUTS,
    PLANS,
    STATUS,
    TICKS_TOPIC,
    decode_tick,
    dump,
    encode_tick,
    load_state,
    node_key,
    routed,
)
from services.upgrade_manager.settings import UpgradeManagerSettings

log = logging.getLogger("services.upgrade_manager")

Clock = Callable[[], datetime]
_RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class _Record:
    """The fields of a consumed record `dead_letter_for` reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        prefix = "escalator_upgrade_manager"
        self.inputs = Counter(f"{prefix}_inputs", "Inputs handled.", ["kind"], registry=registry)
        self.commands = Counter(f"{prefix}_commands", "Commands published.", registry=registry)
        self.dead_letters = Counter(
            f"{prefix}_dead_letters", "Records dead-lettered.", ["reason"], registry=registry
        )
        self.latency = Histogram(
            f"{prefix}_input_to_publish_seconds",
            "From an input record's timestamp to its commands acknowledged.",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=registry,
        )


def faust_credentials(kafka: KafkaSettings) -> Any:
    """`KafkaSettings` security as faust `broker_credentials` (None for PLAINTEXT)."""
    protocol = kafka.security_protocol
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        ssl_context = create_ssl_context(
            cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile
        )
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        if kafka.sasl_mechanism is None or not kafka.sasl_username or not kafka.sasl_password:
            raise ValueError(f"security_protocol {protocol} needs a SASL mechanism and credentials")
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=ssl_context,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    return None


def make_faust_app(settings: UpgradeManagerSettings, kafka: KafkaSettings) -> faust.App:
    options: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(",")],
        "broker_credentials": faust_credentials(kafka),
        "store": "memory://",
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "processing_guarantee": "at_least_once",
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": kafka.session_timeout_ms / 1000,
        "broker_heartbeat_interval": kafka.heartbeat_interval_ms / 1000,
        "broker_max_poll_interval": kafka.max_poll_interval_ms / 1000,
        "broker_commit_interval": settings.commit_interval_s,
        "producer_acks": -1,
        "table_standby_replicas": settings.standby_replicas,
        "stream_recovery_delay": 0.0,
        "autodiscover": False,
        "web_enabled": settings.web_port is not None,
    }
    if settings.web_port is not None:
        options["web_port"] = settings.web_port
    if kafka.faust_producer_max_batch_size is not None:
        options["producer_max_batch_size"] = kafka.faust_producer_max_batch_size
    return faust.App(kafka.topic(settings.app_id), **options)


def changelog_topic(kafka: KafkaSettings, settings: UpgradeManagerSettings, table: str) -> str:
    """faust's name for a table's changelog: "{app id}-{table}-changelog"."""
    return f"{kafka.topic(settings.app_id)}-{table}-changelog"


class CampaignProcessor:
    """The faust app with its tables and agent, the ticker, and the per-campaign cache."""

    def __init__(
        self,
        settings: UpgradeManagerSettings,
        kafka: KafkaSettings,
        *,
        producer: ProducerPort,
        publisher: EventPublisher,
        heartbeats: HeartbeatView,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self._producer = producer
        self._publisher = publisher
        self._heartbeats = heartbeats
        self._clock = clock
        self.metrics = metrics
        self.group = kafka.topic(settings.app_id)
        self.ticks_topic = kafka.topic(TICKS_TOPIC)
        self.partitions = kafka.partitions
        self._cache: dict[str, CampaignState | None] = {}
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()
        self.rebalances = 0
        # (record timestamp -> handler start, handler start -> commands acknowledged), seconds,
        # for events that published commands.
        self.samples: deque[tuple[float, float]] = deque(maxlen=10_000)
        self._stopping = False
        self.started_at = time.monotonic()

        app = make_faust_app(settings, kafka)
        self.app = app
        raw: dict[str, Any] = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        table: dict[str, Any] = {
            "schema": faust.Schema(
                key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"
            ),
            "key_type": str,
            "value_type": bytes,
            "partitions": kafka.partitions,
        }
        self.plans = app.Table(PLANS, **table)
        self.status = app.Table(STATUS, **table)
        self.nodes = app.Table(NODES, **table)
        names = [kafka.topic(spec.name) for spec in INPUT_TOPICS] + [self.ticks_topic]
        channel = app.topic(*names, **raw)

        async def campaigns(stream: Any) -> None:
            async for event in stream.events():
                await self.handle(event.message, event.value)

        app.agent(channel, name="campaigns", concurrency=1)(campaigns)
        # mode's stubs want a `signal` keyword the handlers do not use.
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        app.on_rebalance_complete.connect(self._on_rebalance_complete)  # type: ignore[arg-type]

    # --- rebalances ----------------------------------------------------------------------

    async def _on_revoked(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        self.ready.clear()

    async def _on_rebalance_complete(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        self.rebalances += 1
        owned = sorted(self.owned_partitions())
        running = len(self.owned_running())
        log.info(
            "%s ready (rebalance %d, %.2f s since start): partitions %s, %d running campaign(s)",
            self.settings.instance_id,
            self.rebalances,
            time.monotonic() - self.started_at,
            owned,
            running,
        )
        self.ready.set()
        self._wake.set()

    def owned_partitions(self) -> set[int]:
        try:
            actives = self.app.assignor.assigned_actives()
        except Exception:
            return set()
        return {tp.partition for tp in actives if tp.topic == self.ticks_topic}

    def owned_running(self) -> list[str]:
        owned = self.owned_partitions()
        running: list[str] = []
        for campaign_id, raw in list(self.status.items()):
            if raw is None:
                continue
            if partition_for_key(campaign_id.encode(), self.partitions) not in owned:
                continue
            if not CampaignRecord.model_validate_json(raw).status.ended:
                running.append(campaign_id)
        return running

    # --- ticks ---------------------------------------------------------------------------

    async def ticker(self) -> None:
        interval = self.settings.tick_interval_s
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.ready.is_set():
                continue
            try:
                await self.send_ticks()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ticker: could not publish ticks; retrying next interval")

    async def send_ticks(self) -> int:
        now = self._clock()
        futures = []
        for campaign_id in self.owned_running():
            partition = partition_for_key(campaign_id.encode(), self.partitions)
            futures.append(
                await self._producer.send(
                    self.ticks_topic,
                    value=encode_tick(campaign_id, now),
                    key=campaign_id.encode(),
                    partition=partition,
                )
            )
        if futures:
            await asyncio.gather(*futures)
        return len(futures)

    # --- one record ----------------------------------------------------------------------

    async def handle(self, message: Any, value: bytes | None) -> None:
        """Decide on one record; never raises (except cancellation)."""
        record = _Record(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp=int(message.timestamp * 1000),
            key=message.key,
            value=value,
            headers=list(message.headers or ()),
        )
        try:
            await self._handle(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the adapter itself: dead-letter, never crash
            log.exception(
                "unexpected error on %s[%d]@%d", record.topic, record.partition, record.offset
            )
            await self._dead_letter(record, HANDLER_ERROR, f"{type(exc).__name__}: {exc}", None)

    async def _handle(self, record: _Record) -> None:
        inp: Input
        if record.topic == self.ticks_topic:
            campaign_id = decode_tick(record.value)
            if campaign_id is None:
                log.warning(
                    "ignored a malformed tick at %s[%d]@%d",
                    record.topic,
                    record.partition,
                    record.offset,
                )
                return
            inp, kind, event_type = Tick(), "tick", None
        else:
            decoded = decode(record.value)
            if isinstance(decoded, InvalidEvent):
                log.warning(
                    "invalid record %s[%d]@%d: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    decoded,
                )
                await self._dead_letter(
                    record, decoded.reason.value, decoded.detail, decoded.event_type
                )
                return
            if decoded.event_type in OWN_OUTPUTS or decoded.campaign_id is None:
                return
            campaign_id, inp, kind = decoded.campaign_id, decoded, decoded.event_type
            log.debug(
                "input %s[%d]@%d %s %s %s",
                record.topic,
                record.partition,
                record.offset,
                kind,
                getattr(decoded, "node_id", ""),
                decoded.event_id,
            )
            event_type = decoded.event_type
        attempt = 0
        failures = 0
        delay = self.settings.retry_backoff_s
        started = time.time()
        while True:
            attempt += 1
            try:
                published = await self._decide(campaign_id, inp)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._cache.pop(campaign_id, None)  # the tables are the truth
                if not is_transient_error(exc):
                    failures += 1
                if failures >= self.settings.handler_attempts or self._stopping:
                    log.error(
                        "%s for %s failed %d time(s); dead-lettering",
                        kind,
                        campaign_id,
                        attempt,
                        exc_info=exc,
                    )
                    await self._dead_letter(
                        record, HANDLER_ERROR, f"{type(exc).__name__}: {exc}", event_type
                    )
                    return
                log.warning(
                    "%s for %s failed (attempt %d): %r; retrying", kind, campaign_id, attempt, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        self.metrics.inputs.labels(kind if kind == "tick" else "event").inc()
        if published and kind != "tick":
            done = time.time()
            produced = record.timestamp / 1000
            self.metrics.latency.observe(max(0.0, done - produced))
            self.samples.append((started - produced, done - started))

    def _load(self, campaign_id: str) -> CampaignState | None:
        plan_raw = self.plans.get(campaign_id)
        status_raw = self.status.get(campaign_id)
        if plan_raw is None or status_raw is None:
            return None
        order = CampaignPlan.model_validate_json(plan_raw).node_order
        node_raw = {n: self.nodes.get(node_key(campaign_id, n)) for n in order}
        return load_state(plan_raw, status_raw, node_raw)

    async def _decide(self, campaign_id: str, inp: Input) -> int:
        """Decide, publish, persist; the number of commands published."""
        ctx = Context(now=self._clock(), agents=self._heartbeats.agents)
        published = 0
        if campaign_id in self._cache:
            state = self._cache[campaign_id]
        else:
            state = self._load(campaign_id)
            if state is not None and not state.campaign.status.ended:
                again = recover(state, ctx)
                if again:
                    await self._publisher.publish_many(routed(again))
                    published += len(again)
                    self.metrics.commands.inc(len(again))
                log.info(
                    "campaign %s %s: resumed, %d node(s) in cycle, %d in-flight command(s) "
                    "re-published",
                    campaign_id,
                    state.campaign.status.value,
                    len(state.campaign.active),
                    len(again),
                )
            self._cache[campaign_id] = state
        decision = decide(state, inp, ctx)
        if decision.commands:
            await self._publisher.publish_many(routed(decision.commands))
            published += len(decision.commands)
            self.metrics.commands.inc(len(decision.commands))
        self._persist(campaign_id, decision)
        self._cache[campaign_id] = decision.state
        self._log_changes(state, decision)
        return published

    def _persist(self, campaign_id: str, decision: Decision) -> None:
        state = decision.state
        if state is None:
            return
        for node_id in decision.changed_nodes:
            self.nodes[node_key(campaign_id, node_id)] = dump(state.nodes[node_id])
        if decision.plan_changed:
            self.plans[campaign_id] = dump(state.plan)
        if decision.campaign_changed or decision.plan_changed:
            self.status[campaign_id] = dump(state.campaign)

    def _log_changes(self, before: CampaignState | None, decision: Decision) -> None:
        after = decision.state
        if after is None:
            return
        campaign_id = after.campaign.campaign_id
        if before is None or before.campaign.status is not after.campaign.status:
            status = after.campaign.status
            extra = f": {after.campaign.reason}" if after.campaign.reason else ""
            if status is CampaignStatus.RUNNING and before is None:
                extra = f": {len(after.plan.node_order)} node(s) to {after.plan.target_version}"
            log.info("campaign %s %s%s", campaign_id, status.value, extra)
        if before is None:
            return
        for node_id in sorted(decision.changed_nodes):
            old, new = before.nodes.get(node_id), after.nodes[node_id]
            if old is None or old.step is not new.step:
                log.info(
                    "campaign %s node %s: %s -> %s (%s)",
                    campaign_id,
                    node_id,
                    old.step.value if old is not None else NodeStep.PENDING.value,
                    new.step.value,
                    new.detail,
                )

    async def _dead_letter(
        self, record: _Record, reason: str, detail: str, event_type: str | None
    ) -> None:
        dead = dead_letter_for(
            record,
            consumer_group=self.group,
            consumer=self.settings.instance_id,
            reason=reason,
            detail=detail,
            event_type=event_type,
        )
        delay = self.settings.retry_backoff_s
        while True:
            try:
                await self._publisher.publish_dead_letter(dead)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error(
                    "cannot dead-letter %s[%d]@%d: %r",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        self.metrics.dead_letters.labels(reason).inc()
        log.warning(
            "dead-lettered %s[%d]@%d to %s (%s)",
            record.topic,
            record.partition,
            record.offset,
            self.kafka.topic(DEAD_LETTERS_TOPIC),
            reason,
        )

    def latency_summary(self) -> str:
        if not self.samples:
            return "no event published a command"
        waits = sorted(w for w, _ in self.samples)
        works = sorted(h for _, h in self.samples)
        totals = sorted(w + h for w, h in self.samples)

        def pct(values: list[float], q: float) -> str:
            return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.1f}"

        return (
            f"{len(totals)} event(s) with commands: record -> commands acked "
            f"p50 {pct(totals, 0.5)} ms p99 {pct(totals, 0.99)} ms "
            f"(record -> handler p50 {pct(waits, 0.5)} p99 {pct(waits, 0.99)} ms; "
            f"handler p50 {pct(works, 0.5)} p99 {pct(works, 0.99)} ms)"
        )

    def stopping(self) -> None:
        self._stopping = True
        self._wake.set()
