"""What the engine persists: the rows of a run, as pydantic models.

These are the boundary between core and store; the store maps them to SQLite
rows and back, and the CLI and TUI read them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class RunRecord(BaseModel):
    id: str
    loop: str  # loop name
    loop_ref: str  # how to load it again: a built-in name or path/to/file.py:name
    goal: str
    spec_hash: str
    model: str
    status: str
    workspace: str
    created_at: float
    updated_at: float
    parent_run: str | None = None  # a fork's parent, or the run a replay re-drives
    fork_iteration: int | None = None  # the parent's iteration this run continues from (0 = from the start)
    origin: str = "run"  # "run" | "fork" | "replay" | "child" | "trigger" (started by `loopterm daemon`)
    max_iterations: int
    budget: dict[str, Any] = Field(default_factory=dict)
    iterations: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    tokens_cached: int = 0  # of tokens_in, served from the provider's prompt cache (schema 4)
    termination_reason: str | None = None
    message: str | None = None  # one human line explaining the status


class IterationRecord(BaseModel):
    run_id: str
    n: int
    started_at: float
    ended_at: float
    prompt: list[dict[str, Any]]  # the messages sent
    raw_response: str
    decision: dict[str, Any] | None
    repairs: int = 0
    tool_call: dict[str, Any] | None = None  # {"tool", "args", "key"}
    tool_result: dict[str, Any] | None = None  # ToolRecord dump
    gate_results: list[dict[str, Any]] = Field(default_factory=list)
    invariant_status: dict[str, bool] = Field(default_factory=dict)
    remediations: list[str] = Field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    model: str = ""
    state: dict[str, Any]  # the state after this iteration
    # Schema 4: how the decision was asked for ("text": JSON in the reply; "tools": the provider's tool call;
    # "json_schema": a schema-constrained reply), and the input tokens the provider's prompt cache served.
    decision_mode: str = "text"
    tokens_cached: int = 0


class ToolCallRecord(BaseModel):
    """The idempotency journal: one row per keyed tool call."""

    key: str
    run_id: str
    iteration: int
    tool: str
    args: dict[str, Any]
    status: str  # "started" | "done"
    result: dict[str, Any] | None = None  # ToolRecord dump once done
    started_at: float
    finished_at: float | None = None


class Intent(BaseModel):
    """A model reply received but whose iteration is not yet committed.

    Saved before the tool runs so a resume after a crash reuses the reply
    (no second spend, no different decision) instead of asking again.
    """

    run_id: str
    n: int
    prompt: list[dict[str, Any]]
    raw_response: str
    decision: dict[str, Any]
    repairs: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    model: str = ""
    started_at: float
    decision_mode: str = "text"  # as on IterationRecord
    tokens_cached: int = 0


class CommandRecord(BaseModel):
    """A control-channel message to a run executing in another process."""

    id: int | None = None
    run_id: str
    ts: float
    kind: str  # "stop" | "pause" | "resume" | "step" | ...
    payload: dict[str, Any] = Field(default_factory=dict)
    consumed_at: float | None = None


MemoryKind = Literal["fact", "decision", "document"]


class MemoryItem(BaseModel):
    """One entry of a loop's long-term memory (key-value facts and decisions, documents)."""

    id: int
    loop: str  # the loop name it belongs to (later runs of the same loop read it)
    kind: MemoryKind
    key: str  # unique within the loop: remembering a key again replaces its value
    value: str
    source_run: str | None = None  # the run that learned it; None when a person added it
    created_at: float
    updated_at: float
    score: float | None = None  # set by a search: higher is a better match


class SpendTotal(BaseModel):
    """Spend ledger rows summed over one group (a day, a loop or a model)."""

    key: str  # the day (YYYY-MM-DD, local), the loop name or the model
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    runs: int = 0  # distinct runs that spent in this group
    tokens_cached: int = 0  # of tokens_in, served from a provider's prompt cache
