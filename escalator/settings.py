"""Settings shared by every Escalator process, read from the environment (or a TOML file).

Broker-specific client behaviour (idempotence off on Tansu, faust batch size, fetch waits) is
carried here as plain settings. The broker launcher fills them in through environment variables
(`KafkaSettings.to_env`); service code only ever reads settings and never asks which broker it
talks to.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(BaseSettings):
    """How to reach Kafka and how clients should behave on it."""

    model_config = SettingsConfigDict(env_prefix="ESCALATOR_KAFKA_", extra="ignore")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Comma-separated host:port list of Kafka bootstrap brokers.",
        validation_alias="KAFKA_BOOTSTRAP_SERVERS",
    )
    broker_kind: str = Field(
        default="external",
        description="Which broker the launcher started (informational only; never branch on it).",
    )
    topic_prefix: str = Field(
        default="",
        description="Prefix for every topic name, so that tests and tenants do not collide.",
    )
    enable_idempotence: bool = Field(
        default=True, description="Idempotent producer. Off only where the broker lacks it."
    )
    enable_transactions: bool = Field(
        default=True, description="Allow transactional producers where a component uses them."
    )
    fetch_max_wait_ms: int = Field(
        default=500, ge=1, le=30_000, description="Max time a fetch waits for data."
    )
    session_timeout_ms: int = Field(default=10_000, ge=1_000, description="Group session timeout.")
    heartbeat_interval_ms: int = Field(
        default=3_000, ge=100, description="Group heartbeat interval."
    )
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1_000, description="Max time between polls before eviction."
    )
    faust_producer_max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="faust producer batch size; 1 keeps end offsets exact on brokers that need it.",
    )
    replication_factor: int = Field(
        default=1, ge=1, description="Replication factor for topics Escalator creates."
    )
    partitions: int = Field(default=6, ge=1, description="Partitions for topics Escalator creates.")
    security_protocol: SecurityProtocol = Field(default="PLAINTEXT")
    sasl_mechanism: SaslMechanism | None = Field(default=None)
    sasl_username: str | None = Field(default=None)
    sasl_password: SecretStr | None = Field(
        default=None, description="Never logged: SecretStr hides it in repr and str."
    )
    ssl_cafile: str | None = Field(default=None, description="CA bundle for TLS.")
    ssl_certfile: str | None = Field(default=None, description="Client certificate for mTLS.")
    ssl_keyfile: str | None = Field(default=None, description="Client key for mTLS.")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def to_env(self) -> dict[str, str]:
        """Environment variables that reproduce these settings in a child process."""
        env: dict[str, str] = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers}
        for name, value in self.model_dump(exclude={"bootstrap_servers"}).items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"ESCALATOR_KAFKA_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return env
