"""`AppendLog`: an immutable sequence that grows by appending, sharing storage with its past versions.

A state field that only ever grows (a transcript, observations, a history) is the
one thing that makes a naive state cost O(run length) per iteration: copying the
list to append, comparing it to find what changed, freeing the old copy. An
`AppendLog` makes the append O(1) and proves the old version is a prefix of the
new one by identity (same storage, shorter length), so the engine stores only the
new items without comparing anything.

    class Notes(LoopState):
        seen: AppendLog[str] = AppendLog()

    state.model_copy(update={"seen": state.seen.appended("a finding")})

Versions never change: appending to the newest version extends the shared storage
in place (no existing version sees beyond its own length); appending to an older
version copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, get_args, overload

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

T = TypeVar("T")


class AppendLog(Sequence[T], Generic[T]):
    __slots__ = ("_items", "_n")

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._items: list[T] = list(items)
        self._n = len(self._items)

    def appended(self, *items: T) -> AppendLog[T]:
        """A new version with `items` at the end; this one is unchanged."""
        if self._n == len(self._items):
            storage = self._items  # the newest version: extend the shared storage
            storage.extend(items)
        else:
            storage = [*self._items[: self._n], *items]
        view: AppendLog[T] = AppendLog.__new__(AppendLog)
        view._items, view._n = storage, self._n + len(items)
        return view

    def extends(self, other: AppendLog[Any]) -> bool:
        """Whether `other` is a prefix of this log by construction (O(1), no comparison)."""
        return self._items is other._items and other._n <= self._n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            return self._items[start:stop:step]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError("AppendLog index out of range")
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        items = self._items
        for i in range(self._n):
            yield items[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AppendLog):
            return self._n == other._n and (self.extends(other) or self._items[: self._n] == other._items[: other._n])
        if isinstance(other, (list, tuple)):
            return self._items[: self._n] == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AppendLog({self._items[: self._n]!r})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        args = get_args(source)
        items = handler.generate_schema(list[args[0]] if args else list[Any])  # type: ignore[valid-type]
        from_list = core_schema.no_info_after_validator_function(cls, items)
        return core_schema.json_or_python_schema(
            json_schema=from_list,
            python_schema=core_schema.union_schema([core_schema.is_instance_schema(cls), from_list]),
            serialization=core_schema.wrap_serializer_function_ser_schema(
                lambda value, serialize: serialize(value._items[: value._n]), schema=items
            ),
        )
