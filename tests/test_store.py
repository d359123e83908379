"""The store, on SQLite and on PostgreSQL (the `store` fixture runs each test on both): round trips, atomic commits, refusals that leave files untouched, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from loopterm.core.errors import ConfigError
from loopterm.core import runlog
from loopterm.core.records import (
    CommandRecord,
    Intent,
    IterationRecord,
    RunRecord,
    ToolCallRecord,
)
from loopterm.core.runlog import EventRecord
from loopterm.store import SCHEMA_VERSION, DuplicateIterationError, Store

BIG = ("naïve 日本語 🚀 line\n\ttab \"quote\" \\ back\x00nul " * 20_000)[: 1024 * 1024]


def make_run(run_id: str = "run-0001", **over: Any) -> RunRecord:
    fields: dict[str, Any] = dict(
        id=run_id, loop="codefix", loop_ref="examples/codefix.py:loop", goal="fix the failing test",
        spec_hash="abc123", model="scripted/codefix", status="running", workspace="/tmp/ws",
        created_at=1_700_000_000.123456, updated_at=1_700_000_000.123456, max_iterations=10,
        budget={"tokens": 10_000, "usd": 0.5, "wall_seconds": None},
    )
    fields.update(over)
    return RunRecord(**fields)


def make_iteration(run_id: str, n: int, **over: Any) -> IterationRecord:
    fields: dict[str, Any] = dict(
        run_id=run_id, n=n, started_at=1_700_000_000.0 + n, ended_at=1_700_000_000.5 + n,
        prompt=[{"role": "system", "content": "be terse"}, {"role": "user", "content": f"step {n}"}],
        raw_response='{"action": {"tool": "run_tests", "args": {}}}',
        decision={"action": {"tool": "run_tests", "args": {}}, "confidence": 0.75, "subgoal": "green"},
        state={"iteration": n, "memory": {"facts": ["a", "b"]}},
    )
    fields.update(over)
    return IterationRecord(**fields)


def make_intent(run_id: str, n: int) -> Intent:
    return Intent(
        run_id=run_id, n=n, prompt=[{"role": "user", "content": "hi"}], raw_response="{}",
        decision={"action": {"tool": "noop", "args": {}}}, tokens_in=5, tokens_out=7, cost_usd=0.001,
        latency_ms=12.5, model="scripted/x", started_at=1.5,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


@pytest.fixture
def store(store_target: str | Path) -> Iterator[Store]:
    s = Store.open(store_target)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """For what only SQLite has (PRAGMAs, query plans, its tracer)."""
    s = Store.open(tmp_path / "db" / "loopterm.db")
    yield s
    s.close()


def target_of(store: Store) -> str | Path:
    """What Store.open takes to open this store again (the URL with its password, on PostgreSQL)."""
    return store._url if store._url is not None else store.path  # type: ignore[return-value]


def table_columns(store: Store, table: str) -> set[str]:
    if store.backend == "sqlite":
        return set(store._db.table(table).columns_dict)  # type: ignore[union-attr]
    rows = store._query("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                        "AND table_name = ?", [table])
    return {row[0] for row in rows}


@pytest.fixture
def loopterm_db(tmp_path: Path) -> Path:
    """A closed loopterm database (its WAL checkpointed into the main file)."""
    path = tmp_path / "loopterm.db"
    with Store.open(path) as s:
        s.create_run(make_run())
    return path


# -- round trips ---------------------------------------------------------------


def test_run_round_trip_is_exact(store: Store) -> None:
    run = make_run(
        goal=BIG, message="one\nline\u2028two", termination_reason="converged", tokens_in=2**40,
        cost_usd=0.1 + 0.2, elapsed_s=1e-300, parent_run=None, budget={"usd": 1 / 3, "nested": {"k": [1, 2.5, "ü"]}},
    )
    store.create_run(run)
    assert store.get_run(run.id) == run
    child = make_run("run-0002", parent_run=run.id, fork_iteration=3, created_at=1e10 + 0.000123)
    store.create_run(child)
    assert store.get_run("run-0002") == child


def test_iteration_round_trip_is_exact(store: Store) -> None:
    store.create_run(make_run())
    full = make_iteration(
        "run-0001", 1, raw_response=BIG, repairs=2,
        prompt=[{"role": "user", "content": BIG}],
        tool_call={"tool": "write_file", "args": {"path": "a.py", "text": "x = 1\n"}, "key": "k1"},
        tool_result={"ok": True, "output": "héllo\n", "error": None, "reused": False},
        gate_results=[{"name": "pytest", "ok": False, "stderr": "E   assert 1 == 2\n"}],
        invariant_status={"no_regression": True, "budget": False},
        remediations=["prune_context"], tokens_in=123, tokens_out=456, cost_usd=0.000123456789,
        latency_ms=987.654321, model="openai/gpt-4o-mini",
        state={"iteration": 1, "float": 0.1 + 0.2, "emoji": "🚀", "deep": {"a": [{"b": None}]}},
    )
    bare = make_iteration("run-0001", 2, decision=None)
    store.commit_iteration(full, {})
    store.commit_iteration(bare, {})
    assert store.get_iteration("run-0001", 1) == full
    assert store.get_iteration("run-0001", 2) == bare
    assert store.get_iteration("run-0001", 3) is None
    assert store.iterations("run-0001") == [full, bare]


def test_columns_match_the_records(store: Store) -> None:
    """A field added to a record without a column would be lost silently; catch it here."""
    models = {
        "runs": RunRecord, "iterations": IterationRecord, "events": EventRecord,
        "tool_calls": ToolCallRecord, "intents": Intent, "commands": CommandRecord,
    }
    # the state lives in `states` (deltas and keyframes); an event is stored as (kind, data) (runlog.to_stored)
    elsewhere = {"iterations": {"state"}, "events": {"event"}}
    derived = {"tool_calls": {"args_hash"}, "events": {"kind", "data"}}  # args_hash: indexed for prior_tool_calls
    for table, model in models.items():
        expected = set(model.model_fields) - elsewhere.get(table, set()) | derived.get(table, set())
        if store.backend == "postgresql" and table == "runs":
            expected |= {"rowid"}  # creation order, which SQLite's rowid gives (store/pg_schema.py)
        assert table_columns(store, table) == expected, table


def test_data_survives_reopen_and_meta_is_stamped(store_target: str | Path) -> None:
    path = store_target
    with Store.open(path) as s:
        s.create_run(make_run())
        s.commit_iteration(make_iteration("run-0001", 1), {"iterations": 1})
    with Store.open(path, create=False) as s:
        assert s.get_run("run-0001").iterations == 1
        assert s.get_iteration("run-0001", 1) == make_iteration("run-0001", 1)
        meta = dict(s._conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta == {"app": "loopterm", "schema_version": str(SCHEMA_VERSION)}


# -- iterations and runs ----------------------------------------------------


def test_duplicate_iteration_is_refused_and_the_first_kept(store: Store) -> None:
    store.create_run(make_run())
    first = make_iteration("run-0001", 1, raw_response="first")
    store.commit_iteration(first, {"iterations": 1, "tokens_in": 10})
    store.save_intent(make_intent("run-0001", 1))
    with pytest.raises(DuplicateIterationError):
        store.commit_iteration(make_iteration("run-0001", 1, raw_response="second"), {"iterations": 99, "tokens_in": 99})
    assert store.get_iteration("run-0001", 1) == first
    assert store.get_run("run-0001").iterations == 1
    assert store.get_run("run-0001").tokens_in == 10
    assert store.load_intent("run-0001", 1) is not None  # the failed commit changed nothing


def test_commit_iteration_drops_intent_and_updates_totals(store: Store) -> None:
    store.create_run(make_run())
    store.save_intent(make_intent("run-0001", 1))
    store.save_intent(make_intent("run-0001", 2))
    store.commit_iteration(
        make_iteration("run-0001", 1),
        {"iterations": 1, "tokens_in": 100, "tokens_out": 50, "cost_usd": 0.25, "updated_at": 5.5, "status": "running"},
    )
    assert store.load_intent("run-0001", 1) is None
    assert store.load_intent("run-0001", 2) == make_intent("run-0001", 2)
    run = store.get_run("run-0001")
    assert (run.iterations, run.tokens_in, run.tokens_out, run.cost_usd, run.updated_at) == (1, 100, 50, 0.25, 5.5)


def test_commit_iteration_is_all_or_nothing(store: Store) -> None:
    store.create_run(make_run())
    store.save_intent(make_intent("run-0001", 1))
    with pytest.raises(ValueError):
        store.commit_iteration(make_iteration("run-0001", 1), {"no_such_field": 1})
    with pytest.raises(pydantic.ValidationError):
        store.commit_iteration(make_iteration("run-0001", 1), {"iterations": "many"})
    assert store.get_iteration("run-0001", 1) is None
    assert store.load_intent("run-0001", 1) is not None
    with pytest.raises(store._conn.IntegrityError):  # no such run: foreign key
        store.commit_iteration(make_iteration("ghost", 1), {})
    assert store.iterations("ghost") == []


def test_last_iterations_oldest_first(store: Store) -> None:
    store.create_run(make_run())
    for n in range(1, 8):
        store.commit_iteration(make_iteration("run-0001", n), {"iterations": n})
    assert [it.n for it in store.last_iterations("run-0001", 3)] == [5, 6, 7]
    assert [it.n for it in store.last_iterations("run-0001", 50)] == list(range(1, 8))
    assert store.last_iterations("run-0001", 0) == []
    assert store.last_iterations("other", 3) == []


def test_update_run_validates_before_writing(store: Store) -> None:
    run = make_run()
    store.create_run(run)
    store.update_run(run.id, status="converged", message="all gates green", termination_reason="converged")
    assert store.get_run(run.id).status == "converged"
    for bad in ({"bogus": 1}, {"id": "other"}):
        with pytest.raises(ValueError):
            store.update_run(run.id, **bad)
    with pytest.raises(pydantic.ValidationError):
        store.update_run(run.id, max_iterations="lots")
    with pytest.raises(KeyError):
        store.update_run("ghost", status="x")
    with pytest.raises(KeyError):
        store.get_run("ghost")
    assert store.get_run(run.id).status == "converged"


def test_list_runs_in_creation_order(store: Store) -> None:
    for i, run_id in enumerate(["zzz", "aaa", "mmm"]):
        store.create_run(make_run(run_id, created_at=100.0 - i))
    assert [r.id for r in store.list_runs()] == ["zzz", "aaa", "mmm"]


def test_resolve_run(store: Store) -> None:
    for run_id in ["a1b2c3d4e5f6", "a1c3d4e5f6a7", "b9", "b9x"]:
        store.create_run(make_run(run_id))
    assert store.resolve_run("a1b").id == "a1b2c3d4e5f6"
    assert store.resolve_run("a1c3d4e5f6a7").id == "a1c3d4e5f6a7"
    assert store.resolve_run("b9").id == "b9"  # an exact id wins over being a prefix
    with pytest.raises(ConfigError) as ambiguous:
        store.resolve_run("a1")
    message = str(ambiguous.value)
    assert message.startswith("run id 'a1' is ambiguous: matches a1b2c3d4..")
    assert "a1c3d4e5.." in message and message.endswith("give more characters")
    with pytest.raises(ConfigError, match=r"^no run matches 'zz'; `loopterm runs` lists them$"):
        store.resolve_run("zz")
    with pytest.raises(ConfigError):
        store.resolve_run("%")  # not a LIKE pattern
    with pytest.raises(ConfigError):
        store.resolve_run("")


# -- refusals ---------------------------------------------------------------


def assert_refused(path: Path, match: str, *, create: bool = True) -> None:
    before_hash, before_files = sha(path), siblings(path)
    with pytest.raises(ConfigError, match=match) as info:
        Store.open(path, create=create)
    assert "\n" not in str(info.value)
    assert sha(path) == before_hash
    assert siblings(path) == before_files  # no -wal, -shm or -journal left behind


def test_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just some notes\n" * 100)
    assert_refused(path, r"notes\.txt is not a SQLite database .*; pass --db with another path$")
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"SQL")
    assert_refused(tiny, "is not a SQLite database")


def test_refuses_a_sqlite_file_of_another_app(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    message = r"other\.db is a SQLite database but not a loopterm database; pass --db with another path$"
    assert_refused(path, message)
    assert_refused(path, message, create=False)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('app', 'something-else')")
    conn.commit()
    conn.close()
    assert_refused(path, message)


def test_refuses_a_newer_schema(loopterm_db: Path) -> None:
    conn = sqlite3.connect(loopterm_db)
    conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()  # last connection: checkpoints the WAL into the main file
    assert_refused(loopterm_db, rf"was written by a newer loopterm \(schema 7 > {SCHEMA_VERSION}\); upgrade loopterm$")


def test_refuses_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    assert_refused(path, r"broken\.db")


def test_create_false_on_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "loopterm.db"
    with pytest.raises(ConfigError, match=r"^no loopterm database at .*loopterm\.db; run a loop first or pass --db$"):
        Store.open(path, create=False)
    assert not path.parent.exists()


def test_empty_file_is_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(ConfigError, match="no loopterm database"):
        Store.open(path, create=False)
    assert path.read_bytes() == b""
    with Store.open(path) as s:
        s.create_run(make_run())
    with Store.open(path, create=False) as s:
        assert [r.id for r in s.list_runs()] == ["run-0001"]


def test_refuses_bad_locations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        Store.open(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="pass --db with another path$"):
        Store.open(blocker / "sub" / "loopterm.db")
    assert blocker.read_text() == "x"


def test_permission_errors_become_one_line(tmp_path: Path, loopterm_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores permissions, so simulate the OS refusing (the real thing is tested below for non-root)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match=r"^cannot create .*: Permission denied; check its permissions or pass --db with another path$"):
        Store.open(tmp_path / "sub" / "loopterm.db")
    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ConfigError, match=r"^cannot read .*loopterm\.db: Permission denied; check its permissions"):
        Store.open(loopterm_db)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_refuses_unreadable_locations(tmp_path: Path, loopterm_db: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        with pytest.raises(ConfigError, match="permission"):
            Store.open(locked / "sub" / "loopterm.db")
    finally:
        locked.chmod(0o700)
    loopterm_db.chmod(0o000)
    try:
        with pytest.raises(ConfigError, match="permission"):
            Store.open(loopterm_db)
    finally:
        loopterm_db.chmod(0o600)


# -- events, commands, intents, tool calls --------------------------------------


def test_events_are_append_only_and_ordered(store_target: str | Path) -> None:
    ticks = iter(range(1000))
    with Store.open(store_target, clock=lambda: float(next(ticks))) as store:
        store.create_run(make_run("r1"))
        store.create_run(make_run("r2"))
        written = [store.append_event("r1" if i % 3 else "r2", runlog.StatusChanged(status="running", message=f"{i} ü\n"), iteration=i) for i in range(12)]
        ids = [e.id for e in written]
        assert ids == sorted(ids) and len(set(ids)) == 12
        r1 = store.events("r1")
        assert r1 == [e for e in written if e.run_id == "r1"]
        assert [e.ts for e in r1] == sorted(e.ts for e in r1)
        assert store.events("r1", after_id=r1[2].id) == r1[3:]
        assert store.events("r1", after_id=r1[-1].id) == []
        with pytest.raises(store._conn.DatabaseError, match="append-only"):
            store._conn.execute("UPDATE events SET kind = 'x'")
        with pytest.raises(store._conn.DatabaseError, match="append-only"):
            store._conn.execute("DELETE FROM events")
        assert store.events("r1") == r1


def test_commands_pending_then_consumed(store: Store) -> None:
    store.create_run(make_run("r1"))
    store.create_run(make_run("r2"))
    pause = store.add_command("r1", "pause", {})
    other = store.add_command("r2", "stop", {})
    relax = store.add_command("r1", "relax", {"invariant": "no_regression", "reason": "flaky"})
    assert store.pending_commands("r1") == [pause, relax]
    store.consume_command(pause.id)
    assert store.pending_commands("r1") == [relax]
    assert store.pending_commands("r2") == [other]
    consumed = store._conn.execute("SELECT consumed_at FROM commands WHERE id = ?", [pause.id]).fetchone()[0]
    store.consume_command(pause.id)
    assert store._conn.execute("SELECT consumed_at FROM commands WHERE id = ?", [pause.id]).fetchone()[0] == consumed
    with pytest.raises(KeyError):
        store.consume_command(10_000)


def test_intents_round_trip_and_replace(store: Store) -> None:
    store.create_run(make_run())
    intent = make_intent("run-0001", 3)
    store.save_intent(intent)
    assert store.load_intent("run-0001", 3) == intent
    replaced = intent.model_copy(update={"raw_response": "second"})
    store.save_intent(replaced)
    assert store.load_intent("run-0001", 3) == replaced
    assert store.load_intent("run-0001", 4) is None


def test_tool_call_journal(store: Store) -> None:
    store.create_run(make_run())
    started = ToolCallRecord(key="k1", run_id="run-0001", iteration=1, tool="write", args={"p": "ü"}, status="started", started_at=1.0)
    assert store.tool_call("k1") is None
    store.tool_call_started(started)
    assert store.tool_call("k1") == started
    store.tool_call_started(started.model_copy(update={"started_at": 2.0}))  # retry after a crash
    store.tool_call_finished("k1", {"ok": True, "output": "done"}, 3.0)
    done = store.tool_call("k1")
    assert done is not None
    assert (done.status, done.result, done.started_at, done.finished_at) == ("done", {"ok": True, "output": "done"}, 2.0, 3.0)
    with pytest.raises(ValueError):
        store.tool_call_started(started)
    assert store.tool_call("k1") == done
    with pytest.raises(KeyError):
        store.tool_call_finished("nope", {}, 1.0)


# -- connection settings --------------------------------------------------------


def test_wal_busy_timeout_and_foreign_keys(sqlite_store: Store) -> None:
    store = sqlite_store
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    other = sqlite3.connect(store.path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persisted in the file
    other.close()


def test_every_method_commits_before_returning(store: Store) -> None:
    conn = store._conn
    calls = [
        lambda: store.create_run(make_run()),
        lambda: store.get_run("run-0001"),
        lambda: store.update_run("run-0001", status="paused"),
        lambda: store.save_intent(make_intent("run-0001", 1)),
        lambda: store.load_intent("run-0001", 1),
        lambda: store.commit_iteration(make_iteration("run-0001", 1), {"iterations": 1}),
        lambda: store.get_iteration("run-0001", 1),
        lambda: store.last_iterations("run-0001", 2),
        lambda: store.append_event("run-0001", runlog.ShadowMode(why="note")),
        lambda: store.add_command("run-0001", "stop", {}),
        lambda: store.pending_commands("run-0001"),
        lambda: store.consume_command(1),
        lambda: store.list_runs(),
        lambda: store.resolve_run("run"),
    ]
    for call in calls:
        call()
        assert not conn.in_transaction


def test_queries_use_indexes(sqlite_store: Store) -> None:
    store = sqlite_store
    store.create_run(make_run())
    store.create_run(make_run("run-0002", parent_run="run-0001", fork_iteration=2))
    for n in range(1, 4):
        store.commit_iteration(make_iteration("run-0001", n), {})
        store.commit_iteration(make_iteration("run-0002", n + 2), {})
    seen: list[tuple[str, Any]] = []
    conn = store._db.conn
    conn.set_trace_callback(lambda sql: seen.append((sql, None)))  # SQL with its parameters bound
    try:
        store.events("run-0001", 0)
        store.pending_commands("run-0001")
        store.last_iterations("run-0002", 3)
        store.state_at("run-0002", 2)
        store.get_iteration("run-0002", 4)
        store.prior_tool_calls(["run-0001", "run-0002"], "write", {"p": 1})
    finally:
        conn.set_trace_callback(None)
    reads = [(sql, params) for sql, params in seen if sql.lstrip().lower().startswith(("select", "with")) and "sqlite_master" not in sql]
    assert len(reads) >= 8
    for sql, params in reads:
        plan = " ".join(str(row[-1]) for row in store._db.execute("EXPLAIN QUERY PLAN " + sql, params or []))
        assert "INDEX" in plan, (sql, plan)
        scans = [step for step in plan.split("SCAN ")[1:] if not step.startswith(("chain", "CONSTANT"))]
        assert not scans, (sql, plan)  # no full table scan (the recursive CTE scans only itself)


def test_store_imports_no_ui_or_model_library() -> None:
    code = "import sys, loopterm.store; print([m for m in sys.modules if m.startswith(('textual', 'litellm'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- concurrency ----------------------------------------------------------------


def run_threads(*targets: Any) -> list[BaseException]:
    errors: list[BaseException] = []

    def guard(fn: Any) -> Any:
        def wrapped() -> None:
            try:
                fn()
            except BaseException as exc:  # reported to the test thread
                errors.append(exc)
        return wrapped

    threads = [threading.Thread(target=guard(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_a_reader_and_a_writer_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    writer, reader = Store.open(path), Store.open(path)
    writer.create_run(make_run())
    total = 200
    done = threading.Event()
    seen: list[int] = []

    def write() -> None:
        try:
            for n in range(1, total + 1):
                writer.commit_iteration(make_iteration("run-0001", n), {"iterations": n})
                time.sleep(0.001)  # a real loop waits on the model between commits
                if n % 20 == 0:
                    writer.pending_commands("run-0001")  # the engine polls its control channel
        finally:
            done.set()

    def read() -> None:
        while not done.is_set():
            last = reader.last_iterations("run-0001", 1)
            count = reader.get_run("run-0001").iterations
            seen.append(count)
            if last:
                assert last[0].n <= reader.get_run("run-0001").iterations
            if len(seen) % 25 == 0:  # a person's keystrokes: now and then, not in a tight loop
                reader.add_command("run-0001", "step", {"seen": count})

    errors = run_threads(write, read)
    assert errors == []
    assert seen == sorted(seen) and len(set(seen)) > 10  # progress was visible while it happened
    assert [it.n for it in reader.iterations("run-0001")] == list(range(1, total + 1))
    assert reader.get_run("run-0001").iterations == total
    assert len(writer.pending_commands("run-0001")) == len(seen) // 25
    writer.close()
    reader.close()


def test_two_writers_and_concurrent_creation(tmp_path: Path) -> None:
    path = tmp_path / "new" / "race.db"
    stores: list[Store] = []
    lock = threading.Lock()

    def opener() -> None:
        s = Store.open(path)
        with lock:
            stores.append(s)

    assert run_threads(*[opener] * 4) == []
    stores[0].create_run(make_run())

    def append(s: Store) -> Any:
        return lambda: [s.append_event("run-0001", runlog.ModelRetried(attempt=i)) for i in range(200)]

    assert run_threads(*[append(s) for s in stores[:2]]) == []
    events = stores[3].events("run-0001")
    assert len(events) == 400 and len({e.id for e in events}) == 400
    for s in stores:
        s.close()


def test_one_store_shared_by_threads(store: Store) -> None:
    store.create_run(make_run())

    def writes(first: int) -> Any:
        return lambda: [store.commit_iteration(make_iteration("run-0001", n), {}) for n in range(first, first + 50)]

    assert run_threads(writes(1), writes(51), lambda: [store.iterations("run-0001") for _ in range(50)]) == []
    assert [it.n for it in store.iterations("run-0001")] == list(range(1, 101))


# -- queued writes (durable=False) ------------------------------------------------


def rows_in(path: Path | str | Store, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """What another connection (another process, after a crash) would read from the file or database."""
    if isinstance(path, Store):
        path = target_of(path)
    if isinstance(path, str):
        with Store.open(path, create=False) as other:
            return other._query(sql, params)
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_a_queued_intent_is_dropped_by_its_iterations_commit_and_never_written(store: Store) -> None:
    store.create_run(make_run())
    store.save_intent(make_intent("run-0001", 1), durable=False)
    assert store.load_intent("run-0001", 1) == make_intent("run-0001", 1)
    assert rows_in(store, "SELECT n FROM intents", []) == []
    store.commit_iteration(make_iteration("run-0001", 1), {"iterations": 1})
    assert store.load_intent("run-0001", 1) is None
    store.flush()
    assert rows_in(store, "SELECT n FROM intents", []) == []


def test_queued_writes_join_the_next_write_and_close(store_target: str | Path) -> None:
    path = store_target
    store = Store.open(path)
    store.create_run(make_run())
    call = ToolCallRecord(key="k1", run_id="run-0001", iteration=1, tool="write", args={"p": 1}, status="started", started_at=1.0)
    store.save_intent(make_intent("run-0001", 1), durable=False)
    store.tool_call_started(call, power_safe=False)  # the intent goes to disk with the call's start
    assert rows_in(path, "SELECT n FROM intents", []) == [(1,)]
    store.tool_call_finished("k1", {"ok": True}, 2.0, durable=False)
    assert rows_in(path, "SELECT status FROM tool_calls", []) == [("started",)]
    seen = store.tool_call("k1")  # this Store answers with what it queued
    assert seen is not None and (seen.status, seen.result) == ("done", {"ok": True})
    with pytest.raises(ValueError, match="already finished"):
        store.tool_call_started(call)
    store.append_event("run-0001", runlog.ShadowMode(why="note"))
    assert [(status, json.loads(result)) for status, result in rows_in(path, "SELECT status, result FROM tool_calls", [])] \
        == [("done", {"ok": True})]
    store.save_intent(make_intent("run-0001", 2), durable=False)
    store.close()
    assert rows_in(path, "SELECT n FROM intents ORDER BY n", []) == [(1,), (2,)]


def test_a_failed_write_keeps_what_was_queued(store: Store) -> None:
    store.create_run(make_run())
    store.commit_iteration(make_iteration("run-0001", 1), {"iterations": 1})
    store.save_intent(make_intent("run-0001", 2), durable=False)
    with pytest.raises(DuplicateIterationError):
        store.commit_iteration(make_iteration("run-0001", 1), {"iterations": 1})
    store.flush()
    assert rows_in(store, "SELECT n FROM intents", []) == [(2,)]


def test_a_queued_finish_needs_a_started_call(store: Store) -> None:
    with pytest.raises(KeyError):
        store.tool_call_finished("nope", {}, 1.0, durable=False)


def test_a_handed_over_state_is_kept_not_copied_and_stored_exactly(store: Store) -> None:
    store.create_run(make_run())
    items = [f"item {i}" for i in range(200)]
    first = {"iteration": 1, "items": items}
    store.commit_iteration(make_iteration("run-0001", 1, state=first), {}, handover=True)
    second = {"iteration": 2, "items": [*items, "new"]}
    record = make_iteration("run-0001", 2, state=second)
    store.commit_iteration(record, {}, handover=True)
    assert store._heads["run-0001"].state is record.state
    third = {"iteration": 3, "items": [*items[:5], "edited", *items[6:], "new"]}  # an edit in the middle
    store.commit_iteration(make_iteration("run-0001", 3, state=third), {}, handover=True)
    fresh = Store.open(target_of(store), create=False)
    try:
        assert [fresh.state_at("run-0001", n) for n in (1, 2, 3)] == [first, second, third]
    finally:
        fresh.close()


def test_a_copied_state_is_safe_from_its_callers_later_edits(store: Store) -> None:
    store.create_run(make_run())
    items = ["a", "b"]
    store.commit_iteration(make_iteration("run-0001", 1, state={"items": items}), {})
    items.append("c")  # in place, after the commit: the store kept its own list
    store.commit_iteration(make_iteration("run-0001", 2, state={"items": items}), {})
    assert store.state_at("run-0001", 1) == {"items": ["a", "b"]}
    assert store.state_at("run-0001", 2) == {"items": ["a", "b", "c"]}


def test_iteration_tool_calls_can_read_only_some_tools(store: Store) -> None:
    store.create_run(make_run())
    for n, name in enumerate(["read", "write", "read", "write"], 1):
        store.commit_iteration(make_iteration("run-0001", n, tool_call={"tool": name, "args": {"n": n}, "key": f"k{n}"}), {})
    assert [n for _, n, _ in store.iteration_tool_calls("run-0001")] == [1, 2, 3, 4]
    assert [n for _, n, _ in store.iteration_tool_calls("run-0001", tools={"write"})] == [2, 4]
    assert store.iteration_tool_calls("run-0001", tools=set()) == []


def test_an_engines_append_is_stored_as_an_append(store: Store) -> None:
    """A GrownList whose base is the state last handed over is stored as its new items only."""
    from loopterm.core.persistence import GrownList

    store.create_run(make_run())
    first = make_iteration("run-0001", 1, state={"items": [f"item {i}" for i in range(100)]})
    store.commit_iteration(first, {}, handover=True)
    grown = GrownList(first.state["items"], ["new"])
    store.commit_iteration(make_iteration("run-0001", 2, state={"items": grown}), {}, handover=True)
    body = rows_in(store, "SELECT body FROM states WHERE n = 2", [])[0][0]
    from loopterm.store.delta import decode_delta

    assert decode_delta(body) == [["a", ["items"], ["new"]]]
    assert store.state_at("run-0001", 2) == {"items": [*first.state["items"], "new"]}
