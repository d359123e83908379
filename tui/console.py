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

    return in_existing_folder(settings().db, "LOOPTERM_DB=")


def db_path(args: argparse.Namespace) -> Path:
    """The store a command's arguments name (--db), else the default one."""
    given = getattr(args, "db", None)
    return in_existing_folder(given, "--db ") if given else default_db()


def in_existing_folder(path: Path, named_by: str) -> Path:
    """A store path someone typed must be in a folder that exists: a typo is refused, not made a new empty
    store. Only the default, .loopterm/loopterm.db, has its folder created."""
    if path.expanduser().absolute() == DEFAULT_DB.absolute():  # the default, however it is spelt
        return path
    folder = path.expanduser().parent
    try:
        folder.stat()
    except FileNotFoundError:
        from loopterm.core.errors import ConfigError

        raise ConfigError(f"{named_by}{path}: the folder {folder} does not exist; create it (mkdir -p {folder}) "
                          "or check the path") from None
    except OSError:
        pass  # a part of it is a file, or it cannot be read: the store says which when it opens the path
    return path


def error(message: object, limit: int | None = None) -> None:
    """``loopterm: <message>`` as one line on stderr (loopterm.core.text.one_line, capped at ``limit``)."""
    from loopterm.core.text import ONE_LINE_LIMIT, one_line  # loopterm.core takes a while: only when needed

    print(f"loopterm: {one_line(message, ONE_LINE_LIMIT if limit is None else limit)}", file=sys.stderr, flush=True)
