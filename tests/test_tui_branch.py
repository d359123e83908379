"""The branch dialog as a person uses it: `b` on an iteration, type a patch, Tab, type why, ctrl+s, and a patched,
relaxed branch runs; its first Diff shows the patch. Every field is reachable by Tab, top to bottom, and what is
typed in each reaches the branch; bad input is refused in the dialog with nothing created."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.widgets import Input, RadioButton, SelectionList, Static

from loopterm.core import Invariant, LoopState, Remediation, runlog
from loopterm.core.engine import Engine
from loopterm.core.fold import fold
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.branch import BranchScreen
from loopterm.tui.screens.dialog import JsonEditor
from tests.loopkit import decision, make_loop, of

SIZE = (140, 40)
PATCH = 'memory.subgoal="write ok"'
REASON = "the flag was never meant to say bad"


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


def written(state: LoopState) -> list[str]:
    return [str(r.args.get("text", "")) for r in state.tool_results if r.tool == "write"]


# Once "bad" was written it stays in the history: a branch from there stops on it at once unless it is relaxed.
NEVER_BAD = Invariant(name="never_bad", check=lambda s: "bad" not in written(s), remediation=Remediation.ESCALATE,
                      description="the flag never said 'bad'")
SHORT = Invariant(name="short_flag", check=lambda s: all(len(t) < 50 for t in written(s)),
                  remediation=Remediation.PRUNE_CONTEXT, description="flag text stays short")


def turn(text: str) -> dict[str, Any]:
    return {"content": decision("write", text=text)}


def db_of(tmp_path: Path) -> Path:
    return tmp_path / "db" / "loopterm.db"


async def parent_run(tmp_path: Path, texts: list[str]) -> tuple[Any, str]:
    """A parent run outside the TUI: it writes each text in turn; after "bad" it escalates on never_bad."""
    from loopterm.core.model import check_model

    loop = make_loop(tmp_path, [turn(t) for t in texts], invariants=[NEVER_BAD, SHORT])
    check_model(loop.model, loop.script)
    store = Store.open(db_of(tmp_path))
    engine = Engine.create(loop, store, loop_ref="test:t", workspace_root=db_of(tmp_path).parent / "workspaces",
                           workdir=tmp_path)
    await engine.run()
    store.close()
    return loop, engine.run_id


def app_for(tmp_path: Path, loop: Any, run_id: str) -> LooptermApp:
    return LooptermApp(db_of(tmp_path), theme="textual-dark", frozen=True, loops={"test:t": loop}, watch_run=run_id)


async def until(pilot: Any, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


async def opened_at(pilot: Any, app: LooptermApp, rows: int, row: int) -> BranchScreen:
    """The run loaded and iteration `row + 1` selected (not counted as branching keys); then `b`."""
    await until(pilot, lambda: app.view is not None and not app.view.loading and app.timeline.row_count == rows,
                "the run loaded")
    app.timeline.move_cursor(row=row)
    await pilot.pause()
    await pilot.press("b")
    await until(pilot, lambda: isinstance(app.screen, BranchScreen), "the branch dialog")
    return app.screen  # type: ignore[return-value]


def focused_id(app: LooptermApp) -> str | None:
    return app.focused.id if app.focused is not None else None


def branches(app: LooptermApp, parent: str) -> list[Any]:
    return app.store.children(parent)


# ---------------------------------------------------------------------- the journey


async def test_a_running_patched_relaxed_branch_in_three_keys_plus_the_typed_text(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view is not None and not app.view.loading and app.timeline.row_count == 2,
                    "the escalated parent loaded")
        app.timeline.move_cursor(row=1)  # iteration 2, where never_bad failed
        await pilot.pause()
        keys = 0

        async def key(name: str) -> None:
            nonlocal keys
            keys += 1
            await pilot.press(name)

        await key("b")
        await until(pilot, lambda: isinstance(app.screen, BranchScreen), "the branch dialog")
        screen = app.screen
        assert focused_id(app) == "patches"  # focus on the first field: the patch goes where it is typed
        await pilot.press(*PATCH)
        await key("tab")
        assert focused_id(app) == "reason"
        await pilot.press(*REASON)
        # the invariant that failed at the fork point is offered relaxed, visibly
        relax = screen.query_one("#relax", SelectionList)
        assert relax.selected == ["never_bad"]
        assert "failed at iteration 2" in str(relax.get_option_at_index(0).prompt)
        await key("ctrl+s")
        await until(pilot, lambda: len(branches(app, parent)) == 1, "the branch in the store")
        assert keys <= 4, keys
        assert keys == 3

        child = branches(app, parent)[0]
        await until(pilot, lambda: app.view is not None and app.view.run_id == child.id, "the branch on screen")
        await until(pilot, lambda: app.store.get_run(child.id).status == "converged", "the branch ran to the end")
        events = app.store.events(child.id)
        forked = of(events, runlog.Forked)[0]
        assert forked.reason == REASON
        assert forked.patches == [{"path": ["memory", "subgoal"], "value": "write ok"}]
        assert forked.patched_state is not None and forked.patched_state["memory"]["subgoal"] == "write ok"
        assert forked.relaxed == {"never_bad": REASON}
        assert [(e.invariant, e.reason) for e in of(events, runlog.InvariantRelaxed)] == [("never_bad", REASON)]
        assert not of(events, runlog.Escalated)  # relaxed: it did not stop on never_bad at once
        own = [r for r in app.store.iter_iterations(child.id) if r.run_id == child.id]
        assert own and own[0].n == 3
        assert "write ok" in json.dumps(own[0].prompt)  # the patched subgoal reached the model


async def test_tab_walks_the_fields_top_to_bottom(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        await opened_at(pilot, app, 2, 1)
        order = [focused_id(app)]
        for _ in range(6):
            await pilot.press("tab")
            order.append(focused_id(app))
        assert order == ["patches", "reason", "relax", "model", "start", "submit", "cancel"]
        for _ in range(5):
            await pilot.press("shift+tab")
        assert focused_id(app) == "reason"


async def test_unticking_the_default_relaxation_records_none_and_the_branch_stops_on_it(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened_at(pilot, app, 2, 1)
        await pilot.press("tab", *"try without relaxing", "tab")
        assert focused_id(app) == "relax"
        await pilot.press("space")  # unticks never_bad, the highlighted first row
        assert screen.query_one("#relax", SelectionList).selected == []
        await pilot.press("ctrl+s")
        await until(pilot, lambda: len(branches(app, parent)) == 1, "the branch in the store")
        child = branches(app, parent)[0]
        await until(pilot, lambda: app.store.get_run(child.id).status == "escalated", "the branch stopped on it")
        events = app.store.events(child.id)
        assert of(events, runlog.Forked)[0].relaxed == {}
        assert not of(events, runlog.InvariantRelaxed)
        assert "never_bad" in of(events, runlog.Escalated)[0].summary


async def test_ticking_an_invariant_that_held_relaxes_it_with_the_reason(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened_at(pilot, app, 2, 1)
        relax = screen.query_one("#relax", SelectionList)
        assert "held at iteration 2" in str(relax.get_option_at_index(1).prompt)
        await pilot.press("tab", *"long flags are fine here", "tab", "down", "space", "ctrl+s")
        await until(pilot, lambda: len(branches(app, parent)) == 1, "the branch in the store")
        events = app.store.events(branches(app, parent)[0].id)
        relaxed = {e.invariant: e.reason for e in of(events, runlog.InvariantRelaxed)}
        assert relaxed == {"never_bad": "long flags are fine here", "short_flag": "long flags are fine here"}


async def test_the_model_can_be_changed(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened_at(pilot, app, 2, 1)
        model = screen.query_one("#model", Input)
        assert model.value == app.store.get_run(parent).model == "scripted/t"  # prefilled with the parent's
        await pilot.press("tab", *"another model", "tab", "tab")
        assert focused_id(app) == "model"
        await pilot.press("end", *"-bis", "ctrl+s")
        await until(pilot, lambda: len(branches(app, parent)) == 1, "the branch in the store")
        child = branches(app, parent)[0]
        assert child.model == "scripted/t-bis"
        assert of(app.store.events(child.id), runlog.Forked)[0].model == "scripted/t-bis"
        await until(pilot, lambda: app.store.get_run(child.id).status == "converged", "the branch ran")
        own = [r for r in app.store.iter_iterations(child.id) if r.run_id == child.id]
        assert own[0].model == "scripted/t-bis"


async def test_a_branch_can_start_paused(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened_at(pilot, app, 2, 1)
        assert screen.query_one("#start-running", RadioButton).value  # running by default
        await pilot.press("tab", *"look first", "tab", "tab", "tab")
        assert focused_id(app) == "start"
        await pilot.press("right", "space")
        assert screen.query_one("#start-paused", RadioButton).value
        await pilot.press("ctrl+s")
        await until(pilot, lambda: len(branches(app, parent)) == 1, "the branch in the store")
        child = branches(app, parent)[0]
        await until(pilot, lambda: app.store.get_run(child.id).status == "paused", "the branch paused")
        await pilot.pause(0.5)
        assert [r.n for r in app.store.iter_iterations(child.id) if r.run_id == child.id] == []  # nothing ran
        await until(pilot, lambda: app.view is not None and app.view.run_id == child.id, "the branch on screen")
        app.timeline.focus()
        await pilot.press("space")  # resumes it
        await until(pilot, lambda: app.store.get_run(child.id).status == "converged", "the branch ran once resumed")


@pytest.mark.parametrize(
    ("patch", "reason", "model", "expect"),
    [
        ('memory.nope.deeper="x"', "why", None, "no field"),
        ("memory.subgoal=not json", "why", None, "not JSON"),
        ('memory.subgoal="x"', "", None, "give a reason"),
        ('memory.subgoal="x"', "why", "nosuchprovider/some-model", "unknown model"),
    ],
)
async def test_bad_input_is_one_line_in_the_dialog_and_creates_nothing(
    tmp_path: Path, patch: str, reason: str, model: str | None, expect: str,
) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened_at(pilot, app, 2, 1)
        before = [e.id for e in app.store.events(parent)]
        await pilot.press(*patch, "tab", *reason)
        if model is not None:
            screen.query_one("#model", Input).value = model
        await pilot.press("ctrl+s")
        await until(pilot, lambda: expect in screen.error_text, f"the error line saying {expect!r}", timeout=90)
        assert "\n" not in screen.error_text
        assert str(screen.query_one("#dialog-error", Static).render()).strip() == screen.error_text
        assert app.screen is screen  # still open: what was typed is still there to fix
        assert screen.query_one("#patches", JsonEditor).text == patch
        assert app.store.children(parent) == [] and len(app.store.list_runs()) == 1
        assert [e.id for e in app.store.events(parent)] == before  # not even a `branched` on the parent


def test_an_unknown_invariant_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    """The dialog offers only the loop's invariants; the planner behind it still refuses any other name."""
    import asyncio

    from loopterm.core.errors import ConfigError
    from loopterm.core.fork import plan_fork

    loop, parent = asyncio.run(parent_run(tmp_path, ["no", "bad"]))
    store = Store.open(db_of(tmp_path))
    with pytest.raises(ConfigError, match="no invariant 'nope'"):
        plan_fork(store, loop, store.get_run(parent), 2, relax=["nope"], reason="why")
    assert len(store.list_runs()) == 1


async def test_the_dialog_lists_the_side_effecting_calls_the_branch_may_reach_again(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "maybe", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened_at(pilot, app, 3, 0)
        listed = str(screen.query_one("#side-effects", Static).render())
        assert "after iteration 1" in listed
        assert 'iteration 2 write({"text": "maybe"}) → asks you before repeating it' in listed
        assert 'iteration 3 write({"text": "ok"})' in listed
        await pilot.press("escape")
        screen = await opened_at(pilot, app, 3, 2)
        assert "No side-effecting call after iteration 3" in str(screen.query_one("#side-effects", Static).render())


# ---------------------------------------------------------------------- the Diff at the fork point


async def test_the_first_diff_of_a_branch_shows_the_patch_and_compares_with_the_patched_state(tmp_path: Path) -> None:
    loop, parent = await parent_run(tmp_path, ["no", "bad", "ok"])
    app = app_for(tmp_path, loop, parent)
    async with app.run_test(size=SIZE) as pilot:
        await opened_at(pilot, app, 2, 1)
        await pilot.press(*PATCH, "tab", *REASON, "ctrl+s")
        await until(pilot, lambda: len(branches(app, parent)) == 1, "the branch in the store")
        child = branches(app, parent)[0]
        await until(pilot, lambda: app.store.get_run(child.id).status == "converged", "the branch ran")
        await until(pilot, lambda: app.view is not None and app.view.run_id == child.id
                    and app.timeline.row_count == 3, "the branch's timeline")
        assert fold(app.store.events(child.id)).fork_point is not None
        app.timeline.move_cursor(row=2)  # iteration 3: the branch's first
        await pilot.pause()
        await until(pilot, lambda: app.detail.detail_context is not None
                    and app.detail.detail_context.record.n == 3, "iteration 3 in the detail")
        diff = app.detail.body("diff").plain
        assert 'patched at the fork: memory.subgoal = "write ok"' in diff
        assert f"relaxed at the fork: never_bad ({REASON})" in diff
        # compared with the patched state: the subgoal goes from the patch to what the model chose
        assert '-    "subgoal": "write ok"' in diff
        assert '+    "subgoal": "make progress"' in diff

        app.timeline.move_cursor(row=1)  # iteration 2, the parent's: no fork note
        await until(pilot, lambda: app.detail.detail_context is not None
                    and app.detail.detail_context.record.n == 2, "iteration 2 in the detail")
        assert "fork" not in app.detail.body("diff").plain


# ---------------------------------------------------------------------- snapshot (the lead makes the baseline)


SNAPSHOT_ID = "b4a9c4b4a9c4"
BASE_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _normalised(value: Any, key: str = "") -> Any:
    """Clock readings fixed, so the picture is the same on every run."""
    if isinstance(value, dict):
        return {k: _normalised(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v, key) for v in value]
    if key in ("created_at", "updated_at", "started_at", "ended_at", "ts", "finished_at") and isinstance(value, (int, float)):
        return BASE_TS
    if key == "latency_ms" and isinstance(value, (int, float)):
        return 400.0
    if key in ("elapsed_s", "duration_s") and isinstance(value, (int, float)):
        return 6.5 if key == "elapsed_s" else 0.25
    return value


def test_branch_dialog_at_80x24(snap_compare: Any, tmp_path: Path) -> None:
    """The dialog on an escalated run's iteration 2 (never_bad failed there: offered relaxed), a patch and a
    reason typed: every field, the buttons and the keys line on screen at 80x24."""
    import asyncio

    from loopterm.store.transfer import seal

    loop, parent = asyncio.run(parent_run(tmp_path, ["no", "bad"]))
    source = Store.open(db_of(tmp_path))
    lines = [json.dumps(item).replace(parent, SNAPSHOT_ID).replace(str(tmp_path), "/tmp/loopterm")
             for item in source.export_run(parent)]
    source.close()
    db = tmp_path / "snap" / "loopterm.db"
    target = Store.open(db)
    target.import_lines([json.dumps(item) for item in seal(_normalised(json.loads(line)) for line in lines)])
    target.close()

    async def open_the_dialog(pilot: Any) -> None:
        await opened_at(pilot, pilot.app, 2, 1)
        await pilot.press(*PATCH, "tab", *REASON)

    app = LooptermApp(db, theme="loopterm-dark", frozen=True, loops={"test:t": loop}, watch_run=SNAPSHOT_ID)
    assert snap_compare(app, terminal_size=(80, 24), run_before=open_the_dialog)
