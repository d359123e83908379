"""Run the cases of a cases file, up to K at a time, in one process and one event loop.

Each case is one ordinary run (watchable, resumable and forkable like any other), recorded with
its case id (event `case`). Runs of a code-changing loop each get their own git worktree (see
`loopterm.core.worktree`), so concurrent runs never write the same files; the loop's setup runs
in it, so a case's workspace is prepared as `loopterm run` prepares one. Nobody waits on a
person: an escalation ends that case with status escalated. A case that raises is that case's
failure, never the batch's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from loopterm.core import runlog as log
from loopterm.core.cases import Case, CaseSet, scripted_name
from loopterm.core.creation import new_run_id
from loopterm.core.errors import ConfigError
from loopterm.core.loop import Loop
from loopterm.core.persistence import Journal
from loopterm.core.runs import create, preflight_model, record_end
from loopterm.core.termination import Status, TerminationReason
from loopterm.core.worktree import BaseRepo, Snapshot, Worktrees, code_changing, require_git


@dataclass
class CaseResult:
    """How one case ended."""

    case_id: str
    run_id: str | None  # None when the case failed before its run was created
    status: str  # a run status: converged, terminated, escalated, failed, stopped
    termination_reason: str | None
    message: str | None
    iterations: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    elapsed_s: float  # the case's wall time, worktree set-up and clean-up included
    started_at: float  # wall clock (time.time())
    ended_at: float
    expect: str | None
    expect_met: bool
    model: str
    worktree: str | None = None  # the kept worktree's path (a case that did not converge), else None

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @property
    def converged(self) -> bool:
        return self.status == Status.CONVERGED.value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CaseStarted:
    """A case's run was created and is about to start (passed to on_event)."""

    case_id: str
    run_id: str
    model: str
    workspace: str


@dataclass(frozen=True)
class CaseFinished:
    """A case ended (passed to on_event)."""

    result: CaseResult


OnEvent = Callable[[str, Any], None]  # (case id, CaseStarted | an EngineEvent | CaseFinished)


def case_model(loop: Loop, case: Case, model: str | None) -> str:
    """The case's own model, else the command's, else its script's scripted model, else the loop's."""
    if case.model:
        return case.model
    if model:
        return model
    if case.script is not None:
        return scripted_name(loop.name, case)
    return loop.model


def check_cases(loop: Loop, cases: CaseSet | list[Case], model: str | None = None) -> dict[str, str]:
    """Register every case's script and check every model before any run starts; {case id: model}.

    A problem is one ConfigError line naming the case.
    """
    chosen: dict[str, str] = {}
    checked: set[tuple[str, Path | None]] = set()
    for case in cases:
        name = case_model(loop, case, model)
        script = None
        if name.startswith("scripted/"):
            import loopterm.core.scripted  # noqa: F401 - the provider that answers scripted/ (a case's own script)

            if case.script is not None and name == scripted_name(loop.name, case):
                script = case.script
            elif name == f"scripted/{loop.name}":
                script = loop.script
        if (name, script) not in checked:
            try:
                preflight_model(loop, name, script)
            except ConfigError as exc:
                raise ConfigError(f"case {case.id!r}: {exc}") from None
            checked.add((name, script))
        chosen[case.id] = name
    return chosen


def _raise_heads_kept(store: Journal, parallel: int) -> None:
    """A store keeps the last state of a few runs in memory for the next delta; keep one per concurrent run."""
    kept = getattr(store, "heads_kept", None)
    if isinstance(kept, int) and kept < parallel:
        setattr(store, "heads_kept", parallel)


async def run_cases(
    loop: Loop,
    store: Journal,
    cases: CaseSet | list[Case],
    *,
    parallel: int,
    model: str | None = None,
    workspace_root: Path,
    loop_ref: str,
    on_event: OnEvent | None = None,
    repos_root: Path | None = None,
    max_iterations: int | None = None,
    budget: dict[str, Any] | None = None,
    workdir: Path | None = None,
    learn: bool = True,
) -> list[CaseResult]:
    """Run every case, at most `parallel` at once; results in the cases' order.

    `workspace_root` holds each run's workspace (`<root>/<run id>`, a git worktree for a
    code-changing loop); base repositories go under `repos_root` (default: its sibling `repos`).
    `max_iterations` and `budget` are defaults for cases that do not set their own.
    learn=False: the runs recall long-term memory but leave it as it was, so no case sees
    what a sibling that finished first learned (an eval's figures then depend on the cases only).
    """
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    case_list = list(cases)
    cases_file = str(cases.path) if isinstance(cases, CaseSet) else None
    models = check_cases(loop, case_list, model)
    _raise_heads_kept(store, parallel)
    workspace_root = workspace_root.resolve()
    worktrees: Worktrees | None = None
    base: BaseRepo | None = None
    if code_changing(loop):
        require_git()
        worktrees = Worktrees((repos_root or workspace_root.parent / "repos").resolve())
        base = await worktrees.base(loop)  # a git problem stops the batch here, before any run
    gate = asyncio.Semaphore(parallel)

    def emit(case_id: str, event: Any) -> None:
        if on_event is not None:
            try:
                on_event(case_id, event)
            except Exception:  # noqa: BLE001 - a broken display must not fail a case
                pass

    async def one(case: Case) -> CaseResult:
        async with gate:
            result = await _run_case(
                loop, store, case, model=models[case.id], cases_file=cases_file, workspace_root=workspace_root,
                loop_ref=loop_ref, worktrees=worktrees, base=base, emit=emit,
                max_iterations=max_iterations, budget=budget, workdir=workdir, learn=learn,
            )
        emit(case.id, CaseFinished(result))
        return result

    return list(await asyncio.gather(*(one(case) for case in case_list)))


async def _run_case(
    loop: Loop,
    store: Journal,
    case: Case,
    *,
    model: str,
    cases_file: str | None,
    workspace_root: Path,
    loop_ref: str,
    worktrees: Worktrees | None,
    base: BaseRepo | None,
    emit: OnEvent,
    max_iterations: int | None,
    budget: dict[str, Any] | None,
    workdir: Path | None,
    learn: bool = True,
) -> CaseResult:
    started, clock = time.time(), time.monotonic()
    run_id = new_run_id()
    workspace: Path | None = None
    baseline: Snapshot = {}
    created = False
    final = None
    error: str | None = None
    try:
        if worktrees is not None and base is not None:
            workspace = await worktrees.add(base, workspace_root / run_id)
            baseline = await worktrees.prepare(loop, base, workspace)  # setup, then what the run is compared with
        case_budget = dict(budget or {})
        if case.budget_usd is not None:
            case_budget["usd"] = case.budget_usd
        engine = create(
            loop, store, ref=loop_ref, model=model, max_iterations=case.max_iterations or max_iterations,
            budget=case_budget, workspace_root=workspace_root, workspace=workspace, run_id=run_id, goal=case.goal,
            wait_on_person=False, workdir=workdir, learn=learn,
        )
        created = True
        workspace = engine.workspace
        store.append_event(run_id, log.CaseStarted(id=case.id, cases_file=cases_file, expect=case.expect))
        if base is not None:
            store.append_event(run_id, log.WorktreeAdded(path=str(workspace), base=str(base.path), commit=base.commit))
        engine.subscribe(lambda event: emit(case.id, event))
        emit(case.id, CaseStarted(case_id=case.id, run_id=run_id, model=model, workspace=str(workspace)))
        final = await engine.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - this case's failure, not the batch's
        error = f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, ConfigError) else str(exc)
        error = " ".join(error.split())[:500]
        if created:
            try:
                final = record_end(store, run_id, TerminationReason.FATAL_ERROR, error)
            except Exception:  # noqa: BLE001 - the store itself failed; report what we know
                final = None

    status = final.status if final is not None else Status.FAILED.value
    kept: str | None = None
    if worktrees is not None and base is not None and workspace is not None and workspace.exists():
        try:
            kept = await _settle_worktree(store, worktrees, base, workspace, baseline, run_id if created else None,
                                          status)
        except Exception as exc:  # noqa: BLE001 - a clean-up failure keeps the worktree; it is listed
            kept = str(workspace)
            if created:
                store.append_event(run_id, log.WorktreeKept(path=kept, base=str(base.path), status=status,
                                                            error=str(exc)))
    return CaseResult(
        case_id=case.id,
        run_id=run_id if created else None,
        status=status,
        termination_reason=final.termination_reason if final is not None else TerminationReason.FATAL_ERROR.value,
        message=(final.message if final is not None else None) or error,
        iterations=final.iterations if final is not None else 0,
        tokens_in=final.tokens_in if final is not None else 0,
        tokens_out=final.tokens_out if final is not None else 0,
        cost_usd=final.cost_usd if final is not None else 0.0,
        elapsed_s=time.monotonic() - clock,
        started_at=started,
        ended_at=time.time(),
        expect=case.expect,
        expect_met=case.met(status),
        model=model,
        worktree=kept,
    )


async def _settle_worktree(
    store: Journal, worktrees: Worktrees, base: BaseRepo, path: Path, baseline: Snapshot, run_id: str | None,
    status: str,
) -> str | None:
    """Converged: record the files the run changed, remove the worktree; otherwise keep it. The kept path, or None."""
    files = await worktrees.changes(path, baseline)
    where = {"path": str(path), "base": str(base.path), "commit": base.commit, "files": files}
    if status == Status.CONVERGED.value and run_id is not None:
        store.append_event(run_id, log.WorktreeRemoved(**where))
        await worktrees.remove(base, path)
        return None
    if run_id is not None:
        store.append_event(run_id, log.WorktreeKept(**where, status=status))
    return str(path)
