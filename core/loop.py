"""A loop definition: what a user writes in a short Python file.

    loop = Loop(name="fixit", goal="...", state=MyState, tools=[write_file],
                gates=[CommandGate(name="tests", argv=["{python}", "-m", "pytest", "-q"])],
                invariants=[...], model="openai/gpt-4o-mini")

Validated by pydantic so a malformed definition is one clear error, not a
traceback halfway through a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loopterm.core.agent_spec import AgentSpec
from loopterm.core.budget import Budget
from loopterm.core.checkers import ModelGate
from loopterm.core.decision import Decision
from loopterm.core.gates import CommandGate, GateResult
from loopterm.core.invariants import Invariant
from loopterm.core.mcp_servers import McpServer
from loopterm.core.state import LoopState, ToolRecord
from loopterm.core.strategy import Strategy
from loopterm.core.tools import Tool

DEFAULT_SYSTEM_PROMPT = (
    "You are the decision step of a supervised loop. Each turn you see the task, "
    "the invariants you must keep, your working memory and the result of the last "
    "verification. Choose exactly one next action from the tools listed."
)


def _refuse_repeats(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")


class Loop(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    goal: str = Field(min_length=1)
    state: type[LoopState] = LoopState
    tools: list[Tool] = Field(default_factory=list)
    # MCP servers whose tools join `tools` for each run (connected at run start; see core/mcp_tools.py).
    mcp_servers: list[McpServer] = Field(default_factory=list)
    gates: list[CommandGate | ModelGate] = Field(default_factory=list)
    invariants: list[Invariant] = Field(default_factory=list)
    model: str = ""  # litellm model string; default "scripted/<name>" when a script is given
    script: Path | None = None  # scripted replies for the offline `scripted/<name>` model
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_iterations: int = Field(default=10, ge=1)
    budget: Budget = Field(default_factory=Budget)
    prompt_token_budget: int = Field(default=6_000, ge=256)  # the prompt is pruned to fit this
    max_output_tokens: int = Field(default=1_024, ge=16)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    # k identical actions / subgoals / verification results in a row is a stall; None turns it off
    stall_window: int | None = Field(default=3, ge=2)
    max_repairs: int = Field(default=2, ge=0)  # repair attempts for an invalid reply
    # The newest tool records kept in `state.tool_results`; None keeps them all. Every call stays
    # in the store (iterations, tool_calls) whatever this is: it bounds the state, not the history,
    # so a state (and its storage, and loading it) does not grow with the run.
    tool_history: int | None = Field(default=32, ge=1)
    workspace_files: Path | None = None  # copied into each run's workspace before it starts
    # Prepares a new run's workspace after workspace_files are copied (e.g. builds a sample git
    # repository), a branch's (before the parent's workspace calls are replayed) and a replay's too;
    # not called for a workspace someone else prepared (a worktree) or on resume.
    setup: Callable[[Path], None] | None = None
    migrations: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = Field(default_factory=dict)
    # The observation step: fold what happened into the loop's own state fields (pure: return a new state).
    observe: Callable[[LoopState, Decision, ToolRecord | None, list[GateResult]], LoopState] | None = None
    converged: Callable[[LoopState, list[GateResult]], bool] | None = None
    initial_state: Callable[[], LoopState] | None = None
    # How the loop adapts on a stall or a change_strategy remediation, in order (see strategy.py).
    strategies: list[Strategy] = Field(default_factory=list)
    topology: str = "single"  # a label: single, reflexive, maker-checker, proposer-critic-judge, planner-executors
    description: str = ""  # one line for `loopterm loops`; default: the goal's first line
    # Long-term memory: items retrieved into working memory when a run starts (0: none), and what a
    # finished run leaves behind for later runs of this loop (default: see engine._consolidate).
    recall: int = Field(default=5, ge=0)
    embedding_model: str | None = None  # rank recalled memory by meaning too (litellm; see core/embedding.py)
    consolidate: Callable[[LoopState, str], list[tuple[str, str, str]]] | None = None
    # The loop's own state fields as the prompt shows them (e.g. a plan's remaining items).
    context: Callable[[LoopState], str] | None = None
    # What a run of this loop hands back when another loop called it (see nesting.py).
    result: Callable[[LoopState], Any] | None = None
    # How the model is asked for its decision (core/decision_modes.py): "auto" picks per model what litellm
    # says it supports (its own tool calls, else a JSON-schema reply, else JSON text); or force one.
    decision_mode: Literal["auto", "tools", "json_schema", "text"] = "auto"
    # An ACP coding agent as the actor (core/agent_actor.py): each iteration is one prompt turn of the agent
    # instead of a model's decision and a tool call; the gates still decide when the work is done.
    agent: AgentSpec | None = None

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[Tool]) -> list[Tool]:
        _refuse_repeats("tool", [t.name for t in tools])
        return tools

    @field_validator("mcp_servers")
    @classmethod
    def _unique_servers(cls, servers: list[McpServer]) -> list[McpServer]:
        _refuse_repeats("MCP server", [s.name for s in servers])
        return servers

    @model_validator(mode="after")
    def _checkers_are_not_the_maker(self) -> "Loop":
        for gate in self.gates:
            if isinstance(gate, ModelGate) and gate.role.same_profile_as(self.model, self.system_prompt):
                raise ValueError(
                    f"gate {gate.name!r}: its role {gate.role.name!r} has the maker's model and system prompt; "
                    "a maker never validates itself: give the checker its own system_prompt or model"
                )
        _refuse_repeats("gate", [g.name for g in self.gates])
        return self

    @property
    def calls(self) -> list[str]:
        """The loops this loop may start as child runs (by reference), from its tools."""
        refs: list[str] = []
        for t in self.tools:
            refs.extend(r for r in getattr(t, "calls", ()) if r not in refs)
        return refs

    @model_validator(mode="after")
    def _agent_is_the_actor(self) -> "Loop":
        if self.agent is None:
            return self
        from loopterm.core.agent_loop import AGENT_TOOL, AgentState, agent_tool, paths_invariant

        if self.mcp_servers or any(t.name != AGENT_TOOL for t in self.tools):
            raise ValueError("a loop whose actor is an agent has no tools or MCP servers of its own: the agent "
                             "brings its own (give the agent its MCP servers in its own configuration)")
        if self.state is LoopState:
            self.state = AgentState
        elif not issubclass(self.state, AgentState):
            raise ValueError(f"state {self.state.__name__} must subclass AgentState (loopterm.core.agent_loop) "
                             "in a loop whose actor is an agent: the invariants read the turn's changed paths there")
        self.tools = [agent_tool(self.agent)]
        if not any(i.name == "agent-paths" for i in self.invariants):
            self.invariants = [*self.invariants, paths_invariant(self.agent)]
        if not self.model:
            self.model = self.agent.label
        return self

    @model_validator(mode="after")
    def _default_model(self) -> "Loop":
        if not self.model:
            if self.script is None:
                raise ValueError("set `model` (a litellm model string) or give a `script` for the offline model")
            self.model = f"scripted/{self.name}"
        if self.script is not None:
            import loopterm.core.scripted  # noqa: F401 - a loop with a script loads the provider that answers from it
        return self

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def new_state(self) -> LoopState:
        state = self.initial_state() if self.initial_state else self.state()
        state.task = self.goal
        state.schema_version = self.state.VERSION
        return state

    def is_converged(self, state: LoopState, gates: list[GateResult]) -> bool:
        """Gates decide, never the model's claim: by default every gate ran and passed."""
        if self.converged is not None:
            return bool(self.converged(state, gates))
        ran = {g.name for g in gates}
        required = [g for g in self.gates if not (isinstance(g, ModelGate) and g.advisory)]
        return bool(gates) and all(g.name in ran for g in required) and all(g.passed for g in gates)

    def spec_hash(self) -> str:
        """Identifies the immutable task spec: goal, tools, gates, invariants by name."""
        spec: dict[str, Any] = {
            "name": self.name,
            "goal": self.goal,
            "state": _state_schema(self.state),
            "tools": {t.name: t.schema() for t in self.tools},
            "gates": [g.model_dump() for g in self.gates],
            "invariants": [i.name for i in self.invariants],
            "system_prompt": self.system_prompt,
        }
        if self.mcp_servers:  # the declarations, not the tools they list (a server's list may change)
            spec["mcp_servers"] = [s.model_dump(mode="json") for s in self.mcp_servers]
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _state_schema(state: type[LoopState]) -> dict[str, Any]:
    """A state class's JSON schema (read, never changed, by spec_hash): building it took 2.4 ms of a fork's
    4.3 on a 5,000-item state, and a class's fields are fixed once it is defined."""
    return state.model_json_schema()
