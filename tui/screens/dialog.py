"""The base of every modal: a centred box, an error line, escape to cancel, frozen cursors in snapshots."""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

from pydantic import ValidationError
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from loopterm.core.decision import json_path
from loopterm.tui.widgets.render import literal

T = TypeVar("T")


class Dialog(ModalScreen[T], Generic[T]):
    """Subclasses compose their fields inside `self.body()`; `self.fail(msg)` shows why nothing was sent."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="dialog.cancel", tooltip="Close without sending anything"),
        Binding("ctrl+s", "submit", "Send", id="dialog.submit", tooltip="Validate and send"),
    ]

    DEFAULT_CSS = """
    Dialog { align: center middle; }
    Dialog > #dialog {
        width: 90%; max-width: 110; height: auto; max-height: 90%;
        border: thick $accent; background: $surface; padding: 0 1;
    }
    Dialog #dialog-title { text-style: bold; padding: 0 0 1 0; }
    Dialog .hint { color: $text-muted; }
    Dialog #dialog-error { color: $error; display: none; padding: 1 0 0 0; }
    Dialog #dialog-error.shown { display: block; }
    Dialog #dialog-buttons { height: auto; align-horizontal: right; padding-top: 1; }
    Dialog #dialog-buttons Button { margin-left: 2; }
    Dialog TextArea { height: 14; }
    Dialog Input { margin: 0; }
    """

    title_text: str = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text(self.title_text), id="dialog-title")
            yield from self.fields()
            yield Static("", id="dialog-error")
            with Horizontal(id="dialog-buttons"):
                yield from self.buttons()
                yield Button("Cancel", id="cancel")

    def fields(self) -> ComposeResult:  # pragma: no cover - overridden
        yield Label("")

    def buttons(self) -> ComposeResult:
        yield Button("Send", variant="primary", id="submit")

    def on_mount(self) -> None:
        if getattr(self.app, "frozen", False):
            for widget in self.query(Input):
                widget.cursor_blink = False
            for area in self.query(TextArea):
                area.cursor_blink = False
            for button in self.query(Button):
                button.active_effect_duration = 0  # no press animation (it also swallows a second quick press)

    error_text: str = ""  # what the error line says ('' when there is none)

    def fail(self, message: str) -> None:
        self.error_text = message
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

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_submit(self) -> None:
        self.submit("submit")

    def submit(self, button: str) -> None:  # pragma: no cover - overridden
        self.dismiss(None)


class TextPrompt(Dialog[str]):
    """One line of text (a fact, a subgoal), required."""

    def __init__(self, title: str, placeholder: str, *, initial: str = "", button: str = "Send") -> None:
        super().__init__()
        self.title_text = title
        self.placeholder_text = placeholder
        self.initial = initial
        self.button_label = button

    def fields(self) -> ComposeResult:
        yield Input(self.initial, placeholder=self.placeholder_text, id="text")

    def buttons(self) -> ComposeResult:
        yield Button(self.button_label, variant="primary", id="submit")

    def submit(self, button: str) -> None:
        value = self.query_one("#text", Input).value.strip()
        if not value:
            self.fail("type something first: an empty answer is not sent")
            return
        self.dismiss(value)
