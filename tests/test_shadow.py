"""Shadow mode (core/shadow.py): proposals go to a person, nothing is executed, agreement is measured.

The loop under test (tests/shadowkit.py) is a real loop file whose tools and gate append to trace.log
whenever they run; a shadow run must leave that file absent and the workspace as it was copied.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.control import Approve, Deny, command_payload
from loopterm.core.engine import Engine
from loopterm.core.events import ApprovalNeeded
from loopterm.core.loader import load_loop
from loopterm.core.fold import fold
from loopterm.core.runlog import ApprovalPending, CommandRejected, ShadowMode, ShadowVerdict
from loopterm.core.shadow import agreement, verdicts
from loopterm.store import Store
from loopterm.tui.cli import main
from tests.loopkit import of
from tests.shadowkit import ANSWERS, EXPECTED_TOOLS, EXPECTED_TOTALS, TURNS, trace, write_loop


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def answer(n: int, key: str) -> Approve | Deny:
    verdict, args, reason, tool = ANSWERS[n - 1]
    if verdict == "deny":
        return Deny(key=key, reason=reason)
    return Approve(key=key, args=args, reason=reason, tool=tool)


class Person:
    """Answers each proposal through the store's control channel, as `loopterm watch` would."""

    def __init__(self, store: Store, engine: Engine, upto: int = 99) -> None:
        self.store, self.engine, self.upto = store, engine, upto
        self.asked: list[ApprovalNeeded] = []

    def __call__(self, event: Any) -> None:
        if isinstance(event, ApprovalNeeded):
            self.asked.append(event)
            if event.n <= self.upto:
                kind, payload = command_payload(answer(event.n, event.key))
                self.store.add_command(event.run_id, kind, payload)
                self.engine.wake()


def engine_for(tmp_path: Path, store: Store, **kwargs: Any) -> Engine:
    from loopterm.core.model import check_model

    loop, ref = load_loop(str(write_loop(tmp_path / "loop")))
    check_model(loop.model, loop.script)
    return Engine.create(loop, store, loop_ref=ref, workspace_root=tmp_path / "ws", workdir=tmp_path, **kwargs)


def run_with_person(engine: Engine, store: Store, upto: int = 99) -> Person:
    person = Person(store, engine, upto)
    engine.subscribe(person)
    asyncio.run(engine.run())
    return person


def test_a_shadow_run_executes_nothing_records_every_verdict_and_never_converges(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, shadow=True, wait_on_person=True)
    workspace = Path(engine.run_record.workspace)
    person = run_with_person(engine, store)
    run = store.get_run(engine.run_id)

    assert trace(tmp_path / "loop") == ""  # no tool function and no gate ever ran
    assert (workspace / "notes.txt").read_text() == "original\n" and not (workspace / "other.txt").exists()
    keys = [e.key for e in of(store.events(engine.run_id), ApprovalPending)]
    assert len(keys) == 5 and all(store.tool_call(k) is None for k in keys)  # the executor journalled no call
    assert [a.tool for a in person.asked] == [t for t, _ in TURNS]  # every call went to the person, lookup too
    assert all(a.shadow for a in person.asked)
    assert run.status == "terminated" and run.termination_reason == "max_iterations" and run.iterations == 5

    events = store.events(engine.run_id)
    assert fold(events).shadow
    at = [e.iteration for e in events if isinstance(e.event, ShadowVerdict)]
    recorded = of(events, ShadowVerdict)
    assert [(n, e.tool, e.verdict) for n, e in zip(at, recorded)] == [
        (n, tool, ANSWERS[n - 1][0]) for n, (tool, _) in enumerate(TURNS, 1)]
    assert recorded[1].person_args == {"query": "release date 2.1"}
    assert recorded[2].reason == "never write a vague date"
    assert agreement(verdicts(fold(events))) == {"tools": EXPECTED_TOOLS, "totals": EXPECTED_TOTALS}

    iterations = store.iterations(engine.run_id)
    for it, (verdict, _, _, _) in zip(iterations, ANSWERS):
        assert it.gate_results == []  # gates do not run in a shadow run
        assert it.tool_call["shadow"] == verdict
        assert it.tool_result["ok"] is False and it.tool_result["error"].startswith("not executed (shadow mode")
    # What the model is shown of its proposal: nothing ran, and the person's verdict.
    assert "release date 2.1" in iterations[1].tool_result["error"]
    assert "would not have made this call (never write a vague date)" in iterations[2].tool_result["error"]
    assert "would have called tool 'lookup' instead" in iterations[4].tool_result["error"]
    assert (recorded[4].tool, recorded[4].person_tool) == ("write", "lookup")
    assert recorded[4].person_args == {"query": "who owns other.txt"} and recorded[4].args_error is None
    assert "not executed (shadow mode" in json.dumps(iterations[3].prompt)  # the next prompt carries it
    assert store.memories("shadowed") == []  # a shadow run teaches long-term memory nothing
    store.close()


def test_without_a_person_a_shadow_run_waits_and_resuming_it_stays_shadow(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, shadow=True, wait_on_person=False)
    asyncio.run(engine.run())
    run = store.get_run(engine.run_id)
    assert run.status == "escalated" and run.termination_reason == "waiting_on_person"
    assert "shadow" in (run.message or "") and "nothing will run" in (run.message or "")
    pending = of(store.events(run.id), ApprovalPending)
    assert len(pending) == 1 and pending[0].shadow is True
    assert list(fold(store.events(run.id)).approvals) == [pending[0].key]

    kind, payload = command_payload(answer(1, pending[0].key))  # answered while nothing runs it
    store.add_command(run.id, kind, payload)
    loop, _ = load_loop(run.loop_ref)
    resumed = Engine(loop, store, store.get_run(run.id), wait_on_person=True, workdir=tmp_path)
    assert resumed.shadow
    run_with_person(resumed, store)
    assert trace(tmp_path / "loop") == ""
    events = store.events(run.id)
    assert len(of(events, ShadowMode)) == 1
    assert agreement(verdicts(fold(events))) == {"tools": EXPECTED_TOOLS, "totals": EXPECTED_TOTALS}
    store.close()


def test_an_ordinary_run_of_the_same_loop_executes_and_asks_nobody(tmp_path: Path) -> None:
    """The control: without --shadow the same loop file's tools and gate do run (so the trace can fail)."""
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, wait_on_person=True)
    person = run_with_person(engine, store)
    assert not engine.shadow and person.asked == []
    assert trace(tmp_path / "loop").startswith("write notes.txt\ngate\nlookup release\ngate\n")
    assert (Path(engine.run_record.workspace) / "notes.txt").read_text() == "release: soon"  # iteration 3 wrote it
    assert of(store.events(engine.run_id), ShadowVerdict) == []
    assert [(m.key, m.value) for m in store.memories("shadowed")] == [("last_status", "terminated")]
    store.close()


def test_a_branch_of_a_shadow_run_stays_shadow_and_replays_nothing(tmp_path: Path) -> None:
    db = tmp_path / "db" / "loopterm.db"
    store = Store.open(db)
    engine = engine_for(tmp_path, store, shadow=True, wait_on_person=True)
    run_with_person(engine, store)
    store.close()
    # The branch waits at its first proposal (--no-wait: exit 4), shadow, and its workspace is the original.
    code = main(["fork", engine.run_id, "--at", "2", "--no-wait", "--db", str(db)])
    assert code == 4
    store = Store.open(db)
    branch = [r for r in store.list_runs() if r.parent_run == engine.run_id][0]
    assert fold(store.events(branch.id)).shadow
    assert (Path(branch.workspace) / "notes.txt").read_text() == "original\n"  # write(notes.txt) was only proposed
    assert trace(tmp_path / "loop") == ""
    store.close()


def test_runs_marks_shadow_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`loopterm runs` tells a shadow run from one whose calls ran: a team reads it to find them."""
    db = tmp_path / "db" / "loopterm.db"
    store = Store.open(db)
    shadow = engine_for(tmp_path, store, shadow=True, wait_on_person=True)
    run_with_person(shadow, store)
    ordinary = engine_for(tmp_path, store)
    asyncio.run(ordinary.run())
    store.close()
    capsys.readouterr()
    assert main(["runs", "--json", "--db", str(db)]) == 0
    listed = {r["id"]: r["shadow"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {shadow.run_id: True, ordinary.run_id: False}
    assert main(["runs", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    assert f"{shadow.run_id} (shadow)" in table and f"{ordinary.run_id} (shadow)" not in table and ordinary.run_id in table


def test_a_replay_of_a_shadow_run_is_shadow_and_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db" / "loopterm.db"
    store = Store.open(db)
    engine = engine_for(tmp_path, store, shadow=True, wait_on_person=True)
    run_with_person(engine, store)
    store.close()
    assert main(["replay", engine.run_id, "--json", "--db", str(db)]) == 0
    report = json.loads(capsys.readouterr().out)
    store = Store.open(db)
    replayed = report.get("replay_run") or [r.id for r in store.list_runs() if r.origin == "replay"][0]
    assert fold(store.events(replayed)).shadow

    def judged(run_id: str) -> list[tuple[Any, ...]]:
        return [(v.tool, v.verdict, v.person_tool, v.person_args, v.reason) for v in verdicts(fold(store.events(run_id)))]

    assert judged(replayed) == judged(engine.run_id) and len(judged(replayed)) == 5  # another tool re-sent too
    assert trace(tmp_path / "loop") == ""
    store.close()


def test_eval_shadow_reports_per_tool_agreement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db" / "loopterm.db"
    store = Store.open(db)
    engine = engine_for(tmp_path, store, shadow=True, wait_on_person=True)
    run_with_person(engine, store)
    store.close()
    loop_file = str(tmp_path / "loop" / "shadowed.py")
    capsys.readouterr()
    assert main(["eval", loop_file, "--shadow", "--json", "--db", str(db)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["version", "loop", "db", "min_agreement", "passed", "runs", "tools", "totals"]
    assert report["loop"] == "shadowed" and report["tools"] == EXPECTED_TOOLS and report["totals"] == EXPECTED_TOTALS
    assert report["runs"] == [{"run_id": engine.run_id, "status": "terminated", "iterations": 5, **EXPECTED_TOTALS}]
    # --min-agreement: 0.4 meets 0.4, misses 0.5 (exit 3)
    assert main(["eval", loop_file, "--shadow", "--run", engine.run_id[:6], "--min-agreement", "0.4", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "write" in out and "33%" in out and "lookup" in out and "50%" in out and "40%" in out
    assert main(["eval", loop_file, "--shadow", "--min-agreement", "0.5", "--db", str(db)]) == 3
    assert "below the required 50%" in capsys.readouterr().out
    # show RUN lists each verdict
    assert main(["show", engine.run_id, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "shadow run" in out and "✗ deny" in out and "never write a vague date" in out and "✎ edit" in out


@pytest.mark.parametrize("argv, says", [
    (["run", "LOOP", "--shadow", "--cases", "c.json"], "--shadow cannot run a cases file"),
    (["eval", "LOOP", "--shadow", "--cases", "c.json"], "--cases cannot go with --shadow"),
    (["eval", "LOOP", "--shadow", "--min-convergence", "0.5"], "--min-convergence cannot go with --shadow"),
    (["eval", "LOOP"], "eval needs --cases FILE"),
    (["eval", "LOOP", "--run", "abc"], "--run and --min-agreement report on shadow runs; add --shadow"),
    (["eval", "LOOP", "--shadow", "--run", "nope"], "no run"),
    (["eval", "LOOP", "--shadow", "--run", "ORDINARY"], "is not a shadow run"),
    (["eval", "codefix", "--shadow"], "no shadow run of loop 'codefix'"),
])
def test_bad_shadow_command_lines_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    db = tmp_path / "db" / "loopterm.db"
    store = Store.open(db)
    ordinary = engine_for(tmp_path, store, wait_on_person=False)
    store.close()
    loop_file = str(tmp_path / "loop" / "shadowed.py")
    argv = [loop_file if a == "LOOP" else ordinary.run_id if a == "ORDINARY" else a for a in argv]
    before = (tmp_path / "db" / "loopterm.db").stat().st_size
    assert main([*argv, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loopterm: ") and says in err, err
    with Store.open(db) as store:
        assert len(store.list_runs()) == 1  # nothing created
    assert (tmp_path / "db" / "loopterm.db").stat().st_size == before


def test_a_headless_shadow_run_waits_for_verdicts_sent_from_another_process(tmp_path: Path) -> None:
    """`loopterm run LOOP --shadow --headless` in its own process; this test answers through the store's
    control channel, as `loopterm watch RUN` does; the run ends at its cap (exit 3), nothing executed."""
    import os
    import subprocess
    import sys
    import time

    loop_file = write_loop(tmp_path / "loop")
    db = tmp_path / "db" / "loopterm.db"
    db.parent.mkdir()  # a --db in a folder that does not exist is refused
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "loopterm.tui.cli", "run", str(loop_file), "--shadow", "--headless",
                             "--db", str(db)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        answered: set[str] = set()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            if not db.exists():
                continue
            with Store.open(db) as store:
                for run in store.list_runs():
                    for event in store.events(run.id):
                        key = event.event.key if isinstance(event.event, ApprovalPending) else None
                        if key is not None and key not in answered:
                            kind, payload = command_payload(answer(event.iteration or 0, key))
                            store.add_command(run.id, kind, payload)
                            answered.add(key)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, out
    assert "◐ shadow run" in out and "is proposed (shadow: nothing will run)" in out
    assert len(answered) == 5 and trace(tmp_path / "loop") == ""
    with Store.open(db) as store:
        (run,) = store.list_runs()
        assert run.termination_reason == "max_iterations"
        assert agreement(verdicts(fold(store.events(run.id)))) == {"tools": EXPECTED_TOOLS, "totals": EXPECTED_TOTALS}


def test_a_run_that_executes_never_swaps_the_tool_a_person_was_asked_about(tmp_path: Path) -> None:
    """Naming another tool is a shadow verdict only: an ordinary approval that names one is refused (the call
    is denied and says why), so a person never makes a run call a tool its model did not propose."""
    from loopterm.core import ToolContext, tool
    from tests.loopkit import decision, make_loop

    calls: list[str] = []

    @tool(side_effects=True, needs_approval=True)
    def guarded(ctx: ToolContext, text: str) -> str:
        """Needs a person's approval."""
        calls.append(text)
        return "done"

    loop = make_loop(tmp_path, [{"content": decision("guarded", text="x")}], tools=[guarded], gates=[],
                     max_iterations=1)
    from loopterm.core.model import check_model

    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref="test:t", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           wait_on_person=True)

    def person(event: Any) -> None:
        if isinstance(event, ApprovalNeeded):
            kind, payload = command_payload(Approve(key=event.key, tool="write", args={"text": "y"}))
            store.add_command(event.run_id, kind, payload)
            engine.wake()

    engine.subscribe(person)
    asyncio.run(engine.run())
    assert calls == []
    first = store.get_iteration(engine.run_id, 1)
    assert first.tool_call["approval"] == "deny" and "named another tool (write)" in first.tool_result["error"]
    rejected = of(store.events(engine.run_id), CommandRejected)
    assert rejected and "only a shadow run records another tool" in rejected[0].error
    store.close()
