"""`loopterm eval`: run a loop over a cases file and measure it, from the store's own rows.

Per case and in total: converged or not, iterations to convergence, termination reason, the
invariant violation rate (the share of iterations with any invariant False in their
invariant_status), tokens, cost, cost per converged case, latency p50/p95 (per model call, from
the iterations' latency_ms; and per case, the run's wall time), expectation met.

Percentiles are nearest-rank: the smallest recorded value with at least p% of the values at or
below it (so every figure is one that was actually measured). The runs stay in the store: they
can be watched, shown, resumed and forked like any other.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from loopterm.core.batch import CaseResult, OnEvent, run_cases
from loopterm.core.cases import CaseSet
from loopterm.core.loop import Loop
from loopterm.core.persistence import Journal
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.termination import Status

JSON_VERSION = 1


class EvalStore(Journal, Protocol):
    def iterations(self, run_id: str, own_only: bool = False) -> list[IterationRecord]: ...


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _spread(values: list[float], digits: int) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {"p50": r(percentile(values, 50)), "p95": r(percentile(values, 95))}


def _violated(record: IterationRecord) -> bool:
    return any(ok is False for ok in record.invariant_status.values())


def case_figures(result: CaseResult, run: RunRecord | None, iterations: list[IterationRecord]) -> dict[str, Any]:
    """One case's row of the report, from its run and iteration rows (the CaseResult for the rest)."""
    converged = run is not None and run.status == Status.CONVERGED.value
    n = len(iterations)
    violations = sum(1 for it in iterations if _violated(it))
    tokens_in = run.tokens_in if run else 0
    tokens_out = run.tokens_out if run else 0
    return {
        "id": result.case_id,
        "run_id": result.run_id,
        "model": run.model if run else result.model,
        "status": run.status if run else result.status,
        "converged": converged,
        "termination_reason": run.termination_reason if run else result.termination_reason,
        "message": (run.message if run else None) or result.message,
        "iterations": run.iterations if run else 0,
        "iterations_to_convergence": run.iterations if converged and run else None,
        "invariant_violations": violations,
        "invariant_violation_rate": round(violations / n, 6) if n else 0.0,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "tokens": tokens_in + tokens_out,
        "cost_usd": round(run.cost_usd, 10) if run else 0.0,
        "latency_ms": _spread([it.latency_ms for it in iterations], 3),
        "wall_s": round(run.elapsed_s, 3) if run else round(result.elapsed_s, 3),
        "expect": result.expect,
        "expect_met": result.expect_met,
        "worktree": result.worktree,
    }


def report(
    store: EvalStore,
    loop: Loop,
    cases: CaseSet,
    results: list[CaseResult],
    *,
    parallel: int,
    wall_s: float,
    model: str | None = None,
    db: str | None = None,
    min_convergence: float | None = None,
) -> dict[str, Any]:
    """The eval report (a JSON-ready dict with stable keys; README documents them)."""
    rows: list[dict[str, Any]] = []
    all_latencies: list[float] = []
    walls: list[float] = []
    iterations_total = violations_total = 0
    for result in results:
        run = store.get_run(result.run_id) if result.run_id else None
        its = store.iterations(result.run_id) if result.run_id else []
        row = case_figures(result, run, its)
        rows.append(row)
        all_latencies.extend(it.latency_ms for it in its)
        walls.append(row["wall_s"])
        iterations_total += len(its)
        violations_total += row["invariant_violations"]
    total = len(rows)
    converged = [r for r in rows if r["converged"]]
    met = sum(1 for r in rows if r["expect_met"])
    cost = sum(r["cost_usd"] for r in rows)
    tokens_in = sum(r["tokens_in"] for r in rows)
    tokens_out = sum(r["tokens_out"] for r in rows)
    rate = len(converged) / total if total else 0.0
    to_convergence = [r["iterations_to_convergence"] for r in converged]
    totals = {
        "cases": total,
        "converged": len(converged),
        "convergence_rate": round(rate, 6),
        "expectations_met": met,
        "expectation_rate": round(met / total, 6) if total else 0.0,
        "iterations": iterations_total,
        "mean_iterations_to_convergence": round(sum(to_convergence) / len(to_convergence), 6) if to_convergence else None,
        "invariant_violations": violations_total,
        "invariant_violation_rate": round(violations_total / iterations_total, 6) if iterations_total else 0.0,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "tokens": tokens_in + tokens_out,
        "cost_usd": round(cost, 10),
        "cost_per_converged_usd": round(cost / len(converged), 10) if converged else None,
        "latency_ms": _spread(all_latencies, 3),
        "case_wall_s": _spread(walls, 3),
        "termination_reasons": dict(sorted(Counter(str(r["termination_reason"]) for r in rows).items())),
    }
    passed = min_convergence is None or rate >= min_convergence
    return {
        "version": JSON_VERSION,
        "loop": loop.name,
        "cases_file": str(cases.path),
        "db": db,
        "model": model,
        "parallel": parallel,
        "wall_s": round(wall_s, 3),
        "min_convergence": min_convergence,
        "passed": passed,
        "totals": totals,
        "cases": rows,
    }


async def evaluate(
    loop: Loop,
    store: EvalStore,
    cases: CaseSet,
    *,
    parallel: int,
    workspace_root: Path,
    loop_ref: str,
    model: str | None = None,
    on_event: OnEvent | None = None,
    db: str | None = None,
    min_convergence: float | None = None,
    workdir: Path | None = None,
) -> tuple[dict[str, Any], list[CaseResult]]:
    """Run the cases (see run_cases) and build the report from the store's rows."""
    started = time.monotonic()
    results = await run_cases(loop, store, cases, parallel=parallel, learn=False, model=model, workspace_root=workspace_root,
                              loop_ref=loop_ref, on_event=on_event, workdir=workdir)
    wall = time.monotonic() - started
    return report(store, loop, cases, results, parallel=parallel, wall_s=wall, model=model, db=db,
                  min_convergence=min_convergence), results
