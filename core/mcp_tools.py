"""MCP servers as loop tools: a loop declares servers, their tools become `Tool`s for a run.

    Loop(..., mcp_servers=[McpServer(name="git", command=["{python}", "-m", "mcp_server_git",
                                                          "--repository", "{workspace}/repo"])])

At run start (and on resume, a branch, a replay) the engine connects to every declared server
(a stdio command started in the run's workspace, or a streamable-HTTP URL), lists its tools and
adds them to the loop's for that run. Each call then goes through the ToolExecutor like any tool
(journal, idempotency key, exactly once on resume, output cap, redaction, approval,
preconditions); the arguments are checked against the tool's own JSON schema first.

The side-effect policy comes from the tool's annotations: a tool that says readOnlyHint is
read-only; any other tool (annotated or not) has side effects, idempotent only if it says so,
and needs a person's approval when it may be destructive (`approve`, per server). A person
overrides any of that per tool (`overrides`).

The SDK is anyio-based and its sessions hold cancel scopes: every session is entered and exited
by one task of its own (`McpTools._own`), which lives as long as the run; calls from the engine's
task only exchange messages with it. The SDK is imported lazily: `loopterm --help` never loads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, create_model

from loopterm.core.decision import json_path
from loopterm.core.secrets import redact
from loopterm.core.text import one_line
from loopterm.core.mcp_servers import McpServer, McpStartError, ToolPolicy, fill
from loopterm.core.tools import Tool

if TYPE_CHECKING:
    from anyio.abc import Process

STOP_GRACE_S = 2.0  # a stdio server gets this long to exit after its stdin closes, then SIGTERM, then SIGKILL
_QUIET = logging.NullHandler()
_STDERR_TAIL = 600  # characters of a server's stderr quoted when it fails


class McpServerGone(Exception):
    """The server stopped answering mid-run (exited, or its connection dropped): the call failed and
    the run ends; a resume reconnects."""


class McpToolError(Exception):
    """The server answered the call with an error (isError, or a protocol error): a failed tool call
    the model sees; the run goes on."""


# ----------------------------------------------------------------------------- tools


@dataclass
class McpTool(Tool):
    """A server's tool as a loop tool: its arguments are checked against its own JSON schema, which
    is also what the model is shown."""

    server: str = ""
    remote_name: str = ""  # the tool's name on its server (the loop's name may carry a prefix)
    input_schema: dict[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.input_schema))

    def validate_args(self, args: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import Draft202012Validator
        from jsonschema.validators import validator_for

        if not isinstance(args, dict):
            raise ValueError(f"invalid arguments for tool {self.name!r}: (args): must be an object")
        try:
            cls = validator_for(self.input_schema, default=Draft202012Validator)
            errors = sorted(cls(self.input_schema).iter_errors(args), key=lambda e: list(e.absolute_path))
        except Exception as exc:  # noqa: BLE001 - the server's schema itself is broken: say so, refuse the call
            raise ValueError(f"tool {self.name!r}: its server's input schema cannot be checked ({exc.__class__.__name__})") from None
        if errors:
            problems = "; ".join(f"{json_path(tuple(e.absolute_path)) or '(args)'}: {one_line(e.message, 200)}"
                                 for e in errors[:5])
            raise ValueError(f"invalid arguments for tool {self.name!r}: {problems}")
        return dict(args)


_ANY_ARGS = create_model("mcp_args", __config__=ConfigDict(extra="allow"))


def tool_for(server: McpServer, remote: Any, tools: "McpTools") -> McpTool:
    """The loop tool for one of the server's tools (`remote`: an mcp Tool), its policy from the annotations."""
    hints = remote.annotations
    read_only = bool(hints is not None and hints.read_only_hint)
    side_effects = not read_only
    idempotent = read_only or bool(hints is not None and hints.idempotent_hint)
    destructive = side_effects and (hints is None or hints.destructive_hint is not False)  # MCP presumes destructive
    approval = {"destructive": destructive, "side_effects": side_effects, "never": False}[server.approve]
    policy = server.overrides.get(remote.name, ToolPolicy())
    timeout = policy.timeout or server.call_timeout
    name = server.prefix + remote.name
    remote_name = remote.name

    async def call(**args: Any) -> str:
        return await tools.call(server.name, remote_name, name, args, timeout)

    description = one_line(remote.description or remote.title or "", 400)
    return McpTool(
        name=name,
        fn=call,
        description=f"[MCP {server.name}] {description}".rstrip(),
        args_model=_ANY_ARGS,
        wants_context=False,
        side_effects=policy.side_effects if policy.side_effects is not None else side_effects,
        idempotent=policy.idempotent if policy.idempotent is not None else idempotent,
        timeout=timeout + 5.0,  # the call's own timeout (below) answers first, with a clearer line
        output_cap=server.output_cap,
        needs_approval=policy.needs_approval if policy.needs_approval is not None else approval,
        on_rewind=policy.on_rewind,
        workspace_only=policy.workspace_only if policy.workspace_only is not None else server.workspace_only,
        server=server.name,
        remote_name=remote_name,
        input_schema=dict(remote.input_schema or {"type": "object"}),
    )


# ----------------------------------------------------------------------------- stdio transport


@asynccontextmanager
async def _stdio(argv: list[str], cwd: Path, env: dict[str, str], errlog: Any) -> AsyncIterator[tuple[Any, Any, "Process"]]:
    """The server as a subprocess speaking newline-delimited JSON-RPC, in its own process group; the
    SDK's stdio_client does the same but does not expose the process, whose exit code we report.
    On exit: stdin closed, STOP_GRACE_S to leave, then SIGTERM and SIGKILL to its whole group."""
    import anyio
    import mcp_types
    from anyio.streams.text import TextReceiveStream
    from mcp.shared.message import SessionMessage

    process = await anyio.open_process(argv, cwd=cwd, env=env, stderr=errlog, start_new_session=True)
    incoming_writer, incoming = anyio.create_memory_object_stream[Any](0)
    outgoing, outgoing_reader = anyio.create_memory_object_stream[Any](0)

    async def read() -> None:
        assert process.stdout is not None
        async with incoming_writer:
            buffer = ""
            try:
                async for chunk in TextReceiveStream(process.stdout, errors="replace"):
                    lines = (buffer + chunk).split("\n")
                    buffer = lines.pop()
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            item: Any = SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False))
                        except ValueError as exc:
                            item = exc  # a line that is not JSON-RPC: the session hears of it, the call goes on
                        await incoming_writer.send(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                pass

    async def write() -> None:
        assert process.stdin is not None
        try:
            async with outgoing_reader:
                async for message in outgoing_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await process.stdin.send(data.encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await incoming_writer.aclose()  # the server is gone: waiting calls hear "connection closed"

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        tg.start_soon(write)
        try:
            yield incoming, outgoing, process
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(process)
                await incoming.aclose()
                await outgoing.aclose()
            tg.cancel_scope.cancel()


async def _stop(process: "Process") -> None:
    import anyio

    if process.stdin is not None:
        try:
            await process.stdin.aclose()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        with anyio.move_on_after(STOP_GRACE_S):
            while process.returncode is None:
                await anyio.sleep(0.01)
        if process.returncode is not None:
            break
    try:  # anything the server left running in its group
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- connections


@dataclass
class _Connection:
    server: McpServer
    session: Any  # mcp.client.session.ClientSession
    process: "Process | None" = None
    stderr: Any = None  # a temporary file holding the server's stderr

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait_exit(self, seconds: float) -> int | None:
        deadline = asyncio.get_running_loop().time() + seconds
        while self.exit_code() is None and self.process is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return self.exit_code()

    def stderr_tail(self) -> str:
        return _tail(self.stderr)


def _tail(file: Any) -> str:
    if file is None:
        return ""
    try:
        file.flush()
        file.seek(0, os.SEEK_END)
        size = file.tell()
        file.seek(max(0, size - 4 * _STDERR_TAIL))
        text = file.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return redact(one_line(" | ".join(lines[-3:]), _STDERR_TAIL)) if lines else ""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"exited with code {code}"
    return f"exited with code {code}"


class McpTools:
    """The run's MCP servers: started together, their tools listed, closed together when the run ends.

    `failure` holds the first "server gone" line of the run: the engine ends the run with it at the
    next iteration boundary (the call that found it is recorded as a failed call).
    """

    def __init__(self, servers: list[McpServer], workspace: Path) -> None:
        self.servers = list(servers)
        self.workspace = Path(workspace)
        self.connections: dict[str, _Connection] = {}
        self.failure: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._connecting: McpServer | None = None

    # -- lifecycle

    async def start(self, taken: Collection[str] = ()) -> list[McpTool]:
        """Start every server, initialize it and list its tools; raises McpStartError with one line
        (and leaves nothing running) when any of them cannot."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[list[McpTool]] = loop.create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._own(ready, set(taken)), name="loopterm-mcp")
        try:
            return await asyncio.shield(ready)
        except asyncio.CancelledError:
            await self.close()
            raise

    async def _own(self, ready: "asyncio.Future[list[McpTool]]", taken: set[str]) -> None:
        """The one task that enters and exits every session (anyio's cancel scopes must not cross tasks)."""
        assert self._stop is not None
        try:
            async with AsyncExitStack() as stack:
                tools: list[McpTool] = []
                for server in self.servers:
                    self._connecting = server
                    tools += await self._connect(stack, server, taken | {t.name for t in tools})
                self._connecting = None
                if not ready.done():
                    ready.set_result(tools)
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), or (after it) the calls notice
            if not ready.done():
                found, server = _find(exc, McpStartError), self._connecting
                if found is None and server is not None:  # raised by a transport's own task (HTTP refused)
                    advice = "check the url in the loop file" if server.url else "check the command in the loop file"
                    found = McpStartError(f"MCP server {server.name!r} failed to start: {_describe(exc, server)} ({advice})")
                ready.set_exception(found or McpStartError(f"MCP servers failed to start: {_describe(exc, None)}"))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            for conn in self.connections.values():
                if conn.stderr is not None:
                    conn.stderr.close()

    async def _connect(self, stack: AsyncExitStack, server: McpServer, taken: set[str]) -> list[McpTool]:
        import anyio
        from mcp.client.session import ClientSession

        # The SDK logs a server's misbehaviour; with no handler configured Python would print it on the
        # terminal (over the TUI). What matters reaches the run as a classified error instead.
        logging.getLogger("mcp").addHandler(_QUIET)

        fail = f"MCP server {server.name!r} failed to start"
        advice = "check the url in the loop file" if server.url else "check the command in the loop file"
        conn = _Connection(server=server, session=None)
        try:
            if server.url is not None:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client

                # The SDK's own defaults (30 s to connect, 300 s to read a response stream), with the headers.
                http = httpx2.AsyncClient(headers=server.http_headers(), timeout=httpx2.Timeout(30.0, read=300.0))
                client = await stack.enter_async_context(http)
                read, write = await stack.enter_async_context(streamable_http_client(server.url, http_client=client))
            else:
                conn.stderr = tempfile.TemporaryFile()
                argv = server.argv(self.workspace)
                env = {**server.environment(), **{k: fill(v, self.workspace) for k, v in server.env.items()}}
                try:
                    read, write, conn.process = await stack.enter_async_context(
                        _stdio(argv, self.workspace, env, conn.stderr))
                except OSError as exc:
                    raise McpStartError(f"{fail}: cannot run {argv[0]!r} ({exc.strerror or exc}) ({advice})") from None
            self.connections[server.name] = conn
            conn.session = await stack.enter_async_context(ClientSession(read, write))
            with anyio.fail_after(server.startup_timeout):  # only around calls: scopes opened above stay open
                await conn.session.initialize()
                listed = await self._list(conn)
        except McpStartError:
            raise
        except TimeoutError:
            code = conn.exit_code()
            what = (f"it {_exit_text(code)} before it answered" if code is not None else
                    f"no answer to initialize within {server.startup_timeout:g}s")
            raise McpStartError(self._with_stderr(conn, f"{fail}: {what} ({advice})")) from None
        except Exception as exc:  # noqa: BLE001 - every other way to fail is one line
            code = await conn.wait_exit(0.5)
            if code is not None:
                what = f"it {_exit_text(code)} before it was initialized"
            else:
                what = _describe(exc, server)
            raise McpStartError(self._with_stderr(conn, f"{fail}: {what} ({advice})")) from None
        wanted = server.tools
        offered = {t.name: t for t in listed}
        if wanted is not None:
            missing = [n for n in wanted if n not in offered]
            if missing:
                raise McpStartError(
                    f"MCP server {server.name!r} has no tool {', '.join(repr(m) for m in missing[:5])} "
                    f"(it offers: {one_line(', '.join(sorted(offered)), 300)}); fix `tools=` in the loop file")
        unknown = sorted(set(server.overrides) - set(offered))
        if unknown:
            raise McpStartError(f"MCP server {server.name!r}: `overrides` names tools it does not offer: "
                                f"{', '.join(repr(u) for u in unknown[:5])}; fix the loop file")
        tools = [tool_for(server, t, self) for t in listed if wanted is None or t.name in wanted]
        for t in tools:
            if t.name in taken:
                raise McpStartError(f"MCP server {server.name!r} offers a tool named {t.name!r}, which the loop "
                                    "already has; give the server a `prefix` or list its `tools` in the loop file")
            if not t.name or len(t.name) > 200:
                raise McpStartError(f"MCP server {server.name!r} offers a tool whose name is empty or too long; "
                                    "list the tools to use with `tools=` in the loop file")
        return tools

    async def _list(self, conn: _Connection) -> list[Any]:
        import mcp_types

        listed: list[Any] = []
        cursor: str | None = None
        for _ in range(100):  # a server paging forever is refused below
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await conn.session.list_tools(params=params)
            listed += page.tools
            cursor = page.next_cursor
            if not cursor:
                return listed
        raise McpStartError(f"MCP server {conn.server.name!r} listed more than 100 pages of tools")

    def _with_stderr(self, conn: _Connection, line: str) -> str:
        tail = conn.stderr_tail()
        return f"{line}; its stderr: {tail}" if tail else line

    async def close(self) -> None:
        """End every session and stop every server process (bounded: a server that ignores its closed
        stdin is terminated, then killed)."""
        if self._task is None:
            return
        assert self._stop is not None
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=4 * STOP_GRACE_S + 5)
        except asyncio.CancelledError:  # the run itself is being cancelled: stop the servers now, then go on
            self._kill_all()
            self._task = None
            raise
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing must not fail a run's end
            self._kill_all()
        self._task = None

    def _kill_all(self) -> None:
        for conn in self.connections.values():
            if conn.process is not None and conn.process.returncode is None:
                try:
                    os.killpg(conn.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    # -- health and calls

    def check(self) -> str | None:
        """The first server that is gone (a failed call said so, or its process exited), as one line."""
        if self.failure is None:
            for conn in self.connections.values():
                code = conn.exit_code()
                if code is not None:
                    self.failure = f"MCP server {conn.server.name!r} {_exit_text(code)}"
                    break
            if self.failure is None and self._task is not None and self._task.done() and self.connections:
                self.failure = "the MCP sessions ended unexpectedly"
        return self.failure

    async def call(self, server: str, remote: str, name: str, args: dict[str, Any], timeout: float) -> str:
        from mcp.shared.exceptions import MCPError

        conn = self.connections[server]
        code = conn.exit_code()
        if code is not None or self.failure is not None:
            line = f"MCP server {server!r} {_exit_text(code)}" if code is not None else self.failure
            raise self._gone(conn, f"{line}; {name} was not called")
        try:
            result = await conn.session.call_tool(remote, args, read_timeout_seconds=timeout)
        except MCPError as exc:
            import mcp_types

            if exc.error.code == mcp_types.CONNECTION_CLOSED:
                code = await conn.wait_exit(STOP_GRACE_S)
                how = _exit_text(code) if code is not None else "closed its connection"
                raise self._gone(conn, f"MCP server {server!r} {how} during the call to {name} "
                                       "(it may or may not have taken effect)") from None
            if exc.error.code == mcp_types.REQUEST_TIMEOUT:
                raise McpToolError(f"MCP server {server!r} did not answer {name} within {timeout:g}s") from None
            raise McpToolError(f"MCP server {server!r}: {one_line(exc.error.message, 2_000)}") from None
        except (OSError, ConnectionError) as exc:
            raise self._gone(conn, f"MCP server {server!r} cannot be reached ({_describe(exc, conn.server)}) during "
                                   f"the call to {name} (it may or may not have taken effect)") from None
        text = _text(result)
        if result.is_error:
            raise McpToolError(text or f"{name} failed (the server gave no reason)")
        return text

    def _gone(self, conn: _Connection, line: str) -> McpServerGone:
        tail = conn.stderr_tail()
        line = f"{line}; its stderr: {tail}" if tail else line
        if self.failure is None:
            self.failure = line
        return McpServerGone(line)


def _text(result: Any) -> str:
    """A call's result as the text the model sees: text content joined, anything else named."""
    parts: list[str] = []
    for item in result.content or []:
        kind = getattr(item, "type", "")
        if kind == "text":
            parts.append(item.text)
        elif kind == "resource" and getattr(item.resource, "text", None) is not None:
            parts.append(item.resource.text)
        else:
            mime = getattr(item, "mime_type", None) or getattr(getattr(item, "resource", None), "mime_type", None)
            parts.append(f"[{kind or 'unknown'} content{f' ({mime})' if mime else ''} not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, sort_keys=True, default=str))
    return "\n".join(parts)


def _find(exc: BaseException, kind: type[Exception]) -> Exception | None:
    """`exc` or the first `kind` inside it (task groups wrap what passes through them in groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _describe(exc: BaseException, server: McpServer | None) -> str:
    """A connection failure in words: refused, not found, or the error's own message."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:  # an ExceptionGroup's first, a cause's root
        seen.append(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
            continue
        current = current.__cause__ or current.__context__
    root = seen[-1]
    text = one_line(redact(str(root) or root.__class__.__name__), 300)
    if isinstance(root, ConnectionRefusedError) or "refused" in text.lower() or "connect" in root.__class__.__name__.lower():
        return f"cannot connect to {(server.url if server else None) or 'it'} ({text})"
    return f"{root.__class__.__name__}: {text}"
