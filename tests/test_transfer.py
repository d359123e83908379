"""Export and import (store/transfer.py): a round trip is exact, and an import refuses, whole and with one
line, a file it cannot trust: a gap in a run's iterations, a deleted, added, altered or moved line, a cut
file, a line of a run the file does not define. Refused, the database is left exactly as it was."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.errors import ConfigError
from loopterm.core.records import IterationRecord, RunRecord, ToolCallRecord
from loopterm.store import Store
from loopterm.store.transfer import EXPORT_VERSION, export_run, import_lines, seal
from loopterm.tui.cli import main

Lines = list[str]


def make_run(run_id: str, **over: Any) -> RunRecord:
    fields: dict[str, Any] = dict(
        id=run_id, loop="transfer", loop_ref="no-such-loop", goal="carry a run across", spec_hash="h1",
        model="scripted/transfer", status="converged", workspace="/tmp/ws", created_at=1_700_000_000.0,
        updated_at=1_700_000_000.0, max_iterations=10,
    )
    fields.update(over)
    return RunRecord(**fields)


def make_iteration(run_id: str, n: int) -> IterationRecord:
    return IterationRecord(
        run_id=run_id, n=n, started_at=1_700_000_000.0 + n, ended_at=1_700_000_000.5 + n,
        prompt=[{"role": "system", "content": "be terse"}, {"role": "user", "content": f"step {n} ü"}],
        raw_response='{"action": {"tool": "send", "args": {}}}', decision={"subgoal": f"step {n}", "confidence": 0.5},
        state={"step": n, "owner": run_id, "log": [f"{run_id}:{i}" for i in range(1, n + 1)]},
    )


def add_event(store: Store, run_id: str, kind: str, data: dict[str, Any], iteration: int | None) -> None:
    """An event in the form the store keeps it (whatever typed model reads it back)."""
    with store._write():
        store._conn.execute("INSERT INTO events (run_id, iteration, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
                            [run_id, iteration, 1_700_000_100.0, kind, json.dumps(data)])


def build(store: Store) -> None:
    """root: iterations 1..5; branch: a fork of root at 2 with its own 3..5; each with events and a tool call."""
    store.create_run(make_run("root"))
    for n in range(1, 6):
        store.commit_iteration(make_iteration("root", n), {"iterations": n})
    store.create_run(make_run("branch", parent_run="root", fork_iteration=2, origin="fork", iterations=2))
    for n in range(3, 6):
        store.commit_iteration(make_iteration("branch", n), {"iterations": n})
    for run_id in ("root", "branch"):
        add_event(store, run_id, "note", {"why": f"first {run_id}"}, 1)
        add_event(store, run_id, "note", {"why": f"second {run_id}"}, 3)
        key = f"k-{run_id}"
        store.tool_call_started(ToolCallRecord(key=key, run_id=run_id, iteration=3, tool="send", args={"to": run_id},
                                               status="started", started_at=1.0))
        store.tool_call_finished(key, {"ok": True}, 2.0)


def dumped(items: Iterator[dict[str, Any]]) -> Lines:
    """JSON lines as `loopterm export` writes them."""
    return [json.dumps(item, ensure_ascii=False, sort_keys=True) for item in items]


def rows(store: Store) -> dict[str, int]:
    """Every table's row count."""
    if store.backend == "postgresql":
        from loopterm.store.pg_schema import PG_TABLES

        tables = list(PG_TABLES)
    else:
        tables = [row[0] for row in store._query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {table: store._query(f"SELECT count(*) FROM [{table}]")[0][0] for table in tables}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "source.db") as store:
        build(store)
        yield store


@pytest.fixture
def exported(source: Store) -> Lines:
    return dumped(export_run(source, "branch"))


@pytest.fixture
def target(store_target: str | Path) -> Iterator[Store]:
    """A database that already holds a run of its own, so "unchanged" means something: a SQLite file, then a
    PostgreSQL database (so every export from SQLite is imported into both)."""
    with Store.open(store_target) as store:
        store.create_run(make_run("local"))
        store.commit_iteration(make_iteration("local", 1), {"iterations": 1})
        add_event(store, "local", "note", {"why": "mine"}, 1)
        yield store


def where(lines: Lines, kind: str, run_id: str | None = None, n: int | None = None) -> int:
    """The index of the first line of this type (of this run, and iteration n)."""
    for i, line in enumerate(lines):
        item = json.loads(line)
        if item["type"] == kind and (run_id is None or run_id in (item.get("run_id"), item.get("id"))) \
                and (n is None or item.get("n") == n):
            return i
    raise AssertionError(f"no {kind} line of {run_id} {n}")


def refused(target: Store, lines: Lines, message: str) -> str:
    """The import is refused with one line matching `message`, and the database has not changed."""
    before, runs = rows(target), target.list_runs()
    with pytest.raises(ConfigError, match=message) as info:
        import_lines(target, lines)
    text = str(info.value)
    assert "\n" not in text and text.endswith("; nothing was imported"), text
    assert rows(target) == before and target.list_runs() == runs
    assert target.iterations("local") == [make_iteration("local", 1)]
    return text


# -- the round trip ----------------------------------------------------------------------------


def test_round_trip_of_a_run_with_a_fork(source: Store, exported: Lines, target: Store) -> None:
    items = [json.loads(line) for line in exported]
    assert items[0] == {"type": "loopterm-export", "version": EXPORT_VERSION} and EXPORT_VERSION == 2
    assert [i["type"] for i in items] == (
        ["loopterm-export", "run"] + ["iteration"] * 5 + ["event"] * 2 + ["tool_call", "run_end"]
        + ["run"] + ["iteration"] * 3 + ["event"] * 2 + ["tool_call", "run_end", "export_end"])
    ends = [i for i in items if i["type"] == "run_end"]
    assert [(e["run_id"], e["first"], e["iterations"], e["lines"]) for e in ends] == [("root", 1, 5, 9), ("branch", 3, 3, 7)]
    assert all(len(e["sha256"]) == 64 for e in ends)
    assert {k: v for k, v in items[-1].items() if k != "sha256"} == {"type": "export_end", "runs": 2, "lines": 19}

    assert import_lines(target, exported) == ["root", "branch"]
    assert dumped(export_run(target, "branch")) == exported  # exactly
    for run_id in ("root", "branch"):
        assert target.get_run(run_id) == source.get_run(run_id)
        assert target.iterations(run_id) == source.iterations(run_id)
        assert target.events(run_id) != [] and len(target.events(run_id)) == len(source.events(run_id))
        assert target.tool_call(f"k-{run_id}") == source.tool_call(f"k-{run_id}")
    assert [r.n for r in target.iterations("branch")] == [1, 2, 3, 4, 5]
    assert [r.run_id for r in target.iterations("branch")] == ["root", "root", "branch", "branch", "branch"]
    assert target.state_at("branch", 2) == source.state_at("root", 2)
    assert target.tree() == [(0, target.get_run("local")), (0, target.get_run("root")), (1, target.get_run("branch"))]


def test_the_digests_ignore_layout_but_not_values(exported: Lines, target: Store) -> None:
    """Keys in another order, other spacing, ASCII escapes: the same lines, so the same digests."""
    relaid = [json.dumps(json.loads(line), indent=None, separators=(", ", ": ")) for line in reversed(exported)][::-1]
    assert relaid != exported
    assert import_lines(target, ["", *relaid, "  "]) == ["root", "branch"]  # blank lines are not lines


def test_a_run_still_going_exports_as_a_consistent_snapshot(source: Store, target: Store) -> None:
    """An iteration committed after its run line was read is left out, rather than contradict the run record."""
    stream = export_run(source, "root")
    head = [next(stream), next(stream)]  # the header and root's run line: it says 5 iterations
    source.commit_iteration(make_iteration("root", 6), {"iterations": 6})
    lines = dumped(iter(head + list(stream)))
    assert [item["n"] for item in map(json.loads, lines) if item["type"] == "iteration"] == [1, 2, 3, 4, 5]
    assert import_lines(target, lines) == ["root"] and target.get_run("root").iterations == 5


# -- what the import refuses ------------------------------------------------------------------


def drop(i: Callable[[Lines], int]) -> Callable[[Lines], Lines]:
    return lambda ls: ls[: i(ls)] + ls[i(ls) + 1:]


@pytest.mark.parametrize("mangle, message", [
    pytest.param(drop(lambda ls: where(ls, "iteration", "root", 2)),
                 r"^line 4: run root: iteration 2 is missing \(the file has 1, then 3\); nothing was imported$",
                 id="root-iteration-2"),
    pytest.param(drop(lambda ls: where(ls, "iteration", "branch", 3)),
                 r"^line 13: run branch: iteration 3 is missing \(the file starts at 4\)", id="branch-first-own"),
    pytest.param(drop(lambda ls: where(ls, "iteration", "branch", 5)),
                 r"^line 18: run branch: iteration 5 is missing \(its run record says 5, the file stops at 4\)",
                 id="branch-last"),
    pytest.param(drop(lambda ls: where(ls, "event", "root")),
                 r"^line 10: run root has 8 lines \(lines 2-9\) but its run_end line says 9: a line was deleted or added",
                 id="an-event"),
    pytest.param(drop(lambda ls: where(ls, "run_end", "root")),
                 r"^line 11: run branch starts before the run_end line of run root \(from line 2\): a line is missing",
                 id="a-run_end"),
])
def test_a_deleted_line_is_refused(exported: Lines, target: Store, mangle: Any, message: str) -> None:
    refused(target, mangle(exported), message)


def test_an_added_line_is_refused(exported: Lines, target: Store) -> None:
    again = where(exported, "iteration", "root", 3)
    refused(target, exported[: again + 1] + [exported[again]] + exported[again + 1:],
            r"^line 6: run root: iteration 3 again, after iteration 3 \(repeated or out of order\)")
    event = where(exported, "event", "branch")
    refused(target, exported[: event + 1] + [exported[event]] + exported[event + 1:],
            r"^line 20: run branch has 8 lines \(lines 12-19\) but its run_end line says 7")
    refused(target, exported + [exported[where(exported, "event", "root")]],
            r"^line 21: a line after the export's last line \(export_end\)")


def altered(lines: Lines, index: int, change: Callable[[dict[str, Any]], None]) -> Lines:
    item = json.loads(lines[index])
    change(item)
    return [*lines[:index], json.dumps(item, ensure_ascii=False, sort_keys=True), *lines[index + 1:]]


def test_an_altered_line_is_refused(exported: Lines, target: Store) -> None:
    def state(item: dict[str, Any]) -> None:
        item["state"]["log"][0] = "someone else's"

    refused(target, altered(exported, where(exported, "iteration", "root", 3), state),
            r"^line 11: run root: its lines 2-10 do not match the sha256 on its run_end line: a line was altered or moved")
    refused(target, altered(exported, where(exported, "event", "branch"), lambda i: i["data"].update(why="edited")),
            r"^line 19: run branch: its lines 12-18 do not match the sha256")
    refused(target, altered(exported, where(exported, "run", "branch"), lambda i: i.update(cost_usd=0.0001)),
            r"^line 19: run branch: its lines 12-18 do not match the sha256")
    # an edit with its run_end made to agree: the export_end still disagrees
    forged = altered(exported, where(exported, "event", "root"), lambda i: i.update(ts=0.0))
    forged = dumped(seal(json.loads(line) for line in forged))[:-1] + exported[-1:]  # new run_end lines, old export_end
    refused(target, forged, r"^line 20: the lines before export_end do not match its sha256")


def test_an_iteration_count_edited_to_hide_a_gap_is_refused(exported: Lines, target: Store) -> None:
    """Delete the last iteration and lower the run's count to match: continuity passes, the digest does not."""
    lines = drop(lambda ls: where(ls, "iteration", "root", 5))(exported)
    lines = altered(lines, where(lines, "run", "root"), lambda i: i.update(iterations=4))
    refused(target, lines, r"^line 10: run root: its run_end line says 5 iteration\(s\) from 1; the file has 4 from 1")


def swapped(lines: Lines, i: int, j: int) -> Lines:
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def test_a_reordered_pair_of_lines_is_refused(exported: Lines, target: Store) -> None:
    two = where(exported, "iteration", "root", 2)
    refused(target, swapped(exported, two, two + 1),
            r"^line 4: run root: iteration 2 is missing \(the file has 1, then 3\)")
    event = where(exported, "event", "root")
    refused(target, swapped(exported, event, event + 1),
            r"^line 11: run root: its lines 2-10 do not match the sha256 on its run_end line: a line was altered or moved")
    refused(target, swapped(exported, event - 1, event),  # the last iteration after an event
            r"^line 11: run root: its lines 2-10 do not match the sha256")
    start = where(exported, "run", "branch")
    branch_first = exported[:1] + exported[start:-1] + exported[1:start] + exported[-1:]  # whole runs swapped
    refused(target, branch_first, r"^line 2: run branch: its parent run root is neither earlier in this file nor in "
                                  rf"{re.escape(target.location)}; export the run again")


@pytest.mark.parametrize("keep, message", [
    pytest.param(lambda ls: ls[:-1], r"^the file ends after line 19 without its export_end line: it was cut short",
                 id="no-export_end"),
    pytest.param(lambda ls: ls[: where(ls, "run", "branch")],
                 r"^the file ends after line 11 without its export_end line", id="after-a-whole-run"),
    pytest.param(lambda ls: ls[: where(ls, "iteration", "branch", 4)],
                 r"^the file ends after line 13 inside run branch, before its run_end line: it was cut short",
                 id="inside-a-run"),
    pytest.param(lambda ls: [*ls[:5], ls[5][: len(ls[5]) // 2]], r"^line 6: not JSON", id="mid-line"),
    pytest.param(lambda ls: ls[:1], r"^the file ends after line 1 without its export_end line", id="header-only"),
])
def test_a_truncated_file_is_refused(exported: Lines, target: Store, keep: Any, message: str) -> None:
    refused(target, keep(exported), message)


def test_a_line_of_a_run_not_defined_is_refused(exported: Lines, target: Store) -> None:
    ghost = altered(exported, where(exported, "iteration", "branch", 4), lambda i: i.update(run_id="ghost"))
    refused(target, ghost, r"^line 14: iteration of run 'ghost', which no earlier line of this file defines")
    tool = where(exported, "tool_call", "branch")
    early = [*exported[:2], exported[tool], *exported[2:tool], *exported[tool + 1:]]  # before its run's line
    refused(target, early, r"^line 3: tool_call of run 'branch', which no earlier line of this file defines")
    root_line = exported[where(exported, "iteration", "root", 4)]
    misplaced = [*exported[:-2], root_line, *exported[-2:]]  # root's iteration among the branch's lines
    refused(target, misplaced, r"^line 19: iteration of run root outside that run's lines")
    root_event = exported[where(exported, "event", "root")]
    refused(target, dumped(seal(json.loads(line) for line in [*exported[:-2], root_event])),
            r"^line 19: event of run root outside that run's lines")  # sealed again: only the placement is wrong


def test_a_branch_whose_parent_is_nowhere_is_refused_and_one_already_here_is_accepted(
        source: Store, exported: Lines, tmp_path: Path, target: Store) -> None:
    branch_only = dumped(seal(json.loads(line) for line in exported[where(exported, "run", "branch"):]))
    refused(target, branch_only, r"^line 2: run branch: its parent run root is neither earlier in this file nor in "
                                 rf"{re.escape(target.location)}; export the run again \(an export carries its lineage\)")
    with Store.open(tmp_path / "has-root.db") as other:
        assert import_lines(other, dumped(export_run(source, "root"))) == ["root"]
        assert import_lines(other, branch_only) == ["branch"]
        assert other.iterations("branch") == source.iterations("branch")
    deeper = altered(branch_only, 1, lambda i: i.update(fork_iteration=7, iterations=7))
    with Store.open(tmp_path / "short-root.db") as other:
        import_lines(other, dumped(export_run(source, "root")))
        with pytest.raises(ConfigError, match=r"^line 2: run branch branches from iteration 7 of run root, "
                                              r"which has 5; nothing was imported$"):
            import_lines(other, dumped(seal(json.loads(line) for line in deeper)))


def test_a_version_1_export_is_read_with_the_continuity_checks(exported: Lines, target: Store, tmp_path: Path) -> None:
    """An export written before the digests: no run_end or export_end lines; it still imports, and a gap is refused."""
    old = ['{"type": "loopterm-export", "version": 1}'] + [
        line for line in exported[1:] if json.loads(line)["type"] not in ("run_end", "export_end")]
    refused(target, drop(lambda ls: where(ls, "iteration", "root", 3))(old),
            r"^line 5: run root: iteration 3 is missing \(the file has 2, then 4\)")
    refused(target, drop(lambda ls: where(ls, "iteration", "branch", 5))(old),
            r"^the file ends after line 16: run branch: iteration 5 is missing \(its run record says 5, the file stops at 4\)")
    refused(target, drop(lambda ls: where(ls, "iteration", "root", 5))(old),
            r"^line 10: run root: iteration 5 is missing")  # found at the next run's line
    refused(target, [*old[:3], '{"type": "run_end", "run_id": "root"}', *old[3:]],
            r"^line 4: unknown record type 'run_end' \(expected run, iteration, event, tool_call\)")
    assert import_lines(target, old) == ["root", "branch"]
    assert dumped(export_run(target, "branch")) == exported  # written again as version 2, nothing lost


def test_events_are_carried_as_stored(exported: Lines, target: Store) -> None:
    """An event line is the stored kind and data, whatever they mean; a key the store would drop is refused."""
    events = [json.loads(line) for line in exported if json.loads(line)["type"] == "event"]
    assert {tuple(sorted(e)) for e in events} == {("data", "iteration", "kind", "run_id", "ts", "type")}
    extra = altered(exported, where(exported, "event", "root"), lambda i: i.update(colour="red"))
    refused(target, dumped(seal(json.loads(line) for line in extra)), r"^line 8: invalid event record at colour: Extra inputs")


# -- the command line -------------------------------------------------------------------------


def test_cli_import_of_a_gapped_export_is_one_line_and_changes_nothing(
        source: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source.close()
    db, out = tmp_path / "source.db", tmp_path / "branch.jsonl"
    assert main(["export", "branch", "-o", str(out), "--db", str(db)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    gapped = tmp_path / "gapped.jsonl"
    gapped.write_text("\n".join(drop(lambda ls: where(ls, "iteration", "root", 2))(lines)) + "\n", encoding="utf-8")
    other = tmp_path / "other.db"
    with Store.open(other) as store:
        store.create_run(make_run("local"))
    before = sqlite3.connect(other).execute("SELECT count(*) FROM runs").fetchone()
    capsys.readouterr()
    assert main(["import", str(gapped), "--db", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 4: run root: iteration 2 is missing (the file has 1, then 3); nothing was imported" in err
    with Store.open(other) as store:
        assert [r.id for r in store.list_runs()] == ["local"] and store._query("SELECT count(*) FROM iterations")[0][0] == 0
    assert sqlite3.connect(other).execute("SELECT count(*) FROM runs").fetchone() == before

    assert main(["import", str(out), "--db", str(other)]) == 0
    capsys.readouterr()
    assert main(["show", "branch", "--iteration", "2", "--json", "--db", str(other)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["n"], shown["run_id"], shown["state"]["step"]) == (2, "root", 2)
    again = tmp_path / "again.jsonl"
    assert main(["export", "branch", "-o", str(again), "--db", str(other)]) == 0
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


def test_cli_a_codefix_branch_round_trips_and_forks_after_import(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported failure: a gapped export used to import, then `fork --at 2 --dry-run` ended in KeyError."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "s.db"
    assert main(["run", "codefix", "--headless", "--db", str(db)]) == 0
    with Store.open(db, create=False) as store:
        parent = store.list_runs()[0].id
    assert main(["fork", parent, "--at", "2", "--headless", "--db", str(db)]) == 0
    with Store.open(db, create=False) as store:
        branch = next(r.id for r in store.list_runs() if r.parent_run == parent)
    out = tmp_path / "branch.jsonl"
    assert main(["export", branch, "-o", str(out), "--db", str(db)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()

    gapped = tmp_path / "gapped.jsonl"
    gapped.write_text("\n".join(drop(lambda ls: where(ls, "iteration", parent, 2))(lines)) + "\n", encoding="utf-8")
    other = tmp_path / "other.db"
    capsys.readouterr()
    assert main(["import", str(gapped), "--db", str(other)]) == 2
    assert f"run {parent}: iteration 2 is missing" in capsys.readouterr().err
    assert main(["runs", "--json", "--db", str(other)]) == 0 and json.loads(capsys.readouterr().out) == []

    assert main(["import", str(out), "--db", str(other)]) == 0
    capsys.readouterr()
    assert main(["fork", parent, "--at", "2", "--dry-run", "--db", str(other)]) == 0
    assert "is valid; nothing was created" in " ".join(capsys.readouterr().out.split())  # the console may wrap


def test_a_row_the_database_refuses_is_one_line_and_imports_nothing(exported: Lines, target: Store) -> None:
    """A tool call whose key the target already holds (keys are global): the database's own refusal, on
    either backend, becomes the same one-line refusal as the file checks."""
    target.tool_call_started(ToolCallRecord(key="k-root", run_id="local", iteration=1, tool="send", args={},
                                            status="started", started_at=1.0))
    text = refused(target, exported, r"^line \d+: .*k-root.*; nothing was imported$" if target.backend == "postgresql"
                   else r"^line \d+: UNIQUE constraint failed: tool_calls\.key; nothing was imported$")
    assert "Traceback" not in text
