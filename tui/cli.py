"""The `loopterm` command line.

Start-up stays fast: this module imports only the standard library at the top;
the engine, the store, rich and (through the model client) litellm load inside
the command that needs them. `loopterm --help` never imports litellm.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

DEFAULT_DB = Path(".loopterm") / "loopterm.db"
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, what to do), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"loopterm: {message} (see `{self.prog} --help`)\n")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of US dollars, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", type=Path, help=f"the SQLite store (default: $LOOPTERM_DB or {DEFAULT_DB})")

    parser = _Parser(
        prog="loopterm",
        description="A terminal workbench for supervised LLM loops. With no command: run the built-in demo loop offline.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", parents=[db], help="run a loop", description="Run a loop (a built-in name or path/to/file.py[:name]).")
    run.add_argument("loop", metavar="LOOP", help="a built-in loop name or path/to/file.py[:name]")
    run.add_argument("--model", help="a litellm model string, e.g. openai/gpt-4o-mini (default: the loop's)")
    run.add_argument("--headless", action="store_true", help="no TUI: live progress on the terminal, exit code = outcome")
    run.add_argument("--max-iterations", type=_positive_int, metavar="N")
    run.add_argument("--budget-usd", type=_non_negative_float, metavar="X", help="cap on model spend for this run")
    run.add_argument("--budget-tokens", type=_non_negative_int, metavar="N", help="cap on tokens (in + out) for this run")

    runs = sub.add_parser("runs", parents=[db], help="list runs")
    runs.add_argument("--json", action="store_true")

    show = sub.add_parser("show", parents=[db], help="show a run or one of its iterations")
    show.add_argument("run", metavar="RUN", help="a run id (a unique prefix is enough)")
    show.add_argument("--iteration", type=_positive_int, metavar="N")
    show.add_argument("--json", action="store_true")

    resume = sub.add_parser("resume", parents=[db], help="continue a crashed, stopped or escalated run")
    resume.add_argument("run", metavar="RUN")
    resume.add_argument("--max-iterations", type=_positive_int, metavar="N", help="raise the run's iteration cap")

    sub.add_parser("loops", help="list built-in and discovered loops")
    return parser


def db_path(args: argparse.Namespace) -> Path:
    return args.db or Path(os.environ.get("LOOPTERM_DB") or DEFAULT_DB)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loopterm.core.errors import LooptermError

    try:
        return _dispatch(args)
    except LooptermError as exc:
        print(f"loopterm: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("loopterm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the person, the traceback on request
        if os.environ.get("LOOPTERM_DEBUG"):
            raise
        print(f"loopterm: unexpected error: {exc.__class__.__name__}: {exc} (set LOOPTERM_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from loopterm.tui import commands

    if args.command is None:
        return commands.demo()
    if args.command == "run":
        return commands.run(args.loop, db_path(args), model=args.model, headless=args.headless,
                            max_iterations=args.max_iterations, budget_usd=args.budget_usd,
                            budget_tokens=args.budget_tokens)
    if args.command == "runs":
        return commands.runs(db_path(args), as_json_out=args.json)
    if args.command == "show":
        return commands.show(db_path(args), args.run, iteration=args.iteration, as_json_out=args.json)
    if args.command == "resume":
        return commands.resume(db_path(args), args.run, max_iterations=args.max_iterations)
    if args.command == "loops":
        return commands.loops()
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
