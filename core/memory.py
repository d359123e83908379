"""Long-term memory as the engine sees it: a Protocol, so core never imports the store.

`loopterm.store.Store` implements it (SQLite, FTS5 full-text search ranked by
bm25). Memory belongs to a loop by name: what one run remembers, later runs of
the same loop can recall. Embeddings are optional and supplied by the caller
(`embed`, a function from texts to vectors, e.g. one calling litellm's
`aembedding` in core), so the store never calls a model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from loopterm.core.records import MemoryItem

# texts -> one vector per text, in order.
Embed = Callable[[list[str]], Sequence[Sequence[float]]]


@runtime_checkable
class LongTermMemory(Protocol):
    def remember(
        self,
        loop: str,
        key: str,
        value: str,
        kind: str = "fact",
        source_run: str | None = None,
        at: float | None = None,
        embedding: Sequence[float] | None = None,
    ) -> MemoryItem:
        """Store `value` under `key` for the loop; remembering a key again replaces its value and kind
        (created_at is kept, updated_at changes). kind: "fact" | "decision" | "document"."""
        ...

    def recall(self, loop: str, query: str, limit: int = 5, embed: Embed | None = None) -> list[MemoryItem]:
        """The loop's best matches for free text (never a syntax error), best first, each with a score;
        [] for a query without words. With `embed`, ranked by cosine similarity blended with bm25."""
        ...

    def memories(self, loop: str, kind: str | None = None) -> list[MemoryItem]:
        """Everything the loop remembers (of one kind), most recently updated first."""
        ...
