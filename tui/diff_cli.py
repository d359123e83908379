"""`loopterm diff RUN_A RUN_B`: two runs side by side (core/compare.py), and the cells the compare screen shares.

Start-up stays fast: only the standard library at the top (tui/cli.py imports this to build its parser);
the store and rich load inside `run`. Untrusted text (actions, arguments, state values) is shown as rich
Text built without markup, control characters escaped.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from loopterm.tui import arguments

if TYPE_CHECKING:
    from rich.text import Text

    from loopterm.store.target import StoreTarget

    from loopterm.core.compare import AlignedIteration, Comparison, ComparedRun, Side, StateDiff, Totals
    from loopterm.tui.widgets.render import Palette

FORK_MARK = "fork"  # the mark of the fork point's row
FIRST_MARK = "▶ ≠"  # the first divergence
DIFFERS_MARK = "≠"  # a later row whose action, gates or invariants differ
# (label, width) of a side's columns after its action; they drop from the right when the terminal is narrow.
SIDE_COLUMNS = [("gates", 10), ("inv", 4), ("tok", 8), ("cost", 10)]
ACTION_MIN = 14  # the action keeps at least this many cells
MEMO_CELLS = 4096  # distinct gate / invariant cells kept while drawing rows
LEGEND = f"{FORK_MARK}: the last iteration both runs share · {FIRST_MARK}: where they first diverge · " \
         f"{DIFFERS_MARK}: action, gates or invariants differ · =: the same iteration"


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `diff` subcommand; `db` is the parent parser that carries --db."""
    diff = sub.add_parser(
        "diff", parents=[db], help="compare two runs (a branch and its parent, two branches) side by side",
        description="Compare two runs: their iterations aligned at the fork point (action, gates, invariants, "
                    "tokens, cost of each), the first iteration where they diverge, their totals and outcomes. "
                    "--at N shows the state diff between them after aligned iteration N.",
    )
    diff.add_argument("run_a", metavar="RUN_A", help="a run id (a unique prefix is enough)")
    diff.add_argument("run_b", metavar="RUN_B", help="another run id")
    diff.add_argument("--at", type=arguments.positive_int, metavar="N",
                      help="the state diff (A's fields against B's) after aligned iteration N")
    diff.add_argument("--json", action="store_true",
                      help="the whole comparison as JSON (with --at: the state diff as JSON)")


def run(args: argparse.Namespace, db: StoreTarget) -> int:
    from loopterm.core.compare import compare, state_diff
    from loopterm.core.errors import ConfigError

    store = db.open(create=False)
    try:
        a = store.resolve_run(args.run_a)
        b = store.resolve_run(args.run_b)
        comparison = compare(store, a.id, b.id)
        diff = None
        if args.at is not None:
            try:
                diff = state_diff(store, comparison, args.at)
            except ConfigError as exc:
                raise ConfigError(f"--at {args.at}: {exc}") from None
    finally:
        store.close()
    if args.json:
        print((diff if diff is not None else comparison).model_dump_json(indent=2))
        return 0
    from rich.console import Console

    from loopterm.tui.widgets.render import Palette

    console = Console(highlight=False)
    palette = Palette()
    if diff is not None:
        console.print(diff_heading(comparison, diff, palette))
        console.print(diff_body(diff, palette))
        return 0
    print_comparison(console, comparison, palette)
    return 0


# ----------------------------------------------------------------------------- what the CLI and the screen share


def side_columns(width: int, fixed: int, gap: int) -> tuple[int, list[tuple[str, int]]]:
    """(the action's width, the columns that fit) for each side of a table `width` wide, of which `fixed`
    cells are the n and mark columns and the bar between the sides; `gap`: cells between two columns."""
    side = (width - fixed) // 2
    columns = list(SIDE_COLUMNS)
    while columns and side - sum(w + gap for _, w in columns) < ACTION_MIN:
        columns.pop()
    return max(ACTION_MIN, side - sum(w + gap for _, w in columns)), columns


N_WIDTH, MARK_WIDTH = 5, 4
ROW_FIXED = N_WIDTH + 1 + MARK_WIDTH + 1 + 3  # n, a space, the mark, a space, and the bar between the sides


def row_text(comparison: Comparison | None, row: AlignedIteration | None, palette: Palette, action_width: int,
             columns: list[tuple[str, int]], memo: dict[Any, Text] | None = None) -> Text:
    """One aligned iteration as a line of fixed-width cells (row None: the header line); `side_columns` gives
    the widths. A shared iteration shows A's side and `=` for B's. `memo`: see `side_cells`."""
    from rich.text import Text

    keep = 1 + len(columns)
    if row is None or comparison is None:
        side = ["action", *(label for label, _ in columns)]
        right = {"tok", "cost"}
        a_cells = [Text(f"A {c}" if c == "action" else c, justify="right" if c in right else "left") for c in side]
        b_cells = [Text(f"B {c}" if c == "action" else c, justify="right" if c in right else "left") for c in side]
        head = [Text("n", justify="right"), Text("")]
    else:
        a_cells = side_cells(row.a, palette, dim=row.shared, differs=tuple(row.differs), memo=memo)[:keep]
        b_cells = [Text("=", style=palette.muted)] if row.shared else \
            side_cells(row.b, palette, differs=tuple(row.differs), memo=memo)[:keep]
        head = [Text(str(row.n), justify="right"), Text(mark_of(comparison, row))]
    widths = [action_width, *(w for _, w in columns)]
    line = Text(no_wrap=True, end="")
    line.append_text(_fit(head[0], N_WIDTH))
    line.append(" ")
    line.append_text(_fit(head[1], MARK_WIDTH))
    for cells, bar in ((a_cells, ""), (b_cells, " │")):
        line.append(bar, style="dim")
        for cell, width in zip(cells, widths):
            line.append(" ")
            line.append_text(_fit(cell, width))
    line.rstrip()
    return line


def _fit(text: Text, width: int) -> Text:
    """A cell cut or padded to `width` cells, right-justified when it says so."""
    from rich.text import Text

    cell = text.copy()
    cell.truncate(width, overflow="ellipsis")
    pad = width - cell.cell_len
    if pad > 0:
        if text.justify == "right":
            cell = Text(" " * pad) + cell
        else:
            cell.append(" " * pad)
    return cell


def mark_of(comparison: Comparison, row: AlignedIteration) -> str:
    if comparison.divergence is not None and row.n == comparison.divergence.n:
        return FIRST_MARK
    if row.shared and row.n == comparison.fork_point:
        return FORK_MARK
    if row.shared:
        return "="
    return DIFFERS_MARK if row.differs else ""


def side_cells(side: Side | None, palette: Palette, *, dim: bool = False, differs: tuple[str, ...] = (),
               memo: dict[Any, Text] | None = None) -> list[Text]:
    """action, gates, invariants, tokens, cost of one side's iteration (blank cells when it has none).
    `memo` keeps the gate and invariant cells already made (they repeat from row to row): treat them as read-only."""
    from rich.text import Text

    from loopterm.tui.widgets.render import glyphs, literal, money

    if side is None:
        return [Text("-", style=palette.muted)] + [Text("") for _ in range(4)]
    style = palette.muted if dim else ""
    action = literal(side.action, f"bold {style}".strip() if "action" in differs else style)
    action.no_wrap, action.overflow = True, "ellipsis"
    memo = {} if memo is None else memo
    cells = []
    for items, names in ((tuple(side.gates.items()), True), (tuple(side.invariants.items()), False)):
        cell = memo.get((items, names))
        if cell is None:
            if len(memo) > MEMO_CELLS:
                memo.clear()
            cell = memo[(items, names)] = glyphs(items, palette, names=names)
        cells.append(cell)
    gates, invariants = cells
    return [action, gates, invariants, Text(f"{side.tokens:,}", justify="right", style=style),
            Text(money(side.cost_usd), justify="right", style=style)]


def outcome_text(run: ComparedRun, palette: Palette) -> Text:
    from rich.text import Text

    from loopterm.tui.widgets.render import literal, status_text

    text = status_text(run.status, palette)
    if run.termination_reason and run.termination_reason != run.status:
        text.append(" · ")
        text.append(literal(run.termination_reason))
    for line in run.waiting:
        text.append("\n⚑ waits: ", style=f"bold {palette.warn}")
        text.append(literal(line))
    return text if text.plain else Text("-")


def run_line(label: str, run: ComparedRun) -> Text:
    """`A  3f2a1b0c codefix (branch of 1a2b3c4d at 2)`."""
    from loopterm.tui.widgets.render import literal

    text = literal(f"{label}  ", "bold")
    text.append(run.id[:12], style="bold")
    text.append(" ")
    text.append_text(literal(run.loop))
    if run.parent_run and run.fork_iteration:
        text.append(f"  (branch of {run.parent_run[:8]} at {run.fork_iteration})", style="dim")
    if run.fork is not None and (run.fork.patches or run.fork.relaxed or run.fork.reason):
        what = [f"{len(run.fork.patches)} patch(es)"] if run.fork.patches else []
        what += [f"relaxed {', '.join(run.fork.relaxed)}"] if run.fork.relaxed else []
        what += [f"why: {run.fork.reason}"] if run.fork.reason else []
        text.append("  ")
        text.append_text(literal("; ".join(what), "italic"))
    return text


def totals_rows(comparison: Comparison, palette: Palette, *, compact: bool = False) -> list[tuple[str, Text, Text]]:
    """(label, A, B) lines: outcome, iterations, tokens, cost, model, and what each spent after the fork point
    (`compact`: iterations, tokens and cost on one line, no model)."""
    from rich.text import Text

    from loopterm.tui.widgets.render import money

    a, b = comparison.a, comparison.b

    def both(value: Any) -> tuple[Text, Text]:
        return Text(value(a)), Text(value(b))

    def spent(totals: Totals) -> str:
        return f"{totals.iterations} it · {totals.tokens:,} tok · {money(totals.cost_usd)}"

    rows = [("outcome", outcome_text(a, palette), outcome_text(b, palette))]
    if compact:
        rows.append(("in all", *both(lambda r: spent(r.total))))
    else:
        rows += [("iterations", *both(lambda r: f"{r.total.iterations}")),
                 ("tokens", *both(lambda r: f"{r.total.tokens:,}")),
                 ("cost", *both(lambda r: money(r.total.cost_usd))),
                 ("model", *both(lambda r: r.model))]
    if comparison.fork_point:
        rows.append((f"after {comparison.fork_point}", *both(lambda r: spent(r.since_fork))))
    return rows


def divergence_headline(comparison: Comparison, palette: Palette) -> Text:
    """The first divergence in one line (the compare screen's header)."""
    from rich.text import Text

    from loopterm.tui.widgets.render import literal

    found = comparison.divergence
    if found is None:
        return Text("no divergence: the same actions, gates, invariants and states, and the same length",
                    style=palette.ok)
    text = Text(f"{FIRST_MARK} first divergence at iteration {found.n} ({found.kind}):  ", style=f"bold {palette.warn}")
    text.append("A ", style="bold")
    text.append_text(literal(found.a))
    text.append("  B ", style="bold")
    text.append_text(literal(found.b))
    return text


def divergence_text(comparison: Comparison, palette: Palette) -> Text:
    from rich.text import Text

    from loopterm.tui.widgets.render import literal

    found = comparison.divergence
    if found is None:
        return Text("no divergence: the same actions, gates, invariants and states, and the same length",
                    style=palette.ok)
    text = Text(f"first divergence at iteration {found.n} ({found.kind}): ", style=f"bold {palette.warn}")
    text.append_text(literal(found.detail))
    text.append("\n  A: ", style="bold")
    text.append_text(literal(found.a))
    text.append("\n  B: ", style="bold")
    text.append_text(literal(found.b))
    return text


def diff_heading(comparison: Comparison, diff: StateDiff, palette: Palette) -> Text:
    """One line: which states are compared (`-` run A's, `+` run B's)."""
    from rich.text import Text

    def which(label: str, run: ComparedRun, n: int | None) -> str:
        if n is None:
            return f"{label} {run.id[:8]}: no iteration yet"
        return f"{label} {run.id[:8]} at {n}" + ("" if n == diff.n else f" (its last; it ended before {diff.n})")

    text = Text(f"state after aligned iteration {diff.n}:  ", style="bold")
    text.append(f"- {which('A', comparison.a, diff.a_n)}", style=palette.bad)
    text.append("  ")
    text.append(f"+ {which('B', comparison.b, diff.b_n)}", style=palette.ok)
    if diff.n <= comparison.fork_point:
        text.append("  (the same iteration in both runs)", style="italic")
    return text


def diff_body(diff: StateDiff, palette: Palette) -> Text:
    """The unified diff of the differing fields: the Diff tab's renderer, its `--- before`/`+++ after` lines
    left out (the heading says which run is which)."""
    from rich.text import Text

    from loopterm.tui.widgets.render import diff_text

    if diff.same:
        return Text("the states are the same", style="italic")
    lines = diff_text(diff.a, diff.b, palette).split("\n")
    while lines and lines[0].plain.startswith(("--- ", "+++ ")):
        lines.pop(0)
    return Text("\n").join(lines)


def print_comparison(console: Any, comparison: Comparison, palette: Palette) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(run_line("A", comparison.a))
    console.print(run_line("B", comparison.b))
    console.print(Text(comparison.relation, style="italic"))
    rows = comparison.iterations
    hidden = max(0, comparison.fork_point - 1)  # the shared iterations before the fork point: one line
    if hidden:
        console.print(Text(f"iterations 1..{hidden}: the same in both runs", style="italic"))
    action_width, columns = side_columns(console.width - 1, ROW_FIXED, 1)
    lines = [row_text(None, None, palette, action_width, columns)]
    lines[0].stylize("bold")
    memo: dict[Any, Text] = {}
    for row in rows[hidden:]:  # lines, not a rich Table: a table of thousands of rows takes seconds to measure
        line = row_text(comparison, row, palette, action_width, columns, memo)
        mark = mark_of(comparison, row)
        if mark == FIRST_MARK:
            line.stylize(f"bold {palette.warn}", 0, N_WIDTH + 1 + MARK_WIDTH)
        elif mark == FORK_MARK:
            line.stylize(palette.accent, 0, N_WIDTH + 1 + MARK_WIDTH)
        lines.append(line)
    console.print(Text("\n").join(lines), no_wrap=True, crop=True)
    console.print(Text(LEGEND, style="dim"))
    console.print(divergence_text(comparison, palette))
    totals = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2))
    totals.add_column("")
    totals.add_column(f"A {comparison.a.id[:8]}")
    totals.add_column(f"B {comparison.b.id[:8]}")
    for label, a, b in totals_rows(comparison, palette):
        totals.add_row(Text(label, style="bold"), a, b)
    console.print(totals)
