"""loopterm against LangGraph's SQLite checkpointer on every state shape: one command, one table (issue 15).

    python bench/shapes.py [--iterations 10000] [--workloads list,nested,chat] [--langgraph-iterations N]
                           [--repeats 5]

For each workload of bench/workloads.py (list: 20 scalars + a list growing by a 200-byte item per
iteration; nested: 200 records of 5 fields, 5 rewritten per iteration; chat: a transcript of
200-600-character messages, +1-2 per iteration, pruned every 8), each system runs in its own child
process (bench/peers.py says how: the real Engine + Store against a StateGraph on SqliteSaver,
WAL, durability="sync", every iteration durable before the next), one phase after the other.
The table gives per workload and system: ms per iteration around iteration 100 and over the
last 50, their ratio (flatness), state bytes per iteration (dbstat), the load of the state at N/2
on a fresh store, the fork at N/2 + 10 iterations, and LangGraph / loopterm, with the issue's
targets for loopterm marked met or NOT met.

Both systems swing 20-40% from run to run on a shared machine, so the figures the targets judge
are medians of R samples (--repeats, default 5), printed with their range (min-max): the time per
iteration at 100 comes from R short runs of 200 iterations per system, each in its own process on a
new database, alternating loopterm and LangGraph so that drift in the machine hits both alike (each
run gives the median of the 50 intervals around iteration 100; the long run's own figure is kept as
context and for the growth ratio); the first load of the state at N/2 and the fork at N/2 + 10 are
repeated R times in each long phase, each on a freshly opened store or saver (a new branch each
time). A default full run took 3.3 minutes on 2 cores (2026-12-08), of which the repeats are about
40 s (the 30 short runs' child processes, about 1 s each); see bench/README.md.

LangGraph's growing-list database grows with the square of the run (about 10 GB at 10,000): the
free disk is checked first, and `--langgraph-iterations` runs LangGraph shorter on every
workload, which the table then says. Nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import EARLY, FORK_STEPS, LOAD_REPEATS, SHORT, WINDOW, ms, ratio, run_phase, size, window  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

# The targets for loopterm.
SPEEDUP = 2.0  # engine + store at most half of LangGraph's time at iteration 100; fork + 10 likewise
FLAT = 1.1  # last 50 / around iteration 100
LIST_MS = 0.4  # ms per iteration on the growing list
STATE_BYTES = 1000  # state bytes per iteration, every workload


def met(ok: bool, target: str) -> str:
    return f"{target}: {'met' if ok else '**NOT met**'}"


def spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    """The median of some samples with their range, compactly: "0.75 (0.70-0.82)"; a lone sample alone."""
    med, lo, hi = (scale * x for x in (statistics.median(values), min(values), max(values)))
    if scale == 1e3 and med >= 1000:  # seconds
        return spread(values, 1.0, " s")
    digits = 1 if med >= 100 else 2
    head = f"{med:.{digits}f}{unit}"
    return head if len(values) == 1 else f"{head} ({lo:.{digits}f}-{hi:.{digits}f})"


def rows(lt: dict[str, Any], lg: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The table rows of one workload: (measure, loopterm, LangGraph, LangGraph / loopterm, target)."""
    n_lt, n_lg = lt["iterations"], lg["iterations"]
    is_list = lt["workload"] == "list"
    short_lt, short_lg = lt["early_short_ms"], lg["early_short_ms"]
    early_lt, early_lg = statistics.median(short_lt), statistics.median(short_lg)
    long_lt, long_lg = window(lt["times"], EARLY), window(lg["times"], EARLY)
    late_lt, late_lg = window(lt["times"], n_lt), window(lg["times"], n_lg)
    flat_lt, flat_lg = late_lt / long_lt, late_lg / long_lg
    mean_lt, mean_lg = lt["run_s"] / n_lt * 1e3, lg["run_s"] / n_lg * 1e3
    state_lt, state_lg = lt["state_bytes"] / n_lt, lg["state_bytes"] / n_lg
    db_lt, db_lg = sum(lt["all_tables"].values()) / n_lt, sum(lg["all_tables"].values()) / n_lg
    end = f"{n_lt:,}" if n_lt == n_lg else f"the end (loopterm {n_lt:,}, LangGraph {n_lg:,})"
    at = f"{lt['at']:,}" if lt["at"] == lg["at"] else f"loopterm {lt['at']:,}, LangGraph {lg['at']:,}"
    early_target = [met(early_lg / early_lt >= SPEEDUP, f"ratio >= {SPEEDUP:g}")]
    late_target = []
    if is_list:
        early_target.append(met(early_lt <= LIST_MS, f"<= {LIST_MS} ms"))
        late_target.append(met(late_lt <= LIST_MS, f"<= {LIST_MS} ms"))
    runs = len(short_lt) if len(short_lt) == len(short_lg) else f"{len(short_lt)} / {len(short_lg)}"
    load_lt, load_lg = lt["load_first_s"], lg["load_first_s"]
    loads = len(lt["load_first_samples"])
    forks = len(lt["fork_samples"])
    return [
        (f"ms/iteration at 100: median of {runs} short runs (each the median of {WINDOW} around 100)",
         spread(short_lt), spread(short_lg), ratio(early_lg, early_lt), "; ".join(early_target)),
        (f"ms/iteration at 100 in the long run (median of {WINDOW}, one sample)", f"{long_lt:.2f}", f"{long_lg:.2f}",
         ratio(long_lg, long_lt), ""),
        (f"ms/iteration at {end} (median of last {WINDOW})", f"{late_lt:.2f}", f"{late_lg:.2f}",
         ratio(late_lg, late_lt), "; ".join(late_target)),
        ("ms/iteration, mean of the whole run", f"{mean_lt:.2f}", f"{mean_lg:.2f}", ratio(mean_lg, mean_lt), ""),
        ("growth: last / at 100 (the long run)", f"{flat_lt:.2f}x", f"{flat_lg:.2f}x", "",
         met(flat_lt <= FLAT, f"<= {FLAT}")),
        (f"state bytes per iteration ({lt['bytes_method']})", size(state_lt), size(state_lg), ratio(state_lg, state_lt),
         met(state_lt <= STATE_BYTES, "<= 1 KB")),
        ("whole database per iteration (context)", size(db_lt), size(db_lg), ratio(db_lg, db_lt), ""),
        (f"find the checkpoint of {at}", "(run, n)", ms(lg["find_s"]), "", ""),
        (f"load the state at {at}, ms (fresh store, first call; median of {loads})",
         spread(lt["load_first_samples"], 1e3), spread(lg["load_first_samples"], 1e3), ratio(load_lg, load_lt),
         met(load_lt <= load_lg, "no slower than LangGraph")),
        (f"load it again (median of {LOAD_REPEATS})", ms(lt["load_median_s"]), ms(lg["load_median_s"]),
         ratio(lg["load_median_s"], lt["load_median_s"]), ""),
        (f"fork at {at} + {FORK_STEPS} iterations, ms (median of {forks})", spread(lt["fork_samples"], 1e3),
         spread(lg["fork_samples"], 1e3), ratio(lg["fork_s"], lt["fork_s"]),
         met(lg["fork_s"] / lt["fork_s"] >= SPEEDUP, f"ratio >= {SPEEDUP:g}")),
        ("peak RSS of the phase", f"{lt['rss_peak_mb']:.0f} MB", f"{lg['rss_peak_mb']:.0f} MB",
         ratio(lg["rss_peak_mb"], lt["rss_peak_mb"]), ""),
        ("wall time of the run", ms(lt["run_s"]), ms(lg["run_s"]), ratio(lg["run_s"], lt["run_s"]), ""),
    ]


LEGEND = (f"A figure with a range in brackets is the median of its samples (min-max); the targets and the ratios use "
          f"the medians. ms/iteration at 100: {SHORT}-iteration runs, each in its own process on a new database, "
          "loopterm and LangGraph alternating; the long run's own figure at 100 is one sample, kept for context and "
          "for the growth ratio. Load and fork: each sample on a freshly opened store or saver, each fork a new "
          "branch from the same checkpoint.")


def table(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """One markdown table, every workload's rows under its name."""
    lines = ["| workload | measure | loopterm | LangGraph | LangGraph / loopterm | loopterm target |",
             "|---|---|---|---|---|---|"]
    for lt, lg in results:
        for k, row in enumerate(rows(lt, lg)):
            name = f"**{lt['workload']}**" if k == 0 else ""
            lines.append(f"| {name} | {' | '.join(row)} |")
    return lines


def fsync_probe(where: Path, commits: int = 40) -> float:
    """Median ms of a one-row synchronous=FULL commit in WAL mode, next to the databases.

    On a shared machine the disk's flush latency moves from minute to minute and bounds
    both systems' per-iteration time (each makes every iteration durable), so each phase
    is printed with the latency measured just before it.
    """
    path = where / "probe.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (x TEXT)")
        times = []
        for _ in range(commits):
            t0 = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (?)", ("x" * 500,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return statistics.median(times) * 1e3


def commit() -> str:
    """The checked-out commit, so a table says what code it measured."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs %s"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, check=True).stdout.strip()
        return out[:100]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10_000, help="loopterm's run length (default 10000)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--langgraph-iterations", type=int, default=None,
                        help="LangGraph's run length on every workload (default: the same as --iterations)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async", "exit"],
                        help="LangGraph's durability mode (default sync: each checkpoint written before the next step)")
    parser.add_argument("--tmpdir", default=None, help="where the databases go (default: the system temp dir)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="samples per system of the time at 100 (short runs), the first load and the fork (default 5)")
    args = parser.parse_args()

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        parser.error(f"unknown workload(s) {unknown}: choose from {', '.join(WORKLOADS)}")
    n_lt = args.iterations
    n_lg = args.langgraph_iterations or n_lt
    at_lt = n_lt // 2
    at_lg = min(at_lt, n_lg // 2)
    if min(n_lt, n_lg) < EARLY + WINDOW:
        parser.error(f"need at least {EARLY + WINDOW} iterations")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from importlib.metadata import version

    base = Path(args.tmpdir) if args.tmpdir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    need = max(WORKLOADS[w].langgraph_disk(n_lg) for w in names)  # each phase's database is deleted after it
    if need > 0.8 * free:
        sys.exit(f"LangGraph at {n_lg:,} iterations needs about {size(need)} of disk in {base} "
                 f"({size(free)} free): pass a smaller --langgraph-iterations (and report it as such) or --tmpdir")

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    began = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="shapes-", dir=base) as d:
        tmp = Path(d)
        for name in names:
            probe = fsync_probe(tmp)
            lt = run_phase("loopterm", name, n_lt, at_lt, tmp, args.durability, args.repeats)
            lt["fsync_probe_ms"] = probe
            probe = fsync_probe(tmp)
            lg = run_phase("langgraph", name, n_lg, at_lg, tmp, args.durability, args.repeats)
            lg["fsync_probe_ms"] = probe
            lt["early_short_ms"], lg["early_short_ms"] = [], []
            for k in range(args.repeats):  # alternating, so drift in the machine hits both alike
                for r in (lt, lg):
                    short = run_phase(r["system"].lower(), name, SHORT, 0, tmp, args.durability, short=True,
                                      tag=f"-short{k}")
                    r["early_short_ms"].append(short["early_ms"])
            results.append((lt, lg))
    load_after = os.getloadavg()
    took = time.perf_counter() - began

    print(f"date: {started}; commit: {commit()}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, "
          f"{platform.platform()}")
    print("load average (1, 5, 15 min): before " + ", ".join(f"{x:.2f}" for x in load_before)
          + "; after " + ", ".join(f"{x:.2f}" for x in load_after))
    print(f"loopterm {version('loopterm')}, pydantic {version('pydantic')}; langgraph {version('langgraph')}, "
          f"langgraph-checkpoint {version('langgraph-checkpoint')}, langgraph-checkpoint-sqlite "
          f"{version('langgraph-checkpoint-sqlite')} (SqliteSaver, WAL, durability={args.durability})")
    print(f"iterations: loopterm {n_lt:,}, LangGraph {n_lg:,}" + ("" if n_lg == n_lt else
          f" (--langgraph-iterations: LangGraph's end figures are at {n_lg:,}, its load and fork at {at_lg:,}; "
          "nothing is extrapolated)"))
    print(f"repeats: {args.repeats}; the whole command took {took / 60:.1f} min")
    print()
    print("\n".join(table(results)))
    print()
    print(LEGEND)
    print()
    for lt, lg in results:
        for r in (lt, lg):
            tables = ", ".join(f"{t} {size(b)}" for t, b in sorted(r["all_tables"].items(), key=lambda kv: -kv[1])[:5])
            print(f"{r['workload']} {r['system']}: FULL commit {r['fsync_probe_ms']:.2f} ms just before; state {', '.join(f'{t} {size(b)}' for t, b in r['state_tables'].items())}; "
                  f"largest tables {tables}; fork (medians) " + ", ".join(f"{k} {ms(v)}" for k, v in r["fork_steps"].items()))


if __name__ == "__main__":
    main()
