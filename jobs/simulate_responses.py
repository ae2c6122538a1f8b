"""Simulated user responses to sent recommendations, with a known effect of the recommendations.

Role: the ground truth for the report (``./spark-submit.sh report``) and its A/B statistics.
Given the sends of a campaign (rows of ``SENT_RECOMMENDATIONS_SCHEMA``: one per item sent, one
per control-group user with no item), every exposed user behaves as follows within the
attribution window after the send (:class:`ResponseModel`, seeded):

* everyone, control included, browses the shop with probability ``browse_p``: a few views of
  catalog items drawn uniformly, and with probability ``browse_purchase_p`` a purchase of one of
  them;
* treatment users (a send with items) additionally click the message with probability
  ``click_p`` (a ``Notification Clicked`` carrying ``properties.payload_id`` and the clicked
  item, rank 1 most likely), view the clicked item from the message, and buy it with probability
  ``purchase_p``; and view each recommended item later on their own (no payload id) with
  probability ``extra_view_p``.

The treatment-only probabilities are scaled by ``uplift`` (0: recommendations change nothing,
1: the defaults), so a report on the output must find a positive lift exactly when uplift > 0.

Inputs: the sends as a list of mappings or a pandas DataFrame (:func:`generate_responses`), or,
from the command line, the Delta ``sent_recommendations`` table (optionally one campaign) and the
``catalog`` table (items to browse, prices). ``reporting.attribution_window_hours`` bounds the
event times. Outputs: JSON events per the contract in :mod:`carousel.schemas` (event ids
``r-<seed>-<payload id>-<n>``) on the ``events`` topic, Kafka key = user id; a JSON summary on
stdout. The same sends, seed and model always give the same events.

    ./spark-submit.sh simulate-responses --campaign weekly-email --uplift 1 --seed 11
    ./spark-submit.sh simulate-responses --uplift 0 --dry-run
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CarouselConfig
from carousel.schemas import (
    CATALOG_TABLE,
    NOTIFICATION_CLICKED,
    PRODUCT_PURCHASED,
    PRODUCT_VIEWED,
    SENT_RECOMMENDATIONS_TABLE,
)
from jobs.simulate_events import VALID, Record, encode_event, produce

__all__ = ["ResponseModel", "generate_responses", "main", "run", "to_records"]

log = logging.getLogger(__name__)

SOURCE = "mobile"
# Responses land inside this share of the attribution window, clear of its end.
_WINDOW_SHARE = 0.9
_MIN_DELAY_MS = 1000


@dataclass(frozen=True)
class ResponseModel:
    """Response probabilities; the treatment-only ones are multiplied by ``uplift``."""

    browse_p: float = 0.35  # any exposed user browses within the window
    browse_views_mean: float = 3.0  # mean views per browse (at least 1)
    browse_purchase_p: float = 0.12  # a browse ends with a purchase of a viewed item
    click_p: float = 0.15  # treatment: clicks the message, on one of its items
    purchase_p: float = 0.35  # treatment: buys the clicked item
    extra_view_p: float = 0.08  # treatment: views each recommended item later, on their own
    uplift: float = 1.0

    def __post_init__(self) -> None:
        for name in ("browse_p", "browse_purchase_p", "click_p", "purchase_p", "extra_view_p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.uplift < 0 or self.browse_views_mean < 1:
            raise ValueError(
                f"uplift must be >= 0 and browse_views_mean >= 1, got {self.uplift}, {self.browse_views_mean}"
            )

    def with_uplift(self, uplift: float) -> ResponseModel:
        return replace(self, uplift=uplift)

    def treatment(self, p: float) -> float:
        return min(1.0, p * self.uplift)


@dataclass
class _Send:
    payload_id: str
    user_id: str
    campaign: str
    channel: str
    sent_at: datetime
    items: list[tuple[int, str]]  # (rank, item_id), best first


def _utc(value: Any) -> datetime:
    moment = pd.Timestamp(value).to_pydatetime()
    if moment.tzinfo is None:  # naive times are UTC, as in every Spark session of carousel
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _sends(sent: Iterable[Mapping[str, Any]] | pd.DataFrame) -> list[_Send]:
    rows = sent.to_dict("records") if isinstance(sent, pd.DataFrame) else sent
    by_payload: dict[str, _Send] = {}
    for row in rows:
        for name in ("payload_id", "user_id", "campaign", "channel", "sent_at"):
            if row.get(name) is None or (isinstance(row.get(name), float) and pd.isna(row[name])):
                raise ValueError(f"sent row {dict(row)!r} has no {name}")
        send = by_payload.get(row["payload_id"])
        if send is None:
            send = by_payload[row["payload_id"]] = _Send(
                row["payload_id"], row["user_id"], row["campaign"], row["channel"], _utc(row["sent_at"]), []
            )
        item = row.get("item_id")
        if isinstance(item, str):
            rank = row.get("rank")
            send.items.append(
                (int(rank) if rank is not None and not pd.isna(rank) else len(send.items) + 1, item)
            )
    for send in by_payload.values():
        send.items.sort()
    return [by_payload[key] for key in sorted(by_payload)]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _payload_events(
    send: _Send,
    catalog_items: Sequence[str],
    prices: Mapping[str, float],
    window_ms: int,
    model: ResponseModel,
    seed: int,
) -> list[dict[str, Any]]:
    # One generator per payload: a send's responses do not depend on the others or their order.
    rng = random.Random(f"carousel-responses:{seed}:{send.payload_id}")
    span = max(_MIN_DELAY_MS + 1, int(window_ms * _WINDOW_SHARE))
    actions: list[tuple[int, str, str, dict[str, str]]] = []  # (ms after send, type, item, properties)

    def purchase(at: int, item: str) -> None:
        properties = {"quantity": "1", "order_id": f"o-{send.payload_id[:12]}-{len(actions)}"}
        if item in prices:
            properties["price"] = f"{prices[item]:.2f}"
        actions.append((at, PRODUCT_PURCHASED, item, properties))

    # The baseline is drawn first: runs that differ only in uplift share the baseline behaviour.
    if rng.random() < model.browse_p and catalog_items:
        t = rng.randrange(_MIN_DELAY_MS, span)
        viewed = []
        extra = model.browse_views_mean - 1
        for _ in range(1 + (round(rng.expovariate(1 / extra)) if extra > 0 else 0)):
            item = catalog_items[rng.randrange(len(catalog_items))]
            viewed.append(item)
            actions.append((t, PRODUCT_VIEWED, item, {"screen": "product", "referrer": "home"}))
            t += rng.randrange(5_000, 60_000)
        if rng.random() < model.browse_purchase_p:
            purchase(t + rng.randrange(20_000, 120_000), rng.choice(viewed))
    if send.items:
        click, buy = rng.random(), rng.random()
        weights = [1.0 / rank for rank, _ in send.items]
        clicked = rng.choices([item for _, item in send.items], weights=weights)[0]
        t = rng.randrange(_MIN_DELAY_MS, span)
        if click < model.treatment(model.click_p):
            context = {"payload_id": send.payload_id, "campaign": send.campaign, "channel": send.channel}
            actions.append((t, NOTIFICATION_CLICKED, clicked, context))
            actions.append(
                (
                    t + rng.randrange(1_000, 5_000),
                    PRODUCT_VIEWED,
                    clicked,
                    {
                        "screen": "product",
                        "referrer": "notification",
                        "payload_id": send.payload_id,
                    },
                )
            )
            if buy < model.treatment(model.purchase_p):
                purchase(t + rng.randrange(30_000, 600_000), clicked)
        for _, item in send.items:
            later = rng.randrange(_MIN_DELAY_MS, span)
            if rng.random() < model.treatment(model.extra_view_p):
                actions.append((later, PRODUCT_VIEWED, item, {"screen": "product", "referrer": "search"}))
    actions.sort(key=lambda action: action[0])
    events = []
    for n, (offset, event_type, item, properties) in enumerate(actions):
        events.append(
            {
                "event_id": f"r-{seed}-{send.payload_id}-{n:03d}",
                "user_id": send.user_id,
                "event_type": event_type,
                "item_id": item,
                "event_time": _iso(send.sent_at + timedelta(milliseconds=min(offset, span))),
                "source": SOURCE,
                "properties": properties,
            }
        )
    return events


def generate_responses(
    sent: Iterable[Mapping[str, Any]] | pd.DataFrame,
    catalog_items: Sequence[str] | None = None,
    window_hours: float = 72.0,
    model: ResponseModel | None = None,
    seed: int = 0,
    prices: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The response events (contract dicts) of the users exposed in ``sent``, ordered by payload id.

    ``catalog_items``: the items users browse (default: every item sent); ``prices``: item ->
    price, written into purchases as ``properties.price`` (items without one carry no price).
    Raises ``ValueError`` naming the row when a send lacks a required field.
    """
    sends = _sends(sent)
    model = model or ResponseModel()
    items = sorted(set(catalog_items) if catalog_items else {i for s in sends for _, i in s.items})
    window_ms = int(window_hours * 3_600_000)
    events: list[dict[str, Any]] = []
    for send in sends:
        events += _payload_events(send, items, prices or {}, window_ms, model, seed)
    return events


def to_records(events: Iterable[Mapping[str, Any]]) -> Iterable[Record]:
    """Kafka records (key = user id) of the events, labelled valid."""
    for event in events:
        yield Record(str(event["user_id"]).encode(), encode_event(dict(event)), VALID)


# ---------------------------------------------------------------------------------------------
# Edges
# ---------------------------------------------------------------------------------------------
def read_inputs(
    cfg: CarouselConfig, campaign: str | None = None
) -> tuple[pd.DataFrame, list[str], dict[str, float]]:
    """The sends (optionally of one campaign), the active catalog items and their prices, via Spark."""
    from pyspark.sql import functions as F

    from carousel.session import build_session
    from carousel.storage import table_exists

    spark = build_session(cfg, "carousel-simulate-responses")
    sent_location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    if not table_exists(spark, sent_location):
        raise ValueError(f"no {SENT_RECOMMENDATIONS_TABLE} table at {sent_location}: nothing to respond to")
    sent = spark.read.format("delta").load(sent_location)
    if campaign:
        sent = sent.where(F.col("campaign") == campaign)
    # Epoch microseconds: a Python datetime from Spark would be in the driver's local zone.
    sent_rows = sent.select(
        "payload_id",
        "user_id",
        "campaign",
        "channel",
        "item_id",
        "rank",
        F.unix_micros("sent_at").alias("us"),
    ).toPandas()
    sent_rows["sent_at"] = pd.to_datetime(sent_rows.pop("us"), unit="us", utc=True)
    items: list[str] = []
    prices: dict[str, float] = {}
    catalog_location = cfg.storage.table(CATALOG_TABLE)
    if table_exists(spark, catalog_location):
        catalog = spark.read.format("delta").load(catalog_location).where(F.col("active"))
        for row in catalog.select("item_id", "price").collect():
            items.append(row["item_id"])
            if row["price"] is not None:
                prices[row["item_id"]] = float(row["price"])
    else:
        log.warning(
            "no catalog table at %s: users browse the items sent, purchases carry no price", catalog_location
        )
    return sent_rows, items, prices


def run(
    cfg: CarouselConfig,
    sent: Iterable[Mapping[str, Any]] | pd.DataFrame,
    catalog_items: Sequence[str] | None = None,
    prices: Mapping[str, float] | None = None,
    model: ResponseModel | None = None,
    seed: int = 0,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Generate the responses and produce them to the events topic; returns a summary."""
    sent_rows = sent.to_dict("records") if isinstance(sent, pd.DataFrame) else list(sent)
    events = generate_responses(
        sent_rows, catalog_items, cfg.reporting.attribution_window_hours, model, seed, prices
    )
    per_type: dict[str, int] = {}
    for event in events:
        per_type[event["event_type"]] = per_type.get(event["event_type"], 0) + 1
    summary: dict[str, Any] = {
        "sent_rows_read": len(sent_rows),
        "events": len(events),
        "per_type": dict(sorted(per_type.items())),
    }
    if not dry_run:
        topic = cfg.kafka.topic("events").name
        produce(to_records(events), cfg.kafka, topic)
        summary["topic"] = topic
    log.info("simulated responses: %s", json.dumps(summary, sort_keys=True))
    return summary


def build_parser() -> argparse.ArgumentParser:
    defaults = ResponseModel()
    parser = argparse.ArgumentParser(
        prog="simulate-responses",
        description="Produce simulated responses to the sent recommendations (known uplift).",
    )
    parser.add_argument("--campaign", metavar="NAME", help="respond to this campaign's sends only")
    parser.add_argument(
        "--uplift",
        type=float,
        default=defaults.uplift,
        help="scale of the treatment-only probabilities (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--browse-p", type=float, default=defaults.browse_p, help="baseline browse probability"
    )
    parser.add_argument("--click-p", type=float, default=defaults.click_p, help="treatment click probability")
    parser.add_argument(
        "--purchase-p",
        type=float,
        default=defaults.purchase_p,
        help="treatment purchase-after-click probability",
    )
    parser.add_argument("--dry-run", action="store_true", help="generate and count, do not produce")
    return add_config_args(parser)


def main(argv: Sequence[str]) -> int:
    setup_logging()
    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args, "simulate-responses")
    try:
        model = ResponseModel(
            browse_p=args.browse_p, click_p=args.click_p, purchase_p=args.purchase_p, uplift=args.uplift
        )
        sent, items, prices = read_inputs(cfg, args.campaign)
        summary = run(cfg, sent, items, prices, model, seed=args.seed, dry_run=args.dry_run)
    except ValueError as err:
        log.error("%s", err)
        print(f"simulate-responses: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
