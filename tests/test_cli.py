"""The headless CLI: the codefix demo end to end, the read commands, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from loopterm.tui.cli import main

CLI = [sys.executable, "-m", "loopterm.tui.cli"]


def loopterm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "160", **(env or {})}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def codefix_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("codefix")
    return work, loopterm("run", "codefix", "--headless", cwd=work)


def test_codefix_converges_headless_with_litellm_costs(codefix_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    work, done = codefix_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "converged" in done.stdout
    db = work / ".loopterm" / "loopterm.db"
    runs = json.loads(loopterm("runs", "--json", cwd=work).stdout)
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "converged" and run["iterations"] >= 3
    assert run["tokens_in"] > 0 and run["tokens_out"] > 0 and run["cost_usd"] > 0

    shown = json.loads(loopterm("show", run["id"][:6], "--json", cwd=work).stdout)
    iterations = shown["iterations"]
    gates = [[(g["name"], g["passed"]) for g in it["gate_results"]] for it in iterations]
    assert gates[0] == [("compile", False)]  # a syntax error first
    assert gates[1] == [("compile", True), ("tests", False)]  # then a failing test
    assert gates[-1] == [("compile", True), ("tests", True)]  # then both pass

    # Token counts and cost are what litellm itself computes for the prompt and reply.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    from loopterm.core.scripted import register_script
    from loopterm.examples.codefix.loop import loop

    register_script("codefix", loop.script)  # type: ignore[arg-type]
    total = 0.0
    for it in iterations:
        assert it["repairs"] == 0
        expected_in = litellm.token_counter(model="scripted/codefix", messages=it["prompt"])
        assert it["tokens_in"] == expected_in
        cost_in, cost_out = litellm.cost_per_token(model="scripted/codefix", prompt_tokens=it["tokens_in"],
                                                   completion_tokens=it["tokens_out"])
        assert it["cost_usd"] == pytest.approx(cost_in + cost_out)
        total += it["cost_usd"]
    assert run["cost_usd"] == pytest.approx(total)
    assert db.exists()


def test_show_one_iteration_and_runs_table(codefix_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    work, _ = codefix_run
    table = loopterm("runs", cwd=work)
    assert table.returncode == 0 and "codefix" in table.stdout and "converged" in table.stdout
    run_id = json.loads(loopterm("runs", "--json", cwd=work).stdout)[0]["id"]
    detail = loopterm("show", run_id, "--iteration", "1", cwd=work)
    assert detail.returncode == 0 and "compile" in detail.stdout and "subgoal" in detail.stdout
    missing = loopterm("show", run_id, "--iteration", "99", cwd=work)
    assert missing.returncode == 2 and "has no iteration 99" in missing.stderr


def test_runs_piped_without_columns_cuts_nothing_short(codefix_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Piped (no terminal, no COLUMNS), rich would fit the table in 80 columns and cut the loop, status and
    model to `cod…`; a script reading `loopterm runs` gets every value whole."""
    work, _ = codefix_run
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([*CLI, "runs"], cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0
    assert "codefix" in done.stdout and "✓ converged" in done.stdout and "scripted/codefix" in done.stdout


def test_resume_of_a_converged_run_is_refused(codefix_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    work, _ = codefix_run
    run_id = json.loads(loopterm("runs", "--json", cwd=work).stdout)[0]["id"]
    done = loopterm("resume", run_id, cwd=work)
    assert done.returncode == 2 and "already converged" in done.stderr


def test_resume_refuses_a_run_another_process_executes_and_takes_it_once_that_process_died(tmp_path: Path) -> None:
    """Two engines on one run would fire its side effects twice: `resume` of a run a live process executes
    (here, headless and waiting on a person) is one line, exit 2; once that process is killed, resume
    takes it at once (the process is gone), without waiting for the heartbeat to go stale."""
    import signal
    import time

    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "160"}
    runner = subprocess.Popen([*CLI, "run", "demo", "--headless"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        run: dict[str, object] = {}
        while time.monotonic() < deadline:
            listed = loopterm("runs", "--json", cwd=tmp_path)
            if listed.returncode == 0 and listed.stdout.strip().startswith("["):
                found = json.loads(listed.stdout)
                if found and found[0]["status"] == "escalated":
                    run = found[0]
                    break
            time.sleep(0.3)
        assert run, "the demo did not reach its escalation"
        refused = loopterm("resume", str(run["id"]), "--no-wait", cwd=tmp_path)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "is executing in another process right now" in refused.stderr
        assert f"loopterm watch {run['id']}" in refused.stderr
        assert runner.poll() is None  # the executing process was left alone
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
    taken = loopterm("resume", str(run["id"]), "--no-wait", cwd=tmp_path)
    assert "executing in another process" not in taken.stderr
    assert taken.returncode == 4, taken.stdout + taken.stderr  # resumed: it waits on a person again (--no-wait)


def test_loops_lists_the_built_in_loops_with_one_line_each(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "loops"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line.strip()}
    assert {"codefix", "review", "support"} <= set(rows)
    assert "rewrites solution.py until pytest passes" in rows["codefix"]
    assert "planner-executors" in rows["review"] and "review a git change file by file" in rows["review"]
    assert "refund request" in rows["support"]
    assert all("failed to import" not in row for row in rows.values())


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], expect: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("loopterm: "), err
    assert expect in err, err


BAD_FILE = "from loopterm.core import Loop\ndef broken(:\n"
NO_LOOP = "x = 1\n"


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["run", "nosuchloop", "--headless"], "nosuchloop"),
        (["run", "{tmp}/bad.py", "--headless"], "SyntaxError"),
        (["run", "{tmp}/noloop.py", "--headless"], "no"),
        (["run", "{tmp}/missing.py", "--headless"], "missing.py"),
        (["run", "codefix", "--headless", "--model", "nosuchprovider/model-x"], "nosuchprovider"),
        (["run", "codefix", "--headless", "--model", "openai/gpt-4o-mini"], "OPENAI_API_KEY"),
        (["run", "codefix", "--headless", "--budget-usd", "-1"], "--budget-usd"),
        (["run", "codefix", "--headless", "--budget-usd", "lots"], "--budget-usd"),
        (["run", "codefix", "--headless", "--budget-tokens", "1.5"], "--budget-tokens"),
        (["run", "codefix", "--headless", "--max-iterations", "0"], "--max-iterations"),
        (["show", "abc"], "no loopterm database"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], expect: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "bad.py").write_text(BAD_FILE)
    (tmp_path / "noloop.py").write_text(NO_LOOP)
    db = tmp_path / "store.db"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] in ("run", "show"):
        argv += ["--db", str(db)]
    try:
        one_line_error(capsys, argv, expect)
    except SystemExit as exc:  # argparse errors exit directly
        assert exc.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err, err
    assert not db.exists()


def test_unknown_and_ambiguous_run_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loopterm.core.records import RunRecord
    from loopterm.store import Store

    db = tmp_path / "s.db"
    store = Store.open(db)
    for run_id in ("abc111", "abc222"):
        store.create_run(RunRecord(id=run_id, loop="l", loop_ref="l", goal="g", spec_hash="h", model="m", status="created",
                                   workspace=str(tmp_path), created_at=0, updated_at=0, max_iterations=1))
    store.close()
    one_line_error(capsys, ["show", "zzz", "--db", str(db)], "no run matches 'zzz'")
    one_line_error(capsys, ["show", "abc", "--db", str(db)], "ambiguous")


def test_a_database_that_is_not_loopterms_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("create table customers (id integer primary key, name text)")
    con.execute("insert into customers (name) values ('ada')")
    con.commit()
    con.close()
    before = hashlib.sha256(other.read_bytes()).hexdigest()
    one_line_error(capsys, ["run", "codefix", "--headless", "--db", str(other)], "not a loopterm database")
    one_line_error(capsys, ["runs", "--db", str(other)], "not a loopterm database")
    assert hashlib.sha256(other.read_bytes()).hexdigest() == before

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    one_line_error(capsys, ["show", "abc", "--db", str(junk)], "not a SQLite database")
    assert junk.read_bytes() == b"this is not sqlite at all" * 100
