"""Stored v1 payloads still decode: the versioning rules of schemas/README.md, enforced.

`tests/fixtures/events/v1/<EventType>.json` holds one version-1 payload per event type, as a
producer of contract 1.x wrote it. The files were generated once from the models' field examples
and are FROZEN: never regenerate or edit them to make this test pass. They stand for records
that stay on topics (retention, or forever on compacted topics) and for vendors' code that keeps
sending v1 payloads.

The rule they enforce:

- Every stored v1 payload must go through the current `schemas.codec.decode` and come out as a
  valid event of its type, at the type's current `SCHEMA_VERSION`.
- While a type is still at version 1, re-encoding the decoded event must reproduce every stored
  field with its value. Additive changes (a new optional field with a default) pass. Removing or
  renaming a field, changing a type or a meaning, or making an optional field required is a
  breaking change: it fails here, and the fix is NOT to touch the fixture but to bump that
  event's `SCHEMA_VERSION` and register an upcaster in `schemas/codec.py`
  (`@upcaster("EventType", 1)`) that turns the stored v1 payload into the v2 shape.
- A new event type adds its own v1 fixture, once, written from its field examples, e.g.
  `python -c "import json; from schemas.generate import _example; from schemas.events import X;
  print(json.dumps(_example(X), indent=2, sort_keys=True))" > tests/fixtures/events/v1/X.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import EVENTS_BY_TYPE

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events" / "v1"
STORED = sorted(p.stem for p in FIXTURES.glob("*.json"))


def _stored(event_type: str) -> tuple[bytes, dict[str, Any]]:
    raw = (FIXTURES / f"{event_type}.json").read_bytes()
    return raw, json.loads(raw)


def test_every_event_type_has_a_stored_v1_fixture() -> None:
    missing = sorted(set(EVENTS_BY_TYPE) - set(STORED))
    assert not missing, (
        f"no stored v1 payload for {missing}: add one per new event type (see this module's "
        "docstring); never regenerate the existing ones"
    )


def test_every_fixture_is_a_v1_payload_of_a_known_type() -> None:
    assert STORED, f"no fixtures under {FIXTURES}"
    for event_type in STORED:
        _, payload = _stored(event_type)
        assert payload["event_type"] == event_type
        assert payload["schema_version"] == 1, f"{event_type}.json is not a v1 payload"
        assert event_type in EVENTS_BY_TYPE, (
            f"{event_type} has a stored payload but no model: an event type is never removed "
            "while its records may remain on a topic"
        )


_MISSING = object()


def _keeps(now: Any, stored: Any) -> bool:
    """`now` still holds every stored value; nested objects may have gained optional fields."""
    if isinstance(stored, dict):
        return isinstance(now, dict) and all(
            _keeps(now.get(k, _MISSING), v) for k, v in stored.items()
        )
    return bool(now == stored)


@pytest.mark.parametrize("event_type", STORED)
def test_stored_v1_payload_decodes_to_the_current_event(event_type: str) -> None:
    raw, payload = _stored(event_type)
    cls = EVENTS_BY_TYPE[event_type]
    event = decode(raw)
    assert not isinstance(event, InvalidEvent), (
        f"the stored v1 {event_type} no longer decodes ({event}): a breaking change needs a "
        "schema_version bump and an upcaster in schemas/codec.py"
    )
    assert type(event) is cls
    assert event.schema_version == cls.SCHEMA_VERSION
    if cls.SCHEMA_VERSION == 1:
        again = json.loads(encode(event))
        lost = {k: v for k, v in payload.items() if not _keeps(again.get(k, _MISSING), v)}
        assert not lost, (
            f"{event_type} v1 fields changed or disappeared on decode: {lost} "
            f"(now { ({k: again.get(k) for k in lost}) }); that is a breaking change: bump "
            "SCHEMA_VERSION and add an upcaster"
        )
