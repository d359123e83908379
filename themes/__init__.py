"""loopterm's themes: built-in palettes, user theme files, and status glyphs.

    from loopterm.themes import register_all, apply_theme, persist_theme_choice, status_text

Importing this package imports Textual; ``loopterm.tui.config`` does not.
"""

from loopterm.themes.palettes import BUILTIN_THEME_DATA, DEFAULT_THEME, DIM_FACTOR
from loopterm.themes.status import (
    STATUS_ALIASES,
    STATUS_GLYPHS,
    UNKNOWN_STATUS,
    normalize_status,
    status_glyph,
    status_label,
    status_style,
    status_text,
    theme_color,
    theme_colors,
)
from loopterm.themes.user import (
    BUILTIN_THEMES,
    READABLE_DIM,
    ThemeSpec,
    apply_theme,
    load_themes,
    persist_theme_choice,
    register_all,
    theme_from_data,
)

__all__ = [
    "BUILTIN_THEMES",
    "BUILTIN_THEME_DATA",
    "DEFAULT_THEME",
    "DIM_FACTOR",
    "READABLE_DIM",
    "STATUS_ALIASES",
    "STATUS_GLYPHS",
    "UNKNOWN_STATUS",
    "ThemeSpec",
    "apply_theme",
    "load_themes",
    "normalize_status",
    "persist_theme_choice",
    "register_all",
    "status_glyph",
    "status_label",
    "status_style",
    "status_text",
    "theme_color",
    "theme_colors",
    "theme_from_data",
]
