"""The broker launcher's decisions, without starting any broker."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from escalator import broker as launcher
from escalator.broker import (
    AUTO_ORDER,
    BrokerHandle,
    BrokerModeError,
    BrokerUnavailable,
    Probe,
    choose_brokers,
    parse_mode,
    settings_for,
    start_broker,
)

pytestmark = pytest.mark.unit

OK = Probe(True)


def no(reason: str = "absent") -> Probe:
    return Probe(False, reason)


def probes(calls: list[str] | None = None, **results: Probe) -> dict[str, Callable[[], Probe]]:
    """Probe functions for every kind; unnamed kinds are unavailable. Records calls."""

    def make(kind: str) -> Callable[[], Probe]:
        def probe() -> Probe:
            if calls is not None:
                calls.append(kind)
            return results.get(kind, no(f"{kind} absent"))

        return probe

    return {kind: make(kind) for kind in AUTO_ORDER}


# ---- mode parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "external", "testcontainers", "kafka", "tansu"])
def test_known_modes_parse(mode: str) -> None:
    assert parse_mode(mode, env={}) == mode


def test_mode_is_case_and_space_insensitive() -> None:
    assert parse_mode("  Kafka ", env={}) == "kafka"


def test_missing_mode_comes_from_env_then_auto() -> None:
    assert parse_mode(None, env={}) == "auto"
    assert parse_mode(None, env={"ESCALATOR_BROKER": "tansu"}) == "tansu"
    assert parse_mode("", env={"ESCALATOR_BROKER": ""}) == "auto"
    # an explicit argument wins over the environment
    assert parse_mode("kafka", env={"ESCALATOR_BROKER": "tansu"}) == "kafka"


def test_missing_mode_reads_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALATOR_BROKER", "TANSU")
    assert parse_mode() == "tansu"


@pytest.mark.parametrize("bad", ["redpanda", "jvm", "auto,tansu"])
def test_unknown_mode_is_a_clear_error(bad: str) -> None:
    with pytest.raises(BrokerModeError) as info:
        parse_mode(bad, env={})
    message = str(info.value)
    assert repr(bad) in message
    for mode in ("auto", "external", "testcontainers", "kafka", "tansu"):
        assert mode in message
    # it is both a launcher error and a ValueError
    assert isinstance(info.value, BrokerUnavailable)
    assert isinstance(info.value, ValueError)


def test_unknown_mode_from_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALATOR_BROKER", "zookeeper")
    with pytest.raises(BrokerModeError, match="ESCALATOR_BROKER"):
        start_broker(log=None)


# ---- selection order -------------------------------------------------------------------------


def test_auto_order_is_external_docker_jvm_tansu() -> None:
    assert AUTO_ORDER == ("external", "testcontainers", "kafka", "tansu")


def test_auto_external_wins_alone_and_nothing_else_is_probed() -> None:
    calls: list[str] = []
    got = choose_brokers("auto", probes(calls, external=OK, testcontainers=OK, kafka=OK, tansu=OK))
    assert got == ["external"]
    assert calls == ["external"]


def test_auto_lists_every_available_kind_in_order() -> None:
    got = choose_brokers("auto", probes(testcontainers=OK, kafka=OK, tansu=OK))
    assert got == ["testcontainers", "kafka", "tansu"]


def test_auto_without_docker_picks_jvm_kafka_then_tansu() -> None:
    got = choose_brokers("auto", probes(kafka=OK, tansu=OK))
    assert got == ["kafka", "tansu"]


def test_auto_with_only_tansu() -> None:
    assert choose_brokers("auto", probes(tansu=OK)) == ["tansu"]


def test_auto_with_nothing_explains_every_reason() -> None:
    with pytest.raises(BrokerUnavailable) as info:
        choose_brokers("auto", probes())
    for kind in AUTO_ORDER:
        assert f"{kind} absent" in str(info.value)


@pytest.mark.parametrize("kind", AUTO_ORDER)
def test_forced_mode_probes_only_itself(kind: str) -> None:
    calls: list[str] = []
    everything = {k: OK for k in AUTO_ORDER}
    assert choose_brokers(kind, probes(calls, **everything)) == [kind]
    assert calls == [kind]


def test_forced_mode_that_is_unavailable_is_an_error_not_a_fallback() -> None:
    with pytest.raises(BrokerUnavailable, match=r"ESCALATOR_BROKER=kafka.*no java here"):
        choose_brokers("kafka", probes(kafka=no("no java here"), tansu=OK))


# ---- start failures: fall through in auto, error when forced ---------------------------------


def _fake_handle(kind: str) -> BrokerHandle:
    return BrokerHandle(kind, "127.0.0.1:1", settings_for(kind, "127.0.0.1:1"), f"fake {kind}")


def _failing(_say: object, _timeout: float) -> BrokerHandle:
    raise BrokerUnavailable("JVM died")


def test_auto_falls_through_when_a_broker_fails_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(launcher._STARTERS, "kafka", _failing)
    monkeypatch.setitem(launcher._STARTERS, "tansu", lambda _s, _t: _fake_handle("tansu"))
    lines: list[str] = []
    handle = start_broker("auto", log=lines.append, probes=probes(kafka=OK, tansu=OK))
    assert handle.kind == "tansu"
    assert any("kafka could not start" in line and "JVM died" in line for line in lines)
    assert lines[-1] == "escalator: broker = fake tansu at 127.0.0.1:1"


def test_forced_broker_that_fails_to_start_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(launcher._STARTERS, "kafka", _failing)
    monkeypatch.setitem(launcher._STARTERS, "tansu", lambda _s, _t: _fake_handle("tansu"))
    with pytest.raises(BrokerUnavailable, match="JVM died"):
        start_broker("kafka", log=None, probes=probes(kafka=OK, tansu=OK))


def test_dead_external_broker_is_not_replaced_by_a_local_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def dead(_s: object, _t: float) -> BrokerHandle:
        raise BrokerUnavailable("KAFKA_BOOTSTRAP_SERVERS=x does not answer")

    monkeypatch.setitem(launcher._STARTERS, "external", dead)
    monkeypatch.setitem(launcher._STARTERS, "tansu", lambda _s, _t: _fake_handle("tansu"))
    with pytest.raises(BrokerUnavailable, match="does not answer"):
        start_broker("auto", log=None, probes=probes(external=OK, tansu=OK))


# ---- the Docker pre-check falls through fast -------------------------------------------------


def test_docker_client_raising_means_no_testcontainers() -> None:
    class Boom(Exception):
        pass

    def factory() -> object:
        raise Boom("Error while fetching server API version")

    probe = launcher._probe_testcontainers(factory)
    assert not probe.ok
    assert "Docker" in probe.reason


def test_docker_ping_failing_means_no_testcontainers() -> None:
    class Client:
        closed = False

        def ping(self) -> bool:
            raise ConnectionError("connection refused")

        def close(self) -> None:
            Client.closed = True

    assert not launcher._probe_testcontainers(Client).ok
    assert Client.closed


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "docker_host", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:{port}"]
)
def test_dead_docker_host_falls_through_quickly(
    monkeypatch: pytest.MonkeyPatch, docker_host: str
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_host.format(port=_closed_port()))
    started = time.monotonic()
    probe = launcher._probe_testcontainers()
    elapsed = time.monotonic() - started
    assert not probe.ok
    assert elapsed < 1.0, f"Docker pre-check took {elapsed:.2f}s"


def test_auto_skips_dead_docker_and_picks_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{_closed_port()}")
    real = launcher.default_probes()
    fake = probes(kafka=OK, tansu=OK)
    fake["testcontainers"] = real["testcontainers"]
    started = time.monotonic()
    assert choose_brokers("auto", fake) == ["kafka", "tansu"]
    assert time.monotonic() - started < 1.0


def test_external_probe_follows_env() -> None:
    assert launcher._probe_external({"KAFKA_BOOTSTRAP_SERVERS": "h:9092"}).ok
    assert not launcher._probe_external({"KAFKA_BOOTSTRAP_SERVERS": "  "}).ok
    assert not launcher._probe_external({}).ok


# ---- client settings per broker --------------------------------------------------------------


def test_tansu_settings_avoid_its_gaps() -> None:
    s = settings_for("tansu", "127.0.0.1:5")
    assert s.bootstrap_servers == "127.0.0.1:5"
    assert s.broker_kind == "tansu"
    assert s.enable_idempotence is False
    assert s.enable_transactions is False
    assert s.fetch_max_wait_ms == 20
    assert s.session_timeout_ms == 3000
    assert s.heartbeat_interval_ms == 1000
    assert s.faust_producer_max_batch_size == 1
    env = s.to_env()
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:5"
    assert env["ESCALATOR_KAFKA_ENABLE_IDEMPOTENCE"] == "false"
    assert env["ESCALATOR_KAFKA_FAUST_PRODUCER_MAX_BATCH_SIZE"] == "1"
    assert env["ESCALATOR_KAFKA_BROKER_KIND"] == "tansu"


@pytest.mark.parametrize("kind", ["kafka", "testcontainers"])
def test_real_kafka_settings(kind: str) -> None:
    s = settings_for(kind, "127.0.0.1:6")
    assert s.broker_kind == kind
    assert s.enable_idempotence is True
    assert s.enable_transactions is True
    assert 1 <= s.fetch_max_wait_ms <= 100
    assert s.session_timeout_ms == 6000
    assert s.heartbeat_interval_ms == 1000
    assert s.faust_producer_max_batch_size is None


def test_launched_broker_settings_ignore_stale_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # a shell that exported a Tansu broker's settings, then starts a JVM Kafka
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("ESCALATOR_KAFKA_ENABLE_IDEMPOTENCE", "false")
    monkeypatch.setenv("ESCALATOR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ESCALATOR_KAFKA_TOPIC_PREFIX", "team1.")
    s = settings_for("kafka", "127.0.0.1:7")
    assert s.bootstrap_servers == "127.0.0.1:7"
    assert s.enable_idempotence is True
    assert s.security_protocol == "PLAINTEXT"
    assert s.topic_prefix == "team1."  # not broker-specific: still from the environment


def test_external_settings_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALATOR_KAFKA_ENABLE_IDEMPOTENCE", "false")
    monkeypatch.setenv("ESCALATOR_KAFKA_FETCH_MAX_WAIT_MS", "20")
    s = settings_for("external", "h:1")
    assert s.broker_kind == "external"
    assert s.enable_idempotence is False
    assert s.fetch_max_wait_ms == 20


def test_server_properties_single_node_kraft(tmp_path: object) -> None:
    from pathlib import Path

    props = dict(
        line.split("=", 1)
        for line in launcher._server_properties(Path("/x"), 1111, 2222).splitlines()
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:2222"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "true"
    assert props["num.partitions"] == "6"
    assert props["log.dirs"].startswith("/x/")


def test_kafka_version_comes_from_the_pom() -> None:
    assert launcher.kafka_version().startswith("4.")


def test_stop_is_idempotent() -> None:
    calls: list[int] = []
    handle = BrokerHandle(
        "tansu",
        "127.0.0.1:1",
        settings_for("tansu", "127.0.0.1:1"),
        "fake",
        _stopper=launcher._Stopper(lambda: calls.append(1)),
    )
    assert handle.alive()
    handle.stop()
    handle.stop()
    assert calls == [1]
    assert not handle.alive()


def test_kraft_cluster_ids_never_start_with_a_dash() -> None:
    # kafka-storage's argument parser reads "-..." as an option: the format step then fails.
    from escalator.broker import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)
