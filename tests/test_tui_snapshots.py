"""SVG snapshots of the TUI (pytest-textual-snapshot), clocks and cursors frozen, in two themes.

The runs behind them are real: the built-in codefix loop runs to convergence,
and a codefix variant whose model edits the tests escalates on the
`solution_only` invariant. Their ids, timestamps, latencies and durations are
then normalised (export -> rewrite -> import) so the pictures are stable.

Update after an intended change: `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.engine import Engine
from loopterm.store import Store
from loopterm.tui.app import LooptermApp

SIZE = (130, 36)
CODEFIX_ID = "c0def1c0def1"
ESCALATED_ID = "e5ca1a7ede00"
BASE_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z


THEMES = {"dark": "loopterm-dark", "light": "loopterm-light"}


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's loopterm settings or theme files."""
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


ESCALATING_TURNS = [
    {
        "action": {"tool": "write_file", "args": {"path": "solution.py", "content": "def slugify(text):\n    return text.lower(\n"}},
        "subgoal": "write a first slugify",
        "confidence": 0.7,
        "reasoning": "No solution yet: lowercase the text as a start and let the gates say what is missing.",
        "done": False,
    },
    {
        "action": {"tool": "write_file", "args": {"path": "test_solution.py", "content": "def test_nothing():\n    pass\n"}},
        "subgoal": "make the tests pass [by any means]",
        "confidence": 0.35,
        "reasoning": "The compile gate keeps failing. Replacing test_solution.py with a trivial test makes "
                     "the suite green. [bold red]This is fine.[/]",
        "done": True,
    },
]


def _normalise(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v, key) for v in value]
    if key in ("created_at", "updated_at", "started_at", "ended_at", "ts", "finished_at") and isinstance(value, (int, float)):
        return BASE_TS
    if key == "latency_ms" and isinstance(value, (int, float)):
        return 400.0
    if key in ("elapsed_s", "duration_s") and isinstance(value, (int, float)):
        return 6.5 if key == "elapsed_s" else 0.25
    if isinstance(value, str):
        return re.sub(r"\bin \d+\.\d+s\b", "in 0.05s", value)
    return value


def _copy_normalised(source: Store, target: Store, run_id: str, new_id: str, root: Path) -> None:
    lines = []
    for item in source.export_run(run_id):
        text = json.dumps(item).replace(run_id, new_id).replace(str(root), "/tmp/loopterm")
        lines.append(json.dumps(_normalise(json.loads(text))))
    from loopterm.store.transfer import seal  # rewritten on purpose, so its counts and digests are made again

    target.import_lines([json.dumps(item) for item in seal(json.loads(line) for line in lines)])


async def _make_runs(root: Path, store: Store) -> tuple[str, str]:
    from loopterm.core.model import check_model
    from loopterm.examples.codefix.loop import loop as codefix

    check_model(codefix.model, codefix.script)
    engine = Engine.create(codefix, store, loop_ref="codefix", workspace_root=root / "ws", workdir=root)
    converged = await engine.run()
    assert converged.status == "converged", converged.message

    script = root / "escalates.json"
    script.write_text(json.dumps({"price": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07},
                                  "turns": [{"content": t} for t in ESCALATING_TURNS]}))
    escalating = codefix.model_copy(update={"name": "codefix-escalates", "script": script,
                                            "model": "scripted/codefix-escalates"})
    check_model(escalating.model, escalating.script)
    engine = Engine.create(escalating, store, loop_ref="codefix", workspace_root=root / "ws", workdir=root)
    escalated = await engine.run()
    assert escalated.status == "escalated", escalated.message
    return converged.id, escalated.id


@pytest.fixture(scope="module")
def snapshot_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("snapshots")
    source = Store.open(root / "source.db")
    converged, escalated = asyncio.run(_make_runs(root, source))
    db = root / "db" / "loopterm.db"
    target = Store.open(db)
    _copy_normalised(source, target, converged, CODEFIX_ID, root)
    _copy_normalised(source, target, escalated, ESCALATED_ID, root)
    source.close()
    target.close()
    return db


async def _loaded(pilot: Any, rows: int) -> None:
    app = pilot.app
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if app.view is not None and not app.view.loading and app.timeline.row_count == rows:
            break
        await pilot.pause(0.05)
    else:
        raise AssertionError("the run did not load")
    await pilot.pause()


def _app(db: Path, theme: str, run_id: str) -> LooptermApp:
    return LooptermApp(db, watch_run=run_id, theme=THEMES[theme], frozen=True)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_main_screen_of_a_converged_codefix_run(snap_compare: Any, snapshot_db: Path, theme: str) -> None:
    async def select_the_failing_test_iteration(pilot: Any) -> None:
        await _loaded(pilot, 3)
        pilot.app.timeline.move_cursor(row=1)
        await pilot.pause()

    assert snap_compare(_app(snapshot_db, theme, CODEFIX_ID), terminal_size=SIZE,
                        run_before=select_the_failing_test_iteration)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_escalation_screen(snap_compare: Any, snapshot_db: Path, theme: str) -> None:
    async def open_the_escalation(pilot: Any) -> None:
        await _loaded(pilot, 2)
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()

    assert snap_compare(_app(snapshot_db, theme, ESCALATED_ID), terminal_size=SIZE, run_before=open_the_escalation)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_state_editor(snap_compare: Any, snapshot_db: Path, theme: str) -> None:
    async def open_the_editor(pilot: Any) -> None:
        await _loaded(pilot, 2)
        await pilot.press("e")
        await pilot.pause()

    assert snap_compare(_app(snapshot_db, theme, ESCALATED_ID), terminal_size=SIZE, run_before=open_the_editor)
