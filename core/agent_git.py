"""The agent's workspace as a git repository: one commit per turn, so a turn's diff is exact and a branch
can start from the files as they were after any iteration.

git runs as core/worktree.py runs it (no user configuration, a fixed identity), in the run's own workspace.
"""

from __future__ import annotations

from pathlib import Path

from loopterm.core.acp_turn import DIFF_CAP, capped
from loopterm.core.errors import ConfigError
from loopterm.core.worktree import git

# Left out of every commit: what gates and interpreters leave behind is not the agent's work.
EXCLUDED = ("__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/")


async def ensure_repo(workspace: Path) -> str:
    """The workspace's current commit; a workspace that is not a repository yet becomes one, its files as
    they are committed as the baseline the agent's first turn is compared with."""
    if not (workspace / ".git").exists():
        await git("init", "-q", cwd=workspace)
        await _exclude(workspace)
        await git("add", "-A", cwd=workspace)
        await git("commit", "-q", "--allow-empty", "-m", "loopterm: the workspace before the agent's first turn",
                  cwd=workspace)
    else:  # a worktree loopterm made (eval, batch) or a repository of the user's: excluded there too
        await _exclude(workspace)
    return await head(workspace)


async def _exclude(workspace: Path) -> None:
    """EXCLUDED in the repository's own exclude file (a worktree's is its main repository's)."""
    exclude = workspace / (await git("rev-parse", "--git-path", "info/exclude", cwd=workspace)).strip()
    have = exclude.read_text().splitlines() if exclude.is_file() else []
    missing = [p for p in EXCLUDED if p not in have]
    if missing:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("".join(f"{line}\n" for line in [*have, *missing]))


async def head(workspace: Path) -> str:
    return (await git("rev-parse", "HEAD", cwd=workspace)).strip()


async def commit_turn(workspace: Path, base: str, message: str) -> tuple[str, list[str], str]:
    """Commit everything the turn left in the workspace: (commit, changed paths since `base`, the diff)."""
    await git("add", "-A", cwd=workspace)
    await git("commit", "-q", "--allow-empty", "-m", message, cwd=workspace)
    sha = await head(workspace)
    names = await git("diff", "--name-only", "-z", base, sha, cwd=workspace)
    changed = [p for p in names.split("\0") if p]
    diff = await git("diff", "--no-color", "--no-ext-diff", base, sha, cwd=workspace) if changed else ""
    return sha, changed, capped(diff, DIFF_CAP)


async def restore(parent_workspace: Path, workspace: Path, commit: str) -> None:
    """A branch's workspace: the parent's repository cloned and checked out at `commit` (its history kept,
    so later turns still diff against it)."""
    if not (parent_workspace / ".git").exists():
        raise ConfigError(f"the parent's workspace {parent_workspace} is gone or is not a git repository, so the "
                          "files after the fork point cannot be restored; fork from a run whose workspace is kept")
    if workspace.exists() and any(workspace.iterdir()):
        raise ConfigError(f"the branch's workspace {workspace} is not empty; nothing was restored into it")
    workspace.parent.mkdir(parents=True, exist_ok=True)
    await git("clone", "-q", "--no-checkout", str(parent_workspace), str(workspace), cwd=workspace.parent)
    await git("checkout", "-q", "--detach", commit, cwd=workspace)
    await _exclude(workspace)


async def baseline(workspace: Path) -> str:
    """The repository's first commit: the workspace before the agent's first turn."""
    roots = (await git("rev-list", "--max-parents=0", "HEAD", cwd=workspace)).split()
    return roots[-1]
