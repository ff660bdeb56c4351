"""Publishing events onto the catalogue's topics, durably.

`publish` returns only once the broker acknowledged the record (acks="all" from
`make_producer`), so a handler that publishes and then returns has made its effects durable
before its consumer commits the offset it was handling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from escalator.settings import KafkaSettings
from schemas.codec import encode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.topics import DEAD_LETTERS_TOPIC, TopicSpec

__all__ = [
    "DEAD_LETTER_EVENT_TYPE",
    "DeadLetterSink",
    "EventPublisher",
    "ProducerPort",
    "event_headers",
]

log = logging.getLogger(__name__)

DEAD_LETTER_EVENT_TYPE = "DeadLetter"

Headers = list[tuple[str, bytes]]


class ProducerPort(Protocol):
    """What `EventPublisher` calls on an `AIOKafkaProducer` (a test double may stand in)."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[Any]: ...

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> Any: ...


class DeadLetterSink(Protocol):
    """Where `EventConsumer` sends records it cannot use (an `EventPublisher` is one)."""

    async def publish_dead_letter(self, dead: DeadLetter) -> Any: ...


def event_headers(event: Event) -> Headers:
    """Headers every Escalator record carries, for routers that do not parse JSON."""
    return [
        ("event_type", event.event_type.encode()),
        ("schema_version", str(event.schema_version).encode()),
    ]


class EventPublisher:
    """Publishes events to the topics that carry them, keyed as the catalogue says.

    The producer is started and stopped by its owner; one publisher may be shared by every
    handler of a service.
    """

    def __init__(self, producer: ProducerPort, settings: KafkaSettings) -> None:
        self._producer = producer
        self._settings = settings

    @property
    def settings(self) -> KafkaSettings:
        return self._settings

    def _prepare(self, event: Event, spec: TopicSpec) -> tuple[str, bytes, bytes, Headers]:
        if not spec.carries(event.event_type):
            raise ValueError(f"topic {spec.name} does not carry {event.event_type}")
        key = spec.key_for(event)
        return self._settings.topic(spec.name), key, encode(event), event_headers(event)

    async def publish(self, event: Event, spec: TopicSpec) -> Any:
        """Send `event` on `spec`'s topic and wait for the broker's acknowledgement.

        Raises ValueError (before sending anything) if the topic does not carry this event
        type or the event lacks the key field. Returns aiokafka's `RecordMetadata`.
        """
        topic, key, value, headers = self._prepare(event, spec)
        meta = await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
        log.debug(
            "published %s %s to %s[%s]",
            event.event_type,
            event.event_id,
            topic,
            getattr(meta, "partition", "?"),
        )
        return meta

    async def publish_many(self, items: Iterable[tuple[Event, TopicSpec]]) -> list[Any]:
        """Send several events (possibly to several topics), then wait for every ack.

        All events are checked before any is sent. Records are batched by the producer; records
        with the same key on the same topic keep their order. Returns the `RecordMetadata`s in
        input order; raises the first send error after all sends settled.
        """
        prepared = [self._prepare(event, spec) for event, spec in items]
        futures: list[asyncio.Future[Any]] = []
        for topic, key, value, headers in prepared:
            futures.append(await self._producer.send(topic, value=value, key=key, headers=headers))
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def publish_raw(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None]]
    ) -> list[Any]:
        """Send keyed raw values (None: a tombstone) to a full topic name; wait for every ack.

        For internal compacted topics whose values are not catalogue events.
        """
        futures = [await self._producer.send(topic, value=v, key=k) for k, v in records]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def publish_all(self, events: Sequence[Event], spec: TopicSpec) -> list[Any]:
        """`publish_many` for events that all go to one topic."""
        return await self.publish_many((event, spec) for event in events)

    async def publish_dead_letter(self, dead: DeadLetter) -> Any:
        """Send a `DeadLetter` to the dead-letter topic (keyed by source topic), wait for ack."""
        headers: Headers = [
            ("event_type", DEAD_LETTER_EVENT_TYPE.encode()),
            ("reason", dead.reason.encode()),
            ("source_topic", dead.source_topic.encode()),
            ("consumer_group", dead.consumer_group.encode()),
        ]
        return await self._producer.send_and_wait(
            self._settings.topic(DEAD_LETTERS_TOPIC),
            value=dead.model_dump_json().encode(),
            key=dead.source_topic.encode(),
            headers=headers,
        )


async def deliver_dead_letter(
    sink: DeadLetterSink,
    dead: DeadLetter,
    *,
    backoff_s: float = 0.1,
    backoff_max_s: float = 5.0,
    keep_trying: Callable[[], bool] = lambda: True,
) -> bool:
    """Publish `dead`, retrying with backoff until the broker acknowledges it.

    The record it stands for must not be committed before its dead letter is durable, so a
    failure is retried rather than dropped. Returns False only if `keep_trying()` turned false
    (the caller is stopping) before it was published.
    """
    delay = backoff_s
    while True:
        try:
            await sink.publish_dead_letter(dead)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "cannot dead-letter %s[%d]@%d yet: %r; retrying",
                dead.source_topic,
                dead.partition,
                dead.offset,
                exc,
            )
        if not keep_trying():
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max_s)
