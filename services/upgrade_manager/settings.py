"""Settings of the Upgrade Manager (environment `ESCALATOR_UPGRADE_MANAGER_*`, or flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UpgradeManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESCALATOR_UPGRADE_MANAGER_", extra="ignore")

    instance_id: str = Field(
        default="upgrade-manager/0", min_length=1, description="This instance, in logs and DLQ."
    )
    group_id: str = Field(
        default="escalator-upgrade-manager",
        min_length=1,
        description="Consumer group of the campaign inputs (topic_prefix is put in front).",
    )
    tick_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="How often each owned running campaign is ticked."
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics port; unset: none."
    )
    unknown_node_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="How long a request naming nodes not yet heard of waits for their heartbeats.",
    )
    planner: bool = Field(
        default=True,
        description="Start nodes by the batch planner, from the Cloud Manager's inventory and the "
        "VNF registry. False: campaign order and max_parallel only (the VNFM adapter's budget "
        "hold is then the only VNF guard).",
    )
    negative_control_skip_migrations: bool = Field(
        default=False,
        description="Tests only: never migrate, pretend every migration succeeded. This is the "
        "broken manager that end-to-end tests use to show the world's monitor sees the damage.",
    )
    handler_attempts: int = Field(
        default=3, ge=1, description="Tries of one input before it is dead-lettered."
    )
    retry_backoff_s: float = Field(default=0.2, gt=0, description="First retry pause.")
