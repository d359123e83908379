"""Approval policies (core/approval_policy.py): a person's standing answer to calls like one they answered.

Matching and precedence are pure; the rest drives real engines on a real store: a policy made with an answer
(through the control channel, as the TUI sends it) answers the next matching call without asking and the log
names it; a loop's policy reaches a new run of the loop, a run's does not; a revocation applies at the next
call; `loopterm policy list|revoke`; `loopterm run --headless --approval-timeout S` in its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import ToolContext, tool
from loopterm.core.acting import policies as policies_in_force
from loopterm.core.approval_policy import (
    Policy,
    PolicyRule,
    decide,
    globs_text,
    literal_glob,
    matches,
    parse_globs,
    prefill,
)
from loopterm.core.control import Approve, Command, Deny, command_payload
from loopterm.core.engine import Engine
from loopterm.core.events import ApprovalNeeded
from loopterm.core.fold import decision_lines, fold
from loopterm.core.runlog import (
    ApprovalPending,
    Approved,
    CommandRejected,
    Denied,
    PolicyAdded,
    PolicyDecided,
    PolicyRevoked,
)
from loopterm.store import Store
from loopterm.store import policies as stored
from loopterm.tui.cli import main
from tests.loopkit import FLAG_GATE, PRICE, decision, make_loop, of, write


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")


SAVED: list[tuple[str, str]] = []


@tool(side_effects=True, idempotent=True, needs_approval=True)
def save(ctx: ToolContext, path: str, text: str) -> str:
    """Save text to a file in the workspace, once a person approves."""
    SAVED.append((path, text))
    return f"saved {path}"


def rule(effect: str = "approve", scope: str = "run", **globs: str) -> PolicyRule:
    return PolicyRule(effect=effect, scope=scope, tool="save", globs=globs)  # type: ignore[arg-type]


def policy(pid: str, r: PolicyRule, run_id: str = "r1", ts: float = 1.0) -> Policy:
    return Policy(id=pid, rule=r, run_id=run_id, ts=ts)


# ---------------------------------------------------------------------- matching


def test_a_policy_matches_when_every_glob_matches_its_argument() -> None:
    r = rule(path="src/*.py")
    assert matches(r, "save", {"path": "src/app.py", "text": "anything"})
    assert matches(r, "save", {"path": "src/a/b.py", "text": ""})  # * also matches /
    assert not matches(r, "save", {"path": "tests/app.py", "text": ""})
    assert not matches(r, "write", {"path": "src/app.py"})  # another tool
    assert not matches(rule(path="*", mode="w"), "save", {"path": "x"})  # a named argument the call lacks
    assert matches(rule(), "save", {"path": "x"})  # no globs: any arguments of the tool
    assert matches(rule(n="[[]1,2]"), "save", {"n": [1, 2]})  # non-strings as compact JSON
    assert not matches(rule(path="SRC/*"), "save", {"path": "src/x"})  # case-sensitive everywhere


def test_prefilled_globs_match_exactly_the_call_they_were_made_from() -> None:
    args = {"path": "src/[draft]*.py", "n": 3, "opts": {"b": 1, "a": None}}
    globs = prefill(args)
    assert globs["path"] == "src/[[]draft][*].py" and literal_glob(3) == "3"
    assert matches(rule(**globs), "save", args)
    assert not matches(rule(**globs), "save", {**args, "path": "src/[draft]x.py"})
    assert parse_globs(globs_text(globs), args) == globs


@pytest.mark.parametrize(("text", "says"), [
    ("path", "line 1 is not name=glob"),
    ("=x", "line 1 is not name=glob"),
    ("path=a\npath=b", "line 2: argument 'path' has a glob already"),
    ("pth=src/*", "this call has no argument 'pth' (its arguments: path, text)"),
])
def test_bad_globs_are_refused_in_one_line(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_globs(text, {"path": "a", "text": "b"})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_deny_wins_over_approve_and_scope_and_revocation_count() -> None:
    approve_all = policy("pa", rule(path="*"), ts=1.0)
    deny_secrets = policy("pd", rule("deny", path="secrets/*"), ts=2.0)
    args = {"path": "secrets/key", "text": ""}
    assert decide([approve_all, deny_secrets], "r1", "save", args) is deny_secrets
    assert decide([approve_all, deny_secrets], "r1", "save", {"path": "src/a", "text": ""}) is approve_all
    assert decide([approve_all], "r2", "save", args) is None  # a run's policy, asked about another run
    loop_wide = policy("pl", rule(scope="loop", path="*"))
    assert decide([loop_wide], "r2", "save", args) is loop_wide
    revoked = deny_secrets.model_copy(update={"revoked": True})
    assert decide([approve_all, revoked], "r1", "save", args) is approve_all


# ---------------------------------------------------------------------- engines


def gated_loop(tmp_path: Path, turns: list[dict[str, Any]], name: str = "t", max_iterations: int = 6) -> Any:
    return make_loop(tmp_path, [{"content": t} for t in turns], name=name, tools=[write, save], gates=[FLAG_GATE],
                     max_iterations=max_iterations, stall_window=None)


def engine_for(tmp_path: Path, store: Store, loop: Any, **kwargs: Any) -> Engine:
    from loopterm.core.model import check_model

    check_model(loop.model, loop.script)
    return Engine.create(loop, store, loop_ref="test:gated", workspace_root=tmp_path / "ws", workdir=tmp_path, **kwargs)


class Person:
    """Answers each call asked of a person through the control channel (as the TUI and `watch` do)."""

    def __init__(self, store: Store, engine: Engine, answer: Callable[[ApprovalNeeded], Command]) -> None:
        self.store, self.engine, self.answer = store, engine, answer
        self.asked: list[ApprovalNeeded] = []
        engine.subscribe(self)

    def __call__(self, event: Any) -> None:
        if isinstance(event, ApprovalNeeded):
            self.asked.append(event)
            self.store.add_command(event.run_id, *command_payload(self.answer(event)))
            self.engine.wake()


def save_turn(path: str, text: str = "x") -> dict[str, Any]:
    return decision("save", path=path, text=text, subgoal=f"save {path}")


def done_turn() -> dict[str, Any]:
    return decision("write", text="ok", subgoal="finish")


def test_a_run_policy_answers_the_next_matching_call_and_the_log_names_it(tmp_path: Path) -> None:
    SAVED.clear()
    loop = gated_loop(tmp_path, [save_turn("src/a.py"), save_turn("src/b.py"), save_turn("docs/c.md"), done_turn()])
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, loop, wait_on_person=True)
    person = Person(store, engine, lambda e: Approve(key=e.key, reason="sources are fine",
                                                     policy=rule(path="src/*.py")) if e.n == 1
                    else Deny(key=e.key, reason="not docs"))
    final = asyncio.run(engine.run())
    assert final.status == "converged"
    assert [e.n for e in person.asked] == [1, 3]  # iteration 2 (src/b.py) was not asked
    assert SAVED == [("src/a.py", "x"), ("src/b.py", "x")]
    events = store.events(engine.run_id)
    (made,) = of(events, PolicyAdded)
    assert (made.effect, made.scope, made.globs, made.reason, made.loop_ref) == (
        "approve", "run", {"path": "src/*.py"}, "sources are fine", "test:gated")
    (decided,) = of(events, PolicyDecided)
    assert decided.policy == made.policy and decided.effect == "approve" and decided.args["path"] == "src/b.py"
    assert len(of(events, ApprovalPending)) == 2
    second = store.get_iteration(engine.run_id, 2)
    assert second.tool_call["approval"] == "approve" and second.tool_call["policy"] == made.policy
    assert decision_lines(fold(events)) == [f"iteration 2: save approved by policy {made.policy}"]
    (book,) = stored.policies(store, run=store.get_run(engine.run_id))
    assert book.decided == [(engine.run_id, 2, "save")]
    store.close()


def test_a_deny_policy_denies_with_its_reason_and_wins_over_an_approve_policy(tmp_path: Path) -> None:
    SAVED.clear()
    loop = gated_loop(tmp_path, [save_turn("secrets/k"), save_turn("src/a.py"), save_turn("secrets/j"), done_turn()])
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, loop, wait_on_person=True)

    def answer(e: ApprovalNeeded) -> Command:
        if e.n == 1:
            return Deny(key=e.key, reason="never secrets", policy=rule("deny", path="secrets/*"))
        return Approve(key=e.key, policy=rule(path="*"))  # every path, secrets too ... but deny wins

    person = Person(store, engine, answer)
    assert asyncio.run(engine.run()).status == "converged"
    assert [e.n for e in person.asked] == [1, 2]
    assert SAVED == [("src/a.py", "x")]
    deny_id = of(store.events(engine.run_id), PolicyAdded)[0].policy
    third = store.get_iteration(engine.run_id, 3)
    assert third.tool_call["approval"] == "deny" and third.tool_call["policy"] == deny_id
    assert third.tool_result["error"] == f"denied by policy {deny_id}: never secrets"
    first = store.get_iteration(engine.run_id, 1)
    assert first.tool_result["error"] == "denied by a person: never secrets" and "policy" not in first.tool_call
    store.close()


def test_a_loop_policy_reaches_a_new_run_of_the_loop_and_a_run_policy_does_not(tmp_path: Path) -> None:
    SAVED.clear()
    db = tmp_path / "db" / "loopterm.db"
    store = Store.open(db)
    first = engine_for(tmp_path, store, gated_loop(tmp_path, [save_turn("src/a.py"), save_turn("notes/n.md"),
                                                               done_turn()], name="one"), wait_on_person=True)
    Person(store, first, lambda e: Approve(key=e.key, policy=rule(scope="loop", path="src/*"))
           if e.n == 1 else Approve(key=e.key, policy=rule(path="notes/*")))
    assert asyncio.run(first.run()).status == "converged"
    # A new run of the same loop, with no one to ask: src/ is approved by the loop's policy, notes/ is asked.
    second = engine_for(tmp_path, store, gated_loop(tmp_path, [save_turn("src/z.py"), save_turn("notes/m.md")],
                                                    name="two"), wait_on_person=False)
    final = asyncio.run(second.run())
    assert final.termination_reason == "waiting_on_person"  # notes/m.md waits on a person: the run's policy stayed in run 1
    events = store.events(second.run_id)
    (decided,) = of(events, PolicyDecided)
    loop_policy = of(store.events(first.run_id), PolicyAdded)[0]
    assert decided.policy == loop_policy.policy and decided.policy_run == first.run_id
    assert [p.asked.args["path"] for p in fold(events).approvals.values()] == ["notes/m.md"]
    assert SAVED[-1] == ("src/z.py", "x")
    listed = stored.policies(store, run=store.get_run(second.run_id))
    assert [p.id for p in listed] == [loop_policy.policy]  # its loop's, not run 1's own
    store.close()


def test_a_revocation_applies_at_the_next_call_and_is_in_the_log(tmp_path: Path) -> None:
    SAVED.clear()
    store = Store.open(tmp_path / "db" / "loopterm.db")
    first = engine_for(tmp_path, store, gated_loop(tmp_path, [save_turn("src/a.py"), done_turn()], name="one"),
                       wait_on_person=True)
    Person(store, first, lambda e: Approve(key=e.key, policy=rule(scope="loop", path="src/*")))
    asyncio.run(first.run())
    second = engine_for(tmp_path, store, gated_loop(tmp_path, [save_turn("src/b.py")], name="two"))
    (made,) = policies_in_force(second)
    revoked = stored.revoke(store, made.id[:4], "too broad")  # a unique prefix is enough
    assert revoked.revoked and revoked.revoke_reason == "too broad"
    assert of(store.events(first.run_id), PolicyRevoked) == [PolicyRevoked(policy=made.id, reason="too broad")]
    assert policies_in_force(second) == []  # read afresh: the engine's next call is asked
    assert asyncio.run(second.run()).termination_reason == "waiting_on_person"
    with pytest.raises(Exception, match="already revoked"):
        stored.revoke(store, made.id)
    store.close()


def test_a_shadow_run_takes_no_policy(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, gated_loop(tmp_path, [save_turn("src/a.py")], max_iterations=1),
                        wait_on_person=True, shadow=True)

    def person(event: Any) -> None:  # a verdict with a policy (refused, whole), then one without
        if isinstance(event, ApprovalNeeded):
            store.add_command(event.run_id, *command_payload(Approve(key=event.key, policy=rule(path="*"))))
            store.add_command(event.run_id, *command_payload(Approve(key=event.key)))
            engine.wake()

    engine.subscribe(person)
    asyncio.run(engine.run())
    events = store.events(engine.run_id)
    assert of(events, PolicyAdded) == []
    (refused,) = of(events, CommandRejected)
    assert "a shadow run asks about every call: it takes no approval policy" in refused.error
    assert len(of(events, Approved)) == 1
    store.close()


# ---------------------------------------------------------------------- the command line


def made_policies(tmp_path: Path) -> tuple[Path, str, str]:
    """A database with one run that made a loop policy and a run policy; (db, loop policy id, run id)."""
    store = Store.open(tmp_path / "db" / "loopterm.db")
    engine = engine_for(tmp_path, store, gated_loop(tmp_path, [save_turn("src/a.py"), save_turn("n/b"),
                                                               save_turn("src/c.py"), done_turn()]),
                        wait_on_person=True)
    Person(store, engine, lambda e: Approve(key=e.key, reason="ok", policy=rule(scope="loop", path="src/*"))
           if e.n == 1 else Deny(key=e.key, reason="no n/", policy=rule("deny", path="n/*")))
    asyncio.run(engine.run())
    loop_id = next(p.policy for p in of(store.events(engine.run_id), PolicyAdded) if p.scope == "loop")
    store.close()
    return tmp_path / "db" / "loopterm.db", loop_id, engine.run_id


def test_policy_list_and_revoke_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, loop_id, run_id = made_policies(tmp_path)
    assert main(["policy", "list", "--db", str(db), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(p["effect"], p["scope"], p["globs"], p["run"]) for p in listed] == [
        ("approve", "loop", {"path": "src/*"}, run_id), ("deny", "run", {"path": "n/*"}, run_id)]
    assert listed[0]["decided"] == [{"run": run_id, "iteration": 3, "tool": "save"}] and listed[1]["decided"] == []
    assert main(["show", run_id, "--db", str(db)]) == 0
    assert f"policy: iteration 3: save approved by policy {loop_id}" in capsys.readouterr().out
    assert main(["policy", "list", "--loop", "test:gated", "--db", str(db), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["policy", "list", "--loop", "other", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["policy", "list", run_id[:8], "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert loop_id in out and "src/*" in out and "n/*" in out
    assert main(["policy", "revoke", loop_id, "--reason", "done with src", "--db", str(db)]) == 0
    assert f"revoked policy {loop_id}" in capsys.readouterr().out
    assert main(["policy", "list", "--db", str(db), "--json"]) == 0
    assert [p["scope"] for p in json.loads(capsys.readouterr().out)] == ["run"]  # revoked ones are hidden
    assert main(["policy", "list", "--all", "--db", str(db), "--json"]) == 0
    revoked = json.loads(capsys.readouterr().out)[0]
    assert revoked["revoked"] is True and revoked["revoke_reason"] == "done with src"


@pytest.mark.parametrize(("argv", "says"), [
    (["policy", "revoke", "nope"], "no approval policy 'nope'"),
    (["policy", "list", "RUN", "--loop", "x"], "give a RUN or --loop REF, not both"),
    (["policy", "list", "zzzz"], "zzzz"),
])
def test_bad_policy_command_lines_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          argv: list[str], says: str) -> None:
    db, _, _ = made_policies(tmp_path)
    capsys.readouterr()
    assert main([*argv, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loopterm: ") and says in err, err


def test_policy_without_an_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["policy"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "list" in err, err


def test_revoking_twice_is_refused_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, loop_id, run_id = made_policies(tmp_path)
    assert main(["policy", "revoke", loop_id, "--db", str(db)]) == 0
    with Store.open(db) as store:
        before = len(store.events(run_id))
    assert main(["policy", "revoke", loop_id, "--db", str(db)]) == 2
    assert "already revoked" in capsys.readouterr().err
    with Store.open(db) as store:
        assert len(store.events(run_id)) == before


# ---------------------------------------------------------------------- --approval-timeout, headless

LOOP_FILE = textwrap.dedent('''
    from pathlib import Path

    from loopterm.core import CommandGate, Loop, ToolContext, tool

    HERE = Path(__file__).resolve().parent


    @tool(side_effects=True, needs_approval=True)
    def save(ctx: ToolContext, path: str, text: str) -> str:
        """Save a file, once a person approves."""
        (ctx.workspace / path).write_text(text)
        return "saved"


    @tool(side_effects=True)
    def write(ctx: ToolContext, text: str) -> str:
        """Write flag.txt."""
        (ctx.workspace / "flag.txt").write_text(text)
        return "written"


    loop = Loop(name="gated", goal="make flag.txt say ok", tools=[save, write], script=HERE / "gated.json",
                gates=[CommandGate(name="flag", argv=["{python}", "-c",
                       "import sys; sys.exit(0 if open('flag.txt').read() == 'ok' else 1)"])],
                max_iterations=3)
''')


def gated_loop_file(tmp_path: Path) -> Path:
    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "gated.py").write_text(LOOP_FILE)
    turns = [{"content": decision("save", path="flag.txt", text="ok")}, {"content": decision("write", text="ok")}]
    (folder / "gated.json").write_text(json.dumps({"price": PRICE, "turns": turns}))
    return folder / "gated.py"


def test_a_headless_run_denies_a_call_no_one_answered_in_time_and_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "db" / "loopterm.db"
    db.parent.mkdir()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200",
           "LOOPTERM_CONFIG_DIR": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "run", str(gated_loop_file(tmp_path)),
                           "--headless", "--approval-timeout", "0.5", "--db", str(db)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr  # iteration 2's write converged it
    with Store.open(db) as store:
        (run,) = store.list_runs()
        events = store.events(run.id)
        (denied,) = of(events, Denied)
        assert denied.reason == "no answer within 0.5 s"
        first = store.get_iteration(run.id, 1)
        assert first.tool_call["approval"] == "deny" and "no answer within 0.5 s" in first.tool_result["error"]
        assert not (Path(run.workspace) / "flag.txt").read_text() != "ok"


@pytest.mark.parametrize(("value", "says"), [("-1", "--approval-timeout"), ("soon", "expected a number of seconds"),
                                             ("nan", "--approval-timeout")])
def test_a_bad_approval_timeout_is_one_line_and_exit_2(tmp_path: Path, value: str, says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "run", "codefix", "--headless",
                           "--approval-timeout", value, "--db", str(tmp_path / "x.db")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOOPTERM_CONFIG_DIR": str(tmp_path / "config")})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert not (tmp_path / "x.db").exists()


def test_an_approval_timeout_needs_a_headless_run_that_waits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "codefix", "--approval-timeout", "5", "--db", str(tmp_path / "x.db")]) == 2
    assert main(["run", "codefix", "--headless", "--no-wait", "--approval-timeout", "5",
                 "--db", str(tmp_path / "x.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--approval-timeout goes with --headless" in err
    assert not (tmp_path / "x.db").exists()
