"""A new run: its record (status created), its workspace, and the first events of its log."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from loopterm.core import runlog as log
from loopterm.core.loop import Loop
from loopterm.core.persistence import Journal
from loopterm.core.records import RunRecord
from loopterm.core.secrets import redact
from loopterm.core.shadow import mark_shadow
from loopterm.core.termination import Status


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def new_run(
    loop: Loop,
    journal: Journal,
    *,
    loop_ref: str,
    model: str | None = None,
    max_iterations: int | None = None,
    budget: dict[str, Any] | None = None,
    workspace_root: Path | None = None,
    workspace: Path | None = None,
    run_id: str | None = None,
    parent_run: str | None = None,
    goal: str | None = None,
    shadow: bool = False,
    origin: str | None = None,
) -> RunRecord:
    """Record a new run and prepare its workspace.

    `workspace`: a directory someone else prepared (a git worktree for a parallel case); it is used as
    it is, and the loop's workspace_files are not copied into it. `origin`: what started the run,
    recorded with it (default "child" for a called loop, else "run"; "trigger" from the daemon).
    """
    from loopterm.core.nesting import check_calls

    check_calls(loop, loop_ref)  # a cycle of loops calling each other is refused before anything is created
    run_id = run_id or new_run_id()
    if workspace is None:
        root = workspace_root or Path.cwd() / ".loopterm" / "workspaces"
        workspace = (root / run_id).resolve()
        workspace.mkdir(parents=True, exist_ok=True)
        if loop.workspace_files is not None:
            shutil.copytree(loop.workspace_files, workspace, dirs_exist_ok=True)
        if loop.setup is not None:
            loop.setup(workspace)
    else:
        workspace = workspace.resolve()
    merged_budget = {**loop.budget.model_dump(), **(budget or {})}
    now = time.time()
    run = RunRecord(
        id=run_id, loop=loop.name, loop_ref=loop_ref, goal=redact(goal or loop.goal), spec_hash=loop.spec_hash(),
        model=model or loop.model, status=Status.CREATED.value, workspace=str(workspace), created_at=now,
        updated_at=now, max_iterations=max_iterations or loop.max_iterations, budget=merged_budget,
        parent_run=parent_run,
        fork_iteration=0 if parent_run else None,  # a child inherits none of its caller's iterations
        origin=origin or ("child" if parent_run else "run"),
    )
    journal.create_run(run)
    journal.append_event(run_id, log.RunCreated(loop_ref=loop_ref, model=run.model, budget=merged_budget))
    if shadow:
        mark_shadow(journal, run_id)
    return run
