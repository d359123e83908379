"""The spend ledger (schema 3) equals the runs' totals by construction; the daily budget gates
`run`, `resume` and `fork`; `loopterm budget`; the v2 -> v3 migration backfills the ledger."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.errors import ConfigError
from loopterm.store import SCHEMA_VERSION, Store
from loopterm.store.schema import V4_COLUMNS
from loopterm.core.daily_budget import DAILY_BUDGET_ENV, check_daily_budget, local_day
from loopterm.tui.cli import main
from tests.loopkit import PRICE, decision, make_engine, make_loop
from tests.test_store import make_iteration, make_run, sha, siblings
from tests.test_store_v2 import schema_of


@pytest.fixture(autouse=True)
def no_env_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DAILY_BUDGET_ENV, raising=False)


@pytest.fixture
def store(store_target: str | Path) -> Iterator[Store]:
    """On SQLite, then on PostgreSQL."""
    s = Store.open(store_target)
    yield s
    s.close()


def ledger(store: Store, run_id: str | None = None) -> list[tuple[Any, ...]]:
    sql = "SELECT run_id, loop, model, day, at, tokens_in, tokens_out, cost_usd FROM spend"
    rows = store._conn.execute(sql + (" WHERE run_id = ?" if run_id else "") + " ORDER BY id", [run_id] if run_id else []).fetchall()
    return rows


def sums(store: Store, run_id: str) -> tuple[int, int, float]:
    t_in, t_out, cost = store._conn.execute(
        "SELECT coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0), coalesce(sum(cost_usd), 0) FROM spend WHERE run_id = ?",
        [run_id]).fetchone()
    return t_in, t_out, cost


def assert_ledger_matches(store: Store, run_id: str) -> None:
    run = store.get_run(run_id)
    t_in, t_out, cost = sums(store, run_id)
    assert (t_in, t_out) == (run.tokens_in, run.tokens_out)
    assert cost == pytest.approx(run.cost_usd, abs=1e-12)
    (cached,) = store._conn.execute("SELECT coalesce(sum(tokens_cached), 0) FROM spend WHERE run_id = ?", [run_id]).fetchone()
    assert cached == run.tokens_cached


# -- by construction -------------------------------------------------------------------


async def test_a_real_run_writes_one_row_per_iteration_equal_to_its_totals(tmp_path: Path) -> None:
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(2)] + [{"content": decision(text="ok")}]
    loop = make_loop(tmp_path, turns)
    engine, store = make_engine(tmp_path, loop)
    run = await engine.run()
    assert run.status == "converged" and run.iterations == 3 and run.cost_usd > 0
    iterations = store.iterations(run.id)
    rows = ledger(store)
    assert len(rows) == 3  # the final update_run changed no total: no row
    for row, record in zip(rows, iterations):
        assert row[:6] == (run.id, loop.name, record.model, local_day(record.ended_at), record.ended_at, record.tokens_in)
        assert row[6] == record.tokens_out and row[7] == pytest.approx(record.cost_usd)
    assert_ledger_matches(store, run.id)
    today = local_day(time.time())
    if all(local_day(r.ended_at) == today for r in iterations):  # not across midnight
        assert store.spend_on(today) == pytest.approx(run.cost_usd)


async def test_spend_never_committed_as_an_iteration_is_ledgered_by_update_run(tmp_path: Path) -> None:
    turns = [{"content": decision(text="no")}, ["nope", "nope", "nope"]]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, max_repairs=2))
    run = await engine.run()
    assert (run.status, run.termination_reason, run.iterations) == ("failed", "fatal_error", 1)
    (record,) = store.iterations(run.id)
    assert run.tokens_in > record.tokens_in  # the invalid replies were paid for
    rows = ledger(store, run.id)
    assert len(rows) == 2
    residual = rows[1]
    assert residual[2] == run.model and residual[5] == run.tokens_in - record.tokens_in
    assert_ledger_matches(store, run.id)


def test_update_run_ledgers_the_change_in_the_same_transaction(store: Store) -> None:
    store.create_run(make_run("r1", model="openai/gpt-x"))
    store.commit_iteration(make_iteration("r1", 1, tokens_in=10, tokens_out=5, cost_usd=0.01, model="openai/gpt-y"),
                           {"iterations": 1, "tokens_in": 10, "tokens_out": 5, "cost_usd": 0.01})
    store.update_run("r1", status="stopped", updated_at=1_700_050_000.0)  # no totals: no row
    store.update_run("r1", tokens_in=10, tokens_out=5, cost_usd=0.01)  # unchanged: no row
    assert len(ledger(store)) == 1
    store.update_run("r1", tokens_in=25, cost_usd=0.04, updated_at=1_700_100_000.0)  # a residual, partial fields
    rows = ledger(store)
    assert rows[0][2] == "openai/gpt-y" and rows[0][3] == local_day(make_iteration("r1", 1).ended_at)
    assert rows[1][2:] == ("openai/gpt-x", local_day(1_700_100_000.0), 1_700_100_000.0, 15, 0, pytest.approx(0.03))
    assert_ledger_matches(store, "r1")
    with pytest.raises(Exception):  # a bad field: nothing of the update is written, ledger row included
        store.update_run("r1", tokens_in=99, iterations="many")
    assert len(ledger(store)) == 2
    assert_ledger_matches(store, "r1")


def test_a_failed_commit_writes_no_ledger_row(store: Store) -> None:
    store.create_run(make_run("r1"))
    totals = {"iterations": 1, "tokens_in": 10, "tokens_out": 5, "cost_usd": 0.01}
    store.commit_iteration(make_iteration("r1", 1, tokens_in=10, tokens_out=5, cost_usd=0.01), totals)
    with pytest.raises(Exception):
        store.commit_iteration(make_iteration("r1", 1, tokens_in=10, cost_usd=0.01), {**totals, "tokens_in": 20})
    assert len(ledger(store)) == 1
    assert_ledger_matches(store, "r1")


def test_a_branch_spends_from_zero_and_an_import_spent_elsewhere(tmp_path: Path, store: Store) -> None:
    store.create_run(make_run("parent"))
    store.commit_iteration(make_iteration("parent", 1, tokens_in=10, cost_usd=0.5), {"iterations": 1, "tokens_in": 10, "cost_usd": 0.5})
    store.create_run(make_run("branch", parent_run="parent", fork_iteration=1, origin="fork", iterations=1))
    store.commit_iteration(make_iteration("branch", 2, tokens_in=7, cost_usd=0.25), {"iterations": 2, "tokens_in": 7, "cost_usd": 0.25})
    assert_ledger_matches(store, "parent")
    assert_ledger_matches(store, "branch")
    assert [row[0] for row in ledger(store)] == ["parent", "branch"]

    with Store.open(tmp_path / "other.db") as other:
        other.import_lines([json.dumps(item) for item in store.export_run("branch")])
        assert ledger(other) == []  # imported runs were not spent on this machine
        other.commit_iteration(make_iteration("branch", 3, tokens_in=3, cost_usd=0.125),
                               {"iterations": 3, "tokens_in": 10, "cost_usd": 0.375})
        assert [row[5:] for row in ledger(other)] == [(3, 0, 0.125)]  # only what it spent here


def test_spend_by_and_spend_on(store: Store) -> None:
    day1, day2 = 1_700_000_000.0, 1_700_000_000.0 + 3 * 86_400
    for run_id, loop, model, at, cost in [("a", "fixit", "m1", day1, 0.5), ("b", "fixit", "m2", day2, 0.25),
                                          ("c", "review", "m1", day2, 1.0)]:
        store.create_run(make_run(run_id, loop=loop, model=model))
        store.commit_iteration(make_iteration(run_id, 1, ended_at=at, tokens_in=100, tokens_out=10, cost_usd=cost, model=model),
                               {"iterations": 1, "tokens_in": 100, "tokens_out": 10, "cost_usd": cost})
    by_day = store.spend_by("day")
    assert [(t.key, t.cost_usd, t.runs, t.tokens_in) for t in by_day] == [
        (local_day(day1), 0.5, 1, 100), (local_day(day2), 1.25, 2, 200)]
    assert [(t.key, t.cost_usd) for t in store.spend_by("loop")] == [("review", 1.0), ("fixit", 0.75)]
    assert [(t.key, t.cost_usd) for t in store.spend_by("model")] == [("m1", 1.5), ("m2", 0.25)]
    assert [(t.key, t.cost_usd) for t in store.spend_by("model", since_day=local_day(day2))] == [("m1", 1.0), ("m2", 0.25)]
    assert store.spend_on(local_day(day2)) == 1.25 and store.spend_on("1999-01-01") == 0.0
    with pytest.raises(ValueError, match="cannot group spend by 'week'"):
        store.spend_by("week")


# -- the daily budget --------------------------------------------------------------------


def test_daily_budget_is_stored_and_the_environment_overrides_it(store_target: str | Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = store_target
    with Store.open(path) as s:
        assert s.daily_budget() is None
        s.set_daily_budget(2.5)
    with Store.open(path) as s:
        assert s.daily_budget() == 2.5
        monkeypatch.setenv(DAILY_BUDGET_ENV, "0.75")
        assert s.daily_budget() == 0.75 and s.stored_daily_budget() == 2.5
        monkeypatch.setenv(DAILY_BUDGET_ENV, "")  # empty: unset
        assert s.daily_budget() == 2.5
        for bad in ("lots", "-1", "nan", "inf"):
            monkeypatch.setenv(DAILY_BUDGET_ENV, bad)
            with pytest.raises(ConfigError, match=rf"^\${DAILY_BUDGET_ENV} must be .*; fix it or unset it$") as info:
                s.daily_budget()
            assert "\n" not in str(info.value)
        monkeypatch.delenv(DAILY_BUDGET_ENV)
        with pytest.raises(ConfigError, match="the daily budget must be a finite number"):
            s.set_daily_budget(-1.0)
        s.set_daily_budget(None)
        assert s.daily_budget() is None


def test_check_daily_budget(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_run(make_run("r1"))
    day = local_day(1_700_000_000.5 + 1)
    store.commit_iteration(make_iteration("r1", 1, cost_usd=0.75), {"iterations": 1, "cost_usd": 0.75})
    assert check_daily_budget(store, 5.0, today=day) is None  # no daily budget: nothing to say
    store.set_daily_budget(1.0)
    assert check_daily_budget(store, 0.25, today=day) == 0.25  # fits exactly
    assert check_daily_budget(store, None, today=day) == pytest.approx(0.25)  # uncapped: the remainder
    with pytest.raises(ConfigError) as info:
        check_daily_budget(store, 0.5, today=day)
    message = str(info.value)
    assert message == ("this run's budget of $0.50 on top of today's spend of $0.75 would exceed the daily budget of "
                       "$1.00 ($0.25 left today); pass a lower --budget-usd (at most $0.25), raise it with "
                       "`loopterm budget --set-daily X`, or wait until tomorrow")
    assert check_daily_budget(store, 0.5, today="2099-01-01") == 0.5  # another day: nothing spent yet
    store.set_daily_budget(0.75)
    with pytest.raises(ConfigError, match=r"^the daily budget is spent: \$0.75 of \$0.75 used today \(.*\); raise it"):
        check_daily_budget(store, None, today=day)
    monkeypatch.setenv(DAILY_BUDGET_ENV, "3")
    assert check_daily_budget(None, None) == 3.0  # no database yet: nothing spent


# -- the command line --------------------------------------------------------------------

LOOP_FILE = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, tool

@tool
def noop() -> str:
    """Nothing."""
    return "ok"

loop = Loop(name="spender", goal="spend a little", tools=[noop], script=Path(__file__).parent / "script.json",
            max_iterations=3, stall_window=None, converged=lambda s, g: s.iteration >= 2)
'''


@pytest.fixture
def spender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    monkeypatch.chdir(tmp_path)
    turns = [{"content": {"action": {"tool": "noop", "args": {}}, "subgoal": f"step {i}", "confidence": 0.5,
                          "reasoning": "r"}} for i in range(1, 8)]
    (tmp_path / "script.json").write_text(json.dumps({"price": PRICE, "turns": turns, "after_end": "repeat_last"}))
    (tmp_path / "spender.py").write_text(LOOP_FILE)
    return tmp_path / "s.db", str(tmp_path / "spender.py")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def runs_of(capsys: pytest.CaptureFixture[str], db: Path) -> list[dict[str, Any]]:
    code, out, _ = cli(capsys, "runs", "--json", "--db", str(db))
    assert code == 0
    return json.loads(out)


def budget_json(capsys: pytest.CaptureFixture[str], db: Path, *extra: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "budget", "--json", "--db", str(db), *extra)
    assert code == 0, err
    return json.loads(out)


def test_budget_json_figures_and_the_daily_gate(spender: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    db, loop_file = spender
    empty = budget_json(capsys, db)
    assert empty["today_usd"] == 0 and empty["daily_budget_usd"] is None and len(empty["by_day"]) == 7
    assert not db.exists()  # reading creates nothing

    code, _, err = cli(capsys, "run", loop_file, "--headless", "--db", str(db))
    assert code == 0, err
    (first,) = runs_of(capsys, db)
    figures = budget_json(capsys, db, "--days", "3")
    today = local_day(time.time())
    assert figures["today"] == today and len(figures["by_day"]) == 3 and figures["by_day"][-1]["key"] == today
    assert figures["today_usd"] == pytest.approx(first["cost_usd"]) and figures["total_usd"] == pytest.approx(first["cost_usd"])
    assert [(g["key"], g["runs"], g["tokens_in"], g["tokens_out"]) for g in figures["by_loop"]] == [
        ("spender", 1, first["tokens_in"], first["tokens_out"])]
    assert [g["key"] for g in figures["by_model"]] == ["scripted/spender"]
    spent = figures["today_usd"]

    # a run whose budget would take today's spend over the daily budget is refused, and nothing is created
    figures = budget_json(capsys, db, "--set-daily", str(spent + 0.001))
    assert figures["daily_budget_usd"] == pytest.approx(spent + 0.001) and figures["daily_budget_source"] == "store"
    assert figures["remaining_today_usd"] == pytest.approx(0.001)
    code, _, err = cli(capsys, "run", loop_file, "--headless", "--budget-usd", "0.5", "--db", str(db))
    assert code == 2 and err.count("\n") == 1, err
    assert "this run's budget of $0.50 on top of today's spend of $" in err and "would exceed the daily budget" in err
    assert "--budget-usd (at most $0.001)" in err and "loopterm budget --set-daily" in err and "tomorrow" in err
    assert len(runs_of(capsys, db)) == 1

    # an uncapped run gets the remainder as its USD budget, and says so
    code, _, err = cli(capsys, "run", loop_file, "--headless", "--db", str(db))
    assert "no USD budget, so it gets what is left of today's daily budget: $0.001" in err
    second = runs_of(capsys, db)[1]
    assert second["budget"]["usd"] == pytest.approx(0.001)
    assert second["cost_usd"] <= 0.001
    after = budget_json(capsys, db)
    assert after["today_usd"] == pytest.approx(spent + second["cost_usd"]) and after["today_usd"] <= after["daily_budget_usd"] + 1e-12

    # fork and resume are refused once the day's budget is spent
    budget_json(capsys, db, "--set-daily", str(after["today_usd"]))
    code, _, err = cli(capsys, "fork", first["id"], "--at", "1", "--headless", "--db", str(db))
    assert code == 2 and err.startswith("loopterm: the daily budget is spent: ") and err.count("\n") == 1, err
    code, _, err = cli(capsys, "resume", second["id"], "--db", str(db))
    assert code == 2 and "the daily budget is spent" in err, err
    assert len(runs_of(capsys, db)) == 2
    assert budget_json(capsys, db, "--clear-daily")["daily_budget_usd"] is None


def test_budget_table_and_bad_settings(spender: tuple[Path, str], capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    db, _ = spender
    code, out, _ = cli(capsys, "budget", "--set-daily", "2", "--db", str(db))
    assert code == 0 and "daily budget set to $2.00" in out and "spend by day" in out and "of $2.00 daily budget" in out
    monkeypatch.setenv(DAILY_BUDGET_ENV, "1.5")
    code, out, _ = cli(capsys, "budget", "--db", str(db))
    assert code == 0 and "of $1.50 daily budget" in out and DAILY_BUDGET_ENV in out
    monkeypatch.setenv(DAILY_BUDGET_ENV, "plenty")
    code, _, err = cli(capsys, "budget", "--db", str(db))
    assert code == 2 and err.count("\n") == 1 and f"${DAILY_BUDGET_ENV} must be a number of US dollars, got 'plenty'" in err
    for argv in (["--set-daily", "-1"], ["--set-daily", "x"], ["--days", "0"], ["--set-daily", "1", "--clear-daily"]):
        with pytest.raises(SystemExit) as info:
            main(["budget", "--db", str(db), *argv])
        assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# -- migration from schema 2 -------------------------------------------------------------

V3_ONLY = ("memory_fts_insert", "memory_fts_delete", "memory_fts_update", "spend_by_day")


def downgrade_to_v3(path: Path) -> None:
    """Turn a new file into exactly what schema 3 wrote: the same file minus schema 4's columns."""
    conn = sqlite3.connect(path)
    for table, column, _ in V4_COLUMNS:
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def downgrade_to_v2(path: Path) -> None:
    """Turn a new file into exactly what schema 2 wrote: the same file minus the v3 and v4 additions."""
    downgrade_to_v3(path)
    conn = sqlite3.connect(path)
    for trigger in V3_ONLY[:3]:
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute("DROP INDEX spend_by_day")
    for table in ("memory_fts", "memory", "spend"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'memory'")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def build_v2(path: Path) -> None:
    with Store.open(path) as s:
        day = 86_400.0
        s.create_run(make_run("r1", loop="fixit", model="m-run"))
        total = [0, 0.0]
        for n, (ended, model, cost) in enumerate([(1_700_000_000.0, "m1", 0.5), (1_700_000_100.0, "m1", 0.25),
                                                  (1_700_000_000.0 + 2 * day, "m2", 0.125)], 1):
            total[0] += 10
            total[1] += cost
            s.commit_iteration(make_iteration("r1", n, ended_at=ended, model=model, tokens_in=10, cost_usd=cost),
                               {"iterations": n, "tokens_in": total[0], "cost_usd": total[1]})
        s.update_run("r1", tokens_in=35, cost_usd=1.0, updated_at=1_700_000_000.0 + 3 * day)  # paid, never committed
        s.create_run(make_run("r2", loop="review"))  # nothing spent
    downgrade_to_v2(path)


def test_a_v2_database_is_migrated_and_its_ledger_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    build_v2(path)
    with Store.open(path, create=False) as s:
        assert s.migrated_from == 2 and s.backup_path == path.with_name("old.db.v2.bak")
        assert dict(s._conn.execute("SELECT key, value FROM meta").fetchall())["schema_version"] == str(SCHEMA_VERSION) == "4"
        day = 86_400.0
        assert [row[2:] for row in ledger(s, "r1")] == [
            ("m1", local_day(1_700_000_000.0), 1_700_000_100.0, 20, 0, 0.75),
            ("m2", local_day(1_700_000_000.0 + 2 * day), 1_700_000_000.0 + 2 * day, 10, 0, 0.125),
            ("m-run", local_day(1_700_000_000.0 + 3 * day), 1_700_000_000.0 + 3 * day, 5, 0, 0.125),
        ]
        assert_ledger_matches(s, "r1")
        assert ledger(s, "r2") == []
        # the migrated file goes on as a v3 file: memory and ledger both work
        s.remember("fixit", "k", "migrated memory")
        assert [i.key for i in s.recall("fixit", "memory")] == ["k"]
        s.commit_iteration(make_iteration("r1", 4, tokens_in=1, cost_usd=0.5), {"iterations": 4, "tokens_in": 36, "cost_usd": 1.5})
        assert_ledger_matches(s, "r1")
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    backup = sqlite3.connect(path.with_name("old.db.v2.bak"))
    assert backup.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    assert "spend" not in {name for (name,) in backup.execute("SELECT name FROM sqlite_master")}
    backup.close()
    fresh = tmp_path / "fresh.db"
    Store.open(fresh).close()
    assert schema_of(path) == schema_of(fresh)  # the same layout as a file created now


def test_a_v3_database_gains_the_v4_columns_and_keeps_its_ledger(tmp_path: Path) -> None:
    """Schema 4 adds columns only: what a v3 file holds reads back the same, with every earlier decision
    asked for as text and no cached tokens; new commits ledger tokens_cached like the other totals."""
    path = tmp_path / "old.db"
    build_v2(path)
    with Store.open(path, create=False):
        pass  # now schema 4: downgrade only its columns
    downgrade_to_v3(path)
    with Store.open(path, create=False) as s:
        assert s.migrated_from == 3 and s.backup_path == path.with_name("old.db.v3.bak")
        assert [(r.n, r.decision_mode, r.tokens_cached) for r in s.iterations("r1")] == [(1, "text", 0), (2, "text", 0), (3, "text", 0)]
        assert s.get_run("r1").tokens_cached == 0 and s.get_run("r1").cost_usd == 1.0
        assert_ledger_matches(s, "r1")
        s.commit_iteration(make_iteration("r1", 4, tokens_in=100, cost_usd=0.5, tokens_cached=80, decision_mode="tools"),
                           {"iterations": 4, "tokens_in": 135, "cost_usd": 1.5, "tokens_cached": 80})
        assert (s.get_iteration("r1", 4).decision_mode, s.get_iteration("r1", 4).tokens_cached) == ("tools", 80)
        assert s.get_run("r1").tokens_cached == 80
        assert sum(t.tokens_cached for t in s.spend_by("model")) == 80
        assert_ledger_matches(s, "r1")
    fresh = tmp_path / "fresh.db"
    Store.open(fresh).close()
    assert schema_of(path) == schema_of(fresh)


def test_a_failed_v2_migration_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    build_v2(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE spend (something_else TEXT)")  # in the way of the ledger
    conn.commit()
    conn.close()
    before, files = sha(path), siblings(path)
    with pytest.raises(ConfigError, match=r"^cannot upgrade .*old\.db from schema 2 to 3 \(.*\); the file is unchanged; ") as info:
        Store.open(path)
    assert "\n" not in str(info.value)
    assert sha(path) == before and siblings(path) == files
