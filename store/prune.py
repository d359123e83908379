"""Removing finished runs from the store without breaking any run that stays.

The rule (why each part is there):

- Only a finished run goes: its status is finished (`Status.finished`), its log's fold says nothing waits on a
  person, and no engine start is open on it with a fresh heartbeat. A running, paused, escalated or waiting
  run is never touched.
- A chosen run that is an ancestor (by parent_run, at any depth) of a run that stays is kept whole, reported
  as "kept: ancestor of <run>": a branch reads its parent's iterations 1..fork point, its prefix's states
  (keyframes, deltas), tool calls (rewind policies) and the parent's rows in its export. Keeping the
  ancestor whole keeps every load, fork, replay and export of the branch exactly as it was.
- A run another run called (loops calling loops: origin "child") stays while its caller stays ("kept: called
  by <run>"): the caller's log names it, and resuming the caller reuses what it returned.
- A run with ledger rows dated today is kept until tomorrow: the daily budget counts today's spend, and
  pruning must never give a budget back. A pruned run's older ledger rows go with it (`loopterm budget`
  no longer counts them).
- A blob goes only when no row that stays references it (prompt sections and their lists, keyframe chunks:
  nothing else references blobs).

Everything is decided again inside the write transaction that deletes (BEGIN IMMEDIATE, the store's lock
convention), so a run resumed by another process a moment before is seen as running. The events table is
append-only by trigger; a pruned run's whole log is the one exception: the trigger is dropped and re-created
inside that same transaction, so no other writer ever sees it missing. Afterwards the file is compacted
(VACUUM, then a WAL checkpoint), outside the transaction.

On PostgreSQL the same rules hold; the events trigger stays and lets prune's transaction delete (it sets
`loopterm.prune` for that transaction only), "the file" is the database (pg_database_size), and compacting
is a plain VACUUM of the store's tables, which frees their dead rows for reuse (the disk space goes back to
the system only with VACUUM FULL, which locks the tables: left to the person who runs the database).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from loopterm.core.daily_budget import local_day
from loopterm.core.fold import fold
from loopterm.core.liveness import STALE_AFTER_S
from loopterm.core.records import RunRecord
from loopterm.core.termination import Status
from loopterm.store.footprint import IN_BATCH, Meter

if TYPE_CHECKING:
    from loopterm.store.db import Store

# A pruned run's rows, child tables first (the runs row last: foreign keys).
RUN_TABLES = ("states", "iterations", "intents", "tool_calls", "commands", "spend", "events")
EVENTS_TRIGGER = "events_no_delete"


class PrunedRun(BaseModel):
    id: str
    loop: str
    status: str
    iterations: int
    bytes: int  # its rows


class KeptRun(BaseModel):
    id: str
    reason: str


class PrunePlan(BaseModel):
    """What a prune removes (or would): the runs, the blobs only they referenced, and the bytes."""

    removed: list[PrunedRun]
    kept: list[KeptRun]  # runs the options chose that stay, each with why
    blobs: int
    blob_bytes: int
    orphans: list[str] = Field(default_factory=list, exclude=True)  # the blobs' hashes

    @property
    def row_bytes(self) -> int:
        return sum(run.bytes for run in self.removed)

    @property
    def bytes(self) -> int:
        return self.row_bytes + self.blob_bytes


class PruneResult(BaseModel):
    plan: PrunePlan
    dry_run: bool
    file_bytes_before: int
    file_bytes_after: int
    vacuum_s: float | None = None
    vacuum_error: str | None = None


def chosen(runs: Sequence[RunRecord], *, older_than: float | None, keep_last: int | None) -> list[RunRecord]:
    """The runs the options select (before safety): last written before `older_than`, and not among the
    newest `keep_last` runs of their loop (branches count as runs). Both given: both must hold."""
    newest: set[str] = set()
    if keep_last is not None:
        by_loop: dict[str, list[RunRecord]] = {}
        for run in runs:
            by_loop.setdefault(run.loop, []).append(run)
        for group in by_loop.values():
            group.sort(key=lambda r: (r.created_at, r.id), reverse=True)
            newest.update(r.id for r in group[:keep_last])
    return [
        run for run in runs
        if run.id not in newest and (older_than is None or run.updated_at < older_than)
    ]


def _why_not_finished(store: Store, run: RunRecord, now: float) -> str | None:
    """Why the run may not be pruned now (None: it is finished), from its status and its log's fold."""
    if not Status(run.status).finished:
        return f"kept: {run.status}"
    view = fold(store.events(run.id))
    if view.waiting:
        return "kept: waits on a person"
    if view.open_start is not None and now - run.updated_at < STALE_AFTER_S:
        return "kept: an engine may hold it"
    return None


def plan(store: Store, *, older_than: float | None, keep_last: int | None, now: float | None = None,
         meter: Meter | None = None) -> PrunePlan:
    """Decide what goes; reads only. Inside the store's write transaction (see `prune`), it is what is deleted."""
    now = time.time() if now is None else now
    runs = store.list_runs()
    candidates = chosen(runs, older_than=older_than, keep_last=keep_last)
    spent_today = {row[0] for row in store._query("SELECT DISTINCT run_id FROM spend WHERE day >= ?", [local_day(now)])}
    reasons: dict[str, str] = {}
    for run in candidates:
        why = _why_not_finished(store, run, now)
        if why is None and run.id in spent_today:
            why = "kept: spent today (the daily budget counts it until tomorrow)"
        if why is not None:
            reasons[run.id] = why
    going = {run.id for run in candidates if run.id not in reasons}
    parents = {run.id: run.parent_run for run in runs}
    for run in runs:  # every ancestor of a run that stays stays too, whole
        if run.id in going:
            continue
        seen: set[str] = {run.id}
        parent = parents.get(run.id)
        while parent is not None and parent in parents and parent not in seen:
            seen.add(parent)
            if parent in going:
                going.discard(parent)
                reasons[parent] = f"kept: ancestor of {run.id}"
            parent = parents.get(parent)
    for run in runs:  # creation order, so a caller is decided before the runs it called
        if run.id in going and run.origin == "child" and run.parent_run in parents and run.parent_run not in going:
            going.discard(run.id)
            reasons[run.id] = f"kept: called by {run.parent_run}"
    meter = meter or Meter()
    scans = meter.scans(store._query, runs)
    doomed = set().union(*(scans[r].refs for r in going)) if going else set()
    kept_refs = set().union(*(scans[r.id].refs for r in runs if r.id not in going)) if runs else set()
    orphans = sorted(doomed - kept_refs)
    sizes = meter.blob_sizes(store._query, orphans)
    removed = [PrunedRun(id=r.id, loop=r.loop, status=r.status, iterations=r.iterations, bytes=scans[r.id].row_bytes)
               for r in runs if r.id in going]
    kept = [KeptRun(id=r.id, reason=reasons[r.id]) for r in candidates if r.id in reasons]
    return PrunePlan(removed=removed, kept=kept, blobs=len(sizes), blob_bytes=sum(sizes.values()), orphans=sorted(sizes))


def file_bytes(store: Store) -> int:
    """The database's size as its pages say (what the file is once the WAL is checkpointed)."""
    if store.backend == "postgresql":
        return int(store._query("SELECT pg_database_size(current_database())")[0][0])
    count = store._query("PRAGMA page_count")[0][0]
    size = store._query("PRAGMA page_size")[0][0]
    return int(count) * int(size)


def prune(store: Store, *, older_than: float | None, keep_last: int | None, dry_run: bool = False,
          compact: bool = True, now: float | None = None) -> PruneResult:
    """Plan, and unless `dry_run` delete what the plan says in one transaction, then compact the file."""
    before = file_bytes(store)
    if dry_run:
        with store._lock:  # one read snapshot, so the plan is the one a real prune would make at this moment
            store._conn.execute("BEGIN" if store.backend == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                decided = plan(store, older_than=older_than, keep_last=keep_last, now=now)
            finally:
                store._conn.rollback()
        return PruneResult(plan=decided, dry_run=True, file_bytes_before=before, file_bytes_after=before)
    with store._write():
        decided = plan(store, older_than=older_than, keep_last=keep_last, now=now)
        _delete(store, [run.id for run in decided.removed], decided.orphans)
    store._lineages.clear()
    for run in decided.removed:
        store._heads.pop(run.id, None)
        store._known.forget(run.id)
    result = PruneResult(plan=decided, dry_run=False, file_bytes_before=before, file_bytes_after=before)
    if compact and decided.removed:
        _compact(store, result)
    result.file_bytes_after = file_bytes(store)
    return result


def _delete(store: Store, run_ids: list[str], orphans: list[str]) -> None:
    """Inside the caller's write: every row of these runs, then the blobs nobody references any more."""
    if not run_ids:
        return
    conn = store._conn
    if store.backend == "postgresql":
        conn.execute("SET LOCAL loopterm.prune = 'on'")  # the events trigger lets this transaction delete
        trigger = None
    else:
        trigger = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?", [EVENTS_TRIGGER]).fetchone()
    for start in range(0, len(run_ids), IN_BATCH):
        batch = run_ids[start : start + IN_BATCH]
        marks = ",".join("?" * len(batch))
        for table in RUN_TABLES:
            if table == "events" and trigger is not None:
                conn.execute(f"DROP TRIGGER {EVENTS_TRIGGER}")
            conn.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", batch)
            if table == "events" and trigger is not None:
                conn.execute(trigger[0])
    # A branch's row goes before its parent's: delete deepest first (a pruned run's descendants are pruned too).
    depth = {run_id: len(store.lineage(run_id)) for run_id in run_ids}
    for run_id in sorted(run_ids, key=lambda r: -depth[r]):
        conn.execute("DELETE FROM runs WHERE id = ?", [run_id])
    for start in range(0, len(orphans), IN_BATCH):
        batch = orphans[start : start + IN_BATCH]
        conn.execute(f"DELETE FROM blobs WHERE hash IN ({','.join('?' * len(batch))})", batch)


def _compact(store: Store, result: PruneResult) -> None:
    """VACUUM (rewrites the file without the freed pages), then checkpoint the WAL into it and truncate it.
    Busy (another process writing for longer than the busy timeout): the rows are gone all the same, and
    SQLite reuses their pages; the result says compacting did not happen."""
    import sqlite3

    started = time.perf_counter()
    if store.backend == "postgresql":
        with store._lock:
            for table in (*RUN_TABLES, "runs", "blobs"):
                store._conn.execute(f"VACUUM {table}")
        result.vacuum_s = time.perf_counter() - started
        return
    with store._lock:
        try:
            store._conn.execute("VACUUM")
            store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:
            result.vacuum_error = str(exc)
            return
    result.vacuum_s = time.perf_counter() - started


def as_json(result: PruneResult) -> dict[str, Any]:
    """What `loopterm prune --json` prints."""
    return {
        "dry_run": result.dry_run,
        "removed": [run.model_dump() for run in result.plan.removed],
        "kept": [run.model_dump() for run in result.plan.kept],
        "blobs": result.plan.blobs,
        "row_bytes": result.plan.row_bytes,
        "blob_bytes": result.plan.blob_bytes,
        "bytes": result.plan.bytes,
        "file_bytes_before": result.file_bytes_before,
        "file_bytes_after": result.file_bytes_after,
        "vacuum_s": result.vacuum_s,
        "vacuum_error": result.vacuum_error,
    }
