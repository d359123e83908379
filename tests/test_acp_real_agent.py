"""End to end with a real coding agent: Claude Code through its ACP adapter, against fakellm (offline).

Needs `claude-agent-acp` on PATH (`npm install -g @agentclientprotocol/claude-agent-acp@0.49.0`, Node 20);
CI does not install npm packages, so there it is skipped. fakellm answers Claude Code's Anthropic
requests: the first asks for a Write tool call, the one carrying its result gets the final reply.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("acp")

if shutil.which("claude-agent-acp") is None:
    pytest.skip("claude-agent-acp is not installed (npm i -g @agentclientprotocol/claude-agent-acp)",
                allow_module_level=True)

from loopterm.core.acp_client import AcpSession  # noqa: E402
from loopterm.core.acp_turn import AgentPermission, AgentToolCall  # noqa: E402
from loopterm.core.agent_spec import AgentSpec  # noqa: E402



def claude_spec(server: Any, home: Path) -> AgentSpec:
    env = {
        "ANTHROPIC_BASE_URL": server.root,
        "ANTHROPIC_API_KEY": "sk-ant-loopterm-fake-key",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"  # Claude Code refuses to skip permission prompts as root otherwise
    return AgentSpec(name="claude", command=["claude-agent-acp"], env=env, turn_timeout_s=120)


async def test_claude_code_edits_a_file_after_permission(fakellm_server: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "greeting.txt"
    fakellm_server.set_rules([
        {"name": "cc-done", "when": {"tool_result_contains": "greeting.txt"},
         "respond": {"content": "I wrote greeting.txt."}},
        {"name": "cc-write", "when": {"messages_contain": "MARKER-ACP-7Q", "tools_include": "Write"},
         "respond": {"tool_calls": [{"name": "Write",
                                     "arguments": {"file_path": str(target), "content": "hello from claude\n"}}]}},
        {"name": "cc-other", "when": {}, "respond": {"content": "ok"}},
    ])
    asked: list[tuple[AgentToolCall, list[str]]] = []

    async def allow(call: AgentToolCall, offered: list[str]) -> AgentPermission:
        asked.append((call, offered))
        return AgentPermission(outcome="allow_once", decided_by="policy")

    session = await AcpSession.open(claude_spec(fakellm_server, tmp_path / "home"), work, permission=allow,
                                    stderr=tmp_path / "claude.stderr")
    try:
        turn = await session.prompt("MARKER-ACP-7Q: write greeting.txt saying hello")
    finally:
        await session.close()
    assert turn.stop_reason == "end_turn", (turn.note, (tmp_path / "claude.stderr").read_text()[-2000:])
    assert "I wrote greeting.txt." in turn.message
    assert target.read_text() == "hello from claude\n"
    (call,) = [c for c in turn.tool_calls if c.kind == "edit"]
    assert call.status == "completed" and call.locations == ["greeting.txt"]
    (seen, offered) = asked[0]  # Claude Code asked before writing; the callback saw the diff
    assert seen.diffs[0].path == "greeting.txt" and seen.diffs[0].new_text == "hello from claude\n"
    assert "allow_once" in offered
    (perm,) = turn.permissions
    assert perm.outcome == "allow_once" and perm.paths == ["greeting.txt"]  # never allow_always
    assert turn.usage.session_cost_usd is not None and turn.usage.cost_usd == turn.usage.session_cost_usd


async def test_claude_code_denied_does_not_write(fakellm_server: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "denied.txt"
    fakellm_server.set_rules([
        {"name": "cc-write", "when": {"messages_contain": "MARKER-ACP-8R", "tools_include": "Write"},
         "respond": {"tool_calls": [{"name": "Write",
                                     "arguments": {"file_path": str(target), "content": "nope\n"}}]}},
        {"name": "cc-other", "when": {}, "respond": {"content": "ok"}},
    ])

    async def deny(call: AgentToolCall, offered: list[str]) -> AgentPermission:
        return AgentPermission(outcome="reject_once", decided_by="person", reason="not that file")

    spec = claude_spec(fakellm_server, tmp_path / "home").model_copy(update={"max_tool_calls": 3})
    session = await AcpSession.open(spec, work, permission=deny, stderr=tmp_path / "claude.stderr")
    try:
        turn = await session.prompt("MARKER-ACP-8R: write denied.txt")
    finally:
        await session.close()
    assert not target.exists()
    assert turn.permissions and all(p.outcome == "reject_once" for p in turn.permissions)
    # fakellm asks for the Write again after every refusal (a runaway): the tool-call limit ends it
    assert turn.ended_by == "limit" and "max_tool_calls (3)" in turn.note
    assert turn.stop_reason == "cancelled" and session.alive is False  # Claude Code answered the cancel; closed
    assert len(turn.permissions) >= 3


@pytest.mark.slow  # three Claude Code processes: about 4 s
async def test_claude_code_session_loads_and_forks_in_new_processes(fakellm_server: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    fakellm_server.set_rules([
        {"name": "cc-second", "when": {"messages_contain": "SECOND-9T"}, "respond": {"content": "second reply"}},
        {"name": "cc-first", "when": {"messages_contain": "FIRST-9T"}, "respond": {"content": "first reply"}},
        {"name": "cc-other", "when": {}, "respond": {"content": "ok"}},
    ])

    async def allow(call: AgentToolCall, offered: list[str]) -> AgentPermission:
        return AgentPermission(outcome="allow_once", decided_by="policy")

    spec = claude_spec(fakellm_server, tmp_path / "home")
    first = await AcpSession.open(spec, work, permission=allow, stderr=tmp_path / "e1")
    try:
        one = await first.prompt("FIRST-9T hello")
    finally:
        await first.close()
    assert one.stop_reason == "end_turn" and "first reply" in one.message
    loaded = await AcpSession.open(spec, work, permission=allow, stderr=tmp_path / "e2",
                                   load_session_id=first.session_id)
    try:
        assert loaded.origin == "loaded" and loaded.session_id == first.session_id
        two = await loaded.prompt("SECOND-9T again")
    finally:
        await loaded.close()
    assert two.stop_reason == "end_turn" and two.message.strip() == "second reply"  # the replay is not the reply
    assert two.session_origin == "loaded"
    forked = await AcpSession.open(spec, work, permission=allow, stderr=tmp_path / "e3",
                                   fork_session_id=first.session_id)
    try:
        assert forked.origin == "forked" and forked.session_id != first.session_id
        three = await forked.prompt("SECOND-9T on the fork")
    finally:
        await forked.close()
    assert three.stop_reason == "end_turn" and "second reply" in three.message
