"""Forks: a branch that continues from any iteration of a run, referencing (not copying) its history.

`plan_fork` validates everything and creates nothing: the iteration exists, the
`--set` patches make a valid state, the relaxed invariants exist. Only then
does `create_fork` record the branch. A branch's workspace is rebuilt from the
journal (the workspace-confined writes of its prefix, replayed in order), and
the side-effecting calls its ancestors made after the fork point are answered
by each tool's rewind policy instead of being fired again silently.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from loopterm.core.decision import MAX_STATE_DEPTH, json_path, json_problem, short_repr, surely_storable, unreadable_json
from loopterm.core.errors import ConfigError
from loopterm.core.loop import Loop
from loopterm.core.mcp_tools import McpToolError
from loopterm.core.migrations import migrate_state
from loopterm.core import runlog as log
from loopterm.core.fold import fold
from loopterm.core.records import IterationRecord, RunRecord, ToolCallRecord
from loopterm.core.runlog import EventRecord
from loopterm.core.termination import Status
from loopterm.core.tools import ToolContext

PathPart = str | int


class History(Protocol):
    """What forking reads from and writes to; `loopterm.store.Store` implements it."""

    def get_run(self, run_id: str) -> RunRecord: ...

    def create_run(self, run: RunRecord, events: Sequence[tuple[str, log.RunEvent, int | None]] = ()) -> None: ...

    def append_event(self, run_id: str, event: log.RunEvent, iteration: int | None = None) -> Any: ...

    def events(self, run_id: str, after_id: int = 0) -> list[EventRecord]: ...

    def state_at(self, run_id: str, n: int) -> dict[str, Any] | None: ...

    def lineage(self, run_id: str) -> list[RunRecord]: ...

    def get_iteration(self, run_id: str, n: int) -> IterationRecord | None: ...

    def iteration_tool_calls(
        self, run_id: str, *, own_only: bool = False, after: int = 0, upto: int | None = None,
        tools: Collection[str] | None = None,
    ) -> list[tuple[str, int, dict[str, Any]]]: ...

    def prior_tool_calls(
        self, run_ids: list[str], tool: str, args: dict[str, Any], after_iteration: dict[str, int] | None = None
    ) -> list[ToolCallRecord]: ...


def _shown(path: str) -> str:
    """A path as typed, or its repr when it holds something a terminal would act on, cut short."""
    return path if path.isprintable() and len(path) <= 80 else short_repr(path)


def parse_set(expr: str) -> tuple[list[PathPart], Any]:
    """`memory.subgoal="retry"` -> (["memory", "subgoal"], "retry"); list indices are numbers."""
    path, sep, raw = expr.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set expects PATH=JSON (e.g. memory.subgoal='\"retry\"'), got {short_repr(expr)}")
    shown = _shown(path.strip())
    # Only ASCII digits are an index: "²" is a digit to str.isdigit() but not to int().
    parts: list[PathPart] = [int(p) if p.isascii() and p.isdigit() else p for p in path.strip().split(".")]
    if any(p == "" for p in parts):
        raise ConfigError(f"--set {shown}: empty path segment; use dots between field names, e.g. memory.facts")
    if parts[0] in ENGINE_FIELDS:
        raise ConfigError(f"--set {shown}: {ENGINE_FIELDS[parts[0]]}; patch the loop's own fields")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--set {shown}: the value is not JSON ({exc.msg}); quote text as JSON, e.g. {shown}='\"text\"'"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"--set {shown}: the value is not JSON ({unreadable_json(exc)})") from None
    problem = json_problem(value)
    if problem:
        raise ConfigError(f"--set {shown}: the value cannot be stored: {problem}")
    return parts, value


# Fields of the state that are the engine's, not the person's: a branch starts at --at, in the loop's schema.
ENGINE_FIELDS = {
    "iteration": "the iteration is where the branch starts (--at); it cannot be patched",
    "schema_version": "the state's schema version is the loop definition's; it cannot be patched",
}


def apply_set(data: dict[str, Any], path: list[PathPart], value: Any) -> None:
    """Set one path in a JSON-like tree, in place; a path through nothing is an error."""
    node: Any = data
    shown = _shown(".".join(str(p) for p in path))
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, dict) and isinstance(part, str):
            if last:
                node[part] = value
                return
            if part not in node:
                raise ConfigError(f"--set {shown}: the state has no field {short_repr(part, 40)} at that point")
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int):
            if part >= len(node):
                raise ConfigError(f"--set {shown}: index {part} is past the end of a list of {len(node)}")
            if last:
                node[part] = value
                return
            node = node[part]
        else:
            raise ConfigError(f"--set {shown}: cannot index {type(node).__name__} with {short_repr(str(part), 40)}")


class SideEffectCall(BaseModel):
    run_id: str
    n: int
    tool: str
    args: dict[str, Any]
    policy: str


class ForkPlan(BaseModel):
    parent: RunRecord
    at: int
    state: dict[str, Any]
    patches: list[tuple[list[PathPart], Any]]
    relaxed: dict[str, str]
    model: str
    reason: str
    may_repeat: list[SideEffectCall]


class InvariantAtFork(BaseModel):
    name: str
    description: str
    held: bool | None  # at the fork point; None: not checked there


class ForkOptions(BaseModel):
    """What a person chooses from when branching at `at` (the TUI's branch dialog): the loop's invariants
    and whether each held there, the parent's model, the side-effecting calls the branch may reach again."""

    parent: str
    at: int
    model: str
    invariants: list[InvariantAtFork]
    may_repeat: list[SideEffectCall]

    @property
    def failed(self) -> list[str]:
        """The invariants that failed at the fork point: left as they are, the branch would stop on them at once."""
        return [inv.name for inv in self.invariants if inv.held is False]


def fork_options(history: History, loop: Loop, parent: RunRecord, at: int) -> ForkOptions:
    record = history.get_iteration(parent.id, at)
    status = record.invariant_status if record is not None else {}
    return ForkOptions(
        parent=parent.id, at=at, model=parent.model,
        invariants=[InvariantAtFork(name=inv.name, description=inv.description, held=status.get(inv.name))
                    for inv in loop.invariants],
        may_repeat=side_effects_after(history, loop, parent, at),
    )


def plan_fork(
    history: History,
    loop: Loop,
    parent: RunRecord,
    at: int,
    *,
    sets: list[str] | None = None,
    relax: list[str] | None = None,
    model: str | None = None,
    reason: str = "",
) -> ForkPlan:
    if not 1 <= at <= parent.iterations:
        raise ConfigError(
            f"run {parent.id} has iterations 1..{parent.iterations}; --at {at} is outside them"
            if parent.iterations else f"run {parent.id} has no committed iteration to fork from"
        )
    raw = history.state_at(parent.id, at)
    if raw is None:
        raise ConfigError(f"run {parent.id} has no stored state at iteration {at}")
    data = migrate_state(loop, raw)
    data["termination_reason"] = None
    patches = [parse_set(expr) for expr in sets or []]
    for path, value in patches:
        apply_set(data, path, value)
    problem = None if surely_storable(data, MAX_STATE_DEPTH) else json_problem(data, MAX_STATE_DEPTH)
    if problem:
        raise ConfigError(f"the patched state cannot be stored: {problem}; nothing was created")
    try:
        state = loop.state.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = json_path(err["loc"]) or "(state)"
        raise ConfigError(f"the patched state is invalid at {where}: {err['msg']}; nothing was created") from None
    names = {inv.name for inv in loop.invariants}
    for name in relax or []:
        if name not in names:
            raise ConfigError(
                f"loop {loop.name!r} has no invariant {short_repr(name, 60)}; its invariants are: "
                f"{', '.join(sorted(names)) or 'none'}"
            )
    for option, text in (("--reason", reason), ("--model", model or "")):
        problem = json_problem(text)
        if problem:
            raise ConfigError(f"{option} cannot be stored: {problem}")
    return ForkPlan(
        parent=parent,
        at=at,
        state=state.model_dump(mode="json"),
        patches=patches,
        relaxed={name: reason or "relaxed at fork" for name in relax or []},
        model=model or parent.model,
        reason=reason,
        may_repeat=side_effects_after(history, loop, parent, at),
    )


def side_effects_after(history: History, loop: Loop, parent: RunRecord, at: int) -> list[SideEffectCall]:
    """The side-effecting calls the parent's lineage made after `at`: what a branch may reach again."""
    calls: list[SideEffectCall] = []
    if loop.agent is not None:  # an agent's own shell commands, not the turn that ran them (core/agent_fork.py)
        from loopterm.core.agent_fork import shell_calls_after

        return [SideEffectCall(run_id=run_id, n=n, tool="agent shell", args={"command": command}, policy="ask")
                for run_id, n, command in shell_calls_after(history, parent.id, at)]
    effects = {t.name for t in loop.tools if t.side_effects}
    if not effects and not loop.mcp_servers:
        return calls
    for run in history.lineage(parent.id):
        # An MCP server's tools are known only once it runs: a call of a tool the loop file does not
        # declare may be one of them, whose policy the server's listing decides when the branch starts.
        only = None if loop.mcp_servers else effects
        for run_id, n, call in history.iteration_tool_calls(run.id, own_only=True, after=at, tools=only):
            tool = loop.tool(call["tool"])
            if tool is not None and tool.side_effects:
                calls.append(SideEffectCall(run_id=run_id, n=n, tool=call["tool"], args=call.get("args") or {},
                                            policy=tool.rewind_policy))
            elif tool is None and loop.mcp_servers:
                calls.append(SideEffectCall(run_id=run_id, n=n, tool=call["tool"], args=call.get("args") or {},
                                            policy="from its MCP server's annotations"))
    return calls


def create_fork(history: History, loop: Loop, plan: ForkPlan, *, run_id: str, workspace: Path) -> RunRecord:
    """Record the branch and its events; nothing of the parent is copied."""
    parent = plan.parent
    now = time.time()
    run = RunRecord(
        id=run_id, loop=parent.loop, loop_ref=parent.loop_ref, goal=parent.goal, spec_hash=loop.spec_hash(),
        model=plan.model, status=Status.CREATED.value, workspace=str(workspace), created_at=now, updated_at=now,
        parent_run=parent.id, fork_iteration=plan.at, origin="fork",
        max_iterations=max(parent.max_iterations, plan.at + 1), budget=parent.budget, iterations=plan.at,
    )
    events: list[tuple[str, log.RunEvent, int | None]] = [(run_id, log.Forked(
        parent=parent.id, at=plan.at, reason=plan.reason, model=plan.model,
        patches=[{"path": path, "value": value} for path, value in plan.patches], relaxed=plan.relaxed,
        patched_state=plan.state if plan.patches else None,
    ), plan.at)]
    events += [(run_id, log.InvariantRelaxed(invariant=name, reason=why), plan.at) for name, why in plan.relaxed.items()]
    if fold(history.events(parent.id)).shadow:  # a branch of a shadow run is one too: it proposes, nothing runs
        events.append((run_id, log.ShadowMode(why=f"branch of shadow run {parent.id}"), None))
    events.append((parent.id, log.Branched(child=run_id, at=plan.at, reason=plan.reason), plan.at))
    history.create_run(run, events)  # one transaction: a crash leaves the whole branch or none of it
    return run


async def rebuild_workspace(loop: Loop, history: History, run: RunRecord) -> int:
    """Recreate the branch's workspace as it was after the fork point; returns the calls replayed.

    Only tools declared `workspace_only` (their effects live in the run's own
    workspace) are replayed; anything that touched the world outside it is
    never fired again, whatever its rewind policy.
    """
    workspace = Path(run.workspace)
    if loop.agent is not None:  # an agent's turns are not replayed: its files come back from git
        from loopterm.core.agent_fork import restore_branch

        await restore_branch(history, run)
        return 0
    workspace.mkdir(parents=True, exist_ok=True)
    if loop.workspace_files is not None:
        shutil.copytree(loop.workspace_files, workspace, dirs_exist_ok=True)
    if loop.setup is not None:  # prepared as a new run's workspace is (Engine.create), then the calls replayed
        loop.setup(workspace)
    assert run.parent_run is not None and run.fork_iteration is not None
    mcp = await _mcp_tools(loop, history, run, workspace)
    try:
        return await _replay_calls(loop if mcp is None else loop.model_copy(update={"tools": [*loop.tools, *mcp[1]]}),
                                   history, run, workspace)
    finally:
        if mcp is not None:
            await mcp[0].close()


async def _mcp_tools(loop: Loop, history: History, run: RunRecord, workspace: Path) -> tuple[Any, list[Any]] | None:
    """The loop's MCP servers, started in the branch's workspace, when the parent called their tools
    before the fork point (a `workspace_only` one is replayed like the loop's own)."""
    if not loop.mcp_servers:
        return None
    assert run.parent_run is not None
    own = {t.name for t in loop.tools}
    if all(call["tool"] in own for _, _, call in history.iteration_tool_calls(run.parent_run, upto=run.fork_iteration)):
        return None
    from loopterm.core.mcp_tools import McpStartError, McpTools

    mcp = McpTools(loop.mcp_servers, workspace)
    try:
        return mcp, await mcp.start(taken=own)
    except McpStartError as exc:
        await mcp.close()
        raise ConfigError(f"branch {run.id}: its workspace cannot be rebuilt: {exc}") from None


async def _replay_calls(loop: Loop, history: History, run: RunRecord, workspace: Path) -> int:
    assert run.parent_run is not None and run.fork_iteration is not None
    replayed = 0
    replayable = {t.name for t in loop.tools if t.side_effects and t.workspace_only}
    for _, n, call in history.iteration_tool_calls(run.parent_run, upto=run.fork_iteration, tools=replayable):
        tool = loop.tool(call["tool"])
        if tool is None or not tool.side_effects or not tool.workspace_only:
            continue
        if call.get("shadow") or call.get("approval") == "deny" or call.get("refused"):
            continue  # never ran: proposed in a shadow run, denied by a person, refused by its precondition
        args = call.get("args") or {}
        call_args = (ToolContext(run.id, n, workspace, "rebuild"),) if tool.wants_context else ()
        try:
            result = tool.fn(*call_args, **args)
            if hasattr(result, "__await__"):
                await result
        except McpToolError:
            continue  # an MCP server said no (as it may have to the parent): nothing changed in the workspace
        replayed += 1
    return replayed


class AncestorCalls:
    """The calls a branch's ancestors made after its fork point (for the executor's rewind policy)."""

    def __init__(self, history: History, run: RunRecord) -> None:
        assert run.parent_run is not None and run.fork_iteration is not None
        self.history = history
        self.run_ids = [r.id for r in history.lineage(run.parent_run)]
        self.after = {run_id: run.fork_iteration for run_id in self.run_ids}

    def find(self, tool: str, args: dict[str, Any], iteration: int) -> ToolCallRecord | None:
        found = self.history.prior_tool_calls(self.run_ids, tool, args, self.after)
        return found[0] if found else None
