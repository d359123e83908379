"""Time to the first frame of the real `loopterm` in a real terminal (tmux), and to the first iteration row.

Each trial starts the installed console script in a fresh tmux session (140x42) with a fresh temporary
database and config folder, then reads the screen (`tmux capture-pane`) every ~20 ms:

  first frame     the first capture whose top line (the App's header) is not blank: what a person sees
                  after pressing enter (before it, the terminal shows the typed line or nothing);
  first row       the first capture showing iteration 1 in the timeline (the run has started and
                  committed an iteration).

  CPU used        user + system CPU seconds of the loopterm process when its first frame was seen
                  (/proc/PID/stat): what the first frame costs whatever the machine's load; on an idle
                  machine the first frame comes about this long after enter.

t0 is taken just before `tmux new-session` starts the command; the figures include tmux starting the
shell-less pane and the polling resolution (~20-40 ms under load). Cases: `loopterm` (no arguments: the
offline demo) and `loopterm run codefix`, each started once untimed first (module caches filled, as any
start after the first finds them). Prints the machine, os.getloadavg() before and after, and a markdown
table of median/min/max per case.

    python bench/first_frame.py [--repeat 5] [--timeout 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROW = re.compile(r"^\S*\s*▕?\s+1\s+\w+", re.MULTILINE)  # iteration 1's row in the timeline
CASES = {"loopterm": [], "loopterm run codefix": ["run", "codefix"]}
SIZE = ("140", "42")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def machine() -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return (f"{platform.machine()}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far (/proc), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trial(argv: list[str], timeout: float) -> tuple[float, float | None, float | None]:
    """(seconds to the first frame, seconds to iteration 1's row or None, CPU seconds the process had used at
    its first frame) for one fresh start."""
    loopterm = Path(sys.executable).parent / "loopterm"
    session = f"first-frame-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as d:
        env = {"LOOPTERM_DB": f"{d}/loopterm.db", "LOOPTERM_CONFIG_DIR": f"{d}/cfg",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        # As after `pip install`: compiled modules are cached (a sandbox may set PYTHONDONTWRITEBYTECODE, and
        # then every start compiles loopterm's ~90 modules again, ~0.15 s of CPU).
        command = " ".join(["env", "-u", "PYTHONDONTWRITEBYTECODE", *(f"{k}={v}" for k, v in env.items()),
                            str(loopterm), *argv])
        first: float | None = None
        row: float | None = None
        cpu: float | None = None
        t0 = time.perf_counter()
        try:
            tmux("new-session", "-d", "-s", session, "-x", SIZE[0], "-y", SIZE[1], "-c", d, command)
        except subprocess.CalledProcessError:  # the previous trial's server was still exiting: once more
            time.sleep(0.5)
            t0 = time.perf_counter()
            tmux("new-session", "-d", "-s", session, "-x", SIZE[0], "-y", SIZE[1], "-c", d, command)
        pid = int(tmux("list-panes", "-t", session, "-F", "#{pane_pid}").split()[0])  # `env` execs loopterm
        try:
            deadline = t0 + timeout
            while time.perf_counter() < deadline:
                try:
                    screen = tmux("capture-pane", "-p", "-t", session)
                except subprocess.CalledProcessError:  # the command ended (and its pane with it)
                    raise SystemExit(f"`loopterm {' '.join(argv)}` exited before its first iteration") from None
                now = time.perf_counter()
                lines = screen.splitlines()
                if first is None and lines and lines[0].strip():
                    first = now - t0
                    cpu = cpu_seconds(pid)
                if first is not None and ROW.search(screen):
                    row = now - t0
                    break
                time.sleep(0.02)
            if first is None:
                raise SystemExit(f"no frame within {timeout:g} s; the screen was:\n{screen}")
            return first, row, cpu
        finally:
            subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], capture_output=True)
            time.sleep(0.5)  # the App stops its engine and closes the store
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for iteration 1, per trial")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is not installed")
    before = load()
    results: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for name, argv in CASES.items():
        firsts, rows, cpus = [], [], []
        trial(argv, args.timeout)  # not counted: fills the module caches (__pycache__) as a first start would
        for i in range(args.repeat):
            first, row, cpu = trial(argv, args.timeout)
            firsts.append(first)
            if row is not None:
                rows.append(row)
            if cpu is not None:
                cpus.append(cpu)
            print(f"  {name} #{i + 1}: first frame {first:.2f} s (CPU {cpu if cpu is not None else float('nan'):.2f} s), "
                  f"first row {'-' if row is None else f'{row:.2f} s'}", file=sys.stderr, flush=True)
        results[name] = (firsts, rows, cpus)
    print(f"machine: {machine()}")
    print(f"load average (1/5/15 min): {before} before, {load()} after; {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| command | first frame, median (min-max) | CPU used by then, median (min-max) "
          "| first iteration row, median (min-max) | n |")
    print("|---|---|---|---|---|")
    for name, (firsts, rows, cpus) in results.items():
        print(f"| `{name}` | {stats(firsts)} | {stats(cpus) if cpus else '-'} | {stats(rows) if rows else 'none'} "
              f"| {len(firsts)} |")


if __name__ == "__main__":
    main()
