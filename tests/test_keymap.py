"""Keys a person can change (config.toml's [keymap]), keys shown as people write them, the theme list's order."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.binding import Binding
from textual.command import CommandPalette

from loopterm.tui.app import LooptermApp
from loopterm.tui.config import LooptermSettings, keymap_entries, load_settings
from loopterm.tui.keys import binding_ids, check_keymap, is_valid_key, key_display
from loopterm.tui.screens.help import HelpScreen

LOOPTERM_THEMES = ["loopterm-dark", "loopterm-light", "loopterm-high-contrast", "loopterm-colorblind"]


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "config").mkdir()
    return tmp_path / "config"


def write_config(cfg: Path, text: str) -> None:
    (cfg / "config.toml").write_text(text, encoding="utf-8")


def app_for(tmp_path: Path) -> LooptermApp:
    return LooptermApp(tmp_path / "db" / "loopterm.db", theme="loopterm-dark", frozen=True)


async def until(pilot: Any, condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


# ---------------------------------------------------------------------- config parsing


def test_keymap_table_is_read_from_config_toml(cfg: Path) -> None:
    write_config(cfg, 'theme = "loopterm-light"\n\n[keymap]\nbranch = "B"\nstep = "ctrl+n, n"\nsearch = ["/", "f"]\n')
    warnings: list[str] = []
    settings = load_settings(warnings=warnings)
    entries, problems = keymap_entries(settings)
    assert warnings == [] and problems == [] and settings.theme == "loopterm-light"
    assert entries == {"branch": "B", "step": "ctrl+n,n", "search": "/,f"}


def test_a_bad_keymap_value_is_one_warning_naming_its_id_and_the_rest_is_kept(cfg: Path) -> None:
    write_config(cfg, 'theme = "loopterm-light"\n\n[keymap]\nbranch = 3\nstep = ""\npause = "p"\n')
    warnings: list[str] = []
    settings = load_settings(warnings=warnings)
    entries, problems = keymap_entries(settings)
    assert warnings == [] and settings.theme == "loopterm-light"
    assert entries == {"pause": "p"}
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert "branch" in problems[0] and "step" in problems[1]


def test_an_empty_keymap_is_not_written_back(cfg: Path) -> None:
    from loopterm.tui.config import save_settings

    assert save_settings(LooptermSettings(theme="loopterm-light")) == []
    assert "keymap" not in (cfg / "config.toml").read_text()
    write_config(cfg, '[keymap]\nbranch = "B"\n')
    settings = load_settings()
    settings.theme = "loopterm-colorblind"
    assert save_settings(settings) == []
    assert load_settings().keymap == {"branch": "B"}


def test_keys_are_checked_against_what_textual_can_bind() -> None:
    for good in ["B", "?", "/", "ctrl+n", "f5", "question_mark", "slash", "space", "ctrl+shift+a", "escape", "+"]:
        assert is_valid_key(good), good
    for bad in ["", "ctrl+", "nn", "hyperx+a", "ctrl+nosuchkey", " "]:
        assert not is_valid_key(bad), bad


def test_unknown_ids_bad_keys_and_stolen_keys_warn() -> None:
    usable, warnings = check_keymap({"nosuch": "z", "branch": "ctrl+", "step": "ctrl+n,n", "pause": "b"})
    assert usable == {"step": "ctrl+n,n", "pause": "b"}
    assert any("nosuch" in w and "unknown" in w for w in warnings)
    assert any(w.startswith("keymap: branch") and "'ctrl+'" in w for w in warnings)
    assert any("pause" in w and "branch" in w and "takes b" in w for w in warnings)  # b no longer branches
    assert all("\n" not in w for w in warnings)


def test_every_supervision_binding_has_an_id_listed_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    ids = binding_ids()
    for binding_id in ["pause", "step", "edit_state", "relax", "branch", "approve", "deny", "inbox", "search",
                       "resume", "stop", "help", "quit", "dialog.submit", "escalation.resume"]:
        assert binding_id in ids, binding_id
    for binding_id in ids:
        assert f"`{binding_id}`" in readme, f"binding id {binding_id} is not in the README's keymap list"


def test_keys_are_shown_as_people_write_them() -> None:
    assert key_display("question_mark") == "?"
    assert key_display("slash") == "/"
    assert key_display("space") == "space"
    assert key_display("ctrl+s") == "ctrl+s"
    assert key_display("escape,question_mark,q") == "esc, ?, q"
    assert key_display("enter") == "enter"


# ---------------------------------------------------------------------- the app


async def test_a_remapped_key_acts_and_the_old_key_no_longer_does(cfg: Path, tmp_path: Path) -> None:
    write_config(cfg, '[keymap]\nhelp = "h"\n')
    app = app_for(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: app._screen_ready, "the main screen")
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, HelpScreen), "the old key still opens help"
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help opened by the remapped key")
        table = app.screen.table()
        keys = [str(cell) for cell in table.columns[0]._cells]
        actions = [str(cell) for cell in table.columns[1]._cells]
        assert keys[actions.index("Help")] == "h"
        assert keys[actions.index("Search")] == "/"  # not "slash"
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")
        footer_keys = {binding.description: app.get_key_display(binding)
                       for _key, (_node, binding, _enabled, _tip) in app.screen.active_bindings.items()}
        assert footer_keys["Help"] == "h"
        commands = {c.title: c.help for c in app.get_system_commands(app.screen)}
        assert commands["Help"].endswith("(key: h)")
        assert commands["Search"].endswith("(key: /)")
        assert commands["Pause/resume"].endswith("(key: space)")


async def test_bad_keymap_entries_warn_once_each_and_the_app_still_starts(cfg: Path, tmp_path: Path) -> None:
    write_config(cfg, '[keymap]\nnosuch = "z"\nbranch = "ctrl+"\nstep = "m"\n')
    app = app_for(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: app._screen_ready, "the main screen")
        notes = [n.message for n in app._notifications]
        keymap_notes = [n for n in notes if n.startswith("keymap:")]
        assert len(keymap_notes) == 2, notes
        assert any("nosuch" in n for n in keymap_notes) and any("branch" in n for n in keymap_notes)
        commands = {c.title: c.help for c in app.get_system_commands(app.screen)}
        assert commands["Step"].endswith("(key: m)")
        assert commands["Branch"].endswith("(key: b)")  # the bad entry left the default alone


async def test_the_theme_list_puts_loopterms_themes_first(cfg: Path, tmp_path: Path) -> None:
    from loopterm.themes.picker import LooptermThemeProvider, ordered_themes

    app = app_for(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: app._screen_ready, "the main screen")
        names = [name for name, _help in ordered_themes(app)]
        assert names[:4] == LOOPTERM_THEMES
        assert "textual-dark" in names[4:] and len(names) > 10
        theme_command = next(c for c in app.get_system_commands(app.screen) if c.title == "Theme")
        theme_command.callback()
        await until(pilot, lambda: isinstance(app.screen, CommandPalette) and app.screen._providers, "the theme palette")
        palette = app.screen
        await pilot.pause(0.3)
        assert [type(p) for p in palette._providers] == [LooptermThemeProvider]
        provider = palette._providers[0]
        shown = [hit.text or str(hit.display) async for hit in provider.discover()]
        assert shown[:4] == LOOPTERM_THEMES
        await pilot.press(*"colorblind", "enter")
        await until(pilot, lambda: app.theme == "loopterm-colorblind", "the picked theme applied")


def test_a_binding_without_a_keymap_entry_keeps_its_key() -> None:
    from loopterm.tui.keys import effective_keys

    binding = Binding("question_mark", "app.help", "Help", id="help")
    assert effective_keys(binding, {}) == "question_mark"
    assert effective_keys(binding, {"help": "h"}) == "h"
    assert effective_keys(Binding("x", "noop"), {"help": "h"}) == "x"
