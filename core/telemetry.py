"""OpenTelemetry traces of runs: what the store records, as spans an OTLP collector understands.

One trace per run. Trace and span ids are derived from the run id (and the
iteration number, and the part of the iteration), never drawn at random, so the
spans a run sends live (`run --otlp`), the ones a resume of it sends later, and a
`loopterm export --format otlp` of it after the fact all land in the same trace
with the same ids. A fork, a replay or a loop called by another is a trace of its
own whose run span links to the span it continues from (the parent's iteration at
the fork point, or the parent's run span).

The shape, following the OpenTelemetry GenAI semantic conventions:

    run <loop>                      run id, loop, status, termination reason, totals
      iteration <n>                 decision summary, tokens, cost; invariant results and
                                    escalations, approvals, remediations, strategy changes as events
        chat <model>                gen_ai.* (provider, request/response model, token usage),
                                    loopterm.cost_usd, loopterm.repairs
        execute_tool <tool>         gen_ai.tool.name, ok/error, reused
        gate <name>                 exit code, duration (a model checker: gen_ai.* too)

Times are the recorded ones (iteration start and end, model latency, the tool
journal's start and finish, each gate's duration); nothing is measured again.
Prompts, replies and tool output are not attributes unless a person sets the GenAI
conventions' switch (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true); then
they are redacted again and capped. Otherwise only names, numbers and short, redacted
summaries (a decision's subgoal, an error's first line).

The SDK's ReadableSpan and OTLP/HTTP exporter are used directly (no global
TracerProvider): spans are built from records with explicit ids and times, and
each export's result is checked, so a failure is reported once, never retried
without bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from loopterm.core.errors import LooptermError
from loopterm.core.events import EngineEvent, Escalated, IterationCommitted, IterationStarted, RunFinished, StatusChanged
from loopterm.core.records import EventRecord, IterationRecord, RunRecord, ToolCallRecord
from loopterm.core.secrets import redact

DEFAULT_TIMEOUT_S = 5.0  # per export request, retries included (the SDK's own default is 10 s)
LINGER_S = 0.25  # a live batch waits this long for more spans before it is sent
MAX_BATCH_SPANS = 2_048  # ... or until it has this many
TEXT_LIMIT = 200  # characters of a summary attribute (a subgoal, an error's first line)
# Message content is sent only when a person opts in, with the GenAI conventions' own switch.
CONTENT_SWITCH = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
CONTENT_LIMIT = 16_000  # characters of one message (or tool argument/result text) when content is sent
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

# litellm's provider prefixes -> the GenAI semantic conventions' gen_ai.provider.name values.
_PROVIDERS = {
    "openai": "openai", "text-completion-openai": "openai", "anthropic": "anthropic", "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference", "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai", "groq": "groq", "mistral": "mistral_ai", "cohere": "cohere",
    "cohere_chat": "cohere", "deepseek": "deepseek", "perplexity": "perplexity", "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}


class TelemetryError(LooptermError):
    """Spans could not be delivered (collector unreachable, HTTP error): one line saying where and why."""


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


def _short(text: object) -> str:
    """A redacted first line, capped: what an attribute may say about untrusted text."""
    lines = redact(str(text)).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= TEXT_LIMIT else first[: TEXT_LIMIT - 1] + "…"


def _attrs(**values: Any) -> dict[str, Any]:
    """Attributes without the unknown (None) ones; keys use '__' for '.'."""
    return {key.replace("__", "."): value for key, value in values.items() if value is not None}


def _chat_attrs(model: str, response_model: str | None, tokens_in: int, tokens_out: int, cost_usd: float,
                temperature: float | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    provider = provider_name(model)
    return _attrs(
        gen_ai__operation__name="chat", gen_ai__provider__name=provider, gen_ai__system=provider,
        gen_ai__request__model=model, gen_ai__response__model=response_model or None,
        gen_ai__usage__input_tokens=tokens_in, gen_ai__usage__output_tokens=tokens_out,
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
            out[name] = _short(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[name] = [_short(v) for v in value[:20]]
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
    attributes = _event_attrs(event.data)
    at = min(max(event.ts, start), end)
    if at != event.ts:
        attributes["loopterm.recorded_at"] = float(event.ts)
    return Event(f"loopterm.{event.kind}", attributes, _ns(at))


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
            loopterm__run__message=_short(run.message) if run.message else None,
            loopterm__run__iterations=run.iterations, loopterm__run__max_iterations=run.max_iterations,
            loopterm__model=run.model, loopterm__tokens_in=run.tokens_in, loopterm__tokens_out=run.tokens_out,
            loopterm__cost_usd=float(run.cost_usd), loopterm__elapsed_s=float(run.elapsed_s),
        )
        links: list[Link] = []
        if run.parent_run:
            at = run.fork_iteration or 0
            target = _context(run.parent_run, "iteration", at) if at > 0 else _context(run.parent_run, "run")
            links.append(Link(target, {"loopterm.link": run.origin, "loopterm.run.parent": run.parent_run,
                                       "loopterm.run.fork_iteration": at}))
        span_events = [Event(f"loopterm.{e.kind}", _event_attrs(e.data), _ns(e.ts))
                       for e in events if e.iteration is None]
        status = (Status(StatusCode.ERROR, _short(run.message or run.termination_reason or "failed"))
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
            loopterm__decision__subgoal=_short(decision.get("subgoal", "")) if decision.get("subgoal") else None,
            loopterm__decision__confidence=float(decision["confidence"]) if isinstance(decision.get("confidence"), int | float) else None,
            loopterm__decision__done=bool(decision.get("done", False)),
            loopterm__gates__passed=not gates_failed, loopterm__invariants__violated=violated or None,
            loopterm__remediations=list(record.remediations) or None,
            loopterm__tokens_in=record.tokens_in, loopterm__tokens_out=record.tokens_out,
            loopterm__cost_usd=float(record.cost_usd), loopterm__latency_ms=float(record.latency_ms),
            loopterm__model=record.model or None,
        )
        spans = [self._span(f"iteration {n}", it, _context(rid, "run"), record.started_at, record.ended_at,
                            attributes, events=span_events)]
        # The model call: from the iteration's start for its recorded latency (repairs included).
        model_end = min(record.ended_at, record.started_at + record.latency_ms / 1000)
        chat = _chat_attrs(request.model or record.model or run.model, record.model, record.tokens_in,
                           record.tokens_out, record.cost_usd, request.temperature, request.max_tokens)
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
            loopterm__tool__refused=_short(call["refused"]) if call.get("refused") else None,
            loopterm__tool__approval=str(call["approval"]) if call.get("approval") else None,
            error__type="tool_error" if not ok else None,
        )
        if self.content:
            attributes["gen_ai.tool.call.arguments"] = _text(call.get("args") or {})
            attributes["gen_ai.tool.call.result"] = _text(result.get("output") if ok else (result.get("error") or ""))
        error = call.get("refused") or result.get("error") or "failed"
        status = Status(StatusCode.OK) if ok else Status(StatusCode.ERROR, _short(error))
        return self._span(f"execute_tool {tool}", _context(rid, "tool", n), parent, start, end, attributes,
                          status=status)

    def _gate_span(self, rid: str, n: int, i: int, parent: SpanContext, gate: dict[str, Any], start: float,
                   end: float) -> ReadableSpan:
        passed = bool(gate.get("passed"))
        attributes = _attrs(
            loopterm__gate__name=str(gate.get("name", "?")), loopterm__gate__passed=passed,
            loopterm__gate__exit_code=gate.get("exit_code"), loopterm__gate__duration_s=float(gate.get("duration_s") or 0.0),
            loopterm__gate__error=_short(gate["error"]) if gate.get("error") else None,
            loopterm__gate__findings=len(gate.get("findings") or []) or None,
        )
        if gate.get("model"):  # a model checker: its call in GenAI terms
            attributes.update(_chat_attrs(str(gate["model"]), str(gate["model"]), int(gate.get("tokens_in") or 0),
                                          int(gate.get("tokens_out") or 0), float(gate.get("cost_usd") or 0.0)))
        if passed:
            status = Status(StatusCode.OK)
        else:
            findings = len(gate.get("findings") or [])
            why = gate.get("error") or (f"exit code {gate['exit_code']}" if gate.get("exit_code") is not None
                                        else f"{findings} finding(s)" if findings else "failed")
            status = Status(StatusCode.ERROR, _short(why))
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
        self.by_iteration: dict[int, list[EventRecord]] = {}
        self.run_events: list[EventRecord] = []
        self.model_changes: list[tuple[int, str]] = []  # (effective from iteration, model)
        self.temperature_changes: list[tuple[int, float]] = []
        self.relax_log: list[EventRecord] = []
        self.first_model: str | None = None
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.last_id = 0

    def add(self, events: Iterable[EventRecord]) -> None:
        for event in events:
            self.last_id = max(self.last_id, event.id or 0)
            if event.iteration is None:
                self.run_events.append(event)
            else:
                self.by_iteration.setdefault(event.iteration, []).append(event)
            if event.kind == "run_created" and self.first_model is None and event.data.get("model"):
                self.first_model = str(event.data["model"])
            elif event.kind == "strategy_changed":  # recorded at iteration k, it applies from k + 1
                at = (event.iteration or 0) + 1
                if event.data.get("model"):
                    self.model_changes.append((at, str(event.data["model"])))
                if isinstance(event.data.get("temperature"), int | float):
                    self.temperature_changes.append((at, float(event.data["temperature"])))
            elif event.kind in ("invariant_relaxed", "invariant_restored"):
                self.relax_log.append(event)

    def request(self, n: int, temperature: float | None = None) -> Request:
        model = self.first_model
        for at, changed in self.model_changes:
            if at <= n:
                model = changed
        if temperature is None:
            temperature = self.temperature
            for at, changed in self.temperature_changes:
                if at <= n:
                    temperature = changed
        return Request(model=model, temperature=temperature, max_tokens=self.max_tokens)

    def relaxed(self, record: IterationRecord) -> set[str]:
        names: set[str] = set()
        for event in self.relax_log:
            if event.ts > record.started_at:
                break
            name = str(event.data.get("invariant", ""))
            if event.kind == "invariant_relaxed":
                names.add(name)
            else:
                names.discard(name)
        return names


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


# -- sending ----------------------------------------------------------------------------


class _LastError(logging.Handler):
    """Keeps why the exporter's last request failed (to say it in one line) instead of printing each retry."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reason: str | None = None
        self.unreachable = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            template, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
            if template.startswith("Transient error") and args:  # (error, kind, delay): a connection error, a 503
                self._say(args[0])
            elif template.startswith("Failed to export") and "code" in template and len(args) >= 3:
                if args[1] is not None:  # (kind, status code, reason)
                    self.reason, self.unreachable = f"HTTP {args[1]} {args[2] or ''}".strip(), False
                elif args[2] is not None:
                    self._say(args[2])
            elif self.reason is None:
                self.reason = record.getMessage()
        except Exception:  # a malformed log call must not break an export
            self.reason = self.reason or str(record.msg)

    def _say(self, error: object) -> None:
        text = str(error)
        errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
        if errno or "Connection" in text or "timed out" in text.lower():
            self.unreachable = True
        self.reason = errno.group(1).strip() if errno else text


_capture_lock = threading.Lock()
_capture: _LastError | None = None


def _captured() -> _LastError:
    """The SDK exporter logs each failure and retry; route its log to one handler that keeps the last line."""
    global _capture
    with _capture_lock:
        if _capture is None:
            _capture = _LastError()
            logger = logging.getLogger(_EXPORTER_LOGGER)
            logger.addHandler(_capture)
            logger.propagate = False
        return _capture


def _timeout() -> float | None:
    """None lets the SDK read OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT; otherwise our shorter default."""
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT"):
        return None
    return DEFAULT_TIMEOUT_S


def exporter(endpoint: str) -> OTLPSpanExporter:
    _captured()
    return OTLPSpanExporter(endpoint=endpoint, timeout=_timeout())


def send(spans: Sequence[ReadableSpan], endpoint: str, sink: OTLPSpanExporter | None = None) -> None:
    """Export spans in one request (retried by the SDK within its timeout); TelemetryError if they were not accepted."""
    own = sink is None
    sink = sink or exporter(endpoint)
    capture = _captured()
    capture.reason, capture.unreachable = None, False
    try:
        result = sink.export(list(spans))
    finally:
        if own:
            sink.shutdown()
    if result is not SpanExportResult.SUCCESS:
        why = _short(capture.reason or "the collector did not accept them")
        hint = " (is a collector listening there?)" if capture.unreachable else ""
        raise TelemetryError(f"could not send {len(spans)} span(s) to {endpoint}: {why}{hint}")


class LiveTraces:
    """An engine subscriber that sends each iteration's spans as it commits, and the run span when the
    run ends, from a background thread: a slow or unreachable collector never holds the loop up.

    An iteration's spans go out when the next one starts (or the run stops, escalates or pauses), so
    the events recorded just after its commit (an escalation, a relaxed invariant) are in them too.
    A failure is reported once through `warn`, which must be thread-safe (it may be called from the
    sending thread); the loop goes on and later batches are still tried.
    """

    def __init__(self, journal: Any, endpoint: str, warn: Callable[[str], None], *,
                 builder: SpanBuilder | None = None) -> None:
        self.journal = journal
        self.endpoint = endpoint
        self.warn = warn
        self.builder = builder or SpanBuilder()
        self.sent = 0
        self.failed = 0
        self._failure: str | None = None
        self._warned = False
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[list[ReadableSpan] | None] = queue.SimpleQueue()
        self._exporter = exporter(endpoint)
        self._thread: threading.Thread | None = None
        self._runs: dict[str, _RunWatch] = {}
        self._closed = False

    def attach(self, engine: Any) -> None:
        """Follow an engine: subscribe to its events, with its loop's request settings."""
        watch = _RunWatch(engine, self.journal.get_run(engine.run_id))
        self._runs[engine.run_id] = watch
        engine.subscribe(lambda event: self._on_event(watch, event))

    def _on_event(self, watch: _RunWatch, event: EngineEvent) -> None:
        try:
            if isinstance(event, IterationStarted):
                self._flush(watch)
                watch.temperature = getattr(watch.engine, "temperature", None)
            elif isinstance(event, IterationCommitted):
                watch.pending.append((event.record, watch.temperature))
            elif isinstance(event, Escalated | StatusChanged):
                self._flush(watch)
            elif isinstance(event, RunFinished):
                self._flush(watch)
                self._send_run(watch)
        except Exception as exc:  # tracing must never take a run down: say so once, keep going
            self._fail(f"building spans failed: {exc.__class__.__name__}: {_short(exc)}")
        self._report()

    def _send_run(self, watch: _RunWatch) -> None:
        """The run span as the store has it now (a resume sends it again, same id, a later end)."""
        watch.history.add(self.journal.events(watch.run_id, after_id=watch.history.last_id))
        self._put([self.builder.run_span(self.journal.get_run(watch.run_id), watch.history.run_events)])
        watch.run_sent = True

    def _flush(self, watch: _RunWatch) -> None:
        if not watch.pending:
            return
        watch.history.add(self.journal.events(watch.run_id, after_id=watch.history.last_id))
        watch.run_sent = False
        run = watch.run
        spans: list[ReadableSpan] = []
        for record, temperature in watch.pending:
            key = (record.tool_call or {}).get("key")
            row = self.journal.tool_call(str(key)) if key else None
            spans.extend(self.builder.iteration_spans(run, record, watch.history.by_iteration.get(record.n, []), row,
                                                      watch.history.request(record.n, temperature),
                                                      watch.history.relaxed(record)))
        watch.pending.clear()
        self._put(spans)

    def _put(self, spans: list[ReadableSpan]) -> None:
        if self._closed or not spans:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name="loopterm-otlp", daemon=True)
            self._thread.start()
        self._queue.put(spans)

    def _send_loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            more: list[ReadableSpan] = list(batch)
            stop = False
            # Whatever else is queued within LINGER_S goes in the same request: one request per fast
            # iteration cost the loop itself about as much again (bench/telemetry.py); closing sends at once.
            linger_until = time.monotonic() + LINGER_S
            while len(more) < MAX_BATCH_SPANS:
                try:
                    extra = self._queue.get(timeout=max(0.0, linger_until - time.monotonic()))
                except queue.Empty:
                    break
                if extra is None:
                    stop = True
                    break
                more.extend(extra)
            try:
                send(more, self.endpoint, self._exporter)
                self.sent += len(more)
            except Exception as exc:
                self.failed += len(more)
                self._fail(str(exc))
                self._report()  # now, from this thread: the run may have no further event to carry it
            if stop:
                return

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message

    def _report(self) -> None:
        with self._lock:
            if self._failure is None or self._warned:
                return
            self._warned = True
        try:
            self.warn(f"traces: {self._failure}; the run goes on without them")
        except Exception:  # a screen shutting down cannot show it: nothing else to do
            pass

    def close(self, timeout: float | None = None) -> None:
        """Send what is left (the run spans of runs still open, then the queue) within `timeout` seconds."""
        if self._closed:
            return
        for watch in self._runs.values():
            try:
                self._flush(watch)
                if not watch.run_sent:  # ended without RunFinished (interrupted): its iterations need their parent
                    self._send_run(watch)
            except Exception as exc:
                self._fail(f"building spans failed: {exc.__class__.__name__}: {_short(exc)}")
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            # Wait for the queue to drain, at most `timeout` (default: one request's timeout and a second),
            # and at most a second more once the collector has failed: it is unlikely to answer now.
            deadline = time.monotonic() + (timeout if timeout is not None else (_timeout() or DEFAULT_TIMEOUT_S) + 1.0)
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(0.05)
                if self._failure is not None:
                    deadline = min(deadline, time.monotonic() + 1.0)
            if self._thread.is_alive():  # still retrying: abort the retry waits, give it a moment
                self._exporter.shutdown()
                self._thread.join(1.0)
                self._fail(f"could not finish sending spans to {self.endpoint} before exiting")
            else:
                self._exporter.shutdown()
        else:
            self._exporter.shutdown()
        self._report()


class _RunWatch:
    """What LiveTraces keeps per engine: its iterations not yet sent and its event log read so far."""

    def __init__(self, engine: Any, run: RunRecord) -> None:
        self.engine = engine
        self.run_id = run.id
        self.run = run
        loop = getattr(engine, "loop", None)
        self.history = RunHistory(run, getattr(loop, "temperature", None), getattr(loop, "max_output_tokens", None))
        self.pending: list[tuple[IterationRecord, float | None]] = []
        self.temperature: float | None = getattr(engine, "temperature", None)
        self.run_sent = False

