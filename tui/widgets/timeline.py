"""The iteration timeline: one DataTable row per iteration, appended live.

No widget per iteration: rows are data in one DataTable, and the summaries
behind them (`RowInfo`) are small. Search filters the rows shown; the full
list is kept so clearing the filter restores it.
"""

from __future__ import annotations

from textual.widgets import DataTable

from loopterm.tui.widgets.render import TIMELINE_COLUMNS, Palette, RowInfo, row_cells


class Timeline(DataTable):
    """Rows keyed by iteration number (as a string)."""

    DEFAULT_CSS = """
    Timeline { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.infos: list[RowInfo] = []
        self.view_run: str | None = None
        self.query_text = ""
        self.palette = Palette()

    def on_mount(self) -> None:
        for label, width in TIMELINE_COLUMNS:
            self.add_column(label, key=label, width=width)

    # -- content -------------------------------------------------------------

    def reset(self, view_run: str | None) -> None:
        self.infos = []
        self.view_run = view_run
        self.clear()

    @property
    def last_n(self) -> int:
        return self.infos[-1].n if self.infos else 0

    def matches(self, info: RowInfo) -> bool:
        return not self.query_text or self.query_text in info.haystack

    def append(self, infos: list[RowInfo]) -> None:
        """Add iterations after the last one shown; follows the newest row if the cursor was on the last."""
        fresh = [i for i in infos if i.n > self.last_n]
        if not fresh:
            return
        following = self.row_count == 0 or self.cursor_row >= self.row_count - 1
        self.infos.extend(fresh)
        shown = [i for i in fresh if self.matches(i)]
        for info in shown:
            self.add_row(*row_cells(info, self.palette, info.holder != self.view_run), key=str(info.n))
        if shown and following:
            self.move_cursor(row=self.row_count - 1, animate=False)

    def rerender(self, palette: Palette | None = None) -> None:
        """Draw every row again (a theme change, a new filter), keeping the selected iteration."""
        if palette is not None:
            self.palette = palette
        selected = self.selected_n
        self.clear()
        rows = [i for i in self.infos if self.matches(i)]
        for info in rows:
            self.add_row(*row_cells(info, self.palette, info.holder != self.view_run), key=str(info.n))
        if selected is not None:
            self.select_n(selected)

    def set_filter(self, query: str) -> int:
        """Show only iterations whose reasoning, subgoal or action contains `query`; returns the count."""
        self.query_text = query.strip().lower()
        self.rerender()
        return self.row_count

    # -- selection -----------------------------------------------------------

    @property
    def selected_n(self) -> int | None:
        if self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return int(key.value) if key.value is not None else None

    def select_n(self, n: int) -> bool:
        try:
            index = self.get_row_index(str(n))
        except Exception:
            return False
        self.move_cursor(row=index, animate=False)
        return True
