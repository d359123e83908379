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


# Hashing a prompt's sections again each iteration was most of this module's time: a loop's system message
# is the same every iteration (whole texts: a few kept, by the text) and most of its user message's
# sections too (each section's digest, by the section: strings only, bounded by characters held). Both
# cleared when full; the next iteration refills them.
_TEXTS_KEPT = 32
_SECTION_CHARS = 4_000_000
_texts: dict[str, tuple[list[str], dict[str, str]]] = {}
_digests: dict[str, str] = {}
_digest_chars = [0]


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
    one); the caller must not change them (they may be the memo's)."""
    known = _texts.get(content)
    if known is not None:
        return known
    sections: dict[str, str] = {}
    refs = []
    for section in content.split(SEPARATOR):
        if len(section) <= INLINE_MAX:
            refs.append("=" + section)
            continue
        digest = _digests.get(section)
        if digest is None:
            digest = content_hash(section)
            if _digest_chars[0] + len(section) > _SECTION_CHARS:
                _digests.clear()
                _digest_chars[0] = 0
            _digests[section] = digest
            _digest_chars[0] += len(section)
        sections[digest] = section
        refs.append("#" + digest)
    blobs: dict[str, str] = {}
    if len(refs) > LIST_INLINE_MAX:
        body = dumps_fast(refs)  # orjson: the same text as the standard library's for a list of strings
        blobs[content_hash(body)] = body
    blobs.update(sections)
    if len(_texts) >= _TEXTS_KEPT:
        _texts.clear()
    _texts[content] = found = (refs, blobs)
    return found


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
