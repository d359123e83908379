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


def test_a_commit_skips_only_what_is_already_in_the_file(tmp_path: Path, monkeypatch: Any) -> None:
    """An iteration's commit writes no prompt section its run already stored, deletes no intent row that
    was never written, and finds a duplicate by the primary key; what it skips is always in the file: an
    intent left by a process that died, one written since, and a commit that failed halfway are all
    handled, and every prompt loads back exactly."""
    from loopterm.store import DuplicateIterationError, Store
    from tests.test_store import make_intent, make_iteration, make_run

    system = "You are the decision step. " * 8  # sections over 64 characters go to blobs
    def record(n: int, extra: str = "") -> Any:
        prompt = [{"role": "system", "content": f"{system}\n\n{'Tools: noop, look. ' * 5}"},
                  {"role": "user", "content": f"# Task\n\n{'the same task text ' * 5}\n\n{f'facts of {n} ' * 8}{extra}"}]
        return make_iteration("r1", n, prompt=prompt)

    db = tmp_path / "loopterm.db"
    other = Store.open(db)
    store = Store.open(db)
    store.create_run(make_run("r1"))
    other.save_intent(make_intent("r1", 3))  # left by a process that died, before this Store's first commit
    sql: list[str] = []
    store._conn.set_trace_callback(sql.append)
    committed = []
    for n in (1, 2):
        committed.append(record(n))
        store.commit_iteration(committed[-1], {"iterations": n})
    second = [s for s in sql if s.startswith(("INSERT OR IGNORE INTO blobs", "DELETE FROM intents", "SELECT 1 FROM iterations"))]
    sql.clear()
    assert not any(s.startswith("SELECT 1 FROM iterations") for s in second)
    store.commit_iteration(record(3), {"iterations": 3})
    assert on_disk(db, "SELECT n FROM intents WHERE run_id = 'r1'", []) == []  # the dead process's intent went
    blob_inserts = [s for s in sql if s.startswith("INSERT OR IGNORE INTO blobs")]
    assert len(blob_inserts) == 1 and "facts of 3" in blob_inserts[0]  # only the new section
    sql.clear()
    store.commit_iteration(committed[-1].model_copy(update={"n": 4}), {"iterations": 4})
    assert not [s for s in sql if s.startswith(("INSERT OR IGNORE INTO blobs", "DELETE FROM intents"))]
    store.save_intent(make_intent("r1", 5))  # written since: its commit deletes it
    store.commit_iteration(record(5), {"iterations": 5})
    assert on_disk(db, "SELECT n FROM intents WHERE run_id = 'r1'", []) == []

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk gone")

    with monkeypatch.context() as patch:  # a commit that stores new sections, then fails: none of it stays
        patch.setattr(store, "_update_run", fail)
        try:
            store.commit_iteration(record(6, "brand new section " * 5), {"iterations": 6})
        except RuntimeError:
            pass
    six = record(6, "brand new section " * 5)
    store.commit_iteration(six, {"iterations": 6})
    try:
        store.commit_iteration(six, {"iterations": 6})
        raise AssertionError("a duplicate was committed")
    except DuplicateIterationError:
        pass
    fresh = Store.open(db)
    assert [fresh.get_iteration("r1", n).prompt for n in (1, 2, 3, 6)] == [c.prompt for c in (*committed, record(3), six)]
    assert fresh.get_iteration("r1", 4).prompt == committed[-1].prompt
    for s in (fresh, store, other):
        s.close()


def test_a_call_found_absent_is_not_looked_up_again_yet_a_finished_one_is_never_restarted(tmp_path: Path) -> None:
    """tool_call() finding no row spares the start that follows its own SELECT; a call finished in
    between (queued or written) is still refused."""
    import pytest

    from loopterm.core.records import ToolCallRecord
    from loopterm.store import Store
    from tests.test_store import make_run

    store = Store.open(tmp_path / "loopterm.db")
    store.create_run(make_run("r1"))
    sql: list[str] = []
    store._conn.set_trace_callback(sql.append)

    def start(key: str) -> ToolCallRecord:
        return ToolCallRecord(key=key, run_id="r1", iteration=1, tool="look", args={}, status="started", started_at=1.0)

    assert store.tool_call("k1") is None
    store.tool_call_started(start("k1"), durable=False)
    assert not [s for s in sql if s.startswith("SELECT status FROM tool_calls")]
    store.tool_call_finished("k1", {"ok": True}, 2.0, durable=False)
    with pytest.raises(ValueError, match="already finished"):
        store.tool_call_started(start("k1"), durable=False)
    store.flush()
    assert store.tool_call("k2") is None
    store.tool_call_started(start("k2"))
    store.tool_call_finished("k2", {"ok": True}, 2.0)
    for key in ("k1", "k2"):
        with pytest.raises(ValueError, match="already finished"):
            store.tool_call_started(start(key))
    store.close()


def test_prompt_sections_remembered_encode_as_computed() -> None:
    """Encoding a prompt from the memo (a text seen before, or its sections) gives the same stored form and
    names the same blobs as computing it afresh, whatever the message's shape."""
    from loopterm.store import prompts

    long = "x" * 100
    messages = [
        {"role": "system", "content": "\n\n".join(f"section {i} " + long for i in range(6))},
        {"role": "user", "content": f"short\n\n{long} a\n\n{long} b"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": long},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": long + " b"},  # a whole text that is also a section seen above
    ]
    prompts._texts.clear()
    prompts._digests.clear()
    fresh_blobs: dict[str, str] = {}
    fresh = prompts.encode_prompt(messages, fresh_blobs)
    again_blobs: dict[str, str] = {}
    again = prompts.encode_prompt([dict(m) for m in messages], again_blobs)
    assert again == fresh and again_blobs == fresh_blobs
    assert len(fresh_blobs) == 6 + 1 + 2 + 1  # the system's sections and its ref list; the users'; the tool's
    blobs = dict(fresh_blobs)
    decoded = prompts.decode_prompt(again, blobs, lambda hashes: {h: blobs[h] for h in hashes})
    assert decoded == messages
    again[1]["s"].append("=x")  # what a caller does with the result does not reach the memo
    assert prompts.encode_prompt(messages, {}) == prompts.encode_prompt(messages, {})
    assert prompts.encode_prompt(messages, {})[1]["s"][-1] != "=x"


def test_rules_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    """read_rules answers from its cache only while the file's stat is unchanged and old enough; a
    rewrite of the same size right after a read is seen."""
    import os

    from loopterm.core.prompt import read_rules

    assert read_rules(tmp_path) is None
    rules = tmp_path / ".loopterm" / "RULES.md"
    rules.parent.mkdir()
    rules.write_text("Never use tabs.")
    assert read_rules(tmp_path) == "Never use tabs."
    rules.write_text("Always use tabs")  # the same size, within the clock's granularity
    assert read_rules(tmp_path) == "Always use tabs"
    old = time.time() - 10
    os.utime(rules, (old, old))  # settled: now cached by its stat
    assert read_rules(tmp_path) == "Always use tabs"
    rules.write_text("Spaces, four.")
    assert read_rules(tmp_path) == "Spaces, four."
    rules.unlink()
    assert read_rules(tmp_path) is None


async def test_pending_commands_skip_the_select_only_while_nothing_could_have_sent_one(tmp_path: Path) -> None:
    """The engine asks for commands before every iteration; the answer "none" is reused only while no other
    connection has committed and this Store has sent none (a pause from anywhere is still seen at once)."""
    from loopterm.store import Store

    loop = make_loop(tmp_path, [{"content": decision("done")}], gates=[], max_iterations=1)
    engine, store = make_engine(tmp_path, loop)
    await engine.run()
    run_id = engine.run_id
    selects: list[str] = []
    store._conn.set_trace_callback(lambda sql: selects.append(sql) if "commands" in sql and sql.startswith("SELECT") else None)
    other = Store.open(store.path)  # another connection, as another process would have
    try:
        assert store.pending_commands(run_id) == []
        assert store.pending_commands(run_id) == []
        assert len(selects) <= 1  # once at most (the engine's last check may already stand), then data_version
        selects.clear()
        other.add_command(run_id, "pause", {})
        assert [c.kind for c in store.pending_commands(run_id)] == ["pause"]
        assert len(selects) == 1
        store.consume_command(store.pending_commands(run_id)[0].id or 0)
        assert store.pending_commands(run_id) == []
        selects.clear()
        assert store.pending_commands(run_id) == []
        assert selects == []  # nothing committed since by anyone: the answer stands
        store.add_command(run_id, "stop", {})  # this Store's own connection: data_version does not move
        assert [c.kind for c in store.pending_commands(run_id)] == ["stop"]
    finally:
        other.close()
