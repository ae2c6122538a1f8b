"""Pure profile-update logic: events -> per-user profile deltas, and old profile + delta -> new profile.

Role: the one definition of what a user profile holds (``carousel.schemas.PROFILE_SCHEMA``), used by
the streaming ingest (MERGE per micro-batch, :func:`merged_profile_columns`) and by the batch
``rebuild-profiles`` job (:func:`profile_deltas` over the whole ``events`` table). Both give the same
profile because combining is associative and commutative:

* recent views / purchases keep the latest time per distinct item, newest first (ties: larger
  item id first), at most ``recent_items`` of them; an event older than the N kept items never
  enters, so late (out-of-order) events land where a full recomputation would put them;
* devices keep the latest event per device id, at most ``max_devices``;
* "latest" values (app version, user attributes) are structs led by (event_time, event_id), so the
  larger struct is the later event, whatever order events arrive in;
* counts add up; platforms are a sorted set union.

Exactly-once for counts comes from the caller: each stored event reaches this logic once.
No I/O here: every function maps Columns or DataFrames to Columns or DataFrames.
"""

from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DataType, StructType

from carousel.schemas import (
    EVENT_TYPES,
    PRODUCT_PURCHASED,
    PRODUCT_VIEWED,
    PROFILE_DEVICE_SCHEMA,
    PROFILE_SCHEMA,
    RECENT_ITEM_SCHEMA,
    USER_ATTRIBUTES_SCHEMA,
)

PROFILE_COLUMNS: tuple[str, ...] = tuple(f.name for f in PROFILE_SCHEMA.fields)


def _descending(order: tuple[str, ...]) -> Callable[[Column, Column], Column]:
    """Comparator for array_sort: descending on each field of ``order`` in turn."""

    def compare(left: Column, right: Column) -> Column:
        result = F.lit(0)
        for field in reversed(order):
            result = (
                F.when(left[field] > right[field], F.lit(-1))
                .when(left[field] < right[field], F.lit(1))
                .otherwise(result)
            )
        return result

    return compare


def latest_distinct(
    entries: Column, key: str, order: tuple[str, ...], limit: int, element_type: StructType
) -> Column:
    """Sort ``entries`` newest first by ``order``, keep the first entry per ``key``, at most ``limit``."""
    newest_first = F.array_sort(entries, _descending(order))
    empty = F.array().cast(ArrayType(element_type))
    return F.aggregate(
        newest_first,
        empty,
        lambda kept, entry: F.when(
            (F.size(kept) >= limit) | F.exists(kept, lambda k: k[key] == entry[key]), kept
        ).otherwise(F.concat(kept, F.array(entry))),
    )


def _recent_items(entries: Column, limit: int) -> Column:
    return latest_distinct(entries, "item_id", ("event_time", "item_id"), limit, RECENT_ITEM_SCHEMA)


def _devices(entries: Column, limit: int) -> Column:
    return latest_distinct(entries, "device_id", ("last_seen", "last_event_id"), limit, PROFILE_DEVICE_SCHEMA)


def _empty_array(element_type: DataType) -> Column:
    return F.array().cast(ArrayType(element_type))


def _item_entry(event_type: str) -> Column:
    return F.when(
        (F.col("event_type") == event_type) & F.col("item_id").isNotNull(),
        F.struct(F.col("item_id"), F.col("event_time")),
    )


def profile_deltas(
    events: DataFrame, recent_items: int, max_devices: int, updated_at: Column | None = None
) -> DataFrame:
    """Aggregate stored events (``EVENTS_SCHEMA`` rows) into one partial profile per user.

    Over the whole events table this *is* the batch recomputation of every profile.
    """
    count_columns = [
        F.count(F.when(F.col("event_type") == event_type, True)).alias(f"_n{i}")
        for i, event_type in enumerate(EVENT_TYPES)
    ]
    device_entry = F.when(
        F.col("device_id").isNotNull(),
        F.struct(
            F.col("device_id"),
            F.col("event_time").alias("last_seen"),
            F.col("event_id").alias("last_event_id"),
            F.col("device.platform").alias("platform"),
            F.col("device.os_version").alias("os_version"),
            F.col("device.app_version").alias("app_version"),
            F.col("device.model").alias("model"),
        ),
    )
    app_version = F.when(
        F.col("device.app_version").isNotNull(),
        F.struct(F.col("event_time"), F.col("event_id"), F.col("device.app_version").alias("app_version")),
    )
    attributes = F.when(
        F.col("user_attributes").isNotNull(),
        F.struct(
            F.col("event_time"),
            F.col("event_id"),
            *[F.col(f"user_attributes.{f.name}").alias(f.name) for f in USER_ATTRIBUTES_SCHEMA.fields],
        ),
    )
    aggregated = events.groupBy("user_id").agg(
        F.min("event_time").alias("first_seen"),
        F.max("event_time").alias("last_seen"),
        F.count(F.lit(1)).alias("total_events"),
        *count_columns,
        F.collect_list(_item_entry(PRODUCT_VIEWED)).alias("_views"),
        F.collect_list(_item_entry(PRODUCT_PURCHASED)).alias("_purchases"),
        F.collect_list(device_entry).alias("_devices"),
        F.collect_set(F.col("device.platform")).alias("_platforms"),
        F.max(app_version).alias("last_app_version"),
        F.max(attributes).alias("user_attributes"),
    )
    counts = F.map_filter(
        F.create_map(*[x for i, t in enumerate(EVENT_TYPES) for x in (F.lit(t), F.col(f"_n{i}"))]),
        lambda _, n: n > 0,
    )
    return aggregated.select(
        "user_id",
        "first_seen",
        "last_seen",
        F.col("total_events").cast("bigint").alias("total_events"),
        counts.alias("event_counts"),
        _recent_items(F.col("_views"), recent_items).alias("recent_views"),
        _recent_items(F.col("_purchases"), recent_items).alias("recent_purchases"),
        _devices(F.col("_devices"), max_devices).alias("devices"),
        F.array_sort(F.col("_platforms")).alias("platforms"),
        "last_app_version",
        "user_attributes",
        (updated_at if updated_at is not None else F.current_timestamp()).alias("updated_at"),
    )


def merged_profile_columns(old: str, new: str, recent_items: int, max_devices: int) -> dict[str, Column]:
    """Column expressions for the combined profile of ``old``.* and ``new``.* (either may be absent).

    Used as the ``set`` of the streaming MERGE (old = the table, new = the batch delta) and by
    :func:`combine_profiles`; one definition keeps the two paths identical.
    """

    def o(name: str) -> Column:
        return F.col(f"{old}.{name}")

    def n(name: str) -> Column:
        return F.col(f"{new}.{name}")

    def items(name: str, element_type: StructType) -> Column:
        return F.concat(
            F.coalesce(o(name), _empty_array(element_type)), F.coalesce(n(name), _empty_array(element_type))
        )

    empty_counts = F.create_map().cast("map<string,bigint>")
    return {
        "user_id": F.coalesce(o("user_id"), n("user_id")),
        "first_seen": F.least(o("first_seen"), n("first_seen")),
        "last_seen": F.greatest(o("last_seen"), n("last_seen")),
        "total_events": F.coalesce(o("total_events"), F.lit(0)) + F.coalesce(n("total_events"), F.lit(0)),
        "event_counts": F.map_zip_with(
            F.coalesce(o("event_counts"), empty_counts),
            F.coalesce(n("event_counts"), empty_counts),
            lambda _, a, b: F.coalesce(a, F.lit(0)) + F.coalesce(b, F.lit(0)),
        ),
        "recent_views": _recent_items(items("recent_views", RECENT_ITEM_SCHEMA), recent_items),
        "recent_purchases": _recent_items(items("recent_purchases", RECENT_ITEM_SCHEMA), recent_items),
        "devices": _devices(items("devices", PROFILE_DEVICE_SCHEMA), max_devices),
        "platforms": F.array_sort(
            F.array_union(
                F.coalesce(o("platforms"), F.array().cast("array<string>")),
                F.coalesce(n("platforms"), F.array().cast("array<string>")),
            )
        ),
        "last_app_version": F.greatest(o("last_app_version"), n("last_app_version")),
        "user_attributes": F.greatest(o("user_attributes"), n("user_attributes")),
        "updated_at": F.coalesce(n("updated_at"), o("updated_at")),
    }


def combine_deltas(deltas: DataFrame, recent_items: int, max_devices: int) -> DataFrame:
    """Any number of partial profiles per user (``PROFILE_SCHEMA`` columns) -> one per user: what
    :func:`merged_profile_columns` gives applied to them one after another, in any order."""
    empty_counts = F.create_map().cast("map<string,bigint>")

    def flattened(name: str) -> Column:
        return F.flatten(F.collect_list(F.col(name)))

    combined = deltas.groupBy("user_id").agg(
        F.min("first_seen").alias("first_seen"),
        F.max("last_seen").alias("last_seen"),
        F.sum("total_events").alias("total_events"),
        F.collect_list("event_counts").alias("_counts"),
        flattened("recent_views").alias("_views"),
        flattened("recent_purchases").alias("_purchases"),
        flattened("devices").alias("_devices"),
        flattened("platforms").alias("_platforms"),
        F.max("last_app_version").alias("last_app_version"),
        F.max("user_attributes").alias("user_attributes"),
        F.max("updated_at").alias("updated_at"),
    )
    columns = {
        "total_events": F.col("total_events").cast("bigint"),
        "event_counts": F.aggregate(
            "_counts",
            empty_counts,
            lambda total, counts: F.map_zip_with(
                total, counts, lambda _, a, b: F.coalesce(a, F.lit(0)) + F.coalesce(b, F.lit(0))
            ),
        ),
        "recent_views": _recent_items(F.col("_views"), recent_items),
        "recent_purchases": _recent_items(F.col("_purchases"), recent_items),
        "devices": _devices(F.col("_devices"), max_devices),
        "platforms": F.array_sort(F.array_distinct(F.col("_platforms"))),
    }
    return combined.select(*[(columns.get(name, F.col(name))).alias(name) for name in PROFILE_COLUMNS])


def combine_profiles(old: DataFrame, new: DataFrame, recent_items: int, max_devices: int) -> DataFrame:
    """Profiles ``old`` updated with the deltas ``new``: exactly what the streaming MERGE produces."""
    joined = old.alias("o").join(new.alias("n"), F.col("o.user_id") == F.col("n.user_id"), "full_outer")
    columns = merged_profile_columns("o", "n", recent_items, max_devices)
    return joined.select(*[columns[name].alias(name) for name in PROFILE_COLUMNS])
