"""The event classifier's cost: ``classify_records`` against a plain JSON parse of the same records.

Role: the figure behind README "Bad input" (what validation costs on ingest's and serve's hot
path) and the yardstick for changes to the classifier. Inputs: ``--records`` simulator records
(the demo's mix: valid events, duplicates, ``simulator.bad_share`` bad records), shaped like rows
of Spark's Kafka source and cached in memory; nothing is read from Kafka or written anywhere.
Output: a summary on stdout and JSON (``bench/results/classify.json``). Nothing is asserted.

Each variant is written to Spark's ``noop`` sink ``--repeats`` times (best and median kept):

- **ceiling** - ``from_json`` of each value with the event contract's schema: the least any
  validation must do (one parse, typed fields), and no checks;
- **classify** - :func:`streaming.ingest.classify_records`: the presence parse, the nested parses,
  the event-time parse, every check and its reason, the dropped attributes.

The ratio is ceiling seconds / classify seconds (1.0: validation costs nothing over the parse).

    .venv/bin/python -m bench.classify_bench                     # about a minute on 2 cores
    .venv/bin/python -m bench.classify_bench --records 2000000 --repeats 5
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from bench.common import bench_parser, machine_info, start_results, write_json
from carousel.cli import setup_logging
from carousel.config import load_config
from carousel.schemas import EVENT_JSON_SCHEMA
from carousel.session import build_session
from jobs import simulate_events as sim
from streaming.ingest import classify_records

log = logging.getLogger("bench.classify")
KAFKA_SOURCE_DDL = "key BINARY, value BINARY, topic STRING, partition INT, offset BIGINT, timestamp TIMESTAMP"


def timed_runs(make: Callable[[], DataFrame], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` full runs of ``make()`` into the noop sink."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        make().write.format("noop").mode("overwrite").save()
        seconds.append(round(time.perf_counter() - started, 3))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("classify", __doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500_000, help="simulator records classified")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each variant (best and median kept)")
    parser.add_argument("--output", default="bench/results/classify.json")
    args = parser.parse_args(argv)
    setup_logging()
    results = start_results("classify", argv, vars(args))
    cfg = load_config()
    spark = build_session(cfg, "carousel-bench-classify")
    try:
        results["machine"] = machine_info(spark)
        received = datetime.now(UTC)
        world = sim.build_world(cfg.simulator)
        rows = [
            (r.key, r.value, "events", n % 4, n // 4, received)
            for n, r in enumerate(sim.stream_records(world, cfg.simulator, args.records, received, seed=11))
        ]
        raw = spark.createDataFrame(rows, KAFKA_SOURCE_DDL).repartition(spark.sparkContext.defaultParallelism)
        raw = raw.cache()
        log.info("cached %d records in %d partitions", raw.count(), raw.rdd.getNumPartitions())
        del rows

        variants: dict[str, Callable[[], DataFrame]] = {
            "ceiling": lambda: raw.select(
                F.from_json(F.col("value").cast("string"), EVENT_JSON_SCHEMA).alias("e")
            ),
            "classify": lambda: classify_records(raw, cfg.ingest),
        }
        timed_runs(variants["classify"], 1)  # warm-up: code generation, the Python-free plan's JIT
        figures = {}
        for name, make in variants.items():
            seconds = timed_runs(make, args.repeats)
            best = min(seconds)
            figures[name] = {
                "seconds": seconds,
                "best_seconds": best,
                "median_seconds": round(statistics.median(seconds), 3),
                "records_per_second": round(args.records / best),
            }
            log.info("%s: best %.2f s (%s)", name, best, seconds)
        ratio = round(figures["ceiling"]["best_seconds"] / figures["classify"]["best_seconds"], 3)
        results.update(figures=figures, ratio_to_ceiling=ratio)
    finally:
        spark.stop()
    results["output"] = str(write_json(results, args.output))
    print()
    print(f"classifier over {args.records:,} records, best of {args.repeats} (noop sink)")
    for name, figure in figures.items():
        print(
            f"  {name:<9} {figure['best_seconds']:>7.2f} s best, {figure['median_seconds']:>7.2f} s median,"
            f" {figure['records_per_second']:>9,} records/s"
        )
    print(f"  ratio to ceiling (ceiling s / classify s): {ratio}")
    print(f"results: {results['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
