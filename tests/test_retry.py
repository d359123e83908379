"""RetryPolicy backoff and the per-model CircuitBreaker (fake clock, no waiting)."""

from __future__ import annotations

import random

import pytest

from loopterm.core.errors import ErrorKind, ModelError
from loopterm.core.retry import BreakerState, CircuitBreaker, RetryPolicy, breaker_for, reset_breakers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _fresh_breakers() -> None:
    reset_breakers()


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (4, 0.5, 8.0)


def test_backoff_ceiling_grows_and_is_capped() -> None:
    policy = RetryPolicy()
    assert [policy.ceiling(a) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert policy.ceiling(10_000) == 8.0


def test_backoff_is_full_jitter_within_bounds_and_grows() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    means = []
    for attempt in range(1, 6):
        samples = [policy.delay(attempt, rng) for _ in range(2_000)]
        assert all(0.0 <= s <= policy.ceiling(attempt) for s in samples)
        assert len(set(samples)) > 1_000  # jittered, not a constant
        assert max(samples) > 0.9 * policy.ceiling(attempt)  # uses the whole range
        means.append(sum(samples) / len(samples))
    assert means == sorted(means)  # later attempts wait longer on average
    assert means[3] > 3 * means[0]


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    assert [policy.delay(2, random.Random(1)) for _ in range(3)] == [policy.delay(2, random.Random(1))] * 3


def test_retry_after_hint_is_honoured_and_capped() -> None:
    policy = RetryPolicy()
    assert policy.delay(1, random.Random(0), retry_after=3.0) == 3.0
    assert policy.delay(1, random.Random(0), retry_after=120.0) == 8.0
    assert policy.delay(1, random.Random(0), retry_after=0.0) == 0.0
    assert 0.0 <= policy.delay(1, random.Random(0), retry_after=-1.0) <= 0.5  # nonsense hint ignored


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=2.0, max_delay=1.0)


def test_breaker_opens_after_n_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("m/x", failure_threshold=3, reset_timeout=30.0, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN

    clock.now += 10
    with pytest.raises(ModelError) as info:
        breaker.before_call()
    err = info.value
    assert err.kind is ErrorKind.TRANSIENT
    assert err.code == "circuit_open"
    assert str(err) == "circuit open for m/x after 3 consecutive failures; retrying in 20s"
    assert err.retry_after == pytest.approx(20.0)


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker("m/x", failure_threshold=3, clock=FakeClock())
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_trial_through_and_success_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("m/x", failure_threshold=2, reset_timeout=30.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 30
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()  # the trial
    with pytest.raises(ModelError, match="trial call is in flight"):
        breaker.before_call()  # a second caller is refused while the trial runs
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.before_call()


def test_half_open_failure_reopens_for_another_timeout() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("m/x", failure_threshold=2, reset_timeout=30.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 31
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 29
    with pytest.raises(ModelError, match=r"retrying in 1s"):
        breaker.before_call()
    clock.now += 1
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()


def test_released_trial_lets_another_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("m/x", failure_threshold=1, reset_timeout=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 5
    breaker.before_call()
    breaker.release()  # cancelled without a verdict
    breaker.before_call()


def test_registry_shares_one_breaker_per_model() -> None:
    assert breaker_for("a/b") is breaker_for("a/b")
    assert breaker_for("a/b") is not breaker_for("a/c")
    first = breaker_for("a/b")
    reset_breakers()
    assert breaker_for("a/b") is not first
