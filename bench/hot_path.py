"""The engine + store hot path on three state shapes, through the real `Engine` and `Store` (issue 15).

    python bench/hot_path.py [--iterations 10000] [--workload list|dict|chat ...] [--profile] [--fork]

Each workload runs as bench/timetravel.py drives its own: an in-process client answering at once,
a no-op async tool, no gates, stall detection off, `Loop.observe` returning
`state.model_copy(update=...)`, every iteration committed before the next.

  list   20 scalar fields (two change each iteration) and an AppendLog growing by one 200-byte item
  dict   a dict of 200 keys, each a dict of 5 fields; 5 keys get a new dict each iteration
  chat   a list of {"role", "content"} messages growing by 1-2 a iteration, the oldest dropped to
         keep 40 every 5th iteration

Printed per workload: ms per iteration (median of 50 start-to-start intervals around iteration 100
and of the last 50), their ratio, state bytes stored per iteration (the `states` rows' bodies plus
the blobs their keyframes refer to, divided by the iterations), the process's CPU time per
iteration (which leaves out waiting for the disk: on a shared machine, fsync latency swings
from 0.2 to 4 ms), SQLite commits per iteration (counted with the connection's trace callback
over iterations 150-249), and with --fork the load of the state at the middle iteration from a
fresh Store and a fork there plus 10 iterations. --profile prints cProfile's top
functions by own time instead of timing windows.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
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

WINDOW = 50
EARLY = 100
KEYS, FIELDS, CHANGED = 200, 5, 5
KEEP_MESSAGES, PRUNE_EVERY = 40, 5
SAMPLE_FROM, SAMPLE = 150, 100  # iterations 150-249: where commits are counted (after the window at 100)


def _hex(i: int, size: int) -> str:
    return (hashlib.sha256(str(i).encode()).hexdigest() * 8)[:size]


def build(workload: str) -> tuple[type, Any]:
    """(the state model, Loop.observe) for a workload."""
    from pydantic import Field, create_model

    from loopterm.core import AppendLog, LoopState

    if workload == "list":
        fields: dict[str, Any] = {"step": (int, 0), "checksum": (str, "")}
        for k in range(2, 20):
            value = [f"value {k}", k * 1000, k / 7, k % 2 == 0][k % 4]
            fields[f"f{k:02d}"] = (type(value), value)
        model = create_model("ListState", __base__=LoopState, items=(AppendLog[str], Field(default_factory=AppendLog)),
                             **fields)

        def observe_list(state: Any, *_: Any) -> Any:
            i = state.iteration
            return state.model_copy(update={"step": i, "checksum": _hex(i, 16),
                                            "items": state.items.appended(f"item {i:06d} " + _hex(i, 188))})

        return model, observe_list
    if workload == "dict":
        def entry(k: int, i: int) -> dict[str, Any]:
            return {"name": f"entry {k}", "count": i, "score": i / 7 + k, "ok": i % 2 == 0, "note": _hex(k * 100_000 + i, 24)}

        start = {f"k{k:03d}": entry(k, 0) for k in range(KEYS)}
        model = create_model("DictState", __base__=LoopState,
                             table=(dict[str, dict[str, Any]], Field(default_factory=lambda: dict(start))))

        def observe_dict(state: Any, *_: Any) -> Any:
            i = state.iteration
            table = dict(state.table)
            for j in range(CHANGED):
                k = (i * CHANGED + j) * 37 % KEYS
                table[f"k{k:03d}"] = entry(k, i)
            return state.model_copy(update={"table": table})

        return model, observe_dict
    if workload == "chat":
        model = create_model("ChatState", __base__=LoopState,
                             messages=(list[dict[str, str]], Field(default_factory=list)))

        def observe_chat(state: Any, *_: Any) -> Any:
            i = state.iteration
            new = [{"role": "user", "content": f"question {i}: " + _hex(i, 100)}]
            if i % 3:
                new.append({"role": "assistant", "content": f"answer {i}: " + _hex(-i, 140)})
            messages = [*state.messages, *new]
            if i % PRUNE_EVERY == 0 and len(messages) > KEEP_MESSAGES:
                messages = messages[-KEEP_MESSAGES:]
            return state.model_copy(update={"messages": messages})

        return model, observe_chat
    raise SystemExit(f"unknown workload {workload!r}")


def run(workload: str, n: int, root: Path, *, profile: bool, fork: bool) -> dict[str, Any]:
    from loopterm.core import Loop, tool
    from loopterm.core.creation import new_run_id
    from loopterm.core.engine import Engine
    from loopterm.core.events import IterationStarted
    from loopterm.core.fork import AncestorCalls, create_fork, plan_fork, rebuild_workspace
    from loopterm.core.model import ModelReply
    from loopterm.store import Store

    reply = json.dumps({"action": {"tool": "noop", "args": {}}, "subgoal": "keep going", "confidence": 0.5,
                        "reasoning": "bench"})

    @tool
    async def noop() -> str:
        """Do nothing."""
        return "ok"

    class InstantClient:
        temperature = 0.0

        def estimate(self, messages: list, max_output_tokens: int) -> tuple[int, float]:
            return 100 + max_output_tokens, 0.0

        async def complete(self, messages: list, *, iteration: int, call_index: int = 0) -> ModelReply:
            return ModelReply(text=reply, tokens_in=100, tokens_out=20, cost_usd=0.0, latency_ms=0.0,
                              model="instant", calls=1)

    state_model, observe = build(workload)
    loop = Loop(name=f"hot_path_{workload}", goal="bench", state=state_model, tools=[noop], model="instant/bench",
                max_iterations=n, stall_window=None, observe=observe)
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
        result["profile"] = out.getvalue()
    if fork:
        at = n // 2
        fresh = Store.open(db, create=False)
        t0 = time.perf_counter()
        fresh.state_at(done.id, at)
        result["load_ms"] = (time.perf_counter() - t0) * 1e3

        async def fork_and_run() -> Any:
            plan = plan_fork(fresh, loop, fresh.get_run(done.id), at, reason="bench")
            branch_id = new_run_id()
            branch = create_fork(fresh, loop, plan, run_id=branch_id, workspace=root / "ws" / branch_id)
            fresh.update_run(branch.id, max_iterations=at + 10)
            branch = fresh.get_run(branch.id)
            await rebuild_workspace(loop, fresh, branch)
            child = Engine(loop, fresh, branch, client=InstantClient(), workdir=root, prior=AncestorCalls(fresh, branch))
            return await child.run()

        t0 = time.perf_counter()
        branch = asyncio.run(fork_and_run())
        result["fork_ms"] = (time.perf_counter() - t0) * 1e3
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
    parser.add_argument("--workload", action="append", choices=["list", "dict", "chat"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--fork", action="store_true", help="also time a load at the middle and a fork + 10")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the databases go (default: the system's temp directory); /dev/shm, where fsync "
                             "returns at once, shows the code's own cost without the disk's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hot_path_", dir=args.dir) as tmp:
        for workload in args.workload or ["list", "dict", "chat"]:
            result = run(workload, args.iterations, Path(tmp), profile=args.profile, fork=args.fork)
            if args.json:
                print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
            else:
                extra = (f"  load@{args.iterations // 2} {result['load_ms']:.1f} ms  fork+10 {result['fork_ms']:.0f} ms"
                         if args.fork else "")
                print(f"{workload:5} n={args.iterations}  @{EARLY}: {result['early_ms']:.3f} ms  last: "
                      f"{result['late_ms']:.3f} ms  (x{result['late_ms'] / result['early_ms']:.2f})  mean "
                      f"{result['mean_ms']:.3f} ms  cpu {result['cpu_ms']:.3f} ms  {result['bytes_per_iteration']:.0f} B/it  "
                      f"{result['commits_per_iteration']:.2f} commits/it{extra}", flush=True)
            if "profile" in result:
                print(result["profile"])


if __name__ == "__main__":
    sys.exit(main())
