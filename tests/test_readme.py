"""The README's two commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.endswith(".venv/bin/loopterm")
    assert tests.endswith("-m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_the_first_command_installs_what_the_demo_needs_to_converge() -> None:
    """The demo's gate runs `python -m pytest` with the installed interpreter: `pip install -e .` (no test
    extras) must bring pytest, or the offline demo stalls on "No module named 'pytest'"."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"pytest\b(?!-)", d) for d in deps)
    gates = [g.argv for g in __import__("loopterm.examples.demo.loop", fromlist=["loop"]).loop.gates]
    assert any("pytest" in " ".join(argv) for argv in gates)  # the dependency is there because of this gate


def test_every_example_package_is_listed_for_a_regular_install() -> None:
    """`pip install .` (not -e) installs only the packages pyproject lists: an example left out is missing
    from `loopterm loops` there, though every editable install has it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    examples = {f"loopterm.examples.{p.parent.name}" for p in (ROOT / "examples").glob("*/__init__.py")}
    assert examples and examples <= listed, sorted(examples - listed)
