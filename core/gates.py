"""Verification gates: non-AI checks whose verdict, not the model's, decides convergence."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from loopterm.core.checkers import GateContext

from loopterm.core.tools import cap_text

# Provider keys never reach a gate's or tool's subprocess.
_SECRET_SUFFIXES = ("_API_KEY", "_API_TOKEN", "_SECRET", "_SECRET_KEY", "_ACCESS_KEY", "_AUTH_TOKEN")


# Variables that change how common tools format their output (pytest stops truncating its
# summary under CI, and wraps to COLUMNS).
_OUTPUT_SHAPING = ("CI", "BUILD_NUMBER", "LINES")


def scrubbed_env() -> dict[str, str]:
    """The environment for tools and gates: no provider keys, and output that does not depend on
    where loopterm runs (a fixed width, no CI markers): a gate's output reaches the next prompt,
    and a replay compares prompts, so a laptop and CI must see the same text."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith(_SECRET_SUFFIXES)}
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
    model: str | None = None
    findings: list[dict[str, Any]] = Field(default_factory=list)

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

    async def run(self, workspace: Path) -> GateResult:
        argv = [a.replace("{workspace}", str(workspace)).replace("{python}", sys.executable) for a in self.argv]
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=workspace, env={**scrubbed_env(), **self.env},
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            return GateResult(name=self.name, passed=False, error=f"could not start {argv[0]!r}: {exc.strerror or exc}")
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return GateResult(
                name=self.name, passed=False, error=f"timed out after {self.timeout:g}s",
                duration_s=time.monotonic() - started,
            )
        return GateResult(
            name=self.name,
            passed=proc.returncode == 0,
            exit_code=proc.returncode,
            stdout=cap_text(out.decode(errors="replace"), self.output_cap),
            stderr=cap_text(err.decode(errors="replace"), self.output_cap),
            duration_s=time.monotonic() - started,
        )
