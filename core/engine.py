"""The engine: observe -> decide -> act -> verify -> (iterate | terminate | escalate).

One `Engine` drives one run. Every iteration is committed to the journal before
the next starts; a model reply is journalled (as an intent) before its tool
runs, so a resume after a crash neither pays for the reply again nor re-fires
the tool. Subscribers (headless progress, the TUI) get events; they never own
state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_args, get_origin

from loopterm.core.budget import Spend, over_budget
from pydantic import TypeAdapter, ValidationError

from loopterm.core.decision import Decision, DecisionError, json_path, parse_decision
from loopterm.core.errors import ConfigError, ErrorKind, ModelError
from loopterm.core.control import (
    AddFact,
    Approve,
    Command,
    Deny,
    EditState,
    Pause,
    Relax,
    Restore,
    Resume,
    SetSubgoal,
    Step,
    Stop,
    parse_command,
)
from loopterm.core.events import (
    ApprovalNeeded,
    CommandApplied,
    EngineEvent,
    Escalated,
    IterationCommitted,
    IterationStarted,
    ModelRetry,
    RunFinished,
    RunStarted,
    StatusChanged,
)
from loopterm.core.checkers import Asked, GateContext, ModelGate, preflight_roles
from loopterm.core.gates import GateResult
from loopterm.core.nesting import ChildResult, LoopCycleError, cycle_message
from loopterm.core.observation import iteration_fact
from loopterm.core.roles import Role
from loopterm.core.strategy import Strategy
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loop import Loop
from loopterm.core.append_log import AppendLog
from loopterm.core.persistence import GrownList, Journal
from loopterm.core import prompt as _prompt
from loopterm.core.prompt import read_rules, repair_messages
from loopterm.core.records import EventRecord, Intent, IterationRecord, RunRecord
from loopterm.core.state import LoopState, ToolRecord
from loopterm.core.termination import Status, TerminationReason, status_for
from loopterm.core.migrations import migrate_state
from loopterm.core.secrets import redact, redact_tree
from loopterm.core import shadow as _shadow
from loopterm.core.tools import (
    InterruptedSideEffect,
    PriorCalls,
    SideEffectNeedsDecision,
    Tool,
    ToolExecutor,
    idempotency_key,
)

Subscriber = Callable[[EngineEvent], None]


def build_messages(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The prompt (core/prompt.py), redacted as it is built: a key in the goal, RULES.md or a system
    prompt is neither sent to the model nor journalled, and a replay compares like with like."""
    return redact_tree(_prompt.build_messages(*args, **kwargs))

MAX_FACTS = 12
REFUSED_BEFORE_RUNNING = "refused before it ran"  # a tool record's error when its precondition said no
HEARTBEAT_S = 2.0  # an executing engine touches its run this often, even while paused or waiting
STALE_AFTER_S = 10.0


def alive(run: RunRecord, now: float | None = None) -> bool:
    """Whether some engine is executing this run now: a fresh heartbeat on an unfinished run.

    A run killed with SIGKILL keeps its last status; its heartbeat going stale is what tells.
    """
    if Status(run.status).finished:
        return False
    return (now if now is not None else time.time()) - run.updated_at < STALE_AFTER_S


def _open_start(events: Iterable[EventRecord]) -> EventRecord | None:
    """The run's last start (or resume) when no end was recorded after it."""
    start: EventRecord | None = None
    for event in events:
        if event.kind in ("run_started", "run_resumed"):
            start = event
        elif event.kind == "run_finished":
            start = None
    return start


def lifecycle_open(events: Iterable[EventRecord]) -> bool:
    """Started (or resumed) and not finished since: what a run's own event log says about an engine."""
    return _open_start(events) is not None


def executing_elsewhere(run: RunRecord, events: Iterable[EventRecord], now: float | None = None) -> bool:
    """Whether an engine in another process is executing this run now: a start with no end after it and a
    fresh heartbeat (a run that just exited waiting on a person has a fresh heartbeat but an end). On the
    machine that started it, the process itself tells at once: one killed a moment ago is not executing."""
    start = _open_start(events)
    if start is None or not alive(run, now):
        return False
    pid, host = start.data.get("pid"), start.data.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        if pid == os.getpid():
            return False  # this process: its caller knows its own engines
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process with that pid
        return not _zombie(pid)
    return True


def _zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet still has its pid (Linux: state Z in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("Z", "X")


class _Stop(Exception):
    """Ends the run from deep inside an iteration, with a reason and one human line."""

    def __init__(self, reason: TerminationReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Outcome:
    """What one iteration looked like, for stall detection."""

    action: str
    subgoal: str
    verdict: str | None  # a digest of the gate results; None when no gate ran


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _outcome(record: IterationRecord) -> _Outcome:
    decision = record.decision or {}
    action = decision.get("action") or {}
    verdict = None
    if record.gate_results:
        gates = [(g["name"], g["passed"], g.get("exit_code"), (g.get("stderr") or "")[-500:], (g.get("stdout") or "")[-500:])
                 for g in record.gate_results]
        verdict = hashlib.sha256(json.dumps(gates).encode()).hexdigest()
    return _Outcome(
        action=(action.get("tool") or "(none)") + json.dumps(action.get("args") or {}, sort_keys=True, default=str),
        subgoal=str(decision.get("subgoal", "")),
        verdict=verdict,
    )


def relaxed_from(events: list[EventRecord]) -> tuple[dict[str, str], dict[str, int]]:
    """The invariants a person relaxed (and did not restore), with reasons and any expiry iteration."""
    relaxed: dict[str, str] = {}
    until: dict[str, int] = {}
    for event in events:
        name = str(event.data.get("invariant", ""))
        if event.kind == "invariant_relaxed":
            relaxed[name] = str(event.data.get("reason", ""))
            until.pop(name, None)
            if event.data.get("until") is not None:
                until[name] = int(event.data["until"])
        elif event.kind == "invariant_restored":
            relaxed.pop(name, None)
            until.pop(name, None)
    return relaxed, until


def _grown(before: list[Any], appended: list[Any]) -> GrownList:
    """The next dump of a log field; `before`'s own base is dropped (the journal has taken its
    delta), so no chain of old lists is kept alive."""
    if isinstance(before, GrownList):
        before.base = None
    return GrownList(before, appended)


def _norm(value: str) -> str:
    return " ".join(str(value).lower().split())


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Engine:
    def __init__(
        self,
        loop: Loop,
        journal: Journal,
        run: RunRecord,
        *,
        client: Any = None,
        subscribers: list[Subscriber] | None = None,
        workdir: Path | None = None,
        relaxed: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        prior: PriorCalls | None = None,
        replaying: bool = False,
        side_effect_answers: dict[str, str] | None = None,
        wait_on_person: bool = False,
        poll_interval: float = 0.2,
        call_stack: tuple[str, ...] = (),
        workspace_root: Path | None = None,
        learn: bool = True,
    ) -> None:
        self.loop = loop
        self.journal = journal
        self.run_record = run
        self.run_id = run.id
        self.workspace = Path(run.workspace)
        self.subscribers = list(subscribers or [])
        self.workdir = workdir or Path.cwd()
        history = journal.events(run.id)
        self._started_before = any(e.kind == "run_started" for e in history)
        self.shadow = _shadow.is_shadow(history)  # nothing the model proposes runs; a person judges it (core/shadow.py)
        relaxed_before, self.relax_until = relaxed_from(history)
        self.relaxed = {**relaxed_before, **(relaxed or {})}
        # A person's answers survive a restart: they are in the event log.
        self.approvals: dict[str, Approve | Deny] = {}
        for event in history:
            if event.kind in ("approved", "denied"):
                self.approvals[str(event.data["key"])] = parse_command(
                    "approve" if event.kind == "approved" else "deny", event.data
                )  # type: ignore[assignment]
        self._record_dumps: dict[int, tuple[ToolRecord, dict[str, Any]]] = {}  # see _dump
        self._log_dumps: dict[str, list[Any]] = {}  # see _dump
        self._log_versions: dict[str, AppendLog[Any]] = {}
        self._appendlog_fields = {
            name: TypeAdapter(list[get_args(info.annotation)[0]] if get_args(info.annotation) else list[Any])
            for name, info in loop.state.model_fields.items()
            if info.annotation is AppendLog or get_origin(info.annotation) is AppendLog
        }
        self._log_fields = [
            name for name, info in loop.state.model_fields.items()
            if name != "tool_results" and info.annotation == list[str]
        ]
        self.wait_on_person = wait_on_person
        self.poll_interval = poll_interval
        self.paused = False
        self.stepping = False
        self.awaiting_person = False
        self._wake = asyncio.Event()
        self.clock = clock
        self.max_iterations = run.max_iterations
        self.budget = loop.budget.model_validate(run.budget) if run.budget else loop.budget
        self.temperature = loop.temperature
        self.strategy_note: str | None = None
        self._client = client
        self._stop_requested: str | None = None
        self.learn = learn  # False: leave long-term memory as it was (an eval measures; it does not teach)
        self.call_stack = (*call_stack, run.loop_ref)  # the chain of loops that called this one, and this
        self.workspace_root = workspace_root or self.workspace.parent
        # Long-term memory (core/memory.py), when the journal keeps one (the Store does).
        self.memory: Any = journal if hasattr(journal, "recall") and hasattr(journal, "remember") else None
        self.executor = ToolExecutor(
            journal, run.id, clock=clock, prior=prior, replaying=replaying, answers=dict(side_effect_answers or {}),
            services={"loop": loop.name, "memory": self.memory, "spawn": self._spawn},
        )
        self._clients: dict[tuple[str, str], Any] = {}  # role model clients, see _ask
        self._role_calls: dict[str, int] = {}
        self.strategy: Strategy | None = None
        for event in history:
            if event.kind == "strategy_changed":
                self.strategy = next((x for x in loop.strategies if x.name == event.data.get("to")), self.strategy)
        if self.strategy is not None:
            self._adopt(self.strategy)
        self.spend = Spend(
            tokens_in=run.tokens_in, tokens_out=run.tokens_out, cost_usd=run.cost_usd, elapsed_s=run.elapsed_s
        )
        # Child runs are runs of their own (their spend is in their records and the ledger), but the
        # caller's budget covers them: counted here for budget checks only.
        self.children_spend = Spend()
        children = getattr(journal, "children", None)
        for child in children(run.id) if children is not None else []:
            if child.origin == "child":
                self.children_spend.add(child.tokens_in, child.tokens_out, child.cost_usd)
        recent = journal.last_iterations(run.id, loop.stall_window or 1)  # the last one holds the state
        self.recent: deque[_Outcome] = deque(
            (_outcome(r) for r in recent) if loop.stall_window else (), maxlen=loop.stall_window or 1
        )
        self.confidences: deque[float] = deque(
            (float((r.decision or {}).get("confidence", 0.0)) for r in recent), maxlen=10
        )
        self.state = self._load_state(recent[-1] if recent else None, history)

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        loop: Loop,
        journal: Journal,
        *,
        loop_ref: str,
        model: str | None = None,
        max_iterations: int | None = None,
        budget: dict[str, Any] | None = None,
        workspace_root: Path | None = None,
        workspace: Path | None = None,
        run_id: str | None = None,
        parent_run: str | None = None,
        goal: str | None = None,
        shadow: bool = False,
        origin: str | None = None,
        **kwargs: Any,
    ) -> "Engine":
        """Record a new run (status created) and prepare its workspace.

        `workspace`: a directory someone else prepared (a git worktree for a parallel case); it is
        used as it is, and the loop's workspace_files are not copied into it. `origin`: what started
        the run, recorded with it (default "child" for a called loop, else "run"; "trigger" from the daemon).
        """
        from loopterm.core.nesting import check_calls

        check_calls(loop, loop_ref)  # a cycle of loops calling each other is refused before anything is created
        run_id = run_id or new_run_id()
        if workspace is None:
            root = workspace_root or Path.cwd() / ".loopterm" / "workspaces"
            workspace = (root / run_id).resolve()
            workspace.mkdir(parents=True, exist_ok=True)
            if loop.workspace_files is not None:
                shutil.copytree(loop.workspace_files, workspace, dirs_exist_ok=True)
            if loop.setup is not None:
                loop.setup(workspace)
        else:
            workspace = workspace.resolve()
        merged_budget = {**loop.budget.model_dump(), **(budget or {})}
        now = time.time()
        run = RunRecord(
            id=run_id,
            loop=loop.name,
            loop_ref=loop_ref,
            goal=redact(goal or loop.goal),
            spec_hash=loop.spec_hash(),
            model=model or loop.model,
            status=Status.CREATED.value,
            workspace=str(workspace),
            created_at=now,
            updated_at=now,
            max_iterations=max_iterations or loop.max_iterations,
            budget=merged_budget,
            parent_run=parent_run,
            fork_iteration=0 if parent_run else None,  # a child inherits none of its caller's iterations
            origin=origin or ("child" if parent_run else "run"),
        )
        journal.create_run(run)
        journal.append_event(run_id, "run_created", {"loop_ref": loop_ref, "model": run.model, "budget": merged_budget})
        if shadow:
            _shadow.mark_shadow(journal, run_id)
        return cls(loop, journal, run, workspace_root=workspace_root, **kwargs)

    def _load_state(self, last: IterationRecord | None, history: list[EventRecord]) -> LoopState:
        """The state to continue from: the last committed one (a branch's parent's, at the fork
        point, until it commits its own), migrated to the loop's current schema, with a
        branch's patches applied until its first own iteration."""
        if last is None:
            state = self.loop.new_state()
            state.task = self.run_record.goal or state.task
            state.memory.retrieved = self._recorded_recall() if self.executor.replaying else self._recall(state.task)
        else:
            state = self.loop.state.model_validate(migrate_state(self.loop, last.state))
        for event in history:  # a fork's patch, a person's edit, fact or subgoal since that commit
            if event.data.get("patched_state") is not None and event.iteration == state.iteration:
                state = self.loop.state.model_validate(migrate_state(self.loop, event.data["patched_state"]))
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            from loopterm.core.model import ModelClient  # lazy: litellm loads only when a run starts

            self._client = ModelClient(
                self.run_record.model,
                temperature=self.temperature,
                max_tokens=self.loop.max_output_tokens,
                on_retry=self._on_retry,
            )
        return self._client

    # ------------------------------------------------------------------ control

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def request_stop(self, reason: str = "stopped by a person") -> None:
        """Stop at the next iteration boundary (the iteration in flight completes)."""
        self._stop_requested = reason
        self.wake()

    def wake(self) -> None:
        """Look at the control channel now (an in-process sender just wrote to it)."""
        self._wake.set()

    def _emit(self, event: EngineEvent) -> None:
        for sub in self.subscribers:
            sub(event)

    def _on_retry(self, attempt: int, error: ModelError, delay: float) -> None:
        n = self.state.iteration + 1
        message = redact(str(error))
        self.journal.append_event(
            self.run_id, "model_retry", {"attempt": attempt, "error": message, "delay_s": round(delay, 3)}, n
        )
        self._emit(ModelRetry(run_id=self.run_id, n=n, attempt=attempt, error=message, delay_s=delay))

    # ------------------------------------------------------------------ the loop

    async def run(self) -> RunRecord:
        """Iterate until a termination reason; returns the final run record."""
        resumed_from = self.state.iteration
        self.journal.update_run(self.run_id, status=Status.RUNNING.value, updated_at=self.clock(), message=None)
        self.journal.append_event(
            self.run_id, "run_resumed" if self._started_before else "run_started",
            {"from_iteration": resumed_from, "pid": os.getpid(), "host": socket.gethostname()},  # see executing_elsewhere
        )
        self._started_before = True
        self._emit(
            RunStarted(
                run_id=self.run_id, loop=self.loop.name, model=self.run_record.model,
                max_iterations=self.max_iterations, resumed_from=resumed_from,
            )
        )
        self._session_start = time.monotonic()
        self._elapsed_base = self.spend.elapsed_s
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            if self._converged_unrecorded():
                # Its last iteration converged and was committed, but the process died before the run's
                # end was recorded: record it now (iterating on would call the model and fire tools again).
                why = "every gate passed" if self.loop.converged is None else "its convergence check held"
                raise _Stop(TerminationReason.CONVERGED, f"converged at iteration {self.state.iteration}: {why}")
            await self._connect_mcp()
            while True:
                self._tick()
                await self._boundary()
                self._check_mcp()
                await self._iteration(self.state.iteration + 1)
        except _Stop as stop:
            return self._finish(stop.reason, stop.message)
        except ModelError as exc:
            return self._finish(TerminationReason.FATAL_ERROR, str(exc))
        except InterruptedSideEffect as exc:
            self._pending_side_effect(exc.key, "interrupted", exc.record.tool, exc.record.args, exc.record.run_id,
                                      exc.record.iteration)
            return self._finish(
                TerminationReason.WAITING,
                f"{exc}; if it took effect, `loopterm resume {self.run_id} --side-effects reuse` goes on without "
                "running it again; if not, `--side-effects reexecute` runs it",
            )
        except SideEffectNeedsDecision as exc:
            self._pending_side_effect(exc.key, "already_made", exc.tool, exc.call_args, exc.earlier.run_id,
                                      exc.earlier.iteration)
            return self._finish(
                TerminationReason.WAITING,
                f"{exc} (`loopterm resume {self.run_id} --side-effects reuse|reexecute`)",
            )
        except asyncio.CancelledError:
            self._finish(TerminationReason.STOPPED, "interrupted; `loopterm resume` continues it")
            raise
        finally:
            heartbeat.cancel()
            await self._close_mcp()
            self.journal.flush()  # anything still queued (an exception nobody expected) goes to disk

    def _converged_unrecorded(self) -> bool:
        """Whether this run's own last committed iteration converged (a branch starts from its
        parent's state, which may say so: that iteration is not the branch's)."""
        if self.state.termination_reason != TerminationReason.CONVERGED.value:
            return False
        last = self.journal.last_iterations(self.run_id, 1)
        return bool(last) and last[-1].run_id == self.run_id and last[-1].n == self.state.iteration

    # ------------------------------------------------------------------ MCP servers (core/mcp_tools.py)

    _mcp: Any = None  # the run's McpTools while it runs

    async def _connect_mcp(self) -> None:
        """Start the loop's MCP servers; their tools join the loop's for this run. One that cannot
        start ends the run before its first iteration (a resume tries again)."""
        if not self.loop.mcp_servers:
            return
        from loopterm.core.mcp_tools import McpStartError, McpTools

        self._mcp = McpTools(self.loop.mcp_servers, self.workspace)
        try:
            tools = await self._mcp.start(taken={t.name for t in self.loop.tools})
        except McpStartError as exc:
            raise _Stop(TerminationReason.FATAL_ERROR, str(exc)) from None
        if self.executor.replaying:  # a replay never fires a side effect the recording does not have
            from loopterm.core.replay import guarded

            tools = guarded(self.loop.model_copy(update={"tools": tools})).tools
        self.loop = self.loop.model_copy(update={"tools": [*self.loop.tools, *tools]})
        self.journal.append_event(self.run_id, "mcp_connected", {
            "servers": [s.name for s in self.loop.mcp_servers], "tools": [t.name for t in tools]})

    def _check_mcp(self) -> None:
        """End the run (failed, resumable) when an MCP server died: before the model is asked again."""
        failure = self._mcp.check() if self._mcp is not None else None
        if failure:
            n = self.state.iteration + 1
            raise _Stop(TerminationReason.FATAL_ERROR,
                        f"{failure}; `loopterm resume {self.run_id}` reconnects and continues from iteration {n}")

    async def _close_mcp(self) -> None:
        if self._mcp is not None:
            mcp, self._mcp = self._mcp, None
            await mcp.close()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.journal.update_run(self.run_id, updated_at=self.clock())

    def _tick(self) -> None:
        self.spend.elapsed_s = self._elapsed_base + (time.monotonic() - self._session_start)

    async def _boundary(self) -> None:
        """Everything between iterations: a person's commands, a pause, then every reason to end."""
        self._obey()
        while (self.paused or self.awaiting_person) and not self._stop_requested:
            await self._wait()
        for name, until in list(self.relax_until.items()):
            if self.state.iteration >= until:
                self._apply(Restore(invariant=name, reason=f"relaxation expired at iteration {until}"))
        if self._stop_requested:
            raise _Stop(TerminationReason.STOPPED, self._stop_requested)
        if self.state.iteration >= self.max_iterations:
            raise _Stop(TerminationReason.MAX_ITERATIONS, f"reached the maximum of {self.max_iterations} iterations")
        reason = over_budget(self.budget, self._spent())
        if reason:
            raise _Stop(TerminationReason(reason), self._budget_message(reason))
        stalled = self._stalled()
        if stalled and self._change_strategy(stalled, self.state.iteration):
            self.recent.clear()  # the new strategy gets a fresh stall window
            stalled = None
        if stalled:
            raise _Stop(TerminationReason.STALLED, stalled)

    async def _wait(self) -> None:
        """Sleep until woken or the poll interval passes, then read the control channel."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        except asyncio.TimeoutError:
            pass
        self._obey()

    def _obey(self) -> None:
        for row in self.journal.pending_commands(self.run_id):
            self.journal.consume_command(row.id or 0)
            try:
                command = parse_command(row.kind, redact_tree(row.payload))  # a person's input is redacted too
            except ValidationError as exc:
                err = exc.errors()[0]
                self._applied(row.kind, False, f"{json_path(err['loc']) or row.kind}: {err['msg']}")
                continue
            self._apply(command)

    def _applied(self, kind: str, ok: bool, detail: str) -> None:
        if not ok:
            self.journal.append_event(self.run_id, "command_rejected", {"command": kind, "error": detail},
                                      self.state.iteration)
        self._emit(CommandApplied(run_id=self.run_id, command=kind, ok=ok, detail=detail))

    def _set_status(self, status: Status, message: str = "") -> None:
        self.journal.update_run(self.run_id, status=status.value, message=message or None, updated_at=self.clock())
        self.journal.append_event(self.run_id, "status_changed", {"status": status.value, "message": message},
                                  self.state.iteration)
        self._emit(StatusChanged(run_id=self.run_id, status=status.value, message=message))

    def _patched(self, kind: str, state: LoopState, data: dict[str, Any]) -> None:
        """Adopt a person's change to the state; the event holds the result so a restart keeps it."""
        self.state = state
        self.journal.append_event(self.run_id, kind, {**data, "patched_state": state.model_dump(mode="json")},
                                  state.iteration)

    def _apply(self, command: Command) -> None:
        """One command from a person; refusals change nothing and say why."""
        if isinstance(command, Pause):
            self.paused, self.stepping = True, False
            self._set_status(Status.PAUSED, "paused by a person")
        elif isinstance(command, Resume):
            self.paused = self.stepping = self.awaiting_person = False
            self._set_status(Status.RUNNING)
        elif isinstance(command, Step):
            self.paused, self.stepping, self.awaiting_person = False, True, False
            self._set_status(Status.STEPPING, "one iteration, then pause")
        elif isinstance(command, Stop):
            self._stop_requested = command.reason
            self.awaiting_person = False
        elif isinstance(command, EditState):
            try:
                # The iteration and the schema version are the engine's: an edit cannot move them (a state
                # claiming another schema version could never be loaded again).
                edited = self.loop.state.model_validate({**command.state, "iteration": self.state.iteration,
                                                         "schema_version": self.state.schema_version})
            except ValidationError as exc:
                err = exc.errors()[0]
                self._applied(command.kind, False, f"{json_path(err['loc']) or 'state'}: {err['msg']}")
                return
            self._patched("state_edited", edited, {"reason": command.reason})
        elif isinstance(command, Relax):
            if self.loop.invariants and command.invariant not in {i.name for i in self.loop.invariants}:
                self._applied(command.kind, False, f"no invariant {command.invariant!r}")
                return
            self.relaxed[command.invariant] = command.reason
            until = self.state.iteration + command.iterations if command.iterations else None
            if until is not None:
                self.relax_until[command.invariant] = until
            self.journal.append_event(self.run_id, "invariant_relaxed",
                                      {"invariant": command.invariant, "reason": command.reason, "until": until},
                                      self.state.iteration)
        elif isinstance(command, Restore):
            self.relaxed.pop(command.invariant, None)
            self.relax_until.pop(command.invariant, None)
            self.journal.append_event(self.run_id, "invariant_restored",
                                      {"invariant": command.invariant, "reason": command.reason}, self.state.iteration)
        elif isinstance(command, AddFact):
            memory = self.state.memory.model_copy(update={"facts": [*self.state.memory.facts, command.fact]})
            self._patched("fact_added", self.state.model_copy(update={"memory": memory}), {"fact": command.fact})
        elif isinstance(command, SetSubgoal):
            memory = self.state.memory.model_copy(update={"subgoal": command.subgoal})
            self._patched("subgoal_set", self.state.model_copy(update={"memory": memory}), {"subgoal": command.subgoal})
        elif isinstance(command, (Approve, Deny)):
            self.approvals[command.key] = command
            kind = "approved" if isinstance(command, Approve) else "denied"
            self.journal.append_event(self.run_id, kind, command.model_dump(mode="json", exclude={"kind"}),
                                      self.state.iteration + 1)
        self._applied(command.kind, True, "")

    def _stalled(self) -> str | None:
        k = self.loop.stall_window
        if k is None or len(self.recent) < k:
            return None
        last = list(self.recent)
        if len({o.action for o in last}) == 1:
            return f"stalled: the same action was chosen {k} times in a row"
        if len({o.subgoal for o in last}) == 1 and last[0].subgoal:
            return f"stalled: the same subgoal was pursued {k} times in a row"
        if last[0].verdict is not None and len({o.verdict for o in last}) == 1:
            return f"stalled: no progress (identical verification results) in {k} iterations"
        return None

    # ------------------------------------------------------------------ topology services

    def _spent(self, spend: Spend | None = None) -> Spend:
        """This run's spend plus its child runs': what the run's budget is checked against."""
        own = spend or self.spend
        total = Spend(tokens_in=own.tokens_in, tokens_out=own.tokens_out, cost_usd=own.cost_usd,
                      elapsed_s=own.elapsed_s)
        c = self.children_spend
        total.add(c.tokens_in, c.tokens_out, c.cost_usd)
        return total

    async def _verify(self, n: int, decision: Decision, tool_record: ToolRecord | None) -> list[GateResult]:
        """Run the gates in order until one fails; a final checker runs only when all the others passed."""
        gates: list[GateResult] = []
        if not self.loop.gates:
            return gates
        self.journal.flush()  # gates take seconds: the reply and the tool's result must not wait on them
        self._role_calls.clear()
        ctx = GateContext(workspace=self.workspace, iteration=n, task=self.state.task or self.loop.goal,
                          state=self.state, decision=decision, tool_record=tool_record, earlier=gates, ask=self._ask)
        for gate in self.loop.gates:
            if isinstance(gate, ModelGate) and gate.when == "final" and not all(g.passed for g in gates):
                continue
            result = (await gate.check(ctx)).redacted()  # a custom gate's or a checker's text too
            gates.append(result)
            if not result.passed:
                break
        return gates

    async def _ask(self, role: Role, messages: list[dict[str, Any]]) -> Asked:
        """One call of a role's model: budget-checked first, like the maker's; spend goes on the gate."""
        model = role.model_for(self.run_record.model)
        client = self._clients.get((model, role.name))
        if client is None:
            from loopterm.core.model import ModelClient, check_model

            try:
                check_model(model)  # a scripted role's script was registered with the loop's
            except ConfigError as exc:  # ends the run with the reason (preflight_roles catches it earlier)
                raise ModelError(f"role {role.name!r}: {exc}", ErrorKind.FATAL) from None
            client = self._clients[(model, role.name)] = ModelClient(
                model, temperature=role.temperature if role.temperature is not None else self.loop.temperature,
                max_tokens=self.loop.max_output_tokens, on_retry=self._on_retry,
            )
        projected = client.estimate(messages, self.loop.max_output_tokens)
        reason = over_budget(self.budget, self._spent(), projected[0], projected[1])
        if reason:
            raise _Stop(TerminationReason(reason), self._budget_message(reason, projected))
        n = self.state.iteration + 1
        call = self._role_calls.get(role.name, 0)
        reply = await client.complete(messages, iteration=n, call_index=call)
        self._role_calls[role.name] = call + max(1, reply.calls)
        return Asked(text=redact(reply.text), tokens_in=reply.tokens_in, tokens_out=reply.tokens_out,
                     cost_usd=reply.cost_usd, model=reply.model)

    def _adopt(self, strategy: Strategy) -> None:
        self.strategy_note = strategy.note
        if strategy.temperature is not None:
            self.temperature = strategy.temperature
        if strategy.model is not None and strategy.model != self.run_record.model:
            self.run_record = self.run_record.model_copy(update={"model": strategy.model})
            self._client = None  # the next call builds a client for the strategy's model

    def _change_strategy(self, why: str, n: int) -> bool:
        """Move to the loop's next declared strategy; False when it declares none left."""
        names = [x.name for x in self.loop.strategies]
        at = names.index(self.strategy.name) + 1 if self.strategy is not None else 0
        if at >= len(names):
            return False
        before, self.strategy = self.strategy, self.loop.strategies[at]
        if self.strategy.model is not None:
            from loopterm.core.model import check_model

            try:
                check_model(self.strategy.model)
            except ConfigError as exc:
                raise ModelError(f"strategy {self.strategy.name!r}: {exc}", ErrorKind.FATAL) from None
        self._adopt(self.strategy)
        data = {"from": before.name if before else None, "to": self.strategy.name, "why": why,
                "temperature": self.temperature, "model": self.run_record.model}
        self.journal.append_event(self.run_id, "strategy_changed", data, n)
        if self.strategy.model is not None:
            self.journal.update_run(self.run_id, model=self.run_record.model)
        memory = self.state.memory.model_copy(update={
            "facts": [*self.state.memory.facts, f"strategy changed to {self.strategy.name} ({_one_line(why, 120)})"]})
        self.state = self.state.model_copy(update={"memory": memory})
        return True

    def _recorded_recall(self) -> list[str]:
        """A replay starts from what the recorded run recalled, not from memory as it is now."""
        recorded = self.run_record.parent_run
        first = self.journal.get_iteration(recorded, 1) if recorded else None
        return list(((first.state if first else {}).get("memory") or {}).get("retrieved") or [])

    def _recall(self, query: str) -> list[str]:
        """Long-term memory relevant to the task, for a new run's working memory."""
        if self.memory is None or self.loop.recall == 0:
            return []
        embed = None
        if self.loop.embedding_model:
            from loopterm.core.embedding import litellm_embedder

            embed = litellm_embedder(self.loop.embedding_model)
        try:
            items = self.memory.recall(self.loop.name, query, limit=self.loop.recall, embed=embed)
        except RuntimeError as exc:  # the embedding model failed: full-text recall still works
            self.journal.append_event(self.run_id, "recall_degraded", {"error": str(exc)})
            items = self.memory.recall(self.loop.name, query, limit=self.loop.recall)
        return [f"{i.key}: {_one_line(i.value, 2_000)}" for i in items]

    def _flag_contradictions(self, state: LoopState) -> LoopState:
        """A fact observed this run whose key long-term memory holds with another value is a contradiction."""
        known = state.memory.known
        if not known or self.memory is None:
            return state
        remembered = {i.key: i.value for i in self.memory.memories(self.loop.name)}
        found = list(state.memory.contradictions)
        for key, value in known.items():
            if key in remembered and _norm(remembered[key]) != _norm(value):
                line = f"{key}: observed {value!r}, long-term memory says {remembered[key]!r}"
                if line not in found:
                    found.append(line)
        if found != state.memory.contradictions:
            state.memory.contradictions = found
        return state

    def _consolidate(self, status: Status) -> None:
        """What a finished run leaves for later runs of the same loop (long-term memory)."""
        if self.memory is None or self.executor.replaying or not self.learn or self.shadow:
            return  # a replay re-drives an old experience, a shadow run did nothing: neither teaches anything new
        if status not in (Status.CONVERGED, Status.TERMINATED, Status.ESCALATED):
            return
        try:
            if self.loop.consolidate is not None:
                notes = self.loop.consolidate(self.state, status.value)
            elif status is Status.CONVERGED:
                flagged = {c.split(":", 1)[0] for c in self.state.memory.contradictions}
                notes = [(k, v, "fact") for k, v in self.state.memory.known.items() if k not in flagged]
                notes.append((f"outcome:{self.loop.name}:{hashlib.sha256(self.state.task.encode()).hexdigest()[:8]}",
                              f"converged in {self.state.iteration} iterations; last subgoal: "
                              f"{_one_line(self.state.memory.subgoal, 200)}", "decision"))
            else:
                notes = []
            for key, value, kind in notes:
                self.memory.remember(self.loop.name, key, value, kind=kind, source_run=self.run_id)
        except Exception as exc:  # noqa: BLE001 - a failing consolidation must not lose the run's end
            self.journal.append_event(self.run_id, "consolidation_failed", {"error": _one_line(redact(str(exc)))})
            return
        if notes:
            self.journal.append_event(self.run_id, "memory_consolidated", {"keys": [k for k, _, _ in notes]})

    async def _spawn(self, loop_ref: str, goal: str, key: str, item: str, share: float = 1.0) -> ChildResult:
        """Start (or resume, or read) the child run for `key`; returns what it hands back.

        A new child's budget is `share` of what this run may still spend (siblings started
        together split it), so children running in parallel cannot overspend their caller.
        """
        from loopterm.core.loader import load_loop
        from loopterm.core.model import check_model
        from loopterm.core.nesting import ref_base, ref_label, resolve_ref

        loop, ref = load_loop(resolve_ref(loop_ref, ref_base(self.run_record.loop_ref)))
        if ref in self.call_stack:
            chain = [*self.call_stack[self.call_stack.index(ref):], ref]
            raise LoopCycleError(cycle_message([ref_label(r) for r in chain]))
        scripted = self.run_record.model.startswith("scripted/")
        model = loop.model if scripted else self.run_record.model
        check_model(model, loop.script if model.startswith("scripted/") else None)
        preflight_roles(loop.gates, model)
        started = next((e for e in self.journal.events(self.run_id) if e.kind == "child_run" and e.data.get("key") == key),
                       None)
        remaining = {}
        spent = self._spent()
        share = min(1.0, max(0.0, share))
        if self.budget.usd is not None:
            remaining["usd"] = max(0.0, self.budget.usd - spent.cost_usd) * share
        if self.budget.tokens is not None:
            remaining["tokens"] = int(max(0, self.budget.tokens - spent.tokens) * share)
        if started is None:
            engine = Engine.create(
                loop, self.journal, loop_ref=ref, model=model, budget=remaining, workspace=self.workspace,
                parent_run=self.run_id, goal=goal, call_stack=self.call_stack, clock=self.clock,
            )
            self.journal.append_event(self.run_id, "child_run", {"key": key, "run_id": engine.run_id, "loop": loop.name,
                                                                 "item": item}, self.state.iteration + 1)
        else:
            record = self.journal.get_run(str(started.data["run_id"]))
            engine = None if Status(record.status).finished else Engine(
                loop, self.journal, record, call_stack=self.call_stack, clock=self.clock)
        before = Spend()
        if engine is not None:
            before = Spend(tokens_in=engine.spend.tokens_in, tokens_out=engine.spend.tokens_out,
                           cost_usd=engine.spend.cost_usd)
            final = await engine.run()
        else:
            final = self.journal.get_run(str(started.data["run_id"]))  # type: ignore[union-attr]
        self.children_spend.add(final.tokens_in - before.tokens_in, final.tokens_out - before.tokens_out,
                                final.cost_usd - before.cost_usd)
        last = self.journal.last_iterations(final.id, 1)
        result: Any = None
        if last:
            child_state = loop.state.model_validate(migrate_state(loop, last[-1].state))
            result = loop.result(child_state) if loop.result is not None else child_state.memory.subgoal
        return ChildResult(item=item, run_id=final.id, loop=loop.name, status=final.status,
                           reason=final.termination_reason, iterations=final.iterations,
                           tokens=final.tokens_in + final.tokens_out, cost_usd=final.cost_usd, result=result)

    def _budget_message(self, reason: str, projected: tuple[int, float] | None = None) -> str:
        b, s = self.budget, self._spent()
        extra = f" (next call projected at {projected[0]} tokens, ${projected[1]:.6f})" if projected else ""
        if reason == "budget_tokens":
            return f"token budget reached: {s.tokens} of {b.tokens} used{extra}"
        if reason == "budget_usd":
            return f"cost budget reached: ${s.cost_usd:.6f} of ${b.usd} used{extra}"
        return f"wall-time budget reached: {s.elapsed_s:.1f}s of {b.wall_seconds}s"

    async def _iteration(self, n: int) -> None:
        self._emit(IterationStarted(run_id=self.run_id, n=n))
        started = self.clock()
        intent = self.journal.load_intent(self.run_id, n)
        if intent is None:
            intent = await self._decide(n, started)
            # Queued, not committed: it joins the tool call's start (so it is on disk before the
            # tool fires), an approval's event, or, with no tool, is dropped by the iteration's commit.
            self.journal.save_intent(intent, durable=False)
        else:
            self.journal.append_event(self.run_id, "intent_reused", {"n": n}, n)
        decision = Decision.model_validate(intent.decision)

        tool_record: ToolRecord | None = None
        tool_call: dict[str, Any] | None = None
        if decision.action is not None:
            tool = self.loop.tool(decision.action.tool)
            if tool is None:  # a decision recorded before a restart names a tool the loop (or its MCP server) no longer has
                instead = (f", or branch from iteration {n - 1} with `loopterm fork {self.run_id} --at {n - 1}`"
                           if n > 1 else ", or start a new run")
                raise _Stop(TerminationReason.FATAL_ERROR, (
                    f"iteration {n}'s recorded decision calls tool {_one_line(decision.action.tool, 100)!r}, which the "
                    "loop no longer has (its file or an MCP server changed); restore it and `loopterm resume "
                    f"{self.run_id}`{instead}"))
            args = decision.action.args
            refused = self._precondition(tool, args)
            ask = (tool.needs_approval or self.shadow) and refused is None
            verdict = await self._approval(tool, args, n) if ask else None
            if self.shadow and verdict is not None:  # nothing runs: the person's verdict is the record
                key = idempotency_key(self.run_id, n, tool.name, args)
                judged = _shadow.judge(key, tool, args, self.approvals[key], self.loop.tool)
                self.journal.append_event(self.run_id, _shadow.VERDICT_EVENT, judged.model_dump(mode="json"), n)
                tool_record = _shadow.tool_record(n, judged)
            elif refused is not None:
                key = idempotency_key(self.run_id, n, tool.name, args)
                tool_record = ToolRecord(iteration=n, tool=tool.name, args=args, ok=False,
                                         error=f"{REFUSED_BEFORE_RUNNING}: {refused}")
            elif isinstance(verdict, Deny):
                key = idempotency_key(self.run_id, n, tool.name, args)
                tool_record = ToolRecord(iteration=n, tool=tool.name, args=args, ok=False,
                                         error=f"denied by a person: {verdict.reason}")
            else:
                if isinstance(verdict, Approve) and verdict.args is not None:
                    args = tool.validate_args(verdict.args)
                tool_record, key = await self.executor.execute(tool, args, n, self.workspace)
            tool_call = {"tool": tool.name, "args": args, "key": key}
            if refused is not None:
                tool_call["refused"] = refused
            if verdict is not None:
                tool_call["approval"] = verdict.kind
                if self.shadow:
                    tool_call["shadow"] = judged.verdict

        gates = [] if self.shadow else await self._verify(n, decision, tool_record)  # nothing changed to verify

        state = self._next_state(n, decision, tool_record, gates)
        if self.loop.observe is not None:
            state = self.loop.observe(state, decision, tool_record, gates)
        state = self._flag_contradictions(state)
        status, violated = self._check_invariants(state)
        state.invariant_status = status
        state, remediations, stop = self._remediate(state, violated)
        converged = not self.shadow and self.loop.is_converged(state, gates) and not violated
        if stop is None and converged:
            why = "every gate passed" if self.loop.converged is None else "its convergence check held"
            stop = _Stop(TerminationReason.CONVERGED, f"converged at iteration {n}: {why}")
        if stop is not None:
            state.termination_reason = stop.reason.value

        tokens_in = intent.tokens_in + sum(g.tokens_in for g in gates)
        tokens_out = intent.tokens_out + sum(g.tokens_out for g in gates)
        cost = intent.cost_usd + sum(g.cost_usd for g in gates)
        self.spend.add(tokens_in, tokens_out, cost)
        self._tick()
        record = IterationRecord(
            run_id=self.run_id, n=n, started_at=intent.started_at, ended_at=self.clock(),
            prompt=intent.prompt, raw_response=intent.raw_response, decision=intent.decision,
            repairs=intent.repairs, tool_call=tool_call,
            tool_result=tool_record.model_dump() if tool_record else None,
            gate_results=[g.model_dump() for g in gates], invariant_status=status,
            remediations=[r.value for r in remediations], tokens_in=tokens_in,
            tokens_out=tokens_out, cost_usd=cost, latency_ms=intent.latency_ms,
            model=intent.model, state=self._dump(state),
        )
        totals = {
            "iterations": n, "tokens_in": self.spend.tokens_in, "tokens_out": self.spend.tokens_out,
            "cost_usd": self.spend.cost_usd, "elapsed_s": self.spend.elapsed_s, "updated_at": self.clock(),
        }
        # Handed over: neither this dump nor anything in it is changed again (see _dump).
        self.journal.commit_iteration(record, totals, handover=True)
        self.state = state
        self.recent.append(_outcome(record))
        self.confidences.append(decision.confidence)
        self._emit(IterationCommitted(record=record))
        if stop is not None and stop.reason is TerminationReason.WAITING:
            self._escalate(n, state, violated, stop.message)
            if self.wait_on_person:  # wait here for a person's answer (resume or stop), from this screen or `watch`
                self.awaiting_person = True
                self._set_status(Status.ESCALATED, stop.message)
                return
        if stop is not None:
            raise stop
        if self.stepping:
            self.stepping, self.paused = False, True
            self._set_status(Status.PAUSED, f"paused after stepping iteration {n}")

    def _dump(self, state: LoopState) -> dict[str, Any]:
        """The state as JSON, in time proportional to the change, not to the run.

        Tool records are never edited once made, so each one's dump is cached
        (by identity) and reused while the record is in the state's window.
        The dump is handed over to the journal (commit_iteration(handover=True)):
        nothing in it is changed afterwards, so each dump gets its own outer list.
        """
        logs, appendlogs = self._log_fields, self._appendlog_fields
        dump = state.model_dump(mode="json", exclude={"tool_results", *logs, *appendlogs})
        for name, items in appendlogs.items():  # AppendLog fields: an append is known by construction
            log: AppendLog[Any] = getattr(state, name)
            before, version = self._log_dumps.get(name), self._log_versions.get(name)
            if before is not None and version is not None and log.extends(version) and len(before) == len(version):
                dump[name] = _grown(before, items.dump_python(log[len(version):], mode="json"))
            else:
                dump[name] = items.dump_python(list(log), mode="json")
            self._log_dumps[name], self._log_versions[name] = dump[name], log
        for name in logs:  # list[str] fields: an append is found with one comparison, not re-dumped
            value: list[str] = getattr(state, name)
            before = self._log_dumps.get(name)
            k = len(before) if before is not None else -1
            if before is not None and len(value) >= k and value[:k] == before:
                dump[name] = _grown(before, value[k:])
            else:
                dump[name] = list(value)
            self._log_dumps[name] = dump[name]
        cached = self._record_dumps
        dumps: dict[int, tuple[ToolRecord, dict[str, Any]]] = {}
        for record in state.tool_results:
            hit = cached.get(id(record))
            dumps[id(record)] = hit if hit is not None and hit[0] is record else (record, record.model_dump(mode="json"))
        self._record_dumps = dumps  # holds the records, so their ids stay theirs
        dump["tool_results"] = [dumps[id(record)][1] for record in state.tool_results]
        return dump

    def _precondition(self, tool: Tool, args: dict[str, Any]) -> str | None:
        """The tool's own check of a call before it runs; a check that raises refuses the call."""
        if tool.precondition is None:
            return None
        try:
            reason = tool.precondition(self.state, args)
        except Exception as exc:  # noqa: BLE001 - a broken check must not let the call through
            return f"its precondition failed ({exc.__class__.__name__}: {_one_line(str(exc), 200)})"
        return None if reason is None else _one_line(str(reason), 1_000)

    async def _approval(self, tool: Tool, args: dict[str, Any], n: int) -> Approve | Deny:
        """A person's verdict on a call that needs approval; waits for it (or ends the run, waiting)."""
        key = idempotency_key(self.run_id, n, tool.name, args)
        if key not in self.approvals:
            pending = {"key": key, "tool": tool.name, "args": args, **({"shadow": True} if self.shadow else {})}
            self.journal.append_event(self.run_id, "approval_pending", pending, n)
            self._emit(ApprovalNeeded(run_id=self.run_id, n=n, key=key, tool=tool.name, args=args, shadow=self.shadow))
            message = (f"shadow: the loop proposes tool {tool.name!r} (iteration {n}); nothing will run"
                       if self.shadow else f"tool {tool.name!r} needs approval (iteration {n})")
            if not self.wait_on_person:
                what = "agree, edit or deny" if self.shadow else "approve or deny"
                raise _Stop(TerminationReason.WAITING, f"{message}; {what} it from `loopterm watch {self.run_id}`")
            self._set_status(Status.ESCALATED, message)
            while key not in self.approvals and not self._stop_requested:
                await self._wait()
            if self._stop_requested:
                raise _Stop(TerminationReason.STOPPED, self._stop_requested)
            self._set_status(Status.RUNNING)
        verdict = self.approvals[key]
        if isinstance(verdict, Approve) and verdict.tool not in (None, tool.name) and not self.shadow:
            self._applied("approve", False, "only a shadow run records another tool; the call was denied")
            return Deny(key=key, reason=f"a person named another tool ({_one_line(verdict.tool or '', 100)}) instead")
        if isinstance(verdict, Approve) and verdict.args is not None and not self.shadow:  # shadow: judged as given
            try:
                tool.validate_args(verdict.args)
            except ValueError as exc:  # edited arguments that do not fit: refuse the edit, keep the model's
                self._applied("approve", False, str(exc))
                return Approve(key=key, reason=verdict.reason)
        return verdict

    async def _decide(self, n: int, started: float) -> Intent:
        """Ask the model, with a bounded repair for invalid replies; budget-checked before every call.

        A prompt the model's context window refuses is pruned harder (half the token budget, then
        a quarter) and asked again, at most twice, each time in the event log. A call that still
        fails ends the run with one line; a provider that is down (retries exhausted, circuit open)
        leaves it resumable from this iteration, and what this iteration already paid for counts.
        """
        from loopterm.core.prompt import prompt_tokens

        rules = read_rules(self.workdir)

        def prompt(budget: int | None = None) -> list[dict[str, Any]]:
            return build_messages(
                self.loop, self.state, rules=rules, relaxed=self.relaxed,
                strategy_note=self.strategy_note, max_iterations=self.max_iterations,
                system_prompt=self.strategy.system_prompt if self.strategy is not None else None,
                token_budget=budget,
            )

        base = prompt()
        tail: list[dict[str, Any]] = []  # a repair's turns, after the prompt
        budget, pruned, max_pruned = self.loop.prompt_token_budget, 0, 2
        tool_names = {t.name for t in self.loop.tools}
        call_index, repairs = 0, 0
        tokens_in = tokens_out = 0
        cost = latency = 0.0
        while True:
            messages = [*base, *tail]
            projected = self.client.estimate(messages, self.loop.max_output_tokens)
            pending = Spend(
                tokens_in=self.spend.tokens_in + tokens_in, tokens_out=self.spend.tokens_out + tokens_out,
                cost_usd=self.spend.cost_usd + cost, elapsed_s=self.spend.elapsed_s,
            )
            with_children = self._spent(pending)
            reason = over_budget(self.budget, with_children, projected[0], projected[1])
            if reason:
                self.spend = pending  # a repair that was paid for still counts
                raise _Stop(TerminationReason(reason), self._budget_message(reason, projected))
            if getattr(self.client, "temperature", None) is not None:
                self.client.temperature = self.temperature
            try:
                reply = await self.client.complete(messages, iteration=n, call_index=call_index)
            except ModelError as exc:
                call_index += exc.calls
                if exc.code == "context_window" and pruned < max_pruned:
                    before = prompt_tokens(base)
                    shorter, smaller = base, budget
                    while smaller > 256 and prompt_tokens(shorter) >= before:
                        smaller = max(256, smaller // 2)
                        shorter = prompt(smaller)
                    if prompt_tokens(shorter) < before:
                        pruned += 1
                        base, budget = shorter, smaller
                        note = f"the prompt does not fit the context window; pruned to {budget} tokens and asked again"
                        self.journal.append_event(self.run_id, "prompt_pruned", {
                            "error": str(exc), "retry": pruned, "token_budget": budget,
                            "tokens_before": before, "tokens_after": prompt_tokens(base)}, n)
                        self._emit(ModelRetry(run_id=self.run_id, n=n, attempt=pruned, error=note, delay_s=0.0))
                        continue
                self.spend.add(tokens_in, tokens_out, cost)  # replies this iteration already paid for
                raise _Stop(TerminationReason.FATAL_ERROR, self._model_failure(exc, n, pruned, base)) from None
            call_index += max(1, reply.calls)
            tokens_in += reply.tokens_in
            tokens_out += reply.tokens_out
            cost += reply.cost_usd
            latency += reply.latency_ms
            try:
                decision = parse_decision(reply.text, tool_names)
                if decision.action is not None:
                    tool = self.loop.tool(decision.action.tool)
                    assert tool is not None
                    try:
                        decision.action.args = tool.validate_args(decision.action.args)
                    except ValueError as exc:
                        raise DecisionError(str(exc)) from None
            except DecisionError as exc:
                self.journal.append_event(
                    self.run_id, "invalid_reply",
                    {"error": redact(str(exc)), "repair": repairs + 1, "reply": redact(reply.text)[:2_000]}, n
                )
                if repairs >= self.loop.max_repairs:
                    self.spend.add(tokens_in, tokens_out, cost)
                    raise _Stop(
                        TerminationReason.FATAL_ERROR,
                        f"the model's reply was still invalid after {repairs} repair attempt(s): {exc}",
                    ) from None
                repairs += 1
                tail = repair_messages(messages, reply.text, str(exc))[len(base):]
                continue
            return Intent(
                # Redacted before it is journalled: the tool runs with, and every record keeps, what is here.
                run_id=self.run_id, n=n, prompt=redact_tree(messages), raw_response=redact(reply.text),
                decision=redact_tree(decision.model_dump(mode="json")), repairs=repairs, tokens_in=tokens_in,
                tokens_out=tokens_out, cost_usd=cost, latency_ms=latency, model=reply.model, started_at=started,
            )

    def _model_failure(self, exc: ModelError, n: int, pruned: int, prompt: list[dict[str, Any]]) -> str:
        """The one line a run ends with when the maker's model call failed for good."""
        from loopterm.core.prompt import prompt_tokens

        resume = f"`loopterm resume {self.run_id}` continues from iteration {n} once the provider answers"
        if exc.code == "context_window":
            if pruned:
                how = f"still too long after pruning it {pruned} time(s), to about {prompt_tokens(prompt)} tokens"
            else:
                how = f"nothing left to prune in it (about {prompt_tokens(prompt)} tokens)"
            return (f"{exc}; {how}: shorten the task, system prompt or project rules, or use a model with a "
                    "larger context window")
        if exc.code == "circuit_open":
            import math

            breaker = getattr(self.client, "breaker", None)
            last = getattr(breaker, "last_error", None)
            wait = breaker.retry_in() if breaker is not None else (exc.retry_after or 0.0)
            what = (f"failed {exc.calls} time(s) in this iteration; its circuit is now open" if exc.calls
                    else "was not called: its circuit is open")
            return (f"{self.run_record.model} {what} after {getattr(breaker, 'failures', 'repeated')} consecutive "
                    f"failures{f' (last: {last})' if last else ''}; it lets a trial call through in "
                    f"{math.ceil(wait)}s, then {resume}")
        if exc.kind is ErrorKind.TRANSIENT:
            return f"{exc}; {resume}"
        return str(exc)

    def _next_state(self, n: int, decision: Decision, tool_record: ToolRecord | None, gates: list[GateResult]) -> LoopState:
        """Fold the iteration's observations into a new state; the old one is never mutated.

        A shallow copy is enough: tool records are append-only and never edited,
        and working memory gets a fresh object. Deep-copying a state whose tool
        log grows every iteration made each iteration slower than the last.
        """
        failed = next((g for g in gates if not g.passed), None)
        memory = self.state.memory.model_copy(update={
            "subgoal": decision.subgoal,
            "facts": [*self.state.memory.facts, iteration_fact(n, tool_record, gates)][-MAX_FACTS:],
            "contradictions": list(self.state.memory.contradictions),
        })
        updates: dict[str, Any] = {
            "iteration": n,
            "memory": memory,
            "last_gate_failure": failed.feedback() if failed else None,
        }
        if tool_record is not None:
            kept = self.loop.tool_history
            records = [*self.state.tool_results, tool_record]
            updates["tool_results"] = records if kept is None or len(records) <= kept else records[-kept:]
        return self.state.model_copy(update=updates)

    def _check_invariants(self, state: LoopState) -> tuple[dict[str, bool], list[Invariant]]:
        status: dict[str, bool] = {}
        violated: list[Invariant] = []
        for inv in self.loop.invariants:
            ok = inv.holds(state)
            status[inv.name] = ok
            if not ok and inv.name not in self.relaxed:
                violated.append(inv)
        return status, violated

    def _remediate(
        self, state: LoopState, violated: list[Invariant]
    ) -> tuple[LoopState, list[Remediation], _Stop | None]:
        """Apply each violated invariant's remediation; returns the (possibly replaced) state."""
        applied: list[Remediation] = []
        stop: _Stop | None = None
        for inv in violated:
            remedy = inv.remediation
            applied.append(remedy)
            self.journal.append_event(
                self.run_id, "invariant_violated", {"invariant": inv.name, "remediation": remedy.value}, state.iteration
            )
            if remedy is Remediation.PRUNE_CONTEXT:
                state.memory.facts = state.memory.facts[-3:]
                state.memory.contradictions = state.memory.contradictions[-3:]
            elif remedy is Remediation.CHANGE_STRATEGY:
                if not self._change_strategy(f"invariant {inv.name!r} violated", state.iteration):
                    self.temperature = min(2.0, self.temperature + 0.3)
                    self.strategy_note = f"the last approach broke invariant {inv.name!r}; take a different approach"
            elif remedy is Remediation.CUSTOM and inv.custom is not None:
                state = type(state).model_validate(inv.custom(state).model_dump())
            elif remedy is Remediation.ABORT and stop is None:
                stop = _Stop(TerminationReason.FATAL_ERROR, f"invariant {inv.name!r} violated; its remediation aborts the run")
            elif remedy is Remediation.ESCALATE and stop is None:
                stop = _Stop(TerminationReason.WAITING, f"invariant {inv.name!r} violated; waiting on a person")
        return state, applied, stop

    def _escalate(self, n: int, state: LoopState, violated: list[Invariant], message: str) -> None:
        packet = {
            "run_id": self.run_id,
            "iteration": n,
            "summary": message,
            "failing_invariants": [{"name": i.name, "description": i.description} for i in violated],
            "confidence_trajectory": list(self.confidences),
            "last_gate_failure": state.last_gate_failure,
            "suggested_interventions": [
                "add a fact to working memory",
                "override the subgoal",
                *[f"relax invariant {i.name!r}" for i in violated],
                "patch state",
                "resume",
                "abort",
            ],
            "state": state.model_dump(mode="json"),
        }
        packet = redact_tree(packet)
        self.journal.append_event(self.run_id, "escalated", packet, n)
        self._emit(Escalated(run_id=self.run_id, n=n, packet=packet))

    def _pending_side_effect(
        self, key: str, why: str, tool: str, args: dict[str, Any], earlier_run: str, earlier_iteration: int
    ) -> None:
        self.journal.append_event(
            self.run_id, "side_effect_pending",
            {"key": key, "why": why, "tool": tool, "args": args, "earlier_run": earlier_run,
             "earlier_iteration": earlier_iteration},
            self.state.iteration + 1,
        )

    def _finish(self, reason: TerminationReason, message: str) -> RunRecord:
        message = redact(message)
        status = status_for(reason)
        self._consolidate(status)
        self._tick()
        self.journal.update_run(
            self.run_id, status=status.value, termination_reason=reason.value, message=message,
            updated_at=self.clock(), elapsed_s=self.spend.elapsed_s, tokens_in=self.spend.tokens_in,
            tokens_out=self.spend.tokens_out, cost_usd=self.spend.cost_usd,
        )
        self.journal.append_event(self.run_id, "run_finished", {"status": status.value, "reason": reason.value, "message": message})
        self._emit(RunFinished(run_id=self.run_id, status=status.value, reason=reason.value, message=message))
        return self.journal.get_run(self.run_id)
