"""The work queues of a loopterm cluster: run segments on DBOS queues, one queue per model provider.

A run segment (core/segments.py) is the queued unit: "drive run R from its journal until it ends or waits on
a person". It is a DBOS workflow named `loopterm.segment` taking the run id; its queue is the provider of the
run's model (`anthropic/...` -> `loopterm-anthropic`, the offline `scripted/...` -> `loopterm-scripted`), so
the caps in LOOPTERM_PROVIDER_LIMITS (concurrency, starts per minute) hold for that provider across every
worker: DBOS keeps a queue's limits in its table and checks them in the database when a worker dequeues.

Two ids make enqueueing safe to repeat from any process:
- the workflow id names the cause (`<run>/start`, `<run>/c<command id>`, `<run>/resume-<event id>`): DBOS
  attaches a second enqueue with the same id to the first, forever, so a retried submit or two workers
  seeing the same answer enqueue one segment;
- the deduplication id is the run id: while a segment of a run is queued or running, DBOS refuses another
  on its queue, so two segments of one run never run at once (the store's per-run lock backs this up).

DBOS's system tables live in the queue database: the store's own PostgreSQL unless LOOPTERM_QUEUE_DB names
another. dbos and psycopg are imported only here (and in core/takeover.py), inside functions, so a SQLite user
never loads them.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from loopterm.core.errors import ConfigError

APP = "loopterm"
# Workflows recover only onto workers of the same application version: bump this when the segment
# workflow's name, arguments or steps change (a worker of another version leaves them alone).
APP_VERSION = "loopterm-segments-1"
WORKFLOW = "loopterm.segment"
QUEUE_PREFIX = "loopterm-"
WORKER_SLOT = 1  # every loopterm queue's stored worker_concurrency: see _cap_per_worker
POLL_S = 0.5  # how often a worker looks at each queue for work
MAX_RECOVERIES = 20  # a segment whose worker dies this often (a tool that kills the process) is given up on


def provider_of(model: str) -> str:
    """The provider a model's calls go to: its litellm prefix (`anthropic/claude-...` -> anthropic); a bare
    name (`gpt-4o-mini`) asks litellm when it is loaded already (a submit's preflight loads it), else `default`."""
    prefix, slash, _ = model.partition("/")
    if slash and prefix:
        return prefix.lower()
    if "litellm" in sys.modules:
        try:
            return str(sys.modules["litellm"].get_llm_provider(model=model)[1]).lower()
        except Exception:  # noqa: BLE001 - litellm cannot tell: the default queue
            pass
    return "default"


def queue_name(model: str) -> str:
    """The queue of a run on this model: `loopterm-<provider>` (characters DBOS names do not like become -)."""
    return QUEUE_PREFIX + re.sub(r"[^a-z0-9_.-]", "-", provider_of(model))[:60]


def redact_url(url: str) -> str:
    """A database URL fit to print: the password (and any query string) replaced."""
    url = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
    return url.split("?", 1)[0]


def is_postgres(location: object) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def queue_db(store_location: object, *, what: str) -> str:
    """The PostgreSQL URL of the work queues for a store: LOOPTERM_QUEUE_DB, else the store's own URL. A SQLite
    store without LOOPTERM_QUEUE_DB is refused with one line (`what`: the command refused)."""
    from loopterm.core.settings import settings

    configured = settings().queue_db
    if configured:
        return configured
    if is_postgres(store_location):
        return str(store_location)
    raise ConfigError(f"{what} needs a PostgreSQL store: the store is the SQLite file {store_location}; give "
                      "--db postgresql://USER@HOST/DB (`loopterm db copy` moves a SQLite store there)")


def _sqlalchemy_url(url: str) -> str:
    """DBOS takes a SQLAlchemy URL: the psycopg 3 driver, which the cluster extra installs."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


def limits_for(provider: str) -> dict[str, Any]:
    """DBOS queue options for a provider from LOOPTERM_PROVIDER_LIMITS (nothing: no caps)."""
    from loopterm.core.settings import settings

    caps = settings().provider_limits.get(provider)
    options: dict[str, Any] = {}
    if caps is not None and caps.concurrency is not None:
        options["global_concurrency"] = caps.concurrency
    if caps is not None and caps.starts_per_minute is not None:
        options["limiter"] = {"limit": caps.starts_per_minute, "period": 60.0}
    return options


def segment_id(run_id: str, cause: str) -> str:
    """The workflow id of a run's segment started by `cause` (start, c<command id>, resume-<event id>)."""
    return f"{run_id}/{cause}"


def batch_run_id(batch: str, case_id: str) -> str:
    """A case's run id in a submitted batch: the same for the same batch and case, so a retried submit
    finds the run it made before instead of making another."""
    return hashlib.sha256(f"{batch}\0{case_id}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Enqueued:
    """What an enqueue did: `fresh` False when that segment (the same cause) or another segment of the run
    was queued or running already."""

    workflow_id: str
    queue: str
    fresh: bool


class Queues:
    """Enqueueing from any process (a submit, the daemon, a worker's answer watcher): a DBOS client on the
    queue database; nothing runs here. The system tables are created on first use if no worker made them."""

    def __init__(self, url: str) -> None:
        from dbos import DBOS, DBOSClient

        self.url = url
        try:
            DBOS.migrate(_sqlalchemy_url(url))  # idempotent: a submit before any worker ever started works too
            self.client = DBOSClient(system_database_url=_sqlalchemy_url(url), application_name=APP,
                                     retry_connection_errors=False)
        except Exception as exc:  # noqa: BLE001 - cannot reach it, no such database, no access
            raise ConfigError(f"cannot reach the queue database {redact_url(url)}: {_reason(exc)}; check the URL and "
                              "that the server is up") from None
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.destroy()

    def __enter__(self) -> Queues:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def ensure_queue(self, name: str, provider: str) -> None:
        """Make the queue if it is missing, with the configured caps; an existing queue keeps its settings
        (workers set them from their own configuration when they start)."""
        with self._lock:
            if name in self._registered:
                return
            if self.client.retrieve_queue(name) is None:
                self.client.register_queue(name, on_conflict="never_update", worker_concurrency=WORKER_SLOT,
                                           polling_interval_sec=POLL_S, **limits_for(provider))
            self._registered.add(name)

    def enqueue(self, run_id: str, model: str, cause: str) -> Enqueued:
        """Queue a segment of run `run_id` (on its model's provider queue), idempotently per cause."""
        from dbos._error import DBOSQueueDeduplicatedError

        name = queue_name(model)
        self.ensure_queue(name, provider_of(model))
        workflow_id = segment_id(run_id, cause)
        if self._known(workflow_id):  # enqueued before (a retried submit, another worker saw the same answer)
            return Enqueued(workflow_id, name, False)
        try:
            self.client.enqueue({"queue_name": name, "workflow_name": WORKFLOW, "workflow_id": workflow_id,
                                 "deduplication_id": run_id, "app_version": APP_VERSION,
                                 "application_name": APP}, run_id)
        except DBOSQueueDeduplicatedError:
            return Enqueued(workflow_id, name, False)
        return Enqueued(workflow_id, name, True)

    def _known(self, workflow_id: str) -> bool:
        return bool(self.client.list_workflows(workflow_ids=[workflow_id], load_input=False, load_output=False))

    def segments(self, run_id: str) -> list[Any]:
        """Every segment of a run DBOS knows (oldest first): whether a run belongs to the cluster."""
        return list(self.client.list_workflows(workflow_id_prefix=f"{run_id}/", load_input=False,
                                               load_output=False))

    def active(self, run_id: str) -> bool:
        """Whether a segment of this run is queued or running now."""
        return any(w.status in ("ENQUEUED", "PENDING", "DELAYED") for w in self.segments(run_id))


def _reason(exc: BaseException) -> str:
    from loopterm.core.text import one_line

    return redact_url(one_line(str(exc) or exc.__class__.__name__, 300))


# ----------------------------------------------------------------------------- a worker's side


def launch_worker(url: str, executor_id: str, segment: Callable[[str], dict[str, Any]], *,
                  concurrency: int) -> Any:
    """Start DBOS in this process as a worker: the segment workflow registered, every provider queue of
    LOOPTERM_PROVIDER_LIMITS set to its caps, at most `concurrency` segments at once here. Returns DBOS."""
    from dbos import DBOS

    slots = threading.BoundedSemaphore(concurrency)

    # A segment is a resume from the journal, so running it again is safe: a failure that is not the run's
    # (the store's connection dropped, say) is retried, 2 + 4 + 8 + 16 s apart, before the segment fails.
    @DBOS.step(name="loopterm.drive", retries_allowed=True, interval_seconds=2.0, max_attempts=5, backoff_rate=2.0,
               should_retry=lambda exc: not isinstance(exc, ConfigError))
    def drive(run_id: str) -> dict[str, Any]:
        return segment(run_id)

    @DBOS.workflow(name=WORKFLOW, max_recovery_attempts=MAX_RECOVERIES)
    def run_segment(run_id: str) -> dict[str, Any]:
        with slots:  # exact, whatever the dequeue raced (see _cap_per_worker)
            return drive(run_id)

    config: dict[str, Any] = {
        "name": APP, "system_database_url": _sqlalchemy_url(url), "application_version": APP_VERSION,
        "executor_id": executor_id, "log_level": "WARNING", "notification_listener_polling_interval_sec": 0.2,
        "sys_db_pool_size": concurrency + 4,  # the segments' step records, the queue threads, recovery
    }
    DBOS(config=config)  # type: ignore[arg-type]
    DBOS.launch()
    from loopterm.core.settings import settings

    for provider, _ in settings().provider_limits.items():
        DBOS.register_queue(QUEUE_PREFIX + provider, on_conflict="always_update", worker_concurrency=WORKER_SLOT,
                            polling_interval_sec=POLL_S, **limits_for(provider))
    _cap_per_worker(concurrency)
    return DBOS


def _cap_per_worker(concurrency: int) -> None:
    """At most `concurrency` segments dequeued by this process, across every provider queue.

    DBOS keeps a queue's worker_concurrency in its table, the same for every worker; a per-process cap
    across queues it does not have. Its dequeue takes the queue's worker_concurrency minus what it is told
    runs here (`count_for_queue`). Every loopterm queue stores worker_concurrency 1 (WORKER_SLOT), and this
    process answers with every segment running here (any queue) plus 1 minus `concurrency`: the room left
    is exactly `concurrency` minus what runs. Two queues dequeuing in the same instant may overshoot by
    one; the workflow's own semaphore then makes it wait for a slot.
    """
    from dbos._dbos import _get_dbos_instance

    active = _get_dbos_instance()._active_workflows_set
    original = active.count_for_queue

    def count_for_queue(name: str) -> int:
        if not name.startswith(QUEUE_PREFIX):
            return int(original(name))
        return len(active.activeList()) + WORKER_SLOT - concurrency

    active.count_for_queue = count_for_queue
