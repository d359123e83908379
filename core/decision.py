"""The model's structured output, validated against a schema.

Model output is untrusted text: `parse_decision` never raises on bad input, it
returns the validation error so the engine can run a bounded repair attempt
that shows the model what was wrong.
"""

from __future__ import annotations

import json
import math
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


# Untrusted JSON (a model's reply, a person's state edit or --set patch) is kept to what the store
# can write and read back, and the screen can show: nesting well below the depth pydantic refuses to
# serialize (about 250 levels, with the state's own levels on top), finite numbers (JSON has no NaN
# or Infinity; serialized, they silently become null), integers within 64 bits (the store's JSON
# reader, orjson, reads a larger one back as a float, silently), and valid Unicode (an unpaired
# surrogate, which JSON's \ud800 escape can produce, cannot be encoded as UTF-8, so SQLite refuses it).
MAX_JSON_DEPTH = 100  # a decision, a --set value
MAX_STATE_DEPTH = 2 * MAX_JSON_DEPTH  # a whole state (it holds decisions' arguments a few levels down)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _where(path: list[str]) -> str:
    shown = "".join(path).lstrip(".") or "the top level"
    return shown if len(shown) <= 80 else shown[:79] + "…"


def _key(key: object) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"[{key}]"
    text = str(key)
    return f".{text}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,40}", text) else f"[{short_repr(text, 40)}]"


def json_path(loc: Any) -> str:
    """A validation error's location as one safe line: `action.args["\\x1b[2J"][0]`. Its keys come from
    untrusted JSON (a model's extra argument, a person's extra field): quoted, escapes visible, cut short."""
    return _where([_key(part) for part in loc]) if loc else ""


def short_repr(value: str, limit: int = 80) -> str:
    """repr() of untrusted text, cut to about `limit` characters: quoted, escapes visible, one line."""
    if len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value):,} characters)"
    return repr(value)


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """What would keep this JSON-like value from being stored, loaded and shown as it is; None if nothing.

    One line naming the place (e.g. "NaN at action.args.x ..."). Walks the value without recursion,
    so a hostile depth costs no stack; the place is spelled out only for a problem (every reply is
    walked: spelling each key's path cost most of the walk).
    """
    stack: list[tuple[Any, int, Any]] = [(value, 0, None)]  # (node, depth, (its parent's place, its key))
    while stack:
        node, depth, place = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return (f"{node!r} at {_place(place)}: JSON has no NaN or Infinity (stored, it would silently "
                        "become null); use a number or null")
        elif isinstance(node, int) and not isinstance(node, bool):
            if not -(2**63) <= node < 2**63:
                return (f"an integer beyond 64 bits at {_place(place)}: it would not be read back exactly (nor fit "
                        "SQLite or JavaScript); write it as a string")
        elif isinstance(node, str):
            found = None if node.isascii() else _SURROGATE.search(node)
            if found:
                return (f"an unpaired surrogate {found.group()!r} at {_place(place)}: not valid Unicode (it cannot be "
                        "stored as UTF-8)")
        elif isinstance(node, (dict, list, tuple)):
            if depth >= max_depth:
                return f"nesting deeper than {max_depth} levels at {_place(place)}"
            if isinstance(node, dict):
                for key, item in node.items():
                    if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                        return (f"an unpaired surrogate in a key at {_place(place)}: not valid Unicode (it cannot "
                                "be stored as UTF-8)")
                    stack.append((item, depth + 1, (place, key)))
            else:
                stack.extend((item, depth + 1, (place, i)) for i, item in enumerate(node))
    return None


_LEAVES = frozenset({str, int, bool, float, type(None), dict, list})


def surely_storable(value: Any, max_depth: int) -> bool:
    """True when `json_problem(value, max_depth)` would find nothing, decided a whole level of the tree at a
    time at C speed (a state of 5,000 strings: 10.2 -> 0.6 ms; of 200 records of 5 fields: 0.3 -> 0.18 ms,
    where a container at a time took 0.46); False means "not known": json_problem then says what.

    Plain JSON types only; a float must be finite, an integer within 64 bits, a string (or key) without
    a surrogate, no container at max_depth or below."""
    if type(value) is not dict and type(value) is not list:
        return False
    level: list[Any] = [value]
    texts: list[str] = []
    for _ in range(max_depth):  # `level`: every container at this depth, each a dict or a list
        dicts = [node for node in level if type(node) is dict]
        try:
            texts.append("".join([key for node in dicts for key in node]))  # refuses a key that is not text
        except TypeError:
            return False
        items = [item for node in dicts for item in node.values()]
        if len(dicts) < len(level):
            items.extend([item for node in level if type(node) is list for item in node])
        kinds = set(map(type, items))
        if not kinds <= _LEAVES:
            return False
        if float in kinds and not all(map(math.isfinite, [x for x in items if type(x) is float])):
            return False
        if int in kinds:
            ints = [x for x in items if type(x) is int]
            if min(ints) < -(2**63) or max(ints) >= 2**63:
                return False
        if str in kinds:
            texts.extend([x for x in items if type(x) is str])
        if dict not in kinds and list not in kinds:
            break
        level = [x for x in items if type(x) is dict or type(x) is list]
    else:
        return False  # a container at max_depth
    text = "".join(texts)
    try:  # a surrogate is what UTF-8 cannot encode; ASCII text (flagged by CPython) cannot hold one
        text.isascii() or text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _place(place: Any) -> str:
    """json_problem's place, spelled out: `_where` of the keys from the top (an index is an int: `[3]`)."""
    keys = []
    while place is not None:
        place, key = place
        keys.append(_key(key))
    return _where(keys[::-1])


def unreadable_json(exc: BaseException) -> str:
    """Why json.loads gave up, beyond a JSONDecodeError: too deep to read, or a number too long to convert."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    if "digits" in str(exc):  # Python refuses to read an integer of more than 4,300 digits
        return "a number of more than 4,300 digits"
    return " ".join(str(exc).split())[:200]


class DuplicateKey(ValueError):
    """A JSON object with one key twice: json.loads would keep the last silently (a second "action")."""


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"the key {short_repr(key, 40)} appears twice in one object; write each key once")
        out[key] = value
    return out


def load_json(text: str) -> Any:
    """json.loads of a model's text, refusing a key given twice (DuplicateKey) rather than keeping one."""
    return json.loads(text, object_pairs_hook=_once)


def parse_decision(text: str, tool_names: set[str] | None = None) -> Decision:
    """Parse a model reply into a Decision or raise DecisionError with a readable reason (one line)."""
    if not isinstance(text, str) or not text.strip():
        raise DecisionError("the reply was empty; a JSON object was expected")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        raw = load_json(body)
    except DuplicateKey as exc:
        raise DecisionError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise DecisionError(f"the reply is not valid JSON (JSONDecodeError: {exc.msg} at line {exc.lineno} column "
                            f"{exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise DecisionError(f"the reply is not valid JSON ({unreadable_json(exc)})") from None
    if not isinstance(raw, dict):
        raise DecisionError(f"the reply is JSON but not an object (got {type(raw).__name__})")
    return decision_from(raw, tool_names)


DECISION_KEYS = ("action", "subgoal", "confidence", "reasoning", "done")
ACTION_KEYS = ("tool", "args")
# Keys a model uses for a tool call in other protocols (OpenAI's, Anthropic's, its own guess): read
# silently they would be "no action", so each gets a repair that says where the call belongs.
_CALL_KEYS = frozenset({"tool", "tool_name", "name", "function", "arguments", "args", "parameters", "input",
                        "tool_call", "tool_calls", "tool_use", "call"})
_ARGS_KEYS = frozenset({"arguments", "parameters", "input", "params", "kwargs"})


def unknown_keys(raw: dict[str, Any]) -> str | None:
    """What is wrong with a reply's keys (one line), or None: a key the decision does not have is never
    dropped silently; a tool call written in another protocol's shape is told where it belongs."""
    for key in raw:
        if key not in DECISION_KEYS:
            name = short_repr(str(key), 40)
            if key in _CALL_KEYS:
                return (f"unknown key {name} at the top level: put the call in "
                        '"action": {"tool": ..., "args": {...}}')
            return f"unknown key {name} at the top level; a decision has only {', '.join(DECISION_KEYS)}"
    action = raw.get("action")
    if isinstance(action, dict):
        for key in action:
            if key not in ACTION_KEYS:
                name = short_repr(str(key), 40)
                if key in _ARGS_KEYS:
                    return f'unknown key {name} in "action": the arguments go in "args": {{...}}'
                return f'unknown key {name} in "action"; an action has only "tool" and "args"'
    return None


def decision_from(raw: dict[str, Any], tool_names: set[str] | None = None) -> Decision:
    """A decision from a reply's JSON object (text, a JSON-schema reply or a native tool call's
    fields), or DecisionError saying exactly what was wrong."""
    problem = json_problem(raw)
    if problem:
        raise DecisionError(f"the reply cannot be used: {problem}")
    problem = unknown_keys(raw)
    if problem:
        raise DecisionError(problem)
    try:
        decision = Decision.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{json_path(err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:5])
        raise DecisionError(f"the reply does not match the decision schema: {problems}") from None
    if decision.action is not None and tool_names is not None and decision.action.tool not in tool_names:
        raise DecisionError(
            f"unknown tool {short_repr(decision.action.tool)}; available tools: {', '.join(sorted(tool_names)) or 'none'}"
        )
    return decision
