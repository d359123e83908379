"""The App's long-lived heap, kept out of the garbage collector's way so keystrokes stay under 100 ms.

A full (generation 2) collection walks every object the collector tracks. With Textual, litellm and a
10,000-iteration run loaded that took 83-136 ms, and it fell inside key presses (bench/tui_perf.py).
What the App keeps for its life (modules, widgets, the shown run's rows and fold) is moved to the
permanent generation with `gc.freeze()`, which full collections skip: after the first frame, when a run
has loaded on screen, and after a full collection that took long (what survived it is long-lived).

A freeze costs nothing (no collection: one over a big heap would itself be the pause we avoid). Frozen
objects are still freed by reference counting; only a reference cycle that dies after a freeze (a dialog
open at that moment, closed later) waits until the App ends, when `release()` hands everything back to
the collector (a test process opens hundreds of Apps).
"""

from __future__ import annotations

import gc
import time
from typing import Any

SLOW_FULL_COLLECTION_S = 0.02  # a full collection longer than this freezes what survived it
CHECK_SECONDS = 0.5

_slow_full_collections = 0  # process-wide: the collector's callback cannot know which App it slowed
_started = 0.0


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    global _started, _slow_full_collections
    if info.get("generation") != 2:
        return
    if phase == "start":
        _started = time.perf_counter()
    elif time.perf_counter() - _started > SLOW_FULL_COLLECTION_S:
        _slow_full_collections += 1


def freeze() -> None:
    """Everything alive now is long-lived: full collections skip it from here on."""
    gc.freeze()


def release() -> None:
    """The App ends: what it froze is the collector's again."""
    gc.unfreeze()


class HeapKeeper:
    """Freezes the App's heap at the moments the module docstring names; `check()` runs on a timer."""

    def __init__(self) -> None:
        if _on_collection not in gc.callbacks:
            gc.callbacks.append(_on_collection)
        self._seen_slow = _slow_full_collections
        self._loaded: object | None = None

    def check(self, loaded: object | None) -> None:
        """`loaded`: the view on screen once it has loaded (None while loading or with none); a new one freezes."""
        if loaded is not None and loaded is not self._loaded:
            self._loaded = loaded
            freeze()
            self._seen_slow = _slow_full_collections
        elif _slow_full_collections != self._seen_slow:
            self._seen_slow = _slow_full_collections
            freeze()
