"""The real `loopterm run agent-fix` in tmux: a coding agent (the scripted ACP agent) asks permission twice,
a person reads the diff in the inbox and approves, the gate decides, the Agent tab shows the turn."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from loopterm.core.fold import fold
from loopterm.store import Store
from tests.test_terminal import tmux, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def test_a_person_approves_the_agents_edits_from_the_diff_and_the_gate_converges(tmp_path: Path) -> None:
    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    loopterm = Path(sys.executable).parent / "loopterm"
    db = tmp_path / "agent.db"
    env = f"LOOPTERM_DB={db} LOOPTERM_CONFIG_DIR={tmp_path / 'cfg'} LITELLM_LOCAL_MODEL_COST_MAP=True"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", "-c", str(tmp_path))
    try:
        tmux("send-keys", "-t", session, f"env {env} {loopterm} run agent-fix; echo EXIT=$?", "Enter")
        for turn, diff_line in enumerate(("+    ordered = sorted(values)", "+    middle = len(ordered) // 2"), 1):
            # the header asks again for the second turn only once the first turn's row is on the timeline
            wait_for(session, lambda s: "the agent asks: Edit stats.py" in s and s.count("agent: end_turn") == turn - 1,
                     timeout=120)
            tmux("send-keys", "-t", session, "x")
            wait_for(session, lambda s: "inbox" in s.lower())
            tmux("send-keys", "-t", session, "Enter")
            shown = wait_for(session, lambda s: "The agent asks permission" in s and diff_line in s)
            assert "-    return values[len(values) // 2]" in shown or diff_line.startswith("+    middle")
            tmux("send-keys", "-t", session, "a")
            wait_for(session, lambda s: "approve or deny it as asked" in s)
            tmux("send-keys", "-t", session, "C-s")
        # The Agent tab opens first in an agent loop: the last turn, with the spend the agent reported.
        done = wait_for(session, lambda s: "converged" in s.splitlines()[0] and "reported by the agent" in s,
                        timeout=120)
        assert "✓ Handle an even count" in done
        tmux("send-keys", "-t", session, "q")
        out = wait_for(session, lambda s: re.search(r"EXIT=\d+", s) is not None, timeout=60)
        assert "EXIT=0" in out and "Traceback" not in out
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    with Store.open(db) as store:
        (run,) = store.list_runs()
        assert run.status == "converged" and run.iterations == 2
        turns = fold(store.events(run.id)).agent_turns
        assert [[(p.outcome, p.decided_by) for p in turns[n].permissions] for n in (1, 2)] == [
            [("allow_once", "person")], [("allow_once", "person")]]
        assert Path(run.workspace, "stats.py").read_text().count("ordered[middle - 1] + ordered[middle]") == 1
