"""Parallel runs of a cases file: one worktree per run, cleaned up after convergence, kept otherwise.

Offline (scripted models) and in-process. The codefix gates start pytest; the dev environment's
pytest plugins (textual snapshots, hypothesis...) cost ~2 s of CPU per start on this machine, so
the gates here run with plugin autoloading off (the gate's own command line is unchanged).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, TypeVar

import pytest

import loopterm.examples.codefix as codefix_pkg
from loopterm.core.batch import CaseFinished, CaseStarted, run_cases
from loopterm.core.cases import Case, CaseSet
from loopterm.core.worktree import git_env
from loopterm.store import Store
from loopterm.tui.cli import main
from loopterm.core import runlog as log
from loopterm.core import tool
from loopterm.core.runlog import RunEvent
from tests.loopkit import decision, make_loop, of, write

CODEFIX = Path(codefix_pkg.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def written(script: Path) -> str:
    """The last content a codefix case script writes to solution.py."""
    turns = json.loads(script.read_text())["turns"]
    last = turns[-1][-1] if isinstance(turns[-1], list) else turns[-1]
    return last["content"]["action"]["args"]["content"]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


E = TypeVar("E", bound=RunEvent)


def events(store: Store, run_id: str, event_type: type[E]) -> list[E]:
    return of(store.events(run_id), event_type)


def worktree_list(repo: Path) -> list[Path]:
    out = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=repo, env=git_env(), capture_output=True,
                         text=True, check=True).stdout
    return [Path(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("worktree ")]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals in flight at one moment."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def test_eight_parallel_codefix_cases_converge_in_their_own_worktrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "store" / "loopterm.db"
    db.parent.mkdir()
    code = main(["run", "codefix", "--cases", str(CODEFIX / "cases8.json"), "--parallel", "8", "--db", str(db)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "8 of 8 converged; 8 of 8 met their expectation" in out
    assert "kept worktree" not in out

    cases = json.loads((CODEFIX / "cases8.json").read_text())
    expected = {c["id"]: sha(written(CODEFIX / c["script"])) for c in cases}
    assert len(set(expected.values())) == 8  # each case writes its own slugify: cross-talk would show

    store = Store.open(db, create=False)
    runs = store.list_runs()
    assert len(runs) == 8 and {r.status for r in runs} == {"converged"}
    intervals, bases = [], set()
    for run in runs:
        (case,) = events(store, run.id, log.CaseStarted)
        (removed,) = events(store, run.id, log.WorktreeRemoved)
        files = {f["path"]: f["sha256"] for f in removed.files}
        assert files["solution.py"] == expected[case.id], case.id  # its own content, nobody else's
        assert all(p == "solution.py" or p.startswith("__pycache__/") for p in files), files  # py_compile's .pyc
        assert removed.path == run.workspace and not Path(run.workspace).exists()
        bases.add(removed.base)
        when = {type(e.event): e.ts for e in store.events(run.id)}
        intervals.append((when[log.RunStarted], when[log.RunFinished]))
    assert {c.id for r in runs for c in events(store, r.id, log.CaseStarted)} == set(expected)
    store.close()

    (base,) = bases
    assert worktree_list(Path(base)) == [Path(base)]  # only the base repository is left
    assert list((tmp_path / "store" / "workspaces").iterdir()) == []
    # Concurrency is real: the runs were in flight at the same time, not one after another.
    assert max_overlap(intervals) >= 4, intervals


def test_a_case_that_misses_its_expectation_keeps_its_worktree_and_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([
        {"id": "good", "script": str(CODEFIX / "cases" / "split.json")},
        {"id": "stuck", "script": str(CODEFIX / "cases" / "stall.json"), "max_iterations": 4},  # expects convergence
    ]))
    db = tmp_path / "loopterm.db"
    code = main(["run", "codefix", "--cases", str(cases), "--parallel", "2", "--db", str(db)])
    out = capsys.readouterr().out
    assert code == 3, out
    assert "1 of 2 converged; 1 of 2 met their expectation" in out
    store = Store.open(db, create=False)
    by_case = {events(store, r.id, log.CaseStarted)[0].id: r for r in store.list_runs()}
    stuck, good = by_case["stuck"], by_case["good"]
    assert stuck.status == "terminated" and stuck.termination_reason == "stalled"
    (kept,) = events(store, stuck.id, log.WorktreeKept)
    assert kept.path == stuck.workspace and Path(stuck.workspace).is_dir()
    assert (Path(stuck.workspace) / "solution.py").read_text() == written(CODEFIX / "cases" / "stall.json")
    assert stuck.workspace in out.replace("\n", "")  # listed at the end of the output
    assert not Path(good.workspace).exists()
    assert worktree_list(Path(kept.base)) == [Path(kept.base), Path(stuck.workspace)]
    store.close()


def test_mixed_codefix_cases_converge_stall_and_escalate_as_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "loopterm.db"
    code = main(["run", "codefix", "--cases", str(CODEFIX / "cases.json"), "--parallel", "5", "--db", str(db)])
    out = capsys.readouterr().out
    assert code == 0, out  # every case met its expectation, including the stall and the escalation
    store = Store.open(db, create=False)
    by_case = {events(store, r.id, log.CaseStarted)[0].id: r for r in store.list_runs()}
    assert {k: (r.status, r.termination_reason) for k, r in by_case.items()} == {
        "regex": ("converged", "converged"),
        "findall": ("converged", "converged"),
        "fix-syntax": ("converged", "converged"),
        "stall": ("terminated", "stalled"),
        "escalate": ("escalated", "waiting_on_person"),
    }
    goal = next(c["goal"] for c in json.loads((CODEFIX / "cases.json").read_text()) if c["id"] == "fix-syntax")
    fixed = by_case["fix-syntax"]
    assert fixed.iterations == 2 and fixed.goal == goal  # the case's goal replaced the loop's
    assert store.iterations(fixed.id)[0].state["task"] == goal
    assert by_case["regex"].goal != goal
    assert by_case["fix-syntax"].model == "scripted/codefix.case.fix-syntax"
    escalated = events(store, by_case["escalate"].id, log.Escalated)
    assert escalated and escalated[0].failing_invariants[0]["name"] == "solution_only"
    flat = out.replace("\n", "")
    for kept in ("stall", "escalate"):
        assert by_case[kept].workspace in flat and Path(by_case[kept].workspace).is_dir()
        (data,) = events(store, by_case[kept].id, log.WorktreeKept)
        if kept == "escalate":  # the write the invariant caught is in the kept worktree, for a person to see
            assert [f["path"] for f in data.files] == ["test_solution.py"]
    store.close()


def test_run_cases_isolates_a_case_that_raises_and_reports_events(tmp_path: Path) -> None:
    """A case whose run raises fails alone; the store keeps more run heads for a wide batch."""
    import loopterm.store.db as store_db

    def observe(state: Any, *_: Any) -> Any:
        if "boom" in state.task:
            raise RuntimeError("observe blew up")
        return state

    # writes flag.txt in its workspace: a workspace_only side effect, so each case gets a worktree
    ws_write = tool(side_effects=True, idempotent=True, workspace_only=True, name="write")(write.fn)
    loop = make_loop(tmp_path, [{"content": decision("write", text="ok")}], observe=observe, tools=[ws_write])
    cases = CaseSet(path=tmp_path / "cases.json", cases=[
        Case(id="fine"), Case(id="boom", goal="make flag.txt say ok, boom"), Case(id="fine2", expect="converged"),
    ])
    store = Store.open(tmp_path / "db" / "loopterm.db")
    seen: list[tuple[str, str]] = []
    results = asyncio.run(run_cases(
        loop, store, cases, parallel=12, workspace_root=tmp_path / "db" / "workspaces", loop_ref="test:t",
        on_event=lambda case_id, event: seen.append((case_id, type(event).__name__)),
    ))
    assert store.heads_kept >= 12 and store_db.HEADS_KEPT == 8  # this store's, not every store's
    by_id = {r.case_id: r for r in results}
    assert [r.case_id for r in results] == ["fine", "boom", "fine2"]  # the cases' order
    assert by_id["fine"].status == by_id["fine2"].status == "converged" and by_id["fine"].expect_met
    boom = by_id["boom"]
    assert boom.status == "failed" and not boom.expect_met and "observe blew up" in (boom.message or "")
    assert store.get_run(boom.run_id or "").status == "failed"  # not left "running"
    assert boom.worktree is not None and Path(boom.worktree).is_dir()  # kept, for a person to look at
    assert by_id["fine"].worktree is None
    for case_id in ("fine", "boom", "fine2"):
        kinds = [kind for cid, kind in seen if cid == case_id]
        assert kinds[0] == CaseStarted.__name__ and kinds[-1] == CaseFinished.__name__
        assert "IterationCommitted" in kinds or case_id == "boom"
    store.close()


def test_a_loop_without_side_effects_gets_plain_workspaces(tmp_path: Path) -> None:
    from loopterm.core import tool

    @tool
    def note(text: str) -> str:
        """Say something."""
        return text

    loop = make_loop(tmp_path, [{"content": decision("note", text="hi")}], tools=[note], gates=[], max_iterations=1)
    store = Store.open(tmp_path / "loopterm.db")
    results = asyncio.run(run_cases(loop, store, [Case(id="a", expect="terminated")], parallel=2,
                                    workspace_root=tmp_path / "ws", loop_ref="test:t"))
    assert results[0].status == "terminated" and results[0].expect_met and results[0].worktree is None
    assert not (tmp_path / "repos").exists()
    assert not events(store, results[0].run_id or "", log.WorktreeAdded)
    store.close()


def test_parallel_without_cases_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "loopterm.db"
    assert main(["run", "codefix", "--parallel", "4", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--parallel needs --cases" in err
    assert not db.exists()


def test_missing_git_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    db = tmp_path / "loopterm.db"
    assert main(["run", "codefix", "--cases", str(CODEFIX / "cases8.json"), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "git is not installed" in err, err
    assert not db.exists()


def test_the_base_repository_needs_no_git_config_and_is_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No identity anywhere (HOME empty, GIT_* cleared by git_env): the base commit still works, once per content."""
    from loopterm.core.worktree import Worktrees

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "not-a-repo"))  # a caller's GIT_* must not leak in
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.txt").write_text("a")
    loop = make_loop(tmp_path, [{"content": decision("write", text="ok")}], workspace_files=files)

    async def twice() -> tuple[Any, Any]:
        trees = Worktrees(tmp_path / "repos")
        return await asyncio.gather(trees.base(loop), trees.base(loop))

    first, second = asyncio.run(twice())
    assert first == second and len(list((tmp_path / "repos").iterdir())) == 1
    (files / "a.txt").write_text("b")  # new content, new base
    third = asyncio.run(Worktrees(tmp_path / "repos").base(loop))
    assert third.path != first.path and len(list((tmp_path / "repos").iterdir())) == 2


def test_a_batch_must_fit_the_daily_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As for one run: the cases' USD budgets together must fit what is left today, or nothing starts."""
    monkeypatch.setenv("LOOPTERM_DAILY_BUDGET_USD", "0.1")  # codefix's cases cap at $0.05 each: 8 need $0.40
    db = tmp_path / "loopterm.db"
    assert main(["run", "codefix", "--cases", str(CODEFIX / "cases8.json"), "--parallel", "8", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would exceed the daily budget" in err, err
    assert not db.exists()


def test_uncapped_cases_share_what_is_left_of_the_daily_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from loopterm.tui.eval_cli import _within_daily_budget

    monkeypatch.setenv("LOOPTERM_DAILY_BUDGET_USD", "1")
    loop = make_loop(tmp_path, [{"content": decision("write", text="ok")}])  # no USD budget of its own
    cases = CaseSet(path=tmp_path / "c.json", cases=[Case(id="a"), Case(id="b", budget_usd=0.4), Case(id="c")])
    shared = _within_daily_budget(tmp_path / "none.db", loop, cases, None, lower=None)
    assert [c.budget_usd for c in shared] == [pytest.approx(0.3), 0.4, pytest.approx(0.3)]
    assert "each gets an equal share" in capsys.readouterr().err


# A code-changing loop whose setup prepares what its gate needs: expected.txt, and repo/, a nested git
# repository with one commit. Its tool writes flag.txt and edits a file inside repo/.
SETUP_LOOP = '''
import os
import subprocess
from pathlib import Path

from loopterm.core import CommandGate, Loop, LoopState, ToolContext, tool

HERE = Path(__file__).parent


def git(repo, *args):
    env = {{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}}
    env.update({{"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
                "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}})
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def setup(workspace: Path) -> None:
    (workspace / "expected.txt").write_text("ok")
    repo = workspace / "{repo}"
    repo.mkdir(exist_ok=True)
    git(repo, "init", "-q")
    (repo / "README.md").write_text("sample")
    git(repo, "add", "README.md")
    git(repo, "commit", "-q", "-m", "initial")


@tool(side_effects=True, idempotent=True, workspace_only=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write flag.txt, and a note in the sample repository."""
    (ctx.workspace / "flag.txt").write_text(text)
    (ctx.workspace / "{repo}" / "notes.txt").write_text(text)
    return "written"


GATE = CommandGate(name="flag", argv=["{{python}}", "-c", (
    "import pathlib, subprocess, sys; "
    "subprocess.run(['git', '-C', '{repo}', 'rev-parse', 'HEAD'], check=True, capture_output=True); "
    "sys.exit(pathlib.Path('flag.txt').read_text() != pathlib.Path('expected.txt').read_text())")])

loop = Loop(name="setupcase", goal="make flag.txt say what expected.txt says", state=LoopState, tools=[write],
            gates=[GATE], workspace_files=HERE / "files", setup=setup, script=HERE / "script.json", max_iterations=3)
'''


def setup_loop(tmp_path: Path, repo: str = "repo") -> Path:
    """The loop file above, with its workspace files, script and a two-case cases file beside it."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "base.txt").write_text("from workspace_files")
    (tmp_path / "script.json").write_text(json.dumps({"turns": [{"content": decision("write", text="ok")}],
                                                      "after_end": "repeat_last"}))
    (tmp_path / "cases.json").write_text(json.dumps([{"id": "one"}, {"id": "two"}]))
    path = tmp_path / "setupcase.py"
    path.write_text(SETUP_LOOP.format(repo=repo))
    return path


@pytest.mark.parametrize("command", [["eval"], ["run", "--parallel", "2"]])
def test_setup_prepares_every_case_worktree_and_its_output_is_not_a_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """As under `loopterm run`: workspace_files, then setup (a file and a nested git repository), in each case's
    worktree; the changes recorded are the run's own (flag.txt, repo/notes.txt), none of setup's."""
    loop_file = setup_loop(tmp_path)
    db = tmp_path / "loopterm.db"
    code = main([command[0], str(loop_file), "--cases", str(tmp_path / "cases.json"), *command[1:], "--db", str(db)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    store = Store.open(db, create=False)
    runs = store.list_runs()
    assert len(runs) == 2 and {r.status for r in runs} == {"converged"}, out
    for run in runs:
        (removed,) = events(store, run.id, log.WorktreeRemoved)
        assert removed.files == [
            {"path": "flag.txt", "change": "added", "sha256": sha("ok")},
            {"path": "repo/notes.txt", "change": "added", "sha256": sha("ok")},
        ]
        assert not Path(run.workspace).exists()
    store.close()


def test_worktree_changes_are_counted_from_the_prepared_workspace(tmp_path: Path) -> None:
    """Against the baseline taken after setup: edits to, and deletions of, setup's files count as such."""
    from loopterm.core.worktree import Worktrees

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "base.txt").write_text("base")

    def setup(workspace: Path) -> None:
        (workspace / "made.txt").write_text("setup")
        (workspace / "gone.txt").write_text("setup")
        (workspace / "base.txt").write_text("changed by setup")

    loop = make_loop(tmp_path, [], workspace_files=tmp_path / "files", setup=setup)

    async def go() -> list[dict[str, Any]]:
        trees = Worktrees(tmp_path / "repos")
        base = await trees.base(loop)
        path = await trees.add(base, tmp_path / "ws" / "case")
        baseline = await trees.prepare(loop, base, path)
        assert await trees.changes(path, baseline) == []
        (path / "made.txt").write_text("run")
        (path / "gone.txt").unlink()
        (path / "new.sh").write_text("run")
        (path / "new.sh").chmod(0o755)
        return await trees.changes(path, baseline)

    assert asyncio.run(go()) == [
        {"path": "gone.txt", "change": "deleted", "sha256": None},
        {"path": "made.txt", "change": "modified", "sha256": sha("run")},
        {"path": "new.sh", "change": "added", "sha256": sha("run")},
    ]


def test_a_setup_that_commits_to_the_worktree_itself_is_refused_in_one_line(tmp_path: Path) -> None:
    """A sample repository at the workspace root would be the case's worktree, whose commits land in the shared
    base repository: that case fails with one line saying to use a subfolder; the base is untouched."""
    loop_file = setup_loop(tmp_path, repo=".")
    from loopterm.core.loader import load_loop

    loop, _ = load_loop(str(loop_file))
    store = Store.open(tmp_path / "db" / "loopterm.db")
    (result,) = asyncio.run(run_cases(loop, store, [Case(id="root")], parallel=1,
                                      workspace_root=tmp_path / "db" / "workspaces", loop_ref="test:setupcase"))
    assert result.status == "failed" and result.run_id is None
    assert result.message is not None and "\n" not in result.message
    assert "committed to the workspace's own git repository" in result.message and "subfolder" in result.message
    (base,) = (tmp_path / "db" / "repos").iterdir()
    count = subprocess.run(["git", "rev-list", "--count", "main"], cwd=base, env=git_env(), capture_output=True,
                           text=True, check=True).stdout
    assert count.strip() == "1"  # the base still holds only its own commit
    store.close()
