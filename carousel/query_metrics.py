"""Prometheus metrics of the streaming jobs (``ingest``, ``serve``, ``record-sends``), at /metrics.

Role: each streaming job's ``main`` calls :func:`start_exporter`, which serves this process's
metrics in Prometheus text format on ``metrics.host``:``metrics.ports.<job>`` and adds a
listener to the session that turns each query progress into metrics. Inputs: Spark's query
progress (rates, batch durations, the Kafka source's offsets behind the latest, the query's
observed metrics: ``serve``'s outcome counts and payloads per channel), plus counts the jobs
report themselves (ingest's records by outcome and quarantine reason; the supervisor's
restarts). Output: the series below, labelled by query name (``carousel_query_*``) and, for
ingest, by outcome and reason (``carousel_payloads``: by query and channel).

Why a listener: Spark already measures every micro-batch; reading its progress costs nothing on
the hot path (it arrives asynchronously on the driver). Ingest's quarantine reasons cost one
small group-by over the rejected records of a batch that has any. Counters live in this process and start
from zero at each start, as Prometheus counters do; a replayed micro-batch after a restart is
counted again.

    with exported(spark, cfg.metrics, "ingest"):                 # nothing when switched off
        supervise(...)
    curl -s http://127.0.0.1:9464/metrics | grep carousel_
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
    write_to_textfile,
)
from prometheus_client.parser import text_string_to_metric_families
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQueryListener

from carousel.config import MetricsConfig
from carousel.schemas import QUARANTINE_EVENT_TIME, QUARANTINE_TOO_EARLY, QUARANTINE_VALUED_REASONS

__all__ = [
    "EndTrackingListener",
    "remove_listener",
    "PAYLOADS_BY_CHANNEL",
    "REGISTRY",
    "MetricsExporter",
    "count_outcomes",
    "count_quarantined",
    "count_restart",
    "exported",
    "quarantine_reason_kind",
    "start_exporter",
    "write_job_metrics",
]

log = logging.getLogger(__name__)

# The streaming jobs' own registry (prometheus_client's default one is the API's), with the
# process's CPU, memory and open files (process_*).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
_BATCHES = Counter("carousel_query_batches", "Micro-batches finished", ["query"], registry=REGISTRY)
_INPUT_ROWS = Counter("carousel_query_input_rows", "Rows read from the sources", ["query"], registry=REGISTRY)
_INPUT_RATE = Gauge(
    "carousel_query_input_rows_per_second", "Input rate of the last micro-batch", ["query"], registry=REGISTRY
)
_PROCESSED_RATE = Gauge(
    "carousel_query_processed_rows_per_second",
    "Processing rate of the last micro-batch",
    ["query"],
    registry=REGISTRY,
)
_BATCH_SECONDS = Histogram(
    "carousel_query_batch_duration_seconds",
    "Wall time of each micro-batch",
    ["query"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
_KAFKA_LAG = Gauge(
    "carousel_query_kafka_offsets_behind_latest",
    "Kafka records not yet read, at the end of the last micro-batch (sum over sources of the "
    "largest partition lag)",
    ["query"],
    registry=REGISTRY,
)
_RECORDS = Counter(
    "carousel_query_records",
    "Records by outcome. serve: its observed counters (records, triggers and events_applied are "
    "totals; payloads, control, dead_letter, no_items and skipped_* are outcomes). ingest: read, "
    "and its outcomes stored, quarantined, duplicates, erased (attributes_dropped: of stored)",
    ["query", "outcome"],
    registry=REGISTRY,
)
_QUARANTINED = Counter(
    "carousel_ingest_quarantined",
    "Records quarantined by ingest, by reason (values in the reason left out)",
    ["reason"],
    registry=REGISTRY,
)
# The name of the observation whose columns are payloads written per channel (serve).
PAYLOADS_BY_CHANNEL = "payloads_by_channel"
_PAYLOADS = Counter(
    "carousel_payloads",
    "Payloads written to each channel's topic (what its senders receive), by query and channel",
    ["query", "channel"],
    registry=REGISTRY,
)
_LATE_ROWS = Counter(
    "carousel_query_late_rows_dropped",
    "Rows a stateful operator dropped as older than the query's watermark (record-sends: outbox "
    "records sent more than sent_log.dedupe_hours before the newest it has seen)",
    ["query"],
    registry=REGISTRY,
)
_RESTARTS = Counter(
    "carousel_query_restarts",
    "Supervised restarts after a transient failure, by the error pattern matched",
    ["query", "pattern"],
    registry=REGISTRY,
)


def quarantine_reason_kind(reason: str) -> str:
    """A quarantine reason without the record's own values, for a label of bounded cardinality:
    ``unknown event type 'Foo'`` -> ``unknown event type``; ``event_time '1999-...' is before
    2000-01-01T00:00:00Z`` -> ``event_time too early``. Field names are kept (a fixed set)."""
    for prefix in QUARANTINE_VALUED_REASONS:
        if reason.startswith(prefix):
            return prefix
    if reason.startswith(f"{QUARANTINE_EVENT_TIME} "):
        too_early = f" {QUARANTINE_TOO_EARLY} " in reason
        return f"{QUARANTINE_EVENT_TIME} too early" if too_early else f"{QUARANTINE_EVENT_TIME} too far ahead"
    return reason


def count_outcomes(query_name: str, counts: Mapping[str, int]) -> None:
    """Add a micro-batch's records by outcome (only outcomes with records)."""
    for outcome, count in counts.items():
        if count:
            _RECORDS.labels(query_name, outcome).inc(count)


def count_quarantined(reasons: Mapping[str, int]) -> None:
    """Add quarantined records by reason text (grouped by :func:`quarantine_reason_kind`)."""
    for reason, count in reasons.items():
        _QUARANTINED.labels(quarantine_reason_kind(reason)).inc(count)


def count_restart(query_name: str, pattern: str) -> None:
    _RESTARTS.labels(query_name, pattern).inc()


# ---------------------------------------------------------------------------------------------
# Batch jobs: the last run's metrics in a file, for node_exporter's textfile collector
# ---------------------------------------------------------------------------------------------
_LAST_SUCCESS = "carousel_job_last_success_timestamp_seconds"


def write_job_metrics(
    metrics: MetricsConfig,
    job: str,
    stage_seconds: Mapping[str, float],
    counts: Mapping[str, float],
    failed_stage: str | None = None,
    now: float | None = None,
) -> Path | None:
    """Write a batch job's last run as Prometheus text, ``<metrics.textfile_dir>/carousel_<job>.prom``
    (atomically: a temporary file renamed), for node_exporter's textfile collector; the path,
    or None when switched off or the file could not be written (logged: metrics never fail a job).

    Series, each labelled ``job``: ``carousel_job_last_run_timestamp_seconds``,
    ``carousel_job_last_success_timestamp_seconds`` (kept from the previous file when this run
    failed: alert on its age), ``carousel_job_success`` (1 or 0), ``carousel_job_stage_seconds``
    (by ``stage``, the stages that ran), ``carousel_job_failed_stage`` (1, by ``stage``, when one
    failed) and ``carousel_job_count`` (by ``what``: rows exported, users, items, table version).
    """
    if not metrics.enabled or not metrics.textfile_dir:
        return None
    try:
        return _write_job_metrics(metrics.textfile_dir, job, stage_seconds, counts, failed_stage, now)
    except Exception as err:  # noqa: BLE001 - metrics never fail the job they describe
        log.warning("%s: cannot write its metrics to %s: %s", job, metrics.textfile_dir, err)
        return None


def _write_job_metrics(
    folder: str,
    job: str,
    stage_seconds: Mapping[str, float],
    counts: Mapping[str, float],
    failed_stage: str | None,
    now: float | None,
) -> Path:
    now = time.time() if now is None else now
    path = Path(folder) / f"carousel_{job}.prom"
    last_success = now if failed_stage is None else _previous_value(path, _LAST_SUCCESS, job)
    registry = CollectorRegistry(auto_describe=True)

    def gauge(name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(name, documentation, ["job", *labels], registry=registry)

    gauge("carousel_job_last_run_timestamp_seconds", "When the job's last run ended").labels(job).set(now)
    if last_success is not None:
        gauge(_LAST_SUCCESS, "When the job last succeeded").labels(job).set(last_success)
    gauge("carousel_job_success", "1 if the last run succeeded, else 0").labels(job).set(
        0 if failed_stage else 1
    )
    stages = gauge("carousel_job_stage_seconds", "Seconds each stage of the last run took", "stage")
    for stage, seconds in stage_seconds.items():
        stages.labels(job, stage).set(seconds)
    if failed_stage:
        gauge("carousel_job_failed_stage", "The stage the last run failed at", "stage").labels(
            job, failed_stage
        ).set(1)
    counted = gauge("carousel_job_count", "What the last run produced", "what")
    for what, value in counts.items():
        counted.labels(job, what).set(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path


def _previous_value(path: Path, name: str, job: str) -> float | None:
    """The value of ``name{job=...}`` in the metrics file at ``path``, if there is one."""
    try:
        text = path.read_text()
    except (OSError, ValueError):  # absent, unreadable, or not text: no previous success known
        return None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("job") == job:
                    return float(sample.value)
    except ValueError:  # a damaged file: start again
        return None
    return None


# How long removing a listener waits for Spark to deliver the end of the runs that ended.
_END_DELIVERY_SECONDS = 10.0


class EndTrackingListener(StreamingQueryListener):
    """A listener that knows the query runs it saw start and not end yet, so that it is removed
    (:func:`remove_listener`) only once Spark has delivered the end of those that have ended.

    Spark delivers events on a thread of its own, after ``awaitTermination`` has returned: an
    event delivered while the job's Python side exits fails in the JVM's log ("Listener ... threw
    an exception ... Error while sending a command"), as after an ``--available-now`` run.
    Subclasses put their own handling in :meth:`query_started` and :meth:`query_terminated`."""

    def __init__(self) -> None:
        self._open_runs: set[str] = set()  # run ids: a supervised restart keeps the query id
        self._ended = threading.Condition()

    @property
    def open_runs(self) -> set[str]:
        """The run ids whose start was delivered here and whose end was not."""
        with self._ended:
            return set(self._open_runs)

    def wait_ended(self, running: set[str], timeout_seconds: float) -> bool:
        """Wait until every open run but ``running`` has had its end delivered; False at the deadline."""
        with self._ended:
            return self._ended.wait_for(lambda: self._open_runs <= running, timeout_seconds)

    def onQueryStarted(self, event: Any) -> None:  # noqa: N802 - Spark's listener API
        with self._ended:
            self._open_runs.add(str(event.runId))
        self.query_started(event)

    def onQueryTerminated(self, event: Any) -> None:  # noqa: N802
        try:
            self.query_terminated(event)
        finally:
            with self._ended:
                self._open_runs.discard(str(event.runId))
                self._ended.notify_all()

    def query_started(self, event: Any) -> None:
        """A query started (after the run is counted open)."""

    def query_terminated(self, event: Any) -> None:
        """A query ended (before the run is counted ended)."""


def remove_listener(
    spark: SparkSession, listener: EndTrackingListener, timeout_seconds: float = _END_DELIVERY_SECONDS
) -> None:
    """Remove ``listener`` once Spark has delivered the end of every run that is no longer active
    (at most ``timeout_seconds``); at once when the session's context has stopped, which drops them."""
    if not spark.sparkContext._jsc.sc().isStopped():  # noqa: SLF001 - pyspark has no public check
        running = {str(query.runId) for query in spark.streams.active}
        if not listener.wait_ended(running, timeout_seconds):
            log.warning(
                "the end of query runs %s was not delivered to %s within %.0f s",
                sorted(listener.open_runs - running),
                type(listener).__name__,
                timeout_seconds,
            )
    spark.streams.removeListener(listener)


class _ProgressMetrics(EndTrackingListener):
    """Turns each query progress of the session into the ``carousel_query_*`` series."""

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[str, str] = {}  # query id -> name (idle events carry only the id)

    def query_started(self, event: Any) -> None:
        self._names[str(event.id)] = str(event.name or event.id)

    def onQueryProgress(self, event: Any) -> None:  # noqa: N802
        progress = event.progress
        name = str(progress.name or progress.id)
        self._names[str(progress.id)] = name
        _BATCHES.labels(name).inc()
        _INPUT_ROWS.labels(name).inc(progress.numInputRows)
        _INPUT_RATE.labels(name).set(_number(progress.inputRowsPerSecond))
        _PROCESSED_RATE.labels(name).set(_number(progress.processedRowsPerSecond))
        _BATCH_SECONDS.labels(name).observe(progress.batchDuration / 1000)
        lags = [
            _number(source.metrics.get("maxOffsetsBehindLatest"))
            for source in progress.sources
            if "maxOffsetsBehindLatest" in (source.metrics or {})
        ]
        if lags:
            _KAFKA_LAG.labels(name).set(sum(lags))
        late = sum(int(op.numRowsDroppedByWatermark or 0) for op in progress.stateOperators)
        if late:  # logged before counted: whoever sees the count finds the line
            log.warning(
                "%s: %d rows dropped as older than the watermark in batch %d (not written anywhere)",
                name,
                late,
                progress.batchId,
            )
            _LATE_ROWS.labels(name).inc(late)
        for observation, row in progress.observedMetrics.items():
            counts = {k: int(v) for k, v in row.asDict().items() if isinstance(v, int)}
            if observation == PAYLOADS_BY_CHANNEL:
                for channel, count in counts.items():
                    _PAYLOADS.labels(name, channel).inc(count)
            else:
                count_outcomes(name, counts)

    def onQueryIdle(self, event: Any) -> None:  # noqa: N802
        # No new data: Spark sends no progress then, so the last busy batch's rates would stay.
        self._at_rest(str(event.id))

    def query_terminated(self, event: Any) -> None:
        self._at_rest(str(event.id))

    def _at_rest(self, query_id: str) -> None:
        name = self._names.get(query_id)
        if name is not None:
            _INPUT_RATE.labels(name).set(0)
            _PROCESSED_RATE.labels(name).set(0)


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number else 0.0  # NaN (no rows in the batch): 0


class MetricsExporter:
    """The running /metrics server and the session's progress listener; :meth:`stop` ends both."""

    def __init__(self, spark: SparkSession, server: Any, thread: threading.Thread, port: int) -> None:
        self._spark, self._server, self._thread, self.port = spark, server, thread, port
        self._listener = _ProgressMetrics()
        spark.streams.addListener(self._listener)

    @property
    def open_runs(self) -> set[str]:
        """The query runs whose end the listener has not had yet."""
        return self._listener.open_runs

    def stop(self) -> None:
        """Stop serving, and listening once the listener has had the end of each run that ended
        (:func:`remove_listener`)."""
        try:
            remove_listener(self._spark, self._listener)
        finally:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)


@contextmanager
def exported(spark: SparkSession, metrics: MetricsConfig, job: str) -> Iterator[MetricsExporter | None]:
    """:func:`start_exporter` for the duration of a ``with`` block (stopped however it ends)."""
    exporter = start_exporter(spark, metrics, job)
    try:
        yield exporter
    finally:
        if exporter is not None:
            exporter.stop()


def start_exporter(spark: SparkSession, metrics: MetricsConfig, job: str) -> MetricsExporter | None:
    """Serve this process's metrics for ``job`` (a key of ``metrics.ports``); None when switched off
    (``metrics.enabled`` false or the job's port 0) or when the port is taken: the job runs on
    without metrics rather than not at all, and says so."""
    port = metrics.ports.get(job, 0)
    if not metrics.enabled or port == 0:
        return None
    try:
        server, thread = start_http_server(port, addr=metrics.host, registry=REGISTRY)
    except OSError as err:
        log.error(
            "metrics not exported: %s:%d cannot be opened (%s); set metrics.ports.%s (0: off)",
            metrics.host,
            port,
            err.strerror or err,
            job,
        )
        return None
    log.info("metrics on http://%s:%d/metrics", metrics.host, port)
    return MetricsExporter(spark, server, thread, port)
