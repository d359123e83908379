"""A distributed trial: two `loopterm worker` processes, runs submitted from a third, the store read from a
fourth, workers SIGKILLed inside side-effecting calls, a person answering from elsewhere.

    python bench/cluster_trial.py                     # 6 runs x 6 iterations, 4 kills, seed 1
    python bench/cluster_trial.py --runs 10 --kills 8 --seed 3 --json
    python bench/cluster_trial.py --db postgresql://me@host/empty_db   # a server of your own

Processes (each its own interpreter): a real PostgreSQL (started in a temporary folder unless --db names
one) holds the store and the queues. Two workers (`loopterm worker --concurrency 3`). The runs are
submitted with `loopterm run LOOP --submit`, one process each. A reader (`cluster_trial.py reader`) polls
the store the whole time, as `loopterm watch` does, and records every iteration it sees: one seen to go
back or twice is an error. This harness is the person: it answers what the runs wait on through the store
(a command, as an inbox sends it) and with `loopterm resume RUN --side-effects reuse|reexecute --submit`.

The loop's tool appends one line per call to effects.log outside any workspace (not idempotent: its
idempotency key is written with it, never checked). While armed, each call holds a window open on both
sides of its effect; the harness SIGKILLs the worker inside it, --kills times, alternating before and after
the effect, and starts a new worker (another id) each time. The surviving worker notices the dead one (its
advisory lock is free) and puts its segments back on the queue; the run resumes from its journal, and the
interrupted call waits for a person, who answers from the log as a person would (reuse: it happened;
reexecute: it did not). One run's script asks a question (a "?" line): it escalates on whichever worker
runs it and is answered from here.

Checked at the end: every run converged; iterations 1..N once each per run; each (run, iteration)'s effect in
effects.log exactly once, with the key the store holds; the reader saw nothing lost or repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOP = '''
import os, time
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool
from loopterm.core.invariants import Invariant, Remediation

HERE = Path(__file__).resolve().parent


def mark(text):
    with open(HERE / "marks.log", "a") as f:
        f.write(f"{text} {os.getpid()} {time.time()}\\n")


@tool(side_effects=True, idempotent=False)
def append(ctx: ToolContext, line: str) -> str:
    """Append a line to effects.log outside any workspace: a real, non-idempotent side effect."""
    armed = (HERE / "armed").exists()
    if armed:
        mark(f"enter {ctx.run_id} {ctx.iteration}")
        time.sleep(0.4)
    with open(HERE / "effects.log", "a") as f:
        f.write(f"{ctx.run_id} {ctx.iteration} {ctx.idempotency_key}\\n")
    if armed:
        mark(f"effect {ctx.run_id} {ctx.iteration}")
        time.sleep(0.4)
    return "appended"


def no_question(state):
    return not state.tool_results or "?" not in str(state.tool_results[-1].args)


loop = Loop(name="trial", goal="append the lines", state=LoopState, tools=[append],
            invariants=[Invariant(name="no_question", check=no_question, remediation=Remediation.ESCALATE,
                                  description="a line is never a question")],
            script=HERE / "script.json", max_iterations={n} + 4,
            converged=lambda state, gates: state.iteration >= {n})
'''


def script_for(lines: list[str]) -> dict[str, Any]:
    return {"turns": [{"content": {"action": {"tool": "append", "args": {"line": line}}, "subgoal": line,
                                   "confidence": 0.9, "reasoning": "the next line"}, "delay": 0.05} for line in lines]}


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPTERM_")}
    return {**base, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def cli(url: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loopterm.tui.cli", *args, "--db", url], cwd=folder, env=env(),
                          capture_output=True, text=True, timeout=180)


class Trial:
    def __init__(self, url: str, folder: Path, args: argparse.Namespace) -> None:
        self.url, self.folder, self.args = url, folder, args
        self.rng = random.Random(args.seed)
        self.workers: dict[str, subprocess.Popen[str]] = {}
        self.started = 0
        self.kills: list[dict[str, Any]] = []
        self.answers: list[str] = []

    def worker(self) -> None:
        name = f"trial-{self.started}"
        self.started += 1
        out = (self.folder / f"{name}.out").open("w")
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "loopterm.tui.cli", "worker", "--db", self.url, "--id", name, "--concurrency", "3",
             "--poll", "0.5"], cwd=self.folder, env=env(), stdout=out, stderr=subprocess.STDOUT, text=True)

    def outputs(self) -> str:
        return "".join((self.folder / f"{name}.out").read_text() for name in self.workers)

    def run(self) -> dict[str, Any]:
        from loopterm.store import Store

        n = self.args.iterations
        (self.folder / "trial.py").write_text(LOOP.replace("{n}", str(n)))
        lines = [f"line {i}" for i in range(1, n + 5)]
        (self.folder / "script.json").write_text(json.dumps(script_for(lines)))
        asking = self.folder / "asking"  # one run's own copy, whose script asks a question at iteration 2
        asking.mkdir()
        # Its own name: a scripted model is registered by the loop's name in a worker's process.
        (asking / "trial.py").write_text((self.folder / "trial.py").read_text().replace('name="trial"', 'name="asking"'))
        (asking / "script.json").write_text(json.dumps(script_for([lines[0], "may I?", *lines[1:]])))
        (asking / "effects.log").touch()
        (self.folder / "effects.log").touch()
        (self.folder / "armed").touch()
        Store.open(self.url).close()
        reader = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "reader", self.url,
                                   str(self.folder / "reader.json")], cwd=self.folder, env=env())
        self.worker()
        self.worker()
        began = time.monotonic()
        submits = [subprocess.Popen([sys.executable, "-m", "loopterm.tui.cli", "run",
                                     str(asking / "trial.py" if i == 0 else self.folder / "trial.py"), "--submit",
                                     "--db", self.url], cwd=self.folder, env=env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for i in range(self.args.runs)]
        ids = []
        for proc in submits:  # from third processes, all at once
            out, err = proc.communicate(timeout=180)
            if proc.returncode != 0:
                raise SystemExit(err)
            ids.append(out.strip())
        submitted = time.monotonic() - began
        try:
            self.drive(ids)
        finally:
            (self.folder / "stop").touch()
            reader.wait(timeout=30)
            for proc in self.workers.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.workers.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        wall = time.monotonic() - began
        return self.check(ids, wall, submitted)

    def kill_in_windows(self) -> None:
        """Tail marks.log; SIGKILL the worker inside a fresh window (alternately before and after the effect),
        then start a new worker, until --kills kills."""
        marks = self.folder / "marks.log"
        seen = 0
        while len(self.kills) < self.args.kills and not (self.folder / "stop").exists():
            text = marks.read_text().splitlines() if marks.exists() else []
            for line in text[seen:]:
                seen += 1
                phase, run_id, n, pid, at = line.split()
                want = "enter" if len(self.kills) % 2 == 0 else "effect"
                victim = next((name for name, p in self.workers.items() if p.pid == int(pid) and p.poll() is None), None)
                if phase != want or victim is None or time.time() - float(at) > 0.2 or self.rng.random() < 0.3:
                    continue
                time.sleep(self.rng.uniform(0.02, 0.15))  # inside the 0.4 s window on that side of the effect
                self.workers[victim].send_signal(signal.SIGKILL)
                self.workers[victim].wait()
                self.kills.append({"worker": victim, "run": run_id, "iteration": int(n), "phase": phase,
                                   "at": time.strftime("%H:%M:%S")})
                self.worker()  # a new worker joins
                break
            time.sleep(0.02)
        (self.folder / "armed").unlink(missing_ok=True)

    def drive(self, ids: list[str]) -> None:
        """Kill inside windows, answer what waits, until every run converged."""
        from loopterm.core.control import AddFact, Resume, command_payload
        from loopterm.core.fold import fold
        from loopterm.store import Store

        killer = threading.Thread(target=self.kill_in_windows, daemon=True)
        killer.start()
        deadline = time.monotonic() + 600
        with Store.open(self.url) as store:
            while time.monotonic() < deadline:
                statuses = {r: store.get_run(r).status for r in ids}
                if all(s == "converged" for s in statuses.values()):
                    return
                for run_id, status in statuses.items():
                    if status in ("failed", "terminated", "stopped"):
                        raise SystemExit(f"run {run_id} ended {status}: {store.get_run(run_id).message}")
                    if status != "escalated" or store.pending_commands(run_id):
                        continue
                    view = fold(store.events(run_id))
                    if view.escalation is not None:
                        base = store.get_run(run_id).iterations
                        for command in (AddFact(fact="lines are statements", base_iteration=base),
                                        Resume(escalation=view.escalation.event_id)):
                            store.add_command(run_id, *command_payload(command))
                        why = " ".join(view.escalation.packet.summary.split())[:120]
                        self.answers.append(f"{run_id}: escalation at {view.escalation.iteration} answered through "
                                            f"the store ({why})")
                    elif view.side_effect is not None:
                        key = view.side_effect.asked.key
                        happened = key in self.effects_text()
                        answer = "reuse" if happened else "reexecute"
                        done = cli(self.url, self.folder, "resume", run_id, "--side-effects", answer, "--submit")
                        if done.returncode != 0:
                            raise SystemExit(done.stderr)
                        self.answers.append(f"{run_id}: side effect at {view.side_effect.iteration}: {answer}")
                time.sleep(0.2)
        raise SystemExit("timed out: " + self.outputs()[-3000:])

    def effects_text(self) -> str:
        return "".join(p.read_text() for p in (self.folder / "effects.log", self.folder / "asking" / "effects.log")
                       if p.exists())

    def check(self, ids: list[str], wall: float, submitted: float) -> dict[str, Any]:
        from collections import Counter

        from loopterm.store import Store

        n = self.args.iterations
        effects = [line.split() for line in self.effects_text().splitlines()]
        per = Counter((run, int(it)) for run, it, _ in effects)
        problems: list[str] = []
        with Store.open(self.url) as store:
            for run_id in ids:
                run = store.get_run(run_id)
                its = store.iterations(run_id)
                if run.status != "converged":
                    problems.append(f"{run_id} {run.status}")
                if [i.n for i in its] != list(range(1, n + 1)):
                    problems.append(f"{run_id} iterations {[i.n for i in its]}")
                for i in its:
                    if per[(run_id, i.n)] != 1:
                        problems.append(f"{run_id} iteration {i.n}: effect {per[(run_id, i.n)]} times")
                    key = (i.tool_call or {}).get("key")
                    if not any(e[0] == run_id and int(e[1]) == i.n and e[2] == key for e in effects):
                        problems.append(f"{run_id} iteration {i.n}: effect key differs from the store's")
            asking = [e.event.kind for e in store.events(ids[0])]
        reader = json.loads((self.folder / "reader.json").read_text())
        problems += reader["problems"]
        out = self.outputs()
        return {
            "runs": len(ids), "iterations_per_run": n, "kills": len(self.kills), "kill_detail": self.kills,
            "asking_run": {"id": ids[0], "escalated": asking.count("escalated"),
                           "answered": asking.count("escalation_answered")},
            "takeovers": out.count("is gone:"), "taken_over": sorted(set(re.findall(r"worker (\S+) is gone", out))),
            "warnings": [line for line in out.splitlines() if "⚠" in line and "is gone" not in line],
            "log": sorted(f"{line[:8]} {name}: {line[9:]}" for name in self.workers
                          for line in (self.folder / f"{name}.out").read_text().splitlines()) if self.args.json else [], "answers": self.answers, "segments_started": out.count("▶ run "),
            "reader_polls": reader["polls"], "wall_s": round(wall, 1), "submit_s": round(submitted, 1),
            "lost_or_duplicated_or_double": len(problems), "problems": problems[:20],
        }


def reader(url: str, out: str) -> None:
    """The fourth process: reads the store as `watch` does until told to stop; records what it saw."""
    from loopterm.store import Store

    stop = Path(out).parent / "stop"
    seen: dict[str, int] = {}
    problems: list[str] = []
    polls = 0
    with Store.open(url) as store:
        while not stop.exists():
            polls += 1
            for run in store.list_runs():
                numbers = [i.n for i in store.iterations(run.id)]
                if len(numbers) != len(set(numbers)):
                    problems.append(f"reader: run {run.id} holds an iteration twice: {numbers}")
                if numbers and numbers != list(range(1, len(numbers) + 1)):
                    problems.append(f"reader: run {run.id} has a gap: {numbers}")
                if len(numbers) < seen.get(run.id, 0):
                    problems.append(f"reader: run {run.id} went back from {seen[run.id]} to {len(numbers)}")
                seen[run.id] = max(seen.get(run.id, 0), len(numbers))
            time.sleep(0.1)
    Path(out).write_text(json.dumps({"polls": polls, "problems": sorted(set(problems)), "seen": seen}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "reader":
        reader(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--db", help="a PostgreSQL URL of your own (an empty database)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    server = None
    if args.db is None:
        from tests.pgserver import start_server

        server = start_server()
    try:
        url = args.db or server.fresh_database()  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(prefix="loopterm-trial-") as scratch:
            report = Trial(url, Path(scratch), args).run()
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['runs']} runs x {report['iterations_per_run']} iterations on 2 workers (+{report['kills']} "
              f"started after kills), {report['wall_s']} s")
        print(f"  kills inside side-effecting calls: {report['kills']}; dead workers taken over: "
              f"{len(report['taken_over'])}; segments: {report['segments_started']}; a person's answers: "
              f"{len(report['answers'])} (the escalation raised on a worker answered from here: "
              f"{report['asking_run']['answered']} of {report['asking_run']['escalated']})")
        print(f"  reader polls: {report['reader_polls']}; lost, duplicated or double effects: "
              f"{report['lost_or_duplicated_or_double']}")
        for problem in report["problems"]:
            print(f"  ✗ {problem}")
    sys.exit(1 if report["lost_or_duplicated_or_double"] else 0)


if __name__ == "__main__":
    main()
