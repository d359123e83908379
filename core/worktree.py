"""One git worktree per run, so concurrent runs of a code-changing loop never write the same files.

A loop is code-changing when one of its tools has side effects. For such a loop a base
repository is prepared once per content of `loop.workspace_files` (`<repos>/<loop>-<hash>`, one
commit with a fixed identity and date, so it needs no git configuration), and each run gets
`git worktree add --detach <workspaces>/<run id>`, then the loop's `setup` runs in it, as for any
new run's workspace (`prepare`). What the worktree holds then is its baseline (`snapshot`: a
sha256 per file). After the run:

- converged: the files it changed, added or deleted (against the baseline, so what setup made is
  not counted) are recorded in the run's event log with a sha256 each (`worktree_removed`), then
  the worktree is removed and pruned;
- anything else: the worktree is kept for a person (resume, inspect), recorded (`worktree_kept`)
  and listed by the command.

git runs with the user's global and system configuration switched off and every identity given
in the environment: nothing here reads or writes the user's own repositories or settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopterm.core.errors import ConfigError
from loopterm.core.loop import Loop

IDENTITY = {
    "GIT_AUTHOR_NAME": "loopterm",
    "GIT_AUTHOR_EMAIL": "loopterm@localhost",
    "GIT_COMMITTER_NAME": "loopterm",
    "GIT_COMMITTER_EMAIL": "loopterm@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}
# Per-command settings: no signing, no line-ending rewriting, no hooks, a fixed branch name.
GIT_OPTIONS = ["-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", "-c", "core.hooksPath=" + os.devnull,
               "-c", "init.defaultBranch=main", "-c", "gc.auto=0", "-c", "advice.detachedHead=false"]
SKIPPED = {".git", "__pycache__"}  # never copied into the base repository, never part of its hash


def code_changing(loop: Loop) -> bool:
    """A loop changes code when a tool's side effects land in its workspace (`workspace_only`, like
    codefix's write_file): such runs get a worktree each. A tool whose effect is elsewhere (a reply
    sent to a customer, child runs started) has nothing to isolate in a worktree."""
    return any(t.side_effects and t.workspace_only for t in loop.tools)


def git_env() -> dict[str, str]:
    """The environment of every git command: no GIT_* from the caller, no global or system config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(IDENTITY)
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"
    return env


def require_git() -> str:
    """The git executable, or one ConfigError line saying it is needed."""
    found = shutil.which("git")
    if found is None:
        raise ConfigError("git is not installed (not found on PATH); parallel runs of a loop that writes files "
                          "need it to give each run its own worktree: install git and try again")
    return found


class GitError(ConfigError):
    """A git command failed; the message is its first line of stderr, with the command."""


async def git(*args: str, cwd: Path) -> str:
    """Run git (asynchronously) in `cwd`; its stdout, or GitError."""
    exe = require_git()
    proc = await asyncio.create_subprocess_exec(
        exe, *GIT_OPTIONS, *args, cwd=cwd, env=git_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        first = next((line for line in err.decode(errors="replace").splitlines() if line.strip()), "no message")
        raise GitError(f"git {args[0]} failed in {cwd} (exit {proc.returncode}): {first.strip()}")
    return out.decode(errors="surrogateescape")


def _files(root: Path) -> list[Path]:
    """Every file under root (relative, sorted), skipping SKIPPED directories."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED)
        for name in filenames:
            out.append((Path(dirpath) / name).relative_to(root))
    return sorted(out)


def content_hash(files: Path | None) -> str:
    """A digest of the workspace files (names, executable bits and bytes); the base repo's key."""
    digest = hashlib.sha256()
    if files is not None:
        for rel in _files(files):
            path = files / rel
            digest.update(rel.as_posix().encode() + b"\0")
            if path.is_symlink():
                digest.update(b"link\0" + os.readlink(path).encode() + b"\0")
                continue
            digest.update(b"x\0" if os.access(path, os.X_OK) else b"f\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes (a symlink: of its target text); None when it is gone or a directory."""
    if path.is_symlink():
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


Snapshot = dict[str, tuple[str, bool]]  # relative POSIX path: (sha256, executable)


def snapshot(root: Path) -> Snapshot:
    """Every file under root but git's own (`.git`, at any depth), with its sha256 and executable bit.

    Symlinks count as files (the sha256 of their target text) and are not followed.
    """
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d != ".git" and d not in links]
        for name in [*filenames, *links]:
            if name == ".git":  # a worktree's (or a submodule's) pointer to its repository
                continue
            path = here / name
            digest = file_sha256(path)
            if digest is not None:
                out[path.relative_to(root).as_posix()] = (digest, not path.is_symlink() and os.access(path, os.X_OK))
    return out


@dataclass(frozen=True)
class BaseRepo:
    """A repository holding the loop's workspace files in one commit; worktrees are added from it."""

    path: Path
    commit: str


@dataclass
class Worktrees:
    """Adds and removes worktrees for one batch; git commands on one base repository run one at a time."""

    repos_root: Path
    _locks: dict[Path, asyncio.Lock] = field(default_factory=dict)

    def _lock(self, repo: Path) -> asyncio.Lock:
        lock = self._locks.get(repo)
        if lock is None:
            lock = self._locks[repo] = asyncio.Lock()
        return lock

    async def base(self, loop: Loop) -> BaseRepo:
        """The base repository for the loop's current workspace files, created on first use.

        Built in a scratch directory and renamed into place, so two processes preparing the
        same base at once both end up with one complete repository.
        """
        require_git()
        key = content_hash(loop.workspace_files)[:12]
        final = self.repos_root / f"{loop.name}-{key}"
        async with self._lock(final):
            if not (final / ".git").is_dir():
                self.repos_root.mkdir(parents=True, exist_ok=True)
                scratch = self.repos_root / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    scratch.mkdir()
                    if loop.workspace_files is not None:
                        for rel in _files(loop.workspace_files):
                            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(loop.workspace_files / rel, scratch / rel, follow_symlinks=False)
                    await git("init", "-q", cwd=scratch)
                    await git("add", "-A", cwd=scratch)
                    await git("commit", "-q", "--allow-empty", "--no-verify", "-m",
                              f"loopterm base for loop {loop.name} ({key})", cwd=scratch)
                    try:
                        scratch.rename(final)
                    except OSError:  # another process got there first: theirs is as good
                        if not (final / ".git").is_dir():
                            raise
                finally:
                    if scratch.exists():
                        shutil.rmtree(scratch, ignore_errors=True)
            commit = (await git("rev-parse", "--verify", "HEAD^{commit}", cwd=final)).strip()
        return BaseRepo(path=final, commit=commit)

    async def add(self, base: BaseRepo, path: Path) -> Path:
        """A detached worktree of the base commit at `path` (which must not exist yet)."""
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        async with self._lock(base.path):
            await git("worktree", "add", "-q", "--detach", str(path), base.commit, cwd=base.path)
        return path

    async def prepare(self, loop: Loop, base: BaseRepo, path: Path) -> Snapshot:
        """Run the loop's setup in a new worktree (as `loopterm run` does after copying workspace_files); its baseline.

        Why a per-worktree file snapshot rather than setup's output in the base repository or a
        commit in the worktree: the base is shared and keyed by workspace_files alone (setup's code
        can change without its files changing), setup may build a nested git repository (which
        `git add` would record as a bare gitlink, hiding the run's edits inside it), and a commit
        would move the HEAD the run sees. A snapshot is one walk, needs no git, and sees inside
        nested repositories. A setup that commits to the worktree's own repository (a sample
        repository at the workspace root instead of in a subfolder) is refused with one line:
        it would write into the shared base repository.
        """
        if loop.setup is not None:
            await asyncio.to_thread(loop.setup, path)
            head = (await git("rev-parse", "--verify", "HEAD^{commit}", cwd=path)).strip()
            if head != base.commit:
                raise ConfigError(
                    f"setup of loop {loop.name!r} committed to the workspace's own git repository; under eval and "
                    "run --cases each case's workspace is a git worktree of a shared base: build the sample "
                    "repository in a subfolder of the workspace (e.g. workspace / 'repo')")
        return await asyncio.to_thread(snapshot, path)

    async def changes(self, path: Path, baseline: Snapshot) -> list[dict[str, Any]]:
        """Files changed, added or deleted in the worktree since its baseline, with a sha256 each.

        Compared file by file with the baseline, not with git's HEAD or index, so a run that
        committed (in the worktree or in a nested repository) is still seen in full, and what
        setup made is not counted; untracked and ignored files count.
        """
        now = await asyncio.to_thread(snapshot, path)
        found = [(name, "deleted" if name not in now else "added" if name not in baseline else "modified")
                 for name in sorted(baseline.keys() | now.keys()) if baseline.get(name) != now.get(name)]
        return [{"path": name, "change": change, "sha256": now[name][0] if name in now else None}
                for name, change in found]

    async def remove(self, base: BaseRepo, path: Path) -> None:
        """Remove the worktree and prune the base's records of it (a vanished directory is fine)."""
        async with self._lock(base.path):
            try:
                await git("worktree", "remove", "--force", str(path), cwd=base.path)
            except GitError:
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
            await git("worktree", "prune", cwd=base.path)

    async def listed(self, base: BaseRepo) -> list[Path]:
        """The base repository's worktrees (the base itself first), as `git worktree list` has them."""
        out = await git("worktree", "list", "--porcelain", cwd=base.path)
        return [Path(line.removeprefix("worktree ")) for line in out.splitlines() if line.startswith("worktree ")]
