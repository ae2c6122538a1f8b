"""Supervised restarts of the always-on streaming queries: a transient failure does not end them.

Role: ``ingest``, ``serve`` and ``record-sends`` run their query under :func:`supervise` instead of
a bare :func:`~carousel.query_lifecycle.await_query`. Inputs: a function that starts the query
(the module's ``run``), the ``supervision`` section of the configuration, and the stop request
and lease of :mod:`carousel.query_lifecycle`. Output: the last query started, returned when it
was stopped (or, with ``--available-now``, finished); :class:`QueryGaveUpError` when the query
failed for good. The lease is held from the first start to the end, backoffs included.

Why: a broker restart, a Delta concurrent-write conflict or a blip of the online store fails a
micro-batch, and Spark then ends the whole query. Each such query is idempotent by batch id and
resumes from its checkpoint, so starting it again is safe: the failed batch is replayed, nothing
is lost or applied twice. The supervisor restarts a query that failed with an error it knows to
be transient (``supervision.transient_errors``, matched against the error's text, which names
the Java and Python exception classes of the whole cause chain), after a backoff that doubles
from ``backoff_initial_seconds`` up to ``backoff_max_seconds``, at most ``max_restarts`` times in
a row; a query that then runs for ``healthy_after_seconds`` has its count reset. While it waits,
the query's dependencies (the broker; for ``serve`` also the online store) are checked every
second: one seen down that answers again ends the backoff, so the query is back about a second
after the broker or the store, however long the backoff had grown; one still down when the
backoff is over is waited for, up to ``backoff_max_seconds``, instead of a restart that would
only fail and use up an attempt. Any other
failure (a schema conflict, a bug, a bad configuration) is permanent: the job exits non-zero at
once with the reason, since restarting would only fail again. A stop request or SIGTERM/SIGINT
during a backoff ends the job cleanly without a restart.

    supervise(spark, lambda: run(spark, cfg), cfg.supervision, name, stop_timeout, marker, lease=lease)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery

from carousel.config import KafkaConfig, SupervisionConfig, mask_secrets
from carousel.errors import JobError, telling_line
from carousel.query_lifecycle import (
    AlreadyRunningError,
    QueryFailedError,
    QueryLease,
    StorageChecks,
    await_query,
    lease_keeper,
    stop_between_batches,
    stop_signals,
)
from carousel.query_metrics import count_restart
from carousel.storage import delete_file, file_exists

__all__ = [
    "QueryGaveUpError",
    "backoff_seconds",
    "dependency_probe",
    "kafka_check",
    "supervise",
    "transient_reason",
]

log = logging.getLogger(__name__)

# While a backoff waits, its dependencies are checked this often, each check for at most
# PROBE_TIMEOUT_SECONDS; a restart comes no sooner than MIN_BACKOFF_SECONDS after the failure.
PROBE_POLL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 2.0
MIN_BACKOFF_SECONDS = 1.0
# A dependency counts as back once this many checks in a row found it answering.
PROBE_OK_IN_A_ROW = 2


class QueryGaveUpError(JobError):
    """A supervised query failed with a permanent error, or with transient ones too many times."""


def transient_reason(error_text: str, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` found in ``error_text`` (case-sensitive), or None: not transient."""
    return next((pattern for pattern in patterns if pattern in error_text), None)


def backoff_seconds(restart: int, initial: float, maximum: float) -> float:
    """The wait before restart number ``restart`` (1, 2, ...): doubling from ``initial``, capped."""
    return min(maximum, initial * 2 ** (restart - 1))


class _StopWatch:
    """What may end a backoff early: a stop request at ``marker`` or SIGTERM/SIGINT (main thread;
    :meth:`on_signal` is the supervisor's handler for the whole supervised run)."""

    def __init__(
        self, spark: SparkSession, marker: str | None, lease: QueryLease | None, storage: StorageChecks
    ) -> None:
        self._spark, self._marker, self._lease, self._storage = spark, marker, lease, storage
        # Every stop request of the run, in order: the supervisor's handler, and await_query's
        # watch (which shares this list) append to it.
        self.requested: list[str] = []

    @property
    def reason(self) -> str | None:
        return self.requested[0] if self.requested else None

    def on_signal(self, signum: int) -> None:
        self.requested.append(f"signal {signum}")

    def wait(
        self,
        seconds: float,
        poll_seconds: float,
        probe: Callable[[], str | None] | None = None,
        longest: float = 0.0,
    ) -> bool:
        """Wait ``seconds``, renewing the lease (the job still runs); True as soon as a stop was
        asked for (the marker is then removed), or at once if one came before.

        With ``probe`` (:func:`dependency_probe`), the wait ends (False) once a dependency seen
        down during it answers again: the restart comes when the broker or the online store is
        back, not at the end of a backoff that grew while it was away. A dependency still down
        when ``seconds`` are over extends the wait, up to ``longest`` in all: a restart into a
        dependency known to be down would only fail and use up an attempt. A failure whose
        dependencies all answer (a Delta conflict) waits its backoff, no more."""
        started = time.monotonic()
        deadline = started + seconds
        storage, spark, marker = self._storage, self._spark, self._marker
        down: str | None = None
        was_down: str | None = None
        extended = False
        answering = 0  # probes in a row that found every dependency answering
        next_probe = started
        keep_alive = lease_keeper(self._lease, storage)
        while self.reason is None:
            if probe is not None and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_POLL_SECONDS
                down = probe()
                answering = 0 if down is not None else answering + 1
                was_down = down or was_down
                # Twice in a row: a dependency that answers once and falls over again (a
                # crash-looping store) does not use up the restarts in seconds.
                back = was_down is not None and answering >= PROBE_OK_IN_A_ROW
                if back and time.monotonic() - started >= MIN_BACKOFF_SECONDS and self.reason is None:
                    log.info("%s answers again: restarting now", was_down)
                    return False
            keep_alive()
            if self._lease is not None:
                # No micro-batch runs: held at once (serve's trending refresh may: at a later call).
                self._lease.make_way(storage, poll_seconds)
            if marker is not None and storage.run(
                "check for a stop request", lambda: file_exists(spark, marker), False
            ):
                storage.run("remove the stop request", lambda: delete_file(spark, marker), False)
                self.requested.append(marker)
                break
            left = deadline - time.monotonic()
            if left <= 0 and down is not None and not extended and longest > seconds:
                log.info("%s still does not answer: waiting for it (at most %.0f s in all)", down, longest)
                extended, deadline = True, started + longest
                left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(poll_seconds, left))  # a timed wait with a stop check, not a sync
        return self.reason is not None


def dependency_probe(checks: Mapping[str, Callable[[], object]]) -> Callable[[], str | None]:
    """A probe for :func:`supervise`: the name of the first dependency whose check raises (it
    does not answer), or None when every one answers. ``checks``: name -> a quick call that
    raises when that dependency is down (:func:`kafka_check`, :func:`carousel.online_store.ping_check`)."""

    def probe() -> str | None:
        for name, check in checks.items():
            try:
                check()
            except Exception:  # noqa: BLE001 - any failure of the check means "not answering"
                return name
        return None

    return probe


def kafka_check(kafka: KafkaConfig) -> Callable[[], object]:
    """A check that raises while the Kafka cluster does not answer a metadata request (from any
    of its bootstrap servers). One admin client serves every check; librdkafka's own connection
    logs are off (a probe of a broker that is down would log each reconnect)."""
    from confluent_kafka.admin import AdminClient  # imported late: only supervised jobs need it

    client: list[AdminClient] = []

    def check() -> object:
        if not client:
            client.append(AdminClient({**kafka.client_settings(), "log_level": 0}))
        return client[0].list_topics(timeout=PROBE_TIMEOUT_SECONDS)

    return check


# How often a restart held back by a batch job's writer lease claims its lease again.
RECLAIM_SECONDS = 5.0


def _claim_for_restart(
    lease: QueryLease, storage: StorageChecks, stop_watch: _StopWatch, query_name: str
) -> bool:
    """Claim the lease before a restart (a start commits, perhaps after an outage that let the
    lease lapse and a batch job take one of the query's tables, on S3). While refused, the restart
    waits (its lease kept, renewed) and claims again every :data:`RECLAIM_SECONDS`: an always-on
    query outlives a batch job. False when a stop was asked for meanwhile."""
    held_back = False
    while True:
        try:
            lease.claim(storage, release_on_refusal=False)
        except AlreadyRunningError:
            raise  # not a batch job to outwait: another process runs the query
        except JobError as err:
            if not held_back:
                log.warning(
                    "%s: restart held back (%s); claimed again every %.0f s", query_name, err, RECLAIM_SECONDS
                )
                held_back = True
            if stop_watch.wait(RECLAIM_SECONDS, min(1.0, RECLAIM_SECONDS)):
                return False
            continue
        if held_back:
            log.info("%s: restart no longer held back", query_name)
        return True


def supervise(
    spark: SparkSession,
    start: Callable[[], StreamingQuery],
    policy: SupervisionConfig,
    query_name: str,
    stop_timeout_seconds: float,
    marker: str | None = None,
    lease: QueryLease | None = None,
    started: StreamingQuery | None = None,
    probe: Callable[[], str | None] | None = None,
    keep_lease: bool = False,
    storage: StorageChecks | None = None,
) -> StreamingQuery:
    """Run the query that ``start`` starts until it is stopped or finishes; restart it on transient
    errors. Returns the last query started (for its progress).

    ``probe``: the query's dependencies (:func:`dependency_probe`); a backoff ends early once one
    seen down answers again (:meth:`_StopWatch.wait`).

    ``started``: the first run, already started by the caller (who handled its start's errors);
    otherwise the first start's own errors propagate as they are (a job that cannot start says
    why). A restart that fails to start with a transient error counts as a failed attempt.

    ``lease``: claimed before each start (a query's start commits: its tables' creation): a batch
    job's writer lease on one of its tables refuses the first start (:meth:`QueryLease.claim`,
    :class:`JobError`) and holds a restart back until it is gone (:func:`_claim_for_restart`); and
    removed at the end unless ``keep_lease`` (the caller still commits after: it removes it).
    ``storage``: the caller's :class:`StorageChecks` when it also reaches the storage (one log
    line per outage).
    """
    storage = storage or StorageChecks(query_name)
    stop_watch = _StopWatch(spark, marker, lease, storage)
    if lease is not None and started is None:
        lease.claim(storage)
    restarts = 0
    last, pending = started, started  # the last query started; the one to await next, if started
    try:
        # One handler for the whole run: a signal while a restart starts (seconds for serve) is
        # recorded, not Python's default (the process killed mid-start); await_query's own
        # handlers take over while a query runs, and this one comes back after.
        with stop_signals(stop_watch.on_signal):
            while True:
                began = time.monotonic()
                if (
                    lease is not None
                    and pending is None
                    and last is not None
                    and not _claim_for_restart(lease, storage, stop_watch, query_name)
                ):
                    log.info("%s: stop requested while its restart was held back: not restarted", query_name)
                    return last
                try:
                    query = pending if pending is not None else start()
                except Exception as err:  # noqa: BLE001 - a restart's start failing transiently is retried
                    if last is None:
                        raise  # the first start: the job's own start-up error
                    summary = error_text = mask_secrets(f"{type(err).__module__}.{type(err).__name__}: {err}")
                else:
                    first_run = last is None or query is started
                    last, pending = query, None
                    if stop_watch.reason is not None:  # a signal came while it started
                        log.info("%s: stop requested while it started (%s)", query_name, stop_watch.reason)
                        keep_alive = lease_keeper(lease, storage)
                        stop_between_batches(query, stop_timeout_seconds, keep_alive=keep_alive)
                        return query
                    try:
                        await_query(
                            spark,
                            query,
                            stop_timeout_seconds,
                            marker,
                            lease=lease,
                            keep_lease=True,
                            clear_stale_stop=first_run,
                            storage=storage,
                            requested=stop_watch.requested,
                        )
                        return query
                    except QueryFailedError as err:
                        summary, error_text = mask_secrets(err.summary), mask_secrets(err.detail)
                if policy.healthy_after_seconds <= time.monotonic() - began:
                    restarts = 0  # it ran long enough since its last start: a new incident
                pattern = transient_reason(error_text, policy.transient_errors)
                summary = telling_line(summary)
                if pattern is None:
                    raise QueryGaveUpError(
                        f"{query_name} failed with a permanent error (not restarted): {summary}"
                    )
                restarts += 1
                if restarts > policy.max_restarts:
                    times = f"{restarts} time{'s' if restarts > 1 else ''}"
                    raise QueryGaveUpError(
                        f"{query_name} failed {times} in a row with transient errors, the last: {summary}; "
                        f"gave up after {policy.max_restarts} restarts (supervision.max_restarts)"
                    )
                delay = backoff_seconds(restarts, policy.backoff_initial_seconds, policy.backoff_max_seconds)
                log.warning(
                    "%s failed with a transient error (%s): restart %d of at most %d in %.0f s; error: %s",
                    query_name,
                    pattern,
                    restarts,
                    policy.max_restarts,
                    delay,
                    summary,
                )
                count_restart(query_name, pattern)
                poll = min(2.0, max(0.05, delay / 10))  # the stop check's; probes: once a second
                if stop_watch.wait(delay, poll, probe, longest=max(delay, policy.backoff_max_seconds)):
                    log.info(
                        "%s: stop requested in the backoff (%s): not restarted", query_name, stop_watch.reason
                    )
                    assert last is not None  # a failure before any start was raised above
                    return last
    finally:
        if lease is not None and not keep_lease:
            storage.run("remove its lease (it expires by itself)", lease.release, None)
