"""Settings of one node agent (environment `ESCALATOR_NODE_AGENT_*`, or command-line flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NodeAgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESCALATOR_NODE_AGENT_", extra="ignore")

    node_id: str = Field(min_length=1, description="The compute node this agent upgrades.")
    world_url: str = Field(
        default="http://127.0.0.1:8700", description="Base URL of the simulated cloud's API."
    )
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, le=3600, description="Seconds between two heartbeats."
    )
    reboot_s: float | None = Field(
        default=None,
        ge=0,
        description="Nominal reboot duration asked of the world; null keeps the world's default.",
    )
    apply_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a reboot may take before the apply fails."
    )
    max_apply_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Times a failed upgrade is applied before the node is rolled back.",
    )
    apply_backoff_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Pause after the first failed apply; doubled after each further failure.",
    )
    apply_backoff_max_s: float = Field(
        default=120.0, ge=0, le=3600, description="Longest pause between two apply attempts."
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="On a graceful stop, how long a running upgrade is waited for; an upgrade "
        "cut short stays uncommitted and is resumed by the next start.",
    )

    @property
    def group_id(self) -> str:
        """One consumer group per node: it only stores this agent's committed offset."""
        return f"escalator-node-agent.{self.node_id}"

    @property
    def producer(self) -> str:
        return f"node-agent/{self.node_id}"
