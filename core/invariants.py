"""Invariants: named predicates over state, checked every iteration, each with a remediation."""

from __future__ import annotations

from enum import Enum
from typing import Callable

from pydantic import BaseModel, ConfigDict

from loopterm.core.state import LoopState


class Remediation(str, Enum):
    PRUNE_CONTEXT = "prune_context"  # drop the oldest facts and tool output from working memory
    CHANGE_STRATEGY = "change_strategy"  # next prompt asks for a different approach, hotter sampling
    ESCALATE = "escalate"  # stop and wait for a person
    ABORT = "abort"  # end the run as failed
    CUSTOM = "custom"  # call Invariant.custom(state) -> state


class Invariant(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    check: Callable[[LoopState], bool]
    remediation: Remediation = Remediation.ESCALATE
    description: str = ""  # what the model is told must hold; a loop file must give one (core/loop_checks.py)
    custom: Callable[[LoopState], LoopState] | None = None

    def holds(self, state: LoopState) -> bool:
        """A predicate that raises is a violation, not a crash of the run."""
        try:
            return bool(self.check(state))
        except Exception:
            return False
