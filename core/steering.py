"""The take-commands phase: a person's commands from the control channel, each decided against the run's
view (refused, visibly, when the run has moved on), then consumed together with the events that record
what it did, in one commit, then adopted by the engine. A crash can neither lose a command nor apply
it twice."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from loopterm.core import runlog as log
from loopterm.core.control import (
    AddFact,
    Approve,
    Command,
    Deny,
    EditState,
    Pause,
    Relax,
    Restore,
    Resume,
    SetSubgoal,
    Step,
    Stop,
    parse_command,
)
from loopterm.core.decision import json_path
from loopterm.core.events import CommandApplied
from loopterm.core.secrets import redact_tree
from loopterm.core.state import LoopState
from loopterm.core.termination import Status

if TYPE_CHECKING:
    from loopterm.core.engine import Engine

ALREADY_ANSWERED = "that escalation was already answered (or superseded); nothing was changed"


@dataclass
class Effect:
    """What a command does: the events that record it (committed with its consumption), then what the
    engine adopts once they are on disk."""

    command: str
    ok: bool = True
    detail: str = ""
    events: list[tuple[log.RunEvent, int | None]] = field(default_factory=list)
    adopt: Callable[[], Any] | None = None
    status: tuple[Status, str] | None = None  # the run's status, once committed


class Steering:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def obey(self) -> None:
        """Each pending command: decided, consumed with what it did (one commit), adopted."""
        engine = self.engine
        for row in engine.journal.pending_commands(engine.run_id):
            try:
                command = parse_command(row.kind, redact_tree(row.payload))  # a person's input is redacted too
            except ValidationError as exc:
                err = exc.errors()[0]
                effect = self._refused(row.kind, f"{json_path(err['loc']) or row.kind}: {err['msg']}")
            else:
                effect = self.decide(command)
            for event, _ in effect.events:
                if isinstance(event, (log.CommandRejected, log.StateEdited)):
                    event.command_id = row.id
            engine.view.absorb(engine.journal.consume_command(row.id or 0, effect.events))
            if effect.adopt is not None:
                effect.adopt()
            if effect.status is not None:
                engine.publish_status(*effect.status)
            engine.emit(CommandApplied(run_id=engine.run_id, command=effect.command, ok=effect.ok, detail=effect.detail))

    def reject(self, kind: str, detail: str) -> None:
        """A person's answer taken, but part of it refused (say, edited arguments that do not fit)."""
        engine = self.engine
        engine.log(log.CommandRejected(command=kind, error=detail), engine.state.iteration)
        engine.emit(CommandApplied(run_id=engine.run_id, command=kind, ok=False, detail=detail))

    def _refused(self, kind: str, detail: str, *, stale: bool = False) -> Effect:
        rejected = log.CommandRejected(command=kind, error=detail, stale=stale)
        return Effect(kind, False, detail, [(rejected, self.engine.state.iteration)])

    def _status(self, effect: Effect, status: Status, message: str, at: int | None) -> None:
        effect.events.append((log.StatusChanged(status=status.value, message=message), at))
        effect.status = (status, message)

    def _stale(self, base: int | None) -> str | None:
        """Why a change based on iteration `base` is refused: the run has moved past it."""
        now = self.engine.state.iteration
        if base is None or base == now:
            return None
        return (f"the run moved from iteration {base} to {now} since this was made; nothing was changed: "
                "look at the current state and send it again")

    def decide(self, command: Command) -> Effect:  # noqa: C901 - one case per command
        """What a command does, against the run as it is now; a refusal changes nothing and says why."""
        engine = self.engine
        n = engine.state.iteration
        effect = Effect(command.kind)
        pending = engine.view.escalation
        if isinstance(command, Pause):
            self._status(effect, Status.PAUSED, "paused by a person", n)
            effect.adopt = lambda: engine.set_flags(paused=True, stepping=False)
        elif isinstance(command, (Resume, Step)):
            if isinstance(command, Resume) and command.escalation is not None:
                if pending is None or pending.event_id != command.escalation:
                    return self._refused(command.kind, ALREADY_ANSWERED, stale=True)
                # The run's, not the escalated iteration's: that iteration was over (and its trace span sent).
                effect.events.append((log.EscalationAnswered(escalation=pending.event_id, answer="resume"), None))
            elif pending is not None:
                return self._refused(command.kind, f"the run waits on a person's answer to its escalation at "
                                     f"iteration {pending.iteration}: answer it from the inbox (x)")
            stepping = isinstance(command, Step)
            at = None if effect.events else n  # beside the answer to an escalation, when it is one
            if stepping:
                self._status(effect, Status.STEPPING, "one iteration, then pause", at)
            else:
                self._status(effect, Status.RUNNING, "", at)
            effect.adopt = lambda: engine.set_flags(paused=False, stepping=stepping)
        elif isinstance(command, Stop):
            if command.escalation is not None:
                if pending is None or pending.event_id != command.escalation:
                    return self._refused(command.kind, ALREADY_ANSWERED, stale=True)
                effect.events.append((log.EscalationAnswered(escalation=pending.event_id, answer="stop",
                                                             reason=command.reason), None))
            effect.adopt = lambda: engine.request_stop(command.reason)
        elif isinstance(command, EditState):
            stale = self._stale(command.base_iteration)
            if stale is None and command.base_version not in (None, engine.view.state_version(n)):
                stale = "the state was changed by someone else since this was made; nothing was changed: look again"
            if stale:
                return self._refused(command.kind, stale, stale=True)
            try:
                # The iteration and the schema version are the engine's: an edit cannot move them (a state
                # claiming another schema version could never be loaded again).
                edited = engine.loop.state.model_validate({**command.state, "iteration": n,
                                                           "schema_version": engine.state.schema_version})
            except ValidationError as exc:
                err = exc.errors()[0]
                return self._refused(command.kind, f"{json_path(err['loc']) or 'state'}: {err['msg']}")
            self._patch(effect, edited, log.StateEdited(reason=command.reason))
        elif isinstance(command, Relax):
            if engine.loop.invariants and command.invariant not in {i.name for i in engine.loop.invariants}:
                return self._refused(command.kind, f"no invariant {command.invariant!r}")
            until = n + command.iterations if command.iterations else None
            effect.events.append((log.InvariantRelaxed(invariant=command.invariant, reason=command.reason,
                                                       until=until), n))
        elif isinstance(command, Restore):
            effect.events.append((log.InvariantRestored(invariant=command.invariant, reason=command.reason), n))
        elif isinstance(command, AddFact):
            if stale := self._stale(command.base_iteration):
                return self._refused(command.kind, stale, stale=True)
            memory = engine.state.memory.model_copy(update={"facts": [*engine.state.memory.facts, command.fact]})
            self._patch(effect, engine.state.model_copy(update={"memory": memory}), log.FactAdded(fact=command.fact))
        elif isinstance(command, SetSubgoal):
            if stale := self._stale(command.base_iteration):
                return self._refused(command.kind, stale, stale=True)
            memory = engine.state.memory.model_copy(update={"subgoal": command.subgoal})
            self._patch(effect, engine.state.model_copy(update={"memory": memory}),
                        log.SubgoalSet(subgoal=command.subgoal))
        elif isinstance(command, (Approve, Deny)):
            if command.key not in engine.view.approvals:
                answered = command.key in engine.view.answers
                return self._refused(command.kind, "that call was already answered; nothing was changed" if answered
                                     else "no call waits for that answer (the run has moved on); nothing was changed",
                                     stale=True)
            event: log.RunEvent = (log.Approved(key=command.key, args=command.args, reason=command.reason,
                                                tool=command.tool)
                                   if isinstance(command, Approve) else log.Denied(key=command.key, reason=command.reason))
            if command.policy is not None:
                made = self._policy(command)
                if isinstance(made, str):
                    return self._refused(command.kind, made)
                effect.events.append((made, n + 1))  # made with the answer, in its commit
            effect.events.append((event, n + 1))
        return effect

    def _policy(self, command: Approve | Deny) -> log.PolicyAdded | str:
        """The approval policy a person made with their answer (core/approval_policy.py), or why it is refused
        (the answer is refused with it: nothing half-applied)."""
        engine = self.engine
        rule = command.policy
        assert rule is not None
        if engine.shadow:
            return "a shadow run asks about every call: it takes no approval policy; nothing was changed"
        if rule.effect != command.kind:
            return f"a policy made with a {command.kind} must {command.kind}, not {rule.effect}; nothing was changed"
        return log.PolicyAdded(policy=f"p{uuid.uuid4().hex[:7]}", effect=rule.effect, scope=rule.scope, tool=rule.tool,
                               globs=rule.globs, reason=rule.reason or command.reason,
                               loop_ref=engine.run_record.loop_ref)

    def _patch(self, effect: Effect, state: LoopState, event: log.StateEdited | log.FactAdded | log.SubgoalSet) -> None:
        """A person's change to the state; the event holds the result, so a restart keeps it."""
        event.patched_state = state.model_dump(mode="json")
        effect.events.append((event, state.iteration))
        effect.adopt = lambda: setattr(self.engine, "state", state)
