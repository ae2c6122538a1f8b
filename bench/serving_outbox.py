"""Outbox -> Delta ``sent_recommendations`` lag, read back from the table's own log.

Role: the outbox figure of ``bench/serving_bench.py`` (not a benchmark itself). A row becomes
visible in Delta when the commit file that adds its data file appears in ``_delta_log`` (written
atomically by the committing writer). So, per payload: **lag = the modification time of the
commit file that added its rows - its ``sent_at``** (the serving clock when serve answered the
trigger; same machine, same clock). Inputs: the local table folder and the trigger ids (with send
times) of the measured traffic. Only commits and data files on a local file system are read
(``json`` log files, not checkpoints: the bench's table is young and every commit file is still
there); pyarrow reads the data files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.serving_traffic import percentile

_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def committed_rows(table: str | Path, prefix: str) -> dict[str, tuple[float, float, str]]:
    """payload id -> (visible at, sent_at, trigger id) for the rows whose trigger id starts with ``prefix``.

    A payload whose rows came in several commits (a replay) counts at its first.
    """
    log_dir = Path(table, "_delta_log")
    found: dict[str, tuple[float, float, str]] = {}
    if not log_dir.is_dir():
        return found
    commits = sorted(log_dir.glob("*.json"), key=lambda p: int(p.stem))
    for commit in commits:
        visible = os.stat(commit).st_mtime
        for line in commit.read_text().splitlines():
            action = json.loads(line).get("add") if line.strip() else None
            if not action:
                continue
            # ParquetFile: the file alone (read_table would add the sent_date=... folder as a column).
            rows = pq.ParquetFile(Path(table, unquote(action["path"]))).read(
                columns=["payload_id", "trigger_event_id", "sent_at"]
            )
            rows = rows.filter(pc.starts_with(rows["trigger_event_id"], prefix))
            payloads = rows["payload_id"].to_pylist()
            triggers = rows["trigger_event_id"].to_pylist()
            per_second = _UNITS[rows.schema.field("sent_at").type.unit]
            sent = [v / per_second for v in rows["sent_at"].cast(pa.int64()).to_pylist()]
            for payload, sent_at, trigger in zip(payloads, sent, triggers, strict=True):
                if payload not in found:
                    found[payload] = (visible, sent_at, trigger)
    return found


def lag_figures(
    table: str | Path, prefix: str, trigger_sent: dict[str, float], payloads_expected: int
) -> dict[str, Any]:
    """Lag p50/p95/p99/max over the payloads of ``prefix`` (and trigger sent -> visible in Delta)."""
    rows = committed_rows(table, prefix)
    lags = sorted(visible - sent_at for visible, sent_at, _ in rows.values())
    # From the trigger's send (producer clock, same machine) to its outbox rows being visible.
    end_to_end = sorted(
        visible - trigger_sent[trigger] for visible, _, trigger in rows.values() if trigger in trigger_sent
    )
    return {
        "payloads_expected": payloads_expected,
        "payloads_recorded": len(rows),
        "lag_p50_s": percentile(lags, 0.50),
        "lag_p95_s": percentile(lags, 0.95),
        "lag_p99_s": percentile(lags, 0.99),
        "lag_max_s": round(lags[-1], 3) if lags else None,
        "trigger_to_delta_p50_s": percentile(end_to_end, 0.50),
        "trigger_to_delta_p99_s": percentile(end_to_end, 0.99),
        "commits": len({visible for visible, _, _ in rows.values()}),
    }
