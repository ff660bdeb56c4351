"""Settings of the Cloud Manager (environment `ESCALATOR_CLOUD_MANAGER_*`, or flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CloudManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESCALATOR_CLOUD_MANAGER_", extra="ignore")

    world_url: str = Field(
        default="http://127.0.0.1:8700", description="Base URL of the simulated cloud's API."
    )
    instance_id: str = Field(
        default="cloud-manager/0", min_length=1, description="This instance, as `producer`."
    )
    group_id: str = Field(
        default="escalator-cloud-manager", min_length=1, description="Consumer group."
    )
    migration_timeout_s: float = Field(
        default=600.0, gt=0, description="How long one migration is waited for."
    )
    poll_s: float = Field(default=0.05, gt=0, description="Polling period of the cloud's state.")
    shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="On a graceful stop, how long running commands are waited for; the rest "
        "stay uncommitted and are redone by the next owner.",
    )
    inventory_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Period of the inventory refresh, which publishes the nodes whose content "
        "changed; 0 turns it off (the inventory is still published on start and after every "
        "change the Cloud Manager makes).",
    )
    inventory_full_every: int = Field(
        default=30,
        ge=1,
        description="Every this many refreshes, every node is published again, changed or not.",
    )
