"""`escalator dlq list|replay`: inspect the dead-letter topic and re-drive what it holds.

Every consumer that cannot use a record writes it, whole, to `escalator.deadletter.v1` with the
reason (see `schemas.deadletter.DeadLetter`). A dead letter is named by its own position on that
topic, `<partition>:<offset>`, which never changes.

Replay sends the original key, value and headers back to the source topic, plus a header
`escalator-replayed-from: dlq:<partition>:<offset>` so the replayed record is traceable. By
default only records that now decode as valid events are replayed (after an upgrade that added an
upcaster, or once a producer was fixed, for example); the others are reported with the reason
they would be rejected again. `--force` replays them anyway. Consumers deduplicate by event id,
so replaying a record that was in fact processed does no harm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.table import Table

from escalator.bus.connection import make_producer
from escalator.bus.readback import scan
from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, decode
from schemas.deadletter import DeadLetter
from schemas.topics import DEAD_LETTERS_TOPIC

REPLAY_HEADER = "escalator-replayed-from"


@dataclass(frozen=True)
class Entry:
    """One dead letter and where it sits on the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **self.letter.model_dump(mode="json")}


@dataclass(frozen=True)
class Filter:
    source_topic: str | None = None
    reason: str | None = None
    event_type: str | None = None
    since: datetime | None = None

    def keeps(self, letter: DeadLetter) -> bool:
        return (
            (self.source_topic is None or self.source_topic in letter.source_topic)
            and (self.reason is None or letter.reason == self.reason)
            and (self.event_type is None or letter.event_type == self.event_type)
            and (self.since is None or letter.dead_lettered_at >= self.since)
        )


def parse_id(text: str) -> tuple[int, int]:
    """`<partition>:<offset>` -> the pair; ValueError with a readable message otherwise."""
    partition, sep, offset = text.partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"dead-letter id {text!r} is not <partition>:<offset>, e.g. 0:17")
    return int(partition), int(offset)


async def read_entries(settings: KafkaSettings, keep: Filter = Filter()) -> list[Entry]:
    """Every dead letter on the topic that `keep` keeps, oldest first per partition.

    A record on the dead-letter topic that is not a DeadLetter (written by hand, say) is listed
    with reason `unreadable_dead_letter`, never dropped.
    """
    found: list[Entry] = []
    async for record in scan(settings, settings.topic(DEAD_LETTERS_TOPIC)):
        letter = _letter(record)
        if keep.keeps(letter):
            found.append(Entry(record.partition, record.offset, letter))
    return found


def _letter(record: Any) -> DeadLetter:
    try:
        return DeadLetter.model_validate_json(record.value or b"")
    except ValueError as err:
        return DeadLetter(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            consumer_group="",
            consumer="",
            reason="unreadable_dead_letter",
            detail=str(err)[:500],
            value_b64=DeadLetter.b64(record.value),
        )


@dataclass(frozen=True)
class Replay:
    entry: Entry
    sent: bool
    note: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.entry.id,
            "source_topic": self.entry.letter.source_topic,
            "sent": self.sent,
            "note": self.note,
        }


def still_invalid(letter: DeadLetter) -> str:
    """Why the record would be rejected again by its decoder, or "" if it now decodes."""
    value = letter.value()
    if value is None:
        return "no value to replay (a tombstone or an unreadable dead letter)"
    decoded = decode(value)
    return str(decoded) if isinstance(decoded, InvalidEvent) else ""


def select(entries: Sequence[Entry], ids: Iterable[str]) -> list[Entry]:
    """The entries named by id, in the order named; ValueError naming any unknown id."""
    wanted = [parse_id(i) for i in ids]
    by_position = {(e.partition, e.offset): e for e in entries}
    missing = [f"{p}:{o}" for p, o in wanted if (p, o) not in by_position]
    if missing:
        raise ValueError(f"no dead letter with id {', '.join(missing)} (see `escalator dlq list`)")
    return [by_position[position] for position in wanted]


async def replay(
    settings: KafkaSettings, entries: Sequence[Entry], *, force: bool = False, dry_run: bool = False
) -> list[Replay]:
    plans: list[tuple[Entry, str]] = [(e, still_invalid(e.letter)) for e in entries]
    results: list[Replay] = []
    producer = None if dry_run else make_producer(settings)
    if producer is not None:
        await producer.start()
    try:
        for entry, invalid in plans:
            letter = entry.letter
            if letter.value() is None or (invalid and not force):
                results.append(Replay(entry, False, f"skipped: {invalid}"))
                continue
            if dry_run:
                note = "would replay" + (f" although {invalid}" if invalid else "")
                results.append(Replay(entry, False, note))
                continue
            assert producer is not None
            headers = [(name, _b64decode(value)) for name, value in letter.headers]
            headers.append((REPLAY_HEADER, f"dlq:{entry.id}".encode()))
            await producer.send_and_wait(
                letter.source_topic, value=letter.value(), key=letter.key(), headers=headers
            )
            note = "replayed" + (f" (forced; {invalid})" if invalid else "")
            results.append(Replay(entry, True, note))
    finally:
        if producer is not None:
            await producer.stop()
    return results


def _b64decode(value: str) -> bytes:
    import base64

    return base64.b64decode(value)


def entries_table(entries: Sequence[Entry]) -> Table:
    table = Table(title=f"{len(entries)} dead letter(s)")
    for column in ("id", "when", "source topic", "reason", "event type", "consumer", "detail"):
        table.add_column(column, overflow="fold")
    for e in entries:
        letter = e.letter
        table.add_row(
            e.id,
            letter.dead_lettered_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            f"{letter.source_topic}[{letter.partition}]@{letter.offset}",
            letter.reason,
            letter.event_type or "",
            letter.consumer_group or letter.consumer,
            letter.detail[:200],
        )
    return table


def replay_table(results: Sequence[Replay]) -> Table:
    sent = sum(1 for r in results if r.sent)
    table = Table(title=f"replayed {sent} of {len(results)}")
    for column in ("id", "source topic", "result"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.entry.id, r.entry.letter.source_topic, r.note)
    return table
