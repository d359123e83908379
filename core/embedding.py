"""Embeddings through litellm, for ranking long-term memory by meaning as well as by words.

A loop sets `embedding_model` (a litellm embedding model string, e.g.
`openai/text-embedding-3-small`); without one, memory is ranked by full-text
search alone (FTS5, bm25). `scripted/<name>` is the offline embedding model:
hashed words, through litellm's own embedding path.
"""

from __future__ import annotations

from collections.abc import Sequence

from loopterm.core.memory import Embed


def litellm_embedder(model: str) -> Embed:
    """A function from texts to vectors that calls `model` through litellm (one request per call)."""
    from loopterm.core.model import _litellm, redact

    if model.startswith("scripted/"):
        from loopterm.core.scripted import register_embedding_model

        register_embedding_model(model.removeprefix("scripted/"))

    def embed(texts: list[str]) -> Sequence[Sequence[float]]:
        litellm = _litellm()
        try:
            response = litellm.embedding(model=model, input=texts)
        except Exception as exc:  # noqa: BLE001 - reported as one line by the caller
            raise RuntimeError(f"embedding model {model} failed: {redact(str(exc))[:300]}") from None
        data = sorted(response.data, key=lambda d: d["index"] if isinstance(d, dict) else d.index)
        return [list(d["embedding"] if isinstance(d, dict) else d.embedding) for d in data]

    return embed
