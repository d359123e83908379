"""The built-in `agent-fix` loop: an ACP coding agent makes a failing test pass, supervised by loopterm.

Offline by default: the agent is examples/agent_fix/scripted_agent.py, a real ACP agent over stdio (built
with the protocol's SDK) that answers from script.json: its first turn sorts the input (one test still
fails), its second handles an even count. Each edit asks permission, so the approval dialog shows the diff.
`loopterm run agent-fix --agent 'claude-agent-acp'` (or any ACP agent's command) points the same loop at a
real agent. The gate decides when the work is done, never the agent.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from loopterm.core.agent_spec import AgentSpec
from loopterm.core.budget import Budget
from loopterm.core.gates import CommandGate
from loopterm.core.loop import Loop

HERE = Path(__file__).resolve().parent

GOAL = """\
Make the tests in test_stats.py pass by fixing median() in stats.py.
The tests are the specification: change stats.py only."""

AGENT = AgentSpec(
    name="scripted",
    command=[sys.executable, "-m", "loopterm.examples.agent_fix.scripted_agent", str(HERE / "script.json")],
    # Where the scripted agent keeps its sessions, so a new process can load one (session/load).
    env={"LOOPTERM_SCRIPTED_AGENT_SESSIONS": str(Path(tempfile.gettempdir()) / "loopterm-scripted-agent")},
    # Copied only when set, so `--agent 'claude-agent-acp'` (or another real agent) finds its provider's key
    # and endpoint; nothing else of loopterm's environment reaches the agent.
    env_from=["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "CLAUDE_CONFIG_DIR",
              "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "IS_SANDBOX", "OPENAI_API_KEY", "OPENAI_BASE_URL",
              "GEMINI_API_KEY", "GOOGLE_API_KEY"],
    paths=["stats.py"],
    turn_timeout_s=120.0,
    max_tool_calls=30,
)

GATES = [
    CommandGate(
        name="tests",
        argv=["{python}", "-B", "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "-c", os.devnull,
              "--rootdir={workspace}", "--confcutdir={workspace}", "test_stats.py"],
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        timeout=120.0,
    ),
]

loop = Loop(
    name="agent-fix",
    description="an ACP coding agent fixes median() until pytest passes (offline: a scripted ACP agent)",
    goal=GOAL,
    agent=AGENT,
    gates=GATES,
    workspace_files=HERE / "workspace",
    max_iterations=6,
    budget=Budget(usd=1.0),
)
