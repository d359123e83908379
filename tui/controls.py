"""Every control a person sends a run: pause, step, resume, stop, state edits, relaxations, facts, subgoals and answers to approvals and escalations."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from loopterm.core import runs as service
from loopterm.core.control import (
    AddFact,
    Command,
    EditState,
    Pause,
    Resume,
    SetSubgoal,
    Step,
    Stop,
    command_payload,
)
from loopterm.core.decision import json_path
from loopterm.core.fold import Outcome, PendingApproval
from loopterm.core.liveness import executing_elsewhere
from loopterm.core.loop import Loop
from loopterm.core.records import RunRecord
from loopterm.core.termination import TerminationReason
from loopterm.tui.screens.approval import ApprovalScreen
from loopterm.tui.screens.dialog import PromptAnswer, TextPrompt
from loopterm.tui.screens.edit_state import EditStateScreen
from loopterm.tui.screens.escalations import EscalationScreen, InboxScreen, Waiting
from loopterm.tui.screens.relax import InvariantChoice, RelaxScreen
from loopterm.tui.view import FINISHED, RUNNING, EditInFlight
from pydantic import ValidationError


class Controls:
    """Mixed into LooptermApp: controls go through the store's control channel."""

    # ------------------------------------------------------------------ sending commands

    def send(self, run_id: str, command: Command, *, quiet: bool = False) -> None:
        """Every control goes through the store's control channel, for runs here and in other processes alike.
        What the run does with it is read back from its log: a refusal is said, with the engine's reason."""
        log = self.run_view(run_id)  # read up to now: what comes after is this command's outcome (or later)
        self._answering.setdefault(run_id, log.last_id)
        kind, payload = command_payload(command)
        row = self.store.add_command(run_id, kind, payload)
        if isinstance(command, EditState):
            self._edits[run_id] = EditInFlight(run_id, command, row.id or 0)
        engine = self.engines.get(run_id)
        if engine is not None:
            engine.wake()  # it reads the channel now, not at its next poll
        if not quiet:
            self.notify(f"{kind.replace('_', ' ')} sent to run {run_id[:8]}", timeout=3)
        self.poll_soon()

    def _follow_answers(self) -> None:
        """Read the log of each run this window sent a command to until the run took them all (its refusals
        are said as they arrive, also for runs not on screen)."""
        for run_id in list(self._answering):
            if not self.store.pending_commands(run_id):  # taken: what it did is in the log now
                self.run_view(run_id)
                self._answering.pop(run_id, None)

    def _current_run(self) -> RunRecord | None:
        if self.view is None:
            self.notify("no run on screen: pick one in the tree on the left", severity="warning")
            return None
        try:
            self.view.run = self.store.get_run(self.view.run_id)
        except KeyError:
            return None
        return self.view.run

    def _target(self, run_id: str | None) -> RunRecord | None:
        if run_id is None:
            return self._current_run()
        try:
            return self.store.get_run(run_id)
        except KeyError:
            self.notify(f"no run {run_id}", severity="error")
            return None

    def _escalation_first(self, run: RunRecord, doing: str) -> bool:
        """A run waiting on a person's answer to its escalation is not resumed or stepped past it by a key that
        does not name it: its escalation opens instead (r there resumes past it, k aborts). Whether it did."""
        pending = self.run_view(run.id).escalation
        if pending is None:
            return False
        self.notify(f"run {run.id[:8]} waits on your answer to its escalation at iteration {pending.iteration}: "
                    f"{doing} would not go past it. r resumes past it, k aborts, f/g/i/e change what it continues with",
                    severity="warning", timeout=8, markup=False)
        self.push_screen(EscalationScreen(run.id))
        return True

    def action_toggle_pause(self) -> None:
        run = self._current_run()
        if run is None:
            return
        if self.executing(run.id):
            if run.status in ("paused", "escalated"):
                if self._escalation_first(run, "space"):
                    return
                if self.run_view(run.id).approvals:
                    self.notify("a tool call waits for approval: a approves, d denies", severity="warning")
                    return
                self.send(run.id, Resume())
            else:
                self.send(run.id, Pause())
        elif not self._escalation_first(run, "space"):
            self.resume_here(run.id)

    def action_step(self) -> None:
        run = self._current_run()
        if run is None or self._escalation_first(run, "a step"):
            return
        if self.executing(run.id):
            self.send(run.id, Step())
        else:
            self.resume_here(run.id, first=Step())

    def action_resume(self) -> None:
        run = self._current_run()
        if run is not None:
            self.resume_run(run.id)

    def resume_refusal(self, run_id: str) -> str | None:
        """Why a resume would not answer what the run waits on (None: it would). An engine waiting for a tool
        call's approval waits for that answer, not for a resume."""
        log = self.run_view(run_id)
        if log.escalation is None and log.approvals and self.executing(run_id):
            return "a tool call waits for approval: a approves, d denies"
        return None

    def resume_run(self, run_id: str) -> bool:
        """Let the run go on; when it waits on an escalation, this is the answer that goes past it (it names the
        escalation it answers: one answered or superseded meanwhile is refused, not applied to another).
        Whether anything was sent (or started)."""
        refusal = self.resume_refusal(run_id)
        if refusal:
            self.notify(refusal, severity="warning")
            return False
        pending = self.run_view(run_id).escalation
        command = Resume(escalation=pending.event_id) if pending is not None else Resume()
        if self.executing(run_id):
            self.send(run_id, command)
        else:
            self.resume_here(run_id, first=command if pending is not None else None)
        return True

    def action_stop(self) -> None:
        run = self._current_run()
        if run is not None:
            self.stop_run(run.id, "stopped by a person")

    def abort_run(self, run_id: str, reason: str = "aborted by a person answering its escalation") -> None:
        """The answer to an escalation that ends the run (recorded as that answer); without one pending, a stop."""
        pending = self.run_view(run_id).escalation
        self.stop_run(run_id, reason, escalation=pending.event_id if pending is not None else None)

    def stop_run(self, run_id: str, reason: str, *, escalation: int | None = None) -> None:
        """Stop at the next boundary. What waits on a person stays pending (the run stays resumable), unless
        `escalation` names the escalation this stop answers."""
        command = Stop(reason=reason, escalation=escalation)
        if self.executing(run_id):
            self.send(run_id, command)
            return
        run = self.store.get_run(run_id)
        if escalation is not None:
            # An answer is taken by an engine (consumed and recorded in one commit): one starts here to take it.
            if self.loop_for(run) is None:
                self.send(run_id, command, quiet=True)
                self.notify(f"run {run_id[:8]}: its loop does not load here, so the answer waits in its control "
                            "channel; it applies when the run is next resumed", severity="warning", timeout=10)
                return
            self.resume_here(run_id, first=command)
            return
        if run.status in FINISHED:
            self.notify(f"run {run_id[:8]} is not executing (it {run.status})", severity="warning")
            return
        # Nothing executes it (it ended waiting on a person, or crashed): record its end here. What waits on a
        # person stays pending (core/fold.py): it stays in the inbox, and a resume asks again.
        service.record_end(self.store, run_id, TerminationReason.STOPPED, reason)
        self.notify(f"run {run_id[:8]} stopped", timeout=3)
        self.refresh_tree()
        self.poll_soon()

    # -- state, invariants, facts, subgoals ----------------------------------------

    def latest_state(self, run: RunRecord) -> tuple[dict[str, Any], int, int]:
        """The state the run's next iteration starts from, with what an edit of it is based on: (state, the
        iteration it follows, the version of a person's patch of it: `RunView.state_version`)."""
        log = self.run_view(run.id)
        n = run.iterations
        patched = log.state_after(n)
        if patched is not None:
            return patched, n, log.state_version(n)
        state = self.store.state_at(run.id, n) if n else None
        if state is None:
            loop = self.loop_for(run)
            state = loop.new_state().model_dump(mode="json") if loop else {}
        return state, n, log.state_version(n)

    def action_edit_state(self) -> None:
        self.open_edit_state(None)

    def open_edit_state(self, run_id: str | None, *, refused: str = "", reason: str = "",
                        edited: dict[str, Any] | None = None) -> None:
        """The state editor, on the state the run's next iteration starts from. A running run is asked to pause
        first (at its next boundary). `refused`: why the engine refused this person's last edit (their reason is
        kept; `edited`, their state, when it was refused for what it says rather than for being stale)."""
        run = self._target(run_id)
        if run is None:
            return
        if run.status == "converged":
            self.notify("this run converged and will not continue: branch (b) from an iteration to change its state",
                        severity="warning")
            return
        loop = self.loop_for(run)
        validate = partial(_validate_state, loop) if loop is not None else None
        notes = []
        if loop is None:
            notes.append(f"The loop ({run.loop_ref}) does not load here: the run's engine validates the edit and "
                         "refuses a bad one.")
        if self.executing(run.id) and run.status in RUNNING:
            self.send(run.id, Pause(), quiet=True)
            notes.append("The run was running: it pauses at its next iteration boundary (space resumes it). If an "
                         "iteration commits first, this edit is refused and the newer state is shown to edit again.")
        state, base, version = self.latest_state(run)
        self.push_screen(EditStateScreen(run.id, edited if edited is not None else state, validate, "\n".join(notes),
                                         base_iteration=base, base_version=version, reason=reason, refused=refused),
                         callback=partial(self._sent, run.id))

    def _edit_refused(self, edit: EditInFlight, refusal: Outcome) -> None:
        """The engine refused a state edit sent from here: the editor opens again, saying why, with the person's
        reason; on the state the run now starts from when it had moved on (never their edit of an older one)."""
        self.open_edit_state(edit.run_id, refused=f"Not applied: {refusal.refused}", reason=edit.command.reason,
                             edited=None if refusal.stale else edit.command.state)

    def _sent(self, run_id: str, command: Command | None) -> None:
        if command is not None:
            self.send(run_id, command)

    def action_relax(self) -> None:
        self.open_relax(None)

    def open_relax(self, run_id: str | None) -> None:
        run = self._target(run_id)
        if run is None:
            return
        loop = self.loop_for(run)
        relaxed = dict(self.run_view(run.id).relaxed)
        status: dict[str, bool] = {}
        if run.iterations:
            last = self.store.get_iteration(run.id, run.iterations)
            status = dict(last.invariant_status) if last else {}
        if loop is not None:
            choices = [InvariantChoice(i.name, i.description, relaxed.get(i.name), status.get(i.name)) for i in loop.invariants]
        else:
            choices = [InvariantChoice(name, "", relaxed.get(name), ok) for name, ok in status.items()]
        if not choices:
            self.notify("this loop declares no invariants", severity="warning")
            return
        initial = next((c.name for c in choices if c.holds is False and c.relaxed is None), None)
        self.push_screen(RelaxScreen(run.id, choices, initial), callback=partial(self._sent, run.id))

    def _answer_base(self, run_id: str) -> int | None:
        """What a fact or a subgoal given while the run waits on a person answers: the iteration it waits after
        (the engine refuses it once the run has moved past). None while it runs on: it applies at the next boundary."""
        try:
            run = self.store.get_run(run_id)
        except KeyError:
            return None
        return run.iterations if self.run_view(run_id).waiting else None

    def ask_add_fact(self, run_id: str, *, then: Callable[[bool], None] | None = None) -> None:
        """A fact for the run's working memory. When the run waits on its escalation, enter sends the fact and
        resumes past the escalation (the one answer most escalations need); 'Only add the fact' keeps it waiting.
        `then(resumed)` once it is sent."""
        self._ask_answer(run_id, then, what="fact", title=f"Add a fact to the working memory of run {run_id}",
                         placeholder="the fact (the next iterations see it in their prompt)",
                         make=lambda text, base: AddFact(fact=text, base_iteration=base))

    def ask_subgoal(self, run_id: str, *, then: Callable[[bool], None] | None = None) -> None:
        """The subgoal the next iteration pursues; like a fact, it resumes past a waiting escalation."""
        self._ask_answer(run_id, then, what="subgoal", title=f"Override the subgoal of run {run_id}",
                         placeholder="the next subgoal",
                         make=lambda text, base: SetSubgoal(subgoal=text, base_iteration=base))

    def _ask_answer(self, run_id: str, then: Callable[[bool], None] | None, *, what: str, title: str,
                    placeholder: str, make: Callable[[str, int | None], Command]) -> None:
        base = self._answer_base(run_id)
        log = self.run_view(run_id)
        escalation = log.escalation if log.escalation is not None and log.waiting_now is log.escalation else None
        resumes = escalation is not None  # what it waits on now is its escalation: this answer can go past it
        verb = "add the fact" if what == "fact" else "set the subgoal"
        if escalation is not None:
            prompt = TextPrompt(
                title, placeholder, button=f"{verb.capitalize()} and resume", submit_label=f"{verb} and resume",
                other=("Only " + verb, "only"),
                hint=f"enter: {verb} and resume the run past its escalation at iteration {escalation.iteration}. "
                     f"'Only {verb}': it keeps waiting (then r resumes, k aborts).")
        else:
            prompt = TextPrompt(title, placeholder, button=verb.capitalize(), submit_label=verb)

        def answered(answer: PromptAnswer | None) -> None:
            if answer is None:
                return
            self.send(run_id, make(answer.text, base))
            resume = resumes and answer.button == "submit"
            if then is not None:
                then(resume)
            if resume:
                self.resume_run(run_id)

        self.push_screen(prompt, callback=answered)

    # -- approvals ----------------------------------------------------------------

    def action_approve(self) -> None:
        self._approval_key(deny=False)

    def action_deny(self) -> None:
        self._approval_key(deny=True)

    def _approval_key(self, *, deny: bool) -> None:
        """a / d: the run on screen's pending call; with none there, say so (and where one waits, if anywhere)."""
        if self.view is not None and self.pending_approvals(self.view.run_id):
            self.open_approval(self.view.run_id, deny=deny)
            return
        verb = "deny" if deny else "approve"
        elsewhere = [w.run.id for w in self.waiting_runs() if w.approvals]
        where = f"; run {elsewhere[0][:8]} has one: x opens the inbox" if elsewhere else ""
        what = (f"no tool call of run {self.view.run_id[:8]} waits for approval" if self.view is not None
                else "no run on screen")
        self.notify(f"nothing to {verb}: {what}{where}", severity="warning", timeout=6, markup=False)

    def pending_approvals(self, run_id: str) -> list[PendingApproval]:
        """Newest first: the call the run waits on now leads (an older one can stay pending beside it)."""
        return sorted(self.run_view(run_id).approvals.values(), key=lambda p: p.event_id, reverse=True)

    def action_policies(self) -> None:
        """The approval policies of the run on screen and its loop (all of the database's with no run on screen)."""
        from loopterm.tui.screens.policies import PoliciesScreen

        self.push_screen(PoliciesScreen(self.view.run_id if self.view is not None else None))

    def open_approval(self, run_id: str, *, deny: bool) -> None:
        pending = self.pending_approvals(run_id)
        if not pending:
            self.notify(f"nothing to {'deny' if deny else 'approve'}: no tool call of run {run_id[:8]} waits for "
                        "approval", severity="warning")
            return
        run = self.store.get_run(run_id)
        loop = self.loop_for(run)
        self.push_screen(ApprovalScreen(run_id, pending[0], deny=deny, validate=partial(_validate_args, loop) if loop else None,
                                        tools=[t.name for t in loop.tools] if loop else None),
                         callback=partial(self._answered, run_id))

    def _answered(self, run_id: str, command: Command | None) -> None:
        """An answer to what the run waits on: sent to the engine executing it; when nothing does, an engine
        starts here and takes it first (an answer queued for a run no one resumes would answer nothing)."""
        if command is None:
            return
        if self.executing(run_id):
            self.send(run_id, command)
        elif self.loop_for(self.store.get_run(run_id)) is not None:
            self.resume_here(run_id, first=command)
        else:
            self.send(run_id, command)
            self.notify(f"run {run_id[:8]}: its loop does not load here, so the answer waits in its control channel; "
                        "it applies when the run is next resumed", severity="warning", timeout=10)


    # -- escalations --------------------------------------------------------------

    def waiting_for(self, run_id: str) -> Waiting:
        """What the run waits on a person for (its log's fold), and whether an engine holds it meanwhile."""
        run = self.store.get_run(run_id)
        log = self.run_view(run_id)
        return Waiting.of(run, log, executing=run_id in self.engines or run_id in self._starting
                          or executing_elsewhere(run, log))

    def waiting_runs(self) -> list[Waiting]:
        """Every run in the database that waits on a person (an escalation, an approval, a side effect), whatever
        its status: one stopped or quit while it waited still waits."""
        return [self.waiting_for(run.id) for run in self.store.list_runs() if self.run_view(run.id).waiting]

    def action_inbox(self) -> None:
        self.push_screen(InboxScreen())




def _validate_state(loop: Loop, data: dict[str, Any]) -> str | None:
    try:
        loop.state.model_validate(data)
    except ValidationError as exc:
        return "; ".join(f"{json_path(err['loc']) or '(state)'}: {err['msg']}" for err in exc.errors()[:3])
    return None


def _validate_args(loop: Loop, tool_name: str, args: dict[str, Any]) -> str | None:
    tool = loop.tool(tool_name)
    if tool is None:
        return None
    try:
        tool.validate_args(args)
    except ValueError as exc:
        return str(exc)
    return None

