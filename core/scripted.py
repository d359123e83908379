"""The offline ``scripted/<name>`` model: answers from a JSON script, through litellm.

Registered with litellm as a custom provider, so the demo and the tests run with
no key and no network while token counts, cost and error mapping still come from
litellm itself (the same code paths a real provider goes through).

Script format (JSON)::

    {"price": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07},
     "turns": [TURN, ...],
     "after_end": "repeat_last" | "error",          # default "error"
     "roles": {"checker": {"turns": [...]}, ...}}   # optional: scripts of the loop's roles

A role's script answers ``scripted/<name>.<role>`` (see ``loopterm.core.roles``):
a checker, critic or judge has its own replies, priced like the main script
unless it gives its own ``price``.

TURN is a STEP or a list of STEPs; STEP is a string (the reply text) or
``{"content": str | object, "delay": 0}`` (an object is sent as its JSON text) or
``{"tool_calls": [{"name": "write_file", "arguments": {"args": {...}, "confidence": 0.9}}]}``
(the provider's own tool calls, with or without content) or
``{"error": {"status": 503, "message": "..."}, "delay": 0}``.

Every script answers in every decision mode (core/decision_modes.py): asked with tools, a reply
that is a decision's JSON text is answered as the tool call that says the same; asked for text,
an explicit tool call is answered as the decision's JSON text. Anything else is answered as it is
(a reply that is no decision stays one, for a test of the repair). The caller passes
``metadata={"loopterm": {"iteration": n, "call": k}}``: iteration n (1-based)
picks turns[n-1]; within a list turn, provider call k (0-based, retries and
repairs included) picks step min(k, len-1).

litellm is imported lazily (see ``loopterm.core.model._litellm``). The registration
and the litellm handler base (``register_custom_model``, ``step_handler_class``)
are shared with the ``replay/<run>`` provider (``loopterm.core.recording``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from loopterm.core.errors import ConfigError
from loopterm.core.model import cannot_answer, register_provider

if TYPE_CHECKING:
    from types import ModuleType

PROVIDER = "scripted"

# Statuses litellm's custom-provider path keeps as they are. Any other 4xx comes
# out of that path as a 400 BadRequestError, which would turn a retryable 409
# into a permanent error; those are raised as litellm.APIError(status) instead,
# which litellm passes through untouched (as its OpenAI path does for a 409).
_KEPT_BY_CUSTOM_PATH = frozenset({400, 401, 402, 403, 404, 408, 429})

# Markers that make a scripted 400 a context-window error, as litellm's OpenAI
# path would report it (litellm.ContextWindowExceededError).
_CONTEXT_MARKERS = ("context length", "context window", "context_length_exceeded", "prompt is too long")


class ScriptedError(BaseModel):
    """An HTTP error the scripted provider answers with."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=400, le=599)
    message: str = "scripted error"


class ScriptedCall(BaseModel):
    """A tool call the scripted provider answers with (arguments: an object, or text sent as it is)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: Any = Field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


class Step(BaseModel):
    """One provider answer: content (text or JSON object) and/or tool calls, or an error, after an optional delay."""

    model_config = ConfigDict(extra="forbid")

    content: Any = None
    tool_calls: list[ScriptedCall] | None = None
    error: ScriptedError | None = None
    delay: float = Field(default=0.0, ge=0.0)
    # Answer with this step only when the prompt's last message contains this text (see Script.step):
    # one script can then answer differently per input (a file with a bug, a clean one).
    match: str | None = Field(default=None, min_length=1)

    # Answered as it is in every mode (a replay's recorded reply), never converted (see the module doc).
    _literal: bool = PrivateAttr(default=False)

    @classmethod
    def recorded(cls, content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> Step:
        """A step answered exactly as given in every mode: a recording's reply."""
        step = cls(content=content, tool_calls=tool_calls)
        step._literal = True
        return step

    @model_validator(mode="after")
    def _one_of(self) -> Step:
        has_content = "content" in self.model_fields_set or self.tool_calls is not None
        if has_content == (self.error is not None):
            raise ValueError("a step needs exactly one of 'content' (or 'tool_calls') or 'error'")
        return self

    def text(self) -> str | None:
        """The reply text: strings as they are, any other JSON value as its JSON text, null as None."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return json.dumps(self.content, ensure_ascii=False)


class Price(BaseModel):
    """Per-token prices (and context sizes) registered with litellm for this script's model."""

    model_config = ConfigDict(extra="forbid")

    input_cost_per_token: float = Field(default=0.0, ge=0.0)
    output_cost_per_token: float = Field(default=0.0, ge=0.0)
    max_input_tokens: int = Field(default=128_000, ge=1)
    max_output_tokens: int = Field(default=16_384, ge=1)


def _as_step(value: Any) -> Any:
    return {"content": value} if isinstance(value, str) else value


class Script(BaseModel):
    """A validated script file. Every turn is held as a list of steps (a single step is a list of one)."""

    model_config = ConfigDict(extra="forbid")

    price: Price = Field(default_factory=Price)
    turns: list[list[Step]] = Field(min_length=1)
    after_end: Literal["repeat_last", "error"] = "error"
    roles: dict[str, "Script"] = Field(default_factory=dict)

    @field_validator("roles")
    @classmethod
    def _role_names(cls, roles: dict[str, "Script"]) -> dict[str, "Script"]:
        import re

        for name, role in roles.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"role name {name!r} must be letters, digits, '_' or '-'")
            if role.roles:
                raise ValueError(f"role {name!r} cannot have roles of its own")
        return roles

    @field_validator("turns", mode="before")
    @classmethod
    def _shorthand(cls, turns: Any) -> Any:
        """Expand the string shorthand and wrap single steps, so errors point at real fields."""
        if not isinstance(turns, list):
            return turns
        out: list[Any] = []
        for turn in turns:
            if isinstance(turn, list):
                if not turn:
                    raise ValueError("a list turn needs at least one step")
                out.append([_as_step(s) for s in turn])
            else:
                out.append([_as_step(turn)])
        return out

    def step(self, iteration: int, call: int, prompt: str = "") -> Step | None:
        """The step for provider call ``call`` of iteration ``iteration``; None when exhausted.

        In a turn with `match` steps, the first step whose text is in ``prompt`` answers
        (the call index then picks among matching steps); with none matching, the steps
        without `match` answer as usual.
        """
        index = max(1, iteration) - 1
        if index >= len(self.turns):
            if self.after_end == "error":
                return None
            index = len(self.turns) - 1
        turn = self.turns[index]
        if any(s.match for s in turn):
            matched = [s for s in turn if s.match and s.match in prompt]
            turn = matched or [s for s in turn if not s.match] or turn
        return turn[min(max(0, call), len(turn) - 1)]


def _where(loc: tuple[Any, ...], single_turns: set[int]) -> str:
    """'turns.2.error.status': the path as written in the file (no index inside a single-step turn)."""
    parts = list(loc)
    if len(parts) >= 3 and parts[0] == "turns" and parts[1] in single_turns and parts[2] == 0:
        del parts[2]
    return ".".join(str(p) for p in parts) or "(top level)"


def load_script(path: Path) -> Script:
    """Read and validate a script file; any problem is one ConfigError line naming the file."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"script {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"script {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    turns = data.get("turns") if isinstance(data, dict) else None
    single_turns = {i for i, t in enumerate(turns) if not isinstance(t, list)} if isinstance(turns, list) else set()
    try:
        return Script.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _where(tuple(err["loc"]), single_turns)
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        problem = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"script {path} is invalid at {where}: {problem}{more}") from None


_scripts: dict[str, Script] = {}
_lock = threading.Lock()
_registered_providers: set[str] = set()


def registered_script(name: str) -> Script | None:
    """The script registered under ``name`` (the part after ``scripted/``), if any."""
    return _scripts.get(name)


def register_script(name: str, path: Path) -> None:
    """Load the script, register its price and (once) the scripted provider with litellm.

    Idempotent: registering a name again re-reads the file and replaces the script.
    """
    if not name or "/" in name:
        raise ConfigError(f"bad scripted model name {name!r}: use scripted/<name> with a plain name")
    script = load_script(path)
    with _lock:
        _scripts[name] = script
    register_custom_model(PROVIDER, name, script.price, _handler_class)
    for role, role_script in script.roles.items():
        price = role_script.price if "price" in role_script.model_fields_set else script.price
        with _lock:
            _scripts[f"{name}.{role}"] = role_script
        register_custom_model(PROVIDER, f"{name}.{role}", price, _handler_class)


def _preflight(name: str, script: Path | None) -> None:
    """``check_model("scripted/<name>", script)``: register the script, or refuse a model that has none."""
    if script is not None:
        register_script(name, script)
    elif registered_script(name) is None:
        raise cannot_answer(f"{PROVIDER}/{name}")


register_provider(PROVIDER, _preflight)  # importing this module is what makes scripted/ models known


# ----------------------------------------------------------------------------- shared with replay


def register_custom_model(
    provider: str, name: str, price: Price, handler_class: Callable[[ModuleType], type]
) -> None:
    """Register ``<provider>/<name>`` with litellm at ``price``, and (once) the provider's handler.

    The machinery every offline provider shares (``scripted/``, ``replay/``): the
    model's price and context sizes go into litellm's model map, so token counts
    and cost come from litellm itself; ``handler_class(litellm)`` builds the
    litellm.CustomLLM subclass that answers the provider's calls.
    """
    from loopterm.core.model import _litellm  # the one place litellm is imported

    litellm = _litellm()
    litellm_log = logging.getLogger("LiteLLM")
    with _lock:
        level = litellm_log.level
        litellm_log.setLevel(logging.ERROR)  # it warns that a custom price has no cache-token cost
        try:
            litellm.register_model(
                {
                    f"{provider}/{name}": {
                        "input_cost_per_token": price.input_cost_per_token,
                        "output_cost_per_token": price.output_cost_per_token,
                        "litellm_provider": provider,
                        "mode": "chat",
                        "max_tokens": price.max_output_tokens,
                        "max_input_tokens": price.max_input_tokens,
                        "max_output_tokens": price.max_output_tokens,
                    }
                }
            )
        finally:
            litellm_log.setLevel(level)
        _register_provider(litellm, provider, handler_class)


def _register_provider(litellm: ModuleType, provider: str, handler_class: Callable[[ModuleType], type]) -> None:
    """Add the provider's handler to litellm.custom_provider_map exactly once."""
    if provider in _registered_providers or any(
        item.get("provider") == provider for item in litellm.custom_provider_map
    ):
        _registered_providers.add(provider)
        return
    litellm.custom_provider_map = [
        *litellm.custom_provider_map,
        {"provider": provider, "custom_handler": handler_class(litellm)()},
    ]
    # Make get_llm_provider / token_counter / cost lookups know the provider too,
    # not only the completion path (which runs this setup itself).
    from litellm.utils import custom_llm_setup

    custom_llm_setup()
    _registered_providers.add(provider)


def call_selection(litellm_params: dict[str, Any] | None) -> tuple[int, int]:
    """(iteration, call) from the caller's metadata; (1, 0) when absent (a bare litellm call)."""
    metadata = (litellm_params or {}).get("metadata") or {}
    ours = metadata.get("loopterm") or {}
    try:
        return int(ours.get("iteration", 1)), int(ours.get("call", 0))
    except (TypeError, ValueError):
        return 1, 0


def _timeout_seconds(timeout: Any) -> float | None:
    if isinstance(timeout, (int, float)) and timeout > 0:
        return float(timeout)
    return None


_step_classes: dict[int, type] = {}


def step_handler_class(litellm: ModuleType) -> type:
    """The litellm.CustomLLM base of the offline providers (built lazily: its base lives in litellm).

    A subclass sets ``provider`` and implements ``plan(model, messages, iteration, call)``,
    returning the Step to answer with (content or an HTTP error, after a delay) or
    raising ``self.error(...)``. Answering, token usage and error mapping are shared,
    so every offline provider goes through the same litellm code paths as a real one.
    """
    cached = _step_classes.get(id(litellm))
    if cached is not None:
        return cached
    from litellm.llms.custom_llm import CustomLLMError

    class StepLLM(litellm.CustomLLM):  # type: ignore[name-defined,misc]
        provider = ""

        def plan(self, model: str, messages: list[Any], iteration: int, call: int) -> Step:
            raise NotImplementedError

        def error(self, model: str, status: int, message: str) -> Exception:
            """An exception that comes out of litellm with exactly ``status``, like a real provider's."""
            if status == 400 and any(m in message.lower() for m in _CONTEXT_MARKERS):
                return litellm.ContextWindowExceededError(message=message, model=model, llm_provider=self.provider)
            if status in _KEPT_BY_CUSTOM_PATH or 500 <= status <= 599:
                return CustomLLMError(status_code=status, message=message)
            return litellm.APIError(status_code=status, message=message, llm_provider=self.provider, model=model)

        def _answer(self, model: str, step: Step, messages: list[Any], model_response: Any,
                    params: dict[str, Any] | None = None) -> Any:
            if step.error is not None:
                raise self.error(model, step.error.status, step.error.message)
            content, calls = in_mode(step, (params or {}).get("tools"))
            full = f"{self.provider}/{model}"
            message = model_response.choices[0].message
            message.content = content
            model_response.choices[0].finish_reason = "stop"
            if calls:
                from litellm.types.utils import ChatCompletionMessageToolCall, Function

                message.tool_calls = [
                    ChatCompletionMessageToolCall(id=f"call_{k}", type="function", function=Function(
                        name=c["name"], arguments=c["arguments"] if isinstance(c["arguments"], str)
                        else json.dumps(c["arguments"], ensure_ascii=False)))
                    for k, c in enumerate(calls, start=1)
                ]
                model_response.choices[0].finish_reason = "tool_calls"
            model_response.model = full
            prompt_tokens = litellm.token_counter(model=full, messages=messages, tools=(params or {}).get("tools") or None)
            said = (content or "") + "".join(json.dumps(c, ensure_ascii=False) for c in calls)
            completion_tokens = (
                litellm.token_counter(model=full, text=said, count_response_tokens=True) if said else 0
            )
            model_response.usage = litellm.Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            return model_response

        async def acompletion(  # type: ignore[override]
            self,
            model: str,
            messages: list[Any],
            api_base: str,
            custom_prompt_dict: dict[str, Any],
            model_response: Any,
            print_verbose: Any,
            encoding: Any,
            api_key: Any,
            logging_obj: Any,
            optional_params: dict[str, Any],
            acompletion: Any = None,
            litellm_params: dict[str, Any] | None = None,
            logger_fn: Any = None,
            headers: dict[str, Any] | None = None,
            timeout: Any = None,
            client: Any = None,
        ) -> Any:
            iteration, call = call_selection(litellm_params)
            step = self.plan(model, messages, iteration, call)
            params = optional_params if isinstance(optional_params, dict) else {}
            limit = _timeout_seconds(timeout)
            if step.delay:
                if limit is not None and step.delay > limit:
                    await asyncio.sleep(limit)
                    raise self.error(model, 408, f"{self.provider} reply took longer than the {limit:g}s timeout")
                await asyncio.sleep(step.delay)
            return self._answer(model, step, messages, model_response, params)

    _step_classes[id(litellm)] = StepLLM
    return StepLLM


def in_mode(step: Step, functions: list[Any] | None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) a step answers a request with: asked with functions (tools mode), a
    decision's JSON text becomes the call that says the same; asked without, an explicit call becomes
    the decision's JSON text. A literal step (a replay's) and anything that is no decision stay as they are."""
    from loopterm.core.decision_modes import as_decision_text, as_tool_call, no_action_in

    content = step.text()
    calls = [c.as_dict() for c in step.tool_calls or []]
    if step._literal:
        return content, calls
    if functions:
        if not calls and content:
            decision = _decision_json(content)
            if decision is not None:
                return None, [as_tool_call(decision, no_action_in(functions))]
        return content, calls
    if calls:
        return as_decision_text(calls[0]), []
    return content, calls


def _decision_json(text: str) -> dict[str, Any] | None:
    """The JSON object a reply text holds when it reads as a decision (has an action or a confidence)."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    from loopterm.core.decision import load_json

    try:
        value = load_json(body)  # a key twice is no decision to convert: it is answered as the text it is
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and ("action" in value or "confidence" in value) else None


def _handler_class(litellm: ModuleType) -> type:
    """The handler of ``scripted/<name>`` calls."""

    class ScriptedLLM(step_handler_class(litellm)):  # type: ignore[misc]
        """Answers ``scripted/<name>`` calls from the registered script."""

        provider = PROVIDER

        def plan(self, model: str, messages: list[Any], iteration: int, call: int) -> Step:
            script = _scripts.get(model)
            if script is None:
                raise litellm.NotFoundError(
                    message=f"no script registered for {PROVIDER}/{model}", model=model, llm_provider=PROVIDER
                )
            last = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else ""
            step = script.step(iteration, call, last if isinstance(last, str) else "")
            if step is None:
                raise self.error(
                    model, 400,
                    f"script for {PROVIDER}/{model} exhausted: iteration {iteration} "
                    f"but it has {len(script.turns)} turn(s)",
                )
            return step

        def embedding(self, model: str, input: list[Any], model_response: Any, *args: Any, **kwargs: Any) -> Any:
            """Offline embeddings: a hashed bag of words (the same text, the same vector; shared
            words, nearby vectors), answered through litellm's embedding path like a real provider's."""
            texts = [str(t) for t in input]
            model_response.data = [
                {"object": "embedding", "index": i, "embedding": hashed_vector(t)} for i, t in enumerate(texts)
            ]
            model_response.model = f"{PROVIDER}/{model}"
            tokens = sum(len(t.split()) for t in texts)
            model_response.usage = litellm.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
            return model_response

        async def aembedding(self, model: str, input: list[Any], model_response: Any, *args: Any, **kwargs: Any) -> Any:
            return self.embedding(model, input, model_response)

    return ScriptedLLM


EMBEDDING_SIZE = 256


def hashed_vector(text: str, size: int = EMBEDDING_SIZE) -> list[float]:
    """A unit vector of hashed word (and word-pair) counts: a deterministic stand-in for a learned embedding."""
    import hashlib
    import math
    import re

    words = re.findall(r"\w+", text.lower())
    vector = [0.0] * size
    for gram in [*words, *(" ".join(p) for p in zip(words, words[1:]))]:
        digest = hashlib.blake2b(gram.encode(), digest_size=8).digest()
        vector[int.from_bytes(digest[:4], "little") % size] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def register_embedding_model(name: str) -> None:
    """Make ``scripted/<name>`` answer embedding calls (no script needed: vectors are hashed words)."""
    register_custom_model(PROVIDER, name, Price(), _handler_class)
