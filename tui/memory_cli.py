"""`loopterm memory LOOP list|search|add|forget`: a loop's long-term memory from the command line.

Start-up stays fast: only the standard library at the top; the store and rich
load inside `run`. Keys and values are untrusted text (a model or a file wrote
them): they are shown as rich `Text` (never markup), with control characters
made visible so nothing reaches the terminal as an escape sequence.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopterm.tui import arguments

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget

KINDS = ("fact", "decision", "document")
SHOWN_CHARS = 100  # of a value in a table row


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `memory` subcommand; `db` is the parent parser that carries --db."""
    memory = sub.add_parser(
        "memory", parents=[db], help="a loop's long-term memory: list, search, add, forget",
        description="Long-term memory of a loop (facts, decisions, documents) that later runs of the loop recall. "
                    "Without an action: list.",
    )
    memory.add_argument("loop", metavar="LOOP", help="a loop name (as in `loopterm loops`)")
    # --db is accepted after the action too; SUPPRESS keeps one given before it.
    sub_db = argparse.ArgumentParser(add_help=False)
    sub_db.add_argument("--db", metavar="PATH|URL", default=argparse.SUPPRESS,
                        help="the store: a SQLite file or a postgresql:// URL")
    actions = memory.add_subparsers(dest="memory_action", metavar="ACTION", parser_class=type(memory))

    listing = actions.add_parser("list", parents=[sub_db], help="everything the loop remembers, newest first")
    listing.add_argument("--kind", choices=KINDS, help="only this kind")
    listing.add_argument("--json", action="store_true")

    search = actions.add_parser("search", parents=[sub_db], help="full-text search, best match first")
    search.add_argument("query", metavar="QUERY", help="any text (words are matched, operators are not interpreted)")
    search.add_argument("--limit", type=arguments.positive_int, default=5, metavar="N", help="at most N results (default 5)")
    search.add_argument("--json", action="store_true")

    add = actions.add_parser("add", parents=[sub_db], help="remember VALUE (or a file's text) under KEY; replaces KEY")
    add.add_argument("key", metavar="KEY")
    add.add_argument("value", metavar="VALUE", nargs="?", help="the text (or --file)")
    add.add_argument("--file", type=Path, metavar="PATH", help="remember this UTF-8 file's text (default kind: document)")
    add.add_argument("--kind", choices=KINDS, help="fact (default), decision or document")

    forget = actions.add_parser("forget", parents=[sub_db], help="delete a memory by key (or by its id)")
    forget.add_argument("key_or_id", metavar="KEY_OR_ID")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str, *, one_line: bool = False, limit: int | None = None) -> str:
    """Untrusted text made safe for a terminal: control and bidi-override characters become visible escapes."""
    if one_line:
        text = text.strip().replace("\r\n", "\n").replace("\n", " ↵ ").replace("\t", " ")
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"

    def escape(ch: str) -> str:
        return ch if ch in "\n\t" else f"\\x{ord(ch):02x}"

    text = _CONTROL.sub(lambda m: escape(m.group()), text)
    if any(unicodedata.category(ch) == "Cf" for ch in text):  # e.g. U+202E, which reverses what follows
        text = "".join(f"\\u{ord(ch):04x}" if unicodedata.category(ch) == "Cf" and ch != "\u200d" else ch for ch in text)
    return text


def run(args: argparse.Namespace, db: StoreTarget) -> int:
    from loopterm.core.errors import ConfigError
    from loopterm.store.memory import check_loop

    check_loop(args.loop)  # one line, exit 2, before any file is touched
    action = args.memory_action or "list"
    if action == "add":
        return _add(args, db, ConfigError)

    if not db.exists():  # nothing remembered yet: no database to refuse
        if action == "forget":
            raise ConfigError(f"loop {args.loop} remembers nothing yet (no database at {db}); nothing to forget")
        return _show(args, [], action)
    store = db.open(create=False)
    try:
        if action == "forget":
            if not store.forget(args.loop, args.key_or_id):
                raise ConfigError(
                    f"loop {args.loop} has no memory with key or id {shown(args.key_or_id, one_line=True, limit=80)!r}; "
                    f"`loopterm memory {args.loop} list` shows them"
                )
            _console().print(_text(f"forgot {shown(args.key_or_id, one_line=True, limit=80)!r} of loop {args.loop}"))
            return 0
        if action == "search":
            items = store.recall(args.loop, args.query, limit=args.limit)
        else:
            items = store.memories(args.loop, kind=getattr(args, "kind", None))
    finally:
        store.close()
    return _show(args, items, action)


def _add(args: argparse.Namespace, db: StoreTarget, config_error: type[Exception]) -> int:
    if (args.value is None) == (args.file is None):
        raise config_error("give the text as VALUE or with --file PATH (one of them)")
    kind = args.kind or ("document" if args.file is not None else "fact")
    if args.file is not None:
        try:
            value = args.file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise config_error(f"{args.file} is not UTF-8 text; memory holds text only") from None
        except OSError as exc:
            raise config_error(f"cannot read {args.file}: {exc.strerror or exc}; check the path") from None
    else:
        value = args.value
    with db.open() as store:
        item = store.remember(args.loop, args.key, value, kind=kind)
    verb = "remembered" if item.created_at == item.updated_at else "replaced"
    _console().print(_text(f"{verb} {shown(item.key, one_line=True, limit=80)!r} for loop {item.loop} "
                           f"({item.kind}, {len(item.value):,} characters, id {item.id})"))
    return 0


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _text(text: str, style: str = "") -> Any:
    from rich.text import Text

    return Text(text, style=style)


def _show(args: argparse.Namespace, items: list[Any], action: str) -> int:
    if getattr(args, "json", False):
        from loopterm.tui.headless import as_json

        print(as_json([item.model_dump(exclude_none=action != "search") for item in items]))
        return 0
    console = _console()
    if not items:
        if action == "search":
            console.print(_text(f"nothing in loop {args.loop}'s memory matches that"))
        else:
            console.print(_text(f"loop {args.loop} remembers nothing yet; add with `loopterm memory {args.loop} add KEY VALUE`"))
        return 0
    import datetime as dt

    from rich.table import Table

    table = Table(box=None, header_style="bold")
    if action == "search":  # best first; the raw bm25 scores are in --json
        table.add_column("#", justify="right", no_wrap=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("key", max_width=30, overflow="ellipsis")
    table.add_column("value", ratio=1, overflow="fold")
    table.add_column("updated", no_wrap=True)
    for rank, item in enumerate(items, 1):
        row = [_text(str(rank))] if action == "search" else []
        row += [
            _text(str(item.id)), _text(item.kind), _text(shown(item.key, one_line=True, limit=60), "bold"),
            _text(shown(item.value, one_line=True, limit=SHOWN_CHARS)),
            _text(dt.datetime.fromtimestamp(item.updated_at).strftime("%Y-%m-%d %H:%M")),
        ]
        table.add_row(*row)
    console.print(table)
    return 0
