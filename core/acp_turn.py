"""One prompt turn of an ACP coding agent, as loopterm records it (plain pydantic; no SDK import).

An agent streams a turn as `session/update` notifications (message and thought chunks, tool calls and
their updates, a plan, usage) and may ask permissions; `core/acp_updates.py` folds those into this
record. The record is what the run keeps (in the iteration's `agent_turn` event, core/runlog.py): `show`,
`watch`, the TUI, export and replay read the whole turn from it, without the agent.

Everything in it came from an untrusted process: text is shown with markup off and capped here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

PERMISSION_TOOL = "acp.permission"  # an agent's permission request, as a loopterm approval (core/agent_actor.py)
TEXT_CAP = 64_000  # one message, thought or tool output kept per turn (the rest is cut, marked)
DIFF_CAP = 200_000  # the worktree's diff after the turn

EndedBy = Literal["agent", "person", "limit", "budget", "crash", "error"]
PermissionOutcome = Literal["allow_once", "reject_once", "cancelled"]
DecidedBy = Literal["person", "policy", "paths", "headless", "stopped"]


def capped(text: str, limit: int = TEXT_CAP) -> str:
    """`text` cut to `limit` characters, saying so."""
    return text if len(text) <= limit else text[:limit] + f"\n… [{len(text) - limit} more characters not kept]"


class FileDiff(BaseModel):
    path: str
    old_text: str | None = None  # None: a new file
    new_text: str = ""


class AgentToolCall(BaseModel):
    """A tool call as it stands after every update for its id (updates may arrive before the call)."""

    id: str
    title: str = ""
    kind: str = "other"  # read, edit, delete, move, search, execute, think, fetch, switch_mode, other
    status: str = "pending"  # pending, in_progress, completed, failed
    locations: list[str] = Field(default_factory=list)  # paths the call touches
    diffs: list[FileDiff] = Field(default_factory=list)
    output: str = ""  # its text content (and terminals' ids), capped
    raw_input: str = ""  # the agent's own input for it, as JSON text, capped


class PlanItem(BaseModel):
    content: str
    status: str = "pending"  # pending, in_progress, completed
    priority: str = "medium"


class AgentPermission(BaseModel):
    """A permission the agent asked for and what loopterm answered (never allow_always)."""

    tool_call_id: str = ""
    title: str = ""
    kind: str = "other"
    paths: list[str] = Field(default_factory=list)
    offered: list[str] = Field(default_factory=list)  # the option kinds the agent offered
    outcome: PermissionOutcome
    decided_by: DecidedBy
    reason: str = ""
    key: str = ""  # the approval's key in the run's log, when it went through approvals


class AgentUsage(BaseModel):
    """What the agent reported spending on this turn (loopterm cannot check it: marked as the agent's)."""

    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    cost_usd: float = 0.0  # this turn's: the session's running total at the end minus at the start
    session_cost_usd: float | None = None  # the session's running total the agent last reported
    context_used: int | None = None
    context_size: int | None = None


class AgentTurn(BaseModel):
    agent: str  # the AgentSpec's name
    session_id: str = ""
    # new: a fresh session; loaded: session/load after a restart; forked: session/fork; seeded: a new
    # session given a summary of earlier iterations (a branch whose agent cannot fork there)
    session_origin: Literal["new", "loaded", "forked", "seeded"] = "new"
    prompt: str = ""
    message: str = ""  # the agent's reply text, chunks joined
    thoughts: str = ""
    plan: list[PlanItem] = Field(default_factory=list)
    tool_calls: list[AgentToolCall] = Field(default_factory=list)  # in the order first seen
    permissions: list[AgentPermission] = Field(default_factory=list)
    writes: list[str] = Field(default_factory=list)  # paths the agent wrote through the client (fs/write_text_file)
    refused_paths: list[str] = Field(default_factory=list)  # reads/writes outside the worktree, refused
    usage: AgentUsage = Field(default_factory=AgentUsage)
    # The protocol's stop reason (end_turn, max_tokens, max_turn_requests, refusal, cancelled); None: no answer
    stop_reason: str | None = None
    # who ended the turn: the agent itself, a person, a limit, the budget, a crash, or an error the agent answered
    ended_by: EndedBy = "agent"
    note: str = ""  # one line: which limit, what crashed
    updates: int = 0  # session/update notifications received
    started_at: float = 0.0
    ended_at: float = 0.0
    base_commit: str | None = None  # the worktree's commit before the turn
    commit: str | None = None  # ... and after it (None: nothing committed)
    changed_paths: list[str] = Field(default_factory=list)  # between base_commit and commit
    diff: str = ""  # `git diff base_commit commit`, capped

    def tool_call(self, call_id: str) -> AgentToolCall:
        """The call with this id, added (pending, untitled) if no update named it before."""
        for call in self.tool_calls:
            if call.id == call_id:
                return call
        call = AgentToolCall(id=call_id)
        self.tool_calls.append(call)
        return call

    def touched_paths(self) -> list[str]:
        """Every path the turn is known to touch: diffs, tool-call locations, client writes, the commit."""
        paths: list[str] = []
        for call in self.tool_calls:
            paths.extend(call.locations)
            paths.extend(d.path for d in call.diffs)
        paths.extend(self.writes)
        paths.extend(self.changed_paths)
        return list(dict.fromkeys(paths))

    def summary(self) -> str:
        """One line: how the turn ended and what it did."""
        calls = len(self.tool_calls)
        files = len(self.changed_paths)
        why = self.stop_reason or "no stop reason"
        by = "" if self.ended_by == "agent" else f" ({self.ended_by}{': ' + self.note if self.note else ''})"
        return f"{why}{by}, {calls} call{'' if calls == 1 else 's'}, {files} file{'' if files == 1 else 's'}"
