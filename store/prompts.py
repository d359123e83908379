"""Prompts stored by section, so repeated text (system prompt, tool docs, examples) is stored once.

Each message's text content is split on blank lines ("\\n\\n"); every section
longer than INLINE_MAX characters goes to `blobs` under its content hash and
the iteration keeps only "#<hash>". Shorter sections stay inline as "=<text>":
a reference plus a blob row would cost more than the text itself.

A message {"role": r, "content": str} is stored as {"role": r, "s": [refs]};
any other shape as {"m": <the message without content>, "s": [refs]} (text
content), {"m": ..., "v": content} (non-text content) or {"m": ...} (none).
When a message has more than LIST_INLINE_MAX sections, its list of refs is
itself a blob and "s": [refs] becomes "l": <hash>: a long system prompt that
repeats every iteration then costs one reference, not one per section.
Joining the sections with "\\n\\n" gives the content back exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loopterm.store.delta import content_hash, dumps_fast, loads

INLINE_MAX = 64
LIST_INLINE_MAX = 4
SEPARATOR = "\n\n"


# A text content's refs and the blobs they name, by the text: a loop's system message is the same every
# iteration and most of its user message's sections too, so hashing them again was most of this module's
# time per iteration. Bounded by total characters; cleared when full (the next iteration refills it).
_MEMO_CHARS = 4_000_000
_refs_memo: dict[str, tuple[list[str], dict[str, str]]] = {}
_memo_chars = 0


def encode_prompt(messages: list[dict[str, Any]], new_blobs: dict[str, str]) -> list[dict[str, Any]]:
    """The stored form of `messages`; sections to store are added to `new_blobs` (hash -> text)."""
    encoded: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            refs, blobs = _content_refs(content)
            new_blobs.update(blobs)
            if len(message) == 2 and isinstance(message.get("role"), str):
                item: dict[str, Any] = {"role": message["role"]}
            else:
                item = {"m": {key: value for key, value in message.items() if key != "content"}}
            if len(refs) > LIST_INLINE_MAX:
                digest = next(iter(blobs))  # the ref list's own blob comes first
                item["l"] = digest
            else:
                item["s"] = list(refs)
            encoded.append(item)
        elif "content" in message:
            encoded.append({"m": {key: value for key, value in message.items() if key != "content"}, "v": content})
        else:
            encoded.append({"m": dict(message)})
    return encoded


def _content_refs(content: str) -> tuple[list[str], dict[str, str]]:
    """A text content's refs and the blobs they need (hash -> text; the ref list's own first, when it is
    one), from the memo or computed (then remembered, a section at a time as well as the whole text)."""
    known = _refs_memo.get(content)
    if known is not None:
        return known
    sections: dict[str, str] = {}
    refs = []
    for section in content.split(SEPARATOR):
        if len(section) <= INLINE_MAX:
            refs.append("=" + section)
            continue
        hit = _refs_memo.get(section)
        digest = next(iter(hit[1])) if hit is not None and len(hit[0]) == 1 and hit[0][0][:1] == "#" else content_hash(section)
        sections[digest] = section
        refs.append("#" + digest)
        if hit is None and section != content:
            _remember(section, (["#" + digest], {digest: section}))
    blobs: dict[str, str] = {}
    if len(refs) > LIST_INLINE_MAX:
        body = dumps_fast(refs)  # orjson: the same text as the standard library's for a list of strings
        blobs[content_hash(body)] = body
    blobs.update(sections)
    found = (refs, blobs)
    _remember(content, found)
    return found


def _remember(text: str, found: tuple[list[str], dict[str, str]]) -> None:
    global _memo_chars
    if _memo_chars + len(text) > _MEMO_CHARS:
        _refs_memo.clear()
        _memo_chars = 0
    _refs_memo[text] = found
    _memo_chars += len(text)


def decode_prompt(
    encoded: list[dict[str, Any]], blobs: dict[str, str], fetch: Callable[[list[str]], dict[str, str]]
) -> list[dict[str, Any]]:
    """The messages back, exactly. `blobs` caches blob texts by hash (filled here, shared across
    calls); `fetch(hashes)` reads the missing ones (two batches at most: ref lists, then sections)."""

    def need(hashes: list[str]) -> None:
        missing = [digest for digest in dict.fromkeys(hashes) if digest not in blobs]
        if missing:
            blobs.update(fetch(missing))

    need([item["l"] for item in encoded if "l" in item])
    refs = [loads(blobs[item["l"]]) if "l" in item else item.get("s") for item in encoded]
    need([ref[1:] for group in refs if group for ref in group if ref[:1] == "#"])
    messages: list[dict[str, Any]] = []
    for item, group in zip(encoded, refs):
        message = dict(item["m"]) if "m" in item else {"role": item["role"]}
        if group is not None:
            message["content"] = SEPARATOR.join(ref[1:] if ref[:1] == "=" else blobs[ref[1:]] for ref in group)
        elif "v" in item:
            message["content"] = item["v"]
        messages.append(message)
    return messages
