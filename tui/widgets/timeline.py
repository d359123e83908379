"""The iteration timeline: a virtual list, one row per iteration, appended live.

No widget and no object per iteration. A DataTable keeps a Row, a RowKey, a
dict of cells and eight rich Texts per row (about 5 KB, and a dozen objects
the garbage collector walks on every full collection: 10,000 rows made full
collections take 100-190 ms, a keystroke's whole budget). Here each row is a
few entries in flat columns (`RowColumns`: arrays of numbers, shared strings),
and only the rows on screen are turned into Texts and lines, on demand.

It draws like the DataTable it replaces (same component styles, a header
row, zebra stripes, a row cursor) and keeps its small API: `row_count`,
`cursor_row`, `move_cursor`, `RowHighlighted`.
"""

from __future__ import annotations

from bisect import bisect_left

import math
import zlib
from array import array
from typing import Any, ClassVar, Iterable, Iterator

from rich.console import RenderableType
from rich.padding import Padding
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.renderables.styled import Styled
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from loopterm.tui.widgets.render import SUBGOAL_SHOWN, TIMELINE_COLUMNS, Palette, RowInfo, first_line, row_cells

CELL_PADDING = 1  # blank cells on each side of a column, as DataTable draws them
SCROLLBAR_SECONDS = 0.25  # while rows arrive below the screen, the scrollbar catches up this often
LINES_KEPT = 96  # drawn rows kept (a few screens): a repaint of unchanged rows allocates nothing
SUBGOAL_KEPT = SUBGOAL_SHOWN  # characters of a subgoal kept for its row (the whole one is in the search text)
INTERNED = 4096  # distinct gate / invariant results shared between rows; beyond, equal neighbours only

# Which columns a width shows. An 80-column terminal cannot hold all eight, and a cut row hid the gates. The
# required ones always show; the optional ones join in this order while the rest fits (the subgoal at its
# narrowest); what is left widens the subgoal (up to what a row keeps of it), then the action.
REQUIRED_COLUMNS = ("n", "action", "gates", "inv")
OPTIONAL_COLUMNS = ("subgoal", "tokens", "conf", "ms")  # the last is the first to go
NARROWEST = {"subgoal": 12}
WIDEST = {"subgoal": SUBGOAL_SHOWN, "action": 48}


def column_layout(width: int) -> list[tuple[int, int]]:
    """(index in TIMELINE_COLUMNS, cell width including its padding) of each column shown in `width` cells, in
    table order; the required columns show even when they do not fit (the table then scrolls sideways)."""
    labels = [label for label, _ in TIMELINE_COLUMNS]
    base = {label: NARROWEST.get(label, size) + 2 * CELL_PADDING for label, size in TIMELINE_COLUMNS}
    shown = list(REQUIRED_COLUMNS)
    used = sum(base[label] for label in shown)
    for label in OPTIONAL_COLUMNS:
        if used + base[label] > width:
            break
        shown.append(label)
        used += base[label]
    widths = {label: base[label] for label in shown}
    for label, widest in WIDEST.items():
        if label in widths and used < width:
            grow = min(width - used, widest + 2 * CELL_PADDING - widths[label])
            if grow > 0:
                widths[label] += grow
                used += grow
    return [(labels.index(label), widths[label]) for label in labels if label in widths]


class RowTexts:
    """Each row's strings (action, subgoal, search text), compressed BLOCK rows at a time.

    Strings are most of what a row holds (the search text: lower-cased reasoning, subgoal and action,
    a few hundred bytes) and only the rows on screen and a search read them. A search decompresses
    every block (a 10,000-row run: about 40 blocks, a few milliseconds); drawing keeps the few blocks
    on screen decompressed.
    """

    BLOCK = 256
    FIELDS = 3

    def __init__(self) -> None:
        self._blocks: list[bytes] = []  # zlib of BLOCK rows' fields joined by NUL
        self._open: list[str] = []  # the last block's fields, until it is full
        self._unpacked: LRUCache[int, list[str]] = LRUCache(4)

    def __len__(self) -> int:
        return len(self._blocks) * self.BLOCK + len(self._open) // self.FIELDS

    def append(self, action: str, subgoal: str, search: str) -> None:
        self._open.extend(text.replace("\0", " ") for text in (action, subgoal, search))
        if len(self._open) == self.BLOCK * self.FIELDS:
            self._blocks.append(zlib.compress("\0".join(self._open).encode(), 1))
            self._open = []

    def _fields(self, block: int) -> list[str]:
        if block == len(self._blocks):
            return self._open
        fields = self._unpacked.get(block)
        if fields is None:
            fields = zlib.decompress(self._blocks[block]).decode().split("\0")
            self._unpacked[block] = fields
        return fields

    def get(self, i: int) -> tuple[str, str]:
        """Row i's action and subgoal."""
        block, row = divmod(i, self.BLOCK)
        fields = self._fields(block)
        return fields[row * self.FIELDS], fields[row * self.FIELDS + 1]

    def matching(self, query: str) -> Iterator[int]:
        """Indexes of the rows whose search text contains `query` (already lower-cased)."""
        for block in range(len(self._blocks) + 1):
            fields = self._open if block == len(self._blocks) else \
                zlib.decompress(self._blocks[block]).decode().split("\0")
            base = block * self.BLOCK
            for row, text in enumerate(fields[2::self.FIELDS]):
                if query in text:
                    yield base + row


class RowColumns:
    """Every iteration's row as entries in flat columns: about 70 bytes a row, plus its share of a
    compressed block of text.

    Numbers live in arrays (no object per value); gate and invariant
    results and approvals, which repeat, are stored once and shared;
    strings are compressed in blocks (RowTexts). Nothing here is a
    container per row, so a full garbage collection does not walk the rows.
    """

    def __init__(self) -> None:
        self.n = array("q")
        self.holder = array("H")  # index into self.holders
        self.holders: list[str] = []
        self.texts = RowTexts()
        self.confidence = array("d")  # NaN: none
        self.gates: list[tuple[tuple[str, bool], ...]] = []
        self.invariants: list[tuple[tuple[str, bool], ...]] = []
        self.tokens = array("q")
        self.latency_ms = array("d")
        self.repairs = array("H")
        self.approval: list[str | None] = []
        self._shared: dict[Any, Any] = {}

    def __len__(self) -> int:
        return len(self.n)

    def _share(self, value: Any, column: list[Any]) -> Any:
        """The stored equal value if there is one (a neighbour's, or an interned one), else `value`."""
        if column and column[-1] == value:
            return column[-1]
        found = self._shared.get(value)
        if found is not None:
            return found
        if len(self._shared) < INTERNED:
            self._shared[value] = value
        return value

    def append(self, info: RowInfo) -> None:
        try:
            holder = self.holders.index(info.holder)
        except ValueError:
            holder = len(self.holders)
            self.holders.append(info.holder)
        self.n.append(info.n)
        self.holder.append(holder)
        self.texts.append(info.action, first_line(info.subgoal, SUBGOAL_KEPT), info.haystack)
        self.confidence.append(math.nan if info.confidence is None else info.confidence)
        self.gates.append(self._share(info.gates, self.gates))
        self.invariants.append(self._share(info.invariants, self.invariants))
        self.tokens.append(info.tokens)
        self.latency_ms.append(info.latency_ms)
        self.repairs.append(min(info.repairs, 65535))
        self.approval.append(info.approval)

    def info(self, i: int) -> RowInfo:
        """Row i as a RowInfo again (only for rows about to be drawn)."""
        confidence = self.confidence[i]
        action, subgoal = self.texts.get(i)
        return RowInfo(n=self.n[i], holder=self.holders[self.holder[i]], action=action,
                       subgoal=subgoal, confidence=None if math.isnan(confidence) else confidence,
                       gates=self.gates[i], invariants=self.invariants[i], tokens=self.tokens[i], cost=0.0,
                       latency_ms=self.latency_ms[i], repairs=self.repairs[i], approval=self.approval[i],
                       haystack="")


class Timeline(ScrollView, can_focus=True):
    """Rows are iterations; `cursor_row` indexes the rows shown (all, or those matching the search)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "Cursor up", show=False),
        Binding("down", "cursor_down", "Cursor down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home,ctrl+home", "first", "First", show=False),
        Binding("end,ctrl+end", "last", "Last", show=False),
        Binding("left", "scroll_left", "Scroll left", show=False),
        Binding("right", "scroll_right", "Scroll right", show=False),
    ]

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "timeline--header",
        "timeline--cursor",
        "timeline--even-row",
        "timeline--odd-row",
    }

    # DataTable's look, for the parts the timeline uses.
    DEFAULT_CSS = """
    Timeline {
        background: $surface;
        color: $foreground;
        height: 1fr;
        &:focus {
            background-tint: $foreground 5%;
            & > .timeline--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .timeline--header {
                background-tint: $foreground 5%;
            }
        }
        &:dark > .timeline--even-row {
            background: $surface-darken-1 40%;
        }
        & > .timeline--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        &:ansi > .timeline--header {
            background: ansi_bright_blue;
            color: ansi_default;
        }
        & > .timeline--odd-row {
        }
        & > .timeline--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .timeline--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """

    HEADER_HEIGHT = 1

    class RowHighlighted(Message):
        """The cursor moved to another iteration (or the first row appeared under it)."""

        def __init__(self, timeline: "Timeline", cursor_row: int, n: int, following: bool = False) -> None:
            super().__init__()
            self.timeline = timeline
            self.cursor_row = cursor_row
            self.n = n
            self.following = following  # moved by new rows arriving (the cursor follows the newest), not a person

        @property
        def control(self) -> "Timeline":
            return self.timeline

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows = RowColumns()
        self.shown: array[int] | None = None  # indexes into rows while a search filters them
        self.view_run: str | None = None
        self.query_text = ""
        self.palette = Palette()
        self.cursor_row = 0
        self._lines: LRUCache[tuple[Any, ...], Strip] = LRUCache(LINES_KEPT)
        self._generation = 0  # bumped when every row must be drawn again
        self._pseudo: Any = None
        self._size_timer: Timer | None = None
        self._layout = [(index, width + 2 * CELL_PADDING) for index, (_, width) in enumerate(TIMELINE_COLUMNS)]
        self._table_width = sum(width for _, width in self._layout)

    # -- content -------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self.rows) if self.shown is None else len(self.shown)

    @property
    def total(self) -> int:
        """Iterations held, whatever the search shows."""
        return len(self.rows)

    @property
    def last_n(self) -> int:
        return self.rows.n[-1] if len(self.rows) else 0

    def _index(self, row: int) -> int:
        return row if self.shown is None else self.shown[row]

    def reset(self, view_run: str | None) -> None:
        self.rows = RowColumns()
        self.shown = None if not self.query_text else array("q")
        self.view_run = view_run
        self.cursor_row = 0
        self._redraw()
        self.scroll_to(0, 0, animate=False, force=True)

    def matches(self, haystack: str) -> bool:
        return not self.query_text or self.query_text in haystack

    def count_matches(self, query: str) -> int:
        query = query.strip().lower()
        return sum(1 for _ in self.rows.texts.matching(query)) if query else len(self.rows)

    def holder_of(self, n: int) -> str | None:
        """The run that made iteration n (a branch shows its ancestors' iterations too)."""
        index = self._find(n)
        return None if index is None else self.rows.holders[self.rows.holder[index]]

    def append(self, infos: Iterable[RowInfo]) -> None:
        """Add iterations after the last one held; follows the newest row if the cursor was on the last."""
        before = self.row_count
        following = before == 0 or self.cursor_row >= before - 1
        last = self.last_n
        for info in infos:
            if info.n <= last:
                continue
            last = info.n
            self.rows.append(info)
            if self.shown is not None and self.matches(info.haystack):
                self.shown.append(len(self.rows) - 1)
        if self.row_count == before:
            return
        self._resize(first_new=before)
        if following:
            target = self.row_count - 1
            if before == 0 and target == self.cursor_row:  # the first row appeared under the cursor
                self._highlight(following=True)
            self.move_cursor(row=target, animate=False, following=True)
            self.call_after_refresh(self._scroll_to_cursor)  # again once laid out (a scrollbar may have appeared)

    def rerender(self, palette: Palette | None = None) -> None:
        """Draw every row again (a theme change, a new filter), keeping the selected iteration."""
        if palette is not None:
            self.palette = palette
        self._redraw()

    def set_filter(self, query: str) -> int:
        """Show only iterations whose reasoning, subgoal or action contains `query`; returns the count."""
        selected = self.selected_n
        self.query_text = query.strip().lower()
        if self.query_text:
            self.shown = array("q", self.rows.texts.matching(self.query_text))
        else:
            self.shown = None
        self._resize()
        self._redraw()
        if not (selected is not None and self.select_n(selected)):
            self.cursor_row = 0
            if self.row_count:
                self._highlight()
        self.call_after_refresh(self._scroll_to_cursor)
        return self.row_count

    def info(self, row: int) -> RowInfo:
        return self.rows.info(self._index(row))

    def cells(self, row: int) -> list[Text]:
        """Row `row` (of those shown) as the Texts drawn for it."""
        info = self.info(row)
        return row_cells(info, self.palette, info.holder != self.view_run)

    def cell_text(self, row: int, column: str) -> str:
        return self.cells(row)[[label for label, _ in TIMELINE_COLUMNS].index(column)].plain

    # -- selection -----------------------------------------------------------

    @property
    def selected_n(self) -> int | None:
        if self.row_count == 0:
            return None
        return self.rows.n[self._index(min(self.cursor_row, self.row_count - 1))]

    def _find(self, n: int) -> int | None:
        """The index in rows of iteration n (rows are in order of n)."""
        rows = self.rows.n
        lo = bisect_left(rows, n)
        return lo if lo < len(rows) and rows[lo] == n else None

    def select_n(self, n: int) -> bool:
        index = self._find(n)
        if index is None:
            return False
        if self.shown is not None:
            shown = self.shown
            lo = bisect_left(shown, index)
            if lo >= len(shown) or shown[lo] != index:
                return False
            index = lo
        self.move_cursor(row=index, animate=False)
        return True

    def move_cursor(self, *, row: int | None = None, animate: bool = False, scroll: bool = True,
                    following: bool = False) -> None:
        """Put the cursor on row `row` (clamped); says so with RowHighlighted when it moved."""
        if row is None or self.row_count == 0:
            return
        row = max(0, min(row, self.row_count - 1))
        old, self.cursor_row = self.cursor_row, row
        if scroll:
            self._scroll_to_cursor(animate)
        if row != old:
            self._refresh_row(old)
            self._refresh_row(row)
            self._highlight(following)

    def _highlight(self, following: bool = False) -> None:
        n = self.selected_n
        if n is not None:
            self.post_message(self.RowHighlighted(self, self.cursor_row, n, following))

    @property
    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - self.HEADER_HEIGHT)

    def _scroll_to_cursor(self, animate: bool = False) -> None:
        if self._size_timer is not None:
            self._sync_size()
        top = round(self.scroll_y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=animate, force=True)
        elif self.cursor_row >= top + self._page:
            self.scroll_to(y=self.cursor_row - self._page + 1, animate=animate, force=True)

    def action_cursor_up(self) -> None:
        self.move_cursor(row=self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        self.move_cursor(row=self.cursor_row + 1)

    def action_page_up(self) -> None:
        self.move_cursor(row=self.cursor_row - self._page)

    def action_page_down(self) -> None:
        self.move_cursor(row=self.cursor_row + self._page)

    def action_first(self) -> None:
        self.move_cursor(row=0)

    def action_last(self) -> None:
        self.move_cursor(row=self.row_count - 1)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < self.HEADER_HEIGHT:
            return
        row = offset.y - self.HEADER_HEIGHT + round(self.scroll_y)
        if row < self.row_count:
            self.move_cursor(row=row, scroll=False)
            event.stop()

    # -- drawing -------------------------------------------------------------

    @property
    def columns_shown(self) -> list[str]:
        """The labels of the columns drawn at the present width."""
        return [TIMELINE_COLUMNS[index][0] for index, _ in self._layout]

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.width)

    def _fit(self, width: int) -> None:
        """Choose the columns for `width` (room is kept for the vertical scrollbar, so the choice does not flip
        when one appears)."""
        layout = column_layout(max(0, width - self.styles.scrollbar_size_vertical))
        if layout != self._layout:
            self._layout = layout
            self._table_width = sum(cell_width for _, cell_width in layout)
            self._redraw()

    def _resize(self, first_new: int | None = None) -> None:
        """The scrollable size follows the rows; `first_new`: rows from there on were just appended."""
        size = Size(self._table_width, self.HEADER_HEIGHT + self.row_count)
        old = self.virtual_size
        if size == old:
            return
        if first_new is not None and self.show_vertical_scrollbar and self.container_size and size.width == old.width \
                and size.height > old.height:
            # A list that already scrolls grew: no layout changes, only the scrollbar's thumb (caught up
            # every SCROLLBAR_SECONDS) and any new row that came into view. A layout of the whole screen and a
            # repaint of every row and of the scrollbar on each append, 50 times a second, is what a fast run
            # used to cost (and the strips drawn each time filled the collector's old generation).
            if first_new < round(self.scroll_y) + self._page:
                self.refresh_lines(first_new + self.HEADER_HEIGHT, self.row_count - first_new)
            if self._size_timer is None:
                self._size_timer = self.set_timer(SCROLLBAR_SECONDS, self._sync_size)
            return
        if self._size_timer is not None:
            self._size_timer.stop()
            self._size_timer = None
        self.virtual_size = size  # a layout: a scrollbar may appear or go

    def _sync_size(self) -> None:
        """Bring the scrollable size (and the scrollbar) up to the rows held, without a layout."""
        if self._size_timer is not None:
            self._size_timer.stop()
            self._size_timer = None
        size = Size(self._table_width, self.HEADER_HEIGHT + self.row_count)
        if size.height > self.virtual_size.height and size.width == self.virtual_size.width:
            self.set_reactive(Timeline.virtual_size, size)
            self._scroll_update(size)

    def _redraw(self) -> None:
        self._generation += 1
        self._lines.clear()
        self._resize()
        self.refresh()

    def _refresh_row(self, row: int) -> None:
        y = row - round(self.scroll_y) + self.HEADER_HEIGHT
        if self.HEADER_HEIGHT <= y < self.size.height:
            self.refresh_line(y + round(self.scroll_y))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._lines.clear()
        self.refresh()

    def render_lines(self, crop: Any) -> list[Strip]:
        self._pseudo = self.get_pseudo_class_state()
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base_style = self.rich_style
        if y < self.HEADER_HEIGHT:
            line = self._line(-1, width, base_style)
        else:
            row = y - self.HEADER_HEIGHT + round(self.scroll_y)
            if row >= self.row_count:
                return Strip.blank(width, base_style)
            line = self._line(row, width, base_style)
        scroll_x = round(self.scroll_x)
        return line.crop(scroll_x, scroll_x + width).adjust_cell_length(width, base_style)

    def _line(self, row: int, width: int, base_style: Style) -> Strip:
        """One row (-1: the header), the whole table's width, cached for the rows on screen (the strip's own
        caches then make its crops for a horizontal scroll position)."""
        index = -1 if row < 0 else self._index(row)
        cursor = row >= 0 and row == self.cursor_row
        key = (index, row % 2, cursor, width, base_style, self._pseudo, self._generation)
        cached = self._lines.get(key)
        if cached is not None:
            return cached
        if row < 0:
            row_style = self.get_component_rich_style("timeline--header")
            cells: list[RenderableType] = [Text(label) for label, _ in TIMELINE_COLUMNS]
        else:
            row_style = self.get_component_rich_style("timeline--odd-row" if row % 2 else "timeline--even-row")
            info = self.rows.info(index)
            cells = list(row_cells(info, self.palette, info.holder != self.view_run))
        pre, post = row_style, Style.null()
        if cursor:
            component = self.get_component_rich_style("timeline--cursor")
            pre = row_style + component
            post = Style.from_color(color=component.color) + Style.from_color(bgcolor=component.bgcolor)
        console = self.app.console
        segments: list[Segment] = []
        for column, cell_width in self._layout:
            cell = cells[column]
            options = self.app.console_options.update_dimensions(cell_width, 1).update(no_wrap=True)
            lines = console.render_lines(Styled(Padding(cell, (0, CELL_PADDING)), pre_style=pre, post_style=post),
                                         options)
            segments.extend(lines[0])
        segments.append(Segment(" " * max(0, width - self._table_width), pre))
        strip = Strip(segments).simplify()
        self._lines[key] = strip
        return strip
