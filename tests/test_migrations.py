"""A run recorded with state v1 is shown and forked after the loop moved to state v2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopterm.tui.cli import main

V1 = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, tool

class NoteState(LoopState):
    note: str = "first"

@tool
def noop() -> str:
    """Nothing."""
    return "ok"

loop = Loop(name="notes", goal="take notes", state=NoteState, tools=[noop],
            script=Path(__file__).parent / "script.json", max_iterations=4,
            converged=lambda s, g: s.iteration >= 2)
'''

V2 = '''
from pathlib import Path
from typing import ClassVar
from loopterm.core import Loop, LoopState, tool

class NoteState(LoopState):
    VERSION: ClassVar[int] = 2
    notes: list[str] = []

def v1_to_v2(data: dict) -> dict:
    data = dict(data)
    data["notes"] = [data.pop("note")]
    return data

@tool
def noop() -> str:
    """Nothing."""
    return "ok"

loop = Loop(name="notes", goal="take notes", state=NoteState, tools=[noop],
            script=Path(__file__).parent / "script.json", max_iterations=4,
            converged=lambda s, g: s.iteration >= 3{migrations})
'''


def test_v1_snapshots_are_migrated_on_show_and_fork(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    turns = [{"content": {"action": {"tool": "noop", "args": {}}, "subgoal": f"step {i}", "confidence": 0.5,
                          "reasoning": "r"}} for i in range(1, 6)]
    (tmp_path / "script.json").write_text(json.dumps({"price": {"input_cost_per_token": 1e-6,
                                                                "output_cost_per_token": 1e-6}, "turns": turns}))
    loop_file = tmp_path / "notes.py"
    loop_file.write_text(V1)
    db = tmp_path / "s.db"
    assert main(["run", str(loop_file), "--headless", "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["runs", "--json", "--db", str(db)]) == 0
    run_id = json.loads(capsys.readouterr().out)[0]["id"]

    loop_file.write_text(V2.format(migrations=""))  # v2 without the migration: a clear refusal
    assert main(["fork", run_id, "--at", "1", "--db", str(db)]) == 2
    assert "no migration from state v1 to v2" in capsys.readouterr().err

    loop_file.write_text(V2.format(migrations=", migrations={1: v1_to_v2}"))
    assert main(["show", run_id, "--iteration", "1", "--json", "--db", str(db)]) == 0
    state = json.loads(capsys.readouterr().out)["state"]
    assert state["notes"] == ["first"] and "note" not in state and state["schema_version"] == 2

    assert main(["fork", run_id, "--at", "2", "--headless", "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["runs", "--json", "--db", str(db)]) == 0
    branch = json.loads(capsys.readouterr().out)[1]
    assert branch["status"] == "converged" and branch["iterations"] == 3
    assert main(["show", branch["id"], "--iteration", "3", "--json", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["notes"] == ["first"]
