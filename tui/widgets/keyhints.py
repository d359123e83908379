"""The footer's key hints, fitted to the terminal's width.

Textual's Footer lays every shown binding out in one row and cuts what does not fit: at 80 columns the main
screen lost half its keys mid-word (the command palette's key, docked right, drew over them), and the escalation
screen lost `r Resume` and `esc Back`. Here the row is chosen to fit: full descriptions when they fit, else short
ones, else without the palette's key, else without the keys that matter least (`?` lists every key, ctrl+p runs
every action). A key is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

# Binding id -> its description when the full ones do not fit.
SHORT: dict[str, str] = {
    "pause": "Pause",
    "edit_state": "Edit",
    "inbox": "Inbox",
    "toggle_tree": "Runs",
    "escalation.add_fact": "Fact",
    "escalation.set_subgoal": "Subgoal",
    "escalation.relax": "Relax",
    "escalation.patch_state": "State",
    "escalation.open_run": "Run",
}

# Binding ids in the order they are kept when even the short row does not fit: ids not listed are the first to
# go, then the last listed. What a person waiting on the screen answers with comes first.
KEPT_FIRST: tuple[str, ...] = (
    "escalation.resume", "escalation.back", "escalation.approve", "escalation.deny", "escalation.add_fact",
    "escalation.relax", "escalation.patch_state", "escalation.set_subgoal", "escalation.abort",
    "escalation.open_run",
    "approve", "deny", "pause", "step", "resume", "help", "toggle_tree", "edit_state", "relax", "branch", "inbox",
    "stop", "search", "quit",
)


@dataclass
class Hint:
    binding: Binding
    enabled: bool
    tooltip: str
    key_display: str
    order: int  # where it stands in the row

    def width(self, short: bool) -> int:
        """Cells it takes in a compact footer: key, space, description, then a margin of one."""
        return cell_len(self.key_display) + 1 + cell_len(self.description(short)) + 1

    def description(self, short: bool) -> str:
        if short and self.binding.id in SHORT:
            return SHORT[self.binding.id]
        return self.binding.description

    @property
    def rank(self) -> int:
        """Lower is kept longer."""
        binding_id = self.binding.id or ""
        return KEPT_FIRST.index(binding_id) if binding_id in KEPT_FIRST else 1000 + self.order


def fit(hints: list[Hint], width: int, palette_width: int) -> tuple[list[Hint], bool, bool]:
    """The hints kept in `width` cells, whether short descriptions are used, whether the palette's key shows."""
    for short in (False, True):
        if sum(h.width(short) for h in hints) - 1 + palette_width <= width:
            return hints, short, palette_width > 0
    kept = sorted(hints, key=lambda h: h.rank)
    while kept and sum(h.width(True) for h in kept) - 1 > width:
        kept.pop()
    return sorted(kept, key=lambda h: h.order), True, False


class KeyHints(Footer):
    """A compact Footer whose row always fits the screen's width (chosen again when the width changes)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(compact=True, **kwargs)  # type: ignore[arg-type]
        self._fitted_width = 0
        self.kept: list[str] = []  # the keys shown, as the footer shows them (for tests and tooltips)

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._fitted_width and self._bindings_ready:
            self.call_after_refresh(self.recompose)

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        active = self.screen.active_bindings
        hints: list[Hint] = []
        actions: set[str] = set()
        for _, binding, enabled, tooltip in active.values():
            if not binding.show or binding.action in actions:
                continue
            in_footer = getattr(self.app, "in_footer", None)
            if in_footer is not None and not in_footer(binding.id):
                continue
            actions.add(binding.action)
            hints.append(Hint(binding, enabled, tooltip, self.app.get_key_display(binding), len(hints)))
        palette = None
        if self.show_command_palette and self.app.ENABLE_COMMAND_PALETTE:
            palette = active.get(self.app.COMMAND_PALETTE_BINDING)
        palette_width = 0
        if palette is not None:  # key, space, description, its left border
            palette_width = cell_len(self.app.get_key_display(palette[1])) + 1 + cell_len(palette[1].description) + 1
        width = self.size.width or self.screen.size.width
        self._fitted_width = width
        kept, short, with_palette = fit(hints, width, palette_width)
        self.kept = [f"{h.key_display} {h.description(short)}" for h in kept]
        for hint in kept:
            binding = hint.binding
            yield FooterKey(binding.key, hint.key_display, hint.description(short), binding.action,
                            disabled=not hint.enabled, tooltip=hint.tooltip).data_bind(compact=Footer.compact)
        if with_palette and palette is not None:
            _, binding, enabled, tooltip = palette
            yield FooterKey(binding.key, self.app.get_key_display(binding), binding.description, binding.action,
                            classes="-command-palette", disabled=not enabled,
                            tooltip=binding.tooltip or binding.description)
