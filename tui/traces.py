"""OpenTelemetry from the command line and the TUI: `export --format otlp` and the live `--otlp URL`.

Imported only by the commands that use it; the SDK itself (core/telemetry.py) loads
inside these functions, so `loopterm --help` and every other command never import
opentelemetry. Endpoint checks use the standard library only (argparse calls them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loopterm.core.errors import ConfigError
from loopterm.tui.console import error

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget

TRACES_PATH = "/v1/traces"
SPANS_PER_REQUEST = 512  # a long run goes out in several requests, each well under a collector's size limit


def traces_endpoint(url: str) -> str:
    """The OTLP/HTTP traces URL for what a person typed: a base URL (http://host:4318) gets /v1/traces
    appended, as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL with a path is used as is. ValueError if it
    is not an http(s) URL."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an OTLP/HTTP endpoint; give a URL like http://127.0.0.1:4318")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"{text!r} has a bad port; give a URL like http://127.0.0.1:4318") from None
    if parts.path in ("", "/"):
        return text.rstrip("/") + TRACES_PATH
    return text


def otlp_url(text: str) -> str:
    """argparse type of --otlp and --endpoint: the traces URL, or a one-line usage error."""
    try:
        return traces_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_endpoint() -> str | None:
    """From the environment, as the OpenTelemetry spec says: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is,
    else OTEL_EXPORTER_OTLP_ENDPOINT plus /v1/traces; None when neither is set."""
    signal = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if signal:
        return signal
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + TRACES_PATH
    return None


def _warn(message: str) -> None:
    error(message)


@contextlib.contextmanager
def traced(engine: Any, endpoint: str) -> Iterator[Any]:
    """Send the engine's spans to `endpoint` while the block runs; flush (bounded) when it ends.
    A collector that fails is reported once on stderr; the run goes on."""
    from loopterm.core.telemetry import LiveTraces

    live = LiveTraces(engine.journal, endpoint, _warn)
    live.attach(engine)
    try:
        yield live
    finally:
        live.close()


def follow(app: Any, engine: Any) -> None:
    """The TUI's `own(engine)` with --otlp: one LiveTraces for the window, failures as one notice."""
    if app.live_traces is None:
        from loopterm.core.telemetry import LiveTraces

        def warn(message: str) -> None:
            app.notify(message, severity="warning", timeout=10, markup=False)

        app.live_traces = LiveTraces(app.store, app.otlp, warn)
    app.live_traces.attach(engine)


def export_run(db: StoreTarget, prefix: str, endpoint: str | None) -> int:
    """`loopterm export RUN --format otlp`: the run's lineage as spans; one line saying how many went where."""
    from loopterm.core.spans import lineage_spans
    from loopterm.core.telemetry import TelemetryError, exporter, send

    chosen = endpoint or default_endpoint()
    if not chosen:
        raise ConfigError("no OTLP endpoint: pass --endpoint http://HOST:4318 or set OTEL_EXPORTER_OTLP_ENDPOINT")
    try:
        url = traces_endpoint(chosen)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    store = db.open(create=False)
    run = store.resolve_run(prefix)
    lineage = store.lineage(run.id)
    spans = lineage_spans(store, run.id)
    sink = exporter(url)
    sent = 0
    try:
        for at in range(0, len(spans), SPANS_PER_REQUEST):
            chunk = spans[at: at + SPANS_PER_REQUEST]
            send(chunk, url, sink)
            sent += len(chunk)
    except TelemetryError as exc:
        more = f" ({sent} of {len(spans)} were sent before)" if sent else ""
        _warn(f"{exc}{more}")
        return 1
    finally:
        sink.shutdown()
    runs = f" and {len(lineage) - 1} ancestor run(s)" if len(lineage) > 1 else ""
    print(f"sent {sent} spans of run {run.id}{runs} to {url}")
    return 0
