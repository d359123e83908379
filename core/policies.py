"""Reasons to end or change course between iterations: budgets, stalls, strategies.

Each is a policy over what the run has done so far; the engine asks them at every boundary
(and the decide phase asks the budget before every model call).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loopterm.core import runlog as log
from loopterm.core.budget import Spend, over_budget
from loopterm.core.errors import ConfigError, ErrorKind, ModelError
from loopterm.core.records import IterationRecord
from loopterm.core.strategy import Strategy
from loopterm.core.termination import RunEnds, TerminationReason
from loopterm.core.text import one_line

if TYPE_CHECKING:
    from loopterm.core.engine import Engine


# -- budgets -----------------------------------------------------------------------------------------------------


def spent(engine: Engine, spend: Spend | None = None) -> Spend:
    """This run's spend plus its child runs': what the run's budget is checked against."""
    own = spend or engine.spend
    total = Spend(tokens_in=own.tokens_in, tokens_out=own.tokens_out, cost_usd=own.cost_usd, elapsed_s=own.elapsed_s)
    c = engine.children_spend
    total.add(c.tokens_in, c.tokens_out, c.cost_usd)
    return total


def check_budget(engine: Engine, projected: tuple[int, float] | None = None) -> None:
    """End the run when its budget is spent, or would be by a call projected at (tokens, cost)."""
    budget = engine.budget
    if budget.tokens is None and budget.usd is None and budget.wall_seconds is None:
        return  # no cap: nothing to add up
    reason = over_budget(budget, spent(engine), *(projected or (0, 0.0)))
    if reason:
        raise RunEnds(TerminationReason(reason), budget_message(engine, reason, projected))


def budget_message(engine: Engine, reason: str, projected: tuple[int, float] | None = None) -> str:
    b, s = engine.budget, spent(engine)
    extra = f" (next call projected at {projected[0]} tokens, ${projected[1]:.6f})" if projected else ""
    if reason == "budget_tokens":
        return f"token budget reached: {s.tokens} of {b.tokens} used{extra}"
    if reason == "budget_usd":
        return f"cost budget reached: ${s.cost_usd:.6f} of ${b.usd} used{extra}"
    return f"wall-time budget reached: {s.elapsed_s:.1f}s of {b.wall_seconds}s"


# -- stalls ------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one iteration looked like, for stall detection."""

    action: str
    subgoal: str
    verdict: str | None  # a digest of the gate results; None when no gate ran


def outcome(record: IterationRecord) -> Outcome:
    decision = record.decision or {}
    action = decision.get("action") or {}
    verdict = None
    if record.gate_results:
        gates = [(g["name"], g["passed"], g.get("exit_code"), (g.get("stderr") or "")[-500:], (g.get("stdout") or "")[-500:])
                 for g in record.gate_results]
        verdict = hashlib.sha256(json.dumps(gates).encode()).hexdigest()
    return Outcome(
        action=(action.get("tool") or "(none)") + json.dumps(action.get("args") or {}, sort_keys=True, default=str),
        subgoal=str(decision.get("subgoal", "")),
        verdict=verdict,
    )


class Stall:
    """The last k iterations' outcomes: the same action, the same subgoal, or identical gate results k
    times in a row is a stall (k = the loop's stall_window; None: never)."""

    def __init__(self, window: int | None, recent: list[IterationRecord]) -> None:
        self.window = window
        self.recent: deque[Outcome] = deque((outcome(r) for r in recent) if window else (), maxlen=window or 1)

    def add(self, record: IterationRecord) -> None:
        if self.window:  # stall detection off: no outcome to build (a JSON dump and a hash per iteration)
            self.recent.append(outcome(record))

    def clear(self) -> None:
        self.recent.clear()

    def stalled(self) -> str | None:
        k = self.window
        if k is None or len(self.recent) < k:
            return None
        last = list(self.recent)
        if len({o.action for o in last}) == 1:
            return f"stalled: the same action was chosen {k} times in a row"
        if len({o.subgoal for o in last}) == 1 and last[0].subgoal:
            return f"stalled: the same subgoal was pursued {k} times in a row"
        if last[0].verdict is not None and len({o.verdict for o in last}) == 1:
            return f"stalled: no progress (identical verification results) in {k} iterations"
        return None


# -- strategies --------------------------------------------------------------------------------------------------


def adopt(engine: Engine, strategy: Strategy) -> None:
    engine.strategy_note = strategy.note
    if strategy.temperature is not None:
        engine.temperature = strategy.temperature
    if strategy.model is not None and strategy.model != engine.run_record.model:
        engine.run_record = engine.run_record.model_copy(update={"model": strategy.model})
        engine.reset_client()  # the next call builds a client for the strategy's model


def change_strategy(engine: Engine, why: str, n: int) -> bool:
    """Move to the loop's next declared strategy; False when it declares none left."""
    names = [x.name for x in engine.loop.strategies]
    at = names.index(engine.strategy.name) + 1 if engine.strategy is not None else 0
    if at >= len(names):
        return False
    before, engine.strategy = engine.strategy, engine.loop.strategies[at]
    if engine.strategy.model is not None:
        from loopterm.core.model import check_model

        try:
            check_model(engine.strategy.model)
        except ConfigError as exc:
            raise ModelError(f"strategy {engine.strategy.name!r}: {exc}", ErrorKind.FATAL) from None
    adopt(engine, engine.strategy)
    engine.log(log.StrategyChanged(before=before.name if before else None, to=engine.strategy.name, why=why,
                                   temperature=engine.temperature, model=engine.run_record.model), n)
    if engine.strategy.model is not None:
        engine.journal.update_run(engine.run_id, model=engine.run_record.model)
    memory = engine.state.memory.model_copy(update={
        "facts": [*engine.state.memory.facts, f"strategy changed to {engine.strategy.name} ({one_line(why, 120)})"]})
    engine.state = engine.state.model_copy(update={"memory": memory})
    return True


def boundary(engine: Engine) -> None:
    """Every reason to end the run before its next iteration: the iteration cap, the budget, a stall
    (a stall moves to the next strategy first, when the loop declares one)."""
    if engine.state.iteration >= engine.max_iterations:
        raise RunEnds(TerminationReason.MAX_ITERATIONS, f"reached the maximum of {engine.max_iterations} iterations")
    check_budget(engine)
    stalled = engine.stall.stalled()
    if stalled and change_strategy(engine, stalled, engine.state.iteration):
        engine.stall.clear()  # the new strategy gets a fresh stall window
        stalled = None
    if stalled:
        raise RunEnds(TerminationReason.STALLED, stalled)
