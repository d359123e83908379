"""Error classes and their classification.

Every failure is one of three kinds, and the kind alone decides what happens:
transient (retry with backoff), permanent (this call cannot succeed as sent;
do not retry it), fatal (the run cannot continue).
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    FATAL = "fatal"


class LooptermError(Exception):
    """Base for errors shown to a person as one line: what is wrong, what to do."""


class ConfigError(LooptermError):
    """Bad input from the person: loop file, model, key, budget, run id, database."""


class RunBusyError(ConfigError):
    """Another engine holds the run's lock: it is being executed elsewhere (a worker, another host)."""


class ModelError(LooptermError):
    """A model call that failed, already classified."""

    def __init__(
        self,
        message: str,
        kind: ErrorKind,
        status: int | None = None,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        calls: int = 0,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        # A finer reason the engine can act on: "context_window" (the prompt is too long,
        # shrink it), "circuit_open" (the provider was not called), "connection" (refused,
        # dropped), "timeout" (no answer in time), "truncated" (the reply was cut off),
        # "bad_reply" (not JSON, no choices), "unexpected" (a bug, not the provider).
        self.code = code
        # Seconds the caller should wait before trying again, when known (Retry-After, breaker).
        self.retry_after = retry_after
        # Provider calls made before giving up (retries included), so call counters stay right.
        self.calls = calls


RETRYABLE_STATUS = frozenset({408, 409, 429})


def classify_status(status: int | None) -> ErrorKind:
    """Retry 408/409/429/5xx only; auth and not-found end the run; other 4xx are permanent."""
    if status is None:
        return ErrorKind.TRANSIENT  # connection refused, reset, timeout: no answer at all
    if status in RETRYABLE_STATUS or 500 <= status <= 599:
        return ErrorKind.TRANSIENT
    if status in (401, 403, 404):
        return ErrorKind.FATAL
    return ErrorKind.PERMANENT
