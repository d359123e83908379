"""What an agent loop is made of, before any run: its state, its one tool, its paths invariant.

Light on purpose (core/loop.py imports it to validate a loop with `agent`): the process and the session
live in core/agent_actor.py, which only a running engine loads.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from loopterm.core.acp_turn import PERMISSION_TOOL
from loopterm.core.agent_spec import AgentSpec
from loopterm.core.errors import ConfigError
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.state import LoopState
from loopterm.core.tools import Tool, ToolContext, tool

AGENT_TOOL = "agent"
TURN_WITH_PEOPLE_S = 7 * 24 * 3600.0  # the executor's bound on a whole turn, people's decisions included


class AgentTurnFailed(Exception):
    """A turn that did not end by itself (a limit, the budget, a crash): the tool's record is a failure."""


class AgentState(LoopState):
    """What an agent loop's state keeps of the last turn: invariants over paths read `changed_paths`."""

    changed_paths: list[str] = []
    commit: str | None = None  # the workspace's commit after the last turn
    session_id: str = ""
    stop_reason: str | None = None
    ended_by: str = ""


def agent_tool(spec: AgentSpec) -> Tool:
    async def agent(ctx: ToolContext, prompt: str) -> str:
        """Give the coding agent one prompt turn in the run's workspace."""
        if ctx.agent is None:
            raise RuntimeError("no agent session: the engine opens one when the run starts")
        return str(await ctx.agent.turn(ctx.iteration, prompt))

    # The turn's effects live in the workspace, which a branch restores from git, so a rewound run runs the
    # agent again rather than reusing a turn whose files it does not have. No executor timeout of its own: the
    # client limits the agent's time (turn_timeout_s), and a person deciding a permission takes what it takes.
    return tool(agent, name=AGENT_TOOL, side_effects=True, workspace_only=True, idempotent=False,
                timeout=TURN_WITH_PEOPLE_S, on_rewind="reexecute", output_cap=4_000)


@functools.cache  # one pseudo-tool (its argument model is built once, not per request)
def permission_tool() -> Tool:
    def permission(title: str, kind: str, paths: list[str], diff: str) -> str:
        """A coding agent asks to make a change (approve: allow it once; deny: reject it once)."""
        raise RuntimeError("an agent's permission is answered, never run")

    return tool(permission, name=PERMISSION_TOOL)


def paths_invariant(spec: AgentSpec) -> Invariant:
    return Invariant(
        name="agent-paths", remediation=Remediation.ESCALATE,
        check=lambda state: all(spec.allows(p) for p in getattr(state, "changed_paths", [])),
        description=f"the agent changes only {', '.join(spec.paths)}",
    )


AGENT_MODEL = "agent:"  # a run's model "agent:CMD": the loop's agent started with another command (`--agent`)


def agent_for(spec: AgentSpec, model: str) -> AgentSpec:
    """The agent a run uses: the loop's, or, when the run was started with `--agent CMD` (recorded as its
    model, so a resume, a branch and a replay start the same agent), the same spec with that command."""
    if not model.startswith(AGENT_MODEL):
        return spec
    chosen = AgentSpec.from_command_line(model[len(AGENT_MODEL):])
    name = Path(chosen.command[0]).name or spec.name
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)
    return spec.model_copy(update={"command": chosen.command, "name": safe, "env": {}})


def check_agent(spec: AgentSpec) -> None:
    """One line before a run starts when the agent's program cannot be found."""
    program = spec.command[0]
    if shutil.which(program) is None and not Path(program).is_file():
        raise ConfigError(f"the agent's command {program!r} was not found (not on PATH, not a file); install the "
                          f"agent or give its command with --agent 'CMD ARGS'")
