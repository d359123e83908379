"""Shadow mode: the loop proposes every action, a person decides what should happen, nothing runs.

A shadow run is an ordinary run in the store with a `ShadowMode` event (`RunView.shadow`); resuming it, branching from
it or replaying it stays in shadow mode (the event is read back from the run's own history, and a
branch or a replay of a shadow run gets one too). Every tool call the model proposes goes to a person
like an approval (the same `approval_pending` event, `approve` / `deny` commands and screens), and
whatever the answer, the tool is never called: the record the model sees says so and what the person
decided. Each answer is a `shadow_verdict` event; `agreement` folds them into per-tool figures for
`loopterm eval LOOP --shadow`.

Verdicts: "agree" (approved as proposed), "edit" (approved with other arguments: what should have
happened instead), "deny" (it should not happen, with the reason). Gates do not run in a shadow run
(they check a workspace nothing changed, and a model checker would judge a call that never ran) and
a shadow run never converges: it ends at its iteration cap, on a stall, a budget, or when a person
stops it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Callable, Literal, Protocol

from loopterm.core.control import Approve, Deny
from loopterm.core.fold import RunView
from loopterm.core.runlog import RunEvent, ShadowMode, ShadowVerdict
from loopterm.core.state import ToolRecord

NOT_EXECUTED = "not executed (shadow mode: nothing runs)"
REPORT_VERSION = 1

Verdict = Literal["agree", "edit", "deny"]


class EventLog(Protocol):
    def append_event(self, run_id: str, event: RunEvent, iteration: int | None = None) -> Any: ...


def mark_shadow(log: EventLog, run_id: str, why: str = "started with --shadow") -> None:
    log.append_event(run_id, ShadowMode(why=why))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def judge(key: str, tool: Any, args: dict[str, Any], answer: Approve | Deny,
          find_tool: Callable[[str], Any] | None = None) -> ShadowVerdict:
    """A person's answer to a proposal as a verdict. Edited arguments equal to the proposal (once the
    tool's own validation has normalized them) are an agreement; another tool, or arguments that do not
    fit the tool, still say the person would have done something else: an edit, kept as given.
    The verdict counts for the proposed tool (it is the loop's proposal that is judged)."""
    if isinstance(answer, Deny):
        return ShadowVerdict(key=key, tool=tool.name, args=args, verdict="deny", reason=answer.reason)
    other = answer.tool if answer.tool not in (None, tool.name) else None
    if answer.args is None and other is None:
        return ShadowVerdict(key=key, tool=tool.name, args=args, verdict="agree", reason=answer.reason)
    person, error = answer.args if answer.args is not None else args, None
    instead = tool if other is None else (find_tool(other) if find_tool is not None else None)
    if instead is None:
        error = f"no tool {other!r} in this loop"
    else:
        try:
            person = instead.validate_args(person)
        except ValueError as exc:
            error = " ".join(str(exc).split())[:500]
    if other is None and error is None and _same(person, args):
        return ShadowVerdict(key=key, tool=tool.name, args=args, verdict="agree", reason=answer.reason)
    return ShadowVerdict(key=key, tool=tool.name, args=args, verdict="edit", person_args=person,
                         person_tool=other, reason=answer.reason, args_error=error)


def tool_record(n: int, verdict: ShadowVerdict) -> ToolRecord:
    """What the model sees of its proposal: nothing ran, and what the person decided (so it can go on)."""
    if verdict.verdict == "agree":
        said = "a person agreed this call is the right next step"
    elif verdict.verdict == "edit" and verdict.person_tool is not None:
        said = (f"a person would have called tool {verdict.person_tool!r} instead, with these arguments: "
                f"{json.dumps(verdict.person_args)}")
    elif verdict.verdict == "edit":
        said = f"a person would have called it with these arguments instead: {json.dumps(verdict.person_args)}"
    else:
        said = "a person would not have made this call"
    if verdict.reason:
        said += f" ({verdict.reason})"
    return ToolRecord(iteration=n, tool=verdict.tool, args=verdict.args, ok=False, error=f"{NOT_EXECUTED}; {said}")


def verdicts(view: RunView) -> list[ShadowVerdict]:
    """The verdicts in a run's log, one per proposal (a verdict recorded twice, by an iteration
    redone after a crash, counts once: the last one)."""
    return [verdict for _, verdict in view.verdicts.values()]


def _rate(agreed: int, proposals: int) -> float | None:
    return round(agreed / proposals, 6) if proposals else None


def _row(counts: dict[str, int]) -> dict[str, Any]:
    proposals = counts["agree"] + counts["edit"] + counts["deny"]
    return {"proposals": proposals, "agreed": counts["agree"], "edited": counts["edit"], "denied": counts["deny"],
            "agreement_rate": _rate(counts["agree"], proposals)}


def agreement(found: Iterable[ShadowVerdict]) -> dict[str, Any]:
    """Per tool (sorted by name) and in total: proposals, agreed, edited, denied, agreement rate
    (agreed / proposals; None for no proposals)."""
    per_tool: dict[str, dict[str, int]] = {}
    total = {"agree": 0, "edit": 0, "deny": 0}
    for verdict in found:
        per_tool.setdefault(verdict.tool, {"agree": 0, "edit": 0, "deny": 0})[verdict.verdict] += 1
        total[verdict.verdict] += 1
    return {"tools": [{"tool": name, **_row(per_tool[name])} for name in sorted(per_tool)], "totals": _row(total)}
