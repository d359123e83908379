"""loopterm's environment settings: every ``LOOPTERM_*`` variable, in one model.

``settings()`` is the one place the variables are read. It builds a new
``Settings`` from the current environment on every call, so a test that
changes the environment, or a long-lived process whose environment is changed,
sees the change on the next call. Nothing here caches: a call costs about
0.4 ms, and importing pydantic-settings about 0.1 s on top of pydantic.

Rules that hold for every variable:

- an empty (or blank) value counts as unset: the default applies;
- a bad value is one ``ConfigError`` line naming the variable and what it
  expects, never a pydantic traceback (the CLI prints it and exits 2);
- a command-line flag wins over its variable (``--db`` over ``LOOPTERM_DB``):
  the caller applies the flag, then falls back to ``settings()``.

The README's "Settings" table is ``markdown_table()`` (``python -m
loopterm.core.settings`` prints it); a test keeps the two equal.

Writing a variable for a child process (``env["LOOPTERM_DB"] = ...``) is not a
read and stays where it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from loopterm.core.errors import ConfigError

__all__ = ["ENV_PREFIX", "Settings", "env_name", "markdown_table", "settings"]

ENV_PREFIX = "LOOPTERM_"
_BOOLEAN_WORDS = "1, true, yes, on / 0, false, no, off"
# True while settings(environ) builds from a given mapping: keyword arguments only, os.environ not read.
_ONLY_GIVEN: ContextVar[bool] = ContextVar("loopterm_settings_only_given", default=False)


class ProviderLimits(BaseModel):
    """Cluster-wide caps on one provider's queue of run segments (DBOS queue limits, core/queues.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int | None = Field(default=None, ge=1)  # segments of this provider running at once, all workers
    starts_per_minute: int | None = Field(default=None, ge=1)  # segments of this provider started per minute


LIMITS_EXAMPLE = '{"anthropic": {"concurrency": 4, "starts_per_minute": 30}, "openai": {"concurrency": 8}}'


class Settings(BaseSettings):
    """loopterm's settings from ``LOOPTERM_<FIELD>`` environment variables (see the module docstring).

    ``json_schema_extra`` carries what the README table and the error line
    need beyond the type: ``unit`` (what a number counts) and ``default_text``
    (how to say a default that is not a plain value).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        protected_namespaces=(),  # `model_timeout` is ours, not pydantic's `model_` namespace
    )

    db: Path | str = Field(
        default=Path(".loopterm") / "loopterm.db",
        description="the store: a SQLite file, or a `postgresql://` URL (see Storage); `--db` wins over it",
        json_schema_extra={"default_text": "`.loopterm/loopterm.db` under the working directory",
                           "type_text": "path or URL"},
    )
    workspaces: Path | None = Field(
        default=None,
        description="where new runs get their workspaces (files on the machine that runs the loop; `~` expands)",
        json_schema_extra={"default_text": "`workspaces/` beside a SQLite store; `.loopterm/workspaces` under the "
                                           "working directory for a PostgreSQL store"},
    )
    config_dir: Path | None = Field(
        default=None,
        description="where `config.toml` and `themes/` live (`~` expands)",
        json_schema_extra={"default_text": "`$XDG_CONFIG_HOME/loopterm`, else `~/.config/loopterm`"},
    )
    daily_budget_usd: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="the daily spend cap; overrides the one `loopterm budget --set-daily` keeps in the store",
        json_schema_extra={"unit": "US dollars", "default_text": "the store's, if it keeps one"},
    )
    model_timeout: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="how long one provider call may take",
        json_schema_extra={"unit": "seconds"},
    )
    model_attempts: int = Field(
        default=4, ge=1,
        description="attempts per model call, retries included",
    )
    retry_delay: float = Field(
        default=0.5, ge=0, allow_inf_nan=False,
        description="backoff ceiling after the first failed attempt (doubles per attempt, full jitter)",
        json_schema_extra={"unit": "seconds"},
    )
    retry_max_delay: float = Field(
        default=8.0, ge=0, allow_inf_nan=False,
        description="backoff cap, also for a provider's Retry-After; not below `LOOPTERM_RETRY_DELAY`",
        json_schema_extra={"unit": "seconds"},
    )
    breaker_failures: int = Field(
        default=5, ge=1,
        description="consecutive failures that open a model's circuit",
    )
    breaker_reset: float = Field(
        default=30.0, ge=0, allow_inf_nan=False,
        description="how long an open circuit refuses calls before one trial call",
        json_schema_extra={"unit": "seconds"},
    )
    debug: bool = Field(
        default=False,
        description="an unexpected error shows its traceback instead of one line",
    )
    frozen: bool = Field(
        default=False,
        description="the TUI draws no animation and no blinking cursor (steady screens for snapshots)",
    )
    queue_db: str | None = Field(
        default=None,
        description="the PostgreSQL URL of the work queues (DBOS's system database) for `loopterm worker` and "
                    "`--submit`; with a SQLite store it allows workers on the store's own machine only",
        json_schema_extra={"default_text": "the store's, when `--db` is a `postgresql://` URL"},
    )
    provider_limits: Annotated[dict[str, ProviderLimits], NoDecode] = Field(
        default={},  # pydantic copies it for each instance
        description="cluster-wide caps per provider (the model's litellm prefix) on run segments: `concurrency` "
                    f"running at once, `starts_per_minute`; e.g. `{LIMITS_EXAMPLE}`",
        json_schema_extra={"default_text": "no caps"},
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, env_settings: Any,
                                   dotenv_settings: Any, file_secret_settings: Any) -> tuple[Any, ...]:
        """Keyword arguments and the environment only: no .env file, no secrets directory."""
        return (init_settings,) if _ONLY_GIVEN.get() else (init_settings, env_settings)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """Strip text values; an empty or blank one is dropped, so the default applies."""
        if not isinstance(data, dict):
            return data
        kept = {}
        for key, value in data.items():
            if isinstance(value, str):
                value = value.strip()
                if not value:
                    continue
            kept[key] = value
        return kept

    @field_validator("db", mode="before")
    @classmethod
    def _path_or_url(cls, value: Any) -> Any:
        """A URL stays text (a Path would fold its `//`); anything else is a path, as it always was."""
        if isinstance(value, str) and "://" not in value:
            return Path(value)
        return value

    @field_validator("daily_budget_usd", mode="before")
    @classmethod
    def _usd(cls, value: Any) -> Any:
        """Text to dollars, with the line `loopterm budget` has always printed for a bad figure."""
        if not isinstance(value, str):
            return value
        var = env_name("daily_budget_usd")
        try:
            usd = float(value)
        except ValueError:
            raise ValueError(f"${var} must be a number of US dollars, got {value!r}; fix it or unset it") from None
        if not math.isfinite(usd) or usd < 0:
            raise ValueError(f"${var} must be a finite number of US dollars >= 0, got {value!r}; fix it or unset it")
        return usd

    @field_validator("provider_limits", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        """Text is JSON (NoDecode: read here, so a blank value is unset like any other)."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"{env_name('provider_limits')} is not valid JSON: it must be "
                             f"{expects('provider_limits')}; fix it or unset it") from None

    @field_validator("queue_db")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"{env_name('queue_db')} must be a postgresql:// URL (the work queues live in PostgreSQL); "
                             "fix it or unset it")
        return value

    @model_validator(mode="after")
    def _delays_ordered(self) -> Settings:
        if self.retry_max_delay < self.retry_delay:
            raise ValueError(
                f"{env_name('retry_max_delay')} ({self.retry_max_delay:g}) is smaller than "
                f"{env_name('retry_delay')} ({self.retry_delay:g}); raise the first or lower the second"
            )
        return self


def env_name(field: str) -> str:
    """The environment variable of a field: ``db`` -> ``LOOPTERM_DB``."""
    if field not in Settings.model_fields:
        raise KeyError(f"no setting {field!r}")
    return ENV_PREFIX + field.upper()


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings the environment asks for, read now (nothing is cached).

    ``environ``: read these variables instead of ``os.environ`` (exact names;
    for tests and callers that hold a child's environment). A bad value raises
    ConfigError, one line naming the variable and what it expects.
    """
    try:
        if environ is None:
            return Settings()
        given = {name: environ[var] for name in Settings.model_fields if (var := env_name(name)) in environ}
        token = _ONLY_GIVEN.set(True)
        try:
            return Settings(**given)
        finally:
            _ONLY_GIVEN.reset(token)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except SettingsError as exc:  # a value that should be JSON and is not
        field = next((f for f in Settings.model_fields if f'field "{f}"' in str(exc)), "")
        name = env_name(field) if field else "a LOOPTERM_ variable"
        raise ConfigError(f"{name} is not valid JSON: it must be {expects(field) if field else 'JSON'}; "
                          "fix it or unset it") from None


# ----------------------------------------------------------------------------- words for people


def _extra(field: str) -> dict[str, Any]:
    extra = Settings.model_fields[field].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _bound(field: str) -> tuple[str, str] | None:
    """(words, symbol) for a field's lower bound: ("above 0", "> 0"), ("at least 1", ">= 1"); None if unbounded."""
    for meta in Settings.model_fields[field].metadata:
        if getattr(meta, "gt", None) is not None:
            return f"above {meta.gt:g}", f"> {meta.gt:g}"
        if getattr(meta, "ge", None) is not None:
            return f"at least {meta.ge:g}", f">= {meta.ge:g}"
    return None


def _base_type(field: str) -> type:
    annotation = Settings.model_fields[field].annotation
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return args[0] if args else annotation  # type: ignore[return-value]


def _is_mapping(field: str) -> bool:
    return getattr(Settings.model_fields[field].annotation, "__origin__", None) is dict


def expects(field: str) -> str:
    """What a field's variable must hold, as a person says it: "a number of seconds above 0"."""
    if _is_mapping(field):
        return f"a JSON object like {LIMITS_EXAMPLE}"
    kind = _base_type(field)
    if "type_text" in _extra(field):
        return f"a {_extra(field)['type_text']}"
    if kind is bool:
        return f"a boolean ({_BOOLEAN_WORDS})"
    if kind is Path:
        return "a path"
    if kind is str:
        return "a postgresql:// URL" if field == "queue_db" else "text"
    noun = "a whole number" if kind is int else "a number"
    unit = _extra(field).get("unit")
    bound = _bound(field)
    return noun + (f" of {unit}" if unit else "") + (f" {bound[0]}" if bound else "")


def type_text(field: str) -> str:
    """A field's type for the README table: "seconds > 0", "whole number >= 1", "boolean", "path"."""
    if _is_mapping(field):
        return "JSON object"
    kind = _base_type(field)
    if "type_text" in _extra(field):
        return str(_extra(field)["type_text"])
    if kind is bool:
        return "boolean"
    if kind is Path:
        return "path"
    if kind is str:
        return "URL" if field == "queue_db" else "text"
    base = _extra(field).get("unit") or ("whole number" if kind is int else "number")
    bound = _bound(field)
    return base + (f" {bound[1]}" if bound else "")


def default_text(field: str) -> str:
    info = Settings.model_fields[field]
    if "default_text" in _extra(field):
        return str(_extra(field)["default_text"])
    if isinstance(info.default, bool):
        return "off" if not info.default else "on"
    if isinstance(info.default, (int, float)):
        return f"{info.default:g}"
    return str(info.default)


def _one_line(exc: ValidationError) -> str:
    """The first problem as one line; the names of any others after it."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "value_error":  # our own validators say it all
            lines.append(str(error["ctx"]["error"]))
        elif field in Settings.model_fields and len(error["loc"]) > 1:  # inside a JSON value
            where = ".".join(str(part) for part in error["loc"][1:])
            lines.append(f"{env_name(field)} is not valid at {where}: {error['msg']}; it must be {expects(field)}")
        elif field in Settings.model_fields:
            lines.append(f"{env_name(field)}={error['input']!r} is not valid: it must be {expects(field)}; "
                         f"unset it for the default ({default_text(field)})")
        else:
            lines.append(" ".join(error["msg"].split()))
    first, rest = lines[0], lines[1:]
    if rest:
        others = [str(e["loc"][0]) for e in exc.errors()[1:] if e["loc"] and str(e["loc"][0]) in Settings.model_fields]
        first += f" (also bad: {', '.join(env_name(f) for f in others)})" if others else ""
    return " ".join(first.split())


def markdown_table() -> str:
    """The README's table of every variable: name, type, default, what it does."""
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for field, info in Settings.model_fields.items():
        rows.append(f"| `{env_name(field)}` | {type_text(field)} | {default_text(field)} | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
