"""Branch from the selected iteration, in one dialog: patches, a reason, invariants to relax, the model, and
whether the branch starts running or paused. Everything is checked before anything is created.

Its fields, top to bottom as Tab walks them: patches (PATH=JSON lines), why (required, recorded with the branch
and with each relaxation), the invariants to relax (ticked: the ones that failed at the fork point, which the
branch would otherwise stop on at once), the model (the parent's, prefilled), running or paused. Below them, the
side-effecting calls the branch may reach again, and what their tools' rewind policy does then.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Button, Input, RadioButton, RadioSet, SelectionList, Static

from loopterm.core.errors import LooptermError
from loopterm.tui.screens.dialog import Dialog, JsonEditor
from loopterm.tui.widgets.render import first_line, literal

if TYPE_CHECKING:
    from loopterm.core.fork import ForkOptions, ForkPlan, SideEffectCall


class BranchRequest(BaseModel):
    """What the person typed and chose; the planner turns it into a checked fork plan (or one line why not)."""

    patches: list[str]
    reason: str
    relax: list[str]
    model: str
    paused: bool = False


@dataclass(frozen=True)
class BranchOrder:
    """What the dialog dismisses with: a plan checked in full (nothing created yet) and how the branch starts."""

    plan: ForkPlan
    paused: bool


# A request -> a checked fork plan; raises LooptermError (one line) when the branch would be invalid.
Planner = Callable[[BranchRequest], "ForkPlan"]
# The model the branch would call -> None, or LooptermError (one line) when it cannot answer (runs in a thread).
ModelCheck = Callable[[str], Awaitable[None]]

POLICY = {
    "ask": "asks you before repeating it",
    "reuse": "reuses the recorded result",
    "reexecute": "runs it again",
}
# Rows of the dialog besides its fields: border, title, buttons, keys line, and room for a wrapped error line.
CHROME_ROWS = 12


class BranchScreen(Dialog[BranchOrder]):
    """Dismisses with a `BranchOrder`; nothing is created here."""

    submit_label = "create branch"

    DEFAULT_CSS = """
    BranchScreen #dialog-title { padding: 0; }
    BranchScreen #branch-fields { height: auto; }
    BranchScreen #patches { height: 4; }
    BranchScreen #relax { height: auto; max-height: 8; }
    BranchScreen #start { layout: horizontal; height: auto; width: 100%; }
    BranchScreen #start RadioButton { width: auto; margin-right: 2; }
    BranchScreen #side-effects { padding: 0 1; }
    """

    BORDER_TITLES: ClassVar[dict[str, str]] = {
        "patches": "patches: PATH=JSON, one a line (ctrl+t indents)",
        "reason": "why (required)",
        "relax": "relax on the branch (space toggles)",
        "model": "model",
        "start": "start",
    }

    def __init__(self, options: ForkOptions, planner: Planner, model_check: ModelCheck) -> None:
        super().__init__()
        self.options = options
        self.run_id = options.parent
        self.at = options.at
        self.planner = planner
        self.model_check = model_check
        self.checking = False  # a submitted plan's model is being checked: a second ctrl+s waits for it
        self.title_text = f"Branch run {options.parent} from iteration {options.at}"

    def fields(self) -> ComposeResult:
        with VerticalScroll(id="branch-fields", can_focus=False):
            yield JsonEditor("", id="patches", placeholder='memory.subgoal="try the other parser"')
            yield Input(placeholder="recorded with the branch and with each relaxation", id="reason")
            yield SelectionList[str](*self._invariant_rows(), id="relax")
            yield Input(self.options.model, placeholder="a litellm model string", id="model")
            with RadioSet(id="start"):
                yield RadioButton("running", value=True, id="start-running")
                yield RadioButton("paused (space starts it)", id="start-paused")
            yield Static(self._side_effects_text(), id="side-effects")

    def _invariant_rows(self) -> list[tuple[Text, str, bool]]:
        rows = []
        for inv in self.options.invariants:
            prompt = Text()
            if inv.held is False:
                prompt.append("✗ ", style="bold red")
            elif inv.held:
                prompt.append("✓ ", style="green")
            else:
                prompt.append("· ", style="dim")
            prompt.append(literal(inv.name, "bold"))
            said = {True: "held", False: "failed", None: "not checked"}[inv.held]
            prompt.append(f"  {said} at iteration {self.options.at}", style="dim" if inv.held is not False else "")
            if inv.description:
                prompt.append("  ")
                prompt.append(literal(first_line(inv.description, 70), "dim"))
            rows.append((prompt, inv.name, inv.held is False))
        return rows

    def _side_effects_text(self) -> Text:
        calls = self.options.may_repeat
        text = Text()
        if not calls:
            text.append(f"No side-effecting call after iteration {self.at}: the branch cannot repeat one.",
                        style="dim")
            return text
        text.append(f"Side-effecting calls after iteration {self.at} the branch may reach again "
                    "(if it makes the same call):", style="bold")
        for call in calls[:8]:
            text.append("\n  ")
            text.append(_call_line(call))
        if len(calls) > 8:
            text.append(f"\n  … {len(calls) - 8} more", style="dim")
        return text

    def buttons(self) -> ComposeResult:
        yield Button("Create branch", variant="primary", id="submit")

    def on_mount(self) -> None:
        super().on_mount()
        for widget_id, title in self.BORDER_TITLES.items():
            self.query_one(f"#{widget_id}").border_title = title
        if not self.options.invariants:
            self.query_one("#relax").display = False
        self._say_relaxed()
        self._fit(self.app.size.height)

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged[str]) -> None:
        event.stop()
        self._say_relaxed()

    def _say_relaxed(self) -> None:
        """What will be relaxed, in words under the list (a ticked box differs from an unticked one by colour only)."""
        relax = self.query_one("#relax", SelectionList)
        names = [str(name) for name in relax.selected]
        relax.border_subtitle = Text(f"relaxing {', '.join(names)}" if names else "relaxing none")

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.height)

    def _fit(self, height: int) -> None:
        """The fields scroll when the terminal is short, so the buttons and the keys line stay on screen."""
        self.query_one("#branch-fields").styles.max_height = max(4, int(height * 0.9) - CHROME_ROWS)

    # -- what was typed -> a plan -----------------------------------------------------------------------------

    def request(self) -> BranchRequest:
        patches = self.query_one("#patches", JsonEditor).text
        return BranchRequest(
            patches=[line.strip() for line in patches.splitlines() if line.strip()],
            reason=self.query_one("#reason", Input).value.strip(),
            relax=list(self.query_one("#relax", SelectionList).selected),
            model=self.query_one("#model", Input).value.strip() or self.options.model,
            paused=self.query_one("#start-paused", RadioButton).value,
        )

    def submit(self, button: str) -> None:
        if self.checking:
            return
        self.clear_error()
        request = self.request()
        if not request.reason:
            self.fail("give a reason: a branch is recorded with why it was made; nothing was created")
            self.query_one("#reason", Input).focus()
            return
        try:
            plan = self.planner(request)
        except LooptermError as exc:
            self.fail(str(exc))
            return
        self.checking = True
        self.run_worker(self._check_model(plan, request.paused), group="branch-check", exit_on_error=False)

    async def _check_model(self, plan: ForkPlan, paused: bool) -> None:
        try:
            await self.model_check(plan.model)
        except LooptermError as exc:
            self.fail(f"{exc}; nothing was created")
            self.query_one("#model", Input).focus()
            return
        finally:
            self.checking = False
        self.dismiss(BranchOrder(plan=plan, paused=paused))


def _call_line(call: SideEffectCall) -> Text:
    line = Text()
    line.append(f"iteration {call.n} ", style="dim")
    line.append(literal(call.tool, "bold"))
    args = json.dumps(call.args, ensure_ascii=False, default=str)
    line.append(literal(f"({first_line(args, 50)})"))
    line.append(f" → {POLICY.get(call.policy, call.policy)}", style="italic")
    return line

