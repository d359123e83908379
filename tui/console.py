"""What the command-line modules share: where the store is, exit codes, and the one-line error on stderr.

tui/cli.py, commands.py, daemon.py, traces.py and the app import these from here, never from each other.
Standard library only at import: `loopterm --help` must stay fast (loopterm.core loads on first error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DB = Path(".loopterm") / "loopterm.db"
USAGE_ERROR = 2


def default_db() -> Path:
    """The store when no --db is given: $LOOPTERM_DB, else .loopterm/loopterm.db under the working directory."""
    from loopterm.core.settings import settings  # pydantic-settings loads on first use, never for --help

    return settings().db


def db_path(args: argparse.Namespace) -> Path:
    """The store a command's arguments name (--db), else the default one."""
    return getattr(args, "db", None) or default_db()


def error(message: object, limit: int | None = None) -> None:
    """``loopterm: <message>`` as one line on stderr (loopterm.core.text.one_line, capped at ``limit``)."""
    from loopterm.core.text import ONE_LINE_LIMIT, one_line  # loopterm.core takes a while: only when needed

    print(f"loopterm: {one_line(message, ONE_LINE_LIMIT if limit is None else limit)}", file=sys.stderr, flush=True)
