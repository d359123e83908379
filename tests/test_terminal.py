"""The real `loopterm` command in a real terminal (tmux): what a person sees."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def test_demo_in_a_real_terminal_shows_progress_and_converges(tmp_path: Path) -> None:
    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    loopterm = Path(sys.executable).parent / "loopterm"
    assert loopterm.exists(), "the console script is installed with the package"
    env = f"LOOPTERM_DB={tmp_path / 'demo.db'} LITELLM_LOCAL_MODEL_COST_MAP=True"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", "-c", str(tmp_path))
    try:
        tmux("send-keys", "-t", session, f"env {env} {loopterm}; echo EXIT=$?", "Enter")
        deadline = time.monotonic() + 180
        screen = ""
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-t", session)
            if re.search(r"EXIT=\d+", screen):  # the typed line shows EXIT=$?, not digits
                break
            time.sleep(0.3)
        assert "EXIT=0" in screen, screen
        assert "codefix" in screen and "scripted/codefix" in screen
        assert "✗ compile" in screen  # the syntax error, shown with a glyph
        assert "✓ compile ✗ tests" in screen  # then a failing test
        assert "✓ compile ✓ tests" in screen  # then both gates pass
        assert "✓ converged" in screen
        assert "Traceback" not in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert os.path.exists(tmp_path / "demo.db")
