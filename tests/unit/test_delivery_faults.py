"""The delivery-faults consumer wrapper (`escalator.bus.faults`) against a fake consumer.

The fake behaves like an `AIOKafkaConsumer` on manually assigned partitions: a position per
partition, `getmany` returns up to `max_records` records from the positions and advances them,
`seek` moves a position (and refuses an unassigned partition). Offsets have gaps, as on a
compacted topic. The checks are Kafka's: per partition, records come in offset order, where a
batch may start again inside the previous batch (a redelivery) but never skips a record, and
every record is delivered at least once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

from escalator.bus.faults import (
    ENV_VAR,
    DeliveryFaults,
    DeliveryFaultsError,
    FaultyConsumer,
    from_env_or_exit,
    latest_summaries,
    parse_summary,
)

pytestmark = pytest.mark.unit

TOPIC = "t.inputs"


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    value: bytes


class FakeConsumer:
    def __init__(self, logs: dict[int, list[int]], *, fetch_seed: int = 0) -> None:
        self.logs = {
            TopicPartition(TOPIC, p): [Rec(TOPIC, p, o, f"{p}:{o}".encode()) for o in offsets]
            for p, offsets in logs.items()
        }
        self._assigned = set(self.logs)
        self.positions = {tp: (recs[0].offset if recs else 0) for tp, recs in self.logs.items()}
        self._rng = random.Random(fetch_seed)
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.stopped = False

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._assigned:
            raise IllegalStateError(f"{tp} not assigned")
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    async def stop(self) -> None:
        self.stopped = True

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Rec]]:
        budget = max_records or 10_000
        out: dict[TopicPartition, list[Rec]] = {}
        for tp in sorted(partitions or self._assigned):
            if budget <= 0:
                break
            take = min(budget, self._rng.randint(1, 4))  # fetches of varying sizes
            recs = [r for r in self.logs[tp] if r.offset >= self.positions[tp]][:take]
            if recs:
                out[tp] = recs
                budget -= len(recs)
                self.positions[tp] = recs[-1].offset + 1
        return out

    def exhausted(self) -> bool:
        return all(
            not recs or self.positions[tp] > recs[-1].offset for tp, recs in self.logs.items()
        )


LOGS = {
    0: list(range(0, 40)),
    1: [0, 2, 3, 7, 8, 9, 15, 16, 30, 31, 32, 40, 41, 42, 43],  # gaps: a compacted topic
    2: list(range(100, 125)),
    3: [],
}


async def drain(
    faults: DeliveryFaults, *, fetch_seed: int = 0, name: str = "svc", max_records: int = 5
) -> tuple[FaultyConsumer, FakeConsumer, list[list[Rec]]]:
    """Poll until every partition is read to its end and one more call brings nothing;
    returns the wrapper, the fake, and every call's records (per partition, in order)."""
    fake = FakeConsumer(LOGS, fetch_seed=fetch_seed)
    wrapped = FaultyConsumer(fake, faults, name=name)
    calls: list[list[Rec]] = []
    for _ in range(2000):
        got = await wrapped.getmany(timeout_ms=10, max_records=max_records)
        calls.append([r for tp in sorted(got) for r in got[tp]])
        if fake.exhausted() and not got:
            break
    else:  # pragma: no cover - the wrapper must always progress
        raise AssertionError("never drained")
    return wrapped, fake, calls


def per_partition_batches(calls: list[list[Rec]]) -> dict[int, list[list[Rec]]]:
    batches: dict[int, list[list[Rec]]] = defaultdict(list)
    for call in calls:
        grouped: dict[int, list[Rec]] = defaultdict(list)
        for r in call:
            grouped[r.partition].append(r)
        for p, recs in grouped.items():
            batches[p].append(recs)
    return batches


def assert_kafka_order(calls: list[list[Rec]]) -> int:
    """Per partition: each batch is consecutive log records; it starts at the log's start,
    right after the previous batch, or inside the previous batch (a redelivery); every record
    comes at least once. Returns how many batches started inside the previous one."""
    rewinds = 0
    for p, batches in per_partition_batches(calls).items():
        log_offsets = LOGS[p]
        succ = {a: b for a, b in itertools.pairwise(log_offsets)}
        previous: list[Rec] | None = None
        for batch in batches:
            for a, b in itertools.pairwise(batch):
                assert succ.get(a.offset) == b.offset, f"p{p}: {a.offset} then {b.offset}"
            first = batch[0].offset
            if previous is None:
                assert first == log_offsets[0], f"p{p} starts at {first}"
            elif first == succ.get(previous[-1].offset):
                pass
            else:
                inside = {r.offset for r in previous}
                assert first in inside, (
                    f"p{p}: batch at {first} after {[r.offset for r in previous]}: "
                    "neither the next record nor a redelivery from the batch just returned"
                )
                rewinds += 1
            previous = batch
        delivered = {r.offset for batch in batches for r in batch}
        assert delivered == set(log_offsets), f"p{p}: missing {set(log_offsets) - delivered}"
    for p, offsets in LOGS.items():
        if offsets:
            assert p in per_partition_batches(calls), f"p{p} never delivered"
    return rewinds


async def test_no_faults_is_the_consumer_itself() -> None:
    wrapped, fake, calls = await drain(DeliveryFaults(seed=1))
    plain = FakeConsumer(LOGS)
    expected = []
    while True:
        got = await plain.getmany(timeout_ms=10, max_records=5)
        expected.append([r for tp in sorted(got) for r in got[tp]])
        if plain.exhausted() and not got:
            break
    assert calls == expected
    assert fake.seeks == []
    assert wrapped.counts.injected == 0


@pytest.mark.parametrize("seed", range(8))
async def test_redeliveries_and_holds_keep_partition_order_and_lose_nothing(seed: int) -> None:
    faults = DeliveryFaults(seed=seed, redeliver=0.4, hold=0.4)
    wrapped, _, calls = await drain(faults, fetch_seed=seed)
    rewinds = assert_kafka_order(calls)
    c = wrapped.counts
    assert c.redeliveries > 0 and c.holds > 0, c
    assert rewinds == c.redeliveries, (rewinds, c)
    total = sum(len(v) for v in LOGS.values())
    # Each record once, plus each redelivered suffix once more.
    assert c.returned == total + c.redelivered_records, c
    assert c.records == c.returned + c.held_records, c


async def test_the_checker_catches_a_skip_and_a_swap() -> None:
    """The order check above is not vacuous: a dropped record or two swapped records fail it."""
    _, _, calls = await drain(DeliveryFaults(seed=3, redeliver=0.3, hold=0.3))
    dropped = [list(call) for call in calls]
    victim = next(i for i, call in enumerate(dropped) if len(call) >= 3)
    del dropped[victim][1]
    with pytest.raises(AssertionError):
        assert_kafka_order(dropped)
    swapped = [list(call) for call in calls]
    victim, i, j = next(
        (n, i, j)
        for n, call in enumerate(swapped)
        for i, j in itertools.pairwise(range(len(call)))
        if call[i].partition == call[j].partition
    )
    swapped[victim][i], swapped[victim][j] = swapped[victim][j], swapped[victim][i]
    with pytest.raises(AssertionError):
        assert_kafka_order(swapped)


async def test_same_seed_same_faults_other_seed_other_faults() -> None:
    faults = DeliveryFaults(seed=7, redeliver=0.3, hold=0.3, delay_ms=1)
    first, _, calls1 = await drain(faults)
    second, _, calls2 = await drain(faults)
    assert calls1 == calls2
    assert first.counts == second.counts
    _, _, calls3 = await drain(DeliveryFaults(seed=8, redeliver=0.3, hold=0.3, delay_ms=1))
    assert calls3 != calls1
    # The name is part of the stream: two services with one seed do not fault in lockstep.
    _, _, calls4 = await drain(faults, name="other-service")
    assert calls4 != calls1


async def test_delay_sleeps_before_the_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("escalator.bus.faults.asyncio.sleep", fake_sleep)
    wrapped, _, calls = await drain(DeliveryFaults(seed=2, delay_ms=40))
    assert_kafka_order(calls)
    assert slept and max(slept) <= 0.04 and any(s > 0 for s in slept)
    assert wrapped.counts.delays > 0
    assert 0 < wrapped.counts.delay_ms <= sum(s * 1000 for s in slept) + 1e-6


async def test_no_fault_on_a_partition_not_assigned() -> None:
    """A partition that moved away cannot be seeked: its batch is returned as fetched."""
    fake = FakeConsumer({0: list(range(10))})
    wrapped = FaultyConsumer(fake, DeliveryFaults(seed=0, redeliver=1.0, hold=1.0), name="x")
    fake._assigned = set()  # revoked between the fetch and the fault (the fake allows it)
    got = await wrapped.getmany(TopicPartition(TOPIC, 0), timeout_ms=0, max_records=5)
    assert [r.offset for r in got[TopicPartition(TOPIC, 0)]] == list(
        range(len(got[TopicPartition(TOPIC, 0)]))
    )
    assert wrapped.counts.holds == 0 and wrapped.counts.redeliveries == 0
    assert wrapped.counts.seek_failures >= 1


async def test_delegates_and_logs_a_parsable_summary_at_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="escalator.bus.faults")
    wrapped, fake, _ = await drain(DeliveryFaults(seed=5, redeliver=0.5, hold=0.2), name="um/1")
    tp = TopicPartition(TOPIC, 0)
    await wrapped.commit({tp: 3})
    assert fake.commits == [{tp: 3}]
    assert wrapped.assignment() == fake.assignment()
    await wrapped.stop()
    assert fake.stopped
    summaries = latest_summaries([r.getMessage() for r in caplog.records])
    assert summaries["um/1"]["redeliveries"] == wrapped.counts.redeliveries > 0
    assert summaries["um/1"]["holds"] == wrapped.counts.holds
    assert parse_summary("delivery faults [x] injecting seed=1,redeliver=0.1") is None


def test_parse_a_full_string() -> None:
    f = DeliveryFaults.parse("seed=7,redeliver=0.2,delay_ms=50,hold=0.1")
    assert f == DeliveryFaults(seed=7, redeliver=0.2, delay_ms=50, hold=0.1)
    assert DeliveryFaults.parse(" hold = 0.5 , seed=3 ") == DeliveryFaults(seed=3, hold=0.5)
    assert DeliveryFaults.parse(f.describe()) == f


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("seed=7,redeliver=0.2,bogus=1", "unknown key 'bogus'"),
        ("seed=seven", "seed='seven'"),
        ("redeliver=lots", "is not a number"),
        ("delay_ms=1.5", "is not an integer"),
        ("seed=7,,hold=0.1", "comma-separated key=value"),
        ("seed", "is not key=value"),
        ("seed=", "is not key=value"),
        ("redeliver=1.5", "not between 0 and 1"),
        ("hold=-0.1", "not between 0 and 1"),
        ("delay_ms=-5", "negative"),
        ("seed=1,seed=2", "given twice"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(DeliveryFaultsError) as caught:
        DeliveryFaults.parse(text)
    message = str(caught.value)
    assert ENV_VAR in message and needle in message, message


def test_from_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert DeliveryFaults.from_env({}) is None
    assert DeliveryFaults.from_env({ENV_VAR: "  "}) is None
    assert DeliveryFaults.from_env({ENV_VAR: "seed=2,hold=0.3"}) == DeliveryFaults(seed=2, hold=0.3)
    with pytest.raises(SystemExit) as exited:
        from_env_or_exit("cloud manager", {ENV_VAR: "seed=2,nope=1"})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cloud manager: bad setting ") and "unknown key 'nope'" in err
    assert err.count("\n") == 1
