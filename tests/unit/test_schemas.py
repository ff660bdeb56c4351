"""The event contract: fields documented with typed examples, topics consistent, files in sync."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import pytest
from pydantic import TypeAdapter, ValidationError

from schemas import generate
from schemas.codec import decode, encode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event, command_id
from schemas.events import (
    ALL_EVENTS,
    EVENTS_BY_TYPE,
    NodeUpgraded,
    UpgradeRequested,
    VnfProfile,
)
from schemas.topics import ALL_TOPICS, CAMPAIGNS, NODE_COMMANDS, Service, topic_of

pytestmark = pytest.mark.unit

MODELS_WITH_FIELDS = [*ALL_EVENTS, VnfProfile, DeadLetter]


def _field_adapter(field: Any) -> TypeAdapter[Any]:
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[field.annotation, *field.metadata])  # type: ignore[misc]


@pytest.mark.parametrize("model", MODELS_WITH_FIELDS, ids=lambda m: m.__name__)
def test_every_field_has_a_description_and_an_example_of_its_type(model: type[Any]) -> None:
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"
        assert field.examples, f"{model.__name__}.{name} has no example"
        _field_adapter(field).validate_python(field.examples[0])


@pytest.mark.parametrize("model", ALL_EVENTS, ids=lambda m: m.__name__)
def test_example_event_round_trips_through_the_codec(model: type[Event]) -> None:
    example = generate._example(model)
    event = model.model_validate(example)
    assert decode(encode(event)) == event


def test_event_types_are_unique_and_named_as_facts_or_requests() -> None:
    assert len(EVENTS_BY_TYPE) == len(ALL_EVENTS)
    named_by_the_seed = {"NodeAvailable", "NodeAgentHeartbeat"}
    for event_type in set(EVENTS_BY_TYPE) - named_by_the_seed:
        assert event_type.endswith("ed"), event_type


def test_events_are_immutable() -> None:
    event = NodeUpgraded(campaign_id="cmp-1", node_id="n1", version="2.0")
    with pytest.raises(ValidationError):
        event.node_id = "n2"  # type: ignore[misc]


def test_envelope_defaults_correlation_to_own_id_and_caused_events_inherit_it() -> None:
    first = NodeUpgraded(campaign_id="cmp-1", node_id="n1", version="2.0")
    assert first.correlation_id == first.event_id
    second = NodeUpgraded(node_id="n1", version="2.0", **first.caused(producer="x"))
    assert second.correlation_id == first.correlation_id
    assert second.causation_id == first.event_id
    assert second.campaign_id == "cmp-1"


def test_command_ids_are_deterministic() -> None:
    assert command_id("cmp-1", "n1", "claim", 1) == command_id("cmp-1", "n1", "claim", 1)
    assert command_id("cmp-1", "n1", "claim", 1) != command_id("cmp-1", "n1", "claim", 2)


def test_unknown_fields_are_ignored_so_additive_changes_keep_the_version() -> None:
    payload = json.loads(encode(NodeUpgraded(campaign_id="cmp-1", node_id="n1", version="2.0")))
    payload["added_in_a_later_release"] = {"x": 1}
    decoded = decode(json.dumps(payload).encode())
    assert isinstance(decoded, NodeUpgraded)


def test_manifest_requires_digest_and_remote_uri_not_local_paths() -> None:
    base = {"name": "a.rpm", "sha256": "0" * 64, "uri": "https://repo/a.rpm"}
    UpgradeRequested(campaign_id="cmp-1", manifest={"version": "2.0", "files": [base]})
    for bad in ({"uri": "/home/alice/a.rpm"}, {"sha256": "abc"}, {"uri": "C:\\a.rpm"}):
        with pytest.raises(ValidationError):
            UpgradeRequested(
                campaign_id="cmp-1", manifest={"version": "2.0", "files": [{**base, **bad}]}
            )
    with pytest.raises(ValidationError):
        UpgradeRequested(campaign_id="cmp-1", manifest={"version": "2.0", "files": []})


def test_vnf_profile_rejects_impossible_constraints() -> None:
    ok = {
        "vnf_id": "v",
        "vnfm_id": "m",
        "redundancy": "load_balanced",
        "members": ["a", "b", "c"],
        "min_in_service": 2,
        "max_unavailable": 1,
    }
    VnfProfile.model_validate(ok)
    for bad in (
        {"min_in_service": 4},
        {"max_unavailable": 4},
        {"members": ["a", "a"]},
        {"redundancy": "active_standby", "members": ["a"], "min_in_service": 1},
    ):
        with pytest.raises(ValidationError):
            VnfProfile.model_validate({**ok, **bad})


def test_every_event_travels_on_a_topic_that_can_key_it() -> None:
    carried = {cls for spec in ALL_TOPICS for cls in spec.events}
    assert carried == set(ALL_EVENTS)
    for spec in ALL_TOPICS:
        for cls in spec.events:
            assert spec.key_field.split(".")[0] in cls.model_fields, (spec.name, cls.__name__)
            example = cls.model_validate(generate._example(cls))
            assert spec.key_for(example), (spec.name, cls.__name__)


def test_everything_the_upgrade_manager_consumes_per_campaign_is_keyed_by_campaign() -> None:
    for spec in ALL_TOPICS:
        if Service.UPGRADE_MANAGER in spec.consumers and not spec.compacted:
            assert spec.key_field == "campaign_id", spec.name
            assert spec.co_partitioned, spec.name


def test_commands_are_keyed_by_recipient_and_vendor_topics_are_separate() -> None:
    assert NODE_COMMANDS.key_field == "node_id"
    vendor_written = [s for s in ALL_TOPICS if Service.VNFM in s.producers]
    assert vendor_written and all(s.vendor_writable for s in vendor_written)
    for spec in vendor_written:
        assert Service.UPGRADE_MANAGER not in spec.consumers, "vendors must go through the adapter"
    internal = [s for s in ALL_TOPICS if Service.VNFM not in s.producers]
    assert not any(s.vendor_writable for s in internal)


def test_topic_names_carry_their_version() -> None:
    for spec in ALL_TOPICS:
        assert spec.name.startswith("escalator.") and spec.name.endswith(".v1"), spec.name


def test_topic_lookup() -> None:
    assert topic_of("UpgradeRequested") is CAMPAIGNS
    with pytest.raises(LookupError):
        topic_of("NodeAvailable")  # internal and vendor-facing copies


def test_key_for_refuses_events_without_the_key() -> None:
    event = UpgradeRequested(
        manifest={"version": "2", "files": [{"name": "a", "sha256": "0" * 64, "uri": "s3://b/a"}]}
    )
    with pytest.raises(ValueError, match="campaign_id"):
        CAMPAIGNS.key_for(event)
    assert CAMPAIGNS.key_for(event.model_copy(update={"campaign_id": "cmp-9"})) == b"cmp-9"


def test_checked_in_json_schema_and_asyncapi_match_the_models() -> None:
    assert generate.drifted() == [], "run: python -m schemas.generate"


def test_asyncapi_document_names_key_publishers_subscribers_and_examples() -> None:
    doc = json.loads(generate.ASYNCAPI_FILE.read_text())
    assert doc["asyncapi"] == "3.0.0"
    for spec in ALL_TOPICS:
        channel = doc["channels"][spec.name.replace(".", "_")]
        assert channel["address"] == spec.name
        assert channel["x-escalator"]["key"] == spec.key_field
        assert channel["x-escalator"]["publishers"] and channel["x-escalator"]["subscribers"]
    for name, message in doc["components"]["messages"].items():
        assert message["examples"], name
        if name in EVENTS_BY_TYPE:
            assert isinstance(decode(json.dumps(message["examples"][0]["payload"]).encode()), Event)


def test_new_event_ids_are_random_uuids() -> None:
    a = NodeUpgraded(campaign_id="cmp-1", node_id="n1", version="2.0")
    b = NodeUpgraded(campaign_id="cmp-1", node_id="n1", version="2.0")
    assert a.event_id != b.event_id and isinstance(a.event_id, uuid.UUID)
