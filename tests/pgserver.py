"""A real PostgreSQL server for the tests, started in a temporary folder.

PostgreSQL refuses to run as root, and CI runs as root: the server then runs as
the `postgres` user (Debian's package creates it), else as `nobody`, in a folder
that user owns. fsync is off (a test server's durability is not under test).
Each test gets a database of its own (`fresh_database`), so tests never see each
other's rows. Found on PATH or in Debian's /usr/lib/postgresql/*/bin; `.ci/run`
installs the server on a machine without one.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0


def find_binary(name: str) -> str | None:
    """`initdb`, `pg_ctl` or `postgres`: on PATH, else the newest Debian cluster's bin folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> str | None:
    """The unprivileged user to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root with neither a `postgres` nor a `nobody` user to run PostgreSQL as")


@dataclass
class PostgresServer:
    """A running server: `url(dbname)` for a database on it, `stop()` when done."""

    root: Path
    port: int
    user: str | None
    pg_ctl: str

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://loopterm@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, user=self.user, cwd=self.root, check=False)

    def fresh_database(self) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """initdb + pg_ctl start in a new temporary folder, listening on 127.0.0.1 only."""
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL's server is not installed (no initdb/pg_ctl): `apt-get install postgresql`, as .ci/run does")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="loopterm-pg-"))
    os.chmod(root, 0o755)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    server = PostgresServer(root=root, port=port, user=user, pg_ctl=pg_ctl)
    done = server._run(initdb, "-D", str(root / "data"), "-U", "loopterm", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
    if done.returncode != 0:
        done = server._run(initdb, "-D", str(root / "data"), "-U", "loopterm", "--auth=trust", "-E", "UTF8", "--no-locale")
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr.strip()[-800:]}")
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=200"
    )
    started = server._run(pg_ctl, "-D", str(root / "data"), "-o", options, "-l", str(root / "server.log"),
                          "-t", str(int(START_TIMEOUT_S)), "-w", "start")
    if started.returncode != 0:
        log = (root / "server.log").read_text(errors="replace")[-800:] if (root / "server.log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()[-400:]} {log}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("PostgreSQL started but does not accept connections")
