"""A person steers a running loop through the control channel: pause, step, edit, relax, approve, answer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import Invariant, LoopState, Remediation, ToolContext, tool
from loopterm.core.control import (
    AddFact,
    Approve,
    Command,
    Deny,
    EditState,
    Pause,
    Relax,
    Resume,
    SetSubgoal,
    Step,
    Stop,
    command_payload,
)
from loopterm.core.engine import Engine
from loopterm.core.events import ApprovalNeeded, IterationCommitted, StatusChanged
from loopterm.store import Store
from loopterm.core.fold import fold
from loopterm.core.runlog import CommandRejected, EscalationAnswered, StateEdited
from tests.loopkit import decision, kinds, make_engine, make_loop, of


pytestmark = pytest.mark.usefixtures("engine_store")  # every test on SQLite and on PostgreSQL


def many(k: int = 8) -> list:
    return [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(k)]


def send(store: Store, engine: Engine, command: Command) -> None:
    store.add_command(engine.run_id, *command_payload(command))
    engine.wake()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def committed(store: Store, run_id: str) -> int:
    return len(store.iterations(run_id))


async def test_pause_stops_new_iterations_step_runs_exactly_one(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=6), poll_interval=0.02)
    statuses: list[str] = []
    engine.subscribe(lambda e: statuses.append(e.status) if isinstance(e, StatusChanged) else None)
    engine.subscribe(lambda e: send(store, engine, Pause()) if isinstance(e, IterationCommitted) and e.record.n == 1 else None)
    task = asyncio.create_task(engine.run())
    await until(lambda: "paused" in statuses)
    await asyncio.sleep(0.3)
    assert committed(store, engine.run_id) == 1 and store.get_run(engine.run_id).status == "paused"

    send(store, engine, Step())
    await until(lambda: statuses.count("paused") == 2)
    await asyncio.sleep(0.3)
    assert committed(store, engine.run_id) == 2  # exactly one more

    send(store, engine, Resume())
    run = await asyncio.wait_for(task, 20)
    assert run.iterations == 6 and run.termination_reason == "max_iterations"
    assert statuses[:4] == ["paused", "stepping", "paused", "running"]


async def test_stop_while_paused(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many()), poll_interval=0.02)
    send(store, engine, Pause())
    task = asyncio.create_task(engine.run())
    await until(lambda: store.get_run(engine.run_id).status == "paused")
    send(store, engine, Stop(reason="not today"))
    run = await asyncio.wait_for(task, 10)
    assert (run.status, run.message, run.iterations) == ("stopped", "not today", 0)


async def test_state_edit_is_validated_persisted_and_seen_by_the_next_iteration(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=2))
    state = engine.state.model_dump(mode="json")
    send(store, engine, EditState(state={**state, "memory": {"facts": "not a list"}}, reason="oops", base_iteration=0))
    send(store, engine, EditState(state={**state, "memory": {**state["memory"], "facts": ["edited by a person"]}},
                                  reason="hint", base_iteration=0))
    run = await engine.run()
    first = store.iterations(run.id)[0]
    assert "edited by a person" in first.prompt[-1]["content"]
    events = store.events(run.id)
    rejected = of(events, CommandRejected)
    assert rejected and "memory.facts" in rejected[0].error
    assert [e.reason for e in of(events, StateEdited)] == ["hint"]


async def test_a_state_edit_survives_a_restart_before_the_next_iteration(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=1))
    await engine.run()
    run = store.get_run(engine.run_id)
    paused = Engine(engine.loop, store, run, workdir=tmp_path)
    store.add_command(run.id, *command_payload(AddFact(fact="remember the edge case")))
    store.add_command(run.id, *command_payload(SetSubgoal(subgoal="handle the edge case")))
    paused.steering.obey()
    store.update_run(run.id, max_iterations=2)
    again = Engine(engine.loop, store, store.get_run(run.id), workdir=tmp_path)  # a new process
    assert "remember the edge case" in again.state.memory.facts
    assert again.state.memory.subgoal == "handle the edge case"
    final = await again.run()
    assert "remember the edge case" in store.iterations(final.id)[1].prompt[-1]["content"]


def never_bad(state: LoopState) -> bool:
    return not any(r.args.get("text") == "bad" for r in state.tool_results[-1:])


async def test_relax_for_n_iterations_then_it_is_restored(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=never_bad, remediation=Remediation.ABORT)
    turns = [{"content": decision(text="bad", subgoal=f"s{i}")} for i in range(4)]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv], stall_window=9))
    send(store, engine, Relax(invariant="never_bad", reason="known false alarm", iterations=2))
    run = await engine.run()
    assert (run.status, run.iterations) == ("failed", 3)  # relaxed for 1 and 2; enforced again at 3
    records = store.iterations(run.id)
    assert [r.invariant_status["never_bad"] for r in records] == [False, False, False]
    assert [r.remediations for r in records] == [[], [], ["abort"]]
    logged = kinds(store.events(run.id))
    assert "invariant_relaxed" in logged and "invariant_restored" in logged


def approval_loop(tmp_path: Path, calls: list[str]):
    @tool(side_effects=True, needs_approval=True)
    def write(ctx: ToolContext, text: str) -> str:
        """Write flag.txt, after a person approves."""
        calls.append(text)
        (ctx.workspace / "flag.txt").write_text(text)
        return "written"

    return make_loop(tmp_path, [{"content": decision(text="ok")}, {"content": decision(text="ok", subgoal="again")}],
                     tools=[write])


async def test_approve_with_edited_arguments(tmp_path: Path) -> None:
    calls: list[str] = []
    engine, store = make_engine(tmp_path, approval_loop(tmp_path, calls), wait_on_person=True, poll_interval=0.02)
    engine.subscribe(lambda e: send(store, engine, Approve(key=e.key, args={"text": "ok"}, reason="fine"))
                     if isinstance(e, ApprovalNeeded) else None)
    run = await asyncio.wait_for(engine.run(), 10)
    assert run.status == "converged" and calls == ["ok"]
    record = store.iterations(run.id)[0]
    assert record.tool_call is not None and record.tool_call["approval"] == "approve"


async def test_deny_feeds_the_refusal_to_the_model_and_runs_nothing(tmp_path: Path) -> None:
    calls: list[str] = []
    engine, store = make_engine(tmp_path, approval_loop(tmp_path, calls), wait_on_person=True, poll_interval=0.02)
    approvals = iter([Deny(key="", reason="not on a Friday"), None])

    def answer(event: object) -> None:
        if isinstance(event, ApprovalNeeded):
            verdict = next(approvals)
            send(store, engine, verdict.model_copy(update={"key": event.key}) if verdict else Approve(key=event.key))

    engine.subscribe(answer)
    run = await asyncio.wait_for(engine.run(), 10)
    first, second = store.iterations(run.id)
    assert first.tool_result is not None and first.tool_result["error"] == "denied by a person: not on a Friday"
    assert "denied by a person: not on a Friday" in second.prompt[-1]["content"]
    assert calls == ["ok"] and run.status == "converged"


async def test_no_wait_ends_waiting_and_an_approval_sent_later_is_obeyed(tmp_path: Path) -> None:
    calls: list[str] = []
    loop = approval_loop(tmp_path, calls)
    engine, store = make_engine(tmp_path, loop)
    run = await engine.run()
    assert (run.status, run.termination_reason) == ("escalated", "waiting_on_person")
    pending = list(fold(store.events(run.id)).approvals)
    store.add_command(run.id, *command_payload(Approve(key=pending[0])))  # e.g. from `loopterm watch`
    resumed = await Engine(loop, store, store.get_run(run.id), workdir=tmp_path, client=None).run()
    assert resumed.status == "converged" and calls == ["ok"]


async def test_an_escalation_waits_for_a_person_who_answers_and_resumes(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=never_bad, remediation=Remediation.ESCALATE)
    turns = [{"content": decision(text="bad", subgoal="a")}, {"content": decision(text="ok", subgoal="b")}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv]), wait_on_person=True,
                                poll_interval=0.02)

    def answer(event: object) -> None:
        if isinstance(event, StatusChanged) and event.status == "escalated":
            send(store, engine, AddFact(fact="do not write bad"))
            send(store, engine, Resume(escalation=engine.view.escalation.event_id))

    engine.subscribe(answer)
    run = await asyncio.wait_for(engine.run(), 10)
    assert run.status == "converged" and run.iterations == 2
    assert "do not write bad" in store.iterations(run.id)[1].prompt[-1]["content"]


async def test_malformed_command_is_refused_without_harm(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=1))
    store.add_command(engine.run_id, "relax", {"invariant": "x"})  # no reason
    store.add_command(engine.run_id, "frobnicate", {})
    run = await engine.run()
    assert run.iterations == 1
    assert len(of(store.events(run.id), CommandRejected)) == 2


# -- a person's input is never lost or misapplied ------------------------------------------------------------


async def test_a_stale_state_edit_is_refused_and_never_rolls_the_run_back(tmp_path: Path) -> None:
    """The dialog showed iteration 1's state; the run went on to 3; the edit, sent unchanged, must not be
    adopted as iteration 3's state (it was, silently, before the typed log: the facts went back)."""
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=6), poll_interval=0.02)
    seen: dict[str, Any] = {}

    def on(event: object) -> None:
        if isinstance(event, IterationCommitted) and event.record.n == 1:
            seen["state"] = event.record.state  # what a person's editor showed
        if isinstance(event, IterationCommitted) and event.record.n == 3:
            send(store, engine, EditState(state=seen["state"], reason="looks fine", base_iteration=1))
            send(store, engine, Pause())

    engine.subscribe(on)
    task = asyncio.create_task(engine.run())
    await until(lambda: store.get_run(engine.run_id).status == "paused")
    facts_before = list(engine.state.memory.facts)
    rejected = of(store.events(engine.run_id), CommandRejected)
    assert rejected and rejected[0].command == "edit_state"
    assert "moved from iteration 1 to 3" in rejected[0].error
    assert of(store.events(engine.run_id), StateEdited) == []
    assert engine.state.iteration == 3 and engine.state.memory.facts == facts_before and len(facts_before) >= 3
    send(store, engine, Stop())
    await asyncio.wait_for(task, 10)


async def test_an_edit_based_on_the_current_iteration_but_an_older_patch_is_refused(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=1))
    state = engine.state.model_dump(mode="json")
    send(store, engine, AddFact(fact="someone else's fact"))
    send(store, engine, EditState(state=state, reason="mine", base_iteration=0, base_version=0))
    engine.steering.obey()
    rejected = of(store.events(engine.run_id), CommandRejected)
    assert rejected and "changed by someone else" in rejected[0].error
    assert "someone else's fact" in engine.state.memory.facts


async def test_an_escalation_stays_pending_through_stop_and_resume_waits_again(tmp_path: Path) -> None:
    """`q` (a stop) while the run escalates: the escalation is not turned into "stopped" and forgotten."""
    inv = Invariant(name="never_bad", check=never_bad, remediation=Remediation.ESCALATE)
    turns = [{"content": decision(text="bad", subgoal="a")}, {"content": decision(text="ok", subgoal="b")}]
    loop = make_loop(tmp_path, turns, invariants=[inv])
    engine, store = make_engine(tmp_path, loop, wait_on_person=True, poll_interval=0.02)
    engine.subscribe(lambda e: engine.request_stop("loopterm quit")
                     if isinstance(e, StatusChanged) and e.status == "escalated" else None)
    run = await asyncio.wait_for(engine.run(), 10)
    assert run.status == "stopped" and run.iterations == 1
    pending = fold(store.events(run.id)).escalation
    assert pending is not None and pending.iteration == 1  # still waits on a person
    listed = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "runs", "--json", "--db", str(store.path)],
                            capture_output=True, text=True, check=True).stdout
    assert [(r["status"], r["waiting"]) for r in json.loads(listed)] == [("stopped", True)]
    shown = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "show", run.id, "--db", str(store.path)],
                           capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "⚑ waits on a person: the escalation at iteration 1" in shown
    again = await Engine(loop, store, store.get_run(run.id), workdir=tmp_path).run()  # `resume --no-wait`
    assert (again.status, again.termination_reason, again.iterations) == ("escalated", "waiting_on_person", 1)
    send(store, again_engine := Engine(loop, store, store.get_run(run.id), workdir=tmp_path), Resume())  # bare
    store.add_command(run.id, *command_payload(Resume(escalation=pending.event_id)))
    final = await asyncio.wait_for(again_engine.run(), 10)
    assert final.status == "converged" and final.iterations == 2
    events = store.events(run.id)
    assert [e.escalation for e in of(events, EscalationAnswered)] == [pending.event_id]
    assert any("waits on a person's answer" in r.error for r in of(events, CommandRejected))


async def test_an_answer_to_something_no_longer_pending_is_refused(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=1))
    send(store, engine, Approve(key="k-nobody-asked"))
    send(store, engine, Resume(escalation=12345))
    run = await engine.run()
    errors = [r.error for r in of(store.events(run.id), CommandRejected)]
    assert any("no call waits for that answer" in e for e in errors)
    assert any("already answered" in e for e in errors)


async def test_a_crash_between_consuming_and_applying_a_command_loses_nothing(tmp_path: Path) -> None:
    """Consuming a command and recording what it did commit together: a crash in between (here, the event
    write failing) leaves the command pending, and the next engine applies it."""
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=1))
    store.add_command(engine.run_id, *command_payload(AddFact(fact="do not lose me")))
    original = store._insert_event

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt("killed")

    store._insert_event = crash  # type: ignore[method-assign]
    try:
        engine.steering.obey()
    except KeyboardInterrupt:
        pass
    store._insert_event = original  # type: ignore[method-assign]
    assert [c.kind for c in store.pending_commands(engine.run_id)] == ["add_fact"]  # not consumed
    again = Engine(engine.loop, store, store.get_run(engine.run_id), workdir=tmp_path)
    run = await again.run()
    assert "do not lose me" in store.iterations(run.id)[0].prompt[-1]["content"]


async def test_loopterm_answer_answers_an_escalation_without_a_screen(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=never_bad, remediation=Remediation.ESCALATE)
    turns = [{"content": decision(text="bad", subgoal="a")}, {"content": decision(text="ok", subgoal="b")}]
    loop = make_loop(tmp_path, turns, invariants=[inv])
    engine, store = make_engine(tmp_path, loop)
    run = await engine.run()
    assert run.status == "escalated"

    def answer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "answer", run.id, *args, "--db", str(store.path)],
                              capture_output=True, text=True)

    refused = answer("--approve")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "no tool call waiting" in refused.stderr
    done = answer("--fact", "never write bad")
    assert done.returncode == 0, done.stderr
    assert "answered the escalation at iteration 1" in done.stdout
    final = await Engine(loop, store, store.get_run(run.id), workdir=tmp_path).run()
    assert final.status == "converged" and final.iterations == 2
    assert "never write bad" in store.iterations(run.id)[1].prompt[-1]["content"]
    assert answer().returncode == 2  # nothing waits any more
