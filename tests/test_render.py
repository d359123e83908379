"""The state diff shows what changed, not two whole states."""

from __future__ import annotations

from loopterm.tui.widgets.render import _changed_parts


def test_only_changed_fields_and_the_new_tail_of_a_grown_list() -> None:
    before = {"iteration": 4, "items": [f"item {i}" for i in range(1000)], "task": "same", "gone": 1}
    after = {"iteration": 5, "items": [*before["items"], "item 1000"], "task": "same", "added": True}
    old, new = _changed_parts(before, after)
    assert old == {"iteration": 4, "gone": 1}
    assert new == {"iteration": 5, "items (appended after item 1000)": ["item 1000"], "added": True}


def test_a_rewritten_list_is_shown_whole_and_no_change_is_empty() -> None:
    old, new = _changed_parts({"xs": [1, 2, 3]}, {"xs": [3, 2]})
    assert (old, new) == ({"xs": [1, 2, 3]}, {"xs": [3, 2]})
    assert _changed_parts({"a": 1}, {"a": 1}) == ({}, {})
