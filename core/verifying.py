"""The verify phase: the loop's gates in order until one fails (a final model checker only when all the
others passed), and the role models (checkers, critics) they ask, budget-checked like the maker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopterm.core.checkers import Asked, GateContext, ModelGate
from loopterm.core.decision import Decision
from loopterm.core.errors import ConfigError, ErrorKind, ModelError
from loopterm.core.gates import GateResult
from loopterm.core.policies import check_budget
from loopterm.core.roles import Role
from loopterm.core.secrets import redact
from loopterm.core.state import ToolRecord

if TYPE_CHECKING:
    from loopterm.core.engine import Engine


class Verifier:
    """Runs one run's gates; keeps a model client per role and counts each role's calls per iteration
    (a scripted or replayed role answers call k of iteration n)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._clients: dict[tuple[str, str], Any] = {}
        self._calls: dict[str, int] = {}

    async def verify(self, n: int, decision: Decision, tool_record: ToolRecord | None) -> list[GateResult]:
        engine = self.engine
        gates: list[GateResult] = []
        if not engine.loop.gates:
            return gates
        engine.journal.flush()  # gates take seconds: the reply and the tool's result must not wait on them
        self._calls.clear()
        ctx = GateContext(workspace=engine.workspace, iteration=n, task=engine.state.task or engine.loop.goal,
                          state=engine.state, decision=decision, tool_record=tool_record, earlier=gates, ask=self.ask)
        for gate in engine.loop.gates:
            if isinstance(gate, ModelGate) and gate.when == "final" and not all(g.passed for g in gates):
                continue
            result = (await gate.check(ctx)).redacted()  # a custom gate's or a checker's text too
            gates.append(result)
            if not result.passed:
                break
        return gates

    async def ask(self, role: Role, messages: list[dict[str, Any]]) -> Asked:
        """One call of a role's model: budget-checked first, like the maker's; spend goes on the gate."""
        engine = self.engine
        model = role.model_for(engine.run_record.model)
        client = self._clients.get((model, role.name))
        if client is None:
            from loopterm.core.model import ModelClient, check_model

            try:
                check_model(model)  # a scripted role's script was registered with the loop's
            except ConfigError as exc:  # ends the run with the reason (preflight_roles catches it earlier)
                raise ModelError(f"role {role.name!r}: {exc}", ErrorKind.FATAL) from None
            client = self._clients[(model, role.name)] = ModelClient(
                model, temperature=role.temperature if role.temperature is not None else engine.loop.temperature,
                max_tokens=engine.loop.max_output_tokens, on_retry=engine.on_retry,
            )
        check_budget(engine, client.estimate(messages, engine.loop.max_output_tokens))
        n = engine.state.iteration + 1
        call = self._calls.get(role.name, 0)
        reply = await client.complete(messages, iteration=n, call_index=call)
        self._calls[role.name] = call + max(1, reply.calls)
        return Asked(text=redact(reply.text), tokens_in=reply.tokens_in, tokens_out=reply.tokens_out,
                     cost_usd=reply.cost_usd, model=reply.model, tokens_cached=reply.tokens_cached)
