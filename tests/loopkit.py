"""Helpers for building small scripted loops in tests."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any, TypeVar

from loopterm.core import CommandGate, Loop, LoopState, ToolContext, tool
from loopterm.core.engine import Engine
from loopterm.core.runlog import EventRecord, to_stored
from loopterm.store import Store

PRICE = {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}


def decision(tool_name: str | None = "write", *, subgoal: str = "make progress", confidence: float = 0.6,
             done: bool = False, **args: Any) -> dict[str, Any]:
    action = {"tool": tool_name, "args": args} if tool_name else None
    return {"action": action, "subgoal": subgoal, "confidence": confidence, "reasoning": "because", "done": done}


def write_script(path: Path, turns: list[Any], after_end: str = "error") -> Path:
    path.write_text(json.dumps({"price": PRICE, "turns": turns, "after_end": after_end}))
    return path


@tool(side_effects=True, idempotent=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write text to flag.txt in the workspace."""
    (ctx.workspace / "flag.txt").write_text(text)
    return f"wrote {len(text)} characters"


# Passes when the workspace's flag.txt says "ok".
FLAG_GATE = CommandGate(
    name="flag",
    argv=["{python}", "-c", "import sys; t=open('flag.txt').read(); print('flag is', t, file=sys.stderr); sys.exit(0 if t == 'ok' else 1)"],
)


def make_loop(tmp_path: Path, turns: list[Any], *, name: str = "t", after_end: str = "error", **kwargs: Any) -> Loop:
    script = write_script(tmp_path / f"{name}-script.json", turns, after_end)
    fields: dict[str, Any] = {"tools": [write], "gates": [FLAG_GATE], "max_iterations": 6, "state": LoopState}
    fields.update(kwargs)
    return Loop(name=name, goal="make flag.txt say ok", script=script, **fields)


# Where make_engine opens its Store: a SQLite file under the test's tmp_path, unless a test module runs on
# both backends (the `engine_store` fixture in conftest.py points it at the test's PostgreSQL database).
store_location: Any = None


def make_engine(tmp_path: Path, loop: Loop, **kwargs: Any) -> tuple[Engine, Store]:
    from loopterm.core.model import check_model

    check_model(loop.model, loop.script)
    store = Store.open(store_location or tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref=f"test:{loop.name}", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           **kwargs)
    return engine, store


E = TypeVar("E")


def kinds(records: Iterable[EventRecord]) -> list[str]:
    """The stored kinds of a run's events, in order (what `loopterm show --json` prints)."""
    return [to_stored(r.event)[0] for r in records]


def of(records: Iterable[EventRecord], event_type: type[E]) -> list[E]:
    """The events of one type, in order."""
    return [r.event for r in records if isinstance(r.event, event_type)]  # type: ignore[misc]


def at(records: Iterable[EventRecord], event_type: type[E]) -> list[tuple[int | None, E]]:
    """The events of one type with the iteration each was recorded at, in order."""
    return [(r.iteration, r.event) for r in records if isinstance(r.event, event_type)]  # type: ignore[misc]


def escalation_id(store: Any, run_id: str) -> int:
    """The event id of the escalation the run waits on (what `Resume`/`Stop(escalation=...)` answer)."""
    from loopterm.core.fold import fold

    pending = fold(store.events(run_id)).escalation
    assert pending is not None, f"run {run_id} has no pending escalation"
    return pending.event_id
