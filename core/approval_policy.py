"""Approval policies: a person's standing answer to "this tool, with arguments like these", so a call that
matches is approved (or denied) without asking again.

A policy is made from the approval dialog (it rides on the answer: `Approve.policy` / `Deny.policy`), kept as
events in the log of the run it was made in (core/runlog.py: `PolicyAdded`, `PolicyRevoked`, and
`PolicyDecided` for each call it answered) and folded by core/fold.py (`policy_book`). Its scope is the rest
of that run, or the loop: every run of the same `loop_ref` in this database (store/policies.py finds those
runs' policy events). This module holds what a policy is and how a call is matched; pure, no I/O.

Matching: the tool name and one glob per argument (`fnmatch.fnmatchcase`: `*` also matches `/`, so
`src/*.py` matches `src/a/b.py`; case-sensitive on every platform). An argument's value is matched as text:
a string as it is, anything else as compact JSON with sorted keys. A policy matches a call when every one of
its globs matches (an argument it names that the call lacks: no match); arguments it does not name are free.
Deny policies win over approve policies; among equals, the oldest decides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import BaseModel, Field

MAX_GLOBS = 50
MAX_GLOB = 1_000
Effect = Literal["approve", "deny"]
Scope = Literal["run", "loop"]
SCOPES: dict[str, str] = {"run": "the rest of this run", "loop": "every run of this loop"}

_GLOB_SPECIAL = re.compile(r"([*?\[])")


class PolicyRule(BaseModel):
    """What a person asks for: approve (or deny) calls of `tool` whose arguments match `globs`, in `scope`."""

    effect: Effect
    scope: Scope
    tool: str = Field(min_length=1, max_length=200)
    globs: dict[str, str] = Field(default_factory=dict, max_length=MAX_GLOBS)
    reason: str = ""


class Policy(BaseModel):
    """A recorded policy, as the fold sees it: where it was made, whether it is revoked, what it decided."""

    id: str
    rule: PolicyRule
    run_id: str  # the run whose log records it
    loop_ref: str = ""
    iteration: int | None = None
    ts: float = 0.0
    revoked: bool = False
    revoke_reason: str = ""
    revoked_ts: float | None = None
    decided: list[tuple[str, int, str]] = Field(default_factory=list)  # (run id, iteration, tool) of each call

    @property
    def active(self) -> bool:
        return not self.revoked

    def applies_to(self, run_id: str) -> bool:
        """In force for a call of `run_id` (its scope; the caller asks only about runs of the same loop)."""
        return self.active and (self.rule.scope == "loop" or self.run_id == run_id)

    def describe(self) -> str:
        """One line: `approve write_file(path=src/*.py) for every run of this loop`."""
        globs = ", ".join(f"{name}={glob}" for name, glob in self.rule.globs.items()) or "any arguments"
        return f"{self.rule.effect} {self.rule.tool}({globs}) for {SCOPES[self.rule.scope]}"


def arg_text(value: Any) -> str:
    """An argument's value as the text its glob is matched against."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def literal_glob(value: Any) -> str:
    """A glob that matches exactly this value (glob characters in it escaped: `[*]`)."""
    return _GLOB_SPECIAL.sub(r"[\1]", arg_text(value))


def prefill(args: dict[str, Any]) -> dict[str, str]:
    """The globs a policy made from this call starts with: each argument exactly (a person widens them)."""
    return {name: literal_glob(value) for name, value in args.items()}


def globs_text(globs: dict[str, str]) -> str:
    """Globs as a person edits them: one `name=glob` a line."""
    return "\n".join(f"{name}={glob}" for name, glob in globs.items())


def parse_globs(text: str, args: dict[str, Any] | None = None) -> dict[str, str]:
    """`name=glob` lines back into globs; ValueError (one line: which line, what to write) when one is wrong.
    With `args`, a name the call does not have is refused (a typo would make a policy that never matches)."""
    globs: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, glob = line.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"globs line {number} is not name=glob (e.g. path=src/*.py)")
        if name in globs:
            raise ValueError(f"globs line {number}: argument {name!r} has a glob already")
        if args is not None and name not in args:
            known = ", ".join(args) or "none"
            raise ValueError(f"globs line {number}: this call has no argument {name!r} (its arguments: {known})")
        if len(glob) > MAX_GLOB:
            raise ValueError(f"globs line {number}: a glob of over {MAX_GLOB} characters")
        globs[name] = glob
    if len(globs) > MAX_GLOBS:
        raise ValueError(f"more than {MAX_GLOBS} globs")
    return globs


def matches(rule: PolicyRule, tool: str, args: dict[str, Any]) -> bool:
    """Whether the rule covers this call: its tool, and every glob matching its argument."""
    if rule.tool != tool:
        return False
    return all(name in args and fnmatchcase(arg_text(args[name]), glob) for name, glob in rule.globs.items())


def decide(policies: Iterable[Policy], run_id: str, tool: str, args: dict[str, Any]) -> Policy | None:
    """The policy that answers a call of `run_id` (deny wins over approve; the oldest among equals), or None:
    ask a person."""
    found = [p for p in policies if p.applies_to(run_id) and matches(p.rule, tool, args)]
    found.sort(key=lambda p: (p.rule.effect != "deny", p.ts, p.id))
    return found[0] if found else None
