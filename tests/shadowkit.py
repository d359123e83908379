"""A loop file for shadow-mode tests: two tools and a gate that leave a trace if they ever run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from tests.loopkit import PRICE

LOOP_FILE = textwrap.dedent('''
    """A loop whose tools and gate write to trace.log whenever they run: a shadow run must leave none."""

    from pathlib import Path

    from loopterm.core import CommandGate, Loop, ToolContext, tool

    HERE = Path(__file__).resolve().parent
    TRACE = HERE / "trace.log"


    @tool(side_effects=True, workspace_only=True)
    def write(ctx: ToolContext, path: str, text: str) -> str:
        """Write a file in the workspace."""
        with TRACE.open("a") as f:
            f.write(f"write {path}\\n")
        (ctx.workspace / path).write_text(text)
        return f"wrote {path}"


    @tool
    def lookup(query: str) -> str:
        """Look something up (no side effects, no approval needed)."""
        with TRACE.open("a") as f:
            f.write(f"lookup {query}\\n")
        return "found it"


    loop = Loop(
        name="shadowed",
        goal="Put the release date in notes.txt.",
        tools=[write, lookup],
        gates=[CommandGate(name="trace", argv=["{python}", "-c",
                           f"open({str(TRACE)!r}, 'a').write('gate\\\\n'); raise SystemExit(1)"])],
        script=HERE / "shadowed.json",
        workspace_files=HERE / "files",
        max_iterations=5,
        consolidate=lambda state, status: [("last_status", status, "fact")],  # what a run leaves for later runs
    )
''')

# The loop's proposals, in order, and what the person answers to each (iteration n answers TURNS[n-1]).
TURNS: list[tuple[str, dict[str, Any]]] = [
    ("write", {"path": "notes.txt", "text": "release: May 2"}),
    ("lookup", {"query": "release"}),
    ("write", {"path": "notes.txt", "text": "release: soon"}),
    ("lookup", {"query": "calendar"}),
    ("write", {"path": "other.txt", "text": "y"}),
]
# (agree | edit | deny, the person's args, reason, another tool instead or None)
ANSWERS: list[tuple[str, dict[str, Any] | None, str, str | None]] = [
    ("agree", None, "", None),
    ("edit", {"query": "release date 2.1"}, "be specific", None),
    ("deny", None, "never write a vague date", None),
    ("agree", None, "", None),
    ("edit", {"query": "who owns other.txt"}, "ask first", "lookup"),  # another tool: an edit of write's proposal
]
# write: agree, deny, edit -> 1 of 3; lookup: edit, agree -> 1 of 2; in all 2 of 5.
EXPECTED_TOOLS = [
    {"tool": "lookup", "proposals": 2, "agreed": 1, "edited": 1, "denied": 0, "agreement_rate": 0.5},
    {"tool": "write", "proposals": 3, "agreed": 1, "edited": 1, "denied": 1, "agreement_rate": 0.333333},
]
EXPECTED_TOTALS = {"proposals": 5, "agreed": 2, "edited": 2, "denied": 1, "agreement_rate": 0.4}


def decision(tool: str, args: dict[str, Any], n: int) -> dict[str, Any]:
    return {"action": {"tool": tool, "args": args}, "subgoal": f"step {n}", "confidence": 0.7,
            "reasoning": f"proposal {n}"}


def write_loop(folder: Path, turns: list[tuple[str, dict[str, Any]]] = TURNS) -> Path:
    """shadowed.py, its script and its workspace files in `folder`; returns the loop file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "files").mkdir(exist_ok=True)
    (folder / "files" / "notes.txt").write_text("original\n")
    script = {"price": PRICE, "after_end": "repeat_last",
              "turns": [{"content": decision(tool, args, n)} for n, (tool, args) in enumerate(turns, 1)]}
    (folder / "shadowed.json").write_text(json.dumps(script))
    path = folder / "shadowed.py"
    path.write_text(LOOP_FILE)
    return path


def trace(folder: Path) -> str:
    log = folder / "trace.log"
    return log.read_text() if log.exists() else ""
