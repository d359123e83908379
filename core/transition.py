"""The fold of an iteration into the next state: the observation, the invariants and their remediations,
and whether the run converged, ends, or waits on a person (with the escalation packet for them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loopterm.core import runlog as log
from loopterm.core.decision import Decision
from loopterm.core.gates import GateResult
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.observation import iteration_fact
from loopterm.core.policies import change_strategy
from loopterm.core.secrets import redact_tree
from loopterm.core.state import LoopState, ToolRecord
from loopterm.core.termination import RunEnds, TerminationReason

if TYPE_CHECKING:
    from loopterm.core.engine import Engine

MAX_FACTS = 12


@dataclass
class Transition:
    """The state after an iteration and what it means for the run."""

    state: LoopState
    invariant_status: dict[str, bool]
    violated: list[Invariant]
    remediations: list[Remediation] = field(default_factory=list)
    ends: RunEnds | None = None  # converged, aborted, or waiting on a person


def next_state(engine: Engine, n: int, decision: Decision, tool_record: ToolRecord | None,
               gates: list[GateResult]) -> Transition:
    """Fold the iteration's observations into a new state (the old one is never mutated), check the
    invariants, apply remediations, and decide whether the run ends here."""
    loop = engine.loop
    state = _observed(engine, n, decision, tool_record, gates)
    if loop.observe is not None:
        state = loop.observe(state, decision, tool_record, gates)
    for hook in engine.hooks:
        state = hook.observed(engine, state)
    status, violated = check_invariants(engine, state)
    state.invariant_status = status
    state, remediations, ends = remediate(engine, state, violated)
    converged = not engine.shadow and loop.is_converged(state, gates) and not violated
    if ends is None and converged:
        why = "every gate passed" if loop.converged is None else "its convergence check held"
        ends = RunEnds(TerminationReason.CONVERGED, f"converged at iteration {n}: {why}")
    if ends is not None:
        state.termination_reason = ends.reason.value
    return Transition(state, status, violated, remediations, ends)


def _observed(engine: Engine, n: int, decision: Decision, tool_record: ToolRecord | None,
              gates: list[GateResult]) -> LoopState:
    """A shallow copy is enough: tool records are append-only and never edited, and working memory gets a
    fresh object. Deep-copying a state whose tool log grows every iteration made each iteration slower."""
    current = engine.state
    failed = next((g for g in gates if not g.passed), None)
    memory = current.memory.model_copy(update={
        "subgoal": decision.subgoal,
        "facts": [*current.memory.facts, iteration_fact(n, tool_record, gates)][-MAX_FACTS:],
        "contradictions": list(current.memory.contradictions),
    })
    updates: dict[str, Any] = {"iteration": n, "memory": memory,
                               "last_gate_failure": failed.feedback() if failed else None}
    if tool_record is not None:
        kept = engine.loop.tool_history
        records = [*current.tool_results, tool_record]
        updates["tool_results"] = records if kept is None or len(records) <= kept else records[-kept:]
    return current.model_copy(update=updates)


def check_invariants(engine: Engine, state: LoopState) -> tuple[dict[str, bool], list[Invariant]]:
    status: dict[str, bool] = {}
    violated: list[Invariant] = []
    relaxed = engine.relaxed
    for inv in engine.loop.invariants:
        ok = inv.holds(state)
        status[inv.name] = ok
        if not ok and inv.name not in relaxed:
            violated.append(inv)
    return status, violated


def remediate(engine: Engine, state: LoopState, violated: list[Invariant]
              ) -> tuple[LoopState, list[Remediation], RunEnds | None]:
    """Apply each violated invariant's remediation; returns the (possibly replaced) state."""
    applied: list[Remediation] = []
    ends: RunEnds | None = None
    for inv in violated:
        remedy = inv.remediation
        applied.append(remedy)
        engine.log(log.InvariantViolated(invariant=inv.name, remediation=remedy.value), state.iteration)
        if remedy is Remediation.PRUNE_CONTEXT:
            state.memory.facts = state.memory.facts[-3:]
            state.memory.contradictions = state.memory.contradictions[-3:]
        elif remedy is Remediation.CHANGE_STRATEGY:
            if not change_strategy(engine, f"invariant {inv.name!r} violated", state.iteration):
                engine.temperature = min(2.0, engine.temperature + 0.3)
                engine.strategy_note = f"the last approach broke invariant {inv.name!r}; take a different approach"
        elif remedy is Remediation.CUSTOM and inv.custom is not None:
            state = type(state).model_validate(inv.custom(state).model_dump())
        elif remedy is Remediation.ABORT and ends is None:
            ends = RunEnds(TerminationReason.FATAL_ERROR, f"invariant {inv.name!r} violated; its remediation aborts the run")
        elif remedy is Remediation.ESCALATE and ends is None:
            ends = RunEnds(TerminationReason.WAITING, f"invariant {inv.name!r} violated; waiting on a person")
    return state, applied, ends


def escalation(engine: Engine, n: int, state: LoopState, violated: list[Invariant], message: str) -> log.Escalated:
    """The packet a person answers an escalation from (redacted: it is stored and shown)."""
    packet = {
        "run_id": engine.run_id,
        "iteration": n,
        "summary": message,
        "failing_invariants": [{"name": i.name, "description": i.description} for i in violated],
        "confidence_trajectory": list(engine.confidences),
        "last_gate_failure": state.last_gate_failure,
        "suggested_interventions": [
            "add a fact to working memory",
            "override the subgoal",
            *[f"relax invariant {i.name!r}" for i in violated],
            "patch state",
            "resume",
            "abort",
        ],
        "state": state.model_dump(mode="json"),
    }
    return log.Escalated.model_validate(redact_tree(packet))
