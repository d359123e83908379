"""The selected iteration, in tabs. Only the visible tab is rendered, and only for one iteration."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static, TabbedContent, TabPane, Tree
from textual.widgets.tree import TreeNode

from loopterm.core.acp_turn import AgentTurn
from loopterm.core.fold import ForkPoint
from loopterm.core.records import IterationRecord
from loopterm.tui.widgets.agent_turn import agent_turn_text
from loopterm.tui.widgets.render import (
    InvariantInfo,
    Palette,
    Shown,
    changed_parts,
    diff_text,
    first_line,
    gates_detail,
    invariants_detail,
    literal,
    prompt_text,
    reasoning_text,
    response_text,
    shown_state,
    tool_text,
)

TABS = [
    ("reasoning", "Reasoning"),
    ("agent", "Agent"),  # shown only for an iteration an ACP agent's turn acted in
    ("prompt", "Prompt"),
    ("response", "Response"),
    ("tool", "Tool"),
    ("gates", "Gates"),
    ("state", "State"),
    ("diff", "Diff"),
    ("invariants", "Invariants"),
]
EXPAND_UP_TO = 20  # top-level containers with at most this many entries open expanded


@dataclass
class DetailContext:
    """What the tabs show for one iteration. The record's state is not kept: only what the State tab
    draws (`shown_state`, bounded) and what the Diff tab diffs (`changed_parts`, usually tiny), so a
    long run's state (tens of thousands of objects) does not stay on the heap while a row is selected."""

    record: IterationRecord
    state: Any
    changes: tuple[dict[str, Any], dict[str, Any]]
    invariants: list[InvariantInfo] = field(default_factory=list)
    relaxed: dict[str, str] = field(default_factory=dict)
    palette: Palette = field(default_factory=Palette)
    fork: ForkPoint | None = None  # set for a branch's first iteration: what the fork changed, shown on the Diff
    agent_turn: AgentTurn | None = None  # the ACP agent's turn of this iteration (RunView.agent_turns), if any

    @classmethod
    def of(cls, record: IterationRecord, previous_state: dict[str, Any] | None, **kwargs: Any) -> "DetailContext":
        state = record.state
        return cls(record=record.model_copy(update={"state": {}}), state=shown_state(state),
                   changes=changed_parts(previous_state if previous_state is not None else {}, state), **kwargs)


def fork_note(fork: ForkPoint, palette: Palette) -> Text:
    """A branch's first Diff starts with what the person changed at the fork (values are untrusted: literal)."""
    text = Text()
    text.append(f"fork point: branch of run {fork.parent} after iteration {fork.at}", style=f"bold {palette.accent}")
    if fork.reason:
        text.append("  why: ", style="dim")
        text.append(literal(first_line(fork.reason, 120)))
    text.append("\n")
    for path, value in fork.patches:
        text.append("patched at the fork: ", style="bold")
        text.append(literal(path, "bold"))
        text.append(" = ")
        text.append(literal(first_line(json.dumps(value, ensure_ascii=False, default=str), 200)))
        text.append("\n")
    for name, why in fork.relaxed.items():
        text.append("relaxed at the fork: ", style="bold")
        text.append(literal(name, "bold"))
        if why:
            text.append(" (")
            text.append(literal(first_line(why, 120)))
            text.append(")")
        text.append("\n")
    if not fork.patches:
        text.append("the state was not patched at the fork\n", style="dim")
    text.append("what this iteration changed" + (", from the patched state:" if fork.patches else ":") + "\n\n",
                style="dim")
    return text


class StateTree(Tree[Shown | None]):
    """A JSON value as a tree, built lazily: a container's entries are added when it is first expanded.
    Labels are literal Text (state values are untrusted)."""

    def show(self, value: Any) -> None:
        self.clear()
        self.root.set_label(Text("state"))
        self.root.data = value if isinstance(value, Shown) else None
        self._fill(self.root)
        self.root.expand()
        for child in self.root.children:
            shown = child.data
            if shown is not None and len(shown.items) <= EXPAND_UP_TO and shown.total <= EXPAND_UP_TO:
                self._fill(child)
                child.expand()

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[Shown | None]) -> None:
        if event.node.tree is self:
            self._fill(event.node)

    def _fill(self, node: TreeNode[Shown | None]) -> None:
        """Add a container's entries under its node, once."""
        shown = node.data
        if shown is None or node.children:
            return
        for key, child in shown.items:
            label = literal(key, "bold")
            if isinstance(child, Shown):
                label.append(f" {{{child.total}}}" if child.is_dict else f" [{child.total}]", style="dim")
                node.add(label, data=child)
                continue
            label.append(": ")
            if isinstance(child, str):
                text = first_line(child, 200) + (" …" if "\n" in child or len(child) > 200 else "")
                label.append(literal(f'"{text}"'))
            elif child is None:
                label.append("null", style="dim")
            elif isinstance(child, bool):
                label.append("true" if child else "false")
            elif isinstance(child, (dict, list)):
                label.append("{}" if isinstance(child, dict) else "[]", style="dim")
            else:
                label.append(literal(child))
            node.add_leaf(label)
        if shown.total > len(shown.items):
            node.add_leaf(Text(f"… {shown.total - len(shown.items)} more", style="dim"))


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
        self._agent_shown: bool | None = None  # whether the Agent tab is there (None: not decided yet)

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

    def on_mount(self) -> None:
        self._agent_tab(False)

    def _agent_tab(self, shown: bool) -> None:
        """The Agent tab is there only while the iteration has an agent's turn (hiding it while it is active
        activates the next tab)."""
        if shown == self._agent_shown:
            return
        self._agent_shown = shown
        tabs = self.query_one(TabbedContent)
        if shown:
            tabs.show_tab("tab-agent")
            if self.active_tab == "reasoning":  # an agent loop's reasoning is the agent's turn: show it first
                tabs.active = "tab-agent"
        else:
            tabs.hide_tab("tab-agent")

    def show(self, context: DetailContext | None) -> None:
        self.detail_context = context
        self._rendered.clear()
        self._agent_tab(context is not None and context.agent_turn is not None)
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
            diff = diff_text(*ctx.changes, ctx.palette)
            return diff if ctx.fork is None else fork_note(ctx.fork, ctx.palette) + diff
        if tab == "invariants":
            return invariants_detail(record, ctx.invariants, ctx.relaxed, ctx.palette)
        if tab == "agent":
            if ctx.agent_turn is None:
                return Text("no agent's turn in this iteration", style="dim")
            return agent_turn_text(ctx.agent_turn, ctx.palette)
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
                tree.show(self.detail_context.state)
            return
        self.query_one(f"#body-{tab}", Static).update(self.body(tab))
        self.query_one(f"#scroll-{tab}", VerticalScroll).scroll_home(animate=False)
