"""How much of the built-in loops' input a provider's prefix cache could serve (issue 16).

Runs every built-in loop offline (its scripted model, `loopterm run NAME --headless --no-wait`,
at most --iterations iterations; they end earlier when they converge or wait for a person), reads
the prompts each iteration sent from the store, and counts, for each call, the tokens it shares with
the previous call of the same run from the start (o200k tokens, litellm's tokenizer for gpt-4o;
a message is "role\\ncontent\\n"). That common prefix is what a cache could serve, under:

  prefix      no minimum (the layout's upper bound)
  openai      implicit caching: prompts of >= 1024 tokens, the prefix served in 1024 + 128k steps
  anthropic   explicit caching at loopterm's breakpoint (the end of the system message): served when the
              marked prefix is unchanged since the previous call and >= 1024 tokens (Sonnet, Opus;
              Haiku needs 2048)

Shares are of all input tokens, first calls included (a run's first call is always a miss); the last two
columns are of the input of each run's second and later calls only.
`--rules N` also writes a .loopterm/RULES.md of about N characters, as a project with rules has.

    python bench/prompt_cache.py [--iterations 30] [--rules 4000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from loopterm.examples import BUILTIN_LOOPS  # noqa: E402
from loopterm.store import Store  # noqa: E402

MINIMUM = 1024
STEP = 128
RULE = ("- Keep functions short and named for what they do; a test for every behaviour change; no "
        "global state; errors say what to do next.\n")


def encode(text: str) -> list[int]:
    import litellm

    return list(litellm.encode(model="gpt-4o", text=text))


def serialize(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The prompt as one text, and where its system message ends (in characters)."""
    parts = [f"{m.get('role')}\n{m.get('content') or ''}\n" for m in messages]
    system_end = len(parts[0]) if messages and messages[0].get("role") == "system" else 0
    return "".join(parts), system_end


def common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def openai_served(shared: int, total: int) -> int:
    if total < MINIMUM or shared < MINIMUM:
        return 0
    return MINIMUM + (shared - MINIMUM) // STEP * STEP


def measure(prompts: list[list[dict[str, Any]]]) -> dict[str, int]:
    """Token counts for one run's calls, in order."""
    out = {"calls": 0, "input": 0, "later": 0, "prefix": 0, "openai": 0, "anthropic": 0, "over_minimum": 0}
    previous: tuple[list[int], list[int]] | None = None
    for messages in prompts:
        text, system_end = serialize(messages)
        tokens, system = encode(text), encode(text[:system_end])
        out["calls"] += 1
        out["input"] += len(tokens)
        out["over_minimum"] += len(tokens) >= MINIMUM
        if previous is not None:
            out["later"] += len(tokens)
            shared = common(previous[0], tokens)
            out["prefix"] += shared
            out["openai"] += openai_served(shared, len(tokens))
            if previous[1] == system and len(system) >= MINIMUM:
                out["anthropic"] += len(system)
        previous = (tokens, system)
    return out


def run_loop(name: str, folder: Path, iterations: int) -> list[tuple[str, list[list[dict[str, Any]]]]]:
    """(loop, prompts) of every run `loopterm run NAME` made (a planner's child runs included)."""
    db = folder / f"{name}.db"
    cli = [sys.executable, "-m", "loopterm.tui.cli", "run", name, "--headless", "--no-wait",
           "--max-iterations", str(iterations), "--db", str(db)]
    subprocess.run(cli, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=False)
    store = Store.open(db)
    try:
        return [(run.loop, [it.prompt for it in store.iterations(run.id)]) for run in store.list_runs()]
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--rules", type=int, default=0, help="write a RULES.md of about this many characters")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in BUILTIN_LOOPS:
            folder = Path(tmp) / name
            (folder / ".loopterm").mkdir(parents=True)
            if args.rules:
                (folder / ".loopterm" / "RULES.md").write_text(RULE * (args.rules // len(RULE) + 1))
            for loop, prompts in run_loop(name, folder, args.iterations):
                counts = measure(prompts)
                rows.append({"ran": name, "loop": loop, "iterations": len(prompts), **counts})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    total = {k: sum(r[k] for r in rows) for k in ("calls", "input", "later", "prefix", "openai", "anthropic",
                                                  "over_minimum")}
    print(f"{'ran':<12} {'run of':<12} {'iters':>5} {'tokens in':>9} {'>=1024':>6} {'prefix':>7} {'openai':>7} "
          f"{'anthropic':>9} {'(calls 2+: openai':>17} {'anthropic)':>10}")
    for r in [*rows, {"ran": "all", "loop": "", "iterations": total["calls"], **total}]:
        def share(key: str, of: str = "input", r: dict[str, Any] = r) -> str:
            return f"{r[key] / r[of]:.0%}" if r[of] else "-"

        print(f"{r['ran']:<12} {r['loop']:<12} {r['iterations']:>5} {r['input']:>9,} {r['over_minimum']:>6} "
              f"{share('prefix'):>7} {share('openai'):>7} {share('anthropic'):>9} "
              f"{share('openai', 'later'):>17} {share('anthropic', 'later'):>10}")


if __name__ == "__main__":
    main()
