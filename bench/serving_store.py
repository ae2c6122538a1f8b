"""The serving benchmark's online store: its own Redis, the rebuild from Delta, memory, round trips.

Role: the store-side figures of ``bench/serving_bench.py`` (not a benchmark itself). Inputs: the
run's config (``online_store`` pointed at a private server under the run's work folder) and a
session on the shop. Outputs (dicts for the results JSON):

* :func:`store_overrides`: config overrides for a private ``redis-server`` on a free port whose
  state folder is under the run's work folder (:mod:`carousel.online_store_server` starts and
  stops it);
* :func:`rebuild`: ``jobs.rebuild_online_store.run(spark, cfg)`` timed end to end (the Delta
  profiles, the events topic after ingest's offsets - here none - and recent sends - here none),
  then the server's ``INFO memory`` / ``DBSIZE``: the memory the users' online state takes; then
  the append-only file rewritten (:func:`compact_aof`), so no rewrite lands in a measured phase;
* :func:`round_trips`: the per-batch store cost serve pays, at the batch sizes it sees, read and
  written the way it does (one pipelined round trip each way, a cached client) against the
  alternatives (a round trip per user; a new connection per batch);
* :func:`hot_path_cost`: ``carousel.realtime.answer_records`` on synthetic batches in this
  process (no Spark): the Python cost per trigger and per item event, store included.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from carousel import broker, online_store_server
from carousel.config import CarouselConfig
from carousel.schemas import APP_LAUNCHED, PRODUCT_VIEWED

log = logging.getLogger("bench.serving.store")

ROUND_TRIP_BATCHES = (100, 1000)
ROUND_TRIP_REPEATS = 15
AOF_REWRITE_TIMEOUT_S = 600.0
AOF_POLL_S = 0.2


def store_overrides(state_dir: Path, max_memory: str) -> list[str]:
    """Overrides for a private Redis: its state folder, a free port, its url and a run-own prefix."""
    port = broker.free_port()
    return [
        f"online_store.state_dir={state_dir}",
        f"online_store.port={port}",
        f"online_store.url=redis://127.0.0.1:{port}/0",
        f"online_store.max_memory={max_memory}",
        "online_store.key_prefix=bench",
    ]


def _client(cfg: CarouselConfig) -> Any:
    import redis

    return redis.Redis.from_url(cfg.online_store.url, socket_timeout=60, **cfg.online_store.credentials())


def server_figures(cfg: CarouselConfig) -> dict[str, Any]:
    """``INFO memory`` (bytes and human), key count and connection / command counters of the store."""
    client = _client(cfg)
    try:
        memory = client.info("memory")
        stats = client.info("stats")
        keys = int(client.dbsize())
    finally:
        client.close()
    return {
        "used_memory": int(memory["used_memory"]),
        "used_memory_human": memory["used_memory_human"],
        "used_memory_dataset": int(memory.get("used_memory_dataset", 0)),
        "used_memory_rss": int(memory["used_memory_rss"]),
        "mem_fragmentation_ratio": memory.get("mem_fragmentation_ratio"),
        "keys": keys,
        "total_connections_received": int(stats["total_connections_received"]),
        "total_commands_processed": int(stats["total_commands_processed"]),
    }


def rebuild(spark: Any, cfg: CarouselConfig, users: int) -> dict[str, Any]:
    """Time ``rebuild-online-store`` into the (empty) store; then its memory per user."""
    from jobs import rebuild_online_store

    before = server_figures(cfg)
    started = time.perf_counter()
    counts = rebuild_online_store.run(spark, cfg)
    seconds = time.perf_counter() - started
    after = server_figures(cfg)
    status = online_store_server.status(cfg.online_store)
    added = after["used_memory"] - before["used_memory"]
    aof_rewrite_s = compact_aof(cfg)
    result = {
        "seconds": round(seconds, 1),
        "aof_rewrite_s": aof_rewrite_s,
        "users_per_s": round(counts["profiles"] / seconds, 0) if seconds else None,
        "counts": counts,
        "memory_before": before,
        "memory_after": after,
        "status_used_memory_human": status.get("used_memory_human"),
        "memory_added_bytes": added,
        "bytes_per_user": round(added / max(1, counts["profiles"]), 1),
        "memory_for_1m_users_gib": round(added / max(1, counts["profiles"]) * 1_000_000 / 2**30, 3),
        "shop_users": users,
    }
    log.info(
        "online store rebuilt in %.1f s: %s users, used_memory %s (%.0f bytes per user)",
        seconds,
        counts["profiles"],
        after["used_memory_human"],
        result["bytes_per_user"],
    )
    return result


def compact_aof(cfg: CarouselConfig, timeout_s: float = AOF_REWRITE_TIMEOUT_S) -> float:
    """Rewrite the store's append-only file now and wait for it; the seconds it took.

    Why: the bulk load grows the AOF far past its last rewrite, so Redis rewrites it on its own
    (``auto-aof-rewrite-percentage`` 100) at some later write: a fork of the whole dataset and
    a child that writes it, about a core for 10 s per GB. On this 2-core machine that landed in
    a measured phase (p95 60 ms instead of 14 ms at 1,000 API requests/s). After this rewrite the
    AOF's base is the full dataset and a benchmark's writes stay far below the next threshold.
    """
    client = _client(cfg)
    started = time.perf_counter()

    def wait_for_the_rewrite() -> None:
        while True:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"the online store's AOF rewrite took over {timeout_s:g} s")
            time.sleep(AOF_POLL_S)  # polling the server's own progress flag, with the deadline above

    try:
        client.bgrewriteaof()  # "scheduled" while an RDB save runs: waited for the same way
    except redis.ResponseError as err:
        # Redis started one by itself during the load (auto-aof-rewrite-percentage), from a
        # snapshot of part of it: wait for that one, then rewrite from the whole dataset.
        if "already in progress" not in str(err):
            raise
        wait_for_the_rewrite()
        client.bgrewriteaof()
    wait_for_the_rewrite()
    seconds = round(time.perf_counter() - started, 1)
    log.info("online store: append-only file rewritten in %.1f s", seconds)
    return seconds


def _median_ms(action: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def _rewrite(store: Any, chunks: list[list[str]]) -> None:
    """Read each chunk and write it back (the same profiles, one version up), chunk by chunk."""
    for chunk in chunks:
        fresh, _ = store.read(chunk)
        for state in fresh.values():
            state.changed = True
        store.write(fresh.values())


def _round_trips_at(cfg: CarouselConfig, cached: Any, batch: list[str]) -> dict[str, Any]:
    from carousel.online_state import OnlineState

    store_cfg = cfg.online_store

    def new_client_read() -> None:
        client = _client(cfg)
        try:
            OnlineState(client, store_cfg.key_prefix, cached.profile_ttl_ms, 3_600_000).read(batch)
        finally:
            client.close()

    singles = [[user] for user in batch]
    states, _ = cached.read(batch)
    return {
        "users": len(batch),
        "read_pipelined_ms": _median_ms(lambda: cached.read(batch), ROUND_TRIP_REPEATS),
        "read_per_user_ms": _median_ms(lambda: [cached.read(u) for u in singles], ROUND_TRIP_REPEATS),
        "read_write_pipelined_ms": _median_ms(lambda: _rewrite(cached, [batch]), ROUND_TRIP_REPEATS),
        "read_write_per_user_ms": _median_ms(lambda: _rewrite(cached, singles), ROUND_TRIP_REPEATS),
        "read_new_connection_ms": _median_ms(new_client_read, ROUND_TRIP_REPEATS),
        "profile_json_bytes_mean": round(
            statistics.mean(len(s.profile.to_json()) for s in states.values()), 0
        ),
    }


def round_trips(cfg: CarouselConfig, users: int, seed: int) -> dict[str, Any]:
    """Median ms per batch of N users: read + write, pipelined vs per user, cached vs new client."""
    from carousel.online_state import OnlineState
    from carousel.online_store import connect

    store_cfg = cfg.online_store
    ttl_ms = round(store_cfg.profile_ttl_days * 86400 * 1000)
    cached = OnlineState(connect(store_cfg), store_cfg.key_prefix, ttl_ms, 3_600_000)
    rng = random.Random(seed)
    result: dict[str, Any] = {"repeats": ROUND_TRIP_REPEATS, "batches": []}
    for size in ROUND_TRIP_BATCHES:
        entry = _round_trips_at(cfg, cached, [f"u-{rng.randrange(users):07d}" for _ in range(size)])
        result["batches"].append(entry)
        log.info("store round trips at %d users: %s", size, entry)
    return result


def hot_path_cost(cfg: CarouselConfig, users: int, items: int, seed: int) -> dict[str, Any]:
    """``answer_records`` on synthetic batches (4 item events per trigger) in this process."""
    from carousel.lookups import current_lookups
    from carousel.online_state import OnlineState
    from carousel.online_store import connect
    from carousel.payloads import check_templates
    from carousel.realtime import ServeSpec, answer_records

    spec = ServeSpec.of(cfg, check_templates(cfg))
    started = time.perf_counter()
    lookups = current_lookups(spec.sources)
    lookups_s = time.perf_counter() - started
    store = OnlineState(connect(spec.store), spec.store.key_prefix, spec.profile_ttl_ms, spec.answered_ttl_ms)
    rng = random.Random(seed)
    result: dict[str, Any] = {"lookups_load_s": round(lookups_s, 2), "batches": []}
    # The first call builds the arm's item lists (once per lookups version): not counted.
    answer_records(_batch(rng, "hpw", 5, users, items), store, lookups, spec, time.time_ns() // 1000)
    for triggers in (100, 1000):
        records = _batch(rng, f"hp{triggers}", triggers, users, items)
        started = time.perf_counter()
        out = answer_records(records, store, lookups, spec, time.time_ns() // 1000)
        seconds = time.perf_counter() - started
        entry = {
            "triggers": triggers,
            "records": len(records),
            "seconds": round(seconds, 3),
            "ms_per_trigger_with_its_4_events": round(seconds * 1000 / triggers, 3),
            "triggers_per_s_one_core": round(triggers / seconds, 0),
            "counts": dict(out.counts),
        }
        result["batches"].append(entry)
        log.info("hot path in process: %s", entry)
    return result


def _batch(rng: random.Random, tag: str, triggers: int, users: int, items: int) -> list[dict[str, Any]]:
    """``triggers`` App Launched, each after 4 Product Viewed of the same random user, in offset order."""
    records: list[dict[str, Any]] = []
    for n in range(triggers):
        user = f"u-{rng.randrange(users):07d}"
        now_us = time.time_ns() // 1000
        for k in range(4):
            item = min(int(items * rng.random() ** 3), items - 1)
            records.append(_record(len(records), f"{tag}-{n}.{k}", user, PRODUCT_VIEWED, item, now_us))
        records.append(_record(len(records), f"{tag}-{n}", user, APP_LAUNCHED, None, now_us))
    return records


def _record(
    offset: int, event_id: str, user: str, kind: str, item: int | None, micros: int
) -> dict[str, Any]:
    return {
        "partition": 0,
        "offset": offset,
        "invalid_reason": None,
        "event_id": event_id,
        "user_id": user,
        "event_type": kind,
        "item_id": None if item is None else f"i-{item:06d}",
        "event_time": micros,
        "platform": "ios",
        "user_attributes": None,
    }
