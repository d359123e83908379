"""The Store's reads of a run's lineage: its iterations (states rebuilt from deltas, prompts from sections),
its ancestors, children and the run tree.

Reads are lineage-aware: a branch (parent_run P, fork_iteration N) shows P's iterations 1..N,
recursively, then its own, without any of them being copied.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from loopterm.core.records import IterationRecord, RunRecord
from loopterm.store.delta import apply_copy, copy_tree, decode_delta, loads
from loopterm.store.prompts import decode_prompt
from loopterm.store.rows import from_row
from loopterm.store.states import (
    LINEAGE_SQL,
    NO_END,
    DamagedStateError,
    ChunkCache,
    Head,
    chain_head,
    decode_keyframe,
    fetch_blobs,
    load_state,
    owner,
    segments,
)

PAGE = 256  # iteration rows fetched per query when streaming
SECTIONS_KEPT = 4096  # prompt sections kept while streaming iterations
ITERATION_PAGE_SQL = """
SELECT iterations.*, states.keyframe AS state_keyframe, states.body AS state_body
FROM iterations LEFT JOIN states ON states.run_id = iterations.run_id AND states.n = iterations.n
WHERE iterations.run_id = ? AND iterations.n > ? AND iterations.n <= ?
ORDER BY iterations.n LIMIT ?
"""


class LineageReads:
    """Mixed into `Store` (store/db.py), whose connection, lock and state heads it uses."""

    _lock: threading.RLock
    _heads: OrderedDict[str, Head]
    _path: Any
    _kept: ChunkCache | None = None  # created at the first read that needs it

    @property
    def _chunk_cache(self) -> ChunkCache:
        """Parsed list chunks kept across reads (a state read twice, a fork's plan then its engine)."""
        if self._kept is None:
            self._kept = ChunkCache()
        return self._kept

    if TYPE_CHECKING:  # the Store's own
        def _query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]: ...

        def _dict_rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]: ...

        def _rows(self, table: str, where: str, args: list[Any], order_by: str | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]: ...

        def get_run(self, run_id: str) -> RunRecord: ...

        def list_runs(self) -> list[RunRecord]: ...

    def get_iteration(self, run_id: str, n: int) -> IterationRecord | None:
        """Iteration n of the run's lineage (a branch's n <= fork_iteration comes from its parent, with the parent's run_id)."""
        with self._lock:
            segs = segments(self._query, run_id, n)
            holder = owner(segs, n)
            if holder is None:
                return None
            rows = self._rows("iterations", "run_id = ? AND n = ?", [holder, n])
            if not rows:
                return None
            return self._record(rows[0], load_state(self._query, segs, n, self._chunk_cache), {})

    def last_iterations(self, run_id: str, k: int) -> list[IterationRecord]:
        """The last k committed iterations of the run's lineage, oldest first."""
        if k <= 0:
            return []
        with self._lock:
            first = None
            for holder, lo, hi in segments(self._query, run_id):
                rows = self._query(
                    "SELECT n FROM iterations WHERE run_id = ? AND n > ? AND n <= ? ORDER BY n DESC LIMIT ?", [holder, lo, hi, k]
                )
                if rows:
                    first = rows[-1][0]
                    k -= len(rows)
                if k <= 0:
                    break
            if first is None:
                return []
            records = list(self._records(run_id, first=first))
            if records and run_id not in self._heads:
                # What a resuming engine (or a branch's first iteration) will take its next delta
                # against: keep a copy now rather than rebuild that state again at its commit.
                last = records[-1]
                segs = segments(self._query, run_id, last.n)
                self._heads[run_id] = chain_head(self._query, segs, last.n, copy_tree(last.state))
            return records

    def iterations(self, run_id: str, own_only: bool = False) -> list[IterationRecord]:
        """Every committed iteration of the run's lineage by n (own_only: only those the run itself made).

        Consecutive records share the unchanged parts of their states: treat them as read-only.
        """
        return list(self._records(run_id, own_only=own_only))

    def iteration_tool_calls(
        self, run_id: str, *, own_only: bool = False, after: int = 0, upto: int | None = None,
        tools: Collection[str] | None = None,
    ) -> list[tuple[str, int, dict[str, Any]]]:
        """(run_id, n, tool_call) of the lineage's iterations after < n <= upto that called a tool, by n
        (only calls of `tools`, when given).

        Reads only that column: no state or prompt is rebuilt (what forking
        needs to find side effects and replay workspace writes).
        """
        if tools is not None and not tools:
            return []
        names = sorted(tools) if tools is not None else []
        only = f" AND json_extract(tool_call, '$.tool') IN ({','.join('?' * len(names))})" if names else ""
        with self._lock:
            segs = segments(self._query, run_id, NO_END if upto is None else upto)
            found: list[tuple[str, int, dict[str, Any]]] = []
            for holder, lo, hi in reversed(segs[:1] if own_only else segs):
                rows = self._query(
                    "SELECT n, tool_call FROM iterations WHERE run_id = ? AND n > ? AND n <= ? AND tool_call IS NOT NULL"
                    f"{only} ORDER BY n",
                    [holder, max(lo, after), hi, *names],
                )
                found.extend((holder, n, loads(call)) for n, call in rows)
            return found

    def iter_iterations(self, run_id: str, *, first: int = 1) -> Iterator[IterationRecord]:
        """The lineage's iterations n >= first, streamed a page at a time: each state is rebuilt
        from its predecessor's, so reading k new rows costs k deltas, not k whole states."""
        return self._records(run_id, first=first)

    def _records(self, run_id: str, *, first: int = 1, own_only: bool = False) -> Iterator[IterationRecord]:
        """Stream iterations n >= first, a page at a time (no lock held between records).

        Each page reads iterations with their state rows in one statement, so a
        page is consistent while the run is being written; a delta that does not
        follow the state before it (a row committed between pages) is resolved
        by loading that state on its own.
        """
        segs = segments(self._query, run_id)
        state: dict[str, Any] | None = None
        at = -1
        chunks: dict[str, list[Any]] = {}
        sections: dict[str, str] = {}
        for holder, lo, hi in reversed(segs[:1] if own_only else segs):
            start = max(lo, first - 1)
            while start < hi:
                rows = self._dict_rows(ITERATION_PAGE_SQL, [holder, start, hi, PAGE])
                for row in rows:
                    n, keyframe, body = row.pop("n"), row.pop("state_keyframe"), row.pop("state_body")
                    if body is None:
                        raise DamagedStateError(f"{self._path}: no stored state for iteration {n} of run {holder}")
                    if len(chunks) > SECTIONS_KEPT:
                        chunks.clear()
                    if keyframe:
                        state = decode_keyframe(self._query, body, chunks, self._chunk_cache)
                    elif state is not None and at == n - 1:
                        state = apply_copy(state, decode_delta(body))
                    else:
                        state = load_state(self._query, segments(self._query, holder, n), n, self._chunk_cache)
                    at = n
                    if len(sections) > SECTIONS_KEPT:
                        sections.clear()
                    yield self._record({**row, "n": n}, state, sections)
                if len(rows) < PAGE:
                    break
                start = at

    def _record(self, row: dict[str, Any], state: dict[str, Any], sections: dict[str, str]) -> IterationRecord:
        """An iteration row back as its record; `sections` caches prompt sections across calls."""
        prompt = decode_prompt(loads(row["prompt"]), sections, lambda hashes: fetch_blobs(self._query, hashes))
        return from_row("iterations", IterationRecord, {**row, "prompt": prompt, "state": state})

    def state_at(self, run_id: str, n: int) -> dict[str, Any] | None:
        """The state after iteration n of the run's lineage; None for n = 0 (the loop's initial state).

        Reads one keyframe (its chunks in one query) and at most 63 deltas,
        however long the run. KeyError if the run or the iteration does not exist.
        """
        if n < 0:
            raise ValueError(f"iteration {n} is negative")
        with self._lock:
            segs = segments(self._query, run_id, n)
            if not segs:
                self.get_run(run_id)  # KeyError for an unknown run
                if n == 0:
                    return None
            if n == 0:
                return None
            try:
                return load_state(self._query, segs, n, self._chunk_cache)
            except KeyError:
                raise KeyError(f"run {run_id} has no iteration {n}") from None

    # -- lineage ---------------------------------------------------------------

    def lineage(self, run_id: str) -> list[RunRecord]:
        """The run and its ancestors by parent_run, root first and the run last; KeyError for an unknown run."""
        with self._lock:
            ids: list[str] = []
            for ancestor, _, _ in self._query(LINEAGE_SQL, [run_id]):
                if ancestor in ids:
                    break
                ids.append(ancestor)
            if not ids:
                raise KeyError(f"no run {run_id!r}")
            marks = ",".join("?" * len(ids))
            rows = {row["id"]: row for row in self._rows("runs", f"id IN ({marks})", ids)}
        return [from_row("runs", RunRecord, rows[ancestor]) for ancestor in reversed(ids)]

    def children(self, run_id: str) -> list[RunRecord]:
        """The runs whose parent is this one, in creation order."""
        return [from_row("runs", RunRecord, row) for row in self._rows("runs", "parent_run = ?", [run_id], order_by="rowid")]

    def tree(self) -> list[tuple[int, RunRecord]]:
        """Every run depth-first under its parent, with its depth (0 for a root), siblings in creation order."""
        runs = self.list_runs()
        ids = {run.id for run in runs}
        kids: dict[str | None, list[RunRecord]] = {}
        for run in runs:
            kids.setdefault(run.parent_run if run.parent_run in ids else None, []).append(run)
        shown: list[tuple[int, RunRecord]] = []
        seen: set[str] = set()
        stack = [(0, run) for run in reversed(kids.get(None, []))]
        while stack:
            depth, run = stack.pop()
            if run.id in seen:
                continue
            seen.add(run.id)
            shown.append((depth, run))
            stack.extend((depth + 1, child) for child in reversed(kids.get(run.id, [])))
        shown.extend((0, run) for run in runs if run.id not in seen)  # a parent_run cycle (hand-edited file)
        return shown
