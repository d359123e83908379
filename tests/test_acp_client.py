"""The ACP client against a real ACP agent process (the scripted agent), over its stdio."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("acp")

from acp import update_agent_message, update_agent_message_text  # noqa: E402

from loopterm.core import acp_client  # noqa: E402
from loopterm.core.acp_client import AcpSession, AgentStartError  # noqa: E402
from loopterm.core.acp_turn import TEXT_CAP, AgentPermission, AgentToolCall, AgentTurn  # noqa: E402
from loopterm.core.agent_spec import AgentSpec  # noqa: E402

AGENT = [sys.executable, "-m", "loopterm.examples.agent_fix.scripted_agent"]


class Decider:
    """A permission callback that records what it was asked."""

    def __init__(self, outcome: str = "allow_once") -> None:
        self.outcome = outcome
        self.asked: list[tuple[AgentToolCall, list[str]]] = []

    async def __call__(self, call: AgentToolCall, offered: list[str]) -> AgentPermission:
        self.asked.append((call, offered))
        return AgentPermission(outcome=self.outcome, decided_by="policy")  # type: ignore[arg-type]


def script(tmp_path: Path, *turns: list[dict[str, Any]]) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"turns": list(turns)}))
    return path


def spec_for(path: Path, **fields: Any) -> AgentSpec:
    env = {"LOOPTERM_SCRIPTED_AGENT_SESSIONS": str(path.parent / "sessions")}
    env.update(fields.pop("env", {}))
    return AgentSpec(name="scripted", command=[*AGENT, str(path)], env=env, **fields)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "a.py").write_text("x = 1\n")
    return folder


async def open_session(tmp_path: Path, work: Path, *turns: list[dict[str, Any]], decider: Decider | None = None,
                       **fields: Any) -> AcpSession:
    return await AcpSession.open(
        spec_for(script(tmp_path, *turns), **fields), work, permission=decider or Decider(),
        stderr=tmp_path / "agent.stderr",
    )


async def test_a_turn_with_message_thought_plan_and_an_allowed_edit(tmp_path: Path, work: Path) -> None:
    decider = Decider("allow_once")
    session = await open_session(
        tmp_path, work,
        [{"think": "look at a.py"}, {"plan": [{"content": "fix a", "status": "in_progress"}]},
         {"edit": {"path": "a.py", "text": "x = 2\n", "ask": True}}, {"say": "fixed it"}],
        decider=decider,
    )
    try:
        seen: list[int] = []
        turn = await session.prompt("fix a.py", on_update=lambda t: seen.append(t.updates))
    finally:
        await session.close()
    assert (work / "a.py").read_text() == "x = 2\n"
    assert turn.stop_reason == "end_turn" and turn.ended_by == "agent"
    assert turn.message == "fixed it" and turn.thoughts == "look at a.py"
    assert [p.content for p in turn.plan] == ["fix a"]
    (call,) = turn.tool_calls
    assert call.kind == "edit" and call.status == "completed" and call.locations == ["a.py"]
    assert call.diffs[0].path == "a.py" and call.diffs[0].old_text == "x = 1\n" and call.diffs[0].new_text == "x = 2\n"
    assert "permission: allow_once" in call.output  # the agent got the allow_once option, not allow_always
    (asked_call, offered) = decider.asked[0]
    assert asked_call.diffs and asked_call.diffs[0].path == "a.py"  # the callback sees the diff it decides on
    assert offered == ["allow_once", "allow_always", "reject_once", "reject_always"]
    (perm,) = turn.permissions
    assert perm.outcome == "allow_once" and perm.tool_call_id == call.id and perm.paths == ["a.py"]
    assert perm.kind == "edit" and perm.offered == offered
    assert seen and seen == sorted(seen) and turn.updates == seen[-1]
    assert session.session_id and session.origin == "new" and session.agent_info.startswith("scripted-agent")


async def test_a_denied_edit_is_not_written_and_never_answered_always(tmp_path: Path, work: Path) -> None:
    session = await open_session(
        tmp_path, work, [{"edit": {"path": "a.py", "text": "x = 2\n", "ask": True}}], decider=Decider("reject_once")
    )
    try:
        turn = await session.prompt("fix")
    finally:
        await session.close()
    assert (work / "a.py").read_text() == "x = 1\n"
    assert turn.tool_calls[0].status == "failed" and "permission: reject_once" in turn.tool_calls[0].output
    assert turn.permissions[0].outcome == "reject_once"


async def test_cancel_during_a_sleep_ends_the_turn_at_once(tmp_path: Path, work: Path) -> None:
    import asyncio

    session = await open_session(tmp_path, work, [{"say": "working"}, {"sleep": 30}, {"say": "never"}])
    try:
        task = asyncio.ensure_future(session.prompt("go"))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await session.cancel(note="pressed stop")
        turn = await asyncio.wait_for(task, 5)
        elapsed = time.monotonic() - started
        assert session.alive
    finally:
        await session.close()
    assert turn.stop_reason == "cancelled" and turn.ended_by == "person" and turn.note == "pressed stop"
    assert elapsed < 2.0 and turn.message == "working"


async def test_a_runaway_is_stopped_by_max_tool_calls(tmp_path: Path, work: Path) -> None:
    session = await open_session(tmp_path, work, [{"runaway": True}], max_tool_calls=5)
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    assert turn.ended_by == "limit" and "max_tool_calls (5)" in turn.note
    assert turn.stop_reason == "cancelled" and 5 < len(turn.tool_calls) < 20


async def test_a_runaway_is_stopped_by_the_turn_timeout(tmp_path: Path, work: Path) -> None:
    session = await open_session(tmp_path, work, [{"runaway": True}], turn_timeout_s=0.6)
    try:
        started = time.monotonic()
        turn = await session.prompt("go")
        elapsed = time.monotonic() - started
    finally:
        await session.close()
    assert turn.ended_by == "limit" and "turn_timeout_s" in turn.note and turn.stop_reason == "cancelled"
    assert 0.5 < elapsed < 3.0 and len(turn.tool_calls) > 5


async def test_an_agent_ignoring_the_cancel_is_killed_after_the_grace(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acp_client, "CANCEL_GRACE_S", 0.5)
    session = await open_session(tmp_path, work, [{"ignore_cancel": True}, {"sleep": 30}], turn_timeout_s=0.5)
    try:
        started = time.monotonic()
        turn = await session.prompt("go")
        elapsed = time.monotonic() - started
        assert not session.alive
        again = await session.prompt("again")
    finally:
        await session.close()
    assert turn.ended_by == "limit" and "killed" in turn.note and turn.stop_reason is None
    assert elapsed < 3
    assert again.ended_by == "crash" and again.note == "the agent is not running"


async def test_a_crash_mid_turn_then_the_session_loads_in_a_new_process(tmp_path: Path, work: Path) -> None:
    path = script(tmp_path, [{"say": "first"}], [{"say": "half"}, {"crash": True}], [{"say": "third"}])
    spec = spec_for(path)
    first = await AcpSession.open(spec, work, permission=Decider(), stderr=tmp_path / "e1")
    try:
        one = await first.prompt("one")
        two = await first.prompt("two")
        assert not first.alive
    finally:
        await first.close()
    assert one.message == "first" and one.ended_by == "agent"
    assert two.ended_by == "crash" and "code 3" in two.note and two.message == "half"
    second = await AcpSession.open(spec, work, permission=Decider(), stderr=tmp_path / "e2",
                                   load_session_id=first.session_id)
    try:
        assert second.origin == "loaded" and second.session_id == first.session_id and second.can_load
        three = await second.prompt("three")
    finally:
        await second.close()
    assert three.message == "third" and three.session_origin == "loaded" and three.stop_reason == "end_turn"
    assert three.message != "first"  # the replayed history is not this turn's reply


async def test_fork_opens_a_new_session_with_the_history(tmp_path: Path, work: Path) -> None:
    path = script(tmp_path, [{"say": "a"}], [{"say": "b"}])
    spec = spec_for(path)
    first = await AcpSession.open(spec, work, permission=Decider(), stderr=tmp_path / "e1")
    try:
        await first.prompt("one")
    finally:
        await first.close()
    forked = await AcpSession.open(spec, work, permission=Decider(), stderr=tmp_path / "e2",
                                   fork_session_id=first.session_id)
    try:
        assert forked.origin == "forked" and forked.session_id != first.session_id
        turn = await forked.prompt("next")  # the fork's second prompt: its history came along
    finally:
        await forked.close()
    assert turn.message == "b" and turn.session_origin == "forked"
    with pytest.raises(AgentStartError, match="use_fork"):
        await AcpSession.open(spec.model_copy(update={"use_fork": False}), work, permission=Decider(),
                              stderr=tmp_path / "e3", fork_session_id=first.session_id)


async def test_a_write_outside_the_worktree_is_refused_and_recorded(tmp_path: Path, work: Path) -> None:
    outside = tmp_path / "outside.txt"
    (work / "link").symlink_to(tmp_path)
    session = await open_session(
        tmp_path, work,
        [{"edit": {"path": str(outside), "text": "pwned", "via_client": True}},
         {"edit": {"path": "link/outside2.txt", "text": "pwned", "via_client": True}},
         {"edit": {"path": "b.py", "text": "y = 1\n", "via_client": True}}],
    )
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    assert not outside.exists() and not (tmp_path / "outside2.txt").exists()
    assert turn.refused_paths == [str(outside), str(work / "link/outside2.txt")]
    assert [c.status for c in turn.tool_calls] == ["failed", "failed", "completed"]
    assert (work / "b.py").read_text() == "y = 1\n" and turn.writes == ["b.py"]


async def test_an_update_before_its_tool_call_is_merged(tmp_path: Path, work: Path) -> None:
    session = await open_session(
        tmp_path, work,
        [{"update": {"id": "t1", "status": "completed", "output": "done early"}},
         {"tool": {"id": "t1", "title": "grep", "kind": "search", "locations": ["a.py", "/etc/hosts"]}}],
    )
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    (call,) = turn.tool_calls
    assert call.title == "grep" and call.kind == "search" and call.output == "done early"
    assert call.locations == ["a.py", "/etc/hosts"]
    assert call.status == "completed"  # the start came later: older news, it does not undo the update


async def test_usage_cost_is_each_turns_delta(tmp_path: Path, work: Path) -> None:
    session = await open_session(
        tmp_path, work,
        [{"usage": {"tokens_in": 100, "tokens_out": 10, "cost_total": 0.25, "context_used": 500, "context_size": 1000}},
         {"usage": {"cost_total": 0.5, "context_used": 600, "context_size": 1000}}],
        [{"usage": {"tokens_in": 7, "cost_total": 0.75, "context_used": 700, "context_size": 1000}}],
    )
    try:
        one = await session.prompt("one")
        two = await session.prompt("two")
    finally:
        await session.close()
    assert one.usage.cost_usd == pytest.approx(0.5) and one.usage.session_cost_usd == pytest.approx(0.5)
    assert one.usage.tokens_in == 100 and one.usage.tokens_out == 10 and one.usage.context_used == 600
    assert two.usage.cost_usd == pytest.approx(0.25) and two.usage.session_cost_usd == pytest.approx(0.75)
    assert two.usage.tokens_in == 7 and two.usage.context_size == 1000


async def test_over_budget_cancels_the_turn(tmp_path: Path, work: Path) -> None:
    session = await open_session(
        tmp_path, work,
        [{"usage": {"cost_total": 0.1}}, {"usage": {"cost_total": 2.0}}, {"sleep": 30}, {"say": "never"}],
    )
    try:
        turn = await session.prompt(
            "go", over_budget=lambda u: f"turn spent ${u.cost_usd:.2f} (> $1)" if u.cost_usd > 1 else None
        )
    finally:
        await session.close()
    assert turn.ended_by == "budget" and turn.note == "turn spent $2.00 (> $1)" and turn.stop_reason == "cancelled"
    assert turn.message == ""


async def test_a_megabyte_of_stderr_does_not_block_and_a_long_line_arrives_whole(tmp_path: Path, work: Path) -> None:
    long = "".join(chr(ord("a") + i % 26) for i in range(300_000))  # each chunk's line is over 64 KiB
    session = await open_session(tmp_path, work, [{"noise": 1_000_000}, {"say": long}])
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    assert turn.stop_reason == "end_turn"
    assert turn.message.startswith(long[:TEXT_CAP])
    assert "more characters not kept" in turn.message  # capped, but whole up to the cap
    assert (tmp_path / "agent.stderr").stat().st_size > 1_000_000


async def test_the_agent_sees_only_declared_environment(tmp_path: Path, work: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTERM_TEST_SECRET", "hunter2")
    monkeypatch.setenv("LOOPTERM_TEST_DECLARED", "passed-on")
    session = await open_session(
        tmp_path, work, [{"run": {"argv": ["env"]}}], env={"SET_HERE": "1"}, env_from=["LOOPTERM_TEST_DECLARED"]
    )
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    names = {line.split("=", 1)[0] for line in turn.tool_calls[0].output.splitlines() if "=" in line}
    assert "LOOPTERM_TEST_SECRET" not in names and "hunter2" not in turn.tool_calls[0].output
    assert "LOOPTERM_TEST_DECLARED=passed-on" in turn.tool_calls[0].output and "SET_HERE" in names
    allowed = set(acp_client.BASE_ENV) | {"LOOPTERM_TEST_DECLARED", "SET_HERE", "LOOPTERM_SCRIPTED_AGENT_SESSIONS"}
    # Python itself and `env` add none of loopterm's variables; what the OS adds is not loopterm's to declare.
    assert not {n for n in names if n.startswith("LOOPTERM")} - allowed


async def test_a_command_that_does_not_exist_is_one_clear_line(tmp_path: Path, work: Path) -> None:
    spec = AgentSpec(command=["no-such-agent-anywhere", "--acp"])
    with pytest.raises(AgentStartError) as info:
        await AcpSession.open(spec, work, permission=Decider(), stderr=tmp_path / "e")
    assert "no-such-agent-anywhere" in str(info.value) and "\n" not in str(info.value)


async def test_an_agent_exiting_at_start_names_its_stderr(tmp_path: Path, work: Path) -> None:
    spec = AgentSpec(command=[*AGENT, str(tmp_path / "missing.json")])
    with pytest.raises(AgentStartError) as info:
        await AcpSession.open(spec, work, permission=Decider(), stderr=tmp_path / "e")
    message = str(info.value)
    assert "exited at start (code 2)" in message and "cannot read the script" in message and "\n" not in message



async def test_a_rejected_edit_retried_forever_is_stopped_by_the_timeout(tmp_path: Path, work: Path) -> None:
    session = await open_session(
        tmp_path, work, [{"edit": {"path": "a.py", "text": "x = 9\n", "ask": True, "on_reject": "retry"}}],
        decider=Decider("reject_once"), turn_timeout_s=0.7,
    )
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    assert (work / "a.py").read_text() == "x = 1\n"
    assert turn.ended_by == "limit" and turn.stop_reason == "cancelled" and len(turn.permissions) > 3
    assert {p.outcome for p in turn.permissions} <= {"reject_once", "cancelled"}


def test_apply_reads_markers_locations_and_unknown_updates(tmp_path: Path) -> None:
    from acp.schema import AvailableCommandsUpdate, ImageContentBlock, ToolCallLocation, ToolCallProgress

    from loopterm.core.acp_updates import apply

    turn = AgentTurn(agent="a")
    apply(turn, update_agent_message_text("see "), cwd=tmp_path)
    apply(turn, update_agent_message(ImageContentBlock(type="image", data="AAAA", mime_type="image/png")), cwd=tmp_path)
    apply(turn, ToolCallProgress(session_update="tool_call_update", tool_call_id="t", status="in_progress",
                                 locations=[ToolCallLocation(path=str(tmp_path / "src/x.py")),
                                            ToolCallLocation(path="/elsewhere/y.py")]), cwd=tmp_path)
    apply(turn, AvailableCommandsUpdate(session_update="available_commands_update", available_commands=[]),
          cwd=tmp_path)
    assert turn.message == "see [image]" and turn.updates == 4
    assert turn.tool_calls[0].locations == ["src/x.py", "/elsewhere/y.py"]
    assert turn.tool_calls[0].status == "in_progress" and turn.tool_calls[0].title == ""


@pytest.mark.parametrize(
    ("offer", "answered"),
    [(["allow_always", "reject_once", "reject_always"], "reject_once"), (["allow_always", "reject_always"], "cancelled")],
)
async def test_allow_once_not_offered_is_never_answered_always(
    tmp_path: Path, work: Path, offer: list[str], answered: str
) -> None:
    session = await open_session(
        tmp_path, work, [{"edit": {"path": "a.py", "text": "x = 2\n", "ask": True, "offer": offer}}],
        decider=Decider("allow_once"),
    )
    try:
        turn = await session.prompt("go")
    finally:
        await session.close()
    assert (work / "a.py").read_text() == "x = 1\n"
    assert f"permission: {answered}" in turn.tool_calls[0].output  # what the agent actually received
    (perm,) = turn.permissions
    assert perm.outcome == answered and perm.offered == offer and "allow_once not offered" in perm.reason


async def test_a_permission_pending_when_the_turn_is_cancelled_is_answered_cancelled(
    tmp_path: Path, work: Path
) -> None:
    import asyncio

    async def never(call: AgentToolCall, offered: list[str]) -> AgentPermission:
        await asyncio.sleep(60)  # a person who never answers
        raise AssertionError("not reached")

    session = await AcpSession.open(
        spec_for(script(tmp_path, [{"edit": {"path": "a.py", "text": "x = 2\n", "ask": True}}]), turn_timeout_s=0.5),
        work, permission=never, stderr=tmp_path / "e",
    )
    try:
        task = asyncio.ensure_future(session.prompt("go"))
        await asyncio.sleep(1.5)  # past turn_timeout_s: a person deciding does not count against it
        assert not task.done()
        await session.cancel("person", "stopped by a person")
        turn = await asyncio.wait_for(task, 5)
        assert session.alive
    finally:
        await session.close()
    assert (work / "a.py").read_text() == "x = 1\n"
    assert turn.ended_by == "person" and turn.stop_reason == "cancelled"
    (perm,) = turn.permissions
    assert perm.outcome == "cancelled" and perm.decided_by == "stopped" and perm.paths == ["a.py"]


async def test_closing_during_a_turn_ends_it(tmp_path: Path, work: Path) -> None:
    import asyncio

    session = await open_session(tmp_path, work, [{"say": "busy"}, {"sleep": 30}])
    task = asyncio.ensure_future(session.prompt("go"))
    await asyncio.sleep(0.5)
    await session.close()
    turn = await asyncio.wait_for(task, 5)
    assert turn.ended_by == "person" and "closed" in turn.note and turn.stop_reason is None
    assert turn.message == "busy" and not session.alive


async def test_a_caller_abandoning_the_turn_cancels_it_at_the_agent(tmp_path: Path, work: Path) -> None:
    import asyncio

    session = await open_session(tmp_path, work, [{"say": "busy"}, {"sleep": 30}, {"say": "late"}], [{"say": "next"}])
    try:
        task = asyncio.ensure_future(session.prompt("go"))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        turn = await asyncio.wait_for(session.prompt("again"), 5)  # the agent stopped the first turn
    finally:
        await session.close()
    assert turn.message == "next" and turn.stop_reason == "end_turn"
    log = (tmp_path / "agent.stderr").read_text()
    assert "scripted-agent: cancel\n" in log and "turn ends: cancelled" in log


async def test_an_agent_error_answer_is_a_turn_ended_by_error(tmp_path: Path, work: Path) -> None:
    session = await open_session(tmp_path, work, [{"say": "hi"}, {"dance": True}])
    try:
        turn = await session.prompt("go")
        assert session.alive
    finally:
        await session.close()
    assert turn.stop_reason is None and turn.ended_by == "error" and turn.message == "hi"
    assert "answered the prompt with an error" in turn.note and "'dance'" in turn.note
