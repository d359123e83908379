"""What loopterm tells a coding agent each turn, and the summary a branch's new session starts from.

Built from the run's state, never by a model: the goal, the subgoal and facts a person gave, the checks
that decide when the work is done and their last failure, the invariants, and the paths the agent may
change. The agent's own reply never decides anything: the gates do.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from loopterm.core.acp_turn import AgentTurn
from loopterm.core.checkers import ModelGate
from loopterm.core.records import Intent
from loopterm.core.secrets import redact

if TYPE_CHECKING:
    from loopterm.core.engine import Engine

FAILURE_CAP = 4_000  # the last gate failure's text, as shown to the agent


def turn_prompt(engine: Engine, n: int) -> str:
    loop, state = engine.loop, engine.state
    spec = loop.agent
    assert spec is not None
    lines = [f"loopterm iteration {n} of {engine.max_iterations}.", "", f"Goal: {state.task or loop.goal}"]
    if state.memory.subgoal:
        lines.append(f"Current subgoal: {state.memory.subgoal}")
    facts = [f for f in state.memory.facts if not f.startswith("iteration ")]
    if facts:
        lines += ["", "Facts to respect:", *(f"- {f}" for f in facts)]
    checks = [g for g in loop.gates if not isinstance(g, ModelGate)]
    if checks:
        lines += ["", "When you end your turn, loopterm runs these checks in this folder; the work is done only "
                      "when all pass:", *(f"- {g.name}: {shlex.join(g.command(engine.workspace))}" for g in checks)]
    last = engine.view.agent_turns.get(n - 1)
    refused = [p for p in last.permissions if p.outcome != "allow_once"] if last is not None else []
    if refused:  # the protocol's answer carries no reason: the agent hears it here
        lines += ["", "Refused in your last turn:", *(f"- {p.title or p.kind}: {p.reason or p.decided_by}"
                                                       for p in refused)]
    if state.last_gate_failure:
        lines += ["", "The checks failed after your last turn:", state.last_gate_failure[:FAILURE_CAP]]
    kept = [i for i in loop.invariants if i.name not in engine.relaxed and i.description]
    if kept:
        lines += ["", "Keep these true:", *(f"- {i.name}: {i.description}" for i in kept)]
    lines += ["", f"Change only these paths: {', '.join(spec.paths)}. Work in the current folder only."]
    return "\n".join(lines)


def seed_summary(turns: dict[int, AgentTurn], upto: int, parent: str) -> str:
    """A new session's first words on a branch: what iterations 1..upto of the parent did (the agent cannot
    be rewound to that point, so it is told instead)."""
    lines = [f"This continues earlier work (run {parent}, iterations 1 to {upto}); the files are as that work "
             "left them. What each earlier turn did:"]
    for n in sorted(k for k in turns if k <= upto):
        turn = turns[n]
        files = ", ".join(turn.changed_paths[:12]) or "no files"
        reply = " ".join(turn.message.split())[:300]
        lines.append(f"- iteration {n}: {turn.summary()}; changed {files}" + (f"; said: {reply}" if reply else ""))
    return "\n".join(lines)


def agent_intent(engine: Engine, n: int, started: float) -> Intent:
    """The decide phase of an agent loop: no model is asked; the decision is to give the agent its turn."""
    spec = engine.loop.agent
    assert spec is not None
    text = redact(turn_prompt(engine, n))  # a key in the goal or a fact is not sent to the agent
    decision = {"action": {"tool": "agent", "args": {"prompt": text}}, "subgoal": engine.state.memory.subgoal,
                "confidence": 1.0, "reasoning": "the agent's turn; the prompt is built by loopterm, not by a model",
                "done": False}
    return Intent(run_id=engine.run_id, n=n, prompt=[{"role": "user", "content": text}], raw_response="",
                  decision=decision, model=spec.label, started_at=started, decision_mode="agent")
