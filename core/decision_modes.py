"""How a decision is asked for and read back: as the provider's own tool call, a JSON-schema reply or JSON text.

Providers follow their native tool calling (and JSON-schema replies) more reliably than a format
described in the prompt, so a model that litellm says supports them is asked that way:

- "tools": one function per loop tool (its arguments under "args", beside the decision's subgoal,
  confidence, reasoning and done) plus a "no action" function; the model must call exactly one.
- "json_schema": the reply is JSON text constrained by `response_format` to the decision's schema.
- "text": the JSON text the system prompt describes (DECISION_FORMAT), for every other model.

A tool-call reply is stored as canonical JSON text (`{"tool_calls": [{"name", "arguments"}]}`, no call
ids, which differ per call), so `show`, replay and the offline providers can reproduce it exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Callable, Literal

from loopterm.core.decision import (
    DECISION_KEYS,
    Decision,
    DecisionError,
    DuplicateKey,
    decision_from,
    load_json,
    parse_decision,
    short_repr,
)

Mode = Literal["tools", "json_schema", "text"]
MODES: tuple[str, ...] = ("tools", "json_schema", "text")
NO_ACTION = "no_action"  # the function a model calls when no tool should run now
_SURROGATE = re.compile("[\ud800-\udfff]")

# An offline provider (replay/) that must answer in a recorded mode says which: (name after the
# prefix, iteration) -> the mode, or None to choose as usual. Registered by core/recording.py.
ModeSource = Callable[[str, int], "str | None"]
_MODE_SOURCES: dict[str, ModeSource] = {}


def register_mode_source(prefix: str, source: ModeSource) -> None:
    _MODE_SOURCES[prefix] = source


# What providers accept as a function's name (OpenAI's rule; Anthropic's is as strict or looser).
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@lru_cache(maxsize=256)
def _supports(model: str, ask: str) -> bool:
    from loopterm.core.model import _litellm

    try:
        return bool(getattr(_litellm(), ask)(model=model))
    except Exception:  # noqa: BLE001 - a model litellm does not know supports neither
        return False


def supported_mode(model: str, tool_names: Iterable[str] = ()) -> Mode:
    """The best mode litellm says `model` supports (its local model map: cheap, offline). Tools mode
    needs every tool's name to be a valid function name (an MCP tool's may not be)."""
    if _supports(model, "supports_function_calling") and all(_FUNCTION_NAME.fullmatch(n) for n in tool_names):
        return "tools"
    if _supports(model, "supports_response_schema"):
        return "json_schema"
    return "text"


def choose_mode(model: str, requested: str, iteration: int = 1, tool_names: Iterable[str] = ()) -> Mode:
    """The mode of this iteration's decision: a recording's (a replay reproduces it), else the loop's
    choice, else (auto) what litellm says the model supports."""
    prefix, slash, name = model.partition("/")
    source = _MODE_SOURCES.get(prefix) if slash else None
    recorded = source(name, iteration) if source is not None else None
    if recorded in MODES:
        return recorded  # type: ignore[return-value]
    if requested in MODES:
        return requested  # type: ignore[return-value]
    return supported_mode(model, tool_names)


def no_action_name(tool_names: set[str]) -> str:
    """The "no action" function's name, never one of the loop's own tools."""
    name = NO_ACTION
    while name in tool_names:
        name += "_"
    return name


# ----------------------------------------------------------------------------- the request

_DECISION_FIELDS: dict[str, Any] = {
    "subgoal": {"type": "string", "description": "what this step is for"},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1, "description": "0..1"},
    "reasoning": {"type": "string", "description": "why this step"},
    "done": {"type": "boolean", "description": "whether you believe the task is complete (gates decide)"},
}


def _function(name: str, description: str, args: dict[str, Any] | None) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required = ["confidence"]
    if args is not None:
        properties["args"] = args
        required.insert(0, "args")
    properties.update(_DECISION_FIELDS)
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def tool_functions(tools: list[Any]) -> list[dict[str, Any]]:
    """One function per loop tool (its JSON schema under "args") and the "no action" function."""
    out = []
    for tool in tools:
        effects = " (side effects)" if tool.side_effects else ""
        out.append(_function(tool.name, f"{tool.description}{effects}".strip() or tool.name, tool.schema()))
    out.append(_function(no_action_name({t.name for t in tools}),
                         "Run no tool now (e.g. wait for verification, or nothing is left to do).", None))
    return out


def decision_schema(tools: list[Any]) -> dict[str, Any]:
    """The decision's JSON schema, for a JSON-schema reply: the action is one of the tools with its own
    arguments' schema (a bare "object" would be closed to every key by a provider that makes schemas
    strict, Anthropic's through litellm), or null."""
    defs: dict[str, Any] = {}
    actions = []
    for tool in tools:
        args = tool.schema()
        for name, body in (args.pop("$defs", None) or {}).items():
            if defs.setdefault(name, body) != body:  # two tools, two different types of one name: keep them open
                args = {"type": "object", "additionalProperties": True}
        actions.append({"type": "object", "properties": {"tool": {"type": "string", "enum": [tool.name]}, "args": args},
                        "required": ["tool", "args"], "additionalProperties": False})
    schema: dict[str, Any] = {
        "type": "object", "properties": {"action": {"anyOf": [*actions, {"type": "null"}]}, **_DECISION_FIELDS},
        "required": ["action", "confidence"], "additionalProperties": False}
    if defs:
        schema["$defs"] = defs
    return schema


def request_params(mode: Mode, tools: list[Any], model: str) -> dict[str, Any]:
    """What a decision call adds to the litellm request in this mode (nothing in text mode)."""
    if mode == "tools":
        params: dict[str, Any] = {"tools": tool_functions(tools)}
        if _passes(model, "tool_choice"):
            params["tool_choice"] = "required"
        if _passes(model, "parallel_tool_calls"):
            params["parallel_tool_calls"] = False  # one call: two is a repair
        return params
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "decision", "schema": decision_schema(tools), "strict": False}}}
    return {}


@lru_cache(maxsize=256)
def _passes(model: str, param: str) -> bool:
    """Whether litellm passes `param` on for this model (an offline provider's handler ignores it: True)."""
    from loopterm.core.model import _litellm

    litellm = _litellm()
    try:
        _, provider, _, _ = litellm.get_llm_provider(model=model)
        supported = litellm.get_supported_openai_params(model=model, custom_llm_provider=provider)
    except Exception:  # noqa: BLE001 - cannot tell: ask for it (litellm drops what it cannot send)
        return True
    return supported is None or param in supported


# ----------------------------------------------------------------------------- the reply


def _arguments(value: Any) -> Any:
    """A call's arguments as JSON when they are JSON (the canonical form), else the text as sent."""
    if isinstance(value, str):
        try:
            return load_json(value)
        except (ValueError, RecursionError):  # not JSON, or a key twice: kept as sent, refused on reading
            return value
    return value


def envelope(content: str | None, calls: list[dict[str, Any]]) -> str:
    """The canonical text of a tool-mode reply: what is stored as raw_response and replayed."""
    body: dict[str, Any] = {}
    if content:
        body["content"] = content
    body["tool_calls"] = [{"name": str(c.get("name") or ""), "arguments": _arguments(c.get("arguments"))}
                          for c in calls]
    text = json.dumps(body, ensure_ascii=False)
    # An unpaired surrogate (a provider's "\ud800") cannot be stored as UTF-8: kept as its escape, the
    # decision read back from it is refused as in text mode (decision.json_problem), not silently altered.
    return json.dumps(body) if _SURROGATE.search(text) else text


def read_envelope(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, calls) of a stored tool-mode reply; a text that is no envelope is content only."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return text, []
    if not isinstance(body, dict) or not isinstance(body.get("tool_calls"), list) or set(body) - {"content", "tool_calls"}:
        return text, []
    calls = [c for c in body["tool_calls"] if isinstance(c, dict)]
    return str(body.get("content") or ""), calls


def message_reply(message: dict[str, Any], mode: str = "text") -> str:
    """The reply an assistant message of a repair conversation carried, as raw_response would hold it."""
    calls = message.get("tool_calls") or []
    if mode != "tools":
        return str(message.get("content") or "")
    out = []
    for call in calls:
        function = (call.get("function") if isinstance(call, dict) else None) or {}
        out.append({"name": function.get("name"), "arguments": function.get("arguments")})
    return envelope(message.get("content"), out)


def raw_reply(mode: Mode, text: str, calls: list[dict[str, Any]]) -> str:
    """What is stored of a reply: its text, or in tools mode the canonical envelope of its calls."""
    return envelope(text, calls) if mode == "tools" else text


def read_decision(mode: Mode, raw: str, tools: list[Any]) -> Decision:
    """The decision a stored reply holds in this mode, or DecisionError saying exactly what was wrong."""
    names = {t.name for t in tools}
    if mode != "tools":
        return parse_decision(raw, names)
    nothing = no_action_name(names)
    functions = ", ".join([*sorted(names), nothing])
    content, calls = read_envelope(raw)
    if not calls:
        raise DecisionError(f"no function was called (a text reply is not read); call exactly one of: {functions}")
    if len(calls) > 1:
        called = ", ".join(short_repr(str(c.get("name")), 40) for c in calls[:5])
        raise DecisionError(f"{len(calls)} functions were called ({called}); call exactly one of: {functions}")
    name, arguments = str(calls[0].get("name") or ""), calls[0].get("arguments")
    if name != nothing and name not in names:
        raise DecisionError(f"unknown function {short_repr(name)}; call exactly one of: {functions}")
    if isinstance(arguments, str):
        try:
            load_json(arguments)
        except DuplicateKey as exc:
            raise DecisionError(f"the arguments of {name!r}: {exc}") from None
        except (ValueError, RecursionError):
            pass
        raise DecisionError(f"the arguments of {name!r} are not valid JSON: {short_repr(arguments, 60)}")
    if not isinstance(arguments, dict):
        raise DecisionError(f"the arguments of {name!r} are not a JSON object")
    fields = set(DECISION_KEYS) - {"action"}
    for key in arguments:
        if key in fields or (key == "args" and name != nothing):
            continue
        where = short_repr(str(key), 40)
        if name == nothing:
            raise DecisionError(f"unknown key {where} in the arguments of {name!r}; it takes only "
                                f"{', '.join(sorted(fields))}")
        raise DecisionError(f"unknown key {where} in the arguments of {name!r}: the tool's own arguments go in "
                            '"args": {...}, beside subgoal, confidence, reasoning and done')
    decision: dict[str, Any] = {k: v for k, v in arguments.items() if k != "args"}
    decision["action"] = None if name == nothing else {"tool": name, "args": arguments.get("args", {})}
    return decision_from(decision, names)


def no_action_in(functions: list[Any]) -> str:
    """The "no action" function among a request's functions (the one without "args")."""
    for item in functions or []:
        function = item.get("function") if isinstance(item, dict) else None
        if isinstance(function, dict) and "args" not in ((function.get("parameters") or {}).get("properties") or {}):
            return str(function.get("name") or NO_ACTION)
    return NO_ACTION


def as_tool_call(decision: dict[str, Any], nothing: str = NO_ACTION) -> dict[str, Any]:
    """A decision written as JSON (a script's reply) as the tool call that says the same: an offline
    provider's answer to a tools-mode request."""
    action = decision.get("action")
    arguments = {k: v for k, v in decision.items() if k != "action"}
    if isinstance(action, dict):
        return {"name": str(action.get("tool") or ""), "arguments": {"args": action.get("args", {}), **arguments}}
    return {"name": nothing, "arguments": arguments}


def as_decision_text(call: dict[str, Any], nothing: str = NO_ACTION) -> str:
    """A tool call (a script's explicit one) as the JSON text decision that says the same."""
    arguments = _arguments(call.get("arguments"))
    arguments = dict(arguments) if isinstance(arguments, dict) else {}
    args = arguments.pop("args", {})
    name = str(call.get("name") or "")
    action = None if name == nothing else {"tool": name, "args": args}
    return json.dumps({"action": action, **arguments}, ensure_ascii=False)
