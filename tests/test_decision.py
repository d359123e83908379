"""Model output is untrusted: parsing never raises anything but DecisionError, with a readable reason."""

from __future__ import annotations

import json
import re

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


# ----------------------------------------------------------------------------- no silent misreadings (issue 16)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        # another protocol's tool call at the top level: it used to be read as "no action"
        ({"tool": "write", "arguments": {"text": "ok"}, "confidence": 0.5},
         "unknown key 'tool' at the top level: put the call in \"action\": {\"tool\": ..., \"args\": {...}}"),
        ({"name": "write", "input": {"text": "ok"}, "confidence": 0.5}, "unknown key 'name' at the top level: put the call in"),
        ({**VALID, "thoughts": "hmm"},
         "unknown key 'thoughts' at the top level; a decision has only action, subgoal, confidence, reasoning, done"),
        ({**VALID, "action": {"tool": "write", "arguments": {"text": "ok"}}},
         "unknown key 'arguments' in \"action\": the arguments go in \"args\""),
        ({**VALID, "action": {"tool": "write", "args": {}, "why": "x"}},
         "unknown key 'why' in \"action\"; an action has only \"tool\" and \"args\""),
        ({**VALID, "\x1b[2J": 1}, "unknown key '\\\\x1b\\[2J' at the top level"),  # a hostile key is shown escaped
    ],
)
def test_unknown_keys_are_never_dropped_silently(reply: dict, reason: str) -> None:
    with pytest.raises(DecisionError, match=reason if reason.startswith("unknown key '\\") else re.escape(reason)):
        parse_decision(json.dumps(reply), {"write"})


def test_a_reply_with_only_known_keys_still_parses() -> None:
    decision = parse_decision(json.dumps({"action": None, "confidence": 0.1}), {"write"})
    assert decision.action is None and decision.subgoal == ""


def test_a_key_given_twice_is_refused_not_reduced_to_the_last() -> None:
    reply = '{"action": {"tool": "write", "args": {"text": "ok"}}, "confidence": 0.5, "action": null}'
    with pytest.raises(DecisionError, match="the key 'action' appears twice in one object"):
        parse_decision(reply, {"write"})
    with pytest.raises(DecisionError, match="the key 'text' appears twice"):
        parse_decision('{"action": {"tool": "write", "args": {"text": "a", "text": "b"}}, "confidence": 0.5}', {"write"})
