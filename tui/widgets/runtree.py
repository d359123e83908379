"""Runs and their branches as a tree (store.tree()); selecting one shows it."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from loopterm.core.records import RunRecord
from loopterm.store.footprint import human
from loopterm.tui.widgets.render import Palette, literal, status_glyph


def run_label(run: RunRecord, palette: Palette, owned: bool, waiting: bool = False, marked: bool = False,
              size: int | None = None) -> Text:
    """`waiting`: its log says it waits on a person (an escalated run's glyph says so already; a run stopped
    while it waited gets the flag too). `size`: the run's own bytes in the store (tui/tree_sizes.py)."""
    glyph, variable, fallback = status_glyph(run.status)
    label = Text(no_wrap=True, overflow="ellipsis")
    label.append(f"{glyph} ", style=palette.colour(variable, fallback))
    if marked:  # the first of a pair to compare (tui/comparing.py); first, so a narrow tree still shows it
        label.append("⇄ ", style=f"bold {palette.accent}")
    label.append(run.id[:8], style="bold")
    if size is not None:  # next to the id: a narrow tree cuts a deep branch's line from the right
        label.append(f" {human(size)}", style="dim")
    label.append(" ")
    label.append(literal(run.loop))
    if run.origin == "child":
        label.append(" (called)", style="dim")
    elif run.origin == "trigger":
        label.append(" (trigger)", style="dim")
    elif run.fork_iteration is not None and run.parent_run:
        label.append(f" @{run.fork_iteration}", style="dim")
    label.append(f" {run.iterations}it", style="dim")
    if waiting and run.status != "escalated":
        label.append(" ⚑", style=f"bold {palette.warn}")
    if owned:
        label.append(" ●", style=palette.accent)
    return label


class RunTree(Tree[str], inherit_bindings=False):
    """Space is not bound here (it pauses the run everywhere on the main screen)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Show run", show=False),
        Binding("up", "cursor_up", "Cursor up", show=False),
        Binding("down", "cursor_down", "Cursor down", show=False),
        Binding("shift+up", "cursor_previous_sibling", "Previous sibling", show=False),
        Binding("shift+down", "cursor_next_sibling", "Next sibling", show=False),
    ]

    DEFAULT_CSS = """
    RunTree { width: 32; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(Text("runs"), **kwargs)
        self.show_root = False
        self.auto_expand = False
        self._shape: list[tuple[str, str | None]] = []
        self._run_nodes: dict[str, TreeNode[str]] = {}
        self._labels: dict[str, str] = {}
        self.sizes: dict[str, int] = {}  # own bytes by run id, shown when known (set before update_runs)

    marked: str | None = None  # the run marked as the first of a pair to compare (tui/comparing.py)

    def mark(self, run_id: str | None) -> None:
        """Mark a run (None: no run) for comparing; its label changes at the next `update_runs`."""
        for changed in {self.marked, run_id} - {None}:
            self._labels.pop(changed, None)  # type: ignore[arg-type]
        self.marked = run_id

    @property
    def run_ids(self) -> list[str]:
        return list(self._run_nodes)

    def update_runs(self, rows: list[tuple[int, RunRecord]], palette: Palette, owned: set[str], current: str | None,
                    waiting: set[str] | frozenset[str] = frozenset()) -> None:
        """Rebuild when runs appear; otherwise only relabel the ones whose status or count changed."""
        shape = [(run.id, run.parent_run) for _, run in rows]
        if shape != self._shape:
            self._shape = shape
            self.clear()
            self._run_nodes = {}
            self._labels = {}
            for _, run in rows:
                parent = self._run_nodes.get(run.parent_run or "", self.root)
                label = run_label(run, palette, run.id in owned, run.id in waiting, run.id == self.marked,
                                  self.sizes.get(run.id))
                node = parent.add(label, data=run.id, expand=True)
                self._run_nodes[run.id] = node
                self._labels[run.id] = ""
            self.root.expand_all()
            if current:
                self.show_current(current)
        for _, run in rows:
            label = run_label(run, palette, run.id in owned, run.id in waiting, run.id == self.marked,
                              self.sizes.get(run.id))
            if self._labels.get(run.id) != label.markup:
                self._labels[run.id] = label.markup
                self._run_nodes[run.id].set_label(label)

    def show_current(self, run_id: str) -> None:
        node = self._run_nodes.get(run_id)
        if node is not None:
            # A node's line is known only after the tree lays its lines out again.
            self.call_after_refresh(self.move_cursor, node, False)
