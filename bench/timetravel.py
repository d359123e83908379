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

The workload is bench/workloads.py's `list`, and the phases are bench/peers.py's, which
bench/shapes.py runs on the other state shapes too.

LangGraph's checkpoint grows with the list, so its database grows with the square of the run
length (about 10 GB at 10,000 iterations). The script checks free disk before it starts and
refuses, rather than shrinking the run on its own, when that would not fit.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import EARLY, FORK_STEPS, LOAD_REPEATS, WINDOW, ms, ratio, run_phase, size, window  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


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
    args = parser.parse_args()

    n_lt = args.iterations
    n_lg = args.langgraph_iterations or n_lt
    at_lt = args.at or n_lt // 2
    at_lg = min(at_lt, n_lg // 2) if n_lg < n_lt else at_lt
    if min(n_lt, n_lg) < EARLY + WINDOW or not (1 <= at_lt <= n_lt and 1 <= at_lg <= n_lg):
        parser.error(f"need at least {EARLY + WINDOW} iterations and 1 <= --at <= the run length")

    from importlib.metadata import version

    base = Path(args.tmpdir) if args.tmpdir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    need = WORKLOADS["list"].langgraph_disk(n_lg)  # LangGraph stores the whole list at every step
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
        lt = run_phase("loopterm", "list", n_lt, at_lt, tmp, args.durability)
        lg = run_phase("langgraph", "list", n_lg, at_lg, tmp, args.durability)
    print()
    print("\n".join(report(lt, lg)))
    print()
    for r in (lt, lg):
        tables = ", ".join(f"{t} {size(b)}" for t, b in sorted(r["all_tables"].items(), key=lambda kv: -kv[1]))
        print(f"{r['system']}: state tables {sorted(r['state_tables'])}; all tables: {tables}")
        print(f"{r['system']}: fork breakdown " + ", ".join(f"{k} {ms(v)}" for k, v in r["fork_steps"].items()))


if __name__ == "__main__":
    main()
