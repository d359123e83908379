"""What each run takes in the store: the bytes only it holds, and the bytes it shares.

A run's bytes are the payload of its rows (text columns as UTF-8 bytes, plus a
fixed estimate for each row's numbers; not SQLite's page overhead): its
iterations and their state rows (deltas and keyframes), events, tool calls,
intents, commands, ledger rows and its run row, plus the blobs (prompt
sections, keyframe chunks; content-addressed) its rows reference.

- shared: blobs another run references too (each sharer is shown their whole
  size), and the iterations 1..k of a run whose branches inherit them (k: the
  highest fork point among its direct children; those rows serve the branches).
- own: the rest. A branch that inherits most of its state owns little.

Measuring reads each run's iteration rows once: a `Meter` keeps what it has
scanned per run and, when a run has grown, reads only the new iterations (and
re-sums its small tables), so the TUI can ask again every few seconds. The
scan is paged, so a reader holding the Store's lock never waits long.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from loopterm.core.records import RunRecord
from loopterm.store.delta import keyframe_hashes, loads
from loopterm.store.states import fetch_blobs

Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

PAGE = 512  # iteration rows per query while scanning
IN_BATCH = 500


def _b(column: str) -> str:
    """A column's size in bytes (UTF-8 for text); 0 for NULL."""
    return f"coalesce(length(CAST({column} AS BLOB)), 0)"


def _sum(*columns: str, fixed: int) -> str:
    return " + ".join([_b(column) for column in columns] + [str(fixed)])


ITERATION_BYTES = _sum("i.prompt", "i.raw_response", "i.decision", "i.tool_call", "i.tool_result", "i.gate_results",
                       "i.invariant_status", "i.remediations", "i.model", fixed=80)
STATE_BYTES = _sum("s.body", fixed=16)
SCAN_SQL = f"""
SELECT i.n, {ITERATION_BYTES}, coalesce({STATE_BYTES}, 0), i.prompt, CASE WHEN s.keyframe = 1 THEN s.body END
FROM iterations i LEFT JOIN states s ON s.run_id = i.run_id AND s.n = i.n
WHERE i.run_id = ? AND i.n > ? ORDER BY i.n LIMIT ?
"""
# The rest of a run's rows, per table: (table, bytes expression, run column).
SMALL_TABLES: tuple[tuple[str, str, str], ...] = (
    ("events", _sum("kind", "data", fixed=32), "run_id"),
    ("tool_calls", _sum("key", "tool", "args", "status", "result", "args_hash", fixed=32), "run_id"),
    ("intents", _sum("prompt", "raw_response", "decision", "model", fixed=56), "run_id"),
    ("commands", _sum("kind", "payload", fixed=32), "run_id"),
    ("spend", _sum("loop", "model", "day", fixed=48), "run_id"),
    ("runs", _sum("id", "loop", "loop_ref", "goal", "spec_hash", "model", "status", "workspace", "parent_run",
                  "budget", "termination_reason", "message", "origin", fixed=96), "id"),
)


class RunSize(BaseModel):
    """A run's bytes in the store (what `show --json` prints as "storage")."""

    own_bytes: int
    shared_bytes: int

    @property
    def total(self) -> int:
        return self.own_bytes + self.shared_bytes


@dataclass
class RunScan:
    """What one run's rows hold, as far as it was scanned."""

    iterations: int = -1  # the run record's count when scanned (the cache key)
    upto: int = 0  # the highest iteration n read
    ns: list[int] = field(default_factory=list)  # iteration numbers read, ascending
    cumulative: list[int] = field(default_factory=list)  # bytes of iteration + state rows up to ns[i]
    refs: set[str] = field(default_factory=set)  # blob hashes its rows reference
    other: int = 0  # bytes of its events, tool calls, intents, commands, ledger rows and run row

    @property
    def row_bytes(self) -> int:
        return (self.cumulative[-1] if self.cumulative else 0) + self.other

    def bytes_upto(self, n: int) -> int:
        """Bytes of its iteration and state rows with number <= n."""
        i = bisect.bisect_right(self.ns, n)
        return self.cumulative[i - 1] if i else 0


class Meter:
    """Measures runs, keeping per-run scans (by iteration count) and blob sizes between calls."""

    def __init__(self) -> None:
        self._scans: dict[str, RunScan] = {}
        self._blob_sizes: dict[str, int] = {}
        self._ref_lists: dict[str, list[str]] = {}  # a prompt's list-of-sections blob -> the section hashes in it
        self._last: tuple[tuple[Any, ...] | None, dict[str, RunSize]] = (None, {})

    def scans(self, query: Query, runs: Iterable[RunRecord]) -> dict[str, RunScan]:
        """Each run's scan, brought up to date (a run that did not grow since is not read again)."""
        found: dict[str, RunScan] = {}
        for run in runs:
            scan = self._scans.get(run.id)
            if scan is None or scan.iterations != run.iterations:
                scan = self._scan(query, run, scan or RunScan())
                self._scans[run.id] = scan
            found[run.id] = scan
        for gone in set(self._scans) - set(found):
            del self._scans[gone]
        return found

    def blob_sizes(self, query: Query, hashes: Iterable[str]) -> dict[str, int]:
        """Bytes of each blob (hash + body) that exists; blobs never change, so sizes are kept."""
        missing = [digest for digest in hashes if digest not in self._blob_sizes]
        for start in range(0, len(missing), IN_BATCH):
            batch = missing[start : start + IN_BATCH]
            marks = ",".join("?" * len(batch))
            for digest, size in query(f"SELECT hash, {_b('hash')} + {_b('body')} FROM blobs WHERE hash IN ({marks})", batch):
                self._blob_sizes[digest] = int(size)
        return {digest: self._blob_sizes[digest] for digest in hashes if digest in self._blob_sizes}

    def measure(self, query: Query, runs: Sequence[RunRecord]) -> dict[str, RunSize]:
        """Own and shared bytes of every run in `runs` (pass every run of the store: sharing is counted among them).
        Nothing grew since the last call (same runs, same counts): the last answer, without reading anything."""
        key = tuple((run.id, run.iterations, run.parent_run, run.fork_iteration) for run in runs)
        if key == self._last[0]:
            return dict(self._last[1])
        scans = self.scans(query, runs)
        holders: dict[str, int] = {}
        for scan in scans.values():
            for digest in scan.refs:
                holders[digest] = holders.get(digest, 0) + 1
        sizes = self.blob_sizes(query, list(holders))
        inherited = inherited_upto(runs)
        result: dict[str, RunSize] = {}
        for run in runs:
            scan = scans[run.id]
            lent = scan.bytes_upto(inherited.get(run.id, 0))
            own_blobs = sum(sizes.get(d, 0) for d in scan.refs if holders[d] == 1)
            shared_blobs = sum(sizes.get(d, 0) for d in scan.refs if holders[d] > 1)
            result[run.id] = RunSize(own_bytes=scan.row_bytes - lent + own_blobs, shared_bytes=lent + shared_blobs)
        self._last = (key, dict(result))
        return result

    def _scan(self, query: Query, run: RunRecord, scan: RunScan) -> RunScan:
        at = scan.upto
        while True:
            rows = query(SCAN_SQL, [run.id, at, PAGE])
            for n, iteration_bytes, state_bytes, prompt, keyframe in rows:
                total = (scan.cumulative[-1] if scan.cumulative else 0) + int(iteration_bytes) + int(state_bytes)
                scan.ns.append(n)
                scan.cumulative.append(total)
                scan.refs.update(self._prompt_refs(query, prompt))
                if keyframe is not None:
                    scan.refs.update(keyframe_hashes(loads(keyframe)))
                at = n
            if len(rows) < PAGE:
                break
        scan.upto = at
        scan.other = sum(
            int(query(f"SELECT coalesce(sum({expression}), 0) FROM {table} WHERE {column} = ?", [run.id])[0][0])
            for table, expression, column in SMALL_TABLES
        )
        scan.iterations = run.iterations
        return scan

    def _prompt_refs(self, query: Query, prompt_text: str) -> list[str]:
        """The blob hashes a stored prompt references (see prompts.py): its sections, and its lists of sections."""
        found: list[str] = []
        for item in loads(prompt_text):
            refs = item.get("s")
            listed = item.get("l")
            if listed is not None:
                found.append(listed)
                refs = self._ref_list(query, listed)
            for ref in refs or ():
                if ref[:1] == "#":
                    found.append(ref[1:])
        return found

    def _ref_list(self, query: Query, digest: str) -> list[str]:
        cached = self._ref_lists.get(digest)
        if cached is None:
            cached = loads(fetch_blobs(query, [digest])[digest])
            self._ref_lists[digest] = cached
        return cached


def inherited_upto(runs: Iterable[RunRecord]) -> dict[str, int]:
    """For each run with branches: the highest iteration any direct branch inherits from it."""
    found: dict[str, int] = {}
    for run in runs:
        if run.parent_run is not None and run.fork_iteration:
            found[run.parent_run] = max(found.get(run.parent_run, 0), run.fork_iteration)
    return found


def human(size: int) -> str:
    """A compact size: 812 B, 4.1 KB, 1.2 MB (powers of 1000, as file managers show them)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def size_text(size: RunSize) -> str:
    """Own bytes, then what is shared: "13.1 KB +5.2 KB" (`loopterm runs`' size column)."""
    return human(size.own_bytes) + (f" +{human(size.shared_bytes)}" if size.shared_bytes else "")
