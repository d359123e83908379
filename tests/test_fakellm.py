"""ModelClient against a real OpenAI-compatible HTTP server (fakellm on 127.0.0.1).

fakellm sequences answers per conversation: it counts requests per conversation
(keyed by a hash of the first user message) and a rule's ``when: {turn: 1}``
matches only the first one, so "429, then 200" is two rules. Every test uses its
own first user message and its own rule names (fakellm's stats are cumulative).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from loopterm.core.errors import ErrorKind, ModelError
from loopterm.core.model import ModelClient
from loopterm.core.retry import RetryPolicy, reset_breakers

MODEL = "openai/gpt-4o-mini"
DUMMY_KEY = "sk-loopterm-dummy-key-123456"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    reset_breakers()


class Recorder:
    def __init__(self) -> None:
        self.retries: list[tuple[int, int | None, float]] = []
        self.sleeps: list[float] = []

    def on_retry(self, attempt: int, error: ModelError, delay: float) -> None:
        self.retries.append((attempt, error.status, delay))

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def _client(server: Any, rec: Recorder, **kw: Any) -> ModelClient:
    return ModelClient(MODEL, api_base=server.base_url, on_retry=rec.on_retry, sleep=rec.sleep, timeout=10.0, **kw)


def _ask(tag: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{tag} {uuid.uuid4().hex}"}]


async def test_normal_reply_with_usage_and_cost(fakellm_server: Any) -> None:
    fakellm_server.set_rules([{"name": "hello-1", "when": {"messages_contain": "greet"},
                               "respond": {"content": "Hello over real HTTP."}}])
    rec = Recorder()
    reply = await _client(fakellm_server, rec).complete(_ask("greet"), iteration=1)
    assert reply.text == "Hello over real HTTP."
    assert reply.tokens_in > 0 and reply.tokens_out > 0
    assert reply.cost_usd > 0  # litellm prices gpt-4o-mini from the server's usage
    assert reply.calls == 1 and rec.retries == []
    assert fakellm_server.hits("hello-1") == 1


async def test_429_then_success_is_retried(fakellm_server: Any) -> None:
    fakellm_server.set_rules([
        {"name": "flaky-429", "when": {"messages_contain": "flaky", "turn": 1},
         "respond": {"status": 429, "error": "Rate limit exceeded (mock)"}},
        {"name": "flaky-ok", "when": {"messages_contain": "flaky"}, "respond": {"content": "second time lucky"}},
    ])
    rec = Recorder()
    reply = await _client(fakellm_server, rec).complete(_ask("flaky"), iteration=1)
    assert reply.text == "second time lucky" and reply.calls == 2
    assert [(a, s) for a, s, _ in rec.retries] == [(1, 429)]
    assert rec.sleeps == [rec.retries[0][2]]
    # the server saw exactly one request per attempt: nothing below us retried on its own
    assert (fakellm_server.hits("flaky-429"), fakellm_server.hits("flaky-ok")) == (1, 1)


async def test_400_is_not_retried(fakellm_server: Any) -> None:
    fakellm_server.set_rules([{"name": "bad-400", "when": {"messages_contain": "malformed"},
                               "respond": {"status": 400, "error": "Invalid request (mock)"}}])
    rec = Recorder()
    with pytest.raises(ModelError) as info:
        await _client(fakellm_server, rec).complete(_ask("malformed"), iteration=1)
    assert info.value.kind is ErrorKind.PERMANENT and info.value.status == 400 and info.value.calls == 1
    assert "Invalid request (mock)" in str(info.value)
    assert rec.retries == [] and fakellm_server.hits("bad-400") == 1


async def test_503_exhausts_the_policy(fakellm_server: Any) -> None:
    fakellm_server.set_rules([{"name": "down-503", "when": {"messages_contain": "outage"},
                               "respond": {"status": 503, "error": "overloaded (mock)"}}])
    rec = Recorder()
    with pytest.raises(ModelError, match=rf"^{MODEL} failed after 3 attempts: 503 ") as info:
        await _client(fakellm_server, rec, retry=RetryPolicy(max_attempts=3)).complete(_ask("outage"), iteration=1)
    assert info.value.kind is ErrorKind.TRANSIENT and info.value.calls == 3
    assert fakellm_server.hits("down-503") == 3


async def test_409_stays_retryable(fakellm_server: Any) -> None:
    fakellm_server.set_rules([
        {"name": "conflict-409", "when": {"messages_contain": "conflict", "turn": 1},
         "respond": {"status": 409, "error": "conflict (mock)"}},
        {"name": "conflict-ok", "when": {"messages_contain": "conflict"}, "respond": {"content": "resolved"}},
    ])
    rec = Recorder()
    reply = await _client(fakellm_server, rec).complete(_ask("conflict"), iteration=1)
    assert reply.text == "resolved" and [s for _, s, _ in rec.retries] == [409]


async def test_context_window_and_auth_errors(fakellm_server: Any) -> None:
    fakellm_server.set_rules([
        {"name": "ctx-400", "when": {"messages_contain": "huge"},
         "respond": {"status": 400, "error": "This model's maximum context length is 128000 tokens."}},
        {"name": "auth-401", "when": {"messages_contain": "locked"},
         "respond": {"status": 401, "error": f"Incorrect API key provided: {DUMMY_KEY}"}},
    ])
    rec = Recorder()
    c = _client(fakellm_server, rec)
    with pytest.raises(ModelError) as info:
        await c.complete(_ask("huge"), iteration=1)
    assert info.value.code == "context_window" and info.value.kind is ErrorKind.PERMANENT
    with pytest.raises(ModelError) as info:
        await c.complete(_ask("locked"), iteration=1)
    assert info.value.kind is ErrorKind.FATAL and info.value.status == 401
    assert DUMMY_KEY not in str(info.value)  # never echo a key, even when the provider does
    assert rec.retries == []
