"""From requests to delivered payloads: the batch steps of campaigns.

Role: the glue around :func:`carousel.ranking.rank_recommendations` used by ``jobs/campaign.py``
(one request per segment user). Real-time serving ranks with the same per-request function,
:func:`carousel.ranking.rank_request`, on the online store's profiles (:mod:`carousel.realtime`).

1. :func:`load_serving_inputs` reads the live inputs: the catalog, the published correlation
   matrix (latest, or a version pinned by an A/B arm), trending items and recent sends.
2. :func:`sent_rows` assigns each request its campaign arm (:mod:`carousel.experiments`), ranks
   every non-control arm, and returns the ``sent_recommendations`` rows: one per item sent and one
   per control-group request.
3. The caller appends those rows to Delta idempotently, then reads back what was stored for its
   run (so a replay after a crash renders exactly what was recorded), and
   :func:`payload_requests` turns the stored rows into render requests enriched with the catalog.
4. :func:`carousel.payloads.render_payloads` renders them; :func:`write_payloads` writes them to
   the channels' Kafka topics keyed by user id, with the payload id in a record header.

Inputs: DataFrames and :class:`~carousel.config.CarouselConfig`. Outputs: DataFrames; only
:func:`write_payloads` writes (to Kafka).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel.config import CampaignConfig, CarouselConfig
from carousel.experiments import variant_column
from carousel.payloads import CATALOG_ITEM_FIELDS, PAYLOAD_ITEM_FIELDS
from carousel.ranking import rank_recommendations, trending_items
from carousel.schemas import (
    CATALOG_SCHEMA,
    CATALOG_TABLE,
    CONTROL_VARIANT,
    EVENTS_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    PAYLOAD_ID_HEADER,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
    TRENDING_SCHEMA,
)
from carousel.storage import read_snapshot, table_exists

log = logging.getLogger(__name__)

# The user attributes a template can use (from the profile; platform from the trigger or profile).
USER_CONTEXT_FIELDS: tuple[str, ...] = ("age", "gender", "city", "country", "language")


class ServingInputError(RuntimeError):
    """A table serving needs is missing; the message says which and how to create it."""


@dataclass(frozen=True)
class ServingInputs:
    """The live inputs of one micro-batch or campaign run."""

    catalog: DataFrame
    trending: DataFrame
    sent: DataFrame | None
    matrices: dict[str | None, DataFrame | None]  # model version (None = latest) -> matrix
    # The Delta versions read (None = unknown): the catalog's, and each matrix's by model version.
    catalog_version: int | None = None
    matrix_versions: dict[str | None, int | None] = field(default_factory=dict)

    def matrix(self, model_version: str | None) -> DataFrame | None:
        return self.matrices.get(model_version)

    def ranking_cache_key(self, model_version: str | None) -> tuple[int, int | None] | None:
        """What identifies the ranking lists of an arm: the catalog's and its matrix's versions."""
        if self.catalog_version is None:
            return None
        return (self.catalog_version, self.matrix_versions.get(model_version))


def read_catalog_snapshot(spark: SparkSession, cfg: CarouselConfig) -> tuple[DataFrame, int]:
    """The live catalog, pinned to its current Delta version, and that version."""
    location = cfg.storage.table(CATALOG_TABLE)
    if not table_exists(spark, location):
        raise ServingInputError(
            f"no product catalog at {location}: upload one first (./spark-submit.sh upload-catalog FILE)"
        )
    catalog, version = read_snapshot(spark, location)
    return catalog.select(*CATALOG_SCHEMA.fieldNames()), version


def read_catalog(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    return read_catalog_snapshot(spark, cfg)[0]


def read_matrix_snapshot(
    spark: SparkSession, cfg: CarouselConfig, model_version: str | None = None
) -> tuple[DataFrame | None, int | None]:
    """The live correlation matrix, or the latest published version of ``model_version``, and
    its Delta version; ``(None, None)`` when nothing was published yet (trending items only)."""
    location = cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)
    if not table_exists(spark, location):
        log.warning("no published recommendations at %s yet: serving trending items only", location)
        return None, None
    if model_version is None:
        return read_snapshot(spark, location)
    from jobs.publish_recommendations import publish_history  # a job module: imported when needed

    versions = [v for v, model, operation in publish_history(spark, location) if model == model_version]
    if not versions:
        raise ServingInputError(f"model version {model_version!r} was never published to {location}")
    return read_snapshot(spark, location, max(versions))


def compute_trending(
    spark: SparkSession, cfg: CarouselConfig, catalog: DataFrame, now: datetime
) -> DataFrame:
    location = cfg.storage.table(EVENTS_TABLE)
    if not table_exists(spark, location):
        log.warning("no events table at %s yet: no trending items", location)
        return spark.createDataFrame([], TRENDING_SCHEMA).drop("computed_at")
    events = spark.read.format("delta").load(location)
    return trending_items(events, catalog.where("active"), cfg.serving.trending, now)


def read_recent_sends(spark: SparkSession, cfg: CarouselConfig, now: datetime) -> DataFrame | None:
    """Sends within the longest ``sent_within_days`` of any campaign (None when no campaign asks)."""
    days = max((c.exclusions.sent_within_days for c in cfg.campaigns.values()), default=0)
    location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    if days <= 0 or not table_exists(spark, location):
        return None
    since = now - timedelta(days=days)
    return (
        spark.read.format("delta")
        .load(location)
        .where((F.col("sent_date") >= F.lit(since.date())) & F.col("item_id").isNotNull())
        .select("payload_id", "user_id", "item_id", "sent_at")
    )


def load_serving_inputs(
    spark: SparkSession,
    cfg: CarouselConfig,
    campaigns: dict[str, CampaignConfig],
    now: datetime,
    trending: DataFrame | None = None,
    catalog: tuple[DataFrame, int] | None = None,
) -> ServingInputs:
    """Read the live inputs for ``campaigns``.

    The catalog (a :func:`read_catalog_snapshot`) is read and trending computed unless given.
    """
    catalog_frame, catalog_version = catalog if catalog is not None else read_catalog_snapshot(spark, cfg)
    wanted: set[str | None] = {None}
    for campaign in campaigns.values():
        wanted |= {v.model_version for v in campaign.variants if v.strategy == "model"}
    snapshots = {version: read_matrix_snapshot(spark, cfg, version) for version in wanted}
    return ServingInputs(
        catalog=catalog_frame,
        trending=trending if trending is not None else compute_trending(spark, cfg, catalog_frame, now),
        sent=read_recent_sends(spark, cfg, now),
        matrices={model: frame for model, (frame, _) in snapshots.items()},
        catalog_version=catalog_version,
        matrix_versions={model: version for model, (_, version) in snapshots.items()},
    )


# ---------------------------------------------------------------------------------------------
# Ranking per arm -> rows of sent_recommendations
# ---------------------------------------------------------------------------------------------
def sent_rows(
    requests: DataFrame,
    campaign_name: str,
    campaign: CampaignConfig,
    inputs: ServingInputs,
    cfg: CarouselConfig,
    *,
    run_id: str,
    sent_at: datetime,
    small_batch: bool = False,
) -> DataFrame:
    """The ``sent_recommendations`` rows for ``requests`` of one campaign.

    ``requests`` carries :data:`carousel.ranking.REQUEST_COLUMNS` (``request_id`` is the payload
    id) plus ``trigger_event_id``. Control-group requests get one row with NULL item; a request
    whose arm finds no eligible item gets no row (and so no payload).
    """
    with_arm = requests.withColumn("variant", variant_column(campaign_name, campaign, F.col("user_id")))
    arms = [(CONTROL_VARIANT, None)] if campaign.control_share > 0 else []
    if campaign.variants:
        arms += [(v.name, v) for v in campaign.variants]
    else:
        arms.append(("default", None))
    # The arm of every request is needed once per arm below.
    with_arm = with_arm.persist()

    def stamp(frame: DataFrame) -> DataFrame:
        return frame.select(
            F.col("request_id").alias("payload_id"),
            "user_id",
            F.lit(campaign_name).alias("campaign"),
            F.lit(campaign.channel).alias("channel"),
            "variant",
            "item_id",
            "rank",
            "score",
            "strategy",
            "model_version",
            "trigger_event_id",
            F.lit(run_id).alias("run_id"),
            F.lit(sent_at).alias("sent_at"),
            F.lit(sent_at.date()).alias("sent_date"),
        )

    parts: list[DataFrame] = []
    for name, variant in arms:
        members = with_arm.where(F.col("variant") == name)
        if name == CONTROL_VARIANT:
            parts.append(
                stamp(
                    members.select(
                        "*",
                        F.lit(None).cast("string").alias("item_id"),
                        F.lit(None).cast("int").alias("rank"),
                        F.lit(None).cast("double").alias("score"),
                        F.lit(None).cast("string").alias("strategy"),
                        F.lit(None).cast("string").alias("model_version"),
                    )
                )
            )
            continue
        use_model = variant is None or variant.strategy == "model"
        matrix = inputs.matrix(variant.model_version if variant is not None else None) if use_model else None
        ranked = rank_recommendations(
            members,
            matrix=matrix,
            catalog=inputs.catalog,
            trending=inputs.trending,
            sent=inputs.sent,
            campaign=campaign,
            serving=cfg.serving,
            small_batch=small_batch,
            cache_key=inputs.ranking_cache_key(variant.model_version if variant is not None else None),
        )
        parts.append(
            stamp(
                ranked.join(
                    members.select("request_id", "user_id", "variant", "trigger_event_id"), "request_id"
                )
            )
        )
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.unionByName(part)
    return rows.select(*SENT_RECOMMENDATIONS_SCHEMA.fieldNames())


# ---------------------------------------------------------------------------------------------
# Stored rows -> render requests -> Kafka
# ---------------------------------------------------------------------------------------------
def _user_context(profile_prefix: str = "") -> Column:
    attrs = F.col(f"{profile_prefix}user_attributes")
    return F.struct(
        *[attrs[name].alias(name) for name in USER_CONTEXT_FIELDS],
        F.col("platform").alias("platform"),
    )


def payload_requests(
    stored: DataFrame,
    catalog: DataFrame,
    context: DataFrame,
    templates: dict[str, str],
    small_batch: bool = False,
) -> DataFrame:
    """Render requests (the input of :func:`carousel.payloads.render_payloads`) for stored sends.

    ``stored``: ``sent_recommendations`` rows of one batch/run (control rows are skipped);
    ``context``: one row per payload id with ``payload_id, trigger_event_type, run_id`` and the
    user's ``user_attributes`` struct and ``platform``; ``templates``: campaign -> template name.
    ``small_batch``: the stored rows are few and are broadcast against the catalog.
    """
    sent = stored.where(F.col("item_id").isNotNull())
    products = catalog.select("item_id", *CATALOG_ITEM_FIELDS)
    if small_batch:
        # Broadcast the few sent item ids (inner join: an outer join can't broadcast its kept side).
        products = products.join(F.broadcast(sent.select("item_id").distinct()), "item_id")
    enriched = sent.join(products, "item_id", "left")
    # Rank first, so that array_sort orders a payload's items by it.
    item = F.struct("rank", *[name for name in PAYLOAD_ITEM_FIELDS if name != "rank"])
    template = F.create_map(*[F.lit(x) for kv in templates.items() for x in kv])
    grouped = enriched.groupBy("payload_id", "campaign", "channel", "variant", "user_id").agg(
        F.first("trigger_event_id").alias("trigger_event_id"),
        F.max("model_version").alias("model_version"),
        F.max("sent_at").alias("created_at"),
        F.array_sort(F.collect_list(item)).alias("items"),
    )
    return grouped.join(context, "payload_id", "left").select(
        "payload_id",
        "campaign",
        "channel",
        template[F.col("campaign")].alias("template"),
        "variant",
        "user_id",
        "trigger_event_id",
        "trigger_event_type",
        "run_id",
        "model_version",
        "created_at",
        _user_context().alias("user"),
        F.transform(
            "items", lambda i: F.struct(*[i[name].alias(name) for name in PAYLOAD_ITEM_FIELDS])
        ).alias("items"),
    )


def write_payloads(rendered: DataFrame, cfg: CarouselConfig) -> None:
    """Write rendered payloads (``topic, key, value, payload_id``) to Kafka, payload id as a header."""
    (
        rendered.select(
            "topic",
            F.col("key").cast("string").alias("key"),
            F.col("value").cast("string").alias("value"),
            F.array(
                F.struct(
                    F.lit(PAYLOAD_ID_HEADER).alias("key"), F.col("payload_id").cast("binary").alias("value")
                )
            ).alias("headers"),
        )
        .write.format("kafka")
        .options(**cfg.kafka.spark_options())
        .save()
    )
