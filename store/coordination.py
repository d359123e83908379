"""What processes sharing a PostgreSQL store use to coordinate: notifications after each commit that matters
to a watcher or an engine (LISTEN/NOTIFY), and the per-run lock that lets only one engine drive a run
(a session-level advisory lock). On SQLite both are no-ops: callers keep polling, and one machine's engines
keep to the heartbeat they already have.

The notifications themselves are sent by triggers in the same transaction as the rows (store/pg_schema.py),
so a subscriber hears of a commit only once it is visible, and of nothing that was rolled back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Coordination:
    """Mixed into `Store` (store/db.py), whose URL and lock it uses."""

    _url: str | None
    _lock: threading.RLock
    _run_locks: Any
    _listeners: list[Any]

    def _init_coordination(self) -> None:
        self._run_locks = None  # store/pg.py's RunLocks, made on the first drive()
        self._listeners = []

    def _stop_coordination(self) -> None:
        """On close: stop every subscription and release every run this Store drives."""
        for listener in self._listeners:
            listener.stop()
        self._listeners.clear()
        if self._run_locks is not None:
            self._run_locks.close()
            self._run_locks = None

    def subscribe(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        """Call `callback(kind, run_id)` (from a background thread) after each commit, by any process, that
        writes an iteration ("iteration"), an event ("event"), a command ("command") or a run's creation or
        status ("run"); returns the function that stops it. On SQLite it never calls back: keep polling
        (on PostgreSQL too, as a fallback: a notification may be missed while the connection is re-made)."""
        if self._url is None:
            return lambda: None
        from loopterm.store.pg import Listener

        listener = Listener(self._url, callback)
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            listener.stop()
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def drive(self, run_id: str) -> bool:
        """Claim the right to execute `run_id`: False if another session (process, or Store) holds it.
        PostgreSQL: a session-level advisory lock on a connection of its own, released by undrive, close,
        or the process dying. SQLite: always True (one machine; the engine's heartbeat guards it)."""
        if self._url is None:
            return True
        with self._lock:
            if self._run_locks is None:
                from loopterm.store.pg import RunLocks

                self._run_locks = RunLocks(self._url)
            locks = self._run_locks
        return bool(locks.drive(run_id))

    def undrive(self, run_id: str) -> None:
        """Release what drive(run_id) took (nothing if it was not held)."""
        if self._run_locks is not None:
            self._run_locks.undrive(run_id)
