"""A state as JSON, in time proportional to the change, not to the run (the engine's per-iteration dump)."""

from __future__ import annotations

from typing import Any, get_args, get_origin

import orjson
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
        decorators = state_model.__pydantic_decorators__
        plain = not (decorators.field_serializers or decorators.model_serializers)
        self._table_fields = [
            name for name, info in state_model.model_fields.items()
            if plain and get_origin(info.annotation) is dict and get_args(info.annotation)[:1] == (str,)
            and _container(get_args(info.annotation)[1]) and info.exclude is None and name not in self._appendlog_fields and name not in self._log_fields
        ]
        self._table_dumps: dict[str, dict[str, Any]] = {}
        skipped = {"tool_results", *self._log_fields, *self._appendlog_fields}
        self._order = [name for name in state_model.model_fields if name not in skipped]  # the dump's own

    def dump(self, state: LoopState) -> dict[str, Any]:
        logs, appendlogs, tables = self._log_fields, self._appendlog_fields, self._table_fields
        dump = state.model_dump(mode="json", exclude={"tool_results", *logs, *appendlogs, *tables})
        if tables:
            for name in tables:
                dump[name] = self._table_dumps[name] = self._table(state, name, self._table_dumps.get(name))
            rest = dump  # the fields in the model's order, as a whole dump has them (then extras, computed)
            dump = {name: rest.pop(name) for name in self._order if name in rest}
            dump.update(rest)
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

    @staticmethod
    def _table(state: LoopState, name: str, before: dict[str, Any] | None) -> dict[str, Any]:
        """A dict field's dump that reuses the previous dump's entry for every value still equal to it
        type-strictly (so the journal's diff skips it by identity); the others are dumped by the model
        itself (its config and serializers apply). Equality, not identity, decides: a loop may change a
        value in place."""
        value: dict[str, Any] = getattr(state, name)
        if before is None:
            return state.model_dump(mode="json", include={name})[name]  # type: ignore[no-any-return]
        out: dict[str, Any] = {}
        kept: list[str] = []
        fresh: dict[str, bool] = {}
        get = before.get
        for key, item in value.items():
            old = get(key, _MISS)
            if old is not _MISS and type(old) is type(item) and old == item:
                out[key] = old
                kept.append(key)
            else:
                out[key] = _MISS
                fresh[key] = True
        if kept and not _strict_same([value[key] for key in kept], [out[key] for key in kept]):
            return state.model_dump(mode="json", include={name})[name]  # type: ignore[no-any-return]
        if fresh:
            dumped = state.model_dump(mode="json", include={name: fresh})[name]
            for key in fresh:
                out[key] = dumped[key]
        return out


_MISS: Any = object()


def _container(annotation: Any) -> bool:
    """Values worth reusing: dicts and lists (or Any); a table of scalars dumps faster whole."""
    return annotation is Any or annotation in (dict, list) or get_origin(annotation) in (dict, list)


def _strict_same(a: list[Any], b: list[Any]) -> bool:
    """Equal type-strictly (1, 1.0, True and 0.0, -0.0 apart): orjson writes them differently. What it
    cannot write (big integers, other types) answers False, and the caller dumps afresh."""
    try:
        return orjson.dumps(a) == orjson.dumps(b)
    except TypeError:
        return False
