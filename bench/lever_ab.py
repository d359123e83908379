"""Each hot-path lever against its base revision, call by call inside the real engine (issue 15).

    python bench/lever_ab.py BASE [--workloads list,nested,chat] [--iterations 2000] [--levers f,g]

On a machine shared with other people's test runs, two runs of hot_path.py a minute apart differ by more
than a lever moves them (10-30% under a load average of 3-5), and even hot_path_ab.py's interleaved runs
cannot see a cut of 1-3%. Here one engine runs each workload (bench/peers.py's loop, on /dev/shm) with
every hot function listed in LEVERS wrapped: each call goes, at random, to BASE's implementation (the
module's source at BASE, loaded beside this tree's) or to this tree's, and is timed. The two sides see
the same machine from one microsecond to the next, so the median per call of each compares like with
like. Printed per function: the median per call of each side, and calls per iteration (whichever side
serves a call, the engine goes on with its result: both are meant to be equivalent).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import inspect
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from peers import loopterm_loop  # noqa: E402 - bench/ is this script's own directory, first on sys.path
from workloads import WORKLOADS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# (where the engine finds it: module, attribute path; where BASE has it: file, attribute path)
LEVERS = [
    ("loopterm.core.deciding", "read_rules", "core/prompt.py", "read_rules"),
    ("loopterm.store.db", "encode_prompt", "store/prompts.py", "encode_prompt"),
    ("loopterm.store.states", "diff", "store/delta.py", "diff"),
    ("loopterm.store.db", "Store._update_run", "store/db.py", "Store._update_run"),
    ("loopterm.store.db", "Store._insert_row", "store/db.py", "Store._insert_row"),
    ("loopterm.store.calls", "CallJournal._write_queued", "store/calls.py", "CallJournal._write_queued"),
    ("loopterm.core.policies", "Stall.add", "core/policies.py", "Stall.add"),
    ("loopterm.core.policies", "check_budget", "core/policies.py", "check_budget"),
    # Third round (hotpath): the act phase whole (BASE's act with BASE's ToolExecutor, so its key hashing,
    # wait_for and flush timer all go with it), the decide phase whole, and the reply's JSON check.
    ("loopterm.core.engine", "act", "core/acting.py", "act", "executor"),
    ("loopterm.core.engine", "decide", "core/deciding.py", "decide"),
    ("loopterm.core.decision", "json_problem", "core/decision.py", "json_problem"),
    ("loopterm.store.calls", "CallJournal.tool_call", "store/calls.py", "CallJournal.tool_call"),
    ("loopterm.core.tools", "ToolExecutor.execute", "core/tools.py", "ToolExecutor.execute", "self"),
]


def base_module(rev: str, path: str) -> Any:
    """`path` as it is at `rev`, loaded as a module of its own (its imports resolve to this tree's)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    name = "base_" + path.replace("/", "_").removesuffix(".py")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(name, file.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    os.unlink(file.name)
    return module


def resolve(owner: Any, dotted: str) -> tuple[Any, str]:
    *path, name = dotted.split(".")
    for step in path:
        owner = getattr(owner, step)
    return owner, name


def base_executor(now: Any, bases: dict[str, Any]) -> Any:
    """An engine's ToolExecutor as BASE's class (same journal, run, answers and services), made once."""
    made = getattr(now, "_lever_ab_base", None)
    if made is None:
        cls = bases.setdefault("core/tools.py", base_module(BASE[0], "core/tools.py")).ToolExecutor
        made = cls(**{f.name: getattr(now, f.name) for f in dataclasses.fields(now)})
        now._lever_ab_base = made
    return made


BASE = [""]


def alternate(owner: Any, name: str, base: Callable[..., Any], times: dict[str, list[float]],
              context: str | None = None, bases: dict[str, Any] | None = None) -> None:
    """Each call goes to `base` or to this tree's function at random (a function called twice an iteration
    from two places would give each side one place if they simply took turns), timed into times[side].
    A coroutine function is timed to its end, event-loop turns included. context "executor": the base side
    runs with the engine's (first argument's) executor swapped for BASE's; "self": the base side's first
    argument (an executor) is BASE's."""
    now = getattr(owner, name)
    coin = random.Random(15).random
    clock = time.perf_counter

    def either(*args: Any, **kwargs: Any) -> Any:
        side, fn = ("base", base) if coin() < 0.5 else ("now", now)
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            times[side].append(clock() - start)

    async def either_async(*args: Any, **kwargs: Any) -> Any:
        side, fn = ("base", base) if coin() < 0.5 else ("now", now)
        swapped = None
        if side == "base" and context == "executor":
            engine = args[0]
            swapped, engine.executor = engine.executor, base_executor(engine.executor, bases or {})
        elif side == "base" and context == "self":  # an argument BASE's method does not take yet is left off
            args = (base_executor(args[0], bases or {}), *args[1:])[:len(inspect.signature(base).parameters)]
        start = clock()
        try:
            return await fn(*args, **kwargs)
        finally:
            times[side].append(clock() - start)
            if swapped is not None:
                args[0].executor = swapped

    setattr(owner, name, either_async if inspect.iscoroutinefunction(now) else either)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("--workloads", default="list,nested,chat")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--levers", default="", help="only these functions (their dotted names, comma-separated)")
    args = parser.parse_args()
    from loopterm.core.engine import Engine
    from loopterm.store import Store

    bases: dict[str, Any] = {}
    timed: dict[str, dict[str, list[float]]] = {}
    BASE[0] = args.base
    chosen = set(args.levers.split(",")) if args.levers else None
    for module, dotted, path, base_dotted, *context in LEVERS:
        if chosen is not None and dotted not in chosen:
            continue
        bases.setdefault(path, base_module(args.base, path))
        base_owner, base_name = resolve(bases[path], base_dotted)
        owner, name = resolve(importlib.import_module(module), dotted)
        timed[dotted] = {"base": [], "now": []}
        alternate(owner, name, getattr(base_owner, base_name), timed[dotted], *context, bases=bases)
    print(f"| workload | function | calls/it | base us/call | now us/call | now / base | saved us/it |")
    print("|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        loop, client = loopterm_loop(WORKLOADS[workload], args.iterations)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store = Store.open(Path(tmp) / "bench.db")
            engine = Engine.create(loop, store, loop_ref=f"bench/lever_ab.py:{workload}", workspace_root=Path(tmp) / "ws",
                                   workdir=Path(tmp), client=client())
            asyncio.run(engine.run())
            store.close()
        for dotted, times in timed.items():
            count = len(times["base"]) + len(times["now"])
            if times["base"] and times["now"]:
                base, now = statistics.median(times["base"]) * 1e6, statistics.median(times["now"]) * 1e6
                per_it = count / args.iterations
                print(f"| {workload} | {dotted} | {per_it:.1f} | {base:.1f} | {now:.1f} | {now / base:.2f} | "
                      f"{(base - now) * per_it:.1f} |", flush=True)
            times["base"].clear()
            times["now"].clear()


if __name__ == "__main__":
    sys.exit(main())
