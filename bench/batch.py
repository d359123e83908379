"""Wall time of the 8 codefix cases (examples/codefix/cases8.json) at --parallel 1, 2, 4, 8.

    python bench/batch.py [--repeat 3] [--parallel 1 2 4 8]

Each case converges in one iteration: a scripted model reply after a 0.3 s delay (standing in
for a provider's latency), a write_file in the run's own git worktree, then the compile and
pytest gates (two subprocesses). One process, one event loop, a fresh store per batch; litellm is
imported and the scripts registered before the clock starts. Worktree set-up and clean-up are
inside the measured time. Set PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 to keep the dev environment's
pytest plugins out of the gate (they cost about 2 s of CPU per pytest start here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from loopterm.core.batch import check_cases, run_cases  # noqa: E402
from loopterm.core.cases import load_cases  # noqa: E402
from loopterm.core.loader import load_loop  # noqa: E402
from loopterm.store import Store  # noqa: E402

CASES = Path(__file__).resolve().parent.parent / "examples" / "codefix" / "cases8.json"


def batch(parallel: int) -> tuple[float, float, int]:
    """(batch wall s, median case wall s, converged) for one batch in a fresh store."""
    loop, ref = load_loop("codefix")
    cases = load_cases(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "loopterm.db")
        started = time.perf_counter()
        results = asyncio.run(run_cases(loop, store, cases, parallel=parallel, workspace_root=Path(tmp) / "workspaces",
                                        loop_ref=ref))
        wall = time.perf_counter() - started
        store.close()
    return wall, statistics.median(r.elapsed_s for r in results), sum(r.converged for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    loop, _ = load_loop("codefix")
    check_cases(loop, load_cases(CASES))  # litellm import and script registration, outside the clock
    autoload = "off" if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else "on"
    print(f"pytest plugin autoload in the gates: {autoload}; {os.cpu_count()} cores; Python {sys.version.split()[0]}")
    print("| --parallel | batch wall s (median) | per case s (median) | converged | speed-up vs 1 |")
    print("|---|---|---|---|---|")
    base = None
    for k in args.parallel:
        runs = [batch(k) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        case = statistics.median(r[1] for r in runs)
        converged = min(r[2] for r in runs)
        base = base or wall
        print(f"| {k} | {wall:.2f} | {case:.2f} | {converged}/8 | {base / wall:.2f}x |")


if __name__ == "__main__":
    main()
