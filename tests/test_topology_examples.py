"""The README's topology examples are real loop files: each runs offline to its expected end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loopterm.store import Store
from loopterm.tui.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "topologies"

# file -> (topology, iterations to converge, gate names of the last iteration)
EXPECTED = {
    "reflexive.py": ("reflexive", 3, ["three_lines", "critic"]),
    "maker_checker.py": ("maker-checker", 2, ["checker"]),
    "proposer_critic_judge.py": ("proposer-critic-judge", 2, ["critic", "judge"]),
    "planner_executors.py": ("planner-executors", 4, []),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_topology_example_converges_offline(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "l.db"
    assert main(["run", str(EXAMPLES / name), "--headless", "--db", str(db)]) == 0
    capsys.readouterr()
    store = Store.open(db, create=False)
    topology, iterations, gates = EXPECTED[name]
    root = next(r for d, r in store.tree() if d == 0)
    assert root.status == "converged" and root.iterations == iterations
    assert [g["name"] for g in store.iterations(root.id)[-1].gate_results] == gates
    if name == "planner_executors.py":
        kids = store.children(root.id)
        assert sorted(k.goal for k in kids) == [f"Summarize the incident report {f} in one sentence."
                                                 for f in ("cache.md", "db.md", "dns.md")]
        assert {k.origin for k in kids} == {"child"} and {k.status for k in kids} == {"converged"}
        # each child answered about its own report (the script matches on the item in the prompt)
        results = store.last_iterations(root.id, 1)[0].state["results"]
        assert "database" in results["db.md"]["result"] and "DNS" in results["dns.md"]["result"]


def test_the_readme_shows_each_topology_example_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    for name in EXPECTED:
        body = (EXAMPLES / name).read_text()
        assert any(block == body for block in blocks), f"README does not show examples/topologies/{name} verbatim"


def test_a_replay_of_a_planner_loop_reuses_its_children(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "l.db"
    assert main(["run", str(EXAMPLES / "planner_executors.py"), "--headless", "--db", str(db)]) == 0
    store = Store.open(db, create=False)
    recorded = next(r for d, r in store.tree() if d == 0)
    runs_before = len(store.list_runs())
    store.close()
    capsys.readouterr()
    assert main(["replay", recorded.id, "--db", str(db)]) == 0
    assert "identical" in capsys.readouterr().out
    store = Store.open(db, create=False)
    assert len(store.list_runs()) == runs_before + 1  # the replay itself; no child ran again
