"""Proposer-critic-judge: the maker proposes, a critic argues against it, a judge decides."""

from pathlib import Path

from loopterm.core import tool
from loopterm.core.roles import Role
from loopterm.core.topology import proposer_critic_judge


@tool
def propose(plan: str) -> str:
    """Put a migration plan forward for review."""
    return f"proposed: {plan}"


loop = proposer_critic_judge(
    name="migration-plan",
    goal="Propose how to move the orders table to a new schema without downtime.",
    tools=[propose],
    critic=Role(name="critic", system_prompt="You find the riskiest step of a plan and argue against it."),
    judge=Role(name="judge", system_prompt="You weigh a plan and its critique; pass only a plan that survives it."),
    critic_instructions="Name the step most likely to cause downtime or data loss.",
    judge_instructions="Pass the plan only if the critique does not apply to it.",
    script=Path(__file__).with_name("proposer_critic_judge.json"),
    max_iterations=4,
)
