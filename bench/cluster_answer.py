"""From a person's answer to the run going on again on a worker: the store's notifications against the poll.

    python bench/cluster_answer.py              # 6 answers each way
    python bench/cluster_answer.py --answers 10 --poll 2 --json

A run on a worker escalates every other iteration (a line that is a question); each time, this process
answers it as an inbox does (a command through the store) and times how long until the run's status is
`running` again: the worker saw the answer, queued the next segment, dequeued it and the engine took the
answer. Two setups, each with a real `loopterm worker` and a real PostgreSQL (started in a temporary
folder): the store in PostgreSQL, whose commits notify the worker (its --poll set to 60 s, so only a
notification can wake it), and a SQLite store with the queues in PostgreSQL (LOOPTERM_QUEUE_DB), where
the worker finds answers by looking every --poll seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
from loopterm.core.invariants import Invariant, Remediation

@tool
def say(line: str) -> str:
    """Say a line."""
    return line

def no_question(state):
    return not state.tool_results or "?" not in str(state.tool_results[-1].args)

loop = Loop(name="asking", goal="say the lines", state=LoopState, tools=[say], script=Path(__file__).parent / "script.json",
            invariants=[Invariant(name="no_question", check=no_question, remediation=Remediation.ESCALATE,
                                  description="a line is never a question")],
            max_iterations={n} + 2, converged=lambda state, gates: state.iteration >= {n})
'''


def measure(store_db: str, queue_db: str | None, folder: Path, answers: int, poll: float) -> list[float]:
    from loopterm.core.control import AddFact, Resume, command_payload
    from loopterm.core.fold import fold
    from loopterm.store import Store

    n = answers * 2
    (folder / "asking.py").write_text(LOOP.replace("{n}", str(n)))
    lines = [f"line {i}?" if i % 2 else f"line {i}" for i in range(1, n + 3)]
    (folder / "script.json").write_text(json.dumps({"turns": [
        {"content": {"action": {"tool": "say", "args": {"line": line}}, "subgoal": line, "confidence": 0.9,
                     "reasoning": "next"}, "delay": 0.01} for line in lines]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPTERM_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    if queue_db:
        env["LOOPTERM_QUEUE_DB"] = queue_db
    cli = [sys.executable, "-m", "loopterm.tui.cli"]
    out = (folder / "worker.out").open("w")
    worker = subprocess.Popen([*cli, "worker", "--db", store_db, "--id", "answers", "--poll", str(poll)], cwd=folder,
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while " up to " not in (folder / "worker.out").read_text():
            time.sleep(0.1)
        run_id = subprocess.run([*cli, "run", str(folder / "asking.py"), "--submit", "--db", store_db], cwd=folder,
                                env=env, capture_output=True, text=True, check=True).stdout.strip()
        took: list[float] = []
        with Store.open(store_db) as store:
            while len(took) < answers:
                run = store.get_run(run_id)
                view = fold(store.events(run_id))
                if run.status != "escalated" or view.escalation is None:
                    time.sleep(0.02)
                    continue
                time.sleep(0.3)  # the segment has ended: the answer finds the run idle, as a person's would
                for command in (AddFact(fact="lines are statements", base_iteration=run.iterations),
                                Resume(escalation=view.escalation.event_id)):
                    store.add_command(run_id, *command_payload(command))
                sent = time.monotonic()
                while store.get_run(run_id).status == "escalated":
                    time.sleep(0.01)
                took.append(time.monotonic() - sent)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=6)
    parser.add_argument("--poll", type=float, default=2.0, help="the SQLite setup's worker --poll")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    from tests.pgserver import start_server

    server = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="loopterm-answers-") as a, tempfile.TemporaryDirectory() as b:
            url = server.fresh_database()
            notified = measure(url, None, Path(a), args.answers, 60.0)
            polled = measure(str(Path(b) / "store.db"), server.fresh_database(), Path(b), args.answers, args.poll)
    finally:
        server.stop()

    def spread(values: list[float]) -> dict[str, float]:
        return {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}

    report: dict[str, Any] = {"answers": args.answers, "notified": spread(notified),
                              "polled": {**spread(polled), "poll_s": args.poll}}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.answers} answers each; time from the answer's commit to the run running again on the worker")
    print(f"  PostgreSQL store, notifications: median {report['notified']['median_s']:.2f} s, "
          f"max {report['notified']['max_s']:.2f} s")
    print(f"  SQLite store, poll every {args.poll:g} s: median {report['polled']['median_s']:.2f} s, "
          f"max {report['polled']['max_s']:.2f} s")


if __name__ == "__main__":
    main()
