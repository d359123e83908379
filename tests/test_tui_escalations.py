"""Escalations that flow: an answer (`r`, `k`, a fact or a subgoal sent with enter) closes the escalation
screen and returns the person where they came from; the screen always shows what the run waits on now
(re-read from the fold); the inbox shows the iteration that waits; a fact that resumes takes 4 keys from the
header showing the escalation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static

from loopterm.core import runlog
from loopterm.core.control import Approve, Resume
from loopterm.core.fold import fold
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen
from tests.loopkit import FLAG_GATE, make_loop, of, write
from tests.test_tui import NO_BAD, app_for, db_of, finished_run, guarded_write, loaded, status, turn, until
from tests.test_tui_snapshots import ESCALATED_ID, snapshot_db  # noqa: F401 - its module-scoped fixture

SIZE = (120, 40)
ESCALATING = [turn("bad"), turn("ok")]


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


def shown(screen: EscalationScreen, widget: str) -> str:
    rendered = screen.query_one(widget, Static).render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


def type_keys(text: str) -> list[str]:
    return [{" ": "space"}.get(c, c) for c in text]


async def test_a_fact_that_resumes_takes_four_keys_from_the_header(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, ESCALATING, invariants=[NO_BAD])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and status(app) == "escalated"
                    and "x inbox" in app._header_shown, "the header shows the escalation", 30)
        run_id = app.view.run_id
        keys = 0
        for key in ("x", "enter", "f"):
            await pilot.press(key)
            keys += 1
            await pilot.pause(0.2)
        assert app.screen.__class__.__name__ == "TextPrompt"
        await pilot.press(*type_keys("bad is what the user asked for"))  # the typed fact: not counted
        await pilot.press("enter")
        keys += 1
        await until(pilot, lambda: app.screen is app.main, "back on the main screen (the inbox closed: empty)")
        await until(pilot, lambda: app.store.get_run(run_id).status == "converged", "running again, then done", 30)
        assert keys <= 4
    store = Store.open(db_of(tmp_path))
    events = store.events(run_id)
    assert [f.fact for f in of(events, runlog.FactAdded)] == ["bad is what the user asked for"]
    assert [a.answer for a in of(events, runlog.EscalationAnswered)] == ["resume"]
    kinds = [type(r.event).__name__ for r in events]
    assert kinds.index("FactAdded") < kinds.index("EscalationAnswered")  # the fact first, then the resume
    assert "bad is what the user asked for" in str(store.get_iteration(run_id, 2).prompt)
    store.close()


async def test_r_closes_the_escalation_and_returns_to_the_main_screen(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, ESCALATING, invariants=[NO_BAD])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and status(app) == "escalated", "escalated", 30)
        run_id = app.view.run_id
        await pilot.press("space")  # opens the escalation (space does not go past it)
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the escalation")
        assert "an engine waits for your answer (escalation at iteration 1)" in shown(app.screen, "#esc-title")
        await pilot.press("r")
        await until(pilot, lambda: app.screen is app.main, "back on the main screen at once")
        await until(pilot, lambda: app.store.get_run(run_id).status == "converged", "converged", 30)


async def test_an_answer_from_the_inbox_returns_to_the_inbox_while_another_run_waits(tmp_path: Path) -> None:
    loop, first = await finished_run(tmp_path, ESCALATING, invariants=[NO_BAD])
    _, second = await finished_run(tmp_path, ESCALATING, invariants=[NO_BAD])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, InboxScreen), "the inbox")
        inbox = app.screen
        assert isinstance(inbox, InboxScreen)
        await until(pilot, lambda: len(inbox.waiting) == 2, "both runs listed")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "an escalation")
        answered = app.screen.run_id
        await pilot.press("k")  # abort: an answer, the screen closes
        await until(pilot, lambda: app.screen is inbox, "back in the inbox")
        await until(pilot, lambda: [w.run.id for w in inbox.waiting] == [({first, second} - {answered}).pop()],
                    "the answered run left the inbox", 30)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the other escalation")
        await pilot.press("escape")  # back without answering: still the inbox
        await until(pilot, lambda: app.screen is inbox, "the inbox again")
        assert len(inbox.waiting) == 1
    store = Store.open(db_of(tmp_path))
    assert [a.answer for a in of(store.events(answered), runlog.EscalationAnswered)] == ["stop"]
    store.close()


async def test_the_screen_shows_what_waits_now_an_approval_after_the_escalation(tmp_path: Path) -> None:
    # iteration 1 escalates (no_bad); once answered, iteration 2 asks for approval (guarded_write)
    loop = make_loop(tmp_path, [turn("bad"), turn("ok", tool_name="guarded_write")], invariants=[NO_BAD],
                     tools=[write, guarded_write], gates=[FLAG_GATE])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and status(app) == "escalated", "escalated", 30)
        run_id = app.view.run_id
        pending = app.run_view(run_id).escalation
        assert pending is not None
        await pilot.press("x", "enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the escalation")
        screen = app.screen
        assert isinstance(screen, EscalationScreen)
        await until(pilot, lambda: "Why it stopped" in shown(screen, "#esc-packet-text"), "the packet")
        app.send(run_id, Resume(escalation=pending.event_id))  # answered from another window meanwhile
        await until(pilot, lambda: "Tool call waiting for approval (iteration 2)" in shown(screen, "#esc-packet-text"),
                    "the approval it waits on now", 30)
        body = shown(screen, "#esc-packet-text")
        assert "Why it stopped" not in body and "no_bad" not in body  # not the old packet
        assert "a approve" in body
        assert "approval at iteration 2" in shown(screen, "#esc-title")
        key = next(iter(app.run_view(run_id).approvals))
        app.send(run_id, Approve(key=key))  # answered elsewhere too: the screen says so
        await until(pilot, lambda: "answered: nothing waits on a person now" in shown(screen, "#esc-title"),
                    "answered", 30)
        assert "not waiting on a person (any more)" in shown(screen, "#esc-packet-text")
        assert app.screen is screen  # answered elsewhere: it stays, saying so, until esc
        await pilot.press("escape", "escape")
        await until(pilot, lambda: app.screen is app.main, "back on the main screen")
        await until(pilot, lambda: not app.engines, "the run ended", 30)


async def test_the_inbox_shows_the_iteration_that_waits_now(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, ESCALATING, invariants=[NO_BAD])  # escalated at iteration 1
    store = Store.open(db_of(tmp_path))
    # a call asked at iteration 3 that no one answered (the model did not ask it again), then one at 7
    store.append_event(run_id, runlog.ApprovalPending(key="old", tool="guarded_write", args={"text": "a"}), 3)
    store.append_event(run_id, runlog.ApprovalPending(key="new", tool="guarded_write", args={"text": "b"}), 7)
    store.close()
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, InboxScreen), "the inbox")
        table = app.screen.query_one(DataTable)
        await until(pilot, lambda: table.row_count == 1, "the row")
        row = table.get_row_at(0)
        assert (str(row[2]), str(row[3])) == ("7", "⚑ approval")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the screen")
        body = shown(app.screen, "#esc-packet-text")
        assert body.startswith("Tool call waiting for approval (iteration 7)")
        assert "Also unanswered (asked earlier)" in body
        assert "iteration 3: tool guarded_write needs approval" in body and "iteration 1: " in body


def test_the_fold_says_what_waits_now() -> None:
    from loopterm.core.runlog import EventRecord

    records = [
        EventRecord(id=1, run_id="r", ts=0.0, iteration=2, event=runlog.Escalated(summary="s", iteration=2)),
        EventRecord(id=2, run_id="r", ts=0.0, iteration=3, event=runlog.ApprovalPending(key="k", tool="t")),
    ]
    view = fold(records)
    assert view.waiting_now is not None and view.waiting_now.iteration == 3
    view.absorb([EventRecord(id=3, run_id="r", ts=0.0, iteration=4, event=runlog.Approved(key="k"))])
    assert view.waiting_now is view.escalation
    view.absorb([EventRecord(id=4, run_id="r", ts=0.0, event=runlog.EscalationAnswered(escalation=1))])
    assert view.waiting_now is None and not view.waiting


# ---------------------------------------------------------------------- snapshot at 80x24 (baseline: the lead)


def test_snapshot_escalation_screen_80x24(snap_compare: Any, snapshot_db: Path) -> None:
    async def open_it(pilot: Any) -> None:
        await until(pilot, lambda: loaded(pilot.app) and pilot.app.timeline.row_count == 2, "loaded", 10)
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()

    app = LooptermApp(snapshot_db, watch_run=ESCALATED_ID, theme="loopterm-dark", frozen=True)
    assert snap_compare(app, terminal_size=(80, 24), run_before=open_it)
