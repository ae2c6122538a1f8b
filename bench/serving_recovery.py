"""Recovery after a kill: ``./spark-submit.sh serve`` SIGKILLed under steady traffic, then restarted.

Role: the recovery figure of ``bench/serving_bench.py`` (not a benchmark itself). Inputs: the
run's config as files and ``--set`` overrides (so the subprocess loads exactly the bench's
config, as ``tests/test_serve.py`` passes its config to a subprocess), the private broker, the
running online store and the shop's sizes. What happens, on fresh topics and a fresh checkpoint:

1. ``serve`` starts as a subprocess in its own process group (a cold start: JVM, session,
   checks); once it logs that its query starts, a :class:`~bench.serving_traffic.MixedProducer`
   thread sends ``--recovery-rate`` triggers/s (each with its 4 item events) for the rest of the
   phase. The bench waits for the first payload and until the triggers of the last 5 s have p99 <
   1 s (at most 120 s), then keeps the traffic steady for ``--recovery-steady`` s;
2. the whole process group gets SIGKILL (driver JVM and Python driver; the Python workers' daemon
   leads its own group and exits when the JVM is gone), and ``serve`` is started again at once on
   the same checkpoint;
3. the bench waits for the first payload after the restart and until the last 5 s are back under
   the live goal (twice the steady p99 seen before the kill, at least 1 s), keeps the traffic on
   for ``--recovery-steady`` s more, waits for the last payloads and stops serve with a stop
   request (the marker beside its checkpoint; SIGKILL after 60 s).

Figures, from the restart (``t_restart`` = the second ``Popen``): ``query_started_s`` (the
subprocess logs "starting <query name>": JVM + session + checks), ``first_payload_s`` (the first
payload appended after ``t_restart``) and ``caught_up_s``: the triggers are grouped by the second
(from ``t_restart``) they were sent in; the last second whose p99 latency is at or above the goal
(or one of whose payloads never came) ends at ``caught_up_s``, and every later second stays under
it. The goal is 1 s, or 1.5 x the steady p99 before the kill when that was above 1 s (the steady
p99: the triggers sent in the steady period up to 5 s before the kill). Also: triggers without a
payload (``lost_triggers``), payloads delivered twice (the killed batch replayed with the same
payload ids), and the cold start's own figures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.serving_traffic import (
    PAYLOAD_TRIGGER_ID,
    MixedProducer,
    PayloadConsumer,
    create_topic,
    latency_figures,
    percentile,
)
from carousel import broker
from carousel.config import PROJECT_ROOT, CarouselConfig
from carousel.query_lifecycle import STOP_MARKER_NAME
from carousel.schemas import PUSH

log = logging.getLogger("bench.serving.recovery")

PHASE = "rec"
LATENCY_GOAL_S = 1.0
WINDOW_S = 5.0
# The last seconds before the kill are left out of its steady latency (their triggers were in flight).
SETTLE_S = 5.0


@dataclass(frozen=True)
class RecoveryRun:
    """What the recovery phase needs: the config (files + overrides, and loaded), traffic, limits."""

    cfg: CarouselConfig
    config_files: Sequence[str]
    overrides: Sequence[str]
    bootstrap: str
    partitions: int
    users: int
    items: int
    seed: int
    rate: float
    steady_s: float
    timeout_s: float
    logs: Path


def serve_command(run: RecoveryRun) -> list[str]:
    """``./spark-submit.sh serve`` with the bench's config: its files, then every override."""
    files = [arg for name in run.config_files for arg in ("--config", name)]
    sets = [arg for item in run.overrides for arg in ("--set", item)]
    return [str(PROJECT_ROOT / "spark-submit.sh"), "serve", *files, *sets]


def _start(run: RecoveryRun, label: str) -> tuple[subprocess.Popen[bytes], Path, float]:
    log_path = run.logs / f"serve-{label}.log"
    with open(log_path, "wb") as out:
        started = time.time()
        proc = subprocess.Popen(
            serve_command(run),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=PROJECT_ROOT,
        )
    log.info("recovery: serve (%s) started as pid %d, log %s", label, proc.pid, log_path)
    return proc, log_path, started


def _p99(sent: dict[str, float], received: dict[str, float], delivered_only: bool = False) -> float | None:
    """p99 latency of ``sent`` (a missing payload is infinitely late unless ``delivered_only``)."""
    latencies = [
        received[k] - t if k in received else float("inf")
        for k, t in sent.items()
        if k in received or not delivered_only
    ]
    return percentile(sorted(latencies), 0.99) if latencies else None


def _sent_between(producer: MixedProducer, since: float, until: float) -> dict[str, float]:
    return {k: t for k, t in dict(producer.sent).items() if since <= t < until}


def _wait_query_started(
    proc: subprocess.Popen[bytes], log_path: Path, query_name: str, timeout: float
) -> float:
    """When the subprocess logged "starting <query name> " (its query is about to run)."""
    marker = f"starting {query_name} ".encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: see {log_path}")
        if marker in log_path.read_bytes():
            return time.time()
        time.sleep(0.2)
    raise RuntimeError(f"serve did not start its query within {timeout:.0f} s: see {log_path}")


def _wait_steady(
    proc: subprocess.Popen[bytes],
    producer: MixedProducer,
    consumer: PayloadConsumer,
    since: float,
    timeout: float,
    goal_s: float,
) -> dict[str, Any]:
    """Wait for the first payload appended after ``since``, then until the triggers sent during the
    last 5 s (up to ``goal_s`` ago, so each one is decided) have p99 < ``goal_s``, at most
    ``timeout`` s after ``since``."""
    first_payload = None
    reached = False
    while time.time() < since + timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        now = time.time()
        if first_payload is None:
            after = [t for t in dict(consumer.received).values() if t >= since]
            first_payload = min(after) if after else None
        if first_payload is not None and now - first_payload > WINDOW_S:
            window = _sent_between(producer, now - goal_s - WINDOW_S, now - goal_s)
            p99 = _p99(window, dict(consumer.received))
            if p99 is not None and p99 < goal_s:
                reached = True
                break
        time.sleep(0.5)
    if not reached:
        log.warning("recovery: p99 not under %.2f s within %.0f s", goal_s, timeout)
    return {
        "first_payload_s": None if first_payload is None else round(first_payload - since, 2),
        "live_goal_s": round(goal_s, 3),
        "live_goal_reached": reached,
        "waited_s": round(time.time() - since, 2),
    }


def caught_up_after(
    sent: dict[str, float], received: dict[str, float], since: float, until: float, goal_s: float
) -> dict[str, Any]:
    """Per second of send time from ``since``: where the last second with p99 >= ``goal_s`` ends
    (``caught_up_s``), or None, with ``recovered`` false, when that is the window's last second:
    the window ended before the latency came back under the goal, which no number of seconds says."""
    buckets: dict[int, list[float]] = {}
    for key, at in sent.items():
        if since <= at < until:
            latency = received[key] - at if key in received else float("inf")
            buckets.setdefault(int(at - since), []).append(latency)
    worst = {second: percentile(sorted(v), 0.99) for second, v in sorted(buckets.items())}
    bad = [second for second, p99 in worst.items() if p99 is None or p99 >= goal_s]
    recovered = not bad or max(bad) < max(worst)
    return {
        "caught_up_s": ((max(bad) + 1) if bad else 0) if recovered else None,
        "recovered": recovered,
        "p99_per_second": [worst[s] for s in sorted(worst)],
    }


def _stop(proc: subprocess.Popen[bytes], cfg: CarouselConfig) -> str:
    marker = Path(cfg.storage.checkpoint(cfg.serving.query_name), STOP_MARKER_NAME)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("stop requested by bench.serving_bench\n")
    try:
        proc.wait(timeout=60)
        return "stop request"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return "SIGKILL after 60 s"


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def run_recovery(run: RecoveryRun) -> dict[str, Any]:
    """The kill-and-restart phase (see the module docstring)."""
    cfg, name = run.cfg, run.cfg.serving.query_name
    run.logs.mkdir(parents=True, exist_ok=True)
    push_topic = cfg.kafka.topic(PUSH).name
    create_topic(run.bootstrap, cfg.kafka.topic("events").name, run.partitions)
    create_topic(run.bootstrap, push_topic, cfg.kafka.topic(PUSH).partitions, log_append_time=True)
    broker.ensure_topics(cfg.kafka)
    consumer = PayloadConsumer(run.bootstrap, push_topic, PAYLOAD_TRIGGER_ID)
    producer = MixedProducer(
        run.bootstrap, cfg.kafka.topic("events").name, run.users, run.items, run.seed + 7
    )
    result: dict[str, Any] = {"rate": run.rate}
    stop_traffic = threading.Event()
    thread: threading.Thread | None = None
    first = second = None
    try:
        first, first_log, popen_at = _start(run, "first")
        started = _wait_query_started(first, first_log, name, run.timeout_s)
        # Traffic from the query's start: the cold start is not measured against a backlog.
        thread, stop_traffic = producer.start(PHASE, run.rate, 24 * 3600.0)
        traffic_at = time.time()
        cold = _wait_steady(first, producer, consumer, traffic_at, min(run.timeout_s, 120.0), LATENCY_GOAL_S)
        result["cold_start"] = {"query_started_s": round(started - popen_at, 2), **cold}
        time.sleep(run.steady_s)
        killed = time.time()
        # Live estimate of the steady latency (payloads already in), for the restart's live wait.
        estimate = _p99(
            _sent_between(producer, killed - run.steady_s, killed - SETTLE_S), dict(consumer.received), True
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        first = None
        log.info("recovery: serve SIGKILLed (process group) under %.0f triggers/s", run.rate)
        second, second_log, restarted = _start(run, "restart")
        query_started = _wait_query_started(second, second_log, name, run.timeout_s)
        live_goal = max(LATENCY_GOAL_S, 2 * estimate) if estimate is not None else LATENCY_GOAL_S
        restart = _wait_steady(second, producer, consumer, restarted, run.timeout_s, live_goal)
        result["restart"] = {"query_started_s": round(query_started - restarted, 2), **restart}
        time.sleep(run.steady_s)
        stop_traffic.set()
        thread.join(timeout=120)
        ended = time.time()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(consumer.received) < len(producer.sent):
            time.sleep(0.5)
        result["stopped_by"] = _stop(second, cfg)
        second = None
        sent, received = dict(producer.sent), dict(consumer.received)
        # Steady before the kill: the triggers of the steady period up to SETTLE_S before it (in
        # flight at the kill they would count the outage).
        steady = _p99(
            {k: t for k, t in sent.items() if killed - run.steady_s <= t < killed - SETTLE_S}, received
        )
        # Caught up = back under 1 s, or back near the steady level when that was above 1 s.
        goal = max(LATENCY_GOAL_S, 1.5 * steady) if steady is not None else LATENCY_GOAL_S
        result["steady_p99_before_kill_s"] = steady
        result["caught_up_goal_s"] = round(goal, 3)
        result["restart"].update(caught_up_after(sent, received, restarted, ended, goal))
        result["down_s"] = round(restarted - killed, 2)
        result["killed_after_traffic_s"] = round(killed - traffic_at, 2)
        result["latency_all"] = latency_figures(sent, received, producer.prefix(PHASE))
        result["lost_triggers"] = result["latency_all"]["missing"]
        result["duplicate_payloads"] = consumer.duplicates
        result["producer_errors"] = len(producer.errors)
    finally:
        stop_traffic.set()
        _kill(first)
        _kill(second)
        consumer.close()
    restart = result["restart"]
    log.info(
        "recovery: restart -> query started %s s, first payload %s s, caught up (p99 < %.2f s) %s s; "
        "lost %s, payloads twice %s",
        restart["query_started_s"],
        restart["first_payload_s"],
        goal,
        restart["caught_up_s"],
        result["lost_triggers"],
        result["duplicate_payloads"],
    )
    return result
