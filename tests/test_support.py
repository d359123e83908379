"""The built-in `support` loop: a refund answer grounded in the policy kept in long-term memory.

Offline and deterministic (the scripted model): the invented 90-day return window is caught and
re-grounded, an unresolvable request escalates (exit 4), a person's edit of a term changes what
counts as grounded, and a later run recalls an earlier run's decision.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.engine import Engine
from loopterm.core.loader import load_loop
from loopterm.core.model import check_model
from loopterm.examples.support import loop as support
from loopterm.examples.support.terms import canonical, extract_terms, find_terms
from loopterm.examples.support.tools import POLICY_FILE, POLICY_KEY, ensure_policy, parse_passages
from loopterm.store import Store
from loopterm.tui.cli import main

HERE = Path(support.__file__).resolve().parent
POLICY_TERMS = {
    "return_window": "30 days",
    "restocking_fee": "15%",
    "return_shipping_fee": "$7.50",
    "refund_method": "original payment method",
    "refund_time": "10 business days",
    "damage_report_window": "7 days",
}
REGROUND = ("withdrawn: the reply of iteration 2 stated return_window = 90 days, which the retrieved policy does not "
            "give; the policy says return_window = 30 days: state only that")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "loopterm.tui.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def json_out(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def cases() -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in json.loads((HERE / "cases.json").read_text())}


def run(loop: Any, store: Store, tmp_path: Path, **kwargs: Any) -> Any:
    engine = Engine.create(loop, store, loop_ref="support", workspace_root=tmp_path / "ws", workdir=tmp_path, **kwargs)
    return asyncio.run(engine.run())


def scripted(tmp_path: Path, name: str, turns: list[dict[str, Any]]) -> Any:
    """The support loop on a script of the test's own, as scripted/support.<name>."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"turns": [{"content": t} for t in turns]}))
    model = f"scripted/support.{name}"
    check_model(model, path)
    return support.loop.model_copy(update={"script": path, "model": model})


def act(tool: str, **args: Any) -> dict[str, Any]:
    return {"action": {"tool": tool, "args": args}, "subgoal": f"{tool} {len(args)}", "confidence": 0.8,
            "reasoning": "scripted", "done": tool == "reply"}


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(("sentence", "terms"), [
    ("You can return the boots within our 90-day return window.", {"return_window": "90 days"}),
    ("Our return window is 30 days from delivery.", {"return_window": "30 days"}),
    ("You have 30 days to return them.", {"return_window": "30 days"}),
    ("You may send them back within thirty days of delivery.", {"return_window": "30 days"}),
    ("There is a forty-five day return period.", {"return_window": "45 days"}),
    ("They arrived 12 days ago, so you are inside the 30-day window.", {"return_window": "30 days"}),
    ("Opened items carry a 15% restocking fee.", {"restocking_fee": "15%"}),
    ("A restocking fee of 15 percent applies.", {"restocking_fee": "15%"}),
    ("There is a $5 fee.", {"fee": "$5"}),
    ("Return shipping costs $7.50, deducted from the refund.", {"return_shipping_fee": "$7.50"}),
    ("We charge a $7.50 return shipping fee.", {"return_shipping_fee": "$7.50"}),
    ("A 15% restocking fee applies, and return shipping costs $7.50.",
     {"restocking_fee": "15%", "return_shipping_fee": "$7.50"}),
    ("Your refund goes to your original payment method within 10 business days.",
     {"refund_method": "original payment method", "refund_time": "10 business days"}),
    ("Refunds are issued within 10 working days after the return arrives.", {"refund_time": "10 business days"}),
    ("We will refund it to a different card.", {"refund_method": "different payment method"}),
    ("We cannot refund to a different card.", {}),
    ("You can have store credit instead.", {"refund_method": "store credit"}),
    ("Please report damage within 7 days of delivery.", {"damage_report_window": "7 days"}),
    ("You can return it within 30 days; we said 90 days to return before.", {"return_window": "30 days; 90 days"}),
    ("I bought a camera 8 months ago and it arrived damaged.", {}),
    ("Thanks for your message about order B-1042, dated 1 March 2025.", {}),
    ("", {}),
])
def test_policy_terms_are_read_from_sentences(sentence: str, terms: dict[str, str]) -> None:
    assert extract_terms(sentence) == terms


def test_canonical_values_and_the_policy_documents_terms() -> None:
    assert [canonical(v) for v in ["45 days", "45-day", "forty-five days", "15 %", "$7.5", "$5.00", "original card",
                                   "10 working days", "Store credit"]] == \
        ["45 days", "45 days", "45 days", "15%", "$7.50", "$5", "original payment method", "10 business days",
         "store credit"]
    assert extract_terms(POLICY_FILE.read_text()) == POLICY_TERMS
    assert [t.phrase for t in find_terms("Report damage within 7 days.")] == ["Report damage within 7 days"]


# ------------------------------------------------------------------ the headless run


@pytest.fixture(scope="module")
def headless(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("support")
    return work, cli("run", "support", "--headless", "--db", str(work / "s.db"), cwd=work)


def test_the_invented_return_window_is_caught_and_the_run_converges_at_3(
    headless: tuple[Path, subprocess.CompletedProcess[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    work, done = headless
    db = str(work / "s.db")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "converged" in done.stdout and "search_policy(" in done.stdout
    shown = json_out(capsys, "show", json_out(capsys, "runs", "--json", "--db", db)[0]["id"], "--json", "--db", db)
    assert shown["run"]["status"] == "converged" and shown["run"]["iterations"] == 3
    first, second, third = shown["iterations"]
    assert [it["tool_call"]["tool"] for it in shown["iterations"]] == ["search_policy", "reply", "reply"]
    ok = {"grounded_terms": True, "no_contradictions": True, "resolvable": True}
    assert first["invariant_status"] == ok and third["invariant_status"] == ok
    assert second["invariant_status"] == {"grounded_terms": False, "no_contradictions": False, "resolvable": True}
    assert second["remediations"] == ["custom", "custom"]
    # the observation: the reply's terms as facts; the engine flagged the one long-term memory contradicts
    state2 = second["state"]
    assert "return_window: observed '90 days', long-term memory says '30 days'" in state2["memory"]["contradictions"]
    assert "reply (iteration 2) stated return_window = 90 days, refund_method = original payment method" \
        " (not sent: refused before it ran)" in state2["memory"]["facts"]
    # re-grounded: the reply is withdrawn from the state, and the next prompt carries the fact
    assert state2["reply"] is None and state2["memory"]["known"] == {}
    assert state2["withdrawn"][0].startswith("iteration 2: ") and "90-day" in state2["withdrawn"][0]
    assert REGROUND in state2["memory"]["facts"]
    prompt3 = third["prompt"][1]["content"]
    assert REGROUND in prompt3 and "return_window = 30 days" in prompt3
    assert REGROUND not in second["prompt"][1]["content"]
    # the converged reply states the policy's own terms and reached the outbox; the invented one never did
    state3 = third["state"]
    assert state3["memory"]["known"] == {k: v for k, v in POLICY_TERMS.items() if k != "damage_report_window"}
    assert "30-day return window" in state3["reply"]
    outbox = Path(shown["run"]["workspace"]) / "outbox"
    assert sorted(p.name for p in outbox.iterdir()) == ["reply-3.txt"]
    assert second["tool_result"]["error"].startswith("refused before it ran: not sent: it states return_window = 90 days")
    events = [e["data"] for e in shown["events"] if e["kind"] == "invariant_violated"]
    assert events == [{"invariant": "grounded_terms", "remediation": "custom"},
                      {"invariant": "no_contradictions", "remediation": "custom"}]


def test_memory_list_shows_the_seeded_policy_and_the_runs_decision(
    headless: tuple[Path, subprocess.CompletedProcess[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    work, done = headless
    assert done.returncode == 0
    items = {m["key"]: m for m in json_out(capsys, "memory", "support", "list", "--json", "--db", str(work / "s.db"))}
    assert items[POLICY_KEY]["kind"] == "document" and "within 30 days of delivery" in items[POLICY_KEY]["value"]
    assert {k: items[k]["value"] for k in POLICY_TERMS} == POLICY_TERMS
    assert all(items[k]["kind"] == "fact" for k in POLICY_TERMS)
    decision = items[support.case_key(support.GOAL)]
    assert decision["kind"] == "decision" and decision["value"].startswith("answered (converged at iteration 3): ")
    assert "90-day" not in decision["value"]  # the withdrawn reply is not what the run leaves behind


# ------------------------------------------------------------------ escalation and cases


def test_an_unresolvable_request_escalates_and_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "damaged.py").write_text(
        "from loopterm.examples.support.loop import for_request\n"
        f"loop = for_request({cases()['damaged']['goal']!r})\n"
    )
    db = str(tmp_path / "s.db")
    assert main(["run", "damaged.py", "--headless", "--no-wait", "--db", db]) == 4
    capsys.readouterr()
    (run_record,) = json_out(capsys, "runs", "--json", "--db", db)
    assert run_record["status"] == "escalated" and run_record["iterations"] == 2
    shown = json_out(capsys, "show", run_record["id"], "--json", "--db", db)
    last = shown["iterations"][-1]
    assert last["tool_call"]["tool"] == "escalate"
    assert last["invariant_status"] == {"grounded_terms": True, "no_contradictions": True, "resolvable": False}
    packet = next(e["data"] for e in shown["events"] if e["kind"] == "escalated")
    assert [i["name"] for i in packet["failing_invariants"]] == ["resolvable"]
    assert any(f.startswith("escalated to a person: Outside the policy") for f in packet["state"]["memory"]["facts"])
    with Store.open(tmp_path / "s.db") as store:
        kept = {m.key: m.value for m in store.memories("support", kind="decision")}
    assert kept[support.case_key(cases()["damaged"]["goal"])].startswith("escalated to a person: ")


def test_every_case_meets_its_expectation(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "s.db"
    assert main(["run", "support", "--cases", str(HERE / "cases.json"), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 met their expectation" in out
    with Store.open(db) as store:
        runs = {r.goal: r for r in store.list_runs()}
    want = {"boots": ("converged", 3), "unopened": ("converged", 2), "damaged": ("escalated", 2),
            "stall": ("terminated", 3)}
    for case_id, (status, iterations) in want.items():
        record = runs[cases()[case_id].get("goal") or support.GOAL]
        assert (record.status, record.iterations) == (status, iterations), case_id
    assert runs[cases()["stall"]["goal"]].termination_reason == "stalled"


# ------------------------------------------------------------------ long-term memory


def test_an_edited_term_changes_what_counts_as_grounded(tmp_path: Path) -> None:
    reply_30 = "You can return them within our 30-day return window; refunds go to your original payment method."
    reply_45 = "You can return them within our 45-day return window; refunds go to your original payment method."
    loop = scripted(tmp_path, "edited", [act("search_policy", query="return window refund method"),
                                         act("reply", text=reply_30), act("reply", text=reply_45)])
    with Store.open(tmp_path / "s.db") as store:
        store.remember("support", "return_window", "45 days")  # a person's edit, before the policy was ever seeded
        final = run(loop, store, tmp_path)
        assert final.status == "converged" and final.iterations == 3
        _, second, third = store.iterations(final.id)
        # seeding kept the person's value; the document still says 30 days, but the term fact wins
        assert {m.key: m.value for m in store.memories("support")}["return_window"] == "45 days"
        assert second.invariant_status["grounded_terms"] is False
        assert "return_window: observed '30 days', long-term memory says '45 days'" in \
            second.state["memory"]["contradictions"]
        assert ("withdrawn: the reply of iteration 2 stated return_window = 30 days, which the retrieved policy does "
                "not give; the policy says return_window = 45 days: state only that") in third.prompt[1]["content"]
        assert third.invariant_status == {"grounded_terms": True, "no_contradictions": True, "resolvable": True}

        # the same 45-day reply, with the policy as shipped, is the invention
        store.remember("support", "return_window", "30 days")
        again = run(scripted(tmp_path, "edited2", [act("search_policy", query="return window refund method"),
                                                   act("reply", text=reply_45)]), store, tmp_path, max_iterations=2)
        assert again.status != "converged"
        (_, caught) = store.iterations(again.id)
        assert caught.invariant_status["grounded_terms"] is False


def test_a_term_memory_holds_but_the_search_missed_is_still_a_contradiction() -> None:
    """Grounded in the retrieved document, contradicted by a fact the search did not return."""
    state = support.SupportState(iteration=2, reply="Returns are accepted within 30 days.", reply_iteration=2,
                                 passages={POLICY_KEY: POLICY_FILE.read_text()})
    state.memory.known = {"return_window": "30 days"}
    state.memory.contradictions = ["return_window: observed '30 days', long-term memory says '45 days'"]
    assert support.grounded_terms(state) and not support.no_contradictions(state)
    fixed = support.reground(state)
    assert fixed.reply is None and fixed.withdrawn == ["iteration 2: Returns are accepted within 30 days."]
    assert ("withdrawn: the reply of iteration 2 stated return_window = 30 days; long-term memory says "
            "return_window = 45 days: state only that") in fixed.memory.facts
    assert support.reground(fixed) == fixed  # the second invariant's remediation finds nothing left to withdraw
    # a term no retrieved passage gives at all
    bare = support.SupportState(iteration=1, reply="There is a $5 fee.", reply_iteration=1)
    assert support.ungrounded(bare) == [("fee", "$5", [])]
    assert "no retrieved policy passage gives a fee" in support.reground(bare).memory.facts[-1]


def test_a_later_run_recalls_the_earlier_runs_decision(tmp_path: Path) -> None:
    loop, ref = load_loop("support")
    check_model(loop.model, loop.script)
    with Store.open(tmp_path / "s.db") as store:
        first = run(loop, store, tmp_path)
        assert first.status == "converged"
        second = run(loop, store, tmp_path)
        start = store.iterations(second.id)[0]
    recalled = start.state["memory"]["retrieved"]
    key = support.case_key(support.GOAL)
    assert any(r.startswith(f"{key}: answered (converged at iteration 3): Hi Dana") for r in recalled)
    assert key in start.prompt[0]["content"]  # long-term memory: in the stable system message
    # recalled at the start, the policy itself counts as retrieved: grounded before any search
    state = support.SupportState(iteration=1, reply="Within our 30-day return window.", reply_iteration=1)
    state.memory.retrieved = recalled
    assert support.policy_terms(state)["return_window"] == ["30 days"] and support.grounded_terms(state)


def test_seeding_fills_only_what_memory_lacks(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        store.remember("support", "restocking_fee", "10%")
        added = ensure_policy(store, "support")
        assert added == [POLICY_KEY, *[k for k in POLICY_TERMS if k != "restocking_fee"]]
        assert ensure_policy(store, "support") == []
        held = {m.key: m.value for m in store.memories("support")}
    assert held["restocking_fee"] == "10%" and held["return_window"] == "30 days"
    assert parse_passages(["[document] policy:refunds: Text: with colons", "3 passages for 'x: y'"]) == \
        {"policy:refunds": "Text: with colons"}


def test_a_run_replays_identically_after_memory_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The search is answered from the recording (what the run saw), not from today's memory: the run's
    own decision and a new policy document, both of which today's search would find, change nothing."""
    monkeypatch.chdir(tmp_path)
    db = str(tmp_path / "s.db")
    assert main(["run", "support", "--headless", "--db", db]) == 0
    capsys.readouterr()
    (recorded,) = json_out(capsys, "runs", "--json", "--db", db)
    assert main(["memory", "support", "add", "policy:holidays", "Holiday gifts may be returned until the end of "
                 "January, with the return window and fees of the refund policy.", "--kind", "document", "--db", db]) == 0
    capsys.readouterr()
    found = json_out(capsys, "memory", "support", "search", "return window restocking fee", "--json", "--limit", "9",
                     "--db", db)
    assert {"policy:holidays", support.case_key(support.GOAL)} <= {m["key"] for m in found}
    assert main(["replay", recorded["id"], "--db", db]) == 0
    assert "identical" in capsys.readouterr().out
