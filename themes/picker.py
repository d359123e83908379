"""The command palette's Theme list: loopterm's themes first, then the user's, then Textual's.

Textual's own ``ThemeProvider`` lists every registered theme by name, which puts
loopterm's four among some twenty of Textual's. Textual's themes stay available
(a person may prefer one), after ours and marked as not contrast-checked:
``tests/test_contrast.py`` holds loopterm's themes, not Textual's, to WCAG contrast.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from textual.app import App
from textual.command import CommandPalette, DiscoveryHit, Hit, Hits
from textual.theme import BUILTIN_THEMES as TEXTUAL_THEMES
from textual.theme import ThemeProvider

from loopterm.themes.palettes import BUILTIN_THEME_DATA

__all__ = ["LooptermThemeProvider", "ordered_themes", "show_theme_picker"]

BUILTIN_HELP = "loopterm theme (contrast-checked)"
USER_HELP = "your theme file"
TEXTUAL_HELP = "Textual theme (contrast not checked by loopterm)"


def ordered_themes(app: App[Any]) -> list[tuple[str, str]]:
    """(theme name, what it is) in palette order: loopterm's built-ins, the user's themes, Textual's."""
    names = list(app.available_themes)
    ours = [name for name in BUILTIN_THEME_DATA if name in names]
    textual = sorted(name for name in names if name in TEXTUAL_THEMES and name not in ours)
    users = sorted(name for name in names if name not in ours and name not in textual)
    return ([(name, BUILTIN_HELP) for name in ours] + [(name, USER_HELP) for name in users]
            + [(name, TEXTUAL_HELP) for name in textual])


class LooptermThemeProvider(ThemeProvider):
    """Textual's theme provider, in loopterm's order, each theme saying what it is."""

    def _ordered(self) -> list[tuple[str, str, Callable[[], None]]]:
        def set_app_theme(name: str) -> None:
            self.app.theme = name

        return [(name, help, partial(set_app_theme, name)) for name, help in ordered_themes(self.app)]

    @property
    def commands(self) -> list[tuple[str, Callable[[], None]]]:
        return [(name, callback) for name, _help, callback in self._ordered()]

    async def discover(self) -> Hits:
        for name, help, callback in self._ordered():
            yield DiscoveryHit(name, callback, help=help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help, callback in self._ordered():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help)


def show_theme_picker(app: App[Any]) -> None:
    """Open the command palette on the theme list (what the palette's Theme command does)."""
    app.push_screen(CommandPalette(providers=[LooptermThemeProvider], placeholder="Search for themes…"))
