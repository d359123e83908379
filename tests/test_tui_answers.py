"""A person's answers through the TUI, read from the run's log and its fold (core/fold.py):

- what waits on a person stays pending through `q`, `s` and a process ending: the run stays in the inbox,
  and a headless resume waits again instead of going past it;
- `r` and `k` name the escalation they answer; `space` does not go past one;
- a state edit names the state it edited: one the run has moved past is refused, changing nothing, and the
  editor opens again on the state the run now starts from, with the person's reason;
- an approval answered meanwhile is refused, and the refusal is said.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Button, DataTable, Input, TextArea

from loopterm.core import runlog
from loopterm.core.control import Approve, Deny, Step
from loopterm.core.engine import Engine
from loopterm.core.fold import fold
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.screens.edit_state import EditStateScreen
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen
from tests.loopkit import FLAG_GATE, make_loop, of, write
from tests.test_tui import (
    NO_BAD,
    SIZE,
    app_for,
    db_of,
    finished_run,
    guarded_write,
    headless_watched,
    loaded,
    long_loop,
    status,
    turn,
    until,
)


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


def escalation_of(store: Store, run_id: str) -> Any:
    return fold(store.events(run_id)).escalation


# ---------------------------------------------------------------------- q leaves what waits on a person waiting


# Iteration 2 writes "bad": the no_bad invariant (ESCALATE) stops the run there until a person answers.
# Its reply takes a second, so `q` can land while it is in flight.
ESCALATING = [turn("no"), turn("bad", delay=1.0), turn("ok")]


@pytest.mark.parametrize("moment", ["in_flight", "just_committed", "waiting"])
async def test_quit_leaves_an_escalated_run_escalated_and_in_the_inbox(tmp_path: Path, moment: str) -> None:
    loop = make_loop(tmp_path, ESCALATING, invariants=[NO_BAD])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and app.timeline.row_count >= 1, "the first iteration", 30)
        run_id = app.view.run_id
        if moment == "in_flight":  # iteration 2 asked its model and has not committed
            assert app.store.get_run(run_id).iterations == 1 and escalation_of(app.store, run_id) is None
        elif moment == "just_committed":  # q as soon as the escalating iteration is on screen
            await until(pilot, lambda: app.timeline.row_count == 2, "the escalating iteration", 30)
        else:
            await until(pilot, lambda: status(app) == "escalated", "waiting on a person", 30)
            await pilot.pause(0.5)
        await pilot.press("q")
        await until(pilot, lambda: not app.engines, "the engine stopped", 30)

    store = Store.open(db_of(tmp_path))
    run = store.get_run(run_id)
    pending = escalation_of(store, run_id)
    assert run.iterations == 2 and run.status == "stopped", (run.status, run.message)
    assert pending is not None and pending.iteration == 2 and "no_bad" in pending.packet.summary
    assert not of(store.events(run_id), runlog.EscalationAnswered)
    store.close()

    # A new window: the inbox lists it, stopped but still waiting on a person.
    again = app_for(tmp_path, loops={"test:t": loop})
    async with again.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(again), "loaded")
        assert [w.run.id for w in again.waiting_runs()] == [run_id]
        assert again._escalated_count == 1
        await pilot.press("x")
        await until(pilot, lambda: isinstance(again.screen, InboxScreen), "the inbox")
        inbox = again.screen
        assert isinstance(inbox, InboxScreen) and [w.run.id for w in inbox.waiting] == [run_id]
        table = inbox.query_one(DataTable)
        assert str(table.get_row_at(0)[4]) == "stopped · waits on you"

    # Resumed headless (`loopterm resume RUN --headless --no-wait`): it waits again, it does not go past it.
    store = Store.open(db_of(tmp_path))
    resumed = await Engine(loop, store, store.get_run(run_id), wait_on_person=False).run()
    assert resumed.status == "escalated" and resumed.iterations == 2, resumed.message
    assert "waiting on a person" in (resumed.message or "")
    assert escalation_of(store, run_id) == pending
    store.close()


async def test_a_run_stopped_while_waiting_stays_in_the_inbox_and_r_there_answers_its_escalation(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, [turn("bad"), turn("ok")], invariants=[NO_BAD])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and status(app) == "escalated", "escalated", 30)
        run_id = app.view.run_id
        await pilot.press("s")  # a stop is not an answer
        await until(pilot, lambda: status(app) == "stopped" and not app.engines, "stopped", 30)
        pending = escalation_of(app.store, run_id)
        assert pending is not None
        assert "stopped · waits on you" in app._header_shown
        assert [w.run.id for w in app.waiting_runs()] == [run_id]
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, InboxScreen), "the inbox")
        await pilot.pause(0.2)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "its escalation")
        await pilot.press("r")  # nothing executes it: the answer is written, then an engine here takes it first
        await until(pilot, lambda: app.store.get_run(run_id).status == "converged", "converged after the answer", 30)
    store = Store.open(db_of(tmp_path))
    answers = of(store.events(run_id), runlog.EscalationAnswered)
    assert [(a.escalation, a.answer) for a in answers] == [(pending.event_id, "resume")]
    assert fold(store.events(run_id)).waiting is False


async def test_abort_from_the_escalation_screen_is_recorded_as_its_answer(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, [turn("bad"), turn("ok")], invariants=[NO_BAD])  # --no-wait
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        pending = escalation_of(app.store, run_id)
        assert pending is not None and not app.executing(run_id)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, InboxScreen), "the inbox")
        await pilot.pause(0.2)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "its escalation")
        await pilot.press("k")
        await until(pilot, lambda: app.store.get_run(run_id).status == "stopped" and not app.engines, "aborted", 30)
        assert app.waiting_runs() == []
    store = Store.open(db_of(tmp_path))
    answers = of(store.events(run_id), runlog.EscalationAnswered)
    assert [(a.escalation, a.answer) for a in answers] == [(pending.event_id, "stop")]
    assert store.get_run(run_id).iterations == 1  # nothing ran to take the answer


async def test_space_on_a_run_waiting_on_an_escalation_opens_it_and_sends_nothing(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, [turn("bad"), turn("ok")], invariants=[NO_BAD])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        for key in ("space", "n"):
            await pilot.press(key)
            await until(pilot, lambda: isinstance(app.screen, EscalationScreen), f"{key}: the escalation opened")
            assert any("waits on your answer to its escalation" in str(n.message) for n in app._notifications)
            assert app.store.pending_commands(run_id) == [] and not app.engines
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, EscalationScreen), "back")


# ---------------------------------------------------------------------- a stale state edit


async def edit_unchanged_after_the_run_moved(pilot: Any, app: LooptermApp, run_id: str) -> tuple[int, int, int]:
    """Open the editor on a running run (it pauses), step the run on, send the edit unchanged. Returns
    (the iteration edited, the one the run moved to, its facts then)."""
    await pilot.press("e")
    await until(pilot, lambda: isinstance(app.screen, EditStateScreen), "the editor")
    editor = app.screen
    assert isinstance(editor, EditStateScreen)
    k = editor.base_iteration
    assert json.loads(editor.query_one("#state-json", TextArea).text)["iteration"] == k
    assert "pauses at its next iteration boundary" in editor.note
    await until(pilot, lambda: app.store.get_run(run_id).status == "paused", "paused by opening the editor", 30)
    moved = app.store.get_run(run_id).iterations
    app.send(run_id, Step())  # meanwhile, from another window: one more iteration
    await until(pilot, lambda: app.store.get_run(run_id).iterations == moved + 1
                and app.store.get_run(run_id).status == "paused",
                lambda: f"one more iteration (the run: {app.store.get_run(run_id).status} at "
                        f"{app.store.get_run(run_id).iterations}, was {moved}; pending commands: "
                        f"{[c.kind for c in app.store.pending_commands(run_id)]})", 30)
    m = moved + 1
    facts = len(app.store.state_at(run_id, m)["memory"]["facts"])
    editor.query_one("#reason", Input).value = "keep it as it was"
    await pilot.press("ctrl+s")
    await until(pilot, lambda: isinstance(app.screen, EditStateScreen) and app.screen is not editor
                and bool(app.screen.query("#state-json")), "the editor again, after the refusal, composed", 30)
    return k, m, facts


async def test_a_stale_state_edit_is_refused_and_the_editor_shows_the_current_state(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path, n=14, delay=0.3), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and app.timeline.row_count >= 1, "the first iteration", 30)
        run_id = app.view.run_id
        k, m, facts = await edit_unchanged_after_the_run_moved(pilot, app, run_id)
        again = app.screen
        assert isinstance(again, EditStateScreen)
        assert f"the run moved from iteration {k} to {m}" in again.error_text
        current = json.loads(again.query_one("#state-json", TextArea).text)
        assert current["iteration"] == m and len(current["memory"]["facts"]) == facts
        assert again.base_iteration == m and again.query_one("#reason", Input).value == "keep it as it was"
        events = app.store.events(run_id)
        assert not of(events, runlog.StateEdited)
        assert [r.error for r in of(events, runlog.CommandRejected)][-1].startswith(f"the run moved from iteration {k}")
        assert not any("refused edit state" in str(n.message) for n in app._notifications)  # the editor says it
        # nothing was rolled back: the run goes on from iteration m's state
        assert app.engines[run_id].state.iteration == m and len(app.engines[run_id].state.memory.facts) == facts

        # the edit of the current state applies
        current["memory"]["facts"].append("FROM A PERSON")
        again.query_one("#state-json", TextArea).text = json.dumps(current)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(app.store.events(run_id), runlog.StateEdited), "the edit applied", 30)
        edited = of(app.store.events(run_id), runlog.StateEdited)[0]
        assert edited.reason == "keep it as it was" and edited.patched_state is not None
        assert edited.patched_state["memory"]["facts"][-1] == "FROM A PERSON"
        assert len(edited.patched_state["memory"]["facts"]) == facts + 1
        assert not isinstance(app.screen, EditStateScreen)
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped" and not app.engines, "stopped", 30)


async def test_a_stale_state_edit_of_a_watched_run_in_another_process_is_refused(tmp_path: Path) -> None:
    # no stall and a second a reply: the run must still be going when the editor opens, however loaded the machine
    proc, db = headless_watched(tmp_path, delay=1.0, stall=None)
    try:
        deadline = time.monotonic() + 60
        run_id = None
        while time.monotonic() < deadline and run_id is None:
            await asyncio.sleep(0.2)
            runs = Store.open(db).list_runs() if db.exists() else []
            run_id = runs[0].id if runs and runs[0].iterations >= 1 else None
        assert run_id, "the headless run never committed an iteration"
        app = LooptermApp(db, watch_run=run_id, theme="textual-dark", frozen=True)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: loaded(app), "loaded", 30)
            assert app.executing(run_id) and run_id not in app.engines
            k, m, facts = await edit_unchanged_after_the_run_moved(pilot, app, run_id)
            again = app.screen
            assert isinstance(again, EditStateScreen)
            assert f"the run moved from iteration {k} to {m}" in again.error_text
            current = json.loads(again.query_one("#state-json", TextArea).text)
            assert current["iteration"] == m and again.query_one("#reason", Input).value == "keep it as it was"
            assert not of(app.store.events(run_id), runlog.StateEdited)
            assert app.store.get_run(run_id).iterations == m
            assert len(app.store.state_at(run_id, m)["memory"]["facts"]) == facts
            await until(pilot, lambda: again.query("#cancel"),  # composed (its fields may come first)
                        lambda: f"the editor's buttons (screens {[type(x).__name__ for x in app.screen_stack]}, "
                                f"it is on top: {app.screen is again}, mounted: {again.is_mounted})")
            again.query_one("#cancel", Button).press()
            await until(pilot, lambda: not isinstance(app.screen, EditStateScreen),
                        f"the editor closed (screens {[type(x).__name__ for x in app.screen_stack]}, "
                        f"the refused one on top: {app.screen is again})")
            await pilot.press("s")
            await until(pilot, lambda: status(app) == "stopped", "the other process stopped", 30)
        assert proc.wait(timeout=30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- a stale approval


async def test_an_approval_answered_meanwhile_is_refused_and_the_refusal_is_said(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, [turn("first", tool_name="guarded_write"), turn("second", tool_name="guarded_write"),
                                turn("ok", tool_name="write")], tools=[write, guarded_write], gates=[FLAG_GATE])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and app.view.log.approvals, "an approval pending", 30)
        run_id = app.view.run_id
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the approval dialog")
        key = app.screen.asked.key
        app.send(run_id, Deny(key=key, reason="no, from another window"))  # answered elsewhere meanwhile
        await until(pilot, lambda: key not in app.view.log.approvals and app.view.log.approvals, "the next call asked",
                    30)
        await pilot.click("#approve")  # this window's answer to a call no longer waiting
        await until(pilot, lambda: any("refused approve: that call was already answered" in str(n.message)
                                       for n in app._notifications), "the refusal said", 30)
        assert isinstance(app.view.log.answers[key], Deny)  # the first answer stands
        second = next(iter(app.view.log.approvals))
        app.send(run_id, Approve(key=second))
        await until(pilot, lambda: status(app) == "converged", "converged", 30)
