"""The base of every modal: a centred box, an error line, the keys it takes, escape to cancel, frozen cursors in
snapshots.

Every dialog behaves the same way, so typing is never lost: focus starts at the first field, Tab walks the fields
top to bottom (a JSON editor indents with ctrl+t, never with Tab), and the line under the fields says which key
sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import ValidationError
from rich.text import Text
from textual.app import ComposeResult
from textual.notifications import SeverityLevel
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Static, TextArea

from loopterm.core.decision import json_path
from loopterm.tui.widgets.render import literal

T = TypeVar("T")


class Dialog(ModalScreen[T], Generic[T]):
    """Subclasses compose their fields inside `self.body()`; `self.fail(msg)` shows why nothing was sent."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="dialog.cancel", tooltip="Close without sending anything"),
        Binding("ctrl+s", "submit", "Send", id="dialog.submit", tooltip="Validate and send"),
        # Priority: the App moves the focus as it reads the key, before it hands the next key of a burst to the
        # focused widget; a bubbling Tab moved it only after the keys typed behind it had gone to the old field.
        Binding("tab", "next_field", "Next field", id="dialog.next_field", show=False, priority=True,
                tooltip="Move to the next field"),
        Binding("shift+tab", "previous_field", "Previous field", id="dialog.previous_field", show=False,
                priority=True, tooltip="Move to the previous field"),
    ]

    # Any terminal size: the box is never taller than the screen; the title stays at its top, the buttons and the
    # keys line at its bottom (the error line just above them), and the fields scroll between; editors shrink.
    # Short screens (`-short`, the App's VERTICAL_BREAKPOINTS) drop the blank rows. Notifications show as one-line
    # strips in the two rows kept free above the box (margin-top), never over a field.
    DEFAULT_CSS = """
    Dialog { align: center middle; }
    Dialog > #dialog {
        width: 90%; max-width: 110; min-width: 40; height: auto; max-height: 90vh; margin-top: 2;
        border: thick $accent; background: $surface; padding: 0 1;
        overflow-y: auto; scrollbar-size-vertical: 1;
    }
    Dialog #dialog-title { text-style: bold; padding: 0 0 1 0; dock: top; }
    Dialog .hint { color: $text-muted; }
    Dialog #dialog-error { color: $error; display: none; padding: 1 0 0 0; dock: bottom; margin-bottom: 6; }
    Dialog #dialog-error.shown { display: block; }
    Dialog #dialog-buttons { height: 4; align-horizontal: right; padding-top: 1; dock: bottom; margin-bottom: 2; }
    Dialog #dialog-buttons Button { margin-left: 2; }
    Dialog #dialog-keys { color: $text-muted; padding: 1 0 0 0; height: 2; dock: bottom; }
    Dialog TextArea { height: 14; max-height: 30vh; min-height: 3; }
    Dialog Input { margin: 0; }
    Dialog.-short #dialog-title { padding: 0; }
    Dialog.-short #dialog-error { padding: 0; margin-bottom: 4; }
    Dialog.-short #dialog-buttons { height: 3; padding-top: 0; margin-bottom: 1; }
    Dialog.-short #dialog-keys { padding: 0; height: 1; }
    Dialog.-short TextArea { max-height: 25vh; }
    Dialog ToastRack { dock: top; align: right top; margin: 0; max-height: 2; }
    Dialog Toast { margin: 0; padding: 0 1; height: 1; width: auto; max-width: 100%; }
    """

    title_text: str = ""
    submit_label: str = "send"  # what ctrl+s does, as the keys line says it

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text(self.title_text), id="dialog-title")
            yield from self.fields()
            yield Static("", id="dialog-error")
            with Horizontal(id="dialog-buttons"):
                yield from self.buttons()
                yield Button("Cancel", id="cancel")
            yield Static(self.keys_text(), id="dialog-keys")

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """A dialog speaks in its error line, never in a toast over its fields."""
        self.fail(f"{title}: {message}" if title else message)

    def keys_text(self) -> Text:
        """The keys this dialog takes, always on screen (a person should never have to guess how to send)."""
        text = Text()
        text.append("ctrl+s", style="bold")
        text.append(f" {self.submit_label}   ")
        text.append("tab", style="bold")
        text.append(" next field   ")
        text.append("esc", style="bold")
        text.append(" cancel")
        if self.query(JsonEditor):  # empty until composed
            text.append("   ")
            text.append("ctrl+t", style="bold")
            text.append(" indent")
        return text

    def refresh_keys(self) -> None:
        """Say the keys again (a dialog whose ctrl+s changes meaning, say relax or restore, calls it)."""
        self.query_one("#dialog-keys", Static).update(self.keys_text())

    def first_field(self) -> Widget | None:
        """Where focus starts: the first focusable field, top to bottom (never a button)."""
        for widget in self.query_one("#dialog").query("*"):
            if widget.focusable and not isinstance(widget, Button):
                return widget
        return None

    def fields(self) -> ComposeResult:  # pragma: no cover - overridden
        yield Label("")

    def buttons(self) -> ComposeResult:
        yield Button("Send", variant="primary", id="submit")

    def on_mount(self) -> None:
        first = self.first_field()
        if first is not None:
            first.focus()
        self.refresh_keys()
        if self.error_text:  # set before it was mounted (say, why the last attempt was refused)
            self.fail(self.error_text)
        if getattr(self.app, "frozen", False):
            for widget in self.query(Input):
                widget.cursor_blink = False
            for area in self.query(TextArea):
                area.cursor_blink = False
            for button in self.query(Button):
                button.active_effect_duration = 0  # no press animation (it also swallows a second quick press)

    error_text: str = ""  # what the error line says ('' when there is none)

    def fail(self, message: str) -> None:
        """Say why nothing was sent. What the person typed stays as it was, and so does the focus."""
        self.error_text = message
        if not self.is_mounted:
            return  # on_mount shows it
        error = self.query_one("#dialog-error", Static)
        error.update(literal(message))
        error.add_class("shown")

    def refuse(self, exc: ValidationError) -> None:
        """A command the store could not keep as written (NaN, a lone surrogate, ...): say where and why."""
        err = exc.errors()[0]
        self.fail(f"{json_path(err['loc'])}: {str(err['msg']).removeprefix('Value error, ')}; nothing was sent")

    def clear_error(self) -> None:
        self.error_text = ""
        error = self.query_one("#dialog-error", Static)
        error.update("")
        error.remove_class("shown")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self.submit(event.button.id or "submit")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit("submit")

    def action_next_field(self) -> None:
        self.focus_next()

    def action_previous_field(self) -> None:
        self.focus_previous()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_submit(self) -> None:
        self.submit("submit")

    def submit(self, button: str) -> None:  # pragma: no cover - overridden
        self.dismiss(None)


class JsonEditor(TextArea):
    """A JSON field in a dialog: Tab leaves it for the next field like everywhere else; ctrl+t indents."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+t", "indent", "Indent", id="json.indent", tooltip="Insert an indentation at the cursor"),
    ]

    def __init__(self, text: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("tab_behavior", "focus")
        kwargs.setdefault("soft_wrap", False)
        super().__init__(text, language=None, **kwargs)

    def action_indent(self) -> None:
        self.insert(" " * self.indent_width)


@dataclass(frozen=True)
class PromptAnswer:
    """What a person typed in a `TextPrompt`, and which way they sent it ("submit": the primary way)."""

    text: str
    button: str = "submit"


class TextPrompt(Dialog[PromptAnswer]):
    """One line of text (a fact, a subgoal), required. Enter or ctrl+s sends it the primary way; `other` is a
    second button (label, id) for the other way (say, add a fact without resuming)."""

    def __init__(self, title: str, placeholder: str, *, initial: str = "", button: str = "Send",
                 submit_label: str = "send", hint: str = "", other: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.placeholder_text = placeholder
        self.initial = initial
        self.button_label = button
        self.submit_label = submit_label
        self.hint = hint
        self.other = other

    def fields(self) -> ComposeResult:
        yield Input(self.initial, placeholder=self.placeholder_text, id="text")
        if self.hint:
            yield Static(self.hint, classes="hint", markup=False)

    def buttons(self) -> ComposeResult:
        yield Button(self.button_label, variant="primary", id="submit")
        if self.other is not None:
            label, button_id = self.other
            yield Button(label, id=button_id)

    def keys_text(self) -> Text:
        text = Text()
        text.append("enter", style="bold")
        text.append(" or ")
        text.append_text(super().keys_text())
        return text

    def submit(self, button: str) -> None:
        value = self.query_one("#text", Input).value.strip()
        if not value:
            self.fail("type something first: an empty answer is not sent")
            self.query_one("#text", Input).focus()
            return
        self.dismiss(PromptAnswer(value, button))
