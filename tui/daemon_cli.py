"""`loopterm daemon`: start loops when triggers fire (file changes, schedules, failing commands).

Start-up stays fast: only the standard library at the top; the triggers file model, the engine,
the store and watchfiles load inside `run`. The daemon itself is `loopterm.tui.daemon`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, IO, Any

from loopterm.tui import arguments

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget

DEFAULT_GRACE_S = 30.0


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `daemon` subcommand; `db` is the parent parser that carries --db."""
    daemon = sub.add_parser(
        "daemon", parents=[db], help="start loops when files change, on a schedule, or when a command fails",
        description="Run the triggers of a triggers file (default .loopterm/triggers.toml): on a file change under a "
                    "path, on a schedule, or when a command starts failing, start the trigger's loop with the event in "
                    "its goal. Every run goes to the store (`loopterm runs`, `loopterm watch RUN`) and through the daily "
                    "budget. SIGTERM or ctrl+c stops it cleanly; started again, it first resumes the runs it had to stop.",
    )
    daemon.add_argument("--triggers", type=Path, metavar="FILE", help="the triggers file (default: .loopterm/triggers.toml)")
    daemon.add_argument("--check", action="store_true", help="check the triggers file, its loops, models, paths and "
                                                             "commands, then exit (0 when all is well); start nothing")
    daemon.add_argument("--grace", type=arguments.seconds, default=DEFAULT_GRACE_S, metavar="SECONDS",
                        help=f"on SIGTERM, how long running runs get to reach an iteration boundary before they are "
                             f"cancelled (default {DEFAULT_GRACE_S:g})")


def _lock(db: StoreTarget) -> IO[str]:
    """One daemon per store (on this machine, for a server store): an exclusive lock on `<db>.daemon.lock`
    (store/target.py's lock_path), held while the daemon runs."""
    from loopterm.core.errors import ConfigError

    path = db.lock_path("daemon")
    handle = path.open("a+", encoding="utf-8")
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock on this platform: no guard
        return handle
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"another `loopterm daemon` (pid {holder}) is running on {db}; stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def run(args: argparse.Namespace, db: StoreTarget) -> int:
    import asyncio

    from loopterm.core.triggers import DEFAULT_FILE, load_triggers
    from loopterm.tui.daemon import TriggerDaemon, log_line, prepare

    path: Path = args.triggers or DEFAULT_FILE
    config = load_triggers(path)
    slots = prepare(config, str(path), Path.cwd())
    if args.check:
        log_line(f"daemon: {path} is valid: " + ", ".join(f"{s.name} ({s.trigger.on.kind if s.trigger else '?'} -> "
                                                         f"{s.loop.name})" for s in slots))
        return 0

    queued = _cluster(args, db)
    if queued is not None:
        return queued(path, slots)
    store = db.open()
    lock = _lock(db)
    try:
        daemon = TriggerDaemon(store, db, path, slots, cwd=Path.cwd(), grace=args.grace)
        asyncio.run(daemon.serve())
    finally:
        store.close()
        lock.close()
    return 0


def _cluster(args: argparse.Namespace, db: Any) -> Any:
    """On a PostgreSQL store (or with LOOPTERM_QUEUE_DB): the daemon that queues its runs for the workers
    (tui/daemon_queue.py), as a function of (triggers file, slots); None otherwise. No file lock: several
    daemons on one triggers file make one run per firing (its id)."""
    from loopterm.core.queues import is_postgres
    from loopterm.core.settings import settings
    from loopterm.tui.submit_cli import store_location

    location = store_location(args)
    if not is_postgres(location) and not settings().queue_db:
        return None

    def serve(path: Path, slots: list[Any]) -> int:
        import asyncio

        from loopterm.core.queues import Queues, queue_db
        from loopterm.store import Store
        from loopterm.tui.daemon_queue import QueueingDaemon

        with Queues(queue_db(location, what="`loopterm daemon`")) as queues, Store.open(location) as store:
            daemon = QueueingDaemon(store, db, path, slots, cwd=Path.cwd(), grace=args.grace, queues=queues)
            asyncio.run(daemon.serve())
        return 0

    return serve
