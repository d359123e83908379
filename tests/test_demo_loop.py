"""The built-in `demo` loop: its parts, the headless escalation (exit 4), and the whole story with a person."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import LoopState, ToolContext, ToolRecord, runlog
from loopterm.core.control import AddFact, Approve, Command, Deny, Resume, command_payload
from loopterm.core.engine import Engine
from loopterm.core.events import ApprovalNeeded, EngineEvent, Escalated, StatusChanged
from loopterm.core.fold import fold
from loopterm.core.loader import load_loop
from loopterm.examples import BUILTIN_LOOPS, DEFAULT_LOOP
from loopterm.examples.demo import loop as demo
from loopterm.store import Store
from tests.loopkit import escalation_id, kinds, of

SHIPPED_TESTS = (demo.WORKSPACE / "test_solution.py").read_text(encoding="utf-8")
FACT = "only solution.py may change: the tests are the specification"


def ctx(workspace: Path) -> ToolContext:
    return ToolContext(run_id="r", iteration=1, workspace=workspace)


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    for shipped in demo.WORKSPACE.iterdir():
        if shipped.is_file():
            (ws / shipped.name).write_bytes(shipped.read_bytes())
    return ws


# ----------------------------------------------------------------------------- parts


def test_demo_is_registered_and_is_what_loopterm_runs_by_default() -> None:
    assert BUILTIN_LOOPS["demo"] == "loopterm.examples.demo.loop:loop" and DEFAULT_LOOP == "demo"
    loop, ref = load_loop("demo")
    assert (ref, loop.name, loop.model) == ("demo", "demo", "scripted/demo")
    assert [g.name for g in loop.gates] == ["compile", "tests", "changelog"]
    assert {t.name: t.needs_approval for t in loop.tools} == {
        "write_file": False, "read_file": False, "add_changelog_entry": True,
    }
    assert {i.name: i.remediation.value for i in loop.invariants} == {
        "solution_only": "escalate", "tools_keep_working": "change_strategy", "bounded_context": "prune_context",
    }


def test_demo_reuses_codefix_tools() -> None:
    from loopterm.examples.codefix import tools as codefix_tools

    assert demo.loop.tool("read_file") is codefix_tools.read_file
    assert demo.confine is codefix_tools.confine


def test_write_file_writes_solution_and_refuses_the_shipped_files(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    assert "wrote" in demo.write_file.fn(ctx(ws), path="solution.py", content="x = 1\n")
    assert (ws / "solution.py").read_text() == "x = 1\n"
    for path in ("test_solution.py", "./test_solution.py", "conftest.py", "CHANGELOG.md"):
        with pytest.raises(PermissionError, match="part of the task as shipped"):
            demo.write_file.fn(ctx(ws), path=path, content="def test_nothing(): pass\n")
    with pytest.raises(ValueError, match="outside|'..'"):
        demo.write_file.fn(ctx(ws), path="../escape.py", content="")
    assert (ws / "test_solution.py").read_text(encoding="utf-8") == SHIPPED_TESTS


def test_changelog_entry_is_added_once(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    first = demo.add_changelog_entry.fn(ctx(ws), entry="Add   to_roman.\n")
    again = demo.add_changelog_entry.fn(ctx(ws), entry="Add to_roman.")
    assert "added" in first and "already" in again
    text = (ws / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.count("- Add to_roman.") == 1 and text.index("## Unreleased") < text.index("- Add to_roman.")
    with pytest.raises(ValueError, match="empty"):
        demo.add_changelog_entry.fn(ctx(ws), entry="  ")


async def test_changelog_gate_wants_an_entry_under_unreleased(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    gate = next(g for g in demo.GATES if g.name == "changelog")
    before = await gate.run(ws)
    assert not before.passed and "no entry under '## Unreleased'" in before.feedback()
    demo.add_changelog_entry.fn(ctx(ws), entry="Add to_roman.")
    assert (await gate.run(ws)).passed


def test_solution_only_judges_the_latest_iteration_and_counts_refused_writes() -> None:
    inv = next(i for i in demo.INVARIANTS if i.name == "solution_only")
    state = demo.DemoState(iteration=3)
    state.tool_results.append(ToolRecord(iteration=3, tool="write_file", args={"path": "test_solution.py"}, ok=False))
    assert not inv.holds(state)
    later = state.model_copy(update={"iteration": 4})  # a person answered; the next iteration wrote nothing
    assert inv.holds(later)
    widened = state.model_copy(update={"allowed_files": ["solution.py", "test_solution.py"]})
    assert inv.holds(widened)
    assert inv.holds(LoopState())


# ----------------------------------------------------------------------------- headless

CLI = [sys.executable, "-m", "loopterm.tui.cli"]


def test_headless_no_wait_stops_at_the_escalation_with_exit_4(tmp_path: Path) -> None:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "160"}
    done = subprocess.run([*CLI, "run", "demo", "--headless", "--no-wait", "--db", str(tmp_path / "db.sqlite")],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    store = Store.open(tmp_path / "db.sqlite")
    (run,) = store.list_runs()
    assert (run.status, run.termination_reason, run.iterations) == ("escalated", "waiting_on_person", 3)
    escalated = of(store.events(run.id), runlog.Escalated)
    assert [i["name"] for i in escalated[0].failing_invariants] == ["solution_only"]
    assert (Path(run.workspace) / "test_solution.py").read_text(encoding="utf-8") == SHIPPED_TESTS


# ----------------------------------------------------------------------------- the whole story


def send(store: Store, engine: Engine, command: Command) -> None:
    store.add_command(engine.run_id, *command_payload(command))
    engine.wake()


def make_engine(tmp_path: Path) -> tuple[Engine, Store]:
    from loopterm.core.model import check_model

    loop = demo.loop
    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref="demo", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           wait_on_person=True, poll_interval=0.02)
    return engine, store


class Person:
    """Answers like a person at the TUI: a fact and resume for the escalation, verdicts for approvals."""

    def __init__(self, store: Store, engine: Engine, verdicts: list[str]) -> None:
        self.store, self.engine, self.verdicts = store, engine, list(verdicts)
        self.seen: list[EngineEvent] = []

    def __call__(self, event: EngineEvent) -> None:
        self.seen.append(event)
        if isinstance(event, StatusChanged) and event.status == "escalated" and "invariant" in event.message:
            send(self.store, self.engine, AddFact(fact=FACT))
            send(self.store, self.engine, Resume(escalation=escalation_id(self.store, self.engine.run_id)))
        elif isinstance(event, ApprovalNeeded):
            verdict = self.verdicts.pop(0)
            answer: Command = (Approve(key=event.key, reason="reads well") if verdict == "approve"
                               else Deny(key=event.key, reason="too long for a changelog line"))
            send(self.store, self.engine, answer)


async def test_the_whole_story_with_a_person_answering(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path)
    person = Person(store, engine, ["approve"])
    engine.subscribe(person)
    run = await asyncio.wait_for(engine.run(), 60)

    assert (run.status, run.termination_reason) == ("converged", "converged")
    records = store.iterations(run.id)
    assert len(records) == run.iterations == 7

    def gates(n: int) -> dict[str, bool]:
        return {g["name"]: g["passed"] for g in records[n - 1].gate_results}

    def prompt(n: int) -> str:
        return str(records[n - 1].prompt[-1]["content"])

    # 1 -> 2: the syntax error, fed back.
    assert gates(1) == {"compile": False}
    assert "gate 'compile' failed" in prompt(2) and "SyntaxError" in prompt(2)
    # 2 -> 3: the failing test, fed back.
    assert gates(2) == {"compile": True, "tests": False}
    assert "FAILED test_solution.py::test_subtractive_forms" in prompt(3)

    # 3: the attempt on the tests is refused by the tool, escalated, and answered by the person.
    three = records[2]
    assert three.tool_call is not None and three.tool_call["args"]["path"] == "test_solution.py"
    assert three.tool_result is not None and "PermissionError" in three.tool_result["error"]
    assert three.invariant_status["solution_only"] is False and three.remediations == ["escalate"]
    escalations = [e for e in person.seen if isinstance(e, Escalated)]
    assert [(e.n, [i["name"] for i in e.packet["failing_invariants"]]) for e in escalations] == [(3, ["solution_only"])]
    assert "escalated" in kinds(store.events(run.id))
    assert fold(store.events(run.id)).escalation is None  # answered
    assert FACT in prompt(4)
    assert (Path(run.workspace) / "test_solution.py").read_text(encoding="utf-8") == SHIPPED_TESTS

    # 4: a second failed tool call in a row; remediated with a change of strategy, seen by the next prompt.
    four = records[3]
    assert four.tool_result is not None and "FileNotFoundError" in four.tool_result["error"]
    assert four.invariant_status == {"solution_only": True, "tools_keep_working": False, "bounded_context": True}
    assert four.remediations == ["change_strategy"]
    assert "Strategy: the last approach broke invariant 'tools_keep_working'" in prompt(5)
    violated = [(e.iteration, e.event.invariant, e.event.remediation)
                for e in store.events(run.id) if isinstance(e.event, runlog.InvariantViolated)]
    assert violated == [(3, "solution_only", "escalate"), (4, "tools_keep_working", "change_strategy")]

    # 6: the right code; only the changelog is missing.
    assert gates(6) == {"compile": True, "tests": True, "changelog": False}
    # 7: the approved changelog entry; every gate passes.
    seven = records[6]
    assert seven.tool_call is not None and seven.tool_call["tool"] == "add_changelog_entry"
    assert seven.tool_call["approval"] == "approve"
    assert gates(7) == {"compile": True, "tests": True, "changelog": True}
    assert "- Add to_roman(n)" in (Path(run.workspace) / "CHANGELOG.md").read_text(encoding="utf-8")
    assert [e.kind for e in person.seen].count("approval_needed") == 1

    assert run.tokens_in > 0 and run.tokens_out > 0 and run.cost_usd > 0
    assert all(r.tokens_in > 0 and r.cost_usd > 0 for r in records)


async def test_a_denied_changelog_entry_is_fed_back_and_the_next_one_approved(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path)
    engine.subscribe(Person(store, engine, ["deny", "approve"]))
    run = await asyncio.wait_for(engine.run(), 60)
    assert (run.status, run.iterations) == ("converged", 8)
    seven, eight = store.iterations(run.id)[6:]
    assert seven.tool_call is not None and seven.tool_call["approval"] == "deny"
    assert seven.tool_result is not None and "denied by a person" in seven.tool_result["error"]
    assert "denied by a person: too long for a changelog line" in eight.prompt[-1]["content"]
    assert eight.tool_call is not None and eight.tool_call["approval"] == "approve"
    changelog: Any = (Path(run.workspace) / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "- Add to_roman(n) for 1..3999." in changelog and "subtractive" not in changelog
