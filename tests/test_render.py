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


def test_a_model_checker_shows_who_answered_what_it_cost_and_its_verdict_literally() -> None:
    from loopterm.core.records import IterationRecord
    from loopterm.tui.widgets.render import Palette, gates_detail

    record = IterationRecord(
        run_id="r", n=1, started_at=0, ended_at=1, prompt=[], raw_response="", decision=None, repairs=0,
        cost_usd=0, latency_ms=0, model="m", state={},
        gate_results=[{"name": "checker", "passed": False, "stdout": "checker: fail: [bold red]no[/]",
                       "model": "scripted/t.checker", "tokens_in": 1200, "tokens_out": 34, "cost_usd": 0.00021}],
    )
    text = gates_detail(record, Palette())
    assert "scripted/t.checker, 1,234 tok, $0.000210" in text.plain
    assert "[bold red]no[/]" in text.plain  # model output is shown as written, never as markup


def test_a_tools_mode_repair_shows_the_calls_it_answered_and_the_reply_says_its_mode() -> None:
    from loopterm.core.records import IterationRecord
    from loopterm.tui.widgets.render import prompt_text, response_text

    calls = [{"id": "call_1_0", "type": "function",
              "function": {"name": "delete_everything", "arguments": "{\"why\": \"[b]now[/b]\"}"}}]
    record = IterationRecord(
        run_id="r", n=1, started_at=0, ended_at=1, decision=None, repairs=1, model="m", state={},
        decision_mode="tools", raw_response='{"tool_calls": [{"name": "no_action", "arguments": {"confidence": 0.5}}]}',
        prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1_0", "content": "unknown function 'delete_everything'"},
                {"role": "user", "content": "call exactly one of the functions"}],
    )
    shown = prompt_text(record).plain
    assert "── assistant ──\ntool calls\n" in shown and "delete_everything" in shown and "[b]now[/b]" in shown
    assert "None" not in shown
    assert response_text(record).plain.startswith("raw reply  as the provider's tool call  (after 1 repair attempt(s))")
