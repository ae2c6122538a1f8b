"""Publish a trained product correlation matrix as a new version of the Delta ``item_recommendations``.

Role: the gate between training and serving. Reads a model output folder (local or ``s3://``)
written by ``train``: ``recommendations/*.csv`` (header ``item_id,rank,rec_item_id,score``) and
``metadata.json`` (``model_version``, ``top_k``, ``items``: the vocabulary the model was trained on).
Validates it and, only if every check passes, overwrites ``item_recommendations`` as one new
Delta version whose rows and commit metadata carry the model version. Serving reads the table
each micro-batch, so the new version is live without a restart. A refused output leaves the live
version untouched and exits with status 1, naming each failed check.

``rollback`` restores the version that was live before the latest publish (Delta RESTORE).

    ./spark-submit.sh publish-recommendations --input data/training/models/<version>
    ./spark-submit.sh rollback [--to-version N]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.errors import JobError
from carousel.schemas import ITEM_RECOMMENDATIONS_TABLE, RECOMMENDATION_COLUMNS
from carousel.session import build_session
from carousel.storage import table_exists
from carousel.tables import ensure

log = logging.getLogger(__name__)

RECOMMENDATIONS_CSV_SCHEMA = StructType(
    [
        StructField("item_id", StringType()),
        StructField("rank", IntegerType()),
        StructField("rec_item_id", StringType()),
        StructField("score", DoubleType()),
    ]
)
COMMIT_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"


class PublishRefusedError(JobError):
    """The model output failed validation; the live recommendations were not changed."""


@dataclass(frozen=True)
class ModelOutput:
    recommendations: DataFrame
    model_version: str
    top_k: int
    items: list[str]


def _read_metadata(path: Path, location: str) -> dict:
    """The output's ``metadata.json``; :class:`PublishRefusedError` when it is missing or unusable."""
    if not path.is_file():
        raise PublishRefusedError(
            f"no metadata.json in {location}: not a complete train output (train writes it last)"
        )
    try:
        metadata = json.loads(path.read_text())
        missing = [key for key in ("model_version", "top_k", "items") if key not in metadata]
    except (ValueError, TypeError) as err:
        raise PublishRefusedError(f"metadata.json in {location} is not a JSON object: {err}") from None
    if missing:
        raise PublishRefusedError(f"metadata.json in {location} lacks {', '.join(missing)}")
    return metadata


def read_model_output(spark: SparkSession, location: str, client: object | None = None) -> ModelOutput:
    """Read a ``train`` output folder (local or S3; S3 is fetched to a temp folder first)."""
    local = location
    if objectstore.is_s3(location):
        local = tempfile.mkdtemp(prefix="carousel-publish-")
        objectstore.download_dir(location, local, client=client)
    metadata = _read_metadata(Path(local, "metadata.json"), location)
    csv_files = sorted(str(p) for p in Path(local, "recommendations").glob("*.csv"))
    if not csv_files:
        raise PublishRefusedError(f"no recommendations/*.csv under {location}")
    recommendations = (
        spark.read.option("header", True)
        .option("mode", "PERMISSIVE")
        .schema(RECOMMENDATIONS_CSV_SCHEMA)
        .csv(csv_files)
    )
    return ModelOutput(
        recommendations,
        str(metadata["model_version"]),
        int(metadata["top_k"]),
        [str(i) for i in metadata["items"]],
    )


def validation_failures(recommendations: DataFrame, items: DataFrame, top_k: int) -> list[str]:
    """Every reason to refuse this output (empty list: publishable).

    ``items``: one column ``item_id``, the model's vocabulary. Each item with recommendations must
    have exactly min(top_k, items - 1) of them, ranked 1..n without gaps.
    """
    n_items = items.count()
    expected_per_item = min(top_k, max(n_items - 1, 0))
    known = items.select(F.col("item_id").alias("known_id")).distinct()
    stats = recommendations.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count(
            F.when(
                F.col("item_id").isNull()
                | F.col("rec_item_id").isNull()
                | F.col("rank").isNull()
                | F.col("score").isNull(),
                True,
            )
        ).alias("nulls"),
        F.count(F.when(F.col("item_id") == F.col("rec_item_id"), True)).alias("self_recs"),
        F.count(F.when(F.isnan("score") | F.col("score").isin(float("inf"), float("-inf")), True)).alias(
            "non_finite"
        ),
        F.countDistinct("item_id").alias("items_with_recs"),
    ).first()
    failures: list[str] = []
    if stats["rows"] == 0:
        return ["empty result: no recommendations at all"]
    if stats["nulls"]:
        failures.append(f"{stats['nulls']} rows with a missing or unparseable field")
    if stats["self_recs"]:
        failures.append(f"{stats['self_recs']} self-recommendations (item_id = rec_item_id)")
    if stats["non_finite"]:
        failures.append(f"{stats['non_finite']} non-finite scores")
    unknown = (
        recommendations.select(F.col("item_id").alias("id"))
        .union(recommendations.select("rec_item_id"))
        .distinct()
        .join(known, F.col("id") == F.col("known_id"), "left_anti")
    )
    unknown_count = unknown.count()
    if unknown_count:
        sample = [r.id for r in unknown.limit(5).collect()]
        failures.append(f"{unknown_count} unknown items (not in the model's vocabulary), e.g. {sample}")
    per_item = recommendations.groupBy("item_id").agg(
        F.count(F.lit(1)).alias("n"),
        F.countDistinct("rank").alias("ranks"),
        F.min("rank").alias("lo"),
        F.max("rank").alias("hi"),
        F.countDistinct("rec_item_id").alias("recs"),
    )
    wrong = per_item.where(
        (F.col("n") != expected_per_item)
        | (F.col("ranks") != F.col("n"))
        | (F.col("lo") != 1)
        | (F.col("hi") != F.col("n"))
        | (F.col("recs") != F.col("n"))
    )
    wrong_count = wrong.count()
    if wrong_count:
        sample = [(r.item_id, r.n) for r in wrong.limit(5).collect()]
        failures.append(
            f"{wrong_count} items without exactly {expected_per_item} distinct recommendations ranked "
            f"1..{expected_per_item}, e.g. {sample}"
        )
    if stats["items_with_recs"] < n_items and expected_per_item > 0:
        failures.append(f"only {stats['items_with_recs']} of {n_items} items have recommendations")
    return failures


def publish(spark: SparkSession, cfg: CarouselConfig, output: ModelOutput) -> int:
    """Validate and write ``output`` as a new table version; returns that version."""
    items = spark.createDataFrame([(i,) for i in output.items], "item_id string")
    failures = validation_failures(output.recommendations, items, output.top_k)
    if failures:
        raise PublishRefusedError(
            f"model {output.model_version} refused, live recommendations unchanged: " + "; ".join(failures)
        )
    location = cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)
    table = ensure(spark, cfg, ITEM_RECOMMENDATIONS_TABLE)
    rows = output.recommendations.select(*RECOMMENDATION_COLUMNS).withColumn(
        "model_version", F.lit(output.model_version)
    )
    spark.conf.set(COMMIT_METADATA_CONF, json.dumps({"model_version": output.model_version}))
    try:
        rows.write.format("delta").mode("overwrite").save(location)
    finally:
        spark.conf.unset(COMMIT_METADATA_CONF)
    version = int(table.history(1).first()["version"])
    log.info("published model %s as version %d of %s", output.model_version, version, location)
    return version


def publish_history(spark: SparkSession, location: str) -> list[tuple[int, str | None, str]]:
    """(version, model version or None, operation) of the table, newest first."""
    rows = (
        DeltaTable.forPath(spark, location).history().select("version", "operation", "userMetadata").collect()
    )
    result = []
    for row in rows:
        model_version = None
        if row.userMetadata:
            try:
                model_version = json.loads(row.userMetadata).get("model_version")
            except ValueError:
                model_version = None
        result.append((int(row.version), model_version, str(row.operation)))
    return result


def _version_ranges(versions: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    ranges: list[list[int]] = []
    for version in versions:
        if ranges and version == ranges[-1][1] + 1:
            ranges[-1][1] = version
        else:
            ranges.append([version, version])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def rollback(spark: SparkSession, cfg: CarouselConfig, to_version: int | None = None) -> int:
    """Restore the version live before the current model (or ``to_version``); returns it."""
    location = cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)
    if not table_exists(spark, location):
        raise PublishRefusedError(f"no published recommendations at {location}: nothing to roll back")
    if to_version is not None:
        versions = sorted(v for v, _, _ in publish_history(spark, location))
        if to_version not in versions:
            raise PublishRefusedError(
                f"--to-version {to_version}: {location} has no such version "
                f"(its history holds versions {_version_ranges(versions)})"
            )
    else:
        live = spark.read.format("delta").load(location).select("model_version").limit(1).collect()
        live_model = live[0].model_version if live else None
        publishes = [
            (v, m) for v, m, op in publish_history(spark, location) if m is not None and op == "WRITE"
        ]
        earlier = [v for v, m in publishes if m != live_model]
        if not earlier:
            raise PublishRefusedError("nothing to roll back to: no earlier published model")
        # The newest publish of another model that is older than the live model's publish.
        live_versions = [v for v, m in publishes if m == live_model]
        candidates = [v for v in earlier if not live_versions or v < max(live_versions)]
        if not candidates:
            raise PublishRefusedError("nothing to roll back to: no model was published before the live one")
        to_version = max(candidates)
    DeltaTable.forPath(spark, location).restoreToVersion(to_version)
    log.info("restored %s to version %d", location, to_version)
    return to_version


def run(spark: SparkSession, cfg: CarouselConfig, input_location: str) -> int:
    """Read, validate and publish the model output at ``input_location``."""
    client = objectstore.s3_client(cfg) if objectstore.is_s3(input_location) else None
    return publish(spark, cfg, read_model_output(spark, input_location, client))


def main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="publish-recommendations", description=__doc__.splitlines()[0])
    )
    parser.add_argument("--input", required=True, help="train output folder (local path or s3://...)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "publish-recommendations")
    spark = build_session(cfg, "carousel-publish-recommendations")
    try:
        run(spark, cfg, args.input)
    except PublishRefusedError as err:
        log.error("%s", err)
        return 1
    return 0


def rollback_main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="rollback", description="Restore the previous recommendations")
    )
    parser.add_argument(
        "--to-version", type=int, help="Delta version to restore (default: before the live model)"
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "rollback")
    spark = build_session(cfg, "carousel-rollback")
    try:
        rollback(spark, cfg, args.to_version)
    except PublishRefusedError as err:
        log.error("%s", err)
        return 1
    return 0
