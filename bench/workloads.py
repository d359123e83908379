"""The state shapes both systems run in the benchmarks (timetravel.py, shapes.py), as data and functions.

Each workload is written once as pure functions of the iteration number, so both systems store
exactly the same values, and then twice more the way each system's user would write its step:

  list    20 scalars (two change each iteration) plus a list growing by one 200-byte item per
          iteration: timetravel.py's workload. loopterm: an `AppendLog[str]` field; LangGraph:
          `Annotated[list[str], operator.add]` (the node returns the new item).
  nested  a dict of 200 records, each a dict of 5 fields (str, int, float, bool, str); 5 records
          rewritten per iteration (keys (i*7 + j) % 200, j < 5); nothing grows. loopterm: a
          `dict[str, dict[str, Any]]` field replaced by `{**old, **changed}`; LangGraph: a dict
          channel with a merging reducer, the node returning only the 5 changed records (the
          idiomatic partial update; a plain channel would make the node return all 200).
  chat    a transcript of {"role", "content"} messages, content 200-600 characters; 1 or 2
          messages appended per iteration, and every 8th iteration the oldest dropped down to
          the newest 28 (so it never holds more than 40). loopterm: a `list[dict[str, str]]`
          field replaced by the new list; LangGraph: a plain list channel the node replaces
          (add_messages would turn the dicts into message objects with ids, another shape).

The "i" of iteration i is loopterm's `state.iteration` (1 on the first) and LangGraph's
`state["step"] + 1`; both keep `step == i` in the state.
"""

from __future__ import annotations

import hashlib
import operator
from typing import Any

ITEM_BYTES = 200
SCALARS = 20  # scalar fields of the list workload (two of them change each iteration)
RECORDS = 200  # records in the nested workload
CHANGED = 5  # records rewritten per iteration
CHAT_KEEP = 28  # messages left after a prune
CHAT_PRUNE_EVERY = 8  # iterations between prunes
CHAT_MAX = 40  # the most messages the transcript ever holds (CHAT_KEEP + 1.5 per iteration * 8)


def item(i: int) -> str:
    """The 200-byte item appended at iteration i (hex, so it does not compress away)."""
    text = f"item {i:06d} " + hashlib.sha256(str(i).encode()).hexdigest() * 4
    return text[:ITEM_BYTES]


def digest(i: int) -> str:
    return hashlib.sha256(f"checksum {i}".encode()).hexdigest()[:16]


def scalar_defaults() -> dict[str, Any]:
    """The 20 scalar fields and their starting values: `step` and `checksum` change every iteration."""
    values: dict[str, Any] = {"step": 0, "checksum": ""}
    for k in range(2, SCALARS):
        kind = k % 4
        values[f"f{k:02d}"] = [f"value {k}", k * 1000, k / 7, k % 2 == 0][kind]
    return values


class Workload:
    """One state shape: its values at every iteration, and each system's idiomatic step."""

    name = ""
    summary = ""

    def initial(self) -> dict[str, Any]:
        """The workload's own fields before iteration 1 (`step` included)."""
        raise NotImplementedError

    def expected(self, i: int) -> dict[str, Any]:
        """The fields after iteration i, computed from scratch: what a loaded state must equal."""
        raise NotImplementedError

    def loopterm_fields(self) -> dict[str, Any]:
        """`create_model` field definitions for the LoopState subclass."""
        return {name: (type(value), value) for name, value in self.initial().items()}

    def loopterm_update(self, state: Any, i: int) -> dict[str, Any]:
        """What `Loop.observe` passes to `state.model_copy(update=...)` at iteration i."""
        raise NotImplementedError

    def langgraph_channels(self) -> dict[str, Any]:
        """TypedDict annotations of the graph state (the harness adds `stop_at`)."""
        return {name: type(value) for name, value in self.initial().items()}

    def langgraph_update(self, values: dict[str, Any], i: int) -> dict[str, Any]:
        """What the LangGraph node returns at iteration i."""
        raise NotImplementedError

    def langgraph_disk(self, n: int) -> float:
        """A generous estimate of LangGraph's database bytes after n iterations (for the free-disk check)."""
        raise NotImplementedError


class GrowingList(Workload):
    name = "list"
    summary = "20 scalars + a list growing by one 200-byte item per iteration"

    def initial(self) -> dict[str, Any]:
        return {**scalar_defaults(), "items": []}

    def expected(self, i: int) -> dict[str, Any]:
        return {**scalar_defaults(), "step": i, "checksum": digest(i) if i else "",
                "items": [item(k) for k in range(1, i + 1)]}

    def loopterm_fields(self) -> dict[str, Any]:
        from pydantic import Field

        from loopterm.core import AppendLog

        fields = {name: (type(value), value) for name, value in scalar_defaults().items()}
        # loopterm's idiom for a growing list (as LangGraph's is a reducer, operator.add): appending
        # is O(1) and the engine knows the old list is a prefix without comparing them.
        return {**fields, "items": (AppendLog[str], Field(default_factory=AppendLog))}

    def loopterm_update(self, state: Any, i: int) -> dict[str, Any]:
        return {"step": i, "checksum": digest(i), "items": state.items.appended(item(i))}

    def langgraph_channels(self) -> dict[str, Any]:
        from typing import Annotated

        return {**{name: type(value) for name, value in scalar_defaults().items()},
                "items": Annotated[list[str], operator.add]}

    def langgraph_update(self, values: dict[str, Any], i: int) -> dict[str, Any]:
        return {"step": i, "checksum": digest(i), "items": [item(i)]}

    def langgraph_disk(self, n: int) -> float:
        return 1.2 * (ITEM_BYTES + 6) * n * n / 2  # the whole list at every step


def record_key(k: int) -> str:
    return f"r{k:03d}"


def record(k: int, i: int) -> dict[str, Any]:
    """Record k as written at iteration i (0: its initial value): 5 fields of mixed types."""
    return {"name": f"record {k:03d}", "count": i * 10 + k, "score": i / 7 + k, "active": (i + k) % 2 == 0,
            "note": hashlib.sha256(f"{k}.{i}".encode()).hexdigest()[:24]}


def changed_keys(i: int) -> list[int]:
    """The records rewritten at iteration i (deterministic, distinct)."""
    return [(i * 7 + j) % RECORDS for j in range(CHANGED)]


class NestedRecords(Workload):
    name = "nested"
    summary = f"a dict of {RECORDS} records of 5 fields, {CHANGED} rewritten per iteration, nothing grows"

    def initial(self) -> dict[str, Any]:
        return {"step": 0, "records": {record_key(k): record(k, 0) for k in range(RECORDS)}}

    def expected(self, i: int) -> dict[str, Any]:
        last = dict.fromkeys(range(RECORDS), 0)
        for n in range(1, i + 1):
            for k in changed_keys(n):
                last[k] = n
        return {"step": i, "records": {record_key(k): record(k, last[k]) for k in range(RECORDS)}}

    def loopterm_fields(self) -> dict[str, Any]:
        return {"step": (int, 0), "records": (dict[str, dict[str, Any]], self.initial()["records"])}

    def loopterm_update(self, state: Any, i: int) -> dict[str, Any]:
        changed = {record_key(k): record(k, i) for k in changed_keys(i)}
        return {"step": i, "records": {**state.records, **changed}}

    def langgraph_channels(self) -> dict[str, Any]:
        from typing import Annotated

        return {"step": int, "records": Annotated[dict[str, dict[str, Any]], merge]}

    def langgraph_update(self, values: dict[str, Any], i: int) -> dict[str, Any]:
        return {"step": i, "records": {record_key(k): record(k, i) for k in changed_keys(i)}}

    def langgraph_disk(self, n: int) -> float:
        return 2.0 * RECORDS * 130 * n  # the whole dict at every step


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """LangGraph reducer: the node's records replace those keys, the others stay."""
    return {**old, **new}


def message(i: int, k: int, role: str) -> dict[str, str]:
    """Message k of iteration i: 200-600 characters of deterministic text."""
    length = 200 + (i * 131 + k * 71) % 401
    seed = hashlib.sha256(f"{i}.{k}".encode()).hexdigest()
    return {"role": role, "content": (f"{role} {i}.{k}: " + seed * (length // 64 + 1))[:length]}


def new_messages(i: int) -> list[dict[str, str]]:
    """The messages iteration i adds: a tool result and the assistant's turn on even iterations, the turn alone on odd."""
    if i % 2:
        return [message(i, 0, "assistant")]
    return [message(i, 0, "tool"), message(i, 1, "assistant")]


def chat_after(messages: list[dict[str, str]], i: int) -> list[dict[str, str]]:
    """The transcript after iteration i, given the one before it (a new list; the old is unchanged)."""
    grown = [*messages, *new_messages(i)]
    if i % CHAT_PRUNE_EVERY == 0 and len(grown) > CHAT_KEEP:
        return grown[-CHAT_KEEP:]
    return grown


class ChatTranscript(Workload):
    name = "chat"
    summary = f"a transcript of 200-600-char messages, +1-2 per iteration, pruned to {CHAT_KEEP} every {CHAT_PRUNE_EVERY}"

    def initial(self) -> dict[str, Any]:
        return {"step": 0, "messages": []}

    def expected(self, i: int) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        for n in range(1, i + 1):
            messages = chat_after(messages, n)
        return {"step": i, "messages": messages}

    def loopterm_fields(self) -> dict[str, Any]:
        from pydantic import Field

        return {"step": (int, 0), "messages": (list[dict[str, str]], Field(default_factory=list))}

    def loopterm_update(self, state: Any, i: int) -> dict[str, Any]:
        return {"step": i, "messages": chat_after(state.messages, i)}

    def langgraph_channels(self) -> dict[str, Any]:
        return {"step": int, "messages": list[dict[str, str]]}

    def langgraph_update(self, values: dict[str, Any], i: int) -> dict[str, Any]:
        return {"step": i, "messages": chat_after(values["messages"], i)}

    def langgraph_disk(self, n: int) -> float:
        return 2.0 * CHAT_MAX * 420 * n  # the whole transcript at every step


WORKLOADS: dict[str, Workload] = {w.name: w for w in (GrowingList(), NestedRecords(), ChatTranscript())}
