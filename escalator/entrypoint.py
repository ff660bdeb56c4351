"""What every service's `python -m` entry point shares: logging and readable settings errors."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


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
