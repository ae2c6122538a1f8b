"""Jobs submitted to a standalone Spark cluster: ingest, nightly and serve.

A real master and worker are started with pyspark's own ``spark-class`` on loopback ports; jobs
are submitted through ``./spark-submit.sh --master spark://...`` from a folder of their own, while
the executor runs in the worker's work dir with the project's code from the shipped zip. The
ingest's Delta tables are compared with an in-process local-mode run over the same topic;
``nightly`` (export, validate, train, publish) and ``serve`` (the hot path's Python on the
executor: online store, lookups by Delta version, ranking, rendering) are checked by what they
published and answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual
from support import SMALL_NIGHTLY, produce, read_table, store_event_records
from test_serve import TopicReader, trigger, view

from bench.standalone import LOOPBACK
from bench.standalone import standalone_cluster as bench_cluster
from carousel.broker import ensure_topics
from carousel.config import PROJECT_ROOT
from carousel.experiments import trigger_payload_id
from carousel.schemas import (
    CATALOG_TABLE,
    EVENTS_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
)
from jobs import simulate_events as sim
from jobs import upload_catalog
from jobs.rebuild_profiles import comparable
from streaming import ingest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(master URL, worker work dir) of a one-worker standalone cluster on loopback."""
    folder = tmp_path_factory.mktemp("cluster")
    with bench_cluster(workers=1, cores=1, memory="1500m", folder=folder) as master_url:
        yield master_url, folder / "work"


def test_cluster_mode_writes_what_local_mode_writes(spark, make_config, tmp_path, standalone_cluster):
    master_url, work_dir = standalone_cluster
    local_cfg = make_config("simulator.users=200", "simulator.items=80", partitions=2)
    ensure_topics(local_cfg.kafka)
    world = sim.build_world(local_cfg.simulator)
    records = list(sim.stream_records(world, local_cfg.simulator, 3000, datetime.now(UTC), seed=21))
    produce(local_cfg, [(r.key, r.value) for r in records])

    cluster_root = tmp_path / "cluster-data"
    overrides = [
        f"storage.root={cluster_root}",
        f"kafka.bootstrap_servers={local_cfg.kafka.bootstrap_servers}",
        f"kafka.topics.events.name={local_cfg.kafka.topic('events').name}",
        "spark.shuffle_partitions=2",
    ]
    _submit(master_url, tmp_path / "ingest-driver", "ingest", "--available-now", sets=overrides)

    # The executor ran on the worker with the project's code shipped to it.
    shipped = list(work_dir.glob("app-*/*/carousel-code-*.zip"))
    assert shipped, f"no carousel-code-*.zip in the worker's work dir {work_dir}"

    query = ingest.run(spark, local_cfg, available_now=True)
    try:
        query.processAllAvailable()
    finally:
        query.stop()

    cluster_cfg = local_cfg.with_overrides(storage={"root": str(cluster_root)})
    node_specific = ["ingest_batch"]  # carries the query's app id, different per checkpoint
    assertDataFrameEqual(
        read_table(spark, cluster_cfg, EVENTS_TABLE).drop(*node_specific),
        read_table(spark, local_cfg, EVENTS_TABLE).drop(*node_specific),
    )
    assertDataFrameEqual(
        read_table(spark, cluster_cfg, QUARANTINE_TABLE).select("raw_value", "reason", "kafka_offset"),
        read_table(spark, local_cfg, QUARANTINE_TABLE).select("raw_value", "reason", "kafka_offset"),
    )
    assertDataFrameEqual(
        comparable(read_table(spark, cluster_cfg, PROFILES_TABLE)),
        comparable(read_table(spark, local_cfg, PROFILES_TABLE)),
    )
    assert read_table(spark, cluster_cfg, EVENTS_TABLE).count() == sum(r.label == "valid" for r in records)


def _submit(master_url: str, folder: Path, job: str, *args: str, sets: Sequence[str]) -> str:
    """``./spark-submit.sh --master <cluster> <job>`` run from ``folder``; its output (it must pass)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        str(PROJECT_ROOT / "spark-submit.sh"),
        "--master", master_url,
        "--total-executor-cores", "1",
        "--executor-memory", "1g",
        "--driver-memory", "1g",
        job, *args,
        *[arg for item in sets for arg in ("--set", item)],
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=folder, env={**os.environ, **LOOPBACK}
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{job}: " + output[-4000:]
    return output


def test_nightly_and_serve_on_the_cluster(spark, make_config, tmp_path, standalone_cluster):
    master_url, work_dir = standalone_cluster
    suffix = uuid.uuid4().hex[:8]
    sets = [
        *SMALL_NIGHTLY,
        f"training.workspace={tmp_path}/training",
        *[f"kafka.topics.{role}.name={role}-{suffix}" for role in ("push", "in_app", "sent", "dead_letter")],
        "serving.starting_offsets=earliest",
        "spark.shuffle_partitions=2",
    ]
    cfg = make_config(*sets)
    ensure_topics(cfg.kafka)
    sets += [
        f"storage.root={cfg.storage.root}",
        f"kafka.bootstrap_servers={cfg.kafka.bootstrap_servers}",
        f"kafka.topics.events.name={cfg.kafka.topic('events').name}",
        f"online_store.url={cfg.online_store.url}",
        f"online_store.port={cfg.online_store.port}",
        f"online_store.key_prefix={cfg.online_store.key_prefix}",
    ]
    world = sim.build_world(cfg.simulator)
    now = datetime.now(UTC).replace(microsecond=0)
    history = [(r.key, r.value) for r in sim.stream_records(world, cfg.simulator, 12000, now, seed=3)]
    store_event_records(spark, cfg, history, now)
    upload_catalog.run(spark, cfg, sim.write_outputs(world, tmp_path / "sim")["catalog.csv"])
    apps_before = set(work_dir.glob("app-*"))

    # nightly: export -> validate -> train -> publish, its Spark stages on the cluster.
    _submit(master_url, tmp_path / "nightly-driver", "nightly", sets=sets)
    live = read_table(spark, cfg, ITEM_RECOMMENDATIONS_TABLE)
    (model_version,) = [r.model_version for r in live.select("model_version").distinct().collect()]
    in_stock = read_table(spark, cfg, CATALOG_TABLE).where("active AND in_stock").select("item_id")
    neighbours: dict[str, set[str]] = {}
    for row in live.join(in_stock.withColumnRenamed("item_id", "rec_item_id"), "rec_item_id").collect():
        neighbours.setdefault(row.item_id, set()).add(row.rec_item_id)
    # Items with enough in-stock neighbours to fill a launch push (3 items) from the model alone.
    viewed = sorted(item for item, recs in neighbours.items() if len(recs - {item}) >= 3)[:10]
    assert viewed, "the published matrix has no item with 3 in-stock neighbours"

    # serve: each user views an item, then opens the app; the answer is ranked on the executor.
    launches = []
    for n, item in enumerate(viewed):
        user = f"cluster-user-{n}"
        launch = trigger("App Launched", user)
        launches.append((user, item, json.loads(launch[1])["event_id"]))
        produce(cfg, [view(user, item)])
        produce(cfg, [launch])
    output = _submit(master_url, tmp_path / "serve-driver", "serve", "--available-now", sets=sets)

    reader = TopicReader(cfg, cfg.kafka.topic("push").name)
    try:
        payloads = {p["payload_id"]: p for p in reader.read(len(launches), timeout=120)}
    finally:
        reader.close()
    for user, item, event_id in launches:
        payload = payloads[trigger_payload_id(event_id, "launch-push", "push")]
        assert (payload["user_id"], payload["model_version"]) == (user, model_version)
        answered = [(i["item_id"], i["strategy"]) for i in payload["items"]]
        assert [strategy for _, strategy in answered] == ["model"] * 3, (item, answered, output[-2000:])
        assert {rec for rec, _ in answered} <= neighbours[item], (item, answered)
    assert len(payloads) == len(launches)

    # Both jobs ran executors on the worker, with the code from the shipped zip.
    apps = set(work_dir.glob("app-*")) - apps_before
    assert len(apps) == 2, apps
    for app in apps:
        assert list(app.glob("*/carousel-code-*.zip")), f"no code zip in {app}"
