"""The built-in `support` loop: answer a refund request from a policy kept in long-term memory.

The task is the customer's request (a cases file replaces it per case). The model looks the
policy up (`search_policy`), answers (`reply`) or hands the case to a person (`escalate`).

Observation turns each tool result into facts: the policy terms a search retrieved, and the
terms a reply stated (as key -> value in `memory.known`, which the engine then checks against
long-term memory, flagging a differing value in `memory.contradictions`).

Invariants:

- grounded_terms: every policy term the latest reply states (a return window, a fee, a refund
  method or time) is one the policy retrieved during this run gives, with that value. Violated,
  the reply is withdrawn from the state and a fact names the invented term and the retrieved
  value, so the next prompt re-grounds the model (remediation: custom).
- no_contradictions: no term of the latest reply contradicts long-term memory (a second line:
  it also holds when the search missed a term a person edited). Same remediation.
- resolvable: the model did not escalate; when it does, the run waits for a person with the
  escalation packet (exit 4 headless with --no-wait).

Converged: a reply was sent this iteration and survived the invariants (grounded, no
contradiction; an invariant a person relaxed does not withdraw it).

Offline, `scripted/support` answers from script.json: a search, a reply that invents a 90-day
return window (caught), then the right 30-day one. Its `match` steps answer the damaged-camera
request in cases.json by escalating.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from loopterm.core.budget import Budget
from loopterm.core.decision import Decision
from loopterm.core.gates import GateResult
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loop import DEFAULT_SYSTEM_PROMPT, Loop
from loopterm.core.state import LoopState, ToolRecord
from loopterm.core.text import one_line
from loopterm.examples.support.terms import TERM_KEYS, canonical, find_terms
from loopterm.examples.support.tools import (
    POLICY_PREFIX,
    escalate,
    parse_passages,
    reply,
    search_policy,
)

HERE = Path(__file__).resolve().parent

GOAL = """\
Refund request from Dana Reyes (order B-1042): "I bought a pair of hiking boots from you; they were \
delivered 12 days ago. I wore them once indoors and they pinch. Can I return them, what will it cost \
me, and how do I get my money back?\""""

SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT + """

You answer a customer's refund request for the store; the task is the request. Look the policy up
with search_policy before you answer. reply(text) sends your answer to the customer: state only the
policy terms (return window, fees, refund method, refund time) the retrieved policy gives, exactly as
it gives them; never invent one. If the policy cannot resolve the request (it falls outside the
policy or needs an exception), call escalate(reason) to hand the case to a person."""


class SupportState(LoopState):
    """What the support loop adds to the base state."""

    passages: dict[str, str] = Field(default_factory=dict)  # retrieved by search_policy this run: key -> text
    reply: str | None = None  # the latest reply sent, until a remediation withdraws it
    reply_iteration: int | None = None
    withdrawn: list[str] = Field(default_factory=list)  # "iteration 2: <reply>", for each withdrawn reply
    escalation: str | None = None  # the reason the model gave, when it escalated
    escalated_at: int | None = None


# ---------------------------------------------------------------- what was retrieved, what was said


def policy_terms(state: LoopState) -> dict[str, list[str]]:
    """The policy's terms as retrieved during this run: key -> the values it allows.

    Retrieved = recalled into working memory at the run's start, or found by search_policy.
    A term fact (return_window, ...) wins over the document's wording: it is how a person edits a
    term (`loopterm memory support add return_window "45 days"`). Decisions of earlier runs
    (case:*) are precedent, not policy: they ground nothing.
    """
    passages = {**parse_passages(state.memory.retrieved, tagged=False), **getattr(state, "passages", {})}
    from_documents: dict[str, list[str]] = {}
    facts: dict[str, list[str]] = {}
    for key, text in passages.items():
        if key in TERM_KEYS:
            facts[key] = [canonical(text)]
        elif key.startswith(POLICY_PREFIX):
            for term in find_terms(text):
                values = from_documents.setdefault(term.key, [])
                if term.value not in values:
                    values.append(term.value)
    return {**from_documents, **facts}


def ungrounded(state: LoopState, text: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(key, value stated, values the retrieved policy allows) for each term of the reply it lacks."""
    text = getattr(state, "reply", None) if text is None else text
    if not text:
        return []
    allowed = policy_terms(state)
    out = []
    for term in find_terms(text):
        if term.value not in allowed.get(term.key, []) and (term.key, term.value) not in [(k, v) for k, v, _ in out]:
            out.append((term.key, term.value, allowed.get(term.key, [])))
    return out


_SAYS = re.compile(r"long-term memory says (['\"])(?P<value>.*)\1$")


def reply_contradictions(state: LoopState) -> dict[str, str]:
    """key -> the long-term memory value, for each term of the latest reply the engine flagged."""
    if getattr(state, "reply", None) is None:
        return {}
    out: dict[str, str] = {}
    for key, value in state.memory.known.items():
        prefix = f"{key}: observed {value!r}, "
        for line in state.memory.contradictions:
            if line.startswith(prefix):
                m = _SAYS.search(line)
                out[key] = m.group("value") if m else line[len(prefix):]
    return out


def grounded_terms(state: LoopState) -> bool:
    return not ungrounded(state)


def no_contradictions(state: LoopState) -> bool:
    return not reply_contradictions(state)


def resolvable(state: LoopState) -> bool:
    return getattr(state, "escalated_at", None) != state.iteration


# ---------------------------------------------------------------- observation


def _add(facts: list[str], *new: str) -> list[str]:
    return [*facts, *(f for f in new if f not in facts)]


def unsent_if_ungrounded(state: LoopState, args: dict[str, Any]) -> str | None:
    """reply's precondition: an answer stating a term the retrieved policy does not give is never
    sent (an invariant after the call would be too late: the customer would have it)."""
    invented = ungrounded(state, str(args.get("text", "")))
    if not invented:
        return None
    said = ", ".join(f"{k} = {v}" for k, v, _ in invented)
    return f"not sent: it states {said}, which the policy retrieved in this run does not give"


def _refused_reply(record: ToolRecord) -> bool:
    return record.tool == "reply" and not record.ok and (record.error or "").startswith("refused before it ran")


def observe(state: LoopState, decision: Decision, record: ToolRecord | None, gates: list[GateResult]) -> LoopState:
    """Tool results -> facts in working memory (facts, not narratives); the reply's terms -> `known`.

    A reply its precondition refused still counts as what the model said: the invariants judge it
    (and withdraw it), though it never reached the customer."""
    if record is None or (not record.ok and not _refused_reply(record)):
        return state  # the engine's own fact says which tool failed and why
    facts = list(state.memory.facts)
    updates: dict[str, object] = {}
    memory: dict[str, object] = {}
    if record.tool == "search_policy":
        found = parse_passages(record.output)
        passages = {**state.passages, **found}  # type: ignore[attr-defined]
        updates["passages"] = passages
        terms = policy_terms(state.model_copy(update={"passages": passages}))
        facts = _add(facts, *(f"policy: {k} = {' or '.join(v)}" for k, v in terms.items()))
        if not found:
            facts = _add(facts, f"search_policy found nothing for {one_line(record.args.get('query', ''), 80)!r}")
    elif record.tool == "reply":
        text = str(record.args.get("text", ""))
        stated = find_terms(text)
        known: dict[str, str] = {}
        for term in stated:  # a key stated twice with two values keeps both ("30 days; 90 days")
            known[term.key] = term.value if term.key not in known or known[term.key] == term.value \
                else f"{known[term.key]}; {term.value}"
        memory["known"] = known
        updates.update(reply=text, reply_iteration=state.iteration)
        said = ", ".join(f"{k} = {v}" for k, v in known.items()) or "no policy terms"
        sent = "" if record.ok else " (not sent: refused before it ran)"
        facts = _add(facts, f"reply (iteration {state.iteration}) stated {said}{sent}")
    elif record.tool == "escalate":
        reason = str(record.args.get("reason", ""))
        updates.update(escalation=reason, escalated_at=state.iteration)
        facts = _add(facts, f"escalated to a person: {one_line(reason, 300)}")
    memory["facts"] = facts
    updates["memory"] = state.memory.model_copy(update=memory)
    return state.model_copy(update=updates)


# ---------------------------------------------------------------- remediation


def _withdraw(state: LoopState, lines: list[str]) -> LoopState:
    """Take the latest reply out of the state (its terms out of `known`) and add the re-grounding facts."""
    reply_text = getattr(state, "reply", None)
    updates: dict[str, object] = {}
    memory: dict[str, object] = {"facts": _add(list(state.memory.facts), *lines)}
    if reply_text is not None:
        n = getattr(state, "reply_iteration", None) or state.iteration
        updates.update(reply=None, reply_iteration=None,
                       withdrawn=[*state.withdrawn, f"iteration {n}: {one_line(reply_text, 600)}"])  # type: ignore[attr-defined]
        memory["known"] = {}
    updates["memory"] = state.memory.model_copy(update=memory)
    return state.model_copy(update=updates)


def reground(state: LoopState) -> LoopState:
    """The remediation of grounded_terms and no_contradictions: withdraw the latest reply and add a
    fact for each term it invented (with the value the policy gives) or that contradicts long-term
    memory, so the next prompt carries them. Applied once per reply (the second call finds none)."""
    text = getattr(state, "reply", None)
    if text is None:
        return state
    n = getattr(state, "reply_iteration", None) or state.iteration
    lines = []
    invented = ungrounded(state)
    for key, value, allowed in invented:
        if allowed:
            lines.append(f"withdrawn: the reply of iteration {n} stated {key} = {value}, which the retrieved policy "
                         f"does not give; the policy says {key} = {' or '.join(allowed)}: state only that")
        else:
            lines.append(f"withdrawn: the reply of iteration {n} stated {key} = {value}, but no retrieved policy passage "
                         f"gives a {key}: search_policy for it, or leave it out")
    for key, remembered in reply_contradictions(state).items():
        if key not in {k for k, _, _ in invented}:
            lines.append(f"withdrawn: the reply of iteration {n} stated {key} = {state.memory.known[key]}; long-term "
                         f"memory says {key} = {remembered}: state only that")
    return _withdraw(state, lines)


INVARIANTS = [
    Invariant(
        name="grounded_terms",
        check=grounded_terms,
        remediation=Remediation.CUSTOM,
        custom=reground,
        description="every policy term in the latest reply (a return window, a fee, a refund method or time) "
                    "is one the policy retrieved during this run gives, with that value",
    ),
    Invariant(
        name="no_contradictions",
        check=no_contradictions,
        remediation=Remediation.CUSTOM,
        custom=reground,
        description="no term of the latest reply contradicts long-term memory",
    ),
    Invariant(
        name="resolvable",
        check=resolvable,
        remediation=Remediation.ESCALATE,
        description="the policy resolves the request; escalate hands it to a person",
    ),
]


# ---------------------------------------------------------------- the loop's ends


def converged(state: LoopState, gates: list[GateResult]) -> bool:
    """A reply sent this iteration that survived the invariants (a violated one withdraws it)."""
    return getattr(state, "reply", None) is not None and getattr(state, "reply_iteration", None) == state.iteration


def case_key(request: str) -> str:
    return "case:" + hashlib.sha256(request.encode()).hexdigest()[:10]


def consolidate(state: LoopState, status: str) -> list[tuple[str, str, str]]:
    """What a finished case leaves for later runs: its decision, under a key for its request.

    Never the reply's terms as facts: a model's words must not become the policy.
    """
    if status == "converged" and getattr(state, "reply", None):
        value = f"answered (converged at iteration {state.iteration}): {one_line(state.reply, 800)}"  # type: ignore[attr-defined]
    elif status == "escalated" and getattr(state, "escalation", None):
        value = f"escalated to a person: {one_line(state.escalation, 800)}"  # type: ignore[attr-defined]
    else:
        return []
    return [(case_key(state.task), value, "decision")]


def context(state: LoopState) -> str:
    terms = policy_terms(state)
    lines = ["Policy terms retrieved this run: " + ("; ".join(f"{k} = {' or '.join(v)}" for k, v in terms.items())
                                                 if terms else "none yet (call search_policy)")]
    withdrawn = getattr(state, "withdrawn", [])
    if withdrawn:
        lines.append(f"Replies withdrawn (the facts say why): {len(withdrawn)}")
    return "\n".join(lines)


loop = Loop(
    name="support",
    goal=GOAL,
    description="answers a refund request from the refund policy in long-term memory; never invents a term",
    state=SupportState,
    tools=[search_policy, dataclasses.replace(reply, precondition=unsent_if_ungrounded), escalate],
    invariants=INVARIANTS,
    observe=observe,
    converged=converged,
    consolidate=consolidate,
    context=context,
    result=lambda state: getattr(state, "reply", None),
    system_prompt=SYSTEM_PROMPT,
    script=HERE / "script.json",
    max_iterations=6,
    recall=8,
    budget=Budget(usd=0.05, tokens=60_000),
)


def for_request(request: str) -> Loop:
    """The support loop on another customer request (what a case's `goal` does)."""
    return loop.model_copy(update={"goal": request})
