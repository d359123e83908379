"""SIGKILL a headless run mid-flight, resume it, and check that nothing was lost or done twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOP_FILE = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool

@tool(side_effects=True, idempotent=False)
def append(ctx: ToolContext, line: str) -> str:
    """Append a line to the effects log outside the workspace: a real side effect."""
    with open(Path(__file__).parent / "effects.log", "a") as f:
        f.write(f"{ctx.iteration} {ctx.idempotency_key} {line}\\n")
    return "appended"

loop = Loop(
    name="crashy",
    goal="append eight lines",
    state=LoopState,
    tools=[append],
    script=Path(__file__).parent / "script.json",
    max_iterations=12,
    converged=lambda state, gates: state.iteration >= 8,
)
'''


def turn(i: int) -> dict:
    decision = {"action": {"tool": "append", "args": {"line": f"line {i}"}}, "subgoal": f"line {i}",
                "confidence": 0.9, "reasoning": "append the next line"}
    return {"content": decision, "delay": 0.25}


def cli(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "loopterm.tui.cli", *args, "--db", str(cwd / "db.sqlite")]


def test_sigkill_mid_run_then_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    (tmp_path / "crashy.py").write_text(LOOP_FILE)
    (tmp_path / "script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
        "turns": [turn(i) for i in range(1, 13)],
    }))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    effects = tmp_path / "effects.log"
    proc = subprocess.Popen(cli("run", str(tmp_path / "crashy.py"), "--headless", cwd=tmp_path), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if effects.exists() and len(effects.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.1)  # into the next iteration's model call
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    runs = json.loads(subprocess.run(cli("runs", "--json", cwd=tmp_path), cwd=tmp_path, env=env,
                                     capture_output=True, text=True, check=True).stdout)
    run_id = runs[0]["id"]
    committed_before = runs[0]["iterations"]
    assert runs[0]["status"] == "running" and 3 <= committed_before < 8

    resumed = subprocess.run(cli("resume", run_id[:8], cwd=tmp_path), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    shown = json.loads(subprocess.run(cli("show", run_id, "--json", cwd=tmp_path), cwd=tmp_path, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    assert shown["run"]["status"] == "converged"
    assert [it["n"] for it in shown["iterations"]] == list(range(1, 9))  # none lost, none duplicated
    lines = effects.read_text().splitlines()
    per_iteration = [int(line.split()[0]) for line in lines]
    assert sorted(per_iteration) == list(range(1, 9)), lines  # the side effect ran exactly once per iteration
    keys = [line.split()[1] for line in lines]
    assert keys == [it["tool_call"]["key"] for it in shown["iterations"]]
    assert [e["kind"] for e in shown["events"]].count("run_resumed") == 1
