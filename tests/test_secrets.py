"""Secrets: keys planted in the environment, in model replies, tool output and gate output never reach the
store, `show --json`, the export, the headless output, the TUI, logs or the escalation packet; tools and
gates run without provider keys, in the workspace, with a timeout that ends everything they started and an
output cap that bounds memory."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import string
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import CommandGate, tool
from loopterm.core import runlog
from loopterm.core.gates import scrubbed_env
from loopterm.core.records import RunRecord
from loopterm.core.runlog import to_stored
from loopterm.core.secrets import (
    KEY_MARKER,
    is_secret_name,
    redact,
    redact_capped,
    redact_tree,
    secret_values,
)
from loopterm.core.tools import ToolExecutor, confine, run_command, run_command_async
from loopterm.store import Store

CLI = [sys.executable, "-m", "loopterm.tui.cli"]
_RNG = random.SystemRandom()


def token(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(_RNG.choice(alphabet) for _ in range(n))


# Planted for the whole module: values in the environment (found by value), and key-shaped strings
# that are in no environment variable (found by shape).
ENV_KEYS = {
    "OPENAI_API_KEY": "sk-test-" + token(40),
    "ANTHROPIC_API_KEY": token(48),  # shaped like nothing: only the environment says it is a key
    "GITHUB_TOKEN": "gt" + token(38),
}
SHAPED = {
    "bearer": token(36) + "7",  # only ever after "Authorization: Bearer"
    "aws": "AKIA" + token(16, string.ascii_uppercase + string.digits),
    "project": "sk-proj-" + token(40),
}
PLANTED = {**ENV_KEYS, **SHAPED}


def pieces(value: str) -> set[str]:
    """The value and 10-character pieces of its random part: a half-redacted key is a leak too."""
    core = value.split("-")[-1] if value.startswith("sk-") else value[4:] if value.startswith("AKIA") else value
    middle = len(core) // 2
    return {value, core[:10], core[middle - 5:middle + 5], core[-10:]}


def leaks(where: str, blob: str | bytes) -> list[str]:
    """'where: NAME' for every planted secret (or piece of one) found in blob."""
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    return [f"{where}: {name}" for name, value in PLANTED.items() if any(p in text for p in pieces(value))]


def decision(tool_name: str | None, *, subgoal: str, reasoning: str, **args: Any) -> dict[str, Any]:
    action = {"tool": tool_name, "args": args} if tool_name else None
    return {"action": action, "subgoal": subgoal, "confidence": 0.5, "reasoning": reasoning, "done": False}


LOOP_FILE = '''
"""A loop whose model, tools and gate all handle keys (tests/test_secrets.py)."""

import json
import logging
import os
import sys
from pathlib import Path

from loopterm.core import CommandGate, Invariant, Loop, LoopState, Remediation, ToolContext, tool
from loopterm.core.tools import run_command

BEARER = {bearer!r}
AWS = {aws!r}
PROJECT = {project!r}
log = logging.getLogger("planted.tools")


@tool(side_effects=True, idempotent=True)
def leak(ctx: ToolContext, text: str) -> str:
    """Echo the environment, an Authorization header and the text; leave the key where the gate reads it."""
    (ctx.workspace / "leak.txt").write_text(os.environ["OPENAI_API_KEY"] + " " + AWS + "\\n")
    log.warning("leaking %s and %s", os.environ["ANTHROPIC_API_KEY"], text)
    headers = {{"Authorization": "Bearer " + BEARER, "x-api-key": os.environ["ANTHROPIC_API_KEY"]}}
    return json.dumps({{"env": dict(os.environ), "headers": headers, "text": text, "project": PROJECT}})


@tool
def child_env(ctx: ToolContext) -> str:
    """The environment and working directory a command run by a tool gets."""
    code = "import json, os; print(json.dumps({{'cwd': os.getcwd(), 'env': sorted(os.environ)}}))"
    return run_command(ctx.workspace, [sys.executable, "-c", code], timeout=20).stdout


@tool
def fail(ctx: ToolContext) -> str:
    """Fail with keys in the message (and log the exception)."""
    try:
        raise RuntimeError("upstream refused Authorization: Bearer " + BEARER + " for " + os.environ["GITHUB_TOKEN"])
    except RuntimeError:
        log.exception("the call failed with %s", os.environ["OPENAI_API_KEY"])
        raise


GATE = """
import json, os, sys
print(open('leak.txt').read())
print('GATE_ENV', json.dumps(sorted(os.environ)))
print('Authorization: Bearer ' + {bearer!r}, file=sys.stderr)
print('aws key ' + {aws!r} + ' project ' + {project!r}, file=sys.stderr)
sys.exit(1)
"""

loop = Loop(
    name="planted",
    goal="Handle the keys.",
    tools=[leak, child_env, fail],
    gates=[CommandGate(name="leaky", argv=["{{python}}", "-c", GATE])],
    invariants=[Invariant(name="short", check=lambda s: s.iteration < 3, remediation=Remediation.ESCALATE,
                          description="three iterations at most, then a person")],
    state=LoopState,
    script=Path(__file__).with_name("script.json"),
    max_iterations=5,
    stall_window=None,
)
'''


def write_loop(where: Path) -> Path:
    """The planted loop and its scripted model's replies, which carry the keys too."""
    where.mkdir(parents=True, exist_ok=True)
    k = ENV_KEYS
    turns = [
        [  # iteration 1: a 429 whose message holds keys, a reply that is not JSON, then a decision
            {"error": {"status": 429, "message": f"Incorrect API key provided: {k['OPENAI_API_KEY']}. "
                                                 f"Authorization: Bearer {SHAPED['bearer']}"}},
            f"this is not JSON; my key is {k['ANTHROPIC_API_KEY']}",
            {"content": decision("leak", text=f"{k['GITHUB_TOKEN']} and {SHAPED['aws']}",
                                 subgoal=f"use {k['ANTHROPIC_API_KEY']}",
                                 reasoning=f"the key is {k['OPENAI_API_KEY']}; Authorization: Bearer {SHAPED['bearer']}")},
        ],
        {"content": decision("child_env", subgoal="look at the environment",
                             reasoning=f"try {SHAPED['project']} and {k['GITHUB_TOKEN']}")},
        {"content": decision("fail", subgoal=f"fail with {SHAPED['aws']}", reasoning="raise")},
    ]
    (where / "script.json").write_text(json.dumps({
        "price": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}, "turns": turns}))
    path = where / "planted.py"
    path.write_text(LOOP_FILE.format(**SHAPED))
    return path


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV_KEYS, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "160"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def stored_files(work: Path) -> dict[str, bytes]:
    """Every file loopterm wrote under .loopterm (the database, its -wal and -shm), not the loop's workspace."""
    root = work / ".loopterm"
    return {str(p.relative_to(work)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "workspaces" not in p.relative_to(root).parts}


# ---------------------------------------------------------------------- end to end: headless


@pytest.fixture(scope="module")
def headless(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("planted")
    loop_file = write_loop(work / "loop")
    done = cli("run", str(loop_file), "--headless", "--no-wait", cwd=work)
    run_id = json.loads(cli("runs", "--json", cwd=work).stdout)[0]["id"]
    return work, run_id, done


def test_headless_run_leaks_no_planted_key_anywhere(headless: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    work, run_id, done = headless
    assert done.returncode == 4, done.stdout + done.stderr  # escalated, nobody waiting
    assert "escalated at iteration 3" in done.stdout
    outputs: dict[str, str | bytes] = {"headless stdout": done.stdout, "headless stderr": done.stderr}
    assert "leaking [redacted:ANTHROPIC_API_KEY]" in done.stderr  # the tool's log line reached stderr, redacted
    outputs.update(stored_files(work))
    assert any(name.endswith("loopterm.db") for name in outputs)
    for args in (["show", run_id, "--json"], ["show", run_id], ["export", run_id], ["runs", "--json"],
                 *[["show", run_id, "--iteration", str(n), "--json"] for n in (1, 2, 3)]):
        shown = cli(*args, cwd=work)
        assert shown.returncode == 0, shown.stderr
        outputs[" ".join(args[:1] + args[2:])] = shown.stdout + shown.stderr
    found = [hit for where, blob in outputs.items() for hit in leaks(where, blob)]
    assert found == [], found


def test_what_was_redacted_is_marked_and_the_run_is_intact(headless: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    work, run_id, _ = headless
    shown = json.loads(cli("show", run_id, "--json", cwd=work).stdout)
    first, second, third = shown["iterations"]
    assert "[redacted:OPENAI_API_KEY]" in first["decision"]["reasoning"]
    assert first["decision"]["subgoal"] == "use [redacted:ANTHROPIC_API_KEY]"
    assert first["tool_call"]["args"]["text"] == f"[redacted:GITHUB_TOKEN] and {KEY_MARKER}"  # what the tool ran with
    assert "Bearer [redacted:key]" in first["raw_response"]
    assert first["repairs"] == 1
    leak_output = json.loads(first["tool_result"]["output"])
    assert leak_output["env"]["OPENAI_API_KEY"] == "[redacted:OPENAI_API_KEY]"
    assert leak_output["headers"] == {"Authorization": f"Bearer {KEY_MARKER}", "x-api-key": "[redacted:ANTHROPIC_API_KEY]"}
    gate = first["gate_results"][0]
    assert gate["stdout"].startswith(f"[redacted:OPENAI_API_KEY] {KEY_MARKER}")
    assert f"Authorization: Bearer {KEY_MARKER}" in gate["stderr"]
    # the gate's own environment held no provider key at all (names, not just values)
    gate_env = json.loads(gate["stdout"].split("GATE_ENV ", 1)[1].splitlines()[0])
    assert not set(ENV_KEYS) & set(gate_env) and "PATH" in gate_env
    # nor did the command a tool ran, whose working directory was the run's workspace
    child = json.loads(second["tool_result"]["output"])
    assert not set(ENV_KEYS) & set(child["env"]) and "PATH" in child["env"]
    assert Path(child["cwd"]).resolve() == Path(shown["run"]["workspace"]).resolve()
    assert third["tool_result"]["error"].startswith(f"RuntimeError: upstream refused Authorization: Bearer {KEY_MARKER}")
    kinds = {e["kind"]: e for e in shown["events"]}
    assert "429" in kinds["model_retry"]["data"]["error"]  # its message had both keys (see the first test)
    assert "[redacted:ANTHROPIC_API_KEY]" in kinds["invalid_reply"]["data"]["reply"]
    packet = kinds["escalated"]["data"]
    assert packet["state"]["memory"]["subgoal"] == f"fail with {KEY_MARKER}"
    assert f"Authorization: Bearer {KEY_MARKER}" in packet["last_gate_failure"]


# ---------------------------------------------------------------------- in process: logs, events, the TUI


@pytest.fixture
def planted_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in ENV_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOOPTERM_CONFIG_DIR", str(tmp_path / "config"))


async def run_in_process(work: Path) -> tuple[Store, str, list[Any]]:
    from loopterm.core.engine import Engine
    from loopterm.core.loader import load_loop
    from loopterm.core.model import check_model

    loop, ref = load_loop(str(write_loop(work / "loop")))
    check_model(loop.model, loop.script)
    store = Store.open(work / "db" / "loopterm.db")
    events: list[Any] = []
    engine = Engine.create(loop, store, loop_ref=ref, workspace_root=work / "ws", workdir=work, subscribers=[events.append])
    final = await engine.run()
    assert final.status == "escalated", final
    return store, engine.run_id, events


@pytest.mark.usefixtures("planted_env")
async def test_logs_events_and_the_escalation_packet_hold_no_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store, run_id, events = await run_in_process(tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert "leaking [redacted:ANTHROPIC_API_KEY] and [redacted:GITHUB_TOKEN] and [redacted:key]" in messages
    assert "the call failed with [redacted:OPENAI_API_KEY]" in messages
    assert f"RuntimeError: upstream refused Authorization: Bearer {KEY_MARKER}" in caplog.text  # the traceback
    packet = next(e.packet for e in events if type(e).__name__ == "Escalated")
    found = (leaks("log records", "\n".join(messages)) + leaks("log text", caplog.text)
             + leaks("events", repr(events)) + leaks("packet", json.dumps(packet))
             + [hit for kind, data in (to_stored(e.event) for e in store.events(run_id))
                for hit in leaks(f"event {kind}", json.dumps(data))])
    files = {p.name: p.read_bytes() for p in (tmp_path / "db").glob("loopterm.db*")}  # open: the -wal holds pages
    assert "loopterm.db-wal" in files and b"[redacted:" in b"".join(files.values())
    found += [hit for name, blob in files.items() for hit in leaks(name, blob)]
    assert found == [], found
    store.close()


@pytest.mark.usefixtures("planted_env")
async def test_the_tui_shows_no_key(tmp_path: Path) -> None:
    from textual.widgets import TabbedContent

    from loopterm.tui.app import LooptermApp
    from loopterm.tui.widgets.detail import TABS

    store, run_id, _ = await run_in_process(tmp_path)
    store.close()
    app = LooptermApp(tmp_path / "db" / "loopterm.db", theme="textual-dark", frozen=True)
    seen: dict[str, str] = {}
    async with app.run_test(size=(140, 40)) as pilot:
        deadline = time.monotonic() + 20
        while not (app.view is not None and not app.view.loading and app.timeline.row_count == 3):
            assert time.monotonic() < deadline, "the run did not load"
            await pilot.pause(0.05)
        seen["header and inbox"] = app.export_screenshot()
        for row in range(3):
            app.timeline.move_cursor(row=row)
            await pilot.pause()
            for tab, _ in TABS:
                app.detail.query_one(TabbedContent).active = f"tab-{tab}"
                await pilot.pause()
                seen[f"row {row} {tab} text"] = app.detail.body(tab).plain
                seen[f"row {row} {tab} screen"] = app.export_screenshot()
        assert "[redacted:OPENAI_API_KEY]" in seen["row 0 reasoning text"]
        assert "Bearer [redacted:key]" in seen["row 0 tool text"]
        await pilot.press("x")  # the escalation inbox, then the escalation itself
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        seen["escalation"] = app.export_screenshot()
    found = [hit for where, blob in seen.items() for hit in leaks(where, blob)]
    assert found == [], found


def test_the_screen_renderers_redact_what_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Belt and braces: text that never went through the engine (an old database, say) is redacted on screen."""
    from rich.console import Console

    from loopterm.core.events import ModelRetry, StatusChanged
    from loopterm.tui.headless import HeadlessProgress
    from loopterm.tui.widgets.render import first_line, literal

    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEYS["OPENAI_API_KEY"])
    console = Console(record=True, width=200)
    progress = HeadlessProgress(console)
    progress(ModelRetry(run_id="r", n=1, attempt=1, error=f"bad key {ENV_KEYS['OPENAI_API_KEY']}", delay_s=0.1))
    progress(StatusChanged(run_id="r", status="escalated", message=f"Authorization: Bearer {SHAPED['bearer']}"))
    printed = console.export_text()
    assert "[redacted:OPENAI_API_KEY]" in printed and f"Bearer {KEY_MARKER}" in printed
    assert leaks("headless", printed) == []
    assert literal(f"x {SHAPED['project']} y").plain == f"x {KEY_MARKER} y"
    assert first_line(f"{SHAPED['aws']} rest", 8) == "[redact…"


# ---------------------------------------------------------------------- what counts as a secret


def test_key_shapes_and_credential_values_are_redacted() -> None:
    cases = {
        "sk-ant-api03-" + "a1" * 20: KEY_MARKER,
        "ghp_" + "B2" * 18: KEY_MARKER,
        "github_pat_11ABCDEFG0123456789abcdefghij": KEY_MARKER,
        "xoxb-1234567890-abcdefghij": KEY_MARKER,
        "AIzaSy" + "C3" * 17: KEY_MARKER,
        "hf_" + "d4" * 16: KEY_MARKER,
        "sk_live_" + "e5" * 8: KEY_MARKER,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV": KEY_MARKER,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----": KEY_MARKER,
        "Authorization: Bearer abcdefghijklmnop": f"Authorization: Bearer {KEY_MARKER}",
        "proxy-authorization: Basic dXNlcjpwYXNzd29yZA==": f"proxy-authorization: Basic {KEY_MARKER}",
        '{"Authorization": "token abc"}': f'{{"Authorization": "token {KEY_MARKER}"}}',
        "x-api-key: Zq8w7e6r5t4y3u2i1o0p": f"x-api-key: {KEY_MARKER}",
        "https://h/v1?api_key=d5345c0ecc68ae6295c69f91926b2bd3&q=1": f"https://h/v1?api_key={KEY_MARKER}&q=1",
        'client_secret="S3cr3t-value"': f'client_secret="{KEY_MARKER}"',
        "DB_PASSWORD=hunter2hunter2": f"DB_PASSWORD={KEY_MARKER}",
        "export API_TOKEN=changeme-now\n": f"export API_TOKEN={KEY_MARKER}\n",  # an environment file or a shell
        'conn = connect(password="hunter22")': f'conn = connect(password="{KEY_MARKER}")',  # a literal in code
        "curl -H 'Authorization: Bearer tok_9876543210'": f"curl -H 'Authorization: Bearer {KEY_MARKER}'",
        "Bearer tok_987654321": f"Bearer {KEY_MARKER}",
    }
    for text, expected in cases.items():
        assert redact(text) == expected, text


def test_ordinary_text_is_left_alone() -> None:
    for text in [
        "the risk-assessment is done; task-0123456789 and desk-lamp",  # "sk-" inside words
        "password: required",  # a lowercase word, not a password
        "bearer of bad news",
        "key=lambda item: item.name, sort_keys=True, monkey business",
        '{"key": "3f2a9c0d1e2b3a4f5c6d7e8f9a0b1c2d", "tool": "write"}',  # a call's idempotency key in a record
        "max_tokens: 1000, tokens_in=123456789012345678",
        "AKIA is not a key on its own, nor is ASIA",
        "Authorization: [redacted:key]",
        # code a model writes into a tool's arguments must come through whole (a false positive corrupts it)
        "words = itertools.groupby(folded, key=_KEEP.__contains__)",
        "login(user, password=user_password)",
        "ARGILLA_API_KEY=_credentials_api_key,",
        "SECRET_KEY = get_secret()",
        'api_key=os.environ["OPENAI_API_KEY"], key=sha256_hexdigest_value',
        '{"create_client_secret": "/realtime/client_secrets"}',
        'curl -H "Authorization: Bearer $OPENAI_API_KEY" https://api.openai.com',
        'headers = {"Authorization": f"Bearer {token}", "x-api-key": api_key}',
        '"Authorization": "Bearer " + token',
    ]:
        assert redact(text) == text, text


def test_the_shipped_scripts_come_through_redaction_unchanged() -> None:
    """The built-in loops' scripted replies are code and prose a model would write: not one string of them
    may change (a `key=_KEEP.__contains__` in codefix's groupby case once did, and broke the case)."""
    root = Path(__file__).resolve().parent.parent / "examples"
    scripts = sorted(root.rglob("*.json"))
    assert len(scripts) > 20
    for script in scripts:
        data = json.loads(script.read_text())
        assert redact_tree(data) is data, script


def test_environment_values_by_name_with_a_minimum_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-" + "9" * 12)
    monkeypatch.setenv("SHORT_API_KEY", "abc12")  # too short to redact: it would erase ordinary text
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsefalse")  # "TOKENIZERS" is not "TOKEN"
    assert redact("use tok-999999999999 now") == "use [redacted:MY_SERVICE_TOKEN] now"
    assert redact("abc12 and falsefalse") == "abc12 and falsefalse"
    monkeypatch.delenv("MY_SERVICE_TOKEN")
    assert redact("still tok-999999999999") == "still [redacted:MY_SERVICE_TOKEN]"  # a key stays a key
    assert "tok-999999999999" in secret_values()
    assert all(is_secret_name(n) for n in ["OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "db_password",
                                            "SLACK_BOT_TOKEN", "HF_TOKEN", "SERPAPI_APIKEY", "GPG_PASSPHRASE"])
    assert not any(is_secret_name(n) for n in ["PATH", "PWD", "SSH_AUTH_SOCK", "TOKENIZERS_PARALLELISM", "KEYBOARD",
                                                "MONKEY", "HOME"])


def test_a_long_text_redacted_by_sections_gives_what_a_whole_scan_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Texts of 1 KB and more are redacted one blank-line section at a time, sections seen before from a
    cache: for random prompts built from secrets, near-secrets and ordinary prose, across blank lines
    (encrypted PEM blocks hold one), the result is exactly a whole scan's."""
    from loopterm.core import secrets

    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-" + "7" * 12)
    rng = random.Random(15)
    pieces = [
        *SHAPED.values(), "Authorization: Bearer abcdefghijklmnop", "x-api-key: Zq8w7e6r5t4y3u2i1o0p",
        "DB_PASSWORD=hunter2hunter2", 'client_secret="S3cr3t-value"', "tok-777777777777", "password: required",
        "key=lambda item: item.name", '{"key": "3f2a9c0d1e2b3a4f5c6d7e8f9a0b1c2d"}', "Bearer", "api_key=", "sk-",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nMIIEow" + "A1b2" * 8 + "\n-----END RSA PRIVATE KEY-----",
        "the state of the run", "- iteration 12: noop ok", '"items": [1, 2.0, true]', "=", ":", " ", "\n", "\n\n", "\n\n\n",
    ]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(60, 200)))
        if len(text) < secrets._SECTIONED:
            continue
        expected = secrets._redact_whole(text, secrets._env_secrets())
        assert redact(text) == expected
        grown = f"{text}\n\nnew section {rng.random()}: " + rng.choice(pieces)  # most sections now cached
        assert redact(grown) == secrets._redact_whole(grown, secrets._env_secrets())
        assert redact(text) == expected  # again, from the caches


def test_a_cached_section_is_redacted_again_when_the_environment_gains_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The section memo never lets a secret through: a value that becomes a secret after its text was
    cached (a variable set later) is redacted in that text from then on; a secret holding a blank line
    makes long texts go whole."""
    value = "later-" + token(16)
    long_prose = "\n\n".join(f"section {i}: ordinary words, nothing to hide here at all" for i in range(40))
    text = f"{long_prose}\n\nconnect with {value} today\n\n{long_prose}"
    assert redact(text) is text  # not a secret yet: cached clean, section by section
    assert redact(f"{long_prose}\n\nother {value}") .endswith(value)
    monkeypatch.setenv("LATER_SERVICE_TOKEN", value)
    assert value not in redact(text) and "[redacted:LATER_SERVICE_TOKEN]" in redact(text)
    assert value not in redact(f"{long_prose}\n\nother {value}")
    spanning = "first-half-" + token(8) + "\n\nsecond-half-" + token(8)
    monkeypatch.setenv("SPANNING_API_KEY", spanning)
    assert spanning not in redact(f"{long_prose}\n\nsee {spanning} end")


def test_redact_tree_returns_clean_data_itself_and_copies_only_what_changed() -> None:
    clean = {"a": ["x", {"b": ("y", 1, None)}], "n": 2.5}
    assert redact_tree(clean) is clean
    dirty = {"a": ["x", {"b": ("y", SHAPED["aws"])}], SHAPED["project"]: 1, "same": ["kept"]}
    out = redact_tree(dirty)
    assert out == {"a": ["x", {"b": ("y", KEY_MARKER)}], KEY_MARKER: 1, "same": ["kept"]}
    assert out["same"] is dirty["same"] and dirty["a"][1]["b"][1] == SHAPED["aws"]  # the input is not changed


def test_a_cap_never_keeps_half_a_key() -> None:
    key = SHAPED["project"]
    text = "x" * 90 + " " + key + " " + "y" * 100_000
    capped = redact_capped(text, 100)  # the cap falls inside the key
    assert capped.startswith("x" * 90 + " " + KEY_MARKER[:9]) and leaks("capped", capped) == []
    assert capped.endswith(f"[... {len(KEY_MARKER) - 9 + 1 + 100_000} more characters cut]")


def test_logging_and_warnings_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = logging.getLogger("loopterm.test.secrets")
    log.info("calling with %s", {"Authorization": f"Bearer {SHAPED['bearer']}"})
    try:
        raise ValueError(f"bad key {SHAPED['project']}")
    except ValueError:
        log.exception("failed")
    assert caplog.records[0].getMessage() == f"calling with {{'Authorization': 'Bearer {KEY_MARKER}'}}"
    assert f"ValueError: bad key {KEY_MARKER}" in caplog.text and leaks("logs", caplog.text) == []
    assert leaks("warning", warnings.formatwarning(f"key {SHAPED['aws']}", UserWarning, "f.py", 1)) == []


def test_model_redact_delegates() -> None:
    from loopterm.core.model import redact as model_redact

    assert model_redact(f"401 Incorrect API key provided: {SHAPED['project']}") == (
        f"401 Incorrect API key provided: {KEY_MARKER}")


# ---------------------------------------------------------------------- tools and gates: environment, cwd, timeout, cap


def test_no_provider_key_reaches_a_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """GITHUB_TOKEN, HF_TOKEN, DB_PASSWORD: names the old suffix list (_API_KEY, _SECRET, ...) let through."""
    for name in ("OPENAI_API_KEY", "GITHUB_TOKEN", "HF_TOKEN", "DB_PASSWORD", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "value-" + token(12))
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    env = scrubbed_env()
    assert not {"OPENAI_API_KEY", "GITHUB_TOKEN", "HF_TOKEN", "DB_PASSWORD", "AWS_SESSION_TOKEN"} & set(env)
    assert env["SSH_AUTH_SOCK"] == "/tmp/agent.sock" and "PATH" in env


async def test_run_command_runs_in_the_workspace_without_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", ENV_KEYS["GITHUB_TOKEN"])
    code = "import os; print(os.getcwd()); print(sorted(os.environ)); print('token', %r)" % ENV_KEYS["GITHUB_TOKEN"]
    done = await run_command_async(tmp_path, [sys.executable, "-c", code], timeout=20)
    cwd, names, echoed = done.stdout.splitlines()
    assert done.exit_code == 0 and Path(cwd).resolve() == tmp_path.resolve()
    assert "GITHUB_TOKEN" not in names and echoed == "token [redacted:GITHUB_TOKEN]"
    in_thread = await asyncio.to_thread(run_command, tmp_path, [sys.executable, "-c", "print('ok')"])
    assert in_thread.stdout == "ok\n"
    with pytest.raises(RuntimeError, match="awaits run_command_async"):
        run_command(tmp_path, ["true"])
    with pytest.raises(ValueError, match="outside the workspace"):
        (tmp_path / "out").symlink_to("/etc")
        confine(tmp_path, "out/passwd")


GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
open('grandchild.pid', 'w').write(str(child.pid))
{after}
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is dead
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
async def test_a_gate_timeout_ends_everything_it_started(tmp_path: Path) -> None:
    """Before: a 0.5 s timeout took as long as the grandchild lived (asyncio waits for the pipes it holds),
    and the grandchild ran on."""
    gate = CommandGate(name="g", argv=["{python}", "-c", GRANDCHILD.format(after="child.wait()")], timeout=0.5)
    started = time.monotonic()
    result = await gate.run(tmp_path)
    assert result.error == "timed out after 0.5s" and time.monotonic() - started < 3.0
    pid = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.monotonic() + 2
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not alive(pid)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
async def test_a_gate_that_exits_leaving_a_process_behind_returns_and_the_process_ends(tmp_path: Path) -> None:
    gate = CommandGate(name="g", argv=["{python}", "-c", GRANDCHILD.format(after="print('done')")], timeout=30)
    started = time.monotonic()
    result = await gate.run(tmp_path)
    assert result.passed and result.stdout == "done\n" and time.monotonic() - started < 5.0
    pid = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.monotonic() + 2
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not alive(pid)


async def test_a_gate_printing_megabytes_costs_bounded_memory(tmp_path: Path) -> None:
    """Before: the whole output was read into memory, then capped."""
    code = "import sys\nchunk = 'z' * 65536 + '\\n'\nfor _ in range(512): sys.stdout.write(chunk)\nsys.exit(1)"
    gate = CommandGate(name="loud", argv=["{python}", "-c", code], output_cap=1_000, timeout=60)
    tracemalloc.start()
    try:
        result = await gate.run(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 1 and len(result.stdout) < 1_100
    assert result.stdout.endswith(f"[... {512 * 65537 - 1_000} more characters cut]")
    assert peak < 8_000_000, f"peak {peak:,} bytes for 32 MB of output"


def test_a_hung_synchronous_tool_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """Before: asyncio.run waited for the tool's executor thread at exit, so `loopterm run` never ended."""
    code = textwrap.dedent(f"""
        import asyncio, time
        from pathlib import Path
        from loopterm.core import tool
        from loopterm.core.records import RunRecord
        from loopterm.core.tools import ToolExecutor
        from loopterm.store import Store

        @tool(timeout=0.2)
        def hang() -> str:
            \"\"\"Never returns.\"\"\"
            time.sleep(120)
            return "late"

        async def main():
            store = Store.open(Path({str(tmp_path)!r}) / "t.db")
            store.create_run(RunRecord(id="r1", loop="l", loop_ref="l", goal="g", spec_hash="h", model="m",
                                       status="running", workspace={str(tmp_path)!r}, created_at=0, updated_at=0,
                                       max_iterations=5))
            record, _ = await ToolExecutor(store, "r1").execute(hang, {{}}, 1, Path({str(tmp_path)!r}))
            print(record.error)

        asyncio.run(main())
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "timed out after 0.2s (its thread cannot be stopped and may still finish)"
    assert time.monotonic() - started < 30


async def test_tool_output_and_errors_are_redacted_before_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEYS["OPENAI_API_KEY"])
    store = Store.open(tmp_path / "t.db")
    store.create_run(RunRecord(id="r1", loop="l", loop_ref="l", goal="g", spec_hash="h", model="m", status="running",
                               workspace=str(tmp_path), created_at=0, updated_at=0, max_iterations=5))
    executor = ToolExecutor(store, "r1")

    @tool(output_cap=60)
    def echo(text: str) -> str:
        """Echo the environment's key after some text."""
        return text + os.environ["OPENAI_API_KEY"] + "!" * 1_000

    @tool
    def boom() -> str:
        """Raise with a header."""
        raise PermissionError(f"Authorization: Bearer {SHAPED['bearer']}")

    record, key = await executor.execute(echo, {"text": "k" * 50 + " " + SHAPED["aws"]}, 1, tmp_path)
    assert record.args == {"text": "k" * 50 + " " + KEY_MARKER}
    assert record.output.startswith("k" * 50 + " [redacted") and leaks("output", record.output) == []
    failed, _ = await executor.execute(boom, {}, 1, tmp_path)
    assert failed.error == f"PermissionError: Authorization: Bearer {KEY_MARKER}"
    store.close()
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("t.db*"))
    assert b"kkkkk" in journal and leaks("journal", journal) == []


def test_the_export_redacts_what_an_older_loopterm_stored(tmp_path: Path) -> None:
    """Belt and braces: a database written before redaction (or by hand) exports without its keys."""
    store = Store.open(tmp_path / "t.db")
    store.create_run(RunRecord(id="old1", loop="l", loop_ref="l", goal=f"use {SHAPED['project']}", spec_hash="h",
                               model="m", status="failed", workspace=str(tmp_path), created_at=0, updated_at=0,
                               max_iterations=5, message=f"Authorization: Bearer {SHAPED['bearer']}"))
    store.append_event("old1", runlog.ModelRetried(error=f"bad key {SHAPED['aws']}"))
    lines = [json.dumps(line) for line in store.export_run("old1")]
    store.close()
    assert leaks("export", "\n".join(lines)) == [] and KEY_MARKER in lines[1] and KEY_MARKER in lines[2]
    imported = Store.open(tmp_path / "other.db")
    assert imported.import_lines(lines) == ["old1"]  # still a valid export
    imported.close()


@pytest.mark.usefixtures("planted_env")
async def test_a_key_in_the_goal_or_rules_never_reaches_the_model(tmp_path: Path) -> None:
    from loopterm.core import Loop, LoopState
    from loopterm.core.engine import Engine
    from loopterm.core.model import ModelReply

    sent: list[Any] = []

    class Capturing:
        temperature = 0.0

        def estimate(self, messages: list[Any], max_output_tokens: int) -> tuple[int, float]:
            return 100, 0.0

        async def complete(self, messages: list[Any], *, iteration: int, call_index: int = 0) -> ModelReply:
            sent.append(messages)
            text = json.dumps(decision(None, subgoal="done", reasoning=f"copying {SHAPED['aws']}"))
            return ModelReply(text=text, tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=0.0, model="c", calls=1)

    (tmp_path / ".loopterm").mkdir()
    (tmp_path / ".loopterm" / "RULES.md").write_text(f"Deploy with {ENV_KEYS['GITHUB_TOKEN']}.")
    loop = Loop(name="goal", goal=f"Call the API with {SHAPED['project']}.", tools=[], state=LoopState,
                system_prompt=f"You hold Authorization: Bearer {SHAPED['bearer']}", max_iterations=1,
                model="openai/gpt-4o-mini")
    store = Store.open(tmp_path / "t.db")
    engine = Engine.create(loop, store, loop_ref="test:goal", workspace_root=tmp_path / "ws", workdir=tmp_path,
                           client=Capturing())
    await engine.run()
    record = store.get_iteration(engine.run_id, 1)
    store.close()
    assert "[redacted:GITHUB_TOKEN]" in json.dumps(sent) and leaks("sent to the model", json.dumps(sent)) == []
    assert record is not None and leaks("stored", record.model_dump_json()) == []
    assert leaks("files", b"".join(p.read_bytes() for p in tmp_path.glob("t.db*"))) == []


async def test_a_key_a_person_types_into_a_command_is_redacted_as_it_enters(tmp_path: Path) -> None:
    """A fact added from the TUI or `watch` reaches the state, the prompt and the events redacted (the commands
    table keeps what was sent: it is the person's own input, written before the engine sees it)."""
    from loopterm.core import Loop, LoopState
    from loopterm.core.engine import Engine
    from loopterm.core.model import check_model

    script = tmp_path / "s.json"
    script.write_text(json.dumps({"turns": [{"content": decision(None, subgoal="look", reasoning="r")}] * 2}))
    loop = Loop(name="cmd", goal="Look.", tools=[], state=LoopState, script=script, max_iterations=2, stall_window=None)
    check_model(loop.model, loop.script)
    store = Store.open(tmp_path / "t.db")
    engine = Engine.create(loop, store, loop_ref="test:cmd", workspace_root=tmp_path / "ws", workdir=tmp_path)
    store.add_command(engine.run_id, "add_fact", {"fact": f"deploy with {SHAPED['project']}", "reason": "a person"})
    await engine.run()
    states = json.dumps([r.state for r in store.iterations(engine.run_id)])
    prompts = json.dumps([r.prompt for r in store.iterations(engine.run_id)])
    events = json.dumps([to_stored(e.event)[1] for e in store.events(engine.run_id)])
    store.close()
    assert f"deploy with {KEY_MARKER}" in states and f"deploy with {KEY_MARKER}" in events
    assert leaks("state", states) + leaks("prompt", prompts) + leaks("events", events) == []
