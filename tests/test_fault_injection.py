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
