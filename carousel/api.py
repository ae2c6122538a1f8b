"""The recommendations API: in-app and web widgets ask for a user's carousel over HTTP.

Role: the request path beside ``serve``'s Kafka path. An app opening a screen, or a web page
rendering a widget, asks and gets the campaign channel's payload back while the screen opens.
Each request is ranked by the one ranking function that ``serve`` and ``campaign`` use
(:func:`carousel.realtime.rank_campaign` -> :func:`carousel.ranking.rank_request`), against the
same state: the user's online profile and recent sends from the online store, and the matrix,
catalog and trending as in-memory lookups refreshed by Delta version (:mod:`carousel.lookups`).

Inputs: the online store (``online_store``), the Delta tables ``catalog``,
``item_recommendations`` and ``trending_items`` (read with delta-rs), ``campaigns`` and ``api``
in ``conf/``; API keys from the environment variables that ``api.keys`` names.
Outputs: HTTP answers (the payload contract of ``conf/payload_schemas/``, with the same
deterministic payload ids), and one outbox record per answer on ``kafka.topics.sent``, which
``record-sends`` writes into ``sent_recommendations``: exclusions, reports and A/B assignment
work the same for API traffic as for ``serve``. By default (``api.record_outbox``:
online_store) the record is stored in the online store with the user's sends, in the same
round trip, and relayed to the broker after the answer (a transactional outbox: the answer
never waits for the broker, and is not given unless its record is stored).

Endpoints (OpenAPI at ``/openapi.json``, browsable at ``/docs``):

* ``GET /v1/users/{user_id}/recommendations?campaign=NAME[&item_id=ID][&n=N]`` - the user's
  payload for the campaign (``item_id``: the product on screen seeds the list and is excluded;
  ``n``: at most this many items, up to the campaign's ``items``). ``X-Request-Id`` (optional)
  names the request: the same id again gets the same answer (payload id and items) and is
  recorded once. 204 when no item is eligible. A control-group user gets the campaign's
  fallback, recorded as a control hold-out.
* ``GET /v1/items/{item_id}/similar?n=N[&campaign=NAME]`` - the item's published list, cut to
  the products the catalog offers (the campaign's filters, else in stock and active).
* ``GET /healthz`` (the process answers), ``GET /readyz`` (its lookups are loaded),
  ``GET /metrics`` (Prometheus, summed over the workers).

Every ``/v1`` request needs an ``X-API-Key`` header holding one of the configured keys; each key
has a rate limit per second, counted in the online store so it holds across workers and
instances. Errors are JSON ``{"error": code, "reason": text}`` with a 4xx status (401, 404, 422,
429) or 503 (not ready, store or broker unavailable); never a traceback.

    CAROUSEL_API_KEY=... ./spark-submit.sh api [--port 8780] [--workers 2] [--set api.keys...]

With several workers each listens on its own SO_REUSEPORT socket, so the kernel spreads
connections over them (:class:`ReusePortWorkers`); a worker that dies, or whose event loop
stops for ``api.worker_timeout_seconds``, is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import gc
import hmac
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from confluent_kafka import KafkaException, Producer
from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from uvicorn.config import STARTUP_FAILURE

from carousel.broker import BrokerError, wait_until_reachable
from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CampaignFilters, CarouselConfig, load_config
from carousel.fastjson import compact_json
from carousel.lookups import LookupSources, ServingLookupError, ServingLookups, current_lookups
from carousel.online_state import Answer, OnlineState, OutboxEntry, StateRequest, UserState
from carousel.online_store import STORE_ERRORS, OnlineStoreError, check_reachable, connect
from carousel.payloads import PayloadError, PayloadRenderer, TemplateCheckError, check_templates, payload_json
from carousel.payloads import render_payload as render_channel_payload
from carousel.ranking import RankingRules, newest_model_version
from carousel.realtime import (
    dead_letter,
    rank_campaign,
    render_request,
    retry_conflicts,
    sends_keep_micros,
)
from carousel.schemas import (
    CONTROL_VARIANT,
    PAYLOAD_ID_HEADER,
)

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-Id"
# What an API answer's payload and outbox record carry as the trigger's event type.
API_TRIGGER_TYPE = "API Request"
# The configuration of the worker processes (uvicorn starts them by importing create_app).
ARGS_ENV = "CAROUSEL_API_ARGS"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The recommendations endpoint's parameters, declared once: the FastAPI route documents them
# (OpenAPI) and :func:`recommendation_request` checks them, with FastAPI's wording.
USER_ID_MAX, CAMPAIGN_MAX, ITEM_ID_MAX, N_MAX = 256, 128, 256, 50
_RECOMMENDATIONS_PATH = re.compile(r"^/v1/users/([^/]+)/recommendations$")
_INTEGER = TypeAdapter(int)
_MICROS = 1_000_000
_WINDOW_MS = 2000  # a rate-limit window's counter outlives its second, then expires
_FORGET_SECONDS = 0.05  # relayed outbox entries are deleted from the store in batches this often
_SWEEP_PAGE = 200  # outbox entries read per round trip by the sweep
_SWEEP_BATCH = 2000  # entries a sweep looks at before it yields to the requests
_SWEEP_AGAIN_SECONDS = 0.05  # the next sweep, when the last one left entries over
_WARN_EVERY_SECONDS = 10.0
_FORGET_PER_WRITE = 1000  # acknowledged outbox entries deleted with one write, at most
_FORGET_RETRY_SECONDS = 1.0  # a failed delete of relayed outbox entries is tried again after this
_SWEEPER_SUFFIX = ":sweeper"  # the lease of the worker sweeping the outbox stream
# An outbox entry this close to sent_log.dedupe_hours is dead-lettered, not relayed: record-sends
# reads it seconds to minutes later, by when it would be over the window.
_EXPIRY_MARGIN_SECONDS = 600
_LOOKUPS_CHECK_FLOOR_SECONDS = 0.1  # the lookups checker never spins, whatever refresh_seconds
# CPython's third collection threshold in a worker: a full collection walks every tracked object
# outside the frozen lookups (the caches of cleaned catalog fields and rendered blocks among them) and
# stops the event loop for 10-40 ms. With the default (10) one came every ~3 s at 1,000 requests/s,
# set off by the requests in flight that each collection promotes and that die just after; after
# 1,000 collections of the middle generation it comes every few tens of seconds, and cyclic
# garbage is still collected (bench/README.md "API").
_GC_FULL_AFTER = 1000


class ErrorBody(BaseModel):
    """Every error answer's body."""

    error: str
    reason: str


class ApiError(Exception):
    """An answer other than 200: the status, a short code and the reason (returned as JSON)."""

    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.headers = status, code, reason, headers or {}


# ---------------------------------------------------------------------------------------------
# The answer to one request (plain Python: what the HTTP handlers call)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiSpec:
    """Everything an API worker answers with, as plain values."""

    sources: LookupSources
    renderer: PayloadRenderer
    sent_topic: str
    dead_letter_topic: str
    recent_items: int
    sends_keep_us: int
    similar_filters: CampaignFilters
    slots: Mapping[str, int]  # per enabled campaign: how many items it ranks

    @classmethod
    def of(cls, cfg: CarouselConfig, renderer: PayloadRenderer) -> ApiSpec:
        enabled = tuple((name, c) for name, c in sorted(cfg.campaigns.items()) if c.enabled)
        return cls(
            sources=LookupSources.of(cfg, enabled),
            renderer=renderer,
            sent_topic=cfg.kafka.topic("sent").name,
            dead_letter_topic=cfg.kafka.topic("dead_letter").name,
            recent_items=cfg.profiles.recent_items,
            sends_keep_us=sends_keep_micros(cfg),
            similar_filters=CampaignFilters(),
            slots={name: RankingRules.of(c, cfg.serving).slots for name, c in enabled},
        )

    def campaign_slots(self, name: str) -> int:
        """How many items the campaign ranks (its ``items``; push: at most ``push_max_items``)."""
        self.campaign(name)  # 404 for a campaign that is not enabled
        return self.slots[name]

    def campaign(self, name: str) -> Any:
        try:
            return self.sources.campaign(name)
        except KeyError:
            known = [n for n, _ in self.sources.campaigns]
            raise ApiError(
                404, "unknown_campaign", f"no enabled campaign {name!r}; enabled: {known}"
            ) from None


@dataclass(frozen=True)
class RecommendationRequest:
    user_id: str
    campaign: str
    request_id: str
    item_id: str | None = None
    n: int | None = None
    # The client named the request (X-Request-Id): its answer is kept for a retry. A random id
    # can never come again, so nothing is kept for it (one online-store key less per answer).
    replayable: bool = True


@dataclass(frozen=True)
class ApiAnswer:
    payload: str  # the channel payload, JSON
    payload_id: str
    outbox: str  # the outbox record, JSON (recs.sent -> sent_recommendations)
    variant: str
    replayed: bool  # the same request id was answered before: the same answer again
    # The outbox record's entry in the online store (api.record_outbox: online_store), relayed
    # to the broker by the worker; None when it is not kept there.
    outbox_entry: str | None = None


def _text_parameter(
    problems: list[str], where: str, value: str | None, max_length: int, required: bool
) -> str | None:
    if value is None:
        if required:
            problems.append(f"{where}: Field required")
        return None
    if not value:
        problems.append(f"{where}: String should have at least 1 character")
    elif len(value) > max_length:
        problems.append(f"{where}: String should have at most {max_length} characters")
    return value


def recommendation_request(
    user_id: str, campaign: str | None, item_id: str | None, n: str | None, request_id: str | None
) -> RecommendationRequest:
    """The recommendations endpoint's parameters, checked as FastAPI checks the route's (422 with
    every problem, in pydantic's words). A request without ``X-Request-Id`` gets a random one; a
    malformed one is refused by :func:`check_request_id`, after the key (as before)."""
    problems: list[str] = []
    _text_parameter(problems, "path user_id", user_id, USER_ID_MAX, required=True)
    _text_parameter(problems, "query campaign", campaign, CAMPAIGN_MAX, required=True)
    _text_parameter(problems, "query item_id", item_id, ITEM_ID_MAX, required=False)
    count = None
    if n is not None:
        try:
            count = _INTEGER.validate_python(n)  # pydantic's own parse: "4.0" yes, "4.5" no
        except ValidationError as err:
            problems.append(f"query n: {err.errors()[0]['msg']}")
        else:
            if count < 1:
                problems.append("query n: Input should be greater than or equal to 1")
            elif count > N_MAX:
                problems.append(f"query n: Input should be less than or equal to {N_MAX}")
    if problems:
        raise ApiError(422, "bad_parameter", "; ".join(problems))
    assert campaign is not None  # checked above
    return RecommendationRequest(
        user_id, campaign, request_id or uuid.uuid4().hex, item_id, count, replayable=request_id is not None
    )


def check_request_id(request: RecommendationRequest) -> None:
    """422 ``bad_request_id`` for an ``X-Request-Id`` the online store's keys cannot carry."""
    if request.replayable and not _REQUEST_ID.match(request.request_id):
        raise ApiError(
            422,
            "bad_request_id",
            f"{REQUEST_ID_HEADER} must be 1-128 of A-Z a-z 0-9 . _ : - (got {request.request_id!r})",
        )


def answer_key(request: RecommendationRequest) -> tuple[str, str]:
    """The online store's answered-trigger key of a request: (user, ``api:<campaign>:<id>``)."""
    return request.user_id, f"api:{request.campaign}:{request.request_id}"


async def recommend(
    request: RecommendationRequest,
    store: CoalescingStore,
    lookups: ServingLookups,
    spec: ApiSpec,
    now_us: int,
    rate_counter: str | None = None,
    admit: Callable[[int], None] | None = None,
    outbox_in_store: bool = False,
) -> ApiAnswer | None:
    """Rank, render and remember one request's answer (None: no eligible item).

    ``rate_counter`` is incremented in the same round trip as the user's state is read, and
    ``admit`` gets its new value (raising to refuse the request) before anything else happens.

    The answer is written to the online store before it is returned: the user's recent sends
    (so the sent-within exclusions of ``serve`` and later requests see it) and the answer under
    the request id (so a retry gets the same payload). Recording the outbox record is the
    caller's, after this returns; with ``outbox_in_store`` the record is written with the state
    (:class:`OutboxEntry`) and the caller relays it. The frequency cap is not applied: a widget
    the user opened is not an unsolicited message.
    """
    campaign = spec.campaign(request.campaign)
    slots = spec.campaign_slots(request.campaign)
    if request.n is not None and request.n > slots:
        raise ApiError(
            422, "bad_n", f"n={request.n} is more than campaign {request.campaign!r} ranks ({slots} items)"
        )
    user, key = request.user_id, answer_key(request)
    state, answered, count = await store.read(
        StateRequest(user, [key] if request.replayable else [], rate_counter)
    )
    if admit is not None:
        admit(count)
    prior = answered.get(key)
    if prior is not None:
        shown = dict(prior.outbox[0])
    else:
        trigger = {
            "user_id": user,
            "event_id": f"api:{request.request_id}",
            "event_type": API_TRIGGER_TYPE,
            "event_time": now_us,
            "item_id": request.item_id,
        }
        found = rank_campaign(
            trigger,
            state,
            request.campaign,
            campaign,
            lookups,
            now_us,
            control_fallback=True,
            limit=request.n,
        )
        if found is None:
            return None
        shown = found
    control = shown["variant"] == CONTROL_VARIANT
    try:
        context = state.profile.user_context()
        payload = payload_json(
            render_channel_payload(
                render_request(shown, campaign.template, context), spec.renderer, lookups.catalog_items
            )
        )
    except (PayloadError, ValueError) as err:
        raise ApiError(500, "render_failed", f"campaign {request.campaign!r}: {err}") from None
    # A control-group user is shown the fallback but recorded as a hold-out (no items), as serve
    # records control: the report compares the arms against users who got no recommendation.
    outbox = compact_json({**shown, "items": [], "model_version": None} if control else shown)
    entry_id = None
    if prior is None:
        if not control:
            items = [i["item_id"] for i in shown["items"]]
            state.record_send(shown["payload_id"], request.campaign, items, now_us)
        keep_since = now_us - spec.sends_keep_us
        state.prune_sends(keep_since)
        answers = {key: Answer(-1, -1, (shown,))} if request.replayable else {}
        entry = OutboxEntry(user, shown["payload_id"], outbox) if outbox_in_store else None
        entry_id = await store.write(state, answers, spec.recent_items, keep_since, entry)
    return ApiAnswer(
        payload=payload,
        payload_id=shown["payload_id"],
        outbox=outbox,
        variant=shown["variant"],
        replayed=prior is not None,
        outbox_entry=entry_id,
    )


class LoopTimer:
    """One call pending on an event loop at a time, scheduled on the loop that asks for it.

    A call left pending on another loop (a closed one: a test's earlier ``asyncio.run``) never
    runs: asking on a new loop schedules it there, whatever was pending on the old one."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._handle: asyncio.Handle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop of the last call scheduled

    @property
    def pending(self) -> bool:
        return self._handle is not None

    def schedule(self, loop: asyncio.AbstractEventLoop, delay: float | None = None) -> None:
        """Call it after ``delay`` seconds (None: at the loop's next turn), unless a call is
        already pending on ``loop``."""
        if self._handle is not None and self.loop is loop:
            return
        self.loop = loop
        self._handle = (
            loop.call_soon(self._run, loop) if delay is None else loop.call_later(delay, self._run, loop)
        )

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is self.loop:  # not a call left on an older loop that still runs
            self._handle = None
        self._callback()


@dataclass(eq=False)  # compared by identity
class _PendingWrite:
    state: UserState
    answers: Mapping[tuple[str, str], Answer]
    recent_items: int
    keep_sends_since_us: int
    outbox: OutboxEntry | None
    done: asyncio.Future[str | None]  # the outbox entry's id


class CoalescingStore:
    """A worker's online-store round trips, coalesced over the requests it has in flight.

    Each request awaits its read (and later its write); the first one queued schedules a flush on
    the event loop, which runs once the requests ready before it have queued theirs. Every read
    queued by then goes out in one pipelined round trip (:meth:`OnlineState.read_each`), every
    write in one compare-and-set round trip (:meth:`OnlineState.write_with_outbox`, with the
    answers' outbox entries). At low load that is one
    round trip per request, as before; when requests pile up (a burst, a slow Redis) they share
    one, so the time the loop spends blocked on Redis and in redis-py per request falls as the
    load rises instead of compounding the queue (measured: bench/README.md "API").

    A user asked for twice in one flush gets two states. Only the first is written with the flush;
    the second, whose version is then stale, takes :func:`carousel.realtime.retry_conflicts`'s
    path: re-read, merge the sends (idempotent), write again, as after a concurrent writer. Two
    such requests rank without seeing each other's send, as two requests on two workers could.
    """

    def __init__(self, state: OnlineState, counter_ttl_ms: int) -> None:
        self.state = state
        self.counter_ttl_ms = counter_ttl_ms
        self._reads: list[tuple[StateRequest, asyncio.Future[Any]]] = []
        self._writes: list[_PendingWrite] = []
        self._read_flush = LoopTimer(self._flush_reads)
        self._write_flush = LoopTimer(self._flush_writes)
        # Outbox entries the broker has acknowledged (api.record_outbox: online_store): deleted
        # from the store with the next write's round trip, or by the service's timer if none comes.
        self.acknowledged: list[str] = []

    def take_acknowledged(self, limit: int | None = None) -> list[str]:
        """The acknowledged entries to delete now (the oldest ``limit``; all without), no longer listed."""
        taken = self.acknowledged[:limit]
        self.acknowledged = self.acknowledged[len(taken) :]
        return taken

    def give_back_acknowledged(self, ids: list[str]) -> None:
        """List again, first, entries taken whose delete failed: deleted later (the sweep skips them)."""
        self.acknowledged = ids + self.acknowledged

    @property
    def prefix(self) -> str:
        return self.state.prefix

    def _on_loop(self, flush: LoopTimer, queue: list[Any]) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if flush.loop is not loop:  # queued on another loop: nobody there waits any more
            queue.clear()
        flush.schedule(loop)
        return loop

    async def read(self, request: StateRequest) -> tuple[UserState, dict[tuple[str, str], Answer], int]:
        """The request's state, the answers to its triggers and its counter's new value."""
        loop = self._on_loop(self._read_flush, self._reads)
        future: asyncio.Future[Any] = loop.create_future()
        self._reads.append((request, future))
        return await future

    async def write(
        self,
        state: UserState,
        answers: Mapping[tuple[str, str], Answer],
        recent_items: int,
        keep_sends_since_us: int,
        outbox: OutboxEntry | None = None,
    ) -> str | None:
        """Write the state (when changed), the answers and the outbox entry; returns once they are
        stored, with the outbox entry's id (None without one)."""
        loop = self._on_loop(self._write_flush, self._writes)
        pending = _PendingWrite(
            state, answers, recent_items, keep_sends_since_us, outbox, loop.create_future()
        )
        self._writes.append(pending)
        return await pending.done

    def _flush_reads(self) -> None:
        batch, self._reads = self._reads, []
        try:
            results = self.state.read_each([request for request, _ in batch], self.counter_ttl_ms)
        except Exception as err:  # noqa: BLE001 - every waiting request gets the store's error
            for _, future in batch:
                _fail(future, err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):  # this request's stored values cannot be read
                _fail(future, result)
            elif not future.done():  # a request cancelled meanwhile no longer waits
                future.set_result(result)

    def _flush_writes(self) -> None:
        batch, self._writes = self._writes, []
        first: list[_PendingWrite] = []
        again: set[_PendingWrite] = set()
        seen: set[str] = set()
        for pending in batch:
            if pending.state.user_id in seen:
                again.add(pending)
            else:
                first.append(pending)
                seen.add(pending.state.user_id)
        answers = {key: answer for pending in batch for key, answer in pending.answers.items()}
        with_outbox = [pending for pending in batch if pending.outbox is not None]
        # The relayed entries the broker acknowledged ride along (no round trip of their own);
        # a backlog (after a store outage) goes a bounded share at a time, the timer takes the rest.
        forget = self.take_acknowledged(_FORGET_PER_WRITE)
        try:
            found, ids = self.state.write_with_outbox(
                [pending.state for pending in first],
                answers,
                [p.outbox for p in with_outbox if p.outbox],
                forget,
            )
        except Exception as err:  # noqa: BLE001 - every waiting request gets the store's error
            self.give_back_acknowledged(forget)
            for pending in batch:
                _fail(pending.done, err)
            return
        conflicts = set(found)
        entry_ids = dict(zip(with_outbox, ids, strict=True))  # _PendingWrite hashes by identity
        for pending in batch:
            if pending in again or pending.state.user_id in conflicts:
                # Its version is stale (the first write of the user bumped it, or another
                # writer did): straight to the re-read and merge, no write known to fail.
                try:
                    retry_conflicts(
                        self.state,
                        [pending.state.user_id],
                        {pending.state.user_id: pending.state},
                        {},
                        pending.recent_items,
                        pending.keep_sends_since_us,
                    )
                except Exception as err:  # noqa: BLE001 - this request's error
                    _fail(pending.done, err)
                    continue
            if not pending.done.done():
                pending.done.set_result(entry_ids.get(pending))


def outbox_entry_time_ms(entry_id: str) -> int:
    """When an outbox entry was stored: its stream id's first part (the Redis server's clock at the
    XADD, in Unix milliseconds)."""
    return int(entry_id.split("-", 1)[0])


def expired_outbox_letter(entry: OutboxEntry, reason: str, failed_at_us: int) -> str:
    """The dead letter of an outbox record too old to be recorded (:func:`dead_letter`, with the
    record itself to replay by hand); of a record that is not a JSON object, only the ids are known."""
    try:
        record = json.loads(entry.record)
    except ValueError:
        record = None
    fields: Mapping[str, Any] = record if isinstance(record, dict) else {}
    return dead_letter(entry.user_id, entry.payload_id, fields, reason, failed_at_us, entry.record)


def _fail(future: asyncio.Future[Any], err: Exception) -> None:
    if not future.done():
        future.set_exception(err)


def similar_items(item_id: str, n: int, lookups: ServingLookups, filters: CampaignFilters) -> dict[str, Any]:
    """The item's published list cut to the products ``filters`` admit, with their catalog fields."""
    lists = lookups.lists(filters)
    code = lists.index.get(item_id)
    if code is None:
        raise ApiError(404, "unknown_item", f"no product {item_id!r} in the catalog")
    candidates = lists.candidates(code)[:n]
    return {
        "item_id": item_id,
        "model_version": newest_model_version(version for _, _, version in candidates),
        "items": [
            {"item_id": item, "rank": rank, "score": score, **lookups.item_fields(item)}
            for rank, (item, score, _) in enumerate(candidates, start=1)
        ],
    }


# ---------------------------------------------------------------------------------------------
# One worker's service: store, lookups, outbox producer, keys
# ---------------------------------------------------------------------------------------------
class ApiService:
    """What one API worker process holds (built by :func:`create_app`)."""

    def __init__(self, cfg: CarouselConfig) -> None:
        self.cfg = cfg
        self.spec = ApiSpec.of(cfg, PayloadRenderer.from_config(cfg))
        serving = cfg.serving
        self.store = CoalescingStore(
            OnlineState(
                connect(cfg.online_store),
                cfg.online_store.key_prefix,
                round(cfg.online_store.profile_ttl_days * 86400 * 1000),
                round(serving.answered_ttl_hours * 3600 * 1000),
            ),
            _WINDOW_MS,
        )
        self.secrets = cfg.api.secrets()
        self.limits = {name: key.requests_per_second for name, key in cfg.api.keys.items()}
        self.ready = threading.Event()
        self.not_ready = "the lookups (catalog, matrix, trending) are loading"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.producer: Any = None
        self._delivery_poll = LoopTimer(self._poll_deliveries)
        # api.record_outbox: online_store. Entries the broker acknowledged (store.acknowledged) go
        # with the next write's round trip, or in one of their own after _FORGET_SECONDS when no
        # write came; entries being re-sent by the sweep.
        self._forget = LoopTimer(self._forget_acknowledged)
        self._in_flight: dict[str, int] = {}  # entry id -> its copies on their way to the broker
        self._sweep_cursor: str | None = None  # where a sweep that left entries over goes on
        # The lookups requests use: swapped by the loader thread once a new version's
        # similar-items index is built (a reference assignment: atomic).
        self._lookups: ServingLookups | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._sweeper = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.outbox_full: str | None = None  # why answers are refused (api.outbox_max_entries)
        self._warned_at = -float("inf")  # relay warnings: at most one per _WARN_EVERY_SECONDS
        self._unwarned = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.producer = Producer(
            {
                **self.cfg.kafka.client_settings(),
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": self.cfg.api.linger_ms,
                # With broker_ack an answer waits for its record's acknowledgement: a small produce
                # request must not wait for the broker's ACK of the one before (Nagle's algorithm).
                "socket.nagle.disable": True,
                "compression.type": self.cfg.kafka.producer.compression_type,
                # online_store: a record's delivery report comes before the sweep would send it
                # again (librdkafka's default waits 300 s), so a slow broker is not sent
                # every record twice.
                **(
                    {"message.timeout.ms": max(round(self.cfg.api.outbox_orphan_seconds * 500), 1000)}
                    if self.cfg.api.record_outbox == "online_store"
                    else {}
                ),
            }
        )
        thread = threading.Thread(target=self._load_lookups, name="api-lookups", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        self._delivery_poll.cancel()
        self._forget.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self.producer is not None:
            left = self.producer.flush(self.cfg.api.record_timeout_ms / 1000)
            if left:
                log.warning("api: %d outbox records were not acknowledged at shutdown", left)
        self._forget_acknowledged()  # what the flush relayed leaves the store now
        try:  # the next worker sweeps at once, not after the lease expired
            self.store.state.release(self.store.state.outbox_key + _SWEEPER_SUFFIX, self._sweeper)
        except STORE_ERRORS as err:
            log.warning("api: the outbox sweeper lease was not released (it expires by itself): %s", err)

    def start_sweeping(self, loop: asyncio.AbstractEventLoop, delay: float | None = None) -> None:
        """Re-send, every third of ``api.outbox_orphan_seconds`` (or after ``delay``), the outbox
        entries left in the online store longer than that (stored with api.record_outbox:
        online_store)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        # In every mode: records a worker stored under online_store, before a switch to another
        # mode, are still relayed (the sweep costs one XLEN when the stream is empty).
        if not self._stopping.is_set():
            wait = self.cfg.api.outbox_orphan_seconds / 3 if delay is None else delay
            self._sweep = loop.call_later(wait, self._sweep_outbox, loop)

    def _load_lookups(self) -> None:
        """Load the lookups (retrying while a table is missing), report ready, then keep them fresh.

        The table versions are checked here, every ``serving.refresh_seconds``, and not on the
        event loop: on an object store each check is a listing round trip per table, which would
        stall every request in flight behind it. A later version is loaded by the reload thread
        of :func:`current_lookups`; requests get it from here once its similar-items index is
        built (:meth:`lookups`), so no request builds one on the event loop."""
        interval = max(self.spec.sources.refresh_seconds, _LOOKUPS_CHECK_FLOOR_SECONDS)
        while not self._stopping.is_set():
            try:
                lookups = current_lookups(self.spec.sources)
                lookups.lists(self.spec.similar_filters).warm()
            except (ServingLookupError, OSError) as err:
                self.not_ready = f"the lookups cannot be loaded yet: {err}"
                log.warning("api: %s (retrying)", self.not_ready)
                self._stopping.wait(max(self.spec.sources.refresh_seconds, 1.0))
                continue
            self._lookups = lookups
            self.ready.set()
            log.info("api: ready (lookups at versions %s)", lookups.versions)
            break
        while not self._stopping.wait(interval):
            try:
                fresh = current_lookups(self.spec.sources)
                fresh.lists(self.spec.similar_filters).warm()  # here, not by a request
            except Exception as err:  # noqa: BLE001 - any failure keeps what is held serving; next check
                log.warning("api: the lookups' tables cannot be checked (serving what is held): %s", err)
                continue
            if fresh is not self._lookups:
                log.info("api: lookups at versions %s", fresh.versions)
                self._lookups = fresh

    def _send(
        self,
        user_id: str,
        payload_id: str,
        record: str,
        on_delivery: Callable[[Any, Any], None],
        topic: str | None = None,
    ) -> None:
        """Queue one outbox record for ``kafka.topics.sent`` (or ``topic``; keyed by user, with the
        payload id header); raises BufferError or KafkaException when the producer cannot take it."""
        self.producer.produce(
            topic or self.spec.sent_topic,
            key=user_id.encode(),
            value=record.encode(),
            headers=[(PAYLOAD_ID_HEADER, payload_id.encode())],
            on_delivery=on_delivery,
        )

    def _produce(self, user_id: str, answer: ApiAnswer, on_delivery: Callable[[Any, Any], None]) -> None:
        try:
            self._send(user_id, answer.payload_id, answer.outbox, on_delivery)
        except (BufferError, KafkaException) as err:
            raise ApiError(503, "not_recorded", f"the outbox cannot take the answer: {err}") from None

    def _count_delivery(self, err: Any) -> None:
        _metrics().outbox_records.labels("failed" if err is not None else "acknowledged").inc()

    # -- the outbox kept in the online store (api.record_outbox: online_store) ---------------------
    def _warn(self, message: str, *args: Any) -> None:
        """A relay warning, at most one per ``_WARN_EVERY_SECONDS`` (a broker outage would
        otherwise log one per answer); the ones left out are counted in the next."""
        now = time.monotonic()
        if now - self._warned_at < _WARN_EVERY_SECONDS:
            self._unwarned += 1
            return
        skipped, self._unwarned, self._warned_at = self._unwarned, 0, now
        log.warning("api: " + message + (f" (and {skipped} more like it)" if skipped else ""), *args)

    def _relay(
        self, user_id: str, payload_id: str, record: str, entry_id: str, loop: Any, topic: str | None = None
    ) -> str:
        """Queue a stored outbox entry for the broker (the outbox topic, or ``topic``: its dead
        letter); once acknowledged it is deleted from the store. "queued"; "full" when the
        producer's queue is ("refused" when it refuses this record): the entry stays stored for
        the sweep."""

        def relayed(err: Any, _msg: Any) -> None:
            self._count_delivery(err)
            left = self._in_flight.get(entry_id, 1) - 1
            if left > 0:
                self._in_flight[entry_id] = left
            else:
                self._in_flight.pop(entry_id, None)
            if err is not None:  # still in the store: the sweep sends it again
                self._warn(
                    "outbox record of payload %r not relayed yet, kept for the sweep: %s", payload_id, err
                )
                return
            self.store.acknowledged.append(entry_id)
            if loop is not None and not loop.is_closed() and not self._stopping.is_set():
                self._forget.schedule(loop, _FORGET_SECONDS)

        try:
            self._send(user_id, payload_id, record, relayed, topic)
        except (BufferError, KafkaException) as err:
            self._warn(
                "outbox record of payload %r kept in the online store for the sweep: %s", payload_id, err
            )
            return "full" if isinstance(err, BufferError) else "refused"
        self._in_flight[entry_id] = self._in_flight.get(entry_id, 0) + 1
        return "queued"

    def _forget_acknowledged(self) -> None:
        """Delete the acknowledged entries that no write has taken along from the online store (one
        round trip; none when writes took them all)."""
        done = self.store.take_acknowledged()
        if not done:
            return
        try:
            self.store.state.forget_outbox(done)
        except STORE_ERRORS as err:  # kept, and tried again (the sweep skips them meanwhile)
            self.store.give_back_acknowledged(done)
            self._warn("%d relayed outbox entries not deleted from the online store yet: %s", len(done), err)
            loop = self._forget.loop
            if loop is not None and not loop.is_closed() and not self._stopping.is_set():
                self._forget.schedule(loop, _FORGET_RETRY_SECONDS)

    def _sweep_outbox(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-send the entries older than ``api.outbox_orphan_seconds``: their worker died before
        relaying them, or the broker refused them or was down.

        One worker at a time sweeps (a lease in the online store, renewed while it sweeps), paging
        through the stream past the entries still on their way; a full page sweeps again at once,
        so a backlog after an outage drains at the broker's pace. Each sweep also reads the
        stream's length: above ``api.outbox_max_entries`` answers are refused (503) until it
        falls, rather than filling the store that serve shares. A duplicate, as when the first
        relay is acknowledged just after the sweep sent it again, is dropped by record-sends.

        An entry older than ``sent_log.dedupe_hours`` (a broker down for longer than that) goes
        to ``kafka.topics.dead_letter`` instead, with the reason and the record: record-sends
        would drop it as later than its deduplication window, without a trace."""
        again: float | None = None
        try:
            state, api = self.store.state, self.cfg.api
            backlog = state.outbox_length()
            _metrics().outbox_backlog.set(backlog)
            full = backlog >= api.outbox_max_entries
            if full and self.outbox_full is None:
                log.error(
                    "api: %d outbox records wait for the broker (api.outbox_max_entries): refusing answers",
                    backlog,
                )
            elif not full and self.outbox_full is not None:
                log.warning("api: the outbox backlog is down to %d: answering again", backlog)
            limit = api.outbox_max_entries
            self.outbox_full = (
                f"{backlog} outbox records wait for the broker (limit {limit})" if full else None
            )
            lease_ms = round(api.outbox_orphan_seconds * 1000 / 3) + 1000
            if not backlog or not state.claim(state.outbox_key + _SWEEPER_SUFFIX, self._sweeper, lease_ms):
                return
            now_ms = state.server_time_ms()
            before_ms = now_ms - round(api.outbox_orphan_seconds * 1000)
            expired_before_ms = (
                now_ms - round(self.cfg.sent_log.dedupe_hours * 3_600_000) + _EXPIRY_MARGIN_SECONDS * 1000
            )
            # Relayed, acknowledged, not deleted yet: not to be sent again.
            settled = set(self.store.acknowledged)
            expired_reason = self._expired_reason()
            after, resent, expired, seen, producer_full = self._sweep_cursor, 0, 0, 0, False
            self._sweep_cursor = None
            while seen < _SWEEP_BATCH and not producer_full:
                page = state.outbox_older_than(before_ms, _SWEEP_PAGE, after)
                for entry_id, entry in page:
                    after, seen = entry_id, seen + 1
                    if entry is None:  # not an entry this service wrote: nothing to relay
                        log.error("api: outbox entry %s is not an outbox record; deleted", entry_id)
                        state.forget_outbox([entry_id])
                    elif entry_id not in self._in_flight and entry_id not in settled:
                        late = outbox_entry_time_ms(entry_id) < expired_before_ms
                        if late:
                            record = expired_outbox_letter(entry, expired_reason, now_ms * 1000)
                            topic = self.spec.dead_letter_topic
                        else:
                            record, topic = entry.record, None
                        outcome = self._relay(entry.user_id, entry.payload_id, record, entry_id, loop, topic)
                        if outcome == "full":  # the next sweep goes on from the oldest
                            producer_full = True
                            break
                        expired += late and outcome == "queued"
                        resent += not late and outcome == "queued"
                if len(page) < _SWEEP_PAGE:
                    break
            if resent:
                _metrics().outbox_records.labels("resent").inc(resent)
                log.warning("api: re-sending %d outbox records left in the online store", resent)
            if expired:
                _metrics().outbox_records.labels("dead_lettered").inc(expired)
                log.error(
                    "api: %d outbox records left in the online store are too old to record (%s): "
                    "queued for %s instead",
                    expired,
                    expired_reason,
                    self.spec.dead_letter_topic,
                )
            if resent or expired:
                self._watch_deliveries(loop)
            if seen >= _SWEEP_BATCH and not producer_full:
                # More left over: on at once from here (between the requests), not from the oldest
                # again, which may all still be on their way.
                self._sweep_cursor, again = after, _SWEEP_AGAIN_SECONDS
        except (*STORE_ERRORS, ValueError, KeyError) as err:  # tried again at the next sweep
            log.warning("api: the outbox sweep failed: %s", err)
        finally:
            self.start_sweeping(loop, again)

    def _expired_reason(self) -> str:
        hours = self.cfg.sent_log.dedupe_hours
        return (
            f"older than sent_log.dedupe_hours ({hours:g} h, less {_EXPIRY_MARGIN_SECONDS // 60} minutes): "
            "record-sends would drop it as later than its deduplication window"
        )

    def _delivered_in_background(self, err: Any, msg: Any) -> None:
        """An outbox record nobody waits for: a refusal is logged (the answer was already given)."""
        self._count_delivery(err)
        if err is not None:
            payload_id = dict(msg.headers() or ()).get(PAYLOAD_ID_HEADER, b"?")
            log.error("api: the outbox record of payload %r was not recorded: %s", payload_id, err)

    def _watch_deliveries(self, loop: asyncio.AbstractEventLoop) -> None:
        """Poll the producer on the event loop while it holds records (see :meth:`record`)."""
        self._delivery_poll.schedule(loop, self.cfg.api.poll_ms / 1000)

    def _poll_deliveries(self) -> None:
        loop = self._delivery_poll.loop
        try:
            self.producer.poll(0)  # runs the delivery callbacks that are due, here on the loop
        except Exception:  # a callback raised: logged; the other records are still watched
            log.exception("api: a delivery report of the outbox could not be handled")
        finally:
            if len(self.producer) and loop is not None:  # records queued, in flight or with callbacks
                self._watch_deliveries(loop)

    # -- per request -----------------------------------------------------------------------------
    def lookups(self) -> ServingLookups:
        held = self._lookups if self.ready.is_set() else None
        if held is None:
            raise ApiError(503, "not_ready", self.not_ready, {"Retry-After": "1"})
        return held

    def authorize(self, key: str | None) -> str:
        """The name of the API key presented (401 when none or an unknown one)."""
        if not key:
            raise ApiError(401, "unauthorized", f"missing {API_KEY_HEADER} header")
        name = next((n for n, secret in self.secrets.items() if hmac.compare_digest(secret, key)), None)
        if name is None:
            raise ApiError(401, "unauthorized", f"the {API_KEY_HEADER} header holds no configured API key")
        return name

    def rate_counter(self, name: str) -> str:
        """The online store's counter of key ``name`` in the current one-second window."""
        return f"{self.store.prefix}:api-rate:{name}:{int(time.time())}"

    def admit(self, name: str, count: int | None = None) -> None:
        """429 when key ``name`` is over its limit; ``count``: this window's count when the caller
        already incremented it (with its state read), else it is incremented here."""
        if count is None:
            count = self.store.state.count(self.rate_counter(name), _WINDOW_MS)
        limit = self.limits[name]
        if count > limit:
            raise ApiError(
                429,
                "rate_limited",
                f"API key {name!r} is over its limit of {limit:g} requests per second",
                {"Retry-After": "1"},
            )

    async def record(self, user_id: str, answer: ApiAnswer) -> None:
        """Put the answer's outbox record on the broker: with ``api.record_outbox`` online_store
        it was stored with the state and is relayed now (returns at once); broker_ack returns
        once the broker acknowledged it, background once it is queued.

        ``produce`` only queues the record; librdkafka sends it, and its delivery report runs in
        ``poll``. The worker polls on its own event loop, every ``api.outbox_poll_ms`` while
        records are outstanding and not at all when idle, so a report settles its request's
        future directly. A poll thread instead costs a GIL hand-off per report: up to the
        interpreter's 5 ms switch interval while the loop is busy, on the answer's latency."""
        loop = asyncio.get_running_loop()
        mode = self.cfg.api.record_outbox
        if mode == "online_store":
            # Stored with the state: recorded already. A replay's record was stored with the
            # original answer; relaying it again would only make a duplicate.
            if answer.outbox_entry is not None:
                self._relay(user_id, answer.payload_id, answer.outbox, answer.outbox_entry, loop)
                self._watch_deliveries(loop)
            return
        if mode == "background":
            self._produce(user_id, answer, self._delivered_in_background)
            self._watch_deliveries(loop)
            return
        acknowledged: asyncio.Future[Any] = loop.create_future()

        def delivered(err: Any, msg: Any) -> None:
            self._count_delivery(err)
            _settle(acknowledged, err)

        timeout = self.cfg.api.record_timeout_ms / 1000
        self._produce(user_id, answer, delivered)
        self._watch_deliveries(loop)
        try:
            err = await asyncio.wait_for(acknowledged, timeout)
        except TimeoutError:
            raise ApiError(
                503,
                "not_recorded",
                f"the broker did not acknowledge the outbox record within {timeout:g}s; retry with the "
                f"same {REQUEST_ID_HEADER} to get the same answer",
                {"Retry-After": "1"},
            ) from None
        if err is not None:
            raise ApiError(503, "not_recorded", f"the outbox record was refused: {err}", {"Retry-After": "1"})


def _settle(future: asyncio.Future[Any], err: Any) -> None:
    if not future.done():  # a request that timed out no longer waits
        future.set_result(err)


async def answer_recommendations(
    service: ApiService, metrics: _Metrics, request: RecommendationRequest, api_key: str | None
) -> tuple[int, bytes, dict[str, str]]:
    """The recommendations endpoint's answer: status, JSON body (empty for 204) and headers.

    Raises :class:`ApiError` for a refusal (401, 404, 422, 429, 503)."""
    name = service.authorize(api_key)
    check_request_id(request)
    if service.outbox_full is not None:  # api.record_outbox: online_store, the broker far behind
        raise ApiError(
            503, "not_recorded", f"answers cannot be recorded: {service.outbox_full}", {"Retry-After": "5"}
        )
    lookups = service.lookups()
    answer = await recommend(
        request,
        service.store,
        lookups,
        service.spec,
        time.time_ns() // 1000,
        service.rate_counter(name),
        partial(service.admit, name),
        outbox_in_store=service.cfg.api.record_outbox == "online_store",
    )
    if answer is None:
        metrics.answers.labels(request.campaign, "no_items").inc()
        return 204, b"", {REQUEST_ID_HEADER: request.request_id}
    await service.record(request.user_id, answer)
    outcome = (
        "replayed" if answer.replayed else ("control" if answer.variant == CONTROL_VARIANT else "answered")
    )
    metrics.answers.labels(request.campaign, outcome).inc()
    headers = {REQUEST_ID_HEADER: request.request_id, "X-Payload-Id": answer.payload_id}
    return 200, answer.payload.encode(), headers


def unexpected_error(method: str, path: str, err: Exception) -> tuple[int, dict[str, str]]:
    """An error nobody raised on purpose: logged with its traceback here; the client gets 503
    (the online store) or 500 and a reference, never the traceback."""
    reference = uuid.uuid4().hex[:12]
    log.error("api: %s %s failed (reference %s)", method, path, reference, exc_info=err)
    if isinstance(err, OnlineStoreError | ConnectionError | TimeoutError) or type(err).__module__.startswith(
        "redis"
    ):
        return 503, {
            "error": "store_unavailable",
            "reason": f"the online store is unavailable (reference {reference})",
        }
    return 500, {"error": "internal", "reason": f"internal error, logged with reference {reference}"}


# ---------------------------------------------------------------------------------------------
# Metrics (Prometheus; multiprocess mode when api.metrics_dir is set up by main)
# ---------------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self) -> None:
        # Imported here, not at module level: in multiprocess mode prometheus_client must see
        # PROMETHEUS_MULTIPROC_DIR, set by main before the workers import it.
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("carousel_api_requests", "HTTP requests answered", ["endpoint", "status"])
        self.latency = Histogram(
            "carousel_api_request_seconds",
            "Time to answer a request, in the worker",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.answers = Counter(
            "carousel_api_answers", "Recommendation answers by outcome", ["campaign", "outcome"]
        )
        self.outbox_records = Counter(
            "carousel_api_outbox_records", "Outbox records by broker outcome", ["outcome"]
        )
        self.lookups_version = Gauge(
            "carousel_api_lookups_version",
            "Delta table version of the lookups held",
            ["table"],
            multiprocess_mode="max",
        )
        # One stream shared by every worker and instance: each sweep reads its length.
        self.outbox_backlog = Gauge(
            "carousel_api_outbox_backlog",
            "Outbox records in the online store not yet acknowledged by the broker (at the last sweep)",
            multiprocess_mode="mostrecent",
        )

    @staticmethod
    def render() -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_METRICS: _Metrics | None = None


def _metrics() -> _Metrics:
    global _METRICS  # noqa: PLW0603 - one set of collectors per process (prometheus registers by name)
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS


class _Front:
    """The ASGI app uvicorn runs: ``GET /v1/users/{user_id}/recommendations`` answered directly,
    everything else by FastAPI; each request's status and time recorded by endpoint.

    Why directly: FastAPI's parameter resolution, middleware stack and response classes were
    about a quarter of a worker's CPU per answer (py-spy, 600 requests/s). The direct route uses
    the same parameter checks (:func:`recommendation_request`) and the same answer
    (:func:`answer_recommendations`) as the FastAPI route, which stays for the OpenAPI document."""

    def __init__(self, app: Any, service: ApiService, metrics: _Metrics) -> None:
        self.app, self.service, self.metrics = app, service, metrics
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        direct = _RECOMMENDATIONS_PATH.match(scope["path"]) if scope["method"] == "GET" else None
        if direct is not None:
            status = await self._recommendations(direct.group(1), scope, send)
            self._observe("recommendations", status, started)
            return
        captured = [500]

        async def capture(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                captured[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send=capture)
        finally:
            self._observe(getattr(scope.get("endpoint"), "__name__", "unmatched"), captured[0], started)

    def _observe(self, endpoint: str, status: int, started: float) -> None:
        series = self._series.get((endpoint, status))
        if series is None:  # prometheus_client's labels() lookup, once per endpoint and status
            series = (
                self.metrics.requests.labels(endpoint, str(status)),
                self.metrics.latency.labels(endpoint),
            )
            self._series[endpoint, status] = series
        series[0].inc()
        series[1].observe(time.perf_counter() - started)

    async def _recommendations(
        self,
        user_id: str,
        scope: MutableMapping[str, Any],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> int:
        # As Starlette reads them: the query string and header values as Latin-1, the last of a
        # repeated query parameter and the first of a repeated header.
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value.decode("latin-1"))  # the first of a repeated header
        try:
            request = recommendation_request(
                user_id,
                query.get("campaign"),
                query.get("item_id"),
                query.get("n"),
                headers.get(b"x-request-id"),
            )
            status, body, extra = await answer_recommendations(
                self.service, self.metrics, request, headers.get(b"x-api-key")
            )
        except ApiError as err:
            status, extra = err.status, err.headers
            body = compact_json({"error": err.code, "reason": err.reason}).encode()
        except Exception as err:  # noqa: BLE001 - answered as FastAPI's handler of last resort does
            status, reply = unexpected_error(scope["method"], scope["path"], err)
            body, extra = compact_json(reply).encode(), {}
        response = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in extra.items()
        ]
        if body:
            response += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": response})
        await send({"type": "http.response.body", "body": body})
        return status


# ---------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------
def _config_from_env() -> CarouselConfig:
    args = json.loads(os.environ.get(ARGS_ENV) or "{}")
    return load_config(args.get("config", []), args.get("overrides", []))


def create_app(cfg: CarouselConfig | None = None) -> _Front:
    """The FastAPI app of one worker (uvicorn calls this in each worker process)."""
    setup_logging()
    cfg = cfg or _config_from_env()
    service = ApiService(cfg)
    metrics = _metrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _GC_FULL_AFTER)
        service.start()
        service.start_sweeping(asyncio.get_running_loop())
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="carousel recommendations API",
        version="1",
        description=(__doc__ or "").split("\n\n")[0],
        lifespan=lifespan,
    )
    app.state.service = service

    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": text}
        for status, text in (
            (401, "no or an unknown API key"),
            (404, "unknown campaign or item"),
            (422, "a bad parameter"),
            (429, "the API key is over its rate limit"),
            (503, "not ready, or the online store or broker is unavailable"),
        )
    }

    def error(status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": code, "reason": reason}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error(err.status, err.code, err.reason, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_request: Request, err: RequestValidationError) -> JSONResponse:
        reasons = [
            f"{' '.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in err.errors()
        ]
        return error(422, "bad_parameter", "; ".join(reasons))

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else "http_error"
        return error(err.status_code, code, str(err.detail), dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        status, body = unexpected_error(request.method, request.url.path, err)
        return JSONResponse(body, status_code=status)

    # The handlers run on the worker's event loop: a request's work is CPU (ranking, rendering)
    # plus two sub-millisecond round trips to a nearby Redis, shared with the other requests in
    # flight (CoalescingStore) and made synchronously; FastAPI's thread pool cost slightly more
    # CPU for the same latency (README "API"). The broker's acknowledgement, milliseconds away,
    # is awaited. Throughput comes from the worker processes (api.workers).
    @app.get(
        "/v1/users/{user_id}/recommendations",
        responses={
            200: {
                "description": "the campaign channel's payload (conf/payload_schemas/<channel>.schema.json)"
            },
            204: {"description": "no eligible item for this user"},
            **errors,
        },
    )
    async def recommendations(
        user_id: str = PathParam(min_length=1, max_length=USER_ID_MAX),
        campaign: str = Query(
            min_length=1, max_length=CAMPAIGN_MAX, description="an enabled campaign of conf/"
        ),
        item_id: str | None = Query(
            None, min_length=1, max_length=ITEM_ID_MAX, description="the product on screen"
        ),
        n: int | None = Query(
            None, ge=1, le=N_MAX, description="at most this many items (up to the campaign's)"
        ),
        api_key: str | None = Header(None, alias=API_KEY_HEADER),
        request_id: str | None = Header(None, alias=REQUEST_ID_HEADER),
    ) -> Response:
        """A user's recommendations for one campaign, as its channel's payload.

        Documentation: requests to this path are answered by :class:`_Front`'s direct route
        (the same :func:`recommendation_request` and :func:`answer_recommendations`)."""
        request = recommendation_request(
            user_id, campaign, item_id, None if n is None else str(n), request_id
        )
        status, body, headers = await answer_recommendations(service, metrics, request, api_key)
        return Response(
            body, status_code=status, headers=headers, media_type="application/json" if body else None
        )

    @app.get("/v1/items/{item_id}/similar", responses=errors)
    async def similar(
        item_id: str = PathParam(min_length=1, max_length=256),
        n: int = Query(cfg.api.default_similar, ge=1, le=cfg.api.max_similar),
        campaign: str | None = Query(None, min_length=1, max_length=128, description="use its filters"),
        api_key: str | None = Header(None, alias=API_KEY_HEADER),
    ) -> dict[str, Any]:
        """The item's published similar items that the catalog offers now."""
        service.admit(service.authorize(api_key))
        filters = service.spec.campaign(campaign).filters if campaign else service.spec.similar_filters
        return similar_items(item_id, n, service.lookups(), filters)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The worker answers (liveness)."""
        return {"status": "ok"}

    @app.get(
        "/readyz", responses={503: {"model": ErrorBody, "description": "the lookups are not loaded yet"}}
    )
    async def readyz() -> dict[str, Any]:
        """The worker's lookups are loaded (readiness)."""
        lookups = service.lookups()
        for table, version in lookups.versions.items():
            if version is not None:
                metrics.lookups_version.labels(table).set(version)
        return {"status": "ready", "versions": lookups.versions, "worker": os.getpid()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics, summed over the worker processes."""
        body, content_type = _Metrics.render()
        return Response(body, media_type=content_type)

    return _Front(app, service, metrics)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _prepare_metrics_dir(path: str) -> None:
    """An empty folder for the workers' Prometheus files (stale ones would be summed in)."""
    folder = Path(path)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="api", description=(__doc__ or "").splitlines()[0]))
    parser.add_argument("--host", help="listen address (default api.host)")
    parser.add_argument("--port", type=int, help="listen port (default api.port)")
    parser.add_argument("--workers", type=int, help="worker processes (default api.workers)")
    args = parser.parse_args(argv)
    flags = {"host": args.host, "port": args.port, "workers": args.workers}
    extra = [f"api.{name}={value}" for name, value in flags.items() if value is not None]
    cfg = config_from_args(args, "api", extra)
    if not cfg.api.secrets():
        envs = sorted(key.env for key in cfg.api.keys.values())
        log.error("api cannot start: no API key in the environment; set one of %s", envs)
        return 2
    try:
        check_reachable(cfg.online_store)
        check_templates(cfg)
        # Every answer's outbox record goes to the broker: a missing broker or outbox topic
        # is a start-up error, not a 503 on every request.
        kafka = cfg.kafka
        topics = wait_until_reachable(
            kafka.bootstrap_servers, cfg.api.record_timeout_ms / 1000, kafka.client_settings()
        )
    except (OnlineStoreError, TemplateCheckError, TimeoutError, BrokerError) as err:
        log.error("api cannot start: %s", err)
        return 1
    for role, what in (("sent", "outbox"), ("dead_letter", "dead-letter")):
        if kafka.topic(role).name not in topics:
            log.error(
                "api cannot start: the %s topic %r does not exist on %s; create the topics with "
                "`./spark-submit.sh broker topics`",
                what,
                kafka.topic(role).name,
                kafka.bootstrap_servers,
            )
            return 1
    _prepare_metrics_dir(cfg.api.metrics_dir)
    os.environ[ARGS_ENV] = json.dumps({"config": args.config, "overrides": [*args.overrides, *extra]})
    keys = sorted(cfg.api.secrets())
    log.info(
        "api on http://%s:%d with %d workers; keys %s", cfg.api.host, cfg.api.port, cfg.api.workers, keys
    )
    config = uvicorn.Config(
        "carousel.api:create_app",
        factory=True,
        host=cfg.api.host,
        port=cfg.api.port,
        workers=cfg.api.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=_GRACEFUL_SECONDS,
    )
    if cfg.api.workers == 1:
        try:
            uvicorn.Server(config).run()
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
            pass
        return 0
    # A worker's shutdown: its requests, then the flush of its outbox (api.record_timeout_ms).
    stop_seconds = _GRACEFUL_SECONDS + cfg.api.record_timeout_ms / 1000 + 5
    return ReusePortWorkers(config, cfg.api.workers, stop_seconds, cfg.api.worker_timeout_seconds).run()


# ---------------------------------------------------------------------------------------------
# Worker processes: one listening socket each (SO_REUSEPORT)
# ---------------------------------------------------------------------------------------------
_GRACEFUL_SECONDS = 10
_STACK_DUMP_SECONDS = 2.0  # a hung worker's time to write its stacks before it is killed
_START_SECONDS = 60.0  # a worker's time to its event loop's first tick, at least
_EARLY_DEATH_SECONDS, _EARLY_DEATHS = 10.0, 5


def listening_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` sockets listening on the same ``host:port`` (port 0: one free port for all).

    With SO_REUSEPORT the kernel spreads new connections over the sockets by their address hash.
    One socket shared by every worker (uvicorn's ``--workers``) is not spread: the worker that
    wakes first accepts every pending connection in one go, so a client opening its keep-alive
    pool at once lands on one worker (measured: 87 % and 12 % of a core at 800 requests/s, and
    that one worker saturated while the other idled).

    A port already in use is refused (OSError), as without SO_REUSEPORT: a second service of the
    same user would otherwise join the group and take a share of the connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _BeatingServer(uvicorn.Server):
    """uvicorn's server, stamping ``heartbeat`` (shared with the supervisor) from its event loop."""

    heartbeat: Any = None  # a multiprocessing RawValue("d"): time.monotonic() of the last tick

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s on the event loop: a loop blocked by a stuck
        # request stops the stamps. CLOCK_MONOTONIC is the same clock in every process.
        self.heartbeat.value = time.monotonic()
        return await super().on_tick(counter)


def _serve_worker(config: uvicorn.Config, sock: socket.socket, heartbeat: Any) -> None:
    """A worker process: uvicorn serving on its own socket (module level: spawn pickles it).

    An app that cannot be built exits with uvicorn's start-up failure status, so the supervisor
    stops instead of restarting it. SIGUSR1 dumps every thread's stack to stderr (the supervisor
    sends it to a hung worker before killing it)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config.configure_logging()
    try:
        config.load()
    except Exception as err:  # noqa: BLE001 - any failure to build the app is a start-up failure
        log.error("api: the worker cannot build its app: %s", err)
        sys.exit(STARTUP_FAILURE)
    server = _BeatingServer(config)
    server.heartbeat = heartbeat
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    started: float  # time.monotonic()
    heartbeat: Any  # stamped by the worker's event loop (see _BeatingServer)

    def silent_for(self, timeout_seconds: float) -> float | None:
        """Seconds since the worker's event loop last ran, when more than ``timeout_seconds``
        (else None). Before its first tick the worker is starting (imports, the app, its
        producer), which a loaded machine may slow down: it has ``_START_SECONDS`` at least."""
        last = self.heartbeat.value
        if last:
            silent, limit = time.monotonic() - last, timeout_seconds
        else:
            silent, limit = time.monotonic() - self.started, max(timeout_seconds, _START_SECONDS)
        return silent if silent >= limit else None


class ReusePortWorkers:
    """Runs ``count`` uvicorn workers, each on its own SO_REUSEPORT socket, and keeps them running.

    A worker that dies is replaced on the same socket (connections waiting in its queue are then
    answered by the replacement). So is one whose event loop has not run for ``timeout_seconds``
    (a request stuck in a blocking call, a deadlock: alive, but answering nobody), after its
    threads' stacks are dumped to the log (SIGUSR1) for the post-mortem; it is then killed. One
    that fails at start-up (uvicorn's exit status 3: the app or its configuration is broken, and
    would fail again), or that dies within ``_EARLY_DEATH_SECONDS`` of its start
    ``_EARLY_DEATHS`` times in a row, stops the service with status 1. SIGTERM or SIGINT stops
    the workers gracefully: each finishes its requests and flushes its outbox, within
    ``stop_seconds``."""

    def __init__(
        self, config: uvicorn.Config, count: int, stop_seconds: float, timeout_seconds: float
    ) -> None:
        self.config, self.count, self.stop_seconds = config, count, stop_seconds
        self.timeout_seconds = timeout_seconds
        self._signals: list[int] = []  # appended by the handler (no lock taken in a handler)
        self._context = multiprocessing.get_context("spawn")

    def _start(self, sock: socket.socket) -> _Worker:
        heartbeat = self._context.RawValue("d", 0.0)
        process = self._context.Process(
            target=_serve_worker, args=(self.config, sock, heartbeat), name="api-worker"
        )
        process.start()
        return _Worker(process, time.monotonic(), heartbeat)

    def _stop_hung(self, worker: _Worker) -> None:
        """Kill a worker whose event loop stopped, after it dumped its stacks (as far as it can)."""
        silent = worker.silent_for(self.timeout_seconds)
        if silent is None or self._signals or not worker.process.is_alive():
            return
        pid = worker.process.pid
        log.error(
            "api: worker %d has not run its event loop for %.0f s (api.worker_timeout_seconds: %g); "
            "its threads' stacks follow, then it is killed",
            pid,
            silent,
            self.timeout_seconds,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)  # faulthandler: a C-level handler, runs even if Python is stuck
        worker.process.join(_STACK_DUMP_SECONDS)
        worker.process.kill()
        worker.process.join(_STACK_DUMP_SECONDS)
        if worker.process.is_alive():  # in an uninterruptible wait (D state): reaped on a later pass
            log.error("api: worker %d does not die of SIGKILL yet; checked again", pid)

    def _replace(self, workers: list[_Worker], deaths: list[int], sockets: list[socket.socket]) -> int:
        """Replace the dead and hung workers; 1 when the service must stop, else 0."""
        for index, worker in enumerate(workers):
            self._stop_hung(worker)
            if worker.process.is_alive() or self._signals:
                continue
            pid, exitcode = worker.process.pid, worker.process.exitcode
            if exitcode == STARTUP_FAILURE:
                log.error("api: worker %d failed to start (see above); stopping", pid)
                return 1
            # A worker killed before its first loop turn never started: an early death too.
            early = time.monotonic() - worker.started < _EARLY_DEATH_SECONDS or not worker.heartbeat.value
            deaths[index] = deaths[index] + 1 if early else 1
            if deaths[index] >= _EARLY_DEATHS:
                log.error("api: worker %d died %d times soon after starting; stopping", pid, deaths[index])
                return 1
            workers[index] = self._start(sockets[index])
            log.warning(
                "api: worker %d exited with status %s; replaced by worker %d",
                pid,
                exitcode,
                workers[index].process.pid,
            )
        return 0

    def run(self) -> int:
        config = self.config
        try:
            sockets = listening_sockets(config.host, config.port, self.count, config.backlog)
        except OSError as err:
            log.error("api cannot start: cannot listen on %s:%d: %s", config.host, config.port, err)
            return 1
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda number, _frame: self._signals.append(number))
        workers = [self._start(sock) for sock in sockets]
        deaths = [0] * len(workers)
        log.info("api: workers %s", [worker.process.pid for worker in workers])
        status = 0
        while not self._signals and not status:
            time.sleep(0.5)  # the supervisor's watch interval (a worker's death has no event here)
            status = self._replace(workers, deaths, sockets)
        processes = [worker.process for worker in workers]
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for sock in sockets:  # new connections are refused now, not queued for nobody
            sock.close()
        deadline = time.monotonic() + self.stop_seconds
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
        return status
