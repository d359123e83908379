"""The iteration's write path (issue 15): one commit per iteration for a call without side effects,
and nothing with side effects fires before its reply and start are on disk."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from loopterm.core import ToolContext, tool
from loopterm.core.events import IterationCommitted
from loopterm.core import tools as tools_module
from tests.loopkit import decision, make_engine, make_loop


def on_disk(db: Path, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """What another process would see now: only committed rows."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_a_call_without_side_effects_costs_one_commit_per_iteration(tmp_path: Path) -> None:
    @tool
    async def look(text: str) -> str:
        """Look (no side effects)."""
        return text

    turns = [{"content": decision("look", text=f"t{i}")} for i in range(5)]
    loop = make_loop(tmp_path, turns, tools=[look], gates=[], max_iterations=5, stall_window=None, converged=lambda state, gates: False)
    engine, store = make_engine(tmp_path, loop)
    commits: list[str] = []
    per_iteration: list[int] = []
    store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)

    def committed(event: object) -> None:
        if isinstance(event, IterationCommitted):
            per_iteration.append(len(commits))
            commits.clear()

    engine.subscribe(committed)
    run = await engine.run()
    assert run.iterations == 5
    assert per_iteration[1:] == [1, 1, 1, 1]  # the first also carries the run's start
    calls = on_disk(store.path, "SELECT iteration, status FROM tool_calls WHERE run_id = ? ORDER BY iteration", [run.id])
    assert calls == [(n, "done") for n in range(1, 6)]  # the starts rode with the commits, as finished rows
    assert on_disk(store.path, "SELECT COUNT(*) FROM intents", []) == [(0,)]


async def test_a_side_effect_fires_only_after_its_reply_and_start_are_on_disk(tmp_path: Path) -> None:
    seen: list[tuple[Any, ...]] = []
    db = tmp_path / "db" / "loopterm.db"

    @tool(side_effects=True, idempotent=False)
    def send(ctx: ToolContext, text: str) -> str:
        """Send (a side effect)."""
        seen.append((on_disk(db, "SELECT n FROM intents WHERE run_id = ?", [ctx.run_id]),
                     on_disk(db, "SELECT status FROM tool_calls WHERE key = ?", [ctx.idempotency_key])))
        return "sent"

    loop = make_loop(tmp_path, [{"content": decision("send", text="hi")}], tools=[send], gates=[], max_iterations=1)
    engine, store = make_engine(tmp_path, loop)
    await engine.run()
    assert seen == [([(1,)], [("started",)])]


async def test_a_slow_call_without_side_effects_writes_its_reply_while_it_runs(tmp_path: Path, monkeypatch: Any) -> None:
    """Queued for the commit only while it is quick: a crash during a slow call does not pay for the reply again."""
    monkeypatch.setattr(tools_module, "QUEUE_FOR_S", 0.01)
    seen: list[tuple[Any, ...]] = []
    db = tmp_path / "db" / "loopterm.db"

    @tool
    async def slow(ctx: ToolContext, text: str) -> str:
        """Take a while (no side effects)."""
        assert on_disk(db, "SELECT n FROM intents WHERE run_id = ?", [ctx.run_id]) == []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            await asyncio.sleep(0.01)
            rows = on_disk(db, "SELECT n FROM intents WHERE run_id = ?", [ctx.run_id])
            if rows:
                seen.append((rows, on_disk(db, "SELECT status FROM tool_calls WHERE key = ?", [ctx.idempotency_key])))
        return "done"

    loop = make_loop(tmp_path, [{"content": decision("slow", text="x")}], tools=[slow], gates=[], max_iterations=1)
    engine, store = make_engine(tmp_path, loop)
    await engine.run()
    assert seen == [([(1,)], [("started",)])]
