"""State storage at scale: the real Store, synthetic iterations, no engine.

Workload (issue 3): a state of 20 scalar fields plus a list that grows by one
~200-byte item per iteration, committed with `Store.commit_iteration` for
10,000 iterations. Each commit gets a new state dict holding a list the bench
appends to in place (as a caller's own object, never the store's), so the
store's diff compares real items, as it does with the engine's
`model_dump(mode="json")` states.

Reports, as a markdown table: commit ms/iter around iteration 100 and 10,000,
state bytes per iteration (what was written for state: deltas, keyframes and
their chunks; and the whole file / iterations), the time to load the state at
iteration 5,000 (median of 20, also split into SQL and JSON parsing), and the
peak memory of the process.

    python bench/state_load.py [--iterations 10000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loopterm.core.records import IterationRecord, RunRecord
from loopterm.store import Store
from loopterm.store.delta import keyframe_hashes
from loopterm.store.delta import loads as delta_loads

SYSTEM = "\n\n".join(
    f"Rule {i}: keep the change small, run the tests, and explain what you did in one line." * 2 for i in range(12)
)
WINDOW = 50  # commits per timing window


def item(n: int) -> dict[str, Any]:
    """One log entry, about 200 bytes of JSON."""
    return {"n": n, "tool": "run_tests", "ok": n % 3 != 0, "output": f"iteration {n}: " + "collected 12 items, 11 passed " * 4}


def scalars(n: int) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "iteration": n, "tokens_in": 1200 * n, "tokens_out": 300 * n, "cost_usd": 0.0004 * n, "elapsed_s": 1.5 * n,
        "subgoal": f"make test {n % 7} pass", "last_action": "run_tests", "confidence": 0.5 + (n % 5) / 10,
        "termination_reason": None, "status": "running", "goal": "fix the failing test", "model": "scripted/x",
    }
    fields.update({f"flag_{i}": (n // (i + 1)) % 2 == 0 for i in range(8)})
    return fields


def record(n: int, log: list[dict[str, Any]]) -> IterationRecord:
    return IterationRecord(
        run_id="bench", n=n, started_at=float(n), ended_at=n + 0.5,
        prompt=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"iteration {n}: the last test run failed"}],
        raw_response='{"action": {"tool": "run_tests", "args": {}}}',
        decision={"action": {"tool": "run_tests", "args": {}}}, state={**scalars(n), "log": log},
    )


def build(path: Path, iterations: int, initial: int = 0) -> tuple[dict[int, float], dict[int, float]]:
    """Commit the workload; per iteration, the whole commit_iteration and the SQLite COMMIT inside it (the fsync)."""
    store = Store.open(path)
    sqlite_commit = store._db.commit
    flushes: list[float] = []

    def timed_commit() -> None:
        started = time.perf_counter()
        sqlite_commit()
        flushes.append(time.perf_counter() - started)

    store._db.commit = timed_commit  # type: ignore[method-assign]
    store.create_run(RunRecord(
        id="bench", loop="bench", loop_ref="bench", goal="g", spec_hash="h", model="m", status="running",
        workspace="/tmp", created_at=0.0, updated_at=0.0, max_iterations=iterations,
    ))
    log: list[dict[str, Any]] = [item(-i) for i in range(initial, 0, -1)]
    times: dict[int, float] = {}
    flush: dict[int, float] = {}
    for n in range(1, iterations + 1):
        log.append(item(n))
        rec = record(n, log)
        flushes.clear()
        started = time.perf_counter()
        store.commit_iteration(rec, {"iterations": n})
        times[n] = time.perf_counter() - started
        flush[n] = sum(flushes)
    store.close()
    return times, flush


def state_bytes(path: Path) -> tuple[int, int]:
    """(bytes of deltas and keyframes, bytes of the state chunks they refer to), as written."""
    store = Store.open(path, create=False)
    rows = store._db.execute("SELECT keyframe, body FROM states").fetchall()
    own = sum(len(body.encode()) for _, body in rows)
    hashes = {digest for keyframe, body in rows if keyframe for digest in keyframe_hashes(delta_loads(body))}
    chunk = 0
    for digest in hashes:
        chunk += store._db.execute("SELECT length(CAST(body AS BLOB)) FROM blobs WHERE hash = ?", [digest]).fetchone()[0]
    store.close()
    return own, chunk


def load_times(path: Path, n: int, repeats: int = 20) -> tuple[float, float, float, int]:
    """Median ms to load the state at n: total, of which JSON parsing, and the state's JSON size."""
    store = Store.open(path, create=False)
    store.state_at("bench", n)  # warm the page cache like a viewer's second look
    total = []
    for _ in range(repeats):
        started = time.perf_counter()
        state = store.state_at("bench", n)
        total.append(time.perf_counter() - started)
    assert state is not None and state["log"][-1] == item(n)
    key = store._db.execute("SELECT MAX(n) FROM states WHERE run_id = 'bench' AND keyframe = 1 AND n <= ?", [n]).fetchone()[0]
    body = store._db.execute("SELECT body FROM states WHERE run_id = 'bench' AND n = ?", [key]).fetchone()[0]
    hashes = keyframe_hashes(delta_loads(body))
    texts = [store._db.execute("SELECT body FROM blobs WHERE hash = ?", [h]).fetchone()[0] for h in hashes]
    deltas = [b for (b,) in store._db.execute(
        "SELECT body FROM states WHERE run_id = 'bench' AND n > ? AND n <= ?", [key, n]).fetchall()]
    parse = []
    for _ in range(repeats):
        started = time.perf_counter()
        delta_loads(body)
        for text in texts:
            json.loads(text)
        for text in deltas:
            delta_loads(text)
        parse.append(time.perf_counter() - started)
    store.close()
    size = len(json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode())
    return statistics.median(total) * 1000, statistics.median(parse) * 1000, size / 1024, len(deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--load-at", type=int, default=5_000)
    parser.add_argument("--initial-items", type=int, default=0,
                        help="items in the list before iteration 1 (32: keyframes fall mid-chunk, the worst case for tails)")
    args = parser.parse_args()
    total = args.iterations
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        started = time.perf_counter()
        times, flush = build(path, total, args.initial_items)
        build_s = time.perf_counter() - started
        window = {at: range(max(1, at - WINDOW + 1), at + 1) for at in (100, total)}
        commit = {at: [times[n] for n in ns] for at, ns in window.items()}
        cpu = {at: statistics.median(times[n] - flush[n] for n in ns) * 1000 for at, ns in window.items()}
        own, chunk = state_bytes(path)
        file_bytes = path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("bench.db-*"))
        load_ms, parse_ms, state_kib, deltas = load_times(path, min(args.load_at, total))
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    avg_item = len(json.dumps(item(total), separators=(",", ":")))
    v1_bytes = sum(len(json.dumps(scalars(n))) + n * (avg_item + 1) for n in range(1, total + 1, 100)) / len(range(1, total + 1, 100))
    med = {at: statistics.median(values) * 1000 for at, values in commit.items()}
    mean = {at: statistics.mean(values) * 1000 for at, values in commit.items()}
    print(f"Machine: {platform.machine()}, Python {sys.version.split()[0]}, SQLite {__import__('sqlite3').sqlite_version}, "
          f"{total} iterations ({args.initial_items} initial items) built in {build_s:.1f} s\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| commit ms/iter around iteration 100 (median / mean of {WINDOW}) | {med[100]:.2f} / {mean[100]:.2f} |")
    print(f"| commit ms/iter around iteration {total:,} (median / mean of {WINDOW}) | {med[total]:.2f} / {mean[total]:.2f} |")
    print(f"| of which not the SQLite COMMIT (fsync), median, at 100 / {total:,} | {cpu[100]:.2f} / {cpu[total]:.2f} |")
    print(f"| state bytes/iter written: deltas + keyframes | {own / total:.0f} |")
    print(f"| state bytes/iter written: keyframe chunks | {chunk / total:.0f} |")
    print(f"| state bytes/iter written: total | {(own + chunk) / total:.0f} |")
    print(f"| database file bytes / iterations (everything: state, prompts, rows, indexes) | {file_bytes / total:.0f} |")
    print(f"| a full JSON snapshot per iteration would average (bytes/iter) | {v1_bytes:,.0f} |")
    print(f"| load state at {min(args.load_at, total):,} ({state_kib:,.0f} KiB of JSON, {deltas} deltas), median of 20 | {load_ms:.2f} ms |")
    print(f"| of which stdlib json parsing | {parse_ms:.2f} ms |")
    print(f"| peak RSS of the process | {peak_mib:.0f} MiB |")


if __name__ == "__main__":
    main()
