"""A complete minimal VNFM in plain aiokafka: `python minimal_vnfm.py VNFM_ID`.

It answers every maintenance notice addressed to its VNFM id with `VnfBusinessMoved`, leaving each
VM to the VIM (`left_for_vim`: the cloud live-migrates it). Env: KAFKA_BOOTSTRAP_SERVERS, and
ESCALATOR_KAFKA_TOPIC_PREFIX if the deployment prefixes its topic names.
"""

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

PREFIX = os.environ.get("ESCALATOR_KAFKA_TOPIC_PREFIX", "")
NOTICES = f"{PREFIX}escalator.vnfm.notices.v1"
REPLIES = f"{PREFIX}escalator.vnfm.replies.v1"


def reply_to(notice: dict, vnfm_id: str) -> dict:
    """The envelope by hand, then the payload (schemas/jsonschema/VnfBusinessMoved.json)."""
    return {
        # the same id for a redelivered notice: the VIM sees a duplicate, not a second answer
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{vnfm_id}/{notice['notice_id']}")),
        "event_type": "VnfBusinessMoved",
        "schema_version": 1,
        "campaign_id": notice["campaign_id"],
        "correlation_id": notice["correlation_id"],
        "causation_id": notice["event_id"],
        "occurred_at": datetime.now(UTC).isoformat(),
        "producer": f"minimal-vnfm/{vnfm_id}",
        "notice_id": notice["notice_id"],
        "vnfm_id": vnfm_id,
        "outcomes": [
            {"vm_id": vm_id, "vnf_id": vnf["vnf_id"], "outcome": "left_for_vim"}
            for vnf in notice["vnfs"]
            for vm_id in vnf["vm_ids"]
        ],
    }


async def main(vnfm_id: str) -> None:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    consumer = AIOKafkaConsumer(
        NOTICES,
        bootstrap_servers=servers,
        group_id=f"vnfm-{vnfm_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await consumer.start()
    await producer.start()
    try:
        async for record in consumer:
            event = json.loads(record.value or b"{}")  # unknown fields: simply not read
            if (
                event.get("event_type") == "VnfMaintenanceNotified"  # other events: ignored
                and event["vnfm_id"] == vnfm_id  # the key says so too, but read the field
                and datetime.fromisoformat(event["reply_deadline"]) > datetime.now(UTC)
            ):
                reply = json.dumps(reply_to(event, vnfm_id)).encode()
                await producer.send_and_wait(REPLIES, reply, key=vnfm_id.encode())
                print(f"replied to {event['notice_id']} ({event['node_id']})", flush=True)
            await consumer.commit()  # after the reply: a crash re-reads, never loses, a notice
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
