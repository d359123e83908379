"""Topologies: the loop shapes engineers build, as functions that return a `Loop`.

- `reflexive`: one agent iterates on its own verified feedback; when everything
  else passes, a critic (another prompt profile) gets a final say.
- `maker_checker`: every iteration's work is checked by a separate checker role;
  the maker never validates itself (Loop refuses a checker with the maker's profile).
- `proposer_critic_judge`: the maker proposes, a critic argues against it
  (advisory), a judge weighs proposal and critique and decides.
- `planner_executors_aggregator`: the decision step plans a list of items, child
  runs of an executor loop handle them in parallel, and the decision step
  aggregates their results (see nesting.fan_out).

Each takes the usual Loop fields as keyword arguments, so a topology is a
normal loop: it runs, persists, forks and replays like any other.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pydantic import Field

from loopterm.core.checkers import ModelGate
from loopterm.core.decision import Decision
from loopterm.core.gates import GateResult
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loop import Loop
from loopterm.core.nesting import child_results, fan_out
from loopterm.core.roles import Role
from loopterm.core.state import LoopState, ToolRecord
from loopterm.core.tools import Tool, tool

CRITIC_INSTRUCTIONS = (
    "Everything else passed. Read the task and the final proposal critically: is anything the task asks "
    "for missing or wrong? Fail it only for a concrete defect you can name."
)


def _with_gates(fields: dict[str, Any], *extra: ModelGate) -> list[Any]:
    return [*fields.pop("gates", []), *extra]


def reflexive(*, critic: Role, critic_instructions: str = CRITIC_INSTRUCTIONS, **fields: Any) -> Loop:
    """A single agent with a final critic pass: the critic runs only when every other gate passed."""
    gates = _with_gates(fields, ModelGate(name="critic", role=critic, instructions=critic_instructions, when="final"))
    return Loop(topology="reflexive", gates=gates, **fields)


def maker_checker(*, checker: Role, instructions: str, **fields: Any) -> Loop:
    """Every iteration's proposal is checked by `checker`, a role that is not the maker."""
    gates = _with_gates(fields, ModelGate(name="checker", role=checker, instructions=instructions))
    return Loop(topology="maker-checker", gates=gates, **fields)


def proposer_critic_judge(
    *, critic: Role, judge: Role, critic_instructions: str, judge_instructions: str, **fields: Any
) -> Loop:
    """The maker proposes; the critic argues (advisory); the judge sees both and decides."""
    if critic.same_profile_as(judge.model or "", judge.system_prompt) and critic.model == judge.model:
        raise ValueError("the critic and the judge must be different prompt profiles")
    gates = _with_gates(
        fields,
        ModelGate(name="critic", role=critic, instructions=critic_instructions, advisory=True),
        ModelGate(name="judge", role=judge, instructions=judge_instructions),
    )
    return Loop(topology="proposer-critic-judge", gates=gates, **fields)


# ---------------------------------------------------------------------------- planner -> executors -> aggregator


class PlanState(LoopState):
    """The bookkeeping of a planner -> parallel executors -> aggregator loop."""

    plan: list[str] = Field(default_factory=list)  # the items in the planner's order
    remaining: list[str] = Field(default_factory=list)
    executed: list[str] = Field(default_factory=list)  # every item handed to an executor, repeats included
    remaining_history: list[int] = Field(default_factory=list)  # len(remaining) after each execute step
    results: dict[str, Any] = Field(default_factory=dict)  # item -> the executor run's result
    child_runs: dict[str, str] = Field(default_factory=dict)  # item -> child run id
    outcome: dict[str, Any] | None = None  # the aggregator's decision


@tool
def plan(items: list[str]) -> str:
    """Set the plan: every item to hand to an executor, in the order to handle them (once, first)."""
    if not items:
        raise ValueError("the plan is empty; list the items to handle")
    if len(set(items)) != len(items):
        raise ValueError("the plan repeats an item; list each once")
    return json.dumps(items)


def remaining_strictly_decrease(state: LoopState) -> bool:
    """While items remain, every execute step leaves fewer than the one before."""
    history = [len(state.plan), *state.remaining_history] if isinstance(state, PlanState) and state.plan else []
    return all(b < a for a, b in zip(history, history[1:]) if a > 0)


def no_item_twice(state: LoopState) -> bool:
    return not isinstance(state, PlanState) or len(state.executed) == len(set(state.executed))


def only_planned_items(state: LoopState) -> bool:
    return not isinstance(state, PlanState) or set(state.executed) <= set(state.plan)


PLAN_INVARIANTS = [
    Invariant(name="remaining_decrease", check=remaining_strictly_decrease, remediation=Remediation.CHANGE_STRATEGY,
              description="while items remain, each execute step strictly reduces the number remaining"),
    Invariant(name="no_item_twice", check=no_item_twice, remediation=Remediation.ESCALATE,
              description="no item is handed to an executor twice"),
    Invariant(name="only_planned_items", check=only_planned_items, remediation=Remediation.ESCALATE,
              description="executors only get items from the plan"),
]


def observe_plan(state: LoopState, decision: Decision, record: ToolRecord | None, gates: list[GateResult]) -> LoopState:
    """Fold the plan and the executors' results into the state (facts, not narratives)."""
    if not isinstance(state, PlanState) or record is None or not record.ok:
        return state
    if record.tool == "plan" and not state.plan:
        items = list(record.args.get("items", []))
        return state.model_copy(update={"plan": items, "remaining": items})
    if record.tool == "execute":
        items = list(record.args.get("items", []))
        results = dict(state.results)
        children = dict(state.child_runs)
        for r in child_results(record.output):
            results[r.item] = {"status": r.status, "result": r.result}
            children[r.item] = r.run_id
        remaining = [i for i in state.remaining if i not in items]
        return state.model_copy(update={
            "executed": [*state.executed, *items], "remaining": remaining, "results": results,
            "child_runs": children, "remaining_history": [*state.remaining_history, len(remaining)],
        })
    return state


def plan_context(state: LoopState) -> str:
    if not isinstance(state, PlanState):
        return ""
    if not state.plan:
        return "Phase: plan (no plan yet: call plan with every item, in the order to handle them)"
    lines = [f"Plan: {', '.join(state.plan)}", f"Remaining: {', '.join(state.remaining) or '(none)'}"]
    for item, res in state.results.items():
        lines.append(f"Result for {item}: {json.dumps(res, ensure_ascii=False)[:1_500]}")
    lines.append("Phase: " + ("execute (call execute with the next items)" if state.remaining
                              else "aggregate (every item is done: decide)"))
    return "\n".join(lines)


def planner_executors_aggregator(
    *,
    executor: str,
    aggregate: Tool,
    parallel: int = 4,
    item_goal: str = "{item}",
    observe: Callable[[LoopState, Decision, ToolRecord | None, list[GateResult]], LoopState] | None = None,
    state: type[PlanState] = PlanState,
    **fields: Any,
) -> Loop:
    """Plan items, run the `executor` loop on them in parallel child runs, then `aggregate`.

    The loop's own `observe` (for its aggregate tool) runs after the plan bookkeeping.
    """

    def observe_all(s: LoopState, d: Decision, r: ToolRecord | None, g: list[GateResult]) -> LoopState:
        s = observe_plan(s, d, r, g)
        return observe(s, d, r, g) if observe is not None else s

    tools = [plan, fan_out("execute", executor, goal=item_goal, parallel=parallel,
                           description=f"Hand items to the {executor!r} executor loop, up to {parallel} run in parallel."),
             aggregate, *fields.pop("tools", [])]
    invariants = [*PLAN_INVARIANTS, *fields.pop("invariants", [])]
    return Loop(topology="planner-executors", state=state, tools=tools, invariants=invariants, observe=observe_all,
                context=fields.pop("context", plan_context), **fields)
