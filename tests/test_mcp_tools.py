"""MCP servers as loop tools, against a real MCP server no one here wrote: mcp-server-git (PyPI),
started with `sys.executable -m mcp_server_git` on a git repository each test creates.

The streamable-HTTP transport and a server dying in the middle of a call are tested against a
small server built with the SDK's MCPServer (tests/mcp_test_server.py), on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loopterm.core import CommandGate, Loop
from loopterm.core.control import Approve, command_payload
from loopterm.core.engine import Engine
from loopterm.core.fold import fold
from loopterm.core.events import IterationCommitted, IterationStarted
from loopterm.core.mcp_servers import McpServer, McpStartError, ToolPolicy
from loopterm.core.mcp_tools import McpTools
from loopterm.store import Store
from loopterm.core import runlog
from tests.loopkit import decision, make_engine, make_loop, of

HERE = Path(__file__).resolve().parent
TEST_SERVER = str(HERE / "mcp_test_server.py")
CLI = [sys.executable, "-m", "loopterm.tui.cli"]
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True, text=True,
                          check=True, stdin=subprocess.DEVNULL)
    return done.stdout.strip()


def make_repo(repo: Path) -> None:
    """A repository with one commit and an uncommitted change (README edited, NOTES.md new)."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Test Author")
    git(repo, "config", "user.email", "test@loopterm.invalid")
    (repo / "README.md").write_text("hello\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "-q", "-m", "first commit: add the README")
    (repo / "README.md").write_text("hello\nworld\n")
    (repo / "NOTES.md").write_text("notes\n")


def git_server(**kwargs: Any) -> McpServer:
    return McpServer(name="git", command=["{python}", "-m", "mcp_server_git", "--repository", "{workspace}/repo"],
                     **kwargs)


# Passes when repo/ has a clean working tree and two commits.
COMMITTED = CommandGate(name="committed", argv=["{python}", "-c", (
    "import subprocess, sys\n"
    "out = lambda *a: subprocess.run(['git', '-C', 'repo', *a], capture_output=True, text=True).stdout.strip()\n"
    "dirty, n = out('status', '--porcelain'), out('rev-list', '--count', 'HEAD')\n"
    "sys.exit(f'dirty: {dirty!r}, {n} commit(s)' if dirty or n != '2' else 0)\n")])


def git_loop(tmp_path: Path, turns: list[Any], **kwargs: Any) -> Loop:
    fields: dict[str, Any] = {"tools": [], "gates": [COMMITTED], "mcp_servers": [git_server()],
                              "setup": lambda ws: make_repo(ws / "repo"), "max_iterations": 6, "stall_window": None}
    fields.update(kwargs)
    return make_loop(tmp_path, turns, name="mcpgit", **fields)


def turn(tool_name: str, subgoal: str = "", **args: Any) -> dict[str, Any]:
    return {"content": decision(tool_name, subgoal=subgoal or tool_name, **args)}


def servers_running(marker: str, wait: float = 5.0) -> list[int]:
    """Processes whose command line mentions `marker` (a test's own repository path or server script), once
    they had `wait` seconds to go (a killed process takes a moment to leave the process table)."""
    deadline = time.monotonic() + wait
    while (found := _running(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and "mcp" in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def server_pids(engine: Engine) -> list[int]:
    from loopterm.core.hooks import McpServers

    mcp = next((hook.tools for hook in engine.hooks if isinstance(hook, McpServers)), None)
    return [c.process.pid for c in mcp.connections.values() if c.process is not None] if mcp else []


# ----------------------------------------------------------------------------- listing


async def test_tools_are_listed_with_their_own_schemas_and_a_policy_from_their_annotations(tmp_path: Path) -> None:
    make_repo(tmp_path / "repo")
    mcp = McpTools([git_server(overrides={"git_add": ToolPolicy(needs_approval=True)})], tmp_path)
    try:
        tools = {t.name: t for t in await mcp.start()}
        pid = mcp.connections["git"].process.pid
        assert {"git_status", "git_log", "git_add", "git_commit", "git_reset", "git_diff_unstaged"} <= set(tools)
        # The model sees the server's schema as given (not a pydantic rendering of it).
        add = tools["git_add"].schema()
        assert add["required"] == ["repo_path", "files"] and add["properties"]["files"]["minItems"] == 1
        assert '"minItems": 1' in tools["git_add"].prompt_line() and "[MCP git]" in tools["git_add"].prompt_line()
        # readOnlyHint: no side effects; the others have side effects, idempotent only when they say so,
        # and an approval when destructive (git_reset) or when a person said so (git_add).
        status, commit, reset = tools["git_status"], tools["git_commit"], tools["git_reset"]
        assert (status.side_effects, status.idempotent, status.needs_approval) == (False, True, False)
        assert (commit.side_effects, commit.idempotent, commit.needs_approval) == (True, False, False)
        assert (reset.side_effects, reset.needs_approval) == (True, True)
        assert (tools["git_add"].side_effects, tools["git_add"].idempotent, tools["git_add"].needs_approval) == (True, True, True)
        assert commit.rewind_policy == "ask" and status.rewind_policy == "reexecute"
    finally:
        await mcp.close()
    assert not servers_running(str(tmp_path)), "the server outlived close()"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_allow_list_and_prefix_and_name_clashes(tmp_path: Path) -> None:
    make_repo(tmp_path / "repo")
    mcp = McpTools([git_server(tools=["git_log", "git_status"], prefix="vcs_")], tmp_path)
    try:
        assert sorted(t.name for t in await mcp.start()) == ["vcs_git_log", "vcs_git_status"]
    finally:
        await mcp.close()
    for server, taken, expected in [
        (git_server(tools=["git_lgo"]), set(), "MCP server 'git' has no tool 'git_lgo' (it offers: "),
        (git_server(), {"git_log"}, "offers a tool named 'git_log', which the loop already has; give the server a `prefix`"),
        (git_server(overrides={"git_psuh": ToolPolicy(needs_approval=True)}), set(), "`overrides` names tools it does not offer: 'git_psuh'"),
    ]:
        mcp = McpTools([server], tmp_path)
        with pytest.raises(McpStartError, match=None) as caught:
            await mcp.start(taken=taken)
        await mcp.close()
        assert expected in str(caught.value)
    assert not servers_running(str(tmp_path))


# ----------------------------------------------------------------------------- calls in a run


async def test_a_read_only_call_returns_the_real_output_and_invalid_arguments_are_refused_by_the_schema(tmp_path: Path) -> None:
    turns = [
        # files=[] breaks the server's schema (minItems 1), and repo_path is missing: a repair, then a valid call
        [{"content": decision("git_add", files=[])}, {"content": decision("git_log", repo_path="repo", max_count=5)}],
        turn("git_status", repo_path="repo"),
    ]
    engine, store = make_engine(tmp_path, git_loop(tmp_path, turns, max_iterations=2, gates=[]))
    final = await engine.run()
    assert final.status == "terminated" and final.termination_reason == "max_iterations", final.message
    repo = Path(final.workspace) / "repo"
    first, second = store.iterations(final.id)
    log = first.tool_result
    assert log["ok"] and log["tool"] == "git_log"
    assert git(repo, "rev-parse", "HEAD") in log["output"] and "first commit: add the README" in log["output"]
    assert second.tool_result["ok"] and "NOTES.md" in second.tool_result["output"] and "README.md" in second.tool_result["output"]
    invalid = of(store.events(final.id), runlog.InvalidReply)
    assert len(invalid) == 1
    error = invalid[0].error
    assert error.startswith("invalid arguments for tool 'git_add': ")
    assert "'repo_path' is a required property" in error and "files: [] should be non-empty" in error
    assert git(repo, "diff", "--cached", "--name-only") == ""  # the refused call never reached the server
    connected = next(iter(of(store.events(final.id), runlog.McpConnected)))
    assert "git_commit" in connected.tools
    assert not servers_running(str(tmp_path))
    store.close()


async def test_a_server_error_is_a_failed_call_the_model_sees_and_the_run_goes_on(tmp_path: Path) -> None:
    turns = [turn("git_log", repo_path="/etc"), turn("git_status", repo_path="repo")]
    engine, store = make_engine(tmp_path, git_loop(tmp_path, turns, max_iterations=2, gates=[]))
    final = await engine.run()
    assert final.termination_reason == "max_iterations"
    first, second = store.iterations(final.id)
    assert not first.tool_result["ok"] and "outside the allowed repository" in first.tool_result["error"]
    assert second.tool_result["ok"]
    assert "outside the allowed repository" in json.dumps(second.prompt)  # the model was shown the error
    store.close()


async def test_a_side_effect_waits_for_approval_and_runs_exactly_once_across_resumes(tmp_path: Path) -> None:
    # A gate that stalls once, right after the commit: the run is interrupted there, after the call finished
    # and before its iteration was committed.
    stall_once = CommandGate(name="stall_once", argv=["{python}", "-c", (
        "import os, subprocess, time\n"
        "n = subprocess.run(['git', '-C', 'repo', 'rev-list', '--count', 'HEAD'], capture_output=True, text=True).stdout.strip()\n"
        "if n == '2' and not os.path.exists('stalled'):\n"
        "    open('stalled', 'w').close(); time.sleep(60)\n")])
    turns = [turn("git_add", repo_path="repo", files=["README.md", "NOTES.md"]),
             turn("git_commit", repo_path="repo", message="second commit: notes")]
    loop = git_loop(tmp_path, turns, gates=[stall_once, COMMITTED],
                    mcp_servers=[git_server(overrides={"git_commit": ToolPolicy(needs_approval=True)})])
    engine, store = make_engine(tmp_path, loop)
    final = await engine.run()
    repo = Path(final.workspace) / "repo"
    assert final.status == "escalated" and "tool 'git_commit' needs approval (iteration 2)" in final.message
    assert git(repo, "rev-list", "--count", "HEAD") == "1"  # nothing committed without a person
    assert not servers_running(str(tmp_path))
    pending = next(iter(of(store.events(final.id), runlog.ApprovalPending)))
    assert list(fold(store.events(final.id)).approvals) == [pending.key]
    store.add_command(final.id, *command_payload(Approve(key=pending.key, reason="looks right")))

    resumed = Engine(loop, store, store.get_run(final.id))
    task = asyncio.create_task(resumed.run())
    deadline = asyncio.get_running_loop().time() + 60
    while not (repo.parent / "stalled").exists():
        assert asyncio.get_running_loop().time() < deadline and not task.done(), "the commit never happened"
        await asyncio.sleep(0.05)
    task.cancel()  # the process "dies" with the commit made and its iteration not committed
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.get_run(final.id).status == "stopped" and len(store.iterations(final.id)) == 1
    assert git(repo, "rev-list", "--count", "HEAD") == "2"

    final = await Engine(loop, store, store.get_run(final.id)).run()
    assert final.status == "converged", final.message
    assert git(repo, "rev-list", "--count", "HEAD") == "2"  # the commit was not made a second time
    assert git(repo, "log", "-1", "--format=%s") == "second commit: notes"
    record = store.iterations(final.id)[-1]
    assert record.tool_call["approval"] == "approve" and record.tool_result["reused"] is True
    assert record.tool_result["ok"] and git(repo, "rev-parse", "HEAD") in record.tool_result["output"]
    assert not servers_running(str(tmp_path))
    store.close()


# ----------------------------------------------------------------------------- servers that fail


def test_a_server_command_that_does_not_exist_is_one_line_and_a_failed_run(tmp_path: Path) -> None:
    loop_file = tmp_path / "broken.py"
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"turns": [{"content": decision("nothing")}]}))
    loop_file.write_text(
        "from loopterm.core import Loop, McpServer\n"
        f"loop = Loop(name='broken', goal='g', script={str(script)!r},\n"
        "            mcp_servers=[McpServer(name='git', command=['loopterm-no-such-mcp-server', '--stdio'])])\n")
    db = tmp_path / "db.sqlite"
    done = subprocess.run([*CLI, "run", str(loop_file), "--headless", "--db", str(db)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    line = ("MCP server 'git' failed to start: cannot run 'loopterm-no-such-mcp-server' (No such file or directory) "
            "(check the command in the loop file)")
    assert line in " ".join(done.stdout.replace("│", " ").split())  # the run summary's reason, wrapped in its box
    assert "Traceback" not in done.stdout + done.stderr
    runs = json.loads(subprocess.run([*CLI, "runs", "--json", "--db", str(db)], capture_output=True, text=True,
                                     timeout=60).stdout)
    assert [(r["status"], r["iterations"], r["message"]) for r in runs] == [("failed", 0, line)]


async def test_a_server_that_exits_before_initialize_or_never_answers_is_one_line(tmp_path: Path) -> None:
    cases = [
        (["{python}", "-c", "import sys; print('no repository here', file=sys.stderr); sys.exit(3)"],
         "MCP server 'x' failed to start: it exited with code 3 before it was initialized (check the command in the "
         "loop file); its stderr: no repository here"),
        (["{python}", "-c", "import time; time.sleep(60)"],
         "MCP server 'x' failed to start: no answer to initialize within 1.5s (check the command in the loop file)"),
        (["{python}", "-m", "mcp_server_git", "--repository", str(tmp_path / "not-a-repo")],
         "MCP server 'x' failed to start: it exited with code 1 before it was initialized"),
    ]
    for command, expected in cases:
        # Only the server that never answers waits for the timeout; the others exit first, however long a
        # fresh machine takes to start Python (a short timeout there raced their exit).
        timeout = 1.5 if "time.sleep" in " ".join(command) else 60.0
        mcp = McpTools([McpServer(name="x", command=command, startup_timeout=timeout)], tmp_path)
        with pytest.raises(McpStartError) as caught:
            await mcp.start()
        await mcp.close()
        assert str(caught.value).startswith(expected), str(caught.value)
        assert "\n" not in str(caught.value)
    assert not servers_running(str(tmp_path))


async def test_a_server_killed_mid_run_fails_the_call_and_the_run_and_a_resume_reconnects(tmp_path: Path) -> None:
    turns = [
        turn("git_status", repo_path="repo"),
        {"content": decision("git_add", subgoal="stage", repo_path="repo", files=["README.md", "NOTES.md"]),
         "delay": 0.5},  # the model "thinks" while the killed server's exit is noticed
        turn("git_add", subgoal="stage again", repo_path="repo", files=["README.md", "NOTES.md"]),
        turn("git_commit", repo_path="repo", message="second commit"),
    ]
    loop = git_loop(tmp_path, turns)
    engine, store = make_engine(tmp_path, loop)
    killed: list[int] = []

    def kill_after_first(event: Any) -> None:
        if isinstance(event, IterationCommitted) and event.record.n == 1:
            killed.extend(server_pids(engine))
            os.kill(killed[0], signal.SIGKILL)

    engine.subscribe(kill_after_first)
    final = await engine.run()
    assert final.status == "failed" and final.termination_reason == "fatal_error"
    # Normally the exit is noticed while the model thinks ("git_add was not called"); on a loaded machine the
    # call may be sent first ("... during the call to git_add (it may or may not have taken effect)").
    assert final.message.startswith("MCP server 'git' was killed by SIGKILL (exit code -9)")
    assert "git_add was not called" in final.message or "during the call to git_add" in final.message
    assert final.message.endswith(f"; `loopterm resume {final.id}` reconnects and continues from iteration 3")
    records = store.iterations(final.id)
    assert len(records) == 2 and not records[1].tool_result["ok"]
    assert records[1].tool_result["error"].startswith("McpServerGone: MCP server 'git' was killed by SIGKILL")
    repo = Path(final.workspace) / "repo"
    assert git(repo, "diff", "--cached", "--name-only") == ""

    resumed = Engine(loop, store, store.get_run(final.id))
    pids: list[int] = []
    resumed.subscribe(lambda e: pids.extend(server_pids(resumed)) if isinstance(e, IterationStarted) else None)
    final = await resumed.run()
    assert final.status == "converged", final.message
    assert pids and killed[0] not in pids  # a new server process
    assert git(repo, "log", "-1", "--format=%s") == "second commit" and git(repo, "status", "--porcelain") == ""
    assert not servers_running(str(tmp_path))
    store.close()


async def test_a_server_that_dies_during_a_call_is_classified(tmp_path: Path) -> None:
    mcp = McpTools([McpServer(name="crashy", command=["{python}", TEST_SERVER, "stdio"])], tmp_path)
    try:
        tools = {t.name: t for t in await mcp.start()}
        assert await tools["shout"].fn(text="hi") == "HI"
        with pytest.raises(Exception) as caught:
            await tools["crash"].fn()
        assert type(caught.value).__name__ == "McpServerGone"
        assert str(caught.value) == ("MCP server 'crashy' exited with code 7 during the call to crash "
                                     "(it may or may not have taken effect)")
        assert mcp.check() == str(caught.value)
    finally:
        await mcp.close()
    assert not servers_running(TEST_SERVER)


async def test_a_call_that_takes_too_long_is_a_failed_call_and_the_server_keeps_serving(tmp_path: Path) -> None:
    mcp = McpTools([McpServer(name="t", command=["{python}", TEST_SERVER, "stdio"], call_timeout=0.5)], tmp_path)
    try:
        tools = {t.name: t for t in await mcp.start()}
        with pytest.raises(Exception) as caught:
            await tools["slow"].fn(seconds=5)
        assert (type(caught.value).__name__, str(caught.value)) == (
            "McpToolError", "MCP server 't' did not answer slow within 0.5s")
        assert await tools["slow"].fn(seconds=0) == "slept 0.0" and mcp.check() is None
    finally:
        await mcp.close()
    assert not servers_running(TEST_SERVER)


# ----------------------------------------------------------------------------- streamable HTTP


async def test_a_streamable_http_server_on_localhost(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, TEST_SERVER, "http"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/mcp"
        turns = [turn("shout", text="quiet please"), turn("whoami")]
        os.environ["LOOPTERM_TEST_MCP_TOKEN"] = "t0k3n-for-the-test"
        try:
            loop = make_loop(tmp_path, turns, name="mcphttp", tools=[], gates=[], max_iterations=2, mcp_servers=[
                McpServer(name="web", url=url, tools=["shout", "whoami"],
                          headers={"Authorization": "Bearer {env:LOOPTERM_TEST_MCP_TOKEN}"})])
            engine, store = make_engine(tmp_path, loop)
            final = await engine.run()
        finally:
            del os.environ["LOOPTERM_TEST_MCP_TOKEN"]
        assert final.termination_reason == "max_iterations", final.message
        shout, whoami = store.iterations(final.id)
        assert shout.tool_result["output"] == "QUIET PLEASE"
        # The server got the token from the environment, and the token never reached the store: the
        # server's echo of it is redacted like any secret in a tool's output.
        assert whoami.tool_result["output"] == "Bearer [redacted:LOOPTERM_TEST_MCP_TOKEN]"
        store.close()
        # The variable is gone now: one line before anything starts.
        mcp = McpTools(loop.mcp_servers, tmp_path)
        with pytest.raises(McpStartError) as caught:
            await mcp.start()
        await mcp.close()
        assert str(caught.value) == (
            "MCP server 'web' failed to start: its headers use {env:LOOPTERM_TEST_MCP_TOKEN}, but "
            "LOOPTERM_TEST_MCP_TOKEN is not set (set it, or fix `headers` in the loop file)")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    # Nobody listens there any more: refused, one line, before iteration 1.
    engine, store = make_engine(tmp_path / "again", make_loop(tmp_path, turns, name="mcphttp", tools=[], gates=[],
                                                              mcp_servers=[McpServer(name="web", url=url)]))
    final = await engine.run()
    assert final.status == "failed" and final.iterations == 0
    assert final.message.startswith(f"MCP server 'web' failed to start: cannot connect to {url} (")
    assert final.message.endswith("(check the url in the loop file)")
    store.close()


# ----------------------------------------------------------------------------- the loop definition


def test_the_spec_hash_covers_the_server_declarations_and_validation(tmp_path: Path) -> None:
    base = git_loop(tmp_path, [])
    assert base.spec_hash() != git_loop(tmp_path, [], mcp_servers=[]).spec_hash()
    assert base.spec_hash() != git_loop(tmp_path, [], mcp_servers=[git_server(prefix="v_")]).spec_hash()
    assert base.spec_hash() == git_loop(tmp_path, []).spec_hash()
    with pytest.raises(ValueError, match="give exactly one of `command` \\(stdio\\) or `url`"):
        McpServer(name="x")
    with pytest.raises(ValueError, match="`headers` are for a `url` server"):
        McpServer(name="x", command=["x"], headers={"A": "b"})
    with pytest.raises(ValueError, match="MCP server names must be unique; repeated: git"):
        git_loop(tmp_path, [], mcp_servers=[git_server(), git_server()])


def test_the_server_environment_has_no_credentials_unless_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-0000000000")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_notarealtoken000000000000000000000000")
    assert "OPENAI_API_KEY" not in git_server().environment()
    env = git_server(pass_env=["GITHUB_TOKEN"]).environment()
    assert env["GITHUB_TOKEN"].startswith("ghp_") and "OPENAI_API_KEY" not in env


# ----------------------------------------------------------------------------- the built-in example


def test_the_mcp_git_example_converges_offline_from_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "run", "mcp-git", "--headless"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "LOOPTERM_DB": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "converged" in done.stdout
    repo = next((tmp_path / ".loopterm" / "workspaces").iterdir()) / "repo"
    assert git(repo, "status", "--porcelain") == "" and git(repo, "rev-list", "--count", "HEAD") == "2"
    assert git(repo, "log", "-1", "--format=%s") == "Keep amounts in cents; start a changelog"
    assert not servers_running(str(tmp_path))


def test_the_example_replays_identically_and_a_branch_rebuilds_its_repository_through_the_server(tmp_path: Path) -> None:
    """The git server's effects stay in the workspace (workspace_only): a replay re-runs them in its own
    workspace, and a branch after `git_add` gets a workspace where the server staged the change again."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                              env={**os.environ, "LOOPTERM_DB": ""})

    assert cli("run", "mcp-git", "--headless").returncode == 0
    recorded = json.loads(cli("runs", "--json").stdout)[0]["id"]
    replayed = cli("replay", recorded)
    assert replayed.returncode == 0 and "identical" in replayed.stdout, replayed.stdout + replayed.stderr
    branched = cli("fork", recorded, "--at", "3", "--headless")
    assert branched.returncode == 0 and "converged at iteration 4" in branched.stdout, branched.stdout + branched.stderr
    runs = {r["origin"]: r for r in json.loads(cli("runs", "--json").stdout)}
    branch = Path(runs["fork"]["workspace"]) / "repo"
    assert git(branch, "log", "--format=%s") == "Keep amounts in cents; start a changelog\nInitial commit"
    assert git(branch, "status", "--porcelain") == ""
    assert not servers_running(str(tmp_path))


async def test_mcp_tool_calls_show_in_the_tui_like_any_tool(tmp_path: Path) -> None:
    from loopterm.core.model import check_model
    from loopterm.examples.mcp_git.loop import loop
    from tests.test_tui import SIZE, app_for, cell_text, status, until

    check_model(loop.model, loop.script)
    app = app_for(tmp_path, start=(loop, "mcp-git"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.timeline.row_count == 4 and status(app) == "converged", "converged", 60)
        assert [cell_text(app, row, "action") for row in range(4)] == [
            "git_status(repo)", "git_diff_unstaged(repo)", "git_add(repo)", "git_commit(repo)"]
        assert "✓committed" in cell_text(app, 3, "gates")
        app.timeline.focus()
        app.timeline.move_cursor(row=1)
        await pilot.pause()
        assert "+Amounts are kept in cents (integers), never floats." in app.detail.body("tool").plain
    assert not servers_running(str(tmp_path))


CRASH_LOOP = '''
import subprocess
from pathlib import Path
from loopterm.core import CommandGate, Loop, McpServer

def setup(workspace):
    repo = workspace / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)
    git("init", "-q", "-b", "main")
    git("config", "user.name", "Test Author")
    git("config", "user.email", "test@loopterm.invalid")
    (repo / "README.md").write_text("hello\\n")
    git("add", "README.md")
    git("commit", "-q", "-m", "first")
    (repo / "NOTES.md").write_text("notes\\n")

# After the commit, the first time: mark it, then hang (the test kills loopterm here).
HANG = ("import os, subprocess, time\\n"
        "n = subprocess.run(['git', '-C', 'repo', 'rev-list', '--count', 'HEAD'], capture_output=True, text=True).stdout\\n"
        "if n.strip() == '2' and not os.path.exists('hung'):\\n"
        "    open('hung', 'w').close(); time.sleep(120)\\n")

loop = Loop(
    name="mcpcrash", goal="commit NOTES.md", script=Path(__file__).parent / "script.json", setup=setup,
    mcp_servers=[McpServer(name="git", command=["{python}", "-m", "mcp_server_git", "--repository", "{workspace}/repo"])],
    gates=[CommandGate(name="hang_once", argv=["{python}", "-c", HANG]),
           CommandGate(name="clean", argv=["git", "-C", "repo", "diff", "--quiet", "HEAD"])],
    max_iterations=4,
    converged=lambda state, gates: bool(gates) and all(g.passed for g in gates) and state.iteration >= 2,
)
'''


def kill_sleeping_gate(tmp_path: Path) -> None:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(tmp_path) in os.readlink(entry / "cwd") and \
                    b"hung" in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def test_loopterm_killed_after_a_commit_leaves_no_server_and_the_resume_does_not_commit_again(tmp_path: Path) -> None:
    """A real crash (SIGKILL of `loopterm run`): the server exits with it (its stdin closes), and the resume
    answers the commit from the journal instead of committing a second time."""
    (tmp_path / "mcpcrash.py").write_text(CRASH_LOOP)
    turns = [turn("git_add", repo_path="repo", files=["NOTES.md"]),
             turn("git_commit", repo_path="repo", message="add the notes")]
    (tmp_path / "script.json").write_text(json.dumps({"turns": turns}))
    db = str(tmp_path / "db.sqlite")
    run = subprocess.Popen([*CLI, "run", str(tmp_path / "mcpcrash.py"), "--headless", "--db", db], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("workspaces/*/hung")):
        assert time.monotonic() < deadline and run.poll() is None, "the run never reached its commit"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    kill_sleeping_gate(tmp_path)  # the gate loopterm was waiting on is in a session of its own: not ours to leave
    assert not servers_running(str(tmp_path)), "the MCP server outlived a killed loopterm"
    repo = next(tmp_path.glob("workspaces/*/repo"))
    assert git(repo, "rev-list", "--count", "HEAD") == "2"

    run_id = repo.parent.name
    done = subprocess.run([*CLI, "resume", run_id, "--db", db], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert git(repo, "rev-list", "--count", "HEAD") == "2" and git(repo, "log", "-1", "--format=%s") == "add the notes"
    store = Store.open(Path(db))
    record = store.iterations(run_id)[-1]
    assert record.n == 2 and record.tool_result["reused"] is True and record.tool_result["ok"]
    store.close()
    assert not servers_running(str(tmp_path))


def test_a_dry_run_fork_names_the_mcp_calls_a_branch_may_make_again(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                              env={**os.environ, "LOOPTERM_DB": "", "COLUMNS": "300"})

    assert cli("run", "mcp-git", "--headless").returncode == 0
    recorded = json.loads(cli("runs", "--json").stdout)[0]["id"]
    planned = cli("fork", recorded, "--at", "2", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    lines = [" ".join(line.split()) for line in planned.stdout.splitlines() if "may reach again" in line]
    assert [line.split(": ", 1)[1].split("(")[0] for line in lines] == [f"iteration 3 of run {recorded}: git_add",
                                                                       f"iteration 4 of run {recorded}: git_commit"]
    assert all(line.endswith("-> policy from its MCP server's annotations") for line in lines)
