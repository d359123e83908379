"""Two runs side by side (core/compare.py): iterations aligned at the fork point, the first divergence
highlighted, the state diff between them at the cursor's iteration, their totals and outcomes.

The aligned iterations are a virtual list (as the timeline is): the comparison holds one small summary per
iteration and side, and only the rows on screen become Texts and lines, so a 5,000-iteration pair costs no
widget per row. The comparison is read in a thread; the screen says so meanwhile.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.containers import Horizontal, VerticalScroll
from textual.geometry import Size
from textual.message import Message
from textual.screen import Screen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer
from textual.widgets import Footer, Static

from loopterm.core.compare import Comparison, StateDiff, compare, state_diff
from loopterm.tui.diff_cli import (
    FIRST_MARK,
    FORK_MARK,
    LEGEND,
    ROW_FIXED,
    diff_body,
    diff_heading,
    divergence_headline,
    mark_of,
    row_text,
    run_line,
    side_columns,
    totals_rows,
)
from loopterm.tui.widgets.render import Palette, literal

DIFF_DELAY = 0.08  # the state diff follows the cursor once it rests this long (holding a key reads nothing)
LINES_KEPT = 128  # drawn rows kept (a few screens)
NARROW = 110  # below this width the totals go under the diff instead of beside it


class AlignedRows(ScrollView, can_focus=True):
    """One row per aligned iteration: n, mark, then A's and B's action, gates, invariants, tokens, cost."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "Cursor up", show=False),
        Binding("down", "cursor_down", "Cursor down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"aligned--header", "aligned--cursor", "aligned--first", "aligned--fork"}
    DEFAULT_CSS = """
    AlignedRows {
        background: $surface;
        height: 1fr;
        & > .aligned--header { text-style: bold; background: $panel; }
        & > .aligned--cursor { background: $block-cursor-blurred-background; color: $block-cursor-blurred-foreground; }
        &:focus > .aligned--cursor { background: $block-cursor-background; color: $block-cursor-foreground; }
        & > .aligned--first { text-style: bold; color: $warning; }
        & > .aligned--fork { color: $accent; }
    }
    """
    HEADER_HEIGHT = 1

    class Highlighted(Message):
        def __init__(self, rows: "AlignedRows", n: int) -> None:
            super().__init__()
            self.rows = rows
            self.n = n

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.comparison: Comparison | None = None
        self.palette = Palette()
        self.cursor_row = 0
        self._lines: LRUCache[tuple[Any, ...], Strip] = LRUCache(LINES_KEPT)
        self._cells: dict[Any, Text] = {}  # gate and invariant cells, which repeat from row to row

    @property
    def row_count(self) -> int:
        return len(self.comparison.iterations) if self.comparison is not None else 0

    @property
    def selected_n(self) -> int | None:
        return self.comparison.iterations[self.cursor_row].n if self.row_count else None

    def show(self, comparison: Comparison, palette: Palette, row: int = 0) -> None:
        self.comparison, self.palette = comparison, palette
        self._lines.clear()
        self._cells.clear()
        self.virtual_size = Size(0, self.HEADER_HEIGHT + self.row_count)
        self.cursor_row = -1
        self.move_cursor(row)
        self.refresh()

    # -- the cursor -----------------------------------------------------------------------------

    @property
    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - self.HEADER_HEIGHT)

    def move_cursor(self, row: int) -> None:
        if not self.row_count:
            return
        row = max(0, min(row, self.row_count - 1))
        old, self.cursor_row = self.cursor_row, row
        top = round(self.scroll_y)
        if row < top:
            self.scroll_to(y=row, animate=False, force=True)
        elif row >= top + self._page:
            self.scroll_to(y=row - self._page + 1, animate=False, force=True)
        if old != row:
            self.refresh()
            self.post_message(self.Highlighted(self, self.comparison.iterations[row].n))  # type: ignore[union-attr]

    def action_cursor_up(self) -> None:
        self.move_cursor(self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        self.move_cursor(self.cursor_row + 1)

    def action_page_up(self) -> None:
        self.move_cursor(self.cursor_row - self._page)

    def action_page_down(self) -> None:
        self.move_cursor(self.cursor_row + self._page)

    def action_first(self) -> None:
        self.move_cursor(0)

    def action_last(self) -> None:
        self.move_cursor(self.row_count - 1)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is not None and offset.y >= self.HEADER_HEIGHT:
            self.move_cursor(offset.y - self.HEADER_HEIGHT + round(self.scroll_y))
            event.stop()

    # -- drawing --------------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._lines.clear()

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        row = -1 if y < self.HEADER_HEIGHT else y - self.HEADER_HEIGHT + round(self.scroll_y)
        if row >= self.row_count or self.comparison is None:
            return Strip.blank(width, base)
        key = (row, row == self.cursor_row, width, base, self.has_focus)
        strip = self._lines.get(key)
        if strip is None:
            strip = self._lines[key] = self._line(row, width, base)
        return strip

    def _line(self, row: int, width: int, base: Style) -> Strip:
        action_width, columns = side_columns(width, ROW_FIXED, 1)
        if row < 0:
            style = self.get_component_rich_style("aligned--header")
            line = row_text(None, None, self.palette, action_width, columns)
        else:
            comparison = self.comparison
            assert comparison is not None
            item = comparison.iterations[row]
            mark = mark_of(comparison, item)
            style = Style()
            if mark == FIRST_MARK:
                style = self.get_component_rich_style("aligned--first")
            elif mark == FORK_MARK:
                style = self.get_component_rich_style("aligned--fork")
            if row == self.cursor_row:
                style = style + self.get_component_rich_style("aligned--cursor")
            line = row_text(comparison, item, self.palette, action_width, columns, self._cells)
        line.stylize_before(base + style)
        segments = list(line.render(self.app.console))
        return Strip(segments).adjust_cell_length(width, base + style).simplify()


class CompareScreen(Screen[None]):
    """Runs A and B side by side; the cursor's iteration shows the state diff between them."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="compare.back", tooltip="Back to the runs"),
        Binding("f", "first_divergence", "First divergence", id="compare.first",
                tooltip="Put the cursor on the first iteration where the two runs diverge"),
    ]
    DEFAULT_CSS = """
    CompareScreen { layout: vertical; }
    #compare-header { height: auto; padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    #compare-rows { height: 1fr; min-height: 4; }
    #compare-bottom { height: 1fr; min-height: 6; border-top: hkey $foreground 20%; }
    #compare-diff-pane { width: 1fr; height: 1fr; padding: 0 1; }
    #compare-totals { width: auto; max-width: 70; height: auto; padding: 0 1; }
    CompareScreen.narrow #compare-bottom { layout: vertical; }
    CompareScreen.narrow #compare-totals { width: 1fr; max-width: 100%; }
    """

    def __init__(self, store: Any, a: str, b: str, palette: Palette | None = None) -> None:
        super().__init__()
        self.store = store
        self.a, self.b = a, b
        self.palette = palette or Palette()
        self.comparison: Comparison | None = None
        self.error: str | None = None
        self.diff: StateDiff | None = None
        self._diff_timer: Timer | None = None

    def compose(self) -> Any:
        yield Static(Text(f"comparing {self.a[:8]} with {self.b[:8]} …", style="italic"), id="compare-header")
        yield AlignedRows(id="compare-rows")
        with Horizontal(id="compare-bottom"):
            with VerticalScroll(id="compare-diff-pane"):
                yield Static(Text(""), id="compare-diff")
            yield Static(Text(""), id="compare-totals")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.set_class(self.size.width < NARROW, "narrow")
        self.query_one(AlignedRows).focus()
        self.run_worker(self._read, thread=True, name="compare", exit_on_error=False)

    def on_resize(self, event: events.Resize) -> None:
        narrow = event.size.width < NARROW
        if narrow != self.has_class("narrow"):
            self.set_class(narrow, "narrow")
            self._show_totals()

    # -- reading --------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            comparison = compare(self.store, self.a, self.b)
        except Exception as exc:  # an unknown run, a damaged store: said on screen, nothing else breaks
            self.app.call_from_thread(self._failed, f"cannot compare {self.a[:8]} with {self.b[:8]}: {exc}")
            return
        self.app.call_from_thread(self._loaded, comparison)

    def _failed(self, message: str) -> None:
        self.error = message
        self.query_one("#compare-header", Static).update(literal(message, f"bold {self.palette.bad}"))
        self.notify(message, severity="error", markup=False)

    def _loaded(self, comparison: Comparison) -> None:
        self.comparison = comparison
        palette = self.palette
        header = Text()
        header.append_text(run_line("A", comparison.a))
        header.append("\n")
        header.append_text(run_line("B", comparison.b))
        header.append("\n")
        header.append_text(literal(comparison.relation, "italic"))
        header.append("\n")
        header.append_text(divergence_headline(comparison, palette))
        self.query_one("#compare-header", Static).update(header)
        self._show_totals()
        rows = self.query_one(AlignedRows)
        rows.styles.max_height = rows.HEADER_HEIGHT + len(comparison.iterations) + 1  # a short pair leaves room below
        rows.show(comparison, palette, self._start_row())

    def _start_row(self) -> int:
        """The first divergence, else the fork point, else the first row."""
        comparison = self.comparison
        if comparison is None:
            return 0
        n = comparison.divergence.n if comparison.divergence is not None else comparison.fork_point or 1
        return max(0, min(n, len(comparison.iterations)) - 1)

    def _show_totals(self) -> None:
        if self.comparison is not None:
            self.query_one("#compare-totals", Static).update(self._totals(self.comparison))

    def _totals(self, comparison: Comparison) -> Table:
        table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1), header_style="bold")
        table.add_column("")
        table.add_column(f"A {comparison.a.id[:8]}", overflow="fold")
        table.add_column(f"B {comparison.b.id[:8]}", overflow="fold")
        for label, a, b in totals_rows(comparison, self.palette, compact=self.has_class("narrow")):
            table.add_row(Text(label, style="bold"), a, b)
        return table

    # -- the diff at the cursor -----------------------------------------------------------------

    def on_aligned_rows_highlighted(self, event: AlignedRows.Highlighted) -> None:
        if self._diff_timer is not None:
            self._diff_timer.stop()
        self._diff_timer = self.set_timer(DIFF_DELAY, self._show_diff)

    def _show_diff(self) -> None:
        self._diff_timer = None
        n = self.query_one(AlignedRows).selected_n
        if self.comparison is None or n is None:
            return
        try:
            diff = state_diff(self.store, self.comparison, n)
        except Exception as exc:
            self.query_one("#compare-diff", Static).update(literal(f"no state diff at {n}: {exc}", self.palette.bad))
            return
        self.diff = diff
        body = Group(diff_heading(self.comparison, diff, self.palette), diff_body(diff, self.palette),
                     Text(LEGEND, style="dim"))
        self.query_one("#compare-diff", Static).update(body)

    @property
    def diff_text(self) -> str:
        """What the diff pane shows, as plain text (for tests and people reading a snapshot)."""
        if self.diff is None or self.comparison is None:
            return ""
        return diff_heading(self.comparison, self.diff, self.palette).plain + "\n" + diff_body(self.diff, self.palette).plain

    # -- keys -----------------------------------------------------------------------------------

    def action_first_divergence(self) -> None:
        comparison = self.comparison
        if comparison is None or comparison.divergence is None:
            self.notify("these runs do not diverge" if comparison is not None else "still comparing …", timeout=3)
            return
        self.query_one(AlignedRows).move_cursor(comparison.divergence.n - 1)

    def action_back(self) -> None:
        self.dismiss(None)

