"""The review target (a git repository and two commits) and the review loops' tools.

Where the code under review lives: `<workspace>/repo`, a git repository this loop owns.
`prepare` builds it once per workspace:

- with LOOPTERM_REVIEW_REPO set: a local clone of that repository (objects hard-linked, head
  checked out detached), reviewing LOOPTERM_REVIEW_BASE..LOOPTERM_REVIEW_HEAD (default
  HEAD~1..HEAD, resolved in that repository). The person's repository is only read: a clone
  writes nothing into it (a `git worktree add` would register the worktree in its .git and leave
  a stale entry when the workspace is deleted);
- otherwise: the sample repository (sample.py) with its planted bug.

Why a subdirectory and not the workspace itself: a batch case's workspace is a git worktree of
another repository, and fork and replay hand a run a fresh workspace without calling the loop's
setup; `repo/` can be built (deterministically, the same commit ids) wherever the tools find it
missing, atomically (built aside, then renamed), so analyzers running in parallel never race. The
review's own output (REVIEW.md, review.json) sits next to it, never inside the reviewed checkout.

Refs and paths are untrusted: refs are checked with `git rev-parse --verify` (and may not look
like options), paths are confined to the repository and passed to git as literal pathspecs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loopterm.core.errors import ConfigError
from loopterm.core.tools import ToolContext, tool
from loopterm.examples.review.sample import build_sample, sample_git_env

TARGET = "repo"  # the repository under review, inside the run's workspace
META = "loopterm-review.json"  # in the target's .git: what is reviewed (written last: its presence means ready)
REPO_VAR, BASE_VAR, HEAD_VAR = "LOOPTERM_REVIEW_REPO", "LOOPTERM_REVIEW_BASE", "LOOPTERM_REVIEW_HEAD"
MAX_COMMENTS = 50
DIFF_CAP = 12_000  # characters of one file's diff kept in state and shown to the analyzer
_REF_OK = re.compile(r"^[^\x00-\x20\x7f~^:?*\[\\-][^\x00-\x20\x7f]*$")  # no spaces, controls, or a leading option dash

Severity = Literal["critical", "major", "minor"]
Verdict = Literal["approve", "request_changes", "block"]


class GitFailed(RuntimeError):
    """A git command failed; the message is its first stderr line."""


def git(repo: Path, *args: str, date: str = "2024-01-01T00:00:00+0000") -> str:
    """Run git in `repo` with no global or system configuration, hooks off, pathspecs literal."""
    options = ["-c", "core.hooksPath=" + os.devnull, "-c", "gc.auto=0", "-c", "core.autocrlf=false",
               "-c", "advice.detachedHead=false", "-c", "core.quotePath=false", "--literal-pathspecs"]
    exe = shutil.which("git")
    if exe is None:
        raise ConfigError("git is not installed (not found on PATH); the review loop reads a git repository: install git")
    try:
        proc = subprocess.run([exe, *options, *args], cwd=repo, env=sample_git_env(date), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise GitFailed(f"git {args[0]}: no answer in 300s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        first = next((line.strip() for line in err.splitlines() if line.strip()), f"exit {proc.returncode}")
        raise GitFailed(f"git {args[0]}: {first}")
    return proc.stdout.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class Target:
    """What is reviewed: the repository (inside the workspace) and the two commits."""

    repo: Path
    base: str  # commit ids
    head: str
    base_ref: str  # as the person named them
    head_ref: str
    source: str  # "sample" or the person's repository path

    def label(self) -> str:
        where = "the sample repository" if self.source == "sample" else self.source
        return f"{where}: base {self.base[:10]} ({self.base_ref}) -> head {self.head[:10]} ({self.head_ref})"


def _meta_path(repo: Path) -> Path:
    return repo / ".git" / META


def _check_ref(var: str, value: str) -> str:
    value = value.strip()
    if not value or len(value) > 256 or not _REF_OK.match(value):
        raise ConfigError(f"{var}={value!r} is not a usable git revision (no spaces, control characters or leading '-'); "
                          "give a branch, tag, commit id or HEAD~N")
    return value


def _resolve(repo: Path, var: str, ref: str) -> str:
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
    except GitFailed:
        raise ConfigError(f"{var}={ref!r} is not a commit in {repo} (git rev-parse --verify found none); "
                          "give a branch, tag, commit id or HEAD~N that exists there") from None


def requested() -> tuple[Path, str, str] | None:
    """The person's repository and refs from the environment, checked; None: review the sample."""
    repo_text = os.environ.get(REPO_VAR, "").strip()
    base_ref = os.environ.get(BASE_VAR, "").strip()
    head_ref = os.environ.get(HEAD_VAR, "").strip()
    if not repo_text:
        if base_ref or head_ref:
            var = BASE_VAR if base_ref else HEAD_VAR
            raise ConfigError(f"{var} is set but {REPO_VAR} is not; set {REPO_VAR} to the repository to review "
                              f"(or unset {var} to review the sample repository)")
        return None
    repo = Path(repo_text).expanduser()
    if not repo.is_dir():
        raise ConfigError(f"{REPO_VAR}={repo_text!r} is not a directory; give the path of a git repository")
    repo = repo.resolve()
    try:
        bare = git(repo, "rev-parse", "--is-bare-repository").strip() == "true"
        top = "" if bare else git(repo, "rev-parse", "--show-toplevel").strip()
    except GitFailed as exc:
        raise ConfigError(f"{REPO_VAR}={repo_text!r} is not a git repository ({exc})") from None
    repo = Path(top).resolve() if top else repo  # a subdirectory names its repository
    return repo, _check_ref(BASE_VAR, base_ref or "HEAD~1"), _check_ref(HEAD_VAR, head_ref or "HEAD")


def _build(scratch: Path) -> dict[str, str]:
    """Build the target repository in `scratch`; the metadata to record."""
    asked = requested()
    if asked is None:
        try:
            build_sample(scratch)
        except subprocess.CalledProcessError as exc:
            first = next((line for line in (exc.stderr or b"").decode(errors="replace").splitlines() if line.strip()),
                         f"exit {exc.returncode}")
            raise ConfigError(f"could not build the sample repository in {scratch.parent}: git failed: {first}") from None
        return {"source": "sample", "base": git(scratch, "rev-parse", "HEAD~1").strip(),
                "head": git(scratch, "rev-parse", "HEAD").strip(), "base_ref": "HEAD~1", "head_ref": "HEAD"}
    source, base_ref, head_ref = asked
    base, head = _resolve(source, BASE_VAR, base_ref), _resolve(source, HEAD_VAR, head_ref)
    if base == head:
        raise ConfigError(f"{BASE_VAR} ({base_ref}) and {HEAD_VAR} ({head_ref}) are the same commit {base[:10]}; "
                          "there is no change to review")
    try:
        git(scratch.parent, "clone", "--quiet", "--no-checkout", "--local", str(source), scratch.name)
        git(scratch, "checkout", "--quiet", "--detach", head)
    except GitFailed as exc:
        raise ConfigError(f"could not copy {source} for review: {exc}") from None
    return {"source": str(source), "base": base, "head": head, "base_ref": base_ref, "head_ref": head_ref}


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def prepare(workspace: Path) -> Target:
    """The workspace's review target, built first if missing (the loops' setup, and any tool's first call)."""
    if shutil.which("git") is None:
        raise ConfigError("git is not installed (not found on PATH); the review loop reads a git repository: install git")
    workspace = Path(workspace).resolve()
    repo = workspace / TARGET
    with _locks_guard:
        lock = _locks.setdefault(str(workspace), threading.Lock())
    with lock:
        if not _meta_path(repo).is_file():
            if repo.exists():
                raise ConfigError(f"{repo} exists but is not a prepared review target; move it away and try again")
            scratch = workspace / f".{TARGET}.{uuid.uuid4().hex[:8]}.tmp"
            scratch.mkdir(parents=True)
            try:
                meta = _build(scratch)
                _meta_path(scratch).write_text(json.dumps(meta, indent=1), encoding="utf-8")
                try:
                    scratch.rename(repo)
                except OSError:  # another process built it first: theirs is the same
                    if not _meta_path(repo).is_file():
                        raise
            finally:
                if scratch.exists():
                    shutil.rmtree(scratch, ignore_errors=True)
    meta = json.loads(_meta_path(repo).read_text(encoding="utf-8"))
    return Target(repo=repo, **{k: str(meta[k]) for k in ("base", "head", "base_ref", "head_ref", "source")})


def setup(workspace: Path) -> None:
    """Loop.setup: build the target before the run starts, so a bad repository or ref is one line, exit 2."""
    try:
        prepare(workspace)
    except ConfigError:
        try:  # the run is not created: leave no empty workspace behind (rmdir removes only an empty one)
            Path(workspace).rmdir()
        except OSError:
            pass
        raise


def _target(ctx: ToolContext) -> Target:
    try:
        return prepare(ctx.workspace)
    except ConfigError as exc:
        raise RuntimeError(str(exc)) from None


def confine(repo: Path, path: str) -> str:
    """`path` as a repository-relative POSIX path, or ValueError saying why it is refused."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("path is empty; give a file path relative to the repository root, e.g. 'ledger/paging.py'")
    if "\x00" in path or any(ord(c) < 32 for c in path):
        raise ValueError("path contains control characters; give a plain relative file path")
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or path.startswith(("/", "\\")):
        raise ValueError(f"path {path!r} is absolute; give a path relative to the repository root")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"path {path!r} contains '..'; paths must stay inside the repository")
    if posix.parts and posix.parts[0] == ".git":
        raise ValueError(f"path {path!r} is inside .git; name a file of the project")
    root = repo.resolve()
    target = (root / posix).resolve()  # follows symlinks in the checkout: a link pointing out is caught here
    if target == root or root not in target.parents:
        raise ValueError(f"path {path!r} resolves outside the repository (through a symlink); refused")
    return posix.as_posix()


# ---------------------------------------------------------------------------- reading the change


def numstat(target: Target) -> list[dict[str, Any]]:
    """Every file changed between base and head: path, lines added, lines removed (None: binary)."""
    out = git(target.repo, "diff", "--no-renames", "--numstat", "-z", target.base, target.head, "--")
    files: list[dict[str, Any]] = []
    for entry in out.split("\0"):
        if not entry:
            continue
        added, removed, path = entry.split("\t", 2)
        files.append({"path": path, "added": None if added == "-" else int(added),
                      "removed": None if removed == "-" else int(removed)})
    return files


_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@")


def annotate(diff: str) -> str:
    """A unified diff with each line's number in the head version on the left ('-' lines have none)."""
    out: list[str] = []
    new: int | None = None
    for line in diff.splitlines():
        hunk = _HUNK.match(line)
        if hunk:
            new = int(hunk.group(1))
            out.append(line)
        elif new is None or line.startswith("\\"):
            out.append(line)
        elif line.startswith("-"):
            out.append(f"{'':>5} - |{line[1:]}")
        elif line.startswith("+"):
            out.append(f"{new:>5} + |{line[1:]}")
            new += 1
        else:
            out.append(f"{new:>5}   |{line[1:]}")
            new += 1
    return "\n".join(out)


# ---------------------------------------------------------------------------- the parent's tools


@tool(output_cap=1_000_000)  # JSON the observation reads back: never cut
def changed_files(ctx: ToolContext) -> str:
    """List the files the change touches (base..head), with lines added and removed; call it first."""
    target = _target(ctx)
    return json.dumps({"base": target.base, "head": target.head, "base_ref": target.base_ref,
                       "head_ref": target.head_ref, "source": target.source, "files": numstat(target)},
                      ensure_ascii=False)


class Comment(BaseModel):
    """One review comment: on a changed file, at a line of its head version."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1_000)
    line: int = Field(ge=1, le=10_000_000)
    severity: Severity
    body: str = Field(min_length=1, max_length=4_000)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Untrusted text as it may be written to a file a person reads in a terminal: no control characters
    (an escape sequence in a comment must not drive the terminal), tabs kept, newlines normalized."""
    return _CONTROL.sub("", str(text).replace("\r\n", "\n").replace("\r", "\n"))


def _quoted(text: str) -> str:
    """A block of untrusted text as a Markdown quote: it can never pose as a heading or a verdict line."""
    return "\n".join(f"> {line}" if line else ">" for line in clean(text).strip().split("\n"))


def _code(text: str) -> str:
    return "`" + clean(text).replace("`", "'").replace("\n", " ") + "`"


def render(target: Target, verdict: str, summary: str, comments: list[Comment], iteration: int) -> str:
    counts = {s: sum(1 for c in comments if c.severity == s) for s in ("critical", "major", "minor")}
    lines = [
        f"# Review: {verdict.replace('_', ' ')}",
        "",
        f"Reviewed {clean(target.label())}.",
        f"Decided at iteration {iteration}; final when the run converged (`loopterm show RUN`).",
        "",
        "## Summary",
        "",
        _quoted(summary) if summary.strip() else "> (no summary)",
        "",
        f"## Comments ({len(comments)}: {counts['critical']} critical, {counts['major']} major, {counts['minor']} minor)",
        "",
    ]
    order = {"critical": 0, "major": 1, "minor": 2}
    for c in sorted(comments, key=lambda c: (order[c.severity], c.path, c.line)):
        lines += [f"- **{c.severity}** {_code(f'{c.path}:{c.line}')}", "", *(f"  {q}" for q in _quoted(c.body).split("\n")), ""]
    if not comments:
        lines.append("(none)")
    return "\n".join(lines).rstrip() + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Its effect lives in the run's workspace only (a branch rebuilds it, a replay runs it again), and
# writing the same decision twice leaves the same files.
@tool(side_effects=True, idempotent=True, workspace_only=True)
def decide(ctx: ToolContext, verdict: Verdict, summary: str, comments: list[Comment]) -> str:
    """Give the verdict (approve, request_changes or block), a summary and review comments; writes REVIEW.md and review.json."""
    target = _target(ctx)
    made = [c if isinstance(c, Comment) else Comment.model_validate(c) for c in comments]
    changed = {f["path"] for f in numstat(target)}
    stray = sorted({c.path for c in made if c.path not in changed})
    if stray:
        raise ValueError(f"comments on files the change does not touch: {', '.join(map(repr, stray[:5]))}; "
                         f"comment on the changed files: {', '.join(sorted(changed)) or '(none)'}")
    made = [c.model_copy(update={"body": clean(c.body)}) for c in made]
    summary = clean(summary)[:8_000]
    document = {"verdict": verdict, "summary": summary, "iteration": ctx.iteration, "source": target.source,
                "base": target.base, "head": target.head, "base_ref": target.base_ref, "head_ref": target.head_ref,
                "comments": [c.model_dump() for c in made]}
    _write_atomic(ctx.workspace / "review.json", json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(ctx.workspace / "REVIEW.md", render(target, verdict, summary, made, ctx.iteration))
    critical = sum(1 for c in made if c.severity == "critical")
    return f"wrote REVIEW.md and review.json: {verdict}, {len(made)} comment(s) ({critical} critical)"


# ---------------------------------------------------------------------------- the analyzer's tools


class Finding(BaseModel):
    """One finding of a file's analyzer, at a line of the file's head version."""

    model_config = ConfigDict(extra="forbid")

    line: int = Field(ge=1, le=10_000_000)
    severity: Severity
    message: str = Field(min_length=1, max_length=2_000)


@tool(output_cap=DIFF_CAP + 2_000)
def file_diff(ctx: ToolContext, path: str) -> str:
    """Show one changed file's diff (base..head), each line numbered as in the head version."""
    target = _target(ctx)
    rel = confine(target.repo, path)
    changed = {f["path"]: f for f in numstat(target)}
    if rel not in changed:
        shown = ", ".join(sorted(changed)[:20]) or "(none)"
        raise ValueError(f"{rel!r} is not changed between base and head; the changed files are: {shown}")
    stat = changed[rel]
    if stat["added"] is None:
        return f"{rel}: binary file changed (base {target.base[:10]} -> head {target.head[:10]}); no text diff"
    raw = git(target.repo, "diff", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv", "-U3", target.base, target.head,
              "--", rel)
    body = annotate(raw)
    if len(body) > DIFF_CAP:
        body = body[:DIFF_CAP] + f"\n[... diff cut at {DIFF_CAP} characters of {len(body)}]"
    head = (f"{rel}: +{stat['added']} -{stat['removed']} (base {target.base[:10]} -> head {target.head[:10]}); "
            "numbers on the left are lines of the head version, '-' lines exist only in the base")
    return f"{head}\n{body}"


@tool
def report(findings: list[Finding]) -> str:
    """Report your findings on the file (an empty list when the change is fine); ends the analysis."""
    made = [f if isinstance(f, Finding) else Finding.model_validate(f) for f in findings]
    worst = next((s for s in ("critical", "major", "minor") if any(f.severity == s for f in made)), None)
    return f"reported {len(made)} finding(s)" + (f", the worst {worst}" if worst else "")
