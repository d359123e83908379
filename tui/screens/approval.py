"""A tool call waiting for a person: approve (optionally with edited arguments) or deny.

In a shadow run (core/shadow.py) the same dialog asks what should happen, and says that nothing will run:
agree (as proposed), edit the arguments (what should have happened instead) or deny (with why).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pydantic import ValidationError
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Button, Input, Static, TextArea

from loopterm.core.control import Approve, Deny
from loopterm.core.decision import unreadable_json
from loopterm.core.fold import PendingApproval
from loopterm.tui.screens.dialog import Dialog, JsonEditor
from loopterm.tui.widgets.render import literal, pretty

# (tool, args) -> None when the arguments fit the tool, else why not.
ArgsValidator = Callable[[str, dict[str, Any]], str | None]


class ApprovalScreen(Dialog[Approve | Deny]):
    def __init__(self, run_id: str, pending: PendingApproval, *, deny: bool = False,
                 validate: ArgsValidator | None = None, tools: list[str] | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.pending = pending
        self.asked = pending.asked
        self.deny_first = deny
        self.validate = validate
        self.tools = tools  # the loop's tool names (shadow: another tool may be named); None: not known here
        self.shadow = self.asked.shadow
        if self.shadow:
            self.title_text = (f"◐ shadow: nothing will run · run {run_id} proposes a tool call "
                               f"(iteration {pending.iteration})")
        else:
            self.title_text = f"Run {run_id} asks to call a tool (iteration {pending.iteration})"

    def fields(self) -> ComposeResult:
        head = Text("tool  ", style="bold")
        head.append(literal(self.asked.tool))
        if self.shadow:
            head.append("\nWhat should happen? Agree: as proposed. Edit the arguments (or name another tool), then "
                        "Agree: what should have happened instead. Deny: it should not happen. Either way nothing is "
                        "called; the loop is told your verdict and proposes its next step.", style="italic")
        else:
            head.append("\nEdit the arguments to approve a changed call (checked against the tool's arguments).",
                        style="italic")
        yield Static(head, id="approval-tool")
        if self.shadow:
            yield Input(self.asked.tool, placeholder="the tool that should be called", id="tool")
        yield JsonEditor(pretty(self.asked.args), id="args", show_line_numbers=False)
        why = ("why (optional for agree or edit, recorded; a denial says why to the model)" if self.shadow
               else "why (optional for approve, recorded; a denial says why to the model)")
        yield Input(placeholder=why, id="reason")

    def buttons(self) -> ComposeResult:
        yield Button("Agree" if self.shadow else "Approve", variant="success", id="approve")
        yield Button("Deny", variant="error", id="deny")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#args", TextArea).styles.height = 10
        self.query_one("#deny" if self.deny_first else "#approve", Button).focus()

    def submit(self, button: str) -> None:
        reason = self.query_one("#reason", Input).value.strip()
        key = self.asked.key
        if button == "submit":
            button = "deny" if self.deny_first else "approve"
        if button == "deny":
            self.dismiss(Deny(key=key, reason=reason or "denied by a person"))
            return
        text = self.query_one("#args", TextArea).text
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            self.fail(f"the arguments are not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; nothing was sent")
            return
        except (ValueError, RecursionError) as exc:  # a number of over 4,300 digits; nesting too deep to read
            self.fail(f"the arguments are not valid JSON: {unreadable_json(exc)}; nothing was sent")
            return
        if not isinstance(args, dict):
            self.fail("the arguments must be a JSON object; nothing was sent")
            return
        proposed = self.asked.tool
        other = self.query_one("#tool", Input).value.strip() if self.shadow else proposed
        other = other or proposed
        if other != proposed and self.tools is not None and other not in self.tools:
            self.fail(f"no tool {other!r} in this loop (its tools: {', '.join(self.tools)}); nothing was sent")
            return
        edited = args if args != self.asked.args or other != proposed else None
        if edited is not None and self.validate is not None:
            problem = self.validate(other, edited)
            if problem:
                self.fail(f"{problem}; nothing was sent")
                return
        try:
            command = Approve(key=key, args=edited, reason=reason, tool=other if other != proposed else None)
        except ValidationError as exc:
            self.refuse(exc)
            return
        self.dismiss(command)
