"""Provider faults against real HTTP servers on 127.0.0.1: classified, retried or not, nothing lost.

Two servers: ``fakellm`` (tests/conftest.py) for what it can make (status codes, a context-window
400, a reply whose content is not a decision), and ``FaultServer`` below, a small OpenAI-compatible
HTTP server on raw sockets for what fakellm cannot make: a refused connection (it stops listening),
a server that never answers, a body that is not JSON, a body cut off mid-transfer (Content-Length
or chunked), JSON cut mid-object, an empty choice list. litellm is never mocked.

Each fault is driven twice: through ModelClient directly (kind, code, calls, what the server saw)
and through whole headless runs (`loopterm run FILE --headless`, in-process through the CLI's
main() so litellm loads once; one real subprocess run too) whose model call fails at iteration 3:
the run's status, reason and one-line message; iterations 1-2 untouched; and `loopterm resume`
after the provider recovers converges with every side effect made exactly once.

Retry and breaker settings come from LOOPTERM_MODEL_TIMEOUT / _ATTEMPTS / LOOPTERM_RETRY_DELAY /
LOOPTERM_BREAKER_* (core/retry.py), short here so nothing sleeps long. LOOPTERM_FAULT_TRIALS
(default 1) repeats every whole-run scenario, for the figures in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.errors import ConfigError, ErrorKind, ModelError
from loopterm.core.model import ModelClient, _litellm, check_model
from loopterm.core.retry import BreakerState, CallSettings, CircuitBreaker, RetryPolicy, breaker_for, reset_breakers
from loopterm.core import runlog
from loopterm.store import Store
from loopterm.tui.cli import main as cli_main
from tests.loopkit import at, kinds, of

MODEL = "openai/gpt-4o-mini"
DUMMY_KEY = "sk-loopterm-faults-dummy-0123456789"
TRIALS = int(os.environ.get("LOOPTERM_FAULT_TRIALS", "1") or 1)
FAULT_AT = 3  # the iteration whose model call fails
GOAL = "append four lines to the effects log"
ITERATION = re.compile(r"# Iteration\n(\d+) of at most")

LOOP_FILE = '''
from pathlib import Path
from loopterm.core import Loop, LoopState, ToolContext, tool
from loopterm.core.checkers import ModelGate
from loopterm.core.roles import Role

@tool(side_effects=True, idempotent=False)
def append(ctx: ToolContext, line: str) -> str:
    """Append a line to the effects log outside the workspace: a real side effect."""
    with open(Path(__file__).parent / "effects.log", "a") as f:
        f.write(f"{ctx.iteration} {ctx.idempotency_key} {line}\\n")
    return "appended"

def big_state():
    state = LoopState()
    # about 4,500 tokens of notes: they fit the 6,000-token prompt budget, not half of it
    state.memory.facts = [("ZZOLDEST " if i == 0 else f"note {i} ") + "lorem ipsum dolor " * 100 for i in range(10)]
    return state

loop = Loop(
    name="faulty",
    goal="GOAL",
    state=LoopState,
    tools=[append],
    model="MODEL",
    max_iterations=8,
    stall_window=None,
    converged=lambda state, gates: state.iteration >= 4,
    initial_state=big_state if BIG else None,
    gates=[ModelGate(name="review", role=Role(name="checker", system_prompt="You check each appended line."),
                     instructions="Did the line get appended?")] if GATED else [],
    decision_mode="text",  # the servers here answer with JSON text (native tool calls: test_decision_modes.py)
)
'''


def decision(i: int) -> str:
    return json.dumps({"action": {"tool": "append", "args": {"line": f"line {i}"}}, "subgoal": f"line {i}",
                       "confidence": 0.9, "reasoning": "append the next line"})


def marker(i: int) -> str:
    return f"# Iteration\n{i} of at most"


# ----------------------------------------------------------------------------- a server for what fakellm cannot do

OK_BODY = {"object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
           "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}}


@dataclass
class FaultServer:
    """An OpenAI-compatible chat endpoint on raw sockets, answering each iteration by plan.

    ``faults[i]`` is the fault for iteration i's model calls (the first ``fault_attempts`` of
    them, or all when None); other requests get iteration i's decision. ``refuse_after``: after
    answering that iteration the server closes its listening socket, so the next connection is
    refused until start() listens on the same port again. Every reply closes its connection.
    """

    faults: dict[int, str] = field(default_factory=dict)
    fault_attempts: int | None = None
    refuse_after: int | None = None
    port: int = 0
    seen: Counter[int] = field(default_factory=Counter)  # requests per iteration (0: not a loop prompt)
    _listener: socket.socket | None = None
    _thread: threading.Thread | None = None
    _release: threading.Event = field(default_factory=threading.Event)  # lets hanging replies go
    _workers: list[threading.Thread] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            listener.close()

    def heal(self) -> None:
        """The provider recovered: no more faults, hanging replies released, listening again."""
        self.faults.clear()
        self.refuse_after = None
        self._release.set()
        if not self.listening:
            self.start()

    def close(self) -> None:
        self._release.set()
        self.stop_listening()
        for worker in self._workers:
            worker.join(timeout=5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stop_listening closed it
            try:
                iteration, body = self._read(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            self.seen[iteration] += 1
            attempt = self.seen[iteration]
            fault = self.faults.get(iteration)
            if fault is not None and self.fault_attempts is not None and attempt > self.fault_attempts:
                fault = None
            if fault is None and self.refuse_after == iteration:
                self._listener = None  # refuse from now on: closed before this reply is even sent
                listener.close()
                self._reply(conn, None, iteration, body)
                return
            worker = threading.Thread(target=self._reply, args=(conn, fault, iteration, body), daemon=True)
            self._workers.append(worker)
            worker.start()

    @staticmethod
    def _read(conn: socket.socket) -> tuple[int, dict[str, Any]]:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("closed before the headers")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("closed before the body")
            body += chunk
        request = json.loads(body)
        text = " ".join(str(m.get("content") or "") for m in request.get("messages", []))
        found = ITERATION.search(text)
        return (int(found.group(1)) if found else 0), request

    def _reply(self, conn: socket.socket, fault: str | None, iteration: int, request: dict[str, Any]) -> None:
        try:
            full = json.dumps({**OK_BODY, "id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": decision(iteration)},
                 "finish_reason": "stop"}]}).encode()
            head = "HTTP/1.1 200 OK\r\nConnection: close\r\n"
            if fault is None:
                conn.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {len(full)}\r\n\r\n".encode()
                             + full)
            elif fault == "hang":  # accepts, reads, never answers
                self._release.wait(60)
            elif fault == "reset":  # closes without a word
                pass
            elif fault == "html":  # a proxy's error page with a 200
                page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                conn.sendall(f"{head}Content-Type: text/html\r\nContent-Length: {len(page)}\r\n\r\n".encode() + page)
            elif fault == "truncated":  # promises the whole body, sends half, hangs up
                conn.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {len(full)}\r\n\r\n".encode()
                             + full[: len(full) // 2])
            elif fault == "chunked":  # a chunked body cut before its last chunk
                half = full[: len(full) // 2]
                conn.sendall(f"{head}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                             + f"{len(half):x}\r\n".encode() + half + b"\r\n")
            elif fault == "cut_json":  # a complete HTTP reply whose JSON stops mid-object
                half = full[: len(full) // 2]
                conn.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {len(half)}\r\n\r\n".encode()
                             + half)
            elif fault == "empty_choices":
                empty = json.dumps({**OK_BODY, "id": "chatcmpl-empty", "choices": []}).encode()
                conn.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {len(empty)}\r\n\r\n".encode()
                             + empty)
            else:
                raise AssertionError(fault)
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


# ----------------------------------------------------------------------------- fakellm rules


def healthy_rules(tag: str, upto: int = 8) -> list[dict[str, Any]]:
    return [{"name": f"{tag}-ok-{i}", "when": {"messages_contain": marker(i)}, "respond": {"content": decision(i)}}
            for i in range(1, upto + 1)]


FAKELLM_FAULTS: dict[str, dict[str, Any]] = {
    "429": {"status": 429, "error": "Rate limit reached for requests (mock)"},
    "503": {"status": 503, "error": "The server is overloaded (mock)"},
    "context_window": {"status": 400, "error": "This model's maximum context length is 8192 tokens. However, your "
                                               "messages resulted in 9100 tokens."},
    "not_a_decision": {"content": "Sure! I will append the next line to the log now."},
}


def faulty_rules(tag: str, fault: str, at: int = FAULT_AT, turns: int | None = None) -> list[dict[str, Any]]:
    when: dict[str, Any] = {"messages_contain": marker(at)}
    if turns is not None:
        when["turn_in"] = [1, turns]
    return [{"name": f"{tag}-fault", "when": when, "respond": FAKELLM_FAULTS[fault]}, *healthy_rules(tag)]


# ----------------------------------------------------------------------------- environment and runs


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("LOOPTERM_MODEL_TIMEOUT", "1")
    monkeypatch.setenv("LOOPTERM_MODEL_ATTEMPTS", "3")
    monkeypatch.setenv("LOOPTERM_RETRY_DELAY", "0.01")
    monkeypatch.setenv("LOOPTERM_RETRY_MAX_DELAY", "0.02")
    monkeypatch.setenv("LOOPTERM_BREAKER_FAILURES", "1000")  # the breaker tests lower it
    monkeypatch.delenv("LOOPTERM_DAILY_BUDGET_USD", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_breakers()
    yield
    reset_breakers()


@dataclass
class Project:
    """One loop file, its effects log and its store, in a directory of its own."""

    root: Path

    @property
    def loop_file(self) -> Path:
        return self.root / "faulty.py"

    @property
    def db(self) -> Path:
        return self.root / "db.sqlite"

    @property
    def effects(self) -> list[tuple[int, str]]:
        path = self.root / "effects.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(int(line.split()[0]), line.split()[1]) for line in lines]

    def store(self) -> Store:
        return Store.open(self.db, create=False)


def project(base: Path, *, big: bool = False, gated: bool = False) -> Project:
    root = base / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    text = (LOOP_FILE.replace("GOAL", GOAL).replace("MODEL", MODEL).replace("BIG", str(big))
            .replace("GATED", str(gated)))
    (root / "faulty.py").write_text(text)
    return Project(root)


@dataclass
class Ran:
    code: int
    out: str
    err: str
    run: Any  # RunRecord
    iterations: list[Any]
    events: list[Any]


def cli(p: Project, capsys: pytest.CaptureFixture[str], *args: str, run_id: str | None = None) -> Ran:
    """`loopterm ARGS --db DB` through the CLI's own main(), in this process; the run's records after it."""
    code = cli_main([*args, "--db", str(p.db)])
    out, err = capsys.readouterr()
    with p.store() as store:
        run = store.get_run(run_id) if run_id else store.list_runs()[0]
        return Ran(code, out, err, run, store.iterations(run.id), store.events(run.id))


def run_headless(p: Project, capsys: pytest.CaptureFixture[str]) -> Ran:
    return cli(p, capsys, "run", str(p.loop_file), "--headless", "--no-wait")


def resume(p: Project, capsys: pytest.CaptureFixture[str], run_id: str) -> Ran:
    return cli(p, capsys, "resume", run_id, "--no-wait", run_id=run_id)


def snapshot(iterations: list[Any]) -> list[dict[str, Any]]:
    keep = ("n", "decision", "tool_call", "tool_result", "state", "tokens_in", "tokens_out", "cost_usd", "prompt")
    return [{k: getattr(r, k) for k in keep} for r in iterations]


def assert_clean_failure(ran: Ran, *phrases: str) -> None:
    """Failed, exit 1, one line naming the cause and how to go on; no traceback anywhere."""
    assert ran.code == 1, (ran.out, ran.err)
    assert (ran.run.status, ran.run.termination_reason) == ("failed", "fatal_error")
    message = ran.run.message or ""
    assert "\n" not in message and len(message) <= 600, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert "Traceback" not in ran.out + ran.err and DUMMY_KEY not in ran.out + ran.err + message
    # The reason is in the summary, not a stray error line. (litellm's logging worker warns when a second
    # asyncio.run in one process reuses it: an artefact of running the CLI in-process, not a fault's.)
    assert [line for line in ran.err.splitlines() if "LoggingWorker: event loop changed" not in line] == []
    assert [e.message for e in of(ran.events, runlog.RunFinished)][-1] == message


def assert_nothing_lost(p: Project, before: list[dict[str, Any]], final: Ran) -> None:
    """Converged; the iterations committed before the fault are unchanged; each side effect made once."""
    assert final.code == 0, (final.out, final.err, final.run.message)
    assert final.run.status == "converged"
    assert [r.n for r in final.iterations] == [1, 2, 3, 4]  # none lost, none duplicated
    assert snapshot(final.iterations[: len(before)]) == before
    effects = p.effects
    assert [n for n, _ in effects] == [1, 2, 3, 4]  # exactly once each, in order
    assert [key for _, key in effects] == [r.tool_call["key"] for r in final.iterations]
    assert len(of(final.events, runlog.RunResumed)) == 1


# ----------------------------------------------------------------------------- ModelClient, fault by fault


class Recorder:
    def __init__(self) -> None:
        self.retries: list[tuple[int, str | None, int | None]] = []

    def on_retry(self, attempt: int, error: ModelError, delay: float) -> None:
        self.retries.append((attempt, error.code, error.status))

    async def sleep(self, seconds: float) -> None:
        return None


def client(base_url: str, rec: Recorder, **kw: Any) -> ModelClient:
    kw.setdefault("retry", RetryPolicy(max_attempts=3))
    kw.setdefault("timeout", 0.5)
    return ModelClient(MODEL, api_base=base_url, on_retry=rec.on_retry, sleep=rec.sleep, **kw)


def prompt(i: int = FAULT_AT) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Reply with a decision."},
            {"role": "user", "content": f"{uuid.uuid4().hex}\n{marker(i)} 8"}]


# fault -> (code, the words the message must hold)
SOCKET_FAULTS = {
    "refused": ("connection", "cannot connect to 127.0.0.1:{port}: connection refused"),
    "hang": ("timeout", "no answer within 0.5s (timed out)"),
    "reset": ("connection", "the server closed the connection without answering"),
    "html": ("bad_reply", "the reply is not JSON (received '<html><body><h1>502 Bad Gateway"),
    "truncated": ("truncated", "the reply was cut off before it was complete"),
    "chunked": ("truncated", "the reply was cut off before it was complete"),
    "cut_json": ("bad_reply", "the reply is not valid JSON (cut off or corrupt"),
    "empty_choices": ("bad_reply", "reply has no choices"),
}


@pytest.mark.parametrize("fault", list(SOCKET_FAULTS))
async def test_socket_fault_is_classified_transient_and_retried(fault_server: FaultServer, fault: str) -> None:
    code, words = SOCKET_FAULTS[fault]
    if fault == "refused":
        fault_server.stop_listening()
    else:
        fault_server.faults[FAULT_AT] = fault
    rec = Recorder()
    _litellm()  # loaded before the clock starts: seconds of import are not the fault's
    started = time.monotonic()
    with pytest.raises(ModelError) as info:
        await client(fault_server.base_url, rec).complete(prompt(), iteration=FAULT_AT)
    e = info.value
    assert (e.kind, e.code, e.calls) == (ErrorKind.TRANSIENT, code, 3)
    assert e.status == (408 if fault == "hang" else None)  # no made-up "500": no server said so
    assert str(e).startswith(f"{MODEL} failed after 3 attempts: {words.format(port=fault_server.port)}"), str(e)
    assert "\n" not in str(e) and DUMMY_KEY not in str(e)
    assert [(a, c) for a, c, _ in rec.retries] == [(1, code), (2, code)]
    assert fault_server.seen[FAULT_AT] == (0 if fault == "refused" else 3)  # one request per attempt, no hidden retries
    assert time.monotonic() - started < (5.0 if fault == "hang" else 3.0)


async def test_socket_fault_then_recovery_within_the_retries(fault_server: FaultServer) -> None:
    fault_server.faults[FAULT_AT], fault_server.fault_attempts = "truncated", 2
    rec = Recorder()
    reply = await client(fault_server.base_url, rec).complete(prompt(), iteration=FAULT_AT)
    assert json.loads(reply.text)["subgoal"] == f"line {FAULT_AT}" and reply.calls == 3
    assert [c for _, c, _ in rec.retries] == ["truncated", "truncated"]


@pytest.mark.parametrize(("fault", "kind", "code", "calls", "words"), [
    ("429", ErrorKind.TRANSIENT, None, 3, "429 OpenAIException - Rate limit reached for requests (mock)"),
    ("503", ErrorKind.TRANSIENT, None, 3, "503 OpenAIException - The server is overloaded (mock)"),
    ("context_window", ErrorKind.PERMANENT, "context_window", 1, "the prompt does not fit the context window"),
])
async def test_fakellm_status_fault_is_classified(fakellm_server: Any, fault: str, kind: ErrorKind, code: str | None,
                                                  calls: int, words: str) -> None:
    tag = uuid.uuid4().hex[:8]
    fakellm_server.set_rules(faulty_rules(tag, fault))
    rec = Recorder()
    with pytest.raises(ModelError) as info:
        await client(fakellm_server.base_url, rec).complete(prompt(), iteration=FAULT_AT)
    e = info.value
    assert (e.kind, e.code, e.calls) == (kind, code, calls)
    assert words in str(e) and "\n" not in str(e)
    assert len(rec.retries) == calls - 1
    assert fakellm_server.hits(f"{tag}-fault") == calls


async def test_429_burst_shorter_than_the_retries_is_absorbed(fakellm_server: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    fakellm_server.set_rules(faulty_rules(tag, "429", turns=2))
    rec = Recorder()
    reply = await client(fakellm_server.base_url, rec).complete(prompt(), iteration=FAULT_AT)
    assert reply.calls == 3 and json.loads(reply.text)["subgoal"] == f"line {FAULT_AT}"
    assert [s for _, _, s in rec.retries] == [429, 429]
    assert (fakellm_server.hits(f"{tag}-fault"), fakellm_server.hits(f"{tag}-ok-{FAULT_AT}")) == (2, 1)


# ----------------------------------------------------------------------------- the circuit breaker, for real


async def test_breaker_opens_refuses_calls_and_closes_through_half_open(fakellm_server: Any) -> None:
    """Real server, real clock; a 0.3 s reset timeout keeps it fast."""
    tag = uuid.uuid4().hex[:8]
    fakellm_server.set_rules(faulty_rules(tag, "503"))
    breaker = CircuitBreaker(MODEL, failure_threshold=3, reset_timeout=0.3)
    rec = Recorder()
    c = client(fakellm_server.base_url, rec, retry=RetryPolicy(max_attempts=5), breaker=breaker)

    with pytest.raises(ModelError) as info:
        await c.complete(prompt(), iteration=FAULT_AT)
    assert info.value.code == "circuit_open" and info.value.calls == 3  # attempts 4 and 5 never made
    assert breaker.state is BreakerState.OPEN and "503" in (breaker.last_error or "")
    assert fakellm_server.hits(f"{tag}-fault") == 3

    fakellm_server.set_rules(healthy_rules(tag + "b"))  # the provider is back, but the circuit is open
    with pytest.raises(ModelError) as info:
        await c.complete(prompt(), iteration=FAULT_AT)
    assert info.value.code == "circuit_open" and info.value.calls == 0
    assert fakellm_server.hits(f"{tag}b-ok-{FAULT_AT}") == 0  # no call while open

    deadline = time.monotonic() + 5
    while breaker.state is not BreakerState.HALF_OPEN:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reply = await c.complete(prompt(), iteration=FAULT_AT)  # the trial call succeeds
    assert reply.calls == 1 and breaker.state is BreakerState.CLOSED and breaker.failures == 0
    assert fakellm_server.hits(f"{tag}b-ok-{FAULT_AT}") == 1


async def test_failed_half_open_trial_reopens_without_retrying(fakellm_server: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    fakellm_server.set_rules(faulty_rules(tag, "503"))
    breaker = CircuitBreaker(MODEL, failure_threshold=2, reset_timeout=0.2)
    c = client(fakellm_server.base_url, Recorder(), retry=RetryPolicy(max_attempts=4), breaker=breaker)
    with pytest.raises(ModelError):
        await c.complete(prompt(), iteration=FAULT_AT)
    assert fakellm_server.hits(f"{tag}-fault") == 2
    time.sleep(0.25)
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(ModelError) as info:
        await c.complete(prompt(), iteration=FAULT_AT)
    assert info.value.code == "circuit_open" and info.value.calls == 1  # one trial, then open again
    assert fakellm_server.hits(f"{tag}-fault") == 3 and breaker.state is BreakerState.OPEN


def test_settings_come_from_the_environment_and_bad_ones_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_BREAKER_FAILURES", "2")
    monkeypatch.setenv("LOOPTERM_BREAKER_RESET", "0.5")
    c = ModelClient(MODEL)
    assert (c.timeout, c.retry.max_attempts, c.retry.base_delay, c.retry.max_delay) == (1.0, 3, 0.01, 0.02)
    assert (c.breaker.failure_threshold, c.breaker.reset_timeout) == (2, 0.5)
    assert breaker_for(MODEL) is c.breaker
    assert CallSettings.from_env({}) == CallSettings()  # unset: the documented defaults
    for var, value, words in [("LOOPTERM_MODEL_TIMEOUT", "0", "above 0"), ("LOOPTERM_MODEL_ATTEMPTS", "two", "whole"),
                              ("LOOPTERM_RETRY_DELAY", "inf", "number of seconds"),
                              ("LOOPTERM_RETRY_DELAY", "1", "smaller than LOOPTERM_RETRY_DELAY")]:
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError, match=words) as info:
            check_model(MODEL)  # the preflight refuses the run before it starts
        assert "\n" not in str(info.value)
        monkeypatch.setenv(var, "1" if var == "LOOPTERM_MODEL_TIMEOUT" else "3" if "ATTEMPTS" in var else "0.01")


def test_bad_setting_refuses_the_run_before_it_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    p = project(tmp_path)
    monkeypatch.setenv("LOOPTERM_MODEL_ATTEMPTS", "0")
    assert cli_main(["run", str(p.loop_file), "--headless", "--db", str(p.db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LOOPTERM_MODEL_ATTEMPTS='0' is not valid" in err
    assert not p.db.exists() or not Store.open(p.db).list_runs()


# ----------------------------------------------------------------------------- whole runs: fault, recover, resume


# fault -> (where it comes from, the words of the run's one-line message)
RUN_FAULTS: dict[str, tuple[str, str]] = {
    "429_storm": ("fakellm", "failed after 3 attempts: 429 OpenAIException - Rate limit reached"),
    "503": ("fakellm", "failed after 3 attempts: 503 OpenAIException - The server is overloaded"),
    "not_a_decision": ("fakellm", "the model's reply was still invalid after 2 repair attempt(s): the reply is not "
                                  "valid JSON"),
    "refused": ("socket", "failed after 3 attempts: cannot connect to 127.0.0.1:{port}: connection refused"),
    "hang": ("socket", "failed after 3 attempts: no answer within 1s (timed out)"),
    "reset": ("socket", "failed after 3 attempts: the server closed the connection without answering"),
    "html": ("socket", "failed after 3 attempts: the reply is not JSON (received '<html>"),
    "truncated": ("socket", "failed after 3 attempts: the reply was cut off before it was complete"),
    "chunked": ("socket", "failed after 3 attempts: the reply was cut off before it was complete"),
    "cut_json": ("socket", "failed after 3 attempts: the reply is not valid JSON (cut off or corrupt"),
    "empty_choices": ("socket", "failed after 3 attempts: reply has no choices"),
}


@pytest.mark.parametrize("fault", list(RUN_FAULTS))
def test_run_ends_cleanly_on_a_provider_fault_and_resumes_after_recovery(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, fault: str,
) -> None:
    source, words = RUN_FAULTS[fault]
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}")
        server: Any = request.getfixturevalue("fakellm_server" if source == "fakellm" else "fault_server")
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        tag = uuid.uuid4().hex[:8]
        if source == "fakellm":
            server.set_rules(faulty_rules(tag, fault.removesuffix("_storm")))
        else:
            server.heal()  # listening, nothing faulty left from an earlier trial
            server.seen.clear()
            server._release.clear()
            if fault == "refused":
                server.refuse_after = FAULT_AT - 1
            else:
                server.faults[FAULT_AT] = fault

        failed = run_headless(p, capsys)
        port = getattr(server, "port", 0)
        assert_clean_failure(failed, words.format(port=port))
        resumable = fault != "not_a_decision"
        if resumable:
            assert failed.run.message.endswith(
                f"`loopterm resume {failed.run.id}` continues from iteration {FAULT_AT} once the provider answers")
        assert [r.n for r in failed.iterations] == [1, 2]  # what was committed before the fault is all there
        assert [n for n, _ in p.effects] == [1, 2]
        retries = at(failed.events, runlog.ModelRetried)
        assert len(retries) == (0 if fault == "not_a_decision" else 2) and all(n == FAULT_AT for n, _ in retries)
        if fault == "not_a_decision":
            assert kinds(failed.events).count("invalid_reply") == 3
        if source == "socket":
            assert server.seen[FAULT_AT] == (0 if fault == "refused" else 3)
        before = snapshot(failed.iterations)

        if source == "fakellm":
            server.set_rules(healthy_rules(tag + "r"))
        else:
            server.heal()
        resumed = resume(p, capsys, failed.run.id)
        assert_nothing_lost(p, before, resumed)
        # the failed iteration paid for what it got (invalid replies), and the run's totals say so
        assert resumed.run.cost_usd == pytest.approx(sum(r.cost_usd for r in resumed.iterations) + failed_spend(failed))


def failed_spend(failed: Ran) -> float:
    """What the failed attempt at iteration FAULT_AT cost: its totals beyond the committed iterations."""
    return failed.run.cost_usd - sum(r.cost_usd for r in failed.iterations)


def test_a_429_burst_inside_a_run_is_absorbed_by_the_retries(fakellm_server: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}")
        monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
        tag = uuid.uuid4().hex[:8]
        fakellm_server.set_rules(faulty_rules(tag, "429", turns=2))
        ran = run_headless(p, capsys)
        assert ran.code == 0 and ran.run.status == "converged", ran.run.message
        assert [r.n for r in ran.iterations] == [1, 2, 3, 4] and [n for n, _ in p.effects] == [1, 2, 3, 4]
        retries = [(n, e.attempt) for n, e in at(ran.events, runlog.ModelRetried)]
        assert retries == [(FAULT_AT, 1), (FAULT_AT, 2)]
        assert "429" in ran.out and "retry 1" in ran.out  # the person saw the retries go by
        assert fakellm_server.hits(f"{tag}-fault") == 2


def test_paid_replies_are_counted_when_the_repair_call_fails(fakellm_server: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: a reply paid for in the failing iteration (here invalid, so repaired) vanished from the run's
    totals and the spend ledger when the repair call then failed: the run looked cheaper than it was."""
    monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}")
        tag = uuid.uuid4().hex[:8]
        fakellm_server.set_rules([
            {"name": f"{tag}-prose", "when": {"messages_contain": marker(1), "turn": 1},
             "respond": FAKELLM_FAULTS["not_a_decision"]},
            {"name": f"{tag}-down", "when": {"messages_contain": marker(1)}, "respond": FAKELLM_FAULTS["503"]},
        ])
        failed = run_headless(p, capsys)
        assert_clean_failure(failed, "failed after 3 attempts: 503")
        assert failed.iterations == []
        assert failed.run.tokens_in > 0 and failed.run.cost_usd > 0  # the prose reply was paid for
        with p.store() as store:
            ledger = sum(t.cost_usd for t in store.spend_by("loop"))
        assert ledger == pytest.approx(failed.run.cost_usd)


def test_checker_model_fault_after_the_side_effect_is_not_fired_twice(fakellm_server: Any, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The maker's reply is journalled and its tool has run when the checker's model call fails:
    the resume reuses the reply (not paid twice) and answers the tool from the journal (not fired twice)."""
    monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
    verdict = json.dumps({"verdict": "pass", "reason": "the line is there", "findings": []})
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}", gated=True)
        tag = uuid.uuid4().hex[:8]
        checker = [{"name": f"{tag}-check", "when": {"messages_contain": "# The proposal (iteration"},
                    "respond": {"content": verdict}}]
        fakellm_server.set_rules([*healthy_rules(tag), {"name": f"{tag}-check-down", "when": {
            "messages_contain": f"# The proposal (iteration {FAULT_AT})"}, "respond": FAKELLM_FAULTS["503"]}, *checker])
        failed = run_headless(p, capsys)
        assert_clean_failure(failed, "failed after 3 attempts: 503 OpenAIException - The server is overloaded")
        assert [r.n for r in failed.iterations] == [1, 2]
        assert [n for n, _ in p.effects] == [1, 2, 3]  # iteration 3's side effect fired before its check failed
        assert fakellm_server.hits(f"{tag}-ok-{FAULT_AT}") == 1 and fakellm_server.hits(f"{tag}-check-down") == 3
        before = snapshot(failed.iterations)

        fakellm_server.set_rules([*healthy_rules(tag + "r"), *checker])
        resumed = resume(p, capsys, failed.run.id)
        assert_nothing_lost(p, before, resumed)
        assert fakellm_server.hits(f"{tag}r-ok-{FAULT_AT}") == 0  # the maker's reply was reused, not asked again
        assert [n for n, _ in at(resumed.events, runlog.IntentReused)] == [FAULT_AT]


# ----------------------------------------------------------------------------- the breaker across runs


def test_breaker_opens_across_runs_no_call_while_open_then_closes(fakellm_server: Any, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs in one process (as in the TUI or a batch) share the model's circuit."""
    monkeypatch.setenv("LOOPTERM_BREAKER_FAILURES", "2")
    monkeypatch.setenv("LOOPTERM_BREAKER_RESET", "0.4")
    monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
    for trial in range(TRIALS):
        reset_breakers()
        first, second = project(tmp_path / f"t{trial}a"), project(tmp_path / f"t{trial}b")
        tag = uuid.uuid4().hex[:8]
        fakellm_server.set_rules(faulty_rules(tag, "503"))

        a = run_headless(first, capsys)  # attempts 1-2 fail, the circuit opens, attempt 3 is never made
        assert_clean_failure(a, f"{MODEL} failed 2 time(s) in this iteration; its circuit is now open after 2 "
                                "consecutive failures (last: 503 OpenAIException - The server is overloaded (mock))",
                             "it lets a trial call through in 1s, then `loopterm resume")
        assert fakellm_server.hits(f"{tag}-fault") == 2
        calls_so_far = fakellm_server.stats()["total_requests"]

        fakellm_server.set_rules(healthy_rules(tag + "r"))  # the provider recovers, the circuit is still open
        b = run_headless(second, capsys)
        assert_clean_failure(b, f"{MODEL} was not called: its circuit is open after 2 consecutive failures "
                                "(last: 503")
        assert b.iterations == [] and second.effects == []
        assert fakellm_server.stats()["total_requests"] == calls_so_far  # no call while open

        breaker = breaker_for(MODEL)
        deadline = time.monotonic() + 5
        while breaker.state is not BreakerState.HALF_OPEN:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        resumed_b = resume(second, capsys, b.run.id)  # its first call is the trial; it succeeds
        assert resumed_b.code == 0 and resumed_b.run.status == "converged"
        assert breaker.state is BreakerState.CLOSED
        assert [n for n, _ in second.effects] == [1, 2, 3, 4]
        before = snapshot(a.iterations)
        assert_nothing_lost(first, before, resume(first, capsys, a.run.id))


# ----------------------------------------------------------------------------- context window: prune and retry


def test_context_window_error_is_retried_with_a_pruned_prompt(fakellm_server: Any, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The oldest note fits the loop's 6,000-token budget but not the model (this rule's window):
    the call is refused, the prompt is rebuilt at half the budget (the oldest notes go) and asked again."""
    monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}", big=True)
        tag = uuid.uuid4().hex[:8]
        fakellm_server.set_rules([{"name": f"{tag}-too-long", "when": {"messages_contain": "ZZOLDEST"},
                                   "respond": FAKELLM_FAULTS["context_window"]}, *healthy_rules(tag)])
        ran = run_headless(p, capsys)
        assert ran.code == 0 and ran.run.status == "converged", ran.run.message
        assert [r.n for r in ran.iterations] == [1, 2, 3, 4] and [n for n, _ in p.effects] == [1, 2, 3, 4]
        pruned = at(ran.events, runlog.PromptPruned)
        refused = fakellm_server.hits(f"{tag}-too-long")
        assert refused >= 1 and len(pruned) == refused  # every refusal was recorded, and retried once
        for n, event in pruned:
            assert "maximum context length is 8192 tokens" in event.error
            assert event.retry == 1 and event.token_budget == 3000
            assert event.tokens_after < event.tokens_before
            assert n is not None
            record = ran.iterations[n - 1]
            assert "ZZOLDEST" not in json.dumps(record.prompt)  # the journalled prompt is the one that was answered
        assert not of(ran.events, runlog.ModelRetried)  # a 400 is never retried as it was


def test_context_window_error_that_pruning_cannot_fix_ends_the_run(fakellm_server: Any, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}", big=True)
        tag = uuid.uuid4().hex[:8]
        fakellm_server.set_rules([{"name": f"{tag}-too-long", "when": {"messages_contain": marker(FAULT_AT)},
                                   "respond": FAKELLM_FAULTS["context_window"]}, *healthy_rules(tag)])
        failed = run_headless(p, capsys)
        assert_clean_failure(failed, "the prompt does not fit the context window",
                             "still too long after pruning it 2 time(s), to about",
                             "use a model with a larger context window")
        assert fakellm_server.hits(f"{tag}-too-long") == 3  # the prompt, half of it, a quarter: then it stops
        pruned = [e.token_budget for n, e in at(failed.events, runlog.PromptPruned) if n == FAULT_AT]
        assert pruned == [3000, 1500]
        assert [r.n for r in failed.iterations] == [1, 2] and [n for n, _ in p.effects] == [1, 2]
        before = snapshot(failed.iterations)
        fakellm_server.set_rules(healthy_rules(tag + "r"))  # e.g. a model with a larger window
        assert_nothing_lost(p, before, resume(p, capsys, failed.run.id))


def test_context_window_error_with_nothing_to_prune_is_not_retried(fakellm_server: Any, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_BASE", fakellm_server.base_url)
    for trial in range(TRIALS):
        reset_breakers()
        p = project(tmp_path / f"trial{trial}")
        tag = uuid.uuid4().hex[:8]
        fakellm_server.set_rules([{"name": f"{tag}-too-long", "when": {"messages_contain": marker(1)},
                                   "respond": FAKELLM_FAULTS["context_window"]}])
        failed = run_headless(p, capsys)
        assert_clean_failure(failed, "the prompt does not fit the context window", "nothing left to prune in it")
        assert fakellm_server.hits(f"{tag}-too-long") == 1  # the same prompt is never sent twice
        assert not of(failed.events, runlog.PromptPruned)
        assert failed.iterations == [] and p.effects == []


# ----------------------------------------------------------------------------- one real process, end to end


def test_real_headless_process_fails_cleanly_then_resumes(fakellm_server: Any, tmp_path: Path) -> None:
    """`loopterm run FILE --headless` as a person types it, a 503 outage at iteration 3, then `loopterm resume`."""
    p = project(tmp_path)
    tag = uuid.uuid4().hex[:8]
    fakellm_server.set_rules(faulty_rules(tag, "503"))
    env = {**os.environ, "OPENAI_API_BASE": fakellm_server.base_url, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    def loopterm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loopterm.tui.cli", *args, "--db", str(p.db)], cwd=p.root,
                              env=env, capture_output=True, text=True, timeout=120)

    failed = loopterm("run", str(p.loop_file), "--model", MODEL, "--headless")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr == "" and "Traceback" not in failed.stdout
    assert "503" in failed.stdout and "retry 2" in failed.stdout  # the retries went by on screen
    with p.store() as store:
        run = store.list_runs()[0]
        assert [r.n for r in store.iterations(run.id)] == [1, 2]
    assert (run.status, run.termination_reason) == ("failed", "fatal_error")
    assert run.message == (f"{MODEL} failed after 3 attempts: 503 OpenAIException - The server is overloaded (mock); "
                           f"`loopterm resume {run.id}` continues from iteration 3 once the provider answers")
    assert "continues from iteration 3" in " ".join(failed.stdout.split())  # the summary shows it

    fakellm_server.set_rules(healthy_rules(tag + "r"))
    resumed = loopterm("resume", run.id[:8])
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stdout + resumed.stderr
    with p.store() as store:
        assert store.get_run(run.id).status == "converged"
        iterations = store.iterations(run.id)
    assert [r.n for r in iterations] == [1, 2, 3, 4]
    assert [n for n, _ in p.effects] == [1, 2, 3, 4]
    assert [k for _, k in p.effects] == [r.tool_call["key"] for r in iterations]
