"""Any terminal size (issue 14, item 7): the TUI is usable at 80x24 and at 200x60.

At 80x24 the runs tree is a toggle (`t`), the timeline keeps n, action, gates and inv, the footers keep their key
hints whole, the header leads with the status, every dialog's controls are on screen and a notification never
covers a dialog. At 200x60 the tree shows and the subgoal takes the room.

What is visible is read from the screen as a terminal would draw it (the compositor's lines), and from widget
regions. The SVG snapshots at the end have no baselines in the branch that adds them: the lead makes them
(`pytest tests/test_tui_sizes.py --snapshot-update`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from textual.widget import Widget
from textual.widgets import Button, Input, Static, TextArea
from textual.widgets._footer import FooterKey
from textual.widgets._toast import Toast

from loopterm.core.engine import Engine
from loopterm.core.model import check_model
from loopterm.core.runlog import SideEffectPending
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.dialog import Dialog
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen
from loopterm.tui.screens.side_effect import SideEffectScreen
from loopterm.tui.widgets.keyhints import KeyHints
from loopterm.tui.widgets.timeline import Timeline, column_layout
from tests.loopkit import FLAG_GATE, make_loop, write
from tests.test_tui import guarded_write, turn
from tests.test_tui_snapshots import CODEFIX_ID, ESCALATED_ID, _copy_normalised, _make_runs

SMALL = (80, 24)
LARGE = (200, 60)
APPROVAL_ID = "a99a0a1a1a00"


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def sizes_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A converged codefix run, an escalated one, and a run whose tool call waits for approval (ids fixed)."""
    root = tmp_path_factory.mktemp("sizes")
    source = Store.open(root / "source.db")
    converged, escalated = asyncio.run(_make_runs(root, source))
    loop = make_loop(root, [turn("first", tool_name="guarded_write"), turn("ok")], tools=[write, guarded_write],
                     gates=[FLAG_GATE])
    check_model(loop.model, loop.script)
    engine = Engine.create(loop, source, loop_ref="test:t", workspace_root=root / "ws", workdir=root)
    asyncio.run(engine.run())
    db = root / "db" / "loopterm.db"
    target = Store.open(db)
    for run_id, new_id in ((converged, CODEFIX_ID), (escalated, ESCALATED_ID), (engine.run_id, APPROVAL_ID)):
        _copy_normalised(source, target, run_id, new_id, root)
    source.close()
    target.close()
    return db, loop


def app_of(sizes_db: tuple[Path, Any], run_id: str) -> LooptermApp:
    db, loop = sizes_db
    return LooptermApp(db, watch_run=run_id, theme="loopterm-dark", frozen=True, loops={"test:t": loop})


async def until(pilot: Any, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


async def loaded(pilot: Any) -> None:
    app = pilot.app
    await until(pilot, lambda: app.view is not None and not app.view.loading
                and app.timeline.row_count == app.view.run.iterations, "the run loaded")
    await pilot.pause()


def screen_lines(app: LooptermApp) -> list[str]:
    """What the terminal shows, line by line."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def visible(widget: Widget) -> bool:
    """Whether the widget is drawn whole on the screen, on top (nothing covers its centre, nothing cut)."""
    screen = widget.screen
    region = widget.region
    if not region or not screen.region.contains_region(region):
        return False
    if widget.parent is not None and isinstance(widget.parent, Widget) and widget.parent is not screen:
        if not widget.parent.region.contains_region(region):
            return False
    found, _ = screen.get_widget_at(*region.center)
    return found is widget or widget in found.ancestors


# ---------------------------------------------------------------------- dialogs, opened as a person would


async def _press(pilot: Any, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await pilot.pause()


async def _side_effect(pilot: Any) -> None:
    asked = SideEffectPending(key="k1", tool="write_file", earlier_run=CODEFIX_ID, earlier_iteration=1,
                              args={"path": "solution.py", "content": "def slugify(text):\n    return text\n"})
    pilot.app.push_screen(SideEffectScreen(ESCALATED_ID, asked))
    await pilot.pause()


DIALOGS: dict[str, tuple[str, Callable[[Any], Awaitable[None]]]] = {
    "state_editor": (ESCALATED_ID, lambda pilot: _press(pilot, "e")),
    "relax": (ESCALATED_ID, lambda pilot: _press(pilot, "i")),
    "branch": (CODEFIX_ID, lambda pilot: _press(pilot, "b")),
    "fact_prompt": (ESCALATED_ID, lambda pilot: _press(pilot, "x", "enter", "f")),
    "approval": (APPROVAL_ID, lambda pilot: _press(pilot, "a")),
    "side_effect": (ESCALATED_ID, _side_effect),
}


async def open_dialog(pilot: Any, name: str) -> Dialog[Any]:
    await loaded(pilot)
    await DIALOGS[name][1](pilot)
    await until(pilot, lambda: isinstance(pilot.app.screen, Dialog), f"the {name} dialog")
    await pilot.pause(0.2)
    return pilot.app.screen


# ---------------------------------------------------------------------- the main screen


async def test_at_80x24_the_tree_is_a_toggle_and_the_timeline_keeps_n_action_gates_and_inv(
        sizes_db: tuple[Path, Any]) -> None:
    app = app_of(sizes_db, CODEFIX_ID)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        tree, timeline = app.run_tree, app.timeline
        assert not tree.display and timeline.region.x == 0 and timeline.region.width == 80
        assert timeline.columns_shown[:4] == ["n", "action", "gates", "inv"]
        header = next(line for line in screen_lines(app) if " action " in line)
        assert all(f" {label} " in header + " " for label in ("n", "action", "gates", "inv"))
        assert any("✓compile ✓tests" in line and "write_file(solution.py)" in line for line in screen_lines(app))

        await pilot.press("t")  # shown, to pick a run
        await until(pilot, lambda: tree.display and tree.has_focus, "the tree shown and focused")
        await pilot.pause()
        assert tree.region.x == 0 and timeline.region.right == 80
        assert timeline.columns_shown[:4] == ["n", "action", "gates", "inv"]
        assert any("c0def1c0" in line for line in screen_lines(app))

        await pilot.press("t")
        await until(pilot, lambda: not tree.display and timeline.has_focus, "the tree hidden, the timeline focused")
        await pilot.resize_terminal(*LARGE)  # a person's choice holds at any width
        await pilot.pause(0.2)
        assert not tree.display
        await pilot.press("t")
        await until(pilot, lambda: tree.display, "the tree shown")


async def test_at_200x60_the_tree_shows_and_the_subgoal_takes_the_room(sizes_db: tuple[Path, Any]) -> None:
    app = app_of(sizes_db, CODEFIX_ID)
    async with app.run_test(size=LARGE) as pilot:
        await loaded(pilot)
        assert app.run_tree.display and app.timeline.region.x > 0
        assert app.timeline.columns_shown == ["n", "action", "conf", "gates", "inv", "tokens", "ms", "subgoal"]
        assert any("fold accented letters to ASCII before slugging" in line for line in screen_lines(app))
        footer = app.screen.query_one(KeyHints)
        assert "space Pause/resume" in footer.kept and "e Edit state" in footer.kept
        assert app.screen.query("FooterKey.-command-palette")

        await pilot.resize_terminal(*SMALL)  # narrower: the tree goes by itself
        await until(pilot, lambda: not app.run_tree.display, "the tree hidden at 80 columns")


def test_the_timeline_drops_low_value_columns_first_and_widens_the_subgoal() -> None:
    def labels(width: int) -> list[str]:
        from loopterm.tui.widgets.render import TIMELINE_COLUMNS

        return [TIMELINE_COLUMNS[index][0] for index, _ in column_layout(width)]

    assert labels(40) == ["n", "action", "gates", "inv"]  # required even when they do not fit
    assert labels(78) == ["n", "action", "gates", "inv", "subgoal"]
    assert labels(97) == ["n", "action", "conf", "gates", "inv", "tokens", "ms", "subgoal"]
    for width in (78, 97, 140, 167):
        assert sum(cell for _, cell in column_layout(width)) == width  # no column cut, no room unused
    wide = dict(column_layout(400))
    assert wide[7] == 82 and wide[1] == 50  # the subgoal as far as a row keeps it, then the action


async def test_the_header_keeps_the_status_at_80_columns(sizes_db: tuple[Path, Any]) -> None:
    for run_id, status in ((CODEFIX_ID, "converged"), (APPROVAL_ID, "escalated")):
        app = app_of(sizes_db, run_id)
        async with app.run_test(size=SMALL) as pilot:
            await loaded(pilot)
            await until(pilot, lambda: status in app._header_shown, "the header")
            first = screen_lines(app)[0]
            assert status in first and first.index(status) < 10, first


# ---------------------------------------------------------------------- footers


def footer_fits(app: LooptermApp) -> None:
    """The footer's keys are each drawn whole inside the screen, over no other."""
    keys = list(app.screen.query_one(KeyHints).query(FooterKey))
    width = app.size.width
    for key in keys:
        assert 0 <= key.region.x and key.region.right <= width, (key.key, key.region)
    for a, b in zip(keys, keys[1:]):
        assert not a.region.overlaps(b.region), (a.key, b.key)


@pytest.mark.parametrize("run_id", [CODEFIX_ID, APPROVAL_ID])
async def test_the_main_footer_keeps_its_key_hints_at_80_columns(sizes_db: tuple[Path, Any], run_id: str) -> None:
    app = app_of(sizes_db, run_id)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.pause(0.3)
        footer = app.screen.query_one(KeyHints)
        footer_fits(app)
        last = screen_lines(app)[-1]
        for hint in ("space Pause", "n Step", "e Edit", "r Resume", "t Runs", "? Help"):
            assert hint in footer.kept and hint in last, (hint, last)
        if run_id == APPROVAL_ID:  # a call waits: answering it is what fits first
            assert "a Approve" in last and "d Deny" in last, last
        if not app.screen.query("FooterKey.-command-palette"):  # its border was the stray glyph over the keys
            assert "▏" not in last, last


async def test_the_escalation_footer_keeps_resume_and_back_at_80_columns(sizes_db: tuple[Path, Any]) -> None:
    app = app_of(sizes_db, ESCALATED_ID)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await _press(pilot, "x", "enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the escalation screen")
        await pilot.pause(0.3)
        footer_fits(app)
        last = screen_lines(app)[-1]
        assert "r Resume" in last and "esc Back" in last and "f Fact" in last, last


# ---------------------------------------------------------------------- dialogs


@pytest.mark.parametrize("name", list(DIALOGS))
async def test_every_dialog_s_controls_are_on_screen_and_reachable_at_80x24(sizes_db: tuple[Path, Any],
                                                                            name: str) -> None:
    app = app_of(sizes_db, DIALOGS[name][0])
    async with app.run_test(size=SMALL) as pilot:
        dialog = await open_dialog(pilot, name)
        box = dialog.query_one("#dialog")
        assert app.screen.region.contains_region(box.region), box.region
        for widget in [*dialog.query(Button), dialog.query_one("#dialog-keys", Static),
                       dialog.query_one("#dialog-title", Static)]:
            assert visible(widget), (widget, widget.region)
        fields = [w for w in dialog.query("#dialog *") if w.focusable and not isinstance(w, Button)]
        assert fields or name == "side_effect", "a dialog with no field"  # that one is buttons only
        for _ in range(len(fields) + len(list(dialog.query(Button)))):  # Tab walks them, each comes into view
            focused = dialog.focused
            assert focused is not None and visible(focused), (focused, focused.region if focused else None)
            await pilot.press("tab")
            await pilot.pause()
        for area in dialog.query(TextArea):
            assert area.region.height <= 8  # an editor shrinks on a short screen


async def test_a_notification_never_covers_a_dialog(sizes_db: tuple[Path, Any]) -> None:
    app = app_of(sizes_db, APPROVAL_ID)
    async with app.run_test(size=SMALL, notifications=True) as pilot:
        dialog = await open_dialog(pilot, "approval")
        app.notify("refused approve: that call was already answered in another window, so nothing was sent",
                   severity="error", timeout=30)
        app.notify("a second note", timeout=30)
        await until(pilot, lambda: len(dialog.query(Toast)) == 2, "the toasts")
        await pilot.pause(0.2)
        box = dialog.query_one("#dialog").region
        toasts = [toast.region for toast in dialog.query(Toast)]
        assert all(toast and not toast.overlaps(box) for toast in toasts), (toasts, box)
        for widget in [*dialog.query(Input), *dialog.query(TextArea), *dialog.query(Button)]:
            assert visible(widget), widget


# ---------------------------------------------------------------------- snapshots (baselines: the lead's)


def _loaded_then(*keys: str) -> Callable[[Any], Awaitable[None]]:
    async def run_before(pilot: Any) -> None:
        await loaded(pilot)
        await _press(pilot, *keys)
        await pilot.pause(0.3)
    return run_before


def test_main_screen_at_80x24(snap_compare: Any, sizes_db: tuple[Path, Any]) -> None:
    assert snap_compare(app_of(sizes_db, CODEFIX_ID), terminal_size=SMALL, run_before=_loaded_then())


def test_main_screen_at_200x60(snap_compare: Any, sizes_db: tuple[Path, Any]) -> None:
    assert snap_compare(app_of(sizes_db, CODEFIX_ID), terminal_size=LARGE, run_before=_loaded_then())


def test_escalation_screen_at_80x24(snap_compare: Any, sizes_db: tuple[Path, Any]) -> None:
    assert snap_compare(app_of(sizes_db, ESCALATED_ID), terminal_size=SMALL, run_before=_loaded_then("x", "enter"))


def test_inbox_at_80x24(snap_compare: Any, sizes_db: tuple[Path, Any]) -> None:
    async def inbox(pilot: Any) -> None:
        await _loaded_then("x")(pilot)
        assert isinstance(pilot.app.screen, InboxScreen)

    assert snap_compare(app_of(sizes_db, ESCALATED_ID), terminal_size=SMALL, run_before=inbox)


@pytest.mark.parametrize("name", list(DIALOGS))
def test_dialog_at_80x24(snap_compare: Any, sizes_db: tuple[Path, Any], name: str) -> None:
    async def open_it(pilot: Any) -> None:
        await open_dialog(pilot, name)

    assert snap_compare(app_of(sizes_db, DIALOGS[name][0]), terminal_size=SMALL, run_before=open_it)
