"""`loopterm new NAME`: the skeleton runs and converges offline as written, through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopterm.core.errors import ConfigError
from loopterm.core.loader import load_loop
from loopterm.core.scaffold import files_for, write_skeleton

LOOPTERM = Path(sys.executable).parent / "loopterm"
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200"}
for _name in ("LOOPTERM_DB", "LOOPTERM_DEBUG", "OPENAI_API_KEY"):
    ENV.pop(_name, None)

FILES = ["greeter.py", "greeter.script.json", "greeter.cases.json", ".loopterm/RULES.md"]


def loopterm(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LOOPTERM), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_new_then_run_converges_offline_and_eval_meets_every_case(tmp_path: Path) -> None:
    made = loopterm(tmp_path, "new", "greeter")
    assert made.returncode == 0, made.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(FILES)
    assert "loopterm run greeter.py --headless" in made.stdout and "docs/WRITING_LOOPS.md" in made.stdout
    source = (tmp_path / "greeter.py").read_text()
    assert "docs/WRITING_LOOPS.md" in source and "class GreeterState(LoopState)" in source

    ran = loopterm(tmp_path, "run", "greeter.py", "--headless")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "converged at iteration 2: every gate passed" in ran.stdout
    runs = json.loads(loopterm(tmp_path, "runs", "--json").stdout)
    assert [r["status"] for r in runs] == ["converged"]
    second = json.loads(loopterm(tmp_path, "show", runs[0]["id"], "--iteration", "2", "--json").stdout)
    prompt = "\n\n".join(m["content"] for m in second["prompt"])  # the system message has the stable parts
    # its parts reach the model: the invariant's description, the rules, context=, the gate's failure
    assert "- only_answer_txt: write_file only ever writes answer.txt" in prompt
    assert "# Project rules (.loopterm/RULES.md)" in prompt and "Never write outside answer.txt." in prompt
    assert "# Loop state\nFiles written so far: answer.txt" in prompt
    assert "answer.txt does not say hello" in prompt

    evaluated = loopterm(tmp_path, "eval", "greeter.py", "--cases", "greeter.cases.json", "--json")
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert {c["id"]: (c["status"], c["expect_met"]) for c in report["cases"]} == {
        "as-scripted": ("converged", True), "one-iteration": ("terminated", True)}


def test_new_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / ".loopterm").mkdir()
    (tmp_path / ".loopterm" / "RULES.md").write_text("my own rules\n")
    refused = loopterm(tmp_path, "new", "greeter")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"loopterm: not overwriting .loopterm/RULES.md in {tmp_path}; pick another name, another --dir, "
        "or move the file(s) away"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".loopterm", "RULES.md"]
    assert (tmp_path / ".loopterm" / "RULES.md").read_text() == "my own rules\n"


@pytest.mark.parametrize("name", ["9lives", "has space", "../up", "x" * 65, "", "a.b"])
def test_new_refuses_an_invalid_name_in_one_line(tmp_path: Path, name: str) -> None:
    refused = loopterm(tmp_path, "new", name)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "is not allowed: use a letter" in lines[0], refused.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_into_another_folder_runs_from_there(tmp_path: Path) -> None:
    made = loopterm(tmp_path, "new", "my_loop", "--dir", "loops/first")
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "loops" / "first"
    assert "next: cd loops/first && loopterm run my_loop.py --headless" in made.stdout
    assert (folder / ".loopterm" / "RULES.md").is_file()
    ran = loopterm(folder, "run", "my_loop.py", "--headless")
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_every_generated_loop_loads_with_its_own_state_class(tmp_path: Path) -> None:
    for name, state in (("a", "AState"), ("two-words", "TwoWordsState"), ("snake_case_name", "SnakeCaseNameState"),
                        ("myLoop", "MyLoopState")):
        write_skeleton(name, tmp_path / name)
        loop, _ = load_loop(str(tmp_path / name / f"{name}.py"))
        assert loop.name == name and loop.state.__name__ == state
        assert loop.context is not None and loop.observe is not None and loop.gates and loop.invariants
        assert any(t.side_effects for t in loop.tools)


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "greeter.cases.json"
    files = files_for("greeter")
    assert set(files) == {Path(f) for f in FILES}
    target.write_text("[]")
    with pytest.raises(ConfigError, match="not overwriting greeter.cases.json"):
        write_skeleton("greeter", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["greeter.cases.json"] and target.read_text() == "[]"


def test_the_skeleton_points_at_sections_the_guide_has() -> None:
    """Each `"Section"` the skeleton's comments name is a heading of docs/WRITING_LOOPS.md."""
    import re

    from loopterm.core.scaffold import LOOP_TEMPLATE, RULES

    guide = (Path(__file__).resolve().parent.parent / "docs" / "WRITING_LOOPS.md").read_text(encoding="utf-8")
    headings = [line.lower() for line in guide.splitlines() if line.startswith("## ")]
    named = re.findall(r'# "([^"]+)"', LOOP_TEMPLATE) + re.findall(r'"([A-Z][a-z ]+)"', RULES)
    assert len(named) >= 8
    missing = [n for n in named if not any(n.lower() in h for h in headings)]
    assert not missing, f"sections the skeleton names that the guide lacks: {missing}"
