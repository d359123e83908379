"""Prompt caching: the prompt's stable prefix, its marking for Claude, cached tokens and their price.

The provider calls go over real HTTP to a stub on 127.0.0.1 that answers in OpenAI's and Anthropic's
formats with cache usage (fakellm reports no cached tokens), through litellm's own request and
response code for each provider.
"""

from __future__ import annotations

import copy
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rich.console import Console

from loopterm.core import Invariant, Loop, LoopState, ToolRecord, tool
from loopterm.core.model import ModelClient, _litellm
from loopterm.core.prompt import build_messages
from loopterm.core.prompt_cache import cache_points, cached_tokens, hit_ratio
from loopterm.core.retry import RetryPolicy

CLAUDE = "anthropic/claude-sonnet-4-5"
GPT = "openai/gpt-4o"
REPLY = json.dumps({"action": None, "subgoal": "s", "confidence": 0.5, "reasoning": "r", "done": True})


@tool
def write(path: str, text: str) -> str:
    """Write a file."""
    return "wrote"


def make_loop() -> Loop:
    not_empty = Invariant(name="not_empty", check=lambda state: True, description="flag.txt is never empty")
    return Loop(name="cachey", goal="make flag.txt say ok", state=LoopState, tools=[write], invariants=[not_empty], model=GPT,
                context=lambda state: f"phase {state.iteration}")


def advance(state: LoopState, n: int) -> LoopState:
    """The state after iteration n: a new fact, subgoal, tool result and gate failure."""
    state = state.model_copy(deep=True)
    state.iteration = n
    state.memory.facts.append(f"iteration {n}: wrote flag.txt")
    state.memory.subgoal = f"step {n}"
    state.tool_results.append(ToolRecord(iteration=n, tool="write", args={}, ok=True, output=f"wrote {n}"))
    state.last_gate_failure = f"gate flag: attempt {n} failed"
    return state


# ----------------------------------------------------------------------------- layout


def test_what_a_run_never_changes_is_one_unchanging_system_message() -> None:
    loop = make_loop()
    state = loop.new_state()
    prompts = []
    for n in range(4):
        relaxed = {"not_empty": "a person allows it"} if n >= 2 else {}
        prompts.append(build_messages(loop, state, rules="Never use tabs.", relaxed=relaxed))
        state = advance(state, n + 1)
    systems = {p[0]["content"] for p in prompts}
    assert len(systems) == 1  # relaxing an invariant, new facts, tool output: none of it moves the prefix
    system = systems.pop()
    for stable in ("Tools:", "- write:", "- not_empty: flag.txt is never empty", "Never use tabs."):
        assert stable in system
    user = prompts[-1][1]["content"]
    order = ["# Task\nmake flag.txt say ok", "# Relaxed invariants", "not_empty: relaxed by a person: a person allows it",
             "# Loop state", "Facts:", "Current subgoal: step 3", "# Recent tool results", "# Last verification",
             "# Iteration\n4 of at most"]
    places = [user.index(part) for part in order]
    assert places == sorted(places) and user.startswith("# Task")
    assert "relaxed" not in system and "step 3" not in system


def test_consecutive_prompts_share_everything_up_to_the_working_memory() -> None:
    loop = make_loop()
    first = build_messages(loop, advance(loop.new_state(), 1))
    second = build_messages(loop, advance(advance(loop.new_state(), 1), 2))
    a, b = (json.dumps(m) for m in (first, second))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert a[:shared].endswith("# Loop state\\nphase ")  # the first difference is the first volatile value


def test_pruning_still_keeps_the_task_and_invariants_and_drops_rules_first_in_the_stable_part() -> None:
    loop = make_loop()
    state = advance(advance(loop.new_state(), 1), 2)
    rules = "Rule. " * 2_000
    pruned = build_messages(loop, state, rules=rules, token_budget=600)
    system, user = pruned[0]["content"], pruned[1]["content"]
    assert "- not_empty: flag.txt is never empty" in system and "# Task\nmake flag.txt say ok" in user
    assert len(system) + len(user) < len(rules)


# ----------------------------------------------------------------------------- marking


def test_only_models_that_cache_a_marked_prefix_get_a_breakpoint() -> None:
    _litellm()
    assert cache_points(CLAUDE) == [{"location": "message", "role": "system"}]
    assert cache_points(GPT) is None  # OpenAI caches prefixes on its own
    assert cache_points("scripted/demo") is None and cache_points("nonsense/model") is None


def test_cached_tokens_read_litellms_normalised_usage() -> None:
    litellm = _litellm()
    openai_usage = litellm.Usage(prompt_tokens=2_000, completion_tokens=10, prompt_tokens_details={"cached_tokens": 1_536})
    assert cached_tokens(openai_usage) == 1_536
    assert cached_tokens(litellm.Usage(prompt_tokens=5, completion_tokens=1)) == 0
    assert cached_tokens(None) == 0
    assert hit_ratio(1_536, 2_000) == pytest.approx(0.768) and hit_ratio(0, 0) is None


# ----------------------------------------------------------------------------- over HTTP, priced


class Stub:
    """Answers every POST with `answer` (OpenAI or Anthropic JSON); keeps the request bodies."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] = {}
        self.answers: list[dict[str, Any]] = []  # answered in order before `answer`
        self.bodies: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                size = int(self.headers.get("content-length") or 0)
                stub.bodies.append(json.loads(self.rfile.read(size) or b"{}"))
                body = json.dumps(stub.answers.pop(0) if stub.answers else stub.answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = Stub()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def client(model: str, api_base: str) -> ModelClient:
    return ModelClient(model, retry=RetryPolicy(max_attempts=1), timeout=10, api_base=api_base)


def by_rates(model: str, uncached: int, read: int, written: int, out: int) -> float:
    """The price from litellm's own table, each kind of token at its rate."""
    price = _litellm().model_cost[model]
    return (uncached * price["input_cost_per_token"] + read * price["cache_read_input_token_cost"]
            + written * price.get("cache_creation_input_token_cost", 0.0) + out * price["output_cost_per_token"])


async def test_claude_gets_its_prefix_marked_and_cache_reads_and_writes_priced_as_litellm_prices_them(stub: Stub) -> None:
    litellm = _litellm()
    stub.answer = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 300, "output_tokens": 40, "cache_read_input_tokens": 1_800,
                  "cache_creation_input_tokens": 200},
    }
    messages = build_messages(make_loop(), make_loop().new_state())
    sent = copy.deepcopy(messages)
    reply = await client(CLAUDE, stub.url).complete(messages, iteration=1)

    assert messages == sent  # what is stored and journalled stays plain text
    system = stub.bodies[0]["system"]
    assert isinstance(system, list) and system[-1]["cache_control"] == {"type": "ephemeral"}
    assert system[-1]["text"] == messages[0]["content"]
    assert all("cache_control" not in json.dumps(m) for m in stub.bodies[0]["messages"])  # one breakpoint

    assert (reply.tokens_in, reply.tokens_cached, reply.tokens_out) == (2_300, 1_800, 40)
    usage = litellm.Usage(prompt_tokens=2_300, completion_tokens=40, cache_read_input_tokens=1_800,
                          cache_creation_input_tokens=200,
                          prompt_tokens_details={"cached_tokens": 1_800, "cache_creation_tokens": 200})
    theirs = litellm.completion_cost(completion_response=litellm.ModelResponse(model="claude-sonnet-4-5", usage=usage),
                                     custom_llm_provider="anthropic")
    assert reply.cost_usd == pytest.approx(theirs, rel=1e-9)
    assert reply.cost_usd == pytest.approx(by_rates("claude-sonnet-4-5", 300, 1_800, 200, 40), rel=1e-9)
    assert reply.cost_usd < by_rates("claude-sonnet-4-5", 2_300, 0, 0, 40)  # a cache read is cheaper


async def test_openai_caches_on_its_own_and_its_cached_tokens_are_priced_at_their_rate(stub: Stub) -> None:
    litellm = _litellm()
    stub.answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2_048, "completion_tokens": 30, "total_tokens": 2_078,
                  "prompt_tokens_details": {"cached_tokens": 1_920}},
    }
    messages = build_messages(make_loop(), make_loop().new_state())
    reply = await client(GPT, stub.url + "/v1").complete(messages, iteration=1)

    assert "cache_control" not in json.dumps(stub.bodies[0])
    assert (reply.tokens_in, reply.tokens_cached, reply.tokens_out) == (2_048, 1_920, 30)
    usage = litellm.Usage(prompt_tokens=2_048, completion_tokens=30, prompt_tokens_details={"cached_tokens": 1_920})
    theirs = litellm.completion_cost(completion_response=litellm.ModelResponse(model="gpt-4o", usage=usage),
                                     custom_llm_provider="openai")
    assert reply.cost_usd == pytest.approx(theirs, rel=1e-9)
    assert reply.cost_usd == pytest.approx(by_rates("gpt-4o", 128, 1_920, 0, 30), rel=1e-9)


# ----------------------------------------------------------------------------- a run, end to end


def openai_answer(reply: str, prompt: int, cached: int, out: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }


async def test_a_runs_cached_tokens_reach_its_records_the_ledger_show_budget_spans_and_the_header(
        stub: Stub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loopterm.core.spans import lineage_spans
    from loopterm.tui.cli import main
    from loopterm.tui.headless import summary
    from loopterm.tui.widgets.render import Palette, header_text, response_text
    from tests.loopkit import decision, make_engine

    stub.answers = [openai_answer(json.dumps(decision("flag_write", text="no")), 1_500, 0, 20),
                    openai_answer(json.dumps(decision("flag_write", text="ok", done=True)), 1_600, 1_408, 20)]
    loop = Loop(name="cachey", goal="make flag.txt say ok", state=LoopState, tools=[flag_write], model=GPT,
                decision_mode="text",  # the stub answers JSON text
                max_iterations=2)
    engine, store = make_engine(tmp_path, loop, client=client(GPT, stub.url + "/v1"))
    run = await engine.run()

    first, second = store.iterations(run.id)
    assert (first.tokens_cached, second.tokens_cached) == (0, 1_408)
    assert (run.tokens_in, run.tokens_cached) == (3_100, 1_408)
    price = by_rates("gpt-4o", 1_500, 0, 0, 20) + by_rates("gpt-4o", 192, 1_408, 0, 20)
    assert run.cost_usd == pytest.approx(price, rel=1e-9)

    db = str(tmp_path / "db" / "loopterm.db")
    store.close()
    assert main(["show", run.id, "--json", "--db", db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["tokens_cached"] == 1_408 and [i["tokens_cached"] for i in shown["iterations"]] == [0, 1_408]
    assert main(["budget", "--json", "--db", db]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert [(d["tokens_in"], d["tokens_cached"]) for d in figures["by_model"]] == [(3_100, 1_408)]
    assert main(["budget", "--db", db]) == 0
    table = capsys.readouterr().out
    assert "cached" in table and "45%" in table  # 1,408 of 3,100

    spans = [(span.name, dict(span.attributes or {})) for span in lineage_spans(store_of(db), run.id)]
    assert [a["gen_ai.usage.cache_read.input_tokens"] for name, a in spans if name.startswith("chat ")] == [0, 1_408]
    assert [a["loopterm.tokens_cached"] for name, a in spans if name == "run cachey"] == [1_408]

    assert "cache 45%" in header_text(run, Palette()).plain
    assert "1,408 cached, 88%" in response_text(second).plain
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(summary(run))
    assert "1,408 of the 3,100 in (45%" in console.export_text()


async def test_a_repaired_decision_counts_the_cached_tokens_of_every_call_it_made(stub: Stub, tmp_path: Path) -> None:
    """Like tokens_in: the invalid reply's call was paid for (its cached part at the cached rate) too."""
    from tests.loopkit import decision, make_engine

    stub.answers = [openai_answer("I will write it now.", 1_500, 1_024, 10),
                    openai_answer(json.dumps(decision("flag_write", text="ok", done=True)), 1_600, 1_408, 20)]
    loop = Loop(name="cachey", goal="make flag.txt say ok", state=LoopState, tools=[flag_write], model=GPT,
                decision_mode="text", max_iterations=1)
    engine, store = make_engine(tmp_path, loop, client=client(GPT, stub.url + "/v1"))
    run = await engine.run()
    (only,) = store.iterations(run.id)
    assert only.repairs == 1 and (only.tokens_in, only.tokens_cached) == (3_100, 2_432)
    assert (run.tokens_in, run.tokens_cached) == (3_100, 2_432)
    store.close()


async def test_a_model_checkers_cached_tokens_count_in_the_iteration_and_its_gate_span(
        stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checker's call is a model call like the maker's: its cached input is in the iteration's and the
    run's tokens_cached (as its input is in tokens_in), in its gate result and in its span."""
    from loopterm.core.checkers import ModelGate
    from loopterm.core.roles import Role
    from loopterm.core.spans import lineage_spans
    from tests.loopkit import decision, make_engine

    monkeypatch.setenv("OPENAI_BASE_URL", stub.url + "/v1")  # the checker's own client finds the stub here
    verdict = json.dumps({"verdict": "pass", "reason": "flag.txt says ok"})
    stub.answers = [openai_answer(json.dumps(decision("flag_write", text="ok", done=True)), 1_600, 1_408, 20),
                    openai_answer(verdict, 1_200, 1_024, 15)]
    critic = Role(name="critic", system_prompt="You review the maker's step.", model="openai/gpt-4o-mini")
    loop = Loop(name="cachey", goal="make flag.txt say ok", state=LoopState, tools=[flag_write], model=GPT,
                decision_mode="text", max_iterations=1,
                gates=[ModelGate(name="review", role=critic, instructions="Pass when the step is sound.")])
    engine, store = make_engine(tmp_path, loop, client=client(GPT, stub.url + "/v1"))
    run = await engine.run()
    (only,) = store.iterations(run.id)
    assert run.status == "converged" and only.gate_results[0]["tokens_cached"] == 1_024
    assert (only.tokens_in, only.tokens_cached) == (2_800, 2_432) and run.tokens_cached == 2_432
    spans = [(span.name, dict(span.attributes or {})) for span in lineage_spans(store, run.id)]
    gate = next(attrs for name, attrs in spans if attrs.get("loopterm.gate.name") == "review")
    assert gate["gen_ai.usage.cache_read.input_tokens"] == 1_024
    store.close()


def store_of(db: str) -> Any:
    from loopterm.store import Store

    return Store.open(db, create=False)


@tool
def flag_write(text: str) -> str:
    """Write flag.txt."""
    return f"wrote {text}"


def test_the_headers_spend_line_with_the_cache_ratio_fits_80_columns() -> None:
    from loopterm.core.records import RunRecord
    from loopterm.tui.widgets.render import Palette, header_text

    run = RunRecord(id="a1b2c3d4e5f6", loop="codefix", loop_ref="codefix", goal="g", spec_hash="h",
                    model="anthropic/claude-sonnet-4-5", status="running", workspace="/w", created_at=0, updated_at=0,
                    max_iterations=30, iterations=12, tokens_in=41_000, tokens_out=4_678, tokens_cached=30_750,
                    cost_usd=0.1234, elapsed_s=123.4, budget={"tokens": 200_000, "usd": 0.5})
    spend = header_text(run, Palette()).plain.splitlines()[1]
    assert spend == "iteration 12/30  tokens 45,678/200,000  cache 75%  cost $0.1234/$0.5  123.4s"
    assert len(spend) <= 80
    assert "cache" not in header_text(run.model_copy(update={"tokens_cached": 0}), Palette()).plain


async def test_in_tools_mode_claudes_breakpoint_still_ends_the_system_message_after_the_functions(stub: Stub) -> None:
    from loopterm.core.decision_modes import request_params

    stub.answer = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "no_action",
                     "input": {"subgoal": "s", "confidence": 0.5, "reasoning": "r", "done": True}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 1_500},
    }
    loop = make_loop()
    messages = build_messages(loop, loop.new_state(), decision_mode="tools")
    reply = await client(CLAUDE, stub.url).complete(messages, iteration=1,
                                                     params=request_params("tools", loop.tools, CLAUDE))
    body = stub.bodies[0]
    assert [t["name"] for t in body["tools"]][:1] == ["write"]  # cached before the system text, under its mark
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert (reply.tokens_in, reply.tokens_cached) == (1_600, 1_500) and reply.tool_calls
