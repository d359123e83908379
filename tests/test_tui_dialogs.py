"""Every dialog typed through as a person would: focus starts at the first field, Tab walks the fields top to
bottom, ctrl+s sends (the keys line says so), and what the run's log records is exactly what was typed.

Keys only (Pilot presses): no field is set from the test, so a dialog that drops typing fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual import events
from textual.widgets import Button, Input, Select, Static

from loopterm.core import runlog
from loopterm.core import runs as service
from loopterm.core.fork import create_fork, plan_fork
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.dialog import Dialog, JsonEditor, TextPrompt
from loopterm.tui.screens.edit_state import EditStateScreen
from loopterm.tui.screens.escalations import EscalationScreen
from loopterm.tui.screens.relax import RelaxScreen
from loopterm.tui.screens.side_effect import SideEffectScreen
from tests.loopkit import of
from tests.test_tui_snapshots import ESCALATED_ID, snapshot_db  # noqa: F401 - its module-scoped fixture
from tests.test_tui import NO_BAD, SHORT, app_for, db_of, finished_run, loaded, long_loop, status, turn, until

SIZE = (120, 40)


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


async def type_text(pilot: Any, text: str) -> None:
    """Type as a person would: one key per character."""
    await pilot.press(*[{" ": "space"}.get(c, c) for c in text])


def keys_line(dialog: Dialog[Any]) -> str:
    return str(dialog.query_one("#dialog-keys", Static).render())


def focused_id(app: LooptermApp) -> str | None:
    return app.focused.id if app.focused is not None else None


async def paused_run(pilot: Any, app: LooptermApp) -> str:
    await until(pilot, lambda: app.view is not None and app.timeline.row_count >= 1, "the first iteration", 30)
    await pilot.press("space")
    await until(pilot, lambda: status(app) == "paused", "paused", 30)
    assert app.view is not None
    return app.view.run_id


# ---------------------------------------------------------------------- the state editor


async def test_state_editor_typed_through_with_tab_records_the_edit_and_its_reason(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path, delay=0.3), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        run_id = await paused_run(pilot, app)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditStateScreen), "the editor")
        editor = app.screen
        assert isinstance(editor, EditStateScreen)
        area = editor.query_one("#state-json", JsonEditor)
        assert app.focused is area  # the first field
        assert "ctrl+s send the edit" in keys_line(editor) and "ctrl+t indent" in keys_line(editor)
        # to the facts list: `"facts": [` -> the first fact
        lines = area.text.splitlines()
        row = next(i for i, line in enumerate(lines) if line.strip().startswith('"facts": ['))
        assert lines[row].rstrip().endswith("["), lines[row]
        await pilot.press(*["down"] * row, "end")
        await type_text(pilot, '"bad is fine here",')
        await pilot.press("ctrl+t")  # indents inside the JSON (Tab would move on)
        assert '"facts": ["bad is fine here",    ' in area.text
        await pilot.press("tab")
        assert focused_id(app) == "reason"
        await type_text(pilot, "next try")  # the word that used to land in the JSON
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(app.store.events(run_id), runlog.StateEdited), "the edit recorded", 30)
        edited = of(app.store.events(run_id), runlog.StateEdited)[0]
        assert edited.reason == "next try"
        assert edited.patched_state is not None and edited.patched_state["memory"]["facts"][0] == "bad is fine here"
        assert not isinstance(app.screen, EditStateScreen)
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped", "stopped", 30)


async def test_state_editor_keeps_the_reason_and_the_focus_when_it_refuses(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, [turn("no")], max_iterations=1)
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditStateScreen), "the editor")
        editor = app.screen
        assert isinstance(editor, EditStateScreen)
        await pilot.press("delete")  # the opening brace: no longer JSON
        await pilot.press("tab")
        await type_text(pilot, "my reason")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "not valid JSON" in editor.error_text
        assert editor.query_one("#dialog-error", Static).has_class("shown")
        assert editor.query_one("#reason", Input).value == "my reason" and focused_id(app) == "reason"
        assert isinstance(app.screen, EditStateScreen) and app.store.pending_commands(run_id) == []
        # a toast never covers a field: what the dialog says goes in its error line
        editor.notify("something to say")
        await pilot.pause()
        assert editor.error_text == "something to say"
        assert not list(editor.query("Toast"))  # (the App's notices show above the box: tests/test_tui_sizes.py)


async def test_keys_typed_right_behind_tab_go_to_the_next_field(tmp_path: Path) -> None:
    """A terminal delivers a fast typist's keys in one burst. Tab must move the focus before the next key is
    dispatched, or the reason typed after it lands in the JSON (seen in tmux)."""
    loop, run_id = await finished_run(tmp_path, [turn("no")], max_iterations=1)
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditStateScreen), "the editor")
        editor = app.screen
        assert isinstance(editor, EditStateScreen)
        before = editor.query_one("#state-json", JsonEditor).text
        driver = app._driver
        assert driver is not None
        for key, char in [("tab", "\t"), ("w", "w"), ("h", "h"), ("y", "y"), ("shift+tab", None), ("z", "z")]:
            event = events.Key(key, char)  # all sent before any is handled, as a terminal's burst
            event.set_sender(app)
            driver.send_message(event)
        await pilot.pause(0.3)
        assert editor.query_one("#reason", Input).value == "why"
        area = editor.query_one("#state-json", JsonEditor)
        assert area.text == "z" + before and app.focused is area


# ---------------------------------------------------------------------- relax


async def test_relax_starts_at_the_invariant_and_records_the_typed_reason(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path, delay=0.3, invariants=[SHORT, NO_BAD]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        run_id = await paused_run(pilot, app)
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, RelaxScreen), "the relax dialog")
        dialog = app.screen
        assert isinstance(dialog, RelaxScreen)
        select = dialog.query_one("#invariant", Select)
        assert app.focused is select and select.value == "short_flag"  # the first field
        assert "ctrl+s relax short_flag" in keys_line(dialog)
        await pilot.press("enter", "down", "enter")  # choose the second invariant
        await until(pilot, lambda: select.value == "no_bad", "no_bad chosen")
        assert "ctrl+s relax no_bad" in keys_line(dialog)
        await pilot.press("tab")
        assert focused_id(app) == "reason"
        await type_text(pilot, "bad is allowed for a while")
        await pilot.press("tab")
        assert focused_id(app) == "iterations"
        await type_text(pilot, "2")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(app.store.events(run_id), runlog.InvariantRelaxed), "the relaxation", 30)
        relaxed = of(app.store.events(run_id), runlog.InvariantRelaxed)[0]
        assert (relaxed.invariant, relaxed.reason) == ("no_bad", "bad is allowed for a while")
        n = app.store.get_run(run_id).iterations
        assert relaxed.until == n + 2
        # restoring it: the keys line says so, and the typed reason is recorded
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, RelaxScreen) and app.screen is not dialog, "again")
        again = app.screen
        assert isinstance(again, RelaxScreen)
        await pilot.press("enter", "down", "enter")
        await until(pilot, lambda: again.query_one("#invariant", Select).value == "no_bad", "no_bad chosen")
        assert "ctrl+s restore no_bad" in keys_line(again)
        await pilot.press("tab")
        await type_text(pilot, "enough")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(app.store.events(run_id), runlog.InvariantRestored), "the restore", 30)
        assert of(app.store.events(run_id), runlog.InvariantRestored)[0].reason == "enough"
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped", "stopped", 30)


# ---------------------------------------------------------------------- facts and subgoals


ESCALATING = [turn("bad"), turn("ok")]


async def open_escalation(pilot: Any, app: LooptermApp) -> str:
    await until(pilot, lambda: loaded(app), "loaded")
    assert app.view is not None
    await pilot.press("x")
    await until(pilot, lambda: app.screen.__class__.__name__ == "InboxScreen", "the inbox")
    await pilot.pause(0.2)
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the escalation")
    return app.view.run_id


@pytest.mark.parametrize("key,event,field", [("f", runlog.FactAdded, "fact"), ("g", runlog.SubgoalSet, "subgoal")])
async def test_a_fact_or_subgoal_typed_and_sent_only_keeps_the_run_waiting(tmp_path: Path, key: str, event: Any,
                                                                          field: str) -> None:
    loop, run_id = await finished_run(tmp_path, ESCALATING, invariants=[NO_BAD])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await open_escalation(pilot, app)
        screen = app.screen
        await pilot.press(key)
        await until(pilot, lambda: isinstance(app.screen, TextPrompt), "the prompt")
        prompt = app.screen
        assert isinstance(prompt, TextPrompt) and focused_id(app) == "text"
        assert "and resume" in keys_line(prompt) and "enter" in keys_line(prompt)
        await type_text(pilot, f"a {field} from a person")
        await pilot.press("tab")
        assert isinstance(app.focused, Button) and app.focused.id == "submit"
        await pilot.press("tab")
        assert isinstance(app.focused, Button) and app.focused.id == "only"
        await pilot.press("enter")
        await until(pilot, lambda: app.store.pending_commands(run_id), "the answer queued")
        assert app.screen is screen  # not resumed: the escalation is still there to answer
        assert not app.engines and app.run_view(run_id).escalation is not None
        assert [c.payload[field] for c in app.store.pending_commands(run_id)] == [f"a {field} from a person"]
        await pilot.press("r")  # the engine starts here, takes the answer, then the resume
        await until(pilot, lambda: app.store.get_run(run_id).status == "converged", "converged", 30)
    store = Store.open(db_of(tmp_path))
    assert [getattr(e, field) for e in of(store.events(run_id), event)] == [f"a {field} from a person"]
    store.close()


async def test_an_empty_prompt_is_refused_in_its_error_line(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, ESCALATING, invariants=[NO_BAD])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await open_escalation(pilot, app)
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, TextPrompt), "the prompt")
        prompt = app.screen
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(prompt, TextPrompt) and app.screen is prompt
        assert "empty answer is not sent" in prompt.error_text and focused_id(app) == "text"
        assert app.store.pending_commands(run_id) == []


# ---------------------------------------------------------------------- a side effect


async def test_side_effect_dialog_says_its_key_and_records_the_answer(tmp_path: Path) -> None:
    loop, parent = await finished_run(tmp_path, [turn("no"), turn("ok")])
    store = Store.open(db_of(tmp_path))
    plan = plan_fork(store, loop, store.get_run(parent), 1, sets=[], relax=[], model=None, reason="again")
    branch = create_fork(store, loop, plan, run_id="b1a2c3d4e5f6", workspace=db_of(tmp_path).parent / "ws" / "b")
    engine, _ = service.continuing(store, loop, branch, what="the branch", wait_on_person=False)
    await engine.run()  # reaches the parent's call again: a person decides
    store.close()
    app = LooptermApp(db_of(tmp_path), watch_run=branch.id, theme="textual-dark", frozen=True,
                      loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app) and app.view.log.side_effect is not None, "the side effect pending")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, SideEffectScreen), "the side-effect dialog")
        dialog = app.screen
        assert isinstance(dialog, SideEffectScreen)
        assert "ctrl+s reuse the recorded result" in keys_line(dialog)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(app.store.events(branch.id), runlog.SideEffectAnswered), "the answer", 30)
        answers = of(app.store.events(branch.id), runlog.SideEffectAnswered)
        assert [a.answer for a in answers] == ["reuse"]
        await until(pilot, lambda: app.store.get_run(branch.id).iterations == 2, "the branch went on past it", 30)


# ---------------------------------------------------------------------- snapshots at 80x24 (baselines: the lead)


SNAP = (80, 24)


def test_snapshot_state_editor_80x24(snap_compare: Any, snapshot_db: Path) -> None:
    async def open_it(pilot: Any) -> None:
        await _loaded_snapshot(pilot)
        await pilot.press("e")
        await pilot.pause()

    assert snap_compare(_snapshot_app(snapshot_db), terminal_size=SNAP, run_before=open_it)


def test_snapshot_relax_80x24(snap_compare: Any, snapshot_db: Path) -> None:
    async def open_it(pilot: Any) -> None:
        await _loaded_snapshot(pilot)
        await pilot.press("i")
        await pilot.pause()

    assert snap_compare(_snapshot_app(snapshot_db), terminal_size=SNAP, run_before=open_it)


def test_snapshot_fact_prompt_80x24(snap_compare: Any, snapshot_db: Path) -> None:
    async def open_it(pilot: Any) -> None:
        await _loaded_snapshot(pilot)
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        await pilot.press("f")
        await pilot.pause()

    assert snap_compare(_snapshot_app(snapshot_db), terminal_size=SNAP, run_before=open_it)


def test_snapshot_side_effect_80x24(snap_compare: Any, snapshot_db: Path) -> None:
    from loopterm.core.runlog import SideEffectPending

    async def open_it(pilot: Any) -> None:
        await _loaded_snapshot(pilot)
        pending = SideEffectPending(key="k", why="branch", tool="write_file",
                                    args={"path": "solution.py", "content": "def slugify(text):\n    return text\n"},
                                    earlier_run="c0def1c0def1", earlier_iteration=2)
        pilot.app.push_screen(SideEffectScreen("e5ca1a7ede00", pending))
        await pilot.pause()

    assert snap_compare(_snapshot_app(snapshot_db), terminal_size=SNAP, run_before=open_it)


def _snapshot_app(db: Path) -> LooptermApp:
    return LooptermApp(db, watch_run=ESCALATED_ID, theme="loopterm-dark", frozen=True)


async def _loaded_snapshot(pilot: Any) -> None:
    await until(pilot, lambda: loaded(pilot.app) and pilot.app.timeline.row_count == 2, "the run loaded", 10)
    await pilot.pause()

