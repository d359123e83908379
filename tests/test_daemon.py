"""`loopterm daemon`, driven as a real subprocess in a scratch project with its own store.

The real components throughout: watchfiles watching a real folder, asyncio schedules, real
commands run as checks, the engine running a scripted loop offline, SIGTERM sent to the process.
Every wait polls a condition with a generous deadline (the machine is slow and shared).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import runlog
from loopterm.core.errors import ConfigError
from loopterm.core.records import RunRecord
from loopterm.core.runlog import EventRecord
from loopterm.core.triggers import Schedule, change_event, command_event, load_triggers, parse_duration
from loopterm.store import Store
from tests.loopkit import escalation_id, kinds, of

CLI = [sys.executable, "-m", "loopterm.tui.cli"]
DEADLINE_S = 120.0

LOOP_FILE = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool

@tool(side_effects=True, idempotent={idempotent})
def note(ctx: ToolContext, line: str) -> str:
    """Append a line to notes.txt in the workspace: a side effect a resume must not repeat."""
    with open(ctx.workspace / "notes.txt", "a") as f:
        f.write(line + "\\n")
    return "noted"

loop = Loop(
    name="notes",
    goal="write the notes",
    state=LoopState,
    tools=[note],
    script=Path(__file__).parent / "script.json",
    max_iterations=20,
    converged=lambda state, gates: state.iteration >= {iterations},
)
'''


def write_project(root: Path, triggers: str, *, iterations: int = 2, delay: float = 0.0, idempotent: bool = False) -> None:
    (root / "notes_loop.py").write_text(LOOP_FILE.replace("{iterations}", str(iterations))
                                        .replace("{idempotent}", str(idempotent)))
    turns = [{"content": {"action": {"tool": "note", "args": {"line": f"note {i}"}}, "subgoal": f"note {i}",
                          "confidence": 0.9, "reasoning": "the next note"}, "delay": delay} for i in range(1, 21)]
    (root / "script.json").write_text(json.dumps({"price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
                                                  "turns": turns}))
    (root / ".loopterm").mkdir(exist_ok=True)
    (root / ".loopterm" / "triggers.toml").write_text(triggers)


def env() -> dict[str, str]:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200"}


class Daemon:
    """A `loopterm daemon` process in `root`; its output goes to files (no pipe can fill up)."""

    def __init__(self, root: Path, *args: str, tag: str = "") -> None:
        self.root = root
        self.out = root / f"daemon{tag}.out"
        self.err = root / f"daemon{tag}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([*CLI, "daemon", *args], cwd=root, env=env(), stdout=out, stderr=err)
        try:
            self.wait_log("daemon: pid ")  # the store exists and has its schema: polling it from here on is safe
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        return self.out.read_text()

    def wait_log(self, text: str, count: int = 1) -> None:
        wait_for(lambda: self.log().count(text) >= count, f"{count}x {text!r} in the daemon's log", self)

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_for(condition: Callable[[], Any], what: str, daemon: Daemon | None = None,
             timeout: float = DEADLINE_S, tick: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if daemon is not None and daemon.proc.poll() is not None:
            pytest.fail(f"the daemon exited ({daemon.proc.returncode}) before {what}:\n{daemon.log()}\n{daemon.err.read_text()}")
        if tick is not None:
            tick()
        time.sleep(0.2)
    details = f"\n{daemon.log()}\n{daemon.err.read_text()}" if daemon is not None else ""
    pytest.fail(f"timed out waiting for {what}{details}")


def runs(root: Path) -> list[RunRecord]:
    db = root / ".loopterm" / "loopterm.db"
    if not db.exists():
        return []
    with Store.open(db, create=False) as store:
        return store.list_runs()

INBOX_TRIGGER = """
[[trigger]]
name = "inbox"
loop = "notes_loop.py"
on.change = "inbox"
debounce = "200ms"
"""


def inbox_run(tmp_path: Path, daemons: list["Daemon"], *daemon_args: str, idempotent: bool = False) -> tuple["Daemon", RunRecord]:
    """A daemon watching inbox/ for a 10-iteration notes loop (0.4 s a tool call), and the run a dropped
    file started there (dropped again until it shows: the watcher may still be settling)."""
    (tmp_path / "inbox").mkdir()
    write_project(tmp_path, INBOX_TRIGGER, iterations=10, delay=0.4, idempotent=idempotent)
    daemon = Daemon(tmp_path, *daemon_args)
    daemons.append(daemon)
    daemon.wait_log("watching inbox for changes")
    counter = iter(range(10_000))

    def drop() -> None:
        (tmp_path / "inbox" / "mail.txt").write_text(str(next(counter)))

    drop()
    return daemon, wait_for(lambda: runs(tmp_path), "a run started by the change", daemon, tick=drop)[0]



def events(root: Path, run_id: str) -> list[EventRecord]:
    with Store.open(root / ".loopterm" / "loopterm.db", create=False) as store:
        return store.events(run_id)


def cli_runs_json(root: Path) -> list[dict[str, Any]]:
    done = subprocess.run([*CLI, "runs", "--json"], cwd=root, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def test_a_file_change_starts_a_run_whose_goal_names_the_file(tmp_path: Path, daemons: list[Daemon]) -> None:
    (tmp_path / "src").mkdir()
    write_project(tmp_path, """
[[trigger]]
name = "on-src"
loop = "notes_loop.py"
on.change = "src"
goal = "Something moved: {event}. Write the notes."
debounce = "200ms"
""")
    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    daemon.wait_log("watching src for changes")
    changed = tmp_path / "src" / "parser.py"
    counter = iter(range(10_000))

    def touch() -> None:  # the watcher starts a moment after the log line: change the file until it is seen
        changed.write_text(f"x = {next(counter)}\n")

    touch()
    started = wait_for(lambda: runs(tmp_path), "a run started by the change", daemon, tick=touch)
    run = started[0]
    assert run.origin == "trigger"
    assert run.goal.startswith("Something moved: files changed: src/parser.py (") and run.goal.endswith("Write the notes.")
    wait_for(lambda: runs(tmp_path)[0].status == "converged", "the run to converge", daemon)
    listed = cli_runs_json(tmp_path)
    assert listed[0]["id"] == run.id and listed[0]["origin"] == "trigger" and listed[0]["status"] == "converged"
    marks = of(events(tmp_path, run.id), runlog.TriggerFired)
    assert marks and marks[0].trigger == "on-src" and "src/parser.py" in marks[0].event
    # The run wrote its workspace (under .loopterm/): that is ignored, so nothing else fired.
    workspace_notes = Path(run.workspace) / "notes.txt"
    assert workspace_notes.read_text().splitlines() == ["note 1", "note 2"]
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.err.read_text()
    log = daemon.log()
    assert f"run {run.id} finished: converged" in log
    assert all(r.goal.startswith("Something moved: files changed: src/parser.py") for r in runs(tmp_path))


def test_a_schedule_fires_with_the_scheduled_time_in_the_goal(tmp_path: Path, daemons: list[Daemon]) -> None:
    write_project(tmp_path, """
[[trigger]]
name = "every-second"
loop = "notes_loop.py"
on.schedule = "every 1s"
""")
    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    wait_for(lambda: len([r for r in runs(tmp_path) if r.status == "converged"]) >= 2, "two scheduled runs", daemon)
    second = subprocess.run([*CLI, "daemon"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"another `loopterm daemon` (pid {daemon.proc.pid}) is running on" in second.stderr
    assert daemon.stop() == 0
    for run in runs(tmp_path):
        assert run.origin == "trigger"
        assert run.goal.startswith("write the notes\n\nWhat triggered this run: scheduled run at ")
        assert run.goal.endswith("(every 1s)")
    assert "trigger 'every-second': fired: scheduled run at" in daemon.log()


def test_a_command_trigger_fires_when_the_command_starts_failing_and_not_while_it_passes(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    write_project(tmp_path, f"""
[[trigger]]
name = "red-tests"
loop = "notes_loop.py"
on.command = ["{sys.executable}", "check.py"]
every = "300ms"
goal = "The check failed: {{event}}"
""")
    (tmp_path / "check.py").write_text(
        "import os, sys\n"
        "with open('checks.log', 'a') as f:\n    f.write('check\\n')\n"
        "if os.path.exists('broken'):\n    print('3 failed, 9 passed')\n    sys.exit(1)\n"
    )
    checks = tmp_path / "checks.log"

    def checks_run() -> int:
        return len(checks.read_text().splitlines()) if checks.exists() else 0

    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    wait_for(lambda: checks_run() >= 4, "four passing checks", daemon)
    assert runs(tmp_path) == []  # exit code 0, four times over: nothing started
    (tmp_path / "broken").write_text("")
    started = wait_for(lambda: runs(tmp_path), "a run started by the failing check", daemon)
    run = started[0]
    assert run.origin == "trigger"
    assert run.goal.startswith("The check failed: `") and "exited with code 1; last output:\n3 failed, 9 passed" in run.goal
    wait_for(lambda: runs(tmp_path)[0].status == "converged", "the run to converge", daemon)
    seen = checks_run()
    wait_for(lambda: checks_run() >= seen + 4, "four more (failing) checks", daemon)
    assert len(runs(tmp_path)) == 1  # still failing is not a new failure: one run per pass -> fail transition
    (tmp_path / "broken").unlink()
    daemon.wait_log("the command passes again")
    (tmp_path / "broken").write_text("")
    wait_for(lambda: len(runs(tmp_path)) == 2, "a second run after pass -> fail again", daemon)
    assert daemon.stop() == 0


def test_the_daily_budget_refuses_a_run_and_the_daemon_keeps_going(tmp_path: Path, daemons: list[Daemon]) -> None:
    write_project(tmp_path, """
[[trigger]]
name = "every-second"
loop = "notes_loop.py"
on.schedule = "every 1s"
""")
    budget = subprocess.run([*CLI, "budget", "--set-daily", "0"], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert budget.returncode == 0, budget.stderr
    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    daemon.wait_log("refused: the daily budget is spent", count=3)  # refused again and again, still serving
    assert daemon.proc.poll() is None
    recorded = runs(tmp_path)
    assert len(recorded) == 1  # one record for the streak of refusals, not one per firing
    run = recorded[0]
    assert run.status == "terminated" and run.iterations == 0 and run.cost_usd == 0
    assert run.origin == "trigger" and run.message is not None and "daily budget is spent" in run.message
    refusals = of(events(tmp_path, run.id), runlog.TriggerRefused)
    assert len(refusals) >= 3
    assert not of(events(tmp_path, run.id), runlog.RunStarted)
    # Raise the budget: the next firing runs.
    raised = subprocess.run([*CLI, "budget", "--set-daily", "5"], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert raised.returncode == 0, raised.stderr
    wait_for(lambda: any(r.status == "converged" for r in runs(tmp_path)), "a run once the budget allows it", daemon)
    assert daemon.stop() == 0


def test_sigterm_stops_cleanly_and_a_restart_resumes_the_run_to_the_end(tmp_path: Path, daemons: list[Daemon]) -> None:
    first, run = inbox_run(tmp_path, daemons, "--grace", "60")
    wait_for(lambda: runs(tmp_path)[0].iterations >= 2, "two committed iterations", first)
    assert first.stop() == 0
    stderr = first.err.read_text()
    assert "Traceback" not in stderr and stderr.strip() == "", stderr
    stopped = runs(tmp_path)[0]
    assert stopped.id == run.id and stopped.status == "stopped" and 2 <= stopped.iterations < 10
    stored = kinds(events(tmp_path, run.id))
    assert "daemon_interrupted" in stored and stored[-1] == "run_finished"
    assert "daemon: SIGTERM received; stopping" in first.log() and first.log().rstrip().endswith("daemon: stopped")

    second = Daemon(tmp_path, tag="2")
    daemons.append(second)
    second.wait_log(f"run {run.id} resumed after iteration {stopped.iterations}")
    wait_for(lambda: runs(tmp_path)[0].status == "converged", "the resumed run to converge", second)
    assert second.stop() == 0
    final = runs(tmp_path)
    assert len(final) == 1  # resumed, not started again
    assert final[0].iterations == 10
    stored = kinds(events(tmp_path, run.id))
    assert stored.count("run_started") == 1 and stored.count("run_resumed") == 1 and "daemon_resumed" in stored
    # Every iteration's side effect happened once: nothing lost, nothing repeated across the stop.
    notes = (Path(run.workspace) / "notes.txt").read_text().splitlines()
    assert notes == [f"note {i}" for i in range(1, 11)]


def test_a_restart_resumes_a_run_the_daemon_crashed_in(tmp_path: Path, daemons: list[Daemon]) -> None:
    # idempotent: a SIGKILL may land inside the tool, so it may run again
    first, run = inbox_run(tmp_path, daemons, idempotent=True)
    wait_for(lambda: runs(tmp_path)[0].iterations >= 2, "two committed iterations", first)
    first.kill()  # SIGKILL: no chance to record anything
    assert runs(tmp_path)[0].status == "running"
    second = Daemon(tmp_path, tag="2")
    daemons.append(second)
    second.wait_log(f"run {run.id} resumed after iteration")  # at once: the killed daemon's process is gone
    assert "looks alive" not in second.log()
    wait_for(lambda: runs(tmp_path)[0].status == "converged", "the resumed run to converge", second)
    assert second.stop() == 0
    assert len(runs(tmp_path)) == 1 and runs(tmp_path)[0].iterations == 10


@pytest.mark.parametrize("triggers, expected", [
    ('[[trigger]]\nname = "x"\nloop = "notes_loop.py"\non.schedule = "*/5 * * *"\n',
     "trigger 'x': on.schedule: not a cron expression"),
    ('[[trigger]]\nname = "x"\nloop = "notes_loop.py"\non.change = "src"\non.command = "ls"\n',
     "trigger 'x': on: give exactly one of on.change, on.schedule, on.command"),
    ('[[trigger]]\nname = "x"\nloop = "notes_loop.py"\non.command = "ls"\nevery = "soon"\n',
     "trigger 'x': every: not a duration: 'soon'"),
    ('[[trigger]]\nname = "x"\nloop = "no-such-loop"\non.schedule = "every 1m"\n', "trigger 'x': loop: "),
    ('[[trigger]]\nname = "x"\nloop = "notes_loop.py"\non.change = "missing/"\n',
     "trigger 'x': on.change: 'missing/' does not exist"),
    ('[[trigger]]\nname = "x"\nloop = "notes_loop.py"\non.schedule = "every 1m"\ncolour = "red"\n',
     "trigger 'x': colour: unknown field"),
    ('[[trigger]\nname = "x"\n', "not valid TOML"),
    ('', "no [[trigger]] table"),
])
def test_a_malformed_triggers_file_is_one_line_and_exit_2(tmp_path: Path, triggers: str, expected: str) -> None:
    write_project(tmp_path, triggers)
    done = subprocess.run([*CLI, "daemon"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("loopterm: .loopterm/triggers.toml: ") and expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert runs(tmp_path) == []  # nothing ran, nothing was recorded


GATED_LOOP = '''
from pathlib import Path
from loopterm.core import Invariant, Loop, LoopState, Remediation, ToolContext, tool

@tool(side_effects=True, idempotent=True)
def note(ctx: ToolContext, line: str) -> str:
    """Append a line to notes.txt in the workspace."""
    with open(ctx.workspace / "notes.txt", "a") as f:
        f.write(line + "\\n")
    return "noted"

loop = Loop(
    name="gated",
    goal="write four notes, with a person's nod after the second",
    state=LoopState,
    tools=[note],
    script=Path(__file__).parent / "script.json",
    max_iterations=10,
    invariants=[Invariant(name="nodded", check=lambda state: state.iteration != 2, remediation=Remediation.ESCALATE,
                          description="a person looks at the second note")],
    converged=lambda state, gates: state.iteration >= 4,
)
'''


def test_a_run_waiting_for_a_person_blocks_no_other_trigger_and_goes_on_when_answered(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    write_project(tmp_path, """
[[trigger]]
name = "gated"
loop = "gated.py"
on.schedule = "every 1s"

[[trigger]]
name = "plain"
loop = "notes_loop.py"
on.schedule = "every 1s"
""")
    (tmp_path / "gated.py").write_text(GATED_LOOP)
    daemon = Daemon(tmp_path)
    daemons.append(daemon)

    def gated() -> list[RunRecord]:
        return [r for r in runs(tmp_path) if r.loop == "gated"]

    waiting = wait_for(lambda: [r for r in gated() if r.status == "escalated"], "the gated run to escalate", daemon)[0]
    daemon.wait_log(f"run {waiting.id} escalated at iteration 2 and waits for a person: `loopterm watch {waiting.id}`")
    # Meanwhile the other trigger keeps starting runs that finish.
    wait_for(lambda: len([r for r in runs(tmp_path) if r.loop == "notes" and r.status == "converged"]) >= 3,
             "three runs of the other trigger while the gated run waits", daemon)
    assert [r.id for r in gated()] == [waiting.id]  # its own trigger queued, not a second run alongside
    assert gated()[0].status == "escalated" and gated()[0].iterations == 2
    # Answer through the store's control channel, as `loopterm watch` does.
    with Store.open(tmp_path / ".loopterm" / "loopterm.db", create=False) as store:
        store.add_command(waiting.id, "resume", {"escalation": escalation_id(store, waiting.id)})
    wait_for(lambda: next(r for r in gated() if r.id == waiting.id).status == "converged", "the answered run to converge",
             daemon)
    assert next(r for r in gated() if r.id == waiting.id).iterations == 4
    assert daemon.stop() == 0


# ---------------------------------------------------------------------------- the triggers file, in process


def test_the_triggers_file_model(tmp_path: Path) -> None:
    path = tmp_path / "triggers.toml"
    path.write_text("""
[[trigger]]
name = "a"
loop = "codefix"
on.change = ["src", "tests/"]
goal = "Look at {event}; keep {braces} as written"
budget_usd = 0.25

[[trigger]]
name = "b"
loop = "codefix"
on.command = "pytest -q 'tests/test x.py'"
timeout = "90s"

[[trigger]]
name = "c"
loop = "codefix"
on.schedule = "every 10m"
""")
    a, b, c = load_triggers(path).trigger
    assert a.on.kind == "change" and a.on.change == ["src", "tests/"] and a.debounce == 1.0 and a.budget_usd == 0.25
    assert a.goal_for("the loop's goal", "files changed: src/x.py (modified)") == \
        "Look at files changed: src/x.py (modified); keep {braces} as written"
    assert b.on.command == ["pytest", "-q", "tests/test x.py"] and b.every == 60.0 and b.timeout == 90.0
    assert b.goal_for("Fix it.", "`pytest` exited with code 1") == \
        "Fix it.\n\nWhat triggered this run: `pytest` exited with code 1"
    assert c.schedule.interval == 600.0 and c.schedule.next_after(1_000.0) == 1_600.0


def test_durations_and_schedules() -> None:
    assert [parse_duration(v) for v in ("500ms", "2s", "10m", "1h", "1d", 3, "1.5m")] == \
        [0.5, 2.0, 600.0, 3600.0, 86400.0, 3.0, 90.0]
    for bad in ("soon", "0s", "-1s", "1 week", True, float("inf")):
        with pytest.raises(ValueError):
            parse_duration(bad)
    every_five = Schedule.parse("*/5 * * * *")
    start = 1_700_000_123.0
    fires = every_five.next_after(start)
    assert start < fires <= start + 300 and int(fires) % 60 == 0
    assert every_five.next_after(fires) - fires == 300.0
    with pytest.raises(ValueError, match="not a cron expression"):
        Schedule.parse("*/5 * * *")


def test_event_texts_are_capped_and_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    many = change_event([f"src/f{i:02}.py (modified)" for i in range(30)])
    assert many.startswith("files changed: src/f00.py (modified), ") and many.endswith(" and 10 more")
    key = "sk-" + "a1B2c3D4e5F6g7H8i9J0" * 2
    monkeypatch.setenv("OPENAI_API_KEY", key)
    text = command_event(["pytest", "-q"], 1, None, "x" * 5_000 + f"\nleaked {key}\n", "")
    assert text.startswith("`pytest -q` exited with code 1; last output:\n…") and len(text) < 1_700
    assert key not in text
    assert command_event(["slow"], None, "timed out after 5s", "", "") == "`slow` failed: timed out after 5s"


def test_a_missing_triggers_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"triggers.toml: no such file; write one"):
        load_triggers(tmp_path / "triggers.toml")


async def test_loopterm_watch_attaches_to_a_daemon_run_and_answers_it(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The person's side, in the real TUI: `loopterm watch RUN` on a run the daemon started and that waits."""
    import asyncio

    from loopterm.tui.app import LooptermApp
    from loopterm.tui.screens.escalations import EscalationScreen

    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    write_project(tmp_path, """
[[trigger]]
name = "gated"
loop = "gated.py"
on.schedule = "every 1s"
""")
    (tmp_path / "gated.py").write_text(GATED_LOOP)
    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    deadline = time.monotonic() + DEADLINE_S
    while not [r for r in runs(tmp_path) if r.status == "escalated"]:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.log()
        await asyncio.sleep(0.2)
    run_id = runs(tmp_path)[0].id
    app = LooptermApp(tmp_path / ".loopterm" / "loopterm.db", watch_run=run_id, theme="textual-dark", frozen=True)
    async with app.run_test(size=(140, 40)) as pilot:
        while not (app.view is not None and not app.view.loading and app.timeline.row_count == 2):
            assert time.monotonic() < deadline, "the watched run's two iterations never showed"
            await pilot.pause(0.1)
        # space does not go past an escalation: it opens the escalation, whose r is the answer that goes on
        await pilot.press("space")
        while not isinstance(app.screen, EscalationScreen):
            assert time.monotonic() < deadline, "space did not open the run's escalation"
            await pilot.pause(0.1)
        assert app.store.get_run(run_id).status == "escalated"
        await pilot.press("r")  # answer: go on
        while app.store.get_run(run_id).status != "converged":
            assert time.monotonic() < deadline, f"the run never converged after the answer:\n{daemon.log()}"
            await pilot.pause(0.2)
    assert runs(tmp_path)[0].iterations == 4
    stored = kinds(events(tmp_path, run_id))
    assert "escalated" in stored and stored.index("escalated") < stored.index("run_finished")
    assert daemon.stop() == 0


def test_a_store_that_is_not_a_database_is_one_line_and_left_untouched(tmp_path: Path) -> None:
    write_project(tmp_path, '[[trigger]]\nname = "x"\nloop = "notes_loop.py"\non.schedule = "every 1m"\n')
    db = tmp_path / ".loopterm" / "loopterm.db"
    db.write_text("my notes, not a database\n" * 100)
    done = subprocess.run([*CLI, "daemon"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "is not a SQLite database" in done.stderr and "Traceback" not in done.stderr
    assert db.read_text() == "my notes, not a database\n" * 100
    assert sorted(p.name for p in db.parent.iterdir()) == ["loopterm.db", "triggers.toml"]  # no lock, no workspace


def test_a_run_a_person_stopped_is_not_resumed_on_restart(tmp_path: Path, daemons: list[Daemon]) -> None:
    first, run = inbox_run(tmp_path, daemons)
    with Store.open(tmp_path / ".loopterm" / "loopterm.db", create=False) as store:
        store.add_command(run.id, "stop", {"reason": "not now"})  # what `loopterm watch` sends for `s`
    # By the run's id: a file dropped while the first run was starting may queue a second firing, which
    # starts once this run stops (and, interrupted by the first daemon's stop, is resumed by the second).
    def this() -> RunRecord:
        return next(r for r in runs(tmp_path) if r.id == run.id)

    wait_for(lambda: this().status == "stopped", "the run to stop", first)
    assert first.stop() == 0
    second = Daemon(tmp_path, tag="2")
    daemons.append(second)
    second.wait_log("watching inbox for changes")  # interrupted runs are resumed before watching starts
    assert f"run {run.id} resumed" not in second.log()
    assert second.stop() == 0
    assert this().status == "stopped" and this().message == "not now"


def test_watching_the_whole_project_ignores_the_store_and_the_runs_workspaces(tmp_path: Path, daemons: list[Daemon]) -> None:
    write_project(tmp_path, """
[[trigger]]
name = "anything"
loop = "notes_loop.py"
on.change = "."
debounce = "200ms"
""")
    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    daemon.wait_log("watching . for changes")
    counter = iter(range(10_000))

    def touch(name: str) -> Callable[[], None]:
        return lambda: (tmp_path / name).write_text(str(next(counter)))

    touch("first.txt")()
    wait_for(lambda: runs(tmp_path), "a run for first.txt", daemon, tick=touch("first.txt"))
    wait_for(lambda: all(r.status == "converged" for r in runs(tmp_path)), "the run to converge", daemon)
    # The run wrote its workspace and the store (both under .loopterm/). A later change is the barrier:
    # had those writes fired the trigger, that run would come first.
    touch("second.txt")()
    wait_for(lambda: any("second.txt" in r.goal for r in runs(tmp_path)), "a run for second.txt", daemon,
             tick=touch("second.txt"))
    assert daemon.stop() == 0
    goals = [r.goal for r in runs(tmp_path)]
    assert not any(".loopterm" in goal for goal in goals), goals
    assert all("first.txt" in goal or "second.txt" in goal for goal in goals), goals
