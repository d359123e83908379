"""The compare screen: `c` marks the run on screen (the tree shows it), `c` on another run opens the two side by
side, the cursor's iteration shows the state diff between them, escape comes back; `c` twice on a branch compares
it with its parent. The runs are tests/test_compare.py's family (a parent, branches, an unrelated run)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest

from loopterm.tui.app import LooptermApp, MainScreen
from loopterm.tui.bindings import SUPERVISION_BINDINGS
from loopterm.tui.screens.compare import AlignedRows, CompareScreen
from tests.test_compare import B1, B2, PARENT, build_family

SIZE = (140, 40)


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "loopterm.db"
    path.parent.mkdir()
    build_family(path)
    return path


def app_for(db: Path, run_id: str) -> LooptermApp:
    return LooptermApp(db, watch_run=run_id, theme="textual-dark", frozen=True)


async def until(pilot: Any, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def shown(app: LooptermApp, run_id: str) -> bool:
    return app.view is not None and app.view.run_id == run_id and not app.view.loading


def tree_label(app: LooptermApp, run_id: str) -> str:
    return str(app.run_tree._run_nodes[run_id].label)


def compared(app: LooptermApp) -> bool:
    return isinstance(app.screen, CompareScreen) and app.screen.comparison is not None


def test_c_is_a_bound_key_with_a_tooltip() -> None:
    binding = next(b for b in SUPERVISION_BINDINGS if b.id == "compare")
    assert binding.key == "c" and binding.action == "app.compare" and "parent" in (binding.tooltip or "")


async def test_mark_then_compare_then_the_cursor_shows_the_state_diff_and_escape_returns(db: Path) -> None:
    app = app_for(db, B1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: shown(app, B1), "the branch on screen")
        await pilot.press("c")
        await until(pilot, lambda: "⇄" in tree_label(app, B1), "the mark in the tree")
        assert app.compare_mark == B1 and "⇄" not in tree_label(app, PARENT)
        assert isinstance(app.screen, MainScreen)  # marking opens nothing

        app.show_run(B2)
        await until(pilot, lambda: shown(app, B2), "the sibling on screen")
        await pilot.press("c")
        await until(pilot, lambda: compared(app), "the comparison on screen")
        screen = app.screen
        assert isinstance(screen, CompareScreen) and (screen.a, screen.b) == (B1, B2)
        comparison = screen.comparison
        assert comparison is not None and comparison.fork_point == 2
        rows = screen.query_one(AlignedRows)
        assert rows.row_count == 5 and app.focused is rows
        assert rows.selected_n == 3  # the cursor starts on the first divergence
        await until(pilot, lambda: screen.diff is not None and screen.diff.n == 3, "the diff at the divergence")
        assert '-  "notes": "p3"' in screen.diff_text and '+  "notes": "c3"' in screen.diff_text

        await pilot.press("up")  # the fork point: the same iteration on both sides
        await until(pilot, lambda: screen.diff is not None and screen.diff.n == 2, "the diff at the fork point")
        assert "the states are the same" in screen.diff_text

        await pilot.press("end")  # b1's 5th against b2, which ended after 4
        await until(pilot, lambda: screen.diff is not None and screen.diff.n == 5, "the diff at the last row")
        assert (screen.diff.a_n, screen.diff.b_n) == (5, 4)
        assert "its last; it ended before 5" in screen.diff_text

        header = str(screen.query_one("#compare-header").render())
        assert "first divergence at iteration 3" in header and "both descend from" in header
        totals = screen.query_one("#compare-totals").render()
        assert totals is not None

        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "back on the main screen")
        assert app.compare_mark is None and "⇄" not in tree_label(app, B1)
        assert shown(app, B2)


async def test_c_twice_on_a_branch_compares_it_with_its_parent(db: Path) -> None:
    app = app_for(db, B1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: shown(app, B1), "the branch on screen")
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("c")
        await until(pilot, lambda: compared(app), "the comparison on screen")
        screen = app.screen
        assert isinstance(screen, CompareScreen) and (screen.a, screen.b) == (PARENT, B1)
        assert screen.query_one(AlignedRows).selected_n == 4
        await pilot.press("home")
        await pilot.press("f")  # back to the first divergence
        await until(pilot, lambda: screen.query_one(AlignedRows).selected_n == 4, "the cursor on the divergence")


async def test_c_twice_on_a_root_run_clears_the_mark(db: Path) -> None:
    app = app_for(db, PARENT)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: shown(app, PARENT), "the parent on screen")
        await pilot.press("c")
        await until(pilot, lambda: "⇄" in tree_label(app, PARENT), "the mark in the tree")
        await pilot.press("c")
        await until(pilot, lambda: "⇄" not in tree_label(app, PARENT), "the mark cleared")
        assert app.compare_mark is None and isinstance(app.screen, MainScreen)


async def test_a_run_that_cannot_be_read_is_said_on_the_screen(db: Path) -> None:
    app = app_for(db, PARENT)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: shown(app, PARENT), "the parent on screen")
        app.open_compare(PARENT, "no-such-run")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.error is not None, "the error")
        assert "cannot compare" in str(app.screen.query_one("#compare-header").render())
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "back on the main screen")


# ----------------------------------------------------------------------------- snapshots (the lead makes the baselines)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_compare_screen_snapshot(snap_compare: Any, db: Path, size: tuple[int, int]) -> None:
    async def open_the_comparison(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: shown(app, B1), "the branch on screen")
        app.open_compare(PARENT, B1)
        await until(pilot, lambda: compared(app) and app.screen.diff is not None, "the comparison and its diff")
        await pilot.pause()

    assert snap_compare(app_for(db, B1), terminal_size=size, run_before=open_the_comparison)
