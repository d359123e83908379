"""Whether an engine is executing a run now: its heartbeat, its log, and on this machine its process.

Resume, the daemon and the TUI ask before they take a run: two engines would fire its side effects twice.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from loopterm.core import runlog as log
from loopterm.core.fold import RunView
from loopterm.core.records import RunRecord
from loopterm.core.termination import Status

HEARTBEAT_S = 2.0  # an executing engine touches its run this often, even while paused or waiting
STALE_AFTER_S = 10.0


def alive(run: RunRecord, now: float | None = None) -> bool:
    """Whether some engine is executing this run now: a fresh heartbeat on an unfinished run.

    A run killed with SIGKILL keeps its last status; its heartbeat going stale is what tells.
    """
    if Status(run.status).finished:
        return False
    return (now if now is not None else time.time()) - run.updated_at < STALE_AFTER_S


def executing_elsewhere(run: RunRecord, view: RunView, now: float | None = None) -> bool:
    """Whether an engine in another process is executing this run now: a start with no end after it and a
    fresh heartbeat (a run that just exited waiting on a person has a fresh heartbeat but an end). On the
    machine that started it, the process itself tells at once: one killed a moment ago is not executing."""
    start = view.open_start
    if start is None or not alive(run, now):
        return False
    assert isinstance(start.event, (log.RunStarted, log.RunResumed))
    pid, host = start.event.pid, start.event.host
    if isinstance(pid, int) and host == socket.gethostname():
        if pid == os.getpid():
            return False  # this process: its caller knows its own engines
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process with that pid
        return not _zombie(pid)
    return True


def _zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet still has its pid (Linux: state Z in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("Z", "X")
