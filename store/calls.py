"""The Store's intents and idempotency journal (tool calls), and the writes it queues for them.

A write the engine chose not to wait for (durable=False: a model's reply, the start of a call
without side effects, a call's result) is queued here and joins the next write transaction,
whichever it is (usually the iteration's own commit), or flush(). That saves a commit per
iteration, where a commit waits for the disk; what a crash can lose is work that may be redone
without harm. A call with side effects is never queued: its start (and the reply before it) is
on disk before it fires.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database

from loopterm.core.records import Intent, ToolCallRecord
from loopterm.store.known import Known
from loopterm.store.rows import args_hash, encode, from_row, to_row

Queued = tuple[dict[tuple[str, int], Intent], dict[str, ToolCallRecord], dict[str, tuple[dict[str, Any], float]]]


class CallJournal:
    """Mixed into `Store` (store/db.py), whose connection, lock and transactions it uses."""

    _lock: threading.RLock
    _conn: sqlite3.Connection
    _known: Known

    if TYPE_CHECKING:  # the Store's own
        def _write(self, *, power_safe: bool = True) -> AbstractContextManager[Database]: ...

        def _insert_row(self, table: str, row: dict[str, Any], *, replace: bool = False) -> int: ...

        def _rows(self, table: str, where: str, args: list[Any], order_by: str | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]: ...

    def _init_queue(self) -> None:
        self._queued_intents: dict[tuple[str, int], Intent] = {}
        self._queued_starts: dict[str, ToolCallRecord] = {}
        self._queued_finishes: dict[str, tuple[dict[str, Any], float]] = {}
        # The key tool_call() last found in neither the file nor the queue: the start that follows at once
        # (ToolExecutor.execute) need not look again. A write of a call, or any transaction, forgets it.
        self._absent_call: str | None = None

    def _queued(self) -> Queued:
        return self._queued_intents, self._queued_starts, self._queued_finishes

    def _requeue(self, queued: Queued) -> None:
        """Put back what a failed transaction was to write."""
        self._queued_intents, self._queued_starts, self._queued_finishes = queued

    def _write_queued(self) -> None:
        """Write the queued intents, call starts and results inside the current transaction."""
        if self._queued_intents:
            intents, self._queued_intents = self._queued_intents, {}
            for intent in intents.values():
                self._known.intent_written(intent.run_id, intent.n)
                self._insert_row("intents", to_row("intents", intent), replace=True)
        finishes, self._queued_finishes = dict(self._queued_finishes), {}  # a copy: a failed write requeues the original
        if self._queued_starts:
            starts, self._queued_starts = self._queued_starts, {}
            for key, record in starts.items():
                # Started and finished since the last write: one row, as finished (its fields set in the row:
                # a model_copy of the record cost more than the row's other work).
                done = finishes.pop(key, None)
                self._insert_call(record, None if done is None else {"status": "done", "result": done[0],
                                                                     "finished_at": done[1]})
        for key, (result, finished_at) in finishes.items():
            self._finish_call(key, result, finished_at)

    def flush(self) -> None:
        """Make every queued write durable now (before something slow, or on the way out)."""
        with self._lock:
            if self._queued_intents or self._queued_starts or self._queued_finishes:
                with self._write():
                    pass

    # -- intents ---------------------------------------------------------------

    def save_intent(self, intent: Intent, *, durable: bool = True) -> None:
        """Save (or replace) the reply for (run_id, n) before its tool runs.

        durable=False queues it for the next write transaction (the start of a
        call with side effects, an event, the iteration's commit, which drops it
        instead) or flush(): one commit fewer per iteration, and the reply is
        still on disk before anything that could make it worth keeping.
        """
        if not durable:
            with self._lock:
                self._queued_intents[(intent.run_id, intent.n)] = intent
            return
        with self._write():
            self._queued_intents.pop((intent.run_id, intent.n), None)
            self._known.intent_written(intent.run_id, intent.n)
            self._insert_row("intents", to_row("intents", intent), replace=True)

    def load_intent(self, run_id: str, n: int) -> Intent | None:
        queued = self._queued_intents.get((run_id, n))
        if queued is not None:
            return queued
        rows = self._rows("intents", "run_id = ? AND n = ?", [run_id, n])
        return from_row("intents", Intent, rows[0]) if rows else None

    # -- idempotency journal ---------------------------------------------------

    def tool_call(self, key: str) -> ToolCallRecord | None:
        with self._lock:
            call = self._queued_starts.get(key)
            if call is not None:
                call = call.model_copy()
            else:
                # A key is looked up before every call and almost never there: the bare lookup first (SELECT *
                # read into dicts cost 4 us more a call: bench/README.md, third round).
                found = self._conn.execute("SELECT 1 FROM tool_calls WHERE key = ?", [key]).fetchone()
                rows = self._rows("tool_calls", "key = ?", [key]) if found else []
                if not rows:
                    if key not in self._queued_finishes:
                        self._absent_call = key
                    return None
                call = from_row("tool_calls", ToolCallRecord, rows[0])
            queued = self._queued_finishes.get(key)
        if queued is not None:
            call.status, call.result, call.finished_at = "done", queued[0], queued[1]
        return call

    def tool_call_started(self, record: ToolCallRecord, *, power_safe: bool = True, durable: bool = True) -> None:
        """Record a call about to run; restarting an interrupted one is allowed, redoing a finished one is not.

        power_safe=False (for a call without side effects: running it twice harms
        nothing) survives a crash of the process but not a power loss; see Store._write.
        durable=False (also only for a call without side effects) queues it, with the
        reply before it, for the next write: usually the iteration's commit.
        """
        with self._lock:
            self._refuse_finished(record.key)
            if not durable:
                self._queued_starts[record.key] = record
                return
            with self._write(power_safe=power_safe):
                self._insert_call(record)

    def _refuse_finished(self, key: str) -> None:
        if key == self._absent_call and key not in self._queued_finishes:
            return
        existing = self._conn.execute("SELECT status FROM tool_calls WHERE key = ?", [key]).fetchone()
        if (existing and existing[0] == "done") or key in self._queued_finishes:
            raise ValueError(f"tool call {key} already finished; reuse its result instead of running it again")

    def _insert_call(self, record: ToolCallRecord, finished: dict[str, Any] | None = None) -> None:
        self._absent_call = None
        fields = record.model_dump()
        if finished is not None:
            fields.update(finished)
        self._insert_row("tool_calls", {**encode("tool_calls", fields), "args_hash": args_hash(record.args)}, replace=True)

    def tool_call_finished(self, key: str, result: dict[str, Any], finished_at: float, *, durable: bool = True) -> None:
        """Record a call's result. durable=False queues it for the next write transaction (see save_intent):
        the engine flushes before anything slow, so what a crash can lose is a moment, not a gate run."""
        if not durable:
            with self._lock:
                if key not in self._queued_starts and not self._conn.execute(
                    "SELECT 1 FROM tool_calls WHERE key = ?", [key]
                ).fetchone():
                    raise KeyError(f"no tool call {key!r} was started")
                self._queued_finishes[key] = (result, finished_at)
            return
        with self._write():
            self._finish_call(key, result, finished_at)

    def _finish_call(self, key: str, result: dict[str, Any], finished_at: float) -> None:
        self._absent_call = None
        row = encode("tool_calls", {"status": "done", "result": result, "finished_at": finished_at})
        cursor = self._conn.execute(
            "UPDATE tool_calls SET status = ?, result = ?, finished_at = ? WHERE key = ?",
            [row["status"], row["result"], row["finished_at"], key],
        )
        if cursor.rowcount == 0:
            raise KeyError(f"no tool call {key!r} was started")

    def prior_tool_calls(
        self, run_ids: list[str], tool: str, args: dict[str, Any], after_iteration: dict[str, int] | None = None
    ) -> list[ToolCallRecord]:
        """Finished calls of `tool` with equal `args` made by `run_ids` (only at iterations > after_iteration[run]).

        Ordered by the position of their run in `run_ids`, then iteration.
        """
        if not run_ids:
            return []
        after = after_iteration or {}
        marks = ",".join("?" * len(run_ids))
        rows = self._rows(
            "tool_calls", f"tool = ? AND args_hash = ? AND status = 'done' AND run_id IN ({marks})",
            [tool, args_hash(args), *run_ids],
        )
        position = {run_id: i for i, run_id in reversed(list(enumerate(run_ids)))}
        calls = [from_row("tool_calls", ToolCallRecord, row) for row in rows]
        wanted = args_hash(args)
        calls = [c for c in calls if c.iteration > after.get(c.run_id, -1) and args_hash(c.args) == wanted]
        return sorted(calls, key=lambda c: (position[c.run_id], c.iteration, c.started_at, c.key))
