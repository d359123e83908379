"""Forks: a branch references its parent, validates patches, rebuilds its workspace, and never
re-fires an ancestor's side effect without its tool's policy saying so."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from loopterm.tui.cli import main


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def run_ids(capsys: pytest.CaptureFixture[str], db: Path) -> list[dict]:
    return cli_json(capsys, "runs", "--json", "--db", str(db))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def codefix_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One converged codefix run per module; each test gets its own copy of the database."""
    work = tmp_path_factory.mktemp("template")
    db = work / "template.db"
    assert main(["run", "codefix", "--headless", "--db", str(db)]) == 0
    from loopterm.store import Store

    return db, Store.open(db, create=False).list_runs()[0].id


@pytest.fixture
def codefix_db(codefix_template: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               store_target: str | Path) -> tuple[Any, str]:
    """A copy of the template's store: a SQLite file, then a PostgreSQL database (every test runs on both)."""
    monkeypatch.chdir(tmp_path)
    template, run_id = codefix_template
    if not isinstance(store_target, Path):
        from loopterm.store import Store

        with Store.open(template, create=False) as source, Store.open(store_target) as target:
            source.copy_to(target)
        return store_target, run_id
    db = tmp_path / "s.db"
    with sqlite3.connect(template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)  # consistent even with the template's WAL not yet checkpointed
    return db, run_id


@pytest.mark.parametrize("at", [1, 2, 3])
def test_fork_at_first_middle_and_last_iteration(codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str], at: int) -> None:
    db, parent = codefix_db
    capsys.readouterr()
    code = main(["fork", parent, "--at", str(at), "--reason", "try again", "--headless", "--db", str(db)])
    assert code == 0, capsys.readouterr()
    runs = run_ids(capsys, db)
    branch = next(r for r in runs if r["parent_run"] == parent)
    assert (branch["fork_iteration"], branch["origin"], branch["depth"]) == (at, "fork", 1)
    shown = cli_json(capsys, "show", branch["id"], "--json", "--db", str(db))
    assert shown["lineage"] == [parent, branch["id"]]  # type: ignore[index]
    owners = [(it["n"], it["run_id"]) for it in shown["iterations"]]  # type: ignore[index]
    assert owners[:at] == [(n, parent) for n in range(1, at + 1)]  # referenced, not copied
    assert all(run == branch["id"] for n, run in owners[at:]) and len(owners) > at
    assert shown["run"]["status"] == "converged"  # type: ignore[index]
    forked = [e for e in shown["events"] if e["kind"] == "forked"]  # type: ignore[index]
    assert forked[0]["data"]["reason"] == "try again" and forked[0]["data"]["at"] == at
    kinds = [e["kind"] for e in shown["events"]]  # type: ignore[index]
    assert "run_started" in kinds and "run_resumed" not in kinds  # a branch starts; it does not resume
    # The parent's own rows are untouched: still exactly its three iterations.
    parent_rows = cli_json(capsys, "show", parent, "--json", "--db", str(db))["iterations"]  # type: ignore[index]
    assert [it["run_id"] for it in parent_rows] == [parent] * 3


def test_branch_workspace_is_rebuilt_from_the_journal(codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    db, parent = codefix_db
    assert main(["fork", parent, "--at", "2", "--headless", "--db", str(db)]) == 0
    branch = next(r for r in run_ids(capsys, db) if r["parent_run"] == parent)
    shown = cli_json(capsys, "show", branch["id"], "--iteration", "3", "--json", "--db", str(db))
    gates = [(g["name"], g["passed"]) for g in shown["gate_results"]]  # type: ignore[index]
    assert gates == [("compile", True), ("tests", True)]
    assert (Path(branch["workspace"]) / "solution.py").exists()


def test_fork_of_a_fork_shows_the_whole_lineage(codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    db, root = codefix_db
    assert main(["fork", root, "--at", "2", "--headless", "--db", str(db)]) == 0
    child = next(r for r in run_ids(capsys, db) if r["parent_run"] == root)["id"]
    assert main(["fork", child, "--at", "1", "--headless", "--db", str(db)]) == 0
    runs = run_ids(capsys, db)
    grandchild = next(r for r in runs if r["parent_run"] == child)
    assert grandchild["depth"] == 2
    assert [r["id"] for r in runs] == [root, child, grandchild["id"]]  # depth-first tree order
    shown = cli_json(capsys, "show", grandchild["id"], "--json", "--db", str(db))
    assert shown["lineage"] == [root, child, grandchild["id"]]  # type: ignore[index]
    assert shown["iterations"][0]["run_id"] == root  # type: ignore[index]
    capsys.readouterr()
    assert main(["runs", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    assert f"└ {child} @2" in table and f"└ {grandchild['id']} @1" in table


@pytest.mark.parametrize(
    ("patch", "expect"),
    [
        ("iteration=\"lots\"", "iteration"),
        ("memory.facts=3", "memory.facts"),
        ("nosuchfield=1", "nosuchfield"),
        ("memory.subgoal=not json", "not JSON"),
        ("memory.facts.99=\"x\"", "past the end"),
    ],
)
def test_invalid_patch_is_refused_and_creates_nothing(
    codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str], patch: str, expect: str
) -> None:
    db, parent = codefix_db
    events_before = cli_json(capsys, "show", parent, "--json", "--db", str(db))["events"]  # type: ignore[index]
    capsys.readouterr()
    assert main(["fork", parent, "--at", "2", "--set", patch, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err, err
    assert len(run_ids(capsys, db)) == 1
    assert cli_json(capsys, "show", parent, "--json", "--db", str(db))["events"] == events_before  # type: ignore[index]


def test_valid_patch_and_relaxed_invariant_reach_the_branch(codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    db, parent = codefix_db
    capsys.readouterr()
    code = main(["fork", parent, "--at", "1", "--set", 'memory.subgoal="advice from a person"',
                 "--relax", "solution_only", "--reason", "the reviewer allows it", "--headless", "--db", str(db)])
    assert code == 0, capsys.readouterr()
    branch = next(r for r in run_ids(capsys, db) if r["parent_run"] == parent)
    shown = cli_json(capsys, "show", branch["id"], "--json", "--db", str(db))
    first_own = next(it for it in shown["iterations"] if it["run_id"] == branch["id"])  # type: ignore[index]
    prompt = first_own["prompt"][-1]["content"]
    assert "advice from a person" in prompt
    assert "relaxed by a person: the reviewer allows it" in prompt
    kinds = [e["kind"] for e in shown["events"]]  # type: ignore[index]
    assert "forked" in kinds and "invariant_relaxed" in kinds


def test_unknown_invariant_and_out_of_range_iteration(codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    db, parent = codefix_db
    capsys.readouterr()
    assert main(["fork", parent, "--at", "9", "--db", str(db)]) == 2
    assert "iterations 1..3" in capsys.readouterr().err
    assert main(["fork", parent, "--at", "1", "--relax", "nope", "--db", str(db)]) == 2
    assert "no invariant 'nope'" in capsys.readouterr().err
    assert len(run_ids(capsys, db)) == 1


SIDE_EFFECT_LOOP = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool

LOG = Path(__file__).parent / "sent.log"

@tool(side_effects=True, idempotent=False{policy})
def send(ctx: ToolContext, to: str) -> str:
    """Send an email (a real side effect: appends to sent.log)."""
    with open(LOG, "a") as f:
        f.write(f"{{ctx.run_id}} {{ctx.iteration}} {{to}}\\n")
    return f"sent to {{to}}"

loop = Loop(
    name="mailer",
    goal="send three emails",
    state=LoopState,
    tools=[send],
    script=Path(__file__).parent / "script.json",
    max_iterations=5,
    converged=lambda state, gates: state.iteration >= 3,
)
'''


def mailer(tmp_path: Path, policy: str | None) -> Path:
    path = tmp_path / "mailer.py"
    path.write_text(SIDE_EFFECT_LOOP.format(policy=f', on_rewind="{policy}"' if policy else ""))
    turns = [{"content": {"action": {"tool": "send", "args": {"to": f"user{i}@example.com"}}, "subgoal": f"email {i}",
                          "confidence": 0.9, "reasoning": "next"}} for i in range(1, 6)]
    (tmp_path / "script.json").write_text(json.dumps({"price": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
                                                      "turns": turns}))
    return path


def sent(tmp_path: Path) -> list[str]:
    return (tmp_path / "sent.log").read_text().splitlines()


@pytest.mark.parametrize(("policy", "fired_again"), [("reuse", False), ("reexecute", True)])
def test_side_effect_policy_on_a_branch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, policy: str, fired_again: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "s.db"
    assert main(["run", str(mailer(tmp_path, policy)), "--headless", "--db", str(db)]) == 0
    parent = run_ids(capsys, db)[0]["id"]
    assert len(sent(tmp_path)) == 3
    assert main(["fork", parent, "--at", "1", "--headless", "--db", str(db)]) == 0
    branch = next(r for r in run_ids(capsys, db) if r["parent_run"] == parent)
    assert branch["status"] == "converged"
    emails = [line.split()[2] for line in sent(tmp_path)]
    if fired_again:
        assert emails == ["user1@example.com", "user2@example.com", "user3@example.com", "user2@example.com", "user3@example.com"]
    else:
        assert len(emails) == 3  # iterations 2 and 3 were answered from the parent's recorded results
        rows = cli_json(capsys, "show", branch["id"], "--json", "--db", str(db))["iterations"]  # type: ignore[index]
        own = [it for it in rows if it["run_id"] == branch["id"]]
        assert all(it["tool_result"]["reused"] for it in own)


def test_ask_policy_waits_for_a_person_then_obeys(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "s.db"
    assert main(["run", str(mailer(tmp_path, None)), "--headless", "--db", str(db)]) == 0
    parent = run_ids(capsys, db)[0]["id"]

    capsys.readouterr()
    assert main(["fork", parent, "--at", "1", "--dry-run", "--db", str(db)]) == 0
    dry = capsys.readouterr().out
    assert "iteration 2" in dry and "iteration 3" in dry and "policy ask" in dry
    assert len(run_ids(capsys, db)) == 1  # a dry run creates nothing

    assert main(["fork", parent, "--at", "1", "--headless", "--db", str(db)]) == 4  # waiting on a person
    branch = next(r for r in run_ids(capsys, db) if r["parent_run"] == parent)
    assert branch["status"] == "escalated" and "already called" in branch["message"]
    assert len(sent(tmp_path)) == 3  # nothing re-fired silently

    assert main(["resume", branch["id"], "--side-effects", "reuse", "--db", str(db)]) == 4  # iteration 3 asks again
    assert len(sent(tmp_path)) == 3
    assert main(["resume", branch["id"], "--side-effects", "reexecute", "--db", str(db)]) == 0
    assert [line.split()[2] for line in sent(tmp_path)][-1] == "user3@example.com" and len(sent(tmp_path)) == 4


def test_export_then_import_round_trips_a_branch_with_its_lineage(
    codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db, parent = codefix_db
    assert main(["fork", parent, "--at", "2", "--headless", "--db", str(db)]) == 0
    branch = next(r for r in run_ids(capsys, db) if r["parent_run"] == parent)["id"]
    first = tmp_path / "branch.jsonl"
    assert main(["export", branch, "-o", str(first), "--db", str(db)]) == 0
    lines = first.read_text().splitlines()
    kinds = [json.loads(line)["type"] for line in lines]
    assert kinds[0] == "loopterm-export" and kinds.count("run") == 2  # the whole lineage

    other = tmp_path / "other.db"
    assert main(["import", str(first), "--db", str(other)]) == 0
    again = tmp_path / "again.jsonl"
    assert main(["export", branch, "-o", str(again), "--db", str(other)]) == 0
    assert again.read_text() == first.read_text()  # exactly

    capsys.readouterr()
    assert main(["import", str(first), "--db", str(other)]) == 2  # the runs are there already
    assert "already" in capsys.readouterr().err
    assert [r["id"] for r in run_ids(capsys, other)] == [parent, branch]


def test_fork_options_say_what_held_at_the_fork_point_and_what_may_be_reached_again(
    codefix_db: tuple[Path, str],
) -> None:
    """What the TUI's branch dialog offers: each invariant with whether it held there, the parent's model, and the
    side-effecting calls after the fork point with their tools' rewind policy."""
    from loopterm.core.fork import fork_options
    from loopterm.core.loader import load_loop
    from loopterm.store import Store

    db, parent = codefix_db
    store = Store.open(db, create=False)
    run = store.get_run(parent)
    loop, _ = load_loop(run.loop_ref)
    options = fork_options(store, loop, run, 1)
    assert options.model == run.model == "scripted/codefix"
    assert [(i.name, i.held) for i in options.invariants] == [
        ("solution_only", True), ("bounded_context", True), ("tools_keep_working", True)]
    assert options.failed == []
    assert [(c.n, c.tool, c.policy) for c in options.may_repeat] == [(2, "write_file", "reexecute"),
                                                                      (3, "write_file", "reexecute")]
    assert fork_options(store, loop, run, 3).may_repeat == []


def test_the_fold_says_what_was_patched_and_relaxed_at_the_fork(
    codefix_db: tuple[Path, str], capsys: pytest.CaptureFixture[str],
) -> None:
    from loopterm.core.fold import fold
    from loopterm.store import Store

    db, parent = codefix_db
    assert main(["fork", parent, "--at", "1", "--set", 'memory.subgoal="advice"', "--set", "max_facts=3",
                 "--relax", "solution_only", "--reason", "a reviewer said so", "--headless", "--db", str(db)]) == 0
    branch = next(r for r in run_ids(capsys, db) if r["parent_run"] == parent)["id"]
    store = Store.open(db, create=False)
    point = fold(store.events(branch)).fork_point
    assert point is not None and (point.parent, point.at, point.reason) == (parent, 1, "a reviewer said so")
    assert point.patches == (("memory.subgoal", "advice"), ("max_facts", 3))
    assert point.relaxed == {"solution_only": "a reviewer said so"}
    assert point.state is not None and point.state["memory"]["subgoal"] == "advice" and point.state["max_facts"] == 3
    assert fold(store.events(parent)).fork_point is None  # the parent is no branch


def test_a_branch_is_created_whole_or_not_at_all(codefix_db: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The branch's run, its Forked and relaxed-invariant events and the parent's Branched are one transaction:
    a failure while writing the last leaves no run without the events that say what it is."""
    from loopterm.core.fork import create_fork, plan_fork
    from loopterm.core.loader import load_loop
    from loopterm.core.runlog import Branched
    from loopterm.store import Store

    db, parent = codefix_db
    loop, _ = load_loop("codefix")
    store = Store.open(db, create=False)
    try:
        plan = plan_fork(store, loop, store.get_run(parent), 1, relax=["solution_only"], reason="try")
        insert_event = Store._insert_event

        def failing(self: Store, run_id: str, event: Any, iteration: int | None) -> Any:
            if isinstance(event, Branched):
                raise OSError("disk full")
            return insert_event(self, run_id, event, iteration)

        monkeypatch.setattr(Store, "_insert_event", failing)
        with pytest.raises(OSError):
            create_fork(store, loop, plan, run_id="b0000000000a", workspace=Path("ws") / "b")
        assert [r.id for r in store.list_runs()] == [parent]
        monkeypatch.setattr(Store, "_insert_event", insert_event)
        branch = create_fork(store, loop, plan, run_id="b0000000000a", workspace=Path("ws") / "b")
        kinds = [type(e.event).__name__ for e in store.events(branch.id)]
        assert kinds == ["Forked", "InvariantRelaxed"]
        assert [e.event.child for e in store.events(parent) if isinstance(e.event, Branched)] == [branch.id]
    finally:
        store.close()
