"""The engine + store hot path on three state shapes, through the real `Engine` and `Store` (issue 15).

    python bench/hot_path.py [--iterations 10000] [--workload list|nested|chat ...] [--profile] [--fork]

The workloads are bench/workloads.py's (list, nested, chat), built as a loopterm user writes them by
bench/peers.py, the loop bench/shapes.py compares with LangGraph: an in-process client answering at
once, a no-op async tool, no gates, stall detection off, `Loop.observe` returning
`state.model_copy(update=...)`, every iteration committed before the next. This script is the quick
one, loopterm alone, for profiling.

Printed per workload: ms per iteration (median of 50 start-to-start intervals around iteration 100
and of the last 50), their ratio, state bytes stored per iteration (the `states` rows' bodies plus
the blobs their keyframes refer to, divided by the iterations), the process's CPU time per
iteration (which leaves out waiting for the disk: on a shared machine, fsync latency swings
from 0.2 to 4 ms), SQLite commits per iteration (counted with the connection's trace callback
over iterations 150-249), and with --fork the load of the state at the middle iteration from a
fresh Store (first, then the median of 5 more) and a fork there plus 10 iterations, with its steps
as bench/peers.py times them (plan_fork, create_fork, rebuild_workspace, Engine init, the 10
iterations). --profile prints cProfile's top functions by own time instead of timing windows.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from peers import loopterm_loop  # noqa: E402 - bench/ is this script's own directory, first on sys.path
from workloads import WORKLOADS  # noqa: E402

WINDOW = 50
EARLY = 100
SAMPLE_FROM, SAMPLE = 150, 100  # iterations 150-249: where commits are counted (after the window at 100)


def run(workload: str, n: int, root: Path, *, profile: bool, fork: bool, profile_out: Path | None = None) -> dict[str, Any]:
    from loopterm.core.creation import new_run_id
    from loopterm.core.engine import Engine
    from loopterm.core.events import IterationStarted
    from loopterm.core.fork import AncestorCalls, create_fork, plan_fork, rebuild_workspace
    from loopterm.store import Store

    loop, InstantClient = loopterm_loop(WORKLOADS[workload], n)
    db = root / f"{workload}.db"
    store = Store.open(db)
    commits = [0]
    engine = Engine.create(loop, store, loop_ref=f"bench/hot_path.py:{workload}", workspace_root=root / "ws",
                           workdir=root, client=InstantClient())
    starts: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, IterationStarted):
            starts.append(time.perf_counter())
            if len(starts) == SAMPLE_FROM:  # commits are counted over a sample: a trace callback costs time
                store._conn.set_trace_callback(lambda sql: commits.__setitem__(0, commits[0] + (sql == "COMMIT")))
            elif len(starts) == SAMPLE_FROM + SAMPLE:
                store._conn.set_trace_callback(None)

    engine.subscribe(on_event)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    cpu = time.process_time()
    done = asyncio.run(engine.run())
    ended = time.perf_counter()
    cpu = time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
    assert done.iterations == n, done
    marks = [*starts, ended]
    times = [b - a for a, b in zip(marks, marks[1:])]
    lo = max(0, min(EARLY - WINDOW // 2, len(times) - WINDOW))
    result: dict[str, Any] = {
        "workload": workload, "iterations": n,
        "early_ms": statistics.median(times[lo:lo + WINDOW]) * 1e3,
        "late_ms": statistics.median(times[-WINDOW:]) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "cpu_ms": cpu / n * 1e3,
        "bytes_per_iteration": state_bytes(store, done.id) / n,
        "commits_per_iteration": commits[0] / SAMPLE if n >= SAMPLE_FROM + SAMPLE else float("nan"),
    }
    store.close()
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        if profile_out is not None:
            profiler.dump_stats(profile_out.with_suffix(f".{workload}.prof"))
        result["profile"] = out.getvalue()
    if fork:
        at = n // 2
        fresh = Store.open(db, create=False)
        t0 = time.perf_counter()
        fresh.state_at(done.id, at)
        result["load_ms"] = (time.perf_counter() - t0) * 1e3
        again = []
        for _ in range(5):
            t0 = time.perf_counter()
            fresh.state_at(done.id, at)
            again.append((time.perf_counter() - t0) * 1e3)
        result["load_again_ms"] = statistics.median(again)
        steps: dict[str, float] = {}

        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            steps[name] = (now - since) * 1e3
            return now

        async def fork_and_run() -> Any:  # as bench/peers.py times it: what `loopterm fork` does
            t = time.perf_counter()
            plan = plan_fork(fresh, loop, fresh.get_run(done.id), at, reason="bench")
            t = lap("plan", t)
            branch_id = new_run_id()
            branch = create_fork(fresh, loop, plan, run_id=branch_id, workspace=root / "ws" / branch_id)
            fresh.update_run(branch.id, max_iterations=at + 10)
            branch = fresh.get_run(branch.id)
            t = lap("create", t)
            await rebuild_workspace(loop, fresh, branch)
            t = lap("rebuild", t)
            child = Engine(loop, fresh, branch, client=InstantClient(), workdir=root, prior=AncestorCalls(fresh, branch))
            t = lap("init", t)
            ran = await child.run()
            lap("run10", t)
            return ran

        t0 = time.perf_counter()
        branch = asyncio.run(fork_and_run())
        result["fork_ms"] = (time.perf_counter() - t0) * 1e3
        result["fork_steps_ms"] = steps
        assert branch.iterations == at + 10, branch
        fresh.close()
    return result


def state_bytes(store: Any, run_id: str) -> int:
    """The run's `states` bodies plus the distinct blobs its keyframes refer to."""
    from loopterm.store.delta import keyframe_hashes, loads

    total, hashes = 0, set()
    for keyframe, body in store._query("SELECT keyframe, body FROM states WHERE run_id = ?", [run_id]):
        total += len(body.encode() if isinstance(body, str) else body)
        if keyframe:
            hashes.update(keyframe_hashes(loads(body)))
    for digest in hashes:
        (size,), = store._query("SELECT length(CAST(body AS BLOB)) FROM blobs WHERE hash = ?", [digest])
        total += size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="with --profile, also write each workload's stats to PATH.WORKLOAD.prof (for pstats)")
    parser.add_argument("--fork", action="store_true", help="also time a load at the middle and a fork + 10")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the databases go (default: the system's temp directory); /dev/shm, where fsync "
                             "returns at once, shows the code's own cost without the disk's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hot_path_", dir=args.dir) as tmp:
        for workload in args.workload or list(WORKLOADS):
            result = run(workload, args.iterations, Path(tmp), profile=args.profile, fork=args.fork,
                         profile_out=args.profile_out)
            if args.json:
                print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
            else:
                extra = (f"  load@{args.iterations // 2} {result['load_ms']:.2f} ms (again {result['load_again_ms']:.2f})"
                         f"  fork+10 {result['fork_ms']:.1f} ms ("
                         + " ".join(f"{k} {v:.1f}" for k, v in result["fork_steps_ms"].items()) + ")"
                         if args.fork else "")
                print(f"{workload:5} n={args.iterations}  @{EARLY}: {result['early_ms']:.3f} ms  last: "
                      f"{result['late_ms']:.3f} ms  (x{result['late_ms'] / result['early_ms']:.2f})  mean "
                      f"{result['mean_ms']:.3f} ms  cpu {result['cpu_ms']:.3f} ms  {result['bytes_per_iteration']:.0f} B/it  "
                      f"{result['commits_per_iteration']:.2f} commits/it{extra}", flush=True)
            if "profile" in result:
                print(result["profile"])


if __name__ == "__main__":
    sys.exit(main())
