"""The approval policies in force for the run on screen (its own and its loop's), or in the whole database,
with the calls each decided; `r` revokes the selected one (recorded in the log of the run that made it; the
next call it would have answered is asked). The same as `loopterm policy list|revoke`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from loopterm.core.approval_policy import Policy
from loopterm.core.errors import ConfigError
from loopterm.store import policies as stored
from loopterm.tui.widgets.render import literal

if TYPE_CHECKING:
    from loopterm.tui.app import LooptermApp


class PoliciesScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,p", "back", "Back", id="policies.back", tooltip="Back to the runs"),
        Binding("r", "revoke", "Revoke", id="policies.revoke",
                tooltip="Revoke the selected policy: the next call it would have answered is asked (recorded)"),
    ]

    DEFAULT_CSS = """
    PoliciesScreen #policies-title { text-style: bold; padding: 0 1; height: auto; }
    PoliciesScreen DataTable { height: 1fr; }
    """

    def __init__(self, run_id: str | None) -> None:
        super().__init__()
        self.run_id = run_id
        self.policies: list[Policy] = []

    @property
    def lapp(self) -> "LooptermApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static("", id="policies-title")
        yield DataTable(cursor_type="row", id="policies")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in [("id", 9), ("effect", 10), ("scope", 9), ("tool", 14), ("globs", 24), ("decided", 7),
                             ("reason", 30)]:
            table.add_column(label, key=label, width=width)
        self.refresh_policies()
        table.focus()

    def refresh_policies(self) -> None:
        store = self.lapp.store
        run = store.get_run(self.run_id) if self.run_id is not None else None
        self.policies = stored.policies(store, run=run)
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        for p in self.policies:
            if p.revoked:
                effect = Text(f"■ revoked", style="dim")
            elif p.rule.effect == "approve":
                effect = Text("✓ approve", style="green")
            else:
                effect = Text("✗ deny", style="red")
            globs = ", ".join(f"{k}={v}" for k, v in p.rule.globs.items()) or "(any arguments)"
            table.add_row(Text(p.id), effect, Text("run" if p.rule.scope == "run" else "loop"), literal(p.rule.tool),
                          literal(globs), Text(str(len(p.decided))),
                          literal(p.revoke_reason if p.revoked else (p.rule.reason or "-")), key=p.id)
        if self.policies:
            table.move_cursor(row=min(max(keep, 0), len(self.policies) - 1), animate=False)
        where = f"run {self.run_id} and its loop" if self.run_id else "this database"
        active = sum(1 for p in self.policies if not p.revoked)
        title = Text(f"Approval policies of {where}  ", style="bold")
        title.append(f"{active} in force" if self.policies else
                     "none yet: make one from the approval dialog (a, d): answer calls like this one",
                     style="" if self.policies else "italic")
        self.query_one("#policies-title", Static).update(title)

    def selected(self) -> Policy | None:
        table = self.query_one(DataTable)
        if not self.policies or table.cursor_row < 0:
            return None
        return self.policies[min(table.cursor_row, len(self.policies) - 1)]

    def action_revoke(self) -> None:
        policy = self.selected()
        if policy is None:
            self.notify("no policy to revoke", severity="warning")
            return
        try:
            stored.revoke(self.lapp.store, policy.id, "revoked by a person (TUI)")
        except ConfigError as exc:
            self.notify(str(exc), severity="warning", markup=False)
            return
        self.notify(f"revoked policy {policy.id}: the next matching call is asked", markup=False)
        self.refresh_policies()

    def action_back(self) -> None:
        self.dismiss(None)
