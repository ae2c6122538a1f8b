"""forget-user: one user erased from every table, the online store and every training snapshot.

Three users: the one to erase (``user-7f3a``), one whose id contains it (``user-7f3a0``) and
another. Their data is made the way the pipeline makes it: two ingest micro-batches through
ingest's own handler (events, profile MERGEs that leave deletion vectors, quarantined records
that do and do not parse), sends, online state written by the serving store code, snapshots
exported by export-training-data to a local workspace and to S3 (the loopback S3 server), and a
copy staged for AWS Batch. Before the erasure every target mentions the id (so the searches
can fail); after it none does - not a row of any table, a Redis key or value, or a byte of a
snapshot file - and the other users' rows, keys and snapshot rows are what they were. A first
run with the online store unreachable fails that step only; the second run finishes it and
keeps the first run's audit rows. ``maintain``'s VACUUM then leaves no data file holding the id.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from s3_fixture import S3_TEST_REGION, s3_bucket, s3_endpoint  # noqa: F401  (fixtures used by name)
from support import event_json
from test_online_store_cluster import cluster_url  # noqa: F401  (fixture used by name)

from carousel import erasure, objectstore
from carousel.broker import free_port
from carousel.config import ERASURE_KEY_ENV, ERASURE_REQUESTED_BY_ENV, CarouselConfig, load_config
from carousel.erasure import (
    ErasedUsers,
    drop_erased,
    erased_ids,
    raw_user_id,
    user_hash_of,
    with_erased_flag,
)
from carousel.online_state import Answer, OnlineState, OutboxEntry, outbox_key, remove_users_outbox_entries
from carousel.online_store import connect, user_of_key
from carousel.schemas import (
    ERASED_USERS_SCHEMA,
    ERASED_USERS_TABLE,
    ERASURE_LOG_TABLE,
    EVENTS_TABLE,
    NO_USER_DATA_TABLES,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    RAW_RECORD_COLUMNS,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
    TABLES,
    USER_ID_COLUMNS,
)
from carousel.storage import BatchCommits, deletion_vector_count, quoted_location
from carousel.tables import ensure
from jobs import export_training_data as export
from jobs import forget_user, maintain
from jobs.aws_batch import stage_input
from streaming import ingest

ERASED = "user-7f3a"
TRAP = "user-7f3a0"  # contains the erased id: must stay
OTHER = "user-b"
USERS = (ERASED, TRAP, OTHER)
# Users seen in the first batch only: the second batch's profile MERGE leaves their rows in files
# whose other rows it replaces, so those files get deletion vectors.
EARLIER = ("user-c", "user-d")
_MENTION = re.compile(rf"(?<![\w-]){re.escape(ERASED)}(?![\w-])")


def mentions(text: str) -> bool:
    """Whether ``text`` holds the erased id as a whole token (not inside ``user-7f3a0``)."""
    return _MENTION.search(text) is not None


# ---------------------------------------------------------------------------------------------
# Building the data
# ---------------------------------------------------------------------------------------------
def _event(n: int, user: str, at: datetime, event_type: str, item: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_id": f"e-{n}",
        "user_id": user,
        "device_id": f"d-{n % 3}",
        "event_type": event_type,
        "event_time": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "source": "mobile",
        "device": {"platform": "ios", "os_version": "17", "app_version": "5.1", "model": "iPhone"},
        "user_attributes": {"age": 30, "city": "Porto", "country": "PT"},
    }
    if item is not None:
        fields["item_id"] = item
    return fields


def _raw_batches(now: datetime) -> list[list[tuple]]:
    """Two micro-batches of Kafka records (key, value, topic, partition, offset, timestamp)."""
    start = now - timedelta(hours=3)
    batches: list[list[tuple[str, bytes]]] = [[], []]
    n = 0
    for k, user in enumerate(USERS + EARLIER):
        for event_type, item in (
            ("Product Viewed", "i1"),
            ("Product Viewed", f"i{2 + k}"),
            ("Product Purchased", "i3"),
        ):
            n += 1
            batches[0].append(
                (user, event_json(**_event(n, user, start + timedelta(minutes=n), event_type, item)))
            )
        if user in EARLIER:
            continue
        for event_type, item in (("Product Viewed", "i4"), ("App Launched", None)):
            n += 1
            batches[1].append(
                (user, event_json(**_event(n, user, start + timedelta(minutes=n), event_type, item)))
            )
    # Quarantined: an unknown event type (parses), and a truncated record (does not parse).
    for user in (ERASED, TRAP):
        n += 1
        batches[0].append((user, event_json(**_event(n, user, start, "Teleported", None))))
    for user in USERS:
        batches[0].append(
            (user, f'{{"event_id": "e-x{user[-1]}", "user_id" : "{user}", "event_type": '.encode())
        )
    offset = 0
    out = []
    for records in batches:
        rows = []
        for key, value in records:
            rows.append((key.encode(), value, "events", 0, offset, start + timedelta(minutes=offset), 0))
            offset += 1
        out.append(rows)
    return out


def _ingest(spark: SparkSession, cfg: CarouselConfig, now: datetime) -> None:
    """Ingest's own micro-batch handler, on two batches read like the Kafka source's rows."""
    ingest.ensure_ingest_tables(spark, cfg)
    schema = (
        "key binary, value binary, topic string, partition int, offset long, timestamp timestamp, "
        "timestampType int"
    )
    commits = BatchCommits("test-ingest", None)
    for batch_id, rows in enumerate(_raw_batches(now)):
        raw = spark.createDataFrame(rows, schema)
        ingest.process_batch(ingest.ingest_stream(raw, cfg.ingest), batch_id, cfg=cfg, commits=commits)
        if batch_id == 0:
            # One file holding every user, whatever the session's partitioning of the first MERGE:
            # the second batch then updates some of its rows, which leaves a deletion vector.
            spark.sql(f"OPTIMIZE {quoted_location(cfg.storage.table(PROFILES_TABLE))}").collect()


def _pending_profile_updates(spark: SparkSession, cfg: CarouselConfig, now: datetime) -> None:
    """Profile updates not folded in yet (``ingest.profile_writes: append``): the stored events'
    per-user deltas, appended by ingest's own profile commit as a batch in that mode does."""
    ensure(spark, cfg, PROFILE_UPDATES_TABLE)
    ingest._commit_profiles(
        _read(spark, cfg, EVENTS_TABLE),
        now=now,
        cfg=cfg,
        batch_id=0,
        commits=BatchCommits("test-ingest-appending", None),
        folds=ingest.ProfileFolds(spark, cfg, first_seq=0),
    )


def _sends(spark: SparkSession, cfg: CarouselConfig, now: datetime) -> None:
    rows = [
        (
            f"p-{k}-{n}",
            user,
            "weekly-email",
            "email",
            "model",
            f"i{n}",
            n,
            0.5,
            "model",
            "m1",
            None,
            "run-1",
            now,
            now.date(),
        )
        for k, user in enumerate(USERS)
        for n in (1, 2)
    ]
    ensure(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    spark.createDataFrame(rows, SENT_RECOMMENDATIONS_SCHEMA).write.format("delta").mode("append").save(
        cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    )


def _online_state(cfg: CarouselConfig, now: datetime) -> None:
    store = OnlineState(connect(cfg.online_store), cfg.online_store.key_prefix, 3_600_000, 3_600_000)
    states, _ = store.read(list(USERS))
    micros = int(now.timestamp() * 1_000_000)
    for k, user in enumerate(USERS):
        states[user].profile.apply(
            {"event_id": f"e-{k}", "event_type": "Product Viewed", "item_id": "i1", "event_time": micros}, 5
        )
        states[user].record_send(f"p-{k}-1", "launch-push", ["i2"], micros)
    answers = {(user, f"t-{k}"): Answer(0, k, ()) for k, user in enumerate(USERS)}
    assert store.write(states.values(), answers) == []
    # A key of no user (the API's rate counter): an erasure leaves it alone.
    connect(cfg.online_store).set(f"{cfg.online_store.key_prefix}:api-rate:default:1", 1)
    # The API's outbox: an answer of each user not yet relayed to the broker.
    for k, user in enumerate(USERS):
        record = json.dumps({"payload_id": f"p-{k}-9", "user_id": user})
        store.client.xadd(store.outbox_key, OutboxEntry(user, f"p-{k}-9", record).fields())


def _snapshots(spark: SparkSession, cfg: CarouselConfig, bucket: str) -> list[str]:
    """A local snapshot, an S3 one (in erasure.snapshot_roots) and the local one staged for Batch."""
    local = export.run(spark, cfg)["output"]
    remote = export.run(spark, cfg, output=f"s3://{bucket}/snapshots/s3-snapshot")["output"]
    staged = stage_input(local, f"s3://{bucket}/staging/inputs/job-1", objectstore.s3_client(cfg))
    return [local, remote, staged]


# ---------------------------------------------------------------------------------------------
# Reading everything back
# ---------------------------------------------------------------------------------------------
def _tables(cfg: CarouselConfig) -> list[str]:
    return sorted(p.name for p in Path(cfg.storage.root, "tables").iterdir() if (p / "_delta_log").is_dir())


def _read(spark: SparkSession, cfg: CarouselConfig, name: str) -> DataFrame:
    return spark.read.format("delta").load(cfg.storage.table(name))


def _row_texts(spark: SparkSession, cfg: CarouselConfig, name: str) -> list[str]:
    frame = _read(spark, cfg, name)
    return [r[0] for r in frame.select(F.to_json(F.struct(*frame.columns))).collect()]


def _user_of_row(name: str) -> Any:
    if name in USER_ID_COLUMNS:
        return F.col(USER_ID_COLUMNS[name])
    return raw_user_id(F.col(RAW_RECORD_COLUMNS[name]))


def _kept_rows(spark: SparkSession, cfg: CarouselConfig, name: str) -> DataFrame:
    """The other users' rows, materialised (the table's old files are vacuumed later)."""
    frame = _read(spark, cfg, name).where(~_user_of_row(name).eqNullSafe(ERASED))
    return spark.createDataFrame(frame.collect(), frame.schema)


def _store(cfg: CarouselConfig) -> dict[bytes, Any]:
    """Every key of the test's prefix and its value (hash fields or string)."""
    client = connect(cfg.online_store)
    values: dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{cfg.online_store.key_prefix}:*"):
        kind = client.type(key)
        if kind == b"stream":  # the API's outbox: its entries' fields
            values[key] = [fields for _, fields in client.xrange(key)]
        else:
            values[key] = client.hgetall(key) if kind == b"hash" else client.get(key)
    return values


def _files(uri: str, cfg: CarouselConfig) -> dict[str, bytes]:
    """Every file under a local folder or S3 prefix: relative name -> bytes."""
    client = objectstore.s3_client(cfg) if objectstore.is_s3(uri) else None
    return {
        name: forget_user._read_bytes(objectstore.join(uri, name), client)
        for name in objectstore.list_files(uri, client=client)
    }


def _snapshot_rows(spark: SparkSession, cfg: CarouselConfig, uri: str, tmp: Path) -> DataFrame:
    folder = tmp / uuid.uuid4().hex
    for name, data in _files(objectstore.join(uri, export.DATA_DIR), cfg).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    frame = export.read_interactions_csv(spark, str(folder))
    return spark.createDataFrame(frame.collect(), frame.schema)


def _check_manifest(cfg: CarouselConfig, uri: str) -> dict[str, Any]:
    """The manifest agrees with the files: names, sizes, sha256 sums, checksum, row count."""
    files = _files(uri, cfg)
    manifest = json.loads(files[export.MANIFEST_NAME])
    data = {
        name.split("/", 1)[1]: body for name, body in files.items() if name.startswith(f"{export.DATA_DIR}/")
    }
    listed = manifest["data"]["files"]
    assert [f["name"] for f in listed] == sorted(data)
    for entry in listed:
        body = data[entry["name"]]
        assert (entry["bytes"], entry["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert (
        manifest["checksum"]["value"] == hashlib.sha256(b"".join(data[n] for n in sorted(data))).hexdigest()
    )
    rows = sum(body.decode().count("\n") - 1 for body in data.values())
    assert manifest["rows"] == rows
    return manifest


@pytest.fixture
def cfg(
    tmp_path: Path,
    online_store_url: str,
    s3_endpoint: str,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> CarouselConfig:
    monkeypatch.delenv(ERASURE_KEY_ENV, raising=False)
    monkeypatch.setenv(ERASURE_REQUESTED_BY_ENV, "privacy-desk")
    return load_config(
        overrides=[
            f"storage.root={tmp_path}/data",
            f"online_store.url={online_store_url}",
            f"online_store.key_prefix=t{uuid.uuid4().hex[:8]}",
            f"training.workspace={tmp_path}/training",
            f"training.aws_batch.endpoint_url={s3_endpoint}",
            f"training.aws_batch.region={S3_TEST_REGION}",
            f"training.aws_batch.staging=s3://{s3_bucket}/staging",
            f"erasure.snapshot_roots=[s3://{s3_bucket}/snapshots]",
            # VACUUM at once, so that the test sees the files that held the rows go.
            "maintenance.vacuum_retention_hours=0",
            "maintenance.allow_unsafe_vacuum_retention=true",
        ],
        environ={},
    )


# ---------------------------------------------------------------------------------------------
# The erasure, end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_forget_user_erases_one_user_everywhere_and_leaves_the_others(
    spark: SparkSession,
    cfg: CarouselConfig,
    tmp_path: Path,
    s3_bucket: str,  # noqa: F811
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    _ingest(spark, cfg, now)
    _pending_profile_updates(spark, cfg, now)
    _sends(spark, cfg, now)
    _online_state(cfg, now)
    snapshots = _snapshots(spark, cfg, s3_bucket)
    assert deletion_vector_count(spark, cfg.storage.table(PROFILES_TABLE)) > 0, "no masked profile versions"

    personal = [*USER_ID_COLUMNS, *RAW_RECORD_COLUMNS]
    erased_rows = {
        name: _read(spark, cfg, name).where(_user_of_row(name) == ERASED).count() for name in personal
    }
    assert erased_rows == {
        EVENTS_TABLE: 5,
        PROFILES_TABLE: 1,
        PROFILE_UPDATES_TABLE: 1,
        SENT_RECOMMENDATIONS_TABLE: 2,
        QUARANTINE_TABLE: 2,
    }
    kept = {name: _kept_rows(spark, cfg, name) for name in personal}
    for name in personal:  # the search finds the id where it is, so it can fail
        assert any(mentions(t) for t in _row_texts(spark, cfg, name)), name
    store_before = _store(cfg)
    erased_keys = {k for k in store_before if mentions(k.decode())}
    assert len(erased_keys) == 2
    snapshot_rows = {uri: _snapshot_rows(spark, cfg, uri, tmp_path) for uri in snapshots}
    for uri in snapshots:
        assert any(mentions(body.decode()) for body in _files(uri, cfg).values()), uri
    erased_in_snapshots = sum(
        rows.where(F.col("user_id") == ERASED).count() for rows in snapshot_rows.values()
    )
    assert erased_in_snapshots == 3 * 4  # three views and a purchase, in each of three copies

    # First run: the online store does not answer. That step fails; the others are done.
    unreachable = cfg.with_overrides(
        online_store={"url": f"redis://127.0.0.1:{free_port()}/0", "socket_timeout_seconds": 1}
    )
    first = forget_user.run(spark, unreachable, [ERASED])
    assert [step.target for step in first.failed] == ["online_store"]
    assert erased_keys <= set(_store(cfg))
    assert first.removed() == {
        ERASED_USERS_TABLE: 0,
        **erased_rows,
        forget_user.SNAPSHOTS: erased_in_snapshots,
    }
    # Second run, the same day: the same request, finished; the steps done before remove nothing.
    second = forget_user.run(spark, cfg, [ERASED])
    assert second.request_id == first.request_id and not second.failed
    assert second.removed() == {
        ERASED_USERS_TABLE: 0,
        **dict.fromkeys(erased_rows, 0),
        forget_user.ONLINE_STORE: 3,  # two keys and an outbox entry
        forget_user.SNAPSHOTS: 0,
    }

    # The audit: one row per target, the first run's counts, no id and no hash.
    audit = {r["target"]: r for r in _read(spark, cfg, ERASURE_LOG_TABLE).collect()}
    assert {t: r["rows_removed"] for t, r in audit.items()} == {
        ERASED_USERS_TABLE: 0,
        **erased_rows,
        forget_user.ONLINE_STORE: 3,
        forget_user.SNAPSHOTS: erased_in_snapshots,
    }
    assert {(r["request_id"], r["users"], r["requested_by"]) for r in audit.values()} == {
        (first.request_id, 1, "privacy-desk")
    }
    assert (
        audit[EVENTS_TABLE]["final_after"] is not None
        and audit[forget_user.ONLINE_STORE]["final_after"] is None
    )
    key = erasure.hash_key(spark, cfg)
    assert key is not None and (Path(erasure.key_file(cfg)).stat().st_mode & 0o777) == 0o600
    recorded = _read(spark, cfg, ERASED_USERS_TABLE).collect()
    assert [(r["user_hash"], r["key_id"]) for r in recorded] == [
        (user_hash_of(ERASED, key), erasure.key_id(key))
    ]

    # No table holds the id; the other users' rows are what they were.
    for name in _tables(cfg):
        assert not any(mentions(t) for t in _row_texts(spark, cfg, name)), name
    for name in personal:
        assertDataFrameEqual(_read(spark, cfg, name), kept[name])
    # No key or value of the store; the other users' keys are unchanged.
    store_after = _store(cfg)
    assert not any(mentions(k.decode()) or mentions(str(v)) for k, v in store_after.items())
    outbox = outbox_key(cfg.online_store.key_prefix).encode()
    assert any(mentions(str(fields)) for fields in store_before[outbox])
    expected = {k: v for k, v in store_before.items() if k not in erased_keys}
    expected[outbox] = [fields for fields in store_before[outbox] if fields[b"u"] != ERASED.encode()]
    assert store_after == expected
    # No byte of any snapshot; the other users' rows are what they were; manifests agree with files.
    for uri in snapshots:
        assert not any(mentions(body.decode()) for body in _files(uri, cfg).values()), uri
        assertDataFrameEqual(
            _snapshot_rows(spark, cfg, uri, tmp_path), snapshot_rows[uri].where(F.col("user_id") != ERASED)
        )
        manifest = _check_manifest(cfg, uri)
        assert manifest["distinct_users"] == 2 + len(EARLIER)
        assert [(e["request_id"], e["rows_removed"]) for e in manifest["erasures"]] == [(first.request_id, 4)]

    # VACUUM makes it final: no data file of any table holds the id any more.
    assert any(
        spark.read.option("recursiveFileLookup", "true")
        .option("pathGlobFilter", "*.parquet")
        .parquet(cfg.storage.table(name))
        .where(_user_of_row(name) == ERASED)
        .count()
        for name in (EVENTS_TABLE, PROFILES_TABLE)
    ), "the old files still hold the rows before VACUUM"
    vacuumed = [EVENTS_TABLE, PROFILES_TABLE]  # a rewritten file, and masked profile versions
    assert not [r.table for r in maintain.run(spark, cfg, tables=vacuumed) if r.error]
    for name in vacuumed:
        files = (
            spark.read.option("recursiveFileLookup", "true")
            .option("pathGlobFilter", "*.parquet")
            .parquet(cfg.storage.table(name))
        )
        assert files.where(_user_of_row(name) == ERASED).count() == 0, name
        assert files.count() == kept[name].count(), name


def test_every_declared_table_is_classified_for_erasure() -> None:
    classified = [set(USER_ID_COLUMNS), set(RAW_RECORD_COLUMNS), set(NO_USER_DATA_TABLES)]
    assert set().union(*classified) == set(TABLES), "declare where a new table keeps user ids"
    assert sum(len(c) for c in classified) == len(TABLES), "a table is classified twice"
    for name, column in USER_ID_COLUMNS.items():
        assert column in TABLES[name].schema.fieldNames(), name


# ---------------------------------------------------------------------------------------------
# What ingest and serve call
# ---------------------------------------------------------------------------------------------
def _record(spark: SparkSession, cfg: CarouselConfig, users: dict[str, datetime]) -> None:
    key = erasure.hash_key(spark, cfg, create=True)
    assert key is not None
    rows = [(user_hash_of(u, key), erasure.key_id(key), "r-1", at) for u, at in users.items()]
    ensure(spark, cfg, ERASED_USERS_TABLE)
    spark.createDataFrame(rows, ERASED_USERS_SCHEMA).write.format("delta").mode("append").save(
        cfg.storage.table(ERASED_USERS_TABLE)
    )


def test_drop_erased_removes_only_erased_users_and_sees_later_erasures(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ERASURE_KEY_ENV, raising=False)
    cfg = load_config(overrides=[f"storage.root={tmp_path}/data"], environ={})
    at = datetime(2026, 11, 30, 12, tzinfo=UTC)
    events = spark.createDataFrame(
        [
            ("e1", "u1", at),
            ("e2", "u10", at),
            ("e3", "u2", at),
            ("e4", None, at),
            ("e5", "u1", at + timedelta(days=1)),
        ],
        "event_id string, user_id string, event_time timestamp",
    )
    assert erased_ids(spark, cfg) == ErasedUsers(None, None)  # nobody erased yet: nothing to join
    assert drop_erased(events, erased_ids(spark, cfg)) is events

    _record(spark, cfg, {"u1": at})
    erased = erased_ids(spark, cfg)
    kept = drop_erased(events, erased)
    assert sorted(r["event_id"] for r in kept.collect()) == ["e2", "e3", "e4"]  # u10 and no-id rows stay
    assert kept.columns == events.columns
    flagged = with_erased_flag(events, erased)
    assert flagged.columns == [*events.columns, "erased"]
    assert sorted((r["event_id"], r["erased"]) for r in flagged.collect()) == [
        ("e1", True),
        ("e2", False),
        ("e3", False),
        ("e4", False),
        ("e5", True),
    ]
    # With a time column, only what happened up to the erasure is dropped (a returning user stays).
    later = drop_erased(events, erased, time_column="event_time")
    assert sorted(r["event_id"] for r in later.collect()) == ["e2", "e3", "e4", "e5"]
    # The set is read when a plan runs: an erasure recorded later applies to every plan built
    # after it (each micro-batch, each batch of a stream-static join).
    _record(spark, cfg, {"u2": at})
    assert sorted(r["event_id"] for r in drop_erased(events, erased).collect()) == ["e2", "e4"]
    # A nested user id column (ingest's classified records).
    nested = events.select(F.struct("event_id", "user_id").alias("event"))
    assert sorted(
        r["event"]["event_id"] for r in drop_erased(nested, erased, F.col("event.user_id")).collect()
    ) == [
        "e2",
        "e4",
    ]


def test_raw_user_id_reads_the_record_and_never_a_longer_id(spark: SparkSession) -> None:
    raws = [
        '{"user_id": "u-1", "event_type": "Teleported"}',
        '{"event_id": "e", "user_id" : "u-1", "event_type": ',  # truncated: does not parse
        '{"user_id": "u-10", "x": "u-1"}',
        '{"user_id": 42}',
        '{"user_id": "a\\"b"}',
        "not json at all u-1",
        None,
    ]
    frame = spark.createDataFrame([(r,) for r in raws], "raw string")
    assert [r[0] for r in frame.select(raw_user_id(F.col("raw"))).collect()] == [
        "u-1",
        "u-1",
        "u-10",
        "42",
        'a"b',
        None,
        None,
    ]


# ---------------------------------------------------------------------------------------------
# Pure parts of the job
# ---------------------------------------------------------------------------------------------
def test_snapshot_csv_filter_keeps_other_rows_byte_for_byte() -> None:
    header = "user_id,item_id,event_type,event_time\n"
    plain = header + "u-1,i1,Product Viewed,t1\nu-10,i2,Product Viewed,t2\nu-1,i3,Product Purchased,t3\n"
    stats = forget_user.InteractionStats()
    kept, removed = forget_user.filter_interactions_csv(plain, {"u-1"}, stats)
    assert (kept, removed) == (header + "u-10,i2,Product Viewed,t2\n", 2)
    assert stats.manifest_fields() == {
        "rows": 1,
        "distinct_users": 1,
        "distinct_items": 1,
        "event_type_counts": {"Product Viewed": 1},
    }
    assert forget_user.filter_interactions_csv(plain, {"u-2"}) == (plain, 0)  # untouched: the same text
    quoted = (
        header + 'u-1,"i,1",Product Viewed,t1\n"u-1,x",i2,Product Viewed,t2\n"a\\"b",i3,Product Viewed,t3\n'
    )
    kept, removed = forget_user.filter_interactions_csv(quoted, {"u-1", 'a"b'})
    assert (kept, removed) == (header + '"u-1,x",i2,Product Viewed,t2\n', 2)
    with pytest.raises(ValueError, match="not a snapshot file"):
        forget_user.filter_interactions_csv("a,b\n1,2\n", {"u-1"})


def test_snapshot_roots_it_cannot_search_are_refused_before_anything_is_erased(
    spark: SparkSession, tmp_path: Path
) -> None:
    assert forget_user.unsearchable_roots(["/x", "file:/x", "s3://b/x", "s3a://b/x", "hdfs://nn/x"]) == [
        "hdfs://nn/x"
    ]
    cfg = load_config(
        overrides=[
            f"storage.root={tmp_path}/data",
            "erasure.snapshot_roots=[abfss://c@a.dfs.core.windows.net/s]",
        ],
        environ={},
    )
    with pytest.raises(
        forget_user.JobError,
        match=r"under abfss://c@a\.dfs\.core\.windows\.net/s, hdfs://nn/snapshots cannot be searched",
    ):
        forget_user.run(spark, cfg, ["u-1"], extra_snapshot_roots=["hdfs://nn/snapshots"])
    assert not (tmp_path / "data").exists()  # no key, no erased_users, no log


def test_online_store_keys_and_id_files() -> None:
    assert user_of_key("p:user:{u-1}", "p") == "u-1"
    assert user_of_key("p:answered:{u-1}:e-9", "p") == "u-1"
    assert user_of_key("p:user:{a}b}", "p") == "a}b"
    assert user_of_key("p:api-rate:default:17", "p") is None
    assert user_of_key("q:user:{u-1}", "p") is None
    assert forget_user.parse_id_file("u-1\nu-2\n\nu-1\n") == ["u-1", "u-2", "u-1"]
    assert forget_user.parse_id_file("email,user_id\nx@y,u-1\n,\nz,u-2\n") == ["u-1", "u-2"]
    assert forget_user.unique_ids(["u-1", "u-2", "u-1"]) == ["u-1", "u-2"]
    with pytest.raises(forget_user.JobError, match="empty user id"):
        forget_user.unique_ids(["u-1", " "])


@pytest.mark.integration
def test_online_store_erasure_on_a_redis_cluster(cluster_url: str) -> None:  # noqa: F811
    cfg = load_config(
        overrides=[
            f"online_store.url={cluster_url}",
            "online_store.cluster=true",
            f"online_store.key_prefix=t{uuid.uuid4().hex[:8]}",
        ],
        environ={},
    )
    client = connect(cfg.online_store)
    assert isinstance(client, redis.cluster.RedisCluster)
    store = OnlineState(client, cfg.online_store.key_prefix, 60_000, 60_000)
    users = [f"user-{n}" for n in range(40)] + ["user-1x"]
    states, _ = store.read(users)
    for n, user in enumerate(users):
        states[user].profile.apply({"event_id": f"e{n}", "event_type": "App Launched", "event_time": n}, 5)
        states[user].changed = True
    store.write(states.values(), {(u, f"t{n}"): Answer(0, n, ()) for n, u in enumerate(users)})

    def keys() -> set[bytes]:
        return set(client.scan_iter(match=f"{cfg.online_store.key_prefix}:*"))

    before = keys()
    assert len(before) == 2 * len(users)
    gone = {"user-1", "user-7", "user-33"}
    deleted = forget_user.delete_user_keys(client, cfg.online_store.key_prefix, gone, cluster=True)
    assert deleted == 2 * len(gone)
    assert keys() == {k for k in before if user_of_key(k.decode(), cfg.online_store.key_prefix) not in gone}


@pytest.mark.integration
def test_outbox_entries_of_erased_users_are_removed_page_by_page(online_store_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(online_store_url)
    key = outbox_key(prefix)
    for n, user in enumerate(["u-1", "u-2", "u-1", "u-3", "u-1"]):
        client.xadd(key, OutboxEntry(user, f"p-{n}", "{}").fields())
    client.xadd(key, {"other": "x"})  # not an entry: kept
    client.xadd(key, {"u": b"\xff", "p": "p-bytes", "r": "{}"})  # not UTF-8: kept, no failure
    assert remove_users_outbox_entries(client, prefix, {"u-1", "u-3"}, page=1) == 4
    assert [fields.get(b"p") for _, fields in client.xrange(key)] == [b"p-1", None, b"p-bytes"]


@pytest.mark.integration
def test_a_second_erasure_moves_the_users_erasure_time(spark: SparkSession, make_config: Any) -> None:
    cfg = make_config()
    key = erasure.hash_key(spark, cfg, create=True)
    assert key is not None
    user = user_hash_of("u-again", key)
    first = datetime(2026, 1, 1, tzinfo=UTC)
    forget_user.record_erased(spark, cfg, [user], key, "req-1", first)
    forget_user.record_erased(spark, cfg, [user], key, "req-2", first + timedelta(days=3))
    forget_user.record_erased(spark, cfg, [user], key, "req-0", first - timedelta(days=3))  # older: no change
    recorded = _read(spark, cfg, ERASED_USERS_TABLE).select(
        "user_hash", "request_id", F.col("erased_at").cast("long").alias("erased_at")
    )
    assertDataFrameEqual(
        recorded,
        [Row(user_hash=user, request_id="req-2", erased_at=int((first + timedelta(days=3)).timestamp()))],
    )


def test_erased_since_names_the_users_recorded_or_erased_again_after_a_version(
    spark: SparkSession, make_config: Any
) -> None:
    cfg = make_config()
    assert erasure.erased_version(spark, cfg) == -1
    assert erasure.erased_since(spark, cfg, -1) == (-1, frozenset(), None)
    key = erasure.hash_key(spark, cfg, create=True)
    assert key is not None
    u1, u2 = (erasure.user_hash_of(u, key) for u in ("u-1", "u-2"))
    then = datetime(2026, 11, 1, tzinfo=UTC)
    forget_user.record_erased(spark, cfg, [u1], key, "r-1", then)
    first = erasure.erased_version(spark, cfg)
    assert erasure.erased_since(spark, cfg, -1) == (first, frozenset({u1}), key)
    assert erasure.erased_since(spark, cfg, first) == (first, frozenset(), None)
    # u-1 erased again (its erased_at moves) and u-2 for the first time.
    forget_user.record_erased(spark, cfg, [u1, u2], key, "r-2", then + timedelta(hours=1))
    second = erasure.erased_version(spark, cfg)
    assert second > first
    assert erasure.erased_since(spark, cfg, first) == (second, frozenset({u1, u2}), key)
    # The same users recorded again at an older time change nothing.
    forget_user.record_erased(spark, cfg, [u1, u2], key, "r-3", then)
    third = erasure.erased_version(spark, cfg)
    assert erasure.erased_since(spark, cfg, second) == (third, frozenset(), None)
    # Pinned to a version, the erased set is that version's.
    pinned = erasure.erased_ids(spark, cfg, version=first)
    assert pinned.hashes is not None
    assert [r.user_hash for r in pinned.hashes.collect()] == [u1]
