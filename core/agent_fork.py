"""Time travel for an agent loop: a branch's files restored from git, and what its agent is told.

A branch at iteration N gets the workspace as it was after turn N (a clone of the repository of the run
that made that turn, checked out at its commit). The agent cannot be rewound: ACP has no way back to an
earlier message. So the branch's agent starts from a fork of the parent's session when the parent's
session ended at N (the agent's own session/fork, where it offers one), else from a new session whose
first prompt summarises turns 1..N (core/agent_prompt.py: seed_summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopterm.core import agent_git
from loopterm.core.acp_turn import AgentTurn
from loopterm.core.fold import fold
from loopterm.core.records import RunRecord


def _floor(run: RunRecord) -> int:
    """The iterations before this one's own: a fork's parent's, up to its fork point."""
    return run.fork_iteration or 0 if run.origin == "fork" and run.parent_run else 0


def lineage_turns(history: Any, run_id: str, upto: int) -> dict[int, tuple[RunRecord, AgentTurn]]:
    """The agent turns iterations 1..upto of `run_id` stand on, each with the run that made it (ancestors'
    turns up to each fork point, then the run's own)."""
    lineage: list[RunRecord] = history.lineage(run_id)
    turns: dict[int, tuple[RunRecord, AgentTurn]] = {}
    ceiling = upto
    for run in reversed(lineage):
        floor = _floor(run)
        for n, turn in fold(history.events(run.id)).agent_turns.items():
            if floor < n <= ceiling and n not in turns:
                turns[n] = (run, turn)
        ceiling = min(ceiling, floor)
        if ceiling == 0:
            break
    return dict(sorted(turns.items()))


async def restore_branch(history: Any, branch: RunRecord) -> str:
    """The branch's workspace as it was after its fork point; returns the commit it is at."""
    assert branch.parent_run is not None and branch.fork_iteration is not None
    turns = {n: pair for n, pair in lineage_turns(history, branch.parent_run, branch.fork_iteration).items()
             if pair[1].commit}
    if turns:
        owner, turn = turns[max(turns)]
        source, commit = Path(owner.workspace), str(turn.commit)
    else:  # no turn committed before the fork point: the workspace before the first turn
        source = Path(history.lineage(branch.parent_run)[0].workspace)
        commit = await agent_git.baseline(source)
    await agent_git.restore(source, Path(branch.workspace), commit)
    return commit


def shell_calls_after(history: Any, run_id: str, at: int) -> list[tuple[str, int, str]]:
    """(run, iteration, command) of the shell commands the agent ran itself after `at` in this run's lineage:
    what a branch's agent may run again. loopterm never re-runs them (a branch restores files from git and
    a replay only plays the record), but the agent may, so a person is asked to look before branching."""
    found: list[tuple[str, int, str]] = []
    for run in history.lineage(run_id):
        for n, turn in fold(history.events(run.id)).agent_turns.items():
            if n > at:
                found.extend((run.id, n, call.title or call.raw_input or call.id)
                             for call in turn.tool_calls if call.kind == "execute")
    return found
