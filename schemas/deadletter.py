"""The record written to the dead-letter topic for every message a consumer could not use."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class DeadLetter(BaseModel):
    """A rejected record, kept whole so that an operator can inspect and replay it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    source_topic: str = Field(
        description="Topic the record came from.", examples=["escalator.vnfm.replies.v1"]
    )
    partition: int = Field(ge=0, description="Its partition.", examples=[3])
    offset: int = Field(ge=0, description="Its offset.", examples=[1207])
    consumer_group: str = Field(
        description="Group that rejected it.", examples=["escalator-vnfm-adapter"]
    )
    consumer: str = Field(
        description="Service instance that rejected it.", examples=["vnfm-adapter/0"]
    )
    reason: str = Field(description="Machine-readable reason.", examples=["invalid_fields"])
    detail: str = Field(
        description="Human-readable explanation.", examples=["node_id: Field required"]
    )
    event_type: str | None = Field(
        default=None, description="Event type, if it could be read.", examples=["VnfBusinessMoved"]
    )
    key_b64: str | None = Field(
        default=None, description="The record key, base64.", examples=["dm5mbS1h"]
    )
    value_b64: str | None = Field(
        default=None, description="The record value, base64.", examples=["e30="]
    )
    headers: tuple[tuple[str, str], ...] = Field(
        default=(), description="Headers; values base64.", examples=[[["traceparent", "MDA="]]]
    )
    dead_lettered_at: AwareDatetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="When it was dead-lettered.",
        examples=[datetime(2026, 11, 26, 4, 0, tzinfo=UTC)],
    )

    @staticmethod
    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode()

    def value(self) -> bytes | None:
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)

    def key(self) -> bytes | None:
        return None if self.key_b64 is None else base64.b64decode(self.key_b64)
