"""What each CLI command does. Imported only after the arguments parsed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loopterm.core.creation import new_run_id
from loopterm.core.engine import Engine
from loopterm.core.fork import create_fork, plan_fork, rebuild_workspace
from loopterm.core.errors import ConfigError
from loopterm.core.loader import list_loops, load_loop
from loopterm.core.loop import Loop
from loopterm.core.migrations import migrate_state
from loopterm.core.records import RunRecord
from loopterm.core import runs as service
from loopterm.core.control import AddFact, Approve, Command, Deny, Relax, Resume, SetSubgoal, Stop, command_payload
from loopterm.core.fold import decision_lines, fold, waiting_lines
from loopterm.core.liveness import executing_elsewhere
from loopterm.core.runlog import ShadowMode, to_stored
from loopterm.core.termination import EXIT_CODES, Status
from loopterm.store.target import StoreTarget
from loopterm.store.footprint import size_text
from loopterm.tui.headless import (
    ApprovalTimeout,
    HeadlessProgress,
    action_label,
    as_json,
    gates_text,
    invariants_text,
    status_text,
    summary,
)
from loopterm.tui.console import USAGE_ERROR, default_target
from loopterm.tui.widgets.render import clean

DEMO_LOOP = "demo"


def _console() -> Console:
    return Console(highlight=False)


def _drive(engine: Engine, console: Console, otlp: str | None = None) -> int:
    engine.subscribe(HeadlessProgress(console))
    if otlp is None:
        final = asyncio.run(engine.run())
    else:
        from loopterm.tui.traces import traced

        with traced(engine, otlp):
            final = asyncio.run(engine.run())
    console.print(summary(final))
    return EXIT_CODES.get(Status(final.status), 1)


def demo(db: StoreTarget | None = None) -> int:
    return run(DEMO_LOOP, db or default_target(), headless=False)


def _has_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _open_tui(db: StoreTarget, **kwargs: Any) -> int:
    from loopterm.tui.app import LooptermApp

    app = LooptermApp(db, **kwargs)
    app.run()
    if app.start_error is not None:  # the run the screen was to start was refused there: said again, exit 2
        print(f"loopterm: {app.start_error}", file=sys.stderr)
        return USAGE_ERROR
    return int(app.return_code or 0)


def _check_before_the_screen(loop: Loop, ref: str, model: str) -> None:
    """The checks that take milliseconds: loops calling each other, the model's name and settings, the offline
    script's syntax. What needs litellm (seconds: the provider, its key, registering the script) runs in the
    App once its first frame is up, and a refusal there is said on the screen and exits 2 (`_open_tui`)."""
    from loopterm.core.model import check_model_name
    from loopterm.core.nesting import check_calls

    check_calls(loop, ref)
    if loop.agent is not None:  # a coding agent's loop: no model to check, its program is (core/runs.py)
        from loopterm.core.agent_loop import agent_for, check_agent

        check_agent(agent_for(loop.agent, model))
        return
    script = loop.script if model.startswith("scripted/") else None
    check_model_name(model, script)
    if script is not None:
        from loopterm.core.scripted import load_script

        load_script(Path(script))


def watch(db: StoreTarget, prefix: str) -> int:
    # Closed before the screen opens its own: a second connection in one process loses its locks when the
    # other's header check closes the file (POSIX locks are per process), and another process could then
    # delete the write-ahead log in use.
    with db.open(create=False) as store:
        run_record = store.resolve_run(prefix)  # a bad id is one line, before any screen
    if not _has_terminal():
        raise ConfigError("`loopterm watch` needs a terminal; use `loopterm show RUN` to read a run without one")
    return _open_tui(db, watch_run=run_record.id)


def _note(line: str | None) -> None:
    """What the run service decided on a person's behalf (a budget capped at what is left today), on stderr."""
    if line:
        print(f"loopterm: {line}", file=sys.stderr)


def run(
    loop_ref: str,
    db: StoreTarget | Path,
    *,
    model: str | None = None,
    headless: bool = True,
    max_iterations: int | None = None,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
    otlp: str | None = None,
    wait: bool = True,
    shadow: bool = False,
    approval_timeout: float | None = None,
) -> int:
    db = StoreTarget.of(db)
    loop, ref = load_loop(loop_ref)
    chosen = model or loop.model
    screen = not headless and _has_terminal()
    if screen:
        _check_before_the_screen(loop, ref, chosen)  # the rest, in the App after its first frame
    else:
        service.preflight(loop, ref, chosen)  # loops calling each other, the model, its key: before the run
    with (db.open() if db.exists() else contextlib.nullcontext()) as known:
        budget, note = service.new_run_budget(known, loop, usd=budget_usd, tokens=budget_tokens)
    _note(note)
    if not headless:
        if screen:
            db.open().close()  # refuse a bad database before the screen opens
            return _open_tui(db, start=(loop, ref), model=chosen, budget=budget or None, otlp=otlp, max_iterations=max_iterations,
                             **({"shadow": True} if shadow else {}))
        print("loopterm: no terminal here, so running headless (pass --headless to say so)", file=sys.stderr)
    store = db.open()
    engine = service.create(loop, store, ref=ref, model=chosen, max_iterations=max_iterations, budget=budget,
                            workspace_root=db.workspace_root(), wait_on_person=wait, shadow=shadow)
    if shadow:
        from loopterm.tui.shadow_cli import announce

        announce(_console(), engine.run_id, wait)
    if approval_timeout is not None:
        engine.subscribe(ApprovalTimeout(engine, store, approval_timeout))
    return _drive(engine, _console(), otlp=otlp)


def resume(db: StoreTarget, prefix: str, *, max_iterations: int | None, side_effects: str | None = None,
           wait: bool = True, otlp: str | None = None) -> int:
    store = db.open(create=False)
    run_record = store.resolve_run(prefix)
    service.resume_guard(store, run_record)
    loop, _ = load_loop(run_record.loop_ref)
    console = _console()
    if loop.spec_hash() != run_record.spec_hash:
        console.print(Text(f"note: loop {loop.name!r} changed since run {run_record.id} started; resuming with the current definition",
                           style="yellow"))
    engine, note = service.continuing(store, loop, run_record, what="what this run may still spend",
                                      max_iterations=max_iterations, side_effects=side_effects, wait_on_person=wait)
    _note(note)
    return _drive(engine, console, otlp=otlp)


def answer(db: StoreTarget, prefix: str, *, facts: list[str], subgoal: str | None, relax: list[str], reason: str,
           abort: bool, approve: bool, deny: bool) -> int:
    """A person's answer from the command line, through the control channel: to the pending approval
    (--approve / --deny), else to the pending escalation (facts, subgoal, relaxations, then resume or abort).
    Refused in one line when nothing waits for that answer."""
    store = db.open(create=False)
    run_record = store.resolve_run(prefix)
    view = fold(store.events(run_record.id))
    commands: list[Command] = []
    if approve or deny:
        if not view.approvals:
            raise ConfigError(f"run {run_record.id} has no tool call waiting for approval; `loopterm show {run_record.id}` says what it waits on")
        pending = next(iter(view.approvals.values()))
        commands.append(Approve(key=pending.asked.key, reason=reason) if approve
                        else Deny(key=pending.asked.key, reason=reason or "denied by a person"))
        what = f"the call of {pending.asked.tool} at iteration {pending.iteration}"
    else:
        if view.escalation is None:
            raise ConfigError(f"run {run_record.id} has no escalation waiting for an answer; `loopterm show {run_record.id}` says what it waits on")
        if relax and not reason:
            raise ConfigError("--relax needs --reason: say why the invariant may be broken")
        base = run_record.iterations
        commands += [AddFact(fact=fact, base_iteration=base) for fact in facts]
        if subgoal:
            commands.append(SetSubgoal(subgoal=subgoal, base_iteration=base))
        commands += [Relax(invariant=name, reason=reason) for name in relax]
        escalation = view.escalation.event_id
        commands.append(Stop(reason=reason or "aborted by a person", escalation=escalation) if abort
                        else Resume(escalation=escalation))
        what = f"the escalation at iteration {view.escalation.iteration}"
    for command in commands:
        store.add_command(run_record.id, *command_payload(command))
    executing = executing_elsewhere(run_record, view)
    then = ("the process executing it obeys at its next step" if executing
            else f"`loopterm resume {run_record.id}` takes the answer and {'ends it' if abort else 'goes on'}")
    if not executing and getattr(store, "backend", "sqlite") == "postgresql":
        then = (f"a worker takes it up if the run was submitted to the cluster; else `loopterm resume "
                f"{run_record.id}` takes the answer and {'ends it' if abort else 'goes on'}")
    _console().print(Text(f"answered {what} of run {run_record.id}: {then}", style="cyan"))
    return 0


def fork(db: StoreTarget, prefix: str, *, at: int, sets: list[str], relax: list[str], model: str | None, reason: str,
         dry_run: bool, wait: bool = True, otlp: str | None = None) -> int:
    store = db.open(create=False)
    parent = store.resolve_run(prefix)
    loop, _ = load_loop(parent.loop_ref)
    plan = plan_fork(store, loop, parent, at, sets=sets, relax=relax, model=model, reason=reason)
    service.preflight(loop, parent.loop_ref, plan.model)
    console = _console()
    if dry_run:
        console.print(f"fork of run {parent.id} at iteration {at} (model {plan.model}) is valid; nothing was created.")
        if not plan.may_repeat:
            console.print("no side-effecting call after that point: the branch cannot repeat one.")
        for call in plan.may_repeat:
            console.print(Text(f"  may reach again: iteration {call.n} of run {call.run_id}: {call.tool}"
                               f"({json.dumps(call.args)[:60]}) -> policy {call.policy}"))
        return 0
    usd = loop.budget.model_validate(parent.budget).usd if parent.budget else loop.budget.usd
    service.new_run_budget(store, loop, usd=usd, what="the branch's budget", lower=None)  # refused: nothing is created
    run_id = new_run_id()
    branch = create_fork(store, loop, plan, run_id=run_id, workspace=db.workspace_root() / run_id)
    engine, note = service.continuing(store, loop, branch, what="the branch's budget", wait_on_person=wait)
    _note(note)
    asyncio.run(rebuild_workspace(loop, store, store.get_run(branch.id)))
    console.print(Text(f"branch {branch.id} of run {parent.id} at iteration {at}"
                       + (f"; patched {', '.join('.'.join(map(str, p)) for p, _ in plan.patches)}" if plan.patches else "")
                       + (f"; relaxed {', '.join(plan.relaxed)}" if plan.relaxed else ""), style="cyan"))
    return _drive(engine, console, otlp=otlp)


def replay(db: StoreTarget, prefix: str, *, as_json_out: bool) -> int:
    """Re-drive a run's loop (its current definition) with the recorded model outputs; report the first divergence.

    Exit 0 when the replay is identical, 3 when it diverged.
    """
    from loopterm.core.replay import replay as replay_run

    store = db.open(create=False)
    recorded = store.resolve_run(prefix)
    if recorded.iterations == 0 and not store.iterations(recorded.id):
        raise ConfigError(f"run {recorded.id} has no committed iteration to replay; `loopterm runs` lists the others")
    loop, _ = load_loop(recorded.loop_ref)
    console = _console()
    run_id = new_run_id()
    if not as_json_out:
        console.print(Text(f"replaying run {recorded.id} ({recorded.iterations} iteration(s), loop {loop.name}) as run {run_id}",
                           style="cyan"))
    report = asyncio.run(replay_run(store, loop, recorded, run_id=run_id,
                                    workspace=db.workspace_root() / run_id))
    if as_json_out:
        print(as_json(report.as_json()))
        return 0 if report.identical else 3
    if report.loop_changed:
        console.print(Text(f"note: loop {loop.name!r} changed since run {recorded.id} was recorded", style="yellow"))
    d = report.divergence
    if d is None:
        console.print(Text.assemble(("✓ identical", "bold green"),
                                    f": replay {report.replay_run} matches run {report.run} over "
                                    f"{report.iterations_compared} iteration(s) (decisions, gates, invariants)"))
        return 0
    console.print(Text.assemble(("✗ diverged", "bold red"), f" at iteration {d.iteration}: ", (d.kind, "bold"),
                                f" (replay {report.replay_run} of run {report.run})"))
    console.print(Text.assemble(("  recorded  ", "bold"), Text(clean(d.recorded))))
    console.print(Text.assemble(("  replayed  ", "bold"), Text(clean(d.replayed))))
    if d.detail:
        console.print(Text(f"  {clean(d.detail)}", style="dim"))
    return 3


def runs(db: StoreTarget, *, as_json_out: bool) -> int:
    """Every run, branches indented under their parents."""
    store = db.open(create=False) if db.exists() else None
    tree = store.tree() if store is not None else []
    shadow = store.runs_with_event(ShadowMode) if store is not None else set()
    # What waits on a person, whatever the run's status (a run stopped while it escalated still waits).
    waiting = {r.id for _, r in tree if store is not None and fold(store.events(r.id)).waiting}
    sizes = store.sizes([r for _, r in tree]) if store is not None else {}
    if as_json_out:
        print(as_json([{**r.model_dump(), "depth": depth, "shadow": r.id in shadow, "waiting": r.id in waiting,
                        "storage": sizes[r.id].model_dump()} for depth, r in tree]))
        return 0
    console = _console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(console.width, 160)  # piped or in a script: no screen to fit, so nothing is cut short
    if not tree:
        console.print(f"no runs yet in {db}; try `loopterm run codefix --headless`")
        return 0
    def where(r: RunRecord) -> str:
        return " (called)" if r.origin == "child" else f" @{r.fork_iteration}"

    labels = {r.id: (("  " * (depth - 1) + f"└ {r.id}{where(r)}") if depth else r.id)
              + (" (replay)" if r.origin == "replay" else "") + (" (trigger)" if r.origin == "trigger" else "")
              + (" (shadow)" if r.id in shadow else "")
              for depth, r in tree}
    table = Table(box=None, header_style="bold")
    # The id and the tree shape never give way; the other columns shrink first.
    table.add_column("run", no_wrap=True, min_width=max(len(label) for label in labels.values()))
    table.add_column("loop", max_width=14, overflow="ellipsis", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("iter", "tokens", "cost"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)  # own bytes (+ shared with other runs)
    table.add_column("model", max_width=22, overflow="ellipsis", no_wrap=True)
    table.add_column("started", overflow="ellipsis", no_wrap=True)
    for _, r in tree:
        started = dt.datetime.fromtimestamp(r.created_at).strftime("%m-%d %H:%M")
        status = status_text(r.status)
        if r.id in waiting and r.status != "escalated":
            status.append(" · ⚑ waits", style="yellow")
        table.add_row(labels[r.id], r.loop, status, f"{r.iterations}/{r.max_iterations}",
                      f"{r.tokens_in + r.tokens_out:,}", f"${r.cost_usd:.4f}", size_text(sizes[r.id]), r.model, started)
    console.print(table)
    return 0


def _migrated(run_record: RunRecord, state: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The state as the loop's current schema sees it, or as stored with a note why not."""
    try:
        loop, _ = load_loop(run_record.loop_ref)
        return migrate_state(loop, state), None
    except ConfigError as exc:
        return state, f"shown as stored: {exc}"


def show(db: StoreTarget, prefix: str, *, iteration: int | None, as_json_out: bool) -> int:
    store = db.open(create=False)
    run_record = store.resolve_run(prefix)
    lineage = store.lineage(run_record.id)
    console = _console()
    if iteration is not None:
        record = store.get_iteration(run_record.id, iteration)
        if record is None:
            raise ConfigError(
                f"run {run_record.id} has no iteration {iteration} (it has {run_record.iterations}); pick 1..{run_record.iterations}"
            )
        record.state, note = _migrated(run_record, record.state)
        if as_json_out:
            print(json.dumps(record.model_dump(), indent=2, default=str))
            return 0
        _show_iteration(console, record)
        turn = fold(store.events(run_record.id)).agent_turns.get(iteration)
        if turn is not None:  # an agent's turn: the whole of it, as the TUI's Agent tab shows it
            from loopterm.tui.widgets.agent_turn import agent_turn_text
            from loopterm.tui.widgets.render import Palette

            console.print(Text("agent's turn", style="bold"))
            console.print(agent_turn_text(turn, Palette()))
        if note:
            console.print(Text(note, style="yellow"))
        return 0
    iterations = store.iterations(run_record.id)
    records = store.events(run_record.id)
    view = fold(records)
    waits = waiting_lines(view)
    if as_json_out:
        events = [{**e.model_dump(exclude={"event"}), "kind": kind, "data": data}
                  for e in records for kind, data in [to_stored(e.event)]]
        print(json.dumps({"run": run_record.model_dump(), "lineage": [r.id for r in lineage], "waiting_on": waits,
                          "storage": store.sizes()[run_record.id].model_dump(), "iterations": [i.model_dump() for i in iterations], "events": events}, indent=2, default=str))
        return 0
    console.print(summary(run_record))
    for line in waits:
        console.print(Text(f"⚑ waits on a person: {line} (answer it from `loopterm watch {run_record.id}`)",
                           style="bold yellow"))
    if len(lineage) > 1:
        path = " → ".join(f"{r.id}" + (f" @{r.fork_iteration}" if r.parent_run else " (root)") for r in lineage)
        console.print(Text(f"lineage: {path}", style="cyan"))
    table = Table(box=None, header_style="bold")
    for col in ("n", "run", "action", "subgoal", "conf", "gates", "inv", "tokens", "cost", "ms"):
        table.add_column(col, justify="right" if col in ("n", "conf", "tokens", "cost", "ms") else "left")
    for r in iterations:
        d = r.decision or {}
        owner = "" if r.run_id == run_record.id else f"↑{r.run_id[:6]}"
        table.add_row(str(r.n), owner, Text(action_label(r)), Text(clean(str(d.get("subgoal", ""))[:50])),
                      f"{float(d.get('confidence', 0)):.2f}", gates_text(r), invariants_text(r),
                      f"{r.tokens_in + r.tokens_out:,}", f"${r.cost_usd:.6f}", f"{r.latency_ms:.0f}")
    console.print(table)
    for line in decision_lines(view):  # calls an approval policy answered (`loopterm policy list` shows it)
        console.print(Text(f"policy: {line}", style="cyan"))
    from loopterm.tui.shadow_cli import show_verdicts

    show_verdicts(console, store, run_record)
    return 0


def _show_iteration(console: Console, r: Any) -> None:
    d = r.decision or {}
    console.print(Text(f"iteration {r.n} of run {r.run_id}", style="bold"))
    console.print(Text.assemble(("subgoal     ", "bold"), Text(clean(d.get("subgoal", "")))))
    console.print(Text.assemble(("confidence  ", "bold"), f"{float(d.get('confidence', 0)):.2f}"))
    console.print(Text.assemble(("reasoning   ", "bold"), Text(clean(d.get("reasoning", "")))))
    console.print(Text.assemble(("action      ", "bold"), Text(action_label(r))))
    if r.tool_result:
        tr = r.tool_result
        console.print(Text.assemble(("tool result ", "bold"), Text(clean(("ok: " + str(tr.get("output", ""))) if tr.get("ok") else "error: " + str(tr.get("error"))))))
    console.print(Text.assemble(("gates       ", "bold"), gates_text(r)))
    for g in r.gate_results:
        if not g["passed"]:
            console.print(Text(clean((g.get("error") or g.get("stderr") or g.get("stdout") or "")[-1500:]), style="red"))
    console.print(Text.assemble(("invariants  ", "bold"), Text(clean(", ".join(f"{k}={'ok' if v else 'VIOLATED'}" for k, v in r.invariant_status.items())) or "-")))
    console.print(Text.assemble(("spend       ", "bold"), f"{r.tokens_in} in ({r.tokens_cached} cached), {r.tokens_out} out, ${r.cost_usd:.6f}, {r.latency_ms:.0f} ms"))
    console.print(Text("state", style="bold"))
    console.print(Text(json.dumps(r.state, indent=2)))


def export(db: StoreTarget, prefix: str, *, output: Path | None) -> int:
    store = db.open(create=False)
    run_record = store.resolve_run(prefix)
    lines = (json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in store.export_run(run_record.id))
    if output is None:
        for line in lines:
            sys.stdout.write(line)
        return 0
    if not output.name or output.is_dir():  # "", ".", a folder: nothing to name the file after
        raise ConfigError(f"--output {clean(output)} is a folder, not a file; give a file name, e.g. run.jsonl")
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as f:
            f.writelines(lines)
        partial.replace(output)  # all or nothing: a failed export never leaves half a file
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}; pick another --output") from None
    _console().print(f"exported run {run_record.id} to {output}")
    return 0


def export_otlp(db: StoreTarget, prefix: str, *, endpoint: str | None) -> int:
    """Send the run's lineage as OpenTelemetry traces; one line saying how many spans went where."""
    from loopterm.tui.traces import export_run

    return export_run(db, prefix, endpoint)


def import_file(db: StoreTarget, path: Path) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}; check the path") from None
    store = db.open()
    imported = store.import_lines(text.split("\n"))  # only \n ends a line: U+2028 and kin are text in a JSON string; checked whole first
    _console().print(f"imported {len(imported)} run(s) into {db}: {', '.join(imported)}")
    return 0


def loops() -> int:
    console = _console()
    infos = list_loops([Path.cwd() / "loops", Path.cwd() / ".loopterm" / "loops"])
    table = Table(box=None, header_style="bold")
    table.add_column("loop", no_wrap=True)
    table.add_column("topology", no_wrap=True)
    table.add_column("what it does", ratio=1)
    table.add_column("source", overflow="fold")
    for info in infos:
        line = info.error or info.description or info.goal
        table.add_row(Text(clean(info.ref if info.source != "built-in" else info.name)), Text(clean(info.topology)),
                      Text(clean(line), style="red" if info.error else ""), Text(clean(info.source)))
    console.print(table)
    return 0
