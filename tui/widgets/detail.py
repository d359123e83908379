"""The selected iteration, in tabs. Only the visible tab is rendered, and only for one iteration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static, TabbedContent, TabPane, Tree

from loopterm.core.records import IterationRecord
from loopterm.tui.widgets.render import (
    InvariantInfo,
    Palette,
    first_line,
    gates_detail,
    invariants_detail,
    literal,
    prompt_text,
    reasoning_text,
    response_text,
    state_diff,
    tool_text,
)

TABS = [
    ("reasoning", "Reasoning"),
    ("prompt", "Prompt"),
    ("response", "Response"),
    ("tool", "Tool"),
    ("gates", "Gates"),
    ("state", "State"),
    ("diff", "Diff"),
    ("invariants", "Invariants"),
]
MAX_CHILDREN = 200  # per JSON container in the state tree; the rest is summarised


@dataclass
class DetailContext:
    record: IterationRecord
    previous_state: dict[str, Any] | None
    invariants: list[InvariantInfo] = field(default_factory=list)
    relaxed: dict[str, str] = field(default_factory=dict)
    palette: Palette = field(default_factory=Palette)


class StateTree(Tree[None]):
    """A JSON value as a tree; labels are literal Text (state values are untrusted)."""

    def show(self, value: Any) -> None:
        self.clear()
        self.root.set_label(Text("state"))
        self._add(self.root, value, depth=0)
        self.root.expand()
        for child in self.root.children:
            if child.allow_expand and len(child.children) <= 20:
                child.expand()

    def _add(self, node: Any, value: Any, depth: int) -> None:
        items: list[tuple[str, Any]]
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"[{i}]", v) for i, v in enumerate(value)]
        else:
            return
        for key, child in items[:MAX_CHILDREN]:
            if isinstance(child, (dict, list)) and child:
                size = f"{{{len(child)}}}" if isinstance(child, dict) else f"[{len(child)}]"
                label = literal(key, "bold")
                label.append(f" {size}", style="dim")
                branch = node.add(label)
                self._add(branch, child, depth + 1)
            else:
                label = literal(key, "bold")
                label.append(": ")
                if isinstance(child, str):
                    shown = first_line(child, 200) + (" …" if "\n" in child or len(child) > 200 else "")
                    label.append(literal(f'"{shown}"'))
                elif child is None:
                    label.append("null", style="dim")
                elif isinstance(child, bool):
                    label.append("true" if child else "false")
                elif isinstance(child, (dict, list)):
                    label.append("{}" if isinstance(child, dict) else "[]", style="dim")
                else:
                    label.append(literal(child))
                node.add_leaf(label)
        if len(items) > MAX_CHILDREN:
            node.add_leaf(Text(f"… {len(items) - MAX_CHILDREN} more", style="dim"))


class IterationDetail(Vertical):
    DEFAULT_CSS = """
    IterationDetail { height: 1fr; }
    IterationDetail TabbedContent { height: 1fr; }
    IterationDetail TabPane { padding: 0 1; height: 1fr; }
    IterationDetail VerticalScroll { height: 1fr; }
    IterationDetail StateTree { height: 1fr; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detail_context: DetailContext | None = None
        self._rendered: set[str] = set()

    def compose(self) -> ComposeResult:
        with TabbedContent(id="detail-tabs"):
            for tab, title in TABS:
                with TabPane(title, id=f"tab-{tab}"):
                    if tab == "state":
                        yield StateTree("state", id="state-tree")
                    else:
                        with VerticalScroll(id=f"scroll-{tab}"):
                            yield Static(Text("select an iteration", style="dim"), id=f"body-{tab}")

    @property
    def active_tab(self) -> str:
        active = self.query_one(TabbedContent).active or "tab-reasoning"
        return active.removeprefix("tab-")

    def show(self, context: DetailContext | None) -> None:
        self.detail_context = context
        self._rendered.clear()
        self._render_tab(self.active_tab)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._render_tab(self.active_tab)

    def body(self, tab: str) -> Text:
        """The text a tab shows for the current iteration (also used by tests)."""
        ctx = self.detail_context
        if ctx is None:
            return Text("select an iteration", style="dim")
        record = ctx.record
        if tab == "reasoning":
            return reasoning_text(record)
        if tab == "prompt":
            return prompt_text(record)
        if tab == "response":
            return response_text(record)
        if tab == "tool":
            return tool_text(record)
        if tab == "gates":
            return gates_detail(record, ctx.palette)
        if tab == "diff":
            return state_diff(ctx.previous_state, record.state, ctx.palette)
        if tab == "invariants":
            return invariants_detail(record, ctx.invariants, ctx.relaxed, ctx.palette)
        return Text("")

    def _render_tab(self, tab: str) -> None:
        if tab in self._rendered:
            return
        self._rendered.add(tab)
        if tab == "state":
            tree = self.query_one(StateTree)
            if self.detail_context is None:
                tree.clear()
            else:
                tree.show(self.detail_context.record.state)
            return
        self.query_one(f"#body-{tab}", Static).update(self.body(tab))
        self.query_one(f"#scroll-{tab}", VerticalScroll).scroll_home(animate=False)
