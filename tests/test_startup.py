"""Start-up: the screen's first frame never waits for litellm, and what is slow runs off the App's event loop.

`loopterm` and `loopterm run LOOP` open the screen after checks that take milliseconds; importing litellm
(seconds), checking the model, loading the tokenizer and preparing the workspace run in threads after the
first frame, the header saying what it waits for. Each scenario runs in a fresh interpreter (in this one,
other tests may have imported litellm already), through `commands.run` as the CLI calls it, with the App
headless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.errors import ConfigError

SCENARIO = textwrap.dedent('''
    import json, sys, threading
    from pathlib import Path

    MAIN = threading.main_thread()
    seen = {"imported_on_main": [], "created_on": None, "headers": []}
    WATCHED = ("litellm", "tiktoken", "litellm.litellm_core_utils.default_encoding")


    class Watch:
        """Which thread first imports litellm, tiktoken, and the module that loads the tokenizer's encoding."""

        def find_spec(self, name, path=None, target=None):
            if name in WATCHED and name not in sys.modules and threading.current_thread() is MAIN:
                seen["imported_on_main"].append(name)
            return None


    sys.meta_path.insert(0, Watch())

    from loopterm.core import runs
    from loopterm.tui import commands
    from loopterm.tui.app import LooptermApp

    seen["litellm_after_imports"] = "litellm" in sys.modules
    create = runs.create


    def created(*args, **kwargs):  # records the run and copies the loop's files into its workspace
        seen["created_on"] = "main" if threading.current_thread() is MAIN else "thread"
        return create(*args, **kwargs)


    runs.create = created
    display = LooptermApp._display


    def first_display(self, screen, renderable):
        if renderable is not None:
            seen.setdefault("litellm_at_first_frame", "litellm" in sys.modules)
        return display(self, screen, renderable)


    LooptermApp._display = first_display
    ready = LooptermApp.main_ready


    def main_ready(self):
        seen["litellm_at_main_ready"] = "litellm" in sys.modules
        ready(self)

        def check():
            header = str(self.main.query_one("#run-header").render())
            if not seen["headers"] or seen["headers"][-1] != header:
                seen["headers"].append(header)
            view = self.view
            if getattr(self, "start_error", None) is not None or (
                    view is not None and self.store.get_run(view.run_id).iterations >= 1):
                self.exit()

        self.set_interval(0.02, check)


    LooptermApp.main_ready = main_ready
    run = LooptermApp.run
    LooptermApp.run = lambda self, **kwargs: run(self, headless=True, size=(120, 36))
    commands._has_terminal = lambda: True
    code = commands.run(sys.argv[1], Path(sys.argv[2]), model=sys.argv[3] or None, headless=False)
    seen["code"] = code
    seen["litellm_at_exit"] = "litellm" in sys.modules
    print("RESULT " + json.dumps(seen))
''')


def scenario(tmp_path: Path, loop: str = "codefix", model: str = "") -> tuple[dict[str, Any], str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LOOPTERM_CONFIG_DIR": str(tmp_path / "cfg")}
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    done = subprocess.run([sys.executable, str(script), loop, str(tmp_path / "s.db"), model], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1].removeprefix("RESULT ")), done.stderr


def test_the_first_frame_does_not_wait_for_litellm_and_the_slow_steps_run_in_threads(tmp_path: Path) -> None:
    seen, _ = scenario(tmp_path)
    assert seen["code"] == 0
    assert not seen["litellm_after_imports"], "importing the TUI must not import litellm"
    assert not seen["litellm_at_main_ready"], "litellm was imported before the screen was composed"
    assert not seen["litellm_at_first_frame"], "litellm was imported before the first frame"
    assert seen["litellm_at_exit"]  # the run did start on the scripted model, through litellm
    # litellm, tiktoken and the tokenizer's encoding (~0.3 s) load in a worker thread, never on the event loop
    # (before, the first model call's token count loaded the encoding on it and froze the screen).
    assert seen["imported_on_main"] == []
    assert seen["created_on"] == "thread"  # the run's record and its workspace copy
    headers = "\n".join(seen["headers"])
    assert "loading the model library" in headers and "checking model scripted/codefix" in headers, headers
    assert "preparing the workspace" in headers or "codefix" in seen["headers"][-1], headers


def test_a_model_refused_by_litellm_is_said_in_the_app_and_exits_2(tmp_path: Path) -> None:
    """`loopterm run codefix --model nosuchprovider/x`: litellm knows no such provider, which only litellm can
    say (seconds to import): the screen says it, then the command exits 2 with the same line on stderr."""
    seen, stderr = scenario(tmp_path, model="nosuchprovider/x")
    assert seen["code"] == 2
    assert seen["created_on"] is None  # nothing was created
    assert "could not start codefix" in seen["headers"][-1] and "nosuchprovider" in seen["headers"][-1]
    lines = [line for line in stderr.splitlines() if line.startswith("loopterm:")]
    assert len(lines) == 1 and "unknown model 'nosuchprovider/x'" in lines[0], stderr


@pytest.mark.parametrize("model, why", [("replay/nothing-recorded", "answers only with a recording"),
                                        (" ", "no model given")])
def test_a_bad_model_found_cheaply_is_refused_before_the_screen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                model: str, why: str) -> None:
    from loopterm.tui import commands

    opened: list[Any] = []
    monkeypatch.setattr(commands, "_has_terminal", lambda: True)
    monkeypatch.setattr(commands, "_open_tui", lambda *args, **kwargs: opened.append(kwargs) or 0)
    with pytest.raises(ConfigError, match=why):
        commands.run("codefix", tmp_path / "c.db", model=model, headless=False)
    assert opened == [] and not (tmp_path / "c.db").exists()


def test_a_broken_offline_script_is_refused_before_the_screen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.tui import commands

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "loop.py").write_text(textwrap.dedent('''
        from pathlib import Path
        from loopterm.core import Loop, LoopState

        loop = Loop(name="broken", goal="g", state=LoopState, tools=[], script=Path(__file__).parent / "bad.json")
    '''))
    opened: list[Any] = []
    monkeypatch.setattr(commands, "_has_terminal", lambda: True)
    monkeypatch.setattr(commands, "_open_tui", lambda *args, **kwargs: opened.append(kwargs) or 0)
    with pytest.raises(ConfigError, match="not valid JSON"):
        commands.run(str(tmp_path / "loop.py"), tmp_path / "c.db", headless=False)
    assert opened == []


async def test_the_app_freezes_its_long_lived_heap_and_hands_it_back_when_it_ends(tmp_path: Path) -> None:
    """Full garbage collections skip what the App keeps for its life (tui/heap.py: they fell inside keystrokes);
    when the App ends, the collector has everything again (a process may open many Apps)."""
    import asyncio
    import gc
    import time

    from loopterm.tui.app import LooptermApp

    app = LooptermApp(tmp_path / "h.db", theme="textual-dark", frozen=True)
    async with app.run_test(size=(100, 30)) as pilot:
        deadline = time.monotonic() + 30
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        assert gc.get_freeze_count() > 0, "nothing was frozen after the first frame"
        await asyncio.sleep(0)
    assert gc.get_freeze_count() == 0
