"""A run segment: drive one run from its journal until it ends or waits on a person.

This is what a `loopterm worker` executes for each item of its queue (core/queues.py). It is the same
crash-tested resume as `loopterm resume --no-wait`: the engine starts from the last committed iteration,
reuses a reply journalled before a crash, never fires a side-effecting call twice (one interrupted
mid-flight waits on a person's `--side-effects` answer), and takes a person's answers sent meanwhile first.
Whatever queued it, a segment is safe to run again: for a finished run, or one still waiting on a person
with nothing answered, it does nothing.

While it drives, it holds the store's per-run lock (`store.drive`, a PostgreSQL advisory lock): if another
engine holds it (a laptop's `loopterm resume`, a segment on another worker), this segment does nothing.
On a SQLite store (workers on one machine) the heartbeat and process checks of `resume` stand in for it.

A worker also asks `next_cause`: should a run get a new segment now (a person answered it)? Core only:
the caller opens the store and passes it in.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from loopterm.core import runlog as log
from loopterm.core.errors import ConfigError, LooptermError, RunBusyError
from loopterm.core.fold import RunView, fold
from loopterm.core.liveness import executing_elsewhere
from loopterm.core.records import RunRecord
from loopterm.core.termination import Status, TerminationReason

Say = Callable[[str], None]

# Finished for good: a segment never continues these (a person resumes a stopped run on purpose).
_DONE = {Status.CONVERGED.value, Status.TERMINATED.value, Status.FAILED.value, Status.STOPPED.value}


@dataclass
class SegmentEnd:
    """How a segment ended: `skipped` says why it drove nothing (then status is the run's as found)."""

    run_id: str
    status: str
    reason: str | None = None
    message: str | None = None
    iterations: int = 0
    skipped: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def drive(store: Any, run_id: str, *, say: Say | None = None) -> SegmentEnd:
    """Drive run `run_id` on `store` (an open Store; closed by the caller) until it ends or waits on a person."""
    began = time.monotonic()
    if not store.drive(run_id):  # the journal's run lock (core/persistence.py): counted, so the engine shares it
        run = store.get_run(run_id)
        return SegmentEnd(run_id, run.status, skipped="another engine drives this run now")
    try:
        end = _drive_held(store, run_id, say)
    finally:
        store.undrive(run_id)
    end.seconds = round(time.monotonic() - began, 3)
    return end


def _drive_held(store: Any, run_id: str, say: Say | None) -> SegmentEnd:
    from loopterm.core import runs as service

    run = store.get_run(run_id)
    view = fold(store.events(run_id))
    why = _nothing_to_do(store, run, view)
    if why is not None:
        return SegmentEnd(run_id, run.status, run.termination_reason, run.message, run.iterations, skipped=why)
    if getattr(store, "backend", "sqlite") != "postgresql":
        try:  # no per-run lock on SQLite: the heartbeat and the process tell whether an engine has it
            service.resume_guard(store, run)
        except ConfigError as exc:
            return SegmentEnd(run_id, run.status, skipped=str(exc))
    try:
        engine = _engine(store, run, view)
    except LooptermError as exc:  # this worker cannot run it (its loop, its model's key): said on the run
        final = service.record_end(store, run_id, TerminationReason.FATAL_ERROR, f"a worker could not start it: {exc}")
        return _ended(final)
    if say is not None:
        say(f"run {run_id} ({run.loop}, {run.model}) from iteration {engine.state.iteration}")
    try:
        final = asyncio.run(engine.run())
    except RunBusyError as exc:  # another engine took the run between our look and the engine's own lock
        return SegmentEnd(run_id, run.status, skipped=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug in a loop or in loopterm: this run's failure, not the worker's
        message = " ".join(f"{exc.__class__.__name__}: {exc}".split())[:500]
        final = service.record_end(store, run_id, TerminationReason.FATAL_ERROR, message)
    return _ended(final)


def _ended(final: RunRecord) -> SegmentEnd:
    return SegmentEnd(final.id, final.status, final.termination_reason, final.message, final.iterations)


def _nothing_to_do(store: Any, run: RunRecord, view: RunView) -> str | None:
    """Why this run needs no segment now, or None."""
    if run.status in _DONE:
        return f"it has ended ({run.status})"
    if view.waiting and not store.pending_commands(run.id):
        return "it waits on a person, who has not answered yet"
    return None


def _engine(store: Any, run: RunRecord, view: RunView) -> Any:
    """The engine that continues the run, with its loop, its (case's) offline script registered, its
    workspace prepared on this machine if it has none here, and a person's answers to side effects."""
    from loopterm.core import runs as service
    from loopterm.core.loader import load_loop

    loop, _ = load_loop(run.loop_ref)
    checked = _case_script(store, loop, run)
    workspace = Path(run.workspace)
    if not workspace.exists():
        _prepare(loop, workspace)
    engine, _ = service.continuing(
        store, loop, run, what="what this run may still spend", checked=checked, wait_on_person=False,
        side_effect_answers=_side_effect_answers(store, run.id), workspace_root=workspace.parent,
    )
    return engine


def _case_script(store: Any, loop: Any, run: RunRecord) -> bool:
    """A case of a submitted batch on its own script (`scripted/<loop>.case.<id>`): that script registered
    here. True when the model was checked."""
    from loopterm.core.cases import load_cases, scripted_name
    from loopterm.core.runs import preflight_model

    started = next((e.event for e in store.events(run.id) if isinstance(e.event, log.CaseStarted)), None)
    if started is None or not started.cases_file or not run.model.startswith("scripted/"):
        return False
    case = next((c for c in load_cases(started.cases_file) if c.id == started.id), None)
    if case is None or case.script is None or run.model != scripted_name(loop.name, case):
        return False
    preflight_model(loop, run.model, case.script)
    return True


def _prepare(loop: Any, workspace: Path) -> None:
    """A workspace on this machine for a run submitted from another (or moved here after its worker died):
    the loop's files and setup, as `loopterm run` prepares one. Files another machine's workspace held
    are not here: shared storage keeps them (docs/DEPLOY.md)."""
    workspace.mkdir(parents=True, exist_ok=True)
    if loop.workspace_files is not None:
        shutil.copytree(loop.workspace_files, workspace, dirs_exist_ok=True)
    if loop.setup is not None:
        loop.setup(workspace)


def _side_effect_answers(store: Any, run_id: str) -> dict[str, str]:
    """A person's answers (reuse | reexecute) to interrupted side-effecting calls, given since the run's last
    engine session began: the engine needs the answer when it reaches the call again, and the fold forgets an
    answered question. An answer is for the one session after it, as `resume --side-effects` gives it: if
    that session is cut inside the same call again, the person is asked again (a `reexecute` carried over
    would fire it a third time without anyone seeing whether the second took effect)."""
    answers: dict[str, str] = {}
    for record in store.events(run_id):
        if isinstance(record.event, (log.RunStarted, log.RunResumed)):
            answers.clear()
        elif isinstance(record.event, log.SideEffectAnswered):
            answers[record.event.key] = record.event.answer
    return answers


def next_cause(store: Any, run_id: str) -> str | None:
    """Whether a run should get a new segment now, and why (the segment's cause): a person answered what it
    waits on (a command not taken yet) while no engine executes it. None: leave it."""
    try:
        run = store.get_run(run_id)
    except (LooptermError, KeyError):
        return None
    if run.status in _DONE or run.status == Status.CREATED.value:
        return None
    pending = store.pending_commands(run_id)
    if not pending:
        return None
    view = fold(store.events(run_id))
    if executing_elsewhere(run, view):
        return None  # an engine has it and takes the command at its next step
    return f"c{pending[-1].id}"


def worker_name() -> str:
    """A worker's default id: its host and process (unique while it lives; `--id` names a stable one)."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
