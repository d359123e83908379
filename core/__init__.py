"""loopterm.core: the loop engine. Never imports textual, the TUI, or (at import time) litellm."""

from loopterm.core.agent_loop import AgentState
from loopterm.core.agent_spec import AgentSpec
from loopterm.core.append_log import AppendLog
from loopterm.core.budget import Budget
from loopterm.core.decision import Action, Decision
from loopterm.core.gates import CommandGate, GateResult
from loopterm.core.invariants import Invariant, Remediation
from loopterm.core.loop import Loop
from loopterm.core.mcp_servers import McpServer
from loopterm.core.state import LoopState, ToolRecord, WorkingMemory
from loopterm.core.termination import Status, TerminationReason
from loopterm.core.tools import Tool, ToolContext, tool

__all__ = [
    "Action",
    "AgentSpec",
    "AgentState",
    "AppendLog",
    "Budget",
    "CommandGate",
    "Decision",
    "GateResult",
    "Invariant",
    "Loop",
    "LoopState",
    "McpServer",
    "Remediation",
    "Status",
    "TerminationReason",
    "Tool",
    "ToolContext",
    "ToolRecord",
    "WorkingMemory",
    "tool",
]
