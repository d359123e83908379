"""`loopterm run LOOP --cases FILE [--parallel K]` and `loopterm eval LOOP --cases FILE`: batches of runs.

The work is in core (`loopterm.core.batch`, `loopterm.core.evaluation`); this module prints it.
Imported only after the arguments parsed (it loads rich and the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loopterm.core.batch import CaseFinished, CaseResult, CaseStarted, check_cases, run_cases
from loopterm.core.cases import CaseSet, load_cases
from loopterm.core.errors import ConfigError
from loopterm.core.evaluation import evaluate
from loopterm.core.loader import load_loop
from loopterm.core.loop import Loop
from loopterm.core.worktree import code_changing, require_git
from loopterm.store.target import StoreTarget
from loopterm.tui.headless import status_text

EXIT_OK = 0
EXIT_NOT_MET = 3  # `run --cases`: a case missed its expectation; `eval`: convergence below --min-convergence


def _console() -> Console:
    return Console(highlight=False)


def _display(path: Path | StoreTarget) -> str:
    if isinstance(path, StoreTarget):
        if path.path is None:
            return path.shown
        path = path.path
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _prepare(loop_ref: str, cases_file: Path, model: str | None) -> tuple[Loop, str, CaseSet]:
    """Load the loop and the cases and check every case's model: all before the store is opened."""
    loop, ref = load_loop(loop_ref)
    cases = load_cases(cases_file)
    if code_changing(loop):
        require_git()
    check_cases(loop, cases, model)
    return loop, ref, cases


def _within_daily_budget(db: StoreTarget | Path, loop: Loop, cases: CaseSet, budget_usd: float | None, *,
                         lower: str | None) -> CaseSet:
    """The daily-budget gate for a batch (as `loopterm run` has for one run): the cases' USD budgets
    together must fit what is left of today's; cases without one share what is left equally (and are told).
    Refuses with one ConfigError line before anything runs."""
    from loopterm.core.daily_budget import check_daily_budget, money

    db = StoreTarget.of(db)
    own = [c.budget_usd if c.budget_usd is not None else budget_usd if budget_usd is not None else loop.budget.usd
           for c in cases]
    capped = [b for b in own if b is not None]
    total = sum(capped) if len(capped) == len(own) else None
    with (db.open() if db.exists() else contextlib.nullcontext()) as known:
        cap = check_daily_budget(known, total, what=f"the {len(own)} cases' USD budgets together", lower=lower)
    if cap is None or total is not None:
        return cases
    uncapped = len(own) - len(capped)
    share = (cap - sum(capped)) / uncapped
    if share <= 0:
        raise ConfigError(f"the cases with a USD budget already take the {money(cap)} left of today's daily budget, "
                          f"leaving nothing for the {uncapped} without one; give them a budget_usd, or raise the daily "
                          "budget with `loopterm budget --set-daily X`")
    print(f"loopterm: {uncapped} case(s) have no USD budget, so each gets an equal share of what is left of today's "
          f"daily budget: {money(share)}", file=sys.stderr)
    return CaseSet(path=cases.path, cases=[c.model_copy(update={"budget_usd": share}) if b is None else c
                                           for c, b in zip(cases, own)])


def _expect_text(result: CaseResult) -> Text:
    wanted = result.expect or "converged"
    glyph, style = ("✓", "green") if result.expect_met else ("✗", "red")
    return Text(f"{glyph} {wanted}", style=style)


def _finished_line(result: CaseResult, width: int) -> Text:
    line = Text("  ")
    status = status_text(result.status)
    status.pad_right(13 - len(status.plain))
    line.append_text(status)
    line.append(f" {result.case_id:<{width}}  ", style="bold")
    line.append(f"run {result.run_id or '-'}  {result.iterations} it  {result.tokens:,} tok  "
                f"${result.cost_usd:.6f}  {result.elapsed_s:.1f}s  expect ")
    line.append_text(_expect_text(result))
    if result.status != "converged" and result.message:
        line.append(f"  {result.message}", style="dim")
    return line


class _Progress:
    """on_event for run_cases: a line when a case starts and when it finishes."""

    def __init__(self, console: Console, width: int) -> None:
        self.console = console
        self.width = width

    def __call__(self, case_id: str, event: Any) -> None:
        if isinstance(event, CaseStarted):
            self.console.print(Text(f"  ▶ {'started':<11} {case_id:<{self.width}}  run {event.run_id} on {event.model}",
                                    style="dim"), no_wrap=True, overflow="ellipsis", crop=True)
        elif isinstance(event, CaseFinished):
            self.console.print(_finished_line(event.result, self.width), no_wrap=True, overflow="ellipsis", crop=True)


def _results_table(results: list[CaseResult]) -> Table:
    table = Table(box=None, header_style="bold")
    table.add_column("case", no_wrap=True)
    table.add_column("run", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason", max_width=22, overflow="ellipsis", no_wrap=True)
    for col in ("iter", "tokens", "cost", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("expect", no_wrap=True)
    for r in results:
        table.add_row(r.case_id, r.run_id or "-", status_text(r.status), r.termination_reason or "-",
                      str(r.iterations), f"{r.tokens:,}", f"${r.cost_usd:.6f}", f"{r.elapsed_s:.1f}s", _expect_text(r))
    return table


def _kept(console: Console, results: list[CaseResult]) -> None:
    kept = [r for r in results if r.worktree]
    if not kept:
        return
    console.print(Text(f"kept worktree(s) of {len(kept)} case(s) that did not converge (inspect them, or "
                       "`loopterm resume RUN`):", style="yellow"))
    width = max(len(r.case_id) for r in kept)
    for r in kept:
        console.print(Text(f"  {r.case_id:<{width}}  {r.status:<10}  run {r.run_id or '-':<12}  {r.worktree}"),
                      soft_wrap=True)


def run_batch(
    loop_ref: str,
    db: StoreTarget,
    *,
    cases_file: Path | None,
    parallel: int | None,
    model: str | None = None,
    max_iterations: int | None = None,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
) -> int:
    """Run every case headless, up to `parallel` at once. Exit 0 when every case met its expectation, else 3."""
    if cases_file is None:
        raise ConfigError("--parallel needs --cases FILE: parallel runs are the cases of a cases file "
                          "(a JSON list of {\"id\": ..., \"goal\": ..., \"expect\": ...})")
    parallel = parallel or 1
    loop, ref, cases = _prepare(loop_ref, cases_file, model)
    budget: dict[str, Any] = {}
    if budget_usd is not None:
        budget["usd"] = budget_usd
    if budget_tokens is not None:
        budget["tokens"] = budget_tokens
    cases = _within_daily_budget(db, loop, cases, budget_usd, lower="--budget-usd (or the cases' budget_usd)")
    console = _console()
    store = db.open()
    try:
        width = max(len(c.id) for c in cases)
        console.print(Text.assemble(("loopterm ", "bold"), (loop.name, "bold cyan"),
                                    f"  {len(cases)} case(s) from {_display(cases.path)}, {parallel} at a time; "
                                    f"runs in {_display(db)}"))
        results = asyncio.run(run_cases(
            loop, store, cases, parallel=parallel, model=model, workspace_root=db.workspace_root(),
            loop_ref=ref, on_event=_Progress(console, width), max_iterations=max_iterations, budget=budget or None,
        ))
    finally:
        store.close()
    console.print(_results_table(results))
    _kept(console, results)
    met = sum(r.expect_met for r in results)
    converged = sum(r.converged for r in results)
    console.print(Text(f"{converged} of {len(results)} converged; {met} of {len(results)} met their expectation",
                       style="green" if met == len(results) else "red"))
    return EXIT_OK if met == len(results) else EXIT_NOT_MET


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _ms(spread: dict[str, float | None]) -> str:
    p50, p95 = spread.get("p50"), spread.get("p95")
    return "-" if p50 is None else f"{p50:.0f} / {p95:.0f}"


def _eval_tables(report: dict[str, Any]) -> tuple[Table, Table]:
    cases = Table(box=None, header_style="bold", title="cases", title_justify="left", title_style="bold")
    cases.add_column("case", no_wrap=True)
    cases.add_column("run", no_wrap=True)
    cases.add_column("status", no_wrap=True)
    cases.add_column("reason", max_width=20, overflow="ellipsis", no_wrap=True)
    for col in ("iter→conv", "inv viol", "tokens", "cost", "call ms p50/p95", "wall"):
        cases.add_column(col, justify="right", no_wrap=True)
    cases.add_column("expect", no_wrap=True)
    for row in report["cases"]:
        glyph, style = ("✓", "green") if row["expect_met"] else ("✗", "red")
        to_conv = row["iterations_to_convergence"]
        cases.add_row(
            row["id"], row["run_id"] or "-", status_text(row["status"]), row["termination_reason"] or "-",
            str(to_conv) if to_conv is not None else f"- ({row['iterations']})", _pct(row["invariant_violation_rate"]),
            f"{row['tokens']:,}", f"${row['cost_usd']:.6f}", _ms(row["latency_ms"]), f"{row['wall_s']:.1f}s",
            Text(f"{glyph} {row['expect'] or 'converged'}", style=style),
        )
    t = report["totals"]
    totals = Table.grid(padding=(0, 2))
    totals.add_row("convergence", f"{t['converged']} of {t['cases']} ({_pct(t['convergence_rate'])})"
                   + (f"  (required {_pct(report['min_convergence'])})" if report["min_convergence"] is not None else ""))
    totals.add_row("expectations met", f"{t['expectations_met']} of {t['cases']} ({_pct(t['expectation_rate'])})")
    mean = t["mean_iterations_to_convergence"]
    totals.add_row("iterations", f"{t['iterations']} in all; {mean:.2f} to convergence on average" if mean is not None
                   else f"{t['iterations']} in all; none converged")
    totals.add_row("invariant violations", f"{t['invariant_violations']} iteration(s) ({_pct(t['invariant_violation_rate'])})")
    totals.add_row("tokens", f"{t['tokens']:,} ({t['tokens_in']:,} in, {t['tokens_out']:,} out)")
    per = t["cost_per_converged_usd"]
    totals.add_row("cost", f"${t['cost_usd']:.6f}; " + (f"${per:.6f} per converged case" if per is not None
                                                         else "no case converged"))
    totals.add_row("model call latency", f"p50 {_ms(t['latency_ms']).replace(' / ', ' ms, p95 ')} ms"
                   if t["latency_ms"]["p50"] is not None else "-")
    totals.add_row("case wall time", f"p50 {t['case_wall_s']['p50']:.1f}s, p95 {t['case_wall_s']['p95']:.1f}s"
                   if t["case_wall_s"]["p50"] is not None else "-")
    totals.add_row("batch wall time", f"{report['wall_s']:.1f}s, {report['parallel']} at a time")
    totals.add_row("endings", ", ".join(f"{k} {v}" for k, v in t["termination_reasons"].items()))
    return cases, totals


def eval_cases(
    loop_ref: str,
    db: StoreTarget,
    *,
    cases_file: Path,
    parallel: int | None = None,
    model: str | None = None,
    as_json: bool = False,
    min_convergence: float | None = None,
) -> int:
    """Run the cases and report. Exit 0, or 3 when the convergence rate is below min_convergence."""
    parallel = parallel or 1
    loop, ref, cases = _prepare(loop_ref, cases_file, model)
    cases = _within_daily_budget(db, loop, cases, None, lower="the cases' budget_usd")
    console = _console()
    store = db.open()
    try:
        width = max(len(c.id) for c in cases)
        if not as_json:
            console.print(Text.assemble(("loopterm eval ", "bold"), (loop.name, "bold cyan"),
                                        f"  {len(cases)} case(s) from {_display(cases.path)}, {parallel} at a time"))
        report, results = asyncio.run(evaluate(
            loop, store, cases, parallel=parallel, workspace_root=db.workspace_root(), loop_ref=ref,
            model=model, on_event=None if as_json else _Progress(console, width), db=db.absolute(),
            min_convergence=min_convergence,
        ))
    finally:
        store.close()
    code = EXIT_OK if report["passed"] else EXIT_NOT_MET
    if as_json:
        print(json.dumps(report, indent=2))
        return code
    cases_table, totals = _eval_tables(report)
    console.print(cases_table)
    console.print(totals)
    _kept(console, results)
    console.print(Text(f"the runs are in {_display(db)}, like any other: `loopterm show RUN`, `loopterm watch RUN`, "
                       "`loopterm fork RUN --at N`", style="dim"))
    if not report["passed"]:
        console.print(Text(f"✗ convergence {_pct(report['totals']['convergence_rate'])} is below the required "
                           f"{_pct(min_convergence)} (exit {EXIT_NOT_MET})", style="bold red"))
    return code

