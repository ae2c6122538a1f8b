"""Render benchmark: a campaign's Python per payload, alone: Arrow render request -> payload JSON.

Role: measures what a campaign's render tasks do in Python for each payload, in one process: no
Spark, no broker. Over the bench shop it ranks the first ``--requests`` profiles with the
campaign's rules (as ``bench-rank`` does), builds the render requests as the tasks receive them
(one Arrow batch: ``created_at`` in epoch microseconds, the user's attributes, the ranked items)
and times, per request, after one warm-up pass:

1. **rows**: the batch to Python rows, with ``carousel.arrow_rows.batch_rows`` (what the tasks
   use) and with pyarrow's ``RecordBatch.to_pylist()`` (what they used before), for comparison.
2. **render**: ``render_payload`` (items filled from the catalog) and ``payload_json``, with the
   campaign's rendered content and with ``content: reference``.
3. **ceiling**: ``payload_json`` alone over the finished payloads: the encoding that no render
   step avoids. (rows + render) / ceiling says what the rest costs on top.

Inputs: a shop built by another benchmark (``make bench-campaign`` or ``make bench-api`` builds
``/tmp/carousel-bench-shop``). Output: figures printed, and ``--output`` JSON.

    .venv/bin/python -m bench.render_bench [--requests 20000] [--campaign weekly-email] [--shop-root DIR]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyspark.sql.pandas.types import to_arrow_type
from pyspark.sql.types import ArrayType

from bench.rank_bench import RankingInputs, parse_shop_bench_args, ranking_inputs, read_shop_table
from carousel.arrow_rows import batch_rows
from carousel.config import load_config
from carousel.payloads import (
    CATALOG_ITEM_FIELDS,
    PAYLOAD_REQUEST_SCHEMA,
    RANKED_ITEM_FIELDS,
    USER_FIELDS,
    CatalogItems,
    PayloadRenderer,
    payload_json,
    render_payload,
)
from carousel.ranking import rank_request
from carousel.schemas import CATALOG_TABLE, RANKED_ITEM_SCHEMA

# The render request as a campaign's render tasks receive it (carousel.payloads.render_payloads):
# created_at in epoch microseconds, the items with the ranking's fields only.
_REQUEST = pa.schema(
    [
        (
            field.name,
            {"created_at": pa.int64(), "items": to_arrow_type(ArrayType(RANKED_ITEM_SCHEMA))}.get(
                field.name, to_arrow_type(field.dataType)
            ),
        )
        for field in PAYLOAD_REQUEST_SCHEMA
    ]
)


def render_requests(inputs: RankingInputs, campaign_name: str, template: str, channel: str) -> pa.RecordBatch:
    """One render request per ranking request: its model-arm items and the profile's attributes."""
    created_at = int(datetime.now(UTC).timestamp() * 1_000_000)
    rows = []
    for request, profile in zip(inputs.requests, inputs.profiles.to_pylist(), strict=True):
        ranked = rank_request(request, inputs.lists, inputs.fallback, inputs.rules, True)
        attributes = profile.get("user_attributes") or {}
        devices = profile.get("devices") or []
        rows.append(
            {
                "payload_id": f"bench-{request['user_id']}",
                "campaign": campaign_name,
                "channel": channel,
                "template": template,
                "variant": "default",
                "user_id": request["user_id"],
                "trigger_event_id": None,
                "trigger_event_type": None,
                "run_id": "bench-render",
                "model_version": next((version for *_, version in ranked if version), None),
                "created_at": created_at,
                "user": {
                    **{name: attributes.get(name) for name in USER_FIELDS},
                    "platform": devices[0].get("platform") if devices else None,
                },
                "items": [dict(zip(RANKED_ITEM_FIELDS, entry[:4], strict=True)) for entry in ranked],
            }
        )
    return pa.RecordBatch.from_pylist(rows, schema=_REQUEST)


def _per_request_us(count: int, work: Callable[[], Any]) -> float:
    work()  # warm-up: caches, the catalog's index and cleaned fields built outside the timing
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) / count * 1e6


def _rendered(rows: Sequence[dict[str, Any]], renderer: PayloadRenderer, catalog: CatalogItems) -> list[str]:
    return [payload_json(render_payload(_request(row), renderer, catalog)) for row in rows]


def _request(row: dict[str, Any]) -> dict[str, Any]:
    """The row with ``created_at`` as a datetime, as the render tasks hand it on."""
    return {**row, "created_at": datetime.fromtimestamp(row["created_at"] / 1e6, UTC)}


def main(argv: Sequence[str] | None = None) -> int:
    parser, args, tables = parse_shop_bench_args(argv, __doc__.splitlines()[0], "ranked and rendered")
    cfg = load_config()
    campaign = cfg.campaigns.get(args.campaign)
    if campaign is None or campaign.channel != "email":
        parser.error(f"{args.campaign!r} is not an email campaign of the config")
    inputs = ranking_inputs(tables, cfg, args.campaign, args.requests, ["user_attributes", "devices"])
    batch = render_requests(inputs, args.campaign, campaign.template, campaign.channel)
    catalog = CatalogItems(read_shop_table(tables, CATALOG_TABLE, ["item_id", *CATALOG_ITEM_FIELDS]))
    rendered = PayloadRenderer.from_config(cfg)
    reference = PayloadRenderer.from_config(
        cfg.with_overrides(campaigns={args.campaign: {"content": "reference"}})
    )
    count = batch.num_rows
    rows = batch_rows(batch)
    figures = {
        "rows_batch_rows_us": _per_request_us(count, lambda: batch_rows(batch)),
        "rows_to_pylist_us": _per_request_us(count, batch.to_pylist),
        "render_rendered_us": _per_request_us(count, lambda: _rendered(rows, rendered, catalog)),
        "render_reference_us": _per_request_us(count, lambda: _rendered(rows, reference, catalog)),
    }
    for content, renderer in (("rendered", rendered), ("reference", reference)):
        payloads = [render_payload(_request(row), renderer, catalog) for row in rows]
        figures[f"ceiling_json_{content}_us"] = _per_request_us(
            count, lambda done=payloads: [payload_json(payload) for payload in done]
        )
        total = figures["rows_batch_rows_us"] + figures[f"render_{content}_us"]
        figures[f"total_{content}_us"] = total
        figures[f"total_over_ceiling_{content}"] = total / figures[f"ceiling_json_{content}_us"]
    results = {
        "benchmark": "render",
        "campaign": args.campaign,
        "requests": count,
        "items_per_request": round(sum(len(r["items"]) for r in rows) / count, 2),
        **{name: round(value, 2) for name, value in figures.items()},
    }
    f = {name: f"{value:.1f}" for name, value in figures.items()}
    print(
        f"render, {args.campaign}, {count:,} requests of {results['items_per_request']} items, µs each:\n"
        f"  rows: batch_rows {f['rows_batch_rows_us']}, to_pylist {f['rows_to_pylist_us']}\n"
        f"  render + JSON: rendered {f['render_rendered_us']}, reference {f['render_reference_us']}\n"
        f"  ceiling (JSON alone): rendered {f['ceiling_json_rendered_us']}, "
        f"reference {f['ceiling_json_reference_us']}\n"
        f"  rows + render over ceiling: rendered {f['total_over_ceiling_rendered']}, "
        f"reference {f['total_over_ceiling_reference']}"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
