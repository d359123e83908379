"""Headless progress: one line per committed iteration, a live status while one is in flight.

Everything the model wrote is rendered as plain `Text` (markup off), its control
characters as visible escapes (render.clean): model output is untrusted. Secrets are redacted before anything is printed (belt and
braces: what the engine stores and emits is redacted already). Status is always
a glyph plus a colour.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.status import Status as Spinner
from rich.table import Table
from rich.text import Text

from loopterm.core.events import (
    EngineEvent,
    Escalated,
    IterationCommitted,
    IterationStarted,
    ModelRetry,
    RunFinished,
    RunStarted,
    StatusChanged,
    ApprovalNeeded,
)
from loopterm.core.agent_loop import PERMISSION_TOOL
from loopterm.core.control import Deny, command_payload
from loopterm.core.prompt_cache import hit_text
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.secrets import redact
from loopterm.tui.widgets.render import action_label  # noqa: F401 - `show` lists actions as `watch` does
from loopterm.tui.widgets.render import clean, first_line

DIFF_LINES = 12  # of an agent's permission request, printed under it
PASS, FAIL, WAIT = ("✓", "green"), ("✗", "red"), ("⏸", "yellow")
STATUS_STYLE = {
    "converged": ("✓", "green"),
    "running": ("▶", "cyan"),
    "created": ("·", "dim"),
    "escalated": ("⏸", "yellow"),
    "stopped": ("■", "yellow"),
    "terminated": ("■", "magenta"),
    "failed": ("✗", "red"),
    "paused": ("⏸", "yellow"),
    "stepping": ("⏯", "cyan"),
}


def status_text(status: str) -> Text:
    glyph, style = STATUS_STYLE.get(status, ("?", "white"))
    return Text(f"{glyph} {clean(status)}", style=style)


def gates_text(record: IterationRecord) -> Text:
    text = Text()
    for g in record.gate_results:
        glyph, style = PASS if g["passed"] else FAIL
        text.append(f"{glyph} {clean(g['name'])} ", style=style)
    return text or Text("-", style="dim")


def invariants_text(record: IterationRecord) -> Text:
    text = Text()
    for name, ok in record.invariant_status.items():
        glyph, style = PASS if ok else FAIL
        text.append(glyph, style=style)
    return text or Text("-", style="dim")


class HeadlessProgress:
    """An engine subscriber that draws progress on a rich console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.spinner: Spinner | None = None
        self.max_iterations = 0

    def __call__(self, event: EngineEvent) -> None:
        if isinstance(event, RunStarted):
            self.max_iterations = event.max_iterations
            head = Text.assemble(("loopterm ", "bold"), (clean(event.loop), "bold cyan"), f"  run {event.run_id}  model ",
                                 (clean(event.model), "cyan"), f"  up to {event.max_iterations} iterations")
            if event.resumed_from:
                head.append(f"  (resumed after iteration {event.resumed_from})", style="yellow")
            self.console.print(head)
        elif isinstance(event, IterationStarted):
            self._spin(f"iteration {event.n}/{self.max_iterations}: deciding, acting, verifying ...")
        elif isinstance(event, ModelRetry):
            self.console.print(Text(f"    ↻ model call failed ({clean(redact(event.error)[:120])}); retry {event.attempt} in {event.delay_s:.1f}s",
                                    style="yellow"))
        elif isinstance(event, IterationCommitted):
            self._stop_spin()
            self.console.print(self._row(event.record))
        elif isinstance(event, Escalated):
            self._stop_spin()
            failing = ", ".join(clean(i["name"]) for i in event.packet.get("failing_invariants", [])) or "-"
            self.console.print(Text(f"  ⏸ escalated at iteration {event.n}: {clean(redact(str(event.packet['summary'])))} (failing: {failing})",
                                    style="yellow"))
        elif isinstance(event, StatusChanged):
            self._stop_spin()
            line = status_text(event.status)
            if event.message:
                line.append(f"  {clean(redact(event.message))}")
            if event.status == "escalated":
                line.append(f"  (answer from `loopterm watch {event.run_id}`)", style="dim")
            self.console.print(Text("  ").append_text(line))
        elif isinstance(event, ApprovalNeeded):
            self._stop_spin()
            if event.tool == PERMISSION_TOOL:
                self._agent_asks(event)
                return
            asks = "is proposed (shadow: nothing will run)" if event.shadow else "needs approval"
            self.console.print(Text(f"  ? tool {clean(event.tool)} {asks} (iteration {event.n}); args: "
                                    f"{redact(json.dumps(event.args))[:100]}", style="yellow"))
        elif isinstance(event, RunFinished):
            self._stop_spin()

    def _agent_asks(self, event: ApprovalNeeded) -> None:
        """A coding agent's permission request: what it wants to do, where, and the first lines of its diff."""
        args = event.args
        paths = ", ".join(clean(str(p)) for p in args.get("paths") or []) or "no path named"
        self.console.print(Text(f"  ? the agent asks (iteration {event.n}): {first_line(args.get('title', ''), 60)} "
                                f"[{clean(str(args.get('kind', '')))}: {paths}]", style="yellow"))
        lines = redact(str(args.get("diff") or "")).splitlines()
        for line in lines[:DIFF_LINES]:
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
            self.console.print(Text(f"      {clean(line)[:100]}", style=style))
        if len(lines) > DIFF_LINES:
            self.console.print(Text(f"      … {len(lines) - DIFF_LINES} more lines of diff", style="dim"))

    def _row(self, r: IterationRecord) -> Text:
        """Two lines that fit 80 columns: what was done and verified; why, and what it cost."""
        decision = r.decision or {}
        row = Text(f"  {r.n:>3}  ")
        row.append(f"{action_label(r):<26.26} ")
        row.append_text(gates_text(r))
        row.append(" inv ", style="dim")
        row.append_text(invariants_text(r))
        row.append(f"  conf {float(decision.get('confidence', 0)):.2f}", style="dim")
        if r.repairs:
            row.append(f"  {r.repairs} repair", style="yellow")
        row.append("\n       ")
        subgoal = clean(redact(str(decision.get("subgoal", "")))) or "-"
        row.append(Text(subgoal[:38] + ("…" if len(subgoal) > 38 else ""), style="italic"))  # untrusted: plain Text, never markup
        row.append(f" · {r.tokens_in + r.tokens_out:,} tok · ${r.cost_usd:.6f} · {r.latency_ms:.0f} ms", style="dim")
        row.no_wrap = True
        row.overflow = "ellipsis"
        return row

    def _spin(self, message: str) -> None:
        if not self.console.is_terminal:
            return
        if self.spinner is None:
            self.spinner = self.console.status(message)
            self.spinner.start()
        else:
            self.spinner.update(message)

    def _stop_spin(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None


class ApprovalTimeout:
    """`loopterm run --headless --approval-timeout S`: a tool call no one answered within S seconds is denied,
    through the control channel like a person's denial (recorded with the reason "no answer within S s"); the
    run goes on as after any denial. An answer given in time (from `watch`, `answer`) wins: the late denial is
    refused by the engine as answering nothing."""

    def __init__(self, engine: Any, store: Any, seconds: float) -> None:
        self.engine = engine
        self.store = store
        self.seconds = seconds
        self._timers: set[asyncio.Task[None]] = set()

    def __call__(self, event: EngineEvent) -> None:
        if isinstance(event, ApprovalNeeded):
            timer = asyncio.get_running_loop().create_task(self._deny_later(event.key))
            self._timers.add(timer)
            timer.add_done_callback(self._timers.discard)
        elif isinstance(event, RunFinished):
            for timer in list(self._timers):
                timer.cancel()

    async def _deny_later(self, key: str) -> None:
        await asyncio.sleep(self.seconds)
        if key not in self.engine.view.approvals:
            return  # answered meanwhile
        reason = f"no answer within {self.seconds:g} s"
        self.store.add_command(self.engine.run_id, *command_payload(Deny(key=key, reason=reason)))
        self.engine.wake()


def summary(run: RunRecord) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_row("status", status_text(run.status))
    table.add_row("reason", Text(clean(redact(run.message or run.termination_reason or "-"))))
    table.add_row("iterations", f"{run.iterations} of {run.max_iterations}")
    budget = run.budget or {}
    tokens = f"{run.tokens_in + run.tokens_out:,} ({run.tokens_in:,} in, {run.tokens_out:,} out)"
    if budget.get("tokens") is not None:
        tokens += f" of {budget['tokens']:,}"
    cost = f"${run.cost_usd:.6f}" + (f" of ${budget['usd']}" if budget.get("usd") is not None else "")
    table.add_row("tokens", tokens)
    if run.tokens_cached:  # served by the provider's prompt cache, priced at its rate in the cost
        table.add_row("cached", f"{run.tokens_cached:,} of the {run.tokens_in:,} in "
                                f"({hit_text(run.tokens_cached, run.tokens_in)}, from the provider's prompt cache)")
    table.add_row("cost", cost)
    table.add_row("time", f"{run.elapsed_s:.1f}s")
    table.add_row("workspace", Text(clean(run.workspace)))
    return Panel(table, title=Text(f"run {clean(run.id)} · {clean(run.loop)}"), expand=False)  # a title string is markup


def as_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
