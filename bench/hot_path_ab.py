"""hot_path.py for several git revisions, interleaved, so each lever is measured against the same machine.

    python bench/hot_path_ab.py main 04b1c1c HEAD [--workloads list,nested,chat] [--reps 3] [--iterations 2000]

On a shared machine the load swings as much as a lever moves the figure (3-10%), so one revision's run
an hour after another's says little. Each revision's core/ and store/ (with tui/, themes/, examples/) is
taken with `git archive` into a temporary `loopterm` package put first on PYTHONPATH; then, rep by rep and
workload by workload, hot_path.py runs once per revision (on /dev/shm by default: the code's cost, not
the disk's). Printed: the median over the reps of each figure hot_path.py gives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGES = ["core", "store", "tui", "themes", "examples"]
SHOWN = ["early_ms", "late_ms", "mean_ms", "cpu_ms", "bytes_per_iteration"]


def tree(rev: str, root: Path) -> Path:
    """`rev`'s package as an importable `loopterm` under root/<rev>."""
    top = root / rev.replace("/", "_")
    package = top / "loopterm"
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *PACKAGES], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive, check=True)
    (package / "__init__.py").touch()
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--workloads", default="list,nested,chat")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {rev: tree(rev, Path(tmp)) for rev in args.revs}
        for _ in range(args.reps):
            for workload in args.workloads.split(","):
                for rev, path in paths.items():
                    env = dict(os.environ, PYTHONPATH=str(path), LITELLM_LOCAL_MODEL_COST_MAP="True")
                    out = subprocess.run(
                        [sys.executable, str(HERE / "hot_path.py"), "--workload", workload, "--iterations",
                         str(args.iterations), "--dir", args.dir, "--json"],
                        capture_output=True, text=True, env=env, check=True,
                    ).stdout
                    results.setdefault((workload, rev), []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"| workload | revision | {' | '.join(SHOWN)} |")
    print(f"|---|---|{'---|' * len(SHOWN)}")
    for (workload, rev), runs in results.items():
        cells = [f"{statistics.median(run[key] for run in runs):.3f}" for key in SHOWN]
        print(f"| {workload} | {rev} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
