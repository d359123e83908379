"""`loopterm prune`: remove finished runs the options choose, never what a run that stays needs.

The rule is store/prune.py's: only finished runs (nothing waiting on a person, no engine on them); an
ancestor of a run that stays is kept whole ("kept: ancestor of <run>"), and so is a run a staying run
called; a run that spent today is kept until tomorrow; a blob goes only when nothing left references it;
then the file is compacted.
No confirmation: `--dry-run` shows the same plan and changes nothing.

Start-up stays fast: only the standard library at the top; the store and rich load inside `run`.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING, Any

from loopterm.tui import arguments

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget


def when(text: str) -> float:
    """A local date (2026-12-01: its midnight) or date and time (2026-12-01T14:30), as a Unix time."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2026-12-01 or 2026-12-01T14:30, got {text[:40]!r}") from None
    return moment.timestamp()  # naive: local time, as `loopterm runs` shows it


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `prune` subcommand; `db` is the parent parser that carries --db."""
    prune = sub.add_parser(
        "prune", parents=[db], help="remove finished runs (never what a kept branch needs) and compact the file",
        description="Remove finished runs chosen by --older-than and/or --keep-last (both: both must hold), then "
                    "compact the database. A running, paused, escalated or waiting run is never removed; a run that "
                    "is an ancestor of a run that stays is kept whole, and so is a run a staying run called; a run "
                    "that spent today is kept until tomorrow. No confirmation is asked: use --dry-run to see what "
                    "would go.",
    )
    prune.add_argument("--older-than", type=when, metavar="DATE",
                       help="runs last written before DATE (local: 2026-12-01 or 2026-12-01T14:30)")
    prune.add_argument("--keep-last", type=arguments.non_negative_int, metavar="N",
                       help="keep the newest N runs of each loop (branches count)")
    prune.add_argument("--dry-run", action="store_true", help="list what would go and the bytes freed; change nothing")
    prune.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, db: StoreTarget) -> int:
    from loopterm.core.errors import ConfigError

    if args.older_than is None and args.keep_last is None:
        raise ConfigError("prune needs --older-than DATE and/or --keep-last N (add --dry-run to see what would go)")
    store = db.open(create=False)
    try:
        result = store.prune(older_than=args.older_than, keep_last=args.keep_last, dry_run=args.dry_run)
    finally:
        store.close()
    from loopterm.store.prune import as_json

    if args.json:
        from loopterm.tui.headless import as_json as dumps

        print(dumps(as_json(result)))
        return 0
    _print(result)
    return 0


def _print(result: Any) -> None:
    from rich.console import Console
    from rich.text import Text

    from loopterm.store.footprint import human

    console = Console(highlight=False)
    plan = result.plan
    verb = "would remove" if result.dry_run else "removed"
    console.print(Text(f"{verb} {len(plan.removed)} run(s): {human(plan.bytes)} ({human(plan.row_bytes)} of rows, "
                       f"{plan.blobs} blob(s) {human(plan.blob_bytes)} nothing else references)", style="bold"))
    for run in plan.removed:
        console.print(Text(f"  {run.id}  {run.loop}  {run.status}  {run.iterations} it  {human(run.bytes)}"))
    for kept in plan.kept:
        console.print(Text(f"  {kept.id}  {kept.reason}", style="dim"))
    if result.dry_run:
        return
    if result.vacuum_error:
        console.print(Text(f"not compacted ({result.vacuum_error}): the freed pages are reused; run prune again later "
                           "to shrink the file", style="yellow"))
    elif result.vacuum_s is not None:
        console.print(Text(f"database {human(result.file_bytes_before)} -> {human(result.file_bytes_after)} "
                           f"(compacted in {result.vacuum_s:.2f} s)"))
