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

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from loopterm.core.errors import LooptermError
from loopterm.core.events import EngineEvent, Escalated, IterationCommitted, IterationStarted, RunFinished, StatusChanged
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.spans import RunHistory, SpanBuilder, short

DEFAULT_TIMEOUT_S = 5.0  # per export request, retries included (the SDK's own default is 10 s)
LINGER_S = 0.25  # a live batch waits this long for more spans before it is sent
MAX_BATCH_SPANS = 2_048  # ... or until it has this many
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class TelemetryError(LooptermError):
    """Spans could not be delivered (collector unreachable, HTTP error): one line saying where and why."""




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
        why = short(capture.reason or "the collector did not accept them")
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
            self._fail(f"building spans failed: {exc.__class__.__name__}: {short(exc)}")
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
                self._fail(f"building spans failed: {exc.__class__.__name__}: {short(exc)}")
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

