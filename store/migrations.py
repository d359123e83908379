"""Upgrading an older database file to SCHEMA_VERSION.

`upgrade` runs under the write lock: it re-reads the version (another process
may have upgraded the file meanwhile), copies the file to `<name>.v<N>.bak`
with the SQLite backup API (a consistent copy: no one can write while we hold
the lock), then applies every step v(n) -> v(n+1) and stamps the new version,
all in one transaction. Any failure rolls the transaction back, so the file is
left as it was, removes the backup and raises a one-line ConfigError.

The connection must have foreign keys off (the SQLite default) because a step
may rebuild a table; the result is checked with `PRAGMA foreign_key_check`
before committing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from loopterm.core.errors import ConfigError
from loopterm.core.text import one_line
from loopterm.store.guard import OTHER_PATH, classify
from loopterm.store.prompts import encode_prompt
from loopterm.store.rows import args_hash
from loopterm.store.schema import (
    ITERATIONS_SQL, SCHEMA_VERSION, V2_ADDITIONS_SQL, V3_ADDITIONS_SQL, add_v4_columns, check_fts5, run_script,
)
from loopterm.store.states import Head, put_state

PAGE = 256

V1_ITERATION_COLUMNS = (
    "run_id", "n", "started_at", "ended_at", "prompt", "raw_response", "decision", "repairs", "tool_call",
    "tool_result", "gate_results", "invariant_status", "remediations", "tokens_in", "tokens_out", "cost_usd",
    "latency_ms", "model",
)  # every v1 column but `state`


def _v1_to_v2(db: Database) -> None:
    """runs.origin; tool_calls.args_hash; iterations rebuilt with states as deltas and prompts by section."""
    db.execute("ALTER TABLE runs ADD COLUMN origin TEXT NOT NULL DEFAULT 'run'")
    db.execute("ALTER TABLE tool_calls ADD COLUMN args_hash TEXT NOT NULL DEFAULT ''")
    for key, args in db.execute("SELECT key, args FROM tool_calls").fetchall():
        db.execute("UPDATE tool_calls SET args_hash = ? WHERE key = ?", [args_hash(json.loads(args)), key])
    run_script(db, V2_ADDITIONS_SQL)
    run_script(db, ITERATIONS_SQL.format(name="iterations_v2"))

    def query(sql: str, params: Any) -> list[tuple[Any, ...]]:
        return db.execute(sql, params).fetchall()

    def executemany(sql: str, rows: list[tuple[Any, ...]]) -> None:
        db.conn.executemany(sql, rows)

    columns = ", ".join(V1_ITERATION_COLUMNS)
    marks = ", ".join("?" * len(V1_ITERATION_COLUMNS))
    prompt_at = V1_ITERATION_COLUMNS.index("prompt")
    for (run_id,) in db.execute("SELECT id FROM runs ORDER BY rowid").fetchall():
        heads: dict[str, Head] = {}
        after = 0
        while True:
            rows = db.execute(
                f"SELECT {columns}, state FROM iterations WHERE run_id = ? AND n > ? ORDER BY n LIMIT ?", [run_id, after, PAGE]
            ).fetchall()
            for row in rows:
                values = list(row[:-1])
                new_blobs: dict[str, str] = {}
                values[prompt_at] = json.dumps(encode_prompt(json.loads(values[prompt_at]), new_blobs), ensure_ascii=False)
                if new_blobs:
                    executemany("INSERT OR IGNORE INTO blobs (hash, body) VALUES (?, ?)", list(new_blobs.items()))
                db.execute(f"INSERT INTO iterations_v2 ({columns}) VALUES ({marks})", values)
                n = row[1]
                # Within the run's own rows only: v1 had no forks, so nothing is inherited.
                heads[run_id] = put_state(query, executemany, heads, run_id, n, json.loads(row[-1]), lambda: None)
            if len(rows) < PAGE:
                break
            after = rows[-1][1]
    db.execute("DROP TABLE iterations")
    db.execute("ALTER TABLE iterations_v2 RENAME TO iterations")


# The ledger as schema 3 would have written it for the runs already in the file: per run,
# its own iterations by (local day of ended_at, model), then whatever of the run's totals
# no iteration holds (replies paid for but never committed), dated at the run's last
# update with the run's model. So after the upgrade, too, the ledger sums to the runs'
# totals. A schema-2 file cannot tell an imported run from a local one (both say origin
# 'run'), so runs imported before the upgrade are counted as spent here.
_V3_BACKFILL_SQL = (
    """
INSERT INTO spend (run_id, loop, model, day, at, tokens_in, tokens_out, cost_usd)
SELECT iterations.run_id, runs.loop, iterations.model, date(iterations.ended_at, 'unixepoch', 'localtime'),
       max(iterations.ended_at), sum(iterations.tokens_in), sum(iterations.tokens_out), sum(iterations.cost_usd)
FROM iterations JOIN runs ON runs.id = iterations.run_id
GROUP BY iterations.run_id, date(iterations.ended_at, 'unixepoch', 'localtime'), iterations.model
ORDER BY min(iterations.ended_at)
""",
    """
INSERT INTO spend (run_id, loop, model, day, at, tokens_in, tokens_out, cost_usd)
SELECT runs.id, runs.loop, runs.model, date(runs.updated_at, 'unixepoch', 'localtime'), runs.updated_at,
       runs.tokens_in - coalesce(own.tokens_in, 0), runs.tokens_out - coalesce(own.tokens_out, 0),
       runs.cost_usd - coalesce(own.cost_usd, 0)
FROM runs LEFT JOIN (
    SELECT run_id, sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out, sum(cost_usd) AS cost_usd
    FROM iterations GROUP BY run_id
) AS own ON own.run_id = runs.id
WHERE runs.tokens_in != coalesce(own.tokens_in, 0) OR runs.tokens_out != coalesce(own.tokens_out, 0)
   OR abs(runs.cost_usd - coalesce(own.cost_usd, 0)) > 1e-12
ORDER BY runs.rowid
""",
)


def _v2_to_v3(db: Database) -> None:
    """memory + memory_fts (long-term memory) and the spend ledger, backfilled from the runs' totals."""
    check_fts5(db)
    run_script(db, V3_ADDITIONS_SQL)
    for statement in _V3_BACKFILL_SQL:
        db.execute(statement)


def _v3_to_v4(db: Database) -> None:
    """decision_mode and tokens_cached: every earlier decision was asked for as JSON text ('text'), and
    no cached tokens were counted (0), which is what the columns' defaults say."""
    add_v4_columns(db)


STEPS: dict[int, Callable[[Database], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


def backup_path(path: Path, version: int) -> Path:
    """`<name>.v<N>.bak` beside the file, or `<name>.v<N>.<k>.bak` if that is taken (never overwrite a backup)."""
    candidate = path.with_name(f"{path.name}.v{version}.bak")
    k = 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.v{version}.{k}.bak")
        k += 1
    return candidate


def _backup(path: Path, target: Path) -> None:
    """Copy the database with the backup API through a second connection (ours holds the write lock)."""
    source = sqlite3.connect(path, timeout=10)
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()


def upgrade(db: Database, path: Path) -> tuple[int, Path] | None:
    """Migrate the file to SCHEMA_VERSION; (the version it had, the backup) or None if it was current."""
    db.execute("BEGIN IMMEDIATE")
    backup: Path | None = None
    version = 0
    failing: int | None = None  # the step v(n) -> v(n+1) under way, named if it fails
    try:
        version = classify(db, path)
        if version >= SCHEMA_VERSION or version == 0:
            db.conn.rollback()
            return None
        backup = backup_path(path, version)
        _backup(path, backup)
        for failing in range(version, SCHEMA_VERSION):
            STEPS[failing](db)
        failing = None
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_backup', ?)", [str(backup)])
        broken = db.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise sqlite3.IntegrityError(f"foreign key check failed in table {broken[0][0]}")
        db.conn.commit()
    except BaseException as exc:
        db.conn.rollback()
        if backup is not None:
            backup.unlink(missing_ok=True)
        if isinstance(exc, ConfigError) or not isinstance(exc, Exception):
            raise
        failed = f"schema {failing} to {failing + 1}" if failing is not None else f"schema {version} to {SCHEMA_VERSION}"
        raise ConfigError(
            f"cannot upgrade {path} from {failed} ({one_line(exc)}); "
            f"the file is unchanged; keep using an older loopterm with it or {OTHER_PATH}"
        ) from None
    return version, backup
