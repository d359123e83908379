"""What each CLI command does. Imported only after the arguments parsed."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loopterm.core.engine import Engine
from loopterm.core.errors import ConfigError
from loopterm.core.loader import list_loops, load_loop
from loopterm.core.loop import Loop
from loopterm.core.records import RunRecord
from loopterm.core.termination import EXIT_CODES, Status
from loopterm.store import Store
from loopterm.tui.headless import (
    HeadlessProgress,
    action_label,
    as_json,
    gates_text,
    invariants_text,
    status_text,
    summary,
)

DEMO_LOOP = "codefix"


def _console() -> Console:
    return Console(highlight=False)


def _prepare_model(loop: Loop, model: str) -> None:
    """Fail before the run starts: unknown model, missing key, scripted model without a script."""
    from loopterm.core.model import check_model

    check_model(model, loop.script if model.startswith("scripted/") else None)


def _drive(engine: Engine, console: Console) -> int:
    engine.subscribe(HeadlessProgress(console))
    final = asyncio.run(engine.run())
    console.print(summary(final))
    return EXIT_CODES.get(Status(final.status), 1)


def demo() -> int:
    return run(DEMO_LOOP, _default_db())


def _default_db() -> Path:
    from loopterm.tui.cli import DEFAULT_DB

    return Path(os.environ.get("LOOPTERM_DB") or DEFAULT_DB)


def run(
    loop_ref: str,
    db: Path,
    *,
    model: str | None = None,
    headless: bool = True,
    max_iterations: int | None = None,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
) -> int:
    loop, ref = load_loop(loop_ref)
    chosen = model or loop.model
    _prepare_model(loop, chosen)
    store = Store.open(db)
    budget: dict[str, Any] = {}
    if budget_usd is not None:
        budget["usd"] = budget_usd
    if budget_tokens is not None:
        budget["tokens"] = budget_tokens
    engine = Engine.create(
        loop, store, loop_ref=ref, model=chosen, max_iterations=max_iterations, budget=budget,
        workspace_root=db.resolve().parent / "workspaces",
    )
    return _drive(engine, _console())


def resume(db: Path, prefix: str, *, max_iterations: int | None) -> int:
    store = Store.open(db, create=False)
    run_record = store.resolve_run(prefix)
    if run_record.status == Status.CONVERGED.value:
        raise ConfigError(f"run {run_record.id} already converged; nothing to resume (fork it to try something else)")
    loop, _ = load_loop(run_record.loop_ref)
    console = _console()
    if loop.spec_hash() != run_record.spec_hash:
        console.print(Text(f"note: loop {loop.name!r} changed since run {run_record.id} started; resuming with the current definition",
                           style="yellow"))
    _prepare_model(loop, run_record.model)
    if max_iterations is not None and max_iterations != run_record.max_iterations:
        store.update_run(run_record.id, max_iterations=max_iterations)
        store.append_event(run_record.id, "max_iterations_changed", {"from": run_record.max_iterations, "to": max_iterations})
        run_record = store.get_run(run_record.id)
    return _drive(Engine(loop, store, run_record), console)


def runs(db: Path, *, as_json_out: bool) -> int:
    if not db.exists():
        records: list[RunRecord] = []
    else:
        records = Store.open(db, create=False).list_runs()
    if as_json_out:
        print(as_json([r.model_dump() for r in records]))
        return 0
    console = _console()
    if not records:
        console.print(f"no runs yet in {db}; try `loopterm run codefix --headless`")
        return 0
    table = Table(box=None, header_style="bold")
    for col in ("run", "loop", "status", "iter", "tokens", "cost", "model", "started"):
        table.add_column(col, justify="right" if col in ("iter", "tokens", "cost") else "left")
    import datetime as dt

    for r in records:
        started = dt.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(r.id, r.loop, status_text(r.status), f"{r.iterations}/{r.max_iterations}",
                      f"{r.tokens_in + r.tokens_out:,}", f"${r.cost_usd:.4f}", r.model, started)
    console.print(table)
    return 0


def show(db: Path, prefix: str, *, iteration: int | None, as_json_out: bool) -> int:
    store = Store.open(db, create=False)
    run_record = store.resolve_run(prefix)
    console = _console()
    if iteration is not None:
        record = store.get_iteration(run_record.id, iteration)
        if record is None:
            raise ConfigError(
                f"run {run_record.id} has no iteration {iteration} (it has {run_record.iterations}); pick 1..{run_record.iterations}"
            )
        if as_json_out:
            print(json.dumps(record.model_dump(), indent=2, default=str))
            return 0
        _show_iteration(console, record)
        return 0
    iterations = store.iterations(run_record.id)
    if as_json_out:
        events = store.events(run_record.id)
        print(json.dumps({"run": run_record.model_dump(), "iterations": [i.model_dump() for i in iterations],
                          "events": [e.model_dump() for e in events]}, indent=2, default=str))
        return 0
    console.print(summary(run_record))
    table = Table(box=None, header_style="bold")
    for col in ("n", "action", "subgoal", "conf", "gates", "inv", "tokens", "cost", "ms"):
        table.add_column(col, justify="right" if col in ("n", "conf", "tokens", "cost", "ms") else "left")
    for r in iterations:
        d = r.decision or {}
        table.add_row(str(r.n), action_label(r), Text(str(d.get("subgoal", ""))[:50]), f"{float(d.get('confidence', 0)):.2f}",
                      gates_text(r), invariants_text(r), f"{r.tokens_in + r.tokens_out:,}", f"${r.cost_usd:.6f}",
                      f"{r.latency_ms:.0f}")
    console.print(table)
    return 0


def _show_iteration(console: Console, r: Any) -> None:
    d = r.decision or {}
    console.print(Text(f"iteration {r.n} of run {r.run_id}", style="bold"))
    console.print(Text.assemble(("subgoal     ", "bold"), Text(str(d.get("subgoal", "")))))
    console.print(Text.assemble(("confidence  ", "bold"), f"{float(d.get('confidence', 0)):.2f}"))
    console.print(Text.assemble(("reasoning   ", "bold"), Text(str(d.get("reasoning", "")))))
    console.print(Text.assemble(("action      ", "bold"), Text(action_label(r))))
    if r.tool_result:
        tr = r.tool_result
        console.print(Text.assemble(("tool result ", "bold"), Text(("ok: " + tr.get("output", "")) if tr.get("ok") else "error: " + str(tr.get("error")))))
    console.print(Text.assemble(("gates       ", "bold"), gates_text(r)))
    for g in r.gate_results:
        if not g["passed"]:
            console.print(Text((g.get("error") or g.get("stderr") or g.get("stdout") or "")[-1500:], style="red"))
    console.print(Text.assemble(("invariants  ", "bold"), Text(", ".join(f"{k}={'ok' if v else 'VIOLATED'}" for k, v in r.invariant_status.items()) or "-")))
    console.print(Text.assemble(("spend       ", "bold"), f"{r.tokens_in} in, {r.tokens_out} out, ${r.cost_usd:.6f}, {r.latency_ms:.0f} ms"))
    console.print(Text("state", style="bold"))
    console.print(Text(json.dumps(r.state, indent=2)))


def loops() -> int:
    console = _console()
    infos = list_loops([Path.cwd() / "loops", Path.cwd() / ".loopterm" / "loops"])
    table = Table(box=None, header_style="bold")
    for col in ("loop", "source", "model", "goal"):
        table.add_column(col)
    for info in infos:
        data = info.model_dump() if hasattr(info, "model_dump") else dict(info.__dict__)
        goal = data.get("error") or data.get("goal", "")
        table.add_row(str(data.get("name", "")), str(data.get("source", data.get("ref", ""))), str(data.get("model", "") or ""),
                      Text(str(goal).splitlines()[0][:70] if goal else "", style="red" if data.get("error") else ""))
    console.print(table)
    return 0
