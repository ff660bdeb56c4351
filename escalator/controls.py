"""`escalator pause|resume|abort|retry`: send an operator control request and report its outcome.

The request goes on the campaigns topic, keyed by campaign id, so the Upgrade Manager applies it
in order with everything else the campaign receives, and it survives a restart of the manager.
The CLI then follows the campaign's events for the first one caused by the request: an
`OperatorRequestRejected` (with the reason) or the effect (paused, resumed, nodes released, the
node re-admitted).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from escalator.bus.connection import ensure_topics, make_producer
from escalator.bus.publisher import EventPublisher
from escalator.bus.readback import scan
from escalator.settings import KafkaSettings
from schemas.codec import decode
from schemas.envelope import Event
from schemas.events import OperatorRequestRejected
from schemas.topics import CAMPAIGNS


@dataclass(frozen=True)
class Outcome:
    applied: bool
    message: str
    answer: Event | None = None


async def send_and_wait(settings: KafkaSettings, request: Event, *, wait_s: float) -> Outcome:
    """Publish `request`, then wait up to `wait_s` for the manager's first answer to it."""
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        await EventPublisher(producer, settings).publish(request, CAMPAIGNS)
    finally:
        await producer.stop()
    if wait_s <= 0:
        return Outcome(True, "sent; not waiting for the Upgrade Manager")
    key = (request.campaign_id or "").encode()
    try:
        async with asyncio.timeout(wait_s):
            async for record in scan(settings, CAMPAIGNS, follow=True):
                if record.key != key or record.value is None:
                    continue
                event = decode(record.value)
                if not isinstance(event, Event) or event.causation_id != request.event_id:
                    continue
                if isinstance(event, OperatorRequestRejected):
                    return Outcome(False, f"rejected: {event.reason}", event)
                return Outcome(True, f"applied ({event.event_type})", event)
    except TimeoutError:
        pass
    return Outcome(
        False,
        f"no answer from the Upgrade Manager within {wait_s:g} s; the request stays on the bus "
        "and applies when the manager reads it",
    )
