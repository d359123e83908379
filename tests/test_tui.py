"""Pilot tests of the supervision TUI: a real store in tmp_path, small scripted loops, the App driving engines.

Tests marked `engine_control` need the engine to obey the control channel
(pause/step/edit/relax/approve/deny/resume, DESIGN section 6); the rest only
need the store and the App.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from rich.console import Console
from textual.widgets import Input, TextArea

from loopterm.core import Invariant, LoopState, Remediation, ToolContext, runlog, tool
from loopterm.core.engine import Engine
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.bindings import SUPERVISION_BINDINGS
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.screens.branch import BranchScreen
from loopterm.tui.screens.dialog import TextPrompt
from loopterm.tui.screens.edit_state import EditStateScreen
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen
from loopterm.tui.screens.help import HelpScreen
from loopterm.tui.screens.relax import RelaxScreen
from loopterm.tui.screens.side_effect import SideEffectScreen
from tests.loopkit import FLAG_GATE, decision, make_loop, of, write

SIZE = (140, 40)
THEME = "textual-dark"


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's loopterm settings or theme files."""
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))



def turn(text: str, *, delay: float = 0.0, tool_name: str = "write", **kwargs: Any) -> dict[str, Any]:
    return {"content": decision(tool_name, text=text, **kwargs), "delay": delay}


def db_of(tmp_path: Path) -> Path:
    (tmp_path / "db").mkdir(exist_ok=True)  # a --db or LOOPTERM_DB in a folder that does not exist is refused
    return tmp_path / "db" / "loopterm.db"


def app_for(tmp_path: Path, **kwargs: Any) -> LooptermApp:
    return LooptermApp(db_of(tmp_path), theme=THEME, frozen=True, **kwargs)


async def until(pilot: Any, condition: Callable[[], Any], what: str | Callable[[], str], timeout: float = 15.0) -> None:
    """Wait for condition; `what` may be a function, to say what was on hand when it timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what() if callable(what) else what}")


def loaded(app: LooptermApp) -> bool:
    return app.view is not None and not app.view.loading


def status(app: LooptermApp) -> str:
    assert app.view is not None
    return app.store.get_run(app.view.run_id).status


def pending(app: LooptermApp, run_id: str) -> list[Any]:
    return app.store.pending_commands(run_id)


def cell_text(app: LooptermApp, row: int, column: str) -> str:
    return app.timeline.cell_text(row, column)


async def finished_run(tmp_path: Path, turns: list[Any], **loop_kwargs: Any) -> tuple[Any, str]:
    """Run a small loop to its end outside the TUI (as `loopterm run --headless` would); returns (loop, run id)."""
    from loopterm.core.model import check_model

    loop = make_loop(tmp_path, turns, **loop_kwargs)
    check_model(loop.model, loop.script)
    store = Store.open(db_of(tmp_path))
    engine = Engine.create(loop, store, loop_ref="test:t", workspace_root=db_of(tmp_path).parent / "workspaces",
                           workdir=tmp_path)
    await engine.run()
    store.close()
    return loop, engine.run_id


def last_written(state: LoopState) -> str:
    results = [r for r in state.tool_results if r.tool in ("write", "guarded_write")]
    return str(results[-1].args.get("text", "")) if results else ""


NO_BAD = Invariant(name="no_bad", check=lambda s: last_written(s) != "bad", remediation=Remediation.ESCALATE,
                   description="the flag is never set to 'bad'")
SHORT = Invariant(name="short_flag", check=lambda s: len(last_written(s)) < 50, remediation=Remediation.PRUNE_CONTEXT,
                  description="flag text stays short")


@tool(side_effects=True, idempotent=True, needs_approval=True)
def guarded_write(ctx: ToolContext, text: str) -> str:
    """Write flag.txt, but only once a person approves."""
    (ctx.workspace / "flag.txt").write_text(text)
    return f"wrote {text!r}"


# ---------------------------------------------------------------------- live run, timeline, detail


async def test_iterations_appear_live_and_a_row_shows_its_detail(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, [turn("no", delay=0.3, subgoal="first try"), turn("still no", delay=0.3),
                                turn("ok", delay=0.3, subgoal="write ok")], invariants=[SHORT])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count >= 1, "the first iteration on screen",
                    timeout=60)  # the first model check in this process imports litellm (seconds under load)
        assert app.store.get_run(app.view.run_id).status == "running"  # appended while the run is still going
        assert app.timeline.row_count < 3
        await until(pilot, lambda: app.timeline.row_count == 3 and status(app) == "converged", "three rows, converged")
        assert cell_text(app, 0, "action") == "write(no)"
        assert "✗flag" in cell_text(app, 0, "gates") and "✓flag" in cell_text(app, 2, "gates")
        assert cell_text(app, 0, "subgoal") == "first try"
        assert app.view.costs and len(app.view.costs) == 3  # the spend sparkline's data

        app.timeline.focus()
        app.timeline.move_cursor(row=0)
        await pilot.pause()
        detail = app.detail
        assert app.view.detail_n == 1
        assert "first try" in detail.body("reasoning").plain
        assert "because" in detail.body("reasoning").plain
        assert "make flag.txt say ok" in detail.body("prompt").plain
        assert '"text": "no"' in detail.body("response").plain
        assert "write" in detail.body("tool").plain and "wrote 2 characters" in detail.body("tool").plain
        assert "✗ flag" in detail.body("gates").plain and "flag is no" in detail.body("gates").plain
        assert '+  "iteration": 1' in detail.body("diff").plain
        assert "short_flag" in detail.body("invariants").plain and "holds" in detail.body("invariants").plain
        # switching tabs renders the tab (the state as a tree)
        from textual.widgets import TabbedContent

        app.detail.query_one(TabbedContent).active = "tab-state"
        await pilot.pause()
        tree = app.detail.query_one("#state-tree")
        labels = [str(node.label) for node in tree.root.children]
        assert any(label.startswith("iteration: 1") for label in labels)
        # the runs tree lists the run
        assert app.view.run_id in app.run_tree.run_ids


async def test_untrusted_text_is_shown_literally(tmp_path: Path) -> None:
    hostile = "[bold red]boom[/] \x1b[31mred\x1b[0m [link=http://x]y[/link]"
    first = {**decision("write", text=hostile, subgoal=hostile), "reasoning": hostile}
    loop = make_loop(tmp_path, [{"content": first}, turn("ok")])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count == 2 and status(app) == "converged", "the run converged")
        app.timeline.move_cursor(row=0)
        await pilot.pause()
        shown = cell_text(app, 0, "subgoal")
        assert shown.startswith("[bold red]boom[/] \\x1b[31mred")
        reasoning = app.detail.body("reasoning")
        assert "[bold red]boom[/] \\x1b[31mred\\x1b[0m [link=http://x]y[/link]" in reasoning.plain
        assert not any("red" in str(span.style) and "bold" in str(span.style) for span in reasoning.spans
                       if reasoning.plain[span.start:span.end] == "boom")
        assert "[bold red]boom[/]" in app.detail.body("tool").plain
        assert "[bold red]boom[/]" in app.detail.body("response").plain
        svg = app.export_screenshot()
        assert "[bold&#160;red]boom[/]" in svg or "[bold red]boom[/]" in svg.replace("&#160;", " ")
        assert "\x1b" not in svg


# ---------------------------------------------------------------------- help and the command palette


async def test_help_screen_lists_every_binding(tmp_path: Path) -> None:
    await finished_run(tmp_path, [turn("ok")])
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "the run loaded")
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        console = Console(width=160, record=True, file=open(os.devnull, "w"))
        console.print(app.screen.table())
        text = console.export_text()
        for binding in SUPERVISION_BINDINGS:
            assert binding.description in text, binding.description
            assert binding.tooltip.split()[0] in text
            assert binding.id, f"binding {binding.key} has no id"
            assert binding.tooltip, f"binding {binding.key} has no tooltip"
        for key in ("space", "?", "/", "n", "e", "i", "b", "a", "d", "x", "s", "q"):
            assert f"\n{key} " in "\n" + "\n".join(line.strip() for line in text.splitlines()) + " ", key
        for binding in EscalationScreen.BINDINGS:
            assert binding.description in text  # type: ignore[union-attr]
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_command_palette_offers_every_action(tmp_path: Path) -> None:
    await finished_run(tmp_path, [turn("ok")])
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "the run loaded")
        titles = {command.title for command in app.get_system_commands(app.screen)}
        for binding in SUPERVISION_BINDINGS:
            assert binding.description in titles or binding.action == "app.quit", binding.description
        assert "Quit" in titles and "Theme" in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"branch")
        await pilot.pause(0.5)
        from textual.command import CommandList

        options = app.screen.query_one(CommandList)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert any("Branch" in p for p in prompts), prompts


# ---------------------------------------------------------------------- edit state, relax, branch (store only)


async def test_edit_state_validates_before_sending(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, [turn("no")], max_iterations=1)  # terminated: resumable
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "the run loaded")
        await pilot.press("e")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EditStateScreen)
        area = screen.query_one("#state-json", TextArea)
        original = json.loads(area.text)
        assert original["iteration"] == 1

        area.text = '{"iteration": 1,'  # not JSON
        screen.query_one("#reason", Input).value = "testing"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "not valid JSON" in screen.error_text
        assert isinstance(app.screen, EditStateScreen) and pending(app, run_id) == []

        area.text = json.dumps({**original, "iteration": "many"})  # JSON, but not the state model
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "state model" in screen.error_text and "iteration" in screen.error_text
        assert pending(app, run_id) == []

        area.text = json.dumps({**original, "surprise": 1})  # extra fields are refused too
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "surprise" in screen.error_text and pending(app, run_id) == []

        edited = {**original, "memory": {**original["memory"], "subgoal": "edited by a person"}}
        area.text = json.dumps(edited)
        screen.query_one("#reason", Input).value = ""
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "reason" in screen.error_text and pending(app, run_id) == []

        screen.query_one("#reason", Input).value = "steer it"
        await pilot.click("#submit")
        await pilot.pause()
        assert not isinstance(app.screen, EditStateScreen)
        commands = pending(app, run_id)
        assert [c.kind for c in commands] == ["edit_state"]
        assert commands[0].payload["state"]["memory"]["subgoal"] == "edited by a person"
        assert commands[0].payload["reason"] == "steer it"


async def test_relax_requires_a_reason(tmp_path: Path) -> None:
    loop, run_id = await finished_run(tmp_path, [turn("no")], max_iterations=1, invariants=[SHORT, NO_BAD])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "the run loaded")
        await pilot.press("i")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RelaxScreen)
        await pilot.click("#relax")
        await pilot.pause()
        assert "reason" in screen.error_text and pending(app, run_id) == []
        screen.query_one("#reason", Input).value = "the check is too strict"
        screen.query_one("#iterations", Input).value = "0"
        await pilot.click("#relax")
        await pilot.pause()
        assert "at least 1" in screen.error_text and pending(app, run_id) == []
        screen.query_one("#iterations", Input).value = "2"
        await pilot.click("#relax")
        await pilot.pause()
        commands = pending(app, run_id)
        assert [(c.kind, c.payload) for c in commands] == [
            ("relax", {"invariant": "short_flag", "reason": "the check is too strict", "iterations": 2})]


async def test_a_strategy_change_is_announced_on_screen(tmp_path: Path) -> None:
    from loopterm.core.strategy import Strategy

    same = turn("no", subgoal="same")
    loop = make_loop(tmp_path, [same, same, same, turn("ok", subgoal="new")],
                     strategies=[Strategy(name="careful", note="read the gate output first")])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any("changed strategy to careful" in str(n.message) for n in app._notifications),
                    "the announcement")
        await until(pilot, lambda: status(app) == "converged", "the run converged on the new strategy")


async def test_a_branch_over_the_daily_budget_is_refused_on_screen_and_creates_nothing(tmp_path: Path) -> None:
    loop, parent_id = await finished_run(tmp_path, [turn("no"), turn("ok")])
    store = Store.open(db_of(tmp_path))
    spent = store.get_run(parent_id).cost_usd
    assert spent > 0
    store.set_daily_budget(spent / 2)  # today's spend is already over it
    store.close()
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app) and app.timeline.row_count == 2, "the run loaded")
        app.timeline.move_cursor(row=0)
        await pilot.pause()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#reason", Input).value = "try again"
        await pilot.click("#submit")
        await until(pilot, lambda: any("daily budget is spent" in str(n.message) for n in app._notifications),
                    "the refusal")
        assert [r.id for r in app.store.list_runs()] == [parent_id]


async def test_branch_from_the_selected_iteration_creates_a_live_child_run(tmp_path: Path) -> None:
    loop, parent_id = await finished_run(tmp_path, [turn("no"), turn("ok")])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app) and app.timeline.row_count == 2, "the run loaded")
        app.timeline.move_cursor(row=0)
        await pilot.pause()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BranchScreen) and screen.at == 1
        screen.query_one("#patches", TextArea).text = 'memory.nope.deeper="x"'
        screen.query_one("#reason", Input).value = "try a different subgoal"
        await pilot.click("#submit")
        await pilot.pause()
        assert "no field" in screen.error_text
        assert len(app.store.list_runs()) == 1  # nothing created

        screen.query_one("#patches", TextArea).text = 'memory.subgoal="take the other road"'
        screen.query_one("#reason", Input).value = ""
        await pilot.click("#submit")
        await pilot.pause()
        assert "reason" in screen.error_text and len(app.store.list_runs()) == 1

        screen.query_one("#reason", Input).value = "try a different subgoal"
        await pilot.click("#submit")
        await until(pilot, lambda: len(app.store.list_runs()) == 2, "the branch in the store")
        child = app.store.children(parent_id)[0]
        assert child.fork_iteration == 1 and child.origin == "fork"
        await until(pilot, lambda: child.id in app.run_tree.run_ids, "the branch in the tree")
        assert app.view.run_id == child.id
        # it runs live; its next call repeats one its parent made after the fork point: a person decides
        await until(pilot, lambda: app.view.log.side_effect is not None, "the side-effect question")
        assert app.store.get_run(child.id).status == "escalated"
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, SideEffectScreen)
        await pilot.click("#reexecute")
        await until(pilot, lambda: app.store.get_run(child.id).status == "converged", "the branch converged")
        await until(pilot, lambda: app.timeline.row_count == 2, "the branch's timeline")
        assert cell_text(app, 0, "n") == "↑1"  # inherited from the parent
        assert cell_text(app, 1, "n") == "2"
        forked = of(app.store.events(child.id), runlog.Forked)[0]
        assert forked.reason == "try a different subgoal"
        assert forked.patched_state is not None
        assert forked.patched_state["memory"]["subgoal"] == "take the other road"


async def test_search_filters_the_timeline(tmp_path: Path) -> None:
    await finished_run(tmp_path, [turn("a", subgoal="parse the header"), turn("b", subgoal="fix the footer"),
                                  turn("ok", subgoal="parse the body")])
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app) and app.timeline.row_count == 3, "the run loaded")
        await pilot.press("slash")
        await pilot.press(*"parse")
        await pilot.pause()
        assert "2 of 3 match" in str(app.main.query_one("#search-info").render())
        assert app.store.pending_commands(app.view.run_id) == []  # typing "s", "e" ... sent no command
        await pilot.press("enter")
        await pilot.pause()
        assert app.timeline.row_count == 2
        assert app.focused is app.timeline and app.timeline.selected_n == 1
        assert "parse the header" in app.detail.body("reasoning").plain
        await pilot.press("escape")
        await pilot.pause()
        assert app.timeline.row_count == 3


async def test_browsing_shows_runs_and_switching_runs(tmp_path: Path) -> None:
    _, first = await finished_run(tmp_path, [turn("ok")])
    _, second = await finished_run(tmp_path, [turn("no"), turn("ok")])
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "a run loaded")
        assert app.view.run_id == second  # the newest
        assert set(app.run_tree.run_ids) == {first, second}
        app.show_run(first)
        await until(pilot, lambda: loaded(app) and app.timeline.row_count == 1, "the first run")


# ---------------------------------------------------------------------- controls obeyed by the engine
# These need the engine to obey the control channel (pause/step/resume/edit/relax/approve/deny).


def long_loop(tmp_path: Path, n: int = 12, delay: float = 0.15, **kwargs: Any) -> Any:
    return make_loop(tmp_path, [turn(f"no{i}", delay=delay, subgoal=f"attempt {i}") for i in range(1, n)] + [turn("ok")],
                     max_iterations=n, **kwargs)


async def test_pause_stops_new_iterations_and_step_runs_exactly_one(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count >= 1, "the first iteration")
        await pilot.press("space")
        await until(pilot, lambda: status(app) == "paused", "paused")
        rows = app.timeline.row_count
        await pilot.pause(0.8)
        assert app.timeline.row_count == rows == app.store.get_run(app.view.run_id).iterations
        await pilot.press("n")
        await until(pilot, lambda: app.timeline.row_count == rows + 1, "one more iteration")
        await until(pilot, lambda: status(app) == "paused", "paused again after the step")
        await pilot.pause(0.8)
        assert app.timeline.row_count == rows + 1
        await pilot.press("space")
        await until(pilot, lambda: app.timeline.row_count >= rows + 2, "running again")
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped", "stopped")


async def test_a_valid_edit_is_used_by_the_next_iteration(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count >= 1, "the first iteration")
        await pilot.press("space")
        await until(pilot, lambda: status(app) == "paused", "paused")
        rows = app.timeline.row_count
        await pilot.press("e")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EditStateScreen)
        area = screen.query_one("#state-json", TextArea)
        state = json.loads(area.text)
        state["memory"]["facts"].append("FACT-FROM-A-PERSON")
        area.text = json.dumps(state)
        screen.query_one("#reason", Input).value = "tell it"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(app.store.events(app.view.run_id), runlog.StateEdited),
                    "the edit applied")
        await pilot.press("n")
        await until(pilot, lambda: app.timeline.row_count == rows + 1, "the next iteration")
        record = app.store.get_iteration(app.view.run_id, rows + 1)
        assert "FACT-FROM-A-PERSON" in json.dumps(record.prompt)
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped", "stopped")


async def test_relax_is_obeyed_and_recorded(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path, invariants=[SHORT]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count >= 1, "the first iteration")
        await pilot.press("i")
        await pilot.pause()
        app.screen.query_one("#reason", Input).value = "long flags are fine today"
        await pilot.click("#relax")
        await until(pilot, lambda: "short_flag" in app.view.log.relaxed, "the relaxation recorded")
        event = of(app.store.events(app.view.run_id), runlog.InvariantRelaxed)[0]
        assert event.reason == "long flags are fine today"
        app.timeline.move_cursor(row=app.timeline.row_count - 1)
        await pilot.pause()
        assert "relaxed: long flags are fine today" in app.detail.body("invariants").plain
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped", "stopped")


async def test_approve_and_deny_a_tool_call(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, [turn("first", tool_name="guarded_write"), turn("second", tool_name="guarded_write"),
                                turn("ok", tool_name="write")], tools=[write, guarded_write], gates=[FLAG_GATE])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and app.view.log.approvals, "an approval pending")
        await pilot.press("a")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ApprovalScreen)
        screen.query_one("#args", TextArea).text = '{"text": "edited"}'
        await pilot.click("#approve")
        await until(pilot, lambda: app.timeline.row_count >= 1, "the approved iteration")
        first = app.store.get_iteration(app.view.run_id, 1)
        assert first.tool_call["approval"] == "approve" and first.tool_call["args"] == {"text": "edited"}
        await until(pilot, lambda: app.view.log.approvals, "the second approval pending")
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ApprovalScreen)
        app.screen.query_one("#reason", Input).value = "not that"
        await pilot.click("#deny")
        await until(pilot, lambda: app.timeline.row_count >= 2, "the denied iteration")
        second = app.store.get_iteration(app.view.run_id, 2)
        assert second.tool_call["approval"] == "deny"
        assert second.tool_result["ok"] is False and "not that" in second.tool_result["error"]
        await until(pilot, lambda: status(app) == "converged", "converged")


async def test_an_escalation_answered_in_the_inbox_resumes_the_run(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, [turn("bad"), turn("ok")], invariants=[NO_BAD])
    app = app_for(tmp_path, start=(loop, "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and status(app) == "escalated", "escalated")
        run_id = app.view.run_id
        await pilot.press("x")
        await pilot.pause()
        inbox = app.screen
        assert isinstance(inbox, InboxScreen) and [w.run.id for w in inbox.waiting] == [run_id]
        await pilot.press("enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EscalationScreen)
        packet = screen.query_one("#esc-packet-text").render()
        assert "no_bad" in str(packet)
        await pilot.press("f")
        await pilot.pause()
        assert isinstance(app.screen, TextPrompt)
        app.screen.query_one("#text", Input).value = "never write bad"
        await pilot.press("enter")
        await until(pilot, lambda: of(app.store.events(run_id), runlog.FactAdded), "the fact added")
        await pilot.press("r")
        await until(pilot, lambda: app.store.get_run(run_id).status == "converged", "converged after the answer")
        last = app.store.get_iteration(run_id, 2)
        assert "never write bad" in json.dumps(last.prompt)


async def test_resuming_an_escalated_run_that_nothing_executes_starts_it_here(tmp_path: Path) -> None:
    # a headless run with --no-wait: it escalates and its process ends
    loop, run_id = await finished_run(tmp_path, [turn("bad"), turn("ok")], invariants=[NO_BAD])
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        assert status(app) == "escalated" and not app.executing(run_id)
        await pilot.press("x")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, EscalationScreen)
        await pilot.press("i")
        await pilot.pause()
        app.screen.query_one("#reason", Input).value = "bad is fine once"
        await pilot.click("#relax")
        await pilot.pause()
        await pilot.press("r")
        await until(pilot, lambda: app.store.get_run(run_id).status == "converged", "converged in this window")
        assert of(app.store.events(run_id), runlog.InvariantRelaxed)


async def test_quit_stops_owned_runs_resumably(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(long_loop(tmp_path), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count >= 1, "the first iteration")
        await pilot.press("space")
        await until(pilot, lambda: status(app) == "paused", "paused")
        run_id = app.view.run_id
        await pilot.press("q")
        await until(pilot, lambda: not app.engines, "the engine stopped", timeout=10)
    store = Store.open(db_of(tmp_path))
    run = store.get_run(run_id)
    assert run.status == "stopped" and "resume" in (run.message or "")


LOOP_FILE = '''
import json
from pathlib import Path
from loopterm.core import CommandGate, Loop, LoopState, ToolContext, tool

HERE = Path(__file__).parent

@tool(side_effects=True, idempotent=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write flag.txt."""
    (ctx.workspace / "flag.txt").write_text(text)
    return "wrote"

turns = [{{"content": {{"action": {{"tool": "write", "args": {{"text": f"no{{i}}"}}}}, "subgoal": f"try {{i}}",
          "confidence": 0.5, "reasoning": "r", "done": False}}, "delay": {delay}}} for i in range(30)]
(HERE / "script.json").write_text(json.dumps({{"price": {{"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}},
                                               "turns": turns}}))
loop = Loop(name="watched", goal="never converges", tools=[write], script=HERE / "script.json", max_iterations=30,
            gates=[CommandGate(name="flag", argv=["{{python}}", "-c", "import sys; sys.exit(1)"])], stall_window={stall})
'''


def headless_watched(tmp_path: Path, delay: float = 0.3, stall: int | None = 5) -> tuple[subprocess.Popen[bytes], Path]:
    """`loopterm run watched.py --headless` in a process of its own (`delay` s a reply, 30 iterations, a stall
    after `stall` alike ones ends it); and its db."""
    loop_file = tmp_path / "watched.py"
    loop_file.write_text(textwrap.dedent(LOOP_FILE.format(delay=delay, stall=stall)))
    db = db_of(tmp_path)
    env = {**os.environ, "LOOPTERM_DB": str(db)}
    proc = subprocess.Popen([sys.executable, "-m", "loopterm.tui.cli", "run", str(loop_file), "--headless", "--db", str(db)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, db


async def test_watch_follows_a_run_in_another_process_and_pause_is_obeyed(tmp_path: Path) -> None:
    proc, db = headless_watched(tmp_path)
    try:
        deadline = time.monotonic() + 30
        run_id = None
        while time.monotonic() < deadline and run_id is None:
            await asyncio.sleep(0.2)
            if db.exists():
                runs = Store.open(db).list_runs()
                run_id = runs[0].id if runs else None
        assert run_id, "the headless run never started"
        app = LooptermApp(db, watch_run=run_id[:6], theme=THEME, frozen=True)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: loaded(app) and app.timeline.row_count >= 2, "rows from the other process", 30)
            await pilot.press("space")
            await until(pilot, lambda: status(app) == "paused", "the other process paused", 10)
            rows = app.store.get_run(run_id).iterations
            await pilot.pause(1.0)
            assert app.store.get_run(run_id).iterations == rows and app.timeline.row_count == rows
            await pilot.press("s")
            await until(pilot, lambda: status(app) == "stopped", "the other process stopped", 10)
        assert proc.wait(timeout=20) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_watch_takes_over_at_once_a_run_whose_process_was_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the run 'running' with a fresh heartbeat. The process that started it is gone from this
    machine, so the window does not wait ~10 s for the heartbeat to go stale: `r` resumes it here at once."""
    proc, db = headless_watched(tmp_path)
    try:
        deadline = time.monotonic() + 60
        run_id = None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            runs = Store.open(db).list_runs() if db.exists() else []
            if runs and runs[0].iterations >= 2:
                run_id = runs[0].id
                break
        assert run_id, "the headless run never committed two iterations"
    finally:
        proc.kill()
        proc.wait()
    killed = Store.open(db).get_run(run_id)
    assert killed.status == "running" and time.time() - killed.updated_at < 5  # its heartbeat is still fresh
    app = LooptermApp(db, watch_run=run_id[:6], theme=THEME, frozen=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        assert not app.executing(run_id)
        await pilot.press("r")
        await until(pilot, lambda: run_id in app.engines, "resumed in this window", 5)
        await until(pilot, lambda: app.store.get_run(run_id).iterations > killed.iterations, "a new iteration here", 20)
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped" and not app.engines, "stopped")


async def test_step_on_a_run_nothing_executes_runs_exactly_one_iteration_here(tmp_path: Path) -> None:
    from loopterm.core.model import check_model

    loop = long_loop(tmp_path, delay=0.0)
    check_model(loop.model, loop.script)
    store = Store.open(db_of(tmp_path))
    engine = Engine.create(loop, store, loop_ref="test:t", workspace_root=db_of(tmp_path).parent / "workspaces")
    store.add_command(engine.run_id, "stop", {"reason": "stopped before it began"})
    await engine.run()  # stopped at its first boundary: no iteration, resumable
    app = app_for(tmp_path, loops={"test:t": loop})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        assert status(app) == "stopped" and app.timeline.row_count == 0
        await pilot.press("n")
        await until(pilot, lambda: app.timeline.row_count == 1 and status(app) == "paused", "one iteration, paused")
        assert engine.run_id in app.engines  # the App owns the engine it started
        await pilot.pause(0.6)
        assert app.timeline.row_count == 1
        await pilot.press("s")
        await until(pilot, lambda: status(app) == "stopped" and not app.engines, "stopped")


async def test_the_theme_is_remembered_and_reused(tmp_path: Path) -> None:
    await finished_run(tmp_path, [turn("ok")])
    app = LooptermApp(db_of(tmp_path), frozen=True)  # no theme=: the remembered one (default loopterm-dark)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "loaded")
        assert app.theme == "loopterm-dark"
        app.theme = "loopterm-light"
        await pilot.pause(0.2)
    assert "loopterm-light" in (tmp_path / "config" / "config.toml").read_text()
    again = LooptermApp(db_of(tmp_path), frozen=True)
    async with again.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(again), "loaded")
        assert again.theme == "loopterm-light"
        # status glyphs come from loopterm.themes, coloured from the current theme
        assert str(again.main.query_one("#run-header").render()).count("✓ converged") == 1
