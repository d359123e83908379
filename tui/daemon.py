"""The trigger daemon: watches files, keeps schedules, runs checks, and starts loops when they fire.

Everything happens on one asyncio loop in one process: each trigger has a source task (a
`watchfiles.awatch` watcher, a schedule, or a command check), and each started run is an
ordinary engine writing to the normal store, so `loopterm runs` lists it (origin "trigger") and
`loopterm watch RUN` attaches to it while it runs. A run that needs a person waits for an answer
from `watch` without holding up the other triggers.

Policies (see the README's Triggers section):
- A trigger has at most one run at a time. File changes arriving while its run goes on are merged
  into one queued firing, started when the run ends; a schedule firing then is skipped; a command
  trigger runs no check meanwhile.
- A command trigger fires when its command starts failing (the first check, or after a pass), not
  on every failing check: a loop that cannot fix it is not started again and again.
- Before each run the daily budget is checked (core/daily_budget.py); an uncapped run
  is capped at what is left today. A refused firing is logged and recorded as a run that never
  ran (status terminated, event `trigger_refused`); later refusals of the same trigger in a row
  are added to that record as events, not as new runs.
- SIGTERM / SIGINT: watching stops, running engines are asked to stop at their next boundary
  (event `daemon_interrupted` first), given `grace` seconds, then cancelled (recorded as stopped
  either way). On restart, the runs this triggers file started that were interrupted that way, or
  that crashed (an unfinished status with a stale heartbeat), are resumed before watching again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loopterm.core import runlog as log
from loopterm.core.engine import Engine
from loopterm.core.liveness import STALE_AFTER_S, executing_elsewhere
from loopterm.core.errors import ConfigError
from loopterm.core.fold import fold
from loopterm.core.events import ApprovalNeeded, EngineEvent, Escalated
from loopterm.core.gates import run_process, scrubbed_env
from loopterm.core.loader import load_loop
from loopterm.core.loop import Loop
from loopterm.core.records import RunRecord
from loopterm.core import runs as service
from loopterm.core.runs import record_end
from loopterm.core.secrets import redact
from loopterm.core.termination import Status, TerminationReason
from loopterm.core.text import one_line
from loopterm.core.triggers import Trigger, TriggersFile, change_event, command_event, schedule_event
from loopterm.store import Store
from loopterm.store.target import StoreTarget

ORIGIN = "trigger"
STOP_REASON = "the daemon stopped; it resumes this run when it starts again"
CHECK_OUTPUT_CAP = 8_000
MAX_QUEUED_EVENTS = 10


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def log_line(message: str, out: Any = None) -> None:
    """One line on standard output: a timestamp and the message, secrets redacted, control characters escaped."""
    stream = out or sys.stdout
    stream.write(f"{stamp()} {one_line(redact(message), 400)}\n")
    stream.flush()


@dataclass
class Slot:
    """One trigger, ready to fire: its loop loaded and its model checked."""

    name: str
    trigger: Trigger | None  # None: a resumed run whose trigger left the file (or already has a run going)
    loop: Loop
    ref: str
    model: str
    task: asyncio.Task[None] | None = None
    engine: Engine | None = None
    queued: list[str] = field(default_factory=list)
    refused_run: str | None = None  # the record of the current streak of budget refusals

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


def command_argv(argv: list[str]) -> list[str]:
    """The check's argv with `{python}` replaced by the running interpreter (as in a CommandGate)."""
    return [a.replace("{python}", sys.executable) for a in argv]


def _command_found(argv0: str, cwd: Path) -> bool:
    if os.sep in argv0 or (os.altsep and os.altsep in argv0):
        return (cwd / argv0).exists()
    return shutil.which(argv0) is not None


def prepare(config: TriggersFile, shown: str, cwd: Path) -> list[Slot]:
    """Load every trigger's loop and check its model, paths and command; refuse in one line before anything runs."""
    slots: list[Slot] = []
    for trigger in config.trigger:
        where = f"{shown}: trigger {trigger.name!r}"
        try:
            loop, ref = load_loop(trigger.loop)
        except ConfigError as exc:
            raise ConfigError(f"{where}: loop: {exc}") from None
        model = trigger.model or loop.model
        try:
            service.preflight_model(loop, model, loop.script if model.startswith("scripted/") else None)
        except ConfigError as exc:
            raise ConfigError(f"{where}: model: {exc}") from None
        for path in trigger.on.change or []:
            if not (cwd / path).exists():
                raise ConfigError(f"{where}: on.change: {path!r} does not exist under {cwd}; create it or fix the path")
        if trigger.on.command is not None and not _command_found(command_argv(trigger.on.command)[0], cwd):
            raise ConfigError(f"{where}: on.command: cannot find {trigger.on.command[0]!r} (not on PATH); fix the command")
        slots.append(Slot(name=trigger.name, trigger=trigger, loop=loop, ref=ref, model=model))
    return slots


class TriggerDaemon:
    """Runs the triggers of one file against one store until asked to stop."""

    def __init__(self, store: Store, db: StoreTarget | Path, triggers_file: Path, slots: list[Slot], *, cwd: Path,
                 grace: float = 30.0, log: Callable[[str], None] = log_line) -> None:
        self.store = store
        self.target = StoreTarget.of(db)
        # The file a SQLite store keeps (ignored by change triggers), or where a server store's runs live here.
        self.db = self.target.path.resolve() if self.target.path is not None else None
        self.triggers_file = str(triggers_file.resolve())
        self.slots = slots
        self.by_name = {slot.name: slot for slot in slots}
        self.cwd = cwd.resolve()
        self.grace = grace
        self.log = log
        self.workspace_root = self.target.workspace_root()
        self.stopping = asyncio.Event()
        self._watch_stop = threading.Event()  # read by watchfiles' watcher thread
        self._detached: list[Slot] = []  # resumed runs whose trigger is no longer in the file
        self._waiting: list[asyncio.Task[None]] = []  # crashed runs waiting for their heartbeat to go stale

    # ------------------------------------------------------------------ life cycle

    def request_stop(self, why: str) -> None:
        if not self.stopping.is_set():
            self.log(f"daemon: {why}; stopping")
        self.stopping.set()
        self._watch_stop.set()

    async def serve(self) -> None:
        """Resume what was interrupted, start every trigger's source, run until asked to stop, stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, f"{name} received")
        if self.store.heads_kept < len(self.slots) + 1:  # the store keeps one run's last state per concurrent run
            self.store.heads_kept = len(self.slots) + 1
        self.log(f"daemon: pid {os.getpid()}, {len(self.slots)} trigger(s) from {self.triggers_file}, "
                 f"store {self.db or self.target.shown}")
        self.resume_interrupted()
        sources = [asyncio.create_task(self._source(slot), name=f"source {slot.name}") for slot in self.slots]
        try:
            await self.stopping.wait()
        finally:
            self._watch_stop.set()
            for task in [*sources, *self._waiting]:
                task.cancel()
            await asyncio.wait([*sources, *self._waiting], timeout=10)
            await self._stop_runs()
            self.log("daemon: stopped")

    async def _stop_runs(self) -> None:
        running = [slot for slot in [*self.slots, *self._detached] if slot.busy]
        for slot in running:
            if slot.queued:
                self.log(f"trigger {slot.name!r}: {len(slot.queued)} queued event(s) dropped at shutdown")
                slot.queued.clear()
            if slot.engine is not None:
                self.store.append_event(slot.engine.run_id, log.DaemonInterrupted(
                    trigger=slot.name, pid=os.getpid(), why="the daemon is stopping"))
                slot.engine.request_stop(STOP_REASON)
        tasks = [slot.task for slot in running if slot.task is not None]
        if not tasks:
            return
        self.log(f"daemon: waiting up to {self.grace:g}s for {len(tasks)} run(s) to reach an iteration boundary")
        _, late = await asyncio.wait(tasks, timeout=self.grace)
        for task in late:
            task.cancel()  # the engine records the run as stopped on its way out
        if late:
            await asyncio.wait(late, timeout=10)

    # ------------------------------------------------------------------ sources

    async def _source(self, slot: Slot) -> None:
        assert slot.trigger is not None
        try:
            kind = slot.trigger.on.kind
            if kind == "change":
                await self._watch(slot)
            elif kind == "schedule":
                await self._schedule(slot)
            else:
                await self._check(slot)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one trigger's source failing must not stop the others
            self.log(f"trigger {slot.name!r}: stopped watching: {exc.__class__.__name__}: {exc}")

    def _ignored(self) -> list[str]:
        """The store's own files and the runs' workspaces: a run writing files must not fire a trigger again."""
        beside = [str(self.db), str(self.db.parent / "repos")] if self.db is not None else []
        return [*beside, str(self.workspace_root), str(self.cwd / ".loopterm")]

    async def _watch(self, slot: Slot) -> None:
        from watchfiles import DefaultFilter, awatch  # lazy: only a daemon with a change trigger loads it

        assert slot.trigger is not None
        paths = [(self.cwd / p).resolve() for p in slot.trigger.on.change or []]
        quiet_ms = max(1, int(slot.trigger.debounce * 1000))
        self.log(f"trigger {slot.name!r}: watching {', '.join(self._rel(p) for p in paths)} for changes")
        async for changes in awatch(*paths, watch_filter=DefaultFilter(ignore_paths=self._ignored()), step=quiet_ms,
                                    debounce=max(quiet_ms * 10, 1_600), stop_event=self._watch_stop):
            files = [f"{self._rel(Path(path))} ({change.name})" for change, path in changes]
            self.fire(slot, change_event(files))

    async def _schedule(self, slot: Slot) -> None:
        assert slot.trigger is not None
        schedule = slot.trigger.schedule
        self.log(f"trigger {slot.name!r}: scheduled {schedule.text}")
        at = time.time()
        while True:
            at = schedule.next_after(max(at, time.time()))  # a time missed while busy is skipped, not caught up
            await asyncio.sleep(max(0.0, at - time.time()))
            self.fire(slot, schedule_event(schedule, at))

    async def _check(self, slot: Slot) -> None:
        trigger = slot.trigger
        assert trigger is not None
        argv = command_argv(trigger.on.command or [])
        every = trigger.every or 60.0
        self.log(f"trigger {slot.name!r}: checking `{' '.join(trigger.on.command or [])}` every {every:g}s")
        failing = False
        while True:
            if not slot.busy:  # no check while a run of this trigger may be changing what it checks
                done = await run_process(argv, self.cwd, scrubbed_env(), trigger.timeout, CHECK_OUTPUT_CAP)
                now_failing = done.exit_code != 0
                if now_failing and not failing:
                    self.fire(slot, command_event(trigger.on.command or argv, done.exit_code, done.error, done.stdout, done.stderr))
                elif failing and not now_failing:
                    self.log(f"trigger {slot.name!r}: the command passes again")
                failing = now_failing
            await asyncio.sleep(every)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.cwd)) or "."
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------ runs

    def fire(self, slot: Slot, event: str) -> None:
        """An event happened: start a run of the trigger's loop, or queue it behind the one still going."""
        if self.stopping.is_set():
            return
        if slot.busy:
            going = f"run {slot.engine.run_id}" if slot.engine is not None else "a run"
            if slot.trigger is not None and slot.trigger.on.kind == "schedule":
                self.log(f"trigger {slot.name!r}: skipped ({going} of it is still going): {event}")
                return
            slot.queued = [*slot.queued, event][-MAX_QUEUED_EVENTS:]
            self.log(f"trigger {slot.name!r}: fired while {going} of it is still going; queued: {event}")
            return
        self.log(f"trigger {slot.name!r}: fired: {event}")
        try:
            self._start(slot, event)
        except ConfigError as exc:
            self.log(f"trigger {slot.name!r}: could not start a run: {exc}")
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving its other triggers
            self.log(f"trigger {slot.name!r}: could not start a run: {exc.__class__.__name__}: {exc}")

    def _budget(self, slot: Slot) -> tuple[dict[str, Any], str | None]:
        """The run's budget under the daily budget (an uncapped run gets what is left today), or (_, the refusal)."""
        trigger = slot.trigger
        assert trigger is not None
        try:
            budget, _ = service.new_run_budget(self.store, slot.loop, usd=trigger.budget_usd,
                                               tokens=trigger.budget_tokens,
                                               what=f"trigger {trigger.name!r}'s budget_usd", lower="budget_usd")
        except ConfigError as exc:
            return {k: v for k, v in (("usd", trigger.budget_usd), ("tokens", trigger.budget_tokens)) if v is not None}, str(exc)
        return budget, None

    def _start(self, slot: Slot, event: str) -> None:
        trigger = slot.trigger
        assert trigger is not None
        budget, refused = self._budget(slot)
        if refused is not None and slot.refused_run is not None:
            self.store.append_event(slot.refused_run, log.TriggerRefused(trigger=slot.name, event=event, reason=refused))
            self.log(f"trigger {slot.name!r}: refused: {refused} (recorded on run {slot.refused_run})")
            return
        engine = service.create(
            slot.loop, self.store, ref=slot.ref, model=slot.model, max_iterations=trigger.max_iterations,
            budget=budget, workspace_root=self.workspace_root, goal=trigger.goal_for(slot.loop.goal, event),
            wait_on_person=True, workdir=self.cwd, origin=ORIGIN, run_id=self.run_id_for(slot, event),
        )
        run_id = engine.run_id
        self.store.append_event(run_id, log.TriggerFired(trigger=slot.name, on=trigger.on.kind, event=event,
                                                         triggers_file=self.triggers_file, pid=os.getpid()))
        if refused is not None:
            self.store.append_event(run_id, log.TriggerRefused(trigger=slot.name, event=event, reason=refused))
            record_end(self.store, run_id, TerminationReason.BUDGET_USD, f"not run: {refused}")
            slot.refused_run = run_id
            self.log(f"trigger {slot.name!r}: refused: {refused} (recorded as run {run_id})")
            return
        slot.refused_run = None
        capped = budget.get("usd") is not None and trigger.budget_usd is None and slot.loop.budget.usd is None
        self._launch(slot, engine, f"run {run_id} of {slot.loop.name} started (model {slot.model})"
                     + (f"; its budget is what is left of today's: ${budget['usd']:.4f}" if capped else ""))

    def run_id_for(self, slot: Slot, event: str) -> str | None:
        """The id of the run a firing starts (None: a new one); the cluster's daemon names it by the firing."""
        return None

    def _launch(self, slot: Slot, engine: Engine, started: str) -> None:
        engine.subscribe(self._watcher(slot, engine.run_id))
        slot.engine = engine
        slot.task = asyncio.create_task(self._drive(slot, engine), name=f"run {engine.run_id}")
        self.log(f"trigger {slot.name!r}: {started}")

    def _watcher(self, slot: Slot, run_id: str) -> Callable[[EngineEvent], None]:
        def on_event(event: EngineEvent) -> None:
            if isinstance(event, Escalated):
                self.log(f"trigger {slot.name!r}: run {run_id} escalated at iteration {event.n} and waits for a person: "
                         f"`loopterm watch {run_id}`")
            elif isinstance(event, ApprovalNeeded):
                self.log(f"trigger {slot.name!r}: run {run_id} waits for approval of {event.tool}: `loopterm watch {run_id}`")
        return on_event

    async def _drive(self, slot: Slot, engine: Engine) -> None:
        run_id = engine.run_id
        try:
            final = await engine.run()
            self.log(f"trigger {slot.name!r}: run {run_id} finished: {final.status} after {final.iterations} "
                     f"iteration(s), ${final.cost_usd:.6f}" + (f" ({final.message})" if final.message else ""))
        except asyncio.CancelledError:
            self.log(f"trigger {slot.name!r}: run {run_id} interrupted mid-iteration; it resumes when the daemon starts again")
            raise
        except Exception as exc:  # noqa: BLE001 - this run's failure, not the daemon's
            message = one_line(f"{exc.__class__.__name__}: {exc}", 500)
            try:
                record_end(self.store, run_id, TerminationReason.FATAL_ERROR, message)
            except Exception:  # noqa: BLE001 - the store itself failed; the line below says what we know
                pass
            self.log(f"trigger {slot.name!r}: run {run_id} failed: {message}")
        finally:
            slot.engine = None
            if not self.stopping.is_set() and slot.queued:
                queued, slot.queued = slot.queued, []
                asyncio.get_running_loop().call_soon(self._start_queued, slot, queued)

    def _start_queued(self, slot: Slot, queued: list[str]) -> None:
        if self.stopping.is_set():
            return
        event = queued[0] if len(queued) == 1 else f"{len(queued)} events while the last run went on: " + "; ".join(queued)
        try:
            self._start(slot, event)
        except Exception as exc:  # noqa: BLE001
            self.log(f"trigger {slot.name!r}: could not start a run: {exc.__class__.__name__}: {exc}")

    # ------------------------------------------------------------------ restart

    def interrupted(self) -> tuple[list[RunRecord], list[RunRecord]]:
        """Runs this triggers file started that the daemon should continue: (resume now, resume once the
        heartbeat is stale). Stopped by the daemon's shutdown (and not resumed by anyone since), or crashed."""
        now_runs: list[RunRecord] = []
        later: list[RunRecord] = []
        for run in self.store.list_runs():
            if run.origin != ORIGIN:
                continue
            status = Status(run.status)
            if status in (Status.CONVERGED, Status.TERMINATED, Status.FAILED, Status.ESCALATED):
                continue
            view = fold(self.store.events(run.id))
            if view.trigger is None or view.trigger.triggers_file != self.triggers_file:
                continue
            if status is Status.STOPPED:
                if view.daemon_interrupted and not view.waiting:
                    now_runs.append(run)
            elif executing_elsewhere(run, view):  # a daemon killed a moment ago on another machine, say
                later.append(run)
            else:
                now_runs.append(run)
        return now_runs, later

    def resume_interrupted(self) -> None:
        now_runs, later = self.interrupted()
        for run in now_runs:
            self._resume(run)
        for run in later:
            self.log(f"daemon: run {run.id} looks alive (a fresh heartbeat from a process this machine cannot see); "
                     "resuming it once its heartbeat is stale")
            self._waiting.append(asyncio.create_task(self._resume_when_stale(run)))

    async def _resume_when_stale(self, run: RunRecord) -> None:
        """A run that looks alive (a process elsewhere executes it, or did a moment ago): resume it once its
        heartbeat is stale."""
        while not self.stopping.is_set():
            current = self.store.get_run(run.id)
            if Status(current.status).finished or current.status == Status.ESCALATED.value:
                return
            if not executing_elsewhere(current, fold(self.store.events(current.id))):
                self._resume(current)
                return
            await asyncio.sleep(max(0.5, STALE_AFTER_S - (time.time() - current.updated_at) + 0.5))

    def _trigger_of(self, run: RunRecord) -> str:
        mark = fold(self.store.events(run.id)).trigger
        return mark.trigger if mark is not None else "?"

    def _resume(self, run: RunRecord) -> None:
        name = self._trigger_of(run)
        slot = self.by_name.get(name)
        try:
            loop = slot.loop if slot is not None and slot.ref == run.loop_ref else load_loop(run.loop_ref)[0]
            if slot is None or slot.busy:
                slot = Slot(name=name, trigger=None, loop=loop, ref=run.loop_ref, model=run.model)
                self._detached.append(slot)
            engine, _ = service.continuing(self.store, loop, run, what=f"what run {run.id} may still spend",
                                           wait_on_person=True, workspace_root=self.workspace_root, workdir=self.cwd)
        except ConfigError as exc:
            self.store.append_event(run.id, log.TriggerRefused(trigger=name, reason=str(exc), resume=True))
            self.log(f"trigger {name!r}: not resuming run {run.id}: {exc}")
            return
        self.store.append_event(run.id, log.DaemonResumed(trigger=name, pid=os.getpid(), from_status=run.status))
        self._launch(slot, engine, f"run {run.id} resumed after iteration {run.iterations} (it was {run.status})")
