"""`StoreTarget`: which store a command means, from `--db` or $LOOPTERM_DB: a SQLite file or a PostgreSQL URL.

Parsing decides everything a command must know before it opens anything: the backend, what to print
(`shown`, never the password), where run workspaces go, and the one-line refusal of a path in a folder
that does not exist or of a malformed URL. Standard library only at import: psycopg loads inside
`Store.open` for a postgresql:// URL, never for a SQLite path (tests/test_cluster_imports.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

SCHEMES = ("postgresql", "postgres")
DEFAULT_DB = Path(".loopterm") / "loopterm.db"
REDACTED = "***"
# Query parameters that may carry a secret: shown as *** like the password in the URL's user part.
_SECRET_PARAMS = frozenset({"password", "sslpassword", "passfile"})


def is_url(text: str) -> bool:
    """Whether --db names a server rather than a file (anything with a scheme, so a typo is not a file name)."""
    return "://" in text


@dataclass(frozen=True)
class StoreTarget:
    """One store: `backend` "sqlite" (`path`) or "postgresql" (`url`, kept out of repr and messages)."""

    backend: Literal["sqlite", "postgresql"]
    path: Path | None = None
    url: str | None = field(default=None, repr=False)
    shown: str = ""  # how messages name it: the path as given, or the URL with its password as ***

    # -- parsing -------------------------------------------------------------------------------

    @classmethod
    def parse(cls, value: str | Path, named_by: str = "--db ") -> StoreTarget:
        """A store someone typed (`named_by` starts the refusal: "--db " or "LOOPTERM_DB="). A path must be
        in a folder that exists (a typo is refused, not made a new empty store), unless it is the default."""
        if isinstance(value, Path) or not is_url(value):
            return cls.sqlite(_in_existing_folder(Path(value), named_by))
        return cls.postgresql(value, named_by)

    @classmethod
    def of(cls, value: StoreTarget | str | Path) -> StoreTarget:
        """A target from what a caller holds: a target, a checked path (no folder check), or a URL."""
        if isinstance(value, StoreTarget):
            return value
        if isinstance(value, Path) or not is_url(value):
            return cls.sqlite(Path(value))
        return cls.postgresql(value)

    @classmethod
    def sqlite(cls, path: Path) -> StoreTarget:
        return cls("sqlite", path=path, shown=str(path))

    @classmethod
    def postgresql(cls, url: str, named_by: str = "--db ") -> StoreTarget:
        """A postgresql:// (or postgres://) URL with a host (or a host= parameter) and a database name."""
        from loopterm.core.errors import ConfigError

        text = url.strip()
        shown = redact(text)
        hint = "expected postgresql://USER:PASSWORD@HOST[:PORT]/DATABASE"
        try:
            parts = urlsplit(text)
            port = parts.port  # ValueError on a port that is not a number in 0..65535
        except ValueError as exc:
            raise ConfigError(f"{named_by}{shown} is not a valid database URL ({exc}); {hint}") from None
        if parts.scheme.lower() not in SCHEMES:
            raise ConfigError(f"{named_by}{shown}: {parts.scheme or 'no'} scheme is not a store loopterm knows; "
                              f"give a SQLite file path or a PostgreSQL URL ({hint})")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if not (parts.hostname or query.get("host") or query.get("hostaddr")):
            raise ConfigError(f"{named_by}{shown} names no host; {hint}")
        database = unquote(parts.path.lstrip("/")) or query.get("dbname", "")
        if not database or "/" in database:
            raise ConfigError(f"{named_by}{shown} names no database{' (one name, no /)' if database else ''}; {hint}")
        if port == 0:
            raise ConfigError(f"{named_by}{shown}: port 0 is not a port; {hint}")
        return cls("postgresql", url=text, shown=shown)

    # -- use -------------------------------------------------------------------------------------

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    def exists(self) -> bool:
        """Whether there is a store to read without creating one: the file exists (SQLite); a server database is
        taken to exist, and opening it with create=False says in one line if it holds no loopterm schema."""
        return self.path.exists() if self.path is not None else True

    def absolute(self) -> str:
        """For reports that outlive the working directory: the resolved file path, or the URL as shown."""
        return str(self.path.resolve()) if self.path is not None else self.shown

    def open(self, *, create: bool = True, **options: Any) -> Any:
        """The Store (SQLite or PostgreSQL: one interface). create=False refuses a store that is not there."""
        from loopterm.store import Store

        return Store.open(self.path if self.path is not None else self.url, create=create, **options)  # type: ignore[arg-type]

    def workspace_root(self) -> Path:
        """Where this store's runs get their workspaces (files on the machine that runs the loop): beside a
        SQLite file; for a server store `.loopterm/workspaces` under the working directory; $LOOPTERM_WORKSPACES
        overrides both."""
        from loopterm.core.runs import workspace_root

        return workspace_root(self.path)

    def lock_path(self, name: str) -> Path:
        """A lock file for one process per store on this machine (e.g. `daemon`): beside a SQLite file, else
        under the workspaces' folder, named by the server and database (never the password)."""
        if self.path is not None:
            return self.path.with_name(f"{self.path.name}.{name}.lock")
        import hashlib

        digest = hashlib.sha256(self.shown.encode()).hexdigest()[:12]
        folder = self.workspace_root().parent
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}-{digest}.lock"

    def __str__(self) -> str:
        return self.shown


def redact(url: str) -> str:
    """The URL with its password (in the user part or a password= parameter) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _redact_roughly(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":" + REDACTED
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={REDACTED if k in _SECRET_PARAMS else quote(v, safe='/:,')}" for k, v in pairs)
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://\S+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Any postgresql:// URL inside a message (a driver's error, say) with its password as ***."""
    return _URL_IN_TEXT.sub(lambda found: redact(found.group(0)), text)


def _redact_roughly(url: str) -> str:
    """For a URL urlsplit refuses: everything between the scheme and the last @ is dropped."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = REDACTED + "@" + rest.rpartition("@")[2]
    return scheme + sep + rest


def _in_existing_folder(path: Path, named_by: str) -> Path:
    """A store path someone typed must be in a folder that exists: a typo is refused, not made a new empty
    store. Only the default, .loopterm/loopterm.db, has its folder created."""
    if path.expanduser().absolute() == DEFAULT_DB.absolute():  # the default, however it is spelt
        return path
    folder = path.expanduser().parent
    try:
        folder.stat()
    except FileNotFoundError:
        from loopterm.core.errors import ConfigError

        raise ConfigError(f"{named_by}{path}: the folder {folder} does not exist; create it (mkdir -p {folder}) "
                          "or check the path") from None
    except OSError:
        pass  # a part of it is a file, or it cannot be read: the store says which when it opens the path
    return path
