"""Spark work of one driver thread run side by side: :func:`in_parallel`.

Role: a micro-batch that commits to several Delta tables (ingest: quarantine, events, the profile
MERGE) spends part of each commit on the driver and in Spark's scheduling (the log, the snapshot,
the commit file, a job's start) rather than on the executors' cores; made one after another the
commits add up. :func:`in_parallel` runs such independent writes each in its own thread and
returns when all have ended (ingest on 2 local cores, where the writes share the CPU: its
commits end 0.3-0.4 s sooner a batch, bench/README.md). Inputs: the session and the named
tasks; output: each task's result by name.

What each thread carries from the caller, so a task behaves as if the caller ran it:

* Spark's local properties (a copy each): the job group and description, so a stopped streaming
  query cancels the tasks' jobs with its own, and the SQL execution the caller runs inside;
* the caller's session as the JVM's active session. A DataFrame's actions and Delta's commands
  run with their own session active (in a foreachBatch handler, the query's clone of the session,
  with its own settings), but code that asks the JVM for the active session outside of them would
  otherwise get whatever the thread's creator had.

Every task is waited for before anything is raised: when one fails, none of the others is still
writing while the caller retries (a replayed micro-batch must not race its own first attempt).

:func:`in_background` is the other kind: work that outlives its caller (ingest's profile fold,
started by a micro-batch and left running while the next batches commit). Its thread carries the
session but none of the caller's local properties: its jobs are in a job group of their own, so
stopping the streaming query does not cancel them, and none joins an SQL execution that ended.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

from pyspark.sql import SparkSession

from carousel.errors import one_line

log = logging.getLogger(__name__)

T = TypeVar("T")
# The scheduler pool of work a query leaves running beside its micro-batches (conf/fairscheduler.xml).
SCHEDULER_POOL_PROPERTY = "spark.scheduler.pool"
BACKGROUND_POOL = "background"


def in_parallel(spark: SparkSession, tasks: Mapping[str, Callable[[], T]]) -> dict[str, T]:
    """Run each of ``tasks`` (name -> no-argument callable doing Spark work on ``spark``) in its own
    thread; each task's result by name. When tasks fail, all are first waited for, then the first
    failure (in ``tasks``' order) is raised, with each other failure logged and added to it as a
    note. A single task runs in the calling thread."""
    if len(tasks) <= 1:
        return {name: task() for name, task in tasks.items()}
    context = spark.sparkContext._jsc.sc()
    properties = context.getLocalProperties()
    jvm_session_class = spark.sparkContext._jvm.org.apache.spark.sql.SparkSession
    caller_session = spark._jsparkSession

    def carried(task: Callable[[], T]) -> Callable[[], T]:
        copied = properties.clone()  # one each: a thread's SQL executions write into its properties

        def run() -> T:
            context.setLocalProperties(copied)
            jvm_session_class.setActiveSession(caller_session)
            return task()

        return run

    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="carousel-parallel") as pool:
        futures = {name: pool.submit(carried(task)) for name, task in tasks.items()}
        wait(futures.values())
    failed = [(name, error) for name, future in futures.items() if (error := future.exception()) is not None]
    if failed:
        first = failed[0][1]
        for name, error in failed[1:]:
            # On the raised error too: what decides on a restart (a transient failure or not)
            # reads its text, and a permanent failure must not hide behind a transient one.
            first.add_note(f"{name} failed too: {one_line(error)}")
            log.error("%s failed too: %s", name, one_line(error))
        raise first
    return {name: future.result() for name, future in futures.items()}


def run_all(spark: SparkSession, tasks: Mapping[str, Callable[[], Any]], parallel: bool) -> dict[str, Any]:
    """:func:`in_parallel` when ``parallel``, else each task in turn in ``tasks``' order."""
    if parallel:
        return in_parallel(spark, tasks)
    return {name: task() for name, task in tasks.items()}


def in_background(spark: SparkSession, name: str, task: Callable[[], None]) -> threading.Thread:
    """Start ``task`` (no-argument, doing Spark work on ``spark``, handling its own errors) in a
    daemon thread named ``name``; the started thread. The thread has ``spark`` as the JVM's active
    session and fresh local properties: its jobs are in the job group ``name`` only, and in the
    scheduler pool :data:`BACKGROUND_POOL` (weighted below the default pool's work when the
    session schedules FAIR, :func:`carousel.session.scheduler_settings`)."""
    context = spark.sparkContext
    jvm_session_class = context._jvm.org.apache.spark.sql.SparkSession
    session = spark._jsparkSession

    def run() -> None:
        context._jsc.sc().setLocalProperties(context._jvm.java.util.Properties())
        jvm_session_class.setActiveSession(session)
        context.setJobGroup(name, name, interruptOnCancel=False)
        context.setLocalProperty(SCHEDULER_POOL_PROPERTY, BACKGROUND_POOL)
        task()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
