"""TUI performance: opening a 10,000-iteration run, keystroke latency while a loop appends, memory.

The spec (issue 4, Performance): opening a stored 10,000-iteration run shows the first screen
in under 1 s; a keystroke (moving the selection, switching a tab) repaints in under 100 ms while
a loop appends 50 iterations a second; memory stays bounded as the run grows (no widget per
iteration).

Setup: the real `Engine` on the real durable `Store` (SQLite, every iteration committed), an
in-process client that answers at once (as in engine_overhead.py), a `LoopState` subclass with
four fields of its own set by `Loop.observe`, a no-op tool, no gates, stall_window above the run
length. One database holds a 1,000- and a 10,000-iteration run. Every measurement runs the real
`LooptermApp` under `App.run_test(size=(140, 42))` (headless) in a fresh child process.

  open        t0 = just before `LooptermApp(db, watch_run=RUN)` is constructed (imports done);
              "first rows on screen" = the first frame the App paints (`App._display`) after the
              timeline holds rows and has laid them out; "all rows loaded" = the view's loader has
              streamed every iteration into the timeline and folded the events.
  keystroke   a key is posted to the App's driver exactly as `Pilot.press` does (t0); "handled" =
              the App finished what the key causes (down arrow: the selection moved and the
              detail pane shows the new iteration, `_show_detail` returned; right arrow on the
              detail tabs: the next tab is active and rendered, `_render_tab` returned);
              "repainted" = the end of the first frame painted after that (the compositor's
              update turned into terminal output: `CompositorUpdate.render_segments`, which a
              headless App skips, is done by the probe so its cost is counted);
              "after_refresh" = a `screen.call_after_refresh` callback queued when handled fires
              (the screen is idle and clean); "CPU to repaint" = the process's CPU time (all its threads)
              from the key to the repaint: what a press costs whatever else loads the machine. The App runs as a person would see it (not
              `frozen`: animations on). The next key is sent 60-90 ms after the previous one was
              repainted (a fast typist, and never two keys in flight); each series stops after
              30 s (n says how many presses were timed) so a stalled App cannot stall the bench.
              Full garbage collections during the presses are counted and timed, wall and CPU
              (`gc.callbacks`). Tab presses:
              every 7 presses the probe selects the next iteration (not timed), so every timed
              press renders its tab afresh rather than from the pane's cache.
              Three conditions: the stored 10,000-iteration run with nothing running; a new run
              executing in the App's own event loop (what `loopterm run` does), paced to 50
              iterations a second; and `watch` (another process executing): the 10,000-iteration
              run resumed by a child process at 50 iterations a second while the App follows
              the store.
  memory      in a child that does nothing else: tracemalloc's traced bytes and RSS (from
              /proc/self/statm) after opening the 1,000- and the 10,000-iteration run, both
              relative to just before the App was constructed, and the widgets in the DOM
              (`app.query("*")` on the main screen).

    python bench/tui_perf.py [--iterations 10000] [--small 1000] [--presses 50] [--rate 50] [--profile]
                              [--cache DIR] [--no-freeze]

--profile runs the in-App and the watch conditions again under cProfile and prints the heaviest functions.
--no-freeze turns off the App's heap freezing (tui/heap.py) in the measured children: the figures before it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from loopterm.core import Loop, LoopState, tool  # noqa: E402
from loopterm.core.engine import Engine  # noqa: E402
from loopterm.core.events import IterationStarted  # noqa: E402
from loopterm.core.model import ModelReply  # noqa: E402
from loopterm.store import Store  # noqa: E402

REF = "bench/tui_perf.py:loop"
THEME = "textual-dark"
SIZE = (140, 42)
OPEN_TARGET_S = 1.0
KEY_TARGET_MS = 100.0
TAB_CYCLE = 7  # timed tab presses between two (untimed) selection moves: each timed press renders afresh


@tool
def noop() -> str:
    """Do nothing."""
    return "ok"


class BenchState(LoopState):
    step: int = 0
    checksum: str = ""
    phase: str = "start"
    score: float = 0.0


def observe(state: Any, decision: Any, tool_record: Any, gates: Any) -> Any:
    i = state.iteration
    return state.model_copy(update={"step": i, "checksum": f"{(i * 2654435761) % 2**32:08x}",
                                    "phase": ("explore", "refine", "verify")[i % 3], "score": (i % 100) / 100})


def make_loop(max_iterations: int) -> Loop:
    return Loop(name="tuiperf", goal="iterate", state=BenchState, tools=[noop], model="instant/bench",
                max_iterations=max_iterations, stall_window=max_iterations + 1, observe=observe)


def reply(iteration: int) -> str:
    return json.dumps({"action": {"tool": "noop", "args": {}}, "subgoal": f"keep going, step {iteration}",
                       "confidence": 0.5 + (iteration % 5) / 10,
                       "reasoning": f"Iteration {iteration}: nothing is wrong yet, so the next step is the same no-op. "
                                    "This sentence pads the reasoning to a realistic couple of lines."})


class InstantClient:
    """Answers at once with a fixed-shape reply; no litellm (as in engine_overhead.py)."""

    temperature = 0.0

    def estimate(self, messages: list, max_output_tokens: int) -> tuple[int, float]:
        return 100 + max_output_tokens, 0.0

    async def complete(self, messages: list, *, iteration: int, call_index: int = 0) -> ModelReply:
        return ModelReply(text=reply(iteration), tokens_in=100, tokens_out=20, cost_usd=0.0001 * (1 + iteration % 7),
                          latency_ms=0.0, model="instant", calls=1)


class PacedClient(InstantClient):
    """Answers on a fixed schedule: one reply every 1/rate seconds (no bursts to catch up)."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / rate
        self.next: float | None = None

    async def complete(self, messages: list, *, iteration: int, call_index: int = 0) -> ModelReply:
        now = time.perf_counter()
        if self.next is None or now - self.next > 5 * self.period:  # catch up a short lag, not a long one
            self.next = now
        delay = self.next - now
        self.next += self.period
        if delay > 0:
            await asyncio.sleep(delay)
        return await super().complete(messages, iteration=iteration, call_index=call_index)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))]


def machine() -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except OSError:
        pass
    return (f"{platform.machine()}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


# ---------------------------------------------------------------------- building the runs


def build(db: Path, root: Path, sizes: list[int]) -> list[str]:
    """Run the real engine for each size; returns the run ids."""

    async def one(n: int) -> str:
        store = Store.open(db)
        engine = Engine.create(make_loop(n), store, loop_ref=REF, workspace_root=root / "ws", workdir=root,
                               client=InstantClient())
        count = [0]

        def on_event(event: object) -> None:
            if isinstance(event, IterationStarted):
                count[0] += 1
                if count[0] % 2000 == 0:
                    print(f"  building: iteration {count[0]} of {n}", file=sys.stderr, flush=True)

        engine.subscribe(on_event)
        run = await engine.run()
        assert run.iterations == n, run
        store.close()
        return run.id

    return [asyncio.run(one(n)) for n in sizes]


def copy_db(source: Path, target: Path) -> None:
    """A consistent copy (SQLite's backup API: the WAL's pages included)."""
    import sqlite3

    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def built(db: Path, root: Path, small: int, big: int, cache: Path | None) -> tuple[str, str]:
    """Build the two runs into `db`, or copy them from `cache` (filled on the first use)."""
    marker = cache / f"runs-{small}-{big}.json" if cache is not None else None
    if marker is not None and marker.exists():
        small_id, big_id = json.loads(marker.read_text())
        copy_db(marker.with_suffix(".db"), db)
        print(f"runs of {small} and {big} iterations copied from {cache}", file=sys.stderr)
        return small_id, big_id
    t = time.perf_counter()
    small_id, big_id = build(db, root, [small, big])
    print(f"built runs of {small} and {big} iterations in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if marker is not None:
        cache.mkdir(parents=True, exist_ok=True)
        copy_db(db, marker.with_suffix(".db"))
        marker.write_text(json.dumps([small_id, big_id]))
    return small_id, big_id


# ---------------------------------------------------------------------- probing the App


class Probe:
    """Timestamps what the App does: frames painted, and the end of what a key press causes."""

    def __init__(self, app: Any) -> None:
        from textual._compositor import CompositorUpdate

        self.app = app
        self.kind: str | None = None
        self.t0 = 0.0
        self.c0 = 0.0
        self.effect: float | None = None
        self.painted: float | None = None
        self.painted_cpu: float | None = None
        self.after_refresh: float | None = None
        self.frames = 0
        self.on_frame: Callable[[float], None] | None = None
        paint = app._display

        def display(screen: Any, renderable: Any) -> None:
            paint(screen, renderable)
            if isinstance(renderable, CompositorUpdate):
                renderable.render_segments(app.console)  # the terminal output a headless App does not produce
            now = time.perf_counter()
            self.frames += 1
            if self.effect is not None and self.painted is None:
                self.painted = now
                self.painted_cpu = time.process_time()
            if self.on_frame is not None:
                self.on_frame(now)

        app._display = display

    def hook(self) -> None:
        """After mount: mark when a selection move or a tab switch has been fully handled."""
        app = self.app
        show_detail = app._show_detail
        detail = app.detail
        render_tab = detail._render_tab

        def shown(n: int) -> None:
            show_detail(n)
            self._done("down")

        def rendered(tab: str) -> None:
            render_tab(tab)
            self._done("tab")

        app._show_detail = shown
        detail._render_tab = rendered

    def _done(self, kind: str) -> None:
        if self.kind == kind and self.effect is None:
            self.effect = time.perf_counter()
            self.app.screen.call_after_refresh(self._refreshed)

    def _refreshed(self) -> None:
        if self.after_refresh is None:
            self.after_refresh = time.perf_counter()

    def arm(self, kind: str) -> None:
        self.kind = kind
        self.effect = self.painted = self.painted_cpu = self.after_refresh = None
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()


async def until(condition: Callable[[], Any], what: str, timeout: float = 60.0, step: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)


def send_key(app: Any, key: str) -> None:
    """What `Pilot.press` does first (it then waits for the process to go idle, which a busy App never does)."""
    from textual import events

    event = events.Key(key, None)
    event.set_sender(app)
    app._driver.send_message(event)


async def press(app: Any, probe: Probe, kind: str, key: str) -> dict[str, float | None]:
    probe.arm(kind)
    send_key(app, key)
    await until(lambda: probe.painted is not None, f"{key} to be handled and painted", timeout=120)
    await until(lambda: probe.after_refresh is not None, "the screen to be clean", timeout=5)
    t0 = probe.t0
    return {"handled": probe.effect - t0, "painted": probe.painted - t0,  # type: ignore[operator]
            "painted_cpu": probe.painted_cpu - probe.c0,  # type: ignore[operator]
            "after_refresh": probe.after_refresh - t0, "tab": app.detail.active_tab}  # type: ignore[operator]


async def select(app: Any, probe: Probe, row: int) -> None:
    """Move the selection without timing it (a programmatic move, as a mouse click would)."""
    probe.arm("down")
    app.timeline.move_cursor(row=row, animate=False)
    await until(lambda: probe.painted is not None, "the selection to be shown", timeout=30)


async def keystrokes(app: Any, probe: Probe, presses: int, rng: random.Random, budget_s: float = 60.0) -> dict[str, Any]:
    """`presses` timed down arrows, then `presses` timed right arrows on the detail tabs (each series stops
    early, and says so, when it has used half of `budget_s`: a stalled App must not stall the bench)."""
    from textual.widgets import Tabs

    timeline = app.timeline
    rows_before, t_start = timeline.row_count, time.perf_counter()
    pauses: list[tuple[int, float, float]] = []
    began = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[:] = [time.perf_counter(), time.process_time()]
        else:
            pauses.append((info["generation"], time.perf_counter() - began[0], time.process_time() - began[1]))

    gc.callbacks.append(on_gc)
    try:
        timeline.focus()
        await select(app, probe, max(0, timeline.row_count - presses - 20))
        samples: dict[str, list[dict[str, Any]]] = {"down": [], "tab": []}
        deadline = time.monotonic() + budget_s / 2
        for _ in range(presses):
            samples["down"].append(await press(app, probe, "down", "down"))
            await asyncio.sleep(rng.uniform(0.06, 0.09))
            if time.monotonic() > deadline:
                break
        tabs = app.detail.query_one(Tabs)
        tabs.focus()
        await asyncio.sleep(0.1)
        deadline = time.monotonic() + budget_s / 2
        for i in range(presses):
            if i and i % TAB_CYCLE == 0:
                await select(app, probe, timeline.cursor_row + 1)
                await asyncio.sleep(0.05)
            samples["tab"].append(await press(app, probe, "tab", "right"))
            await asyncio.sleep(rng.uniform(0.06, 0.09))
            if time.monotonic() > deadline:
                break
    finally:
        gc.callbacks.remove(on_gc)
    elapsed = time.perf_counter() - t_start
    full = [p * 1e3 for g, p, _ in pauses if g == 2]
    full_cpu = [c * 1e3 for g, _, c in pauses if g == 2]
    out: dict[str, Any] = {"appended_per_s": (timeline.row_count - rows_before) / elapsed, "rows": timeline.row_count,
                           "seconds": elapsed, "gc_full": len(full), "gc_full_max_ms": max(full, default=0.0),
                           "gc_full_cpu_max_ms": max(full_cpu, default=0.0)}
    for kind, rows in samples.items():
        for measure in ("handled", "painted", "after_refresh", "painted_cpu"):
            values = [r[measure] * 1e3 for r in rows if r[measure] is not None]
            out[f"{kind}_{measure}"] = {"median": statistics.median(values), "p95": pct(values, 95),
                                        "max": max(values), "n": len(values)}
    by_tab: dict[str, list[float]] = {}
    for r in samples["tab"]:
        by_tab.setdefault(r["tab"], []).append(r["painted"] * 1e3)
    out["tab_painted_by_tab"] = {tab: statistics.median(v) for tab, v in by_tab.items()}
    return out


def new_app(db: Path, run_id: str | None, loop: Loop) -> Any:
    from loopterm.tui.app import LooptermApp

    return LooptermApp(db, watch_run=run_id, theme=THEME, frozen=False, loops={REF: loop})


async def wait_loaded(app: Any, n: int, timeout: float = 120.0) -> None:
    await until(lambda: app.view is not None and not app.view.loading and app.timeline.row_count >= n,
                f"{n} rows loaded", timeout=timeout)


# ---------------------------------------------------------------------- child phases


async def phase_open(db: Path, run_id: str, n: int, presses: int, trace: bool) -> dict[str, Any]:
    """Open a stored run; with trace, only memory; without, timings, RSS, widgets and idle keystrokes."""
    loop = make_loop(n)
    gc.collect()
    if trace:
        tracemalloc.start()
    heap0 = tracemalloc.get_traced_memory()[0] if trace else 0
    rss0 = rss_mb()
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    app = new_app(db, run_id, loop)
    probe = Probe(app)

    def on_frame(now: float) -> None:
        if "first" in marks:
            return
        try:
            timeline = app.timeline
        except Exception:
            return
        if timeline.row_count > 0 and not getattr(timeline, "_require_update_dimensions", False):  # (a DataTable's)
            marks["first"] = now
            marks["first_rows"] = timeline.row_count

    probe.on_frame = on_frame
    out: dict[str, Any] = {}
    async with app.run_test(size=SIZE) as pilot:
        marks["mounted"] = time.perf_counter()
        await wait_loaded(app, n)
        marks["all"] = time.perf_counter()
        await pilot.pause()
        await asyncio.sleep(0.3)  # a poll or two
        gc.collect()
        out["widgets"] = len(list(app.main.query("*")))
        out["rows"] = app.timeline.row_count
        out["rss_mb"] = rss_mb() - rss0
        if trace:
            heap, peak = tracemalloc.get_traced_memory()
            out["heap_mb"] = (heap - heap0) / 2**20
            out["heap_peak_mb"] = (peak - heap0) / 2**20
            tracemalloc.stop()
        else:
            out["first_s"] = marks["first"] - t0
            out["first_rows"] = marks["first_rows"]
            out["mounted_s"] = marks["mounted"] - t0
            out["all_s"] = marks["all"] - t0
            if presses:
                probe.hook()
                out["keys"] = await keystrokes(app, probe, presses, random.Random(1))
        await app.action_quit()
    return out


async def phase_live_window(db: Path, root: Path, presses: int, rate: float, profile: bool = False) -> dict[str, Any]:
    """A new run executing in the App's own event loop (as `loopterm run` does), paced to `rate` per second."""
    loop = make_loop(100_000)
    app = new_app(db, None, loop)
    engine = Engine.create(loop, app.store, loop_ref=REF, workspace_root=root / "ws", workdir=root,
                           client=PacedClient(rate), wait_on_person=True)
    app.watch_run = engine.run_id
    probe = Probe(app)
    async with app.run_test(size=SIZE):
        await wait_loaded(app, 0)
        probe.hook()
        app.own(engine)
        await until(lambda: app.timeline.row_count >= presses + 40, "the live run to have rows", timeout=30)
        with profiled(profile):
            out = await keystrokes(app, probe, presses, random.Random(2))
        engine.request_stop("bench done")
        await until(lambda: not app.engines, "the engine to stop", timeout=30)
        await app.action_quit()
    return out


async def phase_live_watch(db: Path, run_id: str, n: int, presses: int, rate: float, profile: bool) -> dict[str, Any]:
    """The stored run resumed by another process at `rate` per second; the App follows it through the store."""
    writer = subprocess.Popen([sys.executable, __file__, "--phase", "writer", "--db", str(db), "--run", run_id,
                               "--rate", str(rate), "--n", str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        line = await asyncio.to_thread(writer.stdout.readline)  # the writer's engine is built and running
        assert line.startswith("running"), line
        app = new_app(db, run_id, make_loop(n))
        probe = Probe(app)
        profiler = None
        async with app.run_test(size=SIZE):
            await wait_loaded(app, n)
            await asyncio.sleep(1.0)  # following the store
            probe.hook()
            with profiled(profile):
                out = await keystrokes(app, probe, presses, random.Random(3))
            await app.action_quit()
        return out
    finally:
        writer.terminate()
        writer.wait(timeout=30)


@contextmanager
def profiled(profile: bool) -> Iterator[None]:
    """With `profile`, cProfile the block and print its heaviest functions to stderr."""
    if not profile:
        yield
        return
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(25)
            print(buf.getvalue(), file=sys.stderr)


def phase_writer(db: Path, run_id: str, n: int, rate: float) -> None:
    """Resume run `run_id` for up to 5,000 more iterations, paced to `rate` per second."""
    store = Store.open(db)
    total = store.get_run(run_id).iterations + 5000
    store.update_run(run_id, max_iterations=total)
    loop = make_loop(total)
    engine = Engine(loop, store, store.get_run(run_id), client=PacedClient(rate), workdir=db.parent)
    print("running", flush=True)
    asyncio.run(engine.run())


def child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[:2]} failed ({proc.returncode})")
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def report(n: int, small: int, rate: float, res: dict[str, Any]) -> str:
    op, mem_s, mem_b, rss_s = res["open"], res["mem_small"], res["mem_big"], res["open_small"]
    lines = [
        "| measure | figure | target | result |",
        "|---|---|---|---|",
        f"| open {n:,}: first rows on screen (from constructing the App) | {op['first_s']:.3f} s "
        f"({op['first_rows']} rows) | < {OPEN_TARGET_S:g} s | {verdict(op['first_s'] < OPEN_TARGET_S)} |",
        f"| open {n:,}: App mounted (run_test ready) | {op['mounted_s']:.3f} s |  |  |",
        f"| open {n:,}: all rows loaded | {op['all_s']:.2f} s |  |  |",
    ]
    conditions = [("idle", f"stored {n:,} run, nothing running", op["keys"]),
                  ("window", f"new run executing in the App, {rate:g}/s", res["window"]),
                  ("watch", f"watch: {n:,} run resumed by another process, {rate:g}/s", res["watch"])]
    notes = []
    for _, label, keys in conditions:
        for kind, what in (("down", "down arrow (selection)"), ("tab", "right arrow (detail tab)")):
            painted = keys[f"{kind}_painted"]
            handled = keys[f"{kind}_handled"]
            clean = keys[f"{kind}_after_refresh"]
            cpu = keys[f"{kind}_painted_cpu"]
            lines.append(
                f"| key to repaint, {what}; {label} (appending {keys['appended_per_s']:.0f}/s) | "
                f"median {painted['median']:.0f} ms, p95 {painted['p95']:.0f} ms, max {painted['max']:.0f} ms, "
                f"n={painted['n']} (handled: median {handled['median']:.0f}, p95 {handled['p95']:.0f}; "
                f"after_refresh p95 {clean['p95']:.0f}; CPU to repaint: median {cpu['median']:.0f}, p95 {cpu['p95']:.0f}, "
                f"max {cpu['max']:.0f}) | p95 < {KEY_TARGET_MS:g} ms | {verdict(painted['p95'] < KEY_TARGET_MS)} |")
        tabs = ", ".join(f"{tab} {ms:.0f}" for tab, ms in keys["tab_painted_by_tab"].items())
        notes.append(f"- {label}: {keys['seconds']:.0f} s of key presses, {keys['gc_full']} full (generation 2) "
                     f"garbage collections, longest {keys['gc_full_max_ms']:.0f} ms "
                     f"({keys.get('gc_full_cpu_max_ms', 0):.0f} ms CPU); right arrow to repaint, "
                     f"median by tab (ms): {tabs}")
    growth = (mem_b["heap_mb"] - mem_s["heap_mb"]) * 2**20 / (n - small)
    lines += [
        f"| widgets in the DOM after opening {small:,} / {n:,} | {mem_s['widgets']} / {mem_b['widgets']} | "
        f"same at both sizes | {verdict(mem_s['widgets'] == mem_b['widgets'])} |",
        f"| Python heap held after opening {small:,} / {n:,} (tracemalloc) | {mem_s['heap_mb']:.1f} / "
        f"{mem_b['heap_mb']:.1f} MB ({growth / 1024:.2f} KB per iteration) |  |  |",
        f"| peak Python heap while opening {small:,} / {n:,} | {mem_s['heap_peak_mb']:.1f} / {mem_b['heap_peak_mb']:.1f} MB |  |  |",
        f"| RSS added by opening {small:,} / {n:,} | {rss_s['rss_mb']:.0f} / {op['rss_mb']:.0f} MB |  |  |",
    ]
    return "\n".join([*lines, "", *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1_000, help="the smaller run, for the memory comparison")
    parser.add_argument("--presses", type=int, default=50, help="timed presses per key and condition")
    parser.add_argument("--rate", type=float, default=50.0, help="iterations per second appended while keys are timed")
    parser.add_argument("--profile", action="store_true", help="run the in-App and watch conditions again under cProfile")
    parser.add_argument("--cache", type=Path, help="keep the built runs in this directory and reuse them next time "
                        "(each bench run works on a copy: the watch condition appends to the big run)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="measure without the App's heap freezing (tui/heap.py), to compare before and after")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        db = Path(args.db)
        if args.no_freeze:
            from loopterm.tui import heap

            heap.freeze = lambda: None  # type: ignore[assignment]
            heap.HeapKeeper.check = lambda self, loaded: None  # type: ignore[method-assign]
        if args.phase == "writer":
            phase_writer(db, args.run, args.n, args.rate)
            return
        if args.phase == "open":
            result = asyncio.run(phase_open(db, args.run, args.n, args.presses, args.trace))
        elif args.phase == "window":
            result = asyncio.run(phase_live_window(db, db.parent, args.presses, args.rate, args.profile))
        elif args.phase == "watch":
            result = asyncio.run(phase_live_watch(db, args.run, args.n, args.presses, args.rate, args.profile))
        else:
            raise SystemExit(f"unknown phase {args.phase}")
        print(json.dumps(result))
        return

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        db = root / "loopterm.db"
        env = {**os.environ, "LOOPTERM_CONFIG_DIR": str(root / "config")}
        os.environ["LOOPTERM_CONFIG_DIR"] = env["LOOPTERM_CONFIG_DIR"]
        small_id, big_id = built(db, root, args.small, args.iterations, args.cache)
        common = ["--db", str(db), "--presses", str(args.presses), "--rate", str(args.rate),
                  *(["--no-freeze"] if args.no_freeze else [])]
        res: dict[str, Any] = {}
        steps = [
            ("open", ["--phase", "open", "--run", big_id, "--n", str(args.iterations)]),
            ("open_small", ["--phase", "open", "--run", small_id, "--n", str(args.small), "--presses", "0"]),
            ("mem_small", ["--phase", "open", "--run", small_id, "--n", str(args.small), "--presses", "0", "--trace"]),
            ("mem_big", ["--phase", "open", "--run", big_id, "--n", str(args.iterations), "--presses", "0", "--trace"]),
            ("window", ["--phase", "window"]),
            ("watch", ["--phase", "watch", "--run", big_id, "--n", str(args.iterations)]),
        ]
        for name, extra in steps:
            t = time.perf_counter()
            res[name] = child([*common, *extra], env)
            print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        if args.profile:
            child([*common, "--phase", "window", "--profile"], env)
            child([*common, "--phase", "watch", "--run", big_id, "--n", str(args.iterations + 0), "--profile"], env)
    print(f"machine: {machine()}")
    print(f"python bench/tui_perf.py --iterations {args.iterations} --small {args.small} --presses {args.presses} "
          f"--rate {args.rate:g}{' --no-freeze' if args.no_freeze else ''}  ({time.perf_counter() - began:.0f} s); "
          f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(report(args.iterations, args.small, args.rate, res))


if __name__ == "__main__":
    main()
