"""What a loop declares of its MCP servers (`Loop(mcp_servers=[McpServer(...)])`) and of their tools'
policies; core/mcp_tools.py connects to them when a run starts. Declarations only: importing this
module loads neither the MCP SDK nor anything that talks to a server."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loopterm.core.tools import RewindPolicy

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class McpStartError(Exception):
    """A declared server could not be started, initialized or listed: the run cannot begin."""


class ToolPolicy(BaseModel):
    """A person's override of what an MCP tool's annotations imply (None: keep the default)."""

    model_config = ConfigDict(extra="forbid")

    side_effects: bool | None = None
    needs_approval: bool | None = None
    idempotent: bool | None = None
    on_rewind: RewindPolicy | None = None
    workspace_only: bool | None = None
    timeout: float | None = Field(default=None, gt=0)


class McpServer(BaseModel):
    """One MCP server a loop uses: a stdio `command` (run in the run's workspace) or an HTTP `url`.

    `{python}` and `{workspace}` in the command and in `env` values are replaced like a
    CommandGate's. The server's environment is loopterm's without credential-named variables
    (like gates and tools), plus `pass_env` (names passed through as they are, a key the server
    needs included) and `env`.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    command: list[str] | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, pattern=r"^https?://")
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=list)
    # HTTP headers for a `url` server; `{env:NAME}` in a value is the variable's value when the run starts,
    # so a token stays out of the loop file: headers={"Authorization": "Bearer {env:DOCS_TOKEN}"}.
    headers: dict[str, str] = Field(default_factory=dict)
    tools: list[str] | None = None  # the server's tools to expose (by its names); None: all of them
    prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")  # prepended to each tool's name for the model
    # Which side-effecting tools need a person's approval by default: those that may be destructive
    # (destructiveHint, which MCP presumes when a tool does not say), every side-effecting one, or none.
    approve: Literal["destructive", "side_effects", "never"] = "destructive"
    workspace_only: bool = False  # its effects stay in the run's workspace (a branch may re-execute them)
    overrides: dict[str, ToolPolicy] = Field(default_factory=dict)  # by the server's tool name
    startup_timeout: float = Field(default=30.0, gt=0)  # to start, initialize and list tools
    call_timeout: float = Field(default=60.0, gt=0)
    output_cap: int = Field(default=16_000, ge=100)

    @model_validator(mode="after")
    def _one_transport(self) -> "McpServer":
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: give exactly one of `command` (stdio) or `url` (streamable HTTP)")
        if self.headers and self.url is None:
            raise ValueError(f"MCP server {self.name!r}: `headers` are for a `url` server; a stdio server gets `env`")
        return self

    def http_headers(self) -> dict[str, str]:
        """`headers` with each `{env:NAME}` replaced by that variable's value (McpStartError when unset)."""
        def fill(match: re.Match[str]) -> str:
            value = os.environ.get(match.group(1))
            if value is None:
                raise McpStartError(f"MCP server {self.name!r} failed to start: its headers use {match.group(0)}, "
                                    f"but {match.group(1)} is not set (set it, or fix `headers` in the loop file)")
            return value

        return {k: re.sub(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}", fill, v) for k, v in self.headers.items()}

    def argv(self, workspace: Path) -> list[str]:
        return [fill(a, workspace) for a in self.command or []]

    def environment(self) -> dict[str, str]:
        from loopterm.core.gates import scrubbed_env

        passed = {k: os.environ[k] for k in self.pass_env if k in os.environ}
        return {**scrubbed_env(), **passed}


def fill(text: str, workspace: Path) -> str:
    return text.replace("{workspace}", str(workspace)).replace("{python}", sys.executable)


# ----------------------------------------------------------------------------- errors
