"""Fault injection: SIGKILL a headless run at seeded points in four phases, resume it each time.

The harness is bench/crash_trials.py (its docstring says what is killed where and what is checked);
here it runs in its CI form: 24 kills, 6 in each phase (inside the model call, inside the side-effecting
tool call before or after its effect, inside the gate, inside the commit transaction), and one after the
converging iteration's commit, before the run's end is recorded; each resume a `loopterm resume` process
forked from a launcher that imported litellm once. The full 100 (fresh processes) is
`python bench/crash_trials.py`, and the slow-marked test at the end.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopterm.core.engine import Engine
from loopterm.core.tools import TOOK_EFFECT, idempotency_key
from tests.loopkit import decision, make_engine, make_loop

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("crash_trials", ROOT / "bench" / "crash_trials.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_trials"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ct = _harness()


@pytest.fixture(scope="module")
def launcher() -> Iterator[object]:
    with ct.Launcher(fork=True) as started:
        yield started


def _run(root: Path, launcher: object, plan: list[list[object]], iterations: int, window: float, **kwargs: object):
    reference = ct.reference_run(root / "reference", launcher, iterations, window)
    results = []
    for index, points in enumerate(plan):
        trial = ct.Trial(root / f"run{index}", launcher, iterations, window, **kwargs)
        result = trial.run(points, index)
        ct.final_checks(trial, result, reference)
        results.append(result)
    return ct.Report(seed=0, mode="fork", window_s=window, iterations=iterations, runs=results, wall_s=0.0)


def test_sigkill_at_25_points_loses_nothing_and_fires_no_side_effect_twice(
    tmp_path: Path, launcher: object
) -> None:
    window = 0.6
    plan = ct.schedule(seed=7, kills=24, runs=1, iterations=24, window=window)
    report = _run(tmp_path, launcher, plan, 24, window)
    print(report.text())
    kills = report.kills
    assert {p: sum(k.phase == p for k in kills) for p in ct.ORDER} == {**dict.fromkeys(ct.PHASES, 6), "finish": 1}
    # Each kill landed inside its phase's window (a loaded machine may make one late: then it is still a
    # kill, somewhere later), and the store looked exactly as that phase predicts.
    assert sum(k.hit for k in kills) >= 20, report.text()
    assert all(sum(k.hit for k in kills if k.phase == p) >= 4 for p in ct.PHASES), report.text()
    (end,) = [k for k in kills if k.phase == "finish"]
    assert end.hit and end.point == "converged and committed, end not recorded", report.text()
    assert [k.evidence for k in kills if k.hit and k.evidence] == []
    # Both answers a person gives to an interrupted call were exercised: the log showed the effect
    # (reuse: not run again) and did not (reexecute: run once).
    points = {k.point for k in kills if k.phase == "tool" and k.hit}
    assert points == {"before the effect", "after the effect"}, report.text()
    answers = {k.point: k.answer for k in kills if k.phase == "tool" and k.hit}
    assert answers == {"before the effect": "reexecute", "after the effect": "reuse"}
    (run,) = report.runs
    assert (run.lost, run.duplicated, run.double) == (0, 0, 0), report.text()
    assert all((k.lost, k.duplicated, k.double) == (0, 0, 0) for k in kills)
    assert run.rc == 0 and run.status == "converged" and run.iterations == list(range(1, 25))
    assert run.identical, run.differences


def test_the_harness_counts_a_side_effect_a_person_fires_twice(tmp_path: Path, launcher: object) -> None:
    """The control: kill after the effect, answer `reexecute` although the log shows it ran."""
    window = 0.6
    plan = [[ct.Kill(run=0, n=3, phase="tool", offset=0.75 * window)]]
    report = _run(tmp_path, launcher, plan, 6, window, answer_policy="reexecute")
    (kill,) = report.kills
    (run,) = report.runs
    assert kill.hit and kill.point == "after the effect" and kill.answer == "reexecute"
    assert kill.double == run.double == 1  # iteration 3's line, twice
    # The loop's own gate sees it: the run never converges, and the result is not the reference's.
    assert run.rc == 3 and run.status == "terminated" and not run.identical
    assert any("effects.log iterations" in d for d in run.differences)
    assert not report.ok()


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


@pytest.mark.slow
def test_sigkill_at_100_points_with_fresh_processes(tmp_path: Path) -> None:
    """The full form: 100 kills over 5 runs of 30 iterations (and one at each run's end), every command a
    fresh `loopterm` process (about 8 minutes here); `python bench/crash_trials.py` prints the table."""
    report = ct.trials(tmp_path, kills=100, runs=5, iterations=30, seed=6, window=0.6, fork=False)
    print(report.text())
    assert {p: sum(k.phase == p for k in report.kills) for p in ct.ORDER} == {**dict.fromkeys(ct.PHASES, 25), "finish": 5}
    assert all((r.lost, r.duplicated, r.double, r.rc) == (0, 0, 0, 0) and r.identical for r in report.runs), report.text()
    assert sum(k.hit for k in report.kills) >= 90 and not [k.evidence for k in report.kills if k.hit and k.evidence]
