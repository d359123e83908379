"""Per-run budgets, checked before every model call, never after the money is spent."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Budget(BaseModel):
    """Caps for one run; None means uncapped. Iterations are capped by Loop.max_iterations."""

    tokens: int | None = Field(default=None, ge=0)
    usd: float | None = Field(default=None, ge=0)
    wall_seconds: float | None = Field(default=None, gt=0)


class Spend(BaseModel):
    """What a run has used so far (persisted with the run's totals)."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    tokens_cached: int = 0  # of tokens_in, served from the provider's prompt cache (already priced in cost_usd)

    @property
    def tokens(self) -> int:
        """What a token budget counts: every input token, cached or not (a cap on tokens, not on money)."""
        return self.tokens_in + self.tokens_out

    def add(self, tokens_in: int, tokens_out: int, cost_usd: float, tokens_cached: int = 0) -> None:
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.cost_usd += cost_usd
        self.tokens_cached += tokens_cached


def over_budget(budget: Budget, spend: Spend, next_tokens: int = 0, next_cost: float = 0.0) -> str | None:
    """The termination reason if a call costing (next_tokens, next_cost) would exceed a cap."""
    if budget.tokens is not None and spend.tokens + next_tokens > budget.tokens:
        return "budget_tokens"
    if budget.usd is not None and spend.cost_usd + next_cost > budget.usd:
        return "budget_usd"
    if budget.wall_seconds is not None and spend.elapsed_s >= budget.wall_seconds:
        return "budget_wall_time"
    return None
