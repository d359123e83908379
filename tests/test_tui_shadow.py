"""Shadow mode through the real TUI: a shadow run started in the App, every proposal answered with the
real screens and keys (agree, edit, deny, from the main screen and from the inbox), nothing executed,
then `loopterm eval LOOP --shadow` reports the per-tool agreement those answers make."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.widgets import Button, Input, Static, TextArea

from loopterm.core.loader import load_loop
from loopterm.tui.app import LooptermApp
from loopterm.tui.cli import main
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen
from loopterm.core.runlog import ShadowVerdict
from tests.loopkit import of
from tests.shadowkit import EXPECTED_TOOLS, EXPECTED_TOTALS, trace, write_loop

SIZE = (140, 40)


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("COLUMNS", "200")


async def until(pilot: Any, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def waiting_at(app: LooptermApp, n: int) -> bool:
    view = app.view
    return view is not None and any(p.iteration == n for p in view.log.approvals.values())


async def open_dialog(pilot: Any, app: LooptermApp, key: str) -> ApprovalScreen:
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the shadow dialog")
    screen = app.screen
    assert isinstance(screen, ApprovalScreen)
    title = str(screen.query_one("#dialog-title", Static).render())
    assert "shadow: nothing will run" in title
    assert str(screen.query_one("#approve", Button).label) == "Agree"
    return screen


async def test_answer_a_shadow_run_in_the_tui_then_eval_reports_the_agreement(tmp_path: Path) -> None:
    folder = tmp_path / "loop"
    loop_file = write_loop(folder)
    loop, ref = load_loop(str(loop_file))
    db = tmp_path / "db" / "loopterm.db"
    app = LooptermApp(db, theme="textual-dark", frozen=True, start=(loop, ref), shadow=True)
    async with app.run_test(size=SIZE) as pilot:
        # 1: write(notes.txt) -> agree, with `a` and ctrl+s
        await until(pilot, lambda: waiting_at(app, 1), "the first proposal")
        assert "◐ SHADOW" in app._header_shown and "shadow proposal: write(" in app._header_shown
        await until(pilot, lambda: any("proposes tool write (shadow: nothing will run" in str(n.message)
                                       for n in app._notifications), "the shadow notice")
        await open_dialog(pilot, app, "a")
        await pilot.press("ctrl+s")
        # 2: lookup -> edit the arguments, then agree: what should have happened instead
        await until(pilot, lambda: waiting_at(app, 2), "the second proposal")
        screen = await open_dialog(pilot, app, "a")
        screen.query_one("#args", TextArea).text = '{"query": "release date 2.1"}'
        screen.query_one("#reason", Input).value = "be specific"
        await pilot.click("#approve")
        # 3: write(notes.txt, "soon") -> deny, from the inbox: x, enter, d, a reason, enter
        await until(pilot, lambda: waiting_at(app, 3), "the third proposal")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, InboxScreen), "the inbox")
        await pilot.pause(0.2)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EscalationScreen), "the run's escalation screen")
        await until(pilot, lambda: "Shadow proposal (nothing will run)" in
                    str(app.screen.query_one("#esc-packet-text", Static).render()), "the proposal in the packet")
        screen = await open_dialog(pilot, app, "d")
        reason = screen.query_one("#reason", Input)
        reason.focus()
        reason.value = "never write a vague date"
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, ApprovalScreen), "the dialog closed")
        # Answered: once the run no longer waits on what was pending then, the escalation screen closes itself
        # (the run's next proposal, asked a few ms later, does not hold it open), and the inbox with it when no
        # other run waits: no key pressed. Before, the screen stayed whenever its reload saw the next proposal.
        await until(pilot, lambda: not isinstance(app.screen, (EscalationScreen, InboxScreen)), "back on the main screen")
        # 4: lookup -> agree with the button
        await until(pilot, lambda: waiting_at(app, 4), "the fourth proposal")
        await open_dialog(pilot, app, "a")
        await pilot.click("#approve")
        # 5: write(other.txt) -> another tool instead (a tool the loop lacks is refused in the dialog first)
        await until(pilot, lambda: waiting_at(app, 5), "the fifth proposal")
        screen = await open_dialog(pilot, app, "a")
        screen.query_one("#tool", Input).value = "lookup_everything"
        await pilot.click("#approve")
        assert "no tool 'lookup_everything' in this loop (its tools: write, lookup)" in screen.error_text
        screen.query_one("#tool", Input).value = "lookup"
        await pilot.click("#approve")
        assert "invalid arguments for tool 'lookup'" in screen.error_text  # write's arguments do not fit lookup
        screen.query_one("#args", TextArea).text = '{"query": "who owns other.txt"}'
        screen.query_one("#reason", Input).value = "ask first"
        await pilot.click("#approve")

        run_id = app.view.run_id if app.view else ""
        await until(pilot, lambda: app.store.get_run(run_id).status == "terminated", "the run's end (max iterations)")
        assert app.timeline.row_count == 5
        assert "◐ SHADOW" in app._header_shown
        workspace = Path(app.store.get_run(run_id).workspace)

    assert trace(folder) == ""  # no tool and no gate ran, whatever the verdict
    assert (workspace / "notes.txt").read_text() == "original\n" and not (workspace / "other.txt").exists()

    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["eval", str(loop_file), "--shadow", "--json", "--db", str(db)])
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["tools"] == EXPECTED_TOOLS and report["totals"] == EXPECTED_TOTALS
    assert [r["run_id"] for r in report["runs"]] == [run_id]


SHADOW_ID = "5ad0e5ad0e00"


@pytest.fixture
def shadow_db(tmp_path: Path) -> Path:
    """A codefix shadow run waiting on its first proposal, as `loopterm watch` sees a headless one (its
    ids, times and paths normalised as tests/test_tui_snapshots.py does, so the picture is stable)."""
    import asyncio

    from loopterm.core.engine import Engine
    from loopterm.core.model import check_model
    from loopterm.examples.codefix.loop import loop as codefix
    from loopterm.store import Store
    from tests.test_tui_snapshots import _normalise

    check_model(codefix.model, codefix.script)
    source = Store.open(tmp_path / "source.db")
    engine = Engine.create(codefix, source, loop_ref="codefix", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           shadow=True)
    waiting = asyncio.run(engine.run())
    assert waiting.status == "escalated" and "shadow" in (waiting.message or "")
    db = tmp_path / "db" / "loopterm.db"
    target = Store.open(db)
    lines = []
    for item in source.export_run(engine.run_id):
        if item.get("kind") == "run_finished":
            continue  # --no-wait ended it; a run still waiting (`--headless` without it) has no end yet
        text = json.dumps(item).replace(engine.run_id, SHADOW_ID).replace(str(tmp_path), "/tmp/loopterm")
        lines.append(json.dumps(_normalise(json.loads(text))))
    from loopterm.store.transfer import seal  # rewritten on purpose, so its counts and digests are made again

    target.import_lines([json.dumps(item) for item in seal(json.loads(line) for line in lines)])
    source.close()
    target.close()
    return db


def test_the_shadow_dialog_snapshot(snap_compare: Any, shadow_db: Path) -> None:
    async def open_the_dialog(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: app.view is not None and not app.view.loading and app.view.log.approvals,
                    "the proposal on screen")
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the shadow dialog")
        await pilot.pause()

    app = LooptermApp(shadow_db, watch_run=SHADOW_ID, theme="loopterm-dark", frozen=True)
    assert snap_compare(app, terminal_size=(130, 36), run_before=open_the_dialog)


async def test_a_shadow_run_that_stopped_waiting_is_continued_from_watch_and_stays_shadow(tmp_path: Path) -> None:
    """`--shadow --headless --no-wait` exits 4 at the first proposal; `r` in `loopterm watch RUN` continues it
    in that window, in shadow mode: the proposal is asked again, answered there, and still nothing runs."""
    folder = tmp_path / "loop"
    loop_file = write_loop(folder)
    db = tmp_path / "db" / "loopterm.db"
    db.parent.mkdir()  # a --db in a folder that does not exist is refused
    import asyncio

    argv = ["run", str(loop_file), "--shadow", "--headless", "--no-wait", "--db", str(db)]
    assert await asyncio.to_thread(main, argv) == 4  # the CLI runs its own event loop
    app = LooptermApp(db, theme="textual-dark", frozen=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and not app.view.loading, "the run on screen")
        assert "◐ SHADOW" in app._header_shown
        run_id = app.view.run_id
        await pilot.press("r")
        await until(pilot, lambda: waiting_at(app, 1), "the proposal asked again")
        await open_dialog(pilot, app, "d")
        app.screen.query_one("#reason", Input).value = "not yet"
        await pilot.click("#deny")
        await until(pilot, lambda: waiting_at(app, 2), "the next proposal")
        await pilot.press("s")
        await until(pilot, lambda: app.store.get_run(run_id).status == "stopped", "stopped")
        verdicts = of(app.store.events(run_id), ShadowVerdict)
    assert [(v.tool, v.verdict, v.reason) for v in verdicts] == [("write", "deny", "not yet")]
    assert trace(folder) == ""
