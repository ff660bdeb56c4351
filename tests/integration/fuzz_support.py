"""Fuzz cases for Escalator's consumers: hypothesis strategies, a reproducible corpus, its oracle.

A case is one Kafka record (key, value, headers) meant for one catalogue topic, of one of three
kinds:

* ``raw``: bytes that are not an event object at all: random bytes, a real event's JSON cut
  short, a real event's JSON with a byte that is not UTF-8 (or a BOM, or UTF-16, or trailing
  garbage), JSON that is not an object (including arrays nested deeper than the decoder
  recurses), empty values, null values (tombstones: a deletion on a compacted topic, with a
  random key), and values of half a MiB and of nearly one MiB (the broker's default record
  limit; `schemas.codec.MAX_EVENT_BYTES`).
* ``malformed``: JSON objects built from a valid event of the topic and then damaged: an unknown
  or missing or non-string ``event_type``, an unsupported ``schema_version`` (0, negative, too
  new, not an integer), a required field removed, a field replaced by a random JSON value,
  ``NaN``/``Infinity`` in a number, an integer literal longer than CPython's 4,300-digit limit,
  a lone UTF-16 surrogate escape in a text field, or unknown fields added. Some damages leave the
  event valid (an optional field replaced by ``null``, unknown fields): the oracle says which.
* ``valid``: events of the types the topic carries, built by hypothesis from the pydantic models
  of `schemas.events` (`model_strategy` walks each model's fields and turns their types and
  constraints into strategies), whose identifiers all start with ``fuzz`` and a tag of the
  topic (`id_prefix`): they belong to no campaign, node, VM, VNF or VNFM of a deployment.
  Keyed as the catalogue says (`TopicSpec.key_for`) except a few on purpose ("misrouted"),
  and with a random key when the key field is null.

**How the corpus is generated.** `generate` wraps a collector in ``@given(strategy)`` under
``settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate])`` and runs
it once: hypothesis calls it ``n`` times and every call appends its drawn case to a list. This
uses hypothesis' own engine (its distribution, its boundary values, its example limits) rather
than `strategy.example()`, which hypothesis documents as unfit for this; ``derandomize=True``
seeds the engine from the collector itself, so the same code yields the same corpus on every
run and every machine (a failure is reproducible by its case index); ``database=None`` keeps
no state between runs; shrinking is off, since the cases are the point and not a failure. The
Kafka part of a test is asynchronous, so the corpus is made up front and then produced.

`expected_reason` is the oracle: `schemas.codec.decode`, which every consumer uses, says which
records must be rejected and with which reason. A record on which ``decode`` raises instead of
returning an ``InvalidEvent`` (a bug: it must never raise) is expected as ``not_json``, the
reason its bytes deserve.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import string
import types
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel, ValidationError

from schemas.codec import MAX_EVENT_BYTES, InvalidEvent, decode, encode
from schemas.envelope import Event
from schemas.events import EVENTS_BY_TYPE, UpgradeRequested, VnfProfile
from schemas.topics import TopicSpec

RAW = "raw"
MALFORMED = "malformed"
VALID = "valid"
KINDS = (RAW, MALFORMED, VALID)

# Identifiers of the contract (`schemas.types`): ids start with "fuzz" so they name nothing real.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
_CAMPAIGN_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
_ID_ALPHABETS = {
    _NAME_PATTERN: string.ascii_letters + string.digits + "._:@-",
    _CAMPAIGN_PATTERN: string.ascii_lowercase + string.digits + "-",
}
FUZZ_PREFIX = "fuzz"

# Valid events left out of the corpus, and why.
EXCLUDED_VALID: dict[type[Event], str] = {
    UpgradeRequested: "a valid UpgradeRequested is not foreign: it starts a campaign (naming "
    "unknown nodes, the Upgrade Manager waits unknown_node_grace_s for their heartbeats inline, "
    "by design, then rejects it)",
}

# Dead-letter value cap of the consume loop (escalator.bus.consumer.MAX_DEAD_LETTER_VALUE_BYTES).
HALF_MIB = MAX_EVENT_BYTES // 2
# Near the broker's default record limit, leaving room for the key, headers and batch overhead.
NEAR_LIMIT = MAX_EVENT_BYTES - 8 * 1024


@dataclass(frozen=True)
class Case:
    """One record for one topic. `shape` says which generator made it."""

    topic: str  # catalogue name (without the deployment's prefix)
    kind: str
    shape: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    misrouted: bool = False  # a valid event deliberately keyed against the catalogue

    def describe(self) -> str:
        size = "null" if self.value is None else f"{len(self.value)} B"
        return f"{self.topic} {self.kind}/{self.shape} key={self.key!r:.40} value={size}"


# --- strategies from the pydantic models -----------------------------------------------------


def _constraints(metadata: Sequence[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    return found


def id_prefix(spec: TopicSpec) -> str:
    """``fuzz`` and a tag of the topic: events of different topics never name the same thing
    (hypothesis favours short ids, so two topics' ids would often meet by chance, and what one
    consumer does would then depend on the order in which another consumed its topic)."""
    return f"{FUZZ_PREFIX}{hashlib.sha256(spec.name.encode()).hexdigest()[:4]}"


def _id_strategy(alphabet: str, max_length: int, prefix: str) -> st.SearchStrategy[str]:
    room = max_length - len(prefix) - 1
    short = st.text(alphabet, max_size=min(room, 24))
    longest = st.text(alphabet, min_size=room, max_size=room)  # at the length limit
    tail = st.one_of(short, short, short, longest)
    return tail.map(lambda t: f"{prefix}-{t}")


def _string_strategy(c: dict[str, Any], prefix: str) -> st.SearchStrategy[str]:
    low = c.get("min_length", 0)
    high = c.get("max_length", 10_000)
    pattern = c.get("pattern")
    if pattern in _ID_ALPHABETS:
        return _id_strategy(_ID_ALPHABETS[pattern], high, prefix)
    if pattern is not None:
        return st.from_regex(pattern, fullmatch=pattern.endswith("$")).filter(
            lambda s: low <= len(s) <= high
        )
    short = st.text(min_size=low, max_size=max(low, min(high, 40)))
    longest = st.text(min_size=high, max_size=high) if high <= 2000 else short
    return st.one_of(short, short, short, longest)


def _number_strategy(kind: type, c: dict[str, Any]) -> st.SearchStrategy[Any]:
    if kind is int:
        low = c.get("ge", c["gt"] + 1 if "gt" in c else -(2**63))
        high = c.get("le", c["lt"] - 1 if "lt" in c else 2**63 - 1)
        # Counts, sizes and attempts: mostly small (so that cross-field rules hold), sometimes
        # anything within the bounds.
        small = st.integers(max(low, 0) if high >= 0 else low, min(high, max(low, 0) + 8))
        return st.one_of(small, small, st.integers(low, high))
    return st.floats(
        min_value=c.get("ge", c.get("gt")),
        max_value=c.get("le", c.get("lt")),
        exclude_min="gt" in c,
        exclude_max="lt" in c,
        allow_nan=False,
        allow_infinity=False,
    )


def type_strategy(
    annotation: Any, metadata: Sequence[Any] = (), prefix: str = FUZZ_PREFIX
) -> st.SearchStrategy[Any]:
    """Python values of `annotation` (a field's type) within the field's constraints;
    identifiers start with `prefix`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_strategy(args[0], [*args[1:], *metadata], prefix)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(type_strategy(a, metadata, prefix) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(args)
    c = _constraints(metadata)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            low = c.get("min_length", 0)
            high = min(c.get("max_length", low + 4), low + 4)
            items = type_strategy(args[0], (), prefix)
            return st.lists(items, min_size=low, max_size=high, unique=True).map(tuple)
        return st.tuples(*(type_strategy(a, (), prefix) for a in args))
    if annotation is type(None):
        return st.none()
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return model_strategy(annotation, prefix)
        if issubclass(annotation, Enum):
            return st.sampled_from(list(annotation))
        if annotation is bool:
            return st.booleans()
        if annotation in (int, float):
            return _number_strategy(annotation, c)
        if annotation is str:
            return _string_strategy(c, prefix)
        if annotation is uuid.UUID:
            return st.uuids()
        if issubclass(annotation, datetime):
            return st.datetimes(timezones=st.just(UTC))
    if annotation is AwareDatetime:
        return st.datetimes(timezones=st.just(UTC))
    raise NotImplementedError(f"no strategy for {annotation!r}")


def _validated(cls: type[BaseModel]) -> Callable[[dict[str, Any]], BaseModel | None]:
    def build(fields: dict[str, Any]) -> BaseModel | None:
        try:
            return cls.model_validate(fields)
        except ValidationError:  # a model validator refused the combination (e.g. sizes)
            return None

    return build


# Fields whose valid values depend on other fields (a model validator checks them): drawn
# within what the others allow, rather than drawn freely and mostly filtered out.
DEPENDENT_FIELDS: dict[type[BaseModel], dict[str, Callable[[dict[str, Any]], Any]]] = {
    VnfProfile: {
        "min_in_service": lambda f: st.integers(0, len(f["members"])),
        "max_unavailable": lambda f: st.integers(1, len(f["members"])),
    },
}


@cache
def model_strategy(cls: type[BaseModel], prefix: str = FUZZ_PREFIX) -> st.SearchStrategy[Any]:
    """Valid instances of `cls`: required fields always drawn, optional ones sometimes; combos
    that a model validator refuses are filtered out. `schema_version` keeps its default;
    identifiers start with `prefix`."""
    dependent = DEPENDENT_FIELDS.get(cls, {})
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in cls.model_fields.items():
        if name == "schema_version" or name in dependent:
            continue
        strategy = type_strategy(info.annotation, info.metadata, prefix)
        (required if info.is_required() else optional)[name] = strategy
    fields = st.fixed_dictionaries(required, optional=optional)
    if dependent:
        fields = fields.flatmap(
            lambda f: st.fixed_dictionaries(
                {name: draw_for(f) for name, draw_for in dependent.items()}
            ).map(lambda more: {**f, **more})
        )
    return fields.map(_validated(cls)).filter(lambda m: m is not None)


def valid_event_classes(spec: TopicSpec) -> list[type[Event]]:
    return [cls for cls in spec.events if cls not in EXCLUDED_VALID]


def event_strategy(spec: TopicSpec) -> st.SearchStrategy[Event]:
    """Valid, foreign events of the types `spec` carries."""
    prefix = id_prefix(spec)
    return st.sampled_from(valid_event_classes(spec)).flatmap(
        lambda cls: model_strategy(cls, prefix)
    )


# --- keys and headers ------------------------------------------------------------------------


def key_strategy(spec: TopicSpec) -> st.SearchStrategy[bytes | None]:
    """Keys that spread over the partitions; null keys only where the broker takes them (a
    compacted topic refuses a record without a key)."""
    keys: list[st.SearchStrategy[bytes | None]] = [
        st.binary(min_size=1, max_size=24),
        _id_strategy(_ID_ALPHABETS[_NAME_PATTERN], 64, id_prefix(spec)).map(str.encode),
        st.text(min_size=1, max_size=16).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ]
    if not spec.compacted:
        keys.append(st.none())
    return st.one_of(*keys)


HEADERS = st.lists(
    st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=40)), max_size=3
).map(tuple)


@st.composite
def headers_strategy(draw: st.DrawFn) -> tuple[tuple[str, bytes], ...]:
    # Most records carry none; some carry random ones (kept whole in their dead letter).
    if draw(st.integers(0, 9)) != 0:
        return ()
    result: tuple[tuple[str, bytes], ...] = draw(HEADERS)
    return result


# --- raw bytes -------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
NOT_UTF8 = (b"\xff", b"\xfe\xff", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80")


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def raw_value(
    draw: st.DrawFn, spec: TopicSpec, bases: st.SearchStrategy[Event] | None = None
) -> tuple[str, bytes | None]:
    """(shape, value) of a record that is not an event object; `bases` gives the valid events
    it damages (default: `event_strategy(spec)`)."""
    bases = event_strategy(spec) if bases is None else bases
    shape = draw(
        st.sampled_from(
            ["random bytes"] * 6
            + ["truncated JSON"] * 5
            + ["not UTF-8"] * 4
            + ["JSON non-object"] * 4
            + ["BOM / UTF-16 / trailing bytes"] * 2
            + ["deep nesting"] * 1
            + ["empty"] * 1
            + ["tombstone"] * 1
            + ["huge"] * 1
        )
    )
    if shape == "random bytes":
        return shape, draw(st.binary(max_size=400))
    if shape == "empty":
        return shape, b""
    if shape == "tombstone":  # a null value: a deletion on a compacted topic, nothing elsewhere
        return shape, None
    if shape == "huge":
        size = draw(st.sampled_from([HALF_MIB - 1, HALF_MIB + 1, NEAR_LIMIT]))
        fill = draw(st.sampled_from(["text", "not utf-8", "event with a huge field", "array"]))
        if fill == "text":
            return f"huge {fill}", b"x" * size
        if fill == "not utf-8":
            return f"huge {fill}", b"\xff" * size
        if fill == "array":
            return f"huge {fill}", b"[" + b"0," * ((size - 3) // 2) + b"0]"
        body = json.loads(encode(draw(bases)))
        body["producer"] = "p" * size  # max 200 characters
        return f"huge {fill}", _dump(body)
    if shape == "deep nesting":
        depth = draw(st.sampled_from([800, 5_000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return shape, opener * depth + b"1" + closer * depth
    if shape == "JSON non-object":
        value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
        return shape, _dump(value)
    whole = encode(draw(bases))
    if shape == "truncated JSON":
        return shape, whole[: draw(st.integers(0, len(whole) - 1))]
    if shape == "not UTF-8":
        at = draw(st.integers(0, len(whole)))
        return shape, whole[:at] + draw(st.sampled_from(NOT_UTF8)) + whole[at:]
    how = draw(st.sampled_from(["bom", "utf-16", "trailing"]))
    if how == "bom":
        return shape, b"\xef\xbb\xbf" + whole
    if how == "utf-16":
        return shape, whole.decode().encode("utf-16")
    return shape, whole + draw(st.binary(min_size=1, max_size=8).filter(lambda b: b.strip()))


# --- malformed objects -----------------------------------------------------------------------

BAD_VERSIONS: list[Any] = [0, -1, 2, 3, 99, 2**31, 2**63, 10**30, "1", 1.5, 1.0, True, None, [1]]
NON_STRINGS: list[Any] = [None, 0, 1, True, [], {}, ["NodeUpgraded"], {"name": "NodeUpgraded"}]
FREE_TEXT = ("producer", "reason", "detail", "holder", "requested_by", "agent_id")


def _required_payload(cls: type[Event]) -> list[str]:
    return [n for n, f in cls.model_fields.items() if f.is_required() and n != "event_type"]


@st.composite
def malformed_value(
    draw: st.DrawFn, spec: TopicSpec, bases: st.SearchStrategy[Event] | None = None
) -> tuple[str, bytes]:
    """(shape, value) of a JSON object that looks like an event of `spec` and may not be one;
    `bases` gives the valid events it damages (default: `event_strategy(spec)`)."""
    event = draw(event_strategy(spec) if bases is None else bases)
    body: dict[str, Any] = json.loads(encode(event))
    cls = type(event)
    fields = [n for n in body if n != "event_type"]
    shape = draw(
        st.sampled_from(
            [
                "unknown event_type",
                "missing event_type",
                "non-string event_type",
                "unsupported schema_version",
                "required field missing",
                "field of a random JSON value",
                "NaN / Infinity",
                "integer beyond 4300 digits",
                "lone surrogate",
                "unknown extra fields",
            ]
        )
    )
    if shape == "unknown event_type":
        name = draw(st.text(max_size=60))
        body["event_type"] = name if name not in EVENTS_BY_TYPE else name + "X"
    elif shape == "missing event_type":
        del body["event_type"]
    elif shape == "non-string event_type":
        body["event_type"] = draw(st.sampled_from(NON_STRINGS))
    elif shape == "unsupported schema_version":
        body["schema_version"] = draw(st.sampled_from(BAD_VERSIONS))
    elif shape == "required field missing":
        required = _required_payload(cls)
        if required:
            del body[draw(st.sampled_from(required))]
        else:  # pragma: no cover - every event has a payload field today
            body["event_id"] = "not-a-uuid"
    elif shape == "field of a random JSON value":
        body[draw(st.sampled_from(fields))] = draw(JSON_VALUES)
    elif shape == "NaN / Infinity":
        numeric = [n for n in fields if isinstance(body[n], int | float)] or ["schema_version"]
        body[draw(st.sampled_from(numeric))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
    elif shape == "integer beyond 4300 digits":
        digits = draw(st.integers(4301, 6000))
        name = draw(st.sampled_from(fields))
        marker = "@@HUGE@@"
        body[name] = marker
        text = _dump(body).replace(f'"{marker}"'.encode(), b"7" * digits)
        return shape, text
    elif shape == "lone surrogate":
        texts = [n for n in FREE_TEXT if isinstance(body.get(n), str)] or ["producer"]
        name = draw(st.sampled_from(texts))
        body[name] = "fuzz\ud800" + draw(st.sampled_from(["", "\udfff", "x"]))
        return shape, json.dumps(body, ensure_ascii=True).encode()
    else:  # unknown extra fields: still a valid event (extra fields are ignored)
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=12), JSON_VALUES, max_size=3))
        body.update({k: v for k, v in extra.items() if k not in body})
    return shape, _dump(body)


# --- cases -----------------------------------------------------------------------------------


@st.composite
def case_strategy(
    draw: st.DrawFn, spec: TopicSpec, kind: str, bases: st.SearchStrategy[Event] | None = None
) -> Case:
    headers = draw(headers_strategy())
    if kind == VALID:
        event = draw(event_strategy(spec))
        misrouted = spec.co_partitioned and draw(st.integers(0, 9)) == 0
        try:
            key = None if misrouted else spec.key_for(event)
        except ValueError:  # the key field is null (e.g. a campaign-less event)
            key = None
        if key is None:
            key = draw(key_strategy(spec))
        return Case(spec.name, VALID, event.event_type, key, encode(event), headers, misrouted)
    if kind == RAW:
        shape, value = draw(raw_value(spec, bases))
    else:
        shape, value = draw(malformed_value(spec, bases))
    key = draw(key_strategy(spec))
    if key is None and value is None:  # a record needs one of them
        key = draw(st.binary(min_size=1, max_size=24))
    return Case(spec.name, kind, shape, key, value, headers)


def generate(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """`n` examples of `strategy` from hypothesis' engine, the same on every run (see the module
    doc). May return fewer if the strategy has fewer distinct examples."""
    found: list[Any] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


def corpus(spec: TopicSpec, counts: dict[str, int]) -> list[Case]:
    """The cases for one topic: `counts[kind]` of each kind, in a fixed interleaved order.

    The valid cases come first; the raw and malformed ones damage events sampled from them
    (drawing a whole new event for each would triple the generation time, for no new shape).
    """
    per_kind = {VALID: generate(case_strategy(spec, VALID), counts.get(VALID, 0))}
    events = [e for c in per_kind[VALID] if isinstance(e := decode(c.value), Event)]
    bases = st.sampled_from(events) if events else event_strategy(spec)
    for kind in (RAW, MALFORMED):
        per_kind[kind] = generate(case_strategy(spec, kind, bases), counts.get(kind, 0))
    mixed: list[Case] = []
    longest = max((len(v) for v in per_kind.values()), default=0)
    for i in range(longest):
        for kind in KINDS:
            cases = per_kind.get(kind, [])
            if i < len(cases):
                mixed.append(cases[i])
    return mixed


# --- the oracle ------------------------------------------------------------------------------


def expected_reason(value: bytes | None) -> str | None:
    """The dead-letter reason a consumer must give the value; None if it is a valid event.

    Where `decode` raises (it must not), the record is still bad and deserves ``not_json``.
    """
    try:
        decoded = decode(value)
    except Exception:
        return "not_json"
    return decoded.reason.value if isinstance(decoded, InvalidEvent) else None


def decode_raises(value: bytes | None) -> str | None:
    """The exception `decode` raises on the value, or None (it returned)."""
    try:
        decode(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    return None


# --- the corpus on disk ----------------------------------------------------------------------

# What the corpus depends on: a change to any of these makes a new one.
_CORPUS_INPUTS = (
    "tests/integration/fuzz_support.py",
    "schemas/events.py",
    "schemas/types.py",
    "schemas/envelope.py",
    "schemas/topics.py",
)


def corpus_digest(counts: dict[str, int]) -> str:
    import hashlib

    import hypothesis
    import pydantic

    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for name in _CORPUS_INPUTS:
        h.update((root / name).read_bytes())
    h.update(f"{hypothesis.__version__} {pydantic.VERSION} {sorted(counts.items())}".encode())
    return h.hexdigest()[:16]


def _to_json(case: Case) -> dict[str, Any]:
    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode()

    return {
        "topic": case.topic,
        "kind": case.kind,
        "shape": case.shape,
        "key": b64(case.key),
        "value": b64(case.value),
        "headers": [[k, b64(v)] for k, v in case.headers],
        "misrouted": case.misrouted,
    }


def _from_json(data: dict[str, Any]) -> Case:
    def raw(text: str | None) -> bytes | None:
        return None if text is None else base64.b64decode(text)

    return Case(
        topic=data["topic"],
        kind=data["kind"],
        shape=data["shape"],
        key=raw(data["key"]),
        value=raw(data["value"]),
        headers=tuple((k, raw(v) or b"") for k, v in data["headers"]),
        misrouted=data["misrouted"],
    )


def topic_corpus_json(topic: str, counts: dict[str, int]) -> list[dict[str, Any]]:
    """`corpus` of the catalogue topic named `topic`, as JSON-ready dicts (for a worker process:
    generation takes a few seconds per topic, so a test runs topics in parallel)."""
    from schemas.topics import ALL_TOPICS

    spec = next(s for s in ALL_TOPICS if s.name == topic)
    return [_to_json(c) for c in corpus(spec, counts)]


def load_corpus(path: Path) -> dict[str, list[Case]] | None:
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return {topic: [_from_json(c) for c in cases] for topic, cases in data.items()}


def save_corpus(path: Path, cases: dict[str, list[dict[str, Any]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(cases, f)
    tmp.replace(path)
    for old in path.parent.glob("corpus-*.json.gz"):  # made by older code: never read again
        if old != path:
            old.unlink(missing_ok=True)
