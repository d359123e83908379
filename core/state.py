"""Loop state: typed, versioned, JSON-round-trippable.

If it cannot be serialized and replayed, it is not state. Loops subclass
`LoopState` to add their own fields and bump `VERSION` when the shape changes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class WorkingMemory(BaseModel):
    """The scratchpad carried into every prompt: facts, not narratives."""

    facts: list[str] = Field(default_factory=list)
    subgoal: str = ""
    contradictions: list[str] = Field(default_factory=list)
    token_count: int = 0
    # Facts as key -> value, set by a loop's observation step; a key that long-term memory holds
    # with another value is flagged in `contradictions` (see engine._flag_contradictions).
    known: dict[str, str] = Field(default_factory=dict)
    retrieved: list[str] = Field(default_factory=list)  # long-term memory recalled when the run started


class ToolRecord(BaseModel):
    """One executed tool call, appended to state and never rewritten."""

    iteration: int
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    ok: bool = True
    output: str = ""
    error: str | None = None
    reused: bool = False  # True when the result came from the idempotency journal


class LoopState(BaseModel):
    """Base state every loop carries. Subclass it to add fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    VERSION: ClassVar[int] = 1

    schema_version: int = 1
    iteration: int = 0
    task: str = ""
    memory: WorkingMemory = Field(default_factory=WorkingMemory)
    tool_results: list[ToolRecord] = Field(default_factory=list)
    invariant_status: dict[str, bool] = Field(default_factory=dict)
    last_gate_failure: str | None = None
    termination_reason: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        return cls.model_validate_json(text)
