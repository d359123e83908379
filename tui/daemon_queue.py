"""`loopterm daemon` in a cluster: each firing's run is queued for the workers instead of run in this process.

Everything else is the daemon's (tui/daemon.py): the triggers, the daily budget before each run, one run at
a time per trigger (a firing meanwhile is queued or skipped as there). What changes:
- the run of a firing is recorded and its first segment queued (core/queues.py); the daemon follows it in
  the store until it ends, and the trigger is free again;
- the run's id is named by the firing (the triggers file's name, the trigger, the event's text): a second
  daemon on the same triggers file that sees the same firing (a schedule's time) finds the run made and
  makes no other, and queueing it again is one segment (its workflow id);
- stopping the daemon leaves the runs to the workers; starting it resumes nothing (a worker that died is
  taken over by the others: core/takeover.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loopterm.core.engine import Engine
from loopterm.core.queues import batch_run_id
from loopterm.core.termination import Status
from loopterm.tui.daemon import Slot, TriggerDaemon

FOLLOW_S = 1.0


class QueueingDaemon(TriggerDaemon):
    def __init__(self, *args: Any, queues: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queues = queues

    def run_id_for(self, slot: Slot, event: str) -> str | None:
        return batch_run_id(f"{Path(self.triggers_file).name}\0{slot.name}", event)

    def _start(self, slot: Slot, event: str) -> None:
        run_id = self.run_id_for(slot, event)
        try:
            self.store.get_run(run_id or "")
        except KeyError:
            super()._start(slot, event)
            return
        self.log(f"trigger {slot.name!r}: run {run_id} of this firing was made already (another daemon); not again")

    async def _drive(self, slot: Slot, engine: Engine) -> None:
        run_id = engine.run_id
        try:
            queued = await asyncio.to_thread(self.queues.enqueue, run_id, engine.run_record.model, "start")
            self.log(f"trigger {slot.name!r}: run {run_id} queued on {queued.queue} for the workers")
            while True:
                await asyncio.sleep(FOLLOW_S)
                run = self.store.get_run(run_id)
                if Status(run.status).finished:
                    break
            self.log(f"trigger {slot.name!r}: run {run_id} finished: {run.status} after {run.iterations} "
                     f"iteration(s), ${run.cost_usd:.6f}" + (f" ({run.message})" if run.message else ""))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this run's trouble, not the daemon's
            self.log(f"trigger {slot.name!r}: run {run_id}: {exc.__class__.__name__}: {exc}")
        finally:
            slot.engine = None
            if not self.stopping.is_set() and slot.queued:
                queued_events, slot.queued = slot.queued, []
                asyncio.get_running_loop().call_soon(self._start_queued, slot, queued_events)

    async def _stop_runs(self) -> None:
        following = [slot.task for slot in [*self.slots, *self._detached] if slot.busy and slot.task is not None]
        for task in following:
            task.cancel()
        if following:
            self.log(f"daemon: {len(following)} run(s) go on on the workers")
            await asyncio.wait(following, timeout=10)

    def resume_interrupted(self) -> None:
        """Nothing: the workers continue what a stop or a crash interrupted."""
