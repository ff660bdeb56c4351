"""`escalator plan --json` on a real broker: the inventory (NodeInventoryReported, compacted) and
the registry (VnfRegistered) are read to their high watermark, and the plan's batches and
blockers follow the VNFs' budgets and the spare capacity. Also the "too little spare capacity"
scenario file, planned offline with `--scenario`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from escalator.broker import BrokerHandle
from escalator.bus.connection import ensure_topics, make_producer
from escalator.bus.publisher import EventPublisher
from escalator.registry import publish_profiles
from escalator.settings import KafkaSettings
from schemas.events import NodeInventoryReported, VnfProfile
from schemas.topics import CLOUD_INVENTORY
from schemas.types import RedundancyModel, VmOnNode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TIGHT_SCENARIO = Path(__file__).resolve().parents[2] / "bench" / "scenarios" / "tight.json"


def node(node_id: str, domain: str, vms: list[tuple[str, str | None]], vcpus: int = 32) -> Any:
    return NodeInventoryReported(
        node_id=node_id,
        failure_domain=domain,
        vcpus=vcpus,
        ram_mb=vcpus * 2048,
        in_maintenance=False,
        vms=tuple(VmOnNode(vm_id=v, vnf_id=f, vcpus=2, ram_mb=4096) for v, f in vms),
        producer="test-cloud-manager",
    )


def profile(vnf_id: str, members: tuple[str, ...], min_in_service: int) -> VnfProfile:
    return VnfProfile(
        vnf_id=vnf_id,
        vnfm_id="vnfm-a",
        redundancy=(
            RedundancyModel.ACTIVE_STANDBY if len(members) == 2 else RedundancyModel.LOAD_BALANCED
        ),
        members=members,
        min_in_service=min_in_service,
        max_unavailable=1,
        anti_affinity=True,
    )


async def publish(
    settings: KafkaSettings,
    inventory: list[Any],
    profiles: list[VnfProfile],
    before: Sequence[Any] = (),
) -> None:
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        publisher = EventPublisher(producer, settings)
        await publisher.publish_all([*before, *inventory], CLOUD_INVENTORY)
        if profiles:
            await publish_profiles(publisher, profiles, producer="test")
    finally:
        await producer.stop()


async def plan_cli(settings: KafkaSettings, *args: str) -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, **settings.to_env(), "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "escalator",
        "plan",
        "--json",
        "--start-at",
        "2026-11-27T01:00:00Z",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    data = json.loads(out) if out.strip() else {}
    return proc.returncode, data, err.decode()


def own_settings(broker: BrokerHandle) -> KafkaSettings:
    return broker.settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})


async def test_plan_reads_inventory_and_registry_from_the_bus(broker: BrokerHandle) -> None:
    settings = own_settings(broker)
    inventory = [
        node("n1", "fd-1", [("as-a", "as")]),
        node("n2", "fd-2", [("as-b", "as")]),
        node("n3", "fd-1", [("lb-a", "lb")]),
        node("n4", "fd-2", [("lb-b", "lb")]),
        node("n5", "fd-1", [("lb-c", "lb")]),
        node("n6", "fd-2", [("app", None), ("rigid-a", "rigid")]),
        node("n7", "fd-1", [("rigid-b", "rigid")]),
    ]
    profiles = [
        profile("as", ("as-a", "as-b"), 1),
        profile("lb", ("lb-a", "lb-b", "lb-c"), 2),
        profile("rigid", ("rigid-a", "rigid-b"), 2),  # both members must serve: never
    ]
    # An older report of n1 first: the plan must use the latest record per node.
    stale = node("n1", "fd-9", [("old-vm", None)], vcpus=4)
    await publish(settings, inventory, profiles, before=[stale])

    code, data, err = await plan_cli(settings, "--max-parallel", "7")
    assert code == 3, f"some nodes can never be upgraded: exit 3\n{err}"
    assert data["source"]["kind"] == "broker"
    assert data["source"]["topic_prefix"] == settings.topic_prefix
    assert data["nodes"] == 7 and data["vnfs"] == 3 and data["vms"] == 8
    assert data["failure_domains"] == 2, "the stale report of n1 (fd-9) was replaced"
    never = {item["node_id"]: item["reason"] for item in data["never_upgradable"]}
    assert set(never) == {"n6", "n7"} and all("rigid" in r for r in never.values())

    batches = [set(b["nodes"]) for b in data["batches"]]
    assert set().union(*batches) == {"n1", "n2", "n3", "n4", "n5"}
    for batch in batches:
        assert len(batch & {"n1", "n2"}) <= 1, "an active-standby pair never goes down whole"
        assert len(batch & {"n3", "n4", "n5"}) <= 1, "lb keeps min_in_service 2 of 3"
    # The lb VNF takes three waves, so at least three batches.
    assert len(batches) >= 3
    assert data["predicted_makespan_s"] >= data["lower_bound_s"] > 0

    blocked = {item["node_id"]: item for item in data["blocked"]}
    assert {item["reason"] for item in blocked.values()} == {"vnf_budget"}
    assert len(blocked.keys() & {"n1", "n2"}) == 1
    assert len(blocked.keys() & {"n3", "n4", "n5"}) == 2
    assert any("lb:" in item["detail"] for item in blocked.values())

    # The nodes that can go, with failure domains limited to one node each at once.
    code, data, err = await plan_cli(
        settings, "--nodes", "n1,n2,n3", "--nodes", "n4", "--max-parallel", "4",
        "--max-per-failure-domain", "1",
    )  # fmt: skip
    assert code == 0, err
    assert data["complete"] and data["never_upgradable"] == []
    assert data["constraints"]["max_per_failure_domain"] == 1
    domain = {"n1": "fd-1", "n2": "fd-2", "n3": "fd-1", "n4": "fd-2"}
    first = data["batches"][0]["nodes"]
    assert len({domain[n] for n in first}) == len(first), "one node per domain at once"
    assert data["max_in_maintenance"] <= 2


async def test_plan_on_an_empty_inventory_says_so(broker: BrokerHandle) -> None:
    settings = own_settings(broker)
    await ensure_topics(settings)
    code, data, err = await plan_cli(settings)
    assert code == 1 and data == {}
    # (aiokafka may log a retried fetch first, while the new topic's leaders are elected.)
    last = err.strip().splitlines()[-1]
    assert last.startswith("escalator: error:") and "inventory topic holds no node" in last


async def test_too_little_spare_capacity_serialises_with_capacity_blockers(
    broker: BrokerHandle,
) -> None:
    """Three 8-vCPU nodes, each half full: any one node's VMs fit on the other two, never two
    nodes' VMs on the third. The plan goes one node at a time and says capacity is why."""
    settings = own_settings(broker)
    inventory = [
        node(f"t{i}", f"fd-{i}", [(f"t{i}-a", None), (f"t{i}-b", None)], vcpus=8) for i in (1, 2, 3)
    ]
    await publish(settings, inventory, [])
    code, data, err = await plan_cli(settings, "--max-parallel", "3")
    assert code == 0, err
    assert data["spare_capacity_pct"] == {"vcpus": 50.0, "ram": 50.0}
    assert [len(b["nodes"]) for b in data["batches"]] == [1, 1, 1]
    assert data["max_in_maintenance"] == 1
    assert len(data["blocked"]) == 2
    assert {item["reason"] for item in data["blocked"]} == {"capacity"}


@pytest.mark.skipif(not TIGHT_SCENARIO.exists(), reason="bench/scenarios/tight.json not there")
async def test_tight_scenario_file_offline() -> None:
    """bench/scenarios/tight.json (12 nodes, too little spare capacity for two at once), planned
    with no broker: with every node allowed at once, capacity serialises the plan."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "escalator",
        "plan",
        "--json",
        "--scenario",
        str(TIGHT_SCENARIO),
        "--max-parallel",
        "10000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    data = json.loads(out)
    assert data["source"]["kind"] == "scenario" and data["nodes"] == 12
    assert data["never_upgradable"] == [], "every node can be evacuated on its own"
    # No two nodes' VMs fit at once: strictly one node at a time, whatever the cap.
    assert [len(b["nodes"]) for b in data["batches"]] == [1] * 12
    assert data["max_in_maintenance"] == 1
    reasons = [item["reason"] for item in data["blocked"]]
    assert len(reasons) == 11
    assert "capacity" in reasons and set(reasons) <= {"capacity", "vnf_budget"}
    capacity = next(item for item in data["blocked"] if item["reason"] == "capacity")
    assert "do not all fit" in capacity["detail"]
