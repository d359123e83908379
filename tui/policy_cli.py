"""`loopterm policy list|revoke`: the approval policies people made (core/approval_policy.py), and taking one back.

Start-up stays fast: only the standard library at the top; the store and rich load inside `run`. A policy is
made from the approval dialog (the TUI, `loopterm watch`); here it is read and revoked. A revocation is
recorded in the log of the run that made the policy, and applies at the next call that would have matched.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loopterm.store.target import StoreTarget


def add_parser(sub: Any, db: argparse.ArgumentParser) -> None:
    """The `policy` subcommand; `db` is the parent parser that carries --db."""
    policy = sub.add_parser(
        "policy", parents=[db], help="list or revoke approval policies",
        description="Approval policies approve (or deny) calls of a tool whose arguments match globs, without asking, "
                    "for the rest of a run or for every run of its loop. They are made from the approval dialog "
                    "(a, d in the TUI); here they are listed and revoked.")
    actions = policy.add_subparsers(dest="policy_command", metavar="list|revoke", required=True, parser_class=type(policy))
    listing = actions.add_parser("list", parents=[db], help="the policies in force for a run, a loop, or all")
    listing.add_argument("run", nargs="?", metavar="RUN",
                         help="a run id (a unique prefix is enough): its own policies and its loop's")
    listing.add_argument("--loop", metavar="REF", help="the policies made in runs of this loop (its loop_ref)")
    listing.add_argument("--all", action="store_true", help="revoked policies too")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", parents=[db], help="revoke a policy: the next matching call is asked")
    revoke.add_argument("id", metavar="ID", help="the policy's id (a unique prefix is enough)")
    revoke.add_argument("--reason", default="", help="why (recorded in the log)")


def as_dict(policy: Any) -> dict[str, Any]:
    """A policy as `--json` prints it (stable keys)."""
    return {
        "id": policy.id, "effect": policy.rule.effect, "scope": policy.rule.scope, "tool": policy.rule.tool,
        "globs": policy.rule.globs, "reason": policy.rule.reason, "run": policy.run_id, "loop_ref": policy.loop_ref,
        "iteration": policy.iteration, "created": policy.ts, "revoked": policy.revoked,
        "revoke_reason": policy.revoke_reason or None,
        "decided": [{"run": run, "iteration": n, "tool": tool} for run, n, tool in policy.decided],
    }


def run(args: argparse.Namespace, db: StoreTarget) -> int:
    from loopterm.core.errors import ConfigError
    from loopterm.store import policies as stored

    if args.policy_command == "list" and args.run is not None and args.loop is not None:
        raise ConfigError("give a RUN or --loop REF, not both (see `loopterm policy list --help`)")
    if not db.exists():
        raise ConfigError(f"no database at {db}; give --db, or run a loop first")
    with db.open(create=False) as store:
        if args.policy_command == "revoke":
            policy = stored.revoke(store, args.id, args.reason)
            from rich.text import Text

            _console().print(Text(f"revoked policy {policy.id} ({policy.describe()}); the next matching call is asked"))
            return 0
        if args.run is not None:
            found = stored.policies(store, run=store.resolve_run(args.run))
        else:
            found = stored.policies(store, loop_ref=args.loop)
    shown = [p for p in found if args.all or not p.revoked]
    if args.json:
        from loopterm.tui.headless import as_json

        print(as_json([as_dict(p) for p in shown]))
        return 0
    _print(shown, args)
    return 0


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _print(policies: list[Any], args: argparse.Namespace) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    if not policies:
        where = f"run {args.run}" if args.run else (f"loop {args.loop}" if args.loop else "this database")
        console.print(Text(f"no approval policies in force for {where} (made from the approval dialog: a, d in the TUI)"))
        return
    table = Table(box=None, header_style="bold")
    for col in ("id", "effect", "scope", "tool", "globs", "decided", "made in", "reason"):
        table.add_column(col, overflow="fold")
    for p in policies:
        globs = "\n".join(f"{k}={v}" for k, v in p.rule.globs.items()) or "(any arguments)"
        effect = Text(("✓ " if p.rule.effect == "approve" else "✗ ") + p.rule.effect,
                      style="green" if p.rule.effect == "approve" else "red")
        if p.revoked:
            effect = Text(f"■ revoked ({p.rule.effect})", style="dim")
        scope = "this run" if p.rule.scope == "run" else f"loop {p.loop_ref}"
        table.add_row(p.id, effect, Text(scope), Text(p.rule.tool), Text(globs), str(len(p.decided)),
                      Text(f"{p.run_id[:8]} @{p.iteration or 0}"), Text(p.revoke_reason or p.rule.reason or "-"))
    console.print(table)
