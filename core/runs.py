"""The run service: a run's lifecycle outside the iteration (create, preflight, resume guard, start,
finish, stop, the daily cap). The CLI, the TUI, the daemon and batch all go through it, so a run is
started, refused and ended the same way wherever a person (or a trigger) asks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from loopterm.core import runlog as log
from loopterm.core.daily_budget import DailyLedger, cap_run, check_daily_budget, money
from loopterm.core.errors import ConfigError
from loopterm.core.fold import RunView, fold
from loopterm.core.loop import Loop
from loopterm.core.persistence import Journal
from loopterm.core.records import RunRecord
from loopterm.core.termination import Status, TerminationReason, status_for


def preflight(loop: Loop, ref: str, model: str) -> None:
    """Refuse before anything is created: loops calling each other in a cycle, then the model (below)."""
    from loopterm.core.nesting import check_calls

    check_calls(loop, ref)
    preflight_model(loop, model, loop.script if model.startswith("scripted/") else None)


def preflight_model(loop: Loop, model: str, script: Path | None = None) -> None:
    """An unknown model, a missing key, a scripted model without a script (`script` registers one), a role's
    model that cannot answer: one line each, before a run starts."""
    from loopterm.core.checkers import preflight_roles
    from loopterm.core.model import check_model

    if loop.agent is not None:  # the actor is a coding agent: its program, not a model, must be there
        from loopterm.core.agent_loop import agent_for, check_agent

        check_agent(agent_for(loop.agent, model))
    elif model.startswith("agent:"):
        from loopterm.core.errors import ConfigError

        raise ConfigError(f"loop {loop.name!r} is driven by a model, not a coding agent; --agent goes with a loop "
                          "that declares `agent=AgentSpec(...)` (e.g. `loopterm run agent-fix --agent CMD`)")
    else:
        check_model(model, script)
    preflight_roles(loop.gates, model)


def new_run_budget(ledger: DailyLedger | None, loop: Loop, *, usd: float | None = None, tokens: int | None = None,
                   what: str = "this run's budget", lower: str | None = "--budget-usd") -> tuple[dict[str, Any], str | None]:
    """A new run's budget under the daily budget (core/daily_budget.py): refused with one line when it does
    not fit; an uncapped run gets what is left of today's. Returns the budget and, when it was capped,
    the line saying so (`ledger` None: no database yet)."""
    budget: dict[str, Any] = {}
    if usd is not None:
        budget["usd"] = usd
    if tokens is not None:
        budget["tokens"] = tokens
    asked = usd if usd is not None else loop.budget.usd
    cap = check_daily_budget(ledger, asked, what=what, lower=lower)
    if cap is None:
        return budget, None
    budget["usd"] = cap
    note = (f"this run has no USD budget, so it gets what is left of today's daily budget: {money(cap)}"
            if asked is None else None)
    return budget, note


def create(loop: Loop, journal: Journal, *, ref: str, model: str, budget: dict[str, Any] | None = None,
           max_iterations: int | None = None, workspace_root: Path | None = None, shadow: bool = False,
           origin: str | None = None, goal: str | None = None, run_id: str | None = None,
           workspace: Path | None = None, **engine: Any) -> Any:
    """A new run, recorded, and the engine that will drive it (`engine`: the Engine's own options)."""
    from loopterm.core.engine import Engine

    return Engine.create(loop, journal, loop_ref=ref, model=model, max_iterations=max_iterations, budget=budget,
                         workspace_root=workspace_root, shadow=shadow, origin=origin, goal=goal, run_id=run_id,
                         workspace=workspace, **engine)


def continuing(journal: Any, loop: Loop, run: RunRecord, *, what: str, max_iterations: int | None = None,
               side_effects: str | None = None, checked: bool = False, **engine: Any) -> tuple[Any, str | None]:
    """The engine that continues an existing run (a resume, a new branch), through every gate first: the
    model can answer (`checked`: the caller already asked `preflight_model`, say in a thread), the daily
    budget (an uncapped run gets what is left of today's, recorded), a new iteration cap, a person's answer
    to a side effect. Returns it and the line saying it was capped, if so."""
    if not checked:
        preflight_model(loop, run.model, loop.script if run.model.startswith("scripted/") else None)
    run, cap = cap_run(journal, run, loop.budget.usd, what=what)
    note = f"{what} had no USD cap, so it gets what is left of today's daily budget: {money(cap)}" if cap else None
    run = set_max_iterations(journal, run, max_iterations)
    answers = dict(engine.pop("side_effect_answers", None) or {})  # answered already (the TUI records its own)
    if side_effects is not None:
        answers.update(answer_side_effect(journal, run, side_effects))
    return engine_for(journal, loop, run, side_effect_answers=answers, **engine), note


def resume_guard(journal: Journal, run: RunRecord, *, engines_here: Callable[[str], bool] = lambda _: False) -> RunView:
    """Refuse to resume a run that converged or that an engine executes now (two engines would fire its
    side effects twice); returns its view otherwise."""
    from loopterm.core.liveness import executing_elsewhere

    if run.status == Status.CONVERGED.value:
        raise ConfigError(f"run {run.id} already converged; nothing to resume (fork it to try something else)")
    view = fold(journal.events(run.id))
    if engines_here(run.id) or executing_elsewhere(run, view):
        raise ConfigError(f"run {run.id} is executing in another process right now (its heartbeat is fresh); "
                          f"steer it with `loopterm watch {run.id}`, or stop it there (s) and resume it then")
    return view


def set_max_iterations(journal: Journal, run: RunRecord, maximum: int | None) -> RunRecord:
    """A resume's new iteration cap, recorded (a replay starts its engines with the same)."""
    if maximum is None or maximum == run.max_iterations:
        return run
    journal.update_run(run.id, max_iterations=maximum)
    journal.append_event(run.id, log.MaxIterationsChanged(before=run.max_iterations, to=maximum))
    return journal.get_run(run.id)


def answer_side_effect(journal: Journal, run: RunRecord, answer: str) -> dict[str, str]:
    """A person's answer (reuse | reexecute) to the side-effecting call the run stopped on; the engine's
    `side_effect_answers`."""
    pending = fold(journal.events(run.id)).side_effect
    if pending is None:
        raise ConfigError(f"run {run.id} has no pending side-effecting call to answer; drop --side-effects")
    journal.append_event(run.id, log.SideEffectAnswered(key=pending.asked.key, answer=answer))
    return {pending.asked.key: answer}


def record_end(journal: Journal, run_id: str, reason: TerminationReason, message: str,
               clock: Callable[[], float] = time.time) -> RunRecord:
    """End a run that no engine holds (it failed to start, a trigger was refused, a person stopped an
    escalated run): the run row and its log say the same. What waits on a person stays pending."""
    status = status_for(reason)
    journal.update_run(run_id, status=status.value, termination_reason=reason.value, message=message,
                       updated_at=clock())
    journal.append_event(run_id, log.RunFinished(status=status.value, reason=reason.value, message=message))
    return journal.get_run(run_id)


def workspace_root(db: Path | None) -> Path:
    """Where a store's runs get their workspaces, which are files on the machine that runs the loop:
    $LOOPTERM_WORKSPACES when set, else beside a SQLite database (`db`), else (a server store: `db` None)
    `.loopterm/workspaces` under the working directory."""
    from loopterm.core.settings import settings

    chosen = settings().workspaces
    if chosen is not None:
        return chosen.expanduser().resolve()
    if db is None:
        return (Path.cwd() / ".loopterm" / "workspaces").resolve()
    return db.resolve().parent / "workspaces"


def engine_for(journal: Any, loop: Loop, run: RunRecord, **kwargs: Any) -> Any:
    """An engine for an existing run; a branch answers its ancestors' side effects by policy."""
    from loopterm.core.engine import Engine
    from loopterm.core.fork import AncestorCalls

    prior = AncestorCalls(journal, run) if run.origin == "fork" else None
    return Engine(loop, journal, run, prior=prior, **kwargs)
