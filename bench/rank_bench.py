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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from bench.shop_data import DEFAULT_SHOP_ROOT
from carousel.config import load_config
from carousel.ranking import (
    FILTER_COLUMNS,
    MATRIX_COLUMNS,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="profiles ranked (20,000)")
    parser.add_argument("--campaign", default="weekly-email", help="campaign whose rules rank (weekly-email)")
    parser.add_argument("--shop-root", default=DEFAULT_SHOP_ROOT, help=f"the shop ({DEFAULT_SHOP_ROOT})")
    parser.add_argument("--output", help="JSON results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tables = Path(args.shop_root) / "tables"
    if not (tables / PROFILES_TABLE).is_dir():
        parser.error(f"no shop under {args.shop_root}: build one with make bench-campaign or make bench-api")
    cfg = load_config()
    if args.campaign not in cfg.campaigns:
        parser.error(f"unknown campaign {args.campaign!r}; known: {sorted(cfg.campaigns)}")
    campaign = cfg.campaigns[args.campaign]
    rules = RankingRules.of(campaign, cfg.serving)

    def read(name: str, columns: Sequence[str]) -> pa.Table:
        return DeltaTable(str(tables / name)).to_pyarrow_table(columns=list(columns))

    started = time.perf_counter()
    lists = item_lists_from_arrow(
        read(ITEM_RECOMMENDATIONS_TABLE, MATRIX_COLUMNS),
        read(CATALOG_TABLE, ["item_id", *FILTER_COLUMNS]),
        campaign.filters,
        cfg.serving.cold_start,
    )
    events = read(EVENTS_TABLE, ["item_id"]).filter(pc.is_valid(pc.field("item_id")))
    counts = events.group_by("item_id").aggregate([("item_id", "count")])
    categories = read(CATALOG_TABLE, ["item_id", "category"])
    trending = counts.join(categories, "item_id").rename_columns(["item_id", "score", "category"])
    trending = trending.set_column(1, "score", pc.cast(trending["score"], pa.float64()))
    fallback = fallback_lists(trending, lists, rules)
    now_us = _micros(datetime.now(UTC))
    profiles = read(PROFILES_TABLE, ["user_id", *_RECENT]).slice(0, args.requests)
    requests = ranking_requests(profiles, rules.recent_items_used, now_us)
    log.info(
        "inputs: %d items, %d requests, %.1f s", len(lists.ids), len(requests), time.perf_counter() - started
    )

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
