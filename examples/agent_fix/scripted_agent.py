"""A real ACP agent over stdio, driven by a JSON script: the peer every offline test of an agent loop uses.

    python -m loopterm.examples.agent_fix.scripted_agent SCRIPT.json

Script: {"turns": [[step, ...], ...]}. A prompt naming `iteration N` plays turns[N-1]; otherwise the Nth
prompt of the session plays turns[N-1]; past the end, the last turn. Steps:

  {"say": text}                     the reply, sent as 2+ chunks
  {"think": text}                   a thought
  {"plan": [{"content", "status"}]} the plan
  {"tool": {"id", "title", "kind", "locations", "status"}}  a tool call starts
  {"update": {"id", "status", "output"}}                    a tool call update (may precede its tool)
  {"edit": {"path", "text", "ask", "via_client", "on_reject", "offer"}}  an edit tool call with its diff; if
        ask, session/request_permission offering the kinds in "offer" (default: allow_once, allow_always,
        reject_once, reject_always); allowed: the file
        is written (by the agent itself, or through the client's fs/write_text_file when via_client);
        rejected: the call fails and on_reject "retry" asks again, forever; "stop" gives the edit up
  {"run": {"argv": [...]}}          an execute tool call that runs the command in the session's folder
  {"usage": {"tokens_in", "tokens_out", "cost_total", "context_used", "context_size"}}
  {"sleep": seconds}                cancellable
  {"noise": bytes}                  that many bytes written to stderr
  {"crash": true}                   exits with code 3 at once
  {"runaway": true}                 a tool call every 10 ms until cancelled
  {"ignore_cancel": true}           the rest of the turn ignores session/cancel
  {"stop": "end_turn" | "refusal" | "max_tokens"}

Sessions (the prompts and replies) are kept as JSON in $LOOPTERM_SCRIPTED_AGENT_SESSIONS (default: a
`.acp-sessions` folder next to the script), so another process can session/load one (its history is
replayed as message chunks) or session/fork it (copied under a new id). A line per step goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

from acp import (
    PROTOCOL_VERSION,
    RequestError,
    run_agent,
    text_block,
    tool_content,
    tool_diff_content,
    update_agent_message_text,
    update_agent_thought_text,
    update_user_message_text,
)
from acp.interfaces import Client
from acp.schema import (
    AgentCapabilities,
    AgentPlanUpdate,
    Cost,
    ForkSessionResponse,
    Implementation,
    InitializeResponse,
    LoadSessionResponse,
    NewSessionResponse,
    PermissionOption,
    PlanEntry,
    PromptResponse,
    SessionCapabilities,
    SessionForkCapabilities,
    ToolCallLocation,
    ToolCallProgress,
    ToolCallStart,
    ToolCallUpdate,
    Usage,
    UsageUpdate,
)

ITERATION = re.compile(r"\biteration (\d+)\b", re.IGNORECASE)
PERMISSION_KINDS = ("allow_once", "allow_always", "reject_once", "reject_always")


def log(line: str) -> None:
    sys.stderr.write(f"scripted-agent: {line}\n")
    sys.stderr.flush()


class _Session:
    def __init__(self, session_id: str, cwd: str, history: list[dict[str, str]]) -> None:
        self.id = session_id
        self.cwd = cwd
        self.history = history  # [{"role": "user"|"agent", "text": ...}]
        self.ignore_cancel = False
        self.steps: asyncio.Task[str] | None = None


class ScriptedAgent:
    def __init__(self, script: dict[str, Any], store: Path) -> None:
        self.turns: list[list[dict[str, Any]]] = script.get("turns") or [[]]
        self.store = store
        self.sessions: dict[str, _Session] = {}
        self.client: Client | None = None
        self.tokens = [0, 0]

    def on_connect(self, conn: Client) -> None:
        self.client = conn

    # ---- sessions ----

    async def initialize(self, protocol_version: int, client_capabilities: Any = None, **kw: Any) -> InitializeResponse:
        log(f"initialize (protocol {protocol_version})")
        return InitializeResponse(
            protocol_version=PROTOCOL_VERSION,
            agent_capabilities=AgentCapabilities(
                load_session=True, session_capabilities=SessionCapabilities(fork=SessionForkCapabilities())
            ),
            agent_info=Implementation(name="scripted-agent", version="1"),
        )

    async def new_session(self, cwd: str, mcp_servers: Any = None, **kw: Any) -> NewSessionResponse:
        session = self._add(uuid.uuid4().hex[:12], cwd, [])
        log(f"new session {session.id} in {cwd}")
        return NewSessionResponse(session_id=session.id)

    async def load_session(self, cwd: str, session_id: str, mcp_servers: Any = None, **kw: Any) -> LoadSessionResponse:
        history = self._read(session_id)
        session = self._add(session_id, cwd, history)
        log(f"load session {session_id}: replaying {len(history)} message(s)")
        assert self.client is not None
        for entry in history:
            update = (update_user_message_text if entry["role"] == "user" else update_agent_message_text)(entry["text"])
            await self.client.session_update(session_id=session_id, update=update)
        return LoadSessionResponse()

    async def fork_session(self, session_id: str, cwd: str, mcp_servers: Any = None, **kw: Any) -> ForkSessionResponse:
        source = self.sessions[session_id].history if session_id in self.sessions else self._read(session_id)
        session = self._add(uuid.uuid4().hex[:12], cwd, [dict(e) for e in source])
        log(f"fork session {session_id} -> {session.id}")
        return ForkSessionResponse(session_id=session.id)

    def _add(self, session_id: str, cwd: str, history: list[dict[str, str]]) -> _Session:
        session = _Session(session_id, cwd, history)
        self.sessions[session_id] = session
        self._save(session)
        return session

    def _read(self, session_id: str) -> list[dict[str, str]]:
        path = self.store / f"{session_id}.json"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", session_id) or not path.exists():
            raise RequestError.resource_not_found(f"session {session_id}")
        return json.loads(path.read_text())["history"]

    def _save(self, session: _Session) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        (self.store / f"{session.id}.json").write_text(json.dumps({"id": session.id, "history": session.history}))

    # ---- a turn ----

    async def cancel(self, session_id: str, **kw: Any) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.steps is None:
            return
        if session.ignore_cancel:
            log("cancel ignored")
            return
        log("cancel")
        session.steps.cancel()

    async def prompt(self, prompt: list[Any], session_id: str, **kw: Any) -> PromptResponse:
        session = self.sessions[session_id]
        text = "".join(getattr(block, "text", "") for block in prompt)
        found = ITERATION.search(text)
        number = int(found.group(1)) if found else 1 + sum(1 for e in session.history if e["role"] == "user")
        steps = self.turns[min(max(number, 1), len(self.turns)) - 1]
        log(f"prompt {number}: {len(steps)} step(s)")
        session.history.append({"role": "user", "text": text})
        reply: list[str] = []
        self.tokens = [0, 0]
        session.ignore_cancel = False
        playing = session.steps = asyncio.ensure_future(self._play(session, steps, reply))
        try:
            stop = await playing
        except asyncio.CancelledError:
            if not playing.cancelled():
                raise
            stop = "cancelled"
        finally:
            if session.steps is playing:
                session.steps = None
            session.history.append({"role": "agent", "text": "".join(reply)})
            self._save(session)
        log(f"turn ends: {stop}")
        usage = Usage(input_tokens=self.tokens[0], output_tokens=self.tokens[1], total_tokens=sum(self.tokens))
        return PromptResponse(stop_reason=stop, usage=usage)  # type: ignore[arg-type]

    async def _play(self, session: _Session, steps: list[dict[str, Any]], reply: list[str]) -> str:
        for number, step in enumerate(steps, 1):
            kind = next(iter(step))
            log(f"step {number}: {kind}")
            value = step[kind]
            if kind == "stop":
                return str(value)
            play = getattr(self, f"_step_{kind}", None)
            if play is None:
                raise RequestError.invalid_params({"details": f"the script's step {number} is unknown: {kind!r}"})
            await play(session, value, reply, number)
        return "end_turn"

    async def _send(self, session: _Session, update: Any) -> None:
        assert self.client is not None
        await self.client.session_update(session_id=session.id, update=update)

    async def _step_say(self, session: _Session, text: str, reply: list[str], n: int) -> None:
        half = max(len(text) // 2, 1) if text else 0
        for part in (text[:half], text[half:]):
            await self._send(session, update_agent_message_text(part))
        reply.append(text)

    async def _step_think(self, session: _Session, text: str, reply: list[str], n: int) -> None:
        await self._send(session, update_agent_thought_text(text))

    async def _step_plan(self, session: _Session, entries: list[dict[str, str]], reply: list[str], n: int) -> None:
        items = [PlanEntry(content=e["content"], status=e.get("status", "pending"), priority="medium") for e in entries]  # type: ignore[arg-type]
        await self._send(session, AgentPlanUpdate(session_update="plan", entries=items))

    async def _step_tool(self, session: _Session, tool: dict[str, Any], reply: list[str], n: int) -> None:
        locations = [ToolCallLocation(path=self._abs(session, p)) for p in tool.get("locations", [])]
        await self._send(
            session,
            ToolCallStart(
                session_update="tool_call",
                tool_call_id=tool["id"],
                title=tool.get("title", tool["id"]),
                kind=tool.get("kind", "other"),
                status=tool.get("status", "pending"),
                locations=locations or None,
            ),
        )

    async def _step_update(self, session: _Session, upd: dict[str, Any], reply: list[str], n: int) -> None:
        content = [tool_content(text_block(upd["output"]))] if "output" in upd else None
        await self._send(
            session,
            ToolCallProgress(
                session_update="tool_call_update", tool_call_id=upd["id"], status=upd.get("status"), content=content
            ),
        )

    async def _step_edit(self, session: _Session, edit: dict[str, Any], reply: list[str], n: int) -> None:
        assert self.client is not None
        path = self._abs(session, edit["path"])
        old = Path(path).read_text() if Path(path).is_file() else None
        call_id = f"edit-{n}"
        diff = tool_diff_content(path, edit["text"], old)
        await self._send(
            session,
            ToolCallStart(
                session_update="tool_call",
                tool_call_id=call_id,
                title=f"Edit {edit['path']}",
                kind="edit",
                status="pending",
                content=[diff],
                locations=[ToolCallLocation(path=path)],
            ),
        )
        while edit.get("ask"):
            kinds = edit.get("offer", PERMISSION_KINDS)
            options = [PermissionOption(option_id=f"opt-{k}", name=k.replace("_", " "), kind=k) for k in kinds]  # type: ignore[arg-type]
            answer = await self.client.request_permission(
                session_id=session.id,
                tool_call=ToolCallUpdate(tool_call_id=call_id, title=f"Edit {edit['path']}", kind="edit"),
                options=options,
            )
            outcome = answer.outcome
            chosen = outcome.option_id.removeprefix("opt-") if outcome.outcome == "selected" else "cancelled"
            log(f"permission answered: {chosen}")
            await self._progress(session, call_id, None, f"permission: {chosen}\n")
            if chosen.startswith("allow"):
                break
            await self._progress(session, call_id, "failed", "rejected\n")
            if edit.get("on_reject", "stop") != "retry":
                return
        try:
            if edit.get("via_client"):
                await self.client.write_text_file(session_id=session.id, path=path, content=edit["text"])
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(edit["text"])
        except (RequestError, OSError) as exc:
            log(f"write failed: {exc}")
            await self._progress(session, call_id, "failed", f"write failed: {exc}\n")
            return
        await self._progress(session, call_id, "completed", "written\n")

    async def _progress(self, session: _Session, call_id: str, status: str | None, output: str) -> None:
        await self._send(
            session,
            ToolCallProgress(
                session_update="tool_call_update",
                tool_call_id=call_id,
                status=status,  # type: ignore[arg-type]
                content=[tool_content(text_block(output))],
            ),
        )

    async def _step_run(self, session: _Session, run: dict[str, Any], reply: list[str], n: int) -> None:
        call_id = f"run-{n}"
        argv = [str(a) for a in run["argv"]]
        await self._send(
            session,
            ToolCallStart(
                session_update="tool_call", tool_call_id=call_id, title=" ".join(argv), kind="execute", status="in_progress"
            ),
        )
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=session.cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()
            raise
        status = "completed" if proc.returncode == 0 else "failed"
        await self._progress(session, call_id, status, out.decode("utf-8", "replace"))

    async def _step_usage(self, session: _Session, usage: dict[str, Any], reply: list[str], n: int) -> None:
        self.tokens[0] += int(usage.get("tokens_in", 0))
        self.tokens[1] += int(usage.get("tokens_out", 0))
        cost = Cost(amount=float(usage["cost_total"]), currency="USD") if "cost_total" in usage else None
        await self._send(
            session,
            UsageUpdate(
                session_update="usage_update",
                used=int(usage.get("context_used", 0)),
                size=int(usage.get("context_size", 200_000)),
                cost=cost,
            ),
        )

    async def _step_sleep(self, session: _Session, seconds: float, reply: list[str], n: int) -> None:
        await asyncio.sleep(float(seconds))

    async def _step_noise(self, session: _Session, size: int, reply: list[str], n: int) -> None:
        line = "x" * 99 + "\n"
        for _ in range(int(size) // 100):
            sys.stderr.write(line)
        sys.stderr.flush()

    async def _step_crash(self, session: _Session, value: Any, reply: list[str], n: int) -> None:
        log("crashing (exit 3)")
        self._save(session)
        os._exit(3)

    async def _step_runaway(self, session: _Session, value: Any, reply: list[str], n: int) -> None:
        i = 0
        while True:
            i += 1
            await self._step_tool(session, {"id": f"loop-{n}-{i}", "title": "ls", "kind": "read"}, reply, n)
            await asyncio.sleep(0.01)

    async def _step_ignore_cancel(self, session: _Session, value: Any, reply: list[str], n: int) -> None:
        session.ignore_cancel = bool(value)

    @staticmethod
    def _abs(session: _Session, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(session.cwd, path)


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m loopterm.examples.agent_fix.scripted_agent SCRIPT.json\n")
        raise SystemExit(2)
    script_path = Path(sys.argv[1]).resolve()
    try:
        script = json.loads(script_path.read_text())
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"scripted-agent: cannot read the script {script_path}: {exc}\n")
        raise SystemExit(2) from None
    store = Path(os.environ.get("LOOPTERM_SCRIPTED_AGENT_SESSIONS") or script_path.parent / ".acp-sessions")
    log(f"started with {script_path.name}")
    asyncio.run(run_agent(ScriptedAgent(script, store), use_unstable_protocol=True))


if __name__ == "__main__":
    main()
