"""Spans of runs, built from what the store records: one trace per run, ids derived from the run id.

core/telemetry.py sends them (live, or `export --format otlp`); the module docstring there gives the
shape of a trace and when content is included.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from loopterm.core.fold import RunView
from loopterm.core.records import IterationRecord, RunRecord, ToolCallRecord
from loopterm.core.runlog import EventRecord, to_stored
from loopterm.core.secrets import redact

TEXT_LIMIT = 200  # characters of a summary attribute (a subgoal, an error's first line)
# Message content is sent only when a person opts in, with the GenAI conventions' own switch.
CONTENT_SWITCH = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
CONTENT_LIMIT = 16_000  # characters of one message (or tool argument/result text) when content is sent

# litellm's provider prefixes -> the GenAI semantic conventions' gen_ai.provider.name values.
_PROVIDERS = {
    "openai": "openai", "text-completion-openai": "openai", "anthropic": "anthropic", "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference", "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai", "groq": "groq", "mistral": "mistral_ai", "cohere": "cohere",
    "cohere_chat": "cohere", "deepseek": "deepseek", "perplexity": "perplexity", "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}


# -- ids ------------------------------------------------------------------------


def _digest(*parts: object, size: int) -> int:
    text = "\x1f".join(str(p) for p in ("loopterm", *parts))
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:size], "big")
    return value or 1  # an all-zero id is invalid in OTLP


def trace_id(run_id: str) -> int:
    """The run's trace id: the same in every process that ever sends spans of this run."""
    return _digest("trace", run_id, size=16)


def span_id(run_id: str, *parts: object) -> int:
    """A span's id from what it is: ("run",), ("iteration", n), ("model", n), ("tool", n), ("gate", n, i)."""
    return _digest("span", run_id, *parts, size=8)


def _context(run_id: str, *parts: object) -> SpanContext:
    return SpanContext(trace_id(run_id), span_id(run_id, *parts), is_remote=False,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


# -- attributes -------------------------------------------------------------------


def provider_name(model: str) -> str:
    """gen_ai.provider.name for a litellm model string: its prefix mapped to the semconv name
    (openai/gpt-4o -> openai, bedrock/... -> aws.bedrock), or guessed from a bare model name."""
    if "/" in model:
        prefix = model.split("/", 1)[0]
        return _PROVIDERS.get(prefix, prefix)
    bare = model.lower()
    if bare.startswith(("gpt-", "o1", "o3", "o4", "chatgpt")):
        return "openai"
    if bare.startswith("claude"):
        return "anthropic"
    if bare.startswith("gemini"):
        return "gcp.gemini"
    return "unknown"


def short(text: object) -> str:
    """A redacted first line, capped: what an attribute may say about untrusted text."""
    lines = redact(str(text)).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= TEXT_LIMIT else first[: TEXT_LIMIT - 1] + "…"


def _attrs(**values: Any) -> dict[str, Any]:
    """Attributes without the unknown (None) ones; keys use '__' for '.'."""
    return {key.replace("__", "."): value for key, value in values.items() if value is not None}


def _chat_attrs(model: str, response_model: str | None, tokens_in: int, tokens_out: int, cost_usd: float,
                temperature: float | None = None, max_tokens: int | None = None,
                tokens_cached: int | None = None) -> dict[str, Any]:
    """GenAI semconv attributes of a model call; `tokens_cached` (of tokens_in, served by the provider's prompt
    cache) is `gen_ai.usage.cache_read.input_tokens`, left out when unknown."""
    provider = provider_name(model)
    return _attrs(
        gen_ai__operation__name="chat", gen_ai__provider__name=provider, gen_ai__system=provider,
        gen_ai__request__model=model, gen_ai__response__model=response_model or None,
        gen_ai__usage__input_tokens=tokens_in, gen_ai__usage__output_tokens=tokens_out,
        gen_ai__usage__cache_read__input_tokens=tokens_cached,
        gen_ai__request__temperature=temperature, gen_ai__request__max_tokens=max_tokens,
        loopterm__cost_usd=float(cost_usd),
    )


def _event_attrs(data: dict[str, Any]) -> dict[str, Any]:
    """An event record's scalar fields (strings redacted and cut short); nested values are left out."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"loopterm.{key}"
        if isinstance(value, bool | int | float):
            out[name] = value
        elif isinstance(value, str):
            out[name] = short(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[name] = [short(v) for v in value[:20]]
    return out


def content_wanted() -> bool:
    """Whether prompts, replies and tool text go into the spans: only when the person set the switch."""
    return os.environ.get(CONTENT_SWITCH, "").strip().lower() in ("true", "1", "yes")


def _text(value: object) -> str:
    """Content for an opted-in attribute: redacted again here (an environment's secrets may differ from
    those of the process that recorded it), and capped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = redact(text)
    return text if len(text) <= CONTENT_LIMIT else text[:CONTENT_LIMIT] + f"… ({len(text):,} characters)"


def _messages(record: IterationRecord) -> dict[str, str]:
    """gen_ai.input.messages / gen_ai.output.messages as the GenAI conventions shape them (JSON text)."""
    sent = [{"role": str(m.get("role", "user")), "parts": [{"type": "text", "content": _text(m.get("content", ""))}]}
            for m in record.prompt]
    answered = [{"role": "assistant", "parts": [{"type": "text", "content": _text(record.raw_response)}]}]
    return {"gen_ai.input.messages": json.dumps(sent, ensure_ascii=False),
            "gen_ai.output.messages": json.dumps(answered, ensure_ascii=False)}


def _event(event: EventRecord, start: float, end: float) -> Event:
    """An event-log record as a span event. One recorded just after its iteration (an escalation, a relax
    at the boundary) is placed at the iteration's end, so it lies inside the span; its own time is kept."""
    kind, data = to_stored(event.event)
    attributes = _event_attrs(data)
    at = min(max(event.ts, start), end)
    if at != event.ts:
        attributes["loopterm.recorded_at"] = float(event.ts)
    return Event(f"loopterm.{kind}", attributes, _ns(at))


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


# -- spans --------------------------------------------------------------------------


@dataclass
class Request:
    """What the model was asked with at an iteration, when known (not all of it is recorded)."""

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass
class SpanBuilder:
    """Builds the spans of runs and iterations with one resource and instrumentation scope."""

    resource: Resource = field(default_factory=lambda: _resource())
    scope: InstrumentationScope = field(default_factory=lambda: InstrumentationScope("loopterm", _version()))
    content: bool = field(default_factory=content_wanted)  # prompts, replies, tool arguments and results

    def _span(self, name: str, context: SpanContext, parent: SpanContext | None, start: float, end: float,
              attributes: dict[str, Any], *, kind: SpanKind = SpanKind.INTERNAL, events: Sequence[Event] = (),
              links: Sequence[Link] = (), status: Status | None = None) -> ReadableSpan:
        return ReadableSpan(
            name=name, context=context, parent=parent, resource=self.resource, attributes=attributes,
            events=events, links=links, kind=kind, status=status or Status(StatusCode.UNSET),
            start_time=_ns(start), end_time=_ns(max(start, end)), instrumentation_scope=self.scope,
        )

    def run_span(self, run: RunRecord, events: Iterable[EventRecord] = ()) -> ReadableSpan:
        """The root span of a run: from its creation to its last update."""
        attributes = _attrs(
            loopterm__run__id=run.id, loopterm__loop=run.loop, loopterm__run__status=run.status,
            loopterm__run__termination_reason=run.termination_reason, loopterm__run__origin=run.origin,
            loopterm__run__parent=run.parent_run, loopterm__run__fork_iteration=run.fork_iteration,
            loopterm__run__message=short(run.message) if run.message else None,
            loopterm__run__iterations=run.iterations, loopterm__run__max_iterations=run.max_iterations,
            loopterm__model=run.model, loopterm__tokens_in=run.tokens_in, loopterm__tokens_out=run.tokens_out,
            loopterm__tokens_cached=run.tokens_cached,
            loopterm__cost_usd=float(run.cost_usd), loopterm__elapsed_s=float(run.elapsed_s),
        )
        links: list[Link] = []
        if run.parent_run:
            at = run.fork_iteration or 0
            target = _context(run.parent_run, "iteration", at) if at > 0 else _context(run.parent_run, "run")
            links.append(Link(target, {"loopterm.link": run.origin, "loopterm.run.parent": run.parent_run,
                                       "loopterm.run.fork_iteration": at}))
        span_events = [Event(f"loopterm.{kind}", _event_attrs(data), _ns(e.ts))
                       for e in events if e.iteration is None for kind, data in [to_stored(e.event)]]
        status = (Status(StatusCode.ERROR, short(run.message or run.termination_reason or "failed"))
                  if run.status == "failed" else Status(StatusCode.OK) if run.status == "converged" else None)
        return self._span(f"run {run.loop}", _context(run.id, "run"), None, run.created_at, run.updated_at,
                          attributes, events=span_events, links=links, status=status)

    def iteration_spans(self, run: RunRecord, record: IterationRecord, events: Sequence[EventRecord],
                        tool_row: ToolCallRecord | None, request: Request, relaxed: set[str]) -> list[ReadableSpan]:
        """The iteration span and its children: the model call, the tool call, each gate.

        `events`: the run's events recorded for this iteration; `relaxed`: the invariants relaxed then.
        """
        rid, n = run.id, record.n
        it = _context(rid, "iteration", n)
        decision = record.decision or {}
        action = decision.get("action") if isinstance(decision.get("action"), dict) else None
        span_events: list[Event] = []
        for name, held in record.invariant_status.items():
            span_events.append(Event("loopterm.invariant", {
                "loopterm.invariant.name": name, "loopterm.invariant.held": bool(held),
                "loopterm.invariant.relaxed": name in relaxed,
            }, _ns(record.ended_at)))
        span_events.extend(_event(e, record.started_at, record.ended_at) for e in events)
        gates_failed = [g for g in record.gate_results if not g.get("passed")]
        violated = [k for k, v in record.invariant_status.items() if not v and k not in relaxed]
        attributes = _attrs(
            loopterm__run__id=rid, loopterm__iteration=n,
            loopterm__decision__tool=str(action.get("tool")) if action else "none",
            loopterm__decision__subgoal=short(decision.get("subgoal", "")) if decision.get("subgoal") else None,
            loopterm__decision__confidence=float(decision["confidence"]) if isinstance(decision.get("confidence"), int | float) else None,
            loopterm__decision__done=bool(decision.get("done", False)),
            loopterm__gates__passed=not gates_failed, loopterm__invariants__violated=violated or None,
            loopterm__remediations=list(record.remediations) or None,
            loopterm__tokens_in=record.tokens_in, loopterm__tokens_out=record.tokens_out,
            loopterm__tokens_cached=record.tokens_cached,
            loopterm__cost_usd=float(record.cost_usd), loopterm__latency_ms=float(record.latency_ms),
            loopterm__model=record.model or None,
        )
        spans = [self._span(f"iteration {n}", it, _context(rid, "run"), record.started_at, record.ended_at,
                            attributes, events=span_events)]
        # The model call: from the iteration's start for its recorded latency (repairs included).
        model_end = min(record.ended_at, record.started_at + record.latency_ms / 1000)
        chat = _chat_attrs(request.model or record.model or run.model, record.model, record.tokens_in,
                           record.tokens_out, record.cost_usd, request.temperature, request.max_tokens,
                           tokens_cached=record.tokens_cached)
        chat["loopterm.repairs"] = record.repairs
        if self.content:
            chat.update(_messages(record))
        spans.append(self._span(f"chat {chat['gen_ai.request.model']}", _context(rid, "model", n), it,
                                record.started_at, model_end, chat, kind=SpanKind.CLIENT))
        after = model_end
        if record.tool_call:
            spans.append(self._tool_span(rid, n, it, record, tool_row, model_end))
            if tool_row is not None and tool_row.finished_at is not None:
                after = max(after, tool_row.finished_at)
        # Gates run one after another just before the commit: laid out back from the iteration's end.
        cursor = record.ended_at
        placed: list[tuple[int, dict[str, Any], float, float]] = []
        for i, gate in reversed(list(enumerate(record.gate_results))):
            duration = float(gate.get("duration_s") or 0.0)
            start = max(after, cursor - duration)
            placed.append((i, gate, start, cursor))
            cursor = start
        for i, gate, start, end in sorted(placed, key=lambda p: p[0]):
            spans.append(self._gate_span(rid, n, i, it, gate, start, end))
        return spans

    def _tool_span(self, rid: str, n: int, parent: SpanContext, record: IterationRecord,
                   row: ToolCallRecord | None, model_end: float) -> ReadableSpan:
        call = record.tool_call or {}
        result = record.tool_result or {}
        tool = str(call.get("tool", "?"))
        ok = bool(result.get("ok", False)) and not call.get("refused")
        start = row.started_at if row is not None else model_end
        end = row.finished_at if row is not None and row.finished_at is not None else start
        attributes = _attrs(
            gen_ai__operation__name="execute_tool", gen_ai__tool__name=tool,
            gen_ai__tool__call__id=str(call["key"]) if call.get("key") else None,
            loopterm__tool__ok=ok, loopterm__tool__reused=bool(result.get("reused", False)),
            loopterm__tool__refused=short(call["refused"]) if call.get("refused") else None,
            loopterm__tool__approval=str(call["approval"]) if call.get("approval") else None,
            error__type="tool_error" if not ok else None,
        )
        if self.content:
            attributes["gen_ai.tool.call.arguments"] = _text(call.get("args") or {})
            attributes["gen_ai.tool.call.result"] = _text(result.get("output") if ok else (result.get("error") or ""))
        error = call.get("refused") or result.get("error") or "failed"
        status = Status(StatusCode.OK) if ok else Status(StatusCode.ERROR, short(error))
        return self._span(f"execute_tool {tool}", _context(rid, "tool", n), parent, start, end, attributes,
                          status=status)

    def _gate_span(self, rid: str, n: int, i: int, parent: SpanContext, gate: dict[str, Any], start: float,
                   end: float) -> ReadableSpan:
        passed = bool(gate.get("passed"))
        attributes = _attrs(
            loopterm__gate__name=str(gate.get("name", "?")), loopterm__gate__passed=passed,
            loopterm__gate__exit_code=gate.get("exit_code"), loopterm__gate__duration_s=float(gate.get("duration_s") or 0.0),
            loopterm__gate__error=short(gate["error"]) if gate.get("error") else None,
            loopterm__gate__findings=len(gate.get("findings") or []) or None,
        )
        if gate.get("model"):  # a model checker: its call in GenAI terms
            attributes.update(_chat_attrs(str(gate["model"]), str(gate["model"]), int(gate.get("tokens_in") or 0),
                                          int(gate.get("tokens_out") or 0), float(gate.get("cost_usd") or 0.0),
                                          tokens_cached=int(gate.get("tokens_cached") or 0)))
        if passed:
            status = Status(StatusCode.OK)
        else:
            findings = len(gate.get("findings") or [])
            why = gate.get("error") or (f"exit code {gate['exit_code']}" if gate.get("exit_code") is not None
                                        else f"{findings} finding(s)" if findings else "failed")
            status = Status(StatusCode.ERROR, short(why))
        return self._span(f"gate {gate.get('name', '?')}", _context(rid, "gate", n, i), parent, start, end,
                          attributes, status=status)


def _resource() -> Resource:
    """service.name "loopterm" and its version, unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say otherwise."""
    detected = Resource.create({})  # the SDK's defaults merged with the environment's
    ours: dict[str, Any] = {}
    if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
        ours["service.name"] = "loopterm"
    if "service.version" not in detected.attributes:
        ours["service.version"] = _version()
    return detected.merge(Resource(ours))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loopterm")
    except PackageNotFoundError:
        return "0"


class RunHistory:
    """A run's event log, read forward, answering what the spans of iteration n need from it:
    the events recorded at n, the model and temperature the model was asked with, the invariants relaxed."""

    def __init__(self, run: RunRecord, temperature: float | None = None, max_tokens: int | None = None) -> None:
        self.run = run
        self.view = RunView()  # the fold answers what the spans need; this only groups events by iteration
        self.by_iteration: dict[int, list[EventRecord]] = {}
        self.run_events: list[EventRecord] = []
        self.temperature = temperature
        self.max_tokens = max_tokens

    @property
    def last_id(self) -> int:
        return self.view.last_id

    def add(self, events: Iterable[EventRecord]) -> None:
        for event in self.view.absorb(events):
            if event.iteration is None:
                self.run_events.append(event)
            else:
                self.by_iteration.setdefault(event.iteration, []).append(event)

    def request(self, n: int, temperature: float | None = None) -> Request:
        if temperature is None:
            temperature = self.view.temperature_at(n, self.temperature)
        return Request(model=self.view.model_at(n), temperature=temperature, max_tokens=self.max_tokens)

    def relaxed(self, record: IterationRecord) -> set[str]:
        return self.view.relaxed_at(record.started_at)


def _loop_settings(loop_ref: str) -> tuple[float | None, int | None]:
    """The loop's sampling temperature and output cap, if its definition still loads (else unknown)."""
    try:
        from loopterm.core.loader import load_loop

        loop, _ = load_loop(loop_ref)
    except Exception:  # a moved or broken loop file: the spans just do not say
        return None, None
    return loop.temperature, loop.max_output_tokens


def lineage_spans(store: Any, run_id: str, builder: SpanBuilder | None = None, *,
                  load_settings: bool = True) -> list[ReadableSpan]:
    """Every span of a run and its ancestors (a fork's parent, a replay's original), from the store."""
    builder = builder or SpanBuilder()
    spans: list[ReadableSpan] = []
    for run in store.lineage(run_id):
        temperature, max_tokens = _loop_settings(run.loop_ref) if load_settings else (None, None)
        history = RunHistory(run, temperature, max_tokens)
        history.add(store.events(run.id))
        spans.append(builder.run_span(run, history.run_events))
        for record in store.iterations(run.id, own_only=True):
            key = (record.tool_call or {}).get("key")
            row = store.tool_call(str(key)) if key else None
            spans.extend(builder.iteration_spans(run, record, history.by_iteration.get(record.n, []), row,
                                                 history.request(record.n), history.relaxed(record)))
    return spans
