"""`?`: every key binding, with what it does."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from loopterm.tui.keys import current_keymap, effective_keys, key_display


def key_label(key: str) -> str:
    """Keys as people write them ("?", "/", "space", "ctrl+s")."""
    return key_display(key)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss_help", "Close help", id="help.close", tooltip="Back to the run"),
    ]

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > #help { width: 90%; max-width: 110; height: 90%; border: thick $accent; background: $surface; }
    HelpScreen #help-title { text-style: bold; padding: 0 1; }
    """

    def __init__(self, sections: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.sections = sections

    def table(self) -> Table:
        table = Table(box=None, expand=True, show_header=False, padding=(0, 2))
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("action", no_wrap=True)
        table.add_column("what it does", ratio=1)
        keymap = current_keymap(self.app)  # the user's [keymap]: the keys shown are the keys that work
        for title, bindings in self.sections:
            table.add_row(Text(title, style="bold underline"), "", "")
            for binding in bindings:
                table.add_row(Text(key_label(effective_keys(binding, keymap))), Text(binding.description),
                              Text(binding.tooltip or ""))
            table.add_row("", "", "")
        return table

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            close = key_label(effective_keys(self.BINDINGS[0], current_keymap(self.app)))  # type: ignore[arg-type]
            yield Static(f"loopterm keys ({close} closes; ctrl+p: every action in the command palette)",
                         id="help-title", markup=False)
            with VerticalScroll():
                yield Static(self.table(), id="help-table")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
