"""The built-in `mcp-git` loop: a loop whose tools come from an MCP server no one here wrote.

The official git server (`mcp-server-git`, from PyPI) runs as a stdio subprocess in the run's
workspace, confined to `repo/`, a small git repository `setup` builds there with a change that
was never committed. The loop's job: record that change as one commit. Every tool it uses (status,
diff, add, commit) is the server's, listed at run start with its own JSON schema; their
side-effect policy comes from the server's annotations (git_status is read-only; git_add and
git_commit have side effects, so a resume never repeats them). The `committed` gate, not the
model, decides when the work is done: a clean working tree and the change in a new commit.

Offline, `scripted/mcp-git` (script.json) looks at the status and the diff, stages both files and
commits them. With `--model openai/gpt-4o-mini` (or any litellm model) a real model drives the
same tools. Needs the server: `pip install mcp-server-git` (the `test` extra has it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from loopterm.core.budget import Budget
from loopterm.core.gates import CommandGate
from loopterm.core.loop import Loop
from loopterm.core.mcp_servers import McpServer

HERE = Path(__file__).resolve().parent

README = "# ledger\n\nA tiny ledger library.\n"
README_CHANGED = "# ledger\n\nA tiny ledger library.\n\nAmounts are kept in cents (integers), never floats.\n"
CHANGELOG = "# Changelog\n\n## Unreleased\n\n- Amounts are kept in cents.\n"

GOAL = """\
The git repository in repo/ has a change that was never committed. Record it as exactly one new commit:
look at the status and the diff, stage every changed or new file, and commit them with a message that
says what changed. Use the git tools with repo_path "repo". The working tree must end clean."""

# Passes when repo/ has a clean working tree and exactly one commit on top of the initial one.
COMMITTED = CommandGate(
    name="committed",
    argv=["{python}", "-c", """\
import subprocess, sys
def git(*a):
    return subprocess.run(["git", "-C", "repo", *a], capture_output=True, text=True).stdout.strip()
dirty = git("status", "--porcelain")
commits = int(git("rev-list", "--count", "HEAD") or 0)
if dirty:
    sys.exit("working tree not clean:\\n" + dirty)
if commits != 2:
    sys.exit(f"expected exactly one new commit on top of the initial one; the branch has {commits} commit(s)")
print("clean, and the change is one commit:", git("log", "-1", "--format=%s"))
"""],
    timeout=30,
)


def _git(repo: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C",
                "GIT_AUTHOR_DATE": "2026-01-05T10:00:00Z", "GIT_COMMITTER_DATE": "2026-01-05T10:00:00Z"})
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def setup(workspace: Path) -> None:
    """Loop.setup: repo/ with one commit, then a change left uncommitted (README edited, CHANGELOG new)."""
    repo = Path(workspace) / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    _git(repo, "init", "-q", "-b", "main")
    # The server commits with the repository's own identity (it runs without the global git config).
    _git(repo, "config", "user.name", "loopterm example")
    _git(repo, "config", "user.email", "example@loopterm.invalid")
    (repo / "README.md").write_text(README)
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-q", "-m", "Initial commit")
    (repo / "README.md").write_text(README_CHANGED)
    (repo / "CHANGELOG.md").write_text(CHANGELOG)


GIT_SERVER = McpServer(
    name="git",
    # The server confines every call to this repository; repo_path "repo" is relative to the workspace
    # (a stdio server's working directory).
    command=["{python}", "-m", "mcp_server_git", "--repository", "{workspace}/repo"],
    tools=["git_status", "git_diff_unstaged", "git_diff_staged", "git_add", "git_commit", "git_log"],
    # Its effects stay in the run's own workspace: a replay re-runs them there, and a branch's workspace is
    # rebuilt by re-running them up to the fork point.
    workspace_only=True,
)

loop = Loop(
    name="mcp-git",
    goal=GOAL,
    mcp_servers=[GIT_SERVER],
    gates=[COMMITTED],
    setup=setup,
    script=HERE / "script.json",
    max_iterations=8,
    budget=Budget(usd=0.05, tokens=60_000),
    consolidate=lambda state, status: [],  # each run commits its own sample change: nothing to learn
    description="commit a pending change through the git MCP server (mcp-server-git): tools from MCP, a gate decides",
)
