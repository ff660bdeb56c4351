"""Settings shared by every Escalator process, read from the environment or a TOML file.

Broker-specific client behaviour (idempotence off on Tansu, faust batch size, fetch waits) is
carried here as plain settings. The broker launcher fills them in through environment variables
(`KafkaSettings.to_env`); service code only ever reads settings and never asks which broker it
talks to.

Where a value comes from, highest first:

1. arguments given to `KafkaSettings(...)` (the launcher, tests, command-line flags);
2. environment variables: `KAFKA_BOOTSTRAP_SERVERS` and `ESCALATOR_KAFKA_<FIELD>`;
3. the `[kafka]` table of the TOML file named by `ESCALATOR_CONFIG` (if that variable is set);
4. the defaults below.

An empty environment variable for an optional setting (`ESCALATOR_KAFKA_SASL_MECHANISM=`) means
"not set" and still overrides the TOML file; `to_env()` relies on that to hand a child process
exactly its parent's settings.

Security: `sasl_password` and `ssl_password` are `SecretStr`, shown as `**********` by `repr`,
`str`, `model_dump(mode="json")` and validation errors (`hide_input_in_errors`). Only
`to_env()` (for child processes) and `escalator.bus.connection.client_kwargs` (for aiokafka)
unwrap them. See docs/security.md.
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "CONFIG_ENV",
    "SASL_MECHANISMS",
    "SASL_PROTOCOLS",
    "SECRET_FIELDS",
    "SECURITY_PROTOCOLS",
    "TLS_PROTOCOLS",
    "KafkaSettings",
    "SaslMechanism",
    "SecretRedactingFilter",
    "SecurityProtocol",
    "config_file",
    "redact",
    "remember_secret",
]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
SECURITY_PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
SASL_MECHANISMS: tuple[str, ...] = get_args(SaslMechanism)
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
# Settings whose values are never shown (logs, reprs, errors, CLI output).
SECRET_FIELDS = frozenset({"sasl_password", "ssl_password"})

CONFIG_ENV = "ESCALATOR_CONFIG"
KAFKA_TABLE = "kafka"
# Key under which the TOML source hands a problem with the file to validation (see below).
_CONFIG_PROBLEM = "__escalator_config_problem__"

_OPTIONAL_FIELDS = (
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "faust_producer_max_batch_size",
)


def config_file() -> Path | None:
    """The TOML settings file named by ``$ESCALATOR_CONFIG``, or None when it is unset/empty."""
    value = os.environ.get(CONFIG_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _problem(message: str) -> PydanticCustomError:
    # the message goes through the context so that braces in paths are not format fields
    return PydanticCustomError("escalator_setting", "{reason}", {"reason": message})


class _KafkaTomlSource(PydanticBaseSettingsSource):
    """The ``[kafka]`` table of ``$ESCALATOR_CONFIG``, read with pydantic-settings'
    `TomlConfigSettingsSource` after checking the file (exists, parses, no unknown keys).

    A problem is not raised here (that would escape as a bare exception with a traceback) but
    handed to validation under a private key, so that it becomes one readable validation error
    like every other bad setting.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.path = config_file()
        self.problem: str | None = None
        self.source: TomlConfigSettingsSource | None = None
        if self.path is not None:
            self._load(settings_cls, self.path)

    def _load(self, settings_cls: type[BaseSettings], path: Path) -> None:
        where = f"{CONFIG_ENV}={path}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.problem = f"{where}: no such file"
            return
        except IsADirectoryError:
            self.problem = f"{where}: is a directory, not a TOML file"
            return
        except OSError as exc:
            self.problem = f"{where}: cannot read it ({exc.strerror or exc})"
            return
        except UnicodeDecodeError:
            self.problem = f"{where}: not UTF-8 text"
            return
        except tomllib.TOMLDecodeError as exc:
            self.problem = f"{where}: not valid TOML ({exc})"
            return
        table = data.get(KAFKA_TABLE)
        if table is None:
            return  # a file for other services' tables only
        if not isinstance(table, dict):
            self.problem = f"{where}: [{KAFKA_TABLE}] must be a table"
            return
        known = _known_keys(settings_cls)
        unknown = sorted(key for key in table if key.lower() not in known)
        if unknown:
            fields = ", ".join(sorted(settings_cls.model_fields))
            self.problem = (
                f"{where}: unknown setting(s) in [{KAFKA_TABLE}]: {', '.join(unknown)} "
                f"(known: {fields})"
            )
            return
        self.source = TomlConfigSettingsSource(
            settings_cls, toml_file=path, toml_table_header=(KAFKA_TABLE,)
        )

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole table

    def __call__(self) -> dict[str, Any]:
        if self.problem is not None:
            return {_CONFIG_PROBLEM: self.problem}
        return self.source() if self.source is not None else {}

    def __repr__(self) -> str:  # never the values: the table may hold a password
        return f"{type(self).__name__}(path={self.path})"


def _known_keys(settings_cls: type[BaseSettings]) -> set[str]:
    names: set[str] = set()
    for name, info in settings_cls.model_fields.items():
        names.add(name.lower())
        if isinstance(info.validation_alias, str):
            names.add(info.validation_alias.lower())
    return names


# --- secrets in logs --------------------------------------------------------------------------
#
# Every secret a process holds in its settings is remembered here, so that a log record that
# still happens to contain one (a library's debug dump of a request, an exception text) has it
# masked. `SecretRedactingFilter` is installed on aiokafka's loggers by escalator.bus.connection
# and on the handlers of every service by escalator.entrypoint.setup_logging.

MASK = "**********"
_MIN_SECRET_LEN = 3
_known_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def remember_secret(value: str | SecretStr | None) -> None:
    """Mask `value` wherever a `SecretRedactingFilter` sees it from now on."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value and len(value) >= _MIN_SECRET_LEN:
        with _secrets_lock:
            _known_secrets.add(value)


def redact(text: str) -> str:
    """`text` with every remembered secret masked."""
    for secret in sorted(_known_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class SecretRedactingFilter(logging.Filter):
    """Masks remembered secrets in log records, and hides SASL authentication payloads
    (aiokafka logs every request at DEBUG, and a SASL PLAIN request carries the password)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_is_sasl_payload(arg) for arg in args):
            record.args = tuple(
                f"{type(arg).__name__}(<SASL payload hidden>)" if _is_sasl_payload(arg) else arg
                for arg in args
            )
        if _known_secrets:
            try:
                message = record.getMessage()
            except Exception:
                return True
            masked = redact(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
                exc_text = logging.Formatter().formatException(record.exc_info)
                if redact(exc_text) != exc_text:
                    record.exc_text = redact(exc_text)
        return True


def _is_sasl_payload(value: object) -> bool:
    return type(value).__name__.startswith("SaslAuthenticate")


class KafkaSettings(BaseSettings):
    """How to reach Kafka and how clients should behave on it."""

    model_config = SettingsConfigDict(
        env_prefix="ESCALATOR_KAFKA_",
        extra="ignore",
        validate_by_name=True,  # `bootstrap_servers=` in code and TOML, besides the alias
        validate_by_alias=True,
        hide_input_in_errors=True,  # a bad password must not be echoed by a ValidationError
    )

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

    # --- security (the validators below check that these fit together) ---
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT (SASL, no TLS) or SASL_SSL.",
    )
    sasl_mechanism: SaslMechanism | None = Field(
        default=None,
        validate_default=True,
        description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; required with SASL_* protocols.",
    )
    sasl_username: str | None = Field(
        default=None, validate_default=True, description="SASL user; required with SASL_*."
    )
    sasl_password: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description="SASL password; required with SASL_*. Never logged or printed.",
    )
    ssl_cafile: str | None = Field(
        default=None,
        validate_default=True,
        description="PEM CA bundle to verify the brokers (SSL/SASL_SSL); system CAs if unset.",
    )
    ssl_certfile: str | None = Field(
        default=None,
        validate_default=True,
        description="PEM client certificate for mutual TLS (may also hold the key).",
    )
    ssl_keyfile: str | None = Field(
        default=None,
        validate_default=True,
        description="PEM private key of the client certificate.",
    )
    ssl_password: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description="Password of an encrypted client key. Never logged or printed.",
    )
    ssl_check_hostname: bool = Field(
        default=True,
        description="Check that the broker certificate names the host connected to.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # first wins: init arguments > environment > TOML file ($ESCALATOR_CONFIG) > defaults
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
            _KafkaTomlSource(settings_cls),
        )

    # --- validation ---------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _config_file_problem(cls, data: Any) -> Any:
        if isinstance(data, dict) and _CONFIG_PROBLEM in data:
            raise _problem(str(data[_CONFIG_PROBLEM]))
        return data

    @field_validator(*_OPTIONAL_FIELDS, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`ESCALATOR_KAFKA_SASL_MECHANISM=` (empty) means "not set"."""
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value():
            return None
        return value

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        value = value.strip()
        entries = [entry.strip() for entry in value.split(",")]
        if not value or not all(entries):
            raise _problem(f"expected host:port[,host:port...], got {value!r}")
        for entry in entries:
            host, sep, port = entry.rpartition(":")
            if sep and not port.isdigit() and not entry.endswith("]"):
                raise _problem(f"port of {entry!r} is not a number")
            if sep and port.isdigit() and not 0 < int(port) < 65536:
                raise _problem(f"port of {entry!r} is out of range")
            if sep and not host:
                raise _problem(f"{entry!r} has no host")
        return ",".join(entries)

    @field_validator("sasl_mechanism")
    @classmethod
    def _check_mechanism(cls, value: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("security_protocol")
        if protocol is None:
            return value  # the protocol itself is invalid and reported
        if protocol in SASL_PROTOCOLS and value is None:
            raise _problem(
                f"required with security_protocol {protocol}: one of {', '.join(SASL_MECHANISMS)}"
            )
        if protocol not in SASL_PROTOCOLS and value is not None:
            raise _problem(
                f"{value} needs security_protocol SASL_PLAINTEXT or SASL_SSL, not {protocol}"
            )
        return value

    @field_validator("sasl_username", "sasl_password")
    @classmethod
    def _check_credentials(cls, value: Any, info: ValidationInfo) -> Any:
        protocol = info.data.get("security_protocol")
        if protocol is None:
            return value
        if protocol in SASL_PROTOCOLS and value is None:
            raise _problem(f"required with security_protocol {protocol}")
        if protocol not in SASL_PROTOCOLS and value is not None:
            raise _problem(
                f"set, but security_protocol {protocol} does not use SASL "
                "(use SASL_PLAINTEXT or SASL_SSL, or unset it)"
            )
        return value

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _check_tls_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        protocol = info.data.get("security_protocol")
        if protocol is not None and protocol not in TLS_PROTOCOLS:
            raise _problem(
                f"set, but security_protocol {protocol} does not use TLS (use SSL or SASL_SSL)"
            )
        path = Path(value).expanduser()
        if not path.exists():
            raise _problem(f"no such file: {path}")
        if not path.is_file():
            raise _problem(f"not a file: {path}")
        if not os.access(path, os.R_OK):
            raise _problem(f"not readable: {path}")
        return str(path)

    @field_validator("ssl_keyfile")
    @classmethod
    def _key_needs_cert(cls, value: str | None, info: ValidationInfo) -> str | None:
        certfile = info.data.get("ssl_certfile")
        if value is not None and certfile is None and "ssl_certfile" in info.data:
            raise _problem("set without ssl_certfile (the client certificate it belongs to)")
        if value is None and certfile is not None and not _holds_private_key(certfile):
            raise _problem(
                f"required: ssl_certfile {certfile} holds no private key, so the client "
                "certificate's key must be given in ssl_keyfile"
            )
        return value

    @field_validator("ssl_password")
    @classmethod
    def _password_needs_key(cls, value: SecretStr | None, info: ValidationInfo) -> Any:
        files = ("ssl_keyfile", "ssl_certfile")
        if value is None or not all(name in info.data for name in files):
            return value  # unset, or a file setting is itself invalid and reported
        if all(info.data[name] is None for name in files):
            raise _problem("set, but there is no ssl_keyfile or ssl_certfile to decrypt")
        return value

    @model_validator(mode="after")
    def _remember_secrets(self) -> KafkaSettings:
        remember_secret(self.sasl_password)
        remember_secret(self.ssl_password)
        return self

    # --- use ------------------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in SASL_PROTOCOLS

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in TLS_PROTOCOLS

    def to_env(self) -> dict[str, str]:
        """Environment variables that reproduce these settings in a child process.

        Every setting is present (an unset optional one as an empty value), so a child gets
        exactly these settings whatever its inherited environment or TOML file says.
        The result holds the secrets in clear: hand it to a child process, never print or log it.
        """
        env: dict[str, str] = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers}
        for name, value in self.model_dump(exclude={"bootstrap_servers"}).items():
            if value is None:
                value = ""
            elif isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"ESCALATOR_KAFKA_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return env


def _holds_private_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read(1 << 20)
    except OSError:
        return False
