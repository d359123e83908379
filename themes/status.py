"""Semantic status styles: every status is a glyph plus a theme colour.

Colour never carries meaning alone: each run status has its own glyph, so the
screen reads the same in monochrome, in the high-contrast theme and to a reader
who cannot tell the colours apart. The colour is named by a theme variable
(``success``, ``error``, ...) and looked up in the app's current theme, so a
theme switch recolours every status.

    status_text("converged", app)            # Text("✓ converged", style="#3fb950")
    status_text(Status.PAUSED, app)          # enum values work too
    status_text("gate_fail", app, label="")  # glyph only
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TYPE_CHECKING, Any

from rich.style import Style
from rich.text import Text

if TYPE_CHECKING:
    from textual.theme import Theme

__all__ = [
    "STATUS_GLYPHS",
    "STATUS_ALIASES",
    "UNKNOWN_STATUS",
    "normalize_status",
    "status_glyph",
    "status_label",
    "status_style",
    "status_text",
    "theme_color",
    "theme_colors",
]

# status -> (glyph, theme colour variable). Glyphs are one cell wide and none is
# an emoji (no colour-font surprises, no double-width cells in the timeline).
STATUS_GLYPHS: dict[str, tuple[str, str]] = {
    # run / iteration status (loopterm.core.termination.Status)
    "created": ("◦", "foreground"),
    "starting": ("⋯", "primary"),  # the TUI is launching the run
    "running": ("▸", "primary"),
    "stepping": ("⇥", "primary"),
    "paused": ("‖", "accent"),
    "escalated": ("⚑", "warning"),
    "waiting": ("⚑", "warning"),  # waiting on a person (escalated)
    "pending": ("?", "warning"),  # a tool call waiting for approval
    "converged": ("✓", "success"),
    "terminated": ("⊘", "warning"),  # ended without converging: limit, budget, stalled
    "failed": ("✗", "error"),
    "stopped": ("∎", "secondary"),  # stopped by a person
    # gate results
    "gate_pass": ("✓", "success"),
    "gate_fail": ("✗", "error"),
    # invariants
    "invariant_ok": ("✓", "success"),
    "invariant_violated": ("✗", "error"),
    "invariant_relaxed": ("◌", "secondary"),
}

# Other spellings the rest of the code base uses for the same thing.
STATUS_ALIASES: dict[str, str] = {
    "waiting_on_person": "waiting",
    "approval": "pending",
    "approval_needed": "pending",
    "pass": "gate_pass",
    "passed": "gate_pass",
    "fail": "gate_fail",
    "gate_failed": "gate_fail",
    "gate_passed": "gate_pass",
    "ok": "invariant_ok",
    "violated": "invariant_violated",
    "relaxed": "invariant_relaxed",
}

# Anything not in the table still renders, with a neutral glyph.
UNKNOWN_STATUS: tuple[str, str] = ("·", "foreground")

_LABELS: dict[str, str] = {
    "waiting": "waiting on person",
    "pending": "approval pending",
    "gate_pass": "pass",
    "gate_fail": "fail",
    "invariant_ok": "ok",
    "invariant_violated": "violated",
    "invariant_relaxed": "relaxed",
}

_SEPARATORS = re.compile(r"[\s\-]+")


def normalize_status(status: str | Enum) -> str:
    """The table key for ``status`` ("Gate-Pass", Status.PAUSED and "passed" all work)."""
    raw = status.value if isinstance(status, Enum) else status
    key = _SEPARATORS.sub("_", str(raw).strip().lower())
    return STATUS_ALIASES.get(key, key)


def _entry(status: str | Enum) -> tuple[str, str]:
    return STATUS_GLYPHS.get(normalize_status(status), UNKNOWN_STATUS)


def status_glyph(status: str | Enum) -> str:
    """The one-cell glyph for ``status``."""
    return _entry(status)[0]


def status_label(status: str | Enum) -> str:
    """A short human label ("waiting on person", "pass", "violated", ...)."""
    key = normalize_status(status)
    return _LABELS.get(key, key.replace("_", " "))


def _theme_of(source: Any) -> Theme | None:
    """A Theme from an App (its current theme), a Theme, or None."""
    if source is None:
        return None
    current = getattr(source, "current_theme", None)  # a textual App
    if current is not None:
        return current  # type: ignore[no-any-return]
    return source  # type: ignore[no-any-return]


def _theme_key(theme: Theme) -> tuple[Any, ...]:
    return (
        theme.name, theme.primary, theme.secondary, theme.warning, theme.error,
        theme.success, theme.accent, theme.foreground, theme.background,
        theme.surface, theme.panel, theme.boost, theme.dark,
        theme.luminosity_spread, theme.text_alpha, theme.ansi,
        tuple(sorted(theme.variables.items())),
    )


_BASE_COLORS = (
    "primary", "secondary", "accent", "foreground", "background",
    "surface", "panel", "success", "warning", "error",
)
_COLOR_CACHE: dict[tuple[Any, ...], dict[str, str]] = {}
_COLOR_CACHE_SIZE = 32


def theme_colors(theme: Theme) -> dict[str, str]:
    """Every CSS variable ``theme`` defines ($primary, $success-darken-1, ...), cached.

    Keyed on the theme's contents, so an edited or re-registered theme is recomputed.
    """
    key = _theme_key(theme)
    colors = _COLOR_CACHE.get(key)
    if colors is None:
        if len(_COLOR_CACHE) >= _COLOR_CACHE_SIZE:
            _COLOR_CACHE.clear()
        colors = theme.to_color_system().generate()
        if not theme.ansi:
            # The theme's own base colours, exactly (generate() round-trips them through HSL).
            for name in _BASE_COLORS:
                value = getattr(theme, name)
                if value is not None:
                    colors[name] = value
        colors = {**colors, **theme.variables}
        _COLOR_CACHE[key] = colors
    return colors


_ALPHA = re.compile(r"(?P<color>.+?)\s+(?P<pct>\d+(?:\.\d+)?)%")


def theme_color(source: Any, variable: str) -> str | None:
    """The colour ``variable`` has in a theme (or an App's current theme), for rich.

    An opaque lower-case ``#rrggbb``: translucent values ("#58A6FF 35%", "#rrggbbaa") are
    blended over the theme's background and ``auto`` picks the readable contrast
    colour. ANSI themes give ``color(N)``. None when the variable is missing or is
    not a colour (e.g. "ansi_default": the terminal's default foreground).
    """
    from textual.color import Color, ColorParseError

    theme = _theme_of(source)
    if theme is None:
        return None
    colors = theme_colors(theme)
    value = colors.get(variable.lstrip("$"))
    if value is None:
        return None
    try:
        background = Color.parse(colors.get("background", "#000000")).with_alpha(1.0)
    except ColorParseError:
        background = Color.parse("#000000" if theme.dark else "#FFFFFF")
    value = value.strip()
    alpha = 1.0
    if match := _ALPHA.fullmatch(value):
        value, alpha = match["color"], float(match["pct"]) / 100
    try:
        color = background.get_contrast_text() if value == "auto" else Color.parse(value)
    except ColorParseError:
        return None
    if color.ansi is not None:  # an ANSI theme: keep the terminal's own palette
        return f"color({color.ansi})" if color.ansi >= 0 else None
    color = color.multiply_alpha(alpha)
    if color.a < 1.0:
        color = background.blend(color.with_alpha(1.0), color.a)
    return color.hex6.lower()


def status_style(status: str | Enum, source: Any = None) -> Style:
    """The rich Style (colour) for ``status`` in a theme or an App's current theme."""
    color = theme_color(source, _entry(status)[1])
    return Style(color=color) if color else Style()


def status_text(
    status: str | Enum,
    source: Any = None,
    *,
    label: str | None = None,
) -> Text:
    """``glyph label`` as a rich Text coloured from ``source``'s theme.

    ``source`` is a textual App (its current theme is used), a Theme, or None
    (no colour; the glyph still carries the meaning). ``label`` defaults to
    ``status_label(status)``; pass ``""`` for the glyph alone. The label is
    never parsed as markup.
    """
    glyph, _variable = _entry(status)
    style = status_style(status, source)
    text = Text(glyph, style=style + Style(bold=True))
    label = status_label(status) if label is None else label
    if label:
        text.append(" ")
        text.append(label, style=style)
    return text
