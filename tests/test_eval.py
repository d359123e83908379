"""`loopterm eval`: figures checked against the store's own rows, exit codes, and bad cases files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import loopterm.examples.codefix as codefix_pkg
from loopterm.core.cases import load_cases
from loopterm.core.errors import ConfigError
from loopterm.core.evaluation import percentile
from loopterm.core import runlog
from loopterm.store import Store
from tests.loopkit import of
from loopterm.tui.cli import main

CODEFIX = Path(codefix_pkg.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # see test_batch.py
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def test_eval_json_matches_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "loopterm.db"
    code = main(["eval", "codefix", "--cases", str(CODEFIX / "cases.json"), "--parallel", "5", "--json",
                 "--db", str(db)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)  # nothing but the JSON on stdout
    assert list(report) == ["version", "loop", "cases_file", "db", "model", "parallel", "wall_s", "min_convergence",
                            "passed", "totals", "cases"]
    assert report["loop"] == "codefix" and report["parallel"] == 5 and report["passed"] is True
    assert report["db"] == str(db.resolve())

    store = Store.open(db, create=False)
    assert store.memories("codefix") == []  # an eval measures; it leaves long-term memory as it was
    rows = {row["id"]: row for row in report["cases"]}
    assert list(rows) == ["regex", "findall", "fix-syntax", "stall", "escalate"]  # the file's order
    all_latencies: list[float] = []
    violations = iterations = 0
    for case_id, row in rows.items():
        run = store.get_run(row["run_id"])
        its = store.iterations(run.id)
        assert [e.id for e in of(store.events(run.id), runlog.CaseStarted)] == [case_id]
        assert row["status"] == run.status and row["termination_reason"] == run.termination_reason
        assert row["converged"] == (run.status == "converged")
        assert row["iterations"] == run.iterations == len(its)
        assert row["iterations_to_convergence"] == (run.iterations if run.status == "converged" else None)
        assert row["tokens_in"] == run.tokens_in and row["tokens_out"] == run.tokens_out
        assert row["tokens"] == run.tokens_in + run.tokens_out
        assert row["cost_usd"] == pytest.approx(run.cost_usd) and run.cost_usd > 0
        assert row["cost_usd"] == pytest.approx(sum(it.cost_usd for it in its))
        lat = [it.latency_ms for it in its]
        assert row["latency_ms"]["p50"] == pytest.approx(nearest_rank(lat, 50), abs=1e-3)
        assert row["latency_ms"]["p95"] == pytest.approx(nearest_rank(lat, 95), abs=1e-3)
        bad = sum(1 for it in its if not all(it.invariant_status.values()))
        assert row["invariant_violations"] == bad
        assert row["invariant_violation_rate"] == pytest.approx(bad / len(its))
        assert row["wall_s"] == pytest.approx(run.elapsed_s, abs=1e-3)
        assert row["expect_met"] is True
        all_latencies += lat
        violations += bad
        iterations += len(its)
    assert rows["escalate"]["invariant_violation_rate"] == 1.0  # its only iteration broke solution_only
    assert rows["fix-syntax"]["iterations_to_convergence"] == 2
    assert rows["stall"]["worktree"] and rows["escalate"]["worktree"] and rows["regex"]["worktree"] is None

    t = report["totals"]
    assert (t["cases"], t["converged"], t["convergence_rate"]) == (5, 3, 0.6)
    assert (t["expectations_met"], t["expectation_rate"]) == (5, 1.0)
    assert t["iterations"] == iterations and t["invariant_violations"] == violations
    assert t["invariant_violation_rate"] == pytest.approx(violations / iterations)
    assert t["mean_iterations_to_convergence"] == pytest.approx((1 + 1 + 2) / 3)
    total_cost = sum(r.cost_usd for r in store.list_runs())
    assert t["cost_usd"] == pytest.approx(total_cost)
    assert t["cost_per_converged_usd"] == pytest.approx(total_cost / 3)
    assert t["tokens"] == sum(r.tokens_in + r.tokens_out for r in store.list_runs())
    assert t["latency_ms"]["p50"] == pytest.approx(nearest_rank(all_latencies, 50), abs=1e-3)
    assert t["latency_ms"]["p95"] == pytest.approx(nearest_rank(all_latencies, 95), abs=1e-3)
    walls = [row["wall_s"] for row in rows.values()]
    assert t["case_wall_s"] == {"p50": nearest_rank(walls, 50), "p95": nearest_rank(walls, 95)}
    assert t["termination_reasons"] == {"converged": 3, "stalled": 1, "waiting_on_person": 1}
    store.close()


TWO = [{"id": "ok", "script": str(CODEFIX / "cases" / "groupby.json")},
       {"id": "esc", "script": str(CODEFIX / "cases" / "escalate.json")}]


@pytest.mark.parametrize(("minimum", "expected"), [(None, 0), ("0.5", 0), ("0.75", 3)])
def test_min_convergence_sets_the_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            minimum: str | None, expected: int) -> None:
    cases = tmp_path / "two.jsonl"  # JSON lines work too
    cases.write_text("\n".join(json.dumps(c) for c in TWO) + "\n")
    argv = ["eval", "codefix", "--cases", str(cases), "--parallel", "2", "--db", str(tmp_path / "l.db")]
    if minimum is not None:
        argv += ["--min-convergence", minimum]
    assert main(argv) == expected
    out = capsys.readouterr().out
    assert "1 of 2 (50%)" in out and "the runs are in" in out
    assert ("below the required" in out) == (expected == 3)
    assert "kept worktree" in out  # the escalated case's


def test_min_convergence_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "codefix", "--cases", "x.json", "--min-convergence", "95"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-convergence" in err and "between 0 and 1" in err


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0 and percentile(values, 95) == 19.0 and percentile(values, 100) == 20.0


BAD: list[tuple[str, Any, list[str]]] = [
    ("notjson.json", "[{", ["is not valid JSON", "line 1"]),
    ("object.json", {"id": "a"}, ["one object, not a list"]),
    ("number.json", 3, ["must hold a JSON list"]),
    ("empty.json", [], ["lists no cases"]),
    ("blank.json", "", ["is empty"]),
    ("noid.json", [{"goal": "x"}], ["case 1", "id: required"]),
    ("badid.json", [{"id": "a b"}], ["case 1 (id 'a b')", "id:", "letters, digits"]),
    ("dupe.json", [{"id": "a"}, {"id": "b"}, {"id": "a"}], ["case 3 (id 'a')", "id:", "already used by case 1"]),
    ("extra.json", [{"id": "a", "scrpt": "s.json"}], ["case 1 (id 'a')", "scrpt: unknown field", "the fields are id, goal"]),
    ("expect.json", [{"id": "a", "expect": "won"}], ["case 1 (id 'a')", "expect:", "'converged'", "got 'won'"]),
    ("iters.json", [{"id": "a", "max_iterations": 0}], ["case 1 (id 'a')", "max_iterations:", "greater than or equal to 1"]),
    ("budget.json", [{"id": "a", "budget_usd": -1}], ["budget_usd:"]),
    ("script.json", [{"id": "ok"}, {"id": "a", "script": "nope.json"}], ["case 2 (id 'a')", "script: no file 'nope.json'",
                                                                         "relative to the cases file"]),
    ("both.json", [{"id": "a", "model": "openai/gpt-4o-mini", "script": "s.json"}], ["case 1 (id 'a')", "not both"]),
    ("notobj.json", [{"id": "a"}, "b"], ["case 2 is a str"]),
    ("lines.jsonl", '{"id": "a"}\n\n{"id": \n', ["line 3 is not valid JSON", "one case object per line"]),
    ("lines2.jsonl", '{"id": "a"}\n{"id": "b", "expect": 1}\n', ["case 2 (line 2) (id 'b')", "expect:"]),
]


@pytest.mark.parametrize(("name", "content", "expect"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_cases_file_is_one_line_naming_file_case_and_field(
    tmp_path: Path, name: str, content: Any, expect: list[str]
) -> None:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as exc:
        load_cases(path)
    message = str(exc.value)
    assert "\n" not in message and f"cases file {path}" in message, message
    for part in expect:
        assert part in message, message


def test_a_bad_cases_file_stops_the_command_before_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"id": "a", "max_iterations": "many"}]))
    db = tmp_path / "loopterm.db"
    for argv in (["eval", "codefix", "--cases", str(cases)], ["run", "codefix", "--cases", str(cases), "--parallel", "2"]):
        assert main([*argv, "--db", str(db)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "case 1 (id 'a'): max_iterations:" in err, err
    missing = main(["eval", "codefix", "--cases", str(tmp_path / "nope.json"), "--db", str(db)])
    assert missing == 2 and "not found" in capsys.readouterr().err
    assert not db.exists()


def test_a_cases_script_that_is_invalid_names_the_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"turns": []}))
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"id": "broken", "script": "s.json"}]))
    assert main(["eval", "codefix", "--cases", str(cases), "--db", str(tmp_path / "l.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case 'broken'" in err and "s.json" in err, err


def test_cases_resolve_scripts_against_their_file(tmp_path: Path) -> None:
    loaded = load_cases(CODEFIX / "cases.json")
    assert [c.id for c in loaded] == ["regex", "findall", "fix-syntax", "stall", "escalate"]
    assert all(c.script is not None and c.script.is_absolute() and c.script.is_file() for c in loaded)
    assert {c.expect for c in loaded} == {"converged", "terminated", "escalated"}
    eight = load_cases(CODEFIX / "cases8.json")
    assert len(eight) == 8 and all(c.expect == "converged" for c in eight)
