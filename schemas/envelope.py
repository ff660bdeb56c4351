"""The envelope every event carries, and the base class of all events.

Events are flat: the envelope fields sit beside the payload fields, so a vendor reads one JSON
object. `event_type` discriminates; `schema_version` says which shape the payload has.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.types import CampaignId

# uuid5 namespace for deterministic command ids; never change it (ids must be stable forever).
COMMAND_NAMESPACE = uuid.UUID("6f1f1c4e-6a6f-4f5e-9d0e-2f3c6b8e6a01")


def command_id(*parts: object) -> uuid.UUID:
    """Deterministic id for a command, so that a re-emitted command is a recognisable duplicate."""
    return uuid.uuid5(COMMAND_NAMESPACE, "/".join(str(p) for p in parts))


def type_field(event_type: str) -> Any:
    """The `event_type` field of one event class: fixed, documented, and its own example."""
    return Field(
        default=event_type,
        description="Name of the event; selects the payload shape.",
        examples=[event_type],
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Envelope fields shared by every event."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_enum_values=False)

    # The version of the payload shape this class describes; bumped only on breaking changes.
    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Unique id of this event; consumers deduplicate on it.",
        examples=[uuid.UUID("0b7e5c3a-8f0e-4a53-9a65-0e3a4c1d2b11")],
    )
    event_type: str = Field(
        description="Name of the event; selects the payload shape.", examples=["NodeUpgraded"]
    )
    schema_version: int = Field(
        default=1,
        ge=1,
        description="Version of the payload shape; old versions are upcast on decode.",
        examples=[1],
    )
    campaign_id: CampaignId | None = Field(
        default=None,
        description="Upgrade campaign this event belongs to; null for campaign-less facts.",
        examples=["cmp-29-1-0-a1b2c3"],
    )
    correlation_id: uuid.UUID | None = Field(
        default=None,
        description="Id shared by every event of one conversation (defaults to the event id).",
        examples=[uuid.UUID("5d2b3f7e-1c44-4d3e-8c7a-9f0a1b2c3d4e")],
    )
    causation_id: uuid.UUID | None = Field(
        default=None,
        description="Id of the event that directly caused this one.",
        examples=[uuid.UUID("2c9a7e10-3b5d-4f61-a7e8-6d4c3b2a1f00")],
    )
    occurred_at: AwareDatetime = Field(
        default_factory=utcnow,
        description="When the fact happened or the request was made (UTC, ISO 8601).",
        examples=[datetime(2026, 11, 26, 4, 0, tzinfo=UTC)],
    )
    producer: str = Field(
        default="unknown",
        min_length=1,
        max_length=200,
        description="Service instance that produced the event.",
        examples=["upgrade-manager/um-0"],
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_type_and_version(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            default_type = cls.model_fields["event_type"].default
            if isinstance(default_type, str):
                data.setdefault("event_type", default_type)
            data.setdefault("schema_version", cls.SCHEMA_VERSION)
        return data

    @model_validator(mode="after")
    def _default_correlation(self) -> Self:
        if self.correlation_id is None:
            object.__setattr__(self, "correlation_id", self.event_id)
        return self

    def caused(self, **envelope: Any) -> dict[str, Any]:
        """Envelope fields for an event caused by this one: same campaign and correlation."""
        fields: dict[str, Any] = {
            "campaign_id": self.campaign_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.event_id,
        }
        fields.update(envelope)
        return fields
