"""Schema 2 of the store: delta-encoded state, prompt sections, lineage, migration from v1, export/import."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopterm.core.errors import ConfigError
from loopterm.core import runlog
from loopterm.core.records import Intent, IterationRecord, ToolCallRecord
from loopterm.core.runlog import EventRecord, from_stored
from loopterm.store import SCHEMA_VERSION, DuplicateIterationError, Store
from loopterm.store import delta as delta_module
from loopterm.store import states as states_module
from loopterm.store.delta import apply, apply_copy, diff
from tests.test_store import make_intent, make_iteration, make_run, sha, siblings, target_of

K = states_module.MAX_CHAIN


def canon(value: Any) -> str:
    """Strict equality: JSON text tells 1, 1.0 and True apart (== does not)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def it(run_id: str, n: int, state: dict[str, Any], **over: Any) -> IterationRecord:
    return make_iteration(run_id, n, state=state, **over)


@pytest.fixture
def store(store_target: str | Path) -> Iterator[Store]:
    """On SQLite, then on PostgreSQL."""
    s = Store.open(store_target)
    yield s
    s.close()


@pytest.fixture
def small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyframes every 4 iterations and chunks of 3 items, so short runs cross many boundaries."""
    monkeypatch.setattr(states_module, "MAX_CHAIN", 4)
    monkeypatch.setattr(delta_module, "CHUNK_ITEMS", 3)


# -- states: edits anywhere round-trip exactly ---------------------------------------


def edited_states(steps: int, seed: int = 7) -> list[dict[str, Any]]:
    """A scripted sequence of states with every kind of edit, each a fresh deep copy."""
    rng = random.Random(seed)
    state: dict[str, Any] = {"iteration": 0, "log": [], "memory": {"facts": ["a"], "nested": [[1, 2], [3]]}, "ü": "naïve 🚀"}
    out = []
    for n in range(1, steps + 1):
        state["iteration"] = n
        state["log"].append({"n": n, "text": f"step {n} – ünïcode 日本"})
        kind = n % 11
        if kind == 1:
            state[f"k{n}"] = {"added": n, "list": list(range(n % 5))}
        elif kind == 2 and len(state["log"]) > 3:
            state["log"][1]["text"] = f"edited at {n}"  # an old item changed in place
        elif kind == 3:
            for key in [k for k in state if k.startswith("k")][:1]:
                del state[key]  # a key removed
        elif kind == 4 and len(state["log"]) > 5:
            del state["log"][rng.randrange(2, len(state["log"])):]  # truncated
        elif kind == 5:
            state["memory"]["nested"][0].append(n)  # a nested list grows
            state["memory"]["nested"].append([n, {"deep": [n]}])
        elif kind == 6:
            state["memory"]["facts"] = state["memory"]["facts"][::-1] + ["z"]  # reordered
        elif kind == 7:
            state["flag"] = [True, 1, 1.0, 0, False, None][n % 6]  # type flips between equal values
        elif kind == 8:
            state["memory"] = {"replaced": n}  # a subtree replaced
            state["memory"]["facts"] = ["b"]
            state["memory"]["nested"] = [[n]]
        elif kind == 9 and state["log"]:
            state["log"][-1] = ["not", "a", "dict"]  # an item changes type
        elif kind == 10:
            state["log"].extend({"n": n, "bulk": i} for i in range(rng.randrange(0, 9)))
        out.append(copy.deepcopy(state))
    return out


@pytest.mark.parametrize("frames", ["real", "small"])
def test_states_round_trip_with_edits_anywhere(store: Store, frames: str, request: pytest.FixtureRequest) -> None:
    if frames == "small":
        request.getfixturevalue("small_frames")
    store.create_run(make_run())
    expected = edited_states(150)
    for n, state in enumerate(expected, 1):
        store.commit_iteration(it("run-0001", n, state), {"iterations": n})
    for n in [1, 2, 3, 4, 5, 63, 64, 65, 127, 128, 129, 150]:
        assert canon(store.state_at("run-0001", n)) == canon(expected[n - 1]), n
        record = store.get_iteration("run-0001", n)
        assert record is not None and canon(record.state) == canon(expected[n - 1])
    assert [canon(r.state) for r in store.iterations("run-0001")] == [canon(s) for s in expected]
    assert [canon(r.state) for r in store.last_iterations("run-0001", 70)] == [canon(s) for s in expected[-70:]]
    with Store.open(target_of(store)) as fresh:  # nothing depends on the writer's memory
        assert canon(fresh.state_at("run-0001", 97)) == canon(expected[96])


def test_state_at_bounds(store: Store) -> None:
    store.create_run(make_run())
    store.commit_iteration(it("run-0001", 1, {"a": 1}), {})
    assert store.state_at("run-0001", 0) is None  # the loop's initial state
    assert store.state_at("run-0001", 1) == {"a": 1}
    with pytest.raises(KeyError):
        store.state_at("run-0001", 2)
    with pytest.raises(KeyError):
        store.state_at("ghost", 1)
    with pytest.raises(KeyError):
        store.state_at("ghost", 0)


def test_returned_states_are_independent(store: Store) -> None:
    store.create_run(make_run())
    for n in range(1, 5):
        store.commit_iteration(it("run-0001", n, {"log": list(range(n))}), {})
    state = store.state_at("run-0001", 3)
    assert state is not None
    state["log"].append("mutated")
    assert store.state_at("run-0001", 3) == {"log": [0, 1, 2]}
    assert store.state_at("run-0001", 4) == {"log": [0, 1, 2, 3]}


def test_caller_mutating_its_state_after_commit_is_harmless(store: Store, small_frames: None) -> None:
    """The engine may reuse and mutate its objects: the store keeps its own copy of the last state."""
    store.create_run(make_run())
    log: list[Any] = []
    item = {"v": 0}
    expected = []
    for n in range(1, 21):
        log.append(n)
        item["v"] = n  # the same dict, changed in place every time
        state = {"log": log, "item": item, "items": [item] * 5}
        store.commit_iteration(it("run-0001", n, state), {})
        expected.append(copy.deepcopy(state))
    assert [r.state for r in store.iterations("run-0001")] == expected


def test_a_failed_commit_does_not_poison_the_next_delta(store: Store) -> None:
    store.create_run(make_run())
    store.commit_iteration(it("run-0001", 1, {"log": [1]}), {})
    with pytest.raises(ValueError):
        store.commit_iteration(it("run-0001", 2, {"log": [1, "lost"]}), {"no_such_field": 1})
    store.commit_iteration(it("run-0001", 2, {"log": [1, 2]}), {})
    store.commit_iteration(it("run-0001", 3, {"log": [1, 2, 3]}), {})
    assert store.state_at("run-0001", 2) == {"log": [1, 2]}
    assert store.state_at("run-0001", 3) == {"log": [1, 2, 3]}


def test_gaps_and_out_of_order_commits(store: Store, small_frames: None) -> None:
    store.create_run(make_run())
    order = [1, 2, 7, 3, 8, 9, 4, 5, 6, 10]
    for n in order:
        store.commit_iteration(it("run-0001", n, {"n": n, "log": list(range(n))}), {})
    for n in range(1, 11):
        assert store.state_at("run-0001", n) == {"n": n, "log": list(range(n))}
    assert [r.n for r in store.iterations("run-0001")] == list(range(1, 11))


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=4),
)
json_tree = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=3), inner, max_size=5)),
    max_leaves=25,
)
json_state = st.dictionaries(st.sampled_from(["a", "b", "c", "log", "ü"]), json_tree, max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_state, min_size=2, max_size=8))
def test_diff_then_apply_is_exact(states: list[dict[str, Any]]) -> None:
    current = json.loads(json.dumps(states[0]))
    shared = current
    for new in states[1:]:
        ops = json.loads(json.dumps(diff(current, new)))
        before = canon(shared)
        copied = apply_copy(shared, ops)
        assert canon(shared) == before  # the copy-on-write variant leaves its input alone
        assert canon(copied) == canon(new)
        current = apply(current, ops)
        assert canon(current) == canon(new)
        shared = copied


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(json_state, min_size=1, max_size=14))
def test_any_state_sequence_round_trips_through_the_store(tmp_path_factory: pytest.TempPathFactory, states: list[dict[str, Any]]) -> None:
    with Store.open(tmp_path_factory.mktemp("h") / "h.db") as s:
        s.create_run(make_run())
        for n, state in enumerate(states, 1):
            s.commit_iteration(it("run-0001", n, state), {})
        assert [canon(r.state) for r in s.iterations("run-0001")] == [canon(x) for x in states]
        assert canon(s.state_at("run-0001", len(states))) == canon(states[-1])


# -- the size and read properties the issue asks for ---------------------------------


def growing(n: int) -> dict[str, Any]:
    """The issue's workload: ~20 scalars and a list growing by one ~200-byte item per iteration."""
    fields: dict[str, Any] = {f"field_{i}": (n if i < 6 else i) for i in range(20)}
    fields["log"] = [{"n": i, "out": f"{i:06d} " + "x" * 180} for i in range(1, n + 1)]
    return fields


def state_bytes(store: Store) -> int:
    """Bytes written for state: deltas, keyframes and the chunks keyframes refer to."""
    own = store._conn.execute("SELECT coalesce(sum(length(CAST(body AS BLOB))), 0) FROM states").fetchone()[0]
    bodies = [delta_module.loads(b) for (b,) in store._conn.execute("SELECT body FROM states WHERE keyframe = 1")]
    hashes = sorted({h for body in bodies for _, hs in body.get("c", []) for h in hs})
    chunks = sum(store._conn.execute("SELECT length(CAST(body AS BLOB)) FROM blobs WHERE hash = ?", [h]).fetchone()[0] for h in hashes)
    return own + chunks


def commit_growing(store: Store, run_id: str, first: int, last: int) -> None:
    log: list[Any] = growing(first - 1)["log"] if first > 1 else []
    for n in range(first, last + 1):
        log.append({"n": n, "out": f"{n:06d} " + "x" * 180})
        state = {**{f"field_{i}": (n if i < 6 else i) for i in range(20)}, "log": log}
        store.commit_iteration(it(run_id, n, state), {"iterations": n})


def test_state_bytes_per_iteration_stay_small_and_flat(store: Store) -> None:
    store.create_run(make_run())
    commit_growing(store, "run-0001", 1, 1000)
    first_half = state_bytes(store)
    commit_growing(store, "run-0001", 1001, 2000)
    total = state_bytes(store)
    assert total / 2000 < 1024  # the issue's bound
    assert (total - first_half) < 1.3 * first_half  # the second thousand costs about what the first did
    assert store.state_at("run-0001", 2000) == growing(2000)
    assert store.state_at("run-0001", 1234) == growing(1234)


def test_state_at_reads_one_keyframe_and_fewer_than_k_deltas(store: Store) -> None:
    store.create_run(make_run())
    commit_growing(store, "run-0001", 1, 700)
    seen: list[tuple[str, Any]] = []
    for n in (1, 63, 64, 127, 640, 700):
        seen.clear()
        if store.backend != "sqlite":
            pytest.skip("counts statements with SQLite's tracer")
        with store._db.tracer(lambda sql, params: seen.append((sql, params))):
            assert store.state_at("run-0001", n) == growing(n)
        statements = [sql for sql, _ in seen]
        assert len(statements) <= 4, statements  # lineage, keyframe, its chunks, the deltas
        ranges = [params for sql, params in seen if "FROM states WHERE run_id = ? AND n > ?" in sql and "keyframe = 1" not in sql]
        assert all(hi - lo < K for _, lo, hi, _ in ranges), ranges
        assert sum(hi - lo for _, lo, hi, _ in ranges) < K


# -- prompts -----------------------------------------------------------------------


def test_prompts_are_stored_by_section_and_reassembled_exactly(store: Store) -> None:
    store.create_run(make_run())
    system = "\n\n".join(f"Rule {i}: " + "be careful and precise. " * 8 for i in range(40))  # ~8 KB
    odd = [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n\n\nleading blank lines\n\n\n\ntrailing\n\n"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
        {"role": "user", "content": [{"type": "text", "text": "parts"}]},
        {"content": "no role 🚀 " * 20},
        {"role": "user", "name": "ada"},
    ]
    store.commit_iteration(it("run-0001", 1, {"s": 1}, prompt=odd), {})
    assert store.get_iteration("run-0001", 1).prompt == odd  # type: ignore[union-attr]

    def prompt_bytes() -> int:
        rows = store._conn.execute("SELECT coalesce(sum(length(CAST(prompt AS BLOB))), 0) FROM iterations").fetchone()[0]
        return rows + store._conn.execute("SELECT coalesce(sum(length(CAST(body AS BLOB))), 0) FROM blobs").fetchone()[0]

    before = prompt_bytes()
    repeats, users = 100, 0
    for n in range(2, repeats + 2):
        user = f"Iteration {n}.\n\nThe last test run said:\n\n" + f"FAILED test_{n}.py::test_x - assert {n} == 0 " * 3
        users += len(user.encode())
        store.commit_iteration(it("run-0001", n, {"s": n}, prompt=[{"role": "system", "content": system}, {"role": "user", "content": user}]), {})
    grown = prompt_bytes() - before
    assert grown < users + repeats * 150  # the ~8 KB system prompt costs under 150 bytes an iteration
    assert grown < len(system.encode()) * 5  # 100 more copies of it cost less than 5
    record = store.get_iteration("run-0001", 50)
    assert record is not None and record.prompt[0]["content"] == system and record.prompt[1]["content"].startswith("Iteration 50.")


# -- lineage -----------------------------------------------------------------------


class Tree:
    """Runs, forks and the states each (run, n) must show."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.expected: dict[str, dict[int, dict[str, Any]]] = {}
        self.owner: dict[str, dict[int, str]] = {}

    def root(self, run_id: str, steps: int) -> None:
        self.store.create_run(make_run(run_id))
        self.expected[run_id], self.owner[run_id] = {}, {}
        self.extend(run_id, 1, steps)

    def fork(self, run_id: str, parent: str, at: int, steps: int) -> None:
        self.store.create_run(make_run(run_id, parent_run=parent, fork_iteration=at, origin="fork"))
        self.expected[run_id] = {n: s for n, s in self.expected[parent].items() if n <= at}
        self.owner[run_id] = {n: o for n, o in self.owner[parent].items() if n <= at}
        self.extend(run_id, at + 1, at + steps)

    def extend(self, run_id: str, first: int, last: int) -> None:
        state = copy.deepcopy(self.expected[run_id].get(first - 1, {"log": [], "who": None}))
        for n in range(first, last + 1):
            state["who"] = f"{run_id}@{n}"
            state["log"].append(f"{run_id}:{n}")
            if n % 13 == 0:
                state["log"] = state["log"][: len(state["log"]) // 2]
            self.store.commit_iteration(it(run_id, n, copy.deepcopy(state)), {"iterations": n})
            self.expected[run_id][n] = copy.deepcopy(state)
            self.owner[run_id][n] = run_id

    def check(self, run_id: str) -> None:
        expected, owners = self.expected[run_id], self.owner[run_id]
        records = self.store.iterations(run_id)
        assert [r.n for r in records] == sorted(expected)
        assert [r.run_id for r in records] == [owners[n] for n in sorted(expected)]
        assert [r.state for r in records] == [expected[n] for n in sorted(expected)]
        own = self.store.iterations(run_id, own_only=True)
        assert [r.n for r in own] == [n for n in sorted(expected) if owners[n] == run_id]
        for n in sorted(expected):
            assert self.store.state_at(run_id, n) == expected[n], (run_id, n)
        for n in {1, min(expected), max(expected)} | set(list(expected)[:: max(1, len(expected) // 7)]):
            record = self.store.get_iteration(run_id, n)
            assert record is not None and record.run_id == owners[n] and record.state == expected[n]
        assert [r.n for r in self.store.last_iterations(run_id, 5)] == sorted(expected)[-5:]
        assert self.store.get_iteration(run_id, max(expected) + 1) is None


@pytest.mark.parametrize("at", [1, 70, 150])
def test_fork_at_first_middle_and_last_iteration(store: Store, at: int) -> None:
    tree = Tree(store)
    tree.root("root", 150)
    tree.fork("branch", "root", at, 80)
    tree.check("branch")
    tree.check("root")  # the parent is unaffected
    assert [r.n for r in store.last_iterations("branch", 100)] == list(range(max(1, at + 80 - 99), at + 81))


def test_fork_of_fork_and_the_tree(store: Store) -> None:
    tree = Tree(store)
    tree.root("a", 100)
    tree.fork("b", "a", 70, 30)  # b: a's 1..70, own 71..100
    tree.fork("c", "b", 85, 20)  # c: a's 1..70, b's 71..85, own 86..105
    tree.fork("d", "b", 40, 5)  # d forks b inside what b inherits from a
    tree.fork("e", "a", 0, 3)  # from the start: inherits nothing
    for run_id in "abcde":
        tree.check(run_id)
    assert [r.id for r in store.lineage("c")] == ["a", "b", "c"]
    assert [r.id for r in store.lineage("a")] == ["a"]
    assert [r.id for r in store.children("b")] == ["c", "d"]
    assert store.children("c") == []
    assert [(depth, r.id) for depth, r in store.tree()] == [(0, "a"), (1, "b"), (2, "c"), (2, "d"), (1, "e")]
    assert store.get_run("c").origin == "fork"
    with pytest.raises(KeyError):
        store.lineage("ghost")
    with pytest.raises(DuplicateIterationError, match="inherited"):
        store.commit_iteration(it("c", 80, {}), {})


def test_iteration_tool_calls_read_no_state(store: Store) -> None:
    store.create_run(make_run("a"))
    for n in range(1, 8):
        call = {"tool": "send", "args": {"n": n}, "key": f"a{n}"} if n % 2 else None
        store.commit_iteration(it("a", n, {"big": list(range(n * 100))}, tool_call=call), {})
    store.create_run(make_run("b", parent_run="a", fork_iteration=4, origin="fork"))
    store.commit_iteration(it("b", 5, {}, tool_call={"tool": "write", "args": {}, "key": "b5"}), {})
    seen: list[str] = []
    if store.backend != "sqlite":
        pytest.skip("counts statements with SQLite's tracer")
    with store._db.tracer(lambda sql, params: seen.append(sql)):
        calls = store.iteration_tool_calls("b")
    assert [(r, n, c["key"]) for r, n, c in calls] == [("a", 1, "a1"), ("a", 3, "a3"), ("b", 5, "b5")]
    assert not any("states" in sql or "blobs" in sql for sql in seen)
    assert [n for _, n, _ in store.iteration_tool_calls("a", after=2, upto=6)] == [3, 5]
    assert [n for _, n, _ in store.iteration_tool_calls("b", own_only=True)] == [5]


def fact(i: int) -> str:
    return f"fact number {i:04d} " + hashlib.sha256(str(i).encode()).hexdigest()[:40]


def test_a_sliding_window_costs_its_new_items(store: Store) -> None:
    store.create_run(make_run())
    for n in range(1, 61):
        facts = [fact(i) for i in range(max(0, n - 12), n)]  # hex: a keyframe compresses little, so deltas are kept
        store.commit_iteration(it("run-0001", n, {"memory": {"facts": facts}}), {})
    deltas = [delta_module.decode_delta(b) for (b,) in store._conn.execute("SELECT body FROM states WHERE keyframe = 0 AND n > 12")]
    assert deltas and all(len(json.dumps(ops)) < 150 for ops in deltas)  # one new fact and a drop, not the 12-item window
    assert store.state_at("run-0001", 45) == {"memory": {"facts": [fact(i) for i in range(33, 45)]}}


def test_a_branch_reads_its_parent_without_copying_it(store: Store) -> None:
    tree = Tree(store)
    tree.root("root", 200)
    rows_before = store._conn.execute("SELECT count(*) FROM iterations").fetchone()[0]
    tree.fork("branch", "root", 190, 0)
    assert store._conn.execute("SELECT count(*) FROM iterations").fetchone()[0] == rows_before
    assert store.state_at("branch", 190) == tree.expected["root"][190]


# -- prior tool calls --------------------------------------------------------------


def test_prior_tool_calls(store: Store) -> None:
    store.create_run(make_run("a"))
    store.create_run(make_run("b", parent_run="a", fork_iteration=2, origin="fork"))

    def call(key: str, run_id: str, n: int, tool: str, args: dict[str, Any], done: bool = True) -> None:
        store.tool_call_started(ToolCallRecord(key=key, run_id=run_id, iteration=n, tool=tool, args=args, status="started", started_at=float(n)))
        if done:
            store.tool_call_finished(key, {"ok": True, "output": key}, n + 0.5)

    args = {"to": "ada@example.com", "body": {"lines": ["hi", "ü"], "n": 1}}
    call("k1", "a", 1, "send", args)
    call("k3", "a", 3, "send", {"body": {"n": 1, "lines": ["hi", "ü"]}, "to": "ada@example.com"})  # same args, other order
    call("k4", "a", 4, "send", args, done=False)  # never finished
    call("k5", "a", 5, "send", {**args, "to": "bob@example.com"})
    call("k6", "a", 6, "write", args)
    call("k7", "b", 3, "send", args)
    found = store.prior_tool_calls(["b", "a"], "send", dict(reversed(list(args.items()))))
    assert [c.key for c in found] == ["k7", "k1", "k3"]  # by run order given, then iteration
    assert found[1].result == {"ok": True, "output": "k1"} and found[1].status == "done"
    assert [c.key for c in store.prior_tool_calls(["a"], "send", args, {"a": 2})] == ["k3"]
    assert [c.key for c in store.prior_tool_calls(["a", "b"], "send", args, {"a": 3, "b": 2})] == ["k7"]
    assert store.prior_tool_calls([], "send", args) == []
    assert store.prior_tool_calls(["a"], "send", {"to": "nobody"}) == []


# -- export and import ----------------------------------------------------------------


def populated(path: Path) -> Store:
    s = Store.open(path)
    tree = Tree(s)
    tree.root("root", 90)
    tree.fork("mid", "root", 64, 10)
    tree.fork("leaf", "mid", 70, 5)
    tree.root("other", 3)
    for run_id in ("root", "mid", "leaf", "other"):
        s.append_event(run_id, runlog.StatusChanged(status="running", message=f"ü {run_id}"), 1)
        s.tool_call_started(ToolCallRecord(key=f"k-{run_id}", run_id=run_id, iteration=2, tool="send", args={"x": run_id}, status="started", started_at=1.0))
        s.tool_call_finished(f"k-{run_id}", {"ok": True}, 2.0)
    s.commit_iteration(it("leaf", 76, {"log": []}, prompt=[{"role": "system", "content": "long section " * 20 + "\n\nshort"}]),
                       {"iterations": 76})
    return s


def lines_of(store: Store, run_id: str) -> list[str]:
    return [json.dumps(item, ensure_ascii=False, sort_keys=True) for item in store.export_run(run_id)]


def test_export_import_round_trip(tmp_path: Path, store_target: str | Path) -> None:
    with populated(tmp_path / "one.db") as one, Store.open(store_target) as two:
        exported = lines_of(one, "leaf")
        assert json.loads(exported[0]) == {"type": "loopterm-export", "version": 2}
        kinds = [json.loads(line)["type"] for line in exported]
        assert kinds.count("run") == 3 and kinds.count("iteration") == 90 + 10 + 6
        assert [json.loads(line)["id"] for line in exported if json.loads(line)["type"] == "run"] == ["root", "mid", "leaf"]
        assert two.import_lines(exported) == ["root", "mid", "leaf"]
        assert lines_of(two, "leaf") == exported
        assert [r.state for r in two.iterations("leaf")] == [r.state for r in one.iterations("leaf")]
        assert two.tree() == [(0, two.get_run("root")), (1, two.get_run("mid")), (2, two.get_run("leaf"))]
        # the same runs again: refused by name, nothing imported
        counts = [two._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "iterations", "events", "tool_calls", "states")]
        with pytest.raises(ConfigError, match=rf"^line 2: run root is already in {re.escape(two.location)}; nothing was imported$"):
            two.import_lines(exported)
        assert [two._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "iterations", "events", "tool_calls", "states")] == counts


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda ls: ls[:3] + ["{not json"] + ls[3:], r"^line 4: not JSON"),
        (lambda ls: ls[1:], r"^line 1: not a loopterm export"),
        (lambda ls: [ls[0].replace('"version": 2', '"version": 9')] + ls[1:], r"^line 1: export format version 9 is not supported"),
        (lambda ls: ls[:2] + ['{"type": "mystery"}'] + ls[2:], r"^line 3: unknown record type 'mystery'"),
        (lambda ls: ls[:2] + ['{"type": "iteration", "run_id": "root", "n": "x"}'] + ls[2:], r"^line 3: invalid iteration record at"),
        (lambda ls: [ls[0]] + ls[2:], r"^line 2: iteration of run 'root', which no earlier line of this file defines"),
        (lambda ls: ls[:6] + [ls[5]] + ls[6:], r"^line 7: run root: iteration 4 again, after iteration 4"),
        (lambda ls: ["[1, 2]"] + ls, r"^line 1: expected a JSON object"),
        (lambda ls: [], r"^no loopterm export found"),
    ],
)
def test_import_refuses_malformed_lines_with_their_number(tmp_path: Path, mangle: Any, message: str,
                                                          store_target: str | Path) -> None:
    with populated(tmp_path / "one.db") as one, Store.open(store_target) as two:
        lines = lines_of(one, "root")
        with pytest.raises(ConfigError, match=message) as info:
            two.import_lines(mangle(lines))
        assert "\n" not in str(info.value) and str(info.value).endswith("nothing was imported")
        assert two.list_runs() == []
        assert two._conn.execute("SELECT count(*) FROM states").fetchone()[0] == 0


# -- migration from schema 1 ------------------------------------------------------------

V1_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    id                 TEXT PRIMARY KEY,
    loop               TEXT NOT NULL,
    loop_ref           TEXT NOT NULL,
    goal               TEXT NOT NULL,
    spec_hash          TEXT NOT NULL,
    model              TEXT NOT NULL,
    status             TEXT NOT NULL,
    workspace          TEXT NOT NULL,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL,
    parent_run         TEXT REFERENCES runs(id),
    fork_iteration     INTEGER,
    max_iterations     INTEGER NOT NULL,
    budget             TEXT NOT NULL,
    iterations         INTEGER NOT NULL,
    tokens_in          INTEGER NOT NULL,
    tokens_out         INTEGER NOT NULL,
    cost_usd           REAL NOT NULL,
    elapsed_s          REAL NOT NULL,
    termination_reason TEXT,
    message            TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_parent ON runs(parent_run);

CREATE TABLE IF NOT EXISTS iterations (
    run_id           TEXT NOT NULL REFERENCES runs(id),
    n                INTEGER NOT NULL,
    started_at       REAL NOT NULL,
    ended_at         REAL NOT NULL,
    prompt           TEXT NOT NULL,
    raw_response     TEXT NOT NULL,
    decision         TEXT,
    repairs          INTEGER NOT NULL,
    tool_call        TEXT,
    tool_result      TEXT,
    gate_results     TEXT NOT NULL,
    invariant_status TEXT NOT NULL,
    remediations     TEXT NOT NULL,
    tokens_in        INTEGER NOT NULL,
    tokens_out       INTEGER NOT NULL,
    cost_usd         REAL NOT NULL,
    latency_ms       REAL NOT NULL,
    model            TEXT NOT NULL,
    state            TEXT NOT NULL,
    PRIMARY KEY (run_id, n)
);

CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL REFERENCES runs(id),
    iteration INTEGER,
    ts        REAL NOT NULL,
    kind      TEXT NOT NULL,
    data      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id, id);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE IF NOT EXISTS tool_calls (
    key         TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(id),
    iteration   INTEGER NOT NULL,
    tool        TEXT NOT NULL,
    args        TEXT NOT NULL,
    status      TEXT NOT NULL,
    result      TEXT,
    started_at  REAL NOT NULL,
    finished_at REAL
);

CREATE TABLE IF NOT EXISTS intents (
    run_id       TEXT NOT NULL REFERENCES runs(id),
    n            INTEGER NOT NULL,
    prompt       TEXT NOT NULL,
    raw_response TEXT NOT NULL,
    decision     TEXT NOT NULL,
    repairs      INTEGER NOT NULL,
    tokens_in    INTEGER NOT NULL,
    tokens_out   INTEGER NOT NULL,
    cost_usd     REAL NOT NULL,
    latency_ms   REAL NOT NULL,
    model        TEXT NOT NULL,
    started_at   REAL NOT NULL,
    PRIMARY KEY (run_id, n)
);

CREATE TABLE IF NOT EXISTS commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL REFERENCES runs(id),
    ts          REAL NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    consumed_at REAL
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(run_id, id) WHERE consumed_at IS NULL;
"""

V1_JSON = {
    "runs": {"budget"},
    "iterations": {"prompt", "decision", "tool_call", "tool_result", "gate_results", "invariant_status", "remediations", "state"},
    "events": {"data"}, "tool_calls": {"args", "result"}, "intents": {"prompt", "decision"}, "commands": {"payload"},
}


LATER_FIELDS = ("decision_mode", "tokens_cached")  # schema 4's, which a v1 file has no columns for


def v1_row(table: str, record: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    data = {k: v for k, v in record.model_dump().items() if k not in drop and k not in LATER_FIELDS}
    return {k: json.dumps(v, ensure_ascii=False) if k in V1_JSON[table] and v is not None else v for k, v in data.items()}


def v1_insert(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def build_v1(path: Path, *, runs: int = 2, steps: int = 70, wal: bool = True) -> dict[str, Any]:
    """A database as loopterm with schema 1 wrote it, and the records it holds."""
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode = wal")
    conn.executescript(V1_SCHEMA_SQL)
    conn.execute("INSERT INTO meta (key, value) VALUES ('app', 'loopterm'), ('schema_version', '1')")
    written: dict[str, Any] = {"runs": [], "iterations": {}, "events": {}, "tool_calls": [], "intents": [], "commands": []}
    system = "\n\n".join(f"Section {i} of a long system prompt. " * 4 for i in range(6))
    for r in range(runs):
        run = make_run(f"v1run-{r}", iterations=steps, tokens_in=10 * steps, message="ü")
        v1_insert(conn, "runs", v1_row("runs", run, drop=("origin",)))
        written["runs"].append(run)
        records = []
        for n in range(1, steps + 1):
            state = {"iteration": n, "log": [{"n": i, "t": "x" * 50} for i in range(n)], "memory": {"facts": ["ü"] * (n % 4)}}
            record = it(run.id, n, state, prompt=[{"role": "system", "content": system}, {"role": "user", "content": f"step {n}"}],
                        tool_call={"tool": "send", "args": {"n": n}, "key": f"{run.id}-k{n}"}, cost_usd=0.001 * n)
            v1_insert(conn, "iterations", v1_row("iterations", record))
            records.append(record)
        written["iterations"][run.id] = records
        events = []
        # as a v1 engine wrote them: known kinds, and one no model fits (kept as Unrecognized)
        stored = [("run_started", {"from_iteration": 0}), ("status_changed", {"status": "paused", "message": "ü"}),
                  ("note", {"i": 2})]
        for i, (kind, data) in enumerate(stored):
            cursor = conn.execute("INSERT INTO events (run_id, iteration, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
                                  [run.id, i, 100.0 + i, kind, json.dumps(data)])
            events.append(EventRecord(id=cursor.lastrowid, run_id=run.id, iteration=i, ts=100.0 + i,
                                      event=from_stored(kind, data)))
        written["events"][run.id] = events
        call = ToolCallRecord(key=f"{run.id}-k1", run_id=run.id, iteration=1, tool="send", args={"n": 1}, status="done",
                              result={"ok": True}, started_at=1.0, finished_at=2.0)
        v1_insert(conn, "tool_calls", v1_row("tool_calls", call))
        written["tool_calls"].append(call)
        intent = make_intent(run.id, steps + 1)
        v1_insert(conn, "intents", v1_row("intents", intent))
        written["intents"].append(intent)
    conn.execute("INSERT INTO commands (run_id, ts, kind, payload) VALUES ('v1run-0', 5.0, 'stop', '{}')")
    conn.commit()
    conn.close()
    return written


def schema_of(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    shape = {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in tables}
    shape["indexes"] = sorted(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('index', 'trigger')").fetchall())
    conn.close()
    return shape


@pytest.mark.parametrize("wal", [True, False])
def test_v1_database_is_migrated_after_a_backup(tmp_path: Path, wal: bool) -> None:
    path = tmp_path / "old.db"
    written = build_v1(path, wal=wal)
    with Store.open(path, create=False) as s:
        assert s.migrated_from == 1
        backup = path.with_name("old.db.v1.bak")
        assert s.backup_path == backup
        meta = dict(s._db.execute("SELECT key, value FROM meta").fetchall())
        assert meta["schema_version"] == str(SCHEMA_VERSION) and meta["last_backup"] == str(backup)
        assert s.list_runs() == written["runs"]
        for run in written["runs"]:
            assert s.iterations(run.id) == written["iterations"][run.id]
            assert s.get_iteration(run.id, 65) == written["iterations"][run.id][64]
            assert s.state_at(run.id, 70) == written["iterations"][run.id][69].state
            assert s.events(run.id) == written["events"][run.id]
            assert [type(e.event) for e in s.events(run.id)] == [runlog.RunStarted, runlog.StatusChanged, runlog.Unrecognized]
            assert runlog.to_stored(s.events(run.id)[2].event) == ("note", {"i": 2})
        assert [s.tool_call(c.key) for c in written["tool_calls"]] == written["tool_calls"]
        assert [s.load_intent(i.run_id, i.n) for i in written["intents"]] == written["intents"]
        assert [c.kind for c in s.pending_commands("v1run-0")] == ["stop"]
        assert [c.key for c in s.prior_tool_calls(["v1run-0"], "send", {"n": 1})] == ["v1run-0-k1"]
        # the migrated run goes on as a v2 run, and can be forked
        s.commit_iteration(it("v1run-0", 71, {"iteration": 71, "log": []}), {"iterations": 71})
        s.create_run(make_run("fork", parent_run="v1run-0", fork_iteration=69, origin="fork"))
        assert s.state_at("fork", 69) == written["iterations"]["v1run-0"][68].state
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s._db.execute("PRAGMA foreign_key_check").fetchall() == []
    # the backup is the v1 file as it was: a valid v1 database with the same data
    conn = sqlite3.connect(backup)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert dict(conn.execute("SELECT key, value FROM meta").fetchall()) == {"app": "loopterm", "schema_version": "1"}
    assert conn.execute("SELECT count(*) FROM iterations").fetchone()[0] == 140
    assert "state" in [row[1] for row in conn.execute("PRAGMA table_info(iterations)")]
    conn.close()
    # same layout as a database created at schema 2
    fresh = tmp_path / "fresh.db"
    Store.open(fresh).close()
    assert schema_of(path) == schema_of(fresh)
    with Store.open(path) as again:
        assert again.migrated_from is None and again.backup_path is None


def test_a_second_backup_does_not_overwrite_the_first(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    build_v1(path, runs=1, steps=3)
    taken = path.with_name("old.db.v1.bak")
    taken.write_text("someone's file")
    with Store.open(path) as s:
        assert s.backup_path == path.with_name("old.db.v1.2.bak")
    assert taken.read_text() == "someone's file"


def test_a_failed_migration_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    build_v1(path, runs=1, steps=5, wal=False)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE iterations SET state = '{broken' WHERE n = 4")
    conn.commit()
    conn.close()
    before, files = sha(path), siblings(path)
    with pytest.raises(ConfigError, match=r"^cannot upgrade .*old\.db from schema 1 to 2 \(.*\); the file is unchanged; ") as info:
        Store.open(path)
    assert "\n" not in str(info.value)
    assert sha(path) == before
    assert siblings(path) == files  # no backup, no -wal or -journal left
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    conn.close()


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with Store.open(path) as s:
        s.create_run(make_run())
        s.commit_iteration(it("run-0001", 1, {"a": 1}), {})
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    conn.commit()
    conn.close()
    before, files = sha(path), siblings(path)
    with pytest.raises(ConfigError, match=rf"newer loopterm \(schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}\); upgrade loopterm$"):
        Store.open(path)
    assert sha(path) == before and siblings(path) == files


def test_hashes_in_the_store_are_content_addresses(store: Store) -> None:
    store.create_run(make_run())
    store.commit_iteration(it("run-0001", 1, {"log": list(range(200))}, prompt=[{"role": "user", "content": "y" * 500}]), {})
    for digest, body in store._conn.execute("SELECT hash, body FROM blobs"):
        assert digest == hashlib.blake2b(body.encode(), digest_size=16).hexdigest()
    assert store.get_iteration("run-0001", 1).state == {"log": list(range(200))}  # type: ignore[union-attr]


def test_intent_prompts_are_unchanged(store: Store) -> None:
    store.create_run(make_run())
    intent = Intent(**{**make_intent("run-0001", 1).model_dump(), "prompt": [{"role": "system", "content": "a\n\nb" * 100}]})
    store.save_intent(intent)
    assert store.load_intent("run-0001", 1) == intent


# -- what a Store keeps between reads (issue 15, third round) ---------------------------


def strings_state(n: int) -> dict[str, Any]:
    """A list of strings long enough to be chunked in keyframes (chunks of strings are kept parsed)."""
    return {"step": n, "items": [f"item {i:05d} " + "y" * 40 for i in range(n)]}


def test_states_built_from_kept_chunks_are_still_independent(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as s:
        s.create_run(make_run())
        for n in range(1, 301):
            s.commit_iteration(it("run-0001", n, strings_state(n)), {})
    with Store.open(tmp_path / "s.db") as s:  # fresh: the first read parses the chunks, the next reuse them
        first = s.state_at("run-0001", 250)
        second = s.state_at("run-0001", 250)
        assert first == second == strings_state(250) and first["items"] is not second["items"]
        first["items"][0] = "changed"
        first["items"].append("appended")
        assert s.state_at("run-0001", 250) == strings_state(250)
        assert s.state_at("run-0001", 200) == strings_state(200)  # the shared chunks, another length


def test_a_reopened_run_stores_what_an_uninterrupted_one_does(tmp_path: Path) -> None:
    """A resumed (or branched) run's first iteration extends the chain it found (a delta, new chunks only),
    as if the process had never stopped: reopening changes nothing that is stored."""
    with Store.open(tmp_path / "a.db") as a:
        a.create_run(make_run())
        for n in range(1, 161):
            a.commit_iteration(it("run-0001", n, strings_state(n)), {})
        flags = dict(a._conn.execute("SELECT n, keyframe FROM states").fetchall())
    stop = next(n for n in range(100, 150) if not flags[n + 1] and not flags[n])  # the next one is a delta
    with Store.open(tmp_path / "b.db") as b:
        b.create_run(make_run())
        for n in range(1, stop + 1):
            b.commit_iteration(it("run-0001", n, strings_state(n)), {})
    with Store.open(tmp_path / "b.db") as b:
        assert [r.n for r in b.last_iterations("run-0001", 1)] == [stop]  # what a resuming engine reads
        for n in range(stop + 1, 161):
            b.commit_iteration(it("run-0001", n, strings_state(n)), {})
        assert dict(b._conn.execute("SELECT n, keyframe FROM states").fetchall()) == flags
        assert b.state_at("run-0001", 160) == strings_state(160)


def test_the_chunk_cache_keeps_scalars_only_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.store.states import ChunkCache

    monkeypatch.setattr(ChunkCache, "MAX_BYTES", 100)
    cache = ChunkCache()
    assert not cache.put("dicts", [{"a": 1}], 10)  # a mutable item would be shared between states
    assert cache.put("a", ["x"], 40) and cache.put("b", ["y"], 40)
    assert cache.get("a") == ["x"]  # now the most recently used
    assert cache.put("c", ["z"], 40)  # over 100 bytes: the least recently used goes
    assert cache.get("b") is None and cache.get("a") == ["x"] and cache.get("c") == ["z"]
