"""Replay: re-drive a run's loop with its recorded model outputs and report the first divergence.

Offline, through the real litellm path (the replay/<run> custom provider) and a real store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.tui.cli import main
from tests.loopkit import escalation_id

CLI = [sys.executable, "-m", "loopterm.tui.cli"]

LOOP_FILE = '''
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from loopterm.core import CommandGate, Invariant, Loop, Remediation, ToolContext, tool

HERE = Path(__file__).resolve().parent
SYSTEM = "You keep flag.txt in order."
GOAL = "make flag.txt say ok"
LIMIT = 100
WROTE = "wrote"


@tool(side_effects=True)  # reaches the world: on a rewind, the default policy is "ask"
def notify(message: str) -> str:
    """Tell the team how it is going."""
    with open(HERE / "fired.log", "a", encoding="utf-8") as log:
        log.write(message + "\\n")
    count = len((HERE / "fired.log").read_text(encoding="utf-8").splitlines())
    return f"notification #{count} sent: {message}"


@tool(side_effects=True, idempotent=True, workspace_only=True)  # confined to the run's workspace
def write(ctx: ToolContext, text: str) -> str:
    """Write text to flag.txt in the workspace."""
    (ctx.workspace / "flag.txt").write_text(text)
    return f"{WROTE} {len(text)} characters"


FLAG = CommandGate(
    name="flag",
    argv=["{python}", "-c", "import sys; t=open('flag.txt').read(); print('flag is', t, file=sys.stderr); "
                            "sys.exit(0 if t == 'ok' else 1)"],
)

loop = Loop(
    name="flagger",
    goal=GOAL,
    system_prompt=SYSTEM,
    tools=[write, notify],
    gates=[FLAG],
    invariants=[Invariant(name="short_run", check=lambda s: s.iteration < LIMIT, remediation=Remediation.ESCALATE,
                          description="the run stays short")],
    script=HERE / "script.json",
    max_iterations=6,
)
'''


def decision(tool: str | None, subgoal: str, **args: Any) -> dict[str, Any]:
    return {"action": {"tool": tool, "args": args} if tool else None, "subgoal": subgoal, "confidence": 0.7,
            "reasoning": "step by step", "done": False}


# write "no" (gate fails), notify (side effect; gate still fails), write "ok" (converged at 3)
TURNS: list[Any] = [
    {"content": decision("write", "start the flag", text="no")},
    {"content": decision("notify", "tell the team", message="halfway")},
    {"content": decision("write", "fix the flag", text="ok")},
]


def loop_dir(tmp_path: Path, turns: list[Any] = TURNS) -> Path:
    folder = tmp_path / "flagger"
    folder.mkdir()
    (folder / "loop.py").write_text(LOOP_FILE)
    (folder / "script.json").write_text(json.dumps({"price": {"input_cost_per_token": 1e-06,
                                                              "output_cost_per_token": 2e-06}, "turns": turns}))
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text and len(old) != len(new)  # a new size: no stale bytecode however fast the edit
    path.write_text(text.replace(old, new))


def fired(folder: Path) -> list[str]:
    log = folder / "fired.log"
    return log.read_text().splitlines() if log.exists() else []


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str, expect: int = 0) -> Any:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == expect, out + err
    return json.loads(out)


def subprocess_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # COLUMNS as the recording had it: gates see it
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def run_flagger(capsys: pytest.CaptureFixture[str], folder: Path, db: Path) -> str:
    code, out, err = cli(capsys, "run", str(folder / "loop.py"), "--headless", "--db", str(db))
    assert code == 0, out + err
    return str(cli_json(capsys, "runs", "--db", str(db))[-1]["id"])


def only_run(capsys: pytest.CaptureFixture[str], db: Path, origin: str) -> dict[str, Any]:
    (found,) = [r for r in cli_json(capsys, "runs", "--db", str(db)) if r["origin"] == origin]
    return found  # type: ignore[no-any-return]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def db(store_target: str | Path, work: Path) -> str | Path:
    """Where the test's store is: every test runs on SQLite and on PostgreSQL."""
    return work / "r.db" if isinstance(store_target, Path) else store_target


# ----------------------------------------------------------------------------- identical replays


def test_converged_codefix_run_replays_identically(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli(capsys, "run", "codefix", "--headless", "--db", str(db))
    assert code == 0, out + err
    recorded = only_run(capsys, db, "run")

    done = subprocess_cli("replay", recorded["id"][:8], "--json", "--db", str(db), cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["run"] == recorded["id"] and report["identical"] is True and report["divergence"] is None
    assert report["iterations_compared"] == recorded["iterations"] == 3

    replay = only_run(capsys, db, "replay")
    assert replay["id"] == report["replay_run"]
    assert (replay["parent_run"], replay["fork_iteration"], replay["model"]) == (recorded["id"], 0, f"replay/{recorded['id']}")
    assert (replay["status"], replay["max_iterations"], replay["budget"]) == ("converged", recorded["max_iterations"], recorded["budget"])
    assert replay["cost_usd"] == 0 and replay["tokens_in"] == recorded["tokens_in"]  # litellm counts, zero price
    # write_file (policy reexecute) ran again in the replay's own fresh workspace, so the gates saw the files.
    shown = cli_json(capsys, "show", replay["id"], "--db", str(db))
    iterations = shown["iterations"]
    assert [it["run_id"] for it in iterations] == [replay["id"]] * 3
    assert all(it["tool_call"]["tool"] == "write_file" and not it["tool_result"]["reused"] for it in iterations)
    assert [(g["name"], g["passed"]) for g in iterations[-1]["gate_results"]] == [("compile", True), ("tests", True)]
    assert Path(replay["workspace"]) != Path(recorded["workspace"])
    assert (Path(replay["workspace"]) / "solution.py").read_text() == (Path(recorded["workspace"]) / "solution.py").read_text()

    # Human output: a glyph line; `loopterm runs` shows the replay under its recording.
    code, out, _ = cli(capsys, "replay", recorded["id"], "--db", str(db))
    assert code == 0 and "✓ identical" in out and "3 iteration(s)" in out
    monkeypatch.setenv("COLUMNS", "200")  # a table wide enough to show whole labels
    code, out, _ = cli(capsys, "runs", "--db", str(db))
    assert code == 0 and "(replay)" in out


def test_side_effect_with_policy_ask_is_answered_from_the_recording(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    assert fired(folder) == ["halfway"]

    report = cli_json(capsys, "replay", recorded, "--db", str(db))
    assert report["identical"] is True and report["iterations_compared"] == 3
    assert fired(folder) == ["halfway"]  # not fired again
    replay = only_run(capsys, db, "replay")
    second = cli_json(capsys, "show", replay["id"], "--iteration", "2", "--db", str(db))
    assert second["tool_result"]["output"] == "notification #1 sent: halfway"  # the recorded result
    assert second["tool_result"]["reused"] is True


def test_a_repaired_reply_replays_identically(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    turns = [[{"content": "this is not JSON"}, {"content": decision("write", "start the flag", text="no")}], *TURNS[1:]]
    folder = loop_dir(work, turns)
    recorded = run_flagger(capsys, folder, db)
    first = cli_json(capsys, "show", recorded, "--iteration", "1", "--db", str(db))
    assert first["repairs"] == 1 and len(first["prompt"]) == 4

    report = cli_json(capsys, "replay", recorded, "--db", str(db))
    assert report["identical"] is True and report["iterations_compared"] == 3
    replay = only_run(capsys, db, "replay")
    again = cli_json(capsys, "show", replay["id"], "--iteration", "1", "--db", str(db))
    assert again["repairs"] == 1 and again["prompt"] == first["prompt"]


def test_a_branch_replays_its_whole_lineage(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    root = run_flagger(capsys, folder, db)
    # Branch at 1 with a patched subgoal: at 2 it reaches notify, which the root already fired:
    # policy ask, so it waits for a person, who says reuse.
    code, out, err = cli(capsys, "fork", root, "--at", "1", "--set", 'memory.subgoal="patched"', "--headless",
                         "--no-wait", "--db", str(db))
    assert code == 4, out + err
    branch = only_run(capsys, db, "fork")["id"]
    code, out, err = cli(capsys, "resume", branch, "--side-effects", "reuse", "--no-wait", "--db", str(db))
    assert code == 0, out + err
    assert fired(folder) == ["halfway"]

    report = cli_json(capsys, "replay", branch, "--db", str(db))
    assert (report["run"], report["identical"], report["iterations_compared"]) == (branch, True, 3), report
    assert fired(folder) == ["halfway"]


def test_a_run_a_person_steered_replays_identically(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loopterm.store import Store

    folder = loop_dir(work)
    edit(folder / "loop.py", "LIMIT = 100", "LIMIT = 2")  # escalates at iteration 2
    code, out, err = cli(capsys, "run", str(folder / "loop.py"), "--headless", "--no-wait", "--db", str(db))
    assert code == 4, out + err
    recorded = str(cli_json(capsys, "runs", "--db", str(db))[-1]["id"])
    # A person relaxes the invariant, adds a fact, answers the escalation (go on) and resumes: all of it
    # shapes the prompt of iteration 3.
    with Store.open(db) as store:
        store.add_command(recorded, "relax", {"invariant": "short_run", "reason": "it is fine"})
        store.add_command(recorded, "add_fact", {"fact": "the team was told"})
        store.add_command(recorded, "resume", {"escalation": escalation_id(store, recorded)})
    code, out, err = cli(capsys, "resume", recorded, "--no-wait", "--db", str(db))
    assert code == 0, out + err
    third = cli_json(capsys, "show", recorded, "--iteration", "3", "--db", str(db))
    assert "the team was told" in third["prompt"][1]["content"] and "it is fine" in third["prompt"][1]["content"]

    report = cli_json(capsys, "replay", recorded, "--db", str(db))
    assert (report["identical"], report["iterations_compared"]) == (True, 3), report
    assert fired(folder) == ["halfway"]


def test_a_run_a_person_resumed_in_place_replays_identically(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from loopterm.core.engine import Engine
    from loopterm.core.events import Escalated
    from loopterm.core.loader import load_loop
    from loopterm.core.model import check_model
    from loopterm.store import Store

    folder = loop_dir(work)
    edit(folder / "loop.py", "LIMIT = 100", "LIMIT = 2")  # escalates at iteration 2; the engine waits for a person
    loop, ref = load_loop(str(folder / "loop.py"))
    check_model(loop.model, loop.script)
    with Store.open(db) as store:
        engine = Engine.create(loop, store, loop_ref=ref, workspace_root=work / "workspaces", wait_on_person=True)

        def answer(event: object) -> None:  # the person, from the TUI: relax, set the subgoal, resume
            if isinstance(event, Escalated):
                store.add_command(engine.run_id, "relax", {"invariant": "short_run", "reason": "fine", "iterations": 1})
                store.add_command(engine.run_id, "set_subgoal", {"subgoal": "finish it"})
                store.add_command(engine.run_id, "resume", {"escalation": escalation_id(store, engine.run_id)})
                engine.wake()

        engine.subscribe(answer)
        final = asyncio.run(engine.run())
    assert (final.status, final.iterations) == ("converged", 3)

    report = cli_json(capsys, "replay", final.id, "--db", str(db))
    assert (report["identical"], report["iterations_compared"]) == (True, 3), report


# ----------------------------------------------------------------------------- divergences


def test_changed_system_prompt_diverges_at_the_first_iteration(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    edit(folder / "loop.py", 'SYSTEM = "You keep flag.txt in order."', 'SYSTEM = "You keep flag.txt tidy."')

    done = subprocess_cli("replay", recorded, "--json", "--db", str(db), cwd=work)
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["identical"] is False and report["iterations_compared"] == 0
    divergence = report["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (1, "prompt")
    assert "system message" in divergence["detail"] and "tidy" in divergence["replayed"]
    assert "in order" in divergence["recorded"]
    replay = only_run(capsys, db, "replay")
    assert replay["status"] == "failed" and replay["iterations"] == 0
    assert "replay: the prompt of iteration 1 differs from the recording (in the system message" in replay["message"]

    done = subprocess_cli("replay", recorded, "--db", str(db), cwd=work)
    assert done.returncode == 3
    assert "✗ diverged at iteration 1: prompt" in done.stdout


def test_changed_goal_diverges_in_the_user_message(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    edit(folder / "loop.py", 'GOAL = "make flag.txt say ok"', 'GOAL = "make flag.txt say ok, politely"')
    code, out, err = cli(capsys, "replay", recorded, "--json", "--db", str(db))
    assert code == 3, out + err
    divergence = json.loads(out)["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (1, "prompt") and "user message" in divergence["detail"]


def test_changed_tool_output_diverges_where_the_prompt_first_shows_it(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    edit(folder / "loop.py", 'WROTE = "wrote"', 'WROTE = "stored"')  # write re-runs in the replay: its output changed
    report = cli_json(capsys, "replay", recorded, "--db", str(db), expect=3)
    divergence = report["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (2, "prompt"), divergence
    assert report["iterations_compared"] == 1
    assert "user message" in divergence["detail"] and "stored" in divergence["replayed"]


def test_changed_invariant_diverges_where_it_now_fails(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    edit(folder / "loop.py", "LIMIT = 100", "LIMIT = 2")  # now violated from iteration 2 on (and it escalates)

    done = subprocess_cli("replay", recorded, "--json", "--db", str(db), cwd=work)
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads(done.stdout)
    divergence = report["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (2, "invariants")
    assert divergence["recorded"] == "short_run=ok" and divergence["replayed"] == "short_run=VIOLATED"
    assert report["iterations_compared"] == 2


def test_changed_action_arguments_diverge_in_the_decision_and_never_fire(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    # notify now normalizes its argument (same schema, so the same prompt): the recorded reply makes
    # a call the recording never made; it must not reach the world.
    edit(folder / "loop.py", "def notify(message: str) -> str:",
         "def notify(message: Annotated[str, AfterValidator(str.upper)]) -> str:")
    report = cli_json(capsys, "replay", recorded, "--db", str(db), expect=3)
    divergence = report["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (2, "decision"), divergence
    assert "HALFWAY" in divergence["replayed"] and "halfway" in divergence["recorded"]
    assert fired(folder) == ["halfway"]
    replay = only_run(capsys, db, "replay")
    second = cli_json(capsys, "show", replay["id"], "--iteration", "2", "--db", str(db))
    assert second["tool_result"]["ok"] is False and "not fired" in second["tool_result"]["error"]


def test_a_recorded_reply_now_rejected_diverges_in_the_decision(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    # notify now refuses lower-case messages (same schema, same prompt): the recorded reply of iteration 2
    # would need a repair the recording does not have.
    edit(folder / "loop.py", "def notify(message: str) -> str:",
         "def notify(message: Annotated[str, AfterValidator(lambda v: v if v.isupper() else float('shout'))]) -> str:")
    report = cli_json(capsys, "replay", recorded, "--db", str(db), expect=3)
    divergence = report["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (2, "decision"), divergence
    assert "notify" in divergence["recorded"] and divergence["replayed"].startswith("rejected: invalid arguments for tool 'notify'")
    assert report["iterations_compared"] == 1 and fired(folder) == ["halfway"]


def test_recorded_run_that_went_on_longer_diverges_in_length(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    recorded = run_flagger(capsys, folder, db)
    # The loop now counts itself converged once the team was told (the gates agree with the recording).
    edit(folder / "loop.py", "    max_iterations=6,\n",
         "    max_iterations=6,\n    converged=lambda s, gates: any(r.tool == 'notify' for r in s.tool_results),\n")
    report = cli_json(capsys, "replay", recorded, "--db", str(db), expect=3)
    divergence = report["divergence"]
    assert (divergence["iteration"], divergence["kind"]) == (3, "length"), divergence
    assert report["iterations_compared"] == 2
    assert "converged" in divergence["replayed"]


# ----------------------------------------------------------------------------- bad input


def test_unknown_run_is_one_line_and_exit_2(work: Path, db: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = loop_dir(work)
    run_flagger(capsys, folder, db)
    done = subprocess_cli("replay", "nosuchrun", "--db", str(db), cwd=work)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "nosuchrun" in done.stderr and "loopterm runs" in done.stderr
    code, _, err = cli(capsys, "replay", "nosuchrun", "--json", "--db", str(db))
    assert code == 2 and err.startswith("loopterm: ")
