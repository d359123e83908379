"""Comparing two runs: `c` marks the run on screen, `c` on another run opens them side by side.

`c` twice on the same branch compares it with its parent (the quickest question after branching: what did
the branch change?); `c` twice on a run with no parent clears the mark. The marked run is A (left), the
run on screen B (right).
"""

from __future__ import annotations

from loopterm.tui.screens.compare import CompareScreen


class Comparing:
    """Mixed into LooptermApp: the compare mark and opening the compare screen."""

    compare_mark: str | None = None

    def action_compare(self) -> None:
        view = self.view
        if view is None:
            self.notify("no run on screen to compare", severity="warning")
            return
        here, marked = view.run_id, self.compare_mark
        if marked is None:
            self._mark_for_compare(here)
            then = " (c again: compare it with its parent)" if view.run.parent_run else ""
            self.notify(f"run {here[:8]} marked ⇄: show another run and press c to compare the two{then}",
                        timeout=6, markup=False)
            return
        self._mark_for_compare(None)
        if marked != here:
            self.open_compare(marked, here)
        elif view.run.parent_run:
            self.open_compare(view.run.parent_run, here)
        else:
            self.notify(f"mark cleared: run {here[:8]} has no parent to compare it with", timeout=4, markup=False)

    def open_compare(self, a: str, b: str) -> None:
        """Runs A and B side by side on their own screen (escape comes back here)."""
        self.clear_notifications()  # the mark's hint would cover the totals
        self.push_screen(CompareScreen(self.store, a, b, self.palette))

    def _mark_for_compare(self, run_id: str | None) -> None:
        self.compare_mark = run_id
        self.run_tree.mark(run_id)
        self.refresh_tree()
