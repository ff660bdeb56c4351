"""Settings of the VNFM adapter (`ESCALATOR_VNFM_ADAPTER_*`) and of the reference VNFM
(`ESCALATOR_REFERENCE_VNFM_*`); flags override them."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

STATE_TOPIC = "escalator.vnfm-adapter.state.v1"


class VnfmAdapterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESCALATOR_VNFM_ADAPTER_", extra="ignore")

    instance_id: str = Field(
        default="vnfm-adapter/0", min_length=1, description="This instance, as `producer`."
    )
    group_id: str = Field(
        default="escalator-vnfm-adapter",
        min_length=1,
        description="Consumer group reading the requests and replies topics.",
    )
    tick_s: float = Field(default=0.1, gt=0, le=10, description="How often deadlines are checked.")
    closed_retention_s: float = Field(
        default=86_400.0,
        gt=0,
        description="How long a closed collection without NodeAvailable is kept.",
    )
    state_topic: str = Field(
        default=STATE_TOPIC,
        min_length=1,
        description="Compacted topic (keyed by node) holding the adapter's state; prefixed.",
    )


class ReferenceVnfmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESCALATOR_REFERENCE_VNFM_", extra="ignore")

    vnfm_id: str = Field(min_length=1, description="The VNFM this process plays.")
    world_url: str = Field(
        default="http://127.0.0.1:8700", description="Base URL of the simulated cloud's API."
    )
    group_id: str | None = Field(
        default=None, description="Consumer group; default escalator-reference-vnfm-<vnfm id>."
    )
    reply_delay_s: float = Field(default=0.0, ge=0, description="Wait before each reply.")
    silent: bool = Field(default=False, description="Act on notices but never reply.")
    ack_without_acting: bool = Field(
        default=False,
        description="Negative control for tests: claim every move was made without making it.",
    )
    refuse_first: int = Field(
        default=0, ge=0, description="Refuse the first N notices (BusinessMoveRefused)."
    )
    refuse_reason: str = Field(
        default="not now (reference VNFM --refuse-first)",
        min_length=1,
        max_length=1000,
        description="The reason given when refusing.",
    )
    heartbeat_every_s: float = Field(
        default=0.0, ge=0, description="Seconds between MaintenanceDeadlineExtended while working."
    )
    work_s: float = Field(default=0.0, ge=0, description="Seconds of work before replying.")
    extend_by_s: float | None = Field(
        default=None, gt=0, description="Extension asked per heartbeat; default 2*heartbeat."
    )
    recovery_signal: bool = Field(
        default=False,
        description="Send VnfRecovered once a VNF's members are up and in sync after "
        "NodeAvailable.",
    )

    @property
    def group(self) -> str:
        return self.group_id or f"escalator-reference-vnfm-{self.vnfm_id}"
