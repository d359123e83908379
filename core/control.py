"""Commands a person sends to a run: the control channel's vocabulary.

The TUI (in process) and `loopterm watch` (another process) send the same
commands, through the store's `commands` table; the engine obeys them at its
next iteration boundary, or at once while it is paused or waiting on a person.
Every command that changes the run is recorded in the event log with its reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, field_validator

from loopterm.core.approval_policy import PolicyRule
from loopterm.core.decision import MAX_STATE_DEPTH, json_problem


MAX_NAME = 200  # an invariant's name, an approval's key: names, not documents (each is repeated in messages)


class _Command(BaseModel):
    """Every command is stored (the control channel is a table) and its text shown: a field the store
    could not write or read back as it is (an unpaired surrogate, NaN, absurd nesting) is refused here,
    by the sender, with one line; the engine refuses such a row the same way."""

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        problem = json_problem(value.model_dump() if isinstance(value, BaseModel) else value, MAX_STATE_DEPTH)
        if problem:
            raise ValueError(problem)
        return value


class Pause(_Command):
    kind: Literal["pause"] = "pause"


class Resume(_Command):
    """Go on (after a pause), or answer the escalation recorded as event `escalation`: go on past it."""

    kind: Literal["resume"] = "resume"
    escalation: int | None = None


class Step(_Command):
    """Run exactly one iteration, then pause."""

    kind: Literal["step"] = "step"


class Stop(_Command):
    """Stop at the next boundary. Naming an escalation answers it (abort); otherwise what waits on a
    person stays pending, and the run stays resumable."""

    kind: Literal["stop"] = "stop"
    reason: str = "stopped by a person"
    escalation: int | None = None


class EditState(_Command):
    """Replace the state the next iteration starts from (validated against the loop's state model).

    `base_iteration` and `base_version` name the state the person edited (the iteration it followed,
    and the patch it showed: `RunView.state_version`); an edit of a state the run has since moved
    past is refused, never applied to a later one."""

    kind: Literal["edit_state"] = "edit_state"
    state: dict[str, Any]
    reason: str = Field(min_length=1)
    base_iteration: int = Field(ge=0)
    base_version: int | None = Field(default=0, ge=0)  # None: only the iteration is checked (a replay's edits)


class Relax(_Command):
    kind: Literal["relax"] = "relax"
    invariant: str = Field(max_length=MAX_NAME)
    reason: str = Field(min_length=1)
    iterations: int | None = Field(default=None, ge=1)  # None: until restored


class Restore(_Command):
    kind: Literal["restore"] = "restore"
    invariant: str = Field(max_length=MAX_NAME)
    reason: str = ""


class AddFact(_Command):
    """A fact for working memory. With `base_iteration`, refused if the run has moved past it."""

    kind: Literal["add_fact"] = "add_fact"
    fact: str = Field(min_length=1)
    base_iteration: int | None = Field(default=None, ge=0)


class SetSubgoal(_Command):
    """Override the subgoal. With `base_iteration`, refused if the run has moved past it."""

    kind: Literal["set_subgoal"] = "set_subgoal"
    subgoal: str = Field(min_length=1)
    base_iteration: int | None = Field(default=None, ge=0)


class Approve(_Command):
    """Let a tool call that needs approval run, optionally with edited arguments."""

    kind: Literal["approve"] = "approve"
    key: str = Field(max_length=MAX_NAME)
    args: dict[str, Any] | None = None
    reason: str = ""
    # Only in a shadow run (core/shadow.py): the tool that should have been called instead. A run whose
    # calls execute never swaps the tool a person was asked about: it refuses the call instead.
    tool: str | None = Field(default=None, max_length=MAX_NAME)
    policy: PolicyRule | None = None  # also approve calls like this one from now on (core/approval_policy.py)


class Deny(_Command):
    kind: Literal["deny"] = "deny"
    key: str = Field(max_length=MAX_NAME)
    reason: str = "denied by a person"
    policy: PolicyRule | None = None  # also deny calls like this one from now on (core/approval_policy.py)


Command = Pause | Resume | Step | Stop | EditState | Relax | Restore | AddFact | SetSubgoal | Approve | Deny
# Tagged by `kind`, so a malformed command's error names its own field ("edit_state.state: ..."),
# not the first member of the union that it is not ("Pause.kind: Input should be 'pause'").
COMMAND: TypeAdapter[Command] = TypeAdapter(Annotated[Command, Field(discriminator="kind")])


def parse_command(kind: str, payload: dict[str, Any]) -> Command:
    """A stored command row back into its model (raises pydantic.ValidationError if malformed)."""
    return COMMAND.validate_python({**payload, "kind": kind})


def command_payload(command: Command) -> tuple[str, dict[str, Any]]:
    """(kind, payload) for `Store.add_command`."""
    data = command.model_dump(mode="json")
    return data.pop("kind"), data
