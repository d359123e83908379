"""Model access: every call goes through litellm, retried and classified here.

litellm takes seconds to import, so it is imported lazily through ``_litellm()``
and never at module import time. We never pass litellm's ``num_retries`` and we
pass ``max_retries=0`` (else the OpenAI SDK under litellm retries 429/5xx twice on
its own): our RetryPolicy retries transient failures only (408/409/429/5xx, no
answer), behind a per-model circuit breaker. No API key is ever put in a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from loopterm.core.errors import ConfigError, ErrorKind, ModelError, classify_status
from loopterm.core.prompt_cache import cache_points, cached_tokens
from loopterm.core.retry import CallSettings, CircuitBreaker, RetryPolicy, breaker_for
from loopterm.core.text import one_line

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger("loopterm.model")

OnRetry = Callable[[int, ModelError, float], None]
Sleep = Callable[[float], Awaitable[Any]]

EXAMPLE_MODEL = "openai/gpt-4o-mini"

# Providers whose credentials litellm can find outside the environment (cloud
# profiles, a local server with a default address): a "missing" variable there
# is not a reason to refuse the run; the first call says so if it is.
_CREDENTIALS_ELSEWHERE = frozenset(
    {"ollama", "ollama_chat", "bedrock", "bedrock_mantle", "sagemaker", "vertex_ai", "vertex_ai_beta"}
)
# Providers whose listed variables are alternatives, not all required.
_ANY_OF_KEYS = frozenset({"gemini"})

_MAX_MESSAGE = 300


def _litellm() -> ModuleType:
    """Import litellm on first use, offline-safe and quiet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else it fetches prices over the network
    os.environ.setdefault("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")  # else an Anthropic call fetches a config
    import litellm

    litellm.suppress_debug_info = True
    return litellm


# ----------------------------------------------------------------------------- secrets

def redact(text: str) -> str:
    """Remove anything that looks like a credential, and the values of secret-named env vars
    (what counts as a secret: core/secrets.py)."""
    from loopterm.core.secrets import redact as redact_secrets

    return redact_secrets(text)


_PREFIX = re.compile(r"^(litellm\.)?[A-Za-z]*(Error|Exception|Timeout)\s*:\s*")


def _describe(exc: BaseException, status: int | None) -> str:
    """'503 OpenAIException - unavailable': status and the provider's words, no litellm noise."""
    raw = str(getattr(exc, "message", "") or exc) or type(exc).__name__
    raw = raw.split("\n")[0]
    previous = None
    while previous != raw:
        previous, raw = raw, _PREFIX.sub("", raw, count=1)
    raw = redact(raw.strip()) or type(exc).__name__
    return one_line(f"{status} {raw}" if status is not None else f"{type(exc).__name__}: {raw}", _MAX_MESSAGE)


def _retry_after(exc: BaseException) -> float | None:
    """A Retry-After hint in seconds from the provider's response headers, if any."""
    headers: Any = getattr(exc, "litellm_response_headers", None)
    if not headers:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        if headers.get("retry-after-ms") is not None:
            return float(headers.get("retry-after-ms")) / 1000.0
        if headers.get("retry-after") is not None:
            return float(headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):  # an HTTP date or junk: ignore the hint
        return None
    return None


def classify(exc: BaseException, model: str, litellm: ModuleType) -> ModelError:
    """Turn anything litellm raised into a ModelError whose kind decides what happens next."""
    if isinstance(exc, ModelError):
        return exc
    if isinstance(exc, litellm.ContextWindowExceededError):
        return ModelError(
            f"{model}: the prompt does not fit the context window: {_describe(exc, 400)}",
            ErrorKind.PERMANENT,
            400,
            code="context_window",
        )
    transport = _transport_failure(exc, litellm)
    if transport is not None:
        code, what = transport
        return ModelError(f"{model}: {one_line(redact(what), _MAX_MESSAGE)}", ErrorKind.TRANSIENT, None, code=code)
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = None
    if isinstance(exc, (litellm.Timeout, asyncio.TimeoutError, TimeoutError)):
        kind, code = ErrorKind.TRANSIENT, "timeout"
    elif isinstance(exc, litellm.APIConnectionError) or (status is None and isinstance(exc, OSError)):
        kind, code = ErrorKind.TRANSIENT, "connection"
    elif status is None and not _is_litellm_error(exc, litellm):
        # A bug (TypeError, KeyError...) is not worth retrying: say what it was.
        return ModelError(
            f"{model}: unexpected {_describe(exc, None)}", ErrorKind.PERMANENT, None, code="unexpected"
        )
    else:
        kind, code = classify_status(status), None
    message = f"{model}: {_describe(exc, status)}"
    if code == "timeout":
        limit = _TIMEOUT_VALUE.search(" ".join(str(e) for e in _causes(exc)))
        message = f"{model}: no answer within {float(limit.group(1)):g}s (timed out)" if limit else (
            f"{model}: no answer in time (timed out)")
    if status in (401, 403):
        message += "; check the API key for this provider"
    elif status == 404:
        message += "; check the model name"
    return ModelError(message, kind, status, code=code, retry_after=_retry_after(exc))


def _causes(exc: BaseException, limit: int = 12) -> list[BaseException]:
    """The exception and what it was raised from (litellm wraps the transport's error several times)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < limit and all(current is not c for c in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


_TIMEOUT_VALUE = re.compile(r"timeout value=(\d+(?:\.\d+)?)")
_HOST = re.compile(r"[Cc]annot connect to host (\S+?)(?: ssl:|$|\s)")
_BYTES = re.compile(r"received (\d+) of (\d+) bytes")
_RECEIVED = re.compile(r"Received: (.*?)\. Check the reverse proxy", re.DOTALL)
_TRUNCATED_TYPES = frozenset({"ClientPayloadError", "ContentLengthError", "TransferEncodingError",
                              "RemoteProtocolError", "IncompleteRead"})


def _transport_failure(exc: BaseException, litellm: ModuleType) -> tuple[str, str] | None:
    """(code, what happened) when the provider never gave a usable HTTP answer, else None.

    litellm reports all of these as "500 Connection error." (or "Empty or invalid response"),
    a status no server sent: the cause is further down the chain. A timeout keeps litellm's
    classification (status 408) and is handled by the caller.
    """
    chain = _causes(exc)
    names = {klass.__name__ for e in chain for klass in type(e).__mro__}
    text = " ".join(str(e) for e in chain)
    if isinstance(exc, (litellm.Timeout, asyncio.TimeoutError, TimeoutError)) or "APITimeoutError" in names:
        return None
    if "ConnectionRefusedError" in names:
        host = _HOST.search(text)
        where = f" to {host.group(1)}" if host else ""
        return "connection", f"cannot connect{where}: connection refused (is the model server running there?)"
    if names & _TRUNCATED_TYPES or "payload is not completed" in text:
        got = _BYTES.search(text)
        size = f" ({got.group(1)} of {got.group(2)} bytes arrived)" if got else ""
        return "truncated", f"the reply was cut off before it was complete{size}"
    decode = next((e for e in chain if type(e).__name__ == "JSONDecodeError"), None)
    if decode is not None:
        return "bad_reply", f"the reply is not valid JSON (cut off or corrupt: {decode})"
    if "Empty or invalid response from LLM endpoint" in text:
        received = _RECEIVED.search(text)
        body = received.group(1)[:120] if received else "nothing"
        return "bad_reply", f"the reply is not JSON (received {body}); check the model server or proxy at that address"
    if "ServerDisconnectedError" in names or "ConnectionResetError" in names or "Server disconnected" in text:
        return "connection", "the server closed the connection without answering"
    if "APIConnectionError" in names or "ConnectError" in names:
        root = chain[-1]
        return "connection", f"cannot reach the provider ({type(root).__name__}: {str(root)[:160]})"
    return None


def _is_litellm_error(exc: BaseException, litellm: ModuleType) -> bool:
    return any(isinstance(exc, t) for t in litellm.LITELLM_EXCEPTION_TYPES)


# ----------------------------------------------------------------------------- client


class ModelReply(BaseModel):
    """One successful model answer with what it cost."""

    text: str
    tokens_in: int = Field(ge=0)
    tokens_out: int = Field(ge=0)
    cost_usd: float = Field(ge=0.0)
    latency_ms: float = Field(ge=0.0)  # wall time of complete(), retries and backoff included
    model: str
    calls: int = Field(ge=1)  # provider calls made, retries included
    # The provider's own tool calls (OpenAI tool_calls, Anthropic tool_use, as litellm gives both):
    # [{"id", "name", "arguments"}], arguments as the provider sent them (JSON text, untrusted).
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    tokens_cached: int = Field(default=0, ge=0)  # of tokens_in, served from the provider's prompt cache

    @field_validator("text")
    @classmethod
    def _valid_unicode(cls, text: str) -> str:
        """A reply may carry unpaired surrogates (a provider's JSON can escape one: "\\ud800"). They are not
        Unicode: the store cannot write them as UTF-8 and a terminal cannot show them. Each becomes U+FFFD
        (a pair that arrived as two halves becomes its character)."""
        if not _SURROGATE.search(text):
            return text
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    @field_validator("tool_calls")
    @classmethod
    def _valid_unicode_calls(cls, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A call's name and arguments, as the reply's text: they reach the prompt of a repair, and the store."""
        return [{k: cls._valid_unicode(v) if isinstance(v, str) else v for k, v in call.items()} for call in calls]


_SURROGATE = re.compile("[\ud800-\udfff]")


class ModelClient:
    """Calls one model through litellm with our retry policy and circuit breaker."""

    def __init__(
        self,
        model: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        api_base: str | None = None,
        on_retry: OnRetry | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.model = model
        settings = CallSettings.from_env() if retry is None or timeout is None or breaker is None else None
        self.retry = retry or settings.policy()  # type: ignore[union-attr]
        self.timeout = timeout if timeout is not None else settings.timeout  # type: ignore[union-attr]
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.api_base = api_base
        self.on_retry = on_retry
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.breaker = breaker or breaker_for(model, settings)

    async def complete(self, messages: list[dict[str, Any]], *, iteration: int, call_index: int = 0,
                       params: dict[str, Any] | None = None) -> ModelReply:
        """Ask the model; retry transient failures; raise a classified ModelError otherwise.

        ``call_index`` is how many provider calls this iteration already made;
        attempt a (1-based) is tagged ``call = call_index + a - 1`` so the
        scripted provider (and logs) can tell retries and repairs apart.
        ``params`` are added to the request (a decision's tools, tool_choice or
        response_format: core/decision_modes.py).
        """
        litellm = _litellm()
        started = time.monotonic()
        attempts = self.retry.max_attempts
        calls = 0
        for attempt in range(1, attempts + 1):
            try:
                self.breaker.before_call()
            except ModelError as exc:
                exc.calls = calls
                raise
            calls += 1
            try:
                response = await litellm.acompletion(**self._request(messages, iteration, call_index + attempt - 1, params))
                reply = self._reply(response, litellm, started, calls)
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified below
                error = classify(exc, self.model, litellm)
            else:
                self.breaker.record_success()
                return reply

            error.calls = calls
            if error.kind is not ErrorKind.TRANSIENT:
                self.breaker.record_success()  # the provider answered; it is up
                raise error
            self.breaker.record_failure(str(error).removeprefix(self.model + ": "))
            if attempt == attempts:
                break
            delay = self.retry.delay(attempt, self.rng, error.retry_after)
            log.info("model %s attempt %d failed (%s); retrying in %.2fs", self.model, attempt, error, delay)
            if self.on_retry is not None:
                self.on_retry(attempt, error, delay)
            await self.sleep(delay)

        raise ModelError(
            f"{self.model} failed after {calls} attempt{'s' if calls != 1 else ''}: "
            f"{str(error).removeprefix(self.model + ': ')}",
            error.kind,
            error.status,
            code=error.code,
            retry_after=error.retry_after,
            calls=calls,
        )

    def _request(self, messages: list[dict[str, Any]], iteration: int, call: int,
                 params: dict[str, Any] | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout": self.timeout,
            "metadata": {"loopterm": {"iteration": iteration, "call": call}},
            # litellm forwards this to the provider SDK, whose own default (the OpenAI
            # client's 2) would silently retry 429/5xx under us: one attempt = one request.
            "max_retries": 0,
        }
        if self.api_base is not None:
            request["api_base"] = self.api_base
        request.update(params or {})
        cache = cache_points(self.model)  # Claude caches only a marked prefix (core/prompt_cache.py)
        if cache is not None:
            request["cache_control_injection_points"] = cache
        return request

    def _reply(self, response: Any, litellm: ModuleType, started: float, calls: int) -> ModelReply:
        """Validate the provider's answer; a malformed one is TRANSIENT (ask again)."""
        choices = getattr(response, "choices", None)
        if not choices:
            raise ModelError(f"{self.model}: reply has no choices", ErrorKind.TRANSIENT, code="bad_reply")
        message = getattr(choices[0], "message", None)
        if message is None or not hasattr(message, "content"):
            raise ModelError(f"{self.model}: reply has no message content", ErrorKind.TRANSIENT, code="bad_reply")
        content = message.content
        text = "" if content is None else str(content)
        tool_calls = []
        for call in getattr(message, "tool_calls", None) or []:
            function = getattr(call, "function", None)
            arguments = getattr(function, "arguments", None)
            tool_calls.append({"id": str(getattr(call, "id", "") or ""), "name": str(getattr(function, "name", "") or ""),
                               "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)})

        usage = getattr(response, "usage", None)
        tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
        tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
        tokens_cached = min(cached_tokens(usage), tokens_in)  # priced at their own rate in the cost
        return ModelReply(
            text=text,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=self._cost(response, litellm, tokens_in, tokens_out),
            latency_ms=(time.monotonic() - started) * 1000.0,
            model=self.model,  # the litellm string the person chose, not the provider's alias
            calls=calls,
            tool_calls=tool_calls,
            tokens_cached=tokens_cached,
        )

    def _cost(self, response: Any, litellm: ModuleType, tokens_in: int, tokens_out: int) -> float:
        """litellm's own cost for this reply; 0.0 when it has no price for the model."""
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
        if cost is None:
            try:
                cost = litellm.completion_cost(completion_response=response, model=self.model)
            except Exception:  # noqa: BLE001 - fall back to the per-token price below
                cost = None
        if cost is None:
            cost = self._price(litellm, tokens_in, tokens_out)
        try:
            return max(0.0, float(cost or 0.0))
        except (TypeError, ValueError):
            return 0.0

    def _price(self, litellm: ModuleType, tokens_in: int, tokens_out: int) -> float:
        """USD for these token counts at litellm's price for the model; 0.0 when it has none."""
        try:
            cost_in, cost_out = litellm.cost_per_token(
                model=self.model, prompt_tokens=tokens_in, completion_tokens=tokens_out
            )
            return float(cost_in) + float(cost_out)
        except Exception:  # noqa: BLE001 - no price known for this model: uncosted, not a crash
            return 0.0

    def estimate(self, messages: list[dict[str, Any]], max_output_tokens: int,
                 tools: list[dict[str, Any]] | None = None) -> tuple[int, float]:
        """Projected (tokens, USD) of the next call, for the budget check before it is made (a decision's
        functions, in tools mode, are input tokens too)."""
        litellm = _litellm()
        try:
            prompt_tokens = int(litellm.token_counter(model=self.model, messages=messages, tools=tools or None))
        except Exception:  # noqa: BLE001 - a tokenizer hiccup must not stop the run: rough count
            prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4
        return prompt_tokens + max_output_tokens, self._price(litellm, prompt_tokens, max_output_tokens)


# ----------------------------------------------------------------------------- preflight

# The offline providers (``scripted/``: core/scripted.py, ``replay/``: core/recording.py) register
# their preflight here when their module is imported; this module never imports them.
# preflight(name after the prefix, script or None) raises ConfigError when the model cannot answer.
Preflight = Callable[[str, Path | None], None]
_OFFLINE_PROVIDERS: dict[str, Preflight] = {}
# What an offline model needs when its provider's module was not loaded.
_OFFLINE_HINTS = {
    "scripted": "model {model} has no script; scripted models answer from a script file "
                "(the examples ship one), or pick another --model such as {example}",
    "replay": "model {model} answers only with a recording; use `loopterm replay {name}`, "
              "or pick another --model such as {example}",
}


def register_provider(prefix: str, preflight: Preflight) -> None:
    """Make ``check_model("<prefix>/<name>", script)`` ask ``preflight`` instead of litellm (idempotent)."""
    _OFFLINE_PROVIDERS[prefix] = preflight


def cannot_answer(model: str) -> ConfigError:
    """The error of an offline model (scripted/, replay/) with nothing to answer from: what it needs."""
    prefix, _, name = model.partition("/")
    return ConfigError(_OFFLINE_HINTS[prefix].format(model=model, name=name, example=EXAMPLE_MODEL))


def check_model_name(model: str, script: Path | None = None) -> None:
    """What `check_model` refuses without importing litellm (seconds): a model setting out of range, no model,
    an offline model (scripted/, replay/) with nothing to answer from. Cheap enough to run before a screen
    opens; `check_model` (in a thread, once the screen shows) does the rest."""
    CallSettings.from_env()  # a timeout or retry setting out of range (LOOPTERM_MODEL_TIMEOUT...)
    if not model or not model.strip():
        raise ConfigError(f"no model given; use a litellm model string such as {EXAMPLE_MODEL}")
    prefix, slash, name = model.partition("/")
    if slash and prefix in _OFFLINE_HINTS and script is None:
        preflight = _OFFLINE_PROVIDERS.get(prefix)
        if preflight is None:
            raise cannot_answer(model)
        preflight(name, None)  # without a script to register: only whether one is known


def litellm_loaded() -> bool:
    """Whether litellm is imported already (then `_litellm()` costs nothing)."""
    return "litellm" in sys.modules


def load_litellm() -> None:
    """Import litellm now (seconds): for a thread, before a screen's first model check needs it."""
    _litellm()


def warm_tokenizer(model: str) -> None:
    """Load litellm's tokenizer for `model` now (tiktoken reads its encoding, ~0.3 s, on the first count):
    for a thread, so the first `ModelClient.estimate` on a screen's event loop does not freeze it."""
    try:
        _litellm().token_counter(model=model, messages=[{"role": "user", "content": "warm up"}])
    except Exception:  # noqa: BLE001 - estimate() falls back to a rough count; nothing to refuse here
        log.debug("no tokenizer warmed for %s", model, exc_info=True)


def check_model(model: str, script: Path | None = None, *, api_base: str | None = None) -> None:
    """Refuse a run that cannot make its first call: one ConfigError line saying what to do."""
    check_model_name(model, script)  # an offline model without a script is fully checked there
    prefix, slash, name = model.partition("/")
    preflight = _OFFLINE_PROVIDERS.get(prefix) if slash else None
    if preflight is not None:
        if script is not None:
            preflight(name, Path(script))
        return
    if slash and prefix in _OFFLINE_HINTS:
        # Its module was never imported (no loop with a script, no `loopterm replay`): say what it needs.
        if script is not None:  # a caller's bug: whoever passes a script loads the provider that reads it
            raise ConfigError(f"model {model}: the {prefix} provider is not loaded (import loopterm.core.{prefix})")
        raise cannot_answer(model)

    litellm = _litellm()
    try:
        _, provider, _, _ = litellm.get_llm_provider(model=model, api_base=api_base)
    except Exception:  # noqa: BLE001 - litellm raises BadRequestError for an unknown provider
        if "/" in model:
            prefix = model.split("/", 1)[0]
            raise ConfigError(
                f"unknown model {model!r}: litellm does not know provider {prefix!r}; "
                f"use a litellm model string such as {EXAMPLE_MODEL}"
            ) from None
        raise ConfigError(
            f"unknown model {model!r}: litellm cannot tell its provider; "
            f"use a litellm model string such as {EXAMPLE_MODEL}"
        ) from None

    if provider in _CREDENTIALS_ELSEWHERE:
        return
    try:
        env = litellm.validate_environment(model=model, api_base=api_base)
    except Exception:  # noqa: BLE001 - cannot tell: let the first call report it
        return
    missing = [k for k in env.get("missing_keys", []) if isinstance(k, str)]
    if missing:
        joiner = " or " if provider in _ANY_OF_KEYS else " and "
        names = joiner.join(missing) if len(missing) <= 2 else ", ".join(missing[:-1]) + joiner + missing[-1]
        raise ConfigError(
            f"model {model} needs {names} in the environment; set it or pick another --model"
        )
