"""Concurrent access to one database file, by real separate processes.

Two headless engines (`loopterm run FILE --headless`) run fast scripted loops (no model delay) on the same
database, while a third process follows both runs the way `loopterm watch` does (the run row, the
iterations after the last one shown, the events after the last id: tui/app.py's poll) and sends many
commands through the store's control channel: pause, resume, add a fact, relax and restore an invariant,
set the subgoal, some while the run is paused and some while it runs. Afterwards: no process printed
"database is locked" or a traceback, every exit code is the expected one, every command row was consumed
and applied exactly once (one matching event each, in order), every iteration 1..N of each run is present
once, and the side effect ran once per iteration.

The CI form runs 300 iterations per engine; the slow form (`-m slow`) 1,000.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import runlog
from loopterm.store import Store
from tests.loopkit import of

LOOP_FILE = '''
import os
from pathlib import Path
from loopterm.core import Invariant, Loop, LoopState, ToolContext, tool

HERE = Path(__file__).parent
N = int(os.environ["FAST_N"])

@tool(side_effects=True, idempotent=False)
def note(ctx: ToolContext, line: str) -> str:
    """Append a line to this run's effects log: a real side effect outside the workspace."""
    with open(HERE / f"effects-{ctx.run_id}.log", "a") as f:
        f.write(f"{ctx.iteration} {ctx.idempotency_key} {line}\\n")
    return "noted"

def finished(state, gates):
    # The controller says when it has sent everything (the last command), after iteration N.
    return state.iteration >= N and "all commands sent" in state.memory.facts

loop = Loop(
    name="fast", goal="note lines until told to finish", state=LoopState, tools=[note],
    invariants=[Invariant(name="bounded", check=lambda s: len(s.memory.facts) < 10_000,
                          description="working memory stays under 10,000 facts")],
    # The cap only ends a run whose controller died: a slow controller keeps it going past N, never past this.
    script=HERE / "script.json", max_iterations=50 * N, stall_window=None, converged=finished, recall=0,
)
'''

# The third process: reads like `loopterm watch` (tui/app.py: poll) and sends commands like its keys do.
CONTROLLER = '''
import json, sys, time
from itertools import islice
from loopterm.core.control import AddFact, Pause, Relax, Restore, Resume, SetSubgoal, command_payload
from loopterm.core.errors import ConfigError
from loopterm.store import Store

db, target, cycles, out, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
POLL_S = 0.01  # faster than the TUI's 0.25 s: more reads racing the writers
MAX_ROWS_PER_POLL = 500
FINISHED = {"converged", "terminated", "stopped", "failed", "escalated"}
start = time.monotonic()
deadline = start + limit
while True:  # like `loopterm watch`, refused until an engine has created the database
    try:
        store = Store.open(db, create=False)
        break
    except ConfigError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.01)
while len(store.list_runs()) < 2:
    assert time.monotonic() < deadline, "the engines never created their runs"
    time.sleep(0.01)

views = [{"run": r.id, "last_n": 0, "last_event": 0, "status": r.status, "cycle": 0, "waiting": False,
          "done_sent": False, "sent": [], "gaps": [], "statuses": []} for r in store.list_runs()[:2]]
writes = []  # seconds each add_command took (it waits on the engines' write transactions)

def send(view, command):
    kind, payload = command_payload(command)
    t = time.monotonic()
    row = store.add_command(view["run"], kind, payload)
    writes.append(time.monotonic() - t)
    view["sent"].append({"id": row.id, "kind": kind, "payload": payload})

def chores(view, i):
    tag = f"{view['run'][:6]}-{i}"
    return [AddFact(fact=f"fact {tag}"), Relax(invariant="bounded", reason=f"relax {tag}"),
            Restore(invariant="bounded", reason=f"restore {tag}"), SetSubgoal(subgoal=f"subgoal {tag}")]

def poll(view):
    run = store.get_run(view["run"])
    if run.iterations > view["last_n"]:
        for record in islice(store.iter_iterations(view["run"], first=view["last_n"] + 1), MAX_ROWS_PER_POLL):
            if record.n != view["last_n"] + 1:
                view["gaps"].append([view["last_n"], record.n])
            view["last_n"] = record.n
    for event in store.events(view["run"], after_id=view["last_event"]):
        assert event.id > view["last_event"]
        view["last_event"] = event.id
    if run.status != view["status"]:
        view["statuses"].append(run.status)
    view["status"] = run.status

def step(view):
    i = view["cycle"]
    if view["waiting"]:
        if view["status"] == "paused":  # the engine obeyed: the rest of the cycle goes to a paused run
            for command in chores(view, i):
                send(view, command)
            send(view, Resume())
            view["waiting"] = False
            view["cycle"] += 1
        return
    if i < cycles and view["last_n"] >= (i + 1) * target // (cycles + 1):
        if i % 2 == 0:  # a burst while the run runs
            for command in [*chores(view, i), Pause(), Resume()]:
                send(view, command)
            view["cycle"] += 1
        else:
            send(view, Pause())
            view["waiting"] = True
    elif i == cycles and view["last_n"] >= target and not view["done_sent"]:
        send(view, AddFact(fact="all commands sent"))
        view["done_sent"] = True

polls = 0
while not all(v["done_sent"] and v["status"] in FINISHED for v in views):
    assert time.monotonic() < deadline, json.dumps(views)[:2000]
    for view in views:
        poll(view)
        step(view)
    polls += 1
    time.sleep(POLL_S)
for view in views:
    poll(view)
writes.sort()
json.dump({"views": views, "polls": polls, "wall_s": time.monotonic() - start, "writes": len(writes),
           "lock_retries": store.lock_retries, "writes_over_10ms": sum(1 for w in writes if w > 0.01),
           "write_max_s": writes[-1], "write_p50_s": writes[len(writes) // 2],
           "writes_over_100ms": sum(1 for w in writes if w > 0.1)}, open(out, "w"))
store.close()
'''


def turn(i: int) -> dict[str, Any]:
    decision = {"action": {"tool": "note", "args": {"line": f"line {i}"}}, "subgoal": f"line {i}",
                "confidence": 0.9, "reasoning": "the next line"}
    return {"content": decision}  # no delay: the engines write as fast as they can


def cli(*args: str, db: Path) -> list[str]:
    return [sys.executable, "-m", "loopterm.tui.cli", *args, "--db", str(db)]


def check_clean(name: str, output: str) -> None:
    """No lock failure and no traceback reached the person."""
    assert "database is locked" not in output and "stayed locked" not in output, f"{name}: {output[-2000:]}"
    assert "Traceback" not in output, f"{name}: {output[-3000:]}"


def run_concurrently(tmp_path: Path, n: int, cycles: int, limit_s: float) -> dict[str, Any]:
    """Two engines and a controller on one file; returns the figures after checking everything."""
    (tmp_path / "fast.py").write_text(LOOP_FILE)
    (tmp_path / "script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
        "turns": [turn(i) for i in range(1, n + 1)], "after_end": "repeat_last",
    }))
    (tmp_path / "controller.py").write_text(CONTROLLER)
    db = tmp_path / "shared" / "loopterm.db"
    db.parent.mkdir()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "FAST_N": str(n)}
    env.pop("LOOPTERM_DEBUG", None)
    out = tmp_path / "controller.json"
    names = ["engine-1", "engine-2", "controller"]
    argvs = [cli("run", str(tmp_path / "fast.py"), "--headless", db=db)] * 2 + [
        [sys.executable, str(tmp_path / "controller.py"), str(db), str(n), str(cycles), str(out), str(limit_s)]]
    started = time.monotonic()
    procs = []
    try:
        for name, argv in zip(names, argvs):  # output to files: a full pipe would stall a process
            with (tmp_path / f"{name}.out").open("w") as stdout, (tmp_path / f"{name}.err").open("w") as stderr:
                procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr))
        codes = [proc.wait(timeout=limit_s + 60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - started
    for name, code in zip(names, codes):
        stdout, stderr = (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()
        check_clean(name, stderr + stdout)
        assert code == 0, f"{name} exited {code}: {stdout[-1500:]}{stderr[-1500:]}"
    figures = json.loads(out.read_text())
    views = figures["views"]
    assert len({v["run"] for v in views}) == 2

    conn = sqlite3.connect(db)
    with Store.open(db, create=False) as store:
        for view in views:
            run_id = view["run"]
            run = store.get_run(run_id)
            assert run.status == "converged", run
            assert run.iterations >= n
            # Every iteration 1..N present once, in the store and as the watcher saw them arrive.
            assert [it.n for it in store.iterations(run_id)] == list(range(1, run.iterations + 1))
            assert conn.execute("SELECT count(*), count(DISTINCT n) FROM iterations WHERE run_id = ?",
                                [run_id]).fetchone() == (run.iterations, run.iterations)
            assert view["gaps"] == [] and view["last_n"] == run.iterations
            # The side effect ran once per iteration.
            lines = (tmp_path / f"effects-{run_id}.log").read_text().splitlines()
            assert sorted(int(line.split()[0]) for line in lines) == list(range(1, run.iterations + 1))
            assert len({line.split()[1] for line in lines}) == len(lines)
            # Every command sent is a row, consumed; no other row exists.
            sent = view["sent"]
            rows = conn.execute("SELECT id, kind, consumed_at FROM commands WHERE run_id = ? ORDER BY id",
                                [run_id]).fetchall()
            assert [(row[0], row[1]) for row in rows] == [(c["id"], c["kind"]) for c in sent]
            assert all(row[2] is not None for row in rows)
            # ... and applied exactly once: one matching event each, in the order sent.
            events = store.events(run_id)
            assert of(events, runlog.CommandRejected) == []
            facts = [e.fact for e in of(events, runlog.FactAdded)]
            assert facts == [c["payload"]["fact"] for c in sent if c["kind"] == "add_fact"]
            relaxed = [e.reason for e in of(events, runlog.InvariantRelaxed)]
            assert relaxed == [c["payload"]["reason"] for c in sent if c["kind"] == "relax"]
            restored = [e.reason for e in of(events, runlog.InvariantRestored)]
            assert restored == [c["payload"]["reason"] for c in sent if c["kind"] == "restore"]
            subgoals = [e.subgoal for e in of(events, runlog.SubgoalSet)]
            assert subgoals == [c["payload"]["subgoal"] for c in sent if c["kind"] == "set_subgoal"]
            statuses = [e.status for e in of(events, runlog.StatusChanged)]
            assert statuses.count("paused") == sum(c["kind"] == "pause" for c in sent)
            assert statuses.count("running") == sum(c["kind"] == "resume" for c in sent)
            assert len(sent) == 6 * cycles + 1
            # The paused half of the cycles really paused the run, and the watcher saw it.
            assert "paused" in view["statuses"]
    conn.close()
    figures["wall_s_total"] = wall
    figures["iterations"] = [v["last_n"] for v in views]
    figures["commands"] = sum(len(v["sent"]) for v in views)
    return figures


def test_two_engines_and_a_watcher_share_one_database(tmp_path: Path) -> None:
    figures = run_concurrently(tmp_path, n=300, cycles=20, limit_s=240)
    print(json.dumps({k: v for k, v in figures.items() if k != "views"}))


@pytest.mark.slow
def test_two_engines_and_a_watcher_share_one_database_for_1000_iterations(tmp_path: Path) -> None:
    figures = run_concurrently(tmp_path, n=1000, cycles=60, limit_s=900)
    print(json.dumps({k: v for k, v in figures.items() if k != "views"}))


HOLDER = '''
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
'''


def committed(db: Path) -> int:
    """Iterations in the file so far (0 before the engine has created it)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM iterations").fetchone()[0]
    except sqlite3.OperationalError:  # no table yet
        return 0
    finally:
        conn.close()


@pytest.mark.slow
def test_an_engine_outlasts_another_process_holding_the_write_lock_past_the_busy_timeout(tmp_path: Path) -> None:
    """A person's sqlite3 shell (or a long import) keeps the write lock for 12 s, past SQLite's 10 s busy timeout:
    the engine waits and carries on; it used to end with "database is locked" (exit 1)."""
    from loopterm.core.control import AddFact, command_payload

    n = 300
    (tmp_path / "fast.py").write_text(LOOP_FILE)
    (tmp_path / "script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
        "turns": [turn(i) for i in range(1, n + 1)], "after_end": "repeat_last",
    }))
    db = tmp_path / "loopterm.db"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "FAST_N": str(n)}
    with (tmp_path / "engine.out").open("w") as out, (tmp_path / "engine.err").open("w") as err:
        engine = subprocess.Popen(cli("run", str(tmp_path / "fast.py"), "--headless", db=db), cwd=tmp_path, env=env,
                                  stdout=out, stderr=err)

    def running() -> bool:
        if engine.poll() is not None:
            pytest.fail(f"the engine ended early ({engine.returncode}): {(tmp_path / 'engine.err').read_text()[-1500:]}")
        return time.monotonic() < deadline

    try:
        deadline = time.monotonic() + 120
        while committed(db) < 20:  # well into the run
            assert running()
            time.sleep(0.05)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), "12"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert holder.wait(timeout=60) == 0
        with Store.open(db, create=False) as store:
            run_id = store.list_runs()[0].id
            while store.get_run(run_id).iterations < n:
                assert running()
                time.sleep(0.05)
            store.add_command(run_id, *command_payload(AddFact(fact="all commands sent")))
        engine.wait(timeout=120)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    stdout, stderr = (tmp_path / "engine.out").read_text(), (tmp_path / "engine.err").read_text()
    check_clean("engine", stderr + stdout)
    assert engine.returncode == 0, stdout[-1500:] + stderr
    with Store.open(db, create=False) as store:
        run = store.get_run(run_id)
        assert run.status == "converged"
        assert [it.n for it in store.iterations(run_id)] == list(range(1, run.iterations + 1))


def _open_in_step(barrier: Any, root: str, rounds: int, results: Any) -> None:
    """One process of the race below: each round, open (and so create) the round's new database with the others."""
    errors = []
    for k in range(rounds):
        barrier.wait()
        try:
            Store.open(Path(root) / f"round{k}" / "loopterm.db").close()
        except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
            errors.append(f"{type(exc).__name__}: {exc}")
    results.put(errors)


def race_to_create(tmp_path: Path, rounds: int, processes: int = 4) -> list[str]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_open_in_step, args=(barrier, str(tmp_path), rounds, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    errors = [error for _ in workers for error in results.get(timeout=600)]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * processes
    return errors


def test_processes_creating_one_new_database_at_once_never_find_it_locked(tmp_path: Path) -> None:
    """Two engines started at once on a new file both switch it to WAL; SQLite answered the loser "database is
    locked" at once, without waiting (7 of 200 rounds of four processes before the fix)."""
    assert race_to_create(tmp_path, 80) == []


@pytest.mark.slow
def test_processes_creating_one_new_database_at_once_never_find_it_locked_500_rounds(tmp_path: Path) -> None:
    assert race_to_create(tmp_path, 500) == []
