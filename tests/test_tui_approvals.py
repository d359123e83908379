"""The approval dialog as a person uses it (Pilot, real engines on a real store): an approval in 2 keys, a
denial whose typed reason is what is recorded, `a` with nothing pending says so, approval policies made from
the dialog (the next matching call is not asked) and revoked from the policies screen (`p`). Snapshots at
80x24 of the dialog and the policies screen (no baselines are kept here: the lead regenerates them)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, RadioSet, TextArea

from loopterm.core.engine import Engine
from loopterm.core.fold import fold
from loopterm.core.runlog import ApprovalPending, Approved, Denied, PolicyAdded, PolicyDecided, PolicyRevoked
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.screens.policies import PoliciesScreen
from tests.loopkit import FLAG_GATE, make_loop, of, write
from tests.test_tui import SIZE, app_for, db_of, guarded_write, loaded, status, turn, until


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


def gated(tmp_path: Path, texts: list[str], name: str = "t") -> Any:
    """A loop whose model asks to guarded_write each text (a person approves each), then writes "ok"."""
    turns = [turn(text, tool_name="guarded_write", subgoal=f"write {text}") for text in texts] + [turn("ok")]
    return make_loop(tmp_path, turns, name=name, tools=[write, guarded_write], gates=[FLAG_GATE])


def waiting_at(app: LooptermApp, n: int) -> bool:
    return app.view is not None and any(p.iteration == n for p in app.view.log.approvals.values())


def events(app: LooptermApp) -> list[Any]:
    assert app.view is not None
    return app.store.events(app.view.run_id)


def said(app: LooptermApp, text: str) -> bool:
    return any(text in str(n.message) for n in app._notifications)


async def dialog(pilot: Any, key: str) -> ApprovalScreen:
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, ApprovalScreen), "the approval dialog")
    await pilot.pause()
    return pilot.app.screen  # type: ignore[no-any-return]


async def test_an_approval_takes_two_keys_and_the_dialog_says_what_ctrl_s_does(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(gated(tmp_path, ["first"]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: waiting_at(app, 1), "an approval pending", 30)
        screen = await dialog(pilot, "a")  # key 1
        assert screen.focused is screen.query_one("#reason", Input)  # the first field, not a button
        keys = str(screen.query_one("#dialog-keys").render())
        assert "ctrl+s approve" in keys
        await pilot.press("ctrl+s")  # key 2
        await until(pilot, lambda: of(events(app), Approved), "the approval recorded")
        assert not isinstance(app.screen, ApprovalScreen)
        await until(pilot, lambda: status(app) == "converged", "converged", 30)
        assert app.store.get_iteration(app.view.run_id, 1).tool_call["approval"] == "approve"


async def test_a_denial_records_exactly_the_reason_typed(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(gated(tmp_path, ["first"]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: waiting_at(app, 1), "an approval pending", 30)
        screen = await dialog(pilot, "d")
        assert "ctrl+s deny" in str(screen.query_one("#dialog-keys").render())
        for key in "not there":
            await pilot.press("space" if key == " " else key)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(events(app), Denied), "the denial recorded")
        (denied,) = of(events(app), Denied)
        assert denied.reason == "not there"
        await until(pilot, lambda: app.timeline.row_count >= 1, "the denied iteration")
        first = app.store.get_iteration(app.view.run_id, 1)
        assert first.tool_result["error"] == "denied by a person: not there"


async def test_tab_walks_the_dialog_top_to_bottom(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(gated(tmp_path, ["first"]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: waiting_at(app, 1), "an approval pending", 30)
        screen = await dialog(pilot, "a")
        order = []
        for _ in range(4):
            order.append(screen.focused.id if screen.focused is not None else None)
            await pilot.press("tab")
        assert order == ["reason", "args", "remember", "globs"]
        await pilot.press("escape")


async def test_a_or_d_with_nothing_pending_says_so(tmp_path: Path) -> None:
    from tests.test_tui import finished_run

    await finished_run(tmp_path, [turn("ok")])
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app), "the run loaded")
        await pilot.press("a")
        await until(pilot, lambda: said(app, "nothing to approve"), "a says there is nothing to approve")
        await pilot.press("d")
        await until(pilot, lambda: said(app, "nothing to deny"), "d says there is nothing to deny")
        assert not isinstance(app.screen, ApprovalScreen)


async def choose_policy(pilot: Any, screen: ApprovalScreen, scope_index: int, globs: str) -> None:
    """As a person: Tab to "answer calls like this", arrow to the scope, pick it, Tab to the globs, edit them."""
    await pilot.press("tab", "tab")
    assert screen.focused is screen.query_one("#remember", RadioSet)
    for _ in range(scope_index):
        await pilot.press("down")
    await pilot.press("enter")
    assert screen.query_one("#remember", RadioSet).pressed_index == scope_index
    await pilot.press("tab")
    area = screen.query_one("#globs", TextArea)
    assert screen.focused is area and area.text == "text=first"  # prefilled from the call's arguments
    area.text = globs


async def test_a_run_policy_made_in_the_dialog_answers_the_next_matching_call(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(gated(tmp_path, ["first", "fine", "other"]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: waiting_at(app, 1), "an approval pending", 30)
        screen = await dialog(pilot, "a")
        await choose_policy(pilot, screen, 1, "text=f*")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: waiting_at(app, 3), "iteration 3 (text=other) asked", 30)
        log = events(app)
        (made,) = of(log, PolicyAdded)
        assert (made.effect, made.scope, made.globs) == ("approve", "run", {"text": "f*"})
        (decided,) = of(log, PolicyDecided)
        assert decided.policy == made.policy and decided.args == {"text": "fine"}
        assert [e.args["text"] for e in of(log, ApprovalPending)] == ["first", "other"]  # "fine" was not asked
        second = app.store.get_iteration(app.view.run_id, 2)
        assert second.tool_call["policy"] == made.policy
        app.timeline.move_cursor(row=1)
        await until(pilot, lambda: f"approved by policy {made.policy}" in app.detail.body("tool").plain,
                    lambda: f"iteration 2's detail saying the policy (it says: {app.detail.body('tool').plain!r})")
        await pilot.press("a", "ctrl+s")
        await until(pilot, lambda: status(app) == "converged", "converged", 30)


async def test_a_loop_policy_made_in_the_dialog_reaches_the_next_run_of_the_loop(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(gated(tmp_path, ["first"]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: waiting_at(app, 1), "an approval pending", 30)
        screen = await dialog(pilot, "a")
        await choose_policy(pilot, screen, 2, "text=*")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: status(app) == "converged", "converged", 30)
    # A new run of the loop, headless with no one to ask: its call is approved by the loop's policy.
    from loopterm.core.model import check_model

    loop = gated(tmp_path, ["again"], name="t2")
    check_model(loop.model, loop.script)
    store = Store.open(db_of(tmp_path))
    engine = Engine.create(loop, store, loop_ref="test:t", workspace_root=tmp_path / "ws2", workdir=tmp_path)
    final = await engine.run()
    assert final.status == "converged"
    log = store.events(engine.run_id)
    assert of(log, ApprovalPending) == [] and of(log, PolicyDecided)[0].args == {"text": "again"}
    store.close()


async def test_the_policies_screen_lists_and_revokes(tmp_path: Path) -> None:
    app = app_for(tmp_path, start=(gated(tmp_path, ["first", "second"]), "test:t"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: waiting_at(app, 1), "an approval pending", 30)
        screen = await dialog(pilot, "d")
        await pilot.press(*"no")
        await choose_policy(pilot, screen, 2, "text=*")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: of(events(app), PolicyDecided), "iteration 2 denied by the policy", 30)
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, PoliciesScreen), "the policies screen")
        policies = app.screen
        (shown,) = policies.policies
        assert shown.rule.effect == "deny" and shown.rule.scope == "loop" and not shown.revoked
        await pilot.press("r")
        await until(pilot, lambda: of(events(app), PolicyRevoked), "the revocation recorded")
        assert policies.policies[0].revoked
        assert said(app, f"revoked policy {shown.id}")
        await pilot.press("escape")
        assert not isinstance(app.screen, PoliciesScreen)


# ---------------------------------------------------------------------- snapshots at 80x24

SNAP_RUN = "a99f0a11c0de"


def _waiting_db(tmp_path: Path) -> Path:
    """A run (fixed id) that ended waiting for the approval of its first call, with a loop policy beside it."""
    from loopterm.core.model import check_model

    loop = gated(tmp_path, ["src/app.py"])
    check_model(loop.model, loop.script)
    store = Store.open(db_of(tmp_path))
    engine = Engine.create(loop, store, loop_ref="test:t", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           run_id=SNAP_RUN)
    asyncio.run(engine.run())
    store.append_event(SNAP_RUN, PolicyAdded(policy="p0000001", effect="approve", scope="loop", tool="guarded_write",
                                             globs={"text": "src/*.py"}, reason="sources only", loop_ref="test:t"))
    store.append_event(SNAP_RUN, PolicyAdded(policy="p0000002", effect="deny", scope="run", tool="guarded_write",
                                             globs={"text": "*secret*"}, reason="never", loop_ref="test:t"))
    assert fold(store.events(SNAP_RUN)).approvals
    store.close()
    return db_of(tmp_path)


def test_approval_dialog_at_80x24(snap_compare: Any, tmp_path: Path) -> None:
    db = _waiting_db(tmp_path)

    async def open_it(pilot: Any) -> None:
        await until(pilot, lambda: waiting_at(pilot.app, 1), "the approval pending")
        await pilot.press("a")
        await until(pilot, lambda: isinstance(pilot.app.screen, ApprovalScreen), "the approval dialog")
        await pilot.pause()

    assert snap_compare(LooptermApp(db, watch_run=SNAP_RUN, theme="loopterm-dark", frozen=True),
                        terminal_size=(80, 24), run_before=open_it)


def test_policies_screen_at_80x24(snap_compare: Any, tmp_path: Path) -> None:
    db = _waiting_db(tmp_path)

    async def open_it(pilot: Any) -> None:
        await until(pilot, lambda: loaded(pilot.app), "the run loaded")
        await pilot.press("p")
        await until(pilot, lambda: isinstance(pilot.app.screen, PoliciesScreen), "the policies screen")
        await pilot.pause()

    assert snap_compare(LooptermApp(db, watch_run=SNAP_RUN, theme="loopterm-dark", frozen=True),
                        terminal_size=(80, 24), run_before=open_it)
