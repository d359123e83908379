"""What a loop file must get right beyond pydantic's types, checked when the file is loaded.

A person writing their first loop makes a few mistakes pydantic would let through or word
badly: a misspelt keyword, a string where a function goes, a function with the wrong number
of parameters (found only when the run reaches it), an invariant without a description (the
model would be told only its name). Each is one line naming the field and what to do. Loops
built in code (tests, helpers) are not held to this: only files `loopterm` loads are.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from loopterm.core.errors import ConfigError
from loopterm.core.loop import Loop

GUIDE = "docs/WRITING_LOOPS.md"

# The callables of a Loop, with the parameters each is called with (what the engine passes).
CALLABLES: dict[str, tuple[int, str]] = {
    "observe": (4, "observe(state, decision, tool_record, gates) -> state"),
    "converged": (2, "converged(state, gates) -> bool"),
    "setup": (1, "setup(workspace: Path) -> None"),
    "context": (1, "context(state) -> str"),
    "initial_state": (0, "initial_state() -> state"),
    "result": (1, "result(state) -> value"),
    "consolidate": (2, "consolidate(state, status) -> [(key, value, kind), ...]"),
}


def explain_validation_error(title: str, error: dict[str, Any]) -> str | None:
    """A clearer line for the Loop mistakes people make most; None to keep pydantic's wording."""
    if title != "Loop" or not error.get("loc"):
        return None
    field = str(error["loc"][0])
    kind = error.get("type", "")
    if kind == "extra_forbidden" and len(error["loc"]) == 1:
        close = difflib.get_close_matches(field, list(Loop.model_fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"Loop(...) has no keyword {field!r}; {hint}its keywords are listed in {GUIDE}"
    if kind == "callable_type" and field in CALLABLES and len(error["loc"]) == 1:
        got = type(error.get("input")).__name__
        return f"{field} must be a function called as {CALLABLES[field][1]}, not a {got}; e.g. {field}=my_function"
    return None


def check_loop_file(loop: Loop) -> None:
    """Refuse what a loop file gets wrong and pydantic lets through (ConfigError, one line)."""
    for field, (count, shape) in CALLABLES.items():
        fn = getattr(loop, field)
        if fn is not None and not _takes(fn, count):
            raise ConfigError(f"{field}: {_name(fn)} cannot be called as {shape}; give it {_params(count)}")
    for inv in loop.invariants:
        if not inv.description.strip():
            raise ConfigError(
                f"invariants: {inv.name!r} has no description; add description=\"...\" saying what must hold "
                "(the model is shown it every iteration)"
            )
        if not _takes(inv.check, 1):
            raise ConfigError(f"invariants: {inv.name!r}: its check {_name(inv.check)} cannot be called as "
                              "check(state) -> bool; give it one parameter")
        if inv.custom is not None and not _takes(inv.custom, 1):
            raise ConfigError(f"invariants: {inv.name!r}: its custom {_name(inv.custom)} cannot be called as "
                              "custom(state) -> state; give it one parameter")


def _takes(fn: Callable[..., Any], count: int) -> bool:
    """Whether fn can be called with `count` positional arguments (True when Python cannot tell)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function without a signature: trust it
        return True
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    return "a lambda" if name == "<lambda>" else f"{name}()"


def _params(count: int) -> str:
    return "no parameters" if count == 0 else "one parameter" if count == 1 else f"{count} parameters"
