"""Crash safety under fault injection: SIGKILL a headless run at seeded points, resume it every time.

    python bench/crash_trials.py            # 100 kills (+5 at the runs' ends): 5 runs of 30 iterations
    python bench/crash_trials.py --fork     # the same, each process forked from a warm launcher
    python bench/crash_trials.py --kills 24 --runs 1 --iterations 24 --seed 7 --json

The loop (written into a scratch directory) appends one line per iteration to `effects.log` outside the
run's workspace, with the call's idempotency key: a real, non-idempotent side effect. Its command gate
reads that log and fails if an iteration appears twice. A scripted model decides. Kill points come from
a seeded RNG, balanced over four phases; each lands inside a window held open on purpose, only in the
process armed for it (`LOOPTERM_FAULT=phase:iteration:seconds`):

    model   inside the model call: that iteration's scripted reply is delayed (the kill lands in
            litellm's acompletion); the loop's prompt context marks the call's start
    tool    inside the side-effecting call, before or after its effect (the tool sleeps on both sides
            of the append): the call is journalled as started, not finished
    gate    inside the gate: its command sleeps (the reply and the call's result are on disk)
    commit  inside the iteration's commit transaction, before or after the iteration's row is inserted
            (a wrapper of Store._insert_iteration installed by this script: no hook in loopterm)
    finish  one more per run (--no-end: none): after the converging iteration's commit, before the
            run's end is recorded

Each process leaves markers (`marks.log`); the harness waits for the armed window's marker, sleeps a
random fraction of the window, and sends SIGKILL to the `loopterm` process (a gate it had started is
killed too, by its pid, so nothing outlives the trial). It checks the store and the log, then runs
`loopterm resume RUN --no-wait`. A call interrupted mid-flight makes the run wait for a person (exit 4);
the harness answers as a person would, from the log: `--side-effects reuse` when the log shows the effect
happened, `reexecute` when it does not. After the last kill the run goes on to convergence and is
compared with an uninterrupted reference run.

Checked after every kill: lost (an iteration whose commit had returned is missing), duplicated (an
iteration row or a tool call recorded twice for one iteration), double side effects (an iteration's
effect in effects.log more than once), and that the store looks as the phase predicts (e.g. a tool kill
leaves the call started, its reply on disk, the iteration uncommitted). At the end: iterations 1..N once
each, effects 1..N once each with the keys the store holds, the run's spend = its iterations' = the spend
ledger's, and the result identical to the reference's: status, reason, iteration count, spend, and per
iteration the prompt, reply, decision, call, gate output, invariants and tokens, and the final state.
Not compared: timings, and the output of a call a person settled with `reuse` (never recorded: the next
prompts show a placeholder, masked in the comparison, and their input tokens differ by it).

Processes are started by a small launcher (a child subreaper, so a killed run's gate is reaped). Default:
every `loopterm` command is a fresh interpreter (`python bench/crash_trials.py child ARGS`: the `loopterm`
entry point, `loopterm.tui.cli:main`, plus the hooks). `--fork`: forked from a launcher that imported
litellm once (the same code, 3 s less per process; what the CI test uses).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

THIS = Path(__file__).resolve()
PHASES = ("model", "tool", "gate", "commit")
ORDER = (*PHASES, "finish")  # finish: after the last iteration's commit, before the run's end is recorded
FAULT_ENV = "LOOPTERM_FAULT"
MARKS_ENV = "LOOPTERM_FAULT_MARKS"

LOOP_FILE = '''\
"""A loop with a real, non-idempotent side effect outside its workspace (effects.log), for fault injection."""

import os
import time
from pathlib import Path

from pydantic import Field

from loopterm.core import CommandGate, Loop, LoopState, ToolContext, tool

HERE = Path(__file__).resolve().parent
N = {iterations}


def armed(phase, n):
    """The window to hold open when this process is armed for (phase, iteration n), else None."""
    raw = os.environ.get("LOOPTERM_FAULT", "")
    if not raw:
        return None
    want, at, window = raw.split(":")
    return float(window) if want == phase and int(at) == n else None


def mark(text):
    with open(HERE / "marks.log", "a") as f:
        f.write(f"{{text}} {{os.getpid()}}\\n")


class Ledger(LoopState):
    lines: list[str] = Field(default_factory=list)


@tool(side_effects=True, idempotent=False)
def append(ctx: ToolContext, line: str) -> str:
    """Append a line to the ledger outside the workspace (a real side effect: not idempotent)."""
    window = armed("tool", ctx.iteration)
    if window:
        mark(f"tool {{ctx.iteration}} enter")
        time.sleep(window / 2)
    with open(HERE / "effects.log", "a") as f:  # one write(2) of one line: a kill cannot split it
        f.write(f"{{ctx.iteration}} {{ctx.idempotency_key}} {{line}}\\n")
    if window:
        mark(f"tool {{ctx.iteration}} effect")
        time.sleep(window / 2)
        mark(f"tool {{ctx.iteration}} leave")
    return f"appended {{line}}"


def context(state):
    n = state.iteration + 1
    if armed("model", n):  # the scripted reply for n is delayed by the window: the call starts now
        mark(f"model {{n}} enter")
    return f"{{len(state.lines)}} of {{N}} lines appended"


def observe(state, decision, record, gates):
    if record is not None and record.ok:
        return state.model_copy(update={{"lines": [*state.lines, record.args["line"]]}})
    return state


loop = Loop(
    name="faulty",
    goal=f"append {{N}} lines to the ledger, one per iteration",
    state=Ledger,
    tools=[append],
    gates=[CommandGate(name="ledger", argv=["{{python}}", str(HERE / "gate.py")])],
    script=HERE / "script.json",
    max_iterations=N + 4,
    context=context,
    observe=observe,
    converged=lambda state, gates: state.iteration >= N and bool(gates) and all(g.passed for g in gates),
)
'''

GATE_FILE = '''\
"""The loop's gate: every iteration and every idempotency key appears once in effects.log."""

import os
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
log = HERE / "effects.log"
rows = [line.split(" ", 2) for line in log.read_text().splitlines()] if log.exists() else []
n = int(rows[-1][0]) if rows else 0
raw = os.environ.get("LOOPTERM_FAULT", "")
if raw:
    phase, at, window = raw.split(":")
    if phase == "gate" and int(at) == n:
        with open(HERE / "marks.log", "a") as f:
            f.write(f"gate {n} enter {os.getpid()}\\n")
        time.sleep(float(window))
        with open(HERE / "marks.log", "a") as f:
            f.write(f"gate {n} leave {os.getpid()}\\n")
twice = sorted({r[0] for r in rows if Counter(x[0] for x in rows)[r[0]] > 1} |
               {r[1] for r in rows if Counter(x[1] for x in rows)[r[1]] > 1})
if twice:
    print("side effects applied twice: " + ", ".join(twice), file=sys.stderr)
    sys.exit(1)
print(f"{len(rows)} effects, each applied once")
'''


# ----------------------------------------------------------------------------- inside the loopterm process


def _armed(phase: str, n: int) -> float | None:
    raw = os.environ.get(FAULT_ENV, "")
    if not raw:
        return None
    want, at, window = raw.split(":")
    return float(window) if want == phase and int(at) == n else None


def _mark(text: str) -> None:
    path = os.environ.get(MARKS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{text} {os.getpid()}\n")


def install_hooks() -> None:
    """Test-only wrappers (nothing in loopterm changes): the commit window, and markers.

    `committed N` is written after Store.commit_iteration returned (what a lost iteration is judged by);
    the commit window sleeps inside the commit's write transaction, before and after the row's insert;
    `model N leave` is written when the model call of an armed iteration returned.
    """
    from loopterm.core import model as model_module
    from loopterm.store import db as store_db

    store = store_db.Store
    insert, commit = store._insert_iteration, store.commit_iteration

    def _insert_iteration(self: Any, record: Any, *args: Any, **kwargs: Any) -> Any:
        window = _armed("commit", record.n)
        if window:
            _mark(f"commit {record.n} enter")
            time.sleep(window / 2)
        head = insert(self, record, *args, **kwargs)
        if window:
            _mark(f"commit {record.n} inserted")
            time.sleep(window / 2)
            _mark(f"commit {record.n} leave")
        return head

    def commit_iteration(self: Any, record: Any, *args: Any, **kwargs: Any) -> Any:
        result = commit(self, record, *args, **kwargs)
        _mark(f"committed {record.n}")
        window = _armed("finish", record.n)
        if window:  # committed; what follows (for the last iteration: the run's end) has not happened yet
            _mark(f"finish {record.n} enter")
            time.sleep(window)
            _mark(f"finish {record.n} leave")
        return result

    store._insert_iteration = _insert_iteration  # type: ignore[method-assign]
    store.commit_iteration = commit_iteration  # type: ignore[method-assign]

    client = model_module.ModelClient
    complete = client.complete

    async def complete_marked(self: Any, messages: Any, *, iteration: int, **kwargs: Any) -> Any:
        reply = await complete(self, messages, iteration=iteration, **kwargs)
        if _armed("model", iteration):
            _mark(f"model {iteration} leave")
        return reply

    client.complete = complete_marked  # type: ignore[method-assign]


def child_main(argv: list[str]) -> int:
    """`loopterm ARGS` (the console script's own entry point) with the hooks installed."""
    install_hooks()
    from loopterm.tui.cli import main

    return main(argv)


def launcher_main(warm: bool) -> None:
    """Start `loopterm` processes on request (JSON lines on stdin), report each pid and exit code.

    A child subreaper: a gate orphaned by a killed run is re-parented here and reaped. `warm`: litellm
    and loopterm are imported once and every process is a fork of this one (no threads exist here).
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    if warm:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        install_hooks()
        import litellm  # the 2.5 s every fresh process pays

        litellm.token_counter(model="scripted/warm", messages=[{"role": "user", "content": "warm"}])  # its tokenizer

        for name in ("loopterm.core.engine", "loopterm.core.loader", "loopterm.tui.commands", "loopterm.tui.headless"):
            importlib.import_module(name)
        from loopterm.tui.cli import main
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.chdir(request["cwd"])
                if not warm:
                    os.execve(sys.executable, [sys.executable, str(THIS), "child", *request["argv"]], request["env"])
                os.environ.clear()
                os.environ.update(request["env"])
                code = main(request["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported in the output file, exit 70
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        while True:
            reaped, status = os.waitpid(-1, 0)
            if reaped == pid:
                out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
                out.flush()
                break
    while True:  # stdin closed: reap what is left
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


# ----------------------------------------------------------------------------- the harness


class Process:
    def __init__(self, pid: int, replies: "queue.Queue[dict[str, Any]]") -> None:
        self.pid = pid
        self._replies = replies
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is None:
            try:
                self.rc = int(self._replies.get_nowait()["rc"])
            except queue.Empty:
                pass
        return self.rc

    def wait(self, timeout: float) -> int:
        if self.rc is None:
            try:
                self.rc = int(self._replies.get(timeout=timeout)["rc"])
            except queue.Empty:
                raise TimeoutError(f"process {self.pid} still running after {timeout:g}s") from None
        return self.rc

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


class Launcher:
    """The harness's side of launcher_main: one process at a time."""

    def __init__(self, *, fork: bool) -> None:
        self.fork = fork
        argv = [sys.executable, str(THIS), "launcher", *(["--warm"] if fork else [])]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._replies.put(json.loads(line))

    def start(self, argv: list[str], *, cwd: Path, env: dict[str, str], out: Path) -> Process:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "out": str(out)}) + "\n")
        self._proc.stdin.flush()
        try:
            reply = self._replies.get(timeout=120)
        except queue.Empty:
            raise RuntimeError("the launcher did not start the process") from None
        return Process(int(reply["pid"]), self._replies)

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Kill:
    """One kill point, and what was found after it."""

    run: int
    n: int
    phase: str
    offset: float  # seconds after the window opened
    hit: bool = False  # the process was inside the armed window when killed (from the markers)
    point: str = ""  # where exactly: "before the effect", "inside the transaction, row inserted", ...
    evidence: str = ""  # the store after the kill, as the phase predicts it, or what differs
    lost: int = 0
    duplicated: int = 0
    double: int = 0
    answer: str | None = None  # a person's answer to an interrupted side-effecting call
    resumed_rc: int | None = None


@dataclass
class RunResult:
    run: int
    run_id: str
    kills: list[Kill]
    rc: int = -1
    status: str = ""
    iterations: list[int] = field(default_factory=list)
    identical: bool = False
    differences: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    double: int = 0
    wall_s: float = 0.0


def schedule(seed: int, kills: int, runs: int, iterations: int, window: float, *, end: bool = True) -> list[list[Kill]]:
    """Kill points per run: phases balanced (shuffled), distinct (iteration, phase) pairs within a run;
    `end`: one more per run, after the last iteration's commit, before the run's end is recorded."""
    rng = random.Random(seed)
    phases = [PHASES[i % len(PHASES)] for i in range(kills)]
    rng.shuffle(phases)
    per_run: list[list[Kill]] = []
    for r in range(runs):
        mine = phases[r::runs]
        chosen: list[Kill] = []
        for phase in PHASES:
            count = mine.count(phase)
            if count > iterations:
                raise ValueError(f"{count} {phase} kills do not fit in {iterations} iterations; add runs or iterations")
            for n in rng.sample(range(1, iterations + 1), count):
                chosen.append(Kill(run=r, n=n, phase=phase, offset=round(rng.uniform(0.05, 0.75) * window, 4)))
        if end:
            chosen.append(Kill(run=r, n=iterations, phase="finish", offset=round(rng.uniform(0.05, 0.75) * window, 4)))
        chosen.sort(key=lambda k: (k.n, ORDER.index(k.phase)))
        per_run.append(chosen)
    return per_run


def _turn(i: int, delay: float = 0.0) -> dict[str, Any]:
    decision = {"action": {"tool": "append", "args": {"line": f"line {i}"}}, "subgoal": f"append line {i}",
                "confidence": 0.9, "reasoning": f"line {i} is next"}
    return {"content": decision, "delay": delay}


class Trial:
    """One run in its own directory: the loop, its script, gate, effect log, markers and store."""

    def __init__(self, root: Path, launcher: Launcher, iterations: int, window: float, *,
                 answer_policy: str = "log", timeout: float = 120.0) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "out").mkdir(exist_ok=True)
        self.launcher = launcher
        self.iterations = iterations
        self.window = window
        self.answer_policy = answer_policy  # "log": as a person reading the log would; "reexecute": blindly
        self.timeout = timeout
        self.db = self.dir / "db.sqlite"
        self.effects = self.dir / "effects.log"
        self.marks = self.dir / "marks.log"
        self.launches = 0
        (self.dir / "faulty.py").write_text(LOOP_FILE.format(iterations=iterations))
        (self.dir / "gate.py").write_text(GATE_FILE)
        self.marks.touch()
        self.run_id = ""
        self.current: Process | None = None  # the process started last

    def abort(self) -> None:
        """End the process started last, if it still runs (a harness error or a timeout)."""
        if self.current is not None and self.current.poll() is None:
            try:
                self.current.kill()
                self.current.wait(30)
            except (ProcessLookupError, TimeoutError):
                pass

    # -- processes

    def _script(self, delay_at: int | None) -> None:
        turns = [_turn(i, self.window if i == delay_at else 0.0) for i in range(1, self.iterations + 5)]
        price = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
        (self.dir / "script.json").write_text(json.dumps({"price": price, "turns": turns}))

    def launch(self, argv: list[str], target: Kill | None) -> Process:
        self._script(target.n if target is not None and target.phase == "model" else None)
        env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "LOOPTERM_DB", "LOOPTERM_DEBUG")}
        env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", MARKS_ENV: str(self.marks)})
        if target is not None:
            env[FAULT_ENV] = f"{target.phase}:{target.n}:{self.window}"
        self.launches += 1
        out = self.dir / "out" / f"{self.launches:03d}-{argv[0]}.txt"
        self.current = self.launcher.start([*argv, "--db", str(self.db)], cwd=self.dir, env=env, out=out)
        return self.current

    def output(self) -> str:
        last = sorted((self.dir / "out").iterdir())[-1]
        return last.read_text(errors="replace")

    def _marks(self) -> list[list[str]]:
        return [line.split() for line in self.marks.read_text().splitlines() if line.strip()]

    def _wait_for(self, proc: Process, phase: str, n: int, seen: int) -> bool:
        """Until the armed window's marker appears (True) or the process exits (False)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            marks = self._marks()[seen:]
            if any(m[0] == phase and m[1] == str(n) and m[2] == "enter" for m in marks):
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.003)
        raise TimeoutError(f"no {phase} window at iteration {n} within {self.timeout:g}s")

    def _find_run(self) -> str:
        with self._ro() as db:
            rows = db.execute("SELECT id FROM runs").fetchall()
        if len(rows) != 1:
            raise RuntimeError(f"expected one run in {self.db}, found {len(rows)}")
        return str(rows[0][0])

    def _ro(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)

    # -- what a person does

    def _pending_interrupted(self) -> dict[str, Any] | None:
        """The side effect the run waits on a person for, as the run's log folds (read-only: no Store opened)."""
        from loopterm.core.fold import fold
        from loopterm.core.runlog import EventRecord, from_stored

        with self._ro() as db:
            rows = db.execute("SELECT id, iteration, ts, kind, data FROM events WHERE run_id = ? ORDER BY id",
                              [self.run_id]).fetchall()
        log = [EventRecord(id=i, run_id=self.run_id, iteration=n, ts=ts, event=from_stored(kind, json.loads(data)))
               for i, n, ts, kind, data in rows]
        pending = fold(log).side_effect
        return pending.asked.model_dump(exclude={"kind"}) if pending is not None else None

    def _answer(self, key: str) -> str:
        if self.answer_policy == "reexecute":
            return "reexecute"
        return "reuse" if key in self._effect_keys() else "reexecute"

    def _effect_rows(self) -> list[tuple[int, str, str]]:
        if not self.effects.exists():
            return []
        rows = [line.split(" ", 2) for line in self.effects.read_text().splitlines() if line.strip()]
        return [(int(r[0]), r[1], r[2]) for r in rows]

    def _effect_keys(self) -> set[str]:
        return {key for _, key, _ in self._effect_rows()}

    def drive(self, argv: list[str], target: Kill | None) -> tuple[Process | None, int | None, str | None]:
        """Start argv armed for target; answer an interrupted call as a person would, and go on.

        Returns (a process inside target's window, None, answer) or (None, its exit code, answer) when
        target is None (the run's last process) or the run ended before reaching it."""
        answer = None
        while True:
            seen = len(self._marks())
            proc = self.launch(argv, target)
            if not self.run_id:
                self._wait_for_run(proc)
            if target is not None and self._wait_for(proc, target.phase, target.n, seen):
                return proc, None, answer
            rc = proc.wait(self.timeout)
            pending = self._pending_interrupted() if rc == 4 else None
            if pending is None:
                return None, rc, answer
            if answer is not None:
                raise RuntimeError(f"run {self.run_id} still waits on the call a person answered ({answer})")
            answer = self._answer(str(pending["key"]))
            argv = ["resume", self.run_id, "--no-wait", "--side-effects", answer]

    def _wait_for_run(self, proc: Process) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.db.exists():
                try:
                    self.run_id = self._find_run()
                    return
                except (sqlite3.Error, RuntimeError):
                    pass
            if proc.poll() is not None:
                raise RuntimeError(f"`loopterm run` exited {proc.rc} before creating its run:\n{self.output()}")
            time.sleep(0.01)
        raise TimeoutError("no run was created")

    # -- the kill and the checks

    def kill(self, proc: Process, target: Kill) -> int:
        """SIGKILL the process `offset` seconds into the window; returns its exit status (-9, unless it
        had ended by itself: a kill that came too late on a loaded machine)."""
        time.sleep(target.offset)
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        rc = proc.wait(self.timeout)
        marks = [m for m in self._marks() if m[1] == str(target.n) and m[0] == target.phase]
        events = {m[2] for m in marks}
        for m in marks:  # the killed run's gate would sleep on, orphaned: end it by its pid
            if m[0] == "gate" and m[2] == "enter":
                self._end_orphan(int(m[3]))
        target.hit = rc == -signal.SIGKILL and "enter" in events and "leave" not in events
        if target.phase == "tool":
            target.point = "after the effect" if "effect" in events else "before the effect"
        elif target.phase == "commit":
            target.point = "in the transaction, row inserted" if "inserted" in events else "in the transaction, before the insert"
        elif target.phase == "model":
            target.point = "awaiting the reply"
        elif target.phase == "finish":
            target.point = "converged and committed, end not recorded" if target.n == self.iterations else "after the commit"
        else:
            target.point = "gate command running"
        if rc != -signal.SIGKILL:
            target.point = f"none: the process had ended (exit {rc})"
        return rc

    def _end_orphan(self, pid: int) -> None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return  # already gone
        if str(self.dir / "gate.py") in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _committed_marks(self) -> set[int]:
        return {int(m[1]) for m in self._marks() if m[0] == "committed"}

    def check(self) -> dict[str, Any]:
        """The store and the log, with no process running: what was lost, duplicated, done twice."""
        with self._ro() as db:
            ns = [r[0] for r in db.execute("SELECT n FROM iterations WHERE run_id = ? ORDER BY n", [self.run_id])]
            calls = db.execute("SELECT iteration, key, status FROM tool_calls WHERE run_id = ?", [self.run_id]).fetchall()
            intents = [r[0] for r in db.execute("SELECT n FROM intents WHERE run_id = ?", [self.run_id])]
        per_iteration = Counter(i for i, _, _ in calls)
        rows = self._effect_rows()
        its = Counter(i for i, _, _ in rows)  # one effect per iteration (a key names one iteration's call)
        return {
            "iterations": ns,
            "lost": sorted(self._committed_marks() - set(ns)),
            "duplicated": (len(ns) - len(set(ns))) + sum(c - 1 for c in per_iteration.values()),
            "gaps": ns != list(range(1, len(ns) + 1)),
            "double": sum(c - 1 for c in its.values()),
            "calls": {i: (k, s) for i, k, s in calls},
            "intents": intents,
            "effects": rows,
        }

    def evidence(self, target: Kill, seen: dict[str, Any]) -> str:
        """The store after the kill, as the phase predicts it: '' when it matches, else what differs."""
        n = target.n
        call = seen["calls"].get(n)
        effect = any(i == n for i, _, _ in seen["effects"])
        committed = n in seen["iterations"]
        expect = {
            "model": (not committed, call is None, n not in seen["intents"]),
            "tool": (not committed, call is not None and call[1] == "started", n in seen["intents"],
                     effect == (target.point == "after the effect")),
            "gate": (not committed, call is not None and call[1] == "done", n in seen["intents"], effect),
            "commit": (not committed, call is not None and call[1] == "done", n in seen["intents"], effect),
            "finish": (committed, call is not None and call[1] == "done", n not in seen["intents"], effect),
        }[target.phase]
        if all(expect):
            return ""
        return (f"unexpected store after a {target.phase} kill at {n}: committed={committed} call={call} "
                f"intent={n in seen['intents']} effect={effect}")

    def run(self, kills: list[Kill], index: int = 0) -> RunResult:
        try:
            return self._run(kills, index)
        except BaseException:
            self.abort()
            raise

    def _run(self, kills: list[Kill], index: int) -> RunResult:
        started = time.monotonic()
        result = RunResult(run=index, run_id="", kills=kills)
        argv = ["run", str(self.dir / "faulty.py"), "--headless", "--no-wait"]
        previous: Kill | None = None
        ended: int | None = None  # the run ended by itself before its last kill (a late kill): its exit code
        for target in kills:
            if ended is not None:
                target.point = "none: the run had ended"
                continue
            proc, rc, answer = self.drive(argv, target)
            if previous is not None:
                previous.answer, previous.resumed_rc = answer, rc
            if proc is None:
                ended, target.point = rc, f"none: the run ended (exit {rc}) before this window"
                continue
            rc = self.kill(proc, target)
            if rc != -signal.SIGKILL:
                ended = rc
            seen = self.check()
            target.lost = len(seen["lost"]) - result.lost
            result.lost = len(seen["lost"])
            if previous is not None:  # what the resume after the previous kill did
                previous.duplicated = seen["duplicated"] - result.duplicated
                previous.double = seen["double"] - result.double
            result.duplicated, result.double = seen["duplicated"], seen["double"]
            target.evidence = self.evidence(target, seen)
            previous = target
            argv = ["resume", self.run_id, "--no-wait"]
        result.run_id = self.run_id
        rc, answer = ended, None
        if ended is None:
            _, rc, answer = self.drive(argv, None)
        result.rc = rc if rc is not None else -1
        seen = self.check()
        if previous is not None and ended is None:
            previous.answer, previous.resumed_rc = answer, rc
            previous.duplicated = seen["duplicated"] - result.duplicated
            previous.double = seen["double"] - result.double
            previous.lost += len(seen["lost"]) - result.lost
        result.lost, result.duplicated, result.double = len(seen["lost"]), seen["duplicated"], seen["double"]
        result.iterations = seen["iterations"]
        if seen["gaps"]:
            result.differences.append(f"iterations are not 1..k: {seen['iterations']}")
        result.wall_s = time.monotonic() - started
        return result

    def show(self) -> dict[str, Any]:
        """`loopterm show RUN --json`, as a person would read the run."""
        proc = self.launch(["show", self.run_id, "--json"], None)
        rc = proc.wait(self.timeout)
        text = self.output()
        if rc != 0:
            raise RuntimeError(f"loopterm show exited {rc}: {text}")
        return json.loads(text[text.index("{"):])

    def spend(self) -> tuple[float, int]:
        with self._ro() as db:
            row = db.execute("SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(tokens_in + tokens_out), 0) FROM spend "
                             "WHERE run_id = ?", [self.run_id]).fetchone()
        return float(row[0]), int(row[1])


def outcome(shown: dict[str, Any], effects: list[tuple[int, str, str]]) -> dict[str, Any]:
    """What must be the same as an uninterrupted run's: the run's end, each iteration, the final state.

    Not compared: timings, and the output of a call a person settled (`--side-effects reuse` on an
    interrupted call: its output was never recorded, so the next prompts show a placeholder instead,
    and their input tokens differ by that text). Prompts are compared with tool outputs masked.
    """
    from loopterm.core.tools import TOOK_EFFECT

    run = shown["run"]
    iterations = []
    for it in shown["iterations"]:
        call, result = it.get("tool_call") or {}, it.get("tool_result") or {}
        prompt = json.dumps(it["prompt"])
        iterations.append({
            "n": it["n"], "prompt": re.sub(r'(- iteration \d+ append: )[^\\"]*', r"\1<output>", prompt),
            "raw_response": it["raw_response"], "decision": it["decision"],
            "tool": call.get("tool"), "args": call.get("args"), "ok": result.get("ok"),
            "gates": [(g["name"], g["passed"], g["exit_code"], g["stdout"], g["stderr"]) for g in it["gate_results"]],
            "invariants": it["invariant_status"], "tokens_out": it["tokens_out"],
            "tokens_in": None if TOOK_EFFECT in prompt else it["tokens_in"],
            "settled": result.get("output") == TOOK_EFFECT,
        })
    settled = any(it["settled"] for it in iterations)
    state = dict(shown["iterations"][-1]["state"]) if shown["iterations"] else {}
    state["tool_results"] = [{k: r.get(k) for k in ("iteration", "tool", "args", "ok")}
                             for r in state.get("tool_results", [])]
    return {
        "status": run["status"], "reason": run["termination_reason"], "count": run["iterations"],
        "tokens_out": run["tokens_out"], "tokens_in": None if settled else run["tokens_in"],
        "cost": None if settled else round(run["cost_usd"], 12),
        "iterations": iterations, "state": state, "effects": [(i, line) for i, _, line in effects],
    }


def differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    def same(a: Any, b: Any) -> bool:
        return a is None or b is None or a == b  # None: not comparable (see outcome)

    out = []
    for key in ("status", "reason", "count", "tokens_out", "tokens_in", "cost", "state", "effects"):
        if not same(got[key], want[key]):
            out.append(f"{key}: {str(got[key])[:200]} != reference {str(want[key])[:200]}")
    for a, b in zip(got["iterations"], want["iterations"]):
        for key in a:
            if key != "settled" and not same(a[key], b[key]):
                out.append(f"iteration {a['n']} {key}: {str(a[key])[:200]} != reference {str(b[key])[:200]}")
    if len(got["iterations"]) != len(want["iterations"]):
        out.append(f"{len(got['iterations'])} iterations, reference {len(want['iterations'])}")
    return out


def final_checks(trial: Trial, result: RunResult, reference: dict[str, Any]) -> None:
    """The end of a run: everything once, spend once, the same result as the reference."""
    shown = trial.show()
    run = shown["run"]
    result.status = run["status"]
    n = trial.iterations
    ns = [it["n"] for it in shown["iterations"]]
    if ns != list(range(1, n + 1)):
        result.differences.append(f"iterations {ns}, expected 1..{n}")
    effects = trial._effect_rows()
    if [i for i, _, _ in effects] != list(range(1, n + 1)):
        result.differences.append(f"effects.log iterations {[i for i, _, _ in effects]}, expected 1..{n} once each")
    keys = [(it.get("tool_call") or {}).get("key") for it in shown["iterations"]]
    if [k for _, k, _ in effects] != keys:
        result.differences.append("effects.log keys differ from the store's tool-call keys")
    tokens = sum(it["tokens_in"] + it["tokens_out"] for it in shown["iterations"])
    cost = sum(it["cost_usd"] for it in shown["iterations"])
    ledger_cost, ledger_tokens = trial.spend()
    if tokens != run["tokens_in"] + run["tokens_out"] or abs(cost - run["cost_usd"]) > 1e-12:
        result.differences.append(f"run spend {run['tokens_in'] + run['tokens_out']} tokens ${run['cost_usd']} "
                                  f"!= its iterations' {tokens} tokens ${cost}")
    if ledger_tokens != run["tokens_in"] + run["tokens_out"] or abs(ledger_cost - run["cost_usd"]) > 1e-12:
        result.differences.append(f"spend ledger {ledger_tokens} tokens ${ledger_cost} != the run's")
    found = differences(outcome(shown, effects), reference)
    result.differences.extend(found)
    result.identical = not result.differences


def reference_run(root: Path, launcher: Launcher, iterations: int, window: float) -> dict[str, Any]:
    trial = Trial(root, launcher, iterations, window)
    _, rc, _ = trial.drive(["run", str(trial.dir / "faulty.py"), "--headless", "--no-wait"], None)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted reference run exited {rc}:\n{trial.output()}")
    return outcome(trial.show(), trial._effect_rows())


@dataclass
class Report:
    seed: int
    mode: str
    window_s: float
    iterations: int
    runs: list[RunResult]
    wall_s: float

    @property
    def kills(self) -> list[Kill]:
        return [k for r in self.runs for k in r.kills]

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for phase in ORDER:
            mine = [k for k in self.kills if k.phase == phase]
            if not mine:
                continue
            points = Counter(k.point for k in mine)
            answers = Counter(k.answer for k in mine if k.answer)
            rows.append({
                "phase": phase, "trials": len(mine), "in_window": sum(k.hit for k in mine),
                "store_as_predicted": sum(not k.evidence for k in mine),
                "lost": sum(k.lost for k in mine), "duplicated": sum(k.duplicated for k in mine),
                "double_side_effects": sum(k.double for k in mine), "points": dict(points), "answers": dict(answers),
            })
        return rows

    def ok(self) -> bool:
        return all(r.identical and r.rc == 0 and not (r.lost or r.duplicated or r.double) for r in self.runs) and all(
            k.hit and not k.evidence for k in self.kills)

    def text(self) -> str:
        lines = [f"{len(self.kills)} kills (seed {self.seed}, {self.mode}, window {self.window_s:g}s) over "
                 f"{len(self.runs)} run(s) of {self.iterations} iterations, {self.wall_s:.1f}s wall", ""]
        lines.append(f"{'phase':<8} {'trials':>6} {'in window':>9} {'as predicted':>12} {'lost':>5} {'dup':>4} "
                     f"{'double':>6}  where / a person's answer")
        for row in self.table():
            where = ", ".join(f"{k} {v}" for k, v in sorted(row["points"].items()))
            answers = ", ".join(f"{k} {v}" for k, v in sorted(row["answers"].items()))
            lines.append(f"{row['phase']:<8} {row['trials']:>6} {row['in_window']:>9} {row['store_as_predicted']:>12} "
                         f"{row['lost']:>5} {row['duplicated']:>4} {row['double_side_effects']:>6}  {where}"
                         + (f"; answered {answers}" if answers else ""))
        lines.append("")
        for r in self.runs:
            verdict = "identical to the uninterrupted run" if r.identical else "DIFFERS: " + "; ".join(r.differences[:5])
            lines.append(f"run {r.run} ({r.run_id}): {len(r.kills)} kills, exit {r.rc}, {r.status}, "
                         f"{len(r.iterations)} iterations, {r.wall_s:.1f}s; {verdict}")
        for k in self.kills:
            if not k.hit or k.evidence:
                lines.append(f"  note: run {k.run} {k.phase} kill at {k.n}: "
                             + ("outside its window; " if not k.hit else "") + k.evidence)
        lines.append("")
        lines.append("PASS: nothing lost, nothing duplicated, no side effect twice, every run converged to the "
                     "reference result" if self.ok() else "FAIL")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "mode": self.mode, "window_s": self.window_s, "iterations": self.iterations,
                "wall_s": round(self.wall_s, 2), "ok": self.ok(), "phases": self.table(),
                "runs": [asdict(r) for r in self.runs]}


def trials(root: Path, *, kills: int, runs: int, iterations: int, seed: int, window: float, fork: bool,
           end: bool = True, answer_policy: str = "log", plan: list[list[Kill]] | None = None) -> Report:
    """Run the reference, then each run with its kill points; return the report."""
    started = time.monotonic()
    plan = plan if plan is not None else schedule(seed, kills, runs, iterations, window, end=end)
    results = []
    with Launcher(fork=fork) as launcher:
        reference = reference_run(root / "reference", launcher, iterations, window)
        for index, points in enumerate(plan):
            trial = Trial(root / f"run{index}", launcher, iterations, window, answer_policy=answer_policy)
            result = trial.run(points, index)
            final_checks(trial, result, reference)
            results.append(result)
    return Report(seed=seed, mode="fork" if fork else "fresh", window_s=window, iterations=iterations, runs=results,
                  wall_s=time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30, help="iterations per run (it converges at the last)")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--window", type=float, default=0.6, help="seconds each armed window is held open")
    parser.add_argument("--fork", action="store_true", help="fork processes from a warm launcher (litellm imported once)")
    parser.add_argument("--no-end", action="store_true",
                        help="no extra kill per run after its last commit, before its end is recorded")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="loopterm-crash-"))
    try:
        report = trials(root, kills=args.kills, runs=args.runs, iterations=args.iterations, seed=args.seed,
                        window=args.window, fork=args.fork, end=not args.no_end)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.text())
    return 0 if report.ok() else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "launcher":
        launcher_main(warm="--warm" in sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
