"""A tool call waiting for a person: approve (optionally with edited arguments) or deny, and optionally make
that answer a policy for calls like it (core/approval_policy.py).

The reason comes first: focus starts there, so `a` then ctrl+s (or enter) approves, and `d`, a typed reason,
ctrl+s denies with that reason. Then the arguments (JSON), then "answer calls like this": only this call, the
rest of this run, or every run of this loop, with one glob per argument (prefilled with this call's values,
e.g. `path=src/app.py`, to widen as `path=src/*.py`).

An ACP agent's permission request (the pseudo-tool `acp.permission`, args title, kind, paths, diff) shows
what the agent asks and its diff, +/- coloured; it is approved or denied as asked (loopterm answers the agent
allow once or reject once: there are no arguments to edit), so it has no arguments editor.

In a shadow run (core/shadow.py) the same dialog asks what should happen, and says that nothing will run:
agree (as proposed), edit the arguments (what should have happened instead) or deny (with why). A shadow run
asks about every call, so it offers no policy.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pydantic import ValidationError
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Button, Input, RadioButton, RadioSet, Static, TextArea

from loopterm.core.acp_turn import PERMISSION_TOOL
from loopterm.core.approval_policy import SCOPES, PolicyRule, globs_text, parse_globs, prefill
from loopterm.core.control import Approve, Deny
from loopterm.core.decision import unreadable_json
from loopterm.core.fold import PendingApproval
from loopterm.tui.screens.dialog import Dialog, JsonEditor
from loopterm.tui.widgets.agent_turn import unified_diff_text
from loopterm.tui.widgets.render import Palette, first_line, literal, pretty

# (tool, args) -> None when the arguments fit the tool, else why not.
ArgsValidator = Callable[[str, dict[str, Any]], str | None]
# The choices of "answer calls like this", in order: (scope or None for this call only, label).
REMEMBER: list[tuple[str | None, str]] = [(None, "only this call"), ("run", "rest of this run"), ("loop", SCOPES["loop"])]
DIFF_DIALOG_LINES = 300  # of an agent's diff in the dialog (it scrolls)


def agent_request_text(args: dict[str, Any]) -> Text:
    """What an agent asks permission for: title, kind, paths (all untrusted: literal)."""
    text = Text()
    if args.get("agent"):
        text.append("agent ", style="dim")
        text.append(literal(first_line(args["agent"], 60), "bold"))
        text.append("  ")
    text.append("kind ", style="dim")
    text.append(literal(first_line(args.get("kind", "other"), 30), "bold"))
    text.append("\n")
    text.append(literal(first_line(args.get("title", ""), 300) or "(untitled)", "bold"))
    paths = args.get("paths") or []
    for path in paths if isinstance(paths, list) else [paths]:
        text.append("\n  @ ", style="dim")
        text.append(literal(first_line(path, 300)))
    return text


class ApprovalScreen(Dialog[Approve | Deny]):
    DEFAULT_CSS = """
    ApprovalScreen > #dialog { overflow-y: auto; }
    ApprovalScreen #args { height: 6; }
    ApprovalScreen #globs { height: 4; }
    ApprovalScreen #remember { layout: horizontal; height: auto; width: 1fr; border: none; padding: 0; }
    ApprovalScreen #remember RadioButton { width: auto; margin-right: 1; }
    ApprovalScreen .label { color: $text-muted; padding: 0; }
    ApprovalScreen #agent-diff { height: auto; max-height: 16; border: round $panel; padding: 0 1; }
    ApprovalScreen.-short #agent-diff { max-height: 7; border: none; padding: 0; }
    ApprovalScreen.-short #dialog-title { padding: 0; }
    ApprovalScreen.-short #dialog-buttons { padding-top: 0; }
    ApprovalScreen.-short #dialog-keys { padding: 0; }
    ApprovalScreen.-short #args { height: 4; }
    ApprovalScreen.-short #globs { height: 2; }
    """
    SHORT = 32  # terminal rows under which every field is compact (no borders), so all fit at 80x24

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
        self.agent = self.asked.tool == PERMISSION_TOOL and not self.shadow  # approve or deny only
        self.submit_label = ("deny" if deny else "agree") if self.shadow else ("deny" if deny else "approve")
        if self.shadow:
            self.title_text = (f"◐ shadow: nothing will run · run {run_id} proposes a tool call "
                               f"(iteration {pending.iteration})")
        else:
            verb = "Deny" if deny else "Approve"
            what = "its agent asks permission" if self.agent else "asks to call a tool"
            self.title_text = f"{verb}? Run {run_id} {what} (iteration {pending.iteration})"

    def fields(self) -> ComposeResult:
        head = Text("tool  ", style="bold")
        head.append(literal(self.asked.tool))
        if self.shadow:
            head.append("\nWhat should happen? Agree: as proposed. Edit the arguments (or name another tool), then "
                        "Agree: what should have happened instead. Deny: it should not happen. Either way nothing is "
                        "called; the loop is told your verdict and proposes its next step.", style="italic")
        yield Static(head, id="approval-tool")
        if self.deny_first:
            why = "why you deny it (the model is told; recorded)"
        elif self.shadow:
            why = "why (optional for agree or edit, recorded; a denial says why to the model)"
        elif self.agent:
            why = "why (optional, recorded; told to the agent next turn)"
        else:
            why = "why (optional, recorded; a denial says why to the model)"
        if self.agent:  # what is asked first, then the reason (focus starts there), then the diff (it scrolls)
            yield Static(agent_request_text(self.asked.args), id="agent-request")
            yield Static(Text("an agent's request: approve or deny it as asked (nothing to edit)"), classes="label",
                         id="no-args")
        yield Input(placeholder=why, id="reason")
        if self.shadow:
            yield Input(self.asked.tool, placeholder="the tool that should be called", id="tool")
        if self.agent:
            diff = str(self.asked.args.get("diff") or "")
            yield Static(Text("its diff" if diff.strip() else "no diff given with the request"), classes="label",
                         id="agent-diff-label" if diff.strip() else "no-diff")
            if diff.strip():
                with VerticalScroll(id="agent-diff"):
                    yield Static(unified_diff_text(diff, Palette.from_app(self.app), DIFF_DIALOG_LINES),
                                 id="agent-diff-text")
        else:
            yield Static(Text("arguments (JSON; edit them to approve a changed call)"), classes="label")
            yield JsonEditor(pretty(self.asked.args), id="args", show_line_numbers=False)
        if self.shadow:
            return
        yield Static(Text("answer calls of this tool with arguments like these"), classes="label")
        with RadioSet(id="remember"):
            for i, (_, label) in enumerate(REMEMBER):
                yield RadioButton(label, value=i == 0, id=f"remember-{i}")
        yield Static(Text("globs, one name=glob a line (* matches anything, also /)"), classes="label")
        yield TextArea(globs_text(prefill(self.policy_args())), id="globs", tab_behavior="focus", soft_wrap=False,
                       show_line_numbers=False)

    def on_mount(self) -> None:
        super().on_mount()
        if self.app.size.height < self.SHORT:
            self.add_class("-short")
            for widget in [*self.query(Input), *self.query(TextArea), *self.query(Button)]:
                widget.compact = True
        if self.agent:  # focusing the reason scrolled the request out of sight: what is asked stays on top
            self.call_after_refresh(self.query_one("#dialog").scroll_home, animate=False)

    def buttons(self) -> ComposeResult:
        yield Button("Agree" if self.shadow else "Approve", variant="success", id="approve")
        yield Button("Deny", variant="error", id="deny")

    def policy_args(self) -> dict[str, Any]:
        """The arguments a policy's globs start from (an agent's diff is no thing to match on)."""
        if self.agent:
            return {name: value for name, value in self.asked.args.items() if name != "diff"}
        return self.asked.args

    def remember(self) -> str | None:
        """The scope chosen for a policy; None: answer only this call."""
        if self.shadow:
            return None
        index = self.query_one("#remember", RadioSet).pressed_index
        return REMEMBER[index][0] if 0 <= index < len(REMEMBER) else None

    def policy(self, effect: str, args: dict[str, Any], reason: str) -> PolicyRule | None | str:
        """The policy asked for with this answer, None for none, or why it cannot be made (a string)."""
        scope = self.remember()
        if scope is None:
            return None
        try:
            globs = parse_globs(self.query_one("#globs", TextArea).text, {**self.asked.args, **args})
            return PolicyRule(effect=effect, scope=scope, tool=self.asked.tool, globs=globs, reason=reason)  # type: ignore[arg-type]
        except ValidationError as exc:
            err = exc.errors()[0]
            return f"the policy: {err['msg']}"
        except ValueError as exc:
            return str(exc)

    def submit(self, button: str) -> None:
        reason = self.query_one("#reason", Input).value.strip()
        key = self.asked.key
        if button == "submit":
            button = "deny" if self.deny_first else "approve"
        if button == "deny":
            rule = self.policy("deny", {}, reason)
            if isinstance(rule, str):
                self.fail(f"{rule}; nothing was sent")
                return
            try:
                denial = Deny(key=key, reason=reason or "denied by a person", policy=rule)
            except ValidationError as exc:
                self.refuse(exc)
                return
            self.dismiss(denial)
            return
        if self.agent:  # as asked: the agent is answered allow once
            rule = self.policy("approve", {}, reason)
            if isinstance(rule, str):
                self.fail(f"{rule}; nothing was sent")
                return
            try:
                command = Approve(key=key, args=None, reason=reason, policy=rule)
            except ValidationError as exc:
                self.refuse(exc)
                return
            self.dismiss(command)
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
        rule = self.policy("approve", args, reason)
        if isinstance(rule, str):
            self.fail(f"{rule}; nothing was sent")
            return
        try:
            command = Approve(key=key, args=edited, reason=reason, tool=other if other != proposed else None,
                              policy=rule)
        except ValidationError as exc:
            self.refuse(exc)
            return
        self.dismiss(command)
