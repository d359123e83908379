"""`watch` on a shared PostgreSQL store: the screen reads the store when another process commits (LISTEN/
NOTIFY), not only at its next poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loopterm.core.control import Pause, Resume, command_payload
from loopterm.store import Store
from loopterm.store.target import StoreTarget
from loopterm.tui import app as app_module
from loopterm.tui.app import LooptermApp
from tests import loopkit
from tests.loopkit import decision, make_engine, make_loop
from tests.test_tui import SIZE, THEME, loaded, until


async def test_watch_follows_another_process_by_its_notifications(tmp_path: Path, pg_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopkit, "store_location", pg_url)
    turns = [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(4)]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, max_iterations=3), poll_interval=60.0)
    store.add_command(engine.run_id, *command_payload(Pause()))
    task = asyncio.create_task(engine.run())
    monkeypatch.setattr(app_module, "POLL_SECONDS", 60.0)  # only a notification can bring the rows in time
    app = LooptermApp(StoreTarget.parse(pg_url), watch_run=engine.run_id, theme=THEME, frozen=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: loaded(app) and app.view is not None and app.view.run.status == "paused",
                    "the paused run shown", 20)
        assert app.timeline.row_count == 0
        Store.open(pg_url).add_command(engine.run_id, *command_payload(Resume()))  # another process's answer
        await until(pilot, lambda: app.timeline.row_count == 3, lambda: f"{app.timeline.row_count} rows", 15)
        await until(pilot, lambda: app.view is not None and app.view.run.status == "terminated", "the end shown", 15)
    await asyncio.wait_for(task, 20)
    store.close()
