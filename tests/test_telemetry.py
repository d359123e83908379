"""OpenTelemetry traces, received by a real OTLP/HTTP receiver on 127.0.0.1 (tests/otlp_receiver.py).

The receiver is a separate process that decodes each ExportTraceServiceRequest with
the official opentelemetry-proto definitions and writes the spans as JSON lines;
these tests read that file and compare it with what the store recorded. The runs
are real `loopterm` processes driving a small scripted loop (offline, no key).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopterm.core.spans import provider_name, span_id, trace_id
from loopterm.store import Store
from loopterm.tui.traces import traces_endpoint
from tests.loopkit import escalation_id

RECEIVER = Path(__file__).with_name("otlp_receiver.py")
GOAL = "make flag.txt say ok"
REASONING = "private-reasoning-text"  # in every reply; must never reach an attribute

LOOP_FILE = '''
from pathlib import Path
from loopterm.core import CommandGate, Loop, LoopState, ToolContext, tool
from loopterm.core.invariants import Invariant, Remediation


@tool(side_effects=True, idempotent=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write text to flag.txt in the workspace."""
    (ctx.workspace / "flag.txt").write_text(text)
    return f"wrote {len(text)} characters"


@tool()
def boom(ctx: ToolContext) -> str:
    """Always fails."""
    raise RuntimeError("boom went the tool")


def never_bad(state: LoopState) -> bool:
    return not state.tool_results or state.tool_results[-1].args.get("text") != "bad"


loop = Loop(
    name="traced", goal="make flag.txt say ok", state=LoopState, tools=[write, boom],
    gates=[CommandGate(name="flag", argv=["{python}", "-c",
                                          "import sys; sys.exit(0 if open('flag.txt').read() == 'ok' else 1)"])],
    invariants=[Invariant(name="never_bad", check=never_bad, remediation=Remediation.ESCALATE,
                          description="the flag is never set to bad")],
    script=Path(__file__).parent / "script.json", max_iterations=8, stall_window=None, temperature=0.2,
    max_output_tokens=512,
)
'''


def reply(tool: str, subgoal: str, delay: float = 0.0, **args: Any) -> dict[str, Any]:
    return {"content": {"action": {"tool": tool, "args": args}, "subgoal": subgoal, "confidence": 0.5,
                        "reasoning": REASONING}, "delay": delay}


# 1: the gate fails; 2: the tool fails (slow reply: iteration 1's spans go out meanwhile);
# 3: the invariant breaks and the run escalates; 4 (after a resume): every gate passes.
SCRIPT = {
    "price": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
    "turns": [reply("write", "first draft", text="draft"), reply("boom", "try the other tool", delay=1.5),
              reply("write", "write bad", text="bad"), reply("write", "write ok", text="ok")],
}


# ---------------------------------------------------------------------- the receiver and the CLI


@dataclass
class Receiver:
    url: str
    out: Path
    process: subprocess.Popen[str]

    def spans(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def clear(self) -> None:
        self.out.write_text("")


def start_receiver(tmp_path: Path, name: str, *extra: str) -> Receiver:
    out = tmp_path / f"{name}.jsonl"
    process = subprocess.Popen([sys.executable, str(RECEIVER), "--port", "0", "--out", str(out), *extra],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    return Receiver(f"http://127.0.0.1:{port}", out, process)


def stop(receiver: Receiver) -> None:
    os.kill(receiver.process.pid, signal.SIGTERM)
    receiver.process.wait(timeout=10)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = start_receiver(tmp_path, "received")
    try:
        yield r
    finally:
        stop(r)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "traced.py").write_text(LOOP_FILE)
    (tmp_path / "script.json").write_text(json.dumps(SCRIPT))
    return tmp_path


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "loopterm.tui.cli", *args, "--db", str(cwd / "db.sqlite")]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "160", **extra}


def loopterm(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args, cwd=cwd), cwd=cwd, capture_output=True, text=True, env=environment(**extra),
                          timeout=180)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def latest(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """By span id, the last version received (a resumed run sends its run span again)."""
    return {s["span_id"]: s for s in spans}


def answer_escalation(work: Path, run_id: str) -> None:
    """A person's answer to the run's escalation (go on past it), as `loopterm watch` sends it: a resume
    alone would wait on the unanswered escalation again."""
    with Store.open(work / "db.sqlite", create=False) as store:
        store.add_command(run_id, "resume", {"escalation": escalation_id(store, run_id)})


def escalate_then_converge(work: Path, *otlp: str) -> str:
    first = loopterm("run", "traced.py", "--headless", "--no-wait", *otlp, cwd=work)
    assert first.returncode == 4, first.stdout + first.stderr  # waiting on a person at iteration 3
    run_id = Store.open(work / "db.sqlite", create=False).list_runs()[-1].id
    answer_escalation(work, run_id)
    second = loopterm("resume", run_id, *otlp, cwd=work)
    assert second.returncode == 0, second.stdout + second.stderr
    return run_id


# ---------------------------------------------------------------------- the checks of a received trace


def check_trace(spans: dict[str, dict[str, Any]], store: Store, run_id: str) -> None:
    """The received spans are the run's trace: its shape, attributes, events and times match the store."""
    run = store.get_run(run_id)
    records = {r.n: r for r in store.iterations(run_id)}
    trace = f"{trace_id(run_id):032x}"
    assert {s["trace_id"] for s in spans.values()} == {trace}  # one trace, derived from the run id

    roots = [s for s in spans.values() if not s["parent_span_id"]]
    assert [r["name"] for r in roots] == ["run traced"]
    root = roots[0]
    assert root["span_id"] == f"{span_id(run_id, 'run'):016x}"
    a = root["attributes"]
    assert (a["loopterm.run.id"], a["loopterm.loop"], a["loopterm.run.status"]) == (run_id, "traced", "converged")
    assert a["loopterm.run.termination_reason"] == run.termination_reason == "converged"
    assert (a["loopterm.tokens_in"], a["loopterm.tokens_out"]) == (run.tokens_in, run.tokens_out)
    assert a["loopterm.cost_usd"] == pytest.approx(run.cost_usd) and run.cost_usd > 0
    assert a["loopterm.run.iterations"] == 4
    assert root["status"]["code"] == 1  # OK
    assert root["resource"]["service.name"] == "loopterm"
    assert root["scope"] == "loopterm"
    assert {"loopterm.run_created", "loopterm.run_started", "loopterm.run_resumed",
            "loopterm.run_finished"} <= {e["name"] for e in root["events"]}

    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans.values():
        children.setdefault(s["parent_span_id"], []).append(s)
    iterations = sorted(children[root["span_id"]], key=lambda s: s["attributes"]["loopterm.iteration"])
    assert [s["name"] for s in iterations] == ["iteration 1", "iteration 2", "iteration 3", "iteration 4"]
    assert root["start_ns"] <= iterations[0]["start_ns"] and iterations[-1]["end_ns"] <= root["end_ns"]

    for it in iterations:
        n = it["attributes"]["loopterm.iteration"]
        record = records[n]
        assert it["start_ns"] == pytest.approx(record.started_at * 1e9, abs=1_000)  # the recorded times
        assert it["end_ns"] == pytest.approx(record.ended_at * 1e9, abs=1_000)
        assert it["attributes"]["loopterm.decision.tool"] == record.tool_call["tool"]
        assert it["attributes"]["loopterm.decision.subgoal"] == record.decision["subgoal"]
        kids = {s["name"]: s for s in children[it["span_id"]]}
        tool = record.tool_call["tool"]
        assert set(kids) == {"chat scripted/traced", f"execute_tool {tool}", "gate flag"}
        for kid in kids.values():  # children lie inside their iteration
            assert it["start_ns"] <= kid["start_ns"] <= kid["end_ns"] <= it["end_ns"], kid["name"]

        chat = kids["chat scripted/traced"]
        assert chat["kind"] == "SPAN_KIND_CLIENT"
        c = chat["attributes"]
        assert c["gen_ai.operation.name"] == "chat"
        assert c["gen_ai.provider.name"] == "scripted"
        assert c["gen_ai.request.model"] == c["gen_ai.response.model"] == record.model == "scripted/traced"
        assert (c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"]) == (record.tokens_in, record.tokens_out)
        assert c["loopterm.cost_usd"] == pytest.approx(record.cost_usd) and record.cost_usd > 0
        assert (c["gen_ai.request.temperature"], c["gen_ai.request.max_tokens"]) == (0.2, 512)
        assert c["loopterm.repairs"] == 0
        assert chat["end_ns"] - chat["start_ns"] == pytest.approx(record.latency_ms * 1e6, abs=2_000)

        call = kids[f"execute_tool {tool}"]
        t = call["attributes"]
        assert (t["gen_ai.operation.name"], t["gen_ai.tool.name"]) == ("execute_tool", tool)
        assert t["gen_ai.tool.call.id"] == record.tool_call["key"]
        row = store.tool_call(record.tool_call["key"])
        assert row is not None and row.finished_at is not None
        assert call["start_ns"] == pytest.approx(row.started_at * 1e9, abs=1_000)
        assert call["end_ns"] == pytest.approx(row.finished_at * 1e9, abs=1_000)
        assert chat["end_ns"] <= call["start_ns"]  # the model answered, then the tool ran
        if tool == "boom":
            assert t["loopterm.tool.ok"] is False
            assert call["status"] == {"code": 2, "message": "RuntimeError: boom went the tool"}  # ERROR
        else:
            assert t["loopterm.tool.ok"] is True and call["status"]["code"] == 1

        gate = kids["gate flag"]
        g = gate["attributes"]
        result = record.gate_results[0]
        assert g["loopterm.gate.passed"] is result["passed"] is (n == 4)
        assert g["loopterm.gate.exit_code"] == result["exit_code"] == (0 if n == 4 else 1)
        assert g["loopterm.gate.duration_s"] == pytest.approx(result["duration_s"])
        assert gate["end_ns"] - gate["start_ns"] == pytest.approx(result["duration_s"] * 1e9, abs=2_000)
        assert gate["status"]["code"] == (1 if n == 4 else 2)
        assert call["end_ns"] <= gate["start_ns"]

        assert all(it["start_ns"] <= e["time_ns"] <= it["end_ns"] for e in it["events"])
        invariants = [e for e in it["events"] if e["name"] == "loopterm.invariant"]
        assert [(e["attributes"]["loopterm.invariant.name"], e["attributes"]["loopterm.invariant.held"],
                 e["attributes"]["loopterm.invariant.relaxed"]) for e in invariants] == [("never_bad", n != 3, False)]
        names = [e["name"] for e in it["events"]]
        if n == 3:
            assert "loopterm.invariant_violated" in names and "loopterm.escalated" in names
            assert it["attributes"]["loopterm.invariants.violated"] == ["never_bad"]
            assert it["attributes"]["loopterm.remediations"] == ["escalate"]
        else:
            assert "loopterm.escalated" not in names

    # No prompt, reply or goal text in any attribute (only names, numbers, short summaries).
    text = json.dumps([{k: s[k] for k in ("attributes", "events", "links", "status")} for s in spans.values()])
    assert REASONING not in text and GOAL not in text


def same_spans(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert set(a) == set(b)
    for key, span in a.items():
        for part in ("trace_id", "parent_span_id", "name", "kind", "start_ns", "end_ns", "attributes", "status"):
            assert span[part] == b[key][part], (span["name"], part)
        assert [e["name"] for e in span["events"]] == [e["name"] for e in b[key]["events"]], span["name"]


# ---------------------------------------------------------------------- tests


def test_export_of_a_finished_run_is_one_trace_matching_the_store(work: Path, receiver: Receiver) -> None:
    run_id = escalate_then_converge(work)
    assert receiver.spans() == []

    done = loopterm("export", run_id[:6], "--format", "otlp", "--endpoint", receiver.url, cwd=work)

    assert done.returncode == 0, done.stderr
    received = receiver.spans()
    assert done.stdout.strip() == f"sent {len(received)} spans of run {run_id} to {receiver.url}/v1/traces"
    spans = latest(received)
    assert len(spans) == len(received) == 1 + 4 * 4  # the run; 4 iterations, each with model, tool and gate
    check_trace(spans, Store.open(work / "db.sqlite", create=False), run_id)


def test_live_run_and_its_resume_land_in_the_same_trace_as_the_export(work: Path, receiver: Receiver,
                                                                      tmp_path: Path) -> None:
    process = subprocess.Popen(cli("run", "traced.py", "--headless", "--no-wait", "--otlp", receiver.url, cwd=work),
                               cwd=work, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Iteration 1's spans arrive while iteration 2 waits on its slow model reply: sent live, not at exit.
        wait_for(lambda: any(s["name"] == "iteration 1" for s in receiver.spans()), "iteration 1's span")
        assert process.poll() is None
    finally:
        out, err = process.communicate(timeout=120)
    assert process.returncode == 4, out + err
    assert "traces" not in err  # nothing to report: the collector took everything
    first = latest(receiver.spans())
    run_id = Store.open(work / "db.sqlite", create=False).list_runs()[-1].id
    root = first[f"{span_id(run_id, 'run'):016x}"]
    assert root["attributes"]["loopterm.run.status"] == "escalated"
    assert sorted(s["name"] for s in first.values() if s["name"].startswith("iteration")) == [
        "iteration 1", "iteration 2", "iteration 3"]

    answer_escalation(work, run_id)
    resumed = loopterm("resume", run_id, "--otlp", receiver.url, cwd=work)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    live = latest(receiver.spans())
    check_trace(live, Store.open(work / "db.sqlite", create=False), run_id)  # one trace across both processes

    # An export afterwards sends the very same spans (same ids, times, attributes): a backend sees one trace.
    other = start_receiver(tmp_path, "export")
    try:
        done = loopterm("export", run_id, "--format", "otlp", "--endpoint", other.url, cwd=work)
        assert done.returncode == 0, done.stderr
        same_spans(live, latest(other.spans()))
    finally:
        stop(other)


def test_a_fork_is_a_trace_of_its_own_linked_to_its_parent(work: Path, receiver: Receiver) -> None:
    run_id = escalate_then_converge(work)
    fork = loopterm("fork", run_id, "--at", "2", "--relax", "never_bad", "--headless", "--no-wait", "--otlp", receiver.url,
                    cwd=work)
    assert fork.returncode == 4, fork.stdout + fork.stderr  # asks whether to write "bad" again, as the parent did
    store = Store.open(work / "db.sqlite", create=False)
    branch = next(r for r in store.list_runs() if r.parent_run == run_id)
    live = latest(receiver.spans())  # the branch's run span, sent live by `fork --otlp`
    assert [s["name"] for s in live.values()] == ["run traced"]
    assert [(s["trace_id"], s["links"][0]["span_id"]) for s in live.values()] == [
        (f"{trace_id(branch.id):032x}", f"{span_id(run_id, 'iteration', 2):016x}")]
    receiver.clear()
    again = loopterm("resume", branch.id, "--side-effects", "reexecute", "--no-wait", cwd=work)
    assert again.returncode == 4, again.stdout + again.stderr  # iteration 4 would write "ok" again: asks again

    done = loopterm("export", branch.id, "--format", "otlp", "--endpoint", receiver.url, cwd=work)

    assert done.returncode == 0, done.stderr
    assert f"of run {branch.id} and 1 ancestor run(s) to" in done.stdout
    spans = latest(receiver.spans())
    assert {s["trace_id"] for s in spans.values()} == {f"{trace_id(run_id):032x}", f"{trace_id(branch.id):032x}"}
    root = spans[f"{span_id(branch.id, 'run'):016x}"]
    assert root["links"] == [{"trace_id": f"{trace_id(run_id):032x}", "span_id": f"{span_id(run_id, 'iteration', 2):016x}",
                              "attributes": {"loopterm.link": "fork", "loopterm.run.parent": run_id,
                                             "loopterm.run.fork_iteration": 2}}]
    assert root["links"][0]["span_id"] in spans  # the linked span is the parent's iteration 2, sent too
    own = [s for s in spans.values() if s["trace_id"] == f"{trace_id(branch.id):032x}" and s["name"].startswith("iteration")]
    assert [s["attributes"]["loopterm.iteration"] for s in own] == [3]  # only the branch's own iterations
    # Its iteration 3 wrote "bad" as the parent's did, but the branch relaxed the invariant: violated, relaxed.
    events = own[0]["events"]
    assert [e["attributes"] for e in events if e["name"] == "loopterm.invariant"] == [
        {"loopterm.invariant.name": "never_bad", "loopterm.invariant.held": False, "loopterm.invariant.relaxed": True}]
    assert "loopterm.invariant_violated" not in [e["name"] for e in events]
    parent3 = spans[f"{span_id(run_id, 'iteration', 3):016x}"]
    assert [e["attributes"]["loopterm.invariant.relaxed"] for e in parent3["events"] if e["name"] == "loopterm.invariant"] == [False]


def test_unreachable_or_rejecting_collector_fails_the_export_in_one_line(work: Path, tmp_path: Path) -> None:
    run_id = escalate_then_converge(work)
    port = closed_port()

    refused = loopterm("export", run_id, "--format", "otlp", "--endpoint", f"http://127.0.0.1:{port}", cwd=work)

    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"loopterm: could not send 17 span(s) to http://127.0.0.1:{port}/v1/traces: ")
    assert "refused" in refused.stderr.lower()

    rejecting = start_receiver(tmp_path, "rejecting", "--status", "400")
    try:
        rejected = loopterm("export", run_id, "--format", "otlp", "--endpoint", rejecting.url, cwd=work)
    finally:
        stop(rejecting)
    assert rejected.returncode == 1 and rejected.stdout == ""
    assert rejected.stderr == f"loopterm: could not send 17 span(s) to {rejecting.url}/v1/traces: HTTP 400 Bad Request\n"


def test_a_live_run_goes_on_when_the_collector_is_unreachable(work: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    run_id = escalate_then_converge(work, "--otlp", url)  # both processes finish with their usual exit codes
    store = Store.open(work / "db.sqlite", create=False)
    assert store.get_run(run_id).status == "converged" and len(store.iterations(run_id)) == 4


def test_the_unreachable_collector_is_reported_once(work: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    done = loopterm("run", "traced.py", "--headless", "--no-wait", "--otlp", url, cwd=work)
    assert done.returncode == 4, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if "traces" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"loopterm: traces: could not send ") and f"to {url}/v1/traces" in lines[0]
    assert lines[0].endswith("the run goes on without them")


def test_endpoint_from_the_environment_and_bad_endpoints(work: Path, receiver: Receiver) -> None:
    run_id = escalate_then_converge(work)
    done = loopterm("export", run_id, "--format", "otlp", cwd=work, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"to {receiver.url}/v1/traces") and len(receiver.spans()) == 17

    receiver.clear()
    signal_url = f"{receiver.url}/v1/traces"
    done = loopterm("export", run_id, "--format", "otlp", cwd=work, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=signal_url,
                    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")  # the signal's own variable wins
    assert done.returncode == 0, done.stderr
    assert len(receiver.spans()) == 17

    none = loopterm("export", run_id, "--format", "otlp", cwd=work)
    assert none.returncode == 2 and none.stdout == ""
    assert none.stderr == ("loopterm: no OTLP endpoint: pass --endpoint http://HOST:4318 or set "
                           "OTEL_EXPORTER_OTLP_ENDPOINT\n")
    bad = loopterm("run", "traced.py", "--headless", "--otlp", "localhost:4318", cwd=work)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "is not an OTLP/HTTP endpoint; give a URL like http://127.0.0.1:4318" in bad.stderr
    assert len(Store.open(work / "db.sqlite", create=False).list_runs()) == 1  # refused before any run
    mixed = loopterm("export", run_id, "--endpoint", receiver.url, cwd=work)
    assert mixed.returncode == 2 and "--endpoint goes with --format otlp" in mixed.stderr
    cases = loopterm("run", "traced.py", "--cases", "cases.json", "--otlp", receiver.url, cwd=work)
    assert cases.returncode == 2 and cases.stderr.startswith("loopterm: --otlp does not go with --cases")
    assert len(Store.open(work / "db.sqlite", create=False).list_runs()) == 1


def test_help_and_other_commands_do_not_import_opentelemetry(work: Path) -> None:
    code = (
        "import sys\n"
        "from loopterm.tui.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['export', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "main(['runs', '--db', sys.argv[1]])\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(work / "none.sqlite")], capture_output=True, text=True,
                         timeout=120, env=environment())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


def test_provider_names_and_endpoints() -> None:
    assert [provider_name(m) for m in ("openai/gpt-4o-mini", "anthropic/claude-3-5-haiku", "bedrock/x",
                                       "vertex_ai/gemini-pro", "mistral/m", "gpt-4o", "claude-3-opus",
                                       "scripted/demo", "ollama/llama3")] == [
        "openai", "anthropic", "aws.bedrock", "gcp.vertex_ai", "mistral_ai", "openai", "anthropic", "scripted", "ollama"]
    assert traces_endpoint("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_endpoint("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_endpoint("https://otel.example/custom/traces") == "https://otel.example/custom/traces"
    for bad in ("127.0.0.1:4318", "ftp://x", "http://", "http://host:99999"):
        with pytest.raises(ValueError):
            traces_endpoint(bad)
    assert trace_id("abc") == trace_id("abc") != trace_id("abd")
    assert span_id("abc", "iteration", 1) != span_id("abc", "iteration", 2) != span_id("abc", "run")


async def test_a_tui_run_with_otlp_sends_its_trace(tmp_path: Path, receiver: Receiver,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.tui.app import LooptermApp
    from tests.loopkit import decision, make_loop

    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    loop = make_loop(tmp_path, [{"content": decision("write", text="no")}, {"content": decision("write", text="ok")}])
    app = LooptermApp(tmp_path / "db" / "loopterm.db", start=(loop, "test:t"), theme="textual-dark", frozen=True,
                      otlp=f"{receiver.url}/v1/traces")
    async with app.run_test(size=(140, 40)) as pilot:
        deadline = time.monotonic() + 30
        while not any(s["name"] == "run t" and s["attributes"]["loopterm.run.status"] == "converged"
                      for s in receiver.spans()):
            assert time.monotonic() < deadline, "the TUI run's trace never arrived"
            await pilot.pause(0.05)
    run_id = app.store.list_runs()[-1].id
    spans = latest(receiver.spans())
    assert {s["trace_id"] for s in spans.values()} == {f"{trace_id(run_id):032x}"}
    names = sorted(s["name"] for s in spans.values())
    assert names == sorted(["run t", "iteration 1", "iteration 2", "chat scripted/t", "chat scripted/t",
                            "execute_tool write", "execute_tool write", "gate flag", "gate flag"])
    records = {r.n: r for r in app.store.iterations(run_id)}
    chats = {s["parent_span_id"]: s for s in spans.values() if s["name"] == "chat scripted/t"}
    for n, record in records.items():
        chat = chats[f"{span_id(run_id, 'iteration', n):016x}"]
        assert chat["attributes"]["gen_ai.usage.input_tokens"] == record.tokens_in


def test_a_model_checker_gate_is_a_genai_call_too(tmp_path: Path, receiver: Receiver) -> None:
    from loopterm import examples

    loop_file = Path(examples.__file__).parent / "topologies" / "maker_checker.py"
    done = loopterm("run", str(loop_file), "--headless", "--otlp", receiver.url, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store.open(tmp_path / "db.sqlite", create=False)
    run_id = store.list_runs()[-1].id
    gates = {s["parent_span_id"]: s for s in latest(receiver.spans()).values() if s["name"] == "gate checker"}
    records = store.iterations(run_id)
    assert len(gates) == len(records) == 2  # the checker failed the first draft, passed the second
    for record in records:
        gate = gates[f"{span_id(run_id, 'iteration', record.n):016x}"]
        result = record.gate_results[-1]
        a = gate["attributes"]
        assert result["model"] == "scripted/release-note.checker"
        assert (a["gen_ai.operation.name"], a["gen_ai.request.model"], a["gen_ai.provider.name"]) == (
            "chat", result["model"], "scripted")
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (result["tokens_in"], result["tokens_out"])
        assert a["loopterm.cost_usd"] == pytest.approx(result["cost_usd"]) and result["cost_usd"] > 0
        assert a["loopterm.gate.passed"] is result["passed"]
        assert gate["status"]["code"] == (1 if result["passed"] else 2)
        assert result["duration_s"] > 0  # the checker's call takes time: its span is not a point
        assert gate["end_ns"] - gate["start_ns"] == pytest.approx(result["duration_s"] * 1e9, abs=2_000)
    assert [r.gate_results[-1]["passed"] for r in records] == [False, True]


async def test_a_tui_run_says_once_that_the_collector_is_unreachable_and_converges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopterm.tui.app import LooptermApp
    from tests.loopkit import decision, make_loop

    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    loop = make_loop(tmp_path, [{"content": decision("write", text=text)} for text in ("no", "ok")])
    url = f"http://127.0.0.1:{closed_port()}/v1/traces"
    app = LooptermApp(tmp_path / "db" / "loopterm.db", start=(loop, "test:t"), theme="textual-dark", frozen=True,
                      otlp=url)
    notices: list[str] = []
    shown = app.notify

    def spy(message: str, **kwargs: Any) -> None:  # records what the person is told, then tells them
        notices.append(message)
        shown(message, **kwargs)

    app.notify = spy  # type: ignore[method-assign]
    async with app.run_test(size=(140, 40)) as pilot:
        deadline = time.monotonic() + 30
        while not (any("traces:" in n for n in notices) and app.store.list_runs()
                   and app.store.list_runs()[-1].status == "converged"):
            assert time.monotonic() < deadline, f"no converged run and notice: {notices}"
            await pilot.pause(0.05)
        await pilot.pause(0.5)
    told = [n for n in notices if "traces:" in n]
    assert len(told) == 1 and told[0].startswith(f"traces: could not send ") and f"to {url}: " in told[0]
    assert len(app.store.iterations(app.store.list_runs()[-1].id)) == 2


def test_message_content_only_on_the_genai_switch_and_redacted_again(work: Path, receiver: Receiver) -> None:
    run_id = escalate_then_converge(work)
    # A secret the recording process did not know (its variable is set only for the export): still redacted.
    done = loopterm("export", run_id, "--format", "otlp", "--endpoint", receiver.url, cwd=work,
                    OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true", LOOPTERM_TEST_TOKEN=REASONING)
    assert done.returncode == 0, done.stderr
    spans = latest(receiver.spans())
    store = Store.open(work / "db.sqlite", create=False)
    records = {r.n: r for r in store.iterations(run_id)}
    assert REASONING in records[1].raw_response  # it was stored as written
    for it in (s for s in spans.values() if s["name"].startswith("iteration ")):
        n = it["attributes"]["loopterm.iteration"]
        kids = {s["name"].split(" ")[0]: s["attributes"] for s in spans.values() if s["parent_span_id"] == it["span_id"]}
        sent = json.loads(kids["chat"]["gen_ai.input.messages"])
        assert [m["role"] for m in sent] == [m["role"] for m in records[n].prompt]
        assert GOAL in sent[0]["parts"][0]["content"] or GOAL in sent[1]["parts"][0]["content"]
        answered = json.loads(kids["chat"]["gen_ai.output.messages"])
        assert answered[0]["role"] == "assistant"
        assert "[redacted:LOOPTERM_TEST_TOKEN]" in answered[0]["parts"][0]["content"]
        assert json.loads(kids["execute_tool"]["gen_ai.tool.call.arguments"]) == records[n].tool_call["args"]
        result = records[n].tool_result
        assert kids["execute_tool"]["gen_ai.tool.call.result"] == (result["output"] if result["ok"] else result["error"])
    assert REASONING not in json.dumps([s["attributes"] for s in spans.values()])
