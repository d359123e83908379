"""SQLite users need nothing new: real `loopterm` commands on a SQLite store never import psycopg or dbos;
a postgresql:// store does import psycopg. Read from the interpreter's own import log
(PYTHONPROFILEIMPORTTIME, the environment form of `python -X importtime`) of the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "loopterm"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "loopterm.tui.cli"]
CLUSTER = ("psycopg", "psycopg_binary", "psycopg_c", "psycopg_pool", "dbos")


def imported(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `loopterm ARGS`; its result and every module it imported (top-level package names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPTERM_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPROFILEIMPORTTIME="1", COLUMNS="200")
    done = subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    modules.discard("imported package")  # the header line
    return done, modules


def test_the_import_log_is_read(tmp_path: Path) -> None:
    """The check below could not pass by reading nothing: the log names what every command loads."""
    done, modules = imported("runs", "--db", "x.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"loopterm", "sqlite3", "pydantic"} <= modules


def test_sqlite_commands_never_import_psycopg_or_dbos(tmp_path: Path) -> None:
    db = "store.db"
    steps: list[list[str]] = [["db", "init", "--db", db], ["run", "codefix", "--headless", "--db", db], ["runs", "--db", db]]
    for args in steps:
        done, modules = imported(*args, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert not modules & set(CLUSTER), (args, modules & set(CLUSTER))
    run_id = json.loads(subprocess.run([*CLI, "runs", "--json", "--db", db], cwd=tmp_path, capture_output=True,
                                       text=True, timeout=120, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}).stdout)[0]["id"]
    for args in (["show", run_id, "--db", db], ["budget", "--db", db], ["memory", "codefix", "list", "--db", db],
                 ["export", run_id, "--db", db], ["fork", run_id, "--at", "1", "--headless", "--no-wait", "--db", db],
                 ["replay", run_id, "--db", db], ["db", "copy", "--from", db, "--to", "copy.db"]):
        done, modules = imported(*args, cwd=tmp_path)
        assert done.returncode in ((0, 3) if args[0] == "replay" else (0,)), (args, done.stderr[-2000:])  # 3: diverged
        assert not modules & set(CLUSTER), (args, modules & set(CLUSTER))


def test_a_postgresql_store_imports_psycopg(pg_url: str, tmp_path: Path) -> None:
    for args in (["db", "init"], ["runs"]):
        done, modules = imported(*args, "--db", pg_url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "psycopg" in modules


@pytest.mark.parametrize("module", ["loopterm.store.target", "loopterm.store", "loopterm.tui.console",
                                    "loopterm.tui.cli", "loopterm.tui.db_cli"])
def test_importing_the_store_and_cli_modules_loads_no_cluster_package(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert module in loaded
    assert not {m for m in loaded if m.split(".")[0] in CLUSTER}
