"""The run tree's sizes: each run's own bytes in the store, measured in a worker thread.

The tree's refresh (on the App's event loop, every second) only reads what the last measurement found;
a new one starts when some run's iteration count changed, at most every MIN_GAP_S. The Meter
(store/footprint.py) keeps what it read per run, so measuring again reads only the iterations added
since, a page at a time (the Store's lock is never held for long). A frozen App (snapshots) measures
nothing, so its pictures do not depend on a thread's timing.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from loopterm.core.records import RunRecord
from loopterm.store.footprint import Meter

MIN_GAP_S = 5.0


class TreeSizes:
    """Own bytes by run id, as of the last measurement."""

    def __init__(self) -> None:
        self.meter = Meter()
        self.sizes: dict[str, int] = {}
        self._key: tuple[tuple[str, int], ...] | None = None
        self._busy = False
        self._finished_at = float("-inf")
        self.last_s: float | None = None  # how long the last measurement took

    def known(self, app: Any, runs: list[RunRecord]) -> dict[str, int]:
        """What is known now; starts a measurement in a thread when runs changed (and it is time)."""
        key = tuple((run.id, run.iterations) for run in runs)
        if key != self._key and not self._busy and time.monotonic() - self._finished_at >= MIN_GAP_S:
            self._busy, self._key = True, key
            app.run_worker(partial(self._measure, app, list(runs)), name="run sizes", group="sizes", thread=True,
                           exit_on_error=False)
        return self.sizes

    def _measure(self, app: Any, runs: list[RunRecord]) -> None:
        started = time.perf_counter()
        try:
            measured = app.store.sizes(runs, self.meter)
        except Exception:  # the store closed under a quitting App, or a run vanished (pruned) meanwhile
            self._key = None
            return
        finally:
            self._busy = False
            self._finished_at = time.monotonic()
        self.last_s = time.perf_counter() - started
        self.sizes = {run_id: size.own_bytes for run_id, size in measured.items()}
        try:
            app.call_from_thread(app.refresh_tree)
        except RuntimeError:  # the App is gone
            pass
