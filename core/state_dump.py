"""A state as JSON, in time proportional to the change, not to the run (the engine's per-iteration dump)."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import TypeAdapter

from loopterm.core.append_log import AppendLog
from loopterm.core.persistence import GrownList
from loopterm.core.state import LoopState, ToolRecord


def _grown(before: list[Any], appended: list[Any]) -> GrownList:
    """The next dump of a log field; `before`'s own base is dropped (the journal has taken its
    delta), so no chain of old lists is kept alive."""
    if isinstance(before, GrownList):
        before.base = None
    return GrownList(before, appended)


class StateDump:
    """Dumps one run's successive states, reusing what did not change.

    Tool records are never edited once made, so each one's dump is cached (by identity) and reused
    while the record is in the state's window. Log-like fields (AppendLog, list[str]) are dumped as
    `GrownList`s when they only grew. Each dump is handed over to the journal
    (commit_iteration(handover=True)): nothing in it is changed afterwards, so each gets its own outer list.
    """

    def __init__(self, state_model: type[LoopState]) -> None:
        self._record_dumps: dict[int, tuple[ToolRecord, dict[str, Any]]] = {}
        self._log_dumps: dict[str, list[Any]] = {}
        self._log_versions: dict[str, AppendLog[Any]] = {}
        self._appendlog_fields = {
            name: TypeAdapter(list[get_args(info.annotation)[0]] if get_args(info.annotation) else list[Any])
            for name, info in state_model.model_fields.items()
            if info.annotation is AppendLog or get_origin(info.annotation) is AppendLog
        }
        self._log_fields = [
            name for name, info in state_model.model_fields.items()
            if name != "tool_results" and info.annotation == list[str]
        ]

    def dump(self, state: LoopState) -> dict[str, Any]:
        logs, appendlogs = self._log_fields, self._appendlog_fields
        dump = state.model_dump(mode="json", exclude={"tool_results", *logs, *appendlogs})
        for name, items in appendlogs.items():  # AppendLog fields: an append is known by construction
            log: AppendLog[Any] = getattr(state, name)
            before, version = self._log_dumps.get(name), self._log_versions.get(name)
            if before is not None and version is not None and log.extends(version) and len(before) == len(version):
                dump[name] = _grown(before, items.dump_python(log[len(version):], mode="json"))
            else:
                dump[name] = items.dump_python(list(log), mode="json")
            self._log_dumps[name], self._log_versions[name] = dump[name], log
        for name in logs:  # list[str] fields: an append is found with one comparison, not re-dumped
            value: list[str] = getattr(state, name)
            before = self._log_dumps.get(name)
            k = len(before) if before is not None else -1
            if before is not None and len(value) >= k and value[:k] == before:
                dump[name] = _grown(before, value[k:])
            else:
                dump[name] = list(value)
            self._log_dumps[name] = dump[name]
        cached = self._record_dumps
        dumps: dict[int, tuple[ToolRecord, dict[str, Any]]] = {}
        for record in state.tool_results:
            hit = cached.get(id(record))
            dumps[id(record)] = hit if hit is not None and hit[0] is record else (record, record.model_dump(mode="json"))
        self._record_dumps = dumps  # holds the records, so their ids stay theirs
        dump["tool_results"] = [dumps[id(record)][1] for record in state.tool_results]
        return dump
