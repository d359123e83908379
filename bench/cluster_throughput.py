"""Throughput of N scripted runs on one `loopterm worker` against two, in one run (the ratio is the figure).

    python bench/cluster_throughput.py                      # 12 runs, 2 segments per worker, 0.2 s per reply
    python bench/cluster_throughput.py --runs 24 --concurrency 3 --delay 0.3 --json
    python bench/cluster_throughput.py --db postgresql://me@host/empty_db   # a server of your own (emptied)

A real PostgreSQL (started in a temporary folder unless --db names one) holds the store and the queues;
each configuration gets a fresh database. The workers are real `loopterm worker` processes; the runs are
recorded and queued from this process (the code `loopterm run --submit` runs: core/queues.py), all at once,
once every worker has said it is up. The scripted model answers each turn after --delay seconds, which
stands for a provider's latency: a worker waits on it, it does not compute. Timed: from the first enqueue to
the last run converged (read from the store). Each worker runs --concurrency segments at once, so the
runs go through 1 worker in about N / concurrency rounds and through 2 in half as many.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOP = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, tool

@tool
def note(line: str) -> str:
    """Note a line."""
    return "noted " + line

loop = Loop(name="paced", goal="note {n} lines", state=LoopState, tools=[note],
            script=Path(__file__).parent / "script.json", max_iterations={n} + 2,
            converged=lambda state, gates: state.iteration >= {n})
'''


def write_loop(folder: Path, iterations: int, delay: float) -> Path:
    (folder / "paced.py").write_text(LOOP.replace("{n}", str(iterations)))
    turns = [{"content": {"action": {"tool": "note", "args": {"line": f"line {i}"}}, "subgoal": f"line {i}",
                          "confidence": 0.9, "reasoning": "the next line"}, "delay": delay}
             for i in range(1, iterations + 3)]
    (folder / "script.json").write_text(json.dumps({"turns": turns}))
    return folder / "paced.py"


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPTERM_")}
    return {**base, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def start_workers(url: str, folder: Path, count: int, concurrency: int) -> list[subprocess.Popen[str]]:
    workers = []
    for i in range(count):
        out = (folder / f"worker{i}.out").open("w")
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "loopterm.tui.cli", "worker", "--db", url, "--id", f"bench-{i}",
             "--concurrency", str(concurrency)], cwd=folder, env=env(), stdout=out, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(" up to " in (folder / f"worker{i}.out").read_text() for i in range(count)):
            return workers
        time.sleep(0.1)
    raise SystemExit("workers did not start: " + (folder / "worker0.out").read_text())


def stop(workers: list[subprocess.Popen[str]]) -> None:
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
    for proc in workers:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one(url: str, folder: Path, workers_n: int, runs: int, concurrency: int, loop_file: Path) -> dict[str, Any]:
    from loopterm.core.creation import new_run, new_run_id
    from loopterm.core.loader import load_loop
    from loopterm.core.queues import Queues
    from loopterm.store import Store

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    loop, ref = load_loop(str(loop_file))
    workers = start_workers(url, folder, workers_n, concurrency)
    try:
        ids = []
        with Queues(url) as queues, Store.open(url) as store:
            began = time.monotonic()
            for _ in range(runs):
                run_id = new_run_id()
                new_run(loop, store, loop_ref=ref, model=loop.model, run_id=run_id,
                        workspace=folder / "workspaces" / run_id)
                queues.enqueue(run_id, loop.model, "start")
                ids.append(run_id)
            while True:
                statuses = [store.get_run(r).status for r in ids]
                if all(s == "converged" for s in statuses):
                    break
                bad = [s for s in statuses if s in ("failed", "terminated", "stopped", "escalated")]
                if bad:
                    raise SystemExit(f"a run did not converge: {bad}")
                time.sleep(0.05)
            wall = time.monotonic() - began
            iterations = sum(store.get_run(r).iterations for r in ids)
    finally:
        stop(workers)
    return {"workers": workers_n, "runs": runs, "concurrency_per_worker": concurrency, "wall_s": round(wall, 2),
            "runs_per_s": round(runs / wall, 3), "iterations": iterations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=4, help="iterations per run")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the scripted model takes per reply")
    parser.add_argument("--concurrency", type=int, default=2, help="segments per worker at once")
    parser.add_argument("--db", help="a PostgreSQL URL of your own (its database is used as it is, twice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    if args.db is None:
        from tests.pgserver import start_server

        server = start_server()
    try:
        results = []
        for count in (1, 2):
            url = args.db or server.fresh_database()  # type: ignore[union-attr]
            with tempfile.TemporaryDirectory(prefix="loopterm-bench-") as scratch:
                folder = Path(scratch)
                loop_file = write_loop(folder, args.iterations, args.delay)
                results.append(one(url, folder, count, args.runs, args.concurrency, loop_file))
    finally:
        if server is not None:
            server.stop()
    ratio = round(results[0]["wall_s"] / results[1]["wall_s"], 2)
    report = {"results": results, "speedup_2_over_1": ratio, "delay_s": args.delay, "iterations_per_run": args.iterations}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.runs} scripted runs x {args.iterations} iterations, {args.delay:g} s per reply, "
          f"{args.concurrency} segments per worker")
    for r in results:
        print(f"  {r['workers']} worker(s): {r['wall_s']:.2f} s  ({r['runs_per_s']:.2f} runs/s)")
    print(f"  two workers against one: {ratio:.2f}x")


if __name__ == "__main__":
    main()
