"""Retry delays and a per-model circuit breaker for model calls.

We retry ourselves (litellm's own ``num_retries`` retries 400s, or silently does
nothing without tenacity), so the policy and the breaker live here and stay free
of litellm: importing this module is cheap.

The defaults can be tuned per environment (a flaky local server, a CI job that
must fail fast), read when a client or a model's breaker is made:

    LOOPTERM_MODEL_TIMEOUT      seconds one provider call may take (60)
    LOOPTERM_MODEL_ATTEMPTS     attempts per call, retries included (4)
    LOOPTERM_RETRY_DELAY        backoff ceiling after the first failure, seconds (0.5)
    LOOPTERM_RETRY_MAX_DELAY    backoff cap, seconds (8)
    LOOPTERM_BREAKER_FAILURES   consecutive failures that open a model's circuit (5)
    LOOPTERM_BREAKER_RESET      seconds an open circuit refuses calls before a trial (30)

They are fields of loopterm.core.settings.Settings, read through settings():
a value that is not a number in range is one ConfigError line (check_model
refuses the run before it starts).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loopterm.core.errors import ErrorKind, ModelError
from loopterm.core.settings import settings

Clock = Callable[[], float]


class RetryPolicy(BaseModel):
    """How often and how patiently a transient model failure is retried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=4, ge=1)
    base_delay: float = Field(default=0.5, ge=0.0)
    max_delay: float = Field(default=8.0, ge=0.0)

    @model_validator(mode="after")
    def _delays_ordered(self) -> RetryPolicy:
        if self.max_delay < self.base_delay:
            raise ValueError(f"max_delay ({self.max_delay}) is smaller than base_delay ({self.base_delay})")
        return self

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), capped."""
        exponent = max(0, attempt - 1)
        if exponent > 60:  # 2**60 * anything positive is far past any cap; avoid float overflow
            return self.max_delay
        return min(self.max_delay, self.base_delay * (2**exponent))

    def delay(self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based).

        Full jitter (uniform in [0, ceiling]) so many clients hitting the same
        rate limit do not retry in lockstep. A provider's Retry-After hint wins,
        capped at ``max_delay`` so one hint cannot stall a supervised run.
        """
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return min(float(retry_after), self.max_delay)
        rng = rng or random.Random()
        return rng.uniform(0.0, self.ceiling(attempt))


class CallSettings(BaseModel):
    """Timeout, retry policy and circuit breaker settings for model calls (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    timeout: float = 60.0
    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    breaker_failures: int = 5
    breaker_reset: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CallSettings:
        """The settings the environment asks for (core/settings.py); ConfigError (one line) for a bad value."""
        env = settings(environ)
        return cls(timeout=env.model_timeout, attempts=env.model_attempts, base_delay=env.retry_delay,
                   max_delay=env.retry_max_delay, breaker_failures=env.breaker_failures,
                   breaker_reset=env.breaker_reset)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.attempts, base_delay=self.base_delay, max_delay=self.max_delay)


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a model that keeps failing, then probes it with one trial call.

    CLOSED -> OPEN after ``failure_threshold`` consecutive failures; after
    ``reset_timeout`` seconds OPEN -> HALF_OPEN, which admits exactly one trial
    call: success closes the breaker, failure opens it again for another
    ``reset_timeout``. The clock is injectable so tests need not wait.
    """

    def __init__(
        self,
        model: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.model = model
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.failures = 0  # consecutive failures
        self.last_error: str | None = None  # what the last of them was, for the person told the circuit is open
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        """Current state; an open breaker whose timeout passed reports HALF_OPEN."""
        with self._lock:
            return self._state()

    def _state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self._opened_at >= self.reset_timeout:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a trial call (0 when it would admit one now)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self.reset_timeout - (self.clock() - self._opened_at))

    def before_call(self) -> None:
        """Admit a call or raise a TRANSIENT ModelError(code="circuit_open") without calling anyone."""
        with self._lock:
            state = self._state()
            if state is BreakerState.CLOSED:
                return
            if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                return
            if state is BreakerState.HALF_OPEN:
                raise ModelError(
                    f"circuit half-open for {self.model} after {self.failures} consecutive failures; "
                    "a trial call is in flight",
                    ErrorKind.TRANSIENT,
                    code="circuit_open",
                    retry_after=0.0,
                )
            assert self._opened_at is not None
            remaining = max(0.0, self.reset_timeout - (self.clock() - self._opened_at))
            raise ModelError(
                f"circuit open for {self.model} after {self.failures} consecutive failures; "
                f"retrying in {math.ceil(remaining)}s",
                ErrorKind.TRANSIENT,
                code="circuit_open",
                retry_after=remaining,
            )

    def record_success(self) -> None:
        """The provider answered: close the breaker and forget past failures."""
        with self._lock:
            self.failures = 0
            self.last_error = None
            self._opened_at = None
            self._trial_in_flight = False

    def record_failure(self, error: str | None = None) -> None:
        """A transient failure: count it; open (or re-open) the breaker when it is one too many."""
        with self._lock:
            self.failures += 1
            if error is not None:
                self.last_error = error
            if self._trial_in_flight or self.failures >= self.failure_threshold:
                self._opened_at = self.clock()
            self._trial_in_flight = False

    def release(self) -> None:
        """An admitted call ended without a verdict (cancelled): let another trial through."""
        with self._lock:
            self._trial_in_flight = False


_breakers: dict[str, CircuitBreaker] = {}
_registry_lock = threading.Lock()


def breaker_for(model: str, settings: CallSettings | None = None) -> CircuitBreaker:
    """The process-wide breaker for ``model``: every client of one model shares its health.

    A new breaker takes its threshold and reset timeout from ``settings`` (default: the environment).
    """
    with _registry_lock:
        breaker = _breakers.get(model)
        if breaker is None:
            settings = settings or CallSettings.from_env()
            breaker = _breakers[model] = CircuitBreaker(
                model, failure_threshold=settings.breaker_failures, reset_timeout=settings.breaker_reset
            )
        return breaker


def reset_breakers() -> None:
    """Forget every breaker (tests; a fresh run after a person fixed the provider)."""
    with _registry_lock:
        _breakers.clear()
