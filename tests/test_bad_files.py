"""Bad database files and a failing disk, through every CLI command that opens the store.

A file that is not SQLite, a truncated one, one from a newer loopterm, a read-only folder, a page found
damaged while reading, a lock held too long, a full disk (a small filesystem when this machine lets us mount
one; RLIMIT_FSIZE, a kernel-enforced file size limit, everywhere): one clear line on stderr, a non-zero exit,
no traceback, and the existing data intact (every file byte for byte; after a full disk, every committed
iteration intact and the run resumable once there is space again).

tests/test_store.py checks the refusals at the Store level; this file checks each command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import runlog
from loopterm.store import SCHEMA_VERSION, Store
from loopterm.tui.cli import main

N = 12  # iterations of the sample run

LOOP_FILE = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool

HERE = Path(__file__).parent
N = {n}

@tool(side_effects=True, idempotent=False)
def note(ctx: ToolContext, line: str) -> str:
    """Append a line to this run's effects log: a real side effect outside the workspace."""
    with open(HERE / f"effects-{{ctx.run_id}}.log", "a") as f:
        f.write(f"{{ctx.iteration}} {{ctx.idempotency_key}} {{line}}\\n")
    return "noted"

loop = Loop(name="fast", goal="note lines", state=LoopState, tools=[note], script=HERE / "script.json",
            max_iterations=N, stall_window=None, converged=lambda state, gates: state.iteration >= N, recall=0)
'''


def write_project(folder: Path, n: int) -> Path:
    """A loop file of n fast iterations (no model delay), its script and a one-case cases file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fast.py").write_text(LOOP_FILE.format(n=n))
    turns = [{"content": {"action": {"tool": "note", "args": {"line": f"line {i}"}}, "subgoal": f"line {i}",
                          "confidence": 0.9, "reasoning": "the next line"}} for i in range(1, n + 1)]
    (folder / "script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}, "turns": turns}))
    (folder / "cases.json").write_text(json.dumps([{"id": "one"}]))
    return folder / "fast.py"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loopterm.tui.cli", *args]


ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200"}
ENV.pop("LOOPTERM_DEBUG", None)


def checkpoint(db: Path) -> None:
    """Fold the WAL into the main file, so the file alone is the whole database."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert not db.with_name(db.name + "-wal").exists()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A database with a converged run, a memory item and a daily budget; the run's export; the loop."""
    work = tmp_path_factory.mktemp("sample")
    loop_file = write_project(work / "project", N)
    db = work / "good" / "loopterm.db"
    db.parent.mkdir()
    for args in (["run", str(loop_file), "--headless"], ["memory", "fast", "add", "tip", "keep it short"],
                 ["budget", "--set-daily", "100"]):
        done = subprocess.run(cli(*args, "--db", str(db)), cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(subprocess.run(cli("runs", "--json", "--db", str(db)), env=ENV, capture_output=True, text=True,
                                       check=True).stdout)[0]["id"]
    export = work / "export.jsonl"
    subprocess.run(cli("export", run_id, "-o", str(export), "--db", str(db)), env=ENV, check=True, capture_output=True)
    checkpoint(db)
    return {"db": db, "run": run_id, "loop": loop_file, "export": export, "work": work}


def commands(sample: dict[str, Any]) -> dict[str, list[str]]:
    """Every command that opens the store (reads and writes), as a person would type it."""
    run, loop = sample["run"][:6], str(sample["loop"])
    cases = str(sample["loop"].parent / "cases.json")
    return {
        "run": ["run", loop, "--headless"],
        "runs": ["runs"],
        "show": ["show", run],
        "watch": ["watch", run],
        "resume": ["resume", run],
        "fork": ["fork", run, "--at", "3"],
        "export": ["export", run],
        "import": ["import", str(sample["export"])],
        "replay": ["replay", run],
        "eval": ["eval", loop, "--cases", cases],
        "memory": ["memory", "fast", "list"],
        "memory-add": ["memory", "fast", "add", "another", "fact"],
        "budget": ["budget"],
        "budget-set": ["budget", "--set-daily", "5"],
    }


COMMANDS = ["run", "runs", "show", "watch", "resume", "fork", "export", "import", "replay", "eval", "memory",
            "memory-add", "budget", "budget-set"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder (recursively) and the hash of its bytes: any new, changed or missing file shows."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


EMPTY = hashlib.sha256(b"").hexdigest()


def invoke(args: list[str], db: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in this process (what `loopterm ARGS --db DB` does), with its exit code and output."""
    capsys.readouterr()
    code = main([*args, "--db", str(db)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_line(code: int, out: str, err: str, expected: int, match: str) -> None:
    assert code == expected, (code, out, err)
    assert "Traceback" not in out + err and "unexpected error" not in err, err
    assert "database is locked" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopterm: "), err
    assert match in lines[0], lines[0]


# -- files that are not a loopterm database this version can use ------------------------------------------


def not_sqlite(good: Path, db: Path) -> str:
    db.write_text("these are my notes, not a database\n" * 200)
    return "is not a SQLite database"


def truncated_half(good: Path, db: Path) -> str:
    data = good.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    return "is a damaged SQLite database"


def truncated_mid_page(good: Path, db: Path) -> str:
    data = good.read_bytes()
    db.write_bytes(data[: len(data) - 1000])  # the last page torn
    return "is a damaged SQLite database"


def truncated_to_header(good: Path, db: Path) -> str:
    db.write_bytes(good.read_bytes()[:100])
    return "is a damaged SQLite database"


def newer_schema(good: Path, db: Path) -> str:
    shutil.copy(good, db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    conn.commit()
    conn.close()
    checkpoint(db)
    return f"was written by a newer loopterm (schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}); upgrade loopterm"


BAD_FILES = [not_sqlite, truncated_half, truncated_mid_page, truncated_to_header, newer_schema]


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__)
def test_every_command_refuses_a_bad_file_and_changes_nothing(sample: dict[str, Any], make: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    all_commands = commands(sample)
    for name in COMMANDS:
        folder = tmp_path / name
        folder.mkdir()
        db = folder / "loopterm.db"
        message = make(sample["db"], db)
        before = snapshot(folder)
        code, out, err = invoke(all_commands[name], db, capsys)
        assert_one_clear_line(code, out, err, 2, message)
        assert snapshot(folder) == before, name  # byte for byte; no -wal, -shm, workspace or new file


# -- a read-only folder ----------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make a folder read-only for this process: chmod for a normal user; root ignores that, so a read-only
    bind mount (skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    bound = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bound.returncode != 0:
        pytest.skip("running as root where mounting is not allowed: cannot make a read-only folder")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


READ_ONLY = "is read-only (the store keeps loopterm.db-wal and loopterm.db-shm beside it); make the folder writable"


def test_every_command_refuses_a_database_in_a_read_only_folder(sample: dict[str, Any], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    all_commands = commands(sample)
    folder = tmp_path / "archive"
    folder.mkdir()
    db = folder / "loopterm.db"
    shutil.copy(sample["db"], db)
    before = snapshot(folder)
    with read_only(folder):
        assert not os.access(folder, os.W_OK)
        for name in COMMANDS:
            code, out, err = invoke(all_commands[name], db, capsys)
            assert_one_clear_line(code, out, err, 2, f"cannot use {db}: its folder {folder} {READ_ONLY}")
    assert snapshot(folder) == before


def test_a_new_database_in_a_read_only_folder_is_refused_by_the_commands_that_would_create_it(
        sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    all_commands = commands(sample)
    folder = tmp_path / "empty"
    folder.mkdir()
    db = folder / "loopterm.db"
    with read_only(folder):
        for name in ["run", "import", "eval", "memory-add", "budget-set"]:
            code, out, err = invoke(all_commands[name], db, capsys)
            assert_one_clear_line(code, out, err, 2, f"cannot use {db}: its folder {folder} {READ_ONLY}")
        for name in ["show", "watch", "resume", "fork", "export", "replay"]:  # nothing to read: said so
            code, out, err = invoke(all_commands[name], db, capsys)
            assert_one_clear_line(code, out, err, 2, f"no loopterm database at {db}")
    assert list(folder.iterdir()) == []


# -- damage found while reading ----------------------------------------------------------------------------


def test_a_page_found_damaged_while_reading_is_one_clear_line(sample: dict[str, Any], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The header and schema read fine (the open check passes); an iterations page is garbage."""
    db = tmp_path / "loopterm.db"
    shutil.copy(sample["db"], db)
    conn = sqlite3.connect(db)
    root, page_size = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'iterations'").fetchone()[0], \
        conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    data[(root - 1) * page_size:root * page_size] = b"\xa5" * page_size
    db.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    for args in (["show", sample["run"]], ["export", sample["run"]], ["replay", sample["run"]]):
        code, out, err = invoke(args, db, capsys)
        assert_one_clear_line(code, out, err, 2, f"{db} is a damaged SQLite database (database disk image is malformed); "
                                                 "restore it from a backup")
    # The commands ran in this process and left their connections open: an empty WAL and its index, no data.
    after = snapshot(tmp_path)
    assert after.pop("loopterm.db-wal", EMPTY) == EMPTY and after.pop("loopterm.db-shm", None) and after == before


# -- a lock held longer than SQLite's busy timeout ------------------------------------------------------------

HOLDER = '''
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
'''


@contextlib.contextmanager
def lock_held(db: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the database's write lock (as a person's sqlite3 shell or a long import would)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def test_a_write_outlasts_a_lock_held_past_the_busy_timeout(sample: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite gives up after its busy timeout; the store tries again (up to LOCK_WAIT_S) instead of failing."""
    monkeypatch.setattr("loopterm.store.db.BUSY_TIMEOUT_MS", 100)
    db = tmp_path / "loopterm.db"
    shutil.copy(sample["db"], db)
    with Store.open(db) as store:
        with lock_held(db, 1.0):
            started = time.monotonic()
            event = store.append_event(sample["run"], runlog.StatusChanged(status="paused", message="written after the lock"))
            waited = time.monotonic() - started
        assert store.lock_retries >= 3 and 0.5 < waited < 5
        assert store.events(sample["run"])[-1] == event


def test_a_lock_held_too_long_is_one_clear_line_and_changes_nothing(sample: dict[str, Any], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("loopterm.store.db.BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr("loopterm.store.db.LOCK_WAIT_S", 0.5)
    db = tmp_path / "loopterm.db"
    shutil.copy(sample["db"], db)
    rows = sqlite3.connect(db).execute("SELECT * FROM memory ORDER BY id").fetchall()
    with lock_held(db, 10):
        for args in (["memory", "fast", "add", "another", "fact"], ["budget", "--set-daily", "5"]):
            code, out, err = invoke(args, db, capsys)
            assert_one_clear_line(code, out, err, 1, f"{db} stayed locked by another process for too long; let that "
                                                     "process finish (or close it) and try again")
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT * FROM memory ORDER BY id").fetchall() == rows
    assert conn.execute("SELECT value FROM meta WHERE key = 'daily_budget_usd'").fetchall() in ([("100.0",)], [("100",)])
    conn.close()


# -- a full disk -----------------------------------------------------------------------------------------------


def run_rows(db: Path, run_id: str) -> list[tuple[Any, ...]]:
    """The committed iterations of a run and their states, as stored."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT i.*, s.keyframe, s.body FROM iterations i JOIN states s ON s.run_id = i.run_id AND s.n = i.n "
            "WHERE i.run_id = ? ORDER BY i.n", [run_id]).fetchall()
    finally:
        conn.close()


def fill_then_resume(work: Path, db: Path, n: int, capsys: pytest.CaptureFixture[str], *, limit: int | None,
                     make_space: Any, expected: str) -> dict[str, int]:
    """Run until the disk fills (one clear line, exit 1), then check what was committed and resume to the end."""
    loop_file = write_project(work / "project", n)
    db.parent.mkdir(parents=True, exist_ok=True)
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    first = subprocess.run(cli("run", str(loop_file), "--headless", "--db", str(db)), env=ENV, capture_output=True,
                           text=True, timeout=300, preexec_fn=preexec)
    lines = first.stderr.strip().splitlines()
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr
    assert len(lines) == 1 and "Traceback" not in first.stdout + first.stderr, first.stderr
    assert lines[0].startswith(f"loopterm: cannot {expected}") and "`loopterm resume RUN`" in lines[0], lines
    make_space()
    with Store.open(db, create=False) as store:  # every committed iteration reads back whole
        [run] = store.list_runs()
        run_id, committed = run.id, run.iterations
        assert run.status == "running" and 1 <= committed < n  # as after a crash: resumable
        assert [it.state["iteration"] for it in store.iterations(run_id)] == list(range(1, committed + 1))
    kept = run_rows(db, run_id)
    assert [row[1] for row in kept] == list(range(1, committed + 1))
    code, out, err = invoke(["resume", run_id], db, capsys)  # this process: no file size limit
    assert code == 0 and "Traceback" not in out + err, out[-2000:] + err
    assert run_rows(db, run_id)[:committed] == kept  # what was committed before the disk filled is unchanged
    with Store.open(db, create=False) as store:
        run = store.get_run(run_id)
        assert run.status == "converged" and [it.n for it in store.iterations(run_id)] == list(range(1, n + 1))
    effects = (loop_file.parent / f"effects-{run_id}.log").read_text().splitlines()
    assert sorted(int(line.split()[0]) for line in effects) == list(range(1, n + 1))  # each side effect once
    return {"committed_before_full": committed, "iterations": n}


def test_a_file_size_limit_mid_run_is_one_clear_line_and_the_run_resumes(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG): the WAL cannot grow, as on a full disk."""
    db = tmp_path / "db" / "loopterm.db"
    figures = fill_then_resume(tmp_path, db, 40, capsys, limit=600_000, make_space=lambda: None,
                     expected=f"use {db}: disk I/O error (a full disk, a file size limit or a failing disk)")
    print(json.dumps(figures))


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/loopterm-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


CAN_MOUNT = can_mount()
NEEDS_MOUNT = pytest.mark.skipif(not CAN_MOUNT, reason="needs to mount a small filesystem (root with CAP_SYS_ADMIN)")


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@NEEDS_MOUNT
def test_a_full_filesystem_mid_run_is_one_clear_line_and_the_run_resumes_once_there_is_space(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with small_filesystem(tmp_path / "disk", "1200k") as disk:
        db = disk / "loopterm.db"

        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

        figures = fill_then_resume(tmp_path, db, 40, capsys, limit=None, make_space=grow,
                                   expected=f"write {db}: the disk is full")
    print(json.dumps(figures))


@NEEDS_MOUNT
def test_every_command_on_a_full_filesystem_is_one_clear_line_and_changes_nothing(
        sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    all_commands = commands(sample)
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        db = disk / "loopterm.db"
        shutil.copy(sample["db"], db)
        with contextlib.suppress(OSError), (disk / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        assert shutil.disk_usage(disk).free < 4096
        before = hashlib.sha256(db.read_bytes()).hexdigest()
        for name in COMMANDS:
            code, out, err = invoke(all_commands[name], db, capsys)
            assert_one_clear_line(code, out, err, 1, "(a full disk, a file size limit or a failing disk); fix that")
            assert hashlib.sha256(db.read_bytes()).hexdigest() == before, name


# -- a mistyped store path -----------------------------------------------------------------------------------

TYPO_COMMANDS = [["run", "codefix", "--headless"], ["runs"], ["show", "abc123"], ["budget"], ["budget", "--set-daily", "5"],
                 ["prune", "--keep-last", "1"], ["memory", "codefix", "add", "k", "v"], ["export", "abc123"],
                 ["eval", "codefix", "--cases", "cases.json"], ["resume", "abc123"], ["policy", "list"]]


@pytest.mark.parametrize("args", TYPO_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_a_db_in_a_folder_that_does_not_exist_is_refused_not_created(
        args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPTERM_DB", raising=False)
    db = tmp_path / "stroe" / "loopterm.db"  # a typo for an existing store/ folder
    (tmp_path / "store").mkdir()
    code, out, err = invoke(args, db, capsys)
    assert_one_clear_line(code, out, err, 2, f"--db {db}: the folder {db.parent} does not exist; create it "
                                             f"(mkdir -p {db.parent}) or check the path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no stroe/, no .loopterm/, no workspace

    monkeypatch.setenv("LOOPTERM_DB", str(db))  # the same typo in the environment
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    assert_one_clear_line(code, out, err, 2, f"LOOPTERM_DB={db}: the folder {db.parent} does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_the_default_store_and_its_folder_are_still_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPTERM_DB", raising=False)
    assert main(["budget", "--set-daily", "5"]) == 0, capsys.readouterr().err
    assert (tmp_path / ".loopterm" / "loopterm.db").is_file()
    assert main(["budget", "--set-daily", "6", "--db", str(tmp_path / "mine.db")]) == 0  # an existing folder: created
    assert (tmp_path / "mine.db").is_file()
    shutil.rmtree(tmp_path / ".loopterm")
    assert main(["budget", "--set-daily", "7", "--db", str(tmp_path / ".loopterm" / "loopterm.db")]) == 0  # the default, spelt out
    assert (tmp_path / ".loopterm" / "loopterm.db").is_file()
