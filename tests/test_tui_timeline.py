"""The timeline as a virtual list, and what keeps a long run's screen small (issue 4, Performance)."""

from __future__ import annotations

import gc
from array import array
from typing import Any

from textual.app import App, ComposeResult

from loopterm.tui.following import acyclic_burst, spend_series
from loopterm.tui.widgets.detail import DetailContext
from loopterm.tui.widgets.render import RowInfo, Shown, shown_state
from loopterm.tui.widgets.timeline import RowColumns, Timeline


def info(n: int, holder: str = "run", subgoal: str | None = None) -> RowInfo:
    subgoal = subgoal if subgoal is not None else f"step {n}"
    return RowInfo(n=n, holder=holder, action="noop()", subgoal=subgoal, confidence=0.5 if n % 2 else None,
                   gates=(("tests", n % 3 == 0),), invariants=(("short", True),), tokens=100 + n, cost=0.001,
                   latency_ms=12.0, repairs=0, approval=None, haystack=f"reasoning {n}\n{subgoal}\nnoop()".lower())


def test_rows_are_columns_not_objects() -> None:
    """Adding thousands of rows adds no object the garbage collector walks (a full collection stays short)."""
    rows = RowColumns()
    rows.append(info(1))
    gc.collect()
    before = len(gc.get_objects())
    for n in range(2, 5002):
        rows.append(info(n))
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert len(rows) == 5001
    again = rows.info(41)
    assert (again.n, again.subgoal, again.confidence, again.gates) == (42, "step 42", None, (("tests", True),))
    assert rows.gates[2] is rows.gates[4001]  # repeated values are stored once
    # strings live in compressed blocks, and are found in them and in the open one
    assert rows.texts.get(4241) == ("noop()", "step 4242") and rows.info(5000).subgoal == "step 5001"
    assert list(rows.texts.matching("reasoning 4242\n")) == [4241]
    assert list(rows.texts.matching("reasoning 5001\n")) == [5000]
    assert sum(1 for _ in rows.texts.matching("noop()")) == 5001


class TimelineApp(App[None]):
    def __init__(self) -> None:
        super().__init__()
        self.highlighted: list[tuple[int, bool]] = []

    def compose(self) -> ComposeResult:
        yield Timeline(id="timeline")

    def on_timeline_row_highlighted(self, event: Timeline.RowHighlighted) -> None:
        self.highlighted.append((event.n, event.following))


async def test_the_cursor_follows_new_rows_moves_by_key_and_stays_on_screen() -> None:
    app = TimelineApp()
    async with app.run_test(size=(100, 20)) as pilot:
        timeline = app.query_one(Timeline)
        timeline.reset("run")
        timeline.append([info(n) for n in range(1, 2001)])
        await pilot.pause()
        assert timeline.row_count == 2000 and timeline.selected_n == 2000
        assert app.highlighted[-1] == (2000, True)  # following the newest row, not a person's move
        assert timeline.max_scroll_y > 0 and round(timeline.scroll_y) == round(timeline.max_scroll_y)
        timeline.focus()
        await pilot.press("home")
        assert timeline.selected_n == 1 and round(timeline.scroll_y) == 0 and app.highlighted[-1] == (1, False)
        await pilot.press("pagedown", "down")
        assert timeline.cursor_row > 10
        top = round(timeline.scroll_y)
        assert top <= timeline.cursor_row < top + timeline.scrollable_content_region.height - 1
        # the cursor is not on the last row: new rows do not move it
        timeline.append([info(2001)])
        assert timeline.selected_n == timeline.cursor_row + 1 and timeline.row_count == 2001
        assert "step 5" in timeline.cell_text(4, "subgoal") and timeline.cell_text(2, "gates") == "✓tests"
        # rows arriving below the screen: no layout now, the scrollbar catches up a moment later ...
        await pilot.pause(0.4)
        height = timeline.virtual_size.height
        assert height == 1 + 2001
        timeline.append([info(n) for n in range(2002, 2102)])
        assert timeline.virtual_size.height == height and timeline.row_count == 2101
        await pilot.pause(0.4)
        assert timeline.virtual_size.height == height + 100
        # ... or at once when the cursor goes there
        timeline.append([info(n) for n in range(2102, 2112)])
        await pilot.press("end")
        assert timeline.selected_n == 2111 and round(timeline.scroll_y) == round(timeline.max_scroll_y)
        assert timeline.virtual_size.height == height + 110


async def test_search_filters_rows_and_keeps_the_selected_iteration() -> None:
    app = TimelineApp()
    async with app.run_test(size=(100, 20)) as pilot:
        timeline = app.query_one(Timeline)
        timeline.reset("run")
        timeline.append([info(n, subgoal="parse" if n % 10 == 0 else "other") for n in range(1, 101)])
        timeline.select_n(50)
        assert timeline.count_matches("PARSE") == 10
        assert timeline.set_filter("parse") == 10 and timeline.selected_n == 50 and timeline.cursor_row == 4
        timeline.append([info(110, subgoal="parse"), info(111, subgoal="other")])
        assert timeline.row_count == 11 and timeline.total == 102
        assert timeline.set_filter("") == 102 and timeline.selected_n == 50
        assert timeline.holder_of(7) == "run" and timeline.holder_of(105) is None
        await pilot.pause()


def test_the_state_tree_keeps_a_bounded_cut_of_a_long_state() -> None:
    state = {"iteration": 10_000, "tool_results": [{"tool": "noop", "args": {"i": i}} for i in range(10_000)],
             "memory": {"facts": ["a", "b"]}}
    shown = shown_state(state, per_container=200, budget=1000)
    assert isinstance(shown, Shown) and shown.total == 3 and [k for k, _ in shown.items] == ["iteration", "tool_results", "memory"]
    results = dict(shown.items)["tool_results"]
    assert results.total == 10_000 and len(results.items) == 200
    kept = 0
    stack: list[Any] = [shown]
    while stack:
        node = stack.pop()
        kept += len(node.items)
        stack.extend(child for _, child in node.items if isinstance(child, Shown))
    assert kept <= 1000
    assert dict(shown.items)["memory"].items == [("facts", dict(dict(shown.items)["memory"].items)["facts"])]


def test_the_detail_context_keeps_no_whole_state() -> None:
    from loopterm.core.records import IterationRecord

    fields = IterationRecord.model_fields
    before = {"iteration": 1, "log": list(range(5000))}
    after = {"iteration": 2, "log": [*before["log"], 5000]}
    record = IterationRecord.model_construct(**{name: f.get_default(call_default_factory=True) for name, f in fields.items()
                                                if not f.is_required()}, run_id="run", n=2, state=after)
    context = DetailContext.of(record, before)
    assert context.record.state == {}
    assert context.changes == ({"iteration": 1}, {"iteration": 2, "log (appended after item 5000)": [5000]})
    assert dict(context.state.items)["log"].total == 5001


def test_the_spend_series_is_bounded_and_keeps_the_peaks() -> None:
    costs = array("d", [0.001] * 10_000)
    costs[7777] = 0.5
    series = spend_series(costs, points=512)
    assert len(series) == 512 and max(series) == 0.5
    assert spend_series(array("d", [1.0, 2.0])) == [1.0, 2.0]


def test_acyclic_burst_pauses_the_collector_and_restores_it() -> None:
    assert gc.isenabled()
    with acyclic_burst():
        assert not gc.isenabled()
        with acyclic_burst():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with acyclic_burst():
            raise ValueError
    except ValueError:
        pass
    assert gc.isenabled()
