"""A side-effecting call a run may repeat (a branch reaching its ancestor's call, or one interrupted mid-flight):
a person decides, as `loopterm resume RUN --side-effects reuse|reexecute` would."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Button, Static

from loopterm.core.runlog import SideEffectPending
from loopterm.tui.screens.dialog import Dialog
from loopterm.tui.widgets.render import literal, pretty


class SideEffectScreen(Dialog[str]):
    """Dismisses with "reuse" or "reexecute" (or None)."""

    def __init__(self, run_id: str, pending: SideEffectPending) -> None:
        super().__init__()
        self.run_id = run_id
        self.pending = pending
        self.title_text = f"Run {run_id} would repeat a side effect: decide before it continues"
        self.submit_label = "execute it again" if pending.why == "interrupted" else "reuse the recorded result"

    def fields(self) -> ComposeResult:
        data = self.pending
        text = Text()
        if data.why == "interrupted":
            text.append("This call was interrupted mid-flight; whether it took effect is unknown.\n", style="italic")
        else:
            text.append(f"Run {data.earlier_run} already made this call at iteration {data.earlier_iteration}.\n",
                        style="italic")
        text.append("tool  ", style="bold")
        text.append(literal(data.tool or "?"))
        text.append("\n")
        text.append(literal(pretty(data.args)))
        yield Static(text, id="side-effect")

    def buttons(self) -> ComposeResult:
        interrupted = self.pending.why == "interrupted"
        yield Button("Reuse the recorded result", variant="primary", id="reuse", disabled=interrupted)
        yield Button("Execute it again", variant="warning", id="reexecute")

    def submit(self, button: str) -> None:
        if button == "submit":
            button = "reexecute" if self.pending.why == "interrupted" else "reuse"
        self.dismiss(button)
