"""Two runs side by side: their iterations aligned at the fork point, where they first diverge, the state
diff between them at any aligned iteration, their totals and outcomes.

A branch's iteration n is its lineage's n (1..fork_iteration are its parent's, referenced, not copied), so
two runs align by n. Their fork point is how far they hold the very same iterations: up to it nothing can
differ. What the runs' logs say (outcome, a branch's patches) is read through the fold (core/fold.py).
`loopterm diff` (tui/diff_cli.py) and the compare screen (tui/screens/compare.py) show this result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from loopterm.core.errors import ConfigError
from loopterm.core.fold import fold, waiting_lines
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.runlog import EventRecord
from loopterm.core.text import one_line

ARGS_SHOWN = 120  # characters of an action's arguments kept per row (the comparison itself uses all of them)
DivergenceKind = Literal["action", "gates", "invariants", "state", "length"]


class History(Protocol):
    """What comparing reads; `loopterm.store.Store` implements it."""

    def get_run(self, run_id: str) -> RunRecord: ...

    def lineage(self, run_id: str) -> list[RunRecord]: ...

    def iter_iterations(self, run_id: str, *, first: int = 1) -> Iterator[IterationRecord]: ...

    def state_at(self, run_id: str, n: int) -> dict[str, Any] | None: ...

    def events(self, run_id: str, after_id: int = 0) -> list[EventRecord]: ...


# ----------------------------------------------------------------------------- the result


class Side(BaseModel):
    """One run's iteration n, summarised (never its prompt or state)."""

    run_id: str  # the run that made it: a branch's first iterations are its ancestor's
    tool: str | None  # the action's tool; None: no action
    args: str = ""  # its arguments as one line, `name=<JSON value>, ...`, cut to ARGS_SHOWN
    gates: dict[str, bool] = Field(default_factory=dict)  # gate -> passed
    invariants: dict[str, bool] = Field(default_factory=dict)  # invariant -> holds
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0

    @property
    def action(self) -> str:
        return "(no action)" if self.tool is None else f"{self.tool}({self.args})"

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


class AlignedIteration(BaseModel):
    n: int
    shared: bool  # the same iteration in both runs (n <= the fork point)
    a: Side | None  # None: run A has no iteration n
    b: Side | None
    differs: list[Literal["action", "gates", "invariants"]] = Field(default_factory=list)


class Divergence(BaseModel):
    """The first aligned iteration where the runs differ, and how."""

    n: int
    kind: DivergenceKind  # checked in this order: action (tool and arguments), gates, invariants, state, length
    a: str  # one line: what run A did or had there
    b: str
    detail: str


class Totals(BaseModel):
    iterations: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def add(self, side: Side) -> None:
        self.iterations += 1
        self.tokens_in += side.tokens_in
        self.tokens_out += side.tokens_out
        self.cost_usd += side.cost_usd


class ForkInfo(BaseModel):
    """How a branch was made (its log's Forked event, read through the fold)."""

    parent: str
    at: int
    reason: str = ""
    model: str | None = None
    patches: list[dict[str, Any]] = Field(default_factory=list)
    relaxed: dict[str, str] = Field(default_factory=dict)


class ComparedRun(BaseModel):
    id: str
    loop: str
    model: str
    origin: str
    parent_run: str | None
    fork_iteration: int | None
    status: str
    termination_reason: str | None
    message: str | None
    waiting: list[str] = Field(default_factory=list)  # what waits on a person (the fold's waiting_lines)
    fork: ForkInfo | None = None
    total: Totals  # the whole lineage: what a person sees in the run's timeline
    since_fork: Totals  # only the iterations after the fork point: what this side spent on its own

    @property
    def outcome(self) -> str:
        """One line: status, and why it ended when it did."""
        reason = self.termination_reason or ""
        return self.status + (f" ({reason})" if reason and reason != self.status else "")


class Comparison(BaseModel):
    a: ComparedRun
    b: ComparedRun
    common_ancestor: str | None  # the deepest run both lineages contain (one of the two when one descends from the other)
    fork_point: int  # iterations 1..fork_point are the same in both (0: none)
    relation: str  # one line for a person
    iterations: list[AlignedIteration]
    divergence: Divergence | None  # None: the same decisions, gates, invariants and states, and the same length

    def at(self, n: int) -> AlignedIteration:
        """Aligned iteration n (1-based); ConfigError when there is none."""
        if not 1 <= n <= len(self.iterations):
            span = f"1..{len(self.iterations)}" if self.iterations else "none (neither run has an iteration)"
            raise ConfigError(f"iteration {n} is not an aligned iteration of these runs; they have {span}")
        return self.iterations[n - 1]


class StateDiff(BaseModel):
    """The state of run A against run B's after aligned iteration n: only the top-level fields that differ
    (and of a list that only grew on B's side, only B's new tail), as `changed_parts` finds them."""

    n: int
    a_n: int | None  # the iteration whose state is run A's here: n, or A's last when A stopped before n (None: none)
    b_n: int | None
    a: dict[str, Any]  # the differing fields as run A has them
    b: dict[str, Any]

    @property
    def same(self) -> bool:
        return not self.a and not self.b


# ----------------------------------------------------------------------------- comparing


def compare(history: History, a_id: str, b_id: str) -> Comparison:
    """Run A against run B. Reads each shared iteration once, each state only up to the first divergence."""
    if a_id == b_id:
        raise ConfigError(f"both runs are {a_id}; give two different runs (a branch and its parent, two branches)")
    a_run, b_run = history.get_run(a_id), history.get_run(b_id)
    a_line, b_line = history.lineage(a_id), history.lineage(b_id)
    common, fork_point = _fork_point(a_line, b_line)
    rows: list[AlignedIteration] = []
    a_total, b_total, a_own, b_own = Totals(), Totals(), Totals(), Totals()
    divergence: Divergence | None = None
    a_iter = history.iter_iterations(a_id)
    b_iter = history.iter_iterations(b_id, first=fork_point + 1)
    a_rec: IterationRecord | None = next(a_iter, None)
    b_rec: IterationRecord | None = None
    while a_rec is not None and a_rec.n <= fork_point:  # the shared prefix, read once
        side = _side(a_rec)
        a_total.add(side)
        b_total.add(side)
        rows.append(AlignedIteration(n=a_rec.n, shared=True, a=side, b=side))
        a_rec = next(a_iter, None)
    b_rec = next(b_iter, None)
    while a_rec is not None or b_rec is not None:
        n = min(r.n for r in (a_rec, b_rec) if r is not None)
        this_a = a_rec if a_rec is not None and a_rec.n == n else None
        this_b = b_rec if b_rec is not None and b_rec.n == n else None
        a_side = _side(this_a) if this_a is not None else None
        b_side = _side(this_b) if this_b is not None else None
        for side, total, own in ((a_side, a_total, a_own), (b_side, b_total, b_own)):
            if side is not None:
                total.add(side)
                own.add(side)
        differs = _differs(a_side, b_side) if a_side is not None and b_side is not None else []
        rows.append(AlignedIteration(n=n, shared=False, a=a_side, b=b_side, differs=differs))
        if divergence is None:
            divergence = _divergence(n, this_a, this_b, a_side, b_side, a_run, b_run)
        if this_a is not None:
            a_rec = next(a_iter, None)
        if this_b is not None:
            b_rec = next(b_iter, None)
    return Comparison(
        a=_compared(history, a_run, a_total, a_own), b=_compared(history, b_run, b_total, b_own),
        common_ancestor=common, fork_point=fork_point, relation=_relation(a_run, b_run, common, fork_point),
        iterations=rows, divergence=divergence,
    )


def state_diff(history: History, comparison: Comparison, n: int) -> StateDiff:
    """The states of the two runs after aligned iteration n, where they differ. A run that stopped before n
    is taken at its last iteration (`a_n`/`b_n` say which); ConfigError when n is not aligned."""
    comparison.at(n)
    if n <= comparison.fork_point:  # the same iteration on both sides: nothing to read
        return StateDiff(n=n, a_n=n, b_n=n, a={}, b={})
    a_n = min(n, comparison.a.total.iterations) or None
    b_n = min(n, comparison.b.total.iterations) or None
    a_state = history.state_at(comparison.a.id, a_n) if a_n else None
    b_state = history.state_at(comparison.b.id, b_n) if b_n else None
    old, new = changed_parts(a_state or {}, b_state or {})
    return StateDiff(n=n, a_n=a_n, b_n=b_n, a=old, b=new)


def changed_parts(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the top-level fields that changed, and of a list that only grew, only its new tail:
    diffing two whole states of a long run costs more than a keystroke may (the Diff tab uses it too)."""
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for key in [*after, *(k for k in before if k not in after)]:  # in the state's own order
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list) and len(b) > len(a) and b[: len(a)] == a:
            new[f"{key} (appended after item {len(a)})"] = b[len(a):]
            continue
        if key in before:
            old[key] = a
        if key in after:
            new[key] = b
    return old, new


# ----------------------------------------------------------------------------- lineage


def _fork_point(a_line: list[RunRecord], b_line: list[RunRecord]) -> tuple[str | None, int]:
    """(the deepest common ancestor, how many first iterations both runs hold from it)."""
    b_ids = {run.id for run in b_line}
    common = next((run.id for run in reversed(a_line) if run.id in b_ids), None)
    if common is None:
        return None, 0
    reach = min(_inherited(a_line, common), _inherited(b_line, common))
    if math.isinf(reach):  # cannot happen for two different runs; kept finite for the type
        reach = 0
    return common, int(reach)


def _inherited(lineage: list[RunRecord], ancestor: str) -> float:
    """How many first iterations the lineage's last run takes from `ancestor` (infinite when it is the ancestor).
    A link with no fork point (a replay, a branch from the start) takes none: as core/fork.py records them."""
    reach = math.inf
    for run in reversed(lineage):
        if run.id == ancestor:
            return reach
        if not run.parent_run or not run.fork_iteration:
            return 0
        reach = min(reach, run.fork_iteration)
    return 0


def _relation(a: RunRecord, b: RunRecord, common: str | None, fork_point: int) -> str:
    shared = f"they share iterations 1..{fork_point}" if fork_point else "they share no iteration"
    if common is None:
        return "unrelated runs: no common history"
    if common == a.id:
        return f"{b.id[:8]} descends from {a.id[:8]}; {shared}"
    if common == b.id:
        return f"{a.id[:8]} descends from {b.id[:8]}; {shared}"
    return f"both descend from {common[:8]}; {shared}"


# ----------------------------------------------------------------------------- iterations


def _action(record: IterationRecord) -> tuple[str | None, dict[str, Any]]:
    """The call the iteration made (or, when it made none, the one its decision named)."""
    call = record.tool_call or (record.decision or {}).get("action") or {}
    if not isinstance(call, dict) or not call.get("tool"):
        return None, {}
    args = call.get("args")
    return str(call["tool"]), args if isinstance(args, dict) else {}


def _side(record: IterationRecord) -> Side:
    tool, args = _action(record)
    return Side(
        run_id=record.run_id, tool=tool,
        args=one_line(", ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in args.items()),
                      ARGS_SHOWN) if tool is not None else "",
        gates={str(g.get("name", "?")): bool(g.get("passed")) for g in record.gate_results},
        invariants={str(k): bool(v) for k, v in record.invariant_status.items()},
        tokens_in=record.tokens_in, tokens_out=record.tokens_out, cost_usd=record.cost_usd,
    )


def _differs(a: Side, b: Side) -> list[Literal["action", "gates", "invariants"]]:
    found: list[Literal["action", "gates", "invariants"]] = []
    if (a.tool, a.args) != (b.tool, b.args):
        found.append("action")
    if a.gates != b.gates:
        found.append("gates")
    if a.invariants != b.invariants:
        found.append("invariants")
    return found


def _divergence(n: int, a: IterationRecord | None, b: IterationRecord | None, a_side: Side | None,
                b_side: Side | None, a_run: RunRecord, b_run: RunRecord) -> Divergence | None:
    if a is None or b is None or a_side is None or b_side is None:
        ended, went_on = (a_run, b_run) if a is None else (b_run, a_run)
        text = f"ended after iteration {n - 1}: {ended.status}", f"went on to iteration {n}"
        return Divergence(n=n, kind="length", a=text[0] if a is None else text[1], b=text[1] if a is None else text[0],
                          detail=f"run {ended.id[:8]} ended before iteration {n}; run {went_on.id[:8]} went on")
    if _action(a) != _action(b):
        return Divergence(n=n, kind="action", a=a_side.action, b=b_side.action, detail="a different action or arguments")
    if a_side.gates != b_side.gates:
        return Divergence(n=n, kind="gates", a=_marks(a_side.gates), b=_marks(b_side.gates),
                          detail="different gate results")
    if a_side.invariants != b_side.invariants:
        names = [x for x in {**a_side.invariants, **b_side.invariants}
                 if a_side.invariants.get(x) != b_side.invariants.get(x)]
        return Divergence(n=n, kind="invariants", a=_marks(a_side.invariants, names), b=_marks(b_side.invariants, names),
                          detail=f"invariant status differs: {', '.join(names)}")
    if a.state != b.state:
        keys = [k for k in {**a.state, **b.state} if a.state.get(k) != b.state.get(k)]
        return Divergence(n=n, kind="state", a=f"{len(keys)} field(s) differ", b=f"{len(keys)} field(s) differ",
                          detail=one_line(f"the states differ in {', '.join(keys)}", 200))
    return None


def _marks(results: dict[str, bool], names: list[str] | None = None) -> str:
    shown = [(k, v) for k, v in results.items() if names is None or k in names]
    return ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in shown) or "none"


def _compared(history: History, run: RunRecord, total: Totals, own: Totals) -> ComparedRun:
    view = fold(history.events(run.id))
    forked = view.forked
    fork = None if forked is None else ForkInfo(parent=forked.parent, at=forked.at, reason=forked.reason,
                                                model=forked.model, patches=list(forked.patches),
                                                relaxed=dict(forked.relaxed))
    return ComparedRun(
        id=run.id, loop=run.loop, model=run.model, origin=run.origin, parent_run=run.parent_run,
        fork_iteration=run.fork_iteration, status=run.status,
        termination_reason=run.termination_reason or (view.finished.reason if view.finished is not None else None) or None,
        message=run.message, waiting=waiting_lines(view), fork=fork, total=total, since_fork=own,
    )
