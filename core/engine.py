"""The engine: observe -> decide -> act -> verify -> (iterate | terminate | escalate).

One `Engine` drives one run; this module is the iteration's orchestration only. Each phase is its own
module: take commands (core/steering.py), decide (core/deciding.py), act (core/acting.py), verify
(core/verifying.py), fold the next state (core/transition.py), policies between iterations
(core/policies.py); optional concerns attach as hooks (core/hooks.py). Every iteration is committed
to the journal before the next starts, in one commit; a model reply is journalled (as an intent) before a
tool with side effects runs (and before any tool that runs longer than a moment: core/tools.py), so a
resume after a crash neither pays for the reply again nor re-fires the tool. The run's log is
folded into `view` (core/fold.py) as the engine writes it. Subscribers (headless progress, the TUI) get
events; they never own state.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from loopterm.core import runlog
from loopterm.core.acting import act
from loopterm.core.agent_actor import AgentActor
from loopterm.core.agent_loop import agent_for
from loopterm.core.budget import Spend
from loopterm.core.children import spawn
from loopterm.core.control import Approve, Deny
from loopterm.core.creation import new_run
from loopterm.core.deciding import decide
from loopterm.core.decision import Decision
from loopterm.core.errors import ModelError, RunBusyError
from loopterm.core.events import (
    EngineEvent,
    Escalated,
    IterationCommitted,
    IterationStarted,
    ModelRetry,
    RunFinished,
    RunStarted,
    StatusChanged,
)
from loopterm.core.fold import fold
from loopterm.core.hooks import ControlFeed, Hook, LongTermMemory, McpServers
from loopterm.core.liveness import HEARTBEAT_S
from loopterm.core.loop import Loop
from loopterm.core.migrations import migrate_state
from loopterm.core.persistence import Journal
from loopterm.core.policies import Stall, adopt, boundary
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.secrets import redact
from loopterm.core.state import LoopState
from loopterm.core.state_dump import StateDump
from loopterm.core.steering import Steering
from loopterm.core.strategy import Strategy
from loopterm.core.termination import RunEnds, Status, TerminationReason, status_for
from loopterm.core.text import one_line
from loopterm.core.tools import InterruptedSideEffect, PriorCalls, SideEffectNeedsDecision, ToolExecutor
from loopterm.core.transition import escalation, next_state
from loopterm.core.verifying import Verifier

Subscriber = Callable[[EngineEvent], None]


class Engine:
    def __init__(
        self,
        loop: Loop,
        journal: Journal,
        run: RunRecord,
        *,
        client: Any = None,
        subscribers: list[Subscriber] | None = None,
        workdir: Path | None = None,
        relaxed: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        prior: PriorCalls | None = None,
        replaying: bool = False,
        side_effect_answers: dict[str, str] | None = None,
        wait_on_person: bool = False,
        poll_interval: float = 0.2,
        call_stack: tuple[str, ...] = (),
        workspace_root: Path | None = None,
        learn: bool = True,
    ) -> None:
        if loop.agent is not None:  # the agent this run was started with (`--agent`: core/agent_loop.py)
            loop = loop.model_copy(update={"agent": agent_for(loop.agent, run.model)})
        self.loop = loop
        self.journal = journal
        self.run_record = run
        self.run_id = run.id
        self.workspace = Path(run.workspace)
        self.subscribers = list(subscribers or [])
        self.workdir = workdir or Path.cwd()
        self.view = fold(journal.events(run.id))  # the run's log so far; every event this engine writes joins it
        self.shadow = self.view.shadow  # nothing the model proposes runs; a person judges it (core/shadow.py)
        self._relaxed_extra = dict(relaxed or {})  # a replay's relaxations, in force without an event
        self.wait_on_person = wait_on_person
        self.poll_interval = poll_interval
        self.paused = False
        self.stepping = False
        # Answers given before the question (a replay repeats the recording's): used without asking.
        self.preanswered: dict[str, Approve | Deny] = {}
        self._wake = asyncio.Event()
        self.clock = clock
        self.max_iterations = run.max_iterations
        self.budget = loop.budget.model_validate(run.budget) if run.budget else loop.budget
        self.temperature = loop.temperature
        self.strategy_note: str | None = None
        self._client = client
        self.stop_requested: str | None = None
        self.learn = learn  # False: leave long-term memory as it was (an eval measures; it does not teach)
        self.call_stack = (*call_stack, run.loop_ref)  # the chain of loops that called this one, and this
        self.workspace_root = workspace_root or self.workspace.parent
        # Long-term memory (core/memory.py), when the journal keeps one (the Store does).
        memory: Any = journal if hasattr(journal, "recall") and hasattr(journal, "remember") else None
        self.hooks: list[Hook] = [*([LongTermMemory(memory)] if memory is not None else []),
                                  *([McpServers()] if loop.mcp_servers else []), ControlFeed(),
                                  *([AgentActor(loop.agent)] if loop.agent is not None else [])]
        # What the act phase adds to iteration n's commit: events (an agent's turn) and spend an actor
        # reported itself (an agent's usage), beside the model's and the gates'.
        self.pending_events: dict[int, list[runlog.RunEvent]] = {}
        self.reported: dict[int, tuple[Spend, float]] = {}  # (spend, latency in ms)
        self._spawn = functools.partial(spawn, self)
        self.executor = ToolExecutor(
            journal, run.id, clock=clock, prior=prior, replaying=replaying, answers=dict(side_effect_answers or {}),
            services={"loop": loop.name, "memory": memory, "spawn": self._spawn},
        )
        self.steering = Steering(self)
        self.verifier = Verifier(self)
        self.dumper = StateDump(loop.state)
        self.strategy: Strategy | None = next((x for x in loop.strategies if x.name == self.view.strategy), None)
        if self.strategy is not None:
            adopt(self, self.strategy)
        self.spend = Spend(
            tokens_in=run.tokens_in, tokens_out=run.tokens_out, cost_usd=run.cost_usd, elapsed_s=run.elapsed_s,
            tokens_cached=run.tokens_cached,
        )
        # Child runs are runs of their own (their spend is in their records and the ledger), but the
        # caller's budget covers them: counted here for budget checks only.
        self.children_spend = Spend()
        children = getattr(journal, "children", None)
        for child in children(run.id) if children is not None else []:
            if child.origin == "child":
                self.children_spend.add(child.tokens_in, child.tokens_out, child.cost_usd)
        recent = journal.last_iterations(run.id, loop.stall_window or 1)  # the last one holds the state
        self.stall = Stall(loop.stall_window, recent)
        self.confidences: deque[float] = deque(
            (float((r.decision or {}).get("confidence", 0.0)) for r in recent), maxlen=10
        )
        self.state = self._load_state(recent[-1] if recent else None)

    @classmethod
    def create(cls, loop: Loop, journal: Journal, *, loop_ref: str, model: str | None = None,
               max_iterations: int | None = None, budget: dict[str, Any] | None = None,
               workspace_root: Path | None = None, workspace: Path | None = None, run_id: str | None = None,
               parent_run: str | None = None, goal: str | None = None, shadow: bool = False,
               origin: str | None = None, **kwargs: Any) -> Engine:
        """A new run (core/creation.py) and the engine that drives it."""
        run = new_run(loop, journal, loop_ref=loop_ref, model=model, max_iterations=max_iterations, budget=budget,
                      workspace_root=workspace_root, workspace=workspace, run_id=run_id, parent_run=parent_run,
                      goal=goal, shadow=shadow, origin=origin)
        return cls(loop, journal, run, workspace_root=workspace_root, **kwargs)

    def _load_state(self, last: IterationRecord | None) -> LoopState:
        """The state to continue from: the last committed one (a branch's parent's, at the fork point,
        until it commits its own), migrated to the loop's current schema, then a person's (or the fork's)
        later patch, as the fold says."""
        if last is None:
            state = self.loop.new_state()
            state.task = self.run_record.goal or state.task
            for hook in self.hooks:
                state = hook.fresh(self, state)
        else:
            state = self.loop.state.model_validate(migrate_state(self.loop, last.state))
        patched = self.view.state_after(state.iteration)
        if patched is not None:
            state = self.loop.state.model_validate(migrate_state(self.loop, patched))
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            from loopterm.core.model import ModelClient  # lazy: litellm loads only when a run starts

            self._client = ModelClient(self.run_record.model, temperature=self.temperature,
                                       max_tokens=self.loop.max_output_tokens, on_retry=self.on_retry)
        return self._client

    def reset_client(self) -> None:
        """The next model call builds a new client (a strategy changed the model)."""
        self._client = None

    @property
    def relaxed(self) -> dict[str, str]:
        """The invariants relaxed now (by a person, a fork, or a replay), with the reasons."""
        return {**self.view.relaxed, **self._relaxed_extra}

    # ------------------------------------------------------------------ what the phases use

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def request_stop(self, reason: str = "stopped by a person") -> None:
        """Stop at the next iteration boundary (the iteration in flight completes)."""
        self.stop_requested = reason
        self.wake()

    def wake(self) -> None:
        """Look at the control channel now (an in-process sender just wrote to it)."""
        self._wake.set()

    def emit(self, event: EngineEvent) -> None:
        for sub in self.subscribers:
            sub(event)

    def log(self, event: runlog.RunEvent, iteration: int | None = None) -> runlog.EventRecord:
        """Append to the run's log; the engine's own view follows it."""
        record = self.journal.append_event(self.run_id, event, iteration)
        self.view.absorb([record])
        return record

    def set_flags(self, *, paused: bool, stepping: bool) -> None:
        self.paused, self.stepping = paused, stepping

    def publish_status(self, status: Status, message: str = "") -> None:
        """The run row and the subscribers hear of a status its log already records."""
        self.journal.update_run(self.run_id, status=status.value, message=message or None, updated_at=self.clock())
        self.emit(StatusChanged(run_id=self.run_id, status=status.value, message=message))

    def set_status(self, status: Status, message: str = "") -> None:
        self.log(runlog.StatusChanged(status=status.value, message=message), self.state.iteration)
        self.publish_status(status, message)

    def on_retry(self, attempt: int, error: ModelError, delay: float) -> None:
        n = self.state.iteration + 1
        message = redact(str(error))
        self.log(runlog.ModelRetried(attempt=attempt, error=message, delay_s=round(delay, 3)), n)
        self.emit(ModelRetry(run_id=self.run_id, n=n, attempt=attempt, error=message, delay_s=delay))

    async def wait(self) -> None:
        """Sleep until woken or the poll interval passes, then read the control channel."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        except asyncio.TimeoutError:
            pass
        self.steering.obey()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> RunRecord:
        """Iterate until a termination reason; returns the final run record.

        Holds the run's lock (the journal's `drive`) throughout: on a shared PostgreSQL store no second
        engine, on any host, can execute the run at the same time, whatever a queue or a person does.
        """
        if not self.journal.drive(self.run_id):
            raise RunBusyError(f"run {self.run_id} is being executed by another engine (it holds the run's lock); "
                               "`loopterm watch` it, or wait until it stops")
        try:
            return await self._run()
        finally:
            self.journal.undrive(self.run_id)

    async def _run(self) -> RunRecord:
        resumed_from = self.state.iteration
        self.journal.update_run(self.run_id, status=Status.RUNNING.value, updated_at=self.clock(), message=None)
        started = runlog.RunResumed if self.view.started_before else runlog.RunStarted
        self.log(started(from_iteration=resumed_from, pid=os.getpid(), host=socket.gethostname(),  # see core/liveness.py
                         v=runlog.LOG_VERSION))
        self.emit(RunStarted(run_id=self.run_id, loop=self.loop.name, model=self.run_record.model,
                             max_iterations=self.max_iterations, resumed_from=resumed_from))
        self._session_start = time.monotonic()
        self._first_of_session = True
        self._elapsed_base = self.spend.elapsed_s
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            if self._converged_unrecorded():
                # Its last iteration converged and was committed, but the process died before the run's
                # end was recorded: record it now (iterating on would call the model and fire tools again).
                why = "every gate passed" if self.loop.converged is None else "its convergence check held"
                raise RunEnds(TerminationReason.CONVERGED, f"converged at iteration {self.state.iteration}: {why}")
            self.steering.obey()  # an answer sent while nothing executed the run (the inbox's resume) is taken first
            self._waits_again()
            for hook in self.hooks:
                await hook.started(self)
            while True:
                self._tick()
                await self._boundary()
                await self._iteration(self.state.iteration + 1)
        except RunEnds as ends:
            return self._finish(ends.reason, ends.message)
        except ModelError as exc:
            return self._finish(TerminationReason.FATAL_ERROR, str(exc))
        except InterruptedSideEffect as exc:
            self._side_effect_pending(exc.key, "interrupted", exc.record.tool, exc.record.args, exc.record.run_id,
                                      exc.record.iteration)
            return self._finish(
                TerminationReason.WAITING,
                f"{exc}; if it took effect, `loopterm resume {self.run_id} --side-effects reuse` goes on without "
                "running it again; if not, `--side-effects reexecute` runs it",
            )
        except SideEffectNeedsDecision as exc:
            self._side_effect_pending(exc.key, "already_made", exc.tool, exc.call_args, exc.earlier.run_id,
                                      exc.earlier.iteration)
            return self._finish(TerminationReason.WAITING,
                                f"{exc} (`loopterm resume {self.run_id} --side-effects reuse|reexecute`)")
        except asyncio.CancelledError:
            self._finish(TerminationReason.STOPPED, "interrupted; `loopterm resume` continues it")
            raise
        finally:
            heartbeat.cancel()
            for hook in self.hooks:
                await hook.closed(self)
            self.journal.flush()  # anything still queued (an exception nobody expected) goes to disk

    def _waits_again(self) -> None:
        """A run whose escalation nobody answered waits on a person again: it is never gone past."""
        pending = self.view.escalation
        if pending is None:
            return
        message = (f"{one_line(pending.packet.summary or 'waiting on a person', 200)} (escalated at iteration "
                   f"{pending.iteration}, not answered yet)")
        if not self.wait_on_person:
            raise RunEnds(TerminationReason.WAITING, f"{message}; answer it from `loopterm watch {self.run_id}`")
        self.set_status(Status.ESCALATED, message)

    def _converged_unrecorded(self) -> bool:
        """Whether this run's own last committed iteration converged (a branch starts from its
        parent's state, which may say so: that iteration is not the branch's)."""
        if self.state.termination_reason != TerminationReason.CONVERGED.value:
            return False
        last = self.journal.last_iterations(self.run_id, 1)
        return bool(last) and last[-1].run_id == self.run_id and last[-1].n == self.state.iteration

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.journal.update_run(self.run_id, updated_at=self.clock())

    def _tick(self) -> None:
        self.spend.elapsed_s = self._elapsed_base + (time.monotonic() - self._session_start)

    async def _boundary(self) -> None:
        """Everything between iterations: a person's commands, a pause or what waits on a person, expiring
        relaxations, then every reason to end."""
        self.steering.obey()
        while (self.paused or self.view.escalation is not None) and not self.stop_requested:
            await self.wait()
        for name, until in list(self.view.relax_until.items()):
            if self.state.iteration >= until:
                self.log(runlog.InvariantRestored(invariant=name, reason=f"relaxation expired at iteration {until}"),
                         self.state.iteration)
        if self.stop_requested:
            raise RunEnds(TerminationReason.STOPPED, self.stop_requested)
        for hook in self.hooks:
            hook.boundary(self)
        boundary(self)

    async def _iteration(self, n: int) -> None:
        """decide -> act -> verify -> fold the next state -> commit (with the escalation, if any)."""
        self.emit(IterationStarted(run_id=self.run_id, n=n))
        # Only the session's first iteration can find a reply journalled before (by a process that died):
        # this engine commits every later one itself, and no one else writes this run's intents.
        intent = self.journal.load_intent(self.run_id, n) if self._first_of_session else None
        self._first_of_session = False
        if intent is None:
            intent = await decide(self, n, self.clock())
            # Queued, not committed: it joins the tool call's start (so it is on disk before the
            # tool fires), an approval's event, or, with no tool, is dropped by the iteration's commit.
            self.journal.save_intent(intent, durable=False)
        else:
            self.log(runlog.IntentReused(n=n), n)
        decision = Decision.model_validate(intent.decision)
        tool_record, tool_call = await act(self, n, decision)
        gates = [] if self.shadow else await self.verifier.verify(n, decision, tool_record)  # nothing changed to verify
        after = next_state(self, n, decision, tool_record, gates)
        state, ends = after.state, after.ends

        reported, reported_ms = self.reported.pop(n, (Spend(), 0.0))
        tokens_in = intent.tokens_in + reported.tokens_in + sum(g.tokens_in for g in gates)
        tokens_out = intent.tokens_out + reported.tokens_out + sum(g.tokens_out for g in gates)
        cost = intent.cost_usd + reported.cost_usd + sum(g.cost_usd for g in gates)
        # model checkers' calls count too
        cached = intent.tokens_cached + reported.tokens_cached + sum(g.tokens_cached for g in gates)
        self.spend.add(tokens_in, tokens_out, cost, cached)
        self._tick()
        record = IterationRecord(
            run_id=self.run_id, n=n, started_at=intent.started_at, ended_at=self.clock(),
            prompt=intent.prompt, raw_response=intent.raw_response, decision=intent.decision,
            repairs=intent.repairs, tool_call=tool_call, tool_result=tool_record.model_dump() if tool_record else None,
            gate_results=[g.model_dump() for g in gates], invariant_status=after.invariant_status,
            remediations=[r.value for r in after.remediations], tokens_in=tokens_in, tokens_out=tokens_out,
            cost_usd=cost, latency_ms=intent.latency_ms + reported_ms, model=intent.model,
            state=self.dumper.dump(state), decision_mode=intent.decision_mode, tokens_cached=cached,
        )
        totals = {
            "iterations": n, "tokens_in": self.spend.tokens_in, "tokens_out": self.spend.tokens_out,
            "cost_usd": self.spend.cost_usd, "elapsed_s": self.spend.elapsed_s, "updated_at": self.clock(),
            "tokens_cached": self.spend.tokens_cached,
        }
        self.confidences.append(decision.confidence)
        waiting = ends is not None and ends.reason is TerminationReason.WAITING
        packet = escalation(self, n, state, after.violated, ends.message) if waiting and ends is not None else None
        # Handed over: neither this dump nor anything in it is changed again (see core/state_dump.py). The
        # escalation commits with its iteration: a crash can never keep the iteration and lose the question.
        events = [*self.pending_events.pop(n, []), *([packet] if packet else [])]
        written = self.journal.commit_iteration(record, totals, handover=True, events=events)
        self.view.absorb(written or [])
        self.state = state
        self.stall.add(record)
        self.emit(IterationCommitted(record=record))
        if packet is not None and ends is not None:
            self.emit(Escalated(run_id=self.run_id, n=n, packet=packet.packet()))
            if self.wait_on_person:  # wait here for a person's answer (resume or stop), from this screen or `watch`
                self.set_status(Status.ESCALATED, ends.message)
                return
        if ends is not None:
            raise ends
        if self.stepping:
            self.stepping, self.paused = False, True
            self.set_status(Status.PAUSED, f"paused after stepping iteration {n}")

    def _side_effect_pending(self, key: str, why: str, tool: str, args: dict[str, Any], earlier_run: str,
                             earlier_iteration: int) -> None:
        self.log(runlog.SideEffectPending(key=key, why=why, tool=tool, args=args, earlier_run=earlier_run,
                                       earlier_iteration=earlier_iteration), self.state.iteration + 1)

    def _finish(self, reason: TerminationReason, message: str) -> RunRecord:
        message = redact(message)
        status = status_for(reason)
        for hook in self.hooks:
            hook.finished(self, status)
        self._tick()
        self.journal.update_run(
            self.run_id, status=status.value, termination_reason=reason.value, message=message,
            updated_at=self.clock(), elapsed_s=self.spend.elapsed_s, tokens_in=self.spend.tokens_in,
            tokens_out=self.spend.tokens_out, cost_usd=self.spend.cost_usd, tokens_cached=self.spend.tokens_cached,
        )
        self.log(runlog.RunFinished(status=status.value, reason=reason.value, message=message))
        self.emit(RunFinished(run_id=self.run_id, status=status.value, reason=reason.value, message=message))
        return self.journal.get_run(self.run_id)
