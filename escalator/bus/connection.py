"""The one place that turns `KafkaSettings` into aiokafka clients.

Every producer, consumer and admin client of Escalator is built here, so that security settings
(SASL PLAIN/SCRAM, TLS) and broker-specific knobs chosen by the launcher apply everywhere alike.

Secrets: the SASL password and the TLS key password live in `KafkaSettings` as `SecretStr` and
are unwrapped only into the keyword arguments handed to aiokafka (the key password only while
the TLS context is built). `ClientKwargs` masks the SASL password in `repr`/`str`, and nothing
in this package logs client keyword arguments.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import TopicPartition

from escalator.settings import (
    MASK,
    SASL_PROTOCOLS,
    TLS_PROTOCOLS,
    KafkaSettings,
    SecretRedactingFilter,
    remember_secret,
)
from schemas.topics import ALL_TOPICS, DEAD_LETTERS_TOPIC, TopicSpec

__all__ = [
    "DEFAULT_LINGER_MS",
    "ClientKwargs",
    "client_kwargs",
    "describe_connection_failure",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "scrub_secrets",
    "topic_configs",
]

log = logging.getLogger(__name__)

# Small enough not to be noticed on a request/reply round trip, large enough to batch a burst.
DEFAULT_LINGER_MS = 5

_SECRET_KEYS = frozenset({"sasl_plain_password"})
_MASK = MASK


def _install_log_redaction() -> None:
    """aiokafka logs each request at DEBUG (a SASL PLAIN request holds the password) and
    connection errors at ERROR: filter every aiokafka logger."""
    redacting = SecretRedactingFilter()
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith("aiokafka")]
    for name in {"aiokafka", "aiokafka.conn", "aiokafka.client", *names}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, SecretRedactingFilter) for f in logger.filters):
            logger.addFilter(redacting)


_install_log_redaction()


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
    unset), for mutual TLS `ssl_certfile`/`ssl_keyfile` (an encrypted key with `ssl_password`),
    and `ssl_check_hostname`. SASL_PLAINTEXT/SASL_SSL: the mechanism (PLAIN, SCRAM-SHA-256,
    SCRAM-SHA-512) with username and password; aiokafka takes both as `sasl_plain_*` for every
    one of these mechanisms.

    `KafkaSettings` already refuses settings that do not fit together; the checks here only
    guard settings built without validation (`model_construct`). Errors never hold a secret.
    """
    protocol = settings.security_protocol
    kwargs = ClientKwargs(bootstrap_servers=settings.bootstrap_servers, security_protocol=protocol)
    if protocol in TLS_PROTOCOLS:
        kwargs["ssl_context"] = _ssl_context(settings)
    if protocol in SASL_PROTOCOLS:
        if settings.sasl_mechanism is None:
            raise ValueError(f"security_protocol {protocol} needs sasl_mechanism")
        if not settings.sasl_username or settings.sasl_password is None:
            mech = settings.sasl_mechanism
            raise ValueError(f"SASL {mech} needs sasl_username and sasl_password")
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        remember_secret(settings.sasl_password)
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise ValueError("ssl_keyfile is set without ssl_certfile")
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(settings, name)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"{name}: no such file", path)
    password = settings.ssl_password.get_secret_value() if settings.ssl_password else None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
            password=password,
        )
    except ssl.SSLError as exc:
        # OpenSSL's reason ("bad decrypt", "no certificate found") without the password
        names = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
        what = ", ".join(name for name in names if getattr(settings, name))
        hint = " (wrong ssl_password?)" if settings.ssl_keyfile or settings.ssl_certfile else ""
        raise ValueError(f"cannot load TLS files {what}: {exc.reason or exc}{hint}") from None
    context.check_hostname = settings.ssl_check_hostname
    return context


# --- clients whose failed start says why ---------------------------------------------------------
#
# aiokafka's `start()` fails with only "Unable to bootstrap from [...]" and logs the reason (e.g.
# an authentication failure) separately. The clients built here look the reason up once more and
# raise it with the error, without any secret, so that a wrong password or CA file reads as such.


async def describe_connection_failure(settings: KafkaSettings, timeout_s: float = 5.0) -> str:
    """Why a client with `settings` cannot connect, per bootstrap server ("" if all connect).

    One connection attempt (with the SASL handshake and TLS) per server; the text never holds
    a password.
    """
    from aiokafka.conn import create_conn

    kwargs = client_kwargs(settings)
    reasons: list[str] = []
    for hostport in settings.bootstrap_servers.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host.strip("[]"),
                    int(port),
                    request_timeout_ms=int(timeout_s * 1000),
                    ssl_context=kwargs.get("ssl_context"),
                    security_protocol=settings.security_protocol,
                    sasl_mechanism=kwargs.get("sasl_mechanism"),
                    sasl_plain_username=kwargs.get("sasl_plain_username"),
                    sasl_plain_password=kwargs.get("sasl_plain_password"),
                ),
                timeout=timeout_s,
            )
        except Exception as err:
            reasons.append(f"{hostport.strip()}: {_explain(err, settings, timeout_s)}")
        else:
            conn.close()
    return scrub_secrets("; ".join(reasons), settings)


def _explain(err: BaseException, settings: KafkaSettings, timeout_s: float) -> str:
    who = f"user {settings.sasl_username!r} with {settings.sasl_mechanism}"
    over = f"over {settings.security_protocol}"
    if isinstance(err, SaslAuthenticationFailed):
        # the broker's reason, e.g. "Authentication failed: Invalid username or password"
        detail = (str(err.args[0]) if err.args else "") or getattr(err, "message", "") or str(err)
        return (
            f"authentication failed for {who} {over} ({detail}); "
            "check sasl_username, sasl_password and sasl_mechanism"
        )
    if isinstance(err, UnsupportedSaslMechanismError):
        return f"the broker does not accept SASL {settings.sasl_mechanism} on this listener ({err})"
    if isinstance(err, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate was refused ({err.verify_message}); "
            "check ssl_cafile and ssl_check_hostname"
        )
    if isinstance(err, ssl.SSLError):
        return (
            f"TLS handshake failed ({err.reason or err}); is this a TLS listener, and does it "
            "require a client certificate (ssl_certfile/ssl_keyfile)?"
        )
    if isinstance(err, TimeoutError):
        return f"no answer within {timeout_s:g}s"
    if isinstance(err, ConnectionError | OSError) and not isinstance(err, KafkaError):
        return f"cannot connect ({err.strerror or err})"
    if isinstance(err, KafkaConnectionError):
        hint = f"does security_protocol {settings.security_protocol} match this listener"
        if settings.uses_tls and not settings.ssl_certfile:
            hint += ", and does it require a client certificate (ssl_certfile/ssl_keyfile)"
        return f"the connection was closed during the handshake ({err}); {hint}?"
    return f"{type(err).__name__}: {err}"


def scrub_secrets(text: str, settings: KafkaSettings) -> str:
    """`text` with any secret of `settings` replaced by a mask (a last line of defence)."""
    for secret in (settings.sasl_password, settings.ssl_password):
        value = secret.get_secret_value() if secret is not None else ""
        if value:
            text = text.replace(value, _MASK)
    return text


class _ExplainedStart:
    """Mixin: `start()` failing to bootstrap raises the reason found by
    `describe_connection_failure` (one extra connection attempt, only on failure)."""

    _escalator_settings: KafkaSettings

    async def _start_explained(self, start: Callable[[], Awaitable[None]]) -> None:
        try:
            await start()
        except KafkaConnectionError as exc:
            settings = self._escalator_settings
            try:
                reason = await describe_connection_failure(settings)
            except Exception:  # the diagnosis must never hide the original error
                reason = ""
            if not reason:
                raise
            raise KafkaConnectionError(
                f"cannot connect to Kafka ({settings.security_protocol}): {reason}"
            ) from exc


class _Producer(_ExplainedStart, AIOKafkaProducer):  # type: ignore[misc]
    def __init__(self, settings: KafkaSettings, **kwargs: Any) -> None:
        self._escalator_settings = settings
        super().__init__(**kwargs)

    async def start(self) -> None:
        await self._start_explained(super().start)


class _Consumer(_ExplainedStart, AIOKafkaConsumer):  # type: ignore[misc]
    def __init__(self, settings: KafkaSettings, *topics: str, **kwargs: Any) -> None:
        self._escalator_settings = settings
        super().__init__(*topics, **kwargs)

    async def start(self) -> None:
        await self._start_explained(super().start)


class _Admin(_ExplainedStart, AIOKafkaAdminClient):  # type: ignore[misc]
    def __init__(self, settings: KafkaSettings, **kwargs: Any) -> None:
        self._escalator_settings = settings
        super().__init__(**kwargs)

    async def start(self) -> None:
        await self._start_explained(super().start)


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
    return _Producer(settings, **kwargs)


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
    return _Consumer(settings, *topics, **kwargs)


def make_admin(settings: KafkaSettings, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (not started: `await admin.start()`, then `await admin.close()`)."""
    kwargs: dict[str, Any] = dict(client_kwargs(settings))
    kwargs.update(overrides)
    return _Admin(settings, **kwargs)


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
