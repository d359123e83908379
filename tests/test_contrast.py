"""Contrast, tested: every foreground/background pair the TUI paints, in every built-in loopterm theme.

Rather than re-deriving colours from the CSS (Textual's defaults, the theme's variables, alpha
blends, the cursor and hover component classes, dim text), the app is run in each theme and the
composited screen is read cell by cell: what a terminal would be sent. Each state a person sees is
scanned: the main screen (timeline focused, its cursor row), the runs tree focused and hovered (its
guides and selected row), the help screen, the command palette and a dialog showing its error line.

Rules (WCAG 2.x contrast ratio): every character of text, status glyph and tree guide reaches 4.5:1,
7:1 in ``loopterm-high-contrast``. Text styled dim is measured as drawn: loopterm draws it itself
(``themes.DIM_FACTOR``). Not held to it: lines and bars that are not text (borders, pane separators,
scrollbars, the tab underline, the spend sparkline), emoji, and what a modal screen dims behind itself.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.screen import Screen
from textual.widgets import Tree

from loopterm.core.engine import Engine
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.dialog import TextPrompt
from tests.test_themes import contrast

THEMES = {"loopterm-dark": 4.5, "loopterm-light": 4.5, "loopterm-colorblind": 4.5, "loopterm-high-contrast": 7.0}
SIZE = (140, 40)


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def runs_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A converged codefix run and a branch of it (so the tree draws guides and two statuses)."""
    from loopterm.core.model import check_model
    from loopterm.examples.codefix.loop import loop as codefix

    root = tmp_path_factory.mktemp("contrast")
    store = Store.open(root / "db" / "loopterm.db")
    check_model(codefix.model, codefix.script)
    engine = Engine.create(codefix, store, loop_ref="codefix", workspace_root=root / "ws", workdir=root)
    run = asyncio.run(engine.run())
    assert run.status == "converged"
    Engine.create(codefix, store, loop_ref="codefix", workspace_root=root / "ws", workdir=root, parent_run=run.id)
    store.close()
    return root / "db" / "loopterm.db", run.id


def _is_line_art(char: str) -> bool:
    """Box-drawing and block elements (U+2500..U+259F): borders, bars, guides."""
    return 0x2500 <= ord(char) <= 0x259F


def _hex(triplet: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % triplet


def painted(app: LooptermApp) -> Iterator[tuple[str, str, str, str]]:
    """(where, character, foreground, background) for every visible, non-blank cell held to the text rule."""
    screen = app.screen
    for y, strip in enumerate(screen._compositor.render_strips()):
        x = 0
        for segment in strip:
            style = segment.style
            for char in segment.text:
                cell_x, x = x, x + 1
                if char.isspace() or style is None or segment.control:
                    continue
                widget, _ = screen.get_widget_at(cell_x, y)
                if isinstance(widget, Screen):
                    continue  # what a modal screen shows, dimmed, of the screen behind it
                if _is_line_art(char) and not (isinstance(widget, Tree) and widget.content_region.contains(cell_x, y)):
                    continue  # borders, separators, scrollbars, underlines, sparkline: not text (tree guides are)
                if unicodedata.category(char) == "So" and ord(char) >= 0x1F000:
                    continue  # an emoji (the palette's search icon) is drawn in its own colours
                fg, bg = (style.bgcolor, style.color) if style.reverse else (style.color, style.bgcolor)
                assert fg is not None and bg is not None and fg.triplet and bg.triplet, (
                    f"{type(widget).__name__} paints {char!r} in a colour left to the terminal ({style})")
                r, g, b = fg.triplet
                if style.dim:  # not drawn by loopterm: a terminal draws it at about half
                    br, bgg, bb = bg.triplet
                    r, g, b = (br + (r - br) // 2, bgg + (g - bgg) // 2, bb + (b - bb) // 2)
                where = type(widget).__name__ + (f"#{widget.id}" if widget.id else "")
                yield where, char, _hex((r, g, b)), _hex(bg.triplet)


def failures(app: LooptermApp, state: str, minimum: float) -> list[str]:
    seen: set[tuple[str, str, str]] = set()
    found: list[str] = []
    for where, char, fg, bg in painted(app):
        if (where, fg, bg) in seen:
            continue
        seen.add((where, fg, bg))
        ratio = contrast(fg, bg)
        if ratio < minimum:
            found.append(f"{state}: {where} {char!r} {fg} on {bg} is {ratio:.2f}:1")
    return found


async def settle(pilot: object, app: LooptermApp) -> None:
    await pilot.pause(0.3)  # type: ignore[attr-defined]
    await app.animator.wait_until_complete()


@pytest.mark.parametrize("theme", list(THEMES))
async def test_every_pair_the_app_paints_is_readable(theme: str, runs_db: tuple[Path, str]) -> None:
    minimum = THEMES[theme]
    db, parent = runs_db
    app = LooptermApp(db, theme=theme, frozen=True, watch_run=parent)
    problems: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        deadline = 30.0
        while deadline > 0 and not (app.view is not None and not app.view.loading and app.timeline.row_count):
            await pilot.pause(0.1)
            deadline -= 0.1
        assert app.timeline.row_count, "the run's iterations never showed"
        assert app.theme == theme
        tree = app.main.query_one(Tree)
        assert len(tree.root.children) == 1 and tree.root.children[0].children, "the branch is not under its parent"

        await settle(pilot, app)
        problems += failures(app, "timeline focused", minimum)
        await pilot.hover("#timeline", offset=(10, 3))
        await settle(pilot, app)
        problems += failures(app, "timeline hovered", minimum)

        tree.focus()
        tree.move_cursor(tree.root.children[0].children[0])
        await settle(pilot, app)
        problems += failures(app, "tree focused, branch selected", minimum)
        await pilot.hover("#runs", offset=(6, 0))
        await settle(pilot, app)
        problems += failures(app, "tree hovered", minimum)

        app.action_help()
        await settle(pilot, app)
        problems += failures(app, "help", minimum)
        app.pop_screen()

        app.action_command_palette()
        await settle(pilot, app)
        problems += failures(app, "command palette", minimum)
        await pilot.press("escape")

        prompt = TextPrompt("Add a fact", "a fact")
        app.push_screen(prompt)
        await settle(pilot, app)
        prompt.fail("type something first: an empty answer is not sent")
        await settle(pilot, app)
        assert prompt.error_text
        problems += failures(app, "dialog with its error line", minimum)
    assert not problems, f"{len(problems)} pairs under {minimum}:1 in {theme}:\n" + "\n".join(problems)


async def test_the_scan_sees_a_failing_pair(runs_db: tuple[Path, str]) -> None:
    """The scan is not blind: a tree drawn black on black in high-contrast is caught."""
    db, parent = runs_db
    app = LooptermApp(db, theme="loopterm-high-contrast", frozen=True, watch_run=parent)
    async with app.run_test(size=SIZE) as pilot:
        while not app.timeline.row_count:
            await pilot.pause(0.1)
        tree = app.main.query_one(Tree)
        tree.set_styles("color: #000000;")  # every label drawn black on black
        tree.refresh()
        await settle(pilot, app)
        problems = failures(app, "broken", 7.0)
    assert any("RunTree" in p and "#000000 on #000000" in p for p in problems), problems
