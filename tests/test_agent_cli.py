"""`loopterm run agent-fix` as a person types it: the built-in agent loop, `--agent`, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from loopterm.store import Store

CLI = [sys.executable, "-m", "loopterm.tui.cli"]


def env() -> dict[str, str]:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "120"}


def loopterm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env(), timeout=120)


def test_agent_fix_converges_headless_with_a_person_answering_from_another_process(tmp_path: Path) -> None:
    db = tmp_path / "lt.db"
    run = subprocess.Popen([*CLI, "run", "agent-fix", "--headless", "--db", str(db)], cwd=tmp_path, env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answered = 0
        deadline = time.monotonic() + 90
        while run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            if not db.exists():
                continue
            with Store.open(db) as store:
                runs = store.list_runs()
                pending = [r for r in runs if r.status == "escalated"]
            for r in pending:
                said = loopterm("answer", r.id, "--db", str(db), "--approve", cwd=tmp_path)
                answered += said.returncode == 0
        out, _ = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out
    assert answered >= 2 and "the agent asks (iteration 1): Edit stats.py [edit: stats.py]" in out
    assert "+    ordered = sorted(values)" in out  # the diff under the question
    assert "converged at iteration 2" in out
    with Store.open(db) as store:
        (record,) = store.list_runs()
        assert record.model == "agent/scripted" and record.cost_usd > 0
        assert Path(record.workspace, "stats.py").read_text().count("sorted(values)") == 1
    shown = loopterm("show", record.id, "--iteration", "2", "--db", str(db), cwd=tmp_path)
    assert shown.returncode == 0 and "agent's turn" in shown.stdout  # the whole turn, without the agent
    assert "allowed once by a person" in shown.stdout
    assert "+    middle = len(ordered) // 2" in shown.stdout


def test_an_agent_command_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    said = loopterm("run", "agent-fix", "--headless", "--agent", "no-such-agent-xyz --flag", "--db",
                    str(tmp_path / "lt.db"), cwd=tmp_path)
    assert said.returncode == 2
    assert said.stderr.strip().splitlines() == [
        "loopterm: the agent's command 'no-such-agent-xyz' was not found (not on PATH, not a file); install the "
        "agent or give its command with --agent 'CMD ARGS'"]
    assert not (tmp_path / "lt.db").exists() or not Store.open(tmp_path / "lt.db").list_runs()


def test_agent_goes_with_agent_loops_only(tmp_path: Path) -> None:
    said = loopterm("run", "codefix", "--headless", "--agent", "claude-agent-acp", "--db", str(tmp_path / "lt.db"),
                    cwd=tmp_path)
    assert said.returncode == 2 and "is driven by a model, not a coding agent" in said.stderr
    said = loopterm("run", "agent-fix", "--agent", "x", "--model", "openai/gpt-4o", cwd=tmp_path)
    assert said.returncode == 2 and "--agent and --model do not go together" in said.stderr
    said = loopterm("run", "agent-fix", "--agent", "'unclosed", cwd=tmp_path)
    assert said.returncode == 2 and "is not a valid command line" in said.stderr
    key = "sk-ant-api03-" + "k" * 40
    said = loopterm("run", "agent-fix", "--agent", f"env ANTHROPIC_API_KEY={key} claude-agent-acp", cwd=tmp_path)
    assert said.returncode == 2 and "--agent holds what looks like a key" in said.stderr and key not in said.stderr
    assert not (tmp_path / ".loopterm").exists()  # nothing was recorded
