"""The REST bridge against a real broker, with a real HTTP VNFM (an aiohttp app in the test)."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from escalator.broker import BrokerHandle
from escalator.bus import EventPublisher, ensure_topics, make_producer, scan
from escalator.processes import ProcessGroup, python_module
from escalator.settings import KafkaSettings
from schemas.codec import decode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import VnfMaintenanceNotified
from schemas.topics import DEAD_LETTERS_TOPIC, VNFM_NOTICES, VNFM_REPLIES
from schemas.types import AffectedVnf, MaintenanceAction
from services.vnfm_adapter.rest_bridge import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    RestBridge,
    RestBridgeSettings,
    verify_signature,
)

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka]

ADMIN = "admin-token-for-tests-0123456789"
SECRET = "vnfm-a-shared-secret-0123"


@pytest.fixture
def kafka(broker: BrokerHandle, unique_name: Callable[..., str]) -> KafkaSettings:
    return broker.settings.model_copy(update={"topic_prefix": unique_name("rb") + "."})


@dataclass
class HttpVnfm:
    """A VNFM that speaks HTTP only: records every delivery, answers with scripted statuses."""

    secret: str
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((time.monotonic(), dict(request.headers), body))
        self.arrived.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "boom")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.received]

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received)} of {count} deliveries arrived")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=0.5)
            except TimeoutError:
                pass


@pytest.fixture
async def http_vnfm() -> AsyncIterator[HttpVnfm]:
    vnfm = HttpVnfm(SECRET)
    app = web.Application()
    app.router.add_post("/notices", vnfm.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    vnfm.url = f"http://127.0.0.1:{runner.addresses[0][1]}/notices"
    try:
        yield vnfm
    finally:
        await runner.cleanup()


BridgeFactory = Callable[..., Awaitable[RestBridge]]


@pytest.fixture
async def start_bridge(kafka: KafkaSettings) -> AsyncIterator[BridgeFactory]:
    bridges: list[RestBridge] = []

    async def start(**overrides: Any) -> RestBridge:
        settings = RestBridgeSettings(
            **{"admin_token": ADMIN, "port": 0, "backoff_initial_s": 0.2, **overrides}
        )
        bridge = RestBridge(settings, kafka)
        bridges.append(bridge)
        await bridge.start()
        return bridge

    try:
        yield start
    finally:
        for bridge in bridges:
            await bridge.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def publish(kafka: KafkaSettings) -> AsyncIterator[Callable[[Event], Awaitable[None]]]:
    producer = make_producer(kafka)
    await producer.start()
    publisher = EventPublisher(producer, kafka)

    async def send(event: Event) -> None:
        await publisher.publish(event, VNFM_NOTICES)

    try:
        yield send
    finally:
        await producer.stop()


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(
    http: aiohttp.ClientSession, bridge_url: str, vnfm_id: str, callback: str
) -> str:
    body = {"vnfm_id": vnfm_id, "callback_url": callback, "secret": SECRET}
    async with http.post(f"{bridge_url}/v1/vnfms", json=body, headers=admin()) as response:
        data = await response.json()
        assert response.status == 201, data
    assert set(data) == {"vnfm_id", "callback_url", "token", "registered_at"}
    return str(data["token"])


def notice(vnfm_id: str, notice_id: str, deadline_s: float = 30.0) -> VnfMaintenanceNotified:
    return VnfMaintenanceNotified(
        campaign_id="cmp-rest-bridge",
        notice_id=notice_id,
        vnfm_id=vnfm_id,
        node_id="compute-0-01",
        vnfs=(AffectedVnf(vnf_id="vnf-1", vm_ids=("vm-1", "vm-2")),),
        allowed_actions=(MaintenanceAction.SWITCH_OVER, MaintenanceAction.MIGRATE),
        reply_deadline=datetime.now(UTC) + timedelta(seconds=deadline_s),
        producer="test",
    )


async def find_on(
    kafka: KafkaSettings, topic: str, match: Callable[[bytes], bool], timeout_s: float = 20.0
) -> bytes:
    async def look() -> bytes:
        async for record in scan(kafka, topic, follow=True):
            if record.value is not None and match(record.value):
                return bytes(record.value)
        raise AssertionError("unreachable")

    return await asyncio.wait_for(look(), timeout=timeout_s)


def reply_matches(notice_id: str, event_type: str) -> Callable[[bytes], bool]:
    def match(raw: bytes) -> bool:
        event = decode(raw)
        return getattr(event, "notice_id", None) == notice_id and (
            getattr(event, "event_type", None) == event_type
        )

    return match


async def test_signed_notice_delivery_and_reply_round_trip(
    kafka: KafkaSettings,
    start_bridge: BridgeFactory,
    http_vnfm: HttpVnfm,
    http: aiohttp.ClientSession,
    publish: Callable[[Event], Awaitable[None]],
) -> None:
    bridge = await start_bridge()
    token = await register(http, bridge.url, "vnfm-a", http_vnfm.url)

    # A Kafka-speaking VNFM's notice is not the bridge's business; ours is delivered.
    await publish(notice("vnfm-kafka", "n-other"))
    sent = notice("vnfm-a", "n-1")
    await publish(sent)
    await http_vnfm.wait_for(1)
    await asyncio.sleep(0.5)
    assert len(http_vnfm.received) == 1
    _, headers, body = http_vnfm.received[0]
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER]), headers
    assert not verify_signature("some-other-secret-x", body, headers[SIGNATURE_HEADER])
    assert headers[EVENT_TYPE_HEADER] == "VnfMaintenanceNotified"
    assert headers[EVENT_ID_HEADER] == str(sent.event_id)
    received = VnfMaintenanceNotified.model_validate_json(body)
    assert received == sent

    # The VNFM answers with the contract's JSON (envelope left to the bridge).
    reply = {
        "event_type": "VnfBusinessMoved",
        "notice_id": received.notice_id,
        "vnfm_id": "vnfm-a",
        "outcomes": [
            {"vm_id": "vm-1", "vnf_id": "vnf-1", "outcome": "switched_over"},
            {"vm_id": "vm-2", "vnf_id": "vnf-1", "outcome": "left_for_vim"},
        ],
    }
    url = f"{bridge.url}/v1/notices/n-1/reply"
    async with http.put(url, json=reply, headers=bearer(token)) as response:
        accepted = await response.json()
        assert response.status == 202, accepted
    raw = await find_on(
        kafka, kafka.topic(VNFM_REPLIES.name), reply_matches("n-1", "VnfBusinessMoved")
    )
    landed = decode(raw)
    assert str(getattr(landed, "event_id", "")) == accepted["event_id"]
    assert landed.vnfm_id == "vnfm-a"  # type: ignore[union-attr]
    assert [o.outcome.value for o in landed.outcomes] == ["switched_over", "left_for_vim"]  # type: ignore[union-attr]
    assert landed.causation_id == sent.event_id
    assert landed.correlation_id == sent.correlation_id
    assert landed.campaign_id == sent.campaign_id

    # Heartbeat and recovery signal.
    hb_url = f"{bridge.url}/v1/notices/n-1/heartbeat"
    async with http.post(
        hb_url, json={"extend_by_s": 20, "reason": "resync"}, headers=bearer(token)
    ) as r:
        assert r.status == 202, await r.text()
    async with http.post(f"{bridge.url}/v1/vnfs/vnf-1/recovered", headers=bearer(token)) as r:
        assert r.status == 202, await r.text()
    raw = await find_on(
        kafka,
        kafka.topic(VNFM_REPLIES.name),
        lambda v: json.loads(v).get("event_type") == "VnfRecovered",
    )
    assert json.loads(raw)["vnf_id"] == "vnf-1"
    await find_on(
        kafka, kafka.topic(VNFM_REPLIES.name), reply_matches("n-1", "MaintenanceDeadlineExtended")
    )

    # GET never shows the secret; DELETE revokes the token.
    async with http.get(f"{bridge.url}/v1/vnfms/vnfm-a", headers=admin()) as r:
        view = await r.json()
        assert r.status == 200 and view["callback_url"] == http_vnfm.url
        assert SECRET not in json.dumps(view) and "token" not in json.dumps(view)
    async with http.delete(f"{bridge.url}/v1/vnfms/vnfm-a", headers=admin()) as r:
        assert r.status == 204
    async with http.put(url, json=reply, headers=bearer(token)) as r:
        assert r.status == 401
    async with http.get(f"{bridge.url}/v1/vnfms/vnfm-a", headers=admin()) as r:
        assert r.status == 404


async def test_delivery_is_retried_with_backoff_on_5xx(
    start_bridge: BridgeFactory,
    http_vnfm: HttpVnfm,
    http: aiohttp.ClientSession,
    publish: Callable[[Event], Awaitable[None]],
) -> None:
    bridge = await start_bridge(backoff_initial_s=0.4)
    await register(http, bridge.url, "vnfm-a", http_vnfm.url)
    http_vnfm.statuses = [500, 500, 200]
    sent = notice("vnfm-a", "n-retry")
    await publish(sent)
    await http_vnfm.wait_for(3)
    await asyncio.sleep(1.0)
    assert len(http_vnfm.received) == 3, "delivered once more after a 200"
    ids = {headers[EVENT_ID_HEADER] for _, headers, _ in http_vnfm.received}
    assert ids == {str(sent.event_id)}
    times = [t for t, _, _ in http_vnfm.received]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.2 - 0.05 <= gaps[0] <= 0.4 + 0.3, gaps  # first delay in [initial/2, initial]
    assert 0.4 - 0.05 <= gaps[1] <= 0.8 + 0.3, gaps  # then doubled
    assert bridge.delivered == 1 and bridge.given_up == 0


async def test_giving_up_is_dead_lettered_with_the_reason(
    kafka: KafkaSettings,
    start_bridge: BridgeFactory,
    http_vnfm: HttpVnfm,
    http: aiohttp.ClientSession,
    publish: Callable[[Event], Awaitable[None]],
) -> None:
    bridge = await start_bridge(max_attempts=2, backoff_initial_s=0.1)
    await register(http, bridge.url, "vnfm-a", http_vnfm.url)
    http_vnfm.statuses = [503, 503, 503]
    sent = notice("vnfm-a", "n-doomed")
    await publish(sent)

    def is_ours(raw: bytes) -> bool:
        dead = DeadLetter.model_validate_json(raw)
        return dead.event_type == "VnfMaintenanceNotified" and sent.notice_id.encode() in (
            dead.value() or b""
        )

    raw = await find_on(kafka, kafka.topic(DEAD_LETTERS_TOPIC), is_ours)
    dead = DeadLetter.model_validate_json(raw)
    assert dead.reason == "delivery_failed"
    assert "HTTP 503" in dead.detail and "2 attempt(s)" in dead.detail, dead.detail
    assert SECRET not in dead.detail
    assert len(http_vnfm.received) == 2 and bridge.given_up == 1


async def test_bad_tokens_wrong_vnfm_and_bad_bodies_are_refused(
    start_bridge: BridgeFactory,
    http_vnfm: HttpVnfm,
    http: aiohttp.ClientSession,
    publish: Callable[[Event], Awaitable[None]],
) -> None:
    bridge = await start_bridge()
    token_a = await register(http, bridge.url, "vnfm-a", http_vnfm.url)
    token_b = await register(http, bridge.url, "vnfm-b", http_vnfm.url)
    await publish(notice("vnfm-a", "n-a"))
    await http_vnfm.wait_for(1)  # the bridge now knows n-a is vnfm-a's
    url = f"{bridge.url}/v1/notices/n-a/reply"
    good = {
        "event_type": "VnfBusinessMoved",
        "notice_id": "n-a",
        "vnfm_id": "vnfm-a",
        "outcomes": [{"vm_id": "vm-1", "outcome": "switched_over"}],
    }

    async def call(
        method: str, target: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        async with http.request(method, target, headers=headers, **kw) as response:
            return response.status, await response.json()

    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("PUT", url, {"json": good}, 401, "unauthorized"),
        ("PUT", url, {"json": good, "headers": bearer("esk_forged")}, 401, "unauthorized"),
        ("PUT", url, {"json": good, "headers": {"Authorization": token_a}}, 401, "unauthorized"),
        ("PUT", url, {"json": good, "headers": bearer(token_b)}, 403, "wrong_vnfm"),
        (
            "PUT",
            url,
            {"json": {**good, "vnfm_id": "vnfm-b"}, "headers": bearer(token_a)},
            403,
            "wrong_vnfm",
        ),
        ("PUT", url, {"data": b"{not json", "headers": bearer(token_a)}, 400, "invalid_json"),
        ("PUT", url, {"data": b"\xff\xfe", "headers": bearer(token_a)}, 400, "invalid_json"),
        ("PUT", url, {"json": [1, 2], "headers": bearer(token_a)}, 400, "invalid_body"),
        (
            "PUT",
            url,
            {"json": {**good, "outcomes": [{"vm_id": "vm-1"}]}, "headers": bearer(token_a)},
            400,
            "invalid_body",
        ),
        (
            "PUT",
            url,
            {"json": {**good, "notice_id": "n-zzz"}, "headers": bearer(token_a)},
            400,
            "notice_id_mismatch",
        ),
        (
            "POST",
            f"{bridge.url}/v1/notices/n-a/heartbeat",
            {"json": {"extend_by_s": -1}, "headers": bearer(token_a)},
            400,
            "invalid_body",
        ),
        (
            "PUT",
            url,
            {"data": b"x" * 300_000, "headers": bearer(token_a)},
            413,
            "too_large",
        ),
        ("POST", f"{bridge.url}/v1/vnfms", {"json": {"vnfm_id": "x"}}, 401, "unauthorized"),
        (
            "POST",
            f"{bridge.url}/v1/vnfms",
            {"json": {"vnfm_id": "x"}, "headers": bearer(token_a)},
            401,
            "unauthorized",
        ),
        (
            "POST",
            f"{bridge.url}/v1/vnfms",
            {
                "json": {"vnfm_id": "vnfm-c", "callback_url": "nope", "secret": "x"},
                "headers": admin(),
            },
            400,
            "invalid_body",
        ),
        (
            "POST",
            f"{bridge.url}/v1/vnfms",
            {
                "json": {"vnfm_id": "vnfm-a", "callback_url": http_vnfm.url, "secret": SECRET},
                "headers": admin(),
            },
            409,
            "already_registered",
        ),
    ]
    for method, target, kw, status, error in cases:
        got_status, body = await call(method, target, **kw)
        assert (got_status, body.get("error")) == (status, error), (method, target, kw, body)
        assert body["detail"]
    status, body = await call("PUT", url, json={**good, "outcomes": "x"}, headers=bearer(token_a))
    assert any(f["loc"] == ["outcomes"] for f in body["fields"]), body
    # After all that, the server still serves, and a good reply is accepted.
    status, body = await call("PUT", url, json=good, headers=bearer(token_a))
    assert status == 202, body
    async with http.get(f"{bridge.url}/v1/openapi.json") as response:
        assert response.status == 200
        assert (await response.json())["openapi"].startswith("3.1")


async def test_registrations_survive_a_restart_of_the_bridge_process(
    kafka: KafkaSettings, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    env = {**kafka.to_env(), "ESCALATOR_REST_BRIDGE_ADMIN_TOKEN": ADMIN}
    argv = python_module("services.vnfm_adapter.rest_bridge", "--port", "0")
    with ProcessGroup(tmp_path / "logs", base_env=env) as group:
        first = group.spawn("bridge", argv, wait_for=r"listening on (http://\S+)", timeout_s=60)
        url = first.group(1)  # type: ignore[union-attr]
        token = await register(http, url, "vnfm-a", "http://127.0.0.1:9/notices")
        log_text = (tmp_path / "logs" / "bridge.log").read_text()
        group.kill("bridge")  # SIGKILL: nothing is flushed on the way out
        second = group.spawn("bridge", argv, wait_for=r"listening on (http://\S+)", timeout_s=60)
        url = second.group(1)  # type: ignore[union-attr]
        async with http.get(f"{url}/v1/vnfms/vnfm-a", headers=admin()) as response:
            assert response.status == 200, await response.text()
        hb = {"extend_by_s": 5}
        async with http.post(
            f"{url}/v1/notices/n-x/heartbeat", json=hb, headers=bearer(token)
        ) as response:
            assert response.status == 202, await response.text()
        log_text += (tmp_path / "logs" / "bridge.log").read_text()
    assert SECRET not in log_text and token not in log_text and ADMIN not in log_text


@pytest.mark.slow
async def test_a_campaign_completes_with_a_rest_vnfm(
    broker: BrokerHandle, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """End to end: one of the world's VNFMs speaks HTTP only (through the bridge); the others are
    reference VNFMs on Kafka. It verifies every delivery's signature and leaves each VM to the
    VIM (ACK, left_for_vim); the campaign must complete and every notice be answered."""
    from rich.console import Console

    from escalator.cli import build_upgrade_request, publish_upgrade_request, watch_campaign
    from escalator.demo import (
        DemoOptions,
        Deployment,
        publish_registry_from_world,
        wait_for_heartbeats,
        write_demo_manifest,
    )
    from escalator.world.client import WorldClient
    from schemas.types import VnfmTimeoutPolicy

    kafka = broker.settings.model_copy(update={"topic_prefix": unique_name("e2e") + "."})
    options = DemoOptions(nodes=4, domains=2, seed=3, speed=10.0, run_dir=tmp_path)
    deployment = Deployment.create(kafka, options)
    bridge = RestBridge(RestBridgeSettings(admin_token=ADMIN, port=0), kafka)
    replies: list[int] = []
    notices: list[VnfMaintenanceNotified] = []
    pending: set[asyncio.Task[None]] = set()
    token = ""

    async with aiohttp.ClientSession() as http:

        async def answer(event: VnfMaintenanceNotified) -> None:
            body = {
                "state": "ACK",
                "outcomes": [
                    {"vm_id": vm, "vnf_id": a.vnf_id, "outcome": "left_for_vim"}
                    for a in event.vnfs
                    for vm in a.vm_ids
                ],
            }
            url = f"{bridge.url}/v1/notices/{event.notice_id}/reply"
            async with http.put(url, json=body, headers=bearer(token)) as response:
                replies.append(response.status)

        async def on_delivery(request: web.Request) -> web.Response:
            raw = await request.read()
            if not verify_signature(SECRET, raw, request.headers.get(SIGNATURE_HEADER)):
                return web.Response(status=401)
            if request.headers[EVENT_TYPE_HEADER] == "VnfMaintenanceNotified":
                event = VnfMaintenanceNotified.model_validate_json(raw)
                notices.append(event)
                task = asyncio.create_task(answer(event))
                pending.add(task)
                task.add_done_callback(pending.discard)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/notices", on_delivery)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        callback = f"http://127.0.0.1:{runner.addresses[0][1]}/notices"
        try:
            await asyncio.to_thread(deployment.start_world)
            await ensure_topics(kafka)
            async with WorldClient(deployment.world_url) as world:
                deployment.node_ids = sorted(n.id for n in await world.nodes())
            _, vnfm_ids = await publish_registry_from_world(kafka, deployment.world_url)
            rest_vnfm, deployment.vnfm_ids = vnfm_ids[0], vnfm_ids[1:]
            await bridge.start()
            token = await register(http, bridge.url, rest_vnfm, callback)
            await asyncio.to_thread(deployment.start_services)
            await wait_for_heartbeats(kafka, deployment.node_ids, deployment, timeout_s=120)
            request = build_upgrade_request(
                version="2.0.0",
                manifest=write_demo_manifest(tmp_path, "2.0.0"),
                artifacts=[],
                repo_url=None,
                nodes=deployment.node_ids,
                max_parallel=1,
                vnfm_timeout=20.0,
                on_vnfm_timeout=VnfmTimeoutPolicy.ABORT,  # a lost REST reply must not pass unseen
                campaign_id=None,
                requested_by="test",
            )
            await publish_upgrade_request(kafka, request)
            view = await watch_campaign(
                kafka,
                request.campaign_id or "",
                Console(file=io.StringIO()),
                timeout_s=240,
            )
        finally:
            await bridge.stop()
            await runner.cleanup()
            await asyncio.to_thread(deployment.stop)
    assert view.state == "completed", (view.state, view.reason)
    counts = view.to_json()["nodes"]
    assert counts["upgraded"] == counts["total"] == len(deployment.node_ids), counts
    assert notices, f"the REST VNFM {rest_vnfm} was never notified"
    assert replies and all(status == 202 for status in replies), replies
