"""The `loopterm` command line.

Start-up stays fast: this module imports only the standard library at the top;
the engine, the store, rich and (through the model client) litellm load inside
the command that needs them. `loopterm --help` never imports litellm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from loopterm.tui import arguments
from loopterm.tui.console import DEFAULT_DB, USAGE_ERROR, error, store_target


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, what to do), exit 2."""

    def error(self, message: str) -> NoReturn:
        from loopterm.core.text import one_line  # only on a usage error: --help never loads loopterm.core

        self.exit(USAGE_ERROR, f"loopterm: {one_line(message)} (see `{self.prog} --help`)\n")


def _otlp_url(text: str) -> str:
    """--otlp and --endpoint: an OTLP/HTTP URL (checked with the standard library; opentelemetry loads later)."""
    from loopterm.tui.traces import otlp_url

    return otlp_url(text)


def build_parser() -> argparse.ArgumentParser:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="PATH|URL",
                    help=f"the store: a SQLite file or a postgresql:// URL (default: $LOOPTERM_DB or {DEFAULT_DB})")

    parser = _Parser(
        prog="loopterm",
        description="A terminal workbench for supervised LLM loops. With no command: run the built-in demo loop offline.",
    )
    # `loopterm --db X` (no command: the demo in the TUI) and `loopterm --db X COMMAND` name the store too;
    # its own dest, since a subcommand's --db default would overwrite it.
    parser.add_argument("--db", dest="main_db", metavar="PATH|URL",
                        help="the store the demo (or the command after it) uses: a SQLite file or a postgresql:// URL")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", parents=[db], help="run a loop", description="Run a loop (a built-in name or path/to/file.py[:name]).")
    run.add_argument("loop", metavar="LOOP", help="a built-in loop name or path/to/file.py[:name]")
    run.add_argument("--model", help="a litellm model string, e.g. openai/gpt-4o-mini (default: the loop's)")
    run.add_argument("--agent", metavar="CMD",
                     help="a loop whose actor is an ACP coding agent: start this agent instead of the loop's "
                          "(a shell-quoted command line, e.g. 'claude-agent-acp')")
    run.add_argument("--headless", action="store_true", help="no TUI: live progress on the terminal, exit code = outcome")
    run.add_argument("--max-iterations", type=arguments.positive_int, metavar="N")
    run.add_argument("--budget-usd", type=arguments.usd, metavar="X", help="cap on model spend for this run")
    run.add_argument("--budget-tokens", type=arguments.non_negative_int, metavar="N", help="cap on tokens (in + out) for this run")
    run.add_argument("--no-wait", action="store_true",
                     help="headless: when the run needs a person (escalation, approval), exit 4 instead of waiting")
    run.add_argument("--cases", type=Path, metavar="FILE",
                     help="run every case of a cases file (JSON list or JSON lines), headless; exit 0 when every case "
                          "met its expectation, else 3")
    run.add_argument("--parallel", type=arguments.positive_int, metavar="K", help="with --cases: up to K runs at once (default 1)")
    run.add_argument("--otlp", metavar="URL", type=_otlp_url,
                     help="send OpenTelemetry traces live to this OTLP/HTTP endpoint, e.g. http://127.0.0.1:4318")
    run.add_argument("--shadow", action="store_true",
                     help="shadow mode: every tool call the loop proposes goes to a person (agree, edit, deny) and "
                          "nothing is executed; `loopterm eval LOOP --shadow` reports the agreement")
    run.add_argument("--submit", action="store_true",
                     help="record the run and queue it for the cluster's workers (`loopterm worker`) instead of running "
                          "it here; prints its id (a PostgreSQL store)")
    run.add_argument("--approval-timeout", type=arguments.seconds, metavar="S",
                     help="with --headless: deny a tool call no one approved within S seconds (recorded as such); "
                          "the run goes on as after any denial")

    runs = sub.add_parser("runs", parents=[db], help="list runs")
    runs.add_argument("--json", action="store_true")

    show = sub.add_parser("show", parents=[db], help="show a run or one of its iterations")
    show.add_argument("run", metavar="RUN", help="a run id (a unique prefix is enough)")
    show.add_argument("--iteration", type=arguments.positive_int, metavar="N")
    show.add_argument("--json", action="store_true")

    watch = sub.add_parser("watch", parents=[db], help="open the TUI on a run (live or finished), e.g. one running headless")
    watch.add_argument("run", metavar="RUN")

    resume = sub.add_parser("resume", parents=[db], help="continue a crashed, stopped or escalated run")
    resume.add_argument("run", metavar="RUN")
    resume.add_argument("--max-iterations", type=arguments.positive_int, metavar="N", help="raise the run's iteration cap")

    resume.add_argument("--no-wait", action="store_true", help="exit 4 instead of waiting when a person is needed")
    resume.add_argument("--side-effects", choices=["reuse", "reexecute"],
                        help="answer a pending side-effecting call: reuse the recorded result or execute it again")
    resume.add_argument("--otlp", metavar="URL", type=_otlp_url, help="send OpenTelemetry traces live to this OTLP/HTTP endpoint")
    resume.add_argument("--submit", action="store_true",
                        help="queue the run's next segment for the cluster's workers instead of running it here")

    answer = sub.add_parser("answer", parents=[db], help="answer what a run waits on (an escalation or an approval), without a screen",
                            description="Answer a run's pending escalation (add facts, set the subgoal, relax an invariant, "
                                        "then go on, or abort it) or its pending approval. The executing process obeys at "
                                        "once; a run nothing executes takes the answer when it is resumed.")
    answer.add_argument("run", metavar="RUN")
    answer.add_argument("--fact", action="append", default=[], metavar="TEXT", help="add a fact to working memory (repeatable)")
    answer.add_argument("--subgoal", metavar="TEXT", help="override the subgoal")
    answer.add_argument("--relax", action="append", default=[], metavar="NAME", help="relax an invariant (repeatable; needs --reason)")
    answer.add_argument("--reason", default="", help="why (recorded with a relaxation, an abort or a denial)")
    what = answer.add_mutually_exclusive_group()
    what.add_argument("--abort", action="store_true", help="stop the run instead of going on (answers the escalation)")
    what.add_argument("--approve", action="store_true", help="approve the pending tool call")
    what.add_argument("--deny", action="store_true", help="deny the pending tool call")

    fork = sub.add_parser("fork", parents=[db], help="branch a run from one of its iterations",
                          description="Continue a run from iteration N as a new branch; nothing of the parent is copied.")
    fork.add_argument("run", metavar="RUN")
    fork.add_argument("--at", type=arguments.positive_int, required=True, metavar="N", help="the iteration to continue from")
    fork.add_argument("--set", action="append", default=[], metavar="PATH=JSON",
                      help="patch the state at N, e.g. memory.subgoal='\"try X\"' (repeatable)")
    fork.add_argument("--relax", action="append", default=[], metavar="NAME", help="relax an invariant on the branch (repeatable)")
    fork.add_argument("--model", help="continue with another model")
    fork.add_argument("--reason", default="", help="why (recorded in the event log)")
    fork.add_argument("--headless", action="store_true")
    fork.add_argument("--no-wait", action="store_true", help="exit 4 instead of waiting when a person is needed")
    fork.add_argument("--dry-run", action="store_true", help="check the fork and list side-effecting calls it may reach again; create nothing")
    fork.add_argument("--otlp", metavar="URL", type=_otlp_url, help="send the branch's OpenTelemetry traces live to this OTLP/HTTP endpoint")

    export = sub.add_parser("export", parents=[db],
                            help="write a run (its whole lineage) as JSON lines, or send it as OpenTelemetry traces")
    export.add_argument("run", metavar="RUN")
    export.add_argument("--format", choices=["jsonl", "otlp"], default="jsonl",
                        help="jsonl: a file `loopterm import` reads; otlp: traces sent to --endpoint")
    export.add_argument("--endpoint", metavar="URL", type=_otlp_url,
                        help="with --format otlp: the OTLP/HTTP endpoint, e.g. http://127.0.0.1:4318 (default: "
                             "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT)")
    export.add_argument("--output", "-o", type=Path, metavar="FILE", help="write here instead of standard output")

    imp = sub.add_parser("import", parents=[db], help="import runs from a `loopterm export` file")
    imp.add_argument("file", type=Path, metavar="FILE")

    replay = sub.add_parser("replay", parents=[db], help="re-drive a run with its recorded model outputs; report divergence",
                            description="Drive the run's loop (its current definition) with a replay/<run> model that answers "
                                        "with the recorded responses, and report the first iteration where the decision, gate "
                                        "results or invariant status diverge. Exit 0 identical, 3 diverged.")
    replay.add_argument("run", metavar="RUN", help="a run id (a unique prefix is enough)")
    replay.add_argument("--json", action="store_true")

    evaluate = sub.add_parser(
        "eval", parents=[db], help="run a loop over a cases file and measure it",
        description="Run every case of a cases file (in the normal store, so the runs can be watched and forked later) "
                    "and report, per case and in total: convergence, iterations to convergence, termination reason, "
                    "invariant violation rate, tokens, cost (and per converged case), latency p50/p95, expectations. "
                    "Exit 0, or 3 when the convergence rate is below --min-convergence.")
    evaluate.add_argument("loop", metavar="LOOP", help="a built-in loop name or path/to/file.py[:name]")
    evaluate.add_argument("--cases", type=Path, metavar="FILE", help="the cases file (JSON list or JSON lines)")
    evaluate.add_argument("--parallel", type=arguments.positive_int, metavar="K", help="up to K runs at once (default 1)")
    evaluate.add_argument("--model", help="a litellm model string for every case that does not name its own")
    evaluate.add_argument("--json", action="store_true", help="the report as JSON (stable keys; see README)")
    evaluate.add_argument("--min-convergence", type=arguments.fraction, metavar="R",
                          help="exit 3 when fewer than this share (0..1) of the cases converged")
    evaluate.add_argument("--submit", action="store_true",
                          help="record one run per case and queue them for the cluster's workers; prints `case run` "
                               "lines (submitting the same batch again makes nothing twice)")
    evaluate.add_argument("--batch", metavar="NAME",
                          help="with --submit: the batch's name (default: derived from the loop, the cases file and the "
                               "options); a new name submits the same cases again as new runs")
    evaluate.add_argument("--shadow", action="store_true",
                          help="instead of running cases: report the loop's shadow runs, per tool: proposals, agreed, "
                               "edited, denied, agreement rate")
    evaluate.add_argument("--run", metavar="RUN", help="with --shadow: only this shadow run")
    evaluate.add_argument("--min-agreement", type=arguments.fraction, metavar="R",
                          help="with --shadow: exit 3 when the agreement rate (0..1) is below R")

    sub.add_parser("loops", help="list built-in and discovered loops")

    from loopterm.tui import budget_cli, memory_cli, policy_cli, prune_cli  # standard library only at import

    memory_cli.add_parser(sub, db)
    budget_cli.add_parser(sub, db)
    policy_cli.add_parser(sub, db)
    prune_cli.add_parser(sub, db)
    from loopterm.tui import daemon_cli  # standard library only at import

    daemon_cli.add_parser(sub, db)
    from loopterm.tui import diff_cli  # standard library only at import

    diff_cli.add_parser(sub, db)
    from loopterm.tui import worker_cli  # standard library only at import

    worker_cli.add_parser(sub, db)
    from loopterm.tui import db_cli  # standard library only at import

    db_cli.add_parser(sub, db)
    from loopterm.tui import new_cli  # standard library only at import

    new_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loopterm.core.errors import LooptermError
    from loopterm.core.settings import settings
    from loopterm.core.text import one_line

    try:
        settings()  # every LOOPTERM_* value is checked before any command starts: a bad one is one line, exit 2
        return _dispatch(args)
    except LooptermError as exc:
        error(exc)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("loopterm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the person, the traceback on request
        if _debug():
            raise
        failure = _store_failure(exc, args)
        if failure is not None:  # the database failed under us: full, locked too long, damaged, read-only
            message, bad_input = failure
            print(f"loopterm: {message}", file=sys.stderr)
            return USAGE_ERROR if bad_input else 1
        error(f"unexpected error: {exc.__class__.__name__}: {one_line(exc, 500)} (set LOOPTERM_DEBUG=1 for the traceback)")
        return 1


def _debug() -> bool:
    """$LOOPTERM_DEBUG; off when a LOOPTERM_ value is bad (this runs while reporting another error)."""
    from loopterm.core.errors import LooptermError
    from loopterm.core.settings import settings

    try:
        return settings().debug
    except LooptermError:
        return False


def _store_failure(exc: BaseException, args: argparse.Namespace) -> tuple[str, bool] | None:
    """One line for a database error anywhere in the cause chain (a full disk mid-run, a lock held too long, a
    page found damaged while reading, a PostgreSQL server gone), naming the store (never a password); None if
    the error is not the store's."""
    from loopterm.core.errors import LooptermError
    from loopterm.store.guard import describe_failure

    try:
        target = store_target(args)
    except LooptermError:  # a bad LOOPTERM_ value must not hide the error being reported
        target = None
    db = target.path if target is not None and target.path is not None else Path(getattr(args, "db", None) or DEFAULT_DB)
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        cause = pending.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        described = (describe_failure(cause, db) if target is None or target.path is not None
                     else _server_failure(cause, target.shown))
        if described is not None:
            return described
        pending.extend(e for e in (cause.__cause__, cause.__context__) if e is not None)
        if isinstance(cause, BaseExceptionGroup):  # a batch's runs fail together
            pending.extend(cause.exceptions)
    return None


def _submitted(args: argparse.Namespace) -> int | None:
    """`--submit` (tui/submit_cli.py): handed to the cluster's workers; None when not asked for."""
    if not getattr(args, "submit", False):
        return None
    from loopterm.tui import submit_cli

    location = submit_cli.store_location(args)
    if args.command == "resume":
        if args.otlp is not None or args.no_wait or args.max_iterations is not None:
            error("--submit goes without --otlp, --no-wait and --max-iterations (a worker runs it)")
            return USAGE_ERROR
        return submit_cli.submit_resume(location, args.run, side_effects=args.side_effects)
    if args.command == "eval":
        if args.cases is None or args.shadow or args.parallel is not None:
            error("eval --submit needs --cases FILE, and goes without --shadow and --parallel (workers run the cases)")
            return USAGE_ERROR
        return submit_cli.submit_cases(args.loop, location, cases_file=args.cases, model=args.model, batch=args.batch)
    if args.cases is not None:
        return submit_cli.submit_cases(args.loop, location, cases_file=args.cases, model=args.model,
                                       max_iterations=args.max_iterations, budget_usd=args.budget_usd,
                                       budget_tokens=args.budget_tokens)
    if args.otlp is not None or args.parallel is not None or args.approval_timeout is not None:
        error("run --submit goes without --otlp, --parallel and --approval-timeout (a worker runs it)")
        return USAGE_ERROR
    return submit_cli.submit_run(args.loop, location, model=args.model, max_iterations=args.max_iterations,
                                 budget_usd=args.budget_usd, budget_tokens=args.budget_tokens, shadow=args.shadow)


def _server_failure(exc: BaseException, shown: str) -> tuple[str, bool] | None:
    """One line for a PostgreSQL failure mid-command (the server went away, a connection dropped): exit 1."""
    psycopg = sys.modules.get("psycopg")  # loaded only for a postgresql:// store: never imported here
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return None
    from loopterm.core.text import one_line
    from loopterm.store.target import redact_text

    detail = redact_text(one_line(exc, 300))
    return (f"the PostgreSQL store {shown} failed: {detail}; check the server, then try again; nothing already "
            f"committed is lost (`loopterm resume RUN` continues a run from its last committed iteration)"), False


def _dispatch(args: argparse.Namespace) -> int:
    from loopterm.tui import commands

    if args.command is None:
        return commands.demo(store_target(args))
    if args.command == "new":
        from loopterm.tui import new_cli

        return new_cli.run(args)
    if args.command == "worker":
        from loopterm.tui import worker_cli

        return worker_cli.run(args)
    submitted = _submitted(args)
    if submitted is not None:
        return submitted
    if args.command == "run" and args.shadow and (args.cases is not None or args.parallel is not None):
        from loopterm.tui import shadow_cli

        shadow_cli.refuse_with_cases()
    if args.command == "run" and args.agent is not None:
        if args.model is not None:
            print("loopterm: --agent and --model do not go together (an agent loop's actor is the agent)",
                  file=sys.stderr)
            return USAGE_ERROR
        from loopterm.core.agent_loop import AGENT_MODEL
        from loopterm.core.agent_spec import AgentSpec

        try:
            AgentSpec.from_command_line(args.agent)
        except ValueError as exc:
            print(f"loopterm: {exc}", file=sys.stderr)
            return USAGE_ERROR
        from loopterm.core.secrets import redact

        if redact(args.agent) != args.agent:  # it would be stored as the run's model and shown on every screen
            print("loopterm: --agent holds what looks like a key; set it in the environment instead (the loop's "
                  "AgentSpec env_from names what the agent gets)", file=sys.stderr)
            return USAGE_ERROR
        args.model = AGENT_MODEL + args.agent  # recorded as the run's model: a resume starts the same agent
    if args.command == "run" and args.otlp is not None and (args.cases is not None or args.parallel is not None):
        print("loopterm: --otlp does not go with --cases or --parallel yet; run the cases, then "
              "`loopterm export RUN --format otlp` the runs you want to see", file=sys.stderr)
        return USAGE_ERROR
    if args.command == "run" and (args.cases is not None or args.parallel is not None):
        from loopterm.tui import eval_cli

        return eval_cli.run_batch(args.loop, store_target(args), cases_file=args.cases, parallel=args.parallel,
                                  model=args.model, max_iterations=args.max_iterations, budget_usd=args.budget_usd,
                                  budget_tokens=args.budget_tokens)
    if args.command == "eval":
        from loopterm.tui import eval_cli, shadow_cli

        shadow_cli.check_eval_arguments(cases=args.cases, shadow=args.shadow, run=args.run,
                                        min_agreement=args.min_agreement, parallel=args.parallel, model=args.model,
                                        min_convergence=args.min_convergence)
        if args.shadow:
            return shadow_cli.eval_shadow(args.loop, store_target(args), run=args.run, as_json=args.json,
                                          min_agreement=args.min_agreement)
        return eval_cli.eval_cases(args.loop, store_target(args), cases_file=args.cases, parallel=args.parallel,
                                   model=args.model, as_json=args.json, min_convergence=args.min_convergence)
    if args.command == "run" and args.approval_timeout is not None and (not args.headless or args.no_wait):
        print("loopterm: --approval-timeout goes with --headless and without --no-wait (it denies a call no one "
              "answered in time)", file=sys.stderr)
        return USAGE_ERROR
    if args.command == "run":
        return commands.run(args.loop, store_target(args), model=args.model, headless=args.headless,
                            max_iterations=args.max_iterations, budget_usd=args.budget_usd,
                            budget_tokens=args.budget_tokens, otlp=args.otlp, wait=not args.no_wait, shadow=args.shadow,
                            approval_timeout=args.approval_timeout)
    if args.command == "watch":
        return commands.watch(store_target(args), args.run)
    if args.command == "runs":
        return commands.runs(store_target(args), as_json_out=args.json)
    if args.command == "show":
        return commands.show(store_target(args), args.run, iteration=args.iteration, as_json_out=args.json)
    if args.command == "resume":
        return commands.resume(store_target(args), args.run, max_iterations=args.max_iterations,
                               side_effects=args.side_effects, otlp=args.otlp, wait=not args.no_wait)
    if args.command == "answer":
        return commands.answer(store_target(args), args.run, facts=args.fact, subgoal=args.subgoal, relax=args.relax,
                               reason=args.reason, abort=args.abort, approve=args.approve, deny=args.deny)
    if args.command == "fork":
        return commands.fork(store_target(args), args.run, at=args.at, sets=args.set, relax=args.relax, model=args.model,
                             reason=args.reason, dry_run=args.dry_run, otlp=args.otlp, wait=not args.no_wait)
    if args.command == "export" and (args.format == "otlp" or args.endpoint is not None):
        if args.format != "otlp" or args.output is not None:
            wrong = "--endpoint goes with --format otlp" if args.format != "otlp" else "--output goes with --format jsonl"
            print(f"loopterm: {wrong} (see `loopterm export --help`)", file=sys.stderr)
            return USAGE_ERROR
        return commands.export_otlp(store_target(args), args.run, endpoint=args.endpoint)
    if args.command == "export":
        return commands.export(store_target(args), args.run, output=args.output)
    if args.command == "import":
        return commands.import_file(store_target(args), args.file)
    if args.command == "replay":
        return commands.replay(store_target(args), args.run, as_json_out=args.json)
    if args.command == "loops":
        return commands.loops()
    if args.command == "memory":
        from loopterm.tui import memory_cli

        return memory_cli.run(args, store_target(args))
    if args.command == "policy":
        from loopterm.tui import policy_cli

        return policy_cli.run(args, store_target(args))
    if args.command == "budget":
        from loopterm.tui import budget_cli

        return budget_cli.run(args, store_target(args))
    if args.command == "prune":
        from loopterm.tui import prune_cli

        return prune_cli.run(args, store_target(args))
    if args.command == "daemon":
        from loopterm.tui import daemon_cli

        return daemon_cli.run(args, store_target(args))
    if args.command == "diff":
        from loopterm.tui import diff_cli

        return diff_cli.run(args, store_target(args))
    if args.command == "db":
        from loopterm.tui import db_cli

        return db_cli.run(args, store_target(args) if args.db_action == "init" else None)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
