"""`loopterm worker --db URL [--concurrency N] [--id NAME]`: execute run segments from the cluster's queues.

A worker is DBOS (core/queues.py) executing `loopterm.segment` workflows: each drives one run from the
store's journal until it ends or waits on a person (core/segments.py). Beside that it keeps two watches:
- answers: a person's command on a run that waits (from any machine's `watch`, inbox or `loopterm answer`)
  queues the run's next segment. The store's notifications wake it at once (PostgreSQL LISTEN/NOTIFY,
  `store.subscribe`); a scan of the waiting runs every --poll seconds catches what a notification missed
  (the worker was starting, the connection dropped, a SQLite store that has none). Every worker does this:
  the segment's workflow id is the command's, so however many see it, one segment is queued.
- takeover: a dead worker's segments go back on the queues (core/takeover.py).

One line per segment started and ended on stdout. SIGINT/SIGTERM: no new segment is taken; running ones
get --grace seconds to end, then the worker exits and the others take over what is left, as after a crash
(at most the iteration in flight is redone). A second signal exits at once.

Standard library only at import: `loopterm --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from loopterm.tui import arguments

DEFAULT_CONCURRENCY = 4
DEFAULT_GRACE_S = 30.0
DEFAULT_POLL_S = 2.0


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    worker = sub.add_parser(
        "worker", parents=[db], help="execute queued runs (`run --submit`, `eval --submit`, the daemon) on this machine",
        description="Take run segments from the cluster's queues (DBOS, in the store's PostgreSQL) and drive them: "
                    "each runs until its run ends or waits on a person; an answer from any machine queues the next. "
                    "A worker that dies is noticed by the others, which take its runs over. Needs a PostgreSQL store "
                    "(--db postgresql://...).")
    worker.add_argument("--concurrency", type=arguments.positive_int, default=DEFAULT_CONCURRENCY, metavar="N",
                        help=f"segments this worker runs at once, all providers together (default {DEFAULT_CONCURRENCY}); "
                             "per-provider caps for the whole cluster: LOOPTERM_PROVIDER_LIMITS")
    worker.add_argument("--id", metavar="NAME", help="this worker's id (default host-pid); a worker restarted with the "
                                                     "same id takes back its own unfinished segments at once")
    worker.add_argument("--grace", type=arguments.seconds, default=DEFAULT_GRACE_S, metavar="S",
                        help=f"on SIGTERM, how long running segments get to end before the worker exits and others "
                             f"take them over (default {DEFAULT_GRACE_S:g})")
    worker.add_argument("--poll", type=arguments.seconds, default=DEFAULT_POLL_S, metavar="S",
                        help=f"how often to look for answered runs beside the store's notifications (default {DEFAULT_POLL_S:g})")


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def line(text: str) -> None:
    print(f"{_stamp()} {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from loopterm.core.errors import ConfigError
    from loopterm.core.queues import Queues, is_postgres, launch_worker, queue_db, redact_url
    from loopterm.core.segments import worker_name
    from loopterm.core.takeover import ExecutorLock, Takeover
    from loopterm.store import Store
    from loopterm.tui.submit_cli import store_location

    location = store_location(args)
    url = queue_db(location, what="`loopterm worker`")
    if args.id is not None and not args.id.strip():
        raise ConfigError("--id is empty; give a name, e.g. --id build-host-1")
    me = args.id or worker_name()
    Store.open(location).close()  # a store that cannot open is one line now, not one per segment
    lock = ExecutorLock(url, me)
    queues = Queues(url)

    def segment(run_id: str) -> dict[str, Any]:
        from loopterm.core import segments

        store = Store.open(location)
        try:
            end = segments.drive(store, run_id, say=lambda what: line(f"▶ {what}"))
        finally:
            store.close()
        if end.skipped:
            line(f"· run {run_id}: nothing to do: {end.skipped}")
        else:
            line(f"■ run {run_id} {end.status} after iteration {end.iterations} ({end.seconds:.1f}s)"
                 + (f": {end.message}" if end.message and end.status != "converged" else ""))
        return end.as_dict()

    from loopterm.core.model import load_litellm

    load_litellm()  # seconds, once, before the first segment rather than inside it
    dbos = launch_worker(url, me, segment, concurrency=args.concurrency)
    takeover = Takeover(url, lock, pending=lambda: _pending_executors(dbos), said=lambda t: line(f"⚠ {t}"),
                        recover=lambda executor: len(dbos._recover_pending_workflows([executor])))
    takeover.start()
    answers = Answers(location, queues, every=args.poll)
    answers.start()
    where = redact_url(str(location)) if is_postgres(location) else str(location)
    line(f"worker {me} on {where}: up to {args.concurrency} segment(s) at once")
    _serve(dbos, args.grace)
    return 0


def _pending_executors(dbos: Any) -> set[str]:
    from loopterm.core.queues import WORKFLOW

    found = dbos.list_workflows(status="PENDING", name=WORKFLOW, load_input=False, load_output=False)
    return {w.executor_id for w in found if w.executor_id}


def _serve(dbos: Any, grace: float) -> None:
    """Until SIGINT/SIGTERM; then drain for `grace` seconds and exit (the lock goes with the process)."""
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(130)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(0.5):
        pass
    running = _running()
    line(f"stopping: no new segments; {running} running get up to {grace:g}s to end, then the others take them over")
    dbos.destroy(workflow_completion_timeout_sec=int(grace + 0.999))
    line("stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an engine still going after the grace is left to the takeover, as after a crash


def _running() -> int:
    from dbos._dbos import _get_dbos_instance

    return len(_get_dbos_instance()._active_workflows_set.activeList())


class Answers(threading.Thread):
    """Queues the next segment of a cluster run a person answered (see the module's docstring)."""

    def __init__(self, location: Path | str, queues: Any, *, every: float) -> None:
        super().__init__(name="loopterm-answers", daemon=True)
        self.location = location
        self.queues = queues
        self.every = every
        self.poked: set[str] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def poke(self, kind: str, run_id: str) -> None:
        """A store notification (another thread): a command for this run was committed."""
        if kind in ("command", "commands"):
            with self.lock:
                self.poked.add(run_id)
            self.wake.set()

    def run(self) -> None:
        from loopterm.store import Store

        store = Store.open(self.location)
        subscribe = getattr(store, "subscribe", None)
        if subscribe is not None:
            subscribe(self.poke)
        while True:
            woken = self.wake.wait(self.every)
            self.wake.clear()
            with self.lock:
                runs, self.poked = self.poked, set()
            try:
                if not woken:
                    runs |= {r.id for r in store.list_runs() if r.status == "escalated"}
                for run_id in sorted(runs):
                    self.consider(store, run_id)
            except Exception as exc:  # noqa: BLE001 - the database may be away a while: the next look tries again
                line(f"⚠ answers check failed ({exc.__class__.__name__}: {str(exc)[:200]}); trying again")

    def consider(self, store: Any, run_id: str) -> None:
        from loopterm.core.segments import next_cause

        cause = next_cause(store, run_id)
        if cause is None or not self.queues.segments(run_id):  # not a cluster run: whoever runs it takes it
            return
        queued = self.queues.enqueue(run_id, store.get_run(run_id).model, cause)
        if queued.fresh:
            line(f"↻ run {run_id} was answered: its next segment is queued")
