"""API benchmark: latency and throughput of the recommendations API, against its own /healthz.

    .venv/bin/python -m bench.api_bench                 # 1M users, 100k items; 200/500/1000/5000 per s
    .venv/bin/python -m bench.api_bench --quick         # smoke: small shop, 200 and 1000/s for 10 s each
    .venv/bin/python -m bench.api_bench --workers 3 --rates 1000,3000

Everything runs on this machine: a private Kafka broker and a private ``redis-server`` (temp
state folders, free ports) and the scaled shop of :mod:`bench.shop_data` (built, or reused from
``--shop-root``), linked read-only into the run's own storage root. Phases:

1. **online store**: ``jobs.rebuild_online_store.run`` loads the shop's 1M Delta profiles into
   the empty store (timed); trending is computed once, as ``serve`` does at its start. The Spark
   session is then stopped, so no idle JVM shares the cores with the service.
2. **service**: ``./spark-submit.sh api`` as its own process (``--workers``, default 2), started
   like a user starts it; the bench waits until every answer of ``/readyz`` is ready.
3. **load**: per rate of ``--rates``, first ``GET /healthz`` (the ceiling: the same service, the
   same HTTP stack and generator, no work), then ``GET /v1/users/{random shop user}/
   recommendations?campaign=--campaign``, each for ``--duration`` s, after ``--warmup`` s of
   recommendations at the lowest rate. The open-loop generator (:mod:`bench.api_load`) measures
   each request from its due time. Per phase: p50/p95/p99/max, the achieved rate, the statuses,
   the CPU of the generator, of the service's processes and of Redis, and the store's round
   trips per request (``rt/req``: Redis's ``total_reads_processed`` over the phase).

Goals (the issue's): p99 < 20 ms at 1,000 requests/s, and the highest rate with p99 < 50 ms.
Figures are printed and written to ``--output`` (default ``bench/results/api.json``); nothing is
asserted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import common, serving_store
from bench.api_load import run_phase
from bench.shop_data import apply_quick, ensure_shop, link_shop, sizes_from_args
from carousel import broker, online_store_server
from carousel.broker import ensure_topics, free_port
from carousel.cli import setup_logging
from carousel.config import PROJECT_ROOT, CarouselConfig
from streaming.serve import TrendingRefresher

log = logging.getLogger("bench.api")

QUICK = {
    "users": 20_000,
    "items": 5_000,
    "events": 50_000,
    "rates": "200,1000",
    "duration": 10.0,
    "warmup": 3.0,
}
KEY_ENV = "CAROUSEL_API_KEY"
BENCH_KEY_LIMIT = 1_000_000  # requests/s of the bench's key: far above any rate asked for
P99_GOAL_MS = 20.0
P99_SECOND_GOAL_MS = 50.0
GOAL_RATE = 1000.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_parser() -> argparse.ArgumentParser:
    parser = common.bench_parser("api", "Recommendations API latency at steady rates, vs its own /healthz.")
    parser.add_argument("--quick", action="store_true", help="smoke run: small shop, 200/s for 10 s")
    parser.add_argument("--rates", default="200,500,1000,5000", help="requests/s (200,500,1000,5000)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase (20)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds at the lowest rate first (10)")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections (64)")
    parser.add_argument("--workers", type=int, default=2, help="API worker processes (2)")
    parser.add_argument("--campaign", default="wishlist-inapp", help="campaign asked for (wishlist-inapp)")
    parser.add_argument("--store-max-memory", default="4gb", help="the private Redis's maxmemory (4gb)")
    return common.add_run_args(parser, "bench/results/api.json", "work folder (default: a temp folder)")


# ---------------------------------------------------------------------------------------------
# CPU of the service's processes and of Redis
# ---------------------------------------------------------------------------------------------
def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return table


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and its descendants (alive now)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += table.get(pid, (0, 0.0))[1]
        stack.extend(children.get(pid, ()))
    return total


def redis_cpu_seconds(cfg: CarouselConfig) -> float:
    client = serving_store._client(cfg)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_reads(cfg: CarouselConfig) -> int:
    """Read events Redis has processed (``total_reads_processed``): about one per client round trip."""
    client = serving_store._client(cfg)
    try:
        return int(client.info("stats")["total_reads_processed"])
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------
class Service:
    """``./spark-submit.sh api`` as a subprocess, with a random key."""

    def __init__(
        self, overrides: Sequence[str], config_files: Sequence[str], workers: int, log_path: Path
    ) -> None:
        self.key = uuid.uuid4().hex
        self.port = free_port()
        sets = [arg for item in [*overrides, f"api.port={self.port}"] for arg in ("--set", item)]
        files = [arg for path in config_files for arg in ("--config", path)]
        command = [str(PROJECT_ROOT / "spark-submit.sh"), "api", *files, *sets, "--workers", str(workers)]
        self.log_path = log_path
        with open(log_path, "w") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, KEY_ENV: self.key},
            )

    def wait_ready(self, timeout: float, workers: int) -> float:
        """Seconds until ``/readyz`` answered ready many times in a row (every worker loaded)."""
        started = time.monotonic()
        in_a_row = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as http:
            while in_a_row < 20 * workers:
                if self.process.poll() is not None:
                    raise RuntimeError("the API exited: " + self.log_path.read_text()[-3000:])
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"the API was not ready within {timeout:.0f} s")
                try:
                    ready = http.get("/readyz").status_code == 200
                except httpx.TransportError:
                    ready = False
                in_a_row = in_a_row + 1 if ready else 0
                if not ready:
                    time.sleep(0.2)
        return time.monotonic() - started

    def worker_latency_buckets(self, endpoint: str) -> dict[float, float]:
        """The workers' own latency histogram of ``endpoint`` (``carousel_api_request_seconds``,
        from the request reaching the app to its answer): cumulative count per upper bound."""
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as http:
            text = http.get("/metrics").text
        prefix = f'carousel_api_request_seconds_bucket{{endpoint="{endpoint}",le="'
        buckets: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                bound, _, count = line[len(prefix) :].partition('"} ')
                buckets[float(bound)] = buckets.get(float(bound), 0.0) + float(count)
        return buckets

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def measure(
    service: Service, cfg: CarouselConfig, path_of: Any, rate: float, duration: float, connections: int
) -> dict[str, Any]:
    """One phase, with the CPU of the service, of Redis and of the broker over it."""
    broker_pid = broker.status(cfg.broker)["pid"]
    service_before, redis_before = tree_cpu_seconds(service.process.pid), redis_cpu_seconds(cfg)
    reads_before = redis_reads(cfg)
    broker_before = tree_cpu_seconds(broker_pid) if broker_pid else 0.0
    endpoint = path_of.__name__
    buckets_before = service.worker_latency_buckets(endpoint)
    figures = run_phase(
        "127.0.0.1", service.port, path_of, {"X-API-Key": service.key}, rate, duration, connections
    )
    figures.update(worker_shares(buckets_before, service.worker_latency_buckets(endpoint)))
    wall = figures["wall_s"] or 1.0
    figures["service_cpu_cores"] = round((tree_cpu_seconds(service.process.pid) - service_before) / wall, 3)
    figures["redis_cpu_cores"] = round((redis_cpu_seconds(cfg) - redis_before) / wall, 3)
    # The store's round trips per request (the bench's own INFO calls included: 2 per phase).
    reads = redis_reads(cfg) - reads_before
    figures["redis_reads_per_request"] = round(reads / max(figures["requests"], 1), 3)
    if broker_pid:
        figures["broker_cpu_cores"] = round((tree_cpu_seconds(broker_pid) - broker_before) / wall, 3)
    return figures


def worker_shares(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """Of a phase's requests, the shares that took over 10 and over 20 ms *in the worker* (from the
    workers' histogram): set beside the generator's percentiles, they say whether a slow answer
    was slow in the app or waited before it (in the socket, for the event loop or a core)."""
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    shares: dict[str, float | None] = {}
    for bound in (0.01, 0.02):
        within = after.get(bound, 0.0) - before.get(bound, 0.0)
        shares[f"worker_over_{bound * 1000:g}ms_share"] = (
            round((total - within) / total, 5) if total and bound in after else None
        )
    return shares


def goals(phases: list[dict[str, Any]]) -> dict[str, Any]:
    answers = {p["rate"]: p for p in phases if p["endpoint"] == "recommendations"}

    def ok(phase: dict[str, Any], limit_ms: float) -> bool:
        return phase["p99_ms"] is not None and phase["p99_ms"] < limit_ms and not phase["errors"]

    at_goal = answers.get(GOAL_RATE)
    passing = [rate for rate, phase in answers.items() if ok(phase, P99_SECOND_GOAL_MS)]
    return {
        f"p99_under_{P99_GOAL_MS:g}ms_at_{GOAL_RATE:g}_per_s": None
        if at_goal is None
        else ok(at_goal, P99_GOAL_MS),
        f"p99_at_{GOAL_RATE:g}_per_s_ms": None if at_goal is None else at_goal["p99_ms"],
        f"highest_measured_rate_with_p99_under_{P99_SECOND_GOAL_MS:g}ms": max(passing) if passing else None,
    }


def print_summary(results: dict[str, Any]) -> None:
    common.print_header(results, "API")
    store = results.get("store", {}).get("rebuild", {})
    if store:
        print(f"online store: {store['counts']['profiles']:,} users rebuilt in {store['seconds']} s")
    print(f"service ready in {results.get('ready_s')} s with {results['settings']['workers']} workers")
    print(
        f"{'endpoint':<16}{'rate/s':>8}{'achieved':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'statuses':>22}{'gen cpu':>9}{'api cpu':>9}{'redis':>7}{'broker':>8}{'rt/req':>8}"
    )
    for phase in results.get("phases", []):
        statuses = ",".join(f"{k}:{v}" for k, v in phase["statuses"].items()) + (
            f" err:{sum(phase['errors'].values())}" if phase["errors"] else ""
        )
        print(
            f"{phase['endpoint']:<16}{phase['rate']:>8g}{phase['achieved_per_s']:>10}{phase['p50_ms']:>9}"
            f"{phase['p95_ms']:>9}{phase['p99_ms']:>9}{phase['max_ms']:>9}{statuses:>22}"
            f"{phase['generator_cpu_cores']:>9}{phase['service_cpu_cores']:>9}{phase['redis_cpu_cores']:>7}"
            f"{phase.get('broker_cpu_cores', '-'):>8}{phase.get('redis_reads_per_request', '-'):>8}"
        )
    print("goals:", json.dumps(results.get("goals", {})))
    common.print_footer(results)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = apply_quick(build_parser().parse_args(argv), QUICK)
    rates = common.parse_rates(args.rates)
    workdir, temp = common.make_workdir(args.workdir, "carousel-api-bench-")
    shop_root = Path(args.shop_root).resolve()
    sizes = sizes_from_args(args)
    settings = {
        "rates": rates,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "workers": args.workers,
        "campaign": args.campaign,
        "shop_root": str(shop_root),
        "shop_sizes": sizes.__dict__,
        "config_overrides": list(args.overrides),
        "workdir": str(workdir),
    }
    results = common.start_results("api", argv, settings)
    ports = common.broker_overrides(workdir / "kafka")
    store = serving_store.store_overrides(workdir / "redis", args.store_max_memory)
    head = [*ports, "broker.heap=1g"]
    broker_cfg = common.bench_config(args, head, [], log)
    with common.bench_run(results, broker_cfg.broker, args.output, workdir if temp else None) as state:
        topics = common.phase_topics(broker_cfg.kafka.topics, "api", uuid.uuid4().hex[:6])
        required = [
            f"kafka.bootstrap_servers={state.bootstrap}",
            *topics,
            f"storage.root={workdir / 'api'}",
            *store,
            f"api.metrics_dir={workdir / 'api-metrics'}",
            # Counted as in production, but never refused: the load is what is measured.
            f"api.keys.default.requests_per_second={BENCH_KEY_LIMIT}",
        ]
        cfg = common.bench_config(args, head, required, log)
        shop_cfg = common.bench_config(args, head, [f"storage.root={shop_root}", *store], log)
        spark = state.shop_session(shop_cfg, "carousel-bench-api", workdir / "warehouse", {})
        results["shop"] = ensure_shop(spark, shop_cfg, sizes, force=args.rebuild_shop)
        link_shop(shop_root, cfg.storage.root)
        online_store_server.start(cfg.online_store)
        service: Service | None = None
        try:
            ensure_topics(cfg.kafka)
            results["store"] = {"rebuild": serving_store.rebuild(spark, cfg, sizes.users)}
            TrendingRefresher(spark, cfg).refresh()
            spark.stop()  # no idle JVM beside the service
            state.spark = None
            # PySpark's SIGINT handler cancels the session's jobs, and raises once it is stopped:
            # Ctrl-C must stop the bench (its finally blocks stop the service, store and broker).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            service = Service(
                [*head, *args.overrides, *required], args.config, args.workers, workdir / "api.log"
            )
            results["ready_s"] = round(service.wait_ready(300, args.workers), 1)
            rng = random.Random(args.seed)
            # Random shop users, in the shop's id format (bench.shop_data.user_id).
            users = [f"u-{rng.randrange(sizes.users):07d}" for _ in range(200_000)]

            def recommendations(number: int) -> str:
                return f"/v1/users/{users[number % len(users)]}/recommendations?campaign={args.campaign}"

            def healthz(_number: int) -> str:
                return "/healthz"

            log.info("warm-up: %.0f s at %g/s", args.warmup, rates[0])
            measure(service, cfg, recommendations, rates[0], args.warmup, args.connections)
            phases: list[dict[str, Any]] = []
            results["phases"] = phases
            for rate in rates:
                for endpoint, path_of in (("healthz", healthz), ("recommendations", recommendations)):
                    figures = {
                        "endpoint": endpoint,
                        **measure(service, cfg, path_of, rate, args.duration, args.connections),
                    }
                    log.info("%s at %g/s: %s", endpoint, rate, json.dumps(figures))
                    phases.append(figures)
            results["store"]["at_end"] = serving_store.server_figures(cfg)
            results["goals"] = goals(phases)
        finally:
            if service is not None:
                service.stop()
            online_store_server.stop(cfg.online_store)
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
