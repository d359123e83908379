"""Turning records into text for the screen. No widgets here: pure functions.

Everything a model, a tool, a gate or a person's state edit produced is
untrusted: it becomes a `rich.text.Text` built with `Text(...)` (never markup),
and control characters (ANSI escapes included) are shown as visible `\\x1b`
escapes, so a reply containing `[bold red]` or `\\x1b[31m` shows exactly that
and never restyles the screen. Secrets are redacted there too (core/secrets.py). Status is always
a glyph plus a colour.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from rich.text import Text

from loopterm.core.agent_loop import AGENT_TOOL
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.secrets import redact
from loopterm.core.prompt_cache import hit_text
from loopterm.core.text import clip
from loopterm.core.text import first_line as text_first_line
from loopterm.core.compare import changed_parts

# Shown as escapes, never sent to the terminal: control characters (ANSI escapes, C1 controls), unpaired
# surrogates (not Unicode: a terminal write would fail on them) and the bidirectional embedding, override
# and isolate controls (they reorder what is shown: "Trojan source").
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")

PASS_GLYPH, FAIL_GLYPH, RELAXED_GLYPH = "✓", "✗", "~"

# status -> (glyph, theme variable, fallback colour); themes.STATUS_GLYPHS wins when present.
_FALLBACK_STATUS: dict[str, tuple[str, str, str]] = {
    "created": ("·", "foreground-muted", "grey50"),
    "running": ("▶", "accent", "cyan"),
    "stepping": ("⏯", "accent", "cyan"),
    "paused": ("⏸", "warning", "yellow"),
    "escalated": ("⚑", "warning", "yellow"),
    "converged": ("✓", "success", "green"),
    "terminated": ("■", "secondary", "magenta"),
    "stopped": ("■", "warning", "yellow"),
    "failed": ("✗", "error", "red"),
    "starting": ("…", "accent", "cyan"),
}
_FALLBACK_COLOURS = {"success": "green", "error": "red", "warning": "yellow", "accent": "cyan",
                     "secondary": "magenta", "foreground-muted": "grey50", "primary": "blue"}


def clean(value: object) -> str:
    """Untrusted text made safe to show: tabs expanded, control characters as visible escapes."""
    text = str(value).replace("\r\n", "\n").replace("\t", "    ")
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def literal(value: object, style: str = "") -> Text:
    """Untrusted text as a Text shown exactly as written (no markup, no escapes interpreted), secrets
    redacted (belt and braces: what the engine stores is redacted already)."""
    return Text(clean(redact(str(value))), style=style)


def first_line(value: object, width: int = 60) -> str:
    """The first line of untrusted text, safe to show (clean, redacted), cut to ``width``."""
    return clip(text_first_line(clean(redact(str(value)))), width)


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@dataclass
class Palette:
    """Colours from the current theme's variables (glyphs carry the meaning; colour only helps)."""

    ok: str = "green"
    bad: str = "red"
    warn: str = "yellow"
    accent: str = "cyan"
    muted: str = "dim"
    variables: dict[str, str] = field(default_factory=dict)
    resolver: Callable[[str], str | None] | None = None  # loopterm.themes.theme_color for the current theme

    @classmethod
    def from_app(cls, app: Any) -> "Palette":
        try:
            from loopterm.themes import theme_color
        except ImportError:
            return cls.from_variables(app.get_css_variables())
        return cls.from_variables(app.get_css_variables(), resolver=lambda variable: theme_color(app, variable))

    @classmethod
    def from_variables(cls, variables: dict[str, str],
                       resolver: Callable[[str], str | None] | None = None) -> "Palette":
        palette = cls(variables=dict(variables), resolver=resolver)
        palette.ok = palette.colour("success", "green")
        palette.bad = palette.colour("error", "red")
        palette.warn = palette.colour("warning", "yellow")
        palette.accent = palette.colour("accent", "cyan")
        palette.muted = "dim"  # the theme's muted foreground is its foreground with alpha: dim says the same
        return palette

    def colour(self, variable: str, fallback: str = "") -> str:
        """A theme variable ($success, ...) as a rich colour (alpha dropped); the fallback if unusable."""
        name = variable.lstrip("$")
        if self.resolver is not None:
            try:
                resolved = self.resolver(name)
            except Exception:
                resolved = None
            if resolved:
                return resolved
        value = self.variables.get(name)
        if value:
            try:
                from textual.color import Color

                return Color.parse(value).hex6
            except Exception:
                pass
        return _FALLBACK_COLOURS.get(name, fallback or "white")


def _themes_table() -> dict[str, tuple[str, str]] | None:
    try:
        from loopterm.themes import STATUS_GLYPHS
    except ImportError:
        return None
    return STATUS_GLYPHS


def status_glyph(status: str) -> tuple[str, str, str]:
    """(glyph, theme variable, fallback colour) for a run status (loopterm.themes.STATUS_GLYPHS when present)."""
    table = _themes_table()
    if table and status in table:
        glyph, variable = table[status][:2]
        fallback = _FALLBACK_STATUS.get(status, ("?", "", "white"))[2]
        return str(glyph), str(variable), fallback
    return _FALLBACK_STATUS.get(status, ("?", "foreground", "white"))


def mark(kind: str, palette: "Palette") -> tuple[str, str]:
    """(glyph, colour) for gate_pass / gate_fail / invariant_ok / invariant_violated / invariant_relaxed."""
    fallback = {"gate_pass": (PASS_GLYPH, "success"), "gate_fail": (FAIL_GLYPH, "error"),
                "invariant_ok": (PASS_GLYPH, "success"), "invariant_violated": (FAIL_GLYPH, "error"),
                "invariant_relaxed": (RELAXED_GLYPH, "warning")}[kind]
    table = _themes_table() or {}
    glyph, variable = table.get(kind, fallback)[:2]
    return str(glyph), palette.colour(str(variable), _FALLBACK_COLOURS.get(fallback[1], "white"))


def status_text(status: str, palette: Palette, label: str | None = None) -> Text:
    glyph, variable, fallback = status_glyph(status)
    return Text(f"{glyph} {label or status.replace('_', ' ')}", style=f"bold {palette.colour(variable, fallback)}")


# ---------------------------------------------------------------------- timeline rows


@dataclass(slots=True)
class RowInfo:
    """What the timeline keeps per iteration: a summary, never the whole record."""

    n: int
    holder: str  # the run that made it (a branch shows its ancestors' iterations too)
    action: str
    subgoal: str
    confidence: float | None
    gates: tuple[tuple[str, bool], ...]
    invariants: tuple[tuple[str, bool], ...]
    tokens: int
    cost: float
    latency_ms: float
    repairs: int
    approval: str | None
    haystack: str  # lower-cased reasoning, subgoal and action, for search


def action_label(record: IterationRecord, width: int = 40) -> str:
    call = record.tool_call
    if not call:
        return "(no action)"
    if call.get("tool") == AGENT_TOOL:  # a coding agent's turn: how it ended, not the prompt loopterm wrote
        result = record.tool_result or {}
        said = result.get("output") or str(result.get("error") or "").removeprefix("AgentTurnFailed: ")
        return f"agent: {first_line(said, width)}" if said else "agent"
    args = call.get("args") or {}
    first = next(iter(args.values()), "") if args else ""
    shown = first_line(first, width) if first != "" else ""
    return f"{clean(call.get('tool', '?'))}({shown})"


def summarize(record: IterationRecord) -> RowInfo:
    decision = record.decision or {}
    reasoning = str(decision.get("reasoning", ""))
    subgoal = str(decision.get("subgoal", ""))
    action = action_label(record)
    confidence = decision.get("confidence")
    return RowInfo(
        n=record.n,
        holder=record.run_id,
        action=action,
        subgoal=subgoal,
        confidence=float(confidence) if isinstance(confidence, (int, float)) else None,
        gates=tuple((str(g.get("name", "?")), bool(g.get("passed"))) for g in record.gate_results),
        invariants=tuple((str(k), bool(v)) for k, v in record.invariant_status.items()),
        tokens=record.tokens_in + record.tokens_out,
        cost=record.cost_usd,
        latency_ms=record.latency_ms,
        repairs=record.repairs,
        approval=(record.tool_call or {}).get("approval"),
        haystack=f"{reasoning}\n{subgoal}\n{action}".lower(),
    )


def glyphs(items: Iterable[tuple[str, bool]], palette: Palette, names: bool) -> Text:
    """Gate results (with names) or invariant status (glyphs only); glyph plus colour, never colour alone."""
    text = Text()
    kinds = ("gate_pass", "gate_fail") if names else ("invariant_ok", "invariant_violated")
    for name, ok in items:
        glyph, colour = mark(kinds[0] if ok else kinds[1], palette)
        text.append(f"{glyph}{clean(name) if names else ''}{' ' if names else ''}", style=colour)
    text.rstrip()
    return text if text.plain else Text("-", style=palette.muted)


SUBGOAL_SHOWN = 80  # characters of a subgoal in its timeline row
# The subgoal comes last: it is the one column that may be cut on a narrow terminal.
TIMELINE_COLUMNS = [("n", 5), ("action", 24), ("conf", 4), ("gates", 18), ("inv", 5), ("tokens", 7), ("ms", 6),
                    ("subgoal", 48)]


def row_cells(info: RowInfo, palette: Palette, inherited: bool) -> list[Text]:
    dim = f"{palette.muted}" if inherited else ""
    n = Text(f"{'↑' if inherited else ''}{info.n}", style=dim, justify="right")
    action = literal(info.action, dim)
    if info.approval:
        action.append(f" [{clean(info.approval)}]", style=palette.warn)
    confidence = Text("-" if info.confidence is None else f"{info.confidence:.2f}", justify="right", style=dim)
    return [
        n,
        action,
        confidence,
        glyphs(info.gates, palette, names=True),
        glyphs(info.invariants, palette, names=False),
        Text(f"{info.tokens:,}", justify="right", style=dim),
        Text(f"{info.latency_ms:.0f}", justify="right", style=dim),
        literal(first_line(info.subgoal, SUBGOAL_SHOWN), f"italic {dim}".strip()),
    ]


# ---------------------------------------------------------------------- header


def money(value: float) -> str:
    return f"${value:.6f}" if value < 0.01 else f"${value:.4f}"


def header_text(
    run: RunRecord | None,
    palette: Palette,
    *,
    status: str | None = None,
    owned: bool = False,
    note: Text | None = None,
    inbox: int = 0,
    shadow: bool = False,
) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    if run is None:
        text.append("loopterm", style="bold")
        text.append("  no run selected: start one with `loopterm run LOOP`, or pick one on the left", style=palette.muted)
        return text
    status = status or run.status
    # Most important first: a narrow terminal cuts each line's end (app.tcss), so the status always shows.
    text.append_text(status_text(status, palette))
    if shadow:  # glyph and words, not colour alone: nothing this run proposes is executed (core/shadow.py)
        text.append("  ◐ SHADOW", style=f"bold reverse {palette.warn}")
    text.append("  ")
    text.append(literal(run.loop, "bold"))
    text.append("  run ")
    text.append(run.id, style="bold")
    if inbox:
        text.append(f"  ⚑ {inbox} waiting (x)", style=f"bold {palette.warn}")
    if owned:
        text.append("  ● in this window", style=palette.accent)
    if run.parent_run and run.origin == "child":
        text.append(f"  called by {run.parent_run[:8]}", style=palette.muted)
    elif run.parent_run:
        text.append(f"  branch of {run.parent_run[:8]} @{run.fork_iteration}", style=palette.muted)
    text.append("  ")
    text.append(literal(run.model, palette.accent))
    text.append("\n")
    budget = run.budget or {}
    text.append(f"iteration {run.iterations}/{run.max_iterations}")
    tokens = run.tokens_in + run.tokens_out
    text.append(f"  tokens {tokens:,}")
    if budget.get("tokens") is not None:
        text.append(f"/{int(budget['tokens']):,}")
        if tokens > 0.8 * budget["tokens"]:
            text.append(" !", style=f"bold {palette.warn}")
    if run.tokens_cached:  # the share of input tokens the provider's prompt cache served (priced lower)
        text.append(f"  cache {hit_text(run.tokens_cached, run.tokens_in)}")
    text.append(f"  cost {money(run.cost_usd)}")
    if budget.get("usd") is not None:
        text.append(f"/${budget['usd']}")
        if run.cost_usd > 0.8 * float(budget["usd"]):
            text.append(" !", style=f"bold {palette.warn}")
    text.append(f"  {run.elapsed_s:.1f}s")
    if run.message:
        text.append("  ")
        text.append(literal(first_line(run.message, 160), palette.muted))
    if note is not None:
        text.append("\n")
        text.append_text(note)
    return text


# ---------------------------------------------------------------------- detail tabs


def reasoning_text(record: IterationRecord) -> Text:
    decision = record.decision or {}
    text = Text()
    text.append("subgoal  ", style="bold")
    text.append(literal(decision.get("subgoal", "-")))
    text.append("\nconfidence  ", style="bold")
    text.append(str(decision.get("confidence", "-")))
    if decision.get("done"):
        text.append("  (the model says it is done: only the gates decide)", style="italic")
    text.append("\n\n")
    text.append(literal(decision.get("reasoning", "") or "(no reasoning recorded)"))
    if record.remediations:
        text.append("\n\nremediations applied: ", style="bold")
        text.append(literal(", ".join(record.remediations)))
    return text


def prompt_text(record: IterationRecord) -> Text:
    text = Text()
    for message in record.prompt:
        text.append(f"── {clean(message.get('role', '?'))} ──\n", style="bold")
        content = message.get("content") or ""
        if not isinstance(content, str):
            content = pretty(content)
        text.append(literal(content))
        calls = message.get("tool_calls")  # a tools-mode repair: the reply's calls, each answered by a `tool` message
        if calls:
            text.append(("\n" if content else "") + "tool calls\n", style="italic")
            text.append(literal(pretty(calls)))
        text.append("\n\n")
    return text if text.plain else Text("(no prompt recorded)")


MODE_SHOWN = {"tools": "the provider's tool call", "json_schema": "schema-constrained JSON", "text": "JSON text"}


def response_text(record: IterationRecord) -> Text:
    text = Text()
    text.append("raw reply", style="bold")
    text.append(f"  as {MODE_SHOWN.get(record.decision_mode, clean(record.decision_mode))}", style="dim")
    if record.repairs:
        text.append(f"  (after {record.repairs} repair attempt(s))", style="italic")
    cached = f" ({record.tokens_cached:,} cached, {hit_text(record.tokens_cached, record.tokens_in)})" if record.tokens_cached else ""
    text.append(f"  {clean(record.model)}  {record.tokens_in:,} in{cached} / {record.tokens_out:,} out  "
                f"{money(record.cost_usd)}  {record.latency_ms:.0f} ms\n", style="dim")
    text.append(literal(record.raw_response or "(empty)"))
    if record.decision is not None:
        text.append("\n\nparsed decision\n", style="bold")
        text.append(literal(pretty(record.decision)))
    return text


def tool_text(record: IterationRecord) -> Text:
    call = record.tool_call
    if not call:
        return Text("no tool was called in this iteration")
    text = Text()
    text.append("call  ", style="bold")
    text.append(literal(call.get("tool", "?")))
    if call.get("policy"):  # answered by an approval policy a person made (core/approval_policy.py)
        verb = "approved" if call.get("approval") == "approve" else "denied"
        text.append(f"  ({verb} by policy {clean(call['policy'])})", style="italic")
    elif call.get("approval"):
        text.append(f"  ({clean(call['approval'])} by a person)", style="italic")
    text.append("\n")
    text.append(literal(pretty(call.get("args") or {})))
    result = record.tool_result or {}
    text.append("\n\nresult  ", style="bold")
    if result:
        text.append("✓ ok" if result.get("ok") else "✗ error", style="bold")
        if result.get("reused"):
            text.append("  (answered from the journal)", style="italic")
        if result.get("error"):
            text.append("\n")
            text.append(literal(result["error"]))
        text.append("\n")
        text.append(literal(result.get("output", "")))
    else:
        text.append("(none)")
    return text


def gates_detail(record: IterationRecord, palette: Palette) -> Text:
    if not record.gate_results:
        return Text("no gate ran in this iteration")
    text = Text()
    for gate in record.gate_results:
        ok = bool(gate.get("passed"))
        glyph, colour = mark("gate_pass" if ok else "gate_fail", palette)
        text.append(f"{glyph} ", style=colour)
        text.append(literal(gate.get("name", "?"), "bold"))
        details = [f"exit {gate['exit_code']}" if gate.get("exit_code") is not None else "",
                   f"{gate['duration_s']:.2f}s" if isinstance(gate.get("duration_s"), (int, float)) else ""]
        if gate.get("model"):  # a model checker: who answered, and what it cost
            details += [clean(gate["model"]), f"{int(gate.get('tokens_in') or 0) + int(gate.get('tokens_out') or 0):,} tok",
                        f"${float(gate.get('cost_usd') or 0):.6f}"]
        shown = ", ".join(d for d in details if d)
        if shown:
            text.append(f"  ({shown})", style="dim")
        for stream in ("stderr", "stdout", "error"):
            body = gate.get(stream)
            if body:
                text.append(f"\n  {stream}:\n", style="dim")
                text.append(literal(str(body).rstrip()))
        text.append("\n\n")
    return text


_changed_parts = changed_parts  # the name tests/test_render.py knows (the Diff tab and compare share core's)


def state_diff(before: dict[str, Any] | None, after: dict[str, Any], palette: Palette) -> Text:
    return diff_text(*changed_parts(before if before is not None else {}, after), palette)


def diff_text(changed_old: dict[str, Any], changed_new: dict[str, Any], palette: Palette) -> Text:
    """The unified diff of what `changed_parts` found (small, whatever the size of the states)."""
    old = pretty(changed_old).splitlines()
    new = pretty(changed_new).splitlines()
    lines = list(difflib.unified_diff(old, new, "before", "after", lineterm="", n=2))
    if not lines:
        return Text("no change to the state", style="italic")
    text = Text()
    for line in lines:
        style = ""
        if line.startswith("+") and not line.startswith("+++"):
            style = palette.ok
        elif line.startswith("-") and not line.startswith("---"):
            style = palette.bad
        elif line.startswith("@@"):
            style = palette.accent
        text.append(literal(line, style))
        text.append("\n")
    return text


MAX_CHILDREN = 200  # entries shown per JSON container in the state tree; the rest is counted
MAX_NODES = 4000  # entries kept for the state tree in all: one iteration's state stays small on the heap


@dataclass(slots=True)
class Shown:
    """A non-empty JSON container as the state tree shows it: its first entries (each a `Shown` when it is
    itself a non-empty container, else the value) and how many it has. The state tree is drawn from this,
    so the detail pane never holds a long run's whole state (tens of thousands of objects)."""

    is_dict: bool
    total: int
    items: list[tuple[str, Any]]


def shown_state(value: Any, per_container: int = MAX_CHILDREN, budget: int = MAX_NODES) -> Any:
    """`value` cut to what the state tree shows: per_container entries per container, `budget` in all,
    breadth first (the top-level fields are always there; deep corners of a huge state are counted)."""
    if not isinstance(value, (dict, list)) or not value:
        return value
    root = Shown(isinstance(value, dict), len(value), [])
    queue: deque[tuple[Any, Shown]] = deque([(value, root)])
    left = budget
    while queue:
        node, shown = queue.popleft()
        pairs = ((str(k), v) for k, v in node.items()) if isinstance(node, dict) else \
            ((f"[{i}]", v) for i, v in enumerate(node))
        for key, child in pairs:
            if len(shown.items) >= per_container or left <= 0:
                break
            left -= 1
            if isinstance(child, (dict, list)) and child:
                inner = Shown(isinstance(child, dict), len(child), [])
                queue.append((child, inner))
                shown.items.append((key, inner))
            else:
                shown.items.append((key, child))
    return root


@dataclass
class InvariantInfo:
    name: str
    description: str = ""
    remediation: str = ""


def invariants_detail(record: IterationRecord, invariants: list[InvariantInfo], relaxed: dict[str, str],
                      palette: Palette) -> Text:
    known = {i.name: i for i in invariants}
    names = list(known) + [n for n in record.invariant_status if n not in known]
    if not names:
        return Text("this loop declares no invariants")
    text = Text()
    for name in names:
        ok = record.invariant_status.get(name)
        if ok is None:
            text.append("· ", style=palette.muted)
        else:
            kind = "invariant_ok" if ok else "invariant_relaxed" if name in relaxed else "invariant_violated"
            glyph, colour = mark(kind, palette)
            text.append(f"{glyph} ", style=colour)
        text.append(literal(name, "bold"))
        text.append("  " + ("holds" if ok else "not checked" if ok is None else "violated"))
        info = known.get(name)
        if info and info.remediation:
            text.append(f"  remediation: {clean(info.remediation)}", style="dim")
        if name in relaxed:
            text.append("  relaxed: ", style=f"bold {palette.warn}")
            text.append(literal(relaxed[name] or "-"))
        if info and info.description:
            text.append("\n    ")
            text.append(literal(info.description, "italic"))
        text.append("\n")
    if record.remediations:
        text.append("\nremediations applied this iteration: ", style="bold")
        text.append(literal(", ".join(record.remediations)))
    return text
