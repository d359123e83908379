"""`Store`: the journal of runs, and the reads the CLI and TUI need, on SQLite or PostgreSQL.

One `Store` owns one connection. Every public method commits before it
returns, because the engine relies on each iteration being durable before
the next starts, and a `loopterm watch` in another process must see it.
Writes start with BEGIN IMMEDIATE so two processes queue on the busy timeout
instead of failing with "database is locked" when a read upgrades to a write.
A lock serialises threads that share one Store (the TUI reads from workers).

What lives where: each iteration's state is a delta against the one before, with keyframes (states.py,
delta.py); prompts by section (prompts.py); intents and the tool-call journal (calls.py); reads of
iterations and lineage (reads.py); long-term memory (memory.py); the spend ledger, written in the
transaction that changes a run's totals (ledger.py).

PostgreSQL (`Store.open("postgresql://...")`): the same code over store/pg.py's connection, which quacks like
sqlite3's and holds every dialect difference; the schema is pg_schema.py's. Transactions run at READ
COMMITTED with the same all-or-nothing `_write()`; notifications and per-run locks are coordination.py's;
copying a whole store between backends is copy.py's.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import TypeAdapter
from sqlite_utils import Database

from loopterm.core.errors import ConfigError
from loopterm.core.records import CommandRecord, IterationRecord, RunRecord
from loopterm.core.runlog import EventRecord, RunEvent, from_stored, to_stored
import loopterm.store.ledger as ledger
import loopterm.store.policies as policies
import loopterm.store.prune as pruning
import loopterm.store.reservations as reservations
import loopterm.store.transfer as transfer
from loopterm.store.calls import CallJournal
from loopterm.store.ledger import LedgerAccess
from loopterm.store.memory import MemoryAccess
from loopterm.store.coordination import Coordination
from loopterm.store.copy import CopyResult, copy_store
from loopterm.store.reads import LineageReads
from loopterm.core.text import one_line
from loopterm.store.known import Known
from loopterm.store.guard import OTHER_PATH, check_file, classify, is_busy, open_failure, when_unlocked
from loopterm.store.migrations import upgrade
from loopterm.store.pg import is_url, log_lock_key
from loopterm.store.prompts import encode_prompt
from loopterm.store.rows import dump_json, encode, from_row, insert_sql, to_row, update_run_sql
from loopterm.store.schema import SCHEMA_VERSION, create_schema
from loopterm.store.states import LINEAGE_SQL, DamagedStateError, Head, load_head, owner, put_state, segments
from loopterm.store.delta import loads
from loopterm.store.footprint import Meter, RunSize

BUSY_TIMEOUT_MS = 10_000  # SQLite's own wait for another connection's lock, per attempt
# A write waits this long in all for another process's write lock (a big import, a person's sqlite3 shell)
# before it fails: a supervisor outlasts a slow neighbour rather than losing its run after 10 s.
LOCK_WAIT_S = 120.0
SHOWN_MATCHES = 5
HEADS_KEPT = 8  # runs whose last committed state is kept in memory for the next delta


_OPEN: dict[Path, int] = {}  # database files this process has open, with how many connections each


class DuplicateIterationError(ValueError):
    """An iteration (run_id, n) was committed twice: the first is kept, the second refused."""


class Store(LineageReads, CallJournal, Coordination, MemoryAccess, LedgerAccess):
    """The loopterm database: implements core's `Journal` plus the query API.

    On SQLite (a path) or PostgreSQL (a postgresql:// URL): one body of store logic over a connection that
    is sqlite3's own or store/pg.py's, which quacks like it.
    """

    def __init__(self, conn: Any, path: Path | str, clock: Callable[[], float], *, db: Database | None = None,
                 url: str | None = None) -> None:
        """Use `Store.open`; this only wires an already checked connection."""
        self._db = db  # sqlite-utils' view of a SQLite connection (None on PostgreSQL)
        self._url = url  # the PostgreSQL URL (None on SQLite); never shown: `location` is redacted
        self._path = path
        self._clock = clock
        self._lock = threading.RLock()
        self._heads: OrderedDict[str, Head] = OrderedDict()
        # Runs whose last state is kept for the next delta; a batch of K concurrent runs raises it to K.
        self.heads_kept = HEADS_KEPT
        self._conn: Any = conn  # sqlite3.Connection, or store/pg.py's PgConnection
        self._state_body: Callable[[str | bytes], Any] | None = None
        self._init_coordination()  # notifications and run locks: see coordination.py
        if url is not None:
            from loopterm.store.pg import state_body

            self._state_body = state_body
        self._lineages: dict[str, list[tuple[str, str | None, int | None]]] = {}  # see _lineage
        self._known = Known()  # what commits may skip: see known.py
        # Runs found with no pending command, and the file's data_version then: see pending_commands.
        self._no_commands: dict[str, int] = {}
        self._init_queue()  # writes the engine chose not to wait for: see calls.py
        self.migrated_from: int | None = None  # the schema version this open upgraded the file from
        self.backup_path: Path | None = None  # the copy of the file made before that upgrade
        self._key: Path | None = None  # its entry in _OPEN
        self.lock_wait_s = LOCK_WAIT_S
        self.lock_retries = 0  # writes that found the file still locked after the busy timeout, and tried again

    # -- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, clock: Callable[[], float] = time.time) -> Self:
        """Open (or, with create=True, create) the store at `path`: a SQLite file, or a PostgreSQL database
        named by a postgresql:// (or postgres://) URL.

        Refuses with ConfigError, leaving the file untouched, anything that is
        not a loopterm database this code can read.
        """
        if is_url(path):
            return cls._open_postgres(path, create=create, clock=clock)
        path = Path(path).expanduser()
        key = path.resolve()
        # Already open in this process: its header was checked and it was migrated then. Reading the file again
        # (and closing it) would drop the POSIX locks the open connection holds on it, and another process could
        # then take the database for its last user and delete the write-ahead log in use.
        version = SCHEMA_VERSION if _OPEN.get(key) else check_file(path, create=create)
        try:
            if not version:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {one_line(exc.strerror or exc)}; check its permissions or {OTHER_PATH}") from None
        except sqlite3.Error as exc:
            raise open_failure(exc, path) from None
        migrated: tuple[int, Path] | None = None
        try:
            db = Database(conn, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if version and version < SCHEMA_VERSION:
                # Before foreign keys (a step may rebuild a table) and before any WAL switch,
                # so a failed upgrade leaves the file byte for byte as it was.
                migrated = upgrade(db, path)
            db.execute("PRAGMA foreign_keys = ON")
            when_unlocked(db.enable_wal, BUSY_TIMEOUT_MS / 1000)  # SQLite does not wait on its busy handler for a journal mode switch
            db.execute("PRAGMA synchronous = FULL")  # stated, not left to the build: see _write
            if not version:
                cls._init_schema(db, path)
        except ConfigError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise open_failure(exc, path) from None
        store = cls(conn, path, clock, db=db)
        _OPEN[key] = _OPEN.get(key, 0) + 1
        store._key = key
        if migrated is not None:
            store.migrated_from, store.backup_path = migrated
        return store

    @classmethod
    def _open_postgres(cls, url: str, *, create: bool, clock: Callable[[], float]) -> Self:
        """Connect (one-line ConfigError without the password if that fails), check the database holds a
        loopterm store this code can use, creating it in an empty one if `create`."""
        from loopterm.store.pg import connect, redact
        from loopterm.store.pg_schema import prepare

        location = redact(url)
        conn = connect(url)
        try:
            prepare(conn, location, create=create)
        except BaseException:
            conn.close()
            raise
        return cls(conn, location, clock, url=url)

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
    def path(self) -> Path | str:
        """The SQLite file, or the PostgreSQL URL with its password replaced by ***."""
        return self._path

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return "sqlite" if self._url is None else "postgresql"

    @property
    def location(self) -> str:
        """Where the store is, as shown to a person: the file's path, or the URL without its password."""
        return str(self._path)

    def close(self) -> None:
        """Write anything queued, then close the connection; safe to call twice."""
        with self._lock:
            self._stop_coordination()
            try:
                if not getattr(self._conn, "closed", False):
                    self.flush()
            except sqlite3.ProgrammingError:  # already closed
                pass
            except Exception:
                if self._url is not None:  # PostgreSQL: the connection is gone or going; close it all the same
                    self._conn.close()
                raise
            self._conn.close()
            if self._key is not None:
                _OPEN[self._key] -= 1
                if not _OPEN[self._key]:
                    del _OPEN[self._key]
                self._key = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _write(self, *, power_safe: bool = True) -> Iterator[Any]:
        """One write transaction: all of it commits, or none of it. Queued writes go first.

        power_safe=False commits with synchronous=NORMAL: in WAL mode that survives
        the process dying (SIGKILL, OOM) but not the machine losing power, and
        costs no fsync; the next power-safe commit makes it power-safe too.
        """
        with self._lock:
            conn = self._conn
            if not power_safe:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                with self._transaction(conn):
                    yield conn
            finally:
                if not power_safe:
                    conn.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        with self._lock:
            self._begin(conn)
            self._absent_call = None  # what it writes (an import, a prune) may add any call
            queued = self._queued()
            try:
                self._write_queued()
                yield
            except BaseException:
                conn.rollback()
                self._requeue(queued)  # not written: still queued
                self._lineages.clear()  # it may hold a run this transaction created (an import)
                raise
            try:
                conn.commit()
            except BaseException:
                conn.rollback()
                self._requeue(queued)
                raise

    def _begin(self, conn: Any) -> None:
        """BEGIN IMMEDIATE, trying again while another process keeps the write lock, up to lock_wait_s in all.

        Each attempt already waits BUSY_TIMEOUT_MS inside SQLite. Nothing has been read or written yet,
        so trying again is safe; after lock_wait_s the busy error goes up (the CLI says what to do).
        """
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise
                self.lock_retries += 1

    def _insert_row(self, table: str, row: dict[str, Any], *, replace: bool = False) -> int:
        """INSERT one encoded row with plain SQL (sqlite-utils' insert introspects the table on every call,
        which was most of an iteration's store time); returns its rowid."""
        cursor = self._conn.execute(insert_sql(table, replace, tuple(row)), list(row.values()))
        return int(cursor.lastrowid or 0)

    def _rows(self, table: str, where: str, args: list[Any], order_by: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Fetch rows eagerly, so no read cursor outlives the lock."""
        sql = f"SELECT * FROM [{table}] WHERE {where}"
        if order_by:
            sql += f" ORDER BY {order_by}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._dict_rows(sql, args)

    def _query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Run one statement and fetch every row under the lock (inside a write, part of it)."""
        with self._lock:
            return self._conn.execute(sql, list(params)).fetchall()

    def _dict_rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._conn.execute(sql, list(params))
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def _executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            self._conn.executemany(sql, rows)

    # -- runs ------------------------------------------------------------------

    def create_run(self, run: RunRecord, events: Sequence[tuple[str, RunEvent, int | None]] = ()) -> None:
        """Record a new run, and `events` (run id, event, iteration: a branch's Forked, its parent's Branched)
        with it: all or nothing. Under a daily budget, checked against it and what active runs hold in this
        same transaction, so two processes or hosts cannot both pass it (store/reservations.py)."""
        with self._write():
            daily = self.daily_budget()
            if daily is not None:
                if self._url is not None:
                    self._conn.execute("SELECT pg_advisory_xact_lock(?)", [reservations.DAILY_LOCK])
                reservations.check_new_run(self._conn, run, daily)
            self._insert_row("runs", to_row("runs", run))
            for run_id, event, iteration in events:
                self._insert_event(run_id, event, iteration)

    def held_usd(self, exclude: str | None = None) -> float:
        """What active runs (all but `exclude`) may still spend under their USD budgets (reservations.py)."""
        with self._lock:
            return reservations.held(self._conn, exclude)[0]

    def get_run(self, run_id: str) -> RunRecord:
        """The run with exactly this id; KeyError if there is none (use resolve_run for user input)."""
        rows = self._rows("runs", "id = ?", [run_id])
        if not rows:
            raise KeyError(f"no run {run_id!r}")
        return from_row("runs", RunRecord, rows[0])

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Change fields of a run; a change of its totals is ledgered (model: the run's; day: of updated_at or now)."""
        with self._write():
            self._update_run(run_id, fields)

    def _update_run(self, run_id: str, fields: dict[str, Any], *, spend_model: str | None = None,
                    spend_at: float | None = None) -> None:
        """Validate the merged run before writing, so a bad field never reaches the file.

        A change of tokens_in / tokens_out / cost_usd first goes to the spend ledger, in the
        same transaction (spend_model: the model to charge, default the run's; spend_at: when).
        """
        if not fields:
            return
        unknown = sorted(fields.keys() - _RUN_FIELDS)
        if unknown or "id" in fields:
            raise ValueError(f"cannot update run field(s): {', '.join(unknown or ['id'])}")
        changed = {name: _run_field(name).validate_python(value) for name, value in fields.items()}
        if not changed.keys().isdisjoint(ledger.TOTAL_FIELDS):
            at = spend_at if spend_at is not None else changed.get("updated_at") or self._clock()
            ledger.record_change(self._conn, run_id, changed, model=spend_model, at=at)
        row = encode("runs", changed)
        cursor = self._conn.execute(update_run_sql(tuple(row)), [*row.values(), run_id])
        if cursor.rowcount == 0:
            raise KeyError(f"no run {run_id!r}")
        if "parent_run" in fields or "fork_iteration" in fields:
            self._lineages.clear()

    def list_runs(self) -> list[RunRecord]:
        """Every run, in creation order (forks after their parents)."""
        rows = self._dict_rows("SELECT * FROM runs ORDER BY rowid")
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

    def commit_iteration(self, record: IterationRecord, run_fields: dict[str, Any], *, handover: bool = False,
                         events: Sequence[RunEvent] = ()) -> list[EventRecord]:
        """Atomically: insert the iteration (its state as a delta), update the run's totals, drop the intent for
        it, and append `events` at its iteration (an escalation: a crash can never keep one without the other).

        handover=True: the caller will never mutate `record.state` (or anything in
        it) again, so the Store keeps it as the base of the next delta instead of
        copying it, and compares unchanged parts by identity (the engine does this).
        """
        run_id, n, known = record.run_id, record.n, self._known
        with self._lock:
            queued = self._queued_intents.pop((run_id, n), None)
            blobs: list[str] = []
            intents: list[int] | None = None
            try:
                with self._write():
                    head = self._insert_iteration(record, self._heads, handover=handover, blobs=blobs)
                    self._update_run(run_id, run_fields, spend_model=record.model or None, spend_at=record.ended_at)
                    if known.intent_may_exist(run_id, n):
                        self._conn.execute("DELETE FROM intents WHERE run_id = ? AND n = ?", [run_id, n])
                        if not known.intents_read(run_id):
                            intents = [row[0] for row in self._conn.execute("SELECT n FROM intents WHERE run_id = ?", [run_id])]
                    written = [self._insert_event(run_id, event, n) for event in events]
            except BaseException:
                self._heads.pop(record.run_id, None)  # its state may have moved past what was committed
                if queued is not None:
                    self._queued_intents.setdefault((record.run_id, record.n), queued)
                raise
            known.committed(run_id, n, blobs, intents)
            self._heads[record.run_id] = head
            self._heads.move_to_end(record.run_id)
            while len(self._heads) > self.heads_kept:
                self._heads.popitem(last=False)
            return written

    def _lineage(self, run_id: str) -> list[tuple[str, str | None, int | None]]:
        """LINEAGE_SQL's rows for a run, cached: a run's parent and fork point never change once it exists."""
        rows = self._lineages.get(run_id)
        if rows is None:
            rows = [tuple(row) for row in self._query(LINEAGE_SQL, [run_id])]  # type: ignore[misc]
            if rows:
                if len(self._lineages) > self.heads_kept * 8:
                    self._lineages.clear()
                self._lineages[run_id] = rows
        return rows

    def _insert_iteration(self, record: IterationRecord, heads: dict[str, Head], *, handover: bool = False,
                          blobs: list[str] | None = None) -> Head:
        """The rows of one iteration, inside the caller's write; returns the run's new head. `blobs`
        receives the hashes of the prompt sections it references (stored now or before)."""
        run_id, n = record.run_id, record.n
        lineage = self._lineage(run_id)
        segs = segments(lambda sql, params: lineage, run_id, n)
        holder = owner(segs, n)
        if segs and holder != run_id:
            raise DuplicateIterationError(
                f"iteration {n} of run {run_id} is inherited from run {holder}; a branch's own iterations come after its fork point"
            )
        new_blobs: dict[str, str] = {}
        row = encode("iterations", record.model_dump(exclude={"state", "prompt"}))
        row["prompt"] = dump_json(encode_prompt(record.prompt, new_blobs))
        unstored = self._known.unstored(run_id, new_blobs)
        if unstored:
            self._executemany("INSERT OR IGNORE INTO blobs (hash, body) VALUES (?, ?)", unstored)
        if blobs is not None:
            blobs.extend(new_blobs)
        try:
            self._insert_row("iterations", row)
        except self._conn.IntegrityError as exc:  # the primary key (run_id, n): no SELECT before every insert
            if "UNIQUE" not in str(exc) and getattr(exc, "sqlstate", None) != "23505":  # PostgreSQL's unique_violation
                raise
            raise DuplicateIterationError(f"iteration {n} of run {run_id} is already committed") from None

        def base() -> Head | None:
            if n <= 1:
                return None
            try:
                return load_head(self._query, segs, n - 1)
            except (KeyError, DamagedStateError):  # no chain to extend: this iteration becomes a keyframe
                return None

        return put_state(self._query, self._executemany, heads, run_id, n, record.state, base, handover=handover,
                         stored_body=self._state_body)

    # -- events ----------------------------------------------------------------

    def append_event(self, run_id: str, event: RunEvent, iteration: int | None = None) -> EventRecord:
        with self._write():
            return self._insert_event(run_id, event, iteration)

    def _insert_event(self, run_id: str, event: RunEvent, iteration: int | None) -> EventRecord:
        kind, data = to_stored(event)
        if self._url is not None:
            # PostgreSQL lets two transactions write at once, and takes ids when rows are inserted, not committed:
            # a reader polling events(run, after_id) could pass an id committed later. One writer of a run's log
            # at a time (until its commit) keeps each run's ids committed in order, as SQLite's lock does.
            self._conn.execute("SELECT pg_advisory_xact_lock(?)", [log_lock_key(run_id)])
        ts = self._clock()
        row = encode("events", {"run_id": run_id, "iteration": iteration, "ts": ts, "kind": kind, "data": data})
        return EventRecord(id=self._insert_row("events", row), run_id=run_id, iteration=iteration, ts=ts, event=event)

    def events(self, run_id: str, after_id: int = 0) -> list[EventRecord]:
        """Events of a run with id > after_id, oldest first (poll with the last id seen)."""
        rows = self._rows("events", "run_id = ? AND id > ?", [run_id, after_id], order_by="id")
        return [_event_record(row) for row in rows]

    def runs_with_event(self, event: type[RunEvent]) -> set[str]:
        """The ids of the runs that have an event of this type (e.g. the shadow runs, for `loopterm runs`)."""
        kind = event.model_fields["kind"].default
        return {row[0] for row in self._query("SELECT DISTINCT run_id FROM events WHERE kind = ?", [kind])}

    def policy_events(self, *, run_id: str | None = None, loop_ref: str | None = None) -> list[EventRecord]:
        """Approval policies' events of a run and of every run of a loop (store/policies.py)."""
        return [_event_record(row) for row in self._dict_rows(*policies.events_sql(run_id=run_id, loop_ref=loop_ref))]

    # -- control channel -------------------------------------------------------

    def add_command(self, run_id: str, kind: str, payload: dict[str, Any]) -> CommandRecord:
        """Queue a command for the process running `run_id` (pause, stop, ...)."""
        command = CommandRecord(run_id=run_id, ts=self._clock(), kind=kind, payload=payload)
        with self._write():
            command.id = self._insert_row("commands", to_row("commands", command, exclude={"id"}))
        self._no_commands.clear()
        return command

    def pending_commands(self, run_id: str) -> list[CommandRecord]:
        """Unconsumed commands for the run, in the order they were sent. Asked before every iteration: on
        SQLite a run's "none" stands, without a SELECT, while no other connection has committed (`PRAGMA
        data_version` unchanged) and this Store has sent no command."""
        with self._lock:
            if self._url is None:
                version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                if self._no_commands.get(run_id) == version:
                    return []
            rows = self._rows("commands", "run_id = ? AND consumed_at IS NULL", [run_id], order_by="id")
            if self._url is None and not rows:
                if len(self._no_commands) > 4096:
                    self._no_commands.clear()
                self._no_commands[run_id] = version
            return [from_row("commands", CommandRecord, row) for row in rows]

    def consume_command(self, command_id: int, events: Sequence[tuple[RunEvent, int | None]] = ()) -> list[EventRecord]:
        """Mark a command handled and record what it did, in one transaction: a crash between the two
        can neither lose the command nor apply it twice. Consuming it again keeps the first time."""
        with self._write():
            rows = self._rows("commands", "id = ?", [command_id])
            if not rows:
                raise KeyError(f"no command {command_id}")
            self._conn.execute("UPDATE commands SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL", [self._clock(), command_id])
            return [self._insert_event(rows[0]["run_id"], event, iteration) for event, iteration in events]

    # -- storage meter and prune (footprint.py, prune.py) ---------------------

    def sizes(self, runs: Sequence[RunRecord] | None = None, meter: Meter | None = None) -> dict[str, RunSize]:
        """Own and shared bytes of each run (`runs`: every run of the store, or the list already read)."""
        return (meter or Meter()).measure(self._query, self.list_runs() if runs is None else runs)

    def prune(self, **options: Any) -> pruning.PruneResult:
        """Remove finished runs (never what a kept run needs), then compact the file; see prune.py."""
        return pruning.prune(self, **options)

    # -- export and import (transfer.py) -------------------------------------

    def export_run(self, run_id: str) -> Iterator[dict[str, Any]]:
        """The run and its whole lineage as the lines of a JSONL export (see transfer.py)."""
        return transfer.export_run(self, run_id)

    def import_lines(self, lines: Iterable[str]) -> list[str]:
        """Import an export in one transaction, checked first; returns the run ids imported (see transfer.py)."""
        return transfer.import_lines(self, lines)

    def copy_to(self, target: Store) -> CopyResult:
        """Copy this whole store (runs, memory, ledger, commands, ...) into the empty store `target`, in one
        transaction verified row by row before it commits (see copy.py)."""
        return copy_store(self, target)


def _event_record(row: dict[str, Any]) -> EventRecord:
    data = loads(row["data"]) if row["data"] is not None else {}
    return EventRecord(id=row["id"], run_id=row["run_id"], iteration=row["iteration"], ts=row["ts"],
                       event=from_stored(row["kind"], data))


_RUN_FIELDS = frozenset(RunRecord.model_fields)


@functools.cache
def _run_field(name: str) -> TypeAdapter[Any]:
    """A validator for one RunRecord field: an update checks only what it changes (RunRecord has
    no cross-field rules), without reading the row back on every iteration."""
    return TypeAdapter(RunRecord.model_fields[name].annotation)


def _short(run_id: str, shown: int) -> str:
    """Enough of an id to tell it apart in a one-line message."""
    keep = max(shown + 4, 8)
    return run_id if len(run_id) <= keep else run_id[:keep] + ".."
