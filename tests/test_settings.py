"""The LOOPTERM_* settings: one model (core/settings.py), read only there, documented in the README's table."""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.errors import ConfigError
from loopterm.core.retry import CallSettings
from loopterm.core.settings import ENV_PREFIX, ProviderLimits, Settings, env_name, markdown_table, settings

ROOT = Path(__file__).resolve().parent.parent
FIELDS = list(Settings.model_fields)
VARIABLES = [env_name(f) for f in FIELDS]


@pytest.fixture(autouse=True)
def _no_loopterm_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without any of the model's variables."""
    for var in VARIABLES:
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- defaults and reads


def test_defaults() -> None:
    s = settings()
    assert s == settings({}) == Settings.model_construct()  # environment, mapping and the declared defaults agree
    assert s.db == Path(".loopterm") / "loopterm.db"
    assert (s.config_dir, s.daily_budget_usd, s.debug, s.frozen) == (None, None, False, False)
    assert (s.model_timeout, s.model_attempts, s.retry_delay, s.retry_max_delay) == (60.0, 4, 0.5, 8.0)
    assert (s.breaker_failures, s.breaker_reset) == (5, 30.0)
    assert CallSettings.from_env() == CallSettings()  # the retry module's own defaults are the same figures


def test_a_given_mapping_is_read_instead_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_MODEL_ATTEMPTS", "9")
    monkeypatch.setenv("LOOPTERM_DEBUG", "1")
    assert settings({}) == Settings.model_construct()
    assert settings({"LOOPTERM_BREAKER_RESET": "2"}).breaker_reset == 2.0
    assert CallSettings.from_env({}) == CallSettings()
    assert (settings().model_attempts, settings().debug) == (9, True)  # and the environment again after


def test_the_cli_default_db_is_the_models() -> None:
    from loopterm.tui.console import DEFAULT_DB  # kept in the standard-library-only module for --help's text

    assert Settings.model_fields["db"].default == DEFAULT_DB


# (field, value in the environment, value read); every field has at least one
READS: list[tuple[str, str, Any]] = [
    ("db", "elsewhere/runs.db", Path("elsewhere/runs.db")),
    ("db", "postgresql://u:pw@db.example/loops", "postgresql://u:pw@db.example/loops"),  # a URL stays text
    ("workspaces", "/srv/loopterm/ws", Path("/srv/loopterm/ws")),
    ("config_dir", "/tmp/loopterm-config", Path("/tmp/loopterm-config")),
    ("daily_budget_usd", "2.5", 2.5),
    ("daily_budget_usd", "0", 0.0),
    ("model_timeout", "1.5", 1.5),
    ("model_attempts", " 7 ", 7),
    ("retry_delay", "0", 0.0),
    ("retry_max_delay", "20", 20.0),
    ("breaker_failures", "2", 2),
    ("breaker_reset", "0.25", 0.25),
    ("debug", "1", True),
    ("debug", "0", False),
    ("debug", "true", True),
    ("frozen", "1", True),
    ("frozen", "no", False),
    ("queue_db", "postgresql://team@db.example/loopterm", "postgresql://team@db.example/loopterm"),
    ("provider_limits", '{"anthropic": {"concurrency": 4, "starts_per_minute": 30}}',
     {"anthropic": ProviderLimits(concurrency=4, starts_per_minute=30)}),
]


def test_every_field_has_a_read_case() -> None:
    assert {f for f, _, _ in READS} == set(FIELDS)


@pytest.mark.parametrize(("field", "raw", "expected"), READS, ids=[f"{f}={r.strip()}" for f, r, _ in READS])
def test_each_variable_is_read(field: str, raw: str, expected: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name(field), raw)
    assert getattr(settings(), field) == expected
    assert getattr(settings({env_name(field): raw}), field) == expected
    monkeypatch.setenv(env_name(field), "   ")  # blank: unset, the default again
    assert getattr(settings(), field) == Settings.model_fields[field].default


def test_each_call_sees_the_environment_as_it_is_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_MODEL_ATTEMPTS", "2")
    assert settings().model_attempts == 2
    monkeypatch.setenv("LOOPTERM_MODEL_ATTEMPTS", "9")
    assert settings().model_attempts == 9
    monkeypatch.delenv("LOOPTERM_MODEL_ATTEMPTS")
    assert settings().model_attempts == 4


def test_the_readers_take_their_values_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.core.daily_budget import env_daily_budget
    from loopterm.tui.config import config_dir
    from loopterm.tui.console import db_path, default_db

    monkeypatch.setenv("LOOPTERM_DB", str(tmp_path / "env.db"))
    assert default_db() == tmp_path / "env.db"
    assert db_path(argparse.Namespace(db=tmp_path / "flag.db")) == tmp_path / "flag.db"  # --db wins
    assert db_path(argparse.Namespace(db=None)) == tmp_path / "env.db"
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", "~/cfg")
    assert config_dir() == Path.home() / "cfg"
    monkeypatch.setenv("LOOPTERM_DAILY_BUDGET_USD", "1.25")
    assert env_daily_budget() == 1.25
    monkeypatch.setenv("LOOPTERM_MODEL_TIMEOUT", "3")
    monkeypatch.setenv("LOOPTERM_BREAKER_RESET", "4")
    call = CallSettings.from_env()
    assert (call.timeout, call.breaker_reset, call.attempts) == (3.0, 4.0, 4)


# ----------------------------------------------------------------------------- bad values


BAD: list[tuple[str, str, str]] = [
    ("daily_budget_usd", "plenty", "must be a number of US dollars"),
    ("daily_budget_usd", "-1", ">= 0"),
    ("model_timeout", "0", "a number of seconds above 0"),
    ("model_attempts", "abc", "a whole number at least 1"),
    ("model_attempts", "0", "a whole number at least 1"),
    ("retry_delay", "inf", "a number of seconds at least 0"),
    ("retry_max_delay", "nan", "a number of seconds at least 0"),
    ("breaker_failures", "-3", "a whole number at least 1"),
    ("breaker_reset", "soon", "a number of seconds at least 0"),
    ("debug", "maybe", "a boolean"),
    ("frozen", "2", "a boolean"),
]


@pytest.mark.parametrize(("field", "raw", "words"), BAD, ids=[f"{f}={r}" for f, r, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_variable(field: str, raw: str, words: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name(field), raw)
    with pytest.raises(ConfigError) as info:
        settings()
    message = str(info.value)
    assert "\n" not in message and env_name(field) in message and words in message and repr(raw) in message
    assert "pydantic" not in message and "validation error" not in message.lower()


@pytest.mark.parametrize(("raw", "words"), [
    ("{nope", "LOOPTERM_PROVIDER_LIMITS is not valid JSON"),
    ("[1]", "LOOPTERM_PROVIDER_LIMITS=[1] is not valid"),
    ('{"openai": {"concurrency": 0}}', "LOOPTERM_PROVIDER_LIMITS is not valid at openai.concurrency"),
    ('{"openai": {"burst": 3}}', "LOOPTERM_PROVIDER_LIMITS is not valid at openai.burst"),
])
def test_bad_provider_limits_are_one_line_saying_where(raw: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_PROVIDER_LIMITS", raw)
    with pytest.raises(ConfigError) as info:
        settings()
    assert "\n" not in str(info.value) and words in str(info.value) and "a JSON object like" in str(info.value)


def test_a_queue_db_that_is_not_postgresql_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_QUEUE_DB", "mysql://me:s3cret@host/db")
    with pytest.raises(ConfigError, match="LOOPTERM_QUEUE_DB must be a postgresql:// URL") as info:
        settings()
    assert "s3cret" not in str(info.value)


def test_delays_out_of_order_and_several_bad_values_are_still_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_RETRY_DELAY", "10")
    with pytest.raises(ConfigError, match="LOOPTERM_RETRY_MAX_DELAY .8. is smaller than LOOPTERM_RETRY_DELAY .10."):
        settings()
    monkeypatch.setenv("LOOPTERM_MODEL_ATTEMPTS", "x")
    monkeypatch.setenv("LOOPTERM_FROZEN", "x")
    with pytest.raises(ConfigError) as info:
        settings()
    assert "\n" not in str(info.value) and str(info.value).startswith("LOOPTERM_MODEL_ATTEMPTS='x' is not valid")
    assert "also bad: LOOPTERM_FROZEN" in str(info.value)


def _loopterm() -> list[str]:
    """The installed console script beside this interpreter (the real `loopterm`), else the module."""
    script = Path(sys.executable).parent / "loopterm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "loopterm.tui.cli"]


@pytest.mark.parametrize(("var", "raw"), [("LOOPTERM_MODEL_ATTEMPTS", "abc"), ("LOOPTERM_DEBUG", "maybe"),
                                          ("LOOPTERM_DAILY_BUDGET_USD", "plenty")])
def test_the_cli_refuses_a_bad_value_in_one_line(var: str, raw: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env[var] = raw
    done = subprocess.run([*_loopterm(), "budget", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("loopterm: ") and var in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / ".loopterm").exists()  # refused before anything was made


# ----------------------------------------------------------------------------- the README's table


def test_the_readme_table_is_the_models() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- settings table:[^\n]*-->\n(.*?)\n<!-- end of settings table -->", readme, re.DOTALL)
    assert found, "README.md lost its settings table markers"
    listed = re.findall(r"^\| `(LOOPTERM_[A-Z0-9_]+)` \|", found.group(1), re.MULTILINE)
    assert sorted(listed) == sorted(VARIABLES), "the README's settings table and the Settings model list different variables"
    assert found.group(1) == markdown_table(), "regenerate the README's table with `python -m loopterm.core.settings`"


# ----------------------------------------------------------------------------- nobody else reads them

# The rule. Outside core/settings.py, no module under core/, store/ or tui/:
#   1. reads the environment (os.environ.get / [...] / setdefault / pop, `in os.environ`, os.getenv) with a key
#      that names a LOOPTERM_ variable: a literal, an f-string, or a module constant holding one;
#   2. holds a LOOPTERM_ variable's exact name as a string (the way to read one indirectly, through a table or
#      a constant), except as a key being written for a child process: `env["LOOPTERM_DB"] = ...`,
#      `del env["LOOPTERM_DB"]`, or a dict literal's key (`{**os.environ, "LOOPTERM_DB": ...}`).
# Text that mentions a variable inside a longer string (help, docstrings, error lines) is not a read. A name
# for messages is derived from the model: `env_name("daily_budget_usd")`.
SCANNED = ("core", "store", "tui")
THE_READER = ROOT / "core" / "settings.py"
_EXACT = re.compile(r"LOOPTERM_[A-Z0-9_]+")


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _names_a_variable(node: ast.AST, constants: set[str]) -> bool:
    return any((isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(ENV_PREFIX))
               or (isinstance(n, ast.Name) and n.id in constants) for n in ast.walk(node))


def violations(source: str, filename: str = "<source>") -> list[str]:
    tree = ast.parse(source, filename)
    constants = {target.id for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 and node.value.value.startswith(ENV_PREFIX) for target in node.targets if isinstance(target, ast.Name)}
    found: list[str] = []
    written: set[int] = set()  # literal nodes allowed by rule 2
    for node in ast.walk(tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") and _is_environ(func.value):
                key = node.args[0] if node.args else None
            elif (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                    isinstance(func, ast.Name) and func.id == "getenv"):
                key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            if isinstance(node.ctx, ast.Load):
                key = node.slice
            else:
                written.add(id(node.slice))
        elif isinstance(node, ast.Subscript) and not isinstance(node.ctx, ast.Load):
            written.add(id(node.slice))
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if any(_is_environ(c) for c in node.comparators):
                key = node.left
        elif isinstance(node, ast.Dict):
            written.update(id(k) for k in node.keys if k is not None)
        if key is not None and _names_a_variable(key, constants):
            found.append(f"{filename}:{node.lineno}: reads {ast.unparse(key)} from the environment")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and _EXACT.fullmatch(node.value)
                and id(node) not in written):
            found.append(f"{filename}:{node.lineno}: holds the variable name {node.value!r} (read it through settings())")
    return found


def test_the_scan_finds_reads_and_allows_writes() -> None:
    bad = '''
import os
from os import environ, getenv
DB_ENV = "LOOPTERM_DB"
a = os.environ.get("LOOPTERM_DB")
b = os.environ["LOOPTERM_DEBUG"]
c = os.getenv(DB_ENV)
d = "LOOPTERM_FROZEN" in os.environ
e = environ.get(f"LOOPTERM_{'x'.upper()}")
f = getenv("LOOPTERM_CONFIG_DIR", "")
TABLE = {"timeout": ("LOOPTERM_MODEL_TIMEOUT", 1)}
'''
    lines = sorted({int(v.split(":")[1]) for v in violations(bad)})
    assert lines == [4, 5, 6, 7, 8, 9, 10, 11], violations(bad)
    fine = '''
import os
env = {**os.environ, "LOOPTERM_DB": "x.db"}
env["LOOPTERM_DEBUG"] = "1"
del env["LOOPTERM_DEBUG"]
os.environ["LOOPTERM_CONFIG_DIR"] = "/tmp/c"
home = os.environ.get("HOME")
HELP = "the store (default: $LOOPTERM_DB or .loopterm/loopterm.db)"
'''
    assert violations(fine) == []


def test_only_core_settings_reads_loopterm_variables() -> None:
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py")) if p != THE_READER]
    assert len(files) > 20  # the scan really runs over the source
    found = [v for p in files for v in violations(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not found, "read LOOPTERM_ variables through loopterm.core.settings.settings():\n" + "\n".join(found)


def test_importing_the_settings_loads_no_textual_and_no_litellm() -> None:
    code = "import loopterm.core.settings, sys; print('\\n'.join(sys.modules))"
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "pydantic_settings" in mods
    assert not {m for m in mods if m.split(".")[0] in ("textual", "litellm") or m.startswith("loopterm.tui")}
