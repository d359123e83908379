"""loopterm.store: the journal of runs, in a SQLite file (the default) or a PostgreSQL database (psycopg 3,
imported only then). Never imports textual or litellm."""

from loopterm.store.db import DuplicateIterationError, Store
from loopterm.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "DuplicateIterationError", "Store"]
