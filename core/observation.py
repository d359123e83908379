"""Observation: what an iteration's tool call and gates showed, as one-line facts, not narratives.

The engine adds one fact per iteration to working memory (the newest MAX_FACTS stay): the tool's
outcome and each gate's verdict with the line of its output that says most (a SyntaxError, a
pytest FAILED line), so later prompts keep the gist after the full gate output has moved on.
A loop's own `observe` adds key -> value facts (`memory.known`), which the engine checks
against long-term memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from loopterm.core.gates import GateResult
from loopterm.core.state import ToolRecord

# Lines that carry a failure's point, in the order tools print them (the last such line wins).
_TELLING = re.compile(r"(\w*Error\b|\w*Exception\b|\bFAILED\b|\bassert\b|\b[Ee]rror:|\bfatal:|timed out)")


def headline(text: str, limit: int = 160) -> str:
    """The most telling line of a command's output: the last that names an error, else the last line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    line = next((line for line in reversed(lines) if _TELLING.search(line)), lines[-1])
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def tool_fact(record: ToolRecord | None) -> str:
    if record is None:
        return "no action"
    return f"{record.tool} ok" if record.ok else f"{record.tool} error: {headline(record.error or '', 120)}"


def gate_fact(gate: GateResult) -> str:
    if gate.passed:
        return f"{gate.name} passed"
    why = headline(gate.error or "") or headline(gate.stderr) or headline(gate.stdout)
    return f"{gate.name} failed" + (f" ({why})" if why else "")


def iteration_fact(n: int, record: ToolRecord | None, gates: Iterable[GateResult]) -> str:
    verdicts = ", ".join(gate_fact(g) for g in gates) or "no gates"
    return f"iteration {n}: {tool_fact(record)}; {verdicts}"
