"""What the command-line modules share: which store (a SQLite path or a PostgreSQL URL: store/target.py),
exit codes, and the one-line error on stderr.

tui/cli.py, commands.py, daemon.py, traces.py and the app import these from here, never from each other.
Standard library only at import: `loopterm --help` must stay fast (loopterm.core loads on first error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget

DEFAULT_DB = Path(".loopterm") / "loopterm.db"
USAGE_ERROR = 2


def default_db() -> Path:
    """The SQLite store when no --db is given: $LOOPTERM_DB, else .loopterm/loopterm.db under the working
    directory (a PostgreSQL URL there is refused: use `default_target`)."""
    return _sqlite_path(default_target())


def db_path(args: argparse.Namespace) -> Path:
    """The SQLite store a command's arguments name (--db), else the default one (see `store_target`)."""
    return _sqlite_path(store_target(args))


def default_target() -> StoreTarget:
    """The store when no --db is given: $LOOPTERM_DB (a path or a postgresql:// URL), else .loopterm/loopterm.db."""
    from loopterm.core.settings import settings  # pydantic-settings loads on first use, never for --help
    from loopterm.store.target import StoreTarget

    return StoreTarget.parse(settings().db, "LOOPTERM_DB=")


def store_target(args: argparse.Namespace) -> StoreTarget:
    """The store a command's arguments name (--db: a path or a postgresql:// URL), else the default one."""
    given = getattr(args, "db", None) or getattr(args, "main_db", None)  # `loopterm runs --db X` or `loopterm --db X runs`
    if not given:
        return default_target()
    from loopterm.store.target import StoreTarget

    return StoreTarget.parse(given, "--db ")


def _sqlite_path(target: StoreTarget) -> Path:
    if target.path is None:
        from loopterm.core.errors import ConfigError

        raise ConfigError(f"{target.shown} is a PostgreSQL store; this needs a SQLite file")
    return target.path


def error(message: object, limit: int | None = None) -> None:
    """``loopterm: <message>`` as one line on stderr (loopterm.core.text.one_line, capped at ``limit``)."""
    from loopterm.core.text import ONE_LINE_LIMIT, one_line  # loopterm.core takes a while: only when needed

    print(f"loopterm: {one_line(message, ONE_LINE_LIMIT if limit is None else limit)}", file=sys.stderr, flush=True)
