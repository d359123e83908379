"""`loopterm new NAME`: a loop skeleton that runs and converges offline as written.

A first loop is easier to change than to write: the skeleton has every part a real loop has
(its own state class, a side-effecting tool, an invariant with a description, a command gate,
`context=`, `observe`, an offline script, a cases file, project rules), each commented with
where docs/WRITING_LOOPS.md explains it. Nothing is overwritten: every file is checked before
the first one is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loopterm.core.errors import ConfigError

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
RULES_PATH = Path(".loopterm") / "RULES.md"  # where core/prompt.py's read_rules looks, under the working folder

LOOP_TEMPLATE = '''\
"""__NAME__: a loop made by `loopterm new __NAME__`. Change it into yours.

Each part is explained in docs/WRITING_LOOPS.md (the section names are given below).
Offline, on its script:        loopterm run __NAME__.py --headless
Its cases:                     loopterm eval __NAME__.py --cases __NAME__.cases.json
On a real model:               OPENAI_API_KEY=... loopterm run __NAME__.py --model openai/gpt-4o-mini
"""

from __future__ import annotations

from pathlib import Path

from loopterm.core import (Budget, CommandGate, Decision, GateResult, Invariant, Loop, LoopState, Remediation,
                           ToolContext, ToolRecord, tool)
from loopterm.core.tools import confine

HERE = Path(__file__).resolve().parent


# "The state": the loop's own fields, on top of LoopState's (iteration, task, memory, tool_results, ...).
class __STATE__(LoopState):
    """What this loop remembers between iterations: the files the model wrote."""

    written: list[str] = []


# "Tools": typed parameters are the arguments the model must give; side_effects=True because it writes a
# file; workspace_only=True because the file is in the run's own workspace (a branch may simply run it again).
@tool(side_effects=True, workspace_only=True)
def write_file(ctx: ToolContext, path: str, content: str) -> str:
    """Write a text file in the run's workspace (the whole content)."""
    target = confine(ctx.workspace, path)  # refuses absolute paths, '..' and symlinks out of the workspace
    target.write_text(content, encoding="utf-8")
    return f"wrote {len(content)} characters to {path}"


# "Observe": fold what happened into the state's own fields; return a new state, never edit this one.
def observe(state: __STATE__, decision: Decision, record: ToolRecord | None, gates: list[GateResult]) -> __STATE__:
    if record is not None and record.ok and record.tool == "write_file":
        return state.model_copy(update={"written": [*state.written, record.args["path"]]})
    return state


# "Context": the loop's own fields as the model sees them, every iteration.
def context(state: __STATE__) -> str:
    return "Files written so far: " + (", ".join(state.written) or "none")


# "Invariants": checked after every iteration; the description is what the model is told.
def only_answer_written(state: __STATE__) -> bool:
    return all(path == "answer.txt" for path in state.written)


# "Gates": a command run in the workspace after every iteration; exit code 0 is a pass. The run converges
# when every gate passes, never because the model says it is done.
CHECK_ANSWER = """
import pathlib, sys
answer = pathlib.Path("answer.txt")
if not answer.is_file():
    sys.exit("answer.txt does not exist yet")
if "hello" not in answer.read_text(encoding="utf-8").lower():
    sys.exit("answer.txt does not say hello")
"""

loop = Loop(
    name="__NAME__",
    goal="Write answer.txt: one line that greets the world and contains the word 'hello'.",
    state=__STATE__,
    tools=[write_file],
    observe=observe,
    context=context,
    invariants=[Invariant(name="only_answer_txt", check=only_answer_written, remediation=Remediation.ESCALATE,
                          description="write_file only ever writes answer.txt")],
    gates=[CommandGate(name="answer", argv=["{python}", "-c", CHECK_ANSWER])],
    # "The offline script": the scripted model scripted/__NAME__ answers from this file; --model replaces it.
    script=HERE / "__NAME__.script.json",
    max_iterations=5,
    budget=Budget(usd=0.10, tokens=50_000),  # "Budgets": checked before every model call
)
'''

# "The offline script": turn k answers iteration k. Iteration 1 misses the gate; its failure reaches
# iteration 2's prompt, which fixes it.
SCRIPT: dict[str, object] = {
    "price": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07},
    "turns": [
        {"content": {"action": {"tool": "write_file", "args": {"path": "answer.txt", "content": "Hi there, world!\n"}},
                     "subgoal": "write a first greeting", "confidence": 0.6,
                     "reasoning": "Nothing is written yet; write a greeting and let the gate judge it.", "done": False}},
        {"content": {"action": {"tool": "write_file", "args": {"path": "answer.txt", "content": "Hello, world!\n"}},
                     "subgoal": "say hello, as the gate asks", "confidence": 0.9,
                     "reasoning": "The answer gate failed: answer.txt does not say hello. Use the word hello.",
                     "done": True}},
    ],
}

CASES: list[dict[str, object]] = [
    {"id": "as-scripted", "expect": "converged"},
    {"id": "one-iteration", "max_iterations": 1, "expect": "terminated"},
]

RULES = """\
# Project rules

<!-- loopterm adds this file to the model's prompt every iteration when it runs in this folder (it reads
.loopterm/RULES.md under the working directory). See docs/WRITING_LOOPS.md, "Project rules". -->

- Keep every file you write short: one line is enough.
- Never write outside answer.txt.
"""


def check_name(name: str) -> str:
    """NAME must be a plain name: it becomes a file name, the loop's name and its scripted model's."""
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(f"loop name {name[:80]!r} is not allowed: use a letter, then letters, digits, '_' or '-' "
                          "(at most 64), e.g. `loopterm new fixit`")
    return name


def files_for(name: str) -> dict[Path, str]:
    """Each file of the skeleton (relative to its folder) and its text."""
    state = "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]+", name) if part) + "State"
    source = LOOP_TEMPLATE.replace("__NAME__", name).replace("__STATE__", state)
    return {
        Path(f"{name}.py"): source,
        Path(f"{name}.script.json"): json.dumps(SCRIPT, indent=2) + "\n",
        Path(f"{name}.cases.json"): json.dumps(CASES, indent=2) + "\n",
        RULES_PATH: RULES,
    }


def write_skeleton(name: str, folder: Path) -> list[Path]:
    """Write the skeleton into `folder` (created if missing); refuse, writing nothing, if any file exists."""
    files = files_for(check_name(name))
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; give --dir a folder")
    taken = [str(p) for p in files if (folder / p).exists() or (folder / p).is_symlink()]
    if taken:
        raise ConfigError(f"not overwriting {', '.join(taken)} in {folder}; pick another name, another --dir, "
                          "or move the file(s) away")
    written: list[Path] = []
    try:
        for relative, text in files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("x", encoding="utf-8") as handle:  # "x": never replace a file made meanwhile
                handle.write(text)
            written.append(target)
    except OSError as exc:
        for path in written:  # all or nothing
            path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the skeleton in {folder}: {exc.strerror or exc}; check the folder") from None
    return written
