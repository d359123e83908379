"""Comparing two runs (core/compare.py) and `loopterm diff`: alignment at the fork point, the first
divergence, the state diff at an aligned iteration, totals and outcomes, --json, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import runlog
from loopterm.core.compare import Comparison, StateDiff, compare, state_diff
from loopterm.core.errors import ConfigError
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.store import Store
from loopterm.tui.cli import main

T0 = 1_767_225_600.0

# The family every test compares: a parent of 6 iterations; b1 branches it at 3 (patched), b2 at 2; g branches
# b1 at 4; s branches the parent at 3 and makes the parent's own 4th call, with another state; u is unrelated.
PARENT, B1, B2, G, S, U = "p0aaaaaaaaaa", "b1bbbbbbbbbb", "b2cccccccccc", "g0dddddddddd", "s0eeeeeeeeee", "u0ffffffffff"


def run_record(run_id: str, *, parent: str | None = None, at: int | None = None, status: str = "converged",
               reason: str | None = "converged", loop: str = "flagger") -> RunRecord:
    return RunRecord(id=run_id, loop=loop, loop_ref=f"tests:{loop}", goal="make flag.txt say ok", spec_hash="x",
                     model="scripted/t", status=status, workspace=f"/tmp/ws/{run_id}", created_at=T0, updated_at=T0,
                     parent_run=parent, fork_iteration=at, origin="fork" if parent else "run", max_iterations=10,
                     iterations=at or 0, termination_reason=reason)


def iteration(run_id: str, n: int, text: str, *, flag: bool = False, notes: str | None = None,
              tokens: int = 100, cost: float = 0.001, holds: bool = True) -> IterationRecord:
    call = {"tool": "write", "args": {"text": text}, "key": f"{run_id}-{n}"}
    return IterationRecord(
        run_id=run_id, n=n, started_at=T0 + n, ended_at=T0 + n + 0.5,
        prompt=[{"role": "user", "content": f"step {n}"}], raw_response="{}",
        decision={"action": {"tool": "write", "args": {"text": text}}, "subgoal": f"write {text}", "confidence": 0.5},
        tool_call=call, gate_results=[{"name": "flag", "passed": flag, "exit_code": 0 if flag else 1}],
        invariant_status={"short": holds}, tokens_in=tokens, tokens_out=tokens // 2, cost_usd=cost,
        model="scripted/t",
        state={"iteration": n, "notes": notes if notes is not None else text, "log": [f"w{i}" for i in range(1, n + 1)],
               "memory": {"facts": ["flag.txt exists"], "subgoal": f"write {text}"}},
    )


def commit(store: Store, record: IterationRecord) -> None:
    run = store.get_run(record.run_id)
    store.commit_iteration(record, {"iterations": record.n, "tokens_in": run.tokens_in + record.tokens_in,
                                    "tokens_out": run.tokens_out + record.tokens_out,
                                    "cost_usd": run.cost_usd + record.cost_usd})


def build_family(db: Path) -> None:
    """The runs of the module docstring, with their logs (a fork's Forked event, an escalation)."""
    store = Store.open(db)
    store.create_run(run_record(PARENT))
    for n in range(1, 7):
        commit(store, iteration(PARENT, n, f"p{n}", flag=n == 6))
    store.append_event(PARENT, runlog.RunFinished(status="converged", reason="converged"), 6)
    store.create_run(run_record(B1, parent=PARENT, at=3))
    store.append_event(B1, runlog.Forked(parent=PARENT, at=3, reason="try b", patches=[{"path": ["notes"], "value": "b"}],
                                         relaxed={"short": "long texts are fine here"}, patched_state={"notes": "b"}), 3)
    commit(store, iteration(B1, 4, "b4", tokens=300, cost=0.003))
    commit(store, iteration(B1, 5, "ok", flag=True, holds=False, tokens=300, cost=0.003))
    store.create_run(run_record(B2, parent=PARENT, at=2, status="escalated", reason=None))
    commit(store, iteration(B2, 3, "c3"))
    commit(store, iteration(B2, 4, "c4"))
    store.append_event(B2, runlog.Escalated(iteration=4, summary="needs a person"), 4)
    store.create_run(run_record(G, parent=B1, at=4))
    commit(store, iteration(G, 5, "g5"))
    store.create_run(run_record(S, parent=PARENT, at=3))
    commit(store, iteration(S, 4, "p4", notes="another note"))  # the parent's call, another state
    commit(store, iteration(S, 5, "p5"))
    commit(store, iteration(S, 6, "p6", flag=True))
    store.create_run(run_record(U, loop="other"))
    commit(store, iteration(U, 1, "u1"))
    store.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "loopterm.db"
    build_family(path)
    return path


@pytest.fixture
def store(db: Path) -> Any:
    s = Store.open(db)
    yield s
    s.close()


# ----------------------------------------------------------------------------- core


def test_a_branch_aligns_with_its_parent_at_the_fork_point(store: Store) -> None:
    c = compare(store, PARENT, B1)
    assert (c.common_ancestor, c.fork_point) == (PARENT, 3)
    assert [row.n for row in c.iterations] == [1, 2, 3, 4, 5, 6]
    assert [row.shared for row in c.iterations] == [True, True, True, False, False, False]
    for row in c.iterations[:3]:  # the branch's first iterations are its parent's: the very same ones
        assert row.a == row.b and row.a is not None and row.a.run_id == PARENT
    four = c.iterations[3]
    assert (four.a.run_id, four.b.run_id) == (PARENT, B1)  # type: ignore[union-attr]
    assert (four.a.action, four.b.action) == ('write(text="p4")', 'write(text="b4")')  # type: ignore[union-attr]
    assert four.differs == ["action"]
    five = c.iterations[4]
    assert five.differs == ["action", "gates", "invariants"]
    assert (five.b.gates, five.b.invariants) == ({"flag": True}, {"short": False})  # type: ignore[union-attr]
    assert c.iterations[5].b is None and c.iterations[5].a is not None  # the branch ended after 5
    assert c.divergence is not None and (c.divergence.n, c.divergence.kind) == (4, "action")
    assert "p4" in c.divergence.a and "b4" in c.divergence.b
    assert "descends from" in c.relation and "1..3" in c.relation


def test_totals_count_the_lineage_and_what_each_spent_after_the_fork(store: Store) -> None:
    c = compare(store, PARENT, B1)
    assert (c.a.total.iterations, c.a.total.tokens_in, c.a.total.tokens_out) == (6, 600, 300)
    assert c.a.total.cost_usd == pytest.approx(0.006)
    assert (c.b.total.iterations, c.b.total.tokens_in) == (5, 3 * 100 + 2 * 300)
    assert c.b.total.cost_usd == pytest.approx(0.003 + 0.006)
    assert (c.a.since_fork.iterations, c.b.since_fork.iterations) == (3, 2)
    assert c.b.since_fork.tokens == 2 * 450 and c.b.since_fork.cost_usd == pytest.approx(0.006)


def test_outcomes_and_fork_come_from_the_runs_logs(store: Store) -> None:
    c = compare(store, B1, B2)
    assert (c.a.status, c.a.termination_reason) == ("converged", "converged")
    assert c.a.fork is not None and c.a.fork.reason == "try b" and c.a.fork.relaxed == {"short": "long texts are fine here"}
    assert c.a.fork.patches == [{"path": ["notes"], "value": "b"}]
    assert c.b.status == "escalated" and c.b.waiting and "needs a person" in c.b.waiting[0]
    assert c.b.fork is None  # b2's log has no Forked event: nothing is made up from its row


def test_siblings_and_cousins_align_at_the_earliest_shared_iteration(store: Store) -> None:
    siblings = compare(store, B1, B2)
    assert (siblings.common_ancestor, siblings.fork_point) == (PARENT, 2)
    assert "both descend from" in siblings.relation
    assert siblings.divergence is not None and siblings.divergence.n == 3
    assert (compare(store, G, B2).fork_point, compare(store, G, PARENT).fork_point) == (2, 3)
    grandchild = compare(store, B1, G)
    assert (grandchild.common_ancestor, grandchild.fork_point) == (B1, 4)
    assert grandchild.iterations[3].shared and grandchild.iterations[3].a.run_id == B1  # type: ignore[union-attr]


def test_the_same_call_with_another_state_diverges_on_the_state(store: Store) -> None:
    c = compare(store, PARENT, S)
    assert c.divergence is not None
    assert (c.divergence.n, c.divergence.kind) == (4, "state") and "notes" in c.divergence.detail
    assert all(not row.differs for row in c.iterations)  # the same calls, gates and invariants throughout


def test_a_run_that_stops_early_diverges_on_length(store: Store) -> None:
    c = compare(store, G, B1)  # g went on to 5; b1 too, so they diverge on the action at 5
    assert c.divergence is not None and c.divergence.kind == "action"
    c = compare(store, B1, PARENT)
    assert c.divergence is not None and c.divergence.n == 4
    same_calls = compare(store, S, PARENT)
    assert same_calls.divergence is not None and same_calls.divergence.kind == "state"
    # a branch that has made no iteration of its own yet: the same up to the fork point, then the parent goes on
    with Store.open(store.path) as s:
        s.create_run(run_record("e0000000", parent=PARENT, at=5, status="created", reason=None))
    empty = compare(store, PARENT, "e0000000")
    assert empty.fork_point == 5 and empty.divergence is not None
    assert (empty.divergence.n, empty.divergence.kind) == (6, "length")
    assert "ended after iteration 5" in empty.divergence.b and "went on" in empty.divergence.a


def test_unrelated_runs_share_nothing(store: Store) -> None:
    c = compare(store, PARENT, U)
    assert (c.common_ancestor, c.fork_point) == (None, 0)
    assert c.relation.startswith("unrelated")
    assert not any(row.shared for row in c.iterations)
    assert c.divergence is not None and c.divergence.n == 1


def test_a_run_is_not_compared_with_itself(store: Store) -> None:
    with pytest.raises(ConfigError, match="two different runs"):
        compare(store, PARENT, PARENT)


def test_state_diff_at_an_aligned_iteration(store: Store) -> None:
    c = compare(store, PARENT, B1)
    shared = state_diff(store, c, 2)
    assert shared.same and (shared.a_n, shared.b_n) == (2, 2)
    four = state_diff(store, c, 4)
    assert not four.same and (four.a_n, four.b_n) == (4, 4)
    assert four.a["notes"] == "p4" and four.b["notes"] == "b4"
    assert "log" not in four.a and "iteration" not in four.a  # only what differs
    assert four.a["memory"]["subgoal"] == "write p4"
    six = state_diff(store, c, 6)  # the branch ended after 5: its last state stands for it
    assert (six.a_n, six.b_n) == (6, 5)
    assert six.b["log"] == [f"w{i}" for i in range(1, 6)]
    for n in (0, 7):
        with pytest.raises(ConfigError, match=r"have 1\.\.6"):
            state_diff(store, c, n)


def test_a_longer_list_on_one_side_shows_only_its_new_tail(store: Store) -> None:
    c = compare(store, B1, PARENT)  # b1 ended after 5; at 6 the parent's log has one item more
    six = state_diff(store, c, 6)
    assert six.b["log (appended after item 5)"] == ["w6"]


# ----------------------------------------------------------------------------- the command line


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_diff_prints_the_aligned_iterations_side_by_side(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "diff", PARENT[:4], B1[:4], "--db", str(db))  # ids by prefix
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("A  " + PARENT) for line in lines) and any(line.startswith("B  " + B1) for line in lines)
    assert "iterations 1..2: the same in both runs" in out  # the shared prefix is one line
    fork_row = next(line for line in lines if line.split()[:2] == ["3", "fork"])
    first = next(line for line in lines if line.split()[:3] == ["4", "▶", "≠"])
    assert "p4" in first and "b4" in first
    assert "p3" in fork_row and "=" in fork_row
    assert "first divergence at iteration 4 (action)" in out
    assert "✓ converged" in out and "after 3" in out


def test_diff_json_is_the_whole_comparison(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "diff", B1, B2, "--json", "--db", str(db))
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"a", "b", "common_ancestor", "fork_point", "relation", "iterations", "divergence"}
    assert set(data["iterations"][0]) == {"n", "shared", "a", "b", "differs"}
    assert set(data["iterations"][0]["a"]) == {"run_id", "tool", "args", "gates", "invariants", "tokens_in",
                                              "tokens_out", "cost_usd"}
    assert {"status", "termination_reason", "waiting", "fork", "total", "since_fork"} <= set(data["a"])
    assert data["fork_point"] == 2 and data["divergence"]["n"] == 3
    assert Comparison.model_validate(data) == compare(Store.open(db), B1, B2)


def test_diff_at_shows_the_state_diff(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "diff", PARENT, B1, "--at", "4", "--db", str(db))
    assert code == 0, err
    assert "state after aligned iteration 4" in out
    assert '-  "notes": "p4"' in out and '+  "notes": "b4"' in out
    code, out, err = cli(capsys, "diff", PARENT, B1, "--at", "4", "--json", "--db", str(db))
    diff = StateDiff.model_validate_json(out)
    assert (diff.n, diff.a["notes"], diff.b["notes"]) == (4, "p4", "b4")
    code, out, err = cli(capsys, "diff", PARENT, B1, "--at", "2", "--db", str(db))
    assert code == 0 and "the states are the same" in out


def test_untrusted_text_is_printed_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "x.db"
    with Store.open(db) as store:
        store.create_run(run_record(PARENT))
        commit(store, iteration(PARENT, 1, "[bold red]x[/] \x1b[31m"))
        store.create_run(run_record(U))
        commit(store, iteration(U, 1, "plain"))
    code, out, err = cli(capsys, "diff", PARENT, U, "--db", str(db))
    assert code == 0, err
    assert '[bold red]x[/] \\u001b[31m' in out and "\x1b" not in out  # markup shown as written, no escape sent


@pytest.mark.parametrize("argv, says", [
    (["diff", "nope", B1], "no run matches 'nope'"),
    (["diff", PARENT, PARENT], "two different runs"),
    (["diff", PARENT, B1, "--at", "7"], "--at 7: iteration 7 is not an aligned iteration of these runs; they have 1..6"),
    (["diff", "b", PARENT], "ambiguous"),
])
def test_bad_input_is_one_line_and_exit_2(db: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    code, out, err = cli(capsys, *argv, "--db", str(db))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and says in err and err.startswith("loopterm: ")


def test_diff_at_zero_is_a_usage_error(db: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["diff", PARENT, B1, "--at", "0", "--db", str(db)])
    assert exit_.value.code == 2


def test_diff_on_a_missing_database_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "diff", PARENT, B1, "--db", str(tmp_path / "none.db"))
    assert code == 2 and err.startswith("loopterm: ") and err.count("\n") == 1
    assert not (tmp_path / "none.db").exists()  # nothing created


def test_a_real_branch_with_a_patch(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in codefix loop, branched at 2 with a patched state: the diff aligns them at 2 and the branch
    carries its patch."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "real.db"
    assert main(["run", "codefix", "--headless", "--db", str(db)]) == 0
    parent = Store.open(db, create=False).list_runs()[0].id
    assert main(["fork", parent, "--at", "2", "--set", 'memory.facts=["from the branch"]', "--reason", "why not",
                 "--headless", "--db", str(db)]) == 0
    branch = Store.open(db, create=False).children(parent)[0].id
    code, out, err = cli(capsys, "diff", parent, branch, "--json", "--db", str(db))
    assert code == 0, err
    c = Comparison.model_validate_json(out)
    assert (c.common_ancestor, c.fork_point) == (parent, 2)
    assert [row.shared for row in c.iterations[:2]] == [True, True] and not c.iterations[2].shared
    assert c.b.fork is not None and c.b.fork.reason == "why not" and c.b.fork.patches
    assert c.divergence is not None and c.divergence.n == 3
    code, out, err = cli(capsys, "diff", parent, branch, "--at", "3", "--json", "--db", str(db))
    diff = StateDiff.model_validate_json(out)
    assert "from the branch" in json.dumps(diff.b)
