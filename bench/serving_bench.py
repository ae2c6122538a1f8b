"""Serving benchmark: trigger -> payload latency at steady rates, against a pass-through ceiling.

    .venv/bin/python -m bench.serving_bench                      # 1M users, 100k items; 200/1000/5000 per s
    .venv/bin/python -m bench.serving_bench --quick              # smoke: small shop, one short rate
    .venv/bin/python -m bench.serving_bench --rates 100,500 --duration 30 --shop-root /tmp/shop

Everything runs on this machine: a private Kafka broker (temp state folder, free ports), one
``local[2]`` Spark session, and the scaled shop of :mod:`bench.shop_data` (built, or reused from
``--shop-root``), linked read-only into each run's own storage root. Phases, each on fresh topics:

1. **serve**: ``streaming.serve.run(spark, cfg)`` in this process (processing-time trigger
   ``serving.trigger_interval``), with the configured campaigns (``launch-push`` answers
   ``App Launched``). A producer thread sends App Launched triggers for uniformly random shop
   users at each steady ``--rates`` value for ``--duration`` seconds, after a ``--warmup`` at the
   lowest rate; the send time of each event id is recorded. A consumer thread reads the push
   topic. Its topics use ``message.timestamp.type=LogAppendTime``, so a payload's record timestamp
   is the moment the broker appended it: latency = that time - the trigger's send time (same
   clock). Between rates the bench waits until every payload of the rate has arrived (at most
   ``--drain-timeout``); a rate that does not drain ends the phase (higher rates are skipped).
2. **ceiling**: a pass-through query (read the triggers, write them unchanged to an output topic)
   with the same Kafka source options and the same trigger, measured the same way: the floor of
   latency and the most throughput a Kafka -> Kafka micro-batch query reaches here.
3. **real-time ceiling**: the same pass-through with Spark 4.1's real-time mode
   (``Trigger.RealTime``; PySpark 4.1.3 has no ``realTime=`` keyword yet, so the JVM trigger is
   set through py4j). The serving query itself cannot use real-time mode; see bench/README.md.

Per serve micro-batch the steps of ``streaming.serve.process_batch`` are timed by wrapping the
helpers it calls (no change to the module). Figures are printed and written to ``--output``
(default ``bench/results/serving.json``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException

from bench import common
from bench.shop_data import apply_quick, ensure_shop, link_shop, sizes_from_args
from carousel import broker
from carousel.cli import setup_logging
from carousel.config import CarouselConfig
from carousel.query_lifecycle import stop_between_batches
from carousel.schemas import APP_LAUNCHED, PUSH

log = logging.getLogger("bench.serving")

DEFAULT_OUTPUT = "bench/results/serving.json"
QUICK = {"users": 20_000, "items": 5_000, "events": 50_000, "rates": "200", "duration": 15.0, "warmup": 10.0}
LATENCY_GOAL_S = 1.0
REALTIME_CHECKPOINT_INTERVAL = "30 seconds"
_SERVE_ID = re.compile(rb'"trigger_event_id":"([^"]+)"')
_TRIGGER_ID = re.compile(rb'"event_id":"([^"]+)"')


# ---------------------------------------------------------------------------------------------
# Arguments and configuration
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = common.bench_parser(
        "serving", "Trigger -> payload latency of serve at steady rates, vs a pass-through ceiling."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small shop, 200/s for 15 s")
    parser.add_argument("--rates", default="200,1000,5000", help="steady rates, triggers/s (200,1000,5000)")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of producing per rate (45)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds at the lowest rate first (20)")
    parser.add_argument(
        "--drain-timeout", type=float, default=90.0, help="seconds to wait for a rate's last payloads (90)"
    )
    parser.add_argument(
        "--trigger-interval", help="serving.trigger_interval for serve and ceiling (default: the config's)"
    )
    parser.add_argument("--partitions", type=int, default=2, help="partitions of the trigger topics (2)")
    parser.add_argument("--skip-ceiling", action="store_true", help="no pass-through ceiling")
    parser.add_argument("--skip-realtime", action="store_true", help="no real-time-mode pass-through")
    parser.add_argument("--driver-memory", default="4g", help="Spark driver memory (4g)")
    return common.add_run_args(
        parser, DEFAULT_OUTPUT, "keep broker data, tables and checkpoints here (default: temp)"
    )


def _rates(text: str) -> list[float]:
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--rates expects numbers separated by commas, got {text!r}") from None
    if not rates or rates[0] <= 0:
        raise SystemExit(f"--rates needs positive rates, got {text!r}")
    return rates


def _config(args: argparse.Namespace, required: Sequence[str]) -> CarouselConfig:
    head = [
        "spark.master=local[2]",
        "spark.shuffle_partitions=4",
        f"spark.driver_memory={args.driver_memory}",
    ]
    if args.trigger_interval:
        head.append(f"serving.trigger_interval={args.trigger_interval}")
    return common.bench_config(args, head, required, log)


def create_topic(bootstrap: str, name: str, partitions: int, log_append_time: bool = False) -> None:
    """Create ``name``; with ``log_append_time`` records carry the broker's append time."""
    from confluent_kafka.admin import AdminClient, NewTopic

    config = {"message.timestamp.type": "LogAppendTime"} if log_append_time else {}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)]
    )
    for future in futures.values():
        future.result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topic = admin.list_topics(name, timeout=10).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return
        time.sleep(0.2)
    raise RuntimeError(f"topic {name} not visible after 30 s")


# ---------------------------------------------------------------------------------------------
# Producer and consumer threads
# ---------------------------------------------------------------------------------------------
class TriggerProducer:
    """Sends App Launched triggers for random users at a steady rate; remembers each send time."""

    def __init__(self, bootstrap: str, topic: str, users: int, seed: int) -> None:
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "enable.idempotence": True})
        self.topic = topic
        self.users = users
        self.random = random.Random(seed)
        self.sent: dict[str, float] = {}
        self.errors: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def run(self, phase: str, rate: float, duration: float) -> dict[str, Any]:
        """Send ``rate`` triggers/s for ``duration`` s (ids ``<phase>-<n>``); returns the figures."""
        total = int(round(rate * duration))
        started = time.perf_counter()
        sent = 0
        platforms = ("android", "ios", "web")
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
            while sent < due:
                event_id = f"{phase}-{sent}"
                user = f"u-{self.random.randrange(self.users):07d}"
                now = datetime.now(UTC)
                value = (
                    f'{{"event_id":"{event_id}","user_id":"{user}","event_type":"{APP_LAUNCHED}",'
                    f'"event_time":"{now.isoformat(timespec="milliseconds")}","source":"mobile",'
                    f'"device":{{"platform":"{platforms[sent % 3]}"}}}}'
                )
                while True:
                    try:
                        self.producer.produce(
                            self.topic, value=value.encode(), key=user.encode(), on_delivery=self._on_delivery
                        )
                        break
                    except BufferError:
                        self.producer.poll(0.01)
                self.sent[event_id] = time.time()
                sent += 1
            self.producer.poll(0)
            # Sleep to the next send (at most 5 ms), so that sends are spread over each second.
            next_due = started + (sent / rate)
            pause = next_due - time.perf_counter()
            if pause > 0:
                time.sleep(min(pause, 0.005))
        self.producer.flush(60)
        seconds = time.perf_counter() - started
        return {"records": sent, "seconds": round(seconds, 3), "rate": round(sent / seconds, 1)}


class PayloadConsumer:
    """Reads an output topic in a thread; keeps (id -> broker append time) for every record."""

    def __init__(self, bootstrap: str, topic: str, id_pattern: re.Pattern[bytes]) -> None:
        from confluent_kafka import Consumer

        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self.consumer.subscribe([topic])
        self.pattern = id_pattern
        self.received: dict[str, float] = {}
        self.unmatched = 0
        self.duplicates = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"bench-consumer-{topic}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for message in self.consumer.consume(num_messages=1000, timeout=0.1):
                if message.error() is not None:
                    continue
                match = self.pattern.search(message.value() or b"")
                if match is None:
                    self.unmatched += 1
                    continue
                key = match.group(1).decode()
                if key in self.received:
                    self.duplicates += 1
                    continue
                _kind, stamp_ms = message.timestamp()
                self.received[key] = stamp_ms / 1000.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()


# ---------------------------------------------------------------------------------------------
# Per-batch step timings of serve
# ---------------------------------------------------------------------------------------------
SERVE_STEPS = (
    "read triggers + profile join + count",
    "load inputs (catalog, matrix, trending, sends)",
    "rank + append sent_recommendations",
    "read back + render payloads",
    "write payloads to Kafka",
    "per-arm counts + other",
)
# Helper of streaming.serve -> (step it is, step of the wall time just before it).
_SERVE_HELPERS = {
    "read_catalog_snapshot": (SERVE_STEPS[1], SERVE_STEPS[0]),
    "load_serving_inputs": (SERVE_STEPS[1], SERVE_STEPS[1]),
    "idempotent_append": (SERVE_STEPS[2], SERVE_STEPS[1]),
    "write_payloads": (SERVE_STEPS[4], SERVE_STEPS[3]),
}


class ServeStepTimer(common.BatchTimer):
    """Times the steps of ``streaming.serve.process_batch`` by wrapping the helpers it calls.

    Only module attributes of ``streaming.serve`` are replaced while installed (install before
    ``serve.run``, which binds ``process_batch``). A batch that reads no trigger counts as empty.
    """

    @contextlib.contextmanager
    def installed(self) -> Iterator[ServeStepTimer]:
        from streaming import serve

        names = ("process_batch", *_SERVE_HELPERS)
        originals = {name: getattr(serve, name) for name in names if hasattr(serve, name)}
        if "process_batch" not in originals:
            log.warning("streaming.serve.process_batch not found: no per-step timings")
            yield self
            return
        original_batch = originals["process_batch"]

        def timed_batch(batch: Any, batch_id: int, **kwargs: Any) -> None:
            started = time.perf_counter()
            self._current, self._mark = {"batch_id": batch_id, "steps": {}}, started
            try:
                original_batch(batch, batch_id, **kwargs)
            finally:
                ended = time.perf_counter()
                current, self._current = self._current, None
                if not current["steps"]:
                    self.empty_batches += 1
                else:
                    self._current = current
                    self._add(SERVE_STEPS[5], ended - self._mark)
                    self._current = None
                    current["total"] = ended - started
                    current["wall_end"] = time.time()
                    self.batches.append(current)

        def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            step_and_gap = _SERVE_HELPERS[name]
            return self.timed(original, lambda *_args, **_kwargs: step_and_gap)

        serve.process_batch = timed_batch
        for name in _SERVE_HELPERS:
            if name in originals:
                setattr(serve, name, timed(name, originals[name]))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(serve, name, original)

    def summary(self, since: float, until: float) -> dict[str, Any]:
        """Mean seconds per step over the batches that ended between ``since`` and ``until``."""
        batches = [b for b in self.batches if since <= b["wall_end"] <= until]
        total = sum(b["total"] for b in batches)
        steps = {}
        for name in SERVE_STEPS:
            seconds = sum(b["steps"].get(name, 0.0) for b in batches)
            steps[name] = {
                "mean_s": round(seconds / len(batches), 3) if batches else 0.0,
                "share": round(seconds / total, 3) if total else 0.0,
            }
        return {
            "batches": len(batches),
            "mean_batch_s": round(total / len(batches), 3) if batches else None,
            "steps": steps,
        }


# ---------------------------------------------------------------------------------------------
# Measuring one query at steady rates
# ---------------------------------------------------------------------------------------------
def latency_figures(sent: dict[str, float], received: dict[str, float], prefix: str) -> dict[str, Any]:
    """Latency percentiles of the ids starting with ``prefix``; a missing payload counts as infinite."""
    ids = [key for key in sent if key.startswith(prefix)]
    latencies = sorted(received[key] - sent[key] for key in ids if key in received)
    missing = len(ids) - len(latencies)
    # Missing payloads sort last: a percentile that falls among them is infinite.
    padded = latencies + [float("inf")] * missing

    def pct(q: float) -> float | None:
        if not padded:
            return None
        value = padded[min(len(padded) - 1, int(q * len(padded)))]
        return round(value, 3) if value != float("inf") else None

    arrivals = [received[key] for key in ids if key in received]
    first_sent = min((sent[key] for key in ids), default=None)
    span = (max(arrivals) - first_sent) if arrivals and first_sent is not None else 0.0
    return {
        "triggers": len(ids),
        "delivered": len(latencies),
        "missing": missing,
        "p50_s": pct(0.50),
        "p95_s": pct(0.95),
        "p99_s": pct(0.99),
        "min_s": round(latencies[0], 3) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies and not missing else None,
        "mean_s": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "delivered_per_s": round(len(latencies) / span, 1) if span > 0 else None,
    }


def _drain(
    query: Any, producer: TriggerProducer, consumer: PayloadConsumer, prefix: str, timeout: float
) -> float:
    """Wait until every trigger of ``prefix`` has its output; returns the seconds waited (or -1)."""
    wanted = [key for key in producer.sent if key.startswith(prefix)]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if query.exception() is not None or not query.isActive:
            raise RuntimeError(f"{query.name} stopped: {query.exception()}")
        if all(key in consumer.received for key in wanted):
            return round(time.monotonic() - started, 3)
        time.sleep(0.2)
    return -1.0


def measure(
    name: str,
    query: Any,
    producer: TriggerProducer,
    consumer: PayloadConsumer,
    args: argparse.Namespace,
    rates: list[float],
    timer: ServeStepTimer | None = None,
) -> dict[str, Any]:
    """Warm-up, then each rate in turn: produce, drain, figures."""
    common.wait_started(query, 300.0, log)
    result: dict[str, Any] = {"rates": []}
    if args.warmup > 0:
        log.info("%s: warm-up at %.0f/s for %.0f s", name, rates[0], args.warmup)
        producer.run("warm", rates[0], args.warmup)
        drained = _drain(query, producer, consumer, "warm-", args.drain_timeout * 2)
        result["warmup"] = {"rate": rates[0], "seconds": args.warmup, "drained_after_s": drained}
        result["warmup"]["latency"] = latency_figures(producer.sent, consumer.received, "warm-")
    for rate in rates:
        prefix = f"r{int(rate)}-"
        load_before = common.load1()
        since = time.time()
        log.info("%s: %.0f triggers/s for %.0f s", name, rate, args.duration)
        produced = producer.run(prefix.rstrip("-"), rate, args.duration)
        drained = _drain(query, producer, consumer, prefix, args.drain_timeout)
        figures = latency_figures(producer.sent, consumer.received, prefix)
        entry: dict[str, Any] = {
            "target_rate": rate,
            "produce": produced,
            "drained_after_s": drained if drained >= 0 else None,
            "latency": figures,
            "sustained": drained >= 0 and figures["p99_s"] is not None and figures["p99_s"] < LATENCY_GOAL_S,
            "load_1min": [load_before, common.load1()],
        }
        if timer is not None:
            entry["serve_steps"] = timer.summary(since, time.time())
        result["rates"].append(entry)
        log.info(
            "%s at %.0f/s: p50 %s s, p95 %s s, p99 %s s, delivered %d/%d, drained after %s s",
            name,
            rate,
            figures["p50_s"],
            figures["p95_s"],
            figures["p99_s"],
            figures["delivered"],
            figures["triggers"],
            entry["drained_after_s"],
        )
        if drained < 0:
            log.warning(
                "%s: the %.0f/s backlog did not drain in %.0f s: higher rates skipped",
                name,
                rate,
                args.drain_timeout,
            )
            result["stopped_at_rate"] = rate
            break
    sustained = [r["target_rate"] for r in result["rates"] if r["sustained"]]
    result["highest_rate_p99_under_1s"] = max(sustained) if sustained else None
    result["batches"] = _progress_batches(query)
    return result


def _progress_batches(query: Any) -> list[dict[str, Any]]:
    return [
        {"batch_id": p["batchId"], "rows": int(p["numInputRows"]), "duration_ms": dict(p["durationMs"])}
        for p in query.recentProgress
        if int(p["numInputRows"])
    ]


# ---------------------------------------------------------------------------------------------
# The three queries
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateRun:
    """What every measured query gets: the flags, the steady rates, the broker and the shop's users."""

    args: argparse.Namespace
    rates: list[float]
    bootstrap: str
    shop_users: int


def run_serve(spark: Any, cfg: CarouselConfig, run: RateRun) -> dict[str, Any]:
    from streaming import serve

    args, rates, bootstrap, shop_users = run.args, run.rates, run.bootstrap, run.shop_users

    push_topic = cfg.kafka.topic(PUSH).name
    create_topic(bootstrap, cfg.kafka.topic("events").name, args.partitions)
    create_topic(bootstrap, push_topic, cfg.kafka.topic(PUSH).partitions, log_append_time=True)
    broker.ensure_topics(cfg.kafka)
    consumer = PayloadConsumer(bootstrap, push_topic, _SERVE_ID)
    producer = TriggerProducer(bootstrap, cfg.kafka.topic("events").name, shop_users, args.seed)
    timer = ServeStepTimer()
    with timer.installed():
        started = time.perf_counter()
        query = serve.run(spark, cfg)
        startup = time.perf_counter() - started
        try:
            result = measure("serve", query, producer, consumer, args, rates, timer)
        finally:
            stop_between_batches(query, cfg.serving.stop_timeout_seconds)
            consumer.close()
    result["startup_s"] = round(startup, 3)
    result["trigger_interval"] = cfg.serving.trigger_interval
    result["campaigns"] = sorted(serve.trigger_campaigns(cfg))
    result["duplicate_payloads"] = consumer.duplicates
    result["step_batches"] = [
        {
            "batch_id": b["batch_id"],
            "total_s": round(b["total"], 3),
            "steps_s": {k: round(v, 3) for k, v in b["steps"].items()},
        }
        for b in timer.batches
    ]
    result["empty_batches"] = timer.empty_batches
    return result


def run_pass_through(
    spark: Any, cfg: CarouselConfig, run: RateRun, label: str, real_time: bool
) -> dict[str, Any]:
    """Triggers -> the same records on an output topic, with serve's source options and trigger."""
    args, rates, bootstrap, shop_users = run.args, run.rates, run.bootstrap, run.shop_users
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
        .option("failOnDataLoss", "true")
    )
    if not real_time:
        # Real-time mode refuses maxOffsetsPerTrigger ("not compatible with real time mode").
        reader = reader.option("maxOffsetsPerTrigger", cfg.serving.max_offsets_per_trigger)
    stream = reader.load().selectExpr("key", "value")
    writer = (
        stream.writeStream.format("kafka")
        .options(**kafka)
        .option("topic", output_topic)
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
        writer = writer.trigger(processingTime=cfg.serving.trigger_interval)
    consumer = PayloadConsumer(bootstrap, output_topic, _TRIGGER_ID)
    producer = TriggerProducer(bootstrap, source_topic, shop_users, args.seed + 1)
    try:
        query = writer.start()
        try:
            result = measure(label, query, producer, consumer, args, rates)
        finally:
            query.stop()
    finally:
        consumer.close()
    result["trigger"] = (
        f"realTime {REALTIME_CHECKPOINT_INTERVAL}"
        if real_time
        else f"processingTime {cfg.serving.trigger_interval}"
    )
    result["duplicate_outputs"] = consumer.duplicates
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _by_rate(phase: dict[str, Any] | None) -> dict[float, dict[str, Any]]:
    return {r["target_rate"]: r for r in (phase or {}).get("rates", [])}


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per rate: serve vs ceiling latency (ratio of p50 and p99) and delivered throughput."""
    serve, ceiling = _by_rate(results.get("serve")), _by_rate(results.get("ceiling"))
    rows = []
    for rate, s in serve.items():
        c = ceiling.get(rate)
        row: dict[str, Any] = {
            "rate": rate,
            "serve_p50_s": s["latency"]["p50_s"],
            "serve_p99_s": s["latency"]["p99_s"],
        }
        if c is not None:
            row["ceiling_p50_s"], row["ceiling_p99_s"] = c["latency"]["p50_s"], c["latency"]["p99_s"]
            for q in ("p50", "p99"):
                a, b = s["latency"][f"{q}_s"], c["latency"][f"{q}_s"]
                row[f"{q}_serve_over_ceiling"] = round(a / b, 2) if a and b else None
            a, b = s["latency"]["delivered_per_s"], c["latency"]["delivered_per_s"]
            row["throughput_serve_over_ceiling"] = round(a / b, 3) if a and b else None
        rows.append(row)
    return rows


def _fmt(value: Any, unit: str = " s") -> str:
    return "-" if value is None else f"{value}{unit}"


def print_summary(results: dict[str, Any]) -> None:
    common.print_header(results, "serving")
    for label in ("serve", "ceiling", "realtime_ceiling"):
        phase = results.get(label)
        if not phase:
            continue
        if "error" in phase:
            print(f"{label:<17} FAILED: {phase['error'][:300]}")
            continue
        for r in phase["rates"]:
            lat = r["latency"]
            print(
                f"{label:<17} {r['target_rate']:>6.0f}/s (sent {r['produce']['rate']:>7.1f}/s)  "
                f"p50 {_fmt(lat['p50_s'])}  p95 {_fmt(lat['p95_s'])}  p99 {_fmt(lat['p99_s'])}  "
                f"delivered {lat['delivered']}/{lat['triggers']} ({_fmt(lat['delivered_per_s'], '/s')})  "
                f"load {r['load_1min']}"
            )
        print(f"{label:<17} highest rate with p99 < 1 s: {phase.get('highest_rate_p99_under_1s') or 'none'}")
    for row in results.get("comparison", []):
        print(
            f"serve/ceiling at {row['rate']:.0f}/s: p50 x{_fmt(row.get('p50_serve_over_ceiling'), '')}, "
            f"p99 x{_fmt(row.get('p99_serve_over_ceiling'), '')}, "
            f"throughput {_fmt(row.get('throughput_serve_over_ceiling'), '')}"
        )
    serve = results.get("serve") or {}
    for r in serve.get("rates", []):
        steps = r.get("serve_steps") or {}
        if steps.get("batches"):
            top = sorted(steps["steps"].items(), key=lambda kv: -kv[1]["mean_s"])[:4]
            print(
                f"serve batches at {r['target_rate']:.0f}/s: {steps['batches']} batches, "
                f"mean {steps['mean_batch_s']} s: " + ", ".join(f"{n} {v['mean_s']} s" for n, v in top)
            )
    common.print_footer(results)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = apply_quick(build_parser().parse_args(argv), QUICK)
    rates = _rates(args.rates)
    workdir, temp = common.make_workdir(args.workdir, "carousel-serving-bench-")
    shop_root = Path(args.shop_root).resolve()
    sizes = sizes_from_args(args)
    settings = {
        "rates": rates,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "drain_timeout_s": args.drain_timeout,
        "partitions": args.partitions,
        "shop_root": str(shop_root),
        "shop_sizes": sizes.__dict__,
        "config_overrides": list(args.overrides),
        "workdir": str(workdir),
    }
    results = common.start_results("serving", argv, settings)
    ports = common.broker_overrides(workdir / "kafka")
    broker_cfg = _config(args, [*ports, "broker.heap=1g"])
    with common.bench_run(results, broker_cfg.broker, args.output, workdir if temp else None) as state:
        bootstrap = state.bootstrap

        def phase_config(name: str) -> CarouselConfig:
            topics = common.phase_topics(broker_cfg.kafka.topics, name, uuid.uuid4().hex[:6])
            return _config(
                args,
                [
                    *ports,
                    f"kafka.bootstrap_servers={bootstrap}",
                    *topics,
                    f"kafka.topics.events.partitions={args.partitions}",
                    f"storage.root={workdir / name}",
                    "serving.starting_offsets=earliest",
                ],
            )

        shop_cfg = _config(args, [f"storage.root={shop_root}"])
        progress_conf = {"spark.sql.streaming.numRecentProgressUpdates": "100000"}
        spark = state.shop_session(shop_cfg, "carousel-bench-serving", workdir / "warehouse", progress_conf)
        results["shop"] = ensure_shop(spark, shop_cfg, sizes, force=args.rebuild_shop)

        serve_cfg = phase_config("serve")
        link_shop(shop_root, serve_cfg.storage.root)
        run = RateRun(args, rates, bootstrap, sizes.users)
        results["serve"] = run_serve(spark, serve_cfg, run)
        if not args.skip_ceiling:
            results["ceiling"] = run_pass_through(
                spark, phase_config("ceiling"), run, "ceiling", real_time=False
            )
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
    print_summary(results)
    print(json.dumps(results.get("comparison", []), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
