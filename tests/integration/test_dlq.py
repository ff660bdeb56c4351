"""`escalator dlq`: dead letters listed with their reason, and re-driven to their source topic."""

from __future__ import annotations

import uuid

import pytest

from escalator.broker import BrokerHandle
from escalator.bus import ensure_topics, make_producer
from escalator.bus.readback import scan
from escalator.dlq import REPLAY_HEADER, Filter, read_entries, replay, select
from escalator.settings import KafkaSettings
from schemas.codec import encode
from schemas.deadletter import DeadLetter
from schemas.events import NodeAgentHeartbeat
from schemas.topics import DEAD_LETTERS_TOPIC, NODE_HEARTBEATS

pytestmark = [pytest.mark.integration]


def letter(settings: KafkaSettings, value: bytes, reason: str, offset: int) -> DeadLetter:
    return DeadLetter(
        source_topic=settings.topic(NODE_HEARTBEATS.name),
        partition=0,
        offset=offset,
        consumer_group="escalator-upgrade-manager",
        consumer="upgrade-manager/0",
        reason=reason,
        detail="node_id: Field required" if reason == "invalid_fields" else "was unknown",
        event_type="NodeAgentHeartbeat",
        key_b64=DeadLetter.b64(b"n1"),
        value_b64=DeadLetter.b64(value),
    )


async def test_list_filters_and_replay_re_drives_only_what_now_decodes(
    broker: BrokerHandle,
) -> None:
    settings = broker.settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:12]}."})
    await ensure_topics(settings)
    good = NodeAgentHeartbeat(node_id="n1", agent_id="a", installed_version="1.0", interval_s=5)
    letters = [
        letter(settings, b'{"event_type": "NodeAgentHeartbeat"}', "invalid_fields", 1),
        letter(settings, encode(good), "unknown_type", 2),
    ]
    producer = make_producer(settings)
    await producer.start()
    try:
        for dead in letters:
            await producer.send_and_wait(
                settings.topic(DEAD_LETTERS_TOPIC), dead.model_dump_json().encode(), key=b"x"
            )
    finally:
        await producer.stop()

    everything = await read_entries(settings)
    assert [e.letter.reason for e in everything] == ["invalid_fields", "unknown_type"]
    only = await read_entries(settings, Filter(reason="unknown_type"))
    assert [e.letter.offset for e in only] == [2]
    with pytest.raises(ValueError, match="no dead letter with id 9:9"):
        select(everything, ["9:9"])

    dry = await replay(settings, everything, dry_run=True)
    assert [r.sent for r in dry] == [False, False]
    assert dry[0].note.startswith("skipped: invalid_fields")
    assert dry[1].note == "would replay"

    results = await replay(settings, everything)
    assert [r.sent for r in results] == [False, True]
    replayed = [r async for r in scan(settings, NODE_HEARTBEATS) if r.value is not None]
    assert len(replayed) == 1
    record = replayed[0]
    assert record.key == b"n1" and record.value == encode(good)
    assert (REPLAY_HEADER, f"dlq:{everything[1].id}".encode()) in list(record.headers)

    forced = await replay(settings, everything[:1], force=True)
    assert forced[0].sent and "forced" in forced[0].note
