"""loopterm.store: the SQLite journal of runs (sqlite-utils). Never imports textual or litellm."""

from loopterm.store.db import DuplicateIterationError, Store
from loopterm.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "DuplicateIterationError", "Store"]
