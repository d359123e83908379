"""Model output is untrusted: parsing never raises anything but DecisionError, with a readable reason."""

from __future__ import annotations

import json

import pytest

from loopterm.core.decision import DecisionError, parse_decision

VALID = {"action": {"tool": "write", "args": {"text": "ok"}}, "subgoal": "s", "confidence": 0.5, "reasoning": "r"}


def test_valid_and_fenced_replies_parse() -> None:
    assert parse_decision(json.dumps(VALID)).action.tool == "write"  # type: ignore[union-attr]
    fenced = "```json\n" + json.dumps(VALID) + "\n```"
    assert parse_decision(fenced, {"write"}).confidence == 0.5


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", "empty"),
        ("hello", "not valid JSON"),
        ("[1]", "not an object"),
        (json.dumps({**VALID, "confidence": 1.5}), "confidence"),
        (json.dumps({**VALID, "action": {"args": {}}}), "action.tool"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_bad_replies_are_explained(reply: str, reason: str) -> None:
    with pytest.raises(DecisionError, match=reason):
        parse_decision(reply, {"write"})


def test_unknown_tool_lists_the_available_ones() -> None:
    reply = json.dumps({**VALID, "action": {"tool": "rm_rf", "args": {}}})
    with pytest.raises(DecisionError, match="unknown tool 'rm_rf'; available tools: read, write"):
        parse_decision(reply, {"write", "read"})
