"""A cases file: the inputs of a batch of runs of one loop (`loopterm run --cases`, `loopterm eval`).

A JSON list of case objects, or JSON lines (one object per line; a `.jsonl` file, or any file
whose first non-blank character is `{`)::

    [{"id": "accents", "goal": "...", "script": "cases/accents.json", "expect": "converged"},
     {"id": "stall", "script": "cases/stall.json", "max_iterations": 5, "expect": "terminated"}]

Fields (every one but `id` optional; no others allowed):

- ``id``: unique in the file, letters, digits, ``_ . -``.
- ``goal``: replaces the loop's goal (the task spec) for this case.
- ``script``: a scripted-model script for this case, relative to the cases file; the case
  runs on ``scripted/<loop>.case.<id>``.
- ``model``: a litellm model string for this case (not together with ``script``).
- ``max_iterations``, ``budget_usd``: this case's caps.
- ``expect``: the status the case should end in: converged, terminated, escalated, failed or
  stopped. Without it a case meets its expectation when it converges.

Which model a case runs on: its ``model``, else the command's ``--model``, else its ``script``'s
``scripted/<loop>.case.<id>``, else the loop's own model.

Every problem is one ConfigError line naming the file, the case and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loopterm.core.decision import unreadable_json
from loopterm.core.errors import ConfigError
from loopterm.core.text import one_line

Expectation = Literal["converged", "terminated", "escalated", "failed", "stopped"]
ID_PATTERN = r"^[A-Za-z0-9_.-]+$"
_MAX_SHOWN = 80  # characters of a bad value quoted in an error


class Case(BaseModel):
    """One case of a batch; `script` is resolved against the cases file's directory on load."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ID_PATTERN, max_length=100)
    goal: str | None = Field(default=None, min_length=1)
    script: Path | None = None
    model: str | None = Field(default=None, min_length=1)
    max_iterations: int | None = Field(default=None, ge=1)
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    expect: Expectation | None = None

    @model_validator(mode="after")
    def _model_or_script(self) -> "Case":
        if self.model is not None and self.script is not None:
            raise ValueError("give either 'model' or 'script', not both (a script runs on scripted/<loop>.case.<id>)")
        return self

    def met(self, status: str) -> bool:
        """Whether a run that ended in `status` meets this case's expectation (converged by default)."""
        return status == (self.expect or "converged")


@dataclass(frozen=True)
class CaseSet:
    """The validated cases of one file."""

    path: Path
    cases: list[Case]

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Any:
        return iter(self.cases)


def scripted_name(loop_name: str, case: Case) -> str:
    """The scripted model a case with its own script runs on: ``scripted/<loop>.case.<id>``.

    ("case." keeps it apart from a role's ``scripted/<loop>.<role>``: role names have no dots.)
    """
    return f"scripted/{loop_name}.case.{case.id}"


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _parse(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, raw object) for each case; `where` is "case N" or "case N (line L)"."""
    stripped = text.lstrip()
    if not stripped:
        raise ConfigError(f"cases file {path} is empty; write a JSON list of cases, e.g. "
                          '[{"id": "first", "expect": "converged"}]')
    jsonl = path.suffix.lower() == ".jsonl" or stripped.startswith("{")
    if jsonl and path.suffix.lower() != ".jsonl":
        try:  # one pretty-printed object is a mistake worth naming, not "line 2 is not JSON"
            whole = json.loads(text)
        except (ValueError, RecursionError):  # not JSON (JSONDecodeError), too deep, a number of 4,300+ digits
            whole = None
        if isinstance(whole, dict):
            raise ConfigError(f"cases file {path} holds one object, not a list of cases; wrap it in [ ] "
                              "(or write one case object per line)")
    if jsonl:
        out: list[tuple[str, Any]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"cases file {path}: line {lineno} is not valid JSON: {exc.msg} at column {exc.colno} "
                                  "(JSON lines: one case object per line)") from None
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"cases file {path}: line {lineno} is not valid JSON: {unreadable_json(exc)}") from None
            out.append((f"case {len(out) + 1} (line {lineno})", item))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"cases file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"cases file {path} is not valid JSON: {unreadable_json(exc)}") from None
    if not isinstance(data, list):
        raise ConfigError(f"cases file {path} must hold a JSON list of case objects (or JSON lines), "
                          f"not a {type(data).__name__}")
    return [(f"case {i}", item) for i, item in enumerate(data, start=1)]


def load_cases(path: Path | str) -> CaseSet:
    """Read and validate a cases file; any problem is one ConfigError line (file, case, field)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"cases file {path} not found; check the path given to --cases") from None
    except IsADirectoryError:
        raise ConfigError(f"cases file {path} is a directory; give the JSON file that lists the cases") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cases file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    base = path.resolve().parent
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for where, raw in _parse(path, text):
        label = where
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            label = f"{where} (id {raw['id']!r})"
        if not isinstance(raw, dict):
            raise ConfigError(f"cases file {path}: {label} is a {type(raw).__name__}, not an object with at least an 'id'")
        try:
            case = Case.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"cases file {path}: {label}: {_describe(exc, raw)}") from None
        if case.id in seen:
            raise ConfigError(f"cases file {path}: {label}: id: {case.id!r} is already used by {seen[case.id]}; "
                              "ids must be unique")
        seen[case.id] = where
        if case.script is not None:
            script = case.script.expanduser()
            script = script if script.is_absolute() else base / script
            if not script.is_file():
                raise ConfigError(f"cases file {path}: {label}: script: no file {str(case.script)!r} "
                                  f"(looked at {script}); paths are relative to the cases file")
            case = case.model_copy(update={"script": script.resolve()})
        cases.append(case)
    if not cases:
        raise ConfigError(f"cases file {path} lists no cases; add at least one object with an 'id'")
    return CaseSet(path=path.resolve(), cases=cases)


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    """'field: problem' for the first error (and how many more)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = ".".join(loc) or "(case)"
    kind = err.get("type", "")
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    if kind == "extra_forbidden":
        known = ", ".join(Case.model_fields)
        return f"{field}: unknown field; the fields are {known}{more}"
    if kind == "missing":
        return f"{field}: required{more}"
    if kind == "string_pattern_mismatch" and field == "id":
        return f"id: {_shown(raw.get('id'))} may hold only letters, digits, '_', '.' and '-'{more}"
    message = one_line(str(err.get("msg", "invalid"))).removeprefix("Value error, ")
    if field == "(case)":
        return message + more
    value = raw.get(loc[0]) if loc else None
    shown = f" (got {_shown(value)})" if loc and loc[0] in raw else ""
    return f"{field}: {message}{shown}{more}"
