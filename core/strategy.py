"""Strategies: the ways a loop may adapt when it stalls or breaks an invariant.

A loop declares them in order; `change_strategy` (an invariant's remediation,
or a stall when strategies remain) moves to the next one and records the
switch in the run's event log and working memory. Each may swap the prompt
profile, the sampling temperature or the model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    note: str = Field(min_length=1)  # what every later prompt tells the model about its approach
    system_prompt: str | None = None  # replaces the loop's system prompt
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    model: str | None = None  # a litellm model string; None keeps the run's model
