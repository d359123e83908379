"""The sample repository the `review` loop reviews when no repository is named.

A tiny Python project ("ledger") in two commits: a base, and a head that changes three
files. In the "bug" variant (the default) one change carries a planted off-by-one: the
rewritten `paginate` ends its slice at `start + per_page - 1`, so every page silently loses
its last entry. The "clean" variant is the same change without the bug.

Built with `git -c user.name=... -c user.email=...`, fixed author and committer dates and no
global or system git configuration, so it works on a machine with no git setup and every
build has the same commit ids.

    python -m loopterm.examples.review.sample PATH [--clean]

builds one at PATH, e.g. to try `LOOPTERM_REVIEW_REPO=PATH loopterm run review --headless`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

Variant = Literal["bug", "clean"]

NAME, EMAIL = "Sample Author", "author@example.invalid"
BASE_DATE, HEAD_DATE = "2024-03-01T09:00:00+0000", "2024-03-04T15:30:00+0000"

# The buggy line and its fix: the text a reviewer (or the offline script) recognizes.
BUGGY_LINE = "    end = start + per_page - 1"
FIXED_LINE = "    end = start + per_page"
BUGGY_FILE = "ledger/paging.py"
CHANGED = ("README.md", "ledger/amounts.py", "ledger/paging.py")

README_BASE = """\
# ledger

A small library for household ledgers: parse amounts people type, and show entries a page at a time.

```python
from ledger.amounts import parse_amount
from ledger.paging import paginate

parse_amount("12.50")          # 1250 (cents)
paginate(entries, 2, 20)       # entries 21..40
```
"""

README_HEAD = README_BASE + """
## Paging

`pages(entries, per_page)` yields every page in order; `paginate(entries, n, per_page)` returns page n
(numbered from 1), and an empty list past the last page.
"""

INIT = '''\
"""ledger: household ledgers, parsed and paged."""

__version__ = "0.3.0"
'''

AMOUNTS_BASE = '''\
"""Parse money amounts typed by people into integer cents."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation


def parse_amount(text: str | None) -> int:
    """'12.50' -> 1250; a blank or missing amount is 0."""
    if text is None or not text.strip():
        return 0
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    return int((value * 100).to_integral_value())
'''

AMOUNTS_HEAD = '''\
"""Parse money amounts typed by people into integer cents."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation


def parse_amount(text: str | None) -> int:
    """'12.50' -> 1250, '1,234.50' -> 123450; a blank or missing amount is 0."""
    if text is None or not text.strip():
        return 0
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    return int((value * 100).to_integral_value())
'''

PAGING_BASE = '''\
"""Split a list of ledger entries into pages for display."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def page_count(total: int, per_page: int) -> int:
    """How many pages `total` entries fill, `per_page` to a page (at least one)."""
    if per_page < 1:
        raise ValueError("per_page must be at least 1")
    return max(1, -(-total // per_page))


def paginate(items: Sequence[T], page: int, per_page: int) -> list[T]:
    """The entries on 1-based `page`."""
    if page < 1:
        raise ValueError("pages are numbered from 1")
    start = (page - 1) * per_page
    return list(items[start:start + per_page])
'''

PAGING_HEAD = '''\
"""Split a list of ledger entries into pages for display."""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


def page_count(total: int, per_page: int) -> int:
    """How many pages `total` entries fill, `per_page` to a page (at least one)."""
    if per_page < 1:
        raise ValueError("per_page must be at least 1")
    return max(1, -(-total // per_page))


def paginate(items: Sequence[T], page: int, per_page: int) -> list[T]:
    """The entries on 1-based `page` (an empty list past the last page)."""
    if page < 1:
        raise ValueError("pages are numbered from 1")
    if per_page < 1:
        raise ValueError("per_page must be at least 1")
    start = (page - 1) * per_page
@END@
    return list(items[start:end])


def pages(items: Sequence[T], per_page: int) -> Iterator[list[T]]:
    """Every page of `items`, in order."""
    for page in range(1, page_count(len(items), per_page) + 1):
        yield paginate(items, page, per_page)
'''

TESTS = '''\
from ledger.amounts import parse_amount
from ledger.paging import page_count, paginate


def test_parse_amount() -> None:
    assert parse_amount("12.50") == 1250
    assert parse_amount("  ") == 0


def test_paging() -> None:
    entries = list(range(45))
    assert page_count(len(entries), 20) == 3
    assert paginate(entries, 3, 20) == list(range(40, 45))
'''

BASE_FILES = {
    "README.md": README_BASE,
    "ledger/__init__.py": INIT,
    "ledger/amounts.py": AMOUNTS_BASE,
    "ledger/paging.py": PAGING_BASE,
    "tests/test_ledger.py": TESTS,
}


def head_files(variant: Variant) -> dict[str, str]:
    """The files the head commit changes (all three exist in the base too)."""
    end = BUGGY_LINE if variant == "bug" else FIXED_LINE
    return {
        "README.md": README_HEAD,
        "ledger/amounts.py": AMOUNTS_HEAD,
        "ledger/paging.py": PAGING_HEAD.replace("@END@", end),
    }


def buggy_line_number() -> int:
    """The buggy line's number in the head version of ledger/paging.py."""
    return head_files("bug")[BUGGY_FILE].splitlines().index(BUGGY_LINE) + 1


def sample_git_env(date: str) -> dict[str, str]:
    """No global or system git configuration, a fixed identity and date: the same commits everywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
        "GIT_AUTHOR_NAME": NAME, "GIT_AUTHOR_EMAIL": EMAIL, "GIT_COMMITTER_NAME": NAME, "GIT_COMMITTER_EMAIL": EMAIL,
        "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date,
    })
    return env


def _git(path: Path, date: str, *args: str) -> None:
    options = ["-c", f"user.name={NAME}", "-c", f"user.email={EMAIL}", "-c", "commit.gpgsign=false",
               "-c", "core.autocrlf=false", "-c", f"core.hooksPath={os.devnull}", "-c", "init.defaultBranch=main"]
    subprocess.run(["git", *options, *args], cwd=path, env=sample_git_env(date), check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text.encode("utf-8"))


def build_sample(path: Path, variant: Variant = "bug") -> Path:
    """Build the sample repository at `path` (an empty or missing directory); returns it.

    HEAD is the head commit (branch main), HEAD~1 the base.
    """
    if variant not in ("bug", "clean"):
        raise ValueError(f"variant must be 'bug' or 'clean', not {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise ValueError(f"{path} is not empty; the sample repository is built in an empty directory")
    _git(path, BASE_DATE, "init", "-q")
    _write(path, BASE_FILES)
    _git(path, BASE_DATE, "add", "-A")
    _git(path, BASE_DATE, "commit", "-q", "--no-verify", "-m", "ledger 0.3.0: amounts and paging")
    _write(path, head_files(variant))
    _git(path, HEAD_DATE, "add", "-A")
    _git(path, HEAD_DATE, "commit", "-q", "--no-verify", "-m",
         "Paging: pages() and an end index; amounts: thousands separators")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopterm.examples.review.sample",
                                     description="Build the review loop's sample git repository.")
    parser.add_argument("path", type=Path, help="an empty or missing directory")
    parser.add_argument("--clean", action="store_true", help="the change without the planted bug")
    args = parser.parse_args(argv)
    try:
        build_sample(args.path, "clean" if args.clean else "bug")
    except (ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"sample: {exc}", file=sys.stderr)
        return 2
    print(f"built {'clean' if args.clean else 'bug'} sample repository at {args.path.resolve()}: base HEAD~1, head HEAD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
