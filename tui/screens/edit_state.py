"""Edit the state the next iteration starts from: JSON in an editor, validated before anything is sent."""

from __future__ import annotations

import json
from typing import Any, Callable

from pydantic import ValidationError
from textual.app import ComposeResult
from textual.widgets import Button, Input, Static, TextArea

from loopterm.core.control import EditState
from loopterm.core.decision import unreadable_json
from loopterm.tui.screens.dialog import Dialog, JsonEditor
from loopterm.tui.widgets.render import pretty

# Returns None when the state is valid, else one line per problem.
StateValidator = Callable[[dict[str, Any]], str | None]


class EditStateScreen(Dialog[EditState]):
    """Dismisses with an `EditState` command, or None. Invalid JSON or state: the error, nothing sent.

    The command names the state it edits (`base_iteration`, `base_version`): the engine refuses it, changing
    nothing, when the run has moved on since; the App then opens the editor again with `refused` (why), the
    state the run now starts from, and the person's reason."""

    def __init__(self, run_id: str, state: dict[str, Any], validate: StateValidator | None, note: str = "", *,
                 base_iteration: int, base_version: int = 0, reason: str = "", refused: str = "") -> None:
        super().__init__()
        self.run_id = run_id
        self.initial_state = state
        self.validate = validate
        self.note = note
        self.base_iteration = base_iteration
        self.base_version = base_version
        self.initial_reason = reason
        self.refused = refused
        self.error_text = refused  # shown on the error line once mounted
        after = f"after iteration {base_iteration}" if base_iteration else "before its first iteration"
        self.title_text = f"Edit the state of run {run_id} {after} (used by its next iteration)"

    submit_label = "send the edit"

    def fields(self) -> ComposeResult:
        hint = "Edit the JSON (checked against the loop's state model before it is sent), then say why below."
        if self.note:
            hint += f"\n{self.note}"
        yield Static(hint, classes="hint", markup=False)
        area = JsonEditor(pretty(self.initial_state), id="state-json", show_line_numbers=True)
        yield area
        yield Input(self.initial_reason, placeholder="why (required: recorded with the edit)", id="reason")

    def buttons(self) -> ComposeResult:
        yield Button("Send edit", variant="primary", id="submit")

    def submit(self, button: str) -> None:
        text = self.query_one("#state-json", TextArea).text
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            self.fail(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; nothing was sent")
            return
        except (ValueError, RecursionError) as exc:  # a number of over 4,300 digits; nesting too deep to read
            self.fail(f"not valid JSON: {unreadable_json(exc)}; nothing was sent")
            return
        if not isinstance(data, dict):
            self.fail(f"the state must be a JSON object, not {type(data).__name__}; nothing was sent")
            return
        if self.validate is not None:
            problem = self.validate(data)
            if problem:
                self.fail(f"the state does not fit the loop's state model: {problem}; nothing was sent")
                return
        reason = self.query_one("#reason", Input).value.strip()
        if not reason:
            self.fail("give a reason: every change to a run's state is recorded with why; nothing was sent")
            self.query_one("#reason", Input).focus()
            return
        try:
            command = EditState(state=data, reason=reason, base_iteration=self.base_iteration,
                                base_version=self.base_version)
        except ValidationError as exc:
            self.refuse(exc)
            return
        self.dismiss(command)
