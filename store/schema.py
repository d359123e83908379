"""The database layout, written out as SQL.

The DDL is explicit SQL rather than sqlite-utils' `create_table` because the
store needs things that helper cannot express: AUTOINCREMENT ids, composite
foreign keys, a partial index for pending commands and triggers that make the
event log append-only. Row reads and writes go through sqlite-utils.
"""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database

from loopterm.core.errors import ConfigError

APP = "loopterm"
SCHEMA_VERSION = 4

# Columns that hold a JSON document (as TEXT); SQL NULL stands for Python None.
# iterations.prompt (sections by hash) and the state (table `states`) are encoded by the Store.
JSON_COLUMNS: dict[str, frozenset[str]] = {
    "runs": frozenset({"budget"}),
    "iterations": frozenset(
        {
            "decision",
            "tool_call",
            "tool_result",
            "gate_results",
            "invariant_status",
            "remediations",
        }
    ),
    "events": frozenset({"data"}),
    "tool_calls": frozenset({"args", "result"}),
    "intents": frozenset({"prompt", "decision"}),
    "commands": frozenset({"payload"}),
}

# The tables each schema version must have (an older file is migrated, see migrations.py).
TABLES_BY_VERSION: dict[int, tuple[str, ...]] = {
    1: ("meta", "runs", "iterations", "events", "tool_calls", "intents", "commands"),
    2: ("meta", "runs", "iterations", "events", "tool_calls", "intents", "commands", "states", "blobs"),
    3: (
        "meta", "runs", "iterations", "events", "tool_calls", "intents", "commands", "states", "blobs",
        "memory", "memory_fts", "spend",
    ),
}
TABLES_BY_VERSION[4] = TABLES_BY_VERSION[3]
TABLES = TABLES_BY_VERSION[SCHEMA_VERSION]

# One row per committed iteration. The state is not here but in `states` (a delta
# or a keyframe per iteration); `prompt` is JSON whose message contents are lists
# of section references (see prompts.py). Templated so migrations can build it
# under another name and rename it.
ITERATIONS_SQL = """
CREATE TABLE IF NOT EXISTS {name} (
    run_id           TEXT NOT NULL REFERENCES runs(id),
    n                INTEGER NOT NULL,
    started_at       REAL NOT NULL,
    ended_at         REAL NOT NULL,
    prompt           TEXT NOT NULL,
    raw_response     TEXT NOT NULL,
    decision         TEXT,
    repairs          INTEGER NOT NULL,
    tool_call        TEXT,
    tool_result      TEXT,
    gate_results     TEXT NOT NULL,
    invariant_status TEXT NOT NULL,
    remediations     TEXT NOT NULL,
    tokens_in        INTEGER NOT NULL,
    tokens_out       INTEGER NOT NULL,
    cost_usd         REAL NOT NULL,
    latency_ms       REAL NOT NULL,
    model            TEXT NOT NULL,
    PRIMARY KEY (run_id, n)
);
"""

# What schema 2 added to schema 1, apart from the rebuilt iterations table and
# the two new columns (runs.origin, tool_calls.args_hash).
V2_ADDITIONS_SQL = """
CREATE TABLE IF NOT EXISTS states (
    run_id   TEXT NOT NULL REFERENCES runs(id),
    n        INTEGER NOT NULL,
    keyframe INTEGER NOT NULL,
    body     TEXT NOT NULL,
    PRIMARY KEY (run_id, n)
);
CREATE INDEX IF NOT EXISTS states_keyframes ON states(run_id, n) WHERE keyframe = 1;

CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS tool_calls_by_args ON tool_calls(tool, args_hash);
"""

# What schema 3 added: long-term memory with its full-text index, and the spend ledger.
#
# memory_fts is an external-content FTS5 table (content=memory) kept in sync by
# triggers rather than a plain FTS5 table the Store maintains by hand: the text
# (a value may be a whole document) is stored once, and every write to `memory`,
# whichever code path or tool makes it, updates the index in the same
# transaction, so the two cannot drift apart. Porter stemming over unicode61
# (diacritics folded): "tests" finds "test", "cafe" finds "café".
#
# spend has a plain INTEGER PRIMARY KEY (no AUTOINCREMENT: rows are never
# deleted, and it saves a sqlite_sequence write on the per-iteration commit).
V3_ADDITIONS_SQL = """
CREATE TABLE IF NOT EXISTS memory (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    loop       TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('fact', 'decision', 'document')),
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    source_run TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    embedding  TEXT,
    UNIQUE (loop, key)
);
CREATE VIRTUAL TABLE IF NOT EXISTS memory_fts USING fts5(
    key, value, content = 'memory', content_rowid = 'id', tokenize = 'porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS memory_fts_insert AFTER INSERT ON memory
BEGIN
    INSERT INTO memory_fts (rowid, key, value) VALUES (new.id, new.key, new.value);
END;
CREATE TRIGGER IF NOT EXISTS memory_fts_delete AFTER DELETE ON memory
BEGIN
    INSERT INTO memory_fts (memory_fts, rowid, key, value) VALUES ('delete', old.id, old.key, old.value);
END;
CREATE TRIGGER IF NOT EXISTS memory_fts_update AFTER UPDATE OF key, value ON memory
BEGIN
    INSERT INTO memory_fts (memory_fts, rowid, key, value) VALUES ('delete', old.id, old.key, old.value);
    INSERT INTO memory_fts (rowid, key, value) VALUES (new.id, new.key, new.value);
END;

CREATE TABLE IF NOT EXISTS spend (
    id         INTEGER PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES runs(id),
    loop       TEXT NOT NULL,
    model      TEXT NOT NULL,
    day        TEXT NOT NULL,
    at         REAL NOT NULL,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost_usd   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_by_day ON spend(day);
"""

# What schema 4 added: columns only. How a decision was asked for (decision_mode) and the input tokens a
# provider's prompt cache served (tokens_cached, a part of tokens_in), per iteration and intent, in the
# runs' totals and in the ledger. Schema 4 is also the first whose states may be written as compact deltas
# and zlib-packed BLOB bodies (store/delta.py), which a loopterm reading schema 3 cannot decode: the
# version says so, and store/guard.py refuses a file newer than the code. Each column is added only
# where it is missing, so two processes creating one new file at once both succeed.
V4_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("iterations", "decision_mode", "TEXT NOT NULL DEFAULT 'text'"),
    ("iterations", "tokens_cached", "INTEGER NOT NULL DEFAULT 0"),
    ("intents", "decision_mode", "TEXT NOT NULL DEFAULT 'text'"),
    ("intents", "tokens_cached", "INTEGER NOT NULL DEFAULT 0"),
    ("runs", "tokens_cached", "INTEGER NOT NULL DEFAULT 0"),
    ("spend", "tokens_cached", "INTEGER NOT NULL DEFAULT 0"),
)


def stored_version(meta: dict[str, str], where: object, *, not_ours: str, damaged: str, restore: str) -> int:
    """The schema version a store's `meta` rows give (both backends); ConfigError, in one line, when they are not
    loopterm's, do not say a version, or say one newer than this code."""
    if meta.get("app") != APP:
        raise ConfigError(not_ours)
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise ConfigError(f"{damaged} (schema_version {meta.get('schema_version')!r}); {restore}") from None
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{where} was written by a newer loopterm (schema {version} > {SCHEMA_VERSION}); upgrade loopterm")
    return version


def add_v4_columns(db: Database) -> None:
    """Schema 4's columns, each where it is missing (inside the caller's transaction)."""
    for table, column, declaration in V4_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info([{table}])").fetchall()}
        if column not in present:
            db.execute(f"ALTER TABLE [{table}] ADD COLUMN [{column}] {declaration}")


_TABLES_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    id                 TEXT PRIMARY KEY,
    loop               TEXT NOT NULL,
    loop_ref           TEXT NOT NULL,
    goal               TEXT NOT NULL,
    spec_hash          TEXT NOT NULL,
    model              TEXT NOT NULL,
    status             TEXT NOT NULL,
    workspace          TEXT NOT NULL,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL,
    parent_run         TEXT REFERENCES runs(id),
    fork_iteration     INTEGER,
    max_iterations     INTEGER NOT NULL,
    budget             TEXT NOT NULL,
    iterations         INTEGER NOT NULL,
    tokens_in          INTEGER NOT NULL,
    tokens_out         INTEGER NOT NULL,
    cost_usd           REAL NOT NULL,
    elapsed_s          REAL NOT NULL,
    termination_reason TEXT,
    message            TEXT,
    origin             TEXT NOT NULL DEFAULT 'run'
);
CREATE INDEX IF NOT EXISTS runs_by_parent ON runs(parent_run);

{iterations}
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL REFERENCES runs(id),
    iteration INTEGER,
    ts        REAL NOT NULL,
    kind      TEXT NOT NULL,
    data      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id, id);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE IF NOT EXISTS tool_calls (
    key         TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(id),
    iteration   INTEGER NOT NULL,
    tool        TEXT NOT NULL,
    args        TEXT NOT NULL,
    status      TEXT NOT NULL,
    result      TEXT,
    started_at  REAL NOT NULL,
    finished_at REAL,
    args_hash   TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS intents (
    run_id       TEXT NOT NULL REFERENCES runs(id),
    n            INTEGER NOT NULL,
    prompt       TEXT NOT NULL,
    raw_response TEXT NOT NULL,
    decision     TEXT NOT NULL,
    repairs      INTEGER NOT NULL,
    tokens_in    INTEGER NOT NULL,
    tokens_out   INTEGER NOT NULL,
    cost_usd     REAL NOT NULL,
    latency_ms   REAL NOT NULL,
    model        TEXT NOT NULL,
    started_at   REAL NOT NULL,
    PRIMARY KEY (run_id, n)
);

CREATE TABLE IF NOT EXISTS commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL REFERENCES runs(id),
    ts          REAL NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    consumed_at REAL
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(run_id, id) WHERE consumed_at IS NULL;
"""


SCHEMA_SQL = (
    _TABLES_SQL.replace("{iterations}", ITERATIONS_SQL.format(name="iterations")) + V2_ADDITIONS_SQL + V3_ADDITIONS_SQL
)


def check_fts5(db: Database) -> None:
    """Refuse, in one line, a Python whose SQLite lacks FTS5 (long-term memory needs it)."""
    try:
        db.execute("CREATE VIRTUAL TABLE temp.loopterm_fts5_probe USING fts5(x)")
        db.execute("DROP TABLE temp.loopterm_fts5_probe")
    except sqlite3.OperationalError as exc:
        raise ConfigError(
            f"this Python's SQLite {sqlite3.sqlite_version} has no FTS5 ({exc}); loopterm's memory needs it: "
            "use a Python built with a standard SQLite (FTS5 is in the usual builds)"
        ) from None


def statements(script: str) -> list[str]:
    """Split a script into complete statements (a trigger body's `;` does not end one)."""
    done: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            done.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:60]!r}")
    return done


def run_script(db: Database, script: str) -> None:
    """Execute each statement inside the caller's transaction.

    Unlike `executescript`, which commits whatever transaction is open first,
    this keeps DDL and the rest of a migration in one transaction.
    """
    for statement in statements(script):
        db.execute(statement)


def create_schema(db: Database) -> None:
    """Create every table, index and trigger, and stamp the file as ours.

    Idempotent (IF NOT EXISTS / INSERT OR IGNORE), so two processes creating
    the same new file at once both end up with one valid schema. The caller
    holds the write transaction.
    """
    check_fts5(db)
    run_script(db, SCHEMA_SQL)
    add_v4_columns(db)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('app', ?)", [APP])
    db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        [str(SCHEMA_VERSION)],
    )
