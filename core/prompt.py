"""The decision prompt: what the model sees each iteration, pruned to a token budget.

The task, the invariants and the reply format are never pruned; working memory,
recent tool output, the last gate failure and the project's rules are, oldest
and longest first. Facts, not narratives.

Laid out stable -> volatile, because providers cache a prompt's longest common
prefix with the previous call (core/prompt_cache.py). The system message holds
what a run never changes: the system text, the tools, the reply format, then the
invariants, the project rules and long-term memory, so a cache breakpoint at its
end covers all of it (Anthropic caches nothing under 1024 tokens: the system text
alone is often shorter). The user message opens with the task (a scripted model's
`match` reads the last message), then what changes rarely (relaxations), then
what changes every iteration, slowest first, the iteration number last.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from loopterm.core.decision import DECISION_FORMAT
from loopterm.core.loop import Loop
from loopterm.core.state import LoopState

RULES_FILE = Path(".loopterm") / "RULES.md"
RECENT_TOOL_RESULTS = 3


def approx_tokens(text: str) -> int:
    """A cheap upper-ish estimate (4 characters a token) for pruning decisions.

    The exact count for the budget check comes from litellm, once per call.
    """
    return len(text) // 4 + 1


_RULES_READ: dict[str, tuple[tuple[int, ...], str | None]] = {}  # path -> (its stat when read, the text)
_RULES_PATHS: dict[Path, str] = {}
_SETTLED_NS = 1_000_000_000


def read_rules(workdir: Path) -> str | None:
    """The project's rules, read again only when the file's stat changed (every iteration asks: opening
    it, or failing to, cost 7-15 us; a stat 2-4)."""
    path = _RULES_PATHS.get(workdir)
    if path is None:
        if len(_RULES_PATHS) > 64:
            _RULES_PATHS.clear()
        path = _RULES_PATHS[workdir] = os.path.join(workdir, RULES_FILE)
    try:
        info = os.stat(path)
    except OSError:
        return None
    key = (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_dev)
    known = _RULES_READ.get(path)
    if known is not None and known[0] == key:
        return known[1]
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read().strip() or None
    except OSError:
        return None
    # A file written in the last moments may be written again within the clock's granularity (a few ms)
    # with the same size: its stat would not tell, so it is read again until it is older (as git does).
    if time.time_ns() - info.st_mtime_ns > _SETTLED_NS:
        if len(_RULES_READ) > 64:
            _RULES_READ.clear()
        _RULES_READ[path] = (key, text)
    return text


# In tools mode the tools are the provider's functions (their schemas travel with the request, not here).
TOOL_CALL_FORMAT = (
    "Decide by calling exactly one of the functions you are given, and write no other text: a tool's "
    'function runs that tool (its own arguments go in "args"); {none} runs none. Every function also '
    'takes "subgoal" (what this step is for), "confidence" (0..1), "reasoning" (why) and "done" '
    "(true when you believe the task is complete)."
)


def system_message(loop: Loop, system_prompt: str | None = None, decision_mode: str = "text") -> str:
    """The system text: the loop's instructions, its tools, and how to reply in this decision mode
    (JSON text, or one native function call: core/decision_modes.py)."""
    if decision_mode == "tools":
        from loopterm.core.decision_modes import no_action_name

        none = no_action_name({t.name for t in loop.tools})
        # Names and descriptions only (the functions carry the argument schemas): a replay sees a changed one.
        lines = [system_prompt or loop.system_prompt, "", "Tools (each is a function):"]
        lines += [f"- {t.name}{' (side effects)' if t.side_effects else ''}: {t.description}" for t in loop.tools]
        lines.append(f"- {none}: run no tool now")
        return "\n".join([*lines, "", TOOL_CALL_FORMAT.format(none=none)])
    lines = [system_prompt or loop.system_prompt, "", "Tools:"]
    lines += [t.prompt_line() for t in loop.tools]
    if not loop.tools:
        lines.append("- (none: set action to null)")
    lines += ["", DECISION_FORMAT]
    return "\n".join(lines)


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


class _Sections:
    """The prunable parts of the user message, each shrinkable one step at a time."""

    def __init__(self, state: LoopState, rules: str | None, strategy_note: str | None) -> None:
        self.facts = list(state.memory.facts)
        self.retrieved = list(state.memory.retrieved)
        self.known = dict(state.memory.known)
        self.contradictions = list(state.memory.contradictions)
        self.tools = [r for r in state.tool_results[-RECENT_TOOL_RESULTS:]]
        self.tool_limit = 2_000
        self.gate = state.last_gate_failure
        self.gate_limit = 4_000
        self.rules = rules
        self.rules_limit = 4_000
        self.strategy_note = strategy_note

    def shrink(self) -> bool:
        """Remove the least useful piece; False when nothing prunable is left."""
        if len(self.tools) > 1:
            self.tools.pop(0)
        elif len(self.retrieved) > 2:
            self.retrieved.pop()
        elif len(self.facts) > 3:
            del self.facts[: max(1, len(self.facts) // 3)]
        elif self.tool_limit > 200:
            self.tool_limit //= 2
        elif self.rules and self.rules_limit > 200:
            self.rules_limit //= 2
        elif self.gate and self.gate_limit > 300:
            self.gate_limit //= 2
        elif self.facts:
            self.facts.pop(0)
        elif self.tools:
            self.tools.pop(0)
        elif self.rules:
            self.rules = None
        else:
            return False
        return True


def stable_sections(loop: Loop, s: _Sections) -> str:
    """What a run does not change (pruning aside): it follows the system text, before the cache breakpoint."""
    out = ["# Invariants (must hold every iteration)"]
    out += [f"- {inv.name}: {inv.description or 'see name'}" for inv in loop.invariants] or ["- (none)"]
    if s.rules:
        out.append(f"# Project rules ({RULES_FILE})\n{_tail(s.rules, s.rules_limit)}")
    if s.retrieved:  # recalled once, when the run starts
        out.append("# Long-term memory (from earlier runs of this loop)\n" + "\n".join(f"- {r}" for r in s.retrieved))
    return "\n\n".join(out)


def user_message(loop: Loop, state: LoopState, s: _Sections, relaxed: dict[str, str], max_iterations: int) -> str:
    """The task, then what changes during a run: a person's relaxations (rarely), then every iteration's,
    slowest first."""
    out = [f"# Task\n{state.task or loop.goal}"]
    notes = [f"- {inv.name}: relaxed by a person: {relaxed[inv.name]}" for inv in loop.invariants if inv.name in relaxed]
    if notes:
        out.append("# Relaxed invariants (a violation does not end the run)\n" + "\n".join(notes))
    if loop.context is not None:
        out.append(f"# Loop state\n{loop.context(state)}")
    mem = state.memory
    out.append("# Working memory")
    if s.facts:  # appended to: their start stays the same from one iteration to the next
        out.append("Facts:\n" + "\n".join(f"- {f}" for f in s.facts))
    if s.known:
        out.append("Observed:\n" + "\n".join(f"- {k} = {v}" for k, v in s.known.items()))
    if s.contradictions:
        out.append("Contradictions:\n" + "\n".join(f"- {c}" for c in s.contradictions))
    out.append(f"Current subgoal: {mem.subgoal or '(none yet)'}")  # the model restates it every reply
    if s.strategy_note:
        out.append(f"Strategy: {s.strategy_note}")
    if s.tools:
        out.append("# Recent tool results")
        for r in s.tools:
            body = r.output if r.ok else f"ERROR {r.error}"
            out.append(f"- iteration {r.iteration} {r.tool}: {_tail(body, s.tool_limit)}")
    out.append("# Last verification")
    if state.iteration == 0:
        out.append("Nothing has been verified yet.")
    elif s.gate:
        out.append(_tail(s.gate, s.gate_limit))
    else:
        out.append("All gates passed.")
    out.append(f"# Iteration\n{state.iteration + 1} of at most {max_iterations}")
    return "\n\n".join(out)


def build_messages(
    loop: Loop,
    state: LoopState,
    *,
    rules: str | None = None,
    relaxed: dict[str, str] | None = None,
    strategy_note: str | None = None,
    max_iterations: int | None = None,
    count: Callable[[str], int] = approx_tokens,
    system_prompt: str | None = None,
    token_budget: int | None = None,
    decision_mode: str = "text",
) -> list[dict[str, Any]]:
    """The messages for this iteration, pruned until they fit loop.prompt_token_budget.

    ``token_budget`` prunes to a smaller budget instead (the engine's second try when the
    model's context window refused the prompt); what is never pruned stays whatever the budget.
    """
    relaxed = relaxed or {}
    limit = max_iterations or loop.max_iterations
    budget = loop.prompt_token_budget if token_budget is None else token_budget
    head = system_message(loop, system_prompt, decision_mode)
    sections = _Sections(state, rules, strategy_note)

    def render() -> tuple[str, str]:
        return f"{head}\n\n{stable_sections(loop, sections)}", user_message(loop, state, sections, relaxed, limit)

    system, user = render()
    while count(system) + count(user) > budget and sections.shrink():
        system, user = render()
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def prompt_tokens(messages: list[dict[str, Any]], count: Callable[[str], int] = approx_tokens) -> int:
    """The rough size of a conversation, as the pruning counts it."""
    return sum(count(str(m.get("content") or "")) for m in messages)


def repair_messages(messages: list[dict[str, Any]], bad_reply: str, error: str,
                    tool_calls: list[dict[str, Any]] | None = None, decision_mode: str = "text") -> list[dict[str, Any]]:
    """The conversation for a repair attempt: the model sees its reply and what was wrong with it.

    In tools mode the reply's function calls are replayed as the provider expects a conversation to go
    on: the assistant message with its calls, a `tool` result for each (none was run), then the request.
    Call ids are renumbered (call_<turn>_<k>): the provider's are random, and a replay must send the same.
    """
    if decision_mode != "tools":
        return [
            *messages,
            {"role": "assistant", "content": bad_reply[:4_000]},
            {"role": "user", "content": f"Your reply was not a valid decision: {error}. Reply again with only the JSON object."},
        ]
    turn = sum(1 for m in messages if m.get("role") == "assistant") + 1
    calls = [{"id": f"call_{turn}_{k}", "type": "function",
              "function": {"name": c.get("name") or "", "arguments": c.get("arguments") or "{}"}}
             for k, c in enumerate(tool_calls or [], start=1)]
    said: dict[str, Any] = {"role": "assistant", "content": bad_reply[:4_000] or None}
    if calls:
        said["tool_calls"] = calls
    elif not said["content"]:
        said["content"] = "(no reply)"  # a provider refuses an empty assistant turn
    results = [{"role": "tool", "tool_call_id": c["id"], "content": f"not run: the decision was invalid ({error})"}
               for c in calls]
    ask = f"Your reply was not a valid decision: {error}. Call exactly one function."
    return [*messages, said, *results, {"role": "user", "content": ask}]
