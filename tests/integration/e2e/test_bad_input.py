"""Bad records on every topic a service consumes, with the whole deployment running.

Each consumed topic gets three bad records, keyed so that the consumer that matters reads them
in the same partition as the valid traffic that follows: bytes that are not UTF-8, a JSON object
of an unknown `event_type`, and a known type at `schema_version` 99. Then valid records follow
and a campaign runs. The dead-letter topic must hold, per source topic, the three reasons (at
least one consumer per topic dead-letters them), and every consumer must have gone on to
process the valid record behind them: the campaign completing proves it for the campaign-keyed
inputs; for the others the test looks at the service's reaction.

One deployment serves the whole module (a module-scoped fixture runs the scenario once).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from e2e_harness import (
    TARGET,
    E2EDeployment,
    assert_clean_finish,
    for_node,
    fresh_deployment,
    of_type,
)

from escalator.broker import BrokerHandle
from escalator.bus import EventPublisher, make_producer
from escalator.status import CampaignView
from escalator.world.model import WorldSnapshot
from schemas import topics as t
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    NodeAgentHeartbeat,
    NodeMaintenanceEntered,
    NodeStep,
    NodeUpgraded,
    VnfMaintenanceNotified,
)
from schemas.topics import TopicSpec

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(300)]

GHOST = "node-ghost"  # a node only known by one heartbeat, sent right after the bad ones
NODE = "node-1"
VNFM = "vnfm-1"
GARBAGE = b"\xff\xfe\x00\x80 not an event"
REASONS = {"not_utf8", "unknown_type", "unsupported_version"}

# Every topic a service consumes, with who reads it.
CONSUMED: dict[str, TopicSpec] = {
    "campaigns": t.CAMPAIGNS,  # Upgrade Manager
    "cloud.commands": t.CLOUD_COMMANDS,  # Cloud Manager
    "cloud.events": t.CLOUD_EVENTS,  # Upgrade Manager
    "vnfm.requests": t.VNFM_REQUESTS,  # VNFM adapter
    "vnfm.events": t.VNFM_EVENTS,  # Upgrade Manager
    "vnfm.replies": t.VNFM_REPLIES,  # VNFM adapter
    "node.commands": t.NODE_COMMANDS,  # node agents (own partition)
    "node.events": t.NODE_EVENTS,  # Upgrade Manager
    "node.heartbeats": t.NODE_HEARTBEATS,  # Upgrade Manager's heartbeat view
    "vnf.registry": t.VNF_REGISTRY,  # VNFM adapter's registry follower
}


@dataclass
class Outcome:
    deployment: E2EDeployment
    campaign_id: str
    before: WorldSnapshot
    after: WorldSnapshot
    view: CampaignView
    events: list[Event]
    dead: list[DeadLetter]
    keys: dict[str, str]
    registry_vnf: str

    def reasons(self, spec: TopicSpec) -> set[str]:
        name = self.deployment.settings.topic(spec.name)
        return {d.reason for d in self.dead if d.source_topic == name}


def bad_records(spec: TopicSpec, campaign_id: str) -> list[bytes]:
    envelope = {
        "event_id": str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "producer": "e2e-bad-input",
        "node_id": NODE,
    }
    known = spec.events[0].model_fields["event_type"].default
    return [
        GARBAGE,
        json.dumps({**envelope, "event_type": "NoSuchEventType", "schema_version": 1}).encode(),
        json.dumps({**envelope, "event_type": known, "schema_version": 99}).encode(),
    ]


async def scenario(d: E2EDeployment) -> Outcome:
    before = await d.prepare(registry=False)
    campaign_id = f"cmp-e2e-bad-{uuid.uuid4().hex[:8]}"
    registry_vnf = sorted(vm.vnf_id for vm in before.vms if vm.node_id == NODE and vm.vnf_id)[0]
    keys = {
        "campaigns": campaign_id,
        "cloud.events": campaign_id,
        "vnfm.events": campaign_id,
        "node.events": campaign_id,
        "cloud.commands": NODE,
        "vnfm.requests": NODE,
        "node.commands": NODE,
        "vnfm.replies": VNFM,
        "node.heartbeats": GHOST,
        "vnf.registry": registry_vnf,
    }
    producer = make_producer(d.settings)
    await producer.start()
    try:
        for label, spec in CONSUMED.items():
            for value in bad_records(spec, campaign_id):
                await producer.send_and_wait(
                    d.settings.topic(spec.name), value=value, key=keys[label].encode()
                )
        # Valid records right behind the bad ones, in the same partitions: a heartbeat of a node
        # already at the target, the VNF registry (the registry key's VNF included).
        publisher = EventPublisher(producer, d.settings)
        await publisher.publish(
            NodeAgentHeartbeat(
                node_id=GHOST,
                agent_id="e2e-bad-input",
                installed_version=TARGET,
                interval_s=5.0,
                producer="e2e-bad-input",
            ),
            t.NODE_HEARTBEATS,
        )
    finally:
        await producer.stop()
    await d.publish_registry()
    # The campaign names the ghost node: a Manager that did not read its heartbeat rejects it.
    await d.start_campaign(campaign_id, nodes=[*d.node_ids, GHOST])
    view = await d.follow_campaign(campaign_id)
    events = await d.campaign_events(campaign_id)
    after = await d.snapshot()
    # Consumers off the campaign's path (heartbeats, registry) may dead-letter a bit later.
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while True:
        dead = await d.dead_letters()
        found = {(x.source_topic, x.reason) for x in dead}
        wanted = {(d.settings.topic(s.name), r) for s in CONSUMED.values() for r in REASONS}
        if wanted <= found or loop.time() > give_up:
            break
        await asyncio.sleep(1)
    return Outcome(d, campaign_id, before, after, view, events, dead, keys, registry_vnf)


@pytest.fixture(scope="module")
def outcome(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    if broker.kind == "tansu":
        pytest.skip("needs Apache Kafka semantics; the session broker is Tansu")
    d = fresh_deployment(broker, tmp_path_factory.mktemp("bad-input"), nodes=4, seed=17)
    try:
        yield asyncio.run(scenario(d))
    finally:
        d.stop()


def test_campaign_completes_after_bad_input(outcome: Outcome) -> None:
    o = outcome
    d = o.deployment
    assert_clean_finish(o.view, o.before, o.after, context=d.logs())
    assert o.view.nodes[GHOST].step in (NodeStep.SKIPPED, NodeStep.DONE), o.view.nodes[GHOST]
    assert {n for n, v in o.view.nodes.items() if v.step is NodeStep.DONE} >= set(d.node_ids)


# Topics whose consumers are known not to dead-letter (none today; kept for the next one).
NOT_DEAD_LETTERED: dict[str, str] = {}


def _dead_letter_param(label: str) -> object:
    reason = NOT_DEAD_LETTERED.get(label)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(label, marks=marks, id=label)


@pytest.mark.parametrize("label", [_dead_letter_param(label) for label in CONSUMED])
def test_bad_records_are_dead_lettered(outcome: Outcome, label: str) -> None:
    spec = CONSUMED[label]
    reasons = outcome.reasons(spec)
    assert reasons >= REASONS, (
        f"{label}: dead-letter reasons {sorted(reasons)}, expected {sorted(REASONS)}\n"
        f"{outcome.deployment.logs(5)}"
    )
    name = outcome.deployment.settings.topic(spec.name)
    for dead in (x for x in outcome.dead if x.source_topic == name and x.reason in REASONS):
        # Kept whole, so that an operator can replay it.
        assert dead.key() == outcome.keys[label].encode()
        assert dead.value() is not None and dead.consumer_group


@pytest.mark.parametrize("label", list(CONSUMED))
def test_valid_records_behind_bad_ones_are_processed(outcome: Outcome, label: str) -> None:
    o = outcome
    events, ctx = o.events, o.deployment.logs(5)
    assert o.view.state == "completed", f"{o.view.state}: {o.view.reason}\n{ctx}"
    if label in ("campaigns", "cloud.events", "vnfm.events", "node.events"):
        # Same partition as the campaign's own inputs: it completing is the proof.
        assert o.view.nodes[NODE].step is NodeStep.DONE
    elif label == "cloud.commands":
        assert [e for e in for_node(events, NODE) if isinstance(e, NodeMaintenanceEntered)], ctx
    elif label == "vnfm.requests":
        assert [e for e in for_node(events, NODE) if isinstance(e, BusinessMoved)], ctx
    elif label == "vnfm.replies":
        replies = [e for e in of_type(events, "VnfBusinessMoved") if e.producer.endswith(VNFM)]
        assert replies, ctx
        moved = of_type(events, "BusinessMoved")
        assert not [e for e in moved if isinstance(e, BusinessMoved) and e.timed_out], ctx
    elif label == "node.commands":
        upgraded = [e for e in for_node(events, NODE) if isinstance(e, NodeUpgraded)]
        assert upgraded and upgraded[0].producer == f"node-agent/{NODE}", ctx
    elif label == "node.heartbeats":
        started = of_type(events, "CampaignStarted")
        assert started and GHOST in started[0].nodes, ctx  # type: ignore[attr-defined]
        assert not of_type(events, "CampaignRejected"), ctx
    elif label == "vnf.registry":
        notices = [e for e in for_node(events, NODE) if isinstance(e, VnfMaintenanceNotified)]
        assert o.registry_vnf in {v.vnf_id for n in notices for v in n.vnfs}, ctx
    else:  # pragma: no cover
        raise AssertionError(label)
