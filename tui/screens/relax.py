"""Relax or restore an invariant: choose it, say why, optionally only for the next N iterations."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Button, Input, Select, Static

from loopterm.core.control import Relax, Restore
from loopterm.tui.screens.dialog import Dialog


@dataclass
class InvariantChoice:
    name: str
    description: str = ""
    relaxed: str | None = None  # the reason, when it is relaxed now
    holds: bool | None = None  # at the selected iteration


class RelaxScreen(Dialog[Relax | Restore]):
    """Top to bottom: which invariant (a violated one is chosen first), why, for how long."""

    def __init__(self, run_id: str, choices: list[InvariantChoice], initial: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.choices = {c.name: c for c in choices}
        self.initial = initial if initial in self.choices else (choices[0].name if choices else None)
        self.title_text = f"Relax or restore an invariant of run {run_id}"

    def fields(self) -> ComposeResult:
        options = []
        for choice in self.choices.values():
            label = Text(choice.name)
            if choice.relaxed is not None:
                label.append("  (relaxed)", style="italic")
            elif choice.holds is False:
                label.append("  (violated)", style="bold")
            options.append((label, choice.name))
        yield Select(options, value=self.initial if self.initial else Select.BLANK, allow_blank=False, id="invariant")
        yield Static("", id="invariant-info", markup=False)
        yield Input(placeholder="why (required: recorded with the change)", id="reason")
        yield Input(placeholder="for the next N iterations only (blank: until restored)", id="iterations", type="integer")

    def buttons(self) -> ComposeResult:
        yield Button("Relax", variant="warning", id="relax")
        yield Button("Restore", variant="primary", id="restore")

    def on_mount(self) -> None:
        super().on_mount()
        self._describe()

    def on_select_changed(self, event: Select.Changed) -> None:
        self._describe()

    def _selected(self) -> InvariantChoice | None:
        value = self.query_one("#invariant", Select).value
        return self.choices.get(value) if isinstance(value, str) else None

    def _describe(self) -> None:
        """Say what the chosen invariant is, and what ctrl+s does to it (relax it, or restore it if relaxed)."""
        choice = self._selected()
        self.submit_label = f"{self._change(choice)} {choice.name}" if choice is not None else "relax"
        self.refresh_keys()
        info = self.query_one("#invariant-info", Static)
        if choice is None:
            info.update("this loop declares no invariants")
            return
        text = Text(choice.description or "(no description)", style="italic")
        if choice.relaxed is not None:
            text.append(f"\nrelaxed now: {choice.relaxed}", style="")
        info.update(text)

    @staticmethod
    def _change(choice: InvariantChoice | None) -> str:
        return "restore" if choice is not None and choice.relaxed is not None else "relax"

    def submit(self, button: str) -> None:
        choice = self._selected()
        if choice is None:
            self.fail("choose an invariant first")
            return
        reason = self.query_one("#reason", Input).value.strip()
        if not reason:
            self.fail("give a reason: relaxing or restoring an invariant is recorded with why; nothing was sent")
            self.query_one("#reason", Input).focus()
            return
        if button == "submit":  # enter or ctrl+s: the change that makes sense for this invariant
            button = self._change(choice)
        if button == "restore":
            self.dismiss(Restore(invariant=choice.name, reason=reason))
            return
        raw = self.query_one("#iterations", Input).value.strip()
        iterations = None
        if raw:
            try:
                iterations = int(raw)
            except ValueError:
                iterations = 0
            if iterations < 1:
                self.fail(f"N must be a whole number of at least 1 (or blank), got {raw!r}; nothing was sent")
                return
        self.dismiss(Relax(invariant=choice.name, reason=reason, iterations=iterations))
