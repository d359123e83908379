"""The recorded agent: an ACP agent that answers a replay from a run's journal, never from a model.

    python -m loopterm.core.acp_replay TURNS.json

`loopterm replay` of an agent loop starts this instead of the loop's agent (core/replay.py): for the
prompt of iteration N it plays the turn the recording kept for N (thoughts, plan, tool calls with their
diffs and output, the permission requests it made, usage, the reply, the stop reason), applies the turn's
recorded change to the workspace (`git apply` of the commit's diff) and ends the turn as the recording
did. A prompt that differs from the recording's is refused (stop reason `refusal`, saying so): the replay
shows where the loop's change made it diverge, it does not invent a turn. A turn that crashed crashes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from loopterm.core.acp_turn import AgentTurn

ITERATION = re.compile(r"\bloopterm iteration (\d+)\b")
PERMISSION_KINDS = ("allow_once", "allow_always", "reject_once", "reject_always")


def write_turns(path: Path, turns: dict[int, AgentTurn]) -> Path:
    """The file the recorded agent reads: the recording's turns by iteration."""
    path.write_text(json.dumps({str(n): t.model_dump(mode="json") for n, t in turns.items()}))
    return path


class RecordedAgent:
    def __init__(self, turns: dict[int, AgentTurn]) -> None:
        self.turns = turns
        self.client: Any = None
        self.cwd: dict[str, str] = {}
        self.session_cost = 0.0
        self.cancelled: set[str] = set()

    def on_connect(self, conn: Any) -> None:
        self.client = conn

    async def initialize(self, protocol_version: int, client_capabilities: Any = None, **kw: Any) -> Any:
        from acp import PROTOCOL_VERSION
        from acp.schema import AgentCapabilities, Implementation, InitializeResponse

        return InitializeResponse(protocol_version=PROTOCOL_VERSION,
                                  agent_capabilities=AgentCapabilities(load_session=True),
                                  agent_info=Implementation(name="loopterm-recorded-agent", version="1"))

    async def new_session(self, cwd: str, mcp_servers: Any = None, **kw: Any) -> Any:
        from acp.schema import NewSessionResponse

        session_id = f"recorded-{uuid.uuid4().hex[:8]}"
        self.cwd[session_id] = cwd
        return NewSessionResponse(session_id=session_id)

    async def load_session(self, cwd: str, session_id: str, mcp_servers: Any = None, **kw: Any) -> Any:
        from acp.schema import LoadSessionResponse

        self.cwd[session_id] = cwd  # the recording holds no conversation to replay: its turns are the record
        return LoadSessionResponse()

    async def cancel(self, session_id: str, **kw: Any) -> None:
        self.cancelled.add(session_id)

    async def prompt(self, prompt: list[Any], session_id: str, **kw: Any) -> Any:
        from acp.schema import PromptResponse, Usage

        text = "".join(getattr(block, "text", "") for block in prompt)
        found = ITERATION.search(text)
        turn = self.turns.get(int(found.group(1))) if found else None
        if turn is None:
            await self._say(session_id, "the recording has no agent turn for this prompt")
            return PromptResponse(stop_reason="refusal")
        if not turn.prompt.startswith(text):  # a branch's first recorded prompt ends with its summary
            await self._say(session_id, "the prompt differs from the recording's for this iteration; nothing was "
                                        "replayed")
            return PromptResponse(stop_reason="refusal")
        self.cancelled.discard(session_id)
        stop = await self._play(session_id, turn)
        u = turn.usage
        return PromptResponse(stop_reason=stop, usage=Usage(  # type: ignore[arg-type]
            input_tokens=u.tokens_in, output_tokens=u.tokens_out, total_tokens=u.tokens_in + u.tokens_out,
            cached_read_tokens=u.tokens_cached or None))

    async def _play(self, session_id: str, turn: AgentTurn) -> str:
        from acp import update_agent_message_text, update_agent_thought_text
        from acp.schema import AgentPlanUpdate, Cost, PlanEntry, UsageUpdate

        if turn.thoughts:
            await self._send(session_id, update_agent_thought_text(turn.thoughts))
        if turn.plan:
            await self._send(session_id, AgentPlanUpdate(session_update="plan", entries=[
                PlanEntry(content=p.content, status=p.status, priority=p.priority)  # type: ignore[arg-type]
                for p in turn.plan]))
        for call in turn.tool_calls:
            await self._send(session_id, self._call(session_id, call))
            if session_id in self.cancelled:
                return "cancelled"
        for asked in turn.permissions:
            await self._ask(session_id, turn, asked.tool_call_id)
        if turn.ended_by == "crash":
            os._exit(3)
        if turn.diff and not self._apply(session_id, turn.diff):
            await self._say(session_id, "the recorded changes do not apply to the workspace as the replay left it")
            return "refusal"
        if turn.usage.cost_usd or turn.usage.context_size:
            self.session_cost += turn.usage.cost_usd
            await self._send(session_id, UsageUpdate(
                session_update="usage_update", used=turn.usage.context_used or 0, size=turn.usage.context_size or 0,
                cost=Cost(amount=self.session_cost, currency="USD")))
        if turn.message:
            await self._send(session_id, update_agent_message_text(turn.message))
        return turn.stop_reason or "end_turn"

    def _call(self, session_id: str, call: Any) -> Any:
        from acp import text_block, tool_content, tool_diff_content
        from acp.schema import ToolCallLocation, ToolCallStart

        content: list[Any] = [tool_diff_content(self._abs(session_id, d.path), d.new_text, d.old_text)
                              for d in call.diffs]
        if call.output:
            content.append(tool_content(text_block(call.output)))
        locations = [ToolCallLocation(path=self._abs(session_id, p)) for p in call.locations]
        return ToolCallStart(session_update="tool_call", tool_call_id=call.id, title=call.title,
                             kind=call.kind, status=call.status, content=content or None,  # type: ignore[arg-type]
                             locations=locations or None)

    async def _ask(self, session_id: str, turn: AgentTurn, call_id: str) -> None:
        from acp.schema import PermissionOption, ToolCallUpdate

        call = next((c for c in turn.tool_calls if c.id == call_id), None)
        options = [PermissionOption(option_id=k, name=k.replace("_", " "), kind=k)  # type: ignore[arg-type]
                   for k in PERMISSION_KINDS]
        await self.client.request_permission(session_id=session_id, options=options, tool_call=ToolCallUpdate(
            tool_call_id=call_id, title=call.title if call else None, kind=call.kind if call else None))

    def _apply(self, session_id: str, diff: str) -> bool:
        if "more characters not kept]" in diff[-200:]:
            return False  # cut when it was recorded: it cannot be applied
        done = subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], input=diff.encode(), capture_output=True,
                              cwd=self.cwd.get(session_id) or ".", check=False)
        return done.returncode == 0

    async def _say(self, session_id: str, text: str) -> None:
        from acp import update_agent_message_text

        await self._send(session_id, update_agent_message_text(text))

    async def _send(self, session_id: str, update: Any) -> None:
        await self.client.session_update(session_id=session_id, update=update)

    def _abs(self, session_id: str, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.cwd.get(session_id, "."), path)


def main() -> None:
    from acp import run_agent

    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m loopterm.core.acp_replay TURNS.json\n")
        raise SystemExit(2)
    data = json.loads(Path(sys.argv[1]).read_text())
    turns = {int(n): AgentTurn.model_validate(t) for n, t in data.items()}
    asyncio.run(run_agent(RecordedAgent(turns)))


if __name__ == "__main__":
    main()
