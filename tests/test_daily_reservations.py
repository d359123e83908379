"""The daily budget holds across processes: what active runs may still spend is held against it, and a new
run is checked in the transaction that creates it (store/reservations.py), on both backends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from loopterm.core.daily_budget import check_daily_budget, local_day
from loopterm.core.errors import ConfigError
from loopterm.store import Store
from tests.test_store import make_run


@pytest.fixture
def store(store_target: str | Path) -> Store:
    s = Store.open(store_target)
    s.set_daily_budget(1.0)
    yield s
    s.close()


def budgeted(run_id: str, usd: float | None, status: str = "created"):
    now = time.time()
    return make_run(run_id, budget={} if usd is None else {"usd": usd}, status=status, created_at=now, updated_at=now)


def test_an_active_run_holds_what_its_budget_has_left(store: Store) -> None:
    store.create_run(budgeted("a", 0.6))
    with pytest.raises(ConfigError) as refused:
        store.create_run(budgeted("b", 0.6))
    message = str(refused.value)
    assert "\n" not in message and "$0.60 held by 1 active run" in message and "$0.40 left" in message
    assert "b" not in {r.id for r in store.list_runs()}  # nothing of it was written
    store.create_run(budgeted("b", 0.4))  # what is left fits exactly
    # The gate every command goes through says the same before creating anything.
    with pytest.raises(ConfigError, match="spent or held"):
        check_daily_budget(store, None)
    # A run that spends holds only what it has left; one that ends holds nothing.
    store.update_run("a", cost_usd=0.25)
    assert store.held_usd() == pytest.approx(0.35 + 0.4)
    with pytest.raises(ConfigError, match=r"\$0.25 of \$1.00 used today .* and \$0.75 held by active runs"):
        check_daily_budget(store, None)  # spent 0.25, held 0.35 + 0.40: nothing left
    store.update_run("a", status="converged")
    assert store.held_usd() == pytest.approx(0.4)
    assert check_daily_budget(store, None) == pytest.approx(1.0 - 0.25 - 0.4)
    # A run about to continue is not held against itself; an escalated run still holds.
    store.update_run("b", status="escalated")
    assert store.held_usd(exclude="b") == 0 and store.held_usd() == pytest.approx(0.4)
    assert check_daily_budget(store, 0.4, exclude="b", today=local_day(time.time())) == 0.4


def test_a_record_without_a_usd_budget_is_not_checked_and_holds_nothing(store: Store) -> None:
    store.set_daily_budget(0.0)  # the daemon records a refused firing as a run that never starts
    store.create_run(budgeted("refused", None))
    assert store.held_usd() == 0


def test_concurrent_creations_from_separate_connections_never_exceed_it(store_target: str | Path, store: Store) -> None:
    """Eight processes' worth of connections each start a run of $0.30 under a daily budget of $1.00 at
    the same moment: exactly three fit, whatever the interleaving."""
    stores = [Store.open(store_target) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def start(i: int, s: Store) -> None:
        barrier.wait()
        try:
            s.create_run(budgeted(f"r{i}", 0.3))
            outcomes.append("created")
        except ConfigError:
            outcomes.append("refused")

    threads = [threading.Thread(target=start, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    assert store.held_usd() == pytest.approx(0.9)
