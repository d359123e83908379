"""The core never imports the UI, and the CLI starts without loading litellm."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_and_store_load_no_textual_and_no_litellm() -> None:
    mods = _modules_after("import loopterm.core, loopterm.core.engine, loopterm.core.model, loopterm.store")
    assert not {m for m in mods if m == "textual" or m.startswith("textual.")}
    assert not {m for m in mods if m == "litellm" or m.startswith("litellm.")}
    assert not {m for m in mods if m.startswith("loopterm.tui")}


def test_help_does_not_import_litellm_and_is_fast() -> None:
    mods = _modules_after("from loopterm.tui.cli import build_parser; build_parser().format_help()")
    assert "litellm" not in mods and "textual" not in mods
    done = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "loopterm" in done.stdout  # bench/startup.py measures how fast
