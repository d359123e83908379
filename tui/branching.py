"""Branching a run from a selected iteration."""

from __future__ import annotations

from functools import partial
from typing import Any

from loopterm.core import runs as service
from loopterm.core.creation import new_run_id
from loopterm.core.errors import LooptermError
from loopterm.core.loop import Loop
from loopterm.tui.screens.branch import BranchScreen


class Branching:
    """Mixed into LooptermApp: the branch dialog and starting the branch."""

    # -- branching ----------------------------------------------------------------

    def action_branch(self) -> None:
        view = self.view
        if view is None:
            self.notify("no run on screen", severity="warning")
            return
        n = self.timeline.selected_n
        if n is None:
            self.notify("select an iteration to branch from", severity="warning")
            return
        holder = self.timeline.holder_of(n) or view.run_id
        try:
            parent = self.store.get_run(holder)
        except KeyError:
            parent = view.run
        loop = self._loop_or_say(parent, "branch")
        if loop is None:
            return
        from loopterm.core.fork import plan_fork

        def planner(lines: list[str], reason: str) -> Any:
            return plan_fork(self.store, loop, self.store.get_run(parent.id), n, sets=lines, reason=reason)

        self.push_screen(BranchScreen(parent.id, n, planner), callback=partial(self._branch_planned, loop))

    def _branch_planned(self, loop: Loop, plan: Any) -> None:
        if plan is not None:
            self.run_worker(self._branch(loop, plan), name="branch", group="launch", exit_on_error=False)

    async def _branch(self, loop: Loop, plan: Any) -> None:
        from loopterm.core.fork import create_fork, rebuild_workspace

        parent_usd = (plan.parent.budget or {}).get("usd", loop.budget.usd)
        try:  # refused here, nothing is created (as `loopterm fork` does)
            service.new_run_budget(self.store, loop, usd=parent_usd, what="the branch's budget", lower=None)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            return
        run_id = new_run_id()
        branch = create_fork(self.store, loop, plan, run_id=run_id, workspace=self.workspace_root / run_id)
        self._starting.add(run_id)
        try:
            await rebuild_workspace(loop, self.store, branch)
        except Exception as exc:
            self._starting.discard(run_id)
            self.notify(f"branch {run_id} was created but its workspace could not be rebuilt: {exc}", severity="error",
                        markup=False)
            return
        self.refresh_tree()
        self.show_run(run_id)
        self.notify(f"branch {run_id[:8]} of run {plan.parent.id[:8]} at iteration {plan.at}", timeout=4)
        try:
            if not await self._model_ready(loop, branch.model):
                return
            engine = self._continuing(run_id, loop, "the branch's budget")
            if engine is not None:
                self.own(engine)
        finally:
            self._starting.discard(run_id)
        self.refresh_tree()

