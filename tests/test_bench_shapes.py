"""bench/shapes.py's workloads make the state shapes they claim, on the real engine and store, so the bench cannot rot.

150 iterations of each workload on loopterm, read back with `Store.state_at`: the list grows by one
item, the nested dict keeps 200 records of 5 fields with exactly 5 changed per iteration, the chat
transcript grows and is pruned and never holds more than 40 messages; every state equals the
workload's expected values. LangGraph's node updates, folded by the reducers the bench gives them,
reach the same values; with LangGraph installed (the `bench` extra) its phase runs too. The repeated
samples shapes.py judges on (first loads and forks, each on a freshly opened store, and short runs,
one through a child process as shapes.py runs them) run twice on loopterm, and the table takes them.
"""

from __future__ import annotations

import importlib.util
import operator
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.engine import Engine
from loopterm.store import Store

ROOT = Path(__file__).resolve().parents[1]
N = 150


def _bench(name: str) -> Any:
    """A bench module by file (bench/ is not a package; peers.py puts bench/ on sys.path for its own imports)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


peers = _bench("peers")
workloads = sys.modules["workloads"]


async def _states(name: str, root: Path) -> list[dict[str, Any]]:
    """The loopterm states after iterations 1..N of a workload's run, read back from a fresh Store."""
    workload = workloads.WORKLOADS[name]
    loop, client = peers.loopterm_loop(workload, N)
    store = Store.open(root / "bench.db")
    engine = Engine.create(loop, store, loop_ref="tests", workspace_root=root / "ws", workdir=root, client=client())
    run = await engine.run()
    store.close()
    assert run.iterations == N
    fresh = Store.open(root / "bench.db", create=False)
    try:
        states = [fresh.state_at(run.id, i) for i in range(1, N + 1)]
    finally:
        fresh.close()
    for i in (1, 2, 64, 65, N // 2, N):
        assert peers.same(states[i - 1], workload.expected(i)), f"{name}: state {i} is not the expected one"
    return states


async def test_list_grows_by_one_item(tmp_path: Path) -> None:
    states = await _states("list", tmp_path)
    assert [len(s["items"]) for s in states] == list(range(1, N + 1))
    assert all(len(s["items"][-1]) == workloads.ITEM_BYTES for s in states)
    assert len({k for k in workloads.scalar_defaults()} & set(states[0])) == workloads.SCALARS


async def test_nested_keeps_200_records_and_changes_5(tmp_path: Path) -> None:
    states = await _states("nested", tmp_path)
    previous = workloads.WORKLOADS["nested"].initial()["records"]
    for state in states:
        records = state["records"]
        assert len(records) == 200
        for rec in records.values():
            assert [type(v) for v in rec.values()] == [str, int, float, bool, str]
        assert sum(records[k] != previous[k] for k in records) == 5
        previous = records


async def test_chat_grows_and_is_pruned_to_at_most_40(tmp_path: Path) -> None:
    states = await _states("chat", tmp_path)
    lengths = [len(s["messages"]) for s in states]
    assert max(lengths) <= 40 and max(lengths) >= 30
    steps = [b - a for a, b in zip(lengths, lengths[1:])]
    assert {1, 2} <= set(steps) and min(steps) < 0  # grows by 1 or 2, and pruning shrinks it
    assert all(200 <= len(m["content"]) <= 600 and set(m) == {"role", "content"}
               for s in states for m in s["messages"])


@pytest.mark.parametrize("name", ["list", "nested", "chat"])
def test_langgraph_updates_reach_the_same_values(name: str) -> None:
    """The node's return, folded as the bench's channels do (operator.add, merge, replace), is the expected state."""
    workload = workloads.WORKLOADS[name]
    values = workload.initial()
    reducers = {"items": operator.add, "records": workloads.merge}
    for i in range(1, N + 1):
        for key, update in workload.langgraph_update(values, i).items():
            values[key] = reducers[key](values[key], update) if key in reducers else update
    assert values == workload.expected(N)


@pytest.mark.parametrize("name", ["list", "nested", "chat"])
def test_both_phases_run(name: str, tmp_path: Path) -> None:
    """Each phase checks its own load and fork against the expected values; here they only have to finish."""
    pytest.importorskip("langgraph.checkpoint.sqlite")
    workload = workloads.WORKLOADS[name]
    (tmp_path / "lt").mkdir()
    (tmp_path / "lg").mkdir()
    lt = peers.loopterm_phase(workload, N, N // 2, tmp_path / "lt", repeats=2)
    lg = peers.langgraph_phase(workload, N, N // 2, tmp_path / "lg", "sync", repeats=2)
    assert len(lt["times"]) == len(lg["times"]) == N
    assert lt["state_bytes"] > 0 and lg["state_bytes"] > 0
    assert len(lg["load_first_samples"]) == len(lg["fork_samples"]) == 2
    assert set(lg["fork_steps"]) == {"update_state", "invoke_10"}
    (tmp_path / "lg-short").mkdir()
    short = peers.short_phase("langgraph", workload, peers.SHORT, tmp_path / "lg-short")
    assert len(short["times"]) == peers.SHORT and short["early_ms"] > 0


def test_repeated_samples_reach_the_table(tmp_path: Path) -> None:
    """Two first loads and two forks on freshly opened stores (each fork checked against the expected
    state by the phase), two short runs (one in a child process), and the table's median (range) cells."""
    workload = workloads.WORKLOADS["nested"]
    (tmp_path / "lt").mkdir()
    lt = peers.loopterm_phase(workload, N, N // 2, tmp_path / "lt", repeats=2)
    assert len(lt["load_first_samples"]) == len(lt["fork_samples"]) == 2
    assert lt["load_first_s"] == statistics.median(lt["load_first_samples"])
    assert lt["fork_s"] == statistics.median(lt["fork_samples"])
    assert set(lt["fork_steps"]) == {"plan_fork", "create_fork", "rebuild_workspace", "engine_init", "run_10"}
    (tmp_path / "short").mkdir()
    in_process = peers.short_phase("loopterm", workload, peers.SHORT, tmp_path / "short")
    child = peers.run_phase("loopterm", "nested", peers.SHORT, 0, tmp_path, short=True, tag="-short1")
    for short in (in_process, child):
        assert len(short["times"]) == peers.SHORT
        assert short["early_ms"] == peers.window(short["times"], peers.EARLY) > 0
    lt["early_short_ms"] = [in_process["early_ms"], child["early_ms"]]
    lg = {**lt, "system": "LangGraph", "find_s": 0.001}  # loopterm's figures stand in for LangGraph's here
    shapes = _bench("shapes")
    lines = shapes.table([(lt, lg)])
    cells = {line.split(" | ")[1]: line.split(" | ")[2] for line in lines[2:]}
    early = cells["ms/iteration at 100: median of 2 short runs (each the median of 50 around 100)"]
    assert early == shapes.spread(lt["early_short_ms"]) and "-" in early and early.startswith(
        f"{statistics.median(lt['early_short_ms']):.2f} (")
    assert cells[f"fork at {N // 2} + 10 iterations, ms (median of 2)"].count("-") == 1
    assert shapes.spread([0.0012], 1e3) == "1.20"
