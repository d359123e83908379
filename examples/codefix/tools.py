"""File tools for the codefix loop, confined to the run's workspace.

The model's arguments are untrusted: every path is resolved (symlinks
included) by `loopterm.core.tools.confine` and refused unless it stays inside
`ctx.workspace`, so a reply can never write or read outside the scratch directory.
"""

from __future__ import annotations

from loopterm.core.tools import ToolContext, confine, tool

__all__ = ["confine", "read_file", "write_file"]


# Its effect is confined to the run's own workspace: a branch rebuilds it, a replay runs it again.
@tool(side_effects=True, idempotent=True, workspace_only=True)
def write_file(ctx: ToolContext, path: str, content: str) -> str:
    """Write a UTF-8 text file in the workspace (whole content, replacing any previous version).

    Idempotent because writing the same content twice leaves the same file.
    """
    target = confine(ctx.workspace, path)
    if target.is_dir():
        raise ValueError(f"path {path!r} is a directory; name a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8")
    target.write_bytes(data)
    lines = content.count("\n") + (0 if content.endswith("\n") or not content else 1)
    return f"wrote {len(data)} bytes ({lines} lines) to {path}"


@tool
def read_file(ctx: ToolContext, path: str) -> str:
    """Read a text file from the workspace (e.g. the tests, or your previous solution)."""
    target = confine(ctx.workspace, path)
    if not target.is_file():
        raise FileNotFoundError(f"no file {path!r} in the workspace")
    return target.read_text(encoding="utf-8", errors="replace")
