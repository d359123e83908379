"""Map the pydantic records of core to SQLite rows and back.

Scalars go to typed columns so SQL can filter and sum them; nested values
(prompt, state, ...) go to TEXT columns as JSON. The mapping is lossless:
reading a row back validates into a model equal to the one written.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, TypeVar

from pydantic import BaseModel

from loopterm.store.delta import dumps_fast, loads
from loopterm.store.schema import JSON_COLUMNS

M = TypeVar("M", bound=BaseModel)


def dump_json(value: Any) -> str:
    """JSON text for a column; non-ASCII kept as is so large unicode stays compact (orjson: this runs
    for every JSON column of every row written)."""
    return dumps_fast(value, _dump_json_slow)


def _dump_json_slow(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def args_hash(args: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of tool arguments: key order and spacing do not matter."""
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def to_row(table: str, record: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    """One row for `table`; None stays SQL NULL, even in a JSON column."""
    return encode(table, record.model_dump(exclude=exclude))


def encode(table: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Encode the JSON columns among `fields` (a whole row or a partial update)."""
    json_columns = JSON_COLUMNS[table]
    return {
        name: dump_json(value) if name in json_columns and value is not None else value
        for name, value in fields.items()
    }


def from_row(table: str, model: type[M], row: dict[str, Any]) -> M:
    """Validate a row back into its record."""
    json_columns = JSON_COLUMNS[table]
    decoded = {
        name: loads(value) if name in json_columns and value is not None else value
        for name, value in row.items()
    }
    return model.model_validate(decoded)


@functools.lru_cache(maxsize=256)  # statements by table and columns: each iteration writes the same few
def insert_sql(table: str, replace: bool, names: tuple[str, ...]) -> str:
    columns, marks = ", ".join(f"[{name}]" for name in names), ", ".join("?" * len(names))
    return f"{'INSERT OR REPLACE' if replace else 'INSERT'} INTO [{table}] ({columns}) VALUES ({marks})"


@functools.lru_cache(maxsize=256)
def update_run_sql(names: tuple[str, ...]) -> str:
    return f"UPDATE runs SET {', '.join(f'[{name}] = ?' for name in names)} WHERE id = ?"
