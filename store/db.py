"""`Store`: the SQLite journal of runs, and the reads the CLI and TUI need.

One `Store` owns one connection. Every public method commits before it
returns, because the engine relies on each iteration being durable before
the next starts, and a `loopterm watch` in another process must see it.
Writes start with BEGIN IMMEDIATE so two processes queue on the busy timeout
instead of failing with "database is locked" when a read upgrades to a write.
A lock serialises threads that share one Store (the TUI reads from workers).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlite_utils import Database

from loopterm.core.errors import ConfigError
from loopterm.core.records import (
    CommandRecord,
    EventRecord,
    Intent,
    IterationRecord,
    RunRecord,
    ToolCallRecord,
)
from loopterm.store.guard import OTHER_PATH, check_file, classify, one_line
from loopterm.store.rows import encode, from_row, to_row
from loopterm.store.schema import create_schema

BUSY_TIMEOUT_MS = 10_000
SHOWN_MATCHES = 5


class DuplicateIterationError(ValueError):
    """An iteration (run_id, n) was committed twice: the first is kept, the second refused."""


class Store:
    """The loopterm database: implements core's `Journal` plus the query API."""

    def __init__(self, db: Database, path: Path, clock: Callable[[], float]) -> None:
        """Use `Store.open`; this only wires an already checked connection."""
        self._db = db
        self._path = path
        self._clock = clock
        self._lock = threading.RLock()

    # -- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, clock: Callable[[], float] = time.time) -> Self:
        """Open (or, with create=True, create) the database at `path`.

        Refuses with ConfigError, leaving the file untouched, anything that is
        not a loopterm database this code can read.
        """
        path = Path(path).expanduser()
        has_schema = check_file(path, create=create)
        try:
            if not has_schema:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {one_line(exc.strerror or exc)}; check its permissions or {OTHER_PATH}") from None
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}") from None
        try:
            db = Database(conn, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA foreign_keys = ON")
            db.enable_wal()
            if not has_schema:
                cls._init_schema(db, path)
        except ConfigError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(f"cannot open {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}") from None
        return cls(db, path, clock)

    @staticmethod
    def _init_schema(db: Database, path: Path) -> None:
        """Create the schema, re-checking under the write lock in case another process got there first."""
        db.execute("BEGIN IMMEDIATE")
        try:
            if not classify(db, path):
                create_schema(db)
        except BaseException:
            db.rollback()
            raise
        db.commit()

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction: all of it commits, or none of it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.rollback()
                raise
            try:
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    def _rows(self, table: str, where: str, args: list[Any], order_by: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Fetch rows eagerly, so no read cursor outlives the lock."""
        with self._lock:
            return list(self._db.table(table).rows_where(where, args, order_by=order_by, limit=limit))

    # -- runs ------------------------------------------------------------------

    def create_run(self, run: RunRecord) -> None:
        with self._write() as db:
            db.table("runs").insert(to_row("runs", run))

    def get_run(self, run_id: str) -> RunRecord:
        """The run with exactly this id; KeyError if there is none (use resolve_run for user input)."""
        rows = self._rows("runs", "id = ?", [run_id])
        if not rows:
            raise KeyError(f"no run {run_id!r}")
        return from_row("runs", RunRecord, rows[0])

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self._write():
            self._update_run(run_id, fields)

    def _update_run(self, run_id: str, fields: dict[str, Any]) -> None:
        """Validate the merged run before writing, so a bad field never reaches the file."""
        if not fields:
            return
        unknown = sorted(set(fields) - set(RunRecord.model_fields))
        if unknown or "id" in fields:
            raise ValueError(f"cannot update run field(s): {', '.join(unknown or ['id'])}")
        current = self.get_run(run_id)
        merged = RunRecord.model_validate({**current.model_dump(), **fields})
        changed = {name: getattr(merged, name) for name in fields}
        self._db.table("runs").update(run_id, encode("runs", changed))

    def list_runs(self) -> list[RunRecord]:
        """Every run, in creation order (forks after their parents)."""
        with self._lock:
            rows = list(self._db.table("runs").rows_where(order_by="rowid"))
        return [from_row("runs", RunRecord, row) for row in rows]

    def resolve_run(self, prefix: str) -> RunRecord:
        """The run whose id is `prefix` or, failing that, the only one starting with it."""
        if not prefix:
            raise ConfigError("no run id given; `loopterm runs` lists them")
        exact = self._rows("runs", "id = ?", [prefix])
        if exact:
            return from_row("runs", RunRecord, exact[0])
        rows = self._rows("runs", "substr(id, 1, ?) = ?", [len(prefix), prefix], order_by="rowid")
        if not rows:
            raise ConfigError(f"no run matches {prefix!r}; `loopterm runs` lists them")
        if len(rows) > 1:
            shown = [_short(row["id"], len(prefix)) for row in rows[:SHOWN_MATCHES]]
            more = f" and {len(rows) - SHOWN_MATCHES} more" if len(rows) > SHOWN_MATCHES else ""
            raise ConfigError(f"run id {prefix!r} is ambiguous: matches {', '.join(shown)}{more}; give more characters")
        return from_row("runs", RunRecord, rows[0])

    # -- iterations ------------------------------------------------------------

    def commit_iteration(self, record: IterationRecord, run_fields: dict[str, Any]) -> None:
        """Atomically: insert the iteration, update the run's totals, drop the intent for it."""
        with self._write() as db:
            if self._rows("iterations", "run_id = ? AND n = ?", [record.run_id, record.n]):
                raise DuplicateIterationError(f"iteration {record.n} of run {record.run_id} is already committed")
            db.table("iterations").insert(to_row("iterations", record))
            self._update_run(record.run_id, run_fields)
            db.table("intents").delete_where("run_id = ? AND n = ?", [record.run_id, record.n])

    def get_iteration(self, run_id: str, n: int) -> IterationRecord | None:
        rows = self._rows("iterations", "run_id = ? AND n = ?", [run_id, n])
        return from_row("iterations", IterationRecord, rows[0]) if rows else None

    def last_iterations(self, run_id: str, k: int) -> list[IterationRecord]:
        """The last k committed iterations, oldest first."""
        if k <= 0:
            return []
        rows = self._rows("iterations", "run_id = ?", [run_id], order_by="n DESC", limit=k)
        return [from_row("iterations", IterationRecord, row) for row in reversed(rows)]

    def iterations(self, run_id: str) -> list[IterationRecord]:
        """Every committed iteration of this run (not its parent's), by n."""
        rows = self._rows("iterations", "run_id = ?", [run_id], order_by="n")
        return [from_row("iterations", IterationRecord, row) for row in rows]

    # -- events ----------------------------------------------------------------

    def append_event(self, run_id: str, kind: str, data: dict[str, Any], iteration: int | None = None) -> EventRecord:
        event = EventRecord(run_id=run_id, iteration=iteration, ts=self._clock(), kind=kind, data=data)
        with self._write() as db:
            table = db.table("events")
            table.insert(to_row("events", event))
            event.id = table.last_rowid
        return event

    def events(self, run_id: str, after_id: int = 0) -> list[EventRecord]:
        """Events of a run with id > after_id, oldest first (poll with the last id seen)."""
        rows = self._rows("events", "run_id = ? AND id > ?", [run_id, after_id], order_by="id")
        return [from_row("events", EventRecord, row) for row in rows]

    # -- intents ---------------------------------------------------------------

    def save_intent(self, intent: Intent) -> None:
        """Save (or replace) the reply for (run_id, n) before its tool runs."""
        with self._write() as db:
            db.table("intents").insert(to_row("intents", intent), replace=True)

    def load_intent(self, run_id: str, n: int) -> Intent | None:
        rows = self._rows("intents", "run_id = ? AND n = ?", [run_id, n])
        return from_row("intents", Intent, rows[0]) if rows else None

    # -- idempotency journal ---------------------------------------------------

    def tool_call(self, key: str) -> ToolCallRecord | None:
        rows = self._rows("tool_calls", "key = ?", [key])
        return from_row("tool_calls", ToolCallRecord, rows[0]) if rows else None

    def tool_call_started(self, record: ToolCallRecord) -> None:
        """Record a call about to run; restarting an interrupted one is allowed, redoing a finished one is not."""
        with self._write() as db:
            existing = self._rows("tool_calls", "key = ?", [record.key])
            if existing and existing[0]["status"] == "done":
                raise ValueError(f"tool call {record.key} already finished; reuse its result instead of running it again")
            db.table("tool_calls").insert(to_row("tool_calls", record), replace=True)

    def tool_call_finished(self, key: str, result: dict[str, Any], finished_at: float) -> None:
        with self._write() as db:
            if not self._rows("tool_calls", "key = ?", [key]):
                raise KeyError(f"no tool call {key!r} was started")
            db.table("tool_calls").update(key, encode("tool_calls", {"status": "done", "result": result, "finished_at": finished_at}))

    # -- control channel -------------------------------------------------------

    def add_command(self, run_id: str, kind: str, payload: dict[str, Any]) -> CommandRecord:
        """Queue a command for the process running `run_id` (pause, stop, ...)."""
        command = CommandRecord(run_id=run_id, ts=self._clock(), kind=kind, payload=payload)
        with self._write() as db:
            table = db.table("commands")
            table.insert(to_row("commands", command))
            command.id = table.last_rowid
        return command

    def pending_commands(self, run_id: str) -> list[CommandRecord]:
        """Unconsumed commands for the run, in the order they were sent."""
        rows = self._rows("commands", "run_id = ? AND consumed_at IS NULL", [run_id], order_by="id")
        return [from_row("commands", CommandRecord, row) for row in rows]

    def consume_command(self, command_id: int) -> None:
        """Mark a command handled; consuming it again keeps the first time."""
        with self._write() as db:
            if not self._rows("commands", "id = ?", [command_id]):
                raise KeyError(f"no command {command_id}")
            db.execute("UPDATE commands SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL", [self._clock(), command_id])


def _short(run_id: str, shown: int) -> str:
    """Enough of an id to tell it apart in a one-line message."""
    keep = max(shown + 4, 8)
    return run_id if len(run_id) <= keep else run_id[:keep] + ".."
