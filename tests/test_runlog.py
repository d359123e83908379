"""The typed run log and its one fold: every stored kind is a model, old databases load, the fold reads them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import runlog
from loopterm.core.fold import fold
from loopterm.core.runlog import EventRecord, from_stored, to_stored
from loopterm.store import Store

FIXTURE = Path(__file__).parent / "fixtures" / "before_typed_log.db"


@pytest.fixture
def old_store(tmp_path: Path) -> Store:
    path = tmp_path / "old.db"
    shutil.copy(FIXTURE, path)
    return Store.open(path)


def by_loop(store: Store) -> dict[str, Any]:
    return {(r.loop, r.origin): r for r in store.list_runs()}


def test_every_event_of_a_database_from_before_the_typed_log_loads_as_its_model(old_store: Store) -> None:
    kinds: set[str] = set()
    for run in old_store.list_runs():
        for record in old_store.events(run.id):
            assert not isinstance(record.event, runlog.Unrecognized), record.event
            kinds.add(to_stored(record.event)[0])
    assert len(kinds) >= 20  # the fixture holds most kinds the engine, fork, replay, shadow and daemon wrote


def test_the_fold_reads_an_old_database_as_the_old_version_did(old_store: Store) -> None:
    runs = by_loop(old_store)
    demo = fold(old_store.events(runs[("demo", "run")].id))
    assert demo.escalation is None  # answered then by a bare resume (the engine went on past it)
    assert demo.last_escalation is not None and demo.last_escalation.failing_invariants
    assert demo.approvals == {} and len(demo.answers) == 1  # its approval was answered
    assert [type(c).__name__ for _, c in demo.person_inputs][:2] == ["AddFact", "Relax"]
    branch = fold(old_store.events(runs[("demo", "fork")].id))
    assert branch.forked is not None and branch.forked.at == 2 and branch.patch is not None
    assert branch.escalation is not None and branch.waiting  # it ended waiting on a person, unanswered
    shadow = fold(old_store.events(runs[("codefix", "run")].id))
    assert shadow.shadow and len(shadow.approvals) == 1
    assert shadow.trigger is not None and shadow.trigger.on == "change"  # the daemon's `kind` key
    assert shadow.strategy == "careful" and shadow.strategy_changes[0][1].before is None  # the `from` key
    assert shadow.side_effect is not None and shadow.side_effect.asked.key == "k1"


def test_an_old_export_line_and_a_new_one_say_the_same() -> None:
    old = {"trigger": "t", "kind": "schedule", "event": "0 * * * *", "triggers_file": "x.toml", "pid": 7}
    event = from_stored("trigger", old)
    assert isinstance(event, runlog.TriggerFired) and event.on == "schedule"
    assert to_stored(event) == ("trigger", old)
    change = from_stored("strategy_changed", {"from": "a", "to": "b", "why": "w", "temperature": 0.5, "model": None})
    assert isinstance(change, runlog.StrategyChanged) and change.before == "a"
    assert to_stored(change)[1]["from"] == "a"


def test_a_row_no_model_fits_is_kept_as_it_was_and_interpreted_by_no_one() -> None:
    for kind, data in [("from_a_newer_loopterm", {"x": 1}), ("approved", {"args": "not a dict"})]:
        event = from_stored(kind, data)
        assert isinstance(event, runlog.Unrecognized) and event.problem
        assert to_stored(event) == (kind, data)
    view = fold([EventRecord(id=1, run_id="r", ts=0.0, event=from_stored("approved", {"args": 3}))])
    assert view.answers == {}


def test_unknown_keys_of_an_old_row_survive_a_round_trip() -> None:
    event = from_stored("run_finished", {"status": "stopped", "reason": "stopped", "message": "m", "extra": [1]})
    assert to_stored(event)[1]["extra"] == [1]


def rec(event: runlog.RunEvent, id: int, iteration: int | None = None) -> EventRecord:
    return EventRecord(id=id, run_id="r", iteration=iteration, ts=float(id), event=event)


def test_what_waits_on_a_person_stays_pending_through_an_engine_end_until_answered() -> None:
    log = [
        rec(runlog.RunStarted(pid=1, host="h", v=2), 1),
        rec(runlog.ApprovalPending(key="k", tool="write", args={}), 2, 3),
        rec(runlog.RunFinished(status="stopped", reason="stopped", message="loopterm quit"), 3),
        rec(runlog.RunResumed(pid=2, host="h", v=2), 4),
        rec(runlog.RunFinished(status="escalated", reason="waiting_on_person"), 5),
    ]
    view = fold(log)
    assert list(view.approvals) == ["k"] and view.waiting and not view.lifecycle_open
    view.absorb([rec(runlog.Approved(key="k"), 6, 4)])
    assert view.approvals == {} and not view.waiting and view.answers["k"].kind == "approve"


def test_an_escalation_is_answered_only_by_naming_it() -> None:
    view = fold([
        rec(runlog.RunStarted(v=2), 1),
        rec(runlog.Escalated(summary="stuck", iteration=3), 2, 3),
        rec(runlog.RunFinished(status="stopped"), 3),
        rec(runlog.RunResumed(v=2), 4),  # a resume of this version does not answer it
        rec(runlog.EscalationAnswered(escalation=999), 5),  # nor an answer to another one
    ])
    assert view.escalation is not None and view.escalation.event_id == 2 and view.escalation.iteration == 3
    view.absorb([rec(runlog.EscalationAnswered(escalation=2), 6)])
    assert view.escalation is None and view.last_escalation is not None


def test_the_state_the_next_iteration_starts_from_is_the_last_patch_after_the_last_commit() -> None:
    view = fold([
        rec(runlog.FactAdded(fact="a", patched_state={"v": 1}), 1, 2),
        rec(runlog.StateEdited(reason="r", patched_state={"v": 2}), 2, 2),
    ])
    assert view.state_after(2) == {"v": 2} and view.state_version(2) == 2
    assert view.state_after(3) is None and view.state_version(3) == 0  # iteration 3 committed since


def test_relaxations_with_an_expiry_and_their_restoration() -> None:
    view = fold([
        rec(runlog.InvariantRelaxed(invariant="i", reason="why", until=5), 1, 3),
        rec(runlog.InvariantRelaxed(invariant="j", reason="because"), 2, 3),
        rec(runlog.InvariantRestored(invariant="j"), 3, 4),
    ])
    assert view.relaxed == {"i": "why"} and view.relax_until == {"i": 5}
    assert view.relaxed_at(1.5) == {"i"} and view.relaxed_at(2.5) == {"i", "j"} and view.relaxed_at(3.0) == {"i"}


def test_outcome_says_what_became_of_a_sent_command() -> None:
    """The TUI learns whether its edit applied or was refused (and why) from the fold, not from event kinds."""
    from loopterm.core.fold import Outcome, outcome

    refused = runlog.CommandRejected(command="edit_state", error="the run moved", command_id=7, stale=True)
    applied = runlog.StateEdited(reason="r", patched_state={"x": 1}, command_id=8)
    assert outcome(EventRecord(id=1, run_id="r", ts=0.0, event=refused)) == Outcome(7, "edit_state", "the run moved", True)
    assert outcome(EventRecord(id=2, run_id="r", ts=0.0, event=applied)) == Outcome(8, "edit_state")
    assert outcome(EventRecord(id=3, run_id="r", ts=0.0, event=runlog.FactAdded(fact="f"))) is None
