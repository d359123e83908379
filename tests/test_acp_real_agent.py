"""End to end with a real coding agent: Claude Code through its ACP adapter, against fakellm (offline).

Needs `claude-agent-acp` on PATH (`npm install -g @agentclientprotocol/claude-agent-acp@0.49.0`, Node 20);
CI does not install npm packages, so there it is skipped. fakellm answers Claude Code's Anthropic
requests: the first asks for a Write tool call, the one carrying its result gets the final reply.
The client alone (AcpSession), then the built-in agent-fix loop on the engine with Claude Code as its agent
(the gates decide, permissions go through the engine's approvals), then `loopterm run agent-fix --agent`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
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
from loopterm.core.control import Approve, command_payload  # noqa: E402
from loopterm.core.engine import Engine  # noqa: E402
from loopterm.core.events import ApprovalNeeded, EngineEvent  # noqa: E402
from loopterm.core.fold import fold  # noqa: E402
from loopterm.core.loader import load_loop  # noqa: E402
from loopterm.core.loop import Loop  # noqa: E402
from loopterm.core.records import RunRecord  # noqa: E402
from loopterm.store import Store  # noqa: E402



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


# --- The built-in agent-fix loop, driven by Claude Code: the engine, the approvals, the gates ---------------

WRONG_MEDIAN = '''"""Small statistics helpers (the agent-fix example's code under repair)."""


def median(values: list[float]) -> float:
    """The middle value of `values` (the mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of an empty list")
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
'''
RIGHT_MEDIAN = '''"""Small statistics helpers (the agent-fix example's code under repair)."""


def median(values: list[float]) -> float:
    """The middle value of `values` (the mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of an empty list")
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
'''


def agent_fix_with_claude(server: Any, home: Path) -> tuple[Loop, str]:
    """The built-in loop as shipped (goal, gates, paths, limits) with Claude Code as its agent: only the command,
    the name and the environment change (the agent gets only declared variables, so they go in the spec)."""
    loop, ref = load_loop("agent-fix")
    assert loop.agent is not None
    claude = claude_spec(server, home)
    spec = loop.agent.model_copy(update={"name": claude.name, "command": claude.command, "env": claude.env})
    return loop.model_copy(update={"agent": spec}), ref


def agent_fix_engine(server: Any, tmp_path: Path, loop: Loop | None = None,
                     **kwargs: Any) -> tuple[Engine, Store, list[ApprovalNeeded]]:
    """An engine for a new agent-fix run, with a person at the inbox approving every question it asks
    (ApprovalNeeded -> Approve, as the TUI's dialog and `loopterm answer` send it)."""
    built, ref = agent_fix_with_claude(server, tmp_path / "home")
    loop = loop or built
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=tmp_path / "ws", workdir=tmp_path,
                           poll_interval=0.02, wait_on_person=True, **kwargs)
    asked: list[ApprovalNeeded] = []

    def person(event: EngineEvent) -> None:
        if isinstance(event, ApprovalNeeded):
            asked.append(event)
            store.add_command(engine.run_id, *command_payload(Approve(key=event.key)))
            engine.wake()

    engine.subscribe(person)
    return engine, store, asked


def read(path: Path) -> dict[str, Any]:
    return {"tool_calls": [{"name": "Read", "arguments": {"file_path": str(path)}}]}


def write(path: Path, content: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "Write", "arguments": {"file_path": str(path), "content": content}}]}


def claude_stderr(run: RunRecord) -> str:
    path = Path(run.workspace).parent / f"{run.id}.agent-stderr.log"
    return path.read_text()[-3000:] if path.exists() else ""


async def test_agent_fix_driven_by_claude_code_converges_when_the_gates_pass(fakellm_server: Any,
                                                                             tmp_path: Path) -> None:
    engine, store, asked = agent_fix_engine(fakellm_server, tmp_path)
    stats = engine.workspace / "stats.py"
    # One session, so one fakellm conversation; `turn` counts its requests. Claude Code reads a file before it
    # may write it (else its Write fails without asking), and keeps what it read for the next prompt turn.
    fakellm_server.set_rules([
        # iteration 1: a fix that sorts and forgets the even count, then "done" (which decides nothing)
        {"name": "cc-read", "when": {"turn": 1}, "respond": read(stats)},
        {"name": "cc-sort", "when": {"turn": 2}, "respond": write(stats, WRONG_MEDIAN)},
        {"name": "cc-done", "when": {"turn": 3}, "respond": {"content": "median sorts its input. All done."}},
        # iteration 2: its prompt carries the gate's failure; Claude Code writes the right median
        {"name": "cc-fix", "when": {"turn": 4, "messages_contain": "test_even_count"},
         "respond": write(stats, RIGHT_MEDIAN)},
        {"name": "cc-fixed", "when": {"turn": 5}, "respond": {"content": "median handles an even count now."}},
        {"name": "cc-other", "when": {}, "respond": {"content": "ok"}},
    ])
    run = await asyncio.wait_for(engine.run(), 120)
    assert run.status == "converged" and run.iterations == 2, (run.termination_reason, fakellm_server.stats(),
                                                               claude_stderr(run))
    first, second = store.iterations(run.id)
    assert [g["passed"] for g in first.gate_results] == [False]  # "All done" after turn 1 decided nothing
    assert "test_even_count" in second.prompt[0]["content"]  # turn 2 was told the gate's failure
    assert fakellm_server.hits("cc-fix") == 1
    turns = fold(store.events(run.id)).agent_turns
    assert "All done" in turns[1].message
    for n, fix in ((1, WRONG_MEDIAN), (2, RIGHT_MEDIAN)):
        turn = turns[n]
        assert turn.stop_reason == "end_turn" and turn.session_id == turns[1].session_id  # one session, two turns
        (call,) = [c for c in turn.tool_calls if c.title == "Write stats.py"]
        assert call.kind == "edit" and call.status == "completed" and call.diffs[0].new_text in fix
        assert [(p.paths, p.outcome, p.decided_by) for p in turn.permissions] == [
            (["stats.py"], "allow_once", "person")]
        assert turn.changed_paths == ["stats.py"] and turn.commit and turn.commit != turn.base_commit
    assert turns[2].base_commit == turns[1].commit
    assert "+    return (ordered[middle - 1] + ordered[middle]) / 2" in turns[2].diff
    # The person was asked once a turn, through the engine's approvals, and saw the change.
    assert [(a.n, a.tool, a.args["paths"]) for a in asked] == [(1, "acp.permission", ["stats.py"]),
                                                               (2, "acp.permission", ["stats.py"])]
    assert "+    return (ordered[middle - 1] + ordered[middle]) / 2" in asked[1].args["diff"]
    # Claude Code sends a write's new text only: the old side the person sees is the file as it is.
    assert asked[0].args["diff"].startswith("--- a/stats.py") and "-    return values[len(values) // 2]" in \
        asked[0].args["diff"]
    assert Path(run.workspace, "stats.py").read_text() == RIGHT_MEDIAN
    # Claude Code's reported cost (cumulative over its session) is each iteration's delta and the run's total.
    costs = [turns[n].usage.cost_usd for n in (1, 2)]
    assert all(c > 0 for c in costs) and turns[2].usage.session_cost_usd == pytest.approx(sum(costs))
    assert [it.cost_usd for it in (first, second)] == pytest.approx(costs)
    assert run.cost_usd == pytest.approx(sum(costs))
    assert run.tokens_out == sum(t.usage.tokens_out for t in turns.values()) > 0
    assert [it.model for it in (first, second)] == ["agent/claude", "agent/claude"]


async def test_agent_fix_refuses_claude_codes_write_outside_its_paths_before_asking(
        fakellm_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Started the way `--agent claude-agent-acp` starts it (the run's model "agent:CMD"): the loop's spec with
    # that command and none of its `env`; what Claude Code needs reaches it only as names in `env_from`.
    loop, ref = agent_fix_with_claude(fakellm_server, tmp_path / "home")
    assert loop.agent is not None
    needed = claude_spec(fakellm_server, tmp_path / "home").env
    for name, value in needed.items():
        monkeypatch.setenv(name, value)
    declared = loop.agent.model_copy(update={"env_from": sorted(needed)})
    engine, store, asked = agent_fix_engine(fakellm_server, tmp_path, max_iterations=1, model="agent:claude-agent-acp",
                                            loop=loop.model_copy(update={"agent": declared}))
    assert engine.loop.agent is not None and engine.loop.agent.env == {}  # `--agent` dropped the loop's env
    tests = engine.workspace / "test_stats.py"
    before = tests.read_text()
    fakellm_server.set_rules([
        {"name": "cc-read", "when": {"turn": 1}, "respond": read(tests)},
        {"name": "cc-cheat", "when": {"turn": 2}, "respond": write(tests, "def test_nothing() -> None:\n    pass\n")},
        {"name": "cc-other", "when": {}, "respond": {"content": "I may not change the tests."}},
    ])
    run = await asyncio.wait_for(engine.run(), 120)
    assert run.termination_reason == "max_iterations", (run.termination_reason, claude_stderr(run))
    turn = fold(store.events(run.id)).agent_turns[1]
    (permission,) = turn.permissions
    assert (permission.paths, permission.outcome, permission.decided_by) == (["test_stats.py"], "reject_once", "paths")
    assert "outside the paths the agent may change (stats.py)" in permission.reason
    assert asked == []  # refused before anyone was asked
    (call,) = [c for c in turn.tool_calls if c.kind == "edit"]
    assert call.status == "failed"  # Claude Code was told no and did not write
    assert tests.read_text() == before and turn.changed_paths == []
    assert fakellm_server.hits("cc-other") >= 1  # it went on after the refusal and ended its turn
    assert [it.model for it in store.iterations(run.id)] == ["agent/claude-agent-acp"]


@pytest.mark.slow  # a loopterm process and Claude Code: about 5 s
def test_loopterm_run_agent_fix_with_agent_claude_reaches_the_provider_through_declared_variables(
        fakellm_server: Any, tmp_path: Path) -> None:
    """`loopterm run agent-fix --headless --agent claude-agent-acp` as a person types it, with Claude Code's
    provider set up in their shell: agent-fix declares the provider's key and endpoint in env_from (copied
    only when set), so Claude Code reaches its provider; the key is in neither the store nor the output."""
    home = tmp_path / "home"
    home.mkdir()
    claude_env = claude_spec(fakellm_server, home).env
    env = {**os.environ, **claude_env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "120"}
    fakellm_server.set_rules([{"name": "cc-any", "when": {}, "respond": {"content": "ok"}}])
    db = tmp_path / "lt.db"
    done = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "run", "agent-fix", "--headless", "--no-wait",
                           "--agent", "claude-agent-acp", "--max-iterations", "1", "--db", str(db)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "model agent:claude-agent-acp" in done.stdout, done.stdout + done.stderr
    assert fakellm_server.hits("cc-any") >= 1  # the declared ANTHROPIC_BASE_URL reached Claude Code
    with Store.open(db) as store:
        (run,) = store.list_runs()
        turn = fold(store.events(run.id)).agent_turns[1]
    assert run.model == "agent:claude-agent-acp" and run.termination_reason == "max_iterations"  # the gate said no
    assert turn.stop_reason == "end_turn" and turn.ended_by == "agent" and "ok" in turn.message
    assert claude_env["ANTHROPIC_API_KEY"] not in db.read_bytes().decode("latin-1")
    assert claude_env["ANTHROPIC_API_KEY"] not in done.stdout + done.stderr
