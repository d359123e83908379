"""How long `loopterm --help` takes, against a bare `python -c pass` in the same run.

    python bench/startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def timed(argv: list[str], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    bare = timed([sys.executable, "-c", "pass"], args.repeat)
    help_ = timed([sys.executable, "-m", "loopterm.tui.cli", "--help"], args.repeat)
    litellm = timed([sys.executable, "-c", "import os; os.environ['LITELLM_LOCAL_MODEL_COST_MAP']='True'; import litellm"], 3)
    print("| command | median s |")
    print("|---|---|")
    print(f"| python -c pass | {bare:.3f} |")
    print(f"| loopterm --help | {help_:.3f} |")
    print(f"| python -c 'import litellm' (what --help avoids) | {litellm:.3f} |")


if __name__ == "__main__":
    main()
