"""The model's structured output, validated against a schema.

Model output is untrusted text: `parse_decision` never raises on bad input, it
returns the validation error so the engine can run a bounded repair attempt
that shows the model what was wrong.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field, ValidationError


class Action(BaseModel):
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)


class Decision(BaseModel):
    action: Action | None = None
    subgoal: str = ""
    confidence: float = Field(ge=0.0, le=1.0)
    reasoning: str = ""
    done: bool = False  # a claim only; never sufficient for convergence


DECISION_FORMAT = (
    "Reply with one JSON object and nothing else:\n"
    '{"action": {"tool": "<tool name>", "args": {...}} or null, '
    '"subgoal": "<what this step is for>", "confidence": <0..1>, '
    '"reasoning": "<why>", "done": <true|false>}'
)

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class DecisionError(ValueError):
    """A reply that is not a valid decision; `str()` is what the model is shown."""


def parse_decision(text: str, tool_names: set[str] | None = None) -> Decision:
    """Parse a model reply into a Decision or raise DecisionError with a readable reason."""
    if not isinstance(text, str) or not text.strip():
        raise DecisionError("the reply was empty; a JSON object was expected")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DecisionError(f"the reply is not valid JSON ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    if not isinstance(raw, dict):
        raise DecisionError(f"the reply is JSON but not an object (got {type(raw).__name__})")
    try:
        decision = Decision.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise DecisionError(f"the reply does not match the decision schema: {problems}") from None
    if decision.action is not None and tool_names is not None and decision.action.tool not in tool_names:
        raise DecisionError(
            f"unknown tool {decision.action.tool!r}; available tools: {', '.join(sorted(tool_names)) or 'none'}"
        )
    return decision
