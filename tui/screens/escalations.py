"""People in the loop: the inbox of runs waiting on a person, and one escalation's packet with its answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Sparkline, Static

from loopterm.core.agent_loop import PERMISSION_TOOL
from loopterm.core.fold import Pending, PendingApproval, PendingEscalation, PendingSideEffect, RunView
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.runlog import Escalated
from loopterm.tui.widgets.keyhints import KeyHints
from loopterm.tui.widgets.agent_turn import unified_diff_text
from loopterm.tui.widgets.render import Palette, first_line, literal, pretty, status_text

if TYPE_CHECKING:
    from loopterm.tui.app import LooptermApp


@dataclass
class Waiting:
    """A run waiting on a person (its log's fold says so, whatever its status): an escalation, tool calls
    waiting for approval, a side effect it may repeat. A snapshot: it does not change as the log grows.

    `now` is what the run waits on now (the last thing asked): an older question can stay unanswered beside it
    (an escalation answered by no one, an approval the model did not ask again after a restart)."""

    run: RunRecord
    escalation: PendingEscalation | None = None
    approvals: list[PendingApproval] = field(default_factory=list)
    side_effect: PendingSideEffect | None = None
    executing: bool = False  # an engine (here or in another process) is waiting for the answer
    now: Pending | None = None

    @classmethod
    def of(cls, run: RunRecord, log: RunView, executing: bool) -> "Waiting":
        return cls(run, log.escalation, list(log.approvals.values()), log.side_effect, executing, log.waiting_now)

    @property
    def packet(self) -> Escalated | None:
        """The pending escalation's packet."""
        return self.escalation.packet if self.escalation is not None else None

    @property
    def waiting(self) -> bool:
        return self.now is not None

    @property
    def pending(self) -> list[Pending]:
        """Everything unanswered: what it waits on now and anything older."""
        return [p for p in (self.escalation, *self.approvals, self.side_effect) if p is not None]

    @property
    def pending_ids(self) -> frozenset[int]:
        return frozenset(p.event_id for p in self.pending)

    @property
    def what(self) -> str:
        now = self.now
        if isinstance(now, PendingApproval):
            return "shadow" if now.asked.shadow else "approval"
        if isinstance(now, PendingSideEffect):
            return "side effect"
        return "escalation" if now is not None else "waiting"

    @property
    def at(self) -> int:
        """The iteration it waits at: that of what it waits on now."""
        return self.now.iteration if self.now is not None else self.run.iterations

    @property
    def where(self) -> str:
        """Who holds the run while it waits: an engine here or elsewhere, or nothing (`r` starts one here)."""
        if self.executing:
            return "engine waiting"
        return f"{self.run.status} · waits on you"

    @property
    def summary(self) -> str:
        now = self.now
        if isinstance(now, PendingApproval):
            call = now.asked
            if call.shadow:  # core/shadow.py: a proposal to judge; nothing will run
                return f"◐ shadow: the loop proposes tool {call.tool}; agree, edit or deny (nothing runs)"
            if call.tool == PERMISSION_TOOL:
                return f"the agent asks permission: {first_line(call.args.get('title', ''), 80)}"
            return f"tool {call.tool} needs approval"
        if isinstance(now, PendingSideEffect):
            return f"tool {now.asked.tool} may repeat a side effect: reuse its result or execute it again?"
        if isinstance(now, PendingEscalation):
            return now.packet.summary
        return self.run.message or ""


class InboxScreen(Screen[None]):
    """Every run across the database that waits on a person; enter opens one."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,x", "back", "Back", id="inbox.back", tooltip="Back to the runs"),
        Binding("enter", "open", "Open", id="inbox.open", tooltip="Open the selected escalation's packet"),
    ]

    DEFAULT_CSS = """
    InboxScreen #inbox-title { text-style: bold; padding: 0 1; height: auto; }
    InboxScreen DataTable { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Waiting] = []

    @property
    def lapp(self) -> "LooptermApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static("", id="inbox-title")
        yield DataTable(cursor_type="row", id="inbox")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in [("run", 14), ("loop", 14), ("at", 4), ("waiting for", 12), ("run is", 22),
                             ("summary", 60)]:
            table.add_column(label, key=label, width=width)
        self.refresh_inbox()
        self.set_interval(1.0, self.refresh_inbox)

    def refresh_inbox(self) -> None:
        self.waiting = self.lapp.waiting_runs()
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        for item in self.waiting:
            table.add_row(
                Text(item.run.id), literal(item.run.loop), Text(str(item.at)),
                Text(f"⚑ {item.what}", style="bold"), Text(item.where, style="" if item.executing else "italic"),
                literal(first_line(item.summary, 120)), key=item.run.id,
            )
        if self.waiting:
            table.move_cursor(row=min(keep, len(self.waiting) - 1), animate=False)
        title = Text("Escalation inbox  ", style="bold")
        title.append(f"{len(self.waiting)} run(s) waiting on a person" if self.waiting else "nothing is waiting on a person",
                     style="" if self.waiting else "italic")
        self.query_one("#inbox-title", Static).update(title)

    def action_back(self) -> None:
        self.dismiss(None)

    def action_open(self) -> None:
        table = self.query_one(DataTable)
        if not self.waiting or table.row_count == 0:
            self.notify("nothing is waiting on a person", severity="information")
            return
        self.open(self.waiting[min(table.cursor_row, len(self.waiting) - 1)].run.id)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value:
            self.open(str(event.row_key.value))

    def open(self, run_id: str) -> None:
        self.app.push_screen(EscalationScreen(run_id), callback=partial(self._back_from, run_id))

    def _back_from(self, run_id: str, answered: bool | None) -> None:
        """Back from a run's escalation. When it was answered and no other run waits, the inbox closes too:
        the person is back on the main screen, where the run goes on."""
        if answered and self.app.screen is self and not any(w.run.id != run_id for w in self.lapp.waiting_runs()):
            self.dismiss(None)
            return
        if self.is_mounted:
            self.refresh_inbox()


class EscalationScreen(Screen[bool]):
    """What the run waits on now (re-read from its log's fold on every refresh): the escalation's packet
    (failing invariants, confidence trajectory, reasoning, suggestions), a tool call to approve, a side effect,
    and the answers, as commands. Once an answer that lets the run go on (or ends it) is sent, the screen closes
    itself (dismissed with True): the person is back where they came from."""

    # In the order a person answers (the footer keeps the first ones at 80 columns).
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "add_fact", "Fact+resume", id="escalation.add_fact",
                tooltip="Add a fact to the run's working memory; sent with enter, it also resumes the run past its "
                        "escalation ('Add only' keeps it waiting)"),
        Binding("r", "resume", "Resume", id="escalation.resume",
                tooltip="Answer the escalation: the run goes on past it (starts here if nothing runs it)"),
        Binding("k", "abort", "Abort", id="escalation.abort",
                tooltip="Answer the escalation by stopping the run (it stays in the store)"),
        Binding("a", "approve", "Approve", id="escalation.approve", tooltip="Approve the pending tool call (arguments editable)"),
        Binding("d", "deny", "Deny", id="escalation.deny", tooltip="Deny the pending tool call"),
        Binding("escape", "back", "Back", id="escalation.back", tooltip="Back to where you came from"),
        Binding("g", "set_subgoal", "Subgoal", id="escalation.set_subgoal",
                tooltip="Replace the subgoal the next iteration pursues; sent with enter, it also resumes the run"),
        Binding("i", "relax", "Relax", id="escalation.relax", tooltip="Relax (or restore) an invariant, with a reason"),
        Binding("e", "patch_state", "Patch state", id="escalation.patch_state", tooltip="Edit the state as JSON (validated)"),
        Binding("o", "open_run", "Open run", id="escalation.open_run", tooltip="Show this run's timeline"),
    ]

    DEFAULT_CSS = """
    EscalationScreen #esc-title { height: auto; padding: 0 1; background: $panel; }
    EscalationScreen #esc-body { height: 1fr; }
    EscalationScreen #esc-packet { width: 1fr; padding: 0 1; }
    EscalationScreen #esc-side { width: 1fr; padding: 0 1; border-left: vkey $foreground 30%; }
    EscalationScreen #esc-confidence { height: 3; margin-bottom: 1; }
    EscalationScreen .section { text-style: bold; }
    """

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.waiting_item: Waiting | None = None
        self._shown = ""
        # An approval answered from here: the event ids of all that waited then. The screen closes once none of
        # them waits any more, whatever the run asked after (so where the person lands never depends on timing).
        self._answered_here: frozenset[int] | None = None

    @property
    def lapp(self) -> "LooptermApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static("", id="esc-title")
        with Horizontal(id="esc-body"):
            with VerticalScroll(id="esc-packet"):
                yield Static("", id="esc-packet-text")
            with Vertical(id="esc-side"):
                yield Static(Text("Confidence trajectory", style="bold"), id="esc-confidence-label")
                yield Sparkline([], id="esc-confidence")
                with VerticalScroll():
                    yield Static("", id="esc-reasoning")
        yield KeyHints()  # r and esc always fit (tui/widgets/keyhints.py)

    def on_mount(self) -> None:
        self.reload()
        self.set_interval(0.5, self.reload)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("approve", "deny"):
            return bool(self.waiting_item is not None and self.waiting_item.approvals)
        return True

    def reload(self) -> None:
        had_approvals = bool(self.waiting_item and self.waiting_item.approvals)
        self.waiting_item = self.lapp.waiting_for(self.run_id)
        item = self.waiting_item
        if bool(item.approvals) != had_approvals:
            self.refresh_bindings()
        if self._answered_here is not None and not self._answered_here & item.pending_ids:
            self.close_answered()
            return
        palette = self.lapp.palette
        run = item.run
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append("⚑ " if item.waiting else "✓ ", style=f"bold {palette.warn if item.waiting else palette.ok}")
        title.append(f"run {run.id} ", style="bold")
        title.append(literal(run.loop))
        title.append("  ")
        title.append_text(status_text(run.status, palette))
        if not item.waiting:
            title.append("  answered: nothing waits on a person now (esc goes back)", style="italic")
        elif item.executing:
            title.append(f"  an engine waits for your answer ({item.what} at iteration {item.at})", style="italic")
        elif run.status != "escalated":  # stopped (quit, `s`) while it waited: still unanswered
            title.append(f"  {run.status} · waits on you: resume (r) starts it in this window", style="italic")
        else:
            title.append("  not executing: resume (r) starts it in this window", style="italic")
        body = self.packet_text(item, palette)
        recent = self.lapp.store.last_iterations(run.id, 3)
        now = item.now
        confidences = now.packet.confidence_trajectory if isinstance(now, PendingEscalation) else []
        shown = repr((title.plain, body.plain, [r.n for r in recent], confidences))
        if shown == self._shown:
            return
        self._shown = shown
        self.query_one("#esc-title", Static).update(title)
        self.query_one("#esc-packet-text", Static).update(body)
        trajectory = [float(c) for c in confidences] or [
            float((r.decision or {}).get("confidence", 0.0)) for r in recent
        ]
        self.query_one("#esc-confidence", Sparkline).data = trajectory or [0.0]
        label = Text("Confidence trajectory  ", style="bold")
        label.append(" → ".join(f"{c:.2f}" for c in trajectory[-10:]) or "-")
        self.query_one("#esc-confidence-label", Static).update(label)
        self.query_one("#esc-reasoning", Static).update(self.reasoning_text(recent))

    @classmethod
    def packet_text(cls, item: Waiting, palette: Palette) -> Text:
        """What the run waits on now first, with its answers; anything older still unanswered after it."""
        text = Text()
        if item.now is None:
            text.append("This run is not waiting on a person (any more): it was answered.\n", style="italic")
            text.append("esc goes back · o opens the run", style="dim")
            return text
        cls._pending_text(text, item.now, palette)
        older = [p for p in item.pending if p is not item.now]
        if older:
            text.append("\nAlso unanswered (asked earlier)\n", style="bold")
            for pending in older:
                text.append(f"• iteration {pending.iteration}: ", style="dim")
                text.append(literal(first_line(Waiting(item.run, now=pending).summary, 100)))
                text.append("\n")
        if isinstance(item.now, PendingEscalation):
            text.append("\nAnswers: f add a fact and resume · g set the subgoal and resume · r resume · k abort · "
                        "i relax an invariant · e patch the state (then r)", style="dim")
        elif isinstance(item.now, PendingApproval):
            text.append("\nAnswers: a " + ("agree" if item.now.asked.shadow else "approve") + " · d deny · "
                        "f add a fact · k stop the run", style="dim")
        else:
            text.append("\nAnswers: r decides (reuse the recorded result or execute it again) and resumes · k stop",
                        style="dim")
        return text

    @staticmethod
    def _pending_text(text: Text, now: Pending, palette: Palette) -> None:
        if isinstance(now, PendingEscalation):
            packet = now.packet
            text.append("Why it stopped\n", style="bold")
            text.append(literal(packet.summary))
            text.append(f"  (iteration {now.iteration})\n\n", style="dim")
            failing = packet.failing_invariants
            text.append("Failing invariants\n", style="bold")
            for inv in failing:
                text.append("✗ ", style=palette.bad)
                text.append(literal(inv.get("name", "?"), "bold"))
                if inv.get("description"):
                    text.append("  ")
                    text.append(literal(inv["description"], "italic"))
                text.append("\n")
            if not failing:
                text.append("none\n", style="dim")
            if packet.last_gate_failure:
                text.append("\nLast gate failure\n", style="bold")
                text.append(literal(str(packet.last_gate_failure).strip()[-1500:]))
                text.append("\n")
            if packet.suggested_interventions:
                text.append("\nSuggested interventions\n", style="bold")
                for suggestion in packet.suggested_interventions:
                    text.append("• ")
                    text.append(literal(suggestion))
                    text.append("\n")
        elif isinstance(now, PendingApproval) and now.asked.tool == PERMISSION_TOOL and not now.asked.shadow:
            args = now.asked.args  # an agent's permission request (core/agent_actor.py): what, where, the diff
            text.append("The agent asks permission", style="bold")
            text.append(f" (iteration {now.iteration})\n", style="dim")
            text.append(literal(first_line(args.get("title", ""), 100), "bold"))
            text.append("  ")
            text.append(literal(first_line(args.get("kind", ""), 20), "dim"))
            text.append("\n")
            text.append(literal(", ".join(str(p) for p in args.get("paths") or []) or "no path named"))
            text.append("\n\n")
            diff = str(args.get("diff") or "")
            text.append_text(unified_diff_text(diff, palette) if diff else Text("no diff given with the request",
                                                                               style="dim"))
            text.append("\n")
        elif isinstance(now, PendingApproval):
            call = now.asked
            text.append("◐ Shadow proposal (nothing will run)" if call.shadow else "Tool call waiting for approval",
                        style="bold")
            text.append(f" (iteration {now.iteration})\n", style="dim")
            text.append(literal(call.tool, "bold"))
            text.append("\n")
            text.append(literal(pretty(call.args)))
            text.append("\n")
        else:
            asked = now.asked
            text.append("A side effect it may repeat", style="bold")
            text.append(f" (iteration {now.iteration})\n", style="dim")
            text.append(literal(asked.tool or "?", "bold"))
            text.append("\n")
            text.append(literal(pretty(asked.args)))
            text.append("\n")

    @staticmethod
    def reasoning_text(records: list[IterationRecord]) -> Text:
        text = Text("The reasoning that led here\n", style="bold")
        if not records:
            text.append("no iteration recorded", style="dim")
        for record in records:
            decision = record.decision or {}
            text.append(f"\n#{record.n} ", style="bold")
            text.append(literal(first_line(decision.get("subgoal", ""), 80), "italic"))
            conf = decision.get("confidence")
            if isinstance(conf, (int, float)):
                text.append(f"  conf {conf:.2f}", style="dim")
            text.append("\n")
            text.append(literal(decision.get("reasoning", "") or "(no reasoning)"))
            text.append("\n")
        return text

    # -- answers (each one a command through the store) -------------------------

    def close_answered(self) -> None:
        """The answer is sent: back to where the person came from (the inbox or the main screen)."""
        if self.app.screen is self:
            self.dismiss(True)
        elif self in self.app.screen_stack:  # a dialog over it is closing: once it has
            self.call_after_refresh(self.close_answered)

    def _then(self, resumed: bool) -> None:
        if resumed:
            self.close_answered()

    def action_add_fact(self) -> None:
        self.lapp.ask_add_fact(self.run_id, then=self._then)

    def action_set_subgoal(self) -> None:
        self.lapp.ask_subgoal(self.run_id, then=self._then)

    def action_relax(self) -> None:
        self.lapp.open_relax(self.run_id)

    def action_patch_state(self) -> None:
        self.lapp.open_edit_state(self.run_id)

    def action_approve(self) -> None:
        self._answer_approval(deny=False)

    def action_deny(self) -> None:
        self._answer_approval(deny=True)

    def _answer_approval(self, *, deny: bool) -> None:
        if self.waiting_item is not None:
            self._answered_here = self.waiting_item.pending_ids
        self.lapp.open_approval(self.run_id, deny=deny)

    def action_resume(self) -> None:
        refusal = self.lapp.resume_refusal(self.run_id)
        if refusal:
            self.notify(refusal, severity="warning")
            return
        self.close_answered()
        self.lapp.resume_run(self.run_id)

    def action_abort(self) -> None:
        self.close_answered()
        self.lapp.abort_run(self.run_id, "aborted by a person answering its escalation")

    def action_open_run(self) -> None:
        self.lapp.show_run(self.run_id)
        while len(self.app.screen_stack) > 1:
            self.app.pop_screen()

    def action_back(self) -> None:
        self.dismiss(False)
