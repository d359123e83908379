"""Approval policies in the store: found in the run logs, revoked by an event in the log that made them.

Design: a policy is events, not a row. `PolicyAdded` is written (with the answer it was made with, in one
commit) to the log of the run where a person made it; `PolicyRevoked` goes to that same log; each call a
policy answers gets a `PolicyDecided` in the log of the run that made the call. core/fold.py (`policy_book`)
is the one place that reads them. A loop-scoped policy outlives its run because the log does: a new run of
the same `loop_ref` finds it by reading the policy events of every run of that loop (`events_sql`), through
the events table's index by run. So there is no second copy to keep in step with the log (a policy table
would be one, and an export/import or a hand-made copy of a run would carry the log but not the row), no
migration, and `loopterm export` carries a run's policies with it. The cost is one indexed query per call
that needs approval; a database with very many runs of one loop could add an index on events(kind) later.
"""

from __future__ import annotations

from typing import Any, Protocol

from loopterm.core.approval_policy import Policy
from loopterm.core.errors import ConfigError
from loopterm.core.fold import policy_book
from loopterm.core.records import RunRecord
from loopterm.core.runlog import EventRecord, PolicyAdded, PolicyDecided, PolicyRevoked, RunEvent

KINDS = tuple(str(model.model_fields["kind"].default) for model in (PolicyAdded, PolicyRevoked, PolicyDecided))


def events_sql(*, run_id: str | None = None, loop_ref: str | None = None) -> tuple[str, list[Any]]:
    """The query for the policy events of a run and of every run of a loop (neither: of the whole database),
    oldest first."""
    marks = ", ".join("?" * len(KINDS))
    where, params = [], []
    if run_id is not None:
        where.append("run_id = ?")
        params.append(run_id)
    if loop_ref is not None:
        where.append("run_id IN (SELECT id FROM runs WHERE loop_ref = ?)")
        params.append(loop_ref)
    scope = f" AND ({' OR '.join(where)})" if where else ""
    return f"SELECT * FROM events WHERE kind IN ({marks}){scope} ORDER BY id", [*KINDS, *params]


class PolicyStore(Protocol):
    """What this module needs of `loopterm.store.Store`."""

    def policy_events(self, *, run_id: str | None = None, loop_ref: str | None = None) -> list[EventRecord]: ...

    def append_event(self, run_id: str, event: RunEvent, iteration: int | None = None) -> EventRecord: ...


def policies(store: PolicyStore, *, run: RunRecord | None = None, loop_ref: str | None = None) -> list[Policy]:
    """Every policy (revoked ones too), oldest first: in force for `run` (its own and its loop's), of a loop,
    or in the whole database."""
    if run is not None:
        records = store.policy_events(run_id=run.id, loop_ref=run.loop_ref)
        book = policy_book(records)
        return [p for p in book.values() if p.rule.scope == "loop" or p.run_id == run.id]
    return list(policy_book(store.policy_events(loop_ref=loop_ref)).values())


def find(store: PolicyStore, policy_id: str) -> Policy:
    """The policy with this id (a unique prefix is enough); ConfigError, one line, when there is none or several."""
    book = policy_book(store.policy_events())
    if policy_id in book:
        return book[policy_id]
    found = [p for p in book.values() if p.id.startswith(policy_id)] if policy_id else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"no approval policy {policy_id!r}; `loopterm policy list` shows them")
    raise ConfigError(f"{policy_id!r} names {len(found)} policies ({', '.join(p.id for p in found[:5])}); give more of the id")


def revoke(store: PolicyStore, policy_id: str, reason: str = "") -> Policy:
    """Revoke a policy: recorded in the log of the run that made it; the next call it would have answered is
    asked. Revoking one already revoked is refused (one line) and changes nothing."""
    policy = find(store, policy_id)
    if policy.revoked:
        raise ConfigError(f"policy {policy.id} is already revoked ({policy.revoke_reason or 'no reason given'})")
    store.append_event(policy.run_id, PolicyRevoked(policy=policy.id, reason=reason or "revoked by a person"))
    return find(store, policy.id)
