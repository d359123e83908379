"""A loop whose actor is an ACP coding agent (issue 18), driven end to end against the scripted ACP agent
(examples/agent_fix/scripted_agent.py, a real agent process over stdio built with the protocol's SDK):
permissions through approvals, paths, stop, limits, a crash and session/load, budgets, branches."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.acp_turn import AgentTurn
from loopterm.core.agent_spec import AgentSpec
from loopterm.core.budget import Budget
from loopterm.core.control import Approve, Deny, Stop, command_payload
from loopterm.core.engine import Engine
from loopterm.core.events import ApprovalNeeded, EngineEvent, IterationStarted
from loopterm.core.fold import fold
from loopterm.core.fork import create_fork, plan_fork, rebuild_workspace
from loopterm.core.gates import CommandGate
from loopterm.core.loop import Loop
from loopterm.store import Store

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the scripted agent is a POSIX process")

BROKEN = "def answer() -> int:\n    return 41\n"
FIXED = "def answer() -> int:\n    return 42\n"
GATE = CommandGate(name="answer", argv=["{python}", "-B", "-c", "import sol, sys; sys.exit(sol.answer() != 42)"])


def edit(text: str, *, ask: bool = True, path: str = "sol.py", **more: Any) -> dict[str, Any]:
    return {"edit": {"path": path, "text": text, "ask": ask, "via_client": True, **more}}


def agent_loop(tmp_path: Path, turns: list[list[dict[str, Any]]], **fields: Any) -> Loop:
    script = tmp_path / "agent-script.json"
    script.write_text(json.dumps({"turns": turns}))
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    (files / "sol.py").write_text(BROKEN)
    spec = {"name": "scripted", "paths": ["sol.py"], "turn_timeout_s": 20.0,
            "command": [sys.executable, "-m", "loopterm.examples.agent_fix.scripted_agent", str(script)],
            "env": {"LOOPTERM_SCRIPTED_AGENT_SESSIONS": str(tmp_path / "sessions")}, **fields.pop("spec", {})}
    return Loop(name="agentloop", goal="make answer() return 42", agent=AgentSpec(**spec), gates=[GATE],
                workspace_files=files, max_iterations=fields.pop("max_iterations", 4), **fields)


def engine_for(tmp_path: Path, loop: Loop, **kwargs: Any) -> tuple[Engine, Store]:
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref="test:agentloop", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           poll_interval=0.02, **kwargs)
    return engine, store


def answering(store: Store, engine: Engine, verdicts: list[str]) -> Any:
    """A person at the inbox: answers each permission in turn (approve / deny)."""
    pending = iter(verdicts)

    def on(event: EngineEvent) -> None:
        if isinstance(event, ApprovalNeeded):
            verdict = next(pending)
            command = Approve(key=event.key) if verdict == "approve" else Deny(key=event.key, reason="not that")
            store.add_command(engine.run_id, *command_payload(command))
            engine.wake()

    return on


def turns_of(store: Store, run_id: str) -> dict[int, AgentTurn]:
    return fold(store.events(run_id)).agent_turns


def git_log(workspace: Path) -> list[str]:
    out = subprocess.run(["git", "log", "--format=%s"], cwd=workspace, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


async def test_permissions_go_through_approvals_and_the_gates_decide(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [
        [edit(FIXED), {"say": "done, trust me"}, {"usage": {"tokens_in": 100, "tokens_out": 20, "cost_total": 0.01}}],
        [edit(FIXED), {"usage": {"tokens_in": 150, "tokens_out": 30, "cost_total": 0.025}}],
    ])
    engine, store = engine_for(tmp_path, loop, wait_on_person=True)
    engine.subscribe(answering(store, engine, ["deny", "approve"]))
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.status == "converged" and run.iterations == 2  # the agent's "done" in turn 1 decided nothing
    turns = turns_of(store, run.id)
    first, second = turns[1], turns[2]
    assert [(p.outcome, p.decided_by) for p in first.permissions] == [("reject_once", "person")]
    assert first.changed_paths == [] and "done, trust me" in first.message
    assert [(p.outcome, p.decided_by) for p in second.permissions] == [("allow_once", "person")]
    assert second.changed_paths == ["sol.py"] and "+    return 42" in second.diff
    assert "Refused in your last turn:\n- Edit sol.py: not that" in second.prompt  # why, which ACP cannot say
    assert second.commit is not None and second.base_commit == first.commit
    assert Path(run.workspace, "sol.py").read_text() == FIXED
    assert len(git_log(Path(run.workspace))) == 3  # the baseline and one commit per turn
    from loopterm.core.fold import news
    from loopterm.core.runlog import ApprovalPending

    said = [news(r) for r in store.events(run.id) if isinstance(r.event, ApprovalPending)]
    assert [n.text for n in said if n] == ["the agent asks permission: Edit sol.py (x shows the diff; a / d)"] * 2
    # What the agent reported counts: the run's totals and its iterations, the turn's cost as its delta.
    assert (second.usage.cost_usd, second.usage.tokens_in) == (pytest.approx(0.015), 150)
    assert run.cost_usd == pytest.approx(0.025) and run.tokens_in == 250
    iterations = store.iterations(run.id)
    assert [it.model for it in iterations] == ["agent/scripted", "agent/scripted"]
    assert iterations[0].tool_result is not None and iterations[0].tool_result["output"].startswith("end_turn")
    state = iterations[1].state
    assert state["changed_paths"] == ["sol.py"] and state["commit"] == second.commit


async def test_a_path_outside_the_agents_paths_is_refused_without_asking(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[edit("x = 1\n", path="other.py"), edit(FIXED)]])
    engine, store = engine_for(tmp_path, loop, wait_on_person=True)
    engine.subscribe(answering(store, engine, ["approve"]))  # asked once: for sol.py only
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.status == "converged"
    permissions = turns_of(store, run.id)[1].permissions
    assert [(p.paths, p.outcome, p.decided_by) for p in permissions] == [
        (["other.py"], "reject_once", "paths"), (["sol.py"], "allow_once", "person")]
    assert not Path(run.workspace, "other.py").exists()


async def test_a_change_the_agent_made_on_its_own_outside_its_paths_violates_the_invariant(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[edit(FIXED, ask=False, via_client=False), edit("", ask=False, via_client=False,
                                                                                   path="notes.txt")]])
    engine, store = engine_for(tmp_path, loop)
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.termination_reason == "waiting_on_person"  # escalated: gates passed, the invariant did not hold
    record = store.iterations(run.id)[0]
    assert record.invariant_status["agent-paths"] is False
    assert sorted(turns_of(store, run.id)[1].changed_paths) == ["notes.txt", "sol.py"]


async def test_headless_without_a_policy_refuses_permissions_and_says_why(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[edit(FIXED)]], max_iterations=1)
    engine, store = engine_for(tmp_path, loop)  # no person waits
    run = await asyncio.wait_for(engine.run(), 60)
    (permission,) = turns_of(store, run.id)[1].permissions
    assert (permission.outcome, permission.decided_by) == ("reject_once", "headless")
    assert run.termination_reason == "max_iterations"
    assert not fold(store.events(run.id)).approvals  # nothing left pending that no one was asked


async def test_stop_during_a_turn_cancels_it_and_the_turn_is_kept(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"say": "thinking"}, {"sleep": 30}, edit(FIXED, ask=False)]])
    engine, store = engine_for(tmp_path, loop)

    def stop_soon(event: EngineEvent) -> None:
        if isinstance(event, IterationStarted):
            asyncio.get_running_loop().call_later(1.0, lambda: (store.add_command(
                engine.run_id, *command_payload(Stop(reason="enough"))), engine.wake()))

    engine.subscribe(stop_soon)
    started = asyncio.get_running_loop().time()
    run = await asyncio.wait_for(engine.run(), 60)
    assert asyncio.get_running_loop().time() - started < 15  # not the 30 s the agent meant to sleep
    assert run.status == "stopped"
    turn = turns_of(store, run.id)[1]
    assert (turn.stop_reason, turn.ended_by) == ("cancelled", "person") and "thinking" in turn.message
    assert Path(run.workspace, "sol.py").read_text() == BROKEN


async def test_a_runaway_turn_is_stopped_by_its_limit_and_recorded_as_such(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"runaway": True}]], max_iterations=1, spec={"max_tool_calls": 5})
    engine, store = engine_for(tmp_path, loop)
    run = await asyncio.wait_for(engine.run(), 60)
    turn = turns_of(store, run.id)[1]
    assert turn.ended_by == "limit" and "max_tool_calls" in turn.note
    result = store.iterations(run.id)[0].tool_result
    assert result is not None and result["ok"] is False and "limit" in result["error"]


async def test_a_crashed_agent_is_reopened_with_session_load(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"say": "about to fall over"}, {"crash": True}], [edit(FIXED, ask=False)]])
    engine, store = engine_for(tmp_path, loop)
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.status == "converged" and run.iterations == 2
    first, second = turns_of(store, run.id)[1], turns_of(store, run.id)[2]
    assert first.ended_by == "crash"
    assert second.session_origin == "loaded" and second.session_id == first.session_id


async def test_a_resumed_run_loads_the_agents_session_in_a_new_process(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"say": "first"}], [edit(FIXED, ask=False)]], max_iterations=1)
    engine, store = engine_for(tmp_path, loop)
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.termination_reason == "max_iterations"
    store.update_run(run.id, max_iterations=3)
    resumed = await asyncio.wait_for(
        Engine(loop, store, store.get_run(run.id), workdir=tmp_path, poll_interval=0.02).run(), 60)
    assert resumed.status == "converged"
    turns = turns_of(store, run.id)
    assert turns[2].session_origin == "loaded" and turns[2].session_id == turns[1].session_id


async def test_the_agents_reported_cost_ends_the_turn_at_the_budget(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"usage": {"cost_total": 0.5}}, {"sleep": 30}]], budget=Budget(usd=0.2))
    engine, store = engine_for(tmp_path, loop)
    run = await asyncio.wait_for(engine.run(), 60)
    turn = turns_of(store, run.id)[1]
    assert turn.ended_by == "budget" and turn.stop_reason == "cancelled"
    assert run.termination_reason == "budget_usd" and run.cost_usd == pytest.approx(0.5)
    by_model = {t.key: t.cost_usd for t in store.spend_by("model")}  # the ledger, so the daily budget, counts it
    assert by_model == {"agent/scripted": pytest.approx(0.5)}


async def test_a_branch_restores_the_workspace_at_its_fork_point(tmp_path: Path) -> None:
    third = "def answer() -> int:\n    return 43\n"
    loop = agent_loop(tmp_path, [[edit(third, ask=False)], [edit(FIXED, ask=False), {"run": {"argv": ["true"]}}]])
    engine, store = engine_for(tmp_path, loop)
    parent = await asyncio.wait_for(engine.run(), 60)
    assert parent.status == "converged" and parent.iterations == 2
    plan = plan_fork(store, loop, parent, 1)
    # The agent's own shell command in turn 2 is what the branch's agent may run again: the person is asked.
    assert [(c.n, c.tool, c.args["command"], c.policy) for c in plan.may_repeat] == [(2, "agent shell", "true", "ask")]
    branch = create_fork(store, loop, plan, run_id="branch1", workspace=tmp_path / "ws" / "branch1")
    await rebuild_workspace(loop, store, branch)
    assert Path(branch.workspace, "sol.py").read_text() == third  # as after iteration 1, not as the parent ended
    run = await asyncio.wait_for(Engine(loop, store, branch, workdir=tmp_path, poll_interval=0.02).run(), 60)
    assert run.status == "converged" and run.iterations == 2  # the branch's first turn was turn 2's
    turn = turns_of(store, branch.id)[2]
    # The parent's session went on past iteration 1: the branch's agent is told what turn 1 did instead.
    assert turn.session_origin == "seeded" and turn.prompt.startswith("loopterm iteration 2 of")
    assert "- iteration 1: end_turn" in turn.prompt and "changed sol.py" in turn.prompt
    assert Path(branch.workspace, "sol.py").read_text() == FIXED
    assert Path(parent.workspace, "sol.py").read_text() == FIXED


async def test_a_branch_at_the_parents_last_turn_forks_the_agents_session(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"say": "looked around"}], [edit(FIXED, ask=False)]], max_iterations=1)
    engine, store = engine_for(tmp_path, loop)
    parent = await asyncio.wait_for(engine.run(), 60)
    plan = plan_fork(store, loop, parent, 1)
    branch = create_fork(store, loop, plan, run_id="branch2", workspace=tmp_path / "ws" / "branch2")
    store.update_run(branch.id, max_iterations=3)
    await rebuild_workspace(loop, store, branch)
    run = await asyncio.wait_for(
        Engine(loop, store, store.get_run(branch.id), workdir=tmp_path, poll_interval=0.02).run(), 60)
    assert run.status == "converged"
    turn = turns_of(store, branch.id)[2]
    assert turn.session_origin == "forked" and turn.session_id != turns_of(store, parent.id)[1].session_id


def test_the_loop_in_docs_agents_md_is_a_valid_agent_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "AGENTS.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(block, "AGENTS.md", "exec"), scope)
    loop = scope["loop"]
    assert loop.agent.command == ["claude-agent-acp"] and loop.model == "agent/claude"
    assert [t.name for t in loop.tools] == ["agent"] and "agent-paths" in [i.name for i in loop.invariants]
    assert loop.agent.allows("src/pkg/mod.py") and not loop.agent.allows("tests/test_x.py")


def test_a_loop_with_an_agent_refuses_tools_of_its_own() -> None:
    from loopterm.core import tool

    @tool
    def noop() -> str:
        """Nothing."""
        return ""

    with pytest.raises(ValueError, match="has no tools or MCP servers of its own"):
        Loop(name="x", goal="g", agent=AgentSpec(command=["agent"]), tools=[noop])


async def test_a_replay_drives_the_loop_with_the_recorded_agent(tmp_path: Path) -> None:
    from loopterm.core.replay import replay

    loop = agent_loop(tmp_path, [
        [{"think": "look first"}, {"plan": [{"content": "fix it", "status": "in_progress"}]}, edit("x = 0\n"),
         {"usage": {"tokens_in": 10, "cost_total": 0.01}}, {"say": "first try"}],
        [edit(FIXED), {"run": {"argv": ["true"]}}, {"usage": {"tokens_in": 20, "cost_total": 0.03}}],
    ])
    engine, store = engine_for(tmp_path, loop, wait_on_person=True)
    engine.subscribe(answering(store, engine, ["deny", "approve"]))
    recorded = await asyncio.wait_for(engine.run(), 60)
    assert recorded.status == "converged" and recorded.iterations == 2
    (tmp_path / "agent-script.json").write_text(json.dumps({"turns": [[{"crash": True}]]}))  # the agent is not asked
    report = await asyncio.wait_for(replay(store, loop, recorded, run_id="replay1", workspace=tmp_path / "ws" / "r1",
                                           workdir=tmp_path), 60)
    assert report.identical, report.divergence
    replayed, original = turns_of(store, "replay1"), turns_of(store, recorded.id)
    assert [t.agent for t in replayed.values()] == ["recorded", "recorded"]
    for n in (1, 2):
        assert replayed[n].changed_paths == original[n].changed_paths and replayed[n].diff == original[n].diff
        assert [(p.outcome, p.decided_by) for p in replayed[n].permissions] == [
            (p.outcome, "person") for p in original[n].permissions]  # the recording's answers, given again
        assert [c.title for c in replayed[n].tool_calls] == [c.title for c in original[n].tool_calls]
    assert replayed[1].thoughts == "look first" and replayed[1].plan == original[1].plan
    assert Path(tmp_path / "ws" / "r1" / "sol.py").read_text() == FIXED
    assert store.get_run("replay1").cost_usd == pytest.approx(0.03)


async def test_the_turn_is_shown_live_and_recorded_without_secrets(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-live-" + "q" * 40
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # loopterm knows it; the agent echoes it (it should not have it)
    loop = agent_loop(tmp_path, [[{"say": f"my key is {secret}"}, {"sleep": 0.3}, edit(FIXED, ask=False)]])
    engine, store = engine_for(tmp_path, loop)
    live: list[Any] = []
    engine.subscribe(lambda event: live.append(event) if type(event).__name__ == "AgentTurnProgress" else None)
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.status == "converged" and live and live[0].n == 1
    assert all(secret not in e.turn.message for e in live) and any("my key is" in e.turn.message for e in live)
    turn = turns_of(store, run.id)[1]
    assert "my key is" in turn.message and secret not in turn.message
    stored = b"".join(p.read_bytes() for p in Path(store.path).parent.glob(Path(store.path).name + "*"))
    assert b"my key is" in stored or b"x\x9c" in stored  # the turn is there (its state bodies may be packed)
    assert secret.encode() not in stored


async def test_pause_during_a_turn_cancels_it_and_resume_goes_on(tmp_path: Path) -> None:
    from loopterm.core.control import Pause, Resume
    from loopterm.core.events import StatusChanged

    loop = agent_loop(tmp_path, [[{"say": "slow"}, {"sleep": 30}], [edit(FIXED, ask=False)]])
    engine, store = engine_for(tmp_path, loop, wait_on_person=True)

    def person(event: EngineEvent) -> None:
        def send(command: Any) -> None:
            store.add_command(engine.run_id, *command_payload(command))
            engine.wake()

        if isinstance(event, IterationStarted) and event.n == 1:
            asyncio.get_running_loop().call_later(1.0, send, Pause())
        if isinstance(event, StatusChanged) and event.status == "paused":
            asyncio.get_running_loop().call_later(0.2, send, Resume())

    engine.subscribe(person)
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.status == "converged" and run.iterations == 2
    turn = turns_of(store, run.id)[1]
    assert (turn.stop_reason, turn.ended_by, turn.note) == ("cancelled", "person", "paused by a person")


async def test_an_agent_that_answers_its_prompt_with_an_error_ends_the_run_in_one_line(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[{"say": "x"}, {"no_such_step": True}]])
    engine, store = engine_for(tmp_path, loop)
    run = await asyncio.wait_for(engine.run(), 60)
    assert run.termination_reason == "fatal_error" and run.iterations == 1  # not prompted again and again
    turn = turns_of(store, run.id)[1]
    assert turn.ended_by == "error" and "no_such_step" in turn.note
    assert run.message is not None and "answered the prompt with an error" in run.message
    assert f"loopterm resume {run.id}" in run.message


async def test_a_person_deciding_slowly_does_not_count_against_the_turns_time_limit(tmp_path: Path) -> None:
    loop = agent_loop(tmp_path, [[edit(FIXED)]], spec={"turn_timeout_s": 1.0})
    engine, store = engine_for(tmp_path, loop, wait_on_person=True)

    def slow_person(event: EngineEvent) -> None:
        if isinstance(event, ApprovalNeeded):
            asyncio.get_running_loop().call_later(2.5, lambda: (store.add_command(
                engine.run_id, *command_payload(Approve(key=event.key))), engine.wake()))

    engine.subscribe(slow_person)
    # Nor does the executor's own bound on a tool call cut a turn short while a person decides.
    assert engine.loop.tool("agent").timeout >= 24 * 3600  # type: ignore[union-attr]
    run = await asyncio.wait_for(engine.run(), 60)
    turn = turns_of(store, run.id)[1]
    assert turn.ended_by == "agent" and [p.outcome for p in turn.permissions] == ["allow_once"]
    assert run.status == "converged"


async def test_what_gates_leave_behind_is_never_the_agents_change_in_a_worktree_too(tmp_path: Path) -> None:
    from loopterm.core import agent_git
    from loopterm.core.worktree import git

    base = tmp_path / "base"
    base.mkdir()
    (base / "sol.py").write_text(BROKEN)
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-q", "-m", "base")):  # as core/worktree.py makes it
        await git(*args, cwd=base)
    base_commit = await agent_git.head(base)
    await git("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), cwd=base)  # a case's worktree
    for workspace in (tmp_path / "wt", base):
        start = await agent_git.ensure_repo(workspace)
        assert start == base_commit
        (workspace / "__pycache__").mkdir()
        (workspace / "__pycache__" / "sol.cpython-311.pyc").write_bytes(b"\0")
        (workspace / ".pytest_cache").mkdir()
        (workspace / ".pytest_cache" / "x").write_text("x")
        (workspace / "sol.py").write_text(FIXED)
        _, changed, diff = await agent_git.commit_turn(workspace, start, "turn")
        assert changed == ["sol.py"] and "+    return 42" in diff
