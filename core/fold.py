"""The one fold: a run's log (core/runlog.py) into what it means now.

`fold(events)` (or `view.absorb(more)` as a log grows) gives a `RunView`: what waits on a person,
the relaxations in force, the strategy, a person's patch to the state, whether an engine holds the
run, and the person's inputs as commands (for replay). The engine, the TUI, `watch`, `show`,
replay, telemetry, shadow mode, the daemon and resume all read a run through it; nothing else
interprets an event's kind. It is pure: no I/O, no clock.

What waits on a person (an escalation, an approval, a side effect that may not be repeated) stays
pending until a person answers it, whatever else is recorded: an engine's end, a stop, a resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from loopterm.core.approval_policy import Policy, PolicyRule
from loopterm.core.control import AddFact, Approve, Command, Deny, EditState, Relax, Restore, SetSubgoal
from loopterm.core.acp_turn import PERMISSION_TOOL, AgentTurn
from loopterm.core.runlog import (
    AgentTurnRecorded,
    ApprovalPending,
    Approved,
    ChildStarted,
    CommandRejected,
    DaemonInterrupted,
    Denied,
    EscalationAnswered,
    Escalated,
    EventRecord,
    FactAdded,
    Forked,
    InvalidReply,
    InvariantRelaxed,
    InvariantRestored,
    MaxIterationsChanged,
    PolicyAdded,
    PolicyDecided,
    PolicyRevoked,
    RunCreated,
    RunFinished,
    RunResumed,
    RunStarted,
    ShadowMode,
    ShadowVerdict,
    SideEffectAnswered,
    SideEffectPending,
    StateEdited,
    StatusChanged,
    StrategyChanged,
    SubgoalSet,
    TriggerFired,
)

PATCHES = (StateEdited, FactAdded, SubgoalSet, Forked)  # events that carry the state a person made


@dataclass(frozen=True)
class Patch:
    """A state a person (or a fork) made at `iteration`: the next iteration starts from it."""

    iteration: int
    event_id: int
    state: dict[str, Any]


@dataclass(frozen=True)
class ForkPoint:
    """Where a branch left its parent and what a person changed there (the Diff tab shows it at the fork)."""

    parent: str
    at: int
    reason: str
    patches: tuple[tuple[str, Any], ...]  # (dotted path, value), as typed
    relaxed: dict[str, str]  # invariant -> why
    state: dict[str, Any] | None  # the patched state the branch starts from; None: unpatched


@dataclass(frozen=True)
class PendingEscalation:
    event_id: int
    iteration: int
    packet: Escalated


@dataclass(frozen=True)
class PendingApproval:
    event_id: int
    iteration: int
    asked: ApprovalPending


@dataclass(frozen=True)
class PendingSideEffect:
    iteration: int
    asked: SideEffectPending
    event_id: int = 0


Pending = PendingEscalation | PendingApproval | PendingSideEffect


@dataclass(frozen=True)
class Session:
    """An engine's start (or resume) of the run, with the settings in force at that moment."""

    event: EventRecord
    resumed: bool
    max_iterations: int | None  # None: the run's own, unchanged since it was created
    relaxed: frozenset[str]


@dataclass
class RunView:
    """What a run's log says now. Built by `fold`; read-only for everyone else."""

    last_id: int = 0
    created: RunCreated | None = None
    started_before: bool = False
    open_start: EventRecord | None = None  # an engine's start with no end after it
    status: str | None = None  # the last status an engine recorded (running, paused, stopped, ...)
    finished: RunFinished | None = None  # the last end an engine recorded
    shadow: bool = False
    forked: Forked | None = None
    trigger: TriggerFired | None = None
    daemon_interrupted: bool = False  # the daemon's shutdown stopped it and no engine started it since
    relaxed: dict[str, str] = field(default_factory=dict)  # name -> reason
    relax_until: dict[str, int] = field(default_factory=dict)  # name -> the iteration it expires at
    strategy: str | None = None
    strategy_changes: list[tuple[int, StrategyChanged]] = field(default_factory=list)  # (applies from, event)
    patch: Patch | None = None  # the last state a person (or the fork) made
    escalation: PendingEscalation | None = None
    last_escalation: Escalated | None = None  # pending or answered: what the run last escalated with
    approvals: dict[str, PendingApproval] = field(default_factory=dict)  # unanswered, by key
    asked: dict[str, tuple[int, ApprovalPending]] = field(default_factory=dict)  # every approval asked, by key
    answers: dict[str, Approve | Deny] = field(default_factory=dict)  # every approval answered, by key
    side_effect: PendingSideEffect | None = None
    children: dict[str, str] = field(default_factory=dict)  # a child's key -> its run id
    verdicts: dict[str, tuple[int | None, ShadowVerdict]] = field(default_factory=dict)  # shadow mode, by key
    invalid_replies: dict[int, list[InvalidReply]] = field(default_factory=dict)
    max_iterations_changes: list[MaxIterationsChanged] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    person_inputs: list[tuple[EventRecord, Command]] = field(default_factory=list)  # in the order obeyed
    relax_log: list[tuple[float, str, bool]] = field(default_factory=list)  # (ts, invariant, relaxed?)
    typed: bool = False  # the last engine wrote the typed log (answers name what they answer)
    policies: dict[str, Policy] = field(default_factory=dict)  # approval policies made in this run, by id
    decided_by: dict[str, str] = field(default_factory=dict)  # an approval's key -> the policy that answered it
    agent_turns: dict[int, AgentTurn] = field(default_factory=dict)  # an ACP agent's turn, by iteration

    # -- what follows from it --------------------------------------------------------------------------------

    @property
    def lifecycle_open(self) -> bool:
        """Started and not finished since: some engine holds the run (or held it when it died)."""
        return self.open_start is not None

    @property
    def waiting(self) -> bool:
        """Something waits on a person's answer."""
        return self.escalation is not None or bool(self.approvals) or self.side_effect is not None

    @property
    def fork_point(self) -> ForkPoint | None:
        """This run's fork from its parent, with the patches and relaxations made there (None: not a branch)."""
        e = self.forked
        if e is None:
            return None
        patches = tuple((".".join(str(p) for p in patch.get("path") or []), patch.get("value"))
                        for patch in e.patches)
        return ForkPoint(parent=e.parent, at=e.at, reason=e.reason, patches=patches, relaxed=dict(e.relaxed),
                         state=e.patched_state)

    @property
    def waiting_now(self) -> Pending | None:
        """What the run waits on now: the last thing asked that no one answered (an older question can stay
        pending beside it, say an approval asked before a restart that the model did not ask again)."""
        pending: list[Pending] = [*self.approvals.values()]
        if self.escalation is not None:
            pending.append(self.escalation)
        if self.side_effect is not None:
            pending.append(self.side_effect)
        return max(pending, key=lambda p: p.event_id, default=None)

    def state_after(self, iteration: int) -> dict[str, Any] | None:
        """A person's patch the next iteration starts from, if one was made after `iteration` committed
        (None: it starts from iteration `iteration`'s own state)."""
        if self.patch is not None and self.patch.iteration == iteration:
            return self.patch.state
        return None

    def state_version(self, iteration: int) -> int:
        """The patch event a state edit based on `iteration` saw (0: none): a later patch makes it stale."""
        return self.patch.event_id if self.patch is not None and self.patch.iteration == iteration else 0

    def relaxed_at(self, ts: float) -> set[str]:
        """The invariants relaxed at moment `ts` (telemetry: what an iteration started under)."""
        names: set[str] = set()
        for when, name, relaxed in self.relax_log:
            if when > ts:
                break
            if relaxed:
                names.add(name)
            else:
                names.discard(name)
        return names

    def model_at(self, n: int) -> str | None:
        """The model iteration n was asked with: the run's first, or a strategy's from then on."""
        model = self.created.model if self.created is not None and self.created.model else None
        for at, change in self.strategy_changes:
            if at <= n and change.model:
                model = change.model
        return model

    def temperature_at(self, n: int, default: float | None) -> float | None:
        temperature = default
        for at, change in self.strategy_changes:
            if at <= n and change.temperature is not None:
                temperature = change.temperature
        return temperature

    # -- the fold --------------------------------------------------------------------------------------------

    def absorb(self, records: Iterable[EventRecord]) -> list[EventRecord]:
        """Fold more of the log in (ids increasing); returns them."""
        seen = []
        for rec in records:
            self._one(rec)
            seen.append(rec)
        return seen

    def _one(self, rec: EventRecord) -> None:  # noqa: C901 - one case per kind of event, by design
        self.last_id = max(self.last_id, rec.id or 0)
        e, n = rec.event, rec.iteration
        if isinstance(e, RunCreated):
            self.created = self.created or e
        elif isinstance(e, (RunStarted, RunResumed)):
            self.typed = e.v >= 2
            if isinstance(e, RunResumed) and not self.typed:
                self.escalation = None  # before the typed log, resuming a run was how a person answered it
            self.started_before = True
            self.open_start = rec
            self.daemon_interrupted = False
            maximum = self.max_iterations_changes[-1].to if self.max_iterations_changes else None
            self.sessions.append(Session(rec, isinstance(e, RunResumed), maximum, frozenset(self.relaxed)))
        elif isinstance(e, RunFinished):
            self.open_start = None
            self.finished = e
            self.status = e.status or self.status
        elif isinstance(e, StatusChanged):
            self.status = e.status
            if e.status == "running" and self.escalation is not None and not self.typed:
                self.escalation = None  # an engine went on past it: answered (how logs before the typed log said so)
        elif isinstance(e, EscalationAnswered):
            if self.escalation is not None and self.escalation.event_id == e.escalation:
                self.escalation = None
        elif isinstance(e, Escalated):
            self.escalation = PendingEscalation(rec.id or 0, n or e.iteration, e)
            self.last_escalation = e
        elif isinstance(e, ApprovalPending):
            self.approvals[e.key] = PendingApproval(rec.id or 0, n or 0, e)
            self.asked[e.key] = (n or 0, e)
        elif isinstance(e, (Approved, Denied)):
            self.approvals.pop(e.key, None)
            answer: Approve | Deny = (Approve(key=e.key, args=e.args, reason=e.reason, tool=e.tool)
                                      if isinstance(e, Approved) else Deny(key=e.key, reason=e.reason))
            self.answers[e.key] = answer
            self.person_inputs.append((rec, answer))
        elif isinstance(e, PolicyDecided):
            # A person's answer given in advance: answered like one (replay repeats it), naming the policy.
            self.approvals.pop(e.key, None)
            self.asked.setdefault(e.key, (n or 0, ApprovalPending(key=e.key, tool=e.tool, args=e.args)))
            decided: Approve | Deny = (Approve(key=e.key, reason=e.reason) if e.effect == "approve"
                                       else Deny(key=e.key, reason=e.reason))
            self.answers[e.key] = decided
            self.decided_by[e.key] = e.policy
            self.person_inputs.append((rec, decided))
            _policy_event(self.policies, rec)
        elif isinstance(e, (PolicyAdded, PolicyRevoked)):
            _policy_event(self.policies, rec)
        elif isinstance(e, SideEffectPending):
            self.side_effect = PendingSideEffect(n or 0, e, rec.id or 0)
        elif isinstance(e, SideEffectAnswered):
            if self.side_effect is not None and self.side_effect.asked.key == e.key:
                self.side_effect = None
        elif isinstance(e, InvariantRelaxed):
            self.relaxed[e.invariant] = e.reason
            self.relax_until.pop(e.invariant, None)
            if e.until is not None:
                self.relax_until[e.invariant] = e.until
            self.relax_log.append((rec.ts, e.invariant, True))
            iterations = (e.until - n) if e.until is not None and n is not None else None
            self.person_inputs.append((rec, Relax(invariant=e.invariant, reason=e.reason or "relaxed",
                                                  iterations=iterations if iterations and iterations > 0 else None)))
        elif isinstance(e, InvariantRestored):
            self.relaxed.pop(e.invariant, None)
            self.relax_until.pop(e.invariant, None)
            self.relax_log.append((rec.ts, e.invariant, False))
            self.person_inputs.append((rec, Restore(invariant=e.invariant, reason=e.reason)))
        elif isinstance(e, StrategyChanged):
            self.strategy = e.to
            self.strategy_changes.append(((n or 0) + 1, e))  # recorded at iteration k, it applies from k + 1
        elif isinstance(e, ShadowMode):
            self.shadow = True
        elif isinstance(e, ShadowVerdict):
            self.verdicts.pop(e.key, None)  # recorded twice (an iteration redone after a crash): the last counts
            self.verdicts[e.key] = (n, e)
        elif isinstance(e, ChildStarted):
            self.children.setdefault(e.key, e.run_id)
        elif isinstance(e, TriggerFired):
            self.trigger = self.trigger or e
        elif isinstance(e, DaemonInterrupted):
            self.daemon_interrupted = True
        elif isinstance(e, MaxIterationsChanged):
            self.max_iterations_changes.append(e)
        elif isinstance(e, AgentTurnRecorded) and n is not None:
            self.agent_turns[n] = e.turn  # recorded again (an iteration redone after a crash): the last counts
        elif isinstance(e, InvalidReply) and n is not None:
            self.invalid_replies.setdefault(n, []).append(e)
        if isinstance(e, Forked):
            self.forked = e
        if isinstance(e, PATCHES) and e.patched_state is not None:
            self.patch = Patch(n or 0, rec.id or 0, e.patched_state)
            if isinstance(e, StateEdited):
                self.person_inputs.append((rec, EditState(state=e.patched_state, reason=e.reason or "edited",
                                                          base_iteration=n or 0)))
            elif isinstance(e, FactAdded):
                self.person_inputs.append((rec, AddFact(fact=e.fact)))
            elif isinstance(e, SubgoalSet):
                self.person_inputs.append((rec, SetSubgoal(subgoal=e.subgoal)))


def _policy_event(book: dict[str, Policy], rec: EventRecord) -> None:
    """One approval policy event into `book` (by id): made, revoked, or a call it decided."""
    e = rec.event
    if isinstance(e, PolicyAdded):
        rule = PolicyRule(effect=e.effect, scope=e.scope, tool=e.tool, globs=e.globs, reason=e.reason)
        book.setdefault(e.policy, Policy(id=e.policy, rule=rule, run_id=rec.run_id, loop_ref=e.loop_ref,
                                         iteration=rec.iteration, ts=rec.ts))
    elif isinstance(e, PolicyRevoked) and e.policy in book and not book[e.policy].revoked:
        book[e.policy] = book[e.policy].model_copy(update={"revoked": True, "revoke_reason": e.reason,
                                                           "revoked_ts": rec.ts})
    elif isinstance(e, PolicyDecided) and e.policy in book:
        book[e.policy].decided.append((rec.run_id, rec.iteration or 0, e.tool))


def policy_book(records: Iterable[EventRecord]) -> dict[str, Policy]:
    """Approval policies from the logs of any runs (oldest event first), by id: what `loopterm policy list`,
    the policies screen and the engine's check of a call (store/policies.py finds the events) read."""
    book: dict[str, Policy] = {}
    for rec in records:
        _policy_event(book, rec)
    return book


def decision_lines(view: RunView) -> list[str]:
    """The calls of this run an approval policy answered, one line each (for `show` and the TUI)."""
    lines = []
    for key, policy in view.decided_by.items():
        n, asked = view.asked.get(key, (0, None))
        answer = view.answers.get(key)
        verb = "approved" if isinstance(answer, Approve) else "denied"
        tool = asked.tool if asked is not None else "?"
        lines.append(f"iteration {n}: {tool} {verb} by policy {policy}")
    return lines


def waiting_lines(view: RunView) -> list[str]:
    """What waits on a person, one line each (for `show`, the inbox, a headless run's end)."""
    lines = []
    if view.escalation is not None:
        summary = " ".join(view.escalation.packet.summary.split())[:200]
        lines.append(f"the escalation at iteration {view.escalation.iteration}: {summary}")
    for pending in view.approvals.values():
        what = "a proposal (shadow)" if pending.asked.shadow else "approval"
        lines.append(f"{what} of tool {pending.asked.tool} at iteration {pending.iteration}")
    if view.side_effect is not None:
        asked = view.side_effect.asked
        lines.append(f"whether to repeat side-effecting call {asked.tool} ({asked.why}) at iteration "
                     f"{view.side_effect.iteration}: resume with --side-effects reuse|reexecute")
    return lines


@dataclass(frozen=True)
class News:
    """An event a person watching the run should hear of as it arrives (the TUI shows it as a notification)."""

    text: str
    warning: bool


def news(record: EventRecord) -> News | None:
    """What a person should hear of this event as it arrives, if anything (untrusted text: show it literally)."""
    event = record.event
    if isinstance(event, Escalated):
        return News(f"waits on a person: {' '.join(event.summary.split())[:120]} (x)", True)
    if isinstance(event, ApprovalPending):
        if event.shadow:
            return News(f"proposes tool {event.tool} (shadow: nothing will run; a agree or edit, d deny)", True)
        if event.tool == PERMISSION_TOOL:
            return News(f"the agent asks permission: {' '.join(str(event.args.get('title', '')).split())[:80]} "
                        "(x shows the diff; a / d)", True)
        return News(f"tool {event.tool} needs approval (a / d)", True)
    if isinstance(event, StrategyChanged):
        return News(f"changed strategy to {event.to}: {' '.join(event.why.split())[:120]}", False)
    return None


@dataclass(frozen=True)
class Outcome:
    """What became of a command a person sent through the control channel: applied, or refused and why."""

    command_id: int | None
    command: str
    refused: str | None = None  # why, when it was refused
    stale: bool = False  # refused because the run moved on since the command was made


def outcome(record: EventRecord) -> Outcome | None:
    """The outcome this event records, if it records one the sender waits on (a refusal, an applied edit)."""
    event = record.event
    if isinstance(event, CommandRejected):
        return Outcome(event.command_id, event.command, event.error, event.stale)
    if isinstance(event, StateEdited):
        return Outcome(event.command_id, "edit_state")
    return None


def fold(records: Iterable[EventRecord]) -> RunView:
    """A run's whole log (oldest first) into its view."""
    view = RunView()
    view.absorb(records)
    return view
