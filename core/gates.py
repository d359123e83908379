"""Verification gates: non-AI checks whose verdict, not the model's, decides convergence."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from loopterm.core.checkers import GateContext

from loopterm.core.secrets import redact, redact_capped, redact_tree, without_secrets


# Variables that change how common tools format their output (pytest stops truncating its
# summary under CI, and wraps to COLUMNS).
_OUTPUT_SHAPING = ("CI", "BUILD_NUMBER", "LINES")


def scrubbed_env() -> dict[str, str]:
    """The environment for tools and gates: no provider keys, and output that does not depend on
    where loopterm runs (a fixed width, no CI markers): a gate's output reaches the next prompt,
    and a replay compares prompts, so a laptop and CI must see the same text."""
    env = without_secrets(dict(os.environ))  # provider keys never reach a gate's or tool's subprocess
    for name in _OUTPUT_SHAPING:
        env.pop(name, None)
    env["COLUMNS"] = "80"
    return env


class GateResult(BaseModel):
    name: str
    passed: bool
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # the gate itself could not run (missing command, timeout)
    duration_s: float = 0.0
    # A model checker's call (see checkers.py); zero for a command gate.
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    tokens_cached: int = 0  # of tokens_in, served from the provider's prompt cache
    model: str | None = None
    findings: list[dict[str, Any]] = Field(default_factory=list)

    def redacted(self) -> "GateResult":
        """This result with any secret in its text replaced by a marker (itself when there is none)."""
        update = {name: clean for name in ("stdout", "stderr", "error")
                  if (clean := redact(getattr(self, name))) is not getattr(self, name)}
        findings = redact_tree(self.findings)
        if findings is not self.findings:
            update["findings"] = findings
        return self.model_copy(update=update) if update else self

    def feedback(self) -> str:
        """What the next iteration is told about this gate."""
        head = f"gate {self.name!r} failed" + (f" (exit code {self.exit_code})" if self.exit_code is not None else "")
        detail = self.error or (self.stderr.strip() or self.stdout.strip())
        return f"{head}:\n{detail}" if detail else head


class CommandGate(BaseModel):
    """Runs a command in the workspace; passes on exit code 0.

    `{workspace}` and `{python}` in the arguments are replaced by the run's
    workspace and the running interpreter.
    """

    name: str
    argv: list[str]
    timeout: float = 120.0
    output_cap: int = 8_000
    env: dict[str, str] = {}  # set for the command on top of the scrubbed environment

    async def check(self, ctx: "GateContext") -> GateResult:
        return await self.run(ctx.workspace)

    def command(self, workspace: Path) -> list[str]:
        """The argv as it runs: `{workspace}` and `{python}` filled in."""
        return [a.replace("{workspace}", str(workspace)).replace("{python}", sys.executable) for a in self.argv]

    async def run(self, workspace: Path) -> GateResult:
        argv = self.command(workspace)
        done = await run_process(argv, workspace, {**scrubbed_env(), **self.env}, self.timeout, self.output_cap)
        return GateResult(
            name=self.name, passed=done.exit_code == 0 and done.error is None, exit_code=done.exit_code,
            stdout=done.stdout, stderr=done.stderr, error=done.error, duration_s=done.duration_s,
        )


@dataclass(frozen=True)
class ProcessResult:
    """A finished command: its exit code (None when it could not start or timed out) and its output,
    capped and with secrets redacted."""

    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None  # could not start, or timed out
    duration_s: float


_READ_MARGIN = 4_096  # read this much past the cap (longer than any key), so a key at the cap is redacted whole


class _Capture:
    """Keeps the first `keep` bytes of a stream and counts the rest: a command printing gigabytes
    costs a bounded amount of memory."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.parts: list[bytes] = []
        self.kept = 0
        self.size = 0

    async def read(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65_536):
            if self.kept < self.keep:
                part = chunk[: self.keep - self.kept]
                self.parts.append(part)
                self.kept += len(part)
            self.size += len(chunk)

    def text(self, cap: int) -> str:
        return redact_capped(b"".join(self.parts).decode(errors="replace"), cap, more=self.size - self.kept)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """End the command and everything it started (its own session's process group)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.returncode is None:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Returns once the process has exited, even while something it left running holds its pipes open
    (asyncio's wait() waits for the pipes too)."""
    delay = 0.002
    while proc.returncode is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def run_process(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, output_cap: int) -> ProcessResult:
    """Run a command in `cwd` with `env`: at most `timeout` seconds, after which it and every process it
    started are killed; whatever it left running in the background when it exits is killed too. Each of
    stdout and stderr keeps `output_cap` characters, redacted (core/secrets.py)."""
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
    except OSError as exc:
        return ProcessResult(None, "", "", redact(f"could not start {argv[0]!r}: {exc.strerror or exc}"),
                             time.monotonic() - started)
    out, err = _Capture(output_cap + _READ_MARGIN), _Capture(output_cap + _READ_MARGIN)
    reading = asyncio.ensure_future(asyncio.gather(out.read(proc.stdout), err.read(proc.stderr)))
    exited = asyncio.ensure_future(_exited(proc))
    timed_out = False
    try:
        finished, _ = await asyncio.wait({reading, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not finished:
            timed_out = True
        elif exited not in finished:  # both pipes closed (so wait() returns at the exit): wait for the exit
            try:
                await asyncio.wait_for(proc.wait(), timeout=max(0.0, timeout - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                timed_out = True
    finally:
        _kill_group(proc)  # on timeout, and anything left in the background: the command's processes end with it
        exited.cancel()
        try:
            await asyncio.wait_for(reading, timeout=2.0)  # what is still in the pipes
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass  # a process that left the group (setsid) still holds a pipe: keep what was read
        try:  # the pipes are closed: wait() returns once asyncio has closed the process's transport
            await asyncio.wait_for(proc.wait(), timeout=2.0)
        except asyncio.TimeoutError:  # a pipe still held: close the transport, or it warns when collected
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
    duration = time.monotonic() - started
    if timed_out:
        return ProcessResult(None, out.text(output_cap), err.text(output_cap), f"timed out after {timeout:g}s", duration)
    return ProcessResult(proc.returncode, out.text(output_cap), err.text(output_cap), None, duration)
