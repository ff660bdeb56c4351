"""Delivery faults for tests: a consumer that redelivers, delays and holds back records.

Tests only (issue 6, "delivery faults"). `FaultyConsumer` wraps a started-or-not
`AIOKafkaConsumer`, delegates every attribute to it and overrides `getmany` (and `stop`, to log
what it did). It injects only what Kafka itself can do to a consumer, so a service that is
correct under Kafka's guarantees must reach the same outcome with it:

* **redelivery**: after a partition's batch is returned, the partition is `seek`-ed back to the
  offset of a record inside that batch, so a suffix of the batch comes again, in order, on a
  later `getmany` (what a rebalance or a crash before the commit does). A partition is rewound
  only by a batch that brought at least one record never returned before, so it always
  progresses;
* **delay**: a random sleep (up to `delay_ms`) before each fetch, so records wait longer;
* **hold**: one partition's batch is withheld from this call (the partition is `seek`-ed back
  to the batch's first offset) and comes on a later call, so that partition lags behind the
  others (Kafka orders records within a partition only). A partition is never held twice in a
  row.

Never a record dropped, never two records of a partition swapped: per partition the records
returned are the partition's records in offset order, where a rewind starts again from an
offset returned in the previous batch of that partition.

Decisions come from `random.Random(f"{seed}/{name}")`, drawn in sorted partition order, so a
given sequence of fetched batches gives the same faults for the same seed and name.

Configured by one string, usually from the environment variable `ESCALATOR_TEST_DELIVERY_FAULTS`
(`seed=7,redeliver=0.2,delay_ms=50,hold=0.1`); each service's `__main__` wraps the consumer of
its main input when it is set, and only then. Unset, nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar, cast

from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

__all__ = [
    "ENV_VAR",
    "DeliveryFaults",
    "DeliveryFaultsError",
    "FaultCounts",
    "FaultyConsumer",
    "from_env_or_exit",
    "latest_summaries",
    "parse_summary",
]

log = logging.getLogger(__name__)

ENV_VAR = "ESCALATOR_TEST_DELIVERY_FAULTS"
# The one-line summary (at stop, and every SUMMARY_EVERY_S while faults happen): tests parse it.
SUMMARY_PREFIX = "delivery faults"
SUMMARY_EVERY_S = 5.0

C = TypeVar("C")


class DeliveryFaultsError(ValueError):
    """A delivery-faults string that cannot be parsed (the message says what and where)."""


@dataclass(frozen=True)
class DeliveryFaults:
    """What to inject: probabilities per partition batch (`redeliver`), per call (`hold`),
    and the longest sleep before a fetch in milliseconds (`delay_ms`)."""

    seed: int = 0
    redeliver: float = 0.0
    delay_ms: int = 0
    hold: float = 0.0

    def __post_init__(self) -> None:
        for name in ("redeliver", "hold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DeliveryFaultsError(f"{ENV_VAR}: {name}={value} is not between 0 and 1")
        if self.delay_ms < 0:
            raise DeliveryFaultsError(f"{ENV_VAR}: delay_ms={self.delay_ms} is negative")

    @classmethod
    def parse(cls, text: str) -> DeliveryFaults:
        """`"seed=7,redeliver=0.2,delay_ms=50,hold=0.1"` (any subset, any order)."""
        known = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or not all(items):
            raise DeliveryFaultsError(
                f"{ENV_VAR}: {text!r}: expected comma-separated key=value items "
                f"(keys: {', '.join(known)}), e.g. 'seed=7,redeliver=0.2,delay_ms=50,hold=0.1'"
            )
        for item in items:
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or not raw:
                raise DeliveryFaultsError(f"{ENV_VAR}: {item!r} in {text!r} is not key=value")
            if key not in known:
                raise DeliveryFaultsError(
                    f"{ENV_VAR}: unknown key {key!r} in {text!r} (keys: {', '.join(known)})"
                )
            if key in values:
                raise DeliveryFaultsError(f"{ENV_VAR}: {key!r} given twice in {text!r}")
            kind = int if key in ("seed", "delay_ms") else float
            try:
                values[key] = kind(raw)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise DeliveryFaultsError(
                    f"{ENV_VAR}: {key}={raw!r} in {text!r} is not {what}"
                ) from None
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeliveryFaults | None:
        """The faults `ESCALATOR_TEST_DELIVERY_FAULTS` asks for; None if unset or empty."""
        text = (os.environ if environ is None else environ).get(ENV_VAR, "")
        return cls.parse(text) if text.strip() else None

    def wrap(self, consumer: C, *, name: str) -> C:
        """`consumer` behind a `FaultyConsumer` (typed as what it wraps: it delegates every
        attribute but `getmany` and `stop`)."""
        return cast(C, FaultyConsumer(consumer, self, name=name))

    def wrapper(self, name: str) -> Callable[[C], C]:
        """A function that wraps a consumer (for wiring functions taking a factory)."""

        def wrap(consumer: C) -> C:
            return self.wrap(consumer, name=name)

        return wrap

    def describe(self) -> str:
        return (
            f"seed={self.seed},redeliver={self.redeliver},delay_ms={self.delay_ms},hold={self.hold}"
        )


def from_env_or_exit(
    service: str, environ: Mapping[str, str] | None = None
) -> DeliveryFaults | None:
    """For a service's `main()`: the faults from the environment, or exit 2 after one line
    on stderr if the variable is set but malformed."""
    try:
        return DeliveryFaults.from_env(environ)
    except DeliveryFaultsError as exc:
        print(f"{service}: bad setting {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class FaultCounts:
    calls: int = 0
    batches: int = 0  # partition batches fetched from the real consumer
    records: int = 0  # records fetched from the real consumer
    returned: int = 0  # records handed to the caller (redelivered ones count again)
    redeliveries: int = 0  # rewinds after a returned batch
    redelivered_records: int = 0  # records those rewinds will deliver again
    holds: int = 0  # partition batches withheld
    held_records: int = 0
    delays: int = 0  # fetches slept before, that then returned records
    delay_ms: int = 0  # total sleep before those fetches
    seek_failures: int = 0  # a fault not injected: the partition was not assigned

    def line(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @property
    def injected(self) -> int:
        return self.redeliveries + self.holds + self.delays


@dataclass
class _PartitionState:
    frontier: int = -1  # highest offset returned so far, plus one
    held_last: bool = False


class FaultyConsumer:
    """An `AIOKafkaConsumer` stand-in that injects `DeliveryFaults` into `getmany`."""

    def __init__(self, consumer: Any, faults: DeliveryFaults, *, name: str) -> None:
        self._consumer = consumer
        self.faults = faults
        self.name = name
        self.counts = FaultCounts()
        self._rng = random.Random(f"{faults.seed}/{name}")
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._last_summary = time.monotonic()
        self._summarised: int | None = None
        log.info("%s [%s] injecting %s", SUMMARY_PREFIX, name, faults.describe())

    def __getattr__(self, attr: str) -> Any:
        if attr == "_consumer":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attr)
        return getattr(self._consumer, attr)

    @property
    def wrapped(self) -> Any:
        return self._consumer

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        faults, counts = self.faults, self.counts
        counts.calls += 1
        sleep_ms = round(self._rng.uniform(0, faults.delay_ms)) if faults.delay_ms else 0
        if sleep_ms:
            # Before the fetch: fetching, choosing and seeking then happen with no await in
            # between, so the assignment cannot change under the faults.
            await asyncio.sleep(sleep_ms / 1000)
        fetched = await self._consumer.getmany(
            *partitions, timeout_ms=timeout_ms, max_records=max_records
        )
        result: dict[TopicPartition, list[Any]] = {tp: list(r) for tp, r in fetched.items() if r}
        if not result:
            return result
        counts.batches += len(result)
        counts.records += sum(len(r) for r in result.values())
        if sleep_ms:
            counts.delays += 1
            counts.delay_ms += sleep_ms
        self._hold_one(result)
        self._rewind(result)
        counts.returned += sum(len(r) for r in result.values())
        self._maybe_summarise()
        return result

    def _state(self, tp: TopicPartition) -> _PartitionState:
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = _PartitionState()
        return state

    def _seek(self, tp: TopicPartition, offset: int) -> bool:
        try:
            if tp not in self._consumer.assignment():
                raise IllegalStateError(f"{tp} is not assigned")
            self._consumer.seek(tp, offset)
        except (IllegalStateError, ValueError, AssertionError) as exc:
            self.counts.seek_failures += 1
            log.debug("%s [%s]: no fault on %s: %r", SUMMARY_PREFIX, self.name, tp, exc)
            return False
        return True

    def _hold_one(self, result: dict[TopicPartition, list[Any]]) -> None:
        """Withhold one partition's batch (never the one held on the previous call)."""
        if not self.faults.hold:
            return
        draw = self._rng.random()
        candidates = sorted(tp for tp in result if not self._state(tp).held_last)
        for tp in result:
            self._state(tp).held_last = False
        if draw >= self.faults.hold or not candidates:
            return
        tp = self._rng.choice(candidates)
        records = result[tp]
        if not self._seek(tp, records[0].offset):
            return
        del result[tp]
        self._state(tp).held_last = True
        self.counts.holds += 1
        self.counts.held_records += len(records)

    def _rewind(self, result: dict[TopicPartition, list[Any]]) -> None:
        """Return each batch, and maybe rewind its partition to a record inside it."""
        for tp in sorted(result):
            records = result[tp]
            state = self._state(tp)
            brings_new = records[-1].offset >= state.frontier
            state.frontier = max(state.frontier, records[-1].offset + 1)
            if not self.faults.redeliver:
                continue
            draw = self._rng.random()
            index = self._rng.randrange(len(records))
            if draw >= self.faults.redeliver or not brings_new:
                continue
            if self._seek(tp, records[index].offset):
                self.counts.redeliveries += 1
                self.counts.redelivered_records += len(records) - index

    def summary(self) -> str:
        return f"{SUMMARY_PREFIX} [{self.name}]: {self.counts.line()}"

    def _maybe_summarise(self) -> None:
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY_S and self._summarised != self.counts.injected:
            self._last_summary = now
            self._summarised = self.counts.injected
            log.info("%s", self.summary())

    async def stop(self) -> None:
        log.info("%s (at stop)", self.summary())
        await self._consumer.stop()


def parse_summary(line: str) -> tuple[str, dict[str, int]] | None:
    """(name, counters) from a summary line (as logged), or None if `line` is not one."""
    marker = f"{SUMMARY_PREFIX} ["
    start = line.find(marker)
    if start < 0:
        return None
    rest = line[start + len(marker) :]
    name, sep, tail = rest.partition("]: ")
    if not sep:
        return None
    counters: dict[str, int] = {}
    for item in tail.split():
        key, eq, value = item.partition("=")
        if eq and value.isdigit():
            counters[key] = int(value)
    return (name, counters) if counters else None


def latest_summaries(lines: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per wrapped consumer name, its last summary among `lines` (counters only grow)."""
    found: dict[str, dict[str, int]] = {}
    for line in lines:
        parsed = parse_summary(line)
        if parsed is not None:
            found[parsed[0]] = parsed[1]
    return found
