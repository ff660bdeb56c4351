"""Shared pytest fixtures. Keep this file small; add fixtures below the existing ones."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from escalator.broker import BROKER_ENV, BrokerHandle, start_broker

_BROKER_KEY = pytest.StashKey[BrokerHandle]()


def pytest_report_header(config: pytest.Config) -> str:
    mode = os.environ.get(BROKER_ENV) or "auto"
    return f"broker: {BROKER_ENV}={mode} (started on first use of the `broker` fixture)"


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerHandle]:
    """One broker for the whole session: auto order (here: JVM Apache Kafka), or $ESCALATOR_BROKER.

    Use `broker.settings` (or `broker.settings.to_env()` for child processes) for client settings.
    """
    handle = start_broker(log=None)
    request.config.stash[_BROKER_KEY] = handle
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbroker: {handle.description} at {handle.bootstrap_servers}")
    try:
        yield handle
    finally:
        handle.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    handle = terminalreporter.config.stash.get(_BROKER_KEY, None)
    if handle is not None:
        terminalreporter.write_line(f"broker: {handle.description} at {handle.bootstrap_servers}")


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[..., str]:
    """`unique_name("orders")` -> "orders-test_foo-3f9c2a1b7e": unique per call, a legal topic."""
    test = re.sub(r"[^A-Za-z0-9]+", "_", request.node.name).strip("_")[:32]

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:10]}"

    return make


@pytest.fixture(autouse=True)
def _real_kafka_only_on_real_kafka(request: pytest.FixtureRequest) -> None:
    """Tests marked `real_kafka` rely on Kafka semantics that Tansu lacks (offsets, compaction)."""
    if request.node.get_closest_marker("real_kafka") is None:
        return
    if "broker" not in request.fixturenames:
        return
    handle: BrokerHandle = request.getfixturevalue("broker")
    if handle.kind == "tansu":
        pytest.skip("needs Apache Kafka semantics; the session broker is Tansu")
