"""Branching a run from a selected iteration: one dialog (tui/screens/branch.py), then the branch starts."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from loopterm.core import runs as service
from loopterm.core.control import Pause
from loopterm.core.creation import new_run_id
from loopterm.core.errors import LooptermError
from loopterm.core.loop import Loop
from loopterm.tui.screens.branch import BranchOrder, BranchRequest, BranchScreen


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
        from loopterm.core.fork import fork_options, plan_fork

        def planner(request: BranchRequest) -> Any:
            """Everything checked, nothing created (as `loopterm fork` does): the patches, the invariants, the
            reason and model as stored text, then the branch's budget under today's."""
            current = self.store.get_run(parent.id)
            plan = plan_fork(self.store, loop, current, n, sets=request.patches, relax=request.relax,
                             model=request.model, reason=request.reason)
            usd = (current.budget or {}).get("usd", loop.budget.usd)
            try:
                service.new_run_budget(self.store, loop, usd=usd, what="the branch's budget", lower=None)
            except LooptermError as exc:
                self.notify(str(exc), severity="error", timeout=15, markup=False)
                raise
            return plan

        async def model_check(model: str) -> None:
            """The model the branch calls, checked in a thread (a litellm model imports litellm)."""
            await asyncio.to_thread(service.preflight_model, loop, model,
                                    loop.script if model.startswith("scripted/") else None)

        options = fork_options(self.store, loop, parent, n)
        self.push_screen(BranchScreen(options, planner, model_check), callback=partial(self._branch_planned, loop))

    def _branch_planned(self, loop: Loop, order: BranchOrder | None) -> None:
        if order is not None:
            self.run_worker(self._branch(loop, order), name="branch", group="launch", exit_on_error=False)

    async def _branch(self, loop: Loop, order: BranchOrder) -> None:
        """Create the checked branch, rebuild its workspace, and start it (paused: it waits before its first
        iteration until space resumes it)."""
        from loopterm.core.fork import create_fork, rebuild_workspace

        plan = order.plan
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
        said = [f"branch {run_id[:8]} of run {plan.parent.id[:8]} at iteration {plan.at}"]
        if plan.patches:
            said.append(f"patched {', '.join('.'.join(map(str, path)) for path, _ in plan.patches)}")
        if plan.relaxed:
            said.append(f"relaxed {', '.join(plan.relaxed)}")
        if order.paused:
            said.append("paused: space starts it")
        self.notify("; ".join(said), timeout=5, markup=False)
        try:
            engine = self._continuing(run_id, loop, "the branch's budget")
            if engine is not None:
                if order.paused:  # obeyed at its first boundary, before it calls the model
                    self.send(run_id, Pause(), quiet=True)
                self.own(engine)
        finally:
            self._starting.discard(run_id)
        self.refresh_tree()
