"""The tool executor and gates: timeouts, output caps, failures as information, exactly-once calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loopterm.core import CommandGate, ToolContext, tool
from loopterm.core.tools import InterruptedSideEffect, ToolExecutor
from loopterm.store import Store


@pytest.fixture
def executor(tmp_path: Path) -> ToolExecutor:
    from loopterm.core.records import RunRecord

    store = Store.open(tmp_path / "t.db")
    store.create_run(RunRecord(id="r1", loop="l", loop_ref="l", goal="g", spec_hash="h", model="m", status="running",
                               workspace=str(tmp_path), created_at=0, updated_at=0, max_iterations=5))
    return ToolExecutor(store, "r1")


async def test_a_hanging_tool_times_out_as_a_failed_result(executor: ToolExecutor, tmp_path: Path) -> None:
    @tool(timeout=0.1)
    async def hang() -> str:
        """Never returns."""
        await asyncio.sleep(60)
        return "unreachable"

    record, _ = await executor.execute(hang, {}, 1, tmp_path)
    assert not record.ok and record.error == "timed out after 0.1s"


async def test_output_is_capped(executor: ToolExecutor, tmp_path: Path) -> None:
    @tool(output_cap=100)
    def shout() -> str:
        """Too much output."""
        return "x" * 10_000

    record, _ = await executor.execute(shout, {}, 1, tmp_path)
    assert record.ok and record.output.startswith("x" * 100) and "9900 more characters cut" in record.output
    assert len(record.output) < 200


async def test_a_raising_tool_is_an_error_result_not_a_crash(executor: ToolExecutor, tmp_path: Path) -> None:
    @tool
    def broken(path: str) -> str:
        """Fails."""
        raise FileNotFoundError(path)

    record, _ = await executor.execute(broken, {"path": "nope.txt"}, 1, tmp_path)
    assert not record.ok and record.error == "FileNotFoundError: nope.txt"


async def test_a_finished_call_is_answered_from_the_journal(executor: ToolExecutor, tmp_path: Path) -> None:
    runs: list[int] = []

    @tool(side_effects=True)
    def fire(ctx: ToolContext, n: int) -> str:
        """A side effect."""
        runs.append(n)
        return f"fired {n} with key {ctx.idempotency_key}"

    first, key = await executor.execute(fire, {"n": 1}, 3, tmp_path)
    again, key2 = await executor.execute(fire, {"n": 1}, 3, tmp_path)
    assert runs == [1] and key == key2 and again.reused and again.output == first.output
    other, key3 = await executor.execute(fire, {"n": 1}, 4, tmp_path)  # another iteration is another call
    assert runs == [1, 1] and key3 != key and not other.reused


async def test_an_interrupted_side_effect_is_not_repeated(executor: ToolExecutor, tmp_path: Path) -> None:
    @tool(side_effects=True)
    def fire(n: int) -> str:
        """A side effect."""
        return "fired"

    from loopterm.core.records import ToolCallRecord
    from loopterm.core.tools import idempotency_key

    key = idempotency_key("r1", 2, "fire", {"n": 1})
    executor.journal.tool_call_started(ToolCallRecord(key=key, run_id="r1", iteration=2, tool="fire", args={"n": 1},
                                                      status="started", started_at=0))
    with pytest.raises(InterruptedSideEffect, match="interrupted mid-call"):
        await executor.execute(fire, {"n": 1}, 2, tmp_path)


def test_typed_arguments_are_validated() -> None:
    @tool
    def add(a: int, b: int = 2) -> int:
        """Add."""
        return a + b

    assert add.validate_args({"a": "3"}) == {"a": 3, "b": 2}
    with pytest.raises(ValueError, match="invalid arguments for tool 'add': a: "):
        add.validate_args({"a": "three"})
    with pytest.raises(ValueError, match="c: Extra inputs are not permitted"):
        add.validate_args({"a": 1, "c": 3})


async def test_gate_reports_exit_code_and_stderr(tmp_path: Path) -> None:
    gate = CommandGate(name="g", argv=["{python}", "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    result = await gate.run(tmp_path)
    assert (result.passed, result.exit_code, result.stderr) == (False, 3, "boom")
    assert result.feedback() == "gate 'g' failed (exit code 3):\nboom"


async def test_gate_that_cannot_start_or_hangs_fails_cleanly(tmp_path: Path) -> None:
    missing = await CommandGate(name="m", argv=["no-such-command-xyz"]).run(tmp_path)
    assert not missing.passed and "could not start 'no-such-command-xyz'" in (missing.error or "")
    slow = await CommandGate(name="s", argv=["{python}", "-c", "import time; time.sleep(30)"], timeout=0.3).run(tmp_path)
    assert not slow.passed and slow.error == "timed out after 0.3s"


async def test_gates_never_see_provider_keys_and_run_the_same_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-should-not-leak")
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("COLUMNS", "200")
    gate = CommandGate(name="env", argv=["{python}", "-c", "import os; print(sorted(os.environ), os.environ['COLUMNS'])"])
    result = await gate.run(tmp_path)
    assert "OPENAI_API_KEY" not in result.stdout and "PATH" in result.stdout
    assert "'CI'" not in result.stdout and result.stdout.strip().endswith("80")
