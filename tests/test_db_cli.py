"""`--db` as a path or a postgresql:// URL (store/target.py), `loopterm db init`, `loopterm db copy`, and the
read and branch commands against a PostgreSQL store, all through the real console script."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.errors import ConfigError
from loopterm.store.target import StoreTarget, redact, redact_text

SCRIPT = Path(sys.executable).parent / "loopterm"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "loopterm.tui.cli"]
SECRET = "s3cr3t-Pa55"


def loopterm(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPTERM_")}
    full = {**base, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=timeout)


def one_line_refusal(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "unexpected error" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopterm: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert SECRET not in done.stdout + done.stderr
    return lines[0]


# -- parsing --------------------------------------------------------------------------------------------------


def test_a_path_is_sqlite_exactly_as_before(tmp_path: Path) -> None:
    target = StoreTarget.parse(str(tmp_path / "x.db"))
    assert (target.backend, target.path, target.url, target.shown) == ("sqlite", tmp_path / "x.db", None, str(tmp_path / "x.db"))
    assert StoreTarget.parse(tmp_path / "x.db") == target == StoreTarget.of(tmp_path / "x.db")
    assert not target.exists()
    with pytest.raises(ConfigError, match=r"^--db .*/nope/x\.db: the folder .*/nope does not exist; create it"):
        StoreTarget.parse(str(tmp_path / "nope" / "x.db"))
    with pytest.raises(ConfigError, match=r"^LOOPTERM_DB="):
        StoreTarget.parse(str(tmp_path / "nope" / "x.db"), "LOOPTERM_DB=")
    assert StoreTarget.parse(".loopterm/loopterm.db").path == Path(".loopterm/loopterm.db")  # the default: no check


@pytest.mark.parametrize("url", [f"postgresql://ann:{SECRET}@db.example:5433/loops",
                                 f"postgres://ann:{SECRET}@db.example/loops?sslmode=require",
                                 f"postgresql://ann@db.example/loops?password={SECRET}",
                                 "postgresql:///loops?host=/var/run/postgresql"])
def test_a_postgresql_url_is_parsed_and_never_shows_its_password(url: str) -> None:
    target = StoreTarget.parse(url)
    assert target.backend == "postgresql" and target.path is None and target.url == url
    assert SECRET not in target.shown and SECRET not in repr(target) and SECRET not in str(target)
    assert target.shown.startswith(url.split("://")[0] + "://")
    assert target.exists()  # a server database: opening it says whether it holds a store
    if SECRET in url:
        assert "***" in target.shown


@pytest.mark.parametrize(("url", "words"), [
    (f"postgresql://ann:{SECRET}@db.example:99999/loops", "is not a valid database URL"),
    (f"postgresql://ann:{SECRET}@db.example:port/loops", "is not a valid database URL"),
    (f"postgresql://ann:{SECRET}@/loops", "names no host"),
    (f"postgresql://ann:{SECRET}@db.example", "names no database"),
    (f"postgresql://ann:{SECRET}@db.example/a/b", "names no database"),
    (f"mysql://ann:{SECRET}@db.example/loops", "mysql scheme is not a store loopterm knows"),
    ("sqlite:///x.db", "give a SQLite file path or a PostgreSQL URL"),
])
def test_a_malformed_url_is_refused_in_one_line_without_the_password(url: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        StoreTarget.parse(url)
    message = str(info.value)
    assert message.startswith("--db ") and words in message and "\n" not in message and SECRET not in message


def test_redaction_of_a_url_and_of_urls_inside_text() -> None:
    assert redact(f"postgresql://ann:{SECRET}@h:1/d") == "postgresql://ann:***@h:1/d"
    assert redact("postgresql://ann@h/d") == "postgresql://ann@h/d"
    text = f"failed for postgresql://ann:{SECRET}@h/d and postgres://bo:{SECRET}@k/e today"
    assert redact_text(text) == "failed for postgresql://ann:***@h/d and postgres://bo:***@k/e today"


def test_workspaces_of_a_server_store_are_under_the_working_folder_unless_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPTERM_WORKSPACES", raising=False)
    pg = StoreTarget.parse("postgresql://ann@db.example/loops")
    assert pg.workspace_root() == tmp_path.resolve() / ".loopterm" / "workspaces"
    assert StoreTarget.parse(str(tmp_path / "x.db")).workspace_root() == tmp_path.resolve() / "workspaces"
    monkeypatch.setenv("LOOPTERM_WORKSPACES", str(tmp_path / "ws"))
    assert pg.workspace_root() == tmp_path / "ws"
    assert StoreTarget.parse(str(tmp_path / "x.db")).workspace_root() == tmp_path / "ws"
    lock = pg.lock_path("daemon")
    assert lock.parent == tmp_path and lock.name.startswith("daemon-") and SECRET not in str(lock)


def test_a_url_in_loopterm_db_reaches_the_command_intact(tmp_path: Path) -> None:
    """LOOPTERM_DB holding a URL is not folded into a path (`//` kept): a malformed one is named as typed."""
    done = loopterm("runs", cwd=tmp_path, env={"LOOPTERM_DB": f"postgresql://ann:{SECRET}@db.example:99999/loops"})
    one_line_refusal(done, "LOOPTERM_DB=postgresql://ann:***@db.example:99999/loops is not a valid database URL")
    assert not (tmp_path / ".loopterm").exists() and not (tmp_path / "postgresql:").exists()


# -- a SQLite store to copy -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A SQLite store with a converged run, a fork and a fork of that fork, an escalated run with a pending
    command, long-term memory and a daily budget."""
    work = tmp_path_factory.mktemp("source")
    db = str(work / "src.db")
    assert loopterm("run", "codefix", "--headless", "--db", db, cwd=work).returncode == 0
    root = json.loads(loopterm("runs", "--json", "--db", db, cwd=work).stdout)[0]["id"]
    assert loopterm("fork", root, "--at", "2", "--headless", "--no-wait", "--db", db, cwd=work).returncode == 0
    runs = json.loads(loopterm("runs", "--json", "--db", db, cwd=work).stdout)
    branch = next(r["id"] for r in runs if r["parent_run"] == root)
    twig_done = loopterm("fork", branch, "--at", "3", "--dry-run", "--db", db, cwd=work)
    assert twig_done.returncode == 0, twig_done.stderr
    assert loopterm("fork", branch, "--at", "3", "--headless", "--no-wait", "--db", db, cwd=work).returncode in (0, 1)
    runs = json.loads(loopterm("runs", "--json", "--db", db, cwd=work).stdout)
    twig = next(r["id"] for r in runs if r["parent_run"] == branch)
    assert loopterm("run", "demo", "--headless", "--no-wait", "--db", db, cwd=work).returncode == 4
    runs = json.loads(loopterm("runs", "--json", "--db", db, cwd=work).stdout)
    escalated = next(r["id"] for r in runs if r["loop"] == "demo")
    assert loopterm("answer", escalated, "--fact", "the tests live in tests/", "--db", db, cwd=work).returncode == 0
    assert loopterm("memory", "codefix", "add", "style", "prefer small diffs", "--db", db, cwd=work).returncode == 0
    assert loopterm("budget", "--set-daily", "7.5", "--db", db, cwd=work).returncode == 0
    return {"db": Path(db), "root": root, "branch": branch, "twig": twig, "escalated": escalated}


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_db_init_creates_a_sqlite_store_once(tmp_path: Path) -> None:
    done = loopterm("db", "init", "--db", "new.db", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "created a new loopterm store at new.db", done.stderr
    again = loopterm("db", "init", "--db", "new.db", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "new.db already holds the loopterm schema (0 run(s)); nothing to do"
    one_line_refusal(loopterm("db", "init", "--db", "nope/new.db", cwd=tmp_path), "the folder nope does not exist")


def test_db_copy_to_a_sqlite_file_is_whole_and_verified(source_store: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    shutil.copy(source_store["db"], src)
    done = loopterm("db", "copy", "--from", "src.db", "--to", "dst.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith("copied src.db to dst.db: 4 run(s) (2 branch(es))") and "verified" in line
    assert "2 command(s)" in line and "daily budget $7.5" in line
    dst = tmp_path / "dst.db"
    for sql in ("SELECT id, loop, key, value, created_at, updated_at FROM memory ORDER BY id",
                "SELECT * FROM commands ORDER BY id", "SELECT * FROM spend ORDER BY id",
                "SELECT value FROM meta WHERE key = 'daily_budget_usd'"):
        assert rows(src, sql) == rows(dst, sql), sql
    # the memory is searchable in the copy (its full-text index was filled by the insert)
    found = loopterm("memory", "codefix", "search", "small diffs", "--json", "--db", "dst.db", cwd=tmp_path)
    assert found.returncode == 0 and "prefer small diffs" in found.stdout, found.stderr
    # the pending command is still pending for the escalated run, and the twig still reads its lineage
    shown = loopterm("show", source_store["twig"], "--json", "--db", "dst.db", cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run"]["parent_run"] == source_store["branch"]

    again = loopterm("db", "copy", "--from", "src.db", "--to", "dst.db", cwd=tmp_path)  # a re-run: nothing doubled
    assert again.returncode == 0 and again.stdout.startswith("dst.db already holds a copy of src.db, identical (4 run(s)")
    assert again.stdout.strip().endswith("nothing copied"), again.stdout + again.stderr
    for sql in ("SELECT count(*) FROM commands", "SELECT count(*) FROM spend", "SELECT count(*) FROM events"):
        assert rows(src, sql) == rows(dst, sql)


def test_db_copy_refusals(source_store: dict[str, Any], tmp_path: Path) -> None:
    shutil.copy(source_store["db"], tmp_path / "src.db")
    one_line_refusal(loopterm("db", "copy", "--from", "missing.db", "--to", "dst.db", cwd=tmp_path),
                     "--from missing.db: no such file")
    (tmp_path / "notes.txt").write_text("not a store\n")
    one_line_refusal(loopterm("db", "copy", "--from", "notes.txt", "--to", "dst.db", cwd=tmp_path),
                     "--from notes.txt", "not a SQLite database")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    one_line_refusal(loopterm("db", "copy", "--from", "other.db", "--to", "dst.db", cwd=tmp_path),
                     "--from other.db", "not a loopterm database")
    one_line_refusal(loopterm("db", "copy", "--from", "src.db", "--to", "src.db", cwd=tmp_path), "is the store being copied")
    # a target that holds a run of its own
    assert loopterm("run", "codefix", "--headless", "--db", "busy.db", cwd=tmp_path).returncode == 0
    before = rows(tmp_path / "busy.db", "SELECT count(*) FROM runs")
    one_line_refusal(loopterm("db", "copy", "--from", "src.db", "--to", "busy.db", cwd=tmp_path),
                     "--to busy.db already holds runs and is not a copy of src.db")
    assert rows(tmp_path / "busy.db", "SELECT count(*) FROM runs") == before
    assert not (tmp_path / "dst.db").exists()


# -- PostgreSQL ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_one_line_exit_2(tmp_path: Path) -> None:
    url = f"postgresql://ann:{SECRET}@127.0.0.1:{_free_port()}/loops"
    for args in (["runs"], ["db", "init"], ["budget"]):
        line = one_line_refusal(loopterm(*args, "--db", url, cwd=tmp_path), "postgresql://ann:***@127.0.0.1")
        assert "connect" in line
    assert not (tmp_path / ".loopterm").exists()


@pytest.fixture
def password_url(postgres_server: Any, pg_url: str) -> str:
    """pg_url's database reached as a role that must give a password (scram), in front of the trust rule."""
    import psycopg

    role = "lt_pw_" + pg_url.rsplit("_", 1)[-1]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
        conn.execute(f"GRANT ALL ON SCHEMA public TO {role}")
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        text = hba.read_text()
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        if rule not in text:
            hba.write_text(rule + text)
        conn.execute("SELECT pg_reload_conf()")
    return pg_url.replace("postgresql://loopterm@", f"postgresql://{role}:{SECRET}@")


def test_a_wrong_password_is_one_line_without_the_password(password_url: str, tmp_path: Path) -> None:
    wrong = password_url.replace(SECRET, "not-" + SECRET[::-1])
    line = one_line_refusal(loopterm("runs", "--db", wrong, cwd=tmp_path), "password")
    assert "not-" not in line and "***" in line
    done = loopterm("db", "init", "--db", password_url, cwd=tmp_path)  # the right one works
    assert done.returncode == 0 and SECRET not in done.stdout + done.stderr, done.stderr


def test_db_init_on_postgresql_is_idempotent(pg_url: str, tmp_path: Path) -> None:
    done = loopterm("db", "init", "--db", pg_url, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"created the loopterm schema in {pg_url}", done.stderr
    again = loopterm("db", "init", "--db", pg_url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{pg_url} already holds the loopterm schema (0 run(s)); nothing to do"
    runs = loopterm("runs", "--json", "--db", pg_url, cwd=tmp_path)
    assert runs.returncode == 0 and json.loads(runs.stdout) == []


def test_db_before_the_command_names_the_store_too(pg_url: str, tmp_path: Path) -> None:
    """`loopterm --db URL` opens the demo on that store; `loopterm --db URL runs` is `runs --db URL`."""
    assert loopterm("db", "init", "--db", pg_url, cwd=tmp_path).returncode == 0
    runs = loopterm("--db", pg_url, "runs", "--json", cwd=tmp_path)
    assert runs.returncode == 0 and json.loads(runs.stdout) == [], runs.stderr
    assert not (tmp_path / ".loopterm" / "loopterm.db").exists()  # not the default SQLite file
    bad = loopterm("--db", "postgresql://nowhere.invalid:1/x", "runs", cwd=tmp_path)
    one_line_refusal(bad, "nowhere.invalid")


def test_db_copy_into_postgresql_then_every_command_works_there(source_store: dict[str, Any], pg_url: str,
                                                                tmp_path: Path) -> None:
    shutil.copy(source_store["db"], tmp_path / "src.db")
    done = loopterm("db", "copy", "--from", "src.db", "--to", pg_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"copied src.db to {pg_url}: 4 run(s) (2 branch(es))") and "verified" in done.stdout
    again = loopterm("db", "copy", "--from", "src.db", "--to", pg_url, cwd=tmp_path)
    assert again.returncode == 0 and "already holds a copy of src.db, identical" in again.stdout, again.stderr

    def both(*args: str) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        return (loopterm(*args, "--db", "src.db", cwd=tmp_path), loopterm(*args, "--db", pg_url, cwd=tmp_path))

    here, there = both("runs", "--json")
    assert here.returncode == there.returncode == 0, there.stderr
    strip = lambda runs: [{k: v for k, v in r.items() if k != "storage"} for r in json.loads(runs)]  # noqa: E731
    assert strip(here.stdout) == strip(there.stdout)
    twig = source_store["twig"]
    here, there = both("show", twig, "--json")
    assert there.returncode == 0 and json.loads(here.stdout) == json.loads(there.stdout), there.stderr
    here, there = both("budget", "--json")
    assert there.returncode == 0 and json.loads(here.stdout) == json.loads(there.stdout), there.stderr
    here, there = both("diff", source_store["root"], source_store["branch"], "--json")
    assert there.returncode == 0 and json.loads(here.stdout) == json.loads(there.stdout), there.stderr

    replay = loopterm("replay", source_store["root"], "--json", "--db", pg_url, cwd=tmp_path)
    assert replay.returncode == 0 and json.loads(replay.stdout)["identical"] is True, replay.stdout + replay.stderr
    fork = loopterm("fork", source_store["branch"], "--at", "1", "--headless", "--no-wait", "--db", pg_url, cwd=tmp_path)
    assert fork.returncode == 0, fork.stdout + fork.stderr
    after = json.loads(loopterm("runs", "--json", "--db", pg_url, cwd=tmp_path).stdout)
    assert len(after) == 6  # the four copied, the replay's run and the new branch
    assert (tmp_path / ".loopterm" / "workspaces").is_dir()  # a server store's workspaces: under the working folder
    # the SQLite source is not touched by any of it
    assert len(json.loads(loopterm("runs", "--json", "--db", "src.db", cwd=tmp_path).stdout)) == 4


def test_a_server_failure_mid_command_is_one_line_without_the_password() -> None:
    """A psycopg error that escapes a command (the server went away) is named with the store, redacted, exit 1."""
    import psycopg

    from loopterm.tui.cli import _server_failure

    failure = psycopg.OperationalError(f"server closed the connection (postgresql://ann:{SECRET}@db.example/loops)")
    message, bad_input = _server_failure(failure, "postgresql://ann:***@db.example/loops")  # type: ignore[misc]
    assert SECRET not in message and "\n" not in message and not bad_input
    assert message.startswith("the PostgreSQL store postgresql://ann:***@db.example/loops failed: server closed")
    assert _server_failure(ValueError("not the database's"), "x") is None


def test_db_copy_into_a_postgresql_store_with_runs_of_its_own_is_refused(source_store: dict[str, Any], pg_url: str,
                                                                         tmp_path: Path) -> None:
    shutil.copy(source_store["db"], tmp_path / "src.db")
    assert loopterm("run", "codefix", "--headless", "--db", pg_url, cwd=tmp_path).returncode == 0
    line = one_line_refusal(loopterm("db", "copy", "--from", "src.db", "--to", pg_url, cwd=tmp_path),
                            f"--to {pg_url} already holds runs and is not a copy of src.db")
    assert "copy into an empty database" in line
    assert len(json.loads(loopterm("runs", "--json", "--db", pg_url, cwd=tmp_path).stdout)) == 1  # nothing added
    one_line_refusal(loopterm("db", "copy", "--from", pg_url, "--to", "x.db", cwd=tmp_path),
                     "give the SQLite file to copy")


@pytest.mark.slow  # 30 s of subprocesses; `pytest -m slow tests/test_db_cli.py`
def test_the_other_commands_on_a_postgresql_store(pg_url: str, tmp_path: Path) -> None:
    """memory, export / import, answer, resume, prune and policy through the console script, on PostgreSQL."""
    def ok(*args: str, codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        done = loopterm(*args, "--db", pg_url, cwd=tmp_path)
        assert done.returncode in codes, (args, done.stdout[-1500:], done.stderr[-1500:])
        assert "Traceback" not in done.stderr
        return done

    ok("run", "codefix", "--headless")
    run_id = json.loads(ok("runs", "--json").stdout)[0]["id"]
    ok("memory", "codefix", "add", "style", "prefer small diffs")
    assert "prefer small diffs" in ok("memory", "codefix", "search", "diffs", "--json").stdout
    ok("export", run_id, "-o", "run.jsonl")
    done = loopterm("import", "run.jsonl", "--db", "local.db", cwd=tmp_path)  # PostgreSQL -> a SQLite file
    assert done.returncode == 0 and run_id in done.stdout, done.stderr
    ok("run", "demo", "--headless", "--no-wait", codes=(4,))  # escalates, waits on a person
    demo = next(r["id"] for r in json.loads(ok("runs", "--json").stdout) if r["loop"] == "demo")
    ok("answer", demo, "--fact", "the tests live in tests/")
    ok("resume", demo, "--no-wait", codes=(0, 3, 4))
    kinds = [e["kind"] for e in json.loads(ok("show", demo, "--json").stdout)["events"]]
    assert {"fact_added", "escalation_answered"} <= set(kinds[kinds.index("escalated"):])  # the answer was taken there
    pruned = json.loads(ok("prune", "--keep-last", "0", "--dry-run", "--json").stdout)
    assert run_id in json.dumps(pruned)
    ok("policy", "list")
