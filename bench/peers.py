"""One system on one workload, in a child process: the measuring half of timetravel.py and shapes.py.

`run_phase(system, workload, n, at, ..., repeats=R)` starts a fresh interpreter on this file, which
runs the workload (bench/workloads.py) for n iterations on that system, then R times opens the store
afresh, loads the state at `at` (the first call on that store) and forks there for 10 more
iterations (a new branch each time), and hands back the figures as JSON: medians, and every sample.
`run_phase(..., short=True)` only runs n iterations on a new database (`short_phase`), for the time
per iteration around iteration 100 from many short runs. Each phase gets its own process so neither
system's heap or RSS high-water mark leaks into the other's figures.

  loopterm   the real engine (`Engine`) on the real store (`Store`, SQLite, each iteration
             committed), an in-process client answering instantly (as in engine_overhead.py),
             a no-op tool, no gates, stall detection off; the workload's fields live on a
             `LoopState` subclass and `Loop.observe` returns `state.model_copy(update=...)`.
  LangGraph  a `StateGraph` with one node looping to itself through a conditional edge that
             ends after N steps, compiled with `SqliteSaver` on a file (WAL, like loopterm's
             store), `durability="sync"` (each checkpoint written before the next step, like
             loopterm), `recursion_limit` raised; the node returns the workload's update.

Measured: per-iteration start-to-start wall time (node entries for LangGraph, `IterationStarted`
events for loopterm); on-disk bytes per table from SQLite's `dbstat`; find (LangGraph's
`get_state_history(filter={"step": at})`; loopterm addresses an iteration by (run, n)); load
(`Store.state_at` / `graph.get_state`, first call on a freshly opened store or saver, checked
against the workload's expected values; then 5 more on the same one); fork + 10 (plan_fork,
create_fork, rebuild_workspace and an Engine run, what `loopterm fork` does / update_state on the
same checkpoint + invoke(None), each fork's end state checked); ru_maxrss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS, Workload  # noqa: E402

WINDOW = 50
EARLY = 100
FORK_STEPS = 10
LOAD_REPEATS = 5
SHORT = EARLY + WINDOW + 50  # a short run: enough for the window around iteration 100, and a margin
THREAD = {"configurable": {"thread_id": "bench"}}  # LangGraph's one thread


def rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def window(times: list[float], center: int) -> float:
    """Median ms of the 50 iterations around iteration `center` (1-based), clipped to the run."""
    lo = max(0, min(center - WINDOW // 2, len(times) - WINDOW))
    return statistics.median(times[lo:lo + WINDOW]) * 1e3


def intervals(starts: list[float], end: float) -> list[float]:
    """Per-iteration wall time: from one iteration's start to the next's (the last to `end`)."""
    marks = [*starts, end]
    return [b - a for a, b in zip(marks, marks[1:])]


def table_bytes(path: Path) -> tuple[dict[str, int], str]:
    """On-disk bytes per table (its indexes included) from `dbstat`; file size if dbstat is missing."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        sizes: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            sizes[table] = sizes.get(table, 0) + int(size)
        return sizes, "dbstat"
    except sqlite3.OperationalError:
        wal = Path(str(path) + "-wal")
        return {"(file)": path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)}, "file size"
    finally:
        conn.close()


def same(values: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether a loaded state holds the workload's expected values (other fields ignored)."""
    return all(list(values[k]) == v if isinstance(v, list) else values[k] == v for k, v in expected.items())


# --------------------------------------------------------------------------- loopterm


def loopterm_loop(workload: Workload, n: int) -> tuple[Any, Any]:
    """The workload as a loopterm user writes it, and an instant client: (Loop, client factory)."""
    from pydantic import create_model

    from loopterm.core import Loop, LoopState, tool
    from loopterm.core.model import ModelReply

    reply = json.dumps({"action": {"tool": "noop", "args": {}}, "subgoal": "keep going", "confidence": 0.5,
                        "reasoning": "bench"})

    @tool
    async def noop() -> str:
        """Do nothing (async: a plain function would run on a worker thread, which is right for a
        tool that may be slow but would time a thread hop here, not the engine)."""
        return "ok"

    class InstantClient:
        """Answers at once with a fixed reply; no litellm (as in engine_overhead.py)."""

        temperature = 0.0

        def estimate(self, messages: list, max_output_tokens: int) -> tuple[int, float]:
            return 100 + max_output_tokens, 0.0

        async def complete(self, messages: list, *, iteration: int, call_index: int = 0) -> ModelReply:
            return ModelReply(text=reply, tokens_in=100, tokens_out=20, cost_usd=0.0, latency_ms=0.0,
                              model="instant", calls=1)

    BenchState = create_model("BenchState", __base__=LoopState, **workload.loopterm_fields())

    def observe(state: Any, decision: Any, tool_record: Any, gates: Any) -> Any:
        return state.model_copy(update=workload.loopterm_update(state, state.iteration))

    loop = Loop(name=f"bench-{workload.name}", goal=workload.summary, state=BenchState, tools=[noop],
                model="instant/bench", max_iterations=n, stall_window=None, observe=observe)
    return loop, InstantClient


def loopterm_run(workload: Workload, n: int, root: Path, db: Path) -> tuple[Any, Any, Any, list[float], float]:
    """Run the workload for n iterations on a new store at `db`: (loop, client class, run, intervals, seconds)."""
    from loopterm.core.engine import Engine
    from loopterm.core.events import IterationStarted
    from loopterm.store import Store

    loop, InstantClient = loopterm_loop(workload, n)
    store = Store.open(db)
    engine = Engine.create(loop, store, loop_ref=f"bench/peers.py:{workload.name}", workspace_root=root / "ws",
                           workdir=root, client=InstantClient())
    starts: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, IterationStarted):
            starts.append(time.perf_counter())
            if len(starts) % 1000 == 0:
                print(f"  loopterm {workload.name}: iteration {len(starts)}", file=sys.stderr, flush=True)

    engine.subscribe(on_event)
    began = time.perf_counter()
    run = asyncio.run(engine.run())
    ended = time.perf_counter()
    assert run.iterations == n, run
    store.close()
    return loop, InstantClient, run, intervals(starts, ended), ended - began


def loopterm_fork(workload: Workload, loop: Any, InstantClient: Any, store: Any, run_id: str, at: int,
                  root: Path) -> tuple[float, dict[str, float]]:
    """Fork at `at` and run 10 iterations the way `loopterm fork` does (tui/commands.py), on a new branch
    id; checks the branch's end state. (seconds, seconds per step)."""
    from loopterm.core.creation import new_run_id
    from loopterm.core.engine import Engine
    from loopterm.core.fork import AncestorCalls, create_fork, plan_fork, rebuild_workspace

    steps: dict[str, float] = {}

    async def fork_and_run() -> Any:
        t = time.perf_counter()
        parent = store.get_run(run_id)
        plan = plan_fork(store, loop, parent, at, reason="bench")
        steps["plan_fork"] = time.perf_counter() - t
        t = time.perf_counter()
        branch_id = new_run_id()
        branch = create_fork(store, loop, plan, run_id=branch_id, workspace=root / "ws" / branch_id)
        store.update_run(branch.id, max_iterations=at + FORK_STEPS)
        branch = store.get_run(branch.id)
        steps["create_fork"] = time.perf_counter() - t
        t = time.perf_counter()
        await rebuild_workspace(loop, store, branch)
        steps["rebuild_workspace"] = time.perf_counter() - t
        t = time.perf_counter()
        child = Engine(loop, store, branch, client=InstantClient(), workdir=root, prior=AncestorCalls(store, branch))
        steps["engine_init"] = time.perf_counter() - t
        t = time.perf_counter()
        done = await child.run()
        steps["run_10"] = time.perf_counter() - t
        return done

    t0 = time.perf_counter()
    done = asyncio.run(fork_and_run())
    fork_s = time.perf_counter() - t0
    assert done.iterations == at + FORK_STEPS, done
    end_state = store.state_at(done.id, at + FORK_STEPS)
    assert end_state is not None and same(end_state, workload.expected(at + FORK_STEPS)), \
        f"{workload.name}: the fork did not continue from the state"
    return fork_s, steps


def loopterm_phase(workload: Workload, n: int, at: int, root: Path, repeats: int = 1) -> dict[str, Any]:
    from loopterm.store import Store

    baseline = rss_mb()
    db = root / "loopterm.db"
    loop, InstantClient, run, times, run_s = loopterm_run(workload, n, root, db)
    run_rss = rss_mb()

    sizes, method = table_bytes(db)
    state_tables = loopterm_state_bytes(db, sizes)

    # `repeats` times: open the store afresh, load the state at `at` (the first call, timed and
    # checked), then fork there on a new branch and run 10 iterations (timed and checked).
    expected = workload.expected(at)
    loads: list[float] = []
    load_times: list[float] = []
    forks: list[tuple[float, dict[str, float]]] = []
    for k in range(repeats):
        fresh = Store.open(db, create=False)
        try:
            t0 = time.perf_counter()
            state = fresh.state_at(run.id, at)
            loads.append(time.perf_counter() - t0)
            assert state is not None and same(state, expected), f"{workload.name}: wrong state at {at}"
            if k == 0:  # "load it again": the same store, warm
                for _ in range(LOAD_REPEATS):
                    t0 = time.perf_counter()
                    fresh.state_at(run.id, at)
                    load_times.append(time.perf_counter() - t0)
            forks.append(loopterm_fork(workload, loop, InstantClient, fresh, run.id, at, root))
        finally:
            fresh.close()

    return {
        "system": "loopterm", "workload": workload.name, "iterations": n, "at": at, "run_s": run_s,
        "times": times, "state_bytes": sum(state_tables.values()), "state_tables": state_tables, "all_tables": sizes,
        "bytes_method": method, "find_s": None, **repeated(loads, load_times, forks),
        "rss_baseline_mb": baseline, "rss_after_run_mb": run_rss, "rss_peak_mb": rss_mb(),
    }


def repeated(loads: list[float], load_times: list[float], forks: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    """The load and fork figures of a phase: medians (the keys timetravel.py reads) and every sample."""
    fork_samples = [f for f, _ in forks]
    return {
        "load_first_s": statistics.median(loads), "load_first_samples": loads,
        "load_median_s": statistics.median(load_times),
        "fork_s": statistics.median(fork_samples), "fork_samples": fork_samples,
        "fork_steps": {k: statistics.median(s[k] for _, s in forks) for k in forks[0][1]},
    }


def short_phase(system: str, workload: Workload, n: int, root: Path, durability: str = "sync") -> dict[str, Any]:
    """A short run on a new database: its intervals and the median of the 50 around iteration 100."""
    if system == "loopterm":
        *_, times, run_s = loopterm_run(workload, n, root, root / "loopterm.db")
    else:
        times, run_s = langgraph_run(workload, n, root / "langgraph.db", durability)[2:4]
    return {"system": "loopterm" if system == "loopterm" else "LangGraph", "workload": workload.name,
            "iterations": n, "times": times, "run_s": run_s, "early_ms": window(times, EARLY)}


def loopterm_state_bytes(db: Path, sizes: dict[str, int]) -> dict[str, int]:
    """The store's bytes for state: the `states` table (deltas and keyframes) and the state's share of `blobs`.

    `blobs` also holds prompt sections, so it is split by payload: the blobs the
    keyframes refer to (list chunks) against all blobs, applied to its dbstat bytes.
    This reads the store's schema v2 layout, so a store change may need it updated.
    """
    from loopterm.store.delta import keyframe_hashes
    from loopterm.store.delta import loads as delta_loads

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        chunks: set[str] = set()
        for (body,) in conn.execute("SELECT body FROM states WHERE keyframe = 1"):
            chunks.update(keyframe_hashes(delta_loads(body)))
        payload = dict(conn.execute("SELECT hash, length(hash) + length(CAST(body AS BLOB)) FROM blobs"))
    finally:
        conn.close()
    share = sum(payload[h] for h in chunks if h in payload) / max(1, sum(payload.values()))
    return {"states": sizes.get("states", 0), f"blobs (state chunks, {share:.1%} of it)": round(share * sizes.get("blobs", 0))}


# --------------------------------------------------------------------------- LangGraph


def langgraph_run(workload: Workload, n: int, db: Path, durability: str) -> tuple[Any, list[float], list[float], float]:
    """Run the workload for n steps on a new SqliteSaver at `db`. Returns a function that opens a fresh saver
    on `db` (giving the compiled graph and its connection), the node's entry times (later runs of such a
    graph append to them), the run's intervals and its seconds."""
    from typing import TypedDict

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph

    annotations = workload.langgraph_channels()
    annotations["stop_at"] = int  # where the conditional edge ends the loop (the fork moves it)
    State = TypedDict("State", annotations)  # type: ignore[misc]

    starts: list[float] = []

    def work(state: dict[str, Any]) -> dict[str, Any]:
        starts.append(time.perf_counter())
        if len(starts) % 1000 == 0:
            print(f"  LangGraph {workload.name}: step {len(starts)}", file=sys.stderr, flush=True)
        return workload.langgraph_update(state, state["step"] + 1)

    def route(state: dict[str, Any]) -> str:
        return END if state["step"] >= state["stop_at"] else "work"

    builder = StateGraph(State)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_conditional_edges("work", route, ["work", END])

    def graph() -> Any:
        conn = sqlite3.connect(db, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # the same journal mode as loopterm's store
        return builder.compile(checkpointer=SqliteSaver(conn)), conn

    g, conn = graph()
    began = time.perf_counter()
    g.invoke({**workload.initial(), "stop_at": n}, {**THREAD, "recursion_limit": n + 10}, durability=durability)
    ended = time.perf_counter()
    assert len(starts) == n, len(starts)
    conn.close()
    return graph, starts, intervals(starts, ended), ended - began


def langgraph_phase(workload: Workload, n: int, at: int, root: Path, durability: str,
                    repeats: int = 1) -> dict[str, Any]:
    baseline = rss_mb()
    db = root / "langgraph.db"
    graph, starts, times, run_s = langgraph_run(workload, n, db, durability)
    run_rss = rss_mb()

    sizes, method = table_bytes(db)
    state_tables = {t: b for t, b in sizes.items() if t in ("checkpoints", "writes", "(file)")}

    # Find the checkpoint of step `at` (metadata filter, evaluated in SQL), on a fresh saver.
    g, conn = graph()
    t0 = time.perf_counter()
    found = list(g.get_state_history(THREAD, filter={"step": at}))
    find_s = time.perf_counter() - t0
    assert len(found) == 1, f"{len(found)} checkpoints at step {at}"
    target = found[0].config
    conn.close()

    # `repeats` times, on another fresh saver each: load it (the first call, timed and checked), then
    # fork: update_state on that checkpoint (a new branch in the thread) and run 10 steps from it.
    expected = workload.expected(at)
    loads: list[float] = []
    load_times: list[float] = []
    forks: list[tuple[float, dict[str, float]]] = []
    for k in range(repeats):
        g, conn = graph()
        try:
            t0 = time.perf_counter()
            snapshot = g.get_state(target)
            loads.append(time.perf_counter() - t0)
            assert same(snapshot.values, expected), f"{workload.name}: wrong state at {at}"
            if k == 0:  # "load it again": the same saver, warm
                for _ in range(LOAD_REPEATS):
                    t0 = time.perf_counter()
                    g.get_state(target)
                    load_times.append(time.perf_counter() - t0)
            starts.clear()
            steps: dict[str, float] = {}
            t0 = time.perf_counter()
            branch = g.update_state(target, {"stop_at": at + FORK_STEPS})
            steps["update_state"] = time.perf_counter() - t0
            t = time.perf_counter()
            g.invoke(None, {**branch, "recursion_limit": FORK_STEPS + 10}, durability=durability)
            steps["invoke_10"] = time.perf_counter() - t
            forks.append((time.perf_counter() - t0, steps))
            assert len(starts) == FORK_STEPS, len(starts)
            latest = g.get_state(THREAD)  # the newest checkpoint of the thread: this fork's end
            assert same(latest.values, workload.expected(at + FORK_STEPS)), \
                f"{workload.name}: the fork did not continue from the checkpoint"
        finally:
            conn.close()

    return {
        "system": "LangGraph", "workload": workload.name, "iterations": n, "at": at, "run_s": run_s,
        "times": times, "state_bytes": sum(state_tables.values()), "state_tables": state_tables, "all_tables": sizes,
        "bytes_method": method, "find_s": find_s, **repeated(loads, load_times, forks),
        "rss_baseline_mb": baseline, "rss_after_run_mb": run_rss, "rss_peak_mb": rss_mb(),
    }


# --------------------------------------------------------------------------- driving a phase


def run_phase(system: str, workload: str, n: int, at: int, tmp: Path, durability: str = "sync", repeats: int = 1,
              short: bool = False, tag: str = "") -> dict[str, Any]:
    """Run one system on one workload in a fresh interpreter; its figures (the databases are deleted).

    `short`: only run n iterations on a new database (`short_phase`), no sizes, load or fork;
    `tag` keeps several such runs' directories apart.
    """
    name = f"{system}-{workload}{tag}"
    work = tmp / name
    work.mkdir()
    out = tmp / f"{name}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--system", system, "--workload", workload, "--n", str(n),
           "--at", str(at), "--workdir", str(work), "--out", str(out), "--durability", durability,
           "--repeats", str(repeats), *(["--short"] if short else [])]
    print(f"{system} {workload}: {n} iterations{' (short run)' if short else ''} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(work, ignore_errors=True)  # LangGraph's file can be gigabytes; free it before the next phase
    result = json.loads(out.read_text())
    out.unlink()
    return result


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.1f} s"


def size(b: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def ratio(lg: float | None, lt: float | None) -> str:
    if not lg or not lt:
        return "n/a"
    r = lg / lt
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x" if r >= 1 else f"{r:.2g}x"


def main() -> None:
    """The child's entry: one phase, its figures written as JSON to --out."""
    parser = argparse.ArgumentParser(description="one benchmark phase (run by timetravel.py and shapes.py)")
    parser.add_argument("--system", required=True, choices=["loopterm", "langgraph"])
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--at", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--durability", default="sync", choices=["sync", "async", "exit"])
    parser.add_argument("--repeats", type=int, default=1, help="loads on a fresh store and forks, each timed")
    parser.add_argument("--short", action="store_true", help="only the run, for its time per iteration at 100")
    args = parser.parse_args()
    workload, root = WORKLOADS[args.workload], Path(args.workdir)
    if args.short:
        result = short_phase(args.system, workload, args.n, root, args.durability)
    elif args.system == "loopterm":
        result = loopterm_phase(workload, args.n, args.at, root, args.repeats)
    else:
        result = langgraph_phase(workload, args.n, args.at, root, args.durability, args.repeats)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
