"""The built-in `codefix` loop: the model writes solution.py until real gates pass.

Offline by default: `scripted/codefix` answers from script.json, a three-act
story (syntax error -> one failing test -> green) that shows gate feedback
driving each next iteration. With `--model openai/gpt-4o-mini` (or any litellm
model) the same loop runs against a real model.

Workspace: the contents of ./tests (test_solution.py, conftest.py) are copied
into the run's scratch workspace; the model adds solution.py next to them.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from loopterm.core.budget import Budget
from loopterm.core.gates import CommandGate
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loop import Loop
from loopterm.core.state import LoopState
from loopterm.examples.codefix.tools import read_file, write_file

HERE = Path(__file__).resolve().parent

GOAL = """\
Implement slugify(text: str) -> str in solution.py so the tests in test_solution.py pass.
Spec: lowercase the text; fold accented letters to ASCII (unicodedata NFKD, drop what is not ASCII);
every run of characters that are not a-z or 0-9 becomes a single '-'; strip leading and trailing '-'.
Examples: "Hello World" -> "hello-world", "Crème Brûlée" -> "creme-brulee", "!!!" -> "".
Write the whole module with write_file(path="solution.py", content=...); read_file shows any workspace file.
Only solution.py may be written: the tests are the specification and must not be edited."""


class CodefixState(LoopState):
    """Codefix's state: limits a person may edit from the TUI (e.g. allow another file)."""

    allowed_files: list[str] = ["solution.py"]  # the only paths write_file may target
    max_facts: int = 20  # working-memory facts before the context is pruned
    max_context_tokens: int = 5_000  # working-memory token count before the context is pruned


def normalize(path: str) -> str:
    """One spelling per file, so './solution.py' and 'solution.py' count as the same target."""
    return posixpath.normpath(str(path).replace("\\", "/"))


def written_paths(state: LoopState) -> list[str]:
    """Every path write_file was asked to write, refused attempts included: intent is what matters."""
    return [normalize(r.args.get("path", "")) for r in state.tool_results if r.tool == "write_file"]


def only_solution_written(state: LoopState) -> bool:
    """The model fixes the code, never the tests: a write to any other path needs a person."""
    allowed = {normalize(p) for p in getattr(state, "allowed_files", ["solution.py"])}
    return all(p in allowed for p in written_paths(state))


def context_bounded(state: LoopState) -> bool:
    """Working memory stays small enough to be facts, not a narrative that crowds out the task."""
    facts_cap = getattr(state, "max_facts", 20)
    tokens_cap = getattr(state, "max_context_tokens", 5_000)
    return len(state.memory.facts) <= facts_cap and state.memory.token_count <= tokens_cap


def tools_keep_working(state: LoopState) -> bool:
    """Two failed tool calls in a row (refused path, missing file) mean the approach needs to change."""
    last = state.tool_results[-2:]
    return not (len(last) == 2 and not any(r.ok for r in last))


INVARIANTS = [
    Invariant(
        name="solution_only",
        check=only_solution_written,
        remediation=Remediation.ESCALATE,
        description="write_file only ever targets solution.py (the shipped tests are never edited)",
    ),
    Invariant(
        name="bounded_context",
        check=context_bounded,
        remediation=Remediation.PRUNE_CONTEXT,
        description="working memory holds at most max_facts facts and max_context_tokens tokens",
    ),
    Invariant(
        name="tools_keep_working",
        check=tools_keep_working,
        remediation=Remediation.CHANGE_STRATEGY,
        description="the last two tool calls did not both fail",
    ),
]

GATES = [
    CommandGate(name="compile", argv=["{python}", "-m", "py_compile", "solution.py"], timeout=30.0),
    CommandGate(
        name="tests",
        # -c devnull / --rootdir / --confcutdir: ignore any pytest config or conftest above the
        # workspace (e.g. a project's pyproject.toml when the workspace lives under it).
        # -B and no:cacheprovider: leave no .pyc or .pytest_cache behind in the workspace.
        argv=[
            "{python}", "-B", "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
            "-c", os.devnull, "--rootdir={workspace}", "--confcutdir={workspace}", "test_solution.py",
        ],
        # Plugins installed beside loopterm (a dev environment's) are not the workspace's business,
        # and loading them costs seconds per gate.
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        timeout=120.0,
    ),
]

loop = Loop(
    name="codefix",
    description="fix code until real gates pass: rewrites solution.py until pytest passes",
    goal=GOAL,
    state=CodefixState,
    tools=[write_file, read_file],
    gates=GATES,
    invariants=INVARIANTS,
    script=HERE / "script.json",
    workspace_files=HERE / "tests",
    max_iterations=8,
    tool_history=None,  # solution_only judges every write the run ever asked for, so keep them all
    budget=Budget(usd=0.05, tokens=60_000),
)
