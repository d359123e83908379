"""A dead worker's segments taken over by a live one, without a person.

DBOS (open source) recovers a process's own PENDING workflows when it starts again with the same executor
id, and can recover any executor's from any process (`DBOS._recover_pending_workflows(executor_ids)`: it
puts them back on their queues, idempotently: a workflow some live executor has dequeued since is left
alone). What it does not do without its hosted Conductor is notice that an executor died. This module does:

- each worker holds a PostgreSQL session advisory lock named by its executor id, on a connection of its
  own, for as long as it lives; the server releases it when the process dies (or its connection drops);
- every few seconds each worker lists the executors with PENDING segments and tries their locks: one it
  gets belongs to a dead worker, whose segments it recovers, then lets the lock go;
- a worker whose own lock connection breaks stops at once (exit 70): others may be taking its segments
  over, and an engine must not go on beside a successor (the store's per-run lock is the second guard).

The recovered segment is an ordinary segment: the crash-tested resume from the journal (core/segments.py).
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from typing import Any, Callable

from loopterm.core.errors import ConfigError

LOCK_CLASS = 0x4C54  # "LT": the first key of the two-key advisory locks (the store's per-run locks use one key)
EVERY_S = 2.0
LOST_EXIT = 70  # EX_SOFTWARE: this worker lost its database session and stopped


def lock_key(executor_id: str) -> int:
    """The second key of an executor's lock: a signed 32-bit CRC of its id."""
    value = zlib.crc32(executor_id.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class ExecutorLock:
    """This worker's own lock: taken before DBOS starts (so a takeover of an earlier process with the
    same id finishes first), held until the process ends."""

    def __init__(self, url: str, executor_id: str, *, wait_s: float = 15.0) -> None:
        import psycopg

        self.executor_id = executor_id
        try:
            self.conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            from loopterm.core.queues import redact_url

            raise ConfigError(f"cannot reach the queue database {redact_url(url)}: "
                              f"{redact_url(' '.join(str(exc).split()))[:300]}; check the URL and that the server is up") from None
        self.conn.execute(f"SET lock_timeout = '{int(wait_s * 1000)}ms'")
        try:
            self.conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key(executor_id)))
        except psycopg.errors.LockNotAvailable:
            self.conn.close()
            raise ConfigError(f"another worker with id {executor_id!r} is running; give this one another --id") from None
        self.conn.execute("SET lock_timeout = 0")

    def alive(self) -> bool:
        """Whether the session holding the lock still answers."""
        try:
            self.conn.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means the lock may be gone
            return False

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


def dead_executors(conn: Any, executors: set[str]) -> list[str]:
    """Those of `executors` whose lock nobody holds: their processes are gone. Each is left locked by
    `conn` (the caller recovers it, then calls `release`), so two workers never recover one executor at once."""
    dead = []
    for executor in sorted(executors):
        got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key(executor))).fetchone()
        if got and got[0]:
            dead.append(executor)
    return dead


def release(conn: Any, executor: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, lock_key(executor)))


class Takeover(threading.Thread):
    """The watch on other workers (a daemon thread): every `every` seconds, recover the PENDING segments
    of executors that died. `pending` lists the executor ids with PENDING segments; `recover` puts one
    executor's back on their queues; `said` reports a takeover."""

    def __init__(self, url: str, me: ExecutorLock, *, pending: Callable[[], set[str]],
                 recover: Callable[[str], int], said: Callable[[str], None], every: float = EVERY_S) -> None:
        super().__init__(name="loopterm-takeover", daemon=True)
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.me = me
        self.pending = pending
        self.recover = recover
        self.said = said
        self.every = every
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            if not self.me.alive():
                self.said(f"lost the database session that holds this worker's lock; stopping now (exit {LOST_EXIT}) "
                          "so that no engine runs beside the worker taking its runs over")
                sys.stderr.flush()
                os._exit(LOST_EXIT)
            try:
                self.once()
            except Exception as exc:  # noqa: BLE001 - the database may be away for a while: try again later
                self.said(f"takeover check failed ({exc.__class__.__name__}); trying again in {self.every:g}s")

    def once(self) -> list[str]:
        """One look: the dead executors whose segments were put back on their queues."""
        others = self.pending() - {self.me.executor_id}
        taken = []
        for executor in dead_executors(self.conn, others):
            try:
                count = self.recover(executor)
                self.said(f"worker {executor} is gone: {count} segment(s) of it back on the queues")
                taken.append(executor)
            finally:
                release(self.conn, executor)
        return taken

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
