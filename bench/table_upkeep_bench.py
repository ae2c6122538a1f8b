"""Table upkeep on the 1M-user bench shop: profile MERGE cost with and without deletion vectors,
and small files / profile lookup time before and after ``maintain``.

Role: the figures behind README "Table upkeep" and "Reading tables without Spark". Inputs: the
bench shop's ``user_profiles`` (``bench/shop_data.py``; built when missing), copied into a work
folder - the shop itself is never written. Output: a summary on stdout and JSON
(``bench/results/table_upkeep.json``). Nothing is asserted.

1. **merge** - two copies of ``user_profiles``, deletion vectors on and off; ``--merge-runs``
   ingest-like MERGEs of ``--changed-users`` existing users each (the profile MERGE of
   ``streaming.ingest``), alternating between the copies: seconds and bytes written per MERGE.
2. **upkeep** - one copy created as ``carousel.tables.ensure`` declares it (deletion vectors,
   clustered by ``user_id``), fragmented by ``--fragment-batches`` MERGEs of ``--batch-users``
   users (each adds a small file and deletion vectors, like an ingest micro-batch); then files,
   deletion vectors and the time of ``--lookups`` single-profile lookups by user id (Spark:
   ``spark.read ... where user_id = X ... collect``; and ``carousel.portable.read_table``) before
   and after ``jobs.maintain`` on that table.

    .venv/bin/python -m bench.table_upkeep_bench                       # ~10-15 min on 2 cores
    .venv/bin/python -m bench.table_upkeep_bench --merge-runs 2 --fragment-batches 20
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from bench.common import load1, machine_info, make_workdir, start_results, write_json
from bench.shop_data import DEFAULT_SHOP_ROOT
from carousel.cli import setup_logging
from carousel.config import CarouselConfig, load_config
from carousel.portable import read_table
from carousel.schemas import PROFILES_TABLE
from carousel.session import build_session
from carousel.storage import deletion_vector_count
from carousel.tables import ensure
from jobs import maintain
from streaming.profile_updates import PROFILE_COLUMNS, merged_profile_columns

log = logging.getLogger("bench.table_upkeep")


def _changed_profiles(spark: SparkSession, shop: str, users: int, total: int, seed: int) -> DataFrame:
    """``users`` existing profiles as an ingest batch's deltas (a fresh ``updated_at``), materialised."""
    rnd = random.Random(seed)
    ids = [f"u-{rnd.randrange(total):07d}" for _ in range(users)]
    deltas = spark.read.format("delta").load(shop).where(F.col("user_id").isin(ids))
    return deltas.withColumn("updated_at", F.current_timestamp()).localCheckpoint(eager=True)


def _merge(spark: SparkSession, cfg: CarouselConfig, location: str, deltas: DataFrame) -> dict[str, Any]:
    """The ingest's profile MERGE; its seconds and what it wrote."""
    columns = merged_profile_columns("t", "s", cfg.profiles.recent_items, cfg.profiles.max_devices)
    started = time.perf_counter()
    (
        DeltaTable.forPath(spark, location)
        .alias("t")
        .merge(deltas.alias("s"), "t.user_id = s.user_id")
        .whenMatchedUpdate(set=columns)
        .whenNotMatchedInsert(values={name: F.col(f"s.{name}") for name in PROFILE_COLUMNS})
        .execute()
    )
    seconds = time.perf_counter() - started
    metrics = DeltaTable.forPath(spark, location).history(1).first()["operationMetrics"]
    return {
        "seconds": round(seconds, 2),
        "rows_updated": int(metrics.get("numTargetRowsUpdated", 0)),
        "files_added": int(metrics.get("numTargetFilesAdded", 0)),
        "files_removed": int(metrics.get("numTargetFilesRemoved", 0)),
        "bytes_added": int(metrics.get("numTargetBytesAdded", 0)),
        "deletion_vectors_added": int(metrics.get("numTargetDeletionVectorsAdded", 0)),
    }


def merge_cost(
    spark: SparkSession, cfg: CarouselConfig, shop: str, work: Path, args: argparse.Namespace
) -> dict:
    """Phase 1: the per-batch profile MERGE with deletion vectors on and off, alternating."""
    copies = {}
    for dv in ("on", "off"):
        location = str(work / f"profiles-dv-{dv}")
        shutil.copytree(shop, location)
        enabled = "true" if dv == "on" else "false"
        spark.sql(
            f"ALTER TABLE delta.`{location}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = '{enabled}')"
        )
        copies[dv] = location
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for n in range(args.merge_runs):
        deltas = _changed_profiles(spark, shop, args.changed_users, args.users, seed=n)
        for dv in ("on", "off") if n % 2 == 0 else ("off", "on"):
            runs[dv].append(_merge(spark, cfg, copies[dv], deltas))
            log.info("merge %d, deletion vectors %s: %s", n, dv, runs[dv][-1])
    return {
        dv: {
            "runs": result,
            "median_seconds": statistics.median(r["seconds"] for r in result),
            "median_mb_written": round(statistics.median(r["bytes_added"] for r in result) / 1e6, 1),
        }
        for dv, result in runs.items()
    }


def _lookups(spark: SparkSession, location: str, users: list[str]) -> dict[str, Any]:
    """Seconds of single-profile lookups by user id: Spark, and deltalake through carousel.portable."""
    spark_seconds, portable_seconds = [], []
    for user in users:
        started = time.perf_counter()
        rows = spark.read.format("delta").load(location).where(F.col("user_id") == user).collect()
        spark_seconds.append(time.perf_counter() - started)
        assert len(rows) == 1, (user, len(rows))
        started = time.perf_counter()
        assert read_table(location, where=f"user_id = '{user}'").num_rows == 1
        portable_seconds.append(time.perf_counter() - started)
    # The files a lookup reads: Delta's data skipping on the user_id min/max statistics.
    scanned = spark.read.format("delta").load(location).where(F.col("user_id") == users[0]).inputFiles()
    detail = DeltaTable.forPath(spark, location).detail().first()
    return {
        "files": int(detail["numFiles"]),
        "mb": round(detail["sizeInBytes"] / 1e6, 1),
        "deletion_vectors": deletion_vector_count(spark, location),
        "files_read_by_a_lookup": len(scanned),
        "spark_lookup_median_s": round(statistics.median(spark_seconds), 3),
        "spark_lookup_max_s": round(max(spark_seconds), 3),
        "deltalake_lookup_median_s": round(statistics.median(portable_seconds), 3),
    }


def upkeep(spark: SparkSession, cfg: CarouselConfig, shop: str, args: argparse.Namespace) -> dict:
    """Phase 2: fragment a copy like ingest does, then measure, maintain, measure again."""
    location = cfg.storage.table(PROFILES_TABLE)
    shutil.copytree(shop, location)
    ensure(spark, cfg, PROFILES_TABLE)  # deletion vectors, clustering by user_id, upkeep settings
    started = time.perf_counter()
    for n in range(args.fragment_batches):
        _merge(
            spark, cfg, location, _changed_profiles(spark, shop, args.batch_users, args.users, seed=1000 + n)
        )
    fragmenting = time.perf_counter() - started
    rnd = random.Random(7)
    users = [f"u-{rnd.randrange(args.users):07d}" for _ in range(args.lookups)]
    _lookups(spark, location, users[:1])  # warm-up: the first read of a session costs more
    before = _lookups(spark, location, users)
    log.info("before maintain: %s", before)
    started = time.perf_counter()
    (report,) = maintain.run(spark, cfg, tables=[PROFILES_TABLE])
    maintain_seconds = time.perf_counter() - started
    after = _lookups(spark, location, users)
    log.info("after maintain: %s", after)
    return {
        "fragment_batches": args.fragment_batches,
        "batch_users": args.batch_users,
        "fragmenting_seconds": round(fragmenting, 1),
        "before": before,
        "maintain_seconds": round(maintain_seconds, 1),
        "maintain_report": {k: v for k, v in vars(report).items() if k != "table"},
        "after": after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.table_upkeep_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shop", default=DEFAULT_SHOP_ROOT, help="the bench shop's root (read only)")
    parser.add_argument("--users", type=int, default=1_000_000, help="users in the shop's profiles")
    parser.add_argument("--merge-runs", type=int, default=4, help="MERGEs per setting in phase 1 (0: skip)")
    parser.add_argument("--changed-users", type=int, default=2000, help="users per MERGE in phase 1")
    parser.add_argument("--fragment-batches", type=int, default=60, help="MERGEs fragmenting the copy")
    parser.add_argument("--batch-users", type=int, default=500, help="users per fragmenting MERGE")
    parser.add_argument("--lookups", type=int, default=10, help="profile lookups measured")
    parser.add_argument("--workdir", help="keep the copies here (default: a temp folder, deleted)")
    parser.add_argument("--output", default="bench/results/table_upkeep.json")
    args = parser.parse_args(argv)
    setup_logging()
    shop = f"{Path(args.shop).resolve()}/tables/{PROFILES_TABLE}"
    if not Path(shop).exists():
        raise SystemExit(f"no bench shop at {args.shop}: build it with python -m bench.shop_data")
    work, temporary = make_workdir(args.workdir, "carousel-upkeep-")
    cfg = load_config(overrides=[f"storage.root={work}/data"])
    results = start_results("table_upkeep", argv, vars(args))
    spark = build_session(
        cfg,
        "bench-table-upkeep",
        master="local[2]",
        extra_conf={"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"},
    )
    try:
        results["machine"] = machine_info(spark)
        if args.merge_runs:
            results["merge"] = merge_cost(spark, cfg, shop, work, args)
        results["upkeep"] = upkeep(spark, cfg, shop, args)
        results["loadavg_at_end"] = load1()
        path = write_json(results, args.output)
    finally:
        spark.stop()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    merge = results.get("merge", {})
    for dv, figures in merge.items():
        print(
            f"MERGE of {args.changed_users} users, deletion vectors {dv}: "
            f"median {figures['median_seconds']} s, {figures['median_mb_written']} MB written"
        )
    up = results["upkeep"]
    for phase in ("before", "after"):
        print(f"{phase} maintain: {up[phase]}")
    print(f"maintain: {up['maintain_seconds']} s; results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
