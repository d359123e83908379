"""Iteration state in the `states` table: a delta per iteration, a keyframe when the deltas outweigh it.

Writing: the delta of iteration n is taken against the state at n-1 of the
run's lineage (for a branch's first own iteration, the parent's state at the
fork point). Iteration n is a keyframe when there is no state at n-1 to take
a delta against (n = 1, a gap), when the deltas since the last keyframe hold
KEYFRAME_AFTER times the bytes that keyframe cost (so keyframes add at most
1/KEYFRAME_AFTER to what the deltas cost, whatever the state's size), or when
the chain would reach MAX_CHAIN (so a read applies fewer than MAX_CHAIN deltas).
Deltas are stored in delta.py's compact form; the first (flat) form still reads.
A body (delta or keyframe) longer than delta.PACK_ABOVE is stored zlib-compressed
when that is smaller (`pack`; 3-8x on JSON), a BLOB that `loads` tells from text:
that is what lets keyframes come often (short chains, quick reads) and still cost
little. Sizes in the keyframe rule are the stored (packed) bytes.

Reading the state at n: the keyframe at or below n (one indexed query, its
chunks in one `IN` query), then the deltas after it (one range query per
lineage segment, at most MAX_CHAIN - 1 rows in all). A Store keeps parsed chunks
of strings and numbers (ChunkCache), so a state read again costs its deltas.

Everything here takes a `query(sql, params) -> rows` function, so the Store
decides locking, and runs inside the caller's transaction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from loopterm.store.delta import (
    IMMUTABLE,
    apply,
    apply_delta,
    copy_tree,
    decode_delta,
    diff,
    encode_delta,
    join_keyframe,
    keyframe_hashes,
    loads,
    pack,
    split_keyframe,
    touched,
    unpack,
)

MAX_CHAIN = 32  # a keyframe at least every this many iterations: a read applies fewer deltas than this
KEYFRAME_AFTER = 1.0  # a keyframe once the deltas since the last one hold as many bytes as it (both packed)
PAGE = 512  # state rows fetched per query when streaming
IN_BATCH = 500  # hashes per `IN (...)` query
NO_END = 2**62

Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
Segment = tuple[str, int, int]  # (run_id, lo, hi): the run's own iterations lo < n <= hi

LINEAGE_SQL = """
WITH RECURSIVE chain(id, parent_run, fork_iteration, depth) AS (
    SELECT id, parent_run, fork_iteration, 0 FROM runs WHERE id = ?
    UNION ALL
    SELECT runs.id, runs.parent_run, runs.fork_iteration, chain.depth + 1
    FROM runs JOIN chain ON runs.id = chain.parent_run
    WHERE chain.depth < 10000
)
SELECT id, parent_run, fork_iteration FROM chain ORDER BY depth
"""


class DamagedStateError(ValueError):
    """The stored states do not form a chain (the file was edited or damaged)."""


@dataclass
class Head:
    """The last state written for a run: the Store's own copy, or a state handed over for good
    (see Store.commit_iteration); in both cases nobody else changes it."""

    n: int
    state: dict[str, Any]
    memo: dict[tuple[str | int, ...], list[str]] = field(default_factory=dict)
    chain: int = 0  # deltas since the last keyframe
    delta_bytes: int = 0  # their stored bytes
    keyframe_bytes: int = 0  # what that keyframe cost (its body and the chunks it wrote); 0: not known


def segments(query: Query, run_id: str, upto: int = NO_END) -> list[Segment]:
    """Where each iteration <= upto of the run's lineage is stored, the run first.

    A run with a parent and fork_iteration N inherits iterations 1..N from it
    (recursively); fork_iteration None or 0 inherits nothing. Unknown run: [].
    """
    found: list[Segment] = []
    seen: set[str] = set()
    hi = upto
    for run_id_, parent, fork in query(LINEAGE_SQL, [run_id]):
        if run_id_ in seen:
            break
        seen.add(run_id_)
        inherits = parent is not None and bool(fork)
        lo = int(fork) if inherits else 0
        if hi > lo:
            found.append((run_id_, lo, hi))
        if not inherits:
            break
        hi = min(hi, lo)
    return found


def owner(segs: list[Segment], n: int) -> str | None:
    """The run of the lineage that holds iteration n."""
    for run_id, lo, hi in segs:
        if lo < n <= hi:
            return run_id
    return None


# -- writing ---------------------------------------------------------------------


def put_state(
    query: Query,
    executemany: Callable[[str, list[tuple[Any, ...]]], None],
    heads: dict[str, Head],
    run_id: str,
    n: int,
    state: dict[str, Any],
    base: Callable[[], Head | dict[str, Any] | None],
    *,
    handover: bool = False,
    stored_body: Callable[[str | bytes], Any] | None = None,
) -> Head:
    """Store the state of iteration n and return the new head (the caller caches it after commit).

    `heads[run_id]` is used when it holds n-1, else `base()` gives the state at
    n-1, as a Head when it knows the chain behind it (None: there is none, so
    this iteration is a keyframe; a bare state: the next is a keyframe). The head's
    state is updated in place: drop it if the transaction fails. With
    `handover`, `state` itself becomes the new head's state (its owner promised
    not to change it); otherwise the head keeps a copy of its containers. `stored_body` turns the body
    into what the backend's column takes (PostgreSQL's bytea: store/pg.py), SQLite takes it as it is.
    """
    head = heads.get(run_id)
    if head is None or head.n != n - 1:
        loaded = base()
        head = loaded if isinstance(loaded, Head) or loaded is None else Head(n - 1, loaded)
    new_blobs: dict[str, str] = {}
    if head is None:
        keyframe = True
        private: dict[str, Any] = state if handover else copy_tree(state)
        memo: dict[tuple[str | int, ...], list[str]] = {}
    else:
        ops = diff(head.state, state)
        packed = pack(encode_delta(ops))
        keyframe = (head.chain + 1 >= MAX_CHAIN
                    or head.delta_bytes + len(packed) >= KEYFRAME_AFTER * head.keyframe_bytes)
        private = state if handover else apply(head.state, copy_tree(ops))
        memo = head.memo
        touched(memo, ops)
    if keyframe:
        body = pack(split_keyframe(state, memo, new_blobs))
        after = Head(n, private, memo, 0, 0, len(body) + sum(map(len, new_blobs.values())))
    else:
        body = packed
        assert head is not None
        after = Head(n, private, memo, head.chain + 1, head.delta_bytes + len(body), head.keyframe_bytes)
    if new_blobs:
        executemany("INSERT OR IGNORE INTO blobs (hash, body) VALUES (?, ?)", list(new_blobs.items()))
    stored = stored_body(body) if stored_body is not None else body
    query("INSERT INTO states (run_id, n, keyframe, body) VALUES (?, ?, ?, ?)", [run_id, n, int(keyframe), stored])
    return after


# -- reading ---------------------------------------------------------------------


def fetch_blobs(query: Query, hashes: Sequence[str]) -> dict[str, str]:
    """Blob texts by hash, in as few queries as the parameter limit allows."""
    found: dict[str, str] = {}
    unique = list(dict.fromkeys(hashes))
    for start in range(0, len(unique), IN_BATCH):
        batch = unique[start : start + IN_BATCH]
        marks = ",".join("?" * len(batch))
        found.update(query(f"SELECT hash, body FROM blobs WHERE hash IN ({marks})", batch))
    missing = [digest for digest in unique if digest not in found]
    if missing:
        raise DamagedStateError(f"missing blob {missing[0]}")
    return found


def _keyframe(query: Query, segs: list[Segment], n: int) -> tuple[str, int, str] | None:
    """The latest keyframe at or below n in the lineage: (its run, its n, its body)."""
    for run_id, lo, hi in segs:
        top = min(hi, n)
        if top <= lo:
            continue
        rows = query(
            "SELECT n, body FROM states WHERE run_id = ? AND keyframe = 1 AND n > ? AND n <= ? ORDER BY n DESC LIMIT 1",
            [run_id, lo, top],
        )
        if rows:
            return run_id, rows[0][0], rows[0][1]
    return None


class ChunkCache:
    """Parsed list chunks by hash, kept across reads of one Store: only chunks of immutable items (strings,
    numbers), so a state built from them is still fresh (its lists are new, only the items are shared).
    A chunk's hash names its content, so an entry never goes stale. The least recently used go first once
    the texts they were parsed from pass MAX_BYTES."""

    MAX_BYTES = 8 << 20

    def __init__(self) -> None:
        self._chunks: OrderedDict[str, tuple[list[Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> list[Any] | None:
        with self._lock:
            found = self._chunks.get(digest)
            if found is None:
                return None
            self._chunks.move_to_end(digest)
            return found[0]

    def put(self, digest: str, items: list[Any], size: int) -> bool:
        """Keep a chunk just parsed (not to be changed by the caller); whether it was kept."""
        if size > self.MAX_BYTES or not set(map(type, items)) <= IMMUTABLE:
            return False
        with self._lock:  # a Store's streamed reads (Store.iter_iterations) hold no lock between rows
            if digest not in self._chunks:
                self._chunks[digest] = (items, size)
                self._bytes += size
                while self._bytes > self.MAX_BYTES:
                    _, (_, dropped) = self._chunks.popitem(last=False)
                    self._bytes -= dropped
            return True


def decode_keyframe(query: Query, body_text: str | bytes, cache: dict[str, list[Any]] | None,
                    kept: ChunkCache | None = None) -> dict[str, Any]:
    """The state of a keyframe. With `cache` (parsed chunks by hash, filled here), chunk items are
    shared with other states decoded through the same cache; without, everything is fresh. `kept`
    (a Store's ChunkCache) answers first, and keeps what was fetched."""
    body = loads(body_text)
    hashes = keyframe_hashes(body)
    if not hashes:
        return join_keyframe(body, lambda digest: [])
    parsed: dict[str, list[Any]] = {}
    if kept is not None:
        for digest in hashes:
            items = kept.get(digest)
            if items is not None:
                parsed[digest] = items
    if cache is None:  # one state: fresh objects for the caller, even where two lists share a chunk
        missing = [digest for digest in hashes if digest not in parsed]
        texts = fetch_blobs(query, missing) if missing else {}

        def chunk(digest: str) -> list[Any]:
            items = parsed.get(digest)  # kept: immutable items, which two lists may share
            if items is None:
                items = loads(texts[digest])
                if kept is not None and kept.put(digest, items, len(texts[digest])):
                    parsed[digest] = items
            return items

        return join_keyframe(body, chunk)
    cache.update(parsed)
    missing = [digest for digest in hashes if digest not in cache]
    if missing:
        for digest, text in fetch_blobs(query, missing).items():
            cache[digest] = loads(text)
            if kept is not None:
                kept.put(digest, cache[digest], len(text))
    return join_keyframe(body, cache.__getitem__)


def _rows(query: Query, segs_root_first: list[Segment], after: int, upto: int) -> Iterator[tuple[str, int, int, str]]:
    """State rows after < n <= upto along the lineage: (run_id, n, keyframe, body), by n."""
    for run_id, lo, hi in segs_root_first:
        start, end = max(lo, after), min(hi, upto)
        while start < end:
            rows = query(
                "SELECT n, keyframe, body FROM states WHERE run_id = ? AND n > ? AND n <= ? ORDER BY n LIMIT ?",
                [run_id, start, end, PAGE],
            )
            for n, keyframe, body in rows:
                yield run_id, n, keyframe, body
            if len(rows) < PAGE:
                break
            start = rows[-1][0]


def chain_head(query: Query, segs: list[Segment], n: int, state: dict[str, Any]) -> Head:
    """A Head for `state`, the state at iteration n, with the chain behind it read from the rows (no chunk is
    fetched): the next iteration is then a delta, not a keyframe re-serialising every list (a branch's first
    iteration, a resumed run's), and a later keyframe writes only new chunks. Without a keyframe: a bare Head."""
    found = _keyframe(query, segs, n)
    if found is None:
        return Head(n, state)
    _, at, body = found
    memo: dict[tuple[str | int, ...], list[str]] = {}
    cost = len(body)  # what the next keyframe will write, as put_state counts a keyframe's cost
    text = unpack(body)
    if b'"c":' in text:  # chunked lists (else the body need not be parsed: a whole state, 0.3 ms for 200 records)
        refs = loads(text).get("c", ())
        # Every chunk but a list's last is full (see delta._chunks): these hashes stay valid while the list grows.
        memo = {tuple(path): hashes[:-1] for path, hashes in refs if len(hashes) > 1}
        lasts = list({hashes[-1] for _, hashes in refs if hashes})  # written again by the next keyframe
        for start in range(0, len(lasts), IN_BATCH):
            batch = lasts[start : start + IN_BATCH]
            cost += sum(size for (size,) in query(
                f"SELECT length(body) FROM blobs WHERE hash IN ({','.join('?' * len(batch))})", batch))
    chain, delta_bytes = 0, 0
    for _, m, keyframe, delta in _rows(query, segs[::-1], at, n):
        if keyframe or m != at + 1:
            return Head(n, state)
        if memo:
            touched(memo, decode_delta(delta))
        at, chain, delta_bytes = m, chain + 1, delta_bytes + len(delta)
    return Head(n, state, memo, chain, delta_bytes, cost) if at == n else Head(n, state)


def load_state(query: Query, segs: list[Segment], n: int, kept: ChunkCache | None = None) -> dict[str, Any]:
    """The state at iteration n of the lineage `segs` (fresh objects); KeyError if n is not stored."""
    return load_head(query, segs, n, kept).state


def load_head(query: Query, segs: list[Segment], n: int, kept: ChunkCache | None = None) -> Head:
    """The state at iteration n with the chain behind it (for the next put_state); KeyError if n is not stored."""
    found = _keyframe(query, segs, n)
    if found is None:
        raise KeyError(n)
    _, at, body = found
    state = decode_keyframe(query, body, None, kept)
    chain, delta_bytes = 0, 0
    for _, m, keyframe, text in _rows(query, segs[::-1], at, n):
        if keyframe or m != at + 1:
            raise DamagedStateError(f"state chain broken at iteration {m}")
        apply_delta(state, text)
        at, chain, delta_bytes = m, chain + 1, delta_bytes + len(text)
    if at != n:
        raise KeyError(n)
    return Head(n, state, {}, chain, delta_bytes, len(body))
