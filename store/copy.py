"""`loopterm db copy`: a whole SQLite store into another store (a PostgreSQL database), then verified.

What goes through the Store's public API: every run with its lineage, iterations (full state and prompt),
events and tool calls, as one export of every run in dependency order (parents first) imported in one
transaction (`Store.import_lines`, so the target's own encoding and checks apply, digests included); a
run's pending intent (`load_intent` / `save_intent`); the daily budget (`set_daily_budget`).

What cannot: commands (their times and consumed_at are the record of a person steering a run, and
`add_command` would stamp new ones), long-term memory (`remember` cannot set an id or both timestamps)
and the spend ledger (written only as a side effect of a run's totals changing; an imported run adds no
rows). Those three tables are copied row for row here, ids kept, in one transaction, each insert
`ON CONFLICT DO NOTHING` so a re-run of an interrupted copy adds only what is missing; a PostgreSQL
identity sequence is then moved past the ids copied.

Verification reads both stores back: each run's export compared line by line, every pending intent,
every loop's memories, the ledger grouped by day, loop and model, the daily budget, and the row count of
every table both stores share by meaning.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loopterm.core.errors import ConfigError
from loopterm.core.records import Intent, RunRecord
from loopterm.store.target import StoreTarget

# Copied row for row (see the module), in dependency order: every one refers to runs only.
RAW_TABLES: dict[str, tuple[str, ...]] = {
    "commands": ("id", "run_id", "ts", "kind", "payload", "consumed_at"),
    "memory": ("id", "loop", "kind", "key", "value", "source_run", "created_at", "updated_at", "embedding"),
    "spend": ("id", "run_id", "loop", "model", "day", "at", "tokens_in", "tokens_out", "cost_usd", "tokens_cached"),
}
# Counted on both sides after the copy: the tables that hold the same rows whatever the backend's encoding
# (states and blobs are each store's own compression of the iterations' states and prompts).
COUNTED = ("runs", "iterations", "events", "tool_calls", "intents", "commands", "memory", "spend")


@dataclass
class CopyReport:
    """What a copy did, for its one-line summary."""

    runs: int = 0  # copied now
    already: int = 0  # already in the target, identical (a re-run)
    branches: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # rows per table in the source (= the target's)
    daily_budget: float | None = None

    def summary(self, source: str, target: str) -> str:
        c = self.counts
        what = (f"{c.get('runs', 0)} run(s) ({self.branches} branch(es)), {c.get('iterations', 0)} iteration(s), "
                f"{c.get('events', 0)} event(s), {c.get('tool_calls', 0)} tool call(s), {c.get('intents', 0)} intent(s), "
                f"{c.get('commands', 0)} command(s), {c.get('memory', 0)} memories, {c.get('spend', 0)} ledger row(s)")
        budget = f", daily budget ${self.daily_budget:g}" if self.daily_budget is not None else ""
        again = f" ({self.already} run(s) were already there, identical)" if self.already else ""
        return (f"copied {source} to {target}: {what}{budget}{again}; verified: every run's export, intent, memory, "
                f"the ledger and every table's count match")


def in_dependency_order(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Parents before their branches (a fork of a fork after both), otherwise oldest first."""
    by_id = {run.id: run for run in runs}
    done: dict[str, RunRecord] = {}

    def visit(run: RunRecord, seen: tuple[str, ...] = ()) -> None:
        if run.id in done or run.id in seen:
            return
        parent = by_id.get(run.parent_run) if run.parent_run else None
        if parent is not None:
            visit(parent, (*seen, run.id))
        done[run.id] = run

    for run in sorted(by_id.values(), key=lambda r: (r.created_at, r.id)):
        visit(run)
    return list(done.values())


def own_lines(store: Any, run_id: str) -> Iterator[dict[str, Any]]:
    """A run's own records from its export (an export carries the whole lineage; the ancestors are copied
    on their own, earlier)."""
    for item in store.export_run(run_id):
        kind = item.get("type")
        if (kind == "run" and item.get("id") == run_id) or (kind in ("iteration", "event", "tool_call")
                                                            and item.get("run_id") == run_id):
            yield item


def export_text(store: Any, run_id: str) -> list[str]:
    """A run's export as canonical lines (what verification compares)."""
    return [json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for item in store.export_run(run_id)]


def copy_store(source_target: StoreTarget, target: StoreTarget) -> CopyReport:
    """Copy the SQLite store `source_target` into `target` and verify it; ConfigError (one line) when the
    source is not a loopterm store, the target holds other runs, or the copy does not read back the same."""
    from loopterm.store.transfer import seal

    assert source_target.path is not None
    if not source_target.path.is_file():
        raise ConfigError(f"--from {source_target.shown}: no such file; give the SQLite store to copy "
                          "(default .loopterm/loopterm.db)")
    try:
        source = source_target.open(create=False)
    except ConfigError as exc:
        raise ConfigError(f"--from {source_target.shown}: {str(exc).replace('pass --db with', 'give --from')}") from None
    try:
        with target.open(create=True) as dest:
            report = CopyReport()
            runs = in_dependency_order(source.list_runs())
            have = {run.id for run in dest.list_runs()}
            if have:
                report.already = _check_rerun(source, dest, have, {r.id for r in runs}, target.shown)
            todo = [run for run in runs if run.id not in have]
            if todo:
                dest.import_lines(json.dumps(item, ensure_ascii=False)
                                  for item in seal(line for run in todo for line in own_lines(source, run.id)))
            report.runs = len(todo)
            report.branches = sum(1 for run in runs if run.parent_run)
            for run in runs:
                intent = source.load_intent(run.id, run.iterations + 1)
                if intent is not None and dest.load_intent(run.id, intent.n) is None:
                    dest.save_intent(intent)
            _copy_rows(source_target, target)
            report.daily_budget = source.stored_daily_budget()
            if report.daily_budget is not None and dest.stored_daily_budget() != report.daily_budget:
                dest.set_daily_budget(report.daily_budget)
            report.counts = verify(source, dest, source_target, target, runs)
            return report
    finally:
        source.close()


def _check_rerun(source: Any, dest: Any, have: set[str], ours: set[str], shown: str) -> int:
    """A target that already holds runs is refused unless every one of them is this source's, identical
    (a copy run again, e.g. after it was interrupted): then only what is missing is copied."""
    foreign = sorted(have - ours)
    if foreign:
        raise ConfigError(f"--to {shown} already holds {len(have)} run(s), {len(foreign)} of them not from this store "
                          f"(e.g. {foreign[0]}); copy into an empty database (`loopterm db init --db URL` on a new one)")
    for run_id in sorted(have):
        if export_text(source, run_id) != export_text(dest, run_id):
            raise ConfigError(f"--to {shown} already holds run {run_id} and it differs from this store's (it went on "
                              "there?); copy into an empty database instead")
    return len(have)


# -- row-for-row tables -------------------------------------------------------------------------------


def _source_rows(target: StoreTarget, table: str) -> list[tuple[Any, ...]]:
    """A table's rows, read-only (the Store has no API for these rows)."""
    columns = RAW_TABLES[table]
    conn = sqlite3.connect(f"file:{target.path}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id").fetchall()
    finally:
        conn.close()


def _connect(target: StoreTarget) -> Any:
    """A connection that takes `?` placeholders and explicit BEGIN / COMMIT, on either backend."""
    if target.path is not None:
        conn = sqlite3.connect(target.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn
    from loopterm.store.pg import connect  # psycopg: only for a PostgreSQL target

    return connect(target.url)  # type: ignore[arg-type]


def _copy_rows(source: StoreTarget, target: StoreTarget) -> None:
    """commands, memory and spend, ids kept, in one transaction; rows already there are left alone."""
    rows = {table: _source_rows(source, table) for table in RAW_TABLES}
    conn = _connect(target)
    try:
        conn.execute("BEGIN")
        for table, columns in RAW_TABLES.items():
            sql = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
                   "ON CONFLICT DO NOTHING")
            for row in rows[table]:
                conn.execute(sql, row)
            if target.path is None and rows[table]:  # an identity keeps counting from the highest id copied
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()


# -- verification -----------------------------------------------------------------------------------


def _counts(target: StoreTarget) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{target.path}?mode=ro", uri=True) if target.path is not None else _connect(target)
    try:
        return {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) for table in COUNTED}
    finally:
        conn.close()


def verify(source: Any, dest: Any, source_target: StoreTarget, target: StoreTarget,
           runs: list[RunRecord]) -> dict[str, int]:
    """Read both stores back and compare (see the module); ConfigError naming the first difference.
    Returns the source's row counts."""
    where = f"{target.shown} does not read back as {source_target.shown}"
    for run in runs:
        ours, theirs = export_text(source, run.id), export_text(dest, run.id)
        if ours != theirs:
            line = next((i for i, (a, b) in enumerate(zip(ours, theirs), 1) if a != b), min(len(ours), len(theirs)) + 1)
            raise ConfigError(f"{where}: run {run.id}'s export differs at line {line} ({len(ours)} line(s) here, "
                              f"{len(theirs)} there)")
        intent: Intent | None = source.load_intent(run.id, run.iterations + 1)
        copied = dest.load_intent(run.id, run.iterations + 1)
        if (intent and intent.model_dump()) != (copied and copied.model_dump()):
            raise ConfigError(f"{where}: run {run.id}'s pending intent differs")
    for loop in source.memory_loops():
        if [m.model_dump() for m in source.memories(loop)] != [m.model_dump() for m in dest.memories(loop)]:
            raise ConfigError(f"{where}: loop {loop}'s memories differ")
    for group in ("day", "loop", "model"):
        if source.spend_by(group) != dest.spend_by(group):
            raise ConfigError(f"{where}: the ledger by {group} differs")
    if source.stored_daily_budget() != dest.stored_daily_budget():
        raise ConfigError(f"{where}: the daily budget differs")
    ours_n, theirs_n = _counts(source_target), _counts(target)
    for table in COUNTED:
        if ours_n[table] != theirs_n[table]:
            raise ConfigError(f"{where}: {table} has {ours_n[table]} row(s) here and {theirs_n[table]} there")
    return ours_n
