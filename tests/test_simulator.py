"""Tests of the event simulator: the pure core (world, contract, labelled stream) and, marked
``integration``, its edges against the real Kafka broker of the ``kafka_bootstrap`` fixture."""

from __future__ import annotations

import csv
import json
import random
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from support import ISO_WITH_OFFSET

from carousel import broker
from carousel.config import SimulatorConfig
from carousel.schemas import (
    APP_LAUNCHED,
    DEVICE_SCHEMA,
    EVENT_FIELDS,
    EVENT_TYPES,
    ITEM_EVENT_TYPES,
    PLATFORMS,
    PRODUCT_VIEWED,
    REQUIRED_EVENT_FIELDS,
    SOURCES,
    USER_ATTRIBUTES_SCHEMA,
)
from jobs import simulate_events as sim

END = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CFG = SimulatorConfig(
    users=300,
    items=150,
    categories=6,
    cluster_size=5,
    events=4000,
    days=3,
    rate=0,
    seed=11,
    bad_share=0.05,
    duplicate_share=0.03,
)


@pytest.fixture(scope="module")
def world() -> sim.World:
    return sim.build_world(CFG)


@pytest.fixture(scope="module")
def events(world) -> list[dict]:
    return list(sim.generate_events(world, CFG, 6000, END, seed=5))


@pytest.fixture(scope="module")
def records(world) -> list[sim.Record]:
    return list(sim.stream_records(world, CFG, 6000, END, seed=5))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _sessions(events: list[dict]) -> list[list[dict]]:
    """The valid stream is session after session, each opened by an App Launched."""
    sessions: list[list[dict]] = []
    for event in events:
        if event["event_type"] == APP_LAUNCHED or not sessions:
            sessions.append([])
        sessions[-1].append(event)
    return sessions


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------
def test_world_catalog_and_planted_clusters(world):
    assert len(world.items) == CFG.items
    assert [item.item_id for item in world.items] == sorted(f"i-{n:06d}" for n in range(1, CFG.items + 1))
    assert all(re.fullmatch(r"c-\d{2}", item.category) for item in world.items)
    assert len({item.category for item in world.items}) == CFG.categories
    assert all(item.price > 0 and 1.0 <= item.rating <= 5.0 and item.title for item in world.items)
    assert sorted(i for members in world.clusters for i in members) == list(range(CFG.items))
    for members in world.clusters:
        assert len(members) == CFG.cluster_size
        assert len({world.items[i].category for i in members}) == 1, "a planted cluster spans one category"
    planted = world.planted_neighbours()
    assert set(planted) == {item.item_id for item in world.items}
    for item_id, neighbours in planted.items():
        assert len(neighbours) == CFG.cluster_size - 1 and item_id not in neighbours
        assert all(item_id in planted[other] for other in neighbours)
        assert all(world.cluster_of(other) == world.cluster_of(item_id) for other in neighbours)
    # Zipf-like popularity: a popular head and a long tail.
    weights = sorted((item.popularity for item in world.items), reverse=True)
    assert sum(weights[: CFG.items // 10]) > 0.4 * sum(weights)


def test_world_users(world):
    assert [u.user_id for u in world.users] == [f"u-{n:06d}" for n in range(1, CFG.users + 1)]
    device_ids = [d.device_id for u in world.users for d in u.devices]
    assert len(device_ids) == len(set(device_ids))
    assert all(1 <= len(u.devices) <= 2 for u in world.users)
    platforms = Counter(d.platform for u in world.users for d in u.devices)
    assert set(platforms) <= set(PLATFORMS)
    assert platforms["pos"] + platforms["server"] < 0.1 * sum(platforms.values())
    for user in world.users:
        assert set(user.attributes) == set(USER_ATTRIBUTES_SCHEMA.fieldNames())
        assert 1 <= len(user.preferred_clusters) == len(set(user.preferred_clusters)) <= 4


def test_odd_cluster_sizes_have_no_singletons():
    cfg = CFG.model_copy(update={"items": 23, "cluster_size": 5})
    world = sim.build_world(cfg)
    sizes = sorted(len(m) for m in world.clusters)
    assert sum(sizes) == 23 and min(sizes) >= 2


# ---------------------------------------------------------------------------------------------
# Valid events: count, determinism, contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 1234])
def test_exact_event_count(world, n):
    assert sum(1 for _ in sim.generate_events(world, CFG, n, END, seed=1)) == n
    assert sum(1 for _ in sim.stream_records(world, CFG, n, END, seed=1)) == n


def test_deterministic_for_a_seed(world, records):
    again = list(sim.stream_records(sim.build_world(CFG), CFG, 6000, END, seed=5))
    assert again == records
    other = list(sim.stream_records(world, CFG, 6000, END, seed=6))
    assert other != records
    assert sim.build_world(CFG) == world
    other_world = sim.build_world(CFG.model_copy(update={"seed": 12}))
    assert other_world.planted_neighbours() != world.planted_neighbours()


def test_events_follow_the_contract(world, events):
    catalog = {item.item_id for item in world.items}
    users = {user.user_id for user in world.users}
    assert len({e["event_id"] for e in events}) == len(events)
    assert events[0]["event_id"] == "e-5-000000000"
    for event in events:
        assert set(event) <= set(EVENT_FIELDS)
        for name in REQUIRED_EVENT_FIELDS:
            assert isinstance(event[name], str) and event[name].strip(), (name, event)
        assert event["event_type"] in EVENT_TYPES
        assert event["source"] in SOURCES
        assert event["user_id"] in users
        # The contract's form, and the simulator's own: a "T" and milliseconds.
        assert ISO_WITH_OFFSET.match(event["event_time"]), event["event_time"]
        assert re.fullmatch(r"[0-9-]{10}T[0-9:]{8}\.[0-9]{3}(Z|[+-][0-9:]{5})", event["event_time"])
        assert _time(event["event_time"]).tzinfo is not None
        if event["event_type"] in ITEM_EVENT_TYPES:
            assert event["item_id"] in catalog
        assert set(event["device"]) == set(DEVICE_SCHEMA.fieldNames())
        assert event["device"]["platform"] in PLATFORMS
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in event["properties"].items())
        if "user_attributes" in event:
            assert set(event["user_attributes"]) == set(USER_ATTRIBUTES_SCHEMA.fieldNames())
            assert isinstance(event["user_attributes"]["age"], int)
        if event["event_type"] == APP_LAUNCHED:
            assert "user_attributes" in event
    # The JSON text is the compact encoding of the dict.
    assert json.loads(sim.encode_event(events[3])) == events[3]
    assert b'", "' not in sim.encode_event(events[3]) and b'": ' not in sim.encode_event(events[3])


def test_event_mix_is_realistic(events):
    types = Counter(e["event_type"] for e in events)
    assert set(types) == set(EVENT_TYPES)
    assert types[PRODUCT_VIEWED] > 0.5 * len(events)
    sources = Counter(e["source"] for e in events)
    assert sources["mobile"] + sources["web"] > 0.8 * len(events)
    assert set(sources) == set(SOURCES)
    offsets = {e["event_time"][23:] for e in events}
    assert "Z" in offsets and len(offsets) > 2  # UTC and local times with an offset


def test_times_in_window_and_ordered_within_sessions(events):
    start = END - timedelta(days=CFG.days)
    times = [_time(e["event_time"]) for e in events]
    assert all(start <= t <= END for t in times)
    assert max(times) - min(times) > timedelta(days=CFG.days * 0.9)  # spread over the window
    sessions = _sessions(events)
    assert len(sessions) > 100
    for session in sessions[:-1]:
        assert len({e["user_id"] for e in session}) == 1
        session_times = [_time(e["event_time"]) for e in session]
        assert all(a < b for a, b in zip(session_times, session_times[1:], strict=False))
        assert session_times[-1] - session_times[0] < timedelta(hours=4)


def test_short_window_keeps_sessions_inside_and_ordered(world):
    cfg = CFG.model_copy(update={"days": 0.01})  # 14.4 minutes
    events = list(sim.generate_events(world, cfg, 2000, END, seed=2))
    start = END - timedelta(days=cfg.days)
    for session in _sessions(events):
        times = [_time(e["event_time"]) for e in session]
        assert all(start <= t <= END for t in times)
        assert all(a < b for a, b in zip(times, times[1:], strict=False))


def test_purchases_follow_views(events):
    for session in _sessions(events):
        viewed: set[str] = set()
        for event in session:
            if event["event_type"] == PRODUCT_VIEWED:
                viewed.add(event["item_id"])
            elif event["event_type"] in ITEM_EVENT_TYPES:
                assert event["item_id"] in viewed


def test_planted_structure_is_visible_in_consecutive_views(world, events):
    views = Counter()
    same = pairs = 0
    for session in _sessions(events):
        items = [e["item_id"] for e in session if e["event_type"] == PRODUCT_VIEWED]
        views.update(world.cluster_of(i) for i in items)
        for a, b in zip(items, items[1:], strict=False):
            pairs += 1
            same += world.cluster_of(a) == world.cluster_of(b)
    total = sum(views.values())
    chance = sum((n / total) ** 2 for n in views.values())
    assert pairs > 1000
    assert same / pairs > 0.5
    assert same / pairs > 5 * chance


# ---------------------------------------------------------------------------------------------
# The labelled stream: shares, duplicates, bad records
# ---------------------------------------------------------------------------------------------
def test_label_shares(records):
    labels = Counter(r.label for r in records)
    expected = sim.label_counts(6000, CFG.bad_share, CFG.duplicate_share)
    assert labels[sim.VALID] == expected["valid"] == 6000 - 300 - 180
    assert labels[sim.DUPLICATE] == expected["duplicate"] == 180
    assert sum(n for label, n in labels.items() if label.startswith("bad:")) == expected["bad"] == 300
    assert set(labels) <= set(sim.LABELS)
    assert {label for label in labels if label.startswith("bad:")} == set(sim.BAD_LABELS)
    # Mixed in, not bunched: every tenth of the stream holds some bad records and duplicates.
    for k in range(10):
        chunk = Counter(r.label for r in records[k * 600 : (k + 1) * 600])
        assert chunk[sim.DUPLICATE] > 0 and sum(n for lb, n in chunk.items() if lb.startswith("bad:")) > 0


def test_valid_records_are_the_generated_events(events, records):
    valid = [r for r in records if r.label == sim.VALID]
    for record, event in zip(valid, events, strict=False):
        assert record.value == sim.encode_event(event)
        assert record.key == event["user_id"].encode()


def test_duplicates_resend_an_earlier_valid_record(records):
    seen: set[bytes] = set()
    for record in records:
        if record.label == sim.VALID:
            assert record.value not in seen
            seen.add(record.value)
        elif record.label == sim.DUPLICATE:
            assert record.value in seen
            assert record.key == json.loads(record.value)["user_id"].encode()


def test_label_counts_edge_cases():
    assert sim.label_counts(0, 0.5, 0.5) == {"valid": 0, "duplicate": 0, "bad": 0}
    assert sim.label_counts(10, 1.0, 0.5) == {"valid": 0, "duplicate": 0, "bad": 10}
    assert sim.label_counts(2, 0.0, 1.0) == {"valid": 1, "duplicate": 1, "bad": 0}
    assert sim.label_counts(1, 0.0, 1.0) == {"valid": 1, "duplicate": 0, "bad": 0}


def _why_invalid(value: bytes) -> str | None:
    """A small validator of the contract, written independently of the simulator."""
    try:
        event = json.loads(value)
    except ValueError:
        return "malformed_json"
    if not isinstance(event, dict):
        return "json_array"
    for name in REQUIRED_EVENT_FIELDS:
        if event.get(name) in (None, ""):
            return f"missing_{name}"
    if any(
        event.get(name) is not None and not isinstance(event[name], str)
        for name in ("event_type", "event_time")
    ):
        return "mistyped_field"
    if event["event_type"] not in EVENT_TYPES:
        return "unknown_event_type"
    if not ISO_WITH_OFFSET.match(event["event_time"]):
        return "unparseable_time"
    try:
        moment = _time(event["event_time"])
    except ValueError:  # the form of a time, not a real one (month 13)
        return "unparseable_time"
    if moment.year < 2000 or moment > END + timedelta(days=365):
        return "absurd_time"
    if event["event_type"] in ITEM_EVENT_TYPES and not event.get("item_id"):
        return "missing_item_id"
    return None


def test_every_record_is_what_its_label_says(records):
    for record in records:
        reason = _why_invalid(record.value)
        if record.label in (sim.VALID, sim.DUPLICATE):
            assert reason is None, record
        else:
            assert record.label == f"bad:{reason}", (record, reason)
            assert record.key.startswith(b"u-")


@pytest.mark.parametrize("kind", sim.BAD_KINDS)
def test_corrupt_record_each_kind(events, kind):
    rng = random.Random(3)
    base = next(e for e in events if e["event_type"] == PRODUCT_VIEWED)
    before = json.dumps(base, sort_keys=True)
    for _ in range(20):  # every variant of the kind
        key, value = sim.corrupt_record(base, kind, rng)
        assert key == base["user_id"].encode()
        assert _why_invalid(value) == kind
    assert json.dumps(base, sort_keys=True) == before, "the valid event must not be changed"


def test_unknown_bad_kind_is_refused(events):
    with pytest.raises(ValueError, match="unknown bad record kind"):
        sim.corrupt_record(events[0], "nonsense", random.Random(1))


# ---------------------------------------------------------------------------------------------
# Edges against the real broker: produce, run, command line
# ---------------------------------------------------------------------------------------------
def _consume(cfg, topic: str, expected: int, timeout: float = 60) -> list[tuple[bytes, bytes]]:
    """Read ``topic`` from the start until ``expected`` records arrived, then check none is extra."""
    consumer = Consumer(
        {
            **cfg.kafka.client_settings(),
            "group.id": f"test-simulator-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        consumer.subscribe([topic])
        while len(received) < expected:
            assert time.monotonic() < deadline, f"{len(received)} of {expected} records within {timeout}s"
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                assert msg.error() is None, msg.error()
                received.append((msg.key(), msg.value()))
        metadata = consumer.list_topics(topic, timeout=10)
        on_topic = 0
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            on_topic += high - low
    finally:
        consumer.close()
    assert on_topic == len(received) == expected
    return received


def _by_key(pairs) -> dict[bytes, list[bytes]]:
    grouped: dict[bytes, list[bytes]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return grouped


def test_producer_settings_are_durable():
    s = sim.PRODUCER_SETTINGS
    assert s["acks"] == "all" and s["enable.idempotence"] is True and s["compression.type"] == "lz4"


@pytest.mark.integration
def test_produce_delivers_exactly_the_records(make_config, records):
    cfg = make_config()
    broker.ensure_topics(cfg.kafka)
    topic = cfg.kafka.topic("events").name
    sent = records[:2000]
    # A tiny local queue: produce() must wait for room (BufferError) and still lose nothing.
    counts = sim.produce(
        sent, cfg.kafka, topic, progress_every=500, settings={"queue.buffering.max.messages": 100}
    )
    assert counts == dict(sorted(Counter(r.label for r in sent).items()))
    received = _consume(cfg, topic, len(sent))
    assert Counter(received) == Counter((r.key, r.value) for r in sent)
    # One user's records land on one partition, in the order they were produced.
    assert _by_key(received) == _by_key((r.key, r.value) for r in sent)


@pytest.mark.integration
def test_produce_rate_limit(make_config, records):
    cfg = make_config()
    broker.ensure_topics(cfg.kafka)
    topic = cfg.kafka.topic("events").name
    started = time.monotonic()
    counts = sim.produce(records[:300], cfg.kafka, topic, rate=1500)
    elapsed = time.monotonic() - started
    assert sum(counts.values()) == 300
    assert 0.15 < elapsed < 10  # 300 records at 1500/s: 0.2 s at least, plus connecting and flushing
    assert len(_consume(cfg, topic, 300)) == 300


@pytest.mark.integration
def test_produce_raises_when_the_topic_does_not_exist(make_config, records):
    cfg = make_config()  # its topic is never created, and the broker does not auto-create topics
    topic = cfg.kafka.topic("events").name
    started = time.monotonic()
    with pytest.raises(sim.ProduceError, match="50 of 50 records were not delivered"):
        sim.produce(records[:50], cfg.kafka, topic, flush_timeout=20, settings={"message.timeout.ms": 2000})
    assert time.monotonic() - started < 20
    with pytest.raises(sim.ProduceError, match="50 of 50 records still undelivered after a 0.5 s flush"):
        sim.produce(records[:50], cfg.kafka, topic, flush_timeout=0.5)


def test_write_outputs(world, tmp_path):
    written = sim.write_outputs(world, tmp_path / "out")
    with open(written["catalog.csv"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == [
        "item_id",
        "category",
        "price",
        "rating",
        "title",
        "description",
        "image_url",
        "deep_link",
        "in_stock",
        "currency",
        "brand",
    ]
    assert [r[0] for r in rows[1:]] == [item.item_id for item in world.items]
    assert {r[8] for r in rows[1:]} <= {"true", "false"}
    assert json.loads((tmp_path / "out" / "planted.json").read_text()) == world.planted_neighbours()


@pytest.mark.integration
def test_run_produces_and_writes_outputs(make_config):
    cfg = make_config(
        "simulator.users=50", "simulator.items=40", "simulator.events=900", "simulator.bad_share=0.1"
    )
    broker.ensure_topics(cfg.kafka)
    summary = sim.run(cfg, end_time=END, seed=4)
    topic = cfg.kafka.topic("events").name
    assert summary["topic"] == topic
    received = _consume(cfg, topic, 900)
    assert summary["records"] == 900 == len(received)
    assert summary["totals"] == {"valid": 900 - 90 - 4, "duplicate": 4, "bad": 90}
    reasons = Counter(_why_invalid(value) for _, value in received)
    assert reasons[None] == summary["totals"]["valid"] + summary["totals"]["duplicate"]
    assert sum(n for reason, n in reasons.items() if reason) == summary["totals"]["bad"]
    ids = [json.loads(v)["event_id"] for _, v in received if _why_invalid(v) is None]
    assert all(i.startswith("e-4-") for i in ids)
    assert len(set(ids)) == summary["totals"]["valid"]
    out = Path(cfg.storage.path("simulator"))
    assert summary["outputs"] == {
        "catalog.csv": str(out / "catalog.csv"),
        "planted.json": str(out / "planted.json"),
    }
    world = sim.build_world(cfg.simulator)
    assert len((out / "catalog.csv").read_text().splitlines()) == 41
    assert json.loads((out / "planted.json").read_text()) == world.planted_neighbours()
    assert summary["world_seed"] == cfg.simulator.seed


@pytest.mark.integration
def test_main_produces_to_the_broker(make_config, tmp_path, capsys):
    cfg = make_config()
    broker.ensure_topics(cfg.kafka)
    topic = cfg.kafka.topic("events").name
    root = tmp_path / "cli"
    code = sim.main(
        [
            "--events",
            "600",
            "--users",
            "40",
            "--items",
            "30",
            "--seed",
            "8",
            "--bad-share",
            "0.05",
            "--duplicate-share",
            "0.01",
            "--end-time",
            "2026-11-29T00:00:00Z",
            "--set",
            f"kafka.bootstrap_servers={cfg.kafka.bootstrap_servers}",
            "--set",
            f"kafka.topics.events.name={topic}",
            "--set",
            f"storage.root={root}",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["topic"] == topic and summary["records"] == 600
    assert summary["totals"] == {"valid": 600 - 30 - 6, "duplicate": 6, "bad": 30}
    received = _consume(cfg, topic, 600)
    assert sum(_why_invalid(value) is not None for _, value in received) == 30
    assert (root / "simulator" / "catalog.csv").exists() and (root / "simulator" / "planted.json").exists()


def test_main_dry_run(tmp_path, capsys):
    out = tmp_path / "sim"
    code = sim.main(
        [
            "--events",
            "700",
            "--users",
            "40",
            "--items",
            "30",
            "--days",
            "2",
            "--seed",
            "9",
            "--bad-share",
            "0.1",
            "--duplicate-share",
            "0.02",
            "--end-time",
            "2026-11-29T00:00:00Z",
            "--out-dir",
            str(out),
            "--dry-run",
            "--set",
            "simulator.categories=3",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 700
    assert summary["totals"] == {"valid": 700 - 70 - 14, "duplicate": 14, "bad": 70}
    assert summary["seed"] == 9 and summary["end_time"] == "2026-11-29T00:00:00+00:00"
    catalog = (out / "catalog.csv").read_text().splitlines()
    assert len(catalog) == 31
    assert len({line.split(",")[1] for line in catalog[1:]}) == 3
