"""The spend ledger (table `spend`, schema 3) and the daily budget.

The ledger equals the runs' totals by construction: whenever the Store writes
a run's tokens_in / tokens_out / cost_usd (an iteration's commit, or
update_run), the same transaction first inserts one row for the change over
the totals the row held, computed by SQL from that row (`RECORD_SQL`: one
INSERT ... SELECT by primary key, no read-back, no extra commit). So for every
run, the sum of its ledger rows is its totals minus what it held when it was
created or imported: a fork or a replay starts at zero; an imported run was
spent elsewhere and adds rows only for what it spends here.

The daily budget is a figure in USD in the store's `meta` table (key
DAILY_BUDGET_KEY), overridden by $LOOPTERM_DAILY_BUDGET_USD when that is set.
`check_daily_budget` is the gate every command that starts a run goes through.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from loopterm.core.errors import ConfigError
from loopterm.core.records import RunRecord, SpendTotal

if TYPE_CHECKING:
    from loopterm.store.db import Store

DAILY_BUDGET_KEY = "daily_budget_usd"
DAILY_BUDGET_ENV = "LOOPTERM_DAILY_BUDGET_USD"
GROUPS = ("day", "loop", "model")
TOTAL_FIELDS = ("tokens_in", "tokens_out", "cost_usd")

# Parameters: model (NULL = the run's), day, at, then new tokens_in, tokens_out, cost_usd
# (NULL = unchanged) twice (the values, then the change test), then the run id.
RECORD_SQL = """
INSERT INTO spend (run_id, loop, model, day, at, tokens_in, tokens_out, cost_usd)
SELECT id, loop, coalesce(?1, model), ?2, ?3,
       coalesce(?4, tokens_in) - tokens_in, coalesce(?5, tokens_out) - tokens_out, coalesce(?6, cost_usd) - cost_usd
FROM runs
WHERE id = ?7 AND (coalesce(?4, tokens_in) != tokens_in OR coalesce(?5, tokens_out) != tokens_out
                   OR coalesce(?6, cost_usd) != cost_usd)
"""


def local_day(at: float) -> str:
    """The local calendar date (YYYY-MM-DD) of a Unix time."""
    return time.strftime("%Y-%m-%d", time.localtime(at))


def record_change(conn: sqlite3.Connection, run_id: str, totals: dict[str, Any], *, model: str | None, at: float) -> None:
    """Inside the caller's write, before the run's row is updated to `totals`: ledger the change.

    Writes nothing when none of tokens_in / tokens_out / cost_usd changes (or
    the run does not exist: the caller's update then fails on its own).
    """
    conn.execute(
        RECORD_SQL,
        [model, local_day(at), at, totals.get("tokens_in"), totals.get("tokens_out"), totals.get("cost_usd"), run_id],
    )


def spend_by(conn: sqlite3.Connection, group: str, since_day: str | None) -> list[SpendTotal]:
    """Ledger totals per day (oldest first), per loop or per model (most expensive first)."""
    if group not in GROUPS:
        raise ValueError(f"cannot group spend by {group!r}: use one of {', '.join(GROUPS)}")
    where, params = ("WHERE day >= ?", [since_day]) if since_day else ("", [])
    order = "day" if group == "day" else f"sum(cost_usd) DESC, {group}"
    rows = conn.execute(
        f"SELECT {group}, sum(tokens_in), sum(tokens_out), sum(cost_usd), count(DISTINCT run_id) "
        f"FROM spend {where} GROUP BY {group} ORDER BY {order}",
        params,
    ).fetchall()
    return [SpendTotal(key=key, tokens_in=t_in, tokens_out=t_out, cost_usd=cost, runs=runs)
            for key, t_in, t_out, cost, runs in rows]


def spend_on(conn: sqlite3.Connection, day: str) -> float:
    (total,) = conn.execute("SELECT coalesce(sum(cost_usd), 0.0) FROM spend WHERE day = ?", [day]).fetchone()
    return float(total)


def parse_usd(text: str, source: str) -> float:
    """A finite amount of US dollars >= 0 from text, or a one-line ConfigError naming where it came from."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"{source} must be a number of US dollars, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{source} must be a finite number of US dollars >= 0, got {text!r}")
    return value


def env_daily_budget() -> float | None:
    """$LOOPTERM_DAILY_BUDGET_USD when set (an empty value counts as unset)."""
    text = os.environ.get(DAILY_BUDGET_ENV, "")
    if not text.strip():
        return None
    try:
        return parse_usd(text, f"${DAILY_BUDGET_ENV}")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; fix it or unset it") from None


def stored_daily_budget(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", [DAILY_BUDGET_KEY]).fetchone()
    if row is None:
        return None
    try:
        return parse_usd(row[0], "the daily budget stored in the database")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; set it again with `loopterm budget --set-daily X` or `--clear-daily`") from None


def money(value: float) -> str:
    """Dollars as a person reads them: cents above $1, more digits below (scripted runs cost fractions of a cent)."""
    if abs(value) >= 1:
        return f"${value:,.2f}"
    digits = f"{value:.6f}".rstrip("0")
    return "$" + digits + "0" * max(0, 2 - len(digits.partition(".")[2]))


def check_daily_budget(
    store: "Store | None", run_budget_usd: float | None, *, what: str = "this run's budget",
    lower: str | None = "--budget-usd", today: str | None = None,
) -> float | None:
    """The USD cap a run about to start may have under the daily budget; None when no daily budget is set.

    `run_budget_usd` is what the run may still spend (None: uncapped). Refuses
    with a one-line ConfigError when today's spend plus that would exceed the
    daily budget, or when nothing of it is left. Returns `run_budget_usd` when
    it fits, and the remainder of the daily budget when the run is uncapped:
    the caller makes that the run's USD budget (and says so). A caller starting
    several runs at once passes the sum of their budgets (or None) and divides
    the remainder itself. store=None: there is no database yet (nothing spent,
    nothing stored; only $LOOPTERM_DAILY_BUDGET_USD counts). `what` names the
    figure in the refusal, `lower` the option that lowers it (None: there is none).
    """
    daily = store.daily_budget() if store is not None else env_daily_budget()
    if daily is None:
        return None
    day = today or local_day(time.time())
    spent = store.spend_on(day) if store is not None else 0.0
    remaining = max(0.0, daily - spent)
    advice = "raise it with `loopterm budget --set-daily X`, or wait until tomorrow"
    if remaining <= 0 and (run_budget_usd is None or run_budget_usd > 0):
        raise ConfigError(f"the daily budget is spent: {money(spent)} of {money(daily)} used today ({day}); {advice}")
    if run_budget_usd is None:
        return remaining
    if spent + run_budget_usd > daily + 1e-12:
        lowering = f"pass a lower {lower} (at most {money(remaining)}), " if lower else ""
        raise ConfigError(
            f"{what} of {money(run_budget_usd)} on top of today's spend of {money(spent)} would exceed the "
            f"daily budget of {money(daily)} ({money(remaining)} left today); {lowering}{advice}"
        )
    return run_budget_usd


def cap_run(store: "Store", run: RunRecord, default_usd: float | None, *, what: str) -> tuple[RunRecord, float | None]:
    """The daily-budget gate for an existing run about to continue (a resume, a new branch).

    Checks what the run may still spend (its USD budget, else `default_usd`, less what it spent);
    refuses with a one-line ConfigError; gives an uncapped run what is left of today's budget as
    its USD budget (recorded with a `budget_capped` event). Returns the run as it now is, and the
    cap given (None: none).
    """
    usd = (run.budget or {}).get("usd", default_usd)
    cap = check_daily_budget(store, None if usd is None else max(0.0, usd - run.cost_usd), what=what, lower=None)
    if cap is None or usd is not None:
        return run, None
    capped = {**(run.budget or {}), "usd": run.cost_usd + cap}
    store.update_run(run.id, budget=capped)
    store.append_event(run.id, "budget_capped", {"usd": capped["usd"], "why": "daily budget"})
    return store.get_run(run.id), cap
