"""The loop loader: every bad loop ref is one clear line; good refs load and round-trip."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from loopterm.core import Invariant
from loopterm.core.errors import ConfigError
from loopterm.core.loader import LoopInfo, list_loops, load_loop
from loopterm.core.loop import Loop

LOOP_SRC = """
from loopterm.core import Loop
{name} = Loop(name={loop_name!r}, goal="Do the thing.\\nMore detail.", model="openai/gpt-4o-mini")
"""


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def one_loop(path: Path, var: str = "my_loop", loop_name: str = "demo") -> Path:
    return write(path, LOOP_SRC.format(name=var, loop_name=loop_name))


def config_error(ref: str) -> str:
    """The message of the ConfigError load_loop raises, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load_loop(ref)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --- loading ---------------------------------------------------------------------------------


def test_builtin_codefix_loads_with_its_name_as_ref() -> None:
    loop, ref = load_loop("codefix")
    assert isinstance(loop, Loop) and loop.name == "codefix" and ref == "codefix"
    assert loop.model == "scripted/codefix"
    assert loop.script is not None and loop.script.is_file()
    assert loop.workspace_files is not None and (loop.workspace_files / "test_solution.py").is_file()


def test_file_with_one_loop_loads_without_name(tmp_path: Path) -> None:
    path = one_loop(tmp_path / "single.py")
    loop, ref = load_loop(str(path))
    assert loop.name == "demo"
    assert ref == f"{path.resolve()}:my_loop"
    again, ref2 = load_loop(ref)  # the canonical ref loads the same definition again
    assert again.name == "demo" and ref2 == ref


def test_relative_path_gives_absolute_canonical_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one_loop(tmp_path / "rel.py")
    monkeypatch.chdir(tmp_path)
    _, ref = load_loop("rel.py")
    assert ref == f"{(tmp_path / 'rel.py').resolve()}:my_loop"


def test_variable_named_loop_wins_over_others(tmp_path: Path) -> None:
    path = write(
        tmp_path / "two_with_loop.py",
        """
        from loopterm.core import Loop
        helper = Loop(name="helper", goal="g", model="m/x")
        loop = Loop(name="main", goal="g", model="m/x")
        """,
    )
    loop, ref = load_loop(str(path))
    assert loop.name == "main" and ref.endswith(":loop")


def test_file_with_two_loops_needs_a_name(tmp_path: Path) -> None:
    path = write(
        tmp_path / "two.py",
        """
        from loopterm.core import Loop
        alpha = Loop(name="alpha", goal="g", model="m/x")
        beta = Loop(name="beta", goal="g", model="m/x")
        """,
    )
    message = config_error(str(path))
    assert "several Loops" in message and "alpha" in message and "beta" in message and ":alpha" in message
    loop, ref = load_loop(f"{path}:beta")
    assert loop.name == "beta" and ref == f"{path.resolve()}:beta"


def test_aliases_of_one_loop_count_once(tmp_path: Path) -> None:
    path = write(
        tmp_path / "alias.py",
        """
        from loopterm.core import Loop
        first = Loop(name="only", goal="g", model="m/x")
        second = first
        """,
    )
    loop, _ = load_loop(str(path))
    assert loop.name == "only"


def test_file_can_import_its_siblings_and_sys_path_is_restored(tmp_path: Path) -> None:
    write(tmp_path / "sibling_helpers_xyz.py", "GOAL = 'from a sibling'\n")
    path = write(
        tmp_path / "uses_sibling.py",
        """
        from loopterm.core import Loop
        from sibling_helpers_xyz import GOAL
        loop = Loop(name="sib", goal=GOAL, model="m/x")
        """,
    )
    before = list(sys.path)
    loop, _ = load_loop(str(path))
    assert loop.goal == "from a sibling"
    assert sys.path == before


def test_file_with_its_own_state_class_and_future_annotations(tmp_path: Path) -> None:
    path = write(
        tmp_path / "stateful.py",
        """
        from __future__ import annotations
        from loopterm.core import Loop, LoopState, ToolContext, tool

        class MyState(LoopState):
            notes: list[str] = []

        @tool
        def echo(ctx: ToolContext, text: str) -> str:
            return text

        loop = Loop(name="stateful", goal="g", state=MyState, tools=[echo], model="m/x")
        """,
    )
    loop, _ = load_loop(str(path))
    assert loop.new_state().model_dump()["notes"] == []
    assert loop.tool("echo") is not None


# --- errors: one line each, naming the problem -------------------------------------------------


def test_unknown_builtin_lists_known_and_suggests_loops_command() -> None:
    message = config_error("codefx")
    assert "unknown loop 'codefx'" in message and "codefix" in message and "loopterm loops" in message
    assert "did you mean 'codefix'" in message


def test_builtin_with_a_name_suffix() -> None:
    assert "takes no ':loop'" in config_error("codefix:loop")


def test_empty_ref() -> None:
    assert "no loop given" in config_error("  ")


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(str(tmp_path / "nope.py"))
    assert "not found" in message and "nope.py" in message


def test_directory_and_non_python_file(tmp_path: Path) -> None:
    (tmp_path / "adir.py").mkdir()
    assert "is a directory" in config_error(str(tmp_path / "adir.py"))
    (tmp_path / "loop.txt").write_text("x = 1\n")
    assert "not a .py file" in config_error(f"{tmp_path / 'loop.txt'}:x")


def test_syntax_error_names_class_message_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.py", "from loopterm.core import Loop\n\nloop = Loop(name='x',\n  goal=)\n")
    message = config_error(str(path))
    assert "failed to import" in message and "SyntaxError" in message and "line 4" in message


def test_exception_at_import_names_class_message_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "raises.py", "import os\nvalue = {}['missing']\n")
    message = config_error(str(path))
    assert "failed to import (line 2): KeyError: 'missing'" in message


def test_missing_module_at_import(tmp_path: Path) -> None:
    path = write(tmp_path / "needs.py", "import no_such_module_for_loopterm_tests\n")
    message = config_error(str(path))
    assert "ModuleNotFoundError" in message and "no_such_module_for_loopterm_tests" in message


def test_multiline_exception_message_is_flattened(tmp_path: Path) -> None:
    path = write(tmp_path / "multi.py", "raise RuntimeError('first line\\nsecond line')\n")
    message = config_error(str(path))
    assert "RuntimeError: first line second line" in message


def test_sys_exit_in_loop_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "exits.py", "import sys\nsys.exit(3)\n")
    assert "SystemExit" in config_error(str(path))


def test_file_without_loop(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.py", "x = 1\n")
    message = config_error(str(path))
    assert "defines no Loop" in message and "Loop(" in message


def test_named_variable_missing_or_not_a_loop(tmp_path: Path) -> None:
    path = one_loop(tmp_path / "named.py")
    write(tmp_path / "named.py", path.read_text() + "count = 3\n")
    missing = config_error(f"{path}:other")
    assert "no variable 'other'" in missing and "my_loop" in missing
    wrong = config_error(f"{path}:count")
    assert "'count'" in wrong and "is a int, not a Loop" in wrong


def test_bad_name_suffix(tmp_path: Path) -> None:
    path = one_loop(tmp_path / "suffix.py")
    assert "ends with ':'" in config_error(f"{path}:")
    assert "not a Python variable name" in config_error(f"{path}:1abc")


def test_invalid_loop_definition_gives_first_validation_error(tmp_path: Path) -> None:
    path = write(
        tmp_path / "invalid.py",
        """
        from loopterm.core import Loop

        loop = Loop(name="has spaces", goal="", model="m/x")
        """,
    )
    message = config_error(str(path))
    assert "defines an invalid Loop (line 4)" in message
    assert "name: String should match pattern" in message and "(and 1 more)" in message
    assert "fix the Loop(...) call" in message


def test_loop_without_model_or_script_is_invalid(tmp_path: Path) -> None:
    path = write(tmp_path / "nomodel.py", "from loopterm.core import Loop\nloop = Loop(name='n', goal='g')\n")
    message = config_error(str(path))
    assert "invalid Loop" in message and "set `model`" in message


def test_failed_import_leaves_no_module_behind(tmp_path: Path) -> None:
    path = write(tmp_path / "leaky.py", "raise ValueError('boom')\n")
    before = {m for m in sys.modules if m.startswith("_loopterm_loopfile_")}
    config_error(str(path))
    after = {m for m in sys.modules if m.startswith("_loopterm_loopfile_")}
    assert after == before


# --- list_loops ------------------------------------------------------------------------------


def test_list_loops_builtins_discovered_and_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    one_loop(tmp_path / "loops" / "good.py", var="loop", loop_name="goodloop")
    write(tmp_path / "loops" / "bad.py", "def broken(:\n")
    write(tmp_path / "loops" / "_helper.py", "raise RuntimeError('helpers are not loops')\n")
    write(
        tmp_path / ".loopterm" / "loops" / "pair.py",
        """
        from loopterm.core import Loop
        a = Loop(name="pa", goal="g a", model="m/x")
        b = Loop(name="pb", goal="g b", model="m/x")
        """,
    )
    infos = list_loops()
    assert all(isinstance(i, LoopInfo) for i in infos)
    by_ref = {i.ref: i for i in infos}

    codefix = by_ref["codefix"]
    assert codefix.source == "built-in" and codefix.model == "scripted/codefix" and codefix.error is None
    assert codefix.goal.startswith("Implement slugify") and "\n" not in codefix.goal

    good = by_ref["loops/good.py:loop"]
    assert good.name == "goodloop" and good.goal == "Do the thing." and good.model == "openai/gpt-4o-mini"

    bad = by_ref["loops/bad.py"]
    assert bad.error is not None and "SyntaxError" in bad.error and "\n" not in bad.error

    assert {"pa", "pb"} <= {i.name for i in infos}
    assert ".loopterm/loops/pair.py:a" in by_ref
    assert not any("_helper" in i.ref for i in infos)
    assert infos[0].source == "built-in"  # built-ins first


def test_list_loops_with_explicit_dirs_and_missing_dirs(tmp_path: Path) -> None:
    one_loop(tmp_path / "elsewhere" / "x.py", loop_name="elsewhere")
    infos = list_loops([tmp_path / "elsewhere", tmp_path / "does-not-exist"])
    found = [i for i in infos if i.name == "elsewhere"]
    assert len(found) == 1 and found[0].ref.endswith("x.py:my_loop")
    loop, _ = load_loop(found[0].ref)
    assert loop.name == "elsewhere"


# --- loop-file mistakes pydantic alone would word badly or let through -------------------------------

HEAD = "from loopterm.core import Invariant, Loop\n"


def loop_file(tmp_path: Path, body: str) -> str:
    return str(write(tmp_path / "mine.py", HEAD + f"loop = Loop(name='mine', goal='g', model='openai/gpt-4o-mini', {body})\n"))


def test_an_unknown_keyword_names_it_and_the_closest_field(tmp_path: Path) -> None:
    message = config_error(loop_file(tmp_path, "contxt=lambda s: ''"))
    assert message == ("loop file " + str(tmp_path / "mine.py") + " (line 2): Loop(...) has no keyword 'contxt'; "
                       "did you mean 'context'? its keywords are listed in docs/WRITING_LOOPS.md")


def test_a_string_for_context_says_it_must_be_a_function(tmp_path: Path) -> None:
    message = config_error(loop_file(tmp_path, "context='the plan'"))
    assert "context must be a function called as context(state) -> str, not a str" in message


@pytest.mark.parametrize("body, field", [
    ("observe=lambda state: state", "observe: a lambda cannot be called as observe(state, decision, tool_record, gates)"),
    ("converged=lambda state: True", "converged: a lambda cannot be called as converged(state, gates) -> bool"),
    ("setup=lambda: None", "setup: a lambda cannot be called as setup(workspace: Path) -> None"),
    ("context=lambda: ''", "context: a lambda cannot be called as context(state) -> str"),
])
def test_a_callable_with_the_wrong_parameters_is_refused_at_load(tmp_path: Path, body: str, field: str) -> None:
    message = config_error(loop_file(tmp_path, body))
    assert field in message and message.startswith("loop file ")


def test_callables_with_defaults_or_star_args_are_accepted(tmp_path: Path) -> None:
    loop, _ = load_loop(loop_file(tmp_path, "observe=lambda *a: a[0], converged=lambda s, g, extra=1: True, "
                                            "context=len, setup=print"))
    assert loop.observe is not None


def test_an_invariant_without_a_description_is_refused_when_a_file_is_loaded(tmp_path: Path) -> None:
    message = config_error(loop_file(tmp_path, "invariants=[Invariant(name='small', check=lambda s: True)]"))
    assert "invariants: 'small' has no description; add description=" in message
    # built in code (tests, helpers), the same Loop is fine: only loop files are held to it
    Loop(name="mine", goal="g", model="openai/gpt-4o-mini", invariants=[Invariant(name="small", check=lambda s: True)])


def test_an_invariant_check_with_the_wrong_parameters_is_refused(tmp_path: Path) -> None:
    message = config_error(loop_file(tmp_path, "invariants=[Invariant(name='small', check=lambda: True, "
                                               "description='always')]"))
    assert "'small': its check a lambda cannot be called as check(state) -> bool" in message


def test_list_loops_shows_the_mistake_on_its_row(tmp_path: Path) -> None:
    write(tmp_path / "loops" / "nodesc.py", HEAD + "loop = Loop(name='nd', goal='g', model='m/x', "
                                                   "invariants=[Invariant(name='i', check=lambda s: True)])\n")
    rows = [r for r in list_loops([tmp_path / "loops"]) if r.source.endswith("nodesc.py")]
    assert len(rows) == 1 and rows[0].error and "'i' has no description" in rows[0].error


def test_every_builtin_and_example_loop_describes_its_invariants() -> None:
    """The prompt shows each invariant's description; none of ours falls back to its bare name."""
    import importlib
    import pkgutil

    import loopterm.examples as examples

    seen = 0
    for info in pkgutil.walk_packages(examples.__path__, "loopterm.examples."):
        module = importlib.import_module(info.name)
        for loop in (v for v in vars(module).values() if isinstance(v, Loop)):
            seen += 1
            assert all(i.description.strip() for i in loop.invariants), (info.name, loop.name)
    assert seen >= 10
