"""User settings in config.toml: defaults, round trip, corrupt files, remembering the theme."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loopterm.tui.config import (
    LooptermSettings,
    config_dir,
    config_file,
    load_settings,
    remember_theme,
    save_settings,
)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "cfg"))
    return tmp_path / "cfg"


def test_config_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "x"))
    assert config_dir() == tmp_path / "x"
    assert config_file() == tmp_path / "x" / "config.toml"
    monkeypatch.delenv("LOOPTERM_CONFIG_DIR")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_dir() == tmp_path / "home" / ".config" / "loopterm"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "loopterm"


def test_missing_file_gives_defaults_without_warnings(cfg: Path) -> None:
    warnings: list[str] = []
    settings = load_settings(warnings=warnings)
    assert settings == LooptermSettings() and settings.theme == "loopterm-dark"
    assert warnings == []
    assert not cfg.exists()  # reading creates nothing


def test_settings_round_trip(cfg: Path) -> None:
    original = LooptermSettings(theme="loopterm-colorblind")
    assert save_settings(original) == []
    warnings: list[str] = []
    loaded = load_settings(warnings=warnings)
    assert warnings == [] and loaded == original
    assert tomllib.loads((cfg / "config.toml").read_text())["theme"] == "loopterm-colorblind"


def test_unknown_keys_survive_a_round_trip(cfg: Path) -> None:
    cfg.mkdir()
    (cfg / "config.toml").write_text(
        'theme = "nord"\nrefresh_ms = 250\nsparkline = true\nratio = 0.5\n'
        'recent = ["a", "b \\"quoted\\""]\n\n[keys]\npause = "space"\n\n[keys.extra]\n"odd key" = "ü ✓"\n'
    )
    warnings: list[str] = []
    settings = load_settings(warnings=warnings)
    assert warnings == [] and settings.theme == "nord"
    before = settings.model_dump()
    assert save_settings(settings) == []
    after = load_settings()
    assert after.model_dump() == before
    assert before["keys"] == {"pause": "space", "extra": {"odd key": "ü ✓"}}


@pytest.mark.parametrize("content", [
    b'theme = "unterminated\n',           # not TOML
    b"theme = 5\n",                        # wrong type
    b'theme = ""\n',                       # empty theme name
    b"\xff\xfe garbage \x00\x01",          # not text at all
])
def test_corrupt_config_gives_defaults_a_warning_and_is_left_untouched(cfg: Path, content: bytes) -> None:
    cfg.mkdir()
    path = cfg / "config.toml"
    path.write_bytes(content)
    mtime = path.stat().st_mtime_ns
    warnings: list[str] = []
    settings = load_settings(warnings=warnings)
    assert settings == LooptermSettings()
    assert load_settings() == LooptermSettings()  # without a list: same defaults, no raise
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(path) in warnings[0]
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cfg.iterdir()) == ["config.toml"]


def test_saving_over_a_corrupt_config_keeps_a_bak(cfg: Path) -> None:
    cfg.mkdir()
    path = cfg / "config.toml"
    path.write_bytes(b"theme = = oops\n")
    notes = save_settings(LooptermSettings(theme="loopterm-light"))
    assert len(notes) == 1 and "config.toml.bak" in notes[0]
    assert (cfg / "config.toml.bak").read_bytes() == b"theme = = oops\n"
    assert load_settings() == LooptermSettings(theme="loopterm-light")
    # Corrupt again: the first backup is not overwritten.
    path.write_bytes(b"second [ mess\n")
    save_settings(LooptermSettings())
    assert (cfg / "config.toml.bak").read_bytes() == b"theme = = oops\n"
    assert (cfg / "config.toml.bak.1").read_bytes() == b"second [ mess\n"
    # A valid file is simply replaced, with no backup.
    save_settings(LooptermSettings(theme="nord"))
    assert sorted(p.name for p in cfg.iterdir()) == ["config.toml", "config.toml.bak", "config.toml.bak.1"]


def test_remember_theme(cfg: Path) -> None:
    assert remember_theme("loopterm-dark") == []  # already the effective theme: nothing written
    assert not (cfg / "config.toml").exists()
    assert remember_theme("loopterm-high-contrast") == []
    assert load_settings().theme == "loopterm-high-contrast"
    path = cfg / "config.toml"
    mtime = path.stat().st_mtime_ns
    assert remember_theme("loopterm-high-contrast") == []
    assert path.stat().st_mtime_ns == mtime  # unchanged choice: no rewrite


def test_remember_theme_over_a_corrupt_config_keeps_the_original(cfg: Path) -> None:
    cfg.mkdir()
    (cfg / "config.toml").write_text("theme = [unclosed\n")
    assert remember_theme("loopterm-dark") == []  # the default: corrupt file left alone
    assert (cfg / "config.toml").read_text() == "theme = [unclosed\n"
    notes = remember_theme("loopterm-light")
    assert len(notes) == 1 and ".bak" in notes[0]
    assert (cfg / "config.toml.bak").read_text() == "theme = [unclosed\n"
    assert load_settings() == LooptermSettings(theme="loopterm-light")


def test_save_failure_is_a_note_not_an_exception(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a directory")
    notes = save_settings(LooptermSettings(), blocker)
    assert len(notes) == 1 and "could not save" in notes[0] and "\n" not in notes[0]
    assert remember_theme("nord", blocker)[0].startswith("could not save")


def test_settings_validate_assignment() -> None:
    settings = LooptermSettings()
    with pytest.raises(ValueError):
        settings.theme = 5  # type: ignore[assignment]


def test_config_module_does_not_import_textual() -> None:
    code = "import loopterm.tui.config, sys; print(any(m.split('.')[0] == 'textual' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
