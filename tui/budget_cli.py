"""`loopterm budget`: spend over the last days (by day, loop, model) against the daily budget.

Start-up stays fast: only the standard library at the top; the store and rich
load inside `run`. The figures come from the spend ledger, which the store
writes in the same transaction as every change of a run's totals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from loopterm.tui import arguments

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `budget` subcommand; `db` is the parent parser that carries --db."""
    budget = sub.add_parser(
        "budget", parents=[db], help="spend by day, loop and model; the daily budget",
        description="Spend over the last N days (from the ledger of every run in the store), by day, by loop and by "
                    "model, and today's spend against the daily budget. Every `run`, `resume` and `fork` is refused "
                    "when it could take today's spend over the daily budget; $LOOPTERM_DAILY_BUDGET_USD overrides "
                    "the stored figure.",
    )
    budget.add_argument("--days", type=arguments.days, default=7, metavar="N", help="how many days back, today included (default 7)")
    budget.add_argument("--json", action="store_true")
    setting = budget.add_mutually_exclusive_group()
    setting.add_argument("--set-daily", type=arguments.usd, metavar="X", help="keep a daily budget of X US dollars in this store")
    setting.add_argument("--clear-daily", action="store_true", help="remove the stored daily budget")


def report(store: Any, days: int, today: dt.date | None = None) -> dict[str, Any]:
    """The figures `loopterm budget --json` prints (store: a Store, or None when there is no database yet)."""
    from loopterm.core.daily_budget import DAILY_BUDGET_ENV, env_daily_budget

    today = today or dt.date.fromtimestamp(time.time())
    since = today - dt.timedelta(days=days - 1)
    day_names = [(since + dt.timedelta(days=i)).isoformat() for i in range(days)]
    if store is None:
        by_day: list[dict[str, Any]] = []
        by_loop: list[dict[str, Any]] = []
        by_model: list[dict[str, Any]] = []
        stored = None
    else:
        by_day = [t.model_dump() for t in store.spend_by("day", since_day=since.isoformat()) if t.key <= today.isoformat()]
        by_loop = [t.model_dump() for t in store.spend_by("loop", since_day=since.isoformat())]
        by_model = [t.model_dump() for t in store.spend_by("model", since_day=since.isoformat())]
        stored = store.stored_daily_budget()
    from_env = env_daily_budget()
    daily = from_env if from_env is not None else stored
    spent = {row["key"]: row for row in by_day}
    filled = [spent.get(day) or {"key": day, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "runs": 0,
                                    "tokens_cached": 0} for day in day_names]
    today_usd = spent.get(today.isoformat(), {}).get("cost_usd", 0.0)
    return {
        "today": today.isoformat(),
        "since": since.isoformat(),
        "days": days,
        "today_usd": today_usd,
        "daily_budget_usd": daily,
        "daily_budget_source": None if daily is None else ("env " + DAILY_BUDGET_ENV if from_env is not None else "store"),
        "remaining_today_usd": None if daily is None else max(0.0, daily - today_usd),
        "total_usd": sum(row["cost_usd"] for row in filled),
        "by_day": filled,
        "by_loop": by_loop,
        "by_model": by_model,
    }


def run(args: argparse.Namespace, db: StoreTarget) -> int:
    from loopterm.core.daily_budget import DAILY_BUDGET_ENV, env_daily_budget, money

    notes: list[str] = []
    store = None
    if args.set_daily is not None or args.clear_daily:
        store = db.open()
        store.set_daily_budget(None if args.clear_daily else args.set_daily)
        notes.append(f"daily budget {'removed' if args.clear_daily else 'set to ' + money(args.set_daily)} in {db}")
        if env_daily_budget() is not None:
            notes.append(f"note: ${DAILY_BUDGET_ENV} is set and overrides the stored figure")
    elif db.exists():
        store = db.open(create=False)
    try:
        figures = report(store, args.days)
    finally:
        if store is not None:
            store.close()
    if args.json:
        from loopterm.tui.headless import as_json

        print(as_json(figures))
        return 0
    _print(figures, notes)
    return 0


def _print(figures: dict[str, Any], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from loopterm.core.daily_budget import money
    from loopterm.core.prompt_cache import hit_text

    console = Console(highlight=False)
    for note in notes:
        console.print(Text(note, style="yellow" if note.startswith("note:") else "cyan"))

    def table(title: str, rows: list[dict[str, Any]], first: str) -> None:
        grid = Table(title=title, title_justify="left", title_style="bold", box=None, header_style="bold")
        grid.add_column(first, overflow="fold")
        for col in ("runs", "tokens in", "cached", "tokens out", "cost"):  # cached: the share of tokens in
            grid.add_column(col, justify="right", no_wrap=True)
        for row in rows:
            grid.add_row(Text(row["key"]), str(row["runs"]), f"{row['tokens_in']:,}",
                         hit_text(row.get("tokens_cached", 0), row["tokens_in"]), f"{row['tokens_out']:,}",
                         money(row["cost_usd"]))
        if not rows:
            grid.add_row(Text("-", style="dim"), "", "", "", "", "")
        console.print(grid)
        console.print()

    span = f"{figures['since']} .. {figures['today']}"
    table(f"spend by day ({span})", figures["by_day"], "day")
    table("by loop", figures["by_loop"], "loop")
    table("by model", figures["by_model"], "model")
    console.print(Text(f"total over {figures['days']} day(s): {money(figures['total_usd'])}"))
    daily = figures["daily_budget_usd"]
    if daily is None:
        console.print(Text(f"today: {money(figures['today_usd'])}; no daily budget (set one with `loopterm budget --set-daily X`)"))
        return
    used = figures["today_usd"] / daily if daily else (1.0 if figures["today_usd"] else 0.0)
    glyph, style = ("✗", "bold red") if used >= 1 else (("!", "yellow") if used >= 0.8 else ("✓", "green"))
    line = Text.assemble((f"{glyph} ", style), f"today: {money(figures['today_usd'])} of {money(daily)} daily budget "
                         f"({used:.0%}), {money(figures['remaining_today_usd'])} left",
                         (f"  [{figures['daily_budget_source']}]", "dim"))
    console.print(line)
