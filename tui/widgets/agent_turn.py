"""An ACP agent's turn (core/acp_turn.py) as the Agent tab shows it, and an agent's diff as the approval dialog
shows it. Pure functions to `rich.text.Text`, no widgets.

Laid out the way toad and Zed show a turn: who answered and how it ended, what it spent (as the agent reported
it: loopterm cannot check it), the plan, the tool calls by kind and status, what was asked and who answered,
then the diffs. Everything in a turn came from the agent: it is appended as literal Text (never markup), so a
`[red]` or an ANSI escape in it shows as written.
"""

from __future__ import annotations

import difflib
import re

from rich.text import Text

from loopterm.core.acp_turn import AgentPermission, AgentToolCall, AgentTurn, FileDiff, PlanItem
from loopterm.tui.widgets.render import Palette, first_line, literal, money

# kind -> glyph (one cell wide in every terminal font we know of)
KIND_GLYPHS: dict[str, str] = {
    "read": "≡", "edit": "✎", "delete": "⌫", "move": "⇄", "search": "⌕", "execute": "$", "think": "✻",
    "fetch": "⇣", "switch_mode": "⇆", "other": "•",
}
# status (tool call or plan entry) -> (glyph, palette attribute)
STATUS_GLYPHS: dict[str, tuple[str, str]] = {
    "pending": ("○", "muted"), "in_progress": ("◐", "warn"), "completed": ("✓", "ok"), "failed": ("✗", "bad"),
}
OUTCOMES: dict[str, tuple[str, str, str]] = {  # permission outcome -> (glyph, label, palette attribute)
    "allow_once": ("✓", "allowed once", "ok"), "reject_once": ("✗", "rejected", "bad"),
    "cancelled": ("■", "cancelled", "warn"),
}
DECIDERS: dict[str, str] = {
    "person": "a person", "policy": "a policy", "paths": "the paths invariant", "headless": "the headless rule",
    "stopped": "the run stopping",
}
OUTPUT_LINES = 6  # of a tool call's output (the whole output is in the record: `show`, export)
LINE_WIDTH = 160  # a shown output line, at most
BAR = 20  # cells of the context gauge
DIFF_LINES = 400  # per turn in the tab; the rest is counted
CHANGED_SHOWN = 5  # changed paths named in the diff's heading
PROMPT_LINES = 40  # of the prompt loopterm sent, at the end of the tab


def _colour(palette: Palette, attribute: str) -> str:
    return str(getattr(palette, attribute, "")) or "dim"


def _status(status: str, palette: Palette) -> tuple[str, str]:
    glyph, attribute = STATUS_GLYPHS.get(status, ("?", "muted"))
    return glyph, _colour(palette, attribute)


def _section(text: Text, title: str, palette: Palette, note: str = "") -> None:
    text.append("\n")
    text.append(title, style=f"bold {palette.accent}")
    if note:
        text.append(f"  {note}", style="dim")
    text.append("\n")


def _tokens(value: int) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,}"


def duration(turn: AgentTurn) -> str:
    if turn.started_at <= 0 or turn.ended_at < turn.started_at:
        return ""
    seconds = turn.ended_at - turn.started_at
    return f"{seconds:.1f}s" if seconds < 120 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def header(turn: AgentTurn, palette: Palette) -> Text:
    """agent · session (origin) · stop reason · who ended it (and why) · duration."""
    text = Text()
    text.append("agent ", style="dim")
    text.append(literal(first_line(turn.agent, 40), "bold"))
    text.append("  session ", style="dim")
    text.append(literal(first_line(turn.session_id, 200)[:12] or "?"))
    text.append(f" ({turn.session_origin})", style="dim")
    text.append("\n")
    reason = turn.stop_reason
    ok = reason == "end_turn" and turn.ended_by == "agent"
    text.append("stop ", style="dim")
    colour = f"bold {palette.ok if ok else palette.warn}"
    text.append(literal(first_line(reason, 40), colour) if reason else Text("no stop reason", style=f"italic {colour}"))
    text.append("  ended by ", style="dim")
    text.append(turn.ended_by, style="bold" if turn.ended_by == "agent" else f"bold {palette.warn}")
    if turn.note:
        text.append(": ")
        text.append(literal(first_line(turn.note, 120)))
    took = duration(turn)
    if took:
        text.append(f"  {took}", style="dim")
    text.append(f"  {turn.updates} update(s)", style="dim")
    text.append("\n")
    return text


def gauges(turn: AgentTurn, palette: Palette) -> Text:
    """This turn's cost and tokens and the session's running cost (the agent's own figures), context as a bar."""
    usage = turn.usage
    text = Text()
    text.append("cost    ", style="dim")
    text.append("turn ", style="dim")
    text.append(money(usage.cost_usd), style="bold")
    if usage.session_cost_usd is not None:
        text.append(" · session ", style="dim")
        text.append(money(usage.session_cost_usd), style="bold")
    text.append("  (reported by the agent)", style="italic dim")
    text.append("\n")
    text.append("tokens  ", style="dim")
    text.append(f"{_tokens(usage.tokens_in)} in · {_tokens(usage.tokens_out)} out")
    if usage.tokens_cached:
        text.append(f" · {_tokens(usage.tokens_cached)} cached")
    text.append("\n")
    text.append("context ", style="dim")
    if usage.context_used is not None and usage.context_size:
        share = max(0.0, min(1.0, usage.context_used / usage.context_size))
        filled = round(share * BAR)
        colour = palette.bad if share >= 0.9 else palette.warn if share >= 0.7 else palette.ok
        text.append("█" * filled, style=colour)
        text.append("░" * (BAR - filled), style="dim")
        text.append(f" {share:.0%}  {_tokens(usage.context_used)} / {_tokens(usage.context_size)}")
    elif usage.context_used is not None:
        text.append(f"{_tokens(usage.context_used)} used (size not reported)")
    else:
        text.append("not reported", style="dim")
    text.append("\n")
    return text


def plan_text(plan: list[PlanItem], palette: Palette) -> Text:
    text = Text()
    for item in plan:
        glyph, colour = _status(item.status, palette)
        text.append(f" {glyph} ", style=colour)
        text.append(literal(item.content, "dim strike" if item.status == "completed" else ""))
        if item.priority == "high":
            text.append("  !", style=f"bold {palette.warn}")
        text.append("\n")
    return text


def _short_output(output: str) -> Text:
    text = Text()
    lines = output.rstrip().splitlines()
    for line in lines[:OUTPUT_LINES]:
        text.append("     │ ", style="dim")
        text.append(literal(line[:LINE_WIDTH] + ("…" if len(line) > LINE_WIDTH else ""), "dim"))
        text.append("\n")
    if len(lines) > OUTPUT_LINES:
        text.append(f"     │ … {len(lines) - OUTPUT_LINES} more line(s)\n", style="dim italic")
    return text


def tool_call_text(call: AgentToolCall, palette: Palette) -> Text:
    """One call: status glyph, kind glyph and kind, title; its locations; its output, short."""
    glyph, colour = _status(call.status, palette)
    text = Text()
    text.append(f" {glyph} ", style=f"bold {colour}")
    kind = call.kind if call.kind in KIND_GLYPHS else "other"
    text.append(f"{KIND_GLYPHS[kind]} ", style=palette.accent)
    text.append(literal(first_line(call.kind, 12) or "other", "dim"))
    text.append(" ")
    text.append(literal(first_line(call.title, 200) or call.id or "(untitled)", "bold"))
    text.append(f"  {first_line(call.status, 20).replace('_', ' ')}", style=colour)
    text.append("\n")
    for path in call.locations:
        text.append("     @ ", style="dim")
        text.append(literal(first_line(path, 200)))
        text.append("\n")
    for diff in call.diffs:
        added, removed = _counts(diff)
        text.append("     ± ", style="dim")
        text.append(literal(first_line(diff.path, 200)))
        text.append(f" +{added}", style=palette.ok)
        text.append(f" -{removed}", style=palette.bad)
        if diff.old_text is None:
            text.append(" (new file)", style="dim")
        text.append("\n")
    if call.output.strip():
        text.append_text(_short_output(call.output))
    return text


def permission_text(permission: AgentPermission, palette: Palette) -> Text:
    glyph, label, attribute = OUTCOMES.get(permission.outcome, ("?", permission.outcome, "muted"))
    colour = _colour(palette, attribute)
    text = Text()
    text.append(f" {glyph} ", style=f"bold {colour}")
    text.append(literal(first_line(permission.title, 200) or permission.kind, "bold"))
    text.append(f"  {label}", style=colour)
    text.append(f" by {DECIDERS.get(permission.decided_by, permission.decided_by)}", style="bold")
    text.append("\n")
    if permission.reason:
        text.append("     why: ", style="dim")
        text.append(literal(first_line(permission.reason, 200)))
        text.append("\n")
    details = [f"kind {first_line(permission.kind, 20)}"]
    if permission.offered:
        details.append("offered " + ", ".join(first_line(o, 20) for o in permission.offered))
    if permission.key:
        details.append(f"approval {first_line(permission.key, 40)}")
    text.append("     " + " · ".join(details) + "\n", style="dim")
    for path in permission.paths:
        text.append("     @ ", style="dim")
        text.append(literal(first_line(path, 200)))
        text.append("\n")
    return text


def _counts(diff: FileDiff) -> tuple[int, int]:
    lines = _file_diff_lines(diff)
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    return added, removed


def _file_diff_lines(diff: FileDiff) -> list[str]:
    old = (diff.old_text or "").splitlines()
    new = diff.new_text.splitlines()
    before = "/dev/null" if diff.old_text is None else f"a/{diff.path}"
    return list(difflib.unified_diff(old, new, before, f"b/{diff.path}", lineterm="", n=3))


GIT_DETAILS = ("index ", "new file", "deleted file", "similarity", "rename ", "old mode", "new mode", "\\")
_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def unified_diff_text(diff: str, palette: Palette, limit: int = DIFF_LINES) -> Text:
    """Unified diff text (git's or difflib's), +/- coloured, file headers bold, a blank line between files; at most
    `limit` lines shown. A hunk's lines are told apart by the hunk's counts, so a removed "-- x" is not a header."""
    text = Text()
    lines = diff.splitlines()
    old_left = new_left = 0  # lines of the current hunk still to come
    files = 0
    in_git_header = False  # between "diff --git" and its "--- ": the same file
    for line in lines[:limit]:
        style = ""
        if old_left > 0 or new_left > 0:
            if line.startswith("+"):
                style, new_left = palette.ok, new_left - 1
            elif line.startswith("-"):
                style, old_left = palette.bad, old_left - 1
            elif line.startswith("\\"):
                style = "dim"  # \ No newline at end of file
            else:
                old_left, new_left = old_left - 1, new_left - 1
        elif (hunk := _HUNK.match(line)) is not None:
            style = palette.accent
            old_left = int(hunk.group(1)) if hunk.group(1) is not None else 1
            new_left = int(hunk.group(2)) if hunk.group(2) is not None else 1
        elif line.startswith("diff --git") or (line.startswith("--- ") and not in_git_header):
            files += 1
            if files > 1:
                text.append("\n")
            in_git_header = line.startswith("diff --git")
            style = "bold"
        elif line.startswith(("+++ ", "--- ")):
            in_git_header = False
            style = "bold"
        elif line.startswith(GIT_DETAILS):
            style = "dim"
        text.append(literal(line, style))
        text.append("\n")
    if len(lines) > limit:
        text.append(f"… {len(lines) - limit} more diff line(s) not shown here\n", style="dim italic")
    return text


def turn_diff(turn: AgentTurn) -> tuple[str, str]:
    """(unified diff, where it comes from): the worktree's git diff when the turn has one, else the tool calls'."""
    if turn.diff.strip():
        return turn.diff, "git diff of the worktree"
    parts = ["\n".join(_file_diff_lines(diff)) for call in turn.tool_calls for diff in call.diffs]
    return "\n".join(p for p in parts if p), "from the agent's tool calls"


def agent_turn_text(turn: AgentTurn, palette: Palette) -> Text:
    """The whole Agent tab for one turn."""
    text = header(turn, palette)
    text.append_text(gauges(turn, palette))
    if turn.plan:
        done = sum(1 for item in turn.plan if item.status == "completed")
        _section(text, "plan", palette, f"{done}/{len(turn.plan)} done")
        text.append_text(plan_text(turn.plan, palette))
    _section(text, "tool calls", palette, str(len(turn.tool_calls)))
    if not turn.tool_calls:
        text.append(" none\n", style="dim")
    for call in turn.tool_calls:
        text.append_text(tool_call_text(call, palette))
    if turn.permissions:
        _section(text, "permissions asked", palette, "loopterm answers allow once at most")
        for permission in turn.permissions:
            text.append_text(permission_text(permission, palette))
    if turn.writes or turn.refused_paths:
        _section(text, "client file access", palette)
        for path in turn.writes:
            text.append(" ✎ wrote ", style=palette.accent)
            text.append(literal(first_line(path, 200)))
            text.append("\n")
        for path in turn.refused_paths:
            text.append(" ✗ refused ", style=f"bold {palette.bad}")
            text.append(literal(first_line(path, 200)))
            text.append("  (outside the worktree)\n", style="dim")
    diff, origin = turn_diff(turn)
    files = ", ".join(first_line(p, 60) for p in turn.changed_paths[:CHANGED_SHOWN])
    if len(turn.changed_paths) > CHANGED_SHOWN:
        files += f" and {len(turn.changed_paths) - CHANGED_SHOWN} more"
    _section(text, "diff", palette, origin + (f"; changed: {files}" if files else ""))
    if diff:
        text.append_text(unified_diff_text(diff, palette))
    else:
        text.append(" no change\n", style="dim")
    if turn.message.strip():
        _section(text, "reply", palette)
        text.append(literal(turn.message.strip()))
        text.append("\n")
    if turn.thoughts.strip():
        _section(text, "thoughts", palette)
        text.append(literal(turn.thoughts.strip(), "italic dim"))
        text.append("\n")
    if turn.prompt.strip():
        lines = turn.prompt.strip().splitlines()
        _section(text, "prompt", palette, "what loopterm sent the agent")
        text.append(literal("\n".join(lines[:PROMPT_LINES]), "dim"))
        text.append("\n")
        if len(lines) > PROMPT_LINES:
            text.append(f"… {len(lines) - PROMPT_LINES} more line(s)\n", style="dim italic")
    if turn.commit or turn.base_commit:
        before, after = first_line(turn.base_commit or "?", 200)[:10], first_line(turn.commit or "none", 200)[:10]
        text.append(f"\nworktree commit {before} → {after}\n", style="dim")
    return text


def live_turn_line(n: int, turn: AgentTurn, palette: Palette) -> Text:
    """The header's one line while an agent's turn streams: what it is doing now."""
    text = Text(f"▸ agent, iteration {n}: ", style=f"bold {palette.accent}")
    current = turn.tool_calls[-1] if turn.tool_calls else None
    if current is not None:
        glyph = KIND_GLYPHS.get(current.kind, KIND_GLYPHS["other"])
        text.append(literal(f"{glyph} {first_line(current.title or current.kind, 50)} ({current.status})"))
    elif turn.plan:
        doing = next((p for p in turn.plan if p.status == "in_progress"), turn.plan[0])
        text.append(literal(first_line(doing.content, 60)))
    else:
        text.append("thinking", style="italic")
    done = sum(1 for p in turn.plan if p.status == "completed")
    plan = f" · plan {done}/{len(turn.plan)}" if turn.plan else ""
    text.append(f"   {len(turn.tool_calls)} calls{plan} · ${turn.usage.cost_usd:.4f} reported", style="dim")
    return text
