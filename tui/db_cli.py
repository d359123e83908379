"""`loopterm db init` and `loopterm db copy`: set up a store, and move a SQLite store into PostgreSQL.

Standard library only at import (`loopterm --help` stays fast); the store loads inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `db` subcommand; `db` is the parent parser that carries --db."""
    parser = sub.add_parser("db", help="set up a store (db init) or copy a SQLite store into PostgreSQL (db copy)",
                            description="Manage the store itself: create its schema, or copy a whole SQLite store "
                                        "into a PostgreSQL database (verified).")
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    actions.add_parser("init", parents=[db], help="create the store's schema (idempotent)",
                       description="Create the loopterm schema in the store --db names (a postgresql:// URL, or a "
                                   "SQLite file). Running it again changes nothing and says so.")
    copy = actions.add_parser("copy", help="copy a whole SQLite store into another store, then verify it",
                              description="Copy every run (with its lineage, iterations, events, tool calls and "
                                          "intents), the commands, long-term memory, the spend ledger and the daily "
                                          "budget of a SQLite store into TO (a postgresql:// URL), ids kept, in one "
                                          "transaction checked row for row before it commits; then read both stores "
                                          "back and compare. A TO that already holds runs is refused, unless it "
                                          "holds this very copy: then it says so and copies nothing.")
    copy.add_argument("--from", dest="source", metavar="FILE", required=True, help="the SQLite store to copy")
    copy.add_argument("--to", dest="to", metavar="URL", required=True,
                      help="the store to copy into: a postgresql:// URL (or a new SQLite file)")


def run(args: argparse.Namespace, target: Any) -> int:
    """`target`: the store --db names (db init), from tui/console.py's store_target."""
    if args.db_action == "init":
        return _init(target)
    return _copy(args)


def _init(target: Any) -> int:
    from loopterm.core.errors import ConfigError

    if target.is_sqlite and not target.exists():
        target.open(create=True).close()
        print(f"created a new loopterm store at {target.shown}")
        return 0
    try:
        with target.open(create=False) as store:
            runs = len(store.list_runs())
        print(f"{target.shown} already holds the loopterm schema ({runs} run(s)); nothing to do")
        return 0
    except ConfigError as exc:
        if target.is_sqlite or not _no_schema(exc):
            raise
    with target.open(create=True):
        pass
    print(f"created the loopterm schema in {target.shown}")
    return 0


def _no_schema(exc: Exception) -> bool:
    """Whether opening a server store failed only because it has no loopterm schema yet (store/pg_schema.py
    says so with the `loopterm db init` hint); a connection failure or a foreign database is reported."""
    return "db init" in str(exc)


def _copy(args: argparse.Namespace) -> int:
    """Store.copy_to (one transaction, every table compared before it commits), then copy_check reads both
    stores back through the Store API. A target holding runs: the same data (a copy run again) is said and
    left alone; anything else is refused."""
    from loopterm.core.errors import ConfigError
    from loopterm.store.copy_check import check, difference
    from loopterm.store.target import StoreTarget, is_url

    if is_url(args.source):
        raise ConfigError(f"--from {StoreTarget.postgresql(args.source, '--from ').shown}: give the SQLite file to "
                          "copy (a copy reads a SQLite store)")
    source_target = StoreTarget.sqlite(Path(args.source))
    target = StoreTarget.parse(args.to, "--to ")
    if not source_target.path.is_file():  # type: ignore[union-attr]
        raise ConfigError(f"--from {args.source}: no such file; give the SQLite store to copy")
    if target.path is not None and target.path.exists() and target.path.resolve() == Path(args.source).resolve():
        raise ConfigError(f"--to {target.shown} is the store being copied; give another store")
    try:
        source = source_target.open(create=False)
    except ConfigError as exc:
        raise ConfigError(f"--from {args.source}: {str(exc).replace('pass --db with', 'give --from')}") from None
    try:
        with target.open(create=True) as dest:
            if dest.list_runs():
                found = difference(source, dest)
                if found is not None:
                    raise ConfigError(f"--to {target.shown} already holds runs and is not a copy of {args.source} "
                                      f"({found}); copy into an empty database (create one, then `loopterm db init`)")
                copied = check(source, dest, target.shown)
                print(f"{target.shown} already holds a copy of {args.source}, identical ({copied.what()}); "
                      "nothing copied")
                return 0
            source.copy_to(dest)
            copied = check(source, dest, target.shown)
    finally:
        source.close()
    print(f"copied {args.source} to {target.shown}: {copied.what()}; verified: every table row for row, every "
          "run's export line by line, intents, commands, memories, the ledger and the daily budget")
    sys.stdout.flush()
    return 0
