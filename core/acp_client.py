"""A session with an ACP coding agent: loopterm as the protocol's client, the agent a child process.

The agent speaks JSON-RPC over its stdio (the official SDK, `acp`, does the framing). loopterm starts it
with only the declared environment, in the run's worktree, lets it read and write files only inside that
worktree, answers its permission requests through a callback (never "always"), and bounds each turn:
a time limit, a tool-call limit and the budget cancel it; an agent that ignores the cancel is killed.
A turn never raises for what the agent did (a crash is a turn ended by "crash").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, Literal

from acp import PROTOCOL_VERSION, RequestError, text_block
from acp.client.connection import ClientSideConnection
from acp.schema import (
    AllowedOutcome,
    ClientCapabilities,
    DeniedOutcome,
    FileSystemCapabilities,
    Implementation,
    ReadTextFileResponse,
    RequestPermissionResponse,
    WriteTextFileResponse,
)

from .acp_turn import AgentPermission, AgentToolCall, AgentTurn, AgentUsage, EndedBy, capped
from .acp_updates import apply, merge_tool_call, relative_path
from .agent_spec import BASE_ENV, AgentSpec

PermissionCallback = Callable[[AgentToolCall, list[str]], Awaitable[AgentPermission]]

CANCEL_GRACE_S = 5.0  # after session/cancel, how long the agent has to answer the prompt before it is killed
CLOSE_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this
LINE_LIMIT = 50 * 1024 * 1024  # one JSON-RPC line (asyncio's default, 64 KiB, is less than a real agent's diff)
START_TIMEOUT_S = 60.0  # initialize and the session's creation
EXIT_WAIT_S = 2.0  # once the agent's stdout closed, how long to wait for its exit code


class AgentStartError(RuntimeError):
    """The agent could not be started or did not answer its first requests (one line, no traceback)."""


class _Client:
    """The protocol's client side, as the SDK calls it: updates, permissions and the confined file system."""

    def __init__(self, session: AcpSession) -> None:
        self.s = session

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        await self.s._on_session_update(update)

    async def request_permission(self, session_id: str, tool_call: Any, options: list[Any], **kwargs: Any) -> Any:
        return await self.s._on_permission(tool_call, options)

    async def read_text_file(
        self, session_id: str, path: str, line: int | None = None, limit: int | None = None, **kwargs: Any
    ) -> ReadTextFileResponse:
        target = self.s._confined(path)
        try:
            text = target.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise RequestError.resource_not_found(str(path)) from exc
        if line is not None or limit is not None:
            lines = text.splitlines(keepends=True)
            start = max((line or 1) - 1, 0)
            text = "".join(lines[start : start + limit if limit is not None else None])
        return ReadTextFileResponse(content=text)

    async def write_text_file(self, session_id: str, path: str, content: str, **kwargs: Any) -> WriteTextFileResponse:
        target = self.s._confined(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        except OSError as exc:
            raise RequestError.internal_error({"details": f"cannot write {path}: {exc.strerror}"}) from exc
        turn = self.s._record_turn()
        rel = relative_path(str(target), self.s.cwd.resolve())
        if rel not in turn.writes:
            turn.writes.append(rel)
        return WriteTextFileResponse()


class AcpSession:
    """One agent process and one protocol session in it (new, loaded after a restart, or forked)."""

    session_id: str
    origin: Literal["new", "loaded", "forked"]
    can_load: bool
    can_fork: bool
    agent_info: str

    def __init__(self, spec: AgentSpec, cwd: Path, permission: PermissionCallback, stderr: Path) -> None:
        self.spec = spec
        self.cwd = cwd
        self._permission = permission
        self._stderr_path = stderr
        self._stderr: IO[bytes] | None = None
        self._stderr_start = 0
        self._process: asyncio.subprocess.Process | None = None
        self._conn: ClientSideConnection | None = None
        self._exit: asyncio.Task[int] | None = None
        self._killed = False
        self._turn: AgentTurn | None = None  # the turn in flight
        self._idle = AgentTurn(agent=spec.name)  # updates outside a turn (a loaded session's replay)
        self._session_cost: float | None = None
        self._on_update: Callable[[AgentTurn], None] | None = None
        self._over_budget: Callable[[AgentUsage], str | None] | None = None
        self._cancel_sent = False
        self._kill_at: float | None = None
        self._wake = asyncio.Event()
        self._permission_tasks: set[asyncio.Task[AgentPermission]] = set()
        self._waited_s = 0.0  # this turn's time spent waiting on permission decisions
        self.session_id = ""
        self.origin = "new"
        self.can_load = False
        self.can_fork = False
        self.agent_info = ""

    # ---- lifecycle ----

    @classmethod
    async def open(
        cls,
        spec: AgentSpec,
        cwd: Path,
        *,
        permission: PermissionCallback,
        stderr: Path,
        load_session_id: str | None = None,
        fork_session_id: str | None = None,
    ) -> AcpSession:
        """Start the agent in `cwd` and open a session: new, or `session/load`, or (unstable) `session/fork`."""
        if fork_session_id is not None and not spec.use_fork:
            raise AgentStartError(f"the agent `{spec.name}` is declared with use_fork=False: cannot fork")
        session = cls(spec, cwd, permission, stderr)
        try:
            await session._start()
            await session._open_session(load_session_id, fork_session_id)
        except BaseException:
            await session.close()
            raise
        return session

    async def _start(self) -> None:
        command = " ".join(self.spec.command)
        self._stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self._stderr_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self._stderr_start = self._stderr.tell()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.spec.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=self._stderr,  # a file: a pipe nobody reads blocks a chatty agent
                env=agent_environment(self.spec),
                cwd=str(self.cwd),
                limit=LINE_LIMIT,
                start_new_session=True,  # its own process group: close/kill reach what it started
            )
        except OSError as exc:
            raise AgentStartError(f"cannot start the agent `{command}`: {exc.strerror or exc}") from None
        assert self._process.stdin is not None and self._process.stdout is not None
        self._exit = asyncio.create_task(self._process.wait())
        self._conn = ClientSideConnection(
            _Client(self), self._process.stdin, self._process.stdout, use_unstable_protocol=True
        )
        reply = await self._starting(
            self._conn.initialize(
                protocol_version=PROTOCOL_VERSION,
                client_capabilities=ClientCapabilities(
                    fs=FileSystemCapabilities(read_text_file=True, write_text_file=True), terminal=False
                ),
                client_info=Implementation(name="loopterm", version="0.1.0"),
            ),
            "initialize",
        )
        caps = reply.agent_capabilities
        self.can_load = bool(caps and caps.load_session)
        sessions = caps.session_capabilities if caps else None
        self.can_fork = bool(sessions is not None and sessions.fork is not None)
        info = reply.agent_info
        self.agent_info = capped(f"{info.name} {info.version}".strip(), 200) if info else ""

    async def _open_session(self, load_id: str | None, fork_id: str | None) -> None:
        assert self._conn is not None
        cwd = str(self.cwd)
        name = self.spec.name
        if load_id is not None:
            if not self.can_load:
                raise AgentStartError(f"the agent `{name}` cannot load a session (no loadSession capability)")
            await self._starting(self._conn.load_session(cwd=cwd, session_id=load_id, mcp_servers=[]), "load")
            self.session_id, self.origin = load_id, "loaded"
            self._session_cost = self._idle.usage.session_cost_usd
        elif fork_id is not None:
            if not self.can_fork:
                raise AgentStartError(f"the agent `{name}` does not offer session/fork")
            reply = await self._starting(self._conn.fork_session(session_id=fork_id, cwd=cwd, mcp_servers=[]), "fork")
            self.session_id, self.origin = reply.session_id, "forked"
        else:
            reply = await self._starting(self._conn.new_session(cwd=cwd, mcp_servers=[]), "session/new")
            self.session_id, self.origin = reply.session_id, "new"

    async def _starting(self, request: Awaitable[Any], what: str) -> Any:
        """A request while starting, raced against the process's exit: one clear line if it fails."""
        assert self._exit is not None
        command = " ".join(self.spec.command)
        call = asyncio.ensure_future(request)
        done, _ = await asyncio.wait({call, self._exit}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if call in done and call.exception() is None:
            return call.result()
        if call in done and isinstance(call.exception(), ConnectionError):
            await asyncio.wait({self._exit}, timeout=EXIT_WAIT_S)  # its stdout closed: it is exiting
        if not call.done():
            call.cancel()
            with contextlib.suppress(BaseException):
                await call
        if self._exit.done():
            await asyncio.sleep(0.05)  # let its last stderr line land
            line = self._first_stderr_line()
            raise AgentStartError(
                f"the agent `{command}` exited at start (code {self._exit.result()})" + (f": {line}" if line else "")
            ) from None
        if not done:
            raise AgentStartError(f"the agent `{command}` did not answer {what} within {START_TIMEOUT_S:g} s") from None
        raise AgentStartError(f"the agent `{command}` refused {what}: {capped(_error_text(call.exception()), 300)}") from None

    def _first_stderr_line(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(self._stderr_start)
                for raw in f.read(64_000).decode("utf-8", "replace").splitlines():
                    if raw.strip():
                        return capped(raw.strip(), 300)
        except OSError:
            pass
        return ""

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None and not self._killed

    async def close(self) -> None:
        """End the agent: its connection, then SIGTERM to its process group, SIGKILL after 3 s.

        A turn in flight ends with it (by a person, noted) unless something already ended it."""
        if self._turn is not None and not self._cancel_sent:
            self._cancel_sent = True
            self._turn.ended_by, self._turn.note = "person", "the agent's session was closed during the turn"
        process = self._process
        self._killed = self._killed or process is not None  # from here on, its exit is ours, not a crash
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        if process is not None and process.returncode is None:
            self._signal(signal.SIGTERM)
            assert self._exit is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), CLOSE_GRACE_S)
            except asyncio.TimeoutError:
                self._signal(signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._exit), CLOSE_GRACE_S)
        if self._exit is not None and not self._exit.done():
            self._exit.cancel()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    # ---- one turn ----

    async def prompt(
        self,
        text: str,
        *,
        on_update: Callable[[AgentTurn], None] | None = None,
        over_budget: Callable[[AgentUsage], str | None] | None = None,
    ) -> AgentTurn:
        """One prompt turn, recorded; bounded by the spec's limits and `over_budget`. Never raises for the agent."""
        turn = AgentTurn(
            agent=self.spec.name,
            session_id=self.session_id,
            session_origin=self.origin,
            prompt=capped(text),
            started_at=time.time(),
        )
        turn.usage.session_cost_usd = self._session_cost
        if not self.alive or self._conn is None or self._exit is None:
            turn.ended_by, turn.note, turn.ended_at = "crash", "the agent is not running", time.time()
            return turn
        self._turn, self._on_update, self._over_budget = turn, on_update, over_budget
        self._cancel_sent, self._kill_at = False, None
        loop = asyncio.get_running_loop()
        self._waited_s = 0.0
        started = loop.time()
        call = asyncio.ensure_future(self._conn.prompt(session_id=self.session_id, prompt=[text_block(text)]))
        try:
            while not call.done():
                now = loop.time()
                # the limit counts the agent's time, not a person's: none while a permission waits on one
                deadline = (now + self.spec.turn_timeout_s if self._permission_tasks
                            else started + self._waited_s + self.spec.turn_timeout_s)
                if self._kill_at is not None and now >= self._kill_at:
                    self._kill()
                    turn.note = (turn.note + "; " if turn.note else "") + (
                        f"killed: the agent did not end the turn within {CANCEL_GRACE_S:g} s of the cancel"
                    )
                    break
                if self._kill_at is None and now >= deadline:
                    await self._request_cancel("limit", f"turn_timeout_s ({self.spec.turn_timeout_s:g} s) reached")
                    continue
                if self._exit.done():
                    await asyncio.wait({call}, timeout=0.5)  # an answer sent just before exiting
                    break
                wake = asyncio.ensure_future(self._wake.wait())
                timeout = (self._kill_at if self._kill_at is not None else deadline) - now
                await asyncio.wait({call, self._exit, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                self._wake.clear()
            if call.done() and not call.cancelled() and isinstance(call.exception(), ConnectionError):
                await asyncio.wait({self._exit}, timeout=EXIT_WAIT_S)  # its stdout closed: it is exiting
            self._finish(turn, call)
        finally:
            if not call.done() and not self._cancel_sent and self.alive:
                # the caller gave up on the turn (its task was cancelled): the agent must stop too
                turn.ended_by, turn.note = "person", "the turn was abandoned by its caller"
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._conn.cancel(session_id=self.session_id))
            if not call.done():
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call
            for task in list(self._permission_tasks):
                task.cancel()
            self._turn = self._on_update = self._over_budget = None
            turn.ended_at = time.time()
            self._session_cost = turn.usage.session_cost_usd
        return turn

    def _finish(self, turn: AgentTurn, call: asyncio.Future[Any]) -> None:
        """The turn's end from the prompt's answer, or what happened to the process."""
        if call.done() and not call.cancelled() and call.exception() is None:
            reply = call.result()
            turn.stop_reason = str(reply.stop_reason)
            if reply.usage is not None:
                turn.usage.tokens_in = reply.usage.input_tokens
                turn.usage.tokens_out = reply.usage.output_tokens
                turn.usage.tokens_cached = reply.usage.cached_read_tokens or 0
            return
        if self._killed:
            return  # ended_by and the note already say who stopped it and that it was killed
        if self._exit is not None and self._exit.done():
            turn.ended_by = "crash"
            turn.note = f"the agent exited during the turn (code {self._exit.result()})"
            self._killed = True
            return
        exc = call.exception() if call.done() and not call.cancelled() else None
        if turn.ended_by == "agent":  # not a way for a turn to end: said as an error, not as a turn like others
            turn.ended_by = "error"
        turn.note = capped(f"the agent answered the prompt with an error: {_error_text(exc)}", 500)

    async def cancel(self, ended_by: EndedBy = "person", note: str = "") -> None:
        """End the turn in flight (session/cancel); the agent is killed if it does not stop in time."""
        await self._request_cancel(ended_by, note)

    async def _request_cancel(self, ended_by: EndedBy, note: str) -> None:
        turn = self._turn
        if turn is None or self._cancel_sent:
            return
        self._cancel_sent = True
        turn.ended_by, turn.note = ended_by, capped(note, 500)
        self._kill_at = asyncio.get_running_loop().time() + CANCEL_GRACE_S
        for task in list(self._permission_tasks):
            task.cancel()  # the protocol: pending permission requests are answered "cancelled"
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.cancel(session_id=self.session_id)
        self._wake.set()

    def _kill(self) -> None:
        self._signal(signal.SIGKILL)
        self._killed = True

    def _record_turn(self) -> AgentTurn:
        return self._turn if self._turn is not None else self._idle

    # ---- what the agent sends ----

    async def _on_session_update(self, update: Any) -> None:
        turn = self._record_turn()
        apply(turn, update, cwd=self.cwd)
        if turn is self._idle:
            return
        if self._on_update is not None:
            self._on_update(turn)
        if len(turn.tool_calls) > self.spec.max_tool_calls:
            await self._request_cancel("limit", f"max_tool_calls ({self.spec.max_tool_calls}) reached")
        elif self._over_budget is not None and getattr(update, "session_update", None) == "usage_update":
            reason = self._over_budget(turn.usage)
            if reason:
                await self._request_cancel("budget", reason)

    async def _on_permission(self, tool_call: Any, options: list[Any]) -> RequestPermissionResponse:
        turn = self._record_turn()
        call = merge_tool_call(turn, tool_call, cwd=self.cwd)
        offered = [str(o.kind) for o in options]
        ids = {str(o.kind): o.option_id for o in reversed(options)}  # the first option of each kind
        if self._cancel_sent:
            decision = AgentPermission(outcome="cancelled", decided_by="stopped", reason="the turn was cancelled")
        else:
            task = asyncio.ensure_future(self._permission(call.model_copy(deep=True), offered))
            self._permission_tasks.add(task)
            asked_at = asyncio.get_running_loop().time()
            try:
                decision = await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
                decision = AgentPermission(outcome="cancelled", decided_by="stopped", reason="the turn was cancelled")
            except Exception as exc:  # a broken callback must not leave the agent waiting
                decision = AgentPermission(
                    outcome="cancelled", decided_by="stopped", reason=capped(f"the decision failed: {exc}", 300)
                )
            finally:
                self._permission_tasks.discard(task)
                # A person deciding is not the agent working: the turn's time limit does not count it.
                self._waited_s += asyncio.get_running_loop().time() - asked_at
                self._wake.set()  # the turn's loop recomputes its deadline
        answered = decision.outcome
        if answered != "cancelled" and answered not in ids:
            answered = "reject_once" if "reject_once" in ids else "cancelled"
        reason = decision.reason
        if answered != decision.outcome:
            reason = (reason + "; " if reason else "") + f"{decision.outcome} not offered: answered {answered}"
        paths = list(dict.fromkeys(call.locations + [d.path for d in call.diffs]))
        turn.permissions.append(
            decision.model_copy(
                update={
                    "tool_call_id": call.id,
                    "title": call.title,
                    "kind": call.kind,
                    "paths": paths,
                    "offered": offered,
                    "outcome": answered,
                    "reason": capped(reason, 500),
                }
            )
        )
        if self._turn is not None and self._on_update is not None:
            self._on_update(self._turn)
        if answered == "cancelled":
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        return RequestPermissionResponse(outcome=AllowedOutcome(outcome="selected", option_id=ids[answered]))

    def _confined(self, path: str) -> Path:
        """`path` resolved (symlinks too) inside the worktree; anything else is refused and recorded."""
        root = self.cwd.resolve()
        candidate = Path(path)
        target = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if target != root and root not in target.parents:
            turn = self._record_turn()
            shown = capped(str(path), 500)
            if shown not in turn.refused_paths:
                turn.refused_paths.append(shown)
            raise RequestError.invalid_params({"details": f"{path} is outside the worktree: refused"})
        return target


def agent_environment(spec: AgentSpec) -> dict[str, str]:
    """Only what any program needs (AgentSpec.BASE_ENV), the names declared in env_from, and spec.env."""
    env = {name: os.environ[name] for name in BASE_ENV if name in os.environ}
    env.update({name: os.environ[name] for name in spec.env_from if name in os.environ})
    env.update(spec.env)
    return env


def _error_text(exc: BaseException | None) -> str:
    """A JSON-RPC error as one line: its message and the details the agent gave."""
    if exc is None:
        return "no answer"
    text = str(exc) or type(exc).__name__
    data = getattr(exc, "data", None)
    if isinstance(data, dict) and data.get("details"):
        text += f" ({data['details']})"
    return " ".join(text.split())
