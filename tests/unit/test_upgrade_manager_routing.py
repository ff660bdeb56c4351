"""The Upgrade Manager adapter's pure helpers: command topics, stored records, rebuilding."""

from __future__ import annotations

import pytest
from core_harness import Driver, vm

from schemas import topics
from schemas.events import (
    CampaignCompleted,
    CampaignStarted,
    NodeAvailable,
    NodeCycleAdvanced,
    NodeMaintenanceRequested,
    NodeStep,
    UpgradeRequested,
    VmMigrationRequested,
)
from services.upgrade_manager.domain import NodeRecord, rebuild
from services.upgrade_manager.routing import (
    OWN_OUTPUTS,
    load_state,
    routed,
    topic_for_command,
)
from services.upgrade_manager.state_store import CampaignRecords, campaign_of

pytestmark = pytest.mark.unit


def test_every_command_goes_to_its_catalogue_topic() -> None:
    d = Driver(["n1"])
    d.start()
    d.enter("n1", [vm("vm-1")])
    for event, spec in routed(d.emitted):
        assert spec.carries(event.event_type)
        assert topics.Service.UPGRADE_MANAGER in spec.producers
    assert topic_for_command(d.latest(NodeMaintenanceRequested, "n1")) is topics.CLOUD_COMMANDS
    assert topic_for_command(d.latest(VmMigrationRequested, "n1")) is topics.CLOUD_COMMANDS
    assert topic_for_command(d.one(CampaignStarted, events=d.emitted)) is topics.CAMPAIGNS
    available = NodeAvailable(node_id="n1", vnf_ids=(), producer="upgrade-manager")
    assert topic_for_command(available) is topics.VNFM_REQUESTS  # not the vendor notices


def test_own_outputs_are_skipped_but_requests_are_read() -> None:
    assert "UpgradeRequested" not in OWN_OUTPUTS
    assert {"NodeCycleAdvanced", "CampaignStarted", "CampaignCompleted"} <= OWN_OUTPUTS
    assert NodeCycleAdvanced.model_fields["event_type"].default in OWN_OUTPUTS
    assert UpgradeRequested.model_fields["event_type"].default not in OWN_OUTPUTS
    assert CampaignCompleted.model_fields["event_type"].default in OWN_OUTPUTS


def dump(record: NodeRecord | object) -> bytes:
    return record.model_dump_json().encode()  # type: ignore[attr-defined,no-any-return]


def test_state_keys_name_their_campaign() -> None:
    assert campaign_of("plan/cmp-1") == "cmp-1"
    assert campaign_of("status/cmp-1") == "cmp-1"
    assert campaign_of("node/cmp-1/compute-0-01") == "cmp-1"
    for foreign in ("", "plan/", "other/cmp-1", "node"):
        assert campaign_of(foreign) is None


def test_stored_records_rebuild_the_campaign_and_tombstones_delete_nodes() -> None:
    d = Driver(["n1", "n2"])
    d.start(max_parallel=1)
    d.enter("n1", [vm("vm-1", "vnf-1")])
    assert d.state is not None
    records = CampaignRecords()
    assert records.state() is None
    records.put("plan/cmp", dump(d.state.plan))
    records.put("status/cmp", dump(d.state.campaign))
    for node_id, node in d.state.nodes.items():
        records.put(f"node/cmp/{node_id}", dump(node))
    rebuilt = records.state()
    assert rebuilt is not None and dict(rebuilt.nodes) == dict(d.state.nodes)
    records.put("node/cmp/n1", None)
    assert "n1" not in records.nodes


def stored(d: Driver) -> tuple[bytes, bytes, dict[str, bytes | None]]:
    assert d.state is not None
    return (
        dump(d.state.plan),
        dump(d.state.campaign),
        {n: dump(r) for n, r in d.state.nodes.items()},
    )


def test_state_round_trips_through_table_values() -> None:
    d = Driver(["n1", "n2", "n3"])
    d.start(max_parallel=2)
    d.enter("n1", [vm("vm-1", "vnf-1")])
    plan, status, nodes = stored(d)
    loaded = load_state(plan, status, nodes)
    assert loaded is not None and d.state is not None
    assert loaded.plan == d.state.plan and loaded.campaign == d.state.campaign
    assert dict(loaded.nodes) == dict(d.state.nodes)
    assert load_state(None, status, nodes) is None
    assert load_state(plan, None, nodes) is None


def test_missing_node_records_are_pending() -> None:
    d = Driver(["n1", "n2", "n3"])
    d.start(max_parallel=1)
    plan, status, nodes = stored(d)
    loaded = load_state(plan, status, {"n1": nodes["n1"], "n2": None})
    assert loaded is not None
    assert loaded.nodes["n3"] == NodeRecord(node_id="n3")
    assert loaded.nodes["n1"].step is NodeStep.CLAIMING


def test_rebuild_derives_slots_and_counters_from_the_node_records() -> None:
    # A crash kept the node records of a decision but lost its status record.
    d = Driver(["n1", "n2", "n3"])
    d.start(max_parallel=2)
    assert d.state is not None
    old_status = d.state.campaign
    d.enter("n1", [vm("vm-1")])
    d.tick(3600)  # both claims time out and are re-sent, nothing finished yet
    assert d.state is not None
    finished = d.state.nodes["n2"].model_copy(update={"step": NodeStep.DONE, "sent": None})
    nodes = {**d.state.nodes, "n2": finished}
    state = rebuild(d.state.plan, old_status, nodes)
    assert state.campaign.active == ("n1",)
    assert (state.campaign.done, state.campaign.skipped, state.campaign.failed) == (1, 0, 0)
    assert state.campaign.scan_from == 0
    # Records that agree are returned as they are.
    agreeing = rebuild(d.state.plan, d.state.campaign, d.state.nodes)
    assert agreeing.campaign is d.state.campaign
