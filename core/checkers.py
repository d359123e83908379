"""Model checkers: verification gates whose verdict comes from another model or prompt profile.

The maker never validates itself: a checker is a `Role` with its own system
prompt (and, optionally, its own model), shown the task, the maker's proposal,
the tool's result and the earlier gates' output, and asked for a verdict:

    {"verdict": "pass" | "fail", "reason": "...", "findings": [{"severity": "critical", "message": "..."}]}

A reply that is not such a verdict fails the gate (with the reason), never the
run. Command gates stay the judges of code; checkers judge what commands cannot
(a critic pass over a final answer, a judge between a proposal and its critique).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loopterm.core.decision import Decision
from loopterm.core.gates import GateResult
from loopterm.core.roles import Role
from loopterm.core.state import LoopState, ToolRecord

VERDICT_FORMAT = (
    "Reply with one JSON object and nothing else:\n"
    '{"verdict": "pass" or "fail", "reason": "<one or two sentences>", '
    '"findings": [{"severity": "critical" | "major" | "minor", "message": "<what and where>"}]}'
)

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class Finding(BaseModel):
    severity: Literal["critical", "major", "minor"] = "minor"
    message: str = ""


class Verdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    verdict: Literal["pass", "fail"]
    reason: str = ""
    findings: list[Finding] = Field(default_factory=list)


def parse_verdict(text: str) -> Verdict:
    """The checker's reply as a Verdict; ValueError (with what is wrong) otherwise."""
    body = (text or "").strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        return Verdict.model_validate(json.loads(body))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON ({str(exc)[:120]})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, err['loc'])) or 'reply'}: {err['msg']}") from None


@dataclass
class Asked:
    """One checker call's reply text and what it cost."""

    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    model: str = ""
    tokens_cached: int = 0


# The engine's way to call a role's model: budget-checked, counted in the iteration's spend.
Ask = Callable[[Role, list[dict[str, Any]]], Awaitable[Asked]]


@dataclass
class GateContext:
    """What a gate may look at: the workspace, and for a checker the iteration so far."""

    workspace: Path
    iteration: int
    task: str = ""
    state: LoopState | None = None  # the state before this iteration is folded in
    decision: Decision | None = None
    tool_record: ToolRecord | None = None
    earlier: list[GateResult] = field(default_factory=list)  # this iteration's gates so far
    ask: Ask | None = None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def preflight_roles(gates: list[Any], run_model: str) -> None:
    """Refuse a run whose checkers cannot make their calls (one ConfigError line), before it starts."""
    from loopterm.core.errors import ConfigError
    from loopterm.core.model import check_model

    for gate in gates:
        if isinstance(gate, ModelGate):
            model = gate.role.model_for(run_model)
            try:
                check_model(model)
            except ConfigError as exc:
                hint = (f"; add a \"roles\": {{\"{gate.role.name}\": {{\"turns\": [...]}}}} section to the loop's script"
                        if model.startswith("scripted/") and gate.role.model is None else "")
                raise ConfigError(f"gate {gate.name!r} (role {gate.role.name!r}): {exc}{hint}") from None


class ModelGate(BaseModel):
    """A verification gate answered by a role's model.

    when="final": run only when every other gate of the iteration passed (a
    reflexive loop's critic pass over what would otherwise converge).
    advisory=True: its findings reach the later gates and the next prompt, but
    it never fails the iteration (a critic whose word a judge weighs).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    instructions: str = Field(min_length=1)
    when: Literal["always", "final"] = "always"
    advisory: bool = False
    max_output_tokens: int = Field(default=512, ge=16)
    kind: Literal["model"] = "model"

    def messages(self, ctx: GateContext) -> list[dict[str, Any]]:
        parts = [f"# Task\n{ctx.task}", f"# What to check\n{self.instructions}"]
        if ctx.decision is not None:
            d = ctx.decision
            action = "none" if d.action is None else f"{d.action.tool}({json.dumps(d.action.args, ensure_ascii=False)})"
            parts.append(
                f"# The proposal (iteration {ctx.iteration})\nSubgoal: {d.subgoal}\nReasoning: {d.reasoning}\n"
                f"Action: {_clip(action, 6_000)}"
            )
        if ctx.tool_record is not None:
            r = ctx.tool_record
            body = r.output if r.ok else f"ERROR {r.error}"
            parts.append(f"# Tool result\n{_clip(body, 3_000)}")
        for g in ctx.earlier:
            detail = g.stdout.strip() or g.stderr.strip() or (g.error or "")
            parts.append(f"# Gate {g.name}: {'passed' if g.passed else 'failed'}\n{_clip(detail, 2_000)}")
        return [
            {"role": "system", "content": f"{self.role.system_prompt}\n\n{VERDICT_FORMAT}"},
            {"role": "user", "content": "\n\n".join(parts)},
        ]

    async def check(self, ctx: GateContext) -> GateResult:
        if ctx.ask is None:
            return GateResult(name=self.name, passed=False, error="no model access for a model checker")
        started = time.monotonic()
        asked = await ctx.ask(self.role, self.messages(ctx))
        spend = {"tokens_in": asked.tokens_in, "tokens_out": asked.tokens_out, "cost_usd": asked.cost_usd,
                 "tokens_cached": asked.tokens_cached, "model": asked.model, "duration_s": round(time.monotonic() - started, 3)}  # a trace's gate span needs it
        try:
            verdict = parse_verdict(asked.text)
        except ValueError as exc:
            return GateResult(name=self.name, passed=self.advisory, stdout=asked.text[:4_000],
                              error=f"{self.role.name}'s reply was not a verdict: {exc}", **spend)
        lines = [f"{self.role.name}: {verdict.verdict}: {verdict.reason}"]
        lines += [f"- [{f.severity}] {f.message}" for f in verdict.findings]
        return GateResult(
            name=self.name, passed=self.advisory or verdict.verdict == "pass", stdout="\n".join(lines),
            findings=[f.model_dump() for f in verdict.findings], **spend,
        )
