"""Decide whether a file may be used as the store, without writing to it.

A person may point `--db` at the wrong file. Everything here reads only (the
SQLite check uses a `mode=ro` connection), so a file that is refused is left
byte-identical: no tables, no WAL switch, no journal.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from loopterm.core.errors import ConfigError
from loopterm.core.text import one_line
from loopterm.store.schema import TABLES_BY_VERSION, stored_version

SQLITE_HEADER = b"SQLite format 3\x00"
HEADER_BYTES = 100  # the database header, at the start of page 1
OTHER_PATH = "pass --db with another path"


# SQLite's primary result codes (an extended code keeps its primary one in the low byte).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 10, 11, 13, 14
SQLITE_NOTADB = 26
RESUME_HINT = "nothing already committed is lost (`loopterm resume RUN` continues a run from its last committed iteration)"


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an error from sqlite3, or None for anything else."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return code & 0xFF if isinstance(code, int) else None


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY: another connection holds the lock longer than the busy timeout (retrying may succeed)."""
    return sqlite_code(exc) == SQLITE_BUSY


def folder_read_only(path: Path) -> bool:
    """Whether the folder that holds `path` refuses new files (SQLite creates -wal and -shm files there)."""
    folder = path.parent
    return folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK)


def describe_failure(exc: BaseException, path: Path) -> tuple[str, bool] | None:
    """One line for a SQLite failure of the store at `path` (what is wrong, what to do), and whether it is the
    person's input (a damaged or unwritable file: exit 2) rather than a fault of the moment (exit 1).

    None for anything that is not a SQLite error. Never repeats "database is locked": a person is told
    what holds the file and what to do.
    """
    code = sqlite_code(exc)
    if code is None:
        return None
    detail = one_line(exc)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return (f"{path} stayed locked by another process for too long; let that process finish (or close it) and "
                f"try again; {RESUME_HINT}"), False
    if code == SQLITE_FULL:
        return f"cannot write {path}: the disk is full; free some space, then try again; {RESUME_HINT}", False
    if code == SQLITE_IOERR:
        return (f"cannot use {path}: {detail} (a full disk, a file size limit or a failing disk); fix that, then "
                f"try again; {RESUME_HINT}"), False
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return f"{path} is a damaged SQLite database ({detail}); restore it from a backup or {OTHER_PATH}", True
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN):
        if folder_read_only(path):
            return (f"cannot use {path}: its folder {path.parent} is read-only (the store keeps {path.name}-wal and "
                    f"{path.name}-shm beside it); make the folder writable or {OTHER_PATH}"), True
        verb = "write" if code == SQLITE_READONLY else "open"
        return f"cannot {verb} {path}: {detail}; check its permissions or {OTHER_PATH}", True
    return f"the store {path} failed: {detail}; {RESUME_HINT}", False


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
            first = handle.read(HEADER_BYTES)
            size = os.fstat(handle.fileno()).st_size  # after the read: a file being created grows, never shrinks
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {one_line(exc.strerror)}; check its permissions or {OTHER_PATH}") from None
    header = first[: len(SQLITE_HEADER)]
    if not header:  # an empty file is an empty SQLite database
        if not create:
            raise ConfigError(missing)
        return 0
    if header != SQLITE_HEADER:
        raise ConfigError(f"{path} is not a SQLite database (it holds other data); {OTHER_PATH}")
    torn = torn_size(first, size)
    if torn:  # SQLite reads a torn last page as zeros and would write on over it
        raise ConfigError(f"{path} is a damaged SQLite database (truncated: {torn}); restore it from a backup or {OTHER_PATH}")
    try:
        conn = sqlite3.connect(probe_uri(path), uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}") from None
    try:
        db = Database(conn, recursive_triggers=False, execute_plugins=False)
        version = classify(db, path)
    except sqlite3.OperationalError as exc:  # locked, unreadable -wal/-shm, a full disk, ...
        described = describe_failure(exc, path)
        if described is not None and not described[1]:
            raise  # a fault of the moment (locked too long, a full or failing disk): the CLI says so, exit 1
        raise ConfigError(described[0] if described else
                          f"cannot read {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}") from None
    except sqlite3.DatabaseError as exc:  # corrupt pages, a torn header

        raise ConfigError(f"{path} is a damaged SQLite database ({one_line(exc)}); restore it from a backup or {OTHER_PATH}") from None
    finally:
        conn.close()
    if not version and not create:
        raise ConfigError(missing)
    return version


def torn_size(first: bytes, size: int) -> str:
    """Why a SQLite file of `size` bytes starting with `first` cannot be whole ("" if it can).

    A database file is always a whole number of pages (WAL mode included: the WAL is a separate
    file), and at least one page long.
    """
    if len(first) < HEADER_BYTES:
        return f"{size} bytes, shorter than its own header"
    page_size = int.from_bytes(first[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return ""  # not a page size at all: SQLite itself reports the file as damaged
    if size < page_size or size % page_size:
        return f"{size} bytes is not a whole number of {page_size}-byte pages"
    return ""


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
    damaged = f"{path} is a damaged loopterm database"
    version = stored_version(meta, path, not_ours=not_ours, damaged=damaged,
                             restore=f"restore it from a backup or {OTHER_PATH}")
    if version < 1:
        raise ConfigError(f"{damaged} (schema_version {version}); restore it from a backup or {OTHER_PATH}")
    if version not in TABLES_BY_VERSION:
        raise ConfigError(f"{damaged} (schema_version {version}); restore it from a backup or {OTHER_PATH}")
    missing = [name for name in TABLES_BY_VERSION[version] if name not in db.table_names()]
    if missing:
        raise ConfigError(f"{damaged} (missing tables: {', '.join(missing)}); restore it from a backup or {OTHER_PATH}")
    return version


def when_unlocked(action: Callable[[], Any], seconds: float) -> None:
    """Do `action`, trying again for a while if another connection has the file locked.

    Two processes creating the same new database at once both switch it to WAL; SQLite answers the
    loser SQLITE_BUSY at once, without its busy handler (measured: about 1 open in 200 of four racing).
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def open_failure(exc: sqlite3.Error, path: Path) -> Exception:
    """What opening the store failed with: a fault of the moment (locked, full, I/O) as the SQLite error
    itself, for the caller to report and retry; anything about the file as a one-line ConfigError."""
    described = describe_failure(exc, path)
    if described is None or described[1]:
        return ConfigError(described[0] if described else f"cannot open {path}: {one_line(exc)}; check its permissions or {OTHER_PATH}")
    return exc
