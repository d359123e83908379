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


def test_same_content_in_another_key_order_is_no_change() -> None:
    old = {"a": {"x": 1, "y": 2}, "b": [1, 2]}
    assert diff(old, {"a": {"y": 2, "x": 1}, "b": [1, 2]}) == []
