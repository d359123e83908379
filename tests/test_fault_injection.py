"""Crash safety: what a resume does after the process died at a chosen point (the SIGKILL trials follow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopterm.core.engine import Engine
from loopterm.core.tools import TOOK_EFFECT, idempotency_key
from tests.loopkit import decision, make_engine, make_loop


async def test_an_interrupted_call_a_person_says_took_effect_is_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loopterm resume RUN --side-effects reuse` on a call interrupted after its effect: it goes on without
    running the call again (before, the answer was ignored and the run waited again, so the only way on
    was `reexecute`: the effect a second time)."""
    from loopterm.core import ToolContext, tool

    calls: list[str] = []

    @tool(side_effects=True, idempotent=False)
    def write(ctx: ToolContext, text: str) -> str:
        """Write text to flag.txt (counted)."""
        calls.append(text)
        (ctx.workspace / "flag.txt").write_text(text)
        return "written"

    loop = make_loop(tmp_path, [{"content": decision(text="ok")}], tools=[write])
    engine, store = make_engine(tmp_path, loop)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(store, "tool_call_finished", crash)
    with pytest.raises(RuntimeError):
        await engine.run()
    monkeypatch.undo()
    assert calls == ["ok"]
    waiting = await Engine(loop, store, store.get_run(engine.run_id), workdir=tmp_path).run()
    assert waiting.status == "escalated" and "--side-effects reuse" in (waiting.message or "")

    key = idempotency_key(engine.run_id, 1, "write", {"text": "ok"})
    run = await Engine(loop, store, store.get_run(engine.run_id), workdir=tmp_path,
                       side_effect_answers={key: "reuse"}).run()
    assert (run.status, run.iterations) == ("converged", 1)
    assert calls == ["ok"]  # not run again
    record = store.iterations(run.id)[0]
    assert record.tool_result is not None
    assert (record.tool_result["ok"], record.tool_result["output"], record.tool_result["reused"]) == (True, TOOK_EFFECT, True)
    assert store.tool_call(key).status == "done"  # type: ignore[union-attr]
    assert run.tokens_in == record.tokens_in  # the reply was paid for once


async def test_a_run_killed_after_converging_but_before_its_end_was_recorded_ends_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last iteration converged and was committed; the process died before the run's end was written.
    Resuming records the end: it does not ask the model again or fire the tool for an iteration the run
    never needed (before, it ran one more: a model call and a side effect the uninterrupted run never made)."""
    from loopterm.core import ToolContext, tool

    calls: list[str] = []

    @tool(side_effects=True, idempotent=False)
    def write(ctx: ToolContext, text: str) -> str:
        """Write text to flag.txt (counted)."""
        calls.append(text)
        (ctx.workspace / "flag.txt").write_text(text)
        return "written"

    loop = make_loop(tmp_path, [{"content": decision(text="ok")}, {"content": decision(text="again")}], tools=[write])
    engine, store = make_engine(tmp_path, loop)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(engine, "_finish", crash)
    with pytest.raises(RuntimeError):
        await engine.run()
    assert store.get_run(engine.run_id).status == "running" and store.get_run(engine.run_id).iterations == 1
    resumed = Engine(loop, store, store.get_run(engine.run_id), workdir=tmp_path, client=_NoModel())
    run = await resumed.run()
    assert (run.status, run.termination_reason, run.iterations) == ("converged", "converged", 1)
    assert run.message == "converged at iteration 1: every gate passed"  # as the uninterrupted run's
    assert calls == ["ok"]
    assert [i.n for i in store.iterations(run.id)] == [1]


class _NoModel:
    """A model client that fails the test if the engine calls the model."""

    temperature = 0.0

    def estimate(self, *args: object) -> tuple[int, float]:
        return (0, 0.0)

    async def complete(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("the model was called")
