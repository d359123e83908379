"""The codefix example's parts, checked for real: the scripted story, the gates, the tools, the invariants."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.decision import parse_decision
from loopterm.core.gates import GateResult
from loopterm.core.invariants import Invariant
from loopterm.core.state import ToolRecord, WorkingMemory
from loopterm.core.tools import ToolContext
from loopterm.examples.codefix.loop import CodefixState, loop
from loopterm.examples.codefix.tools import confine, read_file, write_file


def script() -> dict[str, Any]:
    assert loop.script is not None
    return json.loads(loop.script.read_text(encoding="utf-8"))


def final_step(turn: Any) -> Any:
    """A turn is a step or a list of steps (retries, repairs); the last one is what the loop acts on."""
    return turn[-1] if isinstance(turn, list) else turn


def decision_of(turn: Any) -> dict[str, Any]:
    content = final_step(turn)["content"]
    return content if isinstance(content, dict) else json.loads(content)


def scripted_solution(n: int) -> str:
    """The solution.py content written in iteration n (1-based)."""
    action = decision_of(script()["turns"][n - 1])["action"]
    assert action["tool"] == "write_file" and action["args"]["path"] == "solution.py"
    return action["args"]["content"]


def workspace(tmp_path: Path) -> Path:
    """A fresh workspace seeded the way the engine seeds one: the contents of loop.workspace_files."""
    assert loop.workspace_files is not None
    ws = tmp_path / "ws"
    shutil.copytree(loop.workspace_files, ws)
    return ws


def run_gates(ws: Path) -> list[GateResult]:
    """Run the gates in order, stopping at the first failure as the engine does."""
    results: list[GateResult] = []
    for gate in loop.gates:
        result = asyncio.run(gate.run(ws))
        results.append(result)
        if not result.passed:
            break
    return results


def ctx(ws: Path) -> ToolContext:
    return ToolContext(run_id="r1", iteration=1, workspace=ws)


# --- definition and script -------------------------------------------------------------------


def test_loop_definition() -> None:
    assert loop.name == "codefix" and loop.model == "scripted/codefix"
    assert loop.state is CodefixState
    assert [g.name for g in loop.gates] == ["compile", "tests"]
    assert {t.name for t in loop.tools} == {"write_file", "read_file"}
    assert loop.max_iterations == 8 and loop.budget.usd == 0.05 and loop.budget.tokens == 60_000
    assert {i.name for i in loop.invariants} >= {"solution_only", "bounded_context"}
    assert loop.workspace_files is not None
    assert sorted(p.name for p in loop.workspace_files.glob("*.py")) == ["conftest.py", "test_solution.py"]


def test_script_shape_and_every_decision_parses() -> None:
    data = script()
    assert data["after_end"] == "error" and set(data["price"]) == {"input_cost_per_token", "output_cost_per_token"}
    assert len(data["turns"]) >= 3
    tool_names = {t.name for t in loop.tools}
    for turn in data["turns"]:
        step = final_step(turn)
        assert 0 < step.get("delay", 0) <= 1
        decision = parse_decision(json.dumps(decision_of(turn)), tool_names)
        assert decision.reasoning and decision.subgoal
    first_three = [decision_of(t) for t in data["turns"][:3]]
    assert [d["confidence"] for d in first_three] == sorted(d["confidence"] for d in first_three)
    assert "compile" in first_three[1]["reasoning"] and "test_accents_are_folded_to_ascii" in first_three[2]["reasoning"]


# --- the scripted story against the real gates -----------------------------------------------


def test_iteration_1_fails_to_compile(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    (ws / "solution.py").write_text(scripted_solution(1))
    results = run_gates(ws)
    assert [(r.name, r.passed) for r in results] == [("compile", False)]
    assert "SyntaxError" in results[0].feedback() and "was never closed" in results[0].feedback()


def test_iteration_2_compiles_but_fails_exactly_the_accent_test(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    (ws / "solution.py").write_text(scripted_solution(2))
    results = run_gates(ws)
    assert [(r.name, r.passed) for r in results] == [("compile", True), ("tests", False)]
    feedback = results[1].feedback()
    assert "1 failed, 5 passed" in feedback
    assert "FAILED test_solution.py::test_accents_are_folded_to_ascii" in feedback
    assert "cr-me-br-l-e-la-carte" in feedback


def test_iteration_3_passes_both_gates_and_converges(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    (ws / "solution.py").write_text(scripted_solution(3))
    results = run_gates(ws)
    assert [(r.name, r.passed) for r in results] == [("compile", True), ("tests", True)]
    assert "6 passed" in results[1].stdout
    assert loop.is_converged(loop.new_state(), results)
    assert not (ws / ".pytest_cache").exists()


def test_tests_gate_ignores_config_of_an_enclosing_project(tmp_path: Path) -> None:
    """A workspace under a project whose pytest config would break the run still passes."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "--no-such-option"\n')
    (project / "conftest.py").write_text("raise RuntimeError('the project conftest must not load')\n")
    ws = project / "ws"
    shutil.copytree(loop.workspace_files, ws)  # type: ignore[arg-type]
    (ws / "solution.py").write_text(scripted_solution(3))
    results = run_gates(ws)
    assert [r.passed for r in results] == [True, True], results[-1].feedback()


# --- tools -----------------------------------------------------------------------------------


def test_write_and_read_inside_the_workspace(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    out = write_file.fn(ctx(ws), path="solution.py", content="x = 1\n")
    assert "wrote 6 bytes" in out and (ws / "solution.py").read_text() == "x = 1\n"
    assert write_file.fn(ctx(ws), path="pkg/sub/mod.py", content="") and (ws / "pkg/sub/mod.py").is_file()
    assert read_file.fn(ctx(ws), path="./solution.py") == "x = 1\n"
    assert write_file.side_effects and write_file.idempotent and not read_file.side_effects


@pytest.mark.parametrize(
    "bad",
    ["/etc/passwd", "../outside.py", "sub/../../outside.py", "..", "", "   ", ".", "C:\\x.py", "\\abs.py"],
)
def test_write_file_refuses_paths_that_escape(tmp_path: Path, bad: str) -> None:
    ws = workspace(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError):
        write_file.fn(ctx(ws), path=bad, content="pwned")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_symlinks_out_of_the_workspace_are_refused(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (ws / "link_dir").symlink_to(outside, target_is_directory=True)
    (ws / "link_file").symlink_to(outside / "secret.txt")
    for path in ("link_dir/new.py", "link_file"):
        with pytest.raises(ValueError, match="outside the workspace"):
            write_file.fn(ctx(ws), path=path, content="pwned")
    with pytest.raises(ValueError, match="outside the workspace"):
        read_file.fn(ctx(ws), path="link_file")
    assert (outside / "secret.txt").read_text() == "secret" and not (outside / "new.py").exists()


def test_read_file_refuses_escapes_and_reports_missing(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    with pytest.raises(ValueError):
        read_file.fn(ctx(ws), path="../../etc/passwd")
    with pytest.raises(FileNotFoundError, match="no file 'missing.py'"):
        read_file.fn(ctx(ws), path="missing.py")
    assert "def test_" in read_file.fn(ctx(ws), path="test_solution.py")


def test_confine_accepts_nested_relative_paths(tmp_path: Path) -> None:
    assert confine(tmp_path, "a/b.py") == (tmp_path / "a" / "b.py").resolve()


def test_tool_arguments_are_validated_for_the_model() -> None:
    with pytest.raises(ValueError, match="content"):
        write_file.validate_args({"path": "solution.py"})
    with pytest.raises(ValueError):
        write_file.validate_args({"path": "solution.py", "content": "x", "mode": "a"})


# --- invariants ------------------------------------------------------------------------------


def invariant(name: str) -> Invariant:
    return next(i for i in loop.invariants if i.name == name)


def writes(*paths: str, ok: bool = True) -> list[ToolRecord]:
    return [ToolRecord(iteration=n, tool="write_file", args={"path": p, "content": ""}, ok=ok) for n, p in enumerate(paths, 1)]


def test_solution_only_holds_for_solution_writes_and_reads() -> None:
    state = CodefixState(tool_results=writes("solution.py", "./solution.py"))
    state.tool_results.append(ToolRecord(iteration=3, tool="read_file", args={"path": "test_solution.py"}))
    assert invariant("solution_only").holds(state)
    assert invariant("solution_only").remediation.value == "escalate"


@pytest.mark.parametrize("path", ["test_solution.py", "conftest.py", "../solution.py", "other.py"])
def test_solution_only_violated_by_any_other_write_even_refused(path: str) -> None:
    state = CodefixState(tool_results=writes("solution.py") + writes(path, ok=False))
    assert not invariant("solution_only").holds(state)


def test_solution_only_respects_a_person_widening_allowed_files() -> None:
    state = CodefixState(tool_results=writes("solution.py", "helpers.py"))
    assert not invariant("solution_only").holds(state)
    state.allowed_files = ["solution.py", "helpers.py"]
    assert invariant("solution_only").holds(state)


def test_bounded_context_prunes_when_memory_grows() -> None:
    check = invariant("bounded_context")
    assert check.remediation.value == "prune_context"
    assert check.holds(CodefixState(memory=WorkingMemory(facts=["f"] * 20, token_count=4_000)))
    assert not check.holds(CodefixState(memory=WorkingMemory(facts=["f"] * 21)))
    assert not check.holds(CodefixState(memory=WorkingMemory(token_count=5_001)))
    assert check.holds(CodefixState(memory=WorkingMemory(facts=["f"] * 21), max_facts=30))


def test_tools_keep_working_wants_a_new_strategy_after_two_failures() -> None:
    check = invariant("tools_keep_working")
    assert check.remediation.value == "change_strategy"
    assert check.holds(CodefixState())
    assert check.holds(CodefixState(tool_results=writes("solution.py", ok=False)))
    assert check.holds(CodefixState(tool_results=writes("a.py", ok=False) + writes("solution.py")))
    assert not check.holds(CodefixState(tool_results=writes("a.py", "b.py", ok=False)))


def test_scripted_story_keeps_every_invariant() -> None:
    """Replaying the first three scripted writes never trips an invariant: the story converges cleanly."""
    state = loop.new_state()
    assert isinstance(state, CodefixState) and state.task == loop.goal
    for n in (1, 2, 3):
        action = decision_of(script()["turns"][n - 1])["action"]
        state.tool_results.append(ToolRecord(iteration=n, tool=action["tool"], args=action["args"]))
        assert all(i.holds(state) for i in loop.invariants), n


def test_state_round_trips_through_json() -> None:
    state = CodefixState(tool_results=writes("solution.py"), allowed_files=["solution.py", "x.py"])
    assert CodefixState.from_json(state.to_json()) == state
