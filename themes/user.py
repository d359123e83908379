"""Theme files: validation, loading user themes, registering everything on an App.

A user theme is a TOML (or JSON) file in ``<config dir>/themes/``::

    name = "my-theme"          # required; letters, digits, '-' and '_'
    dark = true                # required
    primary = "#88C0D0"        # required; every colour is a hex string
    secondary = "#81A1C1"      # optional: secondary accent foreground background
    background = "#2E3440"     #   surface panel boost success warning error
    success = "#A3BE8C"
    warning = "#EBCB8B"
    error = "#BF616A"

    [variables]                # optional Textual theme variables
    "footer-key-foreground" = "#88C0D0"
    "input-selection-background" = "#81A1C1 35%"
    "block-cursor-text-style" = "bold"

A file that does not parse or validate is skipped with a one-line warning; it
never raises and never reaches Textual, whose stylesheet would otherwise crash
the app when the theme is applied.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, ValidationError, field_validator
from textual.filter import DimFilter, LineFilter
from textual.theme import Theme

from loopterm.themes.palettes import BUILTIN_THEME_DATA, DEFAULT_THEME, DIM_FACTOR

if TYPE_CHECKING:
    from textual.app import App

__all__ = [
    "BUILTIN_THEMES",
    "READABLE_DIM",
    "ThemeSpec",
    "apply_theme",
    "load_themes",
    "persist_theme_choice",
    "register_all",
    "theme_from_data",
]

THEME_SUFFIXES = (".toml", ".json")
MAX_THEME_FILE_BYTES = 256 * 1024

HexColor = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$")]
_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
_VARIABLE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
# Only characters a colour or text-style value can contain: no ';', '{', '}', '$'.
_VARIABLE_VALUE = re.compile(r"^[A-Za-z0-9#_ .,%()-]{1,64}$")


def _css_accepts(prop: str, value: str) -> bool:
    """Whether Textual's CSS parser accepts ``prop: value`` (how the theme variable will be used)."""
    from textual.css.stylesheet import Stylesheet, StylesheetParseError

    sheet = Stylesheet()
    sheet.add_source(f"Screen {{ {prop}: {value}; }}", read_from=("loopterm-theme-check", ""))
    try:
        sheet.parse()
    except StylesheetParseError:
        return False
    return True


class ThemeSpec(BaseModel):
    """One theme as data: the schema of a theme file and of the built-in palettes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(strip_whitespace=True, pattern=_NAME)]
    dark: StrictBool
    primary: HexColor
    secondary: HexColor | None = None
    accent: HexColor | None = None
    foreground: HexColor | None = None
    background: HexColor | None = None
    surface: HexColor | None = None
    panel: HexColor | None = None
    boost: HexColor | None = None
    success: HexColor | None = None
    warning: HexColor | None = None
    error: HexColor | None = None
    luminosity_spread: float = Field(default=0.15, ge=0.0, le=1.0)
    text_alpha: float = Field(default=0.95, ge=0.0, le=1.0)
    variables: dict[str, str] = Field(default_factory=dict)
    description: str | None = None
    author: str | None = None

    @field_validator("variables")
    @classmethod
    def _check_variables(cls, variables: dict[str, str]) -> dict[str, str]:
        for key, value in variables.items():
            if not _VARIABLE_NAME.fullmatch(key):
                raise ValueError(f"bad variable name {key!r} (lower-case letters, digits and '-')")
            value = value.strip()
            # Textual substitutes "$name" into its CSS: "-style" variables go into
            # text-style, everything else is a colour (optionally "COLOR NN%").
            prop = "text-style" if "style" in key.split("-") else "color"
            if not _VARIABLE_VALUE.fullmatch(value) or not _css_accepts(prop, value):
                raise ValueError(f"variable {key!r}: {value!r} is not a valid {prop.replace('-', ' ')}")
        return {key: value.strip() for key, value in variables.items()}

    def to_theme(self) -> Theme:
        return Theme(
            name=self.name,
            primary=self.primary,
            secondary=self.secondary,
            accent=self.accent,
            foreground=self.foreground,
            background=self.background,
            surface=self.surface,
            panel=self.panel,
            boost=self.boost,
            success=self.success,
            warning=self.warning,
            error=self.error,
            dark=self.dark,
            luminosity_spread=self.luminosity_spread,
            text_alpha=self.text_alpha,
            variables=dict(self.variables),
        )


def theme_from_data(data: dict[str, Any]) -> Theme:
    """A Textual Theme from a dict shaped like a theme file (raises pydantic.ValidationError)."""
    return ThemeSpec.model_validate(data).to_theme()


BUILTIN_THEMES: dict[str, Theme] = {name: theme_from_data(data) for name, data in BUILTIN_THEME_DATA.items()}

# One instance, so Textual's per-strip filter cache keeps working (see ``DIM_FACTOR``).
READABLE_DIM: LineFilter = DimFilter(dim_factor=DIM_FACTOR)


def _first_problem(error: ValidationError) -> str:
    problems = error.errors(include_url=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    text = f"{where}: {message}" if where else message
    if len(problems) > 1:
        text += f" (and {len(problems) - 1} more)"
    return text


def _read_theme_file(path: Path) -> Theme:
    """Parse and validate one file; raises ValueError with a one-line reason."""
    try:
        if path.stat().st_size > MAX_THEME_FILE_BYTES:
            raise ValueError(f"larger than {MAX_THEME_FILE_BYTES // 1024} KiB")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid {path.suffix.lower().lstrip('.').upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a table of theme fields at the top level")
    try:
        return theme_from_data(data)
    except ValidationError as exc:
        raise ValueError(_first_problem(exc)) from None


def load_themes(config_dir: Path | str | None = None) -> tuple[list[Theme], list[str]]:
    """User themes from ``<config_dir>/themes/*.toml|*.json``, and one warning per skipped file.

    ``config_dir`` defaults to ``loopterm.tui.config.config_dir()``. A missing
    folder is not an error. Files load in name order; a second file with an
    already-loaded name is skipped. A user theme may reuse a built-in name to
    replace that built-in.
    """
    if config_dir is None:
        from loopterm.tui.config import config_dir as default_config_dir

        config_dir = default_config_dir()
    folder = Path(config_dir) / "themes"
    themes: list[Theme] = []
    warnings: list[str] = []
    try:
        candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in THEME_SUFFIXES)
    except FileNotFoundError:
        return themes, warnings
    except OSError as exc:
        return themes, [f"cannot read theme folder {folder}: {exc.strerror or exc}"]
    seen: dict[str, Path] = {}
    for path in candidates:
        if not path.is_file():
            continue
        try:
            theme = _read_theme_file(path)
        except ValueError as exc:
            reason = " ".join(str(exc).split())  # always one line
            warnings.append(f"skipped theme file {path}: {reason}")
            continue
        if theme.name in seen:
            warnings.append(f"skipped theme file {path}: theme {theme.name!r} is already defined in {seen[theme.name].name}")
            continue
        seen[theme.name] = path
        themes.append(theme)
    return themes, warnings


def register_all(app: App[Any], config_dir: Path | str | None = None) -> list[str]:
    """Register the built-in loopterm themes and the user's themes on ``app``; returns warnings.

    Safe to call in ``App.__init__`` (before the app runs) or in ``on_mount``.
    """
    for theme in BUILTIN_THEMES.values():
        app.register_theme(theme)
    themes, warnings = load_themes(config_dir)
    for theme in themes:
        app.register_theme(theme)
    return warnings


def apply_theme(app: App[Any], name: str | None) -> list[str]:
    """Set ``app.theme`` to ``name``, falling back to the default theme if it is not registered."""
    if name and name in app.available_themes:
        app.theme = name
        return []
    fallback = DEFAULT_THEME if DEFAULT_THEME in app.available_themes else "textual-dark"
    app.theme = fallback
    if not name:
        return []
    return [f"theme {name!r} is not available; using {fallback!r}"]


def persist_theme_choice(app: App[Any], config_dir: Path | str | None = None) -> None:
    """Remember every later theme change (e.g. from the command palette) in config.toml.

    Call from ``on_mount`` (Textual signals need a running node). Problems saving
    are shown with ``app.notify``; they never raise.
    """
    from loopterm.tui.config import remember_theme

    def on_theme_changed(theme: Theme) -> None:
        for note in remember_theme(theme.name, config_dir):
            app.notify(note, title="Settings", severity="warning")

    app.theme_changed_signal.subscribe(app, on_theme_changed)
