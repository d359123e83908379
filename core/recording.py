"""The ``replay/<run_id>`` model: a run's recorded replies, served through litellm as a custom provider.

It answers call k of iteration n with the k-th reply the recording got for that iteration (the bad
replies its repair attempts carried, then the recorded raw response), after checking that it is sent
the conversation the recording sent; when the loop's prompt, invariants or rules changed it refuses with
a permanent error instead of inventing an answer. ``RecordedCalls`` answers the replay's tool calls from
the recording. core/replay.py drives a replay with them; core/divergence.py compares the two runs.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loopterm.core.decision_modes import message_reply, read_envelope, register_mode_source
from loopterm.core.loop import Loop
from loopterm.core.model import cannot_answer, register_provider
from loopterm.core.records import IterationRecord, ToolCallRecord
from loopterm.core.tools import guard_tools

if TYPE_CHECKING:
    from types import ModuleType

PROVIDER = "replay"


# ----------------------------------------------------------------------------- the recording


@dataclass
class Problem:
    """A call the replay model refused, kept for the report."""

    iteration: int
    kind: Literal["prompt", "repair", "missing"]
    message: str
    recorded: str = ""
    replayed: str = ""
    where: str = ""


@dataclass
class Recording:
    """What the ``replay/<run_id>`` model answers from: the recorded iterations of a run's lineage."""

    run_id: str
    iterations: dict[int, IterationRecord]
    workspaces: set[str] = field(default_factory=set)  # masked in prompts: each run has its own
    problems: list[Problem] = field(default_factory=list)

    @property
    def model(self) -> str:
        return f"{PROVIDER}/{self.run_id}"

    def problem_at(self, n: int) -> Problem | None:
        return next((p for p in self.problems if p.iteration == n), None)

    def answer(self, messages: list[Any], n: int, call: int) -> str:
        """The recorded reply to call ``call`` of iteration ``n``; ReplayRefusal when there is none to give."""
        record = self.iterations.get(n)
        if record is None:
            last = max(self.iterations, default=0)
            raise self._refuse(Problem(n, "missing", f"replay: the recording has no iteration {n} (it ends at {last})"))
        prompt = list(record.prompt)
        turns = [i for i, m in enumerate(prompt) if m.get("role") == "assistant"]
        replies = [message_reply(prompt[i], record.decision_mode) for i in turns] + [record.raw_response]
        if call >= len(replies):
            raise self._refuse(Problem(
                n, "repair",
                f"replay: iteration {n} needs repair attempt {call}, which the recording does not have "
                "(the recorded reply is no longer accepted as a decision)",
                recorded=f"{len(replies) - 1} repair(s)", replayed=f"repair {call} needed",
            ))
        expected = prompt[: turns[call]] if call < len(turns) else prompt
        difference = self._difference(expected, list(messages))
        if difference is not None:
            where, recorded, replayed = difference
            raise self._refuse(Problem(
                n, "prompt",
                f"replay: the prompt of iteration {n} differs from the recording "
                f"(in the {where}: first difference near '{replayed}')",
                recorded=recorded, replayed=replayed, where=where,
            ))
        return replies[call]

    def _refuse(self, problem: Problem) -> "ReplayRefusal":
        with _lock:
            self.problems.append(problem)
        return ReplayRefusal(problem.message)

    def normalize(self, text: str) -> str:
        """Mask what differs between two identical runs: workspace paths, measured durations, terminal width."""
        for path in sorted(self.workspaces, key=len, reverse=True):
            if path:
                text = text.replace(path, "{workspace}")
        text = _VOLATILE.sub("<duration>", text)
        text = _RULER.sub(r"\1\1\1", text)  # separator lines sized to the terminal a gate ran in
        return _BLANKS.sub(" ", text)  # padding that depends on the terminal width (pytest's "[100%]")

    def _difference(self, expected: list[dict[str, Any]], sent: list[Any]) -> tuple[str, str, str] | None:
        """(which message, recorded excerpt, replayed excerpt) at the first difference; None when equal."""
        for i in range(max(len(expected), len(sent))):
            if i >= len(expected) or i >= len(sent):
                return (
                    "conversation",
                    f"{len(expected)} message(s)",
                    f"{len(sent)} message(s)",
                )
            want, got = expected[i], _as_dict(sent[i])
            where = _message_name(i, str(want.get("role", "")))
            if want.get("role") != got.get("role"):
                return where, f"role {want.get('role')}", f"role {got.get('role')}"
            a = self.normalize(_content(want.get("content")) + _calls(want))
            b = self.normalize(_content(got.get("content")) + _calls(got))
            if a != b:
                at = _first_difference(a, b)
                return where, _excerpt(a, at), _excerpt(b, at)
        return None


class ReplayRefusal(Exception):
    """The replay model will not answer (raised as a permanent provider error)."""


_VOLATILE = re.compile(r"\b\d+\.\d+\s?(?:s|ms|sec|seconds)\b|\(\d+:\d\d:\d\d\)")
_RULER = re.compile(r"([=\-_*~.])\1{3,}")
_BLANKS = re.compile(r"[ \t]{2,}")


def _as_dict(message: Any) -> dict[str, Any]:
    if isinstance(message, dict):
        return message
    dump = getattr(message, "model_dump", None)
    return dump() if callable(dump) else {"role": getattr(message, "role", None), "content": getattr(message, "content", None)}


def _content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return json.dumps(content, sort_keys=True, default=str)


def _calls(message: dict[str, Any]) -> str:
    """A message's tool calls (a tools-mode repair turn) and the call a tool result answers, as text."""
    calls = message.get("tool_calls")
    said = "" if not calls else " tool_calls=" + json.dumps(
        [{"id": c.get("id"), "function": dict(c.get("function") or {})} for c in (_as_dict(x) for x in calls)],
        sort_keys=True, default=str)
    answered = message.get("tool_call_id")
    return said + (f" tool_call_id={answered}" if answered else "")


def _message_name(index: int, role: str) -> str:
    if index == 0 and role == "system":
        return "system message"
    if index == 1 and role == "user":
        return "user message"
    return f"{role or 'unknown'} message {index + 1}"


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _excerpt(text: str, at: int, before: int = 15, after: int = 35) -> str:
    start = max(0, at - before)
    piece = text[start: at + after]
    piece = piece.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'")
    return ("…" if start else "") + piece + ("…" if at + after < len(text) else "")


_recordings: dict[str, Recording] = {}
_lock = threading.Lock()


def registered_recording(run_id: str) -> Recording | None:
    return _recordings.get(run_id)


def _preflight(run_id: str, _script: Path | None) -> None:
    """``check_model("replay/<run_id>")``: refuse a replay model no recording was registered for."""
    if registered_recording(run_id) is None:
        raise cannot_answer(f"{PROVIDER}/{run_id}")


register_provider(PROVIDER, _preflight)  # importing this module is what makes replay/ models known


def _recorded_mode(run_id: str, iteration: int) -> str | None:
    """The decision mode the recording used in this iteration: a replay asks the same way."""
    recording = registered_recording(run_id)
    record = recording.iterations.get(iteration) if recording is not None else None
    return record.decision_mode if record is not None else None


register_mode_source(PROVIDER, _recorded_mode)


def register_recording(recording: Recording) -> str:
    """Make ``replay/<run_id>`` answer from this recording (replacing an earlier one); returns the model string."""
    from loopterm.core.scripted import Price, register_custom_model

    with _lock:
        _recordings[recording.run_id] = recording
    register_custom_model(PROVIDER, recording.run_id, Price(), _handler_class)
    return recording.model


def _handler_class(litellm: ModuleType) -> type:
    """The litellm handler of ``replay/<run_id>`` calls (built on the scripted provider's base)."""
    from litellm.llms.custom_llm import CustomLLMError

    from loopterm.core.scripted import Step, step_handler_class

    class ReplayLLM(step_handler_class(litellm)):  # type: ignore[misc]
        """Answers with the recorded replies; refuses (400, never retried) when the prompt changed."""

        provider = PROVIDER

        def plan(self, model: str, messages: list[Any], iteration: int, call: int) -> Any:
            recording = _recordings.get(model)
            if recording is None:
                raise litellm.NotFoundError(
                    message=f"no recording registered for {PROVIDER}/{model}; `loopterm replay RUN` registers it",
                    model=model, llm_provider=PROVIDER,
                )
            try:
                reply = recording.answer(messages, iteration, call)
                record = recording.iterations[iteration]
                if record.decision_mode == "tools":
                    content, calls = read_envelope(reply)
                    return Step.recorded(content or None, calls)
                return Step.recorded(reply)
            except ReplayRefusal as exc:
                # A 400 as it is (not through self.error, which would read "context window"
                # in a prompt excerpt as a context-window error): permanent, not retried.
                raise CustomLLMError(status_code=400, message=str(exc)) from None

    return ReplayLLM


class RecordedCalls:
    """The recording's tool calls, for the replay's executor: same iteration, same tool, same arguments."""

    def __init__(self, iterations: dict[int, IterationRecord]) -> None:
        self.iterations = iterations

    def find(self, tool: str, args: dict[str, Any], iteration: int) -> ToolCallRecord | None:
        record = self.iterations.get(iteration)
        call = record.tool_call if record is not None else None
        if record is None or not call or record.tool_result is None or call.get("tool") != tool:
            return None
        if canonical(call.get("args") or {}) != canonical(args):
            return None
        return ToolCallRecord(
            key=str(call.get("key") or ""), run_id=record.run_id, iteration=iteration, tool=tool, args=args,
            status="done", result=record.tool_result, started_at=record.started_at, finished_at=record.ended_at,
        )


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def guarded(loop: Loop) -> Loop:
    """The loop with its side-effecting, non-re-executable tools unable to fire (core/tools.py: guard_tools)."""
    return loop.model_copy(update={"tools": guard_tools(loop.tools)})
