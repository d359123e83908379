"""Planner -> parallel executors -> aggregator: one child run per document, then one summary."""

from pathlib import Path

from loopterm.core import tool
from loopterm.core.topology import PlanState, planner_executors_aggregator


@tool
def publish(summary: str) -> str:
    """Publish the combined summary (the aggregator's decision)."""
    return summary


def published(state, decision, record, gates):
    if record is not None and record.tool == "publish" and record.ok:
        return state.model_copy(update={"outcome": {"summary": record.output}})
    return state


loop = planner_executors_aggregator(
    name="digest",
    goal="Summarize the three incident reports (db.md, cache.md, dns.md) into one digest.",
    executor="summarize_one.py",  # a loop file next to this one: one child run per item
    item_goal="Summarize the incident report {item} in one sentence.",
    aggregate=publish,
    observe=published,
    parallel=3,
    converged=lambda state, gates: isinstance(state, PlanState) and state.outcome is not None and not state.remaining,
    script=Path(__file__).with_name("planner_executors.json"),
    max_iterations=5,
)
