"""Topologies end to end on the scripted model: checkers, critics, judges, strategies, child runs, cycles."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import Loop, LoopState
from loopterm.core.checkers import ModelGate, parse_verdict
from loopterm.core.engine import Engine
from loopterm.core.errors import ConfigError
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loader import load_loop
from loopterm.core.nesting import LoopCycleError, check_calls
from loopterm.core.roles import Role
from loopterm.core.strategy import Strategy
from loopterm.core.topology import maker_checker, proposer_critic_judge, reflexive
from loopterm.tui.cli import main
from loopterm.core import runlog
from tests.loopkit import FLAG_GATE, PRICE, decision, make_engine, of, write

CHECKER = Role(name="checker", system_prompt="You check another model's work. Be strict.")
CRITIC = Role(name="critic", system_prompt="You argue against the proposal.")
JUDGE = Role(name="judge", system_prompt="You weigh a proposal and its critique, then decide.")


def verdict(v: str, reason: str = "", *findings: tuple[str, str]) -> dict[str, Any]:
    return {"verdict": v, "reason": reason, "findings": [{"severity": s, "message": m} for s, m in findings]}


def _steps(turns: list[Any]) -> list[Any]:
    return [{"content": t} if isinstance(t, dict) else t for t in turns]


def script(tmp_path: Path, turns: list[Any], roles: dict[str, list[Any]], name: str = "t") -> Path:
    path = tmp_path / f"{name}-script.json"
    path.write_text(json.dumps({"price": PRICE, "turns": _steps(turns),
                                "roles": {r: {"turns": _steps(t)} for r, t in roles.items()}}))
    return path


def run(engine: Engine) -> Any:
    return asyncio.run(engine.run())


def test_maker_checker_iterates_on_the_checkers_findings(tmp_path: Path) -> None:
    turns = [decision(text="ok", subgoal="first try"), decision(text="ok", subgoal="address the finding")]
    checker = [verdict("fail", "no tests for the edge case", ("major", "flag.txt lacks a newline policy")),
               verdict("pass", "fine")]
    loop = maker_checker(name="mc", goal="make flag.txt say ok", script=script(tmp_path, turns, {"checker": checker}, "mc"),
                         tools=[write], gates=[FLAG_GATE], checker=CHECKER,
                         instructions="Fail unless the proposal is complete.", max_iterations=4)
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged" and final.iterations == 2
    first, second = store.iterations(final.id)
    gates = {g["name"]: g for g in first.gate_results}
    assert gates["flag"]["passed"] and not gates["checker"]["passed"]
    assert gates["checker"]["findings"] == [{"severity": "major", "message": "flag.txt lacks a newline policy"}]
    assert gates["checker"]["model"] == "scripted/mc.checker" and gates["checker"]["tokens_in"] > 0
    # the checker's spend is the iteration's: the maker's reply plus the checker's
    assert first.tokens_in > gates["checker"]["tokens_in"]
    assert first.cost_usd == pytest.approx(final.cost_usd - second.cost_usd)
    # its finding reaches the maker's next prompt
    assert "flag.txt lacks a newline policy" in second.prompt[1]["content"]


def test_a_checker_with_the_makers_profile_is_refused(tmp_path: Path) -> None:
    same = Role(name="self", system_prompt="You are the decision step.")
    with pytest.raises(ValueError, match="a maker never validates itself"):
        maker_checker(name="mc", goal="g", model="openai/gpt-4o-mini", system_prompt="You are the decision step.",
                      checker=same, instructions="check")
    # the same prompt on another model is an independent checker
    other = Role(name="other", system_prompt="You are the decision step.", model="anthropic/claude-3-5-haiku-20241022")
    maker_checker(name="mc", goal="g", model="openai/gpt-4o-mini", system_prompt="You are the decision step.",
                  checker=other, instructions="check")


def test_reflexive_critic_runs_only_when_everything_else_passed(tmp_path: Path) -> None:
    turns = [decision(text="no"), decision(text="ok"), decision(text="ok", subgoal="answer the critic")]
    # the critic is asked at iterations 2 and 3 only (iteration 1's flag gate failed)
    critic = [verdict("pass", "never asked"), verdict("fail", "you did not explain why"), verdict("pass", "good")]
    loop = reflexive(name="rf", goal="make flag.txt say ok", script=script(tmp_path, turns, {"critic": critic}, "rf"),
                     tools=[write], gates=[FLAG_GATE], critic=CRITIC, max_iterations=5)
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged" and final.iterations == 3
    names = [[g["name"] for g in r.gate_results] for r in store.iterations(final.id)]
    assert names == [["flag"], ["flag", "critic"], ["flag", "critic"]]


def test_proposer_critic_judge_the_critic_advises_the_judge_decides(tmp_path: Path) -> None:
    turns = [decision(text="ok", subgoal="propose"), decision(text="ok", subgoal="propose again")]
    roles = {
        "critic": [verdict("fail", "too hasty"), verdict("fail", "still hasty")],
        "judge": [verdict("fail", "the critic is right"), verdict("pass", "the critique no longer applies")],
    }
    loop = proposer_critic_judge(
        name="pcj", goal="make flag.txt say ok", script=script(tmp_path, turns, roles, "pcj"), tools=[write],
        critic=CRITIC, judge=JUDGE, critic_instructions="Find the weakest point.",
        judge_instructions="Decide with the critique in mind.", max_iterations=4,
    )
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged" and final.iterations == 2
    second = store.iterations(final.id)[1].gate_results
    assert second[0]["name"] == "critic" and second[0]["passed"]  # advisory: never fails the iteration
    assert "still hasty" in second[0]["stdout"]
    assert second[1]["name"] == "judge" and second[1]["passed"]
    # the judge was shown the critique
    assert second[1]["tokens_in"] > 0


def test_a_checker_reply_that_is_not_a_verdict_fails_the_gate_not_the_run(tmp_path: Path) -> None:
    turns = [decision(text="ok"), decision(text="ok")]
    loop = maker_checker(name="bad", goal="g", script=script(tmp_path, turns, {"checker": ["[bold]nope", verdict("pass")]}, "bad"),
                         tools=[write], checker=CHECKER, instructions="check", max_iterations=3)
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged" and final.iterations == 2
    gate = store.iterations(final.id)[0].gate_results[0]
    assert not gate["passed"] and "not a verdict" in gate["error"]
    with pytest.raises(ValueError):
        parse_verdict('{"verdict": "maybe"}')


def test_a_stall_changes_strategy_and_is_recorded(tmp_path: Path) -> None:
    same = decision(text="no", subgoal="same")
    turns = [same, same, same, decision(text="ok", subgoal="new approach")]
    strategies = [Strategy(name="careful", note="read the gate output before writing", temperature=0.7)]
    loop = Loop(name="st", goal="make flag.txt say ok", script=script(tmp_path, turns, {}, "st"), tools=[write],
                gates=[FLAG_GATE], strategies=strategies, max_iterations=6)
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged" and final.iterations == 4
    changed = of(store.events(final.id), runlog.StrategyChanged)
    assert len(changed) == 1 and changed[0].to == "careful" and "stalled" in changed[0].why
    fourth = store.iterations(final.id)[3]
    assert "read the gate output before writing" in fourth.prompt[1]["content"]
    assert any("strategy changed to careful" in f for f in fourth.state["memory"]["facts"])
    # with no strategy left, the next stall ends the run as before
    loop2 = Loop(name="st2", goal="g", script=script(tmp_path, [same] * 6, {}, "st2"), tools=[write], gates=[FLAG_GATE],
                 max_iterations=6)
    engine2, _ = make_engine(tmp_path / "b", loop2)
    assert run(engine2).termination_reason == "stalled"


def test_a_change_strategy_remediation_moves_to_the_next_strategy(tmp_path: Path) -> None:
    turns = [decision(text="bad"), decision(text="ok")]
    inv = Invariant(name="no_bad", check=lambda s: all(r.args.get("text") != "bad" for r in s.tool_results[-1:]),
                    remediation=Remediation.CHANGE_STRATEGY)
    loop = Loop(name="cs", goal="g", script=script(tmp_path, turns, {}, "cs"), tools=[write], gates=[FLAG_GATE],
                invariants=[inv], strategies=[Strategy(name="b", note="never write bad", system_prompt="You are careful.")],
                max_iterations=3)
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged"
    second = store.iterations(final.id)[1]
    assert second.prompt[0]["content"].startswith("You are careful.")
    # a restart keeps the strategy it had switched to
    assert Engine(loop, store, store.get_run(final.id)).strategy.name == "b"


# ---------------------------------------------------------------------------- loops calling loops

CHILD = '''
from loopterm.core import Loop, LoopState
loop = Loop(name="child", goal="answer", script={script!r}, max_iterations=2,
            converged=lambda s, g: True, result=lambda s: "child says " + s.memory.subgoal)
'''

PARENT = '''
from loopterm.core import Loop
from loopterm.core.nesting import fan_out
loop = Loop(name="parent", goal="ask children", script={script!r}, max_iterations=3,
            tools=[fan_out("ask", {child!r}, goal="look at {{item}}", parallel=2)],
            converged=lambda s, g: bool(s.tool_results) and s.tool_results[-1].ok)
'''


def _files(tmp_path: Path) -> Path:
    (tmp_path / "child.json").write_text(json.dumps({"price": PRICE, "turns": [{"content": decision(None, subgoal="done")}],
                                                     "after_end": "repeat_last"}))
    (tmp_path / "parent.json").write_text(json.dumps({"price": PRICE, "turns": [
        {"content": decision("ask", items=["a.py", "b.py", "c.py"])}]}))
    (tmp_path / "child.py").write_text(CHILD.format(script=str(tmp_path / "child.json")))
    (tmp_path / "parent.py").write_text(PARENT.format(script=str(tmp_path / "parent.json"), child="child.py"))
    return tmp_path / "parent.py"


def test_a_nested_run_is_a_child_run_and_returns_its_result(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    from loopterm.core.model import check_model
    from loopterm.store import Store

    parent_file = _files(tmp_path)
    loop, ref = load_loop(str(parent_file))
    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=tmp_path / "ws", workdir=tmp_path)
    final = run(engine)
    assert final.status == "converged"
    kids = store.children(final.id)
    assert len(kids) == 3 and {k.origin for k in kids} == {"child"} and {k.status for k in kids} == {"converged"}
    assert {k.goal for k in kids} == {"look at a.py", "look at b.py", "look at c.py"}
    output = json.loads(store.iterations(final.id)[0].tool_result["output"])
    assert [o["item"] for o in output] == ["a.py", "b.py", "c.py"]
    assert {o["result"] for o in output} == {"child says done"}
    # a child inherits none of its caller's iterations
    assert all(len(store.iterations(k.id)) == 1 for k in kids)
    # `loopterm runs` lists children under their caller
    tree = store.tree()
    assert tree[0][1].id == final.id and [d for d, _ in tree[1:4]] == [1, 1, 1]
    store.close()
    assert main(["runs", "--db", str(tmp_path / "db" / "loopterm.db")]) == 0
    out = capsys.readouterr().out
    assert sum(f"└ {k.id} (called)" in out for k in kids) == 3


def test_a_rerun_of_the_calling_tool_reuses_its_children(tmp_path: Path) -> None:
    from loopterm.core.model import check_model
    from loopterm.store import Store

    loop, ref = load_loop(str(_files(tmp_path)))
    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=tmp_path / "ws", workdir=tmp_path)
    first = asyncio.run(engine._spawn(loop.calls[0], "look at a.py", "k:a.py", "a.py"))
    again = asyncio.run(engine._spawn(loop.calls[0], "look at a.py", "k:a.py", "a.py"))
    assert again.run_id == first.run_id and len(store.children(engine.run_id)) == 1


def _cycle(tmp_path: Path) -> Path:
    (tmp_path / "s.json").write_text(json.dumps({"turns": [{"content": decision(None)}]}))
    for me, other in (("ping", "pong"), ("pong", "ping")):
        (tmp_path / f"{me}.py").write_text(textwrap.dedent(f'''
            from loopterm.core import Loop
            from loopterm.core.nesting import fan_out
            loop = Loop(name="{me}", goal="call {other}", script={str(tmp_path / "s.json")!r},
                        tools=[fan_out("call", "{other}.py")])
        '''))
    return tmp_path / "ping.py"


def test_two_loops_calling_each_other_are_refused_before_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ping = _cycle(tmp_path)
    loop, ref = load_loop(str(ping))
    with pytest.raises(LoopCycleError, match=r"ping.py:loop -> pong.py:loop -> ping.py:loop"):
        check_calls(loop, ref)
    db = tmp_path / "db" / "l.db"
    db.parent.mkdir()
    code = main(["run", str(ping), "--headless", "--db", str(db)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("loopterm: refused: loops calling each other form a cycle (ping.py:loop -> pong.py:loop")
    # nothing was created
    from loopterm.store import Store

    assert not db.exists() or Store.open(db).list_runs() == []


def test_a_loop_calling_itself_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"turns": [{"content": decision(None)}]}))
    (tmp_path / "me.py").write_text(textwrap.dedent(f'''
        from loopterm.core import Loop
        from loopterm.core.nesting import fan_out
        loop = Loop(name="me", goal="g", script={str(tmp_path / "s.json")!r}, tools=[fan_out("again", "me.py")])
    '''))
    loop, ref = load_loop(str(tmp_path / "me.py"))
    with pytest.raises(ConfigError, match="cycle"):
        check_calls(loop, ref)


def test_a_scripted_turn_can_answer_by_what_the_prompt_contains() -> None:
    from loopterm.core.scripted import Script

    s = Script.model_validate({"turns": [[{"content": "bug", "match": "range(1,"}, {"content": "clean"}]],
                               "roles": {"checker": {"turns": ["v"]}}})
    assert s.step(1, 0, "diff: for i in range(1, n)").text() == "bug"
    assert s.step(1, 0, "diff: for i in range(n)").text() == "clean"
    assert s.roles["checker"].step(1, 0).text() == "v"


def test_a_precondition_refuses_a_call_before_it_runs(tmp_path: Path) -> None:
    from loopterm.core import tool

    fired: list[str] = []

    @tool(side_effects=True, precondition=lambda state, args: "never say no" if args["text"] == "no" else None)
    def send(text: str) -> str:
        """Send text somewhere no one can take it back from."""
        fired.append(text)
        return "sent"

    turns = [decision("send", text="no"), decision("send", text="ok")]
    loop = Loop(name="pre", goal="g", script=script(tmp_path, turns, {}, "pre"), tools=[send], max_iterations=3,
                converged=lambda s, g: bool(s.tool_results) and s.tool_results[-1].ok)
    engine, store = make_engine(tmp_path, loop)
    final = run(engine)
    assert final.status == "converged" and final.iterations == 2 and fired == ["ok"]
    first = store.iterations(final.id)[0]
    assert first.tool_call["refused"] == "never say no"
    assert not first.tool_result["ok"] and first.tool_result["error"] == "refused before it ran: never say no"
    assert store.tool_call(first.tool_call["key"]) is None  # nothing was journalled as started: it never ran


def test_a_checker_without_a_script_is_refused_before_the_run_and_never_leaves_it_running(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"turns": [{"content": decision(None)}]}))  # no "roles"
    (tmp_path / "mc.py").write_text(textwrap.dedent(f'''
        from loopterm.core.roles import Role
        from loopterm.core.topology import maker_checker
        loop = maker_checker(name="mcx", goal="g", script={str(tmp_path / "s.json")!r},
                             checker=Role(name="checker", system_prompt="check it"), instructions="check")
    '''))
    code = main(["run", str(tmp_path / "mc.py"), "--headless", "--db", str(tmp_path / "l.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "gate 'checker' (role 'checker')" in err[0] and '"roles"' in err[0]
    # an engine started without the preflight ends the run with the reason instead of crashing
    loop, ref = load_loop(str(tmp_path / "mc.py"))
    engine, store = make_engine(tmp_path / "e", loop)
    final = run(engine)
    assert final.status == "failed" and "role 'checker'" in (final.message or "")


def test_each_iteration_leaves_a_one_line_fact_with_the_point_of_a_failure() -> None:
    from loopterm.core.gates import GateResult
    from loopterm.core.observation import headline, iteration_fact
    from loopterm.core.state import ToolRecord

    pytest_out = ("F.\n=== FAILURES ===\n____ test_accents ____\n    assert slugify('Crème') == 'creme'\n"
                  "E   AssertionError: assert 'cr-me' == 'creme'\n=== short test summary info ===\n"
                  "FAILED test_solution.py::test_accents - AssertionError: assert 'cr-me' == 'creme'\n1 failed, 1 passed\n")
    gates = [GateResult(name="compile", passed=True), GateResult(name="tests", passed=False, exit_code=1, stdout=pytest_out)]
    fact = iteration_fact(3, ToolRecord(iteration=3, tool="write_file"), gates)
    assert fact == ("iteration 3: write_file ok; compile passed, tests failed "
                    "(FAILED test_solution.py::test_accents - AssertionError: assert 'cr-me' == 'creme')")
    compile_err = '  File "solution.py", line 7\n    slug = re.sub(r"x", "-", text.lower()\n           ^\nSyntaxError: \'(\' was never closed\n'
    assert headline(compile_err) == "SyntaxError: '(' was never closed"
    refused = ToolRecord(iteration=1, tool="write_file", ok=False, error="ValueError: path '../x' contains '..'")
    assert iteration_fact(1, refused, []) == "iteration 1: write_file error: ValueError: path '../x' contains '..'; no gates"
    assert headline("") == "" and headline("just one line") == "just one line"


def test_children_started_together_split_their_callers_remaining_budget(tmp_path: Path) -> None:
    from loopterm.core.model import check_model
    from loopterm.store import Store

    parent_file = _files(tmp_path)
    loop, ref = load_loop(str(parent_file))
    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=tmp_path / "ws", workdir=tmp_path,
                           budget={"usd": 0.03, "tokens": 30_000})
    final = run(engine)
    assert final.status == "converged"
    kids = store.children(final.id)
    assert len(kids) == 3
    for kid in kids:  # a third each of what the caller had left when the fan-out started
        assert kid.budget["usd"] == pytest.approx((0.03 - final.cost_usd) / 3, rel=0.05)
        assert kid.budget["tokens"] <= 10_000
