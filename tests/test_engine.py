"""The engine reaches every termination reason, applies every remediation, and never overspends."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopterm.core import Budget, Invariant, LoopState, Remediation
from loopterm.core.events import Escalated, IterationCommitted

from loopterm.core.engine import Engine
from loopterm.core.runlog import RunFinished
from tests.loopkit import decision, kinds, make_engine, make_loop, of


def bad_then_ok() -> list:
    return [{"content": decision(text="no", subgoal="try no")}, {"content": decision(text="ok", subgoal="try ok")}]


async def test_converges_when_gates_pass_and_feeds_gate_failure_forward(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, bad_then_ok()))
    run = await engine.run()
    assert (run.status, run.termination_reason, run.iterations) == ("converged", "converged", 2)
    first, second = store.iterations(run.id)
    assert first.gate_results[0]["passed"] is False
    assert "flag is no" in second.prompt[-1]["content"]  # stderr of the failed gate reached the next prompt
    assert second.state["termination_reason"] == "converged"
    assert second.state == engine.state.model_dump(mode="json")  # the incremental dump is exact
    assert len(second.state["tool_results"]) == 2
    assert run.tokens_in > 0 and run.tokens_out > 0 and run.cost_usd > 0
    assert run.cost_usd == pytest.approx(first.cost_usd + second.cost_usd)


async def test_model_saying_done_is_not_convergence(tmp_path: Path) -> None:
    turns = [{"content": decision(text="no", done=True, confidence=1.0)}]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, after_end="repeat_last", max_iterations=2, stall_window=5))
    run = await engine.run()
    assert run.status == "terminated" and run.termination_reason == "max_iterations"


async def test_max_iterations(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(5)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, max_iterations=3))
    run = await engine.run()
    assert (run.status, run.termination_reason, run.iterations) == ("terminated", "max_iterations", 3)


async def test_token_budget_stops_before_the_call(tmp_path: Path) -> None:
    engine, store = make_engine(tmp_path, make_loop(tmp_path, bad_then_ok(), budget=Budget(tokens=50)))
    run = await engine.run()
    assert run.termination_reason == "budget_tokens" and run.iterations == 0
    assert run.tokens_in + run.tokens_out == 0  # no call was made at all


async def test_usd_budget_stops_before_a_call_would_exceed_it(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(6)], max_iterations=6)
    probe, _ = make_engine(tmp_path / "probe", loop)
    tokens, cost = probe.client.estimate([{"role": "user", "content": "x" * 4000}], loop.max_output_tokens)
    cap = cost * 1.5  # room for about one call, not two
    engine, _ = make_engine(tmp_path, loop.model_copy(update={"budget": Budget(usd=cap)}))
    run = await engine.run()
    assert run.termination_reason == "budget_usd"
    assert 1 <= run.iterations < 6
    assert run.cost_usd <= cap


async def test_wall_time_budget(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}"), "delay": 0.3} for i in range(6)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, budget=Budget(wall_seconds=0.2)))
    run = await engine.run()
    assert run.termination_reason == "budget_wall_time" and run.iterations == 1


async def test_stalled_on_repeated_action(tmp_path: Path) -> None:
    turns = [{"content": decision(text="no", subgoal=f"s{i}")} for i in range(6)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, stall_window=3))
    run = await engine.run()
    assert run.termination_reason == "stalled" and run.iterations == 3
    assert "same action" in (run.message or "")


async def test_stall_detection_can_be_turned_off(tmp_path: Path) -> None:
    turns = [{"content": decision(text="no", subgoal="same")} for _ in range(5)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, stall_window=None, max_iterations=5))
    run = await engine.run()
    assert (run.termination_reason, run.iterations) == ("max_iterations", 5)


async def test_stalled_on_same_subgoal(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal="same")} for i in range(6)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, stall_window=3))
    run = await engine.run()
    assert run.termination_reason == "stalled" and "subgoal" in (run.message or "")


async def test_stalled_when_verification_never_changes(tmp_path: Path) -> None:
    from loopterm.core import CommandGate

    same_failure = CommandGate(name="lint", argv=["{python}", "-c", "import sys; print('E501 line too long'); sys.exit(1)"])
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(6)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, gates=[same_failure], stall_window=3))
    run = await engine.run()
    assert run.termination_reason == "stalled" and run.iterations == 3
    assert "identical verification results" in (run.message or "")


async def test_identical_tool_output_without_gates_is_not_a_stall(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(6)]
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, turns, gates=[], stall_window=3, max_iterations=5))
    run = await engine.run()
    assert run.termination_reason == "max_iterations" and run.iterations == 5


async def test_fatal_error_on_auth_failure(tmp_path: Path) -> None:
    turns = [{"error": {"status": 401, "message": "bad key"}}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns))
    run = await engine.run()
    assert (run.status, run.termination_reason) == ("failed", "fatal_error")
    assert run.iterations == 0 and store.iterations(run.id) == []


async def test_stopped_by_a_person_through_the_control_channel(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(6)]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns))

    def stop_after_first(event: object) -> None:
        if isinstance(event, IterationCommitted) and event.record.n == 1:
            store.add_command(event.record.run_id, "stop", {"reason": "enough"})

    engine.subscribe(stop_after_first)
    run = await engine.run()
    assert (run.status, run.termination_reason, run.iterations, run.message) == ("stopped", "stopped", 1, "enough")
    assert store.pending_commands(run.id) == []


def flag_is_not(text: str):
    return lambda state: not any(r.args.get("text") == text for r in state.tool_results[-1:])


async def test_escalate_waits_on_a_person_with_a_packet(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=flag_is_not("bad"), remediation=Remediation.ESCALATE, description="never write bad")
    turns = [{"content": decision(text="bad", confidence=0.3)}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv]))
    seen: list[Escalated] = []
    engine.subscribe(lambda e: seen.append(e) if isinstance(e, Escalated) else None)
    run = await engine.run()
    assert (run.status, run.termination_reason) == ("escalated", "waiting_on_person")
    packet = seen[0].packet
    assert packet["failing_invariants"][0]["name"] == "never_bad"
    assert packet["confidence_trajectory"] == [0.3]
    assert "escalated" in kinds(store.events(run.id))
    assert store.iterations(run.id)[0].invariant_status == {"never_bad": False}


async def test_abort_remediation_fails_the_run(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=flag_is_not("bad"), remediation=Remediation.ABORT)
    engine, _ = make_engine(tmp_path, make_loop(tmp_path, [{"content": decision(text="bad")}], invariants=[inv]))
    run = await engine.run()
    assert (run.status, run.termination_reason) == ("failed", "fatal_error")


async def test_relaxed_invariant_is_recorded_but_not_remediated(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=flag_is_not("bad"), remediation=Remediation.ABORT)
    turns = [{"content": decision(text="bad", subgoal="a")}, {"content": decision(text="ok", subgoal="b")}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv]), relaxed={"never_bad": "known false alarm"})
    run = await engine.run()
    assert run.status == "converged"
    first = store.iterations(run.id)[0]
    assert first.invariant_status == {"never_bad": False} and first.remediations == []
    assert "relaxed by a person: known false alarm" in first.prompt[-1]["content"]


async def test_prune_context_remediation_drops_old_facts(tmp_path: Path) -> None:
    inv = Invariant(name="few_facts", check=lambda s: len(s.memory.facts) <= 4, remediation=Remediation.PRUNE_CONTEXT)
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(6)]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv], max_iterations=6))
    run = await engine.run()
    records = store.iterations(run.id)
    pruned = [r for r in records if r.remediations == ["prune_context"]]
    assert pruned, "the invariant should have fired once facts exceeded 4"
    assert len(pruned[0].state["memory"]["facts"]) == 3


async def test_change_strategy_remediation_changes_the_next_prompt_and_temperature(tmp_path: Path) -> None:
    inv = Invariant(name="never_bad", check=flag_is_not("bad"), remediation=Remediation.CHANGE_STRATEGY)
    turns = [{"content": decision(text="bad", subgoal="a")}, {"content": decision(text="ok", subgoal="b")}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv]))
    run = await engine.run()
    assert run.status == "converged"
    assert engine.temperature == pytest.approx(0.3)
    second = store.iterations(run.id)[1]
    assert "take a different approach" in second.prompt[-1]["content"]


async def test_custom_remediation_patches_state(tmp_path: Path) -> None:
    def add_fact(state: LoopState) -> LoopState:
        patched = state.model_copy(deep=True)
        patched.memory.facts.append("writing bad is forbidden")
        return patched

    inv = Invariant(name="never_bad", check=flag_is_not("bad"), remediation=Remediation.CUSTOM, custom=add_fact)
    turns = [{"content": decision(text="bad", subgoal="a")}, {"content": decision(text="ok", subgoal="b")}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, invariants=[inv]))
    run = await engine.run()
    assert run.status == "converged"
    assert "writing bad is forbidden" in store.iterations(run.id)[1].prompt[-1]["content"]


async def test_invalid_reply_is_repaired_with_the_error_shown(tmp_path: Path) -> None:
    turns = [["this is not json", {"content": decision(text="ok")}]]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns))
    run = await engine.run()
    assert run.status == "converged"
    record = store.iterations(run.id)[0]
    assert record.repairs == 1
    assert "not valid JSON" in record.prompt[-1]["content"]
    assert record.prompt[-2] == {"role": "assistant", "content": "this is not json"}


async def test_repair_of_bad_tool_arguments(tmp_path: Path) -> None:
    bad = decision(text="ok")
    bad["action"]["args"] = {"txt": "ok"}
    engine, store = make_engine(tmp_path, make_loop(tmp_path, [[{"content": bad}, {"content": decision(text="ok")}]]))
    run = await engine.run()
    assert run.status == "converged"
    assert "invalid arguments for tool 'write'" in store.iterations(run.id)[0].prompt[-1]["content"]


async def test_repair_gives_up_after_the_bound(tmp_path: Path) -> None:
    turns = [["nope", "{\"action\": 3}", "[1, 2]", {"content": decision(text="ok")}]]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, max_repairs=2))
    run = await engine.run()
    assert (run.status, run.termination_reason) == ("failed", "fatal_error")
    assert "after 2 repair attempt(s)" in (run.message or "")
    assert kinds(store.events(run.id)).count("invalid_reply") == 3
    assert run.tokens_in > 0  # the failed calls were paid for and are counted


async def test_transient_error_is_retried_and_recorded(tmp_path: Path) -> None:
    turns = [[{"error": {"status": 429, "message": "slow down"}}, {"content": decision(text="ok")}]]
    loop = make_loop(tmp_path, turns)
    engine, store = make_engine(tmp_path, loop)
    from loopterm.core.model import ModelClient
    from loopterm.core.retry import RetryPolicy

    async def no_sleep(_: float) -> None:
        return None

    engine._client = ModelClient(loop.model, retry=RetryPolicy(base_delay=0.01), on_retry=engine.on_retry, sleep=no_sleep)
    run = await engine.run()
    assert run.status == "converged"
    assert kinds(store.events(run.id)).count("model_retry") == 1


async def test_rules_file_reaches_the_prompt(tmp_path: Path) -> None:
    (tmp_path / ".loopterm").mkdir()
    (tmp_path / ".loopterm" / "RULES.md").write_text("Never use tabs.")
    engine, store = make_engine(tmp_path, make_loop(tmp_path, bad_then_ok()))
    run = await engine.run()
    assert "Never use tabs." in store.iterations(run.id)[0].prompt[0]["content"]  # stable: before the cache breakpoint


class Crash(Exception):
    """Stands in for the process dying at a chosen point."""


def counting_write_tool(calls: list[str]):
    from loopterm.core import ToolContext, tool

    @tool(side_effects=True, idempotent=False)
    def write(ctx: ToolContext, text: str) -> str:
        """Write text to flag.txt (counted)."""
        calls.append(text)
        (ctx.workspace / "flag.txt").write_text(text)
        return "written"

    return write


async def test_resume_reuses_a_journalled_reply_and_tool_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the reply and the tool, before the commit: resume pays for nothing twice."""
    calls: list[str] = []
    loop = make_loop(tmp_path, [{"content": decision(text="ok")}], tools=[counting_write_tool(calls)])
    engine, store = make_engine(tmp_path, loop)
    real_commit = store.commit_iteration

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(store, "commit_iteration", crash)
    with pytest.raises(Crash):
        await engine.run()
    monkeypatch.setattr(store, "commit_iteration", real_commit)
    assert calls == ["ok"] and store.iterations(engine.run_id) == []
    assert store.load_intent(engine.run_id, 1) is not None

    resumed = Engine(loop, store, store.get_run(engine.run_id), workdir=tmp_path, client=_Forbidden())
    run = await resumed.run()
    assert run.status == "converged" and run.iterations == 1
    assert calls == ["ok"]  # the tool did not run again
    record = store.iterations(run.id)[0]
    assert record.tool_result is not None and record.tool_result["reused"] is True
    assert "intent_reused" in kinds(store.events(run.id))
    assert run.tokens_in == record.tokens_in > 0  # the reply was paid for once


async def test_a_recorded_decision_naming_a_tool_the_loop_lost_ends_the_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the decision, then the loop file (or an MCP server) drops that tool: the resume
    fails the run with what to do, not an AssertionError, and nothing runs."""
    calls: list[str] = []
    loop = make_loop(tmp_path, [{"content": decision(text="ok")}], tools=[counting_write_tool(calls)])
    engine, store = make_engine(tmp_path, loop)

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(engine.executor, "execute", crash)
    with pytest.raises(Crash):
        await engine.run()
    assert store.load_intent(engine.run_id, 1) is not None
    from loopterm.core import tool

    @tool
    def other(text: str) -> str:
        """Another tool."""
        return text

    changed = loop.model_copy(update={"tools": [other]})
    run = await Engine(changed, store, store.get_run(engine.run_id), workdir=tmp_path, client=_Forbidden()).run()
    assert run.status == "failed" and calls == []
    assert run.termination_reason == "fatal_error"
    message = of(store.events(run.id), RunFinished)[-1].message
    assert "calls tool 'write', which the loop no longer has" in message and "start a new run" in message


async def test_interrupted_side_effect_waits_on_a_person(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A side-effecting call that started but never finished is not fired again blindly."""
    calls: list[str] = []
    loop = make_loop(tmp_path, [{"content": decision(text="ok")}], tools=[counting_write_tool(calls)])
    engine, store = make_engine(tmp_path, loop)

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(store, "tool_call_finished", crash)
    with pytest.raises(Crash):
        await engine.run()
    monkeypatch.undo()
    resumed = Engine(loop, store, store.get_run(engine.run_id), workdir=tmp_path, client=_Forbidden())
    run = await resumed.run()
    assert (run.status, run.termination_reason) == ("escalated", "waiting_on_person")
    assert "interrupted mid-call" in (run.message or "")
    assert calls == ["ok"]


class _Forbidden:
    """A model client that fails the test if the engine calls the model."""

    temperature = 0.0

    def estimate(self, messages: list, max_output_tokens: int) -> tuple[int, float]:
        raise AssertionError("the engine asked the model again on resume")

    async def complete(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("the engine asked the model again on resume")


async def test_observe_folds_tool_results_into_the_loops_own_state(tmp_path: Path) -> None:
    class Notes(LoopState):
        written: list[str] = []

    def observe(state: LoopState, decision: object, record: object, gates: list) -> LoopState:
        assert isinstance(state, Notes)
        text = getattr(record, "args", {}).get("text", "")
        return state.model_copy(update={"written": [*state.written, text]})

    engine, store = make_engine(tmp_path, make_loop(tmp_path, bad_then_ok(), state=Notes, observe=observe))
    run = await engine.run()
    assert run.status == "converged"
    assert store.iterations(run.id)[-1].state["written"] == ["no", "ok"]


async def test_a_running_engine_keeps_a_heartbeat_and_a_killed_one_goes_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time as _time

    from loopterm.core import engine as engine_module
    from loopterm.core.liveness import alive

    monkeypatch.setattr(engine_module, "HEARTBEAT_S", 0.05)
    turns = [{"content": decision(text="v", subgoal="s"), "delay": 0.5}]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, max_iterations=1))
    task = asyncio.create_task(engine.run())
    await asyncio.sleep(0.1)
    first = store.get_run(engine.run_id).updated_at
    await asyncio.sleep(0.25)
    during = store.get_run(engine.run_id)
    assert during.iterations == 0 and during.updated_at > first + 0.15  # touched mid model call
    assert alive(during)
    run = await task
    assert not alive(run)  # finished
    stale = during.model_copy(update={"updated_at": _time.time() - 60})  # as after a SIGKILL
    assert not alive(stale)


async def test_the_state_keeps_a_window_of_tool_records_and_the_store_keeps_them_all(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(5)]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, tool_history=2, max_iterations=5, stall_window=None))
    run = await engine.run()
    assert run.iterations == 5
    last = store.iterations(run.id)[-1].state["tool_results"]
    assert [r["iteration"] for r in last] == [4, 5]
    assert [r.tool_result["iteration"] for r in store.iterations(run.id) if r.tool_result] == [1, 2, 3, 4, 5]


async def test_log_fields_are_stored_exactly_whatever_observe_does_to_them(tmp_path: Path) -> None:
    """list[str] fields take the engine's append shortcut; edits in place, in the middle or a
    shrink must still reach the store exactly."""

    class Log(LoopState):
        notes: list[str] = []

    def observe(state: LoopState, decision: object, record: object, gates: list) -> LoopState:
        assert isinstance(state, Log)
        n = state.iteration
        notes = state.notes
        if n == 3:
            notes[0] = "edited in place"  # the old state's list too: only a comparison can see it
        elif n == 4:
            notes = notes[:1]
        else:
            notes.append(f"note {n}")  # in place as well
        return state.model_copy(update={"notes": notes})

    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(6)]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, state=Log, observe=observe, max_iterations=6, stall_window=None))
    run = await engine.run()
    assert run.iterations == 6
    got = [store.state_at(run.id, n)["notes"] for n in range(1, 7)]
    assert got == [
        ["note 1"], ["note 1", "note 2"], ["edited in place", "note 2"], ["edited in place"],
        ["edited in place", "note 5"], ["edited in place", "note 5", "note 6"],
    ]


def test_executing_elsewhere_asks_the_process_on_this_machine_and_the_heartbeat_elsewhere() -> None:
    """Whether `resume` (or the daemon, or the TUI) may take a run: a start with no end, a fresh heartbeat,
    and, on the machine that started it, a process that still exists (a killed one frees the run at once)."""
    import socket
    import subprocess
    import sys
    import time

    from loopterm.core.liveness import STALE_AFTER_S, executing_elsewhere
    from loopterm.core.fold import RunView, fold
    from loopterm.core.records import RunRecord
    from loopterm.core.runlog import EventRecord, RunStarted

    now = time.time()
    run = RunRecord(id="r1", loop="t", loop_ref="t", goal="g", spec_hash="h", model="m", status="running",
                    workspace="/tmp", created_at=now, updated_at=now, max_iterations=3)
    here = socket.gethostname()

    def started(pid: int, host: str = here, *, finished: bool = False) -> RunView:
        events = [EventRecord(run_id="r1", ts=now, event=RunStarted(pid=pid, host=host))]
        return fold(events + [EventRecord(run_id="r1", ts=now, event=RunFinished())] if finished else events)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert executing_elsewhere(run, started(sleeper.pid))  # a live process started it
        assert not executing_elsewhere(run, started(sleeper.pid, here, finished=True))  # it ended the run
        assert not executing_elsewhere(run.model_copy(update={"updated_at": now - STALE_AFTER_S - 1}), started(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not executing_elsewhere(run, started(sleeper.pid))  # killed: free at once, heartbeat fresh or not
    assert executing_elsewhere(run, started(sleeper.pid, "another-host"))  # elsewhere: only the heartbeat tells
    assert not executing_elsewhere(run, started(sleeper.pid, "another-host", finished=True))
    legacy = fold([EventRecord(run_id="r1", ts=now, event=RunStarted())])
    assert executing_elsewhere(run, legacy)  # recorded before pids were: the heartbeat decides
    assert not executing_elsewhere(run.model_copy(update={"status": "stopped"}), started(sleeper.pid, "another-host"))


async def test_a_tool_call_written_at_the_top_level_is_repaired_not_read_as_no_action(tmp_path: Path) -> None:
    """Issue 16: `{"tool": ..., "arguments": ...}` was silently a decision without an action."""
    wrong = {"tool": "write", "arguments": {"text": "ok"}, "subgoal": "s", "confidence": 0.9}
    engine, store = make_engine(tmp_path, make_loop(tmp_path, [[{"content": wrong}, {"content": decision(text="ok")}]]))
    run = await engine.run()
    assert (run.status, run.iterations) == ("converged", 1)
    record = store.iterations(run.id)[0]
    assert record.repairs == 1 and record.tool_call is not None and record.tool_call["tool"] == "write"
    assert ("unknown key 'tool' at the top level: put the call in \"action\": {\"tool\": ..., \"args\": {...}}"
            in record.prompt[-1]["content"])
