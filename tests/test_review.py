"""The built-in `review` loop: a git change reviewed file by file, offline, on a sample repository with a planted bug."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.tools import ToolContext
from loopterm.core.topology import PLAN_INVARIANTS
from loopterm.examples.review import loop as review
from loopterm.examples.review.loop import ChangedFile, FileFinding, ReviewState
from loopterm.examples.review.sample import BUGGY_FILE, BUGGY_LINE, build_sample, buggy_line_number
from loopterm.examples.review.tools import MAX_COMMENTS, Comment, decide, file_diff, prepare
from loopterm.store import Store
from loopterm.tui.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "review"
FILES = ["ledger/paging.py", "ledger/amounts.py", "README.md"]
REVIEW_VARS = ("LOOPTERM_REVIEW_REPO", "LOOPTERM_REVIEW_BASE", "LOOPTERM_REVIEW_HEAD")


@pytest.fixture(autouse=True)
def _no_review_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in REVIEW_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def _run(db: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    db.parent.mkdir(parents=True, exist_ok=True)  # a --db in a folder that does not exist is refused
    code = main(["run", "review", "--headless", "--db", str(db), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _root(store: Store) -> Any:
    return next(r for d, r in store.tree() if d == 0)


def _tree_digest(root: Path) -> str:
    """Every file's path and bytes under root (.git included): any write to the repository changes it."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- end to end


def test_review_blocks_the_planted_bug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db" / "l.db"
    code, out, _ = _run(db, capsys)
    assert code == 0, out
    assert "decide(approve)" in out and "decide(block)" in out and "converged" in out
    store = Store.open(db, create=False)
    root = _root(store)
    assert root.loop == "review" and root.status == "converged" and root.iterations == 6
    iterations = store.iterations(root.id)
    assert [i.decision["action"]["tool"] for i in iterations] == [
        "changed_files", "plan", "execute", "execute", "decide", "decide"]
    state = ReviewState.model_validate(iterations[-1].state)
    assert state.verdict == "block" and state.remaining == [] and sorted(state.executed) == sorted(FILES)
    assert state.remaining_history == [1, 0]  # two batches: 2 files, then 1
    line = buggy_line_number()
    assert any(c.path == BUGGY_FILE and c.line == line and c.severity == "critical" for c in state.comments)
    assert [(f.path, f.line) for f in state.findings if f.severity == "critical"] == [(BUGGY_FILE, line)]
    # the first decision (approve) broke critical_blocks; the custom remediation took it back and said why
    fifth = iterations[4]
    assert fifth.invariant_status["critical_blocks"] is False and fifth.remediations == ["custom"]
    assert fifth.state["verdict"] is None and any("taken back" in f for f in fifth.state["memory"]["facts"])
    assert all(iterations[5].invariant_status.values())
    # the analyzers are child runs of the review, one per file, and the first two ran at the same time
    kids = store.children(root.id)
    assert len(kids) == 3 and {k.origin for k in kids} == {"child"} and {k.parent_run for k in kids} == {root.id}
    assert {k.loop for k in kids} == {"review-file"} and {k.status for k in kids} == {"converged"}
    by_file = {next(f for f in FILES if f"change to {f} " in k.goal): k for k in kids}
    assert state.child_runs == {f: by_file[f].id for f in FILES}
    spans = {f: (store.iterations(k.id)[0].started_at, store.iterations(k.id)[-1].ended_at) for f, k in by_file.items()}
    (a0, a1), (b0, b1) = spans["ledger/paging.py"], spans["ledger/amounts.py"]
    assert max(a0, b0) < min(a1, b1), "the analyzers of one execute step did not overlap"
    assert spans["README.md"][0] >= min(a1, b1)  # the second batch came after the first
    # the analyzer prompt is its own profile, and it was shown head line numbers
    child_prompt = store.iterations(by_file[BUGGY_FILE].id)[1].prompt
    assert child_prompt[0]["content"] != iterations[0].prompt[0]["content"]
    assert f"{line:>5} + |{BUGGY_LINE}" in child_prompt[1]["content"]
    # REVIEW.md and review.json, next to the reviewed repository
    workspace = Path(root.workspace)
    text = (workspace / "REVIEW.md").read_text()
    assert text.startswith("# Review: block") and f"`{BUGGY_FILE}:{line}`" in text
    document = json.loads((workspace / "review.json").read_text())
    assert document["verdict"] == "block" and document["iteration"] == 6
    assert {(c["path"], c["line"]) for c in document["comments"]} >= {(BUGGY_FILE, line)}
    assert (workspace / "repo" / ".git").is_dir()


def test_a_replay_of_a_review_is_identical_and_starts_no_analyzer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db" / "l.db"
    assert _run(db, capsys)[0] == 0
    store = Store.open(db, create=False)
    root = _root(store)
    assert main(["replay", root.id, "--db", str(db)]) == 0  # a fresh workspace: repo/ is rebuilt, same commits
    assert "identical" in capsys.readouterr().out
    replay = next(r for r in store.list_runs() if r.origin == "replay")
    assert store.children(replay.id) == []  # the recorded analyzer runs were reused, not driven again
    assert (Path(replay.workspace) / "REVIEW.md").read_text().startswith("# Review: block")


def test_a_clean_change_in_a_persons_repository_is_approved_and_the_repository_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = build_sample(tmp_path / "mine", "clean")
    before = _tree_digest(mine)
    monkeypatch.setenv("LOOPTERM_REVIEW_REPO", str(mine))
    db = tmp_path / "db" / "l.db"
    code, out, _ = _run(db, capsys)
    assert code == 0, out
    store = Store.open(db, create=False)
    root = _root(store)
    assert root.status == "converged" and root.iterations == 5  # no critical finding: the approval stands
    state = ReviewState.model_validate(store.iterations(root.id)[-1].state)
    assert state.verdict == "approve" and not any(f.severity == "critical" for f in state.findings)
    assert state.source == str(mine.resolve()) and state.base_ref == "HEAD~1" and state.head_ref == "HEAD"
    assert json.loads((Path(root.workspace) / "review.json").read_text())["verdict"] == "approve"
    assert _tree_digest(mine) == before  # reviewed through a clone: nothing in the person's repository changed


def test_the_analyzer_runs_on_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "l.db"
    assert main(["run", "review-file", "--headless", "--db", str(db)]) == 0
    capsys.readouterr()
    store = Store.open(db, create=False)
    run = _root(store)
    findings = store.iterations(run.id)[-1].state["findings"]
    assert [(f["line"], f["severity"]) for f in findings] == [(buggy_line_number(), "critical")]


def test_the_cases_file_converges_stalls_and_escalates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("loopterm.core.batch")
    code = main(["eval", "review", "--cases", str(EXAMPLES / "cases.json"), "--db", str(tmp_path / "l.db"),
                 "--parallel", "3", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    ended = {c["id"]: c["status"] for c in report["cases"]}
    assert ended == {"planted-bug": "converged", "stall": "terminated", "escalate": "escalated"}
    assert report["totals"]["expectations_met"] == 3


# ---------------------------------------------------------------------------- what is reviewed


@pytest.mark.parametrize("env, names", [
    ({"LOOPTERM_REVIEW_BASE": "no-such-branch"}, "LOOPTERM_REVIEW_BASE='no-such-branch' is not a commit"),
    ({"LOOPTERM_REVIEW_HEAD": "HEAD~7"}, "LOOPTERM_REVIEW_HEAD='HEAD~7' is not a commit"),
    ({"LOOPTERM_REVIEW_BASE": "--output=/tmp/x"}, "is not a usable git revision"),
    ({"LOOPTERM_REVIEW_BASE": "HEAD", "LOOPTERM_REVIEW_HEAD": "main"}, "are the same commit"),
    ({"LOOPTERM_REVIEW_REPO": "{tmp}/nowhere"}, "is not a directory"),
    ({"LOOPTERM_REVIEW_REPO": "{tmp}/plain"}, "is not a git repository"),
    ({"LOOPTERM_REVIEW_REPO": "", "LOOPTERM_REVIEW_BASE": "HEAD~1"}, "LOOPTERM_REVIEW_REPO is not"),
])
def test_a_bad_repository_or_ref_is_one_line_and_exit_2(
    env: dict[str, str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "plain").mkdir()
    monkeypatch.setenv("LOOPTERM_REVIEW_REPO", str(build_sample(tmp_path / "mine")))
    for var, value in env.items():
        monkeypatch.setenv(var, value.replace("{tmp}", str(tmp_path)))
    db = tmp_path / "db" / "l.db"
    code, _, err = _run(db, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and names in lines[0], err
    assert not db.exists() or Store.open(db).list_runs() == []  # no run was created
    workspaces = tmp_path / "db" / "workspaces"
    assert not workspaces.exists() or list(workspaces.iterdir()) == []  # and no workspace left behind


def test_the_sample_is_the_same_everywhere_and_prepared_once(tmp_path: Path) -> None:
    a, b = build_sample(tmp_path / "a"), build_sample(tmp_path / "b")
    assert _tree_digest(a / ".git" / "refs") == _tree_digest(b / ".git" / "refs")  # the same commit ids
    workspace = tmp_path / "ws"
    workspace.mkdir()
    targets: list[Any] = []
    threads = [threading.Thread(target=lambda: targets.append(prepare(workspace))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(targets)) == 1 and sorted(p.name for p in workspace.iterdir()) == ["repo"]
    assert targets[0].source == "sample" and targets[0].head_ref == "HEAD"


# ---------------------------------------------------------------------------- tools


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    prepare(workspace)
    return ToolContext(run_id="r", iteration=1, workspace=workspace)


@pytest.mark.parametrize("path", [
    "", "   ", "../outside.py", "ledger/../../outside.py", "/etc/passwd", "\\\\server\\share\\x", "C:\\Windows\\x.py",
    "a\x00b", "ledger/\x1b[2Jpaging.py", ".git/config", "escape/etc/passwd",
])
def test_file_diff_refuses_paths_outside_the_repository(ctx: ToolContext, path: str) -> None:
    (ctx.workspace / "repo" / "escape").symlink_to("/")
    with pytest.raises(ValueError):
        file_diff.fn(ctx, path)


def test_file_diff_shows_one_changed_file_with_head_line_numbers(ctx: ToolContext) -> None:
    text = file_diff.fn(ctx, "./ledger/paging.py")
    assert text.startswith("ledger/paging.py: +12 -3") and f"{buggy_line_number():>5} + |{BUGGY_LINE}" in text
    assert "amounts" not in text
    with pytest.raises(ValueError, match="not changed"):
        file_diff.fn(ctx, "ledger/__init__.py")
    with pytest.raises(ValueError, match="not changed"):  # a pathspec is literal: '*' is no glob over the repository
        file_diff.fn(ctx, "*")


def test_decide_writes_untrusted_comments_as_inert_text(ctx: ToolContext) -> None:
    hostile = "fine\x1b]0;pwned\x07\n# Review: approve\n<script>x</script>"
    comments = [{"path": BUGGY_FILE, "line": 24, "severity": "critical", "body": hostile}]
    out = decide.fn(ctx, "block", "Summary\x1b[31m red", comments)
    assert "block" in out and "1 critical" in out
    text = (ctx.workspace / "REVIEW.md").read_text()
    assert "\x1b" not in text and "\x07" not in text
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# Review: block", "## Summary", "## Comments (1: 1 critical, 0 major, 0 minor)"]
    assert "  > # Review: approve" in text  # quoted, never a heading
    assert json.loads((ctx.workspace / "review.json").read_text())["comments"][0]["body"].startswith("fine]0;pwned")
    with pytest.raises(ValueError, match="does not touch"):
        decide.fn(ctx, "approve", "ok", [{"path": "ledger/__init__.py", "line": 1, "severity": "minor", "body": "x"}])
    with pytest.raises(ValueError):
        decide.validate_args({"verdict": "merge", "summary": "", "comments": []})


# ---------------------------------------------------------------------------- invariants on states


def _state(**update: Any) -> ReviewState:
    base: dict[str, Any] = {
        "changed": [ChangedFile(path=p, added=1, removed=0) for p in FILES],
        "plan": list(FILES), "remaining": [], "executed": list(FILES), "remaining_history": [1, 0],
        "results": {p: {"status": "converged", "result": []} for p in FILES},
    }
    base.update(update)
    return ReviewState(**base)


CRITICAL = FileFinding(path=BUGGY_FILE, line=24, severity="critical", message="off-by-one")


def _holds(state: ReviewState) -> dict[str, bool]:
    return {inv.name: inv.holds(state) for inv in [*PLAN_INVARIANTS, *review.INVARIANTS]}


def _only_broken(state: ReviewState) -> list[str]:
    return [name for name, ok in _holds(state).items() if not ok]


def test_a_finished_review_keeps_every_invariant() -> None:
    assert _only_broken(_state(verdict="block", findings=[CRITICAL])) == []
    assert _only_broken(_state(verdict="approve")) == []
    assert review.converged(_state(verdict="approve"), []) and not review.converged(_state(), [])


def test_the_plan_covers_exactly_the_changed_files() -> None:
    fresh = {"executed": [], "remaining_history": [], "results": {}}
    missing = _state(plan=FILES[:2], remaining=FILES[:2], **fresh)
    extra = _state(plan=[*FILES, "setup.py"], remaining=[*FILES, "setup.py"], **fresh)
    unlisted = _state(changed=None, plan=list(FILES), remaining=list(FILES), **fresh)
    for state in (missing, extra, unlisted):
        assert _only_broken(state) == ["plan_covers_changes"]
    fixed = review.replan(missing)
    assert fixed.plan == [] and fixed.remaining == [] and "missing: README.md" in fixed.memory.facts[-1]
    assert "call changed_files" in review.replan(unlisted).memory.facts[-1]
    # once files were analyzed, re-planning would hand them out again: the plan stays, a person is asked
    late = _state(plan=FILES[:2], remaining=[FILES[1]], executed=[FILES[0]], remaining_history=[1])
    kept = review.replan(late)
    assert kept.plan == FILES[:2] and "a person must fix the plan" in kept.memory.facts[-1]


def test_the_remaining_files_strictly_decrease_and_none_is_analyzed_twice() -> None:
    stuck = _state(remaining=[FILES[2]], executed=FILES[:2], remaining_history=[1, 1])
    assert "remaining_decrease" in _only_broken(stuck)
    twice = _state(executed=[*FILES, FILES[1]], remaining_history=[1, 0, 0])
    assert "no_item_twice" in _only_broken(twice)


def test_a_verdict_comes_after_every_file_was_analyzed() -> None:
    early = _state(remaining=[FILES[2]], executed=FILES[:2], remaining_history=[1], verdict="approve", decided_at=4)
    assert _only_broken(early) == ["verdict_after_analysis"]
    inv = next(i for i in review.INVARIANTS if i.name == "verdict_after_analysis")
    redone = inv.custom(early)  # type: ignore[misc]
    assert redone.verdict is None and "files remain: README.md" in redone.memory.facts[-1]
    assert not review.converged(early, [])


def test_a_critical_finding_blocks_approval() -> None:
    comment = Comment(path=BUGGY_FILE, line=24, severity="minor", body="nit")
    for verdict in ("approve", "request_changes"):
        state = _state(findings=[CRITICAL], verdict=verdict, comments=[comment], decided_at=5)
        assert _only_broken(state) == ["critical_blocks"]
    inv = next(i for i in review.INVARIANTS if i.name == "critical_blocks")
    redone = inv.custom(_state(findings=[CRITICAL], verdict="approve", comments=[comment], decided_at=5))  # type: ignore[misc]
    assert redone.verdict is None and redone.comments == [] and redone.decided_at is None
    assert f"{BUGGY_FILE}:24" in redone.memory.facts[-1] and "verdict block" in redone.memory.facts[-1]
    assert _only_broken(redone) == []


def test_approval_needs_every_analyzer_to_finish() -> None:
    results = {**{p: {"status": "converged", "result": []} for p in FILES},
               "README.md": {"status": "terminated", "result": None}}
    folded = ReviewState(**{**_state().model_dump(), "results": results})
    folded = folded.model_copy(update=review._fold_results(folded))
    assert folded.unfinished == ["README.md"]
    assert _only_broken(folded.model_copy(update={"verdict": "approve"})) == ["approve_needs_every_analysis"]
    assert _only_broken(folded.model_copy(update={"verdict": "request_changes"})) == []


def test_at_most_50_comments() -> None:
    many = [Comment(path=FILES[0], line=n, severity="minor", body=f"nit {n}") for n in range(1, MAX_COMMENTS + 2)]
    assert _only_broken(_state(verdict="request_changes", comments=many[:MAX_COMMENTS])) == []
    too_many = _state(verdict="request_changes", comments=many, decided_at=5)
    assert _only_broken(too_many) == ["at_most_50_comments"]
    inv = next(i for i in review.INVARIANTS if i.name == "at_most_50_comments")
    redone = inv.custom(too_many)  # type: ignore[misc]
    assert redone.comments == [] and "51 comments" in redone.memory.facts[-1]
