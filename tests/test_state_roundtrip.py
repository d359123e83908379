"""Issue 15: a state comes back exactly, types included, on every state shape and every path it takes.

Hypothesis drives random sequences of edits of nested JSON states: dict keys set, added and deleted;
lists appended to, popped at the front (past the delta's shift window too), inserted into in the middle,
truncated, cleared, replaced element by element, reordered, grown past a keyframe chunk; subtrees
replaced; and the changes `==` cannot see: 1 -> 1.0 -> True -> 1, 0.0 -> -0.0, "1" -> 1, [] -> {},
None, integers beyond 64 bits, any Unicode (U+2028, NEL, NUL, emoji). Every state is checked with
`same()`: the JSON text (keys sorted) and a recursive compare that tells 1, 1.0 and True apart, and 0.0
from -0.0. Paths covered, all on real SQLite files:

- delta.py on its own: apply(copy(old), diff(old, new)) == new, also after the ops' JSON round trip, and
  apply_copy(old, ops) == new with old untouched;
- commit and load: Store.commit_iteration, iteration after iteration (handover or not), then
  Store.state_at for every n right after its commit, at the end, and on a freshly opened Store; also
  get_iteration, iterations() (the streaming path with its chunk cache) and last_iterations;
- forks: a branch at a random k (and a branch of the branch), committed interleaved with its parent,
  with 1 or 8 runs' heads kept in memory: n <= k reads the parent's states, n > k its own;
- export and import: transfer.export_run of the deepest branch (its whole lineage) as the CLI writes
  it, transfer.import_lines into a fresh database, every run's states at every n; and once through
  `loopterm export` / `loopterm import` themselves.

Frames: "real" is the store as shipped (keyframes by size, at least every MAX_CHAIN iterations; lists chunked
above 64 items), so those sequences are long and their lists grow past 64 items; "small" patches a keyframe at
least every 4 iterations and chunks of 3 items, so short sequences cross many keyframes and chunk boundaries.

Regressions it found, fixed and kept as plain tests at the end: a type-only change inside a list longer than
SMALL_LIST was left out of the delta (`==` let 1, 1.0, True and 0.0, -0.0 through); orjson (3.13) read an
integer outside [-2**63, 2**64) as a float without complaint (delta.loads now sends such texts to the
standard library).

`loopterm import` once split its file with str.splitlines(), which also breaks at U+2028, U+2029 and U+0085
(written raw by `json.dumps(ensure_ascii=False)`); it splits at "\n" only now, and the CLI round trip keeps them.

Examples are derandomized (deterministic in CI), without a database, as tests/test_fuzz.py's "ci" profile.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopterm.core.persistence import GrownList
from loopterm.store import Store
from loopterm.store import delta as delta_module
from loopterm.store import states as states_module
from loopterm.store.delta import apply, apply_copy, diff, dumps, loads
from loopterm.store.transfer import export_run, import_lines
from tests.test_store import make_iteration, make_run

CI = settings(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])

# ----------------------------------------------------------------------------- strict equality


def canon(value: Any) -> str:
    """JSON text, keys sorted: tells 1, 1.0 and true apart, and 0.0 from -0.0."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _kind(value: Any) -> type:
    return list if isinstance(value, list) else type(value)  # a GrownList is a list


def mismatch(got: Any, want: Any, path: str = "$") -> str | None:
    """Where and how `got` differs from `want`, type-strictly; None if they are the same JSON value."""
    if _kind(got) is not _kind(want):
        return f"at {path}: got {_kind(got).__name__} {got!r:.80}, want {_kind(want).__name__} {want!r:.80}"
    if isinstance(want, dict):
        if got.keys() != want.keys():
            return f"at {path}: keys {sorted(got)!r:.200} != {sorted(want)!r:.200}"
        for key in want:
            found = mismatch(got[key], want[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(want, list):
        if len(got) != len(want):
            return f"at {path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            found = mismatch(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(want, float):
        if not (got == want and math.copysign(1.0, got) == math.copysign(1.0, want)):
            return f"at {path}: got {got!r}, want {want!r}"
        return None
    if got != want:
        return f"at {path}: got {got!r:.80}, want {want!r:.80}"
    return None


def assert_same(got: Any, want: Any, where: str) -> None:
    problem = mismatch(got, want)
    assert problem is None, f"{where}: {problem}"
    assert canon(got) == canon(want), where


def plain(value: Any) -> Any:
    """A deep copy with plain dicts and lists (GrownList becomes list): the expected value, frozen."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


MAX_SHIFT = delta_module.MAX_SHIFT  # the longest slide of a window that delta.diff finds


def big(value: int) -> int:
    """An integer of any size (beyond 64 bits too): a name for it in the tables of tricky values."""
    return value


# ----------------------------------------------------------------------------- values and edits

TRICKY_SCALARS = [
    None, True, False, 0, 1, -1, 0.0, -0.0, 1.0, -1.0, 1.5, 1e300, 5e-324, 1.7976931348623157e308,
    2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), big(2**64), big(-(2**63) - 1), big(10**30), big(-(10**40)),
    big(2**100),
    "", "0", "1", "-0", "1.0", "true", "null", "ü", "naïve", "日本語", "🚀", "a\u2028b", "\u2029", "x\x85y",
    "\x00", "tab\tnew\nline", "\"quoted\\", "\ufeff", "e\u0301", "\U0010ffff",
]
SEPARATORS = ("\u2028", "\u2029", "\x85")  # what str.splitlines() breaks at and json.dumps keeps raw

scalars = st.one_of(
    st.sampled_from(TRICKY_SCALARS),
    st.integers(min_value=-(2**70), max_value=2**70).map(big),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),  # any Unicode but surrogates
)
keys = st.one_of(st.sampled_from(["a", "b", "log", "ü", "", "0", "1", "日本", "k 🚀", "n\u2028l", "$", "."]),
                 st.text(max_size=4))
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=8,
)


def twins(value: Any) -> list[Any]:
    """Values that change only the type or the sign (mostly `==` to `value`), then a few that change more."""
    if value is True:
        return [1, 1.0, False, "true"]
    if value is False:
        return [0, 0.0, -0.0, True]
    if type(value) is int:
        out: list[Any] = [float(value)] if abs(value) < 2**53 else [str(value)]
        if value in (0, 1):
            out.append(bool(value))
        return out + [str(value), big(value + 2**64), big(-value - 1)]
    if type(value) is float:
        out = [-value] if value == 0 else []
        if value.is_integer():
            out.append(big(int(value)))
        if value in (0.0, 1.0):
            out.append(bool(value))
        return out + [repr(value), None]
    if type(value) is str:
        out = [big(int(value))] if re.fullmatch(r"-?[0-9]{1,30}", value) else []
        return out + [value + "é", value[::-1] + "🚀", value + "\u2028", None]
    if value is None:
        return [[], {}, 0, "", False]
    if isinstance(value, list):
        return [{}, None] if not value else [{str(i): v for i, v in enumerate(value)}, value[:1], None]
    if isinstance(value, dict):
        return [[], None] if not value else [list(value.values()), {k: None for k in value}]
    raise AssertionError(value)


def cycle(value: Any) -> Any:
    """The next value of a slot that goes 1 -> 1.0 -> True -> 1, 0 -> 0.0 -> -0.0 -> False -> 0, "1" -> 1,
    [] -> {} -> None -> [], 2**63 -> "2**63" -> 2**64 - 1 -> 2**63: each change invisible to `==` or nearly."""
    kind = type(value)
    if kind is int and value in (0, 1):
        return float(value)
    if kind is float and value == 1.0:
        return True
    if kind is float and value == 0.0:
        return -0.0 if math.copysign(1.0, value) > 0 else False
    if kind is bool:
        return int(value)
    if value == "1":
        return 1
    if value == [] and kind is list:
        return {}
    if value == {} and kind is dict:
        return None
    if value is None:
        return []
    if value == 2**63 and kind is int:
        return str(2**63)
    if value == str(2**63):
        return 2**64 - 1
    if value == 2**64 - 1 and kind is int:
        return 2**63
    return [0, 1, "1", 2**63][len(canon(value)) % 4]  # anything else starts a cycle


def flipped(value: Any) -> Any:
    new = cycle(value)
    SEEN[f"cycle {canon(value):.8} -> {canon(new):.8}"] += 1
    return new


def twin(draw: st.DrawFn, value: Any) -> Any:
    """One of `value`'s twins, the `==` one (the first) half the time."""
    choices = twins(value)
    new = choices[0] if draw(st.booleans()) else draw(st.sampled_from(choices))
    if new == value:
        SEEN[f"{value!r:.6} -> {new!r:.6}" if type(value) in (int, float, bool) else "== change"] += 1
    return new


def containers(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, item in items:
        if isinstance(item, (dict, list)):
            yield from containers(item, path + (key,))


def at(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        root = root[key]
    return root


def writable(root: dict[str, Any], path: tuple[Any, ...]) -> tuple[dict[str, Any], Any]:
    """Copy-on-write: a new root whose containers along `path` are fresh copies (everything else is
    shared with `root`, as the engine's states share their unchanged parts); returns it and the copy at
    `path`, which may be changed in place without touching any earlier state."""
    new_root = dict(root)
    node: Any = new_root
    for key in path:
        child = node[key]
        child = dict(child) if isinstance(child, dict) else list(child)
        node[key] = child
        node = child
    return new_root, node


def bulk(draw: st.DrawFn, start: int) -> list[Any]:
    """Many items at once (cheap to draw): a list grows past a chunk, or the SMALL_LIST bound."""
    count = draw(st.sampled_from([5, 30, 33, 40, 64, 65, 70, 130]))
    shape = draw(st.integers(0, 4))
    if shape == 0:
        return list(range(start, start + count))
    if shape == 1:
        return [[i, float(i), str(i), i % 2 == 0, None][i % 5] for i in range(start, start + count)]
    if shape == 2:
        return [{"n": i, "out": f"line {i} ü"} for i in range(start, start + count)]
    if shape == 3:
        template = draw(values)
        return [template for _ in range(count)]  # the same object many times
    return [[i, [i]] for i in range(start, start + count)]


SEEN: Counter[str] = Counter()  # what the examples did: printed by each store test (pytest -s shows it)
MAX_ITEMS = 400  # items and keys in all of a state's containers, above which edits shrink it

EDITS = ["flip", "flip", "flip", "set", "set", "delete", "twin", "twin", "twin", "replace_subtree", "append", "append", "bulk",
         "pop_front", "insert", "truncate", "replace_item", "reorder", "clear", "twin_all", "grown", "new_root"]


@st.composite
def edited(draw: st.DrawFn, state: dict[str, Any], n: int, *, grown: bool = False) -> dict[str, Any]:
    """The next state: 1-3 edits of `state` (never changed itself: edits are copy-on-write).

    grown: append with a GrownList sometimes, as the engine does for log fields (only valid when the
    store is handed the states over)."""
    new = state
    for _ in range(draw(st.integers(1, 3))):
        new = _edit(draw, new, n, grown)
    return new


def _edit(draw: st.DrawFn, state: dict[str, Any], n: int, grown: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(EDITS))
    SEEN[kind] += 1
    if kind == "new_root":
        if draw(st.integers(0, 3)):
            kind = "set"  # rare
        else:
            return draw(st.dictionaries(keys, values, max_size=4))
    found = list(containers(state))
    lists = [(p, c) for p, c in found if isinstance(c, list)]
    dicts = [(p, c) for p, c in found if isinstance(c, dict)]
    list_edits = ("append", "bulk", "pop_front", "insert", "truncate", "replace_item", "reorder", "clear", "grown")
    if kind in ("append", "bulk", "grown", "insert", "new_root") and sum(len(c) for _, c in found) > MAX_ITEMS:
        kind = draw(st.sampled_from(["pop_front", "truncate", "twin"]))  # keep states small enough to check fast
    if kind in ("pop_front", "truncate") and lists:
        lists = [max(lists, key=lambda found_list: len(found_list[1]))]  # shrink the longest list
    if kind in list_edits and not lists:
        kind = "set"
    if kind in list_edits or (kind in ("flip", "twin", "twin_all", "replace_subtree") and lists and draw(st.booleans())):
        path, target = draw(st.sampled_from(lists))
    else:
        path, target = draw(st.sampled_from(dicts))
    size = len(target)
    new, node = writable(state, path)

    if kind == "flip":  # a slot that cycles through `==`-equal values, step after step
        if isinstance(node, dict):
            key = draw(st.sampled_from(["flag", "f1", "f2"]))
            node[key] = flipped(node[key]) if key in node else draw(st.sampled_from([0, 1, 0.0, "1", None, 2**63]))
        elif node:
            i = draw(st.integers(0, len(node) - 1))
            node[i] = flipped(node[i])
        else:
            node.append(0)
        return new
    if kind in ("set", "delete", "twin", "replace_subtree") and isinstance(node, dict):
        if kind == "set" or not node:
            node[draw(st.one_of(st.sampled_from(sorted(node) or ["a"]), keys))] = draw(values)
        elif kind == "delete":
            del node[draw(st.sampled_from(sorted(node)))]
        elif kind == "twin":
            key = draw(st.sampled_from(sorted(node)))
            node[key] = twin(draw, node[key])
        else:
            key = draw(st.sampled_from(sorted(node)))
            node[key] = draw(st.sampled_from([[], {}, None, [node[key]], {"wrapped": node[key]}]))
        return new
    if kind in ("set", "delete"):
        kind = "replace_item"
    if kind == "twin_all":
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in list(items):
            node[key] = twins(item)[0]
        return new
    assert isinstance(node, list)
    if kind in ("twin", "replace_subtree", "replace_item") and not node:
        kind = "append"
    if kind == "append":
        node.extend(draw(st.lists(values, min_size=1, max_size=3)))
    elif kind == "bulk":
        node.extend(bulk(draw, n * 1000))
    elif kind == "grown":
        if grown:  # the engine's promise: the old list's very objects, then the new items
            new_node = GrownList(target, draw(st.lists(values, min_size=1, max_size=3)))
            if path:
                at(new, path[:-1])[path[-1]] = new_node
        else:
            node.append(draw(values))
    elif kind == "pop_front":
        del node[: draw(st.sampled_from([1, 2, MAX_SHIFT, MAX_SHIFT + 1, max(1, size // 2), size]))]
    elif kind == "insert":
        node.insert(draw(st.integers(0, size)), draw(values))
    elif kind == "truncate":
        del node[draw(st.integers(0, size)):]
    elif kind == "clear":
        node.clear()
    elif kind == "replace_item":
        node[draw(st.integers(0, size - 1))] = draw(values)
    elif kind == "twin":
        i = draw(st.integers(0, size - 1))
        node[i] = twin(draw, node[i])
    elif kind == "replace_subtree":
        i = draw(st.integers(0, size - 1))
        node[i] = draw(st.sampled_from([[], {}, None, [node[i]]]))
    elif kind == "reorder":
        how = draw(st.integers(0, 2))
        if how == 0:
            node.reverse()
        elif how == 1 and size > 1:
            k = draw(st.integers(1, size - 1))
            node[:] = node[k:] + node[:k]
        elif size > 1:
            i, j = draw(st.integers(0, size - 1)), draw(st.integers(0, size - 1))
            node[i], node[j] = node[j], node[i]
    return new


first_state = st.fixed_dictionaries(
    {"log": st.lists(values, max_size=3), "memory": st.dictionaries(keys, values, max_size=3)},
    optional={"flag": st.sampled_from([1, 1.0, True, 0.0, -0.0, "1", None, [], {}, big(2**64), 2**64 - 1])},
)


def tick(state: dict[str, Any], n: int) -> dict[str, Any]:
    """A step that draws nothing (so long sequences stay within hypothesis's data budget): what a loop
    does most iterations, a log item appended (copy-on-write) and a counter changed."""
    new = dict(state)
    log = new.get("log")
    if isinstance(log, list) and len(log) < MAX_ITEMS // 2:
        new["log"] = log + [{"n": n, "out": f"step {n} ü"}]
    new["step"] = n
    return new


@st.composite
def sequence(draw: st.DrawFn, length: int, *, start: dict[str, Any] | None = None, first_n: int = 1,
             grown: bool = False, every: int = 1) -> list[dict[str, Any]]:
    """`length` states, each an edit of the one before (the first drawn, or an edit of `start`);
    with `every` > 1, only every `every`th step draws its edits, the others tick."""
    state = draw(first_state) if start is None else draw(edited(start, first_n, grown=grown))
    out = [state]
    for n in range(first_n + 1, first_n + length):
        state = draw(edited(state, n, grown=grown)) if n % every == 0 else tick(state, n)
        out.append(state)
    return out


# ----------------------------------------------------------------------------- store helpers


@contextmanager
def frames(kind: str) -> Iterator[None]:
    """"real": the store as shipped; "small": a keyframe at least every 4 iterations, chunks of 3 items."""
    with pytest.MonkeyPatch.context() as patch:
        if kind == "small":
            patch.setattr(states_module, "MAX_CHAIN", 4)
            patch.setattr(delta_module, "CHUNK_ITEMS", 3)
        yield


def commit(store: Store, run_id: str, n: int, state: dict[str, Any], *, handover: bool) -> None:
    SEEN["commits"] += 1
    SEEN["chain limits crossed"] += n % states_module.MAX_CHAIN == 0
    SEEN["lists > 64 items"] += any(isinstance(c, list) and len(c) > 64 for _, c in containers(state))
    store.commit_iteration(make_iteration(run_id, n, state=state), {"iterations": n}, handover=handover)


def check_run(store: Store, run_id: str, expected: dict[int, Any], where: str) -> None:
    """state_at for every n; the streaming read; a few get_iteration and last_iterations."""
    SEEN["runs checked"] += 1
    for n, want in expected.items():
        assert_same(store.state_at(run_id, n), want, f"{where}: state_at({run_id}, {n})")
    records = store.iterations(run_id)
    assert [r.n for r in records] == sorted(expected), where
    for record in records:
        assert_same(record.state, expected[record.n], f"{where}: iterations({run_id})[{record.n}]")
    last = max(expected)
    for n in {1, last, (last + 1) // 2}:
        record = store.get_iteration(run_id, n)
        assert record is not None
        assert_same(record.state, expected[n], f"{where}: get_iteration({run_id}, {n})")
    tail = store.last_iterations(run_id, 5)
    for record in tail:
        assert_same(record.state, expected[record.n], f"{where}: last_iterations({run_id})[{record.n}]")


# ----------------------------------------------------------------------------- delta.py on its own


@st.composite
def state_pairs(draw: st.DrawFn) -> list[dict[str, Any]]:
    return draw(sequence(draw(st.integers(2, 6)), grown=draw(st.booleans())))


@settings(CI, max_examples=250)
@given(state_pairs())
def test_diff_then_apply_is_exact_with_types(states: list[dict[str, Any]]) -> None:
    for old, new in zip(states, states[1:]):
        frozen_old, want = plain(old), plain(new)
        ops = diff(old, new)
        assert_same(apply(plain(old), ops), want, f"apply(diff) with ops {ops!r:.300}")
        stored = loads(dumps(ops))  # what the store keeps and reads back
        assert_same(apply(plain(old), stored), want, f"apply(loads(dumps(diff))) with ops {ops!r:.300}")
        assert_same(apply_copy(old, stored), want, f"apply_copy with ops {ops!r:.300}")
        assert_same(old, frozen_old, "apply_copy changed its input")
        assert_same(new, want, "diff changed its input")


# ----------------------------------------------------------------------------- commit and load


@pytest.mark.parametrize("frame_kind, length, every, examples", [("small", 24, 1, 30), ("real", 140, 4, 6)])
def test_a_run_round_trips_exactly_at_every_iteration(tmp_path_factory: pytest.TempPathFactory, frame_kind: str,
                                                      length: int, every: int, examples: int) -> None:
    @settings(CI, max_examples=examples)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        handover = data.draw(st.booleans(), label="handover")
        states = data.draw(sequence(length, grown=handover, every=every), label="states")
        expected = {n: plain(state) for n, state in enumerate(states, 1)}
        path = tmp_path_factory.mktemp("run") / "loopterm.db"
        with frames(frame_kind):
            with Store.open(path) as store:
                store.create_run(make_run("r"))
                for n, state in enumerate(states, 1):
                    commit(store, "r", n, state, handover=handover)
                    assert_same(store.state_at("r", n), expected[n], f"right after commit {n}")
                    if n > 1 and data.draw(st.integers(0, 9), label="peek back") == 0:
                        back = data.draw(st.integers(1, n - 1), label="back")
                        assert_same(store.state_at("r", back), expected[back], f"state_at({back}) after commit {n}")
                check_run(store, "r", expected, "same store")
            with Store.open(path) as fresh:
                check_run(fresh, "r", expected, "fresh store")
                assert_same(fresh.state_at("r", length), expected[length], "fresh state_at(last) first read")

    SEEN.clear()
    check()
    print(f"\n{frame_kind}: {dict(SEEN)}")


# ----------------------------------------------------------------------------- forks, then export and import


@pytest.mark.parametrize("frame_kind, length, every, examples", [("small", 16, 1, 20), ("real", 72, 4, 4)])
def test_forks_and_export_import_round_trip_exactly(tmp_path_factory: pytest.TempPathFactory, frame_kind: str,
                                                    length: int, every: int, examples: int) -> None:
    @settings(CI, max_examples=examples)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        handover = data.draw(st.booleans(), label="handover")
        root_states = data.draw(sequence(length, grown=handover, every=every), label="root")
        k = data.draw(st.integers(1, length), label="fork at")
        own = data.draw(st.integers(1, length), label="branch length")
        branch_states = data.draw(sequence(own, start=root_states[k - 1], first_n=k + 1, grown=handover, every=every),
                                  label="branch")
        branch_all = root_states[:k] + branch_states
        k2 = data.draw(st.integers(1, len(branch_all)), label="fork of the branch at")
        twig_states = data.draw(sequence(data.draw(st.integers(1, 12)), start=branch_all[k2 - 1], first_n=k2 + 1,
                                         grown=handover), label="twig")
        twig_all = branch_all[:k2] + twig_states
        expected = {run: {n: plain(s) for n, s in enumerate(states, 1)}
                    for run, states in (("root", root_states), ("branch", branch_all), ("twig", twig_all))}

        # When each iteration is committed: the root up to the fork point, then the root's rest, the branch and
        # the twig interleaved at random (a run exists before its first commit; the twig once n = k2 exists).
        queue = {"root": list(range(k + 1, length + 1)), "branch": list(range(k + 1, len(branch_all) + 1)),
                 "twig": list(range(k2 + 1, len(twig_all) + 1))}
        path = tmp_path_factory.mktemp("fork") / "loopterm.db"
        with frames(frame_kind):
            with Store.open(path) as store:
                store.heads_kept = data.draw(st.sampled_from([1, 8]), label="heads kept")
                store.create_run(make_run("root"))
                for n in range(1, k + 1):
                    commit(store, "root", n, root_states[n - 1], handover=handover)
                store.create_run(make_run("branch", parent_run="root", fork_iteration=k, origin="fork", iterations=k))

                def make_twig() -> None:
                    store.create_run(make_run("twig", parent_run="branch", fork_iteration=k2, origin="fork", iterations=k2))

                twig_made = k2 <= k  # the branch's iteration k2 is its parent's: there already
                if twig_made:
                    make_twig()
                while any(queue.values()):
                    ready = [run for run, left in queue.items() if left and (run != "twig" or twig_made)]
                    run = data.draw(st.sampled_from(ready), label="next run")
                    n = queue[run].pop(0)
                    commit(store, run, n, {"root": root_states, "branch": branch_all, "twig": twig_all}[run][n - 1],
                           handover=handover)
                    assert_same(store.state_at(run, n), expected[run][n], f"{run} right after commit {n}")
                    if run == "branch" and n == k2:
                        make_twig()
                        twig_made = True
                if not twig_made:  # cannot happen: k2 <= len(branch_all), so the branch committed k2 or inherited it
                    raise AssertionError("the twig was never created")
                for run in expected:
                    check_run(store, run, expected[run], f"same store, fork at {k}, twig at {k2}")
                lines = [json.dumps(item, ensure_ascii=False, sort_keys=True) for item in export_run(store, "twig")]
            with Store.open(path) as fresh:
                for run in expected:
                    check_run(fresh, run, expected[run], f"fresh store, fork at {k}, twig at {k2}")
            text = "".join(line + "\n" for line in lines)  # as `loopterm export` writes the file
            with Store.open(path.with_name("imported.db")) as target:
                assert import_lines(target, text.split("\n")) == ["root", "branch", "twig"]
                for run in expected:
                    check_run(target, run, expected[run], f"imported, fork at {k}, twig at {k2}")
            with Store.open(path.with_name("imported.db")) as target:
                for run in expected:
                    for n, want in expected[run].items():
                        assert_same(target.state_at(run, n), want, f"imported, reopened: state_at({run}, {n})")

    SEEN.clear()
    check()
    print(f"\n{frame_kind}: {dict(SEEN)}")


# ----------------------------------------------------------------------------- the commands themselves


def scripted_states(count: int) -> list[dict[str, Any]]:
    """Every tricky shape in a fixed sequence: type flips, big ints, long lists that slide, are truncated and
    change their items' types, Unicode (line separators included)."""
    out = []
    log: list[Any] = []
    flips = [1, 1.0, True, 1, 0.0, -0.0, "1", 1, [], {}, None, big(2**64), big(-(2**70)), 2**64 - 1, "naïve e\u0301", "a\u2028b\u2029c\x85d"]
    for n in range(1, count + 1):
        log = log + [{"n": n, "text": f"step {n} ü 日本 🚀 \x00 \t"}]
        if n % 7 == 0:
            log = log[3:]
        size = n % 70 + 33
        # ints, then floats: a long list that changes only its items' types
        items: list[Any] = list(range(size)) if n % 3 else [i + 0.5 for i in range(size)]
        out.append({
            "n": n, "flag": flips[n % len(flips)], "log": log, "big": [2**63 + n, big(-(2**63) - n), big(10**30), -(2**63)],
            "items": items, "short": [flips[(n + i) % len(flips)] for i in range(5)],
            "nested": {"deep": [[n, {"x": flips[(n + 3) % len(flips)]}]], "ü": "🚀" * (n % 4)},
        })
    return out


def test_loopterm_export_then_import_round_trips_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loopterm.tui.cli import main

    states = scripted_states(150)
    branch = states[:10] + [dict(s, branch=True, flag=-0.0) for s in states[10:]]
    db = tmp_path / "a.db"
    with Store.open(db) as store:
        store.create_run(make_run("root"))
        for n, state in enumerate(states, 1):
            commit(store, "root", n, state, handover=False)
        store.create_run(make_run("branch", parent_run="root", fork_iteration=10, origin="fork", iterations=10))
        for n in range(11, 151):
            commit(store, "branch", n, branch[n - 1], handover=False)
    out = tmp_path / "branch.jsonl"
    assert main(["export", "branch", "-o", str(out), "--db", str(db)]) == 0
    assert main(["import", str(out), "--db", str(tmp_path / "b.db")]) == 0, capsys.readouterr().err
    with Store.open(tmp_path / "b.db") as target:
        for n in range(1, 151):
            assert_same(target.state_at("root", n), states[n - 1], f"root {n}")
            assert_same(target.state_at("branch", n), branch[n - 1], f"branch {n}")
        check_run(target, "branch", dict(enumerate(branch, 1)), "imported branch")


# ----------------------------------------------------------------------------- regressions, minimal


@pytest.mark.parametrize("old, new", [
    ([0] * 33, [0] * 32 + [0.0]),  # int -> float in the last item
    ([1] * 33, [True] + [1] * 32),  # int -> bool
    ([0.0] * 33, [0.0] * 32 + [-0.0]),  # the sign of zero
    ([{"a": 1}] * 33, [{"a": 1.0}] * 33),  # inside an item
    (list(range(40)), [1.0] + list(range(2, 40))),  # a window that slid by one (drop front), one item retyped
    (list(range(40)), [0.0] + list(range(1, 20))),  # truncated, one item retyped
    (list(range(40)), list(range(39)) + [39.0, 40]),  # appended to, one old item retyped
], ids=["int-float", "int-bool", "zero-sign", "nested", "slide", "truncate", "append"])
def test_a_type_change_inside_a_long_list_is_in_the_delta(old: list[Any], new: list[Any]) -> None:
    assert_same(apply(plain({"l": old}), diff({"l": old}, {"l": new})), {"l": new}, "apply(diff)")


def test_a_type_change_inside_a_long_list_is_stored(tmp_path: Path) -> None:
    with Store.open(tmp_path / "a.db") as store:
        store.create_run(make_run("r"))
        commit(store, "r", 1, {"l": [0] * 33}, handover=False)
        commit(store, "r", 2, {"l": [0] * 32 + [False]}, handover=False)
        assert_same(store.state_at("r", 2), {"l": [0] * 32 + [False]}, "state_at(2)")


@pytest.mark.parametrize("separator", SEPARATORS, ids=["U+2028", "U+2029", "U+0085"])
def test_import_keeps_unicode_line_separators_inside_strings(tmp_path: Path, separator: str) -> None:
    from loopterm.tui.cli import main

    with Store.open(tmp_path / "a.db") as store:
        store.create_run(make_run("r", iterations=1))
        commit(store, "r", 1, {"text": f"a{separator}b"}, handover=False)
    assert main(["export", "r", "-o", str(tmp_path / "r.jsonl"), "--db", str(tmp_path / "a.db")]) == 0
    assert main(["import", str(tmp_path / "r.jsonl"), "--db", str(tmp_path / "b.db")]) == 0
    with Store.open(tmp_path / "b.db") as target:
        assert target.state_at("r", 1) == {"text": f"a{separator}b"}


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30], ids=["2**64", "-2**63-1", "10**30"])
def test_an_integer_beyond_64_bits_reads_back_as_an_integer(value: int) -> None:
    assert_same(loads(dumps({"x": value})), {"x": value}, "loads(dumps)")


def test_an_integer_beyond_64_bits_is_stored_exactly(tmp_path: Path) -> None:
    with Store.open(tmp_path / "a.db") as store:
        store.create_run(make_run("r"))
        commit(store, "r", 1, {"x": 2**64}, handover=False)
        assert_same(store.state_at("r", 1), {"x": 2**64}, "state_at(1)")


def test_the_engine_dump_of_dict_fields_is_the_models_own_whatever_the_edits() -> None:
    """StateDump reuses the previous dump's entry for every value of a dict field still equal to it
    type-strictly (so the store's diff skips it by identity). Driven by random edits, in place and by
    replacement, including 1 / 1.0 / True, 0.0 / -0.0, a tuple for a list and a value whose dump the
    model's config decides (a timedelta as seconds): every dump equals the model's own model_dump,
    byte for byte through orjson (types and key order), and an unchanged entry is the same object."""
    import datetime
    import random

    import orjson
    from pydantic import ConfigDict

    from loopterm.core.state import LoopState
    from loopterm.core.state_dump import StateDump

    class Tables(LoopState):
        model_config = ConfigDict(ser_json_timedelta="float")
        records: dict[str, dict[str, Any]] = {}
        flat: dict[str, Any] = {}
        spans: dict[str, dict[str, datetime.timedelta]] = {}

    rng = random.Random(42)
    scalars: list[Any] = [1, 1.0, True, 0, 0.0, -0.0, False, None, "1", [1], (1,), {"k": 1}, [1.0], 2**70]
    dumper = StateDump(Tables)
    state = Tables(records={f"r{i}": {"a": i, "b": "x"} for i in range(20)}, flat={"x": 1, "y": [1, 2]},
                   spans={"s": {"d": datetime.timedelta(seconds=1)}})
    last = dumper.dump(state)
    for step in range(300):
        records, flat, spans = dict(state.records), dict(state.flat), dict(state.spans)
        for _ in range(rng.randint(0, 3)):
            key = f"r{rng.randrange(24)}"
            what = rng.random()
            if what < 0.3 and key in records:
                records[key][rng.choice("abc")] = rng.choice(scalars)  # in place: the dump must see it
            elif what < 0.5:
                records.pop(key, None)
            else:
                records[key] = {"a": rng.choice(scalars), "b": rng.choice(scalars)}
        if rng.random() < 0.3:
            flat[rng.choice("xyz")] = rng.choice(scalars)
        if rng.random() < 0.2:
            spans[rng.choice("st")] = {"d": datetime.timedelta(seconds=rng.choice([1, 1.5, 2]))}
        state = state.model_copy(update={"records": records, "flat": flat, "spans": spans})
        dump = dumper.dump(state)
        full = state.model_dump(mode="json")
        assert list(dump)[: len(full) - 1] == [k for k in full if k != "tool_results"], step
        try:
            assert orjson.dumps({k: dump[k] for k in full}) == orjson.dumps(full), step
        except TypeError:  # an integer beyond 64 bits: compare with the standard library and by type
            assert json.dumps({k: dump[k] for k in full}) == json.dumps(full), step
        for key, value in dump["records"].items():
            if key in last["records"] and last["records"][key] is value:
                assert json.dumps(value) == json.dumps(full["records"][key])
        last = dump
