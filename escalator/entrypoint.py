"""What every service's `python -m` entry point shares: logging and readable settings errors."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

S = TypeVar("S", bound=BaseModel)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def settings_error(service: str, err: ValidationError) -> str:
    """One line per bad setting, naming the setting (as a flag or environment variable)."""
    lines = []
    for error in err.errors():
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        given = error.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"{service}: bad setting {where}: {error['msg']}{shown}")
    return "\n".join(lines)


def load_settings(settings_cls: type[S], service: str, **flags: Any) -> S | None:
    """Settings from the environment, overridden by the flags that were given (not None);
    None after printing one line per bad setting."""
    try:
        return settings_cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        print(settings_error(service, err), file=sys.stderr)
        return None


def run_until_interrupted(main: Coroutine[Any, Any, None]) -> int:
    """Run a service's main coroutine; Ctrl-C is a normal stop."""
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        pass
    return 0
