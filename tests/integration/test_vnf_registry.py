"""The VNF registry: replace and delete by key, read back to the high watermark.

(That `ensure_topics` creates the registry topic compacted is checked in test_bus_runtime.)
"""

from __future__ import annotations

import uuid

import pytest

from escalator.broker import BrokerHandle
from escalator.bus.connection import ensure_topics, make_producer
from escalator.bus.publisher import EventPublisher
from escalator.registry import load_registry, publish_profiles
from schemas.events import VnfProfile
from schemas.topics import VNF_REGISTRY

pytestmark = pytest.mark.integration


def profile(vnf_id: str, members: tuple[str, ...], vnfm: str = "vnfm-a") -> VnfProfile:
    return VnfProfile(
        vnf_id=vnf_id,
        vnfm_id=vnfm,
        redundancy="active_standby" if len(members) == 2 else "load_balanced",
        members=members,
        min_in_service=1,
        max_unavailable=1,
        min_recovery_s=5.0,
    )


async def test_registry_round_trip_replace_and_tombstone(broker: BrokerHandle) -> None:
    settings = broker.settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:8]}."})
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        publisher = EventPublisher(producer, settings)
        await publish_profiles(
            publisher,
            [profile("epc", ("vm-1", "vm-2")), profile("lb", ("vm-3", "vm-4", "vm-5"), "vnfm-b")],
            producer="test",
        )
        # A later profile for the same VNF replaces it; a tombstone removes a VNF.
        await publish_profiles(publisher, [profile("epc", ("vm-1", "vm-9"))], producer="test")
        await publish_profiles(publisher, [profile("gone", ("vm-7", "vm-8"))], producer="test")
        await producer.send_and_wait(settings.topic(VNF_REGISTRY.name), key=b"gone", value=None)
    finally:
        await producer.stop()

    registry = await load_registry(settings)
    assert sorted(registry.profiles) == ["epc", "lb"]
    assert registry.get("epc").members == ("vm-1", "vm-9")  # type: ignore[union-attr]
    assert registry.vnf_of("vm-9").vnf_id == "epc"  # type: ignore[union-attr]
    assert registry.vnf_of("vm-2") is None, "the replaced profile's old member is forgotten"
    assert registry.vnf_of("vm-7") is None
    assert {k: [p.vnf_id for p in v] for k, v in registry.by_vnfm().items()} == {
        "vnfm-a": ["epc"],
        "vnfm-b": ["lb"],
    }
