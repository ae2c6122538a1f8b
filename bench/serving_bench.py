"""Serving benchmark: trigger -> payload latency of the online-store hot path, against ceilings.

    .venv/bin/python -m bench.serving_bench                      # 1M users, 100k items; 200/1000/5000 per s
    .venv/bin/python -m bench.serving_bench --quick              # smoke: small shop, one short rate
    .venv/bin/python -m bench.serving_bench --sweep              # also: serve at other latency settings
    .venv/bin/python -m bench.serving_bench --trigger-interval "1 second" --fetch-wait-ms 500 \\
        --events-partitions 4 --skip-recovery                    # the whole run at other settings

Everything runs on this machine: a private Kafka broker and a private ``redis-server`` (temp
state folders, free ports), one ``local[2]`` Spark session, and the scaled shop of
:mod:`bench.shop_data` (built, or reused from ``--shop-root``), linked read-only into the run's
own storage root. Phases, each on fresh topics (output topics with ``LogAppendTime``):

1. **online store**: ``jobs.rebuild_online_store.run`` loads the shop's Delta profiles into the
   empty store, timed; then the store's ``used_memory``; then the per-batch store round trips
   (pipelined vs per user, cached vs new connection) and the hot path's Python cost per trigger
   in this process (:mod:`bench.serving_store`).
2. **serve**: ``streaming.serve.run(spark, cfg)`` in this process. A producer sends ``App
   Launched`` triggers for random shop users, each after 4 item events of the same user
   (:class:`bench.serving_traffic.MixedProducer`: 5 records per trigger), first ``--warmup`` s at
   the lowest rate, then each ``--rates`` value for ``--duration`` s. A consumer reads the push
   topic: latency = the payload's broker append time - the trigger's send time. After each rate
   the bench waits for that rate's last payload (at most ``--drain-timeout``); a rate that does
   not drain ends the phase. Per rate, from the query's progress: micro-batches, their
   ``durationMs`` and the observed metrics ``serve`` (payloads, skipped triggers, ...).
3. **outbox**: with serve still running, ``streaming.record_sends.run`` (continuous,
   ``sent_log.trigger_interval``) in the same session, from the outbox's end; ``--outbox-rate``
   for ``--outbox-duration`` s; lag = when each payload's rows became visible in Delta (its
   commit file) - its ``sent_at`` (:mod:`bench.serving_outbox`). Serve's latency meanwhile is
   reported too (both queries share the 2 cores).
4. **sweep** (``--sweep``): serve again at ``--sweep-rate`` for ``--sweep-duration`` s per
   setting: the run's settings, trigger interval 100 ms and 1 s, ``kafka.fetch.max.wait.ms`` 500
   (Kafka's default), and the other partition count (2 <-> 4).
5. **recovery**: ``./spark-submit.sh serve`` as a subprocess under steady traffic, SIGKILLed and
   restarted: time to the first payload and until p99 is back under 1 s (or near its steady level
   before the kill, when that was above 1 s) (:mod:`bench.serving_recovery`).
6. **ceiling**: a micro-batch pass-through (read the mixed topic, write every record unchanged)
   with serve's Kafka source options (``maxOffsetsPerTrigger``, ``kafka.fetch.max.wait.ms``) and
   trigger, measured the same way: the floor of a micro-batch Kafka -> Kafka query here.
7. **ceiling steps** (at the lowest rate): the pass-through plus ingest's validation, and plus
   serve's whole plan with a trivial answer (no store, lookups, ranking or rendering): where the
   gap between serve and the ceiling comes from.
8. **real-time ceiling**: the same pass-through with Spark 4.1's real-time mode
   (``Trigger.RealTime``; PySpark 4.1.3 has no ``realTime=`` keyword yet, so the JVM trigger is
   set through py4j). Serve's own plan is refused by real-time mode (``MapInArrowExec`` is not in
   its operator allowlist); see bench/README.md.

Figures are printed and written to ``--output`` (default ``bench/results/serving.json``); nothing
is asserted. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException

from bench import common, serving_store
from bench.serving_outbox import lag_figures
from bench.serving_recovery import RecoveryRun, run_recovery
from bench.serving_traffic import (
    PASS_THROUGH_TRIGGER_ID,
    PAYLOAD_TRIGGER_ID,
    MixedProducer,
    PayloadConsumer,
    create_topic,
    latency_figures,
    percentile,
)
from bench.shop_data import apply_quick, ensure_shop, link_shop, sizes_from_args
from carousel import broker, online_store_server
from carousel.cli import setup_logging
from carousel.config import CarouselConfig
from carousel.schemas import PUSH, SENT_RECOMMENDATIONS_TABLE
from streaming.serve import TrendingRefresher, with_progress_tracking

log = logging.getLogger("bench.serving")

DEFAULT_OUTPUT = "bench/results/serving.json"
QUICK = {
    "users": 20_000,
    "items": 5_000,
    "events": 50_000,
    "rates": "200",
    "duration": 15.0,
    "warmup": 10.0,
    "outbox_duration": 10.0,
    "recovery_steady": 8.0,
    "sweep_duration": 10.0,
    "recovery_rate": 200.0,
    "recovery_timeout": 180.0,
}
LATENCY_GOAL_S = 1.0
SECOND_GOAL_S = 2.0
CEILING_FACTOR_GOAL = 1.5
GOAL_RATE = 1000.0
REALTIME_CHECKPOINT_INTERVAL = "30 seconds"


# ---------------------------------------------------------------------------------------------
# Arguments and configuration
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = common.bench_parser(
        "serving", "Trigger -> payload latency of serve at steady rates, vs pass-through ceilings."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small shop, 200/s for 15 s")
    parser.add_argument(
        "--rates", default="200,1000,2000,5000", help="steady rates, triggers/s (200,1000,2000,5000)"
    )
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of producing per rate (45)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds at the lowest rate first (20)")
    parser.add_argument(
        "--drain-timeout", type=float, default=90.0, help="seconds to wait for a rate's last payloads (90)"
    )
    settings = parser.add_argument_group("latency settings (serve and the micro-batch ceiling)")
    settings.add_argument("--trigger-interval", help="serving.trigger_interval (default: the config's)")
    settings.add_argument(
        "--fetch-wait-ms", type=int, help="serving.kafka_fetch_max_wait_ms (default: the config's)"
    )
    settings.add_argument(
        "--events-partitions",
        "--partitions",
        dest="partitions",
        type=int,
        default=2,
        help="partitions of the events topics (2 = the session's cores)",
    )
    settings.add_argument("--sweep", action="store_true", help="also serve at the other latency settings")
    settings.add_argument("--sweep-rate", type=float, default=1000.0, help="triggers/s of the sweep (1000)")
    settings.add_argument("--sweep-duration", type=float, default=30.0, help="seconds per setting (30)")
    phases = parser.add_argument_group("phases")
    phases.add_argument(
        "--outbox-rate", type=float, default=200.0, help="triggers/s of the outbox phase (200)"
    )
    phases.add_argument("--outbox-duration", type=float, default=30.0, help="seconds of the outbox phase")
    phases.add_argument("--recovery-rate", type=float, default=1000.0, help="triggers/s while killing serve")
    phases.add_argument(
        "--recovery-steady", type=float, default=15.0, help="steady seconds before the kill and after (15)"
    )
    phases.add_argument(
        "--recovery-timeout", type=float, default=300.0, help="most seconds to wait for a (re)start (300)"
    )
    for name in ("store-micro", "outbox", "recovery", "ceiling", "ceiling-steps", "realtime"):
        phases.add_argument(f"--skip-{name}", action="store_true", help=f"leave out the {name} phase")
    parser.add_argument("--driver-memory", default="4g", help="Spark driver memory (4g)")
    parser.add_argument("--store-max-memory", default="4gb", help="the bench Redis's maxmemory (4gb)")
    return common.add_run_args(
        parser, DEFAULT_OUTPUT, "keep broker data, tables and checkpoints here (default: temp)"
    )


def _head(args: argparse.Namespace) -> list[str]:
    """The bench's own defaults, before the user's --config / --set."""
    head = [
        "spark.master=local[2]",
        "spark.shuffle_partitions=4",
        f"spark.driver_memory={args.driver_memory}",
    ]
    if args.trigger_interval:
        head.append(f"serving.trigger_interval={args.trigger_interval}")
    if args.fetch_wait_ms is not None:
        head.append(f"serving.kafka_fetch_max_wait_ms={args.fetch_wait_ms}")
    return head


def _config(args: argparse.Namespace, required: Sequence[str]) -> CarouselConfig:
    return common.bench_config(args, _head(args), required, log)


# ---------------------------------------------------------------------------------------------
# Measuring one query at steady rates
# ---------------------------------------------------------------------------------------------
def _drain(
    query: Any, producer: MixedProducer, consumer: PayloadConsumer, prefix: str, timeout: float
) -> float:
    """Wait until every trigger of ``prefix`` has its output; returns the seconds waited (or -1)."""
    wanted = [key for key in dict(producer.sent) if key.startswith(prefix)]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if query.exception() is not None or not query.isActive:
            raise RuntimeError(f"{query.name} stopped: {query.exception()}")
        received = consumer.received
        wanted = [key for key in wanted if key not in received]
        if not wanted:
            return round(time.monotonic() - started, 3)
        time.sleep(0.2)
    return -1.0


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def progress_batches(query: Any, since: float = 0.0, until: float = float("inf")) -> list[dict[str, Any]]:
    """The query's micro-batches with input that started between ``since`` and ``until`` (epoch s)."""
    batches = []
    for p in query.recentProgress:
        rows = int(p.numInputRows or 0)
        started = _epoch(p.timestamp)
        if not rows or not since <= started < until:
            continue
        metrics = (p.observedMetrics or {}).get("serve")
        batches.append(
            {
                "batch_id": p.batchId,
                "started": started,
                "rows": rows,
                "duration_ms": dict(p.durationMs),
                "metrics": metrics.asDict() if metrics is not None else None,
            }
        )
    return batches


def batch_summary(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-batch time (``durationMs``) percentiles, mean of each part, rows and summed metrics."""
    if not batches:
        return {"batches": 0}
    total = sorted(b["duration_ms"].get("triggerExecution", 0) / 1000 for b in batches)
    parts: dict[str, float] = {}
    for b in batches:
        for name, ms in b["duration_ms"].items():
            parts[name] = parts.get(name, 0.0) + ms
    counts: dict[str, int] = {}
    for b in batches:
        for name, n in (b["metrics"] or {}).items():
            counts[name] = counts.get(name, 0) + int(n or 0)
    return {
        "batches": len(batches),
        "rows_per_batch_mean": round(sum(b["rows"] for b in batches) / len(batches), 1),
        "batch_s_p50": percentile(total, 0.5),
        "batch_s_p95": percentile(total, 0.95),
        "batch_s_max": round(total[-1], 3),
        "mean_ms": {name: round(ms / len(batches), 1) for name, ms in sorted(parts.items())},
        "metrics": {name: n for name, n in counts.items() if n},
    }


def measure_rate(
    name: str,
    query: Any,
    producer: MixedProducer,
    consumer: PayloadConsumer,
    phase: str,
    rate: float,
    duration: float,
    drain_timeout: float,
) -> dict[str, Any]:
    """Produce ``rate`` for ``duration`` s (trigger ids of ``phase``), drain, and the figures of that rate."""
    load_before = common.load1()
    since = time.time()
    log.info("%s: %.0f triggers/s for %.0f s", name, rate, duration)
    produced = producer.run(phase, rate, duration)
    drained = _drain(query, producer, consumer, producer.prefix(phase), drain_timeout)
    figures = latency_figures(producer.sent, consumer.received, producer.prefix(phase))
    entry: dict[str, Any] = {
        "target_rate": rate,
        "produce": produced,
        "drained_after_s": drained if drained >= 0 else None,
        "latency": figures,
        "p99_under_1s": drained >= 0 and figures["p99_s"] is not None and figures["p99_s"] < LATENCY_GOAL_S,
        "p99_under_2s": drained >= 0 and figures["p99_s"] is not None and figures["p99_s"] < SECOND_GOAL_S,
        "load_1min": [load_before, common.load1()],
        "micro_batches": batch_summary(progress_batches(query, since, time.time())),
    }
    log.info(
        "%s at %.0f/s: p50 %s s, p95 %s s, p99 %s s, delivered %d/%d, drained after %s s, batches %s",
        name,
        rate,
        figures["p50_s"],
        figures["p95_s"],
        figures["p99_s"],
        figures["delivered"],
        figures["triggers"],
        entry["drained_after_s"],
        {k: v for k, v in entry["micro_batches"].items() if k in ("batches", "batch_s_p50", "batch_s_p95")},
    )
    return entry


def measure(
    name: str,
    query: Any,
    producer: MixedProducer,
    consumer: PayloadConsumer,
    args: argparse.Namespace,
    rates: list[float],
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Warm-up, then each rate in turn: produce, drain, figures."""
    common.wait_started(query, 300.0, log)
    result: dict[str, Any] = {"rates": []}
    if warmup > 0:
        log.info("%s: warm-up at %.0f/s for %.0f s", name, rates[0], warmup)
        producer.run("warm", rates[0], warmup)
        drained = _drain(query, producer, consumer, producer.prefix("warm"), args.drain_timeout * 2)
        result["warmup"] = {"rate": rates[0], "seconds": warmup, "drained_after_s": drained}
        result["warmup"]["latency"] = latency_figures(
            producer.sent, consumer.received, producer.prefix("warm")
        )
    for rate in rates:
        entry = measure_rate(
            name, query, producer, consumer, f"r{int(rate)}", rate, duration, args.drain_timeout
        )
        result["rates"].append(entry)
        if entry["drained_after_s"] is None:
            log.warning(
                "%s: the %.0f/s backlog did not drain in %.0f s: higher rates skipped",
                name,
                rate,
                args.drain_timeout,
            )
            result["stopped_at_rate"] = rate
            break
    for goal, key in ((LATENCY_GOAL_S, "p99_under_1s"), (SECOND_GOAL_S, "p99_under_2s")):
        met = [r["target_rate"] for r in result["rates"] if r[key]]
        result[f"highest_rate_p99_under_{goal:.0f}s"] = max(met) if met else None
    result["producer_errors"] = len(producer.errors)
    return result


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateRun:
    """What every measured query gets: the flags, the steady rates, the broker and the shop's sizes."""

    args: argparse.Namespace
    rates: list[float]
    bootstrap: str
    shop_users: int
    shop_items: int


def _serve_topics(cfg: CarouselConfig, run: RateRun) -> tuple[PayloadConsumer, MixedProducer]:
    """Fresh events and push topics (and the others serve writes); the push consumer, the producer."""
    push_topic = cfg.kafka.topic(PUSH).name
    events = cfg.kafka.topic("events")
    create_topic(run.bootstrap, events.name, events.partitions)
    create_topic(run.bootstrap, push_topic, cfg.kafka.topic(PUSH).partitions, log_append_time=True)
    broker.ensure_topics(cfg.kafka)
    consumer = PayloadConsumer(run.bootstrap, push_topic, PAYLOAD_TRIGGER_ID)
    producer = MixedProducer(run.bootstrap, events.name, run.shop_users, run.shop_items, run.args.seed)
    return consumer, producer


def run_serve(spark: Any, cfg: CarouselConfig, outbox_cfg: CarouselConfig, run: RateRun) -> dict[str, Any]:
    """The serve phase (the rates), then the outbox phase with serve still running."""
    from streaming import serve

    args = run.args
    consumer, producer = _serve_topics(cfg, run)
    store_before = serving_store.server_figures(cfg)
    started = time.perf_counter()
    query = serve.run(spark, cfg)
    startup = time.perf_counter() - started
    try:
        result = measure("serve", query, producer, consumer, args, run.rates, args.warmup, args.duration)
        store_after = serving_store.server_figures(cfg)
        result["store_during_serve"] = {
            "connections_opened": store_after["total_connections_received"]
            - store_before["total_connections_received"],
            "commands": store_after["total_commands_processed"] - store_before["total_commands_processed"],
            "triggers": len(producer.sent),
            "used_memory_after": store_after["used_memory"],
            "keys_after": store_after["keys"],
        }
        if not args.skip_outbox:
            result["outbox"] = run_outbox(spark, outbox_cfg, query, producer, consumer, run)
    finally:
        query.stop()
        consumer.close()
    result["startup_s"] = round(startup, 3)
    result["settings"] = _settings(cfg)
    result["campaigns"] = sorted(serve.trigger_campaigns(cfg))
    result["duplicate_payloads"] = consumer.duplicates
    result["batches"] = [
        {k: b[k] for k in ("batch_id", "rows", "duration_ms", "metrics")} for b in progress_batches(query)
    ]
    return result


def _settings(cfg: CarouselConfig) -> dict[str, Any]:
    return {
        "trigger_interval": cfg.serving.trigger_interval,
        "kafka_fetch_max_wait_ms": cfg.serving.kafka_fetch_max_wait_ms,
        "events_partitions": cfg.kafka.topic("events").partitions,
        "max_offsets_per_trigger": cfg.serving.max_offsets_per_trigger,
        "async_progress_interval_ms": cfg.serving.async_progress_interval_ms,
    }


def run_outbox(
    spark: Any,
    cfg: CarouselConfig,
    serve_query: Any,
    producer: MixedProducer,
    consumer: PayloadConsumer,
    run: RateRun,
) -> dict[str, Any]:
    """record-sends running continuously beside serve: outbox -> Delta lag of the ``ob`` triggers."""
    from streaming import record_sends

    args = run.args
    query = record_sends.run(spark, cfg)
    try:
        common.wait_started(query, 120.0, log)
        deadline = time.monotonic() + 120
        while query.lastProgress is None and time.monotonic() < deadline:
            time.sleep(0.5)  # its first batch fixes the starting offsets (latest)
        entry = measure_rate(
            "serve + record-sends",
            serve_query,
            producer,
            consumer,
            "ob",
            args.outbox_rate,
            args.outbox_duration,
            args.drain_timeout,
        )
        expected = entry["latency"]["delivered"]
        table = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            figures = lag_figures(table, producer.prefix("ob"), producer.sent, expected)
            if figures["payloads_recorded"] >= expected:
                break
            if query.exception() is not None:
                raise RuntimeError(f"record-sends failed: {query.exception()}")
            time.sleep(2)
        recorded = [
            {"batch_id": p.batchId, "rows": int(p.numInputRows or 0), "duration_ms": dict(p.durationMs)}
            for p in query.recentProgress
            if int(p.numInputRows or 0)
        ]
    finally:
        query.stop()  # every measured row is in Delta by now: nothing to wait for
    log.info("outbox -> Delta lag: %s", figures)
    return {
        "how": "record-sends continuous beside serve (same session), from the outbox's end",
        "trigger_interval": cfg.sent_log.trigger_interval,
        "serve_during": entry,
        "lag": figures,
        "record_sends_batches": recorded,
    }


SWEEP = (
    ("trigger interval 100 ms", ["serving.trigger_interval=100 milliseconds"]),
    ("trigger interval 1 s", ["serving.trigger_interval=1 second"]),
    ("kafka.fetch.max.wait.ms 500 (Kafka default)", ["serving.kafka_fetch_max_wait_ms=500"]),
    ("synchronous progress (Spark's default)", ["serving.async_progress_interval_ms=null"]),
)


def sweep_configs(args: argparse.Namespace, required: Any) -> list[tuple[str, CarouselConfig]]:
    """The sweep's settings: the run's own, each of :data:`SWEEP`, and the other partition count.

    Each has its own topics and query (checkpoint) under the serve phase's storage root;
    ``required(name, root, partitions, extra)`` gives a phase's overrides.
    """
    other = 4 if args.partitions != 4 else 2
    variants = [
        ("the run's settings", args.partitions, []),
        *[(label, args.partitions, extra) for label, extra in SWEEP],
        (f"{other} events partitions", other, []),
    ]
    return [
        (
            label,
            _config(
                args, required(f"sweep{n}", "serve", partitions, [*extra, f"serving.query_name=sweep{n}"])
            ),
        )
        for n, (label, partitions, extra) in enumerate(variants)
    ]


def run_sweep(spark: Any, configs: list[tuple[str, CarouselConfig]], run: RateRun) -> list[dict[str, Any]]:
    """serve at each (label, config) for ``--sweep-duration`` s at ``--sweep-rate``."""
    from streaming import serve

    args = run.args
    results = []
    for label, cfg in configs:
        consumer, producer = _serve_topics(cfg, run)
        query = serve.run(spark, cfg)
        try:
            measured = measure(
                f"sweep: {label}",
                query,
                producer,
                consumer,
                args,
                [args.sweep_rate],
                min(args.warmup, 10.0),
                args.sweep_duration,
            )
        finally:
            query.stop()
            consumer.close()
        results.append({"label": label, "settings": _settings(cfg), **measured})
    return results


def _trivial_answers(topic: str) -> Any:
    """A ``mapInArrow`` body in serve's output shape that answers each App Launched with its own id.

    What serve's plan costs without serve's work (no store, lookups, ranking or rendering).
    Defined inside a function so that cloudpickle ships it by value (the workers need not import
    the bench).
    """

    def answer(batches: Any) -> Any:
        import json

        import pyarrow as pa

        from carousel.realtime import OUTPUT_SCHEMA

        for batch in batches:
            rows = [r for r in batch.to_pylist() if r["event_type"] == "App Launched"]
            yield pa.RecordBatch.from_pydict(
                {
                    "kind": ["record"] * len(rows),
                    "topic": [topic] * len(rows),
                    "key": [r["user_id"] for r in rows],
                    "value": [json.dumps({"event_id": r["event_id"]}, separators=(",", ":")) for r in rows],
                    "payload_id": [r["event_id"] for r in rows],
                    "reason": [None] * len(rows),
                    "n": [None] * len(rows),
                },
                schema=OUTPUT_SCHEMA,
            )

    return answer


def _with_steps(raw: Any, cfg: CarouselConfig, steps: str, topic: str) -> Any:
    """The pass-through's records: ``raw`` (key, value); ``validated`` (serve's ``hot_path_records``,
    re-encoded as JSON); ``serve-plan`` (serve's own plan - validation, ``mapInArrow``, observed
    metrics, per-row topic and header - with :func:`_trivial_answers` instead of serve's answers)."""
    from pyspark.sql import functions as F

    from carousel.realtime import OUTPUT_DDL
    from streaming.serve import hot_path_records, kafka_rows, with_metrics

    if steps == "raw":
        return raw.selectExpr("key", "value")
    records = hot_path_records(raw, cfg)
    if steps == "validated":
        return records.select(
            F.col("user_id").alias("key"), F.to_json(F.struct(*records.columns)).alias("value")
        )
    return kafka_rows(with_metrics(records.mapInArrow(_trivial_answers(topic), OUTPUT_DDL)))


def run_pass_through(
    spark: Any,
    cfg: CarouselConfig,
    run: RateRun,
    label: str,
    real_time: bool,
    steps: str = "raw",
    rates: list[float] | None = None,
) -> dict[str, Any]:
    """The mixed topic -> the same records on an output topic, with serve's source options and trigger.

    ``steps`` adds serve's parts without its logic (:func:`_with_steps`).
    """
    args, bootstrap = run.args, run.bootstrap
    rates = rates or run.rates
    suffix = uuid.uuid4().hex[:6]
    source_topic, output_topic = f"bench-{label}-in-{suffix}", f"bench-{label}-out-{suffix}"
    create_topic(bootstrap, source_topic, args.partitions)
    create_topic(bootstrap, output_topic, args.partitions, log_append_time=True)
    kafka = cfg.kafka.spark_options()
    reader = (
        spark.readStream.format("kafka")
        .options(**kafka)
        .option("subscribe", source_topic)
        .option("startingOffsets", "earliest")
        .option("kafka.fetch.max.wait.ms", cfg.serving.kafka_fetch_max_wait_ms)
        .option("failOnDataLoss", "true")
    )
    if not real_time:
        # Real-time mode refuses maxOffsetsPerTrigger ("not compatible with real time mode").
        reader = reader.option("maxOffsetsPerTrigger", cfg.serving.max_offsets_per_trigger)
    stream = _with_steps(reader.load(), cfg, steps, output_topic)
    writer = (
        stream.writeStream.format("kafka")
        .options(**kafka)
        .option("topic", output_topic)  # serve-plan rows name it themselves
        .option("checkpointLocation", cfg.storage.checkpoint(f"bench-{label}"))
        .queryName(f"bench-{label}")
    )
    if real_time:
        # PySpark 4.1.3's trigger() has no realTime keyword: set the JVM trigger directly.
        jvm = spark.sparkContext._jvm
        writer = writer.outputMode("update")
        writer._jwrite = writer._jwrite.trigger(
            jvm.org.apache.spark.sql.streaming.Trigger.RealTime(REALTIME_CHECKPOINT_INTERVAL)
        )
    else:
        writer = with_progress_tracking(writer.trigger(processingTime=cfg.serving.trigger_interval), cfg)
    consumer = PayloadConsumer(bootstrap, output_topic, PASS_THROUGH_TRIGGER_ID)
    producer = MixedProducer(bootstrap, source_topic, run.shop_users, run.shop_items, args.seed + 1)
    try:
        query = writer.start()
        try:
            result = measure(label, query, producer, consumer, args, rates, args.warmup, args.duration)
        finally:
            query.stop()
    finally:
        consumer.close()
    result["trigger"] = (
        f"realTime {REALTIME_CHECKPOINT_INTERVAL}"
        if real_time
        else f"processingTime {cfg.serving.trigger_interval}"
    )
    result["settings"] = _settings(cfg)
    result["steps"] = steps
    result["duplicate_outputs"] = consumer.duplicates
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _by_rate(phase: dict[str, Any] | None) -> dict[float, dict[str, Any]]:
    if not phase or "error" in phase:
        return {}
    return {r["target_rate"]: r for r in phase.get("rates", [])}


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per rate: serve vs the micro-batch ceiling (p50, p99, delivered rate) and the real-time one."""
    serve = _by_rate(results.get("serve"))
    ceiling, realtime = _by_rate(results.get("ceiling")), _by_rate(results.get("realtime_ceiling"))
    rows = []
    for rate, s in serve.items():
        lat = s["latency"]
        row: dict[str, Any] = {
            "rate": rate,
            "serve_p50_s": lat["p50_s"],
            "serve_p95_s": lat["p95_s"],
            "serve_p99_s": lat["p99_s"],
            "serve_delivered_per_s": lat["delivered_per_s"],
        }
        for name, phase in (("ceiling", ceiling), ("realtime", realtime)):
            c = phase.get(rate)
            if c is None:
                continue
            row[f"{name}_p50_s"], row[f"{name}_p99_s"] = c["latency"]["p50_s"], c["latency"]["p99_s"]
            row[f"{name}_delivered_per_s"] = c["latency"]["delivered_per_s"]
        for q in ("p50", "p99"):
            a, b = row.get(f"serve_{q}_s"), row.get(f"ceiling_{q}_s")
            row[f"{q}_serve_over_ceiling"] = round(a / b, 2) if a and b else None
        rows.append(row)
    return rows


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's three latency goals, each met or not (None: not measured)."""
    rows = {r["rate"]: r for r in results.get("comparison", [])}
    at_goal = rows.get(GOAL_RATE)
    ratios = [r.get("p99_serve_over_ceiling") for r in rows.values()]
    serve = results.get("serve") or {}
    return {
        "p99_under_1s_at_1000_per_s": None
        if at_goal is None or at_goal["serve_p99_s"] is None
        else at_goal["serve_p99_s"] < LATENCY_GOAL_S,
        "p99_within_1.5x_ceiling_every_rate": None
        if not ratios or any(r is None for r in ratios)
        else all(r <= CEILING_FACTOR_GOAL for r in ratios),
        "highest_rate_p99_under_2s": serve.get("highest_rate_p99_under_2s"),
    }


def _fmt(value: Any, unit: str = " s") -> str:
    return "-" if value is None else f"{value}{unit}"


def print_summary(results: dict[str, Any]) -> None:
    common.print_header(results, "serving")
    store = results.get("store") or {}
    if "rebuild" in store:
        r = store["rebuild"]
        print(
            f"online store: rebuild of {r['counts']['profiles']:,} users from Delta {r['seconds']} s "
            f"({_fmt(r['users_per_s'], ' users/s')}); used_memory {r['memory_after']['used_memory_human']} "
            f"({r['bytes_per_user']} bytes/user, {r['memory_for_1m_users_gib']} GiB per 1M users)"
        )
    for entry in (store.get("round_trips") or {}).get("batches", []):
        print(
            f"store per batch of {entry['users']} users: read {entry['read_pipelined_ms']} ms pipelined vs "
            f"{entry['read_per_user_ms']} ms per user; read+write {entry['read_write_pipelined_ms']} vs "
            f"{entry['read_write_per_user_ms']} ms; new connection + read "
            f"{entry['read_new_connection_ms']} ms"
        )
    for entry in (store.get("hot_path") or {}).get("batches", []):
        print(
            f"hot path in process: {entry['triggers']} triggers (+4 events each) in {entry['seconds']} s = "
            f"{entry['ms_per_trigger_with_its_4_events']} ms/trigger ({entry['triggers_per_s_one_core']}/s "
            f"on one core)"
        )
    steps = {f"ceiling+{p['steps']}": p for p in results.get("ceiling_steps") or []}
    for label in ("serve", "ceiling", *steps, "realtime_ceiling"):
        phase = results.get(label) or steps.get(label)
        if not phase:
            continue
        if "error" in phase:
            print(f"{label:<17} FAILED: {phase['error'][:300]}")
            continue
        for r in phase["rates"]:
            lat = r["latency"]
            mb = r.get("micro_batches") or {}
            print(
                f"{label:<17} {r['target_rate']:>6.0f}/s (sent {r['produce']['rate']:>7.1f}/s)  "
                f"p50 {_fmt(lat['p50_s'])}  p95 {_fmt(lat['p95_s'])}  p99 {_fmt(lat['p99_s'])}  "
                f"delivered {lat['delivered']}/{lat['triggers']} ({_fmt(lat['delivered_per_s'], '/s')})  "
                f"batches {mb.get('batches')} p50 {_fmt(mb.get('batch_s_p50'))}  load {r['load_1min']}"
            )
        print(
            f"{label:<17} highest rate with p99 < 1 s: {phase.get('highest_rate_p99_under_1s') or 'none'}, "
            f"< 2 s: {phase.get('highest_rate_p99_under_2s') or 'none'}"
        )
    for row in results.get("comparison", []):
        print(
            f"serve/ceiling at {row['rate']:.0f}/s: p50 x{_fmt(row.get('p50_serve_over_ceiling'), '')}, "
            f"p99 x{_fmt(row.get('p99_serve_over_ceiling'), '')}"
        )
    outbox = (results.get("serve") or {}).get("outbox")
    if outbox:
        lag, lat = outbox["lag"], outbox["serve_during"]["latency"]
        print(
            f"outbox -> Delta lag ({lag['payloads_recorded']}/{lag['payloads_expected']} payloads): "
            f"p50 {_fmt(lag['lag_p50_s'])} p99 {_fmt(lag['lag_p99_s'])} max {_fmt(lag['lag_max_s'])}; serve "
            f"meanwhile p50 {_fmt(lat['p50_s'])} p99 {_fmt(lat['p99_s'])}"
        )
    for entry in results.get("sweep") or []:
        for r in entry.get("rates", []):
            print(
                f"sweep {entry['label']:<44} {r['target_rate']:.0f}/s: p50 {_fmt(r['latency']['p50_s'])} "
                f"p99 {_fmt(r['latency']['p99_s'])} batches p50 {_fmt(r['micro_batches'].get('batch_s_p50'))}"
            )
    recovery = results.get("recovery")
    if recovery and "error" not in recovery:
        cold, restart = recovery["cold_start"], recovery["restart"]
        print(
            f"recovery at {recovery['rate']:.0f}/s: cold start -> first payload "
            f"{_fmt(cold['first_payload_s'])}; "
            f"after SIGKILL, restart -> query started {_fmt(restart['query_started_s'])}, first payload "
            f"{_fmt(restart['first_payload_s'])}, p99 < {recovery['caught_up_goal_s']} s again after "
            f"{_fmt(restart['caught_up_s']) if restart.get('recovered', True) else 'not within the window'}; "
            f"lost {recovery['lost_triggers']}, payloads twice {recovery['duplicate_payloads']}"
        )
    elif recovery:
        print(f"recovery FAILED: {recovery['error'][:300]}")
    print(f"goals: {results.get('goals')}")
    common.print_footer(results)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = apply_quick(build_parser().parse_args(argv), QUICK)
    rates = common.parse_rates(args.rates)
    workdir, temp = common.make_workdir(args.workdir, "carousel-serving-bench-")
    shop_root = Path(args.shop_root).resolve()
    sizes = sizes_from_args(args)
    settings = {
        "rates": rates,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "drain_timeout_s": args.drain_timeout,
        "events_partitions": args.partitions,
        "profile_events_per_trigger": 4,
        "shop_root": str(shop_root),
        "shop_sizes": sizes.__dict__,
        "config_overrides": list(args.overrides),
        "workdir": str(workdir),
    }
    results = common.start_results("serving", argv, settings)
    ports = common.broker_overrides(workdir / "kafka")
    store = serving_store.store_overrides(workdir / "redis", args.store_max_memory)
    broker_cfg = _config(args, [*ports, "broker.heap=1g"])
    with common.bench_run(results, broker_cfg.broker, args.output, workdir if temp else None) as state:
        bootstrap = state.bootstrap

        def phase_required(name: str, root: str, partitions: int, extra: Sequence[str] = ()) -> list[str]:
            topics = common.phase_topics(broker_cfg.kafka.topics, name, uuid.uuid4().hex[:6])
            return [
                *ports,
                f"kafka.bootstrap_servers={bootstrap}",
                *topics,
                f"kafka.topics.events.partitions={partitions}",
                f"storage.root={workdir / root}",
                "serving.starting_offsets=earliest",
                *store,
                *extra,
            ]

        def phase_config(name: str, root: str | None = None, extra: Sequence[str] = ()) -> CarouselConfig:
            return _config(args, phase_required(name, root or name, args.partitions, extra))

        shop_cfg = _config(args, [f"storage.root={shop_root}", *store])
        progress_conf = {"spark.sql.streaming.numRecentProgressUpdates": "100000"}
        spark = state.shop_session(shop_cfg, "carousel-bench-serving", workdir / "warehouse", progress_conf)
        results["shop"] = ensure_shop(spark, shop_cfg, sizes, force=args.rebuild_shop)

        serve_required = phase_required("serve", "serve", args.partitions)
        serve_cfg = _config(args, serve_required)
        # record-sends beside serve: the same topics and root, from the outbox's end.
        outbox_cfg = _config(args, [*serve_required, "sent_log.starting_offsets=latest"])
        link_shop(shop_root, serve_cfg.storage.root)
        run = RateRun(args, rates, bootstrap, sizes.users, sizes.items)
        online_store_server.start(serve_cfg.online_store)
        try:
            # The rebuild reads the events topic after ingest's offsets: it must exist.
            create_topic(bootstrap, serve_cfg.kafka.topic("events").name, args.partitions)
            results["store"] = {"rebuild": serving_store.rebuild(spark, serve_cfg, sizes.users)}
            # What serve.run does at its first start; done here so the in-process hot path has it too.
            TrendingRefresher(spark, serve_cfg).refresh()
            if not args.skip_store_micro:
                results["store"]["round_trips"] = serving_store.round_trips(serve_cfg, sizes.users, args.seed)
                results["store"]["hot_path"] = serving_store.hot_path_cost(
                    serve_cfg, sizes.users, sizes.items, args.seed
                )
            results["serve"] = run_serve(spark, serve_cfg, outbox_cfg, run)
            if args.sweep:
                results["sweep"] = run_sweep(spark, sweep_configs(args, phase_required), run)
            if not args.skip_recovery:
                query = ["serving.query_name=bench-recovery"]
                required = phase_required("recovery", "serve", args.partitions, query)
                try:
                    results["recovery"] = run_recovery(
                        RecoveryRun(
                            cfg=_config(args, required),
                            config_files=list(args.config),
                            overrides=[*_head(args), *args.overrides, *required],
                            bootstrap=bootstrap,
                            partitions=args.partitions,
                            users=sizes.users,
                            items=sizes.items,
                            seed=args.seed,
                            rate=args.recovery_rate,
                            steady_s=args.recovery_steady,
                            timeout_s=args.recovery_timeout,
                            logs=workdir / "recovery-logs",
                        )
                    )
                except (RuntimeError, OSError) as err:
                    log.warning("recovery phase failed: %s", err)
                    results["recovery"] = {"error": str(err)[:2000]}
            results["store"]["at_end"] = serving_store.server_figures(serve_cfg)
        finally:
            online_store_server.stop(serve_cfg.online_store)
        if not args.skip_ceiling:
            results["ceiling"] = run_pass_through(
                spark, phase_config("ceiling"), run, "ceiling", real_time=False
            )
        if not args.skip_ceiling_steps:
            # Serve's parts without its logic, at the lowest rate: where the gap to the ceiling comes from.
            results["ceiling_steps"] = [
                run_pass_through(
                    spark, phase_config(f"ceiling-{steps}"), run, f"ceiling-{steps}", False, steps, rates[:1]
                )
                for steps in ("validated", "serve-plan")
            ]
        if not args.skip_realtime:
            try:
                results["realtime_ceiling"] = run_pass_through(
                    spark, phase_config("realtime"), run, "realtime", real_time=True
                )
            except (PySparkException, Py4JJavaError, RuntimeError) as err:
                # A refused real-time query is a finding, not a failed benchmark.
                log.warning("real-time mode pass-through failed: %s", err)
                results["realtime_ceiling"] = {"error": str(err).splitlines()[0][:2000]}
        results["comparison"] = comparisons(results)
        results["goals"] = goals(results)
    print_summary(results)
    print(json.dumps(results.get("comparison", []), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
