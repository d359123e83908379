"""Roles: prompt profiles for the model calls of a topology (checker, critic, judge, ...).

A role is what makes a checker independent of the maker: its own system prompt,
and optionally its own model and temperature. With no model of its own, a role
uses the run's model; on the offline scripted model that is `scripted/<loop>.<role>`,
answered from the `roles` section of the loop's script.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Role(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    system_prompt: str = Field(min_length=1)
    model: str | None = None  # a litellm model string; None: the run's model
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)

    def model_for(self, run_model: str) -> str:
        """The model this role calls when the run uses `run_model`."""
        if self.model:
            return self.model
        if run_model.startswith("scripted/"):
            return f"{run_model}.{self.name}"
        return run_model

    def same_profile_as(self, model: str, system_prompt: str) -> bool:
        """True when this role would be the maker again: same model (or none of its own) and prompt."""
        return (self.model is None or self.model == model) and self.system_prompt.strip() == system_prompt.strip()
