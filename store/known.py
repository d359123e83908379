"""What a Store knows is already in its file for the runs it commits, so an iteration's commit skips
statements that would change nothing: the INSERT OR IGNORE of prompt sections its run's earlier
iterations already stored (a system prompt, tool docs and the task repeat every iteration), and the
DELETE of an intent row that was never written (most iterations queue their reply and drop it unwritten).

It rests on two rules kept elsewhere: a run is committed by one process at a time and no one else
writes its intents (core/engine.py), and a blob goes only when no kept iteration references it, a
running run never being pruned (store/prune.py; prune here forgets what it removed). What is known
changes only after a commit succeeded, except an intent row written, which counts from the moment its
INSERT runs: if that transaction fails, one DELETE too many is harmless. The first commit of a run in a
Store reads its intent rows once (a process that died may have left one).
"""

from __future__ import annotations

from collections.abc import Iterable

RUNS_KEPT = 64  # runs remembered at once (a batch of parallel runs is well under this)
BLOBS_KEPT = 4_096  # section hashes remembered per run; past that, forgotten and learnt again


class Known:
    """Per run: the blob hashes its committed iterations reference, and the iterations that may
    have an intent row (None: not read yet, so any may)."""

    def __init__(self) -> None:
        self._blobs: dict[str, set[str]] = {}
        self._intents: dict[str, set[int]] = {}

    def unstored(self, run_id: str, new_blobs: dict[str, str]) -> list[tuple[str, str]]:
        """The blobs of `new_blobs` that may not be in the file yet."""
        known = self._blobs.get(run_id)
        if not known:
            return list(new_blobs.items())
        return [(digest, body) for digest, body in new_blobs.items() if digest not in known]

    def intent_may_exist(self, run_id: str, n: int) -> bool:
        ns = self._intents.get(run_id)
        return ns is None or n in ns

    def intents_read(self, run_id: str) -> bool:
        return run_id in self._intents

    def intent_written(self, run_id: str, n: int) -> None:
        ns = self._intents.get(run_id)
        if ns is not None:
            ns.add(n)

    def committed(self, run_id: str, n: int, blobs: Iterable[str], intents: Iterable[int] | None) -> None:
        """Iteration n of the run is committed, its intent row gone; `blobs`: the hashes it references;
        `intents`: the run's intent rows read inside that commit (its first in this Store), or None."""
        if run_id not in self._blobs and len(self._blobs) >= RUNS_KEPT:
            self._blobs.clear()
            self._intents.clear()
        known = self._blobs.setdefault(run_id, set())
        if len(known) > BLOBS_KEPT:
            known.clear()
        known.update(blobs)
        if intents is not None:
            self._intents[run_id] = set(intents)
        ns = self._intents.get(run_id)
        if ns is not None:
            ns.discard(n)

    def forget(self, run_id: str) -> None:
        """The run was removed (prune) or its rows may have changed behind this Store's back."""
        self._blobs.pop(run_id, None)
        self._intents.pop(run_id, None)
