"""An open-loop HTTP load generator for ``bench-api`` (not a benchmark itself; nothing to run).

Role: send GET requests at a constant rate over a pool of keep-alive connections and measure
each one's latency from the moment it was *due*, not from when a connection became free: a
slow server then shows as queueing delay in the figures instead of silently lowering the rate
(no coordinated omission, as with wrk2 or vegeta; neither is packaged for this machine, and
Debian's ``wrk`` and ``hey`` are closed-loop). Plain asyncio streams on uvloop with a minimal
HTTP/1.1 exchange (status line, ``Content-Length`` body), so the generator's own CPU stays small;
it is reported beside the figures so a reader can see it was not the bottleneck.

Inputs: host, port, a function from the request number to its path, extra headers, rate,
duration and connection count. Output: a dict of latency percentiles, the achieved rate, the
status counts and the generator's CPU (:func:`run_phase`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import uvloop

from bench.serving_traffic import percentile

_CONTENT_LENGTH = b"content-length:"


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closing = False  # the server said it closes this connection after the response

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def get(self, request: bytes) -> int:
        """Send one request; return the status once the whole response was read."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        lower = head.lower()
        at = lower.find(_CONTENT_LENGTH)
        if at >= 0:
            end = lower.index(b"\r\n", at)
            length = int(lower[at + len(_CONTENT_LENGTH) : end])
        if length:
            await self.reader.readexactly(length)
        self.closing = b"connection: close" in lower
        return status

    def close(self) -> None:
        self.writer.close()


async def _phase(
    host: str,
    port: int,
    path_of: Callable[[int], str],
    headers: Mapping[str, str],
    rate: float,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[_Connection | None] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await _Connection.open(host, port))
    samples: list[str] = []
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    total = int(rate * duration)
    pending = [total]
    finished = asyncio.Event()
    running: set[asyncio.Task[None]] = set()

    async def one(number: int, due: float) -> None:
        connection = await pool.get()
        request = f"GET {path_of(number)} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
        try:
            if connection is None:  # (re)opened lazily: a failed open counts as this request's error
                connection = await _Connection.open(host, port)
            statuses[await connection.get(request)] += 1
            latencies.append(time.perf_counter() - due)
            if connection.closing:
                connection.close()
                connection = None
        except Exception as err:  # noqa: BLE001 - every failure is counted, none ends the phase
            # (e.g. RuntimeError: uvloop's write to a transport the server closed)
            errors[type(err).__name__] += 1
            if len(samples) < 5:
                samples.append(f"{type(err).__name__}: {err}")
            if connection is not None:
                connection.close()
            connection = None
        finally:
            pool.put_nowait(connection)
            pending[0] -= 1
            if not pending[0]:
                finished.set()

    # Due times on perf_counter: the loop's own clock (libuv's) has millisecond resolution.
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    start = wall_before + 0.05
    sent = 0
    while sent < total:
        due_now = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due_now:
            # asyncio holds tasks weakly: an unreferenced task waiting on its socket can be
            # garbage-collected mid-request (and its request never counted).
            task = loop.create_task(one(sent, start + sent / rate))
            running.add(task)
            task.add_done_callback(running.discard)
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    if total:
        await finished.wait()
    wall = time.perf_counter() - wall_before
    cpu = time.process_time() - cpu_before
    while not pool.empty():
        connection = pool.get_nowait()
        if connection is not None:
            connection.close()
    millis = sorted(seconds * 1000 for seconds in latencies)
    return {
        "rate": rate,
        "requests": total,
        "achieved_per_s": round(total / wall, 1) if wall else None,
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "errors": dict(errors),
        "error_samples": samples,
        "p50_ms": percentile(millis, 0.50),
        "p95_ms": percentile(millis, 0.95),
        "p99_ms": percentile(millis, 0.99),
        "max_ms": round(millis[-1], 3) if millis else None,
        "generator_cpu_cores": round(cpu / wall, 3) if wall else None,
        "wall_s": round(wall, 1),
    }


def run_phase(
    host: str,
    port: int,
    path_of: Callable[[int], str],
    headers: Mapping[str, str],
    rate: float,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    """``rate`` requests per second for ``duration`` s; latency from each request's due time."""
    return uvloop.run(_phase(host, port, path_of, headers, rate, duration, connections))
