"""The triggers file (`.loopterm/triggers.toml`): which loop `loopterm daemon` starts, on what event.

    [[trigger]]
    name = "fix-on-change"
    loop = "codefix"                   # a built-in name or path/to/file.py[:name], as `loopterm run` takes
    on.change = "src/"                 # or on.schedule = "*/5 * * * *" / "every 10m"; or on.command = "pytest -q"
    goal = "Tests changed: {event}. Make them pass."

Exactly one of `on.change` (paths watched for changes), `on.schedule` (a cron expression, local time,
or "every DURATION") and `on.command` (run every `every`; fires when it starts failing) per trigger.
The file is read with tomllib and validated here, so a mistake is one line naming the file, the
trigger and the field, before anything runs. Also here: the text of each kind of event, and the
goal it fills in. No asyncio, no file watching: the daemon (tui/daemon_cli.py) does that.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loopterm.core.errors import ConfigError
from loopterm.core.secrets import redact

DEFAULT_FILE = Path(".loopterm") / "triggers.toml"
EVENT_MARK = "{event}"
DEFAULT_GOAL_TAIL = "\n\nWhat triggered this run: {event}"
MAX_LISTED_FILES = 20
OUTPUT_TAIL_CHARS = 1_500

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_EVERY = re.compile(r"^\s*every\s+(.+)$", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """Seconds from "500ms", "2s", "10m", "1h", "1d" or a bare number of seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r} (write e.g. \"2s\", \"10m\", \"1h\")")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"not a duration: {value!r} (write e.g. \"2s\", \"10m\", \"1h\")")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be more than zero, got {value!r}")
    return seconds


class Schedule(BaseModel):
    """When a schedule trigger fires: every `interval` seconds, or at the times of a cron expression."""

    text: str
    interval: float | None = None  # "every DURATION"
    cron: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        every = _EVERY.match(text)
        if every is not None:
            return cls(text=text, interval=parse_duration(every.group(1)))
        from croniter import croniter  # lazy: only a daemon with a cron schedule needs it

        if not croniter.is_valid(text):
            raise ValueError(f"not a cron expression (five fields, e.g. \"*/5 * * * *\") nor \"every DURATION\": {text!r}")
        return cls(text=text, cron=text)

    def next_after(self, at: float) -> float:
        """The first firing time (Unix time) strictly after `at`; cron times are local time."""
        if self.interval is not None:
            return at + self.interval
        from croniter import croniter

        return float(croniter(self.cron, datetime.fromtimestamp(at).astimezone()).get_next(float))


class On(BaseModel):
    """What fires a trigger: exactly one of change, schedule, command."""

    model_config = ConfigDict(extra="forbid")

    change: list[str] | None = None  # paths (files or folders), relative to the daemon's working directory
    schedule: str | None = None
    command: list[str] | None = None  # argv; a string is split like a shell would (no shell runs it)

    @field_validator("change", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and not value:
            raise ValueError("give at least one path to watch")
        if isinstance(value, list) and any(isinstance(p, str) and not p.strip() for p in value):
            raise ValueError("a path to watch is empty")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            Schedule.parse(value)
        return value

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command: {exc}") from None
        if isinstance(value, list) and not value:
            raise ValueError("the command is empty")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "On":
        given = [name for name in ("change", "schedule", "command") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of on.change, on.schedule, on.command"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def kind(self) -> Literal["change", "schedule", "command"]:
        return "change" if self.change is not None else "schedule" if self.schedule is not None else "command"


class Trigger(BaseModel):
    """One [[trigger]] table."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    loop: str = Field(min_length=1)
    on: On
    goal: str | None = None  # "{event}" is replaced by what happened; default: the loop's goal + the event
    model: str | None = None
    max_iterations: int | None = Field(default=None, ge=1)
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    budget_tokens: int | None = Field(default=None, ge=0)
    debounce: float = 1.0  # on.change: fire once the files have been quiet this long
    every: float | None = None  # on.command: how often to run it (default 1m)
    timeout: float = 600.0  # on.command: a check running longer is killed and counts as failing

    @field_validator("debounce", "every", "timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _fits_kind(self) -> "Trigger":
        if self.on.kind == "command":
            if self.every is None:
                self.every = 60.0
        elif self.every is not None:
            raise ValueError("every: only on.command triggers take it (use on.schedule = \"every ...\" for a schedule)")
        return self

    @property
    def schedule(self) -> Schedule:
        assert self.on.schedule is not None
        return Schedule.parse(self.on.schedule)

    def goal_for(self, loop_goal: str, event: str) -> str:
        """The run's goal: the template with the event filled in (the loop's goal + the event by default)."""
        template = self.goal if self.goal is not None else loop_goal + DEFAULT_GOAL_TAIL
        if EVENT_MARK not in template:
            template += DEFAULT_GOAL_TAIL
        return redact(template.replace(EVENT_MARK, event))


class TriggersFile(BaseModel):
    """The whole file: a non-empty list of triggers with distinct names."""

    model_config = ConfigDict(extra="forbid")

    trigger: list[Trigger] = Field(min_length=1)


def _where(loc: tuple[Any, ...], raw: dict[str, Any]) -> tuple[str, str]:
    """('trigger 'x'', 'on.schedule') for a pydantic error location; the trigger named as written."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "trigger" and isinstance(parts[1], int):
        index = parts[1]
        table = raw["trigger"][index] if isinstance(raw.get("trigger"), list) and index < len(raw["trigger"]) else None
        name = table.get("name") if isinstance(table, dict) else None
        who = f"trigger {name!r}" if isinstance(name, str) and name else f"trigger #{index + 1}"
        return who, ".".join(str(p) for p in parts[2:])
    return "", ".".join(str(p) for p in parts)


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err.get("type") == "extra_forbidden":
        return "unknown field (see the README's Triggers section for the fields)"
    if err.get("type") == "missing":
        return "missing"
    return msg


def load_triggers(path: Path) -> TriggersFile:
    """Read and validate a triggers file; any problem is one ConfigError line naming the file, trigger and field."""
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file; write one (see the README's Triggers section) or pass --triggers FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{shown}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from None
    try:
        parsed = TriggersFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        who, field = _where(tuple(err.get("loc", ())), raw)
        if not who and field == "trigger" and err.get("type") in ("missing", "too_short"):
            raise ConfigError(f"{shown}: no [[trigger]] table; add one (see the README's Triggers section)") from None
        head = ": ".join(p for p in (shown, who, field) if p)
        raise ConfigError(f"{head}: {_message(err)}") from None
    seen: set[str] = set()
    for trigger in parsed.trigger:
        if trigger.name in seen:
            raise ConfigError(f"{shown}: trigger {trigger.name!r}: name: used by two triggers; names must be distinct")
        seen.add(trigger.name)
    return parsed


# ---------------------------------------------------------------------------- event texts


def change_event(paths: list[str]) -> str:
    """What changed, as the goal reads it: 'changed: a.py (modified), b.py (added)' (capped)."""
    listed = sorted(set(paths))
    shown = ", ".join(listed[:MAX_LISTED_FILES])
    more = len(listed) - MAX_LISTED_FILES
    return redact(f"files changed: {shown}" + (f" and {more} more" if more > 0 else ""))


def schedule_event(schedule: Schedule, at: float) -> str:
    when = datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")
    return f"scheduled run at {when} ({schedule.text})"


def command_event(argv: list[str], exit_code: int | None, error: str | None, stdout: str, stderr: str) -> str:
    """'`pytest -q` exited with code 1; last output: ...' with the tail of its output."""
    shown = " ".join(argv)
    head = f"`{shown}` " + (f"exited with code {exit_code}" if exit_code is not None else f"failed: {error}")
    output = (stdout.rstrip() + ("\n" + stderr.rstrip() if stderr.strip() else "")).strip()
    if not output:
        return redact(head)
    tail = output[-OUTPUT_TAIL_CHARS:]
    return redact(f"{head}; last output:\n{'…' if len(output) > len(tail) else ''}{tail}")

