"""Traffic and latency plumbing of the serving benchmark (not a benchmark itself; nothing to run).

Role: what every phase of ``bench/serving_bench.py`` (serve, its settings sweep, the recovery
after a kill, the pass-through ceilings) measures with. Inputs: a private broker's address and
the shop's sizes. Outputs:

* :func:`create_topic`: a fresh topic; output topics with ``message.timestamp.type=LogAppendTime``
  so that a record's timestamp is the moment the broker appended it;
* :class:`MixedProducer`: ``App Launched`` triggers for uniformly random shop users at a steady
  rate, each one preceded by ``profile_events`` (4) item events of the same user (key = user id,
  so on the same partition, in order): Product Viewed, Product Viewed, Added To Cart (every 20th
  trigger Product Purchased instead), Product Viewed, items drawn with the shop's skew. So the
  topic carries 5 records per trigger and the trigger's answer sees a seconds-fresh profile.
  ``event_time`` is the send time (serve skips triggers older than
  ``serving.max_trigger_age_seconds``). It remembers each trigger's send time (``time.time()``
  right after ``produce``);
* :class:`PayloadConsumer`: reads an output topic in a thread and keeps, per trigger id, the
  broker append time of its first record;
* :func:`latency_figures`: latency = append time - send time (same clock); p50/p95/p99 exact, a
  trigger without output counts as infinitely late.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from carousel.schemas import ADDED_TO_CART, APP_LAUNCHED, PRODUCT_PURCHASED, PRODUCT_VIEWED

# The item events sent before each trigger (same user); every PURCHASE_EVERY-th trigger's cart
# event is a purchase instead.
PROFILE_EVENTS = (PRODUCT_VIEWED, PRODUCT_VIEWED, ADDED_TO_CART, PRODUCT_VIEWED)
PURCHASE_EVERY = 20
# The shop's item skew (bench.shop_data.SKEW): index = items * u ** SKEW.
ITEM_SKEW = 3.0
PLATFORMS = ("android", "ios", "web")
# Trigger ids are "<tag>_<phase>-<n>"; item events "<tag>_<phase>-<n>.<k>": these match triggers only.
PAYLOAD_TRIGGER_ID = re.compile(rb'"trigger_event_id":"([^"]+)"')
PASS_THROUGH_TRIGGER_ID = re.compile(rb'"event_id":"([^".]+)"')


def create_topic(bootstrap: str, name: str, partitions: int, log_append_time: bool = False) -> None:
    """Create ``name`` (unless it exists); with ``log_append_time`` records carry the broker's append time."""
    from confluent_kafka.admin import AdminClient, NewTopic

    config = {"message.timestamp.type": "LogAppendTime"} if log_append_time else {}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if name in admin.list_topics(timeout=10).topics:
        return
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)]
    )
    for future in futures.values():
        future.result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topic = admin.list_topics(name, timeout=10).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return
        time.sleep(0.2)
    raise RuntimeError(f"topic {name} not visible after 30 s")


class MixedProducer:
    """Triggers with their users' item events at a steady trigger rate (see the module docstring)."""

    def __init__(
        self, bootstrap: str, topic: str, users: int, items: int, seed: int, profile_events: int = 4
    ) -> None:
        from confluent_kafka import Producer

        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 2,
                "enable.idempotence": True,
                "queue.buffering.max.messages": 2_000_000,
                # Delivery reports for failures only: no Python callback per record.
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
            }
        )
        self.topic = topic
        # Every event id starts with this run-unique tag: the online store remembers answered
        # (user, event id) pairs for an hour, so ids must not repeat across phases or runs.
        self.tag = uuid.uuid4().hex[:6]
        self.users = users
        self.items = items
        self.profile_events = profile_events
        self.random = random.Random(seed)
        self.sent: dict[str, float] = {}
        self.errors: list[str] = []
        self.records = 0

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def _produce(self, value: str, key: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=value.encode(), key=key)
                self.records += 1
                return
            except BufferError:
                self.producer.poll(0.01)

    def prefix(self, phase: str) -> str:
        """The start of every trigger id of ``phase`` (what :func:`latency_figures` selects by)."""
        return f"{self.tag}_{phase}-"

    def _send_one(self, phase: str, n: int) -> None:
        user = f"u-{self.random.randrange(self.users):07d}"
        key = user.encode()
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        platform = PLATFORMS[n % 3]
        tail = f'"event_time":"{now}","source":"mobile","device":{{"platform":"{platform}"}}}}'
        trigger = f"{self.tag}_{phase}-{n}"
        for k in range(self.profile_events):
            kind = PROFILE_EVENTS[k % len(PROFILE_EVENTS)]
            if kind == ADDED_TO_CART and n % PURCHASE_EVERY == 0:
                kind = PRODUCT_PURCHASED
            item = min(int(self.items * self.random.random() ** ITEM_SKEW), self.items - 1)
            self._produce(
                f'{{"event_id":"{trigger}.{k}","user_id":"{user}","event_type":"{kind}",'
                f'"item_id":"i-{item:06d}",{tail}',
                key,
            )
        self._produce(
            f'{{"event_id":"{trigger}","user_id":"{user}","event_type":"{APP_LAUNCHED}",{tail}', key
        )
        self.sent[trigger] = time.time()

    def run(
        self, phase: str, rate: float, duration: float, stop: threading.Event | None = None
    ) -> dict[str, Any]:
        """Send ``rate`` triggers/s (ids ``<tag>_<phase>-<n>``) for ``duration`` s, or until ``stop``."""
        total = int(round(rate * duration))
        started = time.perf_counter()
        records_before = self.records
        sent = 0
        while sent < total and not (stop is not None and stop.is_set()):
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
            while sent < due:
                self._send_one(phase, sent)
                sent += 1
            self.producer.poll(0)
            # Sleep to the next send (at most 5 ms), so that sends are spread over each second.
            pause = started + (sent / rate) - time.perf_counter()
            if pause > 0:
                time.sleep(min(pause, 0.005))
        self.producer.flush(60)
        seconds = time.perf_counter() - started
        return {
            "triggers": sent,
            "records": self.records - records_before,
            "seconds": round(seconds, 3),
            "rate": round(sent / seconds, 1),
            "errors": len(self.errors),
        }

    def start(self, phase: str, rate: float, duration: float) -> tuple[threading.Thread, threading.Event]:
        """:meth:`run` in a thread (until ``duration`` or the returned event); returns both."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run, args=(phase, rate, duration, stop), name=f"bench-producer-{phase}", daemon=True
        )
        thread.start()
        return thread, stop


class PayloadConsumer:
    """Reads an output topic in a thread; keeps (trigger id -> broker append time) of each first record."""

    def __init__(self, bootstrap: str, topic: str, id_pattern: re.Pattern[bytes]) -> None:
        from confluent_kafka import Consumer

        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self.consumer.subscribe([topic])
        self.pattern = id_pattern
        self.received: dict[str, float] = {}
        self.other = 0  # records that carry no trigger id (the pass-through's item events)
        self.duplicates = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"bench-consumer-{topic}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for message in self.consumer.consume(num_messages=1000, timeout=0.1):
                if message.error() is not None:
                    continue
                match = self.pattern.search(message.value() or b"")
                if match is None:
                    self.other += 1
                    continue
                key = match.group(1).decode()
                if key in self.received:
                    self.duplicates += 1
                    continue
                _kind, stamp_ms = message.timestamp()
                self.received[key] = stamp_ms / 1000.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile of an ascending list (nearest rank), rounded; None when empty or infinite."""
    if not ordered:
        return None
    value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return round(value, 3) if value != float("inf") else None


def latency_figures(sent: dict[str, float], received: dict[str, float], prefix: str) -> dict[str, Any]:
    """Latency percentiles of the ids starting with ``prefix``; a missing payload counts as infinite."""
    # Copies first: the producer and consumer threads may still add entries (dict() copies atomically).
    sent, received = dict(sent), dict(received)
    ids = [key for key in sent if key.startswith(prefix)]
    latencies = sorted(received[key] - sent[key] for key in ids if key in received)
    missing = len(ids) - len(latencies)
    # Missing payloads sort last: a percentile that falls among them is infinite.
    padded = latencies + [float("inf")] * missing
    arrivals = [received[key] for key in ids if key in received]
    first_sent = min((sent[key] for key in ids), default=None)
    span = (max(arrivals) - first_sent) if arrivals and first_sent is not None else 0.0
    return {
        "triggers": len(ids),
        "delivered": len(latencies),
        "missing": missing,
        "p50_s": percentile(padded, 0.50),
        "p95_s": percentile(padded, 0.95),
        "p99_s": percentile(padded, 0.99),
        "min_s": round(latencies[0], 3) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies and not missing else None,
        "mean_s": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "delivered_per_s": round(len(latencies) / span, 1) if span > 0 else None,
    }
