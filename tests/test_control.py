"""A person steers a running loop through the control channel: pause, step, edit, relax, approve, answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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
from tests.loopkit import decision, make_engine, make_loop


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
    send(store, engine, EditState(state={**state, "memory": {"facts": "not a list"}}, reason="oops"))
    send(store, engine, EditState(state={**state, "memory": {**state["memory"], "facts": ["edited by a person"]}},
                                  reason="hint"))
    run = await engine.run()
    first = store.iterations(run.id)[0]
    assert "edited by a person" in first.prompt[-1]["content"]
    events = store.events(run.id)
    rejected = [e for e in events if e.kind == "command_rejected"]
    assert rejected and "memory.facts" in rejected[0].data["error"]
    assert [e.data["reason"] for e in events if e.kind == "state_edited"] == ["hint"]


async def test_a_state_edit_survives_a_restart_before_the_next_iteration(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, many(), max_iterations=1))
    await engine.run()
    run = store.get_run(engine.run_id)
    paused = Engine(engine.loop, store, run, workdir=tmp_path)
    paused._apply(AddFact(fact="remember the edge case"))
    paused._apply(SetSubgoal(subgoal="handle the edge case"))
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
    kinds = [e.kind for e in store.events(run.id)]
    assert "invariant_relaxed" in kinds and "invariant_restored" in kinds


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
    pending = [e for e in store.events(run.id) if e.kind == "approval_pending"]
    store.add_command(run.id, *command_payload(Approve(key=pending[0].data["key"])))  # e.g. from `loopterm watch`
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
            send(store, engine, Resume())

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
    assert len([e for e in store.events(run.id) if e.kind == "command_rejected"]) == 2
