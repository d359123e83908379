"""An ACP coding agent as a loop's actor: one iteration is one prompt turn, supervised like any tool call.

The agent is the loop's one tool (`agent`, a side effect confined to the run's workspace). The engine's
phases stay as they are: decide builds the prompt (core/agent_prompt.py), act runs the turn through the
executor (journalled before it starts, so a crash never re-runs it silently), verify runs the gates on
the committed workspace, and the invariants see the turn's changed paths in the state (`AgentState`).
`AgentActor` is the hook that owns the agent's process for the run: it opens the session (new, loaded
after a restart, forked or seeded on a branch), turns the agent's permission requests into loopterm
approvals, cancels a turn on pause or stop, and records the whole turn with its iteration.
"""

from __future__ import annotations

import asyncio
import difflib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopterm.core import agent_git
from loopterm.core import runlog as log
from loopterm.core.acp_turn import AgentPermission, AgentToolCall, AgentTurn, AgentUsage
from loopterm.core.agent_fork import lineage_turns
from loopterm.core.agent_loop import AgentState, AgentTurnFailed, permission_tool
from loopterm.core.agent_prompt import seed_summary
from loopterm.core.agent_spec import AgentSpec
from loopterm.core.budget import Spend, over_budget
from loopterm.core.control import Approve
from loopterm.core.events import AgentTurnProgress
from loopterm.core.fold import fold
from loopterm.core.hooks import Hook
from loopterm.core.policies import budget_message, spent
from loopterm.core.secrets import redact, redact_tree
from loopterm.core.state import LoopState
from loopterm.core.termination import RunEnds, TerminationReason
from loopterm.core.text import one_line
from loopterm.core.tools import idempotency_key

if TYPE_CHECKING:
    from loopterm.core.acp_client import AcpSession
    from loopterm.core.engine import Engine

PERMISSION_DIFF_CAP = 20_000
PROGRESS_EVERY_S = 0.1


def unified(call: AgentToolCall) -> str:
    """The call's diffs as one unified diff (what a person approves)."""
    parts: list[str] = []
    for d in call.diffs:
        old = (d.old_text or "").splitlines(keepends=True)
        parts.extend(difflib.unified_diff(old, d.new_text.splitlines(keepends=True),
                                          "/dev/null" if d.old_text is None else f"a/{d.path}", f"b/{d.path}"))
    text = "".join(parts)
    return text if len(text) <= PERMISSION_DIFF_CAP else text[:PERMISSION_DIFF_CAP] + "\n… (cut)\n"


class AgentActor(Hook):
    """The run's agent process and session; made by the engine for a loop with `agent`."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.session: AcpSession | None = None
        self.engine: Engine | None = None
        self.seed = ""  # a branch's summary of its parent's turns, sent with its first prompt
        self.turn_n = 0
        self.last: AgentTurn | None = None
        self.failed: str | None = None  # the last turn's error, which ends the run at the next boundary

    @property
    def workspace(self) -> Path:
        assert self.engine is not None
        return self.engine.workspace

    async def started(self, engine: Engine) -> None:
        self.engine = engine
        engine.executor.services["agent"] = self
        try:
            await agent_git.ensure_repo(engine.workspace)
        except Exception as exc:  # noqa: BLE001 - git missing or the workspace unusable: one line, resumable
            raise RunEnds(TerminationReason.FATAL_ERROR, f"the agent's workspace: {exc}") from None

    async def _open(self) -> AcpSession:
        """The session for the next turn: the run's own (loaded in this process if an earlier one ran it),
        else on a branch the parent's forked where the agent can fork at that point, else a new one."""
        from loopterm.core.acp_client import AcpSession, AgentStartError

        engine = self.engine
        assert engine is not None
        turns = engine.view.agent_turns
        stderr = engine.workspace.parent / f"{engine.run_id}.agent-stderr.log"
        own = max(turns) if turns else None
        try:
            if own is not None and turns[own].session_id:
                try:
                    return await AcpSession.open(self.spec, engine.workspace, permission=self.permission, stderr=stderr,
                                                 load_session_id=turns[own].session_id)
                except AgentStartError:
                    raise
                except Exception:  # noqa: BLE001 - the agent cannot load it: a new session, told what happened
                    self.seed = seed_summary(turns, own, engine.run_id)
            elif engine.view.forked is not None:
                forked = await self._fork(engine)
                if forked is not None:
                    return forked
            return await AcpSession.open(self.spec, engine.workspace, permission=self.permission, stderr=stderr)
        except AgentStartError as exc:
            raise RunEnds(TerminationReason.FATAL_ERROR,
                          f"{exc}; fix the agent's command and `loopterm resume {engine.run_id}`") from None

    async def _fork(self, engine: Engine) -> AcpSession | None:
        from loopterm.core.acp_client import AcpSession

        fork = engine.view.forked
        assert fork is not None
        made = lineage_turns(engine.journal, fork.parent, fork.at)
        parent_last = max(fold(engine.journal.events(fork.parent)).agent_turns, default=0)
        turn = made[fork.at][1] if fork.at in made else None
        if self.spec.use_fork and turn is not None and turn.session_id and fork.at == parent_last:
            try:  # the parent's session ends at the fork point: a fork of it is exactly the agent at `at`
                stderr = engine.workspace.parent / f"{engine.run_id}.agent-stderr.log"
                return await AcpSession.open(self.spec, engine.workspace, permission=self.permission, stderr=stderr,
                                             fork_session_id=turn.session_id)
            except Exception:  # noqa: BLE001 - the agent cannot fork: seeded below
                pass
        self.seed = seed_summary({n: t for n, (_, t) in made.items()}, fork.at, fork.parent)
        return None

    async def turn(self, n: int, prompt: str) -> str:
        """One prompt turn, committed; the tool's output is the agent's reply."""
        engine = self.engine
        assert engine is not None
        if self.session is None or not self.session.alive:
            self.session = await self._open()
        session = self.session
        text = f"{prompt}\n\n{self.seed}" if self.seed else prompt  # the prompt's first line names the iteration
        seeded = bool(self.seed)
        self.seed = ""
        self.turn_n = n
        base = await agent_git.head(engine.workspace)
        start_cost = engine.spend.cost_usd
        watcher = asyncio.create_task(self._watch(session))

        def over(usage: AgentUsage) -> str | None:
            pending = Spend(tokens_in=engine.spend.tokens_in + usage.tokens_in,
                            tokens_out=engine.spend.tokens_out + usage.tokens_out,
                            cost_usd=start_cost + usage.cost_usd, elapsed_s=engine.spend.elapsed_s)
            reason = over_budget(engine.budget, spent(engine, pending))
            return budget_message(engine, reason) if reason else None

        last_shown = 0.0

        def progress(turn: AgentTurn) -> None:  # at most ~10 a second: a screen, not a log
            nonlocal last_shown
            now = time.monotonic()
            if now - last_shown >= PROGRESS_EVERY_S:
                last_shown = now
                shown = AgentTurn.model_validate(redact_tree(turn.model_dump(mode="json")))  # a screen: no keys
                engine.emit(AgentTurnProgress(run_id=engine.run_id, n=n, turn=shown))

        try:
            record = await session.prompt(text, on_update=progress, over_budget=over)
        finally:
            watcher.cancel()
        if seeded:
            record.session_origin = "seeded"
        record.base_commit = base
        try:
            message = f"loopterm: run {engine.run_id} iteration {n} ({record.stop_reason or record.ended_by})"
            record.commit, record.changed_paths, record.diff = await agent_git.commit_turn(engine.workspace, base,
                                                                                           message)
        except Exception as exc:  # noqa: BLE001 - recorded; the gates still see the files as they are
            record.note = (record.note + "; " if record.note else "") + f"not committed: {exc}"
        # What the agent streamed is untrusted and may echo a key (`env`, a config file): redacted as a model's
        # reply is, before it is recorded or shown.
        record = AgentTurn.model_validate(redact_tree(record.model_dump(mode="json")))
        self.last = record
        self.failed = record.note if record.ended_by == "error" else None
        engine.pending_events.setdefault(n, []).append(log.AgentTurnRecorded(turn=record))
        u = record.usage
        engine.reported[n] = (Spend(tokens_in=u.tokens_in, tokens_out=u.tokens_out, cost_usd=u.cost_usd,
                                    tokens_cached=u.tokens_cached), (record.ended_at - record.started_at) * 1000)
        reply = redact(record.message.strip())
        if record.ended_by != "agent" and record.ended_by != "person":
            raise AgentTurnFailed(f"{record.summary()}" + (f"\nthe agent said: {reply[:2_000]}" if reply else ""))
        return f"{record.summary()}\n{reply}".rstrip()  # the first line is what `show` lists as the action

    async def _watch(self, session: AcpSession) -> None:
        """A pause or stop asked for during the turn cancels it (the agent ends it at once, by the protocol)."""
        engine = self.engine
        assert engine is not None
        while True:
            await engine.wait()
            if engine.stop_requested or engine.paused:
                why = "stopped by a person" if engine.stop_requested else "paused by a person"
                await session.cancel("person", why)
                return

    async def permission(self, call: AgentToolCall, offered: list[str]) -> AgentPermission:
        """An agent's permission request, through loopterm's approvals: paths first, then a policy, then a
        person. Only ever allow_once or reject_once, so loopterm sees every call."""
        from loopterm.core.acting import approval, by_policy

        engine = self.engine
        assert engine is not None
        n = self.turn_n
        paths = list(dict.fromkeys([*call.locations, *(d.path for d in call.diffs)]))
        seen = {"tool_call_id": call.id, "title": call.title, "kind": call.kind, "paths": paths, "offered": offered}
        outside = [p for p in paths if not self.spec.allows(p)]
        if outside:
            return AgentPermission(**seen, outcome="reject_once", decided_by="paths",
                                   reason=f"outside the paths the agent may change ({', '.join(self.spec.paths)}): "
                                          f"{', '.join(outside[:5])}")
        # An agent may send a write's new text without the old (Claude Code does): the old side is the file.
        call = call.model_copy(update={"diffs": [d if d.old_text is not None else
                                                 d.model_copy(update={"old_text": self._on_disk(d.path)})
                                                 for d in call.diffs]})
        # Not the agent's name: a replay's recorded agent asks the same question under the same key.
        args: dict[str, Any] = {"title": redact(call.title), "kind": call.kind, "paths": paths,
                                "diff": redact(unified(call))}
        gate = permission_tool()
        key = idempotency_key(engine.run_id, n, gate.name, args)
        if not engine.wait_on_person and key not in engine.view.answers and key not in engine.preanswered:
            by_policy(engine, key, gate.name, args, n)
            if key not in engine.view.answers:  # nobody to ask mid-turn: refused, the agent told so
                return AgentPermission(**seen, outcome="reject_once", decided_by="headless", key=key,
                                       reason="no person to ask (headless) and no approval policy covers it")
        try:
            verdict = await approval(engine, gate, args, n,
                                     asking=f"the agent asks permission: {one_line(args['title'] or call.kind, 80)}")
        except RunEnds as ends:  # stopped while waiting: the watcher cancels the turn
            return AgentPermission(**seen, outcome="cancelled", decided_by="stopped", key=key, reason=ends.message)
        who = "policy" if key in engine.view.decided_by else "person"
        allowed = isinstance(verdict, Approve)
        return AgentPermission(**seen, outcome="allow_once" if allowed else "reject_once", decided_by=who, key=key,
                               reason=verdict.reason or "")

    def _on_disk(self, path: str) -> str | None:
        """A workspace file's text as it is now (None: not a file there, outside the workspace, or not text)."""
        root = self.workspace.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file() or target.stat().st_size > 1_000_000:
            return None
        try:
            return target.read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def boundary(self, engine: Engine) -> None:
        """An agent that answered its prompt with an error (no key, a broken install) ends the run, resumable:
        prompting it again would only repeat the error."""
        failed, self.failed = self.failed, None
        if failed is not None:
            raise RunEnds(TerminationReason.FATAL_ERROR, f"{failed}; fix the agent (a key it needs goes in the "
                          f"loop's env_from) and `loopterm resume {engine.run_id}`")

    def observed(self, engine: Engine, state: LoopState) -> LoopState:
        turn, self.last = self.last, None
        if turn is None or not isinstance(state, AgentState):
            return state
        return state.model_copy(update={"changed_paths": turn.changed_paths, "commit": turn.commit,
                                        "session_id": turn.session_id, "stop_reason": turn.stop_reason,
                                        "ended_by": turn.ended_by})

    async def closed(self, engine: Engine) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()
