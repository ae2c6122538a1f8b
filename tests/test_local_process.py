"""Liveness of the local servers' processes (carousel.local_process): pid file with start time.

Real processes throughout (a sleeping Python child), started through the same launcher the broker
and the online store use; nothing is mocked except, in one test, psutil's view of /proc.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from carousel import local_process

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
Launch = Callable[..., tuple[subprocess.Popen, Path]]


def _matches_sleeper(cmdline: str) -> bool:
    return "time.sleep(120)" in cmdline


@pytest.fixture
def children() -> local_process.Children:
    """The launcher's children mapping (pid -> Popen), as broker.py and online_store_server.py keep."""
    return {}


@pytest.fixture
def launch(tmp_path, children) -> Iterator[Launch]:
    """Start a command through :func:`local_process.spawn` (pid file ``NAME.pid`` in tmp_path);
    whatever still runs at teardown is killed and reaped."""
    started: list[subprocess.Popen] = []

    def start(command: list[str] = SLEEPER, name: str = "sleeper") -> tuple[subprocess.Popen, Path]:
        pid_file = tmp_path / f"{name}.pid"
        proc = local_process.spawn(command, tmp_path / f"{name}.out", tmp_path, pid_file, children)
        started.append(proc)
        return proc, pid_file

    yield start
    for proc in started:
        if proc.poll() is None:
            local_process.send_signal(proc.pid, signal.SIGKILL, group=True)
        proc.wait(timeout=10)


def test_spawned_process_is_alive_and_its_start_time_recorded(launch, children):
    proc, pid_file = launch()

    started = local_process.recorded_start_time(pid_file, proc.pid)
    assert local_process.read_pid(pid_file) == proc.pid
    assert started == pytest.approx(psutil.Process(proc.pid).create_time(), abs=0.01)
    # As the launcher's own child, and as any other process sees it (from the pid file alone).
    assert local_process.is_ours(proc.pid, children, _matches_sleeper, started)
    assert local_process.is_ours(proc.pid, {}, _matches_sleeper, started)
    running = local_process.running_pid(
        pid_file, lambda pid: local_process.is_ours(pid, {}, _matches_sleeper, started)
    )
    assert running == proc.pid


def test_right_pid_with_another_start_time_is_a_reused_pid(launch):
    proc, pid_file = launch()
    # The pid file of an earlier process that had the same pid: it started a minute before this one.
    pid_file.write_text(f"{proc.pid}\n{psutil.Process(proc.pid).create_time() - 60.0!r}\n")

    started = local_process.recorded_start_time(pid_file, proc.pid)
    # Not ours even though the command line matches: the start time decides.
    assert not local_process.is_ours(proc.pid, {}, _matches_sleeper, started)


def test_dead_pid_reads_as_stopped(launch, children):
    proc, pid_file = launch([sys.executable, "-c", "pass"], "quick")
    proc.wait(timeout=30)  # exited and reaped: its pid names no process now
    started = local_process.recorded_start_time(pid_file, proc.pid)

    assert not local_process.is_ours(proc.pid, children, lambda _: True, started)
    assert not local_process.is_ours(proc.pid, {}, lambda _: True, started)
    assert local_process.running_pid(pid_file, lambda pid: local_process.is_ours(pid, {}, bool)) is None


def test_pid_file_without_start_time_falls_back_to_the_command_line(launch):
    proc, pid_file = launch()
    pid_file.write_text(f"{proc.pid}\n")  # the format before start times were recorded

    assert local_process.read_pid(pid_file) == proc.pid
    assert local_process.recorded_start_time(pid_file, proc.pid) is None
    assert local_process.is_ours(proc.pid, {}, _matches_sleeper)
    assert not local_process.is_ours(proc.pid, {}, lambda cmdline: "kafka.Kafka" in cmdline)


def test_a_process_still_inside_exec_is_read_again_not_taken_for_another(launch, monkeypatch):
    """Right after spawn the kernel may not yet have laid out the child's argv: its command line reads
    empty for a moment (seen once in CI). That must not make our own server read as stopped."""
    proc, pid_file = launch()
    pid_file.write_text(f"{proc.pid}\n")  # no start time: the command line decides
    real_cmdline = psutil.Process.cmdline
    reads: list[int] = []

    def empty_first(self: psutil.Process) -> list[str]:
        reads.append(self.pid)
        return [] if len(reads) == 1 else real_cmdline(self)

    monkeypatch.setattr(psutil.Process, "cmdline", empty_first)
    assert local_process.is_ours(proc.pid, {}, _matches_sleeper)
    assert len(reads) == 2


def test_start_time_of_another_pid_is_not_used(tmp_path):
    pid_file = tmp_path / "x.pid"
    pid_file.write_text("4242\n1700000000.5\n")
    assert local_process.recorded_start_time(pid_file, 4242) == 1700000000.5
    assert local_process.recorded_start_time(pid_file, 4243) is None
    assert local_process.recorded_start_time(tmp_path / "missing.pid", 4242) is None
    pid_file.write_text("not a pid\n")
    assert local_process.read_pid(pid_file) is None


def test_without_proc_a_live_process_still_reads_as_running_and_stop_stops_it(
    tmp_path, launch, children, monkeypatch
):
    proc, pid_file = launch()
    children.clear()  # as seen from another command (`broker stop`), not the one that started it
    started = local_process.recorded_start_time(pid_file, proc.pid)

    # psutil reads the process table from here on Linux: pointing it at a folder that does not
    # exist is a machine without /proc mounted.
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path / "no-proc"))
    assert local_process.start_time(proc.pid) is None
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(proc.pid)

    def ours(pid: int) -> bool:
        return local_process.is_ours(pid, children, _matches_sleeper, started)

    assert ours(proc.pid)  # before: read as stopped, and `stop` left it running (orphaned)

    def stop_pid(pid: int) -> None:
        local_process.send_signal(pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + 10
        # The test process is its parent: reap it, as the launching process would.
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    assert local_process.stop_running(
        tmp_path / "sleeper.lock", pid_file, ours, stop_pid, "sleeper", logging.getLogger(__name__)
    )
    assert proc.poll() is not None
    assert not ours(proc.pid)
    assert not pid_file.exists()
