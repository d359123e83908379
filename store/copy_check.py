"""`loopterm db copy`'s second look: after `Store.copy_to` (store/copy.py, which compares every table's rows
inside its transaction), read both stores back through the Store API, as every command will, and compare.

Each run's export line by line (its lineage: run, iterations with their full state and prompt, events, tool
calls), every run's pending intent and pending commands, every loop's memories, the ledger by day, loop and
model, the daily budget, and the row count of each table both backends keep the same way. The same check
decides whether a target that already holds runs is this store's copy (a re-run: nothing to do) or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loopterm.core.errors import ConfigError

# Tables whose rows are the same on both backends (states and blobs are each store's own encoding).
COUNTED = ("runs", "iterations", "events", "tool_calls", "intents", "commands", "memory", "spend")


@dataclass
class Copied:
    """What a copy holds, for its one-line summary."""

    counts: dict[str, int] = field(default_factory=dict)
    branches: int = 0
    daily_budget: float | None = None

    def what(self) -> str:
        c = self.counts
        budget = f", daily budget ${self.daily_budget:g}" if self.daily_budget is not None else ""
        return (f"{c.get('runs', 0)} run(s) ({self.branches} branch(es)), {c.get('iterations', 0)} iteration(s), "
                f"{c.get('events', 0)} event(s), {c.get('tool_calls', 0)} tool call(s), {c.get('intents', 0)} intent(s), "
                f"{c.get('commands', 0)} command(s), {c.get('memory', 0)} memories, {c.get('spend', 0)} ledger row(s)"
                f"{budget}")


def export_lines(store: Any, run_id: str) -> list[str]:
    """A run's export as canonical lines (keys sorted, compact)."""
    return [json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for item in store.export_run(run_id)]


def counts(store: Any) -> dict[str, int]:
    """Rows per table (the Store has no public count; its query helper reads either backend)."""
    return {table: int(store._query(f"SELECT count(*) FROM {table}")[0][0]) for table in COUNTED}


def difference(source: Any, target: Any) -> str | None:
    """The first way `target` does not read back as `source` (None: it reads back the same)."""
    runs = source.list_runs()
    theirs = {run.id for run in target.list_runs()}
    missing = [run.id for run in runs if run.id not in theirs]
    if missing or len(theirs) != len(runs):
        return f"it holds {len(theirs)} run(s), the source {len(runs)}" + (f" (e.g. {missing[0]} is missing)" if missing else "")
    for run in runs:
        ours, copied = export_lines(source, run.id), export_lines(target, run.id)
        if ours != copied:
            line = next((i for i, (a, b) in enumerate(zip(ours, copied), 1) if a != b), min(len(ours), len(copied)) + 1)
            return f"run {run.id}'s export differs at line {line} ({len(ours)} line(s) in the source, {len(copied)} here)"
        a, b = source.load_intent(run.id, run.iterations + 1), target.load_intent(run.id, run.iterations + 1)
        if (a and a.model_dump()) != (b and b.model_dump()):
            return f"run {run.id}'s pending intent differs"
        if [c.model_dump() for c in source.pending_commands(run.id)] != [c.model_dump() for c in target.pending_commands(run.id)]:
            return f"run {run.id}'s pending commands differ"
    for loop in source.memory_loops():
        if [m.model_dump() for m in source.memories(loop)] != [m.model_dump() for m in target.memories(loop)]:
            return f"loop {loop}'s memories differ"
    for group in ("day", "loop", "model"):
        if source.spend_by(group) != target.spend_by(group):
            return f"the ledger by {group} differs"
    if source.stored_daily_budget() != target.stored_daily_budget():
        return "the daily budget differs"
    ours_n, theirs_n = counts(source), counts(target)
    for table in COUNTED:
        if ours_n[table] != theirs_n[table]:
            return f"table {table} has {ours_n[table]} row(s) in the source and {theirs_n[table]} here"
    return None


def check(source: Any, target: Any, shown: str) -> Copied:
    """ConfigError naming the first difference; else what the copy holds."""
    found = difference(source, target)
    if found is not None:
        raise ConfigError(f"{shown} does not read back as the source: {found}")
    return Copied(counts=counts(source), branches=sum(1 for run in source.list_runs() if run.parent_run),
                  daily_budget=source.stored_daily_budget())
