"""Outage soak: ``ingest`` and ``serve`` run for minutes under steady traffic while the broker and
the online store are stopped and started again, cycle after cycle.

Role: the soak behind the fault tests (``tests/test_broker_outage.py``, the outage test of
``tests/test_serve.py``): the same jobs, as real ``./spark-submit.sh`` processes with their
production defaults (supervision, client timeouts), for longer and repeatedly. Inputs: the shop
(``bench.shop_data``, the quick one by default: its catalog and published matrix), the trigger
rate, the outage length, the number of cycles, the window after each outage. What happens, on a
private broker, a private online store, fresh topics and a fresh storage root:

1. ``./spark-submit.sh ingest`` and ``./spark-submit.sh serve`` start as subprocesses with the
   same config (their /metrics on free ports); once both log that their query starts, a
   :class:`~bench.serving_traffic.MixedProducer` sends ``--rate`` App Launched triggers/s, each
   after 4 item events of the same user, for the whole run;
2. **baseline**: ``--window`` s of traffic without a fault: the ceiling, the same jobs and
   traffic on the same machine in the same run;
3. each of ``--cycles`` cycles: the broker is stopped for ``--outage`` s and started again on its
   data, then ``--window`` s of traffic; then the online store likewise;
4. the traffic stops; the bench waits (at most ``--drain-timeout`` s) until every trigger has its
   payload and ingest has read everything, then asks both jobs to stop (the stop marker beside
   their checkpoints) and waits for them to exit.

Figures: per phase, trigger -> payload latency (p50/p99; send time to broker append time, a
trigger without a payload is infinitely late) of the triggers sent in it, but its last 5 s (in
flight when the next fault came); per outage, serve's
``recovered_s`` (from the component's restart until every later second of triggers has p99 under
the goal: 1 s, or twice the baseline p99 when that is higher) and ingest's (until a micro-batch has
completed after the restart and its Kafka lag is back to the baseline's largest), null when that
did not happen within the window ("not within the window"); supervised
restarts per job (/metrics and logs). At the end, the counts that must hold: every event produced
is in the ``events`` table once (missing, duplicated), nothing quarantined, every trigger answered;
payload records delivered twice (a replayed batch, the same payload id) are counted, not failed.
Ratios: each outage window's p99 after recovery against the baseline's.

    .venv/bin/python -m bench.outage_bench             # 2 cycles, 20 s outages, 60 s windows (~8 min)
    .venv/bin/python -m bench.outage_bench --quick     # 1 cycle, 15 s outages, 30 s windows (~4 min)
    make bench-outage
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import common, serving_store
from bench.serving_recovery import caught_up_after
from bench.serving_traffic import (
    PAYLOAD_TRIGGER_ID,
    MixedProducer,
    PayloadConsumer,
    create_topic,
    latency_figures,
)
from bench.shop_data import QUICK_SHOP_ROOT, ensure_shop, sizes_from_args
from carousel import broker, online_store_server
from carousel.cli import setup_logging
from carousel.config import PROJECT_ROOT, CarouselConfig
from carousel.query_lifecycle import STOP_MARKER_NAME
from carousel.schemas import (
    CATALOG_TABLE,
    EVENTS_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    PUSH,
    QUARANTINE_TABLE,
)

log = logging.getLogger("bench.outage")

PHASE = "soak"
LATENCY_GOAL_S = 1.0
# A window's figures end this long before the next fault (its last triggers were in flight when
# it came): those triggers count in the next window's, which starts there.
SETTLE_S = 5.0
JOBS = ("ingest", "serve")
# The shop tables the jobs only read; events and profiles are ingest's own, fresh.
READ_ONLY_TABLES = (CATALOG_TABLE, ITEM_RECOMMENDATIONS_TABLE)
QUICK = {"cycles": 1, "outage": 15.0, "window": 30.0}


def build_parser() -> argparse.ArgumentParser:
    parser = common.bench_parser("outage", __doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="triggers/s, each after 4 item events (20)")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds each component stays down (20)")
    parser.add_argument(
        "--cycles", type=int, default=2, help="cycles of a broker and an online-store outage (2)"
    )
    parser.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="seconds of traffic before the first outage and after each (60)",
    )
    parser.add_argument("--partitions", type=int, default=2, help="events topic partitions (2)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="for the jobs' start (300)")
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="for the last payloads (300)")
    parser.add_argument("--store-max-memory", default="1gb", help="the online store's maxmemory (1gb)")
    parser.add_argument("--quick", action="store_true", help="1 cycle, 15 s outages, 30 s windows")
    common.add_run_args(parser, "bench/results/outage.json", "work folder (default: a temp folder, removed)")
    # The quick shop of the serving benchmark: the soak needs a catalog and a matrix, not scale.
    parser.set_defaults(shop_root=QUICK_SHOP_ROOT, users=20_000, items=5_000, events=50_000)
    return parser


# ---------------------------------------------------------------------------------------------
# The jobs as subprocesses, and their /metrics
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One ``./spark-submit.sh <name>`` subprocess, its log and its /metrics port."""

    name: str
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def start(self, config_files: Sequence[str], overrides: Sequence[str]) -> None:
        files = [arg for name in config_files for arg in ("--config", name)]
        sets = [arg for item in overrides for arg in ("--set", item)]
        command = [str(PROJECT_ROOT / "spark-submit.sh"), self.name, *files, *sets]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=PROJECT_ROOT,
            )
        log.info("%s started as pid %d, log %s", self.name, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_started(self, query_name: str, timeout: float) -> None:
        """Until the job logs "starting <query name> " (its query is about to run)."""
        marker = f"starting {query_name} ".encode()
        deadline = time.monotonic() + timeout
        while marker not in self.log_path.read_bytes():
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.proc and self.proc.returncode}: {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not start its query within {timeout:.0f} s: {self.log_path}"
                )
            time.sleep(0.2)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        """This job's /metrics now (None while it does not answer)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
            ) as response:
                text = response.read().decode()
        except OSError:
            return None
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self, marker: Path, timeout: float = 120) -> str:
        """Ask the job to stop between micro-batches; SIGKILL after ``timeout``. How it ended."""
        if not self.alive():
            return f"had exited with {self.proc and self.proc.returncode}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("stop requested by bench.outage_bench\n")
        assert self.proc is not None
        try:
            return f"stop request, exit status {self.proc.wait(timeout=timeout)}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            return f"SIGKILL after {timeout:.0f} s"

    def restarts_logged(self) -> int:
        return self.log_path.read_bytes().count(b"failed with a transient error")


def _metric(samples: dict[Any, float] | None, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    if samples is None:
        return None
    values = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    return sum(values) if values else None


class Sampler:
    """Every second, each job's Kafka lag, finished micro-batches and restarts (a thread)."""

    def __init__(self, jobs: dict[str, Job], queries: dict[str, str]) -> None:
        self.jobs, self.queries = jobs, queries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-outage-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for name, job in self.jobs.items():
                samples = job.scrape()
                query = self.queries[name]
                job.samples.append(
                    {
                        "t": time.time(),
                        "up": samples is not None,
                        "lag": _metric(samples, "carousel_query_kafka_offsets_behind_latest", query=query),
                        "batches": _metric(samples, "carousel_query_batches_total", query=query),
                        "restarts": _metric(samples, "carousel_query_restarts_total", query=query),
                    }
                )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def ingest_recovered_s(samples: list[dict[str, Any]], up_at: float, lag_goal: float) -> float | None:
    """Seconds from ``up_at`` until a micro-batch finished after it and the lag was at most ``lag_goal``."""
    before = [s["batches"] for s in samples if s["t"] < up_at and s["batches"] is not None]
    batches_then = before[-1] if before else 0.0
    for sample in samples:
        if sample["t"] < up_at or sample["batches"] is None or sample["lag"] is None:
            continue
        if sample["batches"] > batches_then and sample["lag"] <= lag_goal:
            return round(sample["t"] - up_at, 1)
    return None


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
def _sent_between(producer: MixedProducer, since: float, until: float) -> dict[str, float]:
    return {key: at for key, at in dict(producer.sent).items() if since <= at < until}


def phase_figures(
    producer: MixedProducer, consumer: PayloadConsumer, since: float, until: float
) -> dict[str, Any]:
    figures = latency_figures(_sent_between(producer, since, until), dict(consumer.received), "")
    return {key: figures[key] for key in ("triggers", "delivered", "missing", "p50_s", "p99_s", "max_s")}


def _outage(
    component: str,
    down: Any,
    up: Any,
    outage_s: float,
    window_s: float,
    jobs: dict[str, Job],
) -> dict[str, Any]:
    """Stop ``component`` for ``outage_s``, start it again, keep the traffic on for ``window_s``."""
    down_at = time.time()
    down()
    log.info("%s stopped for %.0f s", component, outage_s)
    time.sleep(outage_s)  # the scenario's timing, not a synchronisation
    up()
    up_at = time.time()
    log.info("%s started again (down %.1f s); %.0f s of traffic follow", component, up_at - down_at, window_s)
    time.sleep(window_s)
    # The latency figures come after the drain, when every payload is in.
    return {
        "component": component,
        "down_at": down_at,
        "up_at": up_at,
        "ended_at": time.time(),
        "down_s": round(up_at - down_at, 1),
        "jobs_alive": {name: job.alive() for name, job in jobs.items()},
    }


def _event_ids(producer: MixedProducer) -> set[str]:
    """Every event id the producer sent: each trigger and its item events."""
    return {f"{trigger}.{k}" for trigger in producer.sent for k in range(producer.profile_events)} | set(
        producer.sent
    )


def _table_checks(spark: Any, cfg: CarouselConfig, produced: set[str]) -> dict[str, Any]:
    events = spark.read.format("delta").load(cfg.storage.table(EVENTS_TABLE)).select("event_id")
    stored = [row.event_id for row in events.collect()]
    distinct = set(stored)
    quarantine = Path(cfg.storage.table(QUARANTINE_TABLE), "_delta_log")
    quarantined = (
        spark.read.format("delta").load(cfg.storage.table(QUARANTINE_TABLE)).count()
        if quarantine.is_dir()
        else 0
    )
    return {
        "events_produced": len(produced),
        "events_stored": len(stored),
        "events_missing": len(produced - distinct),
        "events_duplicated": len(stored) - len(distinct),
        "events_unexpected": len(distinct - produced),
        "quarantined": quarantined,
    }


def _stored_events(spark: Any, cfg: CarouselConfig) -> int:
    location = cfg.storage.table(EVENTS_TABLE)
    if not Path(location, "_delta_log").is_dir():
        return 0
    return spark.read.format("delta").load(location).select("event_id").distinct().count()


def _drain(
    spark: Any,
    cfg: CarouselConfig,
    producer: MixedProducer,
    consumer: PayloadConsumer,
    jobs: dict[str, Job],
    timeout: float,
) -> dict[str, Any]:
    """Wait until every trigger has a payload and the events table holds as many distinct events as
    were produced (at most ``timeout`` s, and while both jobs run); the exact checks (missing,
    duplicated, quarantined) come after the jobs have stopped."""
    started = time.monotonic()
    produced = len(_event_ids(producer))
    answered = stored = False
    while time.monotonic() - started < timeout and all(job.alive() for job in jobs.values()):
        answered = answered or set(producer.sent) <= set(consumer.received)
        stored = stored or _stored_events(spark, cfg) >= produced
        if answered and stored:
            break
        time.sleep(5.0)  # a Delta count each time: not too often on 2 cores
    return {
        "seconds": round(time.monotonic() - started, 1),
        "answered": answered,
        "events_stored": stored,
        "jobs_alive": {name: job.alive() for name, job in jobs.items()},
    }


def run_soak(
    args: argparse.Namespace,
    spark: Any,
    cfg: CarouselConfig,
    broker_cfg: Any,
    overrides: list[str],
    workdir: Path,
) -> dict[str, Any]:
    """The soak itself (see the module docstring), on a running broker and online store."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ports = {"ingest": cfg.metrics.ports["ingest"], "serve": cfg.metrics.ports["serve"]}
    jobs = {name: Job(name, ports[name], logs / f"{name}.log") for name in JOBS}
    queries = {"ingest": cfg.ingest.query_name, "serve": cfg.serving.query_name}
    bootstrap = cfg.kafka.bootstrap_servers
    push_topic = cfg.kafka.topic(PUSH).name
    create_topic(bootstrap, cfg.kafka.topic("events").name, args.partitions)
    create_topic(bootstrap, push_topic, cfg.kafka.topic(PUSH).partitions, log_append_time=True)
    broker.ensure_topics(cfg.kafka)
    consumer = PayloadConsumer(bootstrap, push_topic, PAYLOAD_TRIGGER_ID)
    producer = MixedProducer(bootstrap, cfg.kafka.topic("events").name, args.users, args.items, args.seed + 3)
    result: dict[str, Any] = {}
    sampler: Sampler | None = None
    stop_traffic = threading.Event()
    traffic: threading.Thread | None = None
    try:
        for job in jobs.values():
            job.start(list(args.config), overrides)
        for name, job in jobs.items():
            job.wait_started(queries[name], args.start_timeout)
        sampler = Sampler(jobs, queries)
        traffic, stop_traffic = producer.start(PHASE, args.rate, 24 * 3600.0)
        traffic_at = time.time()
        deadline = time.monotonic() + args.start_timeout
        while not consumer.received:
            if time.monotonic() > deadline or not jobs["serve"].alive():
                raise RuntimeError(f"no payload within {args.start_timeout:.0f} s: {jobs['serve'].log_path}")
            time.sleep(0.2)
        first_payload_s = round(min(consumer.received.values()) - traffic_at, 2)
        log.info("first payload after %.1f s; %.0f s of baseline traffic", first_payload_s, args.window)
        baseline_from = time.time()
        time.sleep(args.window)  # the baseline window: the scenario's timing
        baseline_to = time.time()
        result["baseline"] = {
            "first_payload_s": first_payload_s,
            "ingest_max_lag": max(
                (
                    s["lag"]
                    for s in jobs["ingest"].samples
                    if baseline_from <= s["t"] <= baseline_to and s["lag"]
                ),
                default=0,
            ),
        }
        outages = []
        for cycle in range(args.cycles):
            outages.append(
                _outage(
                    "broker",
                    lambda: broker.stop(broker_cfg),
                    lambda: broker.start(broker_cfg),
                    args.outage,
                    args.window,
                    jobs,
                )
            )
            outages.append(
                _outage(
                    "online store",
                    lambda: online_store_server.stop(cfg.online_store),
                    lambda: online_store_server.start(cfg.online_store),
                    args.outage,
                    args.window,
                    jobs,
                )
            )
            log.info("cycle %d of %d done", cycle + 1, args.cycles)
        stop_traffic.set()
        traffic.join(timeout=120)
        result["traffic"] = {
            "triggers": len(producer.sent),
            "records": producer.records,
            "producer_errors": producer.errors[:5],
        }
        result["drain"] = _drain(spark, cfg, producer, consumer, jobs, args.drain_timeout)
        sampler.close()
        # serve's outcomes (payloads, no_items, skipped_*, dead_letter): why a trigger has no payload.
        outcomes = jobs["serve"].scrape() or {}
        result["serve_outcomes"] = {
            dict(labels)["outcome"]: value
            for (name, labels), value in outcomes.items()
            if name == "carousel_query_records_total" and ("query", queries["serve"]) in labels
        }
        # Every payload is in now: the latency of each phase. Each window ends SETTLE_S before
        # the next fault (its last triggers were in flight when it came) and the next window
        # starts there, so every trigger is in one window. The baseline's steady second half,
        # after the jobs' warm-up, is the ceiling; "after_recovery" an outage window's second half.
        result["baseline"]["p99_per_second"] = caught_up_after(
            dict(producer.sent),
            dict(consumer.received),
            baseline_from,
            baseline_to - SETTLE_S,
            LATENCY_GOAL_S,
        )["p99_per_second"]
        result["baseline"]["latency"] = phase_figures(
            producer, consumer, baseline_from, baseline_to - SETTLE_S
        )
        steady_from = baseline_from + args.window / 2
        result["baseline"]["steady"] = phase_figures(producer, consumer, steady_from, baseline_to - SETTLE_S)
        window_from = baseline_to - SETTLE_S
        for outage in outages:
            until = outage["ended_at"] - SETTLE_S
            outage["latency"] = phase_figures(producer, consumer, window_from, until)
            outage["after_recovery"] = phase_figures(
                producer, consumer, outage["up_at"] + args.window / 2, until
            )
            window_from = until
        baseline_p99 = result["baseline"]["steady"]["p99_s"] or LATENCY_GOAL_S
        goal = max(LATENCY_GOAL_S, 2 * baseline_p99)
        lag_goal = max(result["baseline"]["ingest_max_lag"], args.rate * 5)
        for outage in outages:
            recovered = caught_up_after(
                dict(producer.sent),
                dict(consumer.received),
                outage["up_at"],
                outage["ended_at"] - SETTLE_S,
                goal,
            )
            outage["serve_recovered_s"] = recovered["caught_up_s"]
            outage["p99_per_second_after_restart"] = recovered["p99_per_second"]
            received_after = [t for t in dict(consumer.received).values() if t >= outage["up_at"]]
            outage["first_payload_after_restart_s"] = (
                round(min(received_after) - outage["up_at"], 2) if received_after else None
            )
            outage["ingest_recovered_s"] = ingest_recovered_s(
                jobs["ingest"].samples, outage["up_at"], lag_goal
            )
            after = outage["after_recovery"]["p99_s"]
            outage["p99_after_recovery_vs_baseline"] = round(after / baseline_p99, 2) if after else None
        result["outages"] = outages
        result["latency_goal_s"] = goal
        result["whole_run"] = phase_figures(producer, consumer, 0, time.time())
        result["payload_records_delivered_twice"] = consumer.duplicates
    finally:
        stop_traffic.set()
        if sampler is not None:
            sampler.close()
        checkpoints = {"ingest": cfg.ingest.query_name, "serve": cfg.serving.query_name}
        result["stopped"], result["restarts"] = {}, {}
        for name, job in jobs.items():  # each on its own: one failing to stop leaves no other running
            try:
                result["stopped"][name] = job.stop(
                    Path(cfg.storage.checkpoint(checkpoints[name]), STOP_MARKER_NAME)
                )
                result["restarts"][name] = {
                    "logged": job.restarts_logged(),
                    "metrics": max((s["restarts"] or 0 for s in job.samples), default=0),
                }
            except (OSError, subprocess.SubprocessError) as err:
                log.warning("%s: could not stop it or read its log: %s", name, err)
                result["stopped"][name] = f"error: {err}"
        consumer.close()
    result["tables"] = _table_checks(spark, cfg, _event_ids(producer))
    return result


# ---------------------------------------------------------------------------------------------
# Summary and entry point
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, unit: str = " s") -> str:
    return "-" if value is None else f"{value}{unit}"


def _recovery(seconds: float | None) -> str:
    return "not within the window" if seconds is None else f"in {seconds} s"


def print_summary(results: dict[str, Any]) -> None:
    common.print_header(results, "outage soak")
    soak = results.get("soak", {})
    base = soak.get("baseline", {})
    if "steady" in base:
        latency = base["latency"]
        print(
            f"baseline: {latency['triggers']} triggers, p50 {_fmt(latency['p50_s'])}, "
            f"p99 {_fmt(latency['p99_s'])}; "
            f"its steady second half (the ceiling) p99 {_fmt(base['steady']['p99_s'])}; "
            f"ingest lag at most {base['ingest_max_lag']}"
        )
    for outage in soak.get("outages", []):
        latency, after = outage["latency"], outage["after_recovery"]
        print(
            f"{outage['component']:>12} down {outage['down_s']} s: first payload "
            f"{_fmt(outage['first_payload_after_restart_s'])} after its restart, serve recovered "
            f"{_recovery(outage['serve_recovered_s'])}, ingest {_recovery(outage['ingest_recovered_s'])}; "
            f"p99 during+after {_fmt(latency['p99_s'])}, after recovery {_fmt(after['p99_s'])} "
            f"({_fmt(outage['p99_after_recovery_vs_baseline'], 'x')} baseline); "
            f"jobs alive {outage['jobs_alive']}"
        )
    if "tables" in soak:
        tables, whole = soak["tables"], soak.get("whole_run", {})
        print(
            f"events: {tables['events_produced']} produced, {tables['events_stored']} stored, "
            f"{tables['events_missing']} missing, {tables['events_duplicated']} duplicated, "
            f"{tables['quarantined']} quarantined"
        )
        print(
            f"triggers: {whole.get('triggers')} sent, {whole.get('missing')} without a payload, "
            f"{soak.get('payload_records_delivered_twice')} payload records delivered twice (same id)"
        )
        print(f"restarts: {soak.get('restarts')}; stopped: {soak.get('stopped')}")
    common.print_footer(results)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    workdir, temp = common.make_workdir(args.workdir, "carousel-outage-bench-")
    sizes = sizes_from_args(args)
    settings = {
        "rate": args.rate,
        "outage_s": args.outage,
        "cycles": args.cycles,
        "window_s": args.window,
        "events_partitions": args.partitions,
        "profile_events_per_trigger": 4,
        "shop_root": str(Path(args.shop_root).resolve()),
        "shop_sizes": sizes.__dict__,
        "config_overrides": list(args.overrides),
        "workdir": str(workdir),
    }
    results = common.start_results("outage", argv, settings)
    ports = common.broker_overrides(workdir / "kafka")
    store = serving_store.store_overrides(workdir / "redis", args.store_max_memory)
    head = ["spark.master=local[2]", "spark.shuffle_partitions=4"]
    broker_cfg = common.bench_config(args, head, [*ports, "broker.heap=1g"], log)
    with common.bench_run(results, broker_cfg.broker, args.output, workdir if temp else None) as state:
        required = [
            *ports,
            f"kafka.bootstrap_servers={state.bootstrap}",
            *common.phase_topics(broker_cfg.kafka.topics, PHASE, uuid.uuid4().hex[:6]),
            f"kafka.topics.events.partitions={args.partitions}",
            f"storage.root={workdir / 'run'}",
            "serving.starting_offsets=earliest",
            f"metrics.ports.ingest={broker.free_port()}",
            f"metrics.ports.serve={broker.free_port()}",
            *store,
        ]
        cfg = common.bench_config(args, head, required, log)
        shop_cfg = common.bench_config(args, head, [f"storage.root={settings['shop_root']}", *store], log)
        spark = state.shop_session(shop_cfg, "carousel-bench-outage", workdir / "warehouse", {})
        results["shop"] = ensure_shop(spark, shop_cfg, sizes)
        tables = Path(cfg.storage.root, "tables")
        tables.mkdir(parents=True, exist_ok=True)
        for name in READ_ONLY_TABLES:
            os.symlink(Path(shop_cfg.storage.table(name)).resolve(), tables / name, target_is_directory=True)
        online_store_server.start(cfg.online_store)
        try:
            results["soak"] = run_soak(
                args, spark, cfg, broker_cfg.broker, [*head, *args.overrides, *required], workdir
            )
        finally:
            online_store_server.stop(cfg.online_store)
    print_summary(results)
    print(
        json.dumps(
            {k: v for k, v in results.get("soak", {}).items() if k != "outages"}, indent=2, default=str
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
