"""Time travel at 10,000 iterations: loopterm against LangGraph's SQLite checkpointer, same workload.

The workload, for both systems: a loop whose "model" answers at once (no network, no
litellm), a state of 20 scalar fields plus a list that grows by one 200-byte item per
iteration, run for 10,000 iterations with every iteration durable before the next.

  loopterm   the real engine (`Engine`) on the real store (`Store`, SQLite, each iteration
             committed), an in-process client answering instantly (as in engine_overhead.py),
             a no-op tool, no gates, stall detection off; the loop's own fields
             live on a `LoopState` subclass and `Loop.observe` appends the item.
  LangGraph  a `StateGraph` with one node looping to itself through a conditional edge that
             ends after N steps, compiled with `SqliteSaver` on a file (WAL, like loopterm's
             store), `durability="sync"` (each checkpoint written before the next step, like
             loopterm), `recursion_limit` raised, the list channel `Annotated[list, operator.add]`.

Measured, for each system:
  per-iteration time   start-to-start wall time of consecutive iterations (node entries for
                       LangGraph, `IterationStarted` events for loopterm); median of a 50-iteration
                       window around iteration 100 and of the last 50 iterations
  state bytes          on-disk bytes from SQLite's `dbstat` virtual table, per table (indexes
                       counted with their table), divided by the iterations run
  find                 LangGraph: `get_state_history(filter={"step": N})` on a fresh saver;
                       loopterm addresses an iteration by (run, n), there is nothing to find
  load                 loopterm: `Store.state_at(run, N)` on a freshly opened Store; LangGraph:
                       `graph.get_state(config with that checkpoint_id)` on a fresh saver
  fork + 10            loopterm: plan_fork + create_fork + max_iterations set to N+10 +
                       rebuild_workspace + Engine(...).run() for 10 iterations (what `loopterm fork`
                       does); LangGraph: update_state on the checkpoint + invoke(None) for 10 steps
  peak memory          ru_maxrss of the process that ran that system's phase: each system runs
                       in its own child process (a fresh interpreter), one after the other, so
                       neither's heap or high-water mark leaks into the other's figures

    python bench/timetravel.py [--iterations 10000] [--langgraph-iterations N]

LangGraph's checkpoint grows with the list, so its database grows with the square of the run
length (about 10 GB at 10,000 iterations). The script checks free disk before it starts and
refuses, rather than shrinking the run on its own, when that would not fit.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WINDOW = 50
EARLY = 100
FORK_STEPS = 10
ITEM_BYTES = 200
SCALARS = 20  # scalar fields of the workload's own state (two of them change each iteration)
LOAD_REPEATS = 5


def item(i: int) -> str:
    """The 200-byte item appended at iteration i (hex, so it does not compress away)."""
    text = f"item {i:06d} " + hashlib.sha256(str(i).encode()).hexdigest() * 4
    return text[:ITEM_BYTES]


def digest(i: int) -> str:
    return hashlib.sha256(f"checksum {i}".encode()).hexdigest()[:16]


def scalar_defaults() -> dict[str, Any]:
    """The 20 scalar fields and their starting values: `step` and `checksum` change every iteration."""
    values: dict[str, Any] = {"step": 0, "checksum": ""}
    for k in range(2, SCALARS):
        kind = k % 4
        values[f"f{k:02d}"] = [f"value {k}", k * 1000, k / 7, k % 2 == 0][kind]
    return values


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


# --------------------------------------------------------------------------- loopterm


def loopterm_phase(n: int, at: int, root: Path) -> dict[str, Any]:
    from pydantic import Field, create_model

    from loopterm.core import AppendLog, Loop, LoopState, tool
    from loopterm.core.creation import new_run_id
    from loopterm.core.engine import Engine
    from loopterm.core.events import IterationStarted
    from loopterm.core.fork import AncestorCalls, create_fork, plan_fork, rebuild_workspace
    from loopterm.core.model import ModelReply
    from loopterm.store import Store

    baseline = rss_mb()
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

    fields: dict[str, Any] = {name: (type(value), value) for name, value in scalar_defaults().items()}
    # The growing list as loopterm's idiom for it, an AppendLog (as LangGraph's is a reducer, operator.add):
    # appending is O(1) and the engine knows the old list is a prefix without comparing them.
    BenchState = create_model("BenchState", __base__=LoopState, items=(AppendLog[str], Field(default_factory=AppendLog)), **fields)

    def observe(state: Any, decision: Any, tool_record: Any, gates: Any) -> Any:
        i = state.iteration
        return state.model_copy(update={"step": i, "checksum": digest(i), "items": state.items.appended(item(i))})

    loop = Loop(name="timetravel", goal="grow the list", state=BenchState, tools=[noop], model="instant/bench",
                max_iterations=n, stall_window=None, observe=observe)
    db = root / "loopterm.db"
    store = Store.open(db)
    engine = Engine.create(loop, store, loop_ref="bench/timetravel.py:loop", workspace_root=root / "ws",
                           workdir=root, client=InstantClient())
    starts: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, IterationStarted):
            starts.append(time.perf_counter())
            if len(starts) % 1000 == 0:
                print(f"  loopterm: iteration {len(starts)}", file=sys.stderr, flush=True)

    engine.subscribe(on_event)
    began = time.perf_counter()
    run = asyncio.run(engine.run())
    ended = time.perf_counter()
    assert run.iterations == n, run
    times = intervals(starts, ended)
    store.close()
    run_rss = rss_mb()

    sizes, method = table_bytes(db)
    state_tables = loopterm_state_bytes(db, sizes)

    # Load the state at `at` from a freshly opened Store.
    fresh = Store.open(db, create=False)
    t0 = time.perf_counter()
    state = fresh.state_at(run.id, at)
    load_first = time.perf_counter() - t0
    assert state is not None and len(state["items"]) == at and state["items"][-1] == item(at), "wrong state"
    load_times = []
    for _ in range(LOAD_REPEATS):
        t0 = time.perf_counter()
        fresh.state_at(run.id, at)
        load_times.append(time.perf_counter() - t0)

    # Fork at `at` and run 10 iterations, the way `loopterm fork` does (tui/commands.py).
    steps: dict[str, float] = {}

    async def fork_and_run() -> Any:
        t = time.perf_counter()
        parent = fresh.get_run(run.id)
        plan = plan_fork(fresh, loop, parent, at, reason="bench")
        steps["plan_fork"] = time.perf_counter() - t
        t = time.perf_counter()
        branch_id = new_run_id()
        branch = create_fork(fresh, loop, plan, run_id=branch_id, workspace=root / "ws" / branch_id)
        fresh.update_run(branch.id, max_iterations=at + FORK_STEPS)
        branch = fresh.get_run(branch.id)
        steps["create_fork"] = time.perf_counter() - t
        t = time.perf_counter()
        await rebuild_workspace(loop, fresh, branch)
        steps["rebuild_workspace"] = time.perf_counter() - t
        t = time.perf_counter()
        child = Engine(loop, fresh, branch, client=InstantClient(), workdir=root, prior=AncestorCalls(fresh, branch))
        steps["engine_init"] = time.perf_counter() - t
        t = time.perf_counter()
        done = await child.run()
        steps["run_10"] = time.perf_counter() - t
        return done

    t0 = time.perf_counter()
    done = asyncio.run(fork_and_run())
    fork_s = time.perf_counter() - t0
    assert done.iterations == at + FORK_STEPS, done
    end_state = fresh.state_at(done.id, at + FORK_STEPS)
    assert end_state is not None and len(end_state["items"]) == at + FORK_STEPS, "fork did not continue from the state"
    fresh.close()

    return {
        "system": "loopterm", "iterations": n, "at": at, "run_s": ended - began, "times": times,
        "state_bytes": sum(state_tables.values()), "state_tables": state_tables, "all_tables": sizes,
        "bytes_method": method, "find_s": None, "load_first_s": load_first,
        "load_median_s": statistics.median(load_times), "fork_s": fork_s, "fork_steps": steps,
        "rss_baseline_mb": baseline, "rss_after_run_mb": run_rss, "rss_peak_mb": rss_mb(),
    }


def loopterm_state_bytes(db: Path, sizes: dict[str, int]) -> dict[str, int]:
    """The store's bytes for state: the `states` table (deltas and keyframes) and the state's share of `blobs`.

    `blobs` also holds prompt sections, so it is split by payload: the blobs the
    keyframes refer to (list chunks) against all blobs, applied to its dbstat bytes.
    """
    from loopterm.store.delta import keyframe_hashes

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        chunks: set[str] = set()
        for (body,) in conn.execute("SELECT body FROM states WHERE keyframe = 1"):
            chunks.update(keyframe_hashes(json.loads(body)))
        payload = dict(conn.execute("SELECT hash, length(hash) + length(CAST(body AS BLOB)) FROM blobs"))
    finally:
        conn.close()
    share = sum(payload[h] for h in chunks if h in payload) / max(1, sum(payload.values()))
    return {"states": sizes.get("states", 0), f"blobs (state chunks, {share:.1%} of it)": round(share * sizes.get("blobs", 0))}


# --------------------------------------------------------------------------- LangGraph


def langgraph_phase(n: int, at: int, root: Path, durability: str) -> dict[str, Any]:
    import operator
    from typing import Annotated, TypedDict

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph

    baseline = rss_mb()
    annotations: dict[str, Any] = {name: type(value) for name, value in scalar_defaults().items()}
    annotations["stop_at"] = int  # where the conditional edge ends the loop (the fork moves it)
    annotations["items"] = Annotated[list[str], operator.add]
    State = TypedDict("State", annotations)  # type: ignore[misc]

    starts: list[float] = []

    def work(state: dict[str, Any]) -> dict[str, Any]:
        starts.append(time.perf_counter())
        if len(starts) % 1000 == 0:
            print(f"  LangGraph: step {len(starts)}", file=sys.stderr, flush=True)
        i = state["step"] + 1
        return {"step": i, "checksum": digest(i), "items": [item(i)]}

    def route(state: dict[str, Any]) -> str:
        return END if state["step"] >= state["stop_at"] else "work"

    builder = StateGraph(State)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_conditional_edges("work", route, ["work", END])

    db = root / "langgraph.db"

    def graph() -> Any:
        conn = sqlite3.connect(db, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # the same journal mode as loopterm's store
        return builder.compile(checkpointer=SqliteSaver(conn)), conn

    thread = {"configurable": {"thread_id": "bench"}}
    g, conn = graph()
    began = time.perf_counter()
    g.invoke({**scalar_defaults(), "stop_at": n, "items": []}, {**thread, "recursion_limit": n + 10},
             durability=durability)
    ended = time.perf_counter()
    assert len(starts) == n, len(starts)
    times = intervals(starts, ended)
    conn.close()
    run_rss = rss_mb()

    sizes, method = table_bytes(db)
    state_tables = {t: b for t, b in sizes.items() if t in ("checkpoints", "writes", "(file)")}

    # Find the checkpoint of step `at` (metadata filter, evaluated in SQL), on a fresh saver.
    g, conn = graph()
    t0 = time.perf_counter()
    found = list(g.get_state_history(thread, filter={"step": at}))
    find_s = time.perf_counter() - t0
    assert len(found) == 1, f"{len(found)} checkpoints at step {at}"
    target = found[0].config
    conn.close()

    # Load it on another fresh saver.
    g, conn = graph()
    t0 = time.perf_counter()
    snapshot = g.get_state(target)
    load_first = time.perf_counter() - t0
    assert len(snapshot.values["items"]) == at and snapshot.values["items"][-1] == item(at), "wrong state"
    load_times = []
    for _ in range(LOAD_REPEATS):
        t0 = time.perf_counter()
        g.get_state(target)
        load_times.append(time.perf_counter() - t0)

    # Fork: update_state on that checkpoint (a new branch in the thread), then run 10 steps from it.
    starts.clear()
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    branch = g.update_state(target, {"stop_at": at + FORK_STEPS})
    steps["update_state"] = time.perf_counter() - t0
    t = time.perf_counter()
    g.invoke(None, {**branch, "recursion_limit": FORK_STEPS + 10}, durability=durability)
    steps["invoke_10"] = time.perf_counter() - t
    fork_s = time.perf_counter() - t0
    assert len(starts) == FORK_STEPS, len(starts)
    latest = g.get_state(thread)
    assert len(latest.values["items"]) == at + FORK_STEPS, "fork did not continue from the checkpoint"
    conn.close()

    return {
        "system": "LangGraph", "iterations": n, "at": at, "run_s": ended - began, "times": times,
        "state_bytes": sum(state_tables.values()), "state_tables": state_tables, "all_tables": sizes,
        "bytes_method": method, "find_s": find_s, "load_first_s": load_first,
        "load_median_s": statistics.median(load_times), "fork_s": fork_s, "fork_steps": steps,
        "rss_baseline_mb": baseline, "rss_after_run_mb": run_rss, "rss_peak_mb": rss_mb(),
    }


# --------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    root = Path(args.workdir)
    if args.phase == "loopterm":
        result = loopterm_phase(args.n, args.at, root)
    else:
        result = langgraph_phase(args.n, args.at, root, args.durability)
    Path(args.out).write_text(json.dumps(result))


def run_phase(phase: str, n: int, at: int, tmp: Path, durability: str) -> dict[str, Any]:
    work = tmp / phase
    work.mkdir()
    out = tmp / f"{phase}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--n", str(n), "--at", str(at),
           "--workdir", str(work), "--out", str(out), "--durability", durability]
    print(f"{phase}: {n} iterations ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(work, ignore_errors=True)  # LangGraph's file is gigabytes; free it before the next phase
    return json.loads(out.read_text())


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


def report(lt: dict[str, Any], lg: dict[str, Any]) -> list[str]:
    n_lt, n_lg = lt["iterations"], lg["iterations"]
    lt_early, lg_early = window(lt["times"], EARLY), window(lg["times"], EARLY)
    lt_late, lg_late = window(lt["times"], n_lt), window(lg["times"], n_lg)
    lt_state, lg_state = lt["state_bytes"] / n_lt, lg["state_bytes"] / n_lg
    lt_db, lg_db = sum(lt["all_tables"].values()) / n_lt, sum(lg["all_tables"].values()) / n_lg
    same_n = n_lt == n_lg
    at_lt, at_lg = lt["at"], lg["at"]
    late = f"iteration {n_lt:,}" if same_n else f"the last iteration (loopterm {n_lt:,}, LangGraph {n_lg:,})"
    at = f"{at_lt:,}" if at_lt == at_lg else f"loopterm {at_lt:,}, LangGraph {at_lg:,}"
    flat = lt_late / lt_early
    rows = [
        ("ms per iteration at iteration 100 (median of 50)", f"{lt_early:.2f}", f"{lg_early:.2f}",
         ratio(lg_early, lt_early), ""),
        (f"ms per iteration at {late} (median of last 50)", f"{lt_late:.2f}", f"{lg_late:.2f}",
         ratio(lg_late, lt_late), _met(lg_late / lt_late >= 5, ">= 5x lower than LangGraph")),
        ("growth: late / iteration 100", f"{flat:.2f}x", f"{lg_late / lg_early:.2f}x", "",
         _met(flat <= 1.2, "flat (<= 1.2x)")),
        (f"state bytes stored per iteration ({lt['bytes_method']})", size(lt_state), size(lg_state),
         ratio(lg_state, lt_state), _met(lt_state < 1000, "< 1 KB")),
        ("whole database bytes per iteration (context)", size(lt_db), size(lg_db), ratio(lg_db, lt_db), ""),
        (f"find the checkpoint of iteration {at}", "not needed (run, n)", ms(lg["find_s"]), "", ""),
        (f"load the state at iteration {at} (fresh store, first call)", ms(lt["load_first_s"]),
         ms(lg["load_first_s"]), ratio(lg["load_first_s"], lt["load_first_s"]), _met(lt["load_first_s"] < 0.005, "< 5 ms")),
        (f"load it again (median of {LOAD_REPEATS})", ms(lt["load_median_s"]), ms(lg["load_median_s"]),
         ratio(lg["load_median_s"], lt["load_median_s"]), ""),
        (f"fork at {at} + {FORK_STEPS} iterations", ms(lt["fork_s"]), ms(lg["fork_s"]),
         ratio(lg["fork_s"], lt["fork_s"]), _met(lt["fork_s"] < 0.05, "< 50 ms")),
        ("RSS after the run (before load and fork)", f"{lt['rss_after_run_mb']:.0f} MB", f"{lg['rss_after_run_mb']:.0f} MB",
         ratio(lg["rss_after_run_mb"], lt["rss_after_run_mb"]), ""),
        ("peak RSS of the phase (run, load, fork)", f"{lt['rss_peak_mb']:.0f} MB", f"{lg['rss_peak_mb']:.0f} MB",
         ratio(lg["rss_peak_mb"], lt["rss_peak_mb"]), ""),
        ("  of which above the interpreter + imports", f"{lt['rss_peak_mb'] - lt['rss_baseline_mb']:.0f} MB",
         f"{lg['rss_peak_mb'] - lg['rss_baseline_mb']:.0f} MB", "", ""),
        ("wall time of the whole run", f"{lt['run_s']:.1f} s", f"{lg['run_s']:.1f} s", ratio(lg["run_s"], lt["run_s"]), ""),
    ]
    lines = ["| measure | loopterm | LangGraph | ratio (LangGraph / loopterm) | loopterm target |",
             "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return lines


def _met(ok: bool, target: str) -> str:
    return f"{target}: {'met' if ok else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10_000, help="loopterm's run length (default 10000)")
    parser.add_argument("--langgraph-iterations", type=int, default=None,
                        help="LangGraph's run length (default: the same as --iterations)")
    parser.add_argument("--at", type=int, default=None, help="the iteration to load and fork at (default: half the run)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async", "exit"],
                        help="LangGraph's durability mode (default sync: each checkpoint written before the next step)")
    parser.add_argument("--tmpdir", default=None, help="where the databases go (default: the system temp dir)")
    # internal: one system's phase in a child process
    parser.add_argument("--phase", choices=["loopterm", "langgraph"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child(args)
        return

    n_lt = args.iterations
    n_lg = args.langgraph_iterations or n_lt
    at_lt = args.at or n_lt // 2
    at_lg = min(at_lt, n_lg // 2) if n_lg < n_lt else at_lt
    if min(n_lt, n_lg) < EARLY + WINDOW or not (1 <= at_lt <= n_lt and 1 <= at_lg <= n_lg):
        parser.error(f"need at least {EARLY + WINDOW} iterations and 1 <= --at <= the run length")

    from importlib.metadata import version

    base = Path(args.tmpdir) if args.tmpdir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    need = 1.2 * (ITEM_BYTES + 6) * n_lg * n_lg / 2  # LangGraph stores the whole list at every step
    if need > 0.8 * free:
        sys.exit(f"LangGraph at {n_lg:,} iterations needs about {size(need)} of disk in {base} "
                 f"({size(free)} free): pass a smaller --langgraph-iterations (and report it as such) or --tmpdir")

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, "
          f"{platform.platform()}; {size(free)} free in {base}")
    print(f"langgraph {version('langgraph')}, langgraph-checkpoint {version('langgraph-checkpoint')}, "
          f"langgraph-checkpoint-sqlite {version('langgraph-checkpoint-sqlite')}; SqliteSaver, WAL, "
          f"durability={args.durability}")
    if n_lg != n_lt:
        print(f"NOTE: LangGraph ran {n_lg:,} iterations, not {n_lt:,} (--langgraph-iterations); its late figures are at "
              f"iteration {n_lg:,} and its load/fork at {at_lg:,}. Nothing is extrapolated.")
    with tempfile.TemporaryDirectory(prefix="timetravel-", dir=base) as d:
        tmp = Path(d)
        lt = run_phase("loopterm", n_lt, at_lt, tmp, args.durability)
        lg = run_phase("langgraph", n_lg, at_lg, tmp, args.durability)
    print()
    print("\n".join(report(lt, lg)))
    print()
    for r in (lt, lg):
        tables = ", ".join(f"{t} {size(b)}" for t, b in sorted(r["all_tables"].items(), key=lambda kv: -kv[1]))
        print(f"{r['system']}: state tables {sorted(r['state_tables'])}; all tables: {tables}")
        print(f"{r['system']}: fork breakdown " + ", ".join(f"{k} {ms(v)}" for k, v in r["fork_steps"].items()))


if __name__ == "__main__":
    main()
