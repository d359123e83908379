"""Loops that call loops: a nested run is a child run in the store, and cycles are refused.

A loop calls another through a tool (`fan_out` builds one): the tool asks the
engine's `spawn` for a child run per item, runs up to `parallel` of them at
once, and hands their results back as its output. Each child is a run of its
own (origin "child", parent_run the caller), listed under its caller in
`loopterm runs`, watchable, resumable. A crash mid-call does not start the
children again: each is keyed by the calling tool call and item, and a second
call with the same key resumes (or simply reads) the child it started before.

Cycles: `check_calls` walks the graph of loops calling loops before a run is
created and refuses any loop that can reach itself. The engine checks the
chain of callers again at runtime, so a loop built dynamically cannot sneak
around the static check.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pydantic import BaseModel

from loopterm.core.errors import ConfigError
from loopterm.core.tools import Tool, ToolContext, tool

if TYPE_CHECKING:
    from loopterm.core.loop import Loop


class ChildResult(BaseModel):
    """What one child run handed back to the loop that called it."""

    item: str
    run_id: str
    loop: str
    status: str
    reason: str | None = None
    iterations: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    result: Any = None


# spawn(loop_ref, goal, key, item, share) -> the child's result; share: the part of the caller's
# remaining budget the child may spend (1/len(items) when a fan-out starts several together)
Spawn = Callable[[str, str, str, str, float], Awaitable[ChildResult]]


class LoopCycleError(ConfigError):
    """A chain of loops that would call itself."""


def cycle_message(chain: list[str]) -> str:
    path = " -> ".join(chain)
    return (f"refused: loops calling each other form a cycle ({path}); a loop may not call itself, "
            "directly or through other loops; remove one of the calls")


def ref_base(ref: str) -> Path | None:
    """The directory of a loop file reference (`/abs/path/file.py:name`); None for a built-in."""
    path = ref.rpartition(":")[0] or ref
    return Path(path).parent if path.endswith(".py") else None


def ref_label(ref: str) -> str:
    """A reference as a person reads it: `file.py:name` for a file, the name for a built-in."""
    path, _, name = ref.rpartition(":")
    return f"{Path(path).name}:{name}" if path.endswith(".py") else ref


def check_calls(loop: "Loop", ref: str, _chain: tuple[tuple[str, str], ...] = ()) -> None:
    """Raise LoopCycleError when `loop` (loaded from `ref`) can reach itself through the loops it calls.

    A reference that does not load is one ConfigError line naming the caller.
    """
    from loopterm.core.loader import load_loop

    chain = (*_chain, (ref, loop.name))
    for call in loop.calls:
        try:
            callee, callee_ref = load_loop(resolve_ref(call, ref_base(ref)))
        except ConfigError as exc:
            raise ConfigError(f"loop {loop.name!r} calls {call!r}, which does not load: {exc}") from None
        refs = [r for r, _ in chain]
        if callee_ref in refs:
            raise LoopCycleError(cycle_message([ref_label(r) for r in [*refs[refs.index(callee_ref):], callee_ref]]))
        check_calls(callee, callee_ref, chain)


def fan_out(
    name: str,
    loop_ref: str,
    *,
    goal: str = "{item}",
    parallel: int = 4,
    description: str | None = None,
    timeout: float = 1_800.0,
) -> Tool:
    """A tool that runs the loop `loop_ref` once per item, up to `parallel` at a time, as child runs.

    `goal` is the child's goal, with `{item}` replaced. The tool's output is a
    JSON list of ChildResult, in the items' order. The executors of a
    planner -> parallel executors -> aggregator topology.
    """
    if parallel < 1:
        raise ValueError("parallel must be at least 1")

    async def run_children(ctx: ToolContext, items: list[str]) -> str:
        if ctx.spawn is None:
            raise RuntimeError("this tool starts child runs and needs the engine's spawn service")
        if not items:
            raise ValueError("items is empty; name at least one item")
        if len(set(items)) != len(items):
            raise ValueError("items repeat; name each item once")
        gate = asyncio.Semaphore(parallel)

        async def one(item: str) -> ChildResult:
            async with gate:
                key = f"{ctx.idempotency_key}:{item}"
                return await ctx.spawn(loop_ref, goal.replace("{item}", item), key, item, 1.0 / len(items))

        results = await asyncio.gather(*(one(item) for item in items))
        return json.dumps([r.model_dump(mode="json") for r in results], ensure_ascii=False)

    run_children.__doc__ = description or f"Run the {loop_ref!r} loop once per item, up to {parallel} at a time."
    # Starting child runs costs money, so it counts as a side effect: a branch or a replay that
    # reaches the same call reuses the recorded children's results instead of running them again
    # (a replay's model could not answer for them). Idempotent: a repeated call finds its children
    # by key, so running it again after a crash starts nothing twice.
    made: Tool = tool(name=name, timeout=timeout, side_effects=True, idempotent=True, on_rewind="reuse")(run_children)
    made.calls = (loop_ref,)
    return made


def child_results(output: str) -> list[ChildResult]:
    """Parse a fan_out tool's output back into results."""
    return [ChildResult.model_validate(item) for item in json.loads(output)]


def resolve_ref(ref: str, base: Path | None) -> str:
    """A relative file reference is read relative to the calling loop's file, if known."""
    from loopterm.core.loader import builtin_loops

    if ref in builtin_loops() or base is None:
        return ref
    path, sep, name = ref.partition(":")
    candidate = base / path
    if not Path(path).is_absolute() and candidate.exists():
        return f"{candidate}{sep}{name}"
    return ref
