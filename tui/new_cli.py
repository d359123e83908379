"""`loopterm new NAME [--dir D]`: write a loop skeleton that runs offline as written (core/scaffold.py).

Start-up stays fast: only the standard library at the top; loopterm.core loads inside `run`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """The `new` subcommand (no --db: it writes files, not the store)."""
    new = sub.add_parser(
        "new", help="write a loop skeleton (loop file, offline script, cases, RULES.md) that runs offline at once",
        description="Write NAME.py (a loop with its own state, a side-effecting tool, an invariant, a command gate), "
                    "NAME.script.json (its offline script), NAME.cases.json and .loopterm/RULES.md into the current "
                    "folder (or --dir). Nothing is overwritten. Then: loopterm run NAME.py --headless. The guide: "
                    "docs/WRITING_LOOPS.md.",
    )
    new.add_argument("name", metavar="NAME", help="the loop's name: a letter, then letters, digits, '_' or '-'")
    new.add_argument("--dir", type=Path, metavar="D", help="write into this folder (created if missing) instead of here")


def run(args: argparse.Namespace) -> int:
    from loopterm.core.scaffold import write_skeleton

    folder = args.dir if args.dir is not None else Path.cwd()
    written = write_skeleton(args.name, folder)
    for path in written:
        print(f"wrote {_shown(path)}")
    here = "" if args.dir is None else f"cd {_shown(folder)} && "
    print(f"next: {here}loopterm run {args.name}.py --headless       (offline, on its script; converges at iteration 2)")
    print(f"      {here}loopterm eval {args.name}.py --cases {args.name}.cases.json")
    print(f"      {here}loopterm run {args.name}.py --model openai/gpt-4o-mini   (with OPENAI_API_KEY set)")
    print("guide: docs/WRITING_LOOPS.md (in the loopterm repository)")
    return 0


def _shown(path: Path) -> str:
    """Relative to the working folder when under it: what the person would type."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except ValueError:
        return str(path)
