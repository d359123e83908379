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

from loopterm.store.delta import content_hash, dumps, loads

INLINE_MAX = 64
LIST_INLINE_MAX = 4
SEPARATOR = "\n\n"


def encode_prompt(messages: list[dict[str, Any]], new_blobs: dict[str, str]) -> list[dict[str, Any]]:
    """The stored form of `messages`; sections to store are added to `new_blobs` (hash -> text)."""
    encoded: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        rest = {key: value for key, value in message.items() if key != "content"}
        if isinstance(content, str):
            refs = [_ref(section, new_blobs) for section in content.split(SEPARATOR)]
            item: dict[str, Any] = {"role": message["role"]} if len(message) == 2 and isinstance(message.get("role"), str) else {"m": rest}
            if len(refs) > LIST_INLINE_MAX:
                body = dumps(refs)
                digest = content_hash(body)
                new_blobs[digest] = body
                item["l"] = digest
            else:
                item["s"] = refs
            encoded.append(item)
        elif "content" in message:
            encoded.append({"m": rest, "v": content})
        else:
            encoded.append({"m": rest})
    return encoded


def _ref(section: str, new_blobs: dict[str, str]) -> str:
    if len(section) <= INLINE_MAX:
        return "=" + section
    digest = content_hash(section)
    new_blobs[digest] = section
    return "#" + digest


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
