"""`--submit`: runs handed to the cluster's workers instead of run here.

`loopterm run LOOP --submit` records the run at once (so `loopterm runs` and `watch` show it, status
created) and queues its first segment; `loopterm eval LOOP --cases F --submit` does so for every case,
each run's id derived from the batch and the case, so submitting the same batch again (a retry after a
dropped connection) finds the runs it made instead of making more; `loopterm resume RUN --submit`
queues the next segment of a run (with `--side-effects`, a person's answer first). Workers
(`loopterm worker`) execute them. A SQLite store is refused in one line (core/queues.py says why).

The run id goes to standard output (one per line; `case run` for a batch), what happened to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any



def store_location(args: argparse.Namespace) -> Path | str:
    """The store the arguments name (--db, else $LOOPTERM_DB): a postgresql:// URL (the password kept: it
    connects; never printed) or the SQLite file's path."""
    from loopterm.tui.console import store_target

    found = _plain(store_target(args))
    assert found is not None
    return found


def _plain(target: object) -> Path | str | None:
    """A parsed store target's URL or path; None for a plain value."""
    backend = getattr(target, "backend", None)
    if backend == "postgresql":
        return str(getattr(target, "url"))
    if backend == "sqlite":
        return Path(getattr(target, "path"))
    return None


def _workspace(location: Path | str, run_id: str) -> Path:
    """Where a submitted run's workspace goes: where this store's runs get theirs (beside a SQLite file;
    for a PostgreSQL store, .loopterm/workspaces or $LOOPTERM_WORKSPACES). It is made by the worker that
    runs it, on its own machine (core/segments.py)."""
    from loopterm.store.target import StoreTarget

    return StoreTarget.of(location).workspace_root() / run_id


def _say(line: str) -> None:
    print(f"loopterm: {line}", file=sys.stderr, flush=True)


def submit_run(loop_ref: str, location: Path | str, *, model: str | None, max_iterations: int | None,
               budget_usd: float | None, budget_tokens: int | None, shadow: bool = False) -> int:
    """Record a run and queue its first segment; print its id."""
    from loopterm.core import runs as service
    from loopterm.core.creation import new_run, new_run_id
    from loopterm.core.loader import load_loop
    from loopterm.core.queues import Queues, queue_db
    from loopterm.store import Store

    url = queue_db(location, what="`loopterm run --submit`")
    loop, ref = load_loop(loop_ref)
    chosen = model or loop.model
    service.preflight(loop, ref, chosen)  # a bad model is refused here, not on a worker later
    with Queues(url) as queues, Store.open(location) as store:
        budget, note = service.new_run_budget(store, loop, usd=budget_usd, tokens=budget_tokens)
        if note:
            _say(note)
        run_id = new_run_id()
        new_run(loop, store, loop_ref=ref, model=chosen, max_iterations=max_iterations, budget=budget or None,
                workspace=_workspace(location, run_id), run_id=run_id, shadow=shadow)
        queued = queues.enqueue(run_id, chosen, "start")
    print(run_id, flush=True)
    _say(f"run {run_id} of {loop.name} queued on {queued.queue}; a worker runs it (`loopterm watch {run_id}`)")
    return 0


def batch_key(ref: str, spec_hash: str, cases_path: Path, model: str | None, max_iterations: int | None,
              budget: dict[str, Any]) -> str:
    """A batch named by what it runs: the same loop, cases file and options give the same key."""
    digest = hashlib.sha256()
    for part in (ref, spec_hash, cases_path.read_bytes().hex(), model or "", str(max_iterations or ""),
                 repr(sorted(budget.items()))):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:12]


def submit_cases(loop_ref: str, location: Path | str, *, cases_file: Path, model: str | None,
                 max_iterations: int | None = None, budget_usd: float | None = None,
                 budget_tokens: int | None = None, batch: str | None = None) -> int:
    """One run per case, recorded and queued; a case already submitted in this batch is not made again."""
    from loopterm.core import runlog as log
    from loopterm.core.batch import check_cases
    from loopterm.core.cases import load_cases
    from loopterm.core.creation import new_run
    from loopterm.core.daily_budget import check_daily_budget
    from loopterm.core.errors import ConfigError
    from loopterm.core.loader import load_loop
    from loopterm.core.queues import Queues, batch_run_id, queue_db
    from loopterm.core.worktree import code_changing
    from loopterm.store import Store

    url = queue_db(location, what="`--submit`")
    loop, ref = load_loop(loop_ref)
    if code_changing(loop):
        raise ConfigError(f"loop {loop.name} changes code: its cases need git worktrees, which workers do not make "
                          "yet; run them on one machine (without --submit)")
    cases = load_cases(cases_file)
    models = check_cases(loop, cases, model)
    budget: dict[str, Any] = {k: v for k, v in (("usd", budget_usd), ("tokens", budget_tokens)) if v is not None}
    key = batch or batch_key(ref, loop.spec_hash(), cases.path, model, max_iterations, budget)
    with Queues(url) as queues, Store.open(location) as store:
        own = [c.budget_usd if c.budget_usd is not None else budget_usd if budget_usd is not None else loop.budget.usd
               for c in cases]
        total = sum(b for b in own if b is not None) if all(b is not None for b in own) else None
        check_daily_budget(store, total, what=f"the {len(own)} cases' USD budgets together",
                           lower="the cases' budget_usd")
        made = 0
        for case in cases:
            run_id = batch_run_id(key, case.id)
            if _exists(store, run_id):
                again = " (already submitted)"
            else:
                case_budget = {**budget, **({"usd": case.budget_usd} if case.budget_usd is not None else {})}
                new_run(loop, store, loop_ref=ref, model=models[case.id], run_id=run_id, goal=case.goal,
                        max_iterations=case.max_iterations or max_iterations, budget=case_budget or None,
                        workspace=_workspace(location, run_id))
                again = ""
                made += 1
            if not any(isinstance(e.event, log.CaseStarted) for e in store.events(run_id)):
                store.append_event(run_id, log.CaseStarted(id=case.id, cases_file=str(cases.path.resolve()),
                                                           expect=case.expect))
            queued = queues.enqueue(run_id, models[case.id], "start")
            print(f"{case.id} {run_id}", flush=True)
            _say(f"case {case.id}: run {run_id} on {queued.queue}{again}")
    _say(f"batch {key}: {made} new run(s) of {len(cases)} case(s) queued; `loopterm runs` lists them "
         f"(submit it again: nothing is made twice; --batch NAME makes a new batch of the same cases)")
    return 0


def _exists(store: Any, run_id: str) -> bool:
    from loopterm.core.errors import LooptermError

    try:
        store.get_run(run_id)
    except (LooptermError, KeyError, LookupError):
        return False
    return True


def submit_resume(location: Path | str, prefix: str, *, side_effects: str | None) -> int:
    """Queue the next segment of an existing run (after a person's answer to a side effect, if given)."""
    from loopterm.core import runs as service
    from loopterm.core.errors import ConfigError
    from loopterm.core.queues import Queues, queue_db
    from loopterm.core.termination import Status
    from loopterm.store import Store

    url = queue_db(location, what="`loopterm resume --submit`")
    with Queues(url) as queues, Store.open(location, create=False) as store:
        run = store.resolve_run(prefix)
        if run.status == Status.CONVERGED.value:
            raise ConfigError(f"run {run.id} already converged; nothing to resume (fork it to try something else)")
        if side_effects is not None:
            service.answer_side_effect(store, run, side_effects)
        last = store.events(run.id)[-1].id
        queued = queues.enqueue(run.id, run.model, f"resume-{last}")
    print(run.id, flush=True)
    _say(f"run {run.id}: next segment queued on {queued.queue}" if queued.fresh
         else f"run {run.id}: a segment of it is queued or running already; it takes what is new")
    return 0
