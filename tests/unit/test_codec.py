"""The decoder turns any bytes into an event or an InvalidEvent, never an exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.codec import InvalidEvent, InvalidReason, decode, encode
from schemas.envelope import Event
from schemas.events import ALL_EVENTS, EVENTS_BY_TYPE, NodeUpgraded

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(raw: bytes) -> None:
    result = decode(raw)
    assert isinstance(result, Event | InvalidEvent)


@FUZZ
@given(
    st.sampled_from(sorted(EVENTS_BY_TYPE)),
    st.dictionaries(st.text(max_size=15), json_values, max_size=8),
)
def test_json_objects_with_a_known_type_and_random_fields_never_raise(
    event_type: str, fields: dict[str, Any]
) -> None:
    fields["event_type"] = event_type
    result = decode(json.dumps(fields).encode())
    if isinstance(result, InvalidEvent):
        assert result.reason in (InvalidReason.INVALID_FIELDS, InvalidReason.UNSUPPORTED_VERSION)
        assert str(result)


@FUZZ
@given(json_values)
def test_any_json_value_never_raises(value: Any) -> None:
    assert isinstance(decode(json.dumps(value).encode()), Event | InvalidEvent)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, InvalidReason.EMPTY),
        (b"", InvalidReason.EMPTY),
        (b"\xff\xfe", InvalidReason.NOT_UTF8),
        (b"{not json", InvalidReason.NOT_JSON),
        (b"[1,2]", InvalidReason.NOT_OBJECT),
        (b'{"node_id": "n1"}', InvalidReason.MISSING_TYPE),
        (b'{"event_type": "NodeExploded"}', InvalidReason.UNKNOWN_TYPE),
        (
            b'{"event_type": "NodeUpgraded", "schema_version": 99}',
            InvalidReason.UNSUPPORTED_VERSION,
        ),
        (
            b'{"event_type": "NodeUpgraded", "schema_version": "1"}',
            InvalidReason.UNSUPPORTED_VERSION,
        ),
        (b'{"event_type": "NodeUpgraded", "node_id": "n1"}', InvalidReason.INVALID_FIELDS),
        (b"[" * 100_000 + b"]" * 100_000, InvalidReason.NOT_JSON),
        (b" " * (codec.MAX_EVENT_BYTES + 1), InvalidReason.TOO_LARGE),
    ],
)
def test_each_kind_of_bad_input_gets_a_clear_reason(
    raw: bytes | None, reason: InvalidReason
) -> None:
    result = decode(raw)
    assert isinstance(result, InvalidEvent)
    assert result.reason is reason
    assert result.detail


def test_invalid_fields_name_the_field() -> None:
    result = decode(b'{"event_type": "NodeUpgraded", "campaign_id": "cmp-1", "node_id": "n1"}')
    assert isinstance(result, InvalidEvent)
    assert "version" in result.detail and result.event_type == "NodeUpgraded"


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.__name__)
def test_every_event_declares_a_supported_schema_version(cls: type[Event]) -> None:
    assert cls.SCHEMA_VERSION >= 1


def test_old_payloads_are_upcast_to_the_current_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend v1 named the field `old_version_field` and v2 renamed it to `version`.
    class NodeUpgradedV2(NodeUpgraded):
        SCHEMA_VERSION = 2

    monkeypatch.setitem(EVENTS_BY_TYPE, "NodeUpgraded", NodeUpgradedV2)
    monkeypatch.setattr(codec, "_EVENT_ADAPTER", _adapter_for(NodeUpgradedV2))
    calls: list[int] = []

    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload["schema_version"])
        payload["version"] = payload.pop("old_version_field", payload.get("version"))
        return payload

    monkeypatch.setitem(codec.UPCASTERS, ("NodeUpgraded", 1), v1_to_v2)
    v1 = {
        "event_type": "NodeUpgraded",
        "schema_version": 1,
        "campaign_id": "cmp-1",
        "node_id": "n1",
        "old_version_field": "2.0",
    }
    result = decode(json.dumps(v1).encode())
    assert isinstance(result, NodeUpgraded), result
    assert result.version == "2.0" and result.schema_version == 2 and calls == [1]


def test_a_missing_upcaster_is_a_clear_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    class NodeUpgradedV3(NodeUpgraded):
        SCHEMA_VERSION = 3

    monkeypatch.setitem(EVENTS_BY_TYPE, "NodeUpgraded", NodeUpgradedV3)
    result = decode(b'{"event_type": "NodeUpgraded", "schema_version": 1}')
    assert isinstance(result, InvalidEvent)
    assert result.reason is InvalidReason.UNSUPPORTED_VERSION and "upcaster" in result.detail


def _adapter_for(cls: type[Event]) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def test_encode_decode_identity() -> None:
    event = NodeUpgraded(campaign_id="cmp-1", node_id="n1", version="2.0", producer="agent/n1")
    assert decode(encode(event)) == event
