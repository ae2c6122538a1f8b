"""Ranking benchmark: :func:`carousel.ranking.rank_request` per request over the bench shop.

Role: measures the Python ranking that every path shares (campaign executors, serve, the API),
alone, in one process: no Spark, no broker. It reads the shop's catalog, matrix, profiles and
events with delta-rs, builds the campaign's item lists and trending fallback as a campaign's
executors do, turns the first ``--requests`` profiles into ranking requests (times as epoch
microseconds, as the executors read them) and ranks each, after one warm-up pass:

1. **model arm**: ``rank_request(use_model=True)``: seeds, exclusions, the seeds' model lists,
   exploration, the fallback for empty slots.
2. **ceiling**: the same requests on a trending arm (``use_model=False``): seeds, exclusions and
   the fallback only, the cheapest a request can be ranked. model / ceiling says what the model
   lists cost on top.

Inputs: a shop built by another benchmark (``make bench-campaign`` or ``make bench-api`` builds
``/tmp/carousel-bench-shop``). Output: figures printed, and ``--output`` JSON.

    .venv/bin/python -m bench.rank_bench [--requests 20000] [--campaign weekly-email] [--shop-root DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bench.shop_data import DEFAULT_SHOP_ROOT
from carousel.config import CarouselConfig, load_config
from carousel.portable import read_table
from carousel.ranking import (
    FILTER_COLUMNS,
    MATRIX_COLUMNS,
    FallbackLists,
    ItemLists,
    RankingRules,
    fallback_lists,
    item_lists_from_arrow,
    rank_request,
)
from carousel.schemas import CATALOG_TABLE, EVENTS_TABLE, ITEM_RECOMMENDATIONS_TABLE, PROFILES_TABLE

log = logging.getLogger("bench.rank")
_RECENT = ("recent_views", "recent_purchases")


def _micros(value: datetime) -> int:
    return int(value.timestamp() * 1_000_000)


def ranking_requests(profiles: pa.Table, used: int, now_us: int) -> list[dict[str, Any]]:
    """One request per profile, as the executors read it: recent items with times in microseconds."""
    requests = []
    for row in profiles.to_pylist():
        request: dict[str, Any] = {
            "request_id": f"bench-{row['user_id']}",
            "user_id": row["user_id"],
            "requested_at": now_us,
            "trigger_item_id": None,
        }
        for column in _RECENT:
            request[column] = [
                {"item_id": entry["item_id"], "event_time": _micros(entry["event_time"])}
                for entry in (row[column] or ())[: max(used, 10)]
            ]
        requests.append(request)
    return requests


def _per_request_us(requests: Sequence[dict[str, Any]], rank: Any) -> float:
    for request in requests:  # warm-up: indexes, flat lists and caches built outside the timing
        rank(request)
    started = time.perf_counter()
    for request in requests:
        rank(request)
    return (time.perf_counter() - started) / len(requests) * 1e6


@dataclass(frozen=True)
class RankingInputs:
    """What a campaign's executors rank with, built from the shop as they build it."""

    lists: ItemLists
    fallback: FallbackLists
    rules: RankingRules
    requests: list[dict[str, Any]]
    profiles: pa.Table


def read_shop_table(tables: Path, name: str, columns: Sequence[str]) -> pa.Table:
    """Columns of one shop table, read with delta-rs as serving's lookups read them."""
    return read_table(str(tables / name), columns)


def ranking_inputs(
    tables: Path, cfg: CarouselConfig, campaign_name: str, count: int, profile_columns: Sequence[str] = ()
) -> RankingInputs:
    """The campaign's item lists and trending fallback over the shop under ``tables``, and one
    ranking request for each of the first ``count`` profiles (``profiles`` also carries
    ``profile_columns``)."""
    campaign = cfg.campaigns[campaign_name]
    rules = RankingRules.of(campaign, cfg.serving)
    started = time.perf_counter()
    lists = item_lists_from_arrow(
        read_shop_table(tables, ITEM_RECOMMENDATIONS_TABLE, MATRIX_COLUMNS),
        read_shop_table(tables, CATALOG_TABLE, ["item_id", *FILTER_COLUMNS]),
        campaign.filters,
        cfg.serving.cold_start,
    )
    events = read_shop_table(tables, EVENTS_TABLE, ["item_id"]).filter(pc.is_valid(pc.field("item_id")))
    counts = events.group_by("item_id").aggregate([("item_id", "count")])
    categories = read_shop_table(tables, CATALOG_TABLE, ["item_id", "category"])
    trending = counts.join(categories, "item_id").rename_columns(["item_id", "score", "category"])
    trending = trending.set_column(1, "score", pc.cast(trending["score"], pa.float64()))
    fallback = fallback_lists(trending, lists, rules)
    now_us = _micros(datetime.now(UTC))
    columns = ["user_id", *_RECENT, *[c for c in profile_columns if c not in ("user_id", *_RECENT)]]
    profiles = read_shop_table(tables, PROFILES_TABLE, columns).slice(0, count)
    requests = ranking_requests(profiles, rules.recent_items_used, now_us)
    log.info(
        "inputs: %d items, %d requests, %.1f s", len(lists.ids), len(requests), time.perf_counter() - started
    )
    return RankingInputs(lists, fallback, rules, requests, profiles)


def parse_shop_bench_args(
    argv: Sequence[str] | None, description: str, done_to_profiles: str
) -> tuple[argparse.ArgumentParser, argparse.Namespace, Path]:
    """The options of the in-process benches over the shop (this one and ``bench.render_bench``),
    parsed, with logging set up; and the shop's tables folder (a usage error without a shop)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--requests", type=int, default=20_000, help=f"profiles {done_to_profiles} (20,000)")
    parser.add_argument("--campaign", default="weekly-email", help="campaign whose rules rank (weekly-email)")
    parser.add_argument("--shop-root", default=DEFAULT_SHOP_ROOT, help=f"the shop ({DEFAULT_SHOP_ROOT})")
    parser.add_argument("--output", help="JSON results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tables = Path(args.shop_root) / "tables"
    if not (tables / PROFILES_TABLE).is_dir():
        parser.error(f"no shop under {args.shop_root}: build one with make bench-campaign or make bench-api")
    return parser, args, tables


def main(argv: Sequence[str] | None = None) -> int:
    parser, args, tables = parse_shop_bench_args(argv, __doc__.splitlines()[0], "ranked")
    cfg = load_config()
    if args.campaign not in cfg.campaigns:
        parser.error(f"unknown campaign {args.campaign!r}; known: {sorted(cfg.campaigns)}")
    inputs = ranking_inputs(tables, cfg, args.campaign, args.requests)
    lists, fallback, rules, requests = inputs.lists, inputs.fallback, inputs.rules, inputs.requests

    model_us = _per_request_us(requests, lambda r: rank_request(r, lists, fallback, rules, True))
    ceiling_us = _per_request_us(requests, lambda r: rank_request(r, lists, fallback, rules, False))
    results = {
        "benchmark": "rank",
        "campaign": args.campaign,
        "requests": len(requests),
        "list_entries": len(lists.recs),
        "model_us_per_request": round(model_us, 2),
        "ceiling_trending_us_per_request": round(ceiling_us, 2),
        "model_over_ceiling": round(model_us / ceiling_us, 2),
    }
    print(
        f"rank_request, {args.campaign}, {len(requests):,} requests: model arm {model_us:.1f} µs, "
        f"trending arm (ceiling) {ceiling_us:.1f} µs a request; model / ceiling {model_us / ceiling_us:.2f}"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
