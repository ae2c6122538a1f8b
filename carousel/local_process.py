"""Shared process handling for the embedded local servers (the Kafka broker, the Redis online store).

Role: the parts of :mod:`carousel.broker` and :mod:`carousel.online_store_server` that do not depend
on which server runs: a lock on the state folder, the pid file, liveness, stopping, log tails. The
callers pass their own paths, names, labels, error types and the predicate that recognises their
process by its command line; nothing here reads the configuration.

Processes started by the calling Python process are kept in a caller-owned ``children`` mapping
(pid -> :class:`subprocess.Popen`): polling them reaps a child that died, so it is not mistaken for
a running one (a zombie still answers ``os.kill(pid, 0)``).

Liveness of any other process goes through psutil: the pid file holds
the pid on its first line and, on its second, the process's start time as psutil reported it at
launch. A live pid whose start time differs is a reused pid, not ours. A pid file without a start
time (written before it was recorded) falls back to matching the command line; where psutil cannot
inspect a process that ``os.kill(pid, 0)`` says exists (no procfs mounted), it counts as running,
so ``stop`` still signals it instead of orphaning it.

The one exception is :func:`process_state`, for the leases of :mod:`carousel.query_lifecycle`: it
reads a start time in clock ticks from ``/proc/PID/stat``, exact where psutil's wall-clock start
time moves when the clock is stepped, and :func:`process_space` names the boot and pid namespace
those ticks and pids mean something in.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import psutil

LOG_TAIL_LINES = 40
KILL_WAIT_SECONDS = 10.0
# psutil derives a start time from boot time and clock ticks: the same process reads the same value
# to well under this, while a reused pid belongs to a process started long after the recorded one.
START_TIME_TOLERANCE_SECONDS = 1.0
# A process caught inside exec (the launcher's Popen has returned, the kernel has not yet laid out the
# new argv) reads an empty command line for microseconds; one that stays empty this long is a kernel
# thread, never a server of ours.
EMPTY_CMDLINE_WAIT_SECONDS = 1.0
EMPTY_CMDLINE_POLL_SECONDS = 0.01

Children = dict[int, subprocess.Popen[bytes]]


# ---------------------------------------------------------------------------------------------
# Log tails and the state folder


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path``, or a note that it does not exist or is empty."""
    try:
        content = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(content[-lines:]) or f"({path} is empty)"


def log_tails(paths: Iterable[Path], lines: int = LOG_TAIL_LINES) -> str:
    """The tail of each log file under a ``--- last N lines of PATH ---`` header, for error messages."""
    return "\n".join(f"--- last {lines} lines of {path} ---\n{tail(path, lines)}" for path in paths)


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (its folder is created): serialises start / stop
    on one state folder across processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_time(pid: int) -> float | None:
    """``pid``'s start time (seconds since the epoch, as psutil reports it); None when the process is
    gone or psutil cannot inspect it (no procfs, no permission)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def process_space() -> str | None:
    """Where this process's pids mean something: the machine's boot id (Linux: the same for every
    process until it reboots) and the pid namespace (containers on one machine share the boot id,
    not their pids). None when either cannot be read, or when ``/proc`` is not this namespace's."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot and namespace else None


def process_state(pid: int) -> tuple[str, int] | None:
    """``pid``'s state letter and start time in clock ticks since boot (``/proc/PID/stat``: exact,
    unlike a wall-clock start time, which moves when the clock is stepped); None when it cannot
    be read (gone, or hidden from this user)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_gone(pid: int, started: int) -> bool:
    """Whether the process ``pid`` of this machine and pid namespace, started at ``started``
    (:func:`process_state`'s ticks), no longer runs: no such pid, a zombie nobody reaped, or the pid
    reused by a process started since. Any doubt (the process hidden from this user) says it runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's: it exists
    state = process_state(pid)
    if state is None:
        return False
    letter, ticks = state
    return letter in ("Z", "X") or ticks != started  # a zombie, or the pid reused since


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Record ``pid`` and its start time in ``pid_file`` (the pid alone when the start time is
    unknown); the start time lets :func:`is_ours` tell our process from a later one reusing its pid."""
    started = start_time(pid)
    pid_file.write_text(f"{pid}\n" + (f"{started!r}\n" if started is not None else ""))


def _read_pid_lines(pid_file: Path) -> list[str]:
    try:
        return pid_file.read_text().split()
    except FileNotFoundError:
        return []


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file``; None when there is none or it does not hold a number."""
    lines = _read_pid_lines(pid_file)
    try:
        return int(lines[0]) if lines else None
    except ValueError:
        return None


def recorded_start_time(pid_file: Path, pid: int) -> float | None:
    """The start time ``pid_file`` records for ``pid``; None when it records none (an older pid file,
    or one psutil could not fill), a different pid, or no pid file exists."""
    lines = _read_pid_lines(pid_file)
    if len(lines) < 2 or lines[0] != str(pid):
        return None
    try:
        return float(lines[1])
    except ValueError:
        return None


def running_pid(pid_file: Path, is_ours: Callable[[int], bool]) -> int | None:
    """The pid in ``pid_file`` while ``is_ours`` says that process still runs; else None (stale)."""
    pid = read_pid(pid_file)
    return pid if pid is not None and is_ours(pid) else None


# ---------------------------------------------------------------------------------------------
# Ports and liveness


def port_open(host: str, port: int) -> bool:
    """True when something accepts a TCP connection on ``host:port`` (within half a second)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def refuse_taken_ports(
    host: str, ports: Iterable[int], state_dir: str, advice: str, error: type[Exception]
) -> None:
    """Raise ``error`` for the first of ``ports`` on ``host`` that something already listens on
    (a process not started from ``state_dir``); ``advice`` ends the message ("stop it or ...")."""
    for port in ports:
        if port_open(host, port):
            raise error(
                f"{host}:{port} is already in use by a process not started from {state_dir}; "
                f"stop it or {advice}"
            )


def _signalable(pid: int) -> bool:
    """True while ``pid`` exists and we may signal it (``os.kill(pid, 0)``); someone else's process
    behind a reused pid (no permission) is not."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _command_line(proc: psutil.Process) -> str:
    """``proc``'s command line, read again while it is empty (see ``EMPTY_CMDLINE_WAIT_SECONDS``):
    right after :func:`spawn` the child may still be inside exec, and its empty argv must not read
    as someone else's process."""
    deadline = time.monotonic() + EMPTY_CMDLINE_WAIT_SECONDS
    cmdline = " ".join(proc.cmdline())
    while not cmdline and time.monotonic() < deadline:
        time.sleep(EMPTY_CMDLINE_POLL_SECONDS)
        cmdline = " ".join(proc.cmdline())
    return cmdline


def is_ours(
    pid: int, children: Children, matches: Callable[[str], bool], started: float | None = None
) -> bool:
    """True while ``pid`` is alive and is the process we launched (so a reused pid is not ours).

    A pid in ``children`` is asked directly (which reaps it once it exited). Any other pid that is
    gone, a zombie, or someone else's process (no permission to signal it) is not ours. With the
    start time recorded at launch (``started``), the process must have started then; without it (an
    older pid file), its command line must satisfy ``matches`` (an empty one, as while the process is
    still inside exec, is read again for up to ``EMPTY_CMDLINE_WAIT_SECONDS``). Where the process
    exists but psutil cannot inspect it (no procfs, no permission) there is no telling, and it counts
    as ours: reading it as stopped would let ``stop`` orphan a live server.
    """
    child = children.get(pid)
    if child is not None:
        return child.poll() is None
    if not _signalable(pid):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None:
            return abs(proc.create_time() - started) <= START_TIME_TOLERANCE_SECONDS
        cmdline = _command_line(proc)
    except psutil.ZombieProcess:
        return False
    except psutil.NoSuchProcess:
        # os.kill saw it a moment ago: either it exited meanwhile, or psutil cannot read the process
        # table here (Linux without /proc); a second os.kill tells which.
        return _signalable(pid)
    except (psutil.AccessDenied, OSError):
        return True  # it exists (os.kill) but cannot be inspected
    return bool(cmdline) and matches(cmdline)


# ---------------------------------------------------------------------------------------------
# Starting and stopping


def spawn(
    command: Sequence[str], out_file: Path, cwd: Path, pid_file: Path, children: Children
) -> subprocess.Popen[bytes]:
    """Start ``command`` in ``cwd`` with stdout and stderr appended to ``out_file``; record the process
    in ``children`` and its pid and start time in ``pid_file`` (:func:`write_pid_file`).

    A new session detaches the server from our terminal and signals, so it outlives the command that
    started it, and it leads its own process group, which :func:`send_signal` can signal as a whole.
    """
    with open(out_file, "ab") as out:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    children[proc.pid] = proc
    write_pid_file(pid_file, proc.pid)
    return proc


def send_signal(pid: int, sig: signal.Signals, group: bool = False) -> None:
    """Send ``sig`` to ``pid``; with ``group``, to its whole process group when it leads one (as a
    process from :func:`spawn` does). A process already gone is not an error."""
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(
    pid: int, is_ours: Callable[[int], bool], children: Children, timeout: float, poll_seconds: float
) -> bool:
    """Poll every ``poll_seconds`` until ``is_ours(pid)`` is false (then forget the child): True, or
    False when it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while is_ours(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_seconds)
    children.pop(pid, None)
    return True


def kill(pid: int, is_ours: Callable[[int], bool], children: Children, poll_seconds: float) -> bool:
    """SIGKILL ``pid``'s process group and wait (at most ``KILL_WAIT_SECONDS``): True once it is gone."""
    send_signal(pid, signal.SIGKILL, group=True)
    return wait_gone(pid, is_ours, children, KILL_WAIT_SECONDS, poll_seconds)


def kill_unless_gone(
    pid: int,
    *,
    is_ours: Callable[[int], bool],
    children: Children,
    timeout: float,
    poll_seconds: float,
    label: str,
    error: type[Exception],
    logger: logging.Logger,
) -> None:
    """Wait ``timeout`` seconds for ``pid`` (already asked to stop) to exit, else :func:`kill` it.

    Logs a warning naming ``label`` before the kill; raises ``error`` when it survives SIGKILL.
    """
    if wait_gone(pid, is_ours, children, timeout, poll_seconds):
        return
    logger.warning("%s pid %d did not stop within %.0fs; killing it", label, pid, timeout)
    if not kill(pid, is_ours, children, poll_seconds):
        raise error(f"{label} pid {pid} survived SIGKILL")


def abandon_start(proc: subprocess.Popen[bytes], pid_file: Path, stop_pid: Callable[[int], None]) -> str:
    """After a start that failed: stop ``proc`` with ``stop_pid`` if it still runs and drop the pid
    file; returns how it ended, for the error message ("did not answer", "exited with status N")."""
    exit_code = proc.poll()
    if exit_code is None:
        stop_pid(proc.pid)
    pid_file.unlink(missing_ok=True)
    return "did not answer" if exit_code is None else f"exited with status {exit_code}"


def stop_running(
    lock_file: Path,
    pid_file: Path,
    is_ours: Callable[[int], bool],
    stop_pid: Callable[[int], None],
    label: str,
    logger: logging.Logger,
) -> bool:
    """Under the lock, stop the process of ``pid_file`` with ``stop_pid`` when ``is_ours`` says it runs,
    and remove the pid file (a stale one too). True when one was running."""
    with locked(lock_file):
        pid = running_pid(pid_file, is_ours)
        if pid is None:
            pid_file.unlink(missing_ok=True)
            return False
        logger.info("stopping %s pid %d", label, pid)
        stop_pid(pid)
        pid_file.unlink(missing_ok=True)
        logger.info("%s stopped", label)
        return True
