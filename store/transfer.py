"""Export a run's lineage as JSON lines, and import such a file only when it is whole.

Format version 2, one JSON object per line:

    {"type": "loopterm-export", "version": 2}
    then for each run of the lineage, root first:
      {"type": "run", ...}          the RunRecord
      {"type": "iteration", ...}    its own iterations, in order: first .. N (full state and prompt)
      {"type": "event", ...}        its events, without their local id
      {"type": "tool_call", ...}    its idempotency journal
      {"type": "run_end", "run_id": ..., "first": k, "iterations": c, "lines": L, "sha256": ...}
    {"type": "export_end", "runs": R, "lines": T, "sha256": ...}

A run's own iterations are first = fork_iteration + 1 (1 for a run that inherits none) up to
N = the run record's `iterations`; run_end says where they start and how many there are, how many
lines the run has (its run line to the line before run_end) and their SHA-256. export_end counts the
runs and the lines before it and digests all of them, so a lost run or a cut file shows too. A line is
digested in one canonical form (keys sorted, compact, UTF-8), so re-indenting the file or reordering a
line's keys changes nothing; changing a value, or deleting, adding or moving a line, does. The digests
catch damage and careless edits; they are not a signature. `seal` builds them for a file rewritten on
purpose (renamed ids, normalised times).

Importing checks, in one transaction that imports nothing unless every check passes: each run's own
iterations are exactly first .. N; every iteration, event and tool call follows its own run's line; a
run's parent_run is earlier in the file or already in the database, and has the iteration a branch starts
from; and (version 2) every run_end and the export_end. Version 1 files (no digests) are still read, with
the continuity and reference checks only. Events are carried opaquely, as the store keeps them (kind and
data; see StoredEvent): the typed event models are not this module's business.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loopterm.core.errors import ConfigError
from loopterm.core.records import IterationRecord, RunRecord, ToolCallRecord
from loopterm.store.delta import loads
from loopterm.core.text import one_line
from loopterm.store.rows import args_hash, encode, from_row, to_row

if TYPE_CHECKING:
    from loopterm.store.db import Store
    from loopterm.store.states import Head

EXPORT_TYPE = "loopterm-export"
EXPORT_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: no run_end / export_end lines, so continuity and reference checks only
RECORD_TYPES = ("iteration", "event", "tool_call")
NOTHING = "nothing was imported"


# -- export ----------------------------------------------------------------------------------


def export_run(store: Store, run_id: str) -> Iterator[dict[str, Any]]:
    """The run and its whole lineage as JSON-able dicts, one per line of a JSONL export (see the module).

    Each run's iterations stop at the count its run record had when it was read, so a run still
    going exports as a consistent snapshot. `import_lines` reads the result back.
    """
    return seal(_records(store, run_id))


def _records(store: Store, run_id: str) -> Iterator[dict[str, Any]]:
    from loopterm.core.secrets import redact_tree  # belt and braces: what the store holds is redacted already

    for run in store.lineage(run_id):
        yield redact_tree({"type": "run", **run.model_dump()})
        for record in store._records(run.id, own_only=True):
            if record.n > run.iterations:
                break  # committed after the run line was read
            yield redact_tree({"type": "iteration", **record.model_dump()})
        for line in _event_lines(store, run.id):
            yield redact_tree(line)
        for row in store._rows("tool_calls", "run_id = ?", [run.id], order_by="iteration, started_at, key"):
            yield redact_tree({"type": "tool_call", **from_row("tool_calls", ToolCallRecord, row).model_dump()})


def seal(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A whole export around run, iteration, event and tool_call records (in export order): the header,
    each run's run_end and the export_end, computed here; any header or end lines among `items` are dropped."""
    header = {"type": EXPORT_TYPE, "version": EXPORT_VERSION}
    whole = _Digest()
    whole.add(_canonical(header))
    yield header
    runs = 0
    run: dict[str, Any] | None = None
    part = _Digest()
    count = 0
    for item in items:
        kind = item.get("type")
        if kind in (EXPORT_TYPE, "run_end", "export_end"):
            continue
        if kind == "run":
            if run is not None:
                end = _run_end(run, count, part)
                whole.add(_canonical(end))
                yield end
            run, part, count, runs = item, _Digest(), 0, runs + 1
        elif run is None:
            raise ValueError(f"a {kind} record before any run record")
        elif kind == "iteration":
            count += 1
        line = _canonical(item)
        part.add(line)
        whole.add(line)
        yield item
    if run is not None:
        end = _run_end(run, count, part)
        whole.add(_canonical(end))
        yield end
    yield {"type": "export_end", "runs": runs, "lines": whole.lines, "sha256": whole.hexdigest()}


def _run_end(run: dict[str, Any], iterations: int, part: _Digest) -> dict[str, Any]:
    return {"type": "run_end", "run_id": run.get("id"), "first": _first_own(run.get("parent_run"), run.get("fork_iteration")),
            "iterations": iterations, "lines": part.lines, "sha256": part.hexdigest()}


def _first_own(parent_run: Any, fork_iteration: Any) -> int:
    """A run's first own iteration: a branch inherits 1..fork_iteration (see states.segments)."""
    return int(fork_iteration) + 1 if parent_run is not None and fork_iteration else 1


class StoredEvent(BaseModel):
    """An event line: the event as the store keeps it (kind and data, uninterpreted), so the file
    format does not follow the typed event models, and any loopterm's export reads back."""

    model_config = ConfigDict(extra="forbid")  # a key this loopterm would drop is refused, not lost

    run_id: str
    iteration: int | None = None
    ts: float
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)


def _event_lines(store: Store, run_id: str) -> Iterator[dict[str, Any]]:
    """The one place events become lines: the run's event rows as stored, without their local id."""
    for row in store._rows("events", "run_id = ?", [run_id], order_by="id"):
        yield {"type": "event", **{name: row[name] for name in StoredEvent.model_fields}, "data": loads(row["data"])}


def _insert_event(store: Store, item: dict[str, Any]) -> None:
    """The one place a line becomes an event row (with a new local id), as it was stored."""
    event = StoredEvent.model_validate(item)
    store._insert_row("events", encode("events", event.model_dump()))


class _Digest:
    """SHA-256 over lines in canonical form, and how many."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.lines = 0

    def add(self, line: bytes | None) -> None:
        """One line, as _canonical gave it."""
        if line is not None:
            self._sha.update(line)
            self.lines += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _canonical(item: Any) -> bytes:
    """A line as digested: keys sorted, compact, UTF-8 (a lone surrogate kept, as JSON allows)."""
    text = json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass") + b"\n"


# -- import ----------------------------------------------------------------------------------


def import_lines(store: Store, lines: Iterable[str]) -> list[str]:
    """Import an export into the store in one transaction; returns the run ids imported.

    Refused with a one-line ConfigError naming the line and what is wrong, importing nothing:
    a malformed line, a run id already present, a gap or repeat in a run's iterations, a record
    outside its run's lines or of a run the file does not define, a parent that resolves nowhere,
    and (version 2) a run or file whose lines do not match their counts and digests.
    """
    reader = _Reader(store)
    with store._lock, store._write():
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            kind = None
            try:
                item = _parse(line)
                kind = item.get("type")
                reader.read(number, item)
            except ConfigError as exc:
                raise ConfigError(f"line {number}: {exc}; {NOTHING}") from None
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"]) or "(record)"
                raise ConfigError(f"line {number}: invalid {kind} record at {where}: {error['msg']}; {NOTHING}") from None
            except (sqlite3.IntegrityError, store._conn.IntegrityError, ValueError, KeyError, TypeError, RecursionError) as exc:
                raise ConfigError(f"line {number}: {one_line(exc)}; {NOTHING}") from None
        reader.finish()
    return reader.imported


def _parse(line: str) -> dict[str, Any]:
    try:
        item = loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # nested too deeply, a number of 4,300+ digits
        from loopterm.core.decision import unreadable_json

        raise ConfigError(f"not JSON ({unreadable_json(exc)})") from None
    if not isinstance(item, dict):
        raise ConfigError(f"expected a JSON object, got {type(item).__name__}")
    return item


@dataclass
class _Run:
    """The run whose lines are being read."""

    record: RunRecord
    line: int  # its run line
    first: int  # its first own iteration
    last: int  # the last own iteration read so far (first - 1: none yet)
    iterations: int = 0
    digest: _Digest = field(default_factory=_Digest)


class _Reader:
    """Reads an export line by line inside the caller's transaction, checking as it goes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.version: int | None = None
        self.imported: list[str] = []
        self.counted: dict[str, int] = {}  # run id -> its `iterations`, for the runs already read
        self.run: _Run | None = None
        self.whole = _Digest()
        self.ended = False  # export_end read
        self.heads: dict[str, Head] = {}  # local: discarded if the import rolls back
        self.last_line = 0

    def read(self, number: int, item: dict[str, Any]) -> None:
        self.last_line = number
        line = _canonical(item) if self.version != 1 else None  # the header, and every line of version 2
        kind = item.pop("type", None)
        if self.version is None:
            self._header(kind, item)
            self.whole.add(line)
            return
        if self.ended:
            raise ConfigError("a line after the export's last line (export_end)")
        if kind == "run":
            self._run(number, item)
        elif kind in RECORD_TYPES:
            self._record(kind, item)
        elif kind == "run_end" and self.version == 2:
            self._run_end(number, item)
        elif kind == "export_end" and self.version == 2:
            self._export_end(item)
            return
        else:
            expected = "run, iteration, event, tool_call" + (", run_end or export_end" if self.version == 2 else "")
            raise ConfigError(f"unknown record type {kind!r} (expected {expected})")
        if line is not None:
            if self.run is not None:  # not after run_end, which closed it
                self.run.digest.add(line)
            self.whole.add(line)

    def _header(self, kind: Any, item: dict[str, Any]) -> None:
        if kind != EXPORT_TYPE:
            raise ConfigError("not a loopterm export (it must start with its header line)")
        version = item.get("version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise ConfigError(f"export format version {version!r} is not supported "
                              f"(this loopterm reads versions {' and '.join(map(str, READ_VERSIONS))})")
        self.version = int(version)

    def _run(self, number: int, item: dict[str, Any]) -> None:
        if self.run is not None:
            if self.version == 2:
                raise ConfigError(f"run {item.get('id')} starts before the run_end line of run {self.run.record.id} "
                                  f"(from line {self.run.line}): a line is missing")
            self._close()
        run = RunRecord.model_validate(item)
        store = self.store
        if run.id in self.imported or store._query("SELECT 1 FROM runs WHERE id = ?", [run.id]):
            where = "earlier in this file" if run.id in self.imported else f"already in {store.location}"
            raise ConfigError(f"run {run.id} is {where}")
        if run.fork_iteration is not None and run.fork_iteration < 0:
            raise ConfigError(f"run {run.id}: fork_iteration {run.fork_iteration} is negative")
        first = _first_own(run.parent_run, run.fork_iteration)
        if run.parent_run is not None:
            parent = self.counted.get(run.parent_run)
            if parent is None:
                rows = store._query("SELECT iterations FROM runs WHERE id = ?", [run.parent_run])
                if not rows:
                    raise ConfigError(f"run {run.id}: its parent run {run.parent_run} is neither earlier in this file "
                                      f"nor in {store.location}; export the run again (an export carries its lineage)")
                parent = int(rows[0][0])
            if first - 1 > parent:
                raise ConfigError(f"run {run.id} branches from iteration {first - 1} of run {run.parent_run}, "
                                  f"which has {parent}")
        if run.iterations < first - 1:
            raise ConfigError(f"run {run.id}: its run record says {run.iterations} iterations, "
                              f"but it branches from iteration {first - 1}")
        store._insert_row("runs", to_row("runs", run))
        self.imported.append(run.id)
        self.counted[run.id] = run.iterations
        self.run = _Run(run, number, first, first - 1)

    def _record(self, kind: str, item: dict[str, Any]) -> None:
        run_id = item.get("run_id")
        if run_id not in self.imported:
            raise ConfigError(f"{kind} of run {run_id!r}, which no earlier line of this file defines")
        run = self.run
        if run is None or run.record.id != run_id:
            raise ConfigError(f"{kind} of run {run_id} outside that run's lines "
                              f"(each run's iterations, events and tool calls follow its run line)")
        if kind == "iteration":
            record = IterationRecord.model_validate(item)
            self._next(run, record.n)
            self.heads[record.run_id] = self.store._insert_iteration(record, self.heads)
        elif kind == "event":
            _insert_event(self.store, item)
        else:
            call = ToolCallRecord.model_validate(item)
            self.store._insert_row("tool_calls", {**to_row("tool_calls", call), "args_hash": args_hash(call.args)})

    def _next(self, run: _Run, n: int) -> None:
        """Iteration n is the run's next own one, or the file is not whole."""
        rid, expected, total = run.record.id, run.last + 1, run.record.iterations
        if n < run.first:
            if run.first == 1:
                raise ConfigError(f"run {rid}: iteration {n} is not a valid number (iterations count from 1)")
            raise ConfigError(f"run {rid}: iteration {n} is its parent's (a branch at {run.first - 1} has its own from "
                              f"{run.first} on)")
        if n < expected:
            raise ConfigError(f"run {rid}: iteration {n} again, after iteration {run.last} (repeated or out of order)")
        if n > total:
            raise ConfigError(f"run {rid}: iteration {n} is past its last (its run record says {total} iterations)")
        if n > expected:
            had = f"the file has {run.last}, then {n}" if run.last >= run.first else f"the file starts at {n}"
            missing = f"iteration {expected} is" if n == expected + 1 else f"iterations {expected}..{n - 1} are"
            raise ConfigError(f"run {rid}: {missing} missing ({had})")
        run.last = n
        run.iterations += 1

    def _close(self) -> None:
        """The current run's lines have ended: it must have had all its iterations."""
        run = self.run
        assert run is not None
        total = run.record.iterations
        if run.last < total:
            gone = f"iteration {total} is" if run.last + 1 == total else f"iterations {run.last + 1}..{total} are"
            had = f"the file stops at {run.last}" if run.last >= run.first else "the file has none of them"
            raise ConfigError(f"run {run.record.id}: {gone} missing (its run record says {total}, {had})")
        self.run = None

    def _run_end(self, number: int, item: dict[str, Any]) -> None:
        run = self.run
        if run is None or item.get("run_id") != run.record.id:
            raise ConfigError(f"run_end of run {item.get('run_id')} without that run's lines before it")
        self._close()
        rid, lines = run.record.id, f"lines {run.line}-{number - 1}"
        if item.get("first") != run.first or item.get("iterations") != run.iterations:
            raise ConfigError(f"run {rid}: its run_end line says {item.get('iterations')!r} iteration(s) from "
                              f"{item.get('first')!r}; the file has {run.iterations} from {run.first}")
        if item.get("lines") != run.digest.lines:
            raise ConfigError(f"run {rid} has {run.digest.lines} lines ({lines}) but its run_end line says "
                              f"{item.get('lines')!r}: a line was deleted or added")
        if item.get("sha256") != run.digest.hexdigest():
            raise ConfigError(f"run {rid}: its {lines} do not match the sha256 on its run_end line: "
                              f"a line was altered or moved")

    def _export_end(self, item: dict[str, Any]) -> None:
        if self.run is not None:
            raise ConfigError(f"export_end before the run_end line of run {self.run.record.id}: a line is missing")
        runs, whole = len(self.imported), self.whole
        if item.get("runs") != runs or item.get("lines") != whole.lines:
            raise ConfigError(f"the file has {runs} run(s) in {whole.lines} lines before its export_end line, "
                              f"which says {item.get('runs')!r} in {item.get('lines')!r}: a run or a line was deleted or added")
        if item.get("sha256") != whole.hexdigest():
            raise ConfigError("the lines before export_end do not match its sha256: a line was altered or moved")
        self.ended = True

    def finish(self) -> None:
        """At the end of the input: refuse a file that stops short."""
        if self.version is None:
            raise ConfigError(f"no loopterm export found (the input is empty); {NOTHING}")
        end = f"the file ends after line {self.last_line}"
        if self.version == 2 and not self.ended:
            where = f"inside run {self.run.record.id}, before its run_end line" if self.run else "without its export_end line"
            raise ConfigError(f"{end} {where}: it was cut short; {NOTHING}")
        if self.run is not None:
            try:
                self._close()
            except ConfigError as exc:
                raise ConfigError(f"{end}: {exc}; {NOTHING}") from None
