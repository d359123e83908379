"""The run on screen, and the messages and guards the App's handlers share."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from loopterm.core.control import (
    EditState,
)
from loopterm.core.fold import RunView
from loopterm.core.records import RunRecord
from textual.css.query import NoMatches
from textual.message import Message

FINISHED = {"converged", "terminated", "failed", "stopped"}
RUNNING = {"running", "stepping"}



def on_screen(method: Any) -> Any:
    """For handlers that touch the main screen's widgets: a no-op while the App shuts down (timers and
    thread callbacks can still arrive after the widgets are gone)."""

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (NoMatches, LookupError):  # a widget, or the main screen itself, already gone
            if self.shutting_down or not self.is_running:
                return None
            raise

    return wrapper


class EngineNotice(Message):
    """An engine event, posted by an engine's subscriber; the App's handler does the rest."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


@dataclass
class View:
    """The run on screen and what has been read of it so far."""

    run_id: str
    run: RunRecord
    loading: bool = True
    log: RunView = field(default_factory=RunView)  # the fold of its log (core/fold.py), as far as it was read
    costs: array[float] = field(default_factory=lambda: array("d"))  # spend per iteration (8 bytes each)
    cost_max: float = 0.0
    detail_n: int | None = None


@dataclass
class EditInFlight:
    """A state edit this window sent and whose outcome it has not seen yet (the engine may refuse it as stale)."""

    run_id: str
    command: EditState
    command_id: int  # its row in the control channel: the engine's outcome names it

