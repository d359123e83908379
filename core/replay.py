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

import dataclasses
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from pydantic import BaseModel

from loopterm.core.engine import Engine, relaxed_from
from loopterm.core.errors import ConfigError
from loopterm.core.events import EngineEvent, IterationCommitted
from loopterm.core.fork import apply_set
from loopterm.core.loop import Loop
from loopterm.core.persistence import Journal
from loopterm.core.records import EventRecord, IterationRecord, RunRecord, ToolCallRecord
from loopterm.core.shadow import is_shadow, mark_shadow
from loopterm.core.termination import Status
from loopterm.core.tools import Tool, idempotency_key

if TYPE_CHECKING:
    from types import ModuleType

PROVIDER = "replay"

DivergenceKind = Literal["prompt", "decision", "gates", "invariants", "length"]

# Termination reasons the loop itself decides (a replay that is identical so far must reach them too).
_SELF_DETERMINED = frozenset({"converged", "stalled", "max_iterations"})
_SHORT = 100


class History(Journal, Protocol):
    """What a replay reads and writes; `loopterm.store.Store` implements it."""

    def lineage(self, run_id: str) -> list[RunRecord]: ...

    def iterations(self, run_id: str) -> list[IterationRecord]: ...

    def add_command(self, run_id: str, kind: str, payload: dict[str, Any]) -> Any: ...


# ----------------------------------------------------------------------------- the recording


@dataclass
class Problem:
    """A call the replay model refused, kept for the report."""

    iteration: int
    kind: Literal["prompt", "repair", "missing"]
    message: str
    recorded: str = ""
    replayed: str = ""
    where: str = ""


@dataclass
class Recording:
    """What the ``replay/<run_id>`` model answers from: the recorded iterations of a run's lineage."""

    run_id: str
    iterations: dict[int, IterationRecord]
    workspaces: set[str] = field(default_factory=set)  # masked in prompts: each run has its own
    problems: list[Problem] = field(default_factory=list)

    @property
    def model(self) -> str:
        return f"{PROVIDER}/{self.run_id}"

    def problem_at(self, n: int) -> Problem | None:
        return next((p for p in self.problems if p.iteration == n), None)

    def answer(self, messages: list[Any], n: int, call: int) -> str:
        """The recorded reply to call ``call`` of iteration ``n``; ReplayRefusal when there is none to give."""
        record = self.iterations.get(n)
        if record is None:
            last = max(self.iterations, default=0)
            raise self._refuse(Problem(n, "missing", f"replay: the recording has no iteration {n} (it ends at {last})"))
        prompt = list(record.prompt)
        turns = [i for i, m in enumerate(prompt) if m.get("role") == "assistant"]
        replies = [str(prompt[i].get("content") or "") for i in turns] + [record.raw_response]
        if call >= len(replies):
            raise self._refuse(Problem(
                n, "repair",
                f"replay: iteration {n} needs repair attempt {call}, which the recording does not have "
                "(the recorded reply is no longer accepted as a decision)",
                recorded=f"{len(replies) - 1} repair(s)", replayed=f"repair {call} needed",
            ))
        expected = prompt[: turns[call]] if call < len(turns) else prompt
        difference = self._difference(expected, list(messages))
        if difference is not None:
            where, recorded, replayed = difference
            raise self._refuse(Problem(
                n, "prompt",
                f"replay: the prompt of iteration {n} differs from the recording "
                f"(in the {where}: first difference near '{replayed}')",
                recorded=recorded, replayed=replayed, where=where,
            ))
        return replies[call]

    def _refuse(self, problem: Problem) -> "ReplayRefusal":
        with _lock:
            self.problems.append(problem)
        return ReplayRefusal(problem.message)

    def normalize(self, text: str) -> str:
        """Mask what differs between two identical runs: workspace paths, measured durations, terminal width."""
        for path in sorted(self.workspaces, key=len, reverse=True):
            if path:
                text = text.replace(path, "{workspace}")
        text = _VOLATILE.sub("<duration>", text)
        text = _RULER.sub(r"\1\1\1", text)  # separator lines sized to the terminal a gate ran in
        return _BLANKS.sub(" ", text)  # padding that depends on the terminal width (pytest's "[100%]")

    def _difference(self, expected: list[dict[str, Any]], sent: list[Any]) -> tuple[str, str, str] | None:
        """(which message, recorded excerpt, replayed excerpt) at the first difference; None when equal."""
        for i in range(max(len(expected), len(sent))):
            if i >= len(expected) or i >= len(sent):
                return (
                    "conversation",
                    f"{len(expected)} message(s)",
                    f"{len(sent)} message(s)",
                )
            want, got = expected[i], _as_dict(sent[i])
            where = _message_name(i, str(want.get("role", "")))
            if want.get("role") != got.get("role"):
                return where, f"role {want.get('role')}", f"role {got.get('role')}"
            a = self.normalize(_content(want.get("content")))
            b = self.normalize(_content(got.get("content")))
            if a != b:
                at = _first_difference(a, b)
                return where, _excerpt(a, at), _excerpt(b, at)
        return None


class ReplayRefusal(Exception):
    """The replay model will not answer (raised as a permanent provider error)."""


_VOLATILE = re.compile(r"\b\d+\.\d+\s?(?:s|ms|sec|seconds)\b|\(\d+:\d\d:\d\d\)")
_RULER = re.compile(r"([=\-_*~.])\1{3,}")
_BLANKS = re.compile(r"[ \t]{2,}")


def _as_dict(message: Any) -> dict[str, Any]:
    if isinstance(message, dict):
        return message
    dump = getattr(message, "model_dump", None)
    return dump() if callable(dump) else {"role": getattr(message, "role", None), "content": getattr(message, "content", None)}


def _content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return json.dumps(content, sort_keys=True, default=str)


def _message_name(index: int, role: str) -> str:
    if index == 0 and role == "system":
        return "system message"
    if index == 1 and role == "user":
        return "user message"
    return f"{role or 'unknown'} message {index + 1}"


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _excerpt(text: str, at: int, before: int = 15, after: int = 35) -> str:
    start = max(0, at - before)
    piece = text[start: at + after]
    piece = piece.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'")
    return ("…" if start else "") + piece + ("…" if at + after < len(text) else "")


_recordings: dict[str, Recording] = {}
_lock = threading.Lock()


def registered_recording(run_id: str) -> Recording | None:
    return _recordings.get(run_id)


def register_recording(recording: Recording) -> str:
    """Make ``replay/<run_id>`` answer from this recording (replacing an earlier one); returns the model string."""
    from loopterm.core.scripted import Price, register_custom_model

    with _lock:
        _recordings[recording.run_id] = recording
    register_custom_model(PROVIDER, recording.run_id, Price(), _handler_class)
    return recording.model


def _handler_class(litellm: ModuleType) -> type:
    """The litellm handler of ``replay/<run_id>`` calls (built on the scripted provider's base)."""
    from litellm.llms.custom_llm import CustomLLMError

    from loopterm.core.scripted import Step, step_handler_class

    class ReplayLLM(step_handler_class(litellm)):  # type: ignore[misc]
        """Answers with the recorded replies; refuses (400, never retried) when the prompt changed."""

        provider = PROVIDER

        def plan(self, model: str, messages: list[Any], iteration: int, call: int) -> Any:
            recording = _recordings.get(model)
            if recording is None:
                raise litellm.NotFoundError(
                    message=f"no recording registered for {PROVIDER}/{model}; `loopterm replay RUN` registers it",
                    model=model, llm_provider=PROVIDER,
                )
            try:
                return Step(content=recording.answer(messages, iteration, call))
            except ReplayRefusal as exc:
                # A 400 as it is (not through self.error, which would read "context window"
                # in a prompt excerpt as a context-window error): permanent, not retried.
                raise CustomLLMError(status_code=400, message=str(exc)) from None

    return ReplayLLM


class RecordedCalls:
    """The recording's tool calls, for the replay's executor: same iteration, same tool, same arguments."""

    def __init__(self, iterations: dict[int, IterationRecord]) -> None:
        self.iterations = iterations

    def find(self, tool: str, args: dict[str, Any], iteration: int) -> ToolCallRecord | None:
        record = self.iterations.get(iteration)
        call = record.tool_call if record is not None else None
        if record is None or not call or record.tool_result is None or call.get("tool") != tool:
            return None
        if _canonical(call.get("args") or {}) != _canonical(args):
            return None
        return ToolCallRecord(
            key=str(call.get("key") or ""), run_id=record.run_id, iteration=iteration, tool=tool, args=args,
            status="done", result=record.tool_result, started_at=record.started_at, finished_at=record.ended_at,
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def guarded(loop: Loop) -> Loop:
    """The loop with its side-effecting, non-re-executable tools unable to fire.

    The executor answers them from the recording when the call matches; a call
    the recording does not have (the arguments changed) gets an error result
    instead of touching the world.
    """
    tools: list[Tool] = []
    for t in loop.tools:
        if t.side_effects and t.rewind_policy != "reexecute":
            t = dataclasses.replace(t, fn=_refuser(t.name), wants_context=False)
        tools.append(t)
    return loop.model_copy(update={"tools": tools})


def _refuser(name: str) -> Callable[..., Any]:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(
            f"replay: {name} was not fired; the recording has no call of it with these arguments at this iteration"
        )

    return refuse


# ----------------------------------------------------------------------------- sessions and interventions


@dataclass
class Session:
    """A fresh engine the recording started after ``after`` iterations (first start, a resume, a fork)."""

    after: int
    max_iterations: int
    relaxed: set[str]  # the invariants that engine started with relaxed
    patches: list[tuple[list[Any], Any]] = field(default_factory=list)  # a fork's --set patches
    why: str = "start"


# A person's interventions as the engine records them; each is repeated with the command that made it.
_INTERVENTIONS = frozenset({
    "invariant_relaxed", "invariant_restored", "state_edited", "fact_added", "subgoal_set", "approved", "denied",
})


@dataclass
class Intervention:
    """A command to send the replay before iteration ``due + 1``, as a person sent it to the recording."""

    due: int
    kind: str
    payload: dict[str, Any]


def _relaxed_names(events: list[EventRecord]) -> set[str]:
    found: Any = relaxed_from(events)
    return set(found[0] if isinstance(found, tuple) else found)


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
        events = history.events(run.id)
        changes = [e for e in events if e.kind == "max_iterations_changed"]
        initial_max = int(changes[0].data.get("from", run.max_iterations)) if changes else run.max_iterations
        forked = next((e for e in events if e.kind == "forked"), None)
        for event in events:
            if event.kind not in ("run_started", "run_resumed"):
                continue
            after = max([start] + [it.n for it in own if it.ended_at <= event.ts])
            if after >= end:
                continue  # nothing recorded came out of this session
            before = [e for e in events if (e.id or 0) < (event.id or 0)]
            maximum = initial_max
            for change in (e for e in before if e.kind == "max_iterations_changed"):
                maximum = int(change.data.get("to", maximum))
            at_fork = i > 0 and after == start
            patches: list[tuple[list[Any], Any]] = []
            if at_fork and forked is not None:
                patches = [(list(p["path"]), p["value"]) for p in forked.data.get("patches") or []]
            why = f"fork of run {run.parent_run} at {start}" if at_fork else (
                "start" if after == 0 else f"resume after {after}")
            by_after[after] = Session(after, maximum, _relaxed_names(before), patches, why)
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
        events = history.events(run.id)
        asked = {str(e.data.get("key")): e for e in events if e.kind == "approval_pending"}
        for event in events:
            if event.kind not in _INTERVENTIONS or event.iteration is None:
                continue
            data = event.data
            due = event.iteration - 1 if event.kind in ("approved", "denied") else event.iteration
            if not start <= due < end:
                continue  # obeyed outside the part of this run the recording is made of
            if event.kind == "invariant_relaxed":
                until = data.get("until")
                out.append(Intervention(due, "relax", {
                    "invariant": data.get("invariant"), "reason": data.get("reason") or "relaxed",
                    "iterations": (int(until) - event.iteration) if until is not None else None,
                }))
            elif event.kind == "invariant_restored":
                out.append(Intervention(due, "restore", {"invariant": data.get("invariant"),
                                                         "reason": data.get("reason", "")}))
            elif event.kind == "state_edited":
                out.append(Intervention(due, "edit_state", {"state": data["patched_state"],
                                                            "reason": data.get("reason") or "edited"}))
            elif event.kind == "fact_added":
                out.append(Intervention(due, "add_fact", {"fact": data.get("fact")}))
            elif event.kind == "subgoal_set":
                out.append(Intervention(due, "set_subgoal", {"subgoal": data.get("subgoal")}))
            else:
                question = asked.get(str(data.get("key")))
                if question is None or question.iteration is None:
                    continue  # an answer to nothing the recording asked: nothing to repeat
                key = idempotency_key(replay_run_id, question.iteration, str(question.data.get("tool")),
                                      question.data.get("args") or {})
                payload: dict[str, Any] = {"key": key, "reason": data.get("reason") or ""}
                if event.kind == "approved":
                    payload["args"] = data.get("args")
                    if data.get("tool") is not None:  # a shadow run's "another tool instead"
                        payload["tool"] = data.get("tool")
                out.append(Intervention(due, "approve" if event.kind == "approved" else "deny", payload))
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
    history.append_event(run_id, "run_created", {"loop_ref": run.loop_ref, "model": run.model, "budget": run.budget})
    history.append_event(run_id, "replay_of", {
        "run": recorded.id, "recorded_spec_hash": recorded.spec_hash, "spec_hash": run.spec_hash,
    })
    history.append_event(recorded.id, "replayed", {"replay_run": run_id})
    return run


class Divergence(BaseModel):
    iteration: int
    kind: DivergenceKind
    recorded: str
    replayed: str
    detail: str = ""


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
    if is_shadow(history.events(recorded_run.id)):  # replayed as it ran: proposals judged, nothing executed
        mark_shadow(history, run.id, why=f"replay of shadow run {recorded_run.id}")
    interventions = plan_interventions(history, lineage, recorded, run.id)
    recording = Recording(recorded_run.id, by_n, {r.workspace for r in lineage} | {run.workspace})
    register_recording(recording)
    replay_loop = guarded(loop)
    prior = RecordedCalls(by_n)
    boundaries = {k for k in sessions if 0 < k < last}

    def send(due: int) -> None:
        for item in interventions:
            if item.due == due:
                history.add_command(run.id, item.kind, item.payload)

    session = sessions[0]
    previous: Engine | None = None
    send(0)
    while True:
        engine = Engine(replay_loop, history, history.get_run(run.id), prior=prior, replaying=True,
                        subscribers=list(subscribers or []), workdir=workdir)
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
            previous = engine
        else:
            break  # the replay ended where the recording did not: compare says how

    for problem in recording.problems:
        if problem.kind == "repair":  # say why the recorded reply was rejected
            rejected = [e for e in history.events(run.id) if e.kind == "invalid_reply" and e.iteration == problem.iteration]
            if rejected:
                problem.replayed = f"rejected: {rejected[-1].data.get('error', '')}"
    final = history.get_run(run.id)
    divergence, compared = compare(recorded_run, recorded, final, history.iterations(run.id), recording)
    return ReplayReport(
        run=recorded_run.id, replay_run=run.id, identical=divergence is None, iterations_compared=compared,
        divergence=divergence, loop_changed=loop.spec_hash() != recorded_run.spec_hash,
    )


def _start_session(engine: Engine, session: Session, history: History, run_id: str) -> None:
    """Give a fresh replay engine the settings the recording's engine started with at this point."""
    engine.max_iterations = session.max_iterations
    if session.after:
        history.append_event(run_id, "replay_session", {
            "after": session.after, "why": session.why, "max_iterations": session.max_iterations,
            "patches": [{"path": p, "value": v} for p, v in session.patches],
        }, session.after)
    for name in sorted(set(engine.relaxed) - session.relaxed):  # a branch does not inherit its parent's
        history.add_command(run_id, "restore", {"invariant": name, "reason": f"replay: {session.why}"})
    if session.patches:
        data = engine.state.model_dump(mode="json")
        for path, value in session.patches:
            apply_set(data, path, value)
        data["termination_reason"] = None
        history.add_command(run_id, "edit_state", {"state": data, "reason": f"replay: the patches of the {session.why}"})


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


# ----------------------------------------------------------------------------- comparison


def compare(
    recorded_run: RunRecord,
    recorded: list[IterationRecord],
    replay_run: RunRecord,
    replayed: list[IterationRecord],
    recording: Recording | None = None,
) -> tuple[Divergence | None, int]:
    """The first divergence between a recording and its replay, and how many iterations were compared."""
    mine = {it.n: it for it in replayed}
    compared = 0
    for rec in recorded:
        rep = mine.get(rec.n)
        if rep is None:
            break
        compared += 1
        found = _iteration_divergence(rec, rep)
        if found is not None:
            return found, compared
    k, m = len(recorded), len(replayed)
    if m < k:
        n = m + 1
        problem = recording.problem_at(n) if recording is not None else None
        if problem is not None and problem.kind == "prompt":
            return Divergence(iteration=n, kind="prompt", recorded=problem.recorded, replayed=problem.replayed,
                              detail=f"the {problem.where} differs from the recording; the replay model "
                                     "did not answer"), compared
        if problem is not None and problem.kind == "repair":
            return Divergence(iteration=n, kind="decision", recorded=_short(_decision_text(recorded[m].decision)),
                              replayed=_short(problem.replayed),
                              detail="the recorded reply is no longer accepted as a decision"), compared
        return Divergence(
            iteration=n, kind="length", recorded=f"went on to iteration {k}",
            replayed=_short(f"ended after {m}: {_ending(replay_run)}"),
            detail=f"the replay ended after iteration {m}; the recording has {k} iterations",
        ), compared
    if m > k:
        return Divergence(iteration=k + 1, kind="length", recorded=_short(f"ended after {k}: {_ending(recorded_run)}"),
                          replayed=f"went on to iteration {m}", detail="the replay went on past the recording"), compared
    went_on = recording is not None and any(p.kind == "missing" and p.iteration == k + 1 for p in recording.problems)
    if _ended_by_itself(recorded_run, recorded) and (went_on or replay_run.termination_reason != recorded_run.termination_reason):
        replayed_end = f"went on to iteration {k + 1}" if went_on else f"ended after {k}: {_ending(replay_run)}"
        return Divergence(
            iteration=k + 1 if went_on else k, kind="length",
            recorded=_short(f"ended after {k}: {_ending(recorded_run)}"), replayed=_short(replayed_end),
            detail="the recording ended here by the loop's own rules; the replay did not end the same way",
        ), compared
    return None, compared


def _iteration_divergence(rec: IterationRecord, rep: IterationRecord) -> Divergence | None:
    n = rec.n
    if (rec.decision or {}) != (rep.decision or {}):
        field_name, a, b = _decision_difference(rec.decision or {}, rep.decision or {})
        return Divergence(iteration=n, kind="decision", recorded=_short(a), replayed=_short(b),
                          detail=f"the decision differs in {field_name}")
    rec_gates, rep_gates = _gates(rec), _gates(rep)
    if rec_gates != rep_gates:
        return Divergence(iteration=n, kind="gates", recorded=_short(_gates_text(rec_gates)),
                          replayed=_short(_gates_text(rep_gates)), detail="the gate results differ")
    if rec.invariant_status != rep.invariant_status:
        names = sorted(set(rec.invariant_status) | set(rep.invariant_status))
        changed = [x for x in names if rec.invariant_status.get(x) != rep.invariant_status.get(x)]
        return Divergence(
            iteration=n, kind="invariants",
            recorded=_short(_invariants_text(rec.invariant_status, changed)),
            replayed=_short(_invariants_text(rep.invariant_status, changed)),
            detail=f"invariant status differs: {', '.join(changed)}",
        )
    return None


def _decision_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str, str]:
    for key in ("action", "subgoal", "done", "confidence", "reasoning", *sorted((set(a) | set(b)) - {
        "action", "subgoal", "done", "confidence", "reasoning"})):
        if a.get(key) != b.get(key):
            if key == "action":
                return key, _action_text(a.get(key)), _action_text(b.get(key))
            return key, f"{key}: {_value(a.get(key))}", f"{key}: {_value(b.get(key))}"
    return "(whole)", _decision_text(a), _decision_text(b)


def _action_text(action: Any) -> str:
    if not action:
        return "action: none"
    return f"action: {action.get('tool')}({_canonical(action.get('args') or {})})"


def _decision_text(decision: dict[str, Any] | None) -> str:
    if not decision:
        return "no decision"
    return f"{_action_text(decision.get('action'))}; subgoal: {_value(decision.get('subgoal'))}"


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _gates(record: IterationRecord) -> list[tuple[Any, Any, Any]]:
    return [(g.get("name"), g.get("passed"), g.get("exit_code")) for g in record.gate_results]


def _gates_text(gates: list[tuple[Any, Any, Any]]) -> str:
    if not gates:
        return "no gate ran"
    return ", ".join(f"{name} {'passed' if ok else 'failed'}" + (f" (exit {code})" if code is not None else "")
                     for name, ok, code in gates)


def _invariants_text(status: dict[str, bool], names: list[str]) -> str:
    return ", ".join(f"{x}={'ok' if status.get(x) else ('VIOLATED' if x in status else 'absent')}" for x in names)


def _ending(run: RunRecord) -> str:
    reason = run.termination_reason or run.status
    return f"{reason} ({run.message})" if run.message else str(reason)


def _ended_by_itself(run: RunRecord, recorded: list[IterationRecord]) -> bool:
    """The recording stopped by the loop's own rules (not a person, a budget, a crash or a provider)."""
    if run.termination_reason in _SELF_DETERMINED:
        return True
    stopping = {"escalate", "abort"}
    return run.termination_reason in ("waiting_on_person", "fatal_error") and bool(
        recorded and stopping & set(recorded[-1].remediations))


def _short(text: str, limit: int = _SHORT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "Divergence",
    "RecordedCalls",
    "Recording",
    "ReplayReport",
    "compare",
    "create_replay_run",
    "plan_interventions",
    "plan_sessions",
    "register_recording",
    "replay",
]
