"""Kafka security settings: validation with clear messages, the TOML file and its precedence,
`to_env()` for child processes, the aiokafka arguments, and secrets that are never shown.

The last tests start real service processes (and the CLI) with a distinctive password and a
broker address where nothing listens, and read everything they wrote.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from escalator import broker as launcher
from escalator.bus.connection import client_kwargs, scrub_secrets
from escalator.entrypoint import load_settings, settings_error
from escalator.settings import CONFIG_ENV, KafkaSettings, SecretRedactingFilter

pytestmark = pytest.mark.unit

PASSWORD = "Pw-6f1e0c2d-never-shown"
KEY_PASSWORD = "KeyPw-93b1a7-never-shown"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Kafka setting or config file leaks in from the shell running the tests."""
    for key in list(os.environ):
        if key.startswith("ESCALATOR_KAFKA_") or key in (CONFIG_ENV, "KAFKA_BOOTSTRAP_SERVERS"):
            monkeypatch.delenv(key)


def errors_of(**values: Any) -> dict[str, str]:
    """{setting: message} of the validation errors for `values` ("" for model-level ones)."""
    with pytest.raises(ValidationError) as info:
        KafkaSettings(**values)
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


def sasl(**extra: Any) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "escalator",
        "sasl_password": PASSWORD,
        **extra,
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server and a client certificate (client key encrypted with KEY_PASSWORD)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make test certificates")
    return launcher._make_test_pki(tmp_path_factory.mktemp("pki") / "tls", KEY_PASSWORD)


# --- validation -------------------------------------------------------------------------------


def test_plaintext_default_and_valid_sasl() -> None:
    assert KafkaSettings().security_protocol == "PLAINTEXT"
    s = KafkaSettings(**sasl(security_protocol="sasl_plaintext", sasl_mechanism="scram-sha-512"))
    assert (s.security_protocol, s.sasl_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert s.uses_sasl and not s.uses_tls


def test_sasl_protocol_needs_mechanism_user_and_password() -> None:
    errors = errors_of(security_protocol="SASL_SSL")
    assert errors == {
        "sasl_mechanism": "required with security_protocol SASL_SSL: one of PLAIN, "
        "SCRAM-SHA-256, SCRAM-SHA-512",
        "sasl_username": "required with security_protocol SASL_SSL",
        "sasl_password": "required with security_protocol SASL_SSL",
    }
    # an empty value is "not set"
    assert set(errors_of(**sasl(sasl_password="", sasl_username=" "))) == {
        "sasl_username",
        "sasl_password",
    }


def test_sasl_settings_without_sasl_protocol() -> None:
    errors = errors_of(sasl_mechanism="PLAIN", sasl_username="u", sasl_password=PASSWORD)
    assert errors["sasl_mechanism"] == (
        "PLAIN needs security_protocol SASL_PLAINTEXT or SASL_SSL, not PLAINTEXT"
    )
    assert errors["sasl_username"].startswith("set, but security_protocol PLAINTEXT does not")
    assert "sasl_password" in errors


def test_unknown_protocol_and_mechanism() -> None:
    errors = errors_of(security_protocol="TLS", sasl_mechanism="GSSAPI")
    assert "'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'" in errors["security_protocol"]
    assert "'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'" in errors["sasl_mechanism"]


def test_tls_files_must_exist_and_fit_the_protocol(tmp_path: Path, pki: dict[str, Path]) -> None:
    missing = tmp_path / "missing.pem"
    assert errors_of(security_protocol="SSL", ssl_cafile=str(missing)) == {
        "ssl_cafile": f"no such file: {missing}"
    }
    assert errors_of(security_protocol="SSL", ssl_cafile=str(tmp_path)) == {
        "ssl_cafile": f"not a file: {tmp_path}"
    }
    assert errors_of(security_protocol="PLAINTEXT", ssl_cafile=str(pki["ca"])) == {
        "ssl_cafile": "set, but security_protocol PLAINTEXT does not use TLS (use SSL or SASL_SSL)"
    }
    # a key without its certificate, a certificate without a key, a key password without a key
    key_only = errors_of(security_protocol="SSL", ssl_keyfile=str(pki["client_key"]))
    assert key_only == {
        "ssl_keyfile": "set without ssl_certfile (the client certificate it belongs to)"
    }
    cert_only = errors_of(security_protocol="SSL", ssl_certfile=str(pki["client_cert"]))
    assert cert_only["ssl_keyfile"].startswith(f"required: ssl_certfile {pki['client_cert']}")
    assert errors_of(security_protocol="SSL", ssl_password=KEY_PASSWORD) == {
        "ssl_password": "set, but there is no ssl_keyfile or ssl_certfile to decrypt"
    }
    # a PEM holding certificate and key needs no ssl_keyfile
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki["client_cert"].read_bytes() + pki["client_key"].read_bytes())
    s = KafkaSettings(security_protocol="SSL", ssl_certfile=str(combined))
    assert s.ssl_certfile == str(combined)


def test_bootstrap_servers_format() -> None:
    assert KafkaSettings(bootstrap_servers=" a:1, b:2 ").bootstrap_servers == "a:1,b:2"
    assert KafkaSettings(KAFKA_BOOTSTRAP_SERVERS="[::1]:9092").bootstrap_servers == "[::1]:9092"
    for bad, fragment in (
        ("a:1,", "expected host:port"),
        ("a:x", "not a number"),
        (":9", "no host"),
    ):
        (message,) = errors_of(KAFKA_BOOTSTRAP_SERVERS=bad).values()
        assert fragment in message, (bad, message)


# --- secrets are never shown ------------------------------------------------------------------


def test_secrets_hidden_in_repr_dump_and_errors(pki: dict[str, Path]) -> None:
    s = KafkaSettings(
        **sasl(
            security_protocol="SASL_SSL",
            ssl_cafile=str(pki["ca"]),
            ssl_certfile=str(pki["client_cert"]),
            ssl_keyfile=str(pki["client_key"]),
            ssl_password=KEY_PASSWORD,
        )
    )
    shown = [repr(s), str(s), s.model_dump_json(), str(s.model_dump(mode="json"))]
    for text in shown:
        assert PASSWORD not in text and KEY_PASSWORD not in text
    assert isinstance(s.sasl_password, SecretStr) and isinstance(s.ssl_password, SecretStr)
    # a bad setting next to a password, and a password that is itself the bad setting
    for values in (
        sasl(sasl_mechanism="GSSAPI"),
        {"sasl_password": PASSWORD, "ssl_password": KEY_PASSWORD},
    ):
        with pytest.raises(ValidationError) as info:
            KafkaSettings(**values)
        for text in (str(info.value), repr(info.value), settings_error("svc", info.value)):
            assert PASSWORD not in text and KEY_PASSWORD not in text, text
    # ... while plain settings still show what was given
    with pytest.raises(ValidationError) as info:
        KafkaSettings(fetch_max_wait_ms="abc")
    assert "(got 'abc')" in settings_error("svc", info.value)


def test_scrub_secrets() -> None:
    s = KafkaSettings(**sasl())
    assert scrub_secrets(f"login {PASSWORD} failed", s) == "login ********** failed"
    assert scrub_secrets("nothing", KafkaSettings()) == "nothing"


# --- TOML file and precedence -----------------------------------------------------------------


def write_config(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "escalator.toml"
    path.write_text(text)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    return path


TOML = f"""
[kafka]
bootstrap_servers = "toml-1:9093,toml-2:9093"
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "from-toml"
sasl_password = "{PASSWORD}"
topic_prefix = "toml."
partitions = 3

[cloud_manager]
anything = "is not the Kafka settings' business"
"""


def test_toml_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, TOML, monkeypatch)
    s = KafkaSettings()
    assert s.bootstrap_servers == "toml-1:9093,toml-2:9093"
    assert (s.security_protocol, s.sasl_mechanism, s.sasl_username) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-512",
        "from-toml",
    )
    assert s.sasl_password is not None and s.sasl_password.get_secret_value() == PASSWORD
    assert (s.topic_prefix, s.partitions) == ("toml.", 3)


def test_precedence_init_over_env_over_toml_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, TOML, monkeypatch)
    monkeypatch.setenv("ESCALATOR_KAFKA_SASL_USERNAME", "from-env")
    monkeypatch.setenv("ESCALATOR_KAFKA_TOPIC_PREFIX", "env.")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env:9092")
    s = KafkaSettings(topic_prefix="init.")
    assert s.topic_prefix == "init."  # init > env > TOML
    assert s.sasl_username == "from-env"  # env > TOML
    assert s.bootstrap_servers == "env:9092"
    assert s.partitions == 3  # TOML > default
    assert s.fetch_max_wait_ms == 500  # default
    # an empty environment variable unsets an optional setting, even one the TOML file sets
    monkeypatch.setenv("ESCALATOR_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    for name in ("MECHANISM", "USERNAME", "PASSWORD"):
        monkeypatch.setenv(f"ESCALATOR_KAFKA_SASL_{name}", "")
    s = KafkaSettings()
    assert (s.security_protocol, s.sasl_mechanism, s.sasl_password) == ("PLAINTEXT", None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[kafka]\nsasl_pasword = 'x'\n", "unknown setting(s) in [kafka]: sasl_pasword (known: "),
        ("[kafka\n", "not valid TOML (Expected ']'"),
        ("kafka = 3\n", "[kafka] must be a table"),
        ("[kafka]\npartitions = 0\n", None),
    ],
)
def test_bad_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str | None
) -> None:
    path = write_config(tmp_path, text, monkeypatch)
    errors = errors_of()
    if expected is None:
        assert errors == {"partitions": "Input should be greater than or equal to 1"}
    else:
        (message,) = errors.values()
        assert message.startswith(f"{CONFIG_ENV}={path}: ") and expected in message, message


def test_missing_config_file_and_other_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nope.toml"))
    assert errors_of() == {"": f"{CONFIG_ENV}={tmp_path / 'nope.toml'}: no such file"}
    write_config(tmp_path, "[node_agent]\nnode_id = 'n1'\n", monkeypatch)
    assert KafkaSettings().security_protocol == "PLAINTEXT"


def test_no_secret_in_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path, f"[kafka]\nsasl_password = '{PASSWORD}'\nsasl_mechanism='X'\n", monkeypatch
    )
    with pytest.raises(ValidationError) as info:
        KafkaSettings()
    assert PASSWORD not in str(info.value) + settings_error("svc", info.value)


# --- to_env: the settings of a child process --------------------------------------------------


def test_to_env_reproduces_settings_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: dict[str, Path]
) -> None:
    parent = KafkaSettings(
        **sasl(
            security_protocol="SASL_SSL",
            ssl_cafile=str(pki["ca"]),
            ssl_certfile=str(pki["client_cert"]),
            ssl_keyfile=str(pki["client_key"]),
            ssl_password=KEY_PASSWORD,
            ssl_check_hostname=False,
        ),
        KAFKA_BOOTSTRAP_SERVERS="k:9094",
    )
    env = parent.to_env()
    assert env["ESCALATOR_KAFKA_SASL_PASSWORD"] == PASSWORD  # children need the secret ...
    assert env["ESCALATOR_KAFKA_SSL_PASSWORD"] == KEY_PASSWORD
    assert env["ESCALATOR_KAFKA_SSL_CHECK_HOSTNAME"] == "false"
    # ... and get exactly the parent's settings, whatever their TOML file says
    write_config(tmp_path, TOML, monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    child = KafkaSettings()
    assert child.model_dump() == parent.model_dump()
    # a PLAINTEXT parent overrides a child's stale SASL environment and TOML
    plain = launcher.settings_for("kafka", "127.0.0.1:7")
    for key, value in plain.to_env().items():
        monkeypatch.setenv(key, value)
    assert KafkaSettings().model_dump() == plain.model_dump()


def test_client_kwargs_tls_and_key_password(pki: dict[str, Path]) -> None:
    settings = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=str(pki["ca"]),
        ssl_certfile=str(pki["client_cert"]),
        ssl_keyfile=str(pki["client_key"]),
        ssl_password=KEY_PASSWORD,
        ssl_check_hostname=False,
    )
    kwargs = client_kwargs(settings)
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is False
    assert "sasl_mechanism" not in kwargs
    assert KEY_PASSWORD not in repr(kwargs)
    wrong = settings.model_copy(update={"ssl_password": SecretStr("Wrong-" + KEY_PASSWORD)})
    with pytest.raises(ValueError, match=r"cannot load TLS files .*wrong ssl_password\?") as info:
        client_kwargs(wrong)
    assert KEY_PASSWORD not in str(info.value)


# --- entry points -----------------------------------------------------------------------------


def test_load_settings_reports_kafka_and_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydantic_settings import BaseSettings

    class Svc(BaseSettings):
        name: str = "x"

    monkeypatch.setenv("ESCALATOR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ESCALATOR_KAFKA_SASL_PASSWORD", PASSWORD)
    assert load_settings(Svc, "svc") is None
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "svc: bad setting sasl_mechanism: required with security_protocol SASL_SSL: one of "
        "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        "svc: bad setting sasl_username: required with security_protocol SASL_SSL",
    ]
    monkeypatch.delenv("ESCALATOR_KAFKA_SECURITY_PROTOCOL")
    monkeypatch.delenv("ESCALATOR_KAFKA_SASL_PASSWORD")
    assert load_settings(Svc, "svc", config_file=tmp_path / "nope.toml") is None
    assert capsys.readouterr().err.strip() == (
        f"svc: bad setting --config: no such file: {tmp_path / 'nope.toml'}"
    )
    path = tmp_path / "e.toml"
    path.write_text("[kafka]\ntopic_prefix = 'cfg.'\n")
    assert load_settings(Svc, "svc", config_file=path) is not None
    assert os.environ[CONFIG_ENV] == str(path.resolve())
    assert KafkaSettings().topic_prefix == "cfg."


def run(
    argv: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ESCALATOR_KAFKA_")}
    base.pop(CONFIG_ENV, None)
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, "COLUMNS": "250", **env},
        cwd=REPO,
    )


def test_service_rejects_bad_security_settings_without_showing_the_password() -> None:
    result = run(
        [sys.executable, "-m", "services.cloud_manager", "--world", "http://w"],
        {
            "ESCALATOR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "ESCALATOR_KAFKA_SASL_MECHANISM": "SCRAM-SHA-1",
            "ESCALATOR_KAFKA_SASL_PASSWORD": PASSWORD,
        },
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("cloud manager: bad setting sasl_") for line in lines), lines
    assert any("sasl_mechanism: Input should be 'PLAIN'" in line for line in lines), lines
    assert PASSWORD not in result.stdout + result.stderr


@pytest.fixture
def sasl_env_nothing_listening() -> Iterator[dict[str, str]]:
    """SASL settings with a distinctive password, for a broker address where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = KafkaSettings(**sasl(), KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
    yield settings.to_env()


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "services.cloud_manager", "--world", "http://127.0.0.1:9", "--log-level", "DEBUG"],
        [
            "-m",
            "services.node_agent",
            "--node-id",
            "n1",
            "--world",
            "http://127.0.0.1:9",
            "--log-level",
            "DEBUG",
        ],
        ["-m", "services.upgrade_manager", "--log-level", "DEBUG"],
        ["-m", "services.vnfm_adapter", "--log-level", "DEBUG"],
    ],
    ids=["cloud_manager", "node_agent", "upgrade_manager", "vnfm_adapter"],
)
def test_service_never_logs_the_password(
    argv: list[str], sasl_env_nothing_listening: dict[str, str]
) -> None:
    result = run([sys.executable, *argv], sasl_env_nothing_listening)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output  # it tried, and failed to connect
    assert "cannot connect to Kafka (SASL_PLAINTEXT)" in output, output[-3000:]
    assert PASSWORD not in output


def test_cli_never_prints_the_password(sasl_env_nothing_listening: dict[str, str]) -> None:
    cli = [sys.executable, "-m", "escalator"]
    for args in (["registry", "list"], ["status"], ["broker", "--mode", "external"]):
        result = run([*cli, *args], sasl_env_nothing_listening)
        output = result.stdout + result.stderr
        assert result.returncode != 0, (args, output)
        assert PASSWORD not in output, (args, output)


def test_broker_command_does_not_print_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = KafkaSettings(**sasl())
    handle = launcher.BrokerHandle("external", settings.bootstrap_servers, settings, "fake")
    handle.stop()  # not alive: serve_forever prints the environment, then returns
    monkeypatch.setattr(launcher, "start_broker", lambda *a, **k: handle)
    launcher.serve_forever("external")
    out = capsys.readouterr()
    assert "export ESCALATOR_KAFKA_SASL_USERNAME=escalator" in out.out
    assert "# ESCALATOR_KAFKA_SASL_PASSWORD is set but never printed" in out.out
    assert PASSWORD not in out.out + out.err


# --- log redaction ----------------------------------------------------------------------------


def test_log_filter_hides_sasl_payloads_and_known_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiokafka.protocol.admin import SaslAuthenticateRequest_v1

    import escalator.bus.connection  # noqa: F401  (installs the filter on aiokafka's loggers)

    KafkaSettings(**sasl())  # validated settings remember their secrets
    payload = SaslAuthenticateRequest_v1(sasl_auth_bytes=f"u\0u\0{PASSWORD}".encode())
    caplog.set_level(logging.DEBUG)
    # Another test may have set aiokafka's level (services quieten it): set it here too.
    caplog.set_level(logging.DEBUG, logger="aiokafka.conn")
    logging.getLogger("aiokafka.conn").debug("Request %d: %s", 3, payload)
    # any logger whose records reach a service's handlers (setup_logging adds the filter there)
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(SecretRedactingFilter())
    other = logging.getLogger("escalator.test.redaction")
    other.addHandler(handler)
    try:
        other.error("connect with %s failed", PASSWORD)
        try:
            raise RuntimeError(f"boom {PASSWORD}")
        except RuntimeError:
            other.exception("failed")
    finally:
        other.removeHandler(handler)
    assert "SaslAuthenticateRequest_v1(<SASL payload hidden>)" in caplog.text
    written = handler.stream.getvalue()
    assert "connect with ********** failed" in written and "boom **********" in written
    assert PASSWORD not in caplog.text + written
