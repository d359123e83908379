"""Why a run stopped, and what status that leaves it in.

"The model said done" is never a reason on its own: convergence is decided by
gates and invariants, over state.
"""

from __future__ import annotations

from enum import Enum


class TerminationReason(str, Enum):
    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    BUDGET_TOKENS = "budget_tokens"
    BUDGET_USD = "budget_usd"
    BUDGET_WALL_TIME = "budget_wall_time"
    STALLED = "stalled"
    FATAL_ERROR = "fatal_error"
    STOPPED = "stopped"  # by a person
    WAITING = "waiting_on_person"  # escalated; resumable


class Status(str, Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STEPPING = "stepping"  # running exactly one iteration, then pausing
    ESCALATED = "escalated"
    CONVERGED = "converged"
    TERMINATED = "terminated"  # ended without converging (max iterations, budget, stalled)
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        return self in (Status.CONVERGED, Status.TERMINATED, Status.FAILED, Status.STOPPED)

    @property
    def resumable(self) -> bool:
        return self not in (Status.CONVERGED,)


def status_for(reason: TerminationReason) -> Status:
    if reason is TerminationReason.CONVERGED:
        return Status.CONVERGED
    if reason is TerminationReason.WAITING:
        return Status.ESCALATED
    if reason is TerminationReason.STOPPED:
        return Status.STOPPED
    if reason is TerminationReason.FATAL_ERROR:
        return Status.FAILED
    return Status.TERMINATED


EXIT_CODES = {
    Status.CONVERGED: 0,
    Status.FAILED: 1,
    Status.TERMINATED: 3,
    Status.STOPPED: 3,
    Status.ESCALATED: 4,
}
"""Headless exit codes (DESIGN section 7); 2 is reserved for usage errors."""


class RunEnds(Exception):
    """Ends the run from deep inside an iteration (any phase), with a reason and one human line."""

    def __init__(self, reason: TerminationReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
