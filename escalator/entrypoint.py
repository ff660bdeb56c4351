"""What every service's `python -m` entry point shares: logging and readable settings errors."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError

S = TypeVar("S", bound=BaseModel)

# Settings whose given value is never echoed in an error line.
_SECRET_NAME = re.compile(r"password|secret|token|credential|(^|_)key$", re.IGNORECASE)


def setup_logging(level: str) -> None:
    """Log to stderr; every handler masks the secrets of the process's settings."""
    from escalator.settings import SecretRedactingFilter

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.root.handlers:
        if not any(isinstance(f, SecretRedactingFilter) for f in handler.filters):
            handler.addFilter(SecretRedactingFilter())


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`: a TOML settings file (same as `$ESCALATOR_CONFIG`); pass
    `args.config` to `load_settings(..., config_file=...)`."""
    parser.add_argument(
        "--config",
        metavar="TOML",
        help="TOML settings file with a [kafka] table (default: $ESCALATOR_CONFIG)",
    )


def _shown(loc: tuple[Any, ...], given: Any) -> str:
    if isinstance(given, dict) or given is None:
        return ""
    if isinstance(given, SecretStr) or any(_SECRET_NAME.search(str(part)) for part in loc):
        return ""  # never echo a secret, not even a wrong one
    return f" (got {given!r})"


def settings_error(service: str, err: ValidationError) -> str:
    """One line per bad setting, naming the setting (as a flag or environment variable).

    The value given is shown for plain settings and never for secrets (passwords, tokens).
    """
    lines = []
    for error in err.errors(include_url=False):
        loc = tuple(error["loc"])
        where = ".".join(str(part) for part in loc)
        head = f"{service}: bad setting {where}" if where else f"{service}: bad settings"
        lines.append(f"{head}: {error['msg']}{_shown(loc, error.get('input'))}")
    return "\n".join(lines)


def load_settings(
    settings_cls: type[S],
    service: str,
    *,
    config_file: str | os.PathLike[str] | None = None,
    check_kafka: bool = True,
    **flags: Any,
) -> S | None:
    """Settings from the environment (and the TOML file), overridden by the flags that were
    given (not None); None after printing one line per bad setting.

    `config_file` (a `--config` flag) becomes `$ESCALATOR_CONFIG` for this process and its
    children. With `check_kafka` the Kafka settings (`KafkaSettings`, built again later by the
    service from the same sources) are validated too, so that a bad one is reported here as a
    line rather than later as a traceback.
    """
    from escalator.settings import CONFIG_ENV, KafkaSettings

    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            print(f"{service}: bad setting --config: no such file: {path}", file=sys.stderr)
            return None
        os.environ[CONFIG_ENV] = str(path.resolve())
    problems: list[str] = []
    settings: S | None = None
    try:
        settings = settings_cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        problems.append(settings_error(service, err))
    if check_kafka and settings_cls is not KafkaSettings:
        try:
            KafkaSettings()
        except ValidationError as err:
            problems.append(settings_error(service, err))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return None
    return settings


def run_until_interrupted(main: Coroutine[Any, Any, None]) -> int:
    """Run a service's main coroutine; Ctrl-C is a normal stop."""
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        pass
    return 0
