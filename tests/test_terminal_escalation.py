"""The real `loopterm` in tmux: from the header showing an escalation to the loop running again with a fact
added, counting the keys a person presses (the typed fact aside)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from loopterm.core import runlog
from loopterm.store import Store
from tests.loopkit import of
from tests.test_terminal import tmux, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")

# Iteration 1 writes "bad": the no_bad invariant escalates; iteration 2 writes "ok" and the gate passes.
LOOP_FILE = '''
import json
from pathlib import Path
from loopterm.core import CommandGate, Invariant, Loop, LoopState, Remediation, ToolContext, tool

HERE = Path(__file__).parent


@tool(side_effects=True, idempotent=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write flag.txt."""
    (ctx.workspace / "flag.txt").write_text(text)
    return "wrote"


def last_written(state: LoopState) -> str:
    results = [r for r in state.tool_results if r.tool == "write"]
    return str(results[-1].args.get("text", "")) if results else ""


def turn(text: str) -> dict:
    return {"content": {"action": {"tool": "write", "args": {"text": text}}, "subgoal": f"write {text}",
                        "confidence": 0.5, "reasoning": "r", "done": False}, "delay": 0.2}


(HERE / "script.json").write_text(json.dumps({"price": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
                                               "turns": [turn("bad"), turn("ok")]}))
loop = Loop(name="escalates", goal="make flag.txt say ok", tools=[write], script=HERE / "script.json",
            max_iterations=4,
            invariants=[Invariant(name="no_bad", check=lambda s: last_written(s) != "bad",
                                  remediation=Remediation.ESCALATE, description="the flag is never bad")],
            gates=[CommandGate(name="flag", argv=["{python}", "-c",
                                                  "import sys; sys.exit(0 if open('flag.txt').read() == 'ok' else 1)"])])
'''

FACT = "bad was a typo, write ok"


def test_from_the_header_showing_an_escalation_to_running_again_with_a_fact_in_four_keys(tmp_path: Path) -> None:
    (tmp_path / "escalates.py").write_text(textwrap.dedent(LOOP_FILE))
    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    loopterm = Path(sys.executable).parent / "loopterm"
    db = tmp_path / "esc.db"
    env = f"LOOPTERM_DB={db} LOOPTERM_CONFIG_DIR={tmp_path / 'cfg'} LITELLM_LOCAL_MODEL_COST_MAP=True"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "42", "-c", str(tmp_path))
    keys = 0

    def press(key: str) -> None:
        nonlocal keys
        keys += 1
        tmux("send-keys", "-t", session, key)

    try:
        tmux("send-keys", "-t", session, f"env {env} {loopterm} run escalates.py; echo EXIT=$?", "Enter")
        wait_for(session, lambda s: "⚑" in s and "x inbox" in s and "no_bad" in s, timeout=120)  # the header
        press("x")
        wait_for(session, lambda s: "Escalation inbox" in s)
        press("Enter")
        wait_for(session, lambda s: "Why it stopped" in s)
        press("f")
        prompt = wait_for(session, lambda s: "Add a fact" in s)
        assert "add the fact and resume" in prompt  # the keys line says what enter / ctrl+s does
        tmux("send-keys", "-t", session, "-l", FACT)  # the typed fact (not counted)
        press("Enter")
        running = wait_for(session, lambda s: "converged" in s.splitlines()[0], timeout=120)
        assert keys <= 4, keys
        assert "Why it stopped" not in running and "Escalation inbox" not in running  # back on the main screen
        tmux("send-keys", "-t", session, "q")
        done = wait_for(session, lambda s: re.search(r"EXIT=\d+", s) is not None, timeout=60)
        assert "EXIT=0" in done and "Traceback" not in done
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    store = Store.open(db)
    (run,) = store.list_runs()
    events = store.events(run.id)
    assert [e.fact for e in of(events, runlog.FactAdded)] == [FACT]
    assert [a.answer for a in of(events, runlog.EscalationAnswered)] == ["resume"]
    assert run.status == "converged" and run.iterations == 2
    assert FACT in str(store.get_iteration(run.id, 2).prompt)
    store.close()

