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
from loopterm.store.guard import OTHER_PATH, classify, one_line
from loopterm.store.prompts import encode_prompt
from loopterm.store.rows import args_hash
from loopterm.store.schema import ITERATIONS_SQL, SCHEMA_VERSION, V2_ADDITIONS_SQL, run_script
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


STEPS: dict[int, Callable[[Database], None]] = {1: _v1_to_v2}


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
    try:
        version = classify(db, path)
        if version >= SCHEMA_VERSION or version == 0:
            db.conn.rollback()
            return None
        backup = backup_path(path, version)
        _backup(path, backup)
        for step in range(version, SCHEMA_VERSION):
            STEPS[step](db)
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
        raise ConfigError(
            f"cannot upgrade {path} from schema {version} to {SCHEMA_VERSION} ({one_line(exc)}); "
            f"the file is unchanged; keep using an older loopterm with it or {OTHER_PATH}"
        ) from None
    return version, backup
