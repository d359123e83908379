"""Commands a person sends to a run: the control channel's vocabulary.

The TUI (in process) and `loopterm watch` (another process) send the same
commands, through the store's `commands` table; the engine obeys them at its
next iteration boundary, or at once while it is paused or waiting on a person.
Every command that changes the run is recorded in the event log with its reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter


class Pause(BaseModel):
    kind: Literal["pause"] = "pause"


class Resume(BaseModel):
    kind: Literal["resume"] = "resume"


class Step(BaseModel):
    """Run exactly one iteration, then pause."""

    kind: Literal["step"] = "step"


class Stop(BaseModel):
    kind: Literal["stop"] = "stop"
    reason: str = "stopped by a person"


class EditState(BaseModel):
    """Replace the state the next iteration starts from (validated against the loop's state model)."""

    kind: Literal["edit_state"] = "edit_state"
    state: dict[str, Any]
    reason: str = Field(min_length=1)


class Relax(BaseModel):
    kind: Literal["relax"] = "relax"
    invariant: str
    reason: str = Field(min_length=1)
    iterations: int | None = Field(default=None, ge=1)  # None: until restored


class Restore(BaseModel):
    kind: Literal["restore"] = "restore"
    invariant: str
    reason: str = ""


class AddFact(BaseModel):
    kind: Literal["add_fact"] = "add_fact"
    fact: str = Field(min_length=1)


class SetSubgoal(BaseModel):
    kind: Literal["set_subgoal"] = "set_subgoal"
    subgoal: str = Field(min_length=1)


class Approve(BaseModel):
    """Let a tool call that needs approval run, optionally with edited arguments."""

    kind: Literal["approve"] = "approve"
    key: str
    args: dict[str, Any] | None = None
    reason: str = ""


class Deny(BaseModel):
    kind: Literal["deny"] = "deny"
    key: str
    reason: str = "denied by a person"


Command = Pause | Resume | Step | Stop | EditState | Relax | Restore | AddFact | SetSubgoal | Approve | Deny
COMMAND = TypeAdapter(Command)


def parse_command(kind: str, payload: dict[str, Any]) -> Command:
    """A stored command row back into its model (raises pydantic.ValidationError if malformed)."""
    return COMMAND.validate_python({**payload, "kind": kind})


def command_payload(command: Command) -> tuple[str, dict[str, Any]]:
    """(kind, payload) for `Store.add_command`."""
    data = command.model_dump(mode="json")
    return data.pop("kind"), data
