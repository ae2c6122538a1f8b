"""The real-time hot path: a micro-batch of events -> online profiles -> ranked, rendered payloads.

Role: everything ``serve`` does per record, as plain Python that a Spark Python worker runs on one
Arrow batch at a time (``mapInArrow`` in ``streaming/serve.py``). One Kafka partition's records
arrive in offset order, and a user's events share a partition (key = user id), so a user's
events and triggers are handled in the order they were produced:

0. **Erased users**: the events of users ``forget-user`` erased, up to their erasure, are dropped
   first (:func:`carousel.erasure.drop_erased_rows`, against the erased set the lookups hold):
   they update no profile, trigger nothing and are counted as ``skipped_erased``.
1. **Profile**: each valid event is applied to the user's online profile
   (:class:`~carousel.online_profile.OnlineProfile`), so a Product Viewed just before an App
   Launched in the same batch already counts.
2. **Trigger**: an event of a campaign's ``trigger_event_types`` is answered unless it was
   answered already (same Kafka offset: a replayed batch, so the stored answer is sent again with
   the same payload ids and items; another offset: a producer retry, skipped), is older than
   ``serving.max_trigger_age_seconds`` (skipped) or the user hit the frequency cap (skipped).
3. **Rank**: per campaign, the user's arm (:func:`carousel.experiments.assign_variant`), then the
   one ranking function (:func:`carousel.ranking.rank_request`) against the in-memory lookups
   (:mod:`carousel.lookups`) with the online profile's recent items and recent sends.
4. **Render**: the channel payload (:func:`carousel.payloads.render_payload`); one that fails to
   render or is larger than ``serving.max_payload_bytes`` goes to the dead-letter topic with the
   reason, and the stream goes on.
5. **Emit**: rows for one Kafka sink with a per-row ``topic``: the payload on ``recs.<channel>``
   and one outbox record per payload (and per control-group hold-out) on ``recs.sent``, which
   ``record-sends`` writes into the Delta ``sent_recommendations``.

The online store is read once and written once per Arrow batch (pipelined), before any row is
emitted: a kill at any point replays the batch into the same answers. Counts by outcome are
emitted as ``count`` rows, which the query turns into observed metrics and drops.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import pyarrow as pa

from carousel.arrow_rows import batch_rows
from carousel.config import CampaignConfig, CarouselConfig, OnlineStoreConfig
from carousel.erasure import drop_erased_rows
from carousel.experiments import DEFAULT_VARIANT, assign_variant, trigger_payload_id
from carousel.fastjson import compact_json
from carousel.faults import kill_job
from carousel.lookups import LookupSources, ServingLookups, current_lookups
from carousel.online_state import Answer, OnlineState, UserState
from carousel.online_store import connect
from carousel.payloads import PayloadError, PayloadRenderer, payload_json, render_payload
from carousel.ranking import newest_model_version, rank_request
from carousel.schemas import CONTROL_VARIANT

log = logging.getLogger(__name__)

# What the hot path counts per batch (observed metrics of the serving query, logged per batch).
COUNTERS: tuple[str, ...] = (
    "records",
    "events_applied",
    "triggers",
    "payloads",
    "control",
    "replayed",
    "dead_letter",
    "no_items",
    "skipped_invalid",
    "skipped_erased",
    "skipped_stale",
    "skipped_duplicate",
    "skipped_frequency_cap",
    "store_conflicts",
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # record (goes to Kafka) | count (metrics only)
        ("topic", pa.string()),
        ("key", pa.string()),
        ("value", pa.string()),
        ("payload_id", pa.string()),
        ("reason", pa.string()),  # the counter's name, for count rows
        ("n", pa.int64()),
    ]
)
OUTPUT_DDL = "kind string, topic string, key string, value string, payload_id string, reason string, n bigint"
_MICROS = 1_000_000
ANSWER_TTL_MARGIN_S = 600
# Fault injection for the kill tests: SIGKILL the job's process group right after the Nth batch
# whose answers were written to the online store, before any of its rows reaches Kafka.
FAULT_KILL_ENV = "CAROUSEL_FAULT_KILL_AFTER_STORE_WRITE"
_fault_countdown = [int(os.environ.get(FAULT_KILL_ENV) or 0)]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros_to_iso(micros: int) -> str:
    """Epoch microseconds as ISO-8601 UTC with microseconds (``2026-12-02T15:00:00.123456Z``)."""
    return (_EPOCH + timedelta(microseconds=micros)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def sends_keep_micros(cfg: CarouselConfig) -> int:
    """How long a user's recent sends are kept in the online store: the longest
    ``sent_within_days`` exclusion of any campaign, or the frequency cap's window if longer."""
    longest_exclusion = max((c.exclusions.sent_within_days for c in cfg.campaigns.values()), default=0)
    cap_window_us = round(cfg.serving.frequency_cap.window_hours * 3600 * _MICROS)
    return max(round(longest_exclusion * 86400 * _MICROS), cap_window_us)


@dataclass(frozen=True)
class ServeSpec:
    """Everything the hot path needs, as plain values (pickled into the serving closure)."""

    store: OnlineStoreConfig
    sources: LookupSources
    renderer: PayloadRenderer
    campaigns: tuple[tuple[str, CampaignConfig], ...]  # the trigger campaigns
    channel_topics: tuple[tuple[str, str], ...]
    sent_topic: str
    dead_letter_topic: str
    recent_items: int
    max_trigger_age_us: int
    answered_ttl_ms: int
    profile_ttl_ms: int
    sends_keep_us: int
    cap_max_payloads: int
    cap_window_us: int
    max_payload_bytes: int
    # The erased users' hash key (carousel.erasure.hash_key, read once by the driver); None: no
    # erased user is dropped. Not in the repr: it is a secret.
    erasure_key: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, cfg: CarouselConfig, renderer: PayloadRenderer, erasure_key: str | None = None) -> ServeSpec:
        serving = cfg.serving
        campaigns = tuple(
            (name, c) for name, c in sorted(cfg.campaigns.items()) if c.enabled and c.trigger_event_types
        )
        cap_window_us = round(serving.frequency_cap.window_hours * 3600 * _MICROS)
        return cls(
            store=cfg.online_store,
            sources=LookupSources.of(cfg, campaigns),
            renderer=renderer,
            campaigns=campaigns,
            channel_topics=tuple((name, t.name) for name, t in cfg.kafka.topics.items()),
            sent_topic=cfg.kafka.topic("sent").name,
            dead_letter_topic=cfg.kafka.topic("dead_letter").name,
            recent_items=cfg.profiles.recent_items,
            max_trigger_age_us=round(serving.max_trigger_age_seconds * _MICROS),
            # A trigger older than max_trigger_age is skipped as stale anyway (a retry or a replay
            # carries the same event time), so its answer need not outlive that, plus a margin for
            # clock skew: bounds the answers' memory to a few minutes of traffic.
            answered_ttl_ms=round(
                min(serving.answered_ttl_hours * 3600, serving.max_trigger_age_seconds + ANSWER_TTL_MARGIN_S)
                * 1000
            ),
            profile_ttl_ms=round(cfg.online_store.profile_ttl_days * 86400 * 1000),
            sends_keep_us=sends_keep_micros(cfg),
            cap_max_payloads=serving.frequency_cap.max_payloads,
            cap_window_us=cap_window_us,
            max_payload_bytes=serving.max_payload_bytes,
            erasure_key=erasure_key,
        )

    # Derived once per worker (cached on first use), not per trigger or payload.
    @cached_property
    def trigger_types(self) -> frozenset[str]:
        return frozenset(t for _, c in self.campaigns for t in c.trigger_event_types)

    def campaigns_for(self, event_type: str) -> list[tuple[str, CampaignConfig]]:
        return [(name, c) for name, c in self.campaigns if event_type in c.trigger_event_types]

    @cached_property
    def _topics(self) -> dict[str, str]:
        return dict(self.channel_topics)

    def topic(self, channel: str) -> str:
        return self._topics[channel]


class _Batch:
    """The output and counts of one Arrow batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []  # (topic, key, value, payload id)
        self.counts: Counter[str] = Counter()

    def emit(self, topic: str, key: str, value: str, payload_id: str) -> None:
        self.rows.append((topic, key, value, payload_id))


# ---------------------------------------------------------------------------------------------
# One trigger
# ---------------------------------------------------------------------------------------------
def rank_campaign(
    trigger: Mapping[str, Any],
    state: UserState,
    campaign_name: str,
    campaign: CampaignConfig,
    lookups: ServingLookups,
    now_us: int,
    control_fallback: bool = False,
    limit: int | None = None,
) -> dict[str, Any] | None:
    """The outbox record answering ``trigger`` for one campaign (None: no eligible item).

    A control-group user gets an outbox record without items (a hold-out), or, with
    ``control_fallback`` (the API: a widget shows something), the campaign's fallback items.
    ``limit`` keeps the first that many ranked items."""
    user = trigger["user_id"]
    variant = assign_variant(campaign_name, campaign, user)
    record: dict[str, Any] = {
        "payload_id": trigger_payload_id(trigger["event_id"], campaign_name, campaign.channel),
        "user_id": user,
        "campaign": campaign_name,
        "channel": campaign.channel,
        "variant": variant,
        "trigger_event_id": trigger["event_id"],
        "trigger_event_type": trigger["event_type"],
        "run_id": None,
        "sent_at": micros_to_iso(now_us),
        "model_version": None,
        "items": [],
    }
    control = variant == CONTROL_VARIANT
    if control and not control_fallback:
        return record
    arm = lookups.arm(campaign_name, DEFAULT_VARIANT if control else variant)
    request = {
        "request_id": record["payload_id"],
        "user_id": user,
        "requested_at": trigger["event_time"],
        "trigger_item_id": trigger.get("item_id"),
        "recent_views": state.profile.recent("views"),
        "recent_purchases": state.profile.recent("purchases"),
        "sends": state.sent_since(trigger["event_time"] - arm.rules.sent_within_us)
        if arm.rules.sent_within_us
        else (),
    }
    if arm.rules.segments:  # a cold user's trending segment: their attributes and platform
        context = state.profile.user_context(trigger.get("platform"))
        request["user_attributes"] = context
        request["platform"] = context["platform"]
    ranked = rank_request(request, arm.lists, arm.fallback, arm.rules, arm.use_model and not control)
    if limit is not None:
        ranked = ranked[:limit]
    if not ranked:
        return None
    record["items"] = [
        {"item_id": item, "rank": rank, "score": score, "strategy": strategy, "model_version": version}
        for item, rank, score, strategy, version in ranked
    ]
    record["model_version"] = newest_model_version(i["model_version"] for i in record["items"])
    return record


def iso_to_micros(text: str) -> int:
    """:func:`micros_to_iso` back: epoch microseconds of an ISO-8601 UTC time."""
    delta = datetime.fromisoformat(text.replace("Z", "+00:00")) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * _MICROS + delta.microseconds


def render_request(record: Mapping[str, Any], template: str, user: Mapping[str, Any]) -> dict[str, Any]:
    """The render request (``PAYLOAD_REQUEST_SCHEMA`` shape) of one outbox record, its items with
    the ranking's fields only: render it with the lookups' catalog
    (``render_payload(request, renderer, lookups.catalog_items)``)."""
    sent_at = datetime.fromisoformat(record["sent_at"].replace("Z", "+00:00"))
    return {
        **{k: record[k] for k in ("payload_id", "campaign", "channel", "variant", "user_id", "run_id")},
        "template": template,
        "trigger_event_id": record["trigger_event_id"],
        "trigger_event_type": record["trigger_event_type"],
        "model_version": record["model_version"],
        "created_at": sent_at,
        "user": user,
        "items": record["items"],
    }


def dead_letter(
    user_id: str,
    payload_id: str,
    record: Mapping[str, Any],
    reason: str,
    failed_at_us: int,
    outbox_record: str | None = None,
) -> str:
    """A payload's dead letter (``kafka.topics.dead_letter``), JSON: its id, user, campaign,
    channel, trigger and items (from its outbox ``record``, None where it lacks them), the reason
    and when; ``outbox_record`` (the record as stored) is carried along to replay by hand.

    The one shape of every dead letter: serve's unrenderable payloads and the API's outbox records
    too old to be recorded."""
    items = record.get("items")
    letter: dict[str, Any] = {
        "payload_id": payload_id,
        "campaign": record.get("campaign"),
        "channel": record.get("channel"),
        "user_id": user_id,
        "trigger_event_id": record.get("trigger_event_id"),
        "items": [i.get("item_id") for i in items if isinstance(i, dict)] if isinstance(items, list) else [],
        "reason": reason,
        "failed_at": micros_to_iso(failed_at_us),
    }
    if outbox_record is not None:
        letter["outbox_record"] = outbox_record
    return compact_json(letter)


def deliver(
    record: Mapping[str, Any],
    trigger: Mapping[str, Any],
    state: UserState,
    lookups: ServingLookups,
    spec: ServeSpec,
    out: _Batch,
) -> None:
    """Emit one answer: the payload and its outbox record, or the dead letter; control: outbox only."""
    user, payload_id = record["user_id"], record["payload_id"]
    outbox = compact_json(record)
    if record["variant"] == CONTROL_VARIANT:
        out.emit(spec.sent_topic, user, outbox, payload_id)
        out.counts["control"] += 1
        return
    campaign = spec.sources.campaign(record["campaign"])
    try:
        request = render_request(
            record, campaign.template, state.profile.user_context(trigger.get("platform"))
        )
        value = payload_json(render_payload(request, spec.renderer, lookups.catalog_items))
        size = len(value.encode()) + len(user.encode())
        if size > spec.max_payload_bytes:
            raise PayloadError(
                f"payload {payload_id!r} is {size} bytes, more than serving.max_payload_bytes "
                f"({spec.max_payload_bytes})"
            )
    except (PayloadError, ValueError) as err:
        letter = dead_letter(user, payload_id, record, str(err), time.time_ns() // 1000)
        out.emit(spec.dead_letter_topic, user, letter, payload_id)
        out.counts["dead_letter"] += 1
        return
    out.emit(spec.topic(record["channel"]), user, value, payload_id)
    out.emit(spec.sent_topic, user, outbox, payload_id)
    out.counts["payloads"] += 1
    sent_us = iso_to_micros(record["sent_at"])
    state.record_send(payload_id, record["campaign"], [i["item_id"] for i in record["items"]], sent_us)


# ---------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------
def answer_records(
    records: Sequence[Mapping[str, Any]],
    store: OnlineState,
    lookups: ServingLookups,
    spec: ServeSpec,
    now_us: int,
) -> _Batch:
    """Apply the batch's events and answer its triggers (see the module docstring).

    ``records`` (in offset order per partition): ``partition, offset, invalid_reason`` (None when
    valid) and the event's ``event_id, user_id, event_type, item_id, event_time`` (micros),
    ``platform`` and ``user_attributes``.
    """
    out = _Batch()
    out.counts["records"] = len(records)
    valid = [r for r in records if r["invalid_reason"] is None]
    out.counts["skipped_invalid"] = len(records) - len(valid)
    trigger_types = spec.trigger_types
    users = list(dict.fromkeys(r["user_id"] for r in valid))
    triggers = list(
        dict.fromkeys((r["user_id"], r["event_id"]) for r in valid if r["event_type"] in trigger_types)
    )
    states, answered = store.read(users, triggers)
    applied: dict[str, list[Mapping[str, Any]]] = {}
    new_answers: dict[tuple[str, str], Answer] = {}
    cap_since = now_us - spec.cap_window_us
    for record in valid:
        user = record["user_id"]
        state = states[user]
        if state.profile.apply(record, spec.recent_items):
            state.changed = True
            out.counts["events_applied"] += 1
        applied.setdefault(user, []).append(record)
        if record["event_type"] not in trigger_types:
            continue
        out.counts["triggers"] += 1
        key = (user, record["event_id"])
        prior = answered.get(key) or new_answers.get(key)
        if prior is not None:
            if (prior.partition, prior.offset) == (
                record["partition"],
                record["offset"],
            ) and key not in new_answers:
                for outbox in prior.outbox:  # a replayed batch: the same answer again
                    deliver(outbox, record, state, lookups, spec, out)
                out.counts["replayed"] += 1
            else:
                out.counts["skipped_duplicate"] += 1
            continue
        if now_us - record["event_time"] > spec.max_trigger_age_us:
            out.counts["skipped_stale"] += 1
            continue
        if spec.cap_max_payloads and state.payloads_since(cap_since) >= spec.cap_max_payloads:
            out.counts["skipped_frequency_cap"] += 1
            continue
        answers = []
        for name, campaign in spec.campaigns_for(record["event_type"]):
            outbox = rank_campaign(record, state, name, campaign, lookups, now_us)
            if outbox is None:
                out.counts["no_items"] += 1
                continue
            answers.append(outbox)
            deliver(outbox, record, state, lookups, spec, out)
        new_answers[key] = Answer(record["partition"], record["offset"], tuple(answers))
    for state in states.values():
        state.prune_sends(now_us - spec.sends_keep_us)
    out.counts["store_conflicts"] += write_back(
        store, states, applied, new_answers, spec.recent_items, now_us - spec.sends_keep_us
    )
    if new_answers and _fault_countdown[0] > 0:
        _fault_countdown[0] -= 1
        if _fault_countdown[0] == 0:
            kill_job("after writing a batch's answers to the online store")
    return out


def write_back(
    store: OnlineState,
    states: Mapping[str, UserState],
    applied: Mapping[str, Sequence[Mapping[str, Any]]],
    answers: Mapping[tuple[str, str], Answer],
    recent_items: int,
    keep_sends_since_us: int,
) -> int:
    """Write the states and answers back; users changed meanwhile by another writer are re-read,
    their ``applied`` events and sends re-applied (both idempotent), and written again.

    Returns how many compare-and-set conflicts were retried (serve and the API count them)."""
    conflicts = store.write(states.values(), answers)
    return retry_conflicts(store, conflicts, states, applied, recent_items, keep_sends_since_us)


def retry_conflicts(
    store: OnlineState,
    conflicts: Sequence[str],
    states: Mapping[str, UserState],
    applied: Mapping[str, Sequence[Mapping[str, Any]]],
    recent_items: int,
    keep_sends_since_us: int,
) -> int:
    """:func:`write_back` for the ``conflicts`` (users whose write lost the compare-and-set, or
    was never sent against a version known to be stale): re-read, re-apply, write, up to 10 times.

    Returns how many compare-and-set conflicts were retried."""
    retried = 0
    for _attempt in range(10):
        if not conflicts:
            return retried
        retried += len(conflicts)
        fresh, _ = store.read(conflicts)
        for user, state in fresh.items():
            for event in applied.get(user, ()):
                state.profile.apply(event, recent_items)
            state.merge_sends(states[user].sends)
            state.prune_sends(keep_sends_since_us)
            state.changed = True
        conflicts = store.write(fresh.values())
    raise RuntimeError(f"online store: users {conflicts[:5]} kept changing under concurrent writes; retried")


def output_batch(out: _Batch) -> pa.RecordBatch:
    rows, counts = out.rows, {name: n for name, n in out.counts.items() if n}
    size = len(rows) + len(counts)
    return (
        pa.RecordBatch.from_pydict(
            {
                "kind": ["record"] * len(rows) + ["count"] * len(counts),
                "topic": [r[0] for r in rows] + [None] * len(counts),
                "key": [r[1] for r in rows] + [None] * len(counts),
                "value": [r[2] for r in rows] + [None] * len(counts),
                "payload_id": [r[3] for r in rows] + [None] * len(counts),
                "reason": [None] * len(rows) + list(counts),
                "n": [None] * len(rows) + list(counts.values()),
            },
            schema=OUTPUT_SCHEMA,
        )
        if size
        else pa.RecordBatch.from_pylist([], schema=OUTPUT_SCHEMA)
    )


def answer_batches(batches: Iterator[pa.RecordBatch], spec: ServeSpec) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: one online-store round trip each way per Arrow batch."""
    store = OnlineState(connect(spec.store), spec.store.key_prefix, spec.profile_ttl_ms, spec.answered_ttl_ms)
    for batch in batches:
        if not batch.num_rows:
            continue
        lookups = current_lookups(spec.sources)  # before the batch's rows exist (keep_out_of_gc)
        # Once, before anything reads the events: an erased user's events still in the topic
        # neither update their profile nor trigger a payload or an outbox record.
        kept, erased = drop_erased_rows(batch, lookups.erased, spec.erasure_key)
        out = (
            answer_records(batch_rows(kept), store, lookups, spec, time.time_ns() // 1000)
            if kept.num_rows
            else _Batch()
        )
        out.counts["records"] += erased
        out.counts["skipped_erased"] += erased
        yield output_batch(out)
