"""Long-term memory in SQL: the `memory` table and its FTS5 index `memory_fts` (schema 3).

Writes take the Store's connection and run inside the caller's write
transaction; reads take a `query(sql, params) -> rows` function (the Store's
locks each statement, so a slow `embed` call never holds the lock). The index is kept in
sync by triggers (see schema.py), so nothing here writes `memory_fts`.

Search text is untrusted: `fts_query` turns any string into a query FTS5 can
never reject (each word quoted as a phrase, joined with OR), so a `"`, `*`,
`AND`, `NEAR(` or `-` is just text.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

from loopterm.core.errors import ConfigError
from loopterm.core.memory import Embed
from loopterm.core.records import MemoryItem

KINDS = ("fact", "decision", "document")
LOOP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_KEY_CHARS = 1_000
MAX_VALUE_CHARS = 5_000_000
MAX_TERMS = 32  # words of a query actually searched for (the first distinct ones)
KEY_WEIGHT, VALUE_WEIGHT = 2.0, 1.0  # bm25 column weights: a word in the key counts double
EMBED_CANDIDATES = 50  # full-text candidates re-ranked when embeddings are used
EMBEDDED_SCAN = 1_000  # most recently updated items with a stored embedding also considered
COSINE_WEIGHT = 0.6  # blended score = 0.6 * cosine + 0.4 * bm25 (normalised to the best candidate)

COLUMNS = "id, loop, kind, key, value, source_run, created_at, updated_at"
UPSERT_SQL = f"""
INSERT INTO memory (loop, kind, key, value, source_run, created_at, updated_at, embedding)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (loop, key) DO UPDATE SET
    kind = excluded.kind, value = excluded.value, source_run = excluded.source_run,
    updated_at = excluded.updated_at,
    embedding = CASE WHEN excluded.embedding IS NOT NULL THEN excluded.embedding
                     WHEN memory.value = excluded.value THEN memory.embedding END
RETURNING {COLUMNS}
"""
SEARCH_SQL = f"""
SELECT {', '.join('m.' + c.strip() for c in COLUMNS.split(','))}, bm25(memory_fts, {KEY_WEIGHT}, {VALUE_WEIGHT}) AS rank
FROM memory_fts JOIN memory AS m ON m.id = memory_fts.rowid
WHERE memory_fts MATCH ? AND m.loop = ?
ORDER BY rank LIMIT ?
"""
# PostgreSQL: memory.fts is a generated tsvector, key weighted A and value B (pg_schema.py); ts_rank_cd
# weighs them {D, C, B, A} = {0.1, 0.2, 0.5, 1.0}, so a word in the key counts double, as with bm25 above.
# Each word of the query is its own plainto_tsquery (any text is valid), OR-ed together.
PG_WEIGHTS = "'{0.1, 0.2, 0.5, 1.0}'"
PG_SEARCH_SQL = """
SELECT {columns}, ts_rank_cd({weights}, m.fts, q.query, 1) AS rank
FROM memory AS m, (SELECT {match} AS query) AS q
WHERE m.fts @@ q.query AND m.loop = ?
ORDER BY rank DESC, m.id LIMIT ?
"""


def check_loop(loop: str) -> str:
    if not isinstance(loop, str) or not LOOP_NAME.match(loop):
        raise ConfigError(f"bad loop name {loop!r}: use letters, digits, '_', '.' and '-' (as in `loopterm loops`)")
    return loop


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown memory kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def _word_char(ch: str) -> bool:
    """Letters, digits and marks (what FTS5's unicode61 tokenizer keeps), so a word is never cut in two."""
    category = unicodedata.category(ch)
    return category[0] in "LNM" or category == "Co"


def words(text: str) -> list[str]:
    """The distinct words of `text`, in order (at most MAX_TERMS)."""
    found: list[str] = []
    seen: set[str] = set()
    current: list[str] = []
    for ch in text + " ":
        if _word_char(ch):
            current.append(ch)
            continue
        if current:
            word = "".join(current)
            current = []
            if word.casefold() not in seen:
                seen.add(word.casefold())
                found.append(word)
                if len(found) >= MAX_TERMS:
                    break
    return found


def fts_query(text: str) -> str:
    """An FTS5 query matching any word of `text`: each word a quoted phrase, joined with OR; "" if none.

    Quoting makes every operator (AND, OR, NOT, NEAR, *, ^, -, :, parentheses)
    plain text; a `"` cannot appear inside a word, and is doubled anyway.
    """
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words(text))


def _item(row: Sequence[Any], score: float | None = None) -> MemoryItem:
    return MemoryItem(
        id=row[0], loop=row[1], kind=row[2], key=row[3], value=row[4], source_run=row[5],
        created_at=row[6], updated_at=row[7], score=score,
    )


def _vector(values: Any, what: str) -> list[float]:
    """A non-empty list of finite floats, or ValueError naming `what`."""
    try:
        vector = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a list of numbers") from None
    if not vector or not all(math.isfinite(v) for v in vector):
        raise ValueError(f"{what} must be a non-empty list of finite numbers")
    return vector


def remember(
    conn: sqlite3.Connection, loop: str, key: str, value: str, kind: str, source_run: str | None, at: float,
    embedding: Sequence[float] | None,
) -> MemoryItem:
    check_loop(loop)
    check_kind(kind)
    if not isinstance(key, str) or not key.strip():
        raise ConfigError("a memory needs a non-empty key")
    if len(key) > MAX_KEY_CHARS:
        raise ConfigError(f"memory key is {len(key):,} characters; keep it under {MAX_KEY_CHARS:,} (put the text in the value)")
    if not isinstance(value, str):
        raise ConfigError(f"a memory's value must be text, got {type(value).__name__}")
    if len(value) > MAX_VALUE_CHARS:
        raise ConfigError(f"memory value is {len(value):,} characters; the limit is {MAX_VALUE_CHARS:,}")
    stored = json.dumps(_vector(embedding, "embedding")) if embedding is not None else None
    (row,) = conn.execute(UPSERT_SQL, [loop, kind, key, value, source_run, at, at, stored]).fetchall()
    return _item(row)


def memories(query: Query, loop: str, kind: str | None) -> list[MemoryItem]:
    check_loop(loop)
    if kind is None:
        rows = query(f"SELECT {COLUMNS} FROM memory WHERE loop = ? ORDER BY updated_at DESC, id DESC", [loop])
    else:
        check_kind(kind)
        rows = query(f"SELECT {COLUMNS} FROM memory WHERE loop = ? AND kind = ? ORDER BY updated_at DESC, id DESC", [loop, kind])
    return [_item(row) for row in rows]


def forget(conn: sqlite3.Connection, loop: str, key_or_id: str) -> bool:
    """Delete by key; failing that, by id when `key_or_id` is a number. True if something was deleted."""
    check_loop(loop)
    if conn.execute("DELETE FROM memory WHERE loop = ? AND key = ?", [loop, key_or_id]).rowcount:
        return True
    if re.fullmatch(r"[0-9]{1,18}", key_or_id or ""):
        return bool(conn.execute("DELETE FROM memory WHERE loop = ? AND id = ?", [loop, int(key_or_id)]).rowcount)
    return False


def memory_loops(query: Query) -> list[str]:
    return [loop for (loop,) in query("SELECT DISTINCT loop FROM memory ORDER BY loop", [])]


def search(query: Query, loop: str, text: str, limit: int, backend: str = "sqlite") -> list[MemoryItem]:
    """Full-text matches ranked by bm25 (score = -bm25: higher is better); on PostgreSQL by ts_rank_cd."""
    check_loop(loop)
    match = fts_query(text)
    if not match or limit <= 0:
        return []
    if backend == "postgresql":
        from loopterm.store.pg_schema import folded

        terms = words(text)
        sql = PG_SEARCH_SQL.format(
            columns=", ".join("m." + c.strip() for c in COLUMNS.split(",")), weights=PG_WEIGHTS,
            match=" || ".join(f"plainto_tsquery('english', {folded('?')})" for _ in terms),
        )
        return [_item(row, float(row[8])) for row in query(sql, [*terms, loop, int(limit)])]
    return [_item(row, -row[8]) for row in query(SEARCH_SQL, [match, loop, int(limit)])]


def embed_text(item: MemoryItem) -> str:
    """What is embedded for an item: its key, then its value."""
    return f"{item.key}\n{item.value}"


def _cosine(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return 0.0  # embedded by another model: no evidence either way
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def semantic_search(
    query: Query, loop: str, text: str, limit: int, embed: Embed, save: Callable[[list[tuple[str, int]]], None],
    backend: str = "sqlite",
) -> list[MemoryItem]:
    """Re-rank the full-text candidates plus the items with stored embeddings by
    COSINE_WEIGHT * cosine + (1 - COSINE_WEIGHT) * bm25 normalised to the best candidate.

    Candidates without a stored embedding are embedded in the same `embed` call
    as the query, and `save` is given (embedding JSON, id) pairs to store them.
    """
    check_loop(loop)
    if not text.strip() or limit <= 0:
        return []
    candidates: dict[int, MemoryItem] = {}
    relevance: dict[int, float] = {}
    match = fts_query(text)
    if match:
        for item in search(query, loop, text, max(limit * 4, EMBED_CANDIDATES), backend):
            candidates[item.id] = item
            relevance[item.id] = item.score or 0.0
    vectors: dict[int, list[float]] = {}
    rows = query(
        f"SELECT {COLUMNS}, embedding FROM memory WHERE loop = ? AND embedding IS NOT NULL "
        "ORDER BY updated_at DESC LIMIT ?", [loop, EMBEDDED_SCAN],
    )
    for row in rows:
        candidates.setdefault(row[0], _item(row))
        try:
            vectors[row[0]] = _vector(json.loads(row[8]), "stored embedding")
        except (ValueError, TypeError):
            pass  # a damaged vector: embed the item again below
    if match:  # embeddings of full-text candidates stored before this search (beyond the scan)
        missing = [i for i in candidates if i not in vectors]
        if missing:
            marks = ",".join("?" * len(missing))
            for item_id, stored in query(
                f"SELECT id, embedding FROM memory WHERE id IN ({marks}) AND embedding IS NOT NULL", missing
            ):
                try:
                    vectors[item_id] = _vector(json.loads(stored), "stored embedding")
                except (ValueError, TypeError):
                    pass
    if not candidates:
        return []
    todo = [item_id for item_id in candidates if item_id not in vectors]
    texts = [text] + [embed_text(candidates[i]) for i in todo]
    answered = list(embed(texts))
    if len(answered) != len(texts):
        raise ValueError(f"embed returned {len(answered)} vector(s) for {len(texts)} text(s); expected one per text")
    query_vector = _vector(answered[0], "the query's embedding")
    fresh = [(i, _vector(v, f"the embedding of memory {i}")) for i, v in zip(todo, answered[1:])]
    vectors.update(fresh)
    if fresh:
        save([(json.dumps(v), i) for i, v in fresh])
    best = max(relevance.values(), default=0.0)
    ranked: list[MemoryItem] = []
    for item_id, item in candidates.items():
        lexical = relevance.get(item_id, 0.0) / best if best > 0 else 0.0
        cosine = max(0.0, _cosine(query_vector, vectors[item_id]))
        ranked.append(item.model_copy(update={"score": COSINE_WEIGHT * cosine + (1 - COSINE_WEIGHT) * lexical}))
    ranked.sort(key=lambda item: (-(item.score or 0.0), -item.updated_at, item.id))
    return ranked[:limit]


class MemoryAccess:
    """Long-term memory's part of `Store` (mixed into it in store/db.py, whose connection, lock and
    transactions it uses)."""

    _conn: Any
    _lock: Any
    _clock: Callable[[], float]
    backend: str

    if TYPE_CHECKING:  # the Store's own
        def _write(self, *, power_safe: bool = True) -> AbstractContextManager[Any]: ...

        def _query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]: ...

    def remember(
        self, loop: str, key: str, value: str, kind: str = "fact", source_run: str | None = None,
        at: float | None = None, embedding: Sequence[float] | None = None,
    ) -> MemoryItem:
        """Store `value` under (loop, key); remembering a key again replaces value, kind and source
        (created_at kept, updated_at changed; a stored embedding is dropped if the value changed)."""
        with self._write():
            return remember(self._conn, loop, key, value, kind, source_run, self._clock() if at is None else at, embedding)

    def recall(self, loop: str, query: str, limit: int = 5, embed: Embed | None = None) -> list[MemoryItem]:
        """The loop's memories matching free text, best first (score: higher is better); [] for no words.

        Full-text (FTS5, bm25, key words weigh double); any text is a valid query.
        With `embed` (texts -> vectors), the full-text candidates and the items with
        stored embeddings are ranked by cosine similarity blended with bm25, and
        vectors computed for items are stored for next time.
        """
        if embed is None:
            return search(self._query, loop, query, limit, self.backend)
        return semantic_search(self._query, loop, query, limit, embed, self._save_embeddings, self.backend)

    def _save_embeddings(self, pairs: list[tuple[str, int]]) -> None:
        with self._write():  # an item forgotten meanwhile is simply not updated
            self._conn.executemany("UPDATE memory SET embedding = ? WHERE id = ?", pairs)

    def memories(self, loop: str, kind: str | None = None) -> list[MemoryItem]:
        """Everything the loop remembers (only `kind`, if given), most recently updated first."""
        return memories(self._query, loop, kind)

    def forget(self, loop: str, key_or_id: str) -> bool:
        """Delete the loop's memory with this key (or, failing that, this numeric id); False if there is none."""
        with self._write():
            return forget(self._conn, loop, key_or_id)

    def memory_loops(self) -> list[str]:
        """The loops that remember anything, by name."""
        return memory_loops(self._query)
