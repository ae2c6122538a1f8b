"""The one ranking function shared by real-time serving and batch campaigns, and trending items.

Role: turn *requests* (one per trigger event or per campaign-run user) into the top N items each
request gets, with the strategy that produced every item. ``streaming/serve.py`` calls it inside
each micro-batch and ``jobs/campaign.py`` on a whole segment, so both paths rank identically.
Everything here is a pure ``DataFrame -> DataFrame`` transform; readers and writers live in the
jobs.

How a request is ranked (:func:`rank_recommendations`):

1. **Seeds**: the trigger's own item (weight 1), then the user's most recent viewed and purchased
   items from the profile, newest first (``serving.recent_items_used`` of each; weight
   ``recency_decay ** position``, purchases times ``purchase_weight``).
2. **Model candidates**: each seed's top-k list in the correlation matrix; an item's score is the
   sum over seeds of ``seed weight x score / best score in that seed's list`` (so every model's
   scores count on the same 0..1 scale).
3. **Filters** (campaign ``filters``): only active catalog products pass, then in-stock, category,
   price range, rating and any property predicate.
4. **Exclusions** (campaign ``exclusions``): the trigger item; items viewed / purchased within N
   days (from the profile's recent items); items sent to the user within N days (any campaign,
   not counting this request's own payload, so a replay ranks the same); listed item ids.
5. **Fallback**: when fewer than N model items survive (new users, short lists), trending items
   fill the remaining slots - first trending in the categories of the user's seeds
   (``trending_category``), then overall (``trending``) - after the same filters and exclusions.
6. **Rank**: model items first (by score), then category trending, then trending; the top N.

Trending (:func:`trending_items`) is recent popularity with exponential time decay: each event in
the last ``lookback_days`` adds ``event weight x 0.5 ** (age / half_life)``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from carousel.config import CampaignConfig, PropertyPredicate, ServingConfig, TrendingConfig
from carousel.schemas import (
    CATALOG_PROPERTY_COLUMNS,
    STRATEGY_MODEL,
    STRATEGY_TRENDING,
    STRATEGY_TRENDING_CATEGORY,
)

# Columns a request frame must carry (more are allowed and ignored).
REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id",
    "user_id",
    "requested_at",
    "trigger_item_id",
    "recent_views",
    "recent_purchases",
)
# The ranker's output, one row per (request, item).
RANKED_COLUMNS: tuple[str, ...] = ("request_id", "item_id", "rank", "score", "strategy", "model_version")
RANKED_DDL = (
    "request_id string, item_id string, rank int, score double, strategy string, model_version string"
)
# Fallback lists carry this many items more than the slots to fill, so that exclusions (recent
# views and purchases, recent sends) rarely leave a request short.
FALLBACK_PADDING = 30

_PRIORITY = {STRATEGY_MODEL: 0, STRATEGY_TRENDING_CATEGORY: 1, STRATEGY_TRENDING: 2}
_SECONDS_PER_DAY = 86400.0


# ---------------------------------------------------------------------------------------------
# Trending
# ---------------------------------------------------------------------------------------------
def trending_items(
    events: DataFrame, catalog: DataFrame, trending: TrendingConfig, now: datetime
) -> DataFrame:
    """Decayed popularity per item (``item_id, category, score``), top ``top_n`` overall plus the top
    ``per_category_top_n`` of every category; only products in ``catalog`` are kept."""
    since = now - timedelta(days=trending.lookback_days)
    weights = F.create_map(*[F.lit(x) for kv in trending.event_weights.items() for x in kv])
    age_hours = (F.lit(now).cast("double") - F.col("event_time").cast("double")) / 3600.0
    scored = (
        events.where(
            (F.col("event_date") >= F.lit(since.date()))
            & (F.col("event_time") >= F.lit(since))
            & (F.col("event_time") <= F.lit(now))
            & F.col("event_type").isin(list(trending.event_weights))
            & F.col("item_id").isNotNull()
        )
        .groupBy("item_id")
        .agg(
            F.sum(
                weights[F.col("event_type")] * F.pow(F.lit(0.5), age_hours / trending.half_life_hours)
            ).alias("score")
        )
        .where(F.col("score") > 0)
        .join(catalog.select("item_id", "category"), "item_id")
    )
    overall = Window.orderBy(F.desc("score"), "item_id")
    per_category = Window.partitionBy("category").orderBy(F.desc("score"), "item_id")
    ranked = scored.withColumn("_overall", F.row_number().over(overall)).withColumn(
        "_in_category", F.row_number().over(per_category)
    )
    keep = F.col("_overall") <= trending.top_n
    if trending.per_category_top_n:
        keep = keep | (F.col("category").isNotNull() & (F.col("_in_category") <= trending.per_category_top_n))
    return ranked.where(keep).select("item_id", "category", F.col("score").cast("double").alias("score"))


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------
def _property(name: str) -> Column:
    """A first-class catalog column, or a free-form property (text) by name."""
    return F.col(name) if name in CATALOG_PROPERTY_COLUMNS else F.col("properties")[name]


def _predicate(pred: PropertyPredicate) -> Column:
    column = _property(pred.property)
    if pred.op in ("gt", "ge", "lt", "le"):
        number = column.cast("double")
        value = F.lit(float(pred.value))  # type: ignore[arg-type]  # validated as a number
        return {"gt": number > value, "ge": number >= value, "lt": number < value, "le": number <= value}[
            pred.op
        ]
    text = column.cast("string")
    if pred.op in ("in", "not_in"):
        values = [str(v).lower() if isinstance(v, bool) else str(v) for v in pred.value]  # type: ignore[union-attr]
        inside = text.isin(values)
        return inside if pred.op == "in" else (text.isNull() | ~inside)
    value = str(pred.value).lower() if isinstance(pred.value, bool) else str(pred.value)
    if pred.op == "eq":
        return text == F.lit(value)
    if pred.op == "ne":
        return text.isNull() | (text != F.lit(value))
    return text.contains(value)  # contains


def eligible_items(catalog: DataFrame, campaign: CampaignConfig) -> DataFrame:
    """The active catalog products that pass the campaign's filters (``item_id``, ``category``)."""
    filters = campaign.filters
    condition = F.col("active")
    if filters.in_stock_only:
        # Unknown stock is not "out of stock": only an explicit false excludes the product.
        condition = condition & F.coalesce(F.col("in_stock"), F.lit(True))
    if filters.categories:
        condition = condition & F.col("category").isin(list(filters.categories))
    if filters.min_price is not None:
        condition = condition & (F.col("price") >= filters.min_price)
    if filters.max_price is not None:
        condition = condition & (F.col("price") <= filters.max_price)
    if filters.min_rating is not None:
        condition = condition & (F.col("rating") >= filters.min_rating)
    for pred in filters.where:
        condition = condition & F.coalesce(_predicate(pred), F.lit(False))
    return catalog.where(condition).select("item_id", "category")


# ---------------------------------------------------------------------------------------------
# Seeds, exclusions, candidates
# ---------------------------------------------------------------------------------------------
def seed_items(requests: DataFrame, serving: ServingConfig) -> DataFrame:
    """(request_id, seed_item_id, weight): the trigger item and the user's recent items."""
    used = serving.recent_items_used

    def recent(column: str, factor: float) -> DataFrame:
        return (
            requests.select("request_id", F.posexplode_outer(F.slice(F.col(column), 1, used)))
            .where(F.col("col").isNotNull())
            .select(
                "request_id",
                F.col("col.item_id").alias("seed_item_id"),
                (F.lit(factor) * F.pow(F.lit(serving.recency_decay), F.col("pos"))).alias("weight"),
            )
        )

    trigger = requests.where(F.col("trigger_item_id").isNotNull()).select(
        "request_id", F.col("trigger_item_id").alias("seed_item_id"), F.lit(1.0).alias("weight")
    )
    seeds = trigger.unionByName(recent("recent_views", 1.0)).unionByName(
        recent("recent_purchases", serving.purchase_weight)
    )
    # An item seen as a view and a purchase (or also the trigger) counts once, at its best weight.
    return seeds.groupBy("request_id", "seed_item_id").agg(F.max("weight").alias("weight"))


def excluded_items(
    requests: DataFrame, sent: DataFrame | None, campaign: CampaignConfig, small_batch: bool = False
) -> DataFrame:
    """(request_id, item_id) pairs the request must not get."""
    rules = campaign.exclusions
    parts = [
        requests.where(F.col("trigger_item_id").isNotNull()).select(
            "request_id", F.col("trigger_item_id").alias("item_id")
        )
    ]

    def recent_within(column: str, days: float) -> DataFrame:
        since = F.col("requested_at") - F.make_dt_interval(secs=F.lit(days * _SECONDS_PER_DAY))
        return (
            requests.select("request_id", "requested_at", F.explode_outer(column).alias("r"))
            .where(F.col("r.item_id").isNotNull() & (F.col("r.event_time") >= since))
            .select("request_id", F.col("r.item_id").alias("item_id"))
        )

    if rules.viewed_within_days > 0:
        parts.append(recent_within("recent_views", rules.viewed_within_days))
    if rules.purchased_within_days > 0:
        parts.append(recent_within("recent_purchases", rules.purchased_within_days))
    if rules.sent_within_days > 0 and sent is not None:
        window = F.make_dt_interval(secs=F.lit(rules.sent_within_days * _SECONDS_PER_DAY))
        r, s = (F.broadcast(requests) if small_batch else requests).alias("r"), sent.alias("s")
        parts.append(
            r.join(
                s,
                (F.col("r.user_id") == F.col("s.user_id"))
                & F.col("s.item_id").isNotNull()
                & (F.col("s.payload_id") != F.col("r.request_id"))
                & (F.col("s.sent_at") >= F.col("r.requested_at") - window),
            ).select(F.col("r.request_id").alias("request_id"), F.col("s.item_id").alias("item_id"))
        )
    if rules.item_ids:
        listed = requests.sparkSession.createDataFrame([(i,) for i in rules.item_ids], "item_id string")
        parts.append(requests.select("request_id").crossJoin(F.broadcast(listed)))
    excluded = parts[0]
    for part in parts[1:]:
        excluded = excluded.unionByName(part)
    return excluded.distinct()


def model_candidates(seeds: DataFrame, matrix: DataFrame, small_batch: bool = False) -> DataFrame:
    """(request_id, item_id, score, model_version) from the seeds' lists in the correlation matrix.

    ``small_batch``: the seeds are few (a streaming micro-batch). They are then broadcast, so the
    matrix is only scanned, never shuffled, and each list's best score is taken after the join
    (every row of a seed's list survives the join, so it is the same maximum).
    """
    if small_batch:
        joined = matrix.join(F.broadcast(seeds), matrix["item_id"] == seeds["seed_item_id"])
        best = F.max("score").over(Window.partitionBy("request_id", "seed_item_id"))
    else:
        # Many requests: one maximum per item over the whole matrix, then the join.
        with_best = matrix.withColumn("_best", F.max("score").over(Window.partitionBy("item_id")))
        joined = with_best.join(seeds, with_best["item_id"] == seeds["seed_item_id"])
        best = F.col("_best")
    relative = (F.col("score") / best).alias("relative")
    return _sum_candidates(joined.select("request_id", "rec_item_id", "model_version", "weight", relative))


def _sum_candidates(scored: DataFrame) -> DataFrame:
    return (
        scored.where(F.col("relative") > 0)
        .groupBy("request_id", F.col("rec_item_id").alias("item_id"))
        .agg(
            F.sum(F.col("weight") * F.col("relative")).alias("score"),
            F.max("model_version").alias("model_version"),
        )
    )


# ---------------------------------------------------------------------------------------------
# The ranking function
# ---------------------------------------------------------------------------------------------
def rank_recommendations(
    requests: DataFrame,
    *,
    matrix: DataFrame | None,
    catalog: DataFrame,
    trending: DataFrame,
    sent: DataFrame | None,
    campaign: CampaignConfig,
    serving: ServingConfig,
    small_batch: bool = False,
) -> DataFrame:
    """The top ``campaign.items`` items per request (see the module docstring for the rules).

    ``requests`` carries :data:`REQUEST_COLUMNS`; ``matrix`` the published correlation matrix
    (``item_id, rank, rec_item_id, score, model_version``) or ``None`` for a trending-only arm;
    ``catalog`` the catalog table (CATALOG_SCHEMA); ``trending`` the output of
    :func:`trending_items`; ``sent`` the ``sent_recommendations`` rows to honour
    ``exclusions.sent_within_days`` (or ``None``). Returns :data:`RANKED_COLUMNS`, rank 1 = best;
    a request with no eligible item gets no rows. ``small_batch`` (streaming micro-batches):
    the per-request frames are broadcast, so the matrix, catalog and sends are scanned but never
    shuffled - the same result, far fewer shuffle stages per batch.
    """
    slots = campaign.items
    eligible = eligible_items(catalog, campaign)
    requests = requests.select(*REQUEST_COLUMNS)
    excluded = excluded_items(requests, sent, campaign, small_batch)
    small = F.broadcast if small_batch else (lambda frame: frame)

    def admissible(candidates: DataFrame) -> DataFrame:
        return (
            small(candidates)
            .join(eligible.select("item_id"), "item_id")
            .join(excluded, ["request_id", "item_id"], "left_anti")
        )

    seeds = seed_items(requests, serving)
    frames: list[DataFrame] = []
    model_count = requests.select("request_id").withColumn("_found", F.lit(0))
    if matrix is not None:
        model = admissible(model_candidates(seeds, matrix, small_batch)).withColumn(
            "strategy", F.lit(STRATEGY_MODEL)
        )
        model = model.withColumn(
            "_n", F.row_number().over(Window.partitionBy("request_id").orderBy(F.desc("score"), "item_id"))
        ).where(F.col("_n") <= slots)
        frames.append(model.drop("_n"))
        model_count = model.groupBy("request_id").agg(F.count(F.lit(1)).alias("_found"))

    if campaign.fallback != "none":
        short = (
            requests.select("request_id")
            .join(model_count, "request_id", "left")
            .where(F.coalesce(F.col("_found"), F.lit(0)) < slots)
            .select("request_id")
        )
        pool = trending.join(eligible.select("item_id"), "item_id")
        depth = slots + FALLBACK_PADDING
        overall = pool.withColumn("_n", F.row_number().over(Window.orderBy(F.desc("score"), "item_id")))
        overall = overall.where(F.col("_n") <= depth).select("item_id", "score")
        frames.append(
            admissible(short.crossJoin(F.broadcast(overall)))
            .withColumn("model_version", F.lit(None).cast("string"))
            .withColumn("strategy", F.lit(STRATEGY_TRENDING))
        )
        if campaign.fallback == "trending_category":
            by_category = pool.where(F.col("category").isNotNull()).withColumn(
                "_n", F.row_number().over(Window.partitionBy("category").orderBy(F.desc("score"), "item_id"))
            )
            by_category = by_category.where(F.col("_n") <= depth).select("item_id", "category", "score")
            seed_categories = (
                small(seeds.join(short, "request_id"))
                .join(catalog.select(F.col("item_id").alias("seed_item_id"), "category"), "seed_item_id")
                .where(F.col("category").isNotNull())
                .select("request_id", "category")
                .distinct()
            )
            frames.append(
                admissible(seed_categories.join(F.broadcast(by_category), "category").drop("category"))
                .withColumn("model_version", F.lit(None).cast("string"))
                .withColumn("strategy", F.lit(STRATEGY_TRENDING_CATEGORY))
            )

    if not frames:
        return requests.sparkSession.createDataFrame([], RANKED_DDL)
    candidates = frames[0]
    for frame in frames[1:]:
        candidates = candidates.unionByName(frame)
    priority = F.create_map(*[F.lit(x) for kv in _PRIORITY.items() for x in kv])
    candidates = candidates.withColumn("_priority", priority[F.col("strategy")])
    # An item offered by several strategies keeps its best one.
    best_strategy = Window.partitionBy("request_id", "item_id").orderBy("_priority", F.desc("score"))
    candidates = candidates.withColumn("_keep", F.row_number().over(best_strategy)).where(F.col("_keep") == 1)
    order = Window.partitionBy("request_id").orderBy("_priority", F.desc("score"), "item_id")
    return (
        candidates.withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= slots)
        .select(
            "request_id",
            "item_id",
            F.col("rank").cast("int").alias("rank"),
            F.col("score").cast("double").alias("score"),
            "strategy",
            "model_version",
        )
    )
