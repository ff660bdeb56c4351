"""Kafka security against a real Apache Kafka: SASL PLAIN, SCRAM-SHA-256/512, TLS and mutual TLS.

One separate JVM broker for the whole module (`start_jvm_broker(security="sasl")`): listeners
SASL_PLAINTEXT, SASL_SSL and SSL (client certificate required), with a CA made for it (TLS
cases are skipped, with the reason, where `openssl` is missing). The session's default broker is
not used and not touched.

Each case goes through the one client factory (`make_admin`/`make_producer`/`make_consumer`):
an `EventPublisher` round trip with a consumer group works with the right credentials, and a
wrong password fails with an error that says so, without the password in it or in the logs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr

from escalator import broker as launcher
from escalator.broker import BrokerHandle, BrokerSecurity, start_jvm_broker
from escalator.bus.connection import ensure_topics, make_consumer, make_producer
from escalator.bus.publisher import EventPublisher
from escalator.settings import KafkaSettings
from schemas.codec import decode
from schemas.events import VnfProfile, VnfRegistered
from schemas.topics import VNF_REGISTRY

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WRONG = "Wrong-5d0c9e1a-Password"

SASL_CASES = [
    ("SASL_PLAINTEXT", "PLAIN"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-512"),
    ("SASL_SSL", "PLAIN"),
    ("SASL_SSL", "SCRAM-SHA-256"),
    ("SASL_SSL", "SCRAM-SHA-512"),
]
ALL_CASES = [*SASL_CASES, ("SSL", None)]


def case_id(case: tuple[str, str | None]) -> str:
    return "-".join(part for part in case if part)


@pytest.fixture(scope="module")
def secure_kafka() -> Iterator[BrokerHandle]:
    if launcher._java_major() is None:
        pytest.skip("no `java` on PATH: cannot run Apache Kafka")
    probe = launcher._probe_kafka()
    if not probe.ok:
        pytest.skip(f"Apache Kafka cannot run here: {probe.reason}")
    handle = start_jvm_broker("sasl", users={"alice": "Alice-pw-4b7e", "bob": "Bob-pw-91c3"})
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def security(secure_kafka: BrokerHandle) -> BrokerSecurity:
    assert secure_kafka.security is not None
    return secure_kafka.security


def settings_for(
    security: BrokerSecurity, protocol: str, mechanism: str | None, **extra: Any
) -> KafkaSettings:
    if protocol != "SASL_PLAINTEXT" and not security.tls:
        pytest.skip("the secure broker has no TLS listeners here (no `openssl`)")
    prefix = f"sec{uuid.uuid4().hex[:8]}."
    return security.client_settings(protocol, mechanism, topic_prefix=prefix, **extra)


def test_broker_offers_the_listeners(secure_kafka: BrokerHandle) -> None:
    security = secure_kafka.security
    assert security is not None
    assert "SASL PLAIN/SCRAM" in secure_kafka.description
    assert set(security.listeners) >= {"SASL_PLAINTEXT"}
    assert security.mechanisms == ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    # passwords stay out of the handle's repr
    for password in security.users.values():
        assert password not in repr(secure_kafka)
    if security.client_key_password:
        assert security.client_key_password not in repr(secure_kafka)


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
async def test_round_trip(
    security: BrokerSecurity, case: tuple[str, str | None], caplog: pytest.LogCaptureFixture
) -> None:
    protocol, mechanism = case
    settings = settings_for(security, protocol, mechanism)
    created = await ensure_topics(settings, [VNF_REGISTRY], dead_letters=False)  # admin client
    assert created == [settings.topic(VNF_REGISTRY.name)]
    event = VnfRegistered(
        vnf=VnfProfile(
            vnf_id=f"vnf-{case_id(case)}",
            vnfm_id="vnfm-a",
            redundancy="active_standby",
            members=("vm-1", "vm-2"),
            min_in_service=1,
            max_unavailable=1,
        ),
        producer="security-test",
    )
    producer = make_producer(settings)
    await producer.start()
    try:
        await EventPublisher(producer, settings).publish(event, VNF_REGISTRY)
    finally:
        await producer.stop()
    topic = settings.topic(VNF_REGISTRY.name)
    consumer = make_consumer(settings, f"g-{uuid.uuid4().hex[:8]}", topic)
    await consumer.start()
    try:
        got = None
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    got = decode(record.value)
        assert isinstance(got, VnfRegistered) and got.event_id == event.event_id
        await consumer.commit()  # the group coordinator is reachable with these credentials
    finally:
        await consumer.stop()
    for password in security.users.values():
        assert password not in caplog.text


@pytest.mark.parametrize("case", SASL_CASES, ids=case_id)
async def test_wrong_password_is_refused_clearly(
    security: BrokerSecurity, case: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    protocol, mechanism = case
    settings = settings_for(security, protocol, mechanism, username="alice", password=WRONG)
    caplog.set_level(logging.DEBUG)
    for client in (make_producer(settings), make_consumer(settings, "g-wrong", "any-topic")):
        with pytest.raises(KafkaConnectionError) as info:
            await client.start()
        await client.stop()
        message = str(info.value)
        assert f"authentication failed for user 'alice' with {mechanism} over {protocol}" in (
            message
        ), message
        assert "check sasl_username, sasl_password and sasl_mechanism" in message
        assert WRONG not in message
    assert WRONG not in caplog.text
    # the right password of another user is no better
    other = settings_for(
        security, protocol, mechanism, username="alice", password=security.users["bob"]
    )
    producer = make_producer(other)
    with pytest.raises(KafkaConnectionError, match="authentication failed"):
        await producer.start()
    await producer.stop()


async def test_tls_needs_the_right_ca_and_a_client_certificate(
    security: BrokerSecurity, tmp_path: Path
) -> None:
    if not security.tls:
        pytest.skip("the secure broker has no TLS listeners here (no `openssl`)")
    # SASL_SSL with the system CAs only: the broker's certificate is refused
    untrusted = settings_for(security, "SASL_SSL", "SCRAM-SHA-512", ssl_cafile=None)
    producer = make_producer(untrusted)
    with pytest.raises(KafkaConnectionError, match="TLS: the broker's certificate was refused"):
        await producer.start()
    await producer.stop()
    # the SSL listener requires a client certificate
    anonymous = settings_for(
        security, "SSL", None, ssl_certfile=None, ssl_keyfile=None, ssl_password=None
    )
    producer = make_producer(anonymous)
    with pytest.raises(KafkaConnectionError, match=r"require a client certificate"):
        await producer.start()
    await producer.stop()


def run(argv: list[str], settings: KafkaSettings) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ESCALATOR_KAFKA_")}
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
        env={**inherited, **settings.to_env(), "COLUMNS": "250"},
    )


def test_child_processes_get_the_credentials_and_never_print_them(
    security: BrokerSecurity, tmp_path: Path
) -> None:
    """`to_env()` carries the secrets to child processes (the CLI here), which use them and
    print no secret; a service with a wrong password stops with a readable reason."""
    protocol = "SASL_SSL" if security.tls else "SASL_PLAINTEXT"
    settings = settings_for(security, protocol, "SCRAM-SHA-256", username="bob")
    password = security.users["bob"]
    profiles = tmp_path / "vnfs.json"
    profiles.write_text(
        json.dumps(
            [
                {
                    "vnf_id": "vnf-sec",
                    "vnfm_id": "vnfm-a",
                    "redundancy": "active_standby",
                    "members": ["vm-1", "vm-2"],
                    "min_in_service": 1,
                    "max_unavailable": 1,
                }
            ]
        )
    )
    loaded = run(["-m", "escalator", "registry", "load", str(profiles)], settings)
    assert loaded.returncode == 0, loaded.stderr
    listed = run(["-m", "escalator", "registry", "list", "--json"], settings)
    assert listed.returncode == 0, listed.stderr
    assert [p["vnf_id"] for p in json.loads(listed.stdout)] == ["vnf-sec"]
    for result in (loaded, listed):
        assert password not in result.stdout + result.stderr

    # PLAIN: its authentication request holds the password itself (aiokafka logs requests at
    # DEBUG; the service's log must show neither the wrong password nor the right one)
    wrong = settings.model_copy(
        update={"sasl_password": SecretStr(WRONG), "sasl_mechanism": "PLAIN"}
    )
    service = run(
        ["-m", "services.cloud_manager", "--world", "http://127.0.0.1:9", "--log-level", "DEBUG"],
        wrong,
    )
    output = service.stdout + service.stderr
    assert service.returncode != 0, output
    assert "authentication failed for user 'bob' with PLAIN" in output, output[-2000:]
    assert "SaslAuthenticateRequest_v1(<SASL payload hidden>)" in output  # it was logged, hidden
    assert WRONG not in output and password not in output
