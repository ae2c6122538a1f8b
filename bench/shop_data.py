"""A scaled shop for the serving and campaign benchmarks, built with Spark straight into Delta.

Role: the data those benchmarks read, at production-like sizes, without running the simulator,
ingest and training (hours on two cores). Inputs: sizes (flags). Outputs, under ``--root``
(``<root>/tables/<name>``, the layout of ``storage.root``):

* ``catalog``: ``--items`` products with every first-class field (title, description, category,
  in_stock, price, currency, rating, image_url, deep_link) plus a ``brand`` property;
* ``user_profiles``: ``--users`` profiles (PROFILE_SCHEMA) with up to ``profiles.recent_items``
  recent views and a few purchases each, drawn from a skewed item distribution (item index =
  items x u^3 for uniform u: a few items are viewed by very many users), a device, platforms and
  user attributes; every user was seen within the last 28 days (so ``weekly-email``'s segment
  ``last_seen_within_days: 30`` selects all of them); about 5 % have no recent items (trending
  fallback);
* ``item_recommendations``: a ``--items`` x ``--top-k`` correlation matrix (distinct neighbours,
  scores falling with rank) published through :func:`jobs.publish_recommendations.publish`, so
  it passes the same validation gate as a trained model;
* ``events``: ``--events`` item events over the last ``--days`` days (same skew), partitioned by
  ``event_date``, for trending.

Every random draw is a hash of (seed, row, position), so the same flags build the same shop.
``shop.json`` in the root records the sizes and build times; :func:`ensure_shop` reuses a shop
whose sizes match instead of rebuilding it. The benchmarks link the shop's tables into each run's
own storage root (:func:`link_shop`), so what a run writes (``sent_recommendations``,
``campaign_runs``) never lands in the shared shop.

    .venv/bin/python -m bench.shop_data --root /tmp/carousel-shop                # 1M users, 100k items
    .venv/bin/python -m bench.shop_data --root /tmp/shop-small --users 20000 --items 5000 --events 50000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel.cli import add_config_args, setup_logging
from carousel.config import CarouselConfig, ConfigError, load_config
from carousel.schemas import (
    ADDED_TO_CART,
    ADDED_TO_WISHLIST,
    APP_LAUNCHED,
    CATALOG_SCHEMA,
    CATALOG_TABLE,
    EVENTS_PARTITION_COLUMN,
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    PRODUCT_PURCHASED,
    PRODUCT_VIEWED,
    PROFILE_SCHEMA,
    PROFILES_TABLE,
)

log = logging.getLogger("bench.shop_data")

MANIFEST = "shop.json"
# Where the benchmarks keep their shop between runs (a --quick run keeps its small one apart).
DEFAULT_SHOP_ROOT = "/tmp/carousel-bench-shop"
QUICK_SHOP_ROOT = "/tmp/carousel-bench-shop-quick"
# The tables a serving or campaign run only reads; link_shop shares exactly these.
SHOP_TABLES: tuple[str, ...] = (CATALOG_TABLE, PROFILES_TABLE, ITEM_RECOMMENDATIONS_TABLE, EVENTS_TABLE)
MODEL_VERSION = "bench-shop"
UPLOAD_ID = "bench-shop"
# A view's item index is items * u**SKEW: with 3, the top 1 % of items get about 22 % of views.
SKEW = 3.0
# Users seen at most this long ago: inside weekly-email's 30-day segment.
MAX_LAST_SEEN_DAYS = 28
PLATFORMS = ("android", "ios", "web")
COUNTRIES = ("PT", "ES", "FR", "DE", "IT", "NL", "GB", "US")
CITIES = ("Lisbon", "Porto", "Madrid", "Paris", "Berlin", "Rome", "Amsterdam", "London", "Austin")
LANGUAGES = ("pt", "es", "fr", "de", "it", "nl", "en")
GENDERS = ("f", "m", "x")
BRANDS = ("Acme", "Nordlys", "Kestrel", "Umbra", "Solano", "Brisk", "Halden", "Vireo")
ADJECTIVES = ("Classic", "Trail", "Urban", "Light", "Pro", "Everyday", "Studio", "Compact", "Bold")
_UNIT_SCALE = float(2**53)


@dataclass(frozen=True)
class ShopSizes:
    """What :func:`build_shop` builds; a shop is reused only when all of these match."""

    users: int = 1_000_000
    items: int = 100_000
    top_k: int = 20
    events: int = 500_000
    days: int = 7
    categories: int = 50
    recent_items: int = 10
    seed: int = 11


# ---------------------------------------------------------------------------------------------
# Deterministic random columns
# ---------------------------------------------------------------------------------------------
def unit(seed: int, *parts: Column | int | str) -> Column:
    """A uniform draw in [0, 1) from a hash of ``seed`` and ``parts`` (same inputs, same draw)."""
    hashed = F.xxhash64(F.lit(seed), *[p if isinstance(p, Column) else F.lit(p) for p in parts])
    # The low 53 bits of the hash, as a double in [0, 1).
    return F.pmod(hashed, F.lit(2**53)).cast("double") / _UNIT_SCALE


def pick(values: Sequence[str], u: Column) -> Column:
    """One of ``values`` chosen by the draw ``u``."""
    options = F.array(*[F.lit(v) for v in values])
    return F.element_at(options, (F.floor(u * len(values)) + 1).cast("int"))


def item_id(index: Column) -> Column:
    return F.format_string("i-%06d", index.cast("long"))


def user_id(index: Column) -> Column:
    return F.format_string("u-%07d", index.cast("long"))


def skewed_item(n_items: int, u: Column) -> Column:
    """A skewed item index in [0, n_items): small indexes are far more popular."""
    return F.least(F.floor(F.pow(u, F.lit(SKEW)) * n_items), F.lit(n_items - 1)).cast("long")


# ---------------------------------------------------------------------------------------------
# Pure builders (SparkSession + sizes -> DataFrame)
# ---------------------------------------------------------------------------------------------
def build_catalog(spark: SparkSession, sizes: ShopSizes, now: datetime) -> DataFrame:
    """``sizes.items`` active products (CATALOG_SCHEMA); about 5 % are out of stock."""
    seed = sizes.seed
    idx = F.col("id")
    iid = item_id(idx)
    category = F.format_string("cat-%02d", F.pmod(idx, F.lit(sizes.categories)))
    frame = spark.range(0, sizes.items, numPartitions=2).select(
        iid.alias("item_id"),
        F.concat_ws(" ", pick(ADJECTIVES, unit(seed, idx, "adj")), F.lit("product"), iid).alias("title"),
        F.concat(
            F.lit("A "),
            F.lower(pick(ADJECTIVES, unit(seed, idx, "desc"))),
            F.lit(" piece from the "),
            category,
            F.lit(" range: durable, light and easy to care for. Ships in two days."),
        ).alias("description"),
        category.alias("category"),
        (unit(seed, idx, "stock") >= 0.05).alias("in_stock"),
        F.round(F.lit(5.0) + unit(seed, idx, "price") * 195.0, 2).alias("price"),
        F.lit("EUR").alias("currency"),
        F.round(F.lit(2.0) + unit(seed, idx, "rating") * 3.0, 1).alias("rating"),
        F.concat(F.lit("https://img.example.com/"), iid, F.lit(".jpg")).alias("image_url"),
        F.concat(F.lit("https://shop.example.com/p/"), iid).alias("deep_link"),
        F.create_map(F.lit("brand"), pick(BRANDS, unit(seed, idx, "brand"))).alias("properties"),
        F.lit(True).alias("active"),
        F.lit(UPLOAD_ID).alias("upload_id"),
        F.lit(now).alias("updated_at"),
    )
    return _cast_to(frame, CATALOG_SCHEMA)


def _cast_to(frame: DataFrame, schema: Any) -> DataFrame:
    """``frame`` with the columns, types and order of ``schema`` (nullability as built)."""
    return frame.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])


def _recent_items(seed: int, uid: Column, tag: str, count: Column, n_items: int, now: datetime) -> Column:
    """Up to ``count`` distinct skewed items, newest first, each with a time in the last days."""
    positions = F.sequence(F.lit(1), F.greatest(count, F.lit(1)))
    drawn = F.transform(positions, lambda p: item_id(skewed_item(n_items, unit(seed, uid, tag, p))))
    distinct = F.slice(F.array_distinct(drawn), 1, F.greatest(count, F.lit(1)))
    base = F.lit(now).cast("double")
    # Newest first: position p is roughly p days old (purchases: 3p days), never in the future.
    spacing = 86400.0 * (3.0 if tag == "purchase" else 1.0)
    items = F.transform(
        distinct,
        lambda item, p: F.struct(
            item.alias("item_id"),
            F.timestamp_seconds(
                base - (p.cast("double") + unit(seed, uid, tag, "t", p) * 0.9 + 0.01) * spacing
            ).alias("event_time"),
        ),
    )
    return F.when(count > 0, items).otherwise(
        F.array().cast("array<struct<item_id:string,event_time:timestamp>>")
    )


def build_profiles(spark: SparkSession, sizes: ShopSizes, now: datetime) -> DataFrame:
    """``sizes.users`` profiles (PROFILE_SCHEMA), every one seen within ``MAX_LAST_SEEN_DAYS``."""
    seed = sizes.seed
    idx = F.col("id")
    uid = user_id(idx)
    views_u = unit(seed, idx, "views")
    # About 5 % have no recent views (new or lapsed users: trending fallback); the rest 1..N.
    n_views = F.when(views_u < 0.05, F.lit(0)).otherwise(
        (F.lit(1) + F.floor((views_u - 0.05) / 0.95 * sizes.recent_items)).cast("int")
    )
    n_views = F.least(n_views, F.lit(sizes.recent_items))
    purchase_u = unit(seed, idx, "purchases")
    n_purchases = F.when(purchase_u < 0.6, F.lit(0)).otherwise(
        F.floor((purchase_u - 0.6) * 10).cast("int") + 1
    )
    n_purchases = F.least(n_purchases, F.lit(min(3, sizes.recent_items)))
    last_seen = F.timestamp_seconds(
        F.lit(now).cast("double") - unit(seed, idx, "seen") * MAX_LAST_SEEN_DAYS * 86400.0
    )
    platform = pick(PLATFORMS, unit(seed, idx, "platform"))
    frame = (
        spark.range(0, sizes.users, numPartitions=4)
        .select(
            idx,
            uid.alias("user_id"),
            n_views.alias("_views"),
            n_purchases.alias("_purchases"),
            last_seen.alias("last_seen"),
            platform.alias("_platform"),
        )
        .select(
            "user_id",
            (F.col("last_seen") - F.expr("INTERVAL 90 DAYS")).alias("first_seen"),
            "last_seen",
            (F.col("_views") * 3 + F.col("_purchases") + 1).cast("long").alias("total_events"),
            F.create_map(
                F.lit(PRODUCT_VIEWED),
                (F.col("_views") * 3).cast("long"),
                F.lit(PRODUCT_PURCHASED),
                F.col("_purchases").cast("long"),
                F.lit(APP_LAUNCHED),
                F.lit(1).cast("long"),
            ).alias("event_counts"),
            _recent_items(seed, F.col("id"), "view", F.col("_views"), sizes.items, now).alias("recent_views"),
            _recent_items(seed, F.col("id"), "purchase", F.col("_purchases"), sizes.items, now).alias(
                "recent_purchases"
            ),
            F.array(
                F.struct(
                    F.format_string("d-%07d", F.col("id")).alias("device_id"),
                    F.col("last_seen").alias("last_seen"),
                    F.format_string("e-%07d", F.col("id")).alias("last_event_id"),
                    F.col("_platform").alias("platform"),
                    F.lit("14").alias("os_version"),
                    F.lit("5.2.0").alias("app_version"),
                    F.lit("Pixel 8").alias("model"),
                )
            ).alias("devices"),
            F.array(F.col("_platform")).alias("platforms"),
            F.struct(
                F.col("last_seen").alias("event_time"),
                F.format_string("e-%07d", F.col("id")).alias("event_id"),
                F.lit("5.2.0").alias("app_version"),
            ).alias("last_app_version"),
            F.struct(
                F.col("last_seen").alias("event_time"),
                F.format_string("e-%07d", F.col("id")).alias("event_id"),
                (F.lit(18) + F.floor(unit(seed, F.col("id"), "age") * 60)).cast("int").alias("age"),
                pick(GENDERS, unit(seed, F.col("id"), "gender")).alias("gender"),
                pick(CITIES, unit(seed, F.col("id"), "city")).alias("city"),
                pick(COUNTRIES, unit(seed, F.col("id"), "country")).alias("country"),
                pick(LANGUAGES, unit(seed, F.col("id"), "language")).alias("language"),
            ).alias("user_attributes"),
            F.lit(now).alias("updated_at"),
        )
    )
    return _cast_to(frame, PROFILE_SCHEMA)


def build_matrix(spark: SparkSession, sizes: ShopSizes) -> DataFrame:
    """``item_id, rank, rec_item_id, score``: ``top_k`` distinct other items per item, best first.

    Item i's neighbour at rank r is ``(i + r * stride_i) mod items`` with ``stride_i`` in
    ``[1, items / (top_k + 1))``, so the ``top_k`` neighbours are distinct and never i itself.
    """
    seed, n, k = sizes.seed, sizes.items, sizes.top_k
    if n < k + 2:
        raise ValueError(f"--items ({n}) must exceed --top-k ({k}) + 1")
    max_stride = max(1, n // (k + 1) - 1)
    idx = F.col("id")
    stride = F.lit(1) + F.floor(unit(seed, idx, "stride") * max_stride).cast("long")
    ranks = spark.range(1, k + 1, numPartitions=1).select(F.col("id").cast("int").alias("rank"))
    return (
        spark.range(0, n, numPartitions=4)
        .select(idx, stride.alias("stride"))
        .crossJoin(F.broadcast(ranks))
        .select(
            item_id(idx).alias("item_id"),
            F.col("rank"),
            item_id(F.pmod(idx + F.col("rank") * F.col("stride"), F.lit(n))).alias("rec_item_id"),
            # Falls with rank; a little noise keeps the lists from all scoring alike.
            (F.lit(1.0) - F.col("rank") * 0.03 - unit(seed, idx, "score", F.col("rank")) * 0.02).alias(
                "score"
            ),
        )
    )


def build_events(spark: SparkSession, sizes: ShopSizes, now: datetime) -> DataFrame:
    """``sizes.events`` item events (EVENTS_SCHEMA) over the last ``sizes.days`` days."""
    seed = sizes.seed
    idx = F.col("id")
    kind = unit(seed, idx, "type")
    event_type = (
        F.when(kind < 0.80, F.lit(PRODUCT_VIEWED))
        .when(kind < 0.90, F.lit(ADDED_TO_CART))
        .when(kind < 0.95, F.lit(ADDED_TO_WISHLIST))
        .otherwise(F.lit(PRODUCT_PURCHASED))
    )
    event_time = F.timestamp_seconds(
        F.lit(now).cast("double") - unit(seed, idx, "time") * sizes.days * 86400.0 - 1.0
    )
    uidx = F.floor(unit(seed, idx, "user") * sizes.users)
    frame = spark.range(0, sizes.events, numPartitions=4).select(
        F.format_string("ev-%09d", idx).alias("event_id"),
        user_id(uidx).alias("user_id"),
        event_type.alias("event_type"),
        event_time.alias("event_time"),
        item_id(skewed_item(sizes.items, unit(seed, idx, "item"))).alias("item_id"),
        F.format_string("d-%07d", uidx.cast("long")).alias("device_id"),
        F.lit("mobile").alias("source"),
        F.lit("bench-shop").alias("ingest_batch"),
        event_time.alias("received_at"),
        F.struct(
            F.lit("android").alias("platform"),
            F.lit("14").alias("os_version"),
            F.lit("5.2.0").alias("app_version"),
            F.lit("Pixel 8").alias("model"),
        ).alias("device"),
        F.create_map(F.lit("screen"), F.lit("home")).alias("properties"),
        F.lit(None).cast(EVENTS_SCHEMA["user_attributes"].dataType).alias("user_attributes"),
        F.to_date(event_time).alias("event_date"),
    )
    return _cast_to(frame, EVENTS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def _timed(label: str, timings: dict[str, float], action: Any) -> Any:
    started = time.perf_counter()
    result = action()
    timings[label] = round(time.perf_counter() - started, 3)
    log.info("shop: %s in %.1f s", label, timings[label])
    return result


def build_shop(
    spark: SparkSession, cfg: CarouselConfig, sizes: ShopSizes, now: datetime | None = None
) -> dict[str, Any]:
    """Build every shop table under ``cfg.storage.root`` (replacing any), publish the matrix and
    write ``shop.json``; returns the manifest (sizes, row counts, seconds per table)."""
    from jobs.publish_recommendations import ModelOutput, publish

    now = (now or datetime.now(UTC)).replace(microsecond=0)
    timings: dict[str, float] = {}

    def save(frame: DataFrame, table: str, partition_by: str | None = None) -> None:
        writer = frame.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
        if partition_by:
            writer = writer.partitionBy(partition_by)
        writer.save(cfg.storage.table(table))

    _timed("catalog", timings, lambda: save(build_catalog(spark, sizes, now), CATALOG_TABLE))
    _timed("user_profiles", timings, lambda: save(build_profiles(spark, sizes, now), PROFILES_TABLE))
    _timed(
        "events",
        timings,
        lambda: save(build_events(spark, sizes, now), EVENTS_TABLE, partition_by=EVENTS_PARTITION_COLUMN),
    )
    vocabulary = [f"i-{i:06d}" for i in range(sizes.items)]
    version = _timed(
        "item_recommendations (publish, with its validation)",
        timings,
        lambda: publish(
            spark, cfg, ModelOutput(build_matrix(spark, sizes), MODEL_VERSION, sizes.top_k, vocabulary)
        ),
    )
    counts = {
        table: spark.read.format("delta").load(cfg.storage.table(table)).count() for table in SHOP_TABLES
    }
    manifest = {
        "sizes": asdict(sizes),
        "built_at": now.isoformat(),
        "model_version": MODEL_VERSION,
        "matrix_table_version": version,
        "rows": counts,
        "seconds": timings,
    }
    Path(cfg.storage.root, MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("shop built under %s: %s", cfg.storage.root, counts)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root, MANIFEST)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def ensure_shop(
    spark: SparkSession, cfg: CarouselConfig, sizes: ShopSizes, force: bool = False
) -> dict[str, Any]:
    """Reuse the shop under ``cfg.storage.root`` when its sizes match ``sizes``, else build it.

    The returned manifest has ``reused`` set accordingly. Profiles and events age with the wall
    clock: a shop built days ago still works, but its users drift out of 30-day segments.
    """
    manifest = read_manifest(cfg.storage.root)
    if not force and manifest is not None and manifest.get("sizes") == asdict(sizes):
        present = all(Path(cfg.storage.table(t), "_delta_log").is_dir() for t in SHOP_TABLES)
        if present:
            log.info("reusing the shop under %s (built %s)", cfg.storage.root, manifest.get("built_at"))
            return {**manifest, "reused": True}
    if manifest is not None and not force:
        log.info("shop under %s has other sizes (%s): rebuilding", cfg.storage.root, manifest.get("sizes"))
    return {**build_shop(spark, cfg, sizes), "reused": False}


def link_shop(shop_root: str | Path, run_root: str | Path) -> None:
    """Make ``run_root/tables/<t>`` a symbolic link to the shop's table, for each shop table.

    A run then reads the shared shop but writes its own tables (sent_recommendations, ...) under
    its own root. Local folders only.
    """
    tables = Path(run_root, "tables")
    tables.mkdir(parents=True, exist_ok=True)
    for name in SHOP_TABLES:
        target = Path(shop_root, "tables", name).resolve()
        if not target.is_dir():
            raise FileNotFoundError(f"shop table {target} is missing: build the shop first")
        link = tables / name
        if not link.is_symlink():
            os.symlink(target, link, target_is_directory=True)


def sizes_from_args(args: argparse.Namespace) -> ShopSizes:
    return ShopSizes(
        users=args.users,
        items=args.items,
        top_k=args.top_k,
        events=args.events,
        days=args.days,
        categories=args.categories,
        recent_items=args.recent_items,
        seed=args.seed,
    )


def add_shop_args(
    parser: argparse.ArgumentParser, root_default: str | None = None
) -> argparse.ArgumentParser:
    """The shop's size flags (shared by the benchmarks)."""
    defaults = ShopSizes()
    group = parser.add_argument_group("shop")
    group.add_argument(
        "--shop-root",
        default=root_default,
        help="folder of the (reusable) shop; built there when missing or of other sizes",
    )
    group.add_argument("--users", type=int, default=defaults.users, help=f"profiles ({defaults.users:,})")
    group.add_argument(
        "--items", type=int, default=defaults.items, help=f"catalog items ({defaults.items:,})"
    )
    group.add_argument(
        "--top-k", type=int, default=defaults.top_k, help=f"neighbours per item ({defaults.top_k})"
    )
    group.add_argument(
        "--events", type=int, default=defaults.events, help=f"events for trending ({defaults.events:,})"
    )
    group.add_argument("--days", type=int, default=defaults.days, help=f"days of events ({defaults.days})")
    group.add_argument(
        "--categories", type=int, default=defaults.categories, help=f"categories ({defaults.categories})"
    )
    group.add_argument(
        "--recent-items",
        type=int,
        default=defaults.recent_items,
        help=f"most recent views per profile ({defaults.recent_items})",
    )
    group.add_argument("--seed", type=int, default=defaults.seed, help=f"seed ({defaults.seed})")
    group.add_argument("--rebuild-shop", action="store_true", help="rebuild the shop even when it matches")
    return parser


def apply_quick(args: argparse.Namespace, quick: dict[str, Any]) -> argparse.Namespace:
    """With ``--quick``: the ``quick`` flag values, and the quick shop unless --shop-root was given."""
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
        if args.shop_root == DEFAULT_SHOP_ROOT:
            args.shop_root = QUICK_SHOP_ROOT
    return args


def session_conf(warehouse: str | Path) -> dict[str, str]:
    """Spark settings of the benchmark sessions (local[2], small shuffles, no UI)."""
    return {
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "2",
        "spark.ui.enabled": "false",
        "spark.sql.warehouse.dir": str(warehouse),
        "spark.databricks.delta.snapshotPartitions": "2",
    }


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m bench.shop_data", description=__doc__.splitlines()[0])
    add_shop_args(parser, root_default=DEFAULT_SHOP_ROOT)
    add_config_args(parser)
    args = parser.parse_args(argv)
    root = Path(args.shop_root).resolve()
    try:
        cfg = load_config(args.config, [*args.overrides, f"storage.root={root}", "spark.master=local[2]"])
    except ConfigError as err:
        log.error("%s", err)
        return 2
    from carousel.session import build_session

    spark = build_session(
        cfg, "carousel-bench-shop", master="local[2]", extra_conf=session_conf(root / "warehouse")
    )
    try:
        manifest = ensure_shop(spark, cfg, sizes_from_args(args), force=args.rebuild_shop)
    finally:
        spark.stop()
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
