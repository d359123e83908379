"""A run's log: every kind of stored event as one pydantic model, in one discriminated union.

The store keeps an event as (kind, data); `to_stored` and `from_stored` are the only places that
map between that and these models, and `core/fold.py` is the only place that interprets them.
Fields mirror what earlier versions wrote, with defaults, so an old database's events still load;
a row that fits no model (a hand-edited file, a kind from a newer loopterm) loads as `Unrecognized`
and is kept as it was, never dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from loopterm.core.acp_turn import AgentTurn

LOG_VERSION = 2  # written on run_started / run_resumed; 1 (absent) marks an engine from before the typed log


class _Event(BaseModel):
    # Unknown extra keys of an old row are kept (and written back by an export): nothing is lost.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# -- lifecycle ---------------------------------------------------------------------------------------------


class RunCreated(_Event):
    kind: Literal["run_created"] = "run_created"
    loop_ref: str = ""
    model: str = ""
    budget: dict[str, Any] = Field(default_factory=dict)


class RunStarted(_Event):
    """An engine started executing the run (pid and host tell whether its process still exists)."""

    kind: Literal["run_started"] = "run_started"
    from_iteration: int = 0
    pid: int | None = None
    host: str | None = None
    v: int = 1


class RunResumed(_Event):
    kind: Literal["run_resumed"] = "run_resumed"
    from_iteration: int = 0
    pid: int | None = None
    host: str | None = None
    v: int = 1


class RunFinished(_Event):
    """An engine stopped executing the run. What waits on a person stays pending through it."""

    kind: Literal["run_finished"] = "run_finished"
    status: str = ""
    reason: str = ""
    message: str = ""


class StatusChanged(_Event):
    kind: Literal["status_changed"] = "status_changed"
    status: str = ""
    message: str = ""


class MaxIterationsChanged(_Event):
    kind: Literal["max_iterations_changed"] = "max_iterations_changed"
    before: int | None = Field(default=None, alias="from")
    to: int


class BudgetCapped(_Event):
    kind: Literal["budget_capped"] = "budget_capped"
    usd: float | None = None
    why: str = ""


class Forked(_Event):
    """This run is a branch of `parent` from iteration `at`; `patched_state` is its first state if patched."""

    kind: Literal["forked"] = "forked"
    parent: str
    at: int
    reason: str = ""
    model: str | None = None
    patches: list[dict[str, Any]] = Field(default_factory=list)
    relaxed: dict[str, str] = Field(default_factory=dict)
    patched_state: dict[str, Any] | None = None


class Branched(_Event):
    kind: Literal["branched"] = "branched"
    child: str
    at: int
    reason: str = ""


class ReplayOf(_Event):
    kind: Literal["replay_of"] = "replay_of"
    run: str
    recorded_spec_hash: str = ""
    spec_hash: str = ""


class Replayed(_Event):
    kind: Literal["replayed"] = "replayed"
    replay_run: str


class ReplaySession(_Event):
    kind: Literal["replay_session"] = "replay_session"
    after: int = 0
    why: str = ""
    max_iterations: int | None = None
    patches: list[dict[str, Any]] = Field(default_factory=list)


class ShadowMode(_Event):
    kind: Literal["shadow_mode"] = "shadow_mode"
    why: str = ""


class CaseStarted(_Event):
    kind: Literal["case"] = "case"
    id: str
    cases_file: str | None = None
    expect: Any = None


class WorktreeAdded(_Event):
    kind: Literal["worktree_added"] = "worktree_added"
    path: str
    base: str = ""
    commit: str | None = None


class WorktreeKept(_Event):
    kind: Literal["worktree_kept"] = "worktree_kept"
    path: str
    base: str = ""
    commit: str | None = None
    files: list[dict[str, Any]] = Field(default_factory=list)  # path, change, sha256 (core/worktree.py)
    status: str = ""
    error: str | None = None


class WorktreeRemoved(_Event):
    kind: Literal["worktree_removed"] = "worktree_removed"
    path: str
    base: str = ""
    commit: str | None = None
    files: list[dict[str, Any]] = Field(default_factory=list)  # path, change, sha256 (core/worktree.py)


class AgentTurnRecorded(_Event):
    """One prompt turn of the loop's ACP agent (core/acp_turn.py), committed with its iteration."""

    kind: Literal["agent_turn"] = "agent_turn"
    turn: AgentTurn


class TriggerFired(_Event):
    """The daemon started this run for a trigger (`on`: change, schedule or command)."""

    kind: Literal["trigger"] = "trigger"
    trigger: str
    on: str = ""
    event: Any = None
    triggers_file: str | None = None
    pid: int | None = None


class TriggerRefused(_Event):
    kind: Literal["trigger_refused"] = "trigger_refused"
    trigger: str = ""
    event: Any = None
    reason: str = ""
    resume: bool = False


class DaemonInterrupted(_Event):
    kind: Literal["daemon_interrupted"] = "daemon_interrupted"
    trigger: str = ""
    pid: int | None = None
    why: str = ""


class DaemonResumed(_Event):
    kind: Literal["daemon_resumed"] = "daemon_resumed"
    trigger: str = ""
    pid: int | None = None
    from_status: str = ""


class ChildStarted(_Event):
    kind: Literal["child_run"] = "child_run"
    key: str
    run_id: str
    loop: str = ""
    item: str = ""


class McpConnected(_Event):
    kind: Literal["mcp_connected"] = "mcp_connected"
    servers: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)


# -- the model -----------------------------------------------------------------------------------------------


class ModelRetried(_Event):
    kind: Literal["model_retry"] = "model_retry"
    attempt: int = 0
    error: str = ""
    delay_s: float = 0.0


class PromptPruned(_Event):
    kind: Literal["prompt_pruned"] = "prompt_pruned"
    error: str = ""
    retry: int = 0
    token_budget: int = 0
    tokens_before: int = 0
    tokens_after: int = 0


class InvalidReply(_Event):
    kind: Literal["invalid_reply"] = "invalid_reply"
    error: str = ""
    repair: int = 0
    reply: str = ""


class IntentReused(_Event):
    kind: Literal["intent_reused"] = "intent_reused"
    n: int = 0


# -- a person -----------------------------------------------------------------------------------------------


class CommandRejected(_Event):
    """A person's command was not applied, and why (malformed, stale, not possible now)."""

    kind: Literal["command_rejected"] = "command_rejected"
    command: str = ""
    error: str = ""
    command_id: int | None = None  # the control channel's row it answers
    stale: bool = False  # refused because the run moved on since the command was made: look again, send again


class StateEdited(_Event):
    """A person replaced the state the next iteration starts from (`patched_state`)."""

    kind: Literal["state_edited"] = "state_edited"
    reason: str = ""
    patched_state: dict[str, Any] | None = None
    command_id: int | None = None  # the control channel's row it applies


class FactAdded(_Event):
    kind: Literal["fact_added"] = "fact_added"
    fact: str = ""
    patched_state: dict[str, Any] | None = None


class SubgoalSet(_Event):
    kind: Literal["subgoal_set"] = "subgoal_set"
    subgoal: str = ""
    patched_state: dict[str, Any] | None = None


class InvariantRelaxed(_Event):
    kind: Literal["invariant_relaxed"] = "invariant_relaxed"
    invariant: str
    reason: str = ""
    until: int | None = None  # the iteration after which it is restored; None: until a person restores it


class InvariantRestored(_Event):
    kind: Literal["invariant_restored"] = "invariant_restored"
    invariant: str
    reason: str = ""


class Approved(_Event):
    kind: Literal["approved"] = "approved"
    key: str
    args: dict[str, Any] | None = None
    reason: str = ""
    tool: str | None = None


class Denied(_Event):
    kind: Literal["denied"] = "denied"
    key: str
    reason: str = "denied by a person"


class PolicyAdded(_Event):
    """A person made an approval policy (core/approval_policy.py): calls of `tool` whose arguments match
    `globs` are approved (or denied) without asking, for the rest of this run or every run of `loop_ref`."""

    kind: Literal["policy_added"] = "policy_added"
    policy: str
    effect: Literal["approve", "deny"]
    scope: Literal["run", "loop"]
    tool: str
    globs: dict[str, str] = Field(default_factory=dict)
    reason: str = ""
    loop_ref: str = ""


class PolicyRevoked(_Event):
    """A person revoked policy `policy` (recorded in the log of the run that made it); the next call is asked."""

    kind: Literal["policy_revoked"] = "policy_revoked"
    policy: str
    reason: str = ""


class SideEffectAnswered(_Event):
    kind: Literal["side_effect_answered"] = "side_effect_answered"
    key: str
    answer: str


class EscalationAnswered(_Event):
    """A person answered the escalation recorded as event `escalation`: the run goes on, or stops."""

    kind: Literal["escalation_answered"] = "escalation_answered"
    escalation: int
    answer: Literal["resume", "stop"] = "resume"
    reason: str = ""


# -- the engine asks, notes, remembers ---------------------------------------------------------------------------


class ApprovalPending(_Event):
    kind: Literal["approval_pending"] = "approval_pending"
    key: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    shadow: bool = False


class PolicyDecided(_Event):
    """A call that needed approval was answered by policy `policy` (made in run `policy_run`), not by asking."""

    kind: Literal["policy_decided"] = "policy_decided"
    key: str
    policy: str
    policy_run: str = ""
    effect: Literal["approve", "deny"]
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""


class Escalated(_Event):
    """The escalation packet: what a person needs to answer it."""

    kind: Literal["escalated"] = "escalated"
    run_id: str = ""
    iteration: int = 0
    summary: str = ""
    failing_invariants: list[dict[str, Any]] = Field(default_factory=list)
    confidence_trajectory: list[float] = Field(default_factory=list)
    last_gate_failure: str | None = None
    suggested_interventions: list[str] = Field(default_factory=list)
    state: dict[str, Any] = Field(default_factory=dict)

    def packet(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"kind"})


class SideEffectPending(_Event):
    """A side-effecting call the run cannot decide alone whether to repeat (interrupted, or made before)."""

    kind: Literal["side_effect_pending"] = "side_effect_pending"
    key: str
    why: str = ""
    tool: str = ""
    args: dict[str, Any] = Field(default_factory=dict)
    earlier_run: str = ""
    earlier_iteration: int = 0


class StrategyChanged(_Event):
    kind: Literal["strategy_changed"] = "strategy_changed"
    before: str | None = Field(default=None, alias="from")
    to: str
    why: str = ""
    temperature: float | None = None
    model: str | None = None


class InvariantViolated(_Event):
    kind: Literal["invariant_violated"] = "invariant_violated"
    invariant: str
    remediation: str = ""


class ShadowVerdict(_Event):
    """What a person decided about one proposed tool call in a shadow run (core/shadow.py)."""

    kind: Literal["shadow_verdict"] = "shadow_verdict"
    key: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)  # what the model proposed
    verdict: Literal["agree", "edit", "deny"]
    person_args: dict[str, Any] | None = None  # "edit": what should have happened instead
    person_tool: str | None = None  # "edit": the tool that should have been called, when not the proposed one
    reason: str = ""
    args_error: str | None = None  # "edit": the person's arguments do not fit the tool (kept as given)


class RecallDegraded(_Event):
    kind: Literal["recall_degraded"] = "recall_degraded"
    error: str = ""


class ConsolidationFailed(_Event):
    kind: Literal["consolidation_failed"] = "consolidation_failed"
    error: str = ""


class MemoryConsolidated(_Event):
    kind: Literal["memory_consolidated"] = "memory_consolidated"
    keys: list[str] = Field(default_factory=list)


class Unrecognized(_Event):
    """A stored row that fits no model here: kept as it was (its own kind and data), interpreted by no one."""

    kind: Literal["unrecognized"] = "unrecognized"
    stored_kind: str
    data: dict[str, Any] = Field(default_factory=dict)
    problem: str = ""


RunEvent = (
    RunCreated | RunStarted | RunResumed | RunFinished | StatusChanged | MaxIterationsChanged | BudgetCapped
    | Forked | Branched | ReplayOf | Replayed | ReplaySession | ShadowMode | CaseStarted | WorktreeAdded
    | WorktreeKept | WorktreeRemoved | AgentTurnRecorded | TriggerFired | TriggerRefused | DaemonInterrupted
    | DaemonResumed
    | ChildStarted | McpConnected | ModelRetried | PromptPruned | InvalidReply | IntentReused | CommandRejected
    | StateEdited | FactAdded | SubgoalSet | InvariantRelaxed | InvariantRestored | Approved | Denied
    | PolicyAdded | PolicyRevoked | PolicyDecided
    | SideEffectAnswered | EscalationAnswered | ApprovalPending | Escalated | SideEffectPending | StrategyChanged
    | InvariantViolated | ShadowVerdict | RecallDegraded | ConsolidationFailed | MemoryConsolidated | Unrecognized
)
RUN_EVENT: TypeAdapter[RunEvent] = TypeAdapter(Annotated[RunEvent, Field(discriminator="kind")])

# Stored data keys that cannot be field names as they are: `kind` is the discriminator.
_RENAMED_IN = {"trigger": {"kind": "on"}}
_RENAMED_OUT = {kind: {new: old for old, new in names.items()} for kind, names in _RENAMED_IN.items()}


def to_stored(event: RunEvent) -> tuple[str, dict[str, Any]]:
    """(kind, data) as the store keeps them."""
    if isinstance(event, Unrecognized):
        return event.stored_kind, dict(event.data)
    data = event.model_dump(mode="json", by_alias=True, exclude={"kind"})
    for new, old in _RENAMED_OUT.get(event.kind, {}).items():
        if new in data:
            data[old] = data.pop(new)
    return event.kind, data


def from_stored(kind: str, data: dict[str, Any]) -> RunEvent:
    """A stored row back into its model; one that fits none is `Unrecognized` (kept, never dropped)."""
    payload = dict(data)
    for old, new in _RENAMED_IN.get(kind, {}).items():
        if old in payload:
            payload[new] = payload.pop(old)
    payload["kind"] = kind
    try:
        return RUN_EVENT.validate_python(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or kind
        return Unrecognized(stored_kind=kind, data=dict(data), problem=f"{where}: {err['msg']}")


class EventRecord(BaseModel):
    """One entry of a run's log: the event, where it stands (id, iteration) and when it was written."""

    id: int | None = None
    run_id: str
    iteration: int | None = None
    ts: float
    event: Annotated[RunEvent, Field(discriminator="kind")]
