"""The act phase: the decided tool call, through the tool's precondition, a person's approval when the tool
(or shadow mode) asks for one, and the executor (idempotency key, durable result, exactly once)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopterm.core import runlog as log
from loopterm.core.approval_policy import Policy, decide
from loopterm.core import shadow as _shadow
from loopterm.core.control import Approve, Deny
from loopterm.core.decision import Decision
from loopterm.core.events import ApprovalNeeded
from loopterm.core.fold import policy_book
from loopterm.core.state import ToolRecord
from loopterm.core.termination import RunEnds, Status, TerminationReason
from loopterm.core.text import one_line
from loopterm.core.tools import Tool, idempotency_key

if TYPE_CHECKING:
    from loopterm.core.engine import Engine

REFUSED_BEFORE_RUNNING = "refused before it ran"  # a tool record's error when its precondition said no


async def act(engine: Engine, n: int, decision: Decision) -> tuple[ToolRecord | None, dict[str, Any] | None]:
    """(the tool's record, the iteration's tool_call) for the decision's action; (None, None) for none.

    In a shadow run nothing runs: a person's verdict on the proposal is the record (core/shadow.py)."""
    if decision.action is None:
        return None, None
    tool = engine.loop.tool(decision.action.tool)
    if tool is None:  # a decision recorded before a restart names a tool the loop (or its MCP server) no longer has
        instead = (f", or branch from iteration {n - 1} with `loopterm fork {engine.run_id} --at {n - 1}`"
                   if n > 1 else ", or start a new run")
        raise RunEnds(TerminationReason.FATAL_ERROR, (
            f"iteration {n}'s recorded decision calls tool {one_line(decision.action.tool, 100)!r}, which the "
            "loop no longer has (its file or an MCP server changed); restore it and `loopterm resume "
            f"{engine.run_id}`{instead}"))
    args = decision.action.args
    key = idempotency_key(engine.run_id, n, tool.name, args)
    refused = precondition(engine, tool, args)
    ask = (tool.needs_approval or engine.shadow) and refused is None
    verdict = await approval(engine, tool, args, n) if ask else None
    judged: log.ShadowVerdict | None = None
    if engine.shadow and verdict is not None:  # nothing runs: the person's verdict is the record
        judged = _shadow.judge(key, tool, args, engine.view.answers.get(key) or verdict, engine.loop.tool)
        engine.log(judged, n)
        record = _shadow.tool_record(n, judged)
    elif refused is not None:
        record = ToolRecord(iteration=n, tool=tool.name, args=args, ok=False, error=f"{REFUSED_BEFORE_RUNNING}: {refused}")
    elif isinstance(verdict, Deny):
        record = ToolRecord(iteration=n, tool=tool.name, args=args, ok=False,
                            error=verdict.reason if key in engine.view.decided_by
                            else f"denied by a person: {verdict.reason}")
    else:
        same = True  # the executor keys the call as `key` unless a person edited the arguments
        if isinstance(verdict, Approve) and verdict.args is not None:
            args, same = tool.validate_args(verdict.args), False
        record, key = await engine.executor.execute(tool, args, n, engine.workspace, key if same else None)
    call: dict[str, Any] = {"tool": tool.name, "args": args, "key": key}
    if refused is not None:
        call["refused"] = refused
    if verdict is not None:
        call["approval"] = verdict.kind
        if key in engine.view.decided_by:
            call["policy"] = engine.view.decided_by[key]
        if judged is not None:
            call["shadow"] = judged.verdict
    return record, call


def policies(engine: Engine) -> list[Policy]:
    """The approval policies in force for this run now: its own and its loop's, read afresh for each call (a
    revocation from another process applies at the next call). A journal that cannot find other runs' logs
    gives this run's own."""
    find = getattr(engine.journal, "policy_events", None)
    records = (find(run_id=engine.run_id, loop_ref=engine.run_record.loop_ref) if find is not None
               else engine.journal.events(engine.run_id))
    return [p for p in policy_book(records).values() if p.applies_to(engine.run_id)]


def by_policy(engine: Engine, key: str, tool: str, args: dict[str, Any], n: int) -> None:
    """Answer the call by the approval policy that covers it (deny wins), recording which; nothing if none does."""
    policy = decide(policies(engine), engine.run_id, tool, args)
    if policy is None:
        return
    verb = "approved" if policy.rule.effect == "approve" else "denied"
    why = f": {one_line(policy.rule.reason, 500)}" if policy.rule.reason else ""
    engine.log(log.PolicyDecided(key=key, policy=policy.id, policy_run=policy.run_id, effect=policy.rule.effect,
                                 tool=tool, args=args, reason=f"{verb} by policy {policy.id}{why}"), n)


def precondition(engine: Engine, tool: Tool, args: dict[str, Any]) -> str | None:
    """The tool's own check of a call before it runs; a check that raises refuses the call."""
    if tool.precondition is None:
        return None
    try:
        reason = tool.precondition(engine.state, args)
    except Exception as exc:  # noqa: BLE001 - a broken check must not let the call through
        return f"its precondition failed ({exc.__class__.__name__}: {one_line(str(exc), 200)})"
    return None if reason is None else one_line(str(reason), 1_000)


async def approval(engine: Engine, tool: Tool, args: dict[str, Any], n: int, *, asking: str | None = None
                   ) -> Approve | Deny:
    """A person's verdict on a call that needs approval; waits for it (or ends the run, waiting).

    The question stays pending in the log until a person answers it, whatever happens meanwhile."""
    key = idempotency_key(engine.run_id, n, tool.name, args)
    if key not in engine.view.answers and key not in engine.preanswered and not engine.shadow:
        by_policy(engine, key, tool.name, args, n)  # a person's standing answer, before asking them
    if key not in engine.view.answers and key not in engine.preanswered:
        if key not in engine.view.approvals:  # asked before a restart: still pending, not asked twice
            engine.log(log.ApprovalPending(key=key, tool=tool.name, args=args, shadow=engine.shadow), n)
        engine.emit(ApprovalNeeded(run_id=engine.run_id, n=n, key=key, tool=tool.name, args=args, shadow=engine.shadow))
        message = (f"shadow: the loop proposes tool {tool.name!r} (iteration {n}); nothing will run"
                   if engine.shadow else f"{asking or f'tool {tool.name!r} needs approval'} (iteration {n})")
        if not engine.wait_on_person:
            what = "agree, edit or deny" if engine.shadow else "approve or deny"
            raise RunEnds(TerminationReason.WAITING, f"{message}; {what} it from `loopterm watch {engine.run_id}`")
        engine.set_status(Status.ESCALATED, message)
        while key not in engine.view.answers and not engine.stop_requested:
            await engine.wait()
        if engine.stop_requested:
            raise RunEnds(TerminationReason.STOPPED, engine.stop_requested)
        engine.set_status(Status.RUNNING)
    verdict = engine.view.answers.get(key) or engine.preanswered[key]
    if isinstance(verdict, Approve) and verdict.tool not in (None, tool.name) and not engine.shadow:
        engine.steering.reject("approve", "only a shadow run records another tool; the call was denied")
        return Deny(key=key, reason=f"a person named another tool ({one_line(verdict.tool or '', 100)}) instead")
    if isinstance(verdict, Approve) and verdict.args is not None and not engine.shadow:  # shadow: judged as given
        try:
            tool.validate_args(verdict.args)
        except ValueError as exc:  # edited arguments that do not fit: refuse the edit, keep the model's
            engine.steering.reject("approve", str(exc))
            return Approve(key=key, reason=verdict.reason)
    return verdict
