"""The one place that turns `KafkaSettings` into aiokafka clients.

Every producer, consumer and admin client of Escalator is built here, so that security settings
(SASL PLAIN/SCRAM, TLS) and broker-specific knobs chosen by the launcher apply everywhere alike.

Secrets: the SASL password lives in `KafkaSettings` as a `SecretStr` and is unwrapped only into
the keyword arguments handed to aiokafka. `ClientKwargs` masks it in `repr`/`str`, and nothing in
this package logs client keyword arguments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import TopicPartition

from escalator.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, DEAD_LETTERS_TOPIC, TopicSpec

__all__ = [
    "DEFAULT_LINGER_MS",
    "ClientKwargs",
    "client_kwargs",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "topic_configs",
]

log = logging.getLogger(__name__)

# Small enough not to be noticed on a request/reply round trip, large enough to batch a burst.
DEFAULT_LINGER_MS = 5

_SECRET_KEYS = frozenset({"sasl_plain_password"})
_MASK = "**********"


class ClientKwargs(dict[str, Any]):
    """Keyword arguments for aiokafka clients; `repr`/`str` mask the SASL password."""

    def _masked(self) -> dict[str, Any]:
        return {k: (_MASK if k in _SECRET_KEYS and v is not None else v) for k, v in self.items()}

    def __repr__(self) -> str:
        return f"ClientKwargs({self._masked()!r})"

    __str__ = __repr__


def client_kwargs(settings: KafkaSettings) -> ClientKwargs:
    """Connection and security arguments common to producers, consumers and admin clients.

    PLAINTEXT: bootstrap servers only. SSL: a TLS context from `ssl_cafile` (system CAs if
    unset) and, for mutual TLS, `ssl_certfile`/`ssl_keyfile`. SASL_PLAINTEXT/SASL_SSL: the
    mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) with username and password; aiokafka takes
    both as `sasl_plain_*` for every one of these mechanisms.
    """
    protocol = settings.security_protocol
    kwargs = ClientKwargs(bootstrap_servers=settings.bootstrap_servers, security_protocol=protocol)
    if protocol in ("SSL", "SASL_SSL"):
        if settings.ssl_keyfile and not settings.ssl_certfile:
            raise ValueError("ssl_keyfile is set without ssl_certfile")
        kwargs["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        if settings.sasl_mechanism is None:
            raise ValueError(f"security_protocol {protocol} needs sasl_mechanism")
        if not settings.sasl_username or settings.sasl_password is None:
            mech = settings.sasl_mechanism
            raise ValueError(f"SASL {mech} needs sasl_username and sasl_password")
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for all in-sync replicas (acks="all"); idempotent where enabled.

    Not started: `await producer.start()` (and `stop()`) is the caller's job.
    """
    kwargs: dict[str, Any] = dict(client_kwargs(settings))
    kwargs.update(
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=DEFAULT_LINGER_MS,
    )
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def make_consumer(
    settings: KafkaSettings, group_id: str | None, *topics: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits (the caller commits after its effects are durable).

    `group_id=None` gives a group-less consumer (manual assignment, no commits), e.g. for
    read-back. With `topics` it subscribes to them (group rebalancing); without, assign manually.
    Not started: `await consumer.start()` (and `stop()`) is the caller's job.
    """
    kwargs: dict[str, Any] = dict(client_kwargs(settings))
    kwargs.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
    )
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topics, **kwargs)


def make_admin(settings: KafkaSettings, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (not started: `await admin.start()`, then `await admin.close()`)."""
    kwargs: dict[str, Any] = dict(client_kwargs(settings))
    kwargs.update(overrides)
    return AIOKafkaAdminClient(**kwargs)


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    """Topic-level configs Escalator sets when it creates the topic of `spec`."""
    return {"cleanup.policy": "compact"} if spec.compacted else {}


async def ensure_topics(
    settings: KafkaSettings, specs: Iterable[TopicSpec] = ALL_TOPICS, *, dead_letters: bool = True
) -> list[str]:
    """Create the catalogue topics (prefixed names) and the dead-letter topic if missing.

    Uses `settings.partitions` and `settings.replication_factor`; compacted specs get
    `cleanup.policy=compact`. Topics that already exist are left as they are (their partition
    count and configs are not checked or changed). Returns the names that were created now.
    """
    wanted: dict[str, dict[str, str]] = {settings.topic(s.name): topic_configs(s) for s in specs}
    if dead_letters:
        wanted.setdefault(settings.topic(DEAD_LETTERS_TOPIC), {})
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        new_topics = [
            NewTopic(
                name=name,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=wanted[name],
            )
            for name in missing
        ]
        response = await admin.create_topics(new_topics)
    finally:
        await admin.close()
    created: list[str] = []
    failures: list[str] = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        error = for_code(code)
        if code == 0:
            created.append(name)
        elif error.__name__ == "TopicAlreadyExistsError":
            log.debug("topic %s already exists (created concurrently)", name)
        else:
            failures.append(f"{name}: {error.__name__} {message or ''}".strip())
    if failures:
        raise KafkaError("could not create topics: " + "; ".join(failures))
    if created:
        await _wait_for_leaders(settings, created)
        log.info("created topics %s", ", ".join(created))
    return created


async def _wait_for_leaders(
    settings: KafkaSettings, topics: list[str], timeout_s: float = 15.0
) -> None:
    """Wait until every partition of new topics has a leader, so that the first sends are not
    refused with NotLeaderForPartition (each refusal is a retry and a warning in the logs)."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(**client_kwargs(settings))
    await client.bootstrap()
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            metadata = await client.fetch_all_metadata()
            ready = all(
                (parts := metadata.partitions_for_topic(topic))
                and all(
                    metadata.leader_for_partition(TopicPartition(topic, p)) not in (None, -1)
                    for p in parts
                )
                for topic in topics
            )
            if ready:
                return
            await asyncio.sleep(0.1)
        log.warning("topics %s have partitions without a leader after %ss", topics, timeout_s)
    finally:
        await client.close()
