"""The daily budget across processes and hosts: what active runs may still spend is held against it.

Checking today's spend alone lets two processes (two hosts, or two runs started a minute apart) both pass
the gate and together spend twice what was left. So a run that may still spend (created, running, paused,
stepping or escalated: it will go on once answered) holds what its USD budget has left, and a new run is
checked against today's spend plus those holdings, in the transaction that creates it (SQLite: BEGIN
IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), so two creations are serialised and the second
sees the first. A run that ends (converged, stopped, failed, terminated) holds nothing; resuming it checks
again. A run left "running" by a process that died keeps its holding until it is resumed or stopped.
"""

from __future__ import annotations

from typing import Any

from loopterm.core.daily_budget import local_day, money
from loopterm.core.errors import ConfigError
from loopterm.core.records import RunRecord
from loopterm.store.delta import loads
from loopterm.store.ledger import spend_on

HOLDING = ("created", "running", "paused", "stepping", "escalated")
DAILY_LOCK = 0x6C6F6F70_64617921  # pg_advisory_xact_lock key: one creation at a time checks the daily budget
SLACK = 1e-9  # float sums of cents


def held(conn: Any, exclude: str | None = None) -> tuple[float, int]:
    """USD that active runs (all but `exclude`) may still spend under their budgets, and how many hold any."""
    marks = ", ".join("?" * len(HOLDING))
    rows = conn.execute(f"SELECT id, budget, cost_usd FROM runs WHERE status IN ({marks})", list(HOLDING)).fetchall()
    total, holders = 0.0, 0
    for run_id, budget, cost in rows:
        usd = (loads(budget) or {}).get("usd") if budget else None
        if run_id == exclude or usd is None:
            continue
        left = max(0.0, float(usd) - float(cost or 0.0))
        if left > 0:
            total, holders = total + left, holders + 1
    return total, holders


def check_new_run(conn: Any, run: RunRecord, daily: float) -> None:
    """Inside the transaction that creates `run`: refuse it (one line) when its USD budget does not fit in
    today's daily budget less today's spend and what active runs hold.

    A run without a USD budget is not checked (and holds nothing): every command that starts a run under a
    daily budget gives it one (core/daily_budget.py caps an uncapped run at what is left), so only a record
    of a refusal (the daemon's) or a run made in code without the daily gate has none.
    """
    usd = (run.budget or {}).get("usd")
    if usd is None:
        return
    day = local_day(run.created_at)
    spent = spend_on(conn, day)
    holding, holders = held(conn)
    left = daily - spent - holding
    if usd > left + SLACK:
        by = f" and {money(holding)} held by {holders} active run{'s' * (holders != 1)}" if holders else ""
        raise ConfigError(
            f"this run's budget of {money(usd)} does not fit in the daily "
            f"budget of {money(daily)}: {money(spent)} spent today ({day}){by}, {money(max(0.0, left))} left; "
            "wait for active runs to end, lower the run's budget, or raise the daily budget with "
            "`loopterm budget --set-daily X`"
        )
