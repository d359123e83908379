"""Branch from the selected iteration: optional PATH=JSON patches and a reason, checked before anything is created."""

from __future__ import annotations

from typing import Any, Callable

from textual.app import ComposeResult
from textual.widgets import Button, Input, Static, TextArea

from loopterm.core.errors import LooptermError
from loopterm.tui.screens.dialog import Dialog

# (patch lines, reason) -> a fork plan; raises LooptermError (one line) when the branch would be invalid.
Planner = Callable[[list[str], str], Any]


class BranchScreen(Dialog[Any]):
    """Dismisses with the validated plan (core.fork.ForkPlan); nothing is created here."""

    def __init__(self, run_id: str, at: int, planner: Planner) -> None:
        super().__init__()
        self.run_id = run_id
        self.at = at
        self.planner = planner
        self.title_text = f"Branch run {run_id} from iteration {at}"

    def fields(self) -> ComposeResult:
        yield Static(
            "The branch continues from the state after this iteration; nothing of the parent is copied.\n"
            "Optional patches, one PATH=JSON per line, e.g.  memory.subgoal=\"try the other parser\"",
            classes="hint", markup=False,
        )
        yield TextArea("", id="patches", show_line_numbers=False)
        yield Input(placeholder="why (required: recorded with the branch)", id="reason")

    def buttons(self) -> ComposeResult:
        yield Button("Create branch", variant="primary", id="submit")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#patches", TextArea).styles.height = 6
        self.query_one("#reason", Input).focus()

    def submit(self, button: str) -> None:
        lines = [line.strip() for line in self.query_one("#patches", TextArea).text.splitlines() if line.strip()]
        reason = self.query_one("#reason", Input).value.strip()
        if not reason:
            self.fail("give a reason: a branch is recorded with why it was made; nothing was created")
            self.query_one("#reason", Input).focus()
            return
        try:
            plan = self.planner(lines, reason)
        except LooptermError as exc:
            self.fail(str(exc))
            return
        self.dismiss(plan)
