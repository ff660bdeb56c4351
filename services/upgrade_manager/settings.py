"""Settings of the Upgrade Manager (environment `ESCALATOR_UPGRADE_MANAGER_*`, or flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UpgradeManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESCALATOR_UPGRADE_MANAGER_", extra="ignore")

    instance_id: str = Field(
        default="upgrade-manager/0", min_length=1, description="This instance, in logs and DLQ."
    )
    app_id: str = Field(
        default="escalator-upgrade-manager",
        min_length=1,
        description="faust app id: the consumer group and the changelog topics' prefix "
        "(the Kafka topic_prefix is put in front).",
    )
    tick_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="How often each owned running campaign is ticked."
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics port; unset: none."
    )
    web_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="faust's web server port; unset: the web server is disabled.",
    )
    commit_interval_s: float = Field(
        default=0.5, gt=0, description="How often faust commits processed offsets."
    )
    standby_replicas: int = Field(
        default=0, ge=0, description="faust table standby replicas (memory store: 0)."
    )
    handler_attempts: int = Field(
        default=3, ge=1, description="Tries of one input before it is dead-lettered."
    )
    retry_backoff_s: float = Field(default=0.2, gt=0, description="First retry pause.")
