"""ModelClient over the offline scripted provider: usage, cost, retries, breaker, preflight."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loopterm.core.errors import ConfigError, ErrorKind, ModelError
from loopterm.core.model import ModelClient, ModelReply, _litellm, _retry_after, check_model, redact
from loopterm.core.retry import CircuitBreaker, RetryPolicy, reset_breakers
from loopterm.core.scripted import load_script, register_script

PRICE = {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Records on_retry calls and sleeps (in order) so no test waits."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_retry(self, attempt: int, error: ModelError, delay: float) -> None:
        self.events.append(("retry", (attempt, error.status, delay)))

    async def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))

    @property
    def retries(self) -> list[tuple[int, int | None, float]]:
        return [e[1] for e in self.events if e[0] == "retry"]

    @property
    def sleeps(self) -> list[float]:
        return [e[1] for e in self.events if e[0] == "sleep"]


@pytest.fixture(autouse=True)
def _fresh_breakers() -> None:
    reset_breakers()


@pytest.fixture
def scripted(tmp_path: Path, request: pytest.FixtureRequest):
    """Write a script and register it under a name unique to the test; returns the model string."""
    counter = iter(range(1000))

    def make(turns: list[Any], **extra: Any) -> str:
        name = f"{request.node.name.replace('[', '-').replace(']', '')}-{next(counter)}"
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"price": PRICE, "turns": turns, **extra}))
        register_script(name, path)
        return f"scripted/{name}"

    return make


def client(model: str, rec: Recorder, **kw: Any) -> ModelClient:
    return ModelClient(model, on_retry=rec.on_retry, sleep=rec.sleep, **kw)


def err(status: int, message: str = "boom") -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


# ----------------------------------------------------------------------------- replies


async def test_scripted_reply_has_usage_and_litellm_cost(scripted) -> None:
    model = scripted(["Hello from the script, twice over.", {"content": {"action": None, "done": True}}])
    rec = Recorder()
    reply = await client(model, rec).complete(MESSAGES, iteration=1)
    assert isinstance(reply, ModelReply)
    assert reply.text == "Hello from the script, twice over."
    assert reply.tokens_in > 0 and reply.tokens_out > 0
    assert reply.calls == 1 and reply.model == model and reply.latency_ms >= 0

    litellm = _litellm()
    expect_in = litellm.token_counter(model=model, messages=MESSAGES)
    expect_out = litellm.token_counter(model=model, text=reply.text, count_response_tokens=True)
    assert (reply.tokens_in, reply.tokens_out) == (expect_in, expect_out)
    expected_cost = expect_in * PRICE["input_cost_per_token"] + expect_out * PRICE["output_cost_per_token"]
    assert reply.cost_usd == pytest.approx(expected_cost, rel=1e-9)
    assert reply.cost_usd > 0

    second = await client(model, rec).complete(MESSAGES, iteration=2)
    assert json.loads(second.text) == {"action": None, "done": True}  # an object is sent as JSON text
    assert rec.events == []


async def test_content_null_becomes_empty_text(scripted) -> None:
    model = scripted([{"content": None}])
    reply = await client(model, Recorder()).complete(MESSAGES, iteration=1)
    assert reply.text == "" and reply.tokens_out == 0


async def test_metadata_selects_step_by_iteration_and_call_index(scripted) -> None:
    model = scripted([["a0", "a1", "a2"], "b"], after_end="repeat_last")
    c = client(model, Recorder())
    assert (await c.complete(MESSAGES, iteration=1)).text == "a0"
    assert (await c.complete(MESSAGES, iteration=1, call_index=1)).text == "a1"
    assert (await c.complete(MESSAGES, iteration=1, call_index=7)).text == "a2"  # last step repeats
    assert (await c.complete(MESSAGES, iteration=2)).text == "b"
    assert (await c.complete(MESSAGES, iteration=9)).text == "b"  # repeat_last past the end


async def test_script_exhausted_is_permanent(scripted) -> None:
    model = scripted(["only"])
    rec = Recorder()
    with pytest.raises(ModelError, match="exhausted") as info:
        await client(model, rec).complete(MESSAGES, iteration=2)
    assert info.value.kind is ErrorKind.PERMANENT and info.value.calls == 1
    assert rec.events == []


# ----------------------------------------------------------------------------- retries


async def test_429_then_success_is_retried(scripted) -> None:
    model = scripted([[err(429, "slow down"), "ok"]])
    rec = Recorder()
    reply = await client(model, rec, rng=__import__("random").Random(3)).complete(MESSAGES, iteration=1)
    assert reply.text == "ok" and reply.calls == 2
    assert len(rec.retries) == 1
    attempt, status, delay = rec.retries[0]
    assert (attempt, status) == (1, 429) and 0.0 <= delay <= 0.5
    assert rec.events == [("retry", (1, 429, delay)), ("sleep", delay)]  # on_retry before the sleep


@pytest.mark.parametrize("status", [503, 500, 502, 408, 409])
async def test_transient_statuses_are_retried(scripted, status: int) -> None:
    model = scripted([[err(status), err(status), "ok"]])
    rec = Recorder()
    reply = await client(model, rec).complete(MESSAGES, iteration=1)
    assert reply.text == "ok" and reply.calls == 3
    assert [r[:2] for r in rec.retries] == [(1, status), (2, status)]


@pytest.mark.parametrize(("status", "kind"), [(400, ErrorKind.PERMANENT), (422, ErrorKind.PERMANENT),
                                              (401, ErrorKind.FATAL), (403, ErrorKind.FATAL), (404, ErrorKind.FATAL)])
async def test_non_transient_statuses_are_not_retried(scripted, status: int, kind: ErrorKind) -> None:
    model = scripted([[err(status, "no"), "never reached"]])
    rec = Recorder()
    with pytest.raises(ModelError) as info:
        await client(model, rec).complete(MESSAGES, iteration=1)
    assert info.value.kind is kind and info.value.status == status
    assert info.value.calls == 1
    assert rec.events == []


async def test_exhaustion_after_max_attempts(scripted) -> None:
    model = scripted([err(503, "upstream down")])
    rec = Recorder()
    with pytest.raises(ModelError) as info:
        await client(model, rec).complete(MESSAGES, iteration=1)
    e = info.value
    assert str(e).startswith(f"{model} failed after 4 attempts: 503 ")
    assert "upstream down" in str(e)
    assert e.kind is ErrorKind.TRANSIENT and e.status == 503 and e.calls == 4
    assert [r[0] for r in rec.retries] == [1, 2, 3]
    ceilings = [0.5, 1.0, 2.0]
    assert all(0 <= d <= c for d, c in zip(rec.sleeps, ceilings, strict=True))


async def test_custom_policy_attempts(scripted) -> None:
    model = scripted([err(429)])
    rec = Recorder()
    with pytest.raises(ModelError, match="failed after 2 attempts: 429"):
        await client(model, rec, retry=RetryPolicy(max_attempts=2)).complete(MESSAGES, iteration=1)


async def test_context_window_error_is_detectable(scripted) -> None:
    model = scripted([err(400, "This model's maximum context length is 8192 tokens. However, you requested 9000.")])
    rec = Recorder()
    with pytest.raises(ModelError) as info:
        await client(model, rec).complete(MESSAGES, iteration=1)
    assert info.value.code == "context_window"
    assert info.value.kind is ErrorKind.PERMANENT and info.value.calls == 1


async def test_timeout_is_transient_and_retried(scripted) -> None:
    model = scripted([[{"content": "late", "delay": 5.0}, "on time"]])
    rec = Recorder()
    reply = await client(model, rec, timeout=0.05).complete(MESSAGES, iteration=1)
    assert reply.text == "on time" and reply.calls == 2
    assert rec.retries[0][1] == 408


async def test_delay_is_waited(scripted) -> None:
    model = scripted([{"content": "slowish", "delay": 0.2}])
    reply = await client(model, Recorder()).complete(MESSAGES, iteration=1)
    assert reply.latency_ms >= 190


async def test_malformed_reply_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = _litellm()
    replies = iter([SimpleNamespace(choices=[]), SimpleNamespace(choices=[SimpleNamespace()]),
                    SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=None))],
                                    usage=None, _hidden_params={})])

    async def fake_acompletion(**kwargs: Any) -> Any:
        assert "num_retries" not in kwargs
        return next(replies)

    monkeypatch.setattr(litellm, "acompletion", fake_acompletion)
    rec = Recorder()
    reply = await client("openai/gpt-4o-mini", rec).complete(MESSAGES, iteration=1)
    assert reply.text == "" and reply.calls == 3 and reply.cost_usd == 0.0
    assert len(rec.retries) == 2


async def test_request_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = _litellm()
    seen: list[dict[str, Any]] = []

    async def fake_acompletion(**kwargs: Any) -> Any:
        seen.append(kwargs)
        if len(seen) == 1:
            raise litellm.RateLimitError(message="rl", llm_provider="openai", model="gpt-4o-mini")
        return litellm.ModelResponse(
            model="gpt-4o-mini",
            choices=[{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        )

    monkeypatch.setattr(litellm, "acompletion", fake_acompletion)
    c = ModelClient("openai/gpt-4o-mini", sleep=Recorder().sleep, temperature=0.3, max_tokens=77,
                    timeout=9.0, api_base="http://127.0.0.1:1/v1")
    reply = await c.complete(MESSAGES, iteration=4, call_index=2)
    assert reply.tokens_in == 3 and reply.tokens_out == 1 and reply.calls == 2
    assert [k["metadata"] for k in seen] == [{"loopterm": {"iteration": 4, "call": 2}},
                                             {"loopterm": {"iteration": 4, "call": 3}}]
    for k in seen:
        assert "num_retries" not in k and k["max_retries"] == 0
        assert (k["temperature"], k["max_tokens"], k["timeout"], k["api_base"]) == (0.3, 77, 9.0, "http://127.0.0.1:1/v1")
    # no response_cost from a hand-made response: litellm.completion_cost prices it from usage
    assert reply.cost_usd == pytest.approx(sum(_litellm().cost_per_token(
        model="openai/gpt-4o-mini", prompt_tokens=3, completion_tokens=1)))
    assert reply.cost_usd > 0


async def test_unexpected_exception_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = _litellm()

    async def broken(**kwargs: Any) -> Any:
        raise TypeError("bad argument")

    monkeypatch.setattr(litellm, "acompletion", broken)
    rec = Recorder()
    with pytest.raises(ModelError, match="unexpected TypeError: bad argument") as info:
        await client("openai/gpt-4o-mini", rec).complete(MESSAGES, iteration=1)
    assert info.value.kind is ErrorKind.PERMANENT and rec.events == []


async def test_connection_refused_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-0000")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    rec = Recorder()
    c = client("openai/gpt-4o-mini", rec, api_base="http://127.0.0.1:9/v1", timeout=5.0,
               retry=RetryPolicy(max_attempts=2))
    with pytest.raises(ModelError) as info:
        await c.complete(MESSAGES, iteration=1)
    assert info.value.kind is ErrorKind.TRANSIENT and info.value.calls == 2
    assert "sk-test-not-a-real-key" not in str(info.value)


# ----------------------------------------------------------------------------- breaker


async def test_breaker_opens_after_repeated_503_and_short_circuits(scripted) -> None:
    model = scripted([err(503, "down"), "recovered"])
    clock = FakeClock()
    breaker = CircuitBreaker(model, failure_threshold=3, reset_timeout=30.0, clock=clock)
    rec = Recorder()
    c = client(model, rec, breaker=breaker)

    with pytest.raises(ModelError) as info:
        await c.complete(MESSAGES, iteration=1)
    assert info.value.code == "circuit_open" and info.value.calls == 3  # 4th attempt never made
    assert str(info.value) == f"circuit open for {model} after 3 consecutive failures; retrying in 30s"

    rec.events.clear()
    with pytest.raises(ModelError) as info:
        await c.complete(MESSAGES, iteration=2)  # would succeed, but the provider is not called
    assert info.value.kind is ErrorKind.TRANSIENT and info.value.calls == 0 and rec.events == []

    clock.now += 30  # half-open: one trial, which succeeds and closes the breaker
    reply = await c.complete(MESSAGES, iteration=2)
    assert reply.text == "recovered" and reply.calls == 1


async def test_shared_breaker_from_the_registry(scripted) -> None:
    model = scripted([err(503)])
    rec = Recorder()
    with pytest.raises(ModelError, match="failed after 4 attempts"):
        await client(model, rec).complete(MESSAGES, iteration=1)
    with pytest.raises(ModelError, match=r"circuit open for .* after 5 consecutive failures") as info:
        await client(model, rec).complete(MESSAGES, iteration=1)  # a new client, same model
    assert info.value.calls == 1


async def test_permanent_errors_do_not_trip_the_breaker(scripted) -> None:
    model = scripted([err(400)])
    breaker = CircuitBreaker(model, failure_threshold=2, clock=FakeClock())
    c = client(model, Recorder(), breaker=breaker)
    for _ in range(4):
        with pytest.raises(ModelError, match="400"):
            await c.complete(MESSAGES, iteration=1)
    assert breaker.failures == 0


async def test_cancelled_trial_is_released(scripted) -> None:
    model = scripted([{"content": "slow", "delay": 5.0}])
    clock = FakeClock()
    breaker = CircuitBreaker(model, failure_threshold=1, reset_timeout=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1
    c = client(model, Recorder(), breaker=breaker)
    task = asyncio.create_task(c.complete(MESSAGES, iteration=1))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    breaker.before_call()  # another trial is allowed


# ----------------------------------------------------------------------------- estimate


async def test_estimate_uses_litellm_tokens_and_price(scripted) -> None:
    model = scripted(["x"])
    litellm = _litellm()
    tokens, usd = ModelClient(model).estimate(MESSAGES, 500)
    prompt = litellm.token_counter(model=model, messages=MESSAGES)
    assert tokens == prompt + 500
    assert usd == pytest.approx(prompt * PRICE["input_cost_per_token"] + 500 * PRICE["output_cost_per_token"])


def test_estimate_without_a_price_is_zero_cost() -> None:
    tokens, usd = ModelClient("openai/no-such-model-xyz").estimate(MESSAGES, 100)
    assert tokens > 100 and usd == 0.0


# ----------------------------------------------------------------------------- preflight


def test_check_model_unknown_provider() -> None:
    with pytest.raises(ConfigError) as info:
        check_model("foo/bar")
    assert str(info.value) == (
        "unknown model 'foo/bar': litellm does not know provider 'foo'; "
        "use a litellm model string such as openai/gpt-4o-mini"
    )


def test_check_model_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        check_model("openai/gpt-4o-mini")
    assert str(info.value) == (
        "model openai/gpt-4o-mini needs OPENAI_API_KEY in the environment; set it or pick another --model"
    )
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy-key-for-test")
    check_model("openai/gpt-4o-mini")


def test_check_model_scripted_without_script() -> None:
    with pytest.raises(ConfigError, match=r"^model scripted/never-registered has no script; "):
        check_model("scripted/never-registered")


def test_check_model_registers_the_script(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"turns": ["hi"]}))
    check_model("scripted/preflight-registered", path)
    check_model("scripted/preflight-registered")  # now known
    check_model("scripted/preflight-registered", path)  # idempotent


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"turns": []}), "turns"),
        (json.dumps({"turns": [{"content": "a", "error": {"status": 500}}]}), "exactly one of"),
        (json.dumps({"turns": [{"error": {"status": 200, "message": "x"}}]}), "turns.0.error.status"),
        (json.dumps({"turns": ["a"], "after_end": "loop"}), "after_end"),
        (json.dumps({"turns": ["a"], "prices": {}}), "prices"),
        (json.dumps({"turns": [[]]}), "at least one step"),
    ],
)
def test_bad_script_is_a_config_error_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        check_model("scripted/bad", path)
    assert str(path) in str(info.value) and problem in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_script_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_script(tmp_path / "nope.json")


def test_example_script_validates() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "codefix" / "script.json"
    if not example.exists():
        pytest.skip("example script not present")
    assert load_script(example).turns


# ----------------------------------------------------------------------------- hygiene


def test_retry_after_header_is_read() -> None:
    exc = SimpleNamespace(litellm_response_headers={"retry-after": "2"})
    assert _retry_after(exc) == 2.0  # type: ignore[arg-type]
    exc = SimpleNamespace(response=SimpleNamespace(headers={"retry-after-ms": "1500"}))
    assert _retry_after(exc) == 1.5  # type: ignore[arg-type]
    exc = SimpleNamespace(litellm_response_headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert _retry_after(exc) is None  # type: ignore[arg-type]


def test_redact_removes_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "zz-very-secret-value")
    text = redact("Incorrect API key provided: sk-abc123def456ghi. Bearer tok_987654321 zz-very-secret-value")
    assert "sk-abc123def456ghi" not in text and "tok_987654321" not in text and "zz-very-secret" not in text


def test_importing_model_does_not_import_litellm() -> None:
    code = (
        "import sys\n"
        "import loopterm.core.model, loopterm.core.retry, loopterm.core.scripted\n"
        "print('litellm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
