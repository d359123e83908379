"""What live OpenTelemetry traces (`run --otlp URL`) cost the loop, and what an export costs.

One process, the same no-delay loop (bench/engine_overhead.py's: an instant in-process client and a
no-op tool on the durable store), three ways, each twice, interleaved so machine noise hits them alike:

  no traces        the engine alone
  live, received   a LiveTraces subscriber sending to a real OTLP/HTTP receiver on 127.0.0.1
                   (tests/otlp_receiver.py, decoding with opentelemetry-proto)
  live, refused    the same subscriber pointed at a closed port (the collector is down)

Reported: the median engine time per iteration (IterationStarted to IterationCommitted, which is
where the subscriber's own work happens), its ratio to "no traces", and the wall time of `close()`
(the flush at exit). Then `loopterm export --format otlp` of one run (spans built from the store,
encoded and sent): spans, seconds, spans per second. Every received span is counted, so a bench that
lost spans says so.

    python bench/telemetry.py [--iterations 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_overhead import InstantClient, make_loop  # noqa: E402

from loopterm.core.engine import Engine  # noqa: E402
from loopterm.core.events import IterationCommitted, IterationStarted  # noqa: E402
from loopterm.core.spans import lineage_spans  # noqa: E402
from loopterm.core.telemetry import LiveTraces, send  # noqa: E402
from loopterm.store import Store  # noqa: E402

RECEIVER = Path(__file__).resolve().parent.parent / "tests" / "otlp_receiver.py"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


async def measure(loop: object, db: Path, tmp: Path, endpoint: str | None) -> tuple[list[float], float, str]:
    store = Store.open(db)
    engine = Engine.create(loop, store, loop_ref="bench", workspace_root=tmp / "ws", workdir=tmp,
                           client=InstantClient())
    times: list[float] = []
    started = [0.0]
    warnings: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, IterationStarted):
            started[0] = time.perf_counter()
        elif isinstance(event, IterationCommitted):
            times.append(time.perf_counter() - started[0])

    live = LiveTraces(store, endpoint, warnings.append) if endpoint else None
    if live is not None:
        live.attach(engine)  # subscribed first: its work falls inside the measured interval
    engine.subscribe(on_event)
    run = await engine.run()
    assert run.iterations == loop.max_iterations, run  # type: ignore[attr-defined]
    flushed = time.perf_counter()
    if live is not None:
        live.close()
    store.close()
    return times, time.perf_counter() - flushed, run.id if not warnings else f"{run.id} (warned: {warnings[0][:60]})"


def received(out: Path) -> int:
    return sum(1 for _ in out.open()) if out.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    from loopterm.core.model import check_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out = tmp / "spans.jsonl"
        receiver = subprocess.Popen([sys.executable, str(RECEIVER), "--port", "0", "--out", str(out)],
                                    stdout=subprocess.PIPE, text=True)
        try:
            port = int(receiver.stdout.readline().split()[-1])  # type: ignore[union-attr]
            good, bad = f"http://127.0.0.1:{port}/v1/traces", f"http://127.0.0.1:{closed_port()}/v1/traces"
            loop = make_loop(tmp, args.iterations)
            check_model(loop.model, loop.script)
            results: dict[str, list[tuple[list[float], float]]] = {"no traces": [], "live, received": [], "live, refused": []}
            run_ids: list[str] = []
            for round_ in range(2):
                for label, endpoint in (("no traces", None), ("live, received", good), ("live, refused", bad)):
                    work = tmp / f"{label.replace(' ', '').replace(',', '')}{round_}"
                    work.mkdir()
                    times, flush, run_id = asyncio.run(measure(loop, work / "bench.db", work, endpoint))
                    results[label].append((times, flush))
                    if endpoint == good:
                        run_ids.append(run_id)
            time.sleep(0.5)  # the receiver writes each request as it arrives
            live_spans = received(out)
            # Export one received run again, from its store, the way `loopterm export --format otlp` does.
            store = Store.open(tmp / "livereceived0" / "bench.db", create=False)
            started = time.perf_counter()
            spans = lineage_spans(store, run_ids[0])
            built = time.perf_counter() - started
            send(spans, good)
            exported = time.perf_counter() - started
            store.close()
            time.sleep(0.5)
            export_received = received(out) - live_spans
        finally:
            receiver.kill()
            receiver.wait()

    base = statistics.median([t for times, _ in results["no traces"] for t in times])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    print(f"{args.iterations} iterations a run, each way twice, interleaved")
    print("| way | median ms/iter | ratio to no traces | close() at exit, s |")
    print("|---|---|---|---|")
    for label, rounds in results.items():
        median = statistics.median([t for times, _ in rounds for t in times])
        flush = max(f for _, f in rounds)
        print(f"| {label} | {median * 1e3:.3f} | {median / base:.2f} | {flush:.2f} |")
    expected = 2 * (args.iterations * 3 + 1)  # per iteration: itself, chat, execute_tool (no gates); plus the run
    print(f"spans received live: {live_spans} of {expected} sent by the two received runs")
    print(f"export of one run: {len(spans)} spans built in {built:.3f} s, built and sent in {exported:.3f} s "
          f"({len(spans) / exported:,.0f} spans/s); received {export_received}")


if __name__ == "__main__":
    main()
