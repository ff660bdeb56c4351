"""Typed refusals of the world engine; the HTTP layer maps each to its status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every refusal; `status` is the HTTP status the API answers with."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(EngineError):
    """The request makes no sense for this object (wrong redundancy model, not a member...)."""

    status = 400


class NotFound(EngineError):
    """An id names no node, VM or VNF."""

    status = 404


class Conflict(EngineError):
    """The request is valid but the current state refuses it (held, busy, no capacity...)."""

    status = 409
