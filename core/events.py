"""What the engine tells its subscribers (the headless progress view, the TUI).

Subscribers receive these synchronously on the engine's task; they must not
block. The TUI forwards them as Textual messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from loopterm.core.acp_turn import AgentTurn
from loopterm.core.records import IterationRecord


class RunStarted(BaseModel):
    kind: Literal["run_started"] = "run_started"
    run_id: str
    loop: str
    model: str
    max_iterations: int
    resumed_from: int = 0


class IterationStarted(BaseModel):
    kind: Literal["iteration_started"] = "iteration_started"
    run_id: str
    n: int


class ModelRetry(BaseModel):
    kind: Literal["model_retry"] = "model_retry"
    run_id: str
    n: int
    attempt: int
    error: str
    delay_s: float


class IterationCommitted(BaseModel):
    kind: Literal["iteration_committed"] = "iteration_committed"
    record: IterationRecord


class Escalated(BaseModel):
    kind: Literal["escalated"] = "escalated"
    run_id: str
    n: int
    packet: dict[str, Any]


class StatusChanged(BaseModel):
    """Paused, stepping, running again, waiting on a person (for approval or an escalation)."""

    kind: Literal["status_changed"] = "status_changed"
    run_id: str
    status: str
    message: str = ""


class ApprovalNeeded(BaseModel):
    kind: Literal["approval_needed"] = "approval_needed"
    run_id: str
    n: int
    key: str
    tool: str
    args: dict[str, Any]
    shadow: bool = False  # a shadow run's proposal: a person judges it, nothing runs (core/shadow.py)


class CommandApplied(BaseModel):
    """A person's command took effect (or was refused, with the reason)."""

    kind: Literal["command_applied"] = "command_applied"
    run_id: str
    command: str
    ok: bool
    detail: str = ""


class RunFinished(BaseModel):
    kind: Literal["run_finished"] = "run_finished"
    run_id: str
    status: str
    reason: str
    message: str


class AgentTurnProgress(BaseModel):
    """An agent's turn as it stands so far (after each update it streams): for a screen that shows it live.
    The turn that counts is the one committed with its iteration (core/runlog.py: AgentTurnRecorded)."""

    kind: Literal["agent_turn_progress"] = "agent_turn_progress"
    run_id: str
    n: int
    turn: AgentTurn


EngineEvent = (
    RunStarted | IterationStarted | ModelRetry | IterationCommitted | Escalated | StatusChanged | ApprovalNeeded
    | CommandApplied | RunFinished | AgentTurnProgress
)
