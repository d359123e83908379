"""The journal the engine writes to. `loopterm.store.Store` implements it.

Defined in core so the engine never depends on SQLite; tests may pass any
implementation. Every method commits before returning, except the writes a
caller marks `durable=False`: those join the next write (one commit fewer per
iteration, where a commit waits for the disk), and the engine calls flush()
before anything slow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from loopterm.core.runlog import EventRecord, RunEvent
from loopterm.core.records import (
    CommandRecord,
    Intent,
    IterationRecord,
    RunRecord,
    ToolCallRecord,
)


class GrownList(list[Any]):
    """A list known to be `base` (another list) plus items appended after it.

    The engine builds these for a state's log-like fields (list[str]) after one
    comparison of its own, and hands the dump over (commit_iteration(handover=
    True)), so the journal can store an append without comparing the whole
    list again. `base` is a promise about identity: new[:len(base)] are base's
    very objects.
    """

    __slots__ = ("base",)

    def __init__(self, base: list[Any], appended: list[Any]) -> None:
        super().__init__(base)
        self.extend(appended)
        self.base: list[Any] | None = base


class Journal(Protocol):
    def create_run(self, run: RunRecord, events: Sequence[tuple[str, RunEvent, int | None]] = ()) -> None: ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def update_run(self, run_id: str, **fields: Any) -> None: ...

    def commit_iteration(self, record: IterationRecord, run_fields: dict[str, Any], *, handover: bool = False,
                         events: Sequence[RunEvent] = ()) -> list[EventRecord]:
        """Atomically: insert the iteration, update the run's totals, drop the intent for it, append `events`.

        handover=True: the caller never mutates `record.state` afterwards, so the
        journal may keep it instead of a copy.
        """
        ...

    def get_iteration(self, run_id: str, n: int) -> IterationRecord | None: ...

    def last_iterations(self, run_id: str, k: int) -> list[IterationRecord]:
        """The last k committed iterations, oldest first."""
        ...

    def append_event(self, run_id: str, event: RunEvent, iteration: int | None = None) -> EventRecord: ...

    def events(self, run_id: str, after_id: int = 0) -> list[EventRecord]: ...

    def save_intent(self, intent: Intent, *, durable: bool = True) -> None:
        """durable=False: written with the journal's next write, or by flush(); dropped if the
        iteration commits first (the iteration then holds everything the intent did)."""
        ...

    def load_intent(self, run_id: str, n: int) -> Intent | None: ...

    def tool_call(self, key: str) -> ToolCallRecord | None: ...

    def tool_call_started(self, record: ToolCallRecord, *, power_safe: bool = True, durable: bool = True) -> None:
        """power_safe=False: durable against the process dying, not against a power loss (cheaper).
        durable=False (a call without side effects only): written with the journal's next write, or by flush()."""
        ...

    def tool_call_finished(self, key: str, result: dict[str, Any], finished_at: float, *, durable: bool = True) -> None:
        """durable=False: written with the journal's next write, or by flush()."""
        ...

    def flush(self) -> None:
        """Write everything queued by durable=False calls now."""
        ...

    def pending_commands(self, run_id: str) -> list[CommandRecord]: ...

    def subscribe(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        """Call callback(kind, run_id) from another thread when any process commits an iteration, a command or
        an event; returns the unsubscribe function. A journal that cannot notify never calls (callers poll)."""
        ...

    def drive(self, run_id: str) -> bool:
        """Take the run's lock for as long as this engine executes it; False when another engine holds it.
        A journal on one machine may always say True (liveness is checked from heartbeats instead)."""
        ...

    def undrive(self, run_id: str) -> None: ...

    def consume_command(self, command_id: int, events: Sequence[tuple[RunEvent, int | None]] = ()) -> list[EventRecord]:
        """Mark the command handled and append what it did (events at iterations), in one commit."""
        ...
