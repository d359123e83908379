"""`loopterm prune` and the storage meter: a pruned store still loads, forks, replays and exports every kept
run exactly as before; a dry run changes nothing and announces what the real prune frees."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import runlog
from loopterm.store import Store
from loopterm.store.footprint import Meter
from loopterm.tui.cli import main
from tests.test_store import make_iteration, make_run, rows_in, target_of

SYSTEM = "\n\n".join(f"system section {i}: " + "rules " * 20 for i in range(6))  # shared by every run: blobs


class Forest:
    """Runs with forks of forks, states that cross keyframes and chunk boundaries, prompts stored as blobs."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.last: dict[str, dict[str, Any]] = {}

    def run(self, run_id: str, steps: int, *, parent: str | None = None, at: int = 0, when: float = 1.0,
            status: str = "converged") -> None:
        fields: dict[str, Any] = {"status": status, "created_at": when, "updated_at": when}
        if parent is not None:
            fields.update(parent_run=parent, fork_iteration=at, origin="fork")
        self.store.create_run(make_run(run_id, **fields))
        state = copy.deepcopy(self.store.state_at(parent, at)) if parent and at else {"log": [], "who": None}
        for n in range(at + 1, at + steps + 1):
            state["who"] = f"{run_id}@{n}"
            state["log"].append(f"{run_id}:{n} " + "x" * 30)
            prompt = [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": f"{run_id} step {n}: " + "the last gate failed " * 5}]
            self.store.commit_iteration(make_iteration(run_id, n, state=copy.deepcopy(state), prompt=prompt),
                                        {"iterations": n})
        self.store.update_run(run_id, updated_at=when, status=status)


def snapshot(store: Store, run_id: str) -> dict[str, Any]:
    """Everything a kept run shows: its states at every iteration (exact JSON), its iterations and its export."""
    run = store.get_run(run_id)
    states = {n: json.dumps(store.state_at(run_id, n), sort_keys=True) for n in range(1, run.iterations + 1)}
    records = [record.model_dump() for record in store.iterations(run_id)]
    export = [json.dumps(line, sort_keys=True) for line in store.export_run(run_id)]
    return {"states": states, "records": records, "export": export, "events": [e.model_dump() for e in store.events(run_id)]}


def on_disk(db: Path) -> int:
    """The database file and its write-ahead log."""
    wal = Path(f"{db}-wal")
    return os.path.getsize(db) + (os.path.getsize(wal) if wal.exists() else 0)


def table_dump(db: Path | Store) -> list[str]:
    """Every row of the store, as another connection reads it."""
    if isinstance(db, Store) and db.backend == "postgresql":
        from loopterm.store.pg_schema import PG_TABLES

        return [repr(rows_in(db, f"SELECT * FROM {table} ORDER BY 1, 2", [])) for table in PG_TABLES]
    path = db.path if isinstance(db, Store) else db
    with closing(sqlite3.connect(path)) as conn:
        return list(conn.iterdump())


def event_triggers(store: Store) -> list[tuple[Any, ...]]:
    if store.backend == "postgresql":
        return rows_in(store, "SELECT tgname, tgfoid::regproc::text FROM pg_trigger WHERE tgrelid = 'events'::regclass "
                              "AND NOT tgisinternal ORDER BY tgname", [])
    return rows_in(store, "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name", [])


@pytest.fixture
def forest(store_target: str | Path) -> Iterator[Forest]:
    """On SQLite, then on PostgreSQL."""
    store = Store.open(store_target)
    f = Forest(store)
    f.run("root", 150, when=1)
    f.run("b", 30, parent="root", at=70, when=2)  # b: root's 1..70, own 71..100
    f.run("c", 20, parent="b", at=85, when=10)  # c: root's 1..70, b's 71..85, own 86..105
    f.run("x", 100, when=3)  # unrelated, with a branch
    f.run("w", 10, parent="x", at=50, when=4)
    f.run("y", 60, when=10)  # unrelated, kept
    f.run("live", 5, when=1, status="running")  # running (its heartbeat is old: crashed, or about to beat)
    f.run("esc", 3, when=1, status="escalated")
    yield f
    store.close()


KEPT = ("root", "b", "c", "y", "live", "esc")


def test_prune_keeps_every_kept_run_exactly_and_frees_real_bytes(forest: Forest) -> None:
    store = forest.store
    before = {run_id: snapshot(store, run_id) for run_id in KEPT}
    schema_triggers = event_triggers(store)
    assert ("events_no_delete",) in [t[:1] for t in schema_triggers]
    dump = table_dump(store)
    dry = store.prune(older_than=5.0, keep_last=None, dry_run=True)
    assert table_dump(store) == dump  # a dry run changes nothing
    assert [r.id for r in dry.plan.removed] == ["x", "w"]
    assert {k.id: k.reason for k in dry.plan.kept} == {
        "root": "kept: ancestor of c", "b": "kept: ancestor of c", "live": "kept: running", "esc": "kept: escalated",
    }
    assert dry.plan.blobs > 0 and dry.plan.bytes > 0

    sqlite = store.backend == "sqlite"
    size_before = on_disk(store.path) if sqlite else 0  # type: ignore[arg-type]
    done = store.prune(older_than=5.0, keep_last=None)
    assert done.plan.model_dump() == dry.plan.model_dump()  # the dry run said what the real one frees
    assert done.plan.orphans == dry.plan.orphans
    assert done.vacuum_s is not None and done.vacuum_error is None
    if sqlite:
        assert done.file_bytes_after < done.file_bytes_before
        assert on_disk(store.path) < size_before  # type: ignore[arg-type]  # compacted: the file and its WAL shrank
    else:  # VACUUM (not FULL) keeps the freed pages for the tables' next rows (and adds its free-space maps)
        assert done.file_bytes_after > 0

    assert sorted(r.id for r in store.list_runs()) == sorted(KEPT)
    for run_id in KEPT:
        assert snapshot(store, run_id) == before[run_id], run_id
    for table in ("iterations", "states", "events", "tool_calls", "intents", "commands", "spend"):
        assert rows_in(store, f"SELECT count(*) FROM {table} WHERE run_id IN ('x', 'w')", [])[0][0] == 0
    hashes = set(done.plan.orphans)
    left = {row[0] for row in rows_in(store, "SELECT hash FROM blobs", [])}
    assert not hashes & left
    if sqlite:  # (PostgreSQL checks foreign keys on every statement)
        assert rows_in(store, "PRAGMA foreign_key_check", []) == []
    assert event_triggers(store) == schema_triggers  # the log is append-only again, by the same trigger
    store.append_event("root", runlog.ShadowMode(why="after the prune"))
    with pytest.raises(store._conn.DatabaseError, match="append-only"):
        store._conn.execute("DELETE FROM events WHERE run_id = 'root'")
    store._conn.rollback()
    # Another branch of c at an iteration c inherits from root works on the pruned store.
    store.create_run(make_run("d", parent_run="c", fork_iteration=40, origin="fork", status="converged"))
    state = store.state_at("d", 40)
    assert json.dumps(state, sort_keys=True) == before["c"]["states"][40]
    store.commit_iteration(make_iteration("d", 41, state={**state, "who": "d@41"}), {"iterations": 41})
    assert store.state_at("d", 41)["log"] == state["log"]


def test_a_whole_lineage_goes_when_nothing_kept_needs_it(forest: Forest) -> None:
    store = forest.store
    done = store.prune(older_than=20.0, keep_last=None)
    assert sorted(r.id for r in done.plan.removed) == ["b", "c", "root", "w", "x", "y"]
    assert sorted(r.id for r in store.list_runs()) == ["esc", "live"]
    assert store.state_at("live", 5) is not None and store.state_at("esc", 3) is not None
    left = rows_in(store, "SELECT count(*) FROM blobs", [])[0][0]
    assert left > 0  # the system prompt's sections: the kept runs still reference them
    assert store.iterations("live")[0].prompt[0]["content"] == SYSTEM


def test_keep_last_is_per_loop_and_both_options_must_hold(forest: Forest) -> None:
    store = forest.store
    store.update_run("y", loop="other")
    plan = store.prune(older_than=None, keep_last=2, dry_run=True).plan
    # codefix's newest two (by created_at) are c and y's... y moved to "other": c and x's branch w stay.
    assert {k.id for k in plan.kept} >= {"root", "b", "x"}  # ancestors of c and w
    assert plan.removed == []  # the rest are ancestors of those two, running or escalated
    plan = store.prune(older_than=None, keep_last=0, dry_run=True).plan
    assert {r.id for r in plan.removed} == {"root", "b", "c", "x", "w", "y"}
    both = store.prune(older_than=3.5, keep_last=0, dry_run=True).plan  # both must hold: last written before 3.5
    assert both.removed == [] and {k.id: k.reason for k in both.kept}["x"] == "kept: ancestor of w"
    both = store.prune(older_than=4.5, keep_last=0, dry_run=True).plan
    assert {r.id for r in both.removed} == {"x", "w"}


def test_a_run_that_spent_today_or_waits_is_kept(forest: Forest) -> None:
    store = forest.store
    store.update_run("x", cost_usd=0.25)  # a ledger row dated today
    plan = store.prune(older_than=5.0, keep_last=None, dry_run=True).plan
    reasons = {k.id: k.reason for k in plan.kept}
    assert reasons["x"].startswith("kept: spent today")
    assert [r.id for r in plan.removed] == ["w"]


def test_the_meter_adds_up(forest: Forest) -> None:
    store = forest.store
    sizes = store.sizes()
    assert sizes["b"].own_bytes < sizes["root"].own_bytes / 3  # b inherits 70 of its 100 iterations
    assert sizes["root"].shared_bytes > sizes["y"].shared_bytes  # root lends 1..70 to its branches
    assert sizes["c"].own_bytes < sizes["c"].shared_bytes + sizes["c"].own_bytes
    blob_bytes = rows_in(store, "SELECT sum(length(CAST(hash AS BLOB)) + length(CAST(body AS BLOB))) FROM blobs", [])[0][0]
    state_bytes = rows_in(store, "SELECT sum(length(CAST(body AS BLOB))) FROM states", [])[0][0]
    own = sum(size.own_bytes for size in sizes.values())
    everything = sum(size.own_bytes + size.shared_bytes for size in sizes.values())
    assert state_bytes + blob_bytes < everything  # all rows and blobs are counted somewhere
    assert own < everything
    # Measuring again after a run grew reads only what was added, and agrees with a fresh meter.
    meter = Meter()
    store.sizes(meter=meter)
    forest.run("z", 70, parent="y", at=60, when=11)
    assert store.sizes(meter=meter) == store.sizes(meter=Meter())


def test_prune_with_a_loop_running_on_the_same_db(forest: Forest, tmp_path: Path) -> None:
    """Another connection commits iterations of the running run while prune deletes and compacts."""
    store = forest.store
    other = Store.open(target_of(store))
    done = threading.Event()
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            state = other.state_at("live", 5)
            for n in range(6, 60):
                state = {**state, "who": f"live@{n}"}
                other.commit_iteration(make_iteration("live", n, state=state), {"iterations": n, "updated_at": time.time()})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=drive)
    thread.start()
    result = store.prune(older_than=5.0, keep_last=None)
    thread.join(30)
    other.close()
    assert not errors
    assert "live" not in {r.id for r in result.plan.removed}
    assert store.get_run("live").iterations == 59
    assert store.state_at("live", 59)["who"] == "live@59"


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Real codefix runs: root, a branch at 2, a branch of that at 1, and an unrelated run; their spend dated
    long ago (the daily budget's rule would keep today's)."""
    work = tmp_path_factory.mktemp("prune")
    db = work / "t.db"
    cwd = Path.cwd()
    os.chdir(work)
    try:
        assert main(["run", "codefix", "--headless", "--db", str(db)]) == 0
        root = Store.open(db, create=False).list_runs()[0].id
        assert main(["fork", root, "--at", "2", "--headless", "--reason", "again", "--db", str(db)]) == 0
        branch = next(r.id for r in Store.open(db, create=False).list_runs() if r.parent_run == root)
        assert main(["fork", branch, "--at", "1", "--headless", "--reason", "again", "--db", str(db)]) == 0
        twig = next(r.id for r in Store.open(db, create=False).list_runs() if r.parent_run == branch)
        assert main(["run", "codefix", "--headless", "--db", str(db)]) == 0
        other = Store.open(db, create=False).list_runs()[-1].id
    finally:
        os.chdir(cwd)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE spend SET day = '2000-01-01'")
        conn.execute("UPDATE runs SET created_at = created_at - 1000 WHERE id = ?", [other])  # oldest: chosen first
    return db, {"root": root, "branch": branch, "twig": twig, "other": other}


def out_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_cli_prune_keeps_branches_loadable_replayable_exportable(
    cli_db: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    template, ids = cli_db
    db = tmp_path / "s.db"
    with sqlite3.connect(template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    monkeypatch.chdir(tmp_path)
    runs = out_json(capsys, "runs", "--json", "--db", str(db))
    assert all(r["storage"]["own_bytes"] > 0 for r in runs)
    shown = out_json(capsys, "show", ids["twig"], "--json", "--db", str(db))
    assert shown["storage"]["shared_bytes"] >= 0 and shown["storage"]["own_bytes"] > 0
    exports = {}
    for key in ("twig", "branch"):
        assert main(["export", ids[key], "-o", str(tmp_path / f"{key}-before.jsonl"), "--db", str(db)]) == 0
        exports[key] = (tmp_path / f"{key}-before.jsonl").read_text()

    dry = out_json(capsys, "prune", "--keep-last", "1", "--dry-run", "--json", "--db", str(db))
    assert [r["id"] for r in dry["removed"]] == [ids["other"]]
    assert {k["id"]: k["reason"] for k in dry["kept"]} == {ids["root"]: f"kept: ancestor of {ids['twig']}",
                                                          ids["branch"]: f"kept: ancestor of {ids['twig']}"}
    done = out_json(capsys, "prune", "--keep-last", "1", "--json", "--db", str(db))
    assert (done["removed"], done["bytes"]) == (dry["removed"], dry["bytes"])
    assert done["file_bytes_after"] < done["file_bytes_before"]

    for key in ("twig", "branch"):
        assert main(["export", ids[key], "-o", str(tmp_path / f"{key}-after.jsonl"), "--db", str(db)]) == 0
        assert (tmp_path / f"{key}-after.jsonl").read_text() == exports[key]
    assert main(["replay", ids["twig"], "--db", str(db)]) == 0  # re-driven over the kept ancestors: identical
    # Fork the kept twig at its iteration 1, which it inherits from the root's rows.
    assert main(["fork", ids["twig"], "--at", "1", "--headless", "--reason", "after prune", "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["prune", "--keep-last", "1", "--db", str(db)]) == 0
    assert f"{ids['root']}  kept: ancestor of" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "says"), [
    ([], "prune needs --older-than DATE and/or --keep-last N"),
    (["--keep-last", "-1"], "--keep-last: must be >= 0"),
    (["--older-than", "last tuesday"], "--older-than: expected a date like 2026-12-01"),
    (["--keep-last", "x"], "--keep-last: expected a whole number"),
])
def test_bad_input_is_one_line_and_loses_nothing(cli_db: tuple[Path, dict[str, str]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    template, _ = cli_db
    db = tmp_path / "s.db"
    with sqlite3.connect(template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    dump = table_dump(db)
    capsys.readouterr()
    code = 2
    try:
        code = main(["prune", *argv, "--db", str(db)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1, err
    assert table_dump(db) == dump


def test_an_unknown_db_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--keep-last", "3", "--db", str(tmp_path / "nope.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.db" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nope.db").exists()


# -- the run tree ------------------------------------------------------------------------------


async def test_the_run_tree_shows_each_runs_own_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.store.footprint import human
    from loopterm.tui.app import LooptermApp
    from tests.test_compare import B1, PARENT, build_family
    from tests.test_tui_compare import shown, tree_label, until

    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    db = tmp_path / "db" / "loopterm.db"
    db.parent.mkdir()
    build_family(db)
    with Store.open(db, create=False) as store:
        sizes = store.sizes()
    app = LooptermApp(db, watch_run=B1, theme="textual-dark", frozen=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: shown(app, B1), "the branch on screen")
        for run_id in (PARENT, B1):
            await until(pilot, lambda: f"{run_id[:8]} {human(sizes[run_id].own_bytes)} " in tree_label(app, run_id),
                        f"{run_id}'s size in the tree")
        assert app._tree_sizes.last_s is not None and app._tree_sizes.last_s < 2.0
    frozen = LooptermApp(db, watch_run=B1, theme="textual-dark", frozen=True)
    async with frozen.run_test(size=(140, 40)) as pilot:  # snapshots: nothing measured, nothing timing-dependent
        await until(pilot, lambda: shown(frozen, B1), "the branch on screen")
        assert tree_label(frozen, PARENT).split()[2] == "flagger"  # glyph, id, loop: no size


def test_prune_while_another_process_runs_a_loop(cli_db: tuple[Path, dict[str, str]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A headless loop in another process keeps committing through a prune (and its VACUUM) and converges."""
    import subprocess
    import sys

    template, ids = cli_db
    db = tmp_path / "s.db"
    with sqlite3.connect(template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    child = subprocess.Popen([sys.executable, "-m", "loopterm.tui.cli", "run", "codefix", "--headless", "--db", str(db)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        live = None
        while live is None and time.monotonic() < deadline and child.poll() is None:
            with Store.open(db, create=False) as store:
                live = next((r for r in store.list_runs() if r.id not in ids.values() and r.status == "running"), None)
            time.sleep(0.05)
        assert live is not None, "the loop never started"
        done = out_json(capsys, "prune", "--keep-last", "0", "--json", "--db", str(db))
        assert child.wait(60) == 0, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
    assert live.id not in {r["id"] for r in done["removed"]}
    assert {k["id"]: k["reason"] for k in done["kept"]}.get(live.id, "kept: spent today").startswith("kept:")
    assert ids["other"] in {r["id"] for r in done["removed"]}
    with Store.open(db, create=False) as store:
        run = store.get_run(live.id)
        assert run.status == "converged" and [r.n for r in store.iterations(live.id)] == list(range(1, run.iterations + 1))


def test_a_run_called_by_a_kept_run_stays(forest: Forest) -> None:
    store = forest.store
    forest.store.create_run(make_run("callee", parent_run="y", origin="child", status="converged", created_at=1,
                                     updated_at=1))
    forest.store.create_run(make_run("inner", parent_run="callee", origin="child", status="converged", created_at=1,
                                     updated_at=1))
    plan = store.prune(older_than=5.0, keep_last=None, dry_run=True).plan
    reasons = {k.id: k.reason for k in plan.kept}
    assert reasons["callee"] == "kept: called by y" and reasons["inner"] == "kept: called by callee"
    plan = store.prune(older_than=20.0, keep_last=None, dry_run=True).plan  # the caller goes: so do its callees
    assert {"y", "callee", "inner"} <= {r.id for r in plan.removed}
