"""The built-in `demo` loop: every supervision feature of loopterm in about a minute, with no key.

A richer sibling of `codefix` (whose file tools and code gates it reuses). The
offline model `scripted/demo` answers from script.json, a story told over
seven iterations:

1. solution.py with a syntax error: the `compile` gate fails and its stderr is
   fed into the next prompt.
2. The syntax is fixed but subtractive forms are missing (4 -> "IIII"): the
   `tests` gate fails and the failing assertions are fed back.
3. The model tries to make the failing test accept "IIII" by rewriting
   test_solution.py. write_file refuses (the shipped tests stay intact) and the
   `solution_only` invariant, whose remediation is ESCALATE, stops the run
   until a person answers (add a fact, then resume; or relax, patch, abort).
4. It looks for the tests at a path that does not exist: a second failed tool
   call in a row breaks `tools_keep_working`, remediated with CHANGE_STRATEGY
   (the next prompt carries a strategy note; recorded in the iteration).
5. It reads test_solution.py at the right path.
6. The correct solution: `compile` and `tests` pass, but the `changelog` gate
   wants an entry under "## Unreleased".
7. add_changelog_entry needs a person's approval (approve, edit the entry, or
   deny; a denial is fed back and turn 8 proposes a shorter entry). Once it
   runs, every gate passes: converged.

Headless with `--no-wait`, the run ends at step 3 with exit code 4 (waiting on
a person); `loopterm watch RUN` or `loopterm resume RUN` continues it.
With `--model openai/gpt-4o-mini` (or any litellm model) the same loop runs
against a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

from loopterm.core.budget import Budget
from loopterm.core.gates import CommandGate
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loop import Loop
from loopterm.core.state import LoopState
from loopterm.core.tools import ToolContext, tool
from loopterm.examples.codefix import tools as codefix_tools
from loopterm.examples.codefix.loop import GATES as CODEFIX_GATES
from loopterm.examples.codefix.loop import context_bounded, normalize, tools_keep_working
from loopterm.examples.codefix.tools import confine, read_file

HERE = Path(__file__).resolve().parent
WORKSPACE = HERE / "workspace"  # copied into each run's scratch workspace

GOAL = """\
Implement to_roman(n: int) -> str in solution.py so the tests in test_solution.py pass.
Spec: integers 1..3999 in standard Roman numerals, with the subtractive forms IV, IX, XL, XC, CD, CM
(4 -> "IV", 1994 -> "MCMXCIV"); raise ValueError for anything outside 1..3999.
Write the whole module with write_file(path="solution.py", content=...); read_file shows any workspace file.
Only solution.py may be written: the tests are the specification and must not be edited.
When the tests pass, record the change with add_changelog_entry (a person approves it)."""


class DemoState(LoopState):
    """The demo's state: the paths write_file may target (a person may widen it from the TUI)."""

    allowed_files: list[str] = ["solution.py"]


def shipped_files() -> set[str]:
    """The task's own files (tests, conftest, changelog): write_file never overwrites them."""
    return {p.name for p in WORKSPACE.iterdir() if p.is_file() and not p.name.startswith(".")}


@tool(name="write_file", side_effects=True, idempotent=True, workspace_only=True)
def write_file(ctx: ToolContext, path: str, content: str) -> str:
    """Write a UTF-8 text file in the workspace (whole content); the shipped tests and changelog are refused.

    codefix's write_file, behind a guard: the task's own files are the
    specification, so a write to one is refused here (the file stays intact)
    and the refused attempt is what the `solution_only` invariant sees.
    """
    root = ctx.workspace.resolve()
    target = confine(ctx.workspace, path)
    relative = target.relative_to(root).as_posix()
    if relative in shipped_files():
        hint = "use add_changelog_entry" if relative == "CHANGELOG.md" else "change solution.py instead"
        raise PermissionError(f"{relative} is part of the task as shipped and is not written by write_file; {hint}")
    result: str = codefix_tools.write_file.fn(ctx, path, content)
    return result


@tool(side_effects=True, idempotent=True, workspace_only=True, needs_approval=True)
def add_changelog_entry(ctx: ToolContext, entry: str) -> str:
    """Add one line under '## Unreleased' in CHANGELOG.md (runs only after a person approves it).

    Idempotent: the same entry twice leaves one line.
    """
    text = " ".join(str(entry).split())
    if not text:
        raise ValueError("entry is empty; describe the change in one line")
    if len(text) > 300:
        raise ValueError(f"entry is {len(text)} characters; keep it to one line of at most 300")
    target = confine(ctx.workspace, "CHANGELOG.md")
    lines = target.read_text(encoding="utf-8").splitlines() if target.is_file() else ["# Changelog"]
    if "## Unreleased" not in lines:
        lines += ["", "## Unreleased"]
    line = f"- {text}"
    if line in lines:
        return f"CHANGELOG.md already has: {line}"
    lines.insert(lines.index("## Unreleased") + 1, line)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"added to CHANGELOG.md under Unreleased: {line}"


def writes_this_iteration(state: LoopState) -> list[str]:
    """Paths write_file was asked to write in the iteration just finished, refused attempts included."""
    return [
        normalize(r.args.get("path", ""))
        for r in state.tool_results
        if r.tool == "write_file" and r.iteration == state.iteration
    ]


def only_solution_written(state: LoopState) -> bool:
    """The model fixes the code, never the tests: any other write target needs a person.

    Unlike codefix's (which looks at the whole history), this judges the latest
    iteration only, so once a person has answered the escalation the run goes on.
    """
    allowed = {normalize(p) for p in getattr(state, "allowed_files", ["solution.py"])}
    return all(p in allowed for p in writes_this_iteration(state))


# Passes when CHANGELOG.md has at least one "- " entry under "## Unreleased".
CHANGELOG_CHECK = """\
import pathlib, sys
path = pathlib.Path('CHANGELOG.md')
lines = path.read_text(encoding='utf-8').splitlines() if path.is_file() else []
section = lines[lines.index('## Unreleased') + 1:] if '## Unreleased' in lines else []
entries = []
for line in section:
    if line.startswith('## '):
        break
    if line.startswith('- ') and line[2:].strip():
        entries.append(line)
if not entries:
    print("CHANGELOG.md has no entry under '## Unreleased'; add one with add_changelog_entry "
          "(a person approves it)", file=sys.stderr)
    sys.exit(1)
print(f"CHANGELOG.md: {len(entries)} entry(ies) under Unreleased")
"""

INVARIANTS = [
    Invariant(
        name="solution_only",
        check=only_solution_written,
        remediation=Remediation.ESCALATE,
        description="write_file only targets solution.py (the shipped tests are never edited)",
    ),
    Invariant(
        name="tools_keep_working",
        check=tools_keep_working,
        remediation=Remediation.CHANGE_STRATEGY,
        description="the last two tool calls did not both fail",
    ),
    Invariant(
        name="bounded_context",
        check=context_bounded,
        remediation=Remediation.PRUNE_CONTEXT,
        description="working memory holds at most 20 facts and 5,000 tokens",
    ),
]

# pytest without the plugins installed next to it (in a development environment those take
# seconds to import on every iteration; the demo's tests use nothing but pytest itself).
PYTEST_BARE = (
    "import os, sys; os.environ['PYTEST_DISABLE_PLUGIN_AUTOLOAD'] = '1'; "
    "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)

GATES = [
    next(g for g in CODEFIX_GATES if g.name == "compile"),  # py_compile solution.py
    CommandGate(
        name="tests",
        # The same pytest options as codefix's tests gate: ignore any config above the workspace,
        # leave no cache behind.
        argv=[
            "{python}", "-B", "-c", PYTEST_BARE, "-q", "--tb=short", "-p", "no:cacheprovider",
            "-c", os.devnull, "--rootdir={workspace}", "--confcutdir={workspace}", "test_solution.py",
        ],
        timeout=120.0,
    ),
    CommandGate(name="changelog", argv=["{python}", "-B", "-c", CHANGELOG_CHECK], timeout=30.0),
]

loop = Loop(
    name="demo",
    description="the guided tour, offline: an approval, an escalation, gates and invariants",
    goal=GOAL,
    state=DemoState,
    tools=[write_file, read_file, add_changelog_entry],
    gates=GATES,
    invariants=INVARIANTS,
    script=HERE / "script.json",
    workspace_files=WORKSPACE,
    max_iterations=8,
    # Iterations 2 to 5 fail the tests gate alike while the story unfolds; 5 identical verdicts is a stall.
    stall_window=5,
    budget=Budget(usd=0.05, tokens=60_000),
)
