"""Shared fixtures. ``fakellm_server``: a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.pgserver import PostgresServer

_START_TIMEOUT = 20.0


def _free_port() -> int:
    """An ephemeral port the OS just handed out (tiny race, fine on a test machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FakeLLMServer:
    """A running ``fakellm serve``; rules are rewritten and hot-reloaded with set_rules()."""

    port: int
    pid: int
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL to pass as api_base."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _post(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.root + path, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace the rules (fakellm's YAML; JSON is valid YAML), reload them, forget conversations.

        fakellm counts turns per conversation (X-Fakellm-Conversation-Id header,
        else a hash of the first user message), so a rule with ``when: {turn: 1}``
        answers only the first request of a conversation: that is how a test
        scripts "429, then 200".
        """
        self.config_path.write_text(json.dumps({"version": 1, "rules": rules}, indent=1))
        self._post("/_fakellm/reload")
        self._post("/_fakellm/reset")

    def stats(self) -> dict[str, Any]:
        """fakellm's request counts by rule (requests the server actually saw)."""
        with urllib.request.urlopen(self.root + "/_fakellm/stats", timeout=5) as response:
            return json.loads(response.read())

    def hits(self, rule: str) -> int:
        return int(self.stats()["by_rule"].get(rule, 0))


def _wait_until_accepting(server: FakeLLMServer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"fakellm exited with {server.process.returncode}: {server.log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"fakellm did not accept connections within {_START_TIMEOUT}s: {server.log_path.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server we started (by its pid), kill it if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def _fakellm_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLLMServer]:
    directory = tmp_path_factory.mktemp("fakellm")
    config = directory / "fakellm.yaml"
    config.write_text(json.dumps({"version": 1, "rules": []}))
    log_path = directory / "server.log"
    port = _free_port()
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fakellm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=directory, env=env,
        )
    server = FakeLLMServer(port=port, pid=process.pid, config_path=config, log_path=log_path, process=process)
    try:
        _wait_until_accepting(server)
        yield server
    finally:
        _stop(process)


@pytest.fixture
def fakellm_server(_fakellm_process: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    """The session's fakellm server with no rules (fakellm echoes) and fresh conversations."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _fakellm_process.set_rules([])
    return _fakellm_process


@pytest.fixture(scope="session")
def postgres_server() -> Iterator["PostgresServer"]:
    """A real PostgreSQL server for the session (tests/pgserver.py), started on first use."""
    from tests.pgserver import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: "PostgresServer") -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres_server.fresh_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | Path]:
    """Where a store-level test opens its Store: a SQLite file, then a fresh PostgreSQL database (dropped
    afterwards: hundreds of 7 MB databases would otherwise pile up until the session ends)."""
    if request.param == "sqlite":
        yield tmp_path / "db" / "loopterm.db"
        return
    url = str(request.getfixturevalue("pg_url"))
    yield url
    import psycopg

    server = request.getfixturevalue("postgres_server")
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture
def engine_store(store_target: str | Path, monkeypatch: pytest.MonkeyPatch) -> str | Path:
    """Runs a module's engine tests (tests/loopkit.py's make_engine) on both backends."""
    from tests import loopkit

    monkeypatch.setattr(loopkit, "store_location", store_target)
    return store_target
