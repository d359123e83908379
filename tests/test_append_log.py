"""AppendLog: versions never change, appends share storage, pydantic and the store see a plain list."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from loopterm.core import AppendLog, LoopState
from tests.loopkit import decision, make_engine, make_loop


class Notes(LoopState):
    seen: AppendLog[str] = AppendLog()


def test_versions_are_immutable_and_share_storage_only_forward() -> None:
    a = AppendLog(["x"])
    b = a.appended("y")
    c = a.appended("z")  # from an older version: a copy, b is untouched
    assert (list(a), list(b), list(c)) == (["x"], ["x", "y"], ["x", "z"])
    assert b.extends(a) and not c.extends(b) and not b.extends(c) and not a.extends(b)
    assert (b[-1], b[0:1], b[5:], len(b)) == ("y", ["x"], [], 2)
    assert b == ["x", "y"] and b == AppendLog(["x", "y"]) and b != c


def test_pydantic_validates_and_dumps_it_as_a_list() -> None:
    state = Notes(seen=["p", "q"])
    assert isinstance(state.seen, AppendLog) and list(state.seen) == ["p", "q"]
    assert state.model_dump(mode="json")["seen"] == ["p", "q"]
    assert Notes.model_validate_json(state.model_dump_json()).seen == ["p", "q"]
    assert Notes.model_json_schema()["properties"]["seen"]["type"] == "array"


async def test_the_engine_stores_appends_as_appends_and_everything_else_exactly(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.store import states

    monkeypatch.setattr(states, "KEYFRAME_AFTER", 1e9)  # a small state keyframes often: keep iteration 5 a delta
    def observe(state: LoopState, decision: object, record: object, gates: list) -> LoopState:
        assert isinstance(state, Notes)
        n = state.iteration
        seen = AppendLog(["rewritten"]) if n == 3 else state.seen.appended(f"note {n}")
        return state.model_copy(update={"seen": seen})

    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(5)]
    loop = make_loop(tmp_path, turns, state=Notes, observe=observe, max_iterations=5, stall_window=None)
    engine, store = make_engine(tmp_path, loop)
    run = await engine.run()
    assert run.iterations == 5
    got = [store.state_at(run.id, n)["seen"] for n in range(1, 6)]
    assert got == [["note 1"], ["note 1", "note 2"], ["rewritten"], ["rewritten", "note 4"], ["rewritten", "note 4", "note 5"]]
    conn = sqlite3.connect(store.path)
    try:
        body = conn.execute("SELECT body FROM states WHERE run_id = ? AND n = 5", [run.id]).fetchone()[0]
    finally:
        conn.close()
    from loopterm.store.delta import decode_delta

    assert ["a", ["seen"], ["note 5"]] in decode_delta(body)
