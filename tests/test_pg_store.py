"""What only the PostgreSQL store has: NUL-safe text, notifications, per-run advisory locks, its refusals, and
two processes creating one store at once. (Everything both backends share runs on both in test_store*.py,
test_ledger.py, test_memory.py, test_prune.py and test_transfer.py, through the `store_target` fixture.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from loopterm.core import runlog
from loopterm.core.errors import ConfigError
from loopterm.core.records import ToolCallRecord
from loopterm.store import SCHEMA_VERSION, DuplicateIterationError, Store
from loopterm.store.pg import escape, redact, translate, unescape
from tests.test_store import make_intent, make_iteration, make_run

NULS = "before\x00after \\u0000 literal, \u0000 again, \x01 escape char, \x01\x00 both, end\x00"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(pg_url: str) -> Any:
    s = Store.open(pg_url)
    yield s
    s.close()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, host = parts.netloc.split("@", 1)
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, parts.fragment))


# -- exact text --------------------------------------------------------------------------------


def test_nul_characters_round_trip_in_replies_events_and_tool_results(store: Store, pg_url: str) -> None:
    store.create_run(make_run(goal=NULS, message=NULS))
    record = make_iteration("run-0001", 1, raw_response=NULS, tool_result={"ok": True, "output": NULS},
                            prompt=[{"role": "user", "content": NULS * 30}], state={"text": NULS, NULS: [NULS]})
    store.commit_iteration(record, {"iterations": 1})
    intent = make_intent("run-0001", 2).model_copy(update={"raw_response": NULS})
    store.save_intent(intent)
    event = store.append_event("run-0001", runlog.StatusChanged(status="running", message=NULS), 1)
    call = ToolCallRecord(key="k\x00", run_id="run-0001", iteration=1, tool="write", args={"text": NULS},
                          status="started", started_at=1.0)
    store.tool_call_started(call)
    store.tool_call_finished("k\x00", {"ok": True, "output": NULS}, 2.0)
    store.remember("fixit", "nul key\x00", NULS)
    with Store.open(pg_url, create=False) as fresh:  # read back through another connection
        assert fresh.get_run("run-0001").goal == NULS and fresh.get_run("run-0001").message == NULS
        assert fresh.get_iteration("run-0001", 1) == record
        assert fresh.load_intent("run-0001", 2) == intent
        assert fresh.events("run-0001") == [event]
        done = fresh.tool_call("k\x00")
        assert done is not None and done.args == {"text": NULS} and done.result == {"ok": True, "output": NULS}
        assert [(m.key, m.value) for m in fresh.memories("fixit")] == [("nul key\x00", NULS)]
    assert isinstance(record.raw_response, str)


@pytest.mark.parametrize("text", ["", "plain", "\x00", "\x01", "\x01\x00", "\x00\x01", "\x010", "\x01\x01", "a\x00\x00b\x01"])
def test_the_text_escape_is_reversible(text: str) -> None:
    assert "\x00" not in escape(text)
    assert unescape(escape(text)) == text


def test_sql_is_translated_only_where_it_cannot_be_portable() -> None:
    assert translate("SELECT a FROM t WHERE x = ? AND y = '?' AND z = ?") == \
        ("SELECT a FROM t WHERE x = $1 AND y = '?' AND z = $2", False)
    assert translate("SELECT coalesce(?1, a) - ?2 + ?1") == ("SELECT coalesce($1, a) - $2 + $1", False)
    assert translate("BEGIN IMMEDIATE") == ("BEGIN", False)
    assert translate("PRAGMA foreign_keys = ON") == (None, False)
    assert translate("INSERT INTO [events] ([run_id]) VALUES (?)") == ('INSERT INTO "events" ("run_id") VALUES ($1) RETURNING id', True)
    assert translate("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")[0] == \
        'INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET "value" = excluded."value"'
    assert translate("INSERT OR IGNORE INTO blobs (hash, body) VALUES (?, ?)")[0] == \
        "INSERT INTO blobs (hash, body) VALUES ($1, $2) ON CONFLICT DO NOTHING"


# -- notifications -------------------------------------------------------------------------------


def test_a_commit_in_another_store_calls_back_within_a_second(store: Store, pg_url: str) -> None:
    seen: list[tuple[str, str, float]] = []
    arrived = threading.Event()

    def callback(kind: str, run_id: str) -> None:
        seen.append((kind, run_id, time.monotonic()))
        arrived.set()

    stop = store.subscribe(callback)
    with Store.open(pg_url) as other:
        other.create_run(make_run("r1"))
        assert arrived.wait(1.0)
        for kind, action in [
            ("iteration", lambda: other.commit_iteration(make_iteration("r1", 1), {"iterations": 1})),
            ("event", lambda: other.append_event("r1", runlog.ShadowMode(why="note"))),
            ("command", lambda: other.add_command("r1", "pause", {})),
        ]:
            arrived.clear()
            start = time.monotonic()
            action()
            deadline = start + 1.0
            while time.monotonic() < deadline and not any(k == kind and t >= start for k, _, t in seen):
                arrived.wait(0.05)
                arrived.clear()
            assert any(k == kind and r == "r1" and t - start < 1.0 for k, r, t in seen), (kind, seen)
        stop()
        count = len(seen)
        other.add_command("r1", "stop", {})
        time.sleep(0.5)
    assert len(seen) == count  # unsubscribed: no more calls


def test_a_failed_transaction_notifies_nothing(store: Store, pg_url: str) -> None:
    store.create_run(make_run("r1"))
    store.commit_iteration(make_iteration("r1", 1), {"iterations": 1})
    seen: list[tuple[str, str]] = []
    stop = store.subscribe(lambda kind, run_id: seen.append((kind, run_id)))
    try:
        with Store.open(pg_url) as other, pytest.raises(DuplicateIterationError):
            other.commit_iteration(make_iteration("r1", 1), {"iterations": 1}, events=[runlog.ShadowMode(why="x")])
        time.sleep(0.6)
        assert seen == []
    finally:
        stop()


def test_sqlite_subscribe_never_calls_back(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        seen: list[Any] = []
        stop = store.subscribe(lambda kind, run_id: seen.append(kind))
        store.create_run(make_run("r1"))
        store.commit_iteration(make_iteration("r1", 1), {})
        stop()
        assert seen == [] and store.drive("r1") is True and store.backend == "sqlite"
        store.undrive("r1")
        assert store.location == str(tmp_path / "s.db")


# -- per-run advisory locks ----------------------------------------------------------------------


def test_only_one_store_drives_a_run(store: Store, pg_url: str) -> None:
    with Store.open(pg_url) as other:
        assert store.drive("r1") is True
        assert store.drive("r1") is True  # already ours: a second claim (a segment's engine), counted
        assert other.drive("r1") is False
        assert other.drive("r2") is True  # another run: free
        store.undrive("r1")
        assert other.drive("r1") is False  # the first claim still holds it
        store.undrive("r1")
        assert other.drive("r1") is True
        assert store.drive("r1") is False
    assert store.drive("r1") is True  # closing a store releases what it drove


DRIVER = """
import sys, time
from loopterm.store import Store
store = Store.open(sys.argv[1])
print(store.drive("r1"), flush=True)
time.sleep(60)
"""


def test_a_dead_process_drives_nothing(store: Store, pg_url: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", DRIVER, pg_url], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "True"
        assert store.drive("r1") is False
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while not store.drive("r1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.drive("r1") is True


# -- opening: refusals in one line, never a password ------------------------------------------------


def test_backend_and_location_hide_the_password(pg_url: str) -> None:
    secret = with_password(pg_url, "s3cr%40t")
    with Store.open(secret) as store:  # the test server trusts local connections: the password is not checked
        assert store.backend == "postgresql"
        assert "s3cr" not in store.location and ":***@" in store.location
        assert store.location == redact(secret)
    assert "hunter2" not in redact(pg_url + "?sslmode=disable&password=hunter2")


@pytest.mark.parametrize("change", ["port", "database", "host"])
def test_a_wrong_address_is_one_line_without_the_password(pg_url: str, change: str) -> None:
    parts = urlsplit(with_password(pg_url, "hunter2"))
    if change == "port":
        parts = parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + ":1")
    elif change == "database":
        parts = parts._replace(path="/no_such_database")
    else:
        parts = parts._replace(netloc=parts.netloc.replace("127.0.0.1", "no-such-host.invalid"))
    with pytest.raises(ConfigError) as info:
        Store.open(urlunsplit(parts))
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message
    assert message.startswith("cannot connect to the PostgreSQL database postgresql://loopterm:***@")
    assert "check the URL" in message


def test_an_empty_database_without_create_says_how_to_make_a_store(pg_url: str) -> None:
    with pytest.raises(ConfigError, match=r"has no loopterm store; create one with `loopterm db init --db URL`$"):
        Store.open(pg_url, create=False)
    with Store.open(pg_url, create=True) as store:  # nothing was created by the refusal; now it is
        assert store.list_runs() == []
    with Store.open(pg_url, create=False) as store:
        assert dict(store._query("SELECT key, value FROM meta")) == {"app": "loopterm", "schema_version": str(SCHEMA_VERSION)}


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        store.create_run(make_run("r1"))
        store._conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError, match=rf"was written by a newer loopterm \(schema 7 > {SCHEMA_VERSION}\); upgrade loopterm$"):
        Store.open(pg_url)


def test_a_database_with_someone_elses_runs_table_is_refused(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE runs (id int)")
        conn.execute("CREATE TABLE unrelated (x int)")
    with pytest.raises(ConfigError, match=r"has tables named like loopterm's \(runs\) but no loopterm store"):
        Store.open(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE runs")
    with Store.open(pg_url) as store:  # other tables of other names are fine (DBOS keeps its own)
        assert store.list_runs() == []


OPENER = """
import sys
from loopterm.store import Store
with Store.open(sys.argv[1]) as store:
    store.create_run(store_run := __import__("tests.test_store", fromlist=["make_run"]).make_run(sys.argv[2]))
print("ok")
"""


def test_processes_creating_one_store_at_once_all_succeed(pg_url: str) -> None:
    children = [subprocess.Popen([sys.executable, "-c", OPENER, pg_url, f"r{i}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(4)]
    outcomes = [child.communicate(timeout=120) for child in children]
    assert [out.strip() for out, _ in outcomes] == ["ok"] * 4, [err[-500:] for _, err in outcomes]
    with Store.open(pg_url, create=False) as store:
        assert sorted(run.id for run in store.list_runs()) == ["r0", "r1", "r2", "r3"]
        assert store._query("SELECT count(*) FROM meta")[0][0] == 2


def test_a_sqlite_store_imports_no_postgresql_driver(tmp_path: Path) -> None:
    code = ("import sys; from loopterm.store import Store; s = Store.open(sys.argv[1]); s.create_run(__import__("
            "'tests.test_store', fromlist=['make_run']).make_run()); s.close(); "
            "print([m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_binary', 'dbos')])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.db")], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# -- between the backends -----------------------------------------------------------------------


def test_a_run_goes_from_postgresql_to_sqlite_and_back_unchanged(store: Store, tmp_path: Path,
                                                                 postgres_server: Any) -> None:
    store.create_run(make_run("root", goal=NULS))
    for n in range(1, 40):
        store.commit_iteration(make_iteration("root", n, raw_response=NULS, state={"log": list(range(n * 3))}),
                               {"iterations": n})
    store.create_run(make_run("fork", parent_run="root", fork_iteration=20, origin="fork", iterations=20))
    store.commit_iteration(make_iteration("fork", 21, state={"log": []}), {"iterations": 21})
    store.append_event("fork", runlog.StatusChanged(status="running", message=NULS), 21)
    exported = [json.dumps(line) for line in store.export_run("fork")]
    with Store.open(tmp_path / "copy.db") as sqlite:
        assert sqlite.import_lines(exported) == ["root", "fork"]
        again = [json.dumps(line) for line in sqlite.export_run("fork")]
    assert again == exported
    with Store.open(postgres_server.fresh_database()) as back:
        back.import_lines(again)
        assert [json.dumps(line) for line in back.export_run("fork")] == exported
        assert back.iterations("fork") == store.iterations("fork")


def test_a_duplicate_iteration_from_another_store_is_refused(store: Store, pg_url: str) -> None:
    store.create_run(make_run("r1"))
    store.commit_iteration(make_iteration("r1", 1, raw_response="first"), {"iterations": 1})
    with Store.open(pg_url) as other:
        with pytest.raises(DuplicateIterationError):
            other.commit_iteration(make_iteration("r1", 1, raw_response="second"), {"iterations": 1})
        other.commit_iteration(make_iteration("r1", 2), {"iterations": 2})  # the failed one left nothing behind
    assert store.get_iteration("r1", 1).raw_response == "first"  # type: ignore[union-attr]
    assert [it.n for it in store.iterations("r1")] == [1, 2]


def test_a_write_that_need_not_survive_power_loss_is_not_waited_for(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:  # the test server says off; this database says on
        conn.execute(f'ALTER DATABASE "{urlsplit(pg_url).path[1:]}" SET synchronous_commit = on')
    store = Store.open(pg_url)
    store.create_run(make_run("r1"))
    call = ToolCallRecord(key="k", run_id="r1", iteration=1, tool="read", args={}, status="started", started_at=1.0)
    seen: list[str] = []
    original = store._conn.execute

    def spy(sql: str, params: Any = ()) -> Any:
        result = original(sql, params)
        if "synchronous" in sql:
            seen.append(original("SHOW synchronous_commit").fetchone()[0])
        return result

    store._conn.execute = spy  # type: ignore[method-assign]
    try:
        store.tool_call_started(call, power_safe=False)
        assert seen == ["off", "on"]  # off for that write only, then the database's own setting
        seen.clear()
        store.tool_call_finished("k", {"ok": True}, 2.0)
        assert seen == []  # a power-safe write changes nothing
        assert store.tool_call("k").status == "done"  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_dropped_connection_is_made_again_between_transactions(store: Store, pg_url: str) -> None:
    import psycopg

    store.create_run(make_run("r1"))
    store.commit_iteration(make_iteration("r1", 1), {"iterations": 1})
    pid = store._query("SELECT pg_backend_pid()")[0][0]
    with psycopg.connect(pg_url, autocommit=True) as admin:  # what a server restart does to a client
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.2)
    with pytest.raises(psycopg.OperationalError):
        store._query("SELECT 1")  # the statement the drop interrupted fails (the caller may retry) ...
    store.commit_iteration(make_iteration("r1", 2), {"iterations": 2})  # ... and the next one reconnects
    assert [it.n for it in store.iterations("r1")] == [1, 2] and store._conn.reconnects == 1
    assert store._query("SELECT pg_backend_pid()")[0][0] != pid


def test_a_transaction_is_never_split_across_connections(store: Store, pg_url: str) -> None:
    import psycopg

    store.create_run(make_run("r1"))
    pid = store._query("SELECT pg_backend_pid()")[0][0]
    with pytest.raises(psycopg.OperationalError):
        with store._write():
            store._conn.execute("UPDATE runs SET status = 'paused' WHERE id = 'r1'")
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            time.sleep(0.2)
            store._conn.execute("UPDATE runs SET message = 'half' WHERE id = 'r1'")  # not on a new connection
    run = store.get_run("r1")  # this read reconnects
    assert (run.status, run.message) == ("running", None)  # neither half was committed


def test_a_user_who_may_not_create_tables_is_told_in_one_line(pg_url: str) -> None:
    import uuid

    import psycopg

    role = "reader_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
    parts = urlsplit(pg_url)
    url = urlunsplit(parts._replace(netloc=parts.netloc.replace("loopterm@", f"{role}:pw@")))
    with pytest.raises(ConfigError) as info:
        Store.open(url)
    message = str(info.value)
    assert message.startswith(f"cannot create the loopterm store in postgresql://{role}:***@")
    assert "permission denied for schema public" in message and "\n" not in message and ":pw@" not in message


# -- copying a whole store ----------------------------------------------------------------------


def populate(store: Store) -> None:
    """Everything a store holds: a run and its fork, events, tool calls, an intent, commands, memory, the ledger."""
    store.create_run(make_run("root", goal=NULS))
    for n in range(1, 45):
        store.commit_iteration(make_iteration("root", n, state={"log": [f"line {i}" for i in range(n * 2)]},
                                              cost_usd=0.01, tokens_in=10),
                               {"iterations": n, "cost_usd": 0.01 * n, "tokens_in": 10 * n})
    store.create_run(make_run("fork", parent_run="root", fork_iteration=30, origin="fork", iterations=30))
    store.commit_iteration(make_iteration("fork", 31, state={"log": []}), {"iterations": 31})
    store.append_event("fork", runlog.StatusChanged(status="running", message=NULS), 31)
    store.tool_call_started(ToolCallRecord(key="k", run_id="fork", iteration=31, tool="send", args={"to": "x"},
                                           status="started", started_at=1.0))
    store.tool_call_finished("k", {"ok": True}, 2.0)
    store.save_intent(make_intent("fork", 32))
    store.consume_command(store.add_command("root", "pause", {}).id)
    store.add_command("fork", "stop", {"why": NULS})
    store.remember("fixit", "tokenizer", "splits on tabs; naïve café", embedding=[1.0, 0.0])
    store.remember("fixit", "doc", "the release checklist", kind="document")
    store.set_daily_budget(4.5)


def same_contents(one: Store, two: Store) -> None:
    assert one.list_runs() == two.list_runs() and one.tree() == two.tree()
    for run in one.list_runs():
        assert one.iterations(run.id) == two.iterations(run.id)
        assert one.events(run.id) == two.events(run.id)
        assert one.pending_commands(run.id) == two.pending_commands(run.id)
    assert one.load_intent("fork", 32) == two.load_intent("fork", 32) and one.tool_call("k") == two.tool_call("k")
    assert one.memories("fixit") == two.memories("fixit")
    assert keys_of(two.recall("fixit", "cafe tabs")) == ["tokenizer"]
    assert one.spend_by("day") == two.spend_by("day") and two.stored_daily_budget() == 4.5


def keys_of(items: list[Any]) -> list[str]:
    return [item.key for item in items]


def test_a_whole_sqlite_store_is_copied_into_postgresql_and_back(tmp_path: Path, pg_url: str) -> None:
    with Store.open(tmp_path / "team.db") as sqlite, Store.open(pg_url) as pg:
        populate(sqlite)
        result = sqlite.copy_to(pg)
        assert result.runs == 2 and result.rows["iterations"] == 45 and result.rows["memory"] == 2
        same_contents(sqlite, pg)
        later = pg.append_event("root", runlog.ShadowMode(why="after the copy"))  # ids go on after the copied ones
        assert later.id > max(e.id for run in ("root", "fork") for e in sqlite.events(run))
        assert pg.add_command("root", "stop", {}).id > 2 and pg.remember("fixit", "new", "x").id > 2
        with pytest.raises(ConfigError, match=r"already holds runs or memories; copy into an empty store"):
            sqlite.copy_to(pg)
        with Store.open(tmp_path / "back.db") as back:
            pg.copy_to(back)
            assert [json.dumps(x) for x in back.export_run("fork")] == [json.dumps(x) for x in pg.export_run("fork")]
            assert back.events("root") == pg.events("root")


def test_a_copy_that_does_not_read_back_the_same_is_rolled_back(tmp_path: Path, pg_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import loopterm.store.copy as copying

    real = copying._digest

    def damaged(store: Store, table: str, key: Any, columns: Any) -> tuple[int, str]:
        count, digest = real(store, table, key, columns)
        return (count, "0" * 64) if store.backend == "postgresql" and table == "states" else (count, digest)

    monkeypatch.setattr(copying, "_digest", damaged)
    with Store.open(tmp_path / "team.db") as sqlite, Store.open(pg_url) as pg:
        populate(sqlite)
        with pytest.raises(ConfigError, match=r"^the copy of table states differs from .*; nothing was copied$"):
            sqlite.copy_to(pg)
        assert pg.list_runs() == [] and pg.memories("fixit") == [] and pg.stored_daily_budget() is None


def test_a_drive_whose_session_was_dropped_is_claimed_again(store: Store, pg_url: str) -> None:
    import psycopg

    assert store.drive("r1") is True
    with psycopg.connect(pg_url, autocommit=True) as admin:  # the server ends the lock's session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                      "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    time.sleep(0.2)
    with Store.open(pg_url) as other:
        assert other.drive("r1") is True  # free again: nobody holds it now
        assert store.drive("r1") is False  # so the first store, asked again, must not claim it still holds it
        other.undrive("r1")
    assert store.drive("r1") is True


def test_a_runs_event_ids_are_committed_in_order(store: Store, pg_url: str) -> None:
    """A reader polling events(run, after_id) never passes an id that commits later."""
    store.create_run(make_run("r1"))
    store.create_run(make_run("r2"))
    done = threading.Event()
    second: list[Any] = []
    with Store.open(pg_url) as other, Store.open(pg_url) as reader:
        with store._write():
            first = store._insert_event("r1", runlog.ShadowMode(why="first"), None)
            thread = threading.Thread(target=lambda: (second.append(other.append_event("r1", runlog.ShadowMode(why="2"))),
                                                      done.set()))
            thread.start()
            assert not done.wait(0.5)  # the other writer of r1's log waits for this transaction
            assert reader.events("r1") == []  # nothing committed yet: a poller remembers no id
            reader.append_event("r2", runlog.ShadowMode(why="another run's log is not held up"))
        thread.join(5)
        assert done.is_set() and second[0].id > first.id
        assert [e.id for e in reader.events("r1")] == [first.id, second[0].id]


# -- the engine on PostgreSQL ---------------------------------------------------------------------


async def test_an_engine_runs_a_loop_on_postgresql_as_on_sqlite(tmp_path: Path, pg_url: str) -> None:
    from loopterm.core.engine import Engine
    from loopterm.core.model import check_model
    from tests.loopkit import decision, kinds, make_loop

    outcomes = []
    for name, target in (("sqlite", tmp_path / "db" / "loopterm.db"), ("postgresql", pg_url)):
        turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(2)] + [{"content": decision(text="ok")}]
        (tmp_path / name).mkdir()
        loop = make_loop(tmp_path / name, turns)
        check_model(loop.model, loop.script)
        with Store.open(target) as store:
            engine = Engine.create(loop, store, loop_ref=f"test:{loop.name}", workspace_root=tmp_path / name / "ws",
                                   workdir=tmp_path / name)
            run = await engine.run()
            records = store.iterations(run.id)
            outcomes.append((run.status, run.iterations, run.tokens_in, [r.decision for r in records],
                             [r.state["iteration"] for r in records], kinds(store.events(run.id)),
                             [t.cost_usd for t in store.spend_by("loop")]))
    assert outcomes[0][0] == "converged"
    assert outcomes[0] == outcomes[1]


def test_a_copy_keeps_the_order_runs_were_created_in(tmp_path: Path, pg_url: str) -> None:
    """`loopterm runs` lists by creation, not by id: a copy must keep that order, whichever ids came first."""
    with Store.open(tmp_path / "team.db") as sqlite, Store.open(pg_url) as pg:
        for run_id in ("zz-first", "mm-second", "aa-third"):
            sqlite.create_run(make_run(run_id))
        sqlite.copy_to(pg)
        assert [r.id for r in pg.list_runs()] == [r.id for r in sqlite.list_runs()] == ["zz-first", "mm-second", "aa-third"]
        with Store.open(tmp_path / "back.db") as back:
            pg.copy_to(back)
            assert [r.id for r in back.list_runs()] == ["zz-first", "mm-second", "aa-third"]
