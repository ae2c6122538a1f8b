"""A Spark standalone cluster on this machine: one master and N workers on loopback ports.

Role: what the cluster test (``tests/test_cluster.py``) and the scale-out runs of the benchmarks
(``bench/campaign_bench.py --cluster-workers N``) run against, started with pyspark's own
``spark-class`` (no separate Spark install). Inputs: the number of workers, cores and memory of
each, a folder for logs and the workers' work dirs. Output: the master URL while the context is
open; every process is stopped (SIGTERM, then SIGKILL) when it closes.

    with standalone_cluster(workers=2, cores=1, memory="3g", folder=Path("/tmp/cluster")) as url:
        ...  # build a session with master=url
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyspark

from carousel.broker import free_port

SPARK_HOME = Path(pyspark.__file__).parent
LOOPBACK = {"SPARK_LOCAL_IP": "127.0.0.1", "SPARK_MASTER_HOST": "127.0.0.1"}
START_TIMEOUT_S = 120.0


def alive_workers(ui_port: int) -> int:
    """Workers registered with the master whose web UI is on ``ui_port`` (0 when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as response:
            return int(json.load(response).get("aliveworkers", 0))
    except OSError:
        return 0


@contextlib.contextmanager
def standalone_cluster(workers: int, cores: int, memory: str, folder: Path) -> Iterator[str]:
    """Start a master and ``workers`` workers of ``cores`` cores and ``memory`` each; yields the
    master URL once every worker has registered. Logs go to ``folder/<name>.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    port, ui_port = free_port(), free_port()
    master_url = f"spark://127.0.0.1:{port}"
    env = {**os.environ, **LOOPBACK, "SPARK_HOME": str(SPARK_HOME), "SPARK_DAEMON_MEMORY": "512m"}
    master = ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port)]
    commands = {"master": [*master, "--webui-port", str(ui_port)]}
    for n in range(workers):
        commands[f"worker-{n}"] = [
            "org.apache.spark.deploy.worker.Worker",
            "--host",
            "127.0.0.1",
            "--cores",
            str(cores),
            "--memory",
            memory,
            "--webui-port",
            str(free_port()),
            "--work-dir",
            str(folder / "work"),
            master_url,
        ]
    processes: list[tuple[subprocess.Popen[bytes], IO[str]]] = []
    try:
        for name, args in commands.items():
            out = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            spark_class = str(SPARK_HOME / "bin" / "spark-class")
            process = subprocess.Popen(
                [spark_class, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            processes.append((process, out))
        deadline = time.monotonic() + START_TIMEOUT_S
        while alive_workers(ui_port) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{workers} workers did not register within {START_TIMEOUT_S:.0f}s: {folder}"
                )
            time.sleep(0.5)
        yield master_url
    finally:
        for process, out in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            out.close()
