"""The REST bridge's pure parts: signatures, tokens, backoff, body translation, OpenAPI drift."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.events import BusinessMoveRefused, MaintenanceDeadlineExtended, VnfBusinessMoved
from services.vnfm_adapter import rest_bridge as rb

pytestmark = pytest.mark.unit

SECRET = "s3cret-s3cret-s3cret"


def test_signature_is_hex_hmac_sha256_of_the_body() -> None:
    body = b'{"event_type":"VnfMaintenanceNotified"}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert rb.sign(SECRET, body) == f"sha256={expected}"
    assert rb.verify_signature(SECRET, body, f"sha256={expected}")
    assert not rb.verify_signature(SECRET, body + b" ", f"sha256={expected}")
    assert not rb.verify_signature("another-secret-xx", body, f"sha256={expected}")
    assert not rb.verify_signature(SECRET, body, None)


def test_tokens_are_random_and_only_their_digest_is_kept() -> None:
    a, b = rb.new_token(), rb.new_token()
    assert a != b and len(a) > 40
    assert rb.token_digest(a) == hashlib.sha256(a.encode()).hexdigest()
    regs = rb.Registrations()
    reg = rb.Registration("vnfm-a", "http://x/cb", SECRET, rb.token_digest(a), datetime.now(UTC))
    regs.apply("vnfm-a", reg)
    assert regs.vnfm_for_token(a) == "vnfm-a"
    assert regs.vnfm_for_token(b) is None
    assert a not in reg.to_record().decode()
    assert SECRET not in repr(reg)
    assert rb.Registration.from_record(reg.to_record()) == reg
    regs.apply("vnfm-a", None)
    assert regs.vnfm_for_token(a) is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert rb.bearer_token(header) == token


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    delays = rb.backoff_delays(0.5, 4.0, random.Random(7))
    got = [next(delays) for _ in range(7)]
    nominal = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    for d, n in zip(got, nominal, strict=True):
        assert n / 2 <= d <= n
    assert len(set(got)) == len(got)  # jittered


NOTICE = "n-1"
MEMO = rb.NoticeMemo("vnfm-a", uuid.uuid4(), "cmp-1", uuid.uuid4())


def moved(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_type": "VnfBusinessMoved",
        "notice_id": NOTICE,
        "vnfm_id": "vnfm-a",
        "outcomes": [{"vm_id": "vm-1", "vnf_id": "vnf-1", "outcome": "switched_over"}],
    }
    body.update(extra)
    return body


def test_full_event_reply_is_validated_and_its_envelope_filled_from_the_notice() -> None:
    event = rb.reply_event(NOTICE, moved(), "vnfm-a", MEMO)
    assert isinstance(event, VnfBusinessMoved)
    assert event.causation_id == MEMO.event_id
    assert event.correlation_id == MEMO.correlation_id
    assert event.campaign_id == "cmp-1"
    assert event.producer.startswith("vnfm/vnfm-a")
    given = uuid.uuid4()
    again = rb.reply_event(NOTICE, moved(event_id=str(given)), "vnfm-a", None)
    assert again.event_id == given and again.causation_id is None


def test_short_forms_ack_and_nack() -> None:
    ack = rb.reply_event(
        NOTICE,
        {"state": "ACK", "outcomes": [{"vm_id": "vm-1", "outcome": "drained"}]},
        "vnfm-a",
    )
    assert isinstance(ack, VnfBusinessMoved) and ack.vnfm_id == "vnfm-a"
    nack = rb.reply_event(NOTICE, {"state": "NACK", "reason": "peak hour"}, "vnfm-a")
    assert isinstance(nack, BusinessMoveRefused) and nack.reason == "peak hour"


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [
        ([], 400, "invalid_body", None),
        ({"event_type": "NodeUpgraded"}, 400, "invalid_body", "event_type"),
        (moved(notice_id="n-2"), 400, "notice_id_mismatch", "notice_id"),
        (moved(vnfm_id="vnfm-b"), 403, "wrong_vnfm", None),
        (moved(outcomes=[{"vm_id": "vm-1", "outcome": "teleported"}]), 400, "invalid_body", None),
        (moved(outcomes="nope"), 400, "invalid_body", "outcomes"),
        (moved(event_id="not-a-uuid"), 400, "invalid_body", "event_id"),
        (
            {"event_type": "BusinessMoveRefused", "notice_id": NOTICE, "reason": ""},
            400,
            "invalid_body",
            "reason",
        ),
        (
            {"event_type": "BusinessMoveRefused", "notice_id": NOTICE, "reason": "   "},
            400,
            "invalid_body",
            None,
        ),
        ({"state": "ACK"}, 400, "invalid_body", "outcomes"),
        ({"state": "NACK"}, 400, "invalid_body", "reason"),
        ({"state": "MAYBE"}, 400, "invalid_body", "state"),
    ],
)
def test_bad_replies_are_refused_with_a_code_and_field_errors(
    body: Any, status: int, error: str, field: str | None
) -> None:
    with pytest.raises(rb.BadRequest) as caught:
        rb.reply_event(NOTICE, body, "vnfm-a")
    assert (caught.value.status, caught.value.error) == (status, error), caught.value.detail
    if field is not None:
        assert any(field in f["loc"] for f in caught.value.fields), caught.value.fields


def test_a_notice_for_another_vnfm_is_refused() -> None:
    with pytest.raises(rb.BadRequest) as caught:
        rb.reply_event(NOTICE, moved(vnfm_id="vnfm-b"), "vnfm-b", MEMO)
    assert caught.value.status == 403


def test_heartbeat_and_recovered() -> None:
    hb = rb.heartbeat_event(NOTICE, {"extend_by_s": 30, "reason": "resync"}, "vnfm-a", MEMO)
    assert isinstance(hb, MaintenanceDeadlineExtended)
    assert (hb.notice_id, hb.extend_by_s, hb.causation_id) == (NOTICE, 30.0, MEMO.event_id)
    for bad in ({"extend_by_s": 0}, {"reason": "x"}, {"extend_by_s": "soon"}, "x"):
        with pytest.raises(rb.BadRequest):
            rb.heartbeat_event(NOTICE, bad, "vnfm-a")
    rec = rb.recovered_event("vnf-1", None, "vnfm-a")
    assert (rec.vnf_id, rec.vnfm_id) == ("vnf-1", "vnfm-a")
    with pytest.raises(rb.BadRequest) as caught:
        rb.recovered_event("vnf-1", {"vnf_id": "vnf-2"}, "vnfm-a")
    assert caught.value.error == "vnf_id_mismatch"
    with pytest.raises(rb.BadRequest) as caught:
        rb.recovered_event("vnf 1 with spaces", {}, "vnfm-a")
    assert caught.value.status == 400


def test_registration_request_validation() -> None:
    ok = rb.RegistrationRequest.model_validate(
        {"vnfm_id": "vnfm-a", "callback_url": "https://v.example/cb", "secret": SECRET}
    )
    assert SECRET not in repr(ok)
    for bad in (
        {"vnfm_id": "vnfm-a", "callback_url": "ftp://v/cb", "secret": SECRET},
        {"vnfm_id": "vnfm-a", "callback_url": "https://v/cb", "secret": "short"},
        {"vnfm_id": "bad id", "callback_url": "https://v/cb", "secret": SECRET},
    ):
        with pytest.raises(ValueError):
            rb.RegistrationRequest.model_validate(bad)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_document_is_checked_in_and_consistent() -> None:
    document = rb.openapi_document()
    assert document["openapi"].startswith("3.1")
    on_disk = json.loads(rb.OPENAPI_PATH.read_text())
    assert on_disk == json.loads(rb.openapi_text()), (
        "services/vnfm_adapter/openapi.json is stale: run `python -m "
        "services.vnfm_adapter.rest_bridge --openapi > services/vnfm_adapter/openapi.json`"
    )
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
    routes = {
        ("post", "/v1/vnfms"),
        ("get", "/v1/vnfms/{vnfm_id}"),
        ("delete", "/v1/vnfms/{vnfm_id}"),
        ("put", "/v1/notices/{notice_id}/reply"),
        ("post", "/v1/notices/{notice_id}/heartbeat"),
        ("post", "/v1/vnfs/{vnf_id}/recovered"),
    }
    for method, path in routes:
        assert method in document["paths"][path], (method, path)
    assert "X-Escalator-Signature" in json.dumps(document["webhooks"])
