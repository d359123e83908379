"""The executor of planner_executors.py: summarizes one report and hands the sentence back."""

from pathlib import Path

from loopterm.core import Loop, tool


@tool
def answer(text: str) -> str:
    """Hand your one-sentence summary back to the loop that asked."""
    return text


loop = Loop(
    name="summarize-one",
    goal="Summarize one incident report in one sentence.",
    system_prompt="You summarize one incident report in one plain sentence, then call answer.",
    tools=[answer],
    converged=lambda state, gates: any(r.tool == "answer" and r.ok for r in state.tool_results),
    result=lambda state: state.tool_results[-1].output,
    script=Path(__file__).with_name("summarize_one.json"),
    max_iterations=2,
)
