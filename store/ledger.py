"""The spend ledger (table `spend`, schema 3; tokens_cached since schema 4) and the daily budget.

The ledger equals the runs' totals by construction: whenever the Store writes
a run's tokens_in / tokens_out / cost_usd / tokens_cached (an iteration's commit, or
update_run), the same transaction first inserts one row for the change over
the totals the row held, computed by SQL from that row (`RECORD_SQL`: one
INSERT ... SELECT by primary key, no read-back, no extra commit). So for every
run, the sum of its ledger rows is its totals minus what it held when it was
created or imported: a fork or a replay starts at zero; an imported run was
spent elsewhere and adds rows only for what it spends here.

The daily budget is a figure in USD in the store's `meta` table (key
DAILY_BUDGET_KEY), overridden by $LOOPTERM_DAILY_BUDGET_USD when that is set;
core/daily_budget.py is the gate every run goes through before it starts.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from loopterm.core.errors import ConfigError
from loopterm.core.records import SpendTotal
from loopterm.core.daily_budget import env_daily_budget, local_day, parse_usd

DAILY_BUDGET_KEY = "daily_budget_usd"
GROUPS = ("day", "loop", "model")
TOTAL_FIELDS = ("tokens_in", "tokens_out", "cost_usd", "tokens_cached")

# Parameters: model (NULL = the run's), day, at, then the new tokens_in, tokens_out, cost_usd,
# tokens_cached (NULL = unchanged), then the run id.
RECORD_SQL = """
INSERT INTO spend (run_id, loop, model, day, at, tokens_in, tokens_out, cost_usd, tokens_cached)
SELECT id, loop, coalesce(?1, model), ?2, ?3,
       coalesce(?4, tokens_in) - tokens_in, coalesce(?5, tokens_out) - tokens_out, coalesce(?6, cost_usd) - cost_usd,
       coalesce(?8, tokens_cached) - tokens_cached
FROM runs
WHERE id = ?7 AND (coalesce(?4, tokens_in) != tokens_in OR coalesce(?5, tokens_out) != tokens_out
                   OR coalesce(?6, cost_usd) != cost_usd OR coalesce(?8, tokens_cached) != tokens_cached)
"""


def record_change(conn: sqlite3.Connection, run_id: str, totals: dict[str, Any], *, model: str | None, at: float) -> None:
    """Inside the caller's write, before the run's row is updated to `totals`: ledger the change.

    Writes nothing when none of tokens_in / tokens_out / cost_usd / tokens_cached changes (or
    the run does not exist: the caller's update then fails on its own).
    """
    conn.execute(
        RECORD_SQL,
        [model, local_day(at), at, totals.get("tokens_in"), totals.get("tokens_out"), totals.get("cost_usd"), run_id,
         totals.get("tokens_cached")],
    )


def spend_by(conn: sqlite3.Connection, group: str, since_day: str | None) -> list[SpendTotal]:
    """Ledger totals per day (oldest first), per loop or per model (most expensive first)."""
    if group not in GROUPS:
        raise ValueError(f"cannot group spend by {group!r}: use one of {', '.join(GROUPS)}")
    where, params = ("WHERE day >= ?", [since_day]) if since_day else ("", [])
    order = "day" if group == "day" else f"sum(cost_usd) DESC, {group}"
    rows = conn.execute(
        f"SELECT {group}, sum(tokens_in), sum(tokens_out), sum(cost_usd), count(DISTINCT run_id), sum(tokens_cached) "
        f"FROM spend {where} GROUP BY {group} ORDER BY {order}",
        params,
    ).fetchall()
    return [SpendTotal(key=key, tokens_in=t_in, tokens_out=t_out, cost_usd=cost, runs=runs, tokens_cached=cached)
            for key, t_in, t_out, cost, runs, cached in rows]


def spend_on(conn: sqlite3.Connection, day: str) -> float:
    (total,) = conn.execute("SELECT coalesce(sum(cost_usd), 0.0) FROM spend WHERE day = ?", [day]).fetchone()
    return float(total)


def stored_daily_budget(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", [DAILY_BUDGET_KEY]).fetchone()
    if row is None:
        return None
    try:
        return parse_usd(row[0], "the daily budget stored in the database")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; set it again with `loopterm budget --set-daily X` or `--clear-daily`") from None


class LedgerAccess:
    """The spend ledger's and the daily budget's part of `Store` (mixed into it in store/db.py, whose
    connection, lock and transactions it uses)."""

    _conn: Any
    _lock: Any

    if TYPE_CHECKING:  # the Store's own
        def _write(self, *, power_safe: bool = True) -> AbstractContextManager[Any]: ...

    def spend_by(self, group: str, since_day: str | None = None) -> list[SpendTotal]:
        """Ledger totals grouped by "day" (oldest first), "loop" or "model" (most expensive first),
        from since_day (YYYY-MM-DD, local) on."""
        with self._lock:
            return spend_by(self._conn, group, since_day)

    def spend_on(self, day: str) -> float:
        """USD spent on a local day (YYYY-MM-DD) by every run in this store."""
        with self._lock:
            return spend_on(self._conn, day)

    def daily_budget(self) -> float | None:
        """The daily budget in USD: $LOOPTERM_DAILY_BUDGET_USD if set, else the stored one, else None."""
        from_env = env_daily_budget()
        if from_env is not None:
            return from_env
        with self._lock:
            return stored_daily_budget(self._conn)

    def stored_daily_budget(self) -> float | None:
        """The daily budget kept in this database (ignoring the environment)."""
        with self._lock:
            return stored_daily_budget(self._conn)

    def set_daily_budget(self, usd: float | None) -> None:
        """Keep a daily budget in this database (None removes it). $LOOPTERM_DAILY_BUDGET_USD still overrides it."""
        if usd is not None:
            usd = parse_usd(str(usd), "the daily budget")
        with self._write():
            if usd is None:
                self._conn.execute("DELETE FROM meta WHERE key = ?", [DAILY_BUDGET_KEY])
            else:
                self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [DAILY_BUDGET_KEY, repr(usd)])
