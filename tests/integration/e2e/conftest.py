"""Fixtures of the end-to-end tests: deployments (world + four services as processes) per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import E2EDeployment, fresh_deployment

from escalator.broker import BrokerHandle


@pytest.fixture
def deploy(broker: BrokerHandle, tmp_path: Path) -> Iterator[Callable[..., E2EDeployment]]:
    """`deploy(nodes=4, seed=3, extra_args={...}, extra_env={...})`: a deployment (world
    started, services not yet: `await d.prepare()`), stopped at the end of the test. Several
    per test are fine; each has its own topics."""
    made: list[E2EDeployment] = []

    def make(**options: Any) -> E2EDeployment:
        deployment = fresh_deployment(broker, tmp_path / f"run{len(made)}", **options)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.stop()


@pytest.fixture
def campaign_id() -> str:
    return f"cmp-e2e-{uuid.uuid4().hex[:10]}"
