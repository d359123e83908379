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
import inspect
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

from loopterm.core.acp_turn import AgentTurn
from loopterm.core.agent_loop import PERMISSION_TOOL
from loopterm.core.engine import Engine
from loopterm.core.errors import LooptermError
from loopterm.core.fold import RunView
from loopterm.core.loop import Loop
from loopterm.core.settings import settings
from loopterm.store.target import StoreTarget
from loopterm.tui.bindings import SEARCH_CLOSE, SUPERVISION_BINDINGS
from loopterm.tui import heap
from loopterm.tui.branching import Branching
from loopterm.tui.comparing import Comparing
from loopterm.tui.controls import Controls
from loopterm.tui.driving import Driving
from loopterm.tui.following import Following
from loopterm.tui.keys import apply_user_keymap, current_keymap, effective_keys, key_display
from loopterm.tui.screens.dialog import Dialog
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen
from loopterm.tui.screens.help import HelpScreen
from loopterm.tui.view import FINISHED, EditInFlight, View, on_screen
from loopterm.tui.widgets.agent_turn import live_turn_line
from loopterm.tui.widgets.detail import IterationDetail
from loopterm.tui.widgets.render import (
    Palette,
    first_line,
    header_text,
    literal,
)
from loopterm.tui.widgets.keyhints import KeyHints
from loopterm.tui.tree_sizes import TreeSizes
from loopterm.tui.widgets.runtree import RunTree
from loopterm.tui.widgets.timeline import Timeline
from rich.text import Text
from textual import events, on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.filter import LineFilter
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Input, Sparkline, Static

POLL_SECONDS = 0.25  # the screen follows the store at least this often (watch must within 0.5 s)
TREE_EVERY = 4  # ticks between re-reads of the run list (1 s)
TREE_FROM = 110  # columns from which the runs tree shows by default (below, `t` shows it)
SHORT_BELOW = 32  # rows below which a screen is short (class -short)


class MainScreen(Screen[None]):
    """Header; runs tree | timeline + spend + detail tabs; footer. Below TREE_FROM columns the tree is hidden
    (`-narrow`) unless a person shows it with `t`; a person's `t` holds at any width (`-tree-shown`/`-tree-hidden`)."""

    BINDINGS: ClassVar[list[BindingType]] = [*SUPERVISION_BINDINGS, SEARCH_CLOSE]
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [(0, "-narrow"), (TREE_FROM, "-wide")]

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
        yield KeyHints()

    def on_mount(self) -> None:
        self.query_one(Timeline).focus()
        self.app.call_later(self.app.main_ready)  # type: ignore[attr-defined]

    @property
    def tree_shown(self) -> bool:
        return self.query_one(RunTree).display

    def toggle_tree(self) -> None:
        shown = not self.tree_shown
        self.set_class(shown, "-tree-shown")
        self.set_class(not shown, "-tree-hidden")
        tree = self.query_one(RunTree)
        if shown:
            tree.focus()  # shown to pick a run
        elif tree.has_focus:
            self.query_one(Timeline).focus()

    def on_resize(self, event: events.Resize) -> None:
        self.call_after_refresh(self._focus_visible)

    def _focus_visible(self) -> None:
        """The tree hidden by a narrower terminal does not keep the focus (keys would go nowhere visible)."""
        tree = self.query_one(RunTree)
        if tree.has_focus and not tree.display:
            self.query_one(Timeline).focus()


class LooptermApp(Following, Driving, Controls, Branching, Comparing, App[None]):
    """`LooptermApp(db_path, start=(loop, ref))` runs a new run live; `watch_run=ID` attaches; neither browses."""

    CSS_PATH = "app.tcss"
    TITLE = "loopterm"
    # Every screen knows whether it is short (dialogs drop their blank rows there: tui/screens/dialog.py).
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [(0, "-short"), (SHORT_BELOW, "-tall")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", id="app.quit", show=False, priority=True,
                tooltip="Quit; runs started here stop at their next boundary and stay resumable"),
    ]

    def __init__(
        self,
        db_path: Path | StoreTarget,
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
        self.target = StoreTarget.of(db_path)  # a SQLite file or a PostgreSQL URL (store/target.py)
        self.store = self.target.open()
        self.workspace_root = self.target.workspace_root()
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
        self._tree_sizes = TreeSizes()  # tui/tree_sizes.py
        self._poll_queued = False
        self._unsubscribe: Callable[[], None] | None = None  # the store's notifications (PostgreSQL)
        self._spend_dirty = False
        self._tree_iterations: int | None = None  # the shown run's iteration count when the tree was drawn
        self._quitting = False
        self._escalated_count = 0  # runs across the database that wait on a person (the inbox)
        self._folds: dict[str, RunView] = {}  # run id -> the fold of its log, kept up to date as it is read
        self._answering: dict[str, int] = {}  # runs this window sent commands to -> their log's last id then
        # An agent's turn in flight in an engine of this window, as it streams (core/events.py AgentTurnProgress).
        self._live_turns: dict[str, tuple[int, AgentTurn]] = {}
        self._edits: dict[str, EditInFlight] = {}  # run id -> the state edit sent to it, until its outcome
        self._remember_theme = False
        self._last_theme = ""
        self._screen_ready = False
        self._detail_timer: Timer | None = None
        self.theme_warnings: list[str] = []
        self.start_error: str | None = None  # why the run `start` asked for was refused (the CLI exits 2)
        self._heap = heap.HeapKeeper()  # full garbage collections stay out of keystrokes (tui/heap.py)

    # ------------------------------------------------------------------ setup

    def get_default_screen(self) -> Screen[Any]:
        return MainScreen()

    def on_mount(self) -> None:
        self._setup_theme()
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        for warning in apply_user_keymap(self):  # config.toml's [keymap]; a bad entry is one line, never fatal
            self.notify(warning, title="Keymap", severity="warning", timeout=10)

    def on_unmount(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        heap.release()  # what this App froze (tui/heap.py) is the collector's again
        if self.live_traces is not None:  # the spans still queued go out (bounded) before the process ends
            self.live_traces.close()

    def _heard(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, str], None]:
        """On a PostgreSQL store: another process committed something; read the store now rather than at the
        next poll (the poll stays: a notification can be missed while its connection is made again)."""
        def heard(kind: str, run_id: str) -> None:  # on the store's listening thread
            view = self.view
            if view is not None and run_id == view.run_id and self._running and not loop.is_closed():
                loop.call_soon_threadsafe(self.poll_soon)

        return heard

    def main_ready(self) -> None:
        """The main screen is composed: show a run (or start one) and follow the store."""
        self._screen_ready = True
        self.refresh_tree()
        if self.start_spec is not None:
            loop, ref = self.start_spec
            self._header_note = Text(f"starting {loop.name} …", style="italic")
            # After the first frame is painted: what the launch does (litellm, the model check, the workspace)
            # runs in threads, but even the start of it must not hold back the first frame.
            self.call_after_refresh(lambda: self.run_worker(self._launch(loop, ref), name="launch", group="launch",
                                                            exit_on_error=False))
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
        # Not once the App shuts down: Textual removes the screen's widgets before it stops the App's timers.
        self.set_interval(POLL_SECONDS, lambda: self._tick() if self._running else None)
        self._unsubscribe = self.store.subscribe(self._heard(asyncio.get_running_loop()))
        self.call_after_refresh(heap.freeze)  # the start-up heap (Textual, the store, the widgets), once painted
        self.set_interval(heap.CHECK_SECONDS, lambda: self._heap.check(
            self.view if self.view is not None and not self.view.loading else None))
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
            if asked.tool == PERMISSION_TOOL and not asked.shadow:
                text = Text("⚑ the agent asks: ", style=f"bold {palette.warn}")
                paths = ", ".join(str(p) for p in asked.args.get("paths") or [])
                text.append(literal(f"{first_line(asked.args.get('title', ''), 50)} [{first_line(paths, 40)}]"))
                text.append("   x inbox shows the diff · a approve · d deny", style="italic")
                return text
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
        live = self._live_turns.get(view.run_id)
        if live is not None and status == "running":
            return live_turn_line(*live, palette)
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
        tree.sizes = {} if self.frozen else self._tree_sizes.known(self, [run for _, run in rows])
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

    # -- search, help, palette, quit ----------------------------------------------

    def action_toggle_tree(self) -> None:
        self.main.toggle_tree()

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
        from loopterm.themes.picker import show_theme_picker

        for command in super().get_system_commands(screen):
            if command.callback == self.action_change_theme:  # loopterm's themes first (themes/picker.py)
                command = command._replace(help="Change the theme: loopterm's first, then Textual's",
                                           callback=partial(show_theme_picker, self))
            yield command
        keymap = current_keymap(self)
        for binding in SUPERVISION_BINDINGS:
            action = binding.action.removeprefix("app.")
            if action == "quit":
                continue  # Textual's own Quit command is already there (and runs the same action)
            yield SystemCommand(binding.description,
                                f"{binding.tooltip} (key: {key_display(effective_keys(binding, keymap))})",
                                partial(self._palette_action, action))

    def get_line_filters(self) -> Sequence[LineFilter]:
        """Dim text in a readable colour of loopterm's choosing (themes.DIM_FACTOR), not the terminal's."""
        from loopterm.themes import READABLE_DIM

        return [*super().get_line_filters(), READABLE_DIM]

    def get_key_display(self, binding: Binding) -> str:
        """Keys as people write them, in the footer too ("?", "/", "ctrl+s"; not "question_mark", "^s")."""
        return binding.key_display or key_display(binding.key)

    async def _palette_action(self, action: str) -> None:
        """From the palette, an action runs even when its key is hidden (it then says why it cannot act)."""
        result = getattr(self, f"action_{action}")()
        if inspect.isawaitable(result):
            await result

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Every action answers its key. a/d too when nothing waits for approval: they say so (a key that does
        nothing, silently, reads as a broken one)."""
        return True

    def in_footer(self, binding_id: str | None) -> bool:
        """Whether the footer shows a binding now: a/d only while a call waits for approval (at 80 columns
        their room goes to keys that can act; the keys themselves always answer)."""
        if binding_id in ("approve", "deny"):
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


