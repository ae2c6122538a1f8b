"""Running and stopping the streaming queries: a stop never cuts a micro-batch in the middle.

Role: shared by the streaming queries. Inputs: a started
:class:`~pyspark.sql.streaming.StreamingQuery`, either with a ``foreachBatch`` handler wrapped by
its :class:`BatchGate` (ingest, record-sends) or with a sink of its own (serve's Kafka sink, see
:func:`stop_between_batches`). Outputs: :func:`await_query` blocks until the query ends, and stops it
between micro-batches when asked: by a *stop request* (a marker file beside the query's
checkpoint, written by ``./spark-submit.sh stop ingest|serve`` from any machine that reaches the
storage: the way to stop a driver on a cluster), or by SIGTERM / SIGINT reaching the driver's
Python process.

Why: Spark has no "stop after this batch". ``query.stop()`` interrupts the running batch
wherever it is; the batch is replayed idempotently on the next start, so nothing is lost, but
interrupting the Python handler in a Spark action floods the driver log (the interrupted
callback's traceback; Spark's stream thread can even die of a ``StackOverflowError`` matching it
against a pattern). The handler is our own code, so its start and end are known exactly: the gate
lets a stop wait for the running handler and keeps the next one from starting.

While it runs, each always-on query keeps a *lease* beside its checkpoint (:class:`QueryLease`).
Jobs that must not commit beside it read it: ``rebuild-profiles`` always, and on S3 with Delta's
single-driver log store every job that commits to the query's tables. There, batch jobs hold a
*writer lease* on the tables they commit to (:func:`writing_tables`: ``maintain``,
``forget-user``, ``campaign``, ``rebuild-profiles``, ``upload-catalog``, the model's publish and
``rollback``), and a query does not start while one holds one of its tables
(:meth:`QueryLease.claim`). A running ``ingest`` or ``record-sends`` makes way for such a job: it
holds its micro-batches back at its gate and says so in its lease (:meth:`QueryLease.make_way`),
and the job waits for that (``storage.writer_wait_seconds``) instead of being refused; ``serve``
holds its trending refreshes back the same way.

Under ``spark-submit`` the driver's Python process is a child of the ``SparkSubmit`` JVM, and a
SIGTERM or SIGINT to that JVM shuts Spark down at once (its shutdown hooks): the running batch is
cut and replayed on the next start. Use the stop request for a clean stop.

    query = run(spark, cfg)                              # wraps its handler in gate_for(name)
    await_query(spark, query, cfg.serving.stop_timeout_seconds, stop_marker(cfg, name))
    ./spark-submit.sh stop serve                         # from anywhere: stop it between batches
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

from py4j.protocol import Py4JError, Py4JJavaError
from pyspark import SparkContext
from pyspark.errors import StreamingQueryException
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery

from carousel.config import CarouselConfig, StreamingQuerySection
from carousel.errors import JobError, java_reason, one_line
from carousel.local_process import process_gone, process_space, process_state
from carousel.schemas import (
    ERASED_USERS_TABLE,
    EVENTS_TABLE,
    INGEST_LOG_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
    TRENDING_TABLE,
)
from carousel.storage import delete_file, file_exists, publish_small_file, read_text_file, write_small_file

__all__ = [
    "BatchGate",
    "QueryFailedError",
    "QueryLease",
    "RunningWriter",
    "StopRequestedError",
    "WriterLease",
    "await_query",
    "gate_for",
    "held_by",
    "lease_holder",
    "lease_keeper",
    "lease_path",
    "one_run_at_a_time",
    "query_lease",
    "request_stop",
    "running_writers",
    "single_driver_commits",
    "stop_between_batches",
    "stop_main",
    "stop_marker",
    "writer_leases_folder",
    "writing_tables",
]

STOP_MARKER_NAME = "_stop_requested"
LEASE_NAME = "_running"
# Batch jobs' writer leases (S3 only; a campaign's run lease everywhere): one file per run of a job,
# in this folder of the checkpoints.
WRITER_LEASES_FOLDER = "_writer_leases"
_WRITER_LEASE_SUFFIX = ".json"
# A writer lease lapsed this many times its lifetime ago is deleted by whoever reads it: its job
# was killed (a finished job deletes its own).
_STALE_LEASE_LIFETIMES = 10
_YIELD_POLL_SECONDS = 1.0  # how often a batch job looks whether the queries in its way hold back
_MAKE_WAY_EVERY_SECONDS = 1.0  # a query reads the writer leases at most this often
_WARNED: set[str] = set()  # the unreadable or undeletable leases warned about (once each)

log = logging.getLogger(__name__)
T = TypeVar("T")

_GATES: dict[str, BatchGate] = {}
_HELD_POLL_SECONDS = 0.5  # how often a held handler looks at its gate again
_GATES_LOCK = threading.Lock()


class QueryFailedError(RuntimeError):
    """A streaming query ended on an error of its own: ``summary`` is its message, ``detail`` the
    whole failure with the class names and messages of its cause chain (Java and Python)."""

    def __init__(self, query_name: str, summary: str, detail: str) -> None:
        super().__init__(f"{query_name} failed: {summary}")
        self.summary, self.detail = summary, detail


def failure_detail(query: StreamingQuery) -> str:
    """The failed query's whole error: its JVM stack trace text, with every ``Caused by:`` (the Java
    exception classes) and a Python handler's traceback (the Python exception classes)."""
    error = query._jsq.exception()  # the JVM side: PySpark's wrapper keeps only the outer message
    if not error.isDefined():
        return ""
    jvm = SparkContext._jvm
    assert jvm is not None  # a query exists, so the session's JVM does
    return str(getattr(jvm, "org.apache.spark.util.Utils").exceptionString(error.get()))


class AlreadyRunningError(JobError):
    """Another process runs the query (its lease says so): this one does not start, or stops."""


class StopRequestedError(RuntimeError):
    """A micro-batch refused to start because its query is stopping (Spark replays it next start)."""


class _RefusedBatchFilter(logging.Filter):
    """Drops py4j's ERROR record (with a Python traceback) of a micro-batch refused because its
    query is stopping: a clean stop is logged once, as what it is (:func:`await_query`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StopRequestedError))


# py4j logs every exception a Python callback (a foreachBatch handler) raises, before Spark sees it.
logging.getLogger("py4j.clientserver").addFilter(_RefusedBatchFilter())


class BatchGate:
    """Serialises a query's foreachBatch handler with the query's stop.

    The handler runs inside :meth:`wrap`'s function, under a lock. :meth:`close` takes the lock
    (so it waits, up to a timeout, for a running handler to return) and marks the gate closed: a
    handler that starts afterwards raises :class:`StopRequestedError` before touching anything,
    so Spark does not commit that batch and replays it on the next start.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._held = False
        self._resumed = threading.Event()
        self._resumed.set()
        self._beside: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held(self) -> bool:
        return self._held

    def wrap(self, handler: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
        """``handler`` (a foreachBatch function) behind this gate."""

        def gated(batch: Any, batch_id: int) -> None:
            while True:
                with self._lock:
                    if self._closed:
                        raise StopRequestedError(f"micro-batch {batch_id} not started: the query is stopping")
                    if not self._held:
                        handler(batch, batch_id)
                        return
                # Held (a batch job commits to its tables): wait outside the lock, so that a stop
                # can close the gate meanwhile.
                self._resumed.wait(_HELD_POLL_SECONDS)

        return gated

    def beside(self, thread: threading.Thread) -> None:
        """Count ``thread`` as the query's own work: work a handler started that outlives it
        (ingest's profile fold). :meth:`close` and :meth:`hold` wait for it as for a handler, so
        neither a stop (its lease removed after) nor a batch job's pause lets it commit on."""
        self._beside = thread

    def _beside_ended(self, deadline: float) -> bool:
        thread = self._beside
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        return thread is None or not thread.is_alive()

    def open(self) -> None:
        """Let handlers run (again): a query started after an earlier stop in the same process."""
        self._closed = False
        self.resume()

    def close(self, timeout_seconds: float) -> bool:
        """Refuse new handlers; True once no handler (nor work beside them) runs, False if one
        still ran at the deadline."""
        deadline = time.monotonic() + timeout_seconds
        finished = self._lock.acquire(timeout=timeout_seconds)
        self._closed = True
        if finished:
            self._lock.release()
        self._resumed.set()  # a held handler wakes to see the gate closed
        return finished and self._beside_ended(deadline)

    def close_by(self, deadline: float, keep_alive: Callable[[], None]) -> bool:
        """:meth:`close`, waiting for a running handler until ``deadline`` (``time.monotonic()``)
        a second at a time, with ``keep_alive`` (a lease renewed) called between."""
        while not self.close(max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            keep_alive()
        return True

    def hold(self, timeout_seconds: float) -> bool:
        """Hold the handlers back (:meth:`QueryLease.make_way`): a handler starting from now on
        waits until :meth:`resume` (or ends with :class:`StopRequestedError` once the gate is
        closed). True once none runs (nor work beside them, :meth:`beside`); False when one still
        ran at the deadline (held all the same: call again, or :meth:`resume`)."""
        # Held at once: a handler starting while the running one ends waits (with a backlog, one
        # starts right after the other, and the lock alone would seldom be free at a check).
        self._held = True
        self._resumed.clear()
        deadline = time.monotonic() + timeout_seconds
        if not self._lock.acquire(timeout=timeout_seconds):
            return False
        self._lock.release()
        return self._beside_ended(deadline)

    def resume(self) -> None:
        """Let held handlers run."""
        self._held = False
        self._resumed.set()


def _registered(query_name: str) -> BatchGate:
    with _GATES_LOCK:
        return _GATES.setdefault(query_name, BatchGate())


def gate_for(query_name: str) -> BatchGate:
    """The gate of the query named ``query_name`` in this process, opened (one per name)."""
    gate = _registered(query_name)
    gate.open()
    return gate


def stop_between_batches(
    query: StreamingQuery,
    timeout_seconds: float,
    poll_seconds: float = 0.05,
    keep_alive: Callable[[], None] = lambda: None,
) -> bool:
    """Stop ``query`` between micro-batches: after the running one has been handled and committed.

    A gated query (a ``foreachBatch`` handler behind :func:`gate_for`): closes the gate (waiting for
    a running handler to return), then waits for Spark to finish that trigger (its commit), all
    within ``timeout_seconds``, then stops the query. If the next trigger starts meanwhile, its
    handler is refused (:class:`StopRequestedError`) and the query ends with that error, having
    committed nothing of it.

    A query with a sink of its own (``serve``'s Kafka sink) has no handler to gate: it is stopped
    as soon as the micro-batch running at the request has finished. A back-to-back trigger may
    have started by then; it is cut at its start and replayed on the next start, with the same
    answers (waiting for an idle moment instead could take as long as the traffic lasts).

    ``keep_alive`` is called every ``poll_seconds`` (and at least once a second) while it waits:
    the query's lease renewed, as its watch does, so that a wait longer than the lease's life
    (a stop waits up to 120 s by default, a query's lease lives 30 s) does not let a batch job
    commit beside the micro-batch still running.

    Returns True when it stopped between micro-batches, False when the deadline passed and a batch
    was interrupted (it is replayed on the next start).
    """
    try:
        deadline = time.monotonic() + timeout_seconds
        between = _wait_between_batches(query, deadline, poll_seconds, keep_alive)
        if not between:
            late = "%s: a micro-batch still ran after %.0f s: interrupting it"
            log.warning(late, query.name, timeout_seconds)
    finally:
        query.stop()  # whatever keep_alive raised: a query is never left running behind a closed gate
    return between


def _wait_between_batches(
    query: StreamingQuery, deadline: float, poll_seconds: float, keep_alive: Callable[[], None]
) -> bool:
    """:func:`stop_between_batches`'s wait: True once the micro-batch running now has finished
    (its gate closed for the next), False at the deadline."""
    gate = _GATES.get(str(query.name))
    if gate is not None and not gate.close_by(deadline, keep_alive):
        return False
    running = _batch_id(query)

    def done() -> bool:
        if not query.status["isTriggerActive"]:
            return True
        return gate is None and _batch_id(query) != running  # the gate refuses the next one itself

    while query.isActive and not done():
        if time.monotonic() >= deadline:
            return False
        keep_alive()
        try:
            query.awaitTermination(poll_seconds)  # returns at once when the query ends
        except StreamingQueryException:
            break  # it ended on an error, e.g. the next batch refused by the closed gate
    return True


def _batch_id(query: StreamingQuery) -> int:
    """The id of the query's last finished micro-batch (-1 before the first)."""
    progress = query.lastProgress
    return -1 if progress is None else int(progress["batchId"])


def stop_marker(cfg: CarouselConfig, query_name: str) -> str:
    """Where a stop request for the query ``query_name`` is written: beside its checkpoint."""
    return f"{cfg.storage.checkpoint(query_name)}/{STOP_MARKER_NAME}"


def lease_path(cfg: CarouselConfig, query_name: str) -> str:
    """Where the running query ``query_name`` keeps its lease: beside its checkpoint."""
    return f"{cfg.storage.checkpoint(query_name)}/{LEASE_NAME}"


class QueryLease:
    """A small file saying "this query runs here", renewed while it runs and removed when it stops.

    Why: jobs that must not run beside a query (``rebuild-profiles`` replacing ``user_profiles``
    under a running ingest) need to know it runs, from any machine that reaches the storage. A
    killed driver cannot remove its lease, so a lease counts only while younger than
    ``lease_seconds`` (renewed every third of that). The times are the writer's clock: keep the
    machines' clocks within a few seconds of each other (NTP), as Delta itself assumes.
    """

    def __init__(
        self,
        spark: SparkSession,
        path: str,
        query_name: str,
        lease_seconds: float,
        conflicts: Callable[[], str | None] = lambda: None,
        gate: BatchGate | None = None,
        batch_writers: Callable[[], list[RunningWriter]] | None = None,
        held_back: str = "micro-batches",
    ) -> None:
        self._spark, self.path, self._query_name = spark, path, query_name
        self._held_back = held_back  # what the gate holds back, for the log
        self._lease_seconds = lease_seconds
        self._renew_every = lease_seconds / 3
        self._renewed = -float("inf")
        self._conflicts = conflicts
        # With both: the query holds its commits back between micro-batches while a batch job
        # commits to one of its tables (make_way), and says so in its lease ("paused").
        self._gate, self._batch_writers = gate, batch_writers
        self._paused = False
        self._held_for = ""  # the jobs last logged as holding it back
        self._made_way_at = -float("inf")
        self._wrote = False  # whether this process wrote the lease (since its last release)
        self.taken_by: str | None = None  # another process that holds the lease now (renew_if_due)

    @property
    def written(self) -> bool:
        """Whether this process's last write of the lease landed (and it has not released it)."""
        return self._renewed != -float("inf")

    def claim(self, storage: StorageChecks, release_on_refusal: bool = True) -> None:
        """Refuse to start (:class:`AlreadyRunningError`) while another process runs the query (its lease
        younger than ``lease_seconds``, and not of a process of this machine that is gone: a second
        start on one checkpoint would replay and commit its batches beside the first,
        :class:`carousel.storage.BatchCommits`). Then write the lease, before the query (re)starts
        (a start commits: its tables' creation), then refuse to start (the lease removed when
        ``release_on_refusal``) while ``conflicts`` names a writer it must not commit beside
        (:func:`query_lease`: a batch job's writer lease on one of its tables, on S3). Each side
        writes its own lease before reading the other's: of a job and a query starting together,
        at least one sees the other. (Two starts of the query in the same second can both go on:
        the lease is a file, not a lock.)"""
        running = storage.run("check whether it runs elsewhere", self._running_elsewhere, None)
        if running:
            raise AlreadyRunningError(
                f"{self._query_name}: not started: it already runs, {running} (lease {self.path}); "
                "stop that one first: two would commit its micro-batches twice"
            )
        self.taken_by = None  # whoever took it over is gone since
        self._paused = False  # a (re)started query's gate opens once the claim holds
        self._write_now(storage)  # whatever the last renewal; a failed write on S3: `conflicts` refuses
        try:
            reason = self._conflicts()
        except (Py4JJavaError, OSError) as err:
            reason = f"cannot read the other jobs' leases ({java_reason(err)})"
        if reason:
            if release_on_refusal:
                storage.run("remove its lease (it expires by itself)", self.release, None)
            raise JobError(f"{self._query_name}: not started: {reason}")
        self._going_on()  # a hold that ended with a restart

    def _running_elsewhere(self) -> str | None:
        """Who else runs the query now (:func:`held_by`), by its lease; None: nobody.

        A lease of a process of this machine (and pid namespace) counts while that process runs.
        One from another machine or container (a driver restarted on another node, a new pod)
        counts only if it is renewed: the start waits for it to be renewed (refused) or to lapse
        (goes on), at most ``lease_seconds``."""
        holder = self._other_holder()
        if holder is None:
            return None
        if _PROCESS_SPACE is not None and holder.get("process_space") == _PROCESS_SPACE:
            return held_by(holder)  # it runs (not gone)
        log.info(
            "%s: a lease of another machine or container (%s): waiting for it to be renewed or to lapse",
            self._query_name,
            held_by(holder),
        )
        deadline = time.monotonic() + self._lease_seconds
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self._renew_every / 3))  # a poll of the lease file, not a sync
            now = self._other_holder()
            if now is None:
                return None
            if now.get("renewed_at") != holder.get("renewed_at"):
                return held_by(now)
        return None

    def _other_holder(self) -> dict[str, Any] | None:
        """The lease at its path if another process's, live (not lapsed, not of a process gone)."""
        holder = lease_holder(self._spark, self.path, self._lease_seconds)
        if holder is None or _holder_gone(holder):
            return None
        mine = (
            holder.get("pid") == os.getpid()
            and holder.get("host") == socket.gethostname()
            and holder.get("process_space") == _PROCESS_SPACE
        )
        return None if mine else holder

    def renew_if_due(self) -> None:
        """Write the lease again when a third of its lifetime has passed since the last write;
        never over another process's live lease (that one took the query over while this one's
        lapsed: :attr:`taken_by` says who, and the query stops)."""
        now = time.monotonic()
        if self.taken_by is not None or now - self._renewed < self._renew_every:
            return
        if self._wrote:
            other = self._other_holder()
            if other is not None:
                self.taken_by = held_by(other)
                log.error(
                    "%s: another process took its lease over, %s: stopping", self._query_name, self.taken_by
                )
                return
        holder = {
            "query": self._query_name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            # Which process: a start on this machine after a kill need not wait for it to lapse.
            "process_space": _PROCESS_SPACE,
            "started": _STARTED,
            "renewed_at": datetime.now(UTC).isoformat(),
            "yields": self._gate is not None and self._batch_writers is not None,
            "paused": self._paused,
        }
        self._wrote = True  # from here on, even if the write fails: a stored object may not answer
        publish_small_file(self._spark, self.path, json.dumps(holder))
        self._renewed = now

    @property
    def paused(self) -> bool:
        """Whether the query holds its commits back now, and its lease says so."""
        return self._paused

    def make_way(self, storage: StorageChecks, timeout_seconds: float) -> None:
        """Called by the query's watch every few seconds (at most once a second): while a batch job
        holds a writer lease on one of the query's tables (on S3: :func:`writing_tables`), hold its
        micro-batches back (its gate: the running one finishes, the next waits) and, once none
        runs (within ``timeout_seconds``, else at the next call), say so in the lease ("paused"),
        so that the job commits. Once none does, say "going on" first, read the leases again, and
        only then let them go on: a job that came meanwhile either saw the query paused (and the
        query, seeing it, stays held) or sees it going on (and waits for the next pause). The gate
        is let go only after a write of "going on" that landed: a failed or doubtful write keeps it
        held (a storage blip holds the query back, never lets it commit beside a job)."""
        if self._gate is None or self._batch_writers is None:
            return
        now = time.monotonic()
        if now - self._made_way_at < _MAKE_WAY_EVERY_SECONDS:
            return
        self._made_way_at = now
        writers = storage.run("read the writer leases", self._batch_writers, None)
        if writers is None:  # the storage fails: as it was, until it answers
            return
        if writers:
            if not self._gate.hold(timeout_seconds):  # a micro-batch still runs: at the next call
                return
            if not self._paused or not self.written:  # said once, or again after a failed write
                self._paused = True
                self._write_now(storage)  # failed: the job waits, the query stays held
            why = "; ".join(f"{w.job} commits to {', '.join(sorted(w.tables))}" for w in writers)
            if why != self._held_for:
                log.info("%s: %s held back while %s", self._query_name, self._held_back, why)
                self._held_for = why
            return
        if not (self._gate.held or self._paused):
            return
        self._paused = False
        if not self._write_now(storage):
            self._paused = True  # still held: tried again at the next call
            return
        if storage.run("read the writer leases", self._batch_writers, None) != []:
            self._paused = True  # another job came meanwhile (or no answer): still held
            self._write_now(storage)
            return
        self._gate.resume()
        self._going_on()

    def _going_on(self) -> None:
        if self._held_for:
            log.info("%s: %s go on (no batch job commits to its tables)", self._query_name, self._held_back)
        self._held_for = ""

    def _write_now(self, storage: StorageChecks) -> bool:
        """Write the lease now (its ``paused`` as it is); whether the write landed."""
        self._renewed = -float("inf")
        storage.run("renew its lease", self.renew_if_due, None)
        return self.written

    def release(self) -> None:
        """Remove the lease, if this process wrote it (never another instance's)."""
        if not self._wrote or self.taken_by is not None:
            return
        delete_file(self._spark, self.path)
        self._wrote = False
        self._renewed = -float("inf")  # a later renew_if_due writes it again


def lease_holder(
    spark: SparkSession, path: str, lease_seconds: float, now: datetime | None = None
) -> dict[str, Any] | None:
    """The lease at ``path`` (query, host, pid, renewed_at) if younger than ``lease_seconds``, else None."""
    aged = _lease_with_age(spark, path, now or datetime.now(UTC))
    return aged[0] if aged is not None and aged[1] < lease_seconds else None


def _lease_with_age(spark: SparkSession, path: str, now: datetime) -> tuple[dict[str, Any], float] | None:
    """(the lease at ``path``, seconds since its renewal); None when absent or unreadable."""
    text = read_text_file(spark, path)
    if not text:
        return None
    try:
        holder = json.loads(text)
        renewed_at = datetime.fromisoformat(holder["renewed_at"])
    except (ValueError, KeyError, TypeError):
        _warn_once(path, "unreadable lease at %s: ignored", path)
        return None
    return holder, (now - renewed_at).total_seconds()


def _warn_once(path: str, message: str, *args: object) -> None:
    """A warning about the lease at ``path``, once per process: the queries read the leases every
    few seconds."""
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning(message, *args)


def held_by(holder: Mapping[str, Any]) -> str:
    """Who holds a lease, for the messages naming it: 'running on HOST (pid N, lease renewed T)'."""
    return (
        f"running on {holder.get('host')} (pid {holder.get('pid')}, lease renewed {holder.get('renewed_at')})"
    )


def always_on_queries(cfg: CarouselConfig) -> dict[str, tuple[StreamingQuerySection, frozenset[str]]]:
    """Each always-on job (as ``./spark-submit.sh stop`` names it) -> its query's configuration and
    the Delta tables it commits to."""
    return {
        "ingest": (
            cfg.ingest,
            frozenset(
                {EVENTS_TABLE, PROFILES_TABLE, PROFILE_UPDATES_TABLE, QUARANTINE_TABLE, INGEST_LOG_TABLE}
            ),
        ),
        "serve": (cfg.serving, frozenset({TRENDING_TABLE})),  # its trending refresher
        "record-sends": (cfg.sent_log, frozenset({SENT_RECOMMENDATIONS_TABLE})),
    }


def query_lease(
    spark: SparkSession,
    cfg: CarouselConfig,
    job: str,
    gate: BatchGate | None = None,
    held_back: str = "micro-batches",
) -> QueryLease:
    """The lease the always-on ``job`` (``ingest``, ``serve``, ``record-sends``) keeps while it runs;
    its :meth:`~QueryLease.claim` refuses the start while a batch job holds a writer lease on one
    of its tables (on S3 with Delta's single-driver log store: :func:`writing_tables`).

    ``gate``: what holds the job's commits back while a batch job commits to its tables
    (:meth:`QueryLease.make_way`): by default the gate of ingest's and record-sends' foreachBatch
    handlers; serve passes its trending refresher's (its query commits nothing to Delta).
    ``held_back``: what the gate holds back, for the log."""
    section, tables = always_on_queries(cfg)[job]
    # Its start also commits to erased_users (created, or its properties declared, if need be).
    starts_on = tables | _START_ALSO_COMMITS.get(job, frozenset())

    def batch_writers() -> str | None:
        if not _single_driver(spark, cfg):
            return None
        if not lease.written:  # the jobs that would have to see it cannot
            return f"cannot write its lease {lease.path}"
        writers = _running_batch_jobs(spark, cfg, starts_on)
        return "; ".join(w.reason() for w in writers) or None

    def holding_tables() -> list[RunningWriter]:
        return batch_jobs_to_make_way_for(spark, cfg, tables)

    if gate is None and job in _GATED_HANDLERS:
        gate = _registered(section.query_name)
    lease = QueryLease(
        spark,
        lease_path(cfg, section.query_name),
        section.query_name,
        section.lease_seconds,
        batch_writers,
        gate=gate,
        batch_writers=holding_tables if gate is not None else None,
        held_back=held_back,
    )
    return lease


# The always-on queries whose commits are their foreachBatch handler's, behind the gate registered
# under the query's name (gate_for): it holds their micro-batches back for a batch job.
_GATED_HANDLERS = frozenset({"ingest", "record-sends"})
# The tables an always-on query's start commits to besides those it writes while it runs.
_START_ALSO_COMMITS = {
    "ingest": frozenset({ERASED_USERS_TABLE}),
    "record-sends": frozenset({ERASED_USERS_TABLE}),
}


# Delta's default log store for s3a:// (and s3://) paths: a commit is atomic within one driver
# only, as S3 has no put-if-absent rename. The delegating store (Delta's default class) hands
# s3a to it too; spark.delta.logStore.s3a.impl (or .class) naming another lifts the rule.
_SINGLE_DRIVER_LOG_STORES = frozenset({"S3SingleDriverLogStore", "DelegatingLogStore"})
# Where Delta reads the log store from (LogStoreProvider), with and without the "spark." prefix.
_LOG_STORE_KEYS = (
    "spark.delta.logStore.s3a.impl",
    "delta.logStore.s3a.impl",
    "spark.delta.logStore.class",
    "delta.logStore.class",
)


def single_driver_commits(root: str, conf: Callable[[str], str | None]) -> bool:
    """True where Delta commits to one table are safe from one Spark driver at a time only: the
    storage ``root`` is on S3 (``s3a://``) and its log store is Delta's default for S3
    (``S3SingleDriverLogStore``: two drivers committing the same version can each "win"). A
    multi-writer log store (``S3DynamoDBLogStore``, or any other set in
    ``spark.delta.logStore.s3a.impl`` / ``spark.delta.logStore.class``) lifts it; on a local file
    system, HDFS, ABFS or GCS the storage itself lets one commit of a version win. ``conf`` reads
    the session's Spark setting of that name (None when unset)."""
    if not root.lower().startswith("s3a://"):
        return False
    store = next((value.strip() for key in _LOG_STORE_KEYS if (value := conf(key)) and value.strip()), "")
    return not store or store.rsplit(".", 1)[-1] in _SINGLE_DRIVER_LOG_STORES


def _single_driver(spark: SparkSession, cfg: CarouselConfig) -> bool:
    """:func:`single_driver_commits` for this session and storage root."""
    return single_driver_commits(cfg.storage.root, lambda key: spark.conf.get(key, None))


@dataclass(frozen=True)
class RunningWriter:
    """A job that runs now (its lease is live) and commits to some of the tables asked about
    (``tables``): an always-on query (``query``: its name) or a batch job (``query`` None, its
    writer lease); ``holder``: its lease (host, pid, renewed_at); ``lease``: where it is."""

    job: str
    query: str | None
    holder: Mapping[str, Any]
    tables: frozenset[str]
    lease: str

    @property
    def yields(self) -> bool:
        """An always-on query that holds its micro-batches back for a batch job
        (:meth:`QueryLease.make_way`)."""
        return self.query is not None and bool(self.holder.get("yields"))

    @property
    def paused(self) -> bool:
        """An always-on query holding its micro-batches back now: it commits nothing."""
        return self.query is not None and bool(self.holder.get("paused"))

    @property
    def waiting(self) -> bool:
        """A batch job waiting for other batch jobs' commits (:func:`writing_tables`): no query
        holds back for it yet."""
        return self.query is None and bool(self.holder.get("waiting"))

    def reason(self) -> str:
        who, then = (
            (f"{self.job} ({self.query})", f"stop it first (./spark-submit.sh stop {self.job})")
            if self.query is not None
            else (
                self.job,
                f"let it finish first (a killed one's lease lapses {self.holder.get('lease_seconds')} s "
                "after its renewal)",
            )
        )
        return (
            f"{who} is {held_by(self.holder)} and commits to {', '.join(sorted(self.tables))}: on "
            "s3a:// with Delta's single-driver log store, two drivers' commits to one table can "
            f"overwrite each other; {then} or configure a multi-writer log store (README: 'One "
            "writer per table at a time')"
        )


def running_writers(spark: SparkSession, cfg: CarouselConfig, tables: Iterable[str]) -> list[RunningWriter]:
    """The jobs running now that commit to any of ``tables``, where this job's commits beside
    theirs could be lost (:func:`single_driver_commits`): the always-on queries (their leases) and
    the batch jobs holding a writer lease (:func:`writing_tables`); empty elsewhere, without
    reading anything. A lease older than its lifetime counts as stopped."""
    if not _single_driver(spark, cfg):
        return []
    asked = frozenset(tables)
    writers = []
    for job, (section, written) in always_on_queries(cfg).items():
        shared = written & asked
        if not shared:
            continue
        path = lease_path(cfg, section.query_name)
        holder = lease_holder(spark, path, section.lease_seconds)
        if holder is not None:
            writers.append(RunningWriter(job, section.query_name, holder, shared, path))
    return writers + _running_batch_jobs(spark, cfg, asked)


def batch_jobs_to_make_way_for(
    spark: SparkSession, cfg: CarouselConfig, tables: Iterable[str]
) -> list[RunningWriter]:
    """The batch jobs an always-on query committing to ``tables`` holds its commits back for
    (:meth:`QueryLease.make_way`), where commits could be lost (:func:`single_driver_commits`): their
    live writer leases, but those still waiting for another batch job's commits."""
    if not _single_driver(spark, cfg):
        return []
    return [w for w in _running_batch_jobs(spark, cfg, tables) if not w.waiting]


def writer_leases_folder(cfg: CarouselConfig) -> str:
    """Where the batch jobs keep their writer leases (:class:`WriterLease`)."""
    return cfg.storage.checkpoint(WRITER_LEASES_FOLDER)


def _running_batch_jobs(
    spark: SparkSession, cfg: CarouselConfig, tables: Iterable[str]
) -> list[RunningWriter]:
    """The batch jobs whose live writer lease names any of ``tables``. A lease lapsed for ten of its
    lifetimes (a killed job's) is deleted on the way."""
    asked = frozenset(tables)
    folder = writer_leases_folder(cfg)
    now = datetime.now(UTC)
    writers = []
    for name in sorted(read_text_file(spark, folder, list_names=True) or []):
        if not name.endswith(_WRITER_LEASE_SUFFIX):
            continue
        path = f"{folder}/{name}"
        aged = _lease_with_age(spark, path, now)  # None too when its job removed it since the listing
        if aged is None:
            continue
        holder, age = aged
        try:
            lifetime = float(holder["lease_seconds"])
            shared = asked & frozenset(holder["tables"])
        except (KeyError, TypeError, ValueError):
            _warn_once(path, "unreadable writer lease at %s: ignored", path)
            continue
        if age < lifetime:
            if shared:
                writers.append(RunningWriter(str(holder.get("job")), None, holder, shared, path))
        elif age > _STALE_LEASE_LIFETIMES * lifetime:
            log.info(
                "deleting the writer lease of %s, lapsed since %s: %s",
                holder.get("job"),
                holder.get("renewed_at"),
                path,
            )
            try:
                delete_file(spark, path)
            except (Py4JJavaError, OSError) as err:  # left for the next reader
                _warn_once(path, "cannot delete the lapsed writer lease %s (%s)", path, java_reason(err))
    return writers


_PROCESS_SPACE = process_space()
_STARTED = (process_state(os.getpid()) or ("", None))[1]


def _holder_gone(holder: Mapping[str, Any]) -> bool:
    """Whether a lease was written by a process of this machine (since its boot, in this pid
    namespace) that no longer runs: a killed job's (gone, or a zombie nobody reaped), which need
    not lapse before a retry there goes on. Any doubt (another machine or container, nothing
    recorded, the process hidden) says it runs."""
    if _PROCESS_SPACE is None or holder.get("process_space") != _PROCESS_SPACE:
        return False
    pid, started = holder.get("pid"), holder.get("started")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(started, int):
        return False
    return process_gone(pid, started)


class WriterLease:
    """A batch job's lease on the Delta tables it commits to (S3 only; see :func:`writing_tables`),
    or on its runs (everywhere; :func:`one_run_at_a_time`):
    a small file under :func:`writer_leases_folder` naming the job, the tables, its host and pid,
    written before the job's first commit, renewed by a daemon thread every third of
    ``storage.writer_lease_seconds`` while the job runs, deleted at the end. A killed job's lease
    lapses after that lifetime (kept in the file, so every reader judges it alike).

    Why a thread: a batch job's commits come after minutes of Spark work (a campaign's ranking, a
    maintain's OPTIMIZE) in which no code of ours runs to renew it."""

    def __init__(self, spark: SparkSession, cfg: CarouselConfig, job: str, tables: Iterable[str]) -> None:
        self._spark, self.job, self.tables = spark, job, frozenset(tables)
        self._lifetime = cfg.storage.writer_lease_seconds
        self.path = f"{writer_leases_folder(cfg)}/{job}-{uuid.uuid4().hex[:12]}{_WRITER_LEASE_SUFFIX}"
        self._stopped = threading.Event()
        self._renewer: threading.Thread | None = None
        # While it waits for other batch jobs (writing_tables): withdrawn (its file deleted, its
        # path kept: its turn), or "waiting" in its file (the queries do not hold back for it yet).
        self.withdrawn = self.waiting = False
        self.landed = False  # whether the last write or withdrawal landed
        self.failed = ""  # why the last change (:meth:`change`) did not land
        # The changes and the renewals take turns: a renewal never writes a withdrawn lease back.
        self._turn = threading.Lock()

    @property
    def clear(self) -> bool:
        """Whether the lease is written, not waiting, as its last write left it."""
        return self.landed and not self.withdrawn and not self.waiting

    def write(self, waiting: bool = False) -> None:
        """Write (or renew) the lease now (again, after :meth:`withdraw`)."""
        with self._turn:
            self.withdrawn, self.waiting, self.landed = False, waiting, False
            self._write()
            self.landed = True

    def withdraw(self) -> None:
        """Delete the lease while keeping the job's place (its path, so its turn among waiters,
        :func:`writing_tables`); the renewals write nothing until :meth:`write`."""
        with self._turn:
            self.withdrawn, self.landed = True, False
            delete_file(self._spark, self.path)
            self.landed = True

    def change(self, withdrawn: bool, waiting: bool) -> bool:
        """Bring the lease to that state if it is not in it (or its last change did not land);
        whether a change was made and landed. A storage failure is logged: tried again by the
        next call."""
        if self.landed and (self.withdrawn, self.waiting) == (withdrawn, waiting):
            return False
        try:
            if withdrawn:
                self.withdraw()
            else:
                self.write(waiting)
        except (Py4JError, OSError) as err:
            self.failed = java_reason(err)
            log.warning(
                "%s: cannot write or delete its writer lease %s (%s)", self.job, self.path, self.failed
            )
            return False
        self.failed = ""
        return True

    def _renew_now(self) -> None:
        with self._turn:
            if not self.withdrawn:
                self._write()

    def _write(self) -> None:
        holder = {
            "job": self.job,
            "tables": sorted(self.tables),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": datetime.now(UTC).isoformat(),
            "lease_seconds": self._lifetime,
            # Which machine, pid namespace and process, beyond a host name that two containers
            # may share: a reader there tells a killed job's lease from a live one at once.
            "process_space": _PROCESS_SPACE,
            "started": _STARTED,
            "waiting": self.waiting,
        }
        publish_small_file(self._spark, self.path, json.dumps(holder))

    def keep_renewed(self) -> None:
        """Renew it every third of its lifetime from a daemon thread, until :meth:`release`."""
        self._renewer = threading.Thread(target=self._renew, name=f"writer-lease-{self.job}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        failing, renewed, lapsed = False, time.monotonic(), False
        while not self._stopped.wait(self._lifetime / 3):
            try:
                self._renew_now()
            except (Py4JError, OSError) as err:  # a storage blip: tried again at the next renewal
                if not lapsed and time.monotonic() - renewed >= self._lifetime:
                    lapsed = True
                    log.error(
                        "%s: its writer lease %s lapsed (not renewed for %.0f s): another job may now "
                        "commit to %s beside it",
                        self.job,
                        self.path,
                        self._lifetime,
                        ", ".join(sorted(self.tables)),
                    )
                if not failing:
                    log.warning(
                        "%s: cannot renew its writer lease %s (%s); tried again in %.0f s (other jobs "
                        "no longer see it after %.0f s without renewal)",
                        self.job,
                        self.path,
                        java_reason(err),
                        self._lifetime / 3,
                        self._lifetime,
                    )
                failing = True
            else:
                if failing:
                    log.info("%s: writer lease renewed again", self.job)
                failing, renewed, lapsed = False, time.monotonic(), False

    def release(self) -> None:
        """Stop renewing and delete the lease (it lapses by itself when the storage fails that)."""
        self._stopped.set()
        if self._renewer is not None:
            # A renewal stuck in the storage's retries must not hold the job: one written after the
            # delete below lapses by itself.
            self._renewer.join(timeout=self._lifetime)
        try:
            delete_file(self._spark, self.path)
        except (Py4JJavaError, OSError) as err:
            log.warning(
                "%s: cannot delete its writer lease %s (%s): it lapses after %.0f s",
                self.job,
                self.path,
                java_reason(err),
                self._lifetime,
            )


@contextmanager
def writing_tables(
    spark: SparkSession,
    cfg: CarouselConfig,
    job: str,
    tables: Iterable[str],
    refused: str,
    wait_for_batch_jobs: bool = True,
) -> Iterator[None]:
    """Hold a writer lease (:class:`WriterLease`) on ``tables`` for the block, where two drivers'
    commits to one table could be lost (:func:`single_driver_commits`); elsewhere nothing is
    written or read. Waits up to ``storage.writer_wait_seconds`` for the others committing to one of
    ``tables``: the always-on queries that hold their micro-batches back for it (``ingest`` and
    ``record-sends``, :meth:`QueryLease.make_way`; ``serve`` its trending refreshes) and the other
    batch jobs (their writer leases: a campaign's commit lease ends in seconds, a ``maintain``
    may outlast the wait). Raises :class:`JobError` (``refused``: what is not done, then why) before
    the block when they are still there after it, or at once for a query that does not hold back.
    Without ``wait_for_batch_jobs``: refused at once while another batch job commits there.

    The lease is written before the others are read, as every writer does
    (:meth:`QueryLease.claim`), and the block entered only after a read that followed its last
    write: of two starting together, at least one sees the other. Two batch jobs that see each
    other do not both wait: the one whose lease file name sorts later withdraws its lease until
    the earlier one is done, then writes it again and looks again. A job waiting for a batch job
    that sorts later keeps its lease, marked "waiting": the queries hold back for it only once it
    is no longer waiting."""
    if not _single_driver(spark, cfg):
        yield
        return
    lease = WriterLease(spark, cfg, job, tables)
    name = lease.path.rsplit("/", 1)[-1]
    try:
        lease.change(withdrawn=False, waiting=False)  # failed: written again below, until the deadline
        lease.keep_renewed()
        unread = ""  # why the leases could not be read, the last time they could not

        def committing() -> list[RunningWriter] | None:
            nonlocal unread
            try:
                return [
                    w
                    for w in running_writers(spark, cfg, lease.tables)
                    if w.lease != lease.path and not w.paused
                ]
            except (Py4JJavaError, OSError) as err:  # a storage blip: read again until the deadline
                unread = java_reason(err)
                log.warning("%s: cannot read the leases (%s); tried again", job, unread)
                return None

        wait = cfg.storage.writer_wait_seconds
        deadline = time.monotonic() + wait
        writers = committing()
        waited = False
        while not (writers == [] and lease.clear):
            stuck = [
                w
                for w in writers or []
                if (w.query is not None and not w.yields) or (w.query is None and not wait_for_batch_jobs)
            ]
            # Nobody in the way and its lease as it wants it: one more change and read, past the deadline.
            nobody = writers == [] and not lease.failed
            if stuck or (time.monotonic() >= deadline and not nobody):
                late = (
                    f"not held back or finished within storage.writer_wait_seconds ({wait:.0f} s): "
                    if waited and not stuck
                    else ""
                )
                why = "; ".join(w.reason() for w in stuck or writers or []) or (
                    f"cannot read the other jobs' leases ({unread})"
                    if writers is None
                    else f"cannot write its lease {lease.path} ({lease.failed})"
                )
                raise JobError(f"{refused}: {late}{why}")
            if writers is not None:
                batch = [w for w in writers if w.query is None]
                ahead = any(w.lease.rsplit("/", 1)[-1] < name for w in batch)
                if writers and not waited:
                    waited = True
                    log.info(
                        "%s: waiting up to %.0f s for %s",
                        job,
                        wait,
                        ", ".join(
                            f"{w.job} ({w.query}) to hold back its micro-batches"
                            if w.query is not None
                            else f"{w.job} to finish its commits to {', '.join(sorted(w.tables))}"
                            for w in writers
                        ),
                    )
                if lease.change(withdrawn=ahead, waiting=bool(batch) and not ahead) and not writers:
                    writers = committing()  # written again, nobody was there: looks again at once
                    continue
            time.sleep(_YIELD_POLL_SECONDS)  # polling the storage, with a deadline
            writers = committing()
        if waited:
            log.info("%s: goes on with its commits to %s", job, ", ".join(sorted(lease.tables)))
        yield
    finally:
        lease.release()


@contextmanager
def one_run_at_a_time(
    spark: SparkSession, cfg: CarouselConfig, job: str, name: str, refused: str
) -> Iterator[None]:
    """Keep two runs of one thing (``name``: a campaign's runs) apart on every storage root, not only
    where commits could be lost: a scheduler's retry started beside the first run would rank and
    send beside it. A writer lease (:class:`WriterLease`) naming ``name`` for the block; raises
    :class:`JobError` (``refused``, then who runs it) before the block while another live lease
    names it. As with every lease, of two started together at least one sees the other."""
    lease = WriterLease(spark, cfg, job, [name])
    lease.write()
    try:
        lease.keep_renewed()
        # A killed run's lease is ignored at once where its process is known gone (a retry on
        # the same machine), else once it lapses. Only here: the table leases keep their lapse,
        # as a commit lost on S3 costs more than a retry refused for a minute.
        others = []
        for writer in _running_batch_jobs(spark, cfg, [name]):
            if writer.lease == lease.path:
                continue
            if _holder_gone(writer.holder):
                log.info(
                    "%s: the lease %s is a process of this machine that is gone: ignored", job, writer.lease
                )
                continue
            others.append(writer)
        if others:
            holder = others[0].holder
            raise JobError(
                f"{refused}: {others[0].job} is {held_by(holder)} with the lease on {name}; let it finish "
                f"first (a killed one's lease lapses {holder.get('lease_seconds')} s after its renewal)"
            )
        yield
    finally:
        lease.release()


def request_stop(spark: SparkSession, marker: str, reason: str) -> None:
    """Ask the query watching ``marker`` to stop between micro-batches (any Hadoop file system)."""
    write_small_file(spark, marker, f"{datetime.now(UTC).isoformat()} {reason}\n")


class StorageChecks:
    """The storage calls a running query's watch makes (its stop request, its lease): a failure is
    logged once per outage and read as "nothing to do", then tried again at the next check.

    Why: these are small files beside the checkpoint, read every few seconds for as long as the
    query runs. A blip of the file system or object store (a throttled listing, a timeout) must
    not end a healthy query, nor the job with a Java traceback; the query's own reads and writes
    fail (and are supervised) if the storage is really gone. While the lease cannot be renewed it
    ages: after ``lease_seconds`` a job that checks it no longer sees the query running."""

    def __init__(self, query_name: str) -> None:
        self._query_name = query_name
        self._failing: set[str] = set()  # the kinds of call failing now (an outage each)

    def run(self, what: str, action: Callable[[], T], otherwise: T) -> T:
        """``action()``; ``otherwise`` when the storage fails it (``what``: for the log)."""
        try:
            result = action()
        except (Py4JJavaError, OSError) as err:  # a Hadoop IOException through Py4J; a failed rename
            if what not in self._failing:
                log.warning(
                    "%s: cannot %s (%s); the query runs on, and the storage is tried again at the next check",
                    self._query_name,
                    what,
                    java_reason(err),
                )
            self._failing.add(what)
            return otherwise
        if what in self._failing:
            log.info("%s: the storage answers again (%s)", self._query_name, what)
            self._failing.discard(what)
        return result


@contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT call ``on_signal(signum)`` instead of ending the job;
    the previous handlers are restored after it.

    Python delivers signals to the main thread only: in another thread nothing is caught. The
    handler runs between two bytecodes of whatever the main thread is doing (a Py4J call, a
    sleep), so ``on_signal`` only records the request; the loop that polls it acts on it."""
    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        on_signal(signum)

    previous = {sig: signal.signal(sig, _handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def lease_keeper(lease: QueryLease | None, storage: StorageChecks) -> Callable[[], None]:
    """What keeps ``lease`` alive while a stop waits (:func:`stop_between_batches`): renewed when
    due, a storage failure logged once (nothing without a lease)."""
    if lease is None:
        return lambda: None
    return lambda: storage.run("renew its lease", lease.renew_if_due, None)


def await_query(
    spark: SparkSession,
    query: StreamingQuery,
    stop_timeout_seconds: float,
    marker: str | None = None,
    poll_seconds: float = 2.0,
    lease: QueryLease | None = None,
    keep_lease: bool = False,
    clear_stale_stop: bool = True,
    storage: StorageChecks | None = None,
    requested: list[str] | None = None,
) -> None:
    """Wait for ``query`` to end; a stop request at ``marker`` or SIGTERM/SIGINT stop it between batches.

    While it runs, ``lease`` (if given) is renewed; it is released when the query ends, unless
    ``keep_lease`` (the supervisor holds it across restarts and releases it itself).

    A stop request left from before this start is removed first (it was meant for an earlier
    run), if ``clear_stale_stop``: the supervisor clears it on the first start only, since one
    written while a restart starts is meant for the restarted query.
    Signal handlers only record the request (they must not block); this loop then stops the
    query with :func:`stop_between_batches` and removes the marker. A query that fails on its
    own raises :class:`QueryFailedError`. A storage failure of the stop check or the lease is
    logged and tried again (:class:`StorageChecks`; ``storage``: the caller's, to log an outage
    once across restarts). ``requested``: the caller's record of stop requests, shared with its
    own signal handler (the supervisor's), so a request made just before or after this watch is
    not lost; this watch appends its own.
    """
    storage = storage or StorageChecks(str(query.name))
    requested = [] if requested is None else requested
    renew_lease = lease_keeper(lease, storage)

    def _request_stop(signum: int) -> None:
        log.info("signal %d: stopping %s after its running micro-batch", signum, query.name)
        requested.append(f"signal {signum}")

    try:
        with stop_signals(_request_stop):
            if (
                clear_stale_stop
                and marker is not None
                and storage.run("remove a stale stop request", lambda: delete_file(spark, marker), False)
            ):
                log.warning("%s: removed a stop request left from before this start (%s)", query.name, marker)
            while query.isActive:
                renew_lease()
                if lease is not None and lease.taken_by is not None and not requested:
                    requested.append(f"its lease taken over, {lease.taken_by}")
                if lease is not None:
                    lease.make_way(storage, poll_seconds)
                if (
                    not requested
                    and marker is not None
                    and storage.run("check for a stop request", lambda: file_exists(spark, marker), False)
                ):
                    log.info("%s: stop requested (%s): stopping after its micro-batch", query.name, marker)
                    requested.append(marker)
                if requested:
                    stop_between_batches(query, stop_timeout_seconds, keep_alive=renew_lease)
                    break
                try:
                    query.awaitTermination(poll_seconds)
                except StreamingQueryException:
                    break  # reported below
            # Still under the handlers: a signal now is recorded, not the end of the process
            # half-way through (the lease left behind, the stop request kept).
            if marker is not None and requested:  # left behind on a failure: the next start clears it
                storage.run("remove the stop request", lambda: delete_file(spark, marker), False)
            error = query.exception()
            if error is not None and not requested:
                summary = str(getattr(error, "_desc", None) or error).strip()
                raise QueryFailedError(str(query.name), summary, failure_detail(query) or summary)
            if error is not None and StopRequestedError.__name__ in str(error):
                log.info("%s stopped; the micro-batch it did not start runs at the next start", query.name)
            elif error is not None:
                log.info("%s stopped; its last micro-batch will be replayed: %s", query.name, one_line(error))
            log.info("%s stopped%s", query.name, f" ({requested[0]})" if requested else "")
            if lease is not None and lease.taken_by is not None:
                raise AlreadyRunningError(
                    f"{query.name}: stopped: another process runs it, {lease.taken_by} (lease {lease.path}); "
                    "two would commit its micro-batches twice"
                )
    finally:
        if lease is not None and not keep_lease:
            storage.run("remove its lease (it expires by itself)", lease.release, None)


_STOPPABLE = ("ingest", "serve", "record-sends")  # always_on_queries' jobs


def stop_main(argv: list[str]) -> int:
    """``./spark-submit.sh stop ingest|serve``: ask the running query to stop between micro-batches.

    The request is a marker file beside the query's checkpoint: written with plain Python under a
    local root (``./spark-submit.sh`` then starts no JVM for it), through Hadoop elsewhere."""
    from carousel.cli import add_config_args, config_from_args
    from carousel.config import local_disk_path, on_local_disk
    from carousel.session import build_session

    parser = add_config_args(argparse.ArgumentParser(prog="stop", description=stop_main.__doc__))
    parser.add_argument("query", choices=_STOPPABLE, help="the streaming job to stop")
    parser.add_argument("--reason", default="requested by ./spark-submit.sh stop", help="kept in the marker")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "stop")
    name = always_on_queries(cfg)[args.query][0].query_name
    marker = stop_marker(cfg, name)
    if on_local_disk(marker):
        # A local disk: written here, without a Spark session (./spark-submit.sh runs this job as
        # plain Python then); the query's watch reads it through Hadoop's local file system.
        local = local_disk_path(marker)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(f"{datetime.now(UTC).isoformat()} {args.reason}\n")
    else:
        spark = build_session(cfg, "carousel-stop")
        try:
            request_stop(spark, marker, args.reason)
        finally:
            spark.stop()
    log.info("stop requested for %s: %s (it stops after its running micro-batch)", name, marker)
    return 0
