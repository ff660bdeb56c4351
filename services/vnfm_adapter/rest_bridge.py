"""The REST bridge: the vendor topics over HTTP, for VNFMs that do not speak Kafka.

A protocol translator only; the VNFM adapter's core does not know it exists.

* **Registration** (admin bearer token): `POST /v1/vnfms` `{vnfm_id, callback_url, secret}`
  returns a per-VNFM bearer token, once. The bridge keeps only the token's SHA-256. The HMAC
  `secret` must be kept in clear to sign deliveries: it is stored in the compacted registrations
  topic (keyed by VNFM id, a tombstone on `DELETE`), which must therefore be ACL-protected like
  any credential store. Neither the secret nor the token is ever logged or returned by `GET`.
* **Notices** (`vnfm.notices`, consumer group `escalator-rest-bridge`): each event addressed to a
  registered VNFM is POSTed as its JSON to the VNFM's callback URL with
  `X-Escalator-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, `X-Escalator-Event-Type`,
  `X-Escalator-Event-Id` and `X-Escalator-Timestamp`. Failures (connection errors, timeouts,
  408/425/429/5xx) are retried with exponential backoff and jitter, up to `max_attempts` or the
  notice's reply deadline (other events: `delivery_max_s`). Delivery is at least once: the VNFM
  deduplicates on `X-Escalator-Event-Id`. The offset is committed after delivery, or after
  giving up, which is logged and dead-lettered with the reason. Events for VNFM ids that are not
  registered are skipped (those VNFMs read Kafka themselves).
* **Replies** (the VNFM's bearer token): `PUT /v1/notices/{notice_id}/reply` with a
  `VnfBusinessMoved` or `BusinessMoveRefused` JSON (or the short form
  `{"state": "ACK", "outcomes": [...]}` / `{"state": "NACK", "reason": "..."}`),
  `POST /v1/notices/{notice_id}/heartbeat` `{extend_by_s, reason}` and
  `POST /v1/vnfs/{vnf_id}/recovered`; validated with the contract's models and published to
  `vnfm.replies`. 202 on success; 400 (with field errors), 401, 403, 404, 409, 503 carry
  `{"error": code, "detail": text}`. Envelope fields the VNFM leaves out are filled in: a fresh
  `event_id` (send your own to make retries recognisable duplicates) and, for a notice this
  bridge delivered, `campaign_id`, `correlation_id` and `causation_id`.
* `GET /v1/openapi.json`: the OpenAPI 3.1 document (`openapi_document()`), also checked in as
  `services/vnfm_adapter/openapi.json` (`--openapi` prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import random
import secrets
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import ClientSession, ClientTimeout, web
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic.json_schema import models_json_schema
from pydantic_settings import BaseSettings, SettingsConfigDict

from escalator.entrypoint import settings_error, setup_logging
from escalator.settings import KafkaSettings
from schemas.envelope import Event, utcnow
from schemas.events import (
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    NodeAvailable,
    NoticeCancelled,
    NoticeExpired,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
    VnfmReplyRejected,
    VnfRecovered,
)
from schemas.topics import VNFM_REPLIES
from schemas.types import VmBusinessOutcome, VnfmId

log = logging.getLogger(__name__)

REGISTRATIONS_TOPIC = "escalator.rest-bridge.registrations.v1"
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
SIGNATURE_HEADER = "X-Escalator-Signature"
EVENT_TYPE_HEADER = "X-Escalator-Event-Type"
EVENT_ID_HEADER = "X-Escalator-Event-Id"
TIMESTAMP_HEADER = "X-Escalator-Timestamp"
NOTICE_EVENTS: tuple[type[Event], ...] = (
    VnfMaintenanceNotified,
    NoticeExpired,
    NoticeCancelled,
    NodeAvailable,
    VnfmReplyRejected,
)
RETRYABLE_STATUSES = frozenset({408, 425, 429})
MAX_BODY_BYTES = 256 * 1024


class RestBridgeSettings(BaseSettings):
    """`ESCALATOR_REST_BRIDGE_*`; flags override them."""

    model_config = SettingsConfigDict(env_prefix="ESCALATOR_REST_BRIDGE_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8780, ge=0, le=65535, description="Port (0: any free port).")
    admin_token: SecretStr = Field(
        min_length=16, description="Bearer token for the registration endpoints; never logged."
    )
    instance_id: str = Field(default="rest-bridge/0", min_length=1)
    group_id: str = Field(default="escalator-rest-bridge", min_length=1)
    registrations_topic: str = Field(
        default=REGISTRATIONS_TOPIC,
        min_length=1,
        description="Compacted topic (keyed by VNFM id) of registrations; prefixed. It holds the "
        "HMAC secrets: restrict it with ACLs.",
    )
    max_attempts: int = Field(default=8, ge=1, le=1000, description="Deliveries per event.")
    backoff_initial_s: float = Field(default=0.5, gt=0, le=60)
    backoff_max_s: float = Field(default=30.0, gt=0, le=3600)
    request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    delivery_max_s: float = Field(
        default=120.0,
        gt=0,
        le=240,
        description="Longest retrying of one event without a deadline of its own (kept under "
        "the consumer's max poll interval).",
    )
    remembered_notices: int = Field(default=10_000, ge=0)


# --- signing, tokens, backoff (pure) -----------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The `X-Escalator-Signature` value: `sha256=` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """What a VNFM does with the header (constant-time comparison)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def new_token() -> str:
    return "esk_" + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def backoff_delays(
    initial_s: float, max_s: float, rng: random.Random | None = None
) -> Iterator[float]:
    """Exponential backoff with jitter: the n-th delay is uniform in [d/2, d], d = initial*2^n
    capped at `max_s`, so retries of many deliveries do not fall in step."""
    rng = rng or random.Random()
    delay = initial_s
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(delay * 2, max_s)


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# --- HTTP bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RegistrationRequest(_Body):
    """Register a VNFM that receives its notices over HTTP."""

    vnfm_id: VnfmId = Field(description="The VNFM's id, as in the VNF registry.")
    callback_url: str = Field(
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="Where notices are POSTed.",
        examples=["https://vnfm-a.example.net/escalator/notices"],
    )
    secret: SecretStr = Field(
        min_length=16,
        max_length=512,
        description="Shared secret for the HMAC-SHA256 signature of each delivery.",
    )


class RegistrationCreated(_Body):
    vnfm_id: VnfmId
    callback_url: str
    token: str = Field(description="Bearer token of this VNFM; shown only once.")
    registered_at: AwareDatetime


class RegistrationView(_Body):
    vnfm_id: VnfmId
    callback_url: str
    registered_at: AwareDatetime


class Envelope(_Body):
    """Optional envelope fields of a reply sent in the short forms."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    event_id: str | None = Field(
        default=None, description="Your id for this reply (UUID); resend it on retries."
    )
    vnfm_id: VnfmId | None = Field(default=None, description="Defaults to the token's VNFM.")


class ShortReply(Envelope):
    """Short form of a reply: ACK with one outcome per VM, or NACK with a reason."""

    state: Literal["ACK", "NACK"]
    outcomes: tuple[VmBusinessOutcome, ...] | None = None
    reason: str | None = Field(default=None, min_length=1, max_length=2000)


class HeartbeatRequest(Envelope):
    extend_by_s: float = Field(gt=0, le=24 * 3600, description="Seconds wanted from now.")
    reason: str = Field(default="", max_length=2000)


class Accepted(_Body):
    accepted: bool = True
    event_id: str
    event_type: str


class ErrorBody(_Body):
    error: str = Field(description="Machine-readable code.", examples=["invalid_body"])
    detail: str = Field(description="Human-readable explanation.")
    fields: list[dict[str, Any]] = Field(default_factory=list, description="Field errors.")


# --- registrations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    vnfm_id: str
    callback_url: str
    secret: str
    token_sha256: str
    registered_at: datetime

    def to_record(self) -> bytes:
        return json.dumps(
            {
                "vnfm_id": self.vnfm_id,
                "callback_url": self.callback_url,
                "secret": self.secret,
                "token_sha256": self.token_sha256,
                "registered_at": self.registered_at.isoformat(),
            }
        ).encode()

    @classmethod
    def from_record(cls, raw: bytes) -> Registration:
        data = json.loads(raw)
        return cls(
            vnfm_id=str(data["vnfm_id"]),
            callback_url=str(data["callback_url"]),
            secret=str(data["secret"]),
            token_sha256=str(data["token_sha256"]),
            registered_at=datetime.fromisoformat(data["registered_at"]),
        )

    def view(self) -> RegistrationView:
        return RegistrationView(
            vnfm_id=self.vnfm_id, callback_url=self.callback_url, registered_at=self.registered_at
        )

    def __repr__(self) -> str:  # never show the secret
        return f"Registration({self.vnfm_id!r}, {self.callback_url!r})"


class Registrations:
    """In-memory view of the registrations topic."""

    def __init__(self) -> None:
        self._by_id: dict[str, Registration] = {}
        self._by_token: dict[str, str] = {}

    def apply(self, vnfm_id: str, registration: Registration | None) -> None:
        old = self._by_id.pop(vnfm_id, None)
        if old is not None:
            self._by_token.pop(old.token_sha256, None)
        if registration is not None:
            self._by_id[vnfm_id] = registration
            self._by_token[registration.token_sha256] = vnfm_id

    def get(self, vnfm_id: str) -> Registration | None:
        return self._by_id.get(vnfm_id)

    def vnfm_for_token(self, token: str) -> str | None:
        return self._by_token.get(token_digest(token))

    def __len__(self) -> int:
        return len(self._by_id)


# --- reply translation (pure) ------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, error: str, detail: str, fields: list[dict[str, Any]] | None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.fields = fields or []


def _field_errors(err: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in err.errors()[:20]
    ]


def _invalid(err: ValidationError, what: str) -> BadRequest:
    fields = _field_errors(err)
    detail = "; ".join(f"{'.'.join(f['loc']) or what}: {f['msg']}" for f in fields[:5])
    return BadRequest(400, "invalid_body", detail, fields)


@dataclass(frozen=True)
class NoticeMemo:
    """What the bridge remembers of a delivered notice, to fill a reply's envelope."""

    vnfm_id: str
    event_id: Any
    campaign_id: str | None
    correlation_id: Any


def _envelope_defaults(
    payload: dict[str, Any], vnfm_id: str, memo: NoticeMemo | None
) -> dict[str, Any]:
    data = dict(payload)
    if data.get("event_id") is None:
        data.pop("event_id", None)
    data.setdefault("vnfm_id", vnfm_id)
    data.setdefault("producer", f"vnfm/{vnfm_id} via rest-bridge")
    data.pop("occurred_at", None)  # the bridge stamps arrival
    if memo is not None:
        data.setdefault("campaign_id", memo.campaign_id)
        data.setdefault("correlation_id", memo.correlation_id)
        data.setdefault("causation_id", memo.event_id)
    return data


def _check_vnfm(event_vnfm: str, token_vnfm: str) -> None:
    if event_vnfm != token_vnfm:
        raise BadRequest(
            403, "wrong_vnfm", f"the token is for {token_vnfm!r}, the body names {event_vnfm!r}", []
        )


def _check_notice(
    path_notice: str, body: dict[str, Any], token_vnfm: str, memo: NoticeMemo | None
) -> None:
    named = body.get("notice_id")
    if named is not None and named != path_notice:
        raise BadRequest(
            400,
            "notice_id_mismatch",
            f"the path names notice {path_notice!r}, the body {named!r}",
            [{"loc": ["notice_id"], "msg": "must match the path", "type": "value_error"}],
        )
    if memo is not None and memo.vnfm_id != token_vnfm:
        raise BadRequest(403, "wrong_vnfm", f"notice {path_notice!r} is not for {token_vnfm!r}", [])


def reply_event(
    notice_id: str, body: Any, token_vnfm: str, memo: NoticeMemo | None = None
) -> VnfBusinessMoved | BusinessMoveRefused:
    """The event for `PUT /v1/notices/{notice_id}/reply`; BadRequest when it cannot be one."""
    if not isinstance(body, dict):
        raise BadRequest(400, "invalid_body", "the body must be a JSON object", [])
    _check_notice(notice_id, body, token_vnfm, memo)
    kind = body.get("event_type")
    payload: dict[str, Any]
    model: type[VnfBusinessMoved] | type[BusinessMoveRefused]
    if kind in ("VnfBusinessMoved", "BusinessMoveRefused"):
        model = VnfBusinessMoved if kind == "VnfBusinessMoved" else BusinessMoveRefused
        payload = dict(body)
    elif kind is None and "state" in body:
        try:
            short = ShortReply.model_validate(body)
        except ValidationError as err:
            raise _invalid(err, "body") from None
        envelope = {"event_id": short.event_id, "vnfm_id": short.vnfm_id}
        if short.state == "ACK":
            if short.outcomes is None:
                raise BadRequest(
                    400,
                    "invalid_body",
                    "outcomes: required for state ACK",
                    [{"loc": ["outcomes"], "msg": "required for ACK", "type": "missing"}],
                )
            model = VnfBusinessMoved
            payload = {**envelope, "outcomes": [o.model_dump() for o in short.outcomes]}
        else:
            if short.reason is None or not short.reason.strip():
                raise BadRequest(
                    400,
                    "invalid_body",
                    "reason: required for state NACK",
                    [{"loc": ["reason"], "msg": "required for NACK", "type": "missing"}],
                )
            model = BusinessMoveRefused
            payload = {**envelope, "reason": short.reason}
        payload = {k: v for k, v in payload.items() if v is not None}
    else:
        raise BadRequest(
            400,
            "invalid_body",
            "event_type must be VnfBusinessMoved or BusinessMoveRefused (or give state ACK/NACK)",
            [{"loc": ["event_type"], "msg": "unsupported", "type": "value_error"}],
        )
    payload["notice_id"] = notice_id
    data = _envelope_defaults(payload, token_vnfm, memo)
    try:
        event = model.model_validate(data)
    except ValidationError as err:
        raise _invalid(err, "body") from None
    if isinstance(event, BusinessMoveRefused) and not event.reason.strip():
        raise BadRequest(400, "invalid_body", "reason: must not be blank", [])
    _check_vnfm(event.vnfm_id, token_vnfm)
    return event


def heartbeat_event(
    notice_id: str, body: Any, token_vnfm: str, memo: NoticeMemo | None = None
) -> MaintenanceDeadlineExtended:
    if not isinstance(body, dict):
        raise BadRequest(400, "invalid_body", "the body must be a JSON object", [])
    _check_notice(notice_id, body, token_vnfm, memo)
    try:
        request = HeartbeatRequest.model_validate(body)
    except ValidationError as err:
        raise _invalid(err, "body") from None
    payload = {
        k: v
        for k, v in request.model_dump().items()
        if v is not None or k not in ("event_id", "vnfm_id")
    }
    payload["notice_id"] = notice_id
    try:
        event = MaintenanceDeadlineExtended.model_validate(
            _envelope_defaults(payload, token_vnfm, memo)
        )
    except ValidationError as err:
        raise _invalid(err, "body") from None
    _check_vnfm(event.vnfm_id, token_vnfm)
    return event


def recovered_event(vnf_id: str, body: Any, token_vnfm: str) -> VnfRecovered:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest(400, "invalid_body", "the body must be a JSON object", [])
    named = body.get("vnf_id")
    if named is not None and named != vnf_id:
        raise BadRequest(
            400, "vnf_id_mismatch", f"the path names VNF {vnf_id!r}, the body {named!r}", []
        )
    try:
        envelope = Envelope.model_validate(body)
        payload = {
            "vnf_id": vnf_id,
            **{k: v for k, v in envelope.model_dump().items() if v is not None},
        }
        event = VnfRecovered.model_validate(_envelope_defaults(payload, token_vnfm, None))
    except ValidationError as err:
        raise _invalid(err, "body") from None
    _check_vnfm(event.vnfm_id, token_vnfm)
    return event


# --- OpenAPI -----------------------------------------------------------------------------------


def _error_responses(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid body (field errors in `fields`).",
        401: "Missing or unknown bearer token.",
        403: "The token's VNFM does not match the body or the notice.",
        404: "Unknown VNFM.",
        409: "Already registered.",
        503: "Kafka unavailable; retry.",
    }
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        str(s): {"description": text[s], "content": {"application/json": {"schema": ref}}}
        for s in statuses
    }


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def openapi_document() -> dict[str, Any]:
    """The bridge's OpenAPI 3.1 document, built from the contract's pydantic models."""
    models: list[type[BaseModel]] = [
        RegistrationRequest,
        RegistrationCreated,
        RegistrationView,
        ShortReply,
        HeartbeatRequest,
        Envelope,
        Accepted,
        ErrorBody,
        VnfBusinessMoved,
        BusinessMoveRefused,
        MaintenanceDeadlineExtended,
        VnfRecovered,
        *NOTICE_EVENTS,
    ]
    _, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas = dict(sorted(defs["$defs"].items()))
    vendor_auth: list[dict[str, list[str]]] = [{"vnfmToken": []}]
    admin_auth: list[dict[str, list[str]]] = [{"adminToken": []}]
    notice_param = {
        "name": "notice_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    }
    accepted = {"202": {"description": "Published to vnfm.replies.", "content": _json("Accepted")}}
    reply_body = {
        "oneOf": [
            {"$ref": "#/components/schemas/VnfBusinessMoved"},
            {"$ref": "#/components/schemas/BusinessMoveRefused"},
            {"$ref": "#/components/schemas/ShortReply"},
        ]
    }
    notice_body = {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in NOTICE_EVENTS]}
    signature_headers = {
        SIGNATURE_HEADER: {
            "description": "sha256=<hex HMAC-SHA256 of the raw body with the shared secret>",
            "required": True,
            "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
        },
        EVENT_TYPE_HEADER: {"required": True, "schema": {"type": "string"}},
        EVENT_ID_HEADER: {
            "description": "Deduplicate on it: delivery is at least once.",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        },
        TIMESTAMP_HEADER: {"required": True, "schema": {"type": "string", "format": "date-time"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Escalator VNFM REST bridge",
            "version": "1.0.0",
            "description": (
                "HTTP access to the Escalator VNFM contract for VNFMs that do not speak Kafka. "
                "Notices are POSTed to the registered callback URL (see `webhooks`), signed "
                "with HMAC-SHA256; replies, heartbeats and recovery signals come back here, "
                "authenticated with the VNFM's bearer token."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/vnfms": {
                "post": {
                    "operationId": "registerVnfm",
                    "summary": "Register a VNFM; the token in the answer is shown only once.",
                    "security": admin_auth,
                    "requestBody": {"required": True, "content": _json("RegistrationRequest")},
                    "responses": {
                        "201": {
                            "description": "Registered.",
                            "content": _json("RegistrationCreated"),
                        },
                        **_error_responses(400, 401, 409, 503),
                    },
                }
            },
            "/v1/vnfms/{vnfm_id}": {
                "parameters": [
                    {
                        "name": "vnfm_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "get": {
                    "operationId": "getVnfm",
                    "security": admin_auth,
                    "responses": {
                        "200": {
                            "description": "The registration.",
                            "content": _json("RegistrationView"),
                        },
                        **_error_responses(401, 404),
                    },
                },
                "delete": {
                    "operationId": "deleteVnfm",
                    "security": admin_auth,
                    "responses": {
                        "204": {"description": "Removed; its token stops working."},
                        **_error_responses(401, 404, 503),
                    },
                },
            },
            "/v1/notices/{notice_id}/reply": {
                "parameters": [notice_param],
                "put": {
                    "operationId": "replyToNotice",
                    "summary": "VnfBusinessMoved, BusinessMoveRefused, or the short ACK/NACK form.",
                    "security": vendor_auth,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": reply_body}},
                    },
                    "responses": {**accepted, **_error_responses(400, 401, 403, 503)},
                },
            },
            "/v1/notices/{notice_id}/heartbeat": {
                "parameters": [notice_param],
                "post": {
                    "operationId": "extendNoticeDeadline",
                    "summary": "Still working: MaintenanceDeadlineExtended.",
                    "security": vendor_auth,
                    "requestBody": {"required": True, "content": _json("HeartbeatRequest")},
                    "responses": {**accepted, **_error_responses(400, 401, 403, 503)},
                },
            },
            "/v1/vnfs/{vnf_id}/recovered": {
                "parameters": [
                    {"name": "vnf_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "post": {
                    "operationId": "vnfRecovered",
                    "summary": "The VNF restored its redundancy: VnfRecovered.",
                    "security": vendor_auth,
                    "requestBody": {"required": False, "content": _json("Envelope")},
                    "responses": {**accepted, **_error_responses(400, 401, 403, 503)},
                },
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "security": [],
                    "responses": {"200": {"description": "This document."}},
                }
            },
        },
        "webhooks": {
            "notice": {
                "post": {
                    "summary": "A vendor-topic event for the VNFM, POSTed to its callback URL.",
                    "parameters": [
                        {"name": name, "in": "header", **spec}
                        for name, spec in signature_headers.items()
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": notice_body}},
                    },
                    "responses": {
                        "2XX": {"description": "Delivered."},
                        "5XX": {"description": "Retried with exponential backoff."},
                    },
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer"},
                "vnfmToken": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def openapi_text() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=False) + "\n"


# --- the service -------------------------------------------------------------------------------

Publish = Callable[[Event], Awaitable[Any]]


class RestBridge:
    """HTTP server, registrations and notice delivery. `start()` then `stop()`."""

    def __init__(self, settings: RestBridgeSettings, kafka: KafkaSettings) -> None:
        self.settings = settings
        self.kafka = kafka
        self.registrations = Registrations()
        self.notices: OrderedDict[str, NoticeMemo] = OrderedDict()
        self.url = ""
        self.delivered = 0
        self.given_up = 0
        self._runner: web.AppRunner | None = None
        self._producer: Any = None
        self._publisher: Any = None
        self._consumer: Any = None
        self._loop: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: ClientSession | None = None
        self._rng = random.Random()

    # lifecycle

    async def start(self) -> None:
        from escalator.bus import EventConsumer, EventPublisher, ensure_topics, make_producer
        from escalator.bus import make_consumer as make_kafka_consumer
        from schemas.topics import VNFM_NOTICES, TopicSpec

        spec = TopicSpec(
            name=self.settings.registrations_topic,
            key_field="vnfm_id",
            events=(),
            producers=(),
            consumers=(),
            description="REST bridge registrations",
            compacted=True,
        )
        await ensure_topics(self.kafka, (VNFM_NOTICES, VNFM_REPLIES, spec))
        self._producer = make_producer(self.kafka)
        await self._producer.start()
        self._publisher = EventPublisher(self._producer, self.kafka)
        caught_up = asyncio.Event()
        self._tasks.append(
            asyncio.create_task(self._follow(caught_up), name="rest-bridge-registrations")
        )
        await asyncio.wait_for(caught_up.wait(), timeout=60)
        self._http = ClientSession(timeout=ClientTimeout(total=self.settings.request_timeout_s))
        self._consumer = make_kafka_consumer(
            self.kafka, self.settings.group_id, self.kafka.topic(VNFM_NOTICES.name)
        )
        await self._consumer.start()
        self._loop = EventConsumer(
            self._consumer,
            self._publisher,
            group=self.settings.group_id,
            instance=self.settings.instance_id,
            handlers=dict.fromkeys(NOTICE_EVENTS, self._on_notice),
            concurrent_partitions=True,
            handler_attempts=1,
        )
        self._tasks.append(asyncio.create_task(self._loop.run(), name="rest-bridge-notices"))
        app = self.app()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.settings.host}:{port}"
        log.info(
            "rest bridge listening on %s (%d registrations)", self.url, len(self.registrations)
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._loop is not None:
            await self._loop.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._http is not None:
            await self._http.close()
        if self._producer is not None:
            await self._producer.stop()

    # registrations

    def _topic(self) -> str:
        return self.kafka.topic(self.settings.registrations_topic)

    def _apply_record(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        vnfm_id = key.decode(errors="replace")
        if value is None:
            self.registrations.apply(vnfm_id, None)
            return
        try:
            self.registrations.apply(vnfm_id, Registration.from_record(value))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("registration record for %s unreadable: %s", vnfm_id, type(exc).__name__)

    async def _follow(self, caught_up: asyncio.Event) -> None:
        """Read the registrations topic from the beginning; set `caught_up` at its high
        watermark, then keep applying what other bridge instances (and this one) write."""
        from aiokafka.structs import TopicPartition

        from escalator.bus import make_consumer, topic_partitions

        name = self._topic()
        while True:
            consumer = make_consumer(self.kafka, None)
            try:
                await consumer.start()
                parts = await topic_partitions(consumer, name, timeout_s=10.0)
                tps = [TopicPartition(name, p) for p in sorted(parts)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                pending = set(tps)
                while True:
                    batches = await consumer.getmany(
                        timeout_ms=self.kafka.fetch_max_wait_ms, max_records=1000
                    )
                    for records in batches.values():
                        for record in records:
                            self._apply_record(record.key, record.value)
                    for tp in list(pending):
                        high = consumer.highwater(tp)
                        if high is not None and await consumer.position(tp) >= high:
                            pending.discard(tp)
                    if not pending:
                        caught_up.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading registrations failed: %r; retrying", exc)
                await asyncio.sleep(1.0)
            finally:
                await consumer.stop()

    async def _write_registration(self, vnfm_id: str, registration: Registration | None) -> None:
        value = None if registration is None else registration.to_record()
        await self._producer.send_and_wait(self._topic(), value=value, key=vnfm_id.encode())
        self.registrations.apply(vnfm_id, registration)

    # notices

    def _remember(self, event: Event) -> None:
        if not isinstance(event, VnfMaintenanceNotified) or self.settings.remembered_notices == 0:
            return
        self.notices[event.notice_id] = NoticeMemo(
            event.vnfm_id, event.event_id, event.campaign_id, event.correlation_id
        )
        while len(self.notices) > self.settings.remembered_notices:
            self.notices.popitem(last=False)

    async def _on_notice(self, event: Event, info: Any) -> None:
        vnfm_id = getattr(event, "vnfm_id", None)
        registration = self.registrations.get(vnfm_id) if vnfm_id else None
        if registration is None:
            log.debug(
                "%s %s for %s: not registered here", event.event_type, event.event_id, vnfm_id
            )
            return
        self._remember(event)
        body = event.model_dump_json().encode()
        now = time.monotonic()
        give_up_at = now + self.settings.delivery_max_s
        if isinstance(event, VnfMaintenanceNotified):
            left = (event.reply_deadline - datetime.now(UTC)).total_seconds()
            give_up_at = min(give_up_at, now + max(left, 0.0))
        reason = await self._deliver(registration, event, body, give_up_at)
        if reason is None:
            self.delivered += 1
            return
        self.given_up += 1
        log.error(
            "giving up delivering %s %s to %s: %s",
            event.event_type,
            event.event_id,
            registration.vnfm_id,
            reason,
        )
        from escalator.bus import dead_letter_for

        record = _Record(info, body)
        await self._publisher.publish_dead_letter(
            dead_letter_for(
                record,
                consumer_group=self.settings.group_id,
                consumer=self.settings.instance_id,
                reason="delivery_failed",
                detail=f"to {registration.vnfm_id} at {registration.callback_url}: {reason}",
                event_type=event.event_type,
            )
        )

    async def _deliver(
        self, registration: Registration, event: Event, body: bytes, give_up_at: float
    ) -> str | None:
        """POST until a 2xx; None on success, else why it gave up."""
        assert self._http is not None
        delays = backoff_delays(
            self.settings.backoff_initial_s, self.settings.backoff_max_s, self._rng
        )
        last = "the notice's reply deadline had passed before delivery"
        for attempt in range(1, self.settings.max_attempts + 1):
            if time.monotonic() >= give_up_at:
                if attempt == 1:
                    return last
                return f"{last}; deadline reached after {attempt - 1} attempt(s)"
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(registration.secret, body),
                EVENT_TYPE_HEADER: event.event_type,
                EVENT_ID_HEADER: str(event.event_id),
                TIMESTAMP_HEADER: utcnow().isoformat(),
            }
            timeout = ClientTimeout(
                total=max(0.1, min(self.settings.request_timeout_s, give_up_at - time.monotonic()))
            )
            try:
                async with self._http.post(
                    registration.callback_url, data=body, headers=headers, timeout=timeout
                ) as response:
                    status = response.status
                    await response.read()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                last = "timed out"
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"[:300]
            else:
                if 200 <= status < 300:
                    log.info(
                        "delivered %s %s to %s (attempt %d)",
                        event.event_type,
                        event.event_id,
                        registration.vnfm_id,
                        attempt,
                    )
                    return None
                last = f"HTTP {status}"
                if status < 500 and status not in RETRYABLE_STATUSES:
                    return f"{last}: not retried"
            log.warning(
                "delivery of %s to %s failed (attempt %d): %s",
                event.event_id,
                registration.vnfm_id,
                attempt,
                last,
            )
            if attempt == self.settings.max_attempts:
                break
            pause = min(next(delays), max(0.0, give_up_at - time.monotonic()))
            await asyncio.sleep(pause)
        return f"{last} after {self.settings.max_attempts} attempt(s)"

    # HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_middleware])
        app.router.add_post("/v1/vnfms", self._register)
        app.router.add_get("/v1/vnfms/{vnfm_id}", self._get_vnfm)
        app.router.add_delete("/v1/vnfms/{vnfm_id}", self._delete_vnfm)
        app.router.add_put("/v1/notices/{notice_id}/reply", self._reply)
        app.router.add_post("/v1/notices/{notice_id}/heartbeat", self._heartbeat)
        app.router.add_post("/v1/vnfs/{vnf_id}/recovered", self._recovered)
        app.router.add_get("/v1/openapi.json", self._openapi)
        app.router.add_get("/v1/healthz", self._healthz)
        return app

    def _admin(self, request: web.Request) -> None:
        token = bearer_token(request.headers.get("Authorization"))
        expected = self.settings.admin_token.get_secret_value()
        if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
            raise BadRequest(401, "unauthorized", "admin bearer token missing or wrong", [])

    def _vnfm(self, request: web.Request) -> str:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise BadRequest(401, "unauthorized", "Authorization: Bearer <token> required", [])
        vnfm_id = self.registrations.vnfm_for_token(token)
        if vnfm_id is None:
            raise BadRequest(401, "unauthorized", "unknown or revoked token", [])
        return vnfm_id

    async def _register(self, request: web.Request) -> web.Response:
        self._admin(request)
        try:
            body = RegistrationRequest.model_validate(await _json_body(request))
        except ValidationError as err:
            raise _invalid(err, "body") from None
        if self.registrations.get(body.vnfm_id) is not None:
            raise BadRequest(
                409, "already_registered", f"{body.vnfm_id} is registered; DELETE it first", []
            )
        token = new_token()
        registration = Registration(
            vnfm_id=body.vnfm_id,
            callback_url=body.callback_url,
            secret=body.secret.get_secret_value(),
            token_sha256=token_digest(token),
            registered_at=utcnow(),
        )
        await self._publish_guarded(self._write_registration(body.vnfm_id, registration))
        log.info("registered VNFM %s at %s", body.vnfm_id, body.callback_url)
        created = RegistrationCreated(
            vnfm_id=body.vnfm_id,
            callback_url=body.callback_url,
            token=token,
            registered_at=registration.registered_at,
        )
        return web.json_response(text=created.model_dump_json(), status=201)

    async def _get_vnfm(self, request: web.Request) -> web.Response:
        self._admin(request)
        registration = self.registrations.get(request.match_info["vnfm_id"])
        if registration is None:
            raise BadRequest(404, "not_found", "no such VNFM registered", [])
        return web.json_response(text=registration.view().model_dump_json())

    async def _delete_vnfm(self, request: web.Request) -> web.Response:
        self._admin(request)
        vnfm_id = request.match_info["vnfm_id"]
        if self.registrations.get(vnfm_id) is None:
            raise BadRequest(404, "not_found", "no such VNFM registered", [])
        await self._publish_guarded(self._write_registration(vnfm_id, None))
        log.info("unregistered VNFM %s", vnfm_id)
        return web.Response(status=204)

    async def _publish_event(self, event: Event) -> web.Response:
        await self._publish_guarded(self._publisher.publish(event, VNFM_REPLIES))
        accepted = Accepted(event_id=str(event.event_id), event_type=event.event_type)
        return web.json_response(text=accepted.model_dump_json(), status=202)

    async def _publish_guarded(self, work: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(work, timeout=self.settings.request_timeout_s)
        except (TimeoutError, OSError) as exc:
            raise BadRequest(503, "unavailable", f"Kafka: {type(exc).__name__}", []) from None
        except Exception as exc:
            from aiokafka.errors import KafkaError

            if isinstance(exc, KafkaError):
                raise BadRequest(503, "unavailable", f"Kafka: {type(exc).__name__}", []) from None
            raise

    async def _reply(self, request: web.Request) -> web.Response:
        vnfm_id = self._vnfm(request)
        notice_id = request.match_info["notice_id"]
        body = await _json_body(request)
        event = reply_event(notice_id, body, vnfm_id, self.notices.get(notice_id))
        return await self._publish_event(event)

    async def _heartbeat(self, request: web.Request) -> web.Response:
        vnfm_id = self._vnfm(request)
        notice_id = request.match_info["notice_id"]
        body = await _json_body(request)
        event = heartbeat_event(notice_id, body, vnfm_id, self.notices.get(notice_id))
        return await self._publish_event(event)

    async def _recovered(self, request: web.Request) -> web.Response:
        vnfm_id = self._vnfm(request)
        body = await _json_body(request, optional=True)
        event = recovered_event(request.match_info["vnf_id"], body, vnfm_id)
        return await self._publish_event(event)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "registrations": len(self.registrations)})


@dataclass(frozen=True)
class _Record:
    """A consumed record rebuilt from `RecordInfo` for `dead_letter_for`."""

    info: Any
    value: bytes

    @property
    def topic(self) -> str:
        return str(self.info.topic)

    @property
    def partition(self) -> int:
        return int(self.info.partition)

    @property
    def offset(self) -> int:
        return int(self.info.offset)

    @property
    def timestamp(self) -> int:
        return int(self.info.timestamp_ms)

    @property
    def key(self) -> bytes | None:
        key: bytes | None = self.info.key
        return key

    @property
    def headers(self) -> tuple[tuple[str, bytes], ...]:
        headers: tuple[tuple[str, bytes], ...] = self.info.headers
        return headers


async def _json_body(request: web.Request, *, optional: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return None
        raise BadRequest(400, "invalid_body", "a JSON body is required", [])
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(400, "invalid_json", f"not JSON: {str(exc)[:200]}", []) from None


def _error(status: int, error: str, detail: str, fields: list[dict[str, Any]]) -> web.Response:
    body = ErrorBody(error=error, detail=detail, fields=fields).model_dump_json()
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(text=body, status=status, headers=headers)


@web.middleware
async def _errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(exc.status, exc.error, exc.detail, exc.fields)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes", [])
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, [])
        raise
    except Exception:
        log.exception("rest bridge: unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal", "unexpected error; see the bridge's log", [])


# --- the process -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.vnfm_adapter.rest_bridge",
        description="Escalator REST bridge: the VNFM vendor topics over HTTP.",
    )
    parser.add_argument("--host", help="listen address (ESCALATOR_REST_BRIDGE_HOST)")
    parser.add_argument(
        "--port", type=int, help="listen port, 0 for any (ESCALATOR_REST_BRIDGE_PORT)"
    )
    parser.add_argument("--instance-id", help="this instance (ESCALATOR_REST_BRIDGE_INSTANCE_ID)")
    parser.add_argument("--group-id", help="consumer group (ESCALATOR_REST_BRIDGE_GROUP_ID)")
    parser.add_argument("--openapi", action="store_true", help="print the OpenAPI document, exit")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.openapi:
        sys.stdout.write(openapi_text())
        return 0
    setup_logging(args.log_level)
    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("instance_id", args.instance_id),
            ("group_id", args.group_id),
        )
        if value is not None
    }
    try:
        settings = RestBridgeSettings(**overrides)
        kafka = KafkaSettings()
    except ValidationError as err:
        print(settings_error("rest bridge", err), file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(settings, kafka))
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(settings: RestBridgeSettings, kafka: KafkaSettings) -> None:
    bridge = RestBridge(settings, kafka)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await bridge.start()
    print(f"rest bridge listening on {bridge.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await bridge.stop()


if __name__ == "__main__":
    sys.exit(main())
