"""One line of text for a terminal: how every error, log line and summary is flattened and capped.

Standard library only; every layer imports it (store, tui, themes, examples), so it imports nothing of loopterm.
"""

from __future__ import annotations

import re

# Control characters (an exception's or a file's ANSI escapes), unpaired surrogates and bidi overrides:
# shown as escapes, never sent to the terminal as they are.
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")

ONE_LINE_LIMIT = 2_000


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, the last one an ellipsis when it was cut."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def one_line(text: object, limit: int = ONE_LINE_LIMIT) -> str:
    """``text`` as one line a terminal shows as written: whitespace collapsed, control characters,
    unpaired surrogates and bidi overrides as escapes, capped at ``limit`` characters."""
    flat = _UNSHOWN.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), " ".join(str(text).split()))
    return clip(flat, limit)


def first_line(text: object) -> str:
    """The first line of ``text`` that is not blank, stripped ('' when there is none)."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")
