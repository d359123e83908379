"""The daily budget: the gate every run goes through before it starts (or continues), wherever it starts.

The figure lives in the store (`Store.daily_budget()`: its `meta` table, overridden by
$LOOPTERM_DAILY_BUDGET_USD) and today's spend in its ledger (`Store.spend_on(day)`, store/ledger.py);
this module decides, through the `DailyLedger` protocol, so core never imports the store.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

from loopterm.core.errors import ConfigError
from loopterm.core.records import RunRecord
from loopterm.core.runlog import BudgetCapped
from loopterm.core.settings import env_name, settings

DAILY_BUDGET_ENV = env_name("daily_budget_usd")  # for messages; the value is read by settings()


class DailyLedger(Protocol):
    def daily_budget(self) -> float | None: ...

    def spend_on(self, day: str) -> float: ...

    def held_usd(self, exclude: str | None = None) -> float: ...

    def update_run(self, run_id: str, **fields: Any) -> None: ...

    def append_event(self, run_id: str, event: Any, iteration: int | None = None) -> Any: ...

    def get_run(self, run_id: str) -> RunRecord: ...


def local_day(at: float) -> str:
    """The local calendar date (YYYY-MM-DD) of a Unix time."""
    return time.strftime("%Y-%m-%d", time.localtime(at))


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
    """$LOOPTERM_DAILY_BUDGET_USD when set (an empty value counts as unset; a bad one is a one-line ConfigError)."""
    return settings().daily_budget_usd


def money(value: float) -> str:
    """Dollars as a person reads them: cents above $1, more digits below (scripted runs cost fractions of a cent)."""
    if abs(value) >= 1:
        return f"${value:,.2f}"
    digits = f"{value:.6f}".rstrip("0")
    return "$" + digits + "0" * max(0, 2 - len(digits.partition(".")[2]))


def check_daily_budget(
    store: DailyLedger | None, run_budget_usd: float | None, *, what: str = "this run's budget",
    lower: str | None = "--budget-usd", today: str | None = None, exclude: str | None = None,
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

    What active runs may still spend (their USD budgets' remainders) is held against the daily budget
    (store/reservations.py, which checks again in the transaction that creates a run); `exclude`: the run
    about to continue, whose own holding is not counted against it.
    """
    daily = store.daily_budget() if store is not None else env_daily_budget()
    if daily is None:
        return None
    day = today or local_day(time.time())
    spent = store.spend_on(day) if store is not None else 0.0
    holding = store.held_usd(exclude) if store is not None else 0.0
    remaining = max(0.0, daily - spent - holding)
    held = f" and {money(holding)} held by active runs" if holding > 0 else ""
    advice = "raise it with `loopterm budget --set-daily X`, or wait until tomorrow"
    if holding > 0:
        advice = "wait for active runs to end, " + advice
    if remaining <= 0 and (run_budget_usd is None or run_budget_usd > 0):
        what_is = "spent" if holding <= 0 else "spent or held"
        raise ConfigError(f"the daily budget is {what_is}: {money(spent)} of {money(daily)} used today ({day}){held}; "
                          f"{advice}")
    if run_budget_usd is None:
        return remaining
    if spent + holding + run_budget_usd > daily + 1e-12:
        lowering = f"pass a lower {lower} (at most {money(remaining)}), " if lower else ""
        raise ConfigError(
            f"{what} of {money(run_budget_usd)} on top of today's spend of {money(spent)}{held} would exceed the "
            f"daily budget of {money(daily)} ({money(remaining)} left today); {lowering}{advice}"
        )
    return run_budget_usd


def cap_run(store: DailyLedger, run: RunRecord, default_usd: float | None, *, what: str) -> tuple[RunRecord, float | None]:
    """The daily-budget gate for an existing run about to continue (a resume, a new branch).

    Checks what the run may still spend (its USD budget, else `default_usd`, less what it spent);
    refuses with a one-line ConfigError; gives an uncapped run what is left of today's budget as
    its USD budget (recorded with a `budget_capped` event). Returns the run as it now is, and the
    cap given (None: none).
    """
    usd = (run.budget or {}).get("usd", default_usd)
    cap = check_daily_budget(store, None if usd is None else max(0.0, usd - run.cost_usd), what=what, lower=None,
                             exclude=run.id)
    if cap is None or usd is not None:
        return run, None
    capped = {**(run.budget or {}), "usd": run.cost_usd + cap}
    store.update_run(run.id, budget=capped)
    store.append_event(run.id, BudgetCapped(usd=capped["usd"], why="daily budget"))
    return store.get_run(run.id), cap
