"""The decide phase: ask the maker's model for a decision, with a bounded repair for invalid replies and
a pruned prompt when it does not fit the context window; the budget is checked before every call.

The decision is asked for in the iteration's mode (core/decision_modes.py: the provider's own tool
call, a JSON-schema reply or JSON text); whatever the mode, a reply that is not a valid decision gets
the same bounded repair, told exactly what was wrong."""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING, Any

from loopterm.core import prompt as _prompt
from loopterm.core import runlog as log
from loopterm.core.budget import Spend, over_budget
from loopterm.core.decision import DecisionError
from loopterm.core.decision_modes import choose_mode, raw_reply, read_decision, request_params
from loopterm.core.errors import ErrorKind, ModelError
from loopterm.core.events import ModelRetry
from loopterm.core.agent_prompt import agent_intent
from loopterm.core.policies import budget_message, check_budget, spent
from loopterm.core.prompt import read_rules, repair_messages
from loopterm.core.records import Intent
from loopterm.core.secrets import redact, redact_tree, secrets_known
from loopterm.core.termination import RunEnds, TerminationReason

if TYPE_CHECKING:
    from loopterm.core.engine import Engine

MAX_PRUNES = 2  # a prompt the context window refuses is pruned (to half, then a quarter) at most this often


def build_messages(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The prompt (core/prompt.py), redacted as it is built: a key in the goal, RULES.md or a system
    prompt is neither sent to the model nor journalled, and a replay compares like with like."""
    return redact_tree(_prompt.build_messages(*args, **kwargs))


async def decide(engine: Engine, n: int, started: float) -> Intent:
    """Ask the model, with a bounded repair for invalid replies; budget-checked before every call.

    A prompt the model's context window refuses is pruned harder (half the token budget, then a
    quarter) and asked again, at most twice, each time in the event log. A call that still fails
    ends the run with one line; a provider that is down (retries exhausted, circuit open) leaves it
    resumable from this iteration, and what this iteration already paid for counts.
    """
    from loopterm.core.prompt import prompt_tokens

    loop = engine.loop
    if loop.agent is not None:  # the actor is a coding agent: no model decides (core/agent_prompt.py)
        check_budget(engine)
        return agent_intent(engine, n, started)
    rules = read_rules(engine.workdir)
    client = engine.client
    model = str(getattr(client, "model", "") or engine.run_record.model)
    mode = choose_mode(model, loop.decision_mode, n, [t.name for t in loop.tools]) if takes_params(client) else "text"
    # Redacted as the prompt is: a key in a tool's description is not sent.
    params = redact_tree(request_params(mode, loop.tools, model))
    extra = {"params": params} if params else {}  # a text-mode call is the call it always was
    counted = {"tools": params["tools"]} if "tools" in params else {}  # the functions are input tokens too

    def prompt(budget: int | None = None) -> list[dict[str, Any]]:
        return build_messages(
            loop, engine.state, rules=rules, relaxed=engine.relaxed, strategy_note=engine.strategy_note,
            max_iterations=engine.max_iterations, token_budget=budget,
            system_prompt=engine.strategy.system_prompt if engine.strategy is not None else None,
            decision_mode=mode,
        )

    known = secrets_known()
    base = prompt()
    tail: list[dict[str, Any]] = []  # a repair's turns, after the prompt
    budget, pruned = loop.prompt_token_budget, 0
    call_index, repairs = 0, 0
    tokens_in = tokens_out = cached = 0
    cost = latency = 0.0
    while True:
        messages = [*base, *tail]
        projected = client.estimate(messages, loop.max_output_tokens, **counted)
        caps = engine.budget
        if caps.tokens is not None or caps.usd is not None or caps.wall_seconds is not None:  # else nothing to add up
            run = engine.spend  # `pending` replaces it when over budget
            pending = Spend(tokens_in=run.tokens_in + tokens_in, tokens_out=run.tokens_out + tokens_out,
                            cost_usd=run.cost_usd + cost, elapsed_s=run.elapsed_s, tokens_cached=run.tokens_cached + cached)
            reason = over_budget(caps, spent(engine, pending), *projected)
            if reason:
                engine.spend = pending  # a repair that was paid for still counts
                raise RunEnds(TerminationReason(reason), budget_message(engine, reason, projected))
        if getattr(client, "temperature", None) is not None:
            client.temperature = engine.temperature
        try:
            reply = await client.complete(messages, iteration=n, call_index=call_index, **extra)
        except ModelError as exc:
            call_index += exc.calls
            if exc.code == "context_window" and pruned < MAX_PRUNES:
                before = prompt_tokens(base)
                shorter, smaller = base, budget
                while smaller > 256 and prompt_tokens(shorter) >= before:
                    smaller = max(256, smaller // 2)
                    shorter = prompt(smaller)
                if prompt_tokens(shorter) < before:
                    pruned += 1
                    base, budget = shorter, smaller
                    note = f"the prompt does not fit the context window; pruned to {budget} tokens and asked again"
                    engine.log(log.PromptPruned(error=str(exc), retry=pruned, token_budget=budget,
                                                tokens_before=before, tokens_after=prompt_tokens(base)), n)
                    engine.emit(ModelRetry(run_id=engine.run_id, n=n, attempt=pruned, error=note, delay_s=0.0))
                    continue
            engine.spend.add(tokens_in, tokens_out, cost, cached)  # replies this iteration already paid for
            raise RunEnds(TerminationReason.FATAL_ERROR, model_failure(engine, exc, n, pruned, base)) from None
        call_index += max(1, reply.calls)
        tokens_in += reply.tokens_in
        cached += reply.tokens_cached
        tokens_out += reply.tokens_out
        cost += reply.cost_usd
        latency += reply.latency_ms
        raw = raw_reply(mode, reply.text, getattr(reply, "tool_calls", None) or [])
        try:
            decision = read_decision(mode, raw, loop.tools)
            if decision.action is not None:
                tool = loop.tool(decision.action.tool)
                assert tool is not None
                try:
                    decision.action.args = tool.validate_args(decision.action.args)
                except ValueError as exc:
                    raise DecisionError(str(exc)) from None
        except DecisionError as exc:
            engine.log(log.InvalidReply(error=redact(str(exc)), repair=repairs + 1, reply=redact(raw)[:2_000]), n)
            if repairs >= loop.max_repairs:
                engine.spend.add(tokens_in, tokens_out, cost, cached)
                raise RunEnds(
                    TerminationReason.FATAL_ERROR,
                    f"the model's reply was still invalid after {repairs} repair attempt(s): {exc}",
                ) from None
            repairs += 1
            tail = repair_messages(messages, reply.text, str(exc), getattr(reply, "tool_calls", None), mode)[len(base):]
            continue
        # The prompt was built redacted: only a repair's turns are redacted here, unless a secret was found
        # since (then all of it again).
        journalled = [*base, *redact_tree(tail)] if secrets_known() is known else redact_tree(messages)
        return Intent(
            # Redacted before it is journalled: the tool runs with, and every record keeps, what is here.
            run_id=engine.run_id, n=n, prompt=journalled, raw_response=redact(raw), decision_mode=mode,
            decision=redact_tree(decision.model_dump(mode="json")), repairs=repairs, tokens_in=tokens_in,
            tokens_out=tokens_out, cost_usd=cost, latency_ms=latency, model=reply.model, started_at=started,
            tokens_cached=cached,  # every call of this decision's, repairs included, like tokens_in
        )


def takes_params(client: Any) -> bool:
    """Whether the client can send a request's tools or response_format (ModelClient can; a stand-in
    client a test or a benchmark injects may not: it is asked in text mode, as before modes existed)."""
    complete = getattr(client, "complete", None)
    return complete is not None and _accepts_params(getattr(complete, "__func__", complete))


@functools.lru_cache(maxsize=64)
def _accepts_params(complete: Any) -> bool:
    """Per function, not per call: inspect.signature costs about 0.1 ms, every iteration otherwise."""
    try:
        parameters = inspect.signature(complete).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "params" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def model_failure(engine: Engine, exc: ModelError, n: int, pruned: int, prompt: list[dict[str, Any]]) -> str:
    """The one line a run ends with when the maker's model call failed for good."""
    from loopterm.core.prompt import prompt_tokens

    resume = f"`loopterm resume {engine.run_id}` continues from iteration {n} once the provider answers"
    if exc.code == "context_window":
        if pruned:
            how = f"still too long after pruning it {pruned} time(s), to about {prompt_tokens(prompt)} tokens"
        else:
            how = f"nothing left to prune in it (about {prompt_tokens(prompt)} tokens)"
        return (f"{exc}; {how}: shorten the task, system prompt or project rules, or use a model with a "
                "larger context window")
    if exc.code == "circuit_open":
        breaker = getattr(engine.client, "breaker", None)
        last = getattr(breaker, "last_error", None)
        wait = breaker.retry_in() if breaker is not None else (exc.retry_after or 0.0)
        what = (f"failed {exc.calls} time(s) in this iteration; its circuit is now open" if exc.calls
                else "was not called: its circuit is open")
        return (f"{engine.run_record.model} {what} after {getattr(breaker, 'failures', 'repeated')} consecutive "
                f"failures{f' (last: {last})' if last else ''}; it lets a trial call through in "
                f"{math.ceil(wait)}s, then {resume}")
    if exc.kind is ErrorKind.TRANSIENT:
        return f"{exc}; {resume}"
    return str(exc)
