"""The fixed cost of one small Delta commit: a plain append against idempotent ones (txn keys, tags).

Role: the figure behind the commits of an ingest micro-batch (bench/README.md "The price of
Delta's txn keys"). Every commit of ``ingest`` must be skipped when a replayed batch already made
it: with Delta's idempotency key (``txnAppId`` / ``txnVersion``,
:func:`carousel.storage.idempotent_append`, as ingest did until 2026-12-07), or with the batch as
the commit's tag (:class:`carousel.storage.BatchCommits`, as ingest does now). Inputs: none (a
fresh ``ingest_log``-shaped table per variant under a temp folder). Output: a summary on stdout and
JSON (``bench/results/commit_cost.json``). Nothing is asserted.

Each variant appends one ``ingest_log`` row ``--commits`` times to its own new table (the first
``--warm-up`` commits not counted), in a Spark job group per commit, so the Spark jobs of each
commit are counted too:

- **ceiling** - a plain append: the least a commit costs (one write job, the log entry);
- **txn keys** - the same row through :func:`carousel.storage.idempotent_append`;
- **tags, read each time** - through a new :class:`carousel.storage.BatchCommits` per commit, so
  each reads the table's newest commits first (what the first batch after a restart pays);
- **tags, as ingest** - through one :class:`carousel.storage.BatchCommits` for all commits, as a
  running query: after its own commits it knows the answer without reading the table.

The ratio is ceiling median / variant median (1.0: the variant costs nothing over a plain append).

    .venv/bin/python -m bench.commit_cost_bench                   # about a minute on 2 cores
    .venv/bin/python -m bench.commit_cost_bench --commits 60
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pyspark.sql import DataFrame, SparkSession

from bench.common import bench_parser, machine_info, start_results, write_json
from carousel.cli import setup_logging
from carousel.config import load_config
from carousel.schemas import INGEST_LOG_SCHEMA, INGEST_LOG_TABLE
from carousel.session import build_session
from carousel.storage import BatchCommits, idempotent_append
from carousel.tables import ensure

log = logging.getLogger("bench.commit_cost")
APP_ID = "bench-commit-cost"


def log_row(spark: SparkSession, batch: int) -> DataFrame:
    """One ``ingest_log`` row, as ingest appends one per micro-batch."""
    return spark.createDataFrame(
        [(f"{APP_ID}:{batch}", batch, 1, 1, 0, 0, 1, datetime.now(UTC), 0, 0)], INGEST_LOG_SCHEMA
    )


def plain(spark: SparkSession, location: str, batch: int) -> None:
    log_row(spark, batch).write.format("delta").mode("append").save(location)


def with_txn_keys(spark: SparkSession, location: str, batch: int) -> None:
    idempotent_append(log_row(spark, batch), location, APP_ID, batch)


def tagged_read_each_time(spark: SparkSession, location: str, batch: int) -> None:
    assert BatchCommits(APP_ID, None).append(log_row(spark, batch), location, batch)


def tagged_as_a_running_query() -> Callable[[SparkSession, str, int], None]:
    commits = BatchCommits(APP_ID, None)

    def commit(spark: SparkSession, location: str, batch: int) -> None:
        assert commits.append(log_row(spark, batch), location, batch)

    return commit


def timed_commits(
    spark: SparkSession, location: str, commit: Callable[[SparkSession, str, int], None], commits: int
) -> tuple[list[float], list[int]]:
    """Seconds and Spark jobs of each of ``commits`` commits of ``commit``."""
    context = spark.sparkContext
    seconds, jobs = [], []
    for batch in range(commits):
        # A group per table and commit (the tables' folders differ above ``tables/<name>``):
        # the status tracker keeps a finished group's jobs, so a name used twice counts both.
        group = f"{APP_ID}-{abs(hash(location))}-{batch}"
        context.setJobGroup(group, group)
        started = time.perf_counter()
        commit(spark, location, batch)
        seconds.append(round(time.perf_counter() - started, 4))
        jobs.append(len(context.statusTracker().getJobIdsForGroup(group)))
    context.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
    return seconds, jobs


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("commit_cost", __doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=30, help="commits per variant (30)")
    parser.add_argument(
        "--warm-up", type=int, default=5, help="first commits of each variant not counted (5)"
    )
    parser.add_argument("--output", default="bench/results/commit_cost.json")
    args = parser.parse_args(argv)
    if args.commits <= args.warm_up:
        parser.error("--commits must be greater than --warm-up")
    setup_logging()
    results = start_results("commit_cost", argv, vars(args))
    workdir = tempfile.mkdtemp(prefix="carousel-bench-commit-cost-")
    variants: dict[str, Callable[[SparkSession, str, int], None]] = {
        "ceiling": plain,
        "txn keys": with_txn_keys,
        "tags, read each time": tagged_read_each_time,
        "tags, as ingest": tagged_as_a_running_query(),
    }
    figures: dict[str, dict[str, object]] = {}
    spark = None
    try:
        spark = build_session(load_config(), "carousel-bench-commit-cost")
        results["machine"] = machine_info(spark)
        # A table of its own warms the JVM (code generation, Delta's classes) before any variant.
        warm = load_config(overrides=[f"storage.root={workdir}/warm"])
        ensure(spark, warm, INGEST_LOG_TABLE)
        timed_commits(spark, warm.storage.table(INGEST_LOG_TABLE), plain, 2 * args.warm_up)
        for number, (name, commit) in enumerate(variants.items()):
            cfg = load_config(overrides=[f"storage.root={workdir}/{number}"])
            ensure(spark, cfg, INGEST_LOG_TABLE)
            seconds, jobs = timed_commits(spark, cfg.storage.table(INGEST_LOG_TABLE), commit, args.commits)
            counted, counted_jobs = seconds[args.warm_up :], jobs[args.warm_up :]
            figures[name] = {
                "seconds": seconds,
                "jobs": jobs,
                "median_seconds": round(statistics.median(counted), 3),
                "p90_seconds": round(statistics.quantiles(counted, n=10)[-1], 3),
                "median_jobs": statistics.median(counted_jobs),
            }
            log.info(
                "%s: median %.3f s, %s jobs per commit",
                name,
                figures[name]["median_seconds"],
                figures[name]["median_jobs"],
            )
        ceiling = figures["ceiling"]["median_seconds"]
        for figure in figures.values():
            figure["ratio_to_ceiling"] = round(ceiling / figure["median_seconds"], 3)  # type: ignore[operator]
        results["figures"] = figures
    finally:
        if spark is not None:
            spark.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["output"] = str(write_json(results, args.output))
    print()
    print(f"one-row Delta appends, {args.commits - args.warm_up} counted per variant (after {args.warm_up})")
    for name, figure in figures.items():
        print(
            f"  {name:<20} median {figure['median_seconds']:>6.3f} s  p90 {figure['p90_seconds']:>6.3f} s  "
            f"{figure['median_jobs']:>4} Spark jobs  ratio to ceiling {figure['ratio_to_ceiling']}"
        )
    print(f"results: {results['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
