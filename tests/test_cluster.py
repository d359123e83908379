"""Workers on DBOS queues, with real processes and a real PostgreSQL (the `pg_url` fixture).

The `cluster` fixture is a team's setup: the store and the queues in one PostgreSQL database. `one_machine`
keeps the store a SQLite file (the queues in PostgreSQL through LOOPTERM_QUEUE_DB). Every `loopterm` below is
its own process: submitters, workers, a person answering; the test reads the store from its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

LOOP_FILE = '''
import fcntl, os, time
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool
from loopterm.core.invariants import Invariant, Remediation

HERE = Path(__file__).resolve().parent
IDEMPOTENT = os.environ.get("SIDEFX_IDEMPOTENT", "1") == "1"


def mark(text):
    with open(HERE / "marks.log", "a") as f:
        f.write(f"{text} {os.getpid()}\\n")


@tool(side_effects=True, idempotent=IDEMPOTENT)
def append(ctx: ToolContext, line: str) -> str:
    """Append a line to effects.log outside the workspace: a real side effect, keyed like a payment API's."""
    hold = os.environ.get("SIDEFX_HOLD_AT") == str(ctx.iteration) and not (HERE / "held").exists()
    if hold:
        mark(f"enter {ctx.iteration}")
        time.sleep(0.5)
    with open(HERE / "effects.log", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if IDEMPOTENT and ctx.idempotency_key in f.read():
            return "already appended (same idempotency key)"
        f.write(f"{ctx.iteration} {ctx.idempotency_key} {line}\\n")
        f.flush()
    if hold:
        (HERE / "held").touch()
        mark(f"effect {ctx.iteration}")
        time.sleep(30)  # killed here
    return "appended"


def no_question(state):
    return not state.tool_results or "?" not in str(state.tool_results[-1].args)


loop = Loop(
    name="sidefx",
    goal="append four lines",
    state=LoopState,
    tools=[append],
    invariants=[Invariant(name="no_question", check=no_question, remediation=Remediation.ESCALATE,
                          description="a line is never a question")],
    script=HERE / "script.json",
    max_iterations=8,
    converged=lambda state, gates: state.iteration >= 4,
)
'''


def turn(line: str) -> dict[str, Any]:
    decision = {"action": {"tool": "append", "args": {"line": line}}, "subgoal": line, "confidence": 0.9,
                "reasoning": "append the next line"}
    return {"content": decision, "delay": 0.05}


def write_loop(folder: Path, lines: list[str]) -> Path:
    (folder / "sidefx.py").write_text(LOOP_FILE)
    (folder / "script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
        "turns": [turn(line) for line in lines],
    }))
    return folder / "sidefx.py"


class Cluster:
    """The processes of one test: a store (a PostgreSQL database, or a SQLite file with the queues in
    PostgreSQL), workers, and commands. Reads go through the Store API from the test's own process."""

    def __init__(self, folder: Path, queue_db: str | None, *, store: str | None = None) -> None:
        self.folder = folder
        self.store = store or str(folder / "store.db")  # a postgresql:// URL, or a SQLite file
        self.db = folder / "store.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPTERM_")}
        self.env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        if queue_db is not None and store is None:
            self.env["LOOPTERM_QUEUE_DB"] = queue_db
        self.workers: dict[str, subprocess.Popen[str]] = {}

    @property
    def on_postgres(self) -> bool:
        return self.store.startswith("postgresql://")

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "loopterm.tui.cli", *args, "--db", self.store]

    def cli(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(*args), cwd=self.folder, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=120)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def worker(self, name: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        out = (self.folder / f"{name}.out").open("w")
        proc = subprocess.Popen(self.argv("worker", "--id", name, "--poll", "0.5", *extra), cwd=self.folder,
                                env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.workers[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.out").read_text()

    def open(self) -> Any:
        from loopterm.store import Store

        return Store.open(self.store)

    def run(self, run_id: str) -> dict[str, Any]:
        with self.open() as store:
            return {"run": store.get_run(run_id).model_dump(),
                    "iterations": [i.model_dump() for i in store.iterations(run_id)],
                    "events": [{"kind": e.event.kind, "ts": e.ts} for e in store.events(run_id)]}

    def runs(self) -> list[dict[str, Any]]:
        if not self.on_postgres and not self.db.exists():
            return []
        with self.open() as store:
            return [r.model_dump() for r in store.list_runs()]

    def waiting(self, run_id: str) -> list[str]:
        from loopterm.core.fold import fold, waiting_lines

        with self.open() as store:
            return waiting_lines(fold(store.events(run_id)))

    def answer(self, run_id: str, fact: str) -> None:
        """A person's answer to the escalation, from another process: `loopterm answer` (its SQLite path),
        or the same commands written through the store."""
        if not self.on_postgres:
            self.cli("answer", run_id, "--fact", fact)
            return
        from loopterm.core.control import AddFact, Resume, command_payload
        from loopterm.core.fold import fold

        with self.open() as store:
            view = fold(store.events(run_id))
            assert view.escalation is not None
            base = store.get_run(run_id).iterations
            for command in (AddFact(fact=fact, base_iteration=base), Resume(escalation=view.escalation.event_id)):
                store.add_command(run_id, *command_payload(command))

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            for name, proc in self.workers.items():
                assert proc.poll() is None or proc.returncode in (0, -signal.SIGKILL), self.output(name)
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: " + " | ".join(self.output(n) for n in self.workers))

    def status(self, run_id: str) -> str:
        return str(next(r["status"] for r in self.runs() if r["id"] == run_id))

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Any:
    """The team's setup: the store and the queues in one PostgreSQL database."""
    made = Cluster(tmp_path, pg_url, store=pg_url)
    yield made
    made.stop()


@pytest.fixture
def one_machine(tmp_path: Path, pg_url: str) -> Any:
    """A SQLite store on one machine, the queues in PostgreSQL (LOOPTERM_QUEUE_DB)."""
    made = Cluster(tmp_path, pg_url)
    yield made
    made.stop()


def effects(folder: Path) -> list[tuple[int, str]]:
    path = folder / "effects.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(n), key) for n, key, *_ in (line.split() for line in lines)]


def check_exactly_once(cluster: Cluster, run_id: str, iterations: int) -> dict[str, Any]:
    shown = cluster.run(run_id)
    assert shown["run"]["status"] == "converged", shown["run"]
    assert [it["n"] for it in shown["iterations"]] == list(range(1, iterations + 1))  # none lost, none twice
    done = effects(cluster.folder)
    assert sorted(n for n, _ in done) == list(range(1, iterations + 1)), done  # each side effect exactly once
    assert [key for _, key in done] == [it["tool_call"]["key"] for it in shown["iterations"]]
    return shown


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("args", [("run", "demo", "--submit"), ("worker",), ("eval", "demo", "--cases", "c.json", "--submit")],
                         ids=["run", "worker", "eval"])
def test_submit_and_worker_are_refused_on_a_sqlite_store_in_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    cluster = Cluster(tmp_path, None)
    done = cluster.cli(*args, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "needs a PostgreSQL store" in done.stderr and "Traceback" not in done.stderr
    assert not cluster.db.exists()  # refused before anything was made


def test_the_queue_database_password_is_never_printed(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, "postgresql://team:s3cret@127.0.0.1:1/nowhere")
    done = cluster.cli("run", "demo", "--submit", check=False)
    assert done.returncode == 2 and "cannot reach the queue database" in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "team:***@" in done.stderr


# ----------------------------------------------------------------------------- the happy paths


def test_a_submitted_run_is_listed_at_once_and_converges_on_a_worker(cluster: Cluster) -> None:
    loop = write_loop(cluster.folder, ["one", "two", "three", "four"])
    run_id = cluster.cli("run", str(loop), "--submit").stdout.strip()
    assert cluster.status(run_id) == "created"  # recorded before any worker saw it
    worker = cluster.worker("w1")
    cluster.wait("convergence", lambda: cluster.status(run_id) == "converged")
    check_exactly_once(cluster, run_id, 4)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=40) == 0
    out = cluster.output("w1")
    assert f"▶ run {run_id}" in out and f"■ run {run_id} converged after iteration 4" in out and "stopped" in out


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_a_worker_runs_exactly_up_to_its_concurrency_at_once(cluster: Cluster) -> None:
    loop = write_loop(cluster.folder, ["one", "two", "three", "four"])
    cluster.worker("w1", "--concurrency", "2")
    submits = [subprocess.Popen(cluster.argv("run", str(loop), "--submit"), cwd=cluster.folder, env=cluster.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    ids = [proc.communicate(timeout=120)[0].strip() for proc in submits]  # four processes at once
    cluster.wait("four runs converged", lambda: all(cluster.status(r) == "converged" for r in ids), timeout=90)
    edges = []
    for run_id in ids:
        events = cluster.run(run_id)["events"]
        edges += [(next(e["ts"] for e in events if e["kind"] == "run_started"), 1),
                  (next(e["ts"] for e in events if e["kind"] == "run_finished"), -1)]
    running, most = 0, 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        running += step
        most = max(most, running)
    assert most == 2, edges  # never three at once, and two at once (DBOS alone would keep one per queue)


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_workers_on_one_machine_share_a_sqlite_store(one_machine: Cluster) -> None:
    test_a_submitted_run_is_listed_at_once_and_converges_on_a_worker(one_machine)


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_eval_submit_twice_makes_one_run_per_case(cluster: Cluster, pg_url: str) -> None:
    write_loop(cluster.folder, ["one", "two", "three", "four"])
    cases = cluster.folder / "cases.json"
    cases.write_text(json.dumps([{"id": "a", "goal": "append a"}, {"id": "b", "goal": "append b"}]))
    first = cluster.cli("eval", "sidefx.py", "--cases", str(cases), "--submit").stdout.split()
    again = cluster.cli("eval", "sidefx.py", "--cases", str(cases), "--submit")
    assert again.stdout.split() == first and again.stderr.count("(already submitted)") == 2
    ids = first[1::2]
    assert sorted(r["id"] for r in cluster.runs()) == sorted(ids)  # two cases, two runs, however often submitted
    other = cluster.cli("eval", "sidefx.py", "--cases", str(cases), "--submit", "--batch", "again").stdout.split()
    assert set(other[1::2]).isdisjoint(ids)  # a named new batch runs the cases again
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=pg_url.replace("postgresql://", "postgresql+psycopg://"),
                        application_name="loopterm")
    try:
        queued = client.list_workflows(load_input=False, load_output=False)
    finally:
        client.destroy()
    assert sorted(w.workflow_id for w in queued) == sorted(f"{r}/start" for r in [*ids, *other[1::2]])
    cluster.worker("w1")
    cluster.wait("both cases converged", lambda: all(cluster.status(r) == "converged" for r in ids), timeout=90)


def test_an_escalation_on_one_worker_answered_from_another_process_converges(cluster: Cluster) -> None:
    loop = write_loop(cluster.folder, ["one", "two?", "three", "four", "five"])
    run_id = cluster.cli("run", str(loop), "--submit").stdout.strip()
    cluster.worker("w1")
    cluster.wait("the escalation", lambda: cluster.status(run_id) == "escalated")
    assert any(line.startswith("the escalation at iteration 2") for line in cluster.waiting(run_id))
    cluster.answer(run_id, "lines are statements")  # a person, elsewhere: through the store only
    cluster.wait("convergence", lambda: cluster.status(run_id) == "converged")
    shown = cluster.run(run_id)
    kinds = [e["kind"] for e in shown["events"]]
    assert "escalation_answered" in kinds and kinds.count("run_resumed") == 1
    out = cluster.output("w1")
    assert f"↻ run {run_id} was answered" in out and out.count(f"▶ run {run_id}") == 2


# ----------------------------------------------------------------------------- a worker dies


def _killed_mid_tool(cluster: Cluster, idempotent: bool, how: int = signal.SIGKILL) -> tuple[str, str, str]:
    """Two workers; the one that runs iteration 2's side effect is SIGKILLed (or sent `how`) right after the
    effect, before its result is recorded. Returns the run id, the dead worker and the survivor."""
    loop = write_loop(cluster.folder, ["one", "two", "three", "four"])
    env = {"SIDEFX_HOLD_AT": "2", "SIDEFX_IDEMPOTENT": "1" if idempotent else "0"}
    cluster.env.update({"SIDEFX_IDEMPOTENT": env["SIDEFX_IDEMPOTENT"]})
    workers = {name: cluster.worker(name, "--concurrency", "1", "--grace", "1", env=env) for name in ("wa", "wb")}
    run_id = cluster.cli("run", str(loop), "--submit").stdout.strip()
    marks = cluster.folder / "marks.log"
    cluster.wait("the side effect", lambda: marks.exists() and "effect 2" in marks.read_text())
    pid = int(next(line for line in marks.read_text().splitlines() if line.startswith("effect 2")).split()[-1])
    dead = next(name for name, proc in workers.items() if proc.pid == pid)
    workers[dead].send_signal(how)
    assert workers[dead].wait(timeout=30) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    survivor = next(name for name in workers if name != dead)
    return run_id, dead, survivor


def test_sigkill_a_worker_mid_side_effect_and_another_takes_the_run_over(cluster: Cluster) -> None:
    run_id, dead, survivor = _killed_mid_tool(cluster, idempotent=True)
    cluster.wait("convergence on the other worker", lambda: cluster.status(run_id) == "converged")
    shown = check_exactly_once(cluster, run_id, 4)
    out = cluster.output(survivor)
    assert f"worker {dead} is gone: 1 segment(s) of it back on the queues" in out and f"▶ run {run_id}" in out
    assert [e["kind"] for e in shown["events"]].count("run_resumed") == 1


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_a_worker_stopped_with_sigterm_leaves_a_long_segment_to_the_others(cluster: Cluster) -> None:
    run_id, stopped, survivor = _killed_mid_tool(cluster, idempotent=True, how=signal.SIGTERM)
    cluster.wait("convergence on the other worker", lambda: cluster.status(run_id) == "converged")
    check_exactly_once(cluster, run_id, 4)
    said = cluster.output(stopped)
    assert "1 running get up to 1s to end" in said and said.rstrip().endswith("stopped")
    assert f"worker {stopped} is gone" in cluster.output(survivor)


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_a_non_idempotent_call_cut_by_a_kill_waits_for_a_person_then_converges(cluster: Cluster) -> None:
    run_id, dead, survivor = _killed_mid_tool(cluster, idempotent=False)
    cluster.wait("the question", lambda: any("side-effecting call append" in line for line in cluster.waiting(run_id)))
    assert cluster.status(run_id) == "escalated" and len(effects(cluster.folder)) == 2
    answered = cluster.cli("resume", run_id, "--side-effects", "reuse", "--submit")  # it took effect: never again
    assert answered.stdout.strip() == run_id
    cluster.wait("convergence", lambda: cluster.status(run_id) == "converged")
    shown = cluster.run(run_id)
    assert [it["n"] for it in shown["iterations"]] == [1, 2, 3, 4]
    assert sorted(n for n, _ in effects(cluster.folder)) == [1, 2, 3, 4]  # iteration 2's effect once


# ----------------------------------------------------------------------------- the takeover module on its own

HOLDER = """
import sys, time
from loopterm.core.takeover import ExecutorLock
lock = ExecutorLock(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(60)
"""


def test_a_dead_workers_lock_is_free_and_a_live_ones_is_not(pg_url: str) -> None:
    import psycopg

    from loopterm.core.errors import ConfigError
    from loopterm.core.takeover import ExecutorLock, Takeover, dead_executors, release

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pg_url, "host-a"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert dead_executors(conn, {"host-a"}) == []  # alive: its lock is held
            with pytest.raises(ConfigError, match="another worker with id 'host-a' is running"):
                ExecutorLock(pg_url, "host-a", wait_s=0.2)
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
            deadline = time.monotonic() + 10
            found: list[str] = []
            while not found and time.monotonic() < deadline:  # the server notices the closed session at once
                found = dead_executors(conn, {"host-a", "never-was"})
                time.sleep(0.05)
            assert found == ["host-a", "never-was"]
            for executor in found:
                release(conn, executor)
        me = ExecutorLock(pg_url, "host-b")
        recovered: list[str] = []
        said: list[str] = []
        watch = Takeover(pg_url, me, pending=lambda: {"host-a", "host-b"}, recover=lambda e: recovered.append(e) or 3,
                         said=said.append)
        try:
            assert watch.once() == ["host-a"] and recovered == ["host-a"]  # never itself
            assert said == ["worker host-a is gone: 3 segment(s) of it back on the queues"]
            again = ExecutorLock(pg_url, "host-a", wait_s=1)  # let go after the takeover: a restart gets its id back
            again.close()
        finally:
            watch.stop()
            me.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# ----------------------------------------------------------------------------- the daemon in a cluster

TRIGGERS = """
[[trigger]]
name = "often"
loop = "sidefx.py"
on.schedule = "every 1s"
"""


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_the_daemon_queues_each_firing_for_the_workers(cluster: Cluster) -> None:
    write_loop(cluster.folder, ["one", "two", "three", "four"] * 4)
    (cluster.folder / "triggers.toml").write_text(TRIGGERS)
    (cluster.folder / "effects.log").touch()
    cluster.worker("w1")
    log = (cluster.folder / "daemon.out").open("w")
    daemon = subprocess.Popen(cluster.argv("daemon", "--triggers", "triggers.toml"), cwd=cluster.folder, env=cluster.env,
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.wait("two runs the daemon queued, converged on the worker",
                     lambda: len([r for r in cluster.runs() if r["status"] == "converged"]) >= 2, timeout=90)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=40) == 0
    said = (cluster.folder / "daemon.out").read_text()
    assert "queued on loopterm-scripted for the workers" in said
    converged = [r for r in cluster.runs() if r["status"] == "converged"]
    assert all(r["origin"] == "trigger" for r in converged)
    out = cluster.output("w1")
    assert all(f"■ run {r['id']} converged" in out for r in converged)


def test_two_daemons_seeing_one_firing_make_one_run(tmp_path: Path, pg_url: str) -> None:
    import asyncio

    from loopterm.core.queues import Queues
    from loopterm.core.triggers import load_triggers
    from loopterm.store import Store
    from loopterm.tui.daemon import prepare
    from loopterm.tui.daemon_queue import QueueingDaemon

    write_loop(tmp_path, ["one"])
    (tmp_path / "triggers.toml").write_text(TRIGGERS.replace("sidefx.py", str(tmp_path / "sidefx.py")))
    slots = prepare(load_triggers(tmp_path / "triggers.toml"), "triggers.toml", tmp_path)
    said: list[str] = []

    async def fire_in_two_daemons() -> None:
        with Queues(pg_url) as queues, Store.open(tmp_path / "store.db") as store:
            for _ in range(2):  # two daemons (hosts) on the same triggers file, the same scheduled time
                daemon = QueueingDaemon(store, tmp_path / "store.db", tmp_path / "triggers.toml", slots, cwd=tmp_path,
                                        queues=queues, log=said.append)
                daemon._start(slots[0], "scheduled run at 2026-12-07T18:00:00+00:00 (every 1s)")
                await asyncio.sleep(0.5)
                for slot in slots:
                    if slot.task is not None:
                        slot.task.cancel()
                        slot.task = None

    asyncio.run(fire_in_two_daemons())
    with Store.open(tmp_path / "store.db") as store:
        made = store.list_runs()
    assert len(made) == 1 and made[0].origin == "trigger"
    assert any("made already (another daemon); not again" in line for line in said), said


def test_an_answer_to_an_interrupted_call_holds_for_one_session_only(tmp_path: Path) -> None:
    """`reexecute`, then the worker dies inside the same call again: the person is asked again, never the
    old answer reused (found by bench/cluster_trial.py: it fired the call a third time)."""
    from loopterm.core import runlog as log
    from loopterm.core.segments import _side_effect_answers
    from tests.loopkit import decision, make_engine, make_loop

    loop = make_loop(tmp_path, [{"content": decision("write", text="ok")}])
    engine, store = make_engine(tmp_path, loop)
    run_id = engine.run_id
    store.append_event(run_id, log.RunStarted(pid=1, host="a"))
    store.append_event(run_id, log.SideEffectPending(key="k", why="interrupted", tool="write"))
    store.append_event(run_id, log.SideEffectAnswered(key="k", answer="reexecute"))
    assert _side_effect_answers(store, run_id) == {"k": "reexecute"}  # for the session that takes it
    store.append_event(run_id, log.RunResumed(pid=2, host="b"))  # that session began, and was cut again
    assert _side_effect_answers(store, run_id) == {}  # asked again
    store.close()


def test_the_cluster_modules_load_neither_dbos_nor_psycopg_until_used() -> None:
    code = ("import sys\n"
            "import loopterm.core.queues, loopterm.core.segments, loopterm.core.takeover\n"
            "import loopterm.tui.worker_cli, loopterm.tui.submit_cli, loopterm.tui.daemon_queue, loopterm.tui.cli\n"
            "from loopterm.core.queues import queue_name, provider_of\n"
            "assert (queue_name('anthropic/claude-x'), queue_name('scripted/demo')) == "
            "('loopterm-anthropic', 'loopterm-scripted')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dbos', 'psycopg', 'sqlalchemy')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow  # CI runs the cluster's core trials; `pytest -m slow tests/test_cluster.py` runs these
def test_submitters_racing_the_daily_budget_cannot_both_take_what_is_left(cluster: Cluster) -> None:
    """Six `run --submit` processes at once (two laptops' worth), each asking $0.30 under a daily budget of
    $1.00: exactly three are recorded, the others refused in one line; two workers run the three, and what
    they spend stays inside what they held."""
    loop = write_loop(cluster.folder, ["one", "two", "three", "four"])
    cluster.cli("budget", "--set-daily", "1")
    procs = [subprocess.Popen(cluster.argv("run", str(loop), "--submit", "--budget-usd", "0.3"), cwd=cluster.folder,
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    done = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    created = [out.strip() for code, out, _ in done if code == 0]
    refused = [err for code, _, err in done if code != 0]
    assert len(created) == 3 and len(refused) == 3, done
    assert all(err.count("\n") == 1 and "daily budget" in err for err in refused), refused
    assert {r["id"] for r in cluster.runs()} == set(created)  # a refused submit recorded nothing
    cluster.worker("w1")
    cluster.worker("w2")
    cluster.wait("the three runs converge", lambda: all(cluster.status(r) == "converged" for r in created), 120)
    spent = sum(r["cost_usd"] for r in cluster.runs())
    assert 0 < spent <= 0.9
