"""What each stage has produced: one line per pipeline Delta table, read without Spark (delta-rs).

Role: the last step of ``make demo``, and a quick look for an operator. Inputs: the tables under
``storage.root`` (any that exist; a missing one is shown as not created yet). Output: a table on
stdout - stage, table, rows, Delta version and a telling figure per table (distinct users,
quarantined records that cost the event, the live model, distinct payloads, ...); ``--json``
prints the same as JSON. No Spark session and no JVM: it reads through ``deltalake``'s
DataFusion engine (``carousel.portable``), which applies deletion vectors.

    ./spark-submit.sh summary
    ./spark-submit.sh summary --json --set storage.root=s3a://lake/carousel
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import DeltaError, TableNotFoundError

from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.portable import open_table
from carousel.schemas import (
    CAMPAIGN_RUNS_TABLE,
    CATALOG_TABLE,
    ERASED_USERS_TABLE,
    EVENTS_TABLE,
    GATE_PUBLISHED_DECISIONS,
    INGEST_LOG_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    MODEL_PUBLISH_LOG_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
    TRENDING_TABLE,
)

log = logging.getLogger(__name__)

_PUBLISHED = ", ".join(f"'{decision}'" for decision in GATE_PUBLISHED_DECISIONS)
# (stage, table, SQL aggregate over the table "t" giving the telling figure, what it counts).
STAGES: tuple[tuple[str, str, str, str], ...] = (
    ("ingest", INGEST_LOG_TABLE, "COALESCE(SUM(records_read), 0)", "records read"),
    ("ingest", EVENTS_TABLE, "COUNT(DISTINCT user_id)", "users"),
    (
        "ingest",
        QUARANTINE_TABLE,
        "COALESCE(SUM(CASE WHEN event_stored THEN 0 ELSE 1 END), 0)",
        "records rejected",
    ),
    ("ingest", PROFILES_TABLE, "COUNT(DISTINCT user_id)", "users"),
    # ingest.profile_writes: append - what the next fold puts into user_profiles.
    ("ingest", PROFILE_UPDATES_TABLE, "COUNT(DISTINCT user_id)", "users with updates to fold"),
    ("catalog", CATALOG_TABLE, "COALESCE(SUM(CASE WHEN active THEN 1 ELSE 0 END), 0)", "active products"),
    ("training", ITEM_RECOMMENDATIONS_TABLE, "COUNT(DISTINCT item_id)", "items with a list"),
    (
        "training",
        MODEL_PUBLISH_LOG_TABLE,
        f"COALESCE(SUM(CASE WHEN decision IN ({_PUBLISHED}) THEN 1 ELSE 0 END), 0)",
        "published",
    ),
    ("serving", TRENDING_TABLE, "COUNT(DISTINCT segment)", "segments"),
    ("serving, campaigns", SENT_RECOMMENDATIONS_TABLE, "COUNT(DISTINCT payload_id)", "payloads"),
    ("campaigns", CAMPAIGN_RUNS_TABLE, "COALESCE(SUM(payloads), 0)", "payloads"),
    ("erasure", ERASED_USERS_TABLE, "COUNT(DISTINCT user_hash)", "users erased"),
)


@dataclass(frozen=True)
class TableSummary:
    stage: str
    table: str
    exists: bool
    rows: int | None = None
    version: int | None = None
    figure: int | None = None
    figure_counts: str = ""


def summarise(
    location: str,
    stage: str,
    table: str,
    figure_sql: str,
    counts: str,
    storage_options: dict[str, str] | None = None,
) -> TableSummary:
    """One table's rows, version and figure; ``exists`` False when there is no Delta table there.
    ``storage_options``: delta-rs's object store settings (``storage.s3``)."""
    try:
        delta = open_table(location, storage_options=storage_options)
    except TableNotFoundError:
        return TableSummary(stage, table, exists=False, figure_counts=counts)
    try:
        row = _first_row(delta, f"SELECT COUNT(*) AS n, {figure_sql} AS f FROM t")
    except DeltaError as err:
        # A table written before the figure's column existed (the writing job adds it on its
        # next run): its rows without the figure.
        log.warning("%s: no %s figure (%s)", table, counts, str(err).splitlines()[0])
        row = {**_first_row(delta, "SELECT COUNT(*) AS n FROM t"), "f": None}
    figure = None if row["f"] is None else int(row["f"])
    return TableSummary(stage, table, True, int(row["n"]), delta.version(), figure, counts)


def _first_row(delta: DeltaTable, sql: str) -> dict[str, Any]:
    return pa.table(QueryBuilder().register("t", delta).execute(sql).read_all()).to_pylist()[0]


def run(cfg: CarouselConfig) -> list[TableSummary]:
    """A summary of each table of :data:`STAGES` under ``cfg.storage.root``, in pipeline order."""
    options = cfg.storage.s3.delta_rs_options()
    summaries = [
        summarise(cfg.storage.table(table), stage, table, figure_sql, counts, options)
        for stage, table, figure_sql, counts in STAGES
    ]
    # profile_updates is made only with ingest.profile_writes: append; with merge it is not missing.
    return [
        s
        for s in summaries
        if s.exists or s.table != PROFILE_UPDATES_TABLE or cfg.ingest.profile_writes == "append"
    ]


def render(summaries: list[TableSummary]) -> str:
    """The summaries as an aligned text table."""
    header = ("stage", "table", "rows", "version", "")
    lines: list[tuple[str, ...]] = [header]
    for s in summaries:
        if not s.exists:
            lines.append((s.stage, s.table, "-", "-", "not created yet"))
            continue
        figure = "" if s.figure is None else f"{s.figure:,} {s.figure_counts}"
        lines.append((s.stage, s.table, f"{s.rows:,}", str(s.version), figure))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for n, line in enumerate(lines):
        cells = [
            line[0].ljust(widths[0]),
            line[1].ljust(widths[1]),
            line[2].rjust(widths[2]),
            line[3].rjust(widths[3]),
        ]
        out.append("  ".join([*cells, line[4]]).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="summary", description=__doc__.splitlines()[0]))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "summary")
    summaries = run(cfg)
    if args.json:
        payload: list[dict[str, Any]] = [asdict(s) for s in summaries]
        print(json.dumps(payload, indent=2))
    else:
        print(f"tables under {cfg.storage.root}")
        print(render(summaries))
    log.info("summary: %d of %d tables exist", sum(s.exists for s in summaries), len(summaries))
    return 0
