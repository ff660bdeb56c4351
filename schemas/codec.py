"""Bytes to events and back. `decode` never raises: bad input becomes an `InvalidEvent`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, TypeAlias, Union

from pydantic import Field, TypeAdapter, ValidationError

from schemas.envelope import Event
from schemas.events import ALL_EVENTS, EVENTS_BY_TYPE

# Kafka's default message.max.bytes; a record above it would be refused by the broker anyway.
MAX_EVENT_BYTES = 1_048_576

Upcaster: TypeAlias = Callable[[dict[str, Any]], dict[str, Any]]

# (event_type, from_version) -> function that returns the payload at from_version + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register how an old payload becomes the next version's payload."""

    def register(fn: Upcaster) -> Upcaster:
        UPCASTERS[(event_type, from_version)] = fn
        return fn

    return register


class InvalidReason(StrEnum):
    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_TYPE = "missing_type"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_FIELDS = "invalid_fields"


@dataclass(frozen=True)
class InvalidEvent:
    """Bytes that are not a valid event, with a reason fit for a dead-letter record."""

    reason: InvalidReason
    detail: str
    raw: bytes | None
    event_type: str | None = None

    def __str__(self) -> str:
        named = f" ({self.event_type})" if self.event_type else ""
        return f"{self.reason.value}{named}: {self.detail}"


def _build_adapter() -> TypeAdapter[Any]:
    # The union is built from the catalogue so that adding an event needs no edit here.
    union: Any = Union[tuple(ALL_EVENTS)]  # noqa: UP007
    annotated: Any = Annotated[union, Field(discriminator="event_type")]
    return TypeAdapter(annotated)


_EVENT_ADAPTER = _build_adapter()


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode()


def _upcast(event_type: str, payload: dict[str, Any], current: int) -> dict[str, Any]:
    version = payload.get("schema_version", 1)
    while version < current:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise LookupError(f"no upcaster for {event_type} v{version}")
        payload = step(dict(payload))
        version += 1
        payload["schema_version"] = version
    return payload


def decode(raw: bytes | None) -> Event | InvalidEvent:
    if not raw:
        return InvalidEvent(InvalidReason.EMPTY, "no value (tombstone or empty record)", raw)
    if len(raw) > MAX_EVENT_BYTES:
        return InvalidEvent(InvalidReason.TOO_LARGE, f"{len(raw)} bytes", raw[:1024])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return InvalidEvent(InvalidReason.NOT_UTF8, str(err), raw)
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as err:
        # ValueError covers JSONDecodeError and the integer-length limit (a number of more than
        # 4,300 digits), which json.loads raises as a plain ValueError.
        return InvalidEvent(InvalidReason.NOT_JSON, str(err)[:300], raw)
    if not isinstance(payload, dict):
        return InvalidEvent(InvalidReason.NOT_OBJECT, f"top level is {type(payload).__name__}", raw)
    event_type = payload.get("event_type")
    if not isinstance(event_type, str):
        return InvalidEvent(InvalidReason.MISSING_TYPE, "no string field event_type", raw)
    cls = EVENTS_BY_TYPE.get(event_type)
    if cls is None:
        return InvalidEvent(
            InvalidReason.UNKNOWN_TYPE, f"unknown event_type {event_type[:100]!r}", raw
        )
    version = payload.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return InvalidEvent(
            InvalidReason.UNSUPPORTED_VERSION, f"bad schema_version {version!r}", raw, event_type
        )
    if version > cls.SCHEMA_VERSION:
        return InvalidEvent(
            InvalidReason.UNSUPPORTED_VERSION,
            f"v{version} is newer than this consumer's v{cls.SCHEMA_VERSION}; "
            "upgrade consumers before producers",
            raw,
            event_type,
        )
    try:
        payload = _upcast(event_type, payload, cls.SCHEMA_VERSION)
    except Exception as err:  # an upcaster is our code, but a bad payload must not kill us
        return InvalidEvent(InvalidReason.UNSUPPORTED_VERSION, str(err), raw, event_type)
    try:
        event: Event = _EVENT_ADAPTER.validate_python(payload)
    except ValidationError as err:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5]
        )
        return InvalidEvent(InvalidReason.INVALID_FIELDS, detail, raw, event_type)
    except (RecursionError, ValueError, TypeError) as err:
        return InvalidEvent(InvalidReason.INVALID_FIELDS, str(err)[:300], raw, event_type)
    return event
