"""Fuzzing (issue 6, item 5): hostile input never reaches a person as a traceback, never corrupts the store.

Targets, each driven by hypothesis (strategies in tests/fuzz_strategies.py):

- model replies: `parse_decision`, and real engine iterations (the repair path included) with a
  model whose replies are the fuzzed text: an in-process client for most examples, the
  `scripted/` provider through litellm for some;
- state edits: the engine's `_apply` of control-channel commands (what `loopterm watch` and the TUI
  send), and the TUI state editor itself (its validation, then the command it sends);
- `--set PATH=JSON` patches: `plan_fork`, then the branch it creates, loaded and run;
- loop definition files: `load_loop` on generated Python files;
- command lines: `loopterm.tui.cli.main` in-process with generated argv, and a sample in subprocesses;
- rendering: `render.literal` and the detail/timeline/header renderers, and headless progress.

After every run or edit the store is checked: `PRAGMA integrity_check`, each run's iterations are
1..n, every state loads (and validates against the loop's state model), the event log is ordered.

Examples: the "ci" profile (default: derandomized, deterministic) runs about 1,000 in all; set
LOOPTERM_FUZZ=slow for the "slow" profile (about 11,000, randomized; a failure prints the blob to
reproduce it). Each run prints a per-target count of the examples it executed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from rich.console import Console

from loopterm.core import Invariant, Loop, LoopState, Remediation, ToolContext, tool
from loopterm.core.control import command_payload, parse_command
from loopterm.core.decision import Decision, DecisionError, parse_decision
from loopterm.core.engine import Engine
from loopterm.core.errors import ConfigError
from loopterm.core.fork import create_fork, plan_fork
from loopterm.core.migrations import migrate_state
from loopterm.core.model import ModelReply
from loopterm.core.records import IterationRecord, RunRecord
from loopterm.core.termination import Status
from loopterm.core import runlog
from loopterm.store import Store
from tests import fuzz_strategies as fs
from tests.loopkit import kinds, of

# ----------------------------------------------------------------------------- profiles

PROFILE = os.environ.get("LOOPTERM_FUZZ", "ci").strip().lower() or "ci"
if PROFILE not in ("ci", "slow"):
    raise RuntimeError(f"LOOPTERM_FUZZ={PROFILE!r}: use 'ci' (the default) or 'slow'")
_QUIET = list(HealthCheck)  # hostile inputs are large and slow to generate on purpose
settings.register_profile("loopterm-fuzz-ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("loopterm-fuzz-slow", max_examples=1_000, deadline=None, derandomize=False, database=None,
                          print_blob=True, suppress_health_check=_QUIET)
_BASE = settings.get_profile(f"loopterm-fuzz-{PROFILE}")


def budget(ci: int, slow: int) -> settings:
    """This target's share of the profile's examples (the shares add up to >= 1,000 / >= 10,000)."""
    return settings(_BASE, max_examples=slow if PROFILE == "slow" else ci)


EXAMPLES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()  # how the examples ended (accepted / refused ...), to see what was covered


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not EXAMPLES:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        parts = ", ".join(f"{name} {count}" for name, count in sorted(EXAMPLES.items()))
        reporter.write_line(f"\nfuzz ({PROFILE}): {sum(EXAMPLES.values())} examples in "
                            f"{time.monotonic() - started:.1f}s: {parts}")
        reporter.write_line("outcomes: " + ", ".join(f"{name} {count}" for name, count in sorted(OUTCOMES.items())))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "LOOPTERM_DB", "LOOPTERM_DEBUG"):
        monkeypatch.delenv(key, raising=False)


# ----------------------------------------------------------------------------- the loop under test

LOOP_FILE = '''
"""The loop the fuzz tests drive (a file, so resume and fork can load it again)."""
from pathlib import Path

from loopterm.core import Invariant, Loop, LoopState, Remediation, ToolContext, tool


@tool(side_effects=True, idempotent=True)
def write(ctx: ToolContext, text: str) -> str:
    """Write text to flag.txt in the workspace."""
    with (ctx.workspace / "calls.log").open("a") as log:  # every time the side effect fires: counted by the tests
        log.write(ctx.idempotency_key + "\\n")
    (ctx.workspace / "flag.txt").write_text(text, encoding="utf-8", errors="replace")
    return f"wrote {len(text)} characters"


@tool
def note(data: dict, x: float = 0.0) -> str:
    """Take a note."""
    return f"noted {len(data)} keys"


SHORT = Invariant(name="short_subgoal", check=lambda s: len(s.memory.subgoal) < 20_000,
                  remediation=Remediation.ESCALATE, description="a subgoal is a sentence")
loop = Loop(name="fz", goal="make flag.txt say ok", script=Path(__file__).with_name("fz-script.json"),
            tools=[write, note], invariants=[SHORT], max_iterations=2, stall_window=None,
            converged=lambda state, gates: False)
'''
HOSTILE_SUBGOAL = "\x1b[31m[bold]red[/bold]\x07 \u202e"
BASE_TURNS = [
    {"action": {"tool": "write", "args": {"text": "ok \x1b[2J"}}, "subgoal": HOSTILE_SUBGOAL, "confidence": 0.5,
     "reasoning": "[link=file:///etc/passwd]x[/link]\r\x00", "done": False},
    {"action": {"tool": "note", "args": {"data": {"k": [1, {"a": None}]}, "x": 0.25}}, "subgoal": "note it",
     "confidence": 0.75, "reasoning": "why", "done": False},
]


def write_loop_file(directory: Path, turns: list[Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fz-script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
        "turns": [{"content": t} for t in turns or BASE_TURNS], "after_end": "repeat_last"}))
    path = directory / "fz_loop.py"
    path.write_text(LOOP_FILE)
    return path


def loaded_loop(directory: Path) -> tuple[Loop, str]:
    from loopterm.core.loader import load_loop

    return load_loop(str(write_loop_file(directory)))


class Client:
    """An in-process model: answers each call with the next of `replies` (the last one repeats)."""

    temperature = 0.0

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies or [""]
        self.calls: list[list[dict[str, Any]]] = []

    def estimate(self, messages: list[Any], max_output_tokens: int) -> tuple[int, float]:
        return 100 + max_output_tokens, 0.0

    async def complete(self, messages: list[dict[str, Any]], *, iteration: int, call_index: int = 0) -> ModelReply:
        self.calls.append(messages)
        text = self.replies[min(len(self.calls), len(self.replies)) - 1]
        return ModelReply(text=text, tokens_in=10, tokens_out=len(text) // 4, cost_usd=1e-6, latency_ms=0.1,
                          model="fuzz/instant", calls=1)


VALID_REPLY = json.dumps(BASE_TURNS[1])


def drive(engine: Engine, timeout: float = 60.0) -> RunRecord:
    """Run the engine to its end; a run that hangs fails the test instead of blocking it."""
    return asyncio.run(asyncio.wait_for(engine.run(), timeout))
FINISHED = {s.value for s in Status if s.finished} | {Status.ESCALATED.value}  # ended: by itself or waiting
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(message: str | None, limit: int = 2_000) -> None:
    """The one-line contract for what a person reads: no line break, no control character, bounded."""
    assert message is not None
    assert "\n" not in message and "\r" not in message, message[:500]
    assert not _CONTROL.search(message), message[:500]
    assert len(message) <= limit, f"{len(message)} characters: {message[:300]}..."
    message.encode("utf-8")  # no unpaired surrogate


# ----------------------------------------------------------------------------- the store checks


def check_store(path: Path, loop: Loop | None = None, run_ids: list[str] | None = None) -> None:
    """Never a corrupted store: integrity, iterations 1..n, states load, events in order."""
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        con.close()
    store = Store.open(path, create=False)
    try:
        runs = [store.get_run(r) for r in run_ids] if run_ids is not None else store.list_runs()
        for run in runs:
            records = store.iterations(run.id)
            assert [r.n for r in records] == list(range(1, run.iterations + 1)), (run.id, run.iterations)
            for record in records[-3:]:  # the newest states: what a resume, a fork or the TUI loads next
                again = store.get_iteration(run.id, record.n)
                assert again is not None and again.state == record.state
                assert store.state_at(run.id, record.n) == record.state
                json.dumps(record.state, allow_nan=False)  # JSON a person (or jq) can read: no NaN
                if loop is not None:
                    loop.state.model_validate(migrate_state(loop, record.state))
            _side_effects_once(run, records)
            events = store.events(run.id)
            ids = [e.id or 0 for e in events]
            assert ids == sorted(set(ids)), "event ids out of order"
            stamps = [e.ts for e in events]
            assert all(a <= b + 1e-3 for a, b in zip(stamps, stamps[1:])), "event times out of order"
            if run.origin == "run":
                assert events and isinstance(events[0].event, runlog.RunCreated), kinds(events[:3])
            lifecycle = [k for k in kinds(events) if k in ("run_started", "run_resumed", "run_finished")]
            if Status(run.status).finished and lifecycle:  # a finished run's last start has its end after it
                assert lifecycle[-1] == "run_finished", lifecycle[-3:]
            assert run.status in FINISHED or run.status == Status.CREATED.value, run.status
    finally:
        store.close()


def _side_effects_once(run: RunRecord, records: list[IterationRecord]) -> None:
    """The side-effecting tool (`write`) fired exactly once for each call a committed iteration records."""
    log = Path(run.workspace) / "calls.log"
    fired = log.read_text().split() if log.exists() else []
    OUTCOMES["side effects fired"] += len(fired)
    assert len(fired) == len(set(fired)), "a side effect fired twice"
    committed = [r.tool_call["key"] for r in records if r.run_id == run.id and r.tool_call
                 and r.tool_call.get("tool") == "write" and (r.tool_result or {}).get("ok")
                 and not (r.tool_result or {}).get("reused")]
    assert sorted(fired) == sorted(committed), (fired, committed)


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="loopterm-fuzz-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Bench:
    """A store and the loop, shared by a target's examples (each example is a new run)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.loop, self.ref = loaded_loop(directory / "loop")
        self.db = directory / "db" / "loopterm.db"
        self.store = Store.open(self.db)
        self.runs = 0

    def engine(self, replies: list[str], **kwargs: Any) -> tuple[Engine, Client]:
        client = Client(replies)
        engine = Engine.create(self.loop, self.store, loop_ref=self.ref, workspace_root=self.dir / "ws",
                               workdir=self.dir, client=client, **kwargs)
        self.runs += 1
        return engine, client

    def fresh(self) -> None:
        """A new database now and then, so integrity checks stay quick."""
        if self.runs >= 150:
            self.store.close()
            self.db.unlink()
            for extra in ("-wal", "-shm"):
                Path(f"{self.db}{extra}").unlink(missing_ok=True)
            shutil.rmtree(self.dir / "ws", ignore_errors=True)
            self.store = Store.open(self.db)
            self.runs = 0


@pytest.fixture(scope="module")
def bench(fuzz_dir: Path) -> Iterator[Bench]:
    b = Bench(fuzz_dir / "bench")
    yield b
    b.store.close()


# ============================================================================= 1. model replies


REPAIR_PROMPT = "Your reply was not a valid decision:"


@budget(ci=300, slow=3_000)
@given(reply=fs.model_reply(), tools=st.sampled_from([None, {"write", "note"}, set()]))
@example(reply='{"confidence": ' + "1" * 5_000 + "}", tools=None)  # beyond Python's int-string limit
@example(reply='{"action": null, "confidence": NaN}', tools=None)
@example(reply=json.dumps({"action": {"tool": "note", "args": {"data": {}, "x": float("inf")}}, "confidence": 0.5}),
         tools={"write", "note"})
@example(reply=json.dumps({"action": {"tool": "x" * 100_000, "args": {}}, "confidence": 0.5}), tools={"write"})
@example(reply='{"action": null, "confidence": 0.5, "subgoal": "\\ud800"}', tools=None)
@example(reply='{"action": {"tool": "note", "args": {"data": ' + "[" * 300 + "]" * 300 + '}}, "confidence": 0.5}',
         tools={"note"})
def test_parse_decision_returns_a_decision_or_explains(reply: str, tools: set[str] | None) -> None:
    """Any reply: a valid Decision, or DecisionError with one bounded line; nothing else ever escapes."""
    EXAMPLES["parse_decision"] += 1
    try:
        decision = parse_decision(reply, tools)
    except DecisionError as exc:
        one_line(str(exc), limit=1_000)
        OUTCOMES["reply refused"] += 1
        return
    OUTCOMES["reply parsed"] += 1
    assert isinstance(decision, Decision)
    assert 0.0 <= decision.confidence <= 1.0
    if decision.action is not None and tools is not None:
        assert decision.action.tool in tools
    dumped = decision.model_dump(mode="json")
    text = json.dumps(dumped, allow_nan=False, ensure_ascii=False)  # storable and readable as it is
    text.encode("utf-8")
    assert Decision.model_validate(json.loads(text)) == decision, "the stored decision would differ from the reply's"


def _check_run(bench: Bench, engine: Engine, client: Client, final: RunRecord) -> None:
    """What must hold after any run, whatever its model replied."""
    assert final.status in FINISHED, final
    OUTCOMES[f"run {final.status} after {final.iterations} iteration(s)"] += 1
    if final.message:
        one_line(final.message)
    store = bench.store
    events = store.events(final.id)
    invalid = of(events, runlog.InvalidReply)
    calls_after_invalid = 0
    for i, messages in enumerate(client.calls):
        repairing = messages[-1]["role"] == "user" and messages[-1]["content"].startswith(REPAIR_PROMPT)
        calls_after_invalid += repairing
        if repairing:  # the model is shown its reply and what was wrong with it
            assert messages[-2]["role"] == "assistant"
    assert calls_after_invalid <= len(invalid)
    for event in invalid:
        one_line(event.error, limit=1_000)
    for record in store.iterations(final.id):
        decision = Decision.model_validate(record.decision)
        assert record.repairs <= bench.loop.max_repairs
        if decision.action is not None:
            assert decision.action.tool in {"write", "note"}
            assert record.tool_call is not None and record.tool_call["tool"] == decision.action.tool
    check_store(bench.db, bench.loop, [final.id])


@budget(ci=120, slow=1_500)
@given(replies=st.lists(fs.model_reply(), min_size=1, max_size=4), valid_after=st.booleans())
@example(replies=['{"action": null, "confidence": 0.5, "subgoal": "\\ud800"}'], valid_after=False)
@example(replies=["not json \ud800 at all"], valid_after=False)  # a provider's reply with an unpaired surrogate
@example(replies=['{"action": {"tool": "note", "args": {"data": {}, "x": NaN}}, "confidence": 0.5}'],
         valid_after=False)
@example(replies=['{"action": {"tool": "note", "args": {"data": {"a": ' + "[" * 300 + "]" * 300 + '}}},'
                  ' "confidence": 0.5}'], valid_after=True)
@example(replies=['{"confidence": ' + "1" * 5_000 + "}"], valid_after=True)
@example(replies=['{"action": {"tool": "write", "args": {"\\u001f": null}}, "confidence": 0.0}'], valid_after=False)
def test_engine_survives_any_model_reply(bench: Bench, replies: list[str], valid_after: bool) -> None:
    """Real iterations (repairs included) with the fuzzed replies: the run ends with a status and one
    line, every committed iteration holds a valid decision, the store is whole."""
    EXAMPLES["engine (in-process model)"] += 1
    bench.fresh()
    engine, client = bench.engine([*replies, VALID_REPLY] if valid_after else replies)
    final = drive(engine)
    _check_run(bench, engine, client, final)


@pytest.fixture(scope="module")
def litellm_bench(fuzz_dir: Path) -> Iterator[Bench]:
    b = Bench(fuzz_dir / "litellm")
    yield b
    b.store.close()


@budget(ci=20, slow=200)
@given(turns=st.lists(st.lists(fs.model_reply(), min_size=1, max_size=3), min_size=1, max_size=2))
@example(turns=[['{"action": null, "confidence": 0.5, "subgoal": "\\ud800"}', "\ud800"]])
def test_engine_survives_any_reply_through_litellm(litellm_bench: Bench, turns: list[list[str]]) -> None:
    """The same, with the replies coming back through litellm (the `scripted/` provider): token
    counting, cost and error mapping see the hostile text too."""
    from loopterm.core.model import check_model

    EXAMPLES["engine (through litellm)"] += 1
    b = litellm_bench
    b.fresh()
    script = b.dir / "litellm-script.json"
    script.write_text(json.dumps({"turns": [[{"content": t} for t in turn] for turn in turns],
                                  "after_end": "repeat_last"}))
    loop = b.loop.model_copy(update={"script": script, "name": "fzlite", "model": "scripted/fzlite"})
    check_model(loop.model, loop.script)
    engine = Engine.create(loop, b.store, loop_ref=b.ref, model=loop.model, workspace_root=b.dir / "ws",
                           workdir=b.dir)
    b.runs += 1
    final = drive(engine)
    assert final.status in FINISHED, final
    if final.message:
        one_line(final.message)
    check_store(b.db, b.loop, [final.id])


# ============================================================================= 2. state edits


# The state after one iteration of the fuzz loop (what an edit starts from).
BASE_STATE: dict[str, Any] = LoopState(
    iteration=1, task="make flag.txt say ok",
    memory={"facts": ["iteration 1: note ok"], "subgoal": "note it"},
    tool_results=[{"iteration": 1, "tool": "note", "args": {"data": {"k": 1}, "x": 0.25}, "output": "noted 1 keys"}],
    invariant_status={"short_subgoal": True},
).model_dump(mode="json")


@st.composite
def hostile_command(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(["edit_state"] * 6 + ["add_fact", "set_subgoal", "relax", "restore", "stop",
                                                        "approve", "deny", "frobnicate", "pause", "resume"]))
    if kind == "edit_state":
        # the state after iteration 1 (the run has made one when these are sent); now and then a stale or hostile base
        payload: dict[str, Any] = {"state": draw(fs.state_edit(BASE_STATE)), "reason": draw(fs.nasty_text()),
                                   "base_iteration": 1}
        if draw(st.integers(0, 6)) == 0:
            payload["state"] = draw(fs.hostile_values)
        if draw(st.integers(0, 6)) == 0:
            payload["base_iteration"] = draw(st.one_of(st.integers(-3, 10**20), fs.hostile_values))
    else:
        field = {"add_fact": "fact", "set_subgoal": "subgoal", "relax": "invariant", "restore": "invariant",
                 "stop": "reason", "approve": "key", "deny": "key"}.get(kind, "x")
        payload = {field: draw(st.one_of(fs.nasty_text(), fs.hostile_values)), "reason": draw(fs.nasty_text())}
        if kind == "relax":
            payload["iterations"] = draw(st.one_of(st.integers(-3, 10**20), st.floats(), fs.nasty_text()))
        if kind == "approve":
            payload["args"] = draw(st.one_of(st.none(), fs.hostile_values))
    return kind, payload


def _edit(**changes: Any) -> tuple[str, dict[str, Any]]:
    state = json.loads(json.dumps(BASE_STATE))
    state.update(changes)
    return "edit_state", {"state": state, "reason": "regression", "base_iteration": 1}


@budget(ci=80, slow=1_000)
@given(commands=st.lists(hostile_command(), min_size=1, max_size=4))
@example(commands=[_edit(task="\ud800")])  # an unpaired surrogate: not storable as UTF-8
@example(commands=[_edit(schema_version=99)])  # a state no loop definition could load again
@example(commands=[_edit(invariant_status={"short_subgoal": float("nan")})])
@example(commands=[_edit(tool_results=[{"iteration": 1, "tool": "note", "args": {"d": fs.deep_value(300)}}])])
@example(commands=[("add_fact", {"fact": "\udfff"}), ("set_subgoal", {"subgoal": "x" * 100_000})])
@example(commands=[("relax", {"invariant": "\x1f" * 1_000, "reason": "0", "iterations": 1})])
@example(commands=[_edit(**{"\x1f": None})])  # an extra field whose name is a control character
def test_state_edits_through_the_control_channel(bench: Bench, commands: list[tuple[str, dict[str, Any]]]) -> None:
    """Commands as `loopterm watch` or the TUI send them (through the store), hostile payloads included:
    the engine applies a valid one and records the result, refuses the rest with one line, and every
    state it commits loads again."""
    EXAMPLES["state edits (engine _apply)"] += 1
    bench.fresh()
    engine, client = bench.engine([VALID_REPLY], max_iterations=1)
    drive(engine)
    for kind, payload in [*commands, ("resume", {})]:  # a pause or a step in the batch must not park the run
        try:
            command = parse_command(kind, payload)  # what a sender (the TUI, `watch`) builds first
        except ValidationError:
            with contextlib.suppress(UnicodeEncodeError, ValueError, RecursionError):
                bench.store.add_command(engine.run_id, kind, payload)  # a malformed row, written anyway
        else:
            bench.store.add_command(engine.run_id, *command_payload(command))  # a valid command always stores
    run = bench.store.get_run(engine.run_id)
    bench.store.update_run(run.id, max_iterations=2)
    resumed = Engine(bench.loop, bench.store, bench.store.get_run(run.id), client=Client([VALID_REPLY]))
    final = drive(resumed)
    assert final.status in FINISHED, final
    events = bench.store.events(run.id)
    for event in (e.event for e in events):
        if isinstance(event, (runlog.StateEdited, runlog.FactAdded, runlog.SubgoalSet)):
            assert event.patched_state is not None
            state = bench.loop.state.model_validate(migrate_state(bench.loop, event.patched_state))
            assert state.iteration == 1
        if isinstance(event, runlog.CommandRejected):
            one_line(event.error)
    assert bench.store.pending_commands(run.id) == []
    check_store(bench.db, bench.loop, [run.id])


async def test_state_editor_in_the_tui(fuzz_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TUI's state editor with fuzzed JSON text: an invalid edit shows one error line and sends
    nothing; a valid one is sent, and the engine then applies it (or refuses it) without breaking."""
    from textual.widgets import Input, TextArea

    from loopterm.tui.app import LooptermApp
    from loopterm.tui.screens.edit_state import EditStateScreen

    directory = fuzz_dir / "tui"
    loop, ref = loaded_loop(directory / "loop")
    db = directory / "db" / "loopterm.db"
    store = Store.open(db)
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=directory / "ws", workdir=directory,
                           client=Client([VALID_REPLY]), max_iterations=1)
    await engine.run()
    run_id = engine.run_id
    base = store.get_iteration(run_id, 1).state  # type: ignore[union-attr]
    store.close()

    app = LooptermApp(db, theme="textual-dark", frozen=True, loops={ref: loop})
    async with app.run_test(size=(140, 40)) as pilot:
        deadline = time.monotonic() + 20
        while (app.view is None or app.view.loading) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.press("e")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EditStateScreen)
        sent: list[Any] = []
        monkeypatch.setattr(screen, "dismiss", lambda result=None: sent.append(result))
        area = screen.query_one("#state-json", TextArea)
        reason = screen.query_one("#reason", Input)

        edits = fs.state_edit(base).map(fs.edit_json)

        @budget(ci=60, slow=600)
        @given(text=st.sampled_from(["edit"] * 4 + ["json", "text"]).flatmap(
                   lambda kind: edits if kind == "edit" else fs.json_text() if kind == "json" else fs.any_text(20_000)),
               why=st.sampled_from(["because", "because", "nasty"]).flatmap(
                   lambda kind: st.just(kind) if kind == "because" else fs.nasty_text()))
        @example(text='{"a": ' + "1" * 5_000 + "}", why="digits")
        @example(text="[" * 100_000, why="deep")
        @example(text='{"\\u001f": null}', why="a field named by a control character")
        @example(text=json.dumps({**base, "task": "\ud800"}, ensure_ascii=False), why="surrogate")
        @example(text=json.dumps({**base, "task": "\ud800"}), why="escaped surrogate")
        @example(text=json.dumps({**base, "memory": {**base["memory"], "token_count": float("nan")}}), why="nan")
        def edit(text: str, why: str) -> None:
            EXAMPLES["state edits (TUI editor)"] += 1
            sent.clear()
            screen.clear_error()
            area.text = text
            reason.value = why
            screen.submit("submit")
            OUTCOMES["TUI edit sent" if sent else "TUI edit refused"] += 1
            if sent:
                command = sent[0]
                assert command is not None and screen.error_text == ""
                app._sent(run_id, command)  # what the screen's callback does: through the store
            else:
                one_line(screen.error_text)
                assert "nothing was sent" in screen.error_text

        before = len(Store.open(db).pending_commands(run_id))
        edit()
        await pilot.pause()
    check_store(db, loop, [run_id])
    store = Store.open(db)
    queued = len(store.pending_commands(run_id))
    assert queued >= before
    run = store.get_run(run_id)
    store.update_run(run_id, max_iterations=2)
    resumed = Engine(loop, store, store.get_run(run_id), client=Client([VALID_REPLY]))
    final = await resumed.run()
    assert final.status in FINISHED and run.status in FINISHED
    assert store.pending_commands(run_id) == []
    store.close()
    check_store(db, loop, [run_id])


# ============================================================================= 3. --set patches


@pytest.fixture(scope="module")
def fork_bench(fuzz_dir: Path) -> Iterator[tuple[Bench, RunRecord]]:
    b = Bench(fuzz_dir / "fork")
    engine, _ = b.engine([json.dumps(BASE_TURNS[0]), VALID_REPLY], max_iterations=2)
    parent = drive(engine)
    assert parent.iterations == 2
    yield b, parent
    b.store.close()


@budget(ci=150, slow=1_500)
@given(sets=st.lists(fs.set_expr(), min_size=1, max_size=3), at=st.sampled_from([1, 2, 2, 0, 3]),
       go=st.integers(0, 3))
@example(sets=["memory.facts.\u00b2=\"x\""], at=2, go=0)  # a digit to str.isdigit, not to int()
@example(sets=["memory.token_count=" + "9" * 5_000], at=2, go=0)
@example(sets=["memory.subgoal=" + "[" * 100_000], at=2, go=0)
@example(sets=['task="\\ud800"'], at=2, go=0)
@example(sets=["invariant_status.x=NaN"], at=2, go=0)
@example(sets=["iteration=99"], at=1, go=1)
@example(sets=["schema_version=99"], at=1, go=0)
@example(sets=["tool_results.0.args.deep=" + json.dumps(fs.deep_value(300))], at=2, go=0)
@example(sets=['tool_results.0.args={"": -9223372036854775809}'], at=1, go=0)  # orjson reads it back as a float
def test_set_patches_make_a_valid_branch_or_one_line(fork_bench: tuple[Bench, RunRecord], sets: list[str], at: int,
                                                     go: int) -> None:
    """`--set PATH=JSON`: plan_fork accepts a patch whose state is valid or refuses with one line
    (ConfigError) and creates nothing; an accepted branch is created, loads, and runs."""
    EXAMPLES["--set patches (plan_fork)"] += 1
    b, parent = fork_bench
    runs_before = len(b.store.list_runs())
    try:
        plan = plan_fork(b.store, b.loop, parent, at, sets=sets, reason="fuzz")
    except ConfigError as exc:
        one_line(str(exc), limit=1_000)
        assert len(b.store.list_runs()) == runs_before  # nothing was created
        OUTCOMES["--set refused"] += 1
        return
    OUTCOMES["--set branch created"] += 1
    assert 1 <= at <= parent.iterations
    state = b.loop.state.model_validate(plan.state)
    assert state.iteration == at, "a branch starts from the state of iteration --at"
    json.dumps(plan.state, allow_nan=False, ensure_ascii=False).encode("utf-8")
    run_id = f"fz{EXAMPLES['--set patches (plan_fork)']:010d}"
    branch = create_fork(b.store, b.loop, plan, run_id=run_id, workspace=b.dir / "ws" / run_id)
    engine = Engine(b.loop, b.store, branch, client=Client([VALID_REPLY]))  # loads the patched state
    assert engine.state.model_dump(mode="json") == plan.state
    if go == 0:  # and runs from it (not every time: most of the cost is here)
        b.store.update_run(branch.id, max_iterations=at + 1)
        engine.max_iterations = at + 1
        final = drive(engine)
        assert final.status in FINISHED and final.iterations == at + 1
    check_store(b.db, b.loop, [branch.id])


# ============================================================================= 4. loop definition files


@budget(ci=100, slow=1_000)
@given(file=fs.loop_file(), where=st.sampled_from(["file", "loops dir"]))
@example(file=(b"from loopterm.core import Loop\nclass Odd(BaseException):\n    pass\nraise Odd('x')\n", None),
         where="file")
@example(file=(b"import asyncio\nraise asyncio.CancelledError()\n", None), where="file")
@example(file=(b"raise ValueError('\\x1b[31mred\\nsecond line')\n", None), where="file")
def test_loop_files_load_or_explain(fuzz_dir: Path, file: tuple[bytes, str | None], where: str) -> None:
    """A loop file: a Loop, or one ConfigError line; import never leaks its sys.path entry or module."""
    from loopterm.core.loader import list_loops, load_loop

    EXAMPLES["loop files (load_loop)"] += 1
    source, name = file
    directory = Path(tempfile.mkdtemp(dir=fuzz_dir))
    path = directory / "fuzzed_loop.py"
    path.write_bytes(source)
    path_before = list(sys.path)
    modules_before = {m for m in sys.modules if m.startswith("_loopterm_loopfile_")}
    try:
        if where == "file":
            ref = str(path) if name is None else f"{path}:{name}"
            try:
                loop, canonical = load_loop(ref)
            except ConfigError as exc:
                one_line(str(exc), limit=1_000)
                OUTCOMES["loop file refused"] += 1
            else:
                assert isinstance(loop, Loop) and canonical.startswith(str(path))
                OUTCOMES["loop file loaded"] += 1
        else:
            infos = list_loops([directory])
            mine = [i for i in infos if i.source != "built-in"]
            assert mine, infos
            for info in mine:
                if info.error is not None:
                    one_line(info.error, limit=1_000)
    finally:
        assert sys.path == path_before
        for module in {m for m in sys.modules if m.startswith("_loopterm_loopfile_")} - modules_before:
            del sys.modules[module]  # a loaded file's module stays for its Loop's sake; the test lets it go
        shutil.rmtree(directory, ignore_errors=True)


# ============================================================================= 5. command lines


@pytest.fixture(scope="module")
def cli_base(fuzz_dir: Path) -> dict[str, Any]:
    """A store with one finished run (hostile text in its replies) and one branch; files to point at."""
    directory = fuzz_dir / "cli"
    loop_path = write_loop_file(directory / "loop")
    (directory / "loops").mkdir(parents=True)
    (directory / "loops" / "broken.py").write_text("from loopterm.core import Loop\nraise ValueError('\\x1b[2J')\n")
    (directory / "loops" / "deep.py").write_text("def f(n):\n    return f(n + 1)\nf(0)\n")
    db = directory / "base.db"
    from loopterm.tui.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", str(loop_path), "--headless", "--db", str(db)]) == 3
        store = Store.open(db)
        run_id = store.list_runs()[0].id
        store.close()
        assert main(["fork", run_id, "--at", "1", "--set", 'memory.subgoal="branch"', "--headless", "--db",
                     str(db)]) == 3
        store = Store.open(db)
        branch = next(r.id for r in store.list_runs() if r.parent_run == run_id)
        store.close()
        export = directory / "export.jsonl"
        assert main(["export", run_id, "-o", str(export), "--db", str(db)]) == 0
    import gc

    gc.collect()  # the commands' stores (closed when collected) hand their write-ahead log back
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # so a copy of the file alone is the whole database
    con.close()
    (directory / "junk.jsonl").write_text('{"kind": "run"}\n\ud800\nnot json\n[1,2]\n', errors="surrogatepass")
    (directory / "cases.json").write_text(json.dumps([{"id": "c1", "goal": "say ok"}]))
    (directory / "bad-cases.json").write_text('[{"id": 1}, "x", ' + "[" * 5000)
    (directory / "not-a-db.db").write_bytes(JUNK_DB)
    return {"dir": directory, "db": db, "run": run_id, "branch": branch, "loop": str(loop_path), "export": str(export)}


def _mostly(valid: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    """A plausible value seven times in ten, else an odd one (wrong but typeable) or hostile text."""
    return st.sampled_from(["valid"] * 7 + ["odd"] * 2 + ["hostile"]).flatmap(
        lambda kind: st.sampled_from(valid) if kind == "valid" else st.sampled_from(odd) if kind == "odd"
        else fs.nasty_text(20))


def _given(draw: st.DrawFn, often: float) -> bool:
    return draw(st.sampled_from(range(20))) < round(often * 20)


def _values(base: dict[str, Any]) -> dict[str, st.SearchStrategy[str]]:
    d = base["dir"]
    run, branch, loop = base["run"], base["branch"], base["loop"]
    return {
        "RUN": _mostly([run, branch, run[:4], branch[:6]], ["", "zzzz", "%", "_", run[:1], run + "x"]),
        "LOOP": _mostly([loop, f"{loop}:loop"],
                        [f"{loop}:nope", f"{loop}:", f"{loop}:1x", str(d / "loops" / "broken.py"),
                         str(d / "loops" / "deep.py"), "nosuchloop", "codefix:loop", "./nope.py", str(d),
                         "/" + "x" * 300 + ".py", "~/nope.py", "x" * 5_000, loop + "\udcff"]),
        "N": _mostly(["1", "2", "3"], ["0", "-1", "1.5", "1e3", "9" * 30, "NaN", "", " 1", "\u0661", "\u00b2"]),
        "USD": _mostly(["0.01", "1", "0.5"], ["0", "-1", "nan", "inf", "-inf", "1e309", "lots", "", "1" * 400, "0x10"]),
        "FRACTION": _mostly(["0.5", "1", "0"], ["1.5", "-0.1", "nan", "x"]),
        "FILE": _mostly([base["export"], str(d / "cases.json")],
                        [str(d / "junk.jsonl"), str(d / "bad-cases.json"), str(d), "/nonexistent/x", "",
                         str(d / "not-a-db.db")]),
        "OUT": _mostly(["OUT"], ["/nonexistent/dir/x.jsonl", str(d), ""]),
        "SET": st.one_of(fs.set_expr(), st.sampled_from(['memory.subgoal="try again"', "memory.facts=[]",
                                                         'task="other"', "memory.token_count=3"])),
        "MODEL": _mostly(["scripted/fz"], ["scripted/nope", "openai/gpt-4o-mini", "nosuch/x", "", "scripted/", "/",
                                           "gpt-4o"]),
        "SIDE": _mostly(["reuse", "reexecute"], ["", "both"]),
        "RELAX": _mostly(["short_subgoal"], ["nope", ""]),
        "FORMAT": _mostly(["jsonl"], ["csv", ""]),
        "TEXT": _mostly(["because", "try another way"], ["", " "]),
        "DB": st.sampled_from(["copy"] * 6 + ["new", "dir", "junk", "missing-dir"]),
    }


# A grammar: (option, placeholder or None, how often it is given). A positional is an upper-case name.
COMMANDS: dict[str, list[tuple[str, str | None, float]]] = {
    "run": [("LOOP", None, 0.95), ("--headless", None, 1.0), ("--no-wait", None, 0.5), ("--model", "MODEL", 0.2),
            ("--max-iterations", "N", 0.9), ("--budget-usd", "USD", 0.3), ("--budget-tokens", "N", 0.2),
            ("--cases", "FILE", 0.1), ("--parallel", "N", 0.1)],
    "runs": [("--json", None, 0.5)],
    "show": [("RUN", None, 0.95), ("--iteration", "N", 0.5), ("--json", None, 0.4)],
    "watch": [("RUN", None, 0.95)],
    "resume": [("RUN", None, 0.95), ("--max-iterations", "N", 0.5), ("--no-wait", None, 0.5),
               ("--side-effects", "SIDE", 0.2)],
    "fork": [("RUN", None, 0.95), ("--at", "N", 0.95), ("--set", "SET", 0.7), ("--set", "SET", 0.3),
             ("--relax", "RELAX", 0.2), ("--model", "MODEL", 0.1), ("--reason", "TEXT", 0.5), ("--headless", None, 1.0),
             ("--no-wait", None, 0.5), ("--dry-run", None, 0.3)],
    "export": [("RUN", None, 0.95), ("--format", "FORMAT", 0.2), ("--output", "OUT", 0.5)],
    "import": [("FILE", None, 0.95)],
    "replay": [("RUN", None, 0.95), ("--json", None, 0.5)],
    "eval": [("LOOP", None, 0.95), ("--cases", "FILE", 0.9), ("--json", None, 0.5), ("--min-convergence", "FRACTION", 0.3),
             ("--parallel", "N", 0.2), ("--model", "MODEL", 0.1)],
    "loops": [],
    "memory": [("LOOP_NAME", None, 0.95), ("ACTION", None, 0.95)],
    "budget": [("--days", "N", 0.4), ("--json", None, 0.4), ("--set-daily", "USD", 0.2), ("--clear-daily", None, 0.1)],
}
MEMORY_ACTIONS = [["list"], ["list", "--json"], ["search", "flag"], ["add", "k", "v"], ["forget", "k"], ["frob"]]


@st.composite
def argv_for(draw: st.DrawFn, base: dict[str, Any]) -> tuple[list[str], str]:
    values = _values(base)
    command = draw(st.sampled_from(sorted(COMMANDS)))
    argv = [command]
    for option, placeholder, often in COMMANDS[command]:
        if not _given(draw, often):
            continue
        if option == "LOOP_NAME":
            argv.append(draw(_mostly(["fz", "codefix"], ["no-such", ""])))
        elif option == "ACTION":
            argv += [draw(values["TEXT"]) if a == "v" else a for a in draw(st.sampled_from(MEMORY_ACTIONS))]
        elif option.isupper():
            argv.append(draw(values[option]))
        else:
            argv.append(option)
            if placeholder is not None and _given(draw, 0.95):
                argv.append(draw(values[placeholder]))
    if _given(draw, 0.1):  # a stray token somewhere
        argv.insert(draw(st.integers(0, len(argv))), draw(st.one_of(fs.nasty_text(10), st.sampled_from(
            ["--", "-", "--db", "--frobnicate", "-x", "--json=1", "--at=1", "--help"]))))
    return argv, draw(values["DB"])


def as_the_os_passes_them(argv: list[str]) -> list[str]:
    """Arguments as Python's sys.argv would hold them: bytes from the OS, decoded with surrogateescape
    (so an invalid UTF-8 byte arrives as \\udc80..\\udcff, never as another lone surrogate), and never a
    NUL (a C string cannot hold one)."""
    return [os.fsdecode(a.encode("utf-8", "surrogatepass")) for a in argv if "\x00" not in a]


def _with_db(argv: list[str], db: str) -> list[str]:
    """`--db` where the command takes it (`loops` has none; a stray token may have replaced the command)."""
    return argv if argv and argv[0] == "loops" else [*argv, "--db", db]


def _db_arg(kind: str, base: dict[str, Any], workdir: Path) -> str:
    if kind == "copy":
        target = workdir / "loopterm.db"
        shutil.copy(base["db"], target)
        return str(target)
    return {"new": str(workdir / "new.db"), "dir": str(workdir), "junk": str(base["dir"] / "not-a-db.db"),
            "missing-dir": str(workdir / "no" / "such" / "dir" / "x.db")}[kind]


def _check_cli(code: Any, out: str, err: str, db: Path | None, base: dict[str, Any], command: str = "") -> None:
    OUTCOMES[f"cli {command} exit {code}"] += 1
    if os.environ.get("LOOPTERM_FUZZ_TRACE"):
        print(f"TRACE {command} -> {code}: {err.strip()[:300]!r}", file=sys.__stderr__)
    assert code in (0, 1, 2, 3, 4), (code, err[-2_000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3_000:]
    lines = err.splitlines()
    assert len(lines) <= 1, err[-3_000:]
    if code == 2 or lines:
        assert len(lines) == 1 and lines[0].startswith("loopterm: "), err[-2_000:]
        one_line(lines[0], limit=2_000)
    assert "unexpected error" not in err, err  # bad input is named, never "unexpected"
    assert "\x1b" not in out and "\x9b" not in out, repr(out[:2_000])  # the data's escapes are never raw
    junk = base["dir"] / "not-a-db.db"
    assert junk.read_bytes() == JUNK_DB, "a file that is not a loopterm database was changed"
    if db is not None and db != junk and db.is_file() and db.stat().st_size:
        loop, _ = loaded_loop(base["dir"] / "loop")
        check_store(db, loop)


JUNK_DB = b"SQLite format 3\x00" + b"\xff" * 200


@budget(ci=100, slow=1_200)
@given(data=st.data())
def test_cli_in_process(cli_base: dict[str, Any], monkeypatch: pytest.MonkeyPatch, data: Any) -> None:
    """`loopterm ...` with generated arguments: exit 0-4, at most one stderr line (`loopterm: ...`
    for an error), never a traceback, never "unexpected error", and the store whole afterwards."""
    from loopterm.tui.cli import main

    EXAMPLES["command lines (in process)"] += 1
    argv, db_kind = data.draw(argv_for(cli_base))
    argv = as_the_os_passes_them(argv)
    workdir = Path(tempfile.mkdtemp(dir=cli_base["dir"]))
    try:
        db = _db_arg(db_kind, cli_base, workdir)
        argv = _with_db([a.replace("OUT", str(workdir / "out.jsonl")) if a == "OUT" else a for a in argv], db)
        monkeypatch.chdir(cli_base["dir"])  # ./loops holds broken loop files for `loopterm loops`
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: Any = main(argv)
            except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
                code = exc.code
        _check_cli(code, out.getvalue(), err.getvalue(), Path(db), cli_base, argv[0])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


CLI_REGRESSIONS = [
    ["export", "{run}", "--output", ""],  # Path("") has no name: was "unexpected error: ValueError"
    ["run", "{loop}", "--headless", "--max-iterations", "9" * 30],  # beyond SQLite's INTEGER: OverflowError
    ["resume", "{run}", "--max-iterations", "9" * 30],
    ["import", "{dir}/bad-cases.json"],  # "[" * 5,000: RecursionError
    ["run", "{loop}", "--headless", "--cases", "{dir}/bad-cases.json"],
    ["show", "{run}"],  # the run's subgoal and reasoning hold ANSI escapes: shown as escapes
    ["show", "{run}", "--iteration", "1"],
    ["run", "x" * 5_000, "--headless"],  # the unknown name is cut, the advice stays on the line
    ["run", "/" + "x" * 300 + ".py", "--headless"],  # a name too long for the file system: was OSError
    ["run", "{dir}/loops/broken.py", "--headless"],  # its exception's message holds "\x1b[2J"
    ["fork", "{run}", "--at", "1", "--set", "memory.facts.\u00b2=1", "--headless"],
    ["fork", "{run}", "--at", "1", "--set", "iteration=7", "--headless"],
    ["frobnicate\x1b[2J"],
]


@pytest.mark.parametrize("argv", CLI_REGRESSIONS, ids=range(len(CLI_REGRESSIONS)))
def test_cli_regressions(cli_base: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                         argv: list[str]) -> None:
    """Command lines the fuzzing found failing, kept as fixed examples."""
    from loopterm.tui.cli import main

    db = tmp_path / "loopterm.db"
    shutil.copy(cli_base["db"], db)
    values = {"run": cli_base["run"], "loop": cli_base["loop"], "dir": str(cli_base["dir"])}
    argv = [a.format(**values) if "{" in a else a for a in argv]
    monkeypatch.chdir(cli_base["dir"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: Any = main([*argv, "--db", str(db)])
        except SystemExit as exc:
            code = exc.code
    _check_cli(code, out.getvalue(), err.getvalue(), db, cli_base, argv[0])


@budget(ci=4, slow=40)
@given(data=st.data())
def test_cli_in_a_subprocess(cli_base: dict[str, Any], data: Any) -> None:
    """A sample through the real `python -m loopterm.tui.cli`: the same contract, end to end."""
    EXAMPLES["command lines (subprocess)"] += 1
    argv, db_kind = data.draw(argv_for(cli_base))
    argv = [a for a in argv if "\x00" not in a]  # the OS refuses NUL in argv before loopterm sees it
    workdir = Path(tempfile.mkdtemp(dir=cli_base["dir"]))
    try:
        db = _db_arg(db_kind, cli_base, workdir)
        argv = _with_db([str(workdir / "out.jsonl") if a == "OUT" else a for a in argv], db)
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "120", "PYTHONIOENCODING": "utf-8"}
        env.pop("OPENAI_API_KEY", None)
        encoded = [os.fsencode(a) if _encodable(a) else a.encode("utf-8", "surrogatepass") for a in argv]
        done = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", *encoded],
                              capture_output=True, cwd=cli_base["dir"], env=env, timeout=120, stdin=subprocess.DEVNULL)
        out = done.stdout.decode("utf-8", "replace")
        err = done.stderr.decode("utf-8", "replace")
        _check_cli(done.returncode, out, err, Path(db), cli_base, argv[0])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _encodable(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


# ============================================================================= 6. rendering


_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def _rendered(renderable: Any, width: int = 100) -> str:
    buffer = io.StringIO()
    Console(file=buffer, color_system=None, width=width, force_terminal=False, legacy_windows=False,
            highlight=False).print(renderable)
    return buffer.getvalue()


def _safe_output(text: str) -> None:
    """Nothing reaches the terminal that it would interpret: no control character, no unpaired
    surrogate (which would not even encode), no bidirectional override."""
    found = _UNSAFE.search(text)
    assert found is None, f"raw {found.group()!r} in output: {text[max(0, found.start() - 40):found.end() + 40]!r}"
    text.encode("utf-8")


def _record(text: str, other: str, n: int = 1) -> IterationRecord:
    return IterationRecord(
        run_id="r1", n=n, started_at=0.0, ended_at=1.0,
        prompt=[{"role": "system", "content": text}, {"role": other, "content": [text]}],
        raw_response=text, decision={"subgoal": text, "confidence": 0.5, "reasoning": other, "done": True,
                                     "action": {"tool": other, "args": {"text": text}}},
        repairs=1, tool_call={"tool": other, "args": {other: text}, "key": "k", "approval": other},
        tool_result={"ok": False, "output": text, "error": other, "reused": True},
        gate_results=[{"name": other, "passed": False, "exit_code": 1, "stderr": text, "stdout": other,
                       "error": text, "duration_s": 0.1, "model": other}],
        invariant_status={other: False, text[:50]: True}, remediations=[other], model=other,
        state={"task": text, other: [text]},
    )


def _run(text: str, other: str) -> RunRecord:
    return RunRecord(id="r1", loop=other, loop_ref=other, goal=text, spec_hash="h", model=other, status="failed",
                     workspace=text, created_at=0.0, updated_at=0.0, max_iterations=3, iterations=1,
                     budget={"usd": 1.0, "tokens": 100}, message=text, termination_reason=other, parent_run="p1",
                     fork_iteration=1, origin="fork")


@budget(ci=150, slow=1_500)
@given(text=fs.any_text(20_000), other=fs.nasty_text(), width=st.sampled_from([20, 80, 200]))
@example(text="\ud800 alone", other="[bold]x[/bold]", width=80)
@example(text="\u202egnp.exe", other="\x1b[31m", width=80)
@example(text="ok", other="\x9b2J", width=80)
def test_untrusted_text_renders_literally(text: str, other: str, width: int) -> None:
    """Model, tool, gate and person text on screen (TUI renderers and headless progress): no
    exception, markup shown as written, no control character or escape sequence reaches the terminal."""
    from loopterm.core.events import (ApprovalNeeded, Escalated, IterationCommitted, IterationStarted, ModelRetry,
                                      RunFinished, RunStarted, StatusChanged)
    from loopterm.tui import headless
    from loopterm.tui.widgets import render

    EXAMPLES["rendering (render + headless)"] += 1
    shown = render.literal(text)
    _safe_output(shown.plain)
    if not _UNSAFE.search(text) and "\t" not in text and "\r" not in text:
        assert shown.plain == text  # markup and everything else exactly as written

    record, run = _record(text, other), _run(text, other)
    palette = render.Palette()
    info = render.summarize(record)
    outputs = [
        *render.row_cells(info, palette, inherited=True),
        render.header_text(run, palette, owned=True, inbox=2, note=render.literal(other)),
        render.reasoning_text(record), render.prompt_text(record), render.response_text(record),
        render.tool_text(record), render.gates_detail(record, palette),
        render.state_diff({"task": other}, record.state, palette),
        render.invariants_detail(record, [render.InvariantInfo(other, text, other)], {other: text}, palette),
        render.literal(render.first_line(text, width)),
    ]
    for renderable in outputs:
        _safe_output(_rendered(renderable, width))
    plain = "[bold]literal[/bold]"
    assert plain in _rendered(render.literal(plain))

    buffer = io.StringIO()
    console = Console(file=buffer, color_system=None, width=width, force_terminal=False, highlight=False)
    progress = headless.HeadlessProgress(console)
    for event in [
        RunStarted(run_id="r1", loop=other, model=text[:200], max_iterations=3, resumed_from=1),
        IterationStarted(run_id="r1", n=1),
        ModelRetry(run_id="r1", n=1, attempt=1, error=text, delay_s=0.5),
        IterationCommitted(record=record),
        Escalated(run_id="r1", n=1, packet={"summary": text, "failing_invariants": [{"name": other}]}),
        StatusChanged(run_id="r1", status="escalated", message=text),
        StatusChanged(run_id="r1", status=other, message=other),
        ApprovalNeeded(run_id="r1", n=1, key="k", tool=other, args={"a": text}),
        RunFinished(run_id="r1", status="failed", reason="fatal_error", message=text),
    ]:
        progress(event)
    console.print(headless.summary(run))
    console.print(headless.status_text(other))
    _safe_output(buffer.getvalue())
