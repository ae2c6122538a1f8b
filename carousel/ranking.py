"""The one ranking function shared by real-time serving and batch campaigns, and trending items.

Role: turn *requests* (one per trigger event or per campaign-run user) into the top N items each
request gets, with the strategy that produced every item. ``streaming/serve.py`` calls it inside
each micro-batch and ``jobs/campaign.py`` on a whole segment, so both paths rank identically.
Readers and writers live in the jobs; here are ``DataFrame -> DataFrame`` transforms and the
plain per-request functions they run (:func:`rank_request`, unit-testable without Spark).

How it runs: the correlation matrix, cut to the campaign's eligible products, and the catalog
categories are collected once to the driver as compact arrays (:class:`ItemLists`, about 12
bytes per list entry: 100k items x 20 is ~25 MB) and broadcast, reused while the matrix and
catalog versions stay the same (``cache_key``). Each request is then ranked where it lies
(``mapInArrow``), with no shuffle - the same code for a 20-trigger micro-batch and a 10M-user
campaign. The matrix must fit in executor memory; at millions of items, raise executor memory.

How a request is ranked (:func:`rank_recommendations`):

1. **Seeds**: the trigger's own item (weight 1), then the user's most recent viewed and purchased
   items from the profile, newest first (``serving.recent_items_used`` of each; weight
   ``recency_decay ** position``, purchases times ``purchase_weight``).
2. **Model candidates**: each seed's top-k list in the correlation matrix; an item's score is the
   sum over seeds of ``seed weight x relative score``, where the relative score is the item's
   score min-max scaled over the seed's whole published list: ``(score - lowest) / (best -
   lowest)``, 1 for the best, 0 for the last (1 for every item of a list whose scores are all
   equal, or of a one-item list). Models publish cosines, co-occurrence counts, logits with a
   per-item bias and z-scores; min-max holds for any real score and is unchanged when a list's
   scores are shifted or scaled by a positive factor, so every model's lists count on the same
   0..1 scale. (Dividing by the best score did not: a negative score flipped the order, and a
   per-list offset decided how much each seed counted.) Min-max rather than ranks keeps the
   model's gaps (a clear favourite counts more than a near tie), and it is continuous at the
   top-k cut: the last listed item counts 0, like the first one the model left out.
3. **Filters** (campaign ``filters``): only active catalog products pass, then in-stock, category,
   price range, rating and any property predicate.
4. **Exclusions** (campaign ``exclusions``): the trigger item; items viewed / purchased within N
   days (from the profile's recent items); items sent to the user within N days (any campaign,
   not counting this request's own payload, so a replay ranks the same); listed item ids.
5. **Fallback**: when fewer than N model items survive (new users, short lists), trending items
   fill the remaining slots - first trending in the categories of the user's seeds
   (``trending_category``), then trending among users like them (``trending_segment``: the first
   of ``serving.trending.segments`` the user falls in whose segment is large enough, e.g. their
   country and city, else their country, ...), then overall (``trending``) - after the same
   filters and exclusions.
6. **New products** (``serving.cold_start``): a catalog product the matrix has no list for gets
   its content neighbours as its list (:mod:`carousel.content`, model version
   :data:`CONTENT_LISTS_VERSION`), and up to ``exploration_share`` of the slots go to new
   products of the same category that resemble the seeds (strategy ``new_item``).
7. **Rank**: model items first (by score), then new items, then category, segment and overall
   trending; the top N.

Trending (:func:`trending_items`) is recent popularity with exponential time decay: each event in
the last ``lookback_days`` adds ``event weight x 0.5 ** (age / half_life)``; overall, per
category, and per user segment (:func:`segment_keys`: the same function names a request's
segments and the segments trending is computed for).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.broadcast import Broadcast
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, StringType, StructField, StructType

from carousel.arrow_rows import batch_rows
from carousel.config import (
    CampaignConfig,
    CampaignFilters,
    ColdStartConfig,
    PropertyPredicate,
    ServingConfig,
    TrendingConfig,
)
from carousel.content import content_neighbours, tfidf_matrix
from carousel.schemas import (
    CATALOG_PROPERTY_COLUMNS,
    MODEL_VERSION_TIME_PATTERN,
    PUSH,
    STRATEGY_MODEL,
    STRATEGY_NEW_ITEM,
    STRATEGY_TRENDING,
    STRATEGY_TRENDING_CATEGORY,
    STRATEGY_TRENDING_SEGMENT,
    USER_ATTRIBUTES_SCHEMA,
)

# The model version of a new product's content list (carousel.content): what sent rows report.
CONTENT_LISTS_VERSION = "content-tfidf"
_MODEL_VERSION_TIME = re.compile(MODEL_VERSION_TIME_PATTERN)


def model_version_key(version: str) -> tuple[str, str]:
    """A model version's place in time: (its fit time, or '' when it has none; the version)."""
    found = _MODEL_VERSION_TIME.search(version)
    return (found.group(1) if found else "", version)


def newest_model_version(versions: Iterable[str | None]) -> str | None:
    """The newest of a payload's or an item's model versions (:func:`model_version_key`); None
    when none has one. The one rule for serve, the API and campaigns
    (:func:`newest_model_version_column` in Spark)."""
    known = {version for version in versions if version is not None}
    if len(known) <= 1:  # the common case: one model's lists
        return next(iter(known), None)
    return max(known, key=model_version_key)


def newest_model_version_column(versions: Column) -> Column:
    """:func:`newest_model_version` of an array column of versions."""
    keyed = F.transform(
        versions,
        lambda version: F.struct(
            F.regexp_extract(version, MODEL_VERSION_TIME_PATTERN, 1).alias("time"), version.alias("version")
        ),
    )
    return F.array_max(F.filter(keyed, lambda entry: entry["version"].isNotNull()))["version"]


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

_PRIORITY = {
    STRATEGY_MODEL: 0,
    STRATEGY_NEW_ITEM: 1,
    STRATEGY_TRENDING_CATEGORY: 2,
    STRATEGY_TRENDING_SEGMENT: 3,
    STRATEGY_TRENDING: 4,
}
# Request columns used when present: the user's attributes and platform (their trending segment).
CONTEXT_COLUMNS: tuple[str, ...] = ("user_attributes", "platform")
_MICROS_PER_DAY = 86_400_000_000

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# User segments (cold users' trending)
# ---------------------------------------------------------------------------------------------
def age_band(age: Any, edges: Sequence[int]) -> str | None:
    """``age`` as a band of ``edges``: (18, 25) gives "<18", "18-24", "25+" (None: no usable age)."""
    if age is None or isinstance(age, bool) or not edges:
        return None
    try:
        years = int(age)
    except (TypeError, ValueError):
        return None
    if years < edges[0]:
        return f"<{edges[0]}"
    for low, high in zip(edges, edges[1:], strict=False):
        if years < high:
            return f"{low}-{high - 1}"
    return f"{edges[-1]}+"


def segment_keys(
    context: Mapping[str, Any] | None, segments: Sequence[Sequence[str]], age_bands: Sequence[int]
) -> list[str]:
    """The user's segments, in the order of ``segments`` (most specific first), as keys such as
    ``country=PT&city=Porto``; a definition the user lacks an attribute of is left out.

    ``context``: the user attributes (``age, gender, city, country, language``) and ``platform``.
    The one rule for both sides: trending per segment is computed with it, requests are matched
    with it.
    """
    if not context:
        return []
    keys = []
    for definition in segments:
        parts = []
        for name in definition:
            value = age_band(context.get("age"), age_bands) if name == "age_band" else context.get(name)
            if value is None or value == "":
                break
            parts.append(f"{name}={value}")
        else:
            keys.append("&".join(parts))
    return keys


def _user_segments(events: DataFrame, trending: TrendingConfig) -> DataFrame:
    """(user_id, segment): each user's segments, from their latest attributes and platform.

    Each attribute is its latest known value (an event without it does not erase it), as the
    profiles keep them, so a user falls in the same segments here as in their profile."""

    def latest_known(value: Column) -> Column:
        # max_by skips rows whose ordering is NULL: the events that do not carry the value.
        return F.max_by(value, F.when(value.isNotNull(), F.col("event_time")))

    attributes = F.col("user_attributes")
    latest = events.groupBy("user_id").agg(
        F.struct(*[latest_known(attributes[f]).alias(f) for f in USER_ATTRIBUTES_SCHEMA.fieldNames()]).alias(
            "user_attributes"
        ),
        latest_known(F.col("device.platform")).alias("platform"),
    )
    segments, bands = trending.segments, trending.age_bands

    def keys(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            users, found = [], []
            for row in batch_rows(batch):
                context = {**(row["user_attributes"] or {}), "platform": row["platform"]}
                for key in segment_keys(context, segments, bands):
                    users.append(row["user_id"])
                    found.append(key)
            yield pa.RecordBatch.from_pydict({"user_id": users, "segment": found})

    return latest.mapInArrow(keys, "user_id string, segment string")


def trending_items(
    events: DataFrame, catalog: DataFrame, trending: TrendingConfig, now: datetime
) -> DataFrame:
    """Decayed popularity per item (``item_id, category, score, segment``): the top ``top_n``
    overall plus the top ``per_category_top_n`` of every category (``segment`` NULL), and the top
    ``segment_top_n`` of every user segment with at least ``segment_min_users`` users in the
    lookback; only products in ``catalog`` are kept."""
    since = now - timedelta(days=trending.lookback_days)
    weights = F.create_map(*[F.lit(x) for kv in trending.event_weights.items() for x in kv])
    age_hours = (F.lit(now).cast("double") - F.col("event_time").cast("double")) / 3600.0
    recent = events.where(
        (F.col("event_date") >= F.lit(since.date()))
        & (F.col("event_time") >= F.lit(since))
        & (F.col("event_time") <= F.lit(now))
        & F.col("event_type").isin(list(trending.event_weights))
        & F.col("item_id").isNotNull()
    )
    weight = weights[F.col("event_type")] * F.pow(F.lit(0.5), age_hours / trending.half_life_hours)
    categories = catalog.select("item_id", "category")
    scored = (
        recent.groupBy("item_id")
        .agg(F.sum(weight).alias("score"))
        .where(F.col("score") > 0)
        .join(categories, "item_id")
    )
    overall = Window.orderBy(F.desc("score"), "item_id")
    per_category = Window.partitionBy("category").orderBy(F.desc("score"), "item_id")
    ranked = scored.withColumn("_overall", F.row_number().over(overall)).withColumn(
        "_in_category", F.row_number().over(per_category)
    )
    keep = F.col("_overall") <= trending.top_n
    if trending.per_category_top_n:
        keep = keep | (F.col("category").isNotNull() & (F.col("_in_category") <= trending.per_category_top_n))
    result = ranked.where(keep).select(
        "item_id",
        "category",
        F.col("score").cast("double").alias("score"),
        F.lit(None).cast("string").alias("segment"),
    )
    if not trending.segment_top_n or not trending.segments:
        return result
    members = _user_segments(recent, trending)
    large = (
        members.groupBy("segment")
        .agg(F.count(F.lit(1)).alias("_users"))
        .where(F.col("_users") >= trending.segment_min_users)
        .select("segment")
    )
    by_segment = (
        recent.select("user_id", "item_id", weight.alias("_weight"))
        .join(members.join(large, "segment", "left_semi"), "user_id")
        .groupBy("segment", "item_id")
        .agg(F.sum("_weight").alias("score"))
        .where(F.col("score") > 0)
        .join(categories, "item_id")
        .withColumn(
            "_in_segment",
            F.row_number().over(Window.partitionBy("segment").orderBy(F.desc("score"), "item_id")),
        )
        .where(F.col("_in_segment") <= trending.segment_top_n)
        .select("item_id", "category", F.col("score").cast("double").alias("score"), "segment")
    )
    return result.unionByName(by_segment)


# ---------------------------------------------------------------------------------------------
# Filters (on Arrow columns: the driver's collected catalog and the serving workers' Delta reads)
# ---------------------------------------------------------------------------------------------
# The catalog columns the filters read.
FILTER_COLUMNS: tuple[str, ...] = (*CATALOG_PROPERTY_COLUMNS, "properties", "active")


def _spark_text(value: Any) -> str | None:
    """A value as Spark's ``cast(... as string)`` writes it (booleans lower-case, doubles with .0)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: Any) -> float | None:
    """Spark's ``cast(... as double)``: NULL for what is not a number."""
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _property_values(products: pa.Table, name: str) -> list[Any]:
    """A first-class catalog column, or a free-form property (text) by name, as Python values."""
    if name in CATALOG_PROPERTY_COLUMNS:
        return products.column(name).to_pylist()
    return [
        None if entries is None else dict(entries).get(name)
        for entries in products.column("properties").to_pylist()
    ]


def _predicate_mask(products: pa.Table, pred: PropertyPredicate) -> np.ndarray:
    values = _property_values(products, pred.property)
    if pred.op in ("gt", "ge", "lt", "le"):
        bound = float(pred.value)  # type: ignore[arg-type]  # validated as a number
        compare = {
            "gt": lambda x: x > bound,
            "ge": lambda x: x >= bound,
            "lt": lambda x: x < bound,
            "le": lambda x: x <= bound,
        }[pred.op]
        return np.array([(n := _number(v)) is not None and compare(n) for v in values], bool)
    texts = [_spark_text(v) for v in values]
    if pred.op in ("in", "not_in"):
        wanted = {str(v).lower() if isinstance(v, bool) else str(v) for v in pred.value}  # type: ignore[union-attr]
        if pred.op == "in":
            return np.array([t is not None and t in wanted for t in texts], bool)
        return np.array([t is None or t not in wanted for t in texts], bool)
    value = str(pred.value).lower() if isinstance(pred.value, bool) else str(pred.value)
    if pred.op == "eq":
        return np.array([t == value for t in texts], bool)
    if pred.op == "ne":
        return np.array([t is None or t != value for t in texts], bool)
    return np.array([t is not None and value in t for t in texts], bool)  # contains


def eligible_mask(products: pa.Table, filters: CampaignFilters) -> np.ndarray:
    """True for the active catalog products (rows of ``products``) that pass ``filters``.

    The one definition of a campaign's filters, used by campaigns (on the collected catalog) and
    by the serving workers (on the catalog read from Delta). NULL compares as not passing, except
    stock: unknown stock is not "out of stock", only an explicit false excludes the product.
    """
    mask = pc.fill_null(products.column("active"), False).to_numpy(zero_copy_only=False).astype(bool)
    if filters.in_stock_only:
        mask &= pc.fill_null(products.column("in_stock"), True).to_numpy(zero_copy_only=False).astype(bool)
    if filters.categories:
        inside = pc.is_in(
            products.column("category"), value_set=pa.array(list(filters.categories), pa.string())
        )
        mask &= pc.fill_null(inside, False).to_numpy(zero_copy_only=False).astype(bool)
    for column, bound, above in (
        ("price", filters.min_price, True),
        ("price", filters.max_price, False),
        ("rating", filters.min_rating, True),
    ):
        if bound is not None:
            values = products.column(column)
            passes = pc.greater_equal(values, bound) if above else pc.less_equal(values, bound)
            mask &= pc.fill_null(passes, False).to_numpy(zero_copy_only=False).astype(bool)
    for pred in filters.where:
        mask &= _predicate_mask(products, pred)
    return mask


# ---------------------------------------------------------------------------------------------
# What every request is ranked against: item lists, eligibility, trending (built on the driver)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankingRules:
    """A campaign's ranking settings as plain values (what the executors need)."""

    slots: int
    fallback: str
    recent_items_used: int
    recency_decay: float
    purchase_weight: float
    viewed_within_us: int  # 0 = no such exclusion
    purchased_within_us: int
    sent_within_us: int
    listed: frozenset[str]
    # serving.trending.segments and age_bands: which segment's trending a cold user gets.
    segments: tuple[tuple[str, ...], ...] = ()
    age_bands: tuple[int, ...] = ()
    # Slots that may go to new products (serving.cold_start.exploration_share of slots, rounded down).
    exploration_slots: int = 0

    @classmethod
    def of(cls, campaign: CampaignConfig, serving: ServingConfig) -> RankingRules:
        rules = campaign.exclusions

        def micros(days: float) -> int:
            return round(days * _MICROS_PER_DAY) if days > 0 else 0

        slots = campaign.items
        if campaign.channel == PUSH:
            # A push carousel shows at most push_max_items: rank (and record) only what is seen.
            slots = min(slots, serving.push_max_items)
        return cls(
            slots=slots,
            fallback=campaign.fallback,
            recent_items_used=serving.recent_items_used,
            recency_decay=serving.recency_decay,
            purchase_weight=serving.purchase_weight,
            viewed_within_us=micros(rules.viewed_within_days),
            purchased_within_us=micros(rules.purchased_within_days),
            sent_within_us=micros(rules.sent_within_days),
            listed=frozenset(rules.item_ids),
            segments=serving.trending.segments if serving.trending.segment_top_n else (),
            age_bands=serving.trending.age_bands,
            exploration_slots=math.floor(serving.cold_start.exploration_share * slots + 1e-9)
            if serving.cold_start.content_neighbours
            else 0,
        )


class FlatLists(NamedTuple):
    """The model lists of :class:`ItemLists` as Python objects: item ``i``'s list is
    ``items[offsets[i]:offsets[i + 1]]`` with ``relative`` scores, and ``versions`` (per entry) or,
    when every entry has the same model version (one model: the usual case), ``None`` and that
    ``version``."""

    offsets: tuple[int, ...]
    items: tuple[str, ...]
    relative: Sequence[float]
    versions: tuple[str | None, ...] | None
    version: str | None


class ItemLists:
    """The correlation matrix, cut to a campaign's eligible products, plus catalog categories.

    Item ``i`` of ``ids`` has its model list in ``recs[offsets[i]:offsets[i + 1]]`` (codes into
    ``ids``) with ``relative`` scores (min-max scaled over the item's whole list, in 0..1) and
    ``version_codes`` (into ``versions``). Only eligible recommended items are kept, so a list
    may be shorter than the published one. ``category_codes`` (into ``categories``, -1 = none)
    is the catalog category of every catalog product, eligible or not (seeds' categories pick
    the category-trending lists). Numpy arrays and one list of ids, so it pickles compactly
    and is broadcast once per model and catalog version.
    """

    def __init__(
        self,
        ids: list[str],
        offsets: np.ndarray,
        recs: np.ndarray,
        relative: np.ndarray,
        version_codes: np.ndarray,
        versions: list[str | None],
        category_codes: np.ndarray,
        categories: list[str],
        eligible: np.ndarray,
        explore_offsets: np.ndarray | None = None,
        explore_items: np.ndarray | None = None,
        explore_scores: np.ndarray | None = None,
    ) -> None:
        self.ids = ids
        self.offsets = offsets
        self.recs = recs
        self.relative = relative
        self.version_codes = version_codes
        self.versions = versions
        self.category_codes = category_codes
        self.categories = categories
        self.eligible = eligible
        # New eligible products to explore from each item (their content neighbour, same
        # category): ``explore_items[explore_offsets[i]:explore_offsets[i + 1]]`` with cosines.
        self.explore_offsets = (
            explore_offsets if explore_offsets is not None else np.zeros(len(ids) + 1, np.int64)
        )
        self.explore_items = explore_items if explore_items is not None else np.array([], np.int32)
        self.explore_scores = explore_scores if explore_scores is not None else np.array([], np.float32)
        self._index: dict[str, int] | None = None
        self._flat: FlatLists | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None, "_flat": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_flat": None, **state})

    @property
    def index(self) -> dict[str, int]:
        """item id -> code (built once per process that uses it)."""
        if self._index is None:
            self._index = {item: code for code, item in enumerate(self.ids)}
        return self._index

    @property
    def flat(self) -> FlatLists:
        """The lists as flat Python sequences, built once per process that ranks (16 bytes an entry:
        21 MB for 1.3M entries; the ids are shared). Turning a list's arrays into Python objects per
        request was a quarter of a campaign's ranking time, and a bounded cache of built lists missed
        half the time over 100k items. Tuples of strings and a float array, not lists: the garbage
        collector does not walk them, so a full collection in a long-lived worker stays cheap (in
        the API, tracked candidate lists cost 20-40 ms every few seconds, the tail of its latency).
        The float array costs a float object per read, ~12 % slower to iterate than a tuple of
        floats, for a quarter of the memory."""
        if self._flat is None:
            codes = self.version_codes
            uniform = len(codes) == 0 or int(codes.min()) == int(codes.max())
            ids = self.ids
            self._flat = FlatLists(
                offsets=tuple(self.offsets.tolist()),
                items=tuple([ids[rec] for rec in self.recs.tolist()]),
                relative=array("d", self.relative.tolist()),
                versions=None if uniform else tuple([self.versions[v] for v in codes.tolist()]),
                version=self.versions[int(codes[0])] if uniform and len(codes) else None,
            )
        return self._flat

    def warm(self) -> ItemLists:
        """Build the id index and the flat lists now (each is otherwise built on first access)."""
        self.index  # noqa: B018 - built on first access
        self.flat  # noqa: B018 - built on first access
        return self

    def candidates(self, code: int) -> tuple[tuple[str, float, str | None], ...]:
        """(item id, relative score, model version) of one item's list."""
        flat = self.flat
        start, end = flat.offsets[code], flat.offsets[code + 1]
        versions = flat.versions[start:end] if flat.versions is not None else (flat.version,) * (end - start)
        return tuple(zip(flat.items[start:end], flat.relative[start:end], versions, strict=True))

    @property
    def explores(self) -> bool:
        """Whether any item leads to a new product (no exploration work otherwise)."""
        return len(self.explore_items) > 0

    def explorations(self, code: int) -> list[tuple[str, float]]:
        """(new product id, cosine) to explore from item ``code``, most similar first."""
        start, end = int(self.explore_offsets[code]), int(self.explore_offsets[code + 1])
        ids = self.ids
        return [
            (ids[item], score)
            for item, score in zip(
                self.explore_items[start:end].tolist(), self.explore_scores[start:end].tolist(), strict=True
            )
        ]

    def category(self, item_id: str) -> str | None:
        code = self.index.get(item_id)
        if code is None:
            return None
        category = int(self.category_codes[code])
        return None if category < 0 else self.categories[category]

    @property
    def nbytes(self) -> int:
        arrays = (
            self.offsets,
            self.recs,
            self.relative,
            self.version_codes,
            self.category_codes,
            self.eligible,
            self.explore_offsets,
            self.explore_items,
            self.explore_scores,
        )
        return sum(a.nbytes for a in arrays) + sum(len(i) + 49 for i in self.ids)


def _codes(values: pa.ChunkedArray | pa.Array, ids: pa.Array) -> np.ndarray:
    """Positions of ``values`` in ``ids`` (-1 where absent)."""
    return (
        pc.fill_null(pc.index_in(values, value_set=ids), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    )


MATRIX_COLUMNS: tuple[str, ...] = ("item_id", "rec_item_id", "score", "model_version")


def item_lists(
    matrix: DataFrame | None,
    catalog: DataFrame,
    filters: CampaignFilters,
    cold_start: ColdStartConfig | None = None,
) -> ItemLists:
    """Collect the catalog (and the matrix) to the driver as :class:`ItemLists` for ``filters``."""
    return item_lists_from_arrow(
        None if matrix is None else matrix.select(*MATRIX_COLUMNS).toArrow(),
        catalog.select("item_id", *FILTER_COLUMNS).toArrow(),
        filters,
        cold_start,
    )


def _min_max(seed: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Each score min-max scaled over its seed's whole list (``seed`` sorted); 1 for a list whose
    scores are all equal or that has one item; NaN where the score is not finite."""
    finite = np.isfinite(score)
    score = np.where(finite, score, np.nan)
    best, lowest = np.full(n, np.nan), np.full(n, np.nan)
    counts = np.bincount(seed, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]
    if len(starts):
        best[counts > 0] = np.fmax.reduceat(score, starts)
        lowest[counts > 0] = np.fmin.reduceat(score, starts)
    spread = best[seed] - lowest[seed]
    # All scores equal (or one item): every item is as good as the best, so it counts 1, not 0/0.
    tied = ~(spread > 0)
    return np.where(tied, 1.0, (score - lowest[seed]) / np.where(tied, 1.0, spread))


@dataclass(frozen=True)
class ContentLists:
    """New products' content lists (as extra matrix rows) and what each item leads to explore."""

    seed: np.ndarray
    rec: np.ndarray
    relative: np.ndarray
    explore_offsets: np.ndarray
    explore_items: np.ndarray
    explore_scores: np.ndarray


def _content_lists(
    products: pa.Table,
    has_list: np.ndarray,
    eligible: np.ndarray,
    category_codes: np.ndarray,
    n: int,
    cold_start: ColdStartConfig,
) -> ContentLists | None:
    """Content neighbours of the active catalog products without a matrix list (see
    :mod:`carousel.content`), among the established products (those with a matrix list) of the
    same category: their own lists (the eligible neighbours) and, inverted, the exploration lists
    of the established products they resemble (when they are eligible themselves). Comparing
    within a category keeps the cost at (new products x their category's size), and links a new
    product to established ones, which users' recent items are."""
    n_catalog = products.num_rows
    active = np.asarray(pc.fill_null(products.column("active"), False).to_numpy(zero_copy_only=False), bool)
    new = np.flatnonzero(active & ~has_list[:n_catalog])
    if len(new) == 0 or cold_start.content_neighbours == 0:
        return None
    if len(new) > cold_start.max_new_items:
        log.warning(
            "%d catalog products have no model list; content lists for the first %d by product id "
            "(serving.cold_start.max_new_items)",
            len(new),
            cold_start.max_new_items,
        )
        # By id, not by read order: the same products get lists whatever order a reader returns.
        ids = products.column("item_id").to_pylist()
        new = np.sort(sorted(new.tolist(), key=lambda code: ids[code])[: cold_start.max_new_items])
    started = time.perf_counter()
    vectors = tfidf_matrix(products)
    established = active & has_list[:n_catalog]
    found = []
    new_categories = category_codes[new]
    for category in np.unique(new_categories):
        pool = established & (category_codes[:n_catalog] == category) if category >= 0 else established
        found.append(
            content_neighbours(vectors, new[new_categories == category], pool, cold_start.content_neighbours)
        )
    query, neighbour, cosine = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.argsort(query, kind="stable")  # each new product's neighbours together, best first
    query, neighbour, cosine = query[order], neighbour[order], cosine[order]
    own = eligible[neighbour]
    seed, rec = query[own], neighbour[own]
    relative = _min_max(seed, cosine[own].astype(np.float64), n) if len(seed) else np.array([], np.float64)
    same = (
        eligible[query] & (category_codes[query] >= 0) & (category_codes[query] == category_codes[neighbour])
    )
    explorer, explored, score = neighbour[same], query[same], cosine[same]
    order = np.lexsort((explored, -score, explorer))
    explorer, explored, score = explorer[order], explored[order], score[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(explorer, minlength=n))]).astype(np.int64)
    log.info(
        "content lists for %d new products, %d exploration links (%.2fs)",
        len(new),
        len(explored),
        time.perf_counter() - started,
    )
    return ContentLists(seed, rec, relative, offsets, explored.astype(np.int32), score.astype(np.float32))


def item_lists_from_arrow(
    matrix: pa.Table | None,
    catalog: pa.Table,
    filters: CampaignFilters,
    cold_start: ColdStartConfig | None = None,
) -> ItemLists:
    """:class:`ItemLists` from the matrix rows (:data:`MATRIX_COLUMNS`, or None) and the catalog
    (``item_id`` and :data:`FILTER_COLUMNS`) as Arrow tables. With ``cold_start`` and a matrix,
    active products the matrix has no list for get content lists (model version
    :data:`CONTENT_LISTS_VERSION`) and exploration links (:func:`_content_lists`)."""
    products = catalog
    catalog_ids = products.column("item_id").combine_chunks()
    category_dict = pc.dictionary_encode(products.column("category").combine_chunks())
    categories = category_dict.dictionary.to_pylist()
    category_codes = pc.fill_null(category_dict.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    eligible = eligible_mask(products, filters)
    ids = catalog_ids.to_pylist()
    if matrix is None:
        rows = pa.table(
            {
                "item_id": pa.array([], pa.string()),
                "rec_item_id": pa.array([], pa.string()),
                "score": pa.array([], pa.float64()),
                "model_version": pa.array([], pa.string()),
            }
        )
    else:
        rows = matrix
    seeds = pc.unique(rows.column("item_id").combine_chunks())
    outside = pc.filter(seeds, pc.invert(pc.is_in(seeds, value_set=catalog_ids)))
    ids.extend(outside.to_pylist())
    all_ids = pa.array(ids, pa.string())
    n = len(ids)
    category_codes = np.concatenate([category_codes, np.full(n - len(category_codes), -1, np.int32)])
    eligible = np.concatenate([eligible, np.zeros(n - len(eligible), bool)])

    seed = _codes(rows.column("item_id"), all_ids)
    rec = _codes(rows.column("rec_item_id"), all_ids)
    score = pc.fill_null(rows.column("score"), np.nan).to_numpy().astype(np.float64)
    version_dict = pc.dictionary_encode(rows.column("model_version").combine_chunks())
    versions: list[str | None] = [*version_dict.dictionary.to_pylist(), None]
    version = pc.fill_null(version_dict.indices, len(versions) - 1).to_numpy(zero_copy_only=False)
    order = np.argsort(seed, kind="stable")
    seed, rec, score, version = seed[order], rec[order], score[order], version[order].astype(np.int32)
    # Min-max per list (see the module docstring): it holds for negative scores (logits, z-scores)
    # and is invariant to a shift and a positive scale of a list, which a ratio to the best is not.
    # The extremes are taken over the whole published list, before any filter, so a list's scale
    # does not depend on the campaign. fmax/fmin skip the NaN of a missing score.
    relative = _min_max(seed, score, n)
    # The last of a list counts 0 and is kept: it is still a model candidate, ranked after the rest.
    keep = (rec >= 0) & np.isfinite(score) & np.isfinite(relative)
    has_list = np.bincount(seed, minlength=n) > 0
    keep[keep] = eligible[rec[keep]]
    seed, rec, relative, version = seed[keep], rec[keep], relative[keep], version[keep]
    content = None
    if cold_start is not None and matrix is not None and len(rows):
        content = _content_lists(products, has_list, eligible, category_codes, n, cold_start)
    if content is not None:
        versions.append(CONTENT_LISTS_VERSION)
        seed = np.concatenate([seed, content.seed])
        rec = np.concatenate([rec, content.rec])
        relative = np.concatenate([relative, content.relative])
        version = np.concatenate([version, np.full(len(content.seed), len(versions) - 1, np.int32)])
        order = np.argsort(seed, kind="stable")
        seed, rec, relative, version = seed[order], rec[order], relative[order], version[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(seed, minlength=n))]).astype(np.int64)
    return ItemLists(
        ids=ids,
        offsets=offsets,
        recs=rec.astype(np.int32),
        relative=relative,
        version_codes=version,
        versions=versions,
        category_codes=category_codes,
        categories=categories,
        eligible=eligible,
        explore_offsets=None if content is None else content.explore_offsets,
        explore_items=None if content is None else content.explore_items,
        explore_scores=None if content is None else content.explore_scores,
    )


@dataclass(frozen=True)
class FallbackLists:
    """Trending items a campaign may fall back to: overall and per category, best first."""

    overall: tuple[tuple[str, float], ...] = ()
    by_category: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    by_segment: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)


# What the fallback reads of trending_items' rows. A trending table written before segments existed
# has no segment column: no segment rows.
_TRENDING_COLUMNS: tuple[str, ...] = ("item_id", "category", "score", "segment")


def trending_table(trending: DataFrame | pa.Table) -> pa.Table:
    """The columns of :func:`trending_items` rows that :func:`fallback_lists` reads, collected to
    the driver: what several arms of one run share instead of computing trending each."""
    if isinstance(trending, DataFrame):
        return trending.select(*[c for c in _TRENDING_COLUMNS if c in trending.columns]).toArrow()
    return trending.select([c for c in _TRENDING_COLUMNS if c in trending.column_names])


def fallback_lists(trending: DataFrame | pa.Table, lists: ItemLists, rules: RankingRules) -> FallbackLists:
    """The eligible trending items, ``slots + FALLBACK_PADDING`` deep overall and per category.

    ``trending``: the output of :func:`trending_items`, as a DataFrame or an Arrow table."""
    if rules.fallback == "none":
        return FallbackLists()
    rows = trending_table(trending).to_pylist()
    index, eligible = lists.index, lists.eligible
    pool = [
        (row["item_id"], row["category"], float(row["score"]), row.get("segment"))
        for row in rows
        if row["item_id"] in index and eligible[index[row["item_id"]]]
    ]
    pool.sort(key=lambda t: (-t[2], t[0]))
    depth = rules.slots + FALLBACK_PADDING
    overall = tuple((item, score) for item, _, score, segment in pool if segment is None)[:depth]
    by_category: dict[str, list[tuple[str, float]]] = {}
    by_segment: dict[str, list[tuple[str, float]]] = {}
    for item, category, score, segment in pool:
        if segment is not None:
            if rules.segments and len(by_segment.setdefault(segment, [])) < depth:
                by_segment[segment].append((item, score))
        elif rules.fallback == "trending_category" and category is not None:
            if len(by_category.setdefault(category, [])) < depth:
                by_category[category].append((item, score))
    return FallbackLists(
        overall,
        {c: tuple(items) for c, items in by_category.items()},
        {s: tuple(items) for s, items in by_segment.items()},
    )


# ---------------------------------------------------------------------------------------------
# Ranking one request (pure Python, runs on the executors)
# ---------------------------------------------------------------------------------------------
def request_seeds(request: Mapping[str, Any], rules: RankingRules) -> dict[str, float]:
    """item -> weight: the trigger (1), then recent views and purchases by recency."""
    seeds: dict[str, float] = {}
    trigger = request.get("trigger_item_id")
    if trigger is not None:
        seeds[trigger] = 1.0
    used = rules.recent_items_used
    for column, factor in (("recent_views", 1.0), ("recent_purchases", rules.purchase_weight)):
        for position, recent in enumerate((request.get(column) or ())[:used]):
            item = recent.get("item_id") if recent is not None else None
            if item is None:
                continue
            weight = factor * rules.recency_decay**position
            # Seen as a view and a purchase (or also the trigger): it counts once, at its best.
            if weight > seeds.get(item, -math.inf):
                seeds[item] = weight
    return seeds


def request_exclusions(request: Mapping[str, Any], rules: RankingRules) -> set[str]:
    """The items this request must not get (times are epoch microseconds)."""
    excluded = set(rules.listed)
    trigger = request.get("trigger_item_id")
    if trigger is not None:
        excluded.add(trigger)
    at = request.get("requested_at")
    if at is None:
        return excluded
    for column, within in (
        ("recent_views", rules.viewed_within_us),
        ("recent_purchases", rules.purchased_within_us),
    ):
        if within > 0:
            since = at - within
            for recent in request.get(column) or ():
                if recent is not None and recent.get("item_id") is not None:
                    when = recent.get("event_time")
                    if when is not None and when >= since:
                        excluded.add(recent["item_id"])
    if rules.sent_within_us > 0:
        since, own = at - rules.sent_within_us, request.get("request_id")
        for sent in request.get("sends") or ():
            # A request's own earlier write (a replayed batch) excludes nothing.
            payload, when = sent.get("payload_id"), sent.get("sent_at")
            if sent.get("item_id") is not None and payload is not None and payload != own:
                if when is not None and when >= since:
                    excluded.add(sent["item_id"])
    return excluded


def _explore(
    request_id: Any,
    seeds: Mapping[str, float],
    excluded: set[str],
    model_scores: Mapping[str, float],
    lists: ItemLists,
    rules: RankingRules,
) -> list[tuple[str, float]]:
    """Up to ``rules.exploration_slots`` new products resembling the seeds, none excluded, seeded
    or already a model candidate; each with its relevance, seed weight x cosine (the best seed's).

    Drawn, not sorted: a weighted sample without replacement (Efraimidis-Spirakis keys
    ``log(u) / relevance``) with ``u`` a hash of the request id and the product, so the same
    request draws the same products (a replay ranks the same), while the requests of one popular
    product spread over all the new products that resemble it instead of always showing the most
    similar one - exploration is there to give every new product its first views."""
    if not lists.explores:
        return []
    index = lists.index
    found: dict[str, float] = {}
    for seed, weight in seeds.items():
        code = index.get(seed)
        if code is None:
            continue
        for item, cosine in lists.explorations(code):
            if item in excluded or item in seeds or item in model_scores:
                continue
            found[item] = max(found.get(item, 0.0), weight * cosine)
    if len(found) <= rules.exploration_slots:
        return sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
    salt = str(request_id).encode() + b"\x00"

    def key(entry: tuple[str, float]) -> float:
        # blake2b, not crc32: a CRC is linear, so ids differing in one character drew alike.
        digest = hashlib.blake2b(salt + entry[0].encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
        return math.log(u) / max(entry[1], 1e-12)

    drawn = sorted(found.items(), key=key, reverse=True)[: rules.exploration_slots]
    return sorted(drawn, key=lambda kv: (-kv[1], kv[0]))


def top_scores(scores: Mapping[str, float], k: int) -> list[tuple[str, float]]:
    """The ``k`` best ``(item, score)``, best first and ties by item id: what sorting every item by
    ``(-score, item)`` gives, without a Python key call per item (a model request sums ~100
    candidates for its few slots)."""
    if k <= 0:
        return []
    if len(scores) > k:
        kth = sorted(scores.values(), reverse=True)[k - 1]
        pool = [(-score, item) for item, score in scores.items() if score >= kth]
    else:
        pool = [(-score, item) for item, score in scores.items()]
    pool.sort()
    return [(item, -negated) for negated, item in pool[:k]]


def rank_request(
    request: Mapping[str, Any],
    lists: ItemLists,
    fallback: FallbackLists,
    rules: RankingRules,
    use_model: bool = True,
) -> list[tuple[str, int, float, str, str | None]]:
    """The ranked ``(item_id, rank, score, strategy, model_version)`` of one request."""
    seeds = request_seeds(request, rules)
    excluded = request_exclusions(request, rules)
    slots = rules.slots
    # item -> (priority, score, strategy, model version)
    chosen: dict[str, tuple[int, float, str, str | None]] = {}
    found = 0
    if use_model:
        index = lists.index
        flat = lists.flat
        offsets, entries, relatives, entry_versions = flat.offsets, flat.items, flat.relative, flat.versions
        scores: dict[str, float] = {}
        versions: dict[str, str | None] = {}
        for seed, weight in seeds.items():
            code = index.get(seed)
            if code is None:
                continue
            start, end = offsets[code], offsets[code + 1]
            if entry_versions is None:  # one model version in every list: nothing to track per item
                for item, relative in zip(entries[start:end], relatives[start:end], strict=True):
                    if item not in excluded:
                        scores[item] = scores.get(item, 0.0) + weight * relative
                continue
            for item, relative, version in zip(
                entries[start:end], relatives[start:end], entry_versions[start:end], strict=True
            ):
                if item in excluded:
                    continue
                scores[item] = scores.get(item, 0.0) + weight * relative
                known = versions.get(item)
                if known is None:
                    versions[item] = version
                elif version is not None and version != known:  # rare: lists of two models
                    versions[item] = newest_model_version((known, version))
        explored = (
            _explore(request.get("request_id"), seeds, excluded, scores, lists, rules)
            if rules.exploration_slots
            else []
        )
        for item, score in top_scores(scores, slots - len(explored)):
            version = flat.version if entry_versions is None else versions[item]
            chosen[item] = (_PRIORITY[STRATEGY_MODEL], score, STRATEGY_MODEL, version)
        for item, score in explored:
            chosen[item] = (_PRIORITY[STRATEGY_NEW_ITEM], score, STRATEGY_NEW_ITEM, None)
        found = len(chosen)
    if found < slots and rules.fallback != "none":
        offers: list[tuple[tuple[tuple[str, float], ...], str]] = []
        if rules.fallback == "trending_category":
            seen_categories = {lists.category(seed) for seed in seeds}
            offers += [
                (fallback.by_category[c], STRATEGY_TRENDING_CATEGORY)
                for c in sorted(c for c in seen_categories if c is not None and c in fallback.by_category)
            ]
        if fallback.by_segment:
            # The first (most specific) of the user's segments that trending was computed for:
            # a segment below segment_min_users has no rows, so the user falls back upward.
            context = request.get("user_attributes") or {}
            context = {**context, "platform": request.get("platform")}
            for key in segment_keys(context, rules.segments, rules.age_bands):
                if key in fallback.by_segment:
                    offers.append((fallback.by_segment[key], STRATEGY_TRENDING_SEGMENT))
                    break
        offers.append((fallback.overall, STRATEGY_TRENDING))
        for items, strategy in offers:
            priority = _PRIORITY[strategy]
            for item, score in items:
                if item in excluded:
                    continue
                held = chosen.get(item)
                # An item offered by several strategies keeps its best one.
                if held is None or (priority, -score) < (held[0], -held[1]):
                    chosen[item] = (priority, score, strategy, None)
    ordered = sorted(chosen.items(), key=lambda kv: (kv[1][0], -kv[1][1], kv[0]))[:slots]
    return [
        (item, rank, score, strategy, version)
        for rank, (item, (_, score, strategy, version)) in enumerate(ordered, start=1)
    ]


# ---------------------------------------------------------------------------------------------
# The ranking function
# ---------------------------------------------------------------------------------------------
_RANKED_ARROW = pa.schema(
    [
        ("request_id", pa.string()),
        ("item_id", pa.string()),
        ("rank", pa.int32()),
        ("score", pa.float64()),
        ("strategy", pa.string()),
        ("model_version", pa.string()),
    ]
)
# One request's ranked items, as rank_recommendations(grouped=True) returns them.
RANKED_ITEMS_TYPE = ArrayType(
    StructType(
        [
            StructField("item_id", StringType(), False),
            StructField("rank", IntegerType(), False),
            StructField("score", DoubleType(), False),
            StructField("strategy", StringType(), False),
            StructField("model_version", StringType()),
        ]
    ),
    False,
)
_RANKED_ITEMS_ARROW = pa.list_(
    pa.struct(
        [
            pa.field("item_id", pa.string(), False),
            pa.field("rank", pa.int32(), False),
            pa.field("score", pa.float64(), False),
            pa.field("strategy", pa.string(), False),
            pa.field("model_version", pa.string()),
        ]
    )
)
_RANKED_ITEM_FIELDS: list[pa.Field] = list(_RANKED_ITEMS_ARROW.value_type)
# Carried columns travel beside the ranking's own under this prefix (no clash with its names).
_CARRIED = "carried__"
# (spark app, cache key, filters) -> broadcast ItemLists; a few entries (arms x campaigns).
_LISTS_CACHE: OrderedDict[tuple[Hashable, ...], Broadcast] = OrderedDict()
_LISTS_CACHE_SIZE = 8


def _broadcast_lists(
    spark: SparkSession,
    matrix: DataFrame | None,
    catalog: DataFrame,
    filters: CampaignFilters,
    cache_key: Hashable | None,
    cold_start: ColdStartConfig | None = None,
) -> Broadcast:
    key = (
        spark.sparkContext.applicationId,
        cache_key,
        matrix is None,
        filters.model_dump_json(),
        None if cold_start is None else cold_start.model_dump_json(),
    )
    if cache_key is not None and key in _LISTS_CACHE:
        _LISTS_CACHE.move_to_end(key)
        return _LISTS_CACHE[key]
    started = time.monotonic()
    lists = item_lists(matrix, catalog, filters, cold_start)
    shared = spark.sparkContext.broadcast(lists)
    log.info(
        "ranking lists: %d items, %d eligible, %d list entries, %.1f MB, built in %.1fs",
        len(lists.ids),
        int(lists.eligible.sum()),
        len(lists.recs),
        lists.nbytes / 1e6,
        time.monotonic() - started,
    )
    if cache_key is not None:
        _LISTS_CACHE[key] = shared
        while len(_LISTS_CACHE) > _LISTS_CACHE_SIZE:
            # Non-destructive: a frame that still needs it gets it re-sent.
            _LISTS_CACHE.popitem(last=False)[1].unpersist()
    return shared


def _recent_micros(column: str, used: int, within_us: int, requested_us: Column) -> Column:
    """A profile's recent items as the ranking reads them, times as epoch microseconds: only the
    first ``used`` (the seeds) and those within the exclusion window (newest first), so the Python
    side converts what it reads and nothing more."""
    entries = F.transform(
        column,
        lambda r: F.struct(r["item_id"].alias("item_id"), F.unix_micros(r["event_time"]).alias("event_time")),
    )
    if within_us > 0:
        since = requested_us - F.lit(within_us)
        kept = F.filter(entries, lambda r, i: (i < used) | (r["event_time"] >= since))
    else:
        kept = F.slice(entries, 1, used)
    return kept.alias(column)


def _context_column(requests: DataFrame, name: str) -> Column:
    """A context column as the ranking reads it: of the attributes, only the contract's fields
    (a profile's ``user_attributes`` also carries the time and id of the event that set them)."""
    if name != "user_attributes":
        return requests[name]
    fields = USER_ATTRIBUTES_SCHEMA.fieldNames()
    return F.struct(*[requests[name][field].alias(field) for field in fields]).alias(name)


def _request_frame(
    requests: DataFrame,
    sent: DataFrame | None,
    small_batch: bool,
    rules: RankingRules,
    carry: Sequence[str] = (),
) -> DataFrame:
    """The requests as the executors read them (times as epoch microseconds), with each user's
    recent sends when a sent-within exclusion needs them, and the ``carry`` columns."""
    used = rules.recent_items_used
    # The input's own column, by reference: the select's output reuses the name for the micros.
    requested_us = F.unix_micros(requests["requested_at"])
    frame = requests.select(
        "request_id",
        "user_id",
        requested_us.alias("requested_at"),
        "trigger_item_id",
        _recent_micros("recent_views", used, rules.viewed_within_us, requested_us),
        _recent_micros("recent_purchases", used, rules.purchased_within_us, requested_us),
        # The user's segment, when the requests carry attributes and segment trending is on.
        *[_context_column(requests, c) for c in CONTEXT_COLUMNS if rules.segments and c in requests.columns],
        *[F.col(name).alias(f"{_CARRIED}{name}") for name in carry],
    )
    if sent is None:
        return frame
    sends = sent.where(F.col("item_id").isNotNull()).select(
        "user_id",
        F.struct("item_id", F.unix_micros("sent_at").alias("sent_at"), F.col("payload_id")).alias("send"),
    )
    if small_batch:
        sends = sends.join(F.broadcast(requests.select("user_id").distinct()), "user_id")
    by_user = sends.groupBy("user_id").agg(F.collect_list("send").alias("sends"))
    return frame.join(F.broadcast(by_user) if small_batch else by_user, "user_id", "left")


def rank_recommendations(
    requests: DataFrame,
    *,
    matrix: DataFrame | None,
    catalog: DataFrame,
    trending: DataFrame | pa.Table,
    sent: DataFrame | None,
    campaign: CampaignConfig,
    serving: ServingConfig,
    small_batch: bool = False,
    cache_key: Hashable | None = None,
    grouped: bool = False,
    carry: Sequence[str] = (),
) -> DataFrame:
    """The top ``campaign.items`` items per request (see the module docstring for the rules).

    ``requests`` carries :data:`REQUEST_COLUMNS`; ``matrix`` the published correlation matrix
    (``item_id, rank, rec_item_id, score, model_version``) or ``None`` for a trending-only arm;
    ``catalog`` the catalog table (CATALOG_SCHEMA); ``trending`` the output of
    :func:`trending_items` (or its :func:`trending_table`); ``sent`` the ``sent_recommendations``
    rows to honour ``exclusions.sent_within_days`` (or ``None``). Returns :data:`RANKED_COLUMNS`,
    rank 1 = best; a request with no eligible item gets no rows.

    With ``grouped``, one row per request instead: ``request_id``, the ``carry`` columns of
    ``requests`` as they are (passed through in Arrow, never converted to Python), and ``items``
    (:data:`RANKED_ITEMS_TYPE`, empty when no item is eligible). A campaign records and renders
    from that one row, with no shuffle to group the items again.

    The matrix and catalog are collected once to the driver (:func:`item_lists`) and broadcast;
    each request is then ranked in one narrow pass (``mapInArrow``), with no shuffle.
    ``cache_key`` (e.g. the Delta versions of matrix and catalog) lets later calls reuse the
    broadcast; ``None`` builds it afresh. ``small_batch`` (streaming micro-batches): only the
    batch's users' sends are read, and broadcast.
    """
    spark = requests.sparkSession
    rules = RankingRules.of(campaign, serving)
    shared = _broadcast_lists(spark, matrix, catalog, campaign.filters, cache_key, serving.cold_start)
    fallback = fallback_lists(trending, shared.value, rules)
    use_model = matrix is not None
    carry = tuple(carry) if grouped else ()
    frame = _request_frame(
        requests.select(
            *dict.fromkeys((*REQUEST_COLUMNS, *[c for c in CONTEXT_COLUMNS if c in requests.columns], *carry))
        ),
        sent if rules.sent_within_us > 0 else None,
        small_batch,
        rules,
        carry,
    )

    # What rank_request reads of a row: carried columns are never converted to Python.
    ranking_input = [c for c in frame.columns if not c.startswith(_CARRIED)]

    def rank_rows(requests: list[dict[str, Any]]) -> tuple[dict[str, list[Any]], list[int]]:
        """The ranked items of ``requests`` as columns (:data:`RANKED_COLUMNS`), and where each
        request's items end. Columns, not a dict per item: building those cost more than ranking
        a trending request."""
        lists = shared.value
        out: dict[str, list[Any]] = {name: [] for name in RANKED_COLUMNS}
        request_ids, items, ranks, scores, strategies, versions = out.values()
        ends = []
        for request in requests:
            for item, rank, score, strategy, version in rank_request(
                request, lists, fallback, rules, use_model
            ):
                request_ids.append(request["request_id"])
                items.append(item)
                ranks.append(rank)
                scores.append(score)
                strategies.append(strategy)
                versions.append(version)
            ends.append(len(items))
        return out, ends

    def rank_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out, _ = rank_rows(batch_rows(batch))
            yield pa.RecordBatch.from_pydict(out, schema=_RANKED_ARROW)

    def rank_grouped(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out, ends = rank_rows(batch_rows(batch.select(ranking_input)))
            values = pa.StructArray.from_arrays(
                [pa.array(out[field.name], field.type) for field in _RANKED_ITEM_FIELDS],
                fields=_RANKED_ITEM_FIELDS,
            )
            items = pa.ListArray.from_arrays(
                pa.array([0, *ends], pa.int32()), values, type=_RANKED_ITEMS_ARROW
            )
            columns = [batch.column("request_id"), *(batch.column(f"{_CARRIED}{c}") for c in carry)]
            yield pa.RecordBatch.from_arrays([*columns, items], names=["request_id", *carry, "items"])

    if not grouped:
        return frame.mapInArrow(rank_batches, RANKED_DDL)
    schema = StructType(
        [
            frame.schema["request_id"],
            *(StructField(c, frame.schema[f"{_CARRIED}{c}"].dataType) for c in carry),
            StructField("items", RANKED_ITEMS_TYPE, False),
        ]
    )
    return frame.mapInArrow(rank_grouped, schema)
