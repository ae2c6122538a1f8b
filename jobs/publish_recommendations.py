"""Publish a trained product correlation matrix as a new version of the Delta ``item_recommendations``.

Role: the gate between training and serving. Reads a model output folder (local or ``s3://``)
written by ``train``: ``recommendations/*.csv`` (header ``item_id,rank,rec_item_id,score``) and
``metadata.json`` (``model_version``, ``top_k``, ``items``: the vocabulary the model was trained on).
Validates it and, only if every check passes, overwrites ``item_recommendations`` as one new
Delta version whose rows and commit metadata carry the model version. Serving reads the table
each micro-batch, so the new version is live without a restart. A refused output leaves the live
version untouched and exits with status 1, naming each failed check.

The quality gate: a valid candidate is then judged against the live model on the interactions
``train`` held back from it (``holdout/``), after the live model's own data end, with
``evaluate``'s next-item protocol; more than ``training.gate.max_drop`` below the live model's
Recall@k or MRR@k refuses it (exit 1) unless ``--force``. Every attempt, published or not, is a
row of the Delta ``model_publish_log`` (README "The quality gate").

``rollback`` restores the version that was live before the latest publish (Delta RESTORE).

    ./spark-submit.sh publish-recommendations --input data/training/models/<version> [--force]
    ./spark-submit.sh rollback [--to-version N]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args, iso_time
from carousel.config import CarouselConfig, GateConfig
from carousel.errors import JobError
from carousel.query_lifecycle import writing_tables
from carousel.schemas import (
    GATE_PUBLISHED_DECISIONS,
    ITEM_RECOMMENDATIONS_TABLE,
    MODEL_PUBLISH_LOG_SCHEMA,
    MODEL_PUBLISH_LOG_TABLE,
    RECOMMENDATION_COLUMNS,
)
from carousel.session import build_session
from carousel.storage import table_exists
from carousel.tables import ensure
from jobs.evaluate import consecutive_pairs, ranking_metrics
from models.interactions import read_interactions

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
# The tables a publish (nightly, publish-recommendations, update-model) and a rollback commit to.
_PUBLISHED_TABLES = (ITEM_RECOMMENDATIONS_TABLE, MODEL_PUBLISH_LOG_TABLE)


class PublishRefusedError(JobError):
    """The model output failed validation; the live recommendations were not changed."""


class GateRefusedError(PublishRefusedError):
    """The quality gate judged the candidate worse than the live model; nothing was published."""


@dataclass(frozen=True)
class ModelOutput:
    recommendations: DataFrame
    model_version: str
    top_k: int
    items: list[str]
    # The interactions train held back from fitting (the gate's window), when it held any.
    holdout: pd.DataFrame | None = None
    # The newest interaction the model was fitted on (ISO-8601), when known.
    data_end: str | None = None
    # Where the output was read from (recorded in the commit, for update-model's warm start).
    location: str | None = None


@dataclass(frozen=True)
class LiveModel:
    """The model behind the live matrix, as the commit that published it recorded it."""

    model_version: str
    # The newest interaction it was fitted on (or, for a model published without one, the commit
    # time); None when no commit names the version (written by another tool).
    data_end: datetime | None
    # Its train output folder; None when the commit did not record one (published before it was).
    location: str | None


@dataclass(frozen=True)
class GateVerdict:
    """What the quality gate decided for one candidate, and on which evidence."""

    decision: str  # one of GATE_PUBLISHED_DECISIONS or GATE_REFUSED_DECISIONS
    reason: str
    live_model_version: str | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    pairs: int | None = None
    k: int | None = None
    candidate: Mapping[str, float] | None = None
    live: Mapping[str, float] | None = None

    @property
    def published(self) -> bool:
        return self.decision in GATE_PUBLISHED_DECISIONS


# ---------------------------------------------------------------------------------------------
# Pure core: the gate's judgement
# ---------------------------------------------------------------------------------------------
GATE_METRICS: tuple[tuple[str, str], ...] = (("recall@k", "Recall"), ("mrr@k", "MRR"))


def judge(
    candidate: Mapping[str, float],
    live: Mapping[str, float],
    pairs: int,
    k: int,
    gate: GateConfig,
    force: bool = False,
) -> tuple[str, str]:
    """(decision, reason) for a candidate's and the live model's metrics on the same ``pairs``.

    ``passed`` unless Recall@k or MRR@k falls more than ``gate.max_drop`` (relative) below the live
    model's: then ``refused``, or ``forced`` with ``force``. Under ``gate.min_pairs`` pairs the
    evidence is too thin either way: ``unjudged`` (published, logged as a warning).
    """
    if pairs < gate.min_pairs:
        return (
            "unjudged",
            f"{pairs} next-item pairs in the window, fewer than training.gate.min_pairs={gate.min_pairs}",
        )
    drops = []
    for key, label in GATE_METRICS:
        floor = live[key] * (1.0 - gate.max_drop)
        if candidate[key] < floor:
            drops.append(
                f"{label}@{k} {candidate[key]:.4f} < {floor:.4f} (live {live[key]:.4f} - {gate.max_drop:.1%})"
            )
    summary = ", ".join(
        f"{label}@{k} {candidate[key]:.4f} vs live {live[key]:.4f}" for key, label in GATE_METRICS
    )
    if not drops:
        return "passed", f"{summary} on {pairs} pairs"
    reason = f"{'; '.join(drops)} on {pairs} pairs"
    return ("forced", f"--force: {reason}") if force else ("refused", reason)


def gate_window(holdout: pd.DataFrame, live_data_end: datetime | None) -> pd.DataFrame:
    """The held-back interactions neither model was fitted on: those after the live model's data end."""
    if live_data_end is None:
        return holdout
    return holdout[holdout["event_time"] > pd.Timestamp(live_data_end)].reset_index(drop=True)


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
    holdout = None
    holdout_info = metadata.get("holdout") or {}
    if not isinstance(holdout_info, dict):
        raise PublishRefusedError(f"metadata.json in {location}: holdout is not an object: {holdout_info!r}")
    data_end = metadata.get("data_end")
    if data_end is not None and _time_or_none(data_end) is None:
        raise PublishRefusedError(
            f"metadata.json in {location}: data_end {data_end!r} is not an ISO-8601 time"
        )
    if holdout_info.get("path"):
        folder = Path(local, str(holdout_info["path"])).resolve()
        if not folder.is_relative_to(Path(local).resolve()):
            raise PublishRefusedError(
                f"metadata.json in {location}: the held-back window {holdout_info['path']!r} is outside it"
            )
        files = sorted(folder.glob("*.csv"))
        if not files:
            raise PublishRefusedError(
                f"metadata.json in {location} names the held-back window {holdout_info['path']} "
                "but it holds no CSV file"
            )
        try:
            holdout = pd.concat([read_interactions(f) for f in files], ignore_index=True)
        except ValueError as err:
            raise PublishRefusedError(f"the held-back window of {location} is unreadable: {err}") from None
    return ModelOutput(
        recommendations,
        str(metadata["model_version"]),
        int(metadata["top_k"]),
        [str(i) for i in metadata["items"]],
        holdout,
        data_end,
        location if objectstore.is_s3(location) else str(Path(location).resolve()),
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


def _top_lists(recommendations: DataFrame, k: int) -> pd.DataFrame:
    """The top-k lists as evaluate reads them (item_id, rank, rec_item_id), on the driver."""
    return recommendations.where(F.col("rank") <= k).select("item_id", "rank", "rec_item_id").toPandas()


def live_model(spark: SparkSession, location: str) -> LiveModel | None:
    """The model of the live matrix at ``location``; None when nothing is published yet.

    The data end is the newest interaction the live model was fitted on, from the commit that
    wrote it (a RESTORE brings an older one back). A model published without one (before the
    gate, or by another tool) was fitted on nothing later than its publish: that commit's time
    stands in, so the gate never judges it on data it may have seen."""
    if not table_exists(spark, location):
        return None
    live = spark.read.format("delta").load(location).select("model_version").limit(1).collect()
    if not live:
        return None
    model_version = live[0].model_version
    for _, metadata, operation, committed_at in commit_metadata(spark, location):
        if operation == "WRITE" and metadata.get("model_version") == model_version:
            data_end = _time_or_none(metadata.get("data_end")) or committed_at
            output = metadata.get("model_output")
            return LiveModel(model_version, data_end, str(output) if output else None)
    return LiveModel(model_version, None, None)


def _time_or_none(value: object) -> datetime | None:
    """An ISO-8601 time (no offset = UTC) as aware UTC; None when missing or not a time."""
    try:
        return iso_time(str(value)) if value is not None else None
    except argparse.ArgumentTypeError:
        return None


def quality_gate(
    spark: SparkSession, cfg: CarouselConfig, output: ModelOutput, force: bool = False
) -> GateVerdict:
    """Judge a valid candidate against the live model on the candidate's held-back window."""
    gate = cfg.training.gate
    if not gate.enabled:
        return GateVerdict("disabled", "training.gate.enabled is false")
    live = live_model(spark, cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    if live is None:
        return GateVerdict("first", "no live model to compare with")
    live_version, live_data_end = live.model_version, live.data_end
    if output.holdout is None:
        return GateVerdict(
            "unjudged", "the candidate has no held-back window (see its metadata.json holdout)", live_version
        )
    window = gate_window(output.holdout, live_data_end)
    if len(window) == 0 and len(output.holdout):
        # The live model saw everything this candidate held back: the candidate is the older one.
        held_end = output.holdout["event_time"].max().to_pydatetime()
        reason = (
            f"the live model {live_version} was fitted on data up to {live_data_end}, past this "
            f"candidate's held-back window (up to {held_end}): an older model"
        )
        return GateVerdict(
            "forced" if force else "stale", f"--force: {reason}" if force else reason, live_version
        )
    # The evaluate protocol at the gate: k no longer than the candidate's lists.
    k = min(cfg.evaluation.k, output.top_k)
    pairs = consecutive_pairs(window)
    evidence = {
        "live_model_version": live_version,
        "window_start": window["event_time"].min().to_pydatetime() if len(window) else None,
        "window_end": window["event_time"].max().to_pydatetime() if len(window) else None,
        "pairs": len(pairs[0]),
        "k": k,
    }
    if len(pairs[0]) < gate.min_pairs:
        decision, reason = judge({}, {}, len(pairs[0]), k, gate, force)
        return GateVerdict(decision, reason, **evidence)
    started = time.perf_counter()
    candidate_metrics = ranking_metrics(_top_lists(output.recommendations, k), pairs, k)
    live_metrics = ranking_metrics(
        _top_lists(spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)), k),
        pairs,
        k,
    )
    decision, reason = judge(candidate_metrics, live_metrics, len(pairs[0]), k, gate, force)
    log.info("quality gate: %s in %.1fs: %s", decision, time.perf_counter() - started, reason)
    return GateVerdict(decision, reason, candidate=candidate_metrics, live=live_metrics, **evidence)


def _record_attempt(
    spark: SparkSession,
    cfg: CarouselConfig,
    output: ModelOutput,
    verdict: GateVerdict,
    force: bool,
    table_version: int | None,
) -> None:
    """One row of model_publish_log for this attempt (published or not)."""
    candidate = verdict.candidate or {}
    live = verdict.live or {}
    row = (
        datetime.now(UTC),
        output.model_version,
        verdict.decision,
        verdict.reason,
        force,
        verdict.live_model_version,
        verdict.window_start,
        verdict.window_end,
        verdict.pairs,
        verdict.k,
        candidate.get("recall@k"),
        candidate.get("mrr@k"),
        live.get("recall@k"),
        live.get("mrr@k"),
        table_version,
    )
    location = cfg.storage.table(MODEL_PUBLISH_LOG_TABLE)
    ensure(spark, cfg, MODEL_PUBLISH_LOG_TABLE)
    spark.createDataFrame([row], MODEL_PUBLISH_LOG_SCHEMA).write.format("delta").mode("append").save(location)


def publish(
    spark: SparkSession,
    cfg: CarouselConfig,
    output: ModelOutput,
    force: bool = False,
    job: str = "publish-recommendations",
) -> int:
    """Validate, judge and write ``output`` as a new table version; returns that version.

    Raises :class:`PublishRefusedError` (invalid output) or :class:`GateRefusedError` (worse than
    the live model, without ``force``); either way the live version stays and the attempt is a row
    of ``model_publish_log``. On S3, refused (:class:`JobError`, nothing written) while another
    job commits to those tables (:func:`~carousel.query_lifecycle.writing_tables`; ``job``: the
    job publishing, as its lease names it).
    """
    refused = f"model {output.model_version} not published, live recommendations unchanged"
    with writing_tables(spark, cfg, job, _PUBLISHED_TABLES, refused):
        return _publish(spark, cfg, output, force)


def _publish(spark: SparkSession, cfg: CarouselConfig, output: ModelOutput, force: bool) -> int:
    """:func:`publish`, holding the writer lease on its tables."""
    items = spark.createDataFrame([(i,) for i in output.items], "item_id string")
    failures = validation_failures(output.recommendations, items, output.top_k)
    if failures:
        reason = "; ".join(failures)
        _record_attempt(spark, cfg, output, GateVerdict("invalid", reason), force, None)
        raise PublishRefusedError(
            f"model {output.model_version} refused, live recommendations unchanged: {reason}"
        )
    verdict = quality_gate(spark, cfg, output, force)
    if not verdict.published:
        _record_attempt(spark, cfg, output, verdict, force, None)
        raise GateRefusedError(
            f"model {output.model_version} refused by the quality gate against the live model "
            f"{verdict.live_model_version}: {verdict.reason}; live recommendations unchanged "
            "(--force publishes anyway)"
        )
    if verdict.decision in ("unjudged", "forced"):
        log.warning("quality gate %s: %s", verdict.decision, verdict.reason)
    location = cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)
    table = ensure(spark, cfg, ITEM_RECOMMENDATIONS_TABLE)
    rows = output.recommendations.select(*RECOMMENDATION_COLUMNS).withColumn(
        "model_version", F.lit(output.model_version)
    )
    commit = {
        "model_version": output.model_version,
        "data_end": output.data_end,
        "gate": verdict.decision,
        "model_output": output.location,
    }
    spark.conf.set(COMMIT_METADATA_CONF, json.dumps(commit))
    try:
        rows.write.format("delta").mode("overwrite").save(location)
    finally:
        spark.conf.unset(COMMIT_METADATA_CONF)
    version = int(table.history(1).first()["version"])
    # After the commit: a crash here leaves the publish in the table's history (its commit
    # metadata names the gate's decision) without its model_publish_log row.
    _record_attempt(spark, cfg, output, verdict, force, version)
    log.info(
        "published model %s as version %d of %s (gate: %s)",
        output.model_version,
        version,
        location,
        verdict.decision,
    )
    return version


def commit_metadata(spark: SparkSession, location: str) -> list[tuple[int, dict, str, datetime]]:
    """(version, the commit's user metadata as a dict ({} when none), operation, commit time in
    UTC), newest first."""
    rows = (
        DeltaTable.forPath(spark, location)
        .history()
        .select("version", "operation", "userMetadata", F.unix_micros("timestamp").alias("micros"))
        .collect()
    )
    result = []
    for row in rows:
        metadata: dict = {}
        if row.userMetadata:
            try:
                parsed = json.loads(row.userMetadata)
            except ValueError:
                parsed = None
            metadata = parsed if isinstance(parsed, dict) else {}
        committed_at = datetime.fromtimestamp(row.micros / 1e6, UTC)  # micros: no local-zone reading
        result.append((int(row.version), metadata, str(row.operation), committed_at))
    return result


def publish_history(spark: SparkSession, location: str) -> list[tuple[int, str | None, str]]:
    """(version, model version or None, operation) of the table, newest first."""
    return [(v, m.get("model_version"), op) for v, m, op, _ in commit_metadata(spark, location)]


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
    """Restore the version live before the current model (or ``to_version``); returns it. On S3,
    refused (:class:`JobError`) while another job commits to the recommendations."""
    refused = "recommendations not rolled back"
    with writing_tables(spark, cfg, "rollback", _PUBLISHED_TABLES, refused):
        return _rollback(spark, cfg, to_version)


def _rollback(spark: SparkSession, cfg: CarouselConfig, to_version: int | None) -> int:
    """:func:`rollback`, holding the writer lease on the published tables: the version to restore is
    chosen from a history no publish changes meanwhile."""
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


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    input_location: str,
    force: bool = False,
    job: str = "publish-recommendations",
) -> int:
    """Read, validate, judge and publish the model output at ``input_location`` (``job``: the job
    publishing, :func:`publish`)."""
    client = objectstore.s3_client(cfg) if objectstore.is_s3(input_location) else None
    return publish(spark, cfg, read_model_output(spark, input_location, client), force, job)


def main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="publish-recommendations", description=__doc__.splitlines()[0])
    )
    parser.add_argument("--input", required=True, help="train output folder (local path or s3://...)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="publish even when the quality gate judges it worse than the live model (recorded as forced)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "publish-recommendations")
    spark = build_session(cfg, "carousel-publish-recommendations")
    try:
        run(spark, cfg, args.input, args.force)
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
