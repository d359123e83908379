"""The state's storability checks (core/decision.py): the C-speed screen a fork runs first
(`surely_storable`) never vouches for a value `json_problem` would refuse, and does vouch for plain JSON."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from loopterm.core.decision import json_problem, surely_storable
from tests.fuzz_strategies import SURROGATES

ODD_SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans(), st.none(),
    st.text(st.one_of(st.characters(codec="utf-8"), SURROGATES), max_size=6),
    st.sampled_from([2**63, -(2**63), 2**63 - 1, -(2**63) - 1, float("nan"), "\ud800", "a\udfffb", 0.0, -0.0]),
)
KEYS = st.one_of(st.text(st.one_of(st.characters(codec="utf-8"), SURROGATES), max_size=4), st.integers(0, 3))
ANY_TREE = st.recursive(
    ODD_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=30,
)
PLAIN_TREE = st.recursive(
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**63 - 1), st.booleans(),
              st.none(), st.text(st.characters(codec="utf-8"), max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=4), inner, max_size=4)),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(ANY_TREE, st.integers(1, 5))
def test_the_screen_never_vouches_for_what_json_problem_refuses(value: Any, depth: int) -> None:
    if surely_storable(value, depth):
        assert json_problem(value, depth) is None


@settings(max_examples=200, deadline=None)
@given(PLAIN_TREE)
def test_the_screen_vouches_for_plain_json(value: Any) -> None:
    state = {"field": value}  # a state is a dict; a bare scalar is left to json_problem
    assert json_problem(state, 64) is None
    assert surely_storable(state, 64)


def test_each_refusal_is_left_to_json_problem() -> None:
    for value in [{"x": float("nan")}, [2**63], {"k": ["\ud800"]}, {"\udfff": 1}, [[[[1]]]], {1: "a"}, (1, 2)]:
        assert not surely_storable(value, 3)
        assert json_problem(value, 3) is not None or isinstance(value, tuple) or value == {1: "a"}
