"""An external VNFM that knows Escalator only through its published JSON contract.

It runs in a virtualenv of its own, with confluent-kafka (librdkafka) and the standard library
only: it imports nothing from Escalator, builds every reply as a plain dict with the envelope
fields written by hand (schemas/jsonschema/VnfBusinessMoved.json), produces with librdkafka's
DEFAULT partitioner, and acts on the simulated cloud through its HTTP API only:

- a notice for an active member of an active-standby VNF: switch over to a standby that is up,
  in sync and on another node (`POST /v1/vnfs/{id}/switchover`) -> `switched_over`;
- a standby while the active member serves from another node: nothing to move -> `switched_over`;
- a loaded member of a load-balanced VNF: drain it if the others stay >= min_in_service
  (`POST /v1/vnfs/{id}/drain`) -> `drained`; a member without load -> `drained`;
- anything else, or any refusal by the cloud -> `left_for_vim` (the VIM migrates the VM);
- `NodeAvailable`: give the members drained for that node their load back
  (`POST /v1/vnfs/{id}/restore`).

    KAFKA_BOOTSTRAP_SERVERS=... python vnfm.py --vnfm-id vnfm-a --world http://127.0.0.1:8080
"""

import argparse
import json
import os
import signal
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaException, Producer

PREFIX = os.environ.get("ESCALATOR_KAFKA_TOPIC_PREFIX", "")
NOTICES = PREFIX + "escalator.vnfm.notices.v1"
REPLIES = PREFIX + "escalator.vnfm.replies.v1"


def log(*parts):
    print(*parts, flush=True)


class World:
    """The simulated cloud's HTTP API (JSON in, JSON out)."""

    def __init__(self, url):
        self.url = url.rstrip("/")

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def vnf(self, vnf_id):
        return self.call("GET", f"/v1/vnfs/{vnf_id}")


class Vnfm:
    def __init__(self, vnfm_id, world, producer):
        self.vnfm_id = vnfm_id
        self.world = world
        self.producer = producer
        self.drained = {}  # node id -> [(vnf id, member)] drained for that node's notice

    # --- deciding and acting, per VM ---

    def move(self, vm_id, vnf, node_id, allowed):
        if vnf["vnfm_id"] != self.vnfm_id or vm_id not in vnf["members"]:
            return "left_for_vim"

        def up_elsewhere(member):
            return member in vnf["members_up"] and vnf["member_nodes"].get(member) != node_id

        if vnf["redundancy"] == "active_standby":
            active = vnf.get("active_member")
            if active != vm_id:
                return "switched_over" if active and up_elsewhere(active) else "left_for_vim"
            if "switch_over" not in allowed:
                return "left_for_vim"
            sync = vnf.get("sync") or {}
            standbys = [
                m
                for m in vnf["members"]
                if m != vm_id
                and up_elsewhere(m)
                and (sync.get(m) or {}).get("state", "in_sync") == "in_sync"
            ]
            if not standbys:
                return "left_for_vim"
            self.world.call("POST", f"/v1/vnfs/{vnf['id']}/switchover", {"to_member": standbys[0]})
            return "switched_over"
        if (vnf.get("load_share") or {}).get(vm_id, 0.0) <= 0:
            return "drained"
        receivers = [m for m in vnf["members_in_service"] if m != vm_id]
        if "drain" not in allowed or not receivers or len(receivers) < vnf["min_in_service"]:
            return "left_for_vim"
        self.world.call("POST", f"/v1/vnfs/{vnf['id']}/drain", {"member": vm_id})
        self.drained.setdefault(node_id, []).append((vnf["id"], vm_id))
        return "drained"

    def on_notice(self, notice):
        deadline = datetime.fromisoformat(notice["reply_deadline"].replace("Z", "+00:00"))
        if deadline <= datetime.now(UTC):
            log("notice", notice["notice_id"], "is past its deadline; not answering")
            return
        outcomes = []
        for affected in notice["vnfs"]:
            try:
                vnf = self.world.vnf(affected["vnf_id"])
            except (urllib.error.URLError, OSError, ValueError) as exc:
                log("cannot read", affected["vnf_id"], exc)
                vnf = None
            for vm_id in affected["vm_ids"]:
                outcome = "left_for_vim"
                if vnf is not None:
                    try:
                        outcome = self.move(
                            vm_id, vnf, notice["node_id"], notice["allowed_actions"]
                        )
                    except (urllib.error.URLError, OSError, ValueError) as exc:
                        log("the cloud refused", vm_id, exc)
                outcomes.append({"vm_id": vm_id, "vnf_id": affected["vnf_id"], "outcome": outcome})
        self.reply(notice, outcomes)

    def on_node_available(self, event):
        for vnf_id, member in self.drained.pop(event["node_id"], []):
            try:
                self.world.call("POST", f"/v1/vnfs/{vnf_id}/restore", {"member": member})
                log("restored", vnf_id, member)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                log("restore refused", vnf_id, member, exc)

    # --- the reply: a plain dict, envelope by hand ---

    def reply(self, notice, outcomes):
        reply = {
            "event_id": str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"ext/{self.vnfm_id}/{notice['notice_id']}")
            ),
            "event_type": "VnfBusinessMoved",
            "schema_version": 1,
            "campaign_id": notice.get("campaign_id"),
            "correlation_id": notice.get("correlation_id") or notice["event_id"],
            "causation_id": notice["event_id"],
            "occurred_at": datetime.now(UTC).isoformat(),
            "producer": f"external-vnfm/{self.vnfm_id}",
            "notice_id": notice["notice_id"],
            "vnfm_id": self.vnfm_id,
            "outcomes": outcomes,
        }
        # Any key will do on the replies topic; the partitioner is librdkafka's default.
        self.producer.produce(REPLIES, key=self.vnfm_id.encode(), value=json.dumps(reply).encode())
        self.producer.flush(10)
        summary = ", ".join(f"{o['vm_id']}={o['outcome']}" for o in outcomes)
        log("replied to", notice["notice_id"], f"({notice['node_id']}):", summary)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vnfm-id", required=True)
    parser.add_argument("--world", required=True, help="the simulated cloud's URL")
    args = parser.parse_args()
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    consumer = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": f"external-vnfm-{args.vnfm_id}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": servers, "acks": "all", "enable.idempotence": True})
    vnfm = Vnfm(args.vnfm_id, World(args.world), producer)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    consumer.subscribe([NOTICES])
    log("external vnfm", args.vnfm_id, "consuming", NOTICES)
    try:
        while running[0]:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                log("consumer error:", msg.error())
                continue
            try:
                event = json.loads(msg.value() or b"null")
            except ValueError:
                event = None
            # Unknown event types and unknown fields are ignored: the contract grows additively.
            if isinstance(event, dict) and event.get("vnfm_id") == args.vnfm_id:
                if event.get("event_type") == "VnfMaintenanceNotified":
                    vnfm.on_notice(event)
                elif event.get("event_type") == "NodeAvailable":
                    vnfm.on_node_available(event)
                elif event.get("event_type") in ("NoticeExpired", "NoticeCancelled"):
                    log(event["event_type"], event.get("notice_id"))
                elif event.get("event_type") == "VnfmReplyRejected":
                    log("REJECTED", event.get("reason"), event.get("detail"))
            consumer.commit(message=msg, asynchronous=False)  # after acting: at-least-once
    except KafkaException as exc:
        log("kafka error:", exc)
        return 1
    finally:
        consumer.close()
        producer.flush(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
