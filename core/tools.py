"""Tools with typed arguments, and the executor that runs them exactly once.

The executor keys every call (run, iteration, tool, arguments) and journals it
before and after running it. On resume a finished call is answered from the
journal; a side-effecting call that was interrupted mid-flight is never run a
second time unless the tool declared itself idempotent or a person, who can see
whether it took effect, answers "reexecute" ("reuse": it did; it is not run again).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import hashlib
import inspect
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from loopterm.core.decision import json_path
from loopterm.core.persistence import Journal
from loopterm.core.records import ToolCallRecord
from loopterm.core.secrets import redact_capped, redact_tree
from loopterm.core.state import ToolRecord

if TYPE_CHECKING:
    from loopterm.core.gates import ProcessResult


RewindPolicy = Literal["reuse", "reexecute", "ask"]


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about where it runs, and the engine's services it may use."""

    run_id: str
    iteration: int
    workspace: Path
    idempotency_key: str = ""
    loop: str = ""  # the loop's name (long-term memory is kept per loop)
    memory: Any = None  # a LongTermMemory (core/memory.py) when the journal keeps one
    spawn: Any = None  # starts a child run: see nesting.Spawn
    agent: Any = None  # the run's coding agent (core/agent_actor.py), in a loop whose actor is one


@dataclass
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str
    args_model: type[BaseModel]
    wants_context: bool
    side_effects: bool = False
    idempotent: bool = True  # safe to run again if interrupted mid-flight
    timeout: float = 30.0
    output_cap: int = 16_000
    needs_approval: bool = False
    on_rewind: RewindPolicy | None = None
    workspace_only: bool = False  # its effects live only in the run's own workspace
    calls: tuple[str, ...] = ()  # loops this tool starts as child runs (see nesting.fan_out)
    # Checked by the engine before the call runs, with the state and the arguments: a reason (str)
    # refuses the call (recorded as a failed call, nothing executed); None lets it run. For side
    # effects an invariant after the fact would be too late for (a reply sent to a customer).
    precondition: Callable[[Any, dict[str, Any]], str | None] | None = None
    _schema: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _line: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def rewind_policy(self) -> RewindPolicy:
        """What a branch or replay does when it reaches a call an earlier run already made.

        reuse: answer with the recorded result; reexecute: run it again (right for
        effects confined to the run's own workspace); ask: stop and let a person
        decide (the default for side-effecting tools).
        """
        if self.on_rewind is not None:
            return self.on_rewind
        return "ask" if self.side_effects and not self.workspace_only else "reexecute"

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments, shown to the model (built once: pydantic takes ~0.3 ms)."""
        if self._schema is None:
            self._schema = self.args_model.model_json_schema()
        return copy.deepcopy(self._schema)

    def prompt_line(self) -> str:
        """How the system prompt lists this tool (built once per tool, not per iteration)."""
        if self._line is None:
            schema = self.schema()
            args = json.dumps(schema.get("properties", {}), sort_keys=True)
            effects = " (side effects)" if self.side_effects else ""
            self._line = f"- {self.name}{effects}: {self.description} args={args} required={schema.get('required', [])}"
        return self._line

    def validate_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """Raise ValueError with a readable reason when args do not fit the signature."""
        try:
            return self.args_model.model_validate(args).model_dump()
        except ValidationError as exc:
            problems = "; ".join(
                f"{json_path(err['loc']) or '(args)'}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise ValueError(f"invalid arguments for tool {self.name!r}: {problems}") from None


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    side_effects: bool = False,
    idempotent: bool | None = None,
    timeout: float = 30.0,
    output_cap: int = 16_000,
    needs_approval: bool = False,
    on_rewind: RewindPolicy | None = None,
    workspace_only: bool = False,
    precondition: Callable[[Any, dict[str, Any]], str | None] | None = None,
) -> Any:
    """Declare a tool. Its typed parameters (after an optional `ctx: ToolContext`) are its arguments."""

    def wrap(f: Callable[..., Any]) -> Tool:
        sig = inspect.signature(f)
        params = list(sig.parameters.values())
        wants_context = bool(params) and (params[0].name == "ctx" or params[0].annotation in (ToolContext, "ToolContext"))
        fields: dict[str, Any] = {}
        for p in params[1:] if wants_context else params:
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (_resolve(f, p), default)
        model = create_model(f"{f.__name__}_args", __config__=ConfigDict(extra="forbid"), **fields)
        doc = inspect.getdoc(f) or ""
        return Tool(
            name=name or f.__name__,
            fn=f,
            description=doc.splitlines()[0] if doc else "",
            args_model=model,
            wants_context=wants_context,
            side_effects=side_effects,
            idempotent=(not side_effects) if idempotent is None else idempotent,
            timeout=timeout,
            output_cap=output_cap,
            needs_approval=needs_approval,
            on_rewind=on_rewind,
            workspace_only=workspace_only,
            precondition=precondition,
        )

    return wrap(fn) if fn is not None else wrap


def _resolve(f: Callable[..., Any], p: inspect.Parameter) -> Any:
    """One parameter's annotation; only argument annotations are evaluated, never ctx's."""
    annotation = p.annotation
    if annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, str):
        try:
            return eval(annotation, getattr(f, "__globals__", {}))  # noqa: S307 - the tool author's own annotation
        except Exception as exc:
            raise TypeError(f"tool {f.__name__!r}: cannot resolve the annotation of {p.name!r} ({annotation}): {exc}") from None
    return annotation


def idempotency_key(run_id: str, iteration: int, tool_name: str, args: dict[str, Any]) -> str:
    payload = json.dumps({"run": run_id, "n": iteration, "tool": tool_name, "args": args}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# The result of an interrupted call a person said took effect (`--side-effects reuse`): it is not run again.
# A call without side effects runs this long before its queued start (and the reply) is written
# anyway: a quick call costs no commit of its own, a slow one loses nothing to a crash.
QUEUE_FOR_S = 0.05
TOOK_EFFECT = "(interrupted before its result was recorded; a person confirmed it took effect, so it was not run again)"


class InterruptedSideEffect(Exception):
    """A side-effecting call started before a crash and never finished: a person must decide
    whether it took effect (answer "reuse": it is not run again) or not ("reexecute")."""

    def __init__(self, record: ToolCallRecord) -> None:
        super().__init__(
            f"tool {record.tool!r} (iteration {record.iteration}) was interrupted mid-call and has side effects; "
            "it may or may not have taken effect"
        )
        self.record = record
        self.key = record.key


class SideEffectNeedsDecision(Exception):
    """A branch reached a side-effecting call an earlier run already made, and the tool says: ask."""

    def __init__(self, key: str, tool: str, args: dict[str, Any], earlier: ToolCallRecord) -> None:
        super().__init__(
            f"tool {tool!r} was already called with these arguments by run {earlier.run_id} at iteration "
            f"{earlier.iteration}; reuse its result or execute it again?"
        )
        self.key = key
        self.tool = tool
        self.call_args = args  # not `args`: that is BaseException's, and str() reads it
        self.earlier = earlier


class PriorCalls(Protocol):
    """Calls that a related run (an ancestor of a branch, the recording of a replay) already made."""

    def find(self, tool: str, args: dict[str, Any], iteration: int) -> ToolCallRecord | None: ...


def cap_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters cut]"


@dataclass
class ToolExecutor:
    """Runs tool calls exactly once per run, and decides what a rewound run does with earlier calls.

    `answers` holds a person's decisions for pending calls, by idempotency key:
    "reuse" or "reexecute". `replaying` turns "ask" into "reuse": a replay
    answers side effects from the recording, it never fires them.
    """

    journal: Journal
    run_id: str
    clock: Callable[[], float] = field(default=time.time)
    prior: PriorCalls | None = None
    replaying: bool = False
    answers: dict[str, str] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)  # extra ToolContext fields: loop, memory, spawn

    async def execute(self, tool: Tool, args: dict[str, Any], iteration: int, workspace: Path,
                      key: str | None = None) -> tuple[ToolRecord, str]:
        """Run (or recall) one call; returns the record and its idempotency key (`key`: the caller's, when it
        already computed it for these very arguments; hashing them again cost about 5 us a call)."""
        if key is None:
            key = idempotency_key(self.run_id, iteration, tool.name, args)
        known = self.journal.tool_call(key)
        if known is not None and known.status == "done" and known.result is not None:
            return ToolRecord.model_validate({**known.result, "reused": True}), key
        if known is not None and known.status == "started" and not tool.idempotent:
            answer = self.answers.get(key)
            if answer == "reuse":  # a person saw it take effect: never run again; its output was never recorded
                record = ToolRecord(iteration=iteration, tool=tool.name, args=args, ok=True, output=TOOK_EFFECT,
                                    reused=True)
                self.journal.tool_call_finished(key, record.model_dump(), self.clock(), durable=False)
                return record, key
            if answer != "reexecute":
                raise InterruptedSideEffect(known)
        shown = redact_tree(args)  # what the journal and the record keep of the arguments
        started = ToolCallRecord(
            key=key, run_id=self.run_id, iteration=iteration, tool=tool.name, args=shown,
            status="started", started_at=self.clock(),
        )
        earlier = self._earlier(tool, args, iteration)
        if earlier is not None and self._policy(tool, key, earlier, args) == "reuse":
            assert earlier.result is not None
            record = ToolRecord.model_validate({**earlier.result, "iteration": iteration, "reused": True})
            self.journal.tool_call_started(started, power_safe=tool.side_effects)
            self.journal.tool_call_finished(key, record.model_dump(), self.clock(), durable=False)
            return record, key
        # A side effect's start (and the reply before it) must survive even a power loss before it
        # fires. A call without side effects may run twice without harm: its start is queued to ride
        # with the iteration's commit (one commit per iteration), unless it runs longer than
        # QUEUE_FOR_S, when the reply and the start are written then, so a crash does not pay for it again.
        self.journal.tool_call_started(started, durable=tool.side_effects)
        # Built only for a tool that takes it (a frozen dataclass of 8 fields: a few microseconds).
        ctx = ToolContext(self.run_id, iteration, workspace, key, **self.services) if tool.wants_context else None
        flush = None if tool.side_effects else self.journal.flush
        record = await self._run(tool, args, iteration, ctx, shown, flush)
        # Queued: committed with the iteration, or earlier by the engine's flush before gates.
        self.journal.tool_call_finished(key, record.model_dump(), self.clock(), durable=False)
        return record, key

    def _earlier(self, tool: Tool, args: dict[str, Any], iteration: int) -> ToolCallRecord | None:
        if not tool.side_effects or self.prior is None:
            return None
        found = self.prior.find(tool.name, args, iteration)
        return found if found is not None and found.result is not None else None

    def _policy(self, tool: Tool, key: str, earlier: ToolCallRecord, args: dict[str, Any]) -> str:
        policy: str = tool.rewind_policy
        if policy == "ask":
            policy = "reuse" if self.replaying else self.answers.get(key, "ask")
        if policy == "ask":
            raise SideEffectNeedsDecision(key, tool.name, args, earlier)
        return policy

    async def _run(self, tool: Tool, args: dict[str, Any], iteration: int, ctx: ToolContext | None,
                   shown: dict[str, Any] | None = None, flush: Callable[[], None] | None = None) -> ToolRecord:
        """Run the tool: its result (output or error) is redacted (core/secrets.py) before it is capped,
        journalled or put in the state. `shown`: the arguments redacted (the caller's, if it has them);
        `flush`: called if the call is still running after QUEUE_FOR_S (its queued start is written then)."""
        call_args = (ctx,) if tool.wants_context else ()
        base = {"iteration": iteration, "tool": tool.name, "args": redact_tree(args) if shown is None else shown}
        in_thread = not inspect.iscoroutinefunction(tool.fn)
        try:
            if in_thread:
                output = await _within(in_daemon_thread(tool.fn, *call_args, **args), tool.timeout, flush)
            else:
                output = await _within(tool.fn(*call_args, **args), tool.timeout, flush)
        except asyncio.TimeoutError:
            # An async tool is cancelled; a thread cannot be stopped: it is abandoned (a daemon thread
            # never keeps loopterm from exiting), and what it does from now on is not recorded.
            abandoned = " (its thread cannot be stopped and may still finish)" if in_thread else ""
            return ToolRecord(**base, ok=False, error=f"timed out after {tool.timeout:g}s{abandoned}")
        except Exception as exc:  # a tool's failure is information for the next iteration
            return ToolRecord(**base, ok=False, error=redact_capped(f"{exc.__class__.__name__}: {exc}", tool.output_cap))
        text = output if isinstance(output, str) else json.dumps(output, default=str)
        return ToolRecord(**base, ok=True, output=redact_capped(text, tool.output_cap))


async def _within(awaitable: Awaitable[Any], timeout: float, flush: Callable[[], None] | None) -> Any:
    """`asyncio.wait_for(awaitable, timeout)` (a coroutine runs as a task of its own, in a copy of the context;
    cancelled at the timeout, which is then asyncio.TimeoutError unless it returns or raises anyway), with
    `flush` called if it still runs after QUEUE_FOR_S. One timer at a time for both, and the task awaited
    directly: wait_for's own future, callback and extra turn of the event loop cost more than a no-op call."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    now = loop.time()
    plan = [(now + timeout, expire)]
    if flush is not None:
        plan.append((now + QUEUE_FOR_S, flush))
        plan.sort(key=lambda step: step[0])

    def due() -> None:
        nonlocal timer
        _, action = plan.pop(0)
        if plan:
            timer = loop.call_at(plan[0][0], due)
        action()

    timer = loop.call_at(plan[0][0], due)
    try:
        return await task
    except asyncio.CancelledError:
        if expired and task.cancelled():
            raise asyncio.TimeoutError() from None
        raise
    finally:
        timer.cancel()


class _DaemonThreads:
    """Worker threads for synchronous tools, reused, and daemon threads: a tool that never returns is
    abandoned at its timeout and cannot hold the process at exit (asyncio.to_thread's executor is
    joined when asyncio.run ends, so one hung tool kept `loopterm run` from ever exiting)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._work, name="loopterm-tool", daemon=True).start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_threads = _DaemonThreads()


def in_daemon_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
    """Like asyncio.to_thread, on a daemon thread: the future can be abandoned (a timeout) for good."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def job() -> None:
        try:
            outcome: tuple[bool, Any] = (True, context.run(fn, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop has closed: nobody waits for this call any more
            pass

    _threads.submit(job)
    return future


# ----------------------------------------------------------------------------- confinement helpers


def confine(workspace: Path, path: str) -> Path:
    """Resolve `path` inside `workspace` or raise ValueError saying why it is refused.

    For tools that take a file name from the model: absolute paths, '..' and symlinks pointing out
    of the workspace are refused.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("path is empty; give a file name relative to the workspace, e.g. 'solution.py'")
    if "\x00" in path:
        raise ValueError("path contains a NUL byte; give a plain relative file name")
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or path.startswith(("/", "\\")):
        raise ValueError(f"path {path!r} is absolute; give a path relative to the workspace")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"path {path!r} contains '..'; paths must stay inside the workspace")
    root = Path(workspace).resolve()
    target = (root / posix).resolve()  # follows symlinks, so a link pointing out is caught here
    if target == root:
        raise ValueError(f"path {path!r} is the workspace directory itself; name a file")
    if root not in target.parents:
        raise ValueError(f"path {path!r} resolves outside the workspace (through a symlink); refused")
    return target


async def run_command_async(
    workspace: Path, argv: Sequence[str], *, timeout: float = 30.0, output_cap: int = 16_000,
    env: dict[str, str] | None = None,
) -> "ProcessResult":
    """Run a command for a tool the way gates run theirs: working directory the workspace, provider
    keys removed from its environment (`env` is added on top), killed with every process it started
    after `timeout` seconds (and anything it leaves running when it exits), stdout and stderr each
    capped at `output_cap` characters and redacted. Returns exit_code (None: timed out or could not
    start, with `error` saying which), stdout, stderr."""
    from loopterm.core.gates import run_process, scrubbed_env

    return await run_process([str(a) for a in argv], Path(workspace), {**scrubbed_env(), **(env or {})},
                             timeout, output_cap)


def run_command(
    workspace: Path, argv: Sequence[str], *, timeout: float = 30.0, output_cap: int = 16_000,
    env: dict[str, str] | None = None,
) -> "ProcessResult":
    """run_command_async for a synchronous tool (which runs on a thread of its own); an async tool
    awaits run_command_async."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_command_async(workspace, argv, timeout=timeout, output_cap=output_cap, env=env))
    raise RuntimeError("run_command was called on the event loop's thread; an async tool awaits run_command_async")


def guard_tools(tools: list[Tool]) -> list[Tool]:
    """The tools, with the side-effecting, non-re-executable ones unable to fire (a replay's).

    The executor answers them from the recording when the call matches; a call the recording does not
    have (the arguments changed) gets an error result instead of touching the world.
    """
    return [dataclasses.replace(t, fn=_refuser(t.name), wants_context=False)
            if t.side_effects and t.rewind_policy != "reexecute" else t for t in tools]


def _refuser(name: str) -> Callable[..., Any]:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(
            f"replay: {name} was not fired; the recording has no call of it with these arguments at this iteration"
        )

    return refuse
