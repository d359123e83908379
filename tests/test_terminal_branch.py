"""Branching as a person does it in a real terminal (tmux, the real `loopterm`): from the main screen with an
iteration selected to a running branch with a patch and a relaxed invariant, counting the keys it takes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")

# A loop whose model writes "no", then "bad" (never_bad fails: the run escalates at iteration 2), then "ok".
LOOP = '''
from pathlib import Path
from loopterm.core import CommandGate, Invariant, Loop, LoopState, Remediation, ToolContext, tool

@tool(side_effects=True, idempotent=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write text to flag.txt in the workspace."""
    (ctx.workspace / "flag.txt").write_text(text)
    return f"wrote {len(text)} characters"

def written(state):
    return [str(r.args.get("text", "")) for r in state.tool_results if r.tool == "write"]

loop = Loop(
    name="flagger",
    goal="make flag.txt say ok",
    state=LoopState,
    tools=[write],
    gates=[CommandGate(name="flag", argv=["{python}", "-c",
           "import sys; sys.exit(0 if open('flag.txt').read() == 'ok' else 1)"])],
    invariants=[Invariant(name="never_bad", check=lambda s: "bad" not in written(s),
                          remediation=Remediation.ESCALATE, description="the flag never said bad")],
    script=Path(__file__).parent / "script.json",
    max_iterations=6,
)
'''

PATCH = 'memory.subgoal="write ok"'
REASON = "bad was a typo"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def wait_for(session: str, predicate: Callable[[str], bool], timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"timed out; the screen was:\n{screen}")


def flagger(tmp_path: Path) -> Path:
    path = tmp_path / "flagger.py"
    path.write_text(LOOP)
    turns = [{"content": {"action": {"tool": "write", "args": {"text": text}}, "subgoal": f"write {text}",
                          "confidence": 0.8, "reasoning": "try it", "done": False}} for text in ("no", "bad", "ok")]
    (tmp_path / "script.json").write_text(json.dumps({"price": {"input_cost_per_token": 1e-6,
                                                                "output_cost_per_token": 2e-6}, "turns": turns}))
    return path


def test_branch_journey_in_a_real_terminal_takes_three_keys_plus_the_typed_text(tmp_path: Path) -> None:
    loopterm = Path(sys.executable).parent / "loopterm"
    db = tmp_path / "branch.db"
    env = {**os.environ, "LOOPTERM_DB": str(db), "LOOPTERM_CONFIG_DIR": str(tmp_path / "cfg"),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    parent_run = subprocess.run([str(loopterm), "run", str(flagger(tmp_path)), "--headless", "--no-wait"], env=env,
                                capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert parent_run.returncode == 4, parent_run.stdout + parent_run.stderr  # escalated at iteration 2
    runs = json.loads(subprocess.run([str(loopterm), "runs", "--json"], env=env, capture_output=True, text=True,
                                     check=True, timeout=60).stdout)
    parent = runs[0]["id"]

    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    shell_env = " ".join(f"{k}={env[k]}" for k in ("LOOPTERM_DB", "LOOPTERM_CONFIG_DIR", "LITELLM_LOCAL_MODEL_COST_MAP"))
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "42", "-c", str(tmp_path))
    keys = 0

    def key(name: str) -> None:
        nonlocal keys
        keys += 1
        tmux("send-keys", "-t", session, name)

    def typed(text: str) -> None:  # typed text, not counted as keys
        tmux("send-keys", "-t", session, "-l", text)

    try:
        tmux("send-keys", "-t", session, f"env {shell_env} {loopterm} watch {parent}; echo EXIT=$?", "Enter")
        # The main screen, iteration 2 (the last, where never_bad failed) selected.
        wait_for(session, lambda s: re.search(r"^\S*\s*▕?\s+2\s+write", s, re.MULTILINE) is not None
                 and "escalated" in s.splitlines()[0])
        key("b")
        wait_for(session, lambda s: "Branch run" in s and "from iteration 2" in s and "ctrl+s create branch" in s)
        typed(PATCH)
        wait_for(session, lambda s: PATCH in s)  # it went into the patches field, where focus starts
        key("Tab")
        typed(REASON)
        wait_for(session, lambda s: REASON in s)
        shown = tmux("capture-pane", "-p", "-t", session)
        assert "failed at iteration 2" in shown and "relaxing never_bad" in shown  # relaxed by default, visibly
        key("C-s")
        wait_for(session, lambda s: "Branch run" not in s and "converged" in s.splitlines()[0], timeout=120)
        assert keys <= 4, keys
        assert keys == 3
        tmux("send-keys", "-t", session, "q")
        done = wait_for(session, lambda s: re.search(r"EXIT=\d+", s) is not None, timeout=60)
        assert "EXIT=0" in done and "Traceback" not in done
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    from loopterm.core import runlog
    from loopterm.store import Store

    store = Store.open(db, create=False)
    try:
        branch = store.children(parent)[0]
        assert branch.fork_iteration == 2 and branch.status == "converged"
        events = [r.event for r in store.events(branch.id)]
        forked = next(e for e in events if isinstance(e, runlog.Forked))
        assert forked.reason == REASON
        assert forked.patches == [{"path": ["memory", "subgoal"], "value": "write ok"}]
        assert forked.relaxed == {"never_bad": REASON}
        assert [(e.invariant, e.reason) for e in events if isinstance(e, runlog.InvariantRelaxed)] == [
            ("never_bad", REASON)]
        assert not any(isinstance(e, runlog.Escalated) for e in events)
        first = store.get_iteration(branch.id, 3)
        assert first is not None and first.run_id == branch.id
        assert "write ok" in json.dumps(first.prompt)  # the patched subgoal reached the model
        assert store.state_at(branch.id, 3)["tool_results"][-1]["args"] == {"text": "ok"}
    finally:
        store.close()
