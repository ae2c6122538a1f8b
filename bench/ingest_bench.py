"""Ingest benchmark: throughput against a plain Kafka -> Delta ceiling, and freshness at a steady rate.

    .venv/bin/python -m bench.ingest_bench                  # 1,000,000 events, 60 s steady phase
    .venv/bin/python -m bench.ingest_bench --quick          # smoke run, a few minutes
    .venv/bin/python -m bench.ingest_bench --events 200000 --rate 3000 --duration 30 \\
        --set ingest.max_offsets_per_trigger=100000

Everything runs on this machine: a private Kafka broker (temp state folder, free ports), one
``local[2]`` Spark session, Delta tables under a temp folder (or ``--workdir``). Phases:

1. produce ``--events`` simulator records (realistic user/item mix, labelled bad records and
   duplicates) to a fresh topic at full speed;
2. ceiling: the same session reads that topic with the ingest's own source
   (``streaming.ingest.read_event_stream``: same ``maxOffsetsPerTrigger``, earliest offsets) and
   blind-appends the raw rows to a Delta table, ``availableNow``; run once before and once after the
   ingest (the faster run is the ceiling: the first also warms the JVM);
3. ingest: ``streaming.ingest.run(spark, cfg, available_now=True)`` on the same topic, fresh storage;
   events/s = records read / seconds; ``ingest_log`` shows every record accounted for; the steps of
   each micro-batch are timed by wrapping the module's helpers (no change to ``streaming/ingest.py``);
4. steady: a fresh topic and storage, the ingest running continuously (processing-time trigger,
   ``--trigger-interval``), a producer thread at ``--rate`` for ``--duration`` seconds; then wait until
   ``ingest_log`` has read everything. Freshness of an event = ``completed_at`` of its batch in
   ``ingest_log`` minus its Kafka record timestamp (``events.received_at``).

Figures are printed and written to ``--output`` as JSON; nothing is asserted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from bench import common
from carousel import broker
from carousel.cli import add_config_args, setup_logging
from carousel.config import CarouselConfig
from carousel.query_lifecycle import stop_between_batches
from carousel.schemas import EVENTS_TABLE, INGEST_LOG_TABLE, PROFILES_TABLE, QUARANTINE_TABLE

log = logging.getLogger("bench.ingest")

FULL_DEFAULTS = {"events": 1_000_000, "duration": 60.0, "max_offsets_per_trigger": 250_000}
QUICK_DEFAULTS = {"events": 50_000, "duration": 15.0, "max_offsets_per_trigger": 25_000}
DEFAULT_OUTPUT = "bench/results/ingest.json"
# Effective session settings recorded with the results (they change what a batch costs).
SESSION_KEYS = (
    "spark.driver.memory",
    "spark.sql.shuffle.partitions",
    "spark.sql.adaptive.enabled",
    "spark.databricks.delta.snapshotPartitions",
)


# ---------------------------------------------------------------------------------------------
# Arguments and configuration
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = common.bench_parser(
        "ingest", "Ingest throughput (vs a plain Kafka->Delta ceiling) and freshness at a steady rate."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 50,000 events, 15 s steady phase")
    parser.add_argument(
        "--events", type=int, help="records for the throughput phases (1,000,000; quick 50,000)"
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="steady phase: records/s (2000)")
    parser.add_argument("--duration", type=float, help="steady phase: seconds of producing (60; quick 15)")
    parser.add_argument(
        "--max-offsets-per-trigger",
        type=int,
        help="ingest.max_offsets_per_trigger, also used by the ceiling (250,000; quick 25,000)",
    )
    parser.add_argument(
        "--trigger-interval", default="1 second", help="steady phase: ingest.trigger_interval ('1 second')"
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions of each topic (4)")
    parser.add_argument("--users", type=int, default=100_000, help="simulated users (100,000)")
    parser.add_argument("--items", type=int, default=10_000, help="simulated items (10,000)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    parser.add_argument("--shuffle-partitions", type=int, default=4, help="spark.sql.shuffle.partitions (4)")
    parser.add_argument("--driver-memory", default="4g", help="Spark driver memory (4g; keep <= 6g here)")
    parser.add_argument("--broker-heap", default="1g", help="Kafka broker heap (1g)")
    parser.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Spark setting for the session, e.g. spark.databricks.delta.snapshotPartitions=4",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="steady phase: seconds to wait, after the producer ends, for ingest to read everything",
    )
    parser.add_argument("--skip-steady", action="store_true", help="only the throughput phases")
    parser.add_argument("--workdir", help="keep broker data and tables here (default: a temp folder)")
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the temp folder")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSON results ({DEFAULT_OUTPUT})")
    return add_config_args(parser)


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    base = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def bench_config(args: argparse.Namespace, required: Sequence[str]) -> CarouselConfig:
    """Bench defaults, then the user's --config/--set, then what a phase needs (root, topic, ports)."""
    head = [
        "spark.master=local[2]",
        f"spark.shuffle_partitions={args.shuffle_partitions}",
        f"spark.driver_memory={args.driver_memory}",
        f"ingest.max_offsets_per_trigger={args.max_offsets_per_trigger}",
        "ingest.starting_offsets=earliest",
        f"ingest.trigger_interval={args.trigger_interval}",
        f"simulator.users={args.users}",
        f"simulator.items={args.items}",
        f"simulator.seed={args.seed}",
        f"broker.heap={args.broker_heap}",
    ]
    return common.bench_config(args, head, required, log)


def _spark_conf(items: Sequence[str]) -> dict[str, str]:
    conf: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--spark-conf expects KEY=VALUE, got {item!r}")
        conf[key.strip()] = value.strip()
    return conf


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _per_s(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def _label_totals(counts: dict[str, int]) -> dict[str, int]:
    from jobs.simulate_events import BAD_PREFIX, DUPLICATE, VALID

    return {
        "valid": counts.get(VALID, 0),
        "duplicate": counts.get(DUPLICATE, 0),
        "bad": sum(v for k, v in counts.items() if k.startswith(BAD_PREFIX)),
    }


# ---------------------------------------------------------------------------------------------
# Step timings inside streaming.ingest.process_batch
# ---------------------------------------------------------------------------------------------
# The wall time between two wrapped helpers is Spark work done by process_batch itself; it is named
# after what precedes the next helper in process_batch.
_CLASSIFY = "read Kafka (+ count-only read) + classify + dedupe + count"
_TABLES = "quarantine + events + profiles commits"
_GAP_BEFORE = {
    _TABLES: _CLASSIFY,
    "ingest_log append": "other",
    "end": "other",
}
STEP_ORDER = (_CLASSIFY, _TABLES, "ingest_log append", "other")
# The parts of _TABLES, each write's own seconds: side by side (ingest.parallel_commits) they
# overlap, so they are no shares of the batch. The MERGE is a part of "profile deltas + write"
# (ingest.profile_writes: merge; with append the write is the append to profile_updates, and the
# fold after the log commit counts in "other").
PARTS = {
    "_commit_quarantine": "quarantine append",
    "_commit_events": "events append",
    "_commit_profiles": "profile deltas + write",
    "_upsert_profiles": "profiles MERGE",
}


class BatchStepTimer(common.BatchTimer):
    """Times the steps of ``streaming.ingest.process_batch`` by wrapping the helpers it calls.

    Only attributes are replaced, while installed: the module's ``process_batch``, ``run_all`` (the
    batch's commits to quarantine, events and profiles, side by side or in turn), the writes it runs
    (:data:`PARTS`), and ``BatchCommits.append`` (on the class: every query in the process; timed
    for the ingest_log, the batch's last commit) - ``run`` binds ``process_batch`` when it is
    called, so install before ``run``; no code changes. A commit's check of the table's history
    (the first batch after a start) counts in its step. Per batch: seconds per step (see
    :data:`STEP_ORDER`), per part, and the total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batch_session_conf: dict[str, str] = {}

    def _timed_step(self, step_of: Callable[..., str], original: Callable[..., Any]) -> Callable[..., Any]:
        def steps(*args: Any, **kwargs: Any) -> tuple[str, str]:
            step = step_of(*args, **kwargs)
            return step, _GAP_BEFORE.get(step, "other")

        return self.timed(original, steps)

    def _timed_part(self, part: str, original: Callable[..., Any]) -> Callable[..., Any]:
        """``original``, its seconds added to the batch's ``part`` (threads: the mark is not moved)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            current = self._current
            if current is None:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                parts = current["parts"]
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - start

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator[BatchStepTimer]:
        from streaming import ingest

        names = ("process_batch", "run_all", *PARTS)
        originals = {name: getattr(ingest, name) for name in names if hasattr(ingest, name)}
        # Appends go through the query's BatchCommits (a method: patched on the class).
        commits_class = getattr(ingest, "BatchCommits", None)
        original_append = getattr(commits_class, "append", None)
        missing = sorted(set(names) - set(originals))
        if "process_batch" not in originals:
            log.warning("streaming.ingest.process_batch not found: no per-step timings")
            yield self
            return
        if missing:
            log.warning("streaming.ingest has no %s: those steps are timed as their neighbours", missing)
        original_batch = originals["process_batch"]

        def timed_batch(batch: Any, batch_id: int, **kwargs: Any) -> None:
            if not self.batch_session_conf:
                # The settings the micro-batch really runs with (streaming clones the session).
                conf = batch.sparkSession.conf
                for key in ("spark.sql.adaptive.enabled", "spark.sql.shuffle.partitions"):
                    with contextlib.suppress(Exception):
                        self.batch_session_conf[key] = conf.get(key)
            started = time.perf_counter()
            self._current = {"batch_id": batch_id, "steps": {}, "parts": {}}
            self._mark = started
            try:
                original_batch(batch, batch_id, **kwargs)
            finally:
                ended = time.perf_counter()
                current, self._current = self._current, None
                steps = current["steps"]
                if not steps:  # nothing was written: an empty batch (process_batch returned early)
                    self.empty_batches += 1
                else:
                    steps["other"] = steps.get("other", 0.0) + (ended - self._mark)
                    current["total"] = ended - started
                    current["wall_end"] = time.time()
                    self.batches.append(current)

        def timed_append(commits: Any, df: Any, location: str, *args: Any, **kwargs: Any) -> Any:
            # Only the log's append is a step of its own; the others are parts of _TABLES.
            if str(location).rstrip("/").rsplit("/", 1)[-1] == INGEST_LOG_TABLE:
                return timed_log_append(commits, df, location, *args, **kwargs)
            return original_append(commits, df, location, *args, **kwargs)

        ingest.process_batch = timed_batch
        if "run_all" in originals:
            ingest.run_all = self._timed_step(lambda *a, **k: _TABLES, originals["run_all"])
        for name, part in PARTS.items():
            if name in originals:
                setattr(ingest, name, self._timed_part(part, originals[name]))
        if original_append is not None:
            timed_log_append = self._timed_step(lambda *a, **k: "ingest_log append", original_append)
            commits_class.append = timed_append
        else:
            log.warning("streaming.ingest has no BatchCommits.append: appends are timed as their neighbours")
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(ingest, name, original)
            if original_append is not None:
                commits_class.append = original_append

    def reset(self) -> None:
        self.batches = []
        self.empty_batches = 0

    def summary(self, batches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Seconds per step over ``batches`` (default all): total, mean per batch, share of batch time."""
        batches = self.batches if batches is None else batches
        total = sum(b["total"] for b in batches)
        steps: dict[str, dict[str, float]] = {}
        names = list(STEP_ORDER) + sorted({s for b in batches for s in b["steps"]} - set(STEP_ORDER))
        for name in names:
            seconds = sum(b["steps"].get(name, 0.0) for b in batches)
            if seconds == 0 and name not in STEP_ORDER:
                continue
            steps[name] = {
                "seconds": round(seconds, 3),
                "mean_s": round(seconds / len(batches), 3) if batches else 0.0,
                "share": round(seconds / total, 3) if total else 0.0,
            }
        parts: dict[str, dict[str, float]] = {}
        for name in sorted({p for b in batches for p in b.get("parts", {})}):
            seconds = sum(b.get("parts", {}).get(name, 0.0) for b in batches)
            parts[name] = {"seconds": round(seconds, 3), "mean_s": round(seconds / len(batches), 3)}
        return {
            "batches": len(batches),
            "empty_batches_skipped": self.empty_batches,
            "foreach_batch_session_conf": dict(self.batch_session_conf),
            "batch_seconds": round(total, 3),
            "steps": steps,
            "parts_of_commits": parts,
        }


def _log_step_summary(title: str, summary: dict[str, Any]) -> list[str]:
    lines = [f"{title}: {summary['batches']} batches, {summary['batch_seconds']:.1f} s in process_batch"]
    for name, figures in summary["steps"].items():
        lines.append(
            f"    {name:<36} {figures['seconds']:>9.2f} s  {figures['mean_s']:>7.2f} s/batch  "
            f"{100 * figures['share']:5.1f}%"
        )
    for name, figures in summary.get("parts_of_commits", {}).items():
        lines.append(
            f"      part: {name:<30} {figures['seconds']:>9.2f} s  {figures['mean_s']:>7.2f} s/batch"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
def produce_topic(
    cfg: CarouselConfig, world: Any, n_records: int, rate: float, seed: int, progress_every: int
) -> dict[str, Any]:
    """Produce ``n_records`` simulator records to the config's events topic; returns the figures."""
    from jobs.simulate_events import produce, stream_records

    topic = cfg.kafka.topic("events").name
    load_before = common.load1()
    started = time.perf_counter()
    records = stream_records(world, cfg.simulator, n_records, datetime.now(UTC), seed)
    counts = produce(records, cfg.kafka, topic, rate=rate, progress_every=progress_every, flush_timeout=300)
    seconds = time.perf_counter() - started
    produced = sum(counts.values())
    return {
        "topic": topic,
        "records": produced,
        "seconds": round(seconds, 3),
        "events_per_s": round(_per_s(produced, seconds), 1),
        "labels": _label_totals(counts),
        "load_1min": [load_before, common.load1()],
    }


def _offsets(by_topic: dict[str, dict[str, int]] | None) -> dict[tuple[str, str], int]:
    """A Kafka source's offsets in a progress's JSON (topic -> partition -> offset; None: none)."""
    return {(topic, part): int(o) for topic, parts in (by_topic or {}).items() for part, o in parts.items()}


def _records_of(progress: Any) -> int:
    """The Kafka records a micro-batch read: its end offsets less its start offsets, per topic
    partition (a first batch has no start: the bench's topics are fresh, so it starts at 0). Not
    ``numInputRows``: ingest reads each batch's offsets twice (the count-only read beside the
    classified one), and Spark counts the rows of both scans. From the progress's JSON: its
    Python ``sources`` hold the offsets as Python text."""
    ends: dict[tuple[str, str], int] = {}
    starts: dict[tuple[str, str], int] = {}
    for source in json.loads(progress.json)["sources"]:
        ends.update(_offsets(source.get("endOffset")))
        starts.update(_offsets(source.get("startOffset")))
    return sum(end - starts.get(key, 0) for key, end in ends.items())


def _batches_of(query: Any) -> list[dict[str, Any]]:
    """The data batches of a query's progress (needs spark.sql.streaming.numRecentProgressUpdates)."""
    batches = []
    for progress in query.recentProgress:
        rows = _records_of(progress)
        if rows:
            durations = dict(progress["durationMs"])
            batches.append({"batch_id": progress["batchId"], "rows": rows, "duration_ms": durations})
    return batches


def run_ceiling(spark: Any, cfg: CarouselConfig, label: str) -> dict[str, Any]:
    """Plain Delta append of the raw Kafka rows, availableNow, with the ingest's own source."""
    from pyspark.sql import functions as F

    from streaming.ingest import read_event_stream

    table = cfg.storage.table("raw_events")
    checkpoint = cfg.storage.checkpoint(f"ceiling-{label}")
    rows = read_event_stream(spark, cfg).select(
        F.col("value").cast("string").alias("value"), "topic", "partition", "offset", "timestamp"
    )
    log.info("ceiling (%s): plain Delta append of the raw Kafka rows to %s", label, table)
    load_before = common.load1()
    started = time.perf_counter()
    query = (
        rows.writeStream.format("delta")
        .outputMode("append")
        .queryName(f"bench-ceiling-{label}")
        .option("checkpointLocation", checkpoint)
        .trigger(availableNow=True)
        .start(table)
    )
    query.awaitTermination()
    seconds = time.perf_counter() - started
    if query.exception() is not None:
        raise RuntimeError(f"ceiling query failed: {query.exception()}")
    batches = _batches_of(query)
    read = sum(b["rows"] for b in batches)
    stored = spark.read.format("delta").load(table).count()
    result = {
        "records_read": read,
        "rows_stored": stored,
        "batches": len(batches),
        "seconds": round(seconds, 3),
        "events_per_s": round(_per_s(read, seconds), 1),
        "batch_durations_ms": [b["duration_ms"].get("triggerExecution") for b in batches],
        "load_1min": [load_before, common.load1()],
    }
    log.info(
        "ceiling (%s): %d records in %d batches, %.1f s -> %.0f events/s",
        label,
        read,
        len(batches),
        seconds,
        result["events_per_s"],
    )
    return result


def _ingest_log_totals(spark: Any, cfg: CarouselConfig) -> dict[str, int]:
    from pyspark.sql import functions as F

    row = (
        spark.read.format("delta")
        .load(cfg.storage.table(INGEST_LOG_TABLE))
        .agg(
            F.count(F.lit(1)).alias("batches"),
            F.coalesce(F.sum("records_read"), F.lit(0)).alias("records_read"),
            F.coalesce(F.sum("events_stored"), F.lit(0)).alias("events_stored"),
            F.coalesce(F.sum("quarantined"), F.lit(0)).alias("quarantined"),
            F.coalesce(F.sum("duplicates"), F.lit(0)).alias("duplicates"),
            F.coalesce(F.sum("profiles_upserted"), F.lit(0)).alias("profiles_upserted"),
        )
        .first()
    )
    return {key: int(value) for key, value in row.asDict().items()}


def _accounting(spark: Any, cfg: CarouselConfig, produced: dict[str, Any]) -> dict[str, Any]:
    """ingest_log sums, table counts, and whether they match what the simulator labelled."""
    totals = _ingest_log_totals(spark, cfg)
    tables = {
        name: spark.read.format("delta").load(cfg.storage.table(name)).count()
        for name in (EVENTS_TABLE, QUARANTINE_TABLE, PROFILES_TABLE)
    }
    labels = produced["labels"]
    checks = {
        "read_equals_produced": totals["records_read"] == produced["records"],
        "read_equals_stored_plus_quarantined_plus_duplicates": totals["records_read"]
        == totals["events_stored"] + totals["quarantined"] + totals["duplicates"],
        "stored_equals_valid_labels": totals["events_stored"] == labels["valid"],
        "quarantined_equals_bad_labels": totals["quarantined"] == labels["bad"],
        "duplicates_equal_duplicate_labels": totals["duplicates"] == labels["duplicate"],
        "events_table_equals_stored": tables[EVENTS_TABLE] == totals["events_stored"],
        "quarantine_table_equals_quarantined": tables[QUARANTINE_TABLE] == totals["quarantined"],
    }
    return {"ingest_log": totals, "table_rows": tables, "simulator_labels": labels, "checks": checks}


def run_ingest_throughput(
    spark: Any, cfg: CarouselConfig, produced: dict[str, Any], timer: BatchStepTimer
) -> dict[str, Any]:
    from streaming import ingest

    setup_started = time.perf_counter()
    ingest.ensure_ingest_tables(spark, cfg)
    setup_seconds = time.perf_counter() - setup_started
    timer.reset()
    log.info("ingest (availableNow) into %s", cfg.storage.root)
    load_before = common.load1()
    started = time.perf_counter()
    query = ingest.run(spark, cfg, available_now=True)
    query.awaitTermination()
    seconds = time.perf_counter() - started
    ingest.wait_for_profile_fold(cfg.ingest.query_name, cfg.ingest.stop_timeout_seconds)
    if query.exception() is not None:
        raise RuntimeError(f"ingest query failed: {query.exception()}")
    batches = _batches_of(query)
    accounting = _accounting(spark, cfg, produced)
    read = accounting["ingest_log"]["records_read"]
    result = {
        "records_read": read,
        "batches": accounting["ingest_log"]["batches"],
        "seconds": round(seconds, 3),
        "table_setup_seconds": round(setup_seconds, 3),
        "events_per_s": round(_per_s(read, seconds), 1),
        "accounting": accounting,
        "batch_durations_ms": [b["duration_ms"].get("triggerExecution") for b in batches],
        "step_timings": timer.summary(),
        "batch_steps": [_rounded_batch(b) for b in timer.batches],
        "load_1min": [load_before, common.load1()],
    }
    log.info(
        "ingest: %d records in %d batches, %.1f s -> %.0f events/s; ingest_log %s",
        read,
        result["batches"],
        seconds,
        result["events_per_s"],
        accounting["ingest_log"],
    )
    for line in _log_step_summary("ingest steps", result["step_timings"]):
        log.info("%s", line)
    return result


def _rounded_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_id": batch["batch_id"],
        "total_s": round(batch["total"], 3),
        "steps_s": {k: round(v, 3) for k, v in batch["steps"].items()},
        "parts_s": {k: round(v, 3) for k, v in batch.get("parts", {}).items()},
    }


def _freshness(spark: Any, cfg: CarouselConfig) -> dict[str, Any]:
    """completed_at of the event's batch minus its Kafka timestamp, over every stored event."""
    from pyspark.sql import functions as F

    events = (
        spark.read.format("delta").load(cfg.storage.table(EVENTS_TABLE)).select("ingest_batch", "received_at")
    )
    batches = (
        spark.read.format("delta")
        .load(cfg.storage.table(INGEST_LOG_TABLE))
        .select("ingest_batch", "completed_at")
    )
    fresh = events.join(batches, "ingest_batch").select(
        "received_at",
        ((F.unix_micros("completed_at") - F.unix_micros("received_at")) / 1e6).alias("s"),
    )
    row = fresh.agg(
        F.count(F.lit(1)).alias("events"),
        F.expr("percentile(s, array(0.5, 0.9, 0.99))").alias("p"),
        F.min("s").alias("min"),
        F.avg("s").alias("mean"),
        F.max("s").alias("max"),
        F.min("received_at").alias("first"),
    ).first()
    if not row["events"]:
        return {"events": 0}
    first = row["first"]
    bucket_s = 10
    buckets = (
        fresh.groupBy(
            F.floor((F.unix_micros("received_at") - F.unix_micros(F.lit(first))) / (bucket_s * 1e6)).alias(
                "b"
            )
        )
        .agg(
            F.count(F.lit(1)).alias("events"),
            F.percentile_approx("s", 0.5, 10000).alias("p50"),
            F.max("s").alias("max"),
        )
        .orderBy("b")
        .collect()
    )
    p50, p90, p99 = (float(x) for x in row["p"])
    return {
        "events": int(row["events"]),
        "p50_s": round(p50, 3),
        "p90_s": round(p90, 3),
        "p99_s": round(p99, 3),
        "min_s": round(float(row["min"]), 3),
        "mean_s": round(float(row["mean"]), 3),
        "max_s": round(float(row["max"]), 3),
        "by_produce_time": [
            {
                "from_s": int(b["b"]) * bucket_s,
                "events": int(b["events"]),
                "p50_s": round(float(b["p50"]), 3),
                "max_s": round(float(b["max"]), 3),
            }
            for b in buckets
        ],
    }


def run_steady(
    spark: Any,
    cfg: CarouselConfig,
    world: Any,
    args: argparse.Namespace,
    timer: BatchStepTimer,
) -> dict[str, Any]:
    from streaming import ingest

    n_records = int(round(args.rate * args.duration))
    ingest.ensure_ingest_tables(spark, cfg)
    timer.reset()
    load_before = common.load1()
    query = ingest.run(spark, cfg, available_now=False)
    result: dict[str, Any] = {
        "target_rate": args.rate,
        "duration_s": args.duration,
        "trigger_interval": cfg.ingest.trigger_interval,
    }
    producer_out: dict[str, Any] = {}

    def producer() -> None:
        try:
            producer_out.update(
                produce_topic(
                    cfg,
                    world,
                    n_records,
                    args.rate,
                    args.seed + 1,
                    progress_every=max(1000, int(args.rate * 10)),
                )
            )
        except Exception as err:
            log.exception("steady producer failed")
            producer_out["error"] = err

    try:
        common.wait_started(query, 120.0, log, "; producing anyway")
        log.info(
            "steady: producing %d records at %.0f/s for %.0f s while ingest runs (trigger %s)",
            n_records,
            args.rate,
            args.duration,
            cfg.ingest.trigger_interval,
        )
        thread = threading.Thread(target=producer, name="bench-producer", daemon=True)
        produce_started = time.monotonic()
        thread.start()
        produce_deadline = produce_started + 3 * args.duration + 120
        produced_at: float | None = None
        caught_up = False
        last_report = produce_started
        while True:
            if query.exception() is not None or not query.isActive:
                raise RuntimeError(f"steady ingest stopped: {query.exception()}")
            now = time.monotonic()
            read = sum(b["rows"] for b in _batches_of(query))
            if thread.is_alive():
                if now > produce_deadline:
                    raise RuntimeError("steady producer did not finish in time")
            else:
                if "error" in producer_out:
                    raise RuntimeError(f"steady producer failed: {producer_out['error']}")
                if produced_at is None:
                    produced_at = now
                    log.info("steady: producer done (%s); waiting for ingest to catch up", producer_out)
                if read >= producer_out["records"]:
                    caught_up = True
                    break
                if now - produced_at > args.drain_timeout:
                    log.warning(
                        "steady: ingest read %d of %d records within %.0f s after the producer ended",
                        read,
                        producer_out["records"],
                        args.drain_timeout,
                    )
                    break
            if now - last_report >= 10:
                log.info("steady: %.0f s in, ingest has read %d records", now - produce_started, read)
                last_report = now
            time.sleep(0.5)
        result["drain_s"] = round(time.monotonic() - produced_at, 3) if produced_at else None
        result["caught_up"] = caught_up
    finally:
        stop_between_batches(query, cfg.ingest.stop_timeout_seconds)
        # ingest.profile_writes: append - the fold beside the batches ends with the job, as in main.
        ingest.wait_for_profile_fold(cfg.ingest.query_name, cfg.ingest.stop_timeout_seconds)
    folds = ingest.profile_folds_of(cfg.ingest.query_name)
    if folds is not None:
        result["profile_folds"] = [{"users": users, "seconds": round(s, 3)} for users, s in folds.folded]
    batches = _batches_of(query)
    totals = _ingest_log_totals(spark, cfg)
    durations = sorted(b["duration_ms"].get("triggerExecution", 0) / 1000 for b in batches)
    steps = timer.batches
    quarter = max(1, len(steps) // 4)
    result.update(
        {
            "produce": producer_out,
            "achieved_rate": producer_out.get("events_per_s"),
            "ingest_log": totals,
            "read_equals_produced": totals["records_read"] == producer_out.get("records"),
            "batches": totals["batches"],
            "mean_batch_records": round(totals["records_read"] / totals["batches"], 1)
            if totals["batches"]
            else 0,
            "batch_seconds": {
                "mean": round(sum(durations) / len(durations), 3) if durations else None,
                "p50": round(durations[len(durations) // 2], 3) if durations else None,
                "max": round(durations[-1], 3) if durations else None,
            },
            "step_timings": timer.summary(),
            "step_timings_first_quarter": timer.summary(steps[:quarter]),
            "step_timings_last_quarter": timer.summary(steps[-quarter:]),
            "load_1min": [load_before, common.load1()],
            "freshness": _freshness(spark, cfg),
            "batch_steps": [_rounded_batch(b) for b in steps],
        }
    )
    fresh = result["freshness"]
    log.info(
        "steady: achieved %.0f/s, %d batches; freshness p50 %.2f s, p99 %.2f s, max %.2f s",
        result["achieved_rate"] or 0,
        result["batches"],
        fresh.get("p50_s", float("nan")),
        fresh.get("p99_s", float("nan")),
        fresh.get("max_s", float("nan")),
    )
    for line in _log_step_summary("steady steps", result["step_timings"]):
        log.info("%s", line)
    for bucket in fresh.get("by_produce_time", []):
        log.info(
            "steady freshness, events produced %3d-%3d s: %6d events, p50 %.2f s, max %.2f s",
            bucket["from_s"],
            bucket["from_s"] + 10,
            bucket["events"],
            bucket["p50_s"],
            bucket["max_s"],
        )
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summary_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    produce = results.get("produce")
    if produce:
        rows.append(
            (
                "produce (incl. generating)",
                f"{produce['records']:,} records in {produce['seconds']:.1f} s = "
                f"{produce['events_per_s']:,.0f}/s  (valid {produce['labels']['valid']:,}, "
                f"duplicate {produce['labels']['duplicate']:,}, bad {produce['labels']['bad']:,})",
            )
        )
    ceiling = results.get("ceiling")
    if ceiling:
        for run in ceiling["runs"]:
            rows.append(
                (
                    f"ceiling {run['label']}",
                    f"{run['records_read']:,} records, {run['batches']} batches, {run['seconds']:.1f} s = "
                    f"{run['events_per_s']:,.0f} events/s",
                )
            )
        rows.append(("ceiling (best)", f"{ceiling['events_per_s']:,.0f} events/s"))
    ingest = results.get("ingest")
    if ingest:
        rows.append(
            (
                "ingest",
                f"{ingest['records_read']:,} records, {ingest['batches']} batches, "
                f"{ingest['seconds']:.1f} s = {ingest['events_per_s']:,.0f} events/s",
            )
        )
        if ingest.get("ratio_to_ceiling") is not None:
            rows.append(
                (
                    "ingest / ceiling",
                    f"{ingest['ratio_to_ceiling']:.3f}  (the plain append is "
                    f"{1 / ingest['ratio_to_ceiling']:.1f}x faster)",
                )
            )
        log_totals = ingest["accounting"]["ingest_log"]
        rows.append(
            (
                "ingest_log",
                f"read {log_totals['records_read']:,} = stored {log_totals['events_stored']:,} + quarantined "
                f"{log_totals['quarantined']:,} + duplicates {log_totals['duplicates']:,}; "
                f"profiles upserted {log_totals['profiles_upserted']:,}",
            )
        )
        failed = [name for name, ok in ingest["accounting"]["checks"].items() if not ok]
        rows.append(("accounted for", "all checks hold" if not failed else "MISMATCH: " + ", ".join(failed)))
        steps = ingest["step_timings"]["steps"]
        top = sorted(steps.items(), key=lambda kv: -kv[1]["seconds"])[:3]
        rows.append(
            (
                "ingest: top steps",
                ", ".join(f"{name} {100 * f['share']:.0f}% ({f['mean_s']:.1f} s/batch)" for name, f in top),
            )
        )
    steady = results.get("steady")
    if steady:
        fresh = steady["freshness"]
        rows.append(
            (
                "steady rate",
                f"target {steady['target_rate']:,.0f}/s, achieved {steady['achieved_rate'] or 0:,.0f}/s for "
                f"{steady['duration_s']:.0f} s ({steady['produce'].get('records', 0):,} records), "
                f"trigger {steady['trigger_interval']}",
            )
        )
        fraction = steady.get("fraction_of_ingest_max")
        if fraction is not None:
            note = (
                "  (ABOVE the ingest's throughput: freshness measures a growing backlog; lower --rate)"
                if fraction > 1
                else ""
            )
            rows.append(("steady / ingest max", f"{fraction:.3f} of the ingest's throughput{note}"))
        rows.append(
            (
                "steady batches",
                f"{steady['batches']} batches, {steady['mean_batch_records']:,.0f} records/batch, batch time "
                f"mean {steady['batch_seconds']['mean']} s, max {steady['batch_seconds']['max']} s; "
                f"caught up {steady['drain_s']} s after the producer ended"
                + ("" if steady["caught_up"] else " (NOT CAUGHT UP)"),
            )
        )
        if fresh.get("events"):
            rows.append(
                (
                    "freshness",
                    f"p50 {fresh['p50_s']:.2f} s, p90 {fresh['p90_s']:.2f} s, p99 {fresh['p99_s']:.2f} s, "
                    f"max {fresh['max_s']:.2f} s over {fresh['events']:,} stored events",
                )
            )
        first, last = steady["step_timings_first_quarter"], steady["step_timings_last_quarter"]
        merge_first = first.get("parts_of_commits", {}).get("profiles MERGE", {}).get("mean_s")
        merge_last = last.get("parts_of_commits", {}).get("profiles MERGE", {}).get("mean_s")
        rows.append(
            (
                "steady: batch growth",
                f"process_batch mean {first['batch_seconds'] / max(1, first['batches']):.2f} s "
                f"(first quarter) -> {last['batch_seconds'] / max(1, last['batches']):.2f} s (last quarter); "
                f"profiles MERGE {merge_first} -> {merge_last} s",
            )
        )
    loads = []
    for name, phase in (
        ("produce", results.get("produce")),
        *((f"ceiling {r['label']}", r) for r in (ceiling or {}).get("runs", [])),
        ("ingest", ingest),
        ("steady", steady),
    ):
        if phase and phase.get("load_1min"):
            before, after = phase["load_1min"]
            loads.append(f"{name} {before}->{after}")
    if loads:
        nproc = results.get("machine", {}).get("nproc")
        rows.append((f"load avg (1 min, {nproc} cpus)", ", ".join(loads)))
    return rows


def print_summary(results: dict[str, Any]) -> None:
    rows = summary_rows(results)
    width = max(len(name) for name, _ in rows) if rows else 10
    machine = results["machine"]
    print()
    print("=" * 100)
    print(
        f"carousel ingest benchmark  {results['started_at']}  {machine.get('nproc')} cpus, "
        f"{machine.get('memory_gib')} GiB, Spark {machine.get('spark')} ({machine.get('spark_master')}), "
        f"Python {machine.get('python')}"
    )
    session = results.get("session") or {}
    if session:
        print(
            "session: "
            + ", ".join(f"{key}={value}" for key, value in session.items() if key != "config_spark_conf")
        )
    print("-" * 100)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print("=" * 100)
    print(f"command: {results['command']}")
    print(f"results: {results.get('output')}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _force_utc() -> str | None:
    """ingest writes naive UTC datetimes (completed_at), which PySpark reads in the local zone."""
    if time.strftime("%z") == "+0000" and not time.daylight:
        return None
    previous = os.environ.get("TZ") or time.tzname[0]
    os.environ["TZ"] = "UTC"
    time.tzset()
    log.warning(
        "local time zone %s is not UTC: running with TZ=UTC, since ingest_log.completed_at is a naive UTC "
        "datetime that PySpark would otherwise shift by the local offset",
        previous,
    )
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = _defaults(build_parser().parse_args(argv))
    previous_tz = _force_utc()
    extra_conf = _spark_conf(args.spark_conf)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    workdir, temp = common.make_workdir(args.workdir, "carousel-bench-")
    run_dir = workdir / f"run-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    results = common.start_results(
        "ingest",
        argv,
        {
            "quick": args.quick,
            "events": args.events,
            "rate": args.rate,
            "duration_s": args.duration,
            "max_offsets_per_trigger": args.max_offsets_per_trigger,
            "trigger_interval": args.trigger_interval,
            "partitions": args.partitions,
            "users": args.users,
            "items": args.items,
            "seed": args.seed,
            "shuffle_partitions": args.shuffle_partitions,
            "driver_memory": args.driver_memory,
            "broker_heap": args.broker_heap,
            "spark_conf": extra_conf,
            "config_overrides": list(args.overrides),
            "forced_tz_utc_from": previous_tz,
            "workdir": str(run_dir),
        },
    )
    log.info("ingest benchmark %s in %s: %s", run_id, run_dir, results["settings"])

    ports = common.broker_overrides(run_dir / "kafka")
    broker_cfg = bench_config(args, ports)
    # How the batch's commits ran (the step and part timings read differently): the config's own.
    results["settings"]["parallel_commits"] = broker_cfg.ingest.parallel_commits
    results["settings"]["profile_writes"] = broker_cfg.ingest.profile_writes
    results["settings"]["profile_fold_seconds"] = broker_cfg.ingest.profile_fold_seconds
    spark = None
    try:
        bootstrap = broker.start(broker_cfg.broker)
        broker_info = {"bootstrap": bootstrap, "heap": broker_cfg.broker.heap}

        def phase_config(name: str, topic: str) -> CarouselConfig:
            return bench_config(
                args,
                [
                    *ports,
                    f"kafka.bootstrap_servers={bootstrap}",
                    f"kafka.topics.events.name={topic}",
                    f"kafka.topics.events.partitions={args.partitions}",
                    f"storage.root={run_dir / name}",
                ],
            )

        throughput_topic = f"bench-throughput-{run_id}"
        produce_cfg = phase_config("produce", throughput_topic)
        broker.ensure_topics(produce_cfg.kafka, ["events"])

        from jobs.simulate_events import build_world

        started = time.perf_counter()
        world = build_world(produce_cfg.simulator)
        log.info(
            "world: %d users, %d items built in %.1f s",
            len(world.users),
            len(world.items),
            time.perf_counter() - started,
        )
        log.info(
            "producing %d records to %s (%d partitions) at full speed",
            args.events,
            throughput_topic,
            args.partitions,
        )
        results["produce"] = produce_topic(
            produce_cfg, world, args.events, 0.0, args.seed, progress_every=max(10_000, args.events // 10)
        )
        log.info("produce: %s", results["produce"])

        from carousel.session import build_session

        conf = {
            "spark.sql.shuffle.partitions": str(args.shuffle_partitions),
            "spark.ui.enabled": "false",
            "spark.sql.warehouse.dir": str(run_dir / "warehouse"),
            # Keep every progress update: batches and rows are read from query.recentProgress.
            "spark.sql.streaming.numRecentProgressUpdates": "100000",
            **extra_conf,
        }
        spark = build_session(produce_cfg, "carousel-bench-ingest", master="local[2]", extra_conf=conf)
        results["machine"] = {**common.machine_info(spark), "broker": broker_info}
        results["session"] = {
            "config_spark_conf": dict(produce_cfg.spark.conf),
            **{key: spark.conf.get(key, None) for key in SESSION_KEYS},
        }
        log.info("session settings: %s", results["session"])

        timer = BatchStepTimer()
        with timer.installed():
            ceiling_runs = [run_ceiling(spark, phase_config("ceiling-1", throughput_topic), "1")]
            ceiling_runs[0]["label"] = "before ingest"
            results["ceiling"] = {"runs": ceiling_runs, "events_per_s": ceiling_runs[0]["events_per_s"]}

            ingest_result = run_ingest_throughput(
                spark, phase_config("ingest", throughput_topic), results["produce"], timer
            )
            results["ingest"] = ingest_result

            second = run_ceiling(spark, phase_config("ceiling-2", throughput_topic), "2")
            second["label"] = "after ingest"
            ceiling_runs.append(second)
            best = max(run["events_per_s"] for run in ceiling_runs)
            results["ceiling"]["events_per_s"] = best
            ingest_result["ratio_to_ceiling"] = (
                round(ingest_result["events_per_s"] / best, 4) if best else None
            )
            log.info(
                "throughput: ingest %.0f events/s, ceiling %.0f events/s, ratio %.3f",
                ingest_result["events_per_s"],
                best,
                ingest_result["ratio_to_ceiling"] or float("nan"),
            )

            if not args.skip_steady:
                steady_topic = f"bench-steady-{run_id}"
                steady_cfg = phase_config("steady", steady_topic)
                broker.ensure_topics(steady_cfg.kafka, ["events"])
                steady = run_steady(spark, steady_cfg, world, args, timer)
                achieved = steady.get("achieved_rate")
                max_eps = ingest_result["events_per_s"]
                steady["fraction_of_ingest_max"] = (
                    round(achieved / max_eps, 4) if achieved and max_eps else None
                )
                results["steady"] = steady
    except BaseException as err:
        results["error"] = repr(err)
        raise
    finally:
        # ingest has no loadavg_at_end: its phases record their own load averages.
        common.finish_run(results, spark, broker_cfg.broker, args.output, record_load=False)
        if temp and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log.info("broker data and tables kept in %s", run_dir)
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
