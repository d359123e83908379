"""Child runs: the service a tool calls (`ctx.services["spawn"]`) to run another loop as a run of its own,
started once per key (resumed or read back after a restart), its spend covered by the caller's budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopterm.core import runlog as log
from loopterm.core.budget import Spend
from loopterm.core.migrations import migrate_state
from loopterm.core.nesting import ChildResult, LoopCycleError, cycle_message
from loopterm.core.policies import spent
from loopterm.core.termination import Status

if TYPE_CHECKING:
    from loopterm.core.engine import Engine


async def spawn(engine: Engine, loop_ref: str, goal: str, key: str, item: str, share: float = 1.0) -> ChildResult:
    """Start (or resume, or read) the child run for `key`; returns what it hands back.

    A new child's budget is `share` of what the caller may still spend (siblings started together split
    it), so children running in parallel cannot overspend their caller.
    """
    from loopterm.core.checkers import preflight_roles
    from loopterm.core.loader import load_loop
    from loopterm.core.model import check_model
    from loopterm.core.nesting import ref_base, ref_label, resolve_ref

    journal = engine.journal
    engines = type(engine)  # a child is driven by the same kind of engine as its caller
    loop, ref = load_loop(resolve_ref(loop_ref, ref_base(engine.run_record.loop_ref)))
    if ref in engine.call_stack:
        chain = [*engine.call_stack[engine.call_stack.index(ref):], ref]
        raise LoopCycleError(cycle_message([ref_label(r) for r in chain]))
    scripted = engine.run_record.model.startswith("scripted/")
    model = loop.model if scripted else engine.run_record.model
    check_model(model, loop.script if model.startswith("scripted/") else None)
    preflight_roles(loop.gates, model)
    started = engine.view.children.get(key)
    remaining: dict[str, Any] = {}
    total = spent(engine)
    share = min(1.0, max(0.0, share))
    if engine.budget.usd is not None:
        remaining["usd"] = max(0.0, engine.budget.usd - total.cost_usd) * share
    if engine.budget.tokens is not None:
        remaining["tokens"] = int(max(0, engine.budget.tokens - total.tokens) * share)
    child: Engine | None
    if started is None:
        child = engines.create(loop, journal, loop_ref=ref, model=model, budget=remaining, workspace=engine.workspace,
                              parent_run=engine.run_id, goal=goal, call_stack=engine.call_stack, clock=engine.clock)
        engine.log(log.ChildStarted(key=key, run_id=child.run_id, loop=loop.name, item=item), engine.state.iteration + 1)
    else:
        record = journal.get_run(started)
        child = None if Status(record.status).finished else engines(
            loop, journal, record, call_stack=engine.call_stack, clock=engine.clock)
    before = Spend()
    if child is not None:
        before = Spend(tokens_in=child.spend.tokens_in, tokens_out=child.spend.tokens_out, cost_usd=child.spend.cost_usd)
        final = await child.run()
    else:
        final = journal.get_run(started or "")
    engine.children_spend.add(final.tokens_in - before.tokens_in, final.tokens_out - before.tokens_out,
                              final.cost_usd - before.cost_usd)
    last = journal.last_iterations(final.id, 1)
    result: Any = None
    if last:
        child_state = loop.state.model_validate(migrate_state(loop, last[-1].state))
        result = loop.result(child_state) if loop.result is not None else child_state.memory.subgoal
    return ChildResult(item=item, run_id=final.id, loop=loop.name, status=final.status,
                       reason=final.termination_reason, iterations=final.iterations,
                       tokens=final.tokens_in + final.tokens_out, cost_usd=final.cost_usd, result=result)
