"""The PostgreSQL side of the store: a connection that quacks like the parts of sqlite3.Connection the
Store uses, so there is one body of store logic for both backends.

Every difference between the dialects is here, each with why:

- placeholders: `?` / `?N` become `$N` (a RawCursor: server-side parameters, so a literal `%` needs no escaping);
- `BEGIN IMMEDIATE` is `BEGIN`: PostgreSQL locks rows, not the file, so there is no write lock to take early;
- `PRAGMA synchronous = NORMAL` (a write that may be lost on power loss) is `synchronous_commit = off` for
  that write (FULL resets it to the server's setting), which promises the same: a crash of the client loses
  nothing, a crash of the server may lose the last commits; other PRAGMAs mean nothing here and are dropped;
- `length(CAST(x AS BLOB))` (bytes of a value) is `octet_length(x)`;
- `json_extract(doc, '$.key')` is the schema's `loopterm_json_extract` (a name no other software in a shared
  database will have taken);
- `lastrowid` does not exist: an INSERT into a table with an identity `id` gets `RETURNING id`;
- text cannot hold NUL: every string parameter is escaped (NUL -> \\x01 "0", \\x01 -> \\x01 \\x01) and every text
  result unescaped, so any text round-trips exactly; JSON text never holds a raw control character, so JSON
  columns are unchanged by it;
- `states.body`, the one bytea column, holds what SQLite keeps as TEXT or BLOB: a body that is not zlib (which
  always starts with "x", JSON never does) comes back as text, as SQLite gives it;
- `numeric` results (sum of bigints) come back as int when whole, as SQLite's integers do.

psycopg is imported only here, and only when a postgresql:// store is opened.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeGuard
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from loopterm.core.errors import ConfigError
from loopterm.core.text import one_line

SCHEMES = ("postgresql://", "postgres://")
CHANNEL = "loopterm"  # LISTEN/NOTIFY channel; payload "kind:run_id" (see pg_schema's triggers)
CONNECT_TIMEOUT_S = 10
ESC = "\x01"
ID_TABLES = ("events", "commands")  # tables whose INSERT the Store reads lastrowid of
LISTEN_POLL_S = 0.25  # how often a listener thread looks whether it was unsubscribed


def is_url(target: object) -> TypeGuard[str]:
    """Whether `target` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(SCHEMES)


def redact(url: str) -> str:
    """The URL with any password replaced by ***, in the user part and in the query string."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _password(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        found = parts.password
        for key, value in parse_qsl(parts.query):
            if key.lower() == "password":
                found = value
        return found or None
    except ValueError:
        return None


def scrub(text: str, url: str) -> str:
    """A message about `url` with its password removed wherever it appears."""
    secret = _password(url)
    text = text.replace(url, redact(url))
    return text.replace(secret, "***") if secret else text


# -- text escaping ------------------------------------------------------------------------------

_UNESCAPE = re.compile("\x01(.)", re.S)
_UNESCAPED = {ESC: ESC, "0": "\x00"}


def escape(text: str) -> str:
    """Text PostgreSQL can store (no NUL), reversibly."""
    if ESC in text or "\x00" in text:
        return text.replace(ESC, ESC + ESC).replace("\x00", ESC + "0")
    return text


def unescape(text: str) -> str:
    if ESC in text:
        return _UNESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), text)
    return text


# -- SQL translation -----------------------------------------------------------------------------

_TOKENS = re.compile(r"""'(?:[^']|'')*'|"[^"]*"|\[([A-Za-z_]\w*)\]|\?(\d*)""")
_BLOB_LENGTH = re.compile(r"length\(CAST\(([\w.]+) AS BLOB\)\)", re.I)
_JSON_EXTRACT = re.compile(r"\bjson_extract\(", re.I)
_INSERT = re.compile(r'^INSERT\s+(OR\s+(?:IGNORE|REPLACE)\s+)?INTO\s+"?(\w+)"?\s*\(([^)]*)\)', re.I)
_PRAGMAS = {
    "PRAGMA synchronous = NORMAL": "SET synchronous_commit = off",
    "PRAGMA synchronous = FULL": "RESET synchronous_commit",  # back to what the server or database says
}
# INSERT OR REPLACE becomes an upsert on the table's primary key (the only unique key of the tables it is used on).
PRIMARY_KEYS = {"intents": ("run_id", "n"), "tool_calls": ("key",), "meta": ("key",), "blobs": ("hash",)}


@lru_cache(maxsize=1024)
def translate(sql: str) -> tuple[str | None, bool]:
    """SQLite's SQL as PostgreSQL runs it (None: nothing to run), and whether it returns the new row's id."""
    text = sql.strip()
    upper = text.upper()
    if upper.startswith("BEGIN IMMEDIATE"):
        return "BEGIN", False
    if upper.startswith("PRAGMA"):
        return _PRAGMAS.get(" ".join(text.split())), False
    counter = 0

    def token(match: re.Match[str]) -> str:
        nonlocal counter
        whole = match.group(0)
        if whole[:1] == "[":
            return f'"{match.group(1)}"'  # SQLite's [identifier]
        if whole[:1] != "?":
            return whole  # a quoted literal or identifier
        if match.group(2):
            return "$" + match.group(2)
        counter += 1
        return f"${counter}"

    text = _TOKENS.sub(token, text)
    text = _BLOB_LENGTH.sub(r"octet_length(\1)", text)
    text = _JSON_EXTRACT.sub("loopterm_json_extract(", text)
    returning = False
    found = _INSERT.match(text)
    if found:
        verb, table = (found.group(1) or "").split(), found.group(2).lower()
        if verb:
            text = "INSERT INTO" + text[found.start(2) - (1 if text[found.start(2) - 1] == '"' else 0) - 1:]
            if verb[-1].upper() == "IGNORE":
                text += " ON CONFLICT DO NOTHING"
            else:
                keys = PRIMARY_KEYS[table]
                columns = [c.strip().strip('"') for c in found.group(3).split(",")]
                sets = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in keys)
                text += f" ON CONFLICT ({', '.join(keys)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING")
        if table in ID_TABLES and "RETURNING" not in upper:
            text += " RETURNING id"
            returning = True
    return text, returning


# -- the connection ------------------------------------------------------------------------------


class PgCursor:
    """What the Store reads of a cursor: rows (fetched eagerly), rowcount, lastrowid, description."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int, description: Any, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.description = description
        self.lastrowid = lastrowid

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class PgConnection:
    """A psycopg connection in autocommit mode that the Store drives with explicit BEGIN / COMMIT, as it does
    SQLite's; see the module for what it translates.

    A connection the server dropped (a restart, a failover, an idle timeout) is made again at the next
    statement outside a transaction; inside one, statements fail until the Store rolls back, so a
    transaction is never split across two connections.
    """

    def __init__(self, raw: Any, url: str) -> None:
        import psycopg

        self._raw = raw
        self._url = url
        self._tx = False  # a BEGIN was sent and neither COMMIT nor ROLLBACK since
        self.closed = False
        self.reconnects = 0
        self.Error = psycopg.Error
        self.IntegrityError = psycopg.IntegrityError
        self.OperationalError = psycopg.OperationalError
        self.DatabaseError = psycopg.DatabaseError
        self.ProgrammingError = psycopg.ProgrammingError

    def _alive(self) -> None:
        """Outside a transaction: make the connection again if the server dropped it."""
        if self.closed:
            raise self.ProgrammingError("the store is closed")
        if self._raw.broken or self._raw.closed:
            import psycopg

            raw = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                  cursor_factory=psycopg.RawCursor)
            _configure(raw)
            self._raw.close()
            self._raw = raw
            self.reconnects += 1

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        text, returning = translate(sql)
        if text is None:
            return PgCursor([], -1, None, None)
        begins = text.upper().startswith("BEGIN")
        if begins or not self._tx:
            self._alive()
        self._tx = self._tx or begins
        cursor = self._raw.cursor()
        cursor.execute(text, list(params) if params else None)
        rows = cursor.fetchall() if cursor.description is not None else []
        lastrowid = int(rows[0][0]) if returning and rows else None
        return PgCursor(rows, cursor.rowcount, cursor.description, lastrowid)

    def execute_raw(self, sql: str) -> None:
        """PostgreSQL's own SQL (DDL), untranslated."""
        self._raw.execute(sql)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        text, _ = translate(sql)
        if text is None or not rows:
            return
        if not self._tx:
            self._alive()
        with self._raw.cursor() as cursor:
            cursor.executemany(text, [list(row) for row in rows])

    def _status(self) -> str:
        from psycopg.pq import TransactionStatus

        status = self._raw.info.transaction_status
        return "in" if status == TransactionStatus.INTRANS else "failed" if status == TransactionStatus.INERROR else ""

    @property
    def in_transaction(self) -> bool:
        return self._status() != ""

    def commit(self) -> None:
        """COMMIT; a transaction a statement of which failed is rolled back and reported, never committed
        in part (PostgreSQL would answer COMMIT with a silent ROLLBACK)."""
        status = self._status()
        self._tx = False
        if status == "failed":
            self._raw.execute("ROLLBACK")
            raise self.OperationalError("a statement of the transaction failed; nothing of it was committed")
        if status == "in":
            self._raw.execute("COMMIT")

    def rollback(self) -> None:
        self._tx = False
        if not self.closed and not self._raw.broken and self._status():
            self._raw.execute("ROLLBACK")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._raw.close()


def _configure(raw: Any) -> None:
    """Loaders and dumpers that keep every value exactly as SQLite's store gives it (see the module)."""
    from psycopg.adapt import Dumper, Loader
    from psycopg.types.numeric import NumericLoader
    from psycopg.types.string import ByteaLoader

    class TextDumper(Dumper):
        oid = 0  # unknown: PostgreSQL casts it to the column's type, as a string literal would be

        def dump(self, obj: str) -> bytes:
            return escape(obj).encode()

    class TextLoader(Loader):
        def load(self, data: Any) -> str:
            return unescape(bytes(data).decode())

    class BodyLoader(ByteaLoader):
        def load(self, data: Any) -> bytes | str:  # type: ignore[override]
            value = bytes(super().load(bytes(data)))
            return value if value[:1] == b"x" else value.decode()

    class WholeLoader(NumericLoader):
        def load(self, data: Any) -> Any:
            value = super().load(data)
            return int(value) if value == value.to_integral_value() else float(value)

    adapters = raw.adapters
    adapters.register_dumper(str, TextDumper)
    for name in ("text", "varchar", "bpchar", "name", "json", "jsonb"):
        adapters.register_loader(name, TextLoader)
    adapters.register_loader(0, TextLoader)  # an untyped literal ('x' AS y)
    adapters.register_loader("bytea", BodyLoader)
    adapters.register_loader("numeric", WholeLoader)


def state_body(body: str | bytes) -> bytes:
    """A state body for the bytea column (read back by the bytea loader as the str or bytes it was)."""
    return body.encode() if isinstance(body, str) else body


def raw_connect(url: str, *, autocommit: bool = True) -> Any:
    """A psycopg connection to `url`, or a one-line ConfigError without the password."""
    import psycopg

    try:
        raw = psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S, cursor_factory=psycopg.RawCursor)
    except psycopg.Error as exc:
        detail = scrub(one_line(exc), url)
        raise ConfigError(
            f"cannot connect to the PostgreSQL database {redact(url)}: {detail}; check the URL's host, port, user, "
            "password and database name, and that the server is running"
        ) from None
    except (ValueError, TypeError) as exc:  # a malformed URL
        raise ConfigError(f"bad PostgreSQL URL {redact(url)}: {scrub(one_line(exc), url)}") from None
    return raw


def connect(url: str) -> PgConnection:
    raw = raw_connect(url)
    _configure(raw)
    return PgConnection(raw, url)


# -- per-run advisory locks and notifications -------------------------------------------------------


def _key(kind: bytes, run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(kind + run_id.encode()).digest()[:8], "big", signed=True)


def run_lock_key(run_id: str) -> int:
    """A signed 64-bit advisory lock key for driving a run (stable across processes and versions)."""
    return _key(b"loopterm-run:", run_id)


def log_lock_key(run_id: str) -> int:
    """The advisory lock key that serialises writers of one run's event log (see Store._insert_event)."""
    return _key(b"loopterm-log:", run_id)


class RunLocks:
    """Session-level advisory locks on a dedicated connection: held until released or the process dies
    (its connection closes), whatever the Store's own transactions do."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._raw: Any = None
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def drive(self, run_id: str) -> bool:
        with self._lock:
            if self._raw is not None and (self._raw.broken or self._raw.closed):
                self._raw.close()  # the server dropped the session, and every lock with it: claim them again
                self._raw = None
                self._held.clear()
            if run_id in self._held:
                try:
                    self._raw.execute("SELECT 1")  # the lock lives as long as this session: is it still there?
                    return True
                except self._raw.Error:
                    self._raw.close()
                    self._raw = None
                    self._held.clear()
            if self._raw is None:
                self._raw = raw_connect(self._url)
            (got,) = self._raw.execute("SELECT pg_try_advisory_lock($1)", [run_lock_key(run_id)]).fetchone()
            if got:
                self._held.add(run_id)
            return bool(got)

    def undrive(self, run_id: str) -> None:
        with self._lock:
            if run_id in self._held and self._raw is not None:
                self._raw.execute("SELECT pg_advisory_unlock($1)", [run_lock_key(run_id)])
                self._held.discard(run_id)

    def close(self) -> None:
        with self._lock:
            if self._raw is not None:
                try:  # at once: the server ends a closed session (and frees its locks) a moment later
                    if self._held and not self._raw.broken:
                        self._raw.execute("SELECT pg_advisory_unlock_all()")
                finally:
                    self._raw.close()  # a process that dies frees them this way too
                    self._raw = None
            self._held.clear()


class Listener:
    """A thread LISTENing on a connection of its own, calling back (kind, run_id) for each notification.
    A lost connection is re-opened (callers poll anyway, so a gap only delays them)."""

    def __init__(self, url: str, callback: Callable[[str, str], None]) -> None:
        self._url = url
        self._callback = callback
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopterm-listen", daemon=True)
        self._thread.start()
        self._ready.wait(CONNECT_TIMEOUT_S)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            raw = None
            try:
                raw = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                raw.execute(f"LISTEN {CHANNEL}")
                self._ready.set()
                while not self._stop.is_set():
                    for note in raw.notifies(timeout=LISTEN_POLL_S):
                        kind, _, run_id = note.payload.partition(":")
                        try:
                            self._callback(kind, run_id)
                        except Exception:  # a subscriber's bug must not end the subscription
                            pass
                        if self._stop.is_set():
                            break
            except psycopg.Error:
                self._ready.set()
                self._stop.wait(1.0)
            finally:
                if raw is not None:
                    raw.close()

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(LISTEN_POLL_S * 8)
