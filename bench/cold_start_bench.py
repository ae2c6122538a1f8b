"""New products on the bench shop's catalog: exposure through exploration, and what it costs.

Role: the figures behind README "Ranking", step 6 (item cold start). Inputs: the bench shop's
catalog and correlation matrix as ``bench/shop_data.py`` builds them (in memory, nothing is
written), plus ``--new-items`` new products uploaded on top: each a new variant of a random
existing product (same category, brand and price band, its own title words), absent from the
matrix as a product uploaded after the nightly run is. Output: a summary on stdout and JSON
(``bench/results/cold_start.json``). Nothing is asserted.

1. **build** - the serving lookups' item lists (``carousel.ranking.item_lists_from_arrow``, what a
   catalog upload makes every serving worker rebuild in the background) with
   ``serving.cold_start`` on and off: seconds, and the ratio to the build without new products'
   content lists (the ceiling).
2. **exposure** - ``--requests`` trigger requests, each seeded like a serving trigger (a skewed
   trigger item and ``--recent`` skewed recent views, as the shop's events are skewed), ranked by
   ``carousel.ranking.rank_request`` for a 5-item campaign: the share of the new products that
   appear in at least one list after each slice of the requests (at 1,000 triggers/s, an hour is
   3.6M requests), and the ranking rate with cold start on against off (the ceiling).

    .venv/bin/python -m bench.cold_start_bench                   # ~2-4 min on 2 cores
    .venv/bin/python -m bench.cold_start_bench --new-items 5000 --requests 500000
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import functions as F

from bench.common import host_info, load1, start_results, write_json
from bench.shop_data import SKEW, ShopSizes, build_catalog, build_matrix
from carousel.cli import setup_logging
from carousel.config import CampaignConfig, load_config
from carousel.ranking import (
    FILTER_COLUMNS,
    MATRIX_COLUMNS,
    FallbackLists,
    RankingRules,
    item_lists_from_arrow,
    rank_request,
)
from carousel.session import build_session

log = logging.getLogger("bench.cold_start")
NEW_WORDS = ("Aurora", "Nimbus", "Vega", "Drift", "Ember", "Quartz", "Tidal", "Summit")


def new_products(catalog: pa.Table, count: int, seed: int) -> pa.Table:
    """``count`` new products, each a variant of a random existing one (its category, brand,
    price within 10 %), with a new id and title."""
    rnd = random.Random(seed)
    rows = catalog.to_pylist()
    made = []
    for n in range(count):
        base = dict(rows[rnd.randrange(len(rows))])
        base["item_id"] = f"new-{n:06d}"
        base["title"] = f"{rnd.choice(NEW_WORDS)} {base['title'].split(' ')[0]} product {base['item_id']}"
        base["price"] = round(base["price"] * rnd.uniform(0.9, 1.1), 2)
        made.append(base)
    return pa.Table.from_pylist(made, schema=catalog.schema)


def skewed(rnd: random.Random, n_items: int) -> str:
    """An item id drawn as the shop's events draw them (small indexes far more popular)."""
    return f"i-{min(int(rnd.random() ** SKEW * n_items), n_items - 1):06d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cold_start_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="catalog products with a model list")
    parser.add_argument("--new-items", type=int, default=1_000, help="new products uploaded on top")
    parser.add_argument("--requests", type=int, default=200_000, help="trigger requests ranked")
    parser.add_argument("--recent", type=int, default=4, help="recent views per request")
    parser.add_argument("--output", default="bench/results/cold_start.json")
    args = parser.parse_args(argv)
    setup_logging()
    results = start_results("cold_start", argv, vars(args))
    results["host"] = host_info()
    cfg = load_config()
    serving_on = cfg.serving
    serving_off = load_config(overrides=["serving.cold_start.content_neighbours=0"]).serving
    campaign = CampaignConfig.model_validate({"channel": "in_app", "items": 5})
    sizes = ShopSizes(items=args.items)

    spark = build_session(cfg, "carousel-bench-cold-start")
    try:
        now = datetime.now(UTC)
        catalog = build_catalog(spark, sizes, now).select("item_id", *FILTER_COLUMNS).toArrow()
        matrix = build_matrix(spark, sizes).withColumn("model_version", F.lit("bench-model"))
        matrix_rows = matrix.select(*MATRIX_COLUMNS).toArrow()
    finally:
        spark.stop()
    catalog = pa.concat_tables([catalog, new_products(catalog, args.new_items, seed=5)])
    print(
        f"catalog {catalog.num_rows:,} products, {args.new_items:,} new; {matrix_rows.num_rows:,} matrix rows"
    )

    # 1. build
    build: dict[str, float] = {}
    lists = {}
    for label, serving in (("off", serving_off), ("on", serving_on)):
        started = time.perf_counter()
        lists[label] = item_lists_from_arrow(matrix_rows, catalog, campaign.filters, serving.cold_start)
        build[label] = round(time.perf_counter() - started, 2)
    new_ids = {f"new-{n:06d}" for n in range(args.new_items)}
    on = lists["on"]
    linked = int(pc.count_distinct(pa.array(on.explore_items)).as_py()) if on.explores else 0
    results["build"] = {
        "seconds_without_cold_start": build["off"],
        "seconds_with_cold_start": build["on"],
        "ratio_to_ceiling": round(build["off"] / build["on"], 3) if build["on"] else None,
        "new_items_with_a_content_list": sum(1 for i in new_ids if on.candidates(on.index[i])),
        "new_items_explorable": linked,
        "nbytes_with_cold_start": on.nbytes,
    }
    print(f"build: {build['off']}s without, {build['on']}s with cold start; {linked:,} new items explorable")

    # 2. exposure
    rnd_seed = 17
    exposure: dict[str, Any] = {}
    for label, serving in (("off", serving_off), ("on", serving_on)):
        rules = RankingRules.of(campaign, serving)
        rnd = random.Random(rnd_seed)
        seen: set[str] = set()
        curve = []
        checkpoints = {int(args.requests * f) for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)}
        started = time.perf_counter()
        for n in range(1, args.requests + 1):
            request = {
                "request_id": f"r{n}",
                "user_id": f"u{n}",
                "requested_at": None,
                "trigger_item_id": skewed(rnd, args.items),
                "recent_views": [
                    {"item_id": skewed(rnd, args.items), "event_time": None} for _ in range(args.recent)
                ],
                "recent_purchases": [],
            }
            for item, *_ in rank_request(request, lists[label], FallbackLists(), rules):
                if item in new_ids:
                    seen.add(item)
            if n in checkpoints:
                curve.append(
                    {
                        "requests": n,
                        "new_items_exposed": len(seen),
                        "share": round(len(seen) / len(new_ids), 4),
                    }
                )
        seconds = time.perf_counter() - started
        exposure[label] = {"requests_per_second": round(args.requests / seconds), "curve": curve}
        print(
            f"exposure ({label}): {args.requests / seconds:,.0f} requests/s; "
            + ", ".join(f"{c['requests']:,}: {c['share']:.1%}" for c in curve)
        )
    exposure["ratio_to_ceiling"] = round(
        exposure["on"]["requests_per_second"] / exposure["off"]["requests_per_second"], 3
    )
    results["exposure"] = exposure
    results["load1_at_end"] = load1()
    path = write_json(results, args.output)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
