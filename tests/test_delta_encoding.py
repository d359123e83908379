"""Delta behaviour the hot path depends on: type-strict diffs at C speed, the compact encoding and
old deltas still loading, keyframes chosen by size with a bounded chain (issue 15)."""

from __future__ import annotations

from typing import Any

import pytest

from loopterm.store.delta import apply_copy, diff


@pytest.mark.parametrize(
    ("before", "after"),
    [(1, 1.0), (1, True), (0.0, -0.0), (1.0, True), (0, False), (10**16, 1e16), (2**70, 2**70 + 1.0)],
)
def test_equal_containers_still_differ_by_type(before: Any, after: Any) -> None:
    """Containers equal by == are checked together at C speed; a type change inside one is still found."""
    old = {"table": {f"k{i}": {"v": i, "w": [i, "x"]} for i in range(20)}}
    new = {"table": {key: {"v": value["v"], "w": list(value["w"])} for key, value in old["table"].items()}}
    new["table"]["k7"]["w"][0] = after
    old["table"]["k7"]["w"][0] = before
    ops = diff(old, new)
    assert ops, (before, after)
    result = apply_copy(old, ops)["table"]["k7"]["w"][0]
    assert type(result) is type(after) and repr(result) == repr(after)


def test_entries_shared_by_identity_are_skipped_and_the_rest_still_compared() -> None:
    """A dump that reuses the previous one's entries (core/state_dump.py) is diffed without `==` on them;
    an entry that is a new object is compared as before, type-strictly, whether equal or not."""
    old = {"t": {f"k{i}": {"v": i, "s": "x"} for i in range(50)}}
    new = {"t": dict(old["t"])}
    new["t"]["k3"] = {"v": 3, "s": "x"}  # a new object, equal: no op
    new["t"]["k4"] = {"v": 4.0, "s": "x"}  # a new object, equal by == but not by type
    new["t"]["k5"] = {"v": 50, "s": "x"}  # a new object, different
    new["t"]["k99"] = {"v": 99, "s": "x"}  # added
    del new["t"]["k8"]
    ops = diff(old, new)
    assert apply_copy(old, ops) == new
    assert type(apply_copy(old, ops)["t"]["k4"]["v"]) is float
    assert sorted(str(op[1]) for op in ops) == sorted(str(p) for p in (["t", "k8"], ["t", "k4", "v"], ["t", "k5", "v"], ["t", "k99"]))
    assert diff(old, {"t": dict(old["t"])}) == []


def test_same_content_in_another_key_order_is_no_change() -> None:
    old = {"a": {"x": 1, "y": 2}, "b": [1, 2]}
    assert diff(old, {"a": {"y": 2, "x": 1}, "b": [1, 2]}) == []


# -- the compact stored form, and the first form still reading ------------------------

from pathlib import Path  # noqa: E402

from loopterm.store import Store  # noqa: E402
from loopterm.store import states as states_module  # noqa: E402
import copy  # noqa: E402

from loopterm.store.delta import apply, apply_delta, decode_delta, dumps, encode_delta  # noqa: E402
from tests.test_store import make_iteration, make_run  # noqa: E402


def test_every_op_round_trips_through_the_compact_form() -> None:
    ops = [
        ["s", ["iteration"], 3],
        ["h", ["memory", "facts"], 1],
        ["a", ["memory", "facts"], ["x"]],
        ["s", ["rows", 2, "3"], {"deep": [1.0, True]}],  # an index, then a dict key that looks like one
        ["s", ["rows", 4], None],
        ["a", ["rows"], [7]],
        ["s", ["rows", 0], "after the append"],
        ["d", ["gone"]],
        ["t", ["log"], 2],
        ["s", ["nested", "m"], [["n", 1]]],  # values that look like the form's own codes
        ["s", ["big"], 2**70],
        ["s", ["nan"], float("inf")],
    ]
    text = encode_delta(ops)
    assert text.startswith("{")
    assert repr(decode_delta(text)) == repr(ops)
    state = {"iteration": 0, "memory": {"facts": ["a", "b"]}, "rows": [0, 1, {"x": 1}, 3, 4], "gone": 1,
             "log": [1, 2, 3], "nested": {}, "big": 0, "nan": 0}
    expected = apply(copy.deepcopy(state), copy.deepcopy(ops))
    assert repr(apply_delta(copy.deepcopy(state), text)) == repr(expected)  # the tree applied as it is
    assert repr(apply_delta(copy.deepcopy(state), dumps(ops))) == repr(expected)  # and the first form


def test_the_compact_form_is_smaller_for_a_table_of_records() -> None:
    ops = [["s", ["table", f"k{k:03d}", field], k] for k in range(5) for field in ("count", "score", "note")]
    assert len(encode_delta(ops)) < 0.7 * len(dumps(ops))


def test_a_root_replacement_keeps_the_flat_form() -> None:
    ops = [["s", [], {"a": 1}]]
    assert decode_delta(encode_delta(ops)) == ops


def test_deltas_stored_in_the_first_form_still_load(tmp_path: Path) -> None:
    """A database written before the compact form: every delta a flat list of ops."""
    store = Store.open(tmp_path / "old.db")
    store.create_run(make_run())
    states = []
    for n in range(1, 41):
        state = {"n": n, "log": [f"line {i}" for i in range(n)], "table": {f"k{k}": {"v": k * n % 7} for k in range(9)}}
        states.append(state)
        store.commit_iteration(make_iteration("run-0001", n, state=state), {})
    rows = store._query("SELECT n, body FROM states WHERE keyframe = 0", [])
    assert rows and all(body.startswith("{") for _, body in rows)
    with store._write():
        for n, body in rows:
            store._conn.execute("UPDATE states SET body = ? WHERE run_id = 'run-0001' AND n = ?",
                                [dumps(decode_delta(body)), n])
    store.close()
    reopened = Store.open(tmp_path / "old.db", create=False)
    assert all(body.startswith("[") for _, body in reopened._query("SELECT n, body FROM states WHERE keyframe = 0", []))
    assert reopened.state_at("run-0001", 37) == states[36]
    assert [record.state for record in reopened.iterations("run-0001")] == states
    reopened.commit_iteration(make_iteration("run-0001", 41, state={**states[-1], "n": 41}), {})  # extends an old chain
    assert reopened.state_at("run-0001", 41) == {**states[-1], "n": 41}
    reopened.close()


# -- keyframes by size --------------------------------------------------------------


def keyframes(store: Store) -> list[int]:
    return [n for (n,) in store._query("SELECT n FROM states WHERE keyframe = 1 ORDER BY n", [])]


def test_a_big_state_with_small_changes_keyframes_only_at_the_chain_bound(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "big.db")
    store.create_run(make_run())
    table = {f"k{k:03d}": {"name": f"entry {k}", "count": 0} for k in range(300)}
    for n in range(1, 601):
        table = {**table, f"k{n % 300:03d}": {"name": f"entry {n % 300}", "count": n}}
        store.commit_iteration(make_iteration("run-0001", n, state={"table": table}), {})
    found = keyframes(store)
    gaps = [b - a for a, b in zip(found, found[1:])]
    assert found[0] == 1 and gaps and max(gaps) <= states_module.MAX_CHAIN  # the chain stays bounded
    assert min(gaps) == states_module.MAX_CHAIN  # the keyframe is big, the deltas small: only the bound keyframes
    assert store.state_at("run-0001", 599)["table"]["k299"]["count"] == 599
    store.close()


def test_deltas_as_big_as_the_state_keyframe_often(tmp_path: Path) -> None:
    """Keyframes cost at most 1/KEYFRAME_AFTER of the deltas: a state rewritten every time keyframes every few."""
    store = Store.open(tmp_path / "churn.db")
    store.create_run(make_run())
    for n in range(1, 101):
        store.commit_iteration(make_iteration("run-0001", n, state={"rows": [f"{n}-{i}" for i in range(20)]}), {})
    gaps = [b - a for a, b in zip(keyframes(store), keyframes(store)[1:])]
    assert gaps and max(gaps) <= states_module.KEYFRAME_AFTER + 1
    assert store.state_at("run-0001", 98) == {"rows": [f"98-{i}" for i in range(20)]}
    store.close()


@pytest.mark.parametrize("text", [
    '{"note":"4fd799567537654599933662","n":1}',  # a long run of digits in a string: orjson reads it right
    '{"a":"12345678901234567890123","b":12345678901234567890123}',
    '{"x": [1, -18446744073709551617], "y": {"z":\n 18446744073709551616}}',
    '-12345678901234567890', '[ "a", 99999999999999999999 ]', '{"f":1.00000000000000000000001}',
    '{"t":"x:1234567890123456789012","u":[1.5, 9223372036854775807, -9223372036854775808]}',
])
def test_stored_json_reads_back_exactly_with_long_digit_runs(text: str) -> None:
    """Integers beyond 64 bits go to the standard library (orjson would read a float); a run of digits in a
    string does not send the text there, and nothing is read differently either way."""
    import json

    from loopterm.store.delta import loads, pack

    expected = json.loads(text)
    for stored in (text, text.encode(), pack(text)):
        value = loads(stored)
        assert value == expected and repr(value) == repr(expected)
