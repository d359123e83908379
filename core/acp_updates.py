"""The one place that interprets an ACP agent's `session/update` notifications into an AgentTurn.

The SDK hands the client pydantic update objects; this folds each into the turn (pure: no I/O), so the
client, a replay and the tests read updates the same way. Updates are untrusted: every text is capped,
and a tool-call update may arrive before the call it updates (it is merged either way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .acp_turn import AgentToolCall, AgentTurn, FileDiff, PlanItem, capped

RAW_INPUT_CAP = 8_000  # a tool call's raw input kept as JSON text


def apply(turn: AgentTurn, update: Any, *, cwd: Path) -> None:
    """Fold one session update (an SDK update object) into `turn`; unknown kinds are only counted.

    Cost: the agent reports the session's running total. The turn's cost is that total minus the total
    when the turn started, which the client stores as `turn.usage.session_cost_usd` before the turn (None:
    nothing reported yet in this session, i.e. 0)."""
    turn.updates += 1
    kind = getattr(update, "session_update", None)
    if kind == "agent_message_chunk":
        turn.message = capped(turn.message + _content_text(update.content))
    elif kind == "agent_thought_chunk":
        turn.thoughts = capped(turn.thoughts + _content_text(update.content))
    elif kind in ("tool_call", "tool_call_update"):
        merge_tool_call(turn, update, cwd=cwd)
    elif kind == "plan":
        turn.plan = [
            PlanItem(content=capped(e.content, 2_000), status=str(e.status), priority=str(e.priority))
            for e in update.entries
        ]
    elif kind == "usage_update":
        _usage(turn, update)


def merge_tool_call(turn: AgentTurn, update: Any, *, cwd: Path) -> AgentToolCall:
    """Merge a tool call's start or update (or a permission request's tool call) into the turn's call with
    that id: only the fields the update carries override; content appends (diffs replace by path).

    A start that arrives after updates for its id (the protocol does not order them) is older news: it
    fills only what no update set, and its text goes before theirs."""
    late_start = getattr(update, "session_update", None) == "tool_call" and any(
        c.id == update.tool_call_id for c in turn.tool_calls
    )
    call = turn.tool_call(update.tool_call_id)
    blank = AgentToolCall(id=call.id)
    if update.title is not None and not (late_start and call.title != blank.title):
        call.title = capped(update.title, 2_000)
    if update.kind is not None and not (late_start and call.kind != blank.kind):
        call.kind = str(update.kind)
    if update.status is not None and not (late_start and call.status != blank.status):
        call.status = str(update.status)
    if update.locations is not None:
        paths = [relative_path(loc.path, cwd) for loc in update.locations]
        call.locations = list(dict.fromkeys(call.locations + paths))
    if update.raw_input is not None:
        try:
            raw = json.dumps(update.raw_input, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            raw = str(update.raw_input)
        call.raw_input = capped(raw, RAW_INPUT_CAP)
    for item in update.content or []:
        item_type = getattr(item, "type", None)
        if item_type == "diff":
            diff = FileDiff(
                path=relative_path(item.path, cwd),
                old_text=None if item.old_text is None else capped(item.old_text),
                new_text=capped(item.new_text),
            )
            call.diffs = [d for d in call.diffs if d.path != diff.path] + [diff]
        elif item_type in ("content", "terminal"):
            text = _content_text(item.content) if item_type == "content" else f"[terminal {item.terminal_id}]"
            call.output = capped(text + call.output if late_start else call.output + text)
    return call


def relative_path(path: str, cwd: Path) -> str:
    """`path` relative to the worktree when inside it (the agent's paths are absolute), else as given."""
    candidate = Path(path)
    if not candidate.is_absolute():
        return candidate.as_posix()
    for base in (cwd, cwd.resolve()):
        try:
            return candidate.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(candidate)


def _content_text(block: Any) -> str:
    """A content block's text; other kinds as a short marker (an image is not kept in the record)."""
    block_type = getattr(block, "type", None)
    if block_type == "text":
        return block.text
    if block_type == "resource_link":
        return f"[resource {getattr(block, 'uri', '')}]"
    if block_type == "resource":
        text = getattr(block.resource, "text", None)
        return text if isinstance(text, str) else f"[resource {getattr(block.resource, 'uri', '')}]"
    return f"[{block_type or 'content'}]"


def _usage(turn: AgentTurn, update: Any) -> None:
    usage = turn.usage
    usage.context_used = update.used
    usage.context_size = update.size
    if update.cost is not None:
        at_start = 0.0 if usage.session_cost_usd is None else usage.session_cost_usd - usage.cost_usd
        usage.session_cost_usd = float(update.cost.amount)
        usage.cost_usd = max(0.0, usage.session_cost_usd - at_start)
