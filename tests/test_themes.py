"""Themes: built-in palettes, accessibility properties, status glyphs, user theme files."""

from __future__ import annotations

import json
import math
import tomllib
from itertools import combinations
from pathlib import Path

import pytest
from rich.cells import cell_len
from textual.app import App, ComposeResult
from textual.color import Color
from textual.theme import Theme
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Markdown, TabbedContent, TabPane

from loopterm.core.termination import Status
from loopterm.themes import (
    BUILTIN_THEME_DATA,
    BUILTIN_THEMES,
    DEFAULT_THEME,
    STATUS_ALIASES,
    STATUS_GLYPHS,
    apply_theme,
    load_themes,
    persist_theme_choice,
    register_all,
    status_glyph,
    status_style,
    status_text,
    theme_color,
)

NAMES = ["loopterm-dark", "loopterm-light", "loopterm-high-contrast", "loopterm-colorblind"]


# --- colour science, written out here so the tests do not trust the code under test ---

def _rgb(hex_color: str) -> tuple[float, float, float]:
    h = hex_color.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return tuple(int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def _linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def luminance(hex_color: str) -> float:
    """WCAG 2.x relative luminance."""
    r, g, b = (_linear(c) for c in _rgb(hex_color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG 2.x contrast ratio, 1..21."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# Machado, Oliveira & Fernandes (2009), severity 1.0, applied to linear RGB.
PROTANOPIA = ((0.152286, 1.052583, -0.204868), (0.114503, 0.786281, 0.099216), (-0.003882, -0.048116, 1.051998))
DEUTERANOPIA = ((0.367322, 0.860646, -0.227968), (0.280085, 0.672501, 0.047413), (-0.011820, 0.042940, 0.968881))


def _lab(linear_rgb: tuple[float, ...]) -> tuple[float, float, float]:
    r, g, b = (min(1.0, max(0.0, c)) for c in linear_rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883
    f = lambda t: t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116  # noqa: E731
    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def seen_as(hex_color: str, matrix: tuple[tuple[float, ...], ...] | None) -> tuple[float, float, float]:
    rgb = tuple(_linear(c) for c in _rgb(hex_color))
    if matrix is not None:
        rgb = tuple(sum(row[j] * rgb[j] for j in range(3)) for row in matrix)
    return _lab(rgb)


def delta_e(a: str, b: str, matrix: tuple[tuple[float, ...], ...] | None = None) -> float:
    """CIE76 colour difference, optionally as seen with a colour-vision deficiency."""
    return math.dist(seen_as(a, matrix), seen_as(b, matrix))


# --- a real app to register the themes on -------------------------------------------

class ThemedApp(App[None]):
    def __init__(self, config_dir: Path) -> None:
        super().__init__()
        self.config_dir = config_dir
        self.theme_warnings = register_all(self, config_dir)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(status_text("running"))
        yield Input(value="hello")
        yield Button("Go", variant="primary")
        yield Button("Stop", variant="error")
        table: DataTable[str] = DataTable()
        table.add_columns("n", "status")
        table.add_row("1", "ok")
        yield table
        with TabbedContent():
            with TabPane("reasoning"):
                yield Markdown("# heading\n\n[a link](https://example.com)")
        yield Footer()


# --- built-in themes -----------------------------------------------------------------

def test_the_four_builtin_themes_exist_as_textual_themes() -> None:
    assert set(NAMES) <= set(BUILTIN_THEMES)
    assert DEFAULT_THEME in BUILTIN_THEMES
    for name in NAMES:
        theme = BUILTIN_THEMES[name]
        assert isinstance(theme, Theme) and theme.name == name
        for field in ("primary", "secondary", "accent", "foreground", "background",
                      "surface", "panel", "success", "warning", "error"):
            assert getattr(theme, field), (name, field)
    assert BUILTIN_THEMES["loopterm-light"].dark is False
    assert BUILTIN_THEMES["loopterm-dark"].dark is True


async def test_every_builtin_theme_registers_and_switches_on_a_real_app(tmp_path: Path) -> None:
    app = ThemedApp(tmp_path)
    assert app.theme_warnings == []
    async with app.run_test(size=(100, 40)) as pilot:
        for name in NAMES:
            assert name in app.available_themes
            app.theme = name
            await pilot.pause()
            assert app.theme == name
            assert app.current_theme.name == name
            # The stylesheet was rebuilt from this theme's palette.
            expected = Color.parse(BUILTIN_THEMES[name].background)  # type: ignore[arg-type]
            assert app.screen.styles.background.rgb == expected.rgb
            error = Color.parse(app.theme_variables["error"])
            assert error.rgb == pytest.approx(Color.parse(BUILTIN_THEMES[name].error).rgb, abs=2)  # type: ignore[arg-type]
        await pilot.press("tab", "tab")  # focus moves; the themed widgets still render
        await pilot.pause()
    assert app.return_code in (None, 0)


def test_each_palette_has_three_different_outcome_colours() -> None:
    for name in NAMES:
        data = BUILTIN_THEME_DATA[name]
        outcomes = [data["success"].upper(), data["warning"].upper(), data["error"].upper()]
        assert len(set(outcomes)) == 3, name
        for a, b in combinations(outcomes, 2):
            assert delta_e(a, b) > 20, (name, a, b)


def test_colorblind_palette_separates_success_and_error_without_red_green() -> None:
    cb = BUILTIN_THEME_DATA["loopterm-colorblind"]
    success, warning, error = cb["success"], cb["warning"], cb["error"]
    for deficiency in (PROTANOPIA, DEUTERANOPIA):
        assert delta_e(success, error, deficiency) >= 40
        assert delta_e(success, warning, deficiency) >= 40
        assert delta_e(warning, error, deficiency) >= 20
    # warning and error also differ in lightness, which every reader sees.
    assert contrast(warning, error) >= 2.0
    # success is blue, not green: more blue than green in it.
    r, g, b = _rgb(success)
    assert b > g > r
    # The same check fails for a classic red/green pair, so it does discriminate.
    assert delta_e("#3FB950", "#F85149", DEUTERANOPIA) < 40


def test_high_contrast_is_black_and_white_at_least_7_to_1() -> None:
    hc = BUILTIN_THEMES["loopterm-high-contrast"]
    assert hc.background.upper() == "#000000" and hc.foreground.upper() == "#FFFFFF"  # type: ignore[union-attr]
    assert contrast(hc.foreground, hc.background) >= 7.0  # type: ignore[arg-type]
    for name in ("surface", "panel"):
        assert contrast(hc.foreground, theme_color(hc, name)) >= 7.0  # type: ignore[arg-type]
    # No grey stands in for meaning: muted text and blurred chrome are full white.
    for variable in ("text", "text-muted", "foreground-muted", "border-blurred", "footer-description-foreground"):
        assert theme_color(hc, variable) == "#ffffff", variable
    # Every colour a status can be drawn in reads at 7:1 on the background.
    for _glyph, variable in STATUS_GLYPHS.values():
        assert contrast(theme_color(hc, variable), "#000000") >= 7.0, variable  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_status_colours_are_readable_text_in_every_theme(name: str) -> None:
    theme = BUILTIN_THEMES[name]
    minimum = 7.0 if name == "loopterm-high-contrast" else 4.5
    for _glyph, variable in set(STATUS_GLYPHS.values()):
        color = theme_color(theme, variable)
        assert color is not None, (name, variable)
        for ground in ("background", "surface", "panel"):
            ratio = contrast(color, theme_color(theme, ground))  # type: ignore[arg-type]
            assert ratio >= minimum, (name, variable, ground, round(ratio, 2))


def test_builtin_theme_data_is_a_valid_user_theme_file(tmp_path: Path) -> None:
    """A user can start from a built-in: the data round-trips through the file loader."""
    (tmp_path / "themes").mkdir()
    for name, data in BUILTIN_THEME_DATA.items():
        copy = {**data, "name": f"my-{name}"}
        (tmp_path / "themes" / f"{name}.json").write_text(json.dumps(copy))
    themes, warnings = load_themes(tmp_path)
    assert warnings == []
    assert sorted(t.name for t in themes) == sorted(f"my-{n}" for n in BUILTIN_THEME_DATA)


# --- status glyphs -------------------------------------------------------------------

def test_every_run_status_has_its_own_one_cell_glyph() -> None:
    run_statuses = [s.value for s in Status] + ["starting"]
    glyphs = {status_glyph(s) for s in run_statuses}
    assert len(glyphs) == len(run_statuses)  # no two run statuses look alike
    for key, (glyph, variable) in STATUS_GLYPHS.items():
        assert glyph.strip() and cell_len(glyph) == 1, key
        assert variable in BUILTIN_THEMES[DEFAULT_THEME].to_color_system().generate(), key
    for s in Status:
        assert s.value in STATUS_GLYPHS  # the table covers the engine's statuses
    assert set(STATUS_ALIASES.values()) <= set(STATUS_GLYPHS)


@pytest.mark.parametrize("name", [*NAMES, "textual-dark", "ansi-dark", None])
def test_status_text_always_includes_the_glyph(name: str | None) -> None:
    from textual.theme import BUILTIN_THEMES as TEXTUAL_THEMES

    theme = None if name is None else (BUILTIN_THEMES.get(name) or TEXTUAL_THEMES[name])
    keys = [*STATUS_GLYPHS, *STATUS_ALIASES, "never-heard-of-it", "Gate-Pass", " PAUSED "]
    for key in keys:
        text = status_text(key, theme)
        assert text.plain.startswith(status_glyph(key)), key
        assert len(status_glyph(key)) == 1
        assert status_text(key, theme, label="").plain == status_glyph(key)
    for s in Status:
        assert status_text(s, theme).plain == f"{STATUS_GLYPHS[s.value][0]} {s.value}"
    assert status_text("waiting_on_person", theme).plain == "⚑ waiting on person"
    assert status_text("gate_fail", theme).plain == "✗ fail"
    assert status_text("relaxed", theme).plain == "◌ relaxed"


def test_status_colour_comes_from_the_theme_and_labels_are_literal() -> None:
    dark, light = BUILTIN_THEMES["loopterm-dark"], BUILTIN_THEMES["loopterm-light"]
    assert str(status_style("converged", dark).color.name) == dark.success.lower()  # type: ignore[union-attr]
    assert str(status_style("failed", light).color.name) == light.error.lower()  # type: ignore[union-attr]
    assert status_style("failed", dark) != status_style("failed", light)
    assert status_style("failed", None).color is None  # no theme: glyph only, no colour
    hostile = status_text("failed", dark, label="[bold red]x[/] \x1b[31m")
    assert hostile.plain == "✗ [bold red]x[/] \x1b[31m"


async def test_status_text_follows_the_apps_current_theme(tmp_path: Path) -> None:
    app = ThemedApp(tmp_path)
    async with app.run_test() as pilot:
        seen = {}
        for name in NAMES:
            app.theme = name
            await pilot.pause()
            text = status_text("failed", app)
            assert text.plain == "✗ failed"
            seen[name] = text.spans[0].style.color.name  # type: ignore[union-attr]
            assert seen[name] == BUILTIN_THEMES[name].error.lower()  # type: ignore[union-attr]
        assert len(set(seen.values())) == len(NAMES)


# --- user themes ---------------------------------------------------------------------

OCEAN = """\
name = "ocean"
dark = true
primary = "#88C0D0"
secondary = "#81A1C1"
accent = "#B48EAD"
foreground = "#D8DEE9"
background = "#2E3440"
success = "#A3BE8C"
warning = "#EBCB8B"
error = "#BF616A"

[variables]
"footer-key-foreground" = "#88C0D0"
"input-selection-background" = "#81a1c1 35%"
"block-cursor-text-style" = "b reverse"
"""


def _write(config: Path, name: str, content: str | bytes) -> Path:
    folder = config / "themes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


async def test_a_user_theme_file_loads_registers_and_applies(tmp_path: Path) -> None:
    _write(tmp_path, "ocean.toml", OCEAN)
    _write(tmp_path, "paper.json", json.dumps({"name": "paper", "dark": False, "primary": "#333",
                                               "background": "#FFFFF0", "error": "#B00020"}))
    themes, warnings = load_themes(tmp_path)
    assert warnings == []
    assert [t.name for t in themes] == ["ocean", "paper"]
    assert themes[0].variables["input-selection-background"] == "#81a1c1 35%"
    assert themes[1].dark is False

    app = ThemedApp(tmp_path)
    assert app.theme_warnings == []
    async with app.run_test() as pilot:
        for name in ("ocean", "paper"):
            app.theme = name
            await pilot.pause()
            assert app.current_theme.name == name
        assert status_text("failed", app).spans[0].style.color.name == "#b00020"  # type: ignore[union-attr]


def test_user_themes_come_from_loopterm_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path))
    _write(tmp_path, "ocean.toml", OCEAN)
    themes, warnings = load_themes()
    assert [t.name for t in themes] == ["ocean"] and warnings == []


def test_no_theme_folder_is_fine(tmp_path: Path) -> None:
    assert load_themes(tmp_path) == ([], [])
    assert load_themes(tmp_path / "does-not-exist") == ([], [])


BAD_FILES: dict[str, str | bytes] = {
    "syntax.toml": 'name = "broken\nprimary = ',
    "no-name.toml": 'dark = true\nprimary = "#112233"\n',
    "bad-hex.toml": 'name = "badhex"\ndark = true\nprimary = "blue"\n',
    "short-hex.toml": 'name = "shorthex"\ndark = true\nprimary = "#12345"\n',
    "dark-string.toml": 'name = "darkstr"\ndark = "yes"\nprimary = "#112233"\n',
    "bad-name.toml": 'name = "has spaces"\ndark = true\nprimary = "#112233"\n',
    "typo.toml": 'name = "typo"\ndark = true\nprimary = "#112233"\nbackgrund = "#000000"\n',
    # Textual's stylesheet would crash the app if these reached it:
    "bad-variable.toml": 'name = "badvar"\ndark = true\nprimary = "#112233"\n[variables]\nborder = "notacolor"\n',
    "bad-style.toml": 'name = "badstyle"\ndark = true\nprimary = "#112233"\n[variables]\n"block-cursor-text-style" = "sparkly"\n',
    "css-injection.toml": 'name = "inject"\ndark = true\nprimary = "#112233"\n'
                          '[variables]\nborder = "red; } Screen { background: red"\n',
    "newline-name.toml": 'name = "sne\\naky"\ndark = true\nprimary = "#112233"\n',
    "newline-key.toml": 'name = "nlkey"\ndark = true\nprimary = "#112233"\n[variables]\n"border\\n" = "#ffffff"\n',
    "list.json": '[1, 2, 3]',
    "broken.json": '{"name": "x", ',
    "latin1.toml": b'name = "caf\xe9"\ndark = true\nprimary = "#112233"\n',
    "dupe.toml": OCEAN,  # "dupe.toml" sorts before "ocean.toml": ocean.toml is the duplicate
}


async def test_malformed_theme_files_give_one_line_warnings_and_never_crash(tmp_path: Path) -> None:
    _write(tmp_path, "ocean.toml", OCEAN)
    _write(tmp_path, "good.json", json.dumps({"name": "good", "dark": True, "primary": "#FF8800"}))
    for filename, content in BAD_FILES.items():
        _write(tmp_path, filename, content)
    _write(tmp_path, "notes.txt", "not a theme, ignored")
    (tmp_path / "themes" / "folder.toml").mkdir()

    themes, warnings = load_themes(tmp_path)
    assert sorted(t.name for t in themes) == ["good", "ocean"]
    expected_bad = set(BAD_FILES) - {"dupe.toml"} | {"ocean.toml"}
    assert len(warnings) == len(expected_bad)
    for warning in warnings:
        assert "\n" not in warning and "Traceback" not in warning
        assert len(warning) < 300
    for filename in expected_bad:
        assert sum(filename in w for w in warnings) == 1, filename
    by_file = {f: next(w for w in warnings if f in w) for f in expected_bad}
    assert "primary" in by_file["bad-hex.toml"]
    assert "name" in by_file["no-name.toml"]
    assert "border" in by_file["bad-variable.toml"]
    assert "backgrund" in by_file["typo.toml"]
    assert "TOML" in by_file["syntax.toml"]
    assert "already defined" in by_file["ocean.toml"]

    app = ThemedApp(tmp_path)
    assert sorted(app.theme_warnings) == sorted(warnings)
    async with app.run_test() as pilot:
        for name in app.available_themes:  # every theme that got through is safe to apply
            app.theme = name
            await pilot.pause()
        assert "badvar" not in app.available_themes
    assert app.return_code in (None, 0)


# --- choosing and remembering --------------------------------------------------------

async def test_apply_theme_falls_back_when_the_saved_theme_is_gone(tmp_path: Path) -> None:
    app = ThemedApp(tmp_path)
    assert apply_theme(app, "loopterm-light") == []
    assert app.theme == "loopterm-light"
    warnings = apply_theme(app, "deleted-user-theme")
    assert app.theme == DEFAULT_THEME
    assert len(warnings) == 1 and "deleted-user-theme" in warnings[0]


async def test_a_theme_chosen_while_running_is_remembered(tmp_path: Path) -> None:
    class RememberingApp(ThemedApp):
        def on_mount(self) -> None:
            apply_theme(self, "loopterm-dark")
            persist_theme_choice(self, self.config_dir)

    app = RememberingApp(tmp_path)
    config = tmp_path / "config.toml"
    async with app.run_test() as pilot:
        await pilot.pause()
        assert not config.exists()  # applying the saved/default theme writes nothing
        app.theme = "loopterm-colorblind"  # what the command palette's theme picker does
        await pilot.pause()
        await pilot.pause()
    assert tomllib.loads(config.read_text())["theme"] == "loopterm-colorblind"


async def test_choosing_from_the_command_palette_is_remembered(tmp_path: Path) -> None:
    class RememberingApp(ThemedApp):
        def on_mount(self) -> None:
            persist_theme_choice(self, self.config_dir)

    app = RememberingApp(tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        app.action_change_theme()
        await pilot.pause()
        await pilot.press(*"high-contrast")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.pause()
        assert app.theme == "loopterm-high-contrast"
    assert tomllib.loads((tmp_path / "config.toml").read_text())["theme"] == "loopterm-high-contrast"
