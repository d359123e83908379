"""Decision modes (issue 16.4): the provider's own tool call, a JSON-schema reply, or JSON text.

Over real HTTP against fakellm in its OpenAI format (/v1/chat/completions, `tool_calls`) and its
Anthropic format (/v1/messages, `tool_use`), through a recording proxy on 127.0.0.1 that keeps
what each request carried (tools, tool_choice, response_format); offline through the scripted and
replay providers. fakellm counts turns per conversation (a hash of the first user message): each
iteration's user message differs, so turn 1 is an iteration's first call and turn 2 its repair.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.decision import DecisionError
from loopterm.core.decision_modes import (
    as_decision_text,
    as_tool_call,
    choose_mode,
    envelope,
    message_reply,
    read_decision,
    request_params,
    tool_functions,
)
from loopterm.core.prompt import repair_messages, system_message
from loopterm.core.retry import reset_breakers
from loopterm.tui.cli import main
from tests.loopkit import decision, make_engine, make_loop, write

DUMMY_KEY = "sk-loopterm-dummy-key-123456"


# ----------------------------------------------------------------------------- unit: reading a tool call


def call(name: str, arguments: Any) -> str:
    return envelope(None, [{"name": name, "arguments": json.dumps(arguments) if not isinstance(arguments, str) else arguments}])


def test_a_tool_call_is_the_same_decision_as_its_json_text() -> None:
    text = decision("write", text="ok", subgoal="fix it", confidence=0.8)
    native = read_decision("tools", call("write", as_tool_call(text)["arguments"]), [write])
    assert native == read_decision("text", json.dumps(text), [write])
    assert native.action is not None and native.action.args == {"text": "ok"}
    none = read_decision("tools", call("no_action", {"subgoal": "wait", "confidence": 0.3, "done": True}), [write])
    assert (none.action, none.subgoal, none.done) == (None, "wait", True)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (envelope("I will write ok.", []), "no function was called (a text reply is not read); call exactly one of: write, no_action"),
        (envelope(None, [{"name": "write", "arguments": "{}"}, {"name": "no_action", "arguments": "{}"}]),
         "2 functions were called ('write', 'no_action'); call exactly one of: write, no_action"),
        (call("rm_rf", {"confidence": 0.5}), "unknown function 'rm_rf'; call exactly one of: write, no_action"),
        (call("write", "{not json"), "the arguments of 'write' are not valid JSON"),
        (call("write", {"text": "ok", "confidence": 0.5}),
         "unknown key 'text' in the arguments of 'write': the tool's own arguments go in \"args\""),
        (call("no_action", {"args": {}, "confidence": 0.5}), "unknown key 'args' in the arguments of 'no_action'"),
        (call("write", {"args": {}, "confidence": 2}), "confidence: Input should be less than or equal to 1"),
    ],
)
def test_every_way_a_tool_call_is_wrong_is_said(raw: str, reason: str) -> None:
    with pytest.raises(DecisionError) as caught:
        read_decision("tools", raw, [write])
    assert reason in str(caught.value)


def test_the_request_per_mode() -> None:
    (fn, nothing) = tool_functions([write])
    assert fn["function"]["name"] == "write" and "(side effects)" in fn["function"]["description"]
    params = fn["function"]["parameters"]
    assert params["properties"]["args"] == write.schema() and params["required"] == ["args", "confidence"]
    assert set(params["properties"]) == {"args", "subgoal", "confidence", "reasoning", "done"}
    assert nothing["function"]["name"] == "no_action" and "args" not in nothing["function"]["parameters"]["properties"]
    assert request_params("tools", [write], "openai/gpt-4o-mini")["tool_choice"] == "required"
    schema = request_params("json_schema", [write], "openai/gpt-4o-mini")["response_format"]["json_schema"]["schema"]
    (one, null) = schema["properties"]["action"]["anyOf"]
    assert (one["properties"]["tool"]["enum"], one["properties"]["args"], null) == (["write"], write.schema(), {"type": "null"})
    assert request_params("text", [write], "openai/gpt-4o-mini") == {}


def test_auto_asks_litellm_per_model_and_a_loop_can_force_a_mode() -> None:
    assert choose_mode("openai/gpt-4o-mini", "auto") == "tools"  # litellm: supports function calling
    assert choose_mode("anthropic/claude-haiku-4-5", "auto") == "tools"
    assert choose_mode("openai/gpt-5-chat", "auto") == "json_schema"  # a response schema, no function calling
    assert choose_mode("openai/some-local-model", "auto") == "text"  # litellm knows nothing of it
    assert choose_mode("scripted/anything", "auto") == "text"
    assert choose_mode("openai/gpt-4o-mini", "text") == "text"
    assert choose_mode("openai/some-local-model", "tools") == "tools"


def test_the_system_prompt_says_how_to_reply_in_each_mode(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, ["{}"])
    assert "Reply with one JSON object" in system_message(loop, decision_mode="text")
    assert "Reply with one JSON object" in system_message(loop, decision_mode="json_schema")
    tools = system_message(loop, decision_mode="tools")
    assert "calling exactly one of the functions" in tools and "no_action" in tools and "JSON object" not in tools


def test_a_tools_mode_repair_answers_every_call_before_asking_again() -> None:
    base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    calls = [{"id": "call_random1", "name": "a", "arguments": "{}"}, {"id": "toolu_x", "name": "b", "arguments": "{}"}]
    out = repair_messages(base, "", "2 functions were called", calls, "tools")
    said, first, second, ask = out[2:]
    assert [c["id"] for c in said["tool_calls"]] == ["call_1_1", "call_1_2"]  # renumbered: a replay sends the same
    assert (first["role"], first["tool_call_id"], second["tool_call_id"]) == ("tool", "call_1_1", "call_1_2")
    assert ask["role"] == "user" and "2 functions were called" in ask["content"]
    # what the stored prompt's assistant turn says is what raw_response said of that reply
    assert message_reply(said, "tools") == envelope("", calls)
    # a reply with no call at all: an assistant turn a provider accepts, then the request
    empty = repair_messages(base, "", "no function was called", [], "tools")
    assert empty[2] == {"role": "assistant", "content": "(no reply)"} and empty[3]["role"] == "user"


def test_an_explicit_tool_call_reads_back_as_json_text() -> None:
    text = as_decision_text({"name": "write", "arguments": {"args": {"text": "ok"}, "confidence": 0.4}})
    assert json.loads(text) == {"action": {"tool": "write", "args": {"text": "ok"}}, "confidence": 0.4}
    assert json.loads(as_decision_text({"name": "no_action", "arguments": '{"confidence": 0.1}'}))["action"] is None


# ----------------------------------------------------------------------------- offline: the scripted provider


@pytest.mark.parametrize("mode", ["tools", "json_schema", "text"])
async def test_every_script_answers_in_every_mode(tmp_path: Path, mode: str) -> None:
    """The same JSON-text script converges in each mode; a turn that calls a tool that does not exist
    (given as an explicit tool call) is repaired on the next call, in each mode."""
    turns = [{"content": decision(text="no")},
             [{"tool_calls": [{"name": "delete_all", "arguments": {"args": {}, "confidence": 0.9}}]},
              {"content": decision(text="ok")}]]
    engine, store = make_engine(tmp_path, make_loop(tmp_path, turns, decision_mode=mode))
    run = await engine.run()
    assert (run.status, run.iterations) == ("converged", 2)
    first, second = store.iterations(run.id)
    assert (first.decision_mode, second.decision_mode) == (mode, mode)
    assert (first.repairs, second.repairs) == (0, 1)
    assert second.tool_call is not None and second.tool_call["args"] == {"text": "ok"}
    if mode == "tools":
        assert json.loads(first.raw_response) == {"tool_calls": [{"name": "write", "arguments": {
            "args": {"text": "no"}, "subgoal": "make progress", "confidence": 0.6, "reasoning": "because", "done": False}}]}
        said, result, ask = second.prompt[2:]
        assert said["tool_calls"][0]["function"]["name"] == "delete_all" and result["role"] == "tool"
        assert "unknown function 'delete_all'; call exactly one of: write, no_action" in ask["content"]
    else:
        assert json.loads(first.raw_response)["action"] == {"tool": "write", "args": {"text": "no"}}
        assert "unknown tool 'delete_all'; available tools: write" in second.prompt[-1]["content"]


# ----------------------------------------------------------------------------- over HTTP: fakellm behind a recording proxy


class RecordingProxy:
    """Forwards every POST to fakellm and keeps (path, body) of what it forwarded."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, dict[str, Any]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                proxy.requests.append((self.path, json.loads(body or b"{}")))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                forward = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(forward, timeout=10) as answer:
                        status, payload, kind = answer.status, answer.read(), answer.headers.get("content-type")
                except urllib.error.HTTPError as exc:
                    status, payload, kind = exc.code, exc.read(), exc.headers.get("content-type")
                self.send_response(status)
                self.send_header("content-type", kind or "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(fakellm_server: Any) -> Iterator[RecordingProxy]:
    running = RecordingProxy(fakellm_server.root)
    try:
        yield running
    finally:
        running.close()


PROVIDERS = {
    # model, the environment variable litellm reads the address from, the address (Anthropic's: the root;
    # litellm adds /v1/messages), the path fakellm answers
    "openai": ("openai/gpt-4o-mini", "OPENAI_API_BASE", "/v1", "/v1/chat/completions"),
    "anthropic": ("anthropic/claude-haiku-4-5", "ANTHROPIC_API_BASE", "", "/v1/messages"),
}

LOOP_FILE = '''
from loopterm.core import CommandGate, Loop, ToolContext, tool


@tool(side_effects=True, workspace_only=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write text to flag.txt in the workspace."""
    (ctx.workspace / "flag.txt").write_text(text)
    return f"wrote {{len(text)}} characters"


loop = Loop(
    name="flagger",
    goal={goal!r},
    tools=[write],
    gates=[CommandGate(name="flag", argv=["{{python}}", "-c",
           "import sys; sys.exit(0 if open('flag.txt').read() == 'ok' else 1)"])],
    model={model!r},
    max_iterations=4,
    decision_mode={mode!r},
)
'''


def fields(text: str, **extra: Any) -> dict[str, Any]:
    return {"args": {"text": text}, "subgoal": f"write {text}", "confidence": 0.7, "reasoning": "the gate reads it",
            "done": False, **extra}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def run_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, proxy: RecordingProxy,
             provider: str, mode: str, model: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run the flagger loop file against fakellm (through the proxy); the run as `show --json` gives it."""
    reset_breakers()
    default, variable, suffix, _ = PROVIDERS[provider]
    monkeypatch.setenv(variable, proxy.root + suffix)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", DUMMY_KEY)
    monkeypatch.chdir(tmp_path)
    goal = f"make flag.txt say ok ({uuid.uuid4().hex[:8]})"
    (tmp_path / "loop.py").write_text(LOOP_FILE.format(goal=goal, model=model or default, mode=mode))
    db = tmp_path / "r.db"
    code, out = cli(capsys, "run", str(tmp_path / "loop.py"), "--headless", "--db", str(db))
    assert code == 0, out
    code, out = cli(capsys, "runs", "--db", str(db), "--json")
    run_id = json.loads(out)[-1]["id"]
    code, out = cli(capsys, "show", run_id, "--db", str(db), "--json")
    assert code == 0, out
    return db, json.loads(out)


def tool_rules(tag: str) -> list[dict[str, Any]]:
    """Iteration 1: a call to a tool that does not exist, then (its repair) write "no"; iteration 2: write "ok"."""
    first, second = "\n1 of at most", "\n2 of at most"
    return [
        {"name": f"{tag}-1-bad", "when": {"messages_contain": first, "turn": 1, "tools_include": "no_action"},
         "respond": {"content": "", "tool_calls": [{"name": "delete_everything", "arguments": fields("x")}]}},
        {"name": f"{tag}-1-fixed", "when": {"messages_contain": first, "turn": 2, "tools_include": "no_action"},
         "respond": {"content": "", "tool_calls": [{"name": "write", "arguments": fields("no")}]}},
        {"name": f"{tag}-2", "when": {"messages_contain": second, "tools_include": "no_action"},
         "respond": {"content": "", "tool_calls": [{"name": "write", "arguments": fields("ok", done=True)}]}},
        {"name": f"{tag}-fallthrough", "respond": {"content": "no rule matched this request"}},
    ]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_tools_mode_converges_with_native_tool_calls_and_repairs_an_unknown_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fakellm_server: Any,
    proxy: RecordingProxy, provider: str,
) -> None:
    tag = f"tools-{provider}-{uuid.uuid4().hex[:6]}"
    fakellm_server.set_rules(tool_rules(tag))
    db, shown = run_loop(tmp_path, capsys, monkeypatch, proxy, provider, "auto")  # auto: litellm says tools
    assert (shown["run"]["status"], shown["run"]["iterations"]) == ("converged", 2)
    assert [fakellm_server.hits(f"{tag}-{k}") for k in ("1-bad", "1-fixed", "2", "fallthrough")] == [1, 1, 1, 0]
    first, second = shown["iterations"]
    assert (first["decision_mode"], second["decision_mode"]) == ("tools", "tools")
    assert (first["repairs"], first["tool_call"]["args"], second["tool_call"]["args"]) == (1, {"text": "no"}, {"text": "ok"})
    assert json.loads(second["raw_response"]) == {"tool_calls": [{"name": "write", "arguments": fields("ok", done=True)}]}
    said, result, ask = first["prompt"][2:]  # the repair: the call, its result, the request
    assert said["tool_calls"][0]["function"]["name"] == "delete_everything"
    assert result == {"role": "tool", "tool_call_id": "call_1_1", "content": result["content"]}
    assert "unknown function 'delete_everything'; call exactly one of: write, no_action" in ask["content"]

    # What went over the wire: the provider's own tools, one call required, in its own format.
    path = PROVIDERS[provider][3]
    sent = [body for p, body in proxy.requests if p == path]
    assert len(sent) == 3 and all("response_format" not in b for b in sent)
    if provider == "openai":
        assert [t["function"]["name"] for t in sent[0]["tools"]] == ["write", "no_action"]
        assert all(b["tool_choice"] == "required" and b["parallel_tool_calls"] is False for b in sent)
        repair = sent[1]["messages"]
        assert [m["role"] for m in repair] == ["system", "user", "assistant", "tool", "user"]
    else:
        assert [t["name"] for t in sent[0]["tools"]] == ["write", "no_action"]
        assert sent[0]["tools"][0]["input_schema"]["properties"]["args"]["required"] == ["text"]
        assert all(b["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True} for b in sent)  # "required"
        repair = sent[1]["messages"]
        assert [m["role"] for m in repair] == ["user", "assistant", "user"]
        assert repair[1]["content"][-1]["type"] == "tool_use"
        assert [b["type"] for b in repair[2]["content"]][0] == "tool_result"

    # A replay (offline, the replay/ provider) reproduces the tools-mode run exactly.
    code, out = cli(capsys, "replay", shown["run"]["id"], "--db", str(db), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["identical"] is True and report["divergence"] is None and report["iterations_compared"] == 2
    code, out = cli(capsys, "show", report["replay_run"], "--db", str(db), "--json")
    replayed = json.loads(out)["iterations"]
    assert [it["decision_mode"] for it in replayed] == ["tools", "tools"]
    assert [it["raw_response"] for it in replayed] == [it["raw_response"] for it in shown["iterations"]]
    assert replayed[0]["prompt"] == first["prompt"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_json_schema_mode_sends_the_decision_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fakellm_server: Any,
    proxy: RecordingProxy, provider: str,
) -> None:
    tag = f"schema-{provider}-{uuid.uuid4().hex[:6]}"
    ok = json.dumps({"action": {"tool": "write", "args": {"text": "ok"}}, "subgoal": "write ok", "confidence": 0.8,
                     "reasoning": "r", "done": True})
    fakellm_server.set_rules([
        {"name": f"{tag}-bad", "when": {"messages_contain": "\n1 of at most", "turn": 1},
         "respond": {"content": json.dumps({"tool": "write", "arguments": {"text": "ok"}, "confidence": 0.8})}},
        {"name": f"{tag}-ok", "when": {"messages_contain": "\n1 of at most", "turn": 2}, "respond": {"content": ok}},
    ])
    _, shown = run_loop(tmp_path, capsys, monkeypatch, proxy, provider, "json_schema")
    assert (shown["run"]["status"], shown["run"]["iterations"]) == ("converged", 1)
    (only,) = shown["iterations"]
    assert (only["decision_mode"], only["repairs"], json.loads(only["raw_response"])) == ("json_schema", 1, json.loads(ok))
    assert "unknown key 'tool' at the top level: put the call in" in only["prompt"][-1]["content"]
    sent = [body for p, body in proxy.requests if p == PROVIDERS[provider][3]]
    assert len(sent) == 2
    if provider == "openai":
        fmt = sent[0]["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "decision"
        assert fmt["json_schema"]["schema"]["required"] == ["action", "confidence"]
        assert "tools" not in sent[0]
    else:  # litellm (pinned) carries it as Anthropic's structured output, with each tool's own arguments
        assert "response_format" not in sent[0] and "tools" not in sent[0]
        action = sent[0]["output_format"]["schema"]["properties"]["action"]["anyOf"][0]
        assert action["properties"]["args"]["required"] == ["text"]


def test_auto_chooses_per_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                fakellm_server: Any, proxy: RecordingProxy) -> None:
    """A model litellm knows nothing of is asked for JSON text: no tools, no response_format."""
    tag = f"text-{uuid.uuid4().hex[:6]}"
    ok = json.dumps({"action": {"tool": "write", "args": {"text": "ok"}}, "confidence": 0.8})
    fakellm_server.set_rules([{"name": tag, "respond": {"content": ok}}])
    _, shown = run_loop(tmp_path, capsys, monkeypatch, proxy, "openai", "auto", model="openai/my-own-local-model")
    assert shown["run"]["status"] == "converged" and shown["iterations"][0]["decision_mode"] == "text"
    (sent,) = [body for _, body in proxy.requests]
    assert "tools" not in sent and "response_format" not in sent and "tool_choice" not in sent
    assert "Reply with one JSON object" in sent["messages"][0]["content"]


def test_auto_does_not_choose_tools_when_a_tool_name_cannot_be_a_function_name() -> None:
    assert choose_mode("openai/gpt-4o-mini", "auto", 1, ["write", "git.status"]) == "json_schema"
    assert choose_mode("openai/gpt-4o-mini", "auto", 1, ["write", "git_status"]) == "tools"


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_two_calls_then_no_call_are_each_repaired_in_a_conversation_the_provider_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fakellm_server: Any,
    proxy: RecordingProxy, provider: str,
) -> None:
    tag = f"twice-{provider}-{uuid.uuid4().hex[:6]}"
    first = "\n1 of at most"
    fakellm_server.set_rules([
        {"name": f"{tag}-two", "when": {"messages_contain": first, "turn": 1},
         "respond": {"content": "", "tool_calls": [{"name": "write", "arguments": fields("ok")},
                                                   {"name": "no_action", "arguments": {"confidence": 0.2}}]}},
        {"name": f"{tag}-none", "when": {"messages_contain": first, "turn": 2},
         "respond": {"content": "I would write ok."}},
        {"name": f"{tag}-ok", "when": {"messages_contain": first, "turn": 3},
         "respond": {"content": "", "tool_calls": [{"name": "write", "arguments": fields("ok")}]}},
    ])
    db, shown = run_loop(tmp_path, capsys, monkeypatch, proxy, provider, "tools")
    assert (shown["run"]["status"], shown["run"]["iterations"]) == ("converged", 1)
    (only,) = shown["iterations"]
    assert only["repairs"] == 2
    asks = [m["content"] for m in only["prompt"] if m["role"] == "user"][1:]
    assert asks[0].startswith("Your reply was not a valid decision: 2 functions were called ('write', 'no_action')")
    assert asks[1].startswith("Your reply was not a valid decision: no function was called (a text reply is not read)")
    sent = [body for p, body in proxy.requests if p == PROVIDERS[provider][3]]
    last = sent[-1]["messages"]
    if provider == "openai":
        assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "tool", "user", "assistant", "user"]
        assert [m["tool_call_id"] for m in last[3:5]] == [c["id"] for c in last[2]["tool_calls"]]
    else:
        assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
        uses = [b["id"] for b in last[1]["content"] if b["type"] == "tool_use"]
        answered = [b["tool_use_id"] for b in last[2]["content"] if b["type"] == "tool_result"]
        assert uses == answered and len(uses) == 2
    code, out = cli(capsys, "replay", shown["run"]["id"], "--db", str(db), "--json")  # both repairs, replayed
    assert code == 0 and json.loads(out)["identical"] is True, out


def test_a_replay_asks_in_the_mode_each_iteration_was_recorded_in() -> None:
    from loopterm.core.recording import Recording, register_recording
    from loopterm.core.records import IterationRecord

    run_id = f"modes{uuid.uuid4().hex[:8]}"
    records = {n: IterationRecord(run_id=run_id, n=n, started_at=0.0, ended_at=0.0, prompt=[], raw_response="",
                                  decision=None, state={}, decision_mode=mode)
               for n, mode in ((1, "tools"), (2, "text"))}
    model = register_recording(Recording(run_id=run_id, iterations=records))
    assert [choose_mode(model, "json_schema", n) for n in (1, 2)] == ["tools", "text"]  # the loop's setting yields


def test_the_budget_check_counts_the_functions_as_input() -> None:
    from loopterm.core.model import ModelClient

    client = ModelClient("openai/gpt-4o-mini", timeout=5.0)
    messages = [{"role": "user", "content": "hi"}]
    bare, _ = client.estimate(messages, 10)
    with_tools, _ = client.estimate(messages, 10, tools=tool_functions([write]))
    assert with_tools > bare + 50


def test_an_unpaired_surrogate_in_a_call_is_stored_escaped_and_refused_as_in_text_mode() -> None:
    raw = envelope("é", [{"name": "write", "arguments": '{"args": {"text": "\\ud800"}, "confidence": 0.5}'}])
    raw.encode("utf-8")  # storable
    assert "é" not in raw and "\\ud800" in raw
    with pytest.raises(DecisionError, match="unpaired surrogate"):
        read_decision("tools", raw, [write])
    assert "é" in envelope("é", [{"name": "write", "arguments": "{}"}])  # readable otherwise


@pytest.mark.parametrize("mode", ["tools", "text"])
async def test_the_builtin_codefix_script_converges_in_tools_mode_as_in_text_mode(tmp_path: Path, mode: str) -> None:
    """The shipped scripts are JSON text; asked with tools, the scripted model answers each as a tool call."""
    from loopterm.core.engine import Engine
    from loopterm.core.loader import load_loop
    from loopterm.core.model import check_model
    from loopterm.store import Store

    loop, ref = load_loop("codefix")
    loop = loop.model_copy(update={"decision_mode": mode})
    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "t.db")
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=tmp_path / "ws", workdir=tmp_path)
    run = await engine.run()
    records = store.iterations(run.id)
    store.close()
    assert (run.status, run.iterations) == ("converged", 3)
    assert {r.decision_mode for r in records} == {mode} and all(r.repairs == 0 for r in records)
    assert [r.tool_call["tool"] for r in records if r.tool_call] == ["write_file"] * 3


def test_a_literal_surrogate_in_a_providers_call_becomes_a_replacement_character() -> None:
    from loopterm.core.model import ModelReply

    reply = ModelReply(text="", tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=0.0, model="m", calls=1,
                       tool_calls=[{"id": "c", "name": "write", "arguments": '{"text": "\ud800"}'}])
    assert reply.tool_calls[0]["arguments"] == '{"text": "\ufffd"}'


def test_a_key_given_twice_in_a_calls_arguments_is_refused() -> None:
    raw = envelope(None, [{"name": "write", "arguments": '{"args": {"text": "ok"}, "confidence": 0.5, "confidence": 1}'}])
    with pytest.raises(DecisionError, match="the arguments of 'write': the key 'confidence' appears twice"):
        read_decision("tools", raw, [write])


def test_a_script_step_may_be_a_tool_call(tmp_path: Path) -> None:
    from loopterm.core.errors import ConfigError
    from loopterm.core.scripted import load_script

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"turns": [{"tool_calls": [{"name": "write", "arguments": {"confidence": 0.5}}]},
                                          {"content": "x", "tool_calls": [{"name": "write"}]}]}))
    script = load_script(good)
    assert [c.name for c in script.turns[0][0].tool_calls or []] == ["write"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"turns": [{"tool_calls": [{"name": "w"}], "error": {"status": 500}}]}))
    with pytest.raises(ConfigError, match="exactly one of 'content' \\(or 'tool_calls'\\) or 'error'"):
        load_script(bad)
    bad.write_text(json.dumps({"turns": [{"tool_calls": [{"arguments": {}}]}]}))
    with pytest.raises(ConfigError, match="turns.0.tool_calls.0.name: Field required"):
        load_script(bad)
