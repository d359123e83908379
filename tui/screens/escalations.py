"""People in the loop: the inbox of runs waiting on a person, and one escalation's packet with its answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Sparkline, Static

from loopterm.core.fold import PendingApproval, PendingEscalation, PendingSideEffect, RunView
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.runlog import Escalated
from loopterm.tui.widgets.keyhints import KeyHints
from loopterm.tui.widgets.render import Palette, first_line, literal, pretty, status_text

if TYPE_CHECKING:
    from loopterm.tui.app import LooptermApp


@dataclass
class Waiting:
    """A run waiting on a person (its log's fold says so, whatever its status): an escalation, tool calls
    waiting for approval, a side effect it may repeat. A snapshot: it does not change as the log grows."""

    run: RunRecord
    escalation: PendingEscalation | None = None
    approvals: list[PendingApproval] = field(default_factory=list)
    side_effect: PendingSideEffect | None = None
    executing: bool = False  # an engine (here or in another process) is waiting for the answer

    @classmethod
    def of(cls, run: RunRecord, log: RunView, executing: bool) -> "Waiting":
        return cls(run, log.escalation, list(log.approvals.values()), log.side_effect, executing)

    @property
    def packet(self) -> Escalated | None:
        """The pending escalation's packet."""
        return self.escalation.packet if self.escalation is not None else None

    @property
    def waiting(self) -> bool:
        return self.escalation is not None or bool(self.approvals) or self.side_effect is not None

    @property
    def what(self) -> str:
        if self.approvals:
            return "shadow" if self.approvals[0].asked.shadow else "approval"
        if self.side_effect is not None:
            return "side effect"
        return "escalation" if self.escalation is not None else "waiting"

    @property
    def at(self) -> int:
        """The iteration it waits at."""
        if self.approvals:
            return self.approvals[0].iteration
        if self.side_effect is not None:
            return self.side_effect.iteration
        if self.escalation is not None:
            return self.escalation.iteration
        return self.run.iterations

    @property
    def where(self) -> str:
        """Who holds the run while it waits: an engine here or elsewhere, or nothing (`r` starts one here)."""
        if self.executing:
            return "engine waiting"
        return f"{self.run.status} · waits on you"

    @property
    def summary(self) -> str:
        if self.approvals:
            call = self.approvals[0].asked
            if call.shadow:  # core/shadow.py: a proposal to judge; nothing will run
                return f"◐ shadow: the loop proposes tool {call.tool}; agree, edit or deny (nothing runs)"
            return f"tool {call.tool} needs approval"
        if self.side_effect is not None:
            return f"tool {self.side_effect.asked.tool} may repeat a side effect: reuse its result or execute it again?"
        if self.escalation is not None:
            return self.escalation.packet.summary
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
        run_id = self.waiting[min(table.cursor_row, len(self.waiting) - 1)].run.id
        self.app.push_screen(EscalationScreen(run_id))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value:
            self.app.push_screen(EscalationScreen(str(event.row_key.value)))


class EscalationScreen(Screen[None]):
    """The packet (failing invariants, confidence trajectory, reasoning, suggestions) and the answers, as commands."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "add_fact", "Add fact", id="escalation.add_fact", tooltip="Add a fact to the run's working memory"),
        Binding("g", "set_subgoal", "Override subgoal", id="escalation.set_subgoal",
                tooltip="Replace the subgoal the next iteration pursues"),
        Binding("i", "relax", "Relax invariant", id="escalation.relax", tooltip="Relax (or restore) an invariant, with a reason"),
        Binding("e", "patch_state", "Patch state", id="escalation.patch_state", tooltip="Edit the state as JSON (validated)"),
        Binding("a", "approve", "Approve", id="escalation.approve", tooltip="Approve the pending tool call (arguments editable)"),
        Binding("d", "deny", "Deny", id="escalation.deny", tooltip="Deny the pending tool call"),
        Binding("r", "resume", "Resume", id="escalation.resume",
                tooltip="Answer the escalation: the run goes on past it (starts here if nothing runs it)"),
        Binding("k", "abort", "Abort", id="escalation.abort",
                tooltip="Answer the escalation by stopping the run (it stays in the store)"),
        Binding("o", "open_run", "Open run", id="escalation.open_run", tooltip="Show this run's timeline"),
        Binding("escape", "back", "Back", id="escalation.back", tooltip="Back to the inbox"),
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
        palette = self.lapp.palette
        run = item.run
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append("⚑ ", style=f"bold {palette.warn}")
        title.append(f"run {run.id} ", style="bold")
        title.append(literal(run.loop))
        title.append("  ")
        title.append_text(status_text(run.status, palette))
        if item.executing:
            title.append("  an engine is waiting for your answer", style="italic")
        elif item.waiting and run.status != "escalated":  # stopped (quit, `s`) while it waited: still unanswered
            title.append(f"  {run.status} · waits on you: resume (r) starts it in this window", style="italic")
        else:
            title.append("  not executing: resume (r) starts it in this window", style="italic")
        packet = item.packet
        body = self.packet_text(item, palette)
        recent = self.lapp.store.last_iterations(run.id, 3)
        confidences = packet.confidence_trajectory if packet is not None else []
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

    @staticmethod
    def packet_text(item: Waiting, palette: Palette) -> Text:
        packet = item.packet
        text = Text()
        if packet is not None:
            text.append("Why it stopped\n", style="bold")
            text.append(literal(packet.summary))
            text.append(f"  (iteration {packet.iteration})\n\n", style="dim")
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
        for pending in item.approvals:
            call = pending.asked
            text.append("\n◐ Shadow proposal (nothing will run)" if call.shadow else "\nTool call waiting for approval",
                        style="bold")
            text.append(f" (iteration {pending.iteration})\n", style="dim")
            text.append(literal(call.tool, "bold"))
            text.append("\n")
            text.append(literal(pretty(call.args)))
            text.append("\na agrees (edit the arguments to say what should happen instead), d denies\n" if call.shadow
                        else "\na approves (arguments editable), d denies\n", style="italic")
        if item.side_effect is not None:
            asked = item.side_effect.asked
            text.append("\nA side effect it may repeat\n", style="bold")
            text.append(literal(asked.tool or "?", "bold"))
            text.append("\n")
            text.append(literal(pretty(asked.args)))
            text.append("\nr decides (reuse the recorded result or execute it again) and resumes\n", style="italic")
        if not item.waiting:
            text.append("This run is not waiting on a person (any more).", style="italic")
        text.append("\nAnswers: f add fact · g override subgoal · i relax invariant · e patch state · "
                    "r resume · k abort", style="dim")
        return text

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

    def action_add_fact(self) -> None:
        self.lapp.ask_add_fact(self.run_id)

    def action_set_subgoal(self) -> None:
        self.lapp.ask_subgoal(self.run_id)

    def action_relax(self) -> None:
        self.lapp.open_relax(self.run_id)

    def action_patch_state(self) -> None:
        self.lapp.open_edit_state(self.run_id)

    def action_approve(self) -> None:
        self.lapp.open_approval(self.run_id, deny=False)

    def action_deny(self) -> None:
        self.lapp.open_approval(self.run_id, deny=True)

    def action_resume(self) -> None:
        self.lapp.resume_run(self.run_id)

    def action_abort(self) -> None:
        self.lapp.abort_run(self.run_id, "aborted by a person answering its escalation")

    def action_open_run(self) -> None:
        self.lapp.show_run(self.run_id)
        while len(self.app.screen_stack) > 1:
            self.app.pop_screen()

    def action_back(self) -> None:
        self.dismiss(None)
