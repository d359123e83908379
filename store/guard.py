"""Decide whether a file may be used as the store, without writing to it.

A person may point `--db` at the wrong file. Everything here reads only (the
SQLite check uses a `mode=ro` connection), so a file that is refused is left
byte-identical: no tables, no WAL switch, no journal.
"""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from sqlite_utils import Database

from loopterm.core.errors import ConfigError
from loopterm.store.schema import APP, SCHEMA_VERSION, TABLES_BY_VERSION

SQLITE_HEADER = b"SQLite format 3\x00"
OTHER_PATH = "pass --db with another path"


def one_line(text: object) -> str:
    """Collapse an OS or SQLite message so the error stays one line."""
    return " ".join(str(text).split())


def check_file(path: Path, *, create: bool) -> int:
    """The schema version of the loopterm database at `path`; 0 if it needs the schema.

    A version below SCHEMA_VERSION is returned as is: the Store migrates it.
    Raises ConfigError (one line: what is wrong, what to do) for anything else.
    """
    missing = f"no loopterm database at {path}; run a loop first or pass --db"
    try:
        info = path.stat()
    except FileNotFoundError:
        if not create:
            raise ConfigError(missing) from None
        return 0
    except NotADirectoryError:
        raise ConfigError(f"cannot use {path}: a part of that path is a file, not a folder; {OTHER_PATH}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {one_line(exc.strerror)}; check its permissions or {OTHER_PATH}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is a folder, not a database file; {OTHER_PATH}")
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {one_line(exc.strerror)}; check its permissions or {OTHER_PATH}") from None
    if not header:  # an empty file is an empty SQLite database
        if not create:
            raise ConfigError(missing)
        return 0
    if header != SQLITE_HEADER:
        raise ConfigError(f"{path} is not a SQLite database (it holds other data); {OTHER_PATH}")
    try:
        conn = sqlite3.connect(probe_uri(path), uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}") from None
    try:
        db = Database(conn, recursive_triggers=False, execute_plugins=False)
        version = classify(db, path)
    except sqlite3.OperationalError as exc:  # locked, unreadable -wal/-shm, ...
        raise ConfigError(f"cannot read {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}") from None
    except sqlite3.DatabaseError as exc:  # corrupt pages, a torn header

        raise ConfigError(f"{path} is a damaged SQLite database ({one_line(exc)}); restore it from a backup or {OTHER_PATH}") from None
    finally:
        conn.close()
    if not version and not create:
        raise ConfigError(missing)
    return version


def probe_uri(path: Path) -> str:
    """A read-only URI that leaves no -wal/-shm files next to a WAL-format file nobody has open.

    `mode=ro` on a WAL-format file creates those sidecars. When there is no
    -wal file, no connection is live and the main file holds every commit,
    so `immutable=1` reads it without locks or sidecars.
    """
    uri = path.resolve().as_uri()
    with path.open("rb") as handle:
        header = handle.read(20)
    wal_format = len(header) == 20 and header[18] == 2
    sidecar = path.with_name(path.name + "-wal")
    return f"{uri}?immutable=1" if wal_format and not sidecar.exists() else f"{uri}?mode=ro"


def classify(db: Database, path: Path) -> int:
    """The schema version of a loopterm database this code can use or migrate, 0 for an empty one; else ConfigError."""
    objects = db.execute("SELECT name FROM sqlite_master").fetchall()
    if not objects:
        return 0
    not_ours = f"{path} is a SQLite database but not a loopterm database; {OTHER_PATH}"
    if "meta" not in db.table_names():
        raise ConfigError(not_ours)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError:  # a `meta` table of someone else's shape
        raise ConfigError(not_ours) from None
    if meta.get("app") != APP:
        raise ConfigError(not_ours)
    damaged = f"{path} is a damaged loopterm database"
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise ConfigError(f"{damaged} (schema_version {meta.get('schema_version')!r}); restore it from a backup or {OTHER_PATH}") from None
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{path} was written by a newer loopterm (schema {version} > {SCHEMA_VERSION}); upgrade loopterm")
    if version < 1:
        raise ConfigError(f"{damaged} (schema_version {version}); restore it from a backup or {OTHER_PATH}")
    if version not in TABLES_BY_VERSION:
        raise ConfigError(f"{damaged} (schema_version {version}); restore it from a backup or {OTHER_PATH}")
    missing = [name for name in TABLES_BY_VERSION[version] if name not in db.table_names()]
    if missing:
        raise ConfigError(f"{damaged} (missing tables: {', '.join(missing)}); restore it from a backup or {OTHER_PATH}")
    return version
