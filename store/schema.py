"""The database layout, written out as SQL.

The DDL is explicit SQL rather than sqlite-utils' `create_table` because the
store needs things that helper cannot express: AUTOINCREMENT ids, composite
foreign keys, a partial index for pending commands and triggers that make the
event log append-only. Row reads and writes go through sqlite-utils.
"""

from __future__ import annotations

from sqlite_utils import Database

APP = "loopterm"
SCHEMA_VERSION = 1

# Columns that hold a JSON document (as TEXT); SQL NULL stands for Python None.
JSON_COLUMNS: dict[str, frozenset[str]] = {
    "runs": frozenset({"budget"}),
    "iterations": frozenset(
        {
            "prompt",
            "decision",
            "tool_call",
            "tool_result",
            "gate_results",
            "invariant_status",
            "remediations",
            "state",
        }
    ),
    "events": frozenset({"data"}),
    "tool_calls": frozenset({"args", "result"}),
    "intents": frozenset({"prompt", "decision"}),
    "commands": frozenset({"payload"}),
}

TABLES = ("meta", "runs", "iterations", "events", "tool_calls", "intents", "commands")

SCHEMA_SQL = """
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
    message            TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_parent ON runs(parent_run);

CREATE TABLE IF NOT EXISTS iterations (
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
    state            TEXT NOT NULL,
    PRIMARY KEY (run_id, n)
);

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
    finished_at REAL
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


def create_schema(db: Database) -> None:
    """Create every table, index and trigger, and stamp the file as ours.

    Idempotent (IF NOT EXISTS / INSERT OR IGNORE), so two processes creating
    the same new file at once both end up with one valid schema. The caller
    holds the write transaction.
    """
    db.executescript(SCHEMA_SQL)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('app', ?)", [APP])
    db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        [str(SCHEMA_VERSION)],
    )
