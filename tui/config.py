"""User settings: ``config.toml`` in the config directory.

The config directory is ``$LOOPTERM_CONFIG_DIR`` if set, else
``$XDG_CONFIG_HOME/loopterm``, else ``~/.config/loopterm``. It holds
``config.toml`` (these settings) and ``themes/`` (user theme files, see
``loopterm.themes``).

``config.toml`` may hold a ``[keymap]`` table that rebinds keys, as Posting does:
binding id = key(s), comma-separated (or a list)::

    theme = "loopterm-dark"

    [keymap]
    branch = "B"
    step = "ctrl+n,n"

This module only checks its shape (``keymap_entries``); which ids and keys exist is
checked against the live bindings by ``loopterm.tui.keys``.

Reading never fails: a missing file gives the defaults, and a corrupt one gives
the defaults plus a one-line warning and is left untouched. Saving over a corrupt
file first keeps a copy of it as ``config.toml.bak``. Nothing here imports
Textual, so the CLI can read settings cheaply.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from typing import Any

import tomli_w  # the writer tomllib lacks; small and well kept
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loopterm.core.settings import env_name, settings
from loopterm.core.text import one_line

__all__ = [
    "CONFIG_DIR_ENV",
    "CONFIG_FILE_NAME",
    "LooptermSettings",
    "config_dir",
    "config_file",
    "keymap_entries",
    "load_settings",
    "remember_theme",
    "save_settings",
]

CONFIG_DIR_ENV = env_name("config_dir")  # for messages; the value is read by settings()
CONFIG_FILE_NAME = "config.toml"
_HEADER = "# loopterm settings. Written by loopterm; comments here are not kept.\n"


class LooptermSettings(BaseModel):
    """Everything loopterm remembers between sessions.

    Unknown keys are kept (and written back), so a config written by a newer
    loopterm survives a round trip through an older one.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    theme: str = Field(default="loopterm-dark", min_length=1, max_length=128)
    # binding id -> key(s); each entry is checked on its own (keymap_entries), so one bad entry never
    # discards the rest of the settings.
    keymap: dict[str, Any] = Field(default_factory=dict)


_KEYMAP_HINT = 'a key such as "B", or keys such as "ctrl+n,n"'


def keymap_entries(settings: LooptermSettings) -> tuple[dict[str, str], list[str]]:
    """The ``[keymap]`` entries as ``{binding id: "key,key"}``, and one warning line per unusable entry.

    A value is a string of comma-separated keys or a list of keys; anything else is
    skipped with a warning naming its binding id.
    """
    entries: dict[str, str] = {}
    warnings: list[str] = []
    for binding_id, value in settings.keymap.items():
        if isinstance(value, str):
            keys = [key.strip() for key in value.split(",")]
        elif isinstance(value, list) and all(isinstance(key, str) for key in value):
            keys = [key.strip() for key in value]
        else:
            warnings.append(one_line(f"keymap: {binding_id} = {value!r} ignored: expected {_KEYMAP_HINT}"))
            continue
        if not keys or any(not key for key in keys):
            warnings.append(one_line(f"keymap: {binding_id} = {value!r} ignored: an empty key; expected {_KEYMAP_HINT}"))
            continue
        entries[binding_id] = ",".join(keys)
    return entries, warnings


def config_dir() -> Path:
    """Where loopterm keeps config.toml and themes/ (not created here)."""
    explicit = settings().config_dir
    if explicit is not None:
        return explicit.expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "loopterm"
    return Path.home() / ".config" / "loopterm"


def config_file(directory: Path | str | None = None) -> Path:
    return (Path(directory) if directory is not None else config_dir()) / CONFIG_FILE_NAME


def _read(path: Path) -> LooptermSettings | None:
    """The settings in ``path``; None if it does not exist; ValueError (one line) if corrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    try:
        return LooptermSettings.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        where = ".".join(str(part) for part in problems[0]["loc"])
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{where}: {problems[0]['msg']}{more}") from None


def load_settings(directory: Path | str | None = None, *, warnings: list[str] | None = None) -> LooptermSettings:
    """The saved settings; the defaults if there are none or the file is corrupt.

    Never raises. A corrupt file is left untouched and one line saying so is
    appended to ``warnings`` (when given), for the caller to show.
    """
    path = config_file(directory)
    try:
        settings = _read(path)
    except ValueError as exc:
        if warnings is not None:
            warnings.append(one_line(f"ignored {path}: {exc}; using default settings"))
        return LooptermSettings()
    return settings or LooptermSettings()


def _backup_path(path: Path) -> Path:
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{n}")
        n += 1
    return candidate


def save_settings(settings: LooptermSettings, directory: Path | str | None = None) -> list[str]:
    """Write ``settings`` to config.toml (atomically); returns notes, never raises OSError.

    If the file there is corrupt, it is first copied to ``config.toml.bak``
    (``.bak.1``, ... if that exists) and the note says so.
    """
    path = config_file(directory)
    notes: list[str] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _read(path)
        except ValueError as exc:
            backup = _backup_path(path)
            shutil.copy2(path, backup)
            notes.append(one_line(f"{path} was unreadable ({exc}); kept a copy at {backup}"))
        data = settings.model_dump(mode="python", exclude_none=True)
        if not data.get("keymap"):
            data.pop("keymap", None)  # no empty [keymap] table in a file a person reads
        text = _HEADER + tomli_w.dumps(data)
        fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".toml.tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        notes.append(one_line(f"could not save settings to {path}: {detail}"))
    return notes


def remember_theme(name: str, directory: Path | str | None = None) -> list[str]:
    """Save ``name`` as the theme to start with next time; returns notes (see save_settings).

    Does nothing if it already is the effective theme, so re-applying the saved
    theme at startup never rewrites (or backs up) the file.
    """
    settings = load_settings(directory)
    if settings.theme == name:
        return []
    try:
        settings.theme = name
    except ValidationError as exc:
        return [one_line(f"theme name not saved: {exc.errors(include_url=False)[0]['msg']}")]
    return save_settings(settings, directory)
