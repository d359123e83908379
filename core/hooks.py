"""Optional concerns attached to an engine: each is a hook with a few moments to act at, so the loop itself
has no `if` for them. Long-term memory and MCP servers attach here; shadow mode is a property of the run
(its act phase judges instead of executing); child runs are a service tools call (core/children.py);
telemetry subscribes to the engine's events (core/telemetry.py)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from loopterm.core import runlog as log
from loopterm.core.secrets import redact
from loopterm.core.state import LoopState
from loopterm.core.termination import RunEnds, Status, TerminationReason
from loopterm.core.text import one_line

if TYPE_CHECKING:
    from loopterm.core.engine import Engine


class Hook:
    """The moments a hook may act at; each does nothing unless overridden."""

    def fresh(self, engine: Engine, state: LoopState) -> LoopState:
        """A new run's first state, before its first iteration."""
        return state

    async def started(self, engine: Engine) -> None:
        """The engine starts (or resumes) the run: before its first iteration."""

    def boundary(self, engine: Engine) -> None:
        """Between iterations; may end the run (raise RunEnds)."""

    def observed(self, engine: Engine, state: LoopState) -> LoopState:
        """The state after an iteration's observation, before its invariants are checked."""
        return state

    def finished(self, engine: Engine, status: Status) -> None:
        """The run ends (its end is recorded right after)."""

    async def closed(self, engine: Engine) -> None:
        """The engine lets go of the run, however it ended."""


def _norm(value: str) -> str:
    return " ".join(str(value).lower().split())


class LongTermMemory(Hook):
    """What earlier runs of the same loop left (core/memory.py): recalled into a new run's working memory,
    checked against what this run observes, consolidated when it ends."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory

    def fresh(self, engine: Engine, state: LoopState) -> LoopState:
        state.memory.retrieved = self._recorded(engine) if engine.executor.replaying else self._recall(engine, state.task)
        return state

    def _recorded(self, engine: Engine) -> list[str]:
        """A replay starts from what the recorded run recalled, not from memory as it is now."""
        recorded = engine.run_record.parent_run
        first = engine.journal.get_iteration(recorded, 1) if recorded else None
        return list(((first.state if first else {}).get("memory") or {}).get("retrieved") or [])

    def _recall(self, engine: Engine, query: str) -> list[str]:
        loop = engine.loop
        if loop.recall == 0:
            return []
        embed = None
        if loop.embedding_model:
            from loopterm.core.embedding import litellm_embedder

            embed = litellm_embedder(loop.embedding_model)
        try:
            items = self.memory.recall(loop.name, query, limit=loop.recall, embed=embed)
        except RuntimeError as exc:  # the embedding model failed: full-text recall still works
            engine.log(log.RecallDegraded(error=str(exc)))
            items = self.memory.recall(loop.name, query, limit=loop.recall)
        return [f"{i.key}: {one_line(i.value, 2_000)}" for i in items]

    def observed(self, engine: Engine, state: LoopState) -> LoopState:
        """A fact observed this run whose key long-term memory holds with another value is a contradiction."""
        known = state.memory.known
        if not known:
            return state
        remembered = {i.key: i.value for i in self.memory.memories(engine.loop.name)}
        found = list(state.memory.contradictions)
        for key, value in known.items():
            if key in remembered and _norm(remembered[key]) != _norm(value):
                line = f"{key}: observed {value!r}, long-term memory says {remembered[key]!r}"
                if line not in found:
                    found.append(line)
        if found != state.memory.contradictions:
            state.memory.contradictions = found
        return state

    def finished(self, engine: Engine, status: Status) -> None:
        """What a finished run leaves for later runs of the same loop."""
        if engine.executor.replaying or not engine.learn or engine.shadow:
            return  # a replay re-drives an old experience, a shadow run did nothing: neither teaches anything new
        if status not in (Status.CONVERGED, Status.TERMINATED, Status.ESCALATED):
            return
        loop, state = engine.loop, engine.state
        try:
            if loop.consolidate is not None:
                notes = loop.consolidate(state, status.value)
            elif status is Status.CONVERGED:
                flagged = {c.split(":", 1)[0] for c in state.memory.contradictions}
                notes = [(k, v, "fact") for k, v in state.memory.known.items() if k not in flagged]
                notes.append((f"outcome:{loop.name}:{hashlib.sha256(state.task.encode()).hexdigest()[:8]}",
                              f"converged in {state.iteration} iterations; last subgoal: "
                              f"{one_line(state.memory.subgoal, 200)}", "decision"))
            else:
                notes = []
            for key, value, kind in notes:
                self.memory.remember(loop.name, key, value, kind=kind, source_run=engine.run_id)
        except Exception as exc:  # noqa: BLE001 - a failing consolidation must not lose the run's end
            engine.log(log.ConsolidationFailed(error=one_line(redact(str(exc)), 300)))
            return
        if notes:
            engine.log(log.MemoryConsolidated(keys=[k for k, _, _ in notes]))


class McpServers(Hook):
    """The loop's MCP servers (core/mcp_tools.py): started with the run, their tools joining the loop's for
    it; one that dies ends the run (resumable) before the model is asked again; stopped with the run."""

    def __init__(self) -> None:
        self.tools: Any = None

    async def started(self, engine: Engine) -> None:
        """One that cannot start ends the run before its first iteration (a resume tries again)."""
        from loopterm.core.mcp_tools import McpStartError, McpTools

        self.tools = McpTools(engine.loop.mcp_servers, engine.workspace)
        try:
            tools = await self.tools.start(taken={t.name for t in engine.loop.tools})
        except McpStartError as exc:
            raise RunEnds(TerminationReason.FATAL_ERROR, str(exc)) from None
        if engine.executor.replaying:  # a replay never fires a side effect the recording does not have
            from loopterm.core.tools import guard_tools

            tools = guard_tools(tools)
        engine.loop = engine.loop.model_copy(update={"tools": [*engine.loop.tools, *tools]})
        engine.log(log.McpConnected(servers=[s.name for s in engine.loop.mcp_servers], tools=[t.name for t in tools]))

    def boundary(self, engine: Engine) -> None:
        failure = self.tools.check() if self.tools is not None else None
        if failure:
            n = engine.state.iteration + 1
            raise RunEnds(TerminationReason.FATAL_ERROR,
                          f"{failure}; `loopterm resume {engine.run_id}` reconnects and continues from iteration {n}")

    async def closed(self, engine: Engine) -> None:
        if self.tools is not None:
            tools, self.tools = self.tools, None
            await tools.close()


class ControlFeed(Hook):
    """Wakes the engine the moment another process sends this run a command (PostgreSQL's LISTEN/NOTIFY,
    through the journal's `subscribe`), so a pause from `watch` on another host takes effect at once
    rather than at the next poll. The poll stays as the fallback (and is all SQLite has)."""

    def __init__(self) -> None:
        self._unsubscribe: Any = None

    async def started(self, engine: Engine) -> None:
        import asyncio

        loop = asyncio.get_running_loop()

        def heard(kind: str, run_id: str) -> None:  # on the journal's listening thread
            if kind == "command" and run_id == engine.run_id and not loop.is_closed():
                loop.call_soon_threadsafe(engine.wake)

        self._unsubscribe = engine.journal.subscribe(heard)

    async def closed(self, engine: Engine) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
