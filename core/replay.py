"""Replay: drive a loop (its current definition) with the model outputs recorded in an earlier run.

The regression harness for loop changes: edit a prompt or an invariant, replay
yesterday's runs, see the first iteration where they change.

- The ``replay/<run_id>`` model, registered with litellm as a custom provider
  at a zero price (the machinery of ``scripted/``, see ``register_custom_model``),
  answers call k of iteration n with the k-th reply the recording got for that
  iteration: the bad replies its repair attempts carried, then the recorded
  raw response. It first checks that it is sent the conversation the recording
  sent; when the loop's prompt, invariants or rules changed it refuses with a
  permanent error instead of inventing an answer.
- ``RecordedCalls`` answers the replay's tool calls from the recording when the
  tool and arguments match, so with ``replaying=True`` side-effecting tools
  (policy ask / reuse) are never fired; tools whose effects are confined to the
  run's workspace (policy reexecute) run again in the replay's fresh workspace.
- The replay is a run of its own (origin "replay", parent = the recording,
  fork_iteration 0). A recording that was resumed, or is a branch, started
  fresh engines along the way (a fork's patches and relaxed invariants, a
  raised iteration cap); the replay starts fresh engines at the same
  iterations with the same settings. A person's interventions (relax, restore,
  edit the state, add a fact, set the subgoal, approve, deny) are sent to the
  replay through the control channel, due where the recording obeyed them.
- ``compare`` walks the two runs iteration by iteration (decision, gate results,
  invariant status, then length) and reports the first divergence.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel

from loopterm.core import runlog as log
from loopterm.core.agent_spec import AgentSpec
from loopterm.core.control import Approve, Command, Deny, EditState, Restore, Resume, command_payload
from loopterm.core.divergence import Divergence, compare
from loopterm.core.engine import Engine
from loopterm.core.errors import ConfigError
from loopterm.core.events import EngineEvent, IterationCommitted
from loopterm.core.fold import fold
from loopterm.core.fork import apply_set
from loopterm.core.loop import Loop
from loopterm.core.persistence import Journal
from loopterm.core.recording import PROVIDER, RecordedCalls, Recording, guarded, register_recording
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.shadow import mark_shadow
from loopterm.core.termination import Status
from loopterm.core.tools import idempotency_key


class History(Journal, Protocol):
    """What a replay reads and writes; `loopterm.store.Store` implements it."""

    def lineage(self, run_id: str) -> list[RunRecord]: ...

    def iterations(self, run_id: str) -> list[IterationRecord]: ...

    def add_command(self, run_id: str, kind: str, payload: dict[str, Any]) -> Any: ...


# ----------------------------------------------------------------------------- sessions and interventions


@dataclass
class Session:
    """A fresh engine the recording started after ``after`` iterations (first start, a resume, a fork)."""

    after: int
    max_iterations: int
    relaxed: set[str]  # the invariants that engine started with relaxed
    patches: list[tuple[list[Any], Any]] = field(default_factory=list)  # a fork's --set patches
    why: str = "start"


@dataclass
class Intervention:
    """A command to send the replay before iteration ``due + 1``, as a person sent it to the recording."""

    due: int
    command: Command


def _segments(lineage: list[RunRecord], last: int) -> list[tuple[RunRecord, int, int]]:
    """Each run of the lineage with the iterations (start, end] the recording took from it."""
    out = []
    for i, run in enumerate(lineage):
        start = 0 if i == 0 else int(run.fork_iteration or 0)
        end = int(lineage[i + 1].fork_iteration or 0) if i + 1 < len(lineage) else last
        out.append((run, start, end))
    return out


def plan_sessions(history: History, lineage: list[RunRecord], recorded: list[IterationRecord]) -> list[Session]:
    """Where the recording started a fresh engine (first run, each resume, each fork) and with what settings."""
    last = recorded[-1].n if recorded else 0
    by_after: dict[int, Session] = {}
    for i, (run, start, end) in enumerate(_segments(lineage, last)):
        own = [it for it in recorded if it.run_id == run.id]
        view = fold(history.events(run.id))
        changes = view.max_iterations_changes
        initial_max = changes[0].before if changes and changes[0].before is not None else run.max_iterations
        for started in view.sessions:
            after = max([start] + [it.n for it in own if it.ended_at <= started.event.ts])
            if after >= end:
                continue  # nothing recorded came out of this session
            at_fork = i > 0 and after == start
            patches: list[tuple[list[Any], Any]] = []
            if at_fork and view.forked is not None:
                patches = [(list(p["path"]), p["value"]) for p in view.forked.patches]
            why = f"fork of run {run.parent_run} at {start}" if at_fork else (
                "start" if after == 0 else f"resume after {after}")
            maximum = started.max_iterations if started.max_iterations is not None else initial_max
            by_after[after] = Session(after, maximum, set(started.relaxed), patches, why)
    if 0 not in by_after:
        by_after[0] = Session(0, lineage[0].max_iterations, set(), [], "start")
    return [by_after[k] for k in sorted(by_after)]


def plan_interventions(
    history: History, lineage: list[RunRecord], recorded: list[IterationRecord], replay_run_id: str
) -> list[Intervention]:
    """A person's commands to the recording (relax, restore, edit the state, add a fact, set the subgoal,
    approve, deny), each due where the recording obeyed it; approvals re-keyed for the replay run."""
    last = recorded[-1].n if recorded else 0
    out: list[Intervention] = []
    for run, start, end in _segments(lineage, last):
        view = fold(history.events(run.id))
        for record, command in view.person_inputs:
            if record.iteration is None:
                continue
            answer = isinstance(command, (Approve, Deny))
            due = record.iteration - 1 if answer else record.iteration
            if not start <= due < end:
                continue  # obeyed outside the part of this run the recording is made of
            if isinstance(command, (Approve, Deny)):
                asked = view.asked.get(command.key)
                if asked is None:
                    continue  # an answer to nothing the recording asked: nothing to repeat
                n, question = asked
                command = command.model_copy(update={"key": idempotency_key(replay_run_id, n, question.tool,
                                                                             question.args)})
            elif isinstance(command, EditState):
                command = command.model_copy(update={"base_iteration": due, "base_version": None})
            out.append(Intervention(due, command))
    return out


# ----------------------------------------------------------------------------- the replay run


def create_replay_run(history: History, loop: Loop, recorded: RunRecord, *, run_id: str, workspace: Path) -> RunRecord:
    """Record the replay as a run (origin "replay", child of the recording at 0) with a fresh workspace."""
    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    if loop.workspace_files is not None:
        shutil.copytree(loop.workspace_files, workspace, dirs_exist_ok=True)
    if loop.setup is not None:  # prepared as the recorded run's was (Engine.create)
        loop.setup(workspace)
    now = time.time()
    run = RunRecord(
        id=run_id, loop=loop.name, loop_ref=recorded.loop_ref, goal=loop.goal, spec_hash=loop.spec_hash(),
        model=f"{PROVIDER}/{recorded.id}", status=Status.CREATED.value, workspace=str(workspace), created_at=now,
        updated_at=now, parent_run=recorded.id, fork_iteration=0, origin="replay",
        max_iterations=recorded.max_iterations, budget=dict(recorded.budget),
    )
    history.create_run(run)
    history.append_event(run_id, log.RunCreated(loop_ref=run.loop_ref, model=run.model, budget=run.budget))
    history.append_event(run_id, log.ReplayOf(run=recorded.id, recorded_spec_hash=recorded.spec_hash,
                                              spec_hash=run.spec_hash))
    history.append_event(recorded.id, log.Replayed(replay_run=run_id))
    return run


class ReplayReport(BaseModel):
    run: str
    replay_run: str
    identical: bool
    iterations_compared: int
    divergence: Divergence | None = None
    loop_changed: bool = False  # the loop's spec hash differs from the recording's

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "replay_run": self.replay_run, "identical": self.identical,
            "iterations_compared": self.iterations_compared,
            "divergence": self.divergence.model_dump() if self.divergence else None,
        }


async def replay(
    history: History,
    loop: Loop,
    recorded_run: RunRecord,
    *,
    run_id: str,
    workspace: Path,
    subscribers: list[Callable[[EngineEvent], None]] | None = None,
    workdir: Path | None = None,
) -> ReplayReport:
    """Replay `recorded_run` (its whole lineage) as a new run and compare the two."""
    lineage = history.lineage(recorded_run.id)
    recorded = history.iterations(recorded_run.id)
    if not recorded:
        raise ConfigError(f"run {recorded_run.id} has no committed iteration to replay")
    by_n = {it.n: it for it in recorded}
    last = recorded[-1].n
    sessions = {s.after: s for s in plan_sessions(history, lineage, recorded)}
    run = create_replay_run(history, loop, recorded_run, run_id=run_id, workspace=workspace)
    if fold(history.events(recorded_run.id)).shadow:  # replayed as it ran: proposals judged, nothing executed
        mark_shadow(history, run.id, why=f"replay of shadow run {recorded_run.id}")
    interventions = plan_interventions(history, lineage, recorded, run.id)
    recording = Recording(recorded_run.id, by_n, {r.workspace for r in lineage} | {run.workspace})
    register_recording(recording)
    replay_loop = guarded(loop)
    if loop.agent is not None:  # the agent answers from the journal, not from its model (core/acp_replay.py)
        replay_loop = replay_loop.model_copy(update={"agent": recorded_agent(history, loop, recorded_run, run, last)})
    prior = RecordedCalls(by_n)
    boundaries = {k for k in sessions if 0 < k < last}

    # The recording's answers to approvals are given before the question, as the recording had them.
    answers = {i.command.key: i.command for i in interventions if isinstance(i.command, (Approve, Deny))}

    def send(due: int) -> None:
        for item in interventions:
            if item.due == due and not isinstance(item.command, (Approve, Deny)):
                history.add_command(run.id, *command_payload(item.command))

    session = sessions[0]
    previous: Engine | None = None
    send(0)
    while True:
        engine = Engine(replay_loop, history, history.get_run(run.id), prior=prior, replaying=True,
                        subscribers=list(subscribers or []), workdir=workdir)
        engine.preanswered.update(answers)
        if previous is not None:
            # The recording went on in place (a person resumed the escalated engine): so does the replay.
            engine.strategy_note, engine.temperature = previous.strategy_note, previous.temperature
            engine.max_iterations = previous.max_iterations
        else:
            _start_session(engine, session, history, run.id)
        engine.subscribe(_at_commit(engine, boundaries, send))
        await engine.run()
        done = engine.state.iteration
        if done >= last:
            break
        if done in sessions and done != session.after:
            session, previous = sessions[done], None  # the recording started a fresh engine here too
        elif _escalated_in_place(history.get_run(run.id), by_n.get(done)):
            previous = engine  # and answered the way a person answered the recording's: go on
            pending = fold(history.events(run.id)).escalation
            if pending is not None:
                history.add_command(run.id, *command_payload(Resume(escalation=pending.event_id)))
        else:
            break  # the replay ended where the recording did not: compare says how

    for problem in recording.problems:
        if problem.kind == "repair":  # say why the recorded reply was rejected
            rejected = fold(history.events(run.id)).invalid_replies.get(problem.iteration)
            if rejected:
                problem.replayed = f"rejected: {rejected[-1].error}"
    final = history.get_run(run.id)
    divergence, compared = compare(recorded_run, recorded, final, history.iterations(run.id), recording)
    return ReplayReport(
        run=recorded_run.id, replay_run=run.id, identical=divergence is None, iterations_compared=compared,
        divergence=divergence, loop_changed=loop.spec_hash() != recorded_run.spec_hash,
    )


def recorded_agent(history: History, loop: Loop, recorded: RunRecord, run: RunRecord, last: int) -> AgentSpec:
    """The recorded agent for a replay of an agent loop: the recording's turns (its lineage's), by iteration."""
    from loopterm.core.acp_replay import write_turns
    from loopterm.core.agent_fork import lineage_turns

    assert loop.agent is not None
    turns = {n: turn for n, (_, turn) in lineage_turns(history, recorded.id, last).items()}
    path = write_turns(Path(run.workspace).parent / f"{run.id}.recorded-agent.json", turns)
    command = [sys.executable, "-m", "loopterm.core.acp_replay", str(path)]
    return loop.agent.model_copy(update={"name": "recorded", "command": command, "env": {}, "env_from": [],
                                         "use_fork": False})


def _start_session(engine: Engine, session: Session, history: History, run_id: str) -> None:
    """Give a fresh replay engine the settings the recording's engine started with at this point."""
    engine.max_iterations = session.max_iterations
    if session.after:
        history.append_event(run_id, log.ReplaySession(
            after=session.after, why=session.why, max_iterations=session.max_iterations,
            patches=[{"path": p, "value": v} for p, v in session.patches],
        ), session.after)
    for name in sorted(set(engine.relaxed) - session.relaxed):  # a branch does not inherit its parent's
        history.add_command(run_id, *command_payload(Restore(invariant=name, reason=f"replay: {session.why}")))
    if session.patches:
        data = engine.state.model_dump(mode="json")
        for path, value in session.patches:
            apply_set(data, path, value)
        data["termination_reason"] = None
        history.add_command(run_id, *command_payload(EditState(
            state=data, reason=f"replay: the patches of the {session.why}", base_iteration=engine.state.iteration,
            base_version=None)))


def _escalated_in_place(run: RunRecord, recorded: IterationRecord | None) -> bool:
    """The replay stopped on an escalation the recording also made, and the recording went on."""
    return (run.termination_reason == "waiting_on_person" and recorded is not None
            and "escalate" in recorded.remediations)


def _at_commit(engine: Engine, boundaries: set[int], send: Callable[[int], None]) -> Callable[[EngineEvent], None]:
    """After iteration k: queue the person's commands due at k; end the session where the recording did."""

    def on_event(event: EngineEvent) -> None:
        if isinstance(event, IterationCommitted):
            n = event.record.n
            send(n)
            if n in boundaries:
                engine.request_stop(f"replay: the recording started a new session after iteration {n}")

    return on_event


