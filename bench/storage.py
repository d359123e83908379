"""The storage meter and `prune` at scale: the real Store, synthetic iterations, no engine.

Workload: a 10,000-iteration run whose state grows by one ~200-byte item per iteration (as in
state_load.py) with a system prompt stored as shared sections, a branch of it at 9,000 with 500 own
iterations, and three unrelated 1,000-iteration runs. Reports, as a markdown table: the meter cold (every
run read), warm (nothing changed: what the run tree's worker costs when idle) and after 50 new iterations
(what it costs while a run is live), the run tree's own refresh (it only reads the last measurement); then
pruning the three unrelated runs: planning (a dry run), the delete transaction, VACUUM, and the file before
and after.

    python bench/storage.py [--iterations 10000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from loopterm.core.records import IterationRecord, RunRecord
from loopterm.store import Store
from loopterm.store.footprint import Meter, human

SYSTEM = "\n\n".join(f"Rule {i}: keep the change small, run the tests, and explain it in one line." * 2 for i in range(12))


def record(run_id: str, n: int, log: list[dict[str, Any]]) -> IterationRecord:
    return IterationRecord(
        run_id=run_id, n=n, started_at=float(n), ended_at=n + 0.5,
        prompt=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"iteration {n}: the tests failed " * 3}],
        raw_response='{"action": {"tool": "run_tests", "args": {}}}', decision={"action": {"tool": "run_tests", "args": {}}},
        state={"iteration": n, "subgoal": f"make test {n % 7} pass", "log": list(log)},
    )


def run_record(run_id: str, when: float, parent: str | None = None, at: int | None = None) -> RunRecord:
    return RunRecord(id=run_id, loop="bench", loop_ref="bench", goal="g", spec_hash="h", model="scripted/x",
                     status="converged", workspace="/tmp", created_at=when, updated_at=when, max_iterations=100_000,
                     budget={}, parent_run=parent, fork_iteration=at, origin="fork" if parent else "run")


def fill(store: Store, run_id: str, first: int, last: int, log: list[dict[str, Any]]) -> None:
    for n in range(first, last + 1):
        log.append({"n": n, "tool": "run_tests", "output": f"{run_id} iteration {n}: " + "collected 12 items, 11 passed " * 4})
        store.commit_iteration(record(run_id, n, log), {"iterations": n})


def timed(action: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=10_000)
    args = parser.parse_args()
    big, fork_at = args.iterations, args.iterations * 9 // 10
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        store.create_run(run_record("big", 1.0))
        log: list[dict[str, Any]] = []
        fill(store, "big", 1, fork_at, log)
        branch_log = list(log)
        fill(store, "big", fork_at + 1, big, log)
        store.create_run(run_record("branch", 2.0, "big", fork_at))
        fill(store, "branch", fork_at + 1, fork_at + 500, branch_log)
        for k in range(3):
            store.create_run(run_record(f"old{k}", 0.5))
            fill(store, f"old{k}", 1, 1000, [])
        meter = Meter()
        sizes, cold = timed(lambda: store.sizes(meter=meter))
        _, warm = timed(lambda: store.sizes(meter=meter))
        fill(store, "branch", fork_at + 501, fork_at + 550, branch_log)
        _, grown = timed(lambda: store.sizes(meter=meter))
        rows += [
            ("meter, cold (every run read)", f"{cold * 1000:.0f} ms"),
            ("meter, warm (nothing changed)", f"{warm * 1000:.1f} ms"),
            ("meter, after 50 new iterations of the branch", f"{grown * 1000:.1f} ms"),
            ("big: own + shared", f"{human(sizes['big'].own_bytes)} + {human(sizes['big'].shared_bytes)}"),
            ("branch (550 own): own + shared", f"{human(sizes['branch'].own_bytes)} + {human(sizes['branch'].shared_bytes)}"),
        ]
        dry, planning = timed(lambda: store.prune(older_than=1.0, keep_last=None, dry_run=True))
        on_disk = os.path.getsize(store.path) + os.path.getsize(f"{store.path}-wal")
        done, total = timed(lambda: store.prune(older_than=1.0, keep_last=None))
        after = os.path.getsize(store.path) + (os.path.getsize(f"{store.path}-wal") if os.path.exists(f"{store.path}-wal") else 0)
        rows += [
            ("prune --dry-run (plan: every run's rows and blob references)", f"{planning * 1000:.0f} ms"),
            ("prune: removed / bytes the plan frees", f"{len(done.plan.removed)} runs / {human(done.plan.bytes)}"),
            ("prune: plan + delete transaction", f"{(total - (done.vacuum_s or 0)) * 1000:.0f} ms"),
            ("prune: VACUUM + WAL checkpoint", f"{(done.vacuum_s or 0) * 1000:.0f} ms"),
            ("database pages before -> after", f"{human(done.file_bytes_before)} -> {human(done.file_bytes_after)}"),
            ("on disk (file + WAL) before -> after", f"{human(on_disk)} -> {human(after)}"),
        ]
        assert [r.id for r in dry.plan.removed] == [r.id for r in done.plan.removed]
        store.close()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| what | figure |\n|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")


if __name__ == "__main__":
    main()
