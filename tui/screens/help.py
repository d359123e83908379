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


def key_label(key: str) -> str:
    names = {"space": "space", "question_mark": "?", "slash": "/", "escape": "esc"}
    return ", ".join(names.get(k.strip(), k.strip()) for k in key.split(","))


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
        for title, bindings in self.sections:
            table.add_row(Text(title, style="bold underline"), "", "")
            for binding in bindings:
                table.add_row(Text(key_label(binding.key)), Text(binding.description), Text(binding.tooltip or ""))
            table.add_row("", "", "")
        return table

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static("loopterm keys (escape or ? closes; ctrl+p: every action in the command palette)", id="help-title",
                         markup=False)
            with VerticalScroll():
                yield Static(self.table(), id="help-table")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
