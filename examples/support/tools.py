"""The support loop's tools: look the policy up, answer the customer, hand the case to a person.

The refund policy lives in the loop's long-term memory (`loopterm memory support list`): the
whole document under `policy:refunds` and its key terms as facts (`return_window` = "30 days",
...). The first `search_policy` of a store with no policy seeds it from policy.md; a term a
person edited (`loopterm memory support add return_window "45 days"`) is never overwritten.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loopterm.core.text import one_line
from loopterm.core.tools import ToolContext, tool
from loopterm.examples.support.terms import TERM_KEYS, extract_terms

POLICY_FILE = Path(__file__).resolve().parent / "policy.md"
POLICY_KEY = "policy:refunds"
POLICY_PREFIX = "policy:"  # documents under policy:* are policy text; term facts are TERM_KEYS
SEARCH_LIMIT = 8
PASSAGE_CHARS = 4_000  # of one passage, in the tool's output
# One passage a line, as the tool writes it ("[fact] return_window: 30 days") or as the engine
# lists what it recalled at a run's start ("return_window: 30 days").
# A key may hold ':' ("policy:refunds"), never ': '.
_TAGGED = re.compile(r"^\[(?:fact|decision|document)\] (?P<key>\S.*?): (?P<value>.*)$")
_PLAIN = re.compile(r"^(?P<key>\S.*?): (?P<value>.*)$")


def ensure_policy(memory: Any, loop: str) -> list[str]:
    """Seed what the loop's memory lacks of the policy; returns the keys it added.

    The document comes from policy.md when memory has none; each of its key terms becomes a fact
    unless memory already holds that key (a person's edit wins, and is never overwritten).
    """
    held = {item.key: item.value for item in memory.memories(loop)}
    added: list[str] = []
    document = held.get(POLICY_KEY)
    if document is None:
        document = POLICY_FILE.read_text(encoding="utf-8")
        memory.remember(loop, POLICY_KEY, document, kind="document")
        added.append(POLICY_KEY)
    for key, value in extract_terms(document).items():
        if key not in held:
            memory.remember(loop, key, value, kind="fact")
            added.append(key)
    return added


def parse_passages(lines: list[str] | str, tagged: bool = True) -> dict[str, str]:
    """key -> text of the passages in a search_policy output (tagged "[kind] key: text" lines), or
    in working memory's `retrieved` (tagged=False: "key: text", as the engine recalled them)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    pattern = _TAGGED if tagged else _PLAIN
    out: dict[str, str] = {}
    for line in lines:
        m = pattern.match(line.strip())
        if m is not None:
            out[m.group("key").strip()] = m.group("value")
    return out


# It writes long-term memory when it seeds the policy (idempotent: only what is missing). A replay or
# a branch answers it from the recorded run (what that run saw); a new run searches today's memory.
@tool(side_effects=True, idempotent=True, on_rewind="reuse")
def search_policy(ctx: ToolContext, query: str) -> str:
    """Search the refund policy and its key terms (long-term memory); one passage a line."""
    if ctx.memory is None:
        raise RuntimeError("this run has no long-term memory (the store keeps it); run it with `loopterm run`")
    seeded = ensure_policy(ctx.memory, ctx.loop)
    items = ctx.memory.recall(ctx.loop, query, limit=SEARCH_LIMIT)
    lines = []
    if seeded:
        lines.append(f"(long-term memory had no policy yet: seeded {', '.join(seeded)} from policy.md)")
    if not items:
        lines.append(f"no passage matches {one_line(query, 200)!r}; search with other words (return, fee, refund)")
    else:
        lines.append(f"{len(items)} passage(s) for {one_line(query, 200)!r}, best first:")
        lines += [f"[{item.kind}] {item.key}: {one_line(item.value, PASSAGE_CHARS)}" for item in items]
    return "\n".join(lines)


@tool(side_effects=True)
def reply(ctx: ToolContext, text: str) -> str:
    """Send your answer to the customer (state only policy terms the retrieved policy gives)."""
    if not text.strip():
        raise ValueError("the reply is empty; write the answer to the customer")
    # Offline, the customer's channel is the run's outbox: one file per reply sent.
    outbox = ctx.workspace / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    name = f"reply-{ctx.iteration}.txt"
    (outbox / name).write_text(text, encoding="utf-8")
    return f"sent to the customer ({len(text)} characters, outbox/{name})"


@tool
def escalate(ctx: ToolContext, reason: str) -> str:
    """Hand the case to a person, saying why the policy cannot resolve it."""
    if not reason.strip():
        raise ValueError("say why the case needs a person")
    return f"handed to a person: {one_line(reason, 500)}"


__all__ = ["POLICY_FILE", "POLICY_KEY", "TERM_KEYS", "ensure_policy", "escalate", "parse_passages", "reply",
           "search_policy"]
