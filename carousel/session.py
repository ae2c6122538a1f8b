"""The one SparkSession factory.

Role: every job calls :func:`build_session` once, in ``main``; everything else receives the session
(inside ``foreachBatch``: ``df.sparkSession``). The session loads Delta and the Kafka connector from
the jars that ``make setup`` resolved with Maven into ``spark.jars_dir`` (and S3A for ``s3a://``
roots, pointed at ``storage.s3``) — nothing is downloaded at start. Under ``./spark-submit.sh``
the master and deploy options come from spark-submit; run directly (tests, notebooks) the master
comes from the argument or ``spark.master`` in the config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession

from carousel.config import PROJECT_ROOT, CarouselConfig

log = logging.getLogger(__name__)


PYTHON_DAEMON_MODULE = "spark.python.daemon.module"
LOCAL_PYTHON_DAEMON = "carousel.spark_daemon"
PYTHON_UNIX_SOCKETS = "spark.python.unix.domain.socket.enabled"
# The FAIR scheduler's pools: the default one, and the one of work a query leaves running beside
# its micro-batches (carousel.parallel.in_background), weighted below it.
SCHEDULER_POOLS_FILE = PROJECT_ROOT / "conf" / "fairscheduler.xml"


def scheduler_settings() -> dict[str, str]:
    """FAIR scheduling across pools (FIFO within each, as Spark's default order), with the pools of
    ``conf/fairscheduler.xml`` when it is there (else Spark's default pools, equally weighted)."""
    # A file: URI: Spark opens it through Hadoop, where a bare path is on fs.defaultFS (HDFS on
    # YARN), not on the driver's disk. Not percent-encoded (Path.as_uri): Hadoop's Path escapes
    # the string itself, and would look for a file named "a%20b" for "a b".
    pools = (
        {"spark.scheduler.allocation.file": "file://" + SCHEDULER_POOLS_FILE.resolve().as_posix()}
        if SCHEDULER_POOLS_FILE.is_file()
        else {}
    )
    return {"spark.scheduler.mode": "FAIR", **pools}


class SetupError(RuntimeError):
    """The machine is not set up (missing jars, broker binaries, ...): run ``make setup``."""


def spark_jars(cfg: CarouselConfig) -> list[str]:
    """The connector and Delta jars resolved by Maven at set-up."""
    jars = sorted(str(p) for p in Path(cfg.spark.jars_dir).glob("*.jar"))
    if not any("delta-spark" in Path(j).name for j in jars) or not any(
        "kafka-clients" in Path(j).name for j in jars
    ):
        raise SetupError(
            f"Delta / Kafka connector jars not found in {cfg.spark.jars_dir}: run `make setup` first"
        )
    return jars


def _under_spark_submit() -> bool:
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _master(cfg: CarouselConfig, master: str | None) -> str:
    """The master this session will run on (spark-submit's ``--master`` under spark-submit)."""
    if _under_spark_submit():
        from pyspark import SparkConf, SparkContext

        # spark-submit's --master is a system property of the driver JVM it started. SparkConf
        # reads those only once this process is connected to that JVM; before, it saw no master
        # at all, and submitted local jobs ran their Python workers without the local daemon.
        SparkContext._ensure_initialized()
        return SparkConf().get("spark.master", "")
    return master or cfg.spark.master


def hadoop_settings(cfg: CarouselConfig) -> dict[str, str]:
    """The Hadoop settings of the configuration: ``storage.s3`` for the S3A connector, then every
    ``spark.hadoop.*`` of ``spark.conf`` (which wins), without the prefix."""
    prefix = "spark.hadoop."
    return {
        **cfg.storage.s3.hadoop_settings(),
        **{key[len(prefix) :]: value for key, value in cfg.spark.conf.items() if key.startswith(prefix)},
    }


def apply_storage_settings(spark: SparkSession, cfg: CarouselConfig) -> None:
    """Give a running session the configuration's Hadoop settings (:func:`hadoop_settings`): a
    session that was already running when asked for (``getOrCreate``) kept the ones it started
    with, and its file systems (S3A's endpoint, ...) would not be the configured ones."""
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    for key, value in hadoop_settings(cfg).items():
        hadoop.set(key, value)


def build_session(
    cfg: CarouselConfig,
    app_name: str,
    master: str | None = None,
    extra_conf: Mapping[str, str] | None = None,
) -> SparkSession:
    """Build (or return the running) SparkSession configured for Delta, Kafka and UTC time."""
    builder = SparkSession.builder.appName(app_name)
    if not _under_spark_submit():
        # Python workers (payload rendering) must run this interpreter, the one with the project's
        # packages; spark-submit.sh sets it for submitted jobs.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.master(master or cfg.spark.master).config(
            "spark.driver.memory", cfg.spark.driver_memory
        )
        builder = builder.config("spark.jars", ",".join(spark_jars(cfg)))
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        # Streaming state and Delta commits are small; adaptive coalescing keeps micro-batches quick.
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.streaming.stateStore.providerClass": (
            "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
        ),
        "spark.databricks.delta.optimizeWrite.enabled": "false",
        # Progress bars garble job logs; jobs log their own counts.
        "spark.ui.showConsoleProgress": "false",
        # Local executors run this interpreter: its daemon saves ~150 ms per Python task
        # (carousel/spark_daemon.py says why); on a cluster it is opt-in through spark.conf.
        **({PYTHON_DAEMON_MODULE: LOCAL_PYTHON_DAEMON} if _master(cfg, master).startswith("local") else {}),
        # Executors talk to their Python workers over Unix domain sockets, not TCP on loopback:
        # the TCP exchange of a Python task stalled on Nagle and delayed ACKs, about 40 ms of
        # every Python task here (an empty mapInArrow job: 82 ms over TCP, 40 ms over Unix
        # sockets; bench/README.md "Serving"). Executor and workers always share a host.
        PYTHON_UNIX_SOCKETS: "true",
        # A background fold's stages cannot hold a micro-batch's back (conf/fairscheduler.xml).
        **scheduler_settings(),
        # The S3 service of s3a:// locations (storage.s3); spark.conf may still override each key.
        **{f"spark.hadoop.{key}": value for key, value in cfg.storage.s3.hadoop_settings().items()},
        **cfg.spark.conf,
        **(extra_conf or {}),
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    apply_storage_settings(spark, cfg)
    spark.sparkContext.setLogLevel(os.environ.get("CAROUSEL_SPARK_LOG_LEVEL", "WARN"))
    log.info(
        "spark session %s on %s (Python workers: %s)",
        app_name,
        spark.sparkContext.master,
        spark.sparkContext.getConf().get(PYTHON_DAEMON_MODULE, "pyspark.daemon"),
    )
    return spark


@contextmanager
def session_settings(spark: SparkSession, settings: Mapping[str, str]) -> Iterator[None]:
    """Session settings for the block only: each key goes back to its value (or to unset) after."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
