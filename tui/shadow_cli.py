"""`loopterm eval LOOP --shadow [--run RUN] [--json] [--min-agreement R]`: how often a person agreed.

Reads the verdicts of the loop's shadow runs from the store (core/shadow.py folds them) and reports, per
tool and in total: proposals, agreed, edited, denied and the agreement rate (agreed / proposals).
Exit 0; 3 when the total agreement rate is below --min-agreement (or nothing was judged yet and a
minimum was asked for); 2 for bad input (no such run, not a shadow run, no shadow runs of the loop).
Imported only after the arguments parsed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loopterm.core.errors import ConfigError
from loopterm.core.records import RunRecord
from loopterm.core.fold import fold
from loopterm.core.shadow import REPORT_VERSION, agreement, verdicts
from loopterm.store import Store
from loopterm.store.target import StoreTarget
from loopterm.tui.widgets.render import clean

EXIT_OK = 0
EXIT_NOT_MET = 3


def refuse_with_cases() -> None:
    raise ConfigError("--shadow cannot run a cases file: a shadow run waits on a person for every proposal, and "
                      "a batch has nobody to answer; drop --cases, or drop --shadow")


def check_eval_arguments(*, cases: Path | None, shadow: bool, run: str | None, min_agreement: float | None,
                         parallel: int | None, model: str | None, min_convergence: float | None) -> None:
    """One line for an eval command line that mixes the two kinds of eval, or names neither."""
    if not shadow:
        if run is not None or min_agreement is not None:
            raise ConfigError("--run and --min-agreement report on shadow runs; add --shadow")
        if cases is None:
            raise ConfigError("eval needs --cases FILE (run the loop over a cases file) or --shadow (report the "
                              "agreement of its shadow runs)")
        return
    mixed = [flag for flag, given in (("--cases", cases is not None), ("--parallel", parallel is not None),
                                      ("--model", model is not None), ("--min-convergence", min_convergence is not None))
             if given]
    if mixed:
        raise ConfigError(f"{', '.join(mixed)} cannot go with --shadow: a shadow eval reads the shadow runs in the "
                          "store and runs nothing; drop them (see `loopterm eval --help`)")


def _loop_name(loop_ref: str) -> str:
    from loopterm.core.loader import load_loop

    loop, _ = load_loop(loop_ref)
    return loop.name


def shadow_runs(store: Store, loop: str, run: str | None) -> list[RunRecord]:
    """The shadow runs to report on: the one named (which must be a shadow run of the loop) or all of the loop's."""
    if run is not None:
        record = store.resolve_run(run)
        if record.loop != loop:
            raise ConfigError(f"run {record.id} is a run of loop {clean(record.loop)!r}, not of {clean(loop)!r}; "
                              f"`loopterm eval {clean(record.loop)} --shadow --run {record.id}` reports on it")
        if not fold(store.events(record.id)).shadow:
            raise ConfigError(f"run {record.id} is not a shadow run; start one with `loopterm run LOOP --shadow`")
        return [record]
    found = [r for r in store.list_runs() if r.loop == loop and fold(store.events(r.id)).shadow]
    if not found:
        raise ConfigError(f"no shadow run of loop {clean(loop)!r} in the store yet; start one with "
                          f"`loopterm run {clean(loop)} --shadow`")
    return found


def shadow_report(store: Store, loop: str, runs: list[RunRecord], *, db: str,
                  min_agreement: float | None) -> dict[str, Any]:
    """The report (stable keys; `--json` prints it as it is)."""
    every = []
    per_run = []
    for run in runs:
        found = verdicts(fold(store.events(run.id)))
        every.extend(found)
        per_run.append({"run_id": run.id, "status": run.status, "iterations": run.iterations,
                        **agreement(found)["totals"]})
    figures = agreement(every)
    rate = figures["totals"]["agreement_rate"]
    passed = min_agreement is None or (rate is not None and rate >= min_agreement)
    return {"version": REPORT_VERSION, "loop": loop, "db": db, "min_agreement": min_agreement, "passed": passed,
            "runs": per_run, "tools": figures["tools"], "totals": figures["totals"]}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _table(rows: list[dict[str, Any]], first: str, key: str, totals: dict[str, Any] | None) -> Table:
    table = Table(box=None, header_style="bold")
    table.add_column(first, no_wrap=True)
    for col in ("proposals", "agreed", "edited", "denied", "agreement"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(Text(clean(str(row[key]))), str(row["proposals"]), str(row["agreed"]), str(row["edited"]),
                      str(row["denied"]), _pct(row["agreement_rate"]))
    if totals is not None:
        table.add_row(Text("total", style="bold"), str(totals["proposals"]), str(totals["agreed"]),
                      str(totals["edited"]), str(totals["denied"]), Text(_pct(totals["agreement_rate"]), style="bold"))
    return table


def eval_shadow(loop_ref: str, db: StoreTarget, *, run: str | None, as_json: bool, min_agreement: float | None) -> int:
    if not db.exists():
        raise ConfigError(f"no store at {db}; start a shadow run with `loopterm run LOOP --shadow` first")
    loop = _loop_name(loop_ref)
    with db.open(create=False) as store:
        runs = shadow_runs(store, loop, run)
        report = shadow_report(store, loop, runs, db=db.absolute(), min_agreement=min_agreement)
    code = EXIT_OK if report["passed"] else EXIT_NOT_MET
    if as_json:
        print(json.dumps(report, indent=2))
        return code
    console = Console(highlight=False)
    console.print(Text.assemble(("loopterm eval ", "bold"), (clean(loop), "bold cyan"),
                                f"  --shadow: {len(runs)} shadow run(s), {report['totals']['proposals']} proposal(s) judged"))
    console.print(_table(report["tools"], "tool", "tool", report["totals"]))
    if len(runs) > 1:
        console.print(_table(report["runs"], "run", "run_id", None))
    unfinished = [r for r in runs if r.status in ("running", "paused", "stepping", "escalated", "created")]
    if unfinished:
        console.print(Text(f"{len(unfinished)} run(s) still open ({', '.join(r.id for r in unfinished)}): their "
                           "later verdicts will count too", style="dim"))
    console.print(Text("agreement = agreed / proposals: the share of proposals a person would have let run as "
                       "they were", style="dim"))
    if not report["passed"]:
        console.print(Text(f"✗ agreement {_pct(report['totals']['agreement_rate'])} is below the required "
                           f"{_pct(min_agreement)} (exit {EXIT_NOT_MET})", style="bold red"))
    return code


def announce(console: Console, run_id: str, wait: bool) -> None:
    """The line a headless shadow run starts with: nothing runs, and where a person answers."""
    how = (f"answer each proposal (agree, edit or deny) from `loopterm watch {run_id}`" if wait
           else f"--no-wait: it stops (exit 4) at the first proposal; `r` in `loopterm watch {run_id}` continues it "
                "and asks you there")
    console.print(Text(f"◐ shadow run {run_id}: nothing the loop proposes is executed; {how}", style="magenta"))


def show_verdicts(console: Console, store: Store, run: RunRecord) -> None:
    """`loopterm show RUN` of a shadow run: each verdict, then the agreement per tool."""
    view = fold(store.events(run.id))
    if not view.shadow:
        return
    iteration = {key: n for key, (n, _) in view.verdicts.items()}
    found = verdicts(view)
    console.print(Text(f"◐ shadow run: nothing it proposed was executed; {len(found)} proposal(s) judged",
                       style="bold magenta"))
    for v in found:
        line = Text(f"  {iteration.get(v.key) or '?':>3}  ")
        line.append(clean(f"{v.tool}({json.dumps(v.args)[:60]})"))
        style = {"agree": "green", "edit": "yellow", "deny": "red"}[v.verdict]
        glyph = {"agree": "✓", "edit": "✎", "deny": "✗"}[v.verdict]
        line.append(f"  {glyph} {v.verdict}", style=style)
        if v.person_args is not None:
            line.append(clean(f" → {v.person_tool + ' ' if v.person_tool else ''}{json.dumps(v.person_args)[:60]}"))
        if v.reason:
            line.append(clean(f": {v.reason[:80]}"), style="dim")
        console.print(line)
    if found:
        console.print(_table(agreement(found)["tools"], "tool", "tool", agreement(found)["totals"]))
