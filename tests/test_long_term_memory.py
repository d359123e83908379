"""The engine and long-term memory: recall at a run's start, contradiction flags, consolidation at its end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from loopterm.core import Decision, Loop, LoopState
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core import runlog
from tests.loopkit import FLAG_GATE, PRICE, decision, make_engine, of, write


def _loop(tmp_path: Path, name: str, turns: list[dict], **kw: object) -> Loop:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"price": PRICE, "turns": [{"content": t} for t in turns]}))
    return Loop(name=name, goal="make flag.txt say ok for the blue widget", script=path, tools=[write],
                gates=[FLAG_GATE], max_iterations=3, **kw)


def observe_colour(state: LoopState, d: Decision, record: object, gates: object) -> LoopState:
    """A fact as key -> value: the colour the model wrote."""
    text = getattr(record, "args", {}).get("text", "")
    state.memory.known = {**state.memory.known, "colour": "red" if "red" in text else "blue"}
    return state


def test_a_new_run_recalls_memory_and_a_contradiction_is_flagged(tmp_path: Path) -> None:
    no_contradiction = Invariant(name="consistent", check=lambda s: not s.memory.contradictions,
                                 remediation=Remediation.CUSTOM,
                                 custom=lambda s: s.model_copy(update={"memory": s.memory.model_copy(
                                     update={"contradictions": [], "facts": [*s.memory.facts, "the widget is blue"]})}))
    loop = _loop(tmp_path, "mem", [decision(text="red"), decision(text="ok")], observe=observe_colour,
                 invariants=[no_contradiction])
    engine, store = make_engine(tmp_path, loop)
    store.remember("mem", "colour", "blue")
    store.remember("mem", "widget", "the blue widget ships in a box", kind="document")
    store.remember("other", "widget", "not this loop's", kind="document")
    engine.state = engine._load_state(None)  # recall sees what was remembered after create
    final = asyncio.run(engine.run())
    assert final.status == "converged" and final.iterations == 2
    first, second = store.iterations(final.id)
    assert "widget: the blue widget ships in a box" in first.state["memory"]["retrieved"]
    assert all("not this loop's" not in r for r in first.state["memory"]["retrieved"])
    assert "Long-term memory" in first.prompt[0]["content"]  # the system message: recalled once, stable
    assert first.invariant_status == {"consistent": False}
    assert second.invariant_status == {"consistent": True}
    assert "the widget is blue" in second.prompt[1]["content"]
    events = [runlog.to_stored(e)[1] for e in of(store.events(final.id), runlog.InvariantViolated)]
    assert events == [{"invariant": "consistent", "remediation": "custom"}]


def test_a_converged_run_leaves_its_facts_and_outcome_for_the_next_run(tmp_path: Path) -> None:
    loop = _loop(tmp_path, "cons", [decision(text="ok", subgoal="write ok")], observe=observe_colour)
    engine, store = make_engine(tmp_path, loop)
    final = asyncio.run(engine.run())
    assert final.status == "converged"
    kept = {m.key: m for m in store.memories("cons")}
    assert kept["colour"].value == "blue" and kept["colour"].source_run == final.id
    outcome = next(m for m in kept.values() if m.kind == "decision")
    assert "converged in 1 iterations" in outcome.value and "write ok" in outcome.value
    # the next run of the same loop retrieves it
    engine2, _ = make_engine(tmp_path, loop)
    assert any("converged in 1 iterations" in r for r in engine2.state.memory.retrieved)


def test_recall_ranks_by_meaning_through_a_litellm_embedding_model(tmp_path: Path, store_target: object) -> None:
    """The store's semantic recall on SQLite, then on PostgreSQL; the engine's on SQLite."""
    from loopterm.core.embedding import litellm_embedder
    from loopterm.store import Store

    embed = litellm_embedder("scripted/words")
    a, b, c = embed(["refund window for returns", "refund window for returns", "cache stampede on the api"])
    assert a == b and sum(x * y for x, y in zip(a, c)) < 0.5  # same text same vector; unrelated text far
    store = Store.open(store_target)  # type: ignore[arg-type]
    store.remember("s", "returns", "items may be returned within 30 days for a refund", kind="document")
    store.remember("s", "shipping", "orders ship within two business days", kind="document")
    found = store.recall("s", "how many days do I have to return an item for a refund", limit=1, embed=embed)
    assert [m.key for m in found] == ["returns"]
    # a loop with an embedding model recalls through it when a run starts
    loop = _loop(tmp_path, "emb", [decision(text="ok")], embedding_model="scripted/words")
    engine, store2 = make_engine(tmp_path / "e", loop)
    store2.remember("emb", "widget", "the blue widget ships in a box", kind="document")
    engine.state = engine._load_state(None)
    assert engine.state.memory.retrieved == ["widget: the blue widget ships in a box"]
    assert store2.memories("emb")[0].key == "widget"


def test_a_replay_recalls_what_the_recording_recalled_and_teaches_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    from loopterm.store import Store
    from loopterm.tui.cli import main

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "r.db"
    store = Store.open(db)
    store.remember("codefix", "slug-tip", "slugify: fold accents with unicodedata NFKD", kind="decision")
    store.close()
    assert main(["run", "codefix", "--headless", "--db", str(db)]) == 0
    store = Store.open(db)
    recorded = store.list_runs()[-1]
    first = store.get_iteration(recorded.id, 1)
    assert any("slug-tip" in r for r in first.state["memory"]["retrieved"])
    store.remember("codefix", "slugify-later", "slugify: something learned after the recording", kind="decision")
    before = {(m.key, m.value, m.source_run) for m in store.memories("codefix")}
    store.close()
    capsys.readouterr()
    assert main(["replay", recorded.id, "--db", str(db)]) == 0  # identical despite the newer memory
    assert "identical" in capsys.readouterr().out
    store = Store.open(db)
    assert {(m.key, m.value, m.source_run) for m in store.memories("codefix")} == before
