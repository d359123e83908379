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

from loopterm.core import events as notices
from loopterm.core import runlog
from loopterm.core.control import (
    AddFact,
    Command,
    EditState,
    Pause,
    Resume,
    SetSubgoal,
    Step,
    Stop,
    command_payload,
)
from loopterm.core.decision import json_path
from loopterm.core import runs as service
from loopterm.core.creation import new_run_id
from loopterm.core.termination import TerminationReason
from loopterm.core.engine import Engine
from loopterm.core.liveness import alive, executing_elsewhere
from loopterm.core.errors import LooptermError
from loopterm.core.loop import Loop
from loopterm.core.fold import PendingApproval, RunView, fold
from loopterm.core.records import RunRecord
from loopterm.core.runlog import EventRecord
from loopterm.core.settings import settings
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
RUNNING = {"running", "stepping"}

SUPERVISION_BINDINGS: list[Binding] = [
    Binding("space", "app.toggle_pause", "Pause/resume", id="pause",
            tooltip="Pause the run at its next iteration boundary, or let a paused run continue (a run waiting on "
                    "its escalation opens it instead: r there answers it)"),
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
            tooltip="Let the run continue, past its pending escalation if it has one (that is the answer); a run "
                    "nothing executes (stopped, escalated, crashed) starts in this window"),
    Binding("s", "app.stop", "Stop", id="stop",
            tooltip="Stop the run at its next iteration boundary (it stays resumable)"),
    Binding("question_mark", "app.help", "Help", id="help", tooltip="Every key binding"),
    Binding("q", "app.quit", "Quit", id="quit",
            tooltip="Quit; runs started here stop at their next boundary and stay resumable (what waits on a person "
                    "stays in the inbox)"),
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
    log: RunView = field(default_factory=RunView)  # the fold of its log (core/fold.py), as far as it was read
    costs: array[float] = field(default_factory=lambda: array("d"))  # spend per iteration (8 bytes each)
    cost_max: float = 0.0
    detail_n: int | None = None


@dataclass
class EditInFlight:
    """A state edit this window sent and whose outcome it has not seen yet (the engine may refuse it as stale)."""

    run_id: str
    command: EditState
    command_id: int  # its row in the control channel: the engine's outcome names it


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
        self.frozen = settings().frozen if frozen is None else frozen
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
        self._escalated_count = 0  # runs across the database that wait on a person (the inbox)
        self._folds: dict[str, RunView] = {}  # run id -> the fold of its log, kept up to date as it is read
        self._answering: dict[str, int] = {}  # runs this window sent commands to -> their log's last id then
        self._edits: dict[str, EditInFlight] = {}  # run id -> the state edit sent to it, until its outcome
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
                           inbox=self._escalated_count, shadow=view is not None and view.log.shadow)
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
        log = view.log
        if log.approvals:
            asked = next(iter(log.approvals.values())).asked
            text = Text("◐ shadow proposal: " if asked.shadow else "⚑ waiting for approval: ",
                        style=f"bold {palette.warn}")
            first = next(iter(asked.args.values()), "") if asked.args else ""
            text.append(literal(f"{asked.tool}({first_line(first, 40)})"))
            text.append("   nothing will run: a agree or edit · d deny" if asked.shadow
                        else "   a approve (arguments editable) · d deny", style="italic")
            return text
        status = view.run.status
        if log.side_effect is not None:
            text = Text("⚑ a side effect may repeat: ", style=f"bold {palette.warn}")
            text.append(literal(log.side_effect.asked.tool or "?"))
            text.append("   r decides (reuse the recorded result or execute again) and resumes", style="italic")
            return text
        if log.escalation is not None:
            text = Text("⚑ ", style=f"bold {palette.warn}")
            if status != "escalated":  # stopped (quit, `s`) while it waited: it still waits on a person
                text.append(f"{status} · waits on you: ", style=f"bold {palette.warn}")
            text.append(literal(first_line(log.escalation.packet.summary, 100), f"bold {palette.warn}"))
            text.append("   x inbox · i relax · e edit state · r resume", style="italic")
            return text
        if status == "paused":
            return Text("⏸ paused   space resumes · n steps one iteration · e edits the state", style=f"{palette.warn}")
        if status in FINISHED or status == "escalated":
            if view.run_id not in self.engines and not log.lifecycle_open and status != "converged":
                return Text("not executing   r resumes it in this window · b branches from the selected iteration",
                            style="dim")
        return None

    # ------------------------------------------------------------------ runs and the tree

    @on_screen
    def refresh_tree(self, force_labels: bool = False) -> None:
        rows = self.store.tree()
        waiting = {run.id for _, run in rows if self._waits(run.id)}
        self._escalated_count = len(waiting)
        self._tree_iterations = self.view.run.iterations if self.view is not None else None
        tree = self.run_tree
        if force_labels:
            tree._labels.clear()
        tree.update_runs(rows, self.palette, set(self.engines), self.view.run_id if self.view else None, waiting)

    def _waits(self, run_id: str) -> bool:
        """Whether the run waits on a person, for the tree and the inbox count: the shown run's log is read in a
        thread while it loads (it is counted once loaded; `_loaded` redraws the tree)."""
        view = self.view
        if view is not None and view.run_id == run_id and view.loading and run_id not in self._folds:
            return False
        return self.run_view(run_id).waiting

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
            log = fold(self.store.events(view.run_id))  # the whole log, folded here (off the App's loop)
        except Exception as exc:  # a damaged database: say so, keep the screen
            self.call_from_thread(self.notify, f"could not read run {view.run_id}: {exc}", severity="error")
            log = RunView()
        if not worker.is_cancelled:
            self.call_from_thread(self._loaded, view, batch, log)

    @on_screen
    def _loaded(self, view: View, batch: list[tuple[RowInfo, float]], log: RunView | None) -> None:
        if self.view is not view:
            return
        self._append(view, batch)
        if log is not None:
            # The loader's fold, even when another path folded the log meanwhile (a command sent, the inbox
            # count): the poll below folds in what came after the loader read it, and says what a person should
            # hear of (a question asked while the run was loading is not folded away unsaid).
            view.log = self._folds[view.run_id] = log
            view.loading = False
            self.refresh_tree()  # the inbox count and the tree's flags now know this run's log
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
        if self._answering:
            self._follow_answers()
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
        absorbed = not view.loading and self._follow(view)
        old, view.run = view.run, run
        if old.status != run.status or absorbed:
            self.refresh_tree()
            self.update_header()  # at once; counts that change every iteration wait for the next _tick

    def poll_soon(self) -> None:
        if not self._poll_queued:
            self._poll_queued = True
            self.call_later(self.poll)

    # -- the fold of each run's log ------------------------------------------------

    def run_view(self, run_id: str) -> RunView:
        """What a run's log says now (core/fold.py): kept per run and brought up to date by one indexed read
        of what is new. Everything the screens show of a run's log comes from here."""
        view = self.view
        if view is not None and view.run_id == run_id and not view.loading:
            self._follow(view)
            return view.log
        log = self._folds.get(run_id)
        if log is None:
            log = self._folds[run_id] = fold(self.store.events(run_id))
            return log  # the log as it was before this window read it: nothing in it is news
        self._arrived(run_id, log.absorb(self.store.events(run_id, after_id=log.last_id)))
        return log

    def _follow(self, view: View) -> bool:
        """Fold what is new in the shown run's log; say what a person should hear of it. Whether anything was."""
        log = view.log
        approvals, relaxed = set(log.approvals), dict(log.relaxed)
        new = log.absorb(self.store.events(view.run_id, after_id=log.last_id))
        if not new:
            return False
        for record in new:
            self._announce(view, record)
        self._arrived(view.run_id, new)
        if set(log.approvals) != approvals:
            self.refresh_bindings()
        if log.relaxed != relaxed and view.detail_n is not None:
            self._show_detail(view.detail_n)  # the Invariants tab says which are relaxed
        return True

    def _announce(self, view: View, record: EventRecord) -> None:
        """A notification for an event of the shown run that a person should hear of as it arrives."""
        event, run = record.event, view.run_id[:8]
        if isinstance(event, runlog.Escalated):
            self.notify(f"run {run} waits on a person: {first_line(event.summary, 120)} (x)",
                        severity="warning", timeout=8, markup=False)
        elif isinstance(event, runlog.ApprovalPending):
            asked = (f"proposes tool {event.tool} (shadow: nothing will run; a agree or edit, d deny)" if event.shadow
                     else f"tool {event.tool} needs approval (a / d)")
            self.notify(f"run {run}: {asked}", severity="warning", timeout=8, markup=False)
        elif isinstance(event, runlog.StrategyChanged):
            self.notify(f"run {run} changed strategy to {event.to}: {first_line(event.why, 120)}",
                        timeout=6, markup=False)

    def _arrived(self, run_id: str, new: list[EventRecord]) -> None:
        """The outcome of what this window sent a run (shown or not): a refusal is said, with why; a refused
        state edit opens the editor again on the state the run now starts from."""
        sent = self._answering.get(run_id)
        edit = self._edits.get(run_id)
        shown = self.view is not None and self.view.run_id == run_id
        for record in new:
            event = record.event
            if edit is not None and getattr(event, "command_id", None) == edit.command_id:
                if isinstance(event, runlog.StateEdited):
                    self._edits.pop(run_id, None)
                    edit = None
                elif isinstance(event, runlog.CommandRejected):
                    self._edits.pop(run_id, None)
                    self.call_later(self._edit_refused, edit, event)
                    edit = None
                    continue  # the editor says it (and why), not a notification too
            if isinstance(event, runlog.CommandRejected) and (shown or (sent is not None and (record.id or 0) > sent)):
                self.notify(f"run {run_id[:8]} refused {event.command.replace('_', ' ')}: {event.error}",
                            severity="error", timeout=10, markup=False)

    @on_screen
    def on_engine_notice(self, message: EngineNotice) -> None:
        event = message.event
        view = self.view
        if isinstance(event, notices.IterationCommitted) and view is not None and event.record.run_id == view.run_id \
                and not view.loading:
            self._append(view, [(summarize(event.record), event.record.cost_usd)])
        run_id = getattr(event, "run_id", None) or getattr(getattr(event, "record", None), "run_id", None)
        if run_id and (view is None or run_id != view.run_id):  # the shown run's are said as its log is read
            if isinstance(event, notices.Escalated):
                self.notify(f"run {run_id[:8]} waits on a person (x)", severity="warning", timeout=8)
            elif isinstance(event, notices.ApprovalNeeded):
                self.notify(f"run {run_id[:8]}: a tool call needs approval (x)", severity="warning", timeout=8)
        if isinstance(event, (notices.RunStarted, notices.RunFinished, notices.StatusChanged, notices.Escalated)):
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
                                relaxed=dict(view.log.relaxed), palette=self.palette)

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

    async def _model_ready(self, loop: Loop, model: str) -> bool:
        """Check the model before a run starts (registers the offline script); litellm loads in a thread."""
        try:
            await asyncio.to_thread(service.preflight_model, loop, model,
                                    loop.script if model.startswith("scripted/") else None)
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
        engine = service.create(loop, self.store, ref=ref, model=model, max_iterations=self.max_iterations,
                                budget=self.budget or {}, workspace_root=self.workspace_root, shadow=self.shadow,
                                wait_on_person=True)
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
        return executing_elsewhere(run, self.run_view(run_id))

    def resume_here(self, run_id: str, first: Command | None = None) -> None:
        """Start an engine in this window for a run that nothing executes (optionally with a first command,
        which the engine takes before anything else: the answer to what it waits on, a step, a stop).

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
        stopping = isinstance(first, Stop)  # it only records the answer and ends: nothing runs, nothing is spent
        pending = self.run_view(run_id).side_effect
        if pending is not None and not stopping:
            key = pending.asked.key

            def answered(answer: str | None) -> None:
                if answer is not None:
                    self.store.append_event(run_id, runlog.SideEffectAnswered(key=key, answer=answer))
                    self._start_engine(run, loop, first, {key: answer})

            self.push_screen(SideEffectScreen(run_id, pending.asked), callback=answered)
            return
        self._start_engine(run, loop, first, None, checks=not stopping)

    def _start_engine(self, run: RunRecord, loop: Loop, first: Command | None, answers: dict[str, str] | None,
                      *, checks: bool = True) -> None:
        if run.id in self._starting or run.id in self.engines:
            return
        self._starting.add(run.id)
        if first is not None:
            self.send(run.id, first, quiet=True)
        self.run_worker(self._resume(run, loop, answers, checks=checks), name=f"resume {run.id}", group="launch",
                        exit_on_error=False)

    def _continuing(self, run_id: str, loop: Loop, what: str, answers: dict[str, str] | None = None) -> Engine | None:
        """The engine that continues a run from this screen, through the run service's gates (the daily budget
        of `loopterm resume` and `fork`); None, said, when one refuses."""
        try:
            engine, note = service.continuing(self.store, loop, self.store.get_run(run_id), what=what, checked=True,
                                              side_effect_answers=answers or {}, wait_on_person=True)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            return None
        if note:
            self.notify(note, timeout=6, markup=False)
        return engine

    async def _resume(self, run: RunRecord, loop: Loop, answers: dict[str, str] | None = None, *,
                      checks: bool = True) -> None:
        """`checks`: the model and the daily budget are checked first (not for an engine started only to take
        a stop: it calls no model)."""
        try:
            if checks and not await self._model_ready(loop, run.model):
                return
            if checks:
                engine = self._continuing(run.id, loop, "what this run may still spend", answers)
            else:
                engine = service.engine_for(self.store, loop, self.store.get_run(run.id),
                                            side_effect_answers=answers or {}, wait_on_person=True)
            if engine is None:
                return
            self.own(engine)
            if checks:
                self.notify(f"run {run.id[:8]} continues in this window", timeout=3)
        finally:
            self._starting.discard(run.id)
        self.refresh_tree()
        self.poll_soon()

    # ------------------------------------------------------------------ sending commands

    def send(self, run_id: str, command: Command, *, quiet: bool = False) -> None:
        """Every control goes through the store's control channel, for runs here and in other processes alike.
        What the run does with it is read back from its log: a refusal is said, with the engine's reason."""
        log = self.run_view(run_id)  # read up to now: what comes after is this command's outcome (or later)
        self._answering.setdefault(run_id, log.last_id)
        kind, payload = command_payload(command)
        row = self.store.add_command(run_id, kind, payload)
        if isinstance(command, EditState):
            self._edits[run_id] = EditInFlight(run_id, command, row.id or 0)
        engine = self.engines.get(run_id)
        if engine is not None:
            engine.wake()  # it reads the channel now, not at its next poll
        if not quiet:
            self.notify(f"{kind.replace('_', ' ')} sent to run {run_id[:8]}", timeout=3)
        self.poll_soon()

    def _follow_answers(self) -> None:
        """Read the log of each run this window sent a command to until the run took them all (its refusals
        are said as they arrive, also for runs not on screen)."""
        for run_id in list(self._answering):
            if not self.store.pending_commands(run_id):  # taken: what it did is in the log now
                self.run_view(run_id)
                self._answering.pop(run_id, None)

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

    def _escalation_first(self, run: RunRecord, doing: str) -> bool:
        """A run waiting on a person's answer to its escalation is not resumed or stepped past it by a key that
        does not name it: its escalation opens instead (r there resumes past it, k aborts). Whether it did."""
        pending = self.run_view(run.id).escalation
        if pending is None:
            return False
        self.notify(f"run {run.id[:8]} waits on your answer to its escalation at iteration {pending.iteration}: "
                    f"{doing} would not go past it. r resumes past it, k aborts, f/g/i/e change what it continues with",
                    severity="warning", timeout=8, markup=False)
        self.push_screen(EscalationScreen(run.id))
        return True

    def action_toggle_pause(self) -> None:
        run = self._current_run()
        if run is None:
            return
        if self.executing(run.id):
            if run.status in ("paused", "escalated"):
                if self._escalation_first(run, "space"):
                    return
                if self.run_view(run.id).approvals:
                    self.notify("a tool call waits for approval: a approves, d denies", severity="warning")
                    return
                self.send(run.id, Resume())
            else:
                self.send(run.id, Pause())
        elif not self._escalation_first(run, "space"):
            self.resume_here(run.id)

    def action_step(self) -> None:
        run = self._current_run()
        if run is None or self._escalation_first(run, "a step"):
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
        """Let the run go on; when it waits on an escalation, this is the answer that goes past it (it names the
        escalation it answers: one answered or superseded meanwhile is refused, not applied to another)."""
        log = self.run_view(run_id)
        pending = log.escalation
        command = Resume(escalation=pending.event_id) if pending is not None else Resume()
        if self.executing(run_id):
            if pending is None and log.approvals:  # its engine waits for that answer, not for a resume
                self.notify("a tool call waits for approval: a approves, d denies", severity="warning")
                return
            self.send(run_id, command)
        else:
            self.resume_here(run_id, first=command if pending is not None else None)

    def action_stop(self) -> None:
        run = self._current_run()
        if run is not None:
            self.stop_run(run.id, "stopped by a person")

    def abort_run(self, run_id: str, reason: str = "aborted by a person answering its escalation") -> None:
        """The answer to an escalation that ends the run (recorded as that answer); without one pending, a stop."""
        pending = self.run_view(run_id).escalation
        self.stop_run(run_id, reason, escalation=pending.event_id if pending is not None else None)

    def stop_run(self, run_id: str, reason: str, *, escalation: int | None = None) -> None:
        """Stop at the next boundary. What waits on a person stays pending (the run stays resumable), unless
        `escalation` names the escalation this stop answers."""
        command = Stop(reason=reason, escalation=escalation)
        if self.executing(run_id):
            self.send(run_id, command)
            return
        run = self.store.get_run(run_id)
        if escalation is not None:
            # An answer is taken by an engine (consumed and recorded in one commit): one starts here to take it.
            if self.loop_for(run) is None:
                self.send(run_id, command, quiet=True)
                self.notify(f"run {run_id[:8]}: its loop does not load here, so the answer waits in its control "
                            "channel; it applies when the run is next resumed", severity="warning", timeout=10)
                return
            self.resume_here(run_id, first=command)
            return
        if run.status in FINISHED:
            self.notify(f"run {run_id[:8]} is not executing (it {run.status})", severity="warning")
            return
        # Nothing executes it (it ended waiting on a person, or crashed): record its end here. What waits on a
        # person stays pending (core/fold.py): it stays in the inbox, and a resume asks again.
        service.record_end(self.store, run_id, TerminationReason.STOPPED, reason)
        self.notify(f"run {run_id[:8]} stopped", timeout=3)
        self.refresh_tree()
        self.poll_soon()

    # -- state, invariants, facts, subgoals ----------------------------------------

    def latest_state(self, run: RunRecord) -> tuple[dict[str, Any], int, int]:
        """The state the run's next iteration starts from, with what an edit of it is based on: (state, the
        iteration it follows, the version of a person's patch of it: `RunView.state_version`)."""
        log = self.run_view(run.id)
        n = run.iterations
        patched = log.state_after(n)
        if patched is not None:
            return patched, n, log.state_version(n)
        state = self.store.state_at(run.id, n) if n else None
        if state is None:
            loop = self.loop_for(run)
            state = loop.new_state().model_dump(mode="json") if loop else {}
        return state, n, log.state_version(n)

    def action_edit_state(self) -> None:
        self.open_edit_state(None)

    def open_edit_state(self, run_id: str | None, *, refused: str = "", reason: str = "",
                        edited: dict[str, Any] | None = None) -> None:
        """The state editor, on the state the run's next iteration starts from. A running run is asked to pause
        first (at its next boundary). `refused`: why the engine refused this person's last edit (their reason is
        kept; `edited`, their state, when it was refused for what it says rather than for being stale)."""
        run = self._target(run_id)
        if run is None:
            return
        if run.status == "converged":
            self.notify("this run converged and will not continue: branch (b) from an iteration to change its state",
                        severity="warning")
            return
        loop = self.loop_for(run)
        validate = partial(_validate_state, loop) if loop is not None else None
        notes = []
        if loop is None:
            notes.append(f"The loop ({run.loop_ref}) does not load here: the run's engine validates the edit and "
                         "refuses a bad one.")
        if self.executing(run.id) and run.status in RUNNING:
            self.send(run.id, Pause(), quiet=True)
            notes.append("The run was running: it pauses at its next iteration boundary (space resumes it). If an "
                         "iteration commits first, this edit is refused and the newer state is shown to edit again.")
        state, base, version = self.latest_state(run)
        self.push_screen(EditStateScreen(run.id, edited if edited is not None else state, validate, "\n".join(notes),
                                         base_iteration=base, base_version=version, reason=reason, refused=refused),
                         callback=partial(self._sent, run.id))

    def _edit_refused(self, edit: EditInFlight, refusal: runlog.CommandRejected) -> None:
        """The engine refused a state edit sent from here: the editor opens again, saying why, with the person's
        reason; on the state the run now starts from when it had moved on (never their edit of an older one)."""
        self.open_edit_state(edit.run_id, refused=f"Not applied: {refusal.error}", reason=edit.command.reason,
                             edited=None if refusal.stale else edit.command.state)

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
        relaxed = dict(self.run_view(run.id).relaxed)
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

    def _answer_base(self, run_id: str) -> int | None:
        """What a fact or a subgoal given while the run waits on a person answers: the iteration it waits after
        (the engine refuses it once the run has moved past). None while it runs on: it applies at the next boundary."""
        try:
            run = self.store.get_run(run_id)
        except KeyError:
            return None
        return run.iterations if self.run_view(run_id).waiting else None

    def ask_add_fact(self, run_id: str) -> None:
        base = self._answer_base(run_id)
        self.push_screen(TextPrompt(f"Add a fact to the working memory of run {run_id}", "the fact", button="Add fact"),
                         callback=lambda fact: fact and self.send(run_id, AddFact(fact=fact, base_iteration=base)))

    def ask_subgoal(self, run_id: str) -> None:
        base = self._answer_base(run_id)
        self.push_screen(TextPrompt(f"Override the subgoal of run {run_id}", "the next subgoal", button="Set subgoal"),
                         callback=lambda goal: goal and self.send(run_id, SetSubgoal(subgoal=goal, base_iteration=base)))

    # -- approvals ----------------------------------------------------------------

    def action_approve(self) -> None:
        if self.view is not None:
            self.open_approval(self.view.run_id, deny=False)

    def action_deny(self) -> None:
        if self.view is not None:
            self.open_approval(self.view.run_id, deny=True)

    def pending_approvals(self, run_id: str) -> list[PendingApproval]:
        return list(self.run_view(run_id).approvals.values())

    def open_approval(self, run_id: str, *, deny: bool) -> None:
        pending = self.pending_approvals(run_id)
        if not pending:
            self.notify(f"no tool call of run {run_id[:8]} waits for approval", severity="warning")
            return
        run = self.store.get_run(run_id)
        loop = self.loop_for(run)
        self.push_screen(ApprovalScreen(run_id, pending[0], deny=deny, validate=partial(_validate_args, loop) if loop else None,
                                        tools=[t.name for t in loop.tools] if loop else None),
                         callback=partial(self._answered, run_id))

    def _answered(self, run_id: str, command: Command | None) -> None:
        """An answer to what the run waits on: sent to the engine executing it; when nothing does, an engine
        starts here and takes it first (an answer queued for a run no one resumes would answer nothing)."""
        if command is None:
            return
        if self.executing(run_id):
            self.send(run_id, command)
        elif self.loop_for(self.store.get_run(run_id)) is not None:
            self.resume_here(run_id, first=command)
        else:
            self.send(run_id, command)
            self.notify(f"run {run_id[:8]}: its loop does not load here, so the answer waits in its control channel; "
                        "it applies when the run is next resumed", severity="warning", timeout=10)

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
        from loopterm.core.fork import create_fork, rebuild_workspace

        parent_usd = (plan.parent.budget or {}).get("usd", loop.budget.usd)
        try:  # refused here, nothing is created (as `loopterm fork` does)
            service.new_run_budget(self.store, loop, usd=parent_usd, what="the branch's budget", lower=None)
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
            engine = self._continuing(run_id, loop, "the branch's budget")
            if engine is not None:
                self.own(engine)
        finally:
            self._starting.discard(run_id)
        self.refresh_tree()

    # -- escalations --------------------------------------------------------------

    def waiting_for(self, run_id: str) -> Waiting:
        """What the run waits on a person for (its log's fold), and whether an engine holds it meanwhile."""
        run = self.store.get_run(run_id)
        log = self.run_view(run_id)
        return Waiting.of(run, log, executing=run_id in self.engines or run_id in self._starting
                          or executing_elsewhere(run, log))

    def waiting_runs(self) -> list[Waiting]:
        """Every run in the database that waits on a person (an escalation, an approval, a side effect), whatever
        its status: one stopped or quit while it waited still waits."""
        return [self.waiting_for(run.id) for run in self.store.list_runs() if self.run_view(run.id).waiting]

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
            return bool(self.view is not None and self.view.log.approvals)
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

