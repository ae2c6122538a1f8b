"""Campaign benchmark: a 1,000,000-user email campaign into Kafka, against a plain Kafka-write ceiling.

    .venv/bin/python -m bench.campaign_bench                     # the 1M-user shop, weekly-email
    .venv/bin/python -m bench.campaign_bench --quick             # smoke: 20,000 users
    .venv/bin/python -m bench.campaign_bench --campaign weekly-email --shop-root /tmp/shop

Everything runs on this machine: a private Kafka broker (temp state folder, free ports), one
``local[2]`` Spark session, and the scaled shop of :mod:`bench.shop_data` (built, or reused from
``--shop-root``), linked read-only into the run's own storage root. Phases:

1. **campaign**: ``jobs.campaign.run(spark, cfg, --campaign)`` end to end - segment, ranking,
   ``sent_recommendations`` append, rendering, Kafka write, ``campaign_runs`` - onto a fresh
   topic. payloads/s = payloads written / seconds of ``run``. Every profile of the shop is in the
   configured segment (``last_seen_within_days: 30``; the shop's users were all seen within 28
   days); the control group gets no payload. The topic's end offsets are checked against the
   count. The steps of ``run`` are timed by wrapping the helpers it calls (no change to the
   module), and every Spark stage's time is read from the session's event log and attached to
   the step it ran in.
2. **ceiling**: the same number of pre-rendered records, each the size of the campaign's mean
   payload (a real payload from the topic, made unique per record), written with the same writer
   (:func:`carousel.delivery.write_payloads`: Spark's Kafka sink, key, ``payload_id`` header) to a
   fresh topic of the same partitions, in the same session. The most payloads/s this session can
   put on a topic: campaign / ceiling says what segment, ranking, bookkeeping and rendering cost.

The summary extrapolates linearly to 10,000,000 users against the 10-minute goal. Figures are
printed and written to ``--output`` (default ``bench/results/campaign.json``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.shop_data import apply_quick, ensure_shop, link_shop, sizes_from_args
from bench.standalone import standalone_cluster
from carousel import broker
from carousel.cli import setup_logging
from carousel.config import PROJECT_ROOT, CarouselConfig
from carousel.session import LOCAL_PYTHON_DAEMON, PYTHON_DAEMON_MODULE

log = logging.getLogger("bench.campaign")

DEFAULT_OUTPUT = "bench/results/campaign.json"
QUICK = {"users": 20_000, "items": 5_000, "events": 50_000}
GOAL_USERS = 10_000_000
GOAL_SECONDS = 600.0
SAMPLE_PAYLOADS = 500

# jobs.campaign.run, as a sequence of helper calls: (helper, call number) -> (step inside the call,
# step of the wall time just before it). Lazy helpers (ranked_requests, sent_rows) only plan; the
# Spark work runs in the action that follows them.
_RENDER_WRITE = "render + write payloads to Kafka, by chunk (mapInArrow, Kafka sink)"
_RANK = "rank + local checkpoint + count, one pass (mapInArrow)"
_CALL_STEPS: dict[tuple[str, int], tuple[str, str]] = {
    ("load_serving_inputs", 1): ("load inputs (catalog, matrix, trending plan)", "templates + run check"),
    ("ranked_requests", 1): ("plan ranking + broadcast item lists", "select segment (plan)"),
    ("sent_rows", 1): ("plan sent rows", _RANK),
    ("idempotent_append", 1): ("append sent_recommendations from the checkpoint", "plan sent rows"),
    ("catalog_items", 1): ("collect catalog fields for rendering", "between append and render"),
    ("send_chunks", 1): (_RENDER_WRITE, "plan rendering"),
    ("write_files", 1): ("render + write payload files", "plan rendering"),
    ("remember_sends", 1): ("merge sends into the online store", "after the sends"),
    ("idempotent_append", 2): ("append campaign_runs", "after the sends"),
}
END_STEP = "log + unpersist"


# ---------------------------------------------------------------------------------------------
# Arguments and configuration
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = common.bench_parser(
        "campaign", "Payloads/s of a batch email campaign into Kafka, vs writing pre-rendered payloads."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: a 20,000-user shop")
    parser.add_argument("--campaign", default="weekly-email", help="the campaign to run (weekly-email)")
    parser.add_argument("--driver-memory", default="6g", help="Spark driver memory (6g)")
    parser.add_argument("--skip-ceiling", action="store_true", help="no pre-rendered write ceiling")
    parser.add_argument(
        "--cluster-workers",
        type=int,
        default=0,
        help="run on a local standalone cluster of this many single-core workers (0: local[2])",
    )
    parser.add_argument("--executor-memory", default="3g", help="each worker's executor memory (3g)")
    return common.add_run_args(
        parser, DEFAULT_OUTPUT, "keep broker data, tables and event log here (default: temp)"
    )


def _config(args: argparse.Namespace, required: Sequence[str]) -> CarouselConfig:
    head = [
        "spark.master=local[2]",
        "spark.shuffle_partitions=4",
        f"spark.driver_memory={args.driver_memory}",
    ]
    return common.bench_config(args, head, required, log)


# ---------------------------------------------------------------------------------------------
# Step timings of jobs.campaign.run and Spark stage times
# ---------------------------------------------------------------------------------------------
class CampaignStepTimer:
    """Times the steps of ``jobs.campaign.run`` by wrapping the helpers it calls (see _CALL_STEPS).

    Only module attributes of ``jobs.campaign`` are replaced, while installed. Each step keeps its
    wall-clock span, so Spark stages can be attached to the step they ran in.
    """

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._calls: dict[str, int] = {}
        self._mark = 0.0
        self.active = False

    def _span(self, step: str, start: float, end: float) -> None:
        if end > start:
            self.spans.append({"step": step, "start": start, "end": end})

    def start(self) -> None:
        self.spans, self._calls, self._mark, self.active = [], {}, time.time(), True

    def stop(self) -> None:
        if self.active:
            self._span(END_STEP, self._mark, time.time())
        self.active = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[CampaignStepTimer]:
        from jobs import campaign

        names = sorted({name for name, _ in _CALL_STEPS})
        originals = {name: getattr(campaign, name) for name in names if hasattr(campaign, name)}

        def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if not self.active:
                    return original(*args, **kwargs)
                self._calls[name] = self._calls.get(name, 0) + 1
                inside, before = _CALL_STEPS.get((name, self._calls[name]), (name, f"before {name}"))
                start = time.time()
                self._span(before, self._mark, start)
                try:
                    return original(*args, **kwargs)
                finally:
                    self._mark = time.time()
                    self._span(inside, start, self._mark)

            return wrapper

        for name, original in originals.items():
            setattr(campaign, name, timed(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(campaign, name, original)

    def step_of(self, when: float) -> str:
        for span in self.spans:
            if span["start"] <= when <= span["end"]:
                return span["step"]
        return "outside run()"

    def summary(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for span in self.spans:
            totals[span["step"]] = totals.get(span["step"], 0.0) + span["end"] - span["start"]
        return {step: round(seconds, 3) for step, seconds in totals.items()}


# Stage metrics worth showing, by accumulator name.
_STAGE_METRICS = {
    "internal.metrics.input.recordsRead": "input_records",
    "internal.metrics.shuffle.read.recordsRead": "shuffle_read_records",
    "internal.metrics.shuffle.write.recordsWritten": "shuffle_write_records",
    "internal.metrics.shuffle.write.bytesWritten": "shuffle_write_bytes",
    "internal.metrics.executorRunTime": "executor_run_ms",
}
_PLUMBING_SCOPES = ("WholeStageCodegen", "mapPartitionsInternal", "InputAdapter")


def _stage_detail(info: dict[str, Any]) -> dict[str, Any]:
    """The plan operators a stage ran (from its RDD scopes) and its record counts."""
    operators: list[str] = []
    for rdd in info.get("RDD Info", []):
        with contextlib.suppress(ValueError, TypeError):
            name = json.loads(rdd.get("Scope") or "{}").get("name", "")
            if name and not name.startswith(_PLUMBING_SCOPES) and name not in operators:
                operators.append(name)
    metrics = {}
    for accumulable in info.get("Accumulables", []):
        key = _STAGE_METRICS.get(accumulable.get("Name", ""))
        if key is not None:
            with contextlib.suppress(ValueError, TypeError):
                metrics[key] = int(accumulable.get("Value"))
    return {"operators": sorted(operators), **metrics}


def stage_times(event_log_dir: Path, since: float, until: float) -> list[dict[str, Any]]:
    """Completed Spark stages between ``since`` and ``until`` (epoch s), from the JSON event log."""
    stages: list[dict[str, Any]] = []
    # Spark 4 rolls event logs by default: eventlog_v2_<app id>/events_<n>_<app id>.
    for path in sorted(p for p in event_log_dir.rglob("*") if p.is_file()):
        with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if '"SparkListenerStageCompleted"' not in line:
                    continue
                try:
                    info = json.loads(line)["Stage Info"]
                except (ValueError, KeyError):
                    continue
                submitted, completed = info.get("Submission Time"), info.get("Completion Time")
                if not submitted or not completed or not since <= completed / 1000.0 <= until:
                    continue
                stages.append(
                    {
                        "stage_id": info.get("Stage ID"),
                        "name": info.get("Stage Name"),
                        "tasks": info.get("Number of Tasks"),
                        "seconds": round((completed - submitted) / 1000.0, 3),
                        "completed_at": completed / 1000.0,
                        "failed": bool(info.get("Failure Reason")),
                        **_stage_detail(info),
                    }
                )
    return stages


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
def topic_records(bootstrap: str, topic: str) -> int:
    """The number of records in ``topic`` (sum of end offsets; the topics are fresh)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = 0
        for partition in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def sample_payloads(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Up to ``count`` payloads from the start of ``topic``."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < count and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=count, timeout=1.0):
                if message.error() is None and message.value():
                    values.append(message.value())
    finally:
        consumer.close()
    return values[:count]


def run_campaign(
    spark: Any, cfg: CarouselConfig, name: str, bootstrap: str, event_log: Path, timer: CampaignStepTimer
) -> dict[str, Any]:
    from jobs import campaign as campaign_job

    channel = cfg.campaign(name).channel
    broker.ensure_topics(cfg.kafka, [channel])
    topic = cfg.kafka.topic(channel).name
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    load_before = common.load1()
    log.info("campaign %s (run %s) onto %s", name, run_id, topic)
    wall_start = time.time()
    timer.start()
    started = time.perf_counter()
    try:
        counts = campaign_job.run(spark, cfg, name, run_id=run_id)
    finally:
        seconds = time.perf_counter() - started
        timer.stop()
    wall_end = time.time()
    on_topic = topic_records(bootstrap, topic)
    samples = sample_payloads(bootstrap, topic, SAMPLE_PAYLOADS)
    mean_bytes = sum(len(v) for v in samples) / len(samples) if samples else 0.0
    stages = stage_times(event_log, wall_start, wall_end)
    for stage in stages:
        stage["step"] = timer.step_of(stage["completed_at"])
    by_step: dict[str, float] = {}
    for stage in stages:
        by_step[stage["step"]] = round(by_step.get(stage["step"], 0.0) + stage["seconds"], 3)
    payloads = int(counts.get("payloads", 0))
    result = {
        "campaign": name,
        "compression": cfg.kafka.producer.compression_type,
        "bytes_on_disk": topic_bytes_on_disk(Path(cfg.broker.state_dir), topic),
        "channel": channel,
        "run_id": run_id,
        "topic": topic,
        "counts": counts,
        "records_on_topic": on_topic,
        "topic_matches_payloads": on_topic == payloads,
        "seconds": round(seconds, 3),
        "payloads_per_s": round(payloads / seconds, 1) if seconds > 0 else None,
        "users_per_s": round(int(counts.get("users", 0)) / seconds, 1) if seconds > 0 else None,
        "mean_payload_bytes": round(mean_bytes, 1),
        "steps_s": timer.summary(),
        "stage_seconds_by_step": by_step,
        "top_stages": sorted(stages, key=lambda s: -s["seconds"])[:15],
        "stages": len(stages),
        "load_1min": [load_before, common.load1()],
    }
    result["_samples"] = samples
    log.info(
        "campaign: %s in %.1f s = %s payloads/s; %d on the topic; steps %s",
        counts,
        seconds,
        result["payloads_per_s"],
        on_topic,
        result["steps_s"],
    )
    return result


def topic_bytes_on_disk(broker_state: Path, topic: str) -> int:
    """Bytes of ``topic``'s log segments in the private broker's data folder (what the producer's
    compression leaves on the wire and on disk)."""
    return sum(f.stat().st_size for f in broker_state.glob(f"data/**/{topic}-*/*.log") if f.is_file())


def run_ceiling(
    spark: Any, cfg: CarouselConfig, channel: str, records: int, samples: Sequence[bytes], bootstrap: str
) -> dict[str, Any]:
    """``records`` pre-rendered payloads written with the campaign's own Kafka writer (and its
    ``kafka.producer`` settings, compression included).

    The records cycle through ``samples`` (real payloads from the campaign's topic), each made unique
    by a 12-digit prefix field. Consecutive records differ as consecutive payloads do, so a
    compressed batch shrinks about as much as the campaign's own (copies of one payload would
    compress many times better and overstate the ceiling)."""
    from pyspark.sql import functions as F

    from carousel.delivery import write_payloads

    broker.ensure_topics(cfg.kafka, [channel])
    topic = cfg.kafka.topic(channel).name
    bodies = []
    for sample in samples:
        text = sample.decode("utf-8", errors="replace")
        bodies.append(text[1:] if text.startswith("{") else json.dumps({"payload": text})[1:])
    partitions = max(1, spark.sparkContext.defaultParallelism)
    samples_frame = spark.createDataFrame(list(enumerate(bodies)), "sample long, body string")
    body = F.col("body")
    frame = (
        spark.range(0, records, numPartitions=partitions)
        .withColumn("sample", F.col("id") % len(bodies))
        .join(F.broadcast(samples_frame), "sample")
    ).select(
        F.lit(topic).alias("topic"),
        F.format_string("u-%07d", F.col("id")).alias("key"),
        F.concat(F.lit('{"seq":'), F.format_string("%012d", F.col("id")), F.lit(","), body).alias("value"),
        F.format_string("p-%012d", F.col("id")).alias("payload_id"),
    )
    mean_bytes = sum(len(b) for b in bodies) / len(bodies) + 21
    load_before = common.load1()
    log.info("ceiling: %d pre-rendered records of ~%d bytes onto %s", records, mean_bytes, topic)
    started = time.perf_counter()
    write_payloads(frame, cfg)
    seconds = time.perf_counter() - started
    on_topic = topic_records(bootstrap, topic)
    result = {
        "topic": topic,
        "compression": cfg.kafka.producer.compression_type,
        "bytes_on_disk": topic_bytes_on_disk(Path(cfg.broker.state_dir), topic),
        "records": records,
        "records_on_topic": on_topic,
        "distinct_bodies": len(bodies),
        "record_bytes": round(mean_bytes),
        "seconds": round(seconds, 3),
        "payloads_per_s": round(records / seconds, 1) if seconds > 0 else None,
        "load_1min": [load_before, common.load1()],
    }
    log.info("ceiling: %d records in %.1f s = %s/s", records, seconds, result["payloads_per_s"])
    return result


def extrapolation(campaign: dict[str, Any]) -> dict[str, Any]:
    """Linear extrapolation of the campaign's time to :data:`GOAL_USERS` users."""
    users = int(campaign["counts"].get("users", 0))
    if not users:
        return {}
    seconds_10m = campaign["seconds"] * GOAL_USERS / users
    return {
        "users": GOAL_USERS,
        "estimated_seconds": round(seconds_10m, 1),
        "goal_seconds": GOAL_SECONDS,
        "meets_goal": seconds_10m <= GOAL_SECONDS,
        "speedup_needed": round(seconds_10m / GOAL_SECONDS, 2),
        "users_per_s_needed": round(GOAL_USERS / GOAL_SECONDS, 1),
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def print_summary(results: dict[str, Any]) -> None:
    machine = results.get("machine", {})
    common.print_header(results, "campaign")
    campaign = results.get("campaign")
    if campaign:
        counts = campaign["counts"]
        print(
            f"campaign {campaign['campaign']}: users {counts.get('users'):,}, "
            f"payloads {counts.get('payloads'):,}, control {counts.get('control'):,}, "
            f"without items {counts.get('without_items'):,}; {campaign['seconds']:.1f} s = "
            f"{campaign['payloads_per_s']:,.0f} payloads/s ({campaign['users_per_s']:,.0f} users/s); "
            f"mean payload {campaign['mean_payload_bytes']:,.0f} B "
            f"({campaign['bytes_on_disk'] / max(1, campaign['records_on_topic']):,.0f} B on disk, "
            f"{campaign['compression']}); "
            f"topic holds {campaign['records_on_topic']:,}; "
            f"peak RSS of all its processes {campaign.get('peak_rss_bytes', 0) / 2**30:.1f} GiB"
        )
        for step, seconds in sorted(campaign["steps_s"].items(), key=lambda kv: -kv[1]):
            stage = campaign["stage_seconds_by_step"].get(step)
            print(f"    {step:<48} {seconds:>8.1f} s" + (f"  (stages {stage:.1f} s)" if stage else ""))
        for stage in campaign["top_stages"][:5]:
            print(
                f"    stage {stage['stage_id']:>4} {stage['seconds']:>7.1f} s  "
                f"{stage['tasks']:>4} tasks  {stage['step']}: {', '.join(stage.get('operators', []))[:60]}"
            )
    for key, label in (
        ("ceiling", "ceiling (pre-rendered)"),
        ("ceiling_uncompressed", "  same, compression none"),
    ):
        ceiling = results.get(key)
        if ceiling:
            print(
                f"{label:<25} {ceiling['records']:,} records of {ceiling['record_bytes']:,} B in "
                f"{ceiling['seconds']:.1f} s = {ceiling['payloads_per_s']:,.0f}/s "
                f"({ceiling['bytes_on_disk'] / max(1, ceiling['records_on_topic']):,.0f} B on disk, "
                f"{ceiling['compression']})"
            )
    if results.get("ratio_to_ceiling") is not None:
        print(f"campaign / ceiling        {results['ratio_to_ceiling']:.3f}")
    goal = results.get("extrapolation_10m")
    if goal:
        verdict = "met" if goal["meets_goal"] else f"needs {goal['speedup_needed']}x"
        print(
            f"10,000,000 users          ~{goal['estimated_seconds'] / 60:.1f} min at this rate "
            f"(goal 10 min: {verdict})"
        )
    print(
        f"load avg (1 min)          start {machine.get('loadavg_at_start')}, "
        f"end {results.get('loadavg_at_end')}"
    )
    common.print_footer(results)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = apply_quick(build_parser().parse_args(argv), QUICK)
    workdir, temp = common.make_workdir(args.workdir, "carousel-campaign-bench-")
    event_log = workdir / "spark-events"
    event_log.mkdir(exist_ok=True)
    shop_root = Path(args.shop_root).resolve()
    sizes = sizes_from_args(args)
    settings = {
        "campaign": args.campaign,
        "shop_root": str(shop_root),
        "shop_sizes": sizes.__dict__,
        "driver_memory": args.driver_memory,
        "cluster_workers": args.cluster_workers,
        "config_overrides": list(args.overrides),
        "workdir": str(workdir),
    }
    results = common.start_results("campaign", argv, settings)
    suffix = uuid.uuid4().hex[:6]
    ports = common.broker_overrides(workdir / "kafka")
    broker_cfg = _config(args, [*ports, "broker.heap=1g"])
    with (
        contextlib.ExitStack() as stack,
        common.bench_run(results, broker_cfg.broker, args.output, workdir if temp else None) as state,
    ):
        bootstrap = state.bootstrap

        def phase_config(name: str, extra: Sequence[str] = ()) -> CarouselConfig:
            topics = common.phase_topics(broker_cfg.kafka.topics, name, suffix)
            return _config(
                args,
                [
                    *ports,
                    f"kafka.bootstrap_servers={bootstrap}",
                    *topics,
                    f"storage.root={workdir / name}",
                    *extra,
                ],
            )

        shop_cfg = _config(args, [f"storage.root={shop_root}"])
        # Stage times are read back from the event log (plain JSON lines).
        event_log_conf = {
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": event_log.as_uri(),
            "spark.eventLog.compress": "false",
        }
        master, cluster_conf = "local[2]", {}
        if args.cluster_workers > 0:
            master = stack.enter_context(
                standalone_cluster(args.cluster_workers, 1, args.executor_memory, workdir / "cluster")
            )
            cluster_conf = {
                # The executors run this checkout's code with this interpreter, as local mode does.
                "spark.executorEnv.PYTHONPATH": str(PROJECT_ROOT),
                PYTHON_DAEMON_MODULE: LOCAL_PYTHON_DAEMON,
                "spark.executor.cores": "1",
                "spark.executor.memory": args.executor_memory,
                "spark.cores.max": str(args.cluster_workers),
                "spark.default.parallelism": str(args.cluster_workers),
            }
        spark = state.shop_session(
            shop_cfg,
            "carousel-bench-campaign",
            workdir / "warehouse",
            {**event_log_conf, **cluster_conf},
            master=master,
        )
        results["session"] = {
            key: spark.conf.get(key, None)
            for key in ("spark.driver.memory", "spark.sql.shuffle.partitions", "spark.sql.adaptive.enabled")
        }
        results["shop"] = ensure_shop(spark, shop_cfg, sizes, force=args.rebuild_shop)

        campaign_cfg = phase_config("campaign")
        link_shop(shop_root, campaign_cfg.storage.root)
        timer = CampaignStepTimer()
        with timer.installed(), common.PeakRss() as memory:
            campaign = run_campaign(spark, campaign_cfg, args.campaign, bootstrap, event_log, timer)
        # Everything this run started: driver JVM, Python workers, cluster processes, the broker.
        campaign["peak_rss_bytes"] = memory.peak_bytes
        samples = campaign.pop("_samples")
        results["campaign"] = campaign
        results["extrapolation_10m"] = extrapolation(campaign)
        payloads = int(campaign["counts"].get("payloads", 0))
        if not args.skip_ceiling and payloads and samples:
            ceiling = run_ceiling(
                spark, phase_config("ceiling"), campaign["channel"], payloads, samples, bootstrap
            )
            results["ceiling"] = ceiling
            if ceiling["payloads_per_s"] and campaign["payloads_per_s"]:
                results["ratio_to_ceiling"] = round(campaign["payloads_per_s"] / ceiling["payloads_per_s"], 4)
            if campaign_cfg.kafka.producer.compression_type != "none":
                # What the compression buys: the same ceiling, uncompressed.
                plain = phase_config("ceiling-plain", ["kafka.producer.compression_type=none"])
                results["ceiling_uncompressed"] = run_ceiling(
                    spark, plain, campaign["channel"], payloads, samples, bootstrap
                )
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
