"""How a loop declares an ACP coding agent as its actor (`Loop(agent=AgentSpec(...))`).

The agent is a separate program speaking the Agent Client Protocol over its stdio; loopterm starts it in
the run's own git worktree. Its environment is only what is declared here (plus the few variables a
program needs to start): a provider key the agent needs must be named in `env_from`, never copied
silently from loopterm's own environment.
"""

from __future__ import annotations

import fnmatch
import shlex

from pydantic import BaseModel, ConfigDict, Field, field_validator

# What any program needs to start; everything else reaches the agent only when declared.
BASE_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "TMPDIR")


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="agent", pattern=r"^[A-Za-z0-9_.-]+$")
    command: list[str] = Field(min_length=1)  # argv; the run's worktree is its working folder
    env: dict[str, str] = Field(default_factory=dict)  # set for the agent (values are not secrets: use env_from)
    env_from: list[str] = Field(default_factory=list)  # names copied from loopterm's environment (keys)
    # Limits inside one prompt turn: past either, loopterm cancels the turn (recorded as ended by "limit").
    turn_timeout_s: float = Field(default=600.0, gt=0)
    max_tool_calls: int = Field(default=60, ge=1)
    # Paths (globs, relative to the worktree) the agent may change. A permission request that touches
    # another path is refused before any person is asked; a turn that changed one anyway violates the
    # loop's `agent-paths` invariant.
    paths: list[str] = Field(default_factory=lambda: ["*"])
    # Fork a session with the protocol's (unstable) session/fork where the agent offers it.
    use_fork: bool = True

    @field_validator("command")
    @classmethod
    def _not_blank(cls, command: list[str]) -> list[str]:
        if not command[0].strip():
            raise ValueError("the agent's command is empty: give the program to start, e.g. ['claude-agent-acp']")
        return command

    @classmethod
    def from_command_line(cls, line: str, **fields: object) -> AgentSpec:
        """`--agent 'npx claude-agent-acp'`: a shell-quoted command line."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise ValueError(f"--agent {line!r} is not a valid command line ({exc})") from None
        if not argv:
            raise ValueError("--agent is empty: give the agent's command, e.g. --agent 'claude-agent-acp'")
        return cls(command=argv, **fields)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        """The run's model column for an agent loop: what reported the spend."""
        return f"agent/{self.name}"

    def allows(self, path: str) -> bool:
        """Whether the agent may change `path` (relative to the worktree; `*` matches across folders)."""
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.paths)
