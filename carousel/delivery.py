"""From requests to delivered payloads: the batch steps of campaigns.

Role: the glue around :func:`carousel.ranking.rank_recommendations` used by ``jobs/campaign.py``
(one request per segment user). Real-time serving ranks with the same per-request function,
:func:`carousel.ranking.rank_request`, on the online store's profiles (:mod:`carousel.realtime`).

1. :func:`load_serving_inputs` reads the live inputs: the catalog, the published correlation
   matrix (latest, or a version pinned by an A/B arm), trending items and recent sends.
2. :func:`ranked_requests` assigns each request its campaign arm (:mod:`carousel.experiments`) and
   ranks every non-control arm in one narrow pass: one row per request, which is the render
   request of :func:`carousel.payloads.render_payloads` with the ranked items.
3. :func:`sent_rows` explodes those rows into ``sent_recommendations`` rows (one per item sent,
   one per control-group request); :func:`stored_requests` rebuilds the same rows from what a run
   stored, for a resumed run.
4. :func:`carousel.payloads.render_payloads` renders them, the catalog fields of the items coming
   from a broadcast :func:`catalog_items`; :func:`write_payloads` writes them to the channels' Kafka
   topics keyed by user id, with the payload id in a record header.

Inputs: DataFrames and :class:`~carousel.config.CarouselConfig`. Outputs: DataFrames; only
:func:`write_payloads` writes (to Kafka).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from carousel.config import CampaignConfig, CarouselConfig
from carousel.errors import JobError
from carousel.experiments import variant_column
from carousel.payloads import CATALOG_ITEM_FIELDS, CatalogItems
from carousel.ranking import (
    RANKED_ITEMS_TYPE,
    REQUEST_COLUMNS,
    newest_model_version_column,
    rank_recommendations,
    trending_items,
    trending_table,
)
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


class ServingInputError(JobError):
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
# Ranking per arm -> one row per request -> rows of sent_recommendations
# ---------------------------------------------------------------------------------------------
def _user_context() -> Column:
    attrs = F.col("user_attributes")
    return F.struct(
        *[attrs[name].alias(name) for name in USER_CONTEXT_FIELDS],
        F.col("platform").alias("platform"),
    )


# One ranked item as a campaign request carries it (the element of RANKED_ITEMS_TYPE).
_RANKED_ITEM: StructType = RANKED_ITEMS_TYPE.elementType


def _no_items() -> Column:
    return F.array().cast(RANKED_ITEMS_TYPE)


def ranked_requests(
    requests: DataFrame,
    campaign_name: str,
    campaign: CampaignConfig,
    inputs: ServingInputs,
    cfg: CarouselConfig,
    *,
    run_id: str,
    sent_at: datetime,
) -> DataFrame:
    """One render request per request of one campaign run (:data:`carousel.payloads.REQUEST_COLUMNS`).

    ``requests`` carries :data:`carousel.ranking.REQUEST_COLUMNS` (``request_id`` is the payload
    id) plus the profile's ``user_attributes`` and ``platform``. Each request gets its campaign
    arm (:mod:`carousel.experiments`) and, unless it is in the control group, its ranked items
    (:func:`carousel.ranking.rank_recommendations`, grouped: no shuffle). Control requests and
    requests whose arm finds no eligible item have no items. The rows are the render requests
    of :func:`carousel.payloads.render_payloads` with ranked items only (the catalog fields are
    filled in when rendering) and, through :func:`sent_rows`, the run's ``sent_recommendations``.
    """
    with_arm = requests.select(
        *REQUEST_COLUMNS,
        variant_column(campaign_name, campaign, F.col("user_id")).alias("variant"),
        _user_context().alias("user"),
    )
    arms = [(CONTROL_VARIANT, None)] if campaign.control_share > 0 else []
    if campaign.variants:
        arms += [(v.name, v) for v in campaign.variants]
    else:
        arms.append(("default", None))
    carried = ("user_id", "variant", "user")
    # Every arm falls back to the same trending items: computed from the events once, not per arm
    # (10-20 s each for the bench's 500k events).
    trending = trending_table(inputs.trending) if campaign.fallback != "none" else inputs.trending
    parts: list[DataFrame] = []
    for name, variant in arms:
        members = with_arm.where(F.col("variant") == name)
        if name == CONTROL_VARIANT:
            parts.append(members.select("request_id", *carried, _no_items().alias("items")))
            continue
        use_model = variant is None or variant.strategy == "model"
        model_version = variant.model_version if variant is not None else None
        parts.append(
            rank_recommendations(
                members,
                matrix=inputs.matrix(model_version) if use_model else None,
                catalog=inputs.catalog,
                trending=trending,
                sent=inputs.sent,
                campaign=campaign,
                serving=cfg.serving,
                cache_key=inputs.ranking_cache_key(model_version),
                grouped=True,
                carry=carried,
            )
        )
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.unionByName(part)
    return rows.select(
        F.col("request_id").alias("payload_id"),
        "user_id",
        F.lit(campaign_name).alias("campaign"),
        F.lit(campaign.channel).alias("channel"),
        F.lit(campaign.template).alias("template"),
        "variant",
        F.lit(None).cast("string").alias("trigger_event_id"),
        F.lit(None).cast("string").alias("trigger_event_type"),
        F.lit(run_id).alias("run_id"),
        newest_model_version_column(F.col("items.model_version")).alias("model_version"),
        F.lit(sent_at).alias("created_at"),
        "user",
        "items",
    )


def sent_rows(ranked: DataFrame) -> DataFrame:
    """The ``sent_recommendations`` rows of :func:`ranked_requests` rows: one per item sent, one
    with a NULL item per control-group request; a request without items gets none."""
    held_out = F.array(F.struct(*[F.lit(None).cast(f.dataType).alias(f.name) for f in _RANKED_ITEM.fields]))
    items = F.when(F.col("variant") == CONTROL_VARIANT, held_out).otherwise(F.col("items"))
    return (
        ranked.select("*", F.explode(items).alias("item"))
        .select(
            "payload_id",
            "user_id",
            "campaign",
            "channel",
            "variant",
            F.col("item.item_id").alias("item_id"),
            F.col("item.rank").alias("rank"),
            F.col("item.score").alias("score"),
            F.col("item.strategy").alias("strategy"),
            F.col("item.model_version").alias("model_version"),
            "trigger_event_id",
            "run_id",
            F.col("created_at").alias("sent_at"),
            F.to_date("created_at").alias("sent_date"),
        )
        .select(*SENT_RECOMMENDATIONS_SCHEMA.fieldNames())
    )


def stored_requests(stored: DataFrame, users: DataFrame, template: str) -> DataFrame:
    """:func:`ranked_requests` rows rebuilt from a run's stored ``sent_recommendations`` rows, so
    a resumed run renders exactly what was recorded. ``users``: ``payload_id, user`` (the user
    context, from the profiles now; a payload whose user left the segment renders without it)."""
    # Rank first, so that array_sort orders a payload's items by it; NULL items are hold-outs.
    item = F.struct("rank", *[name for name in _RANKED_ITEM.fieldNames() if name != "rank"])
    grouped = stored.groupBy("payload_id", "user_id", "campaign", "channel", "variant", "run_id").agg(
        F.first("trigger_event_id", ignorenulls=True).alias("trigger_event_id"),
        F.max("sent_at").alias("created_at"),
        newest_model_version_column(F.collect_list("model_version")).alias("model_version"),
        F.array_sort(F.collect_list(F.when(F.col("item_id").isNotNull(), item))).alias("items"),
    )
    return grouped.join(users, "payload_id", "left").select(
        "payload_id",
        "user_id",
        "campaign",
        "channel",
        F.lit(template).alias("template"),
        "variant",
        "trigger_event_id",
        F.lit(None).cast("string").alias("trigger_event_type"),
        "run_id",
        "model_version",
        "created_at",
        "user",
        F.transform(
            "items",
            lambda i: F.struct(*[i[name].alias(name) for name in _RANKED_ITEM.fieldNames()]),
        ).alias("items"),
    )


def user_contexts(requests: DataFrame) -> DataFrame:
    """``payload_id, user`` of segment requests (for :func:`stored_requests`)."""
    return requests.select(F.col("request_id").alias("payload_id"), _user_context().alias("user"))


def catalog_items(inputs: ServingInputs) -> CatalogItems:
    """The catalog fields of every product, collected once for the render tasks' broadcast."""
    return CatalogItems(inputs.catalog.select("item_id", *CATALOG_ITEM_FIELDS).toArrow())


def write_payloads(rendered: DataFrame, cfg: CarouselConfig) -> None:
    """Write rendered payloads (``topic, key, value, payload_id``) to Kafka, payload id as a header,
    with the ``kafka.producer`` settings (compression)."""
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
        .options(**cfg.kafka.spark_sink_options())
        .save()
    )
