"""Where a replay and its recording first differ: decision, gate results, invariant status, then length."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.recording import Recording, canonical
from loopterm.core.text import one_line

DivergenceKind = Literal["prompt", "decision", "gates", "invariants", "length"]
# Termination reasons the loop itself decides (a replay that is identical so far must reach them too).
_SELF_DETERMINED = frozenset({"converged", "stalled", "max_iterations"})
_SHORT = 100


class Divergence(BaseModel):
    iteration: int
    kind: DivergenceKind
    recorded: str
    replayed: str
    detail: str = ""


# ----------------------------------------------------------------------------- comparison


def compare(
    recorded_run: RunRecord,
    recorded: list[IterationRecord],
    replay_run: RunRecord,
    replayed: list[IterationRecord],
    recording: Recording | None = None,
) -> tuple[Divergence | None, int]:
    """The first divergence between a recording and its replay, and how many iterations were compared."""
    mine = {it.n: it for it in replayed}
    compared = 0
    for rec in recorded:
        rep = mine.get(rec.n)
        if rep is None:
            break
        compared += 1
        found = _iteration_divergence(rec, rep)
        if found is not None:
            return found, compared
    k, m = len(recorded), len(replayed)
    if m < k:
        n = m + 1
        problem = recording.problem_at(n) if recording is not None else None
        if problem is not None and problem.kind == "prompt":
            return Divergence(iteration=n, kind="prompt", recorded=problem.recorded, replayed=problem.replayed,
                              detail=f"the {problem.where} differs from the recording; the replay model "
                                     "did not answer"), compared
        if problem is not None and problem.kind == "repair":
            return Divergence(iteration=n, kind="decision", recorded=one_line(_decision_text(recorded[m].decision), _SHORT),
                              replayed=one_line(problem.replayed, _SHORT),
                              detail="the recorded reply is no longer accepted as a decision"), compared
        return Divergence(
            iteration=n, kind="length", recorded=f"went on to iteration {k}",
            replayed=one_line(f"ended after {m}: {_ending(replay_run)}", _SHORT),
            detail=f"the replay ended after iteration {m}; the recording has {k} iterations",
        ), compared
    if m > k:
        return Divergence(iteration=k + 1, kind="length", recorded=one_line(f"ended after {k}: {_ending(recorded_run)}", _SHORT),
                          replayed=f"went on to iteration {m}", detail="the replay went on past the recording"), compared
    went_on = recording is not None and any(p.kind == "missing" and p.iteration == k + 1 for p in recording.problems)
    if _ended_by_itself(recorded_run, recorded) and (went_on or replay_run.termination_reason != recorded_run.termination_reason):
        replayed_end = f"went on to iteration {k + 1}" if went_on else f"ended after {k}: {_ending(replay_run)}"
        return Divergence(
            iteration=k + 1 if went_on else k, kind="length",
            recorded=one_line(f"ended after {k}: {_ending(recorded_run)}", _SHORT), replayed=one_line(replayed_end, _SHORT),
            detail="the recording ended here by the loop's own rules; the replay did not end the same way",
        ), compared
    return None, compared


def _iteration_divergence(rec: IterationRecord, rep: IterationRecord) -> Divergence | None:
    n = rec.n
    if (rec.decision or {}) != (rep.decision or {}):
        field_name, a, b = _decision_difference(rec.decision or {}, rep.decision or {})
        return Divergence(iteration=n, kind="decision", recorded=one_line(a, _SHORT), replayed=one_line(b, _SHORT),
                          detail=f"the decision differs in {field_name}")
    rec_gates, rep_gates = _gates(rec), _gates(rep)
    if rec_gates != rep_gates:
        return Divergence(iteration=n, kind="gates", recorded=one_line(_gates_text(rec_gates), _SHORT),
                          replayed=one_line(_gates_text(rep_gates), _SHORT), detail="the gate results differ")
    if rec.invariant_status != rep.invariant_status:
        names = sorted(set(rec.invariant_status) | set(rep.invariant_status))
        changed = [x for x in names if rec.invariant_status.get(x) != rep.invariant_status.get(x)]
        return Divergence(
            iteration=n, kind="invariants",
            recorded=one_line(_invariants_text(rec.invariant_status, changed), _SHORT),
            replayed=one_line(_invariants_text(rep.invariant_status, changed), _SHORT),
            detail=f"invariant status differs: {', '.join(changed)}",
        )
    return None


def _decision_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str, str]:
    for key in ("action", "subgoal", "done", "confidence", "reasoning", *sorted((set(a) | set(b)) - {
        "action", "subgoal", "done", "confidence", "reasoning"})):
        if a.get(key) != b.get(key):
            if key == "action":
                return key, _action_text(a.get(key)), _action_text(b.get(key))
            return key, f"{key}: {_value(a.get(key))}", f"{key}: {_value(b.get(key))}"
    return "(whole)", _decision_text(a), _decision_text(b)


def _action_text(action: Any) -> str:
    if not action:
        return "action: none"
    return f"action: {action.get('tool')}({canonical(action.get('args') or {})})"


def _decision_text(decision: dict[str, Any] | None) -> str:
    if not decision:
        return "no decision"
    return f"{_action_text(decision.get('action'))}; subgoal: {_value(decision.get('subgoal'))}"


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _gates(record: IterationRecord) -> list[tuple[Any, Any, Any]]:
    return [(g.get("name"), g.get("passed"), g.get("exit_code")) for g in record.gate_results]


def _gates_text(gates: list[tuple[Any, Any, Any]]) -> str:
    if not gates:
        return "no gate ran"
    return ", ".join(f"{name} {'passed' if ok else 'failed'}" + (f" (exit {code})" if code is not None else "")
                     for name, ok, code in gates)


def _invariants_text(status: dict[str, bool], names: list[str]) -> str:
    return ", ".join(f"{x}={'ok' if status.get(x) else ('VIOLATED' if x in status else 'absent')}" for x in names)


def _ending(run: RunRecord) -> str:
    reason = run.termination_reason or run.status
    return f"{reason} ({run.message})" if run.message else str(reason)


def _ended_by_itself(run: RunRecord, recorded: list[IterationRecord]) -> bool:
    """The recording stopped by the loop's own rules (not a person, a budget, a crash or a provider)."""
    if run.termination_reason in _SELF_DETERMINED:
        return True
    stopping = {"escalate", "abort"}
    return run.termination_reason in ("waiting_on_person", "fatal_error") and bool(
        recorded and stopping & set(recorded[-1].remediations))
