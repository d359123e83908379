"""docs/WRITING_LOOPS.md cannot drift from the code: every code block in it is run or checked here.

- `python file=PATH`, `json file=PATH`, `markdown file=PATH` blocks are written to a temporary folder
  (blocks naming the same file are joined in order: the guide builds its loop file section by section);
- `python` blocks run on their own;
- `sh run` blocks are run line by line with the real `loopterm` console script in that folder: `# exits N`
  after a command is its expected exit code (default 0), each `#> TEXT` line under it must be in its output;
- `json decision`, `json verdict` and `json script` blocks are parsed by the code that parses them for real,
  and the script is driven through a run;
- the guide names every field of what it documents, so a new field must be documented to pass.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.checkers import ModelGate, parse_verdict
from loopterm.core.decision import Decision, parse_decision
from loopterm.core.loop import Loop

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "WRITING_LOOPS.md"
BIN = Path(sys.executable).parent
KINDS = {("python", "file"), ("python", ""), ("json", "file"), ("markdown", "file"), ("sh", "run"),
         ("json", "decision"), ("json", "verdict"), ("json", "script")}


@dataclass
class Block:
    lang: str
    kind: str  # "file", "run", "decision", ... or "" for a plain python block
    path: str | None
    body: str
    line: int


def blocks(text: str) -> list[Block]:
    """Every fenced block of the guide, with its info string read as `LANG [file=PATH | WORD]`."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info = lines[i][3:].split()
            start = i
            i += 1
            body: list[str] = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            lang, rest = (info[0] if info else ""), info[1:]
            path = next((r.removeprefix("file=") for r in rest if r.startswith("file=")), None)
            kind = "file" if path else (rest[0] if rest else "")
            found.append(Block(lang, kind, path, "\n".join(body) + "\n", start + 1))
        i += 1
    return found


GUIDE_TEXT = GUIDE.read_text(encoding="utf-8")
BLOCKS = blocks(GUIDE_TEXT)


def of(lang: str, kind: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang and b.kind == kind]


def env() -> dict[str, str]:
    out = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("LOOPTERM_DB", "LOOPTERM_DEBUG", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        out.pop(name, None)
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's files, written as a reader following it would."""
    folder = tmp_path_factory.mktemp("guide")
    for block in BLOCKS:
        if block.kind == "file":
            assert block.path is not None
            target = folder / block.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a", encoding="utf-8") as handle:
                handle.write(block.body)
    return folder


def test_every_block_is_of_a_kind_this_test_runs() -> None:
    assert BLOCKS, "no code blocks found"
    unknown = [(b.line, b.lang, b.kind) for b in BLOCKS if (b.lang, b.kind) not in KINDS]
    assert not unknown, f"blocks this test would not run (line, language, kind): {unknown}"


def test_the_guide_builds_its_loop_in_one_file_and_runs_every_kind() -> None:
    files = {b.path for b in of("python", "file")}
    assert "title_loop.py" in files and len(of("python", "file")) >= 8
    assert of("sh", "run") and of("python", "") and of("json", "decision") and of("json", "script")


def test_plain_python_blocks_run(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    for block in of("python", ""):
        code = compile(block.body, f"{GUIDE.name}:{block.line}", "exec")
        exec(code, {"__name__": f"guide_block_{block.line}"})  # noqa: S102 - the guide's own example


def commands() -> list[tuple[Block, str, int, list[str]]]:
    """(block, command, expected exit code, expected texts) for every command of the `sh run` blocks."""
    out: list[tuple[Block, str, int, list[str]]] = []
    for block in of("sh", "run"):
        for line in block.body.splitlines():
            if line.startswith("#>"):
                assert out and out[-1][0] is block, f"line {block.line}: '#>' before any command"
                out[-1][3].append(line[2:].strip())
            elif line.strip():
                exits = re.search(r"#\s*exits (\d+)", line)
                out.append((block, line, int(exits.group(1)) if exits else 0, []))
    return out


def test_sh_run_blocks_run_with_the_real_command_and_say_what_the_guide_says(project: Path) -> None:
    ran = commands()
    assert any("--headless" in c and code == 0 for _, c, code, _ in ran)
    for block, command, expected, texts in ran:
        assert command.startswith("loopterm "), command
        done = subprocess.run(command, shell=True, cwd=project, env=env(), capture_output=True, text=True,  # noqa: S602
                              timeout=300)
        output = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == expected, (block.line, command, done.stdout[-3_000:], done.stderr[-3_000:])
        for text in texts:
            assert " ".join(text.split()) in output, (block.line, command, text, output[-3_000:])


def test_the_converged_run_showed_the_model_the_guide_s_parts(project: Path) -> None:
    """After the run above: the prompt of iteration 2 has the rules, the context, the invariant's description."""
    listed = subprocess.run([str(BIN / "loopterm"), "runs", "--json"], cwd=project, env=env(), capture_output=True,
                            text=True, timeout=120)
    if listed.returncode != 0 or not json.loads(listed.stdout):
        test_sh_run_blocks_run_with_the_real_command_and_say_what_the_guide_says(project)
        listed = subprocess.run([str(BIN / "loopterm"), "runs", "--json"], cwd=project, env=env(),
                                capture_output=True, text=True, timeout=120)
    converged = [r for r in json.loads(listed.stdout) if r["loop"] == "titles" and r["status"] == "converged"]
    assert converged
    shown = subprocess.run([str(BIN / "loopterm"), "show", converged[0]["id"], "--iteration", "2", "--json"],
                           cwd=project, env=env(), capture_output=True, text=True, timeout=120)
    prompt = "\n\n".join(m["content"] for m in json.loads(shown.stdout)["prompt"])  # system and user messages
    assert "- only_titles_py: write_file only ever writes titles.py" in prompt
    assert "# Project rules (.loopterm/RULES.md)" in prompt and "Keep every module under 50 lines." in prompt
    assert "# Loop state\ntitles.py written 1 time(s)\nfirst mismatch: title('the lord of the rings')" in prompt


def test_decision_and_verdict_blocks_parse() -> None:
    for block in of("json", "decision"):
        decision = parse_decision(block.body, {"write_file", "read_file"})
        assert isinstance(decision, Decision) and decision.action is not None
    for block in of("json", "verdict"):
        assert parse_verdict(block.body).verdict in ("pass", "fail")


def test_script_blocks_load_and_drive_a_run(tmp_path: Path) -> None:
    """The guide's retry-then-repair turn: a 503 (retried), a reply that is not JSON (repaired), a decision."""
    import asyncio

    from loopterm.core.engine import Engine
    from loopterm.core.model import check_model
    from loopterm.core.scripted import load_script
    from loopterm.store import Store

    for k, block in enumerate(of("json", "script")):
        path = tmp_path / f"script{k}.json"
        path.write_text(block.body)
        script = load_script(path)
        assert script.step(1, 0).error is not None and script.step(1, 5) == script.step(1, 2)
        loop = Loop(name=f"guide-script-{k}", goal="g", script=path, converged=lambda state, gates: True)
        check_model(loop.model, loop.script)
        store = Store.open(tmp_path / f"db{k}" / "loopterm.db")
        try:
            engine = Engine.create(loop, store, loop_ref=f"guide-script-{k}", workspace_root=tmp_path / "ws",
                                   workdir=tmp_path)
            final = asyncio.run(engine.run())
            assert final.status == "converged", final
            (first,) = store.iterations(final.id)
            assert first.repairs == 1
        finally:
            store.close()


# -- what the guide must name -------------------------------------------------------------------------------


def code_in_guide() -> str:
    """The guide's code: its blocks and its inline code spans (which may wrap across lines)."""
    prose = re.sub(r"^```.*?^```", "", GUIDE_TEXT, flags=re.MULTILINE | re.DOTALL)
    spans = re.findall(r"`([^`]+)`", prose)
    return "\n".join([b.body for b in BLOCKS] + spans)


CODE = code_in_guide()


def named(field: str) -> bool:
    """Whether the guide names `field` in code: `field`, `ctx.field`, `field=...`, `"field": ...`."""
    return re.search(rf"\b{re.escape(field)}\b", CODE) is not None


def test_the_reference_table_lists_every_loop_field() -> None:
    table = GUIDE_TEXT.split("## Reference: `Loop(...)`", 1)[1]
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)}
    missing = sorted(set(Loop.model_fields) - rows)
    assert not missing, f"Loop fields missing from the guide's reference table: {missing}"
    assert not rows - set(Loop.model_fields), "the table names a field Loop does not have"


def test_the_guide_names_every_field_and_keyword_of_what_it_documents() -> None:
    import inspect

    from loopterm.core import Budget, CommandGate, Invariant, Remediation, ToolContext, ToolRecord, tool
    from loopterm.core.cases import Case
    from loopterm.core.roles import Role
    from loopterm.core.scripted import Price, Script, ScriptedError, Step
    from loopterm.core.state import LoopState
    from loopterm.core.strategy import Strategy

    wanted: dict[str, list[str]] = {
        "tool()": [p for p in inspect.signature(tool).parameters if p != "fn"],
        "ToolContext": list(ToolContext.__dataclass_fields__),
        "ToolRecord": list(ToolRecord.model_fields),
        "Invariant": list(Invariant.model_fields),
        "Remediation": [r.name for r in Remediation],
        "CommandGate": list(CommandGate.model_fields),
        "ModelGate": [f for f in ModelGate.model_fields if f != "kind"],
        "Role": list(Role.model_fields),
        "Strategy": list(Strategy.model_fields),
        "Budget": list(Budget.model_fields),
        "Decision": list(Decision.model_fields),
        "Case": list(Case.model_fields),
        "Script": list(Script.model_fields),
        "Step": list(Step.model_fields),
        "ScriptedError": list(ScriptedError.model_fields),
        "Price": list(Price.model_fields),
        "LoopState": [f for f in LoopState.model_fields if f != "schema_version"],
    }
    missing = {what: [f for f in fields if not named(f)] for what, fields in wanted.items()}
    assert not {k: v for k, v in missing.items() if v}, f"not named in the guide: {missing}"


def test_the_guide_gives_each_callable_the_shape_the_loader_checks() -> None:
    from loopterm.core.loop_checks import CALLABLES

    for field, (_, shape) in CALLABLES.items():
        assert f"`{shape}`" in GUIDE_TEXT, f"{field}: the guide should show `{shape}`"


def test_the_readme_links_the_guide_near_the_top_and_where_it_talks_about_writing_loops() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    link = "(docs/WRITING_LOOPS.md)"
    assert link in readme[:3_000], "link the guide near the top of the README"
    assert link in readme.split("## Writing a loop", 1)[1][:2_000]


def test_the_signatures_the_guide_gives_match_the_code() -> None:
    """`tool(...)`, `Invariant(...)`, `CommandGate(...)`, ...: the same parameters, the same defaults."""
    import ast
    import inspect

    from pydantic_core import PydanticUndefined

    from loopterm.core import Budget, CommandGate, Invariant, Remediation, tool
    from loopterm.core.roles import Role
    from loopterm.core.strategy import Strategy

    def real(name: str) -> dict[str, Any]:
        """Parameter -> default (inspect.Parameter.empty when required)."""
        if name == "tool":
            return {p.name: p.default for p in inspect.signature(tool).parameters.values()}
        model = {"Invariant": Invariant, "CommandGate": CommandGate, "ModelGate": ModelGate, "Role": Role,
                 "Strategy": Strategy, "Budget": Budget}[name]
        return {f: (inspect.Parameter.empty if info.default is PydanticUndefined else info.default)
                for f, info in model.model_fields.items() if not (name == "ModelGate" and f == "kind")}

    prose = re.sub(r"^```.*?^```", "", GUIDE_TEXT, flags=re.MULTILINE | re.DOTALL)
    checked: set[str] = set()
    for span in re.findall(r"`([^`]+)`", prose):
        found = re.fullmatch(r"(tool|Invariant|CommandGate|ModelGate|Role|Strategy|Budget)\((.*)\)", " ".join(span.split()))
        if not found or "=" not in found.group(2):
            continue  # a mention, not a signature
        name = found.group(1)
        args = ast.parse(f"def f({found.group(2)}): pass").body[0].args  # type: ignore[attr-defined]
        params = [*args.args, *args.kwonlyargs]
        defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults) + list(args.kw_defaults)
        given = {p.arg: d for p, d in zip(params, defaults)}
        expected = real(name)
        assert set(given) == set(expected), (name, sorted(set(given) ^ set(expected)))
        for param, node in given.items():
            if node is None:
                assert expected[param] is inspect.Parameter.empty, f"{name}: {param} has a default in the code"
                continue
            text = ast.unparse(node)
            value = Remediation[text.split(".")[1]] if text.startswith("Remediation.") else ast.literal_eval(node)
            assert value == expected[param], f"{name}: {param}={text} in the guide, {expected[param]!r} in the code"
        checked.add(name)
    assert checked == {"tool", "Invariant", "CommandGate", "ModelGate", "Role", "Strategy", "Budget"}, checked
