"""Reading the store into the screen: a run's iterations load in a thread, then the screen follows its rows and its log's
fold; the detail pane shows the iteration under the cursor."""

from __future__ import annotations

import gc
from array import array
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import Any, Iterable, Iterator

from loopterm.core import events as notices
from loopterm.core.fold import RunView, fold, news, outcome
from loopterm.core.records import RunRecord
from loopterm.core.runlog import AgentTurnRecorded, EventRecord
from loopterm.store import Store
from loopterm.tui.view import EngineNotice, View, on_screen
from loopterm.tui.widgets.detail import DetailContext
from loopterm.tui.widgets.render import (
    InvariantInfo,
    RowInfo,
    money,
    summarize,
)
from loopterm.tui.widgets.timeline import Timeline
from rich.text import Text
from textual.widgets import Sparkline, Static
from textual.worker import get_current_worker

FIRST_BATCH = 50  # timeline rows in the first batch while a stored run loads
LOAD_BATCH = 1000  # and in each batch after it
MAX_ROWS_PER_POLL = 400  # iterations read per poll while catching up with a fast run
FOLLOW_DETAIL_SECONDS = 0.2  # while the cursor follows a fast run, its detail pane catches up this often


class Following:
    """Mixed into LooptermApp: showing a run, following the store, the detail of the selected iteration."""

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
            if self.timeline.selected_n is not None and (view.detail_n is None or view.detail_n in log.agent_turns):
                self._show_detail(self.timeline.selected_n)  # (shown while loading: its agent's turn was not folded)
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
        spend, labels = self.main.query(Sparkline).filter("#spend"), self.main.query(Static).filter("#spend-label")
        if not spend or not labels:  # the main screen is being torn down (a tick can still arrive)
            return
        spend.first().data = spend_series(view.costs)
        label = Text("spend/iter ")
        if view.costs:
            label.append(money(view.cost_max) + " max", style="dim")
        labels.first().update(label, layout=False)

    @on_screen

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
        if view.detail_n is not None and (log.relaxed != relaxed or any(
                isinstance(r.event, AgentTurnRecorded) and r.iteration == view.detail_n for r in new)):
            self._show_detail(view.detail_n)  # the Invariants tab says which are relaxed; the Agent tab, its turn
        return True

    def _announce(self, view: View, record: EventRecord) -> None:
        """A notification for an event of the shown run that a person should hear of as it arrives."""
        said = news(record)
        if said is not None:
            self.notify(f"run {view.run_id[:8]} {said.text}", severity="warning" if said.warning else "information",
                        timeout=8 if said.warning else 6, markup=False)

    def _arrived(self, run_id: str, new: list[EventRecord]) -> None:
        """The outcome of what this window sent a run (shown or not): a refusal is said, with why; a refused
        state edit opens the editor again on the state the run now starts from."""
        sent = self._answering.get(run_id)
        edit = self._edits.get(run_id)
        shown = self.view is not None and self.view.run_id == run_id
        for record in new:
            said = outcome(record)
            if said is None:
                continue
            if edit is not None and said.command_id == edit.command_id:
                self._edits.pop(run_id, None)
                answered, edit = edit, None
                if said.refused is not None:
                    self.call_later(self._edit_refused, answered, said)
                    continue  # the editor says it (and why), not a notification too
            if said.refused is not None and (shown or (sent is not None and (record.id or 0) > sent)):
                self.notify(f"run {run_id[:8]} refused {said.command.replace('_', ' ')}: {said.refused}",
                            severity="error", timeout=10, markup=False)

    @on_screen
    def on_engine_notice(self, message: EngineNotice) -> None:
        event = message.event
        view = self.view
        if isinstance(event, notices.AgentTurnProgress):  # the header says what the agent does now; no poll
            self._live_turns[event.run_id] = (event.n, event.turn)
            if view is not None and view.run_id == event.run_id:
                self.update_header()
            return
        if isinstance(event, notices.IterationCommitted):
            self._live_turns.pop(event.record.run_id, None)
        elif isinstance(event, notices.RunFinished):
            self._live_turns.pop(event.run_id, None)
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
        # A branch's first iteration starts from the state patched at the fork, not from its parent's.
        fork = view.log.fork_point
        at_fork = fork if fork is not None and n == fork.at + 1 else None
        if at_fork is not None and at_fork.state is not None:
            previous = at_fork.state
        return DetailContext.of(record, previous, invariants=self._invariant_infos(view.run),
                                relaxed=dict(view.log.relaxed), palette=self.palette, fork=at_fork,
                                agent_turn=view.log.agent_turns.get(n))

    def _invariant_infos(self, run: RunRecord) -> list[InvariantInfo]:
        loop = self.loop_for(run)
        if loop is None:
            return []
        return [InvariantInfo(i.name, i.description, i.remediation.value) for i in loop.invariants]


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

