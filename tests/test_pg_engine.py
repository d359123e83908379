"""An engine on a shared PostgreSQL store: the run's lock keeps a second engine out, and a command from
another process wakes a waiting engine through LISTEN/NOTIFY instead of its next poll."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from loopterm.core.control import Pause, Resume, command_payload
from loopterm.core.engine import Engine
from loopterm.core.errors import RunBusyError
from loopterm.core.events import StatusChanged
from loopterm.store import Store
from tests.loopkit import decision, make_engine, make_loop


def turns(k: int = 6) -> list:
    return [{"content": decision(text=f"v{i}", subgoal=f"s{i}")} for i in range(k)]


async def test_a_second_engine_cannot_drive_a_run_another_engine_holds(tmp_path: Path, pg_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import loopkit

    monkeypatch.setattr(loopkit, "store_location", pg_url)
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns(), max_iterations=2))
    other = Store.open(pg_url)  # another process's connection, as far as PostgreSQL can tell
    assert other.drive(engine.run_id)
    events_before = len(store.events(engine.run_id))
    with pytest.raises(RunBusyError, match="another engine"):
        await engine.run()
    assert len(store.events(engine.run_id)) == events_before  # refused before writing anything
    assert store.get_run(engine.run_id).status == "created"
    other.undrive(engine.run_id)
    run = await Engine(engine.loop, store, store.get_run(engine.run_id), workdir=tmp_path).run()
    assert run.iterations == 2
    assert other.drive(run.id)  # the engine let go of it when it ended
    other.close()


async def test_a_command_from_another_store_wakes_a_paused_engine_at_once(tmp_path: Path, pg_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import loopkit

    monkeypatch.setattr(loopkit, "store_location", pg_url)
    # A poll of a minute: only a notification can make it react within seconds.
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns(), max_iterations=3), poll_interval=60.0)
    statuses: list[str] = []
    engine.subscribe(lambda e: statuses.append(e.status) if isinstance(e, StatusChanged) else None)
    other = Store.open(pg_url)
    other.add_command(engine.run_id, *command_payload(Pause()))
    task = asyncio.create_task(engine.run())
    deadline = time.monotonic() + 20
    while "paused" not in statuses:
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.01)
    sent = time.monotonic()
    other.add_command(engine.run_id, *command_payload(Resume()))  # never engine.wake(): another process
    run = await asyncio.wait_for(task, 20)
    assert time.monotonic() - sent < 10  # the poll would have taken 60 s
    assert run.iterations == 3 and "running" in statuses[statuses.index("paused"):]
    other.close()
