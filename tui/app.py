"""The supervision TUI: watch loops live, step them, edit their state, branch them, answer them.

Architecture (one direction for everything):

- The App owns every engine it runs, as Textual workers (asyncio tasks on the
  App's loop). An engine's subscriber only posts an `EngineNotice` message;
  handlers on the App own all state.
- The screen is a view of the store. Whether a run executes in this window
  or in another process (`loopterm watch RUN`), the App reads what is new
  (iterations after the last shown, events after the last id, the run row)
  on a 0.25 s interval, and sends every control as a command through the
  store's control channel, which the executing engine obeys at its next
  iteration boundary (at once while it is paused or waiting on a person).
  Engine notices only make that read happen sooner.
- Model output, tool output and state values are untrusted: they are shown as
  `rich.text.Text` built without markup, control characters escaped.
- No widget and no object per iteration: the timeline is a virtual list over
  flat columns (a few bytes a row, drawn only where on screen); the detail
  tabs render only the selected iteration, and only the visible tab.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial, wraps
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

from pydantic import ValidationError
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Input, Sparkline, Static
from textual.worker import get_current_worker

from loopterm.core.control import AddFact, Command, Pause, Resume, SetSubgoal, Step, Stop, command_payload
from loopterm.core.decision import json_path
from loopterm.core.engine import Engine, alive, executing_elsewhere, new_run_id
from loopterm.core.errors import LooptermError
from loopterm.core.events import IterationCommitted
from loopterm.core.loop import Loop
from loopterm.core.records import EventRecord, RunRecord
from loopterm.core.shadow import SHADOW_EVENT
from loopterm.store import Store
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.screens.branch import BranchScreen
from loopterm.tui.screens.dialog import Dialog, TextPrompt
from loopterm.tui.screens.edit_state import EditStateScreen
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen, Waiting
from loopterm.tui.screens.help import HelpScreen
from loopterm.tui.screens.relax import InvariantChoice, RelaxScreen
from loopterm.tui.screens.side_effect import SideEffectScreen
from loopterm.tui.widgets.detail import DetailContext, IterationDetail
from loopterm.tui.widgets.render import (
    InvariantInfo,
    Palette,
    RowInfo,
    first_line,
    header_text,
    literal,
    money,
    summarize,
)
from loopterm.tui.widgets.runtree import RunTree
from loopterm.tui.widgets.timeline import Timeline

POLL_SECONDS = 0.25  # the screen follows the store at least this often (watch must within 0.5 s)
TREE_EVERY = 4  # ticks between re-reads of the run list (1 s)
FIRST_BATCH = 50  # timeline rows in the first batch while a stored run loads
LOAD_BATCH = 1000  # and in each batch after it
MAX_ROWS_PER_POLL = 400  # iterations read per poll while catching up with a fast run
FOLLOW_DETAIL_SECONDS = 0.2  # while the cursor follows a fast run, its detail pane catches up this often
FINISHED = {"converged", "terminated", "failed", "stopped"}
PATCH_EVENTS = {"state_edited", "fact_added", "subgoal_set", "forked"}

SUPERVISION_BINDINGS: list[Binding] = [
    Binding("space", "app.toggle_pause", "Pause/resume", id="pause",
            tooltip="Pause the run at its next iteration boundary, or let a paused or answered run continue"),
    Binding("n", "app.step", "Step", id="step", tooltip="Run exactly one iteration, then pause"),
    Binding("e", "app.edit_state", "Edit state", id="edit_state",
            tooltip="Edit the state the next iteration starts from (JSON, validated against the loop's state model)"),
    Binding("i", "app.relax", "Relax", id="relax",
            tooltip="Relax or restore an invariant, with a reason, optionally for the next N iterations"),
    Binding("b", "app.branch", "Branch", id="branch",
            tooltip="Branch from the selected iteration (optional state patches); the branch runs live"),
    Binding("a", "app.approve", "Approve", id="approve",
            tooltip="Approve the tool call waiting for a person (arguments editable)"),
    Binding("d", "app.deny", "Deny", id="deny", tooltip="Deny the tool call waiting for a person"),
    Binding("x", "app.inbox", "Escalations", id="inbox", tooltip="Runs across the database waiting on a person"),
    Binding("slash", "app.search", "Search", id="search",
            tooltip="Search the reasoning trail: filter the timeline to iterations whose reasoning or subgoal match"),
    Binding("r", "app.resume", "Resume", id="resume",
            tooltip="Let the run continue; a run nothing executes (stopped, escalated, crashed) starts in this window"),
    Binding("s", "app.stop", "Stop", id="stop",
            tooltip="Stop the run at its next iteration boundary (it stays resumable)"),
    Binding("question_mark", "app.help", "Help", id="help", tooltip="Every key binding"),
    Binding("q", "app.quit", "Quit", id="quit",
            tooltip="Quit; runs started here stop at their next boundary and stay resumable"),
]
SEARCH_CLOSE = Binding("escape", "app.close_search", "Close search", id="close_search", show=False,
                       tooltip="Clear the search and show every iteration")


def on_screen(method: Any) -> Any:
    """For handlers that touch the main screen's widgets: a no-op while the App shuts down (timers and
    thread callbacks can still arrive after the widgets are gone)."""

    @wraps(method)
    def wrapper(self: "LooptermApp", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except NoMatches:
            if self.shutting_down:
                return None
            raise

    return wrapper


class EngineNotice(Message):
    """An engine event, posted by an engine's subscriber; the App's handler does the rest."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


@dataclass
class View:
    """The run on screen and what has been read of it so far."""

    run_id: str
    run: RunRecord
    loading: bool = True
    last_event: int = 0
    costs: array[float] = field(default_factory=lambda: array("d"))  # spend per iteration (8 bytes each)
    cost_max: float = 0.0
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)  # pending, by key
    packet: dict[str, Any] | None = None  # the last escalation packet
    relaxed: dict[str, str] = field(default_factory=dict)
    patched: tuple[int, dict[str, Any]] | None = None  # (iteration, state) of the last person's patch
    lifecycle_open: bool = False  # started and not finished: an engine somewhere is executing it
    open_start: EventRecord | None = None  # that start (its pid and host tell whether its process still exists)
    side_effect: dict[str, Any] | None = None  # a repeatable side effect the run stopped on, unanswered
    detail_n: int | None = None
    shadow: bool = False  # a shadow run: its proposals go to a person, nothing runs (core/shadow.py)


def absorb(view: View, events: Iterable[EventRecord]) -> list[EventRecord]:
    """Fold events into the view; returns them (for notifications)."""
    seen = []
    for event in events:
        view.last_event = max(view.last_event, event.id or 0)
        data = event.data
        kind = event.kind
        if kind in ("run_started", "run_resumed"):
            view.lifecycle_open, view.open_start = True, event
        elif kind == "run_finished":
            view.lifecycle_open, view.open_start = False, None
            view.approvals.clear()
        elif kind == "approval_pending":
            view.approvals[str(data.get("key"))] = {**data, "n": event.iteration}
        elif kind in ("approved", "denied"):
            view.approvals.pop(str(data.get("key")), None)
        elif kind == "escalated":
            view.packet = data
        elif kind == "side_effect_pending":
            view.side_effect = dict(data)
        elif kind == "side_effect_answered":
            view.side_effect = None
        elif kind == "invariant_relaxed":
            view.relaxed[str(data.get("invariant"))] = str(data.get("reason", ""))
        elif kind == "invariant_restored":
            view.relaxed.pop(str(data.get("invariant")), None)
        elif kind == SHADOW_EVENT:
            view.shadow = True
        if kind in PATCH_EVENTS and data.get("patched_state") is not None:
            view.patched = (event.iteration or 0, data["patched_state"])
        seen.append(event)
    return seen


class MainScreen(Screen[None]):
    """Header; runs tree | timeline + spend + detail tabs; footer."""

    BINDINGS: ClassVar[list[BindingType]] = [*SUPERVISION_BINDINGS, SEARCH_CLOSE]

    def compose(self) -> ComposeResult:
        yield Static(Text("loopterm"), id="run-header")
        with Horizontal(id="body"):
            yield RunTree(id="runs")
            with Vertical(id="centre"):
                with Horizontal(id="search-bar"):
                    yield Input(placeholder="search the reasoning trail (enter: jump, escape: clear)", id="search")
                    yield Static("", id="search-info")
                yield Timeline(id="timeline")
                with Horizontal(id="spend-bar"):
                    yield Static(Text("spend/iter"), id="spend-label")
                    yield Sparkline([], id="spend")
                yield IterationDetail(id="detail")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(Timeline).focus()
        self.app.call_later(self.app.main_ready)  # type: ignore[attr-defined]


class LooptermApp(App[None]):
    """`LooptermApp(db_path, start=(loop, ref))` runs a new run live; `watch_run=ID` attaches; neither browses."""

    CSS_PATH = "app.tcss"
    TITLE = "loopterm"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", id="app.quit", show=False, priority=True,
                tooltip="Quit; runs started here stop at their next boundary and stay resumable"),
    ]

    def __init__(
        self,
        db_path: Path,
        *,
        start: tuple[Loop, str] | None = None,
        model: str | None = None,
        watch_run: str | None = None,
        budget: dict[str, Any] | None = None,
        max_iterations: int | None = None,
        theme: str | None = None,
        frozen: bool | None = None,
        loops: dict[str, Loop] | None = None,
        otlp: str | None = None,
        shadow: bool = False,
    ) -> None:
        super().__init__()
        self.shadow = shadow  # `start` begins a shadow run
        self.db_path = Path(db_path)
        self.store = Store.open(self.db_path)
        self.workspace_root = self.db_path.resolve().parent / "workspaces"
        self.start_spec = start
        self.model = model
        self.watch_run = watch_run
        self.budget = budget
        self.max_iterations = max_iterations
        self.otlp = otlp  # send traces of the engines this window drives (tui/traces.py)
        self.live_traces: Any = None
        self.frozen = bool(int(os.environ.get("LOOPTERM_FROZEN", "0") or 0)) if frozen is None else frozen
        if self.frozen:
            self.animation_level = "none"
        self.requested_theme = theme
        self.palette = Palette()
        self.view: View | None = None
        self.engines: dict[str, Engine] = {}
        self._starting: set[str] = set()
        self._loops: dict[str, Loop | None] = dict(loops or {})
        self._loop_errors: dict[str, str] = {}
        if start is not None:
            self._loops[start[1]] = start[0]
        self._ticks = 0
        self._poll_queued = False
        self._spend_dirty = False
        self._tree_iterations: int | None = None  # the shown run's iteration count when the tree was drawn
        self._quitting = False
        self._escalated_count = 0
        self._remember_theme = False
        self._last_theme = ""
        self._screen_ready = False
        self._detail_timer: Timer | None = None
        self.theme_warnings: list[str] = []

    # ------------------------------------------------------------------ setup

    def get_default_screen(self) -> Screen[Any]:
        return MainScreen()

    def on_mount(self) -> None:
        self._setup_theme()
        self.theme_changed_signal.subscribe(self, self._theme_changed)

    def on_unmount(self) -> None:
        if self.live_traces is not None:  # the spans still queued go out (bounded) before the process ends
            self.live_traces.close()

    def main_ready(self) -> None:
        """The main screen is composed: show a run (or start one) and follow the store."""
        self._screen_ready = True
        self.refresh_tree()
        if self.start_spec is not None:
            loop, ref = self.start_spec
            self._header_note = Text(f"starting {loop.name} ...", style="italic")
            self.run_worker(self._launch(loop, ref), name="launch", group="launch", exit_on_error=False)
        elif self.watch_run:
            try:
                run = self.store.resolve_run(self.watch_run)
            except LooptermError as exc:
                self.notify(str(exc), severity="error", timeout=10)
            else:
                self.show_run(run.id)
        else:
            runs = self.store.list_runs()
            if runs:
                self.show_run(runs[-1].id)
        self.update_header()
        self.set_interval(POLL_SECONDS, self._tick)
        for warning in self.theme_warnings:
            self.notify(warning, severity="warning", timeout=8)

    def _setup_theme(self) -> None:
        """loopterm's themes (and the user's theme files), the remembered choice unless `theme=` was given."""
        try:
            from loopterm.themes import apply_theme, register_all
        except ImportError:  # pragma: no cover - themes ship with loopterm
            apply_theme = register_all = None
        if register_all is not None:
            try:
                self.theme_warnings = [str(w) for w in (register_all(self) or [])]
            except Exception as exc:  # a broken user theme file must not stop the TUI
                self.theme_warnings = [f"themes: {exc}"]
        wanted = self.requested_theme or _saved_theme(self.theme_warnings)
        if apply_theme is not None:
            self.theme_warnings.extend(apply_theme(self, wanted))
        else:
            self.theme = wanted if wanted in self.available_themes else "textual-dark"
        self._last_theme = self.theme
        self.palette = Palette.from_app(self)
        self._remember_theme = self.requested_theme is None

    def _theme_changed(self, theme: Any) -> None:
        self.palette = Palette.from_app(self)
        if self._screen_ready:
            self.timeline.rerender(self.palette)
            self.refresh_tree(force_labels=True)
            self.update_header()
            if self.view is not None and self.view.detail_n is not None:
                self._show_detail(self.view.detail_n)
        name = getattr(theme, "name", str(theme))
        if name == self._last_theme:
            return
        self._last_theme = name
        if self._remember_theme:
            from loopterm.tui.config import remember_theme

            for note in remember_theme(name) or []:
                self.notify(str(note), title="Settings", severity="warning")

    # ------------------------------------------------------------------ widgets

    @property
    def shutting_down(self) -> bool:
        if self._exit or self._closing or self._closed:
            return True
        mains = [s for s in self.screen_stack if isinstance(s, MainScreen)]
        return not mains or any(s._closing or s._closed for s in mains)

    @property
    def main(self) -> MainScreen:
        for screen in self.screen_stack:
            if isinstance(screen, MainScreen):
                return screen
        raise LookupError("no main screen")

    @property
    def timeline(self) -> Timeline:
        return self.main.query_one(Timeline)

    @property
    def detail(self) -> IterationDetail:
        return self.main.query_one(IterationDetail)

    @property
    def run_tree(self) -> RunTree:
        return self.main.query_one(RunTree)

    _header_note: Text | None = None
    _header_shown: str = ""
    _header_lines: int = 0

    @on_screen
    def update_header(self) -> None:
        view = self.view
        note = self._header_note
        status = None
        if view is not None:
            note = self._attention(view)
        owned = view is not None and view.run_id in self.engines
        text = header_text(view.run if view else None, self.palette, status=status, owned=owned, note=note,
                           inbox=self._escalated_count, shadow=view is not None and view.shadow)
        if view is None and self._header_note is not None:
            text = Text()
            text.append("loopterm  ", style="bold")
            text.append_text(self._header_note)
        if text.markup != self._header_shown:  # polls run on every engine event: repaint only on change
            lines = text.plain.count("\n")
            # Lines do not wrap (no_wrap): the same number of lines, the same height, so no layout of the
            # whole screen (a fast run changes the header 50 times a second).
            same_height = text.no_wrap and self._header_shown != "" and lines == self._header_lines
            self._header_shown, self._header_lines = text.markup, lines
            self.main.query_one("#run-header", Static).update(text, layout=not same_height)

    def _attention(self, view: View) -> Text | None:
        palette = self.palette
        if view.approvals:
            call = next(iter(view.approvals.values()))
            shadow = bool(call.get("shadow"))
            text = Text("◐ shadow proposal: " if shadow else "⚑ waiting for approval: ", style=f"bold {palette.warn}")
            args = call.get("args") or {}
            first = next(iter(args.values()), "") if args else ""
            text.append(literal(f"{call.get('tool', '?')}({first_line(first, 40)})"))
            text.append("   nothing will run: a agree or edit · d deny" if shadow
                        else "   a approve (arguments editable) · d deny", style="italic")
            return text
        status = view.run.status
        if status == "escalated" and view.side_effect is not None:
            text = Text("⚑ a side effect may repeat: ", style=f"bold {palette.warn}")
            text.append(literal(f"{view.side_effect.get('tool', '?')}"))
            text.append("   r decides (reuse the recorded result or execute again) and resumes", style="italic")
            return text
        if status == "escalated" and view.packet:
            text = Text("⚑ ", style=f"bold {palette.warn}")
            text.append(literal(first_line(view.packet.get("summary", ""), 100), f"bold {palette.warn}"))
            text.append("   x inbox · i relax · e edit state · r resume", style="italic")
            return text
        if status == "paused":
            return Text("⏸ paused   space resumes · n steps one iteration · e edits the state", style=f"{palette.warn}")
        if status in FINISHED or status == "escalated":
            if view.run_id not in self.engines and not view.lifecycle_open and status != "converged":
                return Text("not executing   r resumes it in this window · b branches from the selected iteration",
                            style="dim")
        return None

    # ------------------------------------------------------------------ runs and the tree

    @on_screen
    def refresh_tree(self, force_labels: bool = False) -> None:
        rows = self.store.tree()
        self._escalated_count = sum(1 for _, run in rows if run.status == "escalated")
        self._tree_iterations = self.view.run.iterations if self.view is not None else None
        tree = self.run_tree
        if force_labels:
            tree._labels.clear()
        tree.update_runs(rows, self.palette, set(self.engines), self.view.run_id if self.view else None)

    def on_tree_node_selected(self, event: RunTree.NodeSelected[str]) -> None:
        if event.node.data and (self.view is None or event.node.data != self.view.run_id):
            self.show_run(event.node.data)

    @on_screen
    def show_run(self, run_id: str) -> None:
        """Put a run on screen: its whole lineage's iterations load in a thread, then it follows the store."""
        try:
            run = self.store.get_run(run_id)
        except KeyError:
            self.notify(f"no run {run_id}", severity="error")
            return
        view = View(run_id=run_id, run=run)
        self.view = view
        self._header_note = None
        self.timeline.reset(run_id)
        self.timeline.palette = self.palette
        self.main.query_one("#spend", Sparkline).data = []
        self.detail.show(None)
        self.run_tree.show_current(run_id)
        self.update_header()
        self.run_worker(partial(self._load_view, view), name=f"load {run_id}", group="loader", exclusive=True,
                        thread=True, exit_on_error=False)

    def _load_view(self, view: View) -> None:
        """Thread worker: stream the lineage's iterations as small summaries, in batches."""
        worker = get_current_worker()
        batch: list[tuple[RowInfo, float]] = []
        size = FIRST_BATCH  # a small first batch fills the first screen at once
        try:
            for record in _stream_iterations(self.store, view.run_id):
                if worker.is_cancelled or self.view is not view:
                    return
                batch.append((summarize(record), record.cost_usd))
                if len(batch) >= size:
                    self.call_from_thread(self._loaded, view, batch, None)
                    batch, size = [], LOAD_BATCH
            events = self.store.events(view.run_id)
        except Exception as exc:  # a damaged database: say so, keep the screen
            self.call_from_thread(self.notify, f"could not read run {view.run_id}: {exc}", severity="error")
            events = []
        if not worker.is_cancelled:
            self.call_from_thread(self._loaded, view, batch, events)

    @on_screen
    def _loaded(self, view: View, batch: list[tuple[RowInfo, float]], events: list[EventRecord] | None) -> None:
        if self.view is not view:
            return
        self._append(view, batch)
        if events is not None:
            absorb(view, events)
            view.loading = False
            self.refresh_bindings()
            self._paint_spend(view)
            self.update_header()
            if self.timeline.selected_n is not None and view.detail_n is None:
                self._show_detail(self.timeline.selected_n)
            self.poll()

    @on_screen
    def _append(self, view: View, rows: list[tuple[RowInfo, float]]) -> None:
        fresh = [(info, cost) for info, cost in rows if info.n > self.timeline.last_n]
        if not fresh:
            return
        view.costs.extend(cost for _, cost in fresh)
        view.cost_max = max(view.cost_max, max(cost for _, cost in fresh))
        self.timeline.append([info for info, _ in fresh])
        self._spend_dirty = True
        if view.loading and len(view.costs) == len(fresh):
            self._paint_spend(view)  # the first screen of a stored run

    def _paint_spend(self, view: View) -> None:
        self._spend_dirty = False
        self.main.query_one("#spend", Sparkline).data = spend_series(view.costs)
        label = Text("spend/iter ")
        if view.costs:
            label.append(money(view.cost_max) + " max", style="dim")
        self.main.query_one("#spend-label", Static).update(label, layout=False)

    @on_screen
    def _tick(self) -> None:
        """Every POLL_SECONDS: read the store, then repaint what a fast run changes on every iteration (the
        header's counts, the tree's, the spend sparkline). Doing that on each of 50 iterations a second
        made Textual lay out and draw those widgets 50 times a second, and its render caches are what
        filled the old generation of the garbage collector (a 50-70 ms full collection every second)."""
        self._ticks += 1
        self.poll()
        view = self.view
        if view is not None and self._spend_dirty and not view.loading:
            self._paint_spend(view)
        if self._ticks % TREE_EVERY == 0 or self._tree_iterations != (view.run.iterations if view else None):
            self.refresh_tree()  # other runs change too (every TREE_EVERY ticks)
        self.update_header()

    # ------------------------------------------------------------------ following the store

    @on_screen
    def poll(self) -> None:
        """Read only what is new: the run row, iterations after the last shown, events after the last id."""
        self._poll_queued = False
        view = self.view
        if view is None:
            return
        try:
            run = self.store.get_run(view.run_id)
        except KeyError:
            return
        if not view.loading and run.iterations > self.timeline.last_n:
            with acyclic_burst():  # each record's state is dropped once summarised
                new = islice(self.store.iter_iterations(view.run_id, first=self.timeline.last_n + 1), MAX_ROWS_PER_POLL)
                rows = [(summarize(record), record.cost_usd) for record in new]
            self._append(view, rows)
        absorbed = False
        if not view.loading:
            waiting, relaxed = set(view.approvals), dict(view.relaxed)
            for event in absorb(view, self.store.events(view.run_id, after_id=view.last_event)):
                absorbed = True
                self._announce(view, event)
            if set(view.approvals) != waiting:
                self.refresh_bindings()
            if view.relaxed != relaxed and view.detail_n is not None:
                self._show_detail(view.detail_n)  # the Invariants tab says which are relaxed
        old, view.run = view.run, run
        if old.status != run.status or absorbed:
            self.refresh_tree()
            self.update_header()  # at once; counts that change every iteration wait for the next _tick

    def poll_soon(self) -> None:
        if not self._poll_queued:
            self._poll_queued = True
            self.call_later(self.poll)

    def _announce(self, view: View, event: EventRecord) -> None:
        data = event.data
        if event.kind == "command_rejected":
            self.notify(f"run {view.run_id[:8]} refused {data.get('command')}: {data.get('error')}", severity="error",
                        timeout=8, markup=False)
        elif event.kind == "escalated":
            self.notify(f"run {view.run_id[:8]} waits on a person: {first_line(data.get('summary', ''), 120)} (x)",
                        severity="warning", timeout=8, markup=False)
        elif event.kind == "approval_pending":
            asked = ("proposes tool {} (shadow: nothing will run; a agree or edit, d deny)" if data.get("shadow")
                     else "tool {} needs approval (a / d)").format(data.get("tool"))
            self.notify(f"run {view.run_id[:8]}: {asked}", severity="warning", timeout=8, markup=False)
        elif event.kind == "strategy_changed":
            self.notify(f"run {view.run_id[:8]} changed strategy to {data.get('to')}: {first_line(str(data.get('why', '')), 120)}",
                        timeout=6, markup=False)

    @on_screen
    def on_engine_notice(self, message: EngineNotice) -> None:
        event = message.event
        view = self.view
        if isinstance(event, IterationCommitted) and view is not None and event.record.run_id == view.run_id \
                and not view.loading:
            self._append(view, [(summarize(event.record), event.record.cost_usd)])
        run_id = getattr(event, "run_id", None) or getattr(getattr(event, "record", None), "run_id", None)
        kind = getattr(event, "kind", "")
        if run_id and (view is None or run_id != view.run_id):
            if kind == "escalated":
                self.notify(f"run {run_id[:8]} waits on a person (x)", severity="warning", timeout=8)
            elif kind == "approval_needed":
                self.notify(f"run {run_id[:8]}: a tool call needs approval (x)", severity="warning", timeout=8)
        if kind in ("run_started", "run_finished", "status_changed", "escalated"):
            self.refresh_tree()
        self.poll_soon()

    # ------------------------------------------------------------------ detail

    def on_timeline_row_highlighted(self, event: Timeline.RowHighlighted) -> None:
        """A person's move shows its iteration at once; the cursor following new rows (up to 50 a second)
        shows the newest at most every FOLLOW_DETAIL_SECONDS: reading a long run's iteration costs a few ms."""
        if self._detail_timer is not None:
            self._detail_timer.stop()
            self._detail_timer = None
        if event.following and self.view is not None and self.view.detail_n is not None:
            self._detail_timer = self.set_timer(FOLLOW_DETAIL_SECONDS, self._show_selected)
        else:
            self._show_detail(event.n)

    def _show_selected(self) -> None:
        self._detail_timer = None
        n = self.timeline.selected_n if self._screen_ready and not self.shutting_down else None
        if n is not None and self.view is not None and n != self.view.detail_n:
            self._show_detail(n)

    @on_screen
    def _show_detail(self, n: int) -> None:
        view = self.view
        if view is None:
            return
        with acyclic_burst():  # the states read are dropped before it ends: see acyclic_burst
            context = self._detail_context(view, n)
        if context is not None:
            view.detail_n = n
            self.detail.show(context)

    def _detail_context(self, view: View, n: int) -> DetailContext | None:
        """Iteration n for the detail pane: the record, and what the State and Diff tabs need of its state."""
        # Iterations n-1 and n in one read: n's state is rebuilt from n-1's, so the two share what did not
        # change (one state decoded, not two, and the diff compares shared parts by identity).
        pair = list(islice(self.store.iter_iterations(view.run_id, first=max(1, n - 1)), 2 if n > 1 else 1))
        record = pair[-1] if pair and pair[-1].n == n else self.store.get_iteration(view.run_id, n)
        if record is None:
            return None
        previous = None
        if n > 1:
            if len(pair) == 2 and pair[0].n == n - 1:
                previous = pair[0].state
            else:
                try:
                    previous = self.store.state_at(view.run_id, n - 1)
                except KeyError:
                    previous = None
        else:
            loop = self.loop_for(view.run)
            if loop is not None:
                try:
                    previous = loop.new_state().model_dump(mode="json")
                except Exception:
                    previous = None
        return DetailContext.of(record, previous, invariants=self._invariant_infos(view.run),
                                relaxed=dict(view.relaxed), palette=self.palette)

    def _invariant_infos(self, run: RunRecord) -> list[InvariantInfo]:
        loop = self.loop_for(run)
        if loop is None:
            return []
        return [InvariantInfo(i.name, i.description, i.remediation.value) for i in loop.invariants]

    # ------------------------------------------------------------------ loops and engines

    def loop_for(self, run: RunRecord) -> Loop | None:
        """The run's loop definition (loaded once per ref); None when it cannot be loaded here."""
        ref = run.loop_ref
        if ref not in self._loops:
            try:
                from loopterm.core.loader import load_loop

                self._loops[ref] = load_loop(ref)[0]
            except Exception as exc:
                self._loops[ref] = None
                self._loop_errors[ref] = str(exc)
        return self._loops[ref]

    def _loop_or_say(self, run: RunRecord, doing: str) -> Loop | None:
        loop = self.loop_for(run)
        if loop is None:
            why = self._loop_errors.get(run.loop_ref, "")
            self.notify(f"cannot {doing}: loop {run.loop_ref!r} does not load here ({why})", severity="error",
                        timeout=10, markup=False)
        return loop

    def _engine_kwargs(self) -> dict[str, Any]:
        params = inspect.signature(Engine.__init__).parameters
        return {"wait_on_person": True} if "wait_on_person" in params else {}

    async def _model_ready(self, loop: Loop, model: str) -> bool:
        """Check the model before a run starts (registers the offline script); litellm loads in a thread."""
        from loopterm.core.checkers import preflight_roles
        from loopterm.core.model import check_model

        try:
            await asyncio.to_thread(check_model, model, loop.script if model.startswith("scripted/") else None)
            preflight_roles(loop.gates, model)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            return False
        return True

    async def _launch(self, loop: Loop, ref: str) -> None:
        model = self.model or loop.model
        if not await self._model_ready(loop, model):
            self._header_note = Text(f"could not start {loop.name}: see the message", style="bold red")
            self.update_header()
            return
        engine = Engine.create(
            loop, self.store, loop_ref=ref, model=model, max_iterations=self.max_iterations, budget=self.budget or {},
            workspace_root=self.workspace_root, **self._engine_kwargs(), **({"shadow": True} if self.shadow else {}),
        )
        self.own(engine)
        self.refresh_tree()
        self.show_run(engine.run_id)

    def own(self, engine: Engine) -> None:
        """Drive an engine in an App-owned worker; its events arrive as EngineNotice messages."""
        self.engines[engine.run_id] = engine
        engine.subscribe(lambda event: self.post_message(EngineNotice(event)))
        if self.otlp:
            from loopterm.tui.traces import follow

            follow(self, engine)
        self.run_worker(self._drive(engine), name=f"engine {engine.run_id}", group="engines", exit_on_error=False)

    async def _drive(self, engine: Engine) -> None:
        try:
            await engine.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a loop's own code: say so, keep the screen
            self.notify(f"run {engine.run_id} crashed: {exc.__class__.__name__}: {exc}", severity="error", timeout=15,
                        markup=False)
        finally:
            self.engines.pop(engine.run_id, None)
            self._starting.discard(engine.run_id)
            if not self._quitting:
                self.refresh_tree()
                self.poll_soon()

    def executing(self, run_id: str) -> bool:
        """Whether an engine (this window's, or another process's) is executing the run now."""
        if run_id in self.engines or run_id in self._starting:
            return True
        try:
            run = self.store.get_run(run_id)
        except KeyError:
            return False
        if run.status in FINISHED or run.status == "created":
            return False
        if not alive(run):  # a stale heartbeat: whatever executed it is gone (killed, crashed)
            return False
        if self.view is not None and self.view.run_id == run_id and not self.view.loading:
            start = self.view.open_start
            return executing_elsewhere(run, [start] if start is not None else [])
        return executing_elsewhere(run, self.store.events(run_id))

    def resume_here(self, run_id: str, first: Command | None = None) -> None:
        """Start an engine in this window for a run that nothing executes (optionally with a first command).

        A run that stopped on a side effect it may repeat asks the person first (reuse or execute again).
        """
        if run_id in self._starting or run_id in self.engines:
            return
        run = self.store.get_run(run_id)
        if run.status == "converged":
            self.notify(f"run {run_id[:8]} converged: branch (b) from an iteration to continue it", severity="warning")
            return
        loop = self._loop_or_say(run, "resume it here")
        if loop is None:
            return
        side_effect = _pending_side_effect(self.store.events(run_id))
        if side_effect is not None:
            def answered(answer: str | None) -> None:
                if answer is not None:
                    key = str(side_effect["key"])
                    self.store.append_event(run_id, "side_effect_answered", {"key": key, "answer": answer})
                    self._start_engine(run, loop, first, {key: answer})

            self.push_screen(SideEffectScreen(run_id, side_effect), callback=answered)
            return
        self._start_engine(run, loop, first, None)

    def _start_engine(self, run: RunRecord, loop: Loop, first: Command | None, answers: dict[str, str] | None) -> None:
        if run.id in self._starting or run.id in self.engines:
            return
        self._starting.add(run.id)
        if first is not None:
            self.send(run.id, first, quiet=True)
        self.run_worker(self._resume(run, loop, answers), name=f"resume {run.id}", group="launch", exit_on_error=False)

    def _within_daily_budget(self, run: RunRecord, loop: Loop, what: str) -> bool:
        """The daily-budget gate of `loopterm resume` and `fork`, for a run continued from this screen."""
        from loopterm.store.ledger import cap_run, money

        try:
            _, cap = cap_run(self.store, run, loop.budget.usd, what=what)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            return False
        if cap is not None:
            self.notify(f"{what} had no USD cap: it gets what is left of today's daily budget, {money(cap)}",
                        timeout=6, markup=False)
        return True

    async def _resume(self, run: RunRecord, loop: Loop, answers: dict[str, str] | None = None) -> None:
        try:
            if not await self._model_ready(loop, run.model):
                return
            if not self._within_daily_budget(self.store.get_run(run.id), loop, "what this run may still spend"):
                return
            from loopterm.core.fork import AncestorCalls

            prior = AncestorCalls(self.store, run) if run.origin == "fork" else None
            kwargs = self._engine_kwargs()
            if answers:
                kwargs["side_effect_answers"] = answers
            engine = Engine(loop, self.store, self.store.get_run(run.id), prior=prior, **kwargs)
            self.own(engine)
            self.notify(f"run {run.id[:8]} continues in this window", timeout=3)
        finally:
            self._starting.discard(run.id)
        self.refresh_tree()
        self.poll_soon()

    # ------------------------------------------------------------------ sending commands

    def send(self, run_id: str, command: Command, *, quiet: bool = False) -> None:
        """Every control goes through the store's control channel, for runs here and in other processes alike."""
        kind, payload = command_payload(command)
        self.store.add_command(run_id, kind, payload)
        if not quiet:
            self.notify(f"{kind.replace('_', ' ')} sent to run {run_id[:8]}", timeout=3)
        self.poll_soon()

    def _current_run(self) -> RunRecord | None:
        if self.view is None:
            self.notify("no run on screen: pick one in the tree on the left", severity="warning")
            return None
        try:
            self.view.run = self.store.get_run(self.view.run_id)
        except KeyError:
            return None
        return self.view.run

    def _target(self, run_id: str | None) -> RunRecord | None:
        if run_id is None:
            return self._current_run()
        try:
            return self.store.get_run(run_id)
        except KeyError:
            self.notify(f"no run {run_id}", severity="error")
            return None

    def action_toggle_pause(self) -> None:
        run = self._current_run()
        if run is None:
            return
        if self.executing(run.id):
            if run.status in ("paused", "escalated"):
                if run.status == "escalated" and self.view and self.view.approvals:
                    self.notify("a tool call waits for approval: a approves, d denies", severity="warning")
                    return
                self.send(run.id, Resume())
            else:
                self.send(run.id, Pause())
        else:
            self.resume_here(run.id)

    def action_step(self) -> None:
        run = self._current_run()
        if run is None:
            return
        if self.executing(run.id):
            self.send(run.id, Step())
        else:
            self.resume_here(run.id, first=Step())

    def action_resume(self) -> None:
        run = self._current_run()
        if run is not None:
            self.resume_run(run.id)

    def resume_run(self, run_id: str) -> None:
        if self.executing(run_id):
            self.send(run_id, Resume())
        else:
            self.resume_here(run_id)

    def action_stop(self) -> None:
        run = self._current_run()
        if run is not None:
            self.stop_run(run.id, "stopped by a person")

    def stop_run(self, run_id: str, reason: str) -> None:
        if self.executing(run_id):
            self.send(run_id, Stop(reason=reason))
            return
        run = self.store.get_run(run_id)
        if run.status in FINISHED:
            self.notify(f"run {run_id[:8]} is not executing (it {run.status})", severity="warning")
            return
        # Escalated (or crashed) with nothing executing it: record the end in the store directly.
        self.send(run_id, Stop(reason=reason), quiet=True)
        self.store.update_run(run_id, status="stopped", termination_reason="stopped", message=reason, updated_at=time.time())
        self.store.append_event(run_id, "run_finished", {"status": "stopped", "reason": "stopped", "message": reason})
        self.notify(f"run {run_id[:8]} stopped", timeout=3)
        self.refresh_tree()
        self.poll_soon()

    # -- state, invariants, facts, subgoals ----------------------------------------

    def latest_state(self, run: RunRecord) -> dict[str, Any]:
        """The state the run's next iteration starts from: the last committed, or a person's later patch."""
        patched: tuple[int, dict[str, Any]] | None = None
        if self.view is not None and self.view.run_id == run.id and not self.view.loading:
            patched = self.view.patched
        else:
            for event in self.store.events(run.id):
                if event.kind in PATCH_EVENTS and event.data.get("patched_state") is not None:
                    patched = (event.iteration or 0, event.data["patched_state"])
        if patched is not None and patched[0] >= run.iterations:
            return patched[1]
        if run.iterations:
            state = self.store.state_at(run.id, run.iterations)
            if state is not None:
                return state
        loop = self.loop_for(run)
        return loop.new_state().model_dump(mode="json") if loop else {}

    def action_edit_state(self) -> None:
        self.open_edit_state(None)

    def open_edit_state(self, run_id: str | None) -> None:
        run = self._target(run_id)
        if run is None:
            return
        if run.status == "converged":
            self.notify("this run converged and will not continue: branch (b) from an iteration to change its state",
                        severity="warning")
            return
        loop = self.loop_for(run)
        validate = partial(_validate_state, loop) if loop is not None else None
        note = "" if loop is not None else (
            f"The loop ({run.loop_ref}) does not load here: the run's engine validates the edit and refuses a bad one.")
        self.push_screen(EditStateScreen(run.id, self.latest_state(run), validate, note),
                         callback=partial(self._sent, run.id))

    def _sent(self, run_id: str, command: Command | None) -> None:
        if command is not None:
            self.send(run_id, command)

    def action_relax(self) -> None:
        self.open_relax(None)

    def open_relax(self, run_id: str | None) -> None:
        run = self._target(run_id)
        if run is None:
            return
        loop = self.loop_for(run)
        if self.view is not None and self.view.run_id == run.id and not self.view.loading:
            relaxed = dict(self.view.relaxed)
        else:
            relaxed = _relaxed(self.store.events(run.id))
        status: dict[str, bool] = {}
        if run.iterations:
            last = self.store.get_iteration(run.id, run.iterations)
            status = dict(last.invariant_status) if last else {}
        if loop is not None:
            choices = [InvariantChoice(i.name, i.description, relaxed.get(i.name), status.get(i.name)) for i in loop.invariants]
        else:
            choices = [InvariantChoice(name, "", relaxed.get(name), ok) for name, ok in status.items()]
        if not choices:
            self.notify("this loop declares no invariants", severity="warning")
            return
        initial = next((c.name for c in choices if c.holds is False and c.relaxed is None), None)
        self.push_screen(RelaxScreen(run.id, choices, initial), callback=partial(self._sent, run.id))

    def ask_add_fact(self, run_id: str) -> None:
        self.push_screen(TextPrompt(f"Add a fact to the working memory of run {run_id}", "the fact", button="Add fact"),
                         callback=lambda fact: fact and self.send(run_id, AddFact(fact=fact)))

    def ask_subgoal(self, run_id: str) -> None:
        self.push_screen(TextPrompt(f"Override the subgoal of run {run_id}", "the next subgoal", button="Set subgoal"),
                         callback=lambda goal: goal and self.send(run_id, SetSubgoal(subgoal=goal)))

    # -- approvals ----------------------------------------------------------------

    def action_approve(self) -> None:
        if self.view is not None:
            self.open_approval(self.view.run_id, deny=False)

    def action_deny(self) -> None:
        if self.view is not None:
            self.open_approval(self.view.run_id, deny=True)

    def pending_approvals(self, run_id: str) -> list[dict[str, Any]]:
        if self.view is not None and self.view.run_id == run_id and not self.view.loading:
            return list(self.view.approvals.values())
        return _pending(self.store.events(run_id))

    def open_approval(self, run_id: str, *, deny: bool) -> None:
        pending = self.pending_approvals(run_id)
        if not pending:
            self.notify(f"no tool call of run {run_id[:8]} waits for approval", severity="warning")
            return
        run = self.store.get_run(run_id)
        loop = self.loop_for(run)
        self.push_screen(ApprovalScreen(run_id, pending[0], deny=deny, validate=partial(_validate_args, loop) if loop else None,
                                        tools=[t.name for t in loop.tools] if loop else None),
                         callback=partial(self._sent, run_id))

    # -- branching ----------------------------------------------------------------

    def action_branch(self) -> None:
        view = self.view
        if view is None:
            self.notify("no run on screen", severity="warning")
            return
        n = self.timeline.selected_n
        if n is None:
            self.notify("select an iteration to branch from", severity="warning")
            return
        holder = self.timeline.holder_of(n) or view.run_id
        try:
            parent = self.store.get_run(holder)
        except KeyError:
            parent = view.run
        loop = self._loop_or_say(parent, "branch")
        if loop is None:
            return
        from loopterm.core.fork import plan_fork

        def planner(lines: list[str], reason: str) -> Any:
            return plan_fork(self.store, loop, self.store.get_run(parent.id), n, sets=lines, reason=reason)

        self.push_screen(BranchScreen(parent.id, n, planner), callback=partial(self._branch_planned, loop))

    def _branch_planned(self, loop: Loop, plan: Any) -> None:
        if plan is not None:
            self.run_worker(self._branch(loop, plan), name="branch", group="launch", exit_on_error=False)

    async def _branch(self, loop: Loop, plan: Any) -> None:
        from loopterm.core.fork import AncestorCalls, create_fork, rebuild_workspace

        from loopterm.store.ledger import check_daily_budget

        parent_usd = (plan.parent.budget or {}).get("usd", loop.budget.usd)
        try:  # refused here, nothing is created (as `loopterm fork` does)
            check_daily_budget(self.store, parent_usd, what="the branch's budget", lower=None)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            return
        run_id = new_run_id()
        branch = create_fork(self.store, loop, plan, run_id=run_id, workspace=self.workspace_root / run_id)
        self._starting.add(run_id)
        try:
            await rebuild_workspace(loop, self.store, branch)
        except Exception as exc:
            self._starting.discard(run_id)
            self.notify(f"branch {run_id} was created but its workspace could not be rebuilt: {exc}", severity="error",
                        markup=False)
            return
        self.refresh_tree()
        self.show_run(run_id)
        self.notify(f"branch {run_id[:8]} of run {plan.parent.id[:8]} at iteration {plan.at}", timeout=4)
        try:
            if not await self._model_ready(loop, branch.model):
                return
            if not self._within_daily_budget(self.store.get_run(run_id), loop, "the branch's budget"):
                return
            engine = Engine(loop, self.store, self.store.get_run(run_id), prior=AncestorCalls(self.store, branch),
                            **self._engine_kwargs())
            self.own(engine)
        finally:
            self._starting.discard(run_id)
        self.refresh_tree()

    # -- escalations --------------------------------------------------------------

    def waiting_for(self, run_id: str) -> Waiting:
        run = self.store.get_run(run_id)
        events = self.store.events(run_id)
        packet = None
        for event in events:
            if event.kind == "escalated":
                packet = event.data
        approvals = _pending(events) if run.status not in FINISHED else []
        executing = run_id in self.engines or executing_elsewhere(run, events)
        side_effect = _pending_side_effect(events) if run.status == "escalated" else None
        return Waiting(run=run, packet=packet, approvals=approvals, executing=executing, side_effect=side_effect)

    def waiting_runs(self) -> list[Waiting]:
        """Every run in the database that waits on a person (an escalation or an approval)."""
        return [self.waiting_for(run.id) for run in self.store.list_runs() if run.status == "escalated"]

    def action_inbox(self) -> None:
        self.push_screen(InboxScreen())

    # -- search, help, palette, quit ----------------------------------------------

    def action_search(self) -> None:
        bar = self.main.query_one("#search-bar")
        bar.add_class("shown")
        self.main.query_one("#search", Input).focus()

    def action_close_search(self) -> None:
        bar = self.main.query_one("#search-bar")
        if not bar.has_class("shown"):
            return
        search = self.main.query_one("#search", Input)
        search.value = ""
        self.timeline.set_filter("")
        bar.remove_class("shown")
        self.timeline.focus()

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        """While typing: count the matches (cheap); enter filters the timeline to them."""
        query = event.value.strip().lower()
        info = self.main.query_one("#search-info", Static)
        if query:
            count = self.timeline.count_matches(query)
            info.update(Text(f"{count} of {self.timeline.total} match (enter)"))
        else:
            info.update("")
            if self.timeline.query_text:
                self.timeline.set_filter("")

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        count = self.timeline.set_filter(event.value)
        info = self.main.query_one("#search-info", Static)
        info.update(Text(f"{count} of {self.timeline.total} match" if event.value.strip() else ""))
        if self.timeline.row_count:
            self.timeline.move_cursor(row=0, animate=False)
        self.timeline.focus()

    def action_help(self) -> None:
        sections: list[tuple[str, list[Binding]]] = [
            ("Main screen", [*SUPERVISION_BINDINGS, SEARCH_CLOSE]),
            ("Escalation screen", [b for b in EscalationScreen.BINDINGS if isinstance(b, Binding)]),
            ("Inbox", [b for b in InboxScreen.BINDINGS if isinstance(b, Binding)]),
            ("Dialogs", [b for b in Dialog.BINDINGS if isinstance(b, Binding)]),
            ("Everywhere", [
                Binding("ctrl+p", "command_palette", "Command palette", tooltip="Every action, and Theme to change the theme"),
                Binding("ctrl+q", "quit", "Quit", tooltip="Same as q"),
                Binding("tab", "focus_next", "Next pane", tooltip="Move focus: runs, timeline, detail tabs"),
            ]),
        ]
        self.push_screen(HelpScreen(sections))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in SUPERVISION_BINDINGS:
            action = binding.action.removeprefix("app.")
            if action == "quit":
                continue  # Textual's own Quit command is already there (and runs the same action)
            yield SystemCommand(binding.description, f"{binding.tooltip} (key: {binding.key})",
                                partial(self._palette_action, action))

    async def _palette_action(self, action: str) -> None:
        """From the palette, an action runs even when its key is hidden (it then says why it cannot act)."""
        result = getattr(self, f"action_{action}")()
        if inspect.isawaitable(result):
            await result

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """a/d show in the footer (and act) only while a tool call waits for approval."""
        if action in ("approve", "deny"):
            return bool(self.view is not None and self.view.approvals)
        return True

    async def action_quit(self) -> None:
        """Stop the engines this window owns at their next boundary (they stay resumable), then exit."""
        if not self.engines or self._quitting:
            self.exit()
            return
        self._quitting = True
        for engine in list(self.engines.values()):
            engine.request_stop("stopped: loopterm quit (`loopterm resume` continues it)")
        self.notify("stopping after the iteration in flight ... (q again quits now)", timeout=30)
        self.run_worker(self._exit_when_stopped(), name="quit", group="quit")

    async def _exit_when_stopped(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.engines and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.exit()


# ---------------------------------------------------------------------- helpers


def _saved_theme(warnings: list[str]) -> str | None:
    from loopterm.tui.config import load_settings

    return load_settings(warnings=warnings).theme


SPEND_POINTS = 512  # the sparkline's data, at most: it draws one bar per column anyway


def spend_series(costs: array[float], points: int = SPEND_POINTS) -> list[float]:
    """The spend per iteration for the sparkline, at most `points` values (each the most spent in its
    stretch of iterations): a bounded list, however long the run."""
    if len(costs) <= points:
        return costs.tolist()
    step = len(costs) / points
    return [max(costs[int(i * step):int((i + 1) * step)]) for i in range(points)]


@contextmanager
def acyclic_burst() -> Iterator[None]:
    """Pause the cyclic garbage collector while a store read builds long-run states that the caller
    drops before the block ends.

    One iteration's state in a 10,000-iteration run is tens of thousands of dicts and lists. Built
    with the collector on, they set off dozens of young collections that promote them to the old
    generation, and every fifth selection then paid a full collection (35-45 ms) in the middle of the
    keystroke. They are JSON trees (no reference cycles): reference counting frees them at the end of
    the block, so nothing is left for the collector, and it runs as usual everywhere else (it is
    enabled again on the way out, also on an error; a block inside another leaves it to the outer).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _stream_iterations(store: Store, run_id: str) -> Iterable[Any]:
    """The lineage's iterations a page at a time (Store.iterations builds the whole list first)."""
    return store.iter_iterations(run_id)


def _pending(events: Iterable[EventRecord]) -> list[dict[str, Any]]:
    pending: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.kind == "approval_pending":
            pending[str(event.data.get("key"))] = {**event.data, "n": event.iteration}
        elif event.kind in ("approved", "denied"):
            pending.pop(str(event.data.get("key")), None)
        elif event.kind == "run_finished":
            pending.clear()
    return list(pending.values())


def _pending_side_effect(events: Iterable[EventRecord]) -> dict[str, Any] | None:
    """The side-effecting call the run stopped on and nobody answered yet (the latest), if any."""
    pending: dict[str, Any] | None = None
    for event in events:
        if event.kind == "side_effect_pending":
            pending = dict(event.data)
        elif event.kind == "side_effect_answered" and pending is not None and event.data.get("key") == pending.get("key"):
            pending = None
    return pending


def _relaxed(events: Iterable[EventRecord]) -> dict[str, str]:
    relaxed: dict[str, str] = {}
    for event in events:
        if event.kind == "invariant_relaxed":
            relaxed[str(event.data.get("invariant"))] = str(event.data.get("reason", ""))
        elif event.kind == "invariant_restored":
            relaxed.pop(str(event.data.get("invariant")), None)
    return relaxed


def _validate_state(loop: Loop, data: dict[str, Any]) -> str | None:
    try:
        loop.state.model_validate(data)
    except ValidationError as exc:
        return "; ".join(f"{json_path(err['loc']) or '(state)'}: {err['msg']}" for err in exc.errors()[:3])
    return None


def _validate_args(loop: Loop, tool_name: str, args: dict[str, Any]) -> str | None:
    tool = loop.tool(tool_name)
    if tool is None:
        return None
    try:
        tool.validate_args(args)
    except ValueError as exc:
        return str(exc)
    return None

