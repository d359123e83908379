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


def test_headless_run_in_a_real_terminal_shows_progress_and_converges(tmp_path: Path) -> None:
    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    loopterm = Path(sys.executable).parent / "loopterm"
    assert loopterm.exists(), "the console script is installed with the package"
    env = f"LOOPTERM_DB={tmp_path / 'demo.db'} LITELLM_LOCAL_MODEL_COST_MAP=True"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", "-c", str(tmp_path))
    try:
        tmux("send-keys", "-t", session, f"env {env} {loopterm} run codefix --headless; echo EXIT=$?", "Enter")
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


ROW = re.compile(r"^\S*\s*▕?\s+(\d+)\s+write_file", re.MULTILINE)


def rows(screen: str) -> int:
    return len(ROW.findall(screen))


def wait_for(session: str, predicate, timeout: float = 60.0) -> str:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"timed out; the screen was:\n{screen}")


def test_tui_in_a_real_terminal_pause_step_quit(tmp_path: Path) -> None:
    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    loopterm = Path(sys.executable).parent / "loopterm"
    env = f"LOOPTERM_DB={tmp_path / 'tui.db'} LOOPTERM_CONFIG_DIR={tmp_path / 'cfg'} LITELLM_LOCAL_MODEL_COST_MAP=True"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "42", "-c", str(tmp_path))
    try:
        tmux("send-keys", "-t", session, f"env {env} {loopterm} run codefix; echo EXIT=$?", "Enter")
        wait_for(session, lambda s: rows(s) >= 1)  # iterations appear live
        tmux("send-keys", "-t", session, "space")
        paused = wait_for(session, lambda s: "paused" in s.splitlines()[0])
        before = rows(paused)
        time.sleep(2.0)
        assert rows(tmux("capture-pane", "-p", "-t", session)) == before  # no new iteration while paused
        tmux("send-keys", "-t", session, "n")
        after = wait_for(session, lambda s: rows(s) == before + 1 and "stepping" not in s.splitlines()[0])
        assert rows(after) == before + 1  # exactly one
        assert any(word in after.splitlines()[0] for word in ("paused", "converged"))
        time.sleep(1.0)
        assert rows(tmux("capture-pane", "-p", "-t", session)) == before + 1
        tmux("send-keys", "-t", session, "q")
        done = wait_for(session, lambda s: re.search(r"EXIT=\d+", s) is not None, timeout=30)
        assert "EXIT=0" in done and "Traceback" not in done
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_shadow_run_in_a_real_terminal_records_verdicts_and_runs_nothing(tmp_path: Path) -> None:
    """The README's shadow-mode steps as a person does them: `loopterm run codefix --shadow`, agree with
    `a` then ctrl+s, deny with `d`, a reason and enter, quit; `loopterm eval --shadow` reports the verdicts,
    and the run's workspace is as it was copied (nothing the model proposed ran)."""
    import json

    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    loopterm = Path(sys.executable).parent / "loopterm"
    db = tmp_path / "shadow.db"
    env = f"LOOPTERM_DB={db} LOOPTERM_CONFIG_DIR={tmp_path / 'cfg'} LITELLM_LOCAL_MODEL_COST_MAP=True"
    tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "45", "-c", str(tmp_path))
    try:
        tmux("send-keys", "-t", session, f"env {env} {loopterm} run codefix --shadow; echo EXIT=$?", "Enter")
        first = wait_for(session, lambda s: "shadow proposal: write_file" in s, timeout=120)
        assert "◐ SHADOW" in first.splitlines()[0]
        tmux("send-keys", "-t", session, "a")
        wait_for(session, lambda s: "shadow: nothing will run" in s)
        tmux("send-keys", "-t", session, "C-s")
        wait_for(session, lambda s: rows(s) == 1 and "(iteration 2)" in s)
        tmux("send-keys", "-t", session, "d")
        wait_for(session, lambda s: "shadow: nothing will run" in s and "(iteration 2)" in s)
        tmux("send-keys", "-t", session, "not before the tests are read", "Enter")
        wait_for(session, lambda s: rows(s) == 2)
        tmux("send-keys", "-t", session, "q")
        done = wait_for(session, lambda s: re.search(r"EXIT=\d+", s) is not None, timeout=60)
        assert "EXIT=0" in done and "Traceback" not in done
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    env_vars = {**os.environ, "LOOPTERM_DB": str(db), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    report = subprocess.run([str(loopterm), "eval", "codefix", "--shadow", "--json"], capture_output=True, text=True,
                            env=env_vars, timeout=120)
    assert report.returncode == 0, report.stderr
    totals = json.loads(report.stdout)["totals"]
    assert (totals["proposals"], totals["agreed"], totals["denied"], totals["agreement_rate"]) == (2, 1, 1, 0.5)
    runs = json.loads(subprocess.run([str(loopterm), "runs", "--json"], capture_output=True, text=True,
                                     env=env_vars, timeout=120).stdout)
    from loopterm import examples

    shipped = Path(examples.__file__).parent / "codefix" / "tests"  # the loop's workspace_files
    workspace = Path(runs[0]["workspace"])
    assert not (workspace / "solution.py").exists()  # write_file was proposed twice and never ran
    for original in shipped.iterdir():
        if original.is_file():
            assert (workspace / original.name).read_bytes() == original.read_bytes(), original.name


def test_watching_a_run_keeps_the_store_safe_from_other_processes(tmp_path: Path) -> None:
    """`loopterm watch` once held a second connection whose locks its own header check dropped (POSIX locks
    are per process): another process's `loopterm runs` then took the database for the last user and deleted
    its write-ahead log while the window was writing to it."""
    loopterm = Path(sys.executable).parent / "loopterm"
    db = tmp_path / "w.db"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run([str(loopterm), "run", "codefix", "--headless", "--db", str(db)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = subprocess.run([str(loopterm), "runs", "--json", "--db", str(db)], env=env, capture_output=True,
                            text=True, check=True).stdout.split('"id": "')[1][:12]
    session = f"loopterm-{uuid.uuid4().hex[:8]}"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "42", "-c", str(tmp_path))
    try:
        tmux("send-keys", "-t", session, f"env LITELLM_LOCAL_MODEL_COST_MAP=True {loopterm} watch {run_id} "
             f"--db {db}; echo EXIT=$?", "Enter")
        wait_for(session, lambda screen: "converged" in screen)
        wal = Path(f"{db}-wal")
        assert wal.exists()  # the window's connection keeps it
        for command in (["runs"], ["show", run_id]):  # another process reads the store meanwhile
            subprocess.run([str(loopterm), *command, "--db", str(db)], env=env, capture_output=True, check=True)
        assert wal.exists(), "another process deleted the write-ahead log the window is using"
        tmux("send-keys", "-t", session, "q")
        wait_for(session, lambda screen: "EXIT=0" in screen)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
