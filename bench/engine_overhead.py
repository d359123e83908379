"""Engine overhead per iteration: scripted model with no delay, a no-op tool, the durable store.

Two runs of the same loop in one process, reported side by side:
  engine only    an in-process client that answers instantly (the engine's own work:
                 prompt, journal writes with fsync-level commits, state fold, invariants)
  via litellm    the `scripted/` provider through litellm.acompletion (adds litellm's
                 request machinery, token counting and cost calculation)
Each reports the median per-iteration time of the first and the last 100 iterations,
so a cost that grows with run length shows up as a ratio above 1.

    python bench/engine_overhead.py [--iterations 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from loopterm.core import Loop, LoopState, tool  # noqa: E402
from loopterm.core.engine import Engine  # noqa: E402
from loopterm.core.events import IterationCommitted, IterationStarted  # noqa: E402
from loopterm.store import Store  # noqa: E402

REPLY = json.dumps({"action": {"tool": "noop", "args": {}}, "subgoal": "keep going", "confidence": 0.5, "reasoning": "bench"})


@tool
def noop() -> str:
    """Do nothing."""
    return "ok"


class InstantClient:
    """Answers at once with a fixed reply; no litellm."""

    temperature = 0.0

    def estimate(self, messages: list, max_output_tokens: int) -> tuple[int, float]:
        return 100 + max_output_tokens, 0.0

    async def complete(self, messages: list, *, iteration: int, call_index: int = 0):  # noqa: ANN201
        from loopterm.core.model import ModelReply

        return ModelReply(text=REPLY, tokens_in=100, tokens_out=20, cost_usd=0.0, latency_ms=0.0, model="instant", calls=1)


def make_loop(tmp: Path, n: int) -> Loop:
    script = tmp / "script.json"
    script.write_text(json.dumps({"price": {"input_cost_per_token": 1e-7, "output_cost_per_token": 2e-7},
                                  "turns": [REPLY], "after_end": "repeat_last"}))
    return Loop(name="bench", goal="iterate", state=LoopState, tools=[noop], script=script,
                max_iterations=n, stall_window=None)


async def measure(loop: Loop, tmp: Path, client: object | None) -> list[float]:
    store = Store.open(tmp / "bench.db")
    engine = Engine.create(loop, store, loop_ref="bench", workspace_root=tmp / "ws", workdir=tmp, client=client)
    times: list[float] = []
    started = [0.0]

    def on_event(event: object) -> None:
        if isinstance(event, IterationStarted):
            started[0] = time.perf_counter()
        elif isinstance(event, IterationCommitted):
            times.append(time.perf_counter() - started[0])

    engine.subscribe(on_event)
    run = await engine.run()
    assert run.iterations == loop.max_iterations, run
    return times


def report(label: str, times: list[float]) -> str:
    first = statistics.median(times[:100]) * 1e3
    last = statistics.median(times[-100:]) * 1e3
    return f"| {label} | {len(times)} | {first:.2f} | {last:.2f} | {last / first:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args()
    from loopterm.core.model import check_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        loop = make_loop(tmp, args.iterations)
        check_model(loop.model, loop.script)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        engine_only = asyncio.run(measure(loop, tmp / "a", InstantClient()))
        via_litellm = asyncio.run(measure(loop, tmp / "b", None))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    print("| path | iterations | median ms/iter (first 100) | median ms/iter (last 100) | last/first |")
    print("|---|---|---|---|---|")
    print(report("engine only (instant client)", engine_only))
    print(report("scripted model via litellm", via_litellm))


if __name__ == "__main__":
    main()
