"""A small, correct Kafka VNFM without a world, the base of the deliberately broken VNFMs.

It knows its VNFs from `--behaviours '{"vnf-id": kind}'`, as a vendor's VNFM knows its own:
`switch_over` (an active member: switched_over), `drain` (a load-balanced member: drained),
`refuse` (must refuse now: BusinessMoveRefused with a reason), `slow` (the move takes `--work-s`
seconds: MaintenanceDeadlineExtended every second, then drained). Notices are handled in
background tasks, so a `NoticeExpired` cancels the work in progress and nothing more is sent
for that notice. Each broken VNFM next to it overrides exactly one method.

Run: `python tests/broken_vnfms/<name>.py --vnfm-id X --behaviours JSON` with the Kafka
environment (`KAFKA_BOOTSTRAP_SERVERS`, `ESCALATOR_KAFKA_TOPIC_PREFIX`). Prints "ready" once it
has its partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from escalator.bus import EventConsumer, EventPublisher, ensure_topics, make_consumer, make_producer
from escalator.settings import KafkaSettings
from schemas.envelope import Event
from schemas.events import (
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    NoticeCancelled,
    NoticeExpired,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
)
from schemas.topics import VNFM_NOTICES, VNFM_REPLIES
from schemas.types import VmBusinessOutcome

OUTCOME = {"switch_over": "switched_over", "drain": "drained", "slow": "drained"}


class ToyVnfm:
    def __init__(
        self, vnfm_id: str, behaviours: dict[str, str], work_s: float, publisher: EventPublisher
    ) -> None:
        self.vnfm_id = vnfm_id
        self.behaviours = behaviours
        self.work_s = work_s
        self.publisher = publisher
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def producer(self) -> str:
        return f"toy-vnfm/{self.vnfm_id}"

    def kind(self, notice: VnfMaintenanceNotified) -> str:
        kinds = {self.behaviours.get(a.vnf_id, "switch_over") for a in notice.vnfs}
        for kind in ("refuse", "slow", "drain"):
            if kind in kinds:
                return kind
        return "switch_over"

    async def send(self, event: Event) -> None:
        await self.publisher.publish(event, VNFM_REPLIES)

    def envelope(self, notice: VnfMaintenanceNotified) -> dict[str, Any]:
        return notice.caused(producer=self.producer)

    # --- the behaviours the broken VNFMs override -------------------------------------------

    def outcome_for(self, kind: str) -> str:
        return OUTCOME[kind]

    def outcomes(self, notice: VnfMaintenanceNotified, kind: str) -> list[VmBusinessOutcome]:
        return [
            VmBusinessOutcome(vm_id=vm, vnf_id=a.vnf_id, outcome=self.outcome_for(kind))
            for a in notice.vnfs
            for vm in a.vm_ids
        ]

    async def refuse(self, notice: VnfMaintenanceNotified) -> None:
        await self.send(
            BusinessMoveRefused(
                **self.envelope(notice),
                notice_id=notice.notice_id,
                vnfm_id=self.vnfm_id,
                reason="standby is resyncing; try again later",
            )
        )

    async def heartbeat(self, notice: VnfMaintenanceNotified) -> None:
        await self.send(
            MaintenanceDeadlineExtended(
                **self.envelope(notice),
                notice_id=notice.notice_id,
                vnfm_id=self.vnfm_id,
                extend_by_s=3.0,
                reason="draining",
            )
        )

    async def on_expired(self, notice_id: str) -> None:
        task = self.tasks.pop(notice_id, None)
        if task is not None:
            task.cancel()

    # --- the flow ------------------------------------------------------------------------------

    async def handle(self, notice: VnfMaintenanceNotified) -> None:
        kind = self.kind(notice)
        if kind == "refuse":
            await self.refuse(notice)
            return
        if kind == "slow":
            loop = asyncio.get_running_loop()
            done_at = loop.time() + self.work_s
            while loop.time() < done_at:
                await self.heartbeat(notice)
                await asyncio.sleep(min(1.0, max(0.0, done_at - loop.time())))
        await self.send(
            VnfBusinessMoved(
                **self.envelope(notice),
                notice_id=notice.notice_id,
                vnfm_id=self.vnfm_id,
                outcomes=tuple(self.outcomes(notice, kind)),
            )
        )

    async def on_notice(self, notice: VnfMaintenanceNotified, info: object) -> None:
        if notice.vnfm_id != self.vnfm_id or notice.notice_id in self.tasks:
            return
        task = asyncio.create_task(self.handle(notice))
        self.tasks[notice.notice_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(notice.notice_id, None))

    async def on_closed(self, event: NoticeExpired | NoticeCancelled, info: object) -> None:
        if event.vnfm_id == self.vnfm_id:
            await self.on_expired(event.notice_id)


def run(cls: type[ToyVnfm] = ToyVnfm) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vnfm-id", required=True)
    parser.add_argument("--behaviours", required=True, help="JSON: vnf id -> kind")
    parser.add_argument("--work-s", type=float, default=4.0)
    args = parser.parse_args()
    asyncio.run(_serve(cls, args.vnfm_id, json.loads(args.behaviours), args.work_s))


async def _serve(
    cls: type[ToyVnfm], vnfm_id: str, behaviours: dict[str, str], work_s: float
) -> None:
    kafka = KafkaSettings()
    await ensure_topics(kafka, (VNFM_NOTICES, VNFM_REPLIES))
    producer = make_producer(kafka)
    await producer.start()
    group = f"toy-vnfm-{vnfm_id}-{uuid.uuid4().hex[:6]}"
    consumer = make_consumer(kafka, group, kafka.topic(VNFM_NOTICES.name))
    await consumer.start()
    publisher = EventPublisher(producer, kafka)
    vnfm = cls(vnfm_id, behaviours, work_s, publisher)
    loop = EventConsumer(
        consumer,
        publisher,
        group=group,
        instance=vnfm.producer,
        handlers={
            VnfMaintenanceNotified: vnfm.on_notice,
            NoticeExpired: vnfm.on_closed,
            NoticeCancelled: vnfm.on_closed,
        },
    )
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, loop.request_stop)
    task = asyncio.create_task(loop.run())
    while not consumer.assignment():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    try:
        await task
    finally:
        for t in list(vnfm.tasks.values()):
            t.cancel()
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    run()
