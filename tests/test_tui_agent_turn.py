"""The Agent tab and the approval dialog of an ACP agent's permission request (Pilot, a real store): a run whose
iteration has an agent's turn (the `agent_turn` event at that iteration) shows its header, gauges, plan, tool
calls, permissions, writes and diffs; the agent's text is shown literally; an `acp.permission` approval shows the
request and its diff, with no arguments editor. SVG snapshots of the tab at 80x24 and 120x40 and of the dialog
at 80x24."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from textual.containers import VerticalScroll
from textual.widgets import TabbedContent, TextArea

from loopterm.core.acp_turn import AgentPermission, AgentToolCall, AgentTurn, AgentUsage, FileDiff, PlanItem
from loopterm.core.control import Approve
from loopterm.core.engine import Engine
from loopterm.core.runlog import AgentTurnRecorded, ApprovalPending
from loopterm.store import Store
from loopterm.tui.app import LooptermApp
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.widgets.agent_turn import agent_turn_text, unified_diff_text
from loopterm.tui.widgets.render import Palette
from tests.loopkit import make_loop
from tests.test_tui import db_of, loaded, turn, until
from tests.test_tui_snapshots import _copy_normalised

RUN = "a9e47acp0001"
HOSTILE = "[red]x[/red] and [/] and [bold]b"

GIT_DIFF = """diff --git a/src/slug.py b/src/slug.py
index 1111111..2222222 100644
--- a/src/slug.py
+++ b/src/slug.py
@@ -1,2 +1,2 @@
 def slugify(text):
-    return text
+    return text.lower().replace(" ", "-")
"""

PERMISSION_DIFF = """--- a/src/slug.py
+++ b/src/slug.py
@@ -1,2 +1,2 @@
 def slugify(text):
-    return text
+    return text.lower().replace(" ", "-")
"""


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


def agent_turn(*, diff: str = GIT_DIFF, message: str = "Lowercased and hyphenated; the test passes now.") -> AgentTurn:
    return AgentTurn(
        agent="scripted-agent", session_id="sess-4f2a9c01-77aa", session_origin="loaded", prompt="make the test pass",
        message=message, thoughts="The test wants lowercase with hyphens.",
        plan=[PlanItem(content="read the failing test", status="completed"),
              PlanItem(content="fix slugify", status="in_progress", priority="high"),
              PlanItem(content="run the tests", status="pending")],
        tool_calls=[
            AgentToolCall(id="c1", title="Read tests/test_slug.py", kind="read", status="completed",
                          locations=["tests/test_slug.py"],
                          output="def test_slug():\n    assert slugify('A B') == 'a-b'"),
            AgentToolCall(id="c2", title="Edit src/slug.py", kind="edit", status="completed", locations=["src/slug.py"],
                          diffs=[FileDiff(path="src/slug.py", old_text="def slugify(text):\n    return text\n",
                                          new_text="def slugify(text):\n    return text.lower().replace(' ', '-')\n")]),
            AgentToolCall(id="c3", title="rm -rf build", kind="execute", status="failed", output="permission denied"),
            AgentToolCall(id="c4", title="Search for slugify", kind="search", status="in_progress"),
        ],
        permissions=[
            AgentPermission(tool_call_id="c2", title="Edit src/slug.py", kind="edit", paths=["src/slug.py"],
                            offered=["allow_once", "allow_always", "reject_once"], outcome="allow_once",
                            decided_by="person", reason="looks right", key="acp-c2"),
            AgentPermission(tool_call_id="c3", title="rm -rf build", kind="execute", outcome="reject_once",
                            decided_by="policy", reason="no shell deletes"),
        ],
        writes=["src/slug.py"], refused_paths=["/etc/passwd"],
        usage=AgentUsage(tokens_in=12_400, tokens_out=830, tokens_cached=9_000, cost_usd=0.0123,
                         session_cost_usd=0.0456, context_used=150_000, context_size=200_000),
        stop_reason="end_turn", ended_by="agent", updates=17, started_at=1_767_225_600.0, ended_at=1_767_225_604.2,
        base_commit="abc1234def", commit="def5678abc", changed_paths=["src/slug.py"], diff=diff,
    )


async def a_run_with_turn(tmp_path: Path, the_turn: AgentTurn, *, pending: dict[str, Any] | None = None,
                          texts: tuple[str, ...] = ("ok",)) -> Path:
    """A finished one-iteration run (fixed id; its times and latencies normalised as the snapshots' are) whose
    iteration 1 has an agent's turn; optionally an approval of an agent's permission request waiting at it."""
    from loopterm.core.model import check_model

    loop = make_loop(tmp_path, [turn(text) for text in texts])
    check_model(loop.model, loop.script)
    source = Store.open(tmp_path / "source.db")
    engine = Engine.create(loop, source, loop_ref="test:t", workspace_root=tmp_path / "ws", workdir=tmp_path)
    await engine.run()
    store = Store.open(db_of(tmp_path))
    _copy_normalised(source, store, engine.run_id, RUN, tmp_path)
    source.close()
    store.append_event(RUN, AgentTurnRecorded(turn=the_turn), len(texts))  # the last iteration's
    if pending is not None:
        store.append_event(RUN, ApprovalPending(key="acp-k1", tool="acp.permission", args=pending), 1)
    store.close()
    return db_of(tmp_path)


def run_with_turn(tmp_path: Path, the_turn: AgentTurn, *, pending: dict[str, Any] | None = None) -> Path:
    return asyncio.run(a_run_with_turn(tmp_path, the_turn, pending=pending))


def app_of(db: Path) -> LooptermApp:
    return LooptermApp(db, watch_run=RUN, theme="loopterm-dark", frozen=True)


async def open_agent_tab(pilot: Any) -> None:
    app = pilot.app
    await until(pilot, lambda: loaded(app) and app.timeline.row_count == 1, "the run loaded")
    app.timeline.move_cursor(row=0)
    await until(pilot, lambda: app.detail.detail_context is not None
                and app.detail.detail_context.agent_turn is not None, "the iteration's agent turn")
    app.detail.query_one(TabbedContent).active = "tab-agent"
    await pilot.pause()


PERMISSION = {"title": "Edit src/slug.py", "kind": "edit", "paths": ["src/slug.py"], "diff": PERMISSION_DIFF,
              "agent": "scripted-agent"}


# ---------------------------------------------------------------------- the Agent tab


async def test_the_agent_tab_shows_the_whole_turn(tmp_path: Path) -> None:
    app = app_of(await a_run_with_turn(tmp_path, agent_turn()))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_agent_tab(pilot)
        assert app.detail.active_tab == "agent"
        body = app.detail.body("agent").plain
        assert "scripted-agent" in body and "sess-4f2" in body and "(loaded)" in body
        assert "end_turn" in body and "ended by agent" in body and "4.2s" in body
        assert "$0.0123" in body and "$0.0456" in body and "reported by the agent" in body
        assert "75%" in body and "150.0k / 200.0k" in body
        for entry, glyph in [("read the failing test", "✓"), ("fix slugify", "◐"), ("run the tests", "○")]:
            assert f"{glyph} {entry}" in body
        lines = body.splitlines()
        titles = ["Read tests/test_slug.py", "Edit src/slug.py", "rm -rf build", "Search for slugify"]
        calls = [next(i for i, line in enumerate(lines) if title in line and ("read" in line or "edit" in line
                 or "execute" in line or "search" in line)) for title in titles]
        assert calls == sorted(calls), "tool calls in the order first seen"
        assert any("✗ $ execute rm -rf build  failed" in line for line in lines)
        assert any("≡ read Read tests/test_slug.py  completed" in line for line in lines)
        assert "permission denied" in body
        assert "allowed once by a person" in body and "why: looks right" in body
        assert "rejected by a policy" in body and "no shell deletes" in body
        assert "wrote src/slug.py" in body and "refused /etc/passwd" in body
        assert "git diff of the worktree" in body
        assert '+    return text.lower().replace(" ", "-")' in body and "-    return text" in body
        shown = app.export_screenshot()
        assert "Agent" in shown and "scripted-agent" in shown


async def test_at_80x24_the_agent_tab_scrolls_down_and_never_sideways(tmp_path: Path) -> None:
    app = app_of(await a_run_with_turn(tmp_path, agent_turn(message="x" * 300)))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_agent_tab(pilot)
        scroll = app.detail.query_one("#scroll-agent", VerticalScroll)
        await pilot.pause()
        assert scroll.max_scroll_y > 0 and scroll.max_scroll_x == 0
        scroll.scroll_end(animate=False)
        await pilot.pause()
        assert "worktree commit" in app.export_screenshot().replace("&#160;", " "), "the last line, scrolled to"


async def test_diff_lines_are_coloured_and_the_tool_call_diffs_stand_in_for_a_missing_git_diff(tmp_path: Path) -> None:
    palette = Palette()
    text = agent_turn_text(agent_turn(diff=""), palette)
    plain = text.plain
    assert "from the agent's tool calls" in plain
    added = "+    return text.lower().replace(' ', '-')"
    assert added in plain
    start = plain.index(added)
    assert any(span.start <= start < span.end and palette.ok in str(span.style) for span in text.spans)
    removed = plain.index("-    return text\n")
    assert any(span.start <= removed < span.end and palette.bad in str(span.style) for span in text.spans)


def test_a_removed_line_that_looks_like_a_header_is_still_a_removal() -> None:
    palette = Palette()
    diff = ("--- a/q.sql\n+++ b/q.sql\n@@ -1,2 +1,2 @@\n select 1;\n--- old comment\n+-- new comment\n"
            "--- a/r.sql\n+++ b/r.sql\n@@ -1 +1 @@\n-x\n+y\n")
    text = unified_diff_text(diff, palette)
    styles = {line.plain: [str(span.style) for span in line.spans] for line in text.split("\n")}
    assert styles["--- old comment"] == [palette.bad] and styles["+-- new comment"] == [palette.ok]
    assert styles["--- a/r.sql"] == ["bold"] and styles["-x"] == [palette.bad]
    assert "\n\n--- a/r.sql" in text.plain, "a blank line between two files"


async def test_the_agent_tab_is_there_only_for_an_iteration_with_an_agent_turn(tmp_path: Path) -> None:
    app = app_of(await a_run_with_turn(tmp_path, agent_turn(), texts=("no", "ok")))  # a turn at iteration 2 only
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: loaded(app) and app.timeline.row_count == 2, "the run loaded")
        tabs = app.detail.query_one(TabbedContent)
        app.timeline.move_cursor(row=0)
        await until(pilot, lambda: app.view is not None and app.view.detail_n == 1, "iteration 1's detail")
        await pilot.pause()
        assert tabs.get_tab("tab-agent").has_class("-hidden")
        assert not tabs.get_tab("tab-reasoning").has_class("-hidden")
        assert "no agent's turn" in app.detail.body("agent").plain
        app.timeline.move_cursor(row=1)
        await until(pilot, lambda: app.view is not None and app.view.detail_n == 2, "iteration 2's detail")
        await pilot.pause()
        assert not tabs.get_tab("tab-agent").has_class("-hidden")
        tabs.active = "tab-agent"
        await pilot.pause()
        assert "fix slugify" in str(app.detail.query_one("#body-agent").render())
        app.timeline.move_cursor(row=0)  # back to an iteration without one, the Agent tab open: another opens
        await until(pilot, lambda: app.view is not None and app.view.detail_n == 1, "iteration 1's detail")
        await pilot.pause()
        assert tabs.get_tab("tab-agent").has_class("-hidden")
        assert app.detail.active_tab != "agent"


async def test_agent_text_with_markup_shows_literally(tmp_path: Path) -> None:
    hostile = agent_turn(message=HOSTILE)
    hostile.plan.append(PlanItem(content=HOSTILE))
    hostile.tool_calls.append(AgentToolCall(id="c9", title=HOSTILE, kind="[bold]edit", output=HOSTILE,
                                            locations=[HOSTILE]))
    hostile.permissions.append(AgentPermission(title=HOSTILE, outcome="cancelled", decided_by="stopped",
                                               reason=HOSTILE))
    hostile.note, hostile.ended_by, hostile.stop_reason = HOSTILE, "limit", "[/]cancelled"
    app = app_of(await a_run_with_turn(tmp_path, hostile))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_agent_tab(pilot)
        body = app.detail.body("agent")
        assert body.plain.count(HOSTILE) >= 6
        assert "[/]cancelled" in body.plain and "ended by limit: [red]x[/red]" in body.plain
        for span in body.spans:  # nothing the agent wrote turned into a style
            assert "red" not in str(span.style) or span.style == app.palette.bad
        screen = app.export_screenshot().replace("&#160;", " ")
        assert "[red]x[/red]" in screen


# ---------------------------------------------------------------------- the permission dialog


async def test_an_agent_permission_request_shows_its_diff_and_is_approved_as_asked(tmp_path: Path) -> None:
    app = app_of(await a_run_with_turn(tmp_path, agent_turn(), pending={**PERMISSION, "title": HOSTILE}))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: loaded(app) and app.view is not None and app.view.log.approvals, "the approval")
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the approval dialog")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ApprovalScreen) and screen.agent
        request = str(screen.query_one("#agent-request").render())
        assert HOSTILE in request and "src/slug.py" in request and "edit" in request and "scripted-agent" in request
        diff = screen.query_one("#agent-diff-text").render()
        assert '+    return text.lower().replace(" ", "-")' in str(diff)
        assert not screen.query("#args"), "no arguments editor for an agent's request"
        assert "nothing to edit" in str(screen.query_one("#no-args").render())
        globs = screen.query_one("#globs", TextArea).text
        assert "paths=" in globs and "diff=" not in globs
        answered: list[Any] = []
        screen.dismiss = answered.append  # type: ignore[method-assign]
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert len(answered) == 1 and isinstance(answered[0], Approve)
        assert answered[0].key == "acp-k1" and answered[0].args is None


async def test_an_agent_permission_denied_with_a_reason_sends_exactly_that(tmp_path: Path) -> None:
    app = app_of(await a_run_with_turn(tmp_path, agent_turn(), pending={**PERMISSION, "diff": ""}))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: loaded(app) and app.view is not None and app.view.log.approvals, "the approval")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the approval dialog")
        await pilot.pause()
        assert "no diff given" in app.screen.query_one("#no-diff").render().plain  # type: ignore[union-attr]
        assert not app.screen.query("#agent-diff")
        await pilot.press(*"not that file")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, ApprovalScreen), "the dialog closed")
        await until(pilot, lambda: app.store.pending_commands(RUN), "the answer sent")
        command = app.store.pending_commands(RUN)[-1]
        assert command.kind == "deny" and command.payload["key"] == "acp-k1"
        assert command.payload["reason"] == "not that file"


# ---------------------------------------------------------------------- snapshots


def test_agent_tab_at_80x24(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(app_of(run_with_turn(tmp_path, agent_turn())), terminal_size=(80, 24),
                        run_before=open_agent_tab)


def test_agent_tab_at_120x40(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(app_of(run_with_turn(tmp_path, agent_turn())), terminal_size=(120, 40),
                        run_before=open_agent_tab)


def test_agent_permission_dialog_at_80x24(snap_compare: Any, tmp_path: Path) -> None:
    db = run_with_turn(tmp_path, agent_turn(), pending=PERMISSION)

    async def open_it(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: loaded(app) and app.view is not None and app.view.log.approvals, "the approval")
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the approval dialog")
        await pilot.pause()

    assert snap_compare(app_of(db), terminal_size=(80, 24), run_before=open_it)
