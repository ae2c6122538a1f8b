"""Set-up and plumbing shared by the benchmarks (not a benchmark itself; nothing to run).

Role: one place for what every ``bench/*_bench.py`` does around its measurements - the results
header and machine info, the temp work folder, the private broker's settings, the bench config
(bench defaults, then ``--config`` / ``--set``, then what a phase needs), the session on the
scaled shop, the JSON results file and the teardown. Inputs: the parsed flags and the benchmark's
results dict. Outputs: that dict filled in and written to ``--output`` (default under
``bench/results/``) by :func:`finish_run`. The benchmarks themselves run as
``.venv/bin/python -m bench.<name>_bench`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.shop_data import DEFAULT_SHOP_ROOT, add_shop_args, session_conf
from carousel import broker
from carousel.cli import add_config_args
from carousel.config import PROJECT_ROOT, BrokerConfig, CarouselConfig, ConfigError, load_config

BAR = "=" * 100


# ---------------------------------------------------------------------------------------------
# Machine and results
# ---------------------------------------------------------------------------------------------
def load1() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _process_tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc; 0 elsewhere)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            rss[pid] = int(fields[21]) * page
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree)


class PeakRss:
    """Samples the resident memory of this process and everything it started (the Spark JVM, its
    Python workers, a local cluster's daemons and executors, the broker) every ``interval`` seconds
    in a thread; ``peak_bytes`` is the highest sum seen."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _process_tree_rss(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def host_info() -> dict[str, Any]:
    """CPU model and total memory (GiB) from /proc, where they can be read."""
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    return info


def machine_info(spark: Any) -> dict[str, Any]:
    """CPUs, platform, Python, Spark, Java, package and Kafka versions, memory, load at start."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "spark": spark.version,
        "spark_master": spark.sparkContext.master,
        "java": spark.sparkContext._jvm.java.lang.System.getProperty("java.version"),
    }
    for package in ("pyspark", "delta-spark", "confluent-kafka"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package.replace("-", "_")] = metadata.version(package)
    jars = sorted(broker.DEFAULT_JARS_DIR.glob("kafka_2.13-*.jar"))
    if jars:
        info["kafka_broker"] = jars[0].stem.removeprefix("kafka_2.13-")
    info.update(host_info())
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    return info


def start_results(benchmark: str, argv: Sequence[str] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The head of a results dict: name, the command line as typed, start time, settings."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "benchmark": benchmark,
        "command": " ".join([f".venv/bin/python -m bench.{benchmark}_bench", *args]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }


def write_json(results: dict[str, Any], output: str) -> Path:
    """``results`` as indented JSON at ``output`` (relative to the project root), atomically."""
    path = Path(output)
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def print_header(results: dict[str, Any], title: str) -> None:
    """The summary's first lines: benchmark, start, CPUs, Spark and the shop (built or reused)."""
    machine = results.get("machine", {})
    print()
    print(BAR)
    print(
        f"carousel {title} benchmark  {results['started_at']}  {machine.get('nproc')} cpus, "
        f"Spark {machine.get('spark')} ({machine.get('spark_master')})"
    )
    shop = results.get("shop", {})
    if shop:
        print(f"shop: {shop.get('rows')} ({'reused' if shop.get('reused') else 'built'})")
    print("-" * 100)


def print_footer(results: dict[str, Any]) -> None:
    """The summary's last lines: a rule and where the JSON went."""
    print(BAR)
    print(f"results: {results.get('output')}")


# ---------------------------------------------------------------------------------------------
# Work folder, broker and configuration
# ---------------------------------------------------------------------------------------------
def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The flag parser of ``bench/<name>_bench.py`` (its prog is the ``python -m`` command)."""
    return argparse.ArgumentParser(prog=f"python -m bench.{name}_bench", description=description)


def add_run_args(parser: argparse.ArgumentParser, output: str, workdir_help: str) -> argparse.ArgumentParser:
    """The flags every shop benchmark ends with: --workdir, --output, the shop's and the config's."""
    parser.add_argument("--workdir", help=workdir_help)
    parser.add_argument("--output", default=output, help=f"JSON results ({output})")
    add_shop_args(parser, root_default=DEFAULT_SHOP_ROOT)
    return add_config_args(parser)


def parse_rates(text: str) -> list[float]:
    """``--rates``: positive numbers separated by commas, ascending; a bad value exits with the reason."""
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--rates expects numbers separated by commas, got {text!r}") from None
    if not rates or rates[0] <= 0:
        raise SystemExit(f"--rates needs positive rates, got {text!r}")
    return rates


def make_workdir(workdir: str | None, prefix: str) -> tuple[Path, bool]:
    """``workdir`` (resolved, created), or a fresh temp folder; and whether it is temporary."""
    temp = workdir is None
    path = Path(tempfile.mkdtemp(prefix=prefix)) if temp else Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path, temp


def broker_overrides(state_dir: Path) -> list[str]:
    """Config overrides for a private broker: its state folder and two free ports."""
    return [
        f"broker.state_dir={state_dir}",
        f"broker.port={broker.free_port()}",
        f"broker.controller_port={broker.free_port()}",
    ]


def phase_topics(roles: Mapping[str, Any], phase: str, suffix: str) -> list[str]:
    """Overrides giving every configured topic role a fresh name for ``phase``."""
    return [f"kafka.topics.{role}.name=bench-{phase}-{role}-{suffix}" for role in roles]


def bench_config(
    args: argparse.Namespace, head: Sequence[str], required: Sequence[str], logger: logging.Logger
) -> CarouselConfig:
    """Bench defaults (``head``), then the user's --config/--set, then what a phase needs.

    A config error is logged on ``logger`` and ends the run with exit status 2.
    """
    try:
        return load_config(args.config, [*head, *args.overrides, *required])
    except ConfigError as err:
        logger.error("%s", err)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------
# Streaming queries: start and per-micro-batch step timings
# ---------------------------------------------------------------------------------------------
def wait_started(query: Any, timeout: float, logger: logging.Logger, note: str = "") -> None:
    """Wait until ``query`` has left "Initializing"; raise if it failed, warn (+ ``note``) at timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if query.exception() is not None:
            raise RuntimeError(f"{query.name} failed: {query.exception()}")
        if not str(query.status.get("message", "")).startswith("Initializing"):
            return
        time.sleep(0.2)
    logger.warning("%s still initialising after %.0f s" + note, query.name, timeout)


class BatchTimer:
    """Seconds per step of each timed micro-batch (the step timers of ingest and serve build on it).

    ``_current`` is the batch being timed (None outside one), ``_mark`` the end of the last step.
    """

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.empty_batches = 0
        self._current: dict[str, Any] | None = None
        self._mark = 0.0

    def _add(self, step: str, seconds: float) -> None:
        if self._current is not None:
            steps = self._current["steps"]
            steps[step] = steps.get(step, 0.0) + seconds

    def timed(
        self, original: Callable[..., Any], steps: Callable[..., tuple[str, str]]
    ) -> Callable[..., Any]:
        """``original``, timed inside a batch: ``steps(*args, **kwargs)`` names (its step, the step
        of the wall time since the last mark); outside a batch it runs untimed.
        """

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._current is None:
                return original(*args, **kwargs)
            step, gap = steps(*args, **kwargs)
            start = time.perf_counter()
            self._add(gap, start - self._mark)
            try:
                return original(*args, **kwargs)
            finally:
                self._mark = time.perf_counter()
                self._add(step, self._mark - start)

        return wrapper


# ---------------------------------------------------------------------------------------------
# Session on the shop, and teardown
# ---------------------------------------------------------------------------------------------
def finish_run(
    results: dict[str, Any], spark: Any, broker_cfg: BrokerConfig, output: str, *, record_load: bool = True
) -> None:
    """Stop every query, the session and the broker; stamp the end; write the JSON if it started.

    The JSON is written only when the session started (``results["machine"]``): a run that failed
    before has no figures worth a file.
    """
    if spark is not None:
        for query in spark.streams.active:
            # Best effort: a query that fails while stopping must not keep the broker running.
            with contextlib.suppress(Exception):
                query.stop()
        spark.stop()
    broker.stop(broker_cfg)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if record_load:
        results["loadavg_at_end"] = load1()
    if "machine" in results:
        results["output"] = str(write_json(results, output))


@dataclass
class RunState:
    """The running benchmark: its results, the private broker's address, the session once started."""

    results: dict[str, Any]
    bootstrap: str = ""
    spark: Any = None

    def shop_session(
        self,
        shop_cfg: CarouselConfig,
        app_name: str,
        warehouse: Path,
        extra_conf: Mapping[str, str],
        master: str = "local[2]",
    ) -> Any:
        """A session (``local[2]`` unless ``master`` says otherwise) with the shop benchmarks'
        settings, kept for the teardown; records ``results["machine"]``.
        """
        from carousel.session import build_session

        conf = {**session_conf(warehouse), **extra_conf}
        self.spark = build_session(shop_cfg, app_name, master=master, extra_conf=conf)
        machine = machine_info(self.spark)
        self.results["machine"] = {**machine, "broker": {"bootstrap": self.bootstrap, "heap": "1g"}}
        return self.spark


@contextlib.contextmanager
def bench_run(
    results: dict[str, Any], broker_cfg: BrokerConfig, output: str, remove: Path | None
) -> Iterator[RunState]:
    """Run a benchmark's phases on a private broker (started here): on failure record
    ``results["error"]`` and re-raise; always :func:`finish_run` (queries, session, broker, JSON),
    then delete ``remove`` (the temp work folder). Build the session with ``state.shop_session``.
    """
    state = RunState(results)
    try:
        state.bootstrap = broker.start(broker_cfg)
        yield state
    except BaseException as err:
        results["error"] = repr(err)
        raise
    finally:
        finish_run(results, state.spark, broker_cfg, output)
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
