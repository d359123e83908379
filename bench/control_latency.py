"""How long a person's command takes to reach an engine on another process: PostgreSQL notifications
against the poll.

An engine process drives a scripted run that is paused; this process (another connection, as `watch` on a
laptop would be) sends `resume`, waits until the run's status says running, pauses it again, and repeats.
Measured: from the command's commit to the engine's status change being visible here (both sides hear it
through LISTEN/NOTIFY, so the figure is not inflated by this process polling). Run twice in one go: with
the engine woken by notifications (what loopterm does on PostgreSQL), and with them switched off in the
engine process, so it finds the command at its next poll (engine.poll_interval, 0.2 s by default; all
SQLite has).

    python bench/control_latency.py                 # starts a throwaway PostgreSQL server (tests/pgserver.py)
    python bench/control_latency.py --db postgresql://user@host/db --rounds 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ENGINE = r'''
import asyncio, json, sys
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool
from loopterm.core.engine import Engine
from loopterm.store import Store

url, folder, notify, poll = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "on", float(sys.argv[4])

@tool
def note(ctx: ToolContext, text: str) -> str:
    """Say something."""
    return text

turn = {"content": json.dumps({"action": {"tool": "note", "args": {"text": "hi"}}, "subgoal": "wait",
                                "confidence": 0.5, "reasoning": "r", "done": False})}
script = folder / "script.json"
script.write_text(json.dumps({"turns": [turn], "after_end": "repeat_last"}))
loop = Loop(name="latency", goal="wait for a person", script=script, tools=[note], gates=[], max_iterations=100000,
            state=LoopState, stall_window=100000)
from loopterm.core.model import check_model
check_model(loop.model, loop.script)  # registers the scripted model with litellm
store = Store.open(url)
if not notify:
    store.subscribe = lambda callback: (lambda: None)  # the engine finds commands at its next poll only
engine = Engine.create(loop, store, loop_ref="bench:latency", workspace_root=folder / "ws", workdir=folder,
                       poll_interval=poll)
store.add_command(engine.run_id, "pause", {})
print(engine.run_id, flush=True)
asyncio.run(engine.run())
'''


def measure(url: str, notify: bool, rounds: int, poll: float, folder: Path) -> list[float]:
    from loopterm.store import Store

    script = folder / "engine.py"
    script.write_text(ENGINE)
    proc = subprocess.Popen([sys.executable, str(script), url, str(folder), "on" if notify else "off", str(poll)],
                            stdout=subprocess.PIPE, stderr=open(folder / "engine.log", "w"), text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    if not run_id:
        raise SystemExit(f"the engine process failed: {(folder / 'engine.log').read_text()[-1500:]}")
    store = Store.open(url)
    changed = threading.Event()
    unsubscribe = store.subscribe(lambda kind, rid: changed.set() if kind == "run" and rid == run_id else None)

    def until(status: str) -> None:
        deadline = time.monotonic() + 30
        while store.get_run(run_id).status != status:
            if time.monotonic() > deadline:
                run = store.get_run(run_id)
                raise SystemExit(f"the engine never reached {status!r}: {run.status} {run.message}")
            changed.wait(1.0)
            changed.clear()

    samples = []
    try:
        until("paused")
        for _ in range(rounds):
            time.sleep(0.05)
            changed.clear()
            start = time.perf_counter()
            store.add_command(run_id, "resume", {})
            until("running")
            samples.append((time.perf_counter() - start) * 1000)
            store.add_command(run_id, "pause", {})
            until("paused")
        store.add_command(run_id, "stop", {})
        proc.wait(timeout=60)
    finally:
        unsubscribe()
        store.close()
        if proc.poll() is None:
            proc.kill()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a postgresql:// URL (default: a throwaway server)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--poll", type=float, default=0.2, help="the engine's poll interval in seconds (its default)")
    args = parser.parse_args()
    server = None
    if args.db is None:
        from tests.pgserver import start_server

        server = start_server()
    try:
        rows = []
        for notify in (True, False):
            url = args.db or server.fresh_database()
            with tempfile.TemporaryDirectory() as folder:
                samples = measure(url, notify, args.rounds, args.poll, Path(folder))
            rows.append(("notifications" if notify else f"poll every {args.poll:g} s", samples))
        print(f"command -> engine reacts, {args.rounds} rounds each (ms)")
        print(f"{'':24} {'median':>8} {'p90':>8} {'max':>8}")
        for name, samples in rows:
            ordered = sorted(samples)
            p90 = ordered[int(0.9 * (len(ordered) - 1))]
            print(f"{name:24} {statistics.median(samples):8.1f} {p90:8.1f} {max(samples):8.1f}")
        print(f"ratio (poll / notifications, median): {statistics.median(rows[1][1]) / statistics.median(rows[0][1]):.1f}x")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
